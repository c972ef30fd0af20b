"""Test support: float64 references, error bounds derived from the arithmetic, seeds, backends.

References are the "torch" backend (fastconv/backends/reference.py) run on float64 copies of
the inputs. Bounds are elementwise: a sum of L terms accumulated in unit roundoff u errs by at
most gamma(L) * sum|terms| (gamma(L) = L u / (1 - L u)); sum|terms| is the same float64 op run
on absolute values. The stored result adds one rounding of the output dtype. Batch norm's
bounds also carry the error of its statistics through the normalisation.

The Triton modules are imported here and in conftest.py only (``triton_module``), so that a
rename touches two files.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastconv.backends.reference import TorchBackend

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ("torch", "extension", "triton")
DEVICES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)
KERNEL_BACKENDS = ("extension", "triton")
# unit roundoff of each storage dtype
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
     torch.bfloat16: 2.0**-8}
REF = TorchBackend()

# the module of each op under fastconv/backends/triton/ ("utils": the shared helpers)
_TRITON_MODULES = {"conv2d_relu": "conv2d_relu", "max_pool2d": "max_pool2d",
                   "avg_pool2d": "avg_pool2d", "adaptive_avg_pool2d": "avg_pool2d",
                   "batch_norm": "batch_norm", "utils": "utils"}


def triton_module(op: str):
    """The Triton module implementing ``op`` ("utils" for the shared helpers)."""
    return importlib.import_module(f"fastconv.backends.triton.{_TRITON_MODULES[op]}")


# --------------------------------------------------------------------------- batch norm
def bn_stats_bounds(x64, dtype):
    """float64 batch statistics of x64 and the extension kernels' error bounds on them: sums
    of d = x - K and d^2, K the mean of the finite values among each channel's first 64
    elements in (n, h, w) order (csrc/cpu/batch_norm.cpp), at most M terms per accumulator.
    Returns (mean, var, mean's bound, var's bound, M)."""
    n, c, h, w = x64.shape
    m = n * h * w
    flat = x64.transpose(0, 1).reshape(c, -1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    head = flat[:, :64]
    fin = head.isfinite()
    k = (head.where(fin, 0).sum(1) / fin.sum(1).clamp_min(1)).unsqueeze(1)
    d = flat - k
    g = gamma(m, dtype) + 2 * U[dtype]
    return mean, var, g * d.abs().mean(1) + U[dtype] * mean.abs(), 3 * g * (d * d).mean(1), m


# --------------------------------------------------------------------------- seeds and data
def seed_for(*params) -> int:
    """A seed fixed by a case's parameters (crc32 of their repr: stable across processes,
    unlike hash())."""
    return zlib.crc32(repr(params).encode())


def generator(*params) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*params))


def randn(shape, gen, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0):
    """Normal values made in float64 then rounded once to ``dtype`` (the reference sees the
    same values)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    return x.to(dtype).to(device)


def grad_for(shape, gen, dtype, device):
    """An output gradient with a non-zero mean per element: sums over it (grad_bias, the
    batch-norm terms) do not cancel, so a relative error of one channel shows above the
    rounding bound."""
    return randn(shape, gen, dtype, device, scale=0.5, shift=1.0)


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --------------------------------------------------------------------------- bounds
def unit_roundoff(dtype) -> float:
    return U[dtype]


