"""``fastconv bench``: convert a model, check that it computes what stock torch.nn computes, and
time a training step (forward, cross-entropy, backward, SGD step) and an inference step per
backend against the stock model (and torch.compile of both), measured alternately in one run
with ``fastconv.timing``: medians with their interquartile range, ratios with the range of the
per-round ratios and a flag when that range overlaps 1.0 or is wide.

The check runs each variant once on the same batch, with dropout off, next to a float64 copy
of the stock model: a variant passes when its error against float64 is at most twice the
stock model's own error plus a few unit roundoffs of the compute dtype (a tolerance that means
something whatever the dtype, TF32 or AMP).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from typing import Callable, Optional

import torch
from torch import nn

from .. import convert, dispatch, models, timing
from .. import nn as fnn
from . import results
from .args import add_model_arguments, backend_list, nonneg_int, positive_int
from .common import (amp_dtype, compile_unavailable, disable_dropout, grad_scaler,
                     parse_backends, parse_model_args, pick_device, rel_err, reset_compiler,
                     run_metadata, sgd_step, short_reason)

# unit roundoff of the arithmetic each run uses (TF32 keeps 10 mantissa bits, as fp16)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8, "tf32": 2.0 ** -11}
CHECK_FACTOR, CHECK_FLOOR_U = 2.0, 4.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--backends", default=None, type=backend_list,
                   help="comma-separated backends to compare, auto included (default: auto and "
                        "every available one)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the stock and of each converted model "
                        "(default: on for CUDA, "
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
    p.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="append result rows to this JSON-lines file (scripts/bench_report.py)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the speed-ratio table as a bar chart (needs matplotlib)")


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
    names = parse_backends(args.backends, device, _log, with_auto=True)
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
    # which implementation each converted layer runs in each mode, asked of dispatch with its
    # real calls (the timed batch, training or eval mode): decides them now, before the timing
    backends_used = {n: {mode: layer_backends(m, xs[0], amp, train=mode == "train")
                         for mode in modes} for n, m in converted.items()}
    errors: dict[str, dict] = {}
    if args.check:
        cb = max(2, min(batch, args.check_batch))
        _log(f"  checking outputs and gradients on {cb} examples against stock and float64")
        errors = check_variants(stock, converted, xs[0][:cb], ys[0][:cb], amp)

    # each variant trains its own copy so SGD updates do not leak between them
    variants: dict[str, tuple[nn.Module, bool]] = {"stock": (stock, False)}
    if want_compile:
        variants["compile"] = (stock, True)
    for n, m in converted.items():
        variants[n] = (m, False)
    if want_compile:  # the converted models under torch.compile too
        variants.update({f"{n}+compile": (m, True) for n, m in converted.items()})
    runners: dict[str, dict[str, Callable[[], None]]] = {}
    for name, (model, compiled) in variants.items():
        train_m = copy.deepcopy(model).train()
        infer_m = copy.deepcopy(model).eval()
        if compiled:
            reset_compiler()
            train_m, infer_m = torch.compile(train_m), torch.compile(infer_m)
        fns = {}
        if "train" in modes:
            fns["train"] = make_train_step(train_m, xs, ys, amp, device)
        if "infer" in modes:
            fns["infer"] = make_infer_step(infer_m, xs, amp, device)
        try:  # warm-up outside the timed region: compilation, autotuning, cuDNN's choice
            _log(f"  warming up {name}" + (" (compiling)" if compiled else ""))
            for fn in fns.values():
                for _ in range(max(1, args.warmup)):
                    fn()
        except Exception as exc:
            if not compiled:
                raise
            skipped[name] = f"torch.compile failed: {short_reason(exc)}"
            _log(f"  {name} skipped: {skipped[name]}")
            continue
        runners[name] = fns

    # every (variant, mode) in alternation, who goes first rotating per round
    flat = {(n, mode): fn for n, fns in runners.items() for mode, fn in fns.items()}
    stats = timing.compare(flat, device=device, rounds=args.rounds, calls=steps, warmup=0,
                           on_round=lambda r, total: _log(f"  round {r}/{total} done"))

    rows = []
    for n in runners:
        row = dict(variant=n, layers=backends_used.get(n.split("+")[0], {}))
        for mode in modes:
            s, base = stats[(n, mode)], stats[("stock", mode)]
            r = timing.ratio(base, s)
            t = s.median
            row.update({f"{mode}_ms": t * 1e3, f"{mode}_ex_s": batch / t,
                        f"{mode}_q1_ms": s.q1 * 1e3, f"{mode}_q3_ms": s.q3 * 1e3,
                        f"{mode}_min_ms": s.min * 1e3, f"{mode}_max_ms": s.max * 1e3,
                        f"{mode}_ratio": 1.0 if n == "stock" else r.value,
                        f"{mode}_ratio_low": 1.0 if n == "stock" else r.low,
                        f"{mode}_ratio_high": 1.0 if n == "stock" else r.high,
                        f"{mode}_flag": "" if n == "stock" else r.flag,
                        f"{mode}_times_ms": [round(v * 1e3, 4) for v in s.samples]})
        e = errors.get(n)
        if e:
            row.update(e)
        else:
            row.update(out_rel_err=None, grad_rel_err=None, check="-")
        rows.append(row)
    _print_table(rows, modes, bool(errors))
    _print_layers(backends_used)
    _print_flags(rows, modes, args.rounds)
    failed = [r["variant"] for r in rows if r.get("check") == "FAIL"]
    if skipped:
        for name, reason in skipped.items():
            print(f"{name}: not timed: {reason}")
    if failed:
        print(f"\nCHECK FAILED for {', '.join(failed)}: error against float64 exceeds "
              f"{CHECK_FACTOR:g}x the stock model's own plus {CHECK_FLOOR_U:g} unit roundoffs")
    meta = run_metadata(device, model=args.model, model_kwargs=model_kwargs,
                        input_shape=list(shape), batch=batch, dtype=args.dtype,
                        layout=layout, channels_last=args.channels_last, steps=steps,
                        rounds=args.rounds, inputs=args.inputs, backends=names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(kind="fastconv-bench", meta=meta, rows=rows, skipped=skipped), f,
                      indent=1)
    if getattr(args, "results", None):
        results.append(args.results, _result_rows(meta, stats, modes, args.model))
    if getattr(args, "plot", None):
        plot_ratios(rows, modes, args.plot,
                    f"fastconv bench: {args.model}, batch {batch}, {meta['device_name']}, "
                    f"{args.dtype}, {layout}")
        _log(f"  plot written to {args.plot}")
    return 1 if failed else 0


def provider_name(variant: str) -> str:
    """bench variant -> the provider vocabulary of the result rows and reports."""
    if variant == "stock":
        return "eager"
    if variant == "compile":
        return "compile"
    return "fc_" + variant


def _result_rows(meta: dict, stats: dict, modes, model: str) -> list[dict]:
    keep = {k: meta[k] for k in ("device", "device_name", "torch", "cuda", "triton", "commit",
                                 "fastconv", "threads", "time", "dtype", "layout", "batch",
                                 "steps", "rounds") if k in meta}
    out = []
    for (n, mode), s in stats.items():
        fields = dict(kind="bench", case=model, mode=mode, provider=provider_name(n),
                      seconds=s.to_dict(), ex_s=meta["batch"] / s.median)
        if n != "stock":
            fields["vs_eager"] = timing.ratio(stats[("stock", mode)], s).to_dict()
        out.append(results.row(keep, **fields))
    return out


# --------------------------------------------------------------------------- which backend ran
def layer_backends(model: nn.Module, x: torch.Tensor, amp=None,
                   train: bool = False) -> list[tuple[str, str, str]]:
    """``(module name, op, backend)`` for each fastconv layer call of one forward of ``model``
    on ``x``: what dispatch selects for that layer's actual call signature, in eval mode
    without autograd (``train=False``) or in training mode with it, where a conv's backend
    may name one implementation per pass."""
    seen: list[tuple[str, str, str]] = []
    current: list[str] = []
    select_call, fast = dispatch.select_call, dispatch.FAST

    def recording_select(op, checked, backend):
        chosen, final = select_call(op, checked, backend)
        seen.append((current[-1] if current else "?", op, chosen.name))
        return chosen, final

    def pre(name):
        def hook(mod, inputs):
            current.append(name)
        return hook

    def post(mod, inputs, output):
        current.pop()

    twin = copy.deepcopy(model).train(train)  # the model's running stats stay as they are
    handles = []
    for name, mod in twin.named_modules():
        if type(mod).__module__ == fnn.__name__ and hasattr(mod, "backend"):
            handles += [mod.register_forward_pre_hook(pre(name)),
                        mod.register_forward_hook(post)]
    # every call goes through select_call: decided signatures' fast path is set aside meanwhile
    dispatch.select_call, dispatch.FAST = recording_select, {}
    try:
        with torch.set_grad_enabled(train), torch.autocast(
                x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            twin(x)
    finally:
        dispatch.select_call, dispatch.FAST = select_call, fast
        for h in handles:
            h.remove()
    return seen


def summarize_layers(layers: list) -> str:
    """``layer_backends``' list as counts: "conv2d_relu x2 on extension, ..." ("none" when
    empty); a per-pass conv choice is shown in parentheses."""
    summary: dict[tuple[str, str], int] = {}
    for _, op, backend in layers:
        summary[(op, backend)] = summary.get((op, backend), 0) + 1
    return ", ".join(f"{op} x{k} on {f'({b})' if ',' in b else b}"
                     for (op, b), k in summary.items()) or "none"


def _print_layers(used: dict[str, dict[str, list]]) -> None:
    for name, modes in used.items():
        for mode, layers in modes.items():
            print(f"{name} {mode} layers ran: {summarize_layers(layers)}")


def _print_flags(rows: list[dict], modes, rounds: int) -> None:
    notes = [f"  {r['variant']} {mode}: {r[mode + '_flag']}" for r in rows for mode in modes
             if r.get(mode + "_flag")]
    if notes:
        print("\nratios to read with care (spread is the interquartile range of the per-round "
              "ratios):\n" + "\n".join(notes))
        if any("more rounds" in n for n in notes):
            print(f"  -> rerun with more --rounds (now {rounds}) on a quieter machine")


def plot_ratios(rows: list[dict], modes, path, title: str) -> dict:
    """The ratio table as a bar chart: one bar series per mode, a group per variant, error
    bars from the interquartile interval. Returns what was drawn (also stored in the PNG's
    ``Description`` text chunk as JSON)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4.0))
    drawn = {"title": title, "variants": names, "series": []}
    for i, mode in enumerate(modes):
        vals = [r[f"{mode}_ratio"] for r in rows]
        # an interval that could not be measured (one sample) gets no error bar
        lo = [v - r[f"{mode}_ratio_low"] if math.isfinite(r[f"{mode}_ratio_high"]) else 0.0
              for v, r in zip(vals, rows)]
        hi = [r[f"{mode}_ratio_high"] - v if math.isfinite(r[f"{mode}_ratio_high"]) else 0.0
              for v, r in zip(vals, rows)]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, vals, width=width, yerr=[lo, hi], capsize=3, label=mode)
        drawn["series"].append({"mode": mode, "ratios": [round(v, 4) for v in vals]})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("speed vs stock (>1 faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Description": json.dumps(drawn)})
    plt.close(fig)
    return drawn


