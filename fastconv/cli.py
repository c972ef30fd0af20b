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
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

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

    how = "measured, fastest wins" if selection.enabled() else "fixed order (FASTCONV_AUTOTUNE=0)"
    order = "; ".join(f"{d}: {', '.join(o)}" for d, o in dispatch.AUTO_ORDER.items())
    print(f"default  backend={dispatch.resolve_name(None)!r} (FASTCONV_BACKEND); auto ({how}) "
          f"candidates: {order}")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("info", help="versions, devices and backend availability").set_defaults(
        fn=cmd_info)
    sub.add_parser("models", help="the target networks with parameter counts and FLOPs"
                   ).set_defaults(fn=cmd_models)
    p = sub.add_parser("build-ext", help="build (or reuse) the C++/CUDA extension")
    p.add_argument("--prebuilt", metavar="DIR", default=None,
                   help="build a portable library (no -march=native, no Python linked) into DIR "
                        "with DIR/manifest.json, for FASTCONV_EXTENSION_LIB=DIR elsewhere")
    p.set_defaults(fn=cmd_build_ext)
    for name, help_text in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        tool = importlib.import_module(f"fastconv.tools.{name}")
        tool.add_arguments(p)
        p.set_defaults(fn=tool.run)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    return int(args.fn(args) or 0)
