"""What every command's parser shares: range-checked ``type=`` functions, the help formatter
that shows defaults, ``--model-arg`` validation against the builder's signature and the input
size check that names the layer where an image becomes too small.

Usage errors are :class:`UsageError`; ``fastconv.cli`` prints them as one ``error:`` line and
exits 2.
"""
from __future__ import annotations

import argparse
import inspect
import warnings
from typing import Optional, Sequence

import torch
from torch import nn


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the option."""


# --------------------------------------------------------------------------- type= functions
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# the smallest side any network here could take is 1; the per-model limit is checked later
image_size = positive_int

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def boolean(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0/yes/no, got {text!r}")


def device(text: str) -> str:
    """A torch device string of a type the tools run on (availability is checked later)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)"
                                         ) from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the tools run on cpu or cuda")
    return text


def backend_list(text: str) -> str:
    """``--backends a,b``: known names or ``auto`` (whether each can run here is checked later)."""
    from .. import dispatch
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated backend names")
    for n in names:
        if n != "auto" and n not in dispatch.BACKENDS:
            raise argparse.ArgumentTypeError(f"{n!r} is not a fastconv backend; choose from "
                                             f"auto, {', '.join(dispatch.BACKENDS)}")
    return ",".join(names)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE, got {text!r}")
    return key.strip(), value


# --------------------------------------------------------------------------- parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default at the end of its help unless the help
    already says what the default is (those whose default is None: computed at run time)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if action.required:
            return text + (" " if text else "") + "(required)"
        if action.default is argparse.SUPPRESS:
            return text
        if action.default is None:
            return text + (" " if text else "") + "(default: none)"
        if action.default == [] and action.option_strings:
            return text + (" " if text else "") + "(default: none; repeatable)"
        return text + (" " if text else "") + "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- shared options
def add_model_arguments(p: argparse.ArgumentParser, *, default: Optional[str] = "alexnet",
                        model_help: str = "network of fastconv.models", model_arg: bool = True,
                        batch: bool = True, dtype: Optional[str] = "the step",
                        device_help: str = "cpu or cuda (default: cuda if present)") -> None:
    """The options every model command shares: ``--model`` (required when ``default`` is None),
    ``--model-arg``, ``--batch``, ``--device``, ``--dtype`` (its help says what runs under
    autocast; None leaves it out) and ``--channels-last``."""
    from .. import models  # the builders; imported here so that parsing stays light
    from .common import DTYPES

    p.add_argument("--model", default=default, required=default is None,
                   choices=sorted(models.MODELS), help=model_help)
    if model_arg:
        p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       type=key_value, help="builder keyword, e.g. narrow=true (vgg11), "
                       "variant=relu (lenet), image_size=64 (alexnet)")
    if batch:
        p.add_argument("--batch", type=positive_int, default=None,
                       help="batch size (default: 128 on a GPU, 8 on CPU)")
    p.add_argument("--device", default=None, type=device, help=device_help)
    if dtype:
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help=f"float16/bfloat16 run {dtype} under torch.autocast (AMP)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")


