"""``convert(model)``: serve a stock torch.nn model's layers with fastconv, keeping every
state_dict key; ``revert(model)`` undoes it.

How ReLUs are found: the model is traced with ``torch.fx`` (which sees through custom modules
such as Inception and residual blocks and through ``F.relu`` calls in their ``forward``). A conv
or batch norm whose output feeds exactly one consumer, a ReLU, absorbs it. An ``nn.ReLU``
module called at that one place becomes :class:`~fastconv.nn.AbsorbedReLU` (an Identity); a
``F.relu`` call in user code, or a ReLU module used elsewhere too, stays where it is: applying
ReLU twice is the same function with the same gradient, so it costs a pass but changes nothing.

A ReLU module between a conv (or batch norm) and a max-pool (``return_indices=False``) that is
its only consumer is applied by the pool instead (``MaxPool2d(relu=True)``: max and ReLU
commute, and the pool's backward masks by its own small output for free). The conv then runs
without ReLU and its backward needs no masking pass over its full-size output: measured 3%
of an AlexNet training step on CPU.
If tracing fails, consecutive children of every ``nn.Sequential`` are matched instead.

The user's model is never modified unless ``inplace=True``; the result shares nothing with it
except when ``inplace=True``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from . import nn as fnn

log = logging.getLogger("fastconv")

_RELU_FUNCTIONS = {torch.relu, F.relu, torch.nn.functional.relu, torch.relu_}
_STOCK = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclasses.dataclass
class ConversionReport:
    replaced: list = dataclasses.field(default_factory=list)   # (name, what)
    left: list = dataclasses.field(default_factory=list)       # (name, why)
    method: str = ""

    def __str__(self) -> str:
        lines = [f"fastconv.convert ({self.method}): replaced {len(self.replaced)}, "
                 f"left {len(self.left)}"]
        lines += [f"  replaced {n}: {w}" for n, w in self.replaced]
        lines += [f"  left     {n}: {w}" for n, w in self.left]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> Optional[ConversionReport]:
    """The report of the ``convert`` call that produced ``model`` (None if not converted)."""
    return getattr(model, "_fastconv_report", None)


# --------------------------------------------------------------------------- graph analysis
def _is_relu(node, modules) -> Optional[str]:
    """'module', 'function' or 'method' if ``node`` applies ReLU, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return "module"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "function"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "method"
    return None


def _relu_inplace(node, modules) -> bool:
    if node.op == "call_module":
        return modules[node.target].inplace
    if node.op == "call_method":
        return node.target == "relu_"
    return node.target is torch.relu_ or bool(node.kwargs.get("inplace", False)) or (
        len(node.args) > 1 and bool(node.args[1]))


@dataclasses.dataclass
class _Plan:
    convert: dict = dataclasses.field(default_factory=dict)   # module name -> fuse relu?
    absorb: dict = dataclasses.field(default_factory=dict)    # relu module name -> into
    pool_relu: set = dataclasses.field(default_factory=set)    # max-pools that apply a ReLU
    fold: dict = dataclasses.field(default_factory=dict)      # bn name -> conv name
    notes: dict = dataclasses.field(default_factory=dict)     # name -> note for the report


def _relu_into_pool(plan: _Plan, producer: str, relu: str, pool: str) -> None:
    """Plan the ReLU module ``relu`` after ``producer`` to be applied by the max-pool ``pool``."""
    plan.absorb[relu] = pool
    plan.pool_relu.add(pool)
    plan.notes[producer] = f"its ReLU is applied by the max-pool {pool} that follows"


