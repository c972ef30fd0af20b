"""The extension's CPU batch norm + residual add + ReLU (one op) against torch's bn, add, relu
as a stock ResNet runs them (``out = bn2(conv2(x)); out += identity; out = relu(out)``, the
add and the ReLU in place), on ResNet-18's residual shapes (training mode).

    PYTHONPATH=. python benchmarks/bn_add_relu_cpu.py                # batch 8, 224x224, 2 threads
    PYTHONPATH=. python benchmarks/bn_add_relu_cpu.py --size 96 --channels-last

Times are medians of alternated rounds (fastconv.timing.compare); the ratio is torch's time
over fastconv's, per-round pairs, with its interquartile interval.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from fastconv import timing
from fastconv.backends import extension


def resnet18_residual_shapes(batch: int, size: int):
    s = size // 4  # after the stem's stride-2 conv and max-pool
    return [(batch, 64, s, s), (batch, 128, s // 2, s // 2), (batch, 256, s // 4, s // 4),
            (batch, 512, s // 8, s // 8)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    extension.build()
    ops = torch.ops.fastconv
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    print(f"threads {a.threads}, batch {a.batch}, {a.size}x{a.size}, "
          f"{'channels_last' if a.channels_last else 'NCHW'}, float32, training mode; "
          f"load average at start {os.getloadavg()}")
    gen = torch.Generator().manual_seed(0)
    for shape in resnet18_residual_shapes(a.batch, a.size):
        c = shape[1]
        x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        res = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        g = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
        rm, rv = torch.zeros(c), torch.ones(c)
        xg, rg = x.clone().requires_grad_(), res.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()

        def torch_fwd(x=x, r=res, w=w, b=b):
            out = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
            out += r
            return F.relu(out, inplace=True)

        def fc_fwd(x=x, r=res, w=w, b=b):
            return ops.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, True, r)[0]

        def torch_fwdbwd():
            out = F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
            out += rg
            torch.autograd.grad(F.relu(out, inplace=True), (xg, rg, wg, bg), g)

        def fc_fwdbwd():
            out = ops.batch_norm(xg, wg, bg, rm, rv, True, 0.1, 1e-5, True, rg)[0]
            torch.autograd.grad(out, (xg, rg, wg, bg), g)

        for mode, tf, ff in (("fwd", torch_fwd, fc_fwd), ("fwd+bwd", torch_fwdbwd, fc_fwdbwd)):
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                st = timing.compare({"torch": tf, "fastconv": ff}, rounds=a.rounds,
                                    calls=a.calls, warmup=3)
            r = timing.ratio(st["torch"], st["fastconv"])
            print(f"{str(tuple(shape)):>20} {mode:>8}  torch {st['torch'].median * 1e3:8.3f} ms"
                  f"  fastconv {st['fastconv'].median * 1e3:8.3f} ms  {r.fmt()} {r.flag}")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
