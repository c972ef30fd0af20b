"""Stage 2 ceilings: dense bf16 matmul rate and device-to-device copy bandwidth (bytes read plus
written), medians of CUDA-event timings on random data after warm-up. Every achieved rate in
the report is set against these two."""
from __future__ import annotations

from common import Results, device_and_smoke, measure, parse_args


def main() -> None:
    import torch

    args = parse_args(__doc__)
    device, smoke = device_and_smoke(args)
    res = Results(args.work, "peaks", args.deadline, device=str(device))
    n = 256 if smoke else 8192

    def matmul(dtype):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = measure(lambda: a @ b, device, warmup=1 if smoke else 5, reps=3 if smoke else 30)
        return {"tflops": 2 * n ** 3 / t["median_ms"] / 1e9, "median_ms": t["median_ms"],
                "iqr_ms": [t["q1_ms"], t["q3_ms"]], "n": n}

    def copy():
        x = torch.randn(2 ** (16 if smoke else 28), device=device, dtype=torch.bfloat16)  # 512 MiB
        y = torch.empty_like(x)
        t = measure(lambda: y.copy_(x), device, warmup=5 if not smoke else 1,
                    reps=50 if not smoke else 3)
        moved = 2 * x.numel() * x.element_size()
        return {"gbps": moved / t["median_ms"] / 1e6, "median_ms": t["median_ms"],
                "iqr_ms": [t["q1_ms"], t["q3_ms"]], "bytes": moved}

    res.case("copy", copy)
    res.case("matmul-bf16", lambda: matmul(torch.bfloat16))
    res.finish()


if __name__ == "__main__":
    main()
