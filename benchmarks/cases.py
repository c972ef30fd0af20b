"""Layer cases traced from the models (``layers.py``) made runnable: random inputs, the
layer computed by each provider, and the fwd / fwdbwd / backward-only calls. Shared by the
per-layer pytest-benchmark suite (``test_layers.py``) and the sweep (``sweep.py``).

``eager`` is what a stock model runs: the torch op, then a separate ReLU where the network
has one. The fastconv providers (``fc_<backend>``) run ``fastconv.functional`` with the ReLU
fused; ``compile`` is torch.compile of the eager code.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import fastconv.functional as FF
from fastconv import timing
from fastconv.tools.common import reset_compiler

# modes: fwd (no autograd graph, as in inference), fwdbwd (the gradients a training step
# needs); the backward breakdown times the backward alone on a graph built beforehand:
# bwd (every gradient), and for convolutions bwd_input / bwd_weight (one side each)
MODES = ("fwd", "fwdbwd")
BREAKDOWN = ("bwd", "bwd_input", "bwd_weight")


def inputs(layer, fc):
    """One set of fresh random inputs for ``layer``; ``grads``: tensors to differentiate."""
    kw, dev, dtype, fmt = layer.kw, fc.device, fc.dtype, fc.memory_format
    n = fc.batch
    x = torch.randn(n, *layer.in_shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    gy = torch.randn(n, *layer.out_shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    s = dict(x=x, gy=gy)
    if layer.op == "conv2d_relu":
        c = layer.in_shape[0] // kw["groups"]
        fan_in = c * kw["kernel"][0] * kw["kernel"][1]
        w = torch.randn(kw["out_channels"], c, *kw["kernel"], device=dev, dtype=dtype)
        s["w"] = (w / fan_in ** 0.5).contiguous(memory_format=fmt)
        s["b"] = torch.randn(kw["out_channels"], device=dev, dtype=dtype) * 0.1 \
            if kw["bias"] else None
    elif layer.op == "batch_norm":
        c = layer.in_shape[0]
        # affine parameters and statistics stay float32 whatever the input dtype, as under AMP
        s["g"] = torch.rand(c, device=dev) + 0.5
        s["b"] = torch.randn(c, device=dev) * 0.1
        s["rm"] = torch.zeros(c, device=dev)
        s["rv"] = torch.ones(c, device=dev)
    return s


def grad_targets(layer, s) -> list:
    if layer.op == "conv2d_relu":
        targets = [] if layer.first else [s["x"]]
        return targets + [s["w"]] + ([s["b"]] if s["b"] is not None else [])
    if layer.op == "batch_norm":
        return [s["x"], s["g"], s["b"]]
    return [s["x"]]


def forward(layer, provider: str):
    """``f(s) -> output`` computing the layer with ``provider`` on input set ``s``."""
    kw = layer.kw
    backend = provider[3:] if provider.startswith("fc_") else None
    op = layer.op
    if op == "conv2d_relu":
        if backend is None:
            def f(s):
                y = F.conv2d(s["x"], s["w"], s["b"], kw["stride"], kw["padding"],
                             kw["dilation"], kw["groups"])
                return F.relu(y) if kw["relu"] else y
        else:
            def f(s):
                return FF.conv2d_relu(s["x"], s["w"], s["b"], kw["stride"], kw["padding"],
                                      kw["dilation"], kw["groups"], relu=kw["relu"],
                                      backend=backend)
    elif op == "max_pool2d":
        if backend is None:
            def f(s):
                y = F.max_pool2d(s["x"], kw["kernel_size"], kw["stride"], kw["padding"],
                                 kw["dilation"], ceil_mode=kw["ceil_mode"])
                return F.relu(y) if kw["relu"] else y
        else:
            def f(s):
                return FF.max_pool2d(s["x"], kw["kernel_size"], kw["stride"], kw["padding"],
                                     kw["dilation"], kw["ceil_mode"], relu=kw["relu"],
                                     backend=backend)
    elif op == "avg_pool2d":
        if backend is None:
            def f(s):
                return F.avg_pool2d(s["x"], kw["kernel_size"], kw["stride"], kw["padding"],
                                    kw["ceil_mode"], kw["count_include_pad"],
                                    kw["divisor_override"])
        else:  # called directly, as eager's is (no wrapper of fastconv's side alone)
            def f(s):
                return FF.avg_pool2d(s["x"], kw["kernel_size"], kw["stride"], kw["padding"],
                                     kw["ceil_mode"], kw["count_include_pad"],
                                     kw["divisor_override"], backend=backend)
    elif op == "adaptive_avg_pool2d":
        def f(s):
            if backend is None:
                return F.adaptive_avg_pool2d(s["x"], kw["output_size"])
            return FF.adaptive_avg_pool2d(s["x"], kw["output_size"], backend=backend)
    elif op == "batch_norm":
        if backend is None:
            def f(s):
                y = F.batch_norm(s["x"], s["rm"], s["rv"], s["g"], s["b"], True,
                                 kw["momentum"], kw["eps"])
                return F.relu(y) if kw["relu"] else y
        else:
            def f(s):
                return FF.batch_norm(s["x"], s["rm"], s["rv"], s["g"], s["b"], True,
                                     kw["momentum"], kw["eps"], relu=kw["relu"],
                                     backend=backend)
    else:  # pragma: no cover - layers.py lists only these ops
        raise AssertionError(op)
    if provider == "compile":
        reset_compiler()
        f = torch.compile(f, dynamic=False)
    return f


def run(layer, f, mode: str):
    if mode == "fwd":
        def call(s):
            with torch.no_grad():
                return (f(s),)
    else:
        def call(s):
            targets = grad_targets(layer, s)
            out = f(s)
            return (out, *torch.autograd.grad(out, targets, s["gy"]))
    return call


def prepare(layer, s, grads: bool):
    if grads:
        for t in grad_targets(layer, s):
            t.requires_grad_(True)
    return s


def backward_only(layer, f, mode: str, sets: list) -> Callable:
    """``call(s)`` timing only the backward of ``f`` on set ``s``: the forward runs once per
    set here and its graph is kept (``retain_graph``) for every timed call."""
    outs = {id(s): f(s) for s in sets}

    def targets(s):
        every = grad_targets(layer, s)
        if mode == "bwd_input":
            return [s["x"]]
        if mode == "bwd_weight":
            return [t for t in every if t is not s["x"]]
        return every

    def call(s):
        return torch.autograd.grad(outs[id(s)], targets(s), s["gy"], retain_graph=True)
    return call


def modes_for(layer, breakdown: bool) -> tuple:
    """The modes a layer can be timed in."""
    if not breakdown:
        return MODES
    extra = ("bwd",) if layer.op != "conv2d_relu" else (
        ("bwd", "bwd_weight") if layer.first else BREAKDOWN)
    return MODES + extra


def input_sets(layer, fc, mode: str) -> list:
    """Enough input sets that rotating them overflows the device's last-level cache."""
    one = inputs(layer, fc)
    per_set = sum(t.numel() * t.element_size() for t in one.values() if t is not None)
    n = timing.rotation_count(per_set, fc.device)
    grads = mode != "fwd"
    return [prepare(layer, s, grads) for s in [one] + [inputs(layer, fc) for _ in range(n - 1)]]


def step(layer, provider: str, mode: str, sets: list) -> Callable:
    """``call(s)`` running ``layer`` with ``provider`` in ``mode`` on input set ``s``."""
    f = forward(layer, provider)
    if mode in MODES:
        return run(layer, f, mode)
    return backward_only(layer, f, mode, sets)
