"""Drop-in modules. Each subclasses the torch.nn module it replaces, so parameters, buffers and
state_dict keys are the same; ``relu=`` fuses a ReLU and ``backend=`` picks the implementation
(``None``: ``$FASTCONV_BACKEND``, else ``"auto"``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from . import functional as FF

__all__ = ["Conv2dReLU", "MaxPool2d", "BatchNorm2d", "AvgPool2d", "AdaptiveAvgPool2d",
           "AbsorbedReLU", "FoldedBatchNorm"]


def _extra(relu: Optional[bool], backend: Optional[str]) -> str:
    parts = [] if relu is None else [f"relu={relu}"]
    if backend is not None:
        parts.append(f"backend={backend!r}")
    return ", ".join(parts)


_grad_enabled = torch.is_grad_enabled
_deterministic = torch._C._get_deterministic_algorithms  # what torch.are_deterministic_... returns
_compiling = torch.compiler.is_compiling
_any_autocast = torch._C._is_any_autocast_enabled
_env_raw, _env_key = dispatch.env_raw, dispatch.env_key
_UNSET = object()


class _Memo:
    """A layer's memo of its last decided call: ``(state, implementation, own)``.

    A repeated layer call whose state equals the memo's runs the implementation at once. The
    state: which fast-path table is in force, grad and deterministic mode, ``$FASTCONV_BACKEND``
    (read raw) when the layer names no backend, and the input's (and batch norm's residual's)
    type, shape, strides, dtype, device and requires_grad. The layer's arguments are not in
    it: setting any attribute of the layer (``stride``, ``backend``, ``train()``/``eval()``, a
    parameter) drops the memo, and so does ``Module._apply`` (``.to()``, ``.half()``). Nor,
    when the implementation is torch's own (``any_tensors``: right for any tensors), are the
    layer's own tensors; for fastconv's kernels (``own``) the state also holds their
    identity, shape, dtype and requires_grad (their device and strides change in place only
    through ``Module._apply``).
    A torch-decided layer whose parameter is frozen in place (``requires_grad_``) or swapped
    through ``.data`` therefore keeps torch, right but maybe no longer the fastest choice for
    the new pass: ``fastconv.forget_fast_paths()`` decides again.

    It is the decided fast path of ``fastconv.functional`` (``dispatch.FAST``) without
    building and hashing that key: on a small layer every microsecond of Python shows,
    several times over (LeNet-BN inference on 2 CPU cores, 6 converted layers: the key's
    state cost 7% of the step, this one 2-3%). Anything else, and calls under tracing or
    autocast, takes the functional path; the memo is taken only from a decision that path
    remembered. Not pickled or copied (a copy decides again on its first call).
    """

    def _memo_state(self, input: torch.Tensor, own: tuple, residual=None) -> Optional[tuple]:
        """This call's state (``own``: the layer's tensors to hold, see above); None when the
        input or the residual is not a tensor (the checked path says so)."""
        try:  # one expression: a tuple built in pieces cost a third more (0.74 -> 0.59 us)
            state = (id(dispatch.FAST), dispatch.EPOCH, _grad_enabled(), _deterministic(),
                     _env_raw.get(_env_key) if self.backend is None else None, type(input),
                     input.shape, input.stride(), input.dtype, input.device,
                     input.requires_grad)
            if residual is not None:  # (a state with one is longer than one without)
                state += (type(residual), residual.shape, residual.stride(), residual.dtype,
                          residual.device, residual.requires_grad)
        except AttributeError:
            return None
        for t in own:
            state += (None,) if t is None else (id(t), t.shape, t.dtype, t.requires_grad)
        return state

    def _memo_get(self, input: torch.Tensor, own: tuple, residual=None):
        """The memo's implementation if this call's state equals the memo's, else None."""
        memo = self.__dict__.get("_fc_memo")
        if memo is None or _compiling() or _any_autocast():
            return None
        state, impl, own_too = memo
        return impl if self._memo_state(input, own if own_too else (), residual) == state \
            else None

    def _memo_keep(self, input: torch.Tensor, own: tuple, op: str, tensors: tuple,
                   geometry: tuple, flags: tuple, residual=None) -> None:
        """After a functional call of ``op`` on ``tensors``: memo the implementation it
        remembered for them, if any (``input`` and ``own`` as ``_memo_get`` takes them)."""
        if _compiling() or _any_autocast():
            return
        key = dispatch.call_key(op, tensors, geometry, flags, self.backend)
        impl = dispatch.FAST.get(key) if key is not None else None
        if impl is not None:
            own_too = not getattr(impl, "any_tensors", False)
            state = self._memo_state(input, own if own_too else (), residual)
            if state is not None:
                self.__dict__["_fc_memo"] = (state, impl, own_too)

    def _forget(self) -> None:
        """Drop the memo and what the layer derived from its attributes (``_fc_how``)."""
        self.__dict__.pop("_fc_memo", None)
        self.__dict__.pop("_fc_how", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get(name, _UNSET) is not value:  # model.train() on a training one
            self._forget()  # an argument, a mode or a tensor changes
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._forget()
        super().__delattr__(name)

    def _apply(self, fn, *args, **kwargs):
        self._forget()  # .to(), .half(), .cuda(): decide again
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_fc_memo", None)
        state.pop("_fc_how", None)
        return state


class Conv2dReLU(_Memo, nn.Conv2d):
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
            return FF.conv2d_relu(input, self.weight, self.bias, self.stride, 0, self.dilation,
                                  self.groups, relu=self.relu, backend=self.backend)
        try:  # not self.weight: nn.Module.__getattr__ finds parameters after a failed lookup
            weight, bias = self._parameters["weight"], self._parameters["bias"]
        except KeyError:  # a parametrization or weight norm: attributes computed elsewhere
            weight, bias = self.weight, self.bias
        impl = self._memo_get(input, (weight, bias))
        if impl is not None:
            return impl(input, weight, bias)
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        out = FF.conv2d_relu(input, weight, bias, *geometry, relu=self.relu,
                             backend=self.backend)
        self._memo_keep(input, (weight, bias), "conv2d_relu", (input, weight, bias), geometry,
                        (self.relu,))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self.relu, self.backend)}"


