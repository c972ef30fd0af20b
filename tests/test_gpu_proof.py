"""scripts/gpu_proof.sh on the CPU: the plan fits its budget and names every stage, the smoke
runs every stage's entry point end to end (a typo, a missing import or a wrong path fails
here, not in the one GPU call), and a run stopped early keeps every stage it finished, in at
most 8 files (what the device tool returns)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_proof.sh"
STAGES = ("preflight", "ext", "peaks", "tests-triton", "tests-cuda", "integration", "errors",
          "layers", "steps", "memcheck", "tune")


def _env() -> dict:
    return dict(os.environ, PYTHON=sys.executable,
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _plan(budget: int) -> tuple[dict, int, str]:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--budget", str(budget)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"([\w-]+)\s+(\d+)\s+(\d+)\b", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    total = re.search(r"total (\d+)s <= budget (\d+)s", proc.stdout)
    assert total, proc.stdout
    assert int(total.group(2)) == budget
    return rows, int(total.group(1)), proc.stdout


def test_dry_run_lists_every_stage_within_the_budget():
    for budget in (420, 600, 200, 60):
        rows, total, text = _plan(budget)
        assert set(rows) == set(STAGES) | {"pack"}, text
        assert total <= budget, text
        deadlines = [rows[s][1] for s in STAGES if s != "ext"]
        assert deadlines == sorted(deadlines), text  # stages end in plan order
        assert max(d for _, d in rows.values()) <= budget, text
        assert rows["pack"][1] == budget
        # the background build must be done when the tests that need it start
        assert rows["ext"][1] <= rows["tests-triton"][1], text
    rows, total, _ = _plan(420)
    assert total == 420 and all(rows[s][0] >= 10 for s in STAGES if s not in ("memcheck", "tune"))


def test_bad_arguments_exit_2_with_one_line():
    for args in (["--budget", "abc", "out"], ["--budget", "0", "out"], [], ["--nope", "out"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def _summary(out: Path) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert "REPORT.md" in files and "logs.tar.gz" in files, files
    return json.loads((out / "summary.json").read_text())


def test_cpu_smoke_runs_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke", "--work", str(work)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    print(f"--cpu-smoke took {elapsed:.0f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(out)
    ran = {s["stage"]: s["rc"] for s in summary["stages"]}
    assert set(ran) == set(STAGES), ran
    assert all(rc == "0" for rc in ran.values()), ran  # every entry point ran and exited 0
    report = (out / "REPORT.md").read_text()
    for head in ("## Stages", "## Stage 1", "## Stage 2", "## Stage 3"):
        assert head in report
    # each stage wrote its rows; the smoke's layer and step timings are real measurements
    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["layers"]["rows"] and numbers["steps"]["rows"]
    assert all(r["ms"]["eager"] > 0 for r in numbers["layers"]["rows"])
    # what the converted model's layers ran in training (auto's choices), for the report
    eager = [r for r in numbers["steps"]["rows"] if r["name"] == "lenet:eager"]
    assert eager and {r[1] for r in eager[0]["layers_ran"]} == {"conv2d_relu", "avg_pool2d"}, \
        eager
    assert len(eager[0]["layers_ran"]) == 4 and all(r[2] for r in eager[0]["layers_ran"])
    assert f"- lenet: {eager[0]['layers_summary']}" in report
    pre = json.loads((out / "preflight.json").read_text())
    assert [r["name"] for r in pre["preflight"]["rows"]][:2] == ["versions", "device"]
    assert all(r["status"] == "passed" for r in pre["preflight"]["rows"])
    corr = json.loads((out / "correctness.json").read_text())
    integration = {r["name"]: r["status"] for r in corr["integration"]["rows"]}
    assert integration["compile-train-step[lenet-torch]"] == "passed", integration
    assert corr["errors"]["rows"][0] == {**corr["errors"]["rows"][0], "name": "torch_error",
                                         "status": "passed"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"{s}.log" for s in STAGES} <= names, names


def test_small_budget_keeps_finished_stages(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke", "--budget", "35",
                           "--work", str(tmp_path / "w")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    summary = _summary(out)
    ran = {s["stage"]: s for s in summary["stages"]}
    assert set(ran) == set(STAGES), ran
    assert ran["preflight"]["rc"] == "0", proc.stderr[-3000:]
    late = [ran[s] for s in ("layers", "steps", "memcheck", "tune")]
    # skipped for the budget, or (on a fast machine) started and either cut at their deadline
    # or done within it (memcheck's CPU smoke run can finish in under a second)
    assert all((s["rc"] == "-" and "budget" in s["note"]) or s["rc"] == "124"
               or (s["rc"] == "0" and float(s["seconds"]) <= float(s["limit"]))
               for s in late), late
    assert any(s["rc"] in ("-", "124") for s in late), late  # the budget stopped something
    assert summary["elapsed_s"] <= 35 + 5
    pre = json.loads((out / "preflight.json").read_text())["preflight"]
    assert pre["done"] and pre["rows"]


def test_signal_mid_run_packs_what_finished(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "--cpu-smoke",
                             "--work", str(tmp_path / "w")], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until the first stage has been packed
            if (out / "summary.json").exists():
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    summary = _summary(out)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["preflight"]["rc"] == "0"
    assert any("stopped by a signal" in s["note"] for s in summary["stages"]), summary["stages"]
    assert json.loads((out / "preflight.json").read_text())["preflight"]["rows"]
