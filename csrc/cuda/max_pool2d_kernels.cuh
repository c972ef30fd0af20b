// Per-thread bodies of the max-pool kernels (max_pool2d.cu), __host__ __device__ for the
// CPU emulation (tests/csrc/pool_emulate.cuh).
#pragma once

#include "pool_common.cuh"

namespace fastconv_cuda {
namespace poolk {

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
  store_acc<T, V>(gx, g.is, n, c, h, w, acc);
}


}  // namespace poolk
}  // namespace fastconv_cuda
