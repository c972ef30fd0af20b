// Per-thread bodies of the batch-norm kernels (batch_norm.cu) and the launch planning they share
// with the host code. __host__ __device__ so that tests/csrc/batch_norm_emulate.cuh can run them on
// the CPU, block by block, in the order the kernels do.
#pragma once

#include "common.cuh"

#include <algorithm>

namespace fastconv_cuda {
namespace bnk {

using at::Tensor;

constexpr int NT = 256;

template <typename T, int V> FC_HD void ld(const T* p, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = to_acc(*p);
  } else {
    const Vec<T, V> t = load_vec<T, V>(p);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = to_acc(t.v[e]);
  }
}
template <typename T, int V> FC_HD void st(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = from_acc<T>(v[0]);
  } else {
    Vec<T, V> t;
#pragma unroll
    for (int e = 0; e < V; ++e) t.v[e] = from_acc<T>(v[e]);
    store_vec<T, V>(p, t);
  }
}

// Chan et al.: merge (nb, mb, m2b) into (n, mean, m2).
FC_HD void merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  const float nn = n + nb;
  if (nn == 0.f) return;
  const float d = mb - mean, f = nb / nn;
  mean += d * f;
  m2 += m2b + d * d * n * f;
  n = nn;
}

// threshold_backward: drop where the saved output is <= 0 (NaN passes).
FC_HD bool passes(float y) { return !(y <= 0.f); }

// The V gradients at dy + off, masked by the ReLU on the saved output y when relu.
template <typename T, int V>
FC_HD void ld_masked_grad(const T* dy, const T* y, bool relu, int64_t off, float (&g)[V]) {
  ld<T, V>(dy + off, g);
  if (!relu) return;
  float o[V];
  ld<T, V>(y + off, o);
#pragma unroll
  for (int e = 0; e < V; ++e) g[e] = passes(o[e]) ? g[e] : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Reductions. Partials are [k][splits][C] float arrays: STATS (count, mean, m2), else
// (sum dy_m, sum dy_m * (x - mean)).
// ---------------------------------------------------------------------------------------------

// NCHW, CTA (channel c, split sp), thread tid: its strided share of the split's units
// (n, V-element piece of the plane).
template <typename T, int V, bool STATS>
FC_HD void reduce_nchw_thread(const T* x, const T* dy, const T* y, bool relu,
                              const float* mean_in, int C, int64_t HW, const FastDiv& dHWv,
                              uint32_t U, uint32_t per, int c, int sp, int tid, float& a,
                              float& b, float& cc) {
  const uint32_t u0 = uint32_t(sp) * per, u1 = std::min<uint32_t>(U, u0 + per);
  const uint32_t HWv = dHWv.d;
  const uint32_t dn = NT / HWv, dh = NT % HWv;
  uint32_t u = u0 + tid, n = 0, hw = 0;
  if (u < u1) dHWv.divmod(u, n, hw);
  a = b = cc = 0.f;
  const float mu = STATS ? 0.f : mean_in[c];
  for (; u < u1; u += NT) {
    const int64_t off = (int64_t(n) * C + c) * HW + int64_t(hw) * V;
    float xv[V];
    ld<T, V>(x + off, xv);
    if constexpr (STATS) {
      if constexpr (V == 1) {
        a += 1.f;
        const float d = xv[0] - b;
        b += d / a;
        cc += d * (xv[0] - b);
      } else {  // the V values as one chunk: exact two-pass stats, then one merge
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < V; ++e) s += xv[e];
        const float m = s * (1.f / V);
        float q = 0.f;
#pragma unroll
        for (int e = 0; e < V; ++e) q += (xv[e] - m) * (xv[e] - m);
        merge(a, b, cc, float(V), m, q);
      }
    } else {
      float g[V];
      ld_masked_grad<T, V>(dy, y, relu, off, g);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        a += g[e];
        b += g[e] * (xv[e] - mu);
      }
    }
    hw += dh;
    n += dn;
    if (hw >= HWv) { hw -= HWv; ++n; }
  }
}

