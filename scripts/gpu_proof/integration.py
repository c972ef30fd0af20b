"""Stage 1, torch integration on the GPU: ``torch.compile(fullgraph=True)`` of converted AlexNet
and ResNet-18 training steps per CUDA backend, and a converted training step (forward,
backward, SGD) captured in a CUDA graph and replayed on new batches.

Each compiled step is held to the eager converted model against a float64 copy of the stock
model: output and every gradient at most twice the eager error plus 1e-5 of the reference's
norm (TF32 off, so compiled and eager differ only by summation order). A graph replay follows
the same steps run eagerly. (opcheck of every op runs in the pytest stages; the report lists it.)
"""
from __future__ import annotations

import copy

from common import Results, Skip, device_and_smoke, parse_args


def _no_dropout(model):
    import torch

    for mod in model.modules():
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.Dropout):
                setattr(mod, name, torch.nn.Identity())
    return model


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _require(backend: str) -> None:
    from fastconv import dispatch

    reason = dispatch.get(backend).unavailable_reason()
    if reason:
        raise Skip(f"{backend}: {reason.splitlines()[0]}")


def compile_step(name: str, backend: str, device, batch: int, smoke: bool) -> dict:
    import torch
    import torch.nn.functional as F

    import fastconv
    from fastconv import models

    _require(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    size = models.INPUT_SIZES[name]
    stock = _no_dropout(models.build(name)).to(device)
    model = fastconv.convert(stock, backend=backend)
    twin = copy.deepcopy(model)
    ref = copy.deepcopy(stock).double()
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    # inductor on a CPU machine takes minutes: the smoke checks the trace (fullgraph) only
    compiled = torch.compile(model, fullgraph=True, backend="eager" if smoke else "inductor")
    outs = []
    for m, inp in ((compiled, x), (twin, x), (ref, x.double())):
        out = m(inp)
        F.cross_entropy(out.double(), y).backward()
        outs.append(out)
    err_c, err_e = _rel(outs[0], outs[2]), _rel(outs[1], outs[2])
    if err_c > 2 * err_e + 1e-5:
        raise AssertionError(f"compiled output error {err_c:.2e} > 2 x eager {err_e:.2e} + 1e-5")
    worst = 0.0
    for (k, p), (_, q), (_, r) in zip(model.named_parameters(), twin.named_parameters(),
                                      ref.named_parameters()):
        ec, ee = _rel(p.grad, r.grad), _rel(q.grad, r.grad)
        if ec > 2 * ee + 1e-5:
            raise AssertionError(f"grad of {k}: compiled error {ec:.2e} > 2 x eager {ee:.2e} "
                                 f"+ 1e-5")
        worst = max(worst, ec)
    return {"out_err": err_c, "eager_out_err": err_e, "worst_grad_err": worst}


def graph_step(backend: str, device, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    import fastconv
    from fastconv import models
    from fastconv.tools.common import capture_cuda_graph

    if device.type != "cuda":
        raise Skip("CUDA-graph capture needs a CUDA device")
    _require(backend)
    torch.manual_seed(0)
    model = fastconv.convert(models.build("resnet18").to(device), backend=backend)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    shape = (batch, *models.INPUT_SIZES["resnet18"])
    static_x = torch.randn(shape, device=device)
    static_y = torch.randint(0, 10, (batch,), device=device)

    def step(m, o, x, y):
        o.zero_grad(set_to_none=False)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    batches = [(torch.randn(shape, device=device), torch.randint(0, 10, (batch,), device=device))
               for _ in range(6)]
    def load(xy):
        static_x.copy_(xy[0])
        static_y.copy_(xy[1])

    graph, static_loss = capture_cuda_graph(lambda: step(model, opt, static_x, static_y),
                                            batches[:3], load)
    for x, y in batches[:3]:  # the twin takes the same warm-up steps, eagerly
        step(twin, twin_opt, x, y)
    worst = 0.0
    for x, y in batches[3:]:
        load((x, y))
        graph.replay()
        loss = step(twin, twin_opt, x, y)
        torch.cuda.synchronize()
        worst = max(worst, _rel(static_loss, loss))
    if worst > 1e-4:
        raise AssertionError(f"replayed loss differs from eager by {worst:.2e}")
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        if a.is_floating_point() and _rel(a, b) > 1e-3:
            raise AssertionError(f"{k} after graph replays: {_rel(a, b):.2e} from eager")
    return {"loss_err": worst}


def main() -> None:
    import torch

    args = parse_args(__doc__)
    device, smoke = device_and_smoke(args)
    res = Results(args.work, "integration", args.deadline, device=str(device))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backends = ("torch",) if smoke else ("triton", "extension")
    batch = 2 if smoke else 8
    # graph capture first: seconds each, where a compile takes tens
    for backend in backends:
        res.case(f"cuda-graph-step[resnet18-{backend}]",
                 lambda: graph_step(backend, device, batch), need=5)
    for name in ("lenet",) if smoke else ("alexnet", "resnet18"):
        for backend in backends:
            res.case(f"compile-train-step[{name}-{backend}]",
                     lambda: compile_step(name, backend, device, batch, smoke), need=15)
    res.finish()


if __name__ == "__main__":
    main()
