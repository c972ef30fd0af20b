// What the pooling kernels share (max_pool2d.cu, avg_pool2d.cu): the per-image geometry,
// unit decoding, 16-byte vector loads and the host-side plan (which variant, its geometry).
// __host__ __device__ so that tests/csrc/pool_emulate.cuh runs the same code on the CPU.
#pragma once

#include "common.cuh"

#include <type_traits>

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

// Accumulators converted to T and stored at (n, c, a, b) of the tensor with strides st.
template <typename T, int V, typename A>
FC_HD void store_acc(T* p, const int64_t (&st)[4], int64_t n, int c, int a, int b,
                     const A (&acc)[V]) {
  T out[V];
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = from_acc<T>(acc[e]);
  store_v<T, V>(p + n * st[0] + int64_t(c) * st[1] + int64_t(a) * st[2] + int64_t(b) * st[3], out);
}

// threshold_backward semantics for the fused ReLU: drop where the output is <= 0 (NaN passes).
template <typename T> FC_HD bool passes(T y) { return !(to_acc(y) <= 0); }

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

inline void check_pool_input(const Tensor& input, at::IntArrayRef k, at::IntArrayRef s,
                      at::IntArrayRef p, at::IntArrayRef d) {
  check_cuda(input, "input");
  check_4d(input, "input");
  check_float(input, "input");
  check_pair(k, "kernel_size", 1);
  check_pair(s, "stride", 1);
  check_pair(p, "padding", 0);
  check_pair(d, "dilation", 1);
  TORCH_CHECK(p[0] * 2 <= k[0] && p[1] * 2 <= k[1], "fastconv (CUDA): padding ", p,
              " must be at most half of kernel_size ", k);
}

// What both pooling backward ops check: grad_output has the pooled size of input_size.
inline void check_pool_backward(const Tensor& grad_output, at::IntArrayRef input_size,
                                at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                                at::IntArrayRef d, bool ceil_mode) {
  check_cuda(grad_output, "grad_output");
  check_4d(grad_output, "grad_output");
  check_float(grad_output, "grad_output");
  TORCH_CHECK(input_size.size() == 4, "fastconv (CUDA): input_size must have 4 elements, got ",
              input_size);
  check_pair(k, "kernel_size", 1);
  check_pair(s, "stride", 1);
  check_pair(p, "padding", 0);
  check_pair(d, "dilation", 1);
  const int64_t OH = pooled_size(input_size[2], k[0], p[0], s[0], d[0], ceil_mode);
  const int64_t OW = pooled_size(input_size[3], k[1], p[1], s[1], d[1], ceil_mode);
  TORCH_CHECK(grad_output.size(0) == input_size[0] && grad_output.size(1) == input_size[1] &&
                  grad_output.size(2) == OH && grad_output.size(3) == OW,
              "fastconv (CUDA): grad_output of shape ", grad_output.sizes(),
              " does not match input_size ", input_size);
}

// Launches f(grid, n0) over the batch in slices of at most 65535 images (grid.y).
template <typename F> void over_batch(int64_t N, uint32_t units, F&& f) {
  const unsigned bx = unsigned(ceil_div(units, 256));
  for (int64_t n0 = 0; n0 < N; n0 += kMaxGridY) {
    const unsigned ny = unsigned(std::min<int64_t>(kMaxGridY, N - n0));
    f(dim3(bx, ny), n0);
    FC_LAUNCH_CHECK();
  }
}

// Launches f(std::integral_constant<int, V>{}, grid, n0) over the batch: V = 16 / sizeof(T)
// channels per thread (the channels_last kernel) when the plan vectorises, else 1 (strided).
template <typename T, typename F>
void over_batch_planned(const Plan& pl, int64_t N, uint32_t units, F&& f) {
  constexpr int VM = 16 / sizeof(T);
  over_batch(N, units, [&](dim3 grid, int64_t n0) {
    if (pl.vec == VM) f(std::integral_constant<int, VM>{}, grid, n0);
    else f(std::integral_constant<int, 1>{}, grid, n0);
  });
}

// f(I{}) for the index dtype of max-pool indices: int64 (return_indices), int32 or int8.
template <typename F> void with_index_type(at::ScalarType idt, F&& f) {
  if (idt == at::kLong) f(int64_t{});
  else if (idt == at::kInt) f(int32_t{});
  else f(int8_t{});
}

}  // namespace poolk
}  // namespace fastconv_cuda
