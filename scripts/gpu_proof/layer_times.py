"""Stage 2, per layer: every conv+ReLU and max-pool layer of AlexNet and VGG-11 and the BN+ReLU
layers of ResNet-18 (layers traced from the models by benchmarks/layers.py), at batch 128,
bfloat16, channels_last, forward and forward+backward, for each fastconv backend that runs on
CUDA and for torch eager (cuDNN, benchmark mode on), with shipped configurations only.

A row per layer and mode: median ms per provider (CUDA events, after warm-up, inputs rotated over
enough copies to exceed the L2 cache), the ratio eager / backend (above 1: faster than torch),
achieved TFLOP/s for convs and GB/s for pools and batch norm (compulsory bytes; the report sets
them against the measured copy bandwidth).
"""
from __future__ import annotations

import itertools
import math

from common import Results, Skip, device_and_smoke, first_line, ms, parse_args


def _layers(smoke: bool):
    from benchmarks import layers as L

    convs_pools = [l for l in L.layers(["alexnet", "vgg11"], "all")
                   if l.op in ("conv2d_relu", "max_pool2d")]
    bns = [l for l in L.layers(["resnet18"], "all") if l.op == "batch_norm" and l.kw["relu"]]
    # convs first (AlexNet, then VGG-11: the targets), then pools, then batch norm
    order = {"conv2d_relu": 0, "max_pool2d": 1, "batch_norm": 2}
    found = sorted(convs_pools + bns, key=lambda l: order[l.op])
    if smoke:  # one layer per op, shrunk so the Triton interpreter or a CPU finishes in seconds
        import dataclasses

        one = {}
        for l in found:
            one.setdefault(l.op, l)
        found = []
        for l in one.values():
            k = l.kw.get("kernel", l.kw.get("kernel_size", (1, 1)))[0]
            size = k + 5
            c = min(l.in_shape[0], 4)
            out_c = 8 if l.op == "conv2d_relu" else c
            found.append(dataclasses.replace(l, in_shape=(c, size, size),
                                             out_shape=(out_c, *l.out_shape[1:]),
                                             args=tuple((n, 8 if n == "out_channels" else v)
                                                        for n, v in l.args)))
    return found


def _callables(layer, provider, device, dtype, batch, backward, smoke):
    """(fn) timing one call of ``layer`` on ``provider`` ('eager' or a fastconv backend)."""
    import torch
    import torch.nn.functional as F

    from fastconv import functional as FF
    from fastconv import dispatch

    if provider != "eager":
        reason = dispatch.get(provider).unavailable_reason()
        if reason:
            raise Skip(f"{provider}: {reason.splitlines()[0]}")
    kw = layer.kw
    fmt = torch.channels_last
    shape = (batch, *layer.in_shape)
    per_set = math.prod(shape) * dtype.itemsize
    sets = []
    from fastconv import timing

    for _ in range(1 if smoke else timing.rotation_count(per_set, device)):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        x.requires_grad_(backward and not layer.first)
        sets.append({"x": x})
    if layer.op == "conv2d_relu":
        c = layer.in_shape[0] // kw["groups"]
        w = (torch.randn(kw["out_channels"], c, *kw["kernel"], device=device, dtype=dtype)
             / math.sqrt(c * kw["kernel"][0] * kw["kernel"][1])).contiguous(memory_format=fmt)
        b = torch.randn(kw["out_channels"], device=device, dtype=dtype) if kw["bias"] else None
        params = [p for p in (w, b) if p is not None]
        a = dict(stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"],
                 groups=kw["groups"])
        if provider == "eager":
            def op(x):
                y = F.conv2d(x, w, b, **a)
                return F.relu(y) if kw["relu"] else y
        else:
            def op(x):
                return FF.conv2d_relu(x, w, b, **a, relu=kw["relu"], backend=provider)
    elif layer.op == "max_pool2d":
        params = []
        a = dict(kernel_size=kw["kernel_size"], stride=kw["stride"], padding=kw["padding"],
                 dilation=kw["dilation"], ceil_mode=kw["ceil_mode"])
        if provider == "eager":
            def op(x):
                return F.max_pool2d(F.relu(x) if kw["relu"] else x, **a)
        else:
            def op(x):
                return FF.max_pool2d(x, **a, relu=kw["relu"], backend=provider)
        for s in sets:
            s["x"].requires_grad_(backward)
    else:  # batch_norm, training mode, as in a training step
        ch = layer.in_shape[0]
        weight = torch.rand(ch, device=device) + 0.5
        bias = torch.randn(ch, device=device)
        rm, rv = torch.zeros(ch, device=device), torch.ones(ch, device=device)
        params = [weight, bias]
        if provider == "eager":
            def op(x):
                return F.relu(F.batch_norm(x, rm, rv, weight, bias, True, kw["momentum"],
                                           kw["eps"]))
        else:
            def op(x):
                return FF.batch_norm(x, rm, rv, weight, bias, True, kw["momentum"], kw["eps"],
                                     relu=True, backend=provider)
        for s in sets:
            s["x"].requires_grad_(backward)
    for p in params:
        p.requires_grad_(backward)
    cycle = itertools.cycle(sets)
    if not backward:
        def fn():
            with torch.no_grad():
                return op(next(cycle)["x"])
        return fn
    grad_out = None

    def fn_bwd():
        nonlocal grad_out
        x = next(cycle)["x"]
        y = op(x)
        if grad_out is None:
            grad_out = torch.randn_like(y)
        wrt = ([x] if x.requires_grad else []) + params
        return torch.autograd.grad(y, wrt, grad_out)
    return fn_bwd


