"""``fastconv profile``: run a few training steps of a model under torch.profiler for the stock
model and each backend; print the share of step time spent in convolutions, pooling, batch
norm, linear layers and the rest, the top kernels (top ops on CPU), and write one Chrome trace
per variant (open it in chrome://tracing or https://ui.perfetto.dev).

How time is attributed: every profiled op is charged to the category of its outermost
enclosing op that has one (``aten::conv2d`` covers the ``mkldnn_convolution`` and ``mm``
under it; ``autograd::engine::evaluate_function: ConvolutionBackward0`` covers its backward),
names matched as listed in :data:`RULES`, fastconv's custom ops (``fastconv::*``) included.
On CUDA the device kernels are charged through the op that launched them, else by their own
names; step time is wall time with the device synchronised at the end of every step, and the
part of it where no kernel ran is shown as idle.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import re
import sys
import tempfile
from typing import Optional

import torch
from torch import nn

from .. import convert, models
from .args import add_model_arguments, backend_list, nonneg_int, positive_int
from .common import (amp_dtype, parse_backends, parse_model_args, pick_device,
                     run_metadata)

CATEGORIES = ("conv", "pool", "batch norm", "linear", "rest")
STEP_LABEL = "fc.train_step"
# checked in order (batch norm and pool before conv: "fastconv::max_pool2d" would match conv)
RULES = (
    ("batch norm", re.compile(r"batch_?norm|bn_(fw|bw)|welford", re.I)),
    ("pool", re.compile(r"pool", re.I)),
    ("conv", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|winograd|im2col|col2im|implicit_gemm",
                        re.I)),
    ("linear", re.compile(r"aten::(addmm|mm|bmm|matmul|linear)\b|addmmbackward|mmbackward|"
                          r"linearbackward|gemm|gemv", re.I)),
)


def categorize(name: str) -> Optional[str]:
    """The layer category an op or kernel name belongs to (None: not a layer op)."""
    name = name.replace("fastconv", "")
    for category, pattern in RULES:
        if pattern.search(name):
            return category
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, dtype="the profiled steps")
    p.add_argument("--backends", default=None, type=backend_list,
                   help="comma-separated backends (default: every available one); the stock "
                        "model is always profiled too")
    p.add_argument("--steps", type=positive_int, default=3, help="profiled training steps")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="unprofiled steps first")
    p.add_argument("--top", type=positive_int, default=10,
                   help="how many top kernels/ops to list")
    p.add_argument("--out", default="fastconv-profile",
                   help="folder for the Chrome traces (and --json)")
    p.add_argument("--json", action="store_true", help="also write summary.json to --out")


# --------------------------------------------------------------------------- analysis
def _is_cpu(evt) -> bool:
    return str(getattr(evt, "device_type", "CPU")).endswith("CPU")


def _category_via_ancestors(evt) -> Optional[str]:
    found, e = None, evt
    while e is not None:
        if e.name != STEP_LABEL:
            found = categorize(e.name) or found
        e = getattr(e, "cpu_parent", None)
    return found


def summarize(events, on_device: bool) -> dict:
    """Time per category and per kernel/op from profiler ``events`` (microseconds).

    ``wall_us``: total time of the profiled steps; ``shares``: category -> microseconds (on
    CUDA kernels only, plus ``idle``); ``top``: (name, microseconds, calls, category) sorted.
    """
    events = [e for e in events]
    wall = sum(e.cpu_time_total for e in events if _is_cpu(e) and e.name == STEP_LABEL)
    shares = collections.Counter()
    per_name: dict[str, list] = {}

    def charge(name: str, us: float, category: Optional[str]) -> None:
        category = category or "rest"
        shares[category] += us
        entry = per_name.setdefault(name, [0.0, 0, category])
        entry[0] += us
        entry[1] += 1

    if on_device:
        attributed = collections.Counter()
        for e in events:
            if not _is_cpu(e) or not getattr(e, "kernels", None):
                continue
            owner = _category_via_ancestors(e)
            for k in e.kernels:
                charge(k.name, k.duration, owner or categorize(k.name))
                attributed[(k.name, round(k.duration, 3))] += 1
        for e in events:  # device events no CPU op claimed: by their own name
            if _is_cpu(e) or e.name == STEP_LABEL or getattr(e, "is_user_annotation", False):
                continue  # the step's annotation is mirrored on the GPU timeline: no kernel
            key = (e.name, round(e.time_range.end - e.time_range.start, 3))
            if attributed[key] > 0:
                attributed[key] -= 1
            else:
                charge(e.name, e.time_range.end - e.time_range.start, categorize(e.name))
        busy = sum(shares.values())
        if wall > busy:
            shares["idle"] = wall - busy
    else:
        for e in events:
            if not _is_cpu(e) or e.name == STEP_LABEL or getattr(e, "is_async", False):
                continue
            us = e.self_cpu_time_total
            if us > 0:
                charge(e.name, us, _category_via_ancestors(e))
        # Python and framework time between ops is part of the step too: it is "rest"
        shares["rest"] += max(0.0, wall - sum(shares.values()))
    total = max(wall, sum(shares.values()))
    top = sorted(((n, v[0], v[1], v[2]) for n, v in per_name.items()), key=lambda t: -t[1])
    return dict(wall_us=wall, total_us=total, shares=dict(shares), top=top)


# --------------------------------------------------------------------------- main
# What kineto (torch.profiler's native half) writes straight to file descriptor 2 whatever the
# log level: a USDT trace-point line at every start and stop, and on a CUDA build of torch on
# a machine without a driver a failed device count when it collects device properties.
KINETO_NOISE = re.compile(r"^(USDT:|ERROR:.*\b(gpuGetDeviceCount|cudaGetDeviceCount)\b)")


@contextlib.contextmanager
def quiet_kineto():
    """Capture the process's native stderr while the profiler runs and replay it afterwards
    without kineto's noise lines (anything else, warnings included, still comes out)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines()
                    if not KINETO_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run(args) -> int:
    device = pick_device(args.device)
    batch = args.batch if args.batch is not None else (128 if device.type == "cuda" else 8)
    amp = amp_dtype(args.dtype)
    names = parse_backends(args.backends, device, _log)
    model_kwargs = parse_model_args(args.model_arg)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    stock = models.build(args.model, **model_kwargs).to(device)
    shape = models.INPUT_SIZES[args.model]
    if "image_size" in model_kwargs:
        shape = (shape[0], model_kwargs["image_size"], model_kwargs["image_size"])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    stock = stock.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, *shape, generator=gen).to(device).contiguous(memory_format=fmt)
          for _ in range(3)]
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in xs]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _log(f"fastconv profile: {args.model}, batch {batch}, {device}, {args.dtype}, "
         f"{'channels_last' if args.channels_last else 'nchw'}; {args.warmup} warm-up + "
         f"{args.steps} profiled steps per variant")

    summaries = {}
    for name in ["stock", *names]:
        model = copy.deepcopy(stock) if name == "stock" else convert(stock, backend=name)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        counter = [0]

        def step():
            i = counter[0] = (counter[0] + 1) % len(xs)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32,
                                enabled=amp is not None):
                loss = nn.functional.cross_entropy(model(xs[i]).float(), ys[i])
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(args.warmup):
            step()
        trace = os.path.join(args.out, f"{_safe(args.model)}-{_safe(name)}.trace.json")
        with quiet_kineto():
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.steps):
                    with torch.profiler.record_function(STEP_LABEL):
                        step()
            prof.export_chrome_trace(trace)
        summary = summarize(prof.events(), on_device=device.type == "cuda")
        summary["trace"] = trace
        summaries[name] = summary
        _log(f"  {name}: {summary['wall_us'] / 1e3 / max(args.steps, 1):.2f} ms/step, "
             f"trace {trace}")

    _print_report(summaries, args, device)
    if args.json:
        meta = run_metadata(device, model=args.model, batch=batch, dtype=args.dtype,
                            channels_last=args.channels_last, steps=args.steps)
        path = os.path.join(args.out, "summary.json")
        with open(path, "w") as f:
            json.dump(dict(kind="fastconv-profile", meta=meta, variants={
                n: dict(s, top=s["top"][:50]) for n, s in summaries.items()}), f, indent=1)
    return 0


