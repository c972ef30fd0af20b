// Autograd kernels of the forward ops: each is a C++ torch::autograd::Function whose backward
// calls the registered *_backward op, so the backward runs on whatever device kernel (CPU or
// CUDA) serves the forward.
//
// Why C++: a Python autograd formula (torch.library.register_autograd) costs about 40 us per
// forward+backward of one layer on the CI machine, which is 2-3% of a ResNet-18 or VGG-16-BN
// training step at batch 8 on CPU, and more than the kernels themselves take on a GPU for
// small layers. This path costs a few microseconds.
//
// Every kernel calls its op again below the autograd key (AutoDispatchBelowADInplaceOrView),
// so the CPU/CUDA kernel, or under torch.compile the fake kernel registered from Python, does
// the work. Tensors that are not differentiable outputs (pooling indices, batch-norm saved
// statistics) are marked so. The backward ops refuse double backward (fastconv.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fastconv {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// `var`: the typed handle of op "fastconv::<name>", looked up once.
#define FASTCONV_OP(var, name, Sig)                                                     \
  static const auto var = c10::Dispatcher::singleton()                                  \
                              .findSchemaOrThrow("fastconv::" name, "")                 \
                              .typed<Sig>()

bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Index of each differentiable tensor argument among the Function's variable inputs (an
// absent optional tensor is not one): needs_input_grad counts variables only.
struct EdgeIndex {
  int next = 0;
  int take(bool present) { return present ? next++ : -1; }
};

bool needs(AutogradContext* ctx, int edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

bool wants_grad(const Tensor& t) {
  return t.defined() && (t.requires_grad() || torch::autograd::isFwGradDefined(t));
}
bool wants_grad(const std::optional<Tensor>& t) { return t.has_value() && wants_grad(*t); }

// True when a call records no autograd graph: grad mode is off or no tensor argument takes a
// gradient. Function::apply builds its node and saved-data map even then (about 4 us a call on
// the CI machine, more than a small layer's kernel), so such calls go straight below the
// autograd key; their outputs are the same tensors, requiring no grad either way.
template <typename... Ts>
bool no_graph(const Ts&... ts) {
  return !at::GradMode::is_enabled() || !(wants_grad(ts) || ...);
}

// op.call(args...) below the autograd key: the device kernel (or the fake one) runs.
template <typename Sig, typename... Args>
auto call_below(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

std::vector<int64_t> vec(c10::IntArrayRef a) { return a.vec(); }
// (a vector, alive until the end of the call expression it is an argument of)
std::vector<int64_t> ints(AutogradContext* ctx, const char* key) {
  return ctx->saved_data[key].toIntVector();
}

// The pools' backward needs the input's sizes and memory format (its gradient takes both).
at::MemoryFormat saved_format(AutogradContext* ctx) {
  return ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::Contiguous;
}

void save_input_geometry(AutogradContext* ctx, const Tensor& input) {
  ctx->saved_data["input_size"] = input.sizes().vec();
  ctx->saved_data["channels_last"] =
      input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// ... and the windowed pools' backward also the window.
void save_window(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef kernel_size,
                 c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode) {
  save_input_geometry(ctx, input);
  ctx->saved_data["kernel_size"] = vec(kernel_size);
  ctx->saved_data["stride"] = vec(stride);
  ctx->saved_data["padding"] = vec(padding);
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

// ---------------------------------------------------------------------------- conv2d_relu

using ConvSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                       c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool);
using ConvBwdSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, int64_t, bool, std::array<bool, 3>);

struct Conv2dReLUFunction : torch::autograd::Function<Conv2dReLUFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                        bool relu) {
    FASTCONV_OP(fwd, "conv2d_relu", ConvSig);
    Tensor out = call_below(fwd, input, weight, bias, stride, padding, dilation, groups, relu);
    // the ReLU mask is read from the output: no mask tensor, no recomputation
    ctx->save_for_backward({input, weight, relu ? out : Tensor()});
    ctx->saved_data["stride"] = vec(stride);
    ctx->saved_data["padding"] = vec(padding);
    ctx->saved_data["dilation"] = vec(dilation);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = defined(bias);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FASTCONV_OP(bwd, "conv2d_relu_backward", ConvBwdSig);
    const auto saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    EdgeIndex e;
    const int ei = e.take(true), ew = e.take(true), eb = e.take(ctx->saved_data["has_bias"].toBool());
    const std::array<bool, 3> mask{needs(ctx, ei), needs(ctx, ew), needs(ctx, eb)};
    const Tensor& grad = grads[0];
    const Tensor output = relu ? saved[2] : grad.new_empty({0});
    auto [gi, gw, gb] =
        bwd.call(grad, saved[0], saved[1], output, ints(ctx, "stride"), ints(ctx, "padding"),
                 ints(ctx, "dilation"), ctx->saved_data["groups"].toInt(), relu, mask);
    return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_relu_autograd(const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                            bool relu) {
  if (no_graph(input, weight, bias)) {
    FASTCONV_OP(fwd, "conv2d_relu", ConvSig);
    return call_below(fwd, input, weight, bias, stride, padding, dilation, groups, relu);
  }
  return Conv2dReLUFunction::apply(input, weight, bias, stride, padding, dilation, groups, relu);
}

// ----------------------------------------------------------------------------- max_pool2d

using MaxSig = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                          c10::IntArrayRef, c10::IntArrayRef, bool, bool, bool);
using MaxBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
                         c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                         bool, bool, bool);

