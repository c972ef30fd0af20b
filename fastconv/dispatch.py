"""Choosing a backend for each call.

``backend=None`` means ``$FASTCONV_BACKEND``, else ``"auto"``. ``auto`` measures the backends
of :data:`AUTO_ORDER` that can serve a call signature and takes the fastest (see
``fastconv.selection``; ``FASTCONV_AUTOTUNE=0`` takes the first that can serve it, in order); an
explicitly named backend that cannot serve it raises :class:`BackendUnavailableError` carrying
its reason. Set ``FASTCONV_LOG=debug`` (or configure the ``fastconv`` logger) to see every
fallback and every measured choice.

Once a call's signature is decided, :data:`FAST` maps a key built from the call's raw arguments
(``fastconv.functional``) to the bound implementation, so a repeated layer call skips
validation and dispatch: the key holds everything validation looked at (types, shapes,
strides, dtypes, devices, requires_grad, the geometric arguments as given, the backend name,
grad mode, deterministic mode), so a call with that key passed the same checks before.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from . import selection
from .backends.base import OPS, Backend
from .backends.reference import TorchBackend
from .backends.triton import TritonBackend

log = logging.getLogger("fastconv")
if os.environ.get("FASTCONV_LOG", "").lower() == "debug":
    logging.basicConfig()
    log.setLevel(logging.DEBUG)



class _Broken(Backend):
    """Stands in for a backend whose Python module itself failed to import."""

    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable_reason(self) -> Optional[str]:
        return self._reason

    def why_not(self, op: str, args: dict[str, Any]) -> Optional[str]:
        return self._reason


def _extension_backend() -> Backend:
    try:
        from .backends.extension import ExtensionBackend
    except Exception as exc:  # import fastconv must survive a broken backend module
        return _Broken("extension", f"fastconv.backends.extension failed to import: {exc}")
    return ExtensionBackend()


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (TorchBackend(), TritonBackend(), _extension_backend())
}
# The Triton interpreter runs CPU tensors for testing only: auto never picks it.
AUTO_ORDER = {"cuda": ("triton", "extension", "torch"), "cpu": ("extension", "torch")}
NAMES = ("auto", *BACKENDS)
FAST: dict[tuple, Any] = {}  # fast-path key -> bound implementation (see the module docstring)
FAST_MAX = 4096  # a program that keeps making new shapes must not grow it without bound
# bumped whenever FAST is emptied: the drop-in modules' own memo of their last decided call
# (fastconv.nn) holds it and is void once it changes
EPOCH = 0


def forget_fast_paths() -> None:
    """Empty :data:`FAST` and void every module's memo of its last decided call."""
    global EPOCH
    FAST.clear()
    EPOCH += 1


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve a call; the message says why."""


def resolve_name(backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get("FASTCONV_BACKEND") or "auto"
    if name not in NAMES:
        source = "backend" if backend is not None else "FASTCONV_BACKEND"
        raise ValueError(f"{source}={name!r} is not a fastconv backend; choose one of {NAMES}")
    return name


def get(name: str) -> Backend:
    return BACKENDS[name]


def reasons(op: str, args: dict[str, Any], names=None) -> dict[str, Optional[str]]:
    """Every backend's answer for this call: ``None`` (can run) or the reason it cannot."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    out = {}
    for name in names or BACKENDS:
        try:
            out[name] = BACKENDS[name].why_not(op, args)
        except Exception as exc:  # a broken backend must not break dispatch
            out[name] = f"{name} failed to check the call: {type(exc).__name__}: {exc}"
    return out


def select(op: str, args: dict[str, Any], backend: Optional[str]) -> Backend:
    return select_call(op, args, backend)[0]


