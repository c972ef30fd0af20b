// Device-side building blocks of the conv kernels (conv2d_relu.cu): geometry, gather descriptions,
// epilogues, shared-memory layout, PTX wrappers and operand loaders. Everything that does index
// arithmetic is __host__ __device__ so that the CPU emulation in tests/csrc/conv2d_relu_emulate.cuh can check it
// against a float64 reference (tests/test_extension_cuda.py builds and runs it).
#pragma once

#include "common.cuh"
#include "conv2d_relu_plan.h"

#include <type_traits>

namespace fastconv_cuda {
namespace convk {

// ----------------------------------------------------------------------------------------------
// Geometry
// ----------------------------------------------------------------------------------------------

struct Geom {
  int N, C, H, W, K, P, Q, R, S;
  int sh, sw, ph, pw, dh, dw;
  int G, Cg, Kg;
  int64_t xs[4];  // input (or grad_input) strides n, c, h, w
  int64_t ys[4];  // output (or grad_output) strides n, k, p, q
};

struct Sched {
  int tiles_n;       // column tiles; blockIdx.x = tile_m * tiles_n + tile_n
  int splits;        // reduction splits; blockIdx.z = group * splits + split
  int kt_total;      // reduction tiles
  int kt_per_split;
};

template <typename T> FC_HD uint16_t bits16(T v) { return v.x; }
template <typename T> FC_HD T from_bits16(uint16_t b) {
  T t;
  t.x = b;
  return t;
}

// threshold_backward semantics: the gradient is dropped where the saved output is <= 0 and
// passes elsewhere, NaN included.
template <typename T> FC_HD bool relu_passes(T y) {
  return !(to_acc(y) <= 0);
}

// ----------------------------------------------------------------------------------------------
// Gather descriptions: a GEMM operand as rows x reduction-columns, element by element.
// row(i) hoists what depends on the row; col(k) decodes a reduction index, next() steps it.
// ----------------------------------------------------------------------------------------------

// Reduction column of the forward and grad_input gathers: (channel, r, s) with s fastest.
struct Crs { int ch, r, s; };
FC_HD Crs crs_col(const FastDiv& dRS, const FastDiv& dS, int k) {
  uint32_t ch, rs, r, s;
  dRS.divmod(k, ch, rs);
  dS.divmod(rs, r, s);
  return {int(ch), int(r), int(s)};
}
FC_HD void crs_next(Crs& c, const Geom& g) {
  if (++c.s == g.S) { c.s = 0; if (++c.r == g.R) { c.r = 0; ++c.ch; } }
}

// Reduction column of the grad_weight gathers: an output pixel (n, p, q) with q fastest.
struct Pix { int n, p, q; };
FC_HD Pix pix_col(const FastDiv& dPQ, const FastDiv& dQ, int m) {
  uint32_t n, pq, p, q;
  dPQ.divmod(m, n, pq);
  dQ.divmod(pq, p, q);
  return {int(n), int(p), int(q)};
}
FC_HD void pix_next(Pix& c, const Geom& g) {
  if (++c.q == g.Q) { c.q = 0; if (++c.p == g.P) { c.p = 0; ++c.n; } }
}

// forward A: rows (n, p, q), cols (c, r, s)
template <typename T> struct FwdA {
  const T* x;
  Geom g;
  FastDiv dPQ, dQ, dRS, dS;
  int M, grp;
  struct Row { int64_t base; int h0, w0; bool ok; };
  using Col = Crs;
  FC_HD Row row(int m) const {
    Row w;
    w.ok = m < M;
    const Pix px = pix_col(dPQ, dQ, w.ok ? m : 0);
    w.base = int64_t(px.n) * g.xs[0] + int64_t(grp) * g.Cg * g.xs[1];
    w.h0 = px.p * g.sh - g.ph;
    w.w0 = px.q * g.sw - g.pw;
    return w;
  }
  FC_HD Col col(int k) const { return crs_col(dRS, dS, k); }
  FC_HD void next(Col& c) const { crs_next(c, g); }
  FC_HD T load(const Row& w, const Col& c) const {
    const int h = w.h0 + c.r * g.dh, ww = w.w0 + c.s * g.dw;
    if (!w.ok || c.ch >= g.Cg || unsigned(h) >= unsigned(g.H) || unsigned(ww) >= unsigned(g.W))
      return T(0);
    return x[w.base + c.ch * g.xs[1] + h * g.xs[2] + ww * g.xs[3]];
  }
};

// forward B (SIMT only): rows = output channel of the group, cols (c, r, s)
// (DgradB has the same fields but must differ in row/load: its rows are input channels.)
template <typename T> struct FwdB {
  const T* w;
  int64_t ws[4];
  Geom g;
  FastDiv dRS, dS;
  int grp;
  struct Row { int64_t base; bool ok; };
  using Col = Crs;
  FC_HD Row row(int k) const {
    const bool ok = k < g.Kg;
    return {int64_t(grp * g.Kg + (ok ? k : 0)) * ws[0], ok};
  }
  FC_HD Col col(int k) const { return crs_col(dRS, dS, k); }
  FC_HD void next(Col& c) const { crs_next(c, g); }
  FC_HD T load(const Row& rw, const Col& c) const {
    if (!rw.ok || c.ch >= g.Cg) return T(0);
    return w[rw.base + c.ch * ws[1] + c.r * ws[2] + c.s * ws[3]];
  }
};

// dgrad A: rows (n, h, w) of the input, cols (k, r, s); masked grad_output gathered where
// h = p*sh - ph + r*dh has an integer p in range. (Shaped like FwdA, but must differ: the
// transposed convolution's gather, strided and ReLU-masked.)
template <typename T> struct DgradA {
  const T* dy;
  const T* y;
  bool relu;
  Geom g;
  FastDiv dHW, dW, dRS, dS;
  int M, grp;
  struct Row { int64_t base; int hh, ww; bool ok; };
  using Col = Crs;
  FC_HD Row row(int m) const {
    Row w;
    w.ok = m < M;
    const Pix px = pix_col(dHW, dW, w.ok ? m : 0);  // an input pixel (n, h, w)
    w.base = int64_t(px.n) * g.ys[0] + int64_t(grp) * g.Kg * g.ys[1];
    w.hh = px.p + g.ph;
    w.ww = px.q + g.pw;
    return w;
  }
  FC_HD Col col(int k) const { return crs_col(dRS, dS, k); }
  FC_HD void next(Col& c) const { crs_next(c, g); }
  FC_HD T load(const Row& w, const Col& c) const {
    const int pn = w.hh - c.r * g.dh, qn = w.ww - c.s * g.dw;
    if (!w.ok || c.ch >= g.Kg || pn < 0 || qn < 0) return T(0);
    const int p = pn / g.sh, q = qn / g.sw;
    if (p * g.sh != pn || q * g.sw != qn || p >= g.P || q >= g.Q) return T(0);
    const int64_t off = w.base + c.ch * g.ys[1] + p * g.ys[2] + q * g.ys[3];
    if (relu && !relu_passes(y[off])) return T(0);
    return dy[off];
  }
};

// dgrad B (SIMT only): rows = input channel of the group, cols (k, r, s)
// (FwdB's fields; must differ in row/load: the weight read transposed, rows are input channels.)
template <typename T> struct DgradB {
  const T* w;
  int64_t ws[4];
  Geom g;
  FastDiv dRS, dS;
  int grp;
  struct Row { int64_t base; bool ok; };
  using Col = Crs;
  FC_HD Row row(int c) const {
    const bool ok = c < g.Cg;
    return {int64_t(ok ? c : 0) * ws[1], ok};
  }
  FC_HD Col col(int k) const { return crs_col(dRS, dS, k); }
  FC_HD void next(Col& c) const { crs_next(c, g); }
  FC_HD T load(const Row& rw, const Col& c) const {
    if (!rw.ok || c.ch >= g.Kg) return T(0);
    return w[rw.base + int64_t(grp * g.Kg + c.ch) * ws[0] + c.r * ws[2] + c.s * ws[3]];
  }
};

// wgrad A: rows = output channel of the group, cols = output pixels; masked grad_output
template <typename T> struct WgradA {
  const T* dy;
  const T* y;
  bool relu;
  Geom g;
  FastDiv dPQ, dQ;
  int grp;
  struct Row { int64_t base; bool ok; };
  using Col = Pix;
  FC_HD Row row(int k) const {
    const bool ok = k < g.Kg;
    return {int64_t(grp * g.Kg + (ok ? k : 0)) * g.ys[1], ok};
  }
  FC_HD Col col(int m) const { return pix_col(dPQ, dQ, m); }
  FC_HD void next(Col& c) const { pix_next(c, g); }
  FC_HD T load(const Row& rw, const Col& c) const {
    if (!rw.ok || c.n >= g.N) return T(0);
    const int64_t off = rw.base + c.n * g.ys[0] + c.p * g.ys[2] + c.q * g.ys[3];
    if (relu && !relu_passes(y[off])) return T(0);
    return dy[off];
  }
};

// wgrad B: rows = (c, r, s) of the group, cols = output pixels; the im2col of the input
template <typename T> struct WgradB {
  const T* x;
  Geom g;
  FastDiv dPQ, dQ, dRS, dS;
  int grp;
  struct Row { int64_t base; int roff, soff; bool ok; };
  using Col = Pix;
  FC_HD Row row(int j) const {
    Row w;
    w.ok = j < g.Cg * g.R * g.S;
    uint32_t c, rs, r, s;
    dRS.divmod(w.ok ? j : 0, c, rs);
    dS.divmod(rs, r, s);
    w.base = int64_t(grp * g.Cg + int(c)) * g.xs[1];
    w.roff = int(r) * g.dh - g.ph;
    w.soff = int(s) * g.dw - g.pw;
    return w;
  }
  FC_HD Col col(int m) const { return pix_col(dPQ, dQ, m); }
  FC_HD void next(Col& c) const { pix_next(c, g); }
  FC_HD T load(const Row& w, const Col& c) const {
    const int h = c.p * g.sh + w.roff, ww = c.q * g.sw + w.soff;
    if (!w.ok || c.n >= g.N || unsigned(h) >= unsigned(g.H) || unsigned(ww) >= unsigned(g.W))
      return T(0);
    return x[w.base + c.n * g.xs[0] + h * g.xs[2] + ww * g.xs[3]];
  }
};

// ----------------------------------------------------------------------------------------------
// Epilogues
// ----------------------------------------------------------------------------------------------

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;
static_assert(BK == plan::kMmaBK, "the planner packs weights for this k-tile");
constexpr int LDC = BN + 8;  // staging row pitch (halves): 272 bytes keeps rows 16B aligned and
                             // spreads the fragment writes over all banks

// Stores a tile whose rows are pixels (n, a, b) of a 4-D tensor and whose columns are channels
// of one group: the forward output (with bias and ReLU) and grad_input.
template <typename T> struct EpiPixel {
  using A = typename Acc<T>::type;
  T* out;
  int64_t os[4];
  FastDiv dHW, dW;
  int M, chg;      // rows; channels per group
  const A* bias;   // per output channel, or null
  bool relu;
  bool vec;        // channel stride 1 and 16-byte aligned chunks of 8 channels

  FC_HD int64_t pix(int m) const {
    uint32_t n, hw, h, w;
    dHW.divmod(m, n, hw);
    dW.divmod(hw, h, w);
    return int64_t(n) * os[0] + int64_t(h) * os[2] + int64_t(w) * os[3];
  }
  FC_HD A finish(A v, int ch) const {
    if (bias) v += bias[ch];
    return relu ? relu_nan(v) : v;
  }
  FC_HD void put(int m, int col, int grp, int, A v) const {
    if (m >= M || col >= chg) return;
    const int ch = grp * chg + col;
    out[pix(m) + ch * os[1]] = from_acc<T>(finish(v, ch));
  }

  // Phase 1 (before a CTA barrier): converted tile -> shared staging, so that phase 2 can
  // store whole rows.
  FC_HD void stage(float (&acc)[4][4][4], uint16_t* sm, int, int n0, int grp, int, int wm,
                   int wn, int lane) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = wn * 32 + j * 8 + (lane & 3) * 2;
      const int c0 = n0 + col;
      A b0 = 0, b1 = 0;
      if (bias) {
        if (c0 < chg) b0 = bias[grp * chg + c0];
        if (c0 + 1 < chg) b1 = bias[grp * chg + c0 + 1];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = wm * 64 + i * 16 + (lane >> 2) + hf * 8;
          A v0 = acc[i][j][hf * 2] + b0, v1 = acc[i][j][hf * 2 + 1] + b1;
          if (relu) { v0 = relu_nan(v0); v1 = relu_nan(v1); }
          const uint32_t pk = uint32_t(bits16(from_acc<T>(v0))) |
                              (uint32_t(bits16(from_acc<T>(v1))) << 16);
          *reinterpret_cast<uint32_t*>(sm + row * LDC + col) = pk;
        }
      }
    }
  }
  // Phase 2: shared staging -> global.
  FC_HD void flush(const uint16_t* sm, int m0, int n0, int grp, int tid) const {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    const int64_t choff = int64_t(grp) * chg + n0;
    if (vec) {
#pragma unroll 4
      for (int it = 0; it < BM * BN / 8 / THREADS; ++it) {
        const int idx = it * THREADS + tid, row = idx >> 4, c8 = (idx & 15) * 8;
        const int m = m0 + row;
        if (m < M && n0 + c8 < chg)
          *reinterpret_cast<uint4*>(o + pix(m) + choff + c8) =
              *reinterpret_cast<const uint4*>(sm + row * LDC + c8);
      }
    } else if (os[1] == 1) {  // channels contiguous: neighbouring threads take neighbouring channels
      for (int it = 0; it < BM * BN / THREADS; ++it) {
        const int idx = it * THREADS + tid, row = idx >> 7, col = idx & 127;
        const int m = m0 + row;
        if (m < M && n0 + col < chg) o[pix(m) + choff + col] = sm[row * LDC + col];
      }
    } else {  // pixels contiguous (NCHW): neighbouring threads take neighbouring pixels
      for (int it = 0; it < BM * BN / THREADS; ++it) {
        const int idx = it * THREADS + tid, row = idx & 127, col = idx >> 7;
        const int m = m0 + row;
        if (m < M && n0 + col < chg) o[pix(m) + (choff + col) * os[1]] = sm[row * LDC + col];
      }
    }
  }
};

