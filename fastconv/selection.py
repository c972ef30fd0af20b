"""``backend="auto"``: the implementation of each call signature is chosen by measuring it.

A *signature* is what makes two calls run the same kernels: the op, every tensor's shape,
strides, dtype and ``requires_grad``, the arguments that change the kernel (stride, padding,
``relu``, ``training``, ...; not batch norm's ``momentum``/``eps``), the device's name (and on
CPU torch's thread count) and the *pass*: ``"infer"`` (no autograd graph) is decided by forward
time, ``"train"`` by forward + backward time, so inference and training may pick differently.
The pools and batch norm keep one backend for a training call (each its own saved tensors).
conv2d_relu's ``"train"`` decision is a triple: its forward, grad_input and grad_weight (with
grad_bias) are each timed alone (``fastconv.backends.base.ConvPasses``: every backend's passes
save the same tensors, so any forward pairs with any backward) and each takes its fastest
backend; ``fastconv.mixed`` runs a mixed triple under one autograd Function. A backend without
passes is no candidate for conv2d_relu's training calls. Unless torch won every piece, the
winning triple is then timed whole (forward + backward as it will run, its autograd Function
included) against every backend's own whole training call, and the fastest of those runs: on
small layers the Python autograd Function of a mixed or fastconv triple can cost more than
its faster kernels save (measured: LeNet trained at 0.87x stock before this check).

On the first call of an undecided signature every backend of :data:`fastconv.dispatch.AUTO_ORDER`
that can serve it (``why_not`` is None; ``torch`` always can) runs on random tensors of that
signature (drawn from a private generator: never the user's tensors, running statistics or
gradients, and the user's random stream is left alone), in alternating rounds within a bounded
budget (:data:`BUDGET_S`); the fastest median wins. Decisions persist in the per-user cache
(``<cache>/autotune/selection.json``, JSON, atomic writes) under a table keyed by the device's
name and the torch/triton/fastconv versions, so later processes start decided.

No timing happens when:
* ``FASTCONV_AUTOTUNE=0`` (or :func:`set_enabled(False) <set_enabled>`): the fixed order, first
  backend that can serve the call, exactly as before measuring existed; the cache is not read;
* ``torch.use_deterministic_algorithms(True)``: a cached decision if there is one, else the fixed
  order (the choice never depends on timing noise of this run);
* inside ``torch.compile`` tracing or CUDA-graph capture: decided signatures use their choice,
  undecided ones take the fixed order (and stay undecided).

``FASTCONV_AUTOTUNE`` is read when a signature is first met; :func:`reset` forgets the decisions
of this process (the persisted ones are reloaded on the next call).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import threading
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("fastconv")

FORMAT = 6  # 2: conv2d_relu's train entries hold per-pass choices ("passes"); 3: checked whole
# calls; 4: chosen with a 15 us CPU call cost (3 took CPU leads of 5 us); 5: a 3 us one;
# 6: a 2% CPU margin (5 took 5%)
BUDGET_S = 0.5       # measuring budget per signature and pass (all candidates together);
# a doubtful measurement (below) is taken a second time, so at most twice this
SAMPLE_S = 0.002     # one sample lasts about this long (back-to-back calls)
MIN_ROUNDS, MAX_ROUNDS = 3, 7
# Another implementation replaces torch's only when it measures faster by the device type's
# MARGIN and by its CALL_COST_S more: within the margin the two tie on timing noise; the fixed
# cost is what a custom op's call costs in a real model beyond a timing loop's hot one.
# On CPU it was 15 us while every fastconv call built an autograd node (even under no_grad)
# and the average pools looked up their windows per output: LeNet's first average pool, 6%
# faster alone, then took ~15 us longer than torch's inside the model. With graph-free calls
# going straight to the kernel and the plain pooling loops, 3 us measured better on every
# LeNet (2 CPU cores, batch 8, stock / converted, two runs, train / infer): LeNet 1.00,
# 1.00 / 1.03, 1.07 at 3 us against 0.98, 0.98 / 1.06, 1.04 at 15 us; LeNet-BN 0.99, 0.98 /
# 1.03, 1.02 against 0.98, 0.97 / 0.98, 0.99.
# The CPU margin was 5%, as CUDA's still is. A training call's time there is mostly what both
# candidates pay alike (the autograd engine, allocating the gradients), which dilutes a
# kernel's lead: LeNet-BN's first batch norm at batch 2 (per-layer suite), whose extension
# kernels take less than half ATen's time, measured 0.106 vs 0.115 ms whole, at the line of
# 5% + 3 us, so the choice was a coin flip; when torch won, torch's kernel behind fastconv's
# functional call ran at 0.92x eager, the extension at 1.02-1.03x. Rounds alternate and a
# spread wider than timing.WIDE takes a second look; 2% keeps a tie a tie. The models kept
# their choices and speeds (2 cores, LeNet-BN at batch 8: 1.32-1.33x train with 5% or 2%).
MARGIN = {"cpu": 0.02}
MARGIN_DEFAULT = 0.05
CALL_COST_S = {"cpu": 3e-6}
CALL_COST_DEFAULT_S = 5e-6  # CUDA: kernels queue on a stream, so isolated times add up
_NOT_KERNEL = frozenset({"momentum", "eps"})  # values passed to the kernel, not choosing it

Timer = Callable[[dict, torch.device], dict]  # ({name: run}, device) -> {name: seconds/call}

_override: Optional[bool] = None
_timer: Optional[Timer] = None
_clock: Optional[Callable[[], float]] = None
_lock = threading.RLock()
# (device name, pass, signature) -> {"choice": name, "ms": {name: ms} | None, "how": str}; a
# per-pass entry also has "passes" {piece: name | None} and "ms" {piece: {name: ms}}
_decided: dict[tuple, dict] = {}
_loaded_devices: set[str] = set()
_device_names: dict[Any, str] = {}
_last_name: dict[Any, str] = {}  # device -> its name at the last call outside tracing
_cache_path: Optional[Any] = None


# --------------------------------------------------------------------------- switches
def enabled() -> bool:
    """Whether undecided signatures may be measured (``$FASTCONV_AUTOTUNE``, default on)."""
    if _override is not None:
        return _override
    return os.environ.get("FASTCONV_AUTOTUNE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def set_enabled(flag: Optional[bool]) -> None:
    """Force measuring on/off in this process (``None``: back to ``$FASTCONV_AUTOTUNE``)."""
    global _override
    _override = flag
    reset()


def set_timer(timer: Optional[Timer] = None, clock: Optional[Callable[[], float]] = None) -> None:
    """Replace how candidates are timed (tests): ``timer({name: run}, device)`` returns seconds
    per call for each name; or keep the default timer and give it a ``clock`` (seconds)."""
    global _timer, _clock
    _timer, _clock = timer, clock
    reset()


def reset() -> None:
    """Forget this process's decisions (and the fast-path table built from them)."""
    from . import dispatch

    with _lock:
        _decided.clear()
        _loaded_devices.clear()
        dispatch.forget_fast_paths()


