// avg_pool2d and adaptive_avg_pool2d on CPU: the two share one plan (per-output windows and
// divisors) and one pair of loops; only the windows differ.
#include "common.h"

#include <array>

#include <torch/library.h>

namespace fastconv {
namespace cpu {
namespace {

// An axis whose windows all have one length k, start at off + o * s and divide by k (no
// padding inside them): {k, s, off}; k = 0 when they do not.
struct Regular {
  int64_t k = 0, s = 0, off = 0;
};

Regular regular_axis(const Windows& w) {
  const int64_t n = static_cast<int64_t>(w.start.size());
  if (n == 0) return {};
  // a lone window's stride is its length: one window tiles its axis without overlap
  Regular r{w.end[0] - w.start[0], n > 1 ? w.start[1] - w.start[0] : w.end[0] - w.start[0],
            w.start[0]};
  for (int64_t o = 0; o < n; ++o) {
    if (w.start[o] != r.off + o * r.s || w.end[o] - w.start[o] != r.k || w.count[o] != r.k) {
      return {};
    }
  }
  return r.k > 0 && r.s > 0 ? r : Regular{};
}

struct AvgPlan {
  int64_t N, C, H, W, OH, OW;
  Windows wh, ww;
  int64_t divisor_override;  // 0: none
  Regular rh, rw;            // set by finish(): both regular -> the plain loops below

  void finish() {
    rh = regular_axis(wh);
    rw = regular_axis(ww);
  }
  bool regular() const { return rh.k > 0 && rw.k > 0; }

  // What output (oh, ow) divides by: divisor_override, else its windows' counts.
  template <typename acc_t>
  acc_t divisor(int64_t oh, int64_t ow) const {
    return static_cast<acc_t>(divisor_override ? divisor_override : wh.count[oh] * ww.count[ow]);
  }
};

// Whether one window is the whole plane (global average pooling: NiN's, GoogLeNet's and
// ResNet's last pool, adaptive or with kernel = input size).
inline bool whole_plane(const AvgPlan& a) {
  return a.OH == 1 && a.OW == 1 && a.rh.k == a.H && a.rw.k == a.W && a.rh.off == 0 &&
         a.rw.off == 0;
}

// Sum of n contiguous elements in eight interleaved partial sums (a vector's lanes). Through
// the window loops a plane's sum was one dependent chain of adds under per-window loop
// overhead: ResNet's global pool (2x512x3x3) took 19 us against ATen's 13, 8x1024x6x6 3x
// ATen's time; now 6 and 26 us, 0.5-0.6x ATen's (2 cores, AVX2).
template <typename scalar_t, typename acc_t>
inline acc_t contiguous_sum(const scalar_t* v, int64_t n) {
  constexpr int kLanes = 8;  // one AVX2 vector of float: the compiler packs the lane adds
  acc_t lane[kLanes] = {};
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(v[q + j]);
  }
  acc_t s = 0;
  for (; q < n; ++q) s += static_cast<acc_t>(v[q]);
  for (int j = 0; j < kLanes; j += 2) s += lane[j] + lane[j + 1];
  return s;
}

// NCHW with regular windows on both axes (LeNet's 2x2 pools, ResNet's global average): no
// per-output window or divisor lookups. Same sums, in the same order, as the general loop,
// except a whole-plane window's (contiguous_sum).
template <typename scalar_t>
void avg_fwd_regular(const scalar_t* x, scalar_t* y, const AvgPlan& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  const int64_t kh = a.rh.k, sh = a.rh.s, kw = a.rw.k, sw = a.rw.s;
  const acc_t d = a.divisor<acc_t>(0, 0);
  if (whole_plane(a)) {
    at::parallel_for(0, a.N * a.C, grain_for(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        y[p] = static_cast<scalar_t>(contiguous_sum<scalar_t, acc_t>(x + p * H * W, H * W) / d);
      }
    });
    return;
  }
  at::parallel_for(0, a.N * a.C, grain_for(OH * OW * kh * kw), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* xp = x + p * H * W + a.rh.off * W + a.rw.off;
      scalar_t* yp = y + p * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const scalar_t* top = xp + oh * sh * W;
        if (kh == 2 && kw == 2 && sw == 2) {  // constant strides: the compiler vectorises it
          const scalar_t* bottom = top + W;
          for (int64_t ow = 0; ow < OW; ++ow) {
            acc_t sum = 0;
            sum += static_cast<acc_t>(top[2 * ow]);
            sum += static_cast<acc_t>(top[2 * ow + 1]);
            sum += static_cast<acc_t>(bottom[2 * ow]);
            sum += static_cast<acc_t>(bottom[2 * ow + 1]);
            yp[oh * OW + ow] = static_cast<scalar_t>(sum / d);
          }
          continue;
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          const scalar_t* win = top + ow * sw;
          acc_t sum = 0;
          for (int64_t i = 0; i < kh; ++i) {
            for (int64_t j = 0; j < kw; ++j) sum += static_cast<acc_t>(win[i * W + j]);
          }
          yp[oh * OW + ow] = static_cast<scalar_t>(sum / d);
        }
      }
    }
  });
}