// grad_weight partial sums: ws[(group * splits + split)][row][col], accumulator precision.
template <typename A> struct EpiWs {
  A* ws;
  int rows, cols, splits;
  FC_HD void put(int r, int c, int grp, int split, A v) const {
    if (r < rows && c < cols) ws[(int64_t(grp * splits + split) * rows + r) * cols + c] = v;
  }
  // Straight from the accumulators: the partial tile is written once per CTA.
  FC_HD void stage(float (&acc)[4][4][4], uint16_t*, int m0, int n0, int grp, int split, int wm,
                   int wn, int lane) const {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          put(m0 + wm * 64 + i * 16 + (lane >> 2) + (e >> 1) * 8,
              n0 + wn * 32 + j * 8 + (lane & 3) * 2 + (e & 1), grp, split, A(acc[i][j][e]));
  }
  FC_HD void flush(const uint16_t*, int, int, int, int) const {}
};

// grad_weight element i (flat in (k, c, r, s) order) = the split partials summed in split order.
// rsc: workspace columns are (r, s, c), else (c, r, s).
template <typename T, typename A>
FC_HD void wgrad_reduce_one(const A* ws, T* dw, int Kg, int Cg, int R, int S, int splits, bool rsc,
                            int64_t w0, int64_t w1, int64_t w2, int64_t w3, int64_t i) {
  const int s = int(i % S), r = int((i / S) % R), c = int((i / (S * R)) % Cg);
  const int k = int(i / (int64_t(S) * R * Cg));
  const int grp = k / Kg, kk = k % Kg;
  const int cols = Cg * R * S;
  const int col = rsc ? (r * S + s) * Cg + c : (c * R + r) * S + s;
  A sum = 0;
  for (int sp = 0; sp < splits; ++sp)
    sum += ws[(int64_t(grp * splits + sp) * Kg + kk) * cols + col];
  dw[k * w0 + c * w1 + r * w2 + s * w3] = from_acc<T>(sum);
}

