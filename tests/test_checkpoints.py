"""Checkpoints: converted and stock models load each other's state, and training resumed from
a checkpoint continues exactly as the uninterrupted run.

* Every model's converted state_dict has the stock keys, shapes and dtypes (checked on the
  meta device, so full-width models cost nothing).
* Trained state (weights, running statistics, num_batches_tracked, including BatchNorm's
  cumulative-average mode, ``momentum=None``) moves from a converted model to a stock one and
  back, mid-training, and both continue identically (torch backend: bitwise; the kernels:
  within float32 rounding).
* ``fastconv train --save/--resume`` (tools/train.py, through its CLI): a run stopped
  mid-epoch and resumed gives bit-identical weights, optimizer state and history to one that
  was never interrupted, on each backend; a checkpoint written by a stock run resumes on a
  converted model and the reverse. tests/test_tools_train.py covers the torch backend on
  VGG-11; here LeNet-BN adds batch norm (running statistics, num_batches_tracked).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fastconv
from fastconv import cli, models
from support import assert_close
from support import BACKENDS, DEV, require


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_state_dict_keys_shapes_dtypes_are_stock(name):
    with torch.device("meta"):
        stock = models.build(name)
    fast = fastconv.convert(stock, backend="torch")
    a, b = stock.state_dict(), fast.state_dict()
    assert list(a) == list(b), f"{name}: keys differ: {set(a) ^ set(b)}"
    for k in a:
        assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
    # and a stock state_dict loads strictly into the converted model (and back)
    fast.load_state_dict(a, strict=True, assign=True)
    stock.load_state_dict(fast.state_dict(), strict=True, assign=True)


def bn_net(momentum=0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.BatchNorm2d(6, momentum=momentum),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _steps(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 8, 8, generator=g).to(DEV),
             torch.randint(0, 4, (4,), generator=g).to(DEV)) for _ in range(n)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_moves_between_converted_and_stock_mid_training(backend, momentum):
    """Train converted 3 steps, hand its state (model and optimizer) to a stock model, train
    both 2 more steps on the same batches: same weights and statistics. Then the reverse."""
    require(backend)
    torch.manual_seed(0)
    stock0 = bn_net(momentum).to(DEV)
    fast = fastconv.convert(stock0, backend=backend)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9)
    _steps(fast, opt, _batches(3, 1))
    assert int(fast[1].num_batches_tracked) == 3

    # converted -> stock
    stock = bn_net(momentum).to(DEV)
    stock.load_state_dict(fast.state_dict())
    stock_opt = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)
    # a deep copy: load_state_dict keeps the very momentum tensors it is given (no copy when
    # device and dtype already match), which would tie the two optimizers together
    stock_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    later = _batches(2, 2)
    _steps(fast, opt, later)
    _steps(stock, stock_opt, later)
    exact = backend == "torch"
    for (k, a), (k2, b) in zip(fast.state_dict().items(), stock.state_dict().items()):
        assert k == k2
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), f"{k} differs after converted -> stock"
        else:
            assert_close(a, b, torch.float32, tol=1e-4, what=f"{backend} {k}")
    # eval mode reads the running statistics: same outputs
    x = torch.randn(3, 2, 8, 8, device=DEV)
    with torch.no_grad():
        assert_close(fast.eval()(x), stock.eval()(x), torch.float32, tol=1e-4, what="eval")

    # stock -> converted (a stock checkpoint on disk, loaded with weights_only)
    ckpt = {"model": stock.state_dict(), "opt": stock_opt.state_dict()}
    buf = _roundtrip(ckpt)
    again = fastconv.convert(bn_net(momentum).to(DEV), backend=backend)
    again.load_state_dict(buf["model"])
    again_opt = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    again_opt.load_state_dict(buf["opt"])
    stock.train()
    last = _batches(1, 3)
    _steps(stock, stock_opt, last)
    _steps(again, again_opt, last)
    for (k, a), (_, b) in zip(stock.state_dict().items(), again.state_dict().items()):
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), f"{k} differs after stock -> converted"
        else:
            assert_close(b, a, torch.float32, tol=1e-4, what=f"{backend} {k}")


def _roundtrip(obj):
    import io
    f = io.BytesIO()
    torch.save(obj, f)
    f.seek(0)
    return torch.load(f, map_location=DEV, weights_only=True)


# --------------------------------------------------------------------------- fastconv train
def _train(capsys, *args):
    rc = cli.main(["train", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _lenet_bn_args(backend, *extra):
    # LeNet-BN on synthetic 28x28 data: convs, BatchNorm2d/1d, average pools, Linear. The
    # interpreter gets fewer, smaller batches (three per epoch either way)
    small = backend == "triton"
    return ["--model", "lenet_bn", "--data", "synthetic", "--synthetic-size", 12 if small else 48,
            "--batch-size", 4 if small else 16, "--lr", 0.5, "--backend", backend,
            "--no-progress", *extra]


@pytest.mark.parametrize("backend", [
    "torch", "extension",
    # GPU only: resuming is the same code whatever the backend (checked above), and an
    # identical resume rests on bitwise-reproducible steps, which test_determinism.py checks
    # for the Triton kernels in the interpreter; here a minute of interpreted LeNet-BN steps
    pytest.param("triton", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="Triton on CPU is the interpreter: the resume "
        "logic runs above, the kernels' reproducibility in test_determinism.py")),
])
def test_resume_mid_epoch_continues_identically(capsys, tmp_path, backend):
    if DEV.type != "cpu":
        pytest.skip("fastconv train runs on CPU here (--device cpu)")
    require(backend)
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    hist_full, hist_resumed = tmp_path / "full.json", tmp_path / "resumed.json"
    _train(capsys, *_lenet_bn_args(backend, "--epochs", 2, "--save", full, "--json", hist_full))
    out = _train(capsys, *_lenet_bn_args(backend, "--epochs", 2, "--max-steps", 4,
                                         "--save", part))
    assert "(stopped after batch 1/3)" in out
    out = _train(capsys, *_lenet_bn_args(backend, "--epochs", 2, "--resume", part, "--save",
                                         part, "--json", hist_resumed))
    assert "resuming at epoch 2, batch 1" in out
    a = torch.load(full, weights_only=True)
    b = torch.load(part, weights_only=True)
    assert (b["epoch"], b["next_batch"], b["steps"]) == (2, 0, 6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resuming"
    assert int(b["model"]["1.num_batches_tracked"]) == 6
    assert _same_optimizer_state(a["optimizer"], b["optimizer"])
    # the resumed run's last batch losses are the uninterrupted run's last ones
    full_losses = json.loads(hist_full.read_text())["step_losses"]
    resumed_losses = json.loads(hist_resumed.read_text())["step_losses"]
    assert resumed_losses == full_losses[-len(resumed_losses):]


def _same_optimizer_state(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][k][n], b["state"][k][n])
               for k in a["state"] for n in a["state"][k]
               if isinstance(a["state"][k][n], torch.Tensor))


@pytest.mark.parametrize("first,second", [("stock", "extension"), ("extension", "stock"),
                                          ("stock", "torch")])
def test_checkpoint_resumes_across_stock_and_converted(capsys, tmp_path, first, second):
    """A checkpoint written by a stock run resumes on a converted model and the reverse; the
    finished weights match an uninterrupted stock run (bitwise through the torch backend,
    within float32 rounding through the extension's kernels)."""
    if DEV.type != "cpu":
        pytest.skip("fastconv train runs on CPU here (--device cpu)")
    for b in (first, second):
        if b != "stock":
            require(b)
    ref, ck = tmp_path / "ref.pt", tmp_path / "ck.pt"
    _train(capsys, *_lenet_bn_args("stock", "--epochs", 2, "--save", ref))
    _train(capsys, *_lenet_bn_args(first, "--epochs", 2, "--max-steps", 2, "--save", ck))
    _train(capsys, *_lenet_bn_args(second, "--epochs", 2, "--resume", ck, "--save", ck))
    a = torch.load(ref, weights_only=True)["model"]
    b = torch.load(ck, weights_only=True)["model"]
    assert a.keys() == b.keys()
    exact = {first, second} <= {"stock", "torch"}
    for k in a:
        if exact or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            # six SGD steps at lr 0.5 amplify float32 rounding differences a little
            assert_close(b[k], a[k], torch.float32, tol=1e-3, what=k)
