"""auto's measured choice (fastconv/selection.py) and the decided fast path.

Timing is never real here: a fake clock that the test backends advance, or injected timings.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import dispatch, selection
from fastconv import functional as FF
from fastconv.backends.reference import TorchBackend, TorchConvPasses


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Tick(torch.autograd.Function):
    """Identity whose backward advances the fake clock (a backward of known cost)."""

    @staticmethod
    def forward(ctx, x, clock, cost):
        ctx.clock, ctx.cost = clock, cost
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.now += ctx.cost
        return grad, None, None


class Ticking(TorchBackend):
    """The torch backend under another name; each conv2d_relu forward costs ``fwd`` and each
    backward ``bwd`` seconds of the fake clock (batch norm ``fwd``, pools nothing). Records
    the tensors conv2d_relu was called with."""

    def __init__(self, name, clock, fwd, bwd=0.0):
        self.name, self.clock, self.fwd, self.bwd = name, clock, fwd, bwd
        self.calls, self.seen = 0, []

    def conv2d_relu(self, input, weight, bias, stride, padding, dilation, groups, relu):
        self.calls += 1
        self.seen.append((input, weight, bias))
        if not torch.compiler.is_compiling():
            self.clock.now += self.fwd
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        out = out.relu() if relu else out
        if self.bwd and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            out = _Tick.apply(out, self.clock, self.bwd)
        return out

    def batch_norm(self, *args):
        self.clock.now += self.fwd
        return super().batch_norm(*args)

    def conv2d_relu_passes(self):
        return TickingPasses(self)


class TickingPasses(TorchConvPasses):
    """torch's passes; the forward costs the backend's ``fwd``, each backward ``bwd``."""

    def __init__(self, backend):
        self.backend = backend

    def forward(self, *args):
        self.backend.clock.now += self.backend.fwd
        return super().forward(*args)

    def backward(self, *args):
        self.backend.clock.now += self.backend.bwd
        return super().backward(*args)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "selection.json"
    monkeypatch.setattr(selection, "_path", lambda: path)
    return path


@pytest.fixture
def tuning(clock, cache_file):
    """Measuring on, timed by the default timer on the fake clock."""
    selection.set_enabled(True)
    selection.set_timer(clock=clock)
    yield clock
    selection.set_enabled(None)
    selection.set_timer(None)


def install(monkeypatch, *backends):
    for b in backends:
        monkeypatch.setitem(dispatch.BACKENDS, b.name, b)
    monkeypatch.setattr(dispatch, "NAMES", (*dispatch.NAMES, *[b.name for b in backends
                                                                if b.name not in dispatch.NAMES]))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", tuple(b.name for b in backends))


def xwb(seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g).requires_grad_(grad)
    b = torch.randn(4, generator=g).requires_grad_(grad)
    return x, w, b


def ref(x, w, b):
    return F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))


class Bursty(Ticking):
    """A Ticking backend whose forward costs ``burst_cost`` on the calls numbered in
    ``burst`` (1-based): a passing load on the machine."""

    def __init__(self, name, clock, fwd, burst, burst_cost):
        super().__init__(name, clock, fwd)
        self.base, self.burst, self.burst_cost = fwd, set(burst), burst_cost

    def conv2d_relu(self, *args):
        self.fwd = self.burst_cost if self.calls + 1 in self.burst else self.base
        return super().conv2d_relu(*args)


@pytest.mark.parametrize("burst", [False, True])
def test_a_doubtful_measurement_gets_a_second_look(monkeypatch, tuning, burst):
    # Calls per candidate: one trial call, the timer's first call, one to size the samples,
    # then 7 rounds of one call. A burst on 5 of the 7 rounds makes the faster candidate look
    # slower with a wide spread of per-round ratios: 7 more rounds are timed and pooled, and
    # the true order wins. A steady measurement is taken once.
    fast = Bursty("fast", tuning, 1e-3, range(4, 9) if burst else (), 3e-3)
    torch_ = Ticking("torch", tuning, 2e-3)
    install(monkeypatch, fast, torch_)
    x, w, b = xwb(2)
    with torch.no_grad():
        FF.conv2d_relu(x, w, b, padding=1)
    assert torch_.calls == (3 + 7 + 7 if burst else 3 + 7)
    assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == "fast"


def test_fastest_candidate_is_chosen_and_remembered(monkeypatch, tuning):
    slow, fast, torch_ = (Ticking("slow", tuning, 3e-3), Ticking("fast", tuning, 1e-3),
                          Ticking("torch", tuning, 2e-3))
    install(monkeypatch, slow, fast, torch_)
    x, w, b = xwb(1)
    with torch.no_grad():
        out = FF.conv2d_relu(x, w, b, padding=1)
    assert slow.calls > 1 and torch_.calls > 1, "every candidate is measured"
    counts = (slow.calls, fast.calls, torch_.calls)
    torch.testing.assert_close(out.double(), ref(x, w, b), rtol=1e-5, atol=1e-5)
    assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == "fast"
    with torch.no_grad():
        FF.conv2d_relu(x, w, b, padding=1)
    assert (slow.calls, fast.calls, torch_.calls) == (counts[0], counts[1] + 1, counts[2])
    text = fastconv.explain("conv2d_relu", x, w, b, padding=1)
    assert "infer      fast (measured: fast 1 ms, torch 2 ms, slow 3 ms)" in text, text


@pytest.mark.parametrize("fast_ms, torch_ms, expected", [
    (1.96, 2.0, "torch"),     # 2% faster: within the CPU margin, a tie goes to torch
    (1.958, 2.0, "torch"),    # beyond 2% but not the 3 us CPU call cost ...
    (1.956, 2.0, "fast"),     # ... beyond both
    (0.0465, 0.050, "torch"),  # 7% faster, but by less than the 3 us call cost + 2%
    (0.0455, 0.050, "fast"),
])
def test_another_backend_must_beat_torch_by_the_margin(monkeypatch, tuning, fast_ms, torch_ms,
                                                       expected):
    fast, torch_ = Ticking("fast", tuning, fast_ms * 1e-3), Ticking("torch", tuning,
                                                                     torch_ms * 1e-3)
    install(monkeypatch, fast, torch_)
    x, w, b = xwb(9)
    with torch.no_grad():
        FF.conv2d_relu(x, w, b, padding=1)
    assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == expected


@pytest.mark.parametrize("device_type, fast_s, expected", [
    ("cuda", 1.90e-3, "torch"),  # 5% faster: within the CUDA margin ...
    ("cpu", 1.95e-3, "fast"),     # ... and 2.5% beyond the CPU one (2% and 3 us)
    ("cuda", 1.896e-3, "torch"),  # beyond 5% but not the 5 us CUDA call cost ...
    ("cpu", 1.896e-3, "fast"),    # ... though beyond the 3 us CPU one
    ("cuda", 1.894e-3, "fast"),
])
def test_the_margin_and_call_cost_are_the_device_types(device_type, fast_s, expected):
    choice, ms = selection._pick({"fast": fast_s, "torch": 2e-3}, ["fast", "torch"],
                                 device_type)
    assert choice == expected
    assert ms == {"fast": round(fast_s * 1e3, 6), "torch": 2.0}


def test_injected_timings_choose_torch_over_the_fixed_order(monkeypatch, cache_file):
    x, w, b = xwb(2)
    order = dispatch.auto_order("cpu")
    assert order[-1] == "torch" and len(order) > 1
    timed = []

    def timer(runs, device):
        timed.append(sorted(runs))
        for run in runs.values():
            run()
        return {n: (1.0 if n == "torch" else 2.0) for n in runs}

    selection.set_enabled(True)
    selection.set_timer(timer)
    try:
        with torch.no_grad():
            out = FF.conv2d_relu(x, w, b, padding=1)
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)
    able = [n for n, r in dispatch.reasons("conv2d_relu", dict(
        input=x, weight=w, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
        relu=True), order).items() if r is None]
    assert timed == [sorted(able)]
    torch.testing.assert_close(out.double(), ref(x, w, b), rtol=1e-5, atol=1e-5)
    entry = json.loads(cache_file.read_text())
    (table,) = entry["tables"].values()
    (decision,) = table.values()
    assert decision["choice"] == "torch"


def test_training_and_inference_are_decided_separately(monkeypatch, tuning):
    # quick forward, slow backward versus the opposite: inference and training differ
    fwd_fast = Ticking("fwd_fast", tuning, 1e-3, bwd=10e-3)
    balanced = Ticking("balanced", tuning, 2e-3, bwd=2e-3)
    torch_ = Ticking("torch", tuning, 5e-3, bwd=5e-3)
    install(monkeypatch, fwd_fast, balanced, torch_)
    x, w, b = xwb(3, grad=True)
    with torch.no_grad():
        FF.conv2d_relu(x, w, b, padding=1)
    out = FF.conv2d_relu(x, w, b, padding=1)
    out.sum().backward()
    # training: each pass alone, the forward of fwd_fast with the gradients of balanced
    assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == \
        "forward fwd_fast, grad_input unused, grad_weight balanced"
    with torch.no_grad():
        assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == "fwd_fast"
    text = fastconv.explain("conv2d_relu", x, w, b, padding=1)
    assert "infer      fwd_fast (measured" in text, text
    assert "train      forward fwd_fast (fwd_fast 1 ms, balanced 2 ms, torch 5 ms); " \
        "grad_weight balanced (balanced 2 ms, torch 5 ms, fwd_fast 10 ms)" in text, text
    gw = w.grad.clone()
    w.grad = None
    FF.conv2d_relu(x, w, b, padding=1, backend="torch").sum().backward()
    assert torch.equal(gw, w.grad)


def test_measuring_touches_nothing_of_the_users(monkeypatch, tuning):
    # a real model in training: the measured call must leave the same outputs, running
    # statistics, gradients and random stream as running the chosen backend alone
    torch_ = Ticking("torch", tuning, 2e-3, bwd=1e-3)
    fast = Ticking("fast", tuning, 1e-3, bwd=1e-3)
    install(monkeypatch, fast, torch_)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("fast", "torch"))
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        stock[1].running_mean.normal_()
        stock[1].running_var.uniform_(0.5, 2)
    model = fastconv.convert(stock)
    reference = fastconv.convert(stock, backend="torch")  # same parameters: compare copies
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # grads already there must only be accumulated into
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    x_before, rng = x.detach().clone(), torch.get_rng_state()
    out = model(x)
    assert torch.equal(x.detach(), x_before) and torch.equal(torch.get_rng_state(), rng)
    assert all(t is not x for call in fast.seen[:-1] for t in call), "measured on the input"
    assert not any(t is p for call in fast.seen[:-1] + torch_.seen for t in call
                   for p in model.parameters()), "measured on the parameters"
    out.sum().backward()
    # the reference: the same step with the chosen implementation alone, from the same state
    model_ref = reference
    model_ref.load_state_dict(before)
    for p, g in zip(model_ref.parameters(), grads):
        p.grad = g.clone()
    assert all(p.grad is not q.grad for p, q in zip(model_ref.parameters(), model.parameters()))
    x2 = x_before.clone().requires_grad_(True)
    out_ref = model_ref(x2)
    out_ref.sum().backward()
    assert torch.equal(out, out_ref)
    assert torch.equal(x.grad, x2.grad)
    for (k, v), (_, r) in zip(model.state_dict().items(), model_ref.state_dict().items()):
        assert torch.equal(v, r), k
    for p, r in zip(model.parameters(), model_ref.parameters()):
        assert torch.equal(p.grad, r.grad)


def test_deterministic_mode_and_off_switch_never_time(monkeypatch, cache_file):
    def timer(runs, device):
        raise AssertionError("timed")

    x, w, b = xwb(5)
    selection.set_timer(timer)
    try:
        order = dispatch.auto_order("cpu")
        first = next(n for n in order if dispatch.reasons("conv2d_relu", dict(
            input=x, weight=w, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
            groups=1, relu=True), [n])[n] is None)
        selection.set_enabled(False)
        assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == first
        FF.conv2d_relu(x, w, b, padding=1)
        selection.set_enabled(True)
        old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == first
            FF.conv2d_relu(x, w, b, padding=1)
            # a decision already cached is used in deterministic mode
            selection.set_timer(lambda runs, device: {n: float(n != "torch") for n in runs})
            torch.use_deterministic_algorithms(False)
            FF.conv2d_relu(x, w, b, padding=1)
            selection.set_timer(timer)
            torch.use_deterministic_algorithms(True)
            assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == "torch"
        finally:
            torch.use_deterministic_algorithms(old)
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)


def test_off_switch_env_var(monkeypatch):
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    assert not selection.enabled()
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    assert selection.enabled()


def _decide(timer_favours, x, w, b):
    selection.set_timer(lambda runs, device: {n: (1.0 if n == timer_favours else 2.0)
                                              for n in runs})
    with torch.no_grad():
        FF.conv2d_relu(x, w, b, padding=1)


def test_cache_written_atomically_reloaded_and_versioned(monkeypatch, cache_file):
    x, w, b = xwb(6)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b_: (replaced.append((a, b_)),
                                                      real_replace(a, b_))[1])
    selection.set_enabled(True)
    try:
        _decide("torch", x, w, b)
        assert replaced and all(os.path.dirname(str(a)) == str(cache_file.parent)
                                and str(b_) == str(cache_file) for a, b_ in replaced)
        assert [p.name for p in cache_file.parent.iterdir() if p.suffix == ".tmp"] == []
        # the same process, forgetting its memory: the file decides, nothing is timed
        selection.reset()
        selection.set_timer(lambda runs, device: pytest.fail("timed a cached signature"))
        assert fastconv.backend_for("conv2d_relu", x, w, b, padding=1) == "torch"
        with torch.no_grad():
            assert selection.decided("conv2d_relu", dispatch_args(x, w, b), "infer")["how"] \
                == "cached"
        # another fastconv version: the table no longer applies and the signature is measured
        monkeypatch.setattr(selection, "_version_tag", ["torch x|triton y|fastconv 99"])
        selection.reset()
        timed = []
        selection.set_timer(lambda runs, device: timed.append(1) or {n: 1.0 for n in runs})
        FF.conv2d_relu(x, w, b, padding=1)
        assert timed == [1]
        tables = json.loads(cache_file.read_text())["tables"]
        assert list(tables) == [t for t in tables if t.endswith("fastconv 99")], \
            "the stale table is dropped on the next write"
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)


def dispatch_args(x, w, b):
    from fastconv.checks import check_conv2d_relu

    return check_conv2d_relu(x, w, b, padding=1)


@pytest.mark.parametrize("content", ["{not json", '{"format": 2, "tables": []}',
                                     '{"format": 2, "tables": {"TAG": {"[1": {}}}}'])
def test_unreadable_cache_is_ignored(monkeypatch, cache_file, caplog, content):
    x, w, b = xwb(7)
    content = content.replace("TAG", selection._table_tag(selection.device_name(x.device)))
    cache_file.write_text(content)
    timed = []
    selection.set_enabled(True)
    selection.set_timer(lambda runs, device: timed.append(1) or {n: 1.0 for n in runs})
    try:
        with caplog.at_level("DEBUG", logger="fastconv"):
            FF.conv2d_relu(x, w, b, padding=1)
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)
    assert timed == [1]
    assert "ignoring" in caplog.text and "selection cache" in caplog.text
    assert json.loads(cache_file.read_text())["format"] == selection.FORMAT  # rewritten whole


def test_a_fresh_process_starts_decided(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        from fastconv import dispatch, selection, functional as FF
        from pathlib import Path
        selection._path = lambda: Path(sys.argv[1])
        selection.set_enabled(True)
        if sys.argv[2] == "decide":
            selection.set_timer(lambda runs, device: {n: float(n != "torch") for n in runs})
        else:
            selection.set_timer(lambda runs, device: sys.exit("timed in the second process"))
        g = torch.Generator().manual_seed(8)
        x, w = torch.randn(1, 3, 6, 6, generator=g), torch.randn(2, 3, 3, 3, generator=g)
        with torch.no_grad():
            FF.conv2d_relu(x, w)
        print(dispatch.select("conv2d_relu", dict(input=x, weight=w, bias=None, stride=(1, 1),
              padding=(0, 0), dilation=(1, 1), groups=1, relu=True), None).name)
    """)
    path = tmp_path / "sel.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for step in ("decide", "reuse"):
        res = subprocess.run([sys.executable, "-c", code, str(path), step], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-1] == "torch"


