"""Triton batch norm (optionally fused with the following ReLU), forward and backward, as three
custom ops (torch.library gives no autograd to ops that mutate inputs, hence the split):

* ``fastconv::triton_batch_norm_stats(input, running_mean!, running_var!, training, momentum,
  eps) -> (centre, save_mean, save_invstd)``: batch statistics (training) or running ones
  (eval); updates the running statistics in place. Called on a detached input.
* ``fastconv::triton_batch_norm(input, weight, bias, centre, save_invstd, training, relu,
  residual=None) -> output``: normalise (+ residual) (+ReLU); functional, with
  ``register_autograd``.
* ``fastconv::triton_batch_norm_backward(...) -> (grad_input, grad_weight, grad_bias,
  grad_residual)``.

A residual (ResNet's ``relu(bn(x) + identity)``) is read by the normalising pass (constexpr
HAS_RES: nothing is read or computed without one); its gradient, dy masked by the ReLU (or dy
itself without ReLU: no pass), is stored by the backward pass that writes grad_input, from the
same loads.

Those ops serve tracing and torch.compile. An eager call (real tensors, not compiling) runs the
same launchers under one ``torch.autograd.Function`` instead: the op dispatcher costs ~120 us
of host time per call, more than the GPU time of most of VGG's and ResNet's BN layers.

Launches (the first H100 sweep: small layers cost 0.3-1.5 ms of host time whatever their size):

* training forward: ``_bn_stats_kernel`` then ``_bn_apply_kernel``. The statistics are split
  over (chunk of rows, channel block) programs; the last program of a channel block to finish
  (an atomic ticket) merges the chunks in a fixed order and finalises the statistics and the
  running averages, so there is no separate finalize launch and the result is deterministic.
  When one program per channel block suffices (small layers, ``fused_elements``), that program
  also normalises: the whole forward is one launch.
* eval forward: one ``_bn_apply_kernel`` reading the running statistics (plus a tiny stats
  kernel when a backward will need them).
* backward: ``_bn_bwd_reduce_kernel`` (sum dy', sum dy' * (x - mean), last program finalises
  grad_weight, grad_bias and the dx coefficients) then ``_bn_bwd_dx_kernel``; again one launch
  for small layers. In eval mode with only grad_input wanted, the dx kernel alone.

The tickets live in a per-(device, stream) int32 buffer that the finalising program resets to
zero, so no launch needs a zero fill (traced calls use a fresh ``torch.zeros`` instead).

Both layouts are read without copies: channels_last is [N*H*W rows, C columns] (channel =
column, 16-byte vectors along C); NCHW is [N*C rows, H*W columns], which the reductions tile in
3-D as [samples, channels, pixels] so one program covers several planes of small layers.

Statistics are float32 whatever the input dtype. Mean and variance come from per-lane Welford
recurrences on ``x - shift`` (shift = x[0, c, 0, 0], one sample of the channel) merged with
Chan's formula: values of a channel offset by 1e4 keep their float32 precision, and the
normalisation computes ``((x - shift) - mean_shifted) * scale + bias`` so the large offset
cancels exactly before any rounding of small quantities. The Welford step divides by the lane's
count; counts are equal for every live lane of a tile iteration, so one scalar reciprocal per
iteration replaces a per-element IEEE division (the sm_90 SASS of the old loop spent ~33
instructions per element, compute-bound below copy bandwidth; now ~10).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...checks import check_batch_norm, check_residual
from ...shapes import dense_channels_last, memory_format
from . import utils
from .autotune import device_tuning, load_tuning, tuning_state
from .utils import (PlanCache, alloc, cdiv, cols_block, common_why_not, declare_kernels,
                    define_op, dense_needs_index64, eager, grad_needed, is_real,
                    next_pow2, num_sms, run)

# Launch sizes by device kind (batch_norm_configs.json, whose "about" says what each means);
# sweeps edit this dict in place.
TUNING = load_tuning("batch_norm")
_FINALIZE_BLOCK_C = 64  # eval statistics kernel
# chunks merged per step by the finalising program (32 put an 8-byte stack frame in the fp32
# NCHW statistics kernel: benchmarks/aot_sm90.md)
_FINALIZE_BLOCK_K = 16
# Software pipelining of the reduction loops' plain loads (sm_90 AOT: scripts/aot/specs.py)
NUM_STAGES = 1
# With relu=True the backward masks dy where the output is <= 0. True: read the saved output
# (exactly torch's mask). False: recompute the output's sign from x in registers, which saves
# two of the ten passes of a training step (forward 3, backward 7 -> 5); the masks differ only
# where the float32 output is positive but rounds to 0 in the storage dtype (|y| < 6e-8 in
# float16), where both choices are valid subgradients. Kept as a switch (kernel constexpr
# RELU_FROM_X) because the one H100 comparison (benchmarks/results/h100-2026-11-23) was bound
# by host time and could not tell the two apart; decide on a device-bound measurement.
RELU_MASK_FROM_OUTPUT = True


# --------------------------------------------------------------------------- kernels
@triton.jit
def _welford_combine(m1, q1, n1, m2, q2, n2):
    """Chan's merge of two (mean, sum of squared deviations, count) summaries."""
    n = n1 + n2
    w2 = tl.where(n > 0, n2 / tl.maximum(n, 1.0), 0.0)
    d = m2 - m1
    return m1 + d * w2, q1 + q2 + d * d * n1 * w2, n


@triton.jit
def _welford_reduce(mean, m2, cnt, axis: tl.constexpr):
    """Merge many summaries along ``axis`` at once: the total mean is the count-weighted mean,
    and each part adds its squared offset from it (Chan's formula for k parts). Plain sums:
    cheaper than pairwise merging, and as stable since the parts' means are close."""
    n = tl.sum(cnt, axis)
    mu = tl.sum(cnt * mean, axis) / tl.maximum(n, 1.0)
    d = mean - tl.expand_dims(mu, axis)
    q = tl.sum(m2 + cnt * d * d, axis)
    return mu, q, n


@triton.jit
def _welford_step(mean, m2, v, ok, inv):
    # inv = 1 / (this lane's count including v), the same for every live lane of the tile
    d = v - mean
    mean = tl.where(ok, mean + d * inv, mean)
    m2 = tl.where(ok, m2 + d * (v - mean), m2)
    return mean, m2


