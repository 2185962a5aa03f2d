"""The quantized-artefact check: an int8 runtime may redraw quantization noise, not change the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effopt.optimizer.measure.verify import QUANTIZED_FIDELITY_SLACK, quantized_fidelity


class Noisy(nn.Module):
    """``base(x)`` plus fixed-seed uniform noise of amplitude ``amp`` (a stand-in for rounding), times ``gain``."""

    def __init__(self, base: nn.Module, amp: float, seed: int, gain: float = 1.0) -> None:
        super().__init__()
        self.base, self.amp, self.seed, self.gain = base, amp, seed, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        g = torch.Generator().manual_seed(self.seed)
        return self.gain * y + self.amp * (torch.rand(y.shape, generator=g) * 2 - 1)


def _batches(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 16, generator=g),) for _ in range(n)]


@pytest.fixture
def original() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(16, 10).eval()


def test_a_second_draw_of_the_same_noise_passes_although_it_disagrees_with_the_fake_quant_model(original: nn.Module) -> None:
    fake_quant, artefact = Noisy(original, 0.05, seed=1), Noisy(original, 0.05, seed=2)
    fidelity = quantized_fidelity(original, fake_quant, artefact, _batches(), atol=0.0)
    assert fidelity.passed, fidelity.describe()
    assert 0.8 < fidelity.ratio < 1.2
    assert fidelity.max_drift > 0.05  # far from code-for-code agreement, and still the same model


def test_a_changed_model_fails_even_when_its_error_is_small_in_absolute_terms(original: nn.Module) -> None:
    fake_quant = Noisy(original, 0.01, seed=1)
    artefact = Noisy(original, 0.01, seed=2, gain=1.1)  # e.g. one scale off by 10%
    fidelity = quantized_fidelity(original, fake_quant, artefact, _batches(), atol=0.0)
    assert not fidelity.passed
    assert fidelity.ratio > QUANTIZED_FIDELITY_SLACK
    assert "x the fake-quant model's" in fidelity.describe()


def test_nan_in_the_artefact_only_fails(original: nn.Module) -> None:
    class NaNs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = original(x)
            y[0, 0] = float("nan")
            return y

    fidelity = quantized_fidelity(original, Noisy(original, 0.05, seed=1), NaNs(), _batches(), atol=1.0)
    assert not fidelity.passed and fidelity.ratio == float("inf")


def test_atol_is_a_floor_for_models_quantization_left_exact(original: nn.Module) -> None:
    artefact = Noisy(original, 1e-7, seed=2)
    assert not quantized_fidelity(original, original, artefact, _batches(), atol=0.0).passed
    assert quantized_fidelity(original, original, artefact, _batches(), atol=1e-6).passed


def test_every_output_is_checked() -> None:
    class Two(nn.Module):
        def __init__(self, amp_b: float, seed: int) -> None:
            super().__init__()
            self.amp_b, self.seed = amp_b, seed

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(self.seed)
            first = x + (0.05 if self.seed else 0.0) * torch.rand(x.shape, generator=g)
            return first, x + self.amp_b * torch.rand(x.shape, generator=g)

    fidelity = quantized_fidelity(Two(0.0, 0), Two(0.05, 1), Two(0.5, 2), _batches(), atol=0.0)  # 2nd output 10x worse
    assert not fidelity.passed and fidelity.ratio > 5


def test_a_different_output_shape_is_an_error(original: nn.Module) -> None:
    with pytest.raises(ValueError, match="artefact returns"):
        quantized_fidelity(original, original, lambda x: original(x)[:, :5], _batches(), atol=0.0)
