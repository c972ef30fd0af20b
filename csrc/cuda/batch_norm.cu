// Batch norm (+ fused residual add and ReLU) on CUDA: training and eval forward, backward.
//
// Training forward reads the input twice (statistics, then normalise): the mean must be known
// before any output can be written. Statistics are a two-level deterministic reduction: CTAs
// keep Welford states of disjoint slices (float32), one warp per channel merges them in a fixed
// order (Chan's formula) and also updates the running statistics. Backward is one reduction pass
// (sum of dy and of dy * (x - mean), dy masked by the saved output when relu) and one
// elementwise pass. NCHW and channels_last each have their own kernels; 16-byte vectors where the
// channel (channels_last) or plane (NCHW) size allows. The residual is read by the normalising
// pass; its gradient (dy masked by the saved output) is written by the grad_input pass.
#include "batch_norm_kernels.cuh"

#include <ATen/Dispatch.h>

namespace fastconv_cuda {
namespace {

using at::Tensor;
using namespace bnk;

// ---------------------------------------------------------------------------------------------
// Kernels: thin shells around the per-thread bodies of batch_norm_kernels.cuh
// ---------------------------------------------------------------------------------------------

template <typename T, int V, bool STATS>
__global__ void __launch_bounds__(NT) reduce_nchw_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, bool relu,
    const float* __restrict__ mean_in, int C, int64_t HW, FastDiv dHWv, uint32_t U, uint32_t per,
    float* __restrict__ part, int splits) {
  __shared__ float s0[NT], s1[NT], s2[NT];
  const int tid = threadIdx.x;
  float a, b, cc;
  reduce_nchw_thread<T, V, STATS>(x, dy, y, relu, mean_in, C, HW, dHWv, U, per, blockIdx.x,
                                  blockIdx.y, tid, a, b, cc);
  s0[tid] = a; s1[tid] = b; s2[tid] = cc;
  __syncthreads();
  for (int s = NT / 2; s > 0; s >>= 1) {
    tree_step<STATS>(s0, s1, s2, tid, s);
    __syncthreads();
  }
  if (tid == 0) write_partial<STATS>(part, splits, C, blockIdx.x, blockIdx.y, s0[0], s1[0], s2[0]);
}

template <typename T, int V, bool STATS>
__global__ void __launch_bounds__(NT) reduce_nhwc_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, bool relu,
    const float* __restrict__ mean_in, int64_t rows, int C, int Cv, int TPR, int64_t per,
    float* __restrict__ part, int splits) {
  __shared__ float sc[NT];
  __shared__ float s1[NT * V], s2[NT * V];
  const int tid = threadIdx.x;
  float cnt, a[V], b[V];
  reduce_nhwc_thread<T, V, STATS>(x, dy, y, relu, mean_in, rows, C, Cv, TPR, per, blockIdx.x,
                                  blockIdx.y, tid, cnt, a, b);
  sc[tid] = cnt;
#pragma unroll
  for (int e = 0; e < V; ++e) { s1[tid * V + e] = a[e]; s2[tid * V + e] = b[e]; }
  __syncthreads();
  reduce_nhwc_combine<V, STATS>(sc, s1, s2, tid, TPR, blockIdx.x, blockIdx.y, C, splits, part);
}

__global__ void stats_finalize_kernel(const float* __restrict__ part, int splits, int C,
                                      const float* __restrict__ w, const float* __restrict__ bias,
                                      float* __restrict__ rm, float* __restrict__ rv,
                                      float momentum, float eps, float* __restrict__ save_mean,
                                      float* __restrict__ save_invstd, float* __restrict__ coef) {
  const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (c >= C) return;  // whole warps
  float n, m, q;
  stats_lane(part, splits, C, c, lane, n, m, q);
  for (int off = 16; off > 0; off >>= 1) {  // fixed tree: deterministic
    const float n2 = __shfl_down_sync(0xffffffffu, n, off);
    const float m2 = __shfl_down_sync(0xffffffffu, m, off);
    const float q2 = __shfl_down_sync(0xffffffffu, q, off);
    merge(n, m, q, n2, m2, q2);
  }
  if (lane == 0)
    stats_write(c, C, n, m, q, w, bias, rm, rv, momentum, eps, save_mean, save_invstd, coef);
}

__global__ void eval_prep_kernel(const float* __restrict__ rm, const float* __restrict__ rv, int C,
                                 const float* __restrict__ w, const float* __restrict__ bias,
                                 float eps, float* __restrict__ save_mean,
                                 float* __restrict__ save_invstd, float* __restrict__ coef) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < C) eval_prep_one(c, rm, rv, C, w, bias, eps, save_mean, save_invstd, coef);
}

