"""Cross-layer equalization: the scale arithmetic, the pair matcher, exactness in float, and the pass option."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.quant.equalize import (
    equalization_scales,
    equalize,
    find_pairs,
    input_channel_ranges,
    output_channel_ranges,
    scale_pair,
)
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import seeded
from tests.passes.helpers import build_ir, recipe_passes

# -- the arithmetic, by hand -------------------------------------------------------------------------


def test_scales_balance_the_worked_example() -> None:
    s = equalization_scales(torch.tensor([4.0, 0.25]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))
    w1, b1, w2 = scale_pair(torch.tensor([[4.0], [0.25]]), torch.tensor([2.0, 1.0]), torch.tensor([[1.0, 1.0]]), s)
    assert torch.allclose(w1, torch.tensor([[2.0], [0.5]])) and torch.allclose(b1, torch.tensor([1.0, 2.0]))
    assert torch.allclose(w2, torch.tensor([[2.0, 0.5]]))
    assert torch.allclose(output_channel_ranges(w1), input_channel_ranges(w2))  # both layers now agree per channel


def test_dead_channels_keep_scale_one_and_negative_scales_are_refused() -> None:
    assert torch.equal(equalization_scales(torch.tensor([0.0, 4.0]), torch.tensor([3.0, 0.0])), torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        scale_pair(torch.ones(2, 1), None, torch.ones(1, 2), torch.tensor([1.0, -1.0]))


def test_grouped_input_ranges_follow_each_channels_group() -> None:
    w = torch.zeros(4, 1, 3, 3)  # depthwise over 4 channels: filter c reads channel c only
    w[2, 0, 1, 1] = -5.0
    assert torch.equal(input_channel_ranges(w, groups=4), torch.tensor([0.0, 0.0, 5.0, 0.0]))
    lin = torch.tensor([[1.0, -3.0], [0.5, 0.0]])
    assert torch.equal(input_channel_ranges(lin), torch.tensor([1.0, 3.0]))
    assert torch.equal(output_channel_ranges(lin), torch.tensor([3.0, 0.5]))


# -- graph builders ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    pairs: tuple[str, ...]                  # pair labels, in graph order
    declined: tuple[tuple[str, str], ...]   # (node, a word of the reason)


def _uneven(model: nn.Module) -> nn.Module:
    """Spread the per-channel weight ranges over two orders of magnitude (what CLE is for) and add biases."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.logspace(-1, 1, m.weight.shape[0])[torch.randperm(m.weight.shape[0], generator=g)]
                              .reshape(-1, *[1] * (m.weight.dim() - 1)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


class PReLUResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.pool(F.relu(self.conv2(self.prelu(self.conv1(x))))))
        y = self.conv4(y) + y
        y = torch.flatten(self.gap(y), 1)
        return self.fc2(F.relu(self.fc1(y)))


def prelu_residual() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """
    x ─ conv1 ─ prelu ─ dwconv2 ─ relu ─ maxpool ─ conv3 ─┬─ conv4 ─ add ─ gap ─ flatten ─ fc1 ─ relu ─ fc2
                                                          └───────────┘
    conv1→conv2 through PReLU (slopes untouched), conv2→conv3 through relu and max pool; conv3's
    output also feeds the residual add: declined. conv4 → add → ... → fc1: an add scales only one
    of its operands, declined too; fc1→fc2 through relu.
    """
    with seeded(0):
        model = _uneven(PReLUResidual())
    return model, (2, 3, 8, 8), Expected(("conv1→conv2", "conv2→conv3", "fc1→fc2"),
                                         (("conv3", "residual"), ("conv4", "add")))


class Relu6Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def relu6_chain() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """x ─ conv1 ─ relu6 ─ conv2: ReLU6 clips at a fixed 6, so no pair (declined, naming ReLU6)."""
    with seeded(1):
        model = _uneven(Relu6Chain())
    return model, (2, 3, 4, 4), Expected((), (("conv1", "ReLU6"),))


class SpatialFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def spatial_flatten() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """x ─ conv ─ relu ─ flatten([4, 2, 2] → 16) ─ fc: one channel becomes 4 features, declined."""
    with seeded(2):
        model = _uneven(SpatialFlatten())
    return model, (2, 3, 4, 4), Expected((), (("conv", "mixes channels"),))


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(self.conv2(x))))


