// Batch norm with optional fused residual add and ReLU on CPU: relu?(bn(x) + residual?).
//
// Training forward: one read pass for the statistics (shifted sums, see below), one pass that
// normalises, applies the ReLU and writes. Eager torch reads the input twice for statistics,
// once to normalise, and relu reads and writes the result again.
// Eval forward: one pass. The residual is read in the normalising pass (ResNet's
// relu(bn(x) + identity): eager torch writes bn(x), reads it back for the add, and again for
// the ReLU). Backward: one reduction pass (sum of g and of g * (x - mean), with the ReLU mask
// recomputed from the saved output), one pass for grad_input. The residual's gradient (g
// masked by the ReLU) is written by the reduction pass when there is one and a ReLU (the
// grad_input pass then reads it instead of g and the output), else by the grad_input pass.
// NCHW planes (3x3 and up) are walked one channel at a time where the channels split evenly
// over the threads (by_channel): a channel's second pass re-reads its planes from the core's
// cache, so memory sees one read of the input in the forward, one of g, x, y in the backward.
#include "common.h"

#include <torch/library.h>

#include <array>

namespace fastconv {
namespace cpu {
namespace {

// Statistics of a channel are accumulated as sums of d = x - K and d * d, K being the mean of
// the channel's first kShiftSample elements: with K near the mean the variance E[d^2] - E[d]^2
// no longer cancels when |mean| >> std, and one read pass suffices. (K = the first element
// alone, an outlier of a few std, made the cancellation cost 5-25 units of rounding in the
// output: measured against float64, where torch's own two-pass statistics err 1-2.)
constexpr int64_t kShiftSample = 64;

// K of channel c: the mean of the finite values among its first kShiftSample elements in
// (n, h, w) order (0 if none is): a finite K keeps an infinity in the data from turning every
// d into NaN, so infinities and NaN propagate as torch's statistics propagate them
template <typename scalar_t, typename acc_t>
acc_t channel_shift(const scalar_t* x, int64_t N, int64_t C, int64_t HW, bool cl, int64_t c) {
  const int64_t m = std::min(N * HW, kShiftSample);
  double s = 0;
  int64_t finite = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t n = j / HW, i = j % HW;
    const double v = static_cast<double>(cl ? x[(n * HW + i) * C + c] : x[(n * C + c) * HW + i]);
    if (std::isfinite(v)) {
      s += v;
      ++finite;
    }
  }
  return finite > 0 ? static_cast<acc_t>(s / static_cast<double>(finite)) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void shifted_sums(const scalar_t* p, int64_t n, acc_t K, PairSum<acc_t>& acc) {
  using V = Vec<acc_t>;
  fold_pair_sums<kVectorPath<scalar_t>>(
      n, acc,
      [&](int64_t i, auto cnt) {  // generic: compiled only on the vector path
        // lanes past cnt are zeroed after the shift, so they add nothing
        const V d = V::set(V(0), V::loadu(p + i, cnt) - V(K), cnt);
        return std::pair<V, V>(d, d);
      },
      [&](int64_t i) {
        const acc_t d = static_cast<acc_t>(p[i]) - K;
        return std::pair<acc_t, acc_t>(d, d);
      });
}

// Sums of g' and g' * (x - mean) where g' = g masked by the ReLU on the saved output; with
// GOUT g' is also stored to go (the residual's gradient, which the grad_input pass then reads
// in place of g and y).
template <typename scalar_t, typename acc_t, bool RELU, bool GOUT = false>
inline void grad_sums(const scalar_t* g, const scalar_t* x, const scalar_t* y, int64_t n,
                      acc_t mean, PairSum<acc_t>& acc, scalar_t* go = nullptr) {
  using V = Vec<acc_t>;
  fold_pair_sums<kVectorPath<scalar_t>>(
      n, acc,
      [&](int64_t i, auto cnt) {  // generic: compiled only on the vector path
        const V gv = RELU ? masked_grad(g, y, i, cnt) : V::loadu(g + i, cnt);
        if (GOUT) gv.store(go + i, cnt);
        return std::pair<V, V>(gv, V::loadu(x + i, cnt) - V(mean));
      },
      [&](int64_t i) {
        acc_t gv = static_cast<acc_t>(g[i]);
        if (RELU) gv = relu_passes(static_cast<acc_t>(y[i])) ? gv : acc_t(0);
        if (GOUT) go[i] = static_cast<scalar_t>(gv);
        return std::pair<acc_t, acc_t>(gv, static_cast<acc_t>(x[i]) - mean);
      });
}

// y = relu?(x * scale + shift + r?) over n contiguous elements (r read only when RES).
template <typename scalar_t, typename acc_t, bool RELU, bool RES>
inline void affine_row(const scalar_t* x, const scalar_t* r, scalar_t* y, int64_t n, acc_t scale,
                       acc_t shift) {
  int64_t i = 0;
  if constexpr (kVectorPath<scalar_t>) {
    using V = Vec<acc_t>;
    constexpr int64_t L = V::size();
    const V sc(scale), sh(shift), zero(0);
    for (; i < n; i += L) {  // masked tail: planes of 3x3 to 7x7 are one partial vector
      const int64_t cnt = std::min<int64_t>(L, n - i);
      V v = at::vec::fmadd(V::loadu(x + i, cnt), sc, sh);
      if (RES) v = v + V::loadu(r + i, cnt);
      if (RELU) v = at::vec::maximum(v, zero);  // keeps NaN
      v.store(y + i, cnt);
    }
  }
  for (; i < n; ++i) {
    acc_t v = static_cast<acc_t>(x[i]) * scale + shift;
    if (RES) v += static_cast<acc_t>(r[i]);
    if (RELU) v = relu_keep_nan(v);
    y[i] = static_cast<scalar_t>(v);
  }
}

// Channels-last version: y[c] = relu?(x[c] * scale[c] + shift[c] + r[c]?) for one row of C.
template <typename scalar_t, typename acc_t, bool RELU, bool RES>
inline void affine_cl_row(const scalar_t* x, const scalar_t* r, scalar_t* y, int64_t C,
                          const acc_t* scale, const acc_t* shift) {
  for (int64_t c = 0; c < C; ++c) {
    acc_t v = static_cast<acc_t>(x[c]) * scale[c] + shift[c];
    if (RES) v += static_cast<acc_t>(r[c]);
    if (RELU) v = relu_keep_nan(v);
    y[c] = static_cast<scalar_t>(v);
  }
}

// dx = A * g' + B * (x - mean) + E over one channel's plane; with GRES also dr = g' (the
// residual's gradient), written from the same registers.
template <typename scalar_t, typename acc_t, bool RELU, bool GRES>
inline void dx_plane(const scalar_t* g, const scalar_t* x, const scalar_t* y, scalar_t* dx,
                     scalar_t* dr, int64_t n, acc_t A, acc_t B, acc_t E, acc_t mean) {
  int64_t i = 0;
  if constexpr (kVectorPath<scalar_t>) {
    using V = Vec<acc_t>;
    constexpr int64_t L = V::size();
    const V a(A), b(B), e(E), mv(mean);
    for (; i < n; i += L) {  // masked tail, as in affine_row
      const int64_t cnt = std::min<int64_t>(L, n - i);
      const V gv = RELU ? masked_grad(g, y, i, cnt) : V::loadu(g + i, cnt);
      if (GRES) gv.store(dr + i, cnt);
      V r = at::vec::fmadd(a, gv, e);
      if (B != acc_t(0)) r = at::vec::fmadd(b, V::loadu(x + i, cnt) - mv, r);
      r.store(dx + i, cnt);
    }
  }
  for (; i < n; ++i) {
    acc_t gv = static_cast<acc_t>(g[i]);
    if (RELU) gv = relu_passes(static_cast<acc_t>(y[i])) ? gv : acc_t(0);
    if (GRES) dr[i] = static_cast<scalar_t>(gv);
    // eval (B = 0) never reads x: 0 * (inf - mean) would turn a finite gradient into NaN
    const acc_t centred = B != acc_t(0) ? B * (static_cast<acc_t>(x[i]) - mean) : acc_t(0);
    dx[i] = static_cast<scalar_t>(A * gv + centred + E);
  }
}

// The same over one channels-last row, coefficients per channel.
template <typename scalar_t, typename acc_t, bool RELU, bool GRES>
inline void dx_cl_row(const scalar_t* g, const scalar_t* x, const scalar_t* y, scalar_t* dx,
                      scalar_t* dr, int64_t C, const acc_t* __restrict A,
                      const acc_t* __restrict B, const acc_t* __restrict E,
                      const acc_t* __restrict mean) {
  for (int64_t c = 0; c < C; ++c) {
    acc_t gv = static_cast<acc_t>(g[c]);
    if (RELU) gv = relu_passes(static_cast<acc_t>(y[c])) ? gv : acc_t(0);
    if (GRES) dr[c] = static_cast<scalar_t>(gv);
    const acc_t centred = B[c] != acc_t(0) ? B[c] * (static_cast<acc_t>(x[c]) - mean[c])
                                           : acc_t(0);
    dx[c] = static_cast<scalar_t>(A[c] * gv + centred + E[c]);
  }
}

// Channel c's (sum d, sum d^2), d = x - K, over its N planes of an (N, C, HW) tensor, folded.
template <typename scalar_t, typename acc_t>
inline PairSum<acc_t> plane_shifted_sums(const scalar_t* x, int64_t N, int64_t C, int64_t HW,
                                         int64_t c, acc_t K) {
  PairSum<acc_t> acc;
  for (int64_t n = 0; n < N; ++n) shifted_sums<scalar_t, acc_t>(x + (n * C + c) * HW, HW, K, acc);
  acc.fold();
  return acc;
}

// Per-channel (sum d, sum d^2) with d = x - K[c], for an (N, C, HW) contiguous tensor.
template <typename scalar_t, typename acc_t>
void channel_stats_nchw(const scalar_t* x, int64_t N, int64_t C, int64_t HW, const acc_t* K,
                        double* s1, double* s2) {
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const PairSum<acc_t> acc = plane_shifted_sums<scalar_t, acc_t>(x, N, C, HW, c, K[c]);
      s1[c] = acc.s1;
      s2[c] = acc.s2;
    }
  });
}

