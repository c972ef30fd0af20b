"""torch integration: opcheck on every registered op, and on a GPU torch.compile(fullgraph=True)
of every converted model, CUDA-graph capture of a training step, AMP autocast.

* ``torch.library.opcheck`` on every ``fastconv::*`` op registered in this process (the
  extension's and the Triton ``fastconv::triton_*`` ones), with samples built by argument
  name, so an op added later without a sample fails here by name. This one also runs on CPU
  (Triton in the interpreter, where torch.compile of a triton_op cannot run: schema, autograd
  registration and fake tensors only; the GPU run adds AOT dispatch).
* GPU only (skipped cleanly without CUDA):
  - torch.compile(fullgraph=True) of each converted model on each backend, forward and
    backward, as accurate as the same model in eager mode (three small models by default;
    the other five are ``slow``);
  - a converted model's whole training step (forward, backward, SGD) captured in a CUDA graph
    and replayed on new data, against the same steps run eagerly;
  - AMP: autocast float16 (with GradScaler) and bfloat16 training steps of a converted model,
    at most twice as far from float32 as the stock model under the same autocast.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import dispatch, models
from fastconv.tools.common import capture_cuda_graph
from support import rel_err
from support import DEV, HAS_CUDA, require

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
ops = torch.ops.fastconv


# --------------------------------------------------------------------------- opcheck
def _load_everything():
    dispatch.prepare()  # imports the Triton modules, loads (or builds) the extension
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fastconv::"))


def _family(op: str) -> str:
    name = op.removeprefix("triton_")
    for fam in ("conv2d_relu", "max_pool2d", "adaptive_avg_pool2d", "avg_pool2d", "batch_norm"):
        if name.startswith(fam):
            return fam
    raise KeyError(op)


def _values(op: str) -> dict:
    """Argument values by schema name for ``op``, including the outputs of its family's
    forward op (for the backward ops) on the same backend."""
    triton = op.startswith("triton_")
    fam = _family(op)
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=False):
        return torch.randn(*s, generator=g).to(DEV).requires_grad_(grad)

    x = rnd(2, 4, 7, 7, grad=True)
    v = dict(input=x, channels_last=False, ceil_mode=False, relu=True,
             output_mask=[True, True, True], input_size=list(x.shape))
    if fam == "conv2d_relu":
        w, b = rnd(6, 4, 3, 3, grad=True), rnd(6, grad=True)
        geo = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
        y = (ops.triton_conv2d_relu if triton else ops.conv2d_relu)(
            x, w, b, *geo.values(), True).detach()
        gy = rnd(*y.shape)
        v.update(geo, weight=w, bias=b, output=y, grad_output=gy, grad=gy,
                 weight_size=list(w.shape), weight_channels_last=False, bias_grad=True,
                 write=True)
    elif fam == "max_pool2d":
        geo = dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1],
                   ceil_mode=False, return_indices=False)
        out, idx = (ops.triton_max_pool2d if triton else ops.max_pool2d)(
            x, *geo.values(), True)
        v.update(geo, output=out.detach(), indices=idx, grad_output=rnd(*out.shape))
    elif fam == "avg_pool2d":
        geo = dict(kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], ceil_mode=True,
                   count_include_pad=False, divisor_override=None)
        out = (ops.triton_avg_pool2d if triton else ops.avg_pool2d)(x, *geo.values())
        v.update(geo, grad_output=rnd(*out.shape))
    elif fam == "adaptive_avg_pool2d":
        v.update(output_size=[3, 2], grad_output=rnd(2, 4, 3, 2))
    else:
        w, b = rnd(4, grad=True), rnd(4, grad=True)
        stats = dict(running_mean=rnd(4) * 0.1, running_var=rnd(4).abs() + 0.5)
        v.update(stats, weight=w, bias=b, training=True, momentum=0.1, eps=1e-5,
                 grad_output=rnd(*x.shape), residual=rnd(*x.shape, grad=True),
                 output_mask=[True, True, True, True])
        s = {k: t.clone() for k, t in stats.items()}
        if triton:
            centre, mean, invstd = ops.triton_batch_norm_stats(x.detach(), s["running_mean"],
                                                               s["running_var"], True, 0.1, 1e-5)
            y = ops.triton_batch_norm(x, w, b, centre, invstd, True, True)
            v.update(centre=centre, save_mean=mean, save_invstd=invstd, output=y.detach())
        else:
            y, mean, invstd = ops.batch_norm(x, w, b, s["running_mean"], s["running_var"],
                                             True, 0.1, 1e-5, True)
            v.update(save_mean=mean, save_invstd=invstd, output=y.detach())
    return v


def _sample(op: str) -> list:
    schema = getattr(ops, op).default._schema
    values = _values(op)
    missing = [a.name for a in schema.arguments if a.name not in values]
    assert not missing, f"no opcheck sample value for {op}'s arguments {missing}: add them"
    # backward ops are not differentiable (double backward is refused by design): their
    # samples carry no requires_grad, the forward ops' do (opcheck checks their autograd)
    backward = op.endswith("_backward") or "_grad_" in op
    args = []
    for a in schema.arguments:
        val = values[a.name]
        if isinstance(val, torch.Tensor):
            val = val.detach().clone().requires_grad_(val.requires_grad and not backward)
        args.append(val)
    return args


def test_opcheck_every_registered_op():
    names = _load_everything()
    if dispatch.availability()["triton"] is not None:
        names = [n for n in names if not n.startswith("triton_")]
    if dispatch.availability()["extension"] is not None:
        names = [n for n in names if n.startswith("triton_")]
    if not names:
        pytest.skip("neither the extension nor Triton is available")
    failures = []
    for op in names:
        interpreted = op.startswith("triton_") and not HAS_CUDA
        utils = (("test_schema", "test_autograd_registration", "test_faketensor")
                 if interpreted else None)  # None: every test, AOT dispatch included
        try:
            torch.library.opcheck(getattr(ops, op).default, _sample(op),
                                  **({} if utils is None else dict(test_utils=utils)))
        except Exception as exc:
            failures.append(f"fastconv::{op}: {type(exc).__name__}: {str(exc)[:400]}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- GPU: compile
SMALL = {  # models at sizes that compile and run in seconds
    "alexnet": (lambda: models.alexnet(image_size=67), (2, 1, 67, 67)),
    "vgg11": (lambda: models.vgg11(narrow=True, image_size=32), (2, 1, 32, 32)),
    "vgg16_bn": (models.vgg16_bn, (2, 3, 32, 32)),
    "nin": (models.nin, (2, 1, 67, 67)),
    "googlenet": (models.googlenet, (2, 1, 32, 32)),
    "lenet": (lambda: models.lenet(variant="relu"), (2, 1, 28, 28)),
    "lenet_bn": (models.lenet_bn, (2, 1, 28, 28)),
    "resnet18": (models.resnet18, (2, 1, 32, 32)),
}
FAST_COMPILE = {"alexnet", "vgg16_bn", "resnet18"}
GPU_BACKENDS = ("triton", "extension", "torch")


def _no_dropout(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(mod, name, nn.Identity())
    return model


@pytest.fixture
def exact_fp32():
    """TF32 off, so compiled and eager float32 results differ only by summation order."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _compile_params():
    return [pytest.param(name, backend, id=f"{name}-{backend}",
                         marks=() if name in FAST_COMPILE else (pytest.mark.slow,))
            for name in sorted(SMALL) for backend in GPU_BACKENDS]


