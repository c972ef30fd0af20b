"""Triton max-pool (optionally fused with a preceding ReLU), average pool and adaptive average
pool, forward and backward, registered as ``fastconv::triton_*`` custom ops.

Layouts. Every kernel reads its operands through strides, so any input works without a copy;
the tile shape follows the output's memory format (the input's, as torch chooses it):

* channels_last: a tile is [output pixels (n, oh, ow) x channels]; a row of the tile is
  contiguous, so loads and stores are 16-byte vectors along C.
* NCHW: a program owns one output row ``oh`` of BLOCK_R (n, c) planes; a row of the tile is
  ``ow``, contiguous in the output. Only two integer divisions per tile row, none per element.

Backward passes gather instead of scatter: each input element visits the few outputs whose
window can contain it (``NOH x NOW`` of them: 2x2 for 3/2 windows, 1 for 2/2), so gradients are
written once, deterministically, without atomics or a zero fill.

Max-pool keeps, for the backward, only the window-local argmax ``kh * KW + kw`` as int8 (int32
for windows of more than 127 taps) unless ``return_indices`` asks for torch's int64 flat
indices. With ``relu=True`` a window whose maximum is <= 0 stores -1, so the backward needs
neither the output nor the input to apply the ReLU mask.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

# Elements per program and warps per program for the pool kernels, by device kind. The H100
# sweep (scripts/gpu_pool_bn_sweep.py) overrides these to compare configurations. The
# interpreter runs one program at a time in numpy, so it wants few, large programs.
TUNING = {
    # 1024 / 512 keep the 3x3 kernels at 143 / 62 registers (sm_90 AOT); 2048 spills
    "cuda": {"tile": 1024, "bwd_tile": 512, "max_cols": 64, "nchw_max_cols": 128,
             "num_warps": 4},
    "cpu": {"tile": 8192, "bwd_tile": 8192, "max_cols": 64, "nchw_max_cols": 128,
            "num_warps": 4},
}
# Windows are unrolled at compile time (all their loads in flight at once); beyond this many
# taps adaptive pooling loops at run time instead (a 7x7 window unrolled over a 1024-element
# tile needs 255 registers and a 560-byte stack on sm_90).
MAX_UNROLLED_TAPS = 16
# Unrolled windows shrink the tile so that taps x elements per thread stays in registers.
_TAP_ELEMENTS = 12288
MAX_MAX_POOL_TAPS = 1024
# Tests set these: the 64-bit index path on small tensors, and buffers filled with NaN (or
# an impossible index) when allocated, so an element a kernel forgets to write shows up.
FORCE_INT64_INDEXING = False
POISON_OUTPUTS = False

_INT32_LIMIT = 2**31 - 1
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- shared helpers
# (batchnorm.py imports these too)
def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cols_block(cols: int, cap: int, min_block: int = 1) -> int:
    """Power-of-two block for a row of ``cols`` contiguous elements: among the sizes from
    ``min(next_pow2(cols), min_block)`` to ``cap``, the largest whose masked tail wastes at
    most 5% more lanes than the best (C=96 -> 32, not 64; 56*56 pixels -> 128, not 1024).
    ``min_block`` keeps row segments long enough to fill cache lines."""
    top = min(cap, next_pow2(cols))
    b = min(next_pow2(cols), max(1, min_block), top)
    waste = {}
    while b <= top:
        waste[b] = triton.cdiv(cols, b) * b / cols - 1.0
        b *= 2
    least = min(waste.values())
    return max(b for b, w in waste.items() if w <= least + 0.05)


def is_channels_last(t: torch.Tensor) -> bool:
    """torch's choice of output format: channels_last when ``t`` is strictly channels_last."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    return FORCE_INT64_INDEXING or any(
        t is not None and t.numel() > 0 and _max_offset(t) > _INT32_LIMIT for t in tensors)


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1