// ----------------------------------------------------------------------------------------------
// Tensor-core GEMM (sm_80+): PTX wrappers, loaders, kernel
// ----------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared tiles are [rows][32] halves = 4 chunks of 16 bytes per row. The chunk index is XORed
// with (row / 2) % 4 so that the 8 rows one ldmatrix phase reads fall in distinct banks.
FC_HD int swz_chunk(int row, int chunk) {
  return row * BK + (((chunk ^ (row >> 1)) & 3) << 3);
}
FC_HD int swz(int row, int k) { return swz_chunk(row, k >> 3) + (k & 7); }

// Shared-memory offsets (halves) that lane `lane` hands to ldmatrix.x4 for the A fragment
// (rows wm*64 + i*16 .. +16, k16-th 16 columns) and for B fragments jj*2, jj*2+1 (cols
// wn*32 + jj*16 .. +16). Matrix q of an x4 load takes its 8 row addresses from lanes 8q..8q+7:
// A: q = (row half, k half) = (q & 1, q >> 1); B: q = (n half, k half) = (q >> 1, q & 1).
FC_HD int a_frag_off(int wm, int i, int k16, int lane) {
  return swz_chunk(wm * 64 + i * 16 + (lane & 15), k16 * 2 + (lane >> 4));
}
FC_HD int b_frag_off(int wn, int jj, int k16, int lane) {
  return swz_chunk(wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3), k16 * 2 + ((lane >> 3) & 1));
}

