"""Counting a model's forward FLOPs (a multiply-add is 2 FLOPs) with forward hooks."""
from __future__ import annotations

import torch
from torch import nn


def conv_flops(x_shape, weight_shape, out_shape) -> int:
    n, k, p, q = out_shape
    c_per_group, r, s = weight_shape[1:]
    return 2 * n * k * p * q * c_per_group * r * s


@torch.no_grad()
def count(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of conv and linear layers in one forward pass on ``example``."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += conv_flops(inputs[0].shape, mod.weight.shape, out.shape)
        elif isinstance(mod, nn.Linear):
            total += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return total
