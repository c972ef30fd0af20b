"""Pack step: turns the run's folder (stage JSON, junit XML, logs) into at most 8 files in OUTDIR:
REPORT.md (a markdown table per stage, ratios first, failures with their first error line),
summary.json, preflight.json, correctness.json, numbers.json, stage3.json, tuned_configs.json
(only when tuning ran) and logs.tar.gz (everything else). Run after every stage, so a run
stopped at any point has returned what it finished; needs no torch (fast).

    python scripts/gpu_proof/report.py --work WORK --out OUTDIR [--budget S --elapsed S]
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

MAX_FILES = 8


def _load(work: Path, name: str) -> Optional[dict]:
    try:
        return json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _rows(doc: Optional[dict]) -> list[dict]:
    return list(doc.get("rows", [])) if isinstance(doc, dict) else []


def stages(work: Path) -> list[dict]:
    """WORK/stages.tsv, one line per finished stage: name rc seconds limit note."""
    out = []
    try:
        lines = (work / "stages.tsv").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 4:
            out.append({"stage": parts[0], "rc": parts[1], "seconds": parts[2],
                        "limit": parts[3], "note": parts[4] if len(parts) > 4 else ""})
    return out


def junit(path: Path) -> Optional[dict]:
    """Counts, time, failures (first error line) and the opcheck cases of one junit file."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"file": path.name, "error": f"unreadable junit XML: {exc}"}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, opcheck, slowest = [], [], []
    total = 0.0
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        t = float(case.get("time") or 0)
        total += t
        slowest.append((t, name))
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "error"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": name, "kind": child.tag,
                                 "first_line": (msg[0] if msg else "")[:240]})
            elif child.tag == "skipped":
                status = "skipped"
        counts[status] += 1
        if "opcheck" in name:
            opcheck.append({"test": name, "status": status})
    slowest.sort(reverse=True)
    return {"file": path.name, "counts": counts, "test_seconds": round(total, 1),
            "failures": failures, "opcheck": opcheck,
            "slowest": [{"test": n, "s": round(t, 1)} for t, n in slowest[:15]]}


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or v == "":
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(nothing recorded)", ""]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return out + [""]


def _ratio(value: Any, interval: Any = None) -> str:
    """``1.23 [1.20-1.26]``, with ``?`` when the interval says not significant or wide."""
    if value is None:
        return "-"
    text = _f(value)
    if isinstance(interval, (list, tuple)) and len(interval) >= 2:
        lo, hi = interval[0], interval[1]
        text += f" [{_f(lo)}-{_f(hi) if hi != float('inf') else 'inf'}]"
        if len(interval) > 2 and interval[2]:
            text += " ?"
    return text


def _mini(v: Any) -> str:
    return v if isinstance(v, str) else "/".join(map(str, v.values()))


def _case_rows(doc: Optional[dict]) -> list[list[str]]:
    rows = []
    for r in _rows(doc):
        detail = r.get("error") or r.get("reason") or r.get("first_line") or r.get("verdict") or ""
        if not detail and "crashed" in r:  # the error-path diagnosis
            lib = r.get("library") or {}
            mini = r.get("mini_variants") or {}
            if not isinstance(mini, dict):
                mini = {"": mini}
            detail = (f"crashed: {', '.join(r['crashed']) or 'none'}; .eh_frame_hdr search table: "
                      f"{lib.get('eh_frame_hdr_search_table', '-')}; unwinder linked in: "
                      f"{len(lib.get('unwinder_symbols_linked_in') or [])}; mini variants: "
                      + ", ".join(f"{k} {_mini(v)}" for k, v in mini.items()))[:400]
        if not detail:
            detail = ", ".join(f"{k}={_f(v, '{:.3g}')}" for k, v in r.items()
                               if k not in ("name", "status", "seconds") and
                               isinstance(v, (int, float, str)))[:200]
        rows.append([r.get("name", "?"), r.get("status", "?"), _f(r.get("seconds"), "{:.1f}"),
                     detail])
    return rows


