// Max pool on CPU (optional fused ReLU, compact window-local argmax).
//
// NCHW forward: output rows of 32 and more are scanned tap by tap, vectorised along the row;
// shorter ones work on blocks of planes transposed (8x8 in registers for float) so one
// vector holds a pixel of several planes. NCHW backward: one task per (n, c) plane, scalar
// scatter. Channels-last: one task per output pixel (forward) or per (n, channel slab)
// (backward), vectorised over channels.
#include "common.h"

#include <torch/library.h>

namespace fastconv {
namespace cpu {
namespace {

struct Geom {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Valid kernel taps of one output position along one axis: taps [k0, k1) land inside the input.
struct Taps {
  std::vector<int64_t> origin, k0, k1;  // origin = first input coordinate of the window
};

Taps taps_along(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  Taps t;
  t.origin.resize(out);
  t.k0.resize(out);
  t.k1.resize(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t s = o * stride - pad;
    t.origin[o] = s;
    t.k0[o] = s < 0 ? div_up(-s, dil) : 0;
    t.k1[o] = std::min<int64_t>(k, std::max<int64_t>(0, div_up(in - s, dil)));
  }
  return t;
}

Geom make_geom(c10::IntArrayRef in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
               c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
               const char* op) {
  Geom g{};
  g.N = in[0];
  g.C = in[1];
  g.H = in[2];
  g.W = in[3];
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.OH = pooled_size(g.H, g.kh, g.ph, g.sh, g.dh, ceil_mode);
  g.OW = pooled_size(g.W, g.kw, g.pw, g.sw, g.dw, ceil_mode);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "fastconv ", op, ": output size is too small (", g.OH, "x",
              g.OW, ") for input ", in, " with kernel_size=", kernel_size, " stride=", stride,
              " padding=", padding, " dilation=", dilation);
  return g;
}

// Running max over n consecutive outputs with torch's rule (strictly greater wins, so the
// first maximum; a NaN always wins, so the last NaN): candidate value o is src[o * stride]
// (ReLU, if any, is applied to the final max by the caller), its index k0 + o * kstep. `avail` elements are readable from src.
template <typename scalar_t, typename lane_t>
inline void max_update(at::opmath_type<scalar_t>* __restrict best, lane_t* __restrict idx,
                       const scalar_t* __restrict src, int64_t stride, int64_t n, int64_t avail,
                       lane_t k0, lane_t kstep) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t o = 0;
  if constexpr (kVectorPath<scalar_t> && std::is_same_v<lane_t, scalar_t>) {
    using V = Vec<scalar_t>;
    constexpr int64_t L = V::size();
    // stride 2 reads 2L values per L outputs: stop while the last load stays inside src
    const int64_t nvec = stride == 2 ? std::min(n, avail / 2) : n;
    for (; o + L <= nvec; o += L) {
      V v;
      if (stride == 1) {
        v = V::loadu(src + o);
      } else if (stride == 2) {
        v = at::vec::deinterleave2(V::loadu(src + 2 * o), V::loadu(src + 2 * o + L)).first;
      } else {
        __at_align__ scalar_t buf[L];
        for (int64_t l = 0; l < L; ++l) buf[l] = src[(o + l) * stride];
        v = V::loadu(buf);
      }
      const V b = V::loadu(best + o);
      const V take = (v > b) | (v != v);
      V::blendv(b, v, take).store(best + o);
      const V cand = V::arange(k0 + static_cast<scalar_t>(o) * kstep, kstep);
      V::blendv(V::loadu(idx + o), cand, take).store(idx + o);
    }
    if (o < n) {
      // the last (or only: pooled rows of 5 or 7) outputs as one partial vector, so narrow
      // maps do not fall back to the scalar loop
      const int64_t m = n - o;
      __at_align__ scalar_t buf[L];
      for (int64_t l = 0; l < m; ++l) buf[l] = src[(o + l) * stride];
      V v = V::loadu(buf, m);
      const V b = V::loadu(best + o, m);
      const V take = (v > b) | (v != v);
      V::blendv(b, v, take).store(best + o, m);
      const V cand = V::arange(k0 + static_cast<scalar_t>(o) * kstep, kstep);
      V::blendv(V::loadu(idx + o, m), cand, take).store(idx + o, m);
      return;
    }
  }
  for (; o < n; ++o) {
    acc_t v = static_cast<acc_t>(src[o * stride]);
    const bool take = (v > best[o]) | (v != v);  // branch-free: the outcome is data-random
    best[o] = take ? v : best[o];
    idx[o] = take ? static_cast<lane_t>(k0 + o * kstep) : idx[o];
  }
}

// Lane type for the running argmax. float/double carry the index in the value type, so one
// comparison mask blends both value and index (no mask casts); exact while the largest index
// is below 2^24 (float) or 2^53 (double). Others, and larger planes, use int64.
template <typename scalar_t>
using vec_lane_t = std::conditional_t<kVectorPath<scalar_t>, scalar_t, int64_t>;

template <typename scalar_t>
constexpr int64_t kExactIndexLimit = std::is_same_v<scalar_t, float> ? (int64_t{1} << 24)
                                   : std::is_same_v<scalar_t, double> ? (int64_t{1} << 53)
                                                                      : 0;

// Index of a window tap as a lane value (float/double lanes carry indices exactly below
// kExactIndexLimit): FLAT, ih * W + iw from per-row and per-column tables (exact sums of
// integers); otherwise the window-local i * kw + j.
template <typename scalar_t, bool FLAT>
struct IndexTable {
  std::vector<scalar_t> a, b;  // FLAT: rows ih * W and columns iw; else every tap i * kw + j
  int64_t kw;
  explicit IndexTable(const Geom& g) : kw(g.kw) {
    const int64_t na = FLAT ? g.H : g.kh * g.kw, step = FLAT ? g.W : 1;
    a.resize(na);
    for (int64_t r = 0; r < na; ++r) a[r] = static_cast<scalar_t>(r * step);
    if (FLAT) {
      b.resize(g.W);
      for (int64_t c = 0; c < g.W; ++c) b[c] = static_cast<scalar_t>(c);
    }
  }
  scalar_t operator()(int64_t ih, int64_t iw, int64_t i, int64_t j) const {
    return FLAT ? a[ih] + b[iw] : a[i * kw + j];
  }
};

// Index lanes (exact integers in float/double lanes) as integers: one vector conversion, where
// a per-lane float -> int8 cast measured a fifth of the channels-last forward.
template <typename scalar_t>
using IndexInt = typename decltype(at::vec::convert_to_int_of_same_size(
    std::declval<Vec<scalar_t>>()))::value_type;

template <typename index_t, typename scalar_t>
inline void store_index_lanes(index_t* dst, const Vec<scalar_t>& v, int64_t n) {
  __at_align__ IndexInt<scalar_t> buf[Vec<scalar_t>::size()];
  at::vec::convert_to_int_of_same_size(v).store(buf);
  for (int64_t l = 0; l < n; ++l) dst[l] = static_cast<index_t>(buf[l]);
}

// Transposes between np <= P planes of n elements (plane l at src + l * ld) and an (n, P)
// block (element q of plane l at blk[q * P + l]; lanes past np hold 0 going in and are not
// written out): a full float block as in-register 8x8 transposes, the rest element by
// element (scalar stores at stride P measured half of max_fwd_nchw_blocked's time on ResNet's
// 48x48 stem planes).
template <typename T, int64_t P>
inline void planes_to_block(const T* src, int64_t ld, int64_t n, int64_t np, T* blk) {
  int64_t q = 0;
  if constexpr (std::is_same_v<T, float> && P == 8) {
    if (np == P) {
      for (; q + 8 <= n; q += 8) at::vec::transpose_mxn<float, 8, 8>(src + q, ld, blk + q * P, P);
    }
  }
  for (; q < n; ++q) {
    for (int64_t l = 0; l < np; ++l) blk[q * P + l] = src[l * ld + q];
    std::fill_n(blk + q * P + np, P - np, T(0));
  }
}
template <typename T, int64_t P>
inline void block_to_planes(const T* blk, int64_t n, int64_t np, T* dst, int64_t ld) {
  int64_t q = 0;
  if constexpr (std::is_same_v<T, float> && P == 8) {
    if (np == P) {
      for (; q + 8 <= n; q += 8) at::vec::transpose_mxn<float, 8, 8>(blk + q * P, P, dst + q, ld);
    }
  }
  for (; q < n; ++q) {
    for (int64_t l = 0; l < np; ++l) dst[l * ld + q] = blk[q * P + l];
  }
}

// NCHW planes with output rows shorter than this take max_fwd_nchw_blocked: the row scan
// below would work on a few partial vectors per tap there.
constexpr int64_t kNarrowRow = 32;

// NCHW, short rows: blocks of P planes (P = one vector) are transposed into an (H*W, P)
// scratch where one vector holds one input pixel of P planes; each output pixel is then a
// running max over its window's taps, one vector per tap as in max_fwd_cl, and the
// (OH*OW, P) results are transposed back. Measured 5x faster than the row scan on AlexNet's
// 26x26 -> 12x12 planes.
template <typename scalar_t, typename index_t, bool RELU, bool FLAT>
void max_fwd_nchw_blocked(const scalar_t* x, scalar_t* y, index_t* ind, const Geom& g,
                          const Taps& th, const Taps& tw) {
  using V = Vec<scalar_t>;
  constexpr int64_t P = V::size();
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW, planes = g.N * g.C;
  const int64_t W = g.W;
  // tap indices as values, looked up rather than converted per tap (an int -> float
  // conversion per tap measured a fifth of this kernel's time)
  const IndexTable<scalar_t, FLAT> kidx(g);
  at::parallel_for(0, div_up(planes, P), grain_for((HW + OHW * g.kh * g.kw) * P),
                   [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> in(HW * P), val(OHW * P);
    using I = IndexInt<scalar_t>;
    std::vector<I> arg(OHW * P), arg_planes(OHW * P);
    const V zero(0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * P, np = std::min(P, planes - p0);
      // (lanes past the last plane: 0, any finite value; never written out)
      planes_to_block<scalar_t, P>(x + p0 * HW, HW, HW, np, in.data());
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t h0 = th.origin[oh], i0 = th.k0[oh], i1 = th.k1[oh];
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t w0 = tw.origin[ow], j0 = tw.k0[ow], j1 = tw.k1[ow];
          V best(-std::numeric_limits<scalar_t>::infinity());
          V bi(kidx(h0 + i0 * g.dh, w0 + j0 * g.dw, i0, j0));
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t ih = h0 + i * g.dh;
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t iw = w0 + j * g.dw;
              const V v = V::loadu(in.data() + (ih * W + iw) * P);
              const V take = (v > best) | (v != v);  // torch's rule, as in max_update
              best = V::blendv(best, v, take);
              bi = V::blendv(bi, V(kidx(ih, iw, i, j)), take);
            }
          }
          const int64_t o = oh * g.OW + ow;
          (RELU ? at::vec::maximum(best, zero) : best).store(val.data() + o * P);
          at::vec::convert_to_int_of_same_size(bi).store(arg.data() + o * P);
        }
      }
      block_to_planes<scalar_t, P>(val.data(), OHW, np, y + p0 * OHW, OHW);
      if constexpr (std::is_same_v<scalar_t, float> && sizeof(I) == sizeof(float)) {
        // the int32 lanes moved as float bit patterns (a transpose only permutes them)
        block_to_planes<float, P>(reinterpret_cast<const float*>(arg.data()), OHW, np,
                                  reinterpret_cast<float*>(arg_planes.data()), OHW);
      } else {
        block_to_planes<I, P>(arg.data(), OHW, np, arg_planes.data(), OHW);
      }
      index_t* __restrict io = ind + p0 * OHW;
      for (int64_t k = 0; k < np * OHW; ++k) io[k] = static_cast<index_t>(arg_planes[k]);
    }
  });
}

