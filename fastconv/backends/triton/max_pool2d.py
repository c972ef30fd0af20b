"""Triton max-pool (optionally fused with a preceding ReLU), forward and backward, registered as
``fastconv::triton_max_pool2d`` (+ ``_backward``) custom ops.

Every kernel reads its operands through strides, so any input works without a copy; the tile
shape follows the output's memory format (the input's, as torch chooses it): see
``utils.tile_coords``.

The backward gathers instead of scattering: each input element visits the few outputs whose
window can contain it (``NOH x NOW`` of them: 2x2 for 3/2 windows, 1 for 2/2), so gradients are
written once, deterministically, without atomics or a zero fill.

The forward keeps, for the backward, only the window-local argmax ``kh * KW + kw`` as int8
(int32 for windows of more than 127 taps) unless ``return_indices`` asks for torch's int64 flat
indices. With ``relu=True`` a window whose maximum is <= 0 stores -1, so the backward needs
neither the output nor the input to apply the ReLU mask.

Host path: an eager call (real tensors, not compiling) runs the launchers directly under the
op's own autograd formula (``utils.eager_autograd``); tracing and torch.compile go through the
registered ops, whose bodies call the same launchers. Everything a launch derives from shapes,
strides, dtype and flags is a plan cached per such key, so a call is: look up the plan,
allocate outputs, launch once.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...checks import check_max_pool2d
from ...shapes import dense_channels_last, memory_format, pool_output_size
from . import utils
from .autotune import load_tuning, tuning_state
from .utils import (POOL_NUM_STAGES, PlanCache, alloc, cdiv, declare_kernels, define_op,
                    dense_needs_index64, eager, eager_autograd, grad_needed, is_real,
                    needs_index64, pair, pool_tile, run, tile_coords,
                    window_why_not)

# Tile sizes by device kind (max_pool2d_configs.json); sweeps edit this dict in place.
TUNING = load_tuning("max_pool2d")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _first_tap(i0, D: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    """Index of the first tap of a window starting at ``i0`` that lies at or after 0."""
    if CHECK_BOUNDS:
        return tl.maximum((-i0 + D - 1) // D, 0)
    else:
        return tl.zeros_like(i0)


@triton.jit
def _inside(ok, i, size, CHECK_BOUNDS: tl.constexpr):
    """``ok`` and 0 <= i < size (known true at compile time when not CHECK_BOUNDS)."""
    if CHECK_BOUNDS:
        return ok & (i >= 0) & (i < size)
    else:
        return ok


@triton.jit
def _max_pool2d_fwd_kernel(
        x_ptr, y_ptr, idx_ptr,
        N, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        RELU: tl.constexpr, FLAT_INDICES: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr):
    # CHECK_BOUNDS=False (no padding, floor mode): every window lies inside the input, so taps
    # need no bounds tests (sm_90: ~100 -> ~60 instructions per 3x3 output)
    n, c, oh, ow, mask = tile_coords(tl.program_id(0), tl.program_id(1), N, C, OH, OW,
                                     CHANNELS_LAST, INDEX64, BLOCK_R, BLOCK_S)
    x_base = x_ptr + n * sxn + c * sxc
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    best = tl.full([BLOCK_R, BLOCK_S], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_R, BLOCK_S], -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DH
        h_ok = _inside(mask, ih, H, CHECK_BOUNDS)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            ok = _inside(h_ok, iw, W, CHECK_BOUNDS)
            v = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=float("-inf"))
            v = v.to(tl.float32)
            # torch's rule: a strictly larger value or any NaN replaces the current pick (so
            # the last NaN wins); out-of-bounds taps read -inf and never win
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            if FLAT_INDICES:
                arg = tl.where(take, ih * W + iw, arg)
            else:
                arg = tl.where(take, kh * KW + kw, arg)
    # a window of -inf only: torch reports its first in-bounds tap
    kh0 = _first_tap(ih0, DH, CHECK_BOUNDS)
    kw0 = _first_tap(iw0, DW, CHECK_BOUNDS)
    if FLAT_INDICES:
        first = (ih0 + kh0 * DH) * W + (iw0 + kw0 * DW)
    else:
        first = kh0 * KW + kw0
    arg = tl.where(arg < 0, first, arg)
    out = best
    if RELU:
        out = tl.where(best < 0, 0.0, best)  # NaN stays NaN, as torch.relu
        if not FLAT_INDICES:
            arg = tl.where(best <= 0, -1, arg)  # the ReLU blocks this window's gradient
    y_off = n * syn + c * syc + oh * syh + ow * syw
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + y_off, arg.to(idx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cell_grad(acc, a, g, ih, iw, W, U: tl.constexpr, V: tl.constexpr, J: tl.constexpr,
               K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
               DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               FLAT_INDICES: tl.constexpr):
    """Add window (ch - J, cw - K)'s gradient to the cell's input (U, V) when that input is
    the window's argmax ``a``. Whether the input lies in the window at all is known at
    compile time: it is tap ((U + J*SH) / DH, (V + K*SW) / DW) when those divide exactly."""
    if (U + J * SH) % DH == 0 and (U + J * SH) // DH < KH:
        if (V + K * SW) % DW == 0 and (V + K * SW) // DW < KW:
            if FLAT_INDICES:
                want = ih * W + iw
            else:
                want = ((U + J * SH) // DH) * KW + (V + K * SW) // DW
            acc += tl.where(a == want, g, 0.0)
    return acc


@triton.jit
def _max_pool2d_bwd_kernel(
        g_ptr, idx_ptr, y_ptr, dx_ptr,
        N, C, H, W, OH, OW, CH, CW,
        sgn, sgc, sgh, sgw, sin, sic, sih, siw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        NOH: tl.constexpr, NOW: tl.constexpr, RELU_FROM_OUTPUT: tl.constexpr,
        FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Gather over cells (strides up to 2): cell (ch, cw) is the SH x SW block of inputs at
    rows ch*SH - PH + [0, SH), columns cw*SW - PW + [0, SW). All its inputs see the same
    NOH x NOW candidate windows (ch - j, cw - k), so each window's argmax and gradient are
    loaded once per cell, not once per input (3x3/2: 4 loads per 4 inputs instead of 16;
    sm_90: ~76 -> ~25 instructions per input element)."""
    n, c, ch, cw, mask = tile_coords(tl.program_id(0), tl.program_id(1), N, C, CH, CW,
                                     CHANNELS_LAST, INDEX64, BLOCK_R, BLOCK_S)
    g_base = g_ptr + n * sgn + c * sgc
    i_base = idx_ptr + n * sin + c * sic
    ih = ch * SH - PH
    iw = cw * SW - PW
    acc00 = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    acc01 = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    acc10 = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    acc11 = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    for j in tl.static_range(NOH):
        oh = ch - j
        h_ok = mask & (oh >= 0) & (oh < OH)
        for k in tl.static_range(NOW):
            ow = cw - k
            ok = h_ok & (ow >= 0) & (ow < OW)
            a = tl.load(i_base + oh * sih + ow * siw, mask=ok, other=-1).to(tl.int32)
            g = tl.load(g_base + oh * sgh + ow * sgw, mask=ok, other=0.0).to(tl.float32)
            if RELU_FROM_OUTPUT:
                yv = tl.load(y_ptr + n * syn + c * syc + oh * syh + ow * syw, mask=ok,
                             other=0.0)
                g = tl.where((yv > 0) | (yv != yv), g, 0.0)  # torch's ReLU backward
            acc00 = _cell_grad(acc00, a, g, ih, iw, W, 0, 0, j, k, SH, SW, DH, DW, KH, KW,
                               FLAT_INDICES)
            if SW > 1:
                acc01 = _cell_grad(acc01, a, g, ih, iw + 1, W, 0, 1, j, k, SH, SW, DH, DW,
                                   KH, KW, FLAT_INDICES)
            if SH > 1:
                acc10 = _cell_grad(acc10, a, g, ih + 1, iw, W, 1, 0, j, k, SH, SW, DH, DW,
                                   KH, KW, FLAT_INDICES)
                if SW > 1:
                    acc11 = _cell_grad(acc11, a, g, ih + 1, iw + 1, W, 1, 1, j, k, SH, SW, DH,
                                       DW, KH, KW, FLAT_INDICES)
    d_base = dx_ptr + n * sdn + c * sdc
    h0 = mask & (ih >= 0) & (ih < H)
    w0 = (iw >= 0) & (iw < W)
    ty = dx_ptr.dtype.element_ty
    tl.store(d_base + ih * sdh + iw * sdw, acc00.to(ty), mask=h0 & w0)
    if SW > 1:
        w1 = (iw + 1 >= 0) & (iw + 1 < W)
        tl.store(d_base + ih * sdh + (iw + 1) * sdw, acc01.to(ty), mask=h0 & w1)
    if SH > 1:
        h1 = mask & (ih + 1 >= 0) & (ih + 1 < H)
        tl.store(d_base + (ih + 1) * sdh + iw * sdw, acc10.to(ty), mask=h1 & w0)
        if SW > 1:
            tl.store(d_base + (ih + 1) * sdh + (iw + 1) * sdw, acc11.to(ty), mask=h1 & w1)


