// Conv2d + bias + ReLU on CPU.
//
// Small NCHW convolutions and those of few input channels (float/double, groups 1): direct
// loops for the forward, grad_weight and (stride 1) grad_input (see "direct loops" below);
// oneDNN's fixed cost per call is most of the small ones' time, and it runs single-channel
// inputs at a fraction of its speed. Larger ones:
// Forward, float32 with finite operands: oneDNN's convolution with the ReLU as a post-op
// (mkldnn::_convolution_pointwise, the op inductor uses), so bias and ReLU are applied while the
// output tile is still in registers. Otherwise (other dtypes, NaN/inf operands, torch builds
// without that op): ATen's convolution without bias, then one fused bias + ReLU pass in place.
// Backward: one pass masks grad_output by the ReLU and sums grad_bias on the fly; ATen's
// convolution_backward then does the two matrix products on the masked gradient.
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>

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
  for (int i = 0; i < 2; ++i) {  // the direct loops index by these: checked before any of them
    TORCH_CHECK(stride[i] >= 1 && padding[i] >= 0 && dilation[i] >= 1, "fastconv conv2d_relu: "
                "stride and dilation must be positive and padding non-negative, got stride=",
                stride, " padding=", padding, " dilation=", dilation);
  }
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
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastconv_unfold", [&] {
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

// ------------------------------------------ direct loops
// oneDNN's fixed cost per call is tens of microseconds (LeNet's 2x1x28x28 -> 6 5x5 forward:
// 50 us for 0.24 M multiply-adds, 2 threads), and its kernels vectorise over blocks of 8 input
// channels, so with one input channel (the networks' first layers on grayscale images) they
// run far below the machine's peak (2x1x224x224 -> 64 3x3: 24 ms, the loops below 3.4 ms).
// Those convolutions run as plain loops in NCHW instead: each output row of KB output channels
// keeps KB x NV vectors of accumulators in registers while the input rows (padded once into a
// scratch copy, so the loops need no bounds) stream past; strided convolutions read the copy
// split into phases (see DirectGeometry), so their loads stay contiguous. grad_input is the
// same loop over grad_output with the weight flipped and its two channel axes swapped (a
// stride-1 convolution's transpose), so it shares the kernel. `auto` still measures this
// backend against torch's per shape.

// Which passes the loops serve, by multiply-adds. Measured against oneDNN (2 threads,
// float32; NOTES.md of the results, sessions 10 and 11): small passes, the forward 1.4x at
// 3.5 M (2x3x32x32 -> 64 3x3) on a Xeon, 0.9-1.0x at 7-14 M; grad_input and grad_weight
// 1.1-1.3x at 1.9 M (8x6x14x14 -> 16 5x5), 0.6-0.8x at 7 M, where grad_weight's row vectors run
// at 10-14 columns (ResNet-like 12x12 planes) half empty. One input channel at any size: the
// 7x7 stride-2 stems (2x1x96x96 -> 64) forward 2.9x, grad_weight 2.2x on an EPYC (Zen 3);
// AlexNet's 11x11 stride 4 at 224x224 1.08x / 0.99x. Two to four input channels, the forward
// up to 2^27: 1.0-1.17x (2x3x96x96 -> 64 3x3), where grad_weight, which reads grad_output
// once per input channel and kernel row, falls to 0.72x.
constexpr int64_t kDirectMaxMacs = int64_t{1} << 22;          // forward
constexpr int64_t kDirectMaxMacsBackward = int64_t{1} << 21;  // grad_input, grad_weight
constexpr int64_t kDirectFewChannels = 4;
constexpr int64_t kDirectMaxMacsFewChannels = int64_t{1} << 27;  // forward, 2-4 channels

constexpr int64_t kDirectMaxKernelWidth = 16;

