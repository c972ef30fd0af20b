"""fastconv bench: the check against stock and float64, timing rows, JSON, options."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from fastconv import cli, dispatch
from support import png_text


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _bench(capsys, *args):
    rc = cli.main(["bench", "--device", "cpu", "--rounds", "2", "--steps", "2", "--warmup", "1",
                   *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_rows_check_and_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc, out, err = _bench(capsys, "--model", "lenet_bn", "--batch", 8, "--backends", "torch",
                          "--inputs", 2, "--json", path)
    assert rc == 0, out + err
    assert "compile skipped: off by default on CPU" in err and "round 2/2 done" in err
    data = json.loads(path.read_text())
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "commit", "dtype", "layout", "batch"):
        assert key in meta
    assert (meta["model"], meta["batch"], meta["dtype"], meta["layout"]) == (
        "lenet_bn", 8, "float32", "nchw")
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"stock", "torch"}
    assert rows["stock"]["check"] == "ref" and rows["torch"]["check"] == "ok"
    # same torch ops on the same batch: bit-identical to stock
    assert rows["torch"]["out_rel_err"] == 0.0 and rows["torch"]["grad_rel_err"] == 0.0
    # float32 against float64: a few unit roundoffs, not zero
    assert 0 < rows["stock"]["out_err_fp64"] < 1e-5 and 0 < rows["stock"]["grad_err_fp64"] < 1e-4
    for r in rows.values():
        assert len(r["train_times_ms"]) == len(r["infer_times_ms"]) == 4
        assert r["train_ms"] > 0 and r["infer_ms"] > 0
        assert r["train_ex_s"] == pytest.approx(8 / (r["train_ms"] / 1e3))
    assert rows["stock"]["train_ratio"] == 1.0
    # the ratio pairs the rounds that ran side by side: median of per-round ratios
    per_round = [[statistics.median(r["train_times_ms"][i:i + 2]) for i in (0, 2)]
                 for r in (rows["stock"], rows["torch"])]
    paired = [a / b for a, b in zip(*per_round)]
    assert rows["torch"]["train_ratio"] == pytest.approx(statistics.median(paired), rel=1e-3)
    assert rows["torch"]["train_ratio_low"] == pytest.approx(min(paired) * 0.75
                                                             + max(paired) * 0.25, rel=1e-3)
    assert "variant" in out and "ok" in out and "fp64 err" in out
    for r in rows.values():  # spread next to each median, from the same samples
        for mode in ("train", "infer"):
            ts = sorted(r[f"{mode}_times_ms"])
            assert ts[0] == pytest.approx(r[f"{mode}_min_ms"], abs=1e-4)
            assert r[f"{mode}_min_ms"] <= r[f"{mode}_q1_ms"] <= r[f"{mode}_ms"] \
                <= r[f"{mode}_q3_ms"] <= r[f"{mode}_max_ms"]
    t = rows["torch"]
    assert t["train_ratio_low"] <= t["train_ratio"] <= t["train_ratio_high"]
    if t["train_ratio_low"] <= 1.0 <= t["train_ratio_high"]:
        assert "not significant" in t["train_flag"] and "torch train: not significant" in out
    stock_line = [l for l in out.splitlines() if l.startswith("stock ")][0]
    assert f"{rows['stock']['train_ms']:.2f} [{rows['stock']['train_q1_ms']:.2f}-" in stock_line
    # which implementation each converted layer ran, asked of dispatch
    for mode in ("train", "infer"):
        assert f"torch {mode} layers ran: conv2d_relu x2 on torch, batch_norm x2 on torch, " \
               "avg_pool2d x2 on torch" in out
        assert [tuple(x) for x in t["layers"][mode]][:2] == [("0", "conv2d_relu", "torch"),
                                                             ("1", "batch_norm", "torch")]


def test_a_wrong_kernel_fails_the_check(capsys, monkeypatch):
    torch_backend = dispatch.BACKENDS["torch"]
    right = type(torch_backend).conv2d_relu

    def off_by_a_little(input, *args):  # 1e-4 relative: far above fp32 rounding
        return right(torch_backend, input, *args) * (1 + 1e-4)

    monkeypatch.setattr(torch_backend, "conv2d_relu", off_by_a_little)
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 4, "--backends", "torch",
                          "--mode", "infer", "--rounds", 1)
    assert rc == 1
    assert "FAIL" in out and "CHECK FAILED for torch" in out
    assert "train ms" not in out and "infer ms" in out


def test_bfloat16_autocast_channels_last(capsys, tmp_path):
    path = tmp_path / "b.json"
    rc, out, err = _bench(capsys, "--model", "lenet", "--model-arg", "variant=relu",
                          "--batch", 4, "--backends", "torch", "--dtype", "bfloat16",
                          "--channels-last", "--json", path)
    assert rc == 0, out + err
    data = json.loads(path.read_text())
    assert data["meta"]["layout"] == "channels_last" and data["meta"]["dtype"] == "bfloat16"
    stock = data["rows"][0]
    # bf16 keeps 8 bits: errors against float64 are ~2^-8, not float32's ~1e-7
    assert 1e-4 < stock["out_err_fp64"] < 0.05
    assert data["rows"][1]["check"] == "ok"


def test_bad_options_are_clear(capsys):
    # one error line each, exit code 2 (the full table is tests/test_cli_errors.py)
    for args, message in ((("--backends", "cuda-magic"), "'cuda-magic' is not a fastconv backend"),
                          (("--model-arg", "narrow"), "KEY=VALUE"),
                          (("--model-arg", "narrow=true"), "lenet does not take 'narrow'")):
        rc, out, err = _bench(capsys, "--model", "lenet", *args)
        assert rc == 2 and message in err and "Traceback" not in err + out, err


def test_plot_and_results_file(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from fastconv.tools import results

    png, rows_path = tmp_path / "ratios.png", tmp_path / "r.jsonl"
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 4, "--backends", "torch",
                          "--no-check", "--plot", png, "--results", rows_path)
    assert rc == 0, out + err
    data = png.read_bytes()
    drawn = json.loads(png_text(data)["Description"])
    assert [s["mode"] for s in drawn["series"]] == ["train", "infer"]  # one series per mode
    assert drawn["variants"] == ["stock", "torch"]
    assert all(len(s["ratios"]) == 2 and s["ratios"][0] == 1.0 for s in drawn["series"])
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rows = results.load(rows_path)
    assert {(r["kind"], r["case"], r["mode"], r["provider"]) for r in rows} == {
        ("bench", "lenet", m, p) for m in ("train", "infer") for p in ("eager", "fc_torch")}
    for r in rows:
        assert r["seconds"]["n"] == 4 and r["batch"] == 4 and "commit" in r
        assert ("vs_eager" in r) == (r["provider"] != "eager")
    # appending a second run keeps the first
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 4, "--backends", "torch",
                          "--no-check", "--mode", "infer", "--results", rows_path)
    assert rc == 0 and len(results.load(rows_path)) == len(rows) + 2


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 2, "--backends", "torch",
                          "--no-check", "--mode", "infer", "--rounds", 1, "--plot",
                          tmp_path / "x.png")
    assert rc != 0 and "--plot needs matplotlib" in err and "Traceback" not in err


@pytest.mark.slow
def test_compile_variant_on_cpu(capsys, tmp_path):
    path = tmp_path / "b.json"
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 4, "--backends", "torch",
                          "--compile", "--rounds", 1, "--json", path)
    assert rc == 0, out + err
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert "compile" in rows and rows["compile"]["train_ms"] > 0
    assert rows["compile"]["check"] == "-"
    # the converted model under torch.compile too
    assert rows["torch+compile"]["train_ms"] > 0 and rows["torch+compile"]["check"] == "-"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,layout", [("float32", []), ("bfloat16", ["--channels-last"])])
def test_every_gpu_backend_passes_the_check(capsys, tmp_path, dtype, layout):
    path = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", "resnet18", "--device", "cuda", "--batch", "16",
                   "--rounds", "1", "--steps", "2", "--no-compile", "--dtype", dtype, *layout,
                   "--json", str(path)])
    out = capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert "torch" in rows and len(rows) >= 2
    assert all(r["check"] == "ok" for n, r in rows.items() if n != "stock"), out
    assert rc == 0, out


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_variant_on_gpu(capsys, tmp_path):
    path = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", "lenet", "--device", "cuda", "--batch", "32",
                   "--backends", "torch", "--rounds", "1", "--steps", "2", "--json", str(path)])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    skipped = json.loads(path.read_text())["skipped"]
    assert "compile" in rows or "compile" in skipped