@requires_cuda
@pytest.mark.parametrize("name,backend", _compile_params())
def test_compile_fullgraph_converted_model(name, backend, exact_fp32):
    """The compiled converted model is as close to the float64 stock model as the eager
    converted model is (output and every gradient: at most twice its error plus a millionth
    of the whole gradient's norm; small batch-norm nets are ill-conditioned enough that
    compiled and eager float32 differ by ~1e-3 relative while both are right)."""
    require(backend)
    torch._dynamo.reset()
    build, shape = SMALL[name]
    torch.manual_seed(0)
    stock = _no_dropout(build()).cuda()
    model = fastconv.convert(stock, backend=backend)
    twin = copy.deepcopy(model)
    ref = copy.deepcopy(stock).double()
    x = torch.randn(*shape, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    outs = []
    for m, inp in ((compiled, x), (twin, x), (ref, x.double())):
        out = m(inp)
        out.square().mean().backward()
        outs.append(out)
    out_c, out_e, out_r = outs
    assert rel_err(out_c, out_r) <= 2 * rel_err(out_e, out_r) + 1e-5, (
        f"{name} {backend}: compiled output error {rel_err(out_c, out_r):.2e}, eager "
        f"{rel_err(out_e, out_r):.2e}")
    total = sum(float(r.grad.norm()) ** 2 for r in ref.parameters()) ** 0.5
    for (k, p), (_, q), (_, r) in zip(model.named_parameters(), twin.named_parameters(),
                                      ref.named_parameters()):
        err_c = float((p.grad.double() - r.grad).norm())
        err_e = float((q.grad.double() - r.grad).norm())
        assert err_c <= 2 * err_e + 1e-6 * total, (
            f"{name} {backend}: grad of {k}: compiled error {err_c:.2e}, eager {err_e:.2e}")
    for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        if a.is_floating_point():
            assert rel_err(a, b) < 1e-4, f"{name} {backend}: {k}"
        else:
            assert torch.equal(a, b), f"{name} {backend}: {k}"


# --------------------------------------------------------------------------- GPU: CUDA graphs
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_captures_a_training_step(backend, exact_fp32):
    """Capture forward + backward + SGD step of a converted VGG-16-BN (conv+BN+ReLU, max-pool,
    running statistics updated in place) and replay it on new batches: parameters and
    statistics follow the same steps run eagerly."""
    require(backend)
    torch.manual_seed(0)
    model = fastconv.convert(models.vgg16_bn().cuda(), backend=backend)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    static_x = torch.randn(8, 3, 32, 32, device="cuda")
    static_y = torch.randint(0, 10, (8,), device="cuda")

    def step(m, o, x, y):
        o.zero_grad(set_to_none=False)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    batches = [(torch.randn(8, 3, 32, 32, device="cuda"),
                torch.randint(0, 10, (8,), device="cuda")) for _ in range(6)]
    def load(xy):
        static_x.copy_(xy[0])
        static_y.copy_(xy[1])

    graph, static_loss = capture_cuda_graph(lambda: step(model, opt, static_x, static_y),
                                            batches[:3], load)
    for x, y in batches[:3]:  # the twin takes the same warm-up steps, eagerly
        step(twin, twin_opt, x, y)
    for x, y in batches[3:]:
        load((x, y))
        graph.replay()
        loss = step(twin, twin_opt, x, y)
        torch.cuda.synchronize()
        # a replay launches the very kernels of an eager step, whose reductions have a fixed
        # order (docs/RELIABILITY.md): bitwise equal, not merely close
        assert torch.equal(static_loss, loss), "replayed loss differs from eager"
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), f"{backend}: {k} after graph replays"


