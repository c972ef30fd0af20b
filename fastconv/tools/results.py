"""The one benchmark data file: JSON lines, append-only, one row per measured cell.

Written by ``fastconv bench --results FILE``, ``pytest benchmarks --fc-results FILE`` and
``python -m benchmarks.sweep --results FILE``; rendered by ``scripts/bench_report.py``.
Each row is a flat JSON object that carries everything needed to compare it with rows from
other runs and machines:

* ``kind``: ``bench`` (fastconv bench steps), ``layer``, ``model``, ``memory``, ``sweep``,
  ``peaks``; ``case`` (model or layer id), ``mode`` (train/infer/fwd/fwdbwd/bwd...),
  ``provider`` (``eager``, ``compile``, ``fc_<backend>``, ``fc_<backend>+compile``);
* the run: ``device``, ``device_name``, ``torch``, ``triton``, ``cuda``, ``commit``,
  ``dtype``, ``layout``, ``batch``, ``time`` (when measured);
* the numbers: ``seconds`` (``fastconv.timing.Stats.to_dict()``: median, min, max, q1, q3,
  n, rounds), ``vs_eager`` (``Ratio.to_dict()`` against eager measured alternately in the
  same run, > 1 faster), ``flops`` / ``bytes`` (work per call), ``saved_bytes`` /
  ``peak_bytes`` (memory rows), and anything else a producer adds.

Appending never rewrites earlier rows; a file may hold many runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

SCHEMA = 1
KEYS = ("kind", "case", "mode", "provider")


def row(meta: dict, **fields) -> dict:
    """A result row: the run's metadata (``common.run_metadata``) plus ``fields``."""
    missing = [k for k in KEYS if k not in fields]
    if missing:
        raise ValueError(f"result row needs {', '.join(missing)}")
    return {"schema": SCHEMA, **meta, **fields}


def append(path, rows: Iterable[dict]) -> int:
    """Append ``rows`` to ``path`` (created with its folder if missing) in one write, so rows
    of processes appending at the same time do not interleave within a line. Returns the
    number of rows written."""
    lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
    if not lines:
        return 0
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)
    return lines.count("\n")


def load(path) -> list[dict]:
    """Every row of a results file (blank lines ignored); a malformed line raises
    ``ValueError`` naming the file and line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not a JSON line: {exc}") from None
        if not isinstance(r, dict) or r.get("schema") != SCHEMA or any(k not in r for k in KEYS):
            raise ValueError(f"{path}:{i}: not a fastconv result row (schema {SCHEMA} with "
                             f"{', '.join(KEYS)})")
        out.append(r)
    return out


def is_results_file(path) -> Optional[bool]:
    """True when the first non-blank line is a result row (cheap format sniffing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    return isinstance(r, dict) and r.get("schema") == SCHEMA and "kind" in r
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return False
