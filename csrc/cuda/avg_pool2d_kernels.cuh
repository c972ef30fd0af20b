// Per-thread bodies of the average-pool kernels (avg_pool2d.cu; adaptive windows too),
// __host__ __device__ for the CPU emulation (tests/csrc/pool_emulate.cuh).
#pragma once

#include "pool_common.cuh"

namespace fastconv_cuda {
namespace poolk {

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

}  // namespace poolk
}  // namespace fastconv_cuda