# --------------------------------------------------------------------------- GPU: AMP
def _amp_step(model, x, y, dtype):
    """Output, loss and unscaled float32 gradients of one step (dtype None: float32)."""
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
    scaler.scale(loss).backward()
    grads = {k: p.grad.float() / scaler.get_scale() for k, p in model.named_parameters()}
    return out, loss, grads


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_amp_autocast_training_step(name, backend, dtype, exact_fp32):
    """A converted model under autocast is as close to the float32 result as the stock model
    under the same autocast: at most twice the stock model's error (output and every
    gradient) plus 1e-3, the flash-attention rule. Output dtypes match the stock model's."""
    require(backend)
    build, shape = SMALL[name]
    torch.manual_seed(0)
    stock = _no_dropout(build()).cuda()
    fast = fastconv.convert(stock, backend=backend)
    ref_model = copy.deepcopy(stock)
    x = torch.randn(*shape, device="cuda")
    y = torch.randint(0, 10, (shape[0],), device="cuda")
    ro, _, rg = _amp_step(ref_model, x, y, None)       # float32 reference
    so, sl, sg = _amp_step(stock, x, y, dtype)         # stock under autocast
    fo, fl, fg = _amp_step(fast, x, y, dtype)          # converted under autocast
    assert fo.dtype == so.dtype, f"autocast output dtype {fo.dtype}, stock {so.dtype}"
    assert torch.isfinite(fl), f"loss {fl}"
    assert rel_err(fo, ro) <= 2 * rel_err(so, ro) + 1e-3, (rel_err(fo, ro), rel_err(so, ro))
    for k in rg:
        assert torch.isfinite(fg[k]).all(), f"{k}: non-finite gradient under AMP"
        assert rel_err(fg[k], rg[k]) <= 2 * rel_err(sg[k], rg[k]) + 1e-3, (
            f"{k}: {rel_err(fg[k], rg[k]):.3e} vs stock {rel_err(sg[k], rg[k]):.3e}")