// A convolution's sizes for the direct loops, and the layout of their padded input copy: each
// padded row of Wp columns is stored as sw phases of Wq = ceil(Wp / sw) columns (column j at
// j % sw * Wq + j / sw), so output columns ow, ow + 1, ... of a kernel column kw read
// consecutive elements at any stride: the input columns ow * sw + kw * dw all lie in one phase.
// With stride 1 a row is simply its Wp columns.
struct DirectGeometry {
  int64_t N, C, H, W, K, KH, KW, ph, pw, dh, dw, Hp, Wp, OH, OW;
  int64_t sh, sw, Wq, Wr;  // strides, phase length, row length (sw * Wq) in the copy
  std::array<int64_t, kDirectMaxKernelWidth> col;  // where kernel column kw starts in a row

  DirectGeometry(int64_t N_, int64_t C_, int64_t H_, int64_t W_, int64_t K_, int64_t KH_,
                 int64_t KW_, int64_t ph_, int64_t pw_, int64_t dh_, int64_t dw_, int64_t OH_,
                 int64_t OW_, int64_t sh_, int64_t sw_)
      : N(N_), C(C_), H(H_), W(W_), K(K_), KH(KH_), KW(KW_), ph(ph_), pw(pw_), dh(dh_),
        dw(dw_), Hp(H_ + 2 * ph_), Wp(W_ + 2 * pw_), OH(OH_), OW(OW_),
        sh(sh_), sw(sw_), Wq(div_up(Wp, sw_)), Wr(sw_ * Wq), col{} {
    TORCH_INTERNAL_ASSERT(KW <= kDirectMaxKernelWidth);
    for (int64_t kw = 0; kw < KW; ++kw) col[kw] = (kw * dw) % sw * Wq + (kw * dw) / sw;
  }
  int64_t plane() const { return Hp * Wr; }
};

// out[n, k, oh, ow..] for output channels k0..k0+KB and one output row, all of its columns
template <typename T, int KB, int NV>
void direct_row(const DirectGeometry& g, const T* xn, const T* w, const T* bias, bool relu,
                int64_t k0, int64_t oh, T* yn) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t R = g.KH * g.KW, CR = g.C * R, plane = g.plane();
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += NV * L) {
    V acc[KB][NV];
    for (int k = 0; k < KB; ++k) {
      for (int v = 0; v < NV; ++v) acc[k][v] = V(bias != nullptr ? bias[k0 + k] : T(0));
    }
    for (int64_t c = 0; c < g.C; ++c) {
      const T* xc = xn + c * plane + oh * g.sh * g.Wr + ow0;
      const T* wc = w + k0 * CR + c * R;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        const T* xr = xc + kh * g.dh * g.Wr;
        const T* wr = wc + kh * g.KW;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          V xv[NV];
          for (int v = 0; v < NV; ++v) xv[v] = V::loadu(xr + g.col[kw] + v * L);
          for (int k = 0; k < KB; ++k) {
            const V wv(wr[k * CR + kw]);
            for (int v = 0; v < NV; ++v) acc[k][v] = at::vec::fmadd(xv[v], wv, acc[k][v]);
          }
        }
      }
    }
    for (int k = 0; k < KB; ++k) {
      T* yr = yn + ((k0 + k) * g.OH + oh) * g.OW + ow0;
      for (int v = 0; v < NV; ++v) {
        const int64_t cnt = std::min<int64_t>(L, g.OW - ow0 - v * L);
        if (cnt <= 0) break;
        // at::vec::maximum propagates NaN, as torch.relu does
        const V out = relu ? at::vec::maximum(acc[k][v], V(T(0))) : acc[k][v];
        out.store(yr + v * L, cnt);
      }
    }
  }
}

template <typename T, int KB, int NV>
void direct_rows_of_block(const DirectGeometry& g, const T* xn, const T* w, const T* bias,
                          bool relu, int64_t k0, int64_t kb, int64_t oh, T* yn) {
  // the last block of output channels holds kb < KB of them
  if constexpr (KB > 1) {
    if (kb < KB) {
      direct_rows_of_block<T, KB - 1, NV>(g, xn, w, bias, relu, k0, kb, oh, yn);
      return;
    }
  }
  direct_row<T, KB, NV>(g, xn, w, bias, relu, k0, oh, yn);
}

