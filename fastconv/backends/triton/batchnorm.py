"""Triton batch norm (optionally fused with the following ReLU), forward and backward, as three
custom ops (torch.library gives no autograd to ops that mutate inputs, hence the split):

* ``fastconv::triton_batch_norm_stats(input, running_mean!, running_var!, training, momentum,
  eps) -> (centre, save_mean, save_invstd)``: batch statistics (training) or running ones
  (eval); updates the running statistics in place. Called on a detached input.
* ``fastconv::triton_batch_norm(input, weight, bias, centre, save_invstd, training, relu)
  -> output``: normalise (+ReLU); functional, with ``register_autograd``.
* ``fastconv::triton_batch_norm_backward(...) -> (grad_input, grad_weight, grad_bias)``.

``batch_norm()`` below chains the first two: the backend entry point.

Passes over the (N, C, H, W) tensor, each reading or writing it once:

* training forward: stats (read x) -> tiny finalize -> normalise(+ReLU) (read x, write y);
* eval forward: tiny finalize -> normalise (read x, write y);
* backward: reduce sum(dy), sum(dy * (x - mean)) (read dy, x [, y]) -> tiny finalize ->
  dx (read dy, x [, y], write dx); in eval mode dx needs only dy (and y for the ReLU mask),
  and the reduction runs only when grad_weight/grad_bias are asked for.

Both layouts are a dense 2-D matrix to the kernels, so neither is copied: channels_last is
[N*H*W rows, C columns] (channel = column, 16-byte vectors along C), NCHW is [N*C rows, H*W
columns] (channel = row % C). The reductions split the rows into chunks, one program per
(chunk, channel block), and a finalize kernel merges the chunks in a fixed tree order, so
results are deterministic (no atomics).

Statistics are float32 whatever the input dtype. The mean and variance come from a per-lane
Welford recurrence on ``x - shift`` (shift = x[0, c, 0, 0], one sample of the channel) merged
with Chan's formula: values of a channel offset by 1e4 keep their full float32 precision, and
the normalisation itself computes ``((x - shift) - mean_shifted) * scale + bias`` so the large
offset cancels exactly before any rounding of small quantities. The running statistics are
updated inside the finalize kernel (unbiased variance, ``(1 - momentum) * r + momentum * s``).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .pool import (alloc, cols_block, common_why_not, define_op, device_tuning,
                   is_channels_last, launch, memory_format, needs_int64, next_pow2)

# Elements per program for the streaming passes, programs per SM for the reductions, and
# warps, by device kind; the H100 sweep (scripts/gpu_pool_bn_sweep.py) overrides them.
TUNING = {
    "cuda": {"tile": 2048, "reduce_tile": 2048, "max_channel_block": 64,
             "programs_per_sm": 4, "num_warps": 4, "reduce_warps": 4},
    "cpu": {"tile": 16384, "reduce_tile": 16384, "max_channel_block": 64,
            "programs_per_sm": 1, "num_warps": 4, "reduce_warps": 4},
}
_FINALIZE_BLOCK_C = 64
_FINALIZE_BLOCK_K = 32
# With relu=True the backward masks dy where the output is <= 0. True: read the saved output
# (exactly torch's mask). False: recompute the output's sign from x in registers, which saves
# two of the ten passes of a training step (forward 3, backward 7 -> 5); the masks differ only
# where the float32 output is positive but rounds to 0 in the storage dtype (|y| < 6e-8 in
# float16), where both choices are valid subgradients.
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
def _welford_step(cnt, mean, m2, v, ok):
    cnt = cnt + ok.to(tl.float32)
    d = v - mean
    mean = mean + tl.where(ok, d / tl.maximum(cnt, 1.0), 0.0)
    m2 = m2 + tl.where(ok, d * (v - mean), 0.0)
    return cnt, mean, m2


@triton.jit
def _bn_stats_kernel(x_ptr, part_ptr, C, HW, ROWS, ROWS_PER_CHUNK, NUM_CHUNKS,
                     CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per (chunk of rows, channel block): Welford summary of x - shift -> part[3, chunks, C]."""
    chunk = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    row0 = chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row0 + ROWS_PER_CHUNK, ROWS)
    cnt = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    mean = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    plane = NUM_CHUNKS * C
    if CHANNELS_LAST:
        # rows are pixels (n, h, w), columns channels
        c = tl.program_id(1) * BLOCK_S + s
        c_ok = c < C
        shift = tl.load(x_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        for r0 in range(row0, row_end, BLOCK_R):
            rows = r0 + r
            ok = (rows < row_end) & c_ok
            if USE_I64:
                rows = rows.to(tl.int64)
            v = tl.load(x_ptr + rows * C + c, mask=ok, other=0.0).to(tl.float32) - shift
            cnt, mean, m2 = _welford_step(cnt, mean, m2, v, ok)
        mean, m2, cnt = _welford_reduce(mean, m2, cnt, 0)
        out = part_ptr + chunk * C + tl.arange(0, BLOCK_S) + tl.program_id(1) * BLOCK_S
        c_ok1 = tl.arange(0, BLOCK_S) + tl.program_id(1) * BLOCK_S < C
        tl.store(out, mean, mask=c_ok1)
        tl.store(out + plane, m2, mask=c_ok1)
        tl.store(out + 2 * plane, cnt, mask=c_ok1)
    else:
        # one channel; rows are samples n, columns the pixels of its (n, c) plane
        c = tl.program_id(1)
        if USE_I64:
            c = c.to(tl.int64)
        shift = tl.load(x_ptr + c * HW).to(tl.float32)
        for n0 in range(row0, row_end, BLOCK_R):
            n = n0 + r
            n_ok = n < row_end
            if USE_I64:
                n = n.to(tl.int64)
            base = x_ptr + (n * C + c) * HW
            for hw0 in range(0, HW, BLOCK_S):
                hw = hw0 + s
                ok = n_ok & (hw < HW)
                v = tl.load(base + hw, mask=ok, other=0.0).to(tl.float32) - shift
                cnt, mean, m2 = _welford_step(cnt, mean, m2, v, ok)
        mean, m2, cnt = _welford_reduce(mean, m2, cnt, 1)
        mean, m2, cnt = _welford_reduce(mean, m2, cnt, 0)
        out = part_ptr + chunk * C + c
        tl.store(out, mean)
        tl.store(out + plane, m2)
        tl.store(out + 2 * plane, cnt)


@triton.jit
def _bn_finalize_kernel(part_ptr, x_ptr, rm_ptr, rv_ptr, centre_ptr, mean_ptr, invstd_ptr,
                        C, HW, NUM_CHUNKS, momentum, eps,
                        TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Per channel: merge the chunks (training) or read the running stats (eval); write
    centre = [shift, mean - shift], save_mean, save_invstd and the updated running stats."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        plane = NUM_CHUNKS * C
        k = tl.arange(0, BLOCK_K)[:, None]
        mean_s = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        cnt = tl.zeros([BLOCK_C], tl.float32)
        for k0 in range(0, NUM_CHUNKS, BLOCK_K):
            ok = (k0 + k < NUM_CHUNKS) & c_ok[None, :]
            off = (k0 + k) * C + c[None, :]
            pm = tl.load(part_ptr + off, mask=ok, other=0.0)
            pq = tl.load(part_ptr + plane + off, mask=ok, other=0.0)
            pn = tl.load(part_ptr + 2 * plane + off, mask=ok, other=0.0)
            bm, bq, bn = _welford_reduce(pm, pq, pn, 0)
            mean_s, m2, cnt = _welford_combine(mean_s, m2, cnt, bm, bq, bn)
        if CHANNELS_LAST:
            shift = tl.load(x_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        else:
            shift = tl.load(x_ptr + c.to(tl.int64) * HW, mask=c_ok, other=0.0).to(tl.float32)
        cnt = tl.where(c_ok, cnt, 2.0)  # keep lanes past C finite
        var = m2 / cnt
        mean = shift + mean_s
        invstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        if HAS_RUNNING:
            unbiased = m2 / (cnt - 1.0)
            rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * unbiased
            tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
            tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)
    else:
        mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
        invstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        shift = mean
        mean_s = tl.zeros([BLOCK_C], tl.float32)
    tl.store(centre_ptr + c, shift, mask=c_ok)
    tl.store(centre_ptr + C + c, mean_s, mask=c_ok)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)


@triton.jit
def _load_channel(ptr, ch, ok, other: tl.constexpr, PRESENT: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + ch, mask=ok, other=other).to(tl.float32)
    else:
        return tl.zeros_like(ch.to(tl.float32)) + other


@triton.jit
def _channel_of(rows, cols, C, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return cols
    else:
        return rows % C


@triton.jit
def _bn_affine(v, shift, mean_s, scale, bias):
    """The normalisation; the backward recomputes the ReLU mask with this same expression."""
    return ((v - shift) - mean_s) * scale + bias


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, centre_ptr, invstd_ptr, w_ptr, b_ptr, C, ROWS, COLS,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
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
    shift = tl.load(centre_ptr + ch, mask=ch_ok, other=0.0)
    mean_s = tl.load(centre_ptr + C + ch, mask=ch_ok, other=0.0)
    scale = tl.load(invstd_ptr + ch, mask=ch_ok, other=0.0)
    scale = scale * _load_channel(w_ptr, ch, ch_ok, 1.0, HAS_W)
    bias = _load_channel(b_ptr, ch, ch_ok, 0.0, HAS_B)
    if USE_I64:
        rows = rows.to(tl.int64)
    off = rows * COLS + cols
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = _bn_affine(v, shift, mean_s, scale, bias)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad(dy, y):
    # torch's ReLU backward: zero where the output is <= 0 (NaN outputs pass). Written as a
    # positive test: `where(y <= 0, 0, dy)` crashes Triton 3.8's LLVM lowering for float32
    # [32, 64] tiles (sm_90).
    return tl.where((y > 0) | (y != y), dy, 0.0)


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, y_ptr, centre_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                          C, HW, ROWS, ROWS_PER_CHUNK, NUM_CHUNKS, RELU: tl.constexpr,
                          RELU_FROM_X: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per (chunk, channel block): sum(dy') and sum(dy' * (x - mean)) -> part[2, chunks, C],
    dy' being dy masked by the ReLU (from the saved output, or with RELU_FROM_X recomputed
    from x); x - mean is (x - shift) - (mean - shift), as in the forward."""
    chunk = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    row0 = chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row0 + ROWS_PER_CHUNK, ROWS)
    sdy = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    sdyx = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    plane = NUM_CHUNKS * C
    if CHANNELS_LAST:
        c = tl.program_id(1) * BLOCK_S + s
        c_ok = c < C
    else:
        c = tl.program_id(1)
        c_ok = c < C
        if USE_I64:
            c = c.to(tl.int64)
    shift = tl.load(centre_ptr + c, mask=c_ok, other=0.0)
    mean_s = tl.load(centre_ptr + C + c, mask=c_ok, other=0.0)
    if RELU_FROM_X:
        scale = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
        scale = scale * _load_channel(w_ptr, c, c_ok, 1.0, HAS_W)
        bias = _load_channel(b_ptr, c, c_ok, 0.0, HAS_B)
    if CHANNELS_LAST:
        for r0 in range(row0, row_end, BLOCK_R):
            rows = r0 + r
            ok = (rows < row_end) & c_ok
            if USE_I64:
                rows = rows.to(tl.int64)
            off = rows * C + c
            dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
            if RELU:
                if RELU_FROM_X:
                    dy = _relu_grad(dy, _bn_affine(x, shift, mean_s, scale, bias))
                else:
                    dy = _relu_grad(dy, tl.load(y_ptr + off, mask=ok, other=0.0))
            sdy += dy
            sdyx += dy * tl.where(ok, (x - shift) - mean_s, 0.0)
        c1 = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        tl.store(part_ptr + chunk * C + c1, tl.sum(sdy, 0), mask=c1 < C)
        tl.store(part_ptr + plane + chunk * C + c1, tl.sum(sdyx, 0), mask=c1 < C)
    else:
        for n0 in range(row0, row_end, BLOCK_R):
            n = n0 + r
            n_ok = n < row_end
            if USE_I64:
                n = n.to(tl.int64)
            base = (n * C + c) * HW
            for hw0 in range(0, HW, BLOCK_S):
                hw = hw0 + s
                ok = n_ok & (hw < HW)
                off = base + hw
                dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
                if RELU:
                    if RELU_FROM_X:
                        dy = _relu_grad(dy, _bn_affine(x, shift, mean_s, scale, bias))
                    else:
                        dy = _relu_grad(dy, tl.load(y_ptr + off, mask=ok, other=0.0))
                sdy += dy
                sdyx += dy * tl.where(ok, (x - shift) - mean_s, 0.0)
        tl.store(part_ptr + chunk * C + c, tl.sum(tl.sum(sdy, 1), 0))
        tl.store(part_ptr + plane + chunk * C + c, tl.sum(tl.sum(sdyx, 1), 0))


@triton.jit
def _bn_bwd_finalize_kernel(part_ptr, w_ptr, invstd_ptr, dw_ptr, db_ptr, coef_ptr,
                            C, NUM_CHUNKS, inv_count,
                            TRAINING: tl.constexpr, HAS_W: tl.constexpr,
                            REDUCED: tl.constexpr, WRITE_DW: tl.constexpr,
                            WRITE_DB: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """Per channel: grad_weight, grad_bias, and coef = [a, k2, k3] for
    dx = a * dy' + k2 * (x - mean) + k3 (training: the batch statistics' own gradient)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sdy = tl.zeros([BLOCK_C], tl.float32)
    sdyx = tl.zeros([BLOCK_C], tl.float32)
    if REDUCED:
        plane = NUM_CHUNKS * C
        k = tl.arange(0, BLOCK_K)[:, None]
        for k0 in range(0, NUM_CHUNKS, BLOCK_K):
            ok = (k0 + k < NUM_CHUNKS) & c_ok[None, :]
            off = (k0 + k) * C + c[None, :]
            sdy += tl.sum(tl.load(part_ptr + off, mask=ok, other=0.0), 0)
            sdyx += tl.sum(tl.load(part_ptr + plane + off, mask=ok, other=0.0), 0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    a = invstd * _load_channel(w_ptr, c, c_ok, 1.0, HAS_W)
    if WRITE_DW:
        tl.store(dw_ptr + c, (sdyx * invstd).to(dw_ptr.dtype.element_ty), mask=c_ok)
    if WRITE_DB:
        tl.store(db_ptr + c, sdy.to(db_ptr.dtype.element_ty), mask=c_ok)
    if TRAINING:
        k2 = -a * invstd * invstd * sdyx * inv_count
        k3 = -a * sdy * inv_count
    else:
        k2 = tl.zeros([BLOCK_C], tl.float32)
        k3 = tl.zeros([BLOCK_C], tl.float32)
    tl.store(coef_ptr + c, a, mask=c_ok)
    tl.store(coef_ptr + C + c, k2, mask=c_ok)
    tl.store(coef_ptr + 2 * C + c, k3, mask=c_ok)


@triton.jit
def _bn_bwd_dx_kernel(dy_ptr, x_ptr, y_ptr, centre_ptr, coef_ptr, b_ptr, dx_ptr, C, ROWS, COLS,
                      RELU: tl.constexpr, RELU_FROM_X: tl.constexpr, HAS_B: tl.constexpr,
                      TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      USE_I64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
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
    a = tl.load(coef_ptr + ch, mask=ch_ok, other=0.0)  # = invstd * weight, the forward scale
    if USE_I64:
        rows = rows.to(tl.int64)
    off = rows * COLS + cols
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if TRAINING or RELU_FROM_X:
        shift = tl.load(centre_ptr + ch, mask=ch_ok, other=0.0)
        mean_s = tl.load(centre_ptr + C + ch, mask=ch_ok, other=0.0)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        if RELU_FROM_X:
            bias = _load_channel(b_ptr, ch, ch_ok, 0.0, HAS_B)
            dy = _relu_grad(dy, _bn_affine(x, shift, mean_s, a, bias))
        else:
            dy = _relu_grad(dy, tl.load(y_ptr + off, mask=mask, other=0.0))
    dx = a * dy
    if TRAINING:
        k2 = tl.load(coef_ptr + C + ch, mask=ch_ok, other=0.0)
        k3 = tl.load(coef_ptr + 2 * C + ch, mask=ch_ok, other=0.0)
        dx += k2 * ((x - shift) - mean_s) + k3
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch geometry
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if device.type == "cuda" else 1  # an H100, for ahead-of-time planning


def _matrix(x: torch.Tensor, channels_last: bool):
    """(ROWS, COLS) of the dense 2-D view the streaming kernels use."""
    n, c, h, w = x.shape
    return (n * h * w, c) if channels_last else (n * c, h * w)


def _elements(device: torch.device, tile: int, element_size: int) -> int:
    # GPU tiles are tuned for 2-byte dtypes; float32 halves them (same bytes, registers)
    return max(64, tile * 2 // element_size) if device.type == "cuda" else tile


def _stream_tile(rows: int, cols: int, channels_last: bool, device: torch.device,
                 element_size: int = 2):
    cfg = device_tuning(device, TUNING)
    tile = _elements(device, cfg["tile"], element_size)
    if channels_last:
        bs = cols_block(cols, cfg["max_channel_block"], 16)
    else:  # rows of H*W pixels: whole rows when short, else >= 64-element segments
        bs = cols_block(cols, tile, 64)
    br = max(1, min(tile // bs, next_pow2(rows)))
    return (triton.cdiv(rows, br), triton.cdiv(cols, bs)), br, bs, cfg["num_warps"]


def _reduce_plan(x: torch.Tensor, channels_last: bool, device: Optional[torch.device] = None):
    """(grid, rows, rows per chunk, chunks, BLOCK_R, BLOCK_S, warps) for the reductions."""
    n, c, h, w = x.shape
    device = device or x.device
    cfg = device_tuning(device, TUNING)
    target = cfg["programs_per_sm"] * _num_sms(device)
    tile = _elements(device, cfg["reduce_tile"], x.element_size())
    if channels_last:
        rows = n * h * w
        bs = cols_block(c, cfg["max_channel_block"], 16)
        cblocks = triton.cdiv(c, bs)
        br = max(1, min(tile // bs, next_pow2(rows)))
    else:
        rows = n
        cblocks = c
        bs = cols_block(h * w, tile, 64)
        br = max(1, min(tile // bs, next_pow2(rows)))
    chunks = max(1, min(triton.cdiv(target, cblocks), triton.cdiv(rows, br)))
    per_chunk = triton.cdiv(rows, chunks)
    if channels_last:
        per_chunk = triton.cdiv(per_chunk, br) * br  # whole tiles per chunk
    else:
        br = max(1, min(br, next_pow2(per_chunk)))
    chunks = triton.cdiv(rows, per_chunk)
    return (chunks, cblocks), rows, per_chunk, chunks, br, bs, cfg["reduce_warps"]


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
    n, c, h, w = input.shape
    cl = is_channels_last(input)
    x = input.contiguous(memory_format=memory_format(cl))
    dev = x.device
    centre = alloc((2, c), torch.float32, dev)
    save_mean = alloc((c,), torch.float32, dev)
    save_invstd = alloc((c,), torch.float32, dev)
    has_running = running_mean is not None
    if not training and not has_running:
        raise ValueError("triton_batch_norm_stats: eval mode needs running_mean and "
                         "running_var")
    if training and x.numel() == 0:
        raise ValueError(f"triton_batch_norm_stats: no values per channel to normalise in "
                         f"input of shape {tuple(x.shape)}")
    part, chunks = None, 1
    if training:
        grid, rows, per_chunk, chunks, br, bs, warps = _reduce_plan(x, cl)
        part = alloc((3, chunks, c), torch.float32, dev)
        launch(_bn_stats_kernel, grid, x, part, c, h * w, rows, per_chunk, chunks,
               CHANNELS_LAST=cl, USE_I64=needs_int64(x), BLOCK_R=br, BLOCK_S=bs,
               num_warps=warps)
    launch(_bn_finalize_kernel, (triton.cdiv(c, _FINALIZE_BLOCK_C),), part, x, running_mean,
           running_var, centre, save_mean, save_invstd, c, h * w, chunks, float(momentum),
           float(eps), TRAINING=bool(training), HAS_RUNNING=has_running, CHANNELS_LAST=cl,
           BLOCK_K=_FINALIZE_BLOCK_K, BLOCK_C=_FINALIZE_BLOCK_C, num_warps=4)
    return centre, save_mean, save_invstd


@define_op("triton_batch_norm",
           "(Tensor input, Tensor? weight, Tensor? bias, Tensor centre, Tensor save_invstd, "
           "bool training, bool relu) -> Tensor")
def _batch_norm_op(input: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], centre: torch.Tensor, save_invstd: torch.Tensor,
                   training: bool, relu: bool) -> torch.Tensor:
    """Normalise (+ReLU) with the statistics of ``triton_batch_norm_stats``; ``training``
    only selects the backward formula."""
    cl = is_channels_last(input)
    x = input.contiguous(memory_format=memory_format(cl))
    y = alloc(x.shape, x.dtype, x.device, memory_format(cl))
    if y.numel() == 0:
        return y
    rows, cols = _matrix(x, cl)
    grid, br, bs, warps = _stream_tile(rows, cols, cl, x.device, x.element_size())
    launch(_bn_apply_kernel, grid, x, y, centre, save_invstd, weight, bias, x.shape[1], rows,
           cols, HAS_W=weight is not None, HAS_B=bias is not None, RELU=bool(relu),
           CHANNELS_LAST=cl, USE_I64=needs_int64(x), BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return y


@define_op("triton_batch_norm_backward",
           "(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, Tensor? bias, "
           "Tensor centre, Tensor save_invstd, bool training, bool relu, bool[] output_mask) "
           "-> (Tensor, Tensor, Tensor)")
def _batch_norm_backward_op(grad_output: torch.Tensor, input: torch.Tensor,
                            output: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], centre: torch.Tensor,
                            save_invstd: torch.Tensor, training: bool, relu: bool,
                            output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_input, grad_weight, grad_bias); those not asked for are empty. relu=True
    masks grad_output where the output is <= 0: the saved ``output`` when given, else the
    output recomputed from ``input`` with the forward's own expression (``bias`` is then
    needed; this saves two passes over the tensor)."""
    n, c, h, w = input.shape
    cl = is_channels_last(input)
    fmt = memory_format(cl)
    x = input.contiguous(memory_format=fmt)
    dy = grad_output.contiguous(memory_format=fmt)
    dev = x.device
    y = output.contiguous(memory_format=fmt) if relu and output is not None else None
    relu_from_x = bool(relu) and y is None
    want_dx, want_dw, want_db = (bool(m) for m in output_mask)
    want_dw = want_dw and weight is not None
    param_dtype = weight.dtype if weight is not None else torch.float32
    dx = alloc(x.shape if want_dx else (0,), x.dtype, dev, fmt if want_dx else
               torch.contiguous_format)
    dw = alloc((c if want_dw else 0,), param_dtype, dev)
    db = alloc((c if want_db else 0,), param_dtype, dev)
    if not (want_dx or want_dw or want_db):
        return dx, dw, db
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_()
    use_i64 = needs_int64(x)
    reduce = want_dw or want_db or (want_dx and training)
    coef = alloc((3, c), torch.float32, dev)
    part, chunks = None, 1
    if reduce:
        grid, rows, per_chunk, chunks, br, bs, warps = _reduce_plan(x, cl)
        part = alloc((2, chunks, c), torch.float32, dev)
        launch(_bn_bwd_reduce_kernel, grid, dy, x, y, centre, save_invstd, weight, bias, part,
               c, h * w, rows, per_chunk, chunks, RELU=bool(relu), RELU_FROM_X=relu_from_x,
               HAS_W=weight is not None, HAS_B=bias is not None, CHANNELS_LAST=cl,
               USE_I64=use_i64, BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    launch(_bn_bwd_finalize_kernel, (triton.cdiv(c, _FINALIZE_BLOCK_C),), part, weight,
           save_invstd, dw if want_dw else None, db if want_db else None, coef, c, chunks,
           1.0 / max(1, n * h * w), TRAINING=bool(training), HAS_W=weight is not None,
           REDUCED=reduce, WRITE_DW=want_dw, WRITE_DB=want_db, BLOCK_K=_FINALIZE_BLOCK_K,
           BLOCK_C=_FINALIZE_BLOCK_C, num_warps=4)
    if want_dx:
        rows, cols = _matrix(x, cl)
        grid, br, bs, warps = _stream_tile(rows, cols, cl, dev, x.element_size())
        launch(_bn_bwd_dx_kernel, grid, dy, x, y, centre, coef, bias, dx, c, rows, cols,
               RELU=bool(relu), RELU_FROM_X=relu_from_x, HAS_B=bias is not None,
               TRAINING=bool(training), CHANNELS_LAST=cl, USE_I64=use_i64, BLOCK_R=br,
               BLOCK_S=bs, num_warps=warps)
    return dx, dw, db


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, centre, save_invstd, training, relu = inputs
    # The output is saved only for the ReLU mask (torch's own BN does not save it, so without
    # relu an in-place op on it, ResNet's `Y += X`, stays legal); RELU_MASK_FROM_OUTPUT=False
    # recomputes the mask from x instead.
    keep_y = relu and RELU_MASK_FROM_OUTPUT
    ctx.save_for_backward(x, output if keep_y else None, weight, bias, centre, save_invstd)
    ctx.flags = (bool(training), bool(relu), weight is not None, bias is not None,
                 None if bias is None else bias.dtype)


def _batch_norm_backward(ctx, grad_y):
    x, y, weight, bias, centre, save_invstd = ctx.saved_tensors
    training, relu, has_w, has_b, bias_dtype = ctx.flags
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]) and has_w, bool(need[2]) and has_b]
    if grad_y is None or not any(mask):
        return (None,) * 7
    dx, dw, db = torch.ops.fastconv.triton_batch_norm_backward(
        grad_y, x, y, weight, bias, centre, save_invstd, training, relu, mask)
    if mask[2] and db.dtype != bias_dtype:
        db = db.to(bias_dtype)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
            None, None, None, None)


_batch_norm_op.register_autograd(_batch_norm_backward, setup_context=_batch_norm_setup)


# --------------------------------------------------------------------------- backend entry points
def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    centre, _, save_invstd = torch.ops.fastconv.triton_batch_norm_stats(
        input.detach(), running_mean, running_var, bool(training), float(momentum), float(eps))
    return torch.ops.fastconv.triton_batch_norm(input, weight, bias, centre, save_invstd,
                                                bool(training), bool(relu))


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


# --------------------------------------------------------------------------- ahead of time
def aot_specs():
    """The kernels of a bf16 (and fp32) training step, channels_last and NCHW, configured as
    the launchers above configure them for ResNet-18's first stage (64 x 56 x 56, batch 128)."""
    from .aot import KernelSpec

    specs = []
    cfg = TUNING["cuda"]
    ints = lambda *names: {a: "i32" for a in names}  # noqa: E731
    for ty in ("bf16", "fp32"):
        for cl in (True, False):
            layout = "NHWC" if cl else "NCHW"
            main = ty == "bf16"
            c, hw = 64, 56 * 56
            rows, cols = (128 * hw, c) if cl else (128 * c, hw)
            esize = 2 if ty == "bf16" else 4
            _, sbr, sbs, swarps = _stream_tile(rows, cols, cl, torch.device("cuda"), esize)
            x = torch.empty((128, c, 56, 56), device="meta",
                            dtype=torch.bfloat16 if esize == 2 else torch.float32)
            cuda_plan = _reduce_plan(x, cl, torch.device("cuda"))
            rbr, rbs = cuda_plan[4], cuda_plan[5]
            specs.append(KernelSpec(
                name=f"bn_stats {ty} {layout}", kernel=_bn_stats_kernel,
                signature={"x_ptr": f"*{ty}", "part_ptr": "*fp32",
                           **ints("C", "HW", "ROWS", "ROWS_PER_CHUNK", "NUM_CHUNKS")},
                constexprs=dict(CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=rbr, BLOCK_S=rbs),
                num_warps=cfg["reduce_warps"], num_stages=1, main=main))
            specs.append(KernelSpec(
                name=f"bn_finalize training {ty} {layout}", kernel=_bn_finalize_kernel,
                signature={"part_ptr": "*fp32", "x_ptr": f"*{ty}", "rm_ptr": "*fp32",
                           "rv_ptr": "*fp32", "centre_ptr": "*fp32", "mean_ptr": "*fp32",
                           "invstd_ptr": "*fp32", **ints("C", "HW", "NUM_CHUNKS"),
                           "momentum": "fp32", "eps": "fp32"},
                constexprs=dict(TRAINING=True, HAS_RUNNING=True, CHANNELS_LAST=cl,
                                BLOCK_K=_FINALIZE_BLOCK_K, BLOCK_C=_FINALIZE_BLOCK_C),
                num_warps=4, num_stages=1, main=main and cl))
            for relu in (True, False):
                specs.append(KernelSpec(
                    name=f"bn_apply relu={relu} {ty} {layout}", kernel=_bn_apply_kernel,
                    signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "centre_ptr": "*fp32",
                               "invstd_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                               **ints("C", "ROWS", "COLS")},
                    constexprs=dict(HAS_W=True, HAS_B=True, RELU=relu, CHANNELS_LAST=cl,
                                    USE_I64=False, BLOCK_R=sbr, BLOCK_S=sbs),
                    num_warps=swarps, num_stages=1, main=main and relu and cl))
            for relu, from_x in ((True, False), (True, True), (False, False)):
                tag = f"relu={relu}{' mask-from-x' if from_x else ''} {ty} {layout}"
                specs.append(KernelSpec(
                    name=f"bn_bwd_reduce {tag}", kernel=_bn_bwd_reduce_kernel,
                    signature={"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "y_ptr": f"*{ty}",
                               "centre_ptr": "*fp32", "invstd_ptr": "*fp32", "w_ptr": "*fp32",
                               "b_ptr": "*fp32", "part_ptr": "*fp32",
                               **ints("C", "HW", "ROWS", "ROWS_PER_CHUNK", "NUM_CHUNKS")},
                    constexprs=dict(RELU=relu, RELU_FROM_X=from_x, HAS_W=True, HAS_B=True,
                                    CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=rbr,
                                    BLOCK_S=rbs),
                    num_warps=cfg["reduce_warps"], num_stages=1,
                    main=main and relu and not from_x))
                specs.append(KernelSpec(
                    name=f"bn_bwd_dx {tag}", kernel=_bn_bwd_dx_kernel,
                    signature={"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "y_ptr": f"*{ty}",
                               "centre_ptr": "*fp32", "coef_ptr": "*fp32", "b_ptr": "*fp32",
                               "dx_ptr": f"*{ty}", **ints("C", "ROWS", "COLS")},
                    constexprs=dict(RELU=relu, RELU_FROM_X=from_x, HAS_B=True, TRAINING=True,
                                    CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=sbr,
                                    BLOCK_S=sbs),
                    num_warps=swarps, num_stages=1, main=main and relu and not from_x and cl))
            specs.append(KernelSpec(
                name=f"bn_bwd_finalize {ty} {layout}", kernel=_bn_bwd_finalize_kernel,
                signature={"part_ptr": "*fp32", "w_ptr": "*fp32", "invstd_ptr": "*fp32",
                           "dw_ptr": "*fp32", "db_ptr": "*fp32", "coef_ptr": "*fp32",
                           **ints("C", "NUM_CHUNKS"), "inv_count": "fp32"},
                constexprs=dict(TRAINING=True, HAS_W=True, REDUCED=True, WRITE_DW=True,
                                WRITE_DB=True, BLOCK_K=_FINALIZE_BLOCK_K,
                                BLOCK_C=_FINALIZE_BLOCK_C),
                num_warps=4, num_stages=1, main=main and cl))
    return specs
