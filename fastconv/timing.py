"""The one timer of fastconv: every benchmark, ``fastconv bench``, autotuning and tuning use it.

    from fastconv import timing
    res = timing.compare({"torch": f, "fastconv": g}, device=dev, rounds=7, calls=5, warmup=2)
    r = timing.ratio(res["torch"], res["fastconv"])   # > 1: fastconv is faster
    print(res["fastconv"].fmt(), r.fmt(), r.flag)      # "1.92 ms [1.88-1.97]  1.41x [...]"

What it does, and why:
- warm-up: ``warmup`` untimed calls per variant first (compilation, autotuning, cuDNN's choice,
  allocator growth).
- synchronisation: on CUDA, events recorded around the timed calls on the current stream and
  one synchronisation per round, so the host keeps queueing as in real work and each interval
  is the device's time; on CPU, ``time.perf_counter`` and no synchronisation.
- rotated inputs: with ``inputs=[...]`` each call gets the next element (``fn(inputs[k])``),
  cycling, so a working set that fits a cache does not flatter; ``rotation_count`` says how
  many sets overflow the GPU's L2.
- alternation: ``compare`` runs every variant once per round and rotates which goes first, so
  drift of a busy machine (other jobs, clocks, thermals) hits all variants alike.
- medians and spread: ``Stats`` holds every sample (seconds per call), its median, min, max
  and quartiles; ``ratio`` pairs the variants' rounds and reports the ratio's median and
  interquartile interval, whether that interval excludes 1.0 (``significant``) and whether it
  is wider than 10% of the ratio (``wide``: run more rounds).
- ``clock``: an injectable zero-argument function returning seconds, used instead of
  perf_counter and CUDA events (no synchronisation) -- for tests.
- ``peaks(device)``: measured matmul TFLOP/s and copy GB/s, the ceilings that per-layer
  TFLOP/s and bandwidth are read against.

The API (stable; add, do not change): ``sync``, ``time_calls``, ``measure``, ``compare``,
``Stats``, ``ratio``, ``Ratio``, ``rotation_count``, ``peaks``, ``WIDE``.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

Clock = Callable[[], float]
DeviceLike = Union[torch.device, str, None]

WIDE = 0.10  # a ratio whose interquartile interval is wider than this fraction is "wide"


def _device(device: DeviceLike) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def sync(device: DeviceLike) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class Stats:
    """Seconds per call: every sample, and per round the median of that round's samples."""
    samples: tuple
    rounds: tuple

    @classmethod
    def of(cls, samples: Sequence[float], rounds: Optional[Sequence[float]] = None) -> "Stats":
        if not samples:
            raise ValueError("Stats.of: no samples")
        s = tuple(float(v) for v in samples)
        return cls(s, tuple(float(v) for v in rounds) if rounds else s)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def q1(self) -> float:
        return _quantiles(self.samples)[0]

    @property
    def q3(self) -> float:
        return _quantiles(self.samples)[1]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr / self.median if self.median > 0 else math.inf

    def fmt(self, unit: str = "ms") -> str:
        """``"1.92 ms [1.88-1.97]"``: median [first-third quartile]."""
        k = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        return f"{self.median * k:.3g} {unit} [{self.q1 * k:.3g}-{self.q3 * k:.3g}]"

    def to_dict(self) -> dict:
        """Plain numbers in seconds, for JSON."""
        return dict(median=self.median, min=self.min, max=self.max, q1=self.q1, q3=self.q3,
                    n=len(self.samples), rounds=list(self.rounds))


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``base / other`` time (> 1: ``other`` is faster), with its interquartile interval."""
    value: float
    low: float
    high: float
    paired: bool  # from round-by-round pairs (alternated runs) rather than the two spreads

    @property
    def significant(self) -> bool:
        """The interquartile interval lies wholly above or below 1.0."""
        return self.low > 1.0 or self.high < 1.0

    @property
    def wide(self) -> bool:
        return (self.high - self.low) > WIDE * self.value

    @property
    def flag(self) -> str:
        """Empty when the ratio can be trusted, else what is wrong and what to do."""
        notes = []
        if not self.significant:
            notes.append("not significant (spread overlaps 1.0)")
        if self.wide:
            notes.append(f"wide spread (>{WIDE:.0%}): run more rounds")
        return "; ".join(notes)

    def fmt(self) -> str:
        return f"{self.value:.2f}x [{self.low:.2f}-{self.high:.2f}]"

    def to_dict(self) -> dict:
        return dict(ratio=self.value, low=self.low, high=self.high,
                    significant=self.significant, wide=self.wide)


def ratio(base: Stats, other: Stats) -> Ratio:
    """How many times faster ``other`` is than ``base``.

    When both have the same number of rounds (as ``compare`` gives), round i of one is paired
    with round i of the other -- they ran side by side, so load on the machine cancels -- and
    the interval is the quartiles of the per-round ratios. Otherwise the interval is the
    conservative one from the two interquartile ranges (base q1 / other q3 to q3 / q1).
    """
    if len(base.rounds) == len(other.rounds) and len(base.rounds) > 1:
        rs = [b / o for b, o in zip(base.rounds, other.rounds)]
        lo, hi = _quantiles(rs)
        return Ratio(statistics.median(rs), lo, hi, True)
    return Ratio(base.median / other.median, base.q1 / other.q3, base.q3 / other.q1, False)


# --------------------------------------------------------------------------- timing
def _caller(fn: Callable, inputs: Optional[Sequence]) -> Callable[[], object]:
    if inputs is None:
        return fn
    if len(inputs) == 0:
        raise ValueError("inputs: empty sequence")
    state = [0]

    def call():
        x = inputs[state[0] % len(inputs)]
        state[0] += 1
        return fn(x)
    return call


def _time(call: Callable[[], object], n: int, inner: int, device: torch.device,
          clock: Optional[Clock]) -> list[float]:
    """``n`` samples, each the seconds per call of ``inner`` back-to-back calls."""
    if clock is None and device.type == "cuda":
        sync(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            for _ in range(inner):
                call()
            end.record()
        sync(device)
        return [start.elapsed_time(end) / 1e3 / inner for start, end in events]
    clock = clock or time.perf_counter
    out = []
    for _ in range(n):
        t0 = clock()
        for _ in range(inner):
            call()
        out.append((clock() - t0) / inner)
    return out


def time_calls(fn: Callable, n: int, device: DeviceLike = None, *, inner: int = 1,
               inputs: Optional[Sequence] = None, clock: Optional[Clock] = None) -> list[float]:
    """Seconds per call of ``n`` samples of ``fn`` (no warm-up), each sample ``inner`` calls."""
    if n < 1 or inner < 1:
        raise ValueError(f"time_calls: n and inner must be >= 1, got n={n}, inner={inner}")
    return _time(_caller(fn, inputs), n, inner, _device(device), clock)


def compare(variants: Mapping[str, Callable], *, device: DeviceLike = None, rounds: int = 5,
            calls: int = 1, inner: int = 1, warmup: int = 1,
            inputs: Optional[Sequence] = None, clock: Optional[Clock] = None,
            on_round: Optional[Callable[[int, int], None]] = None) -> dict[str, Stats]:
    """Time every variant in alternation and return their ``Stats`` (seconds per call).

    ``warmup`` untimed calls of each variant, then ``rounds`` rounds; in each, every variant
    takes ``calls`` samples of ``inner`` back-to-back calls, and the variant that goes first
    rotates from round to round. ``inputs``: each variant cycles through them on its own
    (``fn(inputs[k])``); without them the functions take no argument. ``on_round(i, rounds)``
    is called after each round (progress). A variant that raises propagates the exception.
    """
    if rounds < 1 or calls < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"compare: rounds, calls and inner must be >= 1 and warmup >= 0, got "
                         f"rounds={rounds}, calls={calls}, inner={inner}, warmup={warmup}")
    if not variants:
        raise ValueError("compare: no variants")
    dev = _device(device)
    callers = {name: _caller(fn, inputs) for name, fn in variants.items()}
    for call in callers.values():
        for _ in range(warmup):
            call()
    sync(dev)
    samples: dict[str, list] = {n: [] for n in callers}
    per_round: dict[str, list] = {n: [] for n in callers}
    order = list(callers)
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            ts = _time(callers[name], calls, inner, dev, clock)
            samples[name] += ts
            per_round[name].append(statistics.median(ts))
        if on_round is not None:
            on_round(r + 1, rounds)
    return {n: Stats.of(samples[n], per_round[n]) for n in callers}


def measure(fn: Callable, *, device: DeviceLike = None, rounds: int = 5, calls: int = 1,
            inner: int = 1, warmup: int = 1, inputs: Optional[Sequence] = None,
            clock: Optional[Clock] = None) -> Stats:
    """``compare`` of a single function."""
    return compare({"fn": fn}, device=device, rounds=rounds, calls=calls, inner=inner,
                   warmup=warmup, inputs=inputs, clock=clock)["fn"]


def calls_for(fn: Callable[[], object], seconds: float, device: DeviceLike = None,
              cap: int = 1000, clock: Optional[Clock] = None) -> int:
    """How many back-to-back calls of ``fn`` take about ``seconds`` (1 to ``cap``): the
    ``inner`` that makes a sample long enough for the clock. Calls ``fn`` a few times."""
    dev = _device(device)
    fn()
    per_call = statistics.median(_time(fn, 3, 1, dev, clock))
    return int(max(1, min(cap, seconds / max(per_call, 1e-7))))


def rotation_count(bytes_per_set: int, device: DeviceLike, cap_bytes: int = 8 << 30) -> int:
    """How many input sets to rotate so that together they overflow the L2 cache (2x): at
    least 2, at most 16, within ``cap_bytes`` of memory; 3 on CPU."""
    dev = _device(device)
    if dev.type != "cuda":
        return 3
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 0) or (50 << 20)
    want = math.ceil(2 * l2 / max(bytes_per_set, 1))
    fit = max(2, cap_bytes // max(bytes_per_set, 1))
    return int(max(2, min(16, want, fit)))


# --------------------------------------------------------------------------- peaks
def peaks(device: DeviceLike = None, *, rounds: int = 5, size: Optional[int] = None,
          copy_mib: Optional[int] = None) -> dict:
    """Measured ceilings of ``device``: dense matmul TFLOP/s per dtype and copy GB/s.

    Returns ``{"device": name, "matmul_tflops": {dtype: TFLOP/s}, "copy_gbs": GB/s}``;
    copy counts bytes read plus written. On CUDA: bf16, fp16 and tf32 matmuls of side
    ``size`` (8192) and a copy of ``copy_mib`` (512) MiB; on CPU fp32, side 1024, 64 MiB.
    """
    dev = _device(device)
    cuda = dev.type == "cuda"
    n = size or (8192 if cuda else 1024)
    nbytes = (copy_mib or (512 if cuda else 64)) << 20
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtypes = ({"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}
              if cuda else {"fp32": torch.float32})
    out: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                 "matmul_tflops": {}}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype in dtypes.items():
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            a = torch.randn(n, n, generator=gen).to(dev, dtype)
            b = torch.randn(n, n, generator=gen).to(dev, dtype)
            inner = calls_for(lambda: a @ b, 0.05, dev, cap=100)
            s = measure(lambda: a @ b, device=dev, rounds=rounds, inner=inner, warmup=2)
            out["matmul_tflops"][name] = 2 * n ** 3 / s.median / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    inner = calls_for(lambda: y.copy_(x), 0.05, dev, cap=100)
    s = measure(lambda: y.copy_(x), device=dev, rounds=rounds, inner=inner, warmup=2)
    out["copy_gbs"] = 2 * nbytes / s.median / 1e9
    return out
