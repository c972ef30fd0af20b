"""What the GPU-proof stages share: arguments, the incremental result file, the stage deadline,
and the timer (re-pointable to fastconv.timing once it lands).

Each stage is ``python scripts/gpu_proof/<stage>.py --work DIR [--cpu-smoke] [--deadline T]``.
It appends rows to ``DIR/<stage>.json`` and rewrites that file atomically after every row, so a
stage stopped at any point leaves every row it finished. ``--deadline`` is an absolute
``time.time()`` after which no new case starts (the shell's timeout is the hard stop).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(doc: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--work", required=True, help="directory of this run's results and logs")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the entry point on the CPU: tiny shapes, Triton interpreter")
    p.add_argument("--deadline", type=float,
                   default=float(os.environ.get("GPU_PROOF_DEADLINE") or 0),
                   help="absolute time.time() after which no new case starts (0: none; "
                        "default $GPU_PROOF_DEADLINE, set by gpu_proof.sh)")
    if extra:
        extra(p)
    args = p.parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return args


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


class Results:
    """``DIR/<stage>.json``: {"stage", "meta", "rows": [...]}, rewritten after each row."""

    def __init__(self, work: str, stage: str, deadline: float = 0.0, **meta):
        self.path = Path(work) / f"{stage}.json"
        self.deadline = deadline
        self.data = {"stage": stage, "meta": meta, "rows": [], "done": False}
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)

    def time_left(self) -> float:
        return float("inf") if not self.deadline else self.deadline - time.time()

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.time_left() < need

    def add(self, **row) -> dict:
        self.data["rows"].append(row)
        self.flush()
        print(json.dumps(row, default=str), flush=True)
        return row

    def case(self, name: str, fn: Callable[[], Optional[dict]], need: float = 0.0, **tags) -> dict:
        """Runs one case: its dict result is merged into the row; an exception is a failure
        row with the first error line (the traceback goes to the log)."""
        if self.out_of_time(need):
            return self.add(name=name, status="skipped", reason="stage deadline", **tags)
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
        except Skip as exc:
            return self.add(name=name, status="skipped", reason=str(exc), **tags)
        except Exception as exc:  # a failed case never stops the stage
            traceback.print_exc()
            return self.add(name=name, status="failed", error=first_line(exc), **tags,
                            seconds=round(time.perf_counter() - t0, 2))
        status = extra.pop("status", "passed")
        return self.add(name=name, status=status, **tags, **extra,
                        seconds=round(time.perf_counter() - t0, 2))

    def finish(self, **meta) -> None:
        self.data["meta"].update(meta)
        self.data["done"] = True
        self.flush()


class Skip(Exception):
    """A case that cannot run here (no CUDA, backend unavailable); says why."""


# ------------------------------------------------------------------------------------------
# timing: fastconv.timing, the project's one timer (CUDA events, warm-up, alternation, medians)


def ms(stats) -> dict:
    """A timing.Stats (seconds per call) as milliseconds for the result rows."""
    return {"median_ms": stats.median * 1e3, "q1_ms": stats.q1 * 1e3, "q3_ms": stats.q3 * 1e3,
            "n": len(stats.samples)}


def measure(fn: Callable[[], Any], device, *, warmup: int = 3, reps: int = 20) -> dict:
    """Median and quartiles of ``fn``'s time in milliseconds (``reps`` rounds, one call each)."""
    from fastconv import timing

    return ms(timing.measure(fn, device=device, rounds=reps, warmup=warmup))


def device_and_smoke(args):
    import torch

    if args.cpu_smoke or not torch.cuda.is_available():
        return torch.device("cpu"), True
    return torch.device("cuda"), False
