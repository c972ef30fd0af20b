// Conv2d + bias + ReLU on CPU.
//
// Forward, float32 with finite operands: oneDNN's convolution with the ReLU as a post-op
// (mkldnn::_convolution_pointwise, the op inductor uses), so bias and ReLU are applied while the
// output tile is still in registers. Otherwise (other dtypes, NaN/inf operands, torch builds
// without that op): ATen's convolution without bias, then one fused bias + ReLU pass in place.
// Backward: one pass masks grad_output by the ReLU and sums grad_bias on the fly; ATen's
// convolution_backward then does the two matrix products on the masked gradient.
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>

namespace fastconv {
namespace cpu {
namespace {

const c10::OperatorHandle* onednn_pointwise_op() {
  static const std::optional<c10::OperatorHandle> op = [] {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
    if (h.has_value() && !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      return std::optional<c10::OperatorHandle>();
    }
    return h;
  }();
  return op.has_value() ? &*op : nullptr;
}

// True when no element is NaN or +-inf. oneDNN's ReLU post-op maps NaN to 0 where torch.relu
// keeps it, so the fused path is taken only for finite operands (then the output is NaN only
// if the float32 sum overflows both ways). One read of the input: a third of the read+write
// relu pass it replaces.
bool all_finite(const Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.scalar_type() != at::kFloat ||
      !(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    return at::isfinite(t).all().item<bool>();
  }
  const float* p = t.const_data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    using V = Vec<float>;
    constexpr int64_t L = V::size();
    V acc0(0.f), acc1(0.f);
    int64_t i = b;
    for (; i + 2 * L <= e; i += 2 * L) {
      const V a = V::loadu(p + i), c = V::loadu(p + i + L);
      acc0 += a - a;  // 0 for finite values, NaN for NaN and +-inf
      acc1 += c - c;
    }
    float tail = 0.f;
    for (; i < e; ++i) tail += p[i] - p[i];
    if (std::isnan(hsum(acc0 + acc1) + tail)) bad = true;
  });
  return !bad;
}

bool use_onednn(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  return input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         input.numel() > 0 && at::globalContext().userEnabledMkldnn() && at::hasMKLDNN() &&
         onednn_pointwise_op() != nullptr && all_finite(weight) &&
         (!bias.has_value() || !bias->defined() || all_finite(*bias)) && all_finite(input);
}

Tensor onednn_conv(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                   int64_t groups, bool relu) {
  // mkldnn::_convolution_pointwise(X, W, B?, padding, stride, dilation, groups, attr,
  //                                scalars, algorithm) -> Y, called boxed: its C++ signature is
  // not part of torch's public headers.
  torch::jit::Stack stack;
  stack.reserve(10);
  stack.emplace_back(input);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(groups);
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_pointwise_op()->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// y = relu?(y + bias[c]) in place over a contiguous output in either layout.
template <typename scalar_t>
void bias_relu_inplace(Tensor& out, const std::optional<Tensor>& bias, bool relu, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), HW = out.size(2) * out.size(3);
  const std::vector<double> bd = read_channels(bias, C, 0.0);
  std::vector<acc_t> b(bd.begin(), bd.end());
  scalar_t* y = out.data_ptr<scalar_t>();
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* yp = y + p * HW;
        const acc_t bc = b[p % C];
        if (relu) {
          for (int64_t i = 0; i < HW; ++i) yp[i] = static_cast<scalar_t>(relu_keep_nan(static_cast<acc_t>(yp[i]) + bc));
        } else {
          for (int64_t i = 0; i < HW; ++i) yp[i] = static_cast<scalar_t>(static_cast<acc_t>(yp[i]) + bc);
        }
      }
    });
  } else {
    at::parallel_for(0, N * HW, grain_for(C), [&](int64_t r0, int64_t r1) {
      const acc_t* __restrict bp = b.data();
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict yr = y + r * C;
        if (relu) {
          for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(relu_keep_nan(static_cast<acc_t>(yr[c]) + bp[c]));
        } else {
          for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(yr[c]) + bp[c]);
        }
      }
    });
  }
}