def _plan_from_graph(model: nn.Module, fold_bn: bool, pool_relu: bool = True) -> _Plan:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    plan = _Plan()

    def single_relu_user(node):
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            return users[0]
        return None

    def pool_after(relu_node) -> Optional[str]:
        """The max-pool that can apply relu_node (a ReLU module called once, whose one
        consumer is a stock MaxPool2d called once, without indices), else None."""
        if not pool_relu or _is_relu(relu_node, modules) != "module" or \
                len(calls[relu_node.target]) != 1:
            return None
        users = list(relu_node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        pool = modules.get(users[0].target)
        if type(pool) is not nn.MaxPool2d or pool.return_indices or \
                len(calls[users[0].target]) != 1:
            return None
        return users[0].target

    def try_absorb(producer: str, relu_node) -> bool:
        """Fuse relu_node into producer (or into the max-pool right after it, leaving the
        producer without ReLU); False (with a note) when that would be unsafe."""
        pool = pool_after(relu_node)
        if pool is not None:
            _relu_into_pool(plan, producer, relu_node.target, pool)
            return False
        kind = _is_relu(relu_node, modules)
        if kind == "module" and len(calls[relu_node.target]) == 1:
            plan.absorb[relu_node.target] = producer
            return True
        if _relu_inplace(relu_node, modules):
            # an in-place ReLU left after a fused layer would overwrite the output that the
            # fused layer saved for its backward
            plan.notes[producer] = ("ReLU not fused: it is applied in place by code or a "
                                    "shared module fastconv cannot remove")
            return False
        plan.notes[producer] = (f"ReLU fused; the {kind} call in forward() stays (ReLU is "
                                "idempotent)")
        return True

    for name, nodes in calls.items():
        mod = modules[name]
        if type(mod) not in _STOCK or name in plan.fold:
            continue
        if len(nodes) != 1:
            plan.convert[name] = False
            plan.notes[name] = f"called at {len(nodes)} places: converted without fusion"
            continue
        node = nodes[0]
        fuse = False
        if type(mod) in (nn.Conv2d, nn.BatchNorm2d):
            relu_node = single_relu_user(node)
            if relu_node is not None:
                fuse = try_absorb(name, relu_node)
            elif fold_bn and type(mod) is nn.Conv2d and len(node.users) == 1:
                user = next(iter(node.users))
                bn = modules.get(user.target) if user.op == "call_module" else None
                if type(bn) is nn.BatchNorm2d and len(calls[user.target]) == 1:
                    plan.fold[user.target] = name
                    relu_node = single_relu_user(user)
                    if relu_node is not None:
                        fuse = try_absorb(name, relu_node)
        plan.convert[name] = fuse
    return plan


def _plan_from_sequentials(model: nn.Module, fold_bn: bool, pool_relu: bool = True) -> _Plan:
    plan = _Plan()
    for prefix, mod in model.named_modules():
        if type(mod) in _STOCK:
            plan.convert.setdefault(prefix, False)
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())

        def qualified(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        for i, (name, child) in enumerate(kids):
            full = qualified(name)
            nxt = kids[i + 1] if i + 1 < len(kids) else None
            after = kids[i + 2] if i + 2 < len(kids) else None
            if type(child) not in (nn.Conv2d, nn.BatchNorm2d) or nxt is None:
                continue
            nxt_full = qualified(nxt[0])
            if type(nxt[1]) is nn.ReLU:
                if pool_relu and after is not None and type(after[1]) is nn.MaxPool2d and \
                        not after[1].return_indices:
                    # the pool applies the ReLU (see the module docstring)
                    plan.convert[full] = False
                    _relu_into_pool(plan, full, nxt_full, qualified(after[0]))
                else:
                    plan.convert[full] = True
                    plan.absorb[nxt_full] = full
            elif fold_bn and type(child) is nn.Conv2d and type(nxt[1]) is nn.BatchNorm2d:
                plan.fold[nxt_full] = full
                if after is not None and type(after[1]) is nn.ReLU:
                    plan.convert[full] = True
                    plan.absorb[qualified(after[0])] = full
    return plan


# --------------------------------------------------------------------------- rewriting
def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode batch norm into conv's weight and bias, in float64 then cast back."""
    scale = (bn.weight.double() if bn.weight is not None else 1.0) / torch.sqrt(
        bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.bias is not None else 0.0
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    w = conv.weight
    conv.weight = nn.Parameter((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype))
    conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(w.dtype))


def _require_module(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        hint = " (build it first, e.g. fastconv.models.build(name))" if isinstance(model, str) \
            else ""
        raise TypeError(f"{fn}(model): model must be a torch.nn.Module, got "
                        f"{type(model).__name__} {model!r:.60}{hint}")


def convert(model: nn.Module, backend: Optional[str] = None, inplace: bool = False, *,
            fold_bn: bool = False, pool_relu: bool = True, verbose: bool = False) -> nn.Module:
    """Return ``model`` with its Conv2d(+ReLU), BatchNorm2d(+ReLU), MaxPool2d and average
    pools served by fastconv.

    Every state_dict key stays the same, so stock checkpoints load into the result and back.
    ``backend`` is stored on each new layer (``None``: chosen per call). ``fold_bn=True``
    (eval mode only) folds each BatchNorm2d that follows a conv into the conv's weights for
    inference; such a model's state_dict no longer matches the stock one. ``pool_relu=True``
    lets a max-pool apply the ReLU between it and the conv or batch norm before it (see the
    module docstring); ``False`` keeps every ReLU in the layer before it. The report of what
    was replaced and what was left alone is ``fastconv.conversion_report(result)``; it is
    logged at INFO and printed when ``verbose``.
    """
    _require_module("convert", model)
    if backend is not None:
        dispatch.resolve_name(backend)
    if fold_bn and model.training:
        raise ValueError("convert(fold_bn=True) folds running statistics into conv weights, "
                         "which is only valid in eval mode: call model.eval() first")
    dispatch.prepare()
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    try:
        plan = _plan_from_graph(model, fold_bn, pool_relu)
        report.method = "torch.fx trace"
    except Exception as exc:  # untraceable control flow: fall back to Sequential chains
        plan = _plan_from_sequentials(model, fold_bn, pool_relu)
        report.method = "nn.Sequential chains (fx trace failed: " + \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
                            nn.AdaptiveAvgPool2d)) and name not in plan.convert:
            if type(mod) in _STOCK:
                why = "not called in forward()"
            elif mod.__class__.__module__.startswith("fastconv"):
                why = "already a fastconv layer"
            else:
                why = f"{type(mod).__name__} subclasses torch.nn with its own forward"
            report.left.append((name, why))
    for bn_name, conv_name in plan.fold.items():
        _fold(modules[conv_name], modules[bn_name])
        _set(model, bn_name, fnn.FoldedBatchNorm(into=conv_name))
        report.replaced.append((bn_name, f"BatchNorm2d folded into {conv_name}"))
    for name, fuse in plan.convert.items():
        if name in plan.fold:
            continue
        mod = modules[name]
        if type(mod) is nn.Conv2d:
            new = fnn.Conv2dReLU.from_conv(mod, relu=fuse, backend=backend)
            what = "Conv2d+ReLU -> Conv2dReLU" if fuse else "Conv2d -> Conv2dReLU(relu=False)"
        elif type(mod) is nn.BatchNorm2d:
            new = fnn.BatchNorm2d.from_bn(mod, relu=fuse, backend=backend)
            what = "BatchNorm2d+ReLU -> BatchNorm2d(relu=True)" if fuse else \
                "BatchNorm2d -> BatchNorm2d"
        elif type(mod) is nn.MaxPool2d:
            relu = name in plan.pool_relu
            new = fnn.MaxPool2d.from_pool(mod, relu=relu, backend=backend)
            what = "ReLU+MaxPool2d -> MaxPool2d(relu=True)" if relu else "MaxPool2d"
        elif type(mod) is nn.AvgPool2d:
            new, what = fnn.AvgPool2d.from_pool(mod, backend=backend), "AvgPool2d"
        else:
            new = fnn.AdaptiveAvgPool2d.from_pool(mod, backend=backend)
            what = "AdaptiveAvgPool2d"
        _set(model, name, new)
        note = plan.notes.get(name)
        report.replaced.append((name, what + (f" ({note})" if note else "")))
    for relu_name, into in plan.absorb.items():
        _set(model, relu_name, fnn.AbsorbedReLU(inplace=modules[relu_name].inplace, into=into))
        report.replaced.append((relu_name, f"ReLU -> AbsorbedReLU (applied by {into})"))
    object.__setattr__(model, "_fastconv_report", report)
    log.info("%s", report)
    if verbose:
        print(report)
    return model


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`convert`: stock torch.nn layers again, sharing the same parameters."""
    _require_module("revert", model)
    if not inplace:
        model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, fnn.FoldedBatchNorm):
            raise ValueError(f"{name} was folded into {mod.into} by convert(fold_bn=True); a "
                             "folded model cannot be reverted (convert the stock model again)")
        if isinstance(mod, fnn.Conv2dReLU):
            new = mod.to_conv()
        elif isinstance(mod, fnn.BatchNorm2d):
            new = mod.to_bn()
        elif isinstance(mod, (fnn.MaxPool2d, fnn.AvgPool2d, fnn.AdaptiveAvgPool2d)):
            new = mod.to_pool()
        elif isinstance(mod, fnn.AbsorbedReLU):
            new = nn.ReLU(inplace=mod.inplace)
        else:
            continue
        _set(model, name, new)
    if "_fastconv_report" in model.__dict__:
        del model.__dict__["_fastconv_report"]
    return model

