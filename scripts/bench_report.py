#!/usr/bin/env python3
"""Turn benchmark result files into a markdown table of speed-ups over torch eager and charts.

    python scripts/bench_report.py results.jsonl [more files] --out report/

Reads the results file (JSON lines, ``fastconv/tools/results.py``) that ``pytest benchmarks
--fc-results FILE``, ``fastconv bench --results FILE`` and ``python -m benchmarks.sweep
--results FILE`` append to; also pytest-benchmark JSON (``--benchmark-json``) and the JSON of
``fastconv bench --json FILE``. A later row for the same cell replaces an earlier one.
Results are grouped into sections by kind (layer, model training step, fastconv bench,
sweep), device, dtype, layout and batch, so files from different machines or settings sit
side by side. Each cell is the speed-up over torch eager on the same
case (median time of eager / median time of the provider: above 1 is faster) with the achieved
TFLOP/s (convolutions, models) or GB/s (pools, batch norm: compulsory traffic, see
benchmarks/layers.py); each section ends with the geometric mean per provider and mode.
Where the row holds a ratio measured alternately with eager (``vs_eager``), that ratio is
shown with its interquartile interval, ``?`` marking one whose interval overlaps 1.0 (not
significant) and ``~`` one wider than 10%. Memory rows (``pytest benchmarks/test_memory.py``)
add a table of the bytes autograd saves per provider (and the GPU peak) and ``memory.png``.

Writes ``report.md`` and, when matplotlib is installed, ``speedup.png`` (per case) and
``summary.png`` (geometric means), and ``memory.png`` when there are memory rows, into
``--out``; prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path



def _results_module():
    """fastconv/tools/results.py of this tree, loaded alone: it needs only the standard
    library, and importing the fastconv package would import torch (seconds) for nothing."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "fastconv" / "tools" / "results.py"
    spec = importlib.util.spec_from_file_location("fastconv_results_file", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


results_file = _results_module()

ORDER = ("eager", "compile", "fc_auto", "fc_triton", "fc_extension", "fc_torch")
NAMES = {"eager": "torch eager", "compile": "torch.compile", "fc_auto": "fastconv[auto]",
         "fc_triton": "fastconv[triton]", "fc_extension": "fastconv[extension]",
         "fc_torch": "fastconv[torch]"}
BENCH_VARIANTS = {"stock": "eager", "compile": "compile", "auto": "fc_auto",
                  "triton": "fc_triton", "extension": "fc_extension", "torch": "fc_torch"}


def _name(provider: str) -> str:
    """Display name; ``X+compile`` (fastconv bench's converted and compiled models) reads
    ``<X's name> compiled``."""
    base, plus, _ = provider.partition("+compile")
    return NAMES.get(base, base) + (" compiled" if plus else "")


class ReportError(RuntimeError):
    pass


def _section_key(kind, meta) -> tuple:
    return (kind, meta.get("device_name") or meta.get("device") or "?",
            meta.get("dtype", "?"), meta.get("layout", "?"), meta.get("batch", "?"))


def load(paths: list) -> dict:
    """section key -> {(case, mode): {provider: dict(seconds, flops, bytes)}}"""
    sections: dict = {}
    for path in paths:
        if results_file.is_results_file(path):
            try:
                rows = results_file.load(path)
            except (OSError, ValueError) as exc:
                raise ReportError(str(exc)) from None
            for r in rows:
                kind = {"bench": "fastconv bench"}.get(r["kind"], r["kind"])
                if "seconds" not in r:
                    continue  # peaks and other rows without a time
                key = _section_key(kind, r)
                cell = dict(seconds=r["seconds"]["median"], flops=r.get("flops", 0),
                            bytes=r.get("bytes", 0), ex_s=r.get("ex_s"),
                            vs_eager=r.get("vs_eager"), saved_bytes=r.get("saved_bytes"),
                            peak_bytes=r.get("peak_bytes"))
                sections.setdefault(key, {}).setdefault((r["case"], r["mode"]), {})[
                    r["provider"]] = cell
            continue
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: cannot read JSON: {exc}") from None
        if isinstance(data, dict) and "benchmarks" in data:
            for b in data["benchmarks"]:
                ei = b.get("extra_info") or {}
                if "provider" not in ei or "case" not in ei:
                    continue  # not one of fastconv's suites
                key = _section_key(ei.get("kind", "layer"), ei)
                cell = dict(seconds=b["stats"]["median"], flops=ei.get("flops", 0),
                            bytes=ei.get("bytes", 0), vs_eager=ei.get("vs_eager"),
                            saved_bytes=ei.get("saved_bytes"), peak_bytes=ei.get("peak_bytes"))
                sections.setdefault(key, {}).setdefault((ei["case"], ei["mode"]), {})[
                    ei["provider"]] = cell
        elif isinstance(data, dict) and data.get("kind") == "fastconv-bench":
            meta = data["meta"]
            meta = dict(meta, layout=meta.get("layout") or (
                "channels_last" if meta.get("channels_last") else "nchw"))
            key = _section_key("fastconv bench", meta)
            for row in data["rows"]:
                provider = BENCH_VARIANTS.get(row["variant"], row["variant"])
                for mode in ("train", "infer"):
                    if f"{mode}_ms" in row:
                        sections.setdefault(key, {}).setdefault((meta["model"], mode), {})[
                            provider] = dict(seconds=row[f"{mode}_ms"] / 1e3, flops=0,
                                             bytes=0, ex_s=row[f"{mode}_ex_s"])
        else:
            raise ReportError(f"{path}: neither a results file (JSON lines), pytest-benchmark "
                              "JSON nor fastconv bench JSON")
    if not sections:
        raise ReportError("no fastconv benchmark results in " + ", ".join(map(str, paths)))
    return sections


def _providers(rows: dict) -> list:
    seen = {p for cells in rows.values() for p in cells}
    return [p for p in ORDER if p in seen] + sorted(seen - set(ORDER))


def _rate(cell: dict) -> str:
    t = cell["seconds"]
    if cell.get("flops"):
        rate = cell["flops"] / t
        return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e11 else f"{rate / 1e9:.2f} GFLOP/s"
    if cell.get("bytes"):
        return f"{cell['bytes'] / t / 1e9:.1f} GB/s"
    if cell.get("ex_s"):
        return f"{cell['ex_s']:.1f} ex/s"
    return ""


def geomean(values: list) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def speedup(base: dict, cell: dict) -> float:
    """Over eager: the ratio measured alternately in the same run when the row has one."""
    if cell.get("vs_eager"):
        return cell["vs_eager"]["ratio"]
    return base["seconds"] / cell["seconds"]


def _speedup_text(base: dict, cell: dict) -> str:
    v = cell.get("vs_eager")
    if not v:
        return f"{speedup(base, cell):.2f}x"
    mark = ("" if v["significant"] else "?") + ("~" if v["wide"] else "")
    return f"{v['ratio']:.2f}x [{v['low']:.2f}-{v['high']:.2f}]{mark}"


def speedups(rows: dict) -> dict:
    """provider -> mode -> [speed-up over eager per case]"""
    out: dict = {}
    for (case, mode), cells in rows.items():
        base = cells.get("eager")
        if not base:
            continue
        for p, cell in cells.items():
            out.setdefault(p, {}).setdefault(mode, []).append(speedup(base, cell))
    return out


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def memory_markdown(sections: dict) -> list:
    """A table of saved (and peak) bytes per provider for the sections with memory rows."""
    lines = []
    for key in sorted(sections, key=str):
        rows = sections[key]
        if not any(c.get("saved_bytes") is not None or c.get("peak_bytes") is not None
                   for cells in rows.values() for c in cells.values()):
            continue
        provs = _providers(rows)
        lines += [f"## memory | {key[1]} | {key[2]} | {key[3]} | batch {key[4]}", "",
                  "Bytes autograd saves for backward in one training step (and the GPU peak "
                  "above the model and optimizer state); in brackets the ratio to eager.", "",
                  "| model | " + " | ".join(_name(p) for p in provs) + " |",
                  "|---|" + "---:|" * len(provs)]
        for (case, mode) in sorted(rows):
            cells = rows[(case, mode)]
            base = cells.get("eager") or {}
            out = [case]
            for p in provs:
                c = cells.get(p) or {}
                parts = []
                for field, label in (("saved_bytes", "saved"), ("peak_bytes", "peak")):
                    if c.get(field) is None:
                        continue
                    text = f"{label} {_mib(c[field])}"
                    if base.get(field):
                        text += f" ({c[field] / base[field]:.2f}x)"
                    parts.append(text)
                out.append(", ".join(parts))
            lines.append("| " + " | ".join(out) + " |")
        lines.append("")
    return lines


def markdown(sections: dict) -> str:
    lines = ["# fastconv benchmark report", "",
             "Cells: speed-up over torch eager on the same case (median times; >1 is faster) "
             "and the achieved rate. Empty: the provider did not run (skipped, see the "
             "pytest log). [low-high]: interquartile interval of a ratio measured "
             "alternately with eager; ? not significant (overlaps 1.0); ~ wider than 10%.", ""]
    for key in sorted(sections, key=str):
        kind, device, dtype, layout, batch = key
        rows = sections[key]
        provs = _providers(rows)
        lines += [f"## {kind} | {device} | {dtype} | {layout} | batch {batch}", ""]
        lines.append("| case | mode | eager ms | " + " | ".join(_name(p) for p in provs)
                     + " |")
        lines.append("|---|---|---:|" + "---:|" * len(provs))
        for (case, mode) in sorted(rows):
            cells = rows[(case, mode)]
            base = cells.get("eager")
            out = [case, mode, f"{base['seconds'] * 1e3:.3f}" if base else ""]
            for p in provs:
                c = cells.get(p)
                if not c:
                    out.append("")
                elif base:
                    out.append(f"{_speedup_text(base, c)} {_rate(c)}".strip())
                else:
                    out.append(f"{c['seconds'] * 1e3:.3f} ms {_rate(c)}".strip())
            lines.append("| " + " | ".join(out) + " |")
        sp = speedups(rows)
        for mode in sorted({m for (_, m) in rows}):
            vals = [sp.get(p, {}).get(mode, []) for p in provs]
            lines.append(f"| **geomean** | {mode} | | " + " | ".join(
                f"**{geomean(v):.2f}x** ({len(v)})" if v else "" for v in vals) + " |")
        lines.append("")
    lines += memory_markdown(sections)
    return "\n".join(lines)


def memory_chart(sections: dict, out: Path):
    """memory.png: saved bytes per provider and model (one bar series per provider), or
    None when there are no memory rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: dict = {}  # provider -> {label: bytes}
    labels: list = []
    for key in sorted(sections, key=str):
        for (case, mode), cells in sorted(sections[key].items()):
            label = f"{case}\n{key[2]} {key[3]} b{key[4]}"
            for p, c in cells.items():
                if c.get("saved_bytes") is not None:
                    if label not in labels:
                        labels.append(label)
                    bars.setdefault(p, {})[label] = c["saved_bytes"]
    if not bars:
        return None
    provs = [p for p in ORDER if p in bars] + sorted(set(bars) - set(ORDER))
    width = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels) + 3), 4.5))
    for i, p in enumerate(provs):
        xs = [j + (i - (len(provs) - 1) / 2) * width for j, lb in enumerate(labels)
              if lb in bars[p]]
        ax.bar(xs, [bars[p][lb] / 2**20 for lb in labels if lb in bars[p]], width=width,
               label=_name(p))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MiB saved for backward (one training step)")
    ax.set_title("training memory per provider", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=100, metadata={"Description": json.dumps(
        {"series": [_name(p) for p in provs], "cases": len(labels)})})
    plt.close(fig)
    return path


def charts(sections: dict, out: Path) -> list:
    """speedup.png and summary.png; returns the paths written (raises ImportError)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for key in sorted(sections, key=str):
        rows = sections[key]
        for mode in sorted({m for (_, m) in rows}):
            cases = sorted(c for (c, m) in rows if m == mode and "eager" in rows[(c, m)])
            if cases:
                panels.append((key, mode, cases))
    if not panels:
        return []
    written = []
    height = sum(max(1.6, 0.3 * len(c) + 1.0) for _, _, c in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, min(height, 400)), squeeze=False)
    for ax, (key, mode, cases) in zip(axes[:, 0], panels):
        rows = sections[key]
        provs = [p for p in _providers(rows) if p != "eager"]
        width = 0.8 / max(len(provs), 1)
        span = [1.0]
        for i, p in enumerate(provs):
            ys, xs = [], []
            for j, case in enumerate(cases):
                c = rows[(case, mode)].get(p)
                if c:
                    ys.append(j + (i - (len(provs) - 1) / 2) * width)
                    xs.append(speedup(rows[(case, mode)]["eager"], c))
            # bars grow from 1 (as fast as eager): right is faster, left is slower
            ax.barh(ys, [x - 1.0 for x in xs], left=1.0, height=width, label=_name(p))
            span += xs
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(span) / 1.5, max(span) * 1.5)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{key[0]} {mode}: {key[1]}, {key[2]}, {key[3]}, batch {key[4]}",
                     fontsize=9)
        ax.set_xlabel("speed-up over torch eager (log scale, >1 faster)", fontsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "speedup.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(panels) + 3), 4.5))
    labels = [f"{k[0]} {m}\n{k[2]} {k[3]}" for k, m, _ in panels]
    seen = {p for k, _, _ in panels for p in speedups(sections[k])} - {"eager"}
    provs = [p for p in ORDER if p in seen] + sorted(seen - set(ORDER))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        xs, hs = [], []
        for j, (key, mode, _) in enumerate(panels):
            v = speedups(sections[key]).get(p, {}).get(mode)
            if v:
                xs.append(j + (i - (len(provs) - 1) / 2) * width)
                hs.append(geomean(v))
        ax.bar(xs, hs, width=width, label=_name(p))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(panels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("geometric-mean speed-up over torch eager")
    ax.set_title(f"fastconv on {panels[0][0][1]}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    mem = memory_chart(sections, out)
    if mem is not None:
        written.append(mem)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files")
    p.add_argument("--out", required=True, help="folder for report.md and the PNG charts")
    args = p.parse_args(argv)
    try:
        sections = load(args.results)
    except ReportError as exc:
        print(f"bench_report: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(sections)
    (out / "report.md").write_text(text + "\n")
    print(text)
    try:
        written = charts(sections, out)
    except ImportError:
        print("bench_report: matplotlib is not installed, so no PNG chart was drawn "
              "(pip install matplotlib); the table is in " + str(out / "report.md"),
              file=sys.stderr)
        return 0
    print("charts: " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