@triton.jit
def _chunk_merge_stats(part_ptr, cv, c_ok, C, HW, ROWS, ROWS_PER_CHUNK, NUM_CHUNKS,
                       CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """The finalising program: merge every chunk's (mean, m2) of these channels, in chunk
    order. Counts are implied by the chunk sizes. ``.cg`` loads: the partials were written by
    other SMs during this launch, so they must come from L2, not a stale L1 line."""
    plane = NUM_CHUNKS * C
    k = tl.arange(0, BLOCK_K)[:, None]
    cvk = cv[None, :]
    okc = c_ok[None, :]
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    for k0 in range(0, NUM_CHUNKS, BLOCK_K):
        kk = k0 + k
        ok = (kk < NUM_CHUNKS) & okc
        off = kk * C + cvk
        pm = tl.load(part_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
        pq = tl.load(part_ptr + plane + off, mask=ok, other=0.0, cache_modifier=".cg")
        rows_k = tl.minimum(ROWS - kk * ROWS_PER_CHUNK, ROWS_PER_CHUNK).to(tl.float32)
        if not CHANNELS_LAST:
            rows_k = rows_k * HW  # NCHW chunks are samples of HW pixels
        pn = tl.where(ok, rows_k, 0.0)
        bm, bq, bn = _welford_reduce(pm, pq, pn, 0)
        mean, m2, cnt = _welford_combine(mean, m2, cnt, bm, bq, bn)
    return mean, m2, cnt


@triton.jit
def _bn_finish(mean_s, m2, cnt, shift, cv, c_ok, rm_ptr, rv_ptr, centre_ptr, mean_ptr,
               invstd_ptr, C, momentum, eps, HAS_RUNNING: tl.constexpr,
               WRITE_MEAN: tl.constexpr):
    """Statistics of these channels from their merged summary: write centre = [shift,
    mean - shift], save_mean, save_invstd and update the running statistics."""
    cnt = tl.where(c_ok, cnt, 2.0)  # keep lanes past C finite
    var = m2 / cnt
    invstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    mean = shift + mean_s
    if HAS_RUNNING:
        unbiased = m2 / (cnt - 1.0)
        rm = tl.load(rm_ptr + cv, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + cv, mask=c_ok, other=0.0).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(rm_ptr + cv, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rv_ptr + cv, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)
    tl.store(centre_ptr + cv, shift, mask=c_ok)
    tl.store(centre_ptr + C + cv, mean_s, mask=c_ok)
    if WRITE_MEAN:
        tl.store(mean_ptr + cv, mean, mask=c_ok)
    tl.store(invstd_ptr + cv, invstd, mask=c_ok)
    return invstd


@triton.jit
def _load_channel(ptr, ch, ok, other: tl.constexpr, PRESENT: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + ch, mask=ok, other=other).to(tl.float32)
    else:
        return tl.zeros_like(ch.to(tl.float32)) + other


@triton.jit
def _bn_affine(v, shift, mean_s, scale, bias):
    """The normalisation; the backward recomputes the ReLU mask with this same expression."""
    return ((v - shift) - mean_s) * scale + bias


@triton.jit
def _bn_out(v, shift, mean_s, scale, bias, r_ptr, off, ok, RELU: tl.constexpr,
            HAS_RES: tl.constexpr):
    """The output at ``off``: normalise, add the residual (read in float32: one rounding of
    the sum, where bn, add and relu in torch round twice), then ReLU."""
    y = _bn_affine(v, shift, mean_s, scale, bias)
    if HAS_RES:
        y += tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
    return y


@triton.jit
def _relu_grad(dy, y):
    # torch's ReLU backward: zero where the output is <= 0 (NaN outputs pass). Written as a
    # positive test: `where(y <= 0, 0, dy)` crashes Triton 3.8's LLVM lowering for float32
    # [32, 64] tiles (sm_90).
    return tl.where((y > 0) | (y != y), dy, 0.0)


@triton.jit
def _nchw_pass_count(nb, hb, NHW, ss, rem):
    """1 / count of a live NCHW lane after tile (n-block nb, pixel-block hb): lanes with
    pixel offset s < rem see all NHW pixel blocks of a sample, the others NHW - 1."""
    inv_a = 1.0 / (nb * NHW + hb + 1).to(tl.float32)
    inv_b = 1.0 / (nb * (NHW - 1) + hb + 1).to(tl.float32)
    return tl.where(ss < rem, inv_a, inv_b)


@triton.jit
def _bn_stats_kernel(x_ptr, y_ptr, r_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, centre_ptr, mean_ptr,
                     invstd_ptr, part_ptr, ticket_ptr,
                     C, HW, ROWS, ROWS_PER_CHUNK, NUM_CHUNKS, momentum, eps,
                     HAS_RUNNING: tl.constexpr, WRITE_MEAN: tl.constexpr, SINGLE: tl.constexpr,
                     APPLY: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RELU: tl.constexpr, HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     INDEX64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Program (chunk, channel block): Welford summary of x - shift over the chunk's rows
    (NHWC: pixels; NCHW: samples). SINGLE (one chunk): finalise at once and, with APPLY, also
    write y (+ the residual r, then ReLU). Otherwise store the summary; the last program of
    the channel block finalises."""
    chunk = tl.program_id(0)
    cv = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cv < C
    if INDEX64:
        cv = cv.to(tl.int64)
    row0 = chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row0 + ROWS_PER_CHUNK, ROWS)
    if CHANNELS_LAST:
        shift = tl.load(x_ptr + cv, mask=c_ok, other=0.0).to(tl.float32)
        r = tl.arange(0, BLOCK_R)[:, None]
        c2 = cv[None, :]
        ok_c = c_ok[None, :]
        sh = shift[None, :]
        mean = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for r0 in range(row0, row_end, BLOCK_R):
            rows = r0 + r
            ok = (rows < row_end) & ok_c
            if INDEX64:
                rows = rows.to(tl.int64)
            v = tl.load(x_ptr + rows * C + c2, mask=ok, other=0.0).to(tl.float32) - sh
            inv = 1.0 / ((r0 - row0) // BLOCK_R + 1).to(tl.float32)
            mean, m2 = _welford_step(mean, m2, v, ok, inv)
        tiles = tl.maximum((row_end - row0 - r + BLOCK_R - 1) // BLOCK_R, 0)
        cnt = tl.where(ok_c, tiles.to(tl.float32), 0.0)
        mean_c, m2_c, cnt_c = _welford_reduce(mean, m2, cnt, 0)
    else:
        shift = tl.load(x_ptr + cv * HW, mask=c_ok, other=0.0).to(tl.float32)
        nr = tl.arange(0, BLOCK_R)[:, None, None]
        ss = tl.arange(0, BLOCK_S)[None, None, :]
        c3 = cv[None, :, None]
        ok_c = c_ok[None, :, None]
        sh = shift[None, :, None]
        NHW = (HW + BLOCK_S - 1) // BLOCK_S
        rem = HW - (NHW - 1) * BLOCK_S
        mean = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], tl.float32)
        m2 = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], tl.float32)
        for n0 in range(row0, row_end, BLOCK_R):
            n = n0 + nr
            n_ok = (n < row_end) & ok_c
            if INDEX64:
                n = n.to(tl.int64)
            base = (n * C + c3) * HW
            nb = (n0 - row0) // BLOCK_R
            for hw0 in range(0, HW, BLOCK_S):
                hw = hw0 + ss
                ok = n_ok & (hw < HW)
                v = tl.load(x_ptr + base + hw, mask=ok, other=0.0).to(tl.float32) - sh
                inv = _nchw_pass_count(nb, hw0 // BLOCK_S, NHW, ss, rem)
                mean, m2 = _welford_step(mean, m2, v, ok, inv)
        tiles = tl.maximum((row_end - row0 - nr + BLOCK_R - 1) // BLOCK_R, 0)
        cnt = tl.where(ok_c, (tiles * tl.where(ss < rem, NHW, NHW - 1)).to(tl.float32), 0.0)
        mean_c, m2_c, cnt_c = _welford_reduce(mean, m2, cnt, 2)
        mean_c, m2_c, cnt_c = _welford_reduce(mean_c, m2_c, cnt_c, 0)
    if SINGLE:
        invstd = _bn_finish(mean_c, m2_c, cnt_c, shift, cv, c_ok, rm_ptr, rv_ptr, centre_ptr,
                            mean_ptr, invstd_ptr, C, momentum, eps, HAS_RUNNING, WRITE_MEAN)
        if APPLY:
            scale = invstd * _load_channel(w_ptr, cv, c_ok, 1.0, HAS_W)
            bias = _load_channel(b_ptr, cv, c_ok, 0.0, HAS_B)
            if CHANNELS_LAST:
                ms = mean_c[None, :]
                sc = scale[None, :]
                bi = bias[None, :]
                for r0 in range(row0, row_end, BLOCK_R):
                    rows = r0 + r
                    ok = (rows < row_end) & ok_c
                    if INDEX64:
                        rows = rows.to(tl.int64)
                    off = rows * C + c2
                    v = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
                    y = _bn_out(v, sh, ms, sc, bi, r_ptr, off, ok, RELU, HAS_RES)
                    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                ms = mean_c[None, :, None]
                sc = scale[None, :, None]
                bi = bias[None, :, None]
                for n0 in range(row0, row_end, BLOCK_R):
                    n = n0 + nr
                    n_ok = (n < row_end) & ok_c
                    if INDEX64:
                        n = n.to(tl.int64)
                    base = (n * C + c3) * HW
                    for hw0 in range(0, HW, BLOCK_S):
                        hw = hw0 + ss
                        ok = n_ok & (hw < HW)
                        v = tl.load(x_ptr + base + hw, mask=ok, other=0.0).to(tl.float32)
                        y = _bn_out(v, sh, ms, sc, bi, r_ptr, base + hw, ok, RELU, HAS_RES)
                        tl.store(y_ptr + base + hw, y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        plane = NUM_CHUNKS * C
        tl.store(part_ptr + chunk * C + cv, mean_c, mask=c_ok)
        tl.store(part_ptr + plane + chunk * C + cv, m2_c, mask=c_ok)
        # every thread's partials are stored before the one thread that takes the ticket
        # releases them (gpu scope); the winner's acquire orders its reads after all of them
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_CHUNKS - 1:
            mean_t, m2_t, cnt_t = _chunk_merge_stats(part_ptr, cv, c_ok, C, HW, ROWS,
                                                     ROWS_PER_CHUNK, NUM_CHUNKS, CHANNELS_LAST,
                                                     BLOCK_C, BLOCK_K)
            _bn_finish(mean_t, m2_t, cnt_t, shift, cv, c_ok, rm_ptr, rv_ptr, centre_ptr,
                       mean_ptr, invstd_ptr, C, momentum, eps, HAS_RUNNING, WRITE_MEAN)
            tl.store(ticket_ptr + tl.program_id(1), 0)  # ready for the next launch


@triton.jit
def _bn_eval_stats_kernel(rm_ptr, rv_ptr, centre_ptr, mean_ptr, invstd_ptr, C, eps,
                          WRITE_MEAN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eval mode, when a backward will need them: centre = [running_mean, 0], save_mean,
    save_invstd from the running statistics."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    var = tl.load(rv_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    invstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(centre_ptr + c, mean, mask=c_ok)
    tl.store(centre_ptr + C + c, tl.zeros([BLOCK_C], tl.float32), mask=c_ok)
    if WRITE_MEAN:
        tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)


@triton.jit
def _channel_of(rows, cols, C, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return cols
    else:
        return rows % C


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, r_ptr, centre_ptr, invstd_ptr, w_ptr, b_ptr, rm_ptr,
                     rv_ptr, C, ROWS, COLS, eps,
                     FROM_RUNNING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RELU: tl.constexpr, HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     INDEX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = normalise(x) (+ residual r) (+ReLU) over the dense [ROWS, COLS] view; FROM_RUNNING
    (eval, inference): the per-channel statistics come straight from the running buffers."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    r_ok = rows < ROWS
    s_ok = cols < COLS
    mask = r_ok & s_ok
    ch = _channel_of(rows, cols, C, CHANNELS_LAST)
    if CHANNELS_LAST:
        ch_ok = s_ok
    else:
        ch_ok = r_ok
    if FROM_RUNNING:
        shift = tl.load(rm_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32)
        # per element (channels broadcast along the tile): the approximate rsqrt (2 ulp) costs
        # 1 instruction, the IEEE 1/sqrt ~30 and made this kernel compute-bound on sm_90
        scale = tl.math.rsqrt(var + eps)
        mean_s = tl.zeros_like(shift)
    else:
        shift = tl.load(centre_ptr + ch, mask=ch_ok, other=0.0)
        mean_s = tl.load(centre_ptr + C + ch, mask=ch_ok, other=0.0)
        scale = tl.load(invstd_ptr + ch, mask=ch_ok, other=0.0)
    scale = scale * _load_channel(w_ptr, ch, ch_ok, 1.0, HAS_W)
    bias = _load_channel(b_ptr, ch, ch_ok, 0.0, HAS_B)
    if INDEX64:
        rows = rows.to(tl.int64)
    off = rows * COLS + cols
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = _bn_out(v, shift, mean_s, scale, bias, r_ptr, off, mask, RELU, HAS_RES)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_terms(dy_ptr, x_ptr, y_ptr, off, ok, sh, ms, sc, bi, RELU: tl.constexpr,
               RELU_FROM_X: tl.constexpr):
    """(dy', x - mean) at ``off``: dy masked by the ReLU, from the saved output or recomputed
    from x with the forward's own expression. Masked lanes give (0, finite)."""
    dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    xc = (tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - sh) - ms
    if RELU:
        if RELU_FROM_X:
            dy = _relu_grad(dy, xc * sc + bi)
        else:
            dy = _relu_grad(dy, tl.load(y_ptr + off, mask=ok, other=0.0))
    return dy, xc


@triton.jit
def _bwd_finish(sdy, sdyx, cv, c_ok, invstd, w_ptr, dw_ptr, db_ptr, coef_ptr, C, inv_count,
                TRAINING: tl.constexpr, HAS_W: tl.constexpr, WRITE_DW: tl.constexpr,
                WRITE_DB: tl.constexpr, WRITE_COEF: tl.constexpr):
    """grad_weight, grad_bias and dx = a * dy' + k2 * (x - mean) + k3 (training: the batch
    statistics' own gradient) from the two per-channel sums."""
    a = invstd * _load_channel(w_ptr, cv, c_ok, 1.0, HAS_W)
    if WRITE_DW:
        tl.store(dw_ptr + cv, (sdyx * invstd).to(dw_ptr.dtype.element_ty), mask=c_ok)
    if WRITE_DB:
        tl.store(db_ptr + cv, sdy.to(db_ptr.dtype.element_ty), mask=c_ok)
    if TRAINING:
        k2 = -a * invstd * invstd * sdyx * inv_count
        k3 = -a * sdy * inv_count
    else:
        k2 = tl.zeros_like(a)
        k3 = tl.zeros_like(a)
    if WRITE_COEF:
        tl.store(coef_ptr + cv, a, mask=c_ok)
        tl.store(coef_ptr + C + cv, k2, mask=c_ok)
        tl.store(coef_ptr + 2 * C + cv, k3, mask=c_ok)
    return a, k2, k3


# Kept beside _bn_stats_kernel although its loops walk rows the same way: the bodies differ
# (dx vs y) inside the hot loop, and these kernels' sm_90 code is measured as it stands.
@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, y_ptr, dx_ptr, dr_ptr, centre_ptr, invstd_ptr, w_ptr,
                          b_ptr, dw_ptr, db_ptr, coef_ptr, part_ptr, ticket_ptr,
                          C, HW, ROWS, ROWS_PER_CHUNK, NUM_CHUNKS, inv_count,
                          TRAINING: tl.constexpr, RELU: tl.constexpr, RELU_FROM_X: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_DW: tl.constexpr,
                          WRITE_DB: tl.constexpr, WRITE_COEF: tl.constexpr,
                          SINGLE: tl.constexpr, DX: tl.constexpr, WRITE_DR: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Program (chunk, channel block): sum(dy') and sum(dy' * (x - mean)) over its rows.
    SINGLE: finalise at once and, with DX, also write dx. Otherwise store the sums; the last
    program of the channel block adds the chunks in order and finalises. WRITE_DR: store dy'
    (the residual's gradient) in the dx loop with DX, else in the reduction loop."""
    chunk = tl.program_id(0)
    cv = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cv < C
    if INDEX64:
        cv = cv.to(tl.int64)
    row0 = chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row0 + ROWS_PER_CHUNK, ROWS)
    shift = tl.load(centre_ptr + cv, mask=c_ok, other=0.0)
    mean_s = tl.load(centre_ptr + C + cv, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cv, mask=c_ok, other=0.0)
    if RELU_FROM_X:
        scale = invstd * _load_channel(w_ptr, cv, c_ok, 1.0, HAS_W)
        bias = _load_channel(b_ptr, cv, c_ok, 0.0, HAS_B)
    else:
        scale = invstd
        bias = invstd
    if CHANNELS_LAST:
        r = tl.arange(0, BLOCK_R)[:, None]
        c2 = cv[None, :]
        ok_c = c_ok[None, :]
        sh = shift[None, :]
        ms = mean_s[None, :]
        sc = scale[None, :]
        bi = bias[None, :]
        sdy = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        sdyx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for r0 in range(row0, row_end, BLOCK_R):
            rows = r0 + r
            ok = (rows < row_end) & ok_c
            if INDEX64:
                rows = rows.to(tl.int64)
            dy, xc = _bwd_terms(dy_ptr, x_ptr, y_ptr, rows * C + c2, ok, sh, ms, sc, bi, RELU,
                                RELU_FROM_X)
            if WRITE_DR and not DX:
                tl.store(dr_ptr + rows * C + c2, dy.to(dr_ptr.dtype.element_ty), mask=ok)
            sdy += dy
            sdyx += dy * xc
        sdy_c = tl.sum(sdy, 0)
        sdyx_c = tl.sum(sdyx, 0)
    else:
        nr = tl.arange(0, BLOCK_R)[:, None, None]
        ss = tl.arange(0, BLOCK_S)[None, None, :]
        c3 = cv[None, :, None]
        ok_c = c_ok[None, :, None]
        sh = shift[None, :, None]
        ms = mean_s[None, :, None]
        sc = scale[None, :, None]
        bi = bias[None, :, None]
        sdy = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], tl.float32)
        sdyx = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], tl.float32)
        for n0 in range(row0, row_end, BLOCK_R):
            n = n0 + nr
            n_ok = (n < row_end) & ok_c
            if INDEX64:
                n = n.to(tl.int64)
            base = (n * C + c3) * HW
            for hw0 in range(0, HW, BLOCK_S):
                hw = hw0 + ss
                ok = n_ok & (hw < HW)
                dy, xc = _bwd_terms(dy_ptr, x_ptr, y_ptr, base + hw, ok, sh, ms, sc, bi, RELU,
                                    RELU_FROM_X)
                if WRITE_DR and not DX:
                    tl.store(dr_ptr + base + hw, dy.to(dr_ptr.dtype.element_ty), mask=ok)
                sdy += dy
                sdyx += dy * xc
        sdy_c = tl.sum(tl.sum(sdy, 2), 0)
        sdyx_c = tl.sum(tl.sum(sdyx, 2), 0)
    if SINGLE:
        a, k2, k3 = _bwd_finish(sdy_c, sdyx_c, cv, c_ok, invstd, w_ptr, dw_ptr, db_ptr,
                                coef_ptr, C, inv_count, TRAINING, HAS_W, WRITE_DW, WRITE_DB,
                                WRITE_COEF)
        if DX:
            if CHANNELS_LAST:
                a2 = a[None, :]
                k22 = k2[None, :]
                k32 = k3[None, :]
                for r0 in range(row0, row_end, BLOCK_R):
                    rows = r0 + r
                    ok = (rows < row_end) & ok_c
                    if INDEX64:
                        rows = rows.to(tl.int64)
                    off = rows * C + c2
                    dy, xc = _bwd_terms(dy_ptr, x_ptr, y_ptr, off, ok, sh, ms, sc, bi, RELU,
                                        RELU_FROM_X)
                    if WRITE_DR:
                        tl.store(dr_ptr + off, dy.to(dr_ptr.dtype.element_ty), mask=ok)
                    dx = a2 * dy
                    if TRAINING:  # eval never touches x: 0 * inf would be NaN
                        dx += k22 * xc + k32
                    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            else:
                a3 = a[None, :, None]
                k23 = k2[None, :, None]
                k33 = k3[None, :, None]
                for n0 in range(row0, row_end, BLOCK_R):
                    n = n0 + nr
                    n_ok = (n < row_end) & ok_c
                    if INDEX64:
                        n = n.to(tl.int64)
                    base = (n * C + c3) * HW
                    for hw0 in range(0, HW, BLOCK_S):
                        hw = hw0 + ss
                        ok = n_ok & (hw < HW)
                        dy, xc = _bwd_terms(dy_ptr, x_ptr, y_ptr, base + hw, ok, sh, ms, sc,
                                            bi, RELU, RELU_FROM_X)
                        if WRITE_DR:
                            tl.store(dr_ptr + base + hw, dy.to(dr_ptr.dtype.element_ty), mask=ok)
                        dx = a3 * dy
                        if TRAINING:
                            dx += k23 * xc + k33
                        tl.store(dx_ptr + base + hw, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    else:
        plane = NUM_CHUNKS * C
        tl.store(part_ptr + chunk * C + cv, sdy_c, mask=c_ok)
        tl.store(part_ptr + plane + chunk * C + cv, sdyx_c, mask=c_ok)
        tl.debug_barrier()  # see _bn_stats_kernel
        ticket = tl.atomic_add(ticket_ptr + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_CHUNKS - 1:
            k = tl.arange(0, BLOCK_K)[:, None]
            cvk = cv[None, :]
            okc = c_ok[None, :]
            tdy = tl.zeros([BLOCK_C], tl.float32)
            tdyx = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, NUM_CHUNKS, BLOCK_K):
                ok = (k0 + k < NUM_CHUNKS) & okc
                off = (k0 + k) * C + cvk
                tdy += tl.sum(tl.load(part_ptr + off, mask=ok, other=0.0,
                                      cache_modifier=".cg"), 0)
                tdyx += tl.sum(tl.load(part_ptr + plane + off, mask=ok, other=0.0,
                                       cache_modifier=".cg"), 0)
            _bwd_finish(tdy, tdyx, cv, c_ok, invstd, w_ptr, dw_ptr, db_ptr, coef_ptr, C,
                        inv_count, TRAINING, HAS_W, WRITE_DW, WRITE_DB, WRITE_COEF)
            tl.store(ticket_ptr + tl.program_id(1), 0)


@triton.jit
def _bn_bwd_dx_kernel(dy_ptr, x_ptr, y_ptr, centre_ptr, coef_ptr, invstd_ptr, w_ptr, b_ptr,
                      dx_ptr, dr_ptr, C, ROWS, COLS,
                      RELU: tl.constexpr, RELU_FROM_X: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, TRAINING: tl.constexpr, FROM_STATS: tl.constexpr,
                      WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = a * dy' + k2 * (x - mean) + k3 over the dense [ROWS, COLS] view; FROM_STATS (eval,
    no reduction): a = invstd * weight, k2 = k3 = 0. WRITE_DR: also store dy' (the residual's
    gradient) from the same loads."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    r_ok = rows < ROWS
    s_ok = cols < COLS
    mask = r_ok & s_ok
    ch = _channel_of(rows, cols, C, CHANNELS_LAST)
    if CHANNELS_LAST:
        ch_ok = s_ok
    else:
        ch_ok = r_ok
    if FROM_STATS:
        a = tl.load(invstd_ptr + ch, mask=ch_ok, other=0.0)
        a = a * _load_channel(w_ptr, ch, ch_ok, 1.0, HAS_W)
    else:
        a = tl.load(coef_ptr + ch, mask=ch_ok, other=0.0)  # = invstd * weight
    if INDEX64:
        rows = rows.to(tl.int64)
    off = rows * COLS + cols
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if (TRAINING and WRITE_DX) or RELU_FROM_X:
        shift = tl.load(centre_ptr + ch, mask=ch_ok, other=0.0)
        mean_s = tl.load(centre_ptr + C + ch, mask=ch_ok, other=0.0)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        if RELU_FROM_X:
            bias = _load_channel(b_ptr, ch, ch_ok, 0.0, HAS_B)
            dy = _relu_grad(dy, _bn_affine(x, shift, mean_s, a, bias))
        else:
            dy = _relu_grad(dy, tl.load(y_ptr + off, mask=mask, other=0.0))
    if WRITE_DR:
        tl.store(dr_ptr + off, dy.to(dr_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        dx = a * dy
        if TRAINING:
            k2 = tl.load(coef_ptr + C + ch, mask=ch_ok, other=0.0)
            k3 = tl.load(coef_ptr + 2 * C + ch, mask=ch_ok, other=0.0)
            dx += k2 * ((x - shift) - mean_s) + k3
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch geometry
def _matrix(shape, channels_last: bool):
    """(ROWS, COLS) of the dense 2-D view the streaming kernels use."""
    n, c, h, w = shape
    return (n * h * w, c) if channels_last else (n * c, h * w)


def _elements(device: torch.device, tile: int, element_size: int) -> int:
    # GPU tiles are tuned for 2-byte dtypes; float32 halves them (same bytes, registers)
    return max(64, tile * 2 // element_size) if device.type == "cuda" else tile


def _stream_tile(rows: int, cols: int, channels_last: bool, device: torch.device,
                 element_size: int = 2):
    """(grid, BLOCK_R, BLOCK_S, warps) of the apply and dx kernels."""
    cfg = device_tuning(device, TUNING)
    tile = _elements(device, cfg["tile"], element_size)
    if channels_last:
        bs = cols_block(cols, cfg["max_channel_block"], 16)
    else:  # rows of H*W pixels: whole rows when short, else >= 64-element segments
        bs = cols_block(cols, tile, 64)
    br = max(1, min(tile // bs, next_pow2(rows)))
    return (cdiv(rows, br), cdiv(cols, bs)), br, bs, cfg["num_warps"]


def _reduce_plan(shape, channels_last: bool, device: torch.device, element_size: int = 2):
    """Geometry of the reductions: dict(grid, rows, per_chunk, chunks, BLOCK_R, BLOCK_C,
    BLOCK_S, warps, single). Rows are pixels (NHWC) or samples (NCHW). ``single``: one chunk
    per channel block, whose program also does the elementwise pass (one launch)."""
    n, c, h, w = shape
    hw = h * w
    cfg = device_tuning(device, TUNING)
    tile = _elements(device, cfg["reduce_tile"], element_size)
    fused_max = _elements(device, cfg["fused_elements"], element_size)
    sms = num_sms(device)
    if channels_last:
        rows, per_row, least = n * hw, 1, min(8, next_pow2(c))  # >= 16 bytes of bf16 a row
        bc = cols_block(c, cfg["max_channel_block"], 16)
    else:
        rows, per_row, least = n, hw, 1
        bs = cols_block(hw, tile, 64)
        bc = max(1, min(tile // bs, next_pow2(c), cfg["max_channel_block"]))
    column = rows * per_row  # elements of one channel
    narrow = bc
    while column * narrow > fused_max and narrow > least:
        narrow //= 2
    if column * narrow <= fused_max:
        # small layer: one program per channel block reduces and normalises its columns;
        # narrower blocks while that leaves SMs idle (512 x 4 x 4 x 128 NHWC: 64 programs)
        while cdiv(c, narrow) < sms and narrow > least:
            narrow //= 2
        bc, chunks = narrow, 1
    else:
        # chunked: the finalising program of a channel block merges all its chunks, so keep
        # chunks per block <= max_chunks by narrowing the block (C=64 NHWC: 4 blocks of 16
        # channels x 128 chunks rather than 1 x 528, a 4x shorter serial merge)
        target = cfg["programs_per_sm"] * sms
        while cdiv(target, cdiv(c, bc)) > cfg["max_chunks"] and bc > max(least, 16):
            bc //= 2
        chunks = None
    if channels_last:
        bs = 1
        br = max(1, min(tile // bc, next_pow2(rows)))
    else:
        br = max(1, min(tile // (bs * bc), next_pow2(rows)))
    cblocks = cdiv(c, bc)
    if chunks is None:
        most = cdiv(rows, br * max(1, cfg["min_chunk_tiles"]))
        chunks = max(1, min(cdiv(target, cblocks), cfg["max_chunks"], most))
    per_chunk = cdiv(rows, chunks)
    per_chunk = cdiv(per_chunk, br) * br  # whole tiles per chunk
    chunks = cdiv(rows, per_chunk)
    return dict(grid=(chunks, cblocks), rows=rows, per_chunk=per_chunk, chunks=chunks,
                BLOCK_R=br, BLOCK_C=bc, BLOCK_S=bs, warps=cfg["reduce_warps"],
                single=chunks == 1)


_TICKETS: dict = {}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _tickets(device: torch.device, count: int, real: bool) -> torch.Tensor:
    """Zeroed int32 tickets for ``count`` channel blocks. Real calls share a buffer per
    (device, stream) that every launch leaves zeroed (streams would race on one buffer);
    traced calls get a fresh zero tensor (a graph cannot hold a global buffer)."""
    if not real:
        return torch.zeros(count, dtype=torch.int32, device=device)
    stream = 0
    if device.type == "cuda" and _raw_stream is not None:
        stream = _raw_stream(device.index if device.index is not None
                             else torch.cuda.current_device())
    key = (device.type, device.index, stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _TICKETS[key] = buf
    return buf


_PLANS = PlanCache(lambda: (tuning_state(TUNING), utils.FORCE_INDEX64, _FINALIZE_BLOCK_K))
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def _layout(x: torch.Tensor):
    """(channels_last, dense): the output format torch would pick, and whether x is already
    dense in it (the kernels index the [ROWS, COLS] view; anything else is copied first)."""
    cl = dense_channels_last(x)
    return cl, x.is_contiguous(memory_format=memory_format(cl))


def _bn_plan(x: torch.Tensor) -> dict:
    cl, dense = _layout(x)
    rows, cols = _matrix(x.shape, cl)
    grid, br, bs, warps = _stream_tile(rows, cols, cl, x.device, x.element_size())
    red = _reduce_plan(x.shape, cl, x.device, x.element_size())
    return dict(cl=cl, dense=dense, fmt=memory_format(cl), rows=rows, cols=cols,
                index64=dense_needs_index64(x.numel()),
                stream=dict(grid=grid, BLOCK_R=br, BLOCK_S=bs, num_warps=warps),
                red=red, hw=x.shape[2] * x.shape[3], inv_count=1.0 / max(1, rows * cols //
                                                                          x.shape[1]))


def _plan_of(x: torch.Tensor, real: bool) -> dict:
    key = (x.shape, x.stride(), x.dtype, x.device) if real else None
    return _PLANS.get(key, lambda: _bn_plan(x))


def _red_meta(plan: dict) -> dict:
    red = plan["red"]
    return dict(CHANNELS_LAST=plan["cl"], INDEX64=plan["index64"], BLOCK_R=red["BLOCK_R"],
                BLOCK_C=red["BLOCK_C"], BLOCK_S=red["BLOCK_S"], BLOCK_K=_FINALIZE_BLOCK_K,
                num_warps=red["warps"], num_stages=NUM_STAGES)


def _stream_meta(plan: dict) -> dict:
    s = plan["stream"]
    return dict(CHANNELS_LAST=plan["cl"], INDEX64=plan["index64"], BLOCK_R=s["BLOCK_R"],
                BLOCK_S=s["BLOCK_S"], num_warps=s["num_warps"], num_stages=NUM_STAGES)


# --------------------------------------------------------------------------- launchers
def _bn_statistics(x, plan, real, running_mean, running_var, training, momentum, eps,
                   want_mean, y=None, weight=None, bias=None, relu=False, residual=None):
    """(centre, save_mean or None, save_invstd) of dense ``x``; in training the running
    statistics are updated. With ``y`` given (training only) the single-chunk plan also
    writes the output (+ dense ``residual``, +ReLU) and the return says so: (..., applied)."""
    c = x.shape[1]
    dev = x.device
    centre = alloc((2, c), torch.float32, dev)
    save_mean = alloc((c,), torch.float32, dev) if want_mean else None
    invstd = alloc((c,), torch.float32, dev)
    has_running = running_mean is not None
    if not training:
        run(_bn_eval_stats_kernel, (cdiv(c, _FINALIZE_BLOCK_C),),
            (running_mean, running_var, centre, save_mean, invstd, c, float(eps)),
            dict(WRITE_MEAN=bool(want_mean), BLOCK_C=_FINALIZE_BLOCK_C, num_warps=4), real)
        return centre, save_mean, invstd, False
    red = plan["red"]
    apply = y is not None and red["single"]
    part = tickets = None
    if not red["single"]:
        part = alloc((2, red["chunks"], c), torch.float32, dev)
        tickets = _tickets(dev, red["grid"][1], real)
    run(_bn_stats_kernel, red["grid"],
        (x, y if apply else None, residual if apply else None, weight, bias, running_mean,
         running_var, centre, save_mean, invstd, part, tickets, c, plan["hw"], red["rows"],
         red["per_chunk"], red["chunks"], float(momentum), float(eps)),
        dict(_red_meta(plan), HAS_RUNNING=has_running, WRITE_MEAN=bool(want_mean),
             SINGLE=red["single"], APPLY=apply, HAS_W=weight is not None,
             HAS_B=bias is not None, RELU=bool(relu),
             HAS_RES=apply and residual is not None), real)
    if (has_running and real and _increment_version is not None
            and not running_mean.is_inference()):  # inference tensors have no version
        _increment_version(running_mean)  # as torch's in-place update would
        _increment_version(running_var)
    return centre, save_mean, invstd, apply


def _bn_apply(x, plan, real, weight, bias, centre, invstd, relu, y=None, running=None,
              eps=0.0, residual=None):
    """y = normalise(x) (+ dense ``residual``) (+ReLU); ``running=(mean, var)``: eval
    statistics read in-kernel."""
    if y is None:
        y = alloc(x.shape, x.dtype, x.device, plan["fmt"])
    if y.numel() == 0:
        return y
    rm, rv = running if running is not None else (None, None)
    run(_bn_apply_kernel, plan["stream"]["grid"],
        (x, y, residual, centre, invstd, weight, bias, rm, rv, x.shape[1], plan["rows"],
         plan["cols"], float(eps)),
        dict(_stream_meta(plan), FROM_RUNNING=running is not None, HAS_W=weight is not None,
             HAS_B=bias is not None, RELU=bool(relu), HAS_RES=residual is not None), real)
    return y


def _dense(t: Optional[torch.Tensor], fmt) -> Optional[torch.Tensor]:
    return t if t is None or t.is_contiguous(memory_format=fmt) else t.contiguous(
        memory_format=fmt)


def _bn_backward(dy, x, y, weight, bias, centre, invstd, training, relu, output_mask):
    """-> (grad_input, grad_weight, grad_bias, grad_residual); those not asked for are empty
    (``output_mask[3]``, when present, asks for grad_residual: dy masked by the ReLU, written
    by the pass that writes grad_input, else by the reduction). ``y``: the saved output for
    the ReLU mask, or None to recompute the mask from ``x`` (not with a residual)."""
    real = is_real(x)
    plan = _plan_of(x, real)
    fmt = plan["fmt"]
    x = x if plan["dense"] else x.contiguous(memory_format=fmt)
    dy = _dense(dy, fmt)
    y = _dense(y, fmt) if relu else None
    relu_from_x = bool(relu) and y is None
    c = x.shape[1]
    dev = x.device
    want_dx, want_dw, want_db = (bool(m) for m in output_mask[:3])
    want_dr = len(output_mask) > 3 and bool(output_mask[3])
    want_dw = want_dw and weight is not None
    want_db = want_db and bias is not None
    dx = alloc(x.shape if want_dx else (0,), x.dtype, dev, fmt if want_dx else
               torch.contiguous_format)
    dw = alloc((c if want_dw else 0,), weight.dtype if weight is not None else torch.float32,
               dev)
    db = alloc((c if want_db else 0,), bias.dtype if bias is not None else torch.float32, dev)
    dr = alloc(x.shape if want_dr else (0,), x.dtype, dev, fmt if want_dr else
               torch.contiguous_format)
    if want_dr and not relu:  # the residual's gradient is grad_output itself
        dr.copy_(dy)
        want_dr = False
    if want_dr and relu_from_x:
        raise ValueError("triton_batch_norm_backward: grad_residual needs the saved output "
                         "(the ReLU mask of bn(input) + residual cannot come from input)")
    if not (want_dx or want_dw or want_db or want_dr):
        return dx, dw, db, dr
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_(), dr
    red = plan["red"]
    common = dict(RELU=bool(relu), RELU_FROM_X=relu_from_x, HAS_W=weight is not None,
                  HAS_B=bias is not None, TRAINING=bool(training))
    reduce = want_dw or want_db or (want_dx and training)
    coef = None
    if reduce:
        fused_dx = want_dx and red["single"]
        if want_dx and not fused_dx:
            coef = alloc((3, c), torch.float32, dev)
        part = tickets = None
        if not red["single"]:
            part = alloc((2, red["chunks"], c), torch.float32, dev)
            tickets = _tickets(dev, red["grid"][1], real)
        # grad_residual goes with grad_input (fused here, or the dx pass below) when that is
        # wanted, else with the reduction's own reads
        dr_here = want_dr and (fused_dx or not want_dx)
        run(_bn_bwd_reduce_kernel, red["grid"],
            (dy, x, y, dx if fused_dx else None, dr if dr_here else None, centre, invstd,
             weight, bias, dw if want_dw else None, db if want_db else None, coef, part,
             tickets, c, plan["hw"], red["rows"], red["per_chunk"], red["chunks"],
             plan["inv_count"]),
            dict(_red_meta(plan), **common, WRITE_DW=want_dw, WRITE_DB=want_db,
                 WRITE_COEF=coef is not None, SINGLE=red["single"], DX=fused_dx,
                 WRITE_DR=dr_here), real)
        if not want_dx or fused_dx:
            return dx, dw, db, dr
    run(_bn_bwd_dx_kernel, plan["stream"]["grid"],
        (dy, x, y, centre, coef, invstd, weight, bias, dx if want_dx else None,
         dr if want_dr else None, c, plan["rows"], plan["cols"]),
        dict(_stream_meta(plan), **common, FROM_STATS=coef is None, WRITE_DX=want_dx,
             WRITE_DR=want_dr), real)
    return dx, dw, db, dr


# --------------------------------------------------------------------------- ops
# torch.library refuses autograd formulas on ops that mutate their inputs, so batch norm is two
# ops: ``triton_batch_norm_stats`` (mutates the running statistics; run on a detached input,
# it needs no gradient) and ``triton_batch_norm`` (functional, differentiable: its backward is
# the full batch-norm gradient, including the batch statistics' dependence on the input).
@define_op("triton_batch_norm_stats",
           "(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, "
           "float momentum, float eps) -> (Tensor, Tensor, Tensor)",
           mutates_args=("running_mean", "running_var"))
def _batch_norm_stats_op(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], training: bool, momentum: float,
                         eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (centre [2, C] = [shift, mean - shift], save_mean, save_invstd), float32; in
    training the running statistics are updated in place."""
    check_batch_norm(input, running_mean, running_var, None, None, training, momentum, eps)
    if not training and running_mean is None:
        raise ValueError("triton_batch_norm_stats: eval mode needs running_mean and "
                         "running_var")
    if training and input.numel() == 0:
        raise ValueError(f"triton_batch_norm_stats: no values per channel to normalise in "
                         f"input of shape {tuple(input.shape)}")
    real = is_real(input)
    plan = _plan_of(input, real)
    x = input if plan["dense"] else input.contiguous(memory_format=plan["fmt"])
    centre, save_mean, invstd, _ = _bn_statistics(x, plan, real, running_mean, running_var,
                                                  bool(training), momentum, eps, True)
    return centre, save_mean, invstd


@define_op("triton_batch_norm",
           "(Tensor input, Tensor? weight, Tensor? bias, Tensor centre, Tensor save_invstd, "
           "bool training, bool relu, Tensor? residual=None) -> Tensor")
def _batch_norm_op(input: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], centre: torch.Tensor, save_invstd: torch.Tensor,
                   training: bool, relu: bool,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalise (+ ``residual``) (+ReLU) with the statistics of ``triton_batch_norm_stats``;
    ``training`` only selects the backward formula."""
    if residual is not None:
        check_residual("triton_batch_norm", input, residual)
    real = is_real(input)
    plan = _plan_of(input, real)
    x = input if plan["dense"] else input.contiguous(memory_format=plan["fmt"])
    return _bn_apply(x, plan, real, weight, bias, centre, save_invstd, relu,
                     residual=_dense(residual, plan["fmt"]))


@define_op("triton_batch_norm_backward",
           "(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, Tensor? bias, "
           "Tensor centre, Tensor save_invstd, bool training, bool relu, bool[] output_mask) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
def _batch_norm_backward_op(grad_output: torch.Tensor, input: torch.Tensor,
                            output: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], centre: torch.Tensor,
                            save_invstd: torch.Tensor, training: bool, relu: bool,
                            output_mask: List[bool]
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_input, grad_weight, grad_bias, grad_residual); those not asked for are empty
    (``output_mask`` has 3 entries, or 4 with grad_residual). relu=True masks grad_output
    where the output is <= 0: the saved ``output`` when given, else the output recomputed
    from ``input`` with the forward's own expression (``bias`` is then needed; this saves two
    passes over the tensor). A forward with a residual must pass its ``output``."""
    return _bn_backward(grad_output, input, output, weight, bias, centre, save_invstd,
                        training, relu, output_mask)


def _save(ctx, x, y, weight, bias, centre, invstd, training, relu, residual, n_inputs):
    # The output is saved only for the ReLU mask (torch's own BN does not save it, so without
    # relu an in-place op on it, ResNet's `Y += X`, stays legal); RELU_MASK_FROM_OUTPUT=False
    # recomputes the mask from x instead, which a residual rules out (the mask is that of
    # bn(x) + residual: the saved output costs what a saved residual would).
    has_residual = residual is not None
    keep_y = relu and (RELU_MASK_FROM_OUTPUT or has_residual)
    ctx.save_for_backward(x, y if keep_y else None, weight, bias, centre, invstd)
    ctx.flags = (bool(training), bool(relu))
    ctx.has_residual = has_residual
    ctx.n_inputs = n_inputs


def _setup_context(ctx, inputs, output):
    x, weight, bias, centre, save_invstd, training, relu = inputs[:7]
    residual = inputs[7] if len(inputs) > 7 else None
    _save(ctx, x, output, weight, bias, centre, save_invstd, training, relu, residual,
          len(inputs))


def _backward(ctx, grad_y):
    """The gradient of triton_batch_norm and of the eager forward alike: both take (input,
    weight, bias) first and the residual last."""
    x, y, weight, bias, centre, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]) and weight is not None,
            bool(need[2]) and bias is not None]
    want_dr = ctx.has_residual and bool(need[-1])
    relu = ctx.flags[1]
    nones = (None,) * (ctx.n_inputs - 4)
    if grad_y is None or not (any(mask) or want_dr):
        return (None, None, None) + nones + (None,)
    dr = grad_y if want_dr and not relu else None  # d(bn(x) + r)/dr = 1: no pass at all
    dx = dw = db = None
    if any(mask) or (want_dr and dr is None):
        full = mask + [want_dr and relu]
        if is_real(grad_y):  # eager: the launchers; tracing: the op, so graphs show it
            dx, dw, db, dr_op = _bn_backward(grad_y, x, y, weight, bias, centre, invstd,
                                             *ctx.flags, full)
        else:
            dx, dw, db, dr_op = torch.ops.fastconv.triton_batch_norm_backward(
                grad_y, x, y, weight, bias, centre, invstd, *ctx.flags, full)
        if full[3]:
            dr = dr_op
    return (dx if mask[0] else None, dw if mask[1] else None,
            db if mask[2] else None) + nones + (dr,)


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)
declare_kernels({"triton_batch_norm_stats": [_bn_stats_kernel, _bn_eval_stats_kernel],
                 "triton_batch_norm": [_bn_apply_kernel],
                 "triton_batch_norm_backward": [_bn_bwd_reduce_kernel, _bn_bwd_dx_kernel]})


# --------------------------------------------------------------------------- eager path
def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
             need_stats, residual=None):
    """Eager forward: -> (y, centre, save_invstd, x made dense); the statistics only when
    ``need_stats`` (a backward follows) or training (they are computed anyway)."""
    plan = _plan_of(x, True)
    if not plan["dense"]:
        x = x.contiguous(memory_format=plan["fmt"])
    r = _dense(residual, plan["fmt"])
    if not training and not need_stats:  # inference: one launch
        return _bn_apply(x, plan, True, weight, bias, None, None, relu,
                         running=(running_mean, running_var), eps=eps,
                         residual=r), None, None, x
    y = alloc(x.shape, x.dtype, x.device, plan["fmt"])
    centre, _, invstd, applied = _bn_statistics(x, plan, True, running_mean, running_var,
                                                training, momentum, eps, False, y, weight,
                                                bias, relu, r)
    if not applied:
        _bn_apply(x, plan, True, weight, bias, centre, invstd, relu, y=y, residual=r)
    return y, centre, invstd, x


class _BatchNormFn(torch.autograd.Function):
    """The statistics and normalisation ops in one eager call, with triton_batch_norm's
    autograd formula (``_backward``), without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                relu, residual):
        y, centre, invstd, xd = _forward(x, weight, bias, running_mean, running_var, training,
                                         momentum, eps, relu, True, residual)
        _save(ctx, xd, y, weight, bias, centre, invstd, training, relu, residual, 10)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)


# --------------------------------------------------------------------------- backend entry points
def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
               residual=None):
    training, relu, momentum, eps = bool(training), bool(relu), float(momentum), float(eps)
    if eager(input):
        if grad_needed(input, weight, bias, residual):
            return _BatchNormFn.apply(input, weight, bias, running_mean, running_var, training,
                                      momentum, eps, relu, residual)
        return _forward(input, weight, bias, running_mean, running_var, training, momentum,
                        eps, relu, False, residual)[0]
    centre, _, save_invstd = torch.ops.fastconv.triton_batch_norm_stats(
        input.detach(), running_mean, running_var, training, momentum, eps)
    return torch.ops.fastconv.triton_batch_norm(input, weight, bias, centre, save_invstd,
                                                training, relu, residual)


def why_not_batch_norm(args) -> Optional[str]:
    x = args["input"]
    reason = common_why_not(x, "batch_norm")
    if reason:
        return reason
    if x.numel() == 0:
        return "triton batch_norm needs a non-empty input"
    if x.shape[1] > 65535:
        return f"triton batch_norm launches one program column per channel: {x.shape[1]} > 65535"
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = args.get(name)
        if t is not None and (t.dtype not in (torch.float16, torch.bfloat16, torch.float32)
                              or not t.is_contiguous()):
            return (f"triton batch_norm needs a contiguous float16/bfloat16/float32 {name}, "
                    f"got {t.dtype} with stride {t.stride()}")
    if not args["training"] and args.get("running_mean") is None:
        return "triton batch_norm in eval mode needs running statistics"
    return None
