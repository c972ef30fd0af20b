// Autograd kernels of the forward ops: each records a backward node of its own whose apply()
// calls the registered *_backward op, so the backward runs on whatever device kernel (CPU or
// CUDA) serves the forward.
//
// Why C++: a Python autograd formula (torch.library.register_autograd) costs about 40 us per
// forward+backward of one layer on the CI machine, which is 2-3% of a ResNet-18 or VGG-16-BN
// training step at batch 8 on CPU, and more than the kernels themselves take on a GPU for
// small layers. Why plain nodes rather than torch::autograd::Function: see make_node.
//
// Every kernel calls its op again below the autograd key (AutoDispatchBelowADInplaceOrView),
// so the CPU/CUDA kernel, or under torch.compile the fake kernel registered from Python, does
// the work. Outputs that are not differentiable (pooling indices, batch-norm saved statistics)
// get no history. The backward ops refuse double backward (fastconv.cpp); forward-mode AD is
// refused with a message.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

namespace fastconv {
namespace {

using at::Tensor;
using torch::autograd::variable_list;

// `var`: the typed handle of op "fastconv::<name>", looked up once.
#define FASTCONV_OP(var, name, Sig)                                                     \
  static const auto var = c10::Dispatcher::singleton()                                  \
                              .findSchemaOrThrow("fastconv::" name, "")                 \
                              .typed<Sig>()

bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

bool wants_grad(const Tensor& t) {
  return t.defined() && (t.requires_grad() || torch::autograd::isFwGradDefined(t));
}
bool wants_grad(const std::optional<Tensor>& t) { return t.has_value() && wants_grad(*t); }

// True when a call records no autograd graph: grad mode is off or no tensor argument takes a
// gradient. Such calls go straight below the autograd key (Function::apply, used before, built
// its node and saved-data map even then: about 4 us a call on the CI machine, more than a small
// layer's kernel); their outputs are the same tensors, requiring no grad either way.
template <typename... Ts>
bool no_graph(const Ts&... ts) {
  return !at::GradMode::is_enabled() || !(wants_grad(ts) || ...);
}

// Backward nodes of our own, built as torch's generated autograd code builds its nodes: saved
// variables and flags are plain members, the next edges are the differentiable inputs in order
// (an absent optional input takes an empty edge); apply() asks task_should_compute_output (the
// engine's pruning for autograd.grad(inputs=...) included) and holds the node's mutex, as
// release_variables does. Compiled autograd (torch._dynamo.compiled_autograd) is not
// supported: the nodes do not implement compiled_args. torch::autograd::Function's node costs a few
// microseconds more per layer (its saved-data map, the wrapping of every output), which at
// LeNet's layer sizes is 10% of a forward + backward (batch norm at 2x6x28x28: 36.9 -> 31.4 us).
// Nodes are held by c10::intrusive_ptr since torch 2.14 (std::shared_ptr before); Node::getptr()
// returns the holder type of the torch this builds against.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());

template <class NodeT, class... Inputs>
auto make_node(const Inputs&... differentiable_inputs) {
  auto node = [] {
    if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
      return std::make_shared<NodeT>();
    } else {
      return c10::make_intrusive<NodeT>();
    }
  }();
  node->set_next_edges(torch::autograd::collect_next_edges(differentiable_inputs...));
  return node;
}

bool has_fw_grad(const Tensor& t) { return t.defined() && torch::autograd::isFwGradDefined(t); }
bool has_fw_grad(const std::optional<Tensor>& t) { return t.has_value() && has_fw_grad(*t); }

template <typename... Ts>
void refuse_forward_ad(const char* op, const Ts&... ts) {
  TORCH_CHECK(!(has_fw_grad(ts) || ...), "fastconv ", op,
              ": forward-mode AD (dual tensors) is not supported; use torch's own op");
}

torch::autograd::SavedVariable save(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? torch::autograd::SavedVariable(*t, false)
                                       : torch::autograd::SavedVariable();
}

// op.call(args...) below the autograd key: the device kernel (or the fake one) runs.
template <typename Sig, typename... Args>
auto call_below(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// The pools' backward needs the input's sizes and memory format (its gradient takes both).
struct InputGeometry {
  std::vector<int64_t> size;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;

  void save(const Tensor& input) {
    size = input.sizes().vec();
    format = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast
                 ? at::MemoryFormat::ChannelsLast
                 : at::MemoryFormat::Contiguous;
  }
};

// ... and the windowed pools' backward also the window.
struct Window {
  std::vector<int64_t> kernel_size, stride, padding;
  bool ceil_mode = false;

  void save(c10::IntArrayRef k, c10::IntArrayRef s, c10::IntArrayRef p, bool ceil) {
    kernel_size = k.vec();
    stride = s.vec();
    padding = p.vec();
    ceil_mode = ceil;
  }
};

// ---------------------------------------------------------------------------- conv2d_relu

using ConvSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                       c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool);
using ConvBwdSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, int64_t, bool, std::array<bool, 3>);