# --------------------------------------------------------------------------- signatures
def device_name(device: torch.device) -> str:
    """The device's model name (CUDA) or the CPU's model and torch's thread count."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = (device, threads)
    name = _device_names.get(key)
    if name is None:
        if device.type == "cuda":
            idx = device.index if device.index is not None else torch.cuda.current_device()
            name = f"cuda {torch.cuda.get_device_name(idx)}"
        elif device.type == "cpu":
            name = f"cpu {cpu_model() or 'unknown'} x{threads} threads"
        else:
            name = device.type
        _device_names[key] = name
    _last_name[device] = name
    return name


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else what platform knows; may be empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tensor_sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, bool(t.requires_grad))


def signature(op: str, args: dict[str, Any]) -> tuple:
    parts: list = [op]
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            parts.append(_tensor_sig(value))
        elif name not in _NOT_KERNEL:
            parts.append(value)
    return tuple(parts)


def pass_of(args: dict[str, Any]) -> str:
    """``"train"`` when this call records an autograd graph, else ``"infer"``."""
    if torch.is_grad_enabled():
        for value in args.values():
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return "train"
    return "infer"


# --------------------------------------------------------------------------- persistence
def _kernels_digest() -> str:
    """A short digest of the kernels' sources (the extension's csrc/, wherever it is installed,
    and the Triton kernels): a decision measured against other kernel code is stale even under
    the same version number."""
    import hashlib
    from pathlib import Path

    from .backends import extension

    root = extension.source_root()
    parts = [extension.source_hash(root) if root is not None else "no csrc",
             extension.files_digest(Path(__file__).resolve().parent / "backends" / "triton",
                                    (".py",))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _versions() -> dict[str, str]:
    from . import __version__

    try:
        from importlib.metadata import version
        triton = version("triton")
    except Exception:
        triton = "none"
    return {"torch": torch.__version__, "triton": triton,
            "fastconv": f"{__version__}+{_kernels_digest()}"}


_version_tag: list = []


def _table_tag(device: str) -> str:
    if not _version_tag:
        v = _versions()
        _version_tag.append(f"torch {v['torch']}|triton {v['triton']}|fastconv {v['fastconv']}")
    return f"{device}|{_version_tag[0]}"


def _path():
    from ._cache import cache_dir

    return cache_dir("autotune") / "selection.json"


def _to_json(obj):
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).replace("torch.", "")}
    if isinstance(obj, (tuple, list)):
        return [_to_json(o) for o in obj]
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and set(obj) == {"dtype"}:
        dtype = getattr(torch, str(obj["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {obj['dtype']!r}")
        return dtype
    if isinstance(obj, list):
        return tuple(_from_json(o) for o in obj)
    return obj


def _entry_key(pass_: str, sig: tuple) -> str:
    return json.dumps(_to_json((pass_, sig)))


def _read_file() -> dict:
    """The cache file's tables, or ``{}`` when missing, unreadable or malformed (logged)."""
    try:
        path = _path()
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # corrupt JSON, unsafe directory, permissions: caches are optional
        log.debug("fastconv: ignoring the selection cache: %s: %s", type(exc).__name__, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("tables"), dict):
        log.debug("fastconv: ignoring the selection cache %s: not format %d", path, FORMAT)
        return {}
    return data["tables"]


