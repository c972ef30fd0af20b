// avg_pool2d and adaptive_avg_pool2d on CUDA, forward and backward (one kernel pair: only the
// windows differ).
//
// One thread per output (forward) or input (backward) element, or per 16-byte vector of
// channels when the tensor is channels_last with C a multiple of the vector width. grid.y is the
// image, so within-image indices fit 32 bits and are split with multiply-high dividers; image
// offsets are 64-bit. Backward passes are gathers over the windows that cover each input
// element, summed in a fixed order: deterministic, no atomics.
#include "avg_pool2d_kernels.cuh"

#include <ATen/Dispatch.h>

namespace fastconv_cuda {
namespace {

using at::Tensor;
using namespace poolk;

template <typename T, int V, bool CL>
__global__ void avgpool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const PoolGeom g,
                                   const AvgArgs aa, int64_t n0) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u < g.units) avgpool_fwd_one<T, V, CL>(x, y, g, aa, n0 + blockIdx.y, u);
}

template <typename T, int V, bool CL>
__global__ void avgpool_bwd_kernel(const T* __restrict__ gy, T* __restrict__ gx, const PoolGeom g,
                                   const AvgArgs aa, int64_t n0) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u < g.units) avgpool_bwd_one<T, V, CL>(gy, gx, g, aa, n0 + blockIdx.y, u);
}

// ---- host ----

Tensor avg_fwd(const Tensor& input, int64_t OH, int64_t OW, const AvgArgs& aa,
               at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = out_format(input);
  const Tensor x = input.contiguous(fmt);
  Tensor out = poisoned(at::empty({x.size(0), x.size(1), OH, OW}, x.options().memory_format(fmt)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool2d", [&] {
    using T = scalar_t;
    const Plan pl = plan_for<T>(x, out);
    PoolGeom g = make_geom(x, out, false, pl);
    set_geom_pool(g, k, s, p, at::IntArrayRef({1, 1}));
    over_batch_planned<T>(pl, x.size(0), g.units, [&](auto v, dim3 grid, int64_t n0) {
      constexpr int V = decltype(v)::value;
      avgpool_fwd_kernel<T, V, V != 1><<<grid, 256, 0, stream()>>>(x.data_ptr<T>(),
                                                                   out.data_ptr<T>(), g, aa, n0);
    });
  });
  return out;
}

Tensor avg_bwd(const Tensor& grad_output, at::IntArrayRef input_size, const AvgArgs& aa,
               at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  const auto fmt = out_format(grad_output);
  const Tensor gy = grad_output.contiguous(fmt);
  Tensor gx = poisoned(at::empty(input_size, gy.options().memory_format(fmt)));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "avg_pool2d_backward", [&] {
    using T = scalar_t;
    const Plan pl = plan_for<T>(gx, gy);
    PoolGeom g = make_geom(gx, gy, true, pl);
    set_geom_pool(g, k, s, p, at::IntArrayRef({1, 1}));
    over_batch_planned<T>(pl, gx.size(0), g.units, [&](auto v, dim3 grid, int64_t n0) {
      constexpr int V = decltype(v)::value;
      avgpool_bwd_kernel<T, V, V != 1><<<grid, 256, 0, stream()>>>(gy.data_ptr<T>(),
                                                                   gx.data_ptr<T>(), g, aa, n0);
    });
  });
  return gx;
}

Tensor avg_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                       std::optional<int64_t> divisor_override) {
  check_pool_input(input, kernel_size, stride, padding, at::IntArrayRef({1, 1}));
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0,
              "fastconv (CUDA): divisor_override must be non-zero");
  const int64_t OH = pooled_size(input.size(2), kernel_size[0], padding[0], stride[0], 1, ceil_mode);
  const int64_t OW = pooled_size(input.size(3), kernel_size[1], padding[1], stride[1], 1, ceil_mode);
  TORCH_CHECK(OH > 0 && OW > 0, "fastconv (CUDA): avg_pool2d output of input ", input.sizes(),
              " would be empty (", OH, "x", OW, ")");
  const AvgArgs aa{count_include_pad, int(divisor_override.value_or(0)), false};
  return avg_fwd(input, OH, OW, aa, kernel_size, stride, padding);
}

Tensor avg_pool2d_backward_cuda(const Tensor& grad_output, at::IntArrayRef input_size,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                std::optional<int64_t> divisor_override) {
  check_pool_backward(grad_output, input_size, kernel_size, stride, padding,
                      at::IntArrayRef({1, 1}), ceil_mode);
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0,
              "fastconv (CUDA): divisor_override must be non-zero");
  const AvgArgs aa{count_include_pad, int(divisor_override.value_or(0)), false};
  return avg_bwd(grad_output, input_size, aa, kernel_size, stride, padding);
}

Tensor adaptive_avg_pool2d_cuda(const Tensor& input, at::IntArrayRef output_size) {
  check_cuda(input, "input");
  check_4d(input, "input");
  check_float(input, "input");
  check_pair(output_size, "output_size", 1);
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, "fastconv (CUDA): adaptive_avg_pool2d input ",
              input.sizes(), " has an empty spatial dimension");
  const AvgArgs aa{false, 0, true};
  return avg_fwd(input, output_size[0], output_size[1], aa, at::IntArrayRef({1, 1}),
                 at::IntArrayRef({1, 1}), at::IntArrayRef({0, 0}));
}

Tensor adaptive_avg_pool2d_backward_cuda(const Tensor& grad_output, at::IntArrayRef input_size) {
  check_cuda(grad_output, "grad_output");
  check_4d(grad_output, "grad_output");
  check_float(grad_output, "grad_output");
  TORCH_CHECK(input_size.size() == 4 && grad_output.size(0) == input_size[0] &&
                  grad_output.size(1) == input_size[1],
              "fastconv (CUDA): grad_output of shape ", grad_output.sizes(),
              " does not match input_size ", input_size);
  const AvgArgs aa{false, 0, true};
  return avg_bwd(grad_output, input_size, aa, at::IntArrayRef({1, 1}), at::IntArrayRef({1, 1}),
                 at::IntArrayRef({0, 0}));
}

}  // namespace
}  // namespace fastconv_cuda

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("avg_pool2d", &fastconv_cuda::avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &fastconv_cuda::avg_pool2d_backward_cuda);
  m.impl("adaptive_avg_pool2d", &fastconv_cuda::adaptive_avg_pool2d_cuda);
  m.impl("adaptive_avg_pool2d_backward", &fastconv_cuda::adaptive_avg_pool2d_backward_cuda);
}