// FLAT: indices are torch's flat ih * W + iw; otherwise the window-local tap i * kw + j.
//
// NCHW: for one output row, taps are visited in torch's order (kernel row, then column) and
// each tap updates the running max of every output column it reaches at once: that inner
// loop runs over consecutive outputs (input stride = pooling stride) and vectorises, where a
// per-output window scan mispredicts its max-update branch about half the time.
template <typename scalar_t, typename index_t, bool RELU, bool FLAT, typename lane_t>
void max_fwd_nchw(const scalar_t* x, scalar_t* y, index_t* ind, const Geom& g, const Taps& th,
                  const Taps& tw) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVectorPath<scalar_t> && std::is_same_v<lane_t, scalar_t>) {
    if (g.OW < kNarrowRow) {
      max_fwd_nchw_blocked<scalar_t, index_t, RELU, FLAT>(x, y, ind, g, th, tw);
      return;
    }
  }
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW, HW = H * W, OHW = OH * OW;
  // output columns [owa[j], owb[j]) are the ones kernel column j lands inside the input for
  std::vector<int64_t> owa(g.kw), owb(g.kw);
  for (int64_t j = 0; j < g.kw; ++j) {
    const int64_t off = j * g.dw - g.pw;  // iw = ow * sw + off
    const int64_t a = off >= 0 ? 0 : div_up(-off, g.sw);
    const int64_t b = W - 1 - off >= 0 ? std::min(OW, (W - 1 - off) / g.sw + 1) : 0;
    owa[j] = std::min(a, b);
    owb[j] = b;
  }
  at::parallel_for(0, g.N * g.C, grain_for(OHW * g.kh * g.kw), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> best_buf(OW);
    std::vector<lane_t> idx_buf(OW);
    acc_t* best = best_buf.data();
    lane_t* bidx = idx_buf.data();
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* xp = x + p * HW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const int64_t h0 = th.origin[oh], i0 = th.k0[oh], i1 = th.k1[oh];
        // start like torch: -inf, index of the window's first valid element
        for (int64_t ow = 0; ow < OW; ++ow) {
          best[ow] = -std::numeric_limits<acc_t>::infinity();
          bidx[ow] = static_cast<lane_t>(FLAT ? (h0 + i0 * g.dh) * W + tw.origin[ow] + tw.k0[ow] * g.dw
                                              : i0 * g.kw + tw.k0[ow]);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t ih = h0 + i * g.dh;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t a = owa[j], n = owb[j] - a;
            if (n <= 0) continue;
            const int64_t first = a * g.sw + j * g.dw - g.pw;  // input column of output a
            const lane_t k0 = static_cast<lane_t>(FLAT ? ih * W + first : i * g.kw + j);
            max_update<scalar_t, lane_t>(best + a, bidx + a, xp + ih * W + first, g.sw, n,
                                               W - first, k0,
                                               static_cast<lane_t>(FLAT ? g.sw : 0));
          }
        }
        scalar_t* yr = y + p * OHW + oh * OW;
        index_t* ir = ind + p * OHW + oh * OW;
        for (int64_t ow = 0; ow < OW; ++ow) {
          yr[ow] = static_cast<scalar_t>(RELU ? relu_keep_nan(best[ow]) : best[ow]);
          ir[ow] = static_cast<index_t>(bidx[ow]);
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t, bool RELU, bool FLAT, typename lane_t>
void max_fwd_cl(const scalar_t* x, scalar_t* y, index_t* ind, const Geom& g, const Taps& th,
                const Taps& tw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const IndexTable<lane_t, FLAT> kidx(g);  // used by the vector path (lane_t = scalar_t)
  at::parallel_for(0, g.N * g.OH * g.OW, grain_for(C * g.kh * g.kw), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> best_buf(C);
    std::vector<lane_t> idx_buf(C);
    acc_t* best = best_buf.data();
    lane_t* bidx = idx_buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ow = r % g.OW, oh = (r / g.OW) % g.OH, n = r / (g.OW * g.OH);
      const int64_t h0 = th.origin[oh], i0 = th.k0[oh], i1 = th.k1[oh];
      const int64_t w0 = tw.origin[ow], j0 = tw.k0[ow], j1 = tw.k1[ow];
      const lane_t first = static_cast<lane_t>(FLAT ? (h0 + i0 * g.dh) * g.W + (w0 + j0 * g.dw)
                                                    : i0 * g.kw + j0);
      scalar_t* yr = y + r * C;
      index_t* ir = ind + r * C;
      int64_t c0 = 0;
      if constexpr (kVectorPath<scalar_t> && std::is_same_v<lane_t, scalar_t>) {
        // blocks of channel vectors keep their running max and argmax in registers over all
        // taps; four independent blocks at a time hide the compare/blend latency chain
        using V = Vec<scalar_t>;
        constexpr int64_t L = V::size();
        auto block = [&](auto unroll) {
          constexpr int U = decltype(unroll)::value;
          const V zero(0);
          V b[U], bi[U];
          for (int u = 0; u < U; ++u) {
            b[u] = V(-std::numeric_limits<scalar_t>::infinity());
            bi[u] = V(first);
          }
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t ih = h0 + i * g.dh;
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t iw = w0 + j * g.dw;
              const scalar_t* src = x + ((n * g.H + ih) * g.W + iw) * C + c0;
              // the next block of this tap: blocks of one pixel are read in separate
              // passes, which the hardware prefetcher does not see as one stream
              __builtin_prefetch(src + U * L);
              __builtin_prefetch(src + U * L + 64 / sizeof(scalar_t));
              const V k(kidx(ih, iw, i, j));
              for (int u = 0; u < U; ++u) {
                V v = V::loadu(src + u * L);
                const V take = (v > b[u]) | (v != v);
                b[u] = V::blendv(b[u], v, take);
                bi[u] = V::blendv(bi[u], k, take);
              }
            }
          }
          for (int u = 0; u < U; ++u) {
            // ReLU on the max (the argmax stays that of the input); maximum keeps NaN
            (RELU ? at::vec::maximum(b[u], zero) : b[u]).store(yr + c0 + u * L);
            store_index_lanes(ir + c0 + u * L, bi[u], L);
          }
          c0 += U * L;
        };
        while (c0 + 4 * L <= C) block(std::integral_constant<int, 4>{});
        while (c0 + L <= C) block(std::integral_constant<int, 1>{});
        if (c0 == C) continue;
      }
      // remaining channels (and half/bfloat16): running max in memory
      const int64_t rest = C - c0;
      std::fill(best, best + rest, -std::numeric_limits<acc_t>::infinity());
      std::fill(bidx, bidx + rest, first);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t ih = h0 + i * g.dh;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t iw = w0 + j * g.dw;
          const lane_t k = static_cast<lane_t>(FLAT ? ih * g.W + iw : i * g.kw + j);
          max_update<scalar_t, lane_t>(best, bidx,
                                             x + ((n * g.H + ih) * g.W + iw) * C + c0, 1, rest,
                                             rest, k, 0);
        }
      }
      for (int64_t c = 0; c < rest; ++c) {
        yr[c0 + c] = static_cast<scalar_t>(RELU ? relu_keep_nan(best[c]) : best[c]);
        ir[c0 + c] = static_cast<index_t>(bidx[c]);
      }
    }
  });
}

