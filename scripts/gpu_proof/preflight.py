"""Preflight: versions, the device, the tools and packages the later stages need, and which
extension path this run takes (prebuilt library or a build).

Writes ``preflight.json`` and ``preflight.env`` (shell variables the orchestrator sources:
which pytest plugins exist, so a missing one drops its flags instead of failing the stage).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from common import ROOT, Results, parse_args

PACKAGES = ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
            "pytest-benchmark", "hypothesis", "ninja", "torchvision")
TOOLS = ("nvcc", "compute-sanitizer", "cuda-gdb", "ncu", "ninja", "c++", "readelf", "nm")


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (res.stdout + res.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({type(exc).__name__}: {exc})"


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str:
    head = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if not head or head.startswith("(") or "fatal" in head:
        return "unknown (no git checkout)"
    return head + (" (modified)" if dirty and not dirty.startswith("(") else "")


def extension_plan() -> dict:
    """What the extension stage will do: load $FASTCONV_EXTENSION_LIB when its manifest says
    this torch, else build (the extension module decides; this says what it will find)."""
    lib = os.environ.get("FASTCONV_EXTENSION_LIB", "")
    plan: dict = {"FASTCONV_EXTENSION_LIB": lib or None,
                  "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    if not lib:
        plan["path"] = "build (no FASTCONV_EXTENSION_LIB)"
        return plan
    manifest = Path(lib) / "manifest.json"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        plan["path"] = f"build (manifest unreadable: {type(exc).__name__})"
        return plan
    import torch

    plan["manifest"] = info
    want = info.get("torch") or info.get("torch_version")
    if want != torch.__version__:
        plan["path"] = f"build (manifest torch {want}, this torch {torch.__version__})"
    else:
        plan["path"] = "prebuilt if the source hash matches (the extension stage checks it)"
    return plan


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "device_name": platform.processor() or platform.machine()}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "device_name": p.name, "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
            "torch_cuda": torch.version.cuda}


def main() -> None:
    args = parse_args(__doc__)
    res = Results(args.work, "preflight", args.deadline)
    v = versions()
    res.case("versions", lambda: {"python": sys.version.split()[0], "packages": v,
                                  "commit": git_commit(), "platform": platform.platform()})
    res.case("device", device_info)
    res.case("nvidia-smi", lambda: {"text": _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
         "temperature.gpu,power.draw", "--format=csv,noheader"])
        if shutil.which("nvidia-smi") else "(no nvidia-smi)"})
    res.case("tools", lambda: {"found": {t: shutil.which(t) for t in TOOLS},
                               "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:]
                               if shutil.which("nvcc") else None})
    res.case("extension-plan", extension_plan)
    # the orchestrator's switches: flags of a plugin that is missing are dropped
    env = {"HAVE_XDIST": int(bool(v.get("pytest-xdist"))),
           "HAVE_TIMEOUT": int(bool(v.get("pytest-timeout"))),
           "HAVE_SANITIZER": int(shutil.which("compute-sanitizer") is not None)}
    (Path(args.work) / "preflight.env").write_text(
        "".join(f"{k}={val}\n" for k, val in env.items()))
    res.finish(**env)


if __name__ == "__main__":
    main()
