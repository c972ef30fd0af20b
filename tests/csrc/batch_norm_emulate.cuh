// CPU emulation of the batch-norm kernels (batch_norm.cu) against ATen's CPU batch norm.
//
// Runs the per-thread bodies of batch_norm_kernels.cuh CTA by CTA (the shared-memory tree and the
// warp shuffle tree in the kernels' order), planned by the same plan_reduce / plan_apply_nhwc
// as the launchers, for several SM counts. Outputs start as NaN so that an element no thread
// writes fails. Not part of the extension: tests/test_extension_cuda.py compiles it as a host
// program with libtorch_cpu as reference.
#pragma once

#include "batch_norm_kernels.cuh"

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <vector>

namespace fastconv_cuda {
namespace emu_bn {

using namespace bnk;
using at::Tensor;

template <typename T, int V, bool STATS>
void reduce(const Layout& L, const ReducePlan& p, const T* x, const T* dy, const T* y, bool relu,
            const float* mean, int C, float* part) {
  std::vector<float> s0(NT), s1(NT * V), s2(NT * V);
  for (int64_t bx = 0; bx < p.gx; ++bx)
    for (int64_t by = 0; by < p.splits; ++by) {
      if (L.cl) {
        for (int t = 0; t < NT; ++t) {
          float cnt, a[V], b[V];
          reduce_nhwc_thread<T, V, STATS>(x, dy, y, relu, mean, L.rows, C, C / L.V, p.TPR, p.per,
                                          int(bx), int(by), t, cnt, a, b);
          s0[t] = cnt;
          for (int e = 0; e < V; ++e) { s1[t * V + e] = a[e]; s2[t * V + e] = b[e]; }
        }
        for (int t = 0; t < NT; ++t)
          reduce_nhwc_combine<V, STATS>(s0.data(), s1.data(), s2.data(), t, p.TPR, int(bx),
                                        int(by), C, int(p.splits), part);
      } else {
        const FastDiv dHWv(L.HW / L.V);
        for (int t = 0; t < NT; ++t)
          reduce_nchw_thread<T, V, STATS>(x, dy, y, relu, mean, C, L.HW, dHWv, uint32_t(p.U),
                                          uint32_t(p.per), int(bx), int(by), t, s0[t], s1[t],
                                          s2[t]);
        for (int s = NT / 2; s > 0; s >>= 1)
          for (int t = 0; t < NT; ++t) tree_step<STATS>(s0.data(), s1.data(), s2.data(), t, s);
        write_partial<STATS>(part, int(p.splits), C, int(bx), int(by), s0[0], s1[0], s2[0]);
      }
    }
}

// __shfl_down_sync tree over 32 lanes: lane l takes lane l + off (its own value past 31).
template <typename F> void shfl_tree(float (&a)[32], float (&b)[32], float (&c)[32], F merge_fn) {
  for (int off = 16; off > 0; off >>= 1) {
    float a0[32], b0[32], c0[32];
    std::copy(a, a + 32, a0); std::copy(b, b + 32, b0); std::copy(c, c + 32, c0);
    for (int l = 0; l < 32; ++l) {
      const int src = l + off < 32 ? l + off : l;
      merge_fn(a[l], b[l], c[l], a0[src], b0[src], c0[src]);
    }
  }
}

template <typename T, int V, bool BWD>
void apply(const Layout& L, const T* x, const T* dy, const T* y, const T* res, T* out, T* gres,
           const float* coef, int64_t N, int C, bool relu, bool training, int sms) {
  if (L.cl) {
    const int Cv = C / L.V;
    const ApplyPlan p = plan_apply_nhwc(L.rows, Cv, sms);
    for (int64_t gt = 0; gt < p.blocks * NT; ++gt)
      apply_nhwc_thread<T, V, BWD>(x, dy, y, res, out, gres, coef, L.rows, C, Cv, p.row_step, relu,
                                   training, gt);
  } else {
    const int64_t HWv = L.HW / L.V;
    const FastDiv d(HWv);
    const uint32_t upi = uint32_t(C * HWv);
    const uint32_t blocks = uint32_t(ceil_div(upi, NT));
    for (int64_t n = 0; n < N; ++n)
      for (uint32_t u = 0; u < blocks * NT; ++u)
        apply_nchw_thread<T, V, BWD>(x, dy, y, res, out, gres, coef, C, d, upi, n,
                                     int64_t(C) * L.HW, relu, training, u);
  }
}

inline bool close(const Tensor& got, const Tensor& ref, double tol, const std::string& what) {
  const Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  const bool nan = g.isnan().any().item<bool>();
  const Tensor bound = (r.abs() + 1) * tol;
  const bool ok = !nan && ((g - r).abs() <= bound).all().item<bool>();
  if (!ok)
    printf("  %s: max error %g%s\n", what.c_str(), (g - r).abs().max().item<double>(),
           nan ? " (NaN present)" : "");
  return ok;
}

template <typename T> double tol_of() {
  if (std::is_same<T, float>::value) return 1e-5;
  return std::is_same<T, c10::Half>::value ? 2.0 / 1024 : 2.0 / 128;
}

// residual: out = relu?(bn(x) + r), and the backward pass also writes r's gradient.
template <typename T, int VM>
int check(std::vector<int64_t> shape, bool cl, bool training, bool relu, bool affine, int sms,
          bool force_scalar, bool residual) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  at::manual_seed(3);
  const int64_t N = shape[0], C = shape[1];
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Tensor x = (at::rand(shape, at::kDouble) * 5 - 2).to(st).contiguous(fmt);
  // around zero after the add, so the ReLU cuts about half of it
  const Tensor res = residual ? (at::rand(shape, at::kDouble) * 3 - 1.5).to(st).contiguous(fmt)
                              : Tensor();
  const T* rp = residual ? res.data_ptr<T>() : nullptr;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor w = affine ? at::rand({C}, f32) + 0.5 : Tensor();
  const Tensor b = affine ? at::rand({C}, f32) - 0.5 : Tensor();
  const Tensor rm0 = at::rand({C}, f32) - 0.5, rv0 = at::rand({C}, f32) + 0.5;
  Tensor rm = rm0.clone(), rv = rv0.clone();
  const float momentum = 0.1f, eps = 1e-5f;
  Tensor out = at::full(shape, NAN, x.options()).contiguous(fmt);
  Tensor smean = at::full({C}, NAN, f32), sinv = at::full({C}, NAN, f32);
  Tensor coef = at::full({3 * C}, NAN, f32);
  const float* wp = affine ? w.data_ptr<float>() : nullptr;
  const float* bp = affine ? b.data_ptr<float>() : nullptr;
  auto layout = [&](const Tensor& t, std::initializer_list<const Tensor*> o) {
    Layout L = layout_of<T>(t, o);
    if (force_scalar) L.V = 1;
    return L;
  };
  const T* xp = x.data_ptr<T>();
  if (training) {
    const Layout L = layout(x, {});
    const ReducePlan p = plan_reduce(L, N, int(C), sms);
    Tensor part = at::full({3 * p.splits * C}, NAN, f32);
    if (L.V == VM) reduce<T, VM, true>(L, p, xp, nullptr, nullptr, false, nullptr, int(C), part.data_ptr<float>());
    else reduce<T, 1, true>(L, p, xp, nullptr, nullptr, false, nullptr, int(C), part.data_ptr<float>());
    for (int c = 0; c < C; ++c) {
      float n[32], m[32], q[32];
      for (int l = 0; l < 32; ++l) stats_lane(part.data_ptr<float>(), int(p.splits), int(C), c, l, n[l], m[l], q[l]);
      shfl_tree(n, m, q, [](float& a, float& bb, float& cc, float a2, float b2, float c2) { merge(a, bb, cc, a2, b2, c2); });
      stats_write(c, int(C), n[0], m[0], q[0], wp, bp, rm.data_ptr<float>(), rv.data_ptr<float>(),
                  momentum, eps, smean.data_ptr<float>(), sinv.data_ptr<float>(), coef.data_ptr<float>());
    }
  } else {
    for (int c = 0; c < C; ++c)
      eval_prep_one(c, rm.data_ptr<float>(), rv.data_ptr<float>(), int(C), wp, bp, eps,
                    smean.data_ptr<float>(), sinv.data_ptr<float>(), coef.data_ptr<float>());
  }
  const Layout La = layout(x, {&out, &res});
  if (La.V == VM) apply<T, VM, false>(La, xp, nullptr, nullptr, rp, out.data_ptr<T>(), nullptr, coef.data_ptr<float>(), N, int(C), relu, training, sms);
  else apply<T, 1, false>(La, xp, nullptr, nullptr, rp, out.data_ptr<T>(), nullptr, coef.data_ptr<float>(), N, int(C), relu, training, sms);

