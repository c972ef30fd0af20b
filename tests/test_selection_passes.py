"""conv2d_relu's training decision per pass: forward, grad_input and grad_weight (+grad_bias)
from different backends (fastconv/mixed.py, fastconv/selection.py). Timings are injected."""
import itertools
import json

import pytest
import torch
from torch import nn

import fastconv
from fastconv import dispatch, selection
from fastconv import functional as FF
from fastconv.backends.reference import TorchBackend, TorchConvPasses
from fastconv.mixed import mixed
from support import assert_within, conv_reference, generator, require

GEO = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1), groups=1)


def case(seed, relu):
    g = generator("passes", seed, relu)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64).float()
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64).float()
    b = torch.randn(6, generator=g, dtype=torch.float64).float()
    return x, w, b


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("combo", list(itertools.product(("extension", "torch"), repeat=3)),
                         ids="-".join)
def test_every_combination_matches_float64(combo, relu):
    require("extension", "cpu")
    x, w, b = (t.requires_grad_() for t in case(1, relu))
    out = mixed(*combo).conv2d_relu(x, w, b, *GEO.values(), relu)
    g = torch.randn(out.shape, generator=generator("grad", relu))
    gi, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    ref = conv_reference(x, w, b, *GEO.values(), relu, out, g)
    for name, got in (("output", out), ("input", gi), ("weight", gw), ("bias", gb)):
        assert_within(got, *ref[name], what=f"{combo} {name}")


