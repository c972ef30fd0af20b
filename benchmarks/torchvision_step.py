"""A converted torchvision model's training and inference step against the stock model, timed
in alternation in one run (``fastconv.timing.compare``): issue 17's acceptance measurement.

    python benchmarks/torchvision_step.py                       # resnet18, batch 8, 96x96, CPU
    python benchmarks/torchvision_step.py --model resnet50 --rounds 9 --backends auto,extension

Both models start from the same weights; each training step is an SGD step (the two models
train apart from there, as two users' runs would). Ratios are stock time over converted time,
median of the per-round ratios [interquartile range] (> 1: the converted model is faster).
Needs torchvision (the ``test`` extra pins it).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastconv from this tree

import fastconv  # noqa: E402
from fastconv import timing  # noqa: E402
from fastconv.tools.common import sgd_step  # noqa: E402
from fastconv.tools.progress import Progress  # noqa: E402

MODELS = {
    "resnet18": lambda tv: tv.resnet18(num_classes=10),
    "resnet50": lambda tv: tv.resnet50(num_classes=10),
    "googlenet": lambda tv: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "vgg11_bn": lambda tv: tv.vgg11_bn(num_classes=10),
    "alexnet": lambda tv: tv.alexnet(num_classes=10),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96, help="input height and width")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="auto",
                   help="comma-separated: one converted model per backend")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args(argv)
    try:
        import torchvision.models as tv
    except ImportError:
        print("error: torchvision is not installed (pip install -e .[test])", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    stock = MODELS[a.model](tv).to(memory_format=fmt)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    fast = {b: fastconv.convert(copy.deepcopy(stock), backend=b) for b in backends}
    print(str(fastconv.conversion_report(fast[backends[0]])).splitlines()[0])
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(a.batch, 3, a.size, a.size, generator=gen).contiguous(
        memory_format=fmt), torch.randint(0, 10, (a.batch,), generator=gen)) for _ in range(3)]
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            for m in (stock, *fast.values())}

    def train(model):
        model.train()
        return lambda xy: sgd_step(model, opts[model], xy[0], xy[1], None)

    def infer(model):
        def run(xy):
            with torch.no_grad():
                model(xy[0])
        return run

    print(f"{a.model}, batch {a.batch}, {a.size}x{a.size}, {a.threads} threads, float32, "
          f"{'channels_last' if a.channels_last else 'NCHW'}, backends {', '.join(backends)}; "
          f"{a.rounds} rounds x {a.steps} steps, alternating; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for mode, make in (("train", train), ("infer", infer)):
        if mode == "infer":
            for m in (stock, *fast.values()):
                m.eval()
        t0 = time.perf_counter()
        bar = Progress(a.rounds, f"  {mode} rounds", stream=sys.stdout)
        stats = timing.compare({"stock": make(stock), **{b: make(m) for b, m in fast.items()}},
                               rounds=a.rounds, calls=a.steps, warmup=2, inputs=inputs,
                               on_round=lambda r, n: bar.update())
        bar.close()
        print(f"{mode}: stock {stats['stock'].fmt()} [{time.perf_counter() - t0:.0f} s]")
        for b in backends:
            r = timing.ratio(stats["stock"], stats[b])
            flag = f"  ({r.flag})" if r.flag else ""
            print(f"  {b:10s} {stats[b].fmt()}: {r.fmt()} vs stock{flag}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