void check_conv_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                     int64_t groups) {
  check_4d(input, "input");
  check_4d(weight, "weight");
  check_cpu_float(input, "input");
  check_cpu_float(weight, "weight");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "fastconv conv2d_relu: input dtype ",
              input.scalar_type(), " and weight dtype ", weight.scalar_type(), " differ");
  TORCH_CHECK(groups > 0 && weight.size(0) % groups == 0 &&
                  input.size(1) == weight.size(1) * groups,
              "fastconv conv2d_relu: input ", input.sizes(), " and weight ", weight.sizes(),
              " do not agree for groups=", groups, " (expected input channels = weight.size(1) * "
              "groups and weight.size(0) divisible by groups)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastconv conv2d_relu: "
                "bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  }
}

// ------------------------------------------ grad_weight on small output planes: one GEMM
// With L = OH*OW output positions per image and rows = C*KH*KW, a slab of nb images adds
//   dW[K, rows] += G[K, nb*L] @ cols[rows, nb*L]^T
// where cols is the slab's input unfolded (im2col) and G its grad_output as [K, nb*L] (in
// channels-last, the transposed forms of both). oneDNN's backward-weights pass is slow where
// the output planes are small and the weight large (ResNet-18's 512->512 3x3 at 3x3 planes,
// batch 8, 2 threads: 2.3-6.5 ms NCHW, 5.9 channels-last, 1.2-1.6 ms this way; 1.1-1.9x at the
// 7x7 planes of ResNet-50's last stage); where planes are large,
// unfolding costs more than the product saves, so those keep oneDNN's. The same products for
// the forward and grad_input measured 0.6-1.0x oneDNN's at these shapes (only strided 1x1
// convolutions gained), so those passes stay with oneDNN. `auto` measures the passes of both
// backends per shape either way.
constexpr int64_t kGemmMaxPlane = 64;               // output planes of at most 8x8
constexpr int64_t kColsBudget = int64_t{1} << 22;  // unfolded elements per slab (16 MiB float)

bool grad_weight_by_gemm(const Tensor& input, const Tensor& weight, int64_t groups,
                         int64_t OH, int64_t OW) {
  const auto t = input.scalar_type();
  return groups == 1 && (t == at::kFloat || t == at::kDouble) && input.numel() > 0 &&
         weight.numel() > 0 && OH * OW > 0 && OH * OW <= kGemmMaxPlane;
}

struct Unfold {
  int64_t N, C, H, W, K, KH, KW, OH, OW, L, rows, slab;
  c10::IntArrayRef stride, padding, dilation;

  Unfold(const Tensor& input, const Tensor& weight, int64_t OH_, int64_t OW_,
         c10::IntArrayRef stride_, c10::IntArrayRef padding_, c10::IntArrayRef dilation_)
      : N(input.size(0)), C(input.size(1)), H(input.size(2)), W(input.size(3)),
        K(weight.size(0)), KH(weight.size(2)), KW(weight.size(3)), OH(OH_), OW(OW_),
        L(OH_ * OW_), rows(C * KH * KW),
        slab(std::clamp<int64_t>(kColsBudget / std::max<int64_t>(rows * L, 1), 1, N)),
        stride(stride_), padding(padding_), dilation(dilation_) {}

  // input row ih of output row oh for kernel row kh (and likewise for columns)
  int64_t in_h(int64_t oh, int64_t kh) const {
    return oh * stride[0] + kh * dilation[0] - padding[0];
  }
  int64_t in_w(int64_t ow, int64_t kw) const {
    return ow * stride[1] + kw * dilation[1] - padding[1];
  }