// Channel c's gradient sums over its N planes (see grad_sums; with GOUT g' is stored to go),
// folded.
template <typename scalar_t, typename acc_t, bool RELU, bool GOUT>
inline PairSum<acc_t> plane_grad_sums(const scalar_t* g, const scalar_t* x, const scalar_t* y,
                                      scalar_t* go, int64_t N, int64_t C, int64_t HW, int64_t c,
                                      acc_t mean) {
  PairSum<acc_t> acc;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    grad_sums<scalar_t, acc_t, RELU, GOUT>(g + off, x + off, RELU ? y + off : nullptr, HW, mean,
                                           acc, GOUT ? go + off : nullptr);
  }
  acc.fold();
  return acc;
}

// Two per-column sums over R rows of C columns (channels-last rows, or the row view of small
// NCHW planes): add_row(r, pa, pb) adds row r's two terms of every column into pa and pb.
// Each chunk of rows keeps C-wide partials in acc_t, folded into double every kFoldChunk / 8
// rows; chunks are combined in chunk order, so results do not depend on scheduling.
template <typename acc_t, typename AddRow>
void column_pair_sums(int64_t R, int64_t C, const AddRow& add_row, double* s1, double* s2) {
  const int64_t chunks = chunk_count(R, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)));
  std::vector<double> part(static_cast<size_t>(chunks) * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> fa(C), fb(C);
    for (int64_t i = i0; i < i1; ++i) {
      auto [r0, r1] = chunk_range(R, chunks, i);
      double* d1 = part.data() + i * 2 * C;
      double* d2 = d1 + C;
      constexpr int64_t fold_rows = kFoldChunk / 8;
      for (int64_t rb = r0; rb < r1; rb += fold_rows) {
        const int64_t re = std::min(r1, rb + fold_rows);
        std::fill(fa.begin(), fa.end(), acc_t(0));
        std::fill(fb.begin(), fb.end(), acc_t(0));
        for (int64_t r = rb; r < re; ++r) add_row(r, fa.data(), fb.data());
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += fa[c];
          d2[c] += fb[c];
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < chunks; ++i) {
      a += part[i * 2 * C + c];
      b += part[i * 2 * C + C + c];
    }
    s1[c] = a;
    s2[c] = b;
  }
}

