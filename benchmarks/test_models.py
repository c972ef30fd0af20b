"""Per-model benchmark: one full training step (forward, cross-entropy, backward, SGD step) of
each network: stock (``eager``), stock under torch.compile (``compile``) and converted by
fastconv for each backend (``fc_*``). 16-bit dtypes train under autocast (AMP).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastconv
from fastconv import models
from fastconv.tools.common import grad_scaler, reset_compiler, sgd_step
from fastconv.tools.flops import count

from .conftest import PROVIDER_NAMES, first_call, measure, provider_skip_reason

_STOCK: dict = {}


def _stock(name: str, fc) -> nn.Module:
    """One stock model per name and session (every provider starts from the same weights)."""
    if name not in _STOCK:
        torch.manual_seed(0)
        _STOCK[name] = models.build(name).to(fc.device).to(memory_format=fc.memory_format)
    return _STOCK[name]


def _forward_flops(name: str) -> int:
    model = models.build(name).eval().to("meta")
    return count(model, torch.empty(1, *models.INPUT_SIZES[name], device="meta"))


def test_train_step(benchmark, fc, model_name, provider):
    reason = provider_skip_reason(provider, fc)
    if reason:
        pytest.skip(reason)
    stock = _stock(model_name, fc)
    if provider.startswith("fc_"):
        model = fastconv.convert(stock, backend=provider[3:])
    else:
        model = copy.deepcopy(stock)
    model.train()
    if provider == "compile":
        reset_compiler()
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    amp = None if fc.dtype is torch.float32 else fc.dtype
    shape = models.INPUT_SIZES[model_name]
    xs = [torch.randn(fc.batch, *shape, device=fc.device).contiguous(
        memory_format=fc.memory_format) for _ in range(3)]
    ys = [torch.randint(0, 10, (fc.batch,), device=fc.device) for _ in xs]
    scaler = grad_scaler(amp, fc.device)
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        return sgd_step(model, opt, xs[i], ys[i], amp, scaler)[0]

    loss = first_call(step, provider)
    assert torch.isfinite(loss).item(), f"{provider} {model_name}: first loss is {loss.item()}"
    measure(benchmark, step, fc, dict(
        kind="model", case=model_name, op="train_step", mode="train", provider=provider,
        provider_name=PROVIDER_NAMES[provider],
        flops=3 * fc.batch * _forward_flops(model_name), bytes=0,
        input_shape=[fc.batch, *shape]))