// One level of the CTA's fixed reduction tree (deterministic).
template <bool STATS>
FC_HD void tree_step(float* s0, float* s1, float* s2, int tid, int s) {
  if (tid >= s) return;
  if constexpr (STATS) {
    merge(s0[tid], s1[tid], s2[tid], s0[tid + s], s1[tid + s], s2[tid + s]);
  } else {
    s0[tid] += s0[tid + s];
    s1[tid] += s1[tid + s];
  }
}

template <bool STATS>
FC_HD void write_partial(float* part, int splits, int C, int c, int sp, float a, float b, float cc) {
  const int64_t i = int64_t(sp) * C + c, k = int64_t(splits) * C;
  part[i] = a;
  part[k + i] = b;
  if (STATS) part[2 * k + i] = cc;
}

// channels_last: the tensor is [rows][C]. A CTA is TPR lanes across channel vectors times
// NT/TPR row lanes; CTA (bx, by) walks the row range of split by.
template <typename T, int V, bool STATS>
FC_HD void reduce_nhwc_thread(const T* x, const T* dy, const T* y, bool relu,
                              const float* mean_in, int64_t rows, int C, int Cv, int TPR,
                              int64_t per, int bx, int by, int tid, float& cnt, float (&a)[V],
                              float (&b)[V]) {
  const int cl = tid % TPR, rsub = tid / TPR, RPB = NT / TPR;
  const int cv = bx * TPR + cl;
  const int64_t r0 = int64_t(by) * per, r1 = std::min<int64_t>(rows, r0 + per);
  float mu[V];
  cnt = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    a[e] = b[e] = 0.f;
    mu[e] = (!STATS && cv < Cv) ? mean_in[cv * V + e] : 0.f;
  }
  if (cv >= Cv) return;
  for (int64_t r = r0 + rsub; r < r1; r += RPB) {
    const int64_t off = r * C + int64_t(cv) * V;
    float xv[V];
    ld<T, V>(x + off, xv);
    if constexpr (STATS) {
      cnt += 1.f;
      const float inv = 1.f / cnt;  // shared by the V channels
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = xv[e] - a[e];
        a[e] += d * inv;
        b[e] += d * (xv[e] - a[e]);
      }
    } else {
      float g[V];
      ld_masked_grad<T, V>(dy, y, relu, off, g);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        a[e] += g[e];
        b[e] += g[e] * (xv[e] - mu[e]);
      }
    }
  }
}

// After the barrier: thread tid < TPR*V merges channel (tid / V, tid % V) of all row lanes, in
// row-lane order, and writes the CTA's partial. sc[t], s1[t*V+e], s2[t*V+e] hold thread t's state.
template <int V, bool STATS>
FC_HD void reduce_nhwc_combine(const float* sc, const float* s1, const float* s2, int tid,
                               int TPR, int bx, int by, int C, int splits, float* part) {
  if (tid >= TPR * V) return;
  const int l = tid / V, e = tid % V, c = (bx * TPR + l) * V + e;
  if (c >= C) return;
  const int RPB = NT / TPR;
  float n = 0.f, m = 0.f, q = 0.f;
  for (int j = 0; j < RPB; ++j) {
    const int t = j * TPR + l;
    if constexpr (STATS) merge(n, m, q, sc[t], s1[t * V + e], s2[t * V + e]);
    else { m += s1[t * V + e]; q += s2[t * V + e]; }
  }
  if constexpr (STATS) write_partial<true>(part, splits, C, c, by, n, m, q);
  else write_partial<false>(part, splits, C, c, by, m, q, 0.f);
}

// ---------------------------------------------------------------------------------------------
// Finalisation: one warp per channel. A lane merges the splits lane, lane+32, ...; then a
// shuffle-down tree (kernel) or its emulation folds the lanes; lane 0 writes.
// ---------------------------------------------------------------------------------------------

FC_HD void stats_lane(const float* part, int splits, int C, int c, int lane, float& n, float& m,
                      float& q) {
  const int64_t k = int64_t(splits) * C;
  n = m = q = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const int64_t i = int64_t(s) * C + c;
    merge(n, m, q, part[i], part[k + i], part[2 * k + i]);
  }
}

