// Large-tile tensor-core implicit GEMM (sm_80+, mma.sync m16n8k16, fp32 accumulators) for the
// conv passes whose operands stream as 16-byte chunks (conv2d_relu.cu picks it when channels % 8 == 0):
//   forward             A = input pixels x (r, s, c)        B = weights packed [K][(r, s, c)]
//   grad_input, stride 1: the forward kernel on the ReLU-masked grad_output and the flipped,
//                       transposed weights (same loaders, same kernel)
//   grad_weight         A = masked grad_output^T  B = im2col(input)^T, reduced over pixels, split
//                       over CTAs into a float workspace summed in a fixed order (deterministic)
// Tiles are BM x BN with BK = 64 halves (one 128-byte row per tile row), 4-stage cp.async ring in
// dynamic shared memory, 8 warps of 64x64 (256x128 tile, one CTA per SM) or 64x32 (128x128,
// two CTAs per SM); ldmatrix.x4 on both operands, one barrier per k-tile, epilogue through shared
// memory with 16-byte stores.
//
// Shared tiles are "K-major" [rows][64] (forward A and B: each 16-byte chunk holds 8 reduction
// elements of one row) or "MN-major" [64][cols] (grad_weight: a chunk holds 8 rows of one
// reduction index, read with ldmatrix.trans). Chunk c of tile row r is stored at chunk
// c ^ (r & 7): the 8 rows an ldmatrix phase reads then sit in 8 distinct bank groups, and the 8
// chunks of one row that consecutive threads copy stay one contiguous 128-byte line.
//
// Everything with index arithmetic is __host__ __device__: tests/csrc/conv2d_relu_emulate.cuh runs these loaders,
// offsets and epilogues thread by thread on the CPU, with ldmatrix/mma emulated from their PTX
// definitions.
#pragma once

#include "conv2d_relu_kernels.cuh"
#include "conv2d_relu_plan.h"

namespace fastconv_cuda {
namespace tc {

using convk::Geom;
using convk::Sched;
using convk::bits16;
using convk::cp_async16;

constexpr int BK = 64;  // reduction elements per k-tile
static_assert(BK == plan::kTcBK, "the planner packs weights for this k-tile");

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_CTAS_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_, MIN_CTAS = MIN_CTAS_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;             // mma tiles per warp
  static constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // halves
  static constexpr int LDC = BN + 8;  // epilogue staging pitch (halves): 16-byte aligned rows,
                                      // fragment writes of 8 rows land in distinct banks
  static constexpr int PIPE_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
  static constexpr int EPI_BYTES = BM * LDC * 2;
  static constexpr int SMEM = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile");
  static_assert(THREADS == 256, "loaders assume 256 threads");
};
// 256 pixels x 128 channels, 4 warps x 2 warps of 64x64, 4 stages: 192 KiB, one CTA per SM.
using Big = Cfg<256, 128, 4, 2, 4, 1>;
// 128 x 128, 2 x 4 warps of 64x32, 3 stages: 96 KiB, two CTAs per SM (short grids).
using Mid = Cfg<128, 128, 2, 4, 3, 2>;

// ---- shared-memory layout (offsets in halves within one stage's tile)

FC_HD int kmaj(int row, int chunk) { return row * BK + ((chunk ^ (row & 7)) << 3); }
template <int COLS> FC_HD int mnmaj(int k, int chunk) {
  return k * COLS + ((chunk ^ (k & 7)) << 3);
}

// wgmma (sm_90a) accumulators: acc[j * 4 + e] of thread t of a warpgroup (warp w = t / 32 % 4,
// lane l) in an m64nN accumulator is element (16 w + l / 4 + 8 (e >> 1), 8 j + 2 (l % 4) + (e & 1)).
FC_HD int wg_row(int t, int e) { return 16 * ((t >> 5) & 3) + ((t & 31) >> 2) + 8 * (e >> 1); }
FC_HD int wg_col(int t, int j, int e) { return 8 * j + 2 * (t & 3) + (e & 1); }

// Row address lane `lane` gives ldmatrix.x4 for the A fragment mi (rows wm*WM + mi*16 .. +16,
// reduction kk*16 .. +16) of warp row wm. Matrix q = lane / 8 of the x4 is a0..a3 of
// mma.m16n8k16: (rows +0 / +8) x (k +0 / +8) = (q & 1, q >> 1).
template <class C, bool KMAJ> FC_HD int a_off(int wm, int mi, int kk, int lane) {
  if (KMAJ) return kmaj(wm * C::WM + mi * 16 + (lane & 15), kk * 2 + (lane >> 4));
  const int q = lane >> 3;  // MN-major, read transposed: rows of the 8x8 matrix are k
  return mnmaj<C::BM>(kk * 16 + (q >> 1) * 8 + (lane & 7), (wm * C::WM + mi * 16 + (q & 1) * 8) >> 3);
}
// Row address for the B fragments of n-tiles 2nj and 2nj+1 (columns wn*WN + nj*16 .. +16):
// matrix q is (b0, b1) of n-tile 2nj, then of 2nj+1 = (cols +0 / +8, k +0 / +8) = (q >> 1, q & 1).
template <class C, bool KMAJ> FC_HD int b_off(int wn, int nj, int kk, int lane) {
  if (KMAJ)
    return kmaj(wn * C::WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1));
  const int q = lane >> 3;
  return mnmaj<C::BN>(kk * 16 + (q & 1) * 8 + (lane & 7), (wn * C::WN + nj * 16 + (q >> 1) * 8) >> 3);
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(convk::smem_addr(p))
               : "memory");
