"""The command line: info, models, bench."""
import json
import subprocess
import sys

from fastconv import cli


def test_info_lists_every_backend_with_a_reason(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "extension"):
        assert f"  {name}" in out
    assert "torch    " in out and "backends:" in out


def test_models_lists_parameters_and_flops(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {l.split()[0]: l.split() for l in out.splitlines()[1:]}
    assert set(lines) == {"alexnet", "vgg11", "vgg16_bn", "nin", "googlenet", "lenet",
                          "lenet_bn", "resnet18"}
    # AlexNet (1 channel, 10 classes): 46,764,746 parameters, ~0.94 GMAC = ~1.87 GFLOP
    assert lines["alexnet"][2] == "46,764,746"
    assert 1.8 < float(lines["alexnet"][3]) < 1.95


def test_bench_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "lenet", "--batch", "4", "--rounds", "1",
                     "--steps", "1", "--backends", "torch", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stock" in out and "torch" in out
    data = json.loads(path.read_text())
    assert data["meta"]["model"] == "lenet"
    torch_row = [r for r in data["rows"] if r["variant"] == "torch"][0]
    assert torch_row["out_rel_err"] < 1e-6 and torch_row["grad_rel_err"] < 1e-6


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fastconv", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "bench" in proc.stdout