  // reference
  const Tensor xd = x.to(at::kDouble);
  const Tensor wd = affine ? w.to(at::kDouble) : at::ones({C}, at::kDouble);
  const Tensor bd = affine ? b.to(at::kDouble) : at::zeros({C}, at::kDouble);
  Tensor rmd = rm0.to(at::kDouble), rvd = rv0.to(at::kDouble);
  auto [ref, rs_mean, rs_inv] = at::native_batch_norm(xd, wd, bd, rmd, rvd, training, momentum, eps);
  if (residual) ref = ref + res.to(at::kDouble);
  if (relu) ref = at::relu(ref);
  const std::string tag = std::string(c10::toString(st)) + (cl ? " cl" : " nchw") +
                          (training ? " train" : " eval") + (relu ? " relu" : "") +
                          (force_scalar ? " scalar" : "") + (residual ? " residual" : "");
  int bad = 0;
  bad += !close(out, ref, tol_of<T>(), "bn out " + tag);
  if (training) {
    bad += !close(smean, rs_mean, 1e-5, "save_mean " + tag);
    bad += !close(sinv, rs_inv, 1e-5, "save_invstd " + tag);
    bad += !close(rm, rmd, 1e-5, "running_mean " + tag);
    bad += !close(rv, rvd, 1e-5, "running_var " + tag);
  } else {
    bad += !close(smean, rm0, 0, "eval save_mean " + tag);
    bad += !close(sinv, (rv0.to(at::kDouble) + eps).rsqrt(), 1e-6, "eval save_invstd " + tag);
  }
  if (!out.is_contiguous(fmt)) ++bad;

