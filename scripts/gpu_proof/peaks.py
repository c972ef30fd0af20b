"""Stage 2 ceilings: dense matmul rates and device-to-device copy bandwidth (bytes read plus
written), measured by ``fastconv.timing.peaks`` (medians of CUDA-event timings on random data
after warm-up). Every achieved rate in the report is set against these."""
from __future__ import annotations

from common import Results, device_and_smoke, parse_args


def main() -> None:
    from fastconv import timing

    args = parse_args(__doc__)
    device, smoke = device_and_smoke(args)
    res = Results(args.work, "peaks", args.deadline, device=str(device))
    found: dict = {}

    def run():
        found.update(timing.peaks(device, rounds=2 if smoke else 5, size=256 if smoke else None,
                                  copy_mib=4 if smoke else None))
        return {"device": found.get("device")}

    res.case("measure", run)
    if "copy_gbs" in found:
        res.add(name="copy", status="passed", gbps=found["copy_gbs"])
    for dtype, tflops in found.get("matmul_tflops", {}).items():
        res.add(name=f"matmul-{dtype}", status="passed", tflops=tflops)
    res.finish()


if __name__ == "__main__":
    main()
