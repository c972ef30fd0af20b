"""Per-model benchmark: one full training step (forward, cross-entropy, backward, SGD step) of
each network: stock (``eager``), stock under torch.compile (``compile``) and converted by
fastconv for each backend (``fc_*``). 16-bit dtypes train under autocast (AMP).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastconv import models
from fastconv.tools.flops import count

from .conftest import PROVIDER_NAMES, measure, provider_skip_reason, train_step

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
    steps = {provider: train_step(stock, model_name, provider, fc)}
    if provider != "eager":
        steps["eager"] = train_step(stock, model_name, "eager", fc)
    shape = models.INPUT_SIZES[model_name]
    measure(benchmark, steps, provider, fc, dict(
        kind="model", case=model_name, op="train_step", mode="train", provider=provider,
        provider_name=PROVIDER_NAMES[provider],
        flops=3 * fc.batch * _forward_flops(model_name), bytes=0,
        input_shape=[fc.batch, *shape]))