def acc_dtype(dtype):
    """Kernels accumulate in float32, float64 inputs in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n: int, dtype=torch.float32) -> float:
    """Bound on the relative error of a sum of n terms accumulated in ``dtype``."""
    nu = n * U[dtype]
    assert nu < 0.5, f"gamma({n}) meaningless in {dtype}"
    return nu / (1 - nu)


def assert_within(actual, ref, bound, what=""):
    """|actual - ref| <= bound elementwise (bound a number or a tensor broadcasting to ref).

    One NaN rule: ``actual`` is NaN exactly where ``ref`` is NaN (an unwritten, poisoned
    element therefore fails); infinities must match exactly."""
    a = actual.detach().double().cpu()
    r = ref.detach().double().cpu()
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != {tuple(r.shape)}"
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    assert torch.equal(nan_a, nan_r), (
        f"{what}: NaN at {int(nan_a.sum())} places, reference at {int(nan_r.sum())}")
    inf = torch.isinf(r) | torch.isinf(a)
    assert torch.equal(a[inf], r[inf]), f"{what}: infinities differ"
    ok = ~(nan_r | inf)
    err = (a - r).abs()[ok]
    bnd = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(r)[ok]
    if err.numel() and not bool((err <= bnd).all()):
        worst = int(torch.argmax(err - bnd))
        where = torch.nonzero(ok)[worst].tolist()
        raise AssertionError(
            f"{what}: |error| {err[worst]:.3e} > bound {bnd[worst]:.3e} at {where} "
            f"({int((err > bnd).sum())} of {err.numel()} elements out of bound)")


def assert_layout(t, like, what=""):
    """``t`` has the memory format torch gives ``like``'s (channels_last stays)."""
    cl = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
        and not like.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert t.is_contiguous(memory_format=fmt), f"{what}: strides {t.stride()} not {fmt}"


# --------------------------------------------------------------------------- backends
def require(backend: str, device=None) -> None:
    """Skip, with the backend's reason, when it cannot run on ``device`` here."""
    from fastconv import dispatch

    reason = dispatch.availability()[backend]
    if reason is None and backend == "triton" and str(device) == "cpu":
        from fastconv.backends.triton import interpreter_enabled
        if not interpreter_enabled():
            reason = "the Triton interpreter is off (a GPU is present)"
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")


def backend_params(backends=KERNEL_BACKENDS):
    """(backend, device) pairs for parametrize: every kernel backend on every device."""
    return [pytest.param((b, d), id=f"{b}-{d}") for b in backends for d in DEVICES]


def run(op: str, args: dict, backend: str, grad_out=None, wants=None):
    """``fastconv.functional.<op>`` on copies of ``args``: (output, indices or None, grads by
    argument name, args as used (running statistics updated))."""
    import fastconv.functional as FF

    a = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    names = [n for n in (wants or GRAD_ARGS[op]) if isinstance(a.get(n), torch.Tensor)]
    if grad_out is not None:
        for n in names:
            a[n].requires_grad_(True)
    res = getattr(FF, op)(**a, backend=backend)
    out, idx = res if isinstance(res, tuple) else (res, None)
    grads = {}
    if grad_out is not None and names:
        grads = dict(zip(names, torch.autograd.grad(out, [a[n] for n in names], grad_out)))
    return out, idx, grads, a


GRAD_ARGS = {"conv2d_relu": ("input", "weight", "bias"), "batch_norm": ("input", "weight", "bias"),
             "max_pool2d": ("input",), "avg_pool2d": ("input",), "adaptive_avg_pool2d": ("input",)}


def f64(t, grad=False):
    return None if t is None else t.detach().double().requires_grad_(grad)


# --------------------------------------------------------------------------- conv2d_relu
def conv_reference(x, w, b, stride, padding, dilation, groups, relu, out, grad_out):
    """float64 output, gradients and bounds of conv2d(+ReLU). The backward reference uses the
    kernel's own ReLU mask where the pre-activation is within its bound of zero."""
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x64, w64, b64 = f64(x), f64(w), f64(b)
    acc, u_out = acc_dtype(x.dtype), U[x.dtype]
    pre = F.conv2d(x64, w64, b64, **geo)
    ref = REF.conv2d_relu(x64, w64, b64, relu=relu, **geo)
    mag = F.conv2d(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), **geo)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    bound = gamma(k + 1, acc) * mag + u_out * ref.abs()
    res = {"output": (ref, bound)}
    if grad_out is None:
        return res
    g = grad_out.double()
    if relu:
        # torch's ReLU passes the gradient where the output is not <= 0: through NaN too
        live = ~(out.detach() <= 0)
        mask = live.double()
        flips = live != ~(pre <= 0)
        assert bool((~flips | (pre.abs() <= bound)).all()), "ReLU mask differs beyond rounding"
        g = g * mask
    ga = g.abs()
    n_pix = g.shape[0] * g.shape[2] * g.shape[3]
    kk = w.shape[0] // groups * w.shape[2] * w.shape[3]
    dx = torch.nn.grad.conv2d_input(x.shape, w64, g, **geo)
    dx_mag = torch.nn.grad.conv2d_input(x.shape, w64.abs(), ga, **geo)
    dw = torch.nn.grad.conv2d_weight(x64, w.shape, g, **geo)
    dw_mag = torch.nn.grad.conv2d_weight(x64.abs(), w.shape, ga, **geo)
    # grad_weight/grad_bias sum n_pix products; split-K partials add at most 64 more roundings
    res["input"] = (dx, gamma(kk, acc) * dx_mag + u_out * dx.abs())
    res["weight"] = (dw, gamma(n_pix + 64, acc) * dw_mag + u_out * dw.abs())
    if b is not None:
        db = g.sum((0, 2, 3))
        res["bias"] = (db, gamma(n_pix + 64, acc) * ga.sum((0, 2, 3)) + u_out * db.abs())
    return res