def build_report(work: Path, budget: float, elapsed: float) -> tuple[str, dict]:
    pre = _load(work, "preflight")
    pre_rows = {r.get("name"): r for r in _rows(pre)}
    ver = pre_rows.get("versions", {})
    dev = pre_rows.get("device", {})
    pk = ver.get("packages", {}) if isinstance(ver.get("packages"), dict) else {}
    st = stages(work)
    runs = {p.stem: junit(p) for p in sorted(work.glob("junit-*.xml"))}
    peaks = {r.get("name"): r for r in _rows(_load(work, "peaks"))}
    copy_gbps = peaks.get("copy", {}).get("gbps")
    mm_row = peaks.get("matmul-bf16") or next((v for k, v in peaks.items()
                                               if str(k).startswith("matmul-")), {})
    mm = mm_row.get("tflops")

    md = ["# fastconv GPU proof", ""]
    md.append(f"Device **{dev.get('device_name', '?')}** (capability {dev.get('capability', '-')}, "
              f"{dev.get('sms', '-')} SMs); commit `{ver.get('commit', '?')}`; Python "
              f"{ver.get('python', '?')}, torch {pk.get('torch', '?')}, "
              f"Triton {pk.get('triton', '?')}, numpy {pk.get('numpy', '?')}. "
              f"Budget {budget:.0f} s, elapsed {elapsed:.0f} s.")
    md.append("")
    md.append("## Stages")
    md += _md_table(["stage", "status", "seconds", "limit", "note"],
                    [[s["stage"], "ok" if s["rc"] == "0" else ("skipped" if s["rc"] == "-" else
                                                              f"rc={s['rc']}"),
                      s["seconds"], s["limit"], s["note"]] for s in st])

    # ---- stage 1
    md.append("## Stage 1: correctness")
    ext_rows = _rows(_load(work, "extension"))
    if ext_rows:
        e = ext_rows[-1]
        md.append(f"Extension: **{e.get('path', e.get('status'))}** "
                  f"({_f(e.get('load_s'), '{:.0f}')} s) {e.get('error') or e.get('detail') or ''}")
        md.append("")
    md += _md_table(["pytest run", "passed", "failed", "errors", "skipped", "test s"],
                    [[k, *(str(v["counts"][c]) for c in ("passed", "failed", "error", "skipped")),
                      _f(v["test_seconds"], "{:.0f}")] for k, v in runs.items()
                     if v and "counts" in v])
    fails = [f for v in runs.values() if v and "failures" in v for f in v["failures"]]
    if fails:
        md.append(f"Failures ({len(fails)}; first error line):")
        md.append("")
        md += _md_table(["test", "first error line"],
                        [[f["test"], f["first_line"]] for f in fails[:40]])
    ops = [o for v in runs.values() if v and "opcheck" in v for o in v["opcheck"]]
    md += ["opcheck (from the pytest runs):", ""]
    md += _md_table(["test", "status"], [[o["test"], o["status"]] for o in ops])
    md += ["torch.compile and CUDA graphs:", ""]
    md += _md_table(["case", "status", "s", "detail"], _case_rows(_load(work, "integration")))
    md += ["Extension error paths:", ""]
    md += _md_table(["case", "status", "s", "detail"], _case_rows(_load(work, "errors")))

    # ---- stage 2
    md.append("## Stage 2: numbers")
    mm_name = mm_row.get("name", "matmul-?").split("-", 1)[1]
    md.append(f"Ceilings: copy {_f(copy_gbps, '{:.4g}')} GB/s (read + write), {mm_name} matmul "
              f"{_f(mm, '{:.4g}')} TFLOP/s.")
    md.append("")
    lay = _load(work, "layers")
    lrows = _rows(lay)
    provs = [p for p in (lay or {}).get("meta", {}).get("providers", []) if p != "eager"]
    head = ["layer", "mode"] + [f"{p} / eager" for p in provs] + ["eager ms"] + \
        [f"{p} ms" for p in provs] + ["rate (eager, " + ", ".join(provs) + ")", "errors"]
    table, skipped = [], {}
    for r in lrows:
        if r.get("status") == "skipped":
            table.append([r.get("name"), "-", *["-"] * (2 * len(provs) + 1), "-",
                          r.get("reason", "")])
            continue
        ratio, ms = r.get("ratio_vs_eager", {}), r.get("ms", {})
        interval = r.get("ratio_interval", {})
        if "tflops" in r:
            rate = " / ".join(_f(r["tflops"].get(p), "{:.3g}")
                              for p in ["eager"] + provs) + " TFLOP/s"
        else:
            g = r.get("gbps", {})
            rate = " / ".join(_f(g.get(p), "{:.3g}") for p in ["eager"] + provs) + " GB/s"
            if copy_gbps and g:
                rate += " (best " + _f(100 * max(g.values()) / copy_gbps, "{:.0f}") + "% of copy)"
        table.append([r.get("layer"), r.get("mode"),
                      *(_ratio(ratio.get(p), interval.get(p)) for p in provs),
                      _f(ms.get("eager"), "{:.3f}"), *(_f(ms.get(p), "{:.3f}") for p in provs),
                      rate, "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items()
                                      if not str(v).startswith("skipped"))[:200]])
        for k, v in r.get("errors", {}).items():
            if str(v).startswith("skipped"):
                skipped.setdefault(k, v)
    meta = (lay or {}).get("meta", {})
    md.append(f"Per layer, batch {meta.get('batch', '?')}, {meta.get('dtype', '?')}, "
              f"{meta.get('layout', '?')}: ratio eager / backend (above 1: faster than torch), "
              "[interquartile interval of the per-round ratios], ? = not significant or wide:")
    md.append("")
    md += _md_table(head, table)
    md += [f"Not run: {k} ({v})" for k, v in skipped.items()] + ([""] if skipped else [])
    steps_doc = _load(work, "steps")
    srows = _rows(steps_doc)
    sm = (steps_doc or {}).get("meta", {})
    md.append(f"Training steps, batch {sm.get('batch', '?')}, AMP {sm.get('amp') or 'off'}, "
              f"{sm.get('layout', '?')}: ratio to stock eager (above 1 is faster):")
    md.append("")
    variants = ["converted", "stock-compiled", "converted-compiled"]
    md += _md_table(["model", "run"] + [f"{v} / eager" for v in variants] + ["ms (stock, others)",
                                                                            "error"],
                    [[r.get("model"), r.get("name", "").split(":")[-1],
                      *(_ratio(r.get("ratio_vs_stock_eager", {}).get(v),
                               (r.get("paired_ratio", {}).get(v) or [None])[1:]
                               if v == "converted" else None) for v in variants),
                      " / ".join(f"{k} {_f(v, '{:.2f}')}" for k, v in r.get("ms", {}).items()),
                      r.get("error") or r.get("reason") or ""] for r in srows])
    ran = [(r.get("model"), r["layers_summary"]) for r in srows if r.get("layers_summary")]
    if ran:
        md.append("What each converted model's layers ran in training (`auto`'s choices; "
                  "per-pass convs in parentheses: forward, grad_input, grad_weight; per "
                  "layer in steps.json `layers_ran`):")
        md.append("")
        md += [f"- {model}: {summary}" for model, summary in ran]
        md.append("")

    # ---- stage 3
    md.append("## Stage 3: memcheck and tuning")
    md += _md_table(["case", "status", "s", "detail"],
                    _case_rows(_load(work, "memcheck")) + _case_rows(_load(work, "tune")))
    summary = {"stages": st, "pytest": {k: (v or {}).get("counts") for k, v in runs.items()},
               "failures": fails[:100], "budget_s": budget, "elapsed_s": elapsed,
               "device": dev.get("device_name"), "commit": ver.get("commit")}
    return "\n".join(md) + "\n", summary


