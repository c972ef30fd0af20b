"""Choosing a backend for each call.

``backend=None`` means ``$FASTCONV_BACKEND``, else ``"auto"``. ``auto`` asks each backend in
order (:data:`AUTO_ORDER`) and takes the first that can serve the call; an explicitly named
backend that cannot serve it raises :class:`BackendUnavailableError` carrying its reason.
Set ``FASTCONV_LOG=debug`` (or configure the ``fastconv`` logger) to see every fallback.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

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
    name = resolve_name(backend)
    if name != "auto":
        reason = reasons(op, args, [name])[name]
        if reason is not None:
            raise BackendUnavailableError(f"fastconv backend {name!r} cannot run {op}: {reason}")
        return BACKENDS[name]
    device = args["input"].device.type
    order = AUTO_ORDER.get(device, ("torch",))
    skipped = []
    for candidate in order:
        reason = reasons(op, args, [candidate])[candidate]
        if reason is None:
            if skipped and not torch.compiler.is_compiling():  # dynamo cannot trace logging
                log.debug("fastconv %s: using %s; skipped %s", op, candidate, "; ".join(skipped))
            return BACKENDS[candidate]
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(f"no fastconv backend can run {op}: " + "; ".join(skipped))


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