# --------------------------------------------------------------------------- pools
def max_pool_reference(x, kernel_size, stride, padding, dilation, ceil_mode, relu, grad_out):
    """float64 output (exact: a max is one of its inputs), indices, and the gradient with its
    bound (an input that wins several windows sums their gradients)."""
    k, s = pair(kernel_size), pair(stride if stride else kernel_size)
    x64 = f64(x, grad=True)
    ref, idx = F.max_pool2d(x64, k, s, padding, dilation, ceil_mode, return_indices=True)
    if relu:
        ref = torch.relu(ref)
    res = {"output": (ref.detach(), 0.0), "indices": idx}
    if grad_out is not None:
        (dx,) = torch.autograd.grad(ref, x64, grad_out.double())
        x64b = f64(x, grad=True)
        refb = F.max_pool2d(x64b, k, s, padding, dilation, ceil_mode)
        (mag,) = torch.autograd.grad(refb, x64b, grad_out.double().abs())
        dd = pair(dilation)
        wins = math.ceil(k[0] * dd[0] / s[0]) * math.ceil(k[1] * dd[1] / s[1])
        res["input"] = (dx, gamma(wins, acc_dtype(x.dtype)) * mag + U[x.dtype] * dx.abs())
    return res


def avg_pool_reference(op, x, params, grad_out):
    """float64 output and gradient of avg_pool2d / adaptive_avg_pool2d with bounds: a window
    sum of at most ``window`` terms and one division."""
    x64 = f64(x, grad=True)
    xa = f64(x.abs(), grad=True)
    fn = getattr(REF, op)
    ref, mag = fn(x64, **params), fn(xa, **params)
    if op == "avg_pool2d":
        window = pair(params["kernel_size"])[0] * pair(params["kernel_size"])[1]
    else:
        h, w = x.shape[-2:]
        oh, ow = pair(params["output_size"])
        oh, ow = oh or h, ow or w
        window = (math.ceil(h / oh) + 1) * (math.ceil(w / ow) + 1)
    acc = acc_dtype(x.dtype)
    res = {"output": (ref.detach(), gamma(window + 1, acc) * mag.detach()
                      + U[x.dtype] * ref.detach().abs())}
    if grad_out is not None:
        (dx,) = torch.autograd.grad(ref, x64, grad_out.double())
        (dmag,) = torch.autograd.grad(mag, xa, grad_out.double().abs())
        res["input"] = (dx, gamma(window + 1, acc) * dmag + U[x.dtype] * dx.abs())
    return res


# --------------------------------------------------------------------------- batch norm
def _v(t):
    return t.view(1, -1, 1, 1)


