"""``fastconv tune``: decide ``auto``'s implementation for every layer of a model ahead of time.

Runs one training step (forward + backward) and one inference step of the converted model, so
each layer's signature is measured for both passes (or found decided in the per-user cache),
and prints what was chosen with the measured times. Later runs and other processes with the
same device, shapes and versions start decided.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .. import convert, models, nn as fnn, selection
from .args import add_model_arguments
from .common import amp_dtype, pick_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, default=None, model_arg=False, dtype="the model")
    p.add_argument("--mode", default="both", choices=("train", "infer", "both"),
                   help="which passes to decide")


def run(args) -> int:
    if not selection.enabled() or torch.are_deterministic_algorithms_enabled():
        print("fastconv tune: measuring is off (FASTCONV_AUTOTUNE=0); nothing to decide")
        return 2
    device = pick_device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    amp = amp_dtype(args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = convert(models.build(args.model).to(device).to(memory_format=fmt), backend="auto")
    x = torch.randn(batch, *models.INPUT_SIZES[args.model], device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    kinds = (fnn.Conv2dReLU, fnn.MaxPool2d, fnn.AvgPool2d, fnn.AdaptiveAvgPool2d, fnn.BatchNorm2d)
    hooks = [m.register_forward_pre_hook(_labeller(name)) for name, m in model.named_modules()
             if isinstance(m, kinds)]
    selection.reset()  # every signature passes through the selection once (cached ones too)
    selection.recorder = records = []
    try:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if args.mode in ("train", "both"):
                model.train()
                nn.functional.cross_entropy(model(x).float(), y).backward()
            if args.mode in ("infer", "both"):
                model.eval()
                with torch.no_grad():
                    model(x)
    finally:
        selection.recorder = selection.label = None
        for h in hooks:
            h.remove()

    dev = selection.device_name(device)
    print(f"fastconv tune: {args.model}, batch {batch}, {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}, {dev}")
    print(f"{'layer':24s} {'op':20s} {'pass':5s} {'input':18s} choice (how: measured times)")
    for name, op, pass_, call_args, entry in records:
        shape = "x".join(map(str, call_args["input"].shape))
        print(f"{name or '?':24s} {op:20s} {pass_:5s} {shape:18s} {selection.describe(entry)}")
    return 0


def _labeller(name: str):
    def hook(module, inputs):
        selection.label = name
    return hook
