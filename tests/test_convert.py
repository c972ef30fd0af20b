"""convert()/revert(): every state_dict key kept, same outputs and gradients as stock."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv
from fastconv import models
from fastconv import nn as fnn
from support import assert_close

# small inputs keep CPU time low; the models' Linear sizes follow the input size
SMALL = {
    "alexnet": (dict(image_size=67), (1, 67, 67)),
    "vgg11": (dict(narrow=True, image_size=32), (1, 32, 32)),
    "vgg16_bn": ({}, (3, 32, 32)),
    "nin": ({}, (1, 67, 67)),
    "googlenet": ({}, (1, 32, 32)),
    "lenet": ({}, (1, 28, 28)),
    "lenet_bn": ({}, (1, 28, 28)),
    "resnet18": ({}, (1, 32, 32)),
}


def run_step(model, x, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for stock and converted
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_converted_model_matches_stock(name):
    kwargs, shape = SMALL[name]
    torch.manual_seed(0)
    stock = models.build(name, **kwargs)
    fast = fastconv.convert(stock, backend="torch")
    assert list(fast.state_dict()) == list(stock.state_dict())
    n_conv = sum(type(m) is nn.Conv2d for m in stock.modules())
    assert sum(isinstance(m, fnn.Conv2dReLU) for m in fast.modules()) == n_conv
    assert not any(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) for m in fast.modules())
    x = torch.randn(2, *shape)
    out_s, grads_s = run_step(stock, x)
    out_f, grads_f = run_step(fast, x)
    assert_close(out_f, out_s, tol=1e-6, what="output")
    for k in grads_s:
        assert_close(grads_f[k], grads_s[k], tol=1e-6, what=f"grad {k}")
    for k, v in stock.state_dict().items():  # running statistics updated alike
        assert torch.allclose(fast.state_dict()[k].double(), v.double(), rtol=1e-6, atol=1e-7), k


def test_input_model_is_untouched_and_inplace_converts():
    stock = models.alexnet(image_size=67)
    types = [type(m) for m in stock.modules()]
    fast = fastconv.convert(stock)
    assert [type(m) for m in stock.modules()] == types
    assert fast is not stock
    assert fast[0].weight is not stock[0].weight
    same = fastconv.convert(stock, inplace=True)
    assert same is stock and isinstance(stock[0], fnn.Conv2dReLU)


def test_checkpoints_load_both_ways():
    stock = models.resnet18()
    fast = fastconv.convert(models.resnet18())
    fast.load_state_dict(stock.state_dict())       # stock checkpoint -> converted
    other = models.resnet18()
    other.load_state_dict(fast.state_dict())       # converted checkpoint -> stock
    for (k, a), (_, b) in zip(stock.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_fusion_pattern_alexnet():
    fast = fastconv.convert(models.alexnet(image_size=67))
    convs = [m for m in fast if isinstance(m, fnn.Conv2dReLU)]
    pools = [m for m in fast if isinstance(m, fnn.MaxPool2d)]
    # conv -> ReLU -> max-pool: the pool applies the ReLU; conv -> ReLU -> conv: the conv does
    assert [c.relu for c in convs] == [False, False, True, True, False]
    assert len(pools) == 3 and all(p.relu for p in pools)
    absorbed = {i: m.into for i, m in enumerate(fast) if isinstance(m, fnn.AbsorbedReLU)}
    assert absorbed == {1: "2", 4: "5", 7: "6", 9: "8", 11: "12"}
    assert isinstance(fast[1], nn.Identity)
    assert sum(type(m) is nn.ReLU for m in fast) == 2  # the Linear layers' ReLUs stay
    report = str(fastconv.conversion_report(fast))
    assert "Conv2d+ReLU -> Conv2dReLU" in report
    assert "ReLU+MaxPool2d -> MaxPool2d(relu=True)" in report
    assert "its ReLU is applied by the max-pool 2" in report
    assert fastconv.conversion_report(fast).method == "torch.fx graph"
    assert "forward" not in fast.__dict__  # ReLU modules only: the Sequential's own forward


def test_conv_bn_relu_pattern_vgg16_bn():
    fast = fastconv.convert(models.vgg16_bn())
    convs = [m for m in fast if isinstance(m, fnn.Conv2dReLU)]
    bns = [m for m in fast if isinstance(m, fnn.BatchNorm2d)]
    assert len(convs) == len(bns) == 13
    assert not any(c.relu for c in convs)
    # a BN+ReLU right before a max-pool leaves the ReLU to the pool
    before_pool = [isinstance(fast[i + 2], nn.MaxPool2d) for i, m in enumerate(fast)
                   if isinstance(m, fnn.BatchNorm2d)]
    assert [b.relu for b in bns] == [not p for p in before_pool] and sum(before_pool) == 5
    assert all(m.relu for m in fast if isinstance(m, fnn.MaxPool2d))
    assert all(m.inplace for m in fast if isinstance(m, fnn.AbsorbedReLU))


def test_custom_modules_with_functional_relu():
    fast = fastconv.convert(models.googlenet())
    inc = [m for m in fast.modules() if isinstance(m, models.Inception)][0]
    # every conv in Inception is followed by F.relu: all fused, the F.relu calls are gone
    assert all(getattr(inc, n).relu for n in ("b1_1", "b2_1", "b2_2", "b3_1", "b3_2", "b4_2"))
    assert isinstance(inc.b4_1, fnn.MaxPool2d)
    report = fastconv.conversion_report(fast)
    assert report.method == "torch.fx graph, forward() rewritten" and not report.relus_left
    assert ("F.relu in 2.0.forward (relu)", "2.0.b1_1") in report.relus_fused
    assert not any(n.target is F.relu for n in fast.forward._fastconv_graph.nodes)


def test_residual_block_pattern():
    fast = fastconv.convert(models.resnet18())
    block = fast[2][0]
    # bn2 adds the residual and applies the ReLU after it (batch_norm's residual)
    assert block.bn1.relu and block.bn2.relu
    assert not block.conv1.relu and not block.conv3.relu
    assert "residual add" in dict(fastconv.conversion_report(fast).replaced)["2.0.bn2"]


class SharedReLU(nn.Module):
    """torchvision-style: one ReLU module used at two places, in place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_shared_inplace_relu_is_fused_at_both_calls():
    stock = SharedReLU()
    fast = fastconv.convert(stock)
    assert isinstance(fast.relu, fnn.AbsorbedReLU) and fast.relu.into == "conv1, conv2"
    assert fast.conv1.relu and fast.conv2.relu
    report = fastconv.conversion_report(fast)
    assert report.relus_fused == [("relu (call 1 of 2)", "conv1"), ("relu (call 2 of 2)", "conv2")]
    x = torch.randn(2, 3, 8, 8)
    assert_close(run_step(fast, x)[0], run_step(stock, x)[0], tol=1e-6)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.other = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.other(x)


