"""The extension's global average pool against ATen's on CPU, passes alone (session 12's table).

    PYTHONPATH=. python benchmarks/global_pool_cpu.py [--threads 2] [--calls 10000]

Forward: ``torch.ops.fastconv.adaptive_avg_pool2d`` vs ``torch._C._nn.adaptive_avg_pool2d``
(what ``F.adaptive_avg_pool2d`` calls); backward: ``adaptive_avg_pool2d_backward`` vs ATen's
``_adaptive_avg_pool2d_backward``; output 1x1, NCHW float32. Microseconds per call, best of 7
repeats of ``--calls`` back-to-back calls (timeit): these are passes of a few microseconds,
where one repeat's best is the steady state.
"""
from __future__ import annotations

import argparse
import timeit

import torch

SHAPES = [(2, 512, 3, 3), (8, 512, 3, 3), (2, 512, 7, 7), (8, 1024, 6, 6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=10000)
    a = ap.parse_args()
    from fastconv.backends import extension

    extension.build()
    torch.set_num_threads(a.threads)
    fwd, bwd = (torch.ops.fastconv.adaptive_avg_pool2d.default,
                torch.ops.fastconv.adaptive_avg_pool2d_backward.default)
    aten_fwd, aten_bwd = (torch._C._nn.adaptive_avg_pool2d,
                          torch.ops.aten._adaptive_avg_pool2d_backward.default)

    def us(f):
        return min(timeit.repeat(f, number=a.calls, repeat=7)) / a.calls * 1e6

    print("| input | forward fastconv / ATen | backward fastconv / ATen |")
    print("|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape)
        g = torch.randn(shape[0], shape[1], 1, 1)
        f = (us(lambda: fwd(x, [1, 1])), us(lambda: aten_fwd(x, (1, 1))))
        b = (us(lambda: bwd(g, list(shape))), us(lambda: aten_bwd(g, x)))
        print(f"| {'x'.join(map(str, shape))} | {f[0]:.1f} / {f[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} |")


if __name__ == "__main__":
    main()
