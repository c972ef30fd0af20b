"""Per-layer benchmark: every conv, pool and batch-norm layer of the MODELS.md networks
(``layers.py``), forward (``fwd``, no autograd graph, as in inference) and forward+backward
(``fwdbwd``, the gradients a training step needs), for each provider.

``eager`` is what a stock model runs: the torch op, then a separate ReLU where the network
has one. The fastconv providers run ``fastconv.functional`` with the ReLU fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastconv.functional as FF
from fastconv.tools.common import rel_err, reset_compiler

from .conftest import (PROVIDER_NAMES, SANITY, first_call, measure, provider_skip_reason,
                       rotation_count)

import pytest


def _inputs(layer, fc, count_only: bool = False):
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


def _grad_targets(layer, s) -> list:
    if layer.op == "conv2d_relu":
        targets = [] if layer.first else [s["x"]]
        return targets + [s["w"]] + ([s["b"]] if s["b"] is not None else [])
    if layer.op == "batch_norm":
        return [s["x"], s["g"], s["b"]]
    return [s["x"]]


def _forward(layer, provider: str):
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
        fn = F.avg_pool2d if backend is None else (
            lambda *a: FF.avg_pool2d(*a, backend=backend))

        def f(s):
            return fn(s["x"], kw["kernel_size"], kw["stride"], kw["padding"], kw["ceil_mode"],
                      kw["count_include_pad"], kw["divisor_override"])
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


def _run(layer, f, mode: str):
    if mode == "fwd":
        def call(s):
            with torch.no_grad():
                return (f(s),)
    else:
        def call(s):
            targets = _grad_targets(layer, s)
            out = f(s)
            return (out, *torch.autograd.grad(out, targets, s["gy"]))
    return call


def _prepare(layer, s, mode):
    if mode == "fwdbwd":
        for t in _grad_targets(layer, s):
            t.requires_grad_(True)
    return s


def test_layer(benchmark, fc, layer, mode, provider):
    reason = provider_skip_reason(provider, fc)
    if reason:
        pytest.skip(reason)
    one = _inputs(layer, fc)
    per_set = sum(t.numel() * t.element_size() for t in one.values() if t is not None)
    sets = [_prepare(layer, one, mode)] + [_prepare(layer, _inputs(layer, fc), mode)
                                           for _ in range(rotation_count(per_set, fc.device) - 1)]
    call = _run(layer, _forward(layer, provider), mode)

    # sanity: the first result against eager on the same inputs (a copy of the BN statistics,
    # which both update)
    got = first_call(lambda: call(sets[0]), provider)
    if provider != "eager":
        ref_inputs = {k: (v.detach().clone().requires_grad_(v.requires_grad)
                          if v is not None else None) for k, v in sets[0].items()}
        expected = _run(layer, _forward(layer, "eager"), mode)(ref_inputs)
        errs = [rel_err(a, b) for a, b in zip(got, expected)]
        benchmark.extra_info["rel_err_vs_eager"] = max(errs)
        assert max(errs) <= SANITY[fc.dtype], (
            f"{provider} disagrees with eager on {layer.id} ({mode}): relative errors {errs}")
    del got

    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(sets)
        return call(sets[state["i"]])

    backward = mode == "fwdbwd"
    measure(benchmark, step, fc, dict(
        kind="layer", case=layer.id, op=layer.op, mode=mode, provider=provider,
        provider_name=PROVIDER_NAMES[provider], flops=layer.flops(fc.batch, backward),
        bytes=layer.bytes(fc.batch, fc.dtype.itemsize, backward) if layer.op != "conv2d_relu"
        else 0, input_shape=[fc.batch, *layer.in_shape], where=list(layer.where),
        key=layer.key, input_sets=len(sets)))