// x [N, C, H, W] zero-padded to [N, C, Hp, Wp] in the copy's layout (rows of sw phases, see
// DirectGeometry), and `slack` zeros after it
template <typename T>
std::vector<T> padded_copy(const DirectGeometry& g, const T* x, int64_t slack) {
  std::vector<T> xp(static_cast<size_t>(g.N * g.C * g.plane() + slack), T(0));
  at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t h = 0; h < g.H; ++h) {
        const T* src = x + (p * g.H + h) * g.W;
        T* dst = xp.data() + (p * g.Hp + h + g.ph) * g.Wr;
        if (g.sw == 1) {
          std::copy(src, src + g.W, dst + g.pw);
        } else {
          for (int64_t j = 0; j < g.W; ++j) {
            const int64_t jp = j + g.pw;
            dst[jp % g.sw * g.Wq + jp / g.sw] = src[j];
          }
        }
      }
    }
  });
  return xp;
}

// y = relu?(conv(x, w) + bias) for groups 1 at g's strides: x [N, C, H, W] contiguous, w [K, C,
// KH, KW] contiguous, y [N, K, OH, OW] contiguous; bias null or K values.
template <typename T, int KB, int NV>
void direct_conv(const DirectGeometry& g, const T* x, const T* w, const T* bias, bool relu,
                 T* y) {
  // the last row's vector loads may run past the copy's end (those lanes are never stored)
  const std::vector<T> xp = padded_copy(g, x, NV * Vec<T>::size());
  const int64_t blocks = div_up(g.K, KB), items = g.N * blocks * g.OH;
  const int64_t per_item = KB * g.C * g.KH * g.KW * g.OW;  // multiply-adds
  at::parallel_for(0, items, grain_for(per_item / 2), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t oh = i % g.OH, b = (i / g.OH) % blocks, n = i / (g.OH * blocks);
      const int64_t k0 = b * KB;
      direct_rows_of_block<T, KB, NV>(g, xp.data() + n * g.C * g.plane(), w, bias, relu, k0,
                                      std::min<int64_t>(KB, g.K - k0), oh,
                                      y + n * g.K * g.OH * g.OW);
    }
  });
}

// Whether the direct loops serve this convolution pass (x: what it reads, NCHW; w: [K, C, KH,
// KW] in the pass's orientation; backward: a gradient pass).
bool direct_fits(const Tensor& x, const Tensor& w, int64_t groups, int64_t OH, int64_t OW,
                 bool backward) {
  const auto t = x.scalar_type();
  if (!(groups == 1 && (t == at::kFloat || t == at::kDouble) &&
        layout_of(x) == at::MemoryFormat::Contiguous && x.numel() > 0 && w.numel() > 0 &&
        OH > 0 && OW > 0 && w.size(3) <= kDirectMaxKernelWidth)) {
    return false;
  }
  const int64_t C = w.size(1), macs = x.size(0) * w.numel() * OH * OW;
  return macs <= (backward ? kDirectMaxMacsBackward : kDirectMaxMacs) || C == 1 ||
         (!backward && C <= kDirectFewChannels && macs <= kDirectMaxMacsFewChannels);
}

// relu?(conv(x, w) + bias), groups 1, padding (ph, pw) >= 0, as NCHW
Tensor direct_conv2d(const Tensor& x_, const Tensor& w_, const std::optional<Tensor>& bias,
                     c10::IntArrayRef stride, int64_t ph, int64_t pw, c10::IntArrayRef dilation,
                     int64_t OH, int64_t OW, bool relu) {
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const DirectGeometry g(x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2),
                         w.size(3), ph, pw, dilation[0], dilation[1], OH, OW, stride[0],
                         stride[1]);
  Tensor y = poisoned(at::empty({g.N, g.K, OH, OW}, x.options()));
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(x.scalar_type()).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastconv_direct_conv", [&] {
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* wd = w.const_data_ptr<scalar_t>();
    scalar_t* yd = y.data_ptr<scalar_t>();
    if (OW <= Vec<scalar_t>::size()) {
      direct_conv<scalar_t, 8, 1>(g, xd, wd, bp, relu, yd);
    } else {
      direct_conv<scalar_t, 4, 2>(g, xd, wd, bp, relu, yd);
    }
  });
  return y;
}