// Statistics over rows of C (channels-last): sums of d = x - K[c] and d * d.
template <typename scalar_t, typename acc_t>
void channel_stats_cl(const scalar_t* x, int64_t R, int64_t C, const acc_t* K, double* s1,
                      double* s2) {
  column_pair_sums<acc_t>(R, C, [&](int64_t r, acc_t* __restrict pa, acc_t* __restrict pb) {
    const scalar_t* __restrict row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - K[c];
      pa[c] += d;
      pb[c] += d * d;
    }
  }, s1, s2);
}

template <typename scalar_t, typename acc_t, bool RELU, bool RES>
void normalize_t(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t N, int64_t C,
                 int64_t HW, bool cl, const acc_t* scale, const acc_t* shift) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        affine_row<scalar_t, acc_t, RELU, RES>(x + p * HW, RES ? res + p * HW : nullptr,
                                               y + p * HW, HW, scale[c], shift[c]);
      }
    });
  } else {
    at::parallel_for(0, N * HW, grain_for(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        affine_cl_row<scalar_t, acc_t, RELU, RES>(x + r * C, RES ? res + r * C : nullptr,
                                                  y + r * C, C, scale, shift);
      }
    });
  }
}

// res == nullptr: no residual.
template <typename scalar_t, typename acc_t>
void normalize(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t N, int64_t C,
               int64_t HW, bool cl, const acc_t* scale, const acc_t* shift, bool relu) {
  if (relu && res) {
    normalize_t<scalar_t, acc_t, true, true>(x, res, y, N, C, HW, cl, scale, shift);
  } else if (relu) {
    normalize_t<scalar_t, acc_t, true, false>(x, res, y, N, C, HW, cl, scale, shift);
  } else if (res) {
    normalize_t<scalar_t, acc_t, false, true>(x, res, y, N, C, HW, cl, scale, shift);
  } else {
    normalize_t<scalar_t, acc_t, false, false>(x, res, y, N, C, HW, cl, scale, shift);
  }
}

