"""Tests for effopt.optimizer.train.finetune: recovery by distillation, determinism, budgets, rewinding.

Every test starts from one DigitsNet trained for 3 epochs on scikit-learn's real digits
(~0.98 test accuracy), built once per module, and works on deep copies of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from effopt.errors import DataError, PassError
from effopt.optimizer.frontend.data import DataSource, sklearn_digits
from effopt.optimizer.measure.evaluate import evaluate
from effopt.optimizer.train.finetune import (
    FineTuneConfig,
    FineTuner,
    distillation_loss,
    resolve_loss,
    restore,
    snapshot,
)
from examples.digits import DigitsNet, train
from tests.models import seeded

#: Relative noise added to every parameter by `damaged`: N(0, (NOISE · std(p))²).
NOISE = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def trained(one_thread: None) -> nn.Module:
    model, accuracy = train(seed=0, epochs=3)
    assert accuracy >= 0.9
    return model


def train_source(labelled: bool = True) -> DataSource:
    """The digits training split; ``labelled=False`` drops the labels (has_labels is False)."""
    x, y = sklearn_digits("train").tensors
    dataset = TensorDataset(x, y) if labelled else TensorDataset(x)
    return DataSource(f"sklearn-digits:train{'' if labelled else ' (no labels)'}", dataset, 64, labelled)


def eval_source() -> DataSource:
    return DataSource("sklearn-digits:test", sklearn_digits("test"), 256, True)


def accuracy(model: nn.Module) -> float:
    return evaluate(model, eval_source(), "classification").headline


def damaged(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with Gaussian noise of NOISE·std added to every parameter."""
    copy_ = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(NOISE * p.std() * torch.randn(p.shape, generator=g))
    return copy_


def quiet(**fields: object) -> FineTuneConfig:
    """A config from plain fields, the way a recipe builds it, with the progress bar off."""
    return FineTuneConfig.model_validate({"progress": False, **fields})


def test_distillation_alone_recovers_a_damaged_model(trained: nn.Module) -> None:
    # setup
    student = damaged(trained)
    original, hurt = accuracy(trained), accuracy(student)
    assert original - hurt >= 0.2  # precondition: the noise really hurt
    tuner = FineTuner(train_source(labelled=False), None, "classification", seed=0)

    # execute: no labels anywhere, only the original as teacher
    result = tuner.run(student, trained, quiet(epochs=2, lr=3e-3))

    # assert
    recovered = accuracy(student)
    assert result.loss == "distill" and result.stopped_because == "budget_steps"
    assert result.best_headline is None and result.history == ()
    assert recovered >= hurt + 0.7 * (original - hurt), (original, hurt, recovered)
    assert not student.training


def test_two_runs_with_the_same_seed_are_bitwise_identical(trained: nn.Module) -> None:
    tuner = FineTuner(train_source(), eval_source(), "classification", seed=7)
    config = quiet(steps=6, eval_every=3, lr=3e-3)  # labels+distill; DigitsNet's dropout draws random masks
    rng_before = torch.get_rng_state()

    students = [damaged(trained), damaged(trained)]
    results = [tuner.run(s, trained, config) for s in students]

    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert results[0].history == results[1].history and len(results[0].history) == 3
    a, b = (s.state_dict() for s in students)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = damaged(trained)
    FineTuner(train_source(), None, "classification", seed=8).run(other, trained, config)
    assert not torch.equal(other.fc2.weight, students[0].fc2.weight)  # the seed matters


def sabotage(from_step: int) -> Callable[[nn.Module, int], None]:
    """An ``on_step`` that ruins the weights from ``from_step`` on, so later scores only get worse."""

    def hook(model: nn.Module, step: int) -> None:
        if step >= from_step:
            g = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.add_(3.0 * p.std() * torch.randn(p.shape, generator=g))

    return hook


