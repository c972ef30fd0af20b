// Host-side planning of the CUDA conv (conv2d_relu.cu): which kernel and tile a problem takes,
// how the weights are packed for it, how a reduction is split, and what the tensor-core loaders
// are given. Plain C++ over ATen (no CUDA types or intrinsics): the CPU emulation of the kernels
// (tests/csrc/conv2d_relu_emulate.cuh) runs this same code, so its tests check the real plan.
// The kernels' geometry and loader types come in as template parameters.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace fastconv_cuda {
namespace plan {

constexpr int kTcBK = 64;     // k-tile of the large-tile kernels (tc::BK asserts the same)
constexpr int kMmaBK = 32;    // k-tile of the 128x128x32 mma_gemm_kernel (convk::BK)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// Output length, or 0 when the dilated kernel does not fit the padded input.
inline int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t num = in + 2 * p - d * (k - 1) - 1;
  return num < 0 ? 0 : num / s + 1;
}

// ---- which kernel ----

// FASTCONV_CONV_TILE forces a tile so that tests and sweeps reach every kernel on small shapes
// (old: the 128x128x32 kernels, which the planner keeps for odd channel counts and for problems
// the large-tile loaders cannot index); unset or unknown: chosen per call.
enum class Tile { Auto, Big, Mid, Old, Wgmma };

inline Tile tile_override() {
  const char* e = std::getenv("FASTCONV_CONV_TILE");
  if (e == nullptr) return Tile::Auto;
  if (!std::strcmp(e, "big")) return Tile::Big;
  if (!std::strcmp(e, "mid")) return Tile::Mid;
  if (!std::strcmp(e, "old")) return Tile::Old;
  if (!std::strcmp(e, "wgmma")) return Tile::Wgmma;
  return Tile::Auto;
}

// The cp.async loaders index pixels of the window origins in 32 bits and pack (h0, w0) in 16.
inline bool tc_fits(int64_t N, int64_t H, int64_t W, int64_t R, int64_t S, int64_t dh,
                    int64_t dw, int64_t ph, int64_t pw) {
  const int64_t hh = H + R * dh + std::abs(ph), ww = W + S * dw + std::abs(pw);
  return hh < 32768 && ww < 32768 && (N + 2) * hh * ww < (int64_t(1) << 31);
}

// Forward on the large-tile kernel: 16-byte channel chunks, indexable, packed weights < 2^31.
template <class G> bool fwd_tc_ok(const G& g) {
  return g.Cg % 8 == 0 && tc_fits(g.N, g.H, g.W, g.R, g.S, g.dh, g.dw, g.ph, g.pw) &&
         int64_t(g.K) * round_up(int64_t(g.Cg) * g.R * g.S, kTcBK) < (int64_t(1) << 31);
}

// The tensor-core backward (mask pass, then the kernels below): K in 16-byte chunks, at most
// 2048 channels (the mask pass keeps one block row of channel vectors).
template <class G> bool bwd_tc_ok(const G& g) {
  return g.K % 8 == 0 && g.Kg % 8 == 0 && g.K <= 2048;
}

// Padding of the forward conv that computes a stride-1 grad_input.
template <class G> std::pair<int, int> dgrad_padding(const G& g) {
  return {g.dh * (g.R - 1) - g.ph, g.dw * (g.S - 1) - g.pw};
}

// grad_input as a forward conv on the large tile: stride 1 only.
template <class G> bool dgrad_tc_ok(const G& g) {
  const auto [php, pwp] = dgrad_padding(g);
  return g.sh == 1 && g.sw == 1 && tc_fits(g.N, g.P, g.Q, g.R, g.S, g.dh, g.dw, php, pwp) &&
         int64_t(g.C) * round_up(int64_t(g.R) * g.S * g.Kg, kTcBK) < (int64_t(1) << 31);
}

template <class G> bool wgrad_tc_ok(const G& g) {
  return g.Cg % 8 == 0 && tc_fits(g.N, g.H, g.W, g.R, g.S, g.dh, g.dw, g.ph, g.pw);
}