def select_call(op: str, args: dict[str, Any], backend: Optional[str]) -> tuple[Backend, bool]:
    """The backend for this call, and whether the choice is final for its signature."""
    name = resolve_name(backend)
    if name != "auto":
        reason = reasons(op, args, [name])[name]
        if reason is not None:
            raise BackendUnavailableError(f"fastconv backend {name!r} cannot run {op}: {reason}")
        return BACKENDS[name], True
    order = auto_order(args["input"].device.type)
    choice, entry, final = selection.choose(op, args, order)
    if choice is None:
        raise BackendUnavailableError(f"no fastconv backend can run {op}: {entry['how']}")
    if choice != order[0] and entry["how"].startswith("fixed") \
            and not torch.compiler.is_compiling():  # dynamo cannot trace logging
        log.debug("fastconv %s: using %s; %s", op, choice, "; ".join(
            f"{n}: {r}" for n, r in reasons(op, args, order[:order.index(choice)]).items()))
    passes = entry.get("passes")
    if passes is not None and any(n not in (None, choice) for n in passes.values()):
        from .mixed import mixed

        return mixed(passes["forward"], passes["grad_input"], passes["grad_weight"]), final
    return BACKENDS[choice], final


def auto_order(device_type: str) -> tuple[str, ...]:
    """The candidates of ``auto`` for a device type, in fixed-order preference (torch last)."""
    return AUTO_ORDER.get(device_type, ("torch",))


try:  # $FASTCONV_BACKEND as os.environ holds it (raw): one dict lookup instead of ~0.7 us;
    # only fast-path keys and layer memos use it, which compare it and never decode it
    env_raw, env_key = os.environ._data, os.environ.encodekey("FASTCONV_BACKEND")
except AttributeError:  # pragma: no cover - an os.environ without them
    env_raw, env_key = os.environ, "FASTCONV_BACKEND"
_compiling = torch.compiler.is_compiling
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled
_deterministic = torch.are_deterministic_algorithms_enabled


def call_key(op: str, tensors: tuple, geometry: tuple, flags: tuple,
             backend: Optional[str]) -> Optional[tuple]:
    """The fast-path key of a call from its raw arguments, or ``None`` when it has none.

    ``geometry`` holds ints, floats (batch norm's momentum and eps), pairs of ints, ``None``
    or strings exactly as passed (their types are checked, since ``True == 1`` and
    ``1.0 == 1`` in a dict key), ``flags`` bools. Under tracing or autocast there is no fast
    path.
    """
    if _compiling() or _any_autocast():
        return None
    floats = False
    for v in geometry:
        t = type(v)
        if t is int or v is None or t is str:
            continue
        if t is float:
            floats = True
        elif not (t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int):
            return None
    for f in flags:
        if type(f) is not bool:
            return None
    if backend is None:
        backend = env_raw.get(env_key)
    elif type(backend) is not str:
        return None
    described = ()  # a loop, not a generator: ~1 us less on every decided call
    try:
        for t in tensors:
            described += (None,) if t is None else (type(t), t.shape, t.stride(), t.dtype,
                                                    t.device, t.requires_grad)
    except AttributeError:  # not a tensor: validation says so on the checked path
        return None
    # bools are not in the geometry (type(True) is bool) but 1.0 == 1 in a dict key: where a
    # float is, the types go beside the values (~0.3 us, so only then)
    return (op, backend, _grad_enabled(), _deterministic(), described,
            tuple(map(type, geometry)) if floats else None, geometry, flags)


def remember(key: Optional[tuple], op: str, impl: Backend, args: dict[str, Any]) -> None:
    """Let later calls with fast-path ``key`` run ``impl`` directly."""
    if key is None:
        return
    if len(FAST) >= FAST_MAX:
        forget_fast_paths()
    FAST[key] = impl.bind(op, args)


def prepare() -> None:
    """Let every backend do its one-time imports (called by convert(), before any compile)."""
    for b in BACKENDS.values():
        try:
            b.prepare()
        except Exception as exc:  # reported later by why_not; never fatal here
            log.debug("fastconv: preparing %s failed: %s", b.name, exc)


def availability() -> dict[str, Optional[str]]:
    """Each backend's machine-level availability: ``None`` or the reason it is unavailable."""
    out = {}
    for name, b in BACKENDS.items():
        try:
            out[name] = b.unavailable_reason()
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out