class MaxPool2d(_Memo, nn.MaxPool2d):
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
        impl = self._memo_get(input, ())
        if impl is not None:
            return impl(input)
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        flags = (self.ceil_mode, self.return_indices, self.relu)
        out = FF.max_pool2d(input, *geometry, *flags[:2], relu=self.relu, backend=self.backend)
        self._memo_keep(input, (), "max_pool2d", (input,), geometry, flags)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(self.relu, self.backend)}"


class AvgPool2d(_Memo, nn.AvgPool2d):
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
        impl = self._memo_get(input, ())
        if impl is not None:
            return impl(input)
        geometry = (self.kernel_size, self.stride, self.padding, self.divisor_override)
        flags = (self.ceil_mode, self.count_include_pad)
        out = FF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override, backend=self.backend)
        self._memo_keep(input, (), "avg_pool2d", (input,), geometry, flags)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(None, self.backend)}".rstrip(", ")


class AdaptiveAvgPool2d(_Memo, nn.AdaptiveAvgPool2d):
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
        impl = self._memo_get(input, ())
        if impl is not None:
            return impl(input)
        out = FF.adaptive_avg_pool2d(input, self.output_size, backend=self.backend)
        self._memo_keep(input, (), "adaptive_avg_pool2d", (input,), (self.output_size,), ())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_extra(None, self.backend)}".rstrip(", ")


class BatchNorm2d(_Memo, nn.BatchNorm2d):
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
        how = self.__dict__.get("_fc_how")
        if how is None:  # what the layer's attributes make of a call; setting one forgets it
            how = self.__dict__["_fc_how"] = self._how()
        bn_training, track, use_running, factor = how
        if factor is None:  # momentum=None: cumulative moving average, as torch's
            factor = 1.0 / float(self.num_batches_tracked + 1) if track else 0.0
        try:  # not self.weight: nn.Module.__getattr__ finds tensors after a failed lookup
            buffers, params = self._buffers, self._parameters
            own = (buffers["running_mean"] if use_running else None,
                   buffers["running_var"] if use_running else None,
                   params["weight"], params["bias"])
        except KeyError:  # a parametrization: attributes computed elsewhere
            own = (self.running_mean if use_running else None,
                   self.running_var if use_running else None, self.weight, self.bias)
        # validate everything before any state (num_batches_tracked, running stats) changes,
        # and count the batch only once the op has run: a refused or failed call counts nothing
        cacheable = self.momentum is not None
        impl = self._memo_get(input, own, residual) if cacheable else None
        if impl is not None:
            out = impl(input, *own, residual)
        else:
            if isinstance(input, torch.Tensor):  # else the checks' error names the argument
                self._check_input_dim(input)
            if cacheable:  # the functional path, fast path included
                out = FF.batch_norm(input, *own, bn_training, factor, self.eps,
                                    relu=self.relu, residual=residual, backend=self.backend)
                self._memo_keep(input, own, "batch_norm", (input, *own, residual),
                                (factor, self.eps), (bn_training, self.relu), residual)
            else:
                out = FF._batch_norm(input, *own, bn_training, factor, self.eps, self.relu,
                                     residual, self.backend)
        if track:
            self.num_batches_tracked.add_(1)
        return out

    def _how(self) -> tuple:
        """``(bn_training, track, use_running, factor)``: as torch.nn.BatchNorm2d decides them
        (``factor`` None: the cumulative average of ``momentum=None``, which changes with
        every batch)."""
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats and self.num_batches_tracked is not None
        use_running = not self.training or self.track_running_stats
        return bn_training, track, use_running, self.momentum

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
