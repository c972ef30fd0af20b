"""pytest-benchmark suites: per layer (``test_layers.py``) and per model (``test_models.py``).

    pytest benchmarks --fc-results out.jsonl [--fc-models lenet] [--fc-dtype bfloat16]
    python scripts/bench_report.py out.jsonl --out report/

Sizes: on a GPU batch 128 at the models' input sizes; on CPU batch 2 (2 cores must finish).
Providers: ``eager`` (stock torch ops), ``compile`` (torch.compile of them), ``fc_auto``,
``fc_triton``, ``fc_extension``, ``fc_torch`` (fastconv's functional layer on that backend;
``auto`` decides each layer by measuring, in its warm-up, as a user's first call would). A provider that
cannot run a case is skipped with the reason.

Timing (``fastconv.timing``, the one timer): warm-up calls first (compilation, autotuning),
then rounds that alternate the provider with eager on the same inputs, each sample
``iterations`` back-to-back calls (CUDA events on a GPU); inputs rotate over enough copies that
together they exceed the GPU's L2 cache (three on CPU). pytest-benchmark records those samples;
``extra_info["vs_eager"]`` holds the ratio to eager with its interquartile interval and
whether it is significant. ``--fc-results FILE.jsonl`` appends every cell to the results
file that ``scripts/bench_report.py`` renders.

Select models with ``--fc-models lenet`` (exactly those models' layers and steps; ``-k lenet``
matches test ids as text and also picks GoogLeNet's).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastconv from this tree

import fastconv  # noqa: E402
from fastconv import models, timing  # noqa: E402
from fastconv.tools import results  # noqa: E402
from fastconv.tools.common import (compile_unavailable, grad_scaler,  # noqa: E402
                                   reset_compiler, run_metadata, sgd_step, short_reason,
                                   unusable_reason)

from . import layers as layer_list  # noqa: E402

PROVIDERS = ("eager", "compile", "fc_auto", "fc_triton", "fc_extension", "fc_torch")
PROVIDER_NAMES = {"eager": "torch eager", "compile": "torch.compile", "fc_auto": "fastconv[auto]",
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
    g.addoption("--fc-results", default=None, metavar="FILE.jsonl",
                help="append every measured cell to this JSON-lines results file")


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
    results: Optional[str] = None
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
            rounds=opt("--fc-rounds") or (7 if device.type == "cuda" else 5),
            budget=opt("--fc-budget"), results=opt("--fc-results"))
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
def measure(benchmark, steps: dict, provider: str, fc: Settings, extra: dict,
            inputs: Optional[list] = None, warmup: int = 2) -> None:
    """Time ``steps[provider]`` with ``fastconv.timing``, alternating round by round with
    ``steps["eager"]`` (when given and not the same), on the rotated ``inputs`` (each step is
    called ``step(inputs[k])``; without inputs the steps rotate their own).

    pytest-benchmark records exactly these samples (seconds per call; its timer replays
    them), so its table, ``--benchmark-json`` and comparisons show the shared timer's numbers;
    ``extra_info`` adds the quartiles and the ratio to eager with its spread (``vs_eager``),
    and ``--fc-results FILE`` appends the row to the JSON-lines results file.
    """
    if fc.budget and time.perf_counter() - fc.start > fc.budget:
        pytest.skip(f"time budget of {fc.budget:.0f} s spent (--fc-budget)")
    if not hasattr(benchmark, "_timer"):
        pytest.skip("this pytest-benchmark version has no replaceable timer: cannot record "
                    "fastconv.timing's samples")
    fns = {provider: steps[provider]}
    if provider != "eager" and "eager" in steps:
        fns = {"eager": steps["eager"], provider: steps[provider]}
    one = steps[provider]
    probe = (lambda: one(inputs[0])) if inputs else one
    inner = timing.calls_for(probe, fc.round_seconds, fc.device)
    res = timing.compare(fns, device=fc.device, rounds=fc.rounds, inner=inner, warmup=warmup,
                         inputs=inputs)
    mine = res[provider]
    info = dict(extra, seconds=mine.to_dict(), iterations=inner, rounds=fc.rounds)
    if len(fns) == 2:
        info["vs_eager"] = timing.ratio(res["eager"], mine).to_dict()
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(fc.meta())
    benchmark.group = f"{extra['case']} {extra['mode']}"
    ticks = iter(_replay(mine.samples))
    benchmark._timer = lambda: next(ticks)
    benchmark.pedantic(lambda: None, rounds=len(mine.samples), iterations=1, warmup_rounds=0)
    if fc.results:
        results.append(fc.results, [results.row(fc.meta(), **info)])


def _replay(samples) -> list:
    """Timer readings whose start/end pairs differ by the given samples."""
    ticks, t = [], 0.0
    for s in samples:
        ticks += [t, t + s]
        t += s
    return ticks


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


def train_step(stock: nn.Module, name: str, provider: str, fc):
    """A zero-argument training step of ``provider``'s copy of ``stock`` (own optimizer, own
    rotated batches), run once (a provider that cannot run the model is skipped)."""
    if provider.startswith("fc_"):
        model = fastconv.convert(stock, backend=provider[3:])
    else:
        model = copy.deepcopy(stock)
    model.train()
    if provider == "compile":
        reset_compiler()
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    amp = None if fc.dtype is torch.float32 else fc.dtype
    shape = models.INPUT_SIZES[name]
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(fc.batch, *shape, generator=gen).to(fc.device).contiguous(
        memory_format=fc.memory_format) for _ in range(3)]
    ys = [torch.randint(0, 10, (fc.batch,), generator=gen).to(fc.device) for _ in xs]
    scaler = grad_scaler(amp, fc.device)
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        return sgd_step(model, opt, xs[i], ys[i], amp, scaler)[0]

    loss = first_call(step, provider)
    assert torch.isfinite(loss).item(), f"{provider} {name}: first loss is {loss.item()}"
    return step



# sanity bound on each provider's result against eager in the same dtype: catches a broken
# kernel whose timing would mean nothing (tests/ check precision; TF32 on GPU gives ~1e-3)
SANITY = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
