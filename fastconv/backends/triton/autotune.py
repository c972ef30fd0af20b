"""Launch configurations of the Triton kernels: the shipped data files, cache and autotuner.

Each op's tuning values are data in ``<op>_configs.json`` beside its module, never module
constants: ``"tuning"``, a table of launch sizes by device kind (``"cuda"``, ``"cpu"`` for the
interpreter) that the pool and batch-norm planners read through :func:`load_tuning`, and/or
``"entries"``, tuned configurations per device and layer key (conv2d_relu), read through
:class:`ConfigTable`.

Lookup order of a ConfigTable for a (device, key) pair, first hit wins:

1. this process's memory;
2. the per-user cache ``<cache_dir>/autotune/<table>.json`` (written by earlier tuning runs);
3. the shipped table ``fastconv/backends/triton/<table>_configs.json`` (committed results of
   ``python -m benchmarks.sweep --tune``), matched by exact device name, then by compute capability;
4. ``None``: the caller falls back to its heuristic, so a first call never waits for tuning.

Tuning itself runs only when asked (``FASTCONV_TUNE_TRITON=1`` or :func:`set_enabled`), on real
CUDA tensors outside graph capture and tracing; its winner is written to the per-user cache
under a file lock with an atomic replace, so concurrent processes cannot corrupt it.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..._cache import atomic_write_json, cache_dir, file_lock, read_json

FORMAT = 1
_HERE = Path(__file__).resolve().parent
_override: Optional[bool] = None


def enabled() -> bool:
    import torch

    # a timing-picked configuration (e.g. the split-K count) changes the rounding from one
    # process to the next: deterministic mode uses the cached/shipped/heuristic choice only
    if torch.are_deterministic_algorithms_enabled():
        return False
    if _override is not None:
        return _override
    return os.environ.get("FASTCONV_TUNE_TRITON", "0").lower() not in ("", "0", "false", "no")


def set_enabled(flag: Optional[bool]) -> None:
    """Force tuning on/off for this process (``None``: back to ``$FASTCONV_TUNE_TRITON``)."""
    global _override
    _override = flag


def device_tag(device) -> str:
    """``"<name>|sm<major><minor>"`` for CUDA devices, ``"interpreter"`` for the CPU interpreter."""
    import torch

    if device.type != "cuda":
        return "interpreter"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return f"{props.name}|sm{props.major}{props.minor}"


def configs_path(op: str) -> Path:
    """``<op>_configs.json`` beside the op's module: its shipped launch configurations."""
    return _HERE / f"{op}_configs.json"


def load_tuning(op: str) -> dict:
    """The per-device-kind tuning table (``{"cuda": {...}, "cpu": {...}}``) of ``op``'s
    ``<op>_configs.json``, a fresh copy (tests and sweeps edit it in place)."""
    return json.loads(configs_path(op).read_text())["tuning"]


def device_tuning(device, table: dict) -> dict:
    return table["cuda" if device.type == "cuda" else "cpu"]


def tuning_state(table: dict) -> tuple:
    """What launch plans built from ``table`` depend on (see utils.PlanCache)."""
    return tuple(sorted((k, tuple(sorted(v.items()))) for k, v in table.items()))


class ConfigTable:
    """One table of tuned configurations (``{"entries": {device: {key: {"config", "ms"}}}}``)."""

    def __init__(self, table: str, path: Optional[Path] = None):
        self.table = table
        self._path = path
        self._mem: dict[tuple[str, str], Optional[dict]] = {}
        self._user: Optional[dict] = None
        self._shipped: Optional[dict] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = cache_dir("autotune") / f"{self.table}.json"
        return self._path

    def _entries(self, data: Optional[dict]) -> dict:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _load(self) -> None:
        if self._user is None:
            try:
                self._user = self._entries(read_json(self.path, {}))
            except OSError:  # unusable cache dir: tuning results are an optimisation only
                self._user = {}
        if self._shipped is None:
            self._shipped = self._entries(read_json(configs_path(self.table), {}))

    @staticmethod
    def _find(entries: dict, tag: str, key: str) -> Optional[dict]:
        hit = entries.get(tag, {}).get(key)
        if hit is None and "|" in tag:  # same architecture, other board (H100 SXM vs PCIe)
            arch = tag.rsplit("|", 1)[1]
            for other, table in sorted(entries.items()):
                if other.endswith("|" + arch) and key in table:
                    hit = table[key]
                    break
        if isinstance(hit, dict) and isinstance(hit.get("config"), dict):
            return dict(hit["config"])
        return None

    def get(self, tag: str, key: str) -> Optional[dict]:
        mk = (tag, key)
        if mk in self._mem:
            return self._mem[mk]
        with self._lock:
            self._load()
            hit = self._find(self._user, tag, key) or self._find(self._shipped, tag, key)
            self._mem[mk] = hit
        return hit

    def put(self, tag: str, key: str, config: dict, ms: Optional[float] = None) -> None:
        entry = {"config": dict(config)}
        if ms is not None:
            entry["ms"] = round(float(ms), 5)
        with self._lock:
            self._mem[(tag, key)] = dict(config)
            try:
                with file_lock(self.path.with_suffix(".lock")):
                    data = read_json(self.path, {})
                    if not isinstance(data, dict) or data.get("format") != FORMAT:
                        data = {"format": FORMAT, "entries": {}}
                    data.setdefault("entries", {}).setdefault(tag, {})[key] = entry
                    atomic_write_json(self.path, data)
                    self._user = self._entries(data)
            except OSError:
                pass  # read-only or unsafe cache: keep the in-memory result


def benchmark(fn: Callable[[], Any], warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median milliseconds per call of ``fn`` with :mod:`fastconv.timing` (the one timer):
    about ``warmup_ms`` of untimed calls, then ten samples of ``rep_ms / 10`` each."""
    import torch

    from ... import timing

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    inner = timing.calls_for(fn, rep_ms / 1e4, device)
    warmup = max(1, round(inner * warmup_ms / (rep_ms / 10)))
    return timing.measure(fn, device=device, rounds=10, inner=inner, warmup=warmup).median * 1e3


def tune(candidates: Iterable[dict], run: Callable[[dict], Any],
         warmup_ms: int = 10, rep_ms: int = 40) -> tuple[Optional[dict], Optional[float]]:
    """Time ``run(config)`` for each candidate; the fastest that compiles and runs wins.

    Candidates that fail to compile or launch (too much shared memory, ...) are skipped.
    Returns ``(None, None)`` if none ran.
    """
    best, best_ms = None, None
    for cfg in candidates:
        try:
            run(cfg)  # compile outside the timed region
            ms = benchmark(lambda: run(cfg), warmup_ms, rep_ms)
        except Exception:  # OutOfResources, CompilationError, launch failures
            continue
        if best_ms is None or ms < best_ms:
            best, best_ms = dict(cfg), ms
    return best, best_ms
