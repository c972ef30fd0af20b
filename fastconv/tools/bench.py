"""``fastconv bench``: convert a model, check that it computes what stock torch.nn computes, and
time a training step (forward, cross-entropy, backward, SGD step) and an inference step per
backend against the stock model (and torch.compile of it), measured alternately in one run.

The check runs each variant once on the same batch, with dropout off, next to a float64 copy
of the stock model: a variant passes when its error against float64 is at most twice the
stock model's own error plus a few unit roundoffs of the compute dtype (a tolerance that means
something whatever the dtype, TF32 or AMP).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Callable, Optional

import torch
from torch import nn

from .. import convert, models
from .args import backend_list, key_value, nonneg_int, positive_int
from .args import device as device_arg
from .common import (DTYPES, amp_dtype, compile_unavailable, disable_dropout, grad_scaler, median,
                     parse_backends, parse_model_args, pick_device, rel_err, reset_compiler,
                     run_metadata, sgd_step, short_reason, time_calls)

# unit roundoff of the arithmetic each run uses (TF32 keeps 10 mantissa bits, as fp16)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8, "tf32": 2.0 ** -11}
CHECK_FACTOR, CHECK_FLOOR_U = 2.0, 4.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="alexnet", choices=sorted(models.MODELS),
                   help="network of fastconv.models")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   type=key_value,
                   help="builder keyword, e.g. narrow=true (vgg11), variant=relu (lenet)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size (default: 128 on a GPU, 8 on CPU)")
    p.add_argument("--device", default=None, type=device_arg,
                   help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="float16/bfloat16 run the step under torch.autocast (AMP)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")
    p.add_argument("--backends", default=None, type=backend_list,
                   help="comma-separated backends to compare (default: every available one)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the stock model (default: on for CUDA, "
                        "off on CPU, where inductor takes minutes to compile on few cores)")
    p.add_argument("--mode", default="both", choices=("train", "infer", "both"),
                   help="which steps to time")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per round "
                   "(default: 10 on a GPU, 3 on CPU)")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps per variant first")
    p.add_argument("--inputs", type=positive_int, default=3,
                   help="distinct random batches, rotated so caches do not flatter")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare outputs and gradients with stock and float64 first")
    p.add_argument("--check-batch", type=positive_int, default=16, help="batch size of the check")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN pick its fastest algorithms (the stronger stock baseline)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- check
def _forward_backward(m: nn.Module, x, y, amp) -> tuple[torch.Tensor, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = m(x)
        loss = nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    grads = torch.cat([p.grad.flatten().double() for p in m.parameters()
                       if p.grad is not None])
    return out.detach(), grads


def check_variants(stock: nn.Module, converted: dict[str, nn.Module], x, y, amp,
                   ) -> dict[str, dict]:
    """Errors of every variant against stock and against a float64 stock, dropout off."""
    ref_model = disable_dropout(copy.deepcopy(stock)).double()
    ref_out, ref_grad = _forward_backward(ref_model, x.double(), y, None)
    del ref_model
    if amp is not None:
        u = UNIT_ROUNDOFF[amp]
    elif x.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        u = UNIT_ROUNDOFF["tf32"]
    else:
        u = UNIT_ROUNDOFF[torch.float32]
    results: dict[str, dict] = {}
    for name, model in {"stock": stock, **converted}.items():
        m = disable_dropout(copy.deepcopy(model))
        out, grad = _forward_backward(m, x, y, amp)
        results[name] = dict(out=out, grad=grad, out_err_fp64=rel_err(out, ref_out),
                             grad_err_fp64=rel_err(grad, ref_grad))
        del m
    s = results["stock"]
    for name, r in results.items():
        r["out_rel_err"] = rel_err(r["out"], s["out"])
        r["grad_rel_err"] = rel_err(r["grad"], s["grad"])
        if name == "stock":
            r["check"] = "ref"
        else:
            ok = all(r[k] <= CHECK_FACTOR * s[k] + CHECK_FLOOR_U * u
                     for k in ("out_err_fp64", "grad_err_fp64"))
            r["check"] = "ok" if ok else "FAIL"
    for r in results.values():
        del r["out"], r["grad"]
    return results


# --------------------------------------------------------------------------- steps
def make_train_step(m: nn.Module, xs: list, ys: list, amp, device) -> Callable[[], None]:
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    scaler = grad_scaler(amp, device)  # fp16 loss scaling: its cost belongs in a step
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        sgd_step(m, opt, xs[i], ys[i], amp, scaler)
    return step


def make_infer_step(m: nn.Module, xs: list, amp, device) -> Callable[[], None]:
    state = {"i": 0}

    @torch.no_grad()
    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            m(xs[i])
    return step


# --------------------------------------------------------------------------- main
def run(args) -> int:
    device = pick_device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    steps = args.steps or (10 if device.type == "cuda" else 3)
    amp = amp_dtype(args.dtype)
    model_kwargs = parse_model_args(args.model_arg)
    names = parse_backends(args.backends, device, _log)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    want_compile = args.compile if args.compile is not None else device.type == "cuda"
    skipped: dict[str, str] = {}
    if want_compile:
        reason = compile_unavailable(device)
        if reason:
            skipped["compile"] = reason
            want_compile = False
    elif args.compile is None:
        skipped["compile"] = "off by default on CPU (inductor compiles for minutes on few " \
                             "cores); pass --compile"

    torch.manual_seed(0)
    try:
        stock = models.build(args.model, **model_kwargs).to(device)
    except TypeError as exc:
        raise SystemExit(f"--model-arg: {args.model} does not take {model_kwargs}: {exc}")
    shape = models.INPUT_SIZES[args.model]
    if "image_size" in model_kwargs:
        shape = (shape[0], model_kwargs["image_size"], model_kwargs["image_size"])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    stock = stock.to(memory_format=fmt)
    gen = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randn(batch, *shape, generator=gen).to(device).contiguous(memory_format=fmt)
          for _ in range(max(1, args.inputs))]
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in xs]
    layout = "channels_last" if args.channels_last else "nchw"
    _log(f"fastconv bench: {args.model} {'x'.join(map(str, shape))}, batch {batch}, {device} "
         f"({run_metadata(device)['device_name']}), {args.dtype}"
         f"{' (autocast)' if amp else ''}, {layout}; variants: stock"
         f"{', compile' if want_compile else ''}, {', '.join(names)}; {args.rounds} rounds x "
         f"{steps} steps, alternating")
    for name, reason in skipped.items():
        _log(f"  {name} skipped: {reason}")

    converted = {n: convert(stock, backend=n) for n in names}
    errors: dict[str, dict] = {}
    if args.check:
        cb = max(2, min(batch, args.check_batch))
        _log(f"  checking outputs and gradients on {cb} examples against stock and float64")
        errors = check_variants(stock, converted, xs[0][:cb], ys[0][:cb], amp)

    # each variant trains its own copy so SGD updates do not leak between them
    runners: dict[str, dict[str, Callable[[], None]]] = {}
    for name, model in {"stock": stock, **({"compile": stock} if want_compile else {}),
                        **converted}.items():
        train_m = copy.deepcopy(model).train()
        infer_m = copy.deepcopy(model).eval()
        if name == "compile":
            reset_compiler()
            train_m, infer_m = torch.compile(train_m), torch.compile(infer_m)
        fns = {}
        if "train" in modes:
            fns["train"] = make_train_step(train_m, xs, ys, amp, device)
        if "infer" in modes:
            fns["infer"] = make_infer_step(infer_m, xs, amp, device)
        try:  # warm-up outside the timed region: compilation, autotuning, cuDNN's choice
            _log(f"  warming up {name}" + (" (compiling)" if name == "compile" else ""))
            for fn in fns.values():
                for _ in range(max(1, args.warmup)):
                    fn()
        except Exception as exc:
            if name != "compile":
                raise
            skipped["compile"] = f"torch.compile failed: {short_reason(exc)}"
            _log(f"  compile skipped: {skipped['compile']}")
            continue
        runners[name] = fns

    times = {n: {mode: [] for mode in modes} for n in runners}
    order = list(runners)
    for r in range(args.rounds):
        for n in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            for mode, fn in runners[n].items():
                times[n][mode] += time_calls(fn, steps, device)
        _log(f"  round {r + 1}/{args.rounds} done")

    rows = []
    base = {mode: median(times["stock"][mode]) for mode in modes}
    for n in runners:
        row = dict(variant=n)
        for mode in modes:
            t = median(times[n][mode])
            row.update({f"{mode}_ms": t * 1e3, f"{mode}_ex_s": batch / t,
                        f"{mode}_ratio": base[mode] / t,
                        f"{mode}_times_ms": [round(v * 1e3, 4) for v in times[n][mode]]})
        e = errors.get(n)
        if e:
            row.update(e)
        else:
            row.update(out_rel_err=None, grad_rel_err=None, check="-")
        rows.append(row)
    _print_table(rows, modes, bool(errors))
    failed = [r["variant"] for r in rows if r.get("check") == "FAIL"]
    if skipped:
        for name, reason in skipped.items():
            print(f"{name}: not timed: {reason}")
    if failed:
        print(f"\nCHECK FAILED for {', '.join(failed)}: error against float64 exceeds "
              f"{CHECK_FACTOR:g}x the stock model's own plus {CHECK_FLOOR_U:g} unit roundoffs")
    if args.json:
        meta = run_metadata(device, model=args.model, model_kwargs=model_kwargs,
                            input_shape=list(shape), batch=batch, dtype=args.dtype,
                            layout=layout, channels_last=args.channels_last, steps=steps,
                            rounds=args.rounds, inputs=args.inputs, backends=names)
        with open(args.json, "w") as f:
            json.dump(dict(kind="fastconv-bench", meta=meta, rows=rows, skipped=skipped), f,
                      indent=1)
    return 1 if failed else 0


def _fmt_err(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.1e}"


def _print_table(rows: list[dict], modes, checked: bool) -> None:
    head = f"{'variant':10s}"
    if checked:
        head += f" {'out err':>8s} {'grad err':>8s} {'fp64 err':>8s} {'check':>5s}"
    for mode in modes:
        head += f" | {mode + ' ms':>9s} {'ex/s':>9s} {'vs stock':>8s}"
    print("\n" + head)
    for row in rows:
        line = f"{row['variant']:10s}"
        if checked:
            stock = row["variant"] == "stock"
            fp64 = (max(row["out_err_fp64"], row["grad_err_fp64"])
                    if row.get("out_err_fp64") is not None else None)
            line += (f" {'' if stock else _fmt_err(row['out_rel_err']):>8s}"
                     f" {'' if stock else _fmt_err(row['grad_rel_err']):>8s}"
                     f" {_fmt_err(fp64):>8s} {row['check']:>5s}")
        for mode in modes:
            line += (f" | {row[mode + '_ms']:9.2f} {row[mode + '_ex_s']:9.1f} "
                     f"{row[mode + '_ratio']:7.2f}x")
        print(line)
    print("\nex/s: examples per second (median step). vs stock: >1 is faster than stock torch.")
    if checked:
        print("out/grad err: relative L2 error of the output and of all parameter gradients "
              "against stock on the same batch (dropout off); fp64 err: the larger of the two "
              f"against a float64 stock model; check ok: at most {CHECK_FACTOR:g}x stock's own "
              f"fp64 err + {CHECK_FLOOR_U:g} unit roundoffs.")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="fastconv bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