def _load(device: str) -> None:
    """Bring the persisted decisions of ``device`` (this software's versions) into memory."""
    if device in _loaded_devices:
        return
    _loaded_devices.add(device)
    table = _read_file().get(_table_tag(device))
    if not isinstance(table, dict):
        return
    for key, entry in table.items():
        try:
            pass_, sig = _from_json(json.loads(key))
            if not (isinstance(entry, dict) and isinstance(entry.get("choice"), str)):
                raise ValueError("entry without a choice")
            passes = entry.get("passes")
            if passes is not None and not (isinstance(passes, dict) and set(passes) == set(
                    PIECES) and all(v is None or isinstance(v, str) for v in passes.values())):
                raise ValueError(f"malformed passes {passes!r}")
        except Exception as exc:
            log.debug("fastconv: ignoring selection cache entry %s: %s", key[:80], exc)
            continue
        _decided.setdefault((device, pass_, sig), dict(entry, how="cached"))


def _persist(device: str, pass_: str, sig: tuple, entry: dict) -> None:
    from ._cache import atomic_write_json, file_lock

    try:
        path = _path()
        with file_lock(path.with_suffix(".lock")):
            tables = _read_file()
            current = {tag: t for tag, t in tables.items()
                       if isinstance(t, dict) and not _stale(tag)}
            tag = _table_tag(device)
            current.setdefault(tag, {})[_entry_key(pass_, sig)] = {
                k: entry[k] for k in ("choice", "passes", "ms") if k in entry}
            atomic_write_json(path, {"format": FORMAT, "tables": current})
    except Exception as exc:  # read-only or unsafe cache: the decision stays in memory
        log.debug("fastconv: could not write the selection cache: %s: %s",
                  type(exc).__name__, exc)


def _stale(tag: str) -> bool:
    """A table written by other versions of torch/triton/fastconv or other kernel sources
    (dropped on the next write)."""
    return not tag.endswith(_table_tag(""))


# --------------------------------------------------------------------------- measuring
def _random_tensor(t: torch.Tensor, gen: torch.Generator, positive: bool,
                   grad: bool) -> torch.Tensor:
    """A fresh leaf tensor with ``t``'s shape, strides, dtype and device (requiring grad when
    ``grad`` and ``t`` does)."""
    shape, stride = tuple(t.shape), tuple(t.stride())
    span = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    base = torch.empty(max(span, 1), dtype=t.dtype, device=t.device)
    if positive:
        base.uniform_(0.5, 2.0, generator=gen)
    else:
        base.normal_(generator=gen)
    out = base.as_strided(shape, stride).detach()
    return out.requires_grad_(grad and t.requires_grad) if t.is_floating_point() else out