// Big (256x128, one CTA per SM) unless its last wave is much emptier than Mid's (128x128, two
// per SM); a Big tile is taken as ~15% more efficient per flop (half the shared-memory traffic
// per mma of a 64x32 warp tile).
inline bool use_big(int64_t rows, int64_t cols, int64_t G, int64_t sms, bool big_fits, Tile ov,
                    int big_bm = 256, int big_bn = 128, int mid_bm = 128, int mid_bn = 128) {
  if (!big_fits || ov == Tile::Mid) return false;
  if (ov == Tile::Big) return true;
  const int64_t big = cdiv(rows, big_bm) * cdiv(cols, big_bn) * G;
  const int64_t mid = cdiv(rows, mid_bm) * cdiv(cols, mid_bn) * G;
  return double(cdiv(big, sms)) * 2.0 <= double(cdiv(mid, 2 * sms)) * 2.0 * 1.15;
}

// grad_weight tile: Big for 256 output channels per group and more.
inline bool wgrad_big(int64_t Kg, bool big_fits, Tile ov) {
  return big_fits && ov != Tile::Mid && (ov == Tile::Big || Kg >= 256);
}

// Whether an epilogue may store 8 channels at once: channels_last strides, channel counts in
// 8s, a 16-byte aligned base.
inline bool epi_vec(const int64_t (&os)[4], int64_t chg, int64_t channels, bool aligned16) {
  return os[1] == 1 && chg % 8 == 0 && channels % 8 == 0 && aligned16 && os[0] % 8 == 0 &&
         os[2] % 8 == 0 && os[3] % 8 == 0;
}

// Fills a pixel-rows epilogue (convk::EpiPixel, tc::EpiOut): output rows (n, h, w) of an
// (N, channels, H, W) tensor with strides os, chg channels per group.
template <class E, class T, class B>
void fill_epi(E& e, T* out, const int64_t (&os)[4], int64_t rows, int H, int W, int64_t chg,
              int64_t channels, const B* bias, bool relu, bool aligned16) {
  using Div = decltype(e.dW);
  e.out = out;
  for (int i = 0; i < 4; ++i) e.os[i] = os[i];
  e.dHW = Div(int64_t(H) * W);
  e.dW = Div(W);
  e.M = int(rows);
  e.chg = int(chg);
  e.bias = bias;
  e.relu = relu;
  e.vec = epi_vec(os, chg, channels, aligned16);
}

// ---- reduction splits ----

// Splits for grad_weight on the large tile: the count whose CTAs fill the machine's slots most
// evenly (at least one full wave when the reduction is long enough), workspace below 1 GiB.
inline int pick_splits(int64_t tiles, int64_t kt_total, int64_t slots, int64_t bytes_per_split) {
  const int64_t smax = std::max<int64_t>(
      1, std::min<int64_t>({kt_total / 4, 4096,
                            (int64_t(1) << 30) / std::max<int64_t>(1, bytes_per_split)}));
  int64_t best = 1;
  double best_score = -1;
  for (int64_t s = 1; s <= smax && tiles * s <= 8 * slots; ++s) {
    const int64_t ctas = tiles * s, waves = cdiv(ctas, slots);
    const double score = double(ctas) / double(waves * slots) * std::min(1.0, double(ctas) / slots);
    if (score > best_score + 1e-6) {
      best_score = score;
      best = s;
    }
  }
  return int(best);
}

// Splits of the pixel reduction on the 128x128x32 and SIMT kernels: about two waves of CTAs, at
// least 8 tiles per split, and a workspace below 1 GiB.
inline int wgrad_splits(int64_t tiles, int64_t kt_total, int64_t ws_per_split_bytes,
                        int64_t sms) {
  const int64_t want = cdiv(2 * sms, tiles);
  int64_t s = std::max<int64_t>(1, std::min(want, kt_total / 8));
  s = std::min<int64_t>(s, std::max<int64_t>(1, (int64_t(1) << 30) / ws_per_split_bytes));
  return int(std::min<int64_t>(s, 4096));
}

// `want` splits of kt_total k-tiles as whole tiles per split: {splits, tiles per split}.
inline std::pair<int, int> even_split(int64_t kt_total, int64_t want) {
  const int64_t per = cdiv(kt_total, std::max<int64_t>(1, want));
  return {int(cdiv(kt_total, per)), int(per)};
}

