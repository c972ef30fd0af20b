"""The ``fastconv`` command (also ``python -m fastconv``).

    fastconv info          versions, devices, each backend's availability and why
    fastconv models        the target networks: parameters and FLOPs per image
    fastconv build-ext     build (or reuse) the C++/CUDA extension now
    fastconv bench         the main job: convert a model, check it, time it against stock
    fastconv train         d2l's training loop for any model, stock or converted (DDP via torchrun)
    fastconv profile       where a training step's time goes, per backend (torch.profiler)
    fastconv tune          decide auto's implementation of every layer of a model ahead of time
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .tools.args import HelpFormatter, Parser, UsageError, check_model_options

# sub-command -> module under fastconv.tools with add_arguments(parser) and run(args)
TOOLS = {
    "bench": "time a model's training and inference step per backend against stock torch",
    "train": "train a model d2l-style (synthetic, digits or Fashion-MNIST), stock or converted",
    "profile": "profile training steps per backend: time shares by layer kind, top kernels",
    "tune": "decide auto's implementation of every layer of a model now, printing the times",
}


def cmd_info(args) -> int:
    import torch

    from . import __version__, dispatch

    print(f"fastconv {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton   {triton.__version__}")
    except Exception as exc:
        print(f"triton   not importable: {exc}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {p.name} (sm_{p.major}{p.minor}, "
                  f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)")
    else:
        print("device   cpu only (no CUDA device)")
    print(f"threads  {torch.get_num_threads()}")
    print("backends:")
    for name, reason in dispatch.availability().items():
        detail = "available" if reason is None else f"unavailable: {reason}"
        if name == "extension" and reason is None:
            detail = _extension_detail()
        print(f"  {name:10s} {detail}")
    from . import selection

    try:  # a diagnostic command: a bad variable is one finding among the others
        default = repr(dispatch.resolve_name(None))
    except ValueError as exc:
        default = f"invalid: {exc}"
    how = "measured, fastest wins" if selection.enabled() else "fixed order (FASTCONV_AUTOTUNE=0)"
    order = "; ".join(f"{d}: {', '.join(o)}" for d, o in dispatch.AUTO_ORDER.items())
    print(f"default  backend={default} (FASTCONV_BACKEND); auto ({how}) candidates: {order}",
          flush=True)
    return 0


def _extension_detail() -> str:
    try:
        from .backends import extension
        ok, text = extension.status()
        return ("available: " if ok else "unavailable: ") + text
    except Exception as exc:
        return f"available (status unknown: {exc})"


def cmd_models(args) -> int:
    import torch

    from . import models
    from .tools.flops import count

    print(f"{'model':10s} {'input':>10s} {'params':>12s} {'GFLOP/image':>12s}  (forward, "
          "multiply-add = 2 FLOPs)")
    for name, build in models.MODELS.items():
        model = build()
        shape = models.INPUT_SIZES[name]
        params = sum(p.numel() for p in model.parameters())
        flops = count(model.eval(), torch.randn(1, *shape))
        print(f"{name:10s} {'x'.join(map(str, shape)):>10s} {params:12,d} "
              f"{flops / 1e9:12.3f}")
    return 0


def cmd_build_ext(args) -> int:
    from .backends import extension

    if args.prebuilt:
        manifest = extension.build_prebuilt(Path(args.prebuilt), verbose=True)
        cuda = manifest["cuda_archs"] or f"none ({manifest['cuda_note']})"
        print(f"extension: prebuilt library in {args.prebuilt} for torch {manifest['torch']}, "
              f"CUDA archs {cuda}; load it with FASTCONV_EXTENSION_LIB={args.prebuilt}")
        return 0
    path = extension.build(verbose=True)
    ok, text = extension.status()
    print(f"extension: {text}\n  {path}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastconv", description=__doc__.split("\n\n")[0],
                    formatter_class=HelpFormatter)
    debug_help = "print the traceback of a failure (also FASTCONV_LOG=debug)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)

    def add(name, help_text, fn):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(fn=fn)
        # also after the command; SUPPRESS keeps `fastconv --debug cmd` from being reset
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=debug_help + " (default: False)")
        return p

    add("info", "versions, devices and backend availability", cmd_info)
    add("models", "the target networks with parameter counts and FLOPs", cmd_models)
    p = add("build-ext", "build (or reuse) the C++/CUDA extension", cmd_build_ext)
    p.add_argument("--prebuilt", metavar="DIR", default=None,
                   help="build a portable library (no -march=native, no Python linked) into DIR "
                        "with DIR/manifest.json, for FASTCONV_EXTENSION_LIB=DIR elsewhere "
                        "(default: the per-user cache only)")
    for name, help_text in TOOLS.items():
        tool = importlib.import_module(f"fastconv.tools.{name}")
        tool.add_arguments(add(name, help_text, tool.run))
    return parser


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; usage errors print one ``error:`` line and return 2, failures one line
    and return 1 (with the traceback under ``--debug`` or ``FASTCONV_LOG=debug``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its line (or the help)
        return _exit_code(exc)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("FASTCONV_LOG", "").lower() == "debug"
    prog = f"fastconv {args.command}"

    def fail(message: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return code

    try:
        check_model_options(args)
        return int(args.fn(args) or 0)
    except UsageError as exc:
        return fail(str(exc), 2)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # raise SystemExit("--option ...: why"): a usage error
            return fail(exc.code, 2)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as exc:
        hint = "" if debug else " (--debug shows the traceback)"
        return fail(f"{short_reason(exc, 400)}{hint}", 1)


def short_reason(exc: BaseException, limit: int) -> str:
    from .tools.common import short_reason as short
    return short(exc, limit)