void check_channel_param(const std::optional<Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "fastconv batch_norm: ", name,
              " must have shape (", C, ",), got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastconv batch_norm: ", name,
              " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), "fastconv batch_norm: ", name, " must be on CPU, got ",
              t->device());
}

// NCHW tensors whose planes are smaller than this (1x1, 2x2) run the channels-last loops on a
// view of N rows of C * HW columns, every per-channel value repeated HW times ("per
// column"): the plane loops would run a few scalar, branchy iterations per plane (measured
// at 8x512x2x2: backward 3.2x, forward 1.5x slower). From 3x3 on the per-column arrays cost
// more than they save at batch 8 (measured 1.3x slower at 8x512x3x3).
constexpr int64_t kSmallPlane = 8;

template <typename T>
std::vector<T> per_column(const std::vector<T>& per_channel, int64_t HW) {
  std::vector<T> out(per_channel.size() * HW);
  for (size_t c = 0; c < per_channel.size(); ++c) {
    std::fill_n(out.begin() + c * HW, HW, per_channel[c]);
  }
  return out;
}

// Per-channel totals of per-column sums, each channel's HW columns added in order.
inline void columns_to_channels(const std::vector<double>& cols, int64_t HW, double* out) {
  const int64_t C = static_cast<int64_t>(cols.size()) / HW;
  for (int64_t c = 0; c < C; ++c) {
    double t = 0;
    for (int64_t k = 0; k < HW; ++k) t += cols[c * HW + k];
    out[c] = t;
  }
}

// Channels-last backward sums over R rows of C: sum of g' and of g' * (x - m) per column, g'
// masked by the ReLU on y when y is given, and stored to gop when that is given (with y).
template <typename scalar_t, typename acc_t>
void grad_sums_cl(const scalar_t* gp, const scalar_t* xp, const scalar_t* yp, int64_t R,
                  int64_t C, const acc_t* m, double* sum_g, double* sum_gx,
                  scalar_t* gop = nullptr) {
  column_pair_sums<acc_t>(R, C, [&](int64_t r, acc_t* __restrict pa, acc_t* __restrict pb) {
    const scalar_t* __restrict gr = gp + r * C;
    const scalar_t* __restrict xr = xp + r * C;
    if (yp != nullptr && gop != nullptr) {
      const scalar_t* __restrict yr = yp + r * C;
      scalar_t* __restrict gor = gop + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gv = relu_passes(static_cast<acc_t>(yr[c])) ? static_cast<acc_t>(gr[c])
                                                                : acc_t(0);
        gor[c] = static_cast<scalar_t>(gv);
        pa[c] += gv;
        pb[c] += gv * (static_cast<acc_t>(xr[c]) - m[c]);
      }
    } else if (yp != nullptr) {
      const scalar_t* __restrict yr = yp + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gv = relu_passes(static_cast<acc_t>(yr[c])) ? static_cast<acc_t>(gr[c])
                                                                : acc_t(0);
        pa[c] += gv;
        pb[c] += gv * (static_cast<acc_t>(xr[c]) - m[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gv = static_cast<acc_t>(gr[c]);
        pa[c] += gv;
        pb[c] += gv * (static_cast<acc_t>(xr[c]) - m[c]);
      }
    }
  }, sum_g, sum_gx);
}

// Channels-last grad_input over R rows of C, coefficients per column (see dx_cl_row).
// (and the residual's gradient into grp when it is not null)
template <typename scalar_t, typename acc_t, bool RELU, bool GRES>
void grad_input_cl_t(const scalar_t* gp, const scalar_t* xp, const scalar_t* yp, scalar_t* gip,
                     scalar_t* grp, int64_t R, int64_t C, const acc_t* A, const acc_t* B,
                     const acc_t* E, const acc_t* m) {
  at::parallel_for(0, R, grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * C;
      dx_cl_row<scalar_t, acc_t, RELU, GRES>(gp + off, xp + off, RELU ? yp + off : nullptr,
                                             gip + off, GRES ? grp + off : nullptr, C, A, B, E,
                                             m);
    }
  });
}

template <typename scalar_t, typename acc_t>
void grad_input_cl(const scalar_t* gp, const scalar_t* xp, const scalar_t* yp, scalar_t* gip,
                   scalar_t* grp, int64_t R, int64_t C, const acc_t* A, const acc_t* B,
                   const acc_t* E, const acc_t* m) {
  if (yp && grp) {
    grad_input_cl_t<scalar_t, acc_t, true, true>(gp, xp, yp, gip, grp, R, C, A, B, E, m);
  } else if (yp) {
    grad_input_cl_t<scalar_t, acc_t, true, false>(gp, xp, yp, gip, grp, R, C, A, B, E, m);
  } else if (grp) {
    grad_input_cl_t<scalar_t, acc_t, false, true>(gp, xp, yp, gip, grp, R, C, A, B, E, m);
  } else {
    grad_input_cl_t<scalar_t, acc_t, false, false>(gp, xp, yp, gip, grp, R, C, A, B, E, m);
  }
}