// save_mean/save_invstd, forward coefficients (mean, scale, shift) and running statistics.
FC_HD void stats_write(int c, int C, float n, float m, float q, const float* w, const float* bias,
                       float* rm, float* rv, float momentum, float eps, float* save_mean,
                       float* save_invstd, float* coef) {
  const float var = q / n;
  const float invstd = 1.f / sqrtf(var + eps);
  save_mean[c] = m;
  save_invstd[c] = invstd;
  coef[c] = m;
  coef[C + c] = invstd * (w ? w[c] : 1.f);
  coef[2 * C + c] = bias ? bias[c] : 0.f;
  if (rm) rm[c] = (1.f - momentum) * rm[c] + momentum * m;
  if (rv) rv[c] = (1.f - momentum) * rv[c] + momentum * (q / (n - 1.f));
}

FC_HD void eval_prep_one(int c, const float* rm, const float* rv, int C, const float* w,
                         const float* bias, float eps, float* save_mean, float* save_invstd,
                         float* coef) {
  const float invstd = 1.f / sqrtf(rv[c] + eps);
  save_mean[c] = rm[c];
  save_invstd[c] = invstd;
  coef[c] = rm[c];
  coef[C + c] = invstd * (w ? w[c] : 1.f);
  coef[2 * C + c] = bias ? bias[c] : 0.f;
}

FC_HD void grad_lane(const float* part, int splits, int C, int c, int lane, float& s1, float& s2) {
  const int64_t k = int64_t(splits) * C;
  s1 = s2 = 0.f;
  for (int s = lane; s < splits; s += 32) {
    s1 += part[int64_t(s) * C + c];
    s2 += part[k + int64_t(s) * C + c];
  }
}

// grad_weight, grad_bias (float) and the grad_input coefficients:
// dx = dy_m * A + (x - mean) * B + Cc.
FC_HD void grad_write(int c, int C, float s1, float s2, float count, bool training,
                      const float* w, const float* mean, const float* invstd, float* gw,
                      float* gb, float* coef) {
  const float is = invstd[c], A = is * (w ? w[c] : 1.f);
  gw[c] = s2 * is;
  gb[c] = s1;
  coef[c] = mean[c];
  coef[C + c] = A;
  coef[2 * C + c] = training ? -A * is * is * s2 / count : 0.f;
  coef[3 * C + c] = training ? -A * s1 / count : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Elementwise. BWD=false: out = relu?((x - m) * s + t + res?)   (res may be null).
// BWD=true: out = dy_m * A + (x - m) * B + Cc   (x read only when training; out may be null)
// and gres = dy_m, the residual's gradient, from the same loads (gres may be null).
// ---------------------------------------------------------------------------------------------

template <typename T, int V, bool BWD>
FC_HD void element(const T* x, const T* dy, const T* y, const T* res, T* out, T* gres,
                   int64_t off, const float (&k)[4][V], bool relu, bool training) {
  float xv[V], g[V], o[V];
  if (!BWD || (training && out)) {
    ld<T, V>(x + off, xv);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) xv[e] = 0.f;
  }
  if (BWD) {
    ld_masked_grad<T, V>(dy, y, relu, off, g);
    if (gres) st<T, V>(gres + off, g);
    if (!out) return;
  }
  float r[V];
  if (!BWD && res) {
    ld<T, V>(res + off, r);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (BWD) {
      o[e] = g[e] * k[1][e] + (xv[e] - k[0][e]) * k[2][e] + k[3][e];
    } else {
      const float v = (xv[e] - k[0][e]) * k[1][e] + k[2][e] + r[e];
      o[e] = relu ? relu_nan(v) : v;
    }
  }
  st<T, V>(out + off, o);
}

// channels_last: global thread gt keeps one channel vector (and its coefficients in registers)
// and strides over rows.
template <typename T, int V, bool BWD>
FC_HD void apply_nhwc_thread(const T* x, const T* dy, const T* y, const T* res, T* out,
                             T* gres, const float* coef, int64_t rows, int C, int Cv,
                             int64_t row_step, bool relu, bool training, int64_t gt) {
  if (gt >= row_step * Cv) return;
  const int cv = int(gt % Cv);
  float k[4][V];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) k[j][e] = (j < 3 || BWD) ? coef[int64_t(j) * C + cv * V + e] : 0.f;
  for (int64_t r = gt / Cv; r < rows; r += row_step)
    element<T, V, BWD>(x, dy, y, res, out, gres, r * C + int64_t(cv) * V, k, relu, training);
}