def shared_layer() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """x ─ conv2 ─ conv1 ─ relu ─ conv2 (the same module twice): rescaling it would change both calls."""
    with seeded(3):
        model = _uneven(SharedLayer())
    return model, (2, 4, 3, 3), Expected((), (("conv2", "several places"), ("conv1", "several places")))


class SingleConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


def nothing_to_do() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """x ─ conv ─ relu ─ out: no second layer, nothing to pair, nothing to report."""
    with seeded(4):
        model = SingleConv().eval()
    return model, (2, 3, 5, 5), Expected((), ())


BUILDERS = [prelu_residual, relu6_chain, spatial_flatten, shared_layer, nothing_to_do]


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_pairs_and_declines_match_the_drawing(builder) -> None:
    model, shape, expected = builder()
    ir = build_ir(model, shape)
    pairs, declined = find_pairs(ir.gm)
    assert tuple(p.label for p in pairs) == expected.pairs
    assert len(declined) == len(expected.declined), declined
    for (node, word), d in zip(expected.declined, declined):
        assert d.node == node and word in d.reason, d


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_equalization_is_exact_in_float(builder) -> None:
    model, shape, expected = builder()
    gm = trace_module(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(x)
    pairs, _ = find_pairs(build_ir(model, shape).gm)
    result = equalize(gm, pairs)
    with torch.no_grad():
        got = gm(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert result.converged


def test_equalization_balances_every_pair_and_keeps_prelu_slopes() -> None:
    model, shape, _ = prelu_residual()
    ir = build_ir(model, shape)
    gm = ir.gm
    pairs, _ = find_pairs(gm)
    slopes = gm.get_submodule("prelu").weight.detach().clone()

    def imbalance() -> float:
        worst = 0.0
        for p in pairs:
            first, second = gm.get_submodule(p.first_module), gm.get_submodule(p.second_module)
            r1 = output_channel_ranges(first.weight)
            r2 = input_channel_ranges(second.weight, getattr(second, "groups", 1))
            worst = max(worst, float((r1 / r2).log().abs().max()))
        return worst

    assert imbalance() > 1.0  # precondition: ranges differ by more than e per channel somewhere
    result = equalize(gm, pairs)
    assert imbalance() < 1e-3, result
    assert result.sweeps > 1  # conv2 sits in two pairs: one sweep is not enough
    assert torch.equal(gm.get_submodule("prelu").weight, slopes)  # prelu(x/s) = prelu(x)/s for s > 0


# -- through the quantize pass -------------------------------------------------------------------------


def _source(shape: tuple[int, ...], n: int = 64) -> DataSource:
    g = torch.Generator().manual_seed(0)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


def test_quantize_equalize_true_reports_pairs_and_the_residual_skip() -> None:
    model, shape, _ = prelu_residual()
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=_source(shape))
    spec = {"name": "quantize", "per_channel": False, "equalize": True, "bias_correction": False}
    ir, (record,) = run_passes(build_ir(model, shape), recipe_passes(spec), ctx)
    result = record.result
    assert result.stats["equalized_pairs"] == 3
    rows = {r["layer"]: r for r in result.details}
    assert rows["conv2"]["equalized_pair"] == "conv1→conv2" and rows["conv2"]["cle"] == "on"
    assert rows["conv2"]["cle_error_on"] < rows["conv2"]["cle_error_off"]  # per-tensor weights: CLE pays off
    assert any(s.node == "conv3" and "equalize" in s.reason and "residual" in s.reason for s in result.skipped)


def test_auto_keeps_only_pairs_that_measured_better() -> None:
    model, shape, _ = prelu_residual()
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=_source(shape))
    spec = {"name": "quantize", "per_channel": False, "bias_correction": False}  # equalize: auto
    _, (record,) = run_passes(build_ir(model, shape), recipe_passes(spec), ctx)
    rows = [r for r in record.result.details if r.get("equalized_pair")]
    assert rows, record.result.details
    for r in rows:
        assert (r["cle"] == "on") == (r["cle_error_on"] < r["cle_error_off"]), r


def test_equalize_option_is_validated_by_the_recipe() -> None:
    from effopt.errors import RecipeError

    with pytest.raises(RecipeError, match="equalize"):
        recipe_passes({"name": "quantize", "equalize": "sometimes"})
