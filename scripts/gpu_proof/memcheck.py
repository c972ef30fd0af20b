"""Stage 3a: compute-sanitizer memcheck over one small call of each CUDA kernel of the extension
(every conv tile variant forward and backward, max-pool with and without indices, average and
adaptive pools, batch norm training and eval, forward and backward), with torch's caching
allocator off so that every tensor is its own allocation and an overrun is seen.

``--cpu-smoke`` runs the same call script on the CPU kernels without the sanitizer.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Results, parse_args

CALLS = r'''
import os, sys
import torch
from fastconv.backends import extension
dev = sys.argv[1]
reason = extension.ExtensionBackend().unavailable_reason()
if reason:
    print("SKIP:", reason.splitlines()[0]); sys.exit(3)
ops = torch.ops.fastconv
torch.manual_seed(0)
def r(shape, dt, cl=False):
    x = torch.randn(shape, device=dev).to(dt)
    return x.contiguous(memory_format=torch.channels_last) if cl else x
calls = 0
for dt, cl in ((torch.bfloat16, True), (torch.float16, False), (torch.float32, False)):
    # fp16 runs the bf16 kernels' other instantiation: the tile variants once, in bf16
    tiles = ("big", "mid", "wgmma", "") if dt == torch.bfloat16 and dev == "cuda" else ("",)
    for tile in tiles:
        os.environ["FASTCONV_CONV_TILE"] = tile  # every conv kernel variant where selectable
        for C, K, k, s, g in ((16, 24, 3, 1, 1), (3, 16, 5, 2, 1), (16, 16, 3, 1, 2),
                              (24, 264, 3, 1, 1)):
            x = r((2, C, 9, 9), dt, cl); w = r((K, C // g, k, k), dt, cl); b = r((K,), dt)
            y = ops.conv2d_relu(x, w, b, [s, s], [1, 1], [1, 1], g, True)
            ops.conv2d_relu_backward(torch.randn_like(y), x, w, y, [s, s], [1, 1], [1, 1], g, True,
                                     [True, True, True])
            calls += 2
    os.environ["FASTCONV_CONV_TILE"] = ""
    x = r((2, 16, 9, 9), dt, cl)
    for ret in (False, True):
        o, i = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, ret, True)
        ops.max_pool2d_backward(torch.randn_like(o), o, i, list(x.shape), [3, 3], [2, 2], [1, 1],
                                [1, 1], True, ret, True)
    o = ops.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, False, None)
    ops.avg_pool2d_backward(torch.randn_like(o), list(x.shape), [3, 3], [2, 2], [1, 1], True, False,
                            None)
    o = ops.adaptive_avg_pool2d(x, [2, 3])
    ops.adaptive_avg_pool2d_backward(torch.randn_like(o), list(x.shape))
    c = x.shape[1]
    wb, bb = torch.rand(c, device=dev), torch.randn(c, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    for training in (True, False):
        yb, m, sd = ops.batch_norm(x, wb, bb, rm, rv, training, 0.1, 1e-5, True)
        ops.batch_norm_backward(torch.randn_like(yb), x, yb, wb, m, sd, training, True,
                                [True, True, True, True])
    calls += 12
if dev == "cuda":
    torch.cuda.synchronize()
print("CALLS-DONE", calls)
'''


def main() -> None:
    args = parse_args(__doc__)
    work = Path(args.work)
    res = Results(args.work, "memcheck", args.deadline)
    script = work / "memcheck_calls.py"
    script.write_text(CALLS)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", FASTCONV_NO_EXTENSION_BUILD="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tool = shutil.which("compute-sanitizer")

    def run():
        if args.cpu_smoke:
            cmd = [sys.executable, str(script), "cpu"]
        elif tool is None:
            return {"status": "skipped", "reason": "compute-sanitizer not found"}
        else:
            cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
                   sys.executable, str(script), "cuda"]
        left = res.time_left()
        timeout = 600 if left == float("inf") else max(5.0, left)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                               cwd=str(ROOT))
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            rc = 124
        (work / "memcheck.log").write_text(out)
        summary = re.findall(r"ERROR SUMMARY: .*", out)
        if "SKIP:" in out and rc == 3 and "CALLS-DONE" not in out:
            return {"status": "skipped", "reason": out.split("SKIP:", 1)[1].strip()[:200]}
        first_error = next((line for line in out.splitlines()
                            if line.startswith(("========= Invalid", "========= Program hit",
                                                "Traceback", "RuntimeError"))), "")
        ok = rc == 0 and "CALLS-DONE" in out and (args.cpu_smoke or
                                                    any(" 0 errors" in s for s in summary))
        return {"status": "passed" if ok else "failed", "rc": rc,
                "summary": summary[-1] if summary else None, "first_error": first_error[:200],
                "calls": (re.findall(r"CALLS-DONE (\d+)", out) or [None])[0],
                "wall_s": round(time.time() - t0, 1)}

    res.case("memcheck-every-cuda-kernel", run, need=20)
    res.finish()


if __name__ == "__main__":
    main()
