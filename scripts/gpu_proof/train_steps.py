"""Stage 2, whole training steps (forward, cross-entropy, backward, SGD) of AlexNet, VGG-11 and
ResNet-18 at batch 128 with AMP bfloat16 and channels_last: stock eager, converted (``auto``),
then stock ``torch.compile`` and converted-and-compiled (compiling is the slow part, so the
eager pair of every model comes first). Variants of one model are timed in alternating rounds;
each row gives the median, the interquartile range and the ratio to stock eager.
"""
from __future__ import annotations

import copy
import time

from common import Results, device_and_smoke, first_line, ms, parse_args

MODELS = ("alexnet", "vgg11", "resnet18")


def _make_step(model, device, amp, batch, size, n_inputs: int):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fmt = torch.channels_last
    data = [(torch.randn(batch, *size, device=device).contiguous(memory_format=fmt),
             torch.randint(0, 10, (batch,), device=device)) for _ in range(n_inputs)]
    i = 0

    def step():
        nonlocal i
        x, y = data[i % len(data)]
        i += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return step


def variants_of(name: str, device, smoke: bool, compiled: bool) -> dict:
    import torch

    import fastconv
    from fastconv import models

    torch.manual_seed(0)
    stock = models.build(name).to(device).to(memory_format=torch.channels_last)
    converted = fastconv.convert(copy.deepcopy(stock))
    if not compiled:
        return {"stock": stock, "converted": converted}
    backend = "eager" if smoke else "inductor"
    return {"stock-compiled": torch.compile(stock, backend=backend),
            "converted-compiled": torch.compile(converted, backend=backend)}


def _layers_ran(model, device, amp, batch: int, size) -> dict:
    """What each converted layer ran in the timed training steps (``auto``'s choices, decided
    by then; a conv's may name one implementation per pass): ``layers_ran``, rows of
    ``[layer, op, implementation]``, and ``layers_summary``, their counts in words."""
    import torch

    from fastconv.tools.bench import layer_backends, summarize_layers

    try:
        x = torch.randn(batch, *size, device=device).contiguous(memory_format=torch.channels_last)
        ran = [list(t) for t in layer_backends(model, x, amp=amp, train=True)]
    except Exception as exc:  # the timings stand without it
        return {"layers_summary": f"not recorded: {first_line(exc)}"}
    return {"layers_ran": ran, "layers_summary": summarize_layers(ran)}


def time_model(res: Results, name: str, device, smoke: bool, compiled: bool, rounds: int):
    import torch

    from fastconv import models, timing

    batch = 2 if smoke else 128
    size = models.INPUT_SIZES[name]
    amp = None if smoke else torch.bfloat16
    tag = "compiled" if compiled else "eager"
    t0 = time.perf_counter()
    try:
        nets = variants_of(name, device, smoke, compiled)
        steps = {k: _make_step(m, device, amp, batch, size, 1 if smoke else 3)
                 for k, m in nets.items()}
        for k, step in steps.items():  # warm-up: compiles, cuDNN plans, lazy state
            for _ in range(1 if smoke else 3):
                step()
        warm_s = time.perf_counter() - t0
        stats = timing.compare(steps, device=device, rounds=rounds, calls=1 if smoke else 3,
                               warmup=0)
    except Exception as exc:
        return res.add(name=f"{name}:{tag}", model=name, status="failed", error=first_line(exc))
    row = {"name": f"{name}:{tag}", "model": name, "status": "passed", "batch": batch,
           "warmup_s": round(warm_s, 1), "ms": {}, "iqr_ms": {}}
    if "converted" in nets:
        row.update(_layers_ran(nets["converted"], device, amp, batch, size))
    base = "stock-compiled" if compiled else "stock"
    row["paired_ratio"] = {}  # against the stock model of the same run, round by round
    for k, s in stats.items():
        m = ms(s)
        row["ms"][k] = m["median_ms"]
        row["iqr_ms"][k] = [m["q1_ms"], m["q3_ms"]]
        if k != base:
            r = timing.ratio(stats[base], s)
            row["paired_ratio"][k] = [r.value, r.low, r.high, r.flag]
    return row


def main() -> None:
    import torch

    args = parse_args(__doc__)
    device, smoke = device_and_smoke(args)
    torch.backends.cudnn.benchmark = True
    res = Results(args.work, "steps", args.deadline, device=str(device),
                  batch=2 if smoke else 128, amp=None if smoke else "bfloat16",
                  layout="channels_last")
    names = ("lenet",) if smoke else MODELS
    rounds = 2 if smoke else 5
    eager_ms = {}
    for compiled in (False, True):
        for name in names:
            if res.out_of_time(30 if compiled and not smoke else 5):
                res.add(name=f"{name}:{'compiled' if compiled else 'eager'}", model=name,
                        status="skipped", reason="stage deadline")
                continue
            row = time_model(res, name, device, smoke, compiled, rounds)
            if row.get("status") != "passed":
                continue
            if not compiled:
                eager_ms[name] = row["ms"].get("stock")
            base = eager_ms.get(name)
            row["ratio_vs_stock_eager"] = {k: base / v for k, v in row["ms"].items()
                                           if base and k != "stock"}
            res.add(**row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res.finish()


if __name__ == "__main__":
    main()
