// Shared helpers of fastconv's CUDA kernels: launch checks, the current stream, dtype
// conversion, vector access, and a 32-bit magic-number divider.
#pragma once

#include "../poison.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace fastconv_cuda {

using fastconv::poisoned;

// Device helpers that the CPU emulation of the kernels' index logic also compiles.
#define FC_HD __host__ __device__ __forceinline__

// Thread index inside device code; the host emulation sets fc_emu_tid instead.
inline int fc_emu_tid = 0;
#ifdef __CUDA_ARCH__
#define FC_TID() int(threadIdx.x)
#else
#define FC_TID() fc_emu_tid
#endif

// Every launch goes on the caller's current stream and is checked right away.
#define FC_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp16/bf16/fp32 compute in float, fp64 in double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> FC_HD typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <typename T> FC_HD T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}

template <typename A> FC_HD bool is_nan(A v) { return v != v; }

// relu that keeps NaN (as torch.relu does).
template <typename A> FC_HD A relu_nan(A v) {
  return (v > A(0) || is_nan(v)) ? v : A(0);
}

template <typename A> FC_HD A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// N elements of T moved as one aligned access (16 bytes for the fast paths).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N> FC_HD Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N> FC_HD void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// q = n / d for 0 <= n < 2^31 with a multiply-high and a shift instead of a division
// (a 32-bit division costs ~20 instructions, which the memory-bound kernels cannot afford).
struct FastDiv {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t divisor) {
    TORCH_CHECK(divisor >= 1 && divisor < (int64_t(1) << 31), "fastconv: bad divisor ", divisor);
    d = static_cast<uint32_t>(divisor);
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    uint32_t t = __umulhi(n, mul);
#else
    uint32_t t = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (t + n) >> shift;
  }
  __host__ __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * d;
  }
};

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastconv (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastconv (CUDA): expected 4D ", name, ", got ", t.dim(), "D ",
              t.sizes());
}

// The memory format an output of `t` keeps: channels_last when `t` is, else contiguous.
inline at::MemoryFormat out_format(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Batches above grid.y's 65535 limit are launched in slices of this many images.
constexpr int64_t kMaxGridY = 65535;

}  // namespace fastconv_cuda
