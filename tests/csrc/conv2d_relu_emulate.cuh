// CPU emulation of the conv kernels (conv2d_relu.cu), for machines without a GPU.
//
// It runs the real loaders, gather descriptions, shared-memory swizzle, ldmatrix fragment
// addressing and epilogues from conv2d_relu_kernels.cuh thread by thread, emulates ldmatrix.x4 and
// mma.m16n8k16 from their PTX definitions, runs the SIMT kernel's phases (float32, float64, and
// 16-bit as on pre-sm_80 devices), and compares forward, grad_input and grad_weight with a
// float64 reference. It also checks that every shared-memory element of every tile is
// written before use. Not part of the extension: tests/test_extension_cuda.py compiles it as a
// host program (`nvcc -x cu` of a two-line main that calls fastconv_cuda::emu::run_all()).
#pragma once

#include "conv2d_relu_kernels.cuh"
#include "conv2d_relu_plan.h"
#include "conv2d_relu_tc.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <array>
#include <cstring>
#include <vector>

namespace fastconv_cuda {
namespace emu {

using namespace convk;

constexpr uint16_t kSentinel = 0x7E01;  // a NaN in fp16 and bf16: never an input value here

template <typename T> double dbl(T v) { return double(to_acc(v)); }

template <typename T> float fl(uint16_t b) { return float(from_bits16<T>(b)); }

struct AccT { float v[4][4][4]; };

// Warp w of a CTA: the fragments of one k16 step, rebuilt from what each lane would receive.
template <typename T>
void warp_mma(const uint16_t* sA, const uint16_t* sB, int w, int k16, std::vector<AccT>& acc) {
  const int wm = w & 1, wn = w >> 1;
  float A[4][16][16], B[4][16][8];
  uint16_t mat[4][8][8];
  auto ldsm = [&](const uint16_t* base, auto off_of) {
    for (int l = 0; l < 32; ++l) {  // lanes 8q..8q+7 give the rows of matrix q
      const int off = off_of(l);
      for (int e = 0; e < 8; ++e) mat[l >> 3][l & 7][e] = base[off + e];
    }
  };
  for (int i = 0; i < 4; ++i) {
    ldsm(sA, [&](int l) { return a_frag_off(wm, i, k16, l); });
    for (int t = 0; t < 32; ++t)      // thread t holds (row t/4, cols 2(t%4)+h) of matrix q
      for (int q = 0; q < 4; ++q)     // in register q; mma reads a register q as
        for (int h = 0; h < 2; ++h)   // A[g + 8(q&1)][2t' + h + 8(q>>1)]
          A[i][(t >> 2) + 8 * (q & 1)][2 * (t & 3) + h + 8 * (q >> 1)] =
              fl<T>(mat[q][t >> 2][2 * (t & 3) + h]);
  }
  for (int jj = 0; jj < 2; ++jj) {
    ldsm(sB, [&](int l) { return b_frag_off(wn, jj, k16, l); });
    for (int t = 0; t < 32; ++t)      // registers (r0, r1, r2, r3) = (b0, b1) of n-frags 2jj, 2jj+1;
      for (int q = 0; q < 4; ++q)     // b register h' of a fragment holds B[2t' + h + 8h'][g]
        for (int h = 0; h < 2; ++h)
          B[jj * 2 + (q >> 1)][2 * (t & 3) + h + 8 * (q & 1)][t >> 2] =
              fl<T>(mat[q][t >> 2][2 * (t & 3) + h]);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      for (int t = 0; t < 32; ++t)
        for (int e = 0; e < 4; ++e) {
          const int row = (t >> 2) + 8 * (e >> 1), col = 2 * (t & 3) + (e & 1);
          float s = 0.f;
          for (int k = 0; k < 16; ++k) s += A[i][row][k] * B[j][k][col];
          acc[w * 32 + t].v[i][j][e] += s;
        }
}

// The schedule of mma_gemm_kernel, CTA by CTA, thread by thread. Returns the number of tile
// elements that no thread wrote.
template <typename T, class LA, class LB, class Epi>
long run_mma(const LA& la0, const LB& lb0, const Epi& epi, int64_t rows, int64_t cols, int G,
             int splits, int kt_total, int kps) {
  const int tms = int(ceil_div(rows, BM)), tns = int(ceil_div(cols, BN));
  std::vector<uint16_t> sA(BM * BK), sB(BN * BK), sC(BM * LDC);
  long unwritten = 0;
  for (int z = 0; z < G * splits; ++z)
    for (int bid = 0; bid < tms * tns; ++bid) {
      const int tn = bid % tns, tm = bid / tns, grp = z / splits, split = z % splits;
      const int kt0 = split * kps;
      const int nkt = std::max(0, std::min(kt_total, kt0 + kps) - kt0);
      std::vector<LA> la(THREADS, la0);
      std::vector<LB> lb(THREADS, lb0);
      for (int t = 0; t < THREADS; ++t) {
        fc_emu_tid = t;
        la[t].init(tm * BM, grp, kt0, t);
        lb[t].init(tn * BN, grp, kt0, t);
      }
      std::vector<AccT> acc(THREADS);
      for (auto& a : acc)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e) a.v[i][j][e] = 0.f;
      for (int it = 0; it < nkt; ++it) {
        std::fill(sA.begin(), sA.end(), kSentinel);
        std::fill(sB.begin(), sB.end(), kSentinel);
        for (int t = 0; t < THREADS; ++t) {
          fc_emu_tid = t;
          la[t].issue(sA.data());
          lb[t].issue(sB.data());
        }
        for (int t = 0; t < THREADS; ++t) {
          fc_emu_tid = t;
          la[t].store(sA.data());
          lb[t].store(sB.data());
        }
        for (uint16_t v : sA) unwritten += v == kSentinel;
        for (uint16_t v : sB) unwritten += v == kSentinel;
        for (int w = 0; w < THREADS / 32; ++w)
          for (int k16 = 0; k16 < 2; ++k16) warp_mma<T>(sA.data(), sB.data(), w, k16, acc);
      }
      for (int t = 0; t < THREADS; ++t) {
        fc_emu_tid = t;
        const int warp = t >> 5;
        epi.stage(acc[t].v, sC.data(), tm * BM, tn * BN, grp, split, warp & 1, warp >> 1, t & 31);
      }
      for (int t = 0; t < THREADS; ++t) {
        fc_emu_tid = t;
        epi.flush(sC.data(), tm * BM, tn * BN, grp, t);
      }
    }
  return unwritten;
}

// The schedule of simt_gemm_kernel.
template <typename T, class DA, class DB, class Epi>
void run_simt(const DA& da0, const DB& db0, const Epi& epi, int64_t rows, int64_t cols, int G,
              int splits, int kt_total, int kps) {
  using A = typename Acc<T>::type;
  const int tms = int(ceil_div(rows, SBM)), tns = int(ceil_div(cols, SBN));
  std::vector<A> as(SBK * SBM), bs(SBK * SBN);
  auto* As = reinterpret_cast<A (*)[SBM]>(as.data());
  auto* Bs = reinterpret_cast<A (*)[SBN]>(bs.data());
  for (int z = 0; z < G * splits; ++z)
    for (int bid = 0; bid < tms * tns; ++bid) {
      const int tn = bid % tns, tm = bid / tns, grp = z / splits, split = z % splits;
      const int kt0 = split * kps, kt1 = std::min(kt_total, kt0 + kps);
      DA da = da0;
      DB db = db0;
      da.grp = grp;
      db.grp = grp;
      std::vector<typename DA::Row> ra;
      std::vector<typename DB::Row> rb;
      for (int t = 0; t < THREADS; ++t) {
        ra.push_back(da.row(tm * SBM + (t & 63)));
        rb.push_back(db.row(tn * SBN + (t & 63)));
      }
      std::vector<std::array<std::array<A, 4>, 4>> acc(THREADS);
      for (auto& a : acc)
        for (auto& r : a) r.fill(A(0));
      for (int kt = kt0; kt < kt1; ++kt) {
        std::fill(as.begin(), as.end(), A(NAN));
        std::fill(bs.begin(), bs.end(), A(NAN));
        for (int t = 0; t < THREADS; ++t) simt_stage<T>(da, db, ra[t], rb[t], kt, t, As, Bs);
        for (int t = 0; t < THREADS; ++t) {
          A a[4][4];
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) a[i][j] = acc[t][i][j];
          simt_math(As, Bs, t, a);
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[t][i][j] = a[i][j];
        }
      }
      for (int t = 0; t < THREADS; ++t) {
        A a[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = acc[t][i][j];
        simt_store(epi, tm * SBM, tn * SBN, grp, split, t, a);
      }
    }
}

template <typename T> constexpr bool is_wide() {
  return std::is_same<T, float>::value || std::is_same<T, double>::value;
}

// ---- one conv problem ----

struct Case {
  int N, C, H, W, K, R, S, sh, sw, ph, pw, dh, dw, G;
  bool relu, nhwc, bias;
  bool force_gather_a, force_gather_b;
};

inline std::string describe(const Case& c) {
  char b[256];
  snprintf(b, sizeof b, "N%d C%d %dx%d K%d %dx%d s%d,%d p%d,%d d%d,%d g%d relu%d %s%s%s", c.N, c.C,
           c.H, c.W, c.K, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.dh, c.dw, c.G, int(c.relu),
           c.nhwc ? "nhwc" : "nchw", c.force_gather_a ? " gatherA" : "",
           c.force_gather_b ? " gatherB" : "");
  return b;
}

// Strides of a logical (n, c, h, w) tensor in either layout.
inline void strides(int64_t (&s)[4], int C, int H, int W, bool nhwc) {
  if (nhwc) { s[0] = int64_t(H) * W * C; s[1] = 1; s[2] = int64_t(W) * C; s[3] = C; }
  else      { s[0] = int64_t(C) * H * W; s[1] = int64_t(H) * W; s[2] = W; s[3] = 1; }
}

inline Geom geom_of(const Case& c) {
  Geom g{};
  g.N = c.N; g.C = c.C; g.H = c.H; g.W = c.W; g.K = c.K; g.R = c.R; g.S = c.S;
  g.P = int(plan::conv_out(c.H, c.R, c.sh, c.ph, c.dh));
  g.Q = int(plan::conv_out(c.W, c.S, c.sw, c.pw, c.dw));
  g.sh = c.sh; g.sw = c.sw; g.ph = c.ph; g.pw = c.pw; g.dh = c.dh; g.dw = c.dw;
  g.G = c.G; g.Cg = c.C / c.G; g.Kg = c.K / c.G;
  strides(g.xs, c.C, c.H, c.W, c.nhwc);
  strides(g.ys, c.K, g.P, g.Q, c.nhwc);
  return g;
}

template <typename T> struct Problem {
  Case cs;
  Geom g{};
  int P, Q;
  std::vector<T> x, wt, dy, y;   // wt is (K, Cg, R, S) contiguous
  std::vector<float> bias;
  std::mt19937 rng;

  explicit Problem(const Case& c) : cs(c), g(geom_of(c)), P(g.P), Q(g.Q), rng(1234) {
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    auto fill = [&](std::vector<T>& v, size_t n) {
      v.resize(n);
      for (auto& e : v) e = T(U(rng));
    };
    fill(x, size_t(c.N) * c.C * c.H * c.W);
    fill(wt, size_t(c.K) * g.Cg * c.R * c.S);
    fill(dy, size_t(c.N) * c.K * P * Q);
    fill(y, size_t(c.N) * c.K * P * Q);  // the saved output: about half of it <= 0
    bias.resize(c.K);
    for (auto& e : bias) e = U(rng);
  }
  double X(int n, int c, int h, int w) const {
    return dbl(x[n * g.xs[0] + c * g.xs[1] + h * g.xs[2] + w * g.xs[3]]);
  }
  double Wt(int k, int c, int r, int s) const {
    return dbl(wt[((int64_t(k) * g.Cg + c) * g.R + r) * g.S + s]);
  }
  int64_t yoff(int n, int k, int p, int q) const {
    return n * g.ys[0] + k * g.ys[1] + p * g.ys[2] + q * g.ys[3];
  }
  // The weights as a CPU tensor (no copy) for the planner's packing functions.
  at::Tensor weights() const {
    return at::from_blob(const_cast<T*>(wt.data()), {cs.K, g.Cg, cs.R, cs.S},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  }
  double DYm(int n, int k, int p, int q) const {
    const int64_t o = yoff(n, k, p, q);
    if (cs.relu && float(y[o]) <= 0.f) return 0.0;
    return dbl(dy[o]);
  }
};

template <typename T> double tol_of() {
  if (std::is_same<T, double>::value) return 1e-12;
  if (std::is_same<T, float>::value) return 1e-5;
  return std::is_same<T, c10::BFloat16>::value ? 1.0 / 128 : 1.0 / 1024;
}

template <typename T> EpiPixel<T> epi_for(T* out, const int64_t (&os)[4], int64_t rows, int H,
                                          int W, int chg, int ctot,
                                          const typename Acc<T>::type* bias, bool relu) {
  EpiPixel<T> e;
  plan::fill_epi(e, out, os, rows, H, W, chg, ctot, bias, relu, true);
  return e;
}

// forward: returns the number of mismatches (printing the first few)
template <typename T> long check_fwd(const Case& c, bool simt = is_wide<T>()) {
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  std::vector<T> out(size_t(g.N) * g.K * g.P * g.Q, T(NAN));
  using A = typename Acc<T>::type;
  const std::vector<A> bias(pb.bias.begin(), pb.bias.end());
  const EpiPixel<T> epi = epi_for<T>(out.data(), g.ys, M, g.P, g.Q, g.Kg, g.K,
                                     c.bias ? bias.data() : nullptr, c.relu);
  long bad = 0;
  if (simt) {
    FwdA<T> da{pb.x.data(), g, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q),
               FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
    const int64_t ws[4] = {int64_t(g.Cg) * g.R * g.S, int64_t(g.R) * g.S, g.S, 1};
    const auto db = plan::simt_weights<FwdB<T>>(pb.wt.data(), ws, g);
    const int kt = int(ceil_div(int64_t(g.Cg) * g.R * g.S, SBK));
    run_simt<T>(da, db, epi, M, g.Kg, g.G, 1, kt, kt);
  } else if constexpr (!is_wide<T>()) {
   if (g.Cg % 8 == 0 && c.nhwc && !c.force_gather_a) {
    int64_t Cpad = 0;
    const at::Tensor wp = plan::pack_fwd_weight_cpad(pb.weights(), g.G, Cpad);
    const int64_t ld = g.R * g.S * Cpad;
    FwdAVec<T> la{pb.x.data(), g, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q), int(M), int(Cpad / BK)};
    RowsCp<T> lb{wp.data_ptr<T>(), ld, g.Kg};
    bad += run_mma<T>(la, lb, epi, M, g.Kg, g.G, 1, int(ld / BK), int(ld / BK));
  } else {
    int64_t KRp = 0;
    const at::Tensor wp = plan::pack_fwd_weight_rows(pb.weights(), KRp);
    GatherLd<T, FwdA<T>> la{};
    la.d = FwdA<T>{pb.x.data(), g, FastDiv(int64_t(g.P) * g.Q), FastDiv(g.Q),
                   FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
    RowsCp<T> lb{wp.data_ptr<T>(), KRp, g.Kg};
    bad += run_mma<T>(la, lb, epi, M, g.Kg, g.G, 1, int(KRp / BK), int(KRp / BK));
  }
  }
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  const double tol = tol_of<T>();
  for (int n = 0; n < g.N; ++n)
    for (int k = 0; k < g.K; ++k)
      for (int p = 0; p < g.P; ++p)
        for (int q = 0; q < g.Q; ++q) {
          const int grp = k / g.Kg;
          double ref = c.bias ? double(pb.bias[k]) : 0.0;
          for (int cc = 0; cc < g.Cg; ++cc)
            for (int r = 0; r < g.R; ++r)
              for (int s = 0; s < g.S; ++s) {
                const int h = p * g.sh - g.ph + r * g.dh, w = q * g.sw - g.pw + s * g.dw;
                if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
                ref += pb.X(n, grp * g.Cg + cc, h, w) * pb.Wt(k, cc, r, s);
              }
          if (c.relu && ref < 0) ref = 0;
          const double got = dbl(out[pb.yoff(n, k, p, q)]);
          if (!(std::fabs(got - ref) <= tol * (1 + std::fabs(ref)))) {
            if (bad < 5) printf("  fwd n%d k%d p%d q%d: got %g want %g\n", n, k, p, q, got, ref);
            ++bad;
          }
        }
  return bad;
}

template <typename T> long check_dgrad(const Case& c, bool simt = is_wide<T>()) {
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t M = int64_t(g.N) * g.H * g.W;
  std::vector<T> dx(size_t(g.N) * g.C * g.H * g.W, T(NAN));
  const EpiPixel<T> epi = epi_for<T>(dx.data(), g.xs, M, g.H, g.W, g.Cg, g.C, nullptr, false);
  long bad = 0;
  if (simt) {
    DgradA<T> da{pb.dy.data(), pb.y.data(), c.relu, g, FastDiv(int64_t(g.H) * g.W),
                 FastDiv(g.W), FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
    const int64_t ws[4] = {int64_t(g.Cg) * g.R * g.S, int64_t(g.R) * g.S, g.S, 1};
    const auto db = plan::simt_weights<DgradB<T>>(pb.wt.data(), ws, g);
    const int kt = int(ceil_div(int64_t(g.Kg) * g.R * g.S, SBK));
    run_simt<T>(da, db, epi, M, g.Cg, g.G, 1, kt, kt);
  } else if constexpr (!is_wide<T>()) {
   if (g.Kg % 8 == 0 && c.nhwc && !c.force_gather_a) {
    int64_t Kpad = 0;
    const at::Tensor wp = plan::pack_dgrad_weight_kpad(pb.weights(), g.G, Kpad);
    const int64_t ld = g.R * g.S * Kpad;
    DgradAVec<T> la{pb.dy.data(), pb.y.data(), c.relu, g, FastDiv(int64_t(g.H) * g.W),
                    FastDiv(g.W), int(M), int(Kpad / BK)};
    RowsCp<T> lb{wp.data_ptr<T>(), ld, g.Cg};
    bad += run_mma<T>(la, lb, epi, M, g.Cg, g.G, 1, int(ld / BK), int(ld / BK));
  } else {
    int64_t KRp = 0;
    const at::Tensor wp = plan::pack_dgrad_weight_rows(pb.weights(), g.G, KRp);
    GatherLd<T, DgradA<T>> la{};
    la.d = DgradA<T>{pb.dy.data(), pb.y.data(), c.relu, g, FastDiv(int64_t(g.H) * g.W),
                     FastDiv(g.W), FastDiv(int64_t(g.R) * g.S), FastDiv(g.S), int(M), 0};
    RowsCp<T> lb{wp.data_ptr<T>(), KRp, g.Cg};
    bad += run_mma<T>(la, lb, epi, M, g.Cg, g.G, 1, int(KRp / BK), int(KRp / BK));
  }
  }
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  const double tol = tol_of<T>();
  for (int n = 0; n < g.N; ++n)
    for (int ch = 0; ch < g.C; ++ch)
      for (int h = 0; h < g.H; ++h)
        for (int w = 0; w < g.W; ++w) {
          const int grp = ch / g.Cg, cc = ch % g.Cg;
          double ref = 0, mag = 0;
          for (int kk = 0; kk < g.Kg; ++kk)
            for (int r = 0; r < g.R; ++r)
              for (int s = 0; s < g.S; ++s) {
                const int pn = h + g.ph - r * g.dh, qn = w + g.pw - s * g.dw;
                if (pn < 0 || qn < 0 || pn % g.sh || qn % g.sw) continue;
                const int p = pn / g.sh, q = qn / g.sw;
                if (p >= g.P || q >= g.Q) continue;
                const double t = pb.DYm(n, grp * g.Kg + kk, p, q) * pb.Wt(grp * g.Kg + kk, cc, r, s);
                ref += t;
                mag += std::fabs(t);
              }
          const double got = dbl(dx[n * g.xs[0] + ch * g.xs[1] + h * g.xs[2] + w * g.xs[3]]);
          if (!(std::fabs(got - ref) <= tol * (1 + mag))) {
            if (bad < 5) printf("  dgrad n%d c%d h%d w%d: got %g want %g\n", n, ch, h, w, got, ref);
            ++bad;
          }
        }
  return bad;
}

// grad_weight from the split partials in ws (columns (r, s, c) when rsc), checked element by
// element against the float64 reference; `bad` counts on from the caller's.
template <typename T, typename A>
long wgrad_reduce_and_check(const Problem<T>& pb, const std::vector<A>& ws, int splits, bool rsc,
                            const char* what, long bad) {
  const Geom& g = pb.g;
  const int64_t cols = int64_t(g.Cg) * g.R * g.S;
  std::vector<T> dw(size_t(g.K) * cols, T(NAN));
  for (int64_t i = 0; i < int64_t(g.K) * cols; ++i)
    wgrad_reduce_one(ws.data(), dw.data(), g.Kg, g.Cg, g.R, g.S, splits, rsc, cols,
                     int64_t(g.R) * g.S, int64_t(g.S), int64_t(1), i);
  const double tol = tol_of<T>();
  for (int k = 0; k < g.K; ++k)
    for (int cc = 0; cc < g.Cg; ++cc)
      for (int r = 0; r < g.R; ++r)
        for (int s = 0; s < g.S; ++s) {
          const int grp = k / g.Kg;
          double ref = 0, mag = 0;
          for (int n = 0; n < g.N; ++n)
            for (int p = 0; p < g.P; ++p)
              for (int q = 0; q < g.Q; ++q) {
                const int h = p * g.sh - g.ph + r * g.dh, w = q * g.sw - g.pw + s * g.dw;
                if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
                const double t = pb.DYm(n, k, p, q) * pb.X(n, grp * g.Cg + cc, h, w);
                ref += t;
                mag += std::fabs(t);
              }
          const double got = dbl(dw[((int64_t(k) * g.Cg + cc) * g.R + r) * g.S + s]);
          if (!(std::fabs(got - ref) <= tol * (1 + mag))) {
            if (bad < 5) printf("  %s k%d c%d r%d s%d: got %g want %g\n", what, k, cc, r, s, got, ref);
            ++bad;
          }
        }
  return bad;
}

template <typename T> long check_wgrad(const Case& c, int want_splits, bool simt = is_wide<T>()) {
  using A = typename Acc<T>::type;
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t M = int64_t(g.N) * g.P * g.Q, cols = int64_t(g.Cg) * g.R * g.S;
  const int kt_total = int(ceil_div(M, simt ? SBK : BK));
  const auto [splits, kps] = plan::even_split(kt_total, want_splits);
  std::vector<A> ws(size_t(splits) * g.G * g.Kg * cols, A(NAN));
  EpiWs<A> epi{ws.data(), g.Kg, int(cols), splits};
  const bool avec = !simt && g.Kg % 8 == 0 && c.nhwc && !c.force_gather_a;
  const bool bvec = !simt && g.Cg % 8 == 0 && c.nhwc && !c.force_gather_b;
  const FastDiv dPQ(int64_t(g.P) * g.Q), dQ(g.Q), dRS(int64_t(g.R) * g.S), dS(g.S);
  WgradAVec<T> av{pb.dy.data(), pb.y.data(), c.relu, g, dPQ, dQ, int(M)};
  GatherLd<T, WgradA<T>> ag{};
  ag.d = WgradA<T>{pb.dy.data(), pb.y.data(), c.relu, g, dPQ, dQ, 0};
  WgradBVec<T> bv{pb.x.data(), g, dPQ, dQ, int(M)};
  GatherLd<T, WgradB<T>> bg{};
  bg.d = WgradB<T>{pb.x.data(), g, dPQ, dQ, dRS, dS, 0};
  long bad = 0;
  if (simt) {
    run_simt<T>(ag.d, bg.d, epi, g.Kg, cols, g.G, splits, kt_total, kps);
  } else if constexpr (!is_wide<T>()) {
    if (avec && bvec) bad += run_mma<T>(av, bv, epi, g.Kg, cols, g.G, splits, kt_total, kps);
    else if (avec) bad += run_mma<T>(av, bg, epi, g.Kg, cols, g.G, splits, kt_total, kps);
    else if (bvec) bad += run_mma<T>(ag, bv, epi, g.Kg, cols, g.G, splits, kt_total, kps);
    else bad += run_mma<T>(ag, bg, epi, g.Kg, cols, g.G, splits, kt_total, kps);
  }
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  return wgrad_reduce_and_check(pb, ws, splits, bvec, "wgrad", bad);
}

// ================================================================================================
// Large-tile kernel (conv2d_relu_tc.cuh): tc_gemm_kernel's schedule with ldmatrix(.trans) and
// mma.m16n8k16 emulated from their PTX definitions, register by register.
// ================================================================================================

// ldmatrix.sync.aligned.m8n8.x4[.trans].b16: lanes 8q..8q+7 give the addresses of rows 0..7 of
// matrix q; thread t receives in register q the pair (row t/4, columns 2(t%4), 2(t%4)+1) of
// matrix q, or with .trans the pair (rows 2(t%4), 2(t%4)+1, column t/4), low half first.
inline void emu_ldmatrix(const uint16_t* base, const int (&addr)[32], bool trans,
                         uint32_t (&reg)[32][4]) {
  for (int q = 0; q < 4; ++q)
    for (int t = 0; t < 32; ++t) {
      uint16_t lo, hi;
      if (!trans) {
        const uint16_t* row = base + addr[8 * q + (t >> 2)];
        lo = row[2 * (t & 3)];
        hi = row[2 * (t & 3) + 1];
      } else {
        lo = base[addr[8 * q + 2 * (t & 3)] + (t >> 2)];
        hi = base[addr[8 * q + 2 * (t & 3) + 1] + (t >> 2)];
      }
      reg[t][q] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32: thread t (g = t/4, c = t%4) holds A[g][2c..], A[g+8][2c..],
// A[g][2c+8..], A[g+8][2c+8..] in a0..a3, B[2c..][g], B[2c+8..][g] in b0, b1 and
// D[g][2c..2c+1], D[g+8][2c..2c+1] in d0..d3.
template <typename T>
void emu_mma(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (*d)[4]) {
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return fl<T>(uint16_t(r & 0xffff)); };
  auto hi = [](uint32_t r) { return fl<T>(uint16_t(r >> 16)); };
  for (int t = 0; t < 32; ++t) {
    const int g = t >> 2, c = t & 3;
    for (int q = 0; q < 4; ++q) {
      const int row = g + 8 * (q & 1), col = 2 * c + 8 * (q >> 1);
      A[row][col] = lo(a[t][q]);
      A[row][col + 1] = hi(a[t][q]);
    }
    for (int q = 0; q < 2; ++q) {
      B[2 * c + 8 * q][g] = lo(b[t][q]);
      B[2 * c + 8 * q + 1][g] = hi(b[t][q]);
    }
  }
  for (int t = 0; t < 32; ++t)
    for (int e = 0; e < 4; ++e) {
      const int row = (t >> 2) + 8 * (e >> 1), col = 2 * (t & 3) + (e & 1);
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      d[t][e] += s;
    }
}

template <class C> struct TcAcc { float v[C::MI][C::NI][4]; };

// tc_gemm_kernel, CTA by CTA, thread by thread. Returns the number of shared tile elements that
// no thread wrote (each stage is refilled with a sentinel before every k-tile).
template <typename T, class C, bool AK, bool BKM, class LA, class LB, class Epi>
long run_tc(const LA& la0, const LB& lb0, const Epi& epi, int64_t rows, int64_t cols, int G,
            int splits, int kt_total, int kps) {
  const int tms = int(ceil_div(rows, C::BM)), tns = int(ceil_div(cols, C::BN));
  std::vector<uint16_t> sA(C::A_STAGE), sB(C::B_STAGE), sC(C::SMEM / 2);
  long unwritten = 0;
  for (int z = 0; z < G * splits; ++z)
    for (int bid = 0; bid < tms * tns; ++bid) {
      const int tn = bid % tns, tm = bid / tns, grp = z / splits, split = z % splits;
      const int kt0 = split * kps;
      const int nkt = std::max(0, std::min(kt_total, kt0 + kps) - kt0);
      std::vector<LA> la(C::THREADS, la0);
      std::vector<LB> lb(C::THREADS, lb0);
      for (int t = 0; t < C::THREADS; ++t) {
        fc_emu_tid = t;
        la[t].init(tm * C::BM, grp, kt0, t);
        lb[t].init(tn * C::BN, grp, kt0, t);
      }
      std::vector<TcAcc<C>> acc(C::THREADS);
      for (auto& a : acc) std::memset(a.v, 0, sizeof a.v);
      for (int it = 0; it < nkt; ++it) {
        std::fill(sA.begin(), sA.end(), kSentinel);
        std::fill(sB.begin(), sB.end(), kSentinel);
        for (int t = 0; t < C::THREADS; ++t) {
          fc_emu_tid = t;
          la[t].issue(sA.data());
          lb[t].issue(sB.data());
        }
        for (uint16_t v : sA) unwritten += v == kSentinel;
        for (uint16_t v : sB) unwritten += v == kSentinel;
        for (int w = 0; w < C::THREADS / 32; ++w) {
          const int wm = w % C::WARPS_M, wn = w / C::WARPS_M;
          for (int kk = 0; kk < tc::BK / 16; ++kk) {
            static uint32_t ra[C::MI][32][4], rb[C::NI][32][2];
            int addr[32];
            uint32_t r[32][4];
            for (int mi = 0; mi < C::MI; ++mi) {
              for (int l = 0; l < 32; ++l) addr[l] = tc::a_off<C, AK>(wm, mi, kk, l);
              emu_ldmatrix(sA.data(), addr, !AK, ra[mi]);
            }
            for (int nj = 0; nj < C::NI / 2; ++nj) {
              for (int l = 0; l < 32; ++l) addr[l] = tc::b_off<C, BKM>(wn, nj, kk, l);
              emu_ldmatrix(sB.data(), addr, !BKM, r);
              for (int t = 0; t < 32; ++t) {
                rb[2 * nj][t][0] = r[t][0];
                rb[2 * nj][t][1] = r[t][1];
                rb[2 * nj + 1][t][0] = r[t][2];
                rb[2 * nj + 1][t][1] = r[t][3];
              }
            }
            for (int mi = 0; mi < C::MI; ++mi)
              for (int ni = 0; ni < C::NI; ++ni) {
                float d[32][4];
                for (int t = 0; t < 32; ++t)
                  for (int e = 0; e < 4; ++e) d[t][e] = acc[w * 32 + t].v[mi][ni][e];
                emu_mma<T>(ra[mi], rb[ni], d);
                for (int t = 0; t < 32; ++t)
                  for (int e = 0; e < 4; ++e) acc[w * 32 + t].v[mi][ni][e] = d[t][e];
              }
          }
        }
      }
      if constexpr (std::is_same<Epi, tc::EpiPart>::value) {
        for (int t = 0; t < C::THREADS; ++t) {
          const int w = t >> 5;
          epi.template stage<C>(acc[t].v, tm * C::BM, tn * C::BN, grp, split, w % C::WARPS_M,
                                w / C::WARPS_M, t & 31);
        }
      } else {
        std::fill(sC.begin(), sC.end(), kSentinel);
        for (int t = 0; t < C::THREADS; ++t) {
          const int w = t >> 5;
          epi.template stage<C>(acc[t].v, sC.data(), tn * C::BN, grp, w % C::WARPS_M,
                                w / C::WARPS_M, t & 31);
        }
        for (int r = 0; r < C::BM; ++r)  // every staged element of the tile was written
          for (int c = 0; c < C::BN; ++c) unwritten += sC[r * C::LDC + c] == kSentinel;
        for (int t = 0; t < C::THREADS; ++t) epi.template flush<C>(sC.data(), tm * C::BM, tn * C::BN, grp, t);
      }
    }
  return unwritten;
}

// wg_gemm_kernel (sm_90a): the Big tile's loaders, then per warpgroup and k16 step two
// m64n128k16 wgmma whose operands are read through the descriptors the kernel builds, under the
// model of the 128-byte swizzle in tc::wg_elem_addr; accumulators scattered to threads by the
// documented fragment layout (tc::wg_row / wg_col), then the kernel's epilogue.
template <typename T, class LA, class LB>
long run_wg(const LA& la0, const LB& lb0, const tc::EpiOut<T>& epi, int64_t rows, int64_t cols,
            int G, int kt_total) {
  using C = tc::Big;
  const int tms = int(ceil_div(rows, C::BM)), tns = int(ceil_div(cols, C::BN));
  std::vector<uint16_t> sA(C::A_STAGE), sB(C::B_STAGE), sC(C::SMEM / 2);
  long unwritten = 0;
  static float acc[C::THREADS][2][64];
  for (int grp = 0; grp < G; ++grp)
    for (int bid = 0; bid < tms * tns; ++bid) {
      const int tn = bid % tns, tm = bid / tns;
      std::vector<LA> la(C::THREADS, la0);
      std::vector<LB> lb(C::THREADS, lb0);
      for (int t = 0; t < C::THREADS; ++t) {
        fc_emu_tid = t;
        la[t].init(tm * C::BM, grp, 0, t);
        lb[t].init(tn * C::BN, grp, 0, t);
      }
      std::memset(acc, 0, sizeof acc);
      for (int it = 0; it < kt_total; ++it) {
        std::fill(sA.begin(), sA.end(), kSentinel);
        std::fill(sB.begin(), sB.end(), kSentinel);
        for (int t = 0; t < C::THREADS; ++t) {
          fc_emu_tid = t;
          la[t].issue(sA.data());
          lb[t].issue(sB.data());
        }
        for (uint16_t v : sA) unwritten += v == kSentinel;
        for (uint16_t v : sB) unwritten += v == kSentinel;
        for (int wg = 0; wg < 2; ++wg)
          for (int kk = 0; kk < tc::BK / 16; ++kk)
            for (int h = 0; h < 2; ++h) {
              // the kernel's descriptors, with stage byte offsets starting at 0 (1024-aligned)
              const uint64_t da = tc::wg_desc(uint32_t(wg * 128 * tc::BK * 2 + h * 64 * tc::BK * 2 + kk * 32));
              const uint64_t db = tc::wg_desc(uint32_t(kk * 32));
              static float D[64][128];
              for (int i = 0; i < 64; ++i)
                for (int n = 0; n < 128; ++n) {
                  float s = 0.f;
                  for (int k = 0; k < 16; ++k)
                    s += fl<T>(sA[tc::wg_elem_addr(da, i, k) / 2]) * fl<T>(sB[tc::wg_elem_addr(db, n, k) / 2]);
                  D[i][n] = s;
                }
              for (int t = 0; t < 128; ++t)
                for (int j = 0; j < 16; ++j)
                  for (int e = 0; e < 4; ++e)
                    acc[wg * 128 + t][h][4 * j + e] += D[tc::wg_row(t, e)][tc::wg_col(t, j, e)];
            }
      }
      std::fill(sC.begin(), sC.end(), kSentinel);
      for (int t = 0; t < C::THREADS; ++t) epi.stage_wg(acc[t], sC.data(), tn * C::BN, grp, t);
      for (int r = 0; r < C::BM; ++r)
        for (int c = 0; c < C::BN; ++c) unwritten += sC[r * C::LDC + c] == kSentinel;
      for (int t = 0; t < C::THREADS; ++t) epi.template flush<C>(sC.data(), tm * C::BM, tn * C::BN, grp, t);
    }
  return unwritten;
}

// The host's mask_bias launch geometry and both phases of mask_bias_kernel.
template <typename T>
void emu_mask_bias(const T* dy, const T* y, bool relu, T* dym, float* db_sum, int64_t M, int K,
                   int blocks_wanted) {
  const plan::MaskGrid mg = plan::mask_bias_grid(M, K, blocks_wanted);
  const int KV = mg.KV, PL = mg.PL;
  const int64_t per = mg.per, nb = mg.blocks;
  std::vector<float> red(256 * 8, NAN), part(size_t(nb) * K, NAN);
  for (int64_t b = 0; b < nb; ++b) {
    for (int ly = 0; ly < PL; ++ly)
      for (int v = 0; v < KV; ++v) {
        if (relu)
          tc::mask_bias_thread<T, true, true, true>(dy, y, dym, M, K, per, int(b), v, ly, KV, PL, red.data());
        else
          tc::mask_bias_thread<T, false, false, true>(dy, y, dym, M, K, per, int(b), v, ly, KV, PL, red.data());
      }
    for (int v = 0; v < KV; ++v) tc::mask_bias_sum(red.data(), KV, PL, v, part.data(), int(b), K);
  }
  for (int k = 0; k < K; ++k) {  // bias_final_kernel
    float s = 0.f;
    for (int64_t b = 0; b < nb; ++b) s += part[b * K + k];
    db_sum[k] = s;
  }
}

// forward through the large-tile kernel (channels_last, Cg % 8 == 0)
template <typename T, class C, bool WG = false> long check_fwd_tc(const Case& c) {
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  std::vector<T> out(size_t(g.N) * g.K * g.P * g.Q, T(NAN));
  tc::EpiOut<T> epi;
  plan::fill_epi(epi, out.data(), g.ys, M, g.P, g.Q, g.Kg, g.K,
                 c.bias ? pb.bias.data() : nullptr, c.relu, true);
  int64_t ld = 0;
  const at::Tensor wp = plan::pack_fwd_weight(pb.weights(), ld);
  tc::FwdLoadA<C> la{};
  tc::RowsLoad<C::BN> lb{};
  const int kt =
      plan::fill_fwd_loaders(plan::fwd_problem(g, pb.x.data(), wp.data_ptr(), ld), la, lb);
  long bad = WG ? run_wg<T>(la, lb, epi, M, g.Kg, g.G, kt)
                : run_tc<T, C, true, true>(la, lb, epi, M, g.Kg, g.G, 1, kt, kt);
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  const double tol = tol_of<T>();
  for (int n = 0; n < g.N; ++n)
    for (int k = 0; k < g.K; ++k)
      for (int p = 0; p < g.P; ++p)
        for (int q = 0; q < g.Q; ++q) {
          const int grp = k / g.Kg;
          double ref = c.bias ? double(pb.bias[k]) : 0.0, mag = std::fabs(ref);
          for (int cc = 0; cc < g.Cg; ++cc)
            for (int r = 0; r < g.R; ++r)
              for (int s = 0; s < g.S; ++s) {
                const int h = p * g.sh - g.ph + r * g.dh, w = q * g.sw - g.pw + s * g.dw;
                if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
                const double t = pb.X(n, grp * g.Cg + cc, h, w) * pb.Wt(k, cc, r, s);
                ref += t;
                mag += std::fabs(t);
              }
          if (c.relu && ref < 0) ref = 0;
          const double got = dbl(out[pb.yoff(n, k, p, q)]);
          if (!(std::fabs(got - ref) <= tol * (1 + mag))) {
            if (bad < 5) printf("  tc fwd n%d k%d p%d q%d: got %g want %g\n", n, k, p, q, got, ref);
            ++bad;
          }
        }
  return bad;
}

// grad_input of a stride-1 conv: the mask pass, then the forward kernel on the masked gradient
// with the flipped, transposed weights (as conv2d_relu.cu's backward_tc runs them)
template <typename T, class C> long check_dgrad_tc(const Case& c) {
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t Mo = int64_t(g.N) * g.P * g.Q, M = int64_t(g.N) * g.H * g.W;
  std::vector<T> dym(pb.dy.size(), T(NAN));
  std::vector<float> db(g.K);
  emu_mask_bias<T>(pb.dy.data(), pb.y.data(), c.relu, dym.data(), db.data(), Mo, g.K, 3);
  if (!c.relu) dym = pb.dy;
  std::vector<T> dx(size_t(g.N) * g.C * g.H * g.W, T(NAN));
  tc::EpiOut<T> epi;
  plan::fill_epi(epi, dx.data(), g.xs, M, g.H, g.W, g.Cg, g.C, static_cast<const float*>(nullptr),
                 false, true);
  int64_t ld = 0;
  const at::Tensor wt = plan::pack_dgrad_weight(pb.weights(), g.G, ld);
  tc::FwdLoadA<C> la{};
  tc::RowsLoad<C::BN> lb{};
  const int kt =
      plan::fill_fwd_loaders(plan::dgrad_problem(g, dym.data(), wt.data_ptr(), ld), la, lb);
  long bad = run_tc<T, C, true, true>(la, lb, epi, M, g.Cg, g.G, 1, kt, kt);
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  const double tol = tol_of<T>();
  for (int k = 0; k < g.K; ++k) {  // grad_bias from the same pass
    double ref = 0, mag = 0;
    for (int n = 0; n < g.N; ++n)
      for (int p = 0; p < g.P; ++p)
        for (int q = 0; q < g.Q; ++q) {
          ref += pb.DYm(n, k, p, q);
          mag += std::fabs(pb.DYm(n, k, p, q));
        }
    if (!(std::fabs(db[k] - ref) <= 1e-5 * (1 + mag))) {
      if (bad < 5) printf("  tc bias k%d: got %g want %g\n", k, db[k], ref);
      ++bad;
    }
  }
  for (int n = 0; n < g.N; ++n)
    for (int ch = 0; ch < g.C; ++ch)
      for (int h = 0; h < g.H; ++h)
        for (int w = 0; w < g.W; ++w) {
          const int grp = ch / g.Cg, cc = ch % g.Cg;
          double ref = 0, mag = 0;
          for (int kk = 0; kk < g.Kg; ++kk)
            for (int r = 0; r < g.R; ++r)
              for (int s = 0; s < g.S; ++s) {
                const int p = h + g.ph - r * g.dh, q = w + g.pw - s * g.dw;
                if (p < 0 || q < 0 || p >= g.P || q >= g.Q) continue;
                const double t = pb.DYm(n, grp * g.Kg + kk, p, q) * pb.Wt(grp * g.Kg + kk, cc, r, s);
                ref += t;
                mag += std::fabs(t);
              }
          const double got = dbl(dx[n * g.xs[0] + ch * g.xs[1] + h * g.xs[2] + w * g.xs[3]]);
          if (!(std::fabs(got - ref) <= tol * (1 + mag))) {
            if (bad < 5) printf("  tc dgrad n%d c%d h%d w%d: got %g want %g\n", n, ch, h, w, got, ref);
            ++bad;
          }
        }
  return bad;
}

// grad_weight: masked grad_output^T x im2col(input)^T, split over `want_splits` CTAs, then the
// fixed-order reduction with (r, s, c) workspace columns
template <typename T, class C> long check_wgrad_tc(const Case& c, int want_splits) {
  Problem<T> pb(c);
  const Geom& g = pb.g;
  const int64_t M = int64_t(g.N) * g.P * g.Q, cols = int64_t(g.Cg) * g.R * g.S;
  std::vector<T> dym(pb.dy.size(), T(NAN));
  std::vector<float> db(g.K);
  emu_mask_bias<T>(pb.dy.data(), pb.y.data(), c.relu, dym.data(), db.data(), M, g.K, 5);
  if (!c.relu) dym = pb.dy;
  const int kt_total = int(ceil_div(M, tc::BK));
  const auto [splits, kps] = plan::even_split(kt_total, want_splits);
  std::vector<float> ws(size_t(splits) * g.G * g.Kg * cols, NAN);
  tc::PixLoadMN<C::BM> la{};
  tc::Im2colLoadMN<C::BN> lb{};
  plan::fill_wgrad_loaders(g, dym.data(), pb.x.data(), la, lb);
  const tc::EpiPart epi{ws.data(), g.Kg, int(cols), splits};
  long bad = run_tc<T, C, false, false>(la, lb, epi, g.Kg, cols, g.G, splits, kt_total, kps);
  if (bad) printf("  unwritten shared elements: %ld\n", bad);
  return wgrad_reduce_and_check(pb, ws, splits, true, "tc wgrad", bad);
}

// Each pass whose large-tile path the planner would take for this problem (channels_last; the
// launcher makes any layout so first).
template <typename T, class C> long check_tc(const Case& c) {
  const Geom g = geom_of(c);
  long bad = plan::fwd_tc_ok(g) ? check_fwd_tc<T, C>(c) : 0;
  if (plan::bwd_tc_ok(g) && plan::wgrad_tc_ok(g)) bad += check_wgrad_tc<T, C>(c, 3);
  if (plan::bwd_tc_ok(g) && plan::dgrad_tc_ok(g)) bad += check_dgrad_tc<T, C>(c);
  return bad;
}

// Returns the number of failing checks.
inline int run_tc_all() {
  const Case cases[] = {
      // N  C  H  W   K  R  S sh sw ph pw dh dw G relu nhwc bias gA gB
      {2, 16, 9, 7, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, false, false},
      {2, 40, 6, 5, 136, 3, 3, 2, 1, 1, 0, 1, 1, 1, true, true, true, false, false},   // stride 2
      {1, 16, 8, 8, 16, 3, 2, 1, 1, 2, 1, 2, 1, 2, true, true, false, false, false},   // groups, dilation
      {6, 8, 9, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, true, true, false, false},    // M > 256
      {1, 72, 5, 5, 264, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, false, false},  // K > 256, 11 k-tiles
      {3, 8, 5, 5, 8, 1, 1, 2, 2, 0, 0, 1, 1, 1, true, true, false, false, false},    // 1x1 stride 2
      {2, 8, 6, 6, 16, 3, 3, 1, 1, 0, 0, 1, 1, 1, true, true, true, false, false},    // no padding
      {2, 24, 7, 6, 32, 5, 5, 1, 1, 2, 2, 1, 1, 1, true, true, true, false, false},   // 5x5 (AlexNet conv2)
  };
  int failed = 0;
  for (const Case& c : cases) {
    if (!c.nhwc || !plan::fwd_tc_ok(geom_of(c))) continue;
    const long b1 = check_tc<c10::Half, tc::Big>(c), b2 = check_tc<c10::BFloat16, tc::Big>(c);
    const long b3 = check_tc<c10::Half, tc::Mid>(c), b4 = check_tc<c10::BFloat16, tc::Mid>(c);
    const long b5 = check_fwd_tc<c10::Half, tc::Big, true>(c);
    const long b6 = check_fwd_tc<c10::BFloat16, tc::Big, true>(c);
    printf("tc   %-70s big fp16 %s bf16 %s  mid fp16 %s bf16 %s  wgmma fwd fp16 %s bf16 %s\n",
           describe(c).c_str(), b1 ? "FAIL" : "ok", b2 ? "FAIL" : "ok", b3 ? "FAIL" : "ok",
           b4 ? "FAIL" : "ok", b5 ? "FAIL" : "ok", b6 ? "FAIL" : "ok");
    failed += (b1 != 0) + (b2 != 0) + (b3 != 0) + (b4 != 0) + (b5 != 0) + (b6 != 0);
  }
  return failed;
}

// Returns the number of failing cases.
inline int run_all() {
  const Case cases[] = {
      // N  C  H  W   K  R  S sh sw ph pw dh dw G relu nhwc bias gA gB
      {2, 16, 9, 7, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, false, false},     // vec
      {2, 40, 6, 5, 136, 3, 3, 2, 1, 1, 0, 1, 1, 1, true, true, true, false, false},    // K > 128, C%32 != 0
      {1, 16, 8, 8, 16, 3, 2, 1, 2, 2, 1, 2, 1, 2, true, true, false, false, false},    // groups, dilation
      {2, 3, 11, 11, 16, 5, 5, 2, 2, 2, 2, 1, 1, 1, true, false, true, false, false},   // C=3 NCHW
      {2, 1, 20, 18, 8, 11, 11, 4, 4, 1, 1, 1, 1, 1, true, false, true, false, false},  // AlexNet-like C=1
      {2, 16, 7, 6, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, true, false, false},   // NCHW, K%8 != 0
      {2, 16, 7, 6, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, true, true},       // forced gathers
      {3, 8, 5, 5, 8, 1, 1, 2, 2, 0, 0, 1, 1, 1, true, true, false, false, false},      // 1x1 stride 2
      {1, 24, 4, 4, 40, 1, 1, 1, 1, 0, 0, 1, 1, 1, true, true, true, false, true},      // 1x1, gather B
      {20, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, true, true, true, true, false},       // M > 128, gather A
  };
  int failed = 0;
  for (const Case& c : cases) {
    const long s1 = check_fwd<float>(c) + check_dgrad<float>(c) + check_wgrad<float>(c, 3);
    const long s2 = check_fwd<double>(c) + check_dgrad<double>(c) + check_wgrad<double>(c, 2);
    const long s3 = check_fwd<c10::Half>(c, true) + check_dgrad<c10::Half>(c, true) +
                    check_wgrad<c10::Half>(c, 2, true);
    printf("simt %-70s fp32 %s fp64 %s fp16 %s\n", describe(c).c_str(), s1 ? "FAIL" : "ok",
           s2 ? "FAIL" : "ok", s3 ? "FAIL" : "ok");
    failed += (s1 != 0) + (s2 != 0) + (s3 != 0);
    for (int dt = 0; dt < 2; ++dt) {
      const char* dn = dt ? "bf16" : "fp16";
      long b1 = dt ? check_fwd<c10::BFloat16>(c) : check_fwd<c10::Half>(c);
      long b2 = dt ? check_dgrad<c10::BFloat16>(c) : check_dgrad<c10::Half>(c);
      long b3 = dt ? check_wgrad<c10::BFloat16>(c, 3) : check_wgrad<c10::Half>(c, 3);
      printf("%-4s %-70s fwd %s dgrad %s wgrad %s\n", dn, describe(c).c_str(), b1 ? "FAIL" : "ok",
             b2 ? "FAIL" : "ok", b3 ? "FAIL" : "ok");
      failed += (b1 != 0) + (b2 != 0) + (b3 != 0);
    }
  }
  failed += run_tc_all();
  printf("%d failing checks\n", failed);
  return failed;
}

}  // namespace emu
}  // namespace fastconv_cuda
