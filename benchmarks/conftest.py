"""pytest-benchmark suites: per layer (``test_layers.py``) and per model (``test_models.py``).

    pytest benchmarks --benchmark-json=out.json [--fc-dtype bfloat16] [--fc-layout channels_last]
    python scripts/bench_report.py out.json --out report/

Sizes: on a GPU batch 128 at the models' input sizes; on CPU batch 2 (2 cores must finish).
Providers: ``eager`` (stock torch ops), ``compile`` (torch.compile of them), ``fc_triton``,
``fc_extension``, ``fc_torch`` (fastconv's functional layer on that backend). A provider that
cannot run a case is skipped with the reason.

Timing: warm-up calls first (compilation, autotuning), then pytest-benchmark's pedantic mode
with a timer that synchronises the device, so each round times ``iterations`` back-to-back
calls end to end; inputs rotate over enough copies that together they exceed the GPU's L2
cache (three on CPU).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastconv from this tree

from fastconv import models  # noqa: E402
from fastconv.tools.common import (compile_unavailable, run_metadata,  # noqa: E402
                                   short_reason, unusable_reason)

from . import layers as layer_list  # noqa: E402

PROVIDERS = ("eager", "compile", "fc_triton", "fc_extension", "fc_torch")
PROVIDER_NAMES = {"eager": "torch eager", "compile": "torch.compile",
                  "fc_triton": "fastconv[triton]", "fc_extension": "fastconv[extension]",
                  "fc_torch": "fastconv[torch]"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pytest_addoption(parser):
    g = parser.getgroup("fastconv benchmarks")
    g.addoption("--fc-device", default=None, help="cpu or cuda (default: cuda if present)")
    g.addoption("--fc-dtype", default="float32", choices=sorted(DTYPES),
                help="layers run in this dtype; models train under autocast with it")
    g.addoption("--fc-layout", default="nchw", choices=("nchw", "channels_last"))
    g.addoption("--fc-batch", type=int, default=None, help="default: 128 on GPU, 2 on CPU")
    g.addoption("--fc-models", default=None,
                help="comma-separated models whose layers/steps to time (default: all)")
    g.addoption("--fc-layers", default="key", choices=("key", "all"),
                help="key: AlexNet plus each network's defining layers; all: every layer")
    g.addoption("--fc-providers", default=",".join(PROVIDERS))
    g.addoption("--fc-modes", default="fwd,fwdbwd", help="layer modes: fwd, fwdbwd")
    g.addoption("--fc-compile", default="auto", choices=("auto", "on", "off"),
                help="time torch.compile (auto: on a GPU only; inductor on 2 CPU cores "
                     "takes ~15 s per case)")
    g.addoption("--fc-rounds", type=int, default=None, help="timed rounds per case")
    g.addoption("--fc-budget", type=float, default=0.0,
                help="seconds; cases starting later are skipped (0: no limit)")


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    layout: str
    batch: int
    models: list
    which: str
    providers: list
    modes: list
    compile: str
    rounds: int
    budget: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def round_seconds(self) -> float:
        return 0.02 if self.device.type == "cuda" else 0.05

    def meta(self) -> dict:
        return run_metadata(self.device, dtype=self.dtype_name, layout=self.layout,
                            batch=self.batch)


def _split(text: Optional[str]) -> list:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


_SETTINGS: Optional[Settings] = None


def settings(config) -> Settings:
    global _SETTINGS
    if _SETTINGS is None:
        opt = config.getoption
        dev = opt("--fc-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(dev)
        providers = _split(opt("--fc-providers"))
        for p in providers:
            if p not in PROVIDERS:
                raise pytest.UsageError(f"--fc-providers: {p!r} is not one of {PROVIDERS}")
        modes = _split(opt("--fc-modes"))
        for m in modes:
            if m not in ("fwd", "fwdbwd"):
                raise pytest.UsageError(f"--fc-modes: {m!r} is not fwd or fwdbwd")
        names = _split(opt("--fc-models")) or list(models.MODELS)
        for n in names:
            if n not in models.MODELS:
                raise pytest.UsageError(f"--fc-models: {n!r} is not one of "
                                        f"{sorted(models.MODELS)}")
        _SETTINGS = Settings(
            device=device, dtype=DTYPES[opt("--fc-dtype")], dtype_name=opt("--fc-dtype"),
            layout=opt("--fc-layout"),
            batch=opt("--fc-batch") or (128 if device.type == "cuda" else 2), models=names,
            which=opt("--fc-layers"), providers=providers, modes=modes,
            compile=opt("--fc-compile"),
            rounds=opt("--fc-rounds") or (7 if device.type == "cuda" else 3),
            budget=opt("--fc-budget"))
    return _SETTINGS


def pytest_generate_tests(metafunc):
    fc = settings(metafunc.config)
    if "layer_id" in metafunc.fixturenames:
        metafunc.parametrize("layer_id", [c.id for c in layer_list.layers(fc.models, fc.which)])
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", fc.models)
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", fc.modes)
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", fc.providers)


@pytest.fixture
def fc(request) -> Settings:
    return settings(request.config)


@pytest.fixture
def layer(layer_id, fc) -> "layer_list.Layer":
    return {c.id: c for c in layer_list.layers(fc.models, fc.which)}[layer_id]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastconv"] = settings(config).meta()


# --------------------------------------------------------------------------- providers
def provider_skip_reason(provider: str, fc: Settings) -> Optional[str]:
    """Why ``provider`` cannot run at all here (None: it can)."""
    if provider == "compile":
        if fc.compile == "off" or (fc.compile == "auto" and fc.device.type != "cuda"):
            return ("torch.compile off on CPU by default (inductor takes ~15 s per case on 2 "
                    "cores); pass --fc-compile on" if fc.compile == "auto"
                    else "torch.compile off (--fc-compile off)")
        return compile_unavailable(fc.device)
    if provider.startswith("fc_"):
        name = provider[3:]
        if name == "triton" and fc.device.type != "cuda":
            return "Triton on CPU is the interpreter, a testing tool: not timed"
        return unusable_reason(name, fc.device)
    return None


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotation_count(bytes_per_set: int, device: torch.device, cap_bytes: int = 8 << 30) -> int:
    """How many input sets to rotate so that together they overflow the L2 cache (2x), at
    least 2 and at most 16, within ``cap_bytes`` of memory (3 on CPU)."""
    if device.type != "cuda":
        return 3
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or (50 << 20)
    want = math.ceil(2 * l2 / max(bytes_per_set, 1))
    fit = max(2, cap_bytes // max(bytes_per_set, 1))
    return int(max(2, min(16, want, fit)))


def measure(benchmark, step: Callable[[], object], fc: Settings, extra: dict,
            warmup: int = 2) -> None:
    """Time ``step`` (which rotates its own inputs) with pytest-benchmark."""
    if fc.budget and time.perf_counter() - fc.start > fc.budget:
        pytest.skip(f"time budget of {fc.budget:.0f} s spent (--fc-budget)")
    for _ in range(warmup):
        step()
    sync(fc.device)
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync(fc.device)
    per_call = (time.perf_counter() - t0) / 3
    iterations = int(max(1, min(1000, fc.round_seconds / max(per_call, 1e-7))))
    target = step
    if fc.device.type == "cuda":
        device = fc.device

        def synced_timer():
            torch.cuda.synchronize(device)
            return time.perf_counter()

        if hasattr(benchmark, "_timer"):
            # the end of a round waits for the device: `iterations` queued calls, timed whole
            benchmark._timer = synced_timer
        else:  # pytest-benchmark changed: synchronise after every call instead
            def synced_step():
                step()
                torch.cuda.synchronize(device)
            target = synced_step
    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(fc.meta(), iterations=iterations, rounds=fc.rounds)
    benchmark.group = f"{extra['case']} {extra['mode']}"
    benchmark.pedantic(target, rounds=fc.rounds, iterations=iterations, warmup_rounds=0)


def first_call(fn: Callable[[], object], provider: str):
    """Run the first call; a backend that refuses the case, or a compile failure, skips it."""
    from fastconv import BackendUnavailableError
    try:
        return fn()
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider}: {short_reason(exc, 300)}")
    except Exception as exc:
        if provider == "compile":
            pytest.skip(f"torch.compile failed: {short_reason(exc)}")
        raise


# sanity bound on each provider's result against eager in the same dtype: catches a broken
# kernel whose timing would mean nothing (tests/ check precision; TF32 on GPU gives ~1e-3)
SANITY = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