# --------------------------------------------------------------------------- models
def model_kwargs(name: str, items: Sequence, *, reserved: Sequence[str] = ()) -> dict:
    """``--model-arg`` items (``(key, text)`` pairs or ``KEY=VALUE`` strings) as typed keywords
    of model ``name``'s builder: unknown keys, values of the wrong type (booleans only
    true/false/1/0/yes/no) and values the builder rejects are :class:`UsageError`."""
    from .. import models
    build = models.MODELS[name]
    params = inspect.signature(build).parameters
    takes = [p for p in params if p not in reserved]
    out = {}
    for item in items:
        key, text = key_value(item) if isinstance(item, str) else item
        if key not in takes:
            raise UsageError(f"--model-arg {key}={text}: {name} does not take {key!r}; it takes "
                             + (", ".join(takes) or "no keywords"))
        default = params[key].default
        kind = type(default) if default is not inspect.Parameter.empty else str
        try:
            if kind is bool:
                value = boolean(text)
            elif kind is int:
                value = _int(text)
            elif kind is float:
                value = _float(text)
            else:
                value = text
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--model-arg {key}={text}: {exc}") from None
        out[key] = value
    try:  # the builder's own checks (lenet's variant), on the meta device: nothing allocated
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(**out)
    except (ValueError, TypeError, RuntimeError) as exc:
        reason = _first_line(exc)
        if not reason.startswith(name):
            reason = f"{name}: {reason}"
        raise UsageError(f"--model-arg {' '.join(f'{k}={v}' for k, v in out.items())}: "
                         f"{reason}") from None
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def propagate(model: nn.Module, shape: Sequence[int]) -> Optional[tuple[str, str, str]]:
    """Run ``model`` on a meta tensor of ``shape`` (no memory, no arithmetic): None when it
    goes through, else ``(qualname, module, reason)`` of the innermost module that failed."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[tuple[str, tuple]] = []
    failed: list = []

    def pre(mod, inputs):
        shapes = tuple(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor))
        stack.append((names.get(mod, "?"), shapes, mod))

    def post(mod, inputs, output):
        stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(torch.empty(*shape, device="meta"))
        return None
    except (RuntimeError, ValueError, IndexError) as exc:
        if not stack:
            raise
        qualname, shapes, mod = stack[-1]
        where = "x".join(map(str, shapes[0][1:])) if shapes else "?"
        failed = (qualname or "(model)", f"{type(mod).__name__} with input {where}",
                  _first_line(exc))
        return failed
    finally:
        for h in handles:
            h.remove()


def check_input_size(name: str, kwargs: dict, in_channels: int, side: int,
                     option: str = "--image-size") -> None:
    """Refuse (UsageError) a ``side``x``side`` input that model ``name`` cannot take, naming
    the layer where it runs out and the smallest side that works."""
    from .. import models
    build = models.MODELS[name]

    def fails(s: int):
        kw = dict(kwargs)
        if "image_size" in inspect.signature(build).parameters:
            kw["image_size"] = s
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zero-sized Linear layers of tiny sides
                model = build(in_channels=in_channels, **kw)
        except (ValueError, RuntimeError) as exc:
            return ("(builder)", name, _first_line(exc))
        return propagate(model.eval(), (1, in_channels, s, s))

    failure = fails(side)
    if failure is None:
        return
    native = models.INPUT_SIZES[name][1]
    qualname, what, reason = failure
    hint = ""
    if side < native and fails(native) is None:
        lo, hi = side, native
        while hi - lo > 1:  # bisect for the smallest side that goes through
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fails(mid) is not None else (lo, mid)
        hint = f"; the smallest side {name} takes is {hi}"
    elif what.startswith("Linear"):
        hint = f"; its Linear layer is sized for {native}x{native} input"
    size = "too small" if side < native else "does not fit"
    raise UsageError(f"{option} {side}: {side}x{side} {size} for {name}: layer {qualname} "
                     f"({what}) fails: {reason}{hint}")


def check_model_options(args: argparse.Namespace) -> None:
    """After parsing, for commands with ``--model``: ``args.model_arg`` becomes the validated
    keyword dict, and the input size (``--image-size`` or ``--model-arg image_size``) is
    checked against the model before anything is built or loaded."""
    if not isinstance(getattr(args, "model", None), str) or not hasattr(args, "model_arg"):
        return
    from .. import models
    # train sets in_channels and num_classes from the data set
    reserved = ("in_channels", "num_classes") if args.command == "train" else ()
    kwargs = model_kwargs(args.model, args.model_arg, reserved=reserved)
    args.model_arg = kwargs
    side, option = getattr(args, "image_size", None), "--image-size"
    if side is None and "image_size" in kwargs:
        side, option = kwargs["image_size"], "--model-arg image_size"
    if side is not None:
        in_channels = kwargs.get("in_channels", models.INPUT_SIZES[args.model][0])
        check_input_size(args.model, {k: v for k, v in kwargs.items() if k != "in_channels"},
                         in_channels, side, option)
