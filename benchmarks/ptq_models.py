"""The two models benchmarks/ptq.py trains on scikit-learn's digits, besides the bundled DigitsNet.

- `DigitsMobileNet`: MobileNetV2's layout at digits size (inverted residuals with depthwise
  convs, residual adds, BatchNorm). It uses ReLU where MobileNetV2 has ReLU6, as Nagel et al. do
  for equalization: ReLU6 clips at a fixed 6, which a channel rescaling moves.
- `DigitsPNet`: the first stage of an MTCNN face detector (PNet: 3×3 convs with PReLU, max
  pooling, then a 2-way softmax "face" head and a 4-value box-regression head), trained to say
  "is this digit ≥ 5" (the softmax head) and where its ink is (the box head: the bounding box of
  the pixels above 0.25, in [0, 1] image coordinates). The issue that asked for these PTQ steps
  came from such a detector; this is its shape with data that ships with scikit-learn.

Both train in seconds on two cores, seeded (weights and batch order), and come back in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU (when t > 1), 3×3 depthwise-BN-ReLU, 1×1 project-BN; + input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    """MobileNetV2's layout at digits size: ``[N, 1, 8, 8]`` → 10 logits.

    stem 3×3 (1→16) → IR(16→16, t1) → IR(16→24, s2, t4) → IR(24→24, t4) → IR(24→32, s2, t4)
    → IR(32→32, t4) → 1×1 (32→128) → global average pool → linear (128→10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),
            nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DigitsPNet(nn.Module):
    """MTCNN's PNet at digits size: ``[N, 1, 8, 8]`` → (probabilities ``[N, 2, 1, 1]``, box ``[N, 4, 1, 1]``).

    conv 3×3 (1→10) PReLU → max-pool 2 → conv 3×3 pad 1 (10→16) PReLU → conv 3×3 (16→32) PReLU
    → {conv 1×1 (32→2) softmax over channels, conv 1×1 (32→4)}: facenet-pytorch's PNet with
    the spatial sizes of an 8×8 input (8 → 6 → 3 → 3 → 1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(1, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3, padding=1), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.softmax4_1(self.conv4_1(x)), self.conv4_2(x)


def pnet_targets(x: torch.Tensor, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNet's labels: class ``digit ≥ 5`` and the ink's bounding box ``(x0, y0, x1, y1) / 8``.

    Example: an image whose pixels above 0.25 span rows 1..6 and columns 2..5 → box
    ``(2/8, 1/8, 6/8, 7/8)`` (the far edges are exclusive).
    """
    ink = x[:, 0] > 0.25                                             # [N, 8, 8]
    rows, cols = ink.any(dim=2), ink.any(dim=1)                      # [N, 8] each
    idx = torch.arange(8)

    def span(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.where(mask, idx, 8).min(dim=1).values
        hi = torch.where(mask, idx + 1, 0).max(dim=1).values
        return lo, hi

    (y0, y1), (x0, x1) = span(rows), span(cols)
    box = torch.stack([x0, y0, x1, y1], dim=1).float() / 8
    return (digit >= 5).long(), box


def _pnet_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    label, box = pnet_targets(x, y)
    prob, pred = model(x)
    return F.nll_loss(torch.log(prob.flatten(1) + 1e-8), label) + 0.5 * F.mse_loss(pred.flatten(1), box)


def _mobilenet_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train(factory: Callable[[], nn.Module], loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
          epochs: int, seed: int = 0) -> nn.Module:
    """Adam, cosine schedule, batch 64, seeded weights and batch order, on the digits training split."""
    from torch.utils.data import DataLoader

    from examples import digits

    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = factory()
        loader = DataLoader(digits.train_dataset(seed), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                loss(model, x, y).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_rng_state(state)
    return model.eval()


def train_mobilenet(epochs: int, seed: int = 0) -> DigitsMobileNet:
    model = train(DigitsMobileNet, _mobilenet_loss, epochs, seed)
    assert isinstance(model, DigitsMobileNet)
    return model


def train_pnet(epochs: int, seed: int = 0) -> DigitsPNet:
    model = train(DigitsPNet, _pnet_loss, epochs, seed)
    assert isinstance(model, DigitsPNet)
    return model
