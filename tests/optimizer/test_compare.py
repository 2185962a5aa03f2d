"""Tests for effopt.optimizer.ir.compare: the one model-vs-model comparison every check uses.

Numbers are worked out by hand in each test, so a change to a rule (NaN, scale, top-1)
shows up as a wrong number rather than a silently different report.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effopt.optimizer.ir.compare import (
    Agreement,
    compare_outputs,
    compare_tensors,
    concat_batches,
    concat_flat,
    elementwise_errors,
    output_tensors,
)

NAN, INF = float("nan"), float("inf")


def test_the_module_docstring_example() -> None:
    # setup
    got = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    want = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    # execute
    a = compare_tensors(got, want)
    # assert: errors [0, 1, 1.5, 1]; max|want| = 2; row 1 picks class 0, the reference class 1
    assert a.max_abs_err == 1.5
    assert a.max_rel_err == pytest.approx(0.75)
    assert a.worst_index == (1, 0) and (a.want_at_worst, a.got_at_worst) == (0.5, 2.0)
    assert a.rms_err == pytest.approx(math.sqrt(4.25 / 4))
    assert a.relative_l2 == pytest.approx(math.sqrt(4.25 / 6.25))
    assert a.top1_agreement == 0.5
    assert (a.elements, a.samples, a.mismatches) == (4, 2, 3)


def test_identical_outputs_agree_exactly() -> None:
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    a = compare_tensors(x, x.clone())
    assert (a.max_abs_err, a.max_rel_err, a.rms_err, a.relative_l2, a.mismatches) == (0.0, 0.0, 0.0, 0.0, 0)
    assert a.top1_agreement == 1.0 and a.within_tolerance


def test_nan_on_both_sides_agrees_and_on_one_side_is_infinite() -> None:
    # setup: NaN at index 1 on both sides, the same +inf at index 2
    want = torch.tensor([1.0, NAN, INF, 2.0])
    same = torch.tensor([1.0, NAN, INF, 2.0])
    one_sided = torch.tensor([1.0, 5.0, INF, NAN])
    # execute
    a, b = compare_tensors(same, want), compare_tensors(one_sided, want)
    # assert: the finite part of want sets the scale (max|want| = 2, not inf)
    assert (a.max_abs_err, a.mismatches, a.within_tolerance) == (0.0, 0, True)
    assert b.max_abs_err == INF and b.rms_err == INF and not b.within_tolerance
    assert b.mismatches == 2
    assert not math.isfinite(b.relative_l2)


def test_tolerance_is_allclose_and_a_wrong_value_must_fail() -> None:
    # setup: |got - want| = [0, 0.5]; allowed atol + rtol·|want| = 0.1 + 0.1·[1, 2] = [0.2, 0.3]
    got, want = torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])
    # execute
    loose, tight = compare_tensors(got, want, rtol=0.1, atol=0.3), compare_tensors(got, want, rtol=0.1, atol=0.1)
    # assert
    assert loose.within_tolerance and loose.worst_excess == pytest.approx(0.5 - 0.5)
    assert not tight.within_tolerance and tight.worst_excess == pytest.approx(0.2)
    assert tight.worst_index == (1,)


def test_elementwise_errors_docstring_example() -> None:
    diff, excess = elementwise_errors(torch.tensor([1.0, NAN, 3.0]), torch.tensor([1.0, NAN, 2.0]), 0.0, 0.5)
    assert diff.tolist() == [0.0, 0.0, 1.0]
    assert excess.tolist() == [-0.5, -0.5, 0.5]


def test_top1_only_for_logits() -> None:
    # setup: [N, C > 1] logits, a [N, 1] column and a 1-D vector
    logits_want = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    logits_got = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    # execute / assert: 3 of 4 rows pick the same class
    assert compare_tensors(logits_got, logits_want).top1_agreement == 0.75
    assert compare_tensors(torch.ones(4, 1), torch.ones(4, 1)).top1_agreement is None
    assert compare_tensors(torch.ones(4), torch.ones(4)).top1_agreement is None


def test_rms_and_relative_l2() -> None:
    # setup: errors [3, 4] -> RMS sqrt(25 / 2); ||want|| = ||[0, 10]|| = 10
    got, want = torch.tensor([3.0, 14.0]), torch.tensor([0.0, 10.0])
    # execute
    a = compare_tensors(got, want)
    # assert
    assert a.rms_err == pytest.approx(math.sqrt(12.5))
    assert a.relative_l2 == pytest.approx(0.5)
    assert compare_tensors(torch.tensor([3.0, 4.0]), torch.zeros(2)).relative_l2 == 5.0  # zero want: plain L2


def test_numpy_bool_and_integer_inputs_compare_in_float64() -> None:
    codes = np.array([[3, -7], [127, -128]], dtype=np.int8)
    other = codes.copy()
    other[1, 1] = -127
    assert compare_tensors(codes, torch.from_numpy(other)).mismatches == 1
    assert compare_tensors(np.array([True, False]), np.array([True, True])).max_abs_err == 1.0


def test_empty_outputs_agree() -> None:
    a = compare_tensors(torch.zeros(0, 3), torch.zeros(0, 3))
    assert (a.max_abs_err, a.max_rel_err, a.rms_err, a.worst_index, a.within_tolerance) == (0.0, 0.0, 0.0, (), True)
    assert a.samples == 0 and a.elements == 0


def test_zero_dim_outputs() -> None:
    a = compare_tensors(torch.tensor(2.0), torch.tensor(1.5))
    assert (a.max_abs_err, a.worst_index, a.samples) == (0.5, (), 1)


def test_a_different_shape_is_an_error_not_a_tolerance() -> None:
    with pytest.raises(ValueError, match=r"shape \[2, 5\] with the reference's \[2, 10\]"):
        compare_tensors(torch.zeros(2, 5), torch.zeros(2, 10))


def test_nested_outputs_are_matched_by_position() -> None:
    # setup: (logits, {"aux": features}, a non-tensor leaf that is ignored)
    x, y = torch.ones(2, 3), torch.zeros(4)
    got = (x, {"aux": y + 1.0}, "tag")
    want = [x, {"aux": y}, 7]
    # execute
    first, second = compare_outputs(got, want)
    # assert
    assert first.max_abs_err == 0.0 and first.top1_agreement == 1.0
    assert second.max_abs_err == 1.0 and second.elements == 4


def test_nested_outputs_of_a_different_structure_fail() -> None:
    with pytest.raises(ValueError, match="2 output tensors with the reference's 1"):
        compare_outputs((torch.ones(2), torch.ones(2)), torch.ones(2))
    with pytest.raises(ValueError, match=r"output 1: cannot compare shape \[3\]"):
        compare_outputs((torch.ones(2), torch.ones(3)), (torch.ones(2), torch.ones(2)))


def test_output_tensors_flattens_and_converts_numpy() -> None:
    a, b = torch.ones(1), np.zeros(2, np.float32)
    leaves = output_tensors([a, (b, None)])
    assert leaves[0] is a and isinstance(leaves[1], torch.Tensor) and leaves[1].shape == (2,)


def test_concat_batches_pools_samples() -> None:
    # setup: two runs of (logits [8, 10], a scalar)
    runs = [[torch.zeros(8, 10), torch.tensor(1.0)], [torch.ones(8, 10), torch.tensor(2.0)]]
    # execute
    logits, scalars = concat_batches(runs)
    # assert
    assert logits.shape == (16, 10) and scalars.tolist() == [1.0, 2.0]
    assert concat_batches([]) == []


def test_concat_flat_joins_every_output() -> None:
    joined = concat_flat([torch.ones(2, 2), torch.zeros(3, dtype=torch.int32)])
    assert joined.dtype == torch.float64 and joined.tolist() == [1.0] * 4 + [0.0] * 3
    assert concat_flat([]).numel() == 0


def test_agreement_is_frozen() -> None:
    a = compare_tensors(torch.ones(2), torch.ones(2))
    assert isinstance(a, Agreement)
    with pytest.raises(AttributeError):
        a.max_abs_err = 1.0  # type: ignore[misc]
