"""fastconv train: d2l's loop, its printout, data sets, AMP/channels_last, checkpoints."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch

from fastconv import cli, models
from fastconv.tools.common import xavier_init
from fastconv.tools.progress import Progress

from support import fake_fashion

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss (\d+\.\d{3}), train acc (\d\.\d{3}), "
                        r"test acc (\d\.\d{3}), (\d+\.\d) examples/sec on cpu")


def _train(capsys, *args):
    rc = cli.main(["train", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_digits_training_learns_and_prints_like_d2l(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits data set")
    hist = tmp_path / "h.json"
    rc, out, err = _train(capsys, "--model", "lenet", "--model-arg", "variant=relu",
                          "--data", "digits", "--epochs", 3, "--batch-size", 64, "--lr", 0.3,
                          "--backend", "torch", "--json", hist)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("training lenet on digits (1438 train, 359 test, 1x28x28), "
                               "converted (backend torch)")
    epochs = [EPOCH_LINE.match(l) for l in lines if l.startswith("epoch ")]
    assert len(epochs) == 3 and all(epochs), lines
    # d2l's closing two lines
    assert re.match(r"^loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}$", lines[-2])
    assert re.match(r"^\d+\.\d examples/sec on cpu$", lines[-1])
    assert "epoch 1/3 [" in err  # the progress bar
    history = json.loads(hist.read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["examples"] == 1438 for h in history)
    # it learns: chance is 10%, and the loss falls from ln(10) = 2.30
    assert history[-1]["loss"] < history[0]["loss"] < 2.35
    assert history[-1]["test_acc"] > 0.3 and history[-1]["train_acc"] > 0.3


def _vgg_args(*extra):
    # narrow VGG-11 at 32x32: conv, pool, dropout and Linear layers, quick on CPU
    return ["--model", "vgg11", "--model-arg", "narrow=true", "--image-size", 32, "--data",
            "synthetic", "--synthetic-size", 96, "--batch-size", 32, "--lr", 0.05,
            "--backend", "torch", "--no-progress", *extra]


def test_resume_continues_exactly(capsys, tmp_path):
    """Stopping mid-epoch and resuming gives bit-identical weights to an uninterrupted run
    (same batches, same dropout masks: the checkpoint carries the RNG state)."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    rc, out, err = _train(capsys, *_vgg_args("--epochs", 2, "--save", a))
    assert rc == 0, err
    rc, out, err = _train(capsys, *_vgg_args("--epochs", 2, "--max-steps", 4, "--save", b))
    assert rc == 0, err
    assert "(stopped after batch 1/3)" in out
    state = torch.load(b, weights_only=True)
    assert (state["epoch"], state["next_batch"], state["steps"]) == (1, 1, 4)
    rc, out, err = _train(capsys, *_vgg_args("--epochs", 2, "--resume", b, "--save", b))
    assert rc == 0, err
    assert "resuming at epoch 2, batch 1" in out
    full, resumed = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert full["model"].keys() == resumed["model"].keys()
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert resumed["epoch"] == 2 and resumed["steps"] == 6
    # a stock torch.nn model loads the checkpoint as it is, and training moved the weights
    stock = models.vgg11(narrow=True, image_size=32)
    stock.load_state_dict(full["model"])
    torch.manual_seed(0)  # the tool's init: seed, build, Xavier-uniform
    init = xavier_init(models.vgg11(narrow=True, image_size=32)).state_dict()
    for k in ("0.0.weight", "6.weight"):
        assert init[k].shape == full["model"][k].shape
        assert not torch.equal(init[k], full["model"][k]), k


def test_resume_refuses_another_model(capsys, tmp_path):
    ck = tmp_path / "c.pt"
    rc, _, err = _train(capsys, *_vgg_args("--epochs", 1, "--max-steps", 1, "--save", ck))
    assert rc == 0, err
    rc, _, err = _train(capsys, *_vgg_args("--epochs", 1, "--resume", ck, "--image-size", 64))
    assert rc == 2 and "checkpoint has image_size=[32, 32]" in err
    rc, _, err = _train(capsys, *_vgg_args("--resume", tmp_path / "absent.pt"))
    assert rc == 2 and "no such file" in err


def test_fashion_mnist_from_idx_files_resized_for_alexnet(capsys, tmp_path):
    fake_fashion(tmp_path, n_train=8, n_test=4)
    rc, out, err = _train(capsys, "--model", "alexnet", "--data-dir", tmp_path, "--epochs", 1,
                          "--batch-size", 4, "--max-steps", 1, "--backend", "torch")
    assert rc == 0, err
    assert "training alexnet on fashion-mnist (8 train, 4 test, 1x224x224)" in out
    assert EPOCH_LINE.match([l for l in out.splitlines() if l.startswith("epoch 1/1")][0])


def test_missing_fashion_files_is_a_clear_error(capsys, tmp_path):
    rc, out, err = _train(capsys, "--model", "lenet", "--data-dir", tmp_path, "--epochs", 1)
    assert rc == 2
    assert "fastconv train: error: Fashion-MNIST: missing train-images-idx3-ubyte[.gz]" in err
    assert str(tmp_path) in err