template <typename scalar_t>
void avg_fwd(const scalar_t* x, scalar_t* y, const AvgPlan& a, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, C = a.C, OH = a.OH, OW = a.OW;
  if (!cl && a.regular()) {
    avg_fwd_regular(x, y, a);
  } else if (!cl) {
    const int64_t win = div_up(H, OH) * div_up(W, OW) + 1;
    at::parallel_for(0, a.N * C, grain_for(OH * OW * win), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + p * H * W;
        scalar_t* yp = y + p * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t hs = a.wh.start[oh], he = a.wh.end[oh];
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t ws = a.ww.start[ow], we = a.ww.end[ow];
            if (hs >= he || ws >= we) {
              yp[oh * OW + ow] = scalar_t(0);
              continue;
            }
            acc_t sum = 0;
            for (int64_t ih = hs; ih < he; ++ih) {
              for (int64_t iw = ws; iw < we; ++iw) sum += static_cast<acc_t>(xp[ih * W + iw]);
            }
            yp[oh * OW + ow] = static_cast<scalar_t>(sum / a.divisor<acc_t>(oh, ow));
          }
        }
      }
    });
  } else {
    at::parallel_for(0, a.N * OH * OW, grain_for(C * 4), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc_buf(C);
      acc_t* __restrict acc = acc_buf.data();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ow = r % OW, oh = (r / OW) % OH, n = r / (OW * OH);
        const int64_t hs = a.wh.start[oh], he = a.wh.end[oh];
        const int64_t ws = a.ww.start[ow], we = a.ww.end[ow];
        scalar_t* __restrict yr = y + r * C;
        if (hs >= he || ws >= we) {
          std::fill(yr, yr + C, scalar_t(0));
          continue;
        }
        std::fill(acc, acc + C, acc_t(0));
        for (int64_t ih = hs; ih < he; ++ih) {
          for (int64_t iw = ws; iw < we; ++iw) {
            const scalar_t* __restrict xr = x + ((n * H + ih) * W + iw) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(xr[c]);
          }
        }
        const acc_t d = a.divisor<acc_t>(oh, ow);
        for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(acc[c] / d);
      }
    });
  }
}

// NCHW with regular windows that tile without overlap (kernel = stride; a lone window, as in
// global pooling, counts): each input element takes one output's share, or 0 outside every
// window.
template <typename scalar_t>
void avg_bwd_tiled(const scalar_t* go, scalar_t* gi, const AvgPlan& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  const int64_t kh = a.rh.k, kw = a.rw.k;
  const acc_t d = a.divisor<acc_t>(0, 0);
  if (whole_plane(a)) {  // each plane is its output's share: one fill
    at::parallel_for(0, a.N * a.C, grain_for(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(gi + p * H * W, gi + (p + 1) * H * W,
                  static_cast<scalar_t>(static_cast<acc_t>(go[p]) / d));
      }
    });
    return;
  }
  at::parallel_for(0, a.N * a.C, grain_for(H * W), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* gop = go + p * OH * OW;
      scalar_t* gp = gi + p * H * W;
      std::fill(gp, gp + H * W, scalar_t(0));
      for (int64_t oh = 0; oh < OH; ++oh) {
        if (kh == 2 && kw == 2) {  // constant strides: the compiler vectorises it
          scalar_t* top = gp + (a.rh.off + 2 * oh) * W + a.rw.off;
          scalar_t* bottom = top + W;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(gop[oh * OW + ow]) / d);
            top[2 * ow] = top[2 * ow + 1] = bottom[2 * ow] = bottom[2 * ow + 1] = v;
          }
          continue;
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(gop[oh * OW + ow]) / d);
          scalar_t* win = gp + (a.rh.off + oh * kh) * W + a.rw.off + ow * kw;
          for (int64_t i = 0; i < kh; ++i) std::fill(win + i * W, win + i * W + kw, v);
        }
      }
    }
  });
}

