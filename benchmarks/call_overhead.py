"""What a decided fastconv call costs over torch's own call, on CPU (issue 16's overhead figure).

    PYTHONPATH=. python benchmarks/call_overhead.py              # 1 thread, as the issue measured
    PYTHONPATH=. python benchmarks/call_overhead.py --threads 2 --rounds 21

Two tables, medians of alternated rounds (fastconv.timing.compare), microseconds per call:

1. alone: a small conv (input 1x4x8x8, weight 8x4x3x3, ReLU) called back to back, decided:
   torch's conv2d then relu, stock ``nn.Conv2d`` + ``nn.ReLU`` modules, the direct
   ``torch.ops.fastconv.conv2d_relu`` (the extension, when built), ``fastconv.functional
   .conv2d_relu`` with ``auto`` / ``torch`` / ``extension``, and ``fastconv.nn.Conv2dReLU``
   (the module a converted model holds: its memo instead of the functional key).
2. in context: a LeNet-sized conv (8x1x28x28 * 6x1x5x5) with and without the decided call's
   guard run just before it. On the 2-core VM this was written on, Python run between two
   oneDNN calls costs 2-3x its own time (a 3.6 us key made the next 136 us conv 9.5 us slower),
   so "alone" understates what a layer costs in a model; the second table shows by how much.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastconv.functional as FF
from fastconv import dispatch, timing
from fastconv import nn as fnn


def _extension_op():
    try:
        from fastconv.backends import extension
        extension.build()
        return torch.ops.fastconv.conv2d_relu
    except Exception as exc:  # no toolchain: the extension rows are left out, with the reason
        print(f"(extension rows left out: {exc})")
        return None


def alone(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    w = torch.randn(8, 4, 3, 3, generator=g)
    b = torch.randn(8, generator=g)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    stock = nn.Sequential(conv, nn.ReLU())
    module = fnn.Conv2dReLU.from_conv(conv, relu=True)
    variants = {
        "torch conv2d + relu": lambda: torch.relu(F.conv2d(x, w, b, 1, 1)),
        "stock nn.Conv2d + nn.ReLU": lambda: stock(x),
        "FF.conv2d_relu auto": lambda: FF.conv2d_relu(x, w, b, 1, 1),
        "FF.conv2d_relu torch": lambda: FF.conv2d_relu(x, w, b, 1, 1, backend="torch"),
        "fastconv.nn.Conv2dReLU (auto)": lambda: module(x),
    }
    op = _extension_op()
    if op is not None:
        variants["torch.ops.fastconv.conv2d_relu"] = \
            lambda: op(x, w, b, [1, 1], [1, 1], [1, 1], 1, True)
        variants["FF.conv2d_relu extension"] = \
            lambda: FF.conv2d_relu(x, w, b, 1, 1, backend="extension")
    with torch.no_grad():
        res = timing.compare(variants, rounds=rounds, calls=3, inner=2000, warmup=50)
    base = res["torch conv2d + relu"].median
    print("alone: 1x4x8x8 * 8x4x3x3 + ReLU, decided, no grad")
    for name, s in res.items():
        print(f"  {name:34s} {s.median * 1e6:7.2f} us  (+{(s.median - base) * 1e6:5.2f})")


def in_context(rounds: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g)
    w = torch.randn(6, 1, 5, 5, generator=g)
    b = torch.randn(6, generator=g)
    key = ("conv2d_relu", (x, w, b), (1, 2, 1, 1), (False,), "torch")
    variants = {
        "conv alone": lambda: F.conv2d(x, w, b, 1, 2),
        "the guard alone": lambda: dispatch.call_key(*key),
        "guard then conv": lambda: (dispatch.call_key(*key), F.conv2d(x, w, b, 1, 2)),
    }
    with torch.no_grad():
        res = timing.compare(variants, rounds=rounds, calls=3, inner=200, warmup=20)
    conv, guard, both = (res[k].median * 1e6 for k in variants)
    print("in context: LeNet's first conv (8x1x28x28 * 6x1x5x5), the functional key before it")
    for name, s in res.items():
        print(f"  {name:34s} {s.median * 1e6:7.2f} us")
    print(f"  the guard costs the pair {both - conv:.2f} us, {(both - conv) / guard:.1f}x its "
          "own time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    if a.threads < 1 or a.rounds < 1:
        p.error("--threads and --rounds must be positive integers")
    torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} thread(s); medians of {a.rounds} alternated rounds")
    alone(a.rounds)
    in_context(a.rounds)


if __name__ == "__main__":
    main()
