"""AdaRound: the rounding relaxation, the worked example, every layer of a small CNN, grid and determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.quant.adaround import (
    AdaRoundConfig,
    GramObjective,
    SampledObjective,
    adaround_weight,
    conv_rows,
    output_rows,
    rectified_sigmoid,
    round_nearest,
    row_forward,
)
from effopt.optimizer.quant.schemes import QScheme, QuantConv, QuantLinear, quantize_values
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import seeded
from tests.passes.helpers import build_ir, recipe_passes

PER_TENSOR = QScheme(bits=8, signed=True, symmetric=True, axis=None)


def test_rectified_sigmoid_reaches_exact_zero_and_one() -> None:
    h = rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h.tolist() == [0.0, 0.5, 1.0]


def test_worked_example_rounds_one_weight_down() -> None:
    """Weights [0.30, 0.35] with step 0.5 both round up to 0.5: x = [1, 1] gives 1.0 where the float
    layer gives 0.65. Rounding one of them down gives 0.5, an error of 0.15 instead of 0.35."""
    w = torch.tensor([[0.30, 0.35]])
    x = torch.ones(64, 2)
    y = F.linear(x, w)
    scale, zero = torch.tensor(0.5), torch.tensor(0)
    assert torch.equal(round_nearest(w, scale, zero, PER_TENSOR), torch.tensor([[0.5, 0.5]]))  # precondition
    objective = GramObjective(x.unsqueeze(1), y, None, groups=1)
    assert objective.loss(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.35**2, rel=1e-5)
    result = adaround_weight(w, scale, zero, PER_TENSOR, objective, AdaRoundConfig(iterations=200))
    assert sorted(result.weight.reshape(-1).tolist()) == [0.0, 0.5] and result.flipped == 1
    assert result.adaround_error == pytest.approx(0.15**2 / 0.65**2, rel=1e-4)
    assert result.nearest_error == pytest.approx(0.35**2 / 0.65**2, rel=1e-4)


def test_gram_and_sampled_objectives_agree() -> None:
    with seeded(0):
        conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    y = conv(x).detach()
    rows = conv_rows(conv, x)
    gram = GramObjective(rows, output_rows(y, 1), conv.bias, 2)
    sampled = SampledObjective(row_forward(conv.bias, 2), rows, output_rows(y, 1), 10**6, torch.Generator())
    w = conv.weight.detach() + 0.01 * torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(3))
    assert gram.error(w) == pytest.approx(sampled.error(w), rel=1e-6)
    shift = gram.mean_residual(w)
    assert torch.allclose(shift, sampled.mean_residual(w), atol=1e-9)
    assert gram.error(w, shift) == pytest.approx(sampled.error(w, shift), rel=1e-6)
    assert gram.error(w, shift) < gram.error(w)  # removing the mean residual can only help, in sample


def test_conv_rows_compute_the_conv() -> None:
    with seeded(0):
        conv = nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=4)
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(1))
    rows = conv_rows(conv, x)
    assert rows is not None and rows.shape == (2 * 4 * 4, 4, 2 * 9)
    got = row_forward(conv.bias, conv.groups)(rows, conv.weight)
    want = conv(x).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.allclose(got, want, atol=1e-5)
    assert conv_rows(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), torch.zeros(1, 2, 4, 4)) is None


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.conv3 = nn.Conv2d(16, 24, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(F.relu(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def _cnn_run(spec: dict, seed: int = 0) -> tuple[nn.Module, object]:
    with seeded(0):
        model = SmallCNN().eval()
    g = torch.Generator().manual_seed(0)
    calibration = DataSource("random", TensorDataset(torch.randn(256, 3, 8, 8, generator=g)), 64, False)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=calibration, seed=seed)
    ir, (record,) = run_passes(build_ir(model, (1, 3, 8, 8)), recipe_passes(spec), ctx)
    return ir.gm, record.result


SPEC = {"name": "quantize", "equalize": False, "bias_correction": False, "adaround": True}


def test_adaround_lowers_every_layers_output_error_below_nearest() -> None:
    gm, result = _cnn_run(SPEC)
    rows = {r["layer"]: r for r in result.details}
    assert set(rows) == {"conv1", "conv2", "conv3", "fc"}
    for name, r in rows.items():
        assert r["adaround"] == "on" and r["adaround_error_on"] < r["adaround_error_off"], (name, r)
    assert result.stats["adarounded_layers"] == 4
    for m in gm.modules():  # the learned weights sit exactly on the grid every lowering rounds to
        if isinstance(m, (QuantConv, QuantLinear)):
            fq = m.weight_quant
            codes = quantize_values(m.weight.detach(), fq.scale, fq.zero_point, fq.scheme)
            s = fq.scale.reshape(-1, *[1] * (m.weight.dim() - 1))
            assert torch.equal(codes.float() * s, m.weight.detach())


def test_bias_correction_after_adaround_refits_on_adarounds_own_targets() -> None:
    gm, result = _cnn_run({**SPEC, "bias_correction": True})
    for r in result.details:
        assert r["bias_correction"] == "on (AdaRound's data)" and r["bias_error_on"] <= r["bias_error_off"], r
    assert result.stats["bias_corrected_layers"] == result.stats["adarounded_layers"] == 4


def test_adaround_is_deterministic_for_a_seed() -> None:
    first, _ = _cnn_run(SPEC, seed=3)
    second, _ = _cnn_run(SPEC, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_a_spent_time_budget_keeps_nearest_rounding_and_says_so() -> None:
    spec = {**SPEC, "adaround": {"iterations": 10, "time_budget_s": 1e-9}}
    _, result = _cnn_run(spec)
    assert any("time budget" in s.reason for s in result.skipped)
    assert any("time budget" in w for w in result.warnings)
    assert result.stats["adarounded_layers"] == 0


def test_adaround_without_data_is_an_error_naming_the_fix() -> None:
    from effopt.errors import PassError

    with seeded(0):
        model = SmallCNN().eval()
    spec = {"name": "quantize", "mode": "weight_only", "adaround": True}
    with pytest.raises(PassError, match="data.calibration"):
        run_passes(build_ir(model, (1, 3, 8, 8)), recipe_passes(spec), PassContext())