#endif
}

template <bool TRANS> __device__ __forceinline__ void ldsm(uint32_t (&r)[4], const uint16_t* p) {
  if constexpr (TRANS) ldmatrix_x4_trans(r, p);
  else convk::ldmatrix_x4(r, p);
}

// ---- operand loaders: init(row0, group, first k-tile, tid); issue(stage tile) copies one
// k-tile with cp.async (zero-filled outside the data) and steps to the next.

// Forward A, K-major: rows are output pixels (n, p, q), the reduction is (r, s, c) with c
// fastest over a channels_last input whose channels per group Cg % 8 == 0. Thread tid copies
// chunk (tid & 7) of rows (tid >> 3) + 32 i. A chunk is 8 channels at one (r, s): k-tile kt
// chunk j is chunk index kc = 8 kt + j of the flattened (r, s, c / 8).
template <class C> struct FwdLoadA {
  static constexpr int ROWS = C::BM / 32;
  const uint16_t* x;  // channels_last, 16-byte aligned
  int64_t cstride;    // channels per pixel (C, a multiple of 8)
  int cg, H, W, S, RS, sh, sw, ph, pw, dh, dw, M;
  FastDiv dPQ, dQ, dC8, dS;  // P*Q, Q, Cg/8, S
  int pix[ROWS];       // pixel index (n H + h0) W + w0 of the window origin (host checks int32)
  uint32_t hw0[ROWS];  // h0 << 16 | (w0 & 0xffff); rows past M get h0 = -32768 (never in bounds)
  int chunk, kc, grp;
  FC_HD void init(int row0, int g, int kt0, int tid) {
    chunk = tid & 7;
    grp = g;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int m = row0 + (tid >> 3) + 32 * i;
      const bool ok = m < M;
      uint32_t n, pq, p, q;
      dPQ.divmod(ok ? m : 0, n, pq);
      dQ.divmod(pq, p, q);
      const int h0 = int(p) * sh - ph, w0 = int(q) * sw - pw;
      pix[i] = (int(n) * H + h0) * W + w0;
      hw0[i] = (uint32_t(ok ? h0 : -32768) << 16) | (uint32_t(w0) & 0xffffu);
    }
    kc = kt0 * 8 + chunk;
  }
  FC_HD void issue(uint16_t* st) {
    uint32_t rs, c8, r, s;
    dC8.divmod(uint32_t(kc), rs, c8);
    dS.divmod(rs, r, s);
    const bool kok = int(rs) < RS;
    const int hr = int(r) * dh, ws = int(s) * dw, rsoff = hr * W + ws;
    const int64_t cofs = int64_t(grp) * cg + int64_t(c8) * 8;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int h = (int(hw0[i]) >> 16) + hr, w = int(int16_t(hw0[i] & 0xffffu)) + ws;
      const bool ok = kok && unsigned(h) < unsigned(H) && unsigned(w) < unsigned(W);
      const uint16_t* src = ok ? x + int64_t(pix[i] + rsoff) * cstride + cofs : x;
      cp_async16(st + kmaj((FC_TID() >> 3) + 32 * i, chunk), src, ok);
    }
    kc += 8;
  }
};