__global__ void grad_finalize_kernel(const float* __restrict__ part, int splits, int C,
                                     float count, bool training, const float* __restrict__ w,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ invstd, float* __restrict__ gw,
                                     float* __restrict__ gb, float* __restrict__ coef) {
  const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (c >= C) return;
  float s1, s2;
  grad_lane(part, splits, C, c, lane, s1, s2);
  for (int off = 16; off > 0; off >>= 1) {
    s1 += __shfl_down_sync(0xffffffffu, s1, off);
    s2 += __shfl_down_sync(0xffffffffu, s2, off);
  }
  if (lane == 0) grad_write(c, C, s1, s2, count, training, w, mean, invstd, gw, gb, coef);
}

template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(NT) apply_nhwc_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
    const T* __restrict__ res, T* __restrict__ out, T* __restrict__ gres,
    const float* __restrict__ coef, int64_t rows, int C, int Cv, int64_t row_step, bool relu,
    bool training) {
  apply_nhwc_thread<T, V, BWD>(x, dy, y, res, out, gres, coef, rows, C, Cv, row_step, relu,
                               training, int64_t(blockIdx.x) * NT + threadIdx.x);
}

template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(NT) apply_nchw_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
    const T* __restrict__ res, T* __restrict__ out, T* __restrict__ gres,
    const float* __restrict__ coef, int C, FastDiv dHWv, uint32_t upi, int64_t n0, int64_t sN,
    bool relu, bool training) {
  apply_nchw_thread<T, V, BWD>(x, dy, y, res, out, gres, coef, C, dHWv, upi, n0 + blockIdx.y,
                               sN, relu, training, blockIdx.x * NT + threadIdx.x);
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

// Partial sums over (rows or units) -> part [k][splits][C]; returns splits.
template <typename T, bool STATS>
int launch_reduce(const Tensor& x, const Tensor& dy, const Tensor& y, bool relu,
                  const float* mean, const Layout& L, Tensor& part) {
  const int C = int(x.size(1));
  const int nk = STATS ? 3 : 2;
  const int sms = num_sms();
  constexpr int VM = 16 / sizeof(T);
  const T* xp = x.data_ptr<T>();
  const T* dp = dy.defined() ? dy.data_ptr<T>() : nullptr;
  const T* yp = y.defined() ? y.data_ptr<T>() : nullptr;
  const ReducePlan p = plan_reduce(L, x.size(0), C, sms);
  part = at::empty({nk * p.splits * C}, x.options().dtype(at::kFloat));
  const dim3 grid = dim3(unsigned(p.gx), unsigned(p.splits));
  if (L.cl) {
    const int Cv = C / L.V;
    if (L.V == VM)
      reduce_nhwc_kernel<T, VM, STATS><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, relu, mean, L.rows, C, Cv, p.TPR, p.per, part.data_ptr<float>(), int(p.splits));
    else
      reduce_nhwc_kernel<T, 1, STATS><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, relu, mean, L.rows, C, Cv, p.TPR, p.per, part.data_ptr<float>(), int(p.splits));
  } else {
    const FastDiv dHWv(L.HW / L.V);
    if (L.V == VM)
      reduce_nchw_kernel<T, VM, STATS><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, relu, mean, C, L.HW, dHWv, uint32_t(p.U), uint32_t(p.per),
          part.data_ptr<float>(), int(p.splits));
    else
      reduce_nchw_kernel<T, 1, STATS><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, relu, mean, C, L.HW, dHWv, uint32_t(p.U), uint32_t(p.per),
          part.data_ptr<float>(), int(p.splits));
  }
  FC_LAUNCH_CHECK();
  return int(p.splits);
}

