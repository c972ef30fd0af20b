"""``fastconv bench``: convert a model, check it computes what stock torch.nn computes, and time
a training step (forward, cross-entropy, backward, SGD step) and an inference step per backend
against the stock model, measured alternately in one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from .. import convert, dispatch, models

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="alexnet", choices=sorted(models.MODELS))
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: 128 on a GPU, 8 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="float16/bfloat16 run the step under torch.autocast (AMP)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to compare (default: every available one)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Median seconds per call of ``step`` over ``n`` calls (device synchronised)."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(stock: nn.Module, fast: nn.Module, x, y, amp_dtype) -> tuple[float, float]:
    """Relative error of the output and of all parameter gradients, same seed for dropout."""
    results = []
    for m in (stock, fast):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = m(x)
            loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in m.parameters()])
        results.append((out.detach(), grads))
    return rel_err(results[1][0], results[0][0]), rel_err(results[1][1], results[0][1])


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch or (128 if device.type == "cuda" else 8)
    steps = args.steps or (10 if device.type == "cuda" else 3)
    amp_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    names = args.backends.split(",") if args.backends else [
        n for n, r in dispatch.availability().items() if r is None and n != "torch"
        and not (n == "triton" and device.type == "cpu")] + ["torch"]
    for n in names:
        dispatch.resolve_name(n)

    torch.manual_seed(0)
    stock = models.build(args.model).to(device)
    shape = models.INPUT_SIZES[args.model]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if args.channels_last:
        stock = stock.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    print(f"fastconv bench: {args.model}, batch {batch}, {shape}, {device}, {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}; {args.rounds} rounds x {steps} "
          "steps, alternating", file=sys.stderr)

    variants = {"stock": stock}
    for n in names:
        variants[n] = convert(stock, backend=n)
    errors = {n: _check(stock, variants[n], x, y, amp_dtype) for n in names}

    def train_step(m: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            opt.step()
        return step

    def infer_step(m: nn.Module) -> Callable[[], None]:
        @torch.no_grad()
        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                m(x)
        return step

    # each variant trains its own copy so SGD updates don't leak between them
    runners = {}
    for n, m in variants.items():
        m = copy.deepcopy(m).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        runners[n] = (train_step(m, opt), infer_step(m))
    for train, infer in runners.values():  # warm-up: autotuning, builds, cudnn choice
        train()
        infer()
    times = {n: ([], []) for n in runners}
    for r in range(args.rounds):
        for n, (train, infer) in runners.items():
            times[n][0].append(time_steps(train, steps, device))
            times[n][1].append(time_steps(infer, steps, device))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

    base_train = statistics.median(times["stock"][0])
    base_infer = statistics.median(times["stock"][1])
    rows = []
    for n in runners:
        t_train, t_infer = statistics.median(times[n][0]), statistics.median(times[n][1])
        err = errors.get(n, (0.0, 0.0))
        rows.append(dict(variant=n, train_ms=t_train * 1e3, train_ex_s=batch / t_train,
                         train_ratio=base_train / t_train, infer_ms=t_infer * 1e3,
                         infer_ex_s=batch / t_infer, infer_ratio=base_infer / t_infer,
                         out_rel_err=err[0], grad_rel_err=err[1]))
    print(f"\n{'variant':10s} {'out err':>9s} {'grad err':>9s} | {'train ms':>9s} "
          f"{'ex/s':>8s} {'vs stock':>8s} | {'infer ms':>9s} {'ex/s':>8s} {'vs stock':>8s}")
    for row in rows:
        err = ("", "") if row["variant"] == "stock" else (
            f"{row['out_rel_err']:.1e}", f"{row['grad_rel_err']:.1e}")
        print(f"{row['variant']:10s} {err[0]:>9s} {err[1]:>9s} | {row['train_ms']:9.2f} "
              f"{row['train_ex_s']:8.1f} {row['train_ratio']:7.2f}x | {row['infer_ms']:9.2f} "
              f"{row['infer_ex_s']:8.1f} {row['infer_ratio']:7.2f}x")
    print("\nout/grad err: relative L2 error of the output and of all parameter gradients "
          "against the stock model on the same batch; ratios >1 mean faster than stock.")
    if args.json:
        meta = dict(model=args.model, batch=batch, device=str(device), dtype=args.dtype,
                    channels_last=args.channels_last, torch=torch.__version__,
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="fastconv bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
