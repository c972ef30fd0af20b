"""The extension's CPU batch norm with a residual: relu?(bn(x) + residual), forward and backward.

Calls torch.ops.fastconv.batch_norm directly (the public API's residual argument comes from
another branch). References are float64 at the kernel's own saved statistics where the
statistics' error is bounded separately; bounds follow tests/test_extension_cpu.py's batch-norm
ones (rounding-error analysis, gamma_L for sums of L terms) plus the one rounding of the add:
the kernel computes fl(fl(x * scale + shift) + residual), so the error of the pre-add value
carries over (times 1 + u) and the add adds u * |bn(x) + residual|; the ReLU does not grow an
error. The float64 references round too, by the same analysis at float64's unit roundoff:
every bound is taken (1 + u64 / u) times (``ref_factor``: 2 for float64 inputs, 1 + 2^-29 for
float32). The residual's gradient is grad_output masked by the kernel's own output (> 0),
copied: compared exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support import U, assert_within, bn_stats_bounds, f64, gamma, generator, grad_for, randn

CL = torch.channels_last
ops = torch.ops.fastconv


pytestmark = pytest.mark.usefixtures("built_extension")  # conftest.py


# (name, N, C, H, W, mean of x): planes of >= 64 elements (vector loops, several vectors),
# one longer than a fold chunk, and the small planes the kernel treats specially: 1x1 and 2x2
# (NCHW run as rows of C * HW columns), 3x3 (one partial vector per plane).
CASES = [
    ("8x8", 2, 6, 8, 8, 0.3),
    ("9x11", 3, 5, 9, 11, -1.0),
    ("40x60", 2, 3, 40, 60, 0.2),
    ("3x3", 4, 12, 3, 3, -0.3),
    ("2x2", 4, 10, 2, 2, 0.4),
    ("1x1", 6, 9, 1, 1, 3.0),
]
DTYPES = (torch.float32, torch.float64)


def layout(t, cl):
    return t.contiguous(memory_format=CL) if cl else t.contiguous()


def v(t):
    return t.view(1, -1, 1, 1)


def ref_factor(dtype):
    """Kernel bound + the float64 reference's own rounding (same terms at u64)."""
    return 1 + U[torch.float64] / U[dtype]


def make_case(case, dtype, cl, affine, tag):
    _, n, c, h, w, mu = case
    gen = generator("bn_residual", tag, case[0], str(dtype), cl, affine)
    x = layout(randn((n, c, h, w), gen, dtype, scale=2.0, shift=mu), cl)
    # the residual centres bn(x) + residual near zero so that the ReLU cuts a good part
    res = layout(randn((n, c, h, w), gen, dtype, scale=1.5, shift=-0.2), cl)
    wt = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.2).to(dtype) if affine else None
    rm = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    grad = layout(grad_for((n, c, h, w), gen, dtype, "cpu"), cl)
    return x, res, wt, b, rm, rv, grad


def check_grads(grads, out, grad, x, wt, save_mean, save_invstd, relu, training, affine, dtype,
                res_grad):
    """grad_input / grad_weight / grad_bias as test_extension_cpu.py's batch-norm tests, at the
    kernel's saved statistics and ReLU mask; the residual's gradient exactly."""
    n, c, h, w = x.shape
    m = n * h * w
    u = U[dtype]
    k = ref_factor(dtype)
    x64 = f64(x)
    w64 = f64(wt) if affine else torch.ones(c, dtype=torch.float64)
    sm, si = v(save_mean.double()), v(save_invstd.double())
    gp = f64(grad) * (out.detach() > 0) if relu else f64(grad)
    xc = x64 - sm
    sg, sgx = gp.sum((0, 2, 3)), (gp * xc).sum((0, 2, 3))
    dsg = gamma(m, dtype) * gp.abs().sum((0, 2, 3))
    dsgx = (gamma(m, dtype) + u) * (gp * xc).abs().sum((0, 2, 3))
    a = v(w64) * si
    if training:
        want_gi = a * (gp - v(sg) / m - xc * si * si * v(sgx) / m)
        bound_gi = v(w64.abs()) * si * (v(dsg) / m + xc.abs() * si * si * v(dsgx) / m) \
            + 4 * u * (a.abs() * (gp.abs() + v(sg.abs()) / m + xc.abs() * si * si * v(sgx.abs()) / m)) \
            + u * want_gi.abs()
    else:
        want_gi = gp * a
        bound_gi = 3 * u * want_gi.abs()
    assert_within(grads["input"], want_gi, k * bound_gi, "grad_input")
    if affine:
        want_gw = sgx * si.view(-1)
        assert_within(grads["weight"], want_gw, k * (dsgx * si.view(-1) + 2 * u * want_gw.abs()),
                      "grad_weight")
        assert_within(grads["bias"], sg, k * (dsg + u * sg.abs()), "grad_bias")
    if res_grad:
        gr = grads["residual"]
        assert gr.dtype == dtype and gr.shape == x.shape
        assert torch.equal(gr.double(), gp), "grad_residual is not grad_output masked by output > 0"