  // backward
  const Tensor dy = (at::rand(shape, at::kDouble) * 2 - 1).to(st).contiguous(fmt);
  const Tensor yy = out;
  Tensor gi = at::full(shape, NAN, x.options()).contiguous(fmt);
  Tensor gr = at::full(shape, NAN, x.options()).contiguous(fmt);
  Tensor gr_only = at::full(shape, NAN, x.options()).contiguous(fmt);
  T* grp = residual ? gr.data_ptr<T>() : nullptr;
  Tensor gw = at::zeros({C}, f32), gb = at::zeros({C}, f32), bcoef = at::full({4 * C}, NAN, f32);
  const int64_t count = N * shape[2] * shape[3];
  {
    const Layout L = layout(x, {&dy});
    const ReducePlan p = plan_reduce(L, N, int(C), sms);
    Tensor part = at::full({2 * p.splits * C}, NAN, f32);
    if (L.V == VM) reduce<T, VM, false>(L, p, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), relu, smean.data_ptr<float>(), int(C), part.data_ptr<float>());
    else reduce<T, 1, false>(L, p, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), relu, smean.data_ptr<float>(), int(C), part.data_ptr<float>());
    for (int c = 0; c < C; ++c) {
      float s1[32], s2[32], z[32] = {};
      for (int l = 0; l < 32; ++l) grad_lane(part.data_ptr<float>(), int(p.splits), int(C), c, l, s1[l], s2[l]);
      shfl_tree(s1, s2, z, [](float& a, float& bb, float&, float a2, float b2, float) { a += a2; bb += b2; });
      grad_write(c, int(C), s1[0], s2[0], float(count), training, wp, smean.data_ptr<float>(),
                 sinv.data_ptr<float>(), gw.data_ptr<float>(), gb.data_ptr<float>(), bcoef.data_ptr<float>());
    }
    const Layout La2 = layout(x, {&dy, &yy, &gi, &gr});
    if (La2.V == VM) apply<T, VM, true>(La2, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), nullptr, gi.data_ptr<T>(), grp, bcoef.data_ptr<float>(), N, int(C), relu, training, sms);
    else apply<T, 1, true>(La2, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), nullptr, gi.data_ptr<T>(), grp, bcoef.data_ptr<float>(), N, int(C), relu, training, sms);
    if (residual) {  // the residual's gradient alone (grad_input not asked for): out is null
      if (La2.V == VM) apply<T, VM, true>(La2, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), nullptr, nullptr, gr_only.data_ptr<T>(), bcoef.data_ptr<float>(), N, int(C), relu, training, sms);
      else apply<T, 1, true>(La2, xp, dy.data_ptr<T>(), yy.data_ptr<T>(), nullptr, nullptr, gr_only.data_ptr<T>(), bcoef.data_ptr<float>(), N, int(C), relu, training, sms);
    }
  }
  Tensor dym = dy.to(at::kDouble);
  if (relu) dym = dym * (yy.to(at::kDouble) <= 0).logical_not().to(at::kDouble);
  auto [rgi, rgw, rgb] = at::native_batch_norm_backward(
      dym, xd, wd, rm0.to(at::kDouble), rv0.to(at::kDouble), smean.to(at::kDouble),
      sinv.to(at::kDouble), training, eps, {true, true, true});
  const double gscale = std::max(1.0, rgi.abs().max().item<double>());
  bad += !close(gi / gscale, rgi / gscale, tol_of<T>() * 4, "bn grad_input " + tag);
  const double wscale = std::max(1.0, rgw.abs().max().item<double>());
  bad += !close(gw / wscale, rgw / wscale, 1e-5, "bn grad_weight " + tag);
  const double bscale = std::max(1.0, rgb.abs().max().item<double>());
  bad += !close(gb / bscale, rgb / bscale, 1e-5, "bn grad_bias " + tag);
  if (residual) {  // dy masked by the kernel's own output: exact
    bad += !close(gr, dym, 0, "bn grad_residual " + tag);
    bad += !close(gr_only, dym, 0, "bn grad_residual alone " + tag);
  }
  return bad;
}

inline int run_all() {
  const std::vector<std::vector<int64_t>> shapes = {
      {4, 16, 5, 7}, {2, 64, 8, 8}, {3, 3, 13, 11}, {8, 32, 1, 1}, {2, 40, 4, 4}, {2, 520, 3, 3}};
  int failed = 0;
  for (const auto& s : shapes)
    for (int cl = 0; cl < 2; ++cl)
      for (int tr = 0; tr < 2; ++tr)
        for (int relu = 0; relu < 2; ++relu)
          for (int sms : {132, 3}) {
            const bool affine = (relu + tr + sms) % 2 == 0;
            // every (layout, training, relu) runs with a residual at one of the two SM counts
            const bool res = (cl + tr + relu + (sms == 3)) % 2 == 1;
            for (int sc = 0; sc < 2; ++sc) {
              failed += check<float, 4>(s, cl, tr, relu, affine, sms, sc, res);
              failed += check<c10::Half, 8>(s, cl, tr, relu, affine, sms, sc, res);
              failed += check<c10::BFloat16, 8>(s, cl, tr, relu, affine, sms, sc, res);
            }
          }
  printf("%d failing checks\n", failed);
  return failed;
}

}  // namespace emu_bn
}  // namespace fastconv_cuda