def time_layer(layer, providers, device, dtype, batch, backward, smoke, rounds, calls) -> dict:
    """One row: every provider that runs, timed in alternation (fastconv.timing.compare)."""
    from fastconv import timing

    mode = "fwdbwd" if backward else "fwd"
    row = {"name": f"{layer.id}:{mode}", "layer": layer.id, "op": layer.op, "mode": mode,
           "where": list(layer.where), "status": "passed", "ms": {}, "iqr_ms": {},
           "ratio_vs_eager": {}, "ratio_interval": {}, "errors": {}}
    fns = {}
    for prov in providers:
        try:
            fn = _callables(layer, prov, device, dtype, batch, backward, smoke)
            fn()  # compiles (shipped configs) and proves it runs before the timed rounds
            fns[prov] = fn
        except Skip as exc:
            row["errors"][prov] = f"skipped: {exc}"
        except Exception as exc:
            row["errors"][prov] = first_line(exc)
            row["status"] = "failed"
    if not fns:
        return row
    stats = timing.compare(fns, device=device, rounds=rounds, calls=calls, warmup=2)
    for prov, s in stats.items():
        m = ms(s)
        row["ms"][prov] = m["median_ms"]
        row["iqr_ms"][prov] = [m["q1_ms"], m["q3_ms"]]
        if "eager" in stats and prov != "eager":
            r = timing.ratio(stats["eager"], s)
            row["ratio_vs_eager"][prov] = r.value
            row["ratio_interval"][prov] = [r.low, r.high, r.flag]
    if layer.op == "conv2d_relu":
        flops = layer.flops(batch, backward)
        row["tflops"] = {p: flops / v / 1e9 for p, v in row["ms"].items()}
    else:
        nbytes = layer.bytes(batch, dtype.itemsize, backward)
        row["gbps"] = {p: nbytes / v / 1e6 for p, v in row["ms"].items()}
    return row


def main() -> None:
    import torch

    def extra(p):
        p.add_argument("--batch", type=int, default=None)
    args = parse_args(__doc__, extra)
    device, smoke = device_and_smoke(args)
    batch = args.batch or (2 if smoke else 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.backends.cudnn.benchmark = True
    providers = ("eager", "torch", "extension") if smoke else ("eager", "triton", "extension")
    res = Results(args.work, "layers", args.deadline, device=str(device), batch=batch,
                  dtype=str(dtype).replace("torch.", ""), layout="channels_last",
                  providers=providers)
    rounds, calls = (2, 1) if smoke else (7, 3)
    for layer in _layers(smoke):
        for backward in (False, True):
            mode = "fwdbwd" if backward else "fwd"
            if res.out_of_time(5):
                res.add(name=f"{layer.id}:{mode}", status="skipped", reason="stage deadline")
                continue
            res.add(**time_layer(layer, providers, device, dtype, batch, backward, smoke,
                                 rounds, calls))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res.finish()


if __name__ == "__main__":
    main()
