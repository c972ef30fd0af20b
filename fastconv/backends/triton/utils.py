"""What every Triton op module shares: host arithmetic, the 64-bit index decision, output
allocation (and poisoning), real/fake tensor checks, launch plans, op definition, eager autograd
and the window-pooling tile that max_pool2d.py and avg_pool2d.py both use. (Launch
configurations and their data files: autotune.py.)
"""
import os
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

from .autotune import device_tuning

INT32_LIMIT = 2**31 - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tests set these: NaN-filled outputs (an impossible 99 for integer ones) show any element a
# kernel forgets to write; FORCE_INDEX64 takes the 64-bit index path on small tensors.
POISON_OUTPUTS = os.environ.get("FASTCONV_POISON_OUTPUTS", "0") not in ("", "0")
FORCE_INDEX64 = False


# --------------------------------------------------------------------------- host arithmetic
def cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a JIT function in Triton 3.8, ~4 us per host call
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamped_pow2(x: int, lo: int, hi: int) -> int:
    """``next_pow2(x)`` clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(max(int(x), 1))))


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


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1]))


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to plan a launch for: the device's; 132 (an H100) for a CUDA
    launch planned without a device (AOT specs); 1 in the interpreter, which runs one program
    at a time."""
    key = (device.type, device.index)
    if key not in _SMS:
        if device.type == "cuda" and torch.cuda.is_available():
            idx = device.index if device.index is not None else torch.cuda.current_device()
            _SMS[key] = torch.cuda.get_device_properties(idx).multi_processor_count
        else:
            _SMS[key] = 132 if device.type == "cuda" else 1
    return _SMS[key]


# --------------------------------------------------------------------------- 64-bit indexing
def span(t: torch.Tensor) -> int:
    """Largest element offset reachable through ``t``'s strides, plus one (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def needs_index64(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a kernel must compute offsets into these tensors in int64 (constexpr INDEX64)."""
    return FORCE_INDEX64 or any(t is not None and span(t) > INT32_LIMIT for t in tensors)


def dense_needs_index64(numel: int) -> bool:
    """needs_index64 for a tensor the caller allocates dense (in either memory format)."""
    return FORCE_INDEX64 or numel > INT32_LIMIT


# --------------------------------------------------------------------------- tensors
def alloc(shape, dtype: torch.dtype, device: torch.device,
          fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An output buffer for a kernel to write; poisoned when POISON_OUTPUTS is on."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    if POISON_OUTPUTS and not _is_fake(t):
        t.fill_(float("nan") if t.is_floating_point() else 99)
    return t


def _is_fake(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

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


def common_why_not(x: torch.Tensor, op: str) -> Optional[str]:
    """The refusals the pool and batch-norm kernels share (dtype, rank, 32-bit tile grid)."""
    if x.dtype not in FLOAT_DTYPES:
        return (f"triton {op} supports float16, bfloat16 and float32 inputs, got {x.dtype} "
                "(the torch backend serves it)")
    if x.dim() != 4:
        return f"triton {op} expects a 4D input, got {x.dim()}D"
    n, c, h, w = x.shape
    if n * c > INT32_LIMIT or n * h * w > INT32_LIMIT:
        return (f"input {tuple(x.shape)} has more than 2**31-1 planes or pixels, beyond the "
                "kernels' 32-bit tile coordinates")
    return None


# --------------------------------------------------------------------------- launches
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
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

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

    def __len__(self) -> int:
        return len(self._plans)


def define_op(name: str, schema: Optional[str] = None, mutates_args=(),
              fake: Optional[Callable] = None):
    """Register ``fn`` as ``fastconv::<name>``: a triton_op where torch has it (its traceable
    body is its own fake: it launches nothing on fake tensors and allocates outputs with their
    real strides), else a custom_op whose fake is ``fake`` or, by default, ``fn`` itself.
    Without ``schema`` torch infers it from the type hints."""
    qualname = f"fastconv::{name}"

    def deco(fn):
        if _HAS_TRITON_OP:
            return torch.library.triton_op(qualname, fn, mutates_args=mutates_args,
                                           schema=schema)
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake or fn)
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


# --------------------------------------------------------------------------- window pooling
@triton.jit
def tile_coords(pid0, pid1, N, C, OH, OW, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """(n, c, oh, ow, mask) of this program's tile of an (N, C, OH, OW) grid of positions, each
    broadcastable to [BLOCK_R, BLOCK_S].

    * channels_last: a tile is [output pixels (n, oh, ow) x channels]; a row of the tile is
      contiguous, so loads and stores are 16-byte vectors along C.
    * NCHW: a program owns one output row ``oh`` of BLOCK_R (n, c) planes; a row of the tile
      is ``ow``, contiguous in the output. Two integer divisions per tile row, none per element.
    """
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
    if INDEX64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    return n, c, oh, ow, mask


# Unrolled windows shrink the tile so that taps x elements per thread stays in registers.
_TAP_ELEMENTS = 12288


def pool_tile(tuning: dict, n: int, c: int, oh: int, ow: int, channels_last: bool,
              device: torch.device, backward: bool = False, block_s: Optional[int] = None,
              taps: int = 1, element_size: int = 2, cell: int = 1):
    """(grid, BLOCK_R, BLOCK_S, num_warps) for an (n, c, oh, ow) grid of positions tiled by
    ``tile_coords``, each loading ``taps`` elements (unrolled) of ``element_size`` bytes and
    writing ``cell``; ``tuning`` is the op's table (tile sizes by device kind)."""
    cfg = device_tuning(device, tuning)
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


# Windows of more taps than this are refused (they are unrolled at compile time).
MAX_WINDOW_TAPS = 1024
# No loop in the pool kernels pipelines; 1 keeps the compile (and the AOT specs) honest
POOL_NUM_STAGES = 1


def window_why_not(args: dict, op: str) -> Optional[str]:
    """Why a window pool (max_pool2d, avg_pool2d) is not for the Triton kernels, or None."""
    reason = common_why_not(args["input"], op)
    if reason:
        return reason
    kh, kw = args["kernel_size"]
    if kh * kw > MAX_WINDOW_TAPS:
        return (f"triton {op} unrolls its window at compile time; kernel_size {(kh, kw)} "
                f"has {kh * kw} taps > {MAX_WINDOW_TAPS}")
    return None


def eager_autograd(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function ``name`` that runs the launcher ``forward`` under an op's own
    autograd formula (the ``setup_context`` and ``backward`` given to its
    ``register_autograd``), without the op dispatcher: ~120 us of host time per call, more
    than the GPU time of most layers. ``backward`` launches directly on real tensors and calls
    the ops while tracing."""

    def fwd(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    @torch.autograd.function.once_differentiable
    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