def run_op(case, dtype, cl, affine, relu, mode):
    """The case's tensors, and the op run on leaf copies of them (running stats in place):
    ``(x, res, wt, b, rm, rv, rm0, rv0, grad, leaves, out, save_mean, save_invstd)``."""
    x, res, wt, b, rm, rv, grad = make_case(case, dtype, cl, affine, mode)
    rm0, rv0 = rm.clone(), rv.clone()
    leaves = {"input": x.clone().requires_grad_(), "residual": res.clone().requires_grad_()}
    if affine:
        leaves.update(weight=wt.clone().requires_grad_(), bias=b.clone().requires_grad_())
    out, save_mean, save_invstd = ops.batch_norm(
        leaves["input"], leaves.get("weight"), leaves.get("bias"), rm, rv, mode == "train", 0.1,
        1e-5, relu, leaves["residual"])
    return x, res, wt, b, rm, rv, rm0, rv0, grad, leaves, out, save_mean, save_invstd


def grads_of(out, leaves: dict, grad) -> dict:
    return dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), grad)))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_training(case, dtype, cl, relu, affine):
    x, res, wt, b, rm, rv, rm0, rv0, grad, leaves, out, save_mean, save_invstd = run_op(
        case, dtype, cl, affine, relu, "train")
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    u = U[dtype]
    k = ref_factor(dtype)
    c = x.shape[1]

    x64 = f64(x)
    mean, var, dmean, dvar, m = bn_stats_bounds(x64, dtype)
    us = U[torch.float64 if dtype == torch.float64 else torch.float32]
    invstd = 1 / torch.sqrt(var + 1e-5)
    assert_within(save_mean, mean, k * (dmean + us * mean.abs()), "save_mean")
    assert_within(save_invstd, invstd, k * (invstd * dvar / (2 * (var + 1e-5)) + us * invstd),
                  "save_invstd")
    w64 = f64(wt) if affine else torch.ones(c, dtype=torch.float64)
    b64 = f64(b) if affine else torch.zeros(c, dtype=torch.float64)
    lin = F.batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5)
    pre = lin + f64(res)
    ref = F.relu(pre) if relu else pre
    scale = v(w64.abs() * invstd)
    bound_lin = scale * (v(dmean) + (x64 - v(mean)).abs() * v(dvar) / (2 * v(var + 1e-5))) \
        + 4 * u * (x64.abs() * scale + v(b64.abs()) + v(mean.abs()) * scale) + u * lin.abs()
    assert_within(out, ref, k * (bound_lin * (1 + u) + u * pre.abs()), "output")

    # running statistics as nn.BatchNorm2d's (the residual does not enter them)
    stock = nn.BatchNorm2d(c, momentum=0.1, eps=1e-5, affine=False).double()
    stock.running_mean.copy_(f64(rm0))
    stock.running_var.copy_(f64(rv0))
    stock.train()(x64)
    dmv = 0.1 * dvar * m / (m - 1)
    assert_within(rm, stock.running_mean, k * (0.1 * dmean + 2 * u * stock.running_mean.abs()),
                  "running_mean")
    assert_within(rv, stock.running_var, k * (dmv + 2 * u * stock.running_var.abs()),
                  "running_var")
    assert int(stock.num_batches_tracked) == 1

    grads = grads_of(out, leaves, grad)
    assert grads["input"].is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    check_grads(grads, out, grad, x, wt, save_mean, save_invstd, relu, True, affine, dtype, True)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_eval(case, dtype, cl, relu, affine):
    x, res, wt, b, rm, rv, rm0, rv0, grad, leaves, out, save_mean, save_invstd = run_op(
        case, dtype, cl, affine, relu, "eval")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch running stats"
    u = U[dtype]
    k = ref_factor(dtype)
    c = x.shape[1]
    w64 = f64(wt) if affine else torch.ones(c, dtype=torch.float64)
    b64 = f64(b) if affine else torch.zeros(c, dtype=torch.float64)
    invstd = 1 / torch.sqrt(f64(rv) + 1e-5)
    scale, shift = v(w64 * invstd), v(b64 - f64(rm) * w64 * invstd)
    lin = f64(x) * scale + shift
    pre = lin + f64(res)
    ref = F.relu(pre) if relu else pre
    # the kernel folds in float64: invstd = 1 / sqrt(rv + eps) (2.5u), scale = w * invstd (3.5u),
    # shift = b - (rm * w) * invstd (4.5u of |rm * scale|, u of |shift|), then one fused
    # multiply-add in the input dtype (u of |lin|); 4u / 5u / 2u cover the second-order terms.
    # The reference: the same folding, then a multiply and an add (5u of |x * scale|).
    bound_lin = u * (5 * f64(x).abs() * scale.abs() + 5 * (v(f64(rm)) * scale).abs()
                     + 2 * shift.abs()) + u * lin.abs()
    assert_within(out, ref, k * (bound_lin * (1 + u) + u * pre.abs()), "output")
    grads = grads_of(out, leaves, grad)
    check_grads(grads, out, grad, x, wt, save_mean, save_invstd, relu, False, affine, dtype, True)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=["8x8", "3x3", "2x2"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_op_output_mask(case, cl, relu, training):
    """The backward op's residual gradient (output_mask[3]) with and without grad_input: the
    same masked copy of grad_output either way, and grad_input unchanged by asking for it."""
    dtype = torch.float32
    x, res, wt, b, rm, rv, grad = make_case(case, dtype, cl, True, "mask")
    out, sm, si = ops.batch_norm(x, wt, b, rm, rv, training, 0.1, 1e-5, relu, res)
    y = out if relu else grad.new_empty((0,))
    gp = f64(grad) * (out > 0) if relu else f64(grad)
    base = ops.batch_norm_backward(grad, x, y, wt, sm, si, training, relu, [True, True, True, False])
    assert base[3].numel() == 0
    for mask in ([True, True, True, True], [True, False, False, True], [False, False, False, True],
                 [False, True, False, True]):
        gi, gw, gb, gr = ops.batch_norm_backward(grad, x, y, wt, sm, si, training, relu, mask)
        assert gr.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
        assert torch.equal(gr.double(), gp), f"grad_residual wrong with mask {mask}"
        if mask[0]:
            assert torch.equal(gi, base[0]), f"grad_input changed with mask {mask}"
        else:
            assert gi.numel() == 0
        if mask[1]:
            assert torch.equal(gw, base[1])


def test_residual_gradient_only_where_asked():
    """needs_input_grad of the residual maps onto output_mask[3]: a residual that does not
    require grad gets none, and the input's gradient is the same either way."""
    gen = generator("bn_residual_needs")
    x = randn((2, 4, 5, 5), gen)
    res = randn((2, 4, 5, 5), gen)
    g = grad_for((2, 4, 5, 5), gen, torch.float32, "cpu")
    xr = x.clone().requires_grad_()
    out, _, _ = ops.batch_norm(xr, None, None, None, None, True, 0.1, 1e-5, True, res)
    (gi_a,) = torch.autograd.grad(out, (xr,), g)
    xr2, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
    out2, _, _ = ops.batch_norm(xr2, None, None, None, None, True, 0.1, 1e-5, True, rr)
    assert torch.equal(out, out2)
    gi_b, gr = torch.autograd.grad(out2, (xr2, rr), g)
    assert torch.equal(gi_a, gi_b)
    assert torch.equal(gr, g * (out2 > 0))
    # only the residual
    rr3 = res.clone().requires_grad_()
    out3, _, _ = ops.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, True, rr3)
    (gr3,) = torch.autograd.grad(out3, (rr3,), g)
    assert torch.equal(gr3, g * (out3 > 0))


