"""Tests for effopt.passes.factorization: the numerics of separable_conv and low_rank, without graphs.

Hand-computed examples first (the module docstring's), then properties on random kernels:
exact at full multiplier / rank, error non-increasing with m and r, the reported error equal
to the error of the reconstructed kernel, and tensorly's Tucker-2 no worse than a plain
truncated HOSVD.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effopt.passes.factorization import (
    LeastSquares,
    channel_low_rank,
    kept_energy,
    largest_rank_within,
    linear_low_rank,
    multiplier_for_energy,
    rank_for_energy,
    relative_error,
    separable_energy,
    separable_init,
    separable_weight,
    tucker2,
    tucker2_weight,
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- worked examples ----------------------------------------------------------------------------


def test_energy_and_rank_worked_example() -> None:
    """s = (3, 1): rank 1 keeps 9/10 of the energy, relative error √0.1 = 0.316."""
    s = torch.tensor([3.0, 1.0])
    assert kept_energy(s, 1) == pytest.approx(0.9)
    assert relative_error(0.9) == pytest.approx(math.sqrt(0.1))
    assert rank_for_energy(s, 0.9) == 1 and rank_for_energy(s, 0.95) == 2
    assert kept_energy(torch.zeros(3), 1) == 1.0  # an all-zero kernel loses nothing


def test_separable_init_worked_example() -> None:
    """One input channel whose slice W[:, 0] (C_out = 2, "K²" = 2, a 1×2 kernel) is [[3, 0], [0, 1]].

    m = 1 keeps s₁ u₁ v₁ᵀ = [[3, 0], [0, 0]]: energy 0.9, relative error 0.316.
    """
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    f = separable_init(w, 1)
    assert f.depthwise.shape == (1, 1, 1, 2) and f.pointwise.shape == (2, 1, 1, 1)
    assert f.energy == pytest.approx(0.9) and f.relative_error == pytest.approx(math.sqrt(0.1))
    torch.testing.assert_close(separable_weight(f.depthwise, f.pointwise, 1),
                               torch.tensor([[3.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 1, 2), rtol=0, atol=1e-6)


def test_linear_low_rank_worked_example() -> None:
    """[[3, 0], [0, 1]] at rank 1: first [[√3, 0]], second [[√3], [0]] (up to a shared sign), energy 0.9."""
    f = linear_low_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 1)
    assert f.energy == pytest.approx(0.9)
    sign = torch.sign(f.first[0, 0])
    torch.testing.assert_close(f.first * sign, torch.tensor([[math.sqrt(3), 0.0]]))
    torch.testing.assert_close(f.second * sign, torch.tensor([[math.sqrt(3)], [0.0]]))


def test_largest_rank_within_worked_example() -> None:
    """Linear 100 → 100 at rank r costs 200·r MACs; half of 10,000 allows r = 25."""
    assert largest_rank_within(lambda r: 200 * r, 5_000, 100) == 25
    assert largest_rank_within(lambda r: 200 * r, 10, 100) == 1  # never below 1


def test_least_squares_worked_example() -> None:
    """d = [1], [2] and y = [2], [4]: DᵀD = 5, DᵀY = 10, so P = 2 and the error is 0."""
    ls = LeastSquares()
    ls.update(torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [4.0]]))
    p = ls.solve(ridge=0.0)
    torch.testing.assert_close(p, torch.tensor([[2.0]], dtype=torch.float64))
    assert ls.error(p) == pytest.approx(0.0, abs=1e-12)
    assert ls.error(torch.tensor([[1.0]])) == pytest.approx(0.5)  # ‖y − d‖ / ‖y‖ = √5 / √20


def test_least_squares_accumulates_batches_like_one() -> None:
    d, p_true = randn(50, 6, seed=1), randn(3, 6, seed=2)
    y = d @ p_true.T
    split = LeastSquares()
    split.update(d[:20], y[:20])
    split.update(d[20:], y[20:])
    torch.testing.assert_close(split.solve(ridge=0.0), p_true.double(), rtol=1e-6, atol=1e-6)
    assert split.samples == 50


# --- separable (Network Decoupling) -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (4, 3, 3, 3), (6, 2, 3, 5)], ids=["cout>K2", "cout<K2", "3x5"])
def test_separable_is_exact_at_full_multiplier(shape: tuple[int, ...]) -> None:
    w = randn(*shape)
    k2 = shape[2] * shape[3]
    f = separable_init(w, k2)
    assert f.relative_error == 0.0
    assert rel(separable_weight(f.depthwise, f.pointwise, shape[1]), w) < 1e-6


def test_separable_error_falls_with_the_multiplier_and_matches_the_kernel() -> None:
    w = randn(16, 8, 3, 3, seed=3)
    errors = []
    for m in range(1, 10):
        f = separable_init(w, m)
        assert f.relative_error == pytest.approx(rel(separable_weight(f.depthwise, f.pointwise, 8), w), abs=1e-6)
        errors.append(f.relative_error)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    curve = separable_energy(w)
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(1.0) and curve == sorted(curve)


def test_separable_layout_is_pytorch_grouped_conv() -> None:
    """The depthwise + pointwise convs compute what the reconstructed dense kernel computes."""
    w, x = randn(5, 3, 3, 3, seed=4), randn(2, 3, 7, 7, seed=5)
    f = separable_init(w, 2)
    two_step = F.conv2d(F.conv2d(x, f.depthwise, padding=1, groups=3), f.pointwise)
    dense = F.conv2d(x, separable_weight(f.depthwise, f.pointwise, 3), padding=1)
    torch.testing.assert_close(two_step, dense, rtol=1e-5, atol=1e-5)


def test_multiplier_for_energy_takes_the_smallest_enough() -> None:
    w = randn(16, 8, 3, 3, seed=6)
    curve = separable_energy(w)
    for target in (0.3, 0.9, 0.999, 1.0):
        m = multiplier_for_energy(w, target)
        assert curve[m] >= target - 1e-12 and (m == 1 or curve[m - 1] < target)


def test_separable_rejects_bad_multipliers() -> None:
    with pytest.raises(ValueError, match="outside 1..K² = 9"):
        separable_init(randn(4, 2, 3, 3), 10)
    with pytest.raises(ValueError, match="Conv2d weight"):
        separable_init(randn(4, 2), 1)


# --- low rank -----------------------------------------------------------------------------------


def test_linear_low_rank_exact_at_full_rank_and_monotone() -> None:
    w = randn(12, 20, seed=7)
    errors = [linear_low_rank(w, r).relative_error for r in range(1, 13)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] == 0.0
    for r in (3, 12):
        f = linear_low_rank(w, r)
        assert f.relative_error == pytest.approx(rel(f.second @ f.first, w), abs=1e-6)
    with pytest.raises(ValueError, match="rank 13 outside 1..12"):
        linear_low_rank(w, 13)


def test_channel_low_rank_exact_at_full_rank() -> None:
    w, x = randn(8, 4, 3, 3, seed=8), randn(2, 4, 9, 9, seed=9)
    f = channel_low_rank(w, 8)
    assert f.first.shape == (8, 4, 3, 3) and f.second.shape == (8, 8, 1, 1) and f.relative_error == 0.0
    y = F.conv2d(F.conv2d(x, f.first, stride=2, padding=1), f.second)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=2, padding=1), rtol=1e-5, atol=1e-5)
    low = channel_low_rank(w, 3)
    dense = torch.einsum("or,rchw->ochw", low.second[:, :, 0, 0], low.first)
    assert low.relative_error == pytest.approx(rel(dense, w), abs=1e-6)


def _hosvd_error(w: torch.Tensor, r_out: int, r_in: int) -> float:
    """Error of a plain truncated HOSVD (what a hand-written Tucker-2 without iterations gives)."""
    w = w.double()
    u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oa,ochw,cb->abhw", u_out, w, u_in)
    return rel(torch.einsum("oa,abhw,cb->ochw", u_out, core, u_in), w)


def test_tucker2_exact_at_full_ranks_and_no_worse_than_hosvd() -> None:
    w, x = randn(12, 10, 3, 3, seed=10), randn(2, 10, 6, 6, seed=11)
    full = tucker2(w, (12, 10))
    assert full.relative_error < 1e-6
    y = F.conv2d(F.conv2d(F.conv2d(x, full.first), full.core, padding=1), full.last)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
    low = tucker2(w, (5, 4))
    assert low.relative_error == pytest.approx(rel(tucker2_weight(low.first, low.core, low.last), w), abs=1e-6)
    assert low.relative_error <= _hosvd_error(w, 5, 4) + 1e-9
    with pytest.raises(ValueError, match="Tucker-2 ranks"):
        tucker2(w, (13, 4))
