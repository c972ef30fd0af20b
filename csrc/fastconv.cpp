// Every fastconv operator schema, defined once. Kernels live in csrc/cpu/ (CPU dispatch key)
// and csrc/cuda/ (CUDA dispatch key), the forward ops' autograd in csrc/autograd.cpp (C++);
// only the fake (meta) kernels are Python, registered by fastconv/backends/extension.py right
// after this library is loaded.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(fastconv, m) {
  // torch.compile / export look up the fake kernels in this module when they meet an op.
  m.set_python_module("fastconv.backends.extension");

  m.def(
      "conv2d_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu) -> Tensor");
  m.def(
      "conv2d_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode, bool return_indices, bool relu) "
      "-> (Tensor output, Tensor indices)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor output, Tensor indices, int[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
      "bool return_indices, bool relu) -> Tensor");

  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu, "
      "Tensor? residual=None) -> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  // output_mask[3]: the residual's gradient (grad_output masked by output > 0 when relu)
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor output, Tensor? weight, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool relu, bool[4] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");

  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad_output, int[] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
      "int? divisor_override) -> Tensor");
  m.def("adaptive_avg_pool2d(Tensor input, int[2] output_size) -> Tensor");
  m.def("adaptive_avg_pool2d_backward(Tensor grad_output, int[] input_size) -> Tensor");
}

// The backward ops have no derivative of their own (no double backward): their outputs get a
// grad_fn that raises "derivative ... is not implemented" if differentiated. A C++ kernel here
// costs nothing per call, where a Python one would run in every backward pass.
TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  for (const char* name : {"conv2d_relu_backward", "max_pool2d_backward", "batch_norm_backward",
                           "avg_pool2d_backward", "adaptive_avg_pool2d_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}