def test_fast_path_skips_checks_only_for_a_decided_key(monkeypatch):
    import fastconv.functional as functional

    x, w, b = xwb(9)
    calls = []
    real = functional.check_conv2d_relu
    monkeypatch.setattr(functional, "check_conv2d_relu",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out1 = FF.conv2d_relu(x, w, b, 1, 1)
    out2 = FF.conv2d_relu(x, w, b, 1, 1)
    assert calls == [1] and torch.equal(out1, out2)
    torch.testing.assert_close(out1.double(), ref(x, w, b), rtol=1e-5, atol=1e-5)
    # arguments equal as dict keys but not to validation are validated, and refused
    with pytest.raises(TypeError, match="stride"):
        FF.conv2d_relu(x, w, b, True, 1)
    with pytest.raises(TypeError, match="stride"):
        FF.conv2d_relu(x, w, b, 1.0, 1)
    with pytest.raises(TypeError, match="padding"):
        FF.conv2d_relu(x, w, b, 1, (1, 1.0))
    with pytest.raises(ValueError, match="groups"):
        FF.conv2d_relu(x, w, b, 1, 1, 1, True)
    # another layout, dtype or grad requirement is a new signature
    FF.conv2d_relu(x.to(memory_format=torch.channels_last), w, b, 1, 1)
    FF.conv2d_relu(x, w.requires_grad_(), b, 1, 1)
    assert len(calls) == 7
    with pytest.raises(TypeError, match="weight is torch.float64"):
        FF.conv2d_relu(x, w.double(), b, 1, 1)


@pytest.mark.parametrize("decided", [True, False])
def test_compiled_converted_model(monkeypatch, decided, cache_file):
    torch.manual_seed(10)
    model = fastconv.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                           nn.MaxPool2d(2), nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    timed = []
    selection.set_enabled(True)
    selection.set_timer(lambda runs, device: timed.append(1) or {
        n: float(n != "torch") for n in runs})
    try:
        with torch.no_grad():
            eager = model(x) if decided else None
            n_timed = len(timed)
            assert n_timed == (3 if decided else 0)  # two convs and the pool
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            out = compiled(x)
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)
        torch._dynamo.reset()
    assert len(timed) == n_timed, "timed inside torch.compile"
    with torch.no_grad():
        expected = fastconv.revert(model)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if decided:
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)