  // cols[r, n * L + l] for the nb images from n0 (zero where the window reads padding)
  template <typename scalar_t>
  void unfold(const scalar_t* x, scalar_t* cols, int64_t n0, int64_t nb) const {
    const int64_t NL = nb * L;
    at::parallel_for(0, rows, grain_for(NL), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
        for (int64_t n = 0; n < nb; ++n) {
          const scalar_t* plane = x + ((n0 + n) * C + c) * H * W;
          scalar_t* dst = cols + r * NL + n * L;
          for (int64_t oh = 0; oh < OH; ++oh, dst += OW) {
            const int64_t ih = in_h(oh, kh);
            if (ih < 0 || ih >= H) {
              std::fill(dst, dst + OW, scalar_t(0));
              continue;
            }
            for (int64_t ow = 0; ow < OW; ++ow) {
              const int64_t iw = in_w(ow, kw);
              dst[ow] = (iw >= 0 && iw < W) ? plane[ih * W + iw] : scalar_t(0);
            }
          }
        }
      }
    });
  }

  // channels-last: cols[n * L + l, (kh * KW + kw) * C + c] for the nb images from n0, one
  // run of C channels per window position (zero where it reads padding)
  template <typename scalar_t>
  void unfold_cl(const scalar_t* x, scalar_t* cols, int64_t n0, int64_t nb) const {
    at::parallel_for(0, nb * L, grain_for(rows), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / L, oh = (p % L) / OW, ow = p % OW;
        scalar_t* dst = cols + p * rows;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = in_h(oh, kh);
          for (int64_t kw = 0; kw < KW; ++kw, dst += C) {
            const int64_t iw = in_w(ow, kw);
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
              std::fill(dst, dst + C, scalar_t(0));
            } else {
              const scalar_t* src = x + (((n0 + n) * H + ih) * W + iw) * C;
              std::copy(src, src + C, dst);
            }
          }
        }
      }
    });
  }
};

// grad_weight of the convolution alone: g is grad_output (already masked), contiguous in
// `fmt`, the layout the input is read in. NCHW: dW[K, (c, kh, kw)] += G[K, nL] @ cols^T, with
// G gathered from g; channels-last: g is already [nL, K] and the product comes out in the
// channels-last weight's order, dW[K, (kh, kw, c)] += g^T @ cols.
Tensor grad_weight_gemm(const Tensor& g, const Tensor& input, const Unfold& u,
                        at::MemoryFormat fmt) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(fmt);
  Tensor gw = poisoned(at::empty({u.K, u.rows}, x.options()));
  Tensor buffer = at::empty({u.rows * u.slab * u.L}, x.options());
  for (int64_t n0 = 0; n0 < u.N; n0 += u.slab) {
    const int64_t nb = std::min(u.slab, u.N - n0);
    const Tensor slab = g.narrow(0, n0, nb);
    Tensor cols, gs;  // the product is gs @ cols
    if (cl) {
      cols = buffer.narrow(0, 0, u.rows * nb * u.L).view({nb * u.L, u.rows});
      gs = slab.permute({0, 2, 3, 1}).reshape({nb * u.L, u.K}).t();  // a view
    } else {
      cols = buffer.narrow(0, 0, u.rows * nb * u.L).view({u.rows, nb * u.L});
      // G[k, n * L + l] = g[n0 + n, k, l]: a copy unless the slab is one image
      gs = slab.reshape({nb, u.K, u.L}).transpose(0, 1).reshape({u.K, nb * u.L});
    }
    FASTCONV_DISPATCH_FLOATING(x.scalar_type(), "fastconv_unfold", [&] {
      if (cl) {
        u.unfold_cl<scalar_t>(x.const_data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(), n0, nb);
      } else {
        u.unfold<scalar_t>(x.const_data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(), n0, nb);
      }
    });
    const Tensor rhs = cl ? cols : cols.t();
    if (n0 == 0) {
      at::mm_out(gw, gs, rhs);
    } else {
      gw.addmm_(gs, rhs);
    }
  }
  return cl ? gw.view({u.K, u.KH, u.KW, u.C}).permute({0, 3, 1, 2})
            : gw.view({u.K, u.C, u.KH, u.KW});
}

// mkldnn::_convolution_pointwise builds its oneDNN primitive on every call (about 35 us
// measured, where the cached primitive of at::convolution costs 3 us at 1x4x4x4), so small
// outputs take the convolution + fused bias/ReLU pass instead: there the pass it would save
// costs less than that. Above this size the primitive cost is noise next to the convolution.
constexpr int64_t kPostOpMinOutput = int64_t{1} << 17;