def bn_reference(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                 out, grad_out):
    """float64 output, gradients, running statistics and their bounds for batch norm.

    Training statistics are sums of m = N*H*W terms of d = x - x[0, c, 0, 0] (both kernels
    shift by one sample of the channel): |mean error| <= dmean, |variance error| <= dvar. They
    propagate through y = (x - mean) * invstd * w + b as |w| invstd (dmean + |x - mean|
    dvar / (2 (var + eps))), so the bound is meaningful for two values per channel (m = 2)
    and for channel means far from zero (the shifted sums do not see the mean)."""
    n, c, h, w_ = x.shape
    training = training or running_mean is None  # no running statistics: batch statistics
    x64 = f64(x)
    acc, u_out = acc_dtype(x.dtype), U[x.dtype]
    ua = U[acc]
    w64 = f64(weight) if weight is not None else torch.ones(c, dtype=torch.float64,
                                                             device=x.device)
    b64 = f64(bias) if bias is not None else torch.zeros(c, dtype=torch.float64,
                                                         device=x.device)
    if training:
        m = n * h * w_
        flat = x64.transpose(0, 1).reshape(c, -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        d = flat - flat[:, :1]
        g = gamma(2 * m, acc) + 2 * ua
        dmean = g * d.abs().mean(1)
        dvar = 3 * g * (d * d).mean(1) + 2 * dmean * (d.mean(1) - mean + flat[:, 0]).abs()
        # a kernel may subtract the mean itself, rounded to float32, rather than the shift
        dmean = dmean + 2 * ua * mean.abs()
    else:
        m = None
        mean, var = f64(running_mean), f64(running_var)
        # the running statistics are read in their own dtype: exact in float64
        dmean = ua * mean.abs()
        dvar = ua * var.abs()
    invstd = 1 / torch.sqrt(var + eps)
    rel_inv = dvar / (2 * (var + eps)) + 2 * ua
    ref_lin = (x64 - _v(mean)) * _v(invstd * w64) + _v(b64)
    ref = torch.relu(ref_lin) if relu else ref_lin
    scale = _v(w64.abs() * invstd)
    xc = (x64 - _v(mean)).abs()
    bound = scale * (_v(dmean) + xc * _v(rel_inv)) \
        + 4 * ua * (xc * scale + _v(b64.abs())) + u_out * ref.abs()
    if not training:
        # eval kernels (and torch's) fold into y = x * a + (b - mean * a), a = w * invstd:
        # x * a and mean * a are rounded at |x| |a| and |mean| |a|, not at |x - mean| |a|,
        # which for means far from zero is far more: u |a| (2 |x| + 3 |mean|) to first order
        bound = bound + ua * scale * (2 * x64.abs() + 3 * _v(mean.abs()))
    res = {"output": (ref, bound)}
    if training and running_mean is not None and momentum is not None:
        mom = momentum
        rm0, rv0 = f64(running_mean), f64(running_var)
        want_rm = (1 - mom) * rm0 + mom * mean
        want_rv = (1 - mom) * rv0 + mom * var * m / (m - 1)
        us = U[running_mean.dtype]
        res["running_mean"] = (want_rm, mom * dmean + 3 * us * (rm0.abs() + mom * mean.abs()))
        res["running_var"] = (want_rv, mom * dvar * m / (m - 1)
                              + 3 * us * (rv0.abs() + mom * var * m / (m - 1)))
    if grad_out is None:
        return res
    g = grad_out.double()
    if relu:
        # the kernel's own mask where the output is within its bound of zero
        # (not <= 0: torch's ReLU passes the gradient through NaN)
        mask = ~(out.detach().double() <= 0)
        assert bool(((mask == ~(ref_lin <= 0)) | (ref_lin.abs() <= bound)).all()), \
            "ReLU mask differs beyond rounding"
        g = g * mask
    ga = g.abs()
    dims = (0, 2, 3)
    db = g.sum(dims)
    xhat = (x64 - _v(mean)) * _v(invstd)
    sgx = (g * xhat).sum(dims)
    dw = sgx
    if training:
        mm = m
        dx = _v(w64 * invstd) * (g - _v(db) / mm - xhat * _v(sgx) / mm)
        # terms of the sums, and the statistics' errors (xhat off by (dmean + |x-mean| rel_inv)
        # invstd, invstd off by rel_inv)
        dxhat = _v(dmean * invstd) + xhat.abs() * _v(rel_inv)
        mg = _v(ga.sum(dims)) / mm
        mgx = _v((ga * (xhat.abs() + dxhat)).sum(dims)) / mm
        terms = scale * (ga + mg + (xhat.abs() + dxhat) * mgx)
        dx_bound = (gamma(mm + 4, acc) + _v(rel_inv)) * terms \
            + scale * (dxhat * mgx + xhat.abs() * _v((ga * dxhat).sum(dims)) / mm) \
            + u_out * dx.abs()
    else:
        dx = _v(w64 * invstd) * g
        dx_bound = (2 * ua + _v(rel_inv)) * scale * ga + u_out * dx.abs()
    res["input"] = (dx, dx_bound)
    mg_sum = ga.sum(dims)
    if weight is not None:
        dxh = _v(dmean * invstd) + xhat.abs() * _v(rel_inv)
        res["weight"] = (dw, gamma(m or n * h * w_, acc) * (ga * xhat.abs()).sum(dims)
                         + (ga * dxh).sum(dims) + 2 * ua * dw.abs()
                         + U[weight.dtype] * dw.abs())
    if bias is not None:
        res["bias"] = (db, gamma(n * h * w_, acc) * mg_sum + U[bias.dtype] * db.abs())
    return res


# --------------------------------------------------------------------------- whole models
# Relative L2 norms, for comparisons of whole models and training runs only (where rounding
# differences propagate through many layers and no elementwise bound is derived): single ops
# are compared with assert_within against the bounds above.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3,
           torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), "result has NaN (unwritten or poisoned elements?)"
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol=None, what=""):
    """Whole-model comparisons only (see above)."""
    tol = tol if tol is not None else REL_TOL[dtype or actual.dtype]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------- whole-call checks
