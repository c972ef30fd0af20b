"""Triton average pool and adaptive average pool, forward and backward, registered as
``fastconv::triton_avg_pool2d`` and ``fastconv::triton_adaptive_avg_pool2d`` (+ ``_backward``)
custom ops. Both run the same two kernels: adaptive windows are computed in-kernel
(``ADAPTIVE``), or, when every window has the same size, served as a plain average pool.

Tiles follow the output's memory format (``utils.tile_coords``); the backward gathers each
input's gradient from the few windows that contain it, written once without atomics. Host
path and plans as in max_pool2d.py.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ...checks import check_adaptive_avg_pool2d, check_avg_pool2d
from ...shapes import dense_channels_last, memory_format, pool_output_size
from . import utils
from .autotune import load_tuning, tuning_state
from .utils import (INT32_LIMIT, POOL_NUM_STAGES, PlanCache, alloc, common_why_not,
                    declare_kernels, define_op, dense_needs_index64, eager, eager_autograd,
                    grad_needed, is_real, needs_index64, pair, pool_tile, run,
                    tile_coords, window_why_not)

# Tile sizes by device kind (avg_pool2d_configs.json); sweeps edit this dict in place.
TUNING = load_tuning("avg_pool2d")
# Windows are unrolled at compile time (all their loads in flight at once); beyond this many
# taps adaptive pooling loops at run time instead (a 7x7 window unrolled over a 1024-element
# tile needs 255 registers and a 560-byte stack on sm_90).
MAX_UNROLLED_TAPS = 16


# --------------------------------------------------------------------------- kernels
@triton.jit
def _avg_bounds(o, I, O, S: tl.constexpr, P: tl.constexpr, K: tl.constexpr,
                ADAPTIVE: tl.constexpr):
    """Window of output ``o`` along one axis: (first index, clipped end, size with padding),
    as torch's avg_pool2d / adaptive_avg_pool2d define it (the first index may be < 0)."""
    if ADAPTIVE:
        start = (o * I) // O
        end = ((o + 1) * I + O - 1) // O
        size = end - start
    else:
        start = o * S - P
        end_pad = tl.minimum(start + K, I + P)
        end = tl.minimum(end_pad, I)
        size = end_pad - start
    return start, end, size


@triton.jit
def _avg_divisor(hs, he, hsize, ws, we, wsize, COUNT_PAD: tl.constexpr,
                 DIVISOR: tl.constexpr):
    if DIVISOR != 0:
        d = tl.zeros_like(hsize * wsize) + DIVISOR
    elif COUNT_PAD:
        d = hsize * wsize
    else:
        d = (he - tl.maximum(hs, 0)) * (we - tl.maximum(ws, 0))
    return d.to(tl.float32)