template <typename scalar_t>
void avg_bwd(const scalar_t* go, scalar_t* gi, const AvgPlan& a, bool cl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, W = a.W, C = a.C, OH = a.OH, OW = a.OW;
  if (!cl && a.regular() && a.rh.k == a.rh.s && a.rw.k == a.rw.s) {
    avg_bwd_tiled(go, gi, a);
  } else if (!cl) {
    at::parallel_for(0, a.N * C, grain_for(H * W + OH * OW * 4), [&](int64_t p0, int64_t p1) {
      // accumulate in acc_t so half/bfloat16 gradients do not round at every overlap
      std::vector<acc_t> buf(H * W);
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(buf.begin(), buf.end(), acc_t(0));
        const scalar_t* gop = go + p * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t hs = a.wh.start[oh], he = a.wh.end[oh];
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t ws = a.ww.start[ow], we = a.ww.end[ow];
            if (hs >= he || ws >= we) continue;
            const acc_t v = static_cast<acc_t>(gop[oh * OW + ow]) / a.divisor<acc_t>(oh, ow);
            for (int64_t ih = hs; ih < he; ++ih) {
              for (int64_t iw = ws; iw < we; ++iw) buf[ih * W + iw] += v;
            }
          }
        }
        scalar_t* gp = gi + p * H * W;
        for (int64_t q = 0; q < H * W; ++q) gp[q] = static_cast<scalar_t>(buf[q]);
      }
    });
  } else {
    const int64_t slab = cl_slab(a.N, C), slabs = div_up(C, slab);
    at::parallel_for(0, a.N * slabs, grain_for((H * W + OH * OW * 4) * std::min(C, slab)),
                     [&](int64_t t0, int64_t t1) {
      const int64_t S = std::min(C, slab);
      std::vector<acc_t> buf(H * W * S);
      std::vector<acc_t> val(S);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / slabs, c0 = (t % slabs) * slab, c1 = std::min(C, c0 + slab);
        const int64_t len = c1 - c0;
        std::fill(buf.begin(), buf.end(), acc_t(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t hs = a.wh.start[oh], he = a.wh.end[oh];
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t ws = a.ww.start[ow], we = a.ww.end[ow];
            if (hs >= he || ws >= we) continue;
            const acc_t d = a.divisor<acc_t>(oh, ow);
            const scalar_t* gor = go + ((n * OH + oh) * OW + ow) * C + c0;
            for (int64_t c = 0; c < len; ++c) val[c] = static_cast<acc_t>(gor[c]) / d;
            for (int64_t ih = hs; ih < he; ++ih) {
              for (int64_t iw = ws; iw < we; ++iw) {
                acc_t* __restrict br = buf.data() + (ih * W + iw) * S;
                const acc_t* __restrict vr = val.data();
                for (int64_t c = 0; c < len; ++c) br[c] += vr[c];
              }
            }
          }
        }
        for (int64_t q = 0; q < H * W; ++q) {
          scalar_t* gr = gi + ((n * H * W) + q) * C + c0;
          const acc_t* br = buf.data() + q * S;
          for (int64_t c = 0; c < len; ++c) gr[c] = static_cast<scalar_t>(br[c]);
        }
      }
    });
  }
}

// One pass of the average pool into a new tensor of `size` in the layout of `src`;
// kernel(src, dst, channels_last) fills it.
template <class Kernel>
Tensor run_avg(const Tensor& src, std::array<int64_t, 4> size, const Kernel& kernel) {
  const auto fmt = layout_of(src);
  const Tensor s = src.contiguous(fmt);
  Tensor dst = poisoned(at::empty(size, s.options().memory_format(fmt)));
  if (dst.numel() == 0) return dst;
  kernel(s, dst, fmt == at::MemoryFormat::ChannelsLast);
  return dst;
}

Tensor run_avg_fwd(const Tensor& input, AvgPlan& plan) {
  return run_avg(input, {plan.N, plan.C, plan.OH, plan.OW},
                 [&](const Tensor& x, Tensor& y, bool cl) {
    FASTCONV_DISPATCH_FLOATING(x.scalar_type(), "fastconv_avg_pool", [&] {
      avg_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), plan, cl);
    });
  });
}

