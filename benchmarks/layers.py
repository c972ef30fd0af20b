"""Every conv, pool and batch-norm layer of the MODELS.md networks, found by tracing
``fastconv.models``: each model is converted (so a conv knows whether it absorbed its ReLU, as
fastconv runs it) and run once on the meta device with forward hooks recording what each
fastconv layer receives. Nothing here is typed by hand.

Identical layers (same op, input shape and arguments) are listed once, with every place they
occur. ``key`` marks the default benchmark set: every layer of AlexNet, and for each other
network its first conv, its most expensive conv, its first batch norm and its first pool of
each kind.

Work per call (what "achieved" rates divide by), for batch N:
* conv: 2*N*K*P*Q*(C/groups)*R*S FLOPs forward; the backward adds the same for the weight
  gradient and again for the input gradient (not computed for a network's first layer, whose
  input is the image).
* pools and batch norm: the bytes that must move at least once: read the input, write the
  output; the backward reads the output gradient and writes the input gradient (batch norm
  also re-reads its input). Pooling indices and statistics are not counted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

import fastconv
from fastconv import models
from fastconv import nn as fnn

OPS = ("conv2d_relu", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm")


@dataclasses.dataclass(frozen=True)
class Layer:
    op: str
    in_shape: tuple          # (C, H, W) of one example
    out_shape: tuple         # (C, H, W)
    args: tuple              # sorted (name, value) pairs: the op's arguments (see make_args)
    first: bool              # its input is the network's input: no input gradient in training
    model: str               # first place it occurs: model and module path
    where: tuple = ()        # every "model:module" it occurs at
    key: bool = False

    @property
    def kw(self) -> dict:
        return dict(self.args)

    @property
    def id(self) -> str:
        """A short stable id, e.g. ``alexnet.0-conv11s4p1-1x224x224-96``."""
        kw = self.kw
        c, h, w = self.in_shape
        place = self.where[0].replace(":", ".") if self.where else self.model
        if self.op == "conv2d_relu":
            k = kw["kernel"]
            what = (f"conv{k[0]}x{k[1]}s{kw['stride'][0]}p{kw['padding'][0]}"
                    + (f"g{kw['groups']}" if kw["groups"] > 1 else "")
                    + ("" if kw["relu"] else "-norelu"))
            tail = f"-{self.out_shape[0]}"
        elif self.op in ("max_pool2d", "avg_pool2d"):
            k = kw["kernel_size"]
            what = (f"{'max' if self.op == 'max_pool2d' else 'avg'}pool{k[0]}s{kw['stride'][0]}"
                    f"p{kw['padding'][0]}" + ("c" if kw.get("ceil_mode") else ""))
            tail = ""
        elif self.op == "adaptive_avg_pool2d":
            what, tail = f"adaptive{kw['output_size'][0]}", ""
        else:
            what, tail = "bn" + ("relu" if kw["relu"] else ""), ""
        return f"{place}-{what}-{c}x{h}x{w}{tail}"

    def flops(self, batch: int, backward: bool) -> int:
        """FLOPs of one call (conv only; 0 for the memory-bound ops)."""
        if self.op != "conv2d_relu":
            return 0
        kw = self.kw
        k, p, q = self.out_shape
        c = self.in_shape[0] // kw["groups"]
        fwd = 2 * batch * k * p * q * c * kw["kernel"][0] * kw["kernel"][1]
        if not backward:
            return fwd
        return fwd * (2 if self.first else 3)

    def bytes(self, batch: int, itemsize: int, backward: bool) -> int:
        """Compulsory memory traffic of one call (pools and batch norm; see module doc)."""
        n_in = batch * self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        n_out = batch * self.out_shape[0] * self.out_shape[1] * self.out_shape[2]
        moved = n_in + n_out
        if backward:
            moved += n_out + n_in + (n_in if self.op == "batch_norm" else 0)
        return moved * itemsize


def _args_of(mod) -> Optional[tuple[str, dict]]:
    if isinstance(mod, fnn.Conv2dReLU):
        return "conv2d_relu", dict(out_channels=mod.out_channels, kernel=tuple(mod.kernel_size),
                                   stride=tuple(mod.stride), padding=tuple(mod.padding),
                                   dilation=tuple(mod.dilation), groups=mod.groups,
                                   bias=mod.bias is not None, relu=bool(mod.relu))
    if isinstance(mod, fnn.MaxPool2d):
        return "max_pool2d", dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride),
                                  padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                                  ceil_mode=bool(mod.ceil_mode), relu=bool(mod.relu))
    if isinstance(mod, fnn.AvgPool2d):
        return "avg_pool2d", dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride),
                                  padding=_pair(mod.padding), ceil_mode=bool(mod.ceil_mode),
                                  count_include_pad=bool(mod.count_include_pad),
                                  divisor_override=mod.divisor_override)
    if isinstance(mod, fnn.AdaptiveAvgPool2d):
        return "adaptive_avg_pool2d", dict(output_size=_pair(mod.output_size))
    if isinstance(mod, fnn.BatchNorm2d):
        return "batch_norm", dict(eps=float(mod.eps), momentum=float(mod.momentum or 0.1),
                                  relu=bool(mod.relu))
    return None


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@functools.lru_cache(maxsize=None)
def trace(model_name: str) -> tuple[Layer, ...]:
    """The layers of one model in forward order (duplicates kept)."""
    stock = models.build(model_name)
    # the converted twin says how fastconv serves each layer (ReLU absorbed or not); shapes
    # come from running the stock model on the meta device (no compute)
    # pool_relu=False: each conv/BN keeps its ReLU, so layer cells time the fused ops the
    # issues set targets for (conv+bias+ReLU, BN+ReLU, plain max-pool); the model benchmarks
    # run convert's default, where a max-pool applies a ReLU right before it
    twin = dict(fastconv.convert(stock, backend="torch", pool_relu=False).named_modules())
    stock = stock.eval().to("meta")
    x = torch.empty(1, *models.INPUT_SIZES[model_name], device="meta")
    found: list[Layer] = []

    def hook(name):
        def fn(mod, inputs, output):
            op, args = _args_of(twin[name])
            inp = inputs[0]
            found.append(Layer(op=op, in_shape=tuple(inp.shape[1:]),
                               out_shape=tuple(output.shape[1:]),
                               args=tuple(sorted(args.items())), first=inp is x,
                               model=model_name, where=(f"{model_name}:{name}",)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in stock.named_modules()
               if _args_of(twin.get(n)) is not None]
    try:
        with torch.no_grad():
            stock(x)
    finally:
        for h in handles:
            h.remove()
    return tuple(found)


def _signature(layer: Layer) -> tuple:
    return (layer.op, layer.in_shape, layer.args, layer.first)


def _key_places(model_name: str, layers: tuple[Layer, ...]) -> set:
    if model_name == "alexnet":
        return {l.where[0] for l in layers}
    keys = set()
    convs = [l for l in layers if l.op == "conv2d_relu"]
    if convs:
        keys.add(convs[0].where[0])
        keys.add(max(convs, key=lambda l: l.flops(1, False)).where[0])
    for op in ("batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"):
        of_op = [l for l in layers if l.op == op]
        if of_op:
            keys.add(of_op[0].where[0])
    return keys


def layers(model_names: Optional[list] = None, which: str = "key") -> list[Layer]:
    """Unique layers over ``model_names`` (default: every model), ``which`` = "key" or "all"."""
    if which not in ("key", "all"):
        raise ValueError(f"which must be 'key' or 'all', got {which!r}")
    merged: dict[tuple, Layer] = {}
    for name in model_names or list(models.MODELS):
        if name not in models.MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(models.MODELS)}")
        found = trace(name)
        keys = _key_places(name, found)
        for layer in found:
            sig = _signature(layer)
            key = layer.where[0] in keys
            if sig in merged:
                old = merged[sig]
                merged[sig] = dataclasses.replace(old, where=old.where + layer.where,
                                                  key=old.key or key)
            else:
                merged[sig] = dataclasses.replace(layer, key=key)
    out = list(merged.values())
    return out if which == "all" else [l for l in out if l.key]
