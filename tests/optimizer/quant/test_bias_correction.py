"""Bias correction: the data-free formulas by hand, the held-out decision, and the mean shift it removes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.quant.bias_correction import (
    ShiftStats,
    batchnorm_input_expectation,
    expected_relu_of_normal,
    weight_shift,
)
from effopt.optimizer.quant.schemes import QuantLinear
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import seeded
from tests.passes.helpers import build_ir, recipe_passes

# -- formulas -----------------------------------------------------------------------------------------


def test_expected_relu_of_a_normal_matches_the_closed_form_and_sampling() -> None:
    got = expected_relu_of_normal(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.5]))
    assert got[0] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-6)  # 0.3989
    assert got[1] == pytest.approx(2.0) and got[2] == pytest.approx(0.0042, abs=1e-4)
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * 0.5 - 1.0
    assert got[2] == pytest.approx(float(z.clamp(min=0).mean()), abs=2e-4)


def test_weight_shift_is_the_worked_example() -> None:
    # one input channel with E[x] = 0.3989, a 1×1 weight 0.30 quantized to 0.25: shift −0.01995
    shift = weight_shift(torch.tensor([[[[0.25]]]]), torch.tensor([[[[0.30]]]]), torch.tensor([0.3989]))
    assert shift.item() == pytest.approx(-0.05 * 0.3989, rel=1e-5)
    # grouped: output o reads only its group's channel; the taps of a 3×3 kernel add up
    dw = torch.zeros(2, 1, 3, 3)
    dw[1] = 0.01
    shift = weight_shift(dw, torch.zeros_like(dw), torch.tensor([5.0, 2.0]), groups=2)
    assert torch.allclose(shift, torch.tensor([0.0, 9 * 0.01 * 2.0]))


def test_shift_stats_apply_a_systematic_shift_and_decline_pure_noise() -> None:
    g = torch.Generator().manual_seed(0)
    noise, biased = ShiftStats(axis=1), ShiftStats(axis=1)
    for i in range(8):
        y = torch.randn(32, 4, generator=g)
        noise.observe(y + 0.01 * torch.randn(32, 4, generator=g), y, i)
        biased.observe(y + 0.05 + 0.01 * torch.randn(32, 4, generator=g), y, i)
    kept = biased.decide()
    assert kept.applied and kept.held_out and kept.error_with < 0.1 * kept.error_without
    assert torch.allclose(kept.shift, torch.full((4,), 0.05), atol=0.005)
    assert not noise.decide().applied  # a mean of pure noise does not hold up on the other half
    assert noise.decide(force=True).applied


# -- a model with a skewed layer -------------------------------------------------------------------------


class Skewed(nn.Module):
    """x ─ fc1 ─ relu ─ fc2 ─ out, fc2's weights all sit 0.3 of a step above a grid point (per-tensor grid).

    Nearest rounding pulls every weight down by 0.3 steps; the inputs are ReLU outputs (≥ 0), so the
    output drops on every sample: a systematic shift that bias correction should remove.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def skewed() -> nn.Module:
    with seeded(0):
        model = Skewed()
    step = 0.01  # 8-bit symmetric per-tensor: max |w| = 127 steps exactly, so the grid step is 0.01
    with torch.no_grad():
        w = (torch.randint(-120, 121, model.fc2.weight.shape, generator=torch.Generator().manual_seed(1)) + 0.3) * step
        w[0, 0] = 127 * step
        model.fc2.weight.copy_(w)
        model.fc2.bias.zero_()
    return model.eval()


def _ctx(calibration: DataSource | None = None) -> PassContext:
    """8-bit weights (the skew is built for the 8-bit grid; x86-avx2 alone would cut them to 7 bits)."""
    profile = load_profile("x86-avx2").model_copy(update={"int8_weight_bits": 8})
    return PassContext(profile=profile, calibration=calibration)


def _source(n: int, seed: int) -> DataSource:
    g = torch.Generator().manual_seed(seed)
    return DataSource("random", TensorDataset(torch.randn(n, 16, generator=g)), 32, False)


def _mean_shift(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).mean(dim=0).abs().mean())


