// Conv2d + bias + ReLU on CUDA: forward, grad_input, grad_weight, grad_bias.
//
// Every pass is one implicit GEMM.
//   forward   rows = output pixels (n, p, q)  cols = output channels   reduce over (r, s, c)
//   dgrad     rows = input pixels (n, h, w)   cols = input channels    reduce over (r, s, k)
//   wgrad     rows = output channels          cols = (r, s, c)         reduce over (n, p, q)
// 16-bit inputs run on tensor cores with fp32 accumulators:
//   * channels % 8 == 0 (every layer but a network's first): the large-tile kernel of
//     conv2d_relu_tc.cuh, 256x128 or 128x128 tiles, 64-deep k-tiles, 16-byte cp.async loaders, a
//     4-stage ring, ldmatrix and mma.sync; on sm_90a builds (TORCH_CUDA_ARCH_LIST with 9.0a) the forward
//     runs the same tile on Hopper's wgmma instead. The backward first masks grad_output by the
//     ReLU in one pass (which also sums grad_bias); grad_input of a stride-1 conv is then the
//     forward kernel on that gradient with flipped, transposed weights, and grad_weight an
//     MN-major GEMM (ldmatrix.trans) split over CTAs into a float workspace.
//   * otherwise (C = 1 or 3 first layers, odd channel counts, strided grad_input) the 128x128x32
//     mma_gemm_kernel with register-staged gather loaders.
// float32/float64 (and 16-bit on pre-sm_80 devices) use a SIMT tile kernel over the same gather
// descriptions. Split reductions (grad_weight workspace, grad_bias partials) are summed by a
// second kernel in a fixed order: deterministic, no atomics anywhere.
#include "conv2d_relu_kernels.cuh"
#include "conv2d_relu_plan.h"
#include "conv2d_relu_tc.cuh"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace fastconv_cuda {
namespace {

using at::Tensor;
using namespace convk;
using plan::TcConv;
using plan::Tile;


// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

// One BK=32 slice of the 128x128 tile: warp (wm, wn) owns rows wm*64.. and cols wn*32..
template <typename T>
__device__ __forceinline__ void mma_slice(const uint16_t* sA, const uint16_t* sB,
                                          float (&acc)[4][4][4], int wm, int wn, int lane) {
#pragma unroll
  for (int k16 = 0; k16 < 2; ++k16) {
    uint32_t a[4][4], b[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], sA + a_frag_off(wm, i, k16, lane));
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      uint32_t r[4];
      ldmatrix_x4(r, sB + b_frag_off(wn, jj, k16, lane));
      b[jj * 2][0] = r[0];
      b[jj * 2][1] = r[1];
      b[jj * 2 + 1][0] = r[2];
      b[jj * 2 + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Mma<T>::run(acc[i][j], a[i], b[j][0], b[j][1]);
  }
}

template <typename T, class LA, class LB, class Epi>
__global__ void __launch_bounds__(THREADS, 2)
    mma_gemm_kernel(LA la, LB lb, const Epi epi, const Sched sc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // 3 stages x (A + B) x 128 x 32 halves = 48 KiB; reused by the epilogue (34 KiB).
  __shared__ __align__(128) uint16_t smem[STAGES * (BM + BN) * BK];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  // Column tiles vary fastest so that CTAs running together share their A rows in L2.
  const int tn = blockIdx.x % sc.tiles_n, tm = blockIdx.x / sc.tiles_n;
  const int grp = blockIdx.z / sc.splits, split = blockIdx.z % sc.splits;
  const int kt0 = split * sc.kt_per_split;
  const int nkt = max(0, min(sc.kt_total, kt0 + sc.kt_per_split) - kt0);
  la.init(tm * BM, grp, kt0, tid);
  lb.init(tn * BN, grp, kt0, tid);
  auto sA = [&](int s) { return smem + s * (BM * BK); };
  auto sB = [&](int s) { return smem + STAGES * BM * BK + s * (BN * BK); };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkt) {
      la.issue(sA(s));
      lb.issue(sB(s));
      la.store(sA(s));
      lb.store(sB(s));
    }
    cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` visible to all; everyone is done with tile it-1's stage
    const int nx = it + STAGES - 1, st = nx % STAGES;
    if (nx < nkt) {
      la.issue(sA(st));
      lb.issue(sB(st));
    }
    cp_async_commit();
    mma_slice<T>(sA(it % STAGES), sB(it % STAGES), acc, wm, wn, lane);
    if (nx < nkt) {  // register-staged loads land after the math has hidden their latency
      la.store(sA(st));
      lb.store(sB(st));
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  epi.stage(acc, smem, tm * BM, tn * BN, grp, split, wm, wn, lane);
  __syncthreads();
  epi.flush(smem, tm * BM, tn * BN, grp, tid);
#else
  __trap();  // host code never launches this below sm_80
#endif
}

// ----------------------------------------------------------------------------------------------
// Large-tile tensor-core GEMM (conv2d_relu_tc.cuh): BM x BN x 64 tiles, 8 warps, cp.async ring of
// C::STAGES tiles in dynamic shared memory, one barrier per k-tile.
// ----------------------------------------------------------------------------------------------

// One 64-deep k-tile: 4 steps of k16, each ldmatrix.x4 per A fragment and per pair of B
// fragments, then MI x NI mma. AK/BKM: operand tile is K-major (else MN-major, read .trans).
template <typename T, class C, bool AK, bool BKM>
__device__ __forceinline__ void tc_tile_math(const uint16_t* sA, const uint16_t* sB,
                                             float (&acc)[C::MI][C::NI][4], int wm, int wn,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < tc::BK / 16; ++kk) {
    uint32_t a[C::MI][4], b[C::NI][2];
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi) tc::ldsm<!AK>(a[mi], sA + tc::a_off<C, AK>(wm, mi, kk, lane));
#pragma unroll
    for (int nj = 0; nj < C::NI / 2; ++nj) {
      uint32_t r[4];
      tc::ldsm<!BKM>(r, sB + tc::b_off<C, BKM>(wn, nj, kk, lane));
      b[2 * nj][0] = r[0];
      b[2 * nj][1] = r[1];
      b[2 * nj + 1][0] = r[2];
      b[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni) Mma<T>::run(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
  }
}

template <typename T, class C, bool AK, bool BKM, class LA, class LB, class Epi>
__global__ void __launch_bounds__(C::THREADS, C::MIN_CTAS)
    tc_gemm_kernel(LA la, LB lb, const Epi epi, const Sched sc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint16_t tc_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WARPS_M, wn = warp / C::WARPS_M;
  // Column tiles vary fastest: the CTAs resident together share their A rows (pixels) in L2.
  const int tn = blockIdx.x % sc.tiles_n, tm = blockIdx.x / sc.tiles_n;
  const int grp = blockIdx.z / sc.splits, split = blockIdx.z % sc.splits;
  const int kt0 = split * sc.kt_per_split;
  const int nkt = max(0, min(sc.kt_total, kt0 + sc.kt_per_split) - kt0);
  la.init(tm * C::BM, grp, kt0, tid);
  lb.init(tn * C::BN, grp, kt0, tid);
  uint16_t* const sA = tc_smem;
  uint16_t* const sB = tc_smem + C::STAGES * C::A_STAGE;

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int st = 0; st < C::STAGES - 1; ++st) {
    if (st < nkt) {
      la.issue(sA + st * C::A_STAGE);
      lb.issue(sB + st * C::B_STAGE);
    }
    convk::cp_async_commit();
  }
  int rd = 0, wr = C::STAGES - 1;
  for (int it = 0; it < nkt; ++it) {
    convk::cp_async_wait<C::STAGES - 2>();
    // tile `it` is visible to all; every warp is done with the stage refilled below (tile it-1)
    __syncthreads();
    if (it + C::STAGES - 1 < nkt) {
      la.issue(sA + wr * C::A_STAGE);
      lb.issue(sB + wr * C::B_STAGE);
    }
    convk::cp_async_commit();
    tc_tile_math<T, C, AK, BKM>(sA + rd * C::A_STAGE, sB + rd * C::B_STAGE, acc, wm, wn, lane);
    rd = rd + 1 == C::STAGES ? 0 : rd + 1;
    wr = wr + 1 == C::STAGES ? 0 : wr + 1;
  }
  if constexpr (std::is_same<Epi, tc::EpiPart>::value) {
    epi.template stage<C>(acc, tm * C::BM, tn * C::BN, grp, split, wm, wn, lane);
  } else {
    convk::cp_async_wait<0>();
    __syncthreads();  // the staging area reuses the ring
    epi.template stage<C>(acc, tc_smem, tn * C::BN, grp, wm, wn, lane);
    __syncthreads();
    epi.template flush<C>(tc_smem, tm * C::BM, tn * C::BN, grp, tid);
  }
#else
  __trap();  // host code never launches this below sm_80
#endif
}

// ----------------------------------------------------------------------------------------------
// Hopper (sm_90a) warpgroup-MMA forward: the Big tile's loaders and shared layout, wgmma reading
// both operands from shared memory. 4-stage cp.async ring refilled 2 tiles ahead, so that the
// wgmma group of the previous tile may still run while the next is issued (wait_group 1).
// ----------------------------------------------------------------------------------------------

__global__ void wgmma_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

template <typename T, class LA, class LB>
__global__ void __launch_bounds__(256, 1)
    wg_gemm_kernel(LA la, LB lb, const tc::EpiOut<T> epi, const Sched sc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = tc::Big;
  constexpr int S = tc::WG_STAGES;
  extern __shared__ __align__(128) uint16_t tc_smem[];
  // 128-byte swizzle atoms must start on 1024-byte boundaries
  const uint32_t raw = convk::smem_addr(tc_smem);
  uint16_t* const base = tc_smem + ((((raw + 1023u) & ~1023u) - raw) >> 1);
  uint16_t* const sA = base;
  uint16_t* const sB = base + S * C::A_STAGE;
  const uint32_t sA_addr = convk::smem_addr(sA), sB_addr = convk::smem_addr(sB);
  const int tid = threadIdx.x, wg = tid >> 7;
  const int tn = blockIdx.x % sc.tiles_n, tm = blockIdx.x / sc.tiles_n;
  const int grp = blockIdx.z;
  const int nkt = sc.kt_total;
  la.init(tm * C::BM, grp, 0, tid);
  lb.init(tn * C::BN, grp, 0, tid);

  float acc[2][64];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;

#pragma unroll
  for (int st = 0; st < S - 2; ++st) {
    if (st < nkt) {
      la.issue(sA + st * C::A_STAGE);
      lb.issue(sB + st * C::B_STAGE);
    }
    convk::cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    convk::cp_async_wait<S - 3>();
    tc::fence_proxy_async();
    // tile `it` visible to every warpgroup; all finished tile it-2's wgmma (wait_group 1 below)
    __syncthreads();
    if (it + S - 2 < nkt) {
      const int st = (it + S - 2) % S;
      la.issue(sA + st * C::A_STAGE);
      lb.issue(sB + st * C::B_STAGE);
    }
    convk::cp_async_commit();
    const int rd = it % S;
    const uint32_t a0 = sA_addr + uint32_t(rd * C::A_STAGE + wg * 128 * tc::BK) * 2;
    const uint32_t b0 = sB_addr + uint32_t(rd * C::B_STAGE) * 2;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 64; ++i) tc::wg_fence_operand(acc[h][i]);
    tc::wg_fence();
#pragma unroll
    for (int kk = 0; kk < tc::BK / 16; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        tc::Wgmma<T>::run(acc[h], tc::wg_desc(a0 + uint32_t(h * 64 * tc::BK * 2 + kk * 32)),
                          tc::wg_desc(b0 + uint32_t(kk * 32)));
    tc::wg_commit();
    tc::wg_wait<1>();
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 64; ++i) tc::wg_fence_operand(acc[h][i]);
  }
  tc::wg_wait<0>();
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) tc::wg_fence_operand(acc[h][i]);
  convk::cp_async_wait<0>();
  __syncthreads();  // the staging area reuses the ring
  epi.stage_wg(acc, base, tn * C::BN, grp, tid);
  __syncthreads();
  epi.template flush<C>(base, tm * C::BM, tn * C::BN, grp, tid);
#else
  __trap();  // launched only where wgmma_probe_kernel found sm_90a code
#endif
}

// ----------------------------------------------------------------------------------------------
// ReLU mask + grad_bias partials: one pass over channels_last grad_output (and the saved output)
// writing the masked gradient that the tensor-core backward kernels stream with cp.async.
// Block (K/8 channel groups) x (pixel lanes); per-block channel sums combined in fixed order.
// ----------------------------------------------------------------------------------------------

template <typename T, bool RELU, bool WRITE, bool SUM>
__global__ void __launch_bounds__(256) mask_bias_kernel(const T* __restrict__ dy,
                                                        const T* __restrict__ y,
                                                        T* __restrict__ dym, int64_t M, int K,
                                                        int64_t per_block, float* __restrict__ part) {
  __shared__ float red[256 * 8];
  tc::mask_bias_thread<T, RELU, WRITE, SUM>(dy, y, dym, M, K, per_block, blockIdx.x, threadIdx.x,
                                            threadIdx.y, blockDim.x, blockDim.y, red);
  if (SUM) {
    __syncthreads();
    if (threadIdx.y == 0) tc::mask_bias_sum(red, blockDim.x, blockDim.y, threadIdx.x, part, blockIdx.x, K);
  }
}

// ----------------------------------------------------------------------------------------------
// SIMT GEMM: 64x64x16 tiles, 4x4 outputs per thread, accumulation in Acc<T>.
// ----------------------------------------------------------------------------------------------

template <typename T, class DA, class DB, class Epi>
__global__ void __launch_bounds__(THREADS) simt_gemm_kernel(DA da, DB db, const Epi epi,
                                                            const Sched sc) {
  using A = typename Acc<T>::type;
  __shared__ A As[SBK][SBM];
  __shared__ A Bs[SBK][SBN];
  const int tid = threadIdx.x;
  const int tn = blockIdx.x % sc.tiles_n, tm = blockIdx.x / sc.tiles_n;
  const int grp = blockIdx.z / sc.splits, split = blockIdx.z % sc.splits;
  const int kt0 = split * sc.kt_per_split;
  const int kt1 = min(sc.kt_total, kt0 + sc.kt_per_split);
  da.grp = grp;
  db.grp = grp;
  const auto ra = da.row(tm * SBM + (tid & 63));
  const auto rb = db.row(tn * SBN + (tid & 63));
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  for (int kt = kt0; kt < kt1; ++kt) {
    simt_stage<T>(da, db, ra, rb, kt, tid, As, Bs);
    __syncthreads();
    simt_math(As, Bs, tid, acc);
    __syncthreads();
  }
  simt_store(epi, tm * SBM, tn * SBN, grp, split, tid, acc);
}

// ----------------------------------------------------------------------------------------------
// Reductions: grad_weight workspace -> grad_weight, grad_output -> grad_bias
// ----------------------------------------------------------------------------------------------

template <typename T, typename A>
__global__ void wgrad_reduce_kernel(const A* __restrict__ ws, T* __restrict__ dw, int Kg, int Cg,
                                    int R, int S, int splits, bool rsc, int64_t w0, int64_t w1,
                                    int64_t w2, int64_t w3, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) wgrad_reduce_one(ws, dw, Kg, Cg, R, S, splits, rsc, w0, w1, w2, w3, i);
}

// Per-channel sum of the masked grad_output over (n, p, q). Stage 1: CTA (channel block,
// split) sums a contiguous pixel range; 32 channels x 8 pixel lanes per CTA.
template <typename T, typename A>
__global__ void bias_partial_kernel(const T* __restrict__ dy, const T* __restrict__ y, bool relu,
                                    Geom g, FastDiv dPQ, FastDiv dQ, int M, int per_split,
                                    A* __restrict__ part) {
  __shared__ A red[8][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int k = blockIdx.x * 32 + tx;
  const int m0 = blockIdx.y * per_split, m1 = min(M, m0 + per_split);
  A s = 0;
  if (k < g.K) {
    for (int m = m0 + ty; m < m1; m += 8) {
      uint32_t n, pq, p, q;
      dPQ.divmod(m, n, pq);
      dQ.divmod(pq, p, q);
      const int64_t off = int64_t(n) * g.ys[0] + int64_t(k) * g.ys[1] + int64_t(p) * g.ys[2] +
                          int64_t(q) * g.ys[3];
      if (!relu || relu_passes(y[off])) s += to_acc(dy[off]);
    }
  }
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && k < g.K) {
    A t = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) t += red[j][tx];
    part[int64_t(blockIdx.y) * g.K + k] = t;
  }
}

template <typename T, typename A>
__global__ void bias_final_kernel(const A* __restrict__ part, int K, int splits, T* __restrict__ db) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  A s = 0;
  for (int sp = 0; sp < splits; ++sp) s += part[int64_t(sp) * K + k];
  db[k] = from_acc<T>(s);
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

Geom make_geom(const Tensor& x, const Tensor& w, int64_t P, int64_t Q, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Geom g;
  g.N = int(x.size(0));
  g.C = int(x.size(1));
  g.H = int(x.size(2));
  g.W = int(x.size(3));
  g.K = int(w.size(0));
  g.R = int(w.size(2));
  g.S = int(w.size(3));
  g.P = int(P);
  g.Q = int(Q);
  g.sh = int(stride[0]);
  g.sw = int(stride[1]);
  g.ph = int(padding[0]);
  g.pw = int(padding[1]);
  g.dh = int(dilation[0]);
  g.dw = int(dilation[1]);
  g.G = int(groups);
  g.Cg = int(w.size(1));
  g.Kg = int(g.K / groups);
  for (int i = 0; i < 4; ++i) g.xs[i] = g.ys[i] = 0;
  return g;
}

void set_strides(int64_t (&dst)[4], const Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

void check_conv_args(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cuda(input, "input");
  check_cuda(weight, "weight");
  check_4d(input, "input");
  check_4d(weight, "weight");
  TORCH_CHECK(input.device() == weight.device(), "fastconv (CUDA): input is on ", input.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastconv (CUDA): stride, padding and dilation need 2 values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "fastconv (CUDA): bad stride ", stride, ", padding ", padding, " or dilation ",
              dilation);
  TORCH_CHECK(groups >= 1 && input.size(1) == weight.size(1) * groups &&
                  weight.size(0) % groups == 0,
              "fastconv (CUDA): input of shape ", input.sizes(), " and weight of shape ",
              weight.sizes(), " do not match groups=", groups);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "fastconv (CUDA): weight dtype ",
              weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastconv (CUDA): conv2d_relu supports float32, float64, float16 and bfloat16, got ",
              st);
}

// The SIMT weight operand (FwdB or DgradB) over `weight` in its own strides.
template <class B> B simt_weights(const Tensor& weight, const Geom& g) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<B>().w)>>;
  int64_t ws[4];
  set_strides(ws, weight);
  return plan::simt_weights<B>(weight.data_ptr<T>(), ws, g);
}

bool tensor_cores(const Tensor& t) {
  const auto st = t.scalar_type();
  return (st == at::kHalf || st == at::kBFloat16) &&
         at::cuda::getDeviceProperties(t.device().index())->major >= 8;
}

// A copy in channels_last whose data pointer is 16-byte aligned (the vector loaders need it).
Tensor cl_aligned(const Tensor& t) {
  Tensor c = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (!aligned_to(c.data_ptr(), 16)) c = c.clone(at::MemoryFormat::ChannelsLast);
  return c;
}

void check_rows(int64_t rows, const char* what) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "fastconv (CUDA): ", what, " has ", rows,
              " pixels; the kernels index pixels with 32-bit integers");
}

// One GEMM pass over G groups and `splits` reduction splits: the 128x128x32 tensor-core kernel,
// or with SIMT the 64x64x16 SIMT kernel (same schedule; A/B are loaders or gather descriptions).
template <typename T, bool SIMT, class LA, class LB, class Epi>
void launch_gemm(const LA& la, const LB& lb, const Epi& epi, int64_t rows, int64_t cols, int G,
                 int splits, int kt_total, int kt_per_split) {
  const int64_t tm = ceil_div(rows, SIMT ? SBM : BM), tn = ceil_div(cols, SIMT ? SBN : BN);
  TORCH_CHECK(tm * tn < (int64_t(1) << 31) && int64_t(G) * splits <= 65535,
              "fastconv (CUDA): conv grid too large");
  Sched sc{int(tn), splits, kt_total, kt_per_split};
  dim3 grid(unsigned(tm * tn), 1, unsigned(G * splits));
  if constexpr (SIMT)
    simt_gemm_kernel<T, LA, LB, Epi><<<grid, THREADS, 0, stream()>>>(la, lb, epi, sc);
  else
    mma_gemm_kernel<T, LA, LB, Epi><<<grid, THREADS, 0, stream()>>>(la, lb, epi, sc);
  FC_LAUNCH_CHECK();
}

// E: EpiPixel<T> (128x128x32 and SIMT kernels) or tc::EpiOut<T> (large tiles).
template <class E, typename T, typename B>
E make_epi(const Tensor& out, int64_t rows, int H, int W, int chg, const B* bias, bool relu) {
  E e;
  int64_t os[4];
  set_strides(os, out);
  plan::fill_epi(e, out.data_ptr<T>(), os, rows, H, W, chg, out.size(1), bias, relu,
                 aligned_to(out.data_ptr(), 16));
  return e;
}

// ---- large-tile tensor-core path (conv2d_relu_tc.cuh)

bool big_fits() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin >= size_t(tc::Big::SMEM);
}

bool use_big(int64_t rows, int64_t cols, int64_t G) {
  return plan::use_big(rows, cols, G, num_sms(), big_fits(), plan::tile_override(), tc::Big::BM,
                       tc::Big::BN, tc::Mid::BM, tc::Mid::BN);
}

// Kernels with more than 48 KiB of dynamic shared memory must be allowed it, once per device.
template <typename K> void allow_smem(K kern, int bytes, std::atomic<uint64_t>& allowed) {
  const int dev = c10::cuda::current_device();
  if (((allowed.load() >> dev) & 1) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    allowed.fetch_or(uint64_t(1) << dev);
  }
}

template <typename T, class C, bool AK, bool BKM, class LA, class LB, class Epi>
void launch_tc(const LA& la, const LB& lb, const Epi& epi, int64_t rows, int64_t cols, int G,
               int splits, int kt_total, int kps) {
  const int64_t tm = ceil_div(rows, C::BM), tn = ceil_div(cols, C::BN);
  TORCH_CHECK(tm * tn < (int64_t(1) << 31) && int64_t(G) * splits <= 65535,
              "fastconv (CUDA): conv grid too large");
  auto kern = &tc_gemm_kernel<T, C, AK, BKM, LA, LB, Epi>;
  static std::atomic<uint64_t> allowed{0};
  allow_smem(kern, C::SMEM, allowed);
  Sched sc{int(tn), splits, kt_total, kps};
  kern<<<dim3(unsigned(tm * tn), 1, unsigned(G * splits)), C::THREADS, C::SMEM, stream()>>>(
      la, lb, epi, sc);
  FC_LAUNCH_CHECK();
}

// Whether this device runs the sm_90a (wgmma) code: built with TORCH_CUDA_ARCH_LIST containing
// 9.0a and running on a 9.0 device. Probed once per device.
bool wgmma_available() {
  static std::atomic<uint64_t> known{0}, yes{0};
  const int dev = c10::cuda::current_device();
  if ((known.load() >> dev) & 1) return (yes.load() >> dev) & 1;
  bool ok = false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major == 9 && prop->minor == 0 &&
      prop->sharedMemPerBlockOptin >= size_t(tc::WG_SMEM)) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, wgmma_probe_kernel) == cudaSuccess) {
      const Tensor flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, dev));
      wgmma_probe_kernel<<<1, 1, 0, stream()>>>(flag.data_ptr<int>());
      FC_LAUNCH_CHECK();
      ok = flag.item<int>() == 1;
    } else {
      (void)cudaGetLastError();
    }
  }
  if (ok) yes.fetch_or(uint64_t(1) << dev);
  known.fetch_or(uint64_t(1) << dev);
  return ok;
}

// The large-tile forward (and stride-1 grad_input): tile C on mma.sync, or with WG the Big
// tile's loaders on Hopper's wgmma (sm_90a builds).
template <typename T, class C, bool WG> void run_fwd_tc(const TcConv& p, const tc::EpiOut<T>& epi) {
  tc::FwdLoadA<C> la{};
  tc::RowsLoad<C::BN> lb{};
  const int kt = plan::fill_fwd_loaders(p, la, lb);
  if constexpr (WG) {
    const int64_t tm = ceil_div(la.M, C::BM), tn = ceil_div(p.Kg, C::BN);
    TORCH_CHECK(tm * tn < (int64_t(1) << 31) && p.G <= 65535, "fastconv (CUDA): conv grid too large");
    auto kern = &wg_gemm_kernel<T, tc::FwdLoadA<C>, tc::RowsLoad<C::BN>>;
    static std::atomic<uint64_t> allowed{0};
    allow_smem(kern, tc::WG_SMEM, allowed);
    const Sched sc{int(tn), 1, kt, kt};
    kern<<<dim3(unsigned(tm * tn), 1, unsigned(p.G)), 256, tc::WG_SMEM, stream()>>>(la, lb, epi, sc);
    FC_LAUNCH_CHECK();
  } else {
    launch_tc<T, C, true, true>(la, lb, epi, la.M, p.Kg, p.G, 1, kt, kt);
  }
}

// Forward (and stride-1 grad_input) tile: wgmma on sm_90a builds where a 256x128 tile suits the
// grid (FASTCONV_CONV_TILE=wgmma forces it, big/mid/old rule it out), else Big or Mid.
template <typename T> void fwd_tc(const TcConv& p, const tc::EpiOut<T>& epi) {
  const int64_t rows = int64_t(p.N) * p.P * p.Q;
  const Tile ov = plan::tile_override();
  if ((ov == Tile::Wgmma || (ov == Tile::Auto && use_big(rows, p.Kg, p.G))) && wgmma_available()) {
    run_fwd_tc<T, tc::Big, true>(p, epi);
    return;
  }
  if (use_big(rows, p.Kg, p.G)) run_fwd_tc<T, tc::Big, false>(p, epi);
  else run_fwd_tc<T, tc::Mid, false>(p, epi);
}


// grad_weight = the split partials of workspace ws (columns (r, s, c) when rsc, else (c, r, s))
// summed in split order.
template <typename T, typename A>
void wgrad_reduce(const Tensor& ws, const Tensor& dw, const Geom& g, int splits, bool rsc) {
  const int64_t total = dw.numel();
  wgrad_reduce_kernel<T, A><<<unsigned(ceil_div(total, 256)), 256, 0, stream()>>>(
      ws.data_ptr<A>(), dw.data_ptr<T>(), g.Kg, g.Cg, g.R, g.S, splits, rsc, dw.stride(0),
      dw.stride(1), dw.stride(2), dw.stride(3), total);
  FC_LAUNCH_CHECK();
}

template <typename T, class C>
void run_wgrad_tc(const Tensor& dym, const Tensor& xc, const Geom& g, const Tensor& dw) {
  const int64_t M = int64_t(g.N) * g.P * g.Q, cols = int64_t(g.Cg) * g.R * g.S;
  const int64_t kt_total = ceil_div(M, tc::BK);
  const int64_t tiles = ceil_div(g.Kg, C::BM) * ceil_div(cols, C::BN) * g.G;
  const auto [splits, kps] = plan::even_split(
      kt_total, plan::pick_splits(tiles, kt_total, int64_t(num_sms()) * C::MIN_CTAS,
                                  int64_t(g.G) * g.Kg * cols * 4));
  const Tensor ws = at::empty({int64_t(splits) * g.G * g.Kg * cols}, dym.options().dtype(at::kFloat));
  tc::PixLoadMN<C::BM> la{};
  tc::Im2colLoadMN<C::BN> lb{};
  plan::fill_wgrad_loaders(g, dym.data_ptr(), xc.data_ptr(), la, lb);
  const tc::EpiPart epi{ws.data_ptr<float>(), g.Kg, int(cols), splits};
  launch_tc<T, C, false, false>(la, lb, epi, g.Kg, cols, g.G, splits, int(kt_total), kps);
  wgrad_reduce<T, float>(ws, dw, g, splits, true);
}

// Masked grad_output (when `dym` is defined) and grad_bias (when `db` is defined) in one pass
// over channels_last contiguous dy (and y): K % 8 == 0, K <= 2048.
template <typename T>
void mask_bias(const Tensor& dy, const Tensor& y, bool relu, const Tensor& dym, const Tensor& db,
               int64_t M, int K) {
  const plan::MaskGrid mg = plan::mask_bias_grid(M, K, 4 * int64_t(num_sms()));
  const int KV = mg.KV, PL = mg.PL;
  const int64_t per = mg.per, nb = mg.blocks;
  Tensor part;
  if (db.defined()) part = at::empty({nb * K}, dy.options().dtype(at::kFloat));
  float* pp = db.defined() ? part.data_ptr<float>() : nullptr;
  const T* yp = relu ? y.data_ptr<T>() : nullptr;
  T* mp = dym.defined() ? dym.data_ptr<T>() : nullptr;
  const dim3 block{unsigned(KV), unsigned(PL), 1u};
  const T* dp = dy.data_ptr<T>();
  const unsigned grid = unsigned(nb);
  if (relu && mp && pp)
    mask_bias_kernel<T, true, true, true><<<grid, block, 0, stream()>>>(dp, yp, mp, M, K, per, pp);
  else if (relu && mp)
    mask_bias_kernel<T, true, true, false><<<grid, block, 0, stream()>>>(dp, yp, mp, M, K, per, pp);
  else if (relu)
    mask_bias_kernel<T, true, false, true><<<grid, block, 0, stream()>>>(dp, yp, mp, M, K, per, pp);
  else
    mask_bias_kernel<T, false, false, true><<<grid, block, 0, stream()>>>(dp, yp, mp, M, K, per, pp);
  FC_LAUNCH_CHECK();
  if (db.defined()) {
    bias_final_kernel<T, float><<<unsigned(ceil_div(K, 256)), 256, 0, stream()>>>(
        pp, K, int(nb), db.data_ptr<T>());
    FC_LAUNCH_CHECK();
  }
}

// ---- forward ----

template <typename T>
void conv_fwd_impl(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   Geom g, bool relu, const Tensor& out) {
  using A = typename Acc<T>::type;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  Tensor b;
  if (bias.has_value() && bias->defined())
    b = bias->to(std::is_same<T, double>::value ? at::kDouble : at::kFloat).contiguous();
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  const auto epi = make_epi<EpiPixel<T>, T>(out, M, g.P, g.Q, g.Kg, bp, relu);

  if constexpr (std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value) {
    if (tensor_cores(input)) {
      if (plan::tile_override() != Tile::Old && plan::fwd_tc_ok(g)) {
        const Tensor x = cl_aligned(input);
        int64_t ld = 0;
        const Tensor wp = plan::pack_fwd_weight(weight, ld);
        const TcConv p = plan::fwd_problem(g, x.data_ptr(), wp.data_ptr(), ld);
        fwd_tc<T>(p, make_epi<tc::EpiOut<T>, T>(out, M, g.P, g.Q, g.Kg, bp, relu));
      } else if (g.Cg % 8 == 0) {
        const Tensor x = cl_aligned(input);
        int64_t Cpad = 0;
        const Tensor wp = plan::pack_fwd_weight_cpad(weight, g.G, Cpad);
        Geom gx = g;
        set_strides(gx.xs, x);
        FwdAVec<T> la{x.data_ptr<T>(), gx, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q), int(M),
                      int(Cpad / BK)};
        RowsCp<T> lb{wp.data_ptr<T>(), g.R * g.S * Cpad, g.Kg};
        const int kt = int(g.R * g.S * Cpad / BK);
        launch_gemm<T, false>(la, lb, epi, M, g.Kg, g.G, 1, kt, kt);
      } else {
        const Tensor x = input.contiguous(out_format(input));
        int64_t KRp = 0;
        const Tensor wp = plan::pack_fwd_weight_rows(weight, KRp);
        Geom gx = g;
        set_strides(gx.xs, x);
        FwdA<T> d{x.data_ptr<T>(), gx, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q),
                  FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
        GatherLd<T, FwdA<T>> la{};
        la.d = d;
        RowsCp<T> lb{wp.data_ptr<T>(), KRp, g.Kg};
        const int kt = int(KRp / BK);
        launch_gemm<T, false>(la, lb, epi, M, g.Kg, g.G, 1, kt, kt);
      }
      return;
    }
  }
  const Tensor x = input.contiguous(out_format(input));
  Geom gx = g;
  set_strides(gx.xs, x);
  FwdA<T> da{x.data_ptr<T>(), gx, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q),
             FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
  const auto db = simt_weights<FwdB<T>>(weight, gx);
  const int kt = int(ceil_div(int64_t(g.Cg) * g.R * g.S, SBK));
  launch_gemm<T, true>(da, db, epi, M, g.Kg, g.G, 1, kt, kt);
}

Tensor conv2d_relu_cuda(const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        bool relu) {
  check_conv_args(input, weight, stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fastconv (CUDA): bias of shape ", bias->sizes(), " does not match ",
                weight.size(0), " output channels");
  }
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t P = plan::conv_out(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
  const int64_t Q = plan::conv_out(input.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
  TORCH_CHECK(P > 0 && Q > 0, "fastconv (CUDA): input of shape ", input.sizes(),
              " is too small for weight of shape ", weight.sizes());
  Tensor out = poisoned(at::empty({input.size(0), weight.size(0), P, Q},
                                  input.options().memory_format(out_format(input))));
  if (out.numel() == 0) return out;
  check_rows(input.size(0) * P * Q, "output");
  check_rows(input.size(0) * input.size(2) * input.size(3), "input");
  Geom g = make_geom(input, weight, P, Q, stride, padding, dilation, groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_relu",
                                  [&] { conv_fwd_impl<scalar_t>(input, weight, bias, g, relu, out); });
  return out;
}

// ---- backward ----

template <typename T>
void conv_dgrad_impl(const Tensor& dy, const Tensor& y, const Tensor& weight, Geom g, bool relu,
                     const Tensor& dx) {
  const int64_t M = int64_t(g.N) * g.H * g.W;
  const auto epi = make_epi<EpiPixel<T>, T>(dx, M, g.H, g.W, g.Cg,
                                            static_cast<const typename Acc<T>::type*>(nullptr), false);
  if constexpr (std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value) {
    if (tensor_cores(dy)) {
      if (g.Kg % 8 == 0) {
        const Tensor dyc = cl_aligned(dy);
        const Tensor yc = relu ? cl_aligned(y) : dyc;
        int64_t Kpad = 0;
        const Tensor wp = plan::pack_dgrad_weight_kpad(weight, g.G, Kpad);
        Geom gy = g;
        set_strides(gy.ys, dyc);
        DgradAVec<T> la{dyc.data_ptr<T>(), yc.data_ptr<T>(), relu, gy,
                        FastDiv(int64_t(g.H) * g.W), FastDiv(g.W), int(M), int(Kpad / BK)};
        RowsCp<T> lb{wp.data_ptr<T>(), g.R * g.S * Kpad, g.Cg};
        const int kt = int(g.R * g.S * Kpad / BK);
        launch_gemm<T, false>(la, lb, epi, M, g.Cg, g.G, 1, kt, kt);
      } else {
        int64_t KRp = 0;
        const Tensor wp = plan::pack_dgrad_weight_rows(weight, g.G, KRp);
        Geom gy = g;
        set_strides(gy.ys, dy);
        GatherLd<T, DgradA<T>> la{};
        la.d = DgradA<T>{dy.data_ptr<T>(), y.data_ptr<T>(), relu, gy, FastDiv(int64_t(g.H) * g.W),
                         FastDiv(g.W), FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
        RowsCp<T> lb{wp.data_ptr<T>(), KRp, g.Cg};
        const int kt = int(KRp / BK);
        launch_gemm<T, false>(la, lb, epi, M, g.Cg, g.G, 1, kt, kt);
      }
      return;
    }
  }
  Geom gy = g;
  set_strides(gy.ys, dy);
  DgradA<T> da{dy.data_ptr<T>(), y.data_ptr<T>(), relu, gy, FastDiv(int64_t(g.H) * g.W),
               FastDiv(g.W), FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
  const auto db = simt_weights<DgradB<T>>(weight, gy);
  const int kt = int(ceil_div(int64_t(g.Kg) * g.R * g.S, SBK));
  launch_gemm<T, true>(da, db, epi, M, g.Cg, g.G, 1, kt, kt);
}

template <typename T>
void conv_wgrad_impl(const Tensor& dy, const Tensor& y, const Tensor& input, Geom g, bool relu,
                     const Tensor& dw) {
  using A = typename Acc<T>::type;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  const int64_t cols = int64_t(g.Cg) * g.R * g.S;
  bool rsc = false;
  Tensor ws;
  int splits = 1;
  auto make_ws = [&](int64_t tiles, int64_t kt_total) {
    splits = plan::wgrad_splits(tiles, kt_total, int64_t(g.Kg) * cols * g.G * sizeof(A), num_sms());
    ws = at::empty({int64_t(splits) * g.G * g.Kg * cols},
                   dy.options().dtype(std::is_same<A, double>::value ? at::kDouble : at::kFloat));
    return EpiWs<A>{ws.data_ptr<A>(), g.Kg, int(cols), splits};
  };
  const FastDiv dPQ(int64_t(g.P) * g.Q), dQ(g.Q), dRS(int64_t(g.R) * g.S), dS(g.S);

  bool done = false;
  if constexpr (std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value) {
    if (tensor_cores(dy)) {
      const int64_t kt_total = ceil_div(M, BK);
      const int64_t tiles = ceil_div(g.Kg, BM) * ceil_div(cols, BN) * g.G;
      const auto epi = make_ws(tiles, kt_total);
      int kps;
      std::tie(splits, kps) = plan::even_split(kt_total, splits);
      const bool avec = g.Kg % 8 == 0, bvec = g.Cg % 8 == 0;
      rsc = bvec;
      const Tensor dyc = avec ? cl_aligned(dy) : dy;
      const Tensor yc = relu ? (avec ? cl_aligned(y) : y) : dyc;
      const Tensor xc = bvec ? cl_aligned(input) : input;
      Geom gg = g;
      set_strides(gg.ys, dyc);
      set_strides(gg.xs, xc);
      WgradAVec<T> av{dyc.data_ptr<T>(), yc.data_ptr<T>(), relu, gg, dPQ, dQ, int(M)};
      GatherLd<T, WgradA<T>> ag{};
      ag.d = WgradA<T>{dyc.data_ptr<T>(), yc.data_ptr<T>(), relu, gg, dPQ, dQ, 0};
      WgradBVec<T> bv{xc.data_ptr<T>(), gg, dPQ, dQ, int(M)};
      GatherLd<T, WgradB<T>> bg{};
      bg.d = WgradB<T>{xc.data_ptr<T>(), gg, dPQ, dQ, dRS, dS, 0};
      EpiWs<A> e = epi;
      e.splits = splits;
      if (avec && bvec)
        launch_gemm<T, false>(av, bv, e, g.Kg, cols, g.G, splits, int(kt_total), kps);
      else if (avec)
        launch_gemm<T, false>(av, bg, e, g.Kg, cols, g.G, splits, int(kt_total), kps);
      else if (bvec)
        launch_gemm<T, false>(ag, bv, e, g.Kg, cols, g.G, splits, int(kt_total), kps);
      else
        launch_gemm<T, false>(ag, bg, e, g.Kg, cols, g.G, splits, int(kt_total), kps);
      done = true;
    }
  }
  if (!done) {
    const int64_t kt_total = ceil_div(M, SBK);
    const int64_t tiles = ceil_div(g.Kg, SBM) * ceil_div(cols, SBN) * g.G;
    auto epi = make_ws(tiles, kt_total);
    int kps;
    std::tie(splits, kps) = plan::even_split(kt_total, splits);
    epi.splits = splits;
    Geom gg = g;
    set_strides(gg.ys, dy);
    set_strides(gg.xs, input);
    WgradA<T> da{dy.data_ptr<T>(), y.data_ptr<T>(), relu, gg, dPQ, dQ, 0};
    WgradB<T> db{input.data_ptr<T>(), gg, dPQ, dQ, dRS, dS, 0};
    launch_gemm<T, true>(da, db, epi, g.Kg, cols, g.G, splits, int(kt_total), kps);
  }
  wgrad_reduce<T, A>(ws, dw, g, splits, rsc);
}

template <typename T>
void conv_bgrad_impl(const Tensor& dy, const Tensor& y, Geom g, bool relu, const Tensor& db) {
  using A = typename Acc<T>::type;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  const int64_t cblocks = ceil_div(g.K, 32);
  const int64_t want = ceil_div(4 * int64_t(num_sms()), cblocks);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(M, 256), 65535}));
  const int per = int(ceil_div(M, splits));
  const int64_t sp = ceil_div(M, per);
  Tensor part = at::empty({sp * g.K}, dy.options().dtype(
                                          std::is_same<A, double>::value ? at::kDouble : at::kFloat));
  Geom gy = g;
  set_strides(gy.ys, dy);
  bias_partial_kernel<T, A><<<dim3(unsigned(cblocks), unsigned(sp)), 256, 0, stream()>>>(
      dy.data_ptr<T>(), y.data_ptr<T>(), relu, gy, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q),
      int(M), per, part.data_ptr<A>());
  FC_LAUNCH_CHECK();
  bias_final_kernel<T, A><<<unsigned(ceil_div(g.K, 256)), 256, 0, stream()>>>(
      part.data_ptr<A>(), g.K, int(sp), db.data_ptr<T>());
  FC_LAUNCH_CHECK();
}

// Tensor-core backward of 16-bit convs with K % 8 == 0: one pass masks grad_output by the ReLU
// (and sums grad_bias); grad_input is the forward kernel on the masked gradient with flipped,
// transposed weights when the stride is 1; grad_weight the MN-major GEMM when Cg % 8 == 0. The
// other cases take the 128x128x32 kernels on the masked gradient. False: shapes do not qualify.
template <typename T>
bool backward_tc(const Tensor& grad_output, const Tensor& output, const Tensor& input,
                 const Tensor& weight, const Geom& g, bool relu, std::array<bool, 3> mask,
                 const Tensor& gi, const Tensor& gw, const Tensor& gb) {
  if (!tensor_cores(grad_output) || plan::tile_override() == Tile::Old || !plan::bwd_tc_ok(g))
    return false;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  const Tensor dyc = cl_aligned(grad_output);
  Tensor dym = dyc;
  const bool masked = relu && (mask[0] || mask[1]);
  if (masked || mask[2]) {
    const Tensor yc = relu ? cl_aligned(output) : Tensor();
    if (masked) dym = poisoned(at::empty_like(dyc));
    mask_bias<T>(dyc, yc, relu, masked ? dym : Tensor(), mask[2] ? gb : Tensor(), M, g.K);
  }
  if (mask[0]) {
    if (plan::dgrad_tc_ok(g)) {
      int64_t ld = 0;
      const Tensor wt = plan::pack_dgrad_weight(weight, g.G, ld);
      const TcConv p = plan::dgrad_problem(g, dym.data_ptr(), wt.data_ptr(), ld);
      fwd_tc<T>(p, make_epi<tc::EpiOut<T>, T>(gi, int64_t(g.N) * g.H * g.W, g.H, g.W, g.Cg,
                                                (const float*)nullptr, false));
    } else {
      conv_dgrad_impl<T>(dym, dym, weight, g, false, gi);
    }
  }
  if (mask[1]) {
    if (plan::wgrad_tc_ok(g)) {
      const Tensor xc = cl_aligned(input);
      if (plan::wgrad_big(g.Kg, big_fits(), plan::tile_override())) run_wgrad_tc<T, tc::Big>(dym, xc, g, gw);
      else run_wgrad_tc<T, tc::Mid>(dym, xc, g, gw);
    } else {
      const Tensor x = input.contiguous(out_format(input));
      Geom gx = g;
      set_strides(gx.xs, x);
      set_strides(gx.ys, dym);
      conv_wgrad_impl<T>(dym, dym, x, gx, false, gw);
    }
  }
  return true;
}

std::tuple<Tensor, Tensor, Tensor> conv2d_relu_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& output,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, std::array<bool, 3> output_mask) {
  check_conv_args(input, weight, stride, padding, dilation, groups);
  check_cuda(grad_output, "grad_output");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t P = plan::conv_out(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
  const int64_t Q = plan::conv_out(input.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
  const std::vector<int64_t> oshape{input.size(0), weight.size(0), P, Q};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(oshape), "fastconv (CUDA): grad_output of shape ",
              grad_output.sizes(), " does not match the output shape ", at::IntArrayRef(oshape));
  TORCH_CHECK(!relu || output.sizes() == at::IntArrayRef(oshape), "fastconv (CUDA): output of shape ",
              output.sizes(), " does not match the output shape ", at::IntArrayRef(oshape));
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() &&
                  (!relu || output.scalar_type() == input.scalar_type()),
              "fastconv (CUDA): grad_output/output dtype must match input dtype ",
              input.scalar_type());
  const auto fmt = out_format(input);
  Tensor grad_input, grad_weight, grad_bias;
  grad_input = output_mask[0] ? poisoned(at::empty(input.sizes(), input.options().memory_format(fmt)))
                              : at::empty({0}, input.options());
  grad_weight = output_mask[1] ? poisoned(at::empty_like(weight)) : at::empty({0}, input.options());
  grad_bias = output_mask[2] ? poisoned(at::empty({weight.size(0)}, input.options()))
                             : at::empty({0}, input.options());
  const int64_t M = input.size(0) * P * Q;
  if (M == 0 || input.numel() == 0 || weight.numel() == 0) {  // nothing to sum: zeros
    if (output_mask[0]) grad_input.zero_();
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  check_rows(M, "output");
  check_rows(input.size(0) * input.size(2) * input.size(3), "input");
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "conv2d_relu_backward", [&] {
    if constexpr (std::is_same<scalar_t, c10::Half>::value ||
                  std::is_same<scalar_t, c10::BFloat16>::value) {
      const Geom g0 = make_geom(input, weight, P, Q, stride, padding, dilation, groups);
      done = backward_tc<scalar_t>(grad_output, output, input, weight, g0, relu, output_mask,
                                   grad_input, grad_weight, grad_bias);
    }
  });
  if (done) return {grad_input, grad_weight, grad_bias};
  const Tensor dy = grad_output.contiguous(fmt);
  const Tensor y = relu ? output.contiguous(fmt) : dy;
  const Tensor x = input.contiguous(fmt);
  Geom g = make_geom(x, weight, P, Q, stride, padding, dilation, groups);
  set_strides(g.xs, x);
  set_strides(g.ys, dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "conv2d_relu_backward", [&] {
    if (output_mask[0]) conv_dgrad_impl<scalar_t>(dy, y, weight, g, relu, grad_input);
    if (output_mask[1]) conv_wgrad_impl<scalar_t>(dy, y, x, g, relu, grad_weight);
    if (output_mask[2]) conv_bgrad_impl<scalar_t>(dy, y, g, relu, grad_bias);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastconv_cuda

TORCH_LIBRARY_IMPL(fastconv, CUDA, m) {
  m.impl("conv2d_relu", &fastconv_cuda::conv2d_relu_cuda);
  m.impl("conv2d_relu_backward", &fastconv_cuda::conv2d_relu_backward_cuda);
}