def _runner(impl, op: str, args: dict[str, Any], pass_: str, gen: torch.Generator):
    """A no-argument function running ``impl``'s ``op`` once on random tensors of the signature
    (and its backward for ``"train"``)."""
    fresh = {name: (_random_tensor(v, gen, name == "running_var", pass_ == "train")
                    if isinstance(v, torch.Tensor) else v) for name, v in args.items()}
    values = tuple(fresh.values())
    method = getattr(impl, op)
    if pass_ == "infer":
        def run():
            with torch.no_grad():
                method(*values)
        return run
    leaves = [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]
    grad_out: list = []

    def run_train():
        for leaf in leaves:
            leaf.grad = None
        with torch.enable_grad():
            out = method(*values)
            out = out[0] if isinstance(out, tuple) else out
            if not grad_out:
                grad_out.append(torch.empty_like(out).normal_(generator=gen))
            out.backward(grad_out[0])
    return run_train


def _default_timer(runs: dict, device: torch.device) -> dict:
    """Median seconds per call of each run, in alternating rounds within :data:`BUDGET_S`
    (at least :data:`MIN_ROUNDS` rounds of one call each, whatever a call costs)."""
    import time

    from . import timing

    clock = _clock or time.perf_counter
    per_call = {}
    for name, run in runs.items():
        run()  # first call: allocations, lazy initialisation, compilation
        timing.sync(device)
        per_call[name] = max(timing.time_calls(run, 1, device, clock=clock)[0], 1e-7)
    slowest = max(per_call.values())
    inner = int(max(1, min(200, SAMPLE_S / slowest)))
    spent = 2 * sum(per_call.values())
    round_cost = inner * sum(per_call.values())
    rounds = int(max(MIN_ROUNDS, min(MAX_ROUNDS, (BUDGET_S - spent) / max(round_cost, 1e-9))))
    stats = timing.compare(runs, device=device, rounds=rounds, inner=inner, warmup=0,
                           clock=clock)
    if _doubtful(stats):
        # A second look, its rounds pooled with the first's: a choice is cached for good, and
        # one burst of load (or of page faults on fresh buffers) during a handful of rounds
        # could otherwise flip it. Seen on ResNet-18's stem batch norm: the extension measured
        # 1.64 vs torch's 1.50 ms once, 0.83-1.0 vs 1.5-3.5 ms in every other run.
        more = timing.compare(runs, device=device, rounds=rounds, inner=inner, warmup=0,
                              clock=clock)
        stats = {n: timing.Stats.of(stats[n].samples + more[n].samples,
                                    stats[n].rounds + more[n].rounds) for n in stats}
    return {name: s.median for name, s in stats.items()}


def _doubtful(stats: dict) -> bool:
    """Whether the fastest candidate's lead over another is uncertain: the interquartile
    interval of their per-round ratios is wider than timing.WIDE of the ratio."""
    from . import timing

    best = min(stats, key=lambda n: stats[n].median)
    return any(timing.ratio(s, stats[best]).wide for n, s in stats.items() if n != best)


def _measure(op: str, args: dict[str, Any], pass_: str, names: list[str],
             impls: Optional[dict] = None) -> dict:
    """``{name: seconds or None}`` of each backend's whole call (``impls`` maps extra names to
    implementations that are not registered backends, such as a mixed conv triple)."""
    from . import dispatch

    device = args["input"].device
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    runs, failed = {}, {}
    for name in names:
        impl = impls[name] if impls and name in impls else dispatch.BACKENDS[name]
        run = _runner(impl, op, args, pass_, gen)
        run.piece = "whole"  # lets an injected timer tell it from conv2d_relu's passes
        try:
            run()  # a candidate that raises here is left out (and said so in the log)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        runs[name] = run
    timer = _timer or _default_timer
    seconds = timer(runs, device) if len(runs) > 1 else {n: None for n in runs}
    for name, why in failed.items():
        log.debug("fastconv %s: %s failed while measuring, left out: %s", op, name, why)
    return seconds


PIECES = ("forward", "grad_input", "grad_weight")


def per_pass(op: str, pass_: str) -> bool:
    """Whether this op and pass is decided pass by pass (conv2d_relu's training calls)."""
    return op == "conv2d_relu" and pass_ == "train"