Tensor run_avg_bwd(const Tensor& grad_output, AvgPlan& plan) {
  return run_avg(grad_output, {plan.N, plan.C, plan.H, plan.W},
                 [&](const Tensor& go, Tensor& gi, bool cl) {
    FASTCONV_DISPATCH_FLOATING(go.scalar_type(), "fastconv_avg_pool_backward", [&] {
      avg_bwd<scalar_t>(go.const_data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), plan, cl);
    });
  });
}

AvgPlan avg_plan(c10::IntArrayRef in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                 c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                 std::optional<int64_t> divisor_override, const char* op) {
  check_window(kernel_size, stride, padding, std::nullopt, op);
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, "fastconv ", op,
              ": divisor_override must be non-zero");
  AvgPlan p{};
  p.N = in[0];
  p.C = in[1];
  p.H = in[2];
  p.W = in[3];
  p.OH = pooled_size(p.H, kernel_size[0], padding[0], stride[0], 1, ceil_mode);
  p.OW = pooled_size(p.W, kernel_size[1], padding[1], stride[1], 1, ceil_mode);
  TORCH_CHECK(p.OH > 0 && p.OW > 0, "fastconv ", op, ": output size is too small (", p.OH, "x",
              p.OW, ") for input ", in, " with kernel_size=", kernel_size, " stride=", stride,
              " padding=", padding);
  p.wh = avg_windows(p.H, p.OH, kernel_size[0], stride[0], padding[0], count_include_pad);
  p.ww = avg_windows(p.W, p.OW, kernel_size[1], stride[1], padding[1], count_include_pad);
  p.divisor_override = divisor_override.value_or(0);
  p.finish();
  return p;
}

AvgPlan adaptive_plan(c10::IntArrayRef in, c10::IntArrayRef output_size, const char* op) {
  check_pair(output_size, "output_size");
  TORCH_CHECK(output_size[0] > 0 && output_size[1] > 0, "fastconv ", op,
              ": output_size must be positive, got ", output_size);
  AvgPlan p{};
  p.N = in[0];
  p.C = in[1];
  p.H = in[2];
  p.W = in[3];
  TORCH_CHECK(p.H > 0 && p.W > 0, "fastconv ", op, ": input spatial size must be positive, got ",
              in);
  p.OH = output_size[0];
  p.OW = output_size[1];
  p.wh = adaptive_windows(p.H, p.OH);
  p.ww = adaptive_windows(p.W, p.OW);
  p.divisor_override = 0;
  p.finish();
  return p;
}

Tensor avg_pool2d_cpu(const Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                      std::optional<int64_t> divisor_override) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  AvgPlan p = avg_plan(input.sizes(), kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override, "avg_pool2d");
  return run_avg_fwd(input, p);
}

Tensor avg_pool2d_backward_cpu(const Tensor& grad_output, c10::IntArrayRef input_size,
                               c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
  check_4d(grad_output, "grad_output");
  check_cpu_float(grad_output, "grad_output");
  const auto in = full_input_size(input_size, grad_output, "avg_pool2d_backward");
  AvgPlan p = avg_plan(in, kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override, "avg_pool2d_backward");
  TORCH_CHECK(grad_output.size(2) == p.OH && grad_output.size(3) == p.OW,
              "fastconv avg_pool2d_backward: grad_output shape ", grad_output.sizes(),
              " does not match the pooled size (", p.OH, ", ", p.OW, ") of input ", in);
  return run_avg_bwd(grad_output, p);
}

Tensor adaptive_avg_pool2d_cpu(const Tensor& input, c10::IntArrayRef output_size) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  AvgPlan p = adaptive_plan(input.sizes(), output_size, "adaptive_avg_pool2d");
  return run_avg_fwd(input, p);
}

Tensor adaptive_avg_pool2d_backward_cpu(const Tensor& grad_output, c10::IntArrayRef input_size) {
  check_4d(grad_output, "grad_output");
  check_cpu_float(grad_output, "grad_output");
  const auto in = full_input_size(input_size, grad_output, "adaptive_avg_pool2d_backward");
  AvgPlan p = adaptive_plan(in, {grad_output.size(2), grad_output.size(3)},
                            "adaptive_avg_pool2d_backward");
  return run_avg_bwd(grad_output, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("avg_pool2d", &avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cpu);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_cpu);
  m.impl("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward_cpu);
}

}  // namespace cpu
}  // namespace fastconv