// Input offset of each window tap relative to the window's origin: decoding a local index is
// then one table load (an integer division per output made this pass 3x slower than torch's).
std::vector<int64_t> tap_offsets(const Geom& g, int64_t row_stride, int64_t col_stride) {
  std::vector<int64_t> tap(g.kh * g.kw);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) tap[i * g.kw + j] = i * g.dh * row_stride + j * g.dw * col_stride;
  }
  return tap;
}

// The ReLU mask is applied as a select, not a branch: its outcome is data-random.
template <typename scalar_t, typename index_t, bool RELU, bool FLAT>
void max_bwd_nchw(const scalar_t* go, const scalar_t* out, const index_t* ind, scalar_t* gi,
                  const Geom& g) {
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  const std::vector<int64_t> tap = tap_offsets(g, g.W, 1);
  at::parallel_for(0, g.N * g.C, grain_for(HW + OHW), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      scalar_t* gp = gi + p * HW;
      std::fill(gp, gp + HW, scalar_t(0));
      const scalar_t* gop = go + p * OHW;
      const scalar_t* op = RELU ? out + p * OHW : nullptr;
      const index_t* ip = ind + p * OHW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t row = (oh * g.sh - g.ph) * g.W - g.pw;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t o = oh * g.OW + ow;
          const int64_t pos = FLAT ? static_cast<int64_t>(ip[o])
                                   : row + ow * g.sw + tap[static_cast<int64_t>(ip[o])];
          scalar_t v = gop[o];
          if (RELU) v = relu_passes(op[o]) ? v : scalar_t(0);
          gp[pos] += v;
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t, bool RELU, bool FLAT>
void max_bwd_cl(const scalar_t* go, const scalar_t* out, const index_t* ind, scalar_t* gi,
                const Geom& g) {
  const int64_t C = g.C, HW = g.H * g.W, slab = cl_slab(g.N, C), slabs = div_up(C, slab);
  const std::vector<int64_t> tap = tap_offsets(g, g.W, 1);
  at::parallel_for(0, g.N * slabs, grain_for((HW + g.OH * g.OW) * std::min(C, slab)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / slabs, c0 = (t % slabs) * slab, c1 = std::min(C, c0 + slab);
      scalar_t* gin = gi + n * HW * C;
      if (c0 == 0 && c1 == C) {
        std::fill(gin, gin + HW * C, scalar_t(0));
      } else {
        for (int64_t q = 0; q < HW; ++q) std::fill(gin + q * C + c0, gin + q * C + c1, scalar_t(0));
      }
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t row = (oh * g.sh - g.ph) * g.W - g.pw;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C;
          const int64_t base = row + ow * g.sw;
          const index_t* __restrict ir = ind + o;
          const scalar_t* __restrict gr = go + o;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t pos = FLAT ? static_cast<int64_t>(ir[c])
                                     : base + tap[static_cast<int64_t>(ir[c])];
            scalar_t v = gr[c];
            if (RELU) v = relu_passes(out[o + c]) ? v : scalar_t(0);
            gin[pos * C + c] += v;
          }
        }
      }
    }
  });
}

