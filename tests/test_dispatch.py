"""Backend selection: env var, auto order, explicit refusals with reasons, explain()."""
import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import dispatch
from fastconv.backends.base import Backend
from fastconv.functional import conv2d_relu
from support import assert_close


class Recorder(Backend):
    """A test backend that serves conv2d_relu with plain torch and records each call."""

    def __init__(self, name, refuse=None):
        self.name, self.refuse, self.calls = name, refuse, 0

    def why_not(self, op, args):
        return self.refuse

    def conv2d_relu(self, input, weight, bias, stride, padding, dilation, groups, relu):
        self.calls += 1
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return out.relu() if relu else out


@pytest.fixture
def fake_backends(monkeypatch):
    first, second = Recorder("first", refuse="first refuses: test"), Recorder("second")
    monkeypatch.setitem(dispatch.BACKENDS, "first", first)
    monkeypatch.setitem(dispatch.BACKENDS, "second", second)
    monkeypatch.setattr(dispatch, "NAMES", (*dispatch.NAMES, "first", "second"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("first", "second", "torch"))
    return first, second


def xw():
    return torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)


def test_auto_takes_first_backend_that_can_run(fake_backends):
    first, second = fake_backends
    x, w, b = xw()
    out = conv2d_relu(x, w, b, padding=1)
    assert second.calls == 1 and first.calls == 0
    assert_close(out, F.relu(F.conv2d(x, w, b, padding=1)), tol=1e-6)
    text = fastconv.explain("conv2d_relu", x, w, b, padding=1)
    assert "runs on 'second'" in text and "first refuses: test" in text


def test_explicit_backend_that_cannot_run_raises_with_reason(fake_backends):
    x, w, b = xw()
    with pytest.raises(fastconv.BackendUnavailableError, match="first refuses: test"):
        conv2d_relu(x, w, b, backend="first")


def test_env_var_sets_the_default(fake_backends, monkeypatch):
    first, second = fake_backends
    x, w, b = xw()
    monkeypatch.setenv("FASTCONV_BACKEND", "torch")
    conv2d_relu(x, w, b)
    assert second.calls == 0
    assert fastconv.backend_for("conv2d_relu", x, w, b) == "torch"
    monkeypatch.setenv("FASTCONV_BACKEND", "second")
    conv2d_relu(x, w, b)
    assert second.calls == 1
    monkeypatch.setenv("FASTCONV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTCONV_BACKEND"):
        conv2d_relu(x, w, b)


def test_unknown_backend_name():
    x, w, b = xw()
    with pytest.raises(ValueError, match="backend='cudnn' is not a fastconv backend"):
        conv2d_relu(x, w, b, backend="cudnn")
    with pytest.raises(ValueError, match="not a fastconv backend"):
        fastconv.convert(torch.nn.Conv2d(1, 1, 1), backend="cudnn")


def test_no_backend_can_run(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton",))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b = xw()
    with pytest.raises(fastconv.BackendUnavailableError, match="no fastconv backend can run"):
        conv2d_relu(x, w, b)


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = xw()
    reason = dispatch.reasons("conv2d_relu", dict(input=x, weight=w), ["triton"])["triton"]
    assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
    # auto never picks the interpreter for CPU tensors
    assert "triton" not in dispatch.AUTO_ORDER["cpu"]


def test_availability_reports_every_backend():
    avail = fastconv.availability()
    assert set(avail) >= {"torch", "triton", "extension"}
    assert avail["torch"] is None
    for name, reason in avail.items():
        assert reason is None or (isinstance(reason, str) and reason)


def test_broken_backend_check_does_not_break_dispatch(monkeypatch):
    class Exploding(Backend):
        name = "boom"

        def why_not(self, op, args):
            raise RuntimeError("kaboom")

    monkeypatch.setitem(dispatch.BACKENDS, "boom", Exploding())
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("boom", "torch"))
    x, w, b = xw()
    assert fastconv.backend_for("conv2d_relu", x, w, b) == "torch"
    assert "kaboom" in fastconv.explain("conv2d_relu", x, w, b)