// res: the forward's residual; gres: the backward's residual gradient; out (backward) may be
// undefined when only gres is asked for. Undefined tensors are null pointers to the kernels.
template <typename T, bool BWD>
void launch_apply(const Tensor& x, const Tensor& dy, const Tensor& y, const Tensor& res,
                  const Tensor& out, const Tensor& gres, const Tensor& coef, const Layout& L,
                  bool relu, bool training) {
  const int C = int(x.size(1));
  constexpr int VM = 16 / sizeof(T);
  const T* xp = x.data_ptr<T>();
  const T* dp = dy.defined() ? dy.data_ptr<T>() : nullptr;
  const T* yp = y.defined() ? y.data_ptr<T>() : nullptr;
  const T* rp = res.defined() ? res.data_ptr<T>() : nullptr;
  T* op = out.defined() ? out.data_ptr<T>() : nullptr;
  T* gp = gres.defined() ? gres.data_ptr<T>() : nullptr;
  const float* kp = coef.data_ptr<float>();
  if (L.cl) {
    const int Cv = C / L.V;
    const ApplyPlan p = plan_apply_nhwc(L.rows, Cv, num_sms());
    if (L.V == VM)
      apply_nhwc_kernel<T, VM, BWD><<<unsigned(p.blocks), NT, 0, stream()>>>(
          xp, dp, yp, rp, op, gp, kp, L.rows, C, Cv, p.row_step, relu, training);
    else
      apply_nhwc_kernel<T, 1, BWD><<<unsigned(p.blocks), NT, 0, stream()>>>(
          xp, dp, yp, rp, op, gp, kp, L.rows, C, Cv, p.row_step, relu, training);
    FC_LAUNCH_CHECK();
    return;
  }
  const int64_t HWv = L.HW / L.V;
  const int64_t upi = C * HWv;
  TORCH_CHECK(upi < (int64_t(1) << 31), "fastconv (CUDA): batch_norm image too large");
  const int64_t N = x.size(0), sN = int64_t(C) * L.HW;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxGridY) {
    const dim3 grid(unsigned(ceil_div(upi, NT)), unsigned(std::min<int64_t>(kMaxGridY, N - n0)));
    if (L.V == VM)
      apply_nchw_kernel<T, VM, BWD><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, rp, op, gp, kp, C, FastDiv(HWv), uint32_t(upi), n0, sN, relu, training);
    else
      apply_nchw_kernel<T, 1, BWD><<<grid, NT, 0, stream()>>>(
          xp, dp, yp, rp, op, gp, kp, C, FastDiv(HWv), uint32_t(upi), n0, sN, relu, training);
    FC_LAUNCH_CHECK();
  }
}

void check_param(const std::optional<Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_cuda(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "fastconv (CUDA): ", name, " of shape ",
              t->sizes(), " does not match ", C, " channels");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastconv (CUDA): ", name,
              " must be floating point, got ", t->scalar_type());
}

Tensor as_f32(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->to(at::kFloat).contiguous();
}

