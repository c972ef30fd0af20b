"""fastconv bench: the check against stock and float64, timing rows, JSON, options."""
from __future__ import annotations

import json

import pytest
import torch

from fastconv import cli, dispatch


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
    assert rows["torch"]["train_ratio"] == pytest.approx(rows["stock"]["train_ms"]
                                                         / rows["torch"]["train_ms"])
    assert "variant" in out and "ok" in out and "fp64 err" in out


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


@pytest.mark.slow
def test_compile_variant_on_cpu(capsys, tmp_path):
    path = tmp_path / "b.json"
    rc, out, err = _bench(capsys, "--model", "lenet", "--batch", 4, "--backends", "torch",
                          "--compile", "--rounds", 1, "--json", path)
    assert rc == 0, out + err
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert "compile" in rows and rows["compile"]["train_ms"] > 0
    assert rows["compile"]["check"] == "-"


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