// the output's height (d = 0) or width (d = 1)
int64_t conv_out_size(const Tensor& input, const Tensor& weight, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int d) {
  const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
  return std::max<int64_t>(0, (input.size(2 + d) + 2 * padding[d] - span) / stride[d] + 1);
}

Tensor conv2d_relu_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation, int64_t groups, bool relu) {
  check_conv_args(input, weight, bias, stride, padding, dilation, groups);
  const int64_t OH = conv_out_size(input, weight, stride, padding, dilation, 0);
  const int64_t OW = conv_out_size(input, weight, stride, padding, dilation, 1);
  const auto fmt = layout_of(input);
  Tensor out;
  if (!relu) {
    // nothing to fuse: the plain convolution already adds the bias in its epilogue
    out = at::convolution(input, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  } else if (input.size(0) * weight.size(0) * OH * OW >= kPostOpMinOutput &&
             use_onednn(input, weight, bias)) {
    out = onednn_conv(input, weight, bias, stride, padding, dilation, groups, relu);
  } else {
    out = at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                          groups);
    out = out.contiguous(fmt);
    if (out.numel() > 0) {
      FASTCONV_DISPATCH_FLOATING(out.scalar_type(), "fastconv_bias_relu", [&] {
        bias_relu_inplace<scalar_t>(out, bias, relu, fmt == at::MemoryFormat::ChannelsLast);
      });
    }
  }
  // Outputs keep the input's layout (oneDNN follows the weight's when the two disagree).
  return out.contiguous(fmt);
}

// One plane of mask_and_sum: writes g', adds its sum to acc (the first of the pair).
template <typename scalar_t>
inline void mask_sum_plane(const scalar_t* g, const scalar_t* y, scalar_t* masked, int64_t n,
                           PairSum<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  fold_pair_sums<kVectorPath<scalar_t>>(
      n, acc,
      [&](int64_t i, auto cnt) {  // generic: compiled only on the vector path
        const V gv = masked_grad(g, y, i, cnt);
        gv.store(masked + i, cnt);
        return std::pair<V, V>(gv, V(0));  // the second sum is not used
      },
      [&](int64_t i) {
        const acc_t v = relu_passes(static_cast<acc_t>(y[i])) ? static_cast<acc_t>(g[i])
                                                              : acc_t(0);
        masked[i] = static_cast<scalar_t>(v);
        return std::pair<acc_t, acc_t>(v, acc_t(0));
      });
}