// NCHW: image n, unit u = (c, V-element piece of the plane) at offset n * sN + u * V.
template <typename T, int V, bool BWD>
FC_HD void apply_nchw_thread(const T* x, const T* dy, const T* y, const T* res, T* out,
                             T* gres, const float* coef, int C, const FastDiv& dHWv,
                             uint32_t upi, int64_t n, int64_t sN, bool relu, bool training,
                             uint32_t u) {
  if (u >= upi) return;
  const int c = int(dHWv.div(u));
  float k[4][V];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float v = (j < 3 || BWD) ? coef[int64_t(j) * C + c] : 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) k[j][e] = v;
  }
  element<T, V, BWD>(x, dy, y, res, out, gres, n * sN + int64_t(u) * V, k, relu, training);
}

// ---------------------------------------------------------------------------------------------
// Launch planning (host)
// ---------------------------------------------------------------------------------------------

struct Layout {
  bool cl;        // channels_last kernels (else NCHW)
  int V;          // elements per vector access
  int64_t rows;   // N*H*W
  int64_t HW;
};

template <typename T>
Layout layout_of(const Tensor& x, std::initializer_list<const Tensor*> others) {
  Layout L;
  L.cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
  L.HW = x.size(2) * x.size(3);
  L.rows = x.size(0) * L.HW;
  constexpr int VM = 16 / sizeof(T);
  bool al = aligned_to(x.data_ptr(), 16);
  for (const Tensor* t : others) al = al && (!t->defined() || aligned_to(t->data_ptr(), 16));
  const int64_t inner = L.cl ? x.size(1) : L.HW;
  L.V = (al && inner % VM == 0) ? VM : 1;
  return L;
}

// Grid of the reduction: channels_last (cblocks of TPR channel vectors) x splits of rows, or
// NCHW channels x splits of each channel's units; about 4 CTAs per SM.
struct ReducePlan {
  int TPR = 1;             // channels_last: lanes across channel vectors (power of 2, <= 32)
  int64_t gx = 1, splits = 1, per = 1;  // grid.x, grid.y, rows (units) per split
  int64_t U = 0;           // NCHW: units per channel
};

inline ReducePlan plan_reduce(const Layout& L, int64_t N, int C, int sms) {
  ReducePlan p;
  if (L.cl) {
    const int Cv = C / L.V;
    while (p.TPR < Cv && p.TPR < 32) p.TPR *= 2;
    p.gx = ceil_div(Cv, p.TPR);
    const int64_t want = ceil_div(4 * int64_t(sms), p.gx);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(L.rows, 64), 65535}));
    p.per = ceil_div(L.rows, splits);
    p.splits = ceil_div(L.rows, p.per);
    return p;
  }
  p.U = N * (L.HW / L.V);
  TORCH_CHECK(p.U < (int64_t(1) << 31), "fastconv (CUDA): batch_norm channel of ", p.U * L.V,
              " elements is too large (2^31 per channel)");
  p.gx = C;
  const int64_t want = ceil_div(4 * int64_t(sms), C);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(p.U, 4 * NT), 65535}));
  p.per = ceil_div(p.U, splits);
  p.splits = ceil_div(p.U, p.per);
  return p;
}

// channels_last elementwise grid: enough CTAs for 16 per SM at most, each thread one channel
// vector striding over rows.
struct ApplyPlan {
  int64_t blocks = 1, row_step = 1;
};

inline ApplyPlan plan_apply_nhwc(int64_t rows, int Cv, int sms) {
  ApplyPlan p;
  const int64_t need = rows * Cv;
  p.blocks = std::max<int64_t>(ceil_div(Cv, NT), std::min<int64_t>(ceil_div(need, NT), 16 * int64_t(sms)));
  p.row_step = std::max<int64_t>(1, p.blocks * NT / Cv);
  return p;
}

}  // namespace bnk
}  // namespace fastconv_cuda