def _piece_runs(args: dict[str, Any], names: list[str], gen: torch.Generator) -> dict:
    """``{piece: {name: run}}``: each backend's conv2d_relu passes on random tensors of the
    signature; pieces the signature never needs (no gradient asked) are left out."""
    from . import dispatch
    from .backends.reference import TorchConvPasses

    x, w, b = (None if args[k] is None else _random_tensor(args[k], gen, False, False)
               for k in ("input", "weight", "bias"))
    geo = tuple(args[k] for k in ("stride", "padding", "dilation", "groups", "relu"))
    with torch.no_grad():
        out = TorchConvPasses().forward(x, w, b, *geo)
    saved = out if geo[-1] else None  # what every backend's forward saves for the mask
    g = torch.empty_like(out).normal_(generator=gen)
    need_x = bool(args["input"].requires_grad)
    need_w = bool(args["weight"].requires_grad)
    need_b = args["bias"] is not None and bool(args["bias"].requires_grad)
    makers = {"forward": lambda p: lambda: p.forward(x, w, b, *geo)}
    if need_x:
        makers["grad_input"] = lambda p: lambda: p.backward(g, x, w, saved, *geo,
                                                            (True, False, False))
    if need_w or need_b:
        makers["grad_weight"] = lambda p: lambda: p.backward(g, x, w, saved, *geo,
                                                             (False, need_w, need_b))
    out_runs: dict = {}
    for piece, make in makers.items():
        runs = {}
        for name in names:
            passes = dispatch.BACKENDS[name].conv2d_relu_passes()
            run = _no_grad(make(passes))
            run.piece = piece  # lets an injected timer tell the passes apart
            runs[name] = run
        out_runs[piece] = runs
    return out_runs


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _measure_passes(args: dict[str, Any], names: list[str]) -> dict:
    """``{piece: {name: seconds or None}}`` for conv2d_relu's passes (see :func:`_measure`)."""
    device = args["input"].device
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    timer = _timer or _default_timer
    result = {}
    for piece, runs in _piece_runs(args, names, gen).items():
        ok = {}
        for name, run in runs.items():
            try:
                run()
            except Exception as exc:
                log.debug("fastconv conv2d_relu %s: %s failed while measuring, left out: %s: %s",
                          piece, name, type(exc).__name__, exc)
                continue
            ok[name] = run
        result[piece] = timer(ok, device) if len(ok) > 1 else {n: None for n in ok}
    return result


MIXED = "mixed"  # the name of the per-pass triple in a whole-call comparison


def _check_whole(args: dict[str, Any], able: list[str], entry: dict) -> None:
    """Time the per-pass winner of a conv2d_relu training signature whole against each
    backend's whole training call; the fastest replaces ``entry``'s choice (in place)."""
    from .mixed import mixed

    passes = entry["passes"]
    used = {n for n in passes.values() if n is not None}
    names, impls = list(able), {}
    if len(used) > 1:  # a mixed triple: it runs under its own autograd Function
        names.append(MIXED)
        impls[MIXED] = mixed(passes["forward"], passes["grad_input"], passes["grad_weight"])
    best, ms = _pick(_measure("conv2d_relu", args, "train", names, impls), names,
                     args["input"].device.type)
    entry["ms"]["whole"] = ms
    if best is None or best == MIXED or (best in used and len(used) == 1):
        return
    entry["choice"] = best
    entry["passes"] = {p: (best if n is not None else None) for p, n in passes.items()}


def _pick(seconds: dict, able: list[str],
          device_type: str) -> tuple[Optional[str], Optional[dict]]:
    """The fastest candidate (ties to the earlier in ``able``), except that another beats
    ``torch`` only by more than the device type's :data:`MARGIN` and :data:`CALL_COST_S`; and
    the times in ms for the record."""
    timed = {n: s for n, s in seconds.items() if s is not None}
    if timed:
        choice = min(timed, key=lambda n: (timed[n], able.index(n)))
        cost = CALL_COST_S.get(device_type, CALL_COST_DEFAULT_S)
        margin = MARGIN.get(device_type, MARGIN_DEFAULT)
        if "torch" in timed and choice != "torch" and \
                timed[choice] > timed["torch"] * (1.0 - margin) - cost:
            choice = "torch"
    else:
        choice = next(iter(seconds), None)
    return choice, ({n: round(s * 1e3, 6) for n, s in timed.items()} or None)


def usable(entry: dict, able: list[str]) -> bool:
    """Whether a decision names only backends that can serve this call now."""
    passes = entry.get("passes")
    if passes is None:
        return entry["choice"] in able
    return all(n is None or n in able for n in passes.values())


# --------------------------------------------------------------------------- choosing
def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# set by `fastconv tune`: every choice made is appended as (label, op, pass, args, entry)
recorder: Optional[list] = None
label: Optional[str] = None


def choose(op: str, args: dict[str, Any], order, pass_: Optional[str] = None):
    """``(backend name, entry, final)`` for an ``auto`` call; ``None`` name if none can run.

    ``entry`` is the decision record (``choice``, ``ms``, ``how``); ``final`` says whether the
    choice may be remembered for the signature's fast path.
    """
    pass_ = pass_ or pass_of(args)
    result = _choose(op, args, order, pass_)
    if recorder is not None and not torch.compiler.is_compiling():
        recorder.append((label, op, pass_, args, result[1]))
    return result


