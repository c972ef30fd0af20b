#!/usr/bin/env python
"""GPU sweep of fastconv's Triton max-pool (+ReLU) and batch norm (+ReLU) against torch eager.

Pools and batch norm only move bytes, so the yardstick is the device-to-device copy bandwidth,
measured first. Then, for the max-pool layers of AlexNet (1x224x224 input), VGG-16-BN (CIFAR,
3x32x32) and ResNet-18 (224x224) and the batch-norm layers of VGG-16-BN and ResNet-18, at
batch 128 in bfloat16, channels_last and NCHW, it times with ``triton.testing.do_bench``
medians:

* max-pool  fwd:     fused ``max_pool2d(x, relu=True)``  vs  ``F.max_pool2d(F.relu(x))``
            fwd+bwd: the same plus the gradient of x
* batch norm fwd:    fused training ``batch_norm(relu=True)`` (running stats updated)  vs
                     ``F.relu(F.batch_norm(x, rm, rv, w, b, training=True))``
            fwd+bwd: the same plus the gradients of x, weight and bias

and prints per layer: milliseconds, speed-up over torch (>1: fastconv faster), achieved GB/s
and its percentage of copy bandwidth. Bytes are counted two ways:

* ``alg``: the full-tensor reads and writes the kernels actually do (batch norm reads x twice
  in training forward; its backward reads dy, x and, with ReLU, y twice); re-reads of
  overlapping pool windows (served by caches) and per-channel vectors are not counted;
* ``min``: every distinct tensor once (x, y forward; dy, x, y for the ReLU mask, dx backward;
  + the int8 argmax for max-pool), the least any implementation must move.

Batch norm fwd+bwd is timed twice: with the ReLU mask read from the saved output (the default,
``RELU_MASK_FROM_OUTPUT = True``) and recomputed from x ("mask-from-x"), which moves two fewer
tensor passes.

``--tune`` then times alternative tile sizes / warps / reduction widths on the channels_last
layers (each kernel alone: forward op, backward op) and prints the best per layer and overall,
as lines to paste into ``TUNING`` in fastconv/backends/triton/{pool,batchnorm}.py.

    python scripts/gpu_pool_bn_sweep.py                        # table, defaults (~2 min)
    python scripts/gpu_pool_bn_sweep.py --tune --json $OUT/pool_bn_sweep.json
    python scripts/gpu_pool_bn_sweep.py --smoke                # plumbing check on CPU

Self-contained apart from fastconv itself; needs a CUDA GPU (except ``--smoke``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOKE = "--smoke" in sys.argv  # interpreter, tiny shapes, wall-clock timer
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fastconv.backends.triton import batchnorm as bn  # noqa: E402
from fastconv.backends.triton import pool  # noqa: E402

BATCH = 128


# --------------------------------------------------------------------------- layer shapes
def pool_layers():
    """(model, name, C, H, W, kernel, stride, padding): input shapes of every max-pool."""
    layers = [("alexnet", "pool1 3/2", 96, 54, 54, 3, 2, 0),
              ("alexnet", "pool2 3/2", 256, 26, 26, 3, 2, 0),
              ("alexnet", "pool3 3/2", 256, 12, 12, 3, 2, 0)]
    for c, s in ((64, 32), (128, 16), (256, 8), (512, 4), (512, 2)):
        layers.append(("vgg16bn", f"pool {c}x{s}x{s} 2/2", c, s, s, 2, 2, 0))
    layers.append(("resnet18", "stem pool 3/2/1", 64, 112, 112, 3, 2, 1))
    return layers


def bn_layers():
    """(model, name, C, H, W, count): batch-norm input shapes, with how often each occurs."""
    layers = [("vgg16bn", f"bn {c}x{s}x{s}", c, s, s, n)
              for c, s, n in ((64, 32, 2), (128, 16, 2), (256, 8, 3), (512, 4, 3), (512, 2, 3))]
    layers += [("resnet18", "bn stem 64x112x112", 64, 112, 112, 1)]
    layers += [("resnet18", f"bn {c}x{s}x{s}", c, s, s, 4)  # + downsample BNs, not counted
               for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))]
    return layers


# --------------------------------------------------------------------------- timing
def bench(fn, grad_to_none=None):
    """Median milliseconds of ``fn``."""
    if SMOKE:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       return_mode="median")
    except TypeError:  # older Triton without return_mode
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       quantiles=[0.5])


def copy_bandwidth(device):
    """Device-to-device copy GB/s (read + write), from a 1 GiB bf16 tensor."""
    n = (2**20 if SMOKE else 2**29)
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _input(shape, dtype, channels_last, device, requires_grad=False):
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    x = x.contiguous(memory_format=_fmt(channels_last))
    return x.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- max-pool
def pool_case(layer, dtype, channels_last, device, batch):
    model, name, c, h, w, k, s, p = layer
    x = _input((batch, c, h, w), dtype, channels_last, device, True)
    geo = ((k, k), (s, s), (p, p), (1, 1))

    def fused():
        return pool.max_pool2d(x, *geo, False, False, True)

    def eager():
        return F.max_pool2d(F.relu(x), k, s, p)

    y = fused()
    ref = eager()
    err = (y.float() - ref.float()).abs().max().item()
    g = torch.randn_like(y)
    esize = x.element_size()
    nin, nout = x.numel(), y.numel()
    # fwd: x, y, int8 argmax; bwd: dy, argmax, dx -- the kernels move exactly these
    fwd_bytes = nin * esize + nout * (esize + 1)
    bwd_bytes = nout * (esize + 1) + nin * esize
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            with torch.no_grad():
                t_f, t_e = bench(fused), bench(eager)
            nbytes = fwd_bytes
        else:
            t_f = bench(lambda: torch.autograd.grad(fused(), x, g), [x])
            t_e = bench(lambda: torch.autograd.grad(eager(), x, g), [x])
            nbytes = fwd_bytes + bwd_bytes
        rows.append(dict(op="max_pool2d+relu", model=model, layer=name, mode=mode,
                         layout="NHWC" if channels_last else "NCHW", ms=t_f, torch_ms=t_e,
                         alg_bytes=nbytes, min_bytes=nbytes, max_abs_err=err, count=1))
    return rows


# --------------------------------------------------------------------------- batch norm
def bn_case(layer, dtype, channels_last, device, batch):
    model, name, c, h, w, count = layer
    x = _input((batch, c, h, w), dtype, channels_last, device, True)
    wt = torch.randn(c, device=device).requires_grad_(True)
    bt = torch.randn(c, device=device).requires_grad_(True)
    rm = torch.zeros(c, device=device)
    rv = torch.ones(c, device=device)

    def fused():
        return bn.batch_norm(x, rm, rv, wt, bt, True, 0.1, 1e-5, True)

    def eager():
        return F.relu(F.batch_norm(x, rm, rv, wt, bt, True, 0.1, 1e-5))

    y, ref = fused(), eager()
    err = (y.float() - ref.float()).abs().max().item()
    g = torch.randn_like(y)
    t = x.numel() * x.element_size()  # one full pass over a tensor
    layout = "NHWC" if channels_last else "NCHW"
    rows = []
    with torch.no_grad():
        t_f, t_e = bench(fused), bench(eager)
    # stats read x; normalise reads x, writes y
    rows.append(dict(op="batch_norm+relu", model=model, layer=name, mode="fwd", layout=layout,
                     ms=t_f, torch_ms=t_e, alg_bytes=3 * t, min_bytes=2 * t, max_abs_err=err,
                     count=count))
    t_e = bench(lambda: torch.autograd.grad(eager(), [x, wt, bt], g), [x, wt, bt])
    saved = bn.RELU_MASK_FROM_OUTPUT
    try:
        for from_output in (True, False):
            bn.RELU_MASK_FROM_OUTPUT = from_output
            t_f = bench(lambda: torch.autograd.grad(fused(), [x, wt, bt], g), [x, wt, bt])
            # backward: reduce reads dy, x (, y); dx pass reads dy, x (, y), writes dx
            extra = 2 * t if from_output else 0
            rows.append(dict(op="batch_norm+relu" if from_output else
                             "batch_norm+relu mask-from-x", model=model, layer=name,
                             mode="fwd+bwd", layout=layout, ms=t_f, torch_ms=t_e,
                             alg_bytes=3 * t + 5 * t + extra,
                             min_bytes=2 * t + 3 * t + extra // 2, max_abs_err=err,
                             count=count))
    finally:
        bn.RELU_MASK_FROM_OUTPUT = saved
    return rows


# --------------------------------------------------------------------------- tuning
POOL_CONFIGS = [dict(tile=t, bwd_tile=bt, num_warps=nw)
                for t, bt, nw in ((512, 512, 4), (1024, 512, 4), (1024, 1024, 4), (2048, 1024, 8),
                                  (1024, 1024, 8), (512, 256, 2), (2048, 2048, 8), (4096, 2048, 8))]
BN_CONFIGS = [dict(tile=t, num_warps=nw, reduce_tile=rt, programs_per_sm=pp, reduce_warps=rw)
              for t, nw, rt, pp, rw in ((2048, 4, 2048, 4, 4), (1024, 4, 1024, 4, 4),
                                        (4096, 8, 4096, 4, 8), (4096, 4, 2048, 8, 4),
                                        (2048, 8, 2048, 2, 8), (8192, 8, 4096, 2, 8),
                                        (2048, 4, 1024, 8, 4), (1024, 2, 2048, 16, 4))]


def _pool_ops(layer, dtype, channels_last, device, batch):
    _, _, c, h, w, k, s, p = layer
    x = _input((batch, c, h, w), dtype, channels_last, device)
    args = ([k, k], [s, s], [p, p], [1, 1], False, False, True)
    out, idx = torch.ops.fastconv.triton_max_pool2d(x, *args)
    g = torch.randn_like(out)

    def fwd():
        return torch.ops.fastconv.triton_max_pool2d(x, *args)

    def bwd():
        return torch.ops.fastconv.triton_max_pool2d_backward(
            g, None, idx, list(x.shape), *[list(a) for a in args[:4]], False, False, True,
            channels_last)

    esize = x.element_size()
    return fwd, bwd, x.numel() * esize + out.numel() * (esize + 1), \
        out.numel() * (esize + 1) + x.numel() * esize


def _bn_ops(layer, dtype, channels_last, device, batch):
    _, _, c, h, w, _ = layer
    x = _input((batch, c, h, w), dtype, channels_last, device)
    wt, bt = torch.randn(c, device=device), torch.randn(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(x, rm, rv, True, 0.1, 1e-5)
    y = torch.ops.fastconv.triton_batch_norm(x, wt, bt, centre, invstd, True, True)
    g = torch.randn_like(y)

    def fwd():
        cen, _, inv = torch.ops.fastconv.triton_batch_norm_stats(x, rm, rv, True, 0.1, 1e-5)
        return torch.ops.fastconv.triton_batch_norm(x, wt, bt, cen, inv, True, True)

    def bwd():
        return torch.ops.fastconv.triton_batch_norm_backward(g, x, y, wt, centre, invstd, True,
                                                             True, [True, True, True])

    t = x.numel() * x.element_size()
    return fwd, bwd, 3 * t, 7 * t


TUNE_LAYERS = {"pool": ("pool1 3/2", "stem pool 3/2/1", "pool 64x32x32 2/2"),
               "bn": ("bn stem 64x112x112", "bn 64x56x56", "bn 128x16x16", "bn 512x4x4")}


def _tune_setup(kind, layers):
    if kind == "pool":
        return POOL_CONFIGS, pool.TUNING, _pool_ops, [lay for lay in layers
                                                      if lay[1] in TUNE_LAYERS[kind]] or layers
    return BN_CONFIGS, bn.TUNING, _bn_ops, [lay for lay in layers
                                            if lay[1] in TUNE_LAYERS[kind]] or layers


def tune_child(kind, index, layers, dtype, device, batch, copy_gbs):
    """One config on every tuning layer (run in a child process: a config that crashes the
    compiler must not take the sweep down with it). Prints one JSON line."""
    configs, table, make_ops, layers = _tune_setup(kind, layers)
    table["cuda"] = dict(table["cuda"], **configs[index])
    out = []
    for layer in layers:
        fwd, bwd, fb, bb = make_ops(layer, dtype, True, device, batch)
        tf, tb = bench(fwd), bench(bwd)
        out.append(dict(kind=kind, layer=layer[1], config=index, fwd_ms=tf, bwd_ms=tb,
                        fwd_pct=100 * fb / tf / 1e6 / copy_gbs,
                        bwd_pct=100 * bb / tb / 1e6 / copy_gbs))
    print(json.dumps(out))


def tune(kind, layers, args, copy_gbs):
    """Time each config (forward op, backward op, channels_last) in its own process; print a
    table and the best config."""
    configs, _, _, layers = _tune_setup(kind, layers)
    results = []
    for i, cfg in enumerate(configs):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(i),
               "--dtype", args.dtype, "--copy-gbs", repr(copy_gbs)] + (["--smoke"] if SMOKE else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            print(f"  {kind} config {cfg}: timed out")
            continue
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {kind} config {cfg}: failed (exit {proc.returncode}): {tail}")
            continue
        results += json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n### {kind}: NHWC, % of copy bandwidth (alg bytes), forward op / backward op\n")
    names = [lay[1] for lay in layers]
    print("| config | " + " | ".join(names) + " | geo-mean fwd / bwd ms |")
    print("|---|" + "---|" * (len(names) + 1))
    best = None
    for i, cfg in enumerate(configs):
        rs = {r["layer"]: r for r in results if r["config"] == i}
        if len(rs) != len(names):
            continue
        cells = [f"{rs[n]['fwd_pct']:.0f} / {rs[n]['bwd_pct']:.0f}" for n in names]
        gf = statistics.geometric_mean([rs[n]["fwd_ms"] for n in names])
        gb = statistics.geometric_mean([rs[n]["bwd_ms"] for n in names])
        print(f"| {cfg} | " + " | ".join(cells) + f" | {gf:.4f} / {gb:.4f} |")
        if best is None or gf + gb < best[0]:
            best = (gf + gb, cfg)
    if best:
        print(f"\nbest overall {kind} config: {best[1]}")
    return results


# --------------------------------------------------------------------------- main
def print_table(rows, copy_gbs):
    print("\n| op | model | layer | layout | mode | fastconv ms | torch ms | speed-up | "
          "GB/s (alg) | % copy (alg) | % copy (min) | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = r["alg_bytes"] / r["ms"] / 1e6
        print(f"| {r['op']} | {r['model']} | {r['layer']} | {r['layout']} | {r['mode']} | "
              f"{r['ms']:.4f} | {r['torch_ms']:.4f} | {r['torch_ms'] / r['ms']:.2f}x | "
              f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
              f"{100 * r['min_bytes'] / r['ms'] / 1e6 / copy_gbs:.0f}% | "
              f"{r['max_abs_err']:.2e} |")
    print("\nSummary (geometric mean of speed-ups / mean % of copy bandwidth, alg bytes):")
    for op in sorted({r["op"] for r in rows}):
        for layout in ("NHWC", "NCHW"):
            for mode in ("fwd", "fwd+bwd"):
                sel = [r for r in rows if r["op"] == op and r["layout"] == layout
                       and r["mode"] == mode]
                if not sel:
                    continue
                sp = statistics.geometric_mean([r["torch_ms"] / r["ms"] for r in sel])
                pct = statistics.mean([100 * r["alg_bytes"] / r["ms"] / 1e6 / copy_gbs
                                       for r in sel])
                print(f"  {op:16s} {layout} {mode:8s} speed-up {sp:.2f}x, {pct:.0f}% of copy")
    print("\nPer model (every pool / BN layer once per occurrence), fastconv ms vs torch ms:")
    for op in sorted({r["op"] for r in rows}):
        for model in sorted({r["model"] for r in rows if r["op"] == op}):
            for layout in ("NHWC", "NCHW"):
                for mode in ("fwd", "fwd+bwd"):
                    sel = [r for r in rows if (r["op"], r["model"], r["layout"], r["mode"])
                           == (op, model, layout, mode)]
                    if sel:
                        ours = sum(r["ms"] * r["count"] for r in sel)
                        theirs = sum(r["torch_ms"] * r["count"] for r in sel)
                        print(f"  {op:16s} {model:9s} {layout} {mode:8s} {ours:.3f} vs "
                              f"{theirs:.3f} ms ({theirs / ours:.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="*", default=["NHWC", "NCHW"], choices=["NHWC", "NCHW"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ops", nargs="*", default=["pool", "bn"], choices=["pool", "bn"])
    ap.add_argument("--tune", action="store_true", help="also sweep tile sizes / warps")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter (CPU)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbs", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    device = torch.device("cpu" if SMOKE else "cuda")
    dtype = getattr(torch, a.dtype)
    batch = 2 if SMOKE else BATCH
    plays, blays = pool_layers(), bn_layers()
    if SMOKE:  # a few small layers suffice to exercise every code path
        plays = [(m, n, 4, min(h, 9), min(w, 9), k, s, p) for m, n, c, h, w, k, s, p in
                 plays[:1] + plays[-1:]]
        blays = [(m, n, 4, min(h, 6), min(w, 6), cnt) for m, n, c, h, w, cnt in blays[:1]]
        del POOL_CONFIGS[2:], BN_CONFIGS[2:]
    if a.child:
        tune_child(a.child[0], int(a.child[1]), plays if a.child[0] == "pool" else blays,
                   dtype, device, batch, a.copy_gbs)
        return 0
    if not SMOKE:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}")
    copy_gbs = copy_bandwidth(device)
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    for layout in a.layouts:
        cl = layout == "NHWC"
        for kind, layers, case in (("pool", plays, pool_case), ("bn", blays, bn_case)):
            if kind not in a.ops:
                continue
            for layer in layers:
                try:
                    rows += case(layer, dtype, cl, device, batch)
                except Exception:
                    print(f"{kind} {layer} {layout} failed:\n{traceback.format_exc()}")
    print_table(rows, copy_gbs)
    tuned = []
    if a.tune:
        for kind, layers in (("pool", plays), ("bn", blays)):
            if kind in a.ops:
                tuned += tune(kind, layers, a, copy_gbs)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, dtype=a.dtype, batch=batch, rows=rows,
                           tuning=tuned, pool_configs=POOL_CONFIGS, bn_configs=BN_CONFIGS,
                           device=None if SMOKE else torch.cuda.get_device_name(),
                           torch=torch.__version__, triton=triton.__version__), f, indent=1)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
