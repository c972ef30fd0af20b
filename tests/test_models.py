"""The target networks match the layer tables of MODELS.md."""
import pytest
import torch
from torch import nn

from fastconv import models


def trace_shapes(seq: nn.Sequential, x: torch.Tensor):
    shapes = []
    for layer in seq:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


@torch.no_grad()
def test_alexnet_layer_table():
    shapes = trace_shapes(models.alexnet().eval(), torch.randn(1, 1, 224, 224))
    # MODELS.md's table, row by row (ReLU and Dropout keep the shape)
    assert shapes[0] == (96, 54, 54)
    assert shapes[2] == (96, 26, 26)
    assert shapes[3] == (256, 26, 26)
    assert shapes[5] == (256, 12, 12)
    assert shapes[6] == shapes[8] == (384, 12, 12)
    assert shapes[10] == (256, 12, 12)
    assert shapes[12] == (256, 5, 5)
    assert shapes[13] == (6400,)
    assert shapes[14] == shapes[17] == (4096,)
    assert shapes[-1] == (10,)


@torch.no_grad()
def test_alexnet_imagenet_two_groups():
    m = models.alexnet(in_channels=3, num_classes=1000, groups=2).eval()
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("narrow,width", [(False, 512), (True, 128)])
@torch.no_grad()
def test_vgg11(narrow, width):
    m = models.vgg11(narrow=narrow).eval()
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 8
    assert [c.out_channels for c in convs] == [c // (4 if narrow else 1) for c in
                                               (64, 128, 256, 256, 512, 512, 512, 512)]
    feats = m[:5](torch.randn(1, 1, 224, 224))
    assert feats.shape == (1, width, 7, 7)
    assert m[-1].out_features == 10
    assert m[6].in_features == width * 49


@torch.no_grad()
def test_vgg16_bn_cifar():
    m = models.vgg16_bn().eval()
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in models.VGG16_CFG if v != "M"]
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m) == 13
    feats = m[:-2](torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512, 1, 1)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@torch.no_grad()
def test_nin():
    m = models.nin().eval()
    assert not any(isinstance(l, nn.Linear) for l in m.modules())
    shapes = trace_shapes(m, torch.randn(1, 1, 224, 224))
    assert shapes[0] == (96, 54, 54) and shapes[1] == (96, 26, 26)
    assert shapes[2] == (256, 26, 26) and shapes[3] == (256, 12, 12)
    assert shapes[4] == (384, 12, 12) and shapes[5] == (384, 5, 5)
    assert shapes[7] == (10, 5, 5) and shapes[8] == (10, 1, 1) and shapes[9] == (10,)


@torch.no_grad()
def test_googlenet_blocks():
    m = models.googlenet().eval()
    shapes = trace_shapes(m, torch.randn(1, 1, 96, 96))
    assert shapes == [(64, 24, 24), (192, 12, 12), (480, 6, 6), (832, 3, 3), (1024,), (10,)]
    inc = [l for l in m.modules() if isinstance(l, models.Inception)]
    assert len(inc) == 9
    out_channels = [i.b1_1.out_channels + i.b2_2.out_channels + i.b3_2.out_channels
                    + i.b4_2.out_channels for i in inc]
    assert out_channels == [256, 480, 512, 512, 512, 528, 832, 832, 1024]


@pytest.mark.parametrize("build", [models.lenet, models.lenet_bn])
@torch.no_grad()
def test_lenet(build):
    m = build().eval()
    convs = [l for l in m if isinstance(l, (nn.Conv2d, nn.AvgPool2d))]
    x = torch.randn(2, 1, 28, 28)
    shapes = []
    for layer in m:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.AvgPool2d, nn.Linear)):
            shapes.append(tuple(x.shape[1:]))
    assert len(convs) == 4
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120,), (84,), (10,)]
    if build is models.lenet_bn:
        assert sum(isinstance(l, nn.BatchNorm2d) for l in m) == 2
        assert sum(isinstance(l, nn.BatchNorm1d) for l in m) == 2


@torch.no_grad()
def test_lenet_relu_variant():
    m = models.lenet(variant="relu").eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="variant"):
        models.lenet(variant="nope")


@torch.no_grad()
def test_resnet18_stages():
    m = models.resnet18().eval()
    shapes = trace_shapes(m, torch.randn(1, 1, 96, 96))
    assert shapes[:5] == [(64, 24, 24), (64, 24, 24), (128, 12, 12), (256, 6, 6), (512, 3, 3)]
    assert shapes[-1] == (10,)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, three 1x1 downsamples


@pytest.mark.parametrize("name", sorted(models.MODELS))
@torch.no_grad()
def test_in_channels_and_classes(name):
    kwargs = dict(in_channels=3, num_classes=7)
    m = models.build(name, **kwargs).eval()
    c, h, w = models.INPUT_SIZES[name]
    assert m(torch.randn(2, 3, h, w)).shape == (2, 7)


def test_build_unknown():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("lenet6")
