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

Host path. The first H100 sweep showed small layers costing 0.2-1.5 ms whatever their size:
host time, mostly the custom-op dispatcher (~120 us per ``triton_op`` call, twice more through
``register_autograd``). So, as the conv does, an eager call (real tensors, not compiling) runs
the launchers directly under a ``torch.autograd.Function``; only tracing and torch.compile go
through the registered ops, whose bodies call the same launchers. Everything a launch derives
from shapes, strides, dtype and flags (output shape, grid, tiles, constexprs, scalars) is a
plan cached per such key, so a call is: look up the plan, allocate outputs, launch once.
"""
from typing import Any, Callable, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...checks import check_adaptive_avg_pool2d, check_avg_pool2d, check_max_pool2d

# Elements per program and warps per program for the pool kernels, by device kind. An H100
# sweep chose them (the former scripts/gpu_pool_bn_sweep.py). The
# interpreter runs one program at a time in numpy, so it wants few, large programs.
TUNING = {
    # bf16 3x3/2 with these tiles (sm_90 AOT): forward 53 registers, backward (2x2 cells,
    # bwd_tile counts input elements) 40; no spills
    "cuda": {"tile": 1024, "bwd_tile": 2048, "max_cols": 64, "nchw_max_cols": 128,
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
# No loop in these kernels pipelines; 1 keeps the compile (and the AOT specs) honest
NUM_STAGES = 1
# Tests set these: the 64-bit index path on small tensors, and buffers filled with NaN (or
# an impossible index) when allocated, so an element a kernel forgets to write shows up.
FORCE_INT64_INDEXING = False
POISON_OUTPUTS = False

_INT32_LIMIT = 2**31 - 1
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- shared helpers
# (batchnorm.py imports these too)
def cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a JIT function in Triton 3.8, ~4 us per host call
    return -(-a // b)


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
        waste[b] = cdiv(cols, b) * b / cols - 1.0
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


def dense_needs_int64(numel: int) -> bool:
    """needs_int64 for a tensor allocated dense (in either memory format) by the caller."""
    return FORCE_INT64_INDEXING or numel > _INT32_LIMIT


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


def is_real(t: Optional[torch.Tensor]) -> bool:
    """False for fake, functional (torch.compile tracing) and meta tensors: no data to run on."""
    if t is None:
        return True
    if type(t) is torch.Tensor:  # fast path: fake and functional tensors are subclasses
        return t.device.type != "meta" and not torch._is_functional_tensor(t)
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return not (is_fake(t) or isinstance(t, FunctionalTensor) or t.device.type == "meta")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def eager(t: torch.Tensor) -> bool:
    """True when a backend entry point may skip the custom ops and launch directly: real
    tensors, not under torch.compile (which must see the registered ops)."""
    return not _is_compiling() and is_real(t)


def grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def run(kernel, grid, args: tuple, meta: dict, real: bool) -> None:
    """Launch ``kernel[grid](*args, **meta)`` now (real tensors), or record it for the
    compiler through ``wrap_triton`` (fake/functional tensors while tracing).

    The interpreter's kernels cannot be traced (wrap_triton hands them back unwrapped), and
    without ``triton_op`` the op's fake implementation is this same Python code: in those
    cases fake or meta tensors only need their outputs allocated, so nothing is launched.
    """
    if real:
        kernel[grid](*args, **meta)  # what triton_op does in eager mode, minus the dispatcher
    elif _HAS_TRITON_OP and not _interpreted(kernel):
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _interpreted(kernel) -> bool:
    from triton.runtime.jit import JITFunction
    from triton.runtime.autotuner import Autotuner

    return not isinstance(kernel, (JITFunction, Autotuner))


class PlanCache:
    """Launch plans (grid, tiles, constexprs, scalar arguments) per key of shapes, strides,
    dtype, device and flags. ``state()`` returns the module settings plans depend on (tuning
    tables, test switches); when it changes, every plan is dropped."""

    _MAX = 4096

    def __init__(self, state: Callable[[], Any]):
        self._state_fn = state
        self._state: Any = None
        self._plans: dict = {}

    def get(self, key: Optional[tuple], build: Callable[[], dict]) -> dict:
        """The plan for ``key``; ``key=None`` (symbolic shapes while tracing) builds afresh."""
        if key is None:
            return build()
        state = self._state_fn()
        if state != self._state:
            self._plans.clear()
            self._state = state
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self._MAX:
                self._plans.clear()
            plan = self._plans[key] = build()
        return plan

    def clear(self) -> None:
        self._plans.clear()


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


def declare_kernels(table: dict) -> None:
    """Name the kernels each op launches for AOTAutograd's cache key (torch finds them by
    reading ``wrap_triton(<global>)`` calls in the op body; ours launch through ``run``).
    Best effort: a private registry."""
    try:
        from torch._library import triton as lib
        from triton.runtime.jit import JITFunction

        registry = getattr(lib, "triton_ops_to_kernels", None)
        if isinstance(registry, dict):
            for name, kernels in table.items():
                if all(isinstance(k, JITFunction) for k in kernels):
                    registry[f"fastconv::{name}"] = list(kernels)
    except Exception:
        pass


def device_tuning(device: torch.device, table: dict) -> dict:
    return table["cuda" if device.type == "cuda" else "cpu"]


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for planning a CUDA launch without one)."""
    key = (device.type, device.index)
    if key not in _SMS:
        if device.type == "cuda" and torch.cuda.is_available():
            _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            _SMS[key] = 132 if device.type == "cuda" else 1  # an H100, for AOT planning
    return _SMS[key]


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
def _first_tap(i0, D: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    """Index of the first tap of a window starting at ``i0`` that lies at or after 0."""
    if CHECK_BOUNDS:
        return tl.maximum((-i0 + D - 1) // D, 0)
    else:
        return tl.zeros_like(i0)


@triton.jit
def _max_pool2d_fwd_kernel(
        x_ptr, y_ptr, idx_ptr,
        N, C, H, W, OH, OW,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        RELU: tl.constexpr, FLAT_INDICES: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr):
    # CHECK_BOUNDS=False (no padding, floor mode): every window lies inside the input, so taps
    # need no bounds tests (sm_90: ~100 -> ~60 instructions per 3x3 output)
    n, c, oh, ow, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, OH, OW,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
    x_base = x_ptr + n * sxn + c * sxc
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    best = tl.full([BLOCK_R, BLOCK_S], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_R, BLOCK_S], -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DH
        if CHECK_BOUNDS:
            h_ok = mask & (ih >= 0) & (ih < H)
        else:
            h_ok = mask
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DW
            if CHECK_BOUNDS:
                ok = h_ok & (iw >= 0) & (iw < W)
            else:
                ok = h_ok
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
        FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Gather over cells (strides up to 2): cell (ch, cw) is the SH x SW block of inputs at
    rows ch*SH - PH + [0, SH), columns cw*SW - PW + [0, SW). All its inputs see the same
    NOH x NOW candidate windows (ch - j, cw - k), so each window's argmax and gradient are
    loaded once per cell, not once per input (3x3/2: 4 loads per 4 inputs instead of 16;
    sm_90: ~76 -> ~25 instructions per input element)."""
    n, c, ch, cw, mask = _tile_coords(tl.program_id(0), tl.program_id(1), N, C, CH, CW,
                                      CHANNELS_LAST, USE_I64, BLOCK_R, BLOCK_S)
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


@triton.jit
def _max_pool2d_bwd_gather_kernel(
        g_ptr, idx_ptr, y_ptr, dx_ptr,
        N, C, H, W, OH, OW,
        sgn, sgc, sgh, sgw, sin, sic, sih, siw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        NOH: tl.constexpr, NOW: tl.constexpr, RELU_FROM_OUTPUT: tl.constexpr,
        FLAT_INDICES: tl.constexpr, CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Strides above 2: each input element gathers from the windows that can contain it."""
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
          element_size: int = 2, cell: int = 1):
    """(grid, BLOCK_R, BLOCK_S, num_warps) for an (n, c, oh, ow) grid of positions, each
    loading ``taps`` elements (unrolled) of ``element_size`` bytes and writing ``cell``."""
    cfg = device_tuning(device, TUNING)
    tile = max(1, cfg["bwd_tile" if backward else "tile"] // cell)
    if device.type == "cuda":  # tiles are sized for 2-byte dtypes: float32 halves them
        tile = max(32 // cell, tile * 2 // element_size)
        tile = min(tile, max(128, 1 << (_TAP_ELEMENTS // taps).bit_length() - 1))
    if channels_last:
        bs = block_s or cols_block(c, cfg["max_cols"], 16)
        br = max(1, min(tile // bs, next_pow2(n * oh * ow)))
        grid = (cdiv(n * oh * ow, br), cdiv(c, bs))
    else:
        bs = block_s or cols_block(ow, cfg["nchw_max_cols"], 32)
        br = max(1, min(tile // bs, next_pow2(n * c)))
        grid = (cdiv(n * c, br) * oh, cdiv(ow, bs))
    return grid, br, bs, cfg["num_warps"]


def _index_dtype(kh: int, kw: int) -> torch.dtype:
    return torch.int8 if kh * kw <= 127 else torch.int32


def _plans_state():
    return (tuple(TUNING["cuda"].values()), tuple(TUNING["cpu"].values()),
            FORCE_INT64_INDEXING)


_PLANS = PlanCache(_plans_state)


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- max_pool2d
def _max_pool2d_plan(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     relu) -> dict:
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh = _pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = _pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    cl = is_channels_last(x)
    plan = dict(shape=(n, c, oh, ow), fmt=memory_format(cl), cl=cl, grid=None,
                idx_dtype=torch.int64 if return_indices else _index_dtype(kh, kw))
    if n * c * oh * ow == 0:
        return plan
    grid, br, bs, warps = _tile(n, c, oh, ow, cl, x.device, taps=kh * kw,
                                element_size=x.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *x.stride()), meta=dict(
        SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, RELU=bool(relu),
        FLAT_INDICES=bool(return_indices), CHECK_BOUNDS=_check_bounds(padding, ceil_mode),
        CHANNELS_LAST=cl,
        USE_I64=needs_int64(x) or dense_needs_int64(n * c * oh * ow), BLOCK_R=br,
        BLOCK_S=bs, num_warps=warps, num_stages=NUM_STAGES))
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
    grid, br, bs, warps = _tile(n, c, gh, gw, channels_last, g.device, backward=True,
                                taps=noh * now, element_size=g.element_size(),
                                cell=sh * sw if cells else 1)
    y_strides = y.stride() if y is not None else (0, 0, 0, 0)
    plan.update(grid=grid, kernel=_max_pool2d_bwd_kernel if cells else
                _max_pool2d_bwd_gather_kernel,
                scalars=(n, c, h, w, oh, ow, *((gh, gw) if cells else ()), *g.stride(),
                         *indices.stride(), *y_strides), meta=dict(
        SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, NOH=noh, NOW=now,
        RELU_FROM_OUTPUT=y is not None, FLAT_INDICES=bool(return_indices),
        CHANNELS_LAST=bool(channels_last),
        USE_I64=needs_int64(g, indices, y) or dense_needs_int64(n * c * h * w),
        BLOCK_R=br, BLOCK_S=bs, num_warps=warps, num_stages=NUM_STAGES))
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
    out, idx, _ = _max_pool2d_forward(input, _pair(kernel_size), _pair(stride), _pair(padding),
                                      _pair(dilation), bool(ceil_mode), bool(return_indices),
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
                                _pair(kernel_size), _pair(stride), _pair(padding),
                                _pair(dilation), bool(return_indices), bool(relu),
                                bool(channels_last))


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


def _max_pool2d_op_backward(ctx, grad_out, grad_idx):
    out, idx = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    gx = torch.ops.fastconv.triton_max_pool2d_backward(grad_out, out, idx, *ctx.args)
    return (gx,) + (None,) * 7


_max_pool2d_op.register_autograd(_max_pool2d_op_backward, setup_context=_max_pool2d_setup)


class _MaxPool2dFn(torch.autograd.Function):
    """The op's autograd formula without the dispatcher, for eager calls."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                relu):
        out, idx, plan = _max_pool2d_forward(x, kernel_size, stride, padding, dilation,
                                             ceil_mode, return_indices, relu)
        ctx.save_for_backward(out if relu and return_indices else None, idx)
        ctx.args = (tuple(x.shape), kernel_size, stride, padding, dilation, return_indices,
                    relu, plan["cl"])
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_idx):
        out, idx = ctx.saved_tensors
        return (_max_pool2d_backward(grad_out, out, idx, *ctx.args),) + (None,) * 7


# --------------------------------------------------------------------------- avg pools
def _avg_geometry(kernel_size, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, KH=kh, KW=kw)


def _avg_forward_plan(x, oh, ow, geom, count_include_pad, divisor, adaptive) -> dict:
    n, c, h, w = x.shape
    cl = is_channels_last(x)
    plan = dict(shape=(n, c, oh, ow), fmt=memory_format(cl), cl=cl, grid=None)
    if n * c * oh * ow == 0:
        return plan
    taps = 1 if adaptive else geom["KH"] * geom["KW"]
    grid, br, bs, warps = _tile(n, c, oh, ow, cl, x.device, taps=taps,
                                element_size=x.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *x.stride()), meta=dict(
        geom, COUNT_PAD=bool(count_include_pad), DIVISOR=int(divisor or 0), ADAPTIVE=adaptive,
        CHANNELS_LAST=cl, USE_I64=needs_int64(x) or dense_needs_int64(n * c * oh * ow),
        BLOCK_R=br, BLOCK_S=bs, num_warps=warps, num_stages=NUM_STAGES))
    return plan


def _avg_forward(x, key, build):
    real = is_real(x)
    plan = _PLANS.get((x.shape, x.stride(), x.dtype, x.device) + key if real else None, build)
    out = alloc(plan["shape"], x.dtype, x.device, plan["fmt"])
    if plan["grid"] is not None:
        run(_avg_pool2d_fwd_kernel, plan["grid"], (x, out, *plan["scalars"], *out.stride()),
            plan["meta"], real)
    return out, plan


def _avg_backward_plan(g, input_size, geom, noh, now, count_include_pad, divisor, adaptive,
                       channels_last) -> dict:
    n, c, h, w = input_size
    oh, ow = g.shape[2:]
    plan = dict(shape=(n, c, h, w), fmt=memory_format(channels_last), grid=None)
    if n * c * h * w == 0:
        return plan
    grid, br, bs, warps = _tile(n, c, h, w, channels_last, g.device, backward=True,
                                taps=noh * now, element_size=g.element_size())
    plan.update(grid=grid, scalars=(n, c, h, w, oh, ow, *g.stride()), meta=dict(
        geom, NOH=noh, NOW=now, COUNT_PAD=bool(count_include_pad), DIVISOR=int(divisor or 0),
        ADAPTIVE=adaptive, CHANNELS_LAST=bool(channels_last),
        USE_I64=needs_int64(g) or dense_needs_int64(n * c * h * w), BLOCK_R=br, BLOCK_S=bs,
        num_warps=warps, num_stages=NUM_STAGES))
    return plan


def _avg_backward(g, key, build):
    real = is_real(g)
    plan = _PLANS.get((g.shape, g.stride(), g.dtype, g.device) + key if real else None, build)
    dx = alloc(plan["shape"], g.dtype, g.device, plan["fmt"])
    if plan["grid"] is not None:
        run(_avg_pool2d_bwd_kernel, plan["grid"], (g, dx, *plan["scalars"], *dx.stride()),
            plan["meta"], real)
    return dx


def _avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override):
    def build():
        h, w = x.shape[2:]
        oh = _pool_out_size(h, kernel_size[0], stride[0], padding[0], 1, ceil_mode)
        ow = _pool_out_size(w, kernel_size[1], stride[1], padding[1], 1, ceil_mode)
        return _avg_forward_plan(x, oh, ow, _avg_geometry(kernel_size, stride, padding),
                                 count_include_pad, divisor_override, False)

    return _avg_forward(x, ("avg", kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override), build)


def _avg_pool2d_backward(g, input_size, kernel_size, stride, padding, count_include_pad,
                         divisor_override, channels_last):
    def build():
        noh = (kernel_size[0] - 1) // stride[0] + 1
        now = (kernel_size[1] - 1) // stride[1] + 1
        return _avg_backward_plan(g, input_size, _avg_geometry(kernel_size, stride, padding),
                                  noh, now, count_include_pad, divisor_override, False,
                                  channels_last)

    return _avg_backward(g, ("avgb", input_size, kernel_size, stride, padding,
                             count_include_pad, divisor_override, channels_last), build)


@define_op("triton_avg_pool2d",
           "(Tensor input, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, "
           "bool count_include_pad, int? divisor_override) -> Tensor")
def _avg_pool2d_op(input: torch.Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], ceil_mode: bool, count_include_pad: bool,
                   divisor_override: Optional[int]) -> torch.Tensor:
    check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)
    return _avg_pool2d_forward(input, _pair(kernel_size), _pair(stride), _pair(padding),
                               bool(ceil_mode), bool(count_include_pad), divisor_override)[0]


@define_op("triton_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, int[] kernel_size, int[] stride, "
           "int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, "
           "bool channels_last) -> Tensor")
def _avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                            kernel_size: List[int], stride: List[int], padding: List[int],
                            ceil_mode: bool, count_include_pad: bool,
                            divisor_override: Optional[int], channels_last: bool) -> torch.Tensor:
    return _avg_pool2d_backward(grad_output, tuple(input_size), _pair(kernel_size),
                                _pair(stride), _pair(padding), bool(count_include_pad),
                                divisor_override, bool(channels_last))


def _avg_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = inputs
    ctx.args = (list(x.shape), list(kernel_size), list(stride), list(padding), ceil_mode,
                count_include_pad, divisor_override, is_channels_last(x))


def _avg_pool2d_op_backward(ctx, grad_out):
    gx = torch.ops.fastconv.triton_avg_pool2d_backward(grad_out, *ctx.args)
    return (gx,) + (None,) * 6


_avg_pool2d_op.register_autograd(_avg_pool2d_op_backward, setup_context=_avg_pool2d_setup)


class _AvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override):
        out, plan = _avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override)
        ctx.args = (tuple(x.shape), kernel_size, stride, padding, count_include_pad,
                    divisor_override, plan["cl"])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return (_avg_pool2d_backward(grad_out, *ctx.args),) + (None,) * 6


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


def _adaptive_forward(x, output_size):
    def build():
        h, w = x.shape[2:]
        adaptive, geom, _, _ = _adaptive_geometry(h, w, *output_size)
        return _avg_forward_plan(x, *output_size, geom, True, None, adaptive)

    return _avg_forward(x, ("adaptive", output_size), build)


def _adaptive_backward(g, input_size, channels_last):
    def build():
        h, w = input_size[2:]
        adaptive, geom, noh, now = _adaptive_geometry(h, w, *g.shape[2:])
        return _avg_backward_plan(g, input_size, geom, noh, now, True, None, adaptive,
                                  channels_last)

    return _avg_backward(g, ("adaptiveb", input_size, channels_last), build)


@define_op("triton_adaptive_avg_pool2d", "(Tensor input, int[] output_size) -> Tensor")
def _adaptive_avg_pool2d_op(input: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    check_adaptive_avg_pool2d(input, output_size)
    return _adaptive_forward(input, _pair(output_size))[0]


@define_op("triton_adaptive_avg_pool2d_backward",
           "(Tensor grad_output, int[] input_size, bool channels_last) -> Tensor")
def _adaptive_avg_pool2d_backward_op(grad_output: torch.Tensor, input_size: List[int],
                                     channels_last: bool) -> torch.Tensor:
    return _adaptive_backward(grad_output, tuple(input_size), bool(channels_last))


def _adaptive_setup(ctx, inputs, output):
    x, _ = inputs
    ctx.args = (list(x.shape), is_channels_last(x))


def _adaptive_op_backward(ctx, grad_out):
    return torch.ops.fastconv.triton_adaptive_avg_pool2d_backward(grad_out, *ctx.args), None


_adaptive_avg_pool2d_op.register_autograd(_adaptive_op_backward, setup_context=_adaptive_setup)


class _AdaptiveAvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size):
        out, plan = _adaptive_forward(x, output_size)
        ctx.args = (tuple(x.shape), plan["cl"])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _adaptive_backward(grad_out, *ctx.args), None


declare_kernels({
    "triton_max_pool2d": [_max_pool2d_fwd_kernel],
    "triton_max_pool2d_backward": [_max_pool2d_bwd_kernel, _max_pool2d_bwd_gather_kernel],
    "triton_avg_pool2d": [_avg_pool2d_fwd_kernel],
    "triton_avg_pool2d_backward": [_avg_pool2d_bwd_kernel],
    "triton_adaptive_avg_pool2d": [_avg_pool2d_fwd_kernel],
    "triton_adaptive_avg_pool2d_backward": [_avg_pool2d_bwd_kernel],
})


# --------------------------------------------------------------------------- backend entry points
# Eager calls (real tensors, not compiling) run the launchers under the autograd.Functions
# above; tracing and torch.compile see the registered ops, which run the same launchers.
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu):
    args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode),
            bool(return_indices), bool(relu))
    if not eager(input):
        out, idx = torch.ops.fastconv.triton_max_pool2d(input, *[list(a) for a in args[:4]],
                                                        *args[4:])
    elif grad_needed(input):
        out, idx = _MaxPool2dFn.apply(input, *args)
    else:
        out, idx, _ = _max_pool2d_forward(input, *args)
    return (out, idx) if return_indices else out


def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    args = (_pair(kernel_size), _pair(stride), _pair(padding), bool(ceil_mode),
            bool(count_include_pad), None if divisor_override is None else int(divisor_override))
    if not eager(input):
        return torch.ops.fastconv.triton_avg_pool2d(input, *[list(a) for a in args[:3]],
                                                    *args[3:])
    if grad_needed(input):
        return _AvgPool2dFn.apply(input, *args)
    return _avg_pool2d_forward(input, *args)[0]


def adaptive_avg_pool2d(input, output_size):
    size = _pair(output_size)
    if not eager(input):
        return torch.ops.fastconv.triton_adaptive_avg_pool2d(input, list(size))
    if grad_needed(input):
        return _AdaptiveAvgPool2dFn.apply(input, size)
    return _adaptive_forward(input, size)[0]


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
def int_signature(values: dict) -> Tuple[dict, dict]:
    """(signature, constexprs) of integer kernel arguments as Triton's JIT specialises them at
    launch: a value of 1 becomes a constant (unit strides: what makes loads vectorise), a
    multiple of 16 is marked divisible."""
    sig, consts = {}, {}
    for name, v in values.items():
        if v == 1:
            consts[name] = 1
        else:
            sig[name] = "i32:16" if v % 16 == 0 else "i32"
    return sig, consts


def _dense_strides(shape, channels_last: bool):
    return torch.empty(shape, device="meta", memory_format=memory_format(channels_last)).stride()


def aot_specs():
    """Configurations the H100 runs most: the AlexNet/VGG/ResNet pools in bf16 (and fp32),
    channels_last and NCHW, forward and backward, tiled and specialised (unit strides,
    divisibility) as the launchers and the JIT do for AlexNet's first pool (96 x 54 x 54,
    batch 128) and ResNet's stem pool (64 x 112 x 112)."""
    from .aot import KernelSpec

    dev = torch.device("cuda")
    specs = []
    geoms = [("3/2", (3, 3), (2, 2), (0, 0), (96, 54)), ("2/2", (2, 2), (2, 2), (0, 0), (64, 32)),
             ("3/2/1", (3, 3), (2, 2), (1, 1), (64, 112)),
             ("3/1/1", (3, 3), (1, 1), (1, 1), (192, 28))]
    for ty, esize in (("bf16", 2), ("fp32", 4)):
        for cl in (True, False):
            layout = "NHWC" if cl else "NCHW"
            for name, k, s, p, (c, hw) in geoms:
                # main (compiled by tests/test_triton_aot.py): the bf16 fused-ReLU training
                # kernels of AlexNet's 3/2 pool and ResNet's 3/2/1 stem (both layouts) and
                # VGG's 2/2 (channels_last)
                main = ty == "bf16" and (name in ("3/2", "3/2/1") or (name == "2/2" and cl))
                n = 128
                oh = _pool_out_size(hw, k[0], s[0], p[0], 1, False)
                noh, now = (k[0] - 1) // s[0] + 1, (k[1] - 1) // s[1] + 1
                _, br, bs, warps = _tile(n, c, oh, oh, cl, dev, taps=k[0] * k[1],
                                         element_size=esize)
                cells, (gh, gw), _, _ = _bwd_geometry((n, c, hw, hw), k, s, p, (1, 1))
                _, bbr, bbs, bwarps = _tile(n, c, gh, gw, cl, dev, backward=True,
                                            taps=noh * now, element_size=esize,
                                            cell=s[0] * s[1])
                xs = _dense_strides((n, c, hw, hw), cl)
                ys = _dense_strides((n, c, oh, oh), cl)
                dims = dict(N=n, C=c, H=hw, W=hw, OH=oh, OW=oh)
                geo = dict(SH=s[0], SW=s[1], PH=p[0], PW=p[1], KH=k[0], KW=k[1], DH=1, DW=1)
                fsig, fconst = int_signature(dict(
                    dims, **dict(zip(("sxn", "sxc", "sxh", "sxw"), xs)),
                    **dict(zip(("syn", "syc", "syh", "syw"), ys))))
                for relu, flat in ((True, False), (False, True)):
                    idx_ty = "*i64" if flat else "*i8"
                    tag = f"{name} {ty} {layout} relu={relu} flat={flat}"
                    specs.append(KernelSpec(
                        name=f"max_pool2d_fwd {tag}", kernel=_max_pool2d_fwd_kernel,
                        signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "idx_ptr": idx_ty,
                                   **fsig},
                        constexprs=dict(fconst, **geo, RELU=relu, FLAT_INDICES=flat,
                                        CHECK_BOUNDS=_check_bounds(p, False),
                                        CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=br,
                                        BLOCK_S=bs),
                        num_warps=warps, num_stages=NUM_STAGES, main=main and relu))
                    y_from = relu and flat
                    bvals = dict(dims, CH=gh, CW=gw, **dict(zip(("sgn", "sgc", "sgh", "sgw"), ys)),
                                 **dict(zip(("sin", "sic", "sih", "siw"), ys)),
                                 **dict(zip(("sdn", "sdc", "sdh", "sdw"), xs)),
                                 **dict(zip(("syn", "syc", "syh", "syw"),
                                            ys if y_from else (0, 0, 0, 0))))
                    bsig, bconst = int_signature(bvals)
                    if not y_from:
                        bconst["y_ptr"] = None
                    specs.append(KernelSpec(
                        name=f"max_pool2d_bwd {tag}", kernel=_max_pool2d_bwd_kernel,
                        signature={"g_ptr": f"*{ty}", "idx_ptr": idx_ty, "dx_ptr": f"*{ty}",
                                   **({"y_ptr": f"*{ty}"} if y_from else {}), **bsig},
                        constexprs=dict(bconst, **geo, NOH=noh, NOW=now,
                                        RELU_FROM_OUTPUT=y_from, FLAT_INDICES=flat,
                                        CHANNELS_LAST=cl, USE_I64=False, BLOCK_R=bbr,
                                        BLOCK_S=bbs),
                        num_warps=bwarps, num_stages=NUM_STAGES, main=main and relu))
            # LeNet's 2x2 average pool, and global average pooling 7x7 -> 1 (run-time loops)
            for name, geo, adaptive, size, out in (
                    ("avg_pool2d 2/2", dict(SH=2, SW=2, PH=0, PW=0, KH=2, KW=2), False, 28, 14),
                    ("adaptive_avg_pool2d 7x7->1", dict(SH=1, SW=1, PH=0, PW=0, KH=7, KW=7),
                     True, 7, 1)):
                n, c = 128, 512
                taps = 1 if adaptive else geo["KH"] * geo["KW"]
                _, br, bs, warps = _tile(n, c, out, out, cl, dev, taps=taps,
                                         element_size=esize)
                _, bbr, bbs, bwarps = _tile(n, c, size, size, cl, dev, backward=True,
                                            element_size=esize)
                xs = _dense_strides((n, c, size, size), cl)
                ys = _dense_strides((n, c, out, out), cl)
                dims = dict(N=n, C=c, H=size, W=size, OH=out, OW=out)
                fsig, fconst = int_signature(dict(
                    dims, **dict(zip(("sxn", "sxc", "sxh", "sxw"), xs)),
                    **dict(zip(("syn", "syc", "syh", "syw"), ys))))
                bsig, bconst = int_signature(dict(
                    dims, **dict(zip(("sgn", "sgc", "sgh", "sgw"), ys)),
                    **dict(zip(("sdn", "sdc", "sdh", "sdw"), xs))))
                consts = dict(geo, COUNT_PAD=True, DIVISOR=0, ADAPTIVE=adaptive,
                              CHANNELS_LAST=cl, USE_I64=False)
                specs.append(KernelSpec(
                    name=f"{name} fwd {ty} {layout}", kernel=_avg_pool2d_fwd_kernel,
                    signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", **fsig},
                    constexprs=dict(consts, **fconst, BLOCK_R=br, BLOCK_S=bs),
                    num_warps=warps, num_stages=NUM_STAGES, main=False))
                specs.append(KernelSpec(
                    name=f"{name} bwd {ty} {layout}", kernel=_avg_pool2d_bwd_kernel,
                    signature={"g_ptr": f"*{ty}", "dx_ptr": f"*{ty}", **bsig},
                    constexprs=dict(consts, **bconst, NOH=1, NOW=1, BLOCK_R=bbr, BLOCK_S=bbs),
                    num_warps=bwarps, num_stages=NUM_STAGES, main=False))
    return specs