struct MaxPool2dFunction : torch::autograd::Function<MaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode, bool return_indices, bool relu) {
    FASTCONV_OP(fwd, "max_pool2d", MaxSig);
    auto [out, indices] = call_below(fwd, input, kernel_size, stride, padding, dilation,
                                     ceil_mode, return_indices, relu);
    ctx->mark_non_differentiable({indices});
    // the output is needed only to mask by the fused ReLU; the indices always
    ctx->save_for_backward({relu ? out : Tensor(), indices});
    save_window(ctx, input, kernel_size, stride, padding, ceil_mode);
    ctx->saved_data["dilation"] = vec(dilation);
    ctx->saved_data["return_indices"] = return_indices;
    ctx->saved_data["relu"] = relu;
    return {out, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FASTCONV_OP(bwd, "max_pool2d_backward", MaxBwdSig);
    const auto saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto fmt = saved_format(ctx);
    const Tensor& grad = grads[0];
    const Tensor out = relu ? saved[0] : grad.new_empty({0});
    Tensor gi = bwd.call(grad.contiguous(fmt), out, saved[1], ints(ctx, "input_size"),
                         ints(ctx, "kernel_size"), ints(ctx, "stride"), ints(ctx, "padding"),
                         ints(ctx, "dilation"), ctx->saved_data["ceil_mode"].toBool(),
                         ctx->saved_data["return_indices"].toBool(), relu);
    return {gi.contiguous(fmt), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& input, c10::IntArrayRef kernel_size,
                                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                                               c10::IntArrayRef dilation, bool ceil_mode,
                                               bool return_indices, bool relu) {
  if (no_graph(input)) {
    FASTCONV_OP(fwd, "max_pool2d", MaxSig);
    return call_below(fwd, input, kernel_size, stride, padding, dilation, ceil_mode,
                      return_indices, relu);
  }
  auto r = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode,
                                    return_indices, relu);
  return {r[0], r[1]};
}

// ----------------------------------------------------------------------------- avg pools

using AvgSig = Tensor(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool,
                      bool, std::optional<int64_t>);
using AvgBwdSig = Tensor(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                         c10::IntArrayRef, bool, bool, std::optional<int64_t>);

struct AvgPool2dFunction : torch::autograd::Function<AvgPool2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef kernel_size,
                        c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode,
                        bool count_include_pad, std::optional<int64_t> divisor_override) {
    FASTCONV_OP(fwd, "avg_pool2d", AvgSig);
    Tensor out = call_below(fwd, input, kernel_size, stride, padding, ceil_mode,
                            count_include_pad, divisor_override);
    save_window(ctx, input, kernel_size, stride, padding, ceil_mode);
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FASTCONV_OP(bwd, "avg_pool2d_backward", AvgBwdSig);
    const auto fmt = saved_format(ctx);
    const auto divisor = ctx->saved_data["divisor_override"].toOptional<int64_t>();
    Tensor gi = bwd.call(grads[0].contiguous(fmt), ints(ctx, "input_size"),
                         ints(ctx, "kernel_size"), ints(ctx, "stride"), ints(ctx, "padding"),
                         ctx->saved_data["ceil_mode"].toBool(),
                         ctx->saved_data["count_include_pad"].toBool(), divisor);
    return {gi.contiguous(fmt), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor avg_pool2d_autograd(const Tensor& input, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, bool ceil_mode,
                           bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (no_graph(input)) {
    FASTCONV_OP(fwd, "avg_pool2d", AvgSig);
    return call_below(fwd, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override);
  }
  return AvgPool2dFunction::apply(input, kernel_size, stride, padding, ceil_mode,
                                  count_include_pad, divisor_override);
}

using AdaptiveSig = Tensor(const Tensor&, c10::IntArrayRef);
using AdaptiveBwdSig = Tensor(const Tensor&, c10::IntArrayRef);

struct AdaptiveAvgPool2dFunction : torch::autograd::Function<AdaptiveAvgPool2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef output_size) {
    FASTCONV_OP(fwd, "adaptive_avg_pool2d", AdaptiveSig);
    Tensor out = call_below(fwd, input, output_size);
    save_input_geometry(ctx, input);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FASTCONV_OP(bwd, "adaptive_avg_pool2d_backward", AdaptiveBwdSig);
    const auto fmt = saved_format(ctx);
    Tensor gi = bwd.call(grads[0].contiguous(fmt), ints(ctx, "input_size"));
    return {gi.contiguous(fmt), Tensor()};
  }
};