def test_best_state_is_restored_not_the_last(trained: nn.Module) -> None:
    student = damaged(trained)
    tuner = FineTuner(train_source(), eval_source(), "classification", seed=0)

    result = tuner.run(student, trained, quiet(steps=12, eval_every=2, lr=3e-3), on_step=sabotage(from_step=7))

    steps, headlines = zip(*result.history)
    assert steps == (0, 2, 4, 6, 8, 10, 12)
    assert 0 < result.best_step <= 6  # training helped before the sabotage
    assert result.best_headline == max(headlines) > result.initial_headline
    assert headlines[-1] < result.best_headline
    assert accuracy(student) == result.best_headline


def test_early_stopping_stops_before_the_budget(trained: nn.Module) -> None:
    student = copy.deepcopy(trained)
    tuner = FineTuner(train_source(), eval_source(), "classification", seed=0)

    result = tuner.run(student, trained, quiet(steps=50, eval_every=1, patience=2), on_step=sabotage(from_step=1))

    assert result.stopped_because == "early_stopping"
    assert result.steps == 2 < 50 and [s for s, _ in result.history] == [0, 1, 2]
    assert result.best_step == 0 and accuracy(student) == result.initial_headline


def test_time_budget_stops_after_one_step(trained: nn.Module) -> None:
    student = damaged(trained)
    tuner = FineTuner(train_source(), eval_source(), "classification", seed=0)

    result = tuner.run(student, trained, quiet(steps=100, time_budget_s=0.0))

    assert result.stopped_because == "time_budget"
    assert result.steps == 1 and result.epochs_completed == 0
    assert [s for s, _ in result.history] == [0, 1]  # the last state is still scored


def poison(model: nn.Module, step: int) -> None:
    """An ``on_step`` that makes the next loss NaN."""
    if step == 2:
        model.fc2.weight.fill_(float("nan"))


def test_a_diverging_run_stops_and_keeps_the_best_state(trained: nn.Module) -> None:
    student = damaged(trained)
    tuner = FineTuner(train_source(), eval_source(), "classification", seed=0)

    result = tuner.run(student, trained, quiet(steps=10, eval_every=1, lr=3e-3), on_step=poison)

    assert result.stopped_because == "diverged" and result.steps == 2
    assert result.best_step == 1 and not torch.isnan(student.fc2.weight).any()
    assert accuracy(student) == result.best_headline


def test_a_diverging_run_without_eval_data_is_an_error(trained: nn.Module) -> None:
    tuner = FineTuner(train_source(), None, "classification", seed=0)

    with pytest.raises(PassError, match="the loss became nan at step 3"):
        tuner.run(damaged(trained), trained, quiet(steps=10), on_step=poison)


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-tensor masks keeping the largest-magnitude (1 - sparsity) of each conv/linear weight."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach().abs().flatten()
            threshold = w.kthvalue(int(sparsity * w.numel())).values
            masks[name] = (module.weight.detach().abs() > threshold).to(module.weight.dtype)
    return masks


def apply_masks(masks: dict[str, torch.Tensor]) -> Callable[[nn.Module, int], None]:
    def hook(model: nn.Module, step: int) -> None:
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)

    return hook


def test_lottery_ticket_prune_rewind_retrain(trained: nn.Module) -> None:
    # setup: the initial weights train() started from (it seeds the global RNG with 0)
    with seeded(0):
        model = DigitsNet()
    initial = snapshot(model)
    masks = magnitude_masks(trained, 0.5)
    keep = apply_masks(masks)

    # execute: rewind the trained winner to its initial weights, prune, retrain with the mask held
    restore(model, initial)
    with torch.no_grad():
        keep(model, 0)
    result = FineTuner(train_source(), None, "classification", seed=0).run(
        model, None, quiet(epochs=3, lr=3e-3), on_step=keep
    )

    # assert
    assert result.loss == "labels"
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert 0.45 <= float((mask == 0).double().mean()) <= 0.55
        assert torch.all(weight[mask == 0] == 0), name
        assert not torch.equal(weight, initial[f"{name}.weight"] * mask), name  # it did train
    assert accuracy(model) >= 0.85