// Launch geometry of the ReLU mask + grad_bias pass over M pixels of K channels: blocks of
// (K / 8 channel vectors) x (PL pixel lanes), each over `per` consecutive pixels.
struct MaskGrid {
  int KV, PL;
  int64_t per, blocks;
};

inline MaskGrid mask_bias_grid(int64_t M, int K, int64_t blocks_wanted) {
  MaskGrid m;
  m.KV = K / 8;
  m.PL = std::max(1, 256 / m.KV);
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(blocks_wanted, cdiv(M, int64_t(m.PL) * 8)));
  m.per = cdiv(M, blocks);
  m.blocks = cdiv(M, m.per);
  return m;
}

// ---- weight packing (on the weights' device) ----

inline at::Tensor pad_last(const at::Tensor& t, int64_t to) {
  const int64_t have = t.size(-1);
  return (to == have ? t : at::constant_pad_nd(t, {0, to - have})).contiguous();
}

// [K][Cg][R][S] -> [K][(r, s, c)], padded to a multiple of the large tile's k-tile.
inline at::Tensor pack_fwd_weight(const at::Tensor& w, int64_t& ld) {
  const int64_t K = w.size(0), kr = w.size(1) * w.size(2) * w.size(3);
  ld = round_up(kr, kTcBK);
  return pad_last(w.permute({0, 2, 3, 1}).reshape({K, kr}), ld);
}

// grad_input of a stride-1 conv is the conv of the masked grad_output with these weights:
// [G * Cg][(r', s', k)] = W[g Kg + k][c][R-1-r'][S-1-s'], padded like pack_fwd_weight.
inline at::Tensor pack_dgrad_weight(const at::Tensor& w, int64_t G, int64_t& ld) {
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3), Kg = K / G;
  ld = round_up(R * S * Kg, kTcBK);
  return pad_last(w.reshape({G, Kg, Cg, R, S}).flip({3, 4}).permute({0, 2, 3, 4, 1})
                      .reshape({G * Cg, R * S * Kg}),
                  ld);
}

// The 128x128x32 forward with vector loads: [K][r][s][c padded to Cpad].
inline at::Tensor pack_fwd_weight_cpad(const at::Tensor& w, int64_t G, int64_t& cpad) {
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3);
  cpad = round_up(Cg, kMmaBK);
  return pad_last(w.reshape({G, K / G, Cg, R, S}).permute({0, 1, 3, 4, 2}).contiguous(), cpad);
}

// The 128x128x32 forward with gather loads: [K][(c, r, s)] padded to a multiple of its k-tile.
inline at::Tensor pack_fwd_weight_rows(const at::Tensor& w, int64_t& ld) {
  const int64_t K = w.size(0), kr = w.size(1) * w.size(2) * w.size(3);
  ld = round_up(kr, kMmaBK);
  return pad_last(w.reshape({K, kr}), ld);
}

// The 128x128x32 grad_input with vector loads: [G][Cg][r][s][k padded to kpad].
inline at::Tensor pack_dgrad_weight_kpad(const at::Tensor& w, int64_t G, int64_t& kpad) {
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3);
  kpad = round_up(K / G, kMmaBK);
  return pad_last(w.reshape({G, K / G, Cg, R, S}).permute({0, 2, 3, 4, 1}).contiguous(), kpad);
}

// The 128x128x32 grad_input with gather loads: [G * Cg][(k, r, s)] padded to its k-tile.
inline at::Tensor pack_dgrad_weight_rows(const at::Tensor& w, int64_t G, int64_t& ld) {
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3), kr = K / G * R * S;
  ld = round_up(kr, kMmaBK);
  return pad_last(w.reshape({G, K / G, Cg, R, S}).permute({0, 2, 1, 3, 4}).reshape({G * Cg, kr}),
                  ld);
}

// ---- the large-tile forward kernel's problem ----