FC_HD void cp_async16(uint16_t* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
#endif
#else  // host emulation: the same zero-fill semantics
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int e = 0; e < 8; ++e) dst[e] = pred ? s[e] : uint16_t(0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

// mma.sync m16n8k16 with f32 accumulators; TY is the PTX operand type (f16 or bf16).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FC_MMA_16816(TY)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, "   \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                 \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#else
#define FC_MMA_16816(TY)
#endif
template <typename T> struct Mma {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>);
    if constexpr (std::is_same_v<T, c10::Half>) FC_MMA_16816("f16");
    else FC_MMA_16816("bf16");
  }
};
#undef FC_MMA_16816

// One BK=32 slice of the 128x128 tile: warp (wm, wn) owns rows wm*64.. and cols wn*32..
// Rows of a prepacked row-major [groups * rows_per_group][ld] matrix (weights), cp.async.
template <typename T> struct RowsCp {
  const T* w;
  int64_t ld;
  int rows_per_group;
  const T* p[2];
  bool ok[2];
  int chunk, kt;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    chunk = tid & 3;
    kt = kt0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + (tid >> 2) + i * 64;
      ok[i] = r < rows_per_group;
      p[i] = w + int64_t(grp * rows_per_group + (ok[i] ? r : 0)) * ld + chunk * 8;
    }
  }
  FC_HD void issue(uint16_t* st) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async16(st + swz_chunk((FC_TID() >> 2) + i * 64, chunk), ok[i] ? p[i] + kt * BK : w,
                 ok[i]);
    ++kt;
  }
  FC_HD void store(uint16_t*) {}
};

