"""Triton fused Conv2d + bias + ReLU: implicit-GEMM forward, grad_input and grad_weight(+bias).

GEMM views (per group ``g``; ``C``/``K`` are channels per group):

* forward     Y[m=(n,p,q), k]  = sum_{(r,s,c)} X[n, c, p*sh-ph+r*dh, q*sw-pw+s*dw] * W[k, c, r, s]
* grad_input  dX[m=(n,h,w), c] = sum_{(r,s,k)} G[n, k, (h+ph-r*dh)/sh, (w+pw-s*dw)/sw] * W[k, c, r, s]
* grad_weight dW[k, j=(r,s,c)] = sum_{m=(n,p,q)} G[n, k, p, q] * X[n, c, p*sh-ph+r*dh, q*sw-pw+s*dw]

with ``G = grad_output * (output > 0)`` when ``relu``.

Nothing is copied into an im2col buffer: every kernel reads activations through their four
strides, so NCHW, channels_last and sliced inputs take the same code (channels_last makes the
reduction axis contiguous, which is the fast case). The weight, being small, is made
channels_last (``(K, R, S, C)`` in memory) once per call so the channel axis is contiguous too.

Reduction loops are a single flat loop over (tap, channel block) steps so that Triton's software
pipeliner sees one loop (a nested ``for r / for s / for c`` loop pipelines only its innermost
level, which for VGG's C=64 layers would be one iteration). Per-row base offsets are computed
once per tile; each step adds a scalar tap offset. Two reduction modes:

* ``FLAT=False`` (taps): a step is one (r, s) tap and a block of channels; rows are masked once
  per step. 1x1 convolutions are the special case R=S=1 with no padding: a plain GEMM.
* ``FLAT=True``: the reduction index runs over (r, s, c) jointly. Used when C per group is
  small (C=1 first layers: AlexNet's 11x11 conv reduces over only 121 values, which a
  channel-block loop would pad to 121*16).

Backward (what the first H100 run taught: sm_90 SASS of the old kernels, which masked G inside
the GEMMs, showed the ReLU mask forcing the masked operand through registers: unvectorised 2-byte
loads, no cp.async pipelining, wgmma waited on every k-step; grad_weight's loop also divided pixel
indices by P and Q and reduced grad_bias across warps on every step: 731 SASS instructions per
128x128x64 step against the forward's 200, and ~1/4 of the forward's TFLOP/s):

1. ``_relu_grad_kernel``: one pass over grad_output writes the masked G channels_last and the
   per-program column sums that become grad_bias. Both GEMMs then read plain G from memory.
2. grad_input of stride-1 convs *is* the forward kernel: a conv of G with the mirrored weight
   (``FLIP``), padding ``dh*(R-1) - ph``, the weight's two channel strides swapped. Same tiling,
   same configurations, same pipelined loop. Strided convs split the input pixels into
   stride_h*stride_w phases (``h mod stride``), one launch each, looping over exactly that
   phase's taps: no masked-out MMA work.
3. grad_weight reduces over N*P*Q, which is long (up to 6.4M for VGG's first layer at batch 128):
   it is split over ``grid[2]`` into float32 partial sums (a cost model picks the split that fills
   the SMs in whole waves), then ``_sum_slices_kernel`` adds the slices in a fixed order
   (deterministic, no atomics) and writes the weight's dtype and layout. The pixel indices of a
   slice are divided out once and then advanced with carries.
"""
import math
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

from ...checks import check_conv2d_relu
from ...shapes import conv_memory_format, conv_output_size, suggest_memory_format
from . import autotune as _tune
from . import utils
from .utils import (INT32_LIMIT, PlanCache, alloc, cdiv, clamped_pow2, declare_kernels,
                    define_op, eager, eager_autograd, grad_needed, is_real, needs_index64,
                    num_sms, run)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    # DOT: 0 = native 16-bit inputs, 1 = fp32 via TF32, 2 = fp32 exact ("ieee")
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    elif DOT == 2:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# Pure sizes and offsets are not specialised (Triton would otherwise compile a variant per
# value class: ==1, divisible by 16, other), so one build serves every layer with the same kernel
# shape; strides (alignment for vector loads), channel counts (C == 1) and conv stride stay.
_FWD_NOSPEC = ["N", "H", "W", "P", "Q", "pad_h", "pad_w"]
_DGRAD_NOSPEC = ["N", "H", "W", "P", "Q", "h_first", "w_first", "HA", "WA", "r_first", "s_first",
                 "NR", "NS", "r_step", "s_step", "p_base", "q_base", "dp", "dq"]
_WGRAD_NOSPEC = ["N", "H", "W", "P", "Q", "pad_h", "pad_w", "M_PER_SPLIT"]