// Calls f.template operator()<index_t>() with the index type the indices are stored in.
template <typename F>
void with_index_type(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kChar: f(int8_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kLong: f(int64_t{}); break;
    default: TORCH_CHECK(false, "fastconv max_pool2d: unsupported indices dtype ", t);
  }
}

at::ScalarType local_index_dtype(int64_t kh, int64_t kw) {
  return kh * kw <= 127 ? at::kChar : at::kInt;
}

std::tuple<Tensor, Tensor> max_pool2d_cpu(const Tensor& input, c10::IntArrayRef kernel_size,
                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                          c10::IntArrayRef dilation, bool ceil_mode,
                                          bool return_indices, bool relu) {
  check_4d(input, "input");
  check_cpu_float(input, "input");
  check_window(kernel_size, stride, padding, dilation, "max_pool2d");
  const Geom g = make_geom(input.sizes(), kernel_size, stride, padding, dilation, ceil_mode,
                           "max_pool2d");
  const auto fmt = layout_of(input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(fmt);
  Tensor out = poisoned(at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(fmt)));
  const auto idx_dtype = return_indices ? at::kLong : local_index_dtype(g.kh, g.kw);
  Tensor ind = at::empty({g.N, g.C, g.OH, g.OW}, x.options().dtype(idx_dtype).memory_format(fmt));
  if (out.numel() == 0) return {out, ind};
  const Taps th = taps_along(g.H, g.OH, g.kh, g.sh, g.ph, g.dh);
  const Taps tw = taps_along(g.W, g.OW, g.kw, g.sw, g.pw, g.dw);
  FASTCONV_DISPATCH_FLOATING(x.scalar_type(), "fastconv_max_pool2d", [&] {
    with_index_type(idx_dtype, [&](auto tag) {
      using index_t = decltype(tag);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = out.data_ptr<scalar_t>();
      index_t* ip = ind.data_ptr<index_t>();
      // (relu, flat) are compile-time so the scan loop is tight; lanes as wide as the value
      // unless a flat index could overflow them
      using fast_lane = vec_lane_t<scalar_t>;
      const bool wide = !std::is_same_v<fast_lane, int64_t> &&
                        (return_indices ? g.H * g.W : g.kh * g.kw) > kExactIndexLimit<scalar_t>;
      auto run = [&](auto lane_tag) {
        using lane_t = decltype(lane_tag);
        with_flags(relu, return_indices, [&](auto r, auto f) {
          constexpr bool R = decltype(r)::value, F = decltype(f)::value;
          if (cl) max_fwd_cl<scalar_t, index_t, R, F, lane_t>(xp, yp, ip, g, th, tw);
          else max_fwd_nchw<scalar_t, index_t, R, F, lane_t>(xp, yp, ip, g, th, tw);
        });
      };
      if (wide) {
        run(int64_t{});
      } else {
        run(fast_lane{});
      }
    });
  });
  return {out, ind};
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& output,
                               const Tensor& indices, c10::IntArrayRef input_size,
                               c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode, bool return_indices, bool relu) {
  check_4d(grad_output, "grad_output");
  check_cpu_float(grad_output, "grad_output");
  check_window(kernel_size, stride, padding, dilation, "max_pool2d_backward");
  const auto in_size = full_input_size(input_size, grad_output, "max_pool2d_backward");
  const Geom g = make_geom(in_size, kernel_size, stride, padding, dilation, ceil_mode,
                           "max_pool2d_backward");
  TORCH_CHECK(grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "fastconv max_pool2d_backward: grad_output shape ", grad_output.sizes(),
              " does not match the pooled size (", g.OH, ", ", g.OW, ") of input ", in_size);
  TORCH_CHECK(indices.sizes() == grad_output.sizes(), "fastconv max_pool2d_backward: indices "
              "shape ", indices.sizes(), " does not match grad_output shape ", grad_output.sizes());
  const auto want = return_indices ? at::kLong : local_index_dtype(g.kh, g.kw);
  TORCH_CHECK(indices.scalar_type() == want, "fastconv max_pool2d_backward: indices must be ",
              want, " for return_indices=", return_indices, " and kernel ", kernel_size,
              ", got ", indices.scalar_type());
  if (relu) {
    TORCH_CHECK(output.sizes() == grad_output.sizes() &&
                    output.scalar_type() == grad_output.scalar_type(),
                "fastconv max_pool2d_backward: with relu=True, output must be the forward "
                "output (shape ", grad_output.sizes(), "), got ", output.sizes());
  }
  const auto fmt = layout_of(grad_output);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor go = grad_output.contiguous(fmt);
  const Tensor ind = indices.contiguous(fmt);
  const Tensor out = relu ? output.contiguous(fmt) : Tensor();
  Tensor gi = poisoned(at::empty(in_size, go.options().memory_format(fmt)));
  if (gi.numel() == 0) return gi;
  FASTCONV_DISPATCH_FLOATING(go.scalar_type(), "fastconv_max_pool2d_backward", [&] {
    with_index_type(want, [&](auto tag) {
      using index_t = decltype(tag);
      const scalar_t* gop = go.const_data_ptr<scalar_t>();
      const scalar_t* op = relu ? out.const_data_ptr<scalar_t>() : nullptr;
      const index_t* ip = ind.const_data_ptr<index_t>();
      scalar_t* gip = gi.data_ptr<scalar_t>();
      with_flags(relu, return_indices, [&](auto r, auto f) {
        constexpr bool R = decltype(r)::value, F = decltype(f)::value;
        if (cl) max_bwd_cl<scalar_t, index_t, R, F>(gop, op, ip, gip, g);
        else max_bwd_nchw<scalar_t, index_t, R, F>(gop, op, ip, gip, g);
      });
    });
  });
  return gi;
}
}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace cpu
}  // namespace fastconv
