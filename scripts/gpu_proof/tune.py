"""Stage 3b, if time is left: a short autotuning sweep of the Triton conv on the layers where it
lost most to torch eager in the layer stage (forward+backward ratio, worst first).

The shipped tables are set aside in this process so that every candidate is timed, the winners
go to a per-run cache (``$FASTCONV_CACHE_DIR``, set by the orchestrator to a folder of this run)
and the pack step returns them as ``tuned_configs.json`` to commit. Each row gives the layer's
time with the shipped configuration (from the layer stage) and with the tuned one.
"""
from __future__ import annotations

import json
from pathlib import Path

from common import Results, Skip, device_and_smoke, measure, parse_args


def _forget_shipped_tables() -> int:
    """Set aside the shipped configuration tables of every Triton module (tuning otherwise
    never runs for a shape the table covers). Returns how many tables it found."""
    import importlib
    import pkgutil

    import fastconv.backends.triton as tri
    from fastconv.backends.triton import autotune

    found = 0
    for info in pkgutil.iter_modules(tri.__path__):
        if info.name == "aot":  # development tooling (moving out of the package), no tables
            continue
        mod = importlib.import_module(f"{tri.__name__}.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, autotune.ConfigTable):
                if not hasattr(value, "_shipped"):
                    raise RuntimeError("autotune.ConfigTable has no _shipped table to set aside")
                value._load()
                value._shipped = {}
                value._mem.clear()
                found += 1
    return found


def worst_layers(work: Path, n: int) -> list[tuple[str, float, float]]:
    """(layer id, triton fwd+bwd ms with shipped configs, ratio vs eager), worst first."""
    try:
        rows = json.loads((work / "layers.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
    backend = "triton" if any("triton" in r.get("ms", {}) for r in rows) else "torch"
    found = [(r["layer"], r["ms"][backend], r["ratio_vs_eager"][backend]) for r in rows
             if r.get("op") == "conv2d_relu" and r.get("mode") == "fwdbwd"
             and backend in r.get("ratio_vs_eager", {})]
    return sorted(found, key=lambda t: t[2])[:n]


def main() -> None:
    import torch

    from fastconv.backends.triton import autotune
    from layer_times import _callables, _layers

    def extra(p):
        p.add_argument("--layers", type=int, default=3, help="how many of the worst layers")
    args = parse_args(__doc__, extra)
    device, smoke = device_and_smoke(args)
    res = Results(args.work, "tune", args.deadline, device=str(device))
    tables = _forget_shipped_tables()
    autotune.set_enabled(True)
    by_id = {l.id: l for l in _layers(smoke)}
    worst = worst_layers(Path(args.work), args.layers)
    if not worst:
        res.add(name="select", status="skipped",
                reason="no conv layer timings from the layer stage")
    for layer_id, shipped_ms, ratio in worst:
        def run(layer_id=layer_id, shipped_ms=shipped_ms, ratio=ratio):
            if device.type != "cuda":
                raise Skip("tuning times real CUDA kernels")
            layer = by_id[layer_id]
            fn = _callables(layer, "triton", device, torch.bfloat16, 128, True, smoke)
            fn()  # tunes forward, grad_input and grad_weight: the winners go to the cache
            t = measure(fn, device, warmup=3, reps=25)
            return {"shipped_ms": shipped_ms, "tuned_ms": t["median_ms"],
                    "speedup": shipped_ms / t["median_ms"], "ratio_vs_eager_shipped": ratio}
        res.case(f"tune[{layer_id}]", run, need=30)
    res.finish(tables_set_aside=tables, cache=str(autotune.ConfigTable("conv").path.parent))


if __name__ == "__main__":
    main()