# A second specialisation, not a copy: strides above 2 have no shared 2x2 cells to gather.
@triton.jit
def _max_pool2d_bwd_gather_kernel(
        g_ptr, idx_ptr, y_ptr, dx_ptr,
        N, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sin, sic, sih, siw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        NOH: tl.constexpr, NOW: tl.constexpr, RELU_FROM_OUTPUT: tl.constexpr,
        FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Strides above 2: each input element gathers from the windows that can contain it."""
    n, c, ih, iw, mask = tile_coords(tl.program_id(0), tl.program_id(1), N, C, H, W,
                                     CHANNELS_LAST, INDEX64, BLOCK_R, BLOCK_S)
    g_base = g_ptr + n * sgn + c * sgc
    i_base = idx_ptr + n * sin + c * sic
    oh_hi = (ih + PH) // SH
    ow_hi = (iw + PW) // SW
    acc = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    for j in tl.static_range(NOH):
        oh = oh_hi - j
        dh = ih + PH - oh * SH  # >= 0: offset of ih inside window oh
        kh = dh // DH
        h_ok = (oh >= 0) & (oh < OH) & (dh == kh * DH) & (kh < KH)
        for k in tl.static_range(NOW):
            ow = ow_hi - k
            dw = iw + PW - ow * SW
            kw = dw // DW
            ok = mask & h_ok & (ow >= 0) & (ow < OW) & (dw == kw * DW) & (kw < KW)
            arg = tl.load(i_base + oh * sih + ow * siw, mask=ok, other=-1).to(tl.int32)
            if FLAT_INDICES:
                hit = ok & (arg == ih * W + iw)
            else:
                hit = ok & (arg == kh * KW + kw)
            if RELU_FROM_OUTPUT:
                yv = tl.load(y_ptr + n * syn + c * syc + oh * syh + ow * syw, mask=hit,
                             other=0.0)
                hit = hit & ((yv > 0) | (yv != yv))  # torch's ReLU backward: zero where y <= 0
            acc += tl.load(g_base + oh * sgh + ow * sgw, mask=hit, other=0.0).to(tl.float32)
    tl.store(dx_ptr + n * sdn + c * sdc + ih * sdh + iw * sdw, acc.to(dx_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------- launchers
def _index_dtype(kh: int, kw: int) -> torch.dtype:
    return torch.int8 if kh * kw <= 127 else torch.int32


_PLANS = PlanCache(lambda: (tuning_state(TUNING), utils.FORCE_INDEX64))


def _max_pool2d_plan(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     relu) -> dict:
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    cl = dense_channels_last(x)
    plan = dict(shape=(n, c, oh, ow), fmt=memory_format(cl), cl=cl, grid=None,
                idx_dtype=torch.int64 if return_indices else _index_dtype(kh, kw))
    if n * c * oh * ow == 0:
        return plan
    grid, br, bs, warps = pool_tile(TUNING, n, c, oh, ow, cl, x.device, taps=kh * kw,
                                    element_size=x.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *x.stride()), meta=dict(
        SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, RELU=bool(relu),
        FLAT_INDICES=bool(return_indices), CHECK_BOUNDS=_check_bounds(padding, ceil_mode),
        CHANNELS_LAST=cl,
        INDEX64=needs_index64(x) or dense_needs_index64(n * c * oh * ow), BLOCK_R=br,
        BLOCK_S=bs, num_warps=warps, num_stages=POOL_NUM_STAGES))
    return plan


def _max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                        relu):
    """-> (output, indices, plan); geometry arguments are tuples of two ints."""
    real = is_real(x)
    key = None
    if real:
        key = (x.shape, x.stride(), x.dtype, x.device, kernel_size, stride, padding, dilation,
               ceil_mode, return_indices, relu)
    plan = _PLANS.get(key, lambda: _max_pool2d_plan(x, kernel_size, stride, padding, dilation,
                                                    ceil_mode, return_indices, relu))
    out = alloc(plan["shape"], x.dtype, x.device, plan["fmt"])
    idx = alloc(plan["shape"], plan["idx_dtype"], x.device, plan["fmt"])
    if plan["grid"] is not None:
        run(_max_pool2d_fwd_kernel, plan["grid"], (x, out, idx, *plan["scalars"], *out.stride()),
            plan["meta"], real)
    return out, idx, plan


def _check_bounds(padding, ceil_mode) -> bool:
    # without padding and in floor mode every window lies inside the input
    return bool(padding[0] or padding[1] or ceil_mode)


def _bwd_geometry(input_size, kernel_size, stride, padding, dilation):
    """(cells, (rows, cols) of the grid the backward tiles, NOH, NOW): 2x2-or-smaller cells
    of inputs sharing their candidate windows (strides up to 2), else single inputs."""
    n, c, h, w = input_size
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    noh, now = (kh - 1) * dh // sh + 1, (kw - 1) * dw // sw + 1
    cells = sh <= 2 and sw <= 2
    grid_hw = (cdiv(h + ph, sh), cdiv(w + pw, sw)) if cells else (h, w)
    return cells, grid_hw, noh, now


def _max_pool2d_backward_plan(g, y, indices, input_size, kernel_size, stride, padding,
                              dilation, return_indices, relu, channels_last) -> dict:
    n, c, h, w = input_size
    oh, ow = g.shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    plan = dict(shape=(n, c, h, w), fmt=memory_format(channels_last), grid=None)
    if n * c * h * w == 0:
        return plan
    cells, (gh, gw), noh, now = _bwd_geometry(input_size, kernel_size, stride, padding,
                                              dilation)
    grid, br, bs, warps = pool_tile(TUNING, n, c, gh, gw, channels_last, g.device,
                                    backward=True, taps=noh * now,
                                    element_size=g.element_size(), cell=sh * sw if cells else 1)
    y_strides = y.stride() if y is not None else (0, 0, 0, 0)
    plan.update(grid=grid, kernel=_max_pool2d_bwd_kernel if cells else
                _max_pool2d_bwd_gather_kernel,
                scalars=(n, c, h, w, oh, ow, *((gh, gw) if cells else ()), *g.stride(),
                         *indices.stride(), *y_strides), meta=dict(
        SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, NOH=noh, NOW=now,
        RELU_FROM_OUTPUT=y is not None, FLAT_INDICES=bool(return_indices),
        CHANNELS_LAST=bool(channels_last),
        INDEX64=needs_index64(g, indices, y) or dense_needs_index64(n * c * h * w),
        BLOCK_R=br, BLOCK_S=bs, num_warps=warps, num_stages=POOL_NUM_STAGES))
    return plan


def _max_pool2d_backward(g, output, indices, input_size, kernel_size, stride, padding,
                         dilation, return_indices, relu, channels_last):
    """grad_input of max_pool2d; ``output`` is needed (and read) only for relu with
    return_indices, where the saved flat indices carry no ReLU mask."""
    relu_from_output = bool(relu and return_indices)
    if relu_from_output and output is None:
        raise ValueError("triton_max_pool2d_backward: relu with return_indices needs the "
                         "forward output to mask the gradient")
    y = output if relu_from_output else None
    real = is_real(g)
    key = None
    if real:
        key = (g.shape, g.stride(), g.dtype, g.device, indices.stride(), indices.dtype,
               None if y is None else y.stride(), tuple(input_size), kernel_size, stride,
               padding, dilation, return_indices, relu, channels_last)
    plan = _PLANS.get(key, lambda: _max_pool2d_backward_plan(
        g, y, indices, input_size, kernel_size, stride, padding, dilation, return_indices,
        relu, channels_last))
    dx = alloc(plan["shape"], g.dtype, g.device, plan["fmt"])
    if plan["grid"] is not None:
        run(plan["kernel"], plan["grid"], (g, indices, y, dx, *plan["scalars"], *dx.stride()),
            plan["meta"], real)
    return dx


@define_op("triton_max_pool2d",
           "(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
           "bool ceil_mode, bool return_indices, bool relu) -> (Tensor, Tensor)")
def _max_pool2d_op(input: torch.Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], ceil_mode: bool, return_indices: bool,
                   relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # direct torch.ops calls skip the public layer (whose eager fast path skips this op)
    check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     relu=relu)
    out, idx, _ = _max_pool2d_forward(input, pair(kernel_size), pair(stride), pair(padding),
                                      pair(dilation), bool(ceil_mode), bool(return_indices),
                                      bool(relu))
    return out, idx


@define_op("triton_max_pool2d_backward",
           "(Tensor grad_output, Tensor? output, Tensor indices, int[] input_size, "
           "int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode, "
           "bool return_indices, bool relu, bool channels_last) -> Tensor")
def _max_pool2d_backward_op(grad_output: torch.Tensor, output: Optional[torch.Tensor],
                            indices: torch.Tensor, input_size: List[int], kernel_size: List[int],
                            stride: List[int], padding: List[int], dilation: List[int],
                            ceil_mode: bool, return_indices: bool, relu: bool,
                            channels_last: bool) -> torch.Tensor:
    return _max_pool2d_backward(grad_output, output, indices, tuple(input_size),
                                pair(kernel_size), pair(stride), pair(padding),
                                pair(dilation), bool(return_indices), bool(relu),
                                bool(channels_last))


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu = inputs
    out, idx = output
    # The output is saved only where the mask needs it (torch's indices with relu): saving
    # it otherwise would forbid in-place ops on the pooled tensor for nothing.
    ctx.save_for_backward(out if relu and return_indices else None, idx)
    ctx.args = (tuple(x.shape), pair(kernel_size), pair(stride), pair(padding), pair(dilation),
                bool(ceil_mode), bool(return_indices), bool(relu), dense_channels_last(x))
    ctx.mark_non_differentiable(idx)


def _backward(ctx, grad_out, grad_idx):
    out, idx = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    size, k, s, p, d, ceil_mode, return_indices, relu, cl = ctx.args
    if is_real(grad_out):  # eager: the launcher; tracing: the op, so graphs show it
        gx = _max_pool2d_backward(grad_out, out, idx, size, k, s, p, d, return_indices, relu, cl)
    else:
        gx = torch.ops.fastconv.triton_max_pool2d_backward(
            grad_out, out, idx, list(size), list(k), list(s), list(p), list(d), ceil_mode,
            return_indices, relu, cl)
    return (gx,) + (None,) * 7


_max_pool2d_op.register_autograd(_backward, setup_context=_setup_context)
_MaxPool2dFn = eager_autograd(
    "_MaxPool2dFn", lambda *args: _max_pool2d_forward(*args)[:2], _setup_context, _backward)
declare_kernels({
    "triton_max_pool2d": [_max_pool2d_fwd_kernel],
    "triton_max_pool2d_backward": [_max_pool2d_bwd_kernel, _max_pool2d_bwd_gather_kernel],
})


# --------------------------------------------------------------------------- entry point
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu):
    args = (pair(kernel_size), pair(stride), pair(padding), pair(dilation), bool(ceil_mode),
            bool(return_indices), bool(relu))
    if not eager(input):
        out, idx = torch.ops.fastconv.triton_max_pool2d(input, *[list(a) for a in args[:4]],
                                                        *args[4:])
    elif grad_needed(input):
        out, idx = _MaxPool2dFn.apply(input, *args)
    else:
        out, idx, _ = _max_pool2d_forward(input, *args)
    return (out, idx) if return_indices else out


def why_not_max_pool2d(args) -> Optional[str]:
    return window_why_not(args, "max_pool2d")