@triton.jit(do_not_specialize=_FWD_NOSPEC)
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, K, P, Q,
    sxn, sxc, sxh, sxw,
    swg, swk, swc, swr, sws,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    FLAT: tl.constexpr, PADDED: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr, DOT: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Also grad_input of stride-1 convs: x = masked grad_output, FLIP reads the weight taps
    # mirrored and the caller swaps the weight's channel strides (swk <-> swc).
    if INDEX64:
        sxn = tl.cast(sxn, tl.int64)
        sxc = tl.cast(sxc, tl.int64)
        sxh = tl.cast(sxh, tl.int64)
        sxw = tl.cast(sxw, tl.int64)
        syn = tl.cast(syn, tl.int64)
        syc = tl.cast(syc, tl.int64)
        syh = tl.cast(syh, tl.int64)
        syw = tl.cast(syw, tl.int64)
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    # output-channel tiles vary fastest: neighbouring programs share their input rows in L2
    num_n = tl.cdiv(K, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * P * Q
    q = offs_m % Q
    t = offs_m // Q
    p = t % P
    nb = t // P
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_row = x_ptr + grp * C * sxc + nb * sxn + h0 * sxh + w0 * sxw

    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K
    w_col = w_ptr + grp * swg + offs_n * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT:
        RSC = R * S * C
        for kk in range(0, tl.maximum(tl.cdiv(RSC, BLOCK_K), 1)):  # >= 1 step: see below
            j = kk * BLOCK_K + offs_k
            j_ok = j < RSC
            c = j % C
            rs = j // C
            r = rs // S
            s = rs % S
            a_mask = m_ok[:, None] & j_ok[None, :]
            if PADDED:
                hh = h0[:, None] + (r * dil_h)[None, :]
                ww = w0[:, None] + (s * dil_w)[None, :]
                a_mask = a_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            a_off = r * dil_h * sxh + s * dil_w * sxw + c * sxc
            a = tl.load(x_row[:, None] + a_off[None, :], mask=a_mask, other=0.0)
            if FLIP:
                w_off = (R - 1 - r) * swr + (S - 1 - s) * sws + c * swc
            else:
                w_off = r * swr + s * sws + c * swc
            b = tl.load(w_col[None, :] + w_off[:, None], mask=j_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = _mma(a, b, acc, DOT)
    else:
        if PADDED and R * S <= 31:
            # which taps of each row fall inside the image, as bits (computed once per tile): a
            # step then tests one bit instead of four bounds (~10% of the loop's instructions)
            tap_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for tap in tl.static_range(R * S):
                hh = h0 + (tap // S) * dil_h
                ww = w0 + (tap % S) * dil_w
                inside = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                tap_bits = tap_bits | (inside.to(tl.int32) << tap)
        num_cb = tl.cdiv(C, BLOCK_K)
        # At least one step, visibly to the compiler (the host never launches C == 0, and a
        # step with nothing in range only adds zeros): with a possible zero-trip path around
        # the loop, whose zeroing of the accumulator joins the loop's exit, ptxas serialises
        # every wgmma (seen with Triton 3.6 on 128x256 and fp32 128x128x32 tiles; C7515).
        for it in range(0, tl.maximum(R * S * num_cb, 1)):
            cb = it % num_cb
            rs = it // num_cb
            r = rs // S
            s = rs % S
            c = cb * BLOCK_K + offs_k
            c_ok = c < C
            row_ok = m_ok
            if PADDED:
                if R * S <= 31:
                    row_ok = ((tap_bits >> rs) & 1) != 0
                else:
                    hh = h0 + r * dil_h
                    ww = w0 + s * dil_w
                    row_ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            a = tl.load(x_row[:, None] + (r * dil_h * sxh + s * dil_w * sxw) + (c * sxc)[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            if FLIP:
                w_tap = (R - 1 - r) * swr + (S - 1 - s) * sws
            else:
                w_tap = r * swr + s * sws
            b = tl.load(w_col[None, :] + w_tap + (c * swc)[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT)

    if HAS_BIAS:
        bias = tl.load(b_ptr + grp * K + offs_n, mask=n_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as torch.relu does
    y_row = y_ptr + grp * K * syc + nb * syn + p * syh + q * syw
    tl.store(y_row[:, None] + (offs_n * syc)[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Kept beside _conv_fwd_kernel although the tile prologue is alike: the pixel decomposition
# (phases) and tap walk differ, and the AOT test holds each main loop to its SASS length.
@triton.jit(do_not_specialize=_DGRAD_NOSPEC)
def _conv_dgrad_kernel(
    g_ptr, w_ptr, dx_ptr,
    N, C, H, W, K, P, Q,
    sgn, sgk, sgp, sgq,
    swk, swc, swr, sws,
    sdn, sdc, sdh, sdw,
    h_first, w_first, HA, WA,
    r_first, s_first, NR, NS, r_step, s_step,
    p_base, q_base, dp, dq,
    stride_h, stride_w,
    DOT: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_input of strided convs (stride 1 runs the forward kernel), g already ReLU-masked.
    # One phase of the transposed conv: input pixels h = h_first + th*stride_h (same for w),
    # whose valid taps are r = r_first + jr*r_step (jr < NR), reading output row p = th+p_base-jr*dp.
    if INDEX64:
        sgn = tl.cast(sgn, tl.int64)
        sgk = tl.cast(sgk, tl.int64)
        sgp = tl.cast(sgp, tl.int64)
        sgq = tl.cast(sgq, tl.int64)
        sdn = tl.cast(sdn, tl.int64)
        sdc = tl.cast(sdc, tl.int64)
        sdh = tl.cast(sdh, tl.int64)
        sdw = tl.cast(sdw, tl.int64)
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    num_n = tl.cdiv(C, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * HA * WA
    tw = offs_m % WA
    t = offs_m // WA
    th = t % HA
    nb = t // HA
    p0 = th + p_base
    q0 = tw + q_base
    g_row = g_ptr + grp * K * sgk + nb * sgn + p0 * sgp + q0 * sgq

    offs_k = tl.arange(0, BLOCK_K)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C
    w_col = w_ptr + grp * K * swk + offs_c * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    for it in range(0, NR * NS * num_kb):
        kb = it % num_kb
        tap = it // num_kb
        jr = tap // NS
        js = tap % NS
        p = p0 - jr * dp
        q = q0 - js * dq
        row_ok = m_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        g = tl.load(g_row[:, None] + (-(jr * dp) * sgp - (js * dq) * sgq) + (k * sgk)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r = r_first + jr * r_step
        s = s_first + js * s_step
        wt = tl.load(w_col[None, :] + (r * swr + s * sws) + (k * swk)[:, None],
                     mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(g, wt, acc, DOT)

    h = h_first + th * stride_h
    w = w_first + tw * stride_w
    dx_row = dx_ptr + grp * C * sdc + nb * sdn + h * sdh + w * sdw
    tl.store(dx_row[:, None] + (offs_c * sdc)[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=_WGRAD_NOSPEC)
def _conv_wgrad_kernel(
    g_ptr, x_ptr, part_ptr,
    N, C, H, W, K, P, Q,
    sgn, sgk, sgp, sgq,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M_PER_SPLIT,
    R: tl.constexpr, S: tl.constexpr,
    FLAT: tl.constexpr, PADDED: tl.constexpr, G_ROWS: tl.constexpr, X_ROWS: tl.constexpr,
    DOT: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dW[k, j=(r,s,c)] = sum_m G[m, k] X[m, j]: output channels x columns, reduced over the
    # pixels m of one split. part_ptr: float32 partials [SPLIT, G, K, R*S*C], j = (r*S + s)*C + c.
    # G is already ReLU-masked (and channels_last in the fast path): both operands go straight
    # from global to shared memory, like the forward's. G_ROWS: G's pixels are rows of one
    # stride (sgn = P*Q*sgq, sgp = Q*sgq; the masked G always is), so its tile pointer just
    # advances by BLOCK_K rows per step. X_ROWS (taps mode): the same for X, whose pixel for
    # output pixel m is then m + a constant per tap (stride 1, H = P, W = Q: "same" padding);
    # only the padding masks still need (p, q).
    if INDEX64:
        sgn = tl.cast(sgn, tl.int64)
        sgk = tl.cast(sgk, tl.int64)
        sgp = tl.cast(sgp, tl.int64)
        sgq = tl.cast(sgq, tl.int64)
        sxn = tl.cast(sxn, tl.int64)
        sxc = tl.cast(sxc, tl.int64)
        sxh = tl.cast(sxh, tl.int64)
        sxw = tl.cast(sxw, tl.int64)
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    RSC = R * S * C
    if FLAT:
        num_col = tl.cdiv(RSC, BLOCK_N)
    else:
        num_cb = tl.cdiv(C, BLOCK_N)
        num_col = R * S * num_cb
    pid_k = pid // num_col
    pid_c = pid % num_col

    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    if FLAT:
        j = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = j < RSC
        c = j % C
        rs = j // C
        col_dh = (rs // S) * dil_h
        col_dw = (rs % S) * dil_w
        x_col = col_dh * sxh + col_dw * sxw + c * sxc
    else:
        cb = pid_c % num_cb
        tap = pid_c // num_cb
        tap_dh = (tap // S) * dil_h
        tap_dw = (tap % S) * dil_w
        c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = c < C
        j = tap * C + c
        x_col = c * sxc

    g_base = g_ptr + grp * K * sgk
    x_base = x_ptr + grp * C * sxc
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(N * P * Q, m_start + M_PER_SPLIT)
    # Pixel coordinates are divided out once; each step then advances them by BLOCK_K with
    # carries: div/mod by runtime P, Q in the loop cost more issue slots than the MMA itself.
    m = m_start + tl.arange(0, BLOCK_K)
    q = m % Q
    t = m // Q
    p = t % P
    nb = t // P
    step_q = BLOCK_K % Q
    step_p = (BLOCK_K // Q) % P
    step_n = BLOCK_K // (P * Q)

    if G_ROWS:
        g_ptrs = g_base + (m * sgq)[:, None] + (offs_k * sgk)[None, :]
        g_step = BLOCK_K * sgq
    if not FLAT:
        if X_ROWS:
            x_ptrs = x_base + ((m + (tap_dh - pad_h) * W + (tap_dw - pad_w)) * sxw)[:, None] \
                + x_col[None, :]
            x_step = BLOCK_K * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # at least one step, visibly to the compiler, as in the forward (the host launches no
    # empty slice; Triton 3.6's code for 128x128x64 bf16 serialised every wgmma without it)
    for _ in range(0, tl.maximum(tl.cdiv(m_end - m_start, BLOCK_K), 1)):
        m_ok = m < m_end
        if G_ROWS:
            g = tl.load(g_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            g_ptrs += g_step
        else:
            g = tl.load(g_base + (nb * sgn + p * sgp + q * sgq)[:, None] + (offs_k * sgk)[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        h0 = p * stride_h - pad_h
        w0 = q * stride_w - pad_w
        if FLAT:
            x_mask = m_ok[:, None] & j_ok[None, :]
            if PADDED:
                hh = h0[:, None] + col_dh[None, :]
                ww = w0[:, None] + col_dw[None, :]
                x_mask = x_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xt = tl.load(x_base + (nb * sxn + h0 * sxh + w0 * sxw)[:, None] + x_col[None, :],
                         mask=x_mask, other=0.0)
        else:
            hh = h0 + tap_dh
            ww = w0 + tap_dw
            row_ok = m_ok
            if PADDED:
                row_ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            if X_ROWS:
                xt = tl.load(x_ptrs, mask=row_ok[:, None] & j_ok[None, :], other=0.0)
                x_ptrs += x_step
            else:
                xt = tl.load(x_base + (nb * sxn + hh * sxh + ww * sxw)[:, None] + x_col[None, :],
                             mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        acc = _mma(tl.trans(g), xt, acc, DOT)
        m += BLOCK_K
        q += step_q
        carry = q >= Q
        q = tl.where(carry, q - Q, q)
        p += step_p + carry.to(tl.int32)
        carry = p >= P
        p = tl.where(carry, p - P, p)
        nb += step_n + carry.to(tl.int32)

    part_row = part_ptr + ((split * tl.num_programs(1) + grp) * K + offs_k).to(tl.int64) * RSC
    tl.store(part_row[:, None] + j[None, :], acc, mask=k_ok[:, None] & j_ok[None, :])


@triton.jit(do_not_specialize=["M", "P", "Q", "ROWS"])
def _relu_grad_kernel(
    g_ptr, y_ptr, gm_ptr, bpart_ptr,
    M, K, P, Q,
    sgn, sgk, sgp, sgq,
    syn, syk, syp, syq,
    smn, smk, smp, smq,
    ROWS,
    RELU: tl.constexpr, WRITE: tl.constexpr, BIAS: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One pass over grad_output: G = grad * (output > 0) written channels_last (the layout both
    # GEMMs read fastest), and per-program column sums of G for grad_bias. Masking here rather
    # than inside the GEMMs keeps their operands out of registers (see the module docstring).
    if INDEX64:
        sgn = tl.cast(sgn, tl.int64)
        sgp = tl.cast(sgp, tl.int64)
        sgq = tl.cast(sgq, tl.int64)
        syn = tl.cast(syn, tl.int64)
        syp = tl.cast(syp, tl.int64)
        syq = tl.cast(syq, tl.int64)
        smn = tl.cast(smn, tl.int64)
        smp = tl.cast(smp, tl.int64)
        smq = tl.cast(smq, tl.int64)
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K
    r0 = pid * ROWS
    r1 = tl.minimum(M, r0 + ROWS)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(r0, r1, BLOCK_R):
        m = m0 + tl.arange(0, BLOCK_R)
        q = m % Q
        t = m // Q
        p = t % P
        n = t // P
        mask = (m < r1)[:, None] & c_ok[None, :]
        g = tl.load(g_ptr + (n * sgn + p * sgp + q * sgq)[:, None] + (offs_c * sgk)[None, :],
                    mask=mask, other=0.0)
        if RELU:
            y = tl.load(y_ptr + (n * syn + p * syp + q * syq)[:, None] + (offs_c * syk)[None, :],
                        mask=mask, other=0.0)
            g = tl.where(y <= 0, tl.zeros_like(g), g)  # NaN outputs pass, as torch
        if WRITE:
            tl.store(gm_ptr + (n * smn + p * smp + q * smq)[:, None] + (offs_c * smk)[None, :], g,
                     mask=mask)
        if BIAS:
            acc += g.to(tl.float32)
    if BIAS:
        tl.store(bpart_ptr + pid * K + offs_c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["SPLIT", "NUMEL", "NCOL", "C", "S"])
def _sum_slices_kernel(part_ptr, out_ptr, SPLIT, NUMEL, NCOL, C, S, sok, soc, sor, sos,
                       BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    # out[kk, c, r, s] = sum over slices (fixed order: deterministic) of part[:, kk, (r*S+s)*C+c],
    # cast to the output dtype and written through its strides (any weight layout). BLOCK_S
    # slices load at once: a loop of one dependent load per slice would be latency-bound.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < NUMEL
    sl = tl.arange(0, BLOCK_S)
    step = tl.cast(NUMEL, tl.int64) * BLOCK_S
    ptrs = part_ptr + sl.to(tl.int64)[:, None] * NUMEL + i[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK), dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        acc += tl.load(ptrs, mask=((s0 + sl) < SPLIT)[:, None] & ok[None, :], other=0.0)
        ptrs += step
    total = tl.sum(acc, axis=0)
    kk = i // NCOL
    j = i % NCOL
    c = j % C
    rs = j // C
    tl.store(out_ptr + kk * sok + c * soc + (rs // S) * sor + (rs % S) * sos,
             total.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# problem description, configurations
# ----------------------------------------------------------------------------------------------

_TORCH_TO_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FORCED: dict[str, dict] = {}
_TABLE = _tune.ConfigTable("conv2d_relu")


@contextmanager
def forced_config(**configs: Optional[dict]):
    """Pin the launch configuration of ``fwd``/``dgrad``/``wgrad`` (tests, sweeps).

    A config is a dict with BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages and optionally
    ``split`` (wgrad: number of reduction slices) and ``flat`` (fwd/wgrad: reduction mode).
    """
    old = dict(_FORCED)
    _FORCED.update({k: v for k, v in configs.items() if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)


def _dot_mode(dtype: torch.dtype) -> int:
    if dtype != torch.float32:
        return 0
    return 1 if _allow_tf32() else 2


def _allow_tf32() -> bool:
    """Whether torch's cuDNN convolutions would use TF32 for float32 right now."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    prec = getattr(conv, "fp32_precision", None) if conv is not None else None
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # legacy and new TF32 APIs mixed: be exact
        return False


def _use_flat(C: int, R: int, S: int) -> bool:
    # channel blocks are at least 16 wide; below that the joint (r, s, c) index wastes less
    return C < 16 or C * R * S <= 64


def _cfg(bm, bn, bk, warps, stages, **extra) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **extra)


def _heuristic(kind: str, pb: dict) -> dict:
    """Default launch configuration when nothing is cached: good, never terrible.

    ``dgrad`` of a stride-1 conv runs the forward kernel and takes the forward's defaults.
    """
    m_dim, n_dim, red, flat = pb["gemm_m"], pb["gemm_n"], pb["red"], pb["flat"]
    bits = pb["bits"]
    if pb["device"] == "cpu":
        # the interpreter runs one program at a time: larger tiles mean fewer numpy round trips
        return _cfg(clamped_pow2(m_dim, 16, 64), clamped_pow2(n_dim, 16, 64), clamped_pow2(red, 16, 32), 4, 1)
    bk = 64 if bits == 16 else 32
    if kind == "wgrad":
        bm = clamped_pow2(n_dim, 16, 128)          # output channels
        bn = clamped_pow2(pb["cols"], 16, 128)     # (r, s, c) columns (or c within a tap)
        warps = 8 if bm * bn >= 128 * 128 else 4
        return _cfg(bm, bn, bk, warps, 4 if bits == 16 and not flat else 3)
    bn = clamped_pow2(n_dim, 16, 128)
    if flat:
        bk = 32 if red <= 128 else bk
        return _cfg(128, bn, bk, 4 if bn <= 64 else 8, 3)
    # channel blocks: least padding of C, ties to the larger block (C=96: 3x32, not 2x64)
    chan = pb["chan"]
    bk = min((bk, bk // 2), key=lambda b: (cdiv(chan, b) * b, -b))
    bk = min(bk, clamped_pow2(chan, 16, 64))
    warps = 8 if bn >= 128 else 4
    stages = 4 if bits == 16 else 3
    return _cfg(128, bn, bk, warps, stages)


def _candidates(kind: str, pb: dict) -> list[dict]:
    """Configurations the autotuner tries, most promising first (``--max-configs`` keeps a
    prefix). scripts/aot/specs.py compiles every one for sm_90: none spills, all fit in shared
    memory. ``dgrad`` with stride 1 is the forward kernel and tries the forward's list; the strided
    (phase) grad_input kernel leaves out the largest tiles. 64-channel blocks when C allows:
    a 128-deep step halves the per-step address and mask work per MMA (sm_90 SASS: 223
    instructions per 128x128x128 step against 147 per 128x128x64)."""
    bits, flat = pb["bits"], pb["flat"]
    bk = 64 if bits == 16 else 32
    strided_dgrad = kind == "dgrad" and pb["stride"] != "1x1"
    cap_k = 1 << 30
    if kind == "wgrad":
        if flat:
            # flat columns carry per-column (r, s, c) vectors: 4 warps spill there, 8 do not
            raw = [_cfg(128, 128, bk, 8, 3), _cfg(128, 128, bk // 2, 8, 4), _cfg(64, 128, bk, 8, 3),
                   _cfg(128, 64, bk, 8, 3), _cfg(64, 64, bk, 4, 4)]
        elif bits == 16:
            # 256 output channels x 128 columns: the fewest X rows per thread, whose per-step
            # address and mask work dominates this loop (sm_90: 321 SASS per 256x128x64 step,
            # 395 per 128x256x64, 2 x 215 per 128x128x64)
            raw = [_cfg(128, 128, bk, 8, 4), _cfg(256, 128, bk, 8, 3), _cfg(128, 256, bk, 8, 3),
                   _cfg(128, 64, bk, 8, 4), _cfg(128, 128, 2 * bk, 8, 3),
                   _cfg(128, 128, bk, 8, 4, split_mult=2), _cfg(128, 128, bk, 8, 4, split_mult=0.5),
                   _cfg(64, 128, bk, 4, 4), _cfg(64, 64, bk, 4, 4)]
        else:
            raw = [_cfg(128, 128, bk, 8, 3), _cfg(128, 64, bk, 8, 4), _cfg(64, 128, bk, 4, 4),
                   _cfg(128, 128, bk, 8, 3, split_mult=2), _cfg(64, 64, bk, 4, 4)]
        cap_m, cap_n = clamped_pow2(pb["gemm_n"], 16, 256), clamped_pow2(pb["cols"], 16, 256)
    elif flat:
        raw = [_cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3),
               _cfg(256, 64, 32, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(128, 32, 32, 4, 3)]
        cap_m, cap_n = 1 << 30, clamped_pow2(pb["gemm_n"], 16, 256)
    else:
        if bits == 16 and not strided_dgrad:
            raw = [_cfg(128, 128, bk, 8, 3), _cfg(128, 256, bk, 8, 3), _cfg(128, 128, 2 * bk, 8, 3),
                   _cfg(64, 128, bk, 4, 4), _cfg(256, 128, bk, 8, 3), _cfg(128, 128, bk, 8, 4),
                   _cfg(128, 64, bk, 4, 4), _cfg(64, 64, bk, 4, 4), _cfg(128, 128, bk // 2, 4, 4)]
        elif bits == 16:
            raw = [_cfg(128, 128, bk, 8, 3), _cfg(128, 256, bk, 8, 3), _cfg(64, 128, bk, 4, 4),
                   _cfg(128, 128, bk, 8, 4), _cfg(128, 64, bk, 4, 4), _cfg(64, 64, bk, 4, 4),
                   _cfg(128, 128, bk // 2, 4, 4)]
        else:  # fp32 tiles larger than 128x128 sit at 255 registers and use a stack frame
            raw = [_cfg(128, 128, bk, 8, 3), _cfg(128, 128, bk, 8, 4), _cfg(128, 64, bk, 4, 4),
                   _cfg(64, 128, bk, 4, 4), _cfg(64, 64, bk, 4, 4)]
        cap_m, cap_n = 1 << 30, clamped_pow2(pb["gemm_n"], 16, 256)
        cap_k = clamped_pow2(pb["chan"], 16, 128)  # no channel block wider than C
    seen, out = set(), []
    for c in raw:
        c = dict(c, BLOCK_M=min(c["BLOCK_M"], cap_m), BLOCK_N=min(c["BLOCK_N"], cap_n),
                 BLOCK_K=min(c["BLOCK_K"], cap_k))
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _wgrad_split(M: int, bk: int, tiles: int, bm: int, bn: int, sms: int, mult: float = 1) -> int:
    """How many slices grad_weight's pixel reduction is cut into.

    Few output tiles (a 512x4608 weight is 144 tiles of 128x128) leave most of 132 SMs idle or
    end on a partial wave; every slice adds a float32 partial tile to write and sum. Minimise
    waves * (steps per slice + partial write) + partial read, in microseconds, with an SM doing
    ~4 TFLOP/s (530 TFLOP/s over 132 SMs) and ~2.5 TB/s of memory bandwidth in all.
    """
    steps = cdiv(M, bk)
    t_step = 2.0 * bm * bn * bk / 4.0e6            # us per reduction step on one SM
    tile_us = bm * bn * 4 / 2.5e6                  # us to move one partial tile at full bandwidth
    best, best_cost = 1, None
    for s in range(1, min(steps, 8 * sms) + 1):
        waves = cdiv(tiles * s, sms)
        cost = (waves * (cdiv(steps, s) * t_step + min(tiles * s, sms) * tile_us)
                + tiles * s * tile_us)
        if best_cost is None or cost < best_cost * 0.999:
            best, best_cost = s, cost
    return max(1, min(steps, int(round(best * mult))))


def _key(kind: str, pb: dict) -> str:
    return "|".join([
        kind, pb["dtype"], pb["layout"], f"C{pb['chan']}", f"K{pb['kout']}", f"R{pb['R']}S{pb['S']}",
        f"st{pb['stride']}", f"d{pb['dil']}", f"pad{int(pb['padded'])}", f"g{pb['groups']}",
        f"M{max(0, int(pb['gemm_m']) - 1).bit_length()}", f"dot{pb['dot']}"])


def _select(kind: str, pb: dict, run: Optional[Callable[[dict], Any]], device: torch.device,
            real: bool) -> dict:
    forced = _FORCED.get(kind)
    if forced is not None:
        return forced
    tag = _tune.device_tag(device)
    key = _key(kind, pb)
    hit = _TABLE.get(tag, key)
    if hit is not None:
        return hit
    if (run is not None and real and device.type == "cuda" and _tune.enabled()
            and not torch.cuda.is_current_stream_capturing()):
        best, ms = _tune.tune(_candidates(kind, pb), run)
        if best is not None:
            _TABLE.put(tag, key, best, ms)
            return best
    return _heuristic(kind, pb)


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous(memory_format=torch.channels_last) and t.stride(1) == 1:
        return "nhwc"
    if t.is_contiguous():
        return "nchw"
    return "strided"


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# Host work per call is kept to allocation and launch: everything derived from shapes, strides,
# dtype and geometry (output layout, configuration, grid, scalar arguments) is a "plan" cached
# per such key. GoogLeNet's 7x7 layers run in ~10 us on an H100, so host time would show.

_PLANS = PlanCache(lambda: utils.FORCE_INDEX64)


def _meta(consts: dict, cfg: dict) -> dict:
    return dict(consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _gemm_plan(kind: str, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
               y: torch.Tensor, C: int, K: int, R: int, S: int, w_strides: tuple, stride, padding,
               dilation, groups: int, flip: bool, relu: bool, real: bool) -> dict:
    """Plan for ``_conv_fwd_kernel``: the forward (``kind="fwd"``) and, with the weight's
    channel strides swapped and its taps mirrored, grad_input of stride-1 convs (``"dgrad"``).
    ``C``/``K``: reduction / output channels per group; ``w_strides``: (group, output channel,
    reduction channel, r, s) strides of ``w``."""
    N, _, H, W = x.shape
    P, Q = y.shape[2], y.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    flat = _use_flat(C, R, S)
    M = N * P * Q
    pb = dict(kind=kind, device=x.device.type, bits=x.element_size() * 8,
              dtype=_TORCH_TO_TL[x.dtype], layout=_layout(x), chan=C, kout=K, R=R, S=S,
              stride=f"{sh}x{sw}", dil=f"{dh}x{dw}", padded=(ph != 0 or pw != 0), groups=groups,
              gemm_m=M, gemm_n=K, red=C * R * S, flat=flat, dot=_dot_mode(x.dtype))
    scalars = (N, C, H, W, K, P, Q, *x.stride(), *w_strides, *y.stride(), sh, sw, ph, pw, dh, dw)
    index64 = needs_index64(x, y)

    def launch(cfg, x, w, b, y, real):
        consts = dict(R=R, S=S, FLAT=cfg.get("flat", flat), PADDED=pb["padded"], FLIP=flip,
                      HAS_BIAS=b is not None, RELU=relu, DOT=pb["dot"], INDEX64=index64)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_N"]), groups)
        run(_conv_fwd_kernel, grid, (x, w, w if b is None else b, y, *scalars),
             _meta(consts, cfg), real)

    cfg = None
    if M > 0:
        cfg = _select(kind, pb, lambda c: launch(c, x, w, b, y, real), x.device, real)
    return dict(cfg=cfg, launch=launch)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             stride, padding, dilation, groups: int, relu: bool) -> torch.Tensor:
    real = is_real(x)
    key = None
    if real and not _FORCED:
        key = ("fwd", x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(),
               bias is None, *stride, *padding, *dilation, groups, relu, _dot_mode(x.dtype))

    def build() -> dict:
        N, _, H, W = x.shape
        KT, C, R, S = weight.shape
        K = KT // groups
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        P, Q = conv_output_size(H, R, sh, ph, dh), conv_output_size(W, S, sw, pw, dw)
        fmt = conv_memory_format(x, weight)
        y = torch.empty((N, KT, P, Q), device=x.device, dtype=x.dtype, memory_format=fmt)
        w = weight.contiguous(memory_format=torch.channels_last)
        sw_ = w.stride()
        plan = _gemm_plan("fwd", x, w, bias, y, C, K, R, S, (K * sw_[0], *sw_), stride, padding,
                          dilation, groups, False, relu, real)
        return dict(plan, y_shape=y.shape, fmt=fmt)

    plan = _PLANS.get(key, build)
    y = alloc(plan["y_shape"], x.dtype, x.device, plan["fmt"])
    if plan["cfg"] is not None:
        w = weight.contiguous(memory_format=torch.channels_last)
        plan["launch"](plan["cfg"], x, w, bias, y, real)
    return y


def _grad_output(grad: torch.Tensor, output: Optional[torch.Tensor], bias_grad: bool,
                 write: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, grad_bias)`` from one pass over grad_output: ``G = grad * (output > 0)`` (or a copy
    of grad when ``output`` is None) written channels_last when ``write``, else an empty tensor;
    grad_bias = the sum of G over (N, H, W) when ``bias_grad``, else an empty tensor."""
    real = is_real(grad)
    N, KT, P, Q = grad.shape
    key = None
    if real:
        key = ("gout", grad.shape, grad.stride(), None if output is None else output.stride(),
               grad.dtype, grad.device, bias_grad, write)

    def build() -> dict:
        M = N * P * Q
        gpu = grad.device.type == "cuda"
        block_c = clamped_pow2(KT, 16, 128 if gpu else 32)
        block_r = max(16, (8192 if gpu else 512) // block_c)
        ncb = cdiv(KT, block_c)
        # two 8-warp programs per SM keep ~64 KB of loads in flight there (enough for the
        # bandwidth), each looping over its rows; few programs keep the bias partials short
        progs = max(1, min(cdiv(M, block_r), max(1, 2 * num_sms(grad.device) // ncb)))
        rows = cdiv(cdiv(M, progs), block_r) * block_r
        progs = cdiv(M, rows) if M else 0
        fmt = torch.channels_last
        gm = torch.empty((N, KT, P, Q) if write else (0,), device=grad.device, dtype=grad.dtype,
                         memory_format=fmt if write else torch.contiguous_format)
        y = output if output is not None else grad
        scalars = (M, KT, P, Q, *grad.stride(), *y.stride(),
                   *(gm.stride() if write else (0, 0, 0, 0)), rows)
        meta = dict(RELU=output is not None, WRITE=write, BIAS=bias_grad,
                    INDEX64=needs_index64(grad, y, gm), BLOCK_R=block_r, BLOCK_C=block_c,
                    num_warps=8 if gpu and block_r * block_c >= 8192 else 4)
        return dict(progs=progs, ncb=ncb, scalars=scalars, meta=meta, gm_shape=gm.shape,
                    fmt=fmt if write else torch.contiguous_format)

    plan = _PLANS.get(key, build)
    gm = alloc(plan["gm_shape"], grad.dtype, grad.device, plan["fmt"])
    gb = alloc((KT,) if bias_grad else (0,), grad.dtype, grad.device)
    progs = plan["progs"]
    if progs == 0 or KT == 0 or not (write or bias_grad):
        if bias_grad:
            gb.zero_()
        return gm, gb
    bpart = alloc((progs, KT) if bias_grad else (0,), torch.float32, grad.device)
    y = output if output is not None else grad
    run(_relu_grad_kernel, (progs, plan["ncb"]), (grad, y, gm, bpart, *plan["scalars"]),
         plan["meta"], real)
    if bias_grad:
        _sum_slices(bpart, gb, progs, KT, 1, 1, 1, (1, 0, 0, 0), real)
    return gm, gb


def _sum_slices(part, out, split: int, numel: int, ncol: int, C: int, S: int, out_strides,
                real: bool) -> None:
    block_s = clamped_pow2(split, 1, 32)
    block = max(64, (4096 if out.device.type == "cuda" else 1024) // block_s)
    run(_sum_slices_kernel, (cdiv(numel, block),),
         (part, out, split, numel, ncol, C, S, *out_strides),
         dict(BLOCK_S=block_s, BLOCK=block, num_warps=4), real)


def _phases(size: int, k: int, stride: int, pad: int, dil: int):
    """Per input-row residue: (first row, rows, first tap, taps, tap step, p_base, dp)."""
    step = stride // math.gcd(stride, dil)
    out = []
    for rho in range(min(stride, size)):
        rows = (size - rho + stride - 1) // stride
        valid = [r for r in range(k) if (rho + pad - r * dil) % stride == 0]
        if valid:
            r0 = valid[0]
            out.append((rho, rows, r0, len(valid), step, (rho + pad - r0 * dil) // stride,
                        step * dil // stride))
        else:
            out.append((rho, rows, 0, 0, step, 0, 0))
    return out


def _grad_input(grad: torch.Tensor, weight: torch.Tensor, input_size, channels_last: bool,
                stride, padding, dilation, groups: int) -> torch.Tensor:
    """grad_input from the (already ReLU-masked) gradient ``grad``."""
    real = is_real(grad)
    key = None
    if real and not _FORCED:
        key = ("dgrad", grad.shape, grad.stride(), grad.dtype, grad.device, weight.shape,
               weight.stride(), *input_size, channels_last, *stride, *padding, *dilation, groups,
               _dot_mode(grad.dtype))

    def build() -> dict:
        N, CT, H, W = input_size
        KT, C, R, S = weight.shape
        K = KT // groups
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        P, Q = grad.shape[2], grad.shape[3]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dx = torch.empty((N, CT, H, W), device=grad.device, dtype=grad.dtype, memory_format=fmt)
        plan = dict(dx_shape=dx.shape, fmt=fmt, cfg=None, zero=grad.numel() == 0 or K == 0)
        if dx.numel() == 0 or plan["zero"]:
            return plan
        w = weight.contiguous(memory_format=torch.channels_last)
        s0, s1, s2, s3 = w.stride()
        if sh == 1 and sw == 1:
            # a stride-1 conv's transpose is a stride-1 conv of G with the mirrored, channel-
            # transposed weight: the forward kernel, tiles and configurations included
            sub = _gemm_plan("dgrad", grad, w, None, dx, K, C, R, S, (K * s0, s1, s0, s2, s3),
                             (1, 1), (dh * (R - 1) - ph, dw * (S - 1) - pw), (dh, dw), groups,
                             True, False, real)
            plan["cfg"] = sub["cfg"]
            plan["launch"] = lambda cfg, g, w, dx, real: sub["launch"](cfg, g, w, None, dx, real)
            return plan
        pb = dict(kind="dgrad", device=grad.device.type, bits=grad.element_size() * 8,
                  dtype=_TORCH_TO_TL[grad.dtype], layout=_layout(grad), chan=K, kout=C, R=R, S=S,
                  stride=f"{sh}x{sw}", dil=f"{dh}x{dw}", padded=(ph > 0 or pw > 0), groups=groups,
                  gemm_m=N * H * W // max(1, sh * sw), gemm_n=C, red=K * R * S, flat=False,
                  dot=_dot_mode(grad.dtype))
        consts = dict(DOT=pb["dot"], INDEX64=needs_index64(grad, dx))
        phases = []  # one launch per (row residue, column residue) with its exact taps
        for (h0, HA, r0, NR, rstep, pbase, dp) in _phases(H, R, sh, ph, dh):
            for (w0, WA, s0_, NS, sstep, qbase, dq) in _phases(W, S, sw, pw, dw):
                scalars = (N, C, H, W, K, P, Q, *grad.stride(), *w.stride(), *dx.stride(),
                           h0, w0, HA, WA, r0, s0_, NR, NS, rstep, sstep, pbase, qbase, dp, dq,
                           sh, sw)
                phases.append((N * HA * WA, scalars))

        def launch(cfg, g, w, dx, real):
            meta = _meta(consts, cfg)
            for MA, scalars in phases:
                grid = (cdiv(MA, cfg["BLOCK_M"]) * cdiv(C, cfg["BLOCK_N"]), groups)
                run(_conv_dgrad_kernel, grid, (g, w, dx, *scalars), meta, real)

        plan["launch"] = launch
        plan["cfg"] = _select("dgrad", pb, lambda c: launch(c, grad, w, dx, real), grad.device,
                              real)
        return plan

    plan = _PLANS.get(key, build)
    dx = alloc(plan["dx_shape"], grad.dtype, grad.device, plan["fmt"])
    if plan["zero"]:
        return dx.zero_()
    if plan["cfg"] is not None:
        w = weight.contiguous(memory_format=torch.channels_last)
        plan["launch"](plan["cfg"], grad, w, dx, real)
    return dx


def _grad_weight(grad: torch.Tensor, x: torch.Tensor, weight_size, weight_channels_last: bool,
                 stride, padding, dilation, groups: int) -> torch.Tensor:
    """grad_weight from the (already ReLU-masked) gradient ``grad``."""
    real = is_real(grad)
    key = None
    if real and not _FORCED:
        key = ("wgrad", grad.shape, grad.stride(), grad.dtype, grad.device, x.shape, x.stride(),
               *weight_size, weight_channels_last, *stride, *padding, *dilation, groups,
               _dot_mode(x.dtype))
    N, _, H, W = x.shape
    KT, C, R, S = weight_size
    K = KT // groups
    RSC = R * S * C
    fmt = torch.channels_last if weight_channels_last else torch.contiguous_format

    def build() -> dict:
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        P, Q = grad.shape[2], grad.shape[3]
        M = N * P * Q
        gw = torch.empty(tuple(weight_size), device=x.device, dtype=x.dtype, memory_format=fmt)
        plan = dict(cfg=None, gw_strides=gw.stride())
        if M == 0 or KT * RSC == 0:
            return plan
        flat = _use_flat(C, R, S)
        pb = dict(kind="wgrad", device=x.device.type, bits=x.element_size() * 8,
                  dtype=_TORCH_TO_TL[x.dtype], layout=_layout(x), chan=C, kout=K, R=R, S=S,
                  stride=f"{sh}x{sw}", dil=f"{dh}x{dw}", padded=(ph > 0 or pw > 0), groups=groups,
                  gemm_m=M, gemm_n=K, red=M, cols=RSC if flat else C, flat=flat,
                  dot=_dot_mode(x.dtype))
        scalars = (N, C, H, W, K, P, Q, *grad.stride(), *x.stride(), sh, sw, ph, pw, dh, dw)
        gs, xs = grad.stride(), x.stride()
        consts = dict(R=R, S=S, PADDED=pb["padded"], DOT=pb["dot"],
                      G_ROWS=gs[0] == P * Q * gs[3] and gs[2] == Q * gs[3],
                      X_ROWS=(sh, sw, H, W) == (1, 1, P, Q) and xs[0] == H * W * xs[3]
                      and xs[2] == W * xs[3], INDEX64=needs_index64(grad, x))
        sms = num_sms(x.device)
        shapes: dict[tuple, tuple] = {}  # per config: (grid, split, pixels per split)

        def geometry(cfg) -> tuple:
            ck = tuple(sorted(cfg.items()))
            if ck not in shapes:
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                cols = cdiv(RSC, bn) if cfg.get("flat", flat) else R * S * cdiv(C, bn)
                tiles = cdiv(K, bm) * cols
                split = cfg.get("split") or _wgrad_split(M, bk, tiles * groups, bm, bn, sms,
                                                         cfg.get("split_mult", 1))
                m_per = cdiv(cdiv(M, split), bk) * bk
                split = cdiv(M, m_per)
                shapes[ck] = ((tiles, groups, split), split, m_per)
            return shapes[ck]

        def launch(cfg, g, x, gw, real) -> None:
            grid, split, m_per = geometry(cfg)
            part = alloc((split, KT, RSC), torch.float32, x.device)
            run(_conv_wgrad_kernel, grid, (g, x, part, *scalars, m_per),
                 _meta(dict(consts, FLAT=cfg.get("flat", flat)), cfg), real)
            # fixed-order reduction of the slices: deterministic (and part of what tuning times)
            _sum_slices(part, gw, split, KT * RSC, RSC, C, S, plan["gw_strides"], real)

        plan["launch"] = launch
        plan["cfg"] = _select("wgrad", pb, lambda c: launch(c, grad, x, gw, real), x.device, real)
        return plan

    plan = _PLANS.get(key, build)
    gw = alloc(tuple(weight_size), x.dtype, x.device, fmt)
    if plan["cfg"] is None:
        return gw.zero_()
    plan["launch"](plan["cfg"], grad, x, gw, real)
    return gw


# ----------------------------------------------------------------------------------------------
# custom ops and autograd
# ----------------------------------------------------------------------------------------------

def _no_channels(x: torch.Tensor, w: torch.Tensor) -> Optional[str]:
    """Why an input without channels is not for the kernels (torch returns an empty
    (N, 0, P, Q) tensor for it; the kernels reduce over channels), else None."""
    if x.shape[1] == 0 or w.shape[1] == 0:
        return f"needs input channels, got input {tuple(x.shape)} and weight {tuple(w.shape)}"
    return None


def _conv_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             stride: list[int], padding: list[int], dilation: list[int], groups: int,
             relu: bool) -> torch.Tensor:
    # direct torch.ops calls skip the public layer: check here too (the eager fast path of
    # fastconv.functional, already checked, does not come through this op)
    check_conv2d_relu(input, weight, bias, stride, padding, dilation, groups, relu=relu,
                      autocast=False)
    reason = _no_channels(input, weight)
    if reason:  # dispatch sends these to torch (why_not_conv2d_relu)
        raise ValueError(f"fastconv::triton_conv2d_relu: {reason}")
    return _forward(input, weight, bias, stride, padding, dilation, groups, relu)


def _conv_fake(input, weight, bias, stride, padding, dilation, groups, relu):
    N, _, H, W = input.shape
    P = conv_output_size(H, weight.shape[2], stride[0], padding[0], dilation[0])
    Q = conv_output_size(W, weight.shape[3], stride[1], padding[1], dilation[1])
    return input.new_empty((N, weight.shape[0], P, Q)).contiguous(
        memory_format=conv_memory_format(input, weight))


def _grad_output_op(grad_output: torch.Tensor, output: Optional[torch.Tensor], bias_grad: bool,
                    write: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _grad_output(grad_output, output, bias_grad, write)


def _grad_output_fake(grad_output, output, bias_grad, write):
    gm = (grad_output.new_empty(grad_output.shape).contiguous(memory_format=torch.channels_last)
          if write else grad_output.new_empty((0,)))
    return gm, grad_output.new_empty((grad_output.shape[1],) if bias_grad else (0,))


def _grad_input_op(grad: torch.Tensor, weight: torch.Tensor, input_size: list[int],
                   channels_last: bool, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int) -> torch.Tensor:
    return _grad_input(grad, weight, input_size, channels_last, stride, padding, dilation, groups)


def _grad_input_fake(grad, weight, input_size, channels_last, stride, padding, dilation, groups):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty(input_size).contiguous(memory_format=fmt)


def _grad_weight_op(grad: torch.Tensor, input: torch.Tensor, weight_size: list[int],
                    weight_channels_last: bool, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int) -> torch.Tensor:
    return _grad_weight(grad, input, weight_size, weight_channels_last, stride, padding, dilation,
                        groups)


def _grad_weight_fake(grad, input, weight_size, weight_channels_last, stride, padding, dilation,
                      groups):
    fmt = torch.channels_last if weight_channels_last else torch.contiguous_format
    return input.new_empty(weight_size).contiguous(memory_format=fmt)


conv2d_relu_op = define_op("triton_conv2d_relu", fake=_conv_fake)(_conv_op)
# grad_output -> (G masked by the ReLU, channels_last; grad_bias); G feeds the two GEMMs below
grad_output_op = define_op("triton_conv2d_relu_grad_output",
                           fake=_grad_output_fake)(_grad_output_op)
grad_input_op = define_op("triton_conv2d_relu_grad_input", fake=_grad_input_fake)(_grad_input_op)
grad_weight_op = define_op("triton_conv2d_relu_grad_weight",
                           fake=_grad_weight_fake)(_grad_weight_op)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.input_size = list(input.shape)
    ctx.input_cl = conv_memory_format(input, weight) == torch.channels_last
    ctx.weight_cl = suggest_memory_format(weight) == torch.channels_last
    ctx.relu = relu


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gi, gw, gb = _grads(grad, input, weight, output, stride, padding, dilation, groups,
                        ctx.input_size, ctx.input_cl, ctx.weight_cl, need_x, need_w, need_b)
    return gi, gw, gb, None, None, None, None, None


def backward(grad_output, input, weight, output, stride, padding, dilation, groups, relu,
             output_mask):
    """The backward as a pass of its own (fastconv.backends.base.ConvPasses): ``output`` is
    the saved forward output (None without ``relu``); entries not in ``output_mask`` are None."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    input_cl = conv_memory_format(input, weight) == torch.channels_last
    weight_cl = suggest_memory_format(weight) == torch.channels_last
    return _grads(grad_output, input, weight, output if relu else None, stride, padding,
                  dilation, int(groups), list(input.shape), input_cl, weight_cl, *output_mask)


def forward(input, weight, bias, stride, padding, dilation, groups, relu):
    """The forward as a pass of its own (no autograd): launches, or the op while tracing."""
    args = (input, weight, bias, list(stride), list(padding), list(dilation), int(groups),
            bool(relu))
    return _forward(*args) if eager(input) else conv2d_relu_op(*args)


def _grads(grad, input, weight, output, stride, padding, dilation, groups, input_size,
           input_cl, weight_cl, need_x, need_w, need_b):
    # eager: call the launchers directly (the op dispatcher costs ~100 us of host time per call);
    # tracing (fake/functional tensors): the registered ops, so graphs show fastconv ops
    now = is_real(grad)
    gi = gw = gb = None
    g = grad
    mask = output is not None and (need_x or need_w)
    if mask or need_b:
        # one pass: the ReLU mask applied once for both GEMMs, grad_bias on the way
        gm, gb_ = (_grad_output if now else grad_output_op)(grad, output, bool(need_b), mask)
        g = gm if mask else grad
        gb = gb_ if need_b else None
    if need_x:
        fn = _grad_input if now else grad_input_op
        gi = fn(g, weight, input_size, input_cl, stride, padding, dilation, groups)
    if need_w:
        fn = _grad_weight if now else grad_weight_op
        gw = fn(g, input, list(weight.shape), weight_cl, stride, padding, dilation, groups)
    return gi, gw, gb


conv2d_relu_op.register_autograd(_backward, setup_context=_setup_context)
_EagerConv2dReLU = eager_autograd("_EagerConv2dReLU", _forward, _setup_context, _backward)
declare_kernels({
    "triton_conv2d_relu": [_conv_fwd_kernel],
    "triton_conv2d_relu_grad_output": [_relu_grad_kernel, _sum_slices_kernel],
    "triton_conv2d_relu_grad_input": [_conv_fwd_kernel, _conv_dgrad_kernel],
    "triton_conv2d_relu_grad_weight": [_conv_wgrad_kernel, _sum_slices_kernel],
})


# ----------------------------------------------------------------------------------------------
# backend entry points
# ----------------------------------------------------------------------------------------------

def conv2d_relu(input, weight, bias, stride, padding, dilation, groups, relu):
    """Backend entry (normalised arguments, see fastconv/backends/base.py).

    Under torch.compile (or any tracing) this is the custom op ``fastconv::triton_conv2d_relu``;
    in eager mode the same launchers are called without the op dispatcher, whose host overhead
    would rival the GPU time of small layers.
    """
    args = (input, weight, bias, list(stride), list(padding), list(dilation), int(groups),
            bool(relu))
    if not eager(input):
        return conv2d_relu_op(*args)
    if grad_needed(*args[:3]):
        return _EagerConv2dReLU.apply(*args)
    return _forward(*args)


def why_not_conv2d_relu(args: dict) -> Optional[str]:
    x, w, b = args["input"], args["weight"], args.get("bias")
    if x.dtype not in _TORCH_TO_TL:
        return (f"triton conv2d_relu supports float16, bfloat16 and float32, not {x.dtype} "
                "(float32 accumulation is too narrow for float64)")
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and t.dtype != x.dtype:
            return f"triton conv2d_relu needs {name} dtype {t.dtype} to equal input dtype {x.dtype}"
    if x.layout != torch.strided or w.layout != torch.strided:
        return "triton conv2d_relu needs strided (dense) tensors"
    if x.dim() != 4 or w.dim() != 4:
        return f"triton conv2d_relu needs 4-D input and weight, got {x.dim()}-D and {w.dim()}-D"
    if any(s < 0 for s in x.stride()):
        return "triton conv2d_relu needs non-negative input strides"
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 0) and x.dtype == torch.bfloat16:
            return f"triton conv2d_relu: bfloat16 dots need compute capability 8.0+, device has {cap}"
        if cap < (7, 5):
            return f"triton conv2d_relu needs compute capability 7.5+, device has {cap}"
    reason = _no_channels(x, w)
    if reason:
        return f"triton conv2d_relu {reason}"
    N, _, H, W = x.shape
    _, _, R, S = w.shape
    (sh, sw), (ph, pw), (dh, dw) = args["stride"], args["padding"], args["dilation"]
    P, Q = conv_output_size(H, R, sh, ph, dh), conv_output_size(W, S, sw, pw, dw)
    if N * max(P, 0) * max(Q, 0) > INT32_LIMIT or N * H * W > INT32_LIMIT:
        return (f"triton conv2d_relu indexes pixels with int32: N*P*Q = {N}*{P}*{Q} and N*H*W "
                f"= {N}*{H}*{W} must stay below 2**31")
    if w.numel() * (R * S + 1) > INT32_LIMIT:
        return f"triton conv2d_relu: weight {tuple(w.shape)} too large for int32 column indices"
    return None