def _choose(op: str, args: dict[str, Any], order, pass_: str):
    from . import dispatch

    answers = dispatch.reasons(op, args, order)
    able = [n for n in order if answers[n] is None]
    skipped = [f"{n}: {answers[n]}" for n in order if answers[n] is not None]
    if not able:
        return None, {"choice": None, "ms": None, "how": "; ".join(skipped)}, False
    fixed = {"choice": able[0], "ms": None, "how": "fixed order"}
    if torch.compiler.is_compiling():
        # no file reads and no timing inside a trace: what this process already decided
        dev = _last_name.get(args["input"].device)
        entry = _decided.get((dev, pass_, signature(op, args)))
        if entry is not None and usable(entry, able):
            return entry["choice"], entry, True
        return able[0], fixed, False
    if not enabled():
        return able[0], dict(fixed, how="fixed order (FASTCONV_AUTOTUNE=0)"), True
    device = args["input"].device
    dev, sig = device_name(device), signature(op, args)
    with _lock:
        _load(dev)
        entry = _decided.get((dev, pass_, sig))
        if entry is not None and usable(entry, able):
            return entry["choice"], entry, True
        if per_pass(op, pass_):  # only backends with separate passes can be mixed
            able = [n for n in able if dispatch.BACKENDS[n].conv2d_relu_passes() is not None]
            fixed = dict(fixed, choice=able[0]) if able else fixed
        if len(able) == 1:
            entry = dict(fixed, how="the only candidate")
            _decided[(dev, pass_, sig)] = entry
            return able[0], entry, True
        if torch.are_deterministic_algorithms_enabled():
            return able[0], dict(fixed, how="fixed order (deterministic mode, undecided)"), True
        if _capturing(device):
            return able[0], dict(fixed, how="fixed order (CUDA graph capture, undecided)"), False
        if per_pass(op, pass_):
            picks = {p: _pick(s, able, device.type)
                     for p, s in _measure_passes(args, able).items()}
            passes = {p: picks[p][0] if p in picks else None for p in PIECES}
            choice = passes["forward"] or able[0]
            passes["forward"] = choice
            entry = {"choice": choice, "passes": passes, "how": "measured",
                     "ms": {p: ms for p, (_, ms) in picks.items()}}
            if any(n not in (None, "torch") for n in passes.values()):
                _check_whole(args, able, entry)
                choice = entry["choice"]
        else:
            choice, ms = _pick(_measure(op, args, pass_, able), able, device.type)
            choice = choice or able[0]
            entry = {"choice": choice, "how": "measured", "ms": ms}
        _decided[(dev, pass_, sig)] = entry
        _persist(dev, pass_, sig, entry)
    log.debug("fastconv %s %s %s: %s -> %s", op, pass_, _short(sig), describe(entry), choice)
    return choice, entry, True


def decided(op: str, args: dict[str, Any], pass_: str) -> Optional[dict]:
    """This process's (or the cache's) decision for the signature and pass, if any."""
    dev = device_name(args["input"].device)
    with _lock:
        _load(dev)
        return _decided.get((dev, pass_, signature(op, args)))


def describe(entry: Optional[dict]) -> str:
    if entry is None:
        return "undecided"
    passes = entry.get("passes")
    if passes is not None:
        ms = entry.get("ms") or {}
        parts = [f"{p} {n}" + (f" ({_times(ms[p])})" if ms.get(p) else "")
                 for p, n in passes.items() if n is not None]
        if ms.get("whole"):
            parts.append(f"whole call ({_times(ms['whole'])})")
        return f"{'; '.join(parts)} [{entry['how']}]"
    if not entry.get("ms"):
        return f"{entry['choice']} ({entry['how']})"
    return f"{entry['choice']} ({entry['how']}: {_times(entry['ms'])})"


def _times(ms: dict) -> str:
    return ", ".join(f"{n} {v:.4g} ms" for n, v in sorted(ms.items(), key=lambda kv: kv[1]))


def _short(sig: tuple) -> str:
    parts = []
    for p in sig[1:]:
        if isinstance(p, tuple) and len(p) == 4 and isinstance(p[2], torch.dtype):
            parts.append("x".join(map(str, p[0])) + f" {str(p[2])[6:]}")
        elif p is not None:
            parts.append(str(p))
    return "(" + ", ".join(parts) + ")"
