"""What bench, train and profile share: device and dtype choice, the backends to compare, run
metadata for result files, timing, and model-level helpers."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import dispatch
from ..selection import cpu_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKEND_CHOICES = ("stock", "auto", *dispatch.BACKENDS)


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available on this machine")
    return device


def amp_dtype(dtype_name: str) -> Optional[torch.dtype]:
    """None for float32, else the autocast dtype."""
    if dtype_name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    return None if dtype_name == "float32" else DTYPES[dtype_name]


def unusable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can serve ``device`` here, else the reason it cannot.

    The Triton interpreter can run CPU tensors, but it is a testing tool thousands of times
    slower than a kernel: never offered by default for timing or training on CPU. Asking only
    about the backends in use matters: the extension builds itself when first asked.
    """
    if name == "auto":  # measures what can serve each call, torch always among them
        return None
    try:
        reason = dispatch.get(name).unavailable_reason()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason is None and name == "triton" and device.type != "cuda":
        reason = "CPU tensors run only in the Triton interpreter, a testing tool"
    return reason


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable_backends(device: torch.device) -> dict[str, Optional[str]]:
    """Every backend -> None when it can serve ``device`` here, else the reason."""
    return {name: unusable_reason(name, device) for name in dispatch.BACKENDS}


def parse_backends(text: Optional[str], device: torch.device,
                   log: Callable[[str], None] = lambda s: None, *,
                   with_auto: bool = False) -> list[str]:
    """``--backends a,b``: validated names (``auto`` too); default: every usable backend,
    fastest first, after ``auto`` when ``with_auto``."""
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n == "auto":
                continue
            if n not in dispatch.BACKENDS:
                raise SystemExit(f"--backends: {n!r} is not a fastconv backend; choose from "
                                 f"{', '.join(dispatch.BACKENDS)}")
            reason = unusable_reason(n, device)
            if reason is not None and not (n == "triton" and _interpreting()):
                raise SystemExit(f"--backends: {n} cannot run on {device}: {reason}")
            if n == "triton" and device.type != "cuda":  # asked for by name: allowed
                log(f"  warning: triton on {device} runs in the Triton interpreter (very slow)")
        return names
    usable = usable_backends(device)
    order = [n for n in dispatch.AUTO_ORDER.get(device.type, ()) if n != "torch"]
    names = (["auto"] if with_auto else []) + [n for n in order if usable.get(n) is None]
    names.append("torch")
    for n, reason in usable.items():
        if reason is not None:
            log(f"  backend {n} skipped: {reason}")
    return names


def parse_model_args(items) -> dict:
    """``--model-arg`` values as builder keywords. The command line has already validated them
    against the model (``fastconv.tools.args.check_model_options``: a dict arrives here);
    ``KEY=VALUE`` strings from other callers are parsed loosely (true/false, ints, floats,
    text) and the builder judges them."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


# --------------------------------------------------------------------------- metadata
@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
    """The source tree's commit (``+dirty`` when it has uncommitted changes), if it is a clone."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def run_metadata(device: torch.device, **extra) -> dict:
    """What a result file needs to be compared with another: machine, versions, commit."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from .. import __version__
    meta = dict(device=str(device), device_name=device_name(device),
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
                python=platform.python_version(), fastconv=__version__, commit=git_commit(),
                threads=torch.get_num_threads(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if device.type == "cuda":
        meta["cudnn"] = torch.backends.cudnn.version()
        meta["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    meta.update(extra)
    return meta


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64 (NaN anywhere gives inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- models
def xavier_init(model: nn.Module) -> nn.Module:
    """d2l's init: Xavier-uniform weights of every Conv2d and Linear (biases as torch sets)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout layers to eval mode (the rest stays in training): deterministic checks."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot be tried here (None when it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.version_info >= (3, 14) and not hasattr(torch, "_dynamo"):
        return "torch.compile is not supported on this Python"
    if device.type == "cpu":
        import shutil
        if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
                or shutil.which("clang++")):
            return "inductor on CPU needs a C++ compiler and none was found"
    return None


def reset_compiler() -> None:
    """Forget compiled graphs, so a new shape compiles afresh instead of hitting dynamo's
    recompilation limit (after which it silently runs eager)."""
    reset = getattr(getattr(torch, "compiler", None), "reset", None)
    if reset is None:
        reset = torch._dynamo.reset
    reset()


def short_reason(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def grad_scaler(amp: Optional[torch.dtype], device: torch.device):
    """fp16 AMP on CUDA trains with loss scaling; bf16 and fp32 need none."""
    if amp is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler(device.type)
    return None


def capture_cuda_graph(run: Callable[[], torch.Tensor], warmup: list,
                       load: Callable[[object], None]):
    """``(graph, output)``: ``run()`` (a step on static tensors) captured in a CUDA graph.

    First, on a side stream as torch's CUDA-graph docs require, each item of ``warmup`` is
    ``load``-ed into the static tensors and ``run()`` runs once (plans, autotuning, lazy state);
    then one ``run()`` is captured. Replay with ``graph.replay()`` after loading new inputs.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for item in warmup:
            load(item)
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             amp: Optional[torch.dtype], scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step (forward under autocast when ``amp``, cross-entropy in float32,
    backward, optimizer step with the scaler when given): returns ``(loss, logits)``."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss, logits