// grad_weight[k0..k0+KB, c, kh, :] of a convolution: each output row's grad_output vectors (KB
// of them) meet the KW shifted input vectors of the input row it read (consecutive elements of
// the padded copy at any stride, see DirectGeometry); lanes fold into double every kFoldChunk
// terms. gp is grad_output with rows padded with zeros to OWp (a whole number of vectors) and
// xp the padded input copy with OWp elements of slack, so every load is a full vector; in the
// last vector of a row the input's lanes past OW are masked off (they hold later columns or the
// next phase, and 0 * inf would be NaN).
template <typename T, int KB, int KW>
void direct_gw_item(const DirectGeometry& g, const T* xp, const T* gp, int64_t OWp, int64_t k0,
                    int64_t c, int64_t kh, T* gw) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const int64_t tiles = OWp / L, tail = g.OW - (tiles - 1) * L;
  __at_align__ T bits[L];
  for (int64_t i = 0; i < L; ++i) std::memset(&bits[i], i < tail ? 0xff : 0, sizeof(T));
  const V mask = V::loadu(bits);
  for (int64_t i = 0; i < L; ++i) std::memset(&bits[i], 0xff, sizeof(T));
  const V all = V::loadu(bits);
  const int64_t fold_rows = std::max<int64_t>(1, kFoldChunk / tiles);
  const int64_t gk = g.OH * OWp;  // from one output channel's row to the next's
  double total[KB][KW] = {};
  // one chunk of rows at a time, its accumulators local to the chunk (so they stay in
  // registers: a lambda or a later loop touching them by reference sent them to the stack)
  for (int64_t r0 = 0; r0 < g.N * g.OH; r0 += fold_rows) {
    V acc[KB][KW];
    for (int k = 0; k < KB; ++k) {
      for (int kw = 0; kw < KW; ++kw) acc[k][kw] = V(T(0));
    }
    const int64_t r1 = std::min(g.N * g.OH, r0 + fold_rows);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      const T* xr = xp + ((n * g.C + c) * g.Hp + oh * g.sh + kh * g.dh) * g.Wr;
      const T* gr = gp + ((n * g.K + k0) * g.OH + oh) * OWp;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t ow0 = t * L;
        V gv[KB];
        for (int k = 0; k < KB; ++k) gv[k] = V::loadu(gr + k * gk + ow0);
        const V m = t == tiles - 1 ? mask : all;
        for (int kw = 0; kw < KW; ++kw) {
          const V xv = V::loadu(xr + ow0 + g.col[kw]) & m;
          for (int k = 0; k < KB; ++k) acc[k][kw] = at::vec::fmadd(gv[k], xv, acc[k][kw]);
        }
      }
    }
    for (int k = 0; k < KB; ++k) {
      for (int kw = 0; kw < KW; ++kw) total[k][kw] += hsum(acc[k][kw]);
    }
  }
  const int64_t R = g.KH * g.KW;
  for (int k = 0; k < KB; ++k) {
    for (int kw = 0; kw < KW; ++kw) {
      gw[((k0 + k) * g.C + c) * R + kh * g.KW + kw] = static_cast<T>(total[k][kw]);
    }
  }
}

template <typename T, int KB, int KW>
void direct_gw_block(const DirectGeometry& g, const T* xp, const T* gp, int64_t OWp, int64_t k0,
                     int64_t kb, int64_t c, int64_t kh, T* gw) {
  if constexpr (KB > 1) {
    if (kb < KB) {
      direct_gw_block<T, KB - 1, KW>(g, xp, gp, OWp, k0, kb, c, kh, gw);
      return;
    }
  }
  direct_gw_item<T, KB, KW>(g, xp, gp, OWp, k0, c, kh, gw);
}