@triton.jit
def _avg_pool2d_fwd_kernel(
        x_ptr, y_ptr,
        N, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr, DIVISOR: tl.constexpr,
        ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # ADAPTIVE: windows from adaptive_avg_pool2d's rule; KH/KW bound their sizes and the loops
    # run at run time (windows can be large). Otherwise KH x KW taps are unrolled.
    n, c, oh, ow, mask = tile_coords(tl.program_id(0), tl.program_id(1), N, C, OH, OW,
                                     CHANNELS_LAST, INDEX64, BLOCK_R, BLOCK_S)
    x_base = x_ptr + n * sxn + c * sxc
    hs, he, hsize = _avg_bounds(oh, H, OH, SH, PH, KH, ADAPTIVE)
    ws, we, wsize = _avg_bounds(ow, W, OW, SW, PW, KW, ADAPTIVE)
    acc = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    if ADAPTIVE:
        for kh in range(KH):
            ih = hs + kh
            h_ok = ih < he
            for kw in range(KW):
                iw = ws + kw
                ok = mask & h_ok & (iw < we)
                acc += tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
    else:
        for kh in tl.static_range(KH):
            ih = hs + kh
            h_ok = (ih >= 0) & (ih < he)
            for kw in tl.static_range(KW):
                iw = ws + kw
                ok = mask & h_ok & (iw >= 0) & (iw < we)
                acc += tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
    div = _avg_divisor(hs, he, hsize, ws, we, wsize, COUNT_PAD, DIVISOR)
    out = acc / tl.where(mask, div, 1.0)  # lanes past the edge may have empty windows
    tl.store(y_ptr + n * syn + c * syc + oh * syh + ow * syw, out.to(y_ptr.dtype.element_ty),
             mask=mask)


# Its argument list mirrors the forward's (same geometry constexprs), as the launchers pass them.
@triton.jit
def _avg_pool2d_bwd_kernel(
        g_ptr, dx_ptr,
        N, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, NOH: tl.constexpr, NOW: tl.constexpr,
        COUNT_PAD: tl.constexpr, DIVISOR: tl.constexpr, ADAPTIVE: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, ih, iw, mask = tile_coords(tl.program_id(0), tl.program_id(1), N, C, H, W,
                                     CHANNELS_LAST, INDEX64, BLOCK_R, BLOCK_S)
    g_base = g_ptr + n * sgn + c * sgc
    # the outputs whose windows hold ih: [oh_first, oh_first + NOH) intersected with a test
    if ADAPTIVE:
        oh_first = (ih * OH) // H
        oh_end = ((ih + 1) * OH + H - 1) // H
        ow_first = (iw * OW) // W
        ow_end = ((iw + 1) * OW + W - 1) // W
    else:
        oh_first = (ih + PH) // SH - (NOH - 1)
        ow_first = (iw + PW) // SW - (NOW - 1)
    acc = tl.zeros([BLOCK_R, BLOCK_S], tl.float32)
    for j in tl.static_range(NOH):
        oh = oh_first + j
        if ADAPTIVE:
            h_ok = oh < oh_end
        else:
            h_ok = (oh >= 0) & (oh < OH) & (ih + PH - oh * SH < KH)
        hs, he, hsize = _avg_bounds(oh, H, OH, SH, PH, KH, ADAPTIVE)
        for k in tl.static_range(NOW):
            ow = ow_first + k
            if ADAPTIVE:
                ok = mask & h_ok & (ow < ow_end)
            else:
                ok = mask & h_ok & (ow >= 0) & (ow < OW) & (iw + PW - ow * SW < KW)
            ws, we, wsize = _avg_bounds(ow, W, OW, SW, PW, KW, ADAPTIVE)
            g = tl.load(g_base + oh * sgh + ow * sgw, mask=ok, other=0.0).to(tl.float32)
            div = _avg_divisor(hs, he, hsize, ws, we, wsize, COUNT_PAD, DIVISOR)
            acc += g / tl.where(ok, div, 1.0)  # masked candidates may have empty windows
    tl.store(dx_ptr + n * sdn + c * sdc + ih * sdh + iw * sdw, acc.to(dx_ptr.dtype.element_ty),
             mask=mask)

# --------------------------------------------------------------------------- launchers
_PLANS = PlanCache(lambda: (tuning_state(TUNING), utils.FORCE_INDEX64))


def _avg_geometry(kernel_size, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, KH=kh, KW=kw)


def _adaptive_plan(size: int, out: int):
    """How adaptive pooling runs along one axis: ("fixed", k) when every window is the same
    k = size / out (then it is plain average pooling with stride k), else ("adaptive",
    largest window, most windows holding one input element)."""
    if size % out == 0:
        return ("fixed", size // out)
    starts = [(o * size) // out for o in range(out)]
    ends = [-(-((o + 1) * size) // out) for o in range(out)]
    kmax = max(e - s for s, e in zip(starts, ends))
    covers = max(-(-((i + 1) * out) // size) - (i * out) // size for i in range(size))
    return ("adaptive", kmax, covers)


def _adaptive_geometry(h, w, oh, ow):
    ph, pw = _adaptive_plan(h, oh), _adaptive_plan(w, ow)
    if ph[0] == pw[0] == "fixed" and ph[1] * pw[1] <= MAX_UNROLLED_TAPS:
        k = (ph[1], pw[1])
        return False, dict(SH=k[0], SW=k[1], PH=0, PW=0, KH=k[0], KW=k[1]), 1, 1
    # a "fixed" axis is also served by the adaptive windows (all of size k, one per input)
    noh = ph[2] if ph[0] == "adaptive" else 1
    now = pw[2] if pw[0] == "adaptive" else 1
    return True, dict(SH=1, SW=1, PH=0, PW=0, KH=ph[1], KW=pw[1]), noh, now


def _forward_plan(x, oh, ow, geom, count_include_pad, divisor, adaptive) -> dict:
    n, c, h, w = x.shape
    cl = dense_channels_last(x)
    plan = dict(shape=(n, c, oh, ow), fmt=memory_format(cl), cl=cl, grid=None)
    if n * c * oh * ow == 0:
        return plan
    taps = 1 if adaptive else geom["KH"] * geom["KW"]
    grid, br, bs, warps = pool_tile(TUNING, n, c, oh, ow, cl, x.device, taps=taps,
                                    element_size=x.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *x.stride()), meta=dict(
        geom, COUNT_PAD=bool(count_include_pad), DIVISOR=int(divisor or 0), ADAPTIVE=adaptive,
        CHANNELS_LAST=cl, INDEX64=needs_index64(x) or dense_needs_index64(n * c * oh * ow),
        BLOCK_R=br, BLOCK_S=bs, num_warps=warps, num_stages=POOL_NUM_STAGES))
    return plan


def _launch(kernel, t, key, build):
    """Run ``kernel`` (forward or backward) on ``t`` (input or grad_output) with the plan that
    ``build`` makes for ``key``; -> the new tensor it writes."""
    real = is_real(t)
    plan = _PLANS.get((t.shape, t.stride(), t.dtype, t.device) + key if real else None, build)
    out = alloc(plan["shape"], t.dtype, t.device, plan["fmt"])
    if plan["grid"] is not None:
        run(kernel, plan["grid"], (t, out, *plan["scalars"], *out.stride()), plan["meta"], real)
    return out


def _backward_plan(g, input_size, geom, noh, now, count_include_pad, divisor, adaptive,
                   channels_last) -> dict:
    n, c, h, w = input_size
    oh, ow = g.shape[2:]
    plan = dict(shape=(n, c, h, w), fmt=memory_format(channels_last), grid=None)
    if n * c * h * w == 0:
        return plan
    grid, br, bs, warps = pool_tile(TUNING, n, c, h, w, channels_last, g.device,
                                    backward=True, taps=noh * now,
                                    element_size=g.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *g.stride()), meta=dict(
        geom, NOH=noh, NOW=now, COUNT_PAD=bool(count_include_pad), DIVISOR=int(divisor or 0),
        ADAPTIVE=adaptive, CHANNELS_LAST=bool(channels_last),
        INDEX64=needs_index64(g) or dense_needs_index64(n * c * h * w), BLOCK_R=br, BLOCK_S=bs,
        num_warps=warps, num_stages=POOL_NUM_STAGES))
    return plan


def _avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override):
    def build():
        h, w = x.shape[2:]
        oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], 1, ceil_mode)
        ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], 1, ceil_mode)
        return _forward_plan(x, oh, ow, _avg_geometry(kernel_size, stride, padding),
                             count_include_pad, divisor_override, False)

    key = ("avg", kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _launch(_avg_pool2d_fwd_kernel, x, key, build)


def _avg_pool2d_backward(g, input_size, kernel_size, stride, padding, count_include_pad,
                         divisor_override, channels_last):
    def build():
        noh = (kernel_size[0] - 1) // stride[0] + 1
        now = (kernel_size[1] - 1) // stride[1] + 1
        return _backward_plan(g, input_size, _avg_geometry(kernel_size, stride, padding),
                              noh, now, count_include_pad, divisor_override, False,
                              channels_last)

    key = ("avgb", input_size, kernel_size, stride, padding, count_include_pad,
           divisor_override, channels_last)
    return _launch(_avg_pool2d_bwd_kernel, g, key, build)


def _adaptive_forward(x, output_size):
    def build():
        h, w = x.shape[2:]
        adaptive, geom, _, _ = _adaptive_geometry(h, w, *output_size)
        return _forward_plan(x, *output_size, geom, True, None, adaptive)

    return _launch(_avg_pool2d_fwd_kernel, x, ("adaptive", output_size), build)


def _adaptive_backward(g, input_size, channels_last):
    def build():
        h, w = input_size[2:]
        adaptive, geom, noh, now = _adaptive_geometry(h, w, *g.shape[2:])
        return _backward_plan(g, input_size, geom, noh, now, True, None, adaptive,
                              channels_last)

    return _launch(_avg_pool2d_bwd_kernel, g, ("adaptiveb", input_size, channels_last), build)


# --------------------------------------------------------------------------- avg_pool2d op
@define_op("triton_avg_pool2d",
           "(Tensor input, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, "
           "bool count_include_pad, int? divisor_override) -> Tensor")
def _avg_pool2d_op(input: torch.Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], ceil_mode: bool, count_include_pad: bool,
                   divisor_override: Optional[int]) -> torch.Tensor:
    # direct torch.ops calls skip the public layer (whose eager fast path skips this op)
    check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)
    return _avg_pool2d_forward(input, pair(kernel_size), pair(stride), pair(padding),
                               bool(ceil_mode), bool(count_include_pad), divisor_override)


