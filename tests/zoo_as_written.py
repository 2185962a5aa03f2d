"""Models as people write them: flags in forward, optional and keyword-only arguments,
functional calls on module-held parameters, PReLU, permute + reshape heads, tuple outputs.

Why: `tests/models.py` holds graph shapes drawn for pass tests; these are the habits of
real model code that a tracer meets first. Each builder takes no arguments, returns an
eval-mode model with randomized BatchNorm statistics (`tests.models.randomize_bn`), and is
named in `AS_WRITTEN` with its input shape, so a recipe can name it as
``tests.zoo_as_written:<builder>``. Every model here traces with fx once the flags are
bound to their defaults, except `dim_check_net`, which fx cannot trace and torch.export can.

Example::

    builder, shape = AS_WRITTEN["flag_net"]
    model = builder()
    model(torch.randn(shape)).shape            # [2, 10]
    model(torch.randn(shape), embed=True)      # the 16-channel features instead
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.models import randomize_bn, seeded

IMAGE = (2, 3, 8, 8)


def _stem(channels: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


class FlagNet(nn.Module):
    """``forward(x, embed=False)``: a flag that returns the features instead of the logits.

    x ─ stem ─ conv ─ bn ─ relu ─┬─ (embed) features
                                 └─ pool ─ flatten ─ fc ─ logits
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem()
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        features = F.relu(self.bn(self.conv(self.stem(x))))
        if embed:
            return features
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


class OptionalArgsNet(nn.Module):
    """``forward(x, mask: Optional[Tensor] = None, *, temperature: float = 1.0, return_logits=True)``.

    x ─ stem ─ (mask?) ─ pool ─ fc ─ / temperature ─ (softmax unless return_logits)
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem()
        self.fc = nn.Linear(8, 10)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
        return_logits: bool = True,
    ) -> torch.Tensor:
        h = self.stem(x)
        if mask is not None:
            h = h * mask
        logits = self.fc(h.mean(dim=(2, 3))) / temperature
        return logits if return_logits else logits.softmax(-1)


class FunctionalConvNet(nn.Module):
    """Parameters held by the module, layers called functionally (``F.conv2d(x, self.w, self.b)``).

    x ─ F.conv2d(w1, b1) ─ F.batch_norm(eval stats) ─ F.relu ─ F.conv2d(w2) ─ mean ─ F.linear(fc_w, fc_b)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1_weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.conv1_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.conv2_weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.register_buffer("bn_mean", torch.randn(8) * 0.5)
        self.register_buffer("bn_var", torch.rand(8) + 0.5)
        self.bn_weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bn_bias = nn.Parameter(torch.randn(8) * 0.5)
        self.fc_weight = nn.Parameter(torch.randn(10, 8) * 0.3)
        self.fc_bias = nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1)
        h = F.batch_norm(h, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, training=False)
        h = F.conv2d(F.relu(h), self.conv2_weight, None, padding=1)
        return F.linear(h.mean(dim=(2, 3)), self.fc_weight, self.fc_bias)


class PReLUNet(nn.Module):
    """conv ─ bn ─ PReLU (learned per-channel slope) ─ conv ─ PReLU (one slope) ─ pool ─ fc"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.PReLU(8, init=0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.PReLU(init=0.2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class PermuteReshapeHead(nn.Module):
    """A detection-style head: NCHW → NHWC, one row per cell and anchor.

    x ─ stem ─ conv (A·K channels) ─ permute(0, 2, 3, 1) ─ reshape(B, H·W·A, K)
    """

    anchors, values = 2, 5

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem()
        self.head = nn.Conv2d(8, self.anchors * self.values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.stem(x)).permute(0, 2, 3, 1)
        return y.reshape(x.shape[0], -1, self.values)


class TwoHeads(nn.Module):
    """Multiple outputs: a tuple (class logits, box regressions) from one trunk.

    x ─ stem ─ pool ─ flatten ─┬─ cls ─ logits
                               └─ box ─ boxes
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem()
        self.cls = nn.Linear(8, 10)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.flatten(F.adaptive_avg_pool2d(self.stem(x), 1), 1)
        return self.cls(h), self.box(h)


class DimCheckNet(nn.Module):
    """``if x.dim() == 3: x = x.unsqueeze(0)``: accepts one image or a batch.

    fx cannot trace it (``x.dim()`` is a Proxy, and a Proxy cannot decide an ``if``);
    torch.export can (the rank is static), so effopt falls back to torch.export.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _stem()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.fc(self.stem(x).mean(dim=(2, 3)))


def _build(cls: type[nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with seeded(seed):
            model = cls()
        return randomize_bn(model, seed).eval()

    build.__name__ = build.__qualname__ = cls.__name__
    return build


flag_net = _build(FlagNet, 1)
optional_args_net = _build(OptionalArgsNet, 2)
functional_conv_net = _build(FunctionalConvNet, 3)
prelu_net = _build(PReLUNet, 4)
permute_reshape_head = _build(PermuteReshapeHead, 5)
two_heads = _build(TwoHeads, 6)
dim_check_net = _build(DimCheckNet, 7)

#: name → (builder, input shape); ``tests.zoo_as_written:<name>`` in a recipe.
AS_WRITTEN: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "flag_net": (flag_net, IMAGE),
    "optional_args_net": (optional_args_net, IMAGE),
    "functional_conv_net": (functional_conv_net, IMAGE),
    "prelu_net": (prelu_net, IMAGE),
    "permute_reshape_head": (permute_reshape_head, IMAGE),
    "two_heads": (two_heads, IMAGE),
    "dim_check_net": (dim_check_net, IMAGE),
}


def calibration_images(n: int = 64) -> TensorDataset:
    """A data source for recipes (``source: tests.zoo_as_written:calibration_images``): ``n`` seeded images."""
    return TensorDataset(torch.rand((n, *IMAGE[1:]), generator=torch.Generator().manual_seed(11)))
