"""Named builders for channel-pruning tests: one structural situation each, with a drawing.

Each builder returns ``(model, input_shape, expected)`` where ``expected`` maps a producer module
path to the channels it must keep at ratio 0.5 with ``round_to: 1`` and ``protect: []`` (a group
locked by the model output keeps all). Weights come from a fixed seed; BatchNorms get random
statistics so a BN that is not cut with its conv would show up numerically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import randomize_bn, seeded

Case = tuple[nn.Module, tuple[int, ...], dict[str, int]]


class ResidualAdd(nn.Module):
    """A basic residual block; the add couples stem and conv_b, the model output locks fc.

        x ─ stem ─ bn ─ relu ─┬─ conv_a ─ relu ─ conv_b ─ add ─ relu ─ gap ─ fc
                              └──────────────────────────┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.conv_b(F.relu(self.conv_a(s))) + s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class DenseConcat(nn.Module):
    """DenseNet-style growth: each conv reads the concat of everything before it.

        x ─ c0 ─┬──────────┬─ cat ─┬──────────── cat ─ trans ─ gap ─ fc
                └─ c1 ─────┘       └─ c2 ─────────┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(12, 4, 3, padding=1)
        self.trans = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c0(x))
        b = torch.cat([a, F.relu(self.c1(a))], 1)
        c = torch.cat([b, F.relu(self.c2(b))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.trans(c)), 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1×1, depthwise 3×3 (cut with the expansion), project 1×1, residual.

        x ─ stem ─┬─ expand ─ bn ─ relu6 ─ dw ─ bn ─ relu6 ─ project ─ add ─ gap ─ fc
                  └───────────────────────────────────────────────────┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.dw, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(s))))))
        y = self.project(y) + s
        return self.fc(y.mean((2, 3)))


class GroupedShuffle(nn.Module):
    """ShuffleNet unit: grouped 1×1, channel shuffle (view → transpose → view), depthwise, grouped 1×1.

        x ─ stem ─ g1 (2 groups) ─ relu ─ shuffle ─ dw ─ g2 (2 groups) ─ relu ─ gap ─ fc
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.Conv2d(8, 16, 1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.g2 = nn.Conv2d(16, 8, 1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.g1(F.relu(self.stem(x))))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = F.relu(self.g2(self.dw(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class FlattenLinear(nn.Module):
    """LeNet as people write it: a literal ``view(-1, 8 * 4 * 4)`` into the first Linear.

        x ─ conv1 ─ relu ─ pool ─ conv2 ─ relu ─ pool ─ view(-1, 128) ─ fc1 ─ relu ─ fc2
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 8 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


class PermuteReshapeLinear(nn.Module):
    """Channels × time flattened time-major: channel c lands on features t·C + c.

        x [N, 2, 6] ─ conv (1d) ─ relu ─ permute(0, 2, 1) ─ reshape(N, 6·C) ─ fc
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.fc = nn.Linear(6 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).permute(0, 2, 1)
        return self.fc(y.reshape(y.shape[0], -1))


class SharedModule(nn.Module):
    """One conv called twice: its channels are tied across both calls, so the pass refuses them.

        x ─ stem ─ shared ─ relu ─ shared ─ relu ─ gap ─ fc
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.shared(F.relu(self.shared(F.relu(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Mlp(nn.Module):
    """x ─ fc1 ─ relu ─ fc2 ─ relu ─ fc3"""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer: the MLP hidden and the residual stream are prunable, attention is not.

        x ─┬─ ln1 ─ q,k,v ─ softmax(q kᵀ) v ─ out ─ add ─┬─ ln2 ─ fc1 ─ gelu ─ fc2 ─ add ─ head
           └──────────────────────────────────────────┘ └────────────────────────┘
    """

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = self.ln1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(1, 2) / 4.0, dim=-1)
        h = h + self.out(att @ self.v(a))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def _case(cls: type[nn.Module], shape: tuple[int, ...], expected: dict[str, int]) -> Callable[[], Case]:
    def build() -> Case:
        with seeded(0):
            model = cls()
        randomize_bn(model, seed=1)
        return model.eval(), shape, expected
    build.__name__ = cls.__name__
    return build


CASES: dict[str, Callable[[], Case]] = {
    # stem+conv_b share the residual stream (8 → 4); conv_a 12 → 6; fc locked by the output
    "residual_add": _case(ResidualAdd, (2, 3, 8, 8), {"stem": 4, "conv_b": 4, "conv_a": 6, "fc": 5}),
    "dense_concat": _case(DenseConcat, (2, 3, 8, 8), {"c0": 4, "c1": 2, "c2": 2, "trans": 4, "fc": 3}),
    # expand and dw are one group (24 → 12); stem and project share the residual (8 → 4)
    "inverted_residual": _case(InvertedResidual, (2, 3, 8, 8), {"stem": 4, "expand": 12, "dw": 12, "project": 4}),
    # g1's 16 outputs are tied in pairs by the shuffle: 8 classes → 4 (8 channels); g2 8 → 4
    "grouped_shuffle": _case(GroupedShuffle, (2, 3, 8, 8), {"stem": 4, "g1": 8, "dw": 8, "g2": 4}),
    "flatten_linear": _case(FlattenLinear, (2, 1, 16, 16), {"conv1": 3, "conv2": 4, "fc1": 16, "fc2": 10}),
    "permute_reshape_linear": _case(PermuteReshapeLinear, (2, 2, 6), {"conv": 4, "fc": 4}),
    "shared_module": _case(SharedModule, (2, 3, 8, 8), {"stem": 8, "shared": 8}),
    "mlp": _case(Mlp, (4, 16), {"fc1": 16, "fc2": 12, "fc3": 4}),
    # embed/out/fc2 share the residual stream (cut with ln1/ln2 and every reader); q/k/v meet in
    # matmuls (locked); fc1's hidden channels go
    "transformer_mlp": _case(EncoderLayer, (2, 5, 8), {"fc1": 16, "embed": 8, "out": 8, "fc2": 8, "q": 16, "v": 16}),
}