def _fmt_err(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.1e}"


def _print_table(rows: list[dict], modes, checked: bool) -> None:
    head = f"{'variant':17s}"
    if checked:
        head += f" {'out err':>8s} {'grad err':>8s} {'fp64 err':>8s} {'check':>5s}"
    for mode in modes:
        head += f" | {mode + ' ms [IQR]':>21s} {'ex/s':>8s} {'vs stock [IQR]':>20s}"
    print("\n" + head)
    for row in rows:
        line = f"{row['variant']:17s}"
        if checked:
            stock = row["variant"] == "stock"
            fp64 = (max(row["out_err_fp64"], row["grad_err_fp64"])
                    if row.get("out_err_fp64") is not None else None)
            line += (f" {'' if stock else _fmt_err(row['out_rel_err']):>8s}"
                     f" {'' if stock else _fmt_err(row['grad_rel_err']):>8s}"
                     f" {_fmt_err(fp64):>8s} {row['check']:>5s}")
        for mode in modes:
            ms = (f"{row[mode + '_ms']:.2f} [{row[mode + '_q1_ms']:.2f}-"
                  f"{row[mode + '_q3_ms']:.2f}]")
            if row["variant"] == "stock":
                ratio = "1.00x"
            else:
                flag = row[mode + "_flag"]
                mark = ("?" if "not significant" in flag else "") + ("~" if "wide" in flag
                                                                     else "")
                ratio = (f"{row[mode + '_ratio']:.2f}x [{row[mode + '_ratio_low']:.2f}-"
                         f"{row[mode + '_ratio_high']:.2f}]{mark}")
            line += f" | {ms:>21s} {row[mode + '_ex_s']:8.1f} {ratio:>20s}"
        print(line)
    print("\nex/s: examples per second (median step). vs stock: >1 is faster than stock torch, "
          "median of the per-round ratios [interquartile range]; ? not significant (range "
          "overlaps 1.0), ~ wide range (over 10%).")
    if checked:
        print("out/grad err: relative L2 error of the output and of all parameter gradients "
              "against stock on the same batch (dropout off); fp64 err: the larger of the two "
              f"against a float64 stock model; check ok: at most {CHECK_FACTOR:g}x stock's own "
              f"fp64 err + {CHECK_FLOOR_U:g} unit roundoffs.")


def main(argv: Optional[list] = None) -> int:
    from ..cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