def _write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pack(work: Path, out: Path, budget: float, elapsed: float) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    report, summary = build_report(work, budget, elapsed)
    files = {"REPORT.md": report, "summary.json": json.dumps(summary, indent=1) + "\n"}
    groups = {"preflight.json": ["preflight", "extension"],
              "correctness.json": ["integration", "errors"],
              "numbers.json": ["peaks", "layers", "steps"],
              "stage3.json": ["memcheck", "tune"]}
    for fname, names in groups.items():
        doc = {n: _load(work, n) for n in names}
        if fname == "correctness.json":
            doc["pytest"] = {p.stem: junit(p) for p in sorted(work.glob("junit-*.xml"))}
        files[fname] = json.dumps(doc, indent=1, default=str) + "\n"
    tuned = sorted((work / "tune-cache" / "autotune").glob("*.json"))
    if tuned:
        files["tuned_configs.json"] = json.dumps(
            {p.stem: json.loads(p.read_text()) for p in tuned}, indent=1) + "\n"
    for name, text in files.items():
        _write(out / name, text)
    tmp = out / ".logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            # build trees and the tuning cache's locks stay behind; logs, JSON, XML travel
            if p.is_file() and "build-" not in str(p.relative_to(work)) and \
                    p.suffix in (".log", ".json", ".xml", ".tsv", ".env", ".txt", ".py"):
                tar.add(p, arcname=str(p.relative_to(work)))
    os.replace(tmp, out / "logs.tar.gz")
    kept = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if len(kept) > MAX_FILES:
        raise SystemExit(f"pack: {len(kept)} files in {out}, more than {MAX_FILES}: {kept}")
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--elapsed", type=float, default=0)
    a = p.parse_args()
    kept = pack(Path(a.work), Path(a.out), a.budget, a.elapsed)
    print(f"packed {len(kept)} files into {a.out}: {' '.join(kept)}")


if __name__ == "__main__":
    main()
