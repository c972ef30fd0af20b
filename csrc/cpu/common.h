// Helpers shared by the CPU kernels: layouts, pooling geometry, chunked reductions.
#pragma once

#include "../poison.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastconv {
namespace cpu {

using at::Tensor;

// Every op serves these dtypes on CPU: float32/float64 are the optimised paths; half and
// bfloat16 go through the same templates with float accumulation.
#define FASTCONV_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline bool is_channels_last(const Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat layout_of(const Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_4d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastconv: expected 4-D ", name, " (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
}

inline void check_pair(c10::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, "fastconv: ", name, " must have 2 elements, got ", v.size());
}

// The pooling window arguments: the pairs, then per dimension kernel_size, stride (dilation) and
// padding. Without dilation (the average pools) padding may be half the kernel, with it half the
// effective (dilated) kernel, as torch allows.
inline void check_window(c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, std::optional<c10::IntArrayRef> dilation,
                         const char* op) {
  check_pair(kernel_size, "kernel_size");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  if (dilation) check_pair(*dilation, "dilation");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] > 0, "fastconv ", op, ": kernel_size must be positive, got ",
                kernel_size);
    TORCH_CHECK(stride[i] > 0, "fastconv ", op, ": stride must be positive, got ", stride);
    if (!dilation) {
      TORCH_CHECK(padding[i] >= 0 && padding[i] <= kernel_size[i] / 2, "fastconv ", op,
                  ": pad should be at least 0 and at most half of kernel size, got padding=",
                  padding, " kernel_size=", kernel_size);
      continue;
    }
    const c10::IntArrayRef d = *dilation;
    TORCH_CHECK(d[i] > 0, "fastconv ", op, ": dilation must be positive, got ", d);
    TORCH_CHECK(padding[i] >= 0 && padding[i] <= (d[i] * (kernel_size[i] - 1) + 1) / 2,
                "fastconv ", op, ": padding should be at least 0 and at most half of the "
                "effective kernel size, got padding=", padding, " kernel_size=", kernel_size,
                " dilation=", d);
  }
}

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): two runtime flags become template
// arguments once, outside the loops, so each kernel variant compiles branch-free.
template <class F>
void with_flags(bool a, bool b, const F& f) {
  if (a) {
    b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

inline void check_cpu_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastconv: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "fastconv: ", name, " must be floating point, got ", t.scalar_type());
}

// Output length of a pooling window sweep, exactly torch's rule (ATen/native/Pool.h): with
// ceil_mode the last window may hang over the end but must start inside the input or the
// left padding.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil,
                           bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (num may be negative for a window larger than the padded input)
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) {
    --out;
  }
  return out;
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// relu that keeps NaN (torch.relu(nan) is nan): (v < 0) ? 0 : v, which compilers lower to a
// max instruction with the operand order that returns v for NaN.
template <typename T>
inline T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;
}

// torch's relu backward is threshold_backward: the gradient is dropped where the saved output
// is <= 0 and passes everywhere else, including where the output is NaN.
template <typename T>
inline bool relu_passes(T out) {
  return !(out <= T(0));
}

// Explicit SIMD through at::vec: the build defines CPU_CAPABILITY_AVX512/AVX2 to match torch's
// runtime choice, so Vec<float> is one zmm/ymm register. (GCC 12 turned the plain
// "float acc[16]" lane-array reductions into stack traffic: 5x slower, measured.)
template <typename T>
using Vec = at::vec::Vectorized<T>;

// float/double take the explicit vector paths; half/bfloat16 the scalar templates
template <typename scalar_t>
constexpr bool kVectorPath = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

template <typename T>
inline double hsum(const Vec<T>& v) {
  __at_align__ T buf[Vec<T>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += buf[i];
  return s;
}

// Long float sums lose accuracy; accumulate at most this many terms per lane in the
// accumulation type before folding the lane sums into double.
constexpr int64_t kFoldChunk = 2048;

// Two running sums kept in vector registers across the many short planes of one channel
// (3x3 to 48x48 at batch 8), folded into double every ~kFoldChunk elements and at the end.
// Folding per plane instead costs two horizontal sums per 9-element plane: measured 1.4x
// slower at 3x3. Lanes beyond a multiple of the vector width go to the scalar pair t1/t2.
template <typename acc_t>
struct PairSum {
  Vec<acc_t> a0{acc_t(0)}, a1{acc_t(0)}, b0{acc_t(0)}, b1{acc_t(0)};
  acc_t t1 = 0, t2 = 0;
  int64_t pending = 0;
  double s1 = 0, s2 = 0;

  void added(int64_t n) {
    pending += n;
    if (pending >= kFoldChunk) fold();
  }
  void fold() {
    s1 += hsum(a0 + a1) + static_cast<double>(t1);
    s2 += hsum(b0 + b1) + static_cast<double>(t2);
    a0 = a1 = b0 = b1 = Vec<acc_t>(acc_t(0));
    t1 = t2 = 0;
    pending = 0;
  }
};

// g masked by the ReLU on the saved output y, lanes [i, i + cnt) (lanes past cnt load 0):
// threshold_backward's rule, dropped where y <= 0 and passed where y is NaN.
template <typename T>
inline Vec<T> masked_grad(const T* g, const T* y, int64_t i, int64_t cnt = Vec<T>::size()) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(Vec<T>::loadu(g + i, cnt), zero, Vec<T>::loadu(y + i, cnt) <= zero);
}