@define_op("triton_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, int[] kernel_size, int[] stride, "
           "int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, "
           "bool channels_last) -> Tensor")
def _avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                            kernel_size: List[int], stride: List[int], padding: List[int],
                            ceil_mode: bool, count_include_pad: bool,
                            divisor_override: Optional[int], channels_last: bool) -> torch.Tensor:
    return _avg_pool2d_backward(grad_output, tuple(input_size), pair(kernel_size),
                                pair(stride), pair(padding), bool(count_include_pad),
                                divisor_override, bool(channels_last))


def _avg_pool2d_setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = inputs
    ctx.args = (tuple(x.shape), pair(kernel_size), pair(stride), pair(padding), bool(ceil_mode),
                bool(count_include_pad), divisor_override, dense_channels_last(x))


def _avg_pool2d_backward_formula(ctx, grad_out):
    size, k, s, p, ceil_mode, count_include_pad, divisor, cl = ctx.args
    if is_real(grad_out):  # eager: the launcher; tracing: the op, so graphs show it
        gx = _avg_pool2d_backward(grad_out, size, k, s, p, count_include_pad, divisor, cl)
    else:
        gx = torch.ops.fastconv.triton_avg_pool2d_backward(
            grad_out, list(size), list(k), list(s), list(p), ceil_mode, count_include_pad,
            divisor, cl)
    return (gx,) + (None,) * 6


