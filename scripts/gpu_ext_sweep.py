#!/usr/bin/env python
"""GPU timing of the extension's CUDA kernels against torch eager (a benchmark, not a test).

Conv+ReLU forward and forward+backward on the AlexNet and VGG-11 conv layers (docs/MODELS.md)
at batch 128, fp16/bf16, channels_last, against F.conv2d(x, w, b) then relu (cuDNN, with
cudnn.benchmark). Every conv tile the extension has is timed (FASTCONV_CONV_TILE=wgmma|big|mid|old
forces one: wgmma = the sm_90a Hopper kernel where the build has it, big/mid = the mma.sync
large tiles, old = the previous 128x128x32 kernel; "auto" is what it picks), and each output is checked against cuDNN's (relative L2
error, a broken kernel shows up here before the tests run). Max-pool, BN+ReLU (training and eval
forward, backward) against torch, as GB/s of the bytes the kernels move and as a fraction of the
measured device copy bandwidth. Medians of triton.testing.do_bench. A compact summary table comes
last.

    python scripts/gpu_ext_sweep.py --quick          # < 60 s: bf16, 7 conv layers, auto/big/old
    python scripts/gpu_ext_sweep.py                  # everything (~3 min)
    python scripts/gpu_ext_sweep.py --only conv --dtype bf16 --batch 64
Targets (issue 7): conv forward >= 0.8x cuDNN; pool and BN+ReLU >= 70% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALEXNET = [("alexnet.conv1", 1, 96, 224, 11, 4, 1), ("alexnet.conv2", 96, 256, 26, 5, 1, 2),
           ("alexnet.conv3", 256, 384, 12, 3, 1, 1), ("alexnet.conv4", 384, 384, 12, 3, 1, 1),
           ("alexnet.conv5", 384, 256, 12, 3, 1, 1)]
VGG11 = [("vgg11.conv1", 1, 64, 224, 3, 1, 1), ("vgg11.conv2", 64, 128, 112, 3, 1, 1),
         ("vgg11.conv3", 128, 256, 56, 3, 1, 1), ("vgg11.conv4", 256, 256, 56, 3, 1, 1),
         ("vgg11.conv5", 256, 512, 28, 3, 1, 1), ("vgg11.conv6", 512, 512, 28, 3, 1, 1),
         ("vgg11.conv7", 512, 512, 14, 3, 1, 1), ("vgg11.conv8", 512, 512, 14, 3, 1, 1)]
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}
REP = {"warmup": 25, "rep": 100}


def bench(fn) -> float:
    """Median milliseconds."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=REP["warmup"], rep=REP["rep"], return_mode="median"))
    except Exception:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def set_tile(tile: str) -> None:
    os.environ["FASTCONV_CONV_TILE"] = "" if tile == "auto" else tile


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write)."""
    x = torch.empty(2**29, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --quick: the layers that decide the forward target (5x5 and 3x3 at every width)
QUICK = ("alexnet.conv2", "alexnet.conv3", "alexnet.conv5", "vgg11.conv3", "vgg11.conv4",
         "vgg11.conv6", "vgg11.conv8")


def conv_rows(ops, batch, dtypes, fwd_tiles, fb_tiles, summary, quick=False):
    print(f"\n## conv2d + bias + ReLU, batch {batch}, channels_last (median ms; ratio = torch / ext)")
    head = ["layer", "dtype", "torch fwd"] + [f"{t} fwd" for t in fwd_tiles] + \
           ["best", "ratio", "TFLOP/s", "err vs cuDNN", "torch f+b"] + [f"{t} f+b" for t in fb_tiles] + \
           ["f+b ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, C, K, HW, k, s, p in ALEXNET + VGG11:
        if quick and name not in QUICK:
            continue
        for dn in dtypes:
            dt = DT[dn]
            cl = torch.channels_last
            x = torch.randn(batch, C, HW, HW, device="cuda", dtype=dt).contiguous(memory_format=cl)
            w = (torch.randn(K, C, k, k, device="cuda", dtype=dt) / (C * k * k) ** 0.5).contiguous(
                memory_format=cl)
            b = torch.randn(K, device="cuda", dtype=dt)
            st, pd, dl = [s, s], [p, p], [1, 1]
            ref = lambda: F.relu(F.conv2d(x, w, b, s, p))  # noqa: E731
            y_ref = ref()
            P = y_ref.shape[2]
            flops = 2.0 * batch * P * P * K * C * k * k
            t_ref = bench(ref)
            fwd, errs = {}, {}
            for tile in fwd_tiles:
                set_tile(tile)
                ext = lambda: ops.conv2d_relu(x, w, b, st, pd, dl, 1, True)  # noqa: E731
                errs[tile] = rel_err(ext(), y_ref)
                fwd[tile] = bench(ext)
            set_tile("auto")
            best = min(fwd, key=fwd.get)
            dy = torch.randn_like(y_ref)
            mask = [C > 1, True, True]  # no grad_input for a first layer, as in training
            xr = x.detach().requires_grad_(C > 1)
            wr = w.detach().requires_grad_()
            br = b.detach().requires_grad_()

            def ref_fb():
                yy = F.relu(F.conv2d(xr, wr, br, s, p))
                yy.backward(dy)

            t_rfb = bench(ref_fb)
            fb = {}
            for tile in fb_tiles:
                set_tile(tile)

                def ext_fb():
                    yy = ops.conv2d_relu(x, w, b, st, pd, dl, 1, True)
                    ops.conv2d_relu_backward(dy, x, w, yy, st, pd, dl, 1, True, mask)

                fb[tile] = bench(ext_fb)
            set_tile("auto")
            ratio = t_ref / fwd["auto"] if "auto" in fwd else t_ref / fwd[best]
            fb_ratio = t_rfb / fb[fb_tiles[0]]
            err = max(errs.values())
            row = [name, dn, f"{t_ref:.3f}"] + [f"{fwd[t]:.3f}" for t in fwd_tiles] + \
                  [best, f"{ratio:.2f}", f"{flops / fwd[fwd_tiles[0]] / 1e9:.0f}", f"{err:.1e}",
                   f"{t_rfb:.3f}"] + [f"{fb[t]:.3f}" for t in fb_tiles] + [f"{fb_ratio:.2f}"]
            print("| " + " | ".join(row) + " |", flush=True)
            summary.append(dict(layer=name, dtype=dn, k=k, C=C, ratio=ratio, best=best,
                                tflops=flops / fwd[fwd_tiles[0]] / 1e9,
                                cudnn_tflops=flops / t_ref / 1e9, fb_ratio=fb_ratio, err=err,
                                fwd=fwd, fb=fb))
            del x, w, y_ref, dy, xr, wr, br
            torch.cuda.empty_cache()


def memory_rows(ops, batch, dtypes, bw):
    print(f"\n## pool and batch norm, batch {batch}, channels_last; copy bandwidth {bw:.0f} GB/s")
    print("| op | shape | dtype | ext ms | ext GB/s | % of copy | torch ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    shapes = [(64, 224), (128, 112), (256, 56), (96, 54), (512, 28)]
    for dn in dtypes:
        dt = DT[dn]
        for C, HW in shapes:
            x = torch.randn(batch, C, HW, HW, device="cuda", dtype=dt).contiguous(
                memory_format=torch.channels_last)
            es = x.element_size()
            cases = []
            k, s = (3, 2) if HW in (54, 26) else (2, 2)
            o, idx = ops.max_pool2d(x, [k, k], [s, s], [0, 0], [1, 1], False, False, True)
            cases.append((f"max_pool{k}x{k}s{s}+relu",
                          lambda: ops.max_pool2d(x, [k, k], [s, s], [0, 0], [1, 1], False, False, True),
                          lambda: F.max_pool2d(F.relu(x), k, s),
                          x.numel() * es + o.numel() * (es + 1)))
            dy = torch.randn_like(o)
            cases.append((f"max_pool{k}x{k} bwd",
                          lambda: ops.max_pool2d_backward(dy, o, idx, list(x.shape), [k, k], [s, s],
                                                          [0, 0], [1, 1], False, False, True),
                          None, o.numel() * (2 * es + 1) + x.numel() * es))
            wgt = torch.rand(C, device="cuda") + 0.5
            bias = torch.randn(C, device="cuda")
            rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
            cases.append(("bn+relu train fwd",
                          lambda: ops.batch_norm(x, wgt, bias, rm, rv, True, 0.1, 1e-5, True),
                          lambda: F.relu(F.batch_norm(x, rm, rv, wgt, bias, True, 0.1, 1e-5)),
                          3 * x.numel() * es))  # statistics read + normalise read + write
            cases.append(("bn+relu eval fwd",
                          lambda: ops.batch_norm(x, wgt, bias, rm, rv, False, 0.1, 1e-5, True),
                          lambda: F.relu(F.batch_norm(x, rm, rv, wgt, bias, False, 0.1, 1e-5)),
                          2 * x.numel() * es))
            y, m, sd = ops.batch_norm(x, wgt, bias, rm, rv, True, 0.1, 1e-5, True)
            gy = torch.randn_like(y)
            cases.append(("bn+relu bwd",
                          lambda: ops.batch_norm_backward(gy, x, y, wgt, m, sd, True, True,
                                                          [True, True, True]),
                          None, 7 * x.numel() * es))  # (x, dy, y) twice + dx
            for name, fe, fr, nbytes in cases:
                te = bench(fe)
                tr = bench(fr) if fr is not None else float("nan")
                gbs = nbytes / te / 1e6
                print(f"| {name} | {batch}x{C}x{HW}x{HW} | {dn} | {te:.3f} | {gbs:.0f} | "
                      f"{100 * gbs / bw:.0f}% | {tr:.3f} | {tr / te:.2f} |", flush=True)
            del x, o, idx, dy, y, gy
            torch.cuda.empty_cache()


def print_summary(summary, seconds):
    if not summary:
        return
    print(f"\n## summary (conv forward: ratio = cuDNN time / ext time; target >= 0.80; "
          f"{seconds:.0f} s)")
    print("| layer | dtype | fwd ratio | best tile | ext TFLOP/s | cuDNN TFLOP/s | f+b ratio | err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary:
        flag = "" if r["ratio"] >= 0.8 or r["C"] == 1 else " (<0.8)"
        bad = " BAD" if r["err"] > (2e-2 if r["dtype"] == "bf16" else 3e-3) else ""
        print(f"| {r['layer']} | {r['dtype']} | {r['ratio']:.2f}{flag} | {r['best']} | "
              f"{r['tflops']:.0f} | {r['cudnn_tflops']:.0f} | {r['fb_ratio']:.2f} | "
              f"{r['err']:.1e}{bad} |")
    main = [r for r in summary if r["C"] > 1]  # the tensor-core layers (3x3, 5x5)
    if main:
        gm = math.exp(sum(math.log(r["ratio"]) for r in main) / len(main))
        gfb = math.exp(sum(math.log(r["fb_ratio"]) for r in main) / len(main))
        ok = sum(r["ratio"] >= 0.8 for r in main)
        print(f"\ntensor-core layers: forward geomean {gm:.2f}x cuDNN, {ok}/{len(main)} at >= 0.8x; "
              f"forward+backward geomean {gfb:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "both"], default=None)
    ap.add_argument("--only", choices=["conv", "memory", "all"], default=None)
    ap.add_argument("--quick", action="store_true",
                    help="< 60 s: bf16, 7 of the 3x3/5x5 conv layers, tiles auto/big/old, shorter timing")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    from fastconv.backends import extension

    extension.build()
    if not extension.has_cuda_kernels():
        print("the extension was built without CUDA kernels", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    ops = torch.ops.fastconv
    start = time.time()
    if args.quick:
        REP.update(warmup=5, rep=25)
        dtypes = [args.dtype] if args.dtype in ("fp16", "bf16") else ["bf16"]
        only = args.only or "conv"
        fwd_tiles, fb_tiles = ["auto", "big", "old"], ["auto", "old"]
    else:
        dtypes = ["fp16", "bf16"] if args.dtype in (None, "both") else [args.dtype]
        only = args.only or "all"
        fwd_tiles, fb_tiles = ["auto", "wgmma", "big", "mid", "old"], ["auto", "old"]
    cap = torch.cuda.get_device_capability()
    print(f"# fastconv extension sweep on {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}, "
          f"torch {torch.__version__}, {'quick' if args.quick else 'full'})")
    summary: list[dict] = []
    if only in ("conv", "all"):
        conv_rows(ops, args.batch, dtypes, fwd_tiles, fb_tiles, summary, quick=args.quick)
    if only in ("memory", "all"):
        memory_rows(ops, args.batch, dtypes, copy_bandwidth())
    print_summary(summary, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