// Adds u and u * v over [0, n) to acc's two sums. vec(i, cnt) gives the vector pair (u, v) of
// lanes [i, i + cnt), cnt = a whole vector except at the end of a chunk (u must be 0 past
// cnt; a generic lambda, so that it is compiled only where VEC holds); one(i) gives the pair
// of element i, for types without a vector path. Two accumulator
// pairs hide the add latency; sums fold into double every kFoldChunk elements.
template <bool VEC, typename acc_t, typename VecPair, typename OnePair>
inline void fold_pair_sums(int64_t n, PairSum<acc_t>& acc, VecPair vec, OnePair one) {
  for (int64_t base = 0; base < n; base += kFoldChunk) {
    const int64_t stop = std::min(n, base + kFoldChunk);
    int64_t i = base;
    if constexpr (VEC) {
      constexpr int64_t L = Vec<acc_t>::size();
      for (; i + 2 * L <= stop; i += 2 * L) {
        const auto [u0, v0] = vec(i, L);
        const auto [u1, v1] = vec(i + L, L);
        acc.a0 += u0;
        acc.a1 += u1;
        acc.b0 = at::vec::fmadd(u0, v0, acc.b0);
        acc.b1 = at::vec::fmadd(u1, v1, acc.b1);
      }
      // the rest, and planes shorter than a vector (3x3 to 7x7), with masked loads
      for (; i < stop; i += L) {
        const auto [u, v] = vec(i, std::min<int64_t>(L, stop - i));
        acc.a0 += u;
        acc.b0 = at::vec::fmadd(u, v, acc.b0);
      }
    }
    for (; i < stop; ++i) {
      const auto [u, v] = one(i);
      acc.t1 += u;
      acc.t2 += u * v;
    }
    acc.added(stop - base);
  }
}

// Splits [0, n) into at most at::get_num_threads() contiguous chunks of at least min_len
// items; returns the chunk count. Reductions keep one partial per chunk (not per thread) and
// combine them in a fixed order, so results do not depend on scheduling.
inline int64_t chunk_count(int64_t n, int64_t min_len) {
  const int64_t by_size = std::max<int64_t>(1, n / std::max<int64_t>(1, min_len));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
}

inline std::pair<int64_t, int64_t> chunk_range(int64_t n, int64_t chunks, int64_t i) {
  const int64_t per = div_up(n, chunks);
  const int64_t b = std::min(n, i * per);
  return {b, std::min(n, b + per)};
}

// Grain (in items) for at::parallel_for so that each task does about 32K elementary steps.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// Per-axis pooling windows for the average pools: output o reads input [start, end) and
// contributes `count` to the divisor (the divisor is count_h * count_w unless overridden).
struct Windows {
  std::vector<int64_t> start, end, count;
};

inline Windows avg_windows(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad,
                           bool count_include_pad) {
  Windows w;
  w.start.resize(out);
  w.end.resize(out);
  w.count.resize(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t s = o * stride - pad;
    int64_t e = std::min(s + k, in + pad);
    const int64_t padded = e - s;
    s = std::max<int64_t>(s, 0);
    e = std::min(e, in);
    w.start[o] = s;
    w.end[o] = std::max(e, s);
    w.count[o] = count_include_pad ? padded : std::max<int64_t>(e - s, 0);
  }
  return w;
}

inline Windows adaptive_windows(int64_t in, int64_t out) {
  Windows w;
  w.start.resize(out);
  w.end.resize(out);
  w.count.resize(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t s = (o * in) / out;                   // floor(o * in / out)
    const int64_t e = ((o + 1) * in + out - 1) / out;   // ceil((o + 1) * in / out)
    w.start[o] = s;
    w.end[o] = e;
    w.count[o] = e - s;
  }
  return w;
}

inline Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

// Per-channel parameters (C elements, any floating dtype and stride) read into doubles and
// written back without creating tensors: at batch 8 and 3x3 spatial size a dozen tiny ATen
// ops cost as much as the kernel itself.
inline std::vector<double> read_channels(const std::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!t.has_value() || !t->defined()) return v;
  const int64_t st = t->stride(0);
  FASTCONV_DISPATCH_FLOATING(t->scalar_type(), "fastconv_read_channels", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(p[c * st]);
  });
  return v;
}

inline void write_channels(const Tensor& t, const std::vector<double>& v) {
  const int64_t st = t.stride(0), C = t.size(0);
  FASTCONV_DISPATCH_FLOATING(t.scalar_type(), "fastconv_write_channels", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c * st] = static_cast<scalar_t>(v[c]);
  });
}

// Channels-last pooling backward tasks: (image, channel slab). With at least as many images as
// threads a slab is all channels (contiguous zeroing, long inner loops); otherwise channels are
// split so every thread has work.
inline int64_t cl_slab(int64_t N, int64_t C) {
  const int64_t per_image = div_up(at::get_num_threads(), std::max<int64_t>(N, 1));
  return per_image <= 1 ? C : std::max<int64_t>(16, div_up(div_up(C, per_image), 16) * 16);
}

// Sizes of the input a pooling backward op reconstructs: (N, C, H, W), or (H, W) with N, C
// taken from grad_output.
inline std::vector<int64_t> full_input_size(c10::IntArrayRef input_size, const Tensor& grad_output,
                                            const char* op) {
  TORCH_CHECK(input_size.size() == 4 || input_size.size() == 2, "fastconv ", op,
              ": input_size must be (N, C, H, W) or (H, W), got ", input_size);
  if (input_size.size() == 2) {
    return {grad_output.size(0), grad_output.size(1), input_size[0], input_size[1]};
  }
  TORCH_CHECK(input_size[0] == grad_output.size(0) && input_size[1] == grad_output.size(1),
              "fastconv ", op, ": input_size ", input_size, " does not match grad_output ",
              grad_output.sizes(), " in batch and channels");
  return input_size.vec();
}

}  // namespace cpu
}  // namespace fastconv