def test_freeze_batchnorm_keeps_running_statistics(trained: nn.Module) -> None:
    student = damaged(trained)
    before = snapshot(student)
    tuner = FineTuner(train_source(labelled=False), None, "classification", seed=0)

    tuner.run(student, trained, quiet(steps=3, freeze_batchnorm=True))

    after = student.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "running" in k)
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])


def test_feature_matching_with_a_missing_module_names_it(trained: nn.Module) -> None:
    tuner = FineTuner(train_source(), None, "classification", seed=0)

    with pytest.raises(PassError, match="feature_matching module 'fc9' does not exist in the student and teacher"):
        tuner.run(copy.deepcopy(trained), trained, quiet(steps=1, feature_matching=["fc1", "fc9"]))


def test_feature_matching_runs_and_removes_its_hooks(trained: nn.Module) -> None:
    student = damaged(trained)
    tuner = FineTuner(train_source(labelled=False), None, "classification", seed=0)

    result = tuner.run(student, trained, quiet(steps=3, feature_matching=["fc1", "conv3"]))

    assert result.steps == 3
    assert not student.fc1._forward_hooks and not trained.fc1._forward_hooks


def test_unlabelled_data_cannot_train_on_labels() -> None:
    tuner = FineTuner(train_source(labelled=False), None, "classification", seed=0)

    with pytest.raises(DataError, match=r"sklearn-digits:train \(no labels\): loss 'labels' needs labels"):
        tuner.run(DigitsNet(), None, quiet(steps=1, loss="labels"))


@pytest.mark.parametrize(
    ("requested", "labels", "teacher", "expected"),
    [
        ("auto", True, True, "labels+distill"),
        ("auto", False, True, "distill"),
        ("auto", True, False, "labels"),
        ("distill", True, True, "distill"),
    ],
)
def test_resolve_loss(requested: str, labels: bool, teacher: bool, expected: str) -> None:
    assert resolve_loss(requested, labels, teacher, "data") == expected


def test_resolve_loss_without_labels_or_teacher() -> None:
    with pytest.raises(DataError, match="calib: the data has no labels and no teacher"):
        resolve_loss("auto", False, False, "calib")
    with pytest.raises(PassError, match="needs a teacher"):
        resolve_loss("distill", True, False, "calib")


def test_distillation_loss_worked_example() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])

    kd = distillation_loss(student, teacher, temperature=1.0, task="classification")

    # KL((1/4, 3/4) || (1/2, 1/2)) = 1/4·ln(1/2) + 3/4·ln(3/2)
    expected = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert kd.item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(teacher, teacher, 4.0, "classification").item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(student, teacher, 4.0, "regression").item() == pytest.approx(
        torch.log(torch.tensor(3.0)).item() ** 2 / 2
    )


def test_config_defaults_and_validation() -> None:
    assert FineTuneConfig().epochs == 3 and FineTuneConfig().steps is None
    assert FineTuneConfig.model_validate({"steps": 10}).epochs is None
    with pytest.raises(ValidationError, match="give either epochs"):
        FineTuneConfig.model_validate({"epochs": 1, "steps": 10})
    with pytest.raises(ValidationError, match="extra_forbidden"):
        FineTuneConfig.model_validate({"epoch": 1})
    with pytest.raises(ValidationError, match="eval_every"):
        FineTuneConfig.model_validate({"eval_every": "sometimes"})
    assert all(f.description for f in FineTuneConfig.model_fields.values())


def test_patience_without_eval_data_is_refused() -> None:
    tuner = FineTuner(train_source(), None, "classification", seed=0)

    with pytest.raises(DataError, match="patience=2 needs eval data"):
        tuner.run(DigitsNet(), None, quiet(steps=1, patience=2))