template <typename T, int KW>
void direct_gw(const DirectGeometry& g, const T* x, const T* gy, T* gw) {
  constexpr int KB = 4;
  constexpr int64_t L = Vec<T>::size();
  const int64_t OWp = div_up(g.OW, L) * L;
  // a row's loads run at most OWp - OW past its phase; only the last row's leave the copy
  const std::vector<T> xpv = padded_copy(g, x, OWp);
  std::vector<T> gpv(static_cast<size_t>(g.N * g.K * g.OH * OWp), T(0));
  at::parallel_for(0, g.N * g.K * g.OH, grain_for(g.OW), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::copy(gy + r * g.OW, gy + (r + 1) * g.OW, gpv.data() + r * OWp);
    }
  });
  const T* xp = xpv.data();
  const T* gp = gpv.data();
  const int64_t blocks = div_up(g.K, KB), items = blocks * g.C * g.KH;
  at::parallel_for(0, items, grain_for(KB * KW * g.N * g.OH * g.OW / 2),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t kh = i % g.KH, c = (i / g.KH) % g.C, b = i / (g.KH * g.C);
      direct_gw_block<T, KB, KW>(g, xp, gp, OWp, b * KB, std::min<int64_t>(KB, g.K - b * KB),
                                 c, kh, gw);
    }
  });
}

constexpr int64_t kDirectMaxKW = 7;

// grad_weight of a groups-1 convolution by the direct loops, or None where they do not serve
// it (g: grad_output already masked, NCHW like the input)
std::optional<Tensor> direct_grad_weight(const Tensor& g, const Tensor& input,
                                         const Tensor& weight, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                         int64_t groups) {
  if (weight.size(3) > kDirectMaxKW || !g.is_contiguous() ||
      !direct_fits(input, weight, groups, g.size(2), g.size(3), true)) {
    return std::nullopt;
  }
  const Tensor x = input.contiguous();
  const int64_t ph = padding[0], pw = padding[1];
  const DirectGeometry geo(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0),
                           weight.size(2), weight.size(3), ph, pw, dilation[0], dilation[1],
                           g.size(2), g.size(3), stride[0], stride[1]);
  Tensor gw = poisoned(at::empty({geo.K, geo.C, geo.KH, geo.KW}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastconv_direct_grad_weight", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = g.const_data_ptr<scalar_t>();
    scalar_t* out = gw.data_ptr<scalar_t>();
    switch (geo.KW) {
      case 1: direct_gw<scalar_t, 1>(geo, xp, gd, out); break;
      case 2: direct_gw<scalar_t, 2>(geo, xp, gd, out); break;
      case 3: direct_gw<scalar_t, 3>(geo, xp, gd, out); break;
      case 4: direct_gw<scalar_t, 4>(geo, xp, gd, out); break;
      case 5: direct_gw<scalar_t, 5>(geo, xp, gd, out); break;
      case 6: direct_gw<scalar_t, 6>(geo, xp, gd, out); break;
      default: direct_gw<scalar_t, 7>(geo, xp, gd, out); break;
    }
  });
  return gw;
}

// grad_input of a stride-1 convolution: the convolution of grad_output, padded by
// d * (k - 1) - p, with the weight flipped and its channel axes swapped. None when the padding
// exceeds d * (k - 1) (that transpose would crop).
std::optional<Tensor> direct_grad_input(const Tensor& g, const Tensor& weight,
                                        c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                        int64_t H, int64_t W) {
  const int64_t ph = dilation[0] * (weight.size(2) - 1) - padding[0];
  const int64_t pw = dilation[1] * (weight.size(3) - 1) - padding[1];
  if (ph < 0 || pw < 0) return std::nullopt;
  const Tensor wt = weight.flip({2, 3}).transpose(0, 1);
  const int64_t stride1[2] = {1, 1};
  if (!direct_fits(g, wt, 1, H, W, true)) return std::nullopt;
  return direct_conv2d(g, wt, std::nullopt, stride1, ph, pw, dilation, H, W, false);
}