@pytest.mark.parametrize("mode", ["static", "weight_only"])
def test_bias_correction_removes_the_mean_shift_of_a_skewed_layer(mode: str) -> None:
    model = skewed()
    ctx = _ctx(_source(256, 0))
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(7))  # held-out inputs
    spec = {"name": "quantize", "mode": mode, "per_channel": False, "equalize": False}
    plain, _ = run_passes(build_ir(model, (1, 16)), recipe_passes({**spec, "bias_correction": False}), ctx)
    fixed, (record,) = run_passes(build_ir(model, (1, 16)), recipe_passes({**spec, "bias_correction": True}), ctx)
    before, after = _mean_shift(plain.gm, model, x), _mean_shift(fixed.gm, model, x)
    assert before > 0.004  # precondition: the skew really shifts the output (0.3 steps × Σ inputs)
    assert after < 0.2 * before, (before, after)
    row = next(r for r in record.result.details if r["layer"] == "fc2")
    assert row["bias_correction"] == "on" and row["bias_error_on"] < row["bias_error_off"]
    assert record.result.stats["bias_corrected_layers"] >= 1


def test_auto_corrects_in_static_mode_and_explains_itself() -> None:
    model = skewed()
    ctx = _ctx(_source(256, 0))
    spec = {"name": "quantize", "per_channel": False, "equalize": False}  # bias_correction: auto
    ir, (record,) = run_passes(build_ir(model, (1, 16)), recipe_passes(spec), ctx)
    rows = {r["layer"]: r for r in record.result.details}
    assert rows["fc2"]["bias_correction"] == "on"
    for r in rows.values():
        assert (r["bias_correction"] == "on") == (r["bias_error_on"] < r["bias_error_off"]), r


class BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def test_data_free_correction_uses_batchnorm_statistics_when_there_is_no_data() -> None:
    """fc1 ─ bn ─ relu ─ fc2 without data: E[fc2's input] comes from bn's β and γ (no fold_batchnorm)."""
    with seeded(0):
        model = BnNet().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(0.0, 1.0)
        model.fc2.weight.copy_(skewed().fc2.weight)
    spec = {"name": "quantize", "mode": "weight_only", "per_channel": False}
    plain, _ = run_passes(build_ir(model, (1, 16)), recipe_passes({**spec, "bias_correction": False}), _ctx())
    fixed, (record,) = run_passes(build_ir(model, (1, 16)), recipe_passes({**spec, "bias_correction": True}),
                                  _ctx())
    rows = {r["layer"]: r for r in record.result.details}
    assert rows["fc2"]["bias_correction"] == "on (data-free)"
    assert any(s.node == "fc1" and "BatchNorm" in s.reason for s in record.result.skipped)  # fc1 reads x, no BN
    # inputs for which bn's output really is N(β, γ²): the data-free assumption holds
    z = torch.randn(4096, 32, generator=torch.Generator().manual_seed(3))
    h = torch.relu(z * model.bn.weight.detach() + model.bn.bias.detach())
    with torch.no_grad():
        def fc2_of(gm: nn.Module) -> QuantLinear:
            return gm.get_submodule("fc2")

        want = model.fc2(h)
        shift_plain = float((fc2_of(plain.gm)(h) - want).mean(dim=0).abs().mean())
        shift_fixed = float((fc2_of(fixed.gm)(h) - want).mean(dim=0).abs().mean())
    assert shift_plain > 0.004 and shift_fixed < 0.1 * shift_plain, (shift_plain, shift_fixed)
    expected = batchnorm_input_expectation(model.bn, relu=True)
    assert torch.allclose(expected, h.mean(dim=0), atol=0.05)


def test_without_data_and_without_batchnorm_auto_leaves_the_model_and_report_alone() -> None:
    model = skewed()
    spec = {"name": "quantize", "mode": "weight_only", "per_channel": False}
    _, (auto,) = run_passes(build_ir(model, (1, 16)), recipe_passes(spec), _ctx())
    assert auto.result.details == () and not auto.result.skipped and "bias_corrected_layers" not in auto.result.stats