void check_bn_input(const Tensor& input) {
  check_cuda(input, "input");
  check_4d(input, "input");
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "fastconv (CUDA): batch_norm supports float32, float16 and bfloat16 input, got ", st);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_cuda(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double momentum, double eps, bool relu,
    const std::optional<Tensor>& residual) {
  check_bn_input(input);
  const int64_t C = input.size(1);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_cuda(*residual, "residual");
    TORCH_CHECK(residual->sizes() == input.sizes() &&
                    residual->scalar_type() == input.scalar_type(),
                "fastconv (CUDA): residual ", residual->sizes(), " ", residual->scalar_type(),
                " does not match input ", input.sizes(), " ", input.scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "fastconv (CUDA): residual on ",
                residual->device(), ", input on ", input.device());
  }
  check_param(weight, C, "weight");
  check_param(bias, C, "bias");
  check_param(running_mean, C, "running_mean");
  check_param(running_var, C, "running_var");
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = out_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor res = has_res ? residual->contiguous(fmt) : Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)));
  Tensor save_mean = poisoned(at::empty({C}, f32)), save_invstd = poisoned(at::empty({C}, f32));
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  const Tensor w = as_f32(weight), b = as_f32(bias);
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  Tensor coef = at::empty({3 * C}, f32);
  if (training) {
    TORCH_CHECK(count > 1, "fastconv (CUDA): expected more than 1 value per channel when training, "
                "got input of shape ", x.sizes());
    // running stats are updated in float32; other dtypes go through a float copy
    Tensor rm, rv;
    if (has_rm) rm = (running_mean->scalar_type() == at::kFloat && running_mean->is_contiguous())
                         ? *running_mean : running_mean->to(at::kFloat).contiguous();
    if (has_rv) rv = (running_var->scalar_type() == at::kFloat && running_var->is_contiguous())
                         ? *running_var : running_var->to(at::kFloat).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm", [&] {
      using T = scalar_t;
      if constexpr (!std::is_same<T, double>::value) {
        const Layout L = layout_of<T>(x, {});
        Tensor part;
        const int sp = launch_reduce<T, true>(x, Tensor(), Tensor(), false, nullptr, L, part);
        stats_finalize_kernel<<<unsigned(ceil_div(C, 8)), 256, 0, stream()>>>(
            part.data_ptr<float>(), sp, int(C), wp, bp, has_rm ? rm.data_ptr<float>() : nullptr,
            has_rv ? rv.data_ptr<float>() : nullptr, float(momentum), float(eps),
            save_mean.data_ptr<float>(), save_invstd.data_ptr<float>(), coef.data_ptr<float>());
        FC_LAUNCH_CHECK();
        launch_apply<T, false>(x, Tensor(), Tensor(), res, out, Tensor(), coef,
                               layout_of<T>(x, {&out, &res}), relu, true);
      }
    });
    if (has_rm && !rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (has_rv && !rv.is_same(*running_var)) running_var->copy_(rv);
  } else {
    TORCH_CHECK(has_rm && has_rv,
                "fastconv (CUDA): batch_norm in eval mode needs running_mean and running_var");
    const Tensor rm = running_mean->to(at::kFloat).contiguous();
    const Tensor rv = running_var->to(at::kFloat).contiguous();
    if (C > 0) {
      eval_prep_kernel<<<unsigned(ceil_div(C, 256)), 256, 0, stream()>>>(
          rm.data_ptr<float>(), rv.data_ptr<float>(), int(C), wp, bp, float(eps),
          save_mean.data_ptr<float>(), save_invstd.data_ptr<float>(), coef.data_ptr<float>());
      FC_LAUNCH_CHECK();
    }
    if (x.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm", [&] {
        using T = scalar_t;
        if constexpr (!std::is_same<T, double>::value)
          launch_apply<T, false>(x, Tensor(), Tensor(), res, out, Tensor(), coef,
                                 layout_of<T>(x, {&out, &res}), relu, false);
      });
    }
  }
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& output,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd,
    bool training, bool relu, std::array<bool, 4> output_mask) {
  check_bn_input(input);
  check_cuda(grad_output, "grad_output");
  const int64_t C = input.size(1);
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              "fastconv (CUDA): grad_output ", grad_output.sizes(), " ", grad_output.scalar_type(),
              " does not match input ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(!relu || (output.sizes() == input.sizes() && output.scalar_type() == input.scalar_type()),
              "fastconv (CUDA): output of shape ", output.sizes(), " does not match input ",
              input.sizes());
  check_param(weight, C, "weight");
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C,
              "fastconv (CUDA): save_mean/save_invstd must have ", C, " elements, got ",
              save_mean.sizes(), " and ", save_invstd.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = out_format(input);
  const Tensor x = input.contiguous(fmt);
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor y = relu ? output.contiguous(fmt) : Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor w = as_f32(weight);
  const Tensor mean = save_mean.to(at::kFloat).contiguous();
  const Tensor invstd = save_invstd.to(at::kFloat).contiguous();
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && training);
  Tensor gw = at::zeros({C}, f32), gb = at::zeros({C}, f32);
  Tensor coef = at::empty({4 * C}, f32);
  Tensor grad_input = output_mask[0] ? poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)))
                                     : at::empty({0}, x.options());
  Tensor grad_residual = output_mask[3]
                             ? poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)))
                             : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    using T = scalar_t;
    if constexpr (!std::is_same<T, double>::value) {
      Tensor part;
      int sp = 0;
      if (need_sums && count > 0)
        sp = launch_reduce<T, false>(x, dy, y, relu, mean.data_ptr<float>(),
                                     layout_of<T>(x, {&dy}), part);
      if (C > 0) {
        grad_finalize_kernel<<<unsigned(ceil_div(C, 8)), 256, 0, stream()>>>(
            sp ? part.data_ptr<float>() : nullptr, sp, int(C), float(std::max<int64_t>(count, 1)),
            training, w.defined() ? w.data_ptr<float>() : nullptr, mean.data_ptr<float>(),
            invstd.data_ptr<float>(), gw.data_ptr<float>(), gb.data_ptr<float>(),
            coef.data_ptr<float>());
        FC_LAUNCH_CHECK();
      }
      if ((output_mask[0] || output_mask[3]) && x.numel() > 0) {
        // one pass writes grad_input and the residual's gradient, whichever are asked for
        const Tensor gi = output_mask[0] ? grad_input : Tensor();
        const Tensor gr = output_mask[3] ? grad_residual : Tensor();
        const Layout L = layout_of<T>(x, {&dy, &y, &gi, &gr});
        launch_apply<T, true>(x, dy, y, Tensor(), gi, gr, coef, L, relu, training);
      }
    }
  });
  const auto pdt = (weight.has_value() && weight->defined()) ? weight->scalar_type() : x.scalar_type();
  Tensor grad_weight = output_mask[1] ? gw.to(pdt) : at::empty({0}, x.options());
  Tensor grad_bias = output_mask[2] ? gb.to(pdt) : at::empty({0}, x.options());
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace
}  // namespace fastconv_cuda

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("batch_norm", &fastconv_cuda::batch_norm_cuda);
  m.impl("batch_norm_backward", &fastconv_cuda::batch_norm_backward_cuda);
}