def test_tune_command_decides_every_layer(cache_file, capsys):
    from fastconv import cli

    timed = []

    def timer(runs, device):
        timed.append(sorted(runs))
        return {n: (1e-3 if n == "torch" else 2e-3) for n in runs}

    selection.set_enabled(True)
    selection.set_timer(timer)
    try:
        assert cli.main(["tune", "--model", "lenet", "--batch", "2", "--device", "cpu"]) == 0
    finally:
        selection.set_enabled(None)
        selection.set_timer(None)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]
    # LeNet: two convs and two pools, each decided for training and for inference
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (layer, op, pass_) for pass_ in ("train", "infer")
        for layer, op in (("0", "conv2d_relu"), ("2", "avg_pool2d"), ("3", "conv2d_relu"),
                          ("5", "avg_pool2d"))]
    # conv2d_relu's training rows: one decision per pass (the first conv's input needs no
    # gradient: forward and grad_weight only)
    per_pass = [" ".join(r) for r in rows if r[1] == "conv2d_relu" and r[2] == "train"]
    assert len(per_pass) == 2 and all("forward torch (" in t and "grad_weight torch (" in t
                                      and "[measured]" in t for t in per_pass), per_pass
    assert ("grad_input" in per_pass[1]) and ("grad_input" not in per_pass[0])
    assert all(r[4] == "torch" and "measured:" in " ".join(r) for r in rows
               if not (r[1] == "conv2d_relu" and r[2] == "train"))
    assert len(timed) == 8 + 3
    tables = json.loads(cache_file.read_text())["tables"]
    assert sum(len(t) for t in tables.values()) == 8


def test_tune_command_refuses_when_measuring_is_off(capsys):
    from fastconv import cli

    selection.set_enabled(False)
    try:
        assert cli.main(["tune", "--model", "lenet"]) == 2
    finally:
        selection.set_enabled(None)
    assert "measuring is off" in capsys.readouterr().out