def test_untraceable_model_falls_back_to_sequential_chains():
    stock = Branchy()
    fast = fastconv.convert(stock)
    report = fastconv.conversion_report(fast)
    assert report.method.startswith("nn.Sequential chains")
    # Conv, ReLU, MaxPool: the pool applies the ReLU
    assert not fast.body[0].relu and fast.body[2].relu
    assert isinstance(fast.body[1], fnn.AbsorbedReLU) and fast.body[1].into == "body.2"
    assert isinstance(fast.other, fnn.Conv2dReLU) and not fast.other.relu
    x = torch.rand(2, 1, 9, 9)
    assert_close(fast(x), stock(x), tol=1e-6)
    assert_close(fast(-x), stock(-x), tol=1e-6)


class CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_report_lists_what_was_left_alone():
    stock = nn.Sequential(CustomConv(1, 2, 3), nn.ReLU())
    fast = fastconv.convert(stock)
    report = fastconv.conversion_report(fast)
    assert type(fast[0]) is CustomConv
    assert any(name == "0" and "own forward" in why for name, why in report.left)


def test_revert_restores_stock_layers():
    stock = models.vgg16_bn()
    back = fastconv.revert(fastconv.convert(stock))
    assert [type(m) for m in back.modules()] == [type(m) for m in stock.modules()]
    assert [m.inplace for m in back if isinstance(m, nn.ReLU)] == [True] * 13
    x = torch.randn(2, 3, 32, 32)
    back.load_state_dict(stock.state_dict())
    assert_close(back.eval()(x), stock.eval()(x), tol=1e-6)


