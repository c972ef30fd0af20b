"""A model converted with ``auto`` under a given CPU call cost (``selection.CALL_COST_S``: how
much faster than torch's another backend must measure, beyond 5%), against the stock model:
the measurement behind the cost's value.

    python benchmarks/call_cost_cpu.py --model lenet_bn --cost-us 3
    python benchmarks/call_cost_cpu.py --model lenet --cost-us 15 --rounds 41 --steps 20

Decisions are made afresh and kept in a temporary file (a cached decision would ignore the
cost); the built extension is reused from the usual cache.
Ratios are stock time over converted time, median of the per-round ratios [IQR].
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastconv from this tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet")
    p.add_argument("--cost-us", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    import torch

    import fastconv
    from fastconv import models, selection, timing

    if not hasattr(models, a.model):
        print(f"error: --model {a.model!r} is not in fastconv.models", file=sys.stderr)
        return 2
    selection.CALL_COST_S = {"cpu": a.cost_us * 1e-6}
    decisions = Path(tempfile.mkdtemp(prefix="fastconv-cost-")) / "selection.json"
    selection._path = lambda: decisions
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    stock = getattr(models, a.model)()
    conv = fastconv.convert(copy.deepcopy(stock))
    size = 28 if a.model.startswith("lenet") else 224
    in_ch = next(m for m in stock.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x = torch.randn(a.batch, in_ch, size, size)
    y = torch.randint(0, 10, (a.batch,))
    loss = torch.nn.CrossEntropyLoss()

    def train(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.01)

        def step(x):
            opt.zero_grad(set_to_none=True)
            loss(m(x), y).backward()
            opt.step()
        return step

    def infer(m):
        def step(x):
            with torch.no_grad():
                m(x)
        return step

    print(f"{a.model}, batch {a.batch}, {a.threads} threads, CPU call cost {a.cost_us:g} us; "
          f"{a.rounds} rounds x {a.steps} steps, alternating")
    for mode, make in (("train", train), ("infer", infer)):
        for m in (stock, conv):
            m.train(mode == "train")
        stats = timing.compare({"stock": make(stock), "auto": make(conv)}, rounds=a.rounds,
                               calls=a.steps, warmup=3, inputs=[x])
        r = timing.ratio(stats["stock"], stats["auto"])
        print(f"  {mode}: auto {r.fmt()} vs stock" + (f"  ({r.flag})" if r.flag else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