// k-tile counter of the vector forward and grad_input loaders: (r, s, 32-channel block b), b
// fastest.
struct RsBlock {
  int r, s, b;
  FC_HD void start(int kt0, int blocks, int S) {
    b = kt0 % blocks;
    const int rs = kt0 / blocks;
    r = rs / S;
    s = rs % S;
  }
  FC_HD void next(int blocks, int S) {
    if (++b == blocks) { b = 0; if (++s == S) { s = 0; ++r; } }
  }
};

// Forward A from a channels_last input with Cg % 8 == 0: reduction tiles are (r, s, 32
// channels); 16-byte cp.async per (pixel, 8 channels), zero-filled outside the image.
template <typename T> struct FwdAVec {
  const T* x;
  Geom g;
  FastDiv dPQ, dQ;
  int M, CB;  // CB: 32-channel blocks per (r, s)
  int64_t base[2];
  int h0[2], w0[2];
  bool rok[2];
  int chunk;
  RsBlock t;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    chunk = tid & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = row0 + (tid >> 2) + i * 64;
      rok[i] = m < M;
      const Pix px = pix_col(dPQ, dQ, rok[i] ? m : 0);
      base[i] = int64_t(px.n) * g.xs[0] + grp * g.Cg + chunk * 8;
      h0[i] = px.p * g.sh - g.ph;
      w0[i] = px.q * g.sw - g.pw;
    }
    t.start(kt0, CB, g.S);
  }
  FC_HD void issue(uint16_t* st) {
    const bool cok = t.b * BK + chunk * 8 < g.Cg;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = h0[i] + t.r * g.dh, w = w0[i] + t.s * g.dw;
      const bool ok = rok[i] && cok && unsigned(h) < unsigned(g.H) && unsigned(w) < unsigned(g.W);
      const T* src = ok ? x + base[i] + h * g.xs[2] + w * g.xs[3] + t.b * BK : x;
      cp_async16(st + swz_chunk((FC_TID() >> 2) + i * 64, chunk), src, ok);
    }
    t.next(CB, g.S);
  }
  FC_HD void store(uint16_t*) {}
};

