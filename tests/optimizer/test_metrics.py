"""Tests for effopt.optimizer.measure.metrics: classification numbers vs scikit-learn, agreement by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from effopt.optimizer.measure.metrics import (
    AgreementMetrics,
    ClassificationMetrics,
    agreement_metrics,
    classification_metrics,
)


def never_predicts_last_class(n: int = 300, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits whose last class is never the arg-max, while labels use every class.

    So sklearn's macro average includes a class with precision 0/0 (→ 0) and recall 0.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 1.0  # better than chance, so the metrics are not all ~1/C
    logits[:, classes - 1] -= 100.0
    return logits, labels


def never_labelled_class(n: int = 200, classes: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels avoid class 0 and class 5 entirely; the predictions still hit class 0 but never 5.

    So class 0 is in the macro average (predicted) with recall 0/0, and class 5 (in neither
    labels nor predictions) is left out of it, exactly as sklearn does.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, classes - 1, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[:, classes - 1] -= 100.0
    return logits, labels


CASES = {
    "never_predicts_last_class": never_predicts_last_class,
    "never_labelled_class": never_labelled_class,
}


@pytest.mark.parametrize("case", CASES)
def test_classification_metrics_match_sklearn(case: str) -> None:
    # setup
    logits, labels = CASES[case]()
    preds = logits.argmax(1).numpy()
    y = labels.numpy()
    classes = logits.shape[1]
    assert classes - 1 not in set(preds.tolist())  # precondition: a class is never predicted

    # execute
    m = classification_metrics(logits, labels)

    # assert
    p, r, f, _ = precision_recall_fscore_support(y, preds, average="macro", zero_division=0)
    assert m.top1 == pytest.approx(accuracy_score(y, preds), abs=1e-12)
    assert m.top_k == 5
    assert m.top5 == pytest.approx(top_k_accuracy_score(y, logits.numpy(), k=5, labels=np.arange(classes)), abs=1e-12)
    assert m.precision_macro == pytest.approx(p, abs=1e-12)
    assert m.recall_macro == pytest.approx(r, abs=1e-12)
    assert m.f1_macro == pytest.approx(f, abs=1e-12)
    assert np.array_equal(np.array(m.confusion), confusion_matrix(y, preds, labels=np.arange(classes)))
    assert m.samples == len(y)
    assert 0.0 < m.precision_macro < 1.0  # not a degenerate case


def test_worked_example_from_docstring() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    labels = torch.tensor([0, 1, 1])

    m = classification_metrics(logits, labels)

    assert m.confusion == ((1, 0), (1, 1))
    assert m.top1 == pytest.approx(2 / 3)
    assert (m.precision_macro, m.recall_macro, m.f1_macro) == pytest.approx((0.75, 0.75, 2 / 3))
    assert m.top_k == 2 and m.top5 == 1.0
    assert m.headline == m.top1 and ClassificationMetrics.headline_name == "top1"


def test_fewer_than_five_classes_shrinks_k() -> None:
    logits, labels = never_predicts_last_class(n=50, classes=3)

    m = classification_metrics(logits, labels)

    assert m.top_k == 3 and m.top5 == 1.0


def test_num_classes_pads_confusion() -> None:
    m = classification_metrics(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), num_classes=4)

    assert len(m.confusion) == 4 and m.confusion[1][1] == 1
    assert m.precision_macro == 1.0  # classes 0, 2, 3 appear nowhere and are not averaged


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(4), torch.zeros(4), "logits must be [N, C]"),
        (torch.zeros(4, 3), torch.zeros(3), "4 rows of logits but 3 labels"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "labels span [0, 3]"),
        (torch.zeros(0, 3), torch.zeros(0), "no samples"),
    ],
)
def test_classification_metrics_rejects_bad_shapes(logits: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        classification_metrics(logits, labels)


def test_agreement_by_hand() -> None:
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ref = torch.tensor([[1.0, 2.0], [3.0, 6.0]])

    m = agreement_metrics(out, ref)

    # squared errors 0, 0, 0, 4 → mean 1; cosines 1 and 33 / (5·√45)
    assert m.mse == pytest.approx(1.0)
    assert m.max_abs_err == pytest.approx(2.0)
    assert m.cosine_similarity == pytest.approx((1.0 + 33.0 / (5.0 * math.sqrt(45.0))) / 2)
    assert m.samples == 2
    assert m.headline == m.cosine_similarity and AgreementMetrics.headline_name == "cosine_similarity"


def test_agreement_orthogonal_and_zero_vectors() -> None:
    m = agreement_metrics(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))

    # sample 0 orthogonal (cos 0), sample 1 both zero (identical → cos 1)
    assert m.cosine_similarity == pytest.approx(0.5)
    assert m.mse == pytest.approx(0.5) and m.max_abs_err == 1.0


def test_agreement_flattens_non_batch_dims() -> None:
    ref = torch.arange(24.0).reshape(2, 3, 4)
    out = ref.clone()
    out[1] *= -1.0

    m = agreement_metrics(out, ref)

    assert m.cosine_similarity == pytest.approx(0.0)  # mean of +1 and -1
    assert m.max_abs_err == pytest.approx(2 * 23.0)


def test_agreement_scalar_outputs_use_one_cosine_over_the_batch() -> None:
    # Per-sample cosines of scalars would all be +1 (same signs) and hide the disagreement.
    out = torch.tensor([[1.0], [2.0]])
    ref = torch.tensor([[2.0], [1.0]])

    m = agreement_metrics(out, ref)

    assert m.cosine_similarity == pytest.approx(4.0 / 5.0)


def test_agreement_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"output shape \[2, 3\] differs from reference shape \[2, 4\]"):
        agreement_metrics(torch.zeros(2, 3), torch.zeros(2, 4))