// K-major rows of a packed row-major [groups * rows_per_group][ld] matrix (the weights); ld is
// a multiple of BK and the padding is zero, so only rows are masked.
template <int TILE_ROWS> struct RowsLoad {
  static constexpr int ROWS = TILE_ROWS / 32;
  const uint16_t* w;
  int ld;  // host checks groups * rows_per_group * ld < 2^31
  int rows_per_group;
  int off[ROWS];
  bool ok[ROWS];
  int chunk, k;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    chunk = tid & 7;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int r = row0 + (tid >> 3) + 32 * i;
      ok[i] = r < rows_per_group;
      off[i] = (grp * rows_per_group + (ok[i] ? r : 0)) * ld + chunk * 8;
    }
    k = kt0 * BK;
  }
  FC_HD void issue(uint16_t* st) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      cp_async16(st + kmaj((FC_TID() >> 3) + 32 * i, chunk), ok[i] ? w + off[i] + k : w, ok[i]);
    k += BK;
  }
};

// grad_weight A, MN-major tile [64 pixels][COLS output channels] of the masked grad_output
// (channels_last, contiguous, K % 8 == 0): pixel m's channels are one contiguous run.
template <int COLS> struct PixLoadMN {
  static constexpr int CH = COLS / 8, PASSES = BK / (256 / CH);
  const uint16_t* dy;
  int64_t K;  // channels per pixel
  int kg, M;  // channels per group; pixels
  int cofs;   // group * kg + row0 + 8 * chunk
  bool cok;
  int m0;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    const int chunk = tid % CH;
    cok = row0 + chunk * 8 < kg;
    cofs = grp * kg + row0 + chunk * 8;
    m0 = kt0 * BK;
  }
  FC_HD void issue(uint16_t* st) {
    const int chunk = FC_TID() % CH, prow = FC_TID() / CH;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int r = prow + i * (256 / CH), m = m0 + r;
      const bool ok = cok && m < M;
      cp_async16(st + mnmaj<COLS>(r, chunk), ok ? dy + int64_t(m) * K + cofs : dy, ok);
    }
    m0 += BK;
  }
};

// grad_weight B, MN-major tile [64 pixels][COLS columns (r, s, c), c fastest] of the im2col of
// a channels_last input (Cg % 8 == 0): a chunk is 8 channels at one (r, s) of one output pixel.
// (Must differ from PixLoadMN: each chunk is a tap of the im2col with its own bounds check.)
template <int COLS> struct Im2colLoadMN {
  static constexpr int CH = COLS / 8, PASSES = BK / (256 / CH);
  const uint16_t* x;
  int64_t C;  // channels per pixel
  int H, W, cg, ncols, M;
  int sh, sw, ph, pw, dh, dw, S;
  FastDiv dPQ, dQ;
  int roff, soff;  // r dh - ph, s dw - pw of this thread's chunk; roff = -65536 past the columns
  int cofs;
  int m0;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    const int j = row0 + (tid % CH) * 8;
    const bool jok = j < ncols;
    const int jj = jok ? j : 0, rs = jj / cg, c0 = jj % cg;
    roff = jok ? (rs / S) * dh - ph : -65536;
    soff = (rs % S) * dw - pw;
    cofs = grp * cg + c0;
    m0 = kt0 * BK;
  }
  FC_HD void issue(uint16_t* st) {
    const int chunk = FC_TID() % CH, prow = FC_TID() / CH;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int r = prow + i * (256 / CH), m = m0 + r;
      uint32_t n, pq, p, q;
      dPQ.divmod(uint32_t(m < M ? m : 0), n, pq);
      dQ.divmod(pq, p, q);
      const int h = int(p) * sh + roff, w = int(q) * sw + soff;
      const bool ok = m < M && unsigned(h) < unsigned(H) && unsigned(w) < unsigned(W);
      const uint16_t* src = ok ? x + ((int64_t(n) * H + h) * W + w) * C + cofs : x;
      cp_async16(st + mnmaj<COLS>(r, chunk), src, ok);
    }
    m0 += BK;
  }
};

