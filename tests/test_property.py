"""Property tests: random valid configurations of every op, on every backend, against torch.

Hypothesis draws a configuration (shapes, kernel, stride, padding, dilation, groups, modes,
layout, dtype), builds fresh random inputs, and checks the output, every gradient, the indices
and the running statistics against torch.nn.functional on float64 copies (the helpers and
tolerances of test_reliability_numerics.py: a few unit roundoffs of the dtype, or twice
torch's own error where the problem is ill-conditioned).

Derandomised (the same examples every run, so CI is reproducible), no deadline, and few
examples: 20 per op for torch and the extension, 5 for the Triton interpreter. Set
``FASTCONV_PROPERTY_EXAMPLES`` to run more (e.g. 500 for a soak on a GPU machine).
"""
from __future__ import annotations

import os

import pytest
import torch

# The GPU image has no hypothesis (and no network to install it): skip there, run in CI
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from support import BACKENDS, check_against_reference, make_case, require

pytestmark = pytest.mark.usefixtures("no_tf32")

_EXTRA = int(os.environ.get("FASTCONV_PROPERTY_EXAMPLES", "0"))


def examples(backend: str) -> int:
    return _EXTRA or (5 if backend == "triton" else 20)


def _settings(backend: str):
    return settings(max_examples=examples(backend), deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


# bfloat16 on GPUs only: the interpreter's bf16 dot is wrong
DTYPES = st.sampled_from([torch.float32, torch.float16]
                         + ([torch.bfloat16] if torch.cuda.is_available() else []))


def _span(draw, k, d, p):
    """An input size along one axis for which the (dilated) kernel fits the padded input."""
    least = max(1, d * (k - 1) + 1 - 2 * p)
    return draw(st.integers(least, least + 6))


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h, w = _span(draw, kh, dh, ph), _span(draw, kw, dw, pw)
    n = draw(st.integers(1, 3))
    params = dict(out_channels=cout, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
                  dilation=(dh, dw), groups=groups, relu=draw(st.booleans()),
                  bias=draw(st.booleans()), channels_last=draw(st.booleans()))
    return (n, cin, h, w), draw(DTYPES), params


def _windows_touch_input(size, k, s, p, d, ceil_mode) -> bool:
    """Whether every pooling window along one axis holds at least one input element.

    With dilation a window can fall entirely in the padding (size 1, kernel 2, dilation 2,
    padding 1). torch then returns -inf with an out-of-range index, and its CPU backward
    writes the gradient there, out of bounds: such windows are tested on their own in
    test_reliability_numerics.py, never through torch's backward."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return all(any(0 <= o * s - p + j * d < size for j in range(k)) for o in range(out))


@st.composite
def max_pool_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = _span(draw, kh, dh, ph), _span(draw, kw, dw, pw)
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ceil_mode = draw(st.booleans())
    sh, sw = stride or (kh, kw)
    assume(_windows_touch_input(h, kh, sh, ph, dh, ceil_mode)
           and _windows_touch_input(w, kw, sw, pw, dw, ceil_mode))
    params = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw), dilation=(dh, dw),
                  ceil_mode=ceil_mode, return_indices=draw(st.booleans()),
                  relu=draw(st.booleans()), channels_last=draw(st.booleans()))
    # float32 only: float16 rounding makes ties, whose winner is a convention, not a value
    return (draw(st.integers(1, 3)), draw(st.integers(1, 5)), h, w), torch.float32, params


@st.composite
def avg_pool_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h, w = _span(draw, kh, 1, ph), _span(draw, kw, 1, pw)
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    params = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw),
                  ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()),
                  divisor_override=draw(st.one_of(st.none(), st.integers(1, 5))),
                  channels_last=draw(st.booleans()))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 5)), h, w), draw(DTYPES), params


@st.composite
def adaptive_configs(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    out = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    params = dict(output_size=out, channels_last=draw(st.booleans()))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 5)), h, w), draw(DTYPES), params


@st.composite
def batch_norm_configs(draw):
    n, c, h, w = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 5)),
                  draw(st.integers(1, 5)))
    training = draw(st.booleans()) and n * h * w > 1
    dtype = draw(DTYPES)
    params = dict(training=training, relu=draw(st.booleans()), affine=draw(st.booleans()),
                  stats=draw(st.booleans()) or not training,
                  momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])),
                  eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
                  channels_last=draw(st.booleans()),
                  # 16-bit inputs keep float32 parameters and statistics, as under AMP
                  param_dtype=torch.float32 if dtype != torch.float32 else dtype)
    return (n, c, h, w), dtype, params


STRATEGIES = {"conv2d_relu": conv_configs(), "max_pool2d": max_pool_configs(),
              "avg_pool2d": avg_pool_configs(), "adaptive_avg_pool2d": adaptive_configs(),
              "batch_norm": batch_norm_configs()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(STRATEGIES))
def test_random_configurations_match_torch(op, backend):
    require(backend)

    @_settings(backend)
    @given(config=STRATEGIES[op], seed=st.integers(0, 2**16))
    def check(config, seed):
        shape, dtype, params = config
        args = make_case(op, shape, dtype, seed=seed, **dict(params))
        check_against_reference(op, args, backend, what=f"{backend} {op} {shape} {params}")

    check()