def test_residual_in_another_layout_and_bad_residual():
    gen = generator("bn_residual_layout")
    x = randn((2, 8, 4, 4), gen).contiguous(memory_format=CL)
    res = randn((2, 8, 4, 4), gen)  # NCHW while the input is channels_last
    rm, rv = torch.zeros(8), torch.ones(8)
    out, _, _ = ops.batch_norm(x, None, None, rm.clone(), rv.clone(), True, 0.1, 1e-5, True, res)
    same, _, _ = ops.batch_norm(x, None, None, rm.clone(), rv.clone(), True, 0.1, 1e-5, True,
                                res.contiguous(memory_format=CL))
    assert out.is_contiguous(memory_format=CL) and torch.equal(out, same)
    with pytest.raises(RuntimeError, match=r"residual shape \[2, 8, 4, 3\] does not match"):
        ops.batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5, True, res[..., :3])
    with pytest.raises(RuntimeError, match="residual dtype Double does not match"):
        ops.batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5, True, res.double())
    assert torch.equal(rm, torch.zeros(8)), "a rejected call changed the running mean"


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_opcheck(cl):
    gen = generator("bn_residual_opcheck", cl)
    x = layout(randn((2, 4, 5, 6), gen), cl).requires_grad_()
    r = layout(randn((2, 4, 5, 6), gen), cl).requires_grad_()
    w, b = torch.rand(4, generator=gen, requires_grad=True), torch.randn(4, generator=gen,
                                                                          requires_grad=True)
    out, sm, si = ops.batch_norm(x.detach(), w.detach(), b.detach(), None, None, True, 0.1, 1e-5,
                                 True, r.detach())
    g = layout(randn(out.shape, gen), cl)
    samples = [
        (ops.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), True, 0.1, 1e-5, True, r)),
        (ops.batch_norm.default, (x, None, None, None, None, True, 0.1, 1e-5, False, r)),
        (ops.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), False, 0.1, 1e-5, True, r)),
        (ops.batch_norm.default, (x, w, b, torch.zeros(4), torch.ones(4), True, 0.1, 1e-5, True, None)),
        (ops.batch_norm_backward.default,
         (g, x.detach(), out, w.detach(), sm, si, True, True, [True, True, True, True])),
        (ops.batch_norm_backward.default,
         (g, x.detach(), out, None, sm, si, False, True, [False, False, False, True])),
        (ops.batch_norm_backward.default,
         (g, x.detach(), g.new_empty((0,)), None, sm, si, True, False, [True, False, False, True])),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
