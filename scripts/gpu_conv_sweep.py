#!/usr/bin/env python
"""GPU sweep of fastconv's Triton conv2d_relu against torch eager, layer by layer.

For every conv layer of AlexNet and VGG-11 (batch 128, 1x224x224 input, as docs MODELS.md) and the
1x1/3x3/5x5 convs of GoogLeNet (224 input), in bfloat16 channels_last, this times with
``triton.testing.do_bench`` medians:

* fwd:     fastconv ``conv2d_relu``                   vs  ``relu(F.conv2d(x, w, b))`` (cuDNN, then
           torch's own bias and ReLU)
* fwd+bwd: the same plus ``autograd.grad`` of input (not for a model's first layer, whose input
           never needs one), weight and bias

and with ``--breakdown`` the three backward pieces on their own, each against what torch eager runs
for it (``torch.ops.aten`` calls, so no autograd overhead on either side):

* mask:  fastconv's one pass over grad_output (ReLU mask, channels_last G, grad_bias)
         vs ``threshold_backward`` (torch's ReLU backward; its grad_bias is inside wgrad below)
* dgrad: fastconv grad_input   vs ``convolution_backward(..., output_mask=[True, False, False])``
* wgrad: fastconv grad_weight  vs ``convolution_backward(..., output_mask=[False, True, True])``
         (weight and bias together, as eager autograd asks cuDNN for them)

Before timing it autotunes the forward, grad_input and grad_weight kernels over their candidate
configurations (``--max-configs N``: the first N of each list; ``--no-tune``: heuristic defaults
only). Triton compiles every candidate first in ``--jobs`` parallel worker processes (compile
only, nothing timed; the main process then finds them in Triton's on-disk cache), which is most of
a cold run's time otherwise. It prints one line per layer as it goes and a compact table last,
and merges the chosen configurations into a JSON table that fastconv reads as its shipped
defaults (``fastconv/backends/triton/conv2d_relu_configs.json``; existing entries are kept, re-tuned keys
replaced).

    python scripts/gpu_conv_sweep.py --breakdown --max-configs 4 \\
        --out $OUT/conv2d_relu_configs.json --report $OUT/conv_sweep.md          # ~3-4 min on an H100
    python scripts/gpu_conv_sweep.py --models alexnet vgg11               # f / f+b only
    python scripts/gpu_conv_sweep.py --no-tune --models googlenet         # heuristic only, fast
    python scripts/gpu_conv_sweep.py --smoke --breakdown                  # plumbing check on CPU

Self-contained apart from fastconv itself; needs a CUDA GPU (except ``--smoke``).
"""
import argparse
import hashlib
import json
import math
import os
import re
import subprocess
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--layers", default=None, help="regex on 'model name' to run a subset")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-tune", dest="tune", action="store_false", help="heuristic configs only")
    p.add_argument("--max-configs", type=int, default=0, help="try only the first N candidates")
    p.add_argument("--no-bwd", dest="bwd", action="store_false", help="forward only")
    p.add_argument("--breakdown", action="store_true",
                   help="also time mask / grad_input / grad_weight separately against torch's")
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                   help="processes that compile the candidate kernels before timing (1: none)")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="time torch with cudnn.benchmark off (its default; on is the stronger baseline)")
    p.add_argument("--rep-ms", type=int, default=40, help="do_bench repetition time per timing")
    p.add_argument("--tune-rep-ms", type=int, default=25, help="do_bench time per tuned candidate")
    p.add_argument("--out", default=str(ROOT / "fastconv" / "backends" / "triton" / "conv2d_relu_configs.json"),
                   help="JSON table the chosen configurations are merged into")
    p.add_argument("--report", default=None, help="also write the table as markdown here")
    p.add_argument("--json", default=None, help="also write the raw rows as JSON here")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds (from the start, compile included) after which no new layer is "
                        "started; the tables and JSON are still written (0: no limit)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on CPU (Triton interpreter, channels and sizes / 16)")
    # internal: a compile-only worker for one shard of the layers
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_layers(a):
    layers = [l for m in a.models for l in MODELS[m]()]
    if a.layers:
        layers = [l for l in layers if re.search(a.layers, f"{l[0]} {l[1]}")]
    if a.smoke:
        layers = [(m, n, max(1, C // 16), max(1, K // 16), max(8, HW // 16), k, s, pd, g)
                  for m, n, C, K, HW, k, s, pd, g in layers]
    return layers


def shape_of(layer):
    model, name, C, K, HW, k, s, pd, g = layer
    return (C, K, HW, k, s, pd, g, (model, name) in FIRST_LAYERS)


def precompile(a, layers) -> float:
    """Compile every candidate configuration in ``a.jobs`` worker processes (Triton's on-disk cache
    is shared), so that tuning in this process only loads binaries. Returns seconds spent."""
    t0 = time.time()
    shapes = list(dict.fromkeys(shape_of(l) for l in layers))
    jobs = max(1, min(a.jobs, len(shapes)))
    own = sys.argv[1:]
    argv = [x for i, x in enumerate(own) if x != "--shard" and (i == 0 or own[i - 1] != "--shard")]
    env = dict(os.environ, FASTCONV_SWEEP_CLAIMS=tempfile.mkdtemp(prefix="fastconv-claims-"))
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--compile-only", "--shard",
                               f"{i}/{jobs}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(jobs)]
    for i, pr in enumerate(procs):
        try:
            out, _ = pr.communicate(timeout=max(10.0, 300 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            pr.kill()
            out, _ = pr.communicate()
            print(f"# compile worker {i}/{jobs} timed out (tuning compiles the rest)", flush=True)
        if pr.returncode:
            print(f"# compile worker {i}/{jobs} failed ({pr.returncode}):\n{out[-2000:]}", flush=True)
    return time.time() - t0


T0 = time.time()


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if a.smoke:
        a.batch, a.tune = 2, False
        if a.dtype == "bf16":
            a.dtype = "fp16"  # the interpreter's bf16 dot is wrong; fp16 checks the numbers
    elif not torch.cuda.is_available():
        print("gpu_conv_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    worker = a.compile_only
    tmp = tempfile.mkdtemp(prefix="fastconv-sweep-")
    os.environ["FASTCONV_CACHE_DIR"] = tmp  # tune from scratch, do not touch the user's cache
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from fastconv.backends.triton import autotune
    from fastconv.backends.triton import conv2d_relu as conv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    table = autotune.ConfigTable("conv2d_relu", path=Path(tmp) / "conv2d_relu.json")
    table._shipped = {}  # ignore the shipped table: this run is what refreshes it
    conv._TABLE = table
    autotune.set_enabled(a.tune)
    full = conv._candidates
    if a.max_configs:
        conv._candidates = lambda kind, pb: full(kind, pb)[:a.max_configs]
    real_tune = autotune.tune
    autotune.tune = lambda cands, run: real_tune(cands, run, warmup_ms=5, rep_ms=a.tune_rep_ms)

    layers = select_layers(a)
    dev = torch.device("cpu" if a.smoke else "cuda")
    tag = autotune.device_tag(dev)

    if worker:
        # compile, never run or time: launches become warmups, tuning tries each candidate once.
        # Every worker walks all layers (from its own starting point) and claims each kernel
        # variant in a shared directory before compiling it, so each is compiled once in all.
        index, count = (int(v) for v in a.shard.split("/"))
        real_run = conv.run
        claims = Path(os.environ.get("FASTCONV_SWEEP_CLAIMS", tmp))

        def variant(kernel, args, meta) -> str:
            spec = [str(v.dtype) if isinstance(v, torch.Tensor) else
                    ("1" if v == 1 else "16" if v % 16 == 0 else "i") if isinstance(v, int)
                    and not isinstance(v, bool) else repr(v) for v in args]
            name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
            return hashlib.sha1(repr((name, spec, sorted(meta.items()))).encode()).hexdigest()

        def warm(kernel, grid, args, meta, real):
            if not (real and hasattr(kernel, "warmup")):
                return real_run(kernel, grid, args, meta, real)
            try:
                os.close(os.open(claims / variant(kernel, args, meta), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return None  # another worker compiles it
            kernel.warmup(*args, grid=grid, **meta)

        def compile_all(cands, run):
            cands = list(cands)
            for c in cands:
                try:
                    run(c)
                except Exception:  # e.g. out of shared memory: tuning skips it too
                    pass
            return (dict(cands[0]), None) if cands else (None, None)

        conv.run = warm
        autotune.tune = compile_all
        layers = list({shape_of(l): l for l in layers}.values())
        start = index * len(layers) // max(1, count)
        layers = layers[start:] + layers[:start]

    compile_s = 0.0
    if not worker and a.tune and a.jobs > 1 and not a.smoke:
        compile_s = precompile(a, layers)
    if not worker:
        print(f"# {tag}, torch {torch.__version__}, triton {triton.__version__}, {a.dtype} "
              f"channels_last, batch {a.batch}, cudnn.benchmark={a.cudnn_benchmark}, tune={a.tune}"
              f" (max {a.max_configs or 'all'} configs; parallel compile {compile_s:.0f} s)",
              flush=True)

    def bench(fn, rep=None):
        if a.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=10, rep=rep or a.rep_ms, return_mode="median")

    aten = torch.ops.aten
    rows, timed = [], {}
    t_start = time.time()
    hdr = (f"{'model':<10} {'layer':<16} {'C':>4} {'K':>4} {'HW':>4} {'k/s/p':>7} | {'fwd ms':>7} "
           f"{'torch':>7} {'x':>5} {'TF/s':>5} | {'f+b ms':>7} {'torch':>7} {'x':>5} {'TF/s':>5} | err")
    if not worker:
        print(hdr)
        print("-" * len(hdr))
    skipped = []
    for layer in layers:
        model, name, C, K, HW, k, s, pd, g = layer
        shape = shape_of(layer)
        if not worker and a.time_limit and time.time() - T0 > a.time_limit and shape not in timed:
            skipped.append(f"{model} {name}")
            continue
        if shape in timed:  # GoogLeNet repeats shapes: time once, count per layer
            rows.append(dict(timed[shape], model=model, layer=name))
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
        st, pad, dil = (s, s), (pd, pd), (1, 1)

        def fast_fwd():
            return conv.conv2d_relu(x, w, b, st, pad, dil, g, True)

        def torch_fwd():
            return F.relu(F.conv2d(x, w, b, **geo))

        y = fast_fwd()  # tunes the forward kernel
        xg = x.detach().requires_grad_(not first)
        wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
        params = [wg, bg] if first else [xg, wg, bg]
        gy = torch.randn_like(y)

        def fast_fb():
            out = conv.conv2d_relu(xg, wg, bg, st, pad, dil, g, True)
            return torch.autograd.grad(out, params, gy)

        def torch_fb():
            out = F.relu(F.conv2d(xg, wg, bg, **geo))
            return torch.autograd.grad(out, params, gy)

        if a.bwd:
            fast_fb()  # tunes grad_input / grad_weight
        if worker:
            continue
        ref = torch_fwd()
        err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        P = y.shape[2]
        flops = 2.0 * a.batch * K * P * P * (C // g) * k * k
        t_f, t_tf = bench(fast_fwd), bench(torch_fwd)
        row = dict(model=model, layer=name, C=C, K=K, HW=HW, k=k, s=s, p=pd, fwd=t_f, torch_fwd=t_tf,
                   fwd_x=t_tf / t_f, fwd_tflops=flops / t_f * 1e-9, err=err)
        if a.bwd:
            t_fb, t_tfb = bench(fast_fb), bench(torch_fb)
            row.update(fb=t_fb, torch_fb=t_tfb, fb_x=t_tfb / t_fb,
                       fb_tflops=flops * (2 if first else 3) / t_fb * 1e-9)
        if a.bwd and a.breakdown:
            # the backward pieces, each with its own inputs ready (saved output, masked grad)
            gm, _ = conv._grad_output(gy, y, True, True)
            yt = ref
            gmt = aten.threshold_backward(gy, yt, 0)
            cb = (gmt, x, w, [K], list(st), list(pad), list(dil), False, [0, 0], g)
            t_mask = bench(lambda: conv._grad_output(gy, y, True, True))
            t_relu = bench(lambda: aten.threshold_backward(gy, yt, 0))
            t_wg = bench(lambda: conv._grad_weight(gm, x, list(w.shape), True, st, pad, dil, g))
            t_twg = bench(lambda: aten.convolution_backward(*cb, [False, True, True]))
            row.update(mask=t_mask, torch_relu=t_relu, wgrad=t_wg, torch_wgrad=t_twg,
                       wgrad_x=t_twg / t_wg, wgrad_tflops=flops / t_wg * 1e-9)
            bwd, tbwd = t_mask + t_wg, t_relu + t_twg
            if not first:
                t_dg = bench(lambda: conv._grad_input(gm, w, list(x.shape), True, st, pad, dil, g))
                t_tdg = bench(lambda: aten.convolution_backward(*cb, [True, False, False]))
                row.update(dgrad=t_dg, torch_dgrad=t_tdg, dgrad_x=t_tdg / t_dg,
                           dgrad_tflops=flops / t_dg * 1e-9)
                bwd, tbwd = bwd + t_dg, tbwd + t_tdg
            row.update(bwd=bwd, torch_bwd=tbwd, bwd_x=tbwd / bwd)
            # the pieces must agree with torch's (a fast wrong kernel is no result)
            gw_ref = aten.convolution_backward(*cb, [False, True, True])[1]
            gw = conv._grad_weight(gm, x, list(w.shape), True, st, pad, dil, g)
            row["wgrad_err"] = ((gw.float() - gw_ref.float()).norm()
                                / gw_ref.float().norm().clamp_min(1e-12)).item()
            del gm, gmt, gw, gw_ref
        timed[shape] = row
        rows.append(row)
        fb = (f"{row['fb']:7.3f} {row['torch_fb']:7.3f} {row['fb_x']:5.2f} {row['fb_tflops']:5.0f}"
              if a.bwd else " " * 27)
        bad = max(err, row.get("wgrad_err", 0.0)) > (2e-2 if dtype != torch.float32 else 5e-3)
        line = (f"{model:<10} {name:<16} {C:>4} {K:>4} {HW:>4} {f'{k}/{s}/{pd}':>7} | {t_f:7.3f} "
                f"{t_tf:7.3f} {row['fwd_x']:5.2f} {row['fwd_tflops']:5.0f} | {fb} | {err:.1e}")
        if "bwd" in row:
            dg = (f"dgrad {row['dgrad']:.3f}/{row['torch_dgrad']:.3f} {row['dgrad_x']:.2f}x "
                  if "dgrad" in row else "")
            line += (f" | mask {row['mask']:.3f}/{row['torch_relu']:.3f} {dg}"
                     f"wgrad {row['wgrad']:.3f}/{row['torch_wgrad']:.3f} {row['wgrad_x']:.2f}x")
        print(line + ("  <-- CHECK" if bad else ""), flush=True)
        del x, w, b, y, ref, gy, xg, wg, bg
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if worker:
        return 0

    summary = []
    for label, sel in [("all", rows)] + [(m, [r for r in rows if r["model"] == m]) for m in a.models]:
        if not sel or len(a.models) == 1 and label != "all":
            continue
        line = (f"{label:<10} fwd {geomean([r['fwd_x'] for r in sel]):.3f}x "
                f"(min {min(r['fwd_x'] for r in sel):.2f})")
        if a.bwd:
            line += (f" | f+b {geomean([r['fb_x'] for r in sel]):.3f}x "
                     f"(min {min(r['fb_x'] for r in sel):.2f})")
        if a.bwd and a.breakdown:
            dg = [r["dgrad_x"] for r in sel if "dgrad_x" in r]
            line += f" | bwd {geomean([r['bwd_x'] for r in sel]):.3f}x"
            line += f" | dgrad {geomean(dg):.3f}x" if dg else " | dgrad -"
            line += f" | wgrad {geomean([r['wgrad_x'] for r in sel]):.3f}x"
        summary.append(line)
    print(f"# {len(rows)} layers in {time.time() - t_start:.0f} s (+ {compile_s:.0f} s parallel compile)")
    if skipped:
        print(f"# --time-limit {a.time_limit:.0f} s: {len(skipped)} layers not run: {', '.join(skipped)}")

    tuned = autotune.ConfigTable("conv2d_relu", path=Path(tmp) / "conv2d_relu.json")
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
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(device=tag, torch=torch.__version__,
                                                triton=triton.__version__, rows=rows), indent=1))
    if a.report:
        cols = ["model", "layer", "C", "K", "HW", "k", "s", "p", "fwd", "torch_fwd", "fwd_x", "fwd_tflops"]
        if a.bwd:
            cols += ["fb", "torch_fb", "fb_x", "fb_tflops"]
        if a.bwd and a.breakdown:
            cols += ["mask", "torch_relu", "dgrad", "torch_dgrad", "dgrad_x", "dgrad_tflops", "wgrad",
                     "torch_wgrad", "wgrad_x", "wgrad_tflops", "bwd_x", "wgrad_err"]
        cols.append("err")
        lines = [f"# conv2d_relu sweep: {tag}, {a.dtype} channels_last, batch {a.batch}", "",
                 f"torch {torch.__version__}, triton {triton.__version__}, cudnn.benchmark="
                 f"{a.cudnn_benchmark}, tuned={a.tune} (max {a.max_configs or 'all'} configs). Times "
                 "are do_bench medians in ms; x = torch / fastconv (>1: fastconv faster). Breakdown: "
                 "mask = fastconv's grad_output pass (ReLU mask + grad_bias) vs torch's "
                 "threshold_backward; torch_wgrad includes cuDNN's grad_bias.", "",
                 *[f"- {s}" for s in summary], "",
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

    # the compact table, last: ratios per layer (x = torch / fastconv, > 1: fastconv faster)
    print()
    cols = [("fwd_x", "fwd"), ("fb_x", "f+b")]
    if a.bwd and a.breakdown:
        cols += [("dgrad_x", "dgrad"), ("wgrad_x", "wgrad"), ("bwd_x", "bwd"),
                 ("dgrad_tflops", "dgTF"), ("wgrad_tflops", "wgTF")]
    cols = [c for c in cols if c[0] != "fb_x" or a.bwd]
    print(f"{'model':<10} {'layer':<16} " + " ".join(f"{h:>6}" for _, h in cols))
    for r in rows:
        cells = []
        for c, _ in cols:
            v = r.get(c)
            cells.append(f"{v:6.0f}" if v is not None and "tflops" in c else
                         f"{v:6.2f}" if v is not None else f"{'-':>6}")
        print(f"{r['model']:<10} {r['layer']:<16} " + " ".join(cells))
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