# Used by test_reliability_numerics.py, test_property.py and test_determinism.py: any op,
# arguments by name, against float64 within the elementwise bounds above.
# Which tensor arguments each op differentiates, and the running statistics it mutates.
STATS = ("running_mean", "running_var")


def make_case(op: str, shape, dtype=torch.float32, *, scale=1.0, shift=0.0, seed=0,
              device=None, **params) -> dict:
    """Random arguments of ``op`` (keyword dict for fastconv.functional) on ``device`` (DEV
    by default).

    conv2d_relu takes ``out_channels``, ``kernel`` (pair) and ``bias`` (bool) in ``params``;
    batch_norm takes ``affine`` and ``stats`` (bools); ``channels_last=True`` makes the input
    channels_last.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = (rnd(*shape) * scale + shift).to(dtype)
    if params.pop("channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    args = {"input": x}
    if op == "conv2d_relu":
        k = params.pop("out_channels")
        kh, kw = params.pop("kernel")
        groups = params.get("groups", 1)
        cin = shape[1] // groups
        args["weight"] = (rnd(k, cin, kh, kw) / math.sqrt(max(1, cin * kh * kw))).to(dtype)
        args["bias"] = (rnd(k) * 0.5).to(dtype) if params.pop("bias", True) else None
    elif op == "batch_norm":
        c = shape[1]
        affine, stats = params.pop("affine", True), params.pop("stats", True)
        pdtype = params.pop("param_dtype", dtype)
        args["running_mean"] = (rnd(c) * 0.1).to(pdtype) if stats else None
        args["running_var"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(
            pdtype) if stats else None
        args["weight"] = (rnd(c) * 0.5 + 1).to(pdtype) if affine else None
        args["bias"] = (rnd(c) * 0.5).to(pdtype) if affine else None
    args.update(params)
    dev = DEV if device is None else device
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _copy_args(args: dict, dtype=None) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if dtype is not None:
                v = v.to(dtype)
        out[k] = v
    return out


def _leaves(op: str, args: dict, grad: bool) -> list[str]:
    names = [n for n in GRAD_ARGS[op] if isinstance(args.get(n), torch.Tensor)]
    if grad:
        for n in names:
            args[n].requires_grad_(True)
    return names


def _split(op: str, result):
    if op == "max_pool2d" and isinstance(result, tuple):
        return result[0], result[1]
    return result, None


def call(op: str, args: dict, backend, grad_out=None):
    """Run ``op`` on copies of ``args``: (output, indices or None, {grad name: grad},
    {running stat name: tensor after the call})."""
    a = _copy_args(args)
    names = _leaves(op, a, grad_out is not None)
    out, idx = _split(op, getattr(importlib.import_module("fastconv.functional"), op)(**a, backend=backend))
    grads = {}
    if grad_out is not None and names:
        got = torch.autograd.grad(out, [a[n] for n in names], grad_out, allow_unused=True)
        grads = dict(zip(names, got))
    return out, idx, grads, {n: a[n] for n in STATS if a.get(n) is not None}


def torch_op(op: str, a: dict):
    """The torch.nn.functional composition fastconv's op stands for."""
    if op == "conv2d_relu":
        y = F.conv2d(a["input"], a["weight"], a.get("bias"), a.get("stride", 1),
                     a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
        return torch.relu(y) if a.get("relu", True) else y
    if op == "max_pool2d":
        res = F.max_pool2d(a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0),
                           a.get("dilation", 1), a.get("ceil_mode", False),
                           a.get("return_indices", False))
        if not a.get("relu", False):
            return res
        return (torch.relu(res[0]), res[1]) if isinstance(res, tuple) else torch.relu(res)
    if op == "avg_pool2d":
        return F.avg_pool2d(a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0),
                            a.get("ceil_mode", False), a.get("count_include_pad", True),
                            a.get("divisor_override"))
    if op == "adaptive_avg_pool2d":
        return F.adaptive_avg_pool2d(a["input"], a["output_size"])
    y = F.batch_norm(a["input"], a.get("running_mean"), a.get("running_var"), a.get("weight"),
                     a.get("bias"), a.get("training", False), a.get("momentum", 0.1),
                     a.get("eps", 1e-5))
    return torch.relu(y) if a.get("relu", False) else y


