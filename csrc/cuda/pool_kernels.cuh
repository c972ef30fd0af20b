// Per-thread bodies of the pooling kernels (pool.cu): geometry, index decoding, window rules.
// __host__ __device__ so that csrc/cuda/pool_emulate.cuh can run them on the CPU.
#pragma once

#include "common.cuh"

namespace fastconv_cuda {
namespace poolk {

struct PoolGeom {
  int C, H, W, OH, OW;       // input C,H,W; output OH,OW
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t is[4], os[4];      // strides (n, c, h, w) of the input-shaped / output-shaped tensors
  FastDiv d1, d2;            // unit decomposition (see decode)
  uint32_t units;            // units per image
};

// Unit u of an image -> (c, a, b) where (a, b) is the spatial position. Channels_last units are
// (a, b, channel vector) with the vector fastest; NCHW units are (c, a, b) with b fastest.
template <bool CL, int V>
FC_HD void decode(const PoolGeom& g, uint32_t u, int& c, int& a, int& b) {
  uint32_t q1, r1, q2, r2;
  g.d1.divmod(u, q1, r1);
  g.d2.divmod(q1, q2, r2);
  if (CL) { c = int(r1) * V; b = int(r2); a = int(q2); }
  else    { b = int(r1); a = int(r2); c = int(q2); }
}

template <typename T, int V> FC_HD void load_v(const T* p, T (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = *p;
  } else {
    const Vec<T, V> t = load_vec<T, V>(p);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = t.v[e];
  }
}
template <typename T, int V> FC_HD void store_v(T* p, const T (&v)[V]) {
  if constexpr (V == 1) {
    *p = v[0];
  } else {
    Vec<T, V> t;
#pragma unroll
    for (int e = 0; e < V; ++e) t.v[e] = v[e];
    store_vec<T, V>(p, t);
  }
}

// threshold_backward semantics for the fused ReLU: drop where the output is <= 0 (NaN passes).
template <typename T> FC_HD bool passes(T y) { return !(to_acc(y) <= 0); }

// ---- max pool ----

template <typename T, int V, bool CL, typename I>
FC_HD void maxpool_fwd_one(const T* __restrict__ x, T* __restrict__ y, I* __restrict__ ind,
                                   const PoolGeom g, bool flat, bool relu, int64_t n, uint32_t u) {
  using A = typename Acc<T>::type;
  int c, oh, ow;
  decode<CL, V>(g, u, c, oh, ow);
  const int hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
  // torch starts the argmax at the first in-bounds element of the window
  const int i0 = hs >= 0 ? 0 : (-hs + g.dh - 1) / g.dh;
  const int j0 = ws >= 0 ? 0 : (-ws + g.dw - 1) / g.dw;
  const int64_t first = flat ? int64_t(hs + i0 * g.dh) * g.W + (ws + j0 * g.dw) : i0 * g.kw + j0;
  A best[V];
  int64_t arg[V];
#pragma unroll
  for (int e = 0; e < V; ++e) { best[e] = neg_inf<A>(); arg[e] = first; }
  const T* xp = x + n * g.is[0] + int64_t(c) * g.is[1];
  for (int i = i0; i < g.kh; ++i) {
    const int h = hs + i * g.dh;
    if (h >= g.H) break;
    for (int j = j0; j < g.kw; ++j) {
      const int w = ws + j * g.dw;
      if (w >= g.W) break;
      T v[V];
      load_v<T, V>(xp + int64_t(h) * g.is[2] + int64_t(w) * g.is[3], v);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A a = to_acc(v[e]);
        if (relu) a = relu_nan(a);
        if (a > best[e] || is_nan(a)) {  // torch's rule: NaN wins, later NaNs replace it
          best[e] = a;
          arg[e] = flat ? int64_t(h) * g.W + w : i * g.kw + j;
        }
      }
    }
  }
  const int64_t off = n * g.os[0] + int64_t(c) * g.os[1] + int64_t(oh) * g.os[2] + int64_t(ow) * g.os[3];
  T out[V];
  I idx[V];
#pragma unroll
  for (int e = 0; e < V; ++e) { out[e] = from_acc<T>(best[e]); idx[e] = I(arg[e]); }
  store_v<T, V>(y + off, out);
  store_v<I, V>(ind + off, idx);
}


template <typename T, int V, bool CL, typename I>
FC_HD void maxpool_bwd_one(const T* __restrict__ gy, const T* __restrict__ y,
                                   const I* __restrict__ ind, T* __restrict__ gx, const PoolGeom g,
                                   bool flat, bool relu, int64_t n, uint32_t u) {
  using A = typename Acc<T>::type;
  int c, h, w;
  decode<CL, V>(g, u, c, h, w);  // units here run over the input
  A acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = A(0);
  const int64_t obase = n * g.os[0] + int64_t(c) * g.os[1];
  for (int i = 0; i < g.kh; ++i) {
    const int hn = h + g.ph - i * g.dh;
    if (hn < 0) break;
    const int oh = hn / g.sh;
    if (oh * g.sh != hn || oh >= g.OH) continue;
    for (int j = 0; j < g.kw; ++j) {
      const int wn = w + g.pw - j * g.dw;
      if (wn < 0) break;
      const int ow = wn / g.sw;
      if (ow * g.sw != wn || ow >= g.OW) continue;
      const int64_t off = obase + int64_t(oh) * g.os[2] + int64_t(ow) * g.os[3];
      const int64_t target = flat ? int64_t(h) * g.W + w : i * g.kw + j;
      I id[V];
      T d[V], o[V];
      load_v<I, V>(ind + off, id);
      load_v<T, V>(gy + off, d);
      if (relu) load_v<T, V>(y + off, o);
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (int64_t(id[e]) == target && (!relu || passes(o[e]))) acc[e] += to_acc(d[e]);
    }
  }
  T out[V];
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = from_acc<T>(acc[e]);
  store_v<T, V>(gx + n * g.is[0] + int64_t(c) * g.is[1] + int64_t(h) * g.is[2] + int64_t(w) * g.is[3],
                out);
}


// ---- average pools ----

struct AvgArgs {
  bool count_include_pad;
  int divisor;  // divisor_override, 0 when absent
  bool adaptive;
};

// Window of output (oh, ow) in one dimension, torch's rules.
FC_HD void avg_window(int o, int in, int k, int s, int p, int& st, int& en,
                                           int& padded) {
  st = o * s - p;
  en = min(st + k, in + p);
  padded = en - st;
  st = max(st, 0);
  en = min(en, in);
}
FC_HD void adaptive_window(int o, int in, int out, int& st, int& en) {
  st = int((int64_t(o) * in) / out);
  en = int((int64_t(o + 1) * in + out - 1) / out);
}

template <typename A>
FC_HD A avg_divisor(const AvgArgs& a, int hs, int he, int ws, int we,
                                         int pad_area) {
  if (a.adaptive) return A((he - hs) * (we - ws));
  if (a.divisor) return A(a.divisor);
  return A(a.count_include_pad ? pad_area : (he - hs) * (we - ws));
}

template <typename T, int V, bool CL>
FC_HD void avgpool_fwd_one(const T* __restrict__ x, T* __restrict__ y, const PoolGeom g,
                                   const AvgArgs aa, int64_t n, uint32_t u) {
  using A = typename Acc<T>::type;
  int c, oh, ow;
  decode<CL, V>(g, u, c, oh, ow);
  int hs, he, ws, we, ph_ = 0, pw_ = 0;
  if (aa.adaptive) {
    adaptive_window(oh, g.H, g.OH, hs, he);
    adaptive_window(ow, g.W, g.OW, ws, we);
  } else {
    avg_window(oh, g.H, g.kh, g.sh, g.ph, hs, he, ph_);
    avg_window(ow, g.W, g.kw, g.sw, g.pw, ws, we, pw_);
  }
  A acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = A(0);
  const T* xp = x + n * g.is[0] + int64_t(c) * g.is[1];
  for (int h = hs; h < he; ++h)
    for (int w = ws; w < we; ++w) {
      T v[V];
      load_v<T, V>(xp + int64_t(h) * g.is[2] + int64_t(w) * g.is[3], v);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += to_acc(v[e]);
    }
  T out[V];
  if (hs >= he || ws >= we) {  // an empty window (torch writes 0)
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = T(0);
  } else {
    const A div = avg_divisor<A>(aa, hs, he, ws, we, ph_ * pw_);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = from_acc<T>(acc[e] / div);
  }
  store_v<T, V>(y + n * g.os[0] + int64_t(c) * g.os[1] + int64_t(oh) * g.os[2] + int64_t(ow) * g.os[3],
                out);
}


template <typename T, int V, bool CL>
FC_HD void avgpool_bwd_one(const T* __restrict__ gy, T* __restrict__ gx, const PoolGeom g,
                                   const AvgArgs aa, int64_t n, uint32_t u) {
  using A = typename Acc<T>::type;
  int c, h, w;
  decode<CL, V>(g, u, c, h, w);
  int oh0, oh1, ow0, ow1;  // outputs whose window may cover (h, w)
  if (aa.adaptive) {
    oh0 = int((int64_t(h) * g.OH) / g.H);
    oh1 = int((int64_t(h + 1) * g.OH + g.H - 1) / g.H);
    ow0 = int((int64_t(w) * g.OW) / g.W);
    ow1 = int((int64_t(w + 1) * g.OW + g.W - 1) / g.W);
  } else {
    oh0 = (h + g.ph < g.kh) ? 0 : (h + g.ph - g.kh) / g.sh + 1;
    oh1 = min((h + g.ph) / g.sh + 1, g.OH);
    ow0 = (w + g.pw < g.kw) ? 0 : (w + g.pw - g.kw) / g.sw + 1;
    ow1 = min((w + g.pw) / g.sw + 1, g.OW);
  }
  oh1 = min(oh1, g.OH);
  ow1 = min(ow1, g.OW);
  A acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = A(0);
  const T* gp = gy + n * g.os[0] + int64_t(c) * g.os[1];
  for (int oh = oh0; oh < oh1; ++oh) {
    int hs, he, ph_ = 0;
    if (aa.adaptive) adaptive_window(oh, g.H, g.OH, hs, he);
    else avg_window(oh, g.H, g.kh, g.sh, g.ph, hs, he, ph_);
    if (h < hs || h >= he) continue;
    for (int ow = ow0; ow < ow1; ++ow) {
      int ws, we, pw_ = 0;
      if (aa.adaptive) adaptive_window(ow, g.W, g.OW, ws, we);
      else avg_window(ow, g.W, g.kw, g.sw, g.pw, ws, we, pw_);
      if (w < ws || w >= we) continue;
      const A div = avg_divisor<A>(aa, hs, he, ws, we, ph_ * pw_);
      T d[V];
      load_v<T, V>(gp + int64_t(oh) * g.os[2] + int64_t(ow) * g.os[3], d);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += to_acc(d[e]) / div;
    }
  }
  T out[V];
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = from_acc<T>(acc[e]);
  store_v<T, V>(gx + n * g.is[0] + int64_t(c) * g.is[1] + int64_t(h) * g.is[2] + int64_t(w) * g.is[3],
                out);
}

// ---- host-side geometry (shared with the emulation) ----

using at::Tensor;

inline int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t lo) {
  TORCH_CHECK(v.size() == 2, "fastconv (CUDA): ", name, " must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= lo && v[1] >= lo, "fastconv (CUDA): ", name, " must be >= ", lo, ", got ", v);
}

inline void check_float(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastconv (CUDA): ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// Which kernel variant a pair of (input-shaped, output-shaped) tensors gets: the channels_last
// order with 16-byte channel vectors when both are channels_last, C is a multiple of the vector
// and every pointer is aligned; otherwise the scalar kernel in (n, c, h, w) order over strides.
struct Plan {
  bool cl;   // channels_last unit order (only together with vec > 1)
  int vec;   // channels per thread
};

template <typename T>
Plan plan_for(const Tensor& a, const Tensor& b, std::initializer_list<const Tensor*> more = {}) {
  constexpr int VM = 16 / sizeof(T);
  bool ok = a.suggest_memory_format() == at::MemoryFormat::ChannelsLast &&
            a.is_contiguous(at::MemoryFormat::ChannelsLast) &&
            b.is_contiguous(at::MemoryFormat::ChannelsLast) && a.size(1) % VM == 0 &&
            aligned_to(a.data_ptr(), 16) && aligned_to(b.data_ptr(), 16);
  for (const Tensor* t : more) ok = ok && aligned_to(t->data_ptr(), 16);
  return ok ? Plan{true, VM} : Plan{false, 1};
}

// Fills the geometry; walk_input: threads walk the input-shaped tensor (backward passes).
inline PoolGeom make_geom(const Tensor& in_like, const Tensor& out_like, bool walk_input, const Plan& pl) {
  PoolGeom g{};
  g.C = int(in_like.size(1));
  g.H = int(in_like.size(2));
  g.W = int(in_like.size(3));
  g.OH = int(out_like.size(2));
  g.OW = int(out_like.size(3));
  for (int i = 0; i < 4; ++i) {
    g.is[i] = in_like.stride(i);
    g.os[i] = out_like.stride(i);
  }
  const int64_t A = walk_input ? g.H : g.OH, B = walk_input ? g.W : g.OW;
  const int64_t units = (int64_t(g.C) / pl.vec) * A * B;
  TORCH_CHECK(units < (int64_t(1) << 31), "fastconv (CUDA): a pooling image of ", g.C, "x", A, "x",
              B, " elements is too large (2^31 per image)");
  g.units = uint32_t(units);
  if (pl.cl) {
    g.d1 = FastDiv(std::max<int64_t>(1, g.C / pl.vec));
    g.d2 = FastDiv(std::max<int64_t>(1, B));
  } else {
    g.d1 = FastDiv(std::max<int64_t>(1, B));
    g.d2 = FastDiv(std::max<int64_t>(1, A));
  }
  return g;
}

inline void set_geom_pool(PoolGeom& g, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                   at::IntArrayRef d) {
  g.kh = int(k[0]); g.kw = int(k[1]);
  g.sh = int(s[0]); g.sw = int(s[1]);
  g.ph = int(p[0]); g.pw = int(p[1]);
  g.dh = int(d[0]); g.dw = int(d[1]);
}

}  // namespace poolk
}  // namespace fastconv_cuda