// ---- epilogues: stage(acc -> shared) before a CTA barrier, flush(shared -> global) after

// acc[mi][ni][e] of lane `lane` in warp (wm, wn) is tile element (row, col) =
// (wm WM + 16 mi + lane / 4 + 8 (e >> 1), wn WN + 8 ni + 2 (lane % 4) + (e & 1)).

// A conv output (forward, or grad_input through the forward kernel): rows are pixels (n, a, b)
// of a 4-D tensor, columns channels of one group; + bias, ReLU, rounding to T.
template <typename T> struct EpiOut {
  T* out;
  int64_t os[4];
  FastDiv dHW, dW;
  int M, chg;
  const float* bias;  // per output channel, or null
  bool relu;
  bool vec;  // channel stride 1, chg % 8 == 0, 16-byte aligned chunks

  FC_HD int64_t pix(int m) const {
    uint32_t n, hw, h, w;
    dHW.divmod(m, n, hw);
    dW.divmod(hw, h, w);
    return int64_t(n) * os[0] + int64_t(h) * os[2] + int64_t(w) * os[3];
  }
  template <class C>
  FC_HD void stage(const float (&acc)[C::MI][C::NI][4], uint16_t* sm, int n0, int grp, int wm,
                   int wn, int lane) const {
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int col = wn * C::WN + ni * 8 + (lane & 3) * 2;
      float b0 = 0.f, b1 = 0.f;
      if (bias) {
        if (n0 + col < chg) b0 = bias[grp * chg + n0 + col];
        if (n0 + col + 1 < chg) b1 = bias[grp * chg + n0 + col + 1];
      }
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = wm * C::WM + mi * 16 + (lane >> 2) + hf * 8;
          float v0 = acc[mi][ni][hf * 2] + b0, v1 = acc[mi][ni][hf * 2 + 1] + b1;
          if (relu) { v0 = relu_nan(v0); v1 = relu_nan(v1); }
          *reinterpret_cast<uint32_t*>(sm + row * C::LDC + col) =
              uint32_t(bits16(from_acc<T>(v0))) | (uint32_t(bits16(from_acc<T>(v1))) << 16);
        }
    }
  }
  // wgmma accumulators of thread tid (warpgroup tid / 128 owns rows 128 wg .. +128 as two m64
  // halves) into the Big staging area.
  FC_HD void stage_wg(const float (&acc)[2][64], uint16_t* sm, int n0, int grp, int tid) const {
    const int wg = tid >> 7, t = tid & 127;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = wg_col(t, j, 0);
      float b0 = 0.f, b1 = 0.f;
      if (bias) {
        if (n0 + col < chg) b0 = bias[grp * chg + n0 + col];
        if (n0 + col + 1 < chg) b1 = bias[grp * chg + n0 + col + 1];
      }
#pragma unroll
      for (int sub = 0; sub < 2; ++sub)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = 128 * wg + 64 * sub + wg_row(t, 2 * hf);
          float v0 = acc[sub][4 * j + 2 * hf] + b0, v1 = acc[sub][4 * j + 2 * hf + 1] + b1;
          if (relu) { v0 = relu_nan(v0); v1 = relu_nan(v1); }
          *reinterpret_cast<uint32_t*>(sm + row * Big::LDC + col) =
              uint32_t(bits16(from_acc<T>(v0))) | (uint32_t(bits16(from_acc<T>(v1))) << 16);
        }
    }
  }
  template <class C>
  FC_HD void flush(const uint16_t* sm, int m0, int n0, int grp, int tid) const {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    const int64_t choff = int64_t(grp) * chg + n0;
    constexpr int CPR = C::BN / 8;  // 16-byte chunks per tile row
    if (vec) {
#pragma unroll 4
      for (int it = 0; it < C::BM * CPR / C::THREADS; ++it) {
        const int idx = it * C::THREADS + tid, row = idx / CPR, c8 = (idx % CPR) * 8;
        const int m = m0 + row;
        if (m < M && n0 + c8 < chg)
          *reinterpret_cast<uint4*>(o + pix(m) + choff + c8) =
              *reinterpret_cast<const uint4*>(sm + row * C::LDC + c8);
      }
    } else if (os[1] == 1) {  // channels contiguous: neighbouring threads take neighbouring channels
      for (int it = 0; it < C::BM * C::BN / C::THREADS; ++it) {
        const int idx = it * C::THREADS + tid, row = idx / C::BN, col = idx % C::BN;
        const int m = m0 + row;
        if (m < M && n0 + col < chg) o[pix(m) + choff + col] = sm[row * C::LDC + col];
      }
    } else {  // pixels contiguous (NCHW): neighbouring threads take neighbouring pixels
      for (int it = 0; it < C::BM * C::BN / C::THREADS; ++it) {
        const int idx = it * C::THREADS + tid, row = idx % C::BM, col = idx / C::BM;
        const int m = m0 + row;
        if (m < M && n0 + col < chg) o[pix(m) + (choff + col) * os[1]] = sm[row * C::LDC + col];
      }
    }
  }
};