class Recording(TorchBackend):
    """torch's passes under another name, recording which pass ran with which output_mask."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def conv2d_relu(self, *args):  # the backend's own whole call (torch's autograd)
        self.log.append((self.name, "whole"))
        return super().conv2d_relu(*args)

    def conv2d_relu_passes(self):
        backend = self

        class Passes(TorchConvPasses):
            def forward(self, *args):
                backend.log.append((backend.name, "forward"))
                return super().forward(*args)

            def backward(self, *args):
                backend.log.append((backend.name, tuple(args[-1])))
                return super().backward(*args)
        return Passes()


def install(monkeypatch, *backends):
    for b in backends:
        monkeypatch.setitem(dispatch.BACKENDS, b.name, b)
    monkeypatch.setattr(dispatch, "NAMES", (*dispatch.NAMES, *[b.name for b in backends]))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", tuple(b.name for b in backends))


def test_each_pass_runs_on_its_backend(monkeypatch):
    log = []
    install(monkeypatch, *(Recording(n, log) for n in ("a", "b", "c")))
    x, w, b = (t.requires_grad_() for t in case(2, True))
    out = mixed("a", "b", "c").conv2d_relu(x, w, b, *GEO.values(), True)
    out.backward(torch.randn(out.shape, generator=generator("g2")))
    assert log == [("a", "forward"), ("b", (True, False, False)), ("c", (False, True, True))]
    log.clear()
    # the weight frozen: only grad_input, from its own backend
    x, w, b = (t.requires_grad_(i == 0) for i, t in enumerate(case(3, True)))
    mixed("a", "b", "c").conv2d_relu(x, w, b, *GEO.values(), True).sum().backward()
    assert log == [("a", "forward"), ("b", (True, False, False))]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "selection.json"
    monkeypatch.setattr(selection, "_path", lambda: path)
    selection.set_enabled(True)
    yield path
    selection.set_enabled(None)
    selection.set_timer(None)


TIMES = {"forward": {"a": 3.0, "b": 1.0, "c": 2.0},
         "grad_input": {"a": 1.0, "b": 3.0, "c": 2.0},
         "grad_weight": {"a": 2.0, "b": 3.0, "c": 1.0},
         # the winning triple timed whole against each backend's whole call
         "whole": {"a": 3.0, "b": 2.0, "c": 2.0, "mixed": 1.0}}


def test_each_pass_takes_its_fastest_and_the_cache_keeps_the_triple(monkeypatch, cache_file):
    log, timed = [], []
    install(monkeypatch, *(Recording(n, log) for n in ("a", "b", "c")))

    def timer(runs, device):
        piece = next(iter(runs.values())).piece
        timed.append((piece, sorted(runs)))
        return {n: TIMES[piece][n] * 1e-3 for n in runs}

    selection.set_timer(timer)
    x, w, b = case(4, True)
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    wp.grad = torch.ones_like(wp)  # an existing gradient is only accumulated into
    rng = torch.get_rng_state()
    out = FF.conv2d_relu(x, wp, bp, 2, 1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(wp.detach(), w) and torch.equal(bp.detach(), b)
    # the input needs no gradient: grad_input is neither measured nor chosen
    assert timed == [("forward", ["a", "b", "c"]), ("grad_weight", ["a", "b", "c"]),
                     ("whole", ["a", "b", "c", "mixed"])]
    log.clear()
    g = torch.randn(out.shape, generator=generator("g4"))
    out.backward(g)
    assert log == [("c", (False, True, True))]
    expected = torch.nn.grad.conv2d_weight(x, w.shape, g * (out > 0), 2, 1)
    torch.testing.assert_close(wp.grad, expected + 1, rtol=1e-5, atol=1e-5)
    name = fastconv.backend_for("conv2d_relu", x, wp, bp, 2, 1)
    assert name == "forward b, grad_input unused, grad_weight c"
    text = fastconv.explain("conv2d_relu", x, wp, bp, 2, 1)
    assert "train      forward b (b 1 ms, c 2 ms, a 3 ms); grad_weight c (c 1 ms, a 2 ms, " \
        "b 3 ms); whole call (mixed 1 ms, b 2 ms, c 2 ms, a 3 ms) [measured]" in text, text
    data = json.loads(cache_file.read_text())
    assert data["format"] == selection.FORMAT == 6
    (table,) = data["tables"].values()
    (entry,) = table.values()
    assert entry["passes"] == {"forward": "b", "grad_input": None, "grad_weight": "c"}
    # reloaded by a process that forgot: the same triple, nothing timed
    selection.reset()
    selection.set_timer(lambda runs, device: pytest.fail("timed a cached signature"))
    assert fastconv.backend_for("conv2d_relu", x, wp, bp, 2, 1) == name
    assert "[cached]" in fastconv.explain("conv2d_relu", x, wp, bp, 2, 1)


@pytest.mark.parametrize("whole, expected", [
    ({"a": 1.0, "b": 2.0, "c": 2.0, "mixed": 1.5}, "a"),
    ({"a": 3.0, "b": 2.0, "c": 1.5, "mixed": 1.5}, "c"),  # a tie goes to the earlier name
])
def test_a_single_backend_that_is_faster_whole_wins(monkeypatch, cache_file, whole, expected):
    """The per-pass winner's autograd Function can cost more than its kernels save: the whole
    training call decides, and every pass then runs on the winner."""
    log = []
    install(monkeypatch, *(Recording(n, log) for n in ("a", "b", "c")))
    times = dict(TIMES, whole=whole)
    selection.set_timer(lambda runs, device: {
        n: times[next(iter(runs.values())).piece][n] * 1e-3 for n in runs})
    x, w, b = (t.requires_grad_() for t in case(7, True))
    FF.conv2d_relu(x, w, b, 2, 1)
    assert fastconv.backend_for("conv2d_relu", x, w, b, 2, 1) == expected
    entry = selection.decided("conv2d_relu", dispatch_args(x, w, b), "train")
    assert entry["passes"] == dict.fromkeys(("forward", "grad_input", "grad_weight"), expected)
    log.clear()
    out = FF.conv2d_relu(x, w, b, 2, 1)
    out.backward(torch.randn(out.shape, generator=generator("g7")))
    assert log == [(expected, "whole")]


def test_torch_winning_every_pass_is_not_timed_whole(monkeypatch, cache_file):
    timed = []

    def timer(runs, device):
        timed.append(next(iter(runs.values())).piece)
        return {n: float(n != "torch") for n in runs}

    selection.set_timer(timer)
    x, w, b = (t.requires_grad_() for t in case(8, True))
    FF.conv2d_relu(x, w, b, 2, 1)
    assert "whole" not in timed and timed
    assert fastconv.backend_for("conv2d_relu", x, w, b, 2, 1) == "torch"


def test_old_format_is_ignored(monkeypatch, cache_file):
    x, w, b = case(5, True)
    w.requires_grad_()
    sig = selection.signature("conv2d_relu", dispatch_args(x, w, b))
    tag = selection._table_tag(selection.device_name(x.device))
    cache_file.write_text(json.dumps({"format": 1, "tables": {tag: {
        selection._entry_key("train", sig): {"choice": "torch", "ms": None}}}}))
    timed = []
    selection.set_timer(lambda runs, device: timed.append(1) or {n: 1.0 for n in runs})
    FF.conv2d_relu(x, w, b, 2, 1)
    assert timed, "a format-1 table decided a signature"


def dispatch_args(x, w, b):
    from fastconv.checks import check_conv2d_relu

    return check_conv2d_relu(x, w, b, 2, 1)


def test_compiled_model_with_a_mixed_decision(monkeypatch, cache_file):
    require("extension", "cpu")
    times = {"forward": {"extension": 1.0, "torch": 2.0},
             "grad_input": {"extension": 2.0, "torch": 1.0},
             "grad_weight": {"extension": 1.0, "torch": 2.0},
             "whole": {"extension": 2.0, "torch": 2.0, "mixed": 1.0}}
    selection.set_timer(lambda runs, device: {
        n: times[next(iter(runs.values())).piece][n] for n in runs})
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("extension", "torch"))
    torch.manual_seed(6)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = fastconv.convert(stock)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()  # decides both convs for training
    names = [fastconv.backend_for("conv2d_relu", torch.randn(2, c, 8, 8, requires_grad=True),
                                  m.weight, m.bias, padding=p)
             for m, c, p in ((model[0], 3, 1), (model[2 if len(model) > 2 else 1], 4, 0))]
    assert names[0] == "forward extension, grad_input torch, grad_weight extension", names
    model.zero_grad()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x2 = x.detach().clone().requires_grad_()
        out = compiled(x2)
        out.sum().backward()
    finally:
        torch._dynamo.reset()
    x3 = x.detach().clone().requires_grad_()
    ref = stock(x3)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x3.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
