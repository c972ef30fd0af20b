"""The benchmark suites (benchmarks/), the report script and the GPU driver script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastconv import models
from fastconv.tools import results
from fastconv.tools.flops import count
from support import png_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import layers as L  # noqa: E402


def _shapes(model, op):
    return [(l.in_shape, l.out_shape) for l in L.trace(model) if l.op == op]


def test_alexnet_layers_match_models_md():
    convs = [l for l in L.trace("alexnet") if l.op == "conv2d_relu"]
    assert [l.out_shape for l in convs] == [(96, 54, 54), (256, 26, 26), (384, 12, 12),
                                            (384, 12, 12), (256, 12, 12)]
    assert [l.kw["kernel"] for l in convs] == [(11, 11), (5, 5), (3, 3), (3, 3), (3, 3)]
    assert convs[0].kw["stride"] == (4, 4) and convs[0].kw["padding"] == (1, 1)
    assert all(l.kw["relu"] for l in convs)            # every AlexNet conv absorbs its ReLU
    assert [l.first for l in convs] == [True, False, False, False, False]
    assert [o for _, o in _shapes("alexnet", "max_pool2d")] == [(96, 26, 26), (256, 12, 12),
                                                                (256, 5, 5)]
    assert all(l.key for l in L.layers(["alexnet"], "all"))


def test_every_model_is_traced():
    counts = {m: {op: len(_shapes(m, op)) for op in L.OPS} for m in models.MODELS}
    assert counts["vgg11"]["conv2d_relu"] == 8 and counts["vgg11"]["max_pool2d"] == 5
    assert _shapes("vgg11", "max_pool2d")[-1][1] == (512, 7, 7)
    assert counts["vgg16_bn"]["conv2d_relu"] == 13 and counts["vgg16_bn"]["batch_norm"] == 13
    assert all(l.kw["relu"] for l in L.trace("vgg16_bn") if l.op == "batch_norm")
    assert not any(l.kw["relu"] for l in L.trace("vgg16_bn") if l.op == "conv2d_relu")
    assert counts["nin"] == dict(conv2d_relu=12, max_pool2d=3, avg_pool2d=0,
                                 adaptive_avg_pool2d=1, batch_norm=0)
    assert counts["googlenet"]["conv2d_relu"] == 3 + 9 * 6
    # stem conv + 16 block convs + 3 strided 1x1 shortcuts; BN after the stem and block convs
    assert counts["resnet18"]["conv2d_relu"] == 20 and counts["resnet18"]["batch_norm"] == 17
    assert counts["lenet"]["avg_pool2d"] == 2 and counts["lenet_bn"]["batch_norm"] == 2
    everything = L.layers(which="all")
    key = L.layers()
    assert 0 < len(key) < len(everything)
    assert len({l.id for l in everything}) == len(everything)  # ids are unique
    assert sum(len(l.where) for l in everything) == sum(len(L.trace(m)) for m in models.MODELS)
    for m in models.MODELS:  # each network keeps at least its first conv in the key set
        assert any(l.key and l.op == "conv2d_relu" and any(w.startswith(m + ":")
                                                           for w in l.where) for l in key)


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "resnet18"])
def test_conv_flops_agree_with_the_model_count(name):
    model = models.build(name).eval()
    shape = models.INPUT_SIZES[name]
    total = count(model, torch.randn(1, *shape))
    linear = sum(2 * m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear))
    assert sum(l.flops(1, False) for l in L.trace(name)) + linear == total


def test_work_model():
    conv = L.trace("alexnet")[0]
    assert conv.flops(2, False) == 2 * 2 * 96 * 54 * 54 * 1 * 11 * 11
    assert conv.flops(2, True) == 2 * conv.flops(2, False)       # first layer: no input grad
    conv3 = L.trace("alexnet")[2]
    assert conv3.flops(1, True) == 3 * conv3.flops(1, False)
    pool = L.trace("alexnet")[1]
    n_in, n_out = 96 * 54 * 54, 96 * 26 * 26
    assert pool.bytes(1, 4, False) == 4 * (n_in + n_out)
    assert pool.bytes(1, 2, True) == 2 * 2 * (n_in + n_out)
    bn = [l for l in L.trace("resnet18") if l.op == "batch_norm"][0]
    n = 64 * 48 * 48
    assert bn.bytes(1, 4, True) == 4 * 5 * n


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_suites_run_and_report(tmp_path):
    out = tmp_path / "suite.json"
    rows_path = tmp_path / "suite.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_layers.py", "benchmarks/test_models.py",
         "--fc-device", "cpu", "--fc-models", "lenet", "--fc-providers", "eager,compile,fc_torch",
         "--fc-rounds", "2", "--fc-results", str(rows_path),
         "--benchmark-json", str(out), "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "torch.compile off on CPU by default" in proc.stdout
    data = json.loads(out.read_text())
    assert data["fastconv"]["batch"] == 2 and data["fastconv"]["dtype"] == "float32"
    runs = {(b["extra_info"]["case"], b["extra_info"]["mode"], b["extra_info"]["provider"]): b
            for b in data["benchmarks"]}
    lenet_layers = [l.id for l in L.layers(["lenet"], "key")]
    assert len(lenet_layers) == 3  # first conv, heaviest conv (the second), first pool
    expected = {(c, m, p) for c in lenet_layers for m in ("fwd", "fwdbwd")
                for p in ("eager", "fc_torch")} | {("lenet", "train", p)
                                                   for p in ("eager", "fc_torch")}
    assert set(runs) == expected
    rows = {(r["case"], r["mode"], r["provider"]): r for r in results.load(rows_path)}
    assert set(rows) == expected  # the results file holds the same cells
    for (case, mode, provider), b in runs.items():
        ei = b["extra_info"]
        for key in ("device_name", "torch", "triton", "dtype", "layout", "commit"):
            assert key in ei and rows[(case, mode, provider)][key] == ei[key]
        # pytest-benchmark recorded exactly the shared timer's samples (2 rounds x 1 sample)
        sec = ei["seconds"]
        assert b["stats"]["rounds"] == sec["n"] == 2 and ei["iterations"] >= 1
        assert b["stats"]["median"] == pytest.approx(sec["median"], rel=1e-9)
        assert b["stats"]["min"] == pytest.approx(sec["min"], rel=1e-9)
        assert rows[(case, mode, provider)]["seconds"] == sec
        if ei["op"] == "conv2d_relu" or ei["kind"] == "model":
            assert ei["flops"] > 0
        else:
            assert ei["bytes"] > 0
        if provider == "eager":
            assert "vs_eager" not in ei
        else:  # timed in alternation with eager: a ratio with its spread
            v = ei["vs_eager"]
            assert v["low"] <= v["ratio"] <= v["high"]
            assert v["significant"] == (v["low"] > 1.0 or v["high"] < 1.0)
            if ei["kind"] == "layer":
                assert ei["rel_err_vs_eager"] < 1e-5

    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(dict(kind="fastconv-bench", meta=dict(
        model="alexnet", batch=128, device_name="Test GPU", dtype="bfloat16",
        layout="channels_last"), rows=[
        dict(variant="stock", train_ms=10.0, train_ex_s=12800.0, infer_ms=4.0, infer_ex_s=32000.0),
        dict(variant="triton", train_ms=8.0, train_ex_s=16000.0, infer_ms=5.0,
             infer_ex_s=25600.0)])))
    report_dir = tmp_path / "report"
    proc = subprocess.run([sys.executable, "scripts/bench_report.py", str(rows_path),
                           str(bench_json), "--out", str(report_dir)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (report_dir / "report.md").read_text()
    assert "## layer | " in md and "## model | " in md and "## fastconv bench | Test GPU" in md
    case = lenet_layers[0]
    row = [l for l in md.splitlines() if l.startswith(f"| {case} | fwd |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("1.00x") and "FLOP/s" in cells[3]   # eager against itself
    v = rows[(case, "fwd", "fc_torch")]["vs_eager"]
    mark = ("" if v["significant"] else "?") + ("~" if v["wide"] else "")
    assert cells[4].startswith(f"{v['ratio']:.2f}x [{v['low']:.2f}-{v['high']:.2f}]{mark} ")
    assert "| alexnet | train | 10.000 | 1.00x 12800.0 ex/s | 1.25x 16000.0 ex/s |" in md
    assert "| **geomean** | infer | | **1.00x** (1) | **0.80x** (1) |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stderr
    else:
        for png in ("speedup.png", "summary.png"):
            assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _memory_rows(path):
    meta = dict(device="cuda:0", device_name="Test GPU", dtype="float32", layout="nchw",
                batch=8, torch="2.x", commit="abc")
    saved = {"eager": 4 << 20, "fc_torch": 3 << 20, "fc_triton": 2 << 20}
    rows = [results.row(meta, kind="memory", case="alexnet", mode="train", provider=p,
                        seconds=dict(median=0.01, min=0.01, max=0.01, q1=0.01, q3=0.01, n=1,
                                     rounds=[0.01]),
                        saved_bytes=b, peak_bytes=2 * b) for p, b in saved.items()]
    assert results.append(path, rows[:1]) == 1
    assert results.append(path, rows[1:]) == 2  # appending keeps what was there
    return saved


def test_report_renders_memory_rows(tmp_path):
    path = tmp_path / "mem.jsonl"
    saved = _memory_rows(path)
    assert [r["provider"] for r in results.load(path)] == list(saved)
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "scripts/bench_report.py", str(path), "--out",
                           str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "## memory | Test GPU | float32 | nchw | batch 8" in md
    assert ("| alexnet | saved 4.00 MiB (1.00x), peak 8.00 MiB (1.00x) | "
            "saved 2.00 MiB (0.50x), peak 4.00 MiB (0.50x) | "
            "saved 3.00 MiB (0.75x), peak 6.00 MiB (0.75x) |") in md
    pytest.importorskip("matplotlib")
    png = (out / "memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = json.loads(png_text(png)["Description"])
    assert drawn == {"series": ["torch eager", "fastconv[triton]", "fastconv[torch]"],
                     "cases": 1}


def test_fc_models_selects_exactly_those_models():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--fc-device", "cpu", "--fc-models",
         "lenet", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ids = [l for l in proc.stdout.splitlines() if "::" in l]
    layer_ids = {c.id for c in L.layers(["lenet"], "key")}
    assert all(l.where and all(w.startswith("lenet:") for w in l.where)
               for l in L.layers(["lenet"], "key"))
    n_prov, n_modes = 6, 2  # eager, compile, fc_auto, fc_triton, fc_extension, fc_torch
    assert len(ids) == len(layer_ids) * n_modes * n_prov + 2 * n_prov  # + models + memory
    for i in ids:
        param = i.split("[", 1)[1]
        assert param.startswith("lenet") and "googlenet" not in i and "lenet_bn" not in i


def test_report_rejects_foreign_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    proc = subprocess.run([sys.executable, "scripts/bench_report.py", str(bad), "--out",
                           str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "neither a results file" in proc.stderr


def test_sweep_breakdown_peaks_and_rows(tmp_path):
    """The layer sweep (benchmarks/sweep.py) on CPU: traced layers, providers in alternation,
    backward breakdown, rates against measured ceilings, rows appended to the results file."""
    rows_path = tmp_path / "sweep.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep", "--device", "cpu", "--models", "lenet",
         "--layers", "key", "--providers", "eager,fc_torch", "--breakdown", "--rounds", "2",
         "--sample-seconds", "0.005", "--peaks", "--results", str(rows_path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "ceilings on cpu: matmul fp32" in proc.stdout
    rows = results.load(rows_path)
    peaks = [r for r in rows if r["kind"] == "peaks"]
    assert len(peaks) == 1 and peaks[0]["copy_gbs"] > 0 and peaks[0]["matmul_tflops"]["fp32"] > 0
    cells = {(r["case"], r["mode"], r["provider"]): r for r in rows if r["kind"] == "sweep"}
    want = set()
    for layer in L.layers(["lenet"], "key"):
        modes = ["fwd", "fwdbwd", "bwd"]
        if layer.op == "conv2d_relu":
            modes += ["bwd_weight"] if layer.first else ["bwd_input", "bwd_weight"]
        want |= {(layer.id, m, p) for m in modes for p in ("eager", "fc_torch")}
    assert set(cells) == want
    for (case, mode, provider), r in cells.items():
        assert r["seconds"]["median"] > 0 and 0 < r["pct_of_peak"]
        assert (r["flops"] > 0) == (r["op"] == "conv2d_relu") and (r["bytes"] > 0) != (
            r["op"] == "conv2d_relu")
        assert ("vs_eager" in r) == (provider == "fc_torch")
    conv = next(l for l in L.layers(["lenet"], "key") if l.op == "conv2d_relu" and not l.first)
    fwd = conv.flops(2, False)
    assert cells[(conv.id, "bwd", "eager")]["flops"] == 2 * fwd
    assert cells[(conv.id, "bwd_input", "eager")]["flops"] == fwd


def test_sweep_tune_merges_tables(tmp_path):
    """--tune's last step: the fresh cache's tuning tables merged into the shipped ones
    (existing entries kept, re-tuned keys replaced, new tables created)."""
    from benchmarks.sweep import merge_tuned

    cache = tmp_path / "cache" / "autotune"
    cache.mkdir(parents=True)
    cfg = lambda m: {"config": {"BLOCK_M": m}, "ms": 1.0}  # noqa: E731
    (cache / "conv2d_relu.json").write_text(json.dumps(
        {"format": 1, "entries": {"H200|sm90": {"k1": cfg(128), "k3": cfg(32)}}}))
    (cache / "pool.json").write_text(json.dumps({"format": 1, "entries": {"H200|sm90": {
        "p": cfg(8)}}}))
    out = tmp_path / "shipped"
    out.mkdir()
    (out / "conv2d_relu_configs.json").write_text(json.dumps({"format": 1, "entries": {
        "H200|sm90": {"k1": cfg(64), "k2": cfg(16)}, "H100|sm90": {"k1": cfg(256)}}}))
    written = merge_tuned(tmp_path / "cache", out)
    assert sorted(p.name for p in written) == ["conv2d_relu_configs.json", "pool_configs.json"]
    conv = json.loads((out / "conv2d_relu_configs.json").read_text())
    assert conv["entries"] == {"H200|sm90": {"k1": cfg(128), "k2": cfg(16), "k3": cfg(32)},
                               "H100|sm90": {"k1": cfg(256)}}
    assert json.loads((out / "pool_configs.json").read_text())["entries"] == {
        "H200|sm90": {"p": cfg(8)}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_suites_on_cuda(tmp_path):
    """Every provider that can run does, on the GPU, with device-synchronised timing."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_layers.py", "benchmarks/test_models.py",
         "--fc-models", "lenet_bn", "--fc-batch", "32", "--fc-compile", "off",
         "--fc-dtype", "bfloat16", "--fc-layout", "channels_last", "--fc-rounds", "2",
         "--benchmark-json", str(out), "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["fastconv"]["device"].startswith("cuda")
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert {"eager", "fc_torch"} <= providers
    for b in data["benchmarks"]:
        assert b["extra_info"]["dtype"] == "bfloat16" and b["stats"]["median"] > 0
