"""Measure the two ceilings of this GPU: dense bf16/fp16/tf32 matmul rate and device-to-device
copy bandwidth (bytes read + written), with CUDA-event medians on random data.

    python scripts/gpu_peaks.py [--json out.json]
"""
import argparse
import json

import torch
from triton.testing import do_bench


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    n = 8192
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                        ("tf32", torch.float32)):
        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
        out[f"matmul_{name}_tflops"] = 2 * n**3 / ms / 1e9
    x = torch.randn(2**28, device=dev, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    out["copy_gbps"] = 2 * x.numel() * x.element_size() / ms / 1e6
    for k, v in out.items():
        print(f"{k:22s} {v:.1f}" if isinstance(v, float) else f"{k:22s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
