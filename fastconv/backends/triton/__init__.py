"""The "triton" backend: Triton GPU kernels (and, with TRITON_INTERPRET=1, the same kernels on CPU).

Each op lives in its own module (conv2d_relu.py, max_pool2d.py, avg_pool2d.py with
adaptive_avg_pool2d, batch_norm.py; shared helpers in utils.py) which exposes the op with the
signature of ``fastconv/backends/base.py`` and a ``why_not_<op>(args)`` that refuses calls the
kernels cannot serve. Modules are imported lazily so ``import fastconv`` never needs Triton.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from ..base import Backend, ConvPasses

_MODULE_OF = {
    "conv2d_relu": "conv2d_relu",
    "max_pool2d": "max_pool2d",
    "avg_pool2d": "avg_pool2d",
    "adaptive_avg_pool2d": "avg_pool2d",
    "batch_norm": "batch_norm",
}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_state: dict[str, Any] = {}  # "reason": why triton is unusable; "modules": op module by name


def _load() -> Optional[str]:
    """Import triton and the kernel modules once. Plain dict caching (no lru_cache, no import
    inside traced code) keeps the dispatch path traceable by torch.compile."""
    if "reason" not in _state:
        _state["modules"] = {}
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything
            _state["reason"] = f"triton is not importable: {exc}"
            return _state["reason"]
        _state["reason"] = None
        for module in set(_MODULE_OF.values()):
            try:
                _state["modules"][module] = importlib.import_module(f"{__name__}.{module}")
            except Exception as exc:
                _state["modules"][module] = f"{type(exc).__name__}: {exc}"
    return _state["reason"]


class TritonBackend(Backend):
    name = "triton"

    def prepare(self) -> None:
        _load()

    def unavailable_reason(self) -> Optional[str]:
        reason = _load()
        if reason:
            return reason
        import torch

        if not torch.cuda.is_available() and not interpreter_enabled():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
        return None

    def _module(self, op: str):
        _load()
        module = _state["modules"][_MODULE_OF[op]]
        if isinstance(module, str):
            raise ImportError(module)
        return module

    def why_not(self, op: str, args: dict[str, Any]) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason:
            return reason
        if op not in _MODULE_OF:
            return f"triton has no {op} kernel"
        device = args["input"].device
        if device.type == "cpu" and not interpreter_enabled():
            return "CPU tensors run only in the Triton interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        try:
            module = self._module(op)
        except ImportError as exc:
            return f"triton {op} is not available: {exc}"
        check = getattr(module, f"why_not_{op}", None)
        return check(args) if check is not None else None

    def conv2d_relu_passes(self):
        passes = _state.get("passes")
        if passes is None:
            passes = _state["passes"] = _TritonConvPasses(self._module("conv2d_relu"))
        return passes

    def conv2d_relu(self, *args):
        return self._module("conv2d_relu").conv2d_relu(*args)

    def max_pool2d(self, *args):
        return self._module("max_pool2d").max_pool2d(*args)

    def avg_pool2d(self, *args):
        return self._module("avg_pool2d").avg_pool2d(*args)

    def adaptive_avg_pool2d(self, *args):
        return self._module("adaptive_avg_pool2d").adaptive_avg_pool2d(*args)

    def batch_norm(self, *args):
        return self._module("batch_norm").batch_norm(*args)


class _TritonConvPasses(ConvPasses):
    def __init__(self, module):
        self.forward, self.backward = module.forward, module.backward
