"""The extension's CPU batch norm and max pool, op by op, against torch's own ops on the shapes
the CPU kernels were tuned on (ResNet-18's stem and residual blocks at 96x96 and 224x224,
AlexNet's and GoogLeNet's pools), timed in alternation in one run.

    PYTHONPATH=. python benchmarks/ops_cpu.py                  # batch 8, 2 threads
    PYTHONPATH=. python benchmarks/ops_cpu.py --only pool --rounds 21

Batch norm: training mode with ReLU (and a residual where marked), forward alone and the
backward op alone (``torch.ops.fastconv.batch_norm_backward``, every gradient) against
``torch.batch_norm`` (+ add) + ``relu`` and ATen's ``native_batch_norm_backward`` +
``threshold_backward``. Max pool: the forward op with the window-local indices a training
call saves, and its backward, against ``max_pool2d_with_indices`` and its backward. Times
are medians of alternated rounds (fastconv.timing.compare); the ratio is torch's time over
fastconv's, per-round pairs, with its interquartile interval.
"""
from __future__ import annotations

import argparse
import os

import torch

from fastconv import timing
from fastconv.backends import extension

# (shape, residual)
BN_CASES = [((8, 64, 48, 48), False), ((8, 64, 24, 24), True), ((8, 128, 12, 12), True),
            ((8, 256, 6, 6), True), ((8, 512, 3, 3), True), ((8, 64, 56, 56), True),
            ((8, 128, 28, 28), True)]
# (shape, kernel, stride, padding, ceil_mode)
POOL_CASES = [((8, 64, 48, 48), 3, 2, 1, False), ((8, 64, 112, 112), 3, 2, 1, False),
              ((8, 96, 54, 54), 3, 2, 0, False), ((8, 192, 28, 28), 3, 2, 0, True),
              ((8, 480, 14, 14), 3, 1, 1, False), ((8, 128, 56, 56), 2, 2, 0, False)]


def report(name: str, what: str, stats: dict) -> None:
    r = timing.ratio(stats["torch"], stats["fastconv"])
    print(f"{name:>32} {what:>4}  torch {stats['torch'].median * 1e6:9.1f} us  fastconv "
          f"{stats['fastconv'].median * 1e6:9.1f} us  {r.fmt()} {r.flag}", flush=True)


def batch_norm_cases(a, gen) -> None:
    ops, aten = torch.ops.fastconv, torch.ops.aten
    for shape, residual in BN_CASES:
        c = shape[1]
        x, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        r = torch.randn(shape, generator=gen) if residual else None
        w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
        rm, rv = torch.zeros(c), torch.ones(c)
        y, sm, si = ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, True, r)
        ty, tm, ti = aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)

        def torch_fwd():
            out = torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, False)
            if r is not None:
                out += r
            return torch.relu_(out)

        def fc_fwd():
            return ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, True, r)

        def torch_bwd():  # relu's backward, then BN's (the add's gradient is g' itself)
            gm = aten.threshold_backward(g, y, 0)
            return aten.native_batch_norm_backward(gm, x, w, rm, rv, tm, ti, True, 1e-5,
                                                   [True, True, True])

        def fc_bwd():
            return ops.batch_norm_backward(g, x, y, w, sm, si, True, True,
                                           [True, True, True, residual])

        name = f"bn{'+add' if residual else ''}+relu {'x'.join(map(str, shape))}"
        for what, tf, ff in (("fwd", torch_fwd, fc_fwd), ("bwd", torch_bwd, fc_bwd)):
            report(name, what, timing.compare({"torch": tf, "fastconv": ff}, rounds=a.rounds,
                                              calls=a.calls, warmup=3))


def pool_cases(a, gen) -> None:
    ops, aten = torch.ops.fastconv, torch.ops.aten
    for shape, k, s, p, ceil in POOL_CASES:
        x = torch.randn(shape, generator=gen)
        geo = ([k, k], [s, s], [p, p], [1, 1], ceil)
        y, ind = ops.max_pool2d(x, *geo, False, False)
        ty, tind = aten.max_pool2d_with_indices(x, *geo)
        g = torch.randn(y.shape, generator=gen)

        def torch_fwd():
            return aten.max_pool2d_with_indices(x, *geo)

        def fc_fwd():
            return ops.max_pool2d(x, *geo, False, False)

        def torch_bwd():
            return aten.max_pool2d_with_indices_backward(g, x, *geo, tind)

        def fc_bwd():
            return ops.max_pool2d_backward(g, y, ind, list(shape), *geo, False, False)

        name = f"maxpool k{k}s{s}p{p}{'c' if ceil else ''} {'x'.join(map(str, shape))}"
        for what, tf, ff in (("fwd", torch_fwd, fc_fwd), ("bwd", torch_bwd, fc_bwd)):
            report(name, what, timing.compare({"torch": tf, "fastconv": ff}, rounds=a.rounds,
                                              calls=a.calls, warmup=3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--only", choices=("bn", "pool"), default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    extension.build()
    print(f"threads {a.threads}, float32, batch 8; load average at start {os.getloadavg()}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if a.only in (None, "bn"):
            batch_norm_cases(a, gen)
        if a.only in (None, "pool"):
            pool_cases(a, gen)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