Tensor adaptive_avg_pool2d_autograd(const Tensor& input, c10::IntArrayRef output_size) {
  if (no_graph(input)) {
    FASTCONV_OP(fwd, "adaptive_avg_pool2d", AdaptiveSig);
    return call_below(fwd, input, output_size);
  }
  return AdaptiveAvgPool2dFunction::apply(input, output_size);
}

// ----------------------------------------------------------------------------- batch_norm

using BnSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double, double, bool,
    const std::optional<Tensor>&);
using BnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, bool, bool, std::array<bool, 4>);

struct BatchNormFunction : torch::autograd::Function<BatchNormFunction> {
  // running_mean/running_var are updated in place below autograd; they are buffers and take
  // no gradient. The residual saves nothing: its gradient is grad_output masked by the saved
  // output (relu), or grad_output itself.
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, bool training,
                               double momentum, double eps, bool relu,
                               const std::optional<Tensor>& residual) {
    FASTCONV_OP(fwd, "batch_norm", BnSig);
    auto [out, save_mean, save_invstd] =
        call_below(fwd, input, weight, bias, running_mean, running_var, training, momentum, eps,
                   relu, residual);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    ctx->save_for_backward({input, defined(weight) ? *weight : Tensor(),
                            relu ? out : Tensor(), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = defined(bias);
    ctx->saved_data["n_running"] = int64_t(defined(running_mean)) + int64_t(defined(running_var));
    ctx->saved_data["has_residual"] = defined(residual);
    return {out, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FASTCONV_OP(bwd, "batch_norm_backward", BnBwdSig);
    const auto saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_weight = saved[1].defined();
    EdgeIndex e;
    const int ei = e.take(true), ew = e.take(has_weight),
              eb = e.take(ctx->saved_data["has_bias"].toBool());
    // running_mean/running_var, when given, are variables too and come before the residual
    e.next += ctx->saved_data["n_running"].toInt();
    const int eres = e.take(ctx->saved_data["has_residual"].toBool());
    const bool need_res = needs(ctx, eres);
    const Tensor& grad = grads[0];
    // without the ReLU the residual's gradient is grad_output itself: no kernel work
    const std::array<bool, 4> mask{needs(ctx, ei), needs(ctx, ew), needs(ctx, eb),
                                   need_res && relu};
    const Tensor out = relu ? saved[2] : grad.new_empty({0});
    const std::optional<Tensor> weight = has_weight ? std::optional<Tensor>(saved[1])
                                                    : std::nullopt;
    auto [gi, gw, gb, gr] = bwd.call(grad, saved[0], out, weight, saved[3], saved[4],
                                     ctx->saved_data["training"].toBool(), relu, mask);
    Tensor grad_res;
    if (need_res) grad_res = relu ? gr : grad;
    return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), grad_res};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double momentum, double eps, bool relu,
    const std::optional<Tensor>& residual) {
  if (no_graph(input, weight, bias, residual)) {
    FASTCONV_OP(fwd, "batch_norm", BnSig);
    return call_below(fwd, input, weight, bias, running_mean, running_var, training, momentum,
                      eps, relu, residual);
  }
  auto r = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps, relu, residual);
  return {r[0], r[1], r[2]};
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
