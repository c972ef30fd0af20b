"""Training memory of each network: stock (``eager``, ``compile``) against converted (``fc_*``).

For one training step (forward, cross-entropy, backward, SGD) the benchmark records in
``extra_info``:

* ``saved_bytes``: the bytes of the distinct non-parameter storages autograd keeps for
  backward during the forward (``torch.autograd.graph.saved_tensors_hooks``): exact and the
  same on every device. Fused ReLUs keep one tensor for two layers (the mask comes from the
  saved output) and max-pools keep int8 window-local indices instead of their input and
  torch's int64 indices, so converted models should keep less.
* ``peak_bytes`` (GPU): ``torch.cuda.max_memory_allocated`` during the step above what was
  allocated before it (parameters, optimizer state, inputs): the step's peak working memory.
* ``saved_vs_stock``, ``peak_vs_stock``: the ratios to the stock model in the same run.

It also times the step against eager in alternation (as test_models.py does), so a memory
saving that costs speed shows. ``--fc-results FILE.jsonl`` appends the rows (kind ``memory``),
which ``scripts/bench_report.py`` renders as a memory table and chart.

    pytest benchmarks/test_memory.py --fc-results mem.jsonl [--fc-models alexnet,vgg16_bn]
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastconv
from fastconv import models
from fastconv.tools.common import grad_scaler, reset_compiler, sgd_step

from .conftest import PROVIDER_NAMES, first_call, measure, provider_skip_reason, train_step

_STOCK: dict = {}
_BASELINE: dict = {}  # (model, "saved"/"peak") -> the stock model's number in this run


def _stock(name: str, fc) -> nn.Module:
    if name not in _STOCK:
        torch.manual_seed(0)
        _STOCK[name] = models.build(name).to(fc.device).to(memory_format=fc.memory_format)
    return _STOCK[name]


def saved_bytes(model: nn.Module, x: torch.Tensor, amp) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(x)
    del out
    return sum(seen.values())


def test_train_step_memory(benchmark, fc, model_name, provider):
    reason = provider_skip_reason(provider, fc)
    if reason:
        pytest.skip(reason)
    stock = _stock(model_name, fc)
    model = (fastconv.convert(stock, backend=provider[3:]) if provider.startswith("fc_")
             else copy.deepcopy(stock))
    model.train()
    if provider == "compile":
        reset_compiler()
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    amp = None if fc.dtype is torch.float32 else fc.dtype
    shape = models.INPUT_SIZES[model_name]
    x = torch.randn(fc.batch, *shape, device=fc.device).contiguous(
        memory_format=fc.memory_format)
    y = torch.randint(0, 10, (fc.batch,), device=fc.device)
    scaler = grad_scaler(amp, fc.device)

    def step():
        return sgd_step(model, opt, x, y, amp, scaler)[0]

    loss = first_call(step, provider)  # optimizer state exists from here on
    assert torch.isfinite(loss).item(), f"{provider} {model_name}: loss {loss.item()}"
    extra = dict(kind="memory", case=model_name, op="train_step", mode="train",
                 provider=provider, provider_name=PROVIDER_NAMES[provider], flops=0, bytes=0,
                 input_shape=[fc.batch, *shape])
    if provider != "compile":  # compiled graphs save inside their own autograd function
        extra["saved_bytes"] = saved_bytes(model, x, amp)
    if fc.device.type == "cuda":
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(fc.device)
        base = torch.cuda.memory_allocated(fc.device)
        torch.cuda.reset_peak_memory_stats(fc.device)
        step()
        torch.cuda.synchronize(fc.device)
        extra["peak_bytes"] = torch.cuda.max_memory_allocated(fc.device) - base
    for key in ("saved", "peak"):
        if f"{key}_bytes" not in extra:
            continue
        if provider == "eager":
            _BASELINE[(model_name, key)] = extra[f"{key}_bytes"]
        elif (model_name, key) in _BASELINE:
            extra[f"{key}_vs_stock"] = round(extra[f"{key}_bytes"]
                                             / max(1, _BASELINE[(model_name, key)]), 4)
    steps = {provider: step}
    if provider != "eager":
        steps["eager"] = train_step(stock, model_name, "eager", fc)
    measure(benchmark, steps, provider, fc, extra)