def alloc(shape, dtype: torch.dtype, device: torch.device,
          fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    if POISON_OUTPUTS and not _is_fake(t):
        t.fill_(float("nan") if t.is_floating_point() else 99)
    return t


def _is_fake(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(t)


_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` through ``wrap_triton`` so make_fx/torch.compile can trace it.

    The interpreter's kernels cannot be traced (wrap_triton hands them back unwrapped), and
    without ``triton_op`` the op's fake implementation is this same Python function: in those
    cases fake or meta tensors only need their outputs allocated, so nothing is launched.
    """
    traced = _HAS_TRITON_OP and not _interpreted(kernel)
    if not traced and any(isinstance(a, torch.Tensor) and _is_fake(a) for a in args):
        return
    if _HAS_TRITON_OP:
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, **kwargs)


def _interpreted(kernel) -> bool:
    from triton.runtime.jit import JITFunction
    from triton.runtime.autotuner import Autotuner

    return not isinstance(kernel, (JITFunction, Autotuner))


def define_op(name: str, schema: str, mutates_args=()):
    """Register ``fn`` as ``fastconv::<name>``: a triton_op where torch has it, else a
    custom_op whose fake implementation is ``fn`` itself (it launches nothing on fake tensors
    and allocates outputs with their real strides)."""
    qualname = f"fastconv::{name}"

    def deco(fn):
        if _HAS_TRITON_OP:
            return torch.library.triton_op(qualname, fn, mutates_args=mutates_args,
                                           schema=schema)
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, schema=schema)
        op.register_fake(fn)
        return op

    return deco


def device_tuning(device: torch.device, table: dict) -> dict:
    return table["cuda" if device.type == "cuda" else "cpu"]


def common_why_not(x: torch.Tensor, op: str) -> Optional[str]:
    if x.dtype not in _FLOAT_DTYPES:
        return (f"triton {op} supports float16, bfloat16 and float32 inputs, got {x.dtype} "
                "(the torch backend serves it)")
    if x.dim() != 4:
        return f"triton {op} expects a 4D input, got {x.dim()}D"
    n, c, h, w = x.shape
    if n * c > _INT32_LIMIT or n * h * w > _INT32_LIMIT:
        return (f"input {tuple(x.shape)} has more than 2**31-1 planes or pixels, beyond the "
                "kernels' 32-bit tile coordinates")
    return None


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile_coords(pid0, pid1, N, C, OH, OW, CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """(n, c, oh, ow, mask) of this program's tile of an (N, C, OH, OW) grid of positions, each
    broadcastable to [BLOCK_R, BLOCK_S]."""
    r = tl.arange(0, BLOCK_R)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    if CHANNELS_LAST:
        p = pid0 * BLOCK_R + r
        ow = p % OW
        t = p // OW
        oh = t % OH
        n = t // OH
        c = pid1 * BLOCK_S + s
        mask = (p < N * OH * OW) & (c < C)
    else:
        oh = pid0 % OH
        nc = (pid0 // OH) * BLOCK_R + r
        n = nc // C
        c = nc % C
        ow = pid1 * BLOCK_S + s
        mask = (nc < N * C) & (ow < OW)
    if USE_I64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    return n, c, oh, ow, mask


@triton.jit
def _max_pool2d_fwd_kernel(
        x_ptr, y_ptr, idx_ptr,
        N, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        RELU: tl.constexpr, FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
        USE_I64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, oh, ow, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, OH, OW,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
    x_base = x_ptr + n * sxn + c * sxc
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    best = tl.full([BLOCK_R, BLOCK_S], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_R, BLOCK_S], -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DH
        h_ok = (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            ok = mask & h_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=float("-inf"))
            v = v.to(tl.float32)
            # torch's rule: a strictly larger value or any NaN replaces the current pick (so
            # the last NaN wins); the first in-bounds tap is taken even when it is -inf.
            take = ok & ((v > best) | (v != v) | (arg < 0))
            best = tl.where(take, v, best)
            if FLAT_INDICES:
                arg = tl.where(take, ih * W + iw, arg)
            else:
                arg = tl.where(take, kh * KW + kw, arg)
    out = best
    if RELU:
        out = tl.where(best < 0, 0.0, best)  # NaN stays NaN, as torch.relu
        if not FLAT_INDICES:
            arg = tl.where(best <= 0, -1, arg)  # the ReLU blocks this window's gradient
    y_off = n * syn + c * syc + oh * syh + ow * syw
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + y_off, arg.to(idx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(
        g_ptr, idx_ptr, y_ptr, dx_ptr,
        N, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sin, sic, sih, siw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        NOH: tl.constexpr, NOW: tl.constexpr, RELU_FROM_OUTPUT: tl.constexpr,
        FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # the tile covers input positions; each gathers from the windows that can contain it
    n, c, ih, iw, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, H, W,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
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
        ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # ADAPTIVE: windows from adaptive_avg_pool2d's rule; KH/KW bound their sizes and the loops
    # run at run time (windows can be large). Otherwise KH x KW taps are unrolled.
    n, c, oh, ow, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, OH, OW,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
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


@triton.jit
def _avg_pool2d_bwd_kernel(
        g_ptr, dx_ptr,
        N, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, NOH: tl.constexpr, NOW: tl.constexpr,
        COUNT_PAD: tl.constexpr, DIVISOR: tl.constexpr, ADAPTIVE: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, ih, iw, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, H, W,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
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


# --------------------------------------------------------------------------- launch geometry
def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # a window never starts in the right padding
    return out


def _tile(n: int, c: int, oh: int, ow: int, channels_last: bool, device: torch.device,
          backward: bool = False, block_s: Optional[int] = None, taps: int = 1,
          element_size: int = 2):
    """(grid, BLOCK_R, BLOCK_S, num_warps) for an (n, c, oh, ow) grid of positions, each
    loading ``taps`` elements (unrolled) of ``element_size`` bytes."""
    cfg = device_tuning(device, TUNING)
    tile = cfg["bwd_tile" if backward else "tile"]
    if device.type == "cuda":  # tiles are sized for 2-byte dtypes: float32 halves them
        tile = max(32, tile * 2 // element_size)
        tile = min(tile, max(128, 1 << (_TAP_ELEMENTS // taps).bit_length() - 1))
    if channels_last:
        bs = block_s or cols_block(c, cfg["max_cols"], 16)
        br = max(1, min(tile // bs, next_pow2(n * oh * ow)))
        grid = (triton.cdiv(n * oh * ow, br), triton.cdiv(c, bs))
    else:
        bs = block_s or cols_block(ow, cfg["nchw_max_cols"], 32)
        br = max(1, min(tile // bs, next_pow2(n * c)))
        grid = (triton.cdiv(n * c, br) * oh, triton.cdiv(ow, bs))
    return grid, br, bs, cfg["num_warps"]


def _index_dtype(kh: int, kw: int) -> torch.dtype:
    return torch.int8 if kh * kw <= 127 else torch.int32


# --------------------------------------------------------------------------- max_pool2d op
@define_op("triton_max_pool2d",
           "(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
           "bool ceil_mode, bool return_indices, bool relu) -> (Tensor, Tensor)")
def _max_pool2d_op(input: torch.Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], ceil_mode: bool, return_indices: bool,
                   relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = input.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh = _pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = _pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    cl = is_channels_last(input)
    fmt = memory_format(cl)
    out = alloc((n, c, oh, ow), input.dtype, input.device, fmt)
    idx_dtype = torch.int64 if return_indices else _index_dtype(kh, kw)
    idx = alloc((n, c, oh, ow), idx_dtype, input.device, fmt)
    if out.numel() == 0:
        return out, idx
    grid, br, bs, warps = _tile(n, c, oh, ow, cl, input.device, taps=kh * kw,
                                element_size=input.element_size())
    launch(_max_pool2d_fwd_kernel, grid, input, out, idx, n, c, h, w, oh, ow,
           *input.stride(), *out.stride(),
           SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, RELU=bool(relu),
           FLAT_INDICES=bool(return_indices), CHANNELS_LAST=cl,
           USE_I64=needs_int64(input, out), BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
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
    n, c, h, w = input_size
    oh, ow = grad_output.shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    dx = alloc((n, c, h, w), grad_output.dtype, grad_output.device,
               memory_format(channels_last))
    if dx.numel() == 0:
        return dx
    relu_from_output = bool(relu and return_indices)
    if relu_from_output and output is None:
        raise ValueError("triton_max_pool2d_backward: relu with return_indices needs the "
                         "forward output to mask the gradient")
    y = output if relu_from_output else None
    y_strides = y.stride() if y is not None else (0, 0, 0, 0)
    noh, now = (kh - 1) * dh // sh + 1, (kw - 1) * dw // sw + 1
    grid, br, bs, warps = _tile(n, c, h, w, channels_last, dx.device, backward=True,
                                taps=noh * now, element_size=dx.element_size())
    launch(_max_pool2d_bwd_kernel, grid, grad_output, indices, y, dx, n, c, h, w, oh, ow,
           *grad_output.stride(), *indices.stride(), *y_strides, *dx.stride(),
           SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw,
           NOH=noh, NOW=now, RELU_FROM_OUTPUT=relu_from_output, FLAT_INDICES=bool(return_indices),
           CHANNELS_LAST=bool(channels_last), USE_I64=needs_int64(grad_output, indices, dx),
           BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return dx


def _max_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu = inputs
    out, idx = output
    # The output is saved only where the mask needs it (torch's indices with relu): saving
    # it otherwise would forbid in-place ops on the pooled tensor for nothing.
    keep_out = relu and return_indices
    ctx.save_for_backward(out if keep_out else None, idx)
    ctx.args = (list(x.shape), list(kernel_size), list(stride), list(padding), list(dilation),
                ceil_mode, return_indices, relu, is_channels_last(x))
    ctx.mark_non_differentiable(idx)


def _max_pool2d_backward(ctx, grad_out, grad_idx):
    out, idx = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    gx = torch.ops.fastconv.triton_max_pool2d_backward(grad_out, out, idx, *ctx.args)
    return (gx,) + (None,) * 7


_max_pool2d_op.register_autograd(_max_pool2d_backward, setup_context=_max_pool2d_setup)


# --------------------------------------------------------------------------- avg pools
def _avg_launch_args(kernel_size, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, KH=kh, KW=kw)


def _avg_forward(input, oh, ow, geom, count_include_pad, divisor, adaptive):
    n, c, h, w = input.shape
    cl = is_channels_last(input)
    out = alloc((n, c, oh, ow), input.dtype, input.device, memory_format(cl))
    if out.numel() == 0:
        return out
    taps = 1 if adaptive else geom["KH"] * geom["KW"]
    grid, br, bs, warps = _tile(n, c, oh, ow, cl, input.device, taps=taps,
                                element_size=input.element_size())
    launch(_avg_pool2d_fwd_kernel, grid, input, out, n, c, h, w, oh, ow,
           *input.stride(), *out.stride(), **geom, COUNT_PAD=bool(count_include_pad),
           DIVISOR=int(divisor or 0), ADAPTIVE=adaptive, CHANNELS_LAST=cl,
           USE_I64=needs_int64(input, out), BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return out


def _avg_backward(grad_output, input_size, geom, noh, now, count_include_pad, divisor,
                  adaptive, channels_last):
    n, c, h, w = input_size
    oh, ow = grad_output.shape[2:]
    dx = alloc((n, c, h, w), grad_output.dtype, grad_output.device,
               memory_format(channels_last))
    if dx.numel() == 0:
        return dx
    grid, br, bs, warps = _tile(n, c, h, w, channels_last, dx.device, backward=True,
                                taps=noh * now, element_size=dx.element_size())
    launch(_avg_pool2d_bwd_kernel, grid, grad_output, dx, n, c, h, w, oh, ow,
           *grad_output.stride(), *dx.stride(), **geom, NOH=noh, NOW=now,
           COUNT_PAD=bool(count_include_pad), DIVISOR=int(divisor or 0), ADAPTIVE=adaptive,
           CHANNELS_LAST=bool(channels_last), USE_I64=needs_int64(grad_output, dx),
           BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return dx


@define_op("triton_avg_pool2d",
           "(Tensor input, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, "
           "bool count_include_pad, int? divisor_override) -> Tensor")
def _avg_pool2d_op(input: torch.Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], ceil_mode: bool, count_include_pad: bool,
                   divisor_override: Optional[int]) -> torch.Tensor:
    h, w = input.shape[2:]
    oh = _pool_out_size(h, kernel_size[0], stride[0], padding[0], 1, ceil_mode)
    ow = _pool_out_size(w, kernel_size[1], stride[1], padding[1], 1, ceil_mode)
    return _avg_forward(input, oh, ow, _avg_launch_args(kernel_size, stride, padding),
                        count_include_pad, divisor_override, False)


@define_op("triton_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, int[] kernel_size, int[] stride, "
           "int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, "
           "bool channels_last) -> Tensor")
def _avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                            kernel_size: List[int], stride: List[int], padding: List[int],
                            ceil_mode: bool, count_include_pad: bool,
                            divisor_override: Optional[int], channels_last: bool) -> torch.Tensor:
    noh = (kernel_size[0] - 1) // stride[0] + 1
    now = (kernel_size[1] - 1) // stride[1] + 1
    return _avg_backward(grad_output, input_size,
                         _avg_launch_args(kernel_size, stride, padding), noh, now,
                         count_include_pad, divisor_override, False, channels_last)


def _avg_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = inputs
    ctx.args = (list(x.shape), list(kernel_size), list(stride), list(padding), ceil_mode,
                count_include_pad, divisor_override, is_channels_last(x))


def _avg_pool2d_backward(ctx, grad_out):
    gx = torch.ops.fastconv.triton_avg_pool2d_backward(grad_out, *ctx.args)
    return (gx,) + (None,) * 6


_avg_pool2d_op.register_autograd(_avg_pool2d_backward, setup_context=_avg_pool2d_setup)


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


@define_op("triton_adaptive_avg_pool2d", "(Tensor input, int[] output_size) -> Tensor")
def _adaptive_avg_pool2d_op(input: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    h, w = input.shape[2:]
    oh, ow = output_size
    adaptive, geom, _, _ = _adaptive_geometry(h, w, oh, ow)
    return _avg_forward(input, oh, ow, geom, True, None, adaptive)


@define_op("triton_adaptive_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, bool channels_last) -> Tensor")
def _adaptive_avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                                     channels_last: bool) -> torch.Tensor:
    h, w = input_size[2:]
    oh, ow = grad_output.shape[2:]
    adaptive, geom, noh, now = _adaptive_geometry(h, w, oh, ow)
    return _avg_backward(grad_output, input_size, geom, noh, now, True, None, adaptive,
                         channels_last)


def _adaptive_setup(ctx, inputs, output):
    x, _ = inputs
    ctx.args = (list(x.shape), is_channels_last(x))


def _adaptive_backward(ctx, grad_out):
    return torch.ops.fastconv.triton_adaptive_avg_pool2d_backward(grad_out, *ctx.args), None


_adaptive_avg_pool2d_op.register_autograd(_adaptive_backward, setup_context=_adaptive_setup)


# --------------------------------------------------------------------------- backend entry points
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu):
    out, idx = torch.ops.fastconv.triton_max_pool2d(
        input, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode),
        bool(return_indices), bool(relu))
    return (out, idx) if return_indices else out


def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    return torch.ops.fastconv.triton_avg_pool2d(
        input, list(kernel_size), list(stride), list(padding), bool(ceil_mode),
        bool(count_include_pad), divisor_override)


def adaptive_avg_pool2d(input, output_size):
    return torch.ops.fastconv.triton_adaptive_avg_pool2d(input, list(output_size))


def _geometry_why_not(args, op) -> Optional[str]:
    x = args["input"]
    reason = common_why_not(x, op)
    if reason:
        return reason
    return None


def why_not_max_pool2d(args) -> Optional[str]:
    reason = _geometry_why_not(args, "max_pool2d")
    if reason:
        return reason
    kh, kw = args["kernel_size"]
    if kh * kw > MAX_MAX_POOL_TAPS:
        return (f"triton max_pool2d unrolls its window at compile time; kernel_size {(kh, kw)} "
                f"has {kh * kw} taps > {MAX_MAX_POOL_TAPS}")
    return None


def why_not_avg_pool2d(args) -> Optional[str]:
    reason = _geometry_why_not(args, "avg_pool2d")
    if reason:
        return reason
    kh, kw = args["kernel_size"]
    if kh * kw > MAX_MAX_POOL_TAPS:
        return (f"triton avg_pool2d unrolls its window at compile time; kernel_size {(kh, kw)} "
                f"has {kh * kw} taps > {MAX_MAX_POOL_TAPS}")
    d = args.get("divisor_override")
    if d is not None and abs(int(d)) > _INT32_LIMIT:
        return f"divisor_override {d} does not fit in 32 bits"
    return None


def why_not_adaptive_avg_pool2d(args) -> Optional[str]:
    return _geometry_why_not(args, "adaptive_avg_pool2d")


# --------------------------------------------------------------------------- ahead of time
def aot_specs():
    """Configurations the H100 runs most: the AlexNet/VGG/ResNet pools in bf16 (and fp32),
    channels_last and NCHW, forward and backward, tiled as the launchers above tile them."""
    from .aot import KernelSpec

    dev = torch.device("cuda")
    i32 = lambda *names: {a: "i32" for a in names}  # noqa: E731
    dims = i32("N", "C", "H", "W", "OH", "OW")
    specs = []
    geoms = [("3/2", (3, 3), (2, 2), (0, 0)), ("2/2", (2, 2), (2, 2), (0, 0)),
             ("3/2/1", (3, 3), (2, 2), (1, 1)), ("3/1/1", (3, 3), (1, 1), (1, 1))]
    for ty, esize in (("bf16", 2), ("fp32", 4)):
        for cl in (True, False):
            layout = "NHWC" if cl else "NCHW"
            for name, k, s, p in geoms:
                # main (compiled by tests/test_triton_aot.py): the bf16 fused-ReLU training
                # kernels of AlexNet's 3/2 pool (both layouts) and VGG's 2/2 (channels_last)
                main = ty == "bf16" and (name == "3/2" or (name == "2/2" and cl))
                noh, now = (k[0] - 1) // s[0] + 1, (k[1] - 1) // s[1] + 1
                # AlexNet's first pool: 96 channels, 54x54 -> 26x26
                _, br, bs, warps = _tile(128, 96, 26, 26, cl, dev, taps=k[0] * k[1],
                                         element_size=esize)
                _, bbr, bbs, bwarps = _tile(128, 96, 54, 54, cl, dev, backward=True,
                                            taps=noh * now, element_size=esize)
                geo = dict(SH=s[0], SW=s[1], PH=p[0], PW=p[1], KH=k[0], KW=k[1])
                for relu, flat in ((True, False), (False, True)):
                    idx_ty = "*i64" if flat else "*i8"
                    tag = f"{name} {ty} {layout} relu={relu} flat={flat}"
                    specs.append(KernelSpec(
                        name=f"max_pool2d_fwd {tag}", kernel=_max_pool2d_fwd_kernel,
                        signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "idx_ptr": idx_ty,
                                   **dims, **i32("sxn", "sxc", "sxh", "sxw",
                                                 "syn", "syc", "syh", "syw")},
                        constexprs=dict(geo, DH=1, DW=1, RELU=relu, FLAT_INDICES=flat,
                                        CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=br,
                                        BLOCK_S=bs),
                        num_warps=warps, num_stages=1, main=main and relu))
                    specs.append(KernelSpec(
                        name=f"max_pool2d_bwd {tag}", kernel=_max_pool2d_bwd_kernel,
                        signature={"g_ptr": f"*{ty}", "idx_ptr": idx_ty, "y_ptr": f"*{ty}",
                                   "dx_ptr": f"*{ty}", **dims,
                                   **i32("sgn", "sgc", "sgh", "sgw", "sin", "sic", "sih",
                                         "siw", "syn", "syc", "syh", "syw", "sdn", "sdc",
                                         "sdh", "sdw")},
                        constexprs=dict(geo, DH=1, DW=1, NOH=noh, NOW=now,
                                        RELU_FROM_OUTPUT=relu and flat, FLAT_INDICES=flat,
                                        CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=bbr,
                                        BLOCK_S=bbs),
                        num_warps=bwarps, num_stages=1, main=main and relu))
            # LeNet's 2x2 average pool, and global average pooling 7x7 -> 1 (run-time loops)
            for name, geo, adaptive, size, out in (
                    ("avg_pool2d 2/2", dict(SH=2, SW=2, PH=0, PW=0, KH=2, KW=2), False, 28, 14),
                    ("adaptive_avg_pool2d 7x7->1", dict(SH=1, SW=1, PH=0, PW=0, KH=7, KW=7),
                     True, 7, 1)):
                taps = 1 if adaptive else geo["KH"] * geo["KW"]
                _, br, bs, warps = _tile(128, 512, out, out, cl, dev, taps=taps,
                                         element_size=esize)
                _, bbr, bbs, bwarps = _tile(128, 512, size, size, cl, dev, backward=True,
                                            element_size=esize)
                consts = dict(geo, COUNT_PAD=True, DIVISOR=0, ADAPTIVE=adaptive,
                              CHANNELS_LAST=cl, USE_I64=False)
                specs.append(KernelSpec(
                    name=f"{name} fwd {ty} {layout}", kernel=_avg_pool2d_fwd_kernel,
                    signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", **dims,
                               **i32("sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw")},
                    constexprs=dict(consts, BLOCK_R=br, BLOCK_S=bs),
                    num_warps=warps, num_stages=1, main=False))
                specs.append(KernelSpec(
                    name=f"{name} bwd {ty} {layout}", kernel=_avg_pool2d_bwd_kernel,
                    signature={"g_ptr": f"*{ty}", "dx_ptr": f"*{ty}", **dims,
                               **i32("sgn", "sgc", "sgh", "sgw", "sdn", "sdc", "sdh", "sdw")},
                    constexprs=dict(consts, NOH=1, NOW=1, BLOCK_R=bbr, BLOCK_S=bbs),
                    num_warps=bwarps, num_stages=1, main=False))
    return specs
