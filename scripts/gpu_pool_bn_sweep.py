#!/usr/bin/env python
"""GPU sweep of fastconv's Triton max-pool (+ReLU) and batch norm (+ReLU) against torch eager.

Pools and batch norm only move bytes, so the yardstick is the device-to-device copy bandwidth,
measured first. Then, for the max-pool layers of AlexNet (1x224x224 input), VGG-16-BN (CIFAR,
3x32x32) and ResNet-18 (224x224) and the batch-norm layers of VGG-16-BN and ResNet-18, at
batch 128 (bfloat16 by default), channels_last and NCHW, it times with
``triton.testing.do_bench`` medians:

* max-pool  fwd:     fused ``max_pool2d(x, relu=True)``  vs  ``F.max_pool2d(F.relu(x))``
            fwd+bwd: the same plus the gradient of x
* batch norm fwd:    fused training ``batch_norm(relu=True)`` (running stats updated)  vs
                     ``F.relu(F.batch_norm(x, rm, rv, w, b, training=True))``
            fwd+bwd: the same plus the gradients of x, weight and bias

each twice: as eager code runs (``ms``: host work included; what a training step pays when
the GPU waits for Python) and replayed from a CUDA graph (``gpu ms``: device time alone).
Graph capture also proves the path has no host synchronisation (it fails on one). Per layer
it prints both times, the speed-up over torch, the achieved GB/s and its share of the copy
bandwidth. Bytes are counted two ways:

* ``alg``: the full-tensor reads and writes the kernels do (batch norm reads x twice in the
  training forward; its backward reads dy, x and, with the ReLU mask from the output, y
  twice); re-reads of overlapping pool windows and per-channel vectors are not counted;
* ``min``: every distinct tensor once, the least any implementation must move.

A host-overhead section times single calls on tiny tensors (one or a few elements per
channel), where only the host path counts: the backend entry points, the public functional
API (dispatch included) and torch. The last block is a compact summary per op and layout:
geometric-mean speed-ups over the layers, mean % of copy bandwidth over the large layers
(input >= 24 MiB), against the targets (fwd+bwd: BN+ReLU >= 1.5x, max-pool >= 1.3x,
>= 70% of copy on large layers).

``--tune`` then times alternative tile sizes / warps / reduction widths (CUDA-graph device
time of fwd and fwd+bwd, channels_last, each config in a child process) and prints the best
per layer and overall, to copy into the ``"tuning"`` table of
fastconv/backends/triton/{max_pool2d,batch_norm}_configs.json (avg_pool2d_configs.json holds the
same tiles: its kernels are not timed here).

    python scripts/gpu_pool_bn_sweep.py --quick                # bf16, both layouts (< 60 s)
    python scripts/gpu_pool_bn_sweep.py --json $OUT/pool_bn.json   # full table (~2 min)
    python scripts/gpu_pool_bn_sweep.py --tune --json $OUT/pool_bn_tune.json
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

from fastconv.backends.triton import batch_norm as bn  # noqa: E402
from fastconv.backends.triton import max_pool2d as pool  # noqa: E402

BATCH = 128
LARGE_BYTES = 24 * 2**20  # "large layer": input of at least this many bytes
TARGETS = {"batch_norm+relu": 1.5, "max_pool2d+relu": 1.3}  # fwd+bwd geomean speed-up
TARGET_PCT = 70.0
BENCH = dict(warmup=25, rep=100)


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
    """Median milliseconds of ``fn`` as eager code runs it."""
    if SMOKE:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    try:
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median",
                                       **BENCH)
    except TypeError:  # older Triton without return_mode
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5],
                                       **BENCH)


def bench_graph(fn):
    """(median device milliseconds of ``fn`` replayed from a CUDA graph, None) or (nan,
    reason): capture fails on any host synchronisation."""
    if SMOKE:
        return float("nan"), "no CUDA graphs on CPU"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (compile, allocate) on the capture stream
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        torch.cuda.synchronize()
        return bench(graph.replay), None
    except Exception as exc:  # report, keep sweeping
        torch.cuda.synchronize()
        return float("nan"), f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"


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


def _time_pair(fused, eager, graphs, grad_to_none=None):
    """eager ms and graph ms of fastconv and torch; graph failures are noted."""
    out = dict(ms=bench(fused), torch_ms=bench(eager))
    out["gpu_ms"], out["gpu_note"] = bench_graph(fused) if graphs else (float("nan"), None)
    out["torch_gpu_ms"], _ = bench_graph(eager) if graphs else (float("nan"), None)
    return out


# --------------------------------------------------------------------------- max-pool
def pool_case(layer, dtype, channels_last, device, batch, graphs=True, variants=True):
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
            def f_fused():
                with torch.no_grad():
                    return fused()

            def f_eager():
                with torch.no_grad():
                    return eager()
            nbytes = fwd_bytes
        else:
            def f_fused():
                return torch.autograd.grad(fused(), x, g)

            def f_eager():
                return torch.autograd.grad(eager(), x, g)
            nbytes = fwd_bytes + bwd_bytes
        t = _time_pair(f_fused, f_eager, graphs)
        rows.append(dict(op="max_pool2d+relu", model=model, layer=name, mode=mode,
                         layout="NHWC" if channels_last else "NCHW", alg_bytes=nbytes,
                         min_bytes=nbytes, in_bytes=nin * esize, max_abs_err=err, count=1,
                         **t))
    return rows


# --------------------------------------------------------------------------- batch norm
def bn_case(layer, dtype, channels_last, device, batch, graphs=True, variants=True):
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
    base = dict(model=model, layer=name, layout=layout, in_bytes=t, max_abs_err=err,
                count=count)

    def nograd(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    rows = []
    # stats read x; normalise reads x, writes y
    tm = _time_pair(nograd(fused), nograd(eager), graphs)
    rows.append(dict(base, op="batch_norm+relu", mode="fwd", alg_bytes=3 * t,
                     min_bytes=2 * t, **tm))
    saved = bn.RELU_MASK_FROM_OUTPUT
    try:
        for from_output in ((True, False) if variants else (True,)):
            bn.RELU_MASK_FROM_OUTPUT = from_output
            tm = _time_pair(lambda: torch.autograd.grad(fused(), [x, wt, bt], g),
                            lambda: torch.autograd.grad(eager(), [x, wt, bt], g), graphs)
            # backward: reduce reads dy, x (, y); dx pass reads dy, x (, y), writes dx
            extra = 2 * t if from_output else 0
            rows.append(dict(base, op="batch_norm+relu" if from_output else
                             "batch_norm+relu mask-from-x", mode="fwd+bwd",
                             alg_bytes=3 * t + 5 * t + extra,
                             min_bytes=2 * t + 3 * t + extra // 2, **tm))
    finally:
        bn.RELU_MASK_FROM_OUTPUT = saved
    return rows


# --------------------------------------------------------------------------- host overhead
def host_overhead(dtype, device):
    """Microseconds per call on tiny tensors (1-4 elements per channel), where only host
    work counts: (name, fastconv backend entry, public functional API, torch)."""
    import fastconv

    fc = fastconv.functional
    out = []
    reps = 3 if SMOKE else 200

    def per_call(fn):
        fn()
        best = float("inf")
        for _ in range(3 if SMOKE else 5):
            if not SMOKE:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if not SMOKE:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / reps * 1e6)
        return best

    for cl in (True, False):
        lay = "NHWC" if cl else "NCHW"
        x = _input((2, 64, 2, 2), dtype, cl, device, True)
        g = torch.randn((2, 64, 1, 1), device=device, dtype=dtype)
        geo = ((2, 2), (2, 2), (0, 0), (1, 1))
        cases = {
            "max_pool2d fwd": (
                lambda: _nograd(lambda: pool.max_pool2d(x, *geo, False, False, True)),
                lambda: _nograd(lambda: fc.max_pool2d(x, 2, 2, relu=True, backend="triton")),
                lambda: _nograd(lambda: F.max_pool2d(F.relu(x), 2, 2))),
            "max_pool2d fwd+bwd": (
                lambda: torch.autograd.grad(pool.max_pool2d(x, *geo, False, False, True), x, g),
                lambda: torch.autograd.grad(fc.max_pool2d(x, 2, 2, relu=True,
                                                          backend="triton"), x, g),
                lambda: torch.autograd.grad(F.max_pool2d(F.relu(x), 2, 2), x, g)),
        }
        xb = _input((2, 64, 1, 1), dtype, cl, device, True)
        wt = torch.randn(64, device=device).requires_grad_(True)
        bt = torch.randn(64, device=device).requires_grad_(True)
        rm, rv = torch.zeros(64, device=device), torch.ones(64, device=device)
        gb = torch.randn_like(xb)
        cases.update({
            "batch_norm fwd": (
                lambda: _nograd(lambda: bn.batch_norm(xb, rm, rv, wt, bt, True, 0.1, 1e-5, True)),
                lambda: _nograd(lambda: fc.batch_norm(xb, rm, rv, wt, bt, True, relu=True,
                                                      backend="triton")),
                lambda: _nograd(lambda: F.relu(F.batch_norm(xb, rm, rv, wt, bt, True)))),
            "batch_norm fwd+bwd": (
                lambda: torch.autograd.grad(
                    bn.batch_norm(xb, rm, rv, wt, bt, True, 0.1, 1e-5, True), [xb, wt, bt], gb),
                lambda: torch.autograd.grad(
                    fc.batch_norm(xb, rm, rv, wt, bt, True, relu=True, backend="triton"),
                    [xb, wt, bt], gb),
                lambda: torch.autograd.grad(
                    F.relu(F.batch_norm(xb, rm, rv, wt, bt, True)), [xb, wt, bt], gb)),
        })
        for name, (ours, public, ref) in cases.items():
            out.append(dict(case=f"{name} {lay}", backend_us=per_call(ours),
                            public_us=per_call(public), torch_us=per_call(ref)))
    return out


def _nograd(fn):
    with torch.no_grad():
        return fn()


# --------------------------------------------------------------------------- tuning
POOL_CONFIGS = [dict(tile=t, bwd_tile=bt, num_warps=nw)
                for t, bt, nw in ((1024, 2048, 4), (512, 1024, 4), (1024, 1024, 4),
                                  (2048, 2048, 4), (2048, 4096, 8), (1024, 2048, 8),
                                  (512, 512, 2), (4096, 4096, 8))]
BN_CONFIGS = [dict(tile=t, num_warps=nw, reduce_tile=rt, programs_per_sm=pp, reduce_warps=rw,
                   fused_elements=fe)
              for t, nw, rt, pp, rw, fe in ((2048, 4, 2048, 4, 4, 16384),
                                            (2048, 4, 2048, 4, 4, 0),
                                            (2048, 4, 2048, 4, 4, 65536),
                                            (4096, 8, 4096, 4, 8, 16384),
                                            (1024, 4, 1024, 8, 4, 16384),
                                            (2048, 4, 2048, 2, 4, 16384),
                                            (8192, 8, 4096, 2, 8, 32768),
                                            (2048, 8, 2048, 8, 8, 16384))]
TUNE_LAYERS = {"pool": ("pool1 3/2", "stem pool 3/2/1", "pool 64x32x32 2/2", "pool 512x4x4 2/2"),
               "bn": ("bn stem 64x112x112", "bn 64x56x56", "bn 128x16x16", "bn 512x4x4")}


def _tune_setup(kind, layers):
    sel = [lay for lay in layers if lay[1] in TUNE_LAYERS[kind]] or layers
    if kind == "pool":
        return POOL_CONFIGS, pool.TUNING, pool_case, sel
    return BN_CONFIGS, bn.TUNING, bn_case, sel


def tune_child(kind, index, layers, dtype, device, batch, copy_gbs):
    """One config on every tuning layer (run in a child process: a config that crashes the
    compiler must not take the sweep down with it). Prints one JSON line."""
    configs, table, case, layers = _tune_setup(kind, layers)
    table["cuda"] = dict(table["cuda"], **configs[index])
    out = []
    for layer in layers:
        for r in case(layer, dtype, True, device, batch, graphs=True, variants=False):
            ms = r["gpu_ms"] if r["gpu_ms"] == r["gpu_ms"] else r["ms"]
            out.append(dict(kind=kind, layer=layer[1], mode=r["mode"], config=index, ms=ms,
                            pct=100 * r["alg_bytes"] / ms / 1e6 / copy_gbs))
    print(json.dumps(out))


def tune(kind, layers, args, copy_gbs):
    """Time each config (device time, channels_last) in its own process; print a table and
    the best config."""
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
    print(f"\n### tune {kind}: NHWC, device time, % of copy bandwidth (alg bytes), "
          "fwd / fwd+bwd\n")
    names = [lay[1] for lay in layers]
    print("| config | " + " | ".join(names) + " | geo-mean fwd / fwd+bwd ms |")
    print("|---|" + "---|" * (len(names) + 1))
    best = None
    for i, cfg in enumerate(configs):
        rs = {(r["layer"], r["mode"]): r for r in results if r["config"] == i}
        if len(rs) != 2 * len(names):
            continue
        cells = [f"{rs[(n, 'fwd')]['pct']:.0f} / {rs[(n, 'fwd+bwd')]['pct']:.0f}" for n in names]
        gf = statistics.geometric_mean([rs[(n, "fwd")]["ms"] for n in names])
        gb = statistics.geometric_mean([rs[(n, "fwd+bwd")]["ms"] for n in names])
        print(f"| {cfg} | " + " | ".join(cells) + f" | {gf:.4f} / {gb:.4f} |")
        if best is None or gb < best[0]:
            best = (gb, cfg)
    if best:
        print(f"\nbest overall {kind} config (fwd+bwd): {best[1]}")
    return results


# --------------------------------------------------------------------------- reporting
def _pct(r, key="ms", nbytes="alg_bytes", copy_gbs=1.0):
    ms = r[key]
    return 100 * r[nbytes] / ms / 1e6 / copy_gbs if ms == ms and ms > 0 else float("nan")


def _gmean(values):
    values = [v for v in values if v == v and v > 0]
    return statistics.geometric_mean(values) if values else float("nan")


def _mean(values):
    values = [v for v in values if v == v]
    return statistics.mean(values) if values else float("nan")


def print_table(rows, copy_gbs):
    print("\n| op | model | layer | layout | mode | fastconv ms | gpu ms | torch ms | torch gpu ms "
          "| speed-up | speed-up gpu | % copy (alg) | % copy gpu | % copy (min) | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['model']} | {r['layer']} | {r['layout']} | {r['mode']} | "
              f"{r['ms']:.4f} | {r['gpu_ms']:.4f} | {r['torch_ms']:.4f} | "
              f"{r['torch_gpu_ms']:.4f} | {r['torch_ms'] / r['ms']:.2f}x | "
              f"{r['torch_gpu_ms'] / r['gpu_ms']:.2f}x | {_pct(r, copy_gbs=copy_gbs):.0f}% | "
              f"{_pct(r, 'gpu_ms', copy_gbs=copy_gbs):.0f}% | "
              f"{_pct(r, nbytes='min_bytes', copy_gbs=copy_gbs):.0f}% | "
              f"{r['max_abs_err']:.2e} |")
    notes = sorted({r["gpu_note"] for r in rows if r.get("gpu_note")})
    for note in notes:
        print(f"  graph capture failed: {note}")
    print("\nPer model (every pool / BN layer once per occurrence), fastconv ms vs torch ms "
          "(eager; device time in brackets):")
    for op in sorted({r["op"] for r in rows}):
        for model in sorted({r["model"] for r in rows if r["op"] == op}):
            for layout in ("NHWC", "NCHW"):
                for mode in ("fwd", "fwd+bwd"):
                    sel = [r for r in rows if (r["op"], r["model"], r["layout"], r["mode"])
                           == (op, model, layout, mode)]
                    if sel:
                        ours = sum(r["ms"] * r["count"] for r in sel)
                        theirs = sum(r["torch_ms"] * r["count"] for r in sel)
                        ours_g = sum(r["gpu_ms"] * r["count"] for r in sel)
                        theirs_g = sum(r["torch_gpu_ms"] * r["count"] for r in sel)
                        print(f"  {op:27s} {model:9s} {layout} {mode:8s} {ours:.3f} vs "
                              f"{theirs:.3f} ms ({theirs / ours:.2f}x)  [{ours_g:.3f} vs "
                              f"{theirs_g:.3f}]")


def print_host(host):
    print("\nHost overhead per call, tiny tensors (us; backend entry / public functional API "
          "/ torch):")
    for h in host:
        print(f"  {h['case']:28s} {h['backend_us']:7.1f} / {h['public_us']:7.1f} / "
              f"{h['torch_us']:7.1f}")


def print_summary(rows, copy_gbs, host, dtype, device_name):
    print(f"\n=== summary: {dtype}, batch {BATCH}, {device_name}, copy {copy_gbs:.0f} GB/s; "
          f"large = input >= {LARGE_BYTES >> 20} MiB ===")
    print(f"  {'op':27s} {'layout':6s} {'mode':8s} {'speed-up':>8s} {'gpu':>6s}   "
          f"{'%copy large':>11s} {'gpu':>5s}  target")
    for op in sorted({r["op"] for r in rows}):
        for layout in ("NHWC", "NCHW"):
            for mode in ("fwd", "fwd+bwd"):
                sel = [r for r in rows if (r["op"], r["layout"], r["mode"]) == (op, layout, mode)]
                if not sel:
                    continue
                sp = _gmean([r["torch_ms"] / r["ms"] for r in sel])
                spg = _gmean([r["torch_gpu_ms"] / r["gpu_ms"] for r in sel])
                large = [r for r in sel if r["in_bytes"] >= LARGE_BYTES]
                pct = _mean([_pct(r, copy_gbs=copy_gbs) for r in large])
                pctg = _mean([_pct(r, "gpu_ms", copy_gbs=copy_gbs) for r in large])
                target = ""
                if mode == "fwd+bwd" and op in TARGETS:
                    ok = sp >= TARGETS[op] and pct >= TARGET_PCT
                    target = (f"{'met' if ok else 'MISSED'} (>= {TARGETS[op]}x, "
                              f">= {TARGET_PCT:.0f}%)")
                print(f"  {op:27s} {layout:6s} {mode:8s} {sp:7.2f}x {spg:5.2f}x   "
                      f"{pct:10.0f}% {pctg:4.0f}%  {target}")
    if host:
        worst = max(host, key=lambda h: h["backend_us"] - h["torch_us"])
        print(f"  host us per call (backend entry vs torch), worst: {worst['case']} "
              f"{worst['backend_us']:.0f} vs {worst['torch_us']:.0f}")


# --------------------------------------------------------------------------- main
def main(argv=None):
    global BENCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="*", default=["NHWC", "NCHW"], choices=["NHWC", "NCHW"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ops", nargs="*", default=["pool", "bn"], choices=["pool", "bn"])
    ap.add_argument("--quick", action="store_true",
                    help="shorter timings, no mask-from-x variant, no tuning (< 60 s)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--tune", action="store_true", help="also sweep tile sizes / warps")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter (CPU)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbs", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    if a.quick or a.child:
        BENCH = dict(warmup=5, rep=20)
    device = torch.device("cpu" if SMOKE else "cuda")
    dtype = getattr(torch, a.dtype)
    batch = 2 if SMOKE else BATCH
    plays, blays = pool_layers(), bn_layers()
    if SMOKE:  # a few small layers suffice to exercise every code path
        plays = [(m, n, 4, min(h, 9), min(w, 9), k, s, p) for m, n, c, h, w, k, s, p in
                 plays[:1] + plays[-1:]]
        blays = [(m, n, 4, min(h, 6), min(w, 6), cnt) for m, n, c, h, w, cnt in blays[:1]]
        del POOL_CONFIGS[2:], BN_CONFIGS[2:]
        TUNE_LAYERS["pool"] += tuple(lay[1] for lay in plays)
        TUNE_LAYERS["bn"] += tuple(lay[1] for lay in blays)
    if a.child:
        tune_child(a.child[0], int(a.child[1]), plays if a.child[0] == "pool" else blays,
                   dtype, device, batch, a.copy_gbs)
        return 0
    t_start = time.perf_counter()
    device_name = "CPU (interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth(device)
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    graphs = not a.no_graphs
    rows = []
    for layout in a.layouts:
        cl = layout == "NHWC"
        for kind, layers, case in (("pool", plays, pool_case), ("bn", blays, bn_case)):
            if kind not in a.ops:
                continue
            for layer in layers:
                try:
                    rows += case(layer, dtype, cl, device, batch, graphs, not a.quick)
                except Exception:
                    print(f"{kind} {layer} {layout} failed:\n{traceback.format_exc()}")
    host = []
    try:
        host = host_overhead(dtype, device)
    except Exception:
        print(f"host overhead probe failed:\n{traceback.format_exc()}")
    print_table(rows, copy_gbs)
    print_host(host)
    tuned = []
    if a.tune and not a.quick:
        for kind, layers in (("pool", plays), ("bn", blays)):
            if kind in a.ops:
                tuned += tune(kind, layers, a, copy_gbs)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, dtype=a.dtype, batch=batch, rows=rows, host=host,
                           tuning=tuned, pool_configs=POOL_CONFIGS, bn_configs=BN_CONFIGS,
                           pool_tuning=pool.TUNING, bn_tuning=bn.TUNING, device=device_name,
                           torch=torch.__version__, triton=triton.__version__), f, indent=1)
        print(f"\nwrote {a.json}")
    print_summary(rows, copy_gbs, host, a.dtype, device_name)
    print(f"  ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