// g' = g masked by the ReLU (g where output > 0 or NaN, else 0), written to masked (same
// layout), with per-channel sums of g' into gb (when not null).
template <typename scalar_t>
void mask_and_sum(const scalar_t* g, const scalar_t* y, scalar_t* masked, int64_t N, int64_t C,
                  int64_t HW, bool cl, double* gb) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!cl) {
    at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        PairSum<acc_t> acc;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * HW;
          mask_sum_plane<scalar_t>(g + off, y + off, masked + off, HW, acc);
        }
        acc.fold();
        if (gb != nullptr) gb[c] = acc.s1;
      }
    });
  } else {
    const int64_t R = N * HW;
    const int64_t chunks = chunk_count(R, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)));
    std::vector<double> part(static_cast<size_t>(chunks) * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> acc_buf(C);
      for (int64_t i = i0; i < i1; ++i) {
        auto [r0, r1] = chunk_range(R, chunks, i);
        double* dst = part.data() + i * C;
        constexpr int64_t fold_rows = kFoldChunk / 8;
        for (int64_t rb = r0; rb < r1; rb += fold_rows) {
          const int64_t re = std::min(r1, rb + fold_rows);
          acc_t* __restrict acc = acc_buf.data();
          std::fill(acc, acc + C, acc_t(0));
          for (int64_t r = rb; r < re; ++r) {
            const scalar_t* __restrict gr = g + r * C;
            const scalar_t* __restrict yr = y + r * C;
            scalar_t* __restrict mr = masked + r * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = relu_passes(yr[c]) ? static_cast<acc_t>(gr[c]) : acc_t(0);
              mr[c] = static_cast<scalar_t>(v);
              acc[c] += v;
            }
          }
          for (int64_t c = 0; c < C; ++c) dst[c] += acc[c];
        }
      }
    });
    if (gb != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t i = 0; i < chunks; ++i) t += part[i * C + c];
        gb[c] = t;
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> conv2d_relu_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& output,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    bool relu, std::array<bool, 3> output_mask) {
  check_conv_args(input, weight, std::nullopt, stride, padding, dilation, groups);
  check_4d(grad_output, "grad_output");
  check_cpu_float(grad_output, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "fastconv conv2d_relu_backward: grad_output dtype ", grad_output.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(1) == weight.size(0),
              "fastconv conv2d_relu_backward: grad_output shape ", grad_output.sizes(),
              " does not match input ", input.sizes(), " and weight ", weight.sizes());
  if (relu) {
    TORCH_CHECK(output.sizes() == grad_output.sizes() &&
                    output.scalar_type() == grad_output.scalar_type(),
                "fastconv conv2d_relu_backward: with relu=True, output must be the forward "
                "output (shape ", grad_output.sizes(), "), got ", output.sizes());
  }
  const auto in_fmt = layout_of(input);
  // work in the layout of the saved output: it is the input's layout (forward guarantees it)
  const auto fmt = relu ? layout_of(output) : in_fmt;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor g = grad_output.contiguous(fmt);
  const int64_t N = g.size(0), C = g.size(1), HW = g.size(2) * g.size(3);

  Tensor gmasked = g;
  std::vector<double> gb(output_mask[2] ? C : 0);
  // relu: one pass masks grad_output and sums grad_bias on the way. Without relu there is
  // nothing to mask and oneDNN's backward-weights pass reduces grad_bias itself.
  const bool bias_in_pass = relu && output_mask[2];
  if (relu && (output_mask[0] || output_mask[1] || output_mask[2])) {
    const Tensor y = output.contiguous(fmt);
    gmasked = poisoned(at::empty_like(g, g.options(), fmt));
    if (g.numel() > 0) {
      FASTCONV_DISPATCH_FLOATING(g.scalar_type(), "fastconv_relu_mask", [&] {
        mask_and_sum<scalar_t>(g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                     gmasked.data_ptr<scalar_t>(), N, C, HW, cl,
                                     bias_in_pass ? gb.data() : nullptr);
      });
    }
  }

  Tensor grad_input, grad_weight, grad_bias;
  bool bias_by_aten = output_mask[2] && !bias_in_pass;
  bool weight_by_aten = output_mask[1];
  if (output_mask[1] && grad_weight_by_gemm(input, weight, groups, g.size(2), g.size(3))) {
    const Unfold u(input, weight, g.size(2), g.size(3), stride, padding, dilation);
    grad_weight = grad_weight_gemm(gmasked, input, u, fmt).contiguous(layout_of(weight));
    weight_by_aten = false;  // ATen's pass below serves grad_input alone
    if (bias_by_aten) {
      grad_bias = gmasked.sum({0, 2, 3});
      bias_by_aten = false;
    }
  }
  if (output_mask[0] || weight_by_aten || bias_by_aten) {
    const std::vector<int64_t> bias_sizes{C};
    auto res = at::convolution_backward(
        gmasked, input, weight, bias_by_aten ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        stride, padding, dilation, false, {0, 0}, groups,
        {output_mask[0], weight_by_aten, bias_by_aten});
    if (output_mask[0]) grad_input = std::get<0>(res).contiguous(in_fmt);
    if (weight_by_aten) grad_weight = std::get<1>(res).contiguous(layout_of(weight));
    if (bias_by_aten) grad_bias = std::get<2>(res);
  }
  if (bias_in_pass) {
    grad_bias = poisoned(at::empty({C}, g.options()));
    write_channels(grad_bias, gb);
  }
  if (!grad_input.defined()) grad_input = empty_grad(input);
  if (!grad_weight.defined()) grad_weight = empty_grad(weight);
  if (!grad_bias.defined()) grad_bias = empty_grad(weight);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_relu_backward", &conv2d_relu_backward_cpu);
}

}  // namespace cpu
}  // namespace fastconv