template <typename scalar_t, typename acc_t, bool RELU, bool GRES>
void grad_input_nchw_t(const scalar_t* gp, const scalar_t* xp, const scalar_t* yp,
                       scalar_t* gip, scalar_t* grp, int64_t N, int64_t C, int64_t HW,
                       const acc_t* A, const acc_t* B, const acc_t* E, const acc_t* m) {
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C, off = p * HW;
      dx_plane<scalar_t, acc_t, RELU, GRES>(gp + off, xp + off, RELU ? yp + off : nullptr,
                                            gip + off, GRES ? grp + off : nullptr, HW, A[c],
                                            B[c], E[c], m[c]);
    }
  });
}

// The residual's gradient alone (grad_input not asked for): g masked by the ReLU, or g.
template <typename scalar_t>
void residual_grad_only(const scalar_t* gp, const scalar_t* yp, scalar_t* grp, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    if constexpr (kVectorPath<scalar_t>) {
      using V = Vec<scalar_t>;
      constexpr int64_t L = V::size();
      for (; i + L <= i1; i += L) {
        (yp ? masked_grad(gp, yp, i) : V::loadu(gp + i)).store(grp + i);
      }
    }
    for (; i < i1; ++i) {
      grp[i] = (!yp || relu_passes(static_cast<double>(yp[i]))) ? gp[i] : scalar_t(0);
    }
  });
}

// A channel's mean and (biased) variance from its shifted sums over M elements.
inline void moments(double K, double s1, double s2, int64_t M, double& mean, double& var) {
  const double m1 = s1 / M;
  mean = K + m1;
  var = s2 / M - m1 * m1;
  if (var < 0) var = 0;  // rounding only; NaN stays NaN
}

// The normalising pass's per-channel coefficients, folded as torch's CPU kernel does:
// y = x * (w * invstd) + (b - mean * w * invstd).
struct Affine {
  double invstd, scale, shift;
};
inline Affine affine_of(double mean, double var, double w, double b, double eps) {
  const double invstd = 1.0 / std::sqrt(var + eps);
  return {invstd, w * invstd, b - mean * w * invstd};
}

// NCHW planes are walked one channel at a time when the channels split evenly enough over the
// threads: a channel's second pass (normalising, or grad_input) then runs right after its
// first (statistics, or gradient sums) and re-reads its N planes from the core's cache
// instead of memory. Measured at 8x64x56x56, float32, 2 threads: forward 0.48 -> 0.38 ms,
// backward with a residual 0.87 -> 0.66 ms. Fewer channels than that keep the two passes
// apart (the second splits over planes, so every thread has work).
inline bool by_channel(int64_t C) {
  const int64_t T = at::get_num_threads();
  return C >= 4 * T || C % T == 0;
}

// Training forward over NCHW planes by channel (see by_channel): statistics, then the
// normalised planes; mean and var are returned per channel for the running statistics.
template <typename scalar_t, typename acc_t, bool RELU, bool RES>
void train_forward_by_channel(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t N,
                              int64_t C, int64_t HW, const double* w, const double* b,
                              double eps, double* mean, double* var, acc_t* smp, acc_t* sip) {
  const int64_t M = N * HW;
  at::parallel_for(0, C, grain_for(M), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t K = channel_shift<scalar_t, acc_t>(x, N, C, HW, false, c);
      const PairSum<acc_t> acc = plane_shifted_sums<scalar_t, acc_t>(x, N, C, HW, c, K);
      moments(static_cast<double>(K), acc.s1, acc.s2, M, mean[c], var[c]);
      const Affine a = affine_of(mean[c], var[c], w[c], b[c], eps);
      smp[c] = static_cast<acc_t>(mean[c]);
      sip[c] = static_cast<acc_t>(a.invstd);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * HW;
        affine_row<scalar_t, acc_t, RELU, RES>(x + off, RES ? res + off : nullptr, y + off, HW,
                                               static_cast<acc_t>(a.scale),
                                               static_cast<acc_t>(a.shift));
      }
    }
  });
}