_avg_pool2d_op.register_autograd(_avg_pool2d_backward_formula,
                                 setup_context=_avg_pool2d_setup_context)
_AvgPool2dFn = eager_autograd("_AvgPool2dFn", _avg_pool2d_forward,
                              _avg_pool2d_setup_context, _avg_pool2d_backward_formula)


# --------------------------------------------------------------------------- adaptive op
@define_op("triton_adaptive_avg_pool2d", "(Tensor input, int[] output_size) -> Tensor")
def _adaptive_avg_pool2d_op(input: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    check_adaptive_avg_pool2d(input, output_size)
    return _adaptive_forward(input, pair(output_size))


@define_op("triton_adaptive_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, bool channels_last) -> Tensor")
def _adaptive_avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                                     channels_last: bool) -> torch.Tensor:
    return _adaptive_backward(grad_output, tuple(input_size), bool(channels_last))


def _adaptive_setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.args = (tuple(x.shape), dense_channels_last(x))


def _adaptive_backward_formula(ctx, grad_out):
    size, cl = ctx.args
    if is_real(grad_out):
        return _adaptive_backward(grad_out, size, cl), None
    return torch.ops.fastconv.triton_adaptive_avg_pool2d_backward(grad_out, list(size), cl), None


_adaptive_avg_pool2d_op.register_autograd(_adaptive_backward_formula,
                                          setup_context=_adaptive_setup_context)
_AdaptiveAvgPool2dFn = eager_autograd("_AdaptiveAvgPool2dFn", _adaptive_forward,
                                      _adaptive_setup_context, _adaptive_backward_formula)
declare_kernels({
    "triton_avg_pool2d": [_avg_pool2d_fwd_kernel],
    "triton_avg_pool2d_backward": [_avg_pool2d_bwd_kernel],
    "triton_adaptive_avg_pool2d": [_avg_pool2d_fwd_kernel],
    "triton_adaptive_avg_pool2d_backward": [_avg_pool2d_bwd_kernel],
})


# --------------------------------------------------------------------------- entry points
def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    args = (pair(kernel_size), pair(stride), pair(padding), bool(ceil_mode),
            bool(count_include_pad), None if divisor_override is None else int(divisor_override))
    if not eager(input):
        return torch.ops.fastconv.triton_avg_pool2d(input, *[list(a) for a in args[:3]],
                                                    *args[3:])
    if grad_needed(input):
        return _AvgPool2dFn.apply(input, *args)
    return _avg_pool2d_forward(input, *args)


def adaptive_avg_pool2d(input, output_size):
    size = pair(output_size)
    if not eager(input):
        return torch.ops.fastconv.triton_adaptive_avg_pool2d(input, list(size))
    if grad_needed(input):
        return _AdaptiveAvgPool2dFn.apply(input, size)
    return _adaptive_forward(input, size)


def why_not_avg_pool2d(args) -> Optional[str]:
    reason = window_why_not(args, "avg_pool2d")
    if reason:
        return reason
    d = args.get("divisor_override")
    if d is not None and abs(int(d)) > INT32_LIMIT:
        return f"divisor_override {d} does not fit in 32 bits"
    return None


def why_not_adaptive_avg_pool2d(args) -> Optional[str]:
    return common_why_not(args["input"], "adaptive_avg_pool2d")
