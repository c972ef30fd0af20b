// max_pool2d on CUDA (fused ReLU, compact window-local indices), forward and backward.
//
// One thread per output (forward) or input (backward) element, or per 16-byte vector of
// channels when the tensor is channels_last with C a multiple of the vector width. grid.y is the
// image, so within-image indices fit 32 bits and are split with multiply-high dividers; image
// offsets are 64-bit. Backward passes are gathers over the windows that cover each input
// element, summed in a fixed order: deterministic, no atomics.
#include "max_pool2d_kernels.cuh"

#include <ATen/Dispatch.h>

namespace fastconv_cuda {
namespace {

using at::Tensor;
using namespace poolk;

template <typename T, int V, bool CL, typename I>
__global__ void maxpool_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, I* __restrict__ ind,
                                   const PoolGeom g, bool flat, bool relu, int64_t n0) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u < g.units) maxpool_fwd_one<T, V, CL, I>(x, y, ind, g, flat, relu, n0 + blockIdx.y, u);
}

template <typename T, int V, bool CL, typename I>
__global__ void maxpool_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ y,
                                   const I* __restrict__ ind, T* __restrict__ gx, const PoolGeom g,
                                   bool flat, bool relu, int64_t n0) {
  const uint32_t u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u < g.units) maxpool_bwd_one<T, V, CL, I>(gy, y, ind, gx, g, flat, relu, n0 + blockIdx.y, u);
}

// ---- host ----

std::tuple<Tensor, Tensor> max_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, bool ceil_mode,
                                           bool return_indices, bool relu) {
  check_pool_input(input, kernel_size, stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t OH = pooled_size(input.size(2), kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode);
  const int64_t OW = pooled_size(input.size(3), kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode);
  TORCH_CHECK(OH > 0 && OW > 0, "fastconv (CUDA): max_pool2d output of input ", input.sizes(),
              " would be empty (", OH, "x", OW, ")");
  const auto fmt = out_format(input);
  const Tensor x = input.contiguous(fmt);
  const auto opts = x.options().memory_format(fmt);
  Tensor out = poisoned(at::empty({x.size(0), x.size(1), OH, OW}, opts));
  const bool small = kernel_size[0] * kernel_size[1] <= 127;
  const auto idt = return_indices ? at::kLong : (small ? at::kChar : at::kInt);
  Tensor ind = at::empty({x.size(0), x.size(1), OH, OW}, opts.dtype(idt));
  if (out.numel() == 0) return {out, ind};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d", [&] {
    using T = scalar_t;
    const Plan pl = plan_for<T>(x, out, {&ind});
    PoolGeom g = make_geom(x, out, false, pl);
    set_geom_pool(g, kernel_size, stride, padding, dilation);
    with_index_type(idt, [&](auto idx_tag) {
      using I = decltype(idx_tag);
      over_batch_planned<T>(pl, x.size(0), g.units, [&](auto v, dim3 grid, int64_t n0) {
        constexpr int V = decltype(v)::value;
        maxpool_fwd_kernel<T, V, V != 1, I><<<grid, 256, 0, stream()>>>(
            x.data_ptr<T>(), out.data_ptr<T>(), ind.data_ptr<I>(), g, return_indices, relu, n0);
      });
    });
  });
  return {out, ind};
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& output,
                                const Tensor& indices, at::IntArrayRef input_size,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                bool return_indices, bool relu) {
  check_pool_backward(grad_output, input_size, kernel_size, stride, padding, dilation, ceil_mode);
  check_cuda(indices, "indices");
  TORCH_CHECK(indices.sizes() == grad_output.sizes(), "fastconv (CUDA): indices of shape ",
              indices.sizes(), " do not match grad_output of shape ", grad_output.sizes());
  const auto idt = indices.scalar_type();
  TORCH_CHECK(return_indices ? idt == at::kLong : (idt == at::kChar || idt == at::kInt),
              "fastconv (CUDA): indices dtype ", idt, " does not fit return_indices=", return_indices);
  TORCH_CHECK(!relu || output.sizes() == grad_output.sizes(), "fastconv (CUDA): output of shape ",
              output.sizes(), " does not match grad_output of shape ", grad_output.sizes());
  c10::cuda::CUDAGuard guard(grad_output.device());
  const auto fmt = out_format(grad_output);
  const Tensor gy = grad_output.contiguous(fmt);
  const Tensor y = relu ? output.contiguous(fmt) : gy;
  const Tensor ind = indices.contiguous(fmt);
  Tensor gx = poisoned(at::empty(input_size, gy.options().memory_format(fmt)));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "max_pool2d_backward", [&] {
    using T = scalar_t;
    const Plan pl = plan_for<T>(gx, gy, {&y, &ind});
    PoolGeom g = make_geom(gx, gy, true, pl);
    set_geom_pool(g, kernel_size, stride, padding, dilation);
    with_index_type(idt, [&](auto idx_tag) {
      using I = decltype(idx_tag);
      over_batch_planned<T>(pl, gx.size(0), g.units, [&](auto v, dim3 grid, int64_t n0) {
        constexpr int V = decltype(v)::value;
        maxpool_bwd_kernel<T, V, V != 1, I><<<grid, 256, 0, stream()>>>(
            gy.data_ptr<T>(), y.data_ptr<T>(), ind.data_ptr<I>(), gx.data_ptr<T>(), g,
            return_indices, relu, n0);
      });
    });
  });
  return gx;
}

}  // namespace
}  // namespace fastconv_cuda

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("max_pool2d", &fastconv_cuda::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &fastconv_cuda::max_pool2d_backward_cuda);
}
