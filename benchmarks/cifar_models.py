"""CIFAR-sized (3x32x32 -> 10 classes) ResNet-18, VGG-11-BN and MobileNetV2, written by hand.

These are the models `benchmarks/quantization.py` compares quantizers on. They follow the
usual CIFAR adaptations of the ImageNet nets (3x3 stride-1 stems, no stem max-pool), so
the layer shapes, FLOPs and parameter counts are those a CIFAR user would quantize:

=============  ==========  ===========  ===========================================
factory        params      MACs/image   layout
=============  ==========  ===========  ===========================================
resnet18       11.17 M     0.56 G       stem 3x3 64, BasicBlocks [2,2,2,2] at
                                        64-128-256-512 (strides 1,2,2,2), gap, fc
vgg11_bn       9.23 M      0.15 G       [64 M 128 M 256 256 M 512 512 M 512 512 M],
                                        every conv followed by BN + ReLU, fc 512->10
mobilenet_v2   2.24 M      0.09 G       stem 3x3 32 s1, 17 inverted residuals with
 (width 1.0)                            strides 1,1,2,2,1,2,1 per stage (CIFAR: the
                                        first two ImageNet stride-2s are 1), 1x1 1280, fc
=============  ==========  ===========  ===========================================

``width`` scales every channel count (rounded to a multiple of 8 for MobileNetV2, at least
8 elsewhere): ``resnet18(width=0.25)`` is the same graph at 16-32-64-128 channels, used by
the benchmark's ``--quick`` mode.

There is no CIFAR data offline, so the weights are random -- but not *untrained-looking*:
`build` seeds the initialisation and then sets every BatchNorm's running statistics from
a few random-normal batches (`calibrate_batchnorm`), so each BN really normalises its
input the way a trained net's does. Without that, eval-mode BNs are identities and the
activations shrink or blow up layer by layer, which would make int8 ranges (and so the
quantizers' agreement numbers) unrepresentative. The classifier bias is then centred
(`center_classifier`) so the predicted class varies with the input.

Example::

    model = build("resnet18")                 # eval mode, deterministic for a given seed
    model(torch.randn(2, 3, 32, 32)).shape    # torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "FACTORIES",
    "BasicBlock",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet18",
    "VGG11BN",
    "build",
    "calibrate_batchnorm",
    "center_classifier",
    "mobilenet_v2",
    "resnet18",
    "vgg11_bn",
]

INPUT_SHAPE: tuple[int, int, int] = (3, 32, 32)
NUM_CLASSES = 10


def _scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor``, at least 8: (64, 0.25) -> 16."""
    value = max(8, int(round(channels * width)))
    if divisor > 1:
        value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return value


# -- ResNet-18 ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, a residual add (1x1 conv-BN projection when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]."""

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- VGG-11 with BN ------------------------------------------------------------------------------

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    """VGG-11 with BN for CIFAR: eight conv3x3-BN-ReLU, five 2x2 max-pools (32 -> 1), fc 512->10."""

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in _VGG11:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = _scaled(int(item), width)
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# -- MobileNetV2 ---------------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s); CIFAR strides per kuangliu/pytorch-cifar.
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU6 (skipped when t == 1), 3x3 depthwise-BN-ReLU6, 1x1 project-BN; add if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR: stride-1 stem, 17 inverted residuals, 1x1 conv to 1280, gap, fc."""

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        cin = _scaled(32, width, 8)
        blocks: list[nn.Module] = [nn.Conv2d(3, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, c, n, s in _MBV2:
            cout = _scaled(c, width, 8)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _scaled(1280, max(1.0, width), 8)
        blocks += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# -- factories -----------------------------------------------------------------------------------


def resnet18(width: float = 1.0) -> ResNet18:
    return ResNet18(width)


def vgg11_bn(width: float = 1.0) -> VGG11BN:
    return VGG11BN(width)


def mobilenet_v2(width: float = 1.0) -> MobileNetV2:
    return MobileNetV2(width)


#: name -> factory(width); the benchmark's recipes name these as ``benchmarks.cifar_models:<name>``.
FACTORIES: dict[str, Callable[[float], nn.Module]] = {
    "resnet18": resnet18,
    "vgg11_bn": vgg11_bn,
    "mobilenet_v2": mobilenet_v2,
}


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, generator: torch.Generator, batches: int = 4, batch_size: int = 32
) -> nn.Module:
    """Set every BN's running mean/var to its input statistics on random-normal images; returns ``model`` in eval mode.

    Uses a cumulative average (``momentum=None``) over ``batches`` batches of
    ``[batch_size, 3, 32, 32]`` N(0, 1) inputs drawn from ``generator``; affine
    parameters stay at their initial 1 / 0. Example: after this, a ResNet-18's BN
    outputs have mean ~0 and std ~1 per channel on fresh N(0, 1) inputs, as in a trained net.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, *INPUT_SHAPE, generator=generator))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def center_classifier(
    model: nn.Module, generator: torch.Generator, batches: int = 4, batch_size: int = 32
) -> nn.Module:
    """Shift the last Linear's bias so each logit has mean 0 over random-normal images; returns ``model``.

    Why: post-ReLU features are all positive, so with random weights one class's logit is
    larger for almost every input (ResNet-18 at seed 0: class 4 wins on 200 of 256 inputs)
    and "top-1 agreement" between float and int8 would be trivially high. With centred
    logits the argmax spreads over the classes and depends on the input, as in a trained net.
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model.eval()
        for _ in range(batches):
            model(torch.randn(batch_size, *INPUT_SHAPE, generator=generator))
    finally:
        handle.remove()
    mean_feature = torch.cat(seen).mean(0)
    head.bias -= head.weight @ mean_feature + head.bias
    return model


def build(name: str, width: float = 1.0, seed: int = 0) -> nn.Module:
    """The named model with seeded weights and calibrated BN statistics, in eval mode.

    The global RNG is used for ``nn.Module`` initialisation (it takes no generator) and
    restored afterwards, so calling this does not perturb the caller's random stream.
    """
    if name not in FACTORIES:
        raise ValueError(f"unknown CIFAR model {name!r}; choose one of {', '.join(FACTORIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FACTORIES[name](width)
    calibrate_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    return center_classifier(model, torch.Generator().manual_seed(seed + 2))