// dgrad A from channels_last grad_output with Kg % 8 == 0: tiles are (r, s, 32 channels);
// 16-byte loads of grad_output and the saved output, masked in registers. (Must differ from
// FwdAVec: the ReLU mask needs the data in registers, so no cp.async; the gather is transposed.)
template <typename T> struct DgradAVec {
  const T* dy;
  const T* y;
  bool relu;
  Geom g;
  FastDiv dHW, dW;
  int M, KB;
  int64_t base[2];
  int hh[2], ww[2];
  bool rok[2];
  int chunk;
  RsBlock t;
  uint4 v[2];
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    chunk = tid & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = row0 + (tid >> 2) + i * 64;
      rok[i] = m < M;
      const Pix px = pix_col(dHW, dW, rok[i] ? m : 0);  // an input pixel (n, h, w)
      base[i] = int64_t(px.n) * g.ys[0] + grp * g.Kg + chunk * 8;
      hh[i] = px.p + g.ph;
      ww[i] = px.q + g.pw;
    }
    t.start(kt0, KB, g.S);
  }
  FC_HD void issue(uint16_t*) {
    const bool kok = t.b * BK + chunk * 8 < g.Kg;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pn = hh[i] - t.r * g.dh, qn = ww[i] - t.s * g.dw;
      bool ok = rok[i] && kok && pn >= 0 && qn >= 0;
      const int p = ok ? pn / g.sh : 0, q = ok ? qn / g.sw : 0;
      ok = ok && p * g.sh == pn && q * g.sw == qn && p < g.P && q < g.Q;
      v[i] = make_uint4(0, 0, 0, 0);
      if (ok) {
        const int64_t off = base[i] + p * g.ys[2] + q * g.ys[3] + t.b * BK;
        Vec<T, 8> d = load_vec<T, 8>(dy + off);
        if (relu) {
          const Vec<T, 8> o = load_vec<T, 8>(y + off);
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (!relu_passes(o.v[e])) d.v[e] = T(0);
        }
        v[i] = *reinterpret_cast<const uint4*>(&d);
      }
    }
    t.next(KB, g.S);
  }
  FC_HD void store(uint16_t* st) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      *reinterpret_cast<uint4*>(st + swz_chunk((FC_TID() >> 2) + i * 64, chunk)) = v[i];
  }
};