// grad_weight partial tile of one split: ws[(group * splits + split)][row][col] in float,
// written straight from the accumulators as 8-byte pairs (each CTA writes its tile once).
struct EpiPart {
  float* ws;
  int rows, cols, splits;
  template <class C>
  FC_HD void stage(const float (&acc)[C::MI][C::NI][4], int m0, int n0, int grp, int split, int wm,
                   int wn, int lane) const {
    float* base = ws + int64_t(grp * splits + split) * rows * cols;
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = m0 + wm * C::WM + mi * 16 + (lane >> 2) + hf * 8;
        if (r >= rows) continue;
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) {
          const int c = n0 + wn * C::WN + ni * 8 + (lane & 3) * 2;
          float* p = base + int64_t(r) * cols + c;
          if (c + 1 < cols && (cols % 2) == 0) {
            *reinterpret_cast<float2*>(p) = make_float2(acc[mi][ni][hf * 2], acc[mi][ni][hf * 2 + 1]);
          } else {
            if (c < cols) p[0] = acc[mi][ni][hf * 2];
            if (c + 1 < cols) p[1] = acc[mi][ni][hf * 2 + 1];
          }
        }
      }
  }
};

// ---- Hopper warpgroup MMA (sm_90a only): the same 256x128 tile, loaders and shared layout as
// Big, read by wgmma.mma_async straight from shared memory. Two warpgroups; warpgroup wg owns
// tile rows 128 wg .. +128 as two m64n128k16 accumulators (64 floats each per thread).
//
// Our K-major tile with its chunk ^ (row & 7) swizzle is exactly the canonical 128-byte-swizzle
// K-major layout when each stage starts on a 1024-byte boundary (8 rows of 128 bytes = one
// swizzle atom): the XOR uses address bits [4:6] ^ [7:9]. Descriptor: start address >> 4 in bits
// 0-13, leading byte offset (unused for swizzled K-major) 16 >> 4 in 16-29, stride byte offset
// between 8-row groups 1024 >> 4 in 32-45, base offset 0, swizzle mode 1 (128 B) in 62-63. The
// k16 slice kk of a 64-wide row starts 32 kk bytes further (the hardware applies the XOR to the
// final addresses).
constexpr int WG_STAGES = 4;
constexpr int WG_SMEM = WG_STAGES * (Big::A_STAGE + Big::B_STAGE) * 2 + 1024;  // + alignment slack

