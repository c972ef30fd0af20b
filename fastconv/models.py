"""The target networks of ``MODELS.md``, built from stock torch.nn exactly as d2l's readers
write them. fastconv never appears here: converting these is the same act a user performs on
their own code (``fastconv.convert(model)``).

Every builder takes ``in_channels=`` and ``num_classes=``; the defaults are d2l's
(Fashion-MNIST: 1 channel, 10 classes).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["alexnet", "vgg11", "vgg16_bn", "nin", "googlenet", "lenet", "lenet_bn", "resnet18",
           "MODELS", "INPUT_SIZES", "RECIPES", "Inception", "Residual"]


def alexnet(in_channels: int = 1, num_classes: int = 10, *, groups: int = 1,
            image_size: int = 224) -> nn.Sequential:
    """AlexNet as d2l trains it (224x224 input). ``groups=2`` splits conv 2, 4 and 5 in two
    channel groups as the original two-GPU network did (ImageNet: ``in_channels=3,
    num_classes=1000``)."""
    side = ((image_size + 2 - 11) // 4 + 1 - 3) // 2 + 1  # conv1, pool1
    side = ((side - 3) // 2 + 1 - 3) // 2 + 1             # pool2, pool3 (convs keep the size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=groups), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=groups), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=groups), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(256 * side * side, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )


def _vgg_block(num_convs: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg11(in_channels: int = 1, num_classes: int = 10, *, narrow: bool = False,
          image_size: int = 224) -> nn.Sequential:
    """VGG-11; ``narrow=True`` divides every channel count by 4 (d2l's training copy)."""
    ratio = 4 if narrow else 1
    blocks, cin = [], in_channels
    for n, cout in ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)):
        blocks.append(_vgg_block(n, cin, cout // ratio))
        cin = cout // ratio
    side = image_size // 32
    hidden = 4096 // ratio
    return nn.Sequential(
        *blocks, nn.Flatten(),
        nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


def vgg16_bn(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """VGG-16 with batch norm for CIFAR-10 (3x32x32 input)."""
    layers, cin = [], in_channels
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


def _nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int,
               padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
    )


def nin(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Network in Network: no Linear layers; global average pooling over class maps."""
    return nn.Sequential(
        _nin_block(in_channels, 96, kernel_size=11, stride=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        _nin_block(96, 256, kernel_size=5, stride=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        _nin_block(256, 384, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        _nin_block(384, num_classes, kernel_size=3, stride=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
    )


class Inception(nn.Module):
    """Four parallel paths concatenated on channels; ReLU applied with F.relu in forward(),
    as d2l writes it."""

    def __init__(self, in_channels: int, c1: int, c2: tuple, c3: tuple, c4: int):
        super().__init__()
        self.b1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.b2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.b2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.b3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.b3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.b4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.b4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        b1 = F.relu(self.b1_1(x))
        b2 = F.relu(self.b2_2(F.relu(self.b2_1(x))))
        b3 = F.relu(self.b3_2(F.relu(self.b3_1(x))))
        b4 = F.relu(self.b4_2(self.b4_1(x)))
        return torch.cat((b1, b2, b3, b4), dim=1)


def googlenet(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """GoogLeNet (d2l trains it on 96x96 input; 224x224 is the ImageNet size)."""
    b1 = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                       nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                       nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                       Inception(256, 128, (128, 192), (32, 96), 64),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                       Inception(512, 160, (112, 224), (24, 64), 64),
                       Inception(512, 128, (128, 256), (24, 64), 64),
                       Inception(512, 112, (144, 288), (32, 64), 64),
                       Inception(528, 256, (160, 320), (32, 128), 128),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                       Inception(832, 384, (192, 384), (48, 128), 128),
                       nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))


def lenet(in_channels: int = 1, num_classes: int = 10, *, variant: str = "classic") -> nn.Sequential:
    """LeNet-5 on 28x28 input. ``variant="classic"``: sigmoid and average pooling (d2l);
    ``variant="relu"``: the common ReLU/max-pool version."""
    if variant == "classic":
        return nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )
    if variant == "relu":
        return nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(20, 50, kernel_size=3), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(50 * 5 * 5, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    raise ValueError(f"lenet: variant must be 'classic' or 'relu', got {variant!r}")


def lenet_bn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """LeNet with batch norm after every conv (BatchNorm1d after each hidden Linear), before
    the activation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )


class Residual(nn.Module):
    """d2l's residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a strided
    1x1 conv where the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False,
                 strides: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1,
                               stride=strides)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv3 = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=strides)
                      if use_1x1conv else None)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        y += x
        return F.relu(y)


def _resnet_stage(in_channels: int, out_channels: int, num_residuals: int,
                  first_block: bool = False) -> nn.Sequential:
    blocks = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blocks.append(Residual(in_channels, out_channels, use_1x1conv=True, strides=2))
        else:
            blocks.append(Residual(out_channels, out_channels))
    return nn.Sequential(*blocks)


def resnet18(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 as d2l trains it (96x96 input)."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                         nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return nn.Sequential(
        stem,
        _resnet_stage(64, 64, 2, first_block=True),
        _resnet_stage(64, 128, 2),
        _resnet_stage(128, 256, 2),
        _resnet_stage(256, 512, 2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet, "vgg11": vgg11, "vgg16_bn": vgg16_bn, "nin": nin,
    "googlenet": googlenet, "lenet": lenet, "lenet_bn": lenet_bn, "resnet18": resnet18,
}

# (channels, height, width) of one example as MODELS.md trains each network
INPUT_SIZES = {
    "alexnet": (1, 224, 224), "vgg11": (1, 224, 224), "vgg16_bn": (3, 32, 32),
    "nin": (1, 224, 224), "googlenet": (1, 96, 96), "lenet": (1, 28, 28),
    "lenet_bn": (1, 28, 28), "resnet18": (1, 96, 96),
}

# d2l's training recipe: learning rate, epochs, batch size
RECIPES = {
    "alexnet": dict(lr=0.01, epochs=10, batch_size=128),
    "vgg11": dict(lr=0.05, epochs=10, batch_size=128),
    "vgg16_bn": dict(lr=0.05, epochs=10, batch_size=128),
    "nin": dict(lr=0.1, epochs=10, batch_size=128),
    "googlenet": dict(lr=0.1, epochs=10, batch_size=128),
    "lenet": dict(lr=0.9, epochs=10, batch_size=256),
    "lenet_bn": dict(lr=1.0, epochs=10, batch_size=256),
    "resnet18": dict(lr=0.05, epochs=10, batch_size=256),
}


def build(name: str, **kwargs) -> nn.Module:
    """``build("vgg11", narrow=True)``: a model by name (see :data:`MODELS`)."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return fn(**kwargs)