def test_amp_channels_last_and_stock(capsys, tmp_path):
    hist = tmp_path / "h.json"
    rc, out, err = _train(capsys, "--model", "lenet_bn", "--data", "synthetic",
                          "--synthetic-size", 64, "--batch-size", 16, "--max-steps", 3,
                          "--epochs", 1, "--amp", "bfloat16", "--channels-last",
                          "--backend", "torch", "--json", hist)
    assert rc == 0, err
    assert "AMP bfloat16, channels_last" in out
    losses = json.loads(hist.read_text())["step_losses"]
    assert len(losses) == 3 and all(0 < l < 10 for l in losses)
    rc, out, err = _train(capsys, "--model", "lenet", "--data", "synthetic", "--synthetic-size",
                          32, "--batch-size", 16, "--epochs", 1, "--backend", "stock")
    assert rc == 0, err
    assert "stock torch.nn" in out


def test_progress_bar_on_a_log_and_on_a_terminal():
    log = io.StringIO()
    bar = Progress(8, "epoch 1/1", stream=log)
    for _ in range(8):
        bar.update(1, lambda: "loss 0.5")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("epoch 1/1 [" + "#" * 24 + "] 8/8")
    assert lines[-1].endswith("loss 0.5")

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    bar = Progress(3, "x", stream=tty, interval=0.0)
    for _ in range(3):
        bar.update()
    bar.close()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")
    quiet = io.StringIO()
    bar = Progress(3, "x", stream=quiet, enabled=False)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "stock"])
def test_gpu_amp_float16_channels_last(capsys, tmp_path, backend):
    hist = tmp_path / "h.json"
    rc = cli.main(["train", "--device", "cuda", "--model", "resnet18", "--data", "synthetic",
                   "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
                   "--max-steps", "3", "--amp", "float16", "--channels-last", "--backend",
                   backend, "--json", str(hist)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "AMP float16, channels_last" in out and "examples/sec on cuda" in out
    losses = json.loads(hist.read_text())["step_losses"]
    assert len(losses) == 3 and all(0 < l < 20 for l in losses)


def _png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR", raw[:16]
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_plot_under_out_draws_d2ls_three_series(capsys, tmp_path):
    out_dir = tmp_path / "run"
    rc, out, err = _train(capsys, "--model", "lenet", "--data", "synthetic", "--synthetic-size",
                          80, "--batch-size", 8, "--epochs", 2, "--backend", "stock",
                          "--no-progress", "--out", out_dir)
    assert rc == 0, err
    assert _png_size(out_dir / "train.png") == (500, 350)
    plotted = json.loads((out_dir / "train.json").read_text())
    history = json.loads((out_dir / "history.json").read_text())["epochs"]
    assert plotted["lines"] == 3
    series = plotted["series"]
    # d2l's animator: loss and train accuracy five times an epoch, test accuracy per epoch
    assert [x for x, _ in series["train loss"]] == pytest.approx(
        [e + k / 5 for e in range(2) for k in range(1, 6)])
    assert series["test acc"] == [[e["epoch"], e["test_acc"]] for e in history]
    assert series["train loss"][4][1] == pytest.approx(history[0]["loss"], rel=1e-6)
    assert series["train acc"][9][1] == pytest.approx(history[1]["train_acc"], rel=1e-6)
    assert plotted["title"].startswith("lenet, stock, cpu: ") and "examples/sec" in plotted["title"]
    assert f"plot: {out_dir / 'train.png'}" in out


def test_plot_without_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = _train(capsys, "--model", "lenet", "--plot", tmp_path / "p.png")
    assert rc == 2
    assert err.strip() == ("fastconv train: error: --plot needs matplotlib, which is not "
                           "installed: pip install matplotlib (or pip install 'fastconv[bench]')")
    assert not (tmp_path / "p.png").exists()


def test_header_parameters_flops_and_vgg11_width(capsys):
    rc, out, err = _train(capsys, *_vgg_args("--epochs", 1, "--max-steps", 1,
                                             "--backend", "stock"))
    assert rc == 0, err
    narrow = models.vgg11(narrow=True, image_size=32)
    assert f"  {sum(p.numel() for p in narrow.parameters()):,d} parameters" in out
    assert "full-width" not in out
    rc, out, err = _train(capsys, "--model", "vgg11", "--image-size", 32, "--data", "synthetic",
                          "--synthetic-size", 8, "--batch-size", 8, "--epochs", 1,
                          "--backend", "stock", "--no-progress", "--max-steps", 1)
    assert rc == 0, err
    assert "vgg11 is the full-width VGG-11" in out and "--model-arg narrow=true" in out
    # 32x32 full VGG-11, 1 channel: convs and Linear layers, 2 FLOPs per multiply-add
    convs = [(1, 64, 32), (64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
             (512, 512, 4), (512, 512, 2), (512, 512, 2)]
    flops = sum(2 * ci * co * 9 * s * s for ci, co, s in convs)
    flops += 2 * (512 * 4096 + 4096 * 4096 + 4096 * 10)
    assert f"{flops / 1e9:.3g} GFLOP per example" in out


def test_epoch_time_estimate_and_long_epoch_warning(capsys, monkeypatch):
    from fastconv.tools import train as T
    rc, out, err = _train(capsys, "--model", "lenet", "--data", "synthetic", "--synthetic-size",
                          48, "--batch-size", 8, "--epochs", 1, "--backend", "stock",
                          "--no-progress")
    assert rc == 0, err
    assert re.search(r"estimated time per epoch: \d+ s \(6 batches at [0-9.e-]+ s\)", err), err
    assert "warning: an epoch will take" not in err
    monkeypatch.setattr(T, "LONG_EPOCH_S", 0.0)
    rc, out, err = _train(capsys, "--model", "lenet", "--data", "synthetic", "--synthetic-size",
                          48, "--batch-size", 8, "--epochs", 1, "--backend", "stock",
                          "--no-progress")
    assert rc == 0 and "warning: an epoch will take about" in err, err