FC_HD uint64_t wg_desc(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3FFFFu) >> 4) | (uint64_t(16 >> 4) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Element (row i, k) of the 64- or 128-row operand a descriptor describes (the emulation's model of
// the hardware: logical address, then the 128-byte swizzle on address bits).
FC_HD uint32_t wg_elem_addr(uint64_t desc, int i, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFFu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFFu) << 4;
  const uint32_t logical = start + uint32_t(i / 8) * sbo + uint32_t(i % 8) * 128 + uint32_t(k) * 2;
  return logical ^ (((logical >> 7) & 7u) << 4);
}

__device__ __forceinline__ void wg_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wg_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared-memory writes of the generic proxy (cp.async, st.shared) made visible to the async
// proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator accesses across wgmma issue/wait.
__device__ __forceinline__ void wg_fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

#define FC_WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
                    "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FC_WG_REGS                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// D(64x128, f32) += A(64x16) B(16x128), both K-major in shared memory (no transpose); TY is the
// PTX operand type (f16 or bf16).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FC_WGMMA_64x128(TY)                                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                  \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " FC_WG_REGS          \
               ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                              \
               : FC_WG_D8(0), FC_WG_D8(8), FC_WG_D8(16), FC_WG_D8(24), FC_WG_D8(32),          \
                 FC_WG_D8(40), FC_WG_D8(48), FC_WG_D8(56)                                      \
               : "l"(da), "l"(db), "r"(1))
#else
#define FC_WGMMA_64x128(TY)
#endif
template <typename T> struct Wgmma {
  static __device__ __forceinline__ void run(float (&d)[64], uint64_t da, uint64_t db) {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>);
    if constexpr (std::is_same_v<T, c10::Half>) FC_WGMMA_64x128("f16");
    else FC_WGMMA_64x128("bf16");
  }
};
#undef FC_WGMMA_64x128
#undef FC_WG_D8
#undef FC_WG_REGS

// ---- ReLU mask + grad_bias partials (mask_bias_kernel): block = (K/8 channel groups v) x
// (pixel lanes ly); block b covers pixels [b per_block, (b + 1) per_block) of a channels_last
// contiguous grad_output. Phase 1 per thread, then (after a barrier) lane 0 sums the lanes'
// partials in lane order: fixed-order, deterministic.
template <typename T, bool RELU, bool WRITE, bool SUM>
FC_HD void mask_bias_thread(const T* dy, const T* y, T* dym, int64_t M, int K, int64_t per_block,
                            int b, int v, int ly, int KV, int PL, float* red) {
  const int64_t m0 = int64_t(b) * per_block;
  const int64_t m1 = M < m0 + per_block ? M : m0 + per_block;
  float s[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = 0.f;
  for (int64_t m = m0 + ly; m < m1; m += PL) {
    const int64_t off = m * K + v * 8;
    Vec<T, 8> d = load_vec<T, 8>(dy + off);
    if (RELU) {
      const Vec<T, 8> o = load_vec<T, 8>(y + off);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (!convk::relu_passes(o.v[e])) d.v[e] = T(0);
    }
    if (WRITE) store_vec<T, 8>(dym + off, d);
    if (SUM) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s[e] += float(to_acc(d.v[e]));
    }
  }
  if (SUM) {
#pragma unroll
    for (int e = 0; e < 8; ++e) red[(ly * KV + v) * 8 + e] = s[e];
  }
}

FC_HD void mask_bias_sum(const float* red, int KV, int PL, int v, float* part, int b, int K) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float t = 0.f;
    for (int j = 0; j < PL; ++j) t += red[(j * KV + v) * 8 + e];
    part[int64_t(b) * K + v * 8 + e] = t;
  }
}

}  // namespace tc
}  // namespace fastconv_cuda