def reference(op: str, args: dict, grad_out=None, dtype=torch.float64):
    """torch.nn.functional on float64 copies (``dtype=None``: on copies in their own dtypes,
    torch's own answer): same tuple as :func:`call`."""
    a = _copy_args(args, dtype)
    names = _leaves(op, a, grad_out is not None)
    out, idx = _split(op, torch_op(op, a))
    grads = {}
    if grad_out is not None and names:
        g = grad_out if dtype is None else grad_out.to(dtype)
        got = torch.autograd.grad(out, [a[n] for n in names], g, allow_unused=True)
        grads = dict(zip(names, got))
    return out, idx, grads, {n: a[n] for n in STATS if a.get(n) is not None}


def grad_like(out: torch.Tensor, seed=1_000_003) -> torch.Tensor:
    # a seed no make_case call uses: a gradient equal to the input's noise would make batch
    # norm's grad_input cancel to nothing
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)


def op_reference(op: str, args: dict, out=None, grad_out=None) -> dict:
    """float64 results of ``op`` on ``args`` (make_case's dict) with their elementwise bounds:
    {"output": (ref, bound), "indices": ..., <grad name>: (ref, bound), <statistic>: ...}.
    ``out`` is the kernel's output (conv and batch norm take their ReLU mask from it)."""
    x = args["input"]
    if op == "conv2d_relu":
        return conv_reference(x, args["weight"], args.get("bias"), args.get("stride", 1),
                              args.get("padding", 0), args.get("dilation", 1),
                              args.get("groups", 1), args.get("relu", True), out, grad_out)
    if op == "max_pool2d":
        return max_pool_reference(x, args["kernel_size"], args.get("stride"),
                                  args.get("padding", 0), args.get("dilation", 1),
                                  args.get("ceil_mode", False), args.get("relu", False),
                                  grad_out)
    if op == "avg_pool2d":
        p = dict(kernel_size=args["kernel_size"], stride=args.get("stride"),
                 padding=args.get("padding", 0), ceil_mode=args.get("ceil_mode", False),
                 count_include_pad=args.get("count_include_pad", True),
                 divisor_override=args.get("divisor_override"))
        return avg_pool_reference(op, x, p, grad_out)
    if op == "adaptive_avg_pool2d":
        return avg_pool_reference(op, x, dict(output_size=args["output_size"]), grad_out)
    return bn_reference(x, args.get("weight"), args.get("bias"), args.get("running_mean"),
                        args.get("running_var"), args.get("training", False),
                        args.get("momentum", 0.1), args.get("eps", 1e-5),
                        args.get("relu", False), out, grad_out)


