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
// Input window [st, en) of output o along one dimension; `padded` (the count_include_pad
// divisor) is left as it is for adaptive windows.
FC_HD void window_of(const AvgArgs& aa, int o, int in, int out, int k, int s, int p, int& st,
                     int& en, int& padded) {
  if (aa.adaptive) adaptive_window(o, in, out, st, en);
  else avg_window(o, in, k, s, p, st, en, padded);
}
// Outputs [o0, o1) whose windows may cover input i along one dimension.
FC_HD void covering(const AvgArgs& aa, int i, int in, int out, int k, int s, int p, int& o0,
                    int& o1) {
  if (aa.adaptive) {
    o0 = int((int64_t(i) * out) / in);
    o1 = int((int64_t(i + 1) * out + in - 1) / in);
  } else {
    o0 = (i + p < k) ? 0 : (i + p - k) / s + 1;
    o1 = min((i + p) / s + 1, out);
  }
  o1 = min(o1, out);
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
  window_of(aa, oh, g.H, g.OH, g.kh, g.sh, g.ph, hs, he, ph_);
  window_of(aa, ow, g.W, g.OW, g.kw, g.sw, g.pw, ws, we, pw_);
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
  covering(aa, h, g.H, g.OH, g.kh, g.sh, g.ph, oh0, oh1);
  covering(aa, w, g.W, g.OW, g.kw, g.sw, g.pw, ow0, ow1);
  A acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = A(0);
  const T* gp = gy + n * g.os[0] + int64_t(c) * g.os[1];
  for (int oh = oh0; oh < oh1; ++oh) {
    int hs, he, ph_ = 0;
    window_of(aa, oh, g.H, g.OH, g.kh, g.sh, g.ph, hs, he, ph_);
    if (h < hs || h >= he) continue;
    for (int ow = ow0; ow < ow1; ++ow) {
      int ws, we, pw_ = 0;
      window_of(aa, ow, g.W, g.OW, g.kw, g.sw, g.pw, ws, we, pw_);
      if (w < ws || w >= we) continue;
      const A div = avg_divisor<A>(aa, hs, he, ws, we, ph_ * pw_);
      T d[V];
      load_v<T, V>(gp + int64_t(oh) * g.os[2] + int64_t(ow) * g.os[3], d);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += to_acc(d[e]) / div;
    }
  }
  store_acc<T, V>(gx, g.is, n, c, h, w, acc);
}

}  // namespace poolk
}  // namespace fastconv_cuda