// wgrad operands from channels_last tensors: each lane owns one pixel of the 32-pixel reduction
// tile and each warp two 8-channel chunks; a 16-byte load is transposed into eight 2-byte
// shared stores (the lanes of a warp write one 64-byte row: no bank conflicts).
// The output pixel of this lane's reduction column in k-tile kt; mok: the column is < M.
FC_HD Pix lane_pix(int kt, int M, const FastDiv& dPQ, const FastDiv& dQ, bool& mok) {
  const int m = kt * BK + (FC_TID() & 31);
  mok = m < M;
  return pix_col(dPQ, dQ, mok ? m : 0);
}
// Lane = reduction column; the warp's two 8-channel chunks become rows (warp + 8 i) * 8 + e.
template <typename T> FC_HD void store_transposed(uint16_t* st, const Vec<T, 8> (&v)[2]) {
  const int lane = FC_TID() & 31, warp = FC_TID() >> 5;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) st[swz((warp + 8 * i) * 8 + e, lane)] = bits16(v[i].v[e]);
}

template <typename T> struct WgradAVec {  // rows: output channels; needs Kg % 8 == 0
  const T* dy;
  const T* y;
  bool relu;
  Geom g;
  FastDiv dPQ, dQ;
  int M;
  int64_t cbase[2];
  bool cok[2];
  int kt;
  Vec<T, 8> v[2];
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    const int warp = tid >> 5;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = row0 + (warp + 8 * i) * 8;
      cok[i] = k < g.Kg;
      cbase[i] = grp * g.Kg + k;
    }
    kt = kt0;
  }
  FC_HD void issue(uint16_t*) {
    bool mok;
    const Pix px = lane_pix(kt, M, dPQ, dQ, mok);
    const int64_t off = int64_t(px.n) * g.ys[0] + int64_t(px.p) * g.ys[2] + int64_t(px.q) * g.ys[3];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i].v[e] = T(0);
      if (mok && cok[i]) {
        v[i] = load_vec<T, 8>(dy + off + cbase[i]);
        if (relu) {
          const Vec<T, 8> o = load_vec<T, 8>(y + off + cbase[i]);
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (!relu_passes(o.v[e])) v[i].v[e] = T(0);
        }
      }
    }
    ++kt;
  }
  FC_HD void store(uint16_t* st) { store_transposed(st, v); }
};

