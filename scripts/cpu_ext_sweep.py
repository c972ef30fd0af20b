"""CPU float32 timing of the extension's kernels against torch eager, layer by layer.

Every conv+ReLU and max-pool layer of AlexNet and VGG-11-narrow (batch 8, 1x224x224 input), and
the BN+ReLU layers of VGG-16-BN (CIFAR, 32x32) and ResNet-18 (96x96), forward and
forward+backward. The two sides run alternately (ext, torch, ext, torch, ...) so drifts in
machine load hit both; each cell reports the median time and torch/extension (> 1: faster).

    python scripts/cpu_ext_sweep.py [--reps 15] [--batch 8] [--only conv|pool|bn] [--json out.json]
    python scripts/cpu_ext_sweep.py --models alexnet,resnet18,vgg16_bn   # whole training steps

On a shared machine, wall times with 2 threads mostly measure the scheduler (OpenMP barriers
wait for a core another process holds); --threads 1 --cpu-time gives the kernels' own cost.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def alexnet_layers(n):
    """(name, kind, input shape, params) for every conv/pool of AlexNet (1x224x224)."""
    return [
        ("alexnet.conv1", "conv", (n, 1, 224, 224), dict(cout=96, k=11, s=4, p=1)),
        ("alexnet.pool1", "pool", (n, 96, 54, 54), dict(k=3, s=2)),
        ("alexnet.conv2", "conv", (n, 96, 26, 26), dict(cout=256, k=5, s=1, p=2)),
        ("alexnet.pool2", "pool", (n, 256, 26, 26), dict(k=3, s=2)),
        ("alexnet.conv3", "conv", (n, 256, 12, 12), dict(cout=384, k=3, s=1, p=1)),
        ("alexnet.conv4", "conv", (n, 384, 12, 12), dict(cout=384, k=3, s=1, p=1)),
        ("alexnet.conv5", "conv", (n, 384, 12, 12), dict(cout=256, k=3, s=1, p=1)),
        ("alexnet.pool3", "pool", (n, 256, 12, 12), dict(k=3, s=2)),
    ]


def vgg11_narrow_layers(n):
    layers, c, hw = [], 1, 224
    for i, (convs, cout) in enumerate([(1, 16), (1, 32), (2, 64), (2, 128), (2, 128)]):
        for j in range(convs):
            layers.append((f"vgg11n.b{i + 1}.conv{j + 1}", "conv", (n, c, hw, hw),
                           dict(cout=cout, k=3, s=1, p=1)))
            c = cout
        layers.append((f"vgg11n.b{i + 1}.pool", "pool", (n, c, hw, hw), dict(k=2, s=2)))
        hw //= 2
    return layers


def bn_layers(n):
    vgg = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]
    res = [(64, 48), (64, 24), (128, 12), (256, 6), (512, 3)]
    return ([(f"vgg16bn.bn{c}@{hw}", "bn", (n, c, hw, hw), {}) for c, hw in vgg]
            + [(f"resnet18.bn{c}@{hw}", "bn", (n, c, hw, hw), {}) for c, hw in res])


def make_case(kind, shape, p, ops):
    x = torch.randn(shape)
    if kind == "conv":
        w = torch.randn(p["cout"], shape[1], p["k"], p["k"]) / math.sqrt(shape[1] * p["k"] ** 2)
        b = torch.randn(p["cout"]) * 0.1
        s, pad = [p["s"]] * 2, [p["p"]] * 2
        ext = lambda x, w, b: ops.conv2d_relu(x, w, b, s, pad, [1, 1], 1, True)  # noqa: E731
        ref = lambda x, w, b: F.relu(F.conv2d(x, w, b, s, pad))  # noqa: E731
        return (x, w, b), ext, ref
    if kind == "pool":
        k, s = [p["k"]] * 2, [p["s"]] * 2
        # pool inputs follow a ReLU in the models; torch pools the relu'd tensor, the
        # extension fuses that ReLU, so both sides start from the conv output
        ext = lambda x: ops.max_pool2d(x, k, s, [0, 0], [1, 1], False, False, True)[0]  # noqa: E731
        ref = lambda x: F.max_pool2d(F.relu(x), k, s)  # noqa: E731
        return (x,), ext, ref
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c) * 0.1
    rm, rv = torch.zeros(c), torch.ones(c)
    ext = lambda x, w, b: ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, True)[0]  # noqa: E731
    ref = lambda x, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))  # noqa: E731
    return (x, w, b), ext, ref


CLOCK = time.perf_counter
STAT = statistics.median


def timed(fn, args, backward):
    if backward:
        args = [a.detach().requires_grad_() for a in args]
        t0 = CLOCK()
        out = fn(*args)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            t0 = CLOCK()
            fn(*args)
    return CLOCK() - t0


def compare(ext, ref, args, backward, reps):
    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        timed(ext, args, backward)
        timed(ref, args, backward)
    te, tr = [], []
    for _ in range(reps):
        te.append(timed(ext, args, backward))
        tr.append(timed(ref, args, backward))
    return STAT(te), STAT(tr)


def model_steps(names, batch, reps):
    """One SGD training step (forward, backward, update) of stock vs converted models,
    alternating; returns rows and prints them."""
    import copy

    import fastconv
    from fastconv import models

    rows, ratios = [], []
    print(f"{'model':12s} {'input':>18s} {'stock ms':>10s} {'fastconv ms':>12s} {'ratio':>6s}")
    for name in names:
        torch.manual_seed(0)
        stock = models.build(name)
        fast = fastconv.convert(copy.deepcopy(stock), backend="extension")
        x = torch.randn(batch, *models.INPUT_SIZES[name])
        y = torch.randint(0, 10, (batch,))
        opts = {m: torch.optim.SGD(m.parameters(), lr=0.01) for m in (stock, fast)}

        def step(m):
            t0 = CLOCK()
            opts[m].zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opts[m].step()
            return CLOCK() - t0

        for _ in range(2):
            step(stock), step(fast)
        ts, tf = [], []
        for _ in range(reps):
            ts.append(step(stock))
            tf.append(step(fast))
        s_ms, f_ms = STAT(ts) * 1e3, STAT(tf) * 1e3
        ratios.append(s_ms / f_ms)
        rows.append({"model": name, "batch": batch, "stock_ms": s_ms, "fastconv_ms": f_ms,
                     "ratio": s_ms / f_ms})
        print(f"{name:12s} {str((batch, *models.INPUT_SIZES[name])):>18s} {s_ms:10.1f} "
              f"{f_ms:12.1f} {s_ms / f_ms:6.2f}", flush=True)
    print(f"geometric mean stock/fastconv: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", choices=["conv", "pool", "bn"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time process CPU seconds instead of wall time (steadier on a busy "
                         "machine; hides poor parallel scaling, so use with --threads 1)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="min is the more robust estimate when other processes share the CPU")
    ap.add_argument("--models", help="comma-separated models: time whole training steps instead")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    global CLOCK, STAT
    if args.stat == "min":
        STAT = min
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    from fastconv.backends import extension

    extension.build()
    if args.models:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
              f"{'CPU' if args.cpu_time else 'wall'} time, {args.stat} of {args.reps}")
        rows = model_steps(args.models.split(","), args.batch, args.reps)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    ops = torch.ops.fastconv
    torch.manual_seed(0)
    n = args.batch
    cases = alexnet_layers(n) + vgg11_narrow_layers(n) + bn_layers(n)
    if args.only:
        cases = [c for c in cases if c[1] == args.only]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {n}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {args.stat} of {args.reps}")
    print(f"{'layer':28s} {'input':>20s} {'fwd ext ms':>10s} {'torch ms':>9s} {'ratio':>6s}"
          f" {'f+b ext ms':>10s} {'torch ms':>9s} {'ratio':>6s}")
    rows, ratios = [], {"conv": [], "pool": [], "bn": []}
    if cases:  # a throwaway round: the first cell would pay for first touches and oneDNN's JIT
        tensors, ext, ref = make_case(*cases[0][1:], ops)
        compare(ext, ref, tensors, not args.no_backward, 3)
    for name, kind, shape, p in cases:
        tensors, ext, ref = make_case(kind, shape, p, ops)
        if args.channels_last:
            tensors = (tensors[0].to(memory_format=torch.channels_last),) + tensors[1:]
        row = {"layer": name, "kind": kind, "shape": list(shape)}
        line = f"{name:28s} {str(tuple(shape)):>20s}"
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwdbwd" and args.no_backward:
                break
            te, tr = compare(ext, ref, tensors, mode == "fwdbwd", args.reps)
            row[mode] = {"ext_ms": te * 1e3, "torch_ms": tr * 1e3, "ratio": tr / te}
            ratios[kind].append(tr / te)
            line += f" {te * 1e3:10.3f} {tr * 1e3:9.3f} {tr / te:6.2f}"
        print(line, flush=True)
        rows.append(row)
    print("geometric mean of torch/extension:")
    for kind, rs in ratios.items():
        if rs:
            print(f"  {kind}: {math.exp(sum(map(math.log, rs)) / len(rs)):.3f} "
                  f"(min {min(rs):.2f}) over {len(rs)} cells")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
