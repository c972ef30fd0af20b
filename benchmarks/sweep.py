"""Layer sweep on the shared timer: every provider of every traced layer in alternation, with
the achieved TFLOP/s or GB/s against this device's measured ceilings, a backward breakdown,
and (on a GPU) a tuning run that writes the Triton configuration tables.

    python -m benchmarks.sweep --models alexnet --providers eager,fc_extension      # CPU
    python -m benchmarks.sweep --dtype bfloat16 --layout channels_last --peaks --breakdown \\
        --results $OUT/sweep.jsonl                                                  # GPU
    python -m benchmarks.sweep --peaks-only --results $OUT/peaks.jsonl              # ceilings
    python -m benchmarks.sweep --ops conv2d_relu --providers eager,fc_triton \\
        --tune fastconv/backends/triton                                             # tuning

Layers come from tracing the models (``layers.py``), inputs and provider calls from
``cases.py``, times from ``fastconv.timing`` (warm-up, CUDA events, rotated inputs, providers
alternating round by round, medians with interquartile ranges). Per layer and mode it prints
each provider's median [IQR], its ratio to eager with the ratio's interval (``?``: overlaps
1.0, not significant; ``~``: wider than 10%) and the achieved rate: convolutions in TFLOP/s,
pools and batch norm in GB/s of compulsory traffic (``layers.py``), as a share of the measured
matmul rate or copy bandwidth with ``--peaks``.

``--breakdown`` adds the backward alone (``bwd``, on a graph built before timing) and, for
convolutions, its two halves: ``bwd_input`` (grad of the input) and ``bwd_weight`` (grads of
weight and bias), each asked of autograd on its own.

``--tune DIR`` (CUDA): runs the sweep with ``FASTCONV_AUTOTUNE=1`` and a fresh cache, so each
Triton kernel tunes its configuration for every layer it meets, then merges the winners into
``DIR/<table>_configs.json``, the tables fastconv ships (existing entries kept, re-tuned keys
replaced).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastconv from this tree

from fastconv import BackendUnavailableError, models, timing  # noqa: E402
from fastconv.tools import results  # noqa: E402
from fastconv.tools.common import (compile_unavailable, run_metadata, short_reason,  # noqa: E402
                                   unusable_reason)

from . import cases  # noqa: E402
from . import layers as layer_list  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROVIDERS = ("eager", "compile", "fc_auto", "fc_triton", "fc_extension", "fc_torch")


@dataclasses.dataclass
class Run:
    """What ``cases`` needs to build inputs."""
    device: torch.device
    dtype: torch.dtype
    layout: str
    batch: int

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--models", default="alexnet", help="comma-separated models to trace")
    p.add_argument("--layers", default="all", choices=("key", "all"))
    p.add_argument("--ops", default=",".join(layer_list.OPS),
                   help="comma-separated ops to time")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers (default: eager and every usable fc_*)")
    p.add_argument("--breakdown", action="store_true", help="also time the backward alone")
    p.add_argument("--no-fwdbwd", action="store_true", help="skip fwd+bwd (with --breakdown)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layout", default="nchw", choices=("nchw", "channels_last"))
    p.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 2 on CPU")
    p.add_argument("--rounds", type=int, default=None, help="default: 7 on a GPU, 5 on CPU")
    p.add_argument("--sample-seconds", type=float, default=None,
                   help="length of one timed sample (default: 0.02 on a GPU, 0.05 on CPU)")
    p.add_argument("--peaks", action="store_true",
                   help="measure matmul and copy ceilings first and report shares of them")
    p.add_argument("--peaks-only", action="store_true", help="measure the ceilings only")
    p.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="append rows to this results file (scripts/bench_report.py)")
    p.add_argument("--tune", default=None, metavar="DIR",
                   help="tune the Triton kernels on these layers and merge the winners into "
                        "DIR/<table>_configs.json (CUDA only)")
    return p.parse_args(argv)


def skip_reason(provider: str, device: torch.device) -> Optional[str]:
    if provider == "compile":
        return compile_unavailable(device)
    if provider.startswith("fc_"):
        name = provider[3:]
        if name == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            return "Triton on CPU is the interpreter, a testing tool: not timed"
        return unusable_reason(name, device)
    return None


def peak_key(dtype: torch.dtype, device: torch.device) -> str:
    """Which measured matmul rate a conv in ``dtype`` is read against."""
    if device.type != "cuda":
        return "fp32"
    if dtype is torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def work(layer, mode: str, batch: int, itemsize: int) -> tuple[int, int]:
    """(flops, bytes) of one call in ``mode`` (see layers.py for the counting rules)."""
    if layer.op == "conv2d_relu":
        fwd, both = layer.flops(batch, False), layer.flops(batch, True)
        flops = {"fwd": fwd, "fwdbwd": both, "bwd": both - fwd, "bwd_input": fwd,
                 "bwd_weight": fwd}[mode]
        return flops, 0
    fwd, both = layer.bytes(batch, itemsize, False), layer.bytes(batch, itemsize, True)
    return 0, {"fwd": fwd, "fwdbwd": both, "bwd": both - fwd}[mode]


def rate_text(flops: int, nbytes: int, seconds: float, peaks: Optional[dict],
              key: str) -> tuple[str, Optional[float]]:
    if flops:
        rate = flops / seconds / 1e12
        peak = peaks["matmul_tflops"].get(key) if peaks else None
        text = f"{rate:.3g} TFLOP/s"
    else:
        rate = nbytes / seconds / 1e9
        peak = peaks["copy_gbs"] if peaks else None
        text = f"{rate:.3g} GB/s"
    if peak:
        pct = 100 * rate / peak
        return f"{text} ({pct:.0f}%)", pct
    return text, None


def sweep(args, run: Run, providers: list, peaks: Optional[dict], meta: dict) -> list[dict]:
    rows = []
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    chosen = [l for l in layer_list.layers(names, args.layers) if l.op in ops]
    rounds = args.rounds or (7 if run.device.type == "cuda" else 5)
    seconds = args.sample_seconds or (0.02 if run.device.type == "cuda" else 0.05)
    key = peak_key(run.dtype, run.device)
    print(f"{len(chosen)} layers of {', '.join(names)}; providers {', '.join(providers)}; "
          f"{rounds} rounds, alternating; {run.dtype} {run.layout} batch {run.batch} on "
          f"{meta['device_name']}")
    for layer in chosen:
        modes = cases.modes_for(layer, args.breakdown)
        if args.no_fwdbwd:
            modes = tuple(m for m in modes if m != "fwdbwd")
        for mode in modes:
            sets = cases.input_sets(layer, run, mode)
            steps, skipped = {}, {}
            for p in providers:
                try:
                    call = cases.step(layer, p, mode, sets)
                    call(sets[0])  # compile, tune, refuse: outside the timed region
                except BackendUnavailableError as exc:
                    skipped[p] = short_reason(exc, 120)
                    continue
                steps[p] = call
            if not steps:
                print(f"{layer.id} {mode}: no provider can run it: {skipped}")
                continue
            first = next(iter(steps.values()))
            inner = timing.calls_for(lambda: first(sets[0]), seconds, run.device)
            res = timing.compare(steps, device=run.device, rounds=rounds, inner=inner,
                                 warmup=1, inputs=sets)
            flops, nbytes = work(layer, mode, run.batch, run.dtype.itemsize)
            print(f"{layer.id} {mode}")
            for p, s in res.items():
                text, pct = rate_text(flops, nbytes, s.median, peaks, key)
                fields = dict(kind="sweep", case=layer.id, op=layer.op, mode=mode, provider=p,
                              seconds=s.to_dict(), flops=flops, bytes=nbytes, rounds=rounds,
                              iterations=inner, input_shape=[run.batch, *layer.in_shape])
                ratio = ""
                if p != "eager" and "eager" in res:
                    r = timing.ratio(res["eager"], s)
                    fields["vs_eager"] = r.to_dict()
                    mark = ("" if r.significant else "?") + ("~" if r.wide else "")
                    ratio = f"{r.fmt()}{mark}"
                if pct is not None:
                    fields["pct_of_peak"] = round(pct, 2)
                print(f"  {p:13s} {s.fmt('ms'):>26s} {ratio:>22s}  {text}")
                rows.append(results.row(meta, **fields))
            for p, reason in skipped.items():
                print(f"  {p:13s} skipped: {reason}")
    return rows


def merge_tuned(cache_root: Path, out_dir: Path) -> list[Path]:
    """Merge every tuning table of ``cache_root/autotune`` into ``out_dir``."""
    from fastconv._cache import atomic_write_json

    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for tuned in sorted((cache_root / "autotune").glob("*.json")):
        data = json.loads(tuned.read_text())
        target = out_dir / f"{tuned.stem}_configs.json"
        shipped = json.loads(target.read_text()) if target.exists() else {}
        shipped.setdefault("format", data.get("format", 1))
        entries = shipped.setdefault("entries", {})
        for tag, table in data.get("entries", {}).items():
            entries.setdefault(tag, {}).update(table)
        atomic_write_json(target, shipped)
        written.append(target)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tune_cache = None
    if args.tune:
        if device.type != "cuda":
            print("sweep: --tune needs a CUDA device (Triton tunes on real launches)",
                  file=sys.stderr)
            return 2
        tune_cache = Path(tempfile.mkdtemp(prefix="fastconv-tune-"))
        os.environ["FASTCONV_CACHE_DIR"] = str(tune_cache)
        from fastconv.backends.triton import autotune
        autotune.set_enabled(True)
    run = Run(device, DTYPES[args.dtype], args.layout,
              args.batch or (128 if device.type == "cuda" else 2))
    meta = run_metadata(device, dtype=args.dtype, layout=args.layout, batch=run.batch)
    peaks = None
    if args.peaks or args.peaks_only:
        peaks = timing.peaks(device)
        print(f"ceilings on {peaks['device']}: matmul "
              + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks["matmul_tflops"].items())
              + f"; copy {peaks['copy_gbs']:.3g} GB/s")
        if args.results:
            results.append(args.results, [results.row(
                meta, kind="peaks", case=peaks["device"], mode="-", provider="-",
                matmul_tflops=peaks["matmul_tflops"], copy_gbs=peaks["copy_gbs"])])
        if args.peaks_only:
            return 0
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        for p in providers:
            if p not in PROVIDERS:
                print(f"sweep: --providers: {p!r} is not one of {', '.join(PROVIDERS)}",
                      file=sys.stderr)
                return 2
    else:
        providers = [p for p in PROVIDERS if p != "compile"]
    usable = []
    for p in providers:
        reason = skip_reason(p, device)
        if reason:
            print(f"{p}: skipped: {reason}")
        else:
            usable.append(p)
    for name in (m.strip() for m in args.models.split(",")):
        if name and name not in models.MODELS:
            print(f"sweep: --models: {name!r} is not one of {', '.join(sorted(models.MODELS))}",
                  file=sys.stderr)
            return 2
    rows = sweep(args, run, usable, peaks, meta)
    if args.results:
        results.append(args.results, rows)
        print(f"{len(rows)} rows appended to {args.results}")
    if tune_cache is not None:
        for path in merge_tuned(tune_cache, Path(args.tune)):
            print(f"tuned configurations merged into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
