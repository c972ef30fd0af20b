#!/usr/bin/env python
"""GPU sweep of fastconv's Triton conv2d_relu against torch eager, layer by layer.

For every conv layer of AlexNet and VGG-11 (batch 128, 1x224x224 input, as docs MODELS.md) and the
1x1/3x3/5x5 convs of GoogLeNet (224 input), in bfloat16 channels_last, this times with
``triton.testing.do_bench`` medians:

* fwd:     fastconv ``conv2d_relu``                   vs  ``relu(F.conv2d(x, w, b))`` (cuDNN, then
           torch's own bias and ReLU)
* fwd+bwd: the same plus ``autograd.grad`` of input (not for a model's first layer, whose input
           never needs one), weight and bias

It autotunes the forward, grad_input and grad_weight kernels over their candidate configurations
first (``--no-tune``: heuristic defaults only), prints a table with ratios (>1: fastconv faster)
and TFLOP/s, and merges the chosen configurations into a JSON table that fastconv reads as its
shipped defaults (``fastconv/backends/triton/conv_configs.json``).

    python scripts/gpu_conv_sweep.py                                 # everything (~10 min)
    python scripts/gpu_conv_sweep.py --models alexnet vgg11 --out $OUT/conv_configs.json \\
        --report $OUT/conv_sweep.md
    python scripts/gpu_conv_sweep.py --no-tune --models googlenet    # heuristic only, fast

Self-contained apart from fastconv itself; needs a CUDA GPU.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOKE = "--smoke" in sys.argv  # plumbing check on CPU: interpreter, tiny shapes, wall-clock timer
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)


# (model, name, C, K, H=W, kernel, stride, padding, groups); channels as in docs MODELS.md
def alexnet():
    return [("alexnet", "conv1 11x11/4", 1, 96, 224, 11, 4, 1, 1),
            ("alexnet", "conv2 5x5", 96, 256, 26, 5, 1, 2, 1),
            ("alexnet", "conv3 3x3", 256, 384, 12, 3, 1, 1, 1),
            ("alexnet", "conv4 3x3", 384, 384, 12, 3, 1, 1, 1),
            ("alexnet", "conv5 3x3", 384, 256, 12, 3, 1, 1, 1)]


def vgg11():
    layers, cin, size = [], 1, 224
    for i, (n, cout) in enumerate([(1, 64), (1, 128), (2, 256), (2, 512), (2, 512)]):
        for j in range(n):
            layers.append(("vgg11", f"block{i + 1}.{j + 1} 3x3", cin, cout, size, 3, 1, 1, 1))
            cin = cout
        size //= 2
    return layers


def googlenet():
    layers = [("googlenet", "b2 1x1", 64, 64, 56, 1, 1, 0, 1),
              ("googlenet", "b2 3x3", 64, 192, 56, 3, 1, 1, 1)]
    blocks = [(28, "3a", 192, 64, (96, 128), (16, 32), 32), (28, "3b", 256, 128, (128, 192), (32, 96), 64),
              (14, "4a", 480, 192, (96, 208), (16, 48), 64), (14, "4b", 512, 160, (112, 224), (24, 64), 64),
              (14, "4c", 512, 128, (128, 256), (24, 64), 64), (14, "4d", 512, 112, (144, 288), (32, 64), 64),
              (14, "4e", 528, 256, (160, 320), (32, 128), 128), (7, "5a", 832, 256, (160, 320), (32, 128), 128),
              (7, "5b", 832, 384, (192, 384), (48, 128), 128)]
    for size, tag, cin, c1, (c2a, c2b), (c3a, c3b), c4 in blocks:
        layers += [("googlenet", f"{tag} p1 1x1", cin, c1, size, 1, 1, 0, 1),
                   ("googlenet", f"{tag} p2 1x1", cin, c2a, size, 1, 1, 0, 1),
                   ("googlenet", f"{tag} p2 3x3", c2a, c2b, size, 3, 1, 1, 1),
                   ("googlenet", f"{tag} p3 1x1", cin, c3a, size, 1, 1, 0, 1),
                   ("googlenet", f"{tag} p3 5x5", c3a, c3b, size, 5, 1, 2, 1),
                   ("googlenet", f"{tag} p4 1x1", cin, c4, size, 1, 1, 0, 1)]
    return layers


MODELS = {"alexnet": alexnet, "vgg11": vgg11, "googlenet": googlenet}
FIRST_LAYERS = {("alexnet", "conv1 11x11/4"), ("vgg11", "block1.1 3x3")}


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--layers", default=None, help="regex on 'model name' to run a subset")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-tune", dest="tune", action="store_false", help="heuristic configs only")
    p.add_argument("--max-configs", type=int, default=0, help="try only the first N candidates")
    p.add_argument("--no-bwd", dest="bwd", action="store_false", help="forward only")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="time torch with cudnn.benchmark off (its default; on is the stronger baseline)")
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per timing")
    p.add_argument("--out", default=str(ROOT / "fastconv" / "backends" / "triton" / "conv_configs.json"),
                   help="JSON table the chosen configurations are merged into")
    p.add_argument("--report", default=None, help="also write the table as markdown here")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on CPU (Triton interpreter, channels and sizes / 16)")
    a = p.parse_args()

    import torch

    if a.smoke:
        a.batch, a.tune = 2, False
    elif not torch.cuda.is_available():
        print("gpu_conv_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="fastconv-sweep-")
    os.environ["FASTCONV_CACHE_DIR"] = tmp  # tune from scratch, do not touch the user's cache
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from fastconv.backends.triton import autotune, conv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    table = autotune.ConfigTable("conv", path=Path(tmp) / "conv.json")
    table._shipped = {}  # ignore the shipped table: this run is what refreshes it
    conv._TABLE = table
    autotune.set_enabled(a.tune)
    if a.max_configs:
        full = conv._candidates
        conv._candidates = lambda kind, pb: full(kind, pb)[:a.max_configs]

    layers = [l for m in a.models for l in MODELS[m]()]
    if a.layers:
        layers = [l for l in layers if re.search(a.layers, f"{l[0]} {l[1]}")]
    dev = torch.device("cpu" if a.smoke else "cuda")
    tag = autotune.device_tag(dev)
    if a.smoke:
        layers = [(m, n, max(1, C // 16), max(1, K // 16), max(8, HW // 16), k, s, pd, g)
                  for m, n, C, K, HW, k, s, pd, g in layers]
    print(f"# {tag}, torch {torch.__version__}, triton {triton.__version__}, {a.dtype} channels_last, "
          f"batch {a.batch}, cudnn.benchmark={a.cudnn_benchmark}, tune={a.tune}", flush=True)

    def bench(fn):
        if a.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=10, rep=a.rep_ms, return_mode="median")

    rows, timed = [], {}
    t_start = time.time()
    hdr = (f"{'model':<10} {'layer':<16} {'C':>4} {'K':>4} {'HW':>4} {'k/s/p':>7} | {'fwd ms':>7} "
           f"{'torch':>7} {'x':>5} {'TF/s':>5} | {'f+b ms':>7} {'torch':>7} {'x':>5} {'TF/s':>5} | err")
    print(hdr)
    print("-" * len(hdr))
    for model, name, C, K, HW, k, s, pd, g in layers:
        shape = (C, K, HW, k, s, pd, g, (model, name) in FIRST_LAYERS)
        if shape in timed:  # GoogLeNet repeats shapes: time once, count per layer
            row = dict(timed[shape], model=model, layer=name)
            rows.append(row)
            print(f"{model:<10} {name:<16} (same shape as {timed[shape]['model']} {timed[shape]['layer']})")
            continue
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(a.batch, C, HW, HW, device=dev, generator=gen).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(K, C // g, k, k, device=dev, generator=gen) / math.sqrt(C * k * k / g)).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        b = (0.1 * torch.randn(K, device=dev, generator=gen)).to(dtype)
        geo = dict(stride=s, padding=pd, dilation=1, groups=g)
        first = (model, name) in FIRST_LAYERS

        def fast_fwd():
            return conv.conv2d_relu(x, w, b, (s, s), (pd, pd), (1, 1), g, True)

        def torch_fwd():
            return F.relu(F.conv2d(x, w, b, **geo))

        y = fast_fwd()  # tunes the forward kernel
        ref = torch_fwd()
        err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        P = y.shape[2]
        flops = 2.0 * a.batch * K * P * P * (C // g) * k * k
        t_f, t_tf = bench(fast_fwd), bench(torch_fwd)
        row = dict(model=model, layer=name, C=C, K=K, HW=HW, k=k, s=s, p=pd, fwd=t_f, torch_fwd=t_tf,
                   fwd_x=t_tf / t_f, fwd_tflops=flops / t_f * 1e-9, err=err)
        if a.bwd:
            xg = x.detach().requires_grad_(not first)
            wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
            params = [wg, bg] if first else [xg, wg, bg]
            gy = torch.randn_like(y)

            def fast_fb():
                out = conv.conv2d_relu(xg, wg, bg, (s, s), (pd, pd), (1, 1), g, True)
                return torch.autograd.grad(out, params, gy)

            def torch_fb():
                out = F.relu(F.conv2d(xg, wg, bg, **geo))
                return torch.autograd.grad(out, params, gy)

            fast_fb()  # tunes grad_input / grad_weight
            t_fb, t_tfb = bench(fast_fb), bench(torch_fb)
            row.update(fb=t_fb, torch_fb=t_tfb, fb_x=t_tfb / t_fb,
                       fb_tflops=flops * (2 if first else 3) / t_fb * 1e-9)
        timed[shape] = row
        rows.append(row)
        fb = (f"{row['fb']:7.3f} {row['torch_fb']:7.3f} {row['fb_x']:5.2f} {row['fb_tflops']:5.0f}"
              if a.bwd else " " * 27)
        flag = "  <-- CHECK" if err > (2e-2 if dtype != torch.float32 else 5e-3) else ""
        print(f"{model:<10} {name:<16} {C:>4} {K:>4} {HW:>4} {f'{k}/{s}/{pd}':>7} | {t_f:7.3f} {t_tf:7.3f} "
              f"{row['fwd_x']:5.2f} {row['fwd_tflops']:5.0f} | {fb} | {err:.1e}{flag}", flush=True)
        del x, w, b, y, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    print()
    summary = []
    for label, sel in [("all", rows)] + [(m, [r for r in rows if r["model"] == m]) for m in a.models]:
        if not sel:
            continue
        line = (f"{label:<10} fwd geomean {geomean([r['fwd_x'] for r in sel]):.3f}x "
                f"(min {min(r['fwd_x'] for r in sel):.2f}x)")
        if a.bwd:
            line += (f" | fwd+bwd geomean {geomean([r['fb_x'] for r in sel]):.3f}x "
                     f"(min {min(r['fb_x'] for r in sel):.2f}x)")
        summary.append(line)
        print(line)
    print(f"# {len(rows)} layers in {time.time() - t_start:.0f} s")

    tuned = autotune.ConfigTable("conv", path=Path(tmp) / "conv.json")
    tuned._load()
    new = tuned._user.get(tag, {})
    if new:
        out = Path(a.out)
        data = json.loads(out.read_text()) if out.exists() else {}
        if data.get("format") != autotune.FORMAT:
            data = {"format": autotune.FORMAT, "entries": {}}
        data.setdefault("entries", {}).setdefault(tag, {}).update(new)
        data["generated_by"] = "scripts/gpu_conv_sweep.py"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"# merged {len(new)} tuned configurations into {out}")
    if a.report:
        cols = ["model", "layer", "C", "K", "HW", "k", "s", "p", "fwd", "torch_fwd", "fwd_x", "fwd_tflops"]
        if a.bwd:
            cols += ["fb", "torch_fb", "fb_x", "fb_tflops"]
        cols.append("err")
        lines = [f"# conv2d_relu sweep: {tag}, {a.dtype} channels_last, batch {a.batch}", "",
                 f"torch {torch.__version__}, triton {triton.__version__}, cudnn.benchmark="
                 f"{a.cudnn_benchmark}, tuned={a.tune}. Times are do_bench medians in ms; x = torch / "
                 "fastconv (>1: fastconv faster).", "", *[f"- {s}" for s in summary], "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, "")
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text("\n".join(lines) + "\n")
        print(f"# wrote {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