def test_fold_bn_for_inference():
    torch.manual_seed(0)
    stock = models.vgg16_bn()
    stock.train()
    for _ in range(2):  # non-trivial running statistics
        stock(torch.randn(8, 3, 32, 32))
    stock.eval()
    with pytest.raises(ValueError, match="eval"):
        fastconv.convert(stock.train(), fold_bn=True)
    stock.eval()
    folded = fastconv.convert(stock, fold_bn=True)
    assert sum(isinstance(m, fnn.FoldedBatchNorm) for m in folded) == 13
    # every ReLU is applied by its conv, or by the max-pool after it
    for i, m in enumerate(folded):
        if isinstance(m, fnn.Conv2dReLU):
            assert m.relu != (isinstance(folded[i + 3], fnn.MaxPool2d) and folded[i + 3].relu)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(folded(x), stock(x), tol=1e-5, what="folded vs unfolded")
    with pytest.raises(ValueError, match="folded"):
        fastconv.revert(folded)


def test_fold_bn_sequential_fallback():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            return self.seq(x) if x.sum() > 0 else -self.seq(x)

    stock = Untraceable()
    stock.seq[1].running_mean.uniform_(-1, 1)
    stock.seq[1].running_var.uniform_(0.5, 2)
    stock.seq[1].weight.data.uniform_(0.5, 2)
    stock.eval()
    folded = fastconv.convert(stock, fold_bn=True)
    assert isinstance(folded.seq[1], fnn.FoldedBatchNorm) and folded.seq[0].relu
    x = torch.rand(2, 2, 6, 6)
    with torch.no_grad():
        assert_close(folded(x), stock(x), tol=1e-5)


def test_batchnorm_module_momentum_none_and_counter():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=None)
    fast = fnn.BatchNorm2d(5, momentum=None, relu=True, backend="torch")
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 3 + 1
        assert_close(fast(x), F.relu(ref(x)), tol=1e-6)
    assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert_close(fast.running_mean, ref.running_mean, tol=1e-6)
    assert_close(fast.running_var, ref.running_var, tol=1e-6)
    # track_running_stats=False and affine=False behave as torch
    ref2 = nn.BatchNorm2d(5, affine=False, track_running_stats=False)
    fast2 = fnn.BatchNorm2d(5, affine=False, track_running_stats=False, backend="torch").eval()
    x = torch.randn(4, 5, 3, 3)
    assert_close(fast2(x), ref2.eval()(x), tol=1e-6)


def test_module_state_dict_and_repr():
    conv = fnn.Conv2dReLU(3, 8, 3, padding=1, backend="torch")
    assert list(conv.state_dict()) == list(nn.Conv2d(3, 8, 3).state_dict())
    assert isinstance(conv, nn.Conv2d) and "relu=True" in repr(conv)
    bn = fnn.BatchNorm2d(8, relu=True)
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(8).state_dict())
    pool = fnn.MaxPool2d(3, 2, relu=True)
    x = torch.randn(2, 3, 9, 9)
    assert_close(pool(x), F.max_pool2d(F.relu(x), 3, 2), tol=0)


def test_conv_padding_modes_and_strings():
    torch.manual_seed(0)
    for mode in ("reflect", "circular", "replicate"):
        ref = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
        fast = fnn.Conv2dReLU.from_conv(copy.deepcopy(ref), relu=True, backend="torch")
        x = torch.randn(1, 2, 6, 6)
        assert_close(fast(x), F.relu(ref(x)), tol=1e-6, what=mode)
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    assert_close(fastconv.functional.conv2d_relu(x, w, padding="same"),
                 F.relu(F.conv2d(x, w, padding="same")), tol=1e-6)
    assert_close(fastconv.functional.conv2d_relu(x, w, padding="valid", relu=False),
                 F.conv2d(x, w, padding="valid"), tol=1e-6)
