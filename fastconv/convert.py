"""``convert(model)``: serve a stock torch.nn model's layers with fastconv, keeping every
state_dict key; ``revert(model)`` undoes it.

How ReLUs are found: the model is traced with ``torch.fx`` (which sees through custom modules
such as Inception and residual blocks). Every ReLU call in the graph -- an ``nn.ReLU`` module,
shared or not, ``F.relu``/``torch.relu``/``torch.relu_``, ``x.relu()``/``x.relu_()``, in place or
not -- is matched against the patterns of :class:`_Graph`: a conv or batch norm, called once,
whose output feeds only that ReLU applies it (a batch norm folded by ``fold_bn=True`` hands it to
its conv). The ReLU call then leaves the graph. When the calls that left are all the calls of
some ``nn.ReLU`` modules, those become :class:`~fastconv.nn.AbsorbedReLU` (an Identity) and
forward() is untouched; otherwise (``F.relu`` in forward code, a shared ReLU module also used
elsewhere) the model's forward() becomes the rewritten graph, bound to the model itself: its
class, submodules and state_dict keys stay, and ``revert`` restores the class's forward().
The rewritten forward() (:class:`RewrittenForward`) pickles as its code, so ``torch.save`` of the
whole model, ``torch.load`` and ``copy.deepcopy`` keep it. Limits of that rewrite: it is the forward() of the root, so hooks on container modules no
longer fire and a container called on its own runs its original code; and it is only done
when forward() traces alike in train and eval mode.
ResNet's block ending ``relu(bn(y) + identity)`` becomes one batch norm call
``bn(y, residual=identity)`` with the ReLU fused (:func:`_fuse_residual_adds`).
Every ReLU left, and why (a residual add, a Linear, a shared producer), is in the report.

A ReLU between a conv (or batch norm) and a max-pool (``return_indices=False``) that is
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
import importlib
import logging
import operator
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from . import nn as fnn

log = logging.getLogger("fastconv")

_RELU_FUNCTIONS = {torch.relu, F.relu, torch.relu_}
_ADDS = {operator.add, operator.iadd, torch.add}
_STOCK = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
RESIDUAL_LEFT = ("residual add not fused (that needs a batch norm operand with no other use, "
                 "in a forward() fastconv rewrites)")


@dataclasses.dataclass
class ConversionReport:
    replaced: list = dataclasses.field(default_factory=list)     # (name, what)
    left: list = dataclasses.field(default_factory=list)         # (name, why)
    relus_fused: list = dataclasses.field(default_factory=list)  # (ReLU call, applied by)
    relus_left: list = dataclasses.field(default_factory=list)   # (ReLU call, why it stays)
    method: str = ""

    def __str__(self) -> str:
        lines = [f"fastconv.convert ({self.method}): replaced {len(self.replaced)}, "
                 f"left {len(self.left)}; ReLUs fused {len(self.relus_fused)}, "
                 f"left {len(self.relus_left)}"]
        lines += [f"  replaced {n}: {w}" for n, w in self.replaced]
        lines += [f"  left     {n}: {w}" for n, w in self.left]
        lines += [f"  ReLU fused {n}: applied by {w}" for n, w in self.relus_fused]
        lines += [f"  ReLU left  {n}: {w}" for n, w in self.relus_left]
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


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


@dataclasses.dataclass
class _Plan:
    convert: dict = dataclasses.field(default_factory=dict)   # module name -> fuse relu?
    absorb: dict = dataclasses.field(default_factory=dict)    # relu module name -> into
    pool_relu: set = dataclasses.field(default_factory=set)    # max-pools that apply a ReLU
    fold: dict = dataclasses.field(default_factory=dict)      # bn name -> conv name
    notes: dict = dataclasses.field(default_factory=dict)     # name -> note for the report
    relus_fused: list = dataclasses.field(default_factory=list)
    relus_left: list = dataclasses.field(default_factory=list)
    graph: Optional[torch.fx.Graph] = None  # set when forward() must be rewritten


def _relu_into_pool(plan: _Plan, producer: str, relu: str, pool: str) -> None:
    """Plan the ReLU module ``relu`` after ``producer`` to be applied by the max-pool ``pool``."""
    plan.absorb[relu] = pool
    plan.pool_relu.add(pool)
    plan.notes[producer] = f"its ReLU is applied by the max-pool {pool} that follows"


class _Graph:
    """One traced forward(): who calls what, and the ReLU rules of the module docstring."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, fold_bn: bool,
                 pool_relu: bool, rewritable: bool):
        self.graph, self.pool_relu, self.rewritable = graph, pool_relu, rewritable
        self.modules = dict(model.named_modules())
        self.calls: dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls.setdefault(node.target, []).append(node)
        self.plan = _Plan()
        self.dropped: dict = {}  # ReLU node -> the module that applies it instead
        for name, nodes in self.calls.items():
            if type(self.modules[name]) in _STOCK:
                self.plan.convert[name] = False
                if len(nodes) != 1:
                    self.plan.notes[name] = f"called at {len(nodes)} places: converted " \
                                            "without fusion"
        if fold_bn:
            for name, nodes in self.calls.items():
                if type(self.modules[name]) is nn.Conv2d and len(nodes) == 1:
                    bn = self._single_module_user(nodes[0], nn.BatchNorm2d)
                    if bn is not None:
                        self.plan.fold[bn] = name

    def module(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _single_module_user(self, node, kind) -> Optional[str]:
        """The name of the stock ``kind`` module, called once, that is node's only user."""
        users = list(node.users)
        if len(users) == 1 and type(self.module(users[0])) is kind and \
                len(self.calls[users[0].target]) == 1:
            return users[0].target
        return None

    def where(self, node) -> str:
        if node.op == "call_module":
            n = len(self.calls[node.target])
            if n == 1:
                return node.target
            return f"{node.target} (call {self.calls[node.target].index(node) + 1} of {n})"
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else "the model"
        call = f".{node.target}()" if node.op == "call_method" else \
            f"{node.target.__module__.replace('torch.nn.functional', 'F')}." \
            f"{node.target.__name__}"
        return f"{call} in {owner}.forward ({node.name})"

    def producer(self, relu) -> tuple[Optional[str], str]:
        """(the conv or batch norm that can apply ``relu``, '') or (None, why it cannot)."""
        src = relu.args[0] if relu.args else relu.kwargs.get("input")
        if not isinstance(src, torch.fx.Node):
            return None, "its input is not a traced tensor"
        mod = self.module(src)
        if type(mod) not in (nn.Conv2d, nn.BatchNorm2d):
            if _is_add(src):
                # relu(bn(x) + residual): one pattern for batch norm's residual input, when
                # it has one (issue 17); until then the add and its ReLU stay
                return None, RESIDUAL_LEFT
            if isinstance(mod, nn.Linear):
                return None, "after a Linear layer (fastconv has no Linear+ReLU)"
            what = type(mod).__name__ if mod is not None else str(
                getattr(src.target, "__name__", src.target))
            return None, f"after {what}, not a conv or batch norm"
        if len(self.calls[src.target]) != 1:
            return None, f"{src.target} is called at {len(self.calls[src.target])} places"
        if len(src.users) != 1:
            return None, f"the output of {src.target} has other users"
        return self.plan.fold.get(src.target, src.target), ""

    def droppable(self, relu) -> bool:
        """A ReLU call can go when forward() is rewritten, or when it is the one call of a
        ReLU module (which becomes an AbsorbedReLU)."""
        return self.rewritable or (_is_relu(relu, self.modules) == "module" and
                                   len(self.calls[relu.target]) == 1)

    def plan_relus(self) -> _Plan:
        plan = self.plan
        residual = _fuse_residual_adds(self) if self.rewritable else []
        for node in list(self.graph.nodes):
            if not _is_relu(node, self.modules):
                continue
            producer, why = self.producer(node)
            if producer is not None and not self.droppable(node):
                producer, why = None, ("forward() differs between train and eval mode, so "
                                       "fastconv does not rewrite it; this ReLU is not a "
                                       "module of its own")
            if producer is None:
                plan.relus_left.append((self.where(node), why))
                continue
            pool = self._single_module_user(node, nn.MaxPool2d) if self.pool_relu else None
            if pool is not None and not self.modules[pool].return_indices:
                into = pool
                plan.pool_relu.add(pool)
                plan.notes[producer] = f"its ReLU is applied by the max-pool {pool} that follows"
            else:
                into = producer
                plan.convert[producer] = True
            self.dropped[node] = into
            plan.relus_fused.append((self.where(node), into))
        for name, nodes in self.calls.items():  # ReLU modules whose every call went
            if type(self.modules[name]) is nn.ReLU and all(n in self.dropped for n in nodes):
                plan.absorb[name] = ", ".join(dict.fromkeys(self.dropped[n] for n in nodes))
        if residual or any(node.op != "call_module" or node.target not in plan.absorb
                           for node in self.dropped):
            for node in self.dropped:
                node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
                self.graph.erase_node(node)
            plan.graph = self.graph
        return plan


def _fuse_residual_adds(g: _Graph) -> list[str]:
    """Rewrite ``relu(bn(y) + identity)`` (``+``, ``+=``, ``torch.add``, ``.add(_)``; any ReLU
    form) to ``bn(y, residual=identity)`` followed by that ReLU, which the ReLU rules then fuse
    into the batch norm like any other: one pass instead of three. Only where the batch norm
    is a stock BatchNorm2d called once (not folded), its output feeds only the add and the
    add's feeds only the ReLU. The batch norm call moves down to the add's place (the identity
    may be computed after it: torchvision's downsample). Returns the batch norms so rewritten;
    the graph must then become forward()."""
    fused = []
    for add in list(g.graph.nodes):
        if not (_is_add(add) and len(add.users) == 1 and not add.kwargs and len(add.args) == 2
                and _is_relu(next(iter(add.users)), g.modules)):
            continue
        for bn, identity in (add.args, add.args[::-1]):
            if (isinstance(bn, torch.fx.Node) and isinstance(identity, torch.fx.Node)
                    and bn is not identity and type(g.module(bn)) is nn.BatchNorm2d
                    and len(g.calls[bn.target]) == 1 and len(bn.users) == 1
                    and len(bn.args) == 1 and not bn.kwargs and bn.target not in g.plan.fold):
                break
        else:
            continue
        add.prepend(bn)
        bn.kwargs = {"residual": identity}
        add.replace_all_uses_with(bn)
        g.graph.erase_node(add)
        g.plan.notes[bn.target] = f"the residual add {add.name} is fused into it"
        fused.append(bn.target)
    return fused


def _trace(model: nn.Module) -> tuple[torch.fx.Graph, bool]:
    """The traced graph of forward() in the model's mode, and whether forward() traces the
    same in the other mode (control flow on ``self.training`` is fixed at trace time)."""
    graph = torch.fx.symbolic_trace(model).graph
    modes = {m: m.training for m in model.modules()}
    try:
        other = torch.fx.symbolic_trace(model.train(not model.training)).graph
    except Exception:
        other = None
    finally:
        for m, mode in modes.items():
            m.training = mode
    same = other is not None and graph.python_code("self").src == other.python_code("self").src
    return graph, same


def _plan_from_graph(model: nn.Module, fold_bn: bool, pool_relu: bool = True) -> _Plan:
    graph, rewritable = _trace(model)
    return _Graph(model, graph, fold_bn, pool_relu, rewritable).plan_relus()


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
    for name, mod in model.named_modules():
        if type(mod) is nn.ReLU:
            if name in plan.absorb:
                plan.relus_fused.append((name, plan.absorb[name]))
            else:
                plan.relus_left.append((name, "not right after a conv or batch norm in an "
                                              "nn.Sequential (the only pattern seen without "
                                              "a trace)"))
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
        report.method = "torch.fx graph"
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
    if plan.graph is not None:
        _rewrite_forward(model, plan.graph)
        report.method += ", forward() rewritten"
    report.relus_fused, report.relus_left = plan.relus_fused, plan.relus_left
    object.__setattr__(model, "_fastconv_report", report)
    log.info("%s", report)
    if verbose:
        print(report)
    return model


def _rewrite_forward(model: nn.Module, graph: torch.fx.Graph) -> None:
    """Run ``graph`` (the traced forward() less the fused ReLU calls) as ``model``'s forward.

    The generated code reaches every layer by its qualified name (``self.layer1[0].conv1``), so
    it runs on ``model`` itself: the class, every submodule and every state_dict key stay.
    """
    code = graph.python_code(root_module="self")
    names = {name: ("module", obj.__name__) if isinstance(obj, types.ModuleType)
             else ("object", obj) for name, obj in code.globals.items()}
    model.forward = RewrittenForward(model, code.src, names, graph)


class RewrittenForward:
    """A converted model's forward() where convert rewrote it: the traced graph's code, run on
    the model. It pickles as that code and the names the code uses, so ``torch.save`` of the
    whole model and ``copy.deepcopy`` give a model that runs the rewritten forward (a bound
    method would come back as the class's forward(), whose ReLUs convert took out)."""

    def __init__(self, model: nn.Module, src: str, names: dict, graph=None):
        self.__self__ = model
        self._src, self._names = src, names
        self._fastconv_graph = graph  # None in a loaded copy
        scope = {name: importlib.import_module(ref) if kind == "module" else ref
                 for name, (kind, ref) in names.items()}
        exec(compile(src, "<fastconv: rewritten forward>", "exec"), scope)
        self.__func__ = scope["forward"]

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (RewrittenForward, (self.__self__, self._src, self._names))


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
    if isinstance(model.__dict__.get("forward"), RewrittenForward):
        del model.__dict__["forward"]  # the class's own forward() again
    if "_fastconv_report" in model.__dict__:
        del model.__dict__["_fastconv_report"]
    return model

