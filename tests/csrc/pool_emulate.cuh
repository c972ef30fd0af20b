// CPU emulation of the pooling kernels (max_pool2d.cu, avg_pool2d.cu) against ATen's CPU pooling ops.
//
// The per-thread bodies of max_pool2d_kernels.cuh and avg_pool2d_kernels.cuh run for every (image, unit) exactly as the kernels
// would, with the same plan/geometry code as the launchers, on CPU tensors; outputs start as NaN
// (indices as -99) so that an element no thread writes fails. Both kernel variants (channels_last
// 16-byte vectors, scalar NCHW order) are forced in turn. Not part of the extension:
// tests/test_extension_cuda.py compiles it as a host program with libtorch_cpu as reference.
#pragma once

#include "max_pool2d_kernels.cuh"
#include "avg_pool2d_kernels.cuh"

#include <ATen/ATen.h>

#include <cstdio>
#include <string>

namespace fastconv_cuda {
namespace emu_pool {

using namespace poolk;
using at::Tensor;

inline at::MemoryFormat fmt_of(const Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// vec: use plan_for's choice; scalar: force the scalar NCHW-order kernel.
template <typename T>
Plan pick(const Tensor& a, const Tensor& b, bool force_scalar,
          std::initializer_list<const Tensor*> more = {}) {
  return force_scalar ? Plan{false, 1} : plan_for<T>(a, b, more);
}

template <typename T, typename I>
void max_fwd(const Tensor& x, Tensor& out, Tensor& ind, const PoolGeom& g, const Plan& pl,
             bool flat, bool relu) {
  constexpr int VM = 16 / sizeof(T);
  for (int64_t n = 0; n < x.size(0); ++n)
    for (uint32_t u = 0; u < g.units; ++u) {
      if (pl.vec == VM)
        maxpool_fwd_one<T, VM, true, I>(x.data_ptr<T>(), out.data_ptr<T>(), ind.data_ptr<I>(), g,
                                        flat, relu, n, u);
      else
        maxpool_fwd_one<T, 1, false, I>(x.data_ptr<T>(), out.data_ptr<T>(), ind.data_ptr<I>(), g,
                                        flat, relu, n, u);
    }
}

template <typename T, typename I>
void max_bwd(const Tensor& gy, const Tensor& y, const Tensor& ind, Tensor& gx, const PoolGeom& g,
             const Plan& pl, bool flat, bool relu) {
  constexpr int VM = 16 / sizeof(T);
  for (int64_t n = 0; n < gx.size(0); ++n)
    for (uint32_t u = 0; u < g.units; ++u) {
      if (pl.vec == VM)
        maxpool_bwd_one<T, VM, true, I>(gy.data_ptr<T>(), y.data_ptr<T>(), ind.data_ptr<I>(),
                                        gx.data_ptr<T>(), g, flat, relu, n, u);
      else
        maxpool_bwd_one<T, 1, false, I>(gy.data_ptr<T>(), y.data_ptr<T>(), ind.data_ptr<I>(),
                                        gx.data_ptr<T>(), g, flat, relu, n, u);
    }
}

inline bool same(const Tensor& a, const Tensor& b, double tol, const std::string& what) {
  const Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  const double lim = tol;
  const bool nan = a.to(at::kDouble).isnan().any().item<bool>();
  const double worst = d.max().item<double>();
  if (nan || !(worst <= lim * (1 + b.to(at::kDouble).abs().max().item<double>()))) {
    printf("  %s: worst error %g%s\n", what.c_str(), worst, nan ? " (NaN present)" : "");
    return false;
  }
  return true;
}

struct MaxCase { int N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw; bool ceil; };
struct AvgCase { int N, C, H, W, kh, kw, sh, sw, ph, pw; bool ceil, cip; int div; };

// Results are rounded once to T (half an ulp) after float accumulation of a few terms.
template <typename T> double tol_of() {
  if (std::is_same<T, double>::value) return 1e-12;
  if (std::is_same<T, float>::value) return 1e-6;
  return std::is_same<T, c10::Half>::value ? 1.0 / 1024 : 1.0 / 128;
}

// Returns the number of failing checks.
template <typename T> int check_max(const MaxCase& c, bool cl, bool force_scalar) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  at::manual_seed(7);
  Tensor input = at::rand({c.N, c.C, c.H, c.W}, at::kDouble).mul(2).sub(1).to(st);
  if (cl) input = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t OH = pooled_size(c.H, c.kh, c.ph, c.sh, c.dh, c.ceil);
  const int64_t OW = pooled_size(c.W, c.kw, c.pw, c.sw, c.dw, c.ceil);
  const auto fmt = fmt_of(input);
  int bad = 0;
  for (int relu = 0; relu < 2; ++relu)
    for (int ret = 0; ret < 2; ++ret) {
      const Tensor x = input.contiguous(fmt);
      const auto idt = ret ? at::kLong : (c.kh * c.kw <= 127 ? at::kChar : at::kInt);
      Tensor out = at::full({c.N, c.C, OH, OW}, NAN, x.options()).contiguous(fmt);
      Tensor ind = at::full({c.N, c.C, OH, OW}, -99, x.options().dtype(idt)).contiguous(fmt);
      const Plan pl = pick<T>(x, out, force_scalar, {&ind});
      PoolGeom g = make_geom(x, out, false, pl);
      set_geom_pool(g, {c.kh, c.kw}, {c.sh, c.sw}, {c.ph, c.pw}, {c.dh, c.dw});
      if (idt == at::kLong) max_fwd<T, int64_t>(x, out, ind, g, pl, true, relu);
      else if (idt == at::kInt) max_fwd<T, int32_t>(x, out, ind, g, pl, false, relu);
      else max_fwd<T, int8_t>(x, out, ind, g, pl, false, relu);
      const Tensor xr = relu ? at::relu(x.to(at::kDouble)) : x.to(at::kDouble);
      auto [ref, ref_idx] = at::max_pool2d_with_indices(xr, {c.kh, c.kw}, {c.sh, c.sw},
                                                        {c.ph, c.pw}, {c.dh, c.dw}, c.ceil);
      const std::string tag = std::string(c10::toString(st)) + (relu ? " relu " : " ") +
                              (ret ? "flat" : "local");
      if (!same(out, ref, 0, "max fwd values " + tag)) ++bad;
      Tensor flat_idx = ind.to(at::kLong);
      if (!ret) {  // window-local -> flat
        Tensor hs = (at::arange(OH, at::kLong) * c.sh - c.ph).view({1, 1, OH, 1});
        Tensor ws = (at::arange(OW, at::kLong) * c.sw - c.pw).view({1, 1, 1, OW});
        flat_idx = (hs + flat_idx.div(c.kw, "floor") * c.dh) * c.W + ws +
                   flat_idx.remainder(c.kw) * c.dw;
      }
      if (!at::equal(flat_idx, ref_idx)) {
        printf("  max fwd indices %s differ\n", tag.c_str());
        ++bad;
      }
      // backward
      Tensor dy = at::rand({c.N, c.C, OH, OW}, at::kDouble).mul(2).sub(1).to(st).contiguous(fmt);
      Tensor gx = at::full({c.N, c.C, c.H, c.W}, NAN, x.options()).contiguous(fmt);
      const Tensor gyc = dy.contiguous(fmt);
      const Plan pb = pick<T>(gx, gyc, force_scalar, {&out, &ind});
      PoolGeom gb = make_geom(gx, gyc, true, pb);
      set_geom_pool(gb, {c.kh, c.kw}, {c.sh, c.sw}, {c.ph, c.pw}, {c.dh, c.dw});
      if (idt == at::kLong) max_bwd<T, int64_t>(gyc, out, ind, gx, gb, pb, true, relu);
      else if (idt == at::kInt) max_bwd<T, int32_t>(gyc, out, ind, gx, gb, pb, false, relu);
      else max_bwd<T, int8_t>(gyc, out, ind, gx, gb, pb, false, relu);
      Tensor gref = at::max_pool2d_with_indices_backward(dy.to(at::kDouble), xr, {c.kh, c.kw},
                                                         {c.sh, c.sw}, {c.ph, c.pw},
                                                         {c.dh, c.dw}, c.ceil, ref_idx);
      if (relu) gref = at::threshold_backward(gref, xr, 0);
      if (!same(gx, gref, tol_of<T>(), "max bwd " + tag)) ++bad;
      if (!gx.is_contiguous(fmt) || !out.is_contiguous(fmt) || !ind.is_contiguous(fmt)) {
        printf("  max %s: output layout differs from the input's\n", tag.c_str());
        ++bad;
      }
    }
  return bad;
}

template <typename T>
void avg_run(bool fwd, const Tensor& a, Tensor& b, const PoolGeom& g, const Plan& pl,
             const AvgArgs& aa) {
  constexpr int VM = 16 / sizeof(T);
  const int64_t N = a.size(0);
  for (int64_t n = 0; n < N; ++n)
    for (uint32_t u = 0; u < g.units; ++u) {
      if (fwd) {
        if (pl.vec == VM) avgpool_fwd_one<T, VM, true>(a.data_ptr<T>(), b.data_ptr<T>(), g, aa, n, u);
        else avgpool_fwd_one<T, 1, false>(a.data_ptr<T>(), b.data_ptr<T>(), g, aa, n, u);
      } else {
        if (pl.vec == VM) avgpool_bwd_one<T, VM, true>(a.data_ptr<T>(), b.data_ptr<T>(), g, aa, n, u);
        else avgpool_bwd_one<T, 1, false>(a.data_ptr<T>(), b.data_ptr<T>(), g, aa, n, u);
      }
    }
}

// adaptive: c.kh/c.kw are the output size
template <typename T> int check_avg(const AvgCase& c, bool adaptive, bool cl, bool force_scalar) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  at::manual_seed(11);
  Tensor x = at::rand({c.N, c.C, c.H, c.W}, at::kDouble).mul(2).sub(1).to(st);
  if (cl) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = fmt_of(x);
  x = x.contiguous(fmt);
  int64_t OH, OW;
  if (adaptive) { OH = c.kh; OW = c.kw; }
  else {
    OH = pooled_size(c.H, c.kh, c.ph, c.sh, 1, c.ceil);
    OW = pooled_size(c.W, c.kw, c.pw, c.sw, 1, c.ceil);
  }
  const AvgArgs aa = adaptive ? AvgArgs{false, 0, true} : AvgArgs{c.cip, c.div, false};
  Tensor out = at::full({c.N, c.C, OH, OW}, NAN, x.options()).contiguous(fmt);
  const Plan pl = pick<T>(x, out, force_scalar);
  PoolGeom g = make_geom(x, out, false, pl);
  if (adaptive) set_geom_pool(g, {1, 1}, {1, 1}, {0, 0}, {1, 1});
  else set_geom_pool(g, {c.kh, c.kw}, {c.sh, c.sw}, {c.ph, c.pw}, {1, 1});
  avg_run<T>(true, x, out, g, pl, aa);
  const Tensor xd = x.to(at::kDouble);
  std::optional<int64_t> dv;
  if (c.div) dv = c.div;
  const Tensor ref = adaptive ? at::adaptive_avg_pool2d(xd, {OH, OW})
                              : at::avg_pool2d(xd, {c.kh, c.kw}, {c.sh, c.sw}, {c.ph, c.pw},
                                               c.ceil, c.cip, dv);
  int bad = 0;
  const std::string nm = std::string(c10::toString(st)) + (adaptive ? " adaptive" : " avg");
  if (!same(out, ref, tol_of<T>(), nm + " fwd")) ++bad;
  Tensor dy = at::rand({c.N, c.C, OH, OW}, at::kDouble).mul(2).sub(1).to(st).contiguous(fmt);
  Tensor gx = at::full({c.N, c.C, c.H, c.W}, NAN, x.options()).contiguous(fmt);
  const Plan pb = pick<T>(gx, dy, force_scalar);
  PoolGeom gb = make_geom(gx, dy, true, pb);
  if (adaptive) set_geom_pool(gb, {1, 1}, {1, 1}, {0, 0}, {1, 1});
  else set_geom_pool(gb, {c.kh, c.kw}, {c.sh, c.sw}, {c.ph, c.pw}, {1, 1});
  avg_run<T>(false, dy, gx, gb, pb, aa);
  const Tensor dyd = dy.to(at::kDouble);
  const Tensor gref = adaptive ? at::_adaptive_avg_pool2d_backward(dyd, xd)
                               : at::avg_pool2d_backward(dyd, xd, {c.kh, c.kw}, {c.sh, c.sw},
                                                         {c.ph, c.pw}, c.ceil, c.cip, dv);
  if (!same(gx, gref, tol_of<T>(), nm + " bwd")) ++bad;
  return bad;
}

inline int run_all() {
  const MaxCase maxc[] = {
      {2, 16, 13, 13, 3, 3, 2, 2, 0, 0, 1, 1, false}, {2, 8, 8, 8, 2, 2, 2, 2, 0, 0, 1, 1, false},
      {2, 24, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1, false},   {2, 16, 14, 14, 3, 3, 2, 2, 1, 1, 1, 1, true},
      {1, 3, 12, 11, 3, 2, 2, 1, 1, 1, 2, 2, true},   {1, 32, 6, 6, 12, 12, 1, 1, 3, 3, 1, 1, false},
  };
  const AvgCase avgc[] = {
      {2, 16, 8, 8, 2, 2, 2, 2, 0, 0, false, true, 0}, {2, 8, 7, 9, 3, 3, 2, 2, 1, 1, true, false, 0},
      {2, 24, 7, 7, 3, 3, 1, 1, 1, 1, false, true, 0}, {1, 3, 10, 11, 3, 2, 2, 3, 1, 1, true, true, 5},
  };
  const AvgCase adac[] = {  // kh, kw = output size
      {2, 16, 7, 7, 1, 1, 0, 0, 0, 0, false, false, 0}, {2, 8, 7, 9, 3, 4, 0, 0, 0, 0, false, false, 0},
      {1, 24, 5, 5, 5, 5, 0, 0, 0, 0, false, false, 0}, {2, 3, 10, 6, 4, 5, 0, 0, 0, 0, false, false, 0},
  };
  int failed = 0;
  for (int cl = 0; cl < 2; ++cl)
    for (int sc = 0; sc < 2; ++sc) {
      int b = 0;
      for (const auto& c : maxc) b += check_max<float>(c, cl, sc) + check_max<c10::Half>(c, cl, sc) +
                                      check_max<double>(c, cl, sc) + check_max<c10::BFloat16>(c, cl, sc);
      for (const auto& c : avgc) b += check_avg<float>(c, false, cl, sc) + check_avg<c10::Half>(c, false, cl, sc) +
                                      check_avg<double>(c, false, cl, sc);
      for (const auto& c : adac) b += check_avg<float>(c, true, cl, sc) + check_avg<c10::BFloat16>(c, true, cl, sc);
      printf("pool emulation %s %s: %s\n", cl ? "channels_last" : "nchw", sc ? "scalar" : "vector",
             b ? "FAIL" : "ok");
      failed += b;
    }
  printf("%d failing checks\n", failed);
  return failed;
}

}  // namespace emu_pool
}  // namespace fastconv_cuda
