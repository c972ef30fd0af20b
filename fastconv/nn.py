"""Drop-in modules. Each subclasses the torch.nn module it replaces, so parameters, buffers and
state_dict keys are the same; ``relu=`` fuses a ReLU and ``backend=`` picks the implementation
(``None``: ``$FASTCONV_BACKEND``, else ``"auto"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as FF
from .checks import check_batch_norm

__all__ = ["Conv2dReLU", "MaxPool2d", "BatchNorm2d", "AvgPool2d", "AdaptiveAvgPool2d",
           "AbsorbedReLU", "FoldedBatchNorm"]


def _extra(relu: Optional[bool], backend: Optional[str]) -> str:
    parts = [] if relu is None else [f"relu={relu}"]
    if backend is not None:
        parts.append(f"backend={backend!r}")
    return ", ".join(parts)


class Conv2dReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU, in one kernel (``relu=False``: the conv alone)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 relu: bool = True, backend: Optional[str] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, relu: bool = True,
                  backend: Optional[str] = None) -> "Conv2dReLU":
        """A Conv2dReLU that shares ``conv``'s parameters (no copy: optimizers keep working)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device="meta", relu=relu, backend=backend)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            # as torch does: pad explicitly with the requested mode, then a padding-free conv
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return FF.conv2d_relu(input, self.weight, self.bias, self.stride, padding,
                              self.dilation, self.groups, relu=self.relu, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self.relu, self.backend)}"


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``; ``relu=True`` also applies a preceding ReLU in the same pass."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False, *, relu: bool = False, backend: Optional[str] = None):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d, *, relu: bool = False,
                  backend: Optional[str] = None) -> "MaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                   pool.return_indices, pool.ceil_mode, relu=relu, backend=backend)

    def to_pool(self) -> nn.MaxPool2d:
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation,
                            self.return_indices, self.ceil_mode)

    def forward(self, input: torch.Tensor):
        return FF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             self.ceil_mode, self.return_indices, relu=self.relu,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self.relu, self.backend)}"


class AvgPool2d(nn.AvgPool2d):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None, *,
                 backend: Optional[str] = None):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)
        self.backend = backend

    @classmethod
    def from_pool(cls, pool: nn.AvgPool2d, *, backend: Optional[str] = None) -> "AvgPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                   pool.count_include_pad, pool.divisor_override, backend=backend)

    def to_pool(self) -> nn.AvgPool2d:
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return FF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(None, self.backend)}".rstrip(", ")


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def __init__(self, output_size, *, backend: Optional[str] = None):
        super().__init__(output_size)
        self.backend = backend

    @classmethod
    def from_pool(cls, pool: nn.AdaptiveAvgPool2d, *,
                  backend: Optional[str] = None) -> "AdaptiveAvgPool2d":
        return cls(pool.output_size, backend=backend)

    def to_pool(self) -> nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool2d(self.output_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return FF.adaptive_avg_pool2d(input, self.output_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(None, self.backend)}".rstrip(", ")


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same buffers, ``num_batches_tracked`` and ``momentum=None``
    semantics); ``relu=True`` fuses the following ReLU, and ``forward(input, residual)`` adds
    ``residual`` before it (``relu(bn(input) + residual)``, ResNet's block ending)."""

    def __init__(self, num_features, eps=1e-05, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, relu: bool = False,
                 backend: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, *, relu: bool = False,
                backend: Optional[str] = None) -> "BatchNorm2d":
        """A BatchNorm2d sharing ``bn``'s parameters and buffers."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device="meta", relu=relu, backend=backend)
        _share_state(bn, new)
        return new

    def to_bn(self) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine,
                            self.track_running_stats, device="meta")
        _share_state(self, bn)
        return bn

    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is None:  # cumulative moving average, as torch.nn.BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked + 1) if track else 0.0
        else:
            factor = self.momentum
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        # validate everything before any state (num_batches_tracked, running stats) changes,
        # and count the batch only once the op has run: a refused or failed call counts nothing
        args = check_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, factor, self.eps, relu=self.relu,
                                residual=residual)
        out = FF._run("batch_norm", args, self.backend)
        if track:
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self.relu, self.backend)}"


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    for name in ("weight", "bias"):
        setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        dst._buffers[name] = src._buffers.get(name)
    dst.train(src.training)


class AbsorbedReLU(nn.Identity):
    """Where ``fastconv.convert`` took out a ReLU that the preceding layer now applies.

    An ``nn.Identity`` (no state, so state_dict keys are unchanged); ``fastconv.revert`` turns
    it back into ``nn.ReLU(inplace=...)``.
    """

    def __init__(self, inplace: bool = False, into: str = ""):
        super().__init__()
        self.inplace = inplace
        self.into = into

    def extra_repr(self) -> str:
        return f"applied by {self.into!r}" if self.into else ""


class FoldedBatchNorm(nn.Identity):
    """Where ``convert(fold_bn=True)`` folded a BatchNorm2d into the preceding conv (eval only)."""

    def __init__(self, into: str = ""):
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return f"folded into {self.into!r}"