// Backward over NCHW planes by channel (see by_channel): the gradient sums of a channel, its
// grad_input coefficients (coeffs(c, sum_g, sum_gx) -> {A, B, E}), then its grad_input planes.
// With GRES the sums pass stores g' (g masked by the ReLU) as the residual's gradient and the
// grad_input pass reads it in place of g and y.
template <typename scalar_t, typename acc_t, bool RELU, bool GRES, typename Coeffs>
void backward_by_channel(const scalar_t* gp, const scalar_t* xp, const scalar_t* yp,
                         scalar_t* gip, scalar_t* grp, int64_t N, int64_t C, int64_t HW,
                         const acc_t* m, double* sum_g, double* sum_gx, const Coeffs& coeffs) {
  at::parallel_for(0, C, grain_for(N * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const PairSum<acc_t> acc =
          plane_grad_sums<scalar_t, acc_t, RELU, GRES>(gp, xp, yp, grp, N, C, HW, c, m[c]);
      sum_g[c] = acc.s1;
      sum_gx[c] = acc.s2;
      const std::array<acc_t, 3> k = coeffs(c, acc.s1, acc.s2);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * HW;
        if (GRES) {  // g' is in the residual's gradient: no mask, nothing more to write
          dx_plane<scalar_t, acc_t, false, false>(grp + off, xp + off, nullptr, gip + off,
                                                  nullptr, HW, k[0], k[1], k[2], m[c]);
        } else {
          dx_plane<scalar_t, acc_t, RELU, false>(gp + off, xp + off, RELU ? yp + off : nullptr,
                                                 gip + off, nullptr, HW, k[0], k[1], k[2], m[c]);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double momentum, double eps, bool relu,
    const std::optional<Tensor>& residual) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t HW = H * W, M = N * HW;
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK(residual->sizes() == input.sizes(), "fastconv batch_norm: residual shape ",
                residual->sizes(), " does not match input shape ", input.sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "fastconv batch_norm: residual "
                "dtype ", residual->scalar_type(), " does not match input dtype ",
                input.scalar_type());
    TORCH_CHECK(residual->device().is_cpu(), "fastconv batch_norm: residual must be on CPU, got ",
                residual->device());
  }
  check_channel_param(weight, C, "weight");
  check_channel_param(bias, C, "bias");
  check_channel_param(running_mean, C, "running_mean");
  check_channel_param(running_var, C, "running_var");
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv,
              "fastconv batch_norm: running_mean and running_var must both be given or both None");
  if (training) {
    TORCH_CHECK(M > 1, "fastconv batch_norm: expected more than 1 value per channel when "
                       "training, got input size ", input.sizes());
  } else {
    TORCH_CHECK(has_rm, "fastconv batch_norm: running_mean and running_var must be defined "
                        "in evaluation mode");
  }

  const auto fmt = layout_of(input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(fmt);
  // in the input's layout (a copy only if the caller's residual is laid out otherwise)
  const Tensor res = has_res ? residual->contiguous(fmt) : Tensor();
  Tensor out = poisoned(at::empty_like(x, x.options(), fmt));
  // saved statistics in the accumulation type: float32, or float64 for float64 input (as
  // torch's), so a float64 backward is not limited by float32 statistics
  const auto stat_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                         : at::kFloat);
  Tensor save_mean = poisoned(at::empty({C}, stat_opts));
  Tensor save_invstd = poisoned(at::empty({C}, stat_opts));

  std::vector<double> mean(C), var(C);
  const std::vector<double> w = read_channels(weight, C, 1.0);
  const std::vector<double> b = read_channels(bias, C, 0.0);
  // by channel (see by_channel): the statistics and the normalising pass in one walk
  const bool fused = training && !cl && HW >= kSmallPlane && M > 0 && by_channel(C);
  FASTCONV_DISPATCH_FLOATING(x.scalar_type(), "fastconv_bn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.data_ptr<scalar_t>();
    acc_t* smp = save_mean.data_ptr<acc_t>();
    acc_t* sip = save_invstd.data_ptr<acc_t>();
    if (fused) {
      with_flags(relu, has_res, [&](auto R, auto S) {
        train_forward_by_channel<scalar_t, acc_t, R.value, S.value>(
            xp, rp, yp, N, C, HW, w.data(), b.data(), eps, mean.data(), var.data(), smp, sip);
      });
      return;
    }
    if (training) {
      std::vector<acc_t> K(C, acc_t(0));
      std::vector<double> s1(C, 0.0), s2(C, 0.0);
      if (M > 0) {
        for (int64_t c = 0; c < C; ++c) K[c] = channel_shift<scalar_t, acc_t>(xp, N, C, HW, cl, c);
        if (cl) {
          channel_stats_cl<scalar_t, acc_t>(xp, M, C, K.data(), s1.data(), s2.data());
        } else if (HW < kSmallPlane) {  // N rows of C * HW columns
          std::vector<double> c1(C * HW), c2(C * HW);
          channel_stats_cl<scalar_t, acc_t>(xp, N, C * HW, per_column(K, HW).data(), c1.data(),
                                            c2.data());
          columns_to_channels(c1, HW, s1.data());
          columns_to_channels(c2, HW, s2.data());
        } else {
          channel_stats_nchw<scalar_t, acc_t>(xp, N, C, HW, K.data(), s1.data(), s2.data());
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        moments(static_cast<double>(K[c]), s1[c], s2[c], M, mean[c], var[c]);
      }
    } else {
      mean = read_channels(running_mean, C, 0.0);
      var = read_channels(running_var, C, 1.0);
    }
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const Affine a = affine_of(mean[c], var[c], w[c], b[c], eps);
      smp[c] = static_cast<acc_t>(mean[c]);
      sip[c] = static_cast<acc_t>(a.invstd);
      scale[c] = static_cast<acc_t>(a.scale);
      shift[c] = static_cast<acc_t>(a.shift);
    }
    if (!cl && HW < kSmallPlane) {  // N rows of C * HW columns
      normalize<scalar_t, acc_t>(xp, rp, yp, N, C * HW, 1, /*cl=*/true,
                                 per_column(scale, HW).data(), per_column(shift, HW).data(),
                                 relu);
    } else {
      normalize<scalar_t, acc_t>(xp, rp, yp, N, C, HW, cl, scale.data(), shift.data(), relu);
    }
  });
  if (training && has_rm) {
    // r = (1 - momentum) * r + momentum * stat, with the unbiased variance
    std::vector<double> rm = read_channels(running_mean, C, 0.0);
    std::vector<double> rv = read_channels(running_var, C, 1.0);
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = (1.0 - momentum) * rm[c] + momentum * mean[c];
      rv[c] = (1.0 - momentum) * rv[c] + momentum * (var[c] * M / (M - 1));
    }
    write_channels(*running_mean, rm);
    write_channels(*running_var, rv);
  }
  return {out, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& output,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd,
    bool training, bool relu, std::array<bool, 4> output_mask_ref) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  check_cpu_float(grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastconv batch_norm_backward: grad_output "
              "shape ", grad_output.sizes(), " does not match input shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "fastconv batch_norm_backward: grad_output dtype ", grad_output.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  if (relu) {
    TORCH_CHECK(output.sizes() == input.sizes() && output.scalar_type() == input.scalar_type(),
                "fastconv batch_norm_backward: with relu=True, output must be the forward "
                "output (shape ", input.sizes(), "), got ", output.sizes());
  }
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t HW = H * W, M = N * HW;
  check_channel_param(weight, C, "weight");
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C,
              "fastconv batch_norm_backward: save_mean/save_invstd must have ", C, " elements");
  const bool need_gi = output_mask_ref[0], need_gw = output_mask_ref[1],
             need_gb = output_mask_ref[2], need_gr = output_mask_ref[3];

  const auto fmt = layout_of(input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(fmt);
  const Tensor g = grad_output.contiguous(fmt);
  const Tensor y = relu ? output.contiguous(fmt) : Tensor();
  const std::vector<double> mean = read_channels(save_mean, C, 0.0);
  const std::vector<double> invstd = read_channels(save_invstd, C, 1.0);
  const std::vector<double> w = read_channels(weight, C, 1.0);

  // Reductions are needed for grad_weight/grad_bias, and for grad_input in training.
  const bool need_sums = need_gw || need_gb || (need_gi && training);
  std::vector<double> sum_g(C, 0.0), sum_gx(C, 0.0);
  Tensor grad_input, grad_weight, grad_bias;
  Tensor grad_residual = need_gr ? poisoned(at::empty_like(x, x.options(), fmt)) : empty_grad(x);
  FASTCONV_DISPATCH_FLOATING(x.scalar_type(), "fastconv_bn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = relu ? y.const_data_ptr<scalar_t>() : nullptr;
    const bool rows = !cl && HW < kSmallPlane;  // NCHW as N rows of C * HW columns
    std::vector<acc_t> m(C);
    for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(mean[c]);
    const std::vector<acc_t> m_cols = rows ? per_column(m, HW) : std::vector<acc_t>();
    // With the ReLU the reduction pass stores the masked g as the residual's gradient and the
    // grad_input pass reads it instead of g and y: one tensor less to read.
    const bool fuse_gr = need_gr && relu && need_sums && M > 0;
    scalar_t* grp = need_gr ? grad_residual.data_ptr<scalar_t>() : nullptr;
    // grad_input per channel: dx = A * g' + B * (x - mean) + E
    //   training: A = w * invstd, B = -A * invstd^2 * sum_gx / M, E = -A * sum_g / M
    //   eval:     A = w * invstd, B = E = 0
    auto coeffs = [&](int64_t c, double sg, double sgx) {
      const double a = w[c] * invstd[c];
      return std::array<acc_t, 3>{
          static_cast<acc_t>(a),
          training ? static_cast<acc_t>(-a * invstd[c] * invstd[c] * sgx / M) : acc_t(0),
          training ? static_cast<acc_t>(-a * sg / M) : acc_t(0)};
    };
    if (need_gi && need_sums && !cl && !rows && M > 0 && by_channel(C)) {
      grad_input = poisoned(at::empty_like(x, x.options(), fmt));
      scalar_t* gip = grad_input.data_ptr<scalar_t>();
      with_flags(relu, need_gr, [&](auto R, auto G) {
        backward_by_channel<scalar_t, acc_t, R.value, G.value>(
            gp, xp, yp, gip, grp, N, C, HW, m.data(), sum_g.data(), sum_gx.data(), coeffs);
      });
      return;
    }
    scalar_t* gr_sums = fuse_gr ? grp : nullptr;
    if (need_sums && M > 0) {
      if (cl) {
        grad_sums_cl<scalar_t, acc_t>(gp, xp, yp, M, C, m.data(), sum_g.data(), sum_gx.data(),
                                      gr_sums);
      } else if (rows) {
        std::vector<double> col_g(C * HW), col_gx(C * HW);
        grad_sums_cl<scalar_t, acc_t>(gp, xp, yp, N, C * HW, m_cols.data(), col_g.data(),
                                      col_gx.data(), gr_sums);
        columns_to_channels(col_g, HW, sum_g.data());
        columns_to_channels(col_gx, HW, sum_gx.data());
      } else {
        with_flags(relu, fuse_gr, [&](auto R, auto G) {  // (fuse_gr implies relu)
          at::parallel_for(0, C, grain_for(M), [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
              const PairSum<acc_t> acc = plane_grad_sums<scalar_t, acc_t, R.value, G.value>(
                  gp, xp, yp, gr_sums, N, C, HW, c, m[c]);
              sum_g[c] = acc.s1;
              sum_gx[c] = acc.s2;
            }
          });
        });
      }
    }

    if (need_gr && !need_gi && !fuse_gr) residual_grad_only<scalar_t>(gp, yp, grp, x.numel());
    if (need_gi && fuse_gr) {  // g' is in grad_residual already: no mask, nothing more to write
      gp = grp;
      yp = nullptr;
      grp = nullptr;
    }
    if (need_gi) {
      grad_input = poisoned(at::empty_like(x, x.options(), fmt));
      scalar_t* gip = grad_input.data_ptr<scalar_t>();
      std::vector<acc_t> A(C), B(C), E(C);
      for (int64_t c = 0; c < C; ++c) {
        const std::array<acc_t, 3> k = coeffs(c, sum_g[c], sum_gx[c]);
        A[c] = k[0];
        B[c] = k[1];
        E[c] = k[2];
      }
      if (cl) {
        grad_input_cl<scalar_t, acc_t>(gp, xp, yp, gip, grp, M, C, A.data(), B.data(), E.data(),
                                       m.data());
      } else if (rows) {
        grad_input_cl<scalar_t, acc_t>(gp, xp, yp, gip, grp, N, C * HW, per_column(A, HW).data(),
                                       per_column(B, HW).data(), per_column(E, HW).data(),
                                       m_cols.data());
      } else {
        const acc_t *Ap = A.data(), *Bp = B.data(), *Ep = E.data(), *mp = m.data();
        if (yp && grp) {
          grad_input_nchw_t<scalar_t, acc_t, true, true>(gp, xp, yp, gip, grp, N, C, HW, Ap, Bp,
                                                         Ep, mp);
        } else if (yp) {
          grad_input_nchw_t<scalar_t, acc_t, true, false>(gp, xp, yp, gip, grp, N, C, HW, Ap,
                                                          Bp, Ep, mp);
        } else if (grp) {
          grad_input_nchw_t<scalar_t, acc_t, false, true>(gp, xp, yp, gip, grp, N, C, HW, Ap,
                                                          Bp, Ep, mp);
        } else {
          grad_input_nchw_t<scalar_t, acc_t, false, false>(gp, xp, yp, gip, grp, N, C, HW, Ap,
                                                           Bp, Ep, mp);
        }
      }
    }
  });

  auto param_opts = (weight.has_value() && weight->defined()) ? weight->options()
                                                              : x.options();
  auto to_tensor = [&](std::vector<double> v, bool scale_by_invstd) {
    if (scale_by_invstd) {
      for (int64_t c = 0; c < C; ++c) v[c] *= invstd[c];
    }
    Tensor t = poisoned(at::empty({C}, param_opts));
    write_channels(t, v);
    return t;
  };
  grad_weight = need_gw ? to_tensor(sum_gx, true) : empty_grad(x);
  grad_bias = need_gb ? to_tensor(sum_g, false) : empty_grad(x);
  if (!need_gi) grad_input = empty_grad(x);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace fastconv