// Edges: input, weight, bias. The ReLU mask is read from the saved output: no mask tensor, no
// recomputation.
struct Conv2dReLUBackward : torch::autograd::Node {
  torch::autograd::SavedVariable input_, weight_, output_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_ = 1;
  bool relu_ = false;

  std::string name() const override { return "fastconv::Conv2dReLUBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    output_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    FASTCONV_OP(bwd, "conv2d_relu_backward", ConvBwdSig);
    variable_list out(3);
    const Tensor& grad = grads[0];
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    if (!grad.defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const Tensor output = relu_ ? output_.unpack(getptr()) : grad.new_empty({0});
    auto [gi, gw, gb] = bwd.call(grad, input_.unpack(), weight_.unpack(), output, stride_,
                                 padding_, dilation_, groups_, relu_, mask);
    if (mask[0]) out[0] = gi;
    if (mask[1]) out[1] = gw;
    if (mask[2]) out[2] = gb;
    return out;
  }
};

Tensor conv2d_relu_autograd(const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                            bool relu) {
  FASTCONV_OP(fwd, "conv2d_relu", ConvSig);
  if (no_graph(input, weight, bias)) {
    return call_below(fwd, input, weight, bias, stride, padding, dilation, groups, relu);
  }
  refuse_forward_ad("conv2d_relu", input, weight, bias);
  Tensor out = call_below(fwd, input, weight, bias, stride, padding, dilation, groups, relu);
  auto node = make_node<Conv2dReLUBackward>(input, weight, bias);
  node->input_ = save(input);
  node->weight_ = save(weight);
  node->stride_ = stride.vec();
  node->padding_ = padding.vec();
  node->dilation_ = dilation.vec();
  node->groups_ = groups;
  node->relu_ = relu;
  torch::autograd::set_history(out, NodePtr(node));
  if (relu) node->output_ = torch::autograd::SavedVariable(out, true);  // after its history
  return out;
}

// ----------------------------------------------------------------------------- max_pool2d

using MaxSig = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                          c10::IntArrayRef, c10::IntArrayRef, bool, bool, bool);
using MaxBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
                         c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                         bool, bool, bool);

// Edge: input. The output is saved only to mask by the fused ReLU; the indices always.
struct MaxPool2dBackward : torch::autograd::Node {
  torch::autograd::SavedVariable output_, indices_;
  InputGeometry input_;
  Window window_;
  std::vector<int64_t> dilation_;
  bool return_indices_ = false, relu_ = false;

  std::string name() const override { return "fastconv::MaxPool2dBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    output_.reset_data();
    indices_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    FASTCONV_OP(bwd, "max_pool2d_backward", MaxBwdSig);
    variable_list out(1);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !task_should_compute_output(0)) return out;
    const auto fmt = input_.format;
    const Tensor output = relu_ ? output_.unpack(getptr()) : grad.new_empty({0});
    out[0] = bwd.call(grad.contiguous(fmt), output, indices_.unpack(), input_.size,
                      window_.kernel_size, window_.stride, window_.padding, dilation_,
                      window_.ceil_mode, return_indices_, relu_)
                 .contiguous(fmt);
    return out;
  }
};

std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& input, c10::IntArrayRef kernel_size,
                                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                                               c10::IntArrayRef dilation, bool ceil_mode,
                                               bool return_indices, bool relu) {
  FASTCONV_OP(fwd, "max_pool2d", MaxSig);
  if (no_graph(input)) {
    return call_below(fwd, input, kernel_size, stride, padding, dilation, ceil_mode,
                      return_indices, relu);
  }
  refuse_forward_ad("max_pool2d", input);
  auto [out, indices] = call_below(fwd, input, kernel_size, stride, padding, dilation,
                                   ceil_mode, return_indices, relu);
  auto node = make_node<MaxPool2dBackward>(input);
  node->input_.save(input);
  node->window_.save(kernel_size, stride, padding, ceil_mode);
  node->dilation_ = dilation.vec();
  node->return_indices_ = return_indices;
  node->relu_ = relu;
  // the indices are an output of the op but not differentiable: no history
  node->indices_ = torch::autograd::SavedVariable(indices, false);
  torch::autograd::set_history(out, NodePtr(node));
  if (relu) node->output_ = torch::autograd::SavedVariable(out, true);  // after its history
  return {out, indices};
}

// ----------------------------------------------------------------------------- avg pools

using AvgSig = Tensor(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool,
                      bool, std::optional<int64_t>);
using AvgBwdSig = Tensor(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                         c10::IntArrayRef, bool, bool, std::optional<int64_t>);

// Edge: input. Nothing is saved but the geometry.
struct AvgPool2dBackward : torch::autograd::Node {
  InputGeometry input_;
  Window window_;
  bool count_include_pad_ = true;
  std::optional<int64_t> divisor_override_;

  std::string name() const override { return "fastconv::AvgPool2dBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    FASTCONV_OP(bwd, "avg_pool2d_backward", AvgBwdSig);
    variable_list out(1);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !task_should_compute_output(0)) return out;
    const auto fmt = input_.format;
    out[0] = bwd.call(grad.contiguous(fmt), input_.size, window_.kernel_size, window_.stride,
                      window_.padding, window_.ceil_mode, count_include_pad_, divisor_override_)
                 .contiguous(fmt);
    return out;
  }
};