// rows: (r, s, c) with c fastest; needs Cg % 8 == 0. Must differ from WgradAVec: an im2col
// gather of the input (bounds per tap), where A reads whole masked grad_output pixels.
template <typename T> struct WgradBVec {
  const T* x;
  Geom g;
  FastDiv dPQ, dQ;
  int M;
  int64_t cbase[2];
  int roff[2], soff[2];
  bool jok[2];
  int kt;
  Vec<T, 8> v[2];
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    const int warp = tid >> 5;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = row0 + (warp + 8 * i) * 8;
      jok[i] = j < g.R * g.S * g.Cg;
      const int jj = jok[i] ? j : 0;
      const int rs = jj / g.Cg, c0 = jj % g.Cg;
      roff[i] = (rs / g.S) * g.dh - g.ph;
      soff[i] = (rs % g.S) * g.dw - g.pw;
      cbase[i] = grp * g.Cg + c0;
    }
    kt = kt0;
  }
  FC_HD void issue(uint16_t*) {
    bool mok;
    const Pix px = lane_pix(kt, M, dPQ, dQ, mok);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = px.p * g.sh + roff[i], w = px.q * g.sw + soff[i];
      if (mok && jok[i] && unsigned(h) < unsigned(g.H) && unsigned(w) < unsigned(g.W)) {
        v[i] = load_vec<T, 8>(x + int64_t(px.n) * g.xs[0] + int64_t(h) * g.xs[2] +
                              int64_t(w) * g.xs[3] + cbase[i]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[i].v[e] = T(0);
      }
    }
    ++kt;
  }
  FC_HD void store(uint16_t* st) { store_transposed(st, v); }
};

// Any gather description, element by element: thread = one row, 16 consecutive reduction
// columns; 16 independent loads in flight per thread, then two 16-byte shared stores.
template <typename T, class Desc> struct GatherLd {
  Desc d;
  typename Desc::Row rw;
  uint32_t pk[8];
  int kt;
  FC_HD void init(int row0, int grp, int kt0, int tid) {
    d.grp = grp;
    rw = d.row(row0 + (tid & 127));
    kt = kt0;
  }
  FC_HD void issue(uint16_t*) {
    auto c = d.col(kt * BK + (FC_TID() >> 7) * 16);
    uint16_t v[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      v[j] = bits16(d.load(rw, c));
      d.next(c);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) pk[j] = uint32_t(v[2 * j]) | (uint32_t(v[2 * j + 1]) << 16);
    ++kt;
  }
  FC_HD void store(uint16_t* st) {
    const int row = FC_TID() & 127, kh = FC_TID() >> 7;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<uint4*>(st + swz_chunk(row, kh * 2 + h)) =
          make_uint4(pk[4 * h], pk[4 * h + 1], pk[4 * h + 2], pk[4 * h + 3]);
  }
};

// ----------------------------------------------------------------------------------------------
// SIMT tile (float32/float64, and 16-bit before sm_80): 64x64x16, 4x4 outputs per thread.
// Thread tid stages row (tid & 63), reduction columns (tid >> 6) * 4 .. +4 of both operands
// into As/Bs [k][row]; it computes rows tx + 16 i and columns ty + 16 j (tx = tid & 15,
// ty = tid >> 4) so that a warp's shared reads are 16 consecutive words plus a broadcast.
// ----------------------------------------------------------------------------------------------

constexpr int SBM = 64, SBN = 64, SBK = 16;

template <typename T, class DA, class DB, typename A>
FC_HD void simt_stage(const DA& da, const DB& db, const typename DA::Row& ra,
                      const typename DB::Row& rb, int kt, int tid, A (*As)[SBM], A (*Bs)[SBN]) {
  const int lr = tid & 63, lk = (tid >> 6) * 4;
  auto ca = da.col(kt * SBK + lk);
  auto cb = db.col(kt * SBK + lk);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    As[lk + j][lr] = to_acc(da.load(ra, ca));
    Bs[lk + j][lr] = to_acc(db.load(rb, cb));
    da.next(ca);
    db.next(cb);
  }
}

template <typename A>
FC_HD void simt_math(const A (*As)[SBM], const A (*Bs)[SBN], int tid, A (&acc)[4][4]) {
  const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int kk = 0; kk < SBK; ++kk) {
    A a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[kk][tx + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[kk][ty + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

template <class Epi, typename A>
FC_HD void simt_store(const Epi& epi, int m0, int n0, int grp, int split, int tid,
                      const A (&acc)[4][4]) {
  const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) epi.put(m0 + tx + 16 * i, n0 + ty + 16 * j, grp, split, acc[i][j]);
}

}  // namespace convk
}  // namespace fastconv_cuda