// float16 and bfloat16 inputs are computed in float32 and rounded once: ATen's 16-bit CPU
// convolutions accumulate in 16 bits on some machines (seen on an AMD EPYC: float16 grad_input
// three times past a float accumulation's error bound, where a Xeon met it). Every pass below
// the two entry points therefore sees float or double only.
bool is_16bit(const Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
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
  if (is_16bit(input)) {
    const auto f = [](const Tensor& t) { return t.to(at::kFloat); };
    const bool has_bias = bias.has_value() && bias->defined();
    return conv2d_relu_cpu(f(input), f(weight), has_bias ? std::optional<Tensor>(f(*bias)) : bias,
                           stride, padding, dilation, groups, relu)
        .to(input.scalar_type());
  }
  const int64_t OH = conv_out_size(input, weight, stride, padding, dilation, 0);
  const int64_t OW = conv_out_size(input, weight, stride, padding, dilation, 1);
  const auto fmt = layout_of(input);
  Tensor out;
  if (direct_fits(input, weight, groups, OH, OW, false)) {
    return direct_conv2d(input, weight, bias, stride, padding[0], padding[1], dilation, OH, OW,
                         relu);
  }
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
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fastconv_bias_relu", [&] {
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
  if (is_16bit(input)) {
    const auto f = [](const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    auto [gi, gw, gb] = conv2d_relu_backward_cpu(f(grad_output), f(input), f(weight), f(output),
                                                 stride, padding, dilation, groups, relu,
                                                 output_mask);
    const auto t = input.scalar_type();
    return {gi.to(t), gw.to(t), gb.to(t)};
  }
  const int64_t OH = conv_out_size(input, weight, stride, padding, dilation, 0);
  const int64_t OW = conv_out_size(input, weight, stride, padding, dilation, 1);
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(1) == weight.size(0) &&
                  grad_output.size(2) == OH && grad_output.size(3) == OW,
              "fastconv conv2d_relu_backward: grad_output shape ", grad_output.sizes(),
              " is not the output shape of input ", input.sizes(), " and weight ", weight.sizes(),
              " with stride=", stride, " padding=", padding, " dilation=", dilation);
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
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastconv_relu_mask", [&] {
        mask_and_sum<scalar_t>(g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                     gmasked.data_ptr<scalar_t>(), N, C, HW, cl,
                                     bias_in_pass ? gb.data() : nullptr);
      });
    }
  }

  Tensor grad_input, grad_weight, grad_bias;
  bool bias_by_aten = output_mask[2] && !bias_in_pass;
  bool weight_by_aten = output_mask[1];
  bool input_by_aten = output_mask[0];
  if (output_mask[0] && groups == 1 && stride[0] == 1 && stride[1] == 1) {
    if (auto gi = direct_grad_input(gmasked, weight, padding, dilation, input.size(2),
                                    input.size(3))) {
      grad_input = gi->contiguous(in_fmt);
      input_by_aten = false;
    }
  }
  if (output_mask[1]) {
    if (auto gw = direct_grad_weight(gmasked, input, weight, stride, padding, dilation, groups)) {
      grad_weight = gw->contiguous(layout_of(weight));
      weight_by_aten = false;
    }
  }
  if (weight_by_aten && grad_weight_by_gemm(input, weight, groups, g.size(2), g.size(3))) {
    const Unfold u(input, weight, g.size(2), g.size(3), stride, padding, dilation);
    grad_weight = grad_weight_gemm(gmasked, input, u, fmt).contiguous(layout_of(weight));
    weight_by_aten = false;  // ATen's pass below serves grad_input alone
  }
  if (bias_by_aten && output_mask[1] && !weight_by_aten) {
    grad_bias = gmasked.sum({0, 2, 3});
    bias_by_aten = false;
  }
  if (input_by_aten || weight_by_aten || bias_by_aten) {
    const std::vector<int64_t> bias_sizes{C};
    auto res = at::convolution_backward(
        gmasked, input, weight, bias_by_aten ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        stride, padding, dilation, false, {0, 0}, groups,
        {input_by_aten, weight_by_aten, bias_by_aten});
    if (input_by_aten) grad_input = std::get<0>(res).contiguous(in_fmt);
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