// One convolution as the forward kernel computes it: channels_last 16-byte aligned input x with
// cstride channels per pixel and Cg (% 8 == 0) per group, weights packed [G * Kg][ld] in
// (r, s, c) order and zero padded to ld (a multiple of kTcBK).
struct TcConv {
  const void* x;
  int64_t cstride;
  int Cg;
  const void* w;
  int ld;
  int N, H, W, P, Q, R, S, sh, sw, ph, pw, dh, dw, G, Kg;
};

template <class G> TcConv fwd_problem(const G& g, const void* x, const void* w, int64_t ld) {
  return TcConv{x, g.C, g.Cg, w, int(ld), g.N, g.H, g.W, g.P, g.Q, g.R, g.S, g.sh, g.sw,
                g.ph, g.pw, g.dh, g.dw, g.G, g.Kg};
}

// Stride-1 grad_input: the forward conv of the masked grad_output (K channels, Kg per group) with
// pack_dgrad_weight's weights, over the (P, Q) plane with dgrad_padding.
template <class G> TcConv dgrad_problem(const G& g, const void* dym, const void* w, int64_t ld) {
  const auto [php, pwp] = dgrad_padding(g);
  return TcConv{dym, g.K, g.Kg, w, int(ld), g.N, g.P, g.Q, g.H, g.W, g.R, g.S, 1, 1,
                php, pwp, g.dh, g.dw, g.G, g.Cg};
}

// Stride, padding and dilation, which the geometries and the loaders name alike.
template <class From, class To> void copy_window(const From& f, To& t) {
  t.sh = f.sh;
  t.sw = f.sw;
  t.ph = f.ph;
  t.pw = f.pw;
  t.dh = f.dh;
  t.dw = f.dw;
}

// Fills the forward kernel's loaders (tc::FwdLoadA, tc::RowsLoad); returns the k-tile count.
template <class LA, class LB> int fill_fwd_loaders(const TcConv& p, LA& la, LB& lb) {
  using Div = decltype(la.dQ);
  la.x = static_cast<const uint16_t*>(p.x);
  la.cstride = p.cstride;
  la.cg = p.Cg;
  la.H = p.H;
  la.W = p.W;
  la.S = p.S;
  la.RS = p.R * p.S;
  copy_window(p, la);
  la.M = p.N * p.P * p.Q;
  la.dPQ = Div(int64_t(p.P) * p.Q);
  la.dQ = Div(p.Q);
  la.dC8 = Div(p.Cg / 8);
  la.dS = Div(p.S);
  lb.w = static_cast<const uint16_t*>(p.w);
  lb.ld = p.ld;
  lb.rows_per_group = p.Kg;
  return int(cdiv(int64_t(p.R) * p.S * p.Cg, kTcBK));
}

// Fills the large-tile grad_weight loaders (tc::PixLoadMN over the masked grad_output,
// tc::Im2colLoadMN over the channels_last input).
template <class G, class LA, class LB>
void fill_wgrad_loaders(const G& g, const void* dym, const void* x, LA& la, LB& lb) {
  using Div = decltype(lb.dQ);
  const int64_t M = int64_t(g.N) * g.P * g.Q;
  la.dy = static_cast<const uint16_t*>(dym);
  la.K = g.K;
  la.kg = g.Kg;
  la.M = int(M);
  lb.x = static_cast<const uint16_t*>(x);
  lb.C = g.C;
  lb.H = g.H;
  lb.W = g.W;
  lb.cg = g.Cg;
  lb.ncols = int(int64_t(g.Cg) * g.R * g.S);
  lb.M = int(M);
  copy_window(g, lb);
  lb.S = g.S;
  lb.dPQ = Div(int64_t(g.P) * g.Q);
  lb.dQ = Div(g.Q);
}

// ---- the SIMT kernels' weight operand ----

// FwdB or DgradB (the same fields, different gathers) over the weights at w, whose element
// strides are ws (K, C, R, S order).
template <class B, class Geom, typename T>
B simt_weights(const T* w, const int64_t (&ws)[4], const Geom& g) {
  B b;
  b.w = w;
  std::copy(ws, ws + 4, b.ws);
  b.g = g;
  b.dRS = decltype(b.dRS)(int64_t(g.R) * g.S);
  b.dS = decltype(b.dS)(g.S);
  b.grp = 0;
  return b;
}

}  // namespace plan
}  // namespace fastconv_cuda