Tensor avg_pool2d_autograd(const Tensor& input, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode,
                           bool count_include_pad, std::optional<int64_t> divisor_override) {
  FASTCONV_OP(fwd, "avg_pool2d", AvgSig);
  if (no_graph(input)) {
    return call_below(fwd, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override);
  }
  refuse_forward_ad("avg_pool2d", input);
  Tensor out = call_below(fwd, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override);
  auto node = make_node<AvgPool2dBackward>(input);
  node->input_.save(input);
  node->window_.save(kernel_size, stride, padding, ceil_mode);
  node->count_include_pad_ = count_include_pad;
  node->divisor_override_ = divisor_override;
  torch::autograd::set_history(out, NodePtr(node));
  return out;
}

using AdaptiveSig = Tensor(const Tensor&, c10::IntArrayRef);
using AdaptiveBwdSig = Tensor(const Tensor&, c10::IntArrayRef);

struct AdaptiveAvgPool2dBackward : torch::autograd::Node {
  InputGeometry input_;

  std::string name() const override { return "fastconv::AdaptiveAvgPool2dBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    FASTCONV_OP(bwd, "adaptive_avg_pool2d_backward", AdaptiveBwdSig);
    variable_list out(1);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !task_should_compute_output(0)) return out;
    const auto fmt = input_.format;
    out[0] = bwd.call(grad.contiguous(fmt), input_.size).contiguous(fmt);
    return out;
  }
};

Tensor adaptive_avg_pool2d_autograd(const Tensor& input, c10::IntArrayRef output_size) {
  FASTCONV_OP(fwd, "adaptive_avg_pool2d", AdaptiveSig);
  if (no_graph(input)) return call_below(fwd, input, output_size);
  refuse_forward_ad("adaptive_avg_pool2d", input);
  Tensor out = call_below(fwd, input, output_size);
  auto node = make_node<AdaptiveAvgPool2dBackward>(input);
  node->input_.save(input);
  torch::autograd::set_history(out, NodePtr(node));
  return out;
}

// ----------------------------------------------------------------------------- batch_norm

using BnSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double, double, bool,
    const std::optional<Tensor>&);
using BnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, bool, bool, std::array<bool, 4>);

// Edges: input, weight, bias, residual. running_mean/running_var are buffers updated in place
// below autograd and take no gradient. The residual saves nothing: its gradient is grad_output
// masked by the saved output (relu), or grad_output itself.
struct BatchNormBackward : torch::autograd::Node {
  torch::autograd::SavedVariable input_, weight_, output_, save_mean_, save_invstd_;
  bool training_ = false, relu_ = false;

  std::string name() const override { return "fastconv::BatchNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    output_.reset_data();
    save_mean_.reset_data();
    save_invstd_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // against release_variables on another thread
    FASTCONV_OP(bwd, "batch_norm_backward", BnBwdSig);
    variable_list out(4);
    const Tensor& grad = grads[0];
    const bool need_res = task_should_compute_output(3);
    // without the ReLU the residual's gradient is grad_output itself: no kernel work
    const std::array<bool, 4> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2), need_res && relu_};
    if (!grad.defined()) return out;
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      const Tensor weight = weight_.unpack();
      const Tensor output = relu_ ? output_.unpack(getptr()) : grad.new_empty({0});
      auto [gi, gw, gb, gr] =
          bwd.call(grad, input_.unpack(), output,
                   weight.defined() ? std::optional<Tensor>(weight) : std::nullopt,
                   save_mean_.unpack(), save_invstd_.unpack(), training_, relu_, mask);
      for (int i = 0; i < 3; ++i) {
        if (mask[i]) out[i] = i == 0 ? gi : i == 1 ? gw : gb;
      }
      if (mask[3]) out[3] = gr;
    }
    if (need_res && !relu_) out[3] = grad;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double momentum, double eps, bool relu,
    const std::optional<Tensor>& residual) {
  FASTCONV_OP(fwd, "batch_norm", BnSig);
  if (no_graph(input, weight, bias, residual)) {
    return call_below(fwd, input, weight, bias, running_mean, running_var, training, momentum,
                      eps, relu, residual);
  }
  refuse_forward_ad("batch_norm", input, weight, bias, residual);
  auto [out, save_mean, save_invstd] =
      call_below(fwd, input, weight, bias, running_mean, running_var, training, momentum, eps,
                 relu, residual);
  auto node = make_node<BatchNormBackward>(input, weight, bias, residual);
  node->input_ = save(input);
  node->weight_ = save(weight);
  node->save_mean_ = save(save_mean);
  node->save_invstd_ = save(save_invstd);
  node->training_ = training;
  node->relu_ = relu;
  torch::autograd::set_history(out, NodePtr(node));
  if (relu) node->output_ = torch::autograd::SavedVariable(out, true);  // after its history
  return {out, save_mean, save_invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  m.impl("conv2d_relu", &conv2d_relu_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("avg_pool2d", &avg_pool2d_autograd);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
}

}  // namespace fastconv