def with_overflow(ref: torch.Tensor, dtype) -> torch.Tensor:
    """The float64 reference with +-Inf where its value overflows ``dtype`` (what a kernel
    storing in ``dtype`` must give there)."""
    stored = ref.to(dtype).double()
    return torch.where(torch.isinf(stored) & torch.isfinite(ref), stored, ref)


def check_against_reference(op, args, backend, what="", grads=True, grad_out=None):
    """Output, indices, every gradient and the running statistics against float64, each
    element within its bound (op_reference); NaN and Inf exactly where the reference has
    them. Returns the output."""
    dtype = args["input"].dtype
    probe, *_ = call(op, args, "torch")  # the output shape, for the gradient
    g = grad_out
    if g is None and grads and probe.numel():
        gen = generator("check_against_reference", op, tuple(probe.shape))
        g = grad_for(probe.shape, gen, dtype, probe.device)
    out, idx, gr, stats = call(op, args, backend, g)
    if backend == "torch" and dtype in (torch.float16, torch.bfloat16):
        # the torch backend is stock torch, whose 16-bit CPU kernels round intermediates in
        # the 16-bit dtype (pool and batch-norm backward): the bounds below assume float32
        # accumulation, so they do not hold for it. What is checked instead: dispatch ran
        # torch's own computation (its result in the same dtypes, bitwise).
        own, own_idx, own_gr, own_stats = reference(op, args, g, dtype=None)
        assert_within(out, own, 0.0, f"{what} output (torch's own)")
        for name, got in list(gr.items()) + list(stats.items()):
            assert_within(got, {**own_gr, **own_stats}[name], 0.0, f"{what} {name}")
        return out
    ref = op_reference(op, args, out, g)
    r_out = ref["output"][0]
    assert out.shape == r_out.shape and out.dtype == dtype, (
        f"{what}: output {tuple(out.shape)} {out.dtype}, reference {tuple(r_out.shape)}")
    assert_within(out, with_overflow(r_out, dtype), ref["output"][1], f"{what} output")
    if args.get("return_indices"):
        assert torch.equal(idx.cpu(), ref["indices"].cpu()), (
            f"{what}: indices differ from torch's")
    for name, got in gr.items():
        r, bound = ref[name]
        assert got is not None and got.shape == r.shape, f"{what}: grad of {name} missing"
        assert_within(got, with_overflow(r, got.dtype), bound, f"{what} grad {name}")
    for name, got in stats.items():
        if name in ref:
            assert_within(got, *ref[name], f"{what} {name}")
        else:  # eval (or momentum None through the functional API) leaves them alone
            assert torch.equal(got, args[name]), f"{what}: {name} changed"
    return out


# --------------------------------------------------------------------------- data files
def fake_fashion(root, n_train=40, n_test=16, gz=True, seed=0, layout="torchvision"):
    """Small FashionMNIST IDX files in the standard names; returns the arrays written."""
    import numpy as np

    from fastconv.tools import data as D

    rng = np.random.default_rng(seed)
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        D.write_idx(folder / (D.FASHION_FILES[key] + (".gz" if gz else "")), arr)
    return arrays


def png_text(data: bytes) -> dict:
    """The tEXt chunks of a PNG, walking every chunk to IEND (a truncated file fails)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = {}, 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        if kind == b"tEXt":
            k, _, v = data[i + 8:i + 8 + n].partition(b"\0")
            out[k.decode()] = v.decode("latin-1")
        i += 12 + n
        if kind == b"IEND":
            break
    assert i == len(data), "PNG chunks do not end at IEND"
    return out