def _print_report(summaries: dict, args, device) -> None:
    cats = list(CATEGORIES) + (["idle"] if device.type == "cuda" else [])
    what = "GPU kernel time (idle: no kernel running)" if device.type == "cuda" else \
        "CPU time of ops (rest includes Python and framework time)"
    print(f"\nshare of training-step time, {args.model}, {args.steps} steps; {what}")
    print(f"{'variant':10s} {'ms/step':>9s} " + " ".join(f"{c:>10s}" for c in cats))
    for name, s in summaries.items():
        total = s["total_us"] or 1.0
        print(f"{name:10s} {s['wall_us'] / 1e3 / max(args.steps, 1):9.2f} " + " ".join(
            f"{100 * s['shares'].get(c, 0.0) / total:9.1f}%" for c in cats))
    kind = "kernels" if device.type == "cuda" else "ops (self time)"
    for name, s in summaries.items():
        total = s["total_us"] or 1.0
        print(f"\ntop {kind}: {name}")
        for kname, us, calls, cat in s["top"][:args.top]:
            short = kname if len(kname) <= 70 else kname[:67] + "..."
            print(f"  {100 * us / total:5.1f}% {us / 1e3 / max(args.steps, 1):9.3f} ms/step "
                  f"{calls // max(args.steps, 1):4d}x/step  {cat:10s} {short}")
    print(f"\nChrome traces in {os.path.abspath(args.out)}: "
          + ", ".join(os.path.basename(s["trace"]) for s in summaries.values()))
    print("open one in https://ui.perfetto.dev (Open trace file) or chrome://tracing (Load); "
          "each step is the span named " + STEP_LABEL)


def main(argv: Optional[list] = None) -> int:
    from ..cli import main as cli_main
    return cli_main(["profile", *(sys.argv[1:] if argv is None else argv)])
