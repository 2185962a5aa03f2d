"""Quality metrics as pure functions on tensors: no models, no data loading.

Two families, one per kind of task:

* `classification_metrics` scores logits against labels: top-1 and top-k accuracy,
  macro precision/recall/F1 and the confusion matrix. The macro averages follow
  scikit-learn's ``precision_recall_fscore_support(average="macro", zero_division=0)``
  exactly (same class set, same zero rules), so a number in the report can be checked
  with sklearn in one line.
* `agreement_metrics` scores one model's outputs against a reference model's outputs
  (MSE, worst absolute error, cosine similarity): the only meaningful check when there
  are no labels, e.g. for regression heads or feature extractors.

Each result has one *headline* number, higher is better, used for early stopping in
fine-tuning and for the recipe's ``max_accuracy_drop``:

* classification → ``top1`` (fraction in [0, 1]);
* agreement → ``cosine_similarity`` (in [-1, 1], 1 = same direction). Chosen over
  ``-mse`` because it is scale-free: a drop of 0.01 means the same thing for logits in
  the hundreds and for outputs in [0, 1], so one ``max_accuracy_drop`` fits every model.
  Its blind spot, a pure rescaling of the output, is what ``mse`` and ``max_abs_err``
  next to it in the report are for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "AgreementMetrics",
    "ClassificationMetrics",
    "agreement_metrics",
    "classification_metrics",
    "confusion_matrix",
    "macro_precision_recall_f1",
]


@dataclass(frozen=True)
class ClassificationMetrics:
    """Scores of ``[N, C]`` logits against ``[N]`` integer labels.

    ``top5`` is top-k accuracy with ``k = top_k = min(5, C)``: with 3 classes every
    label is in the top 5, so k shrinks to 3 (and top-k is then trivially 1.0).
    ``confusion[t][p]`` counts samples of true class ``t`` predicted as ``p``.

    Example: labels ``[0, 1, 1]`` and predictions ``[0, 1, 0]`` give ``top1 = 2/3``,
    ``confusion = ((1, 0), (1, 1))``, precision per class ``(1/2, 1/1)`` → macro 0.75,
    recall ``(1/1, 1/2)`` → macro 0.75, F1 ``(2/3, 2/3)`` → macro 2/3.
    """

    headline_name: ClassVar[str] = "top1"

    top1: float
    top5: float
    top_k: int
    precision_macro: float
    recall_macro: float
    f1_macro: float
    confusion: tuple[tuple[int, ...], ...]
    samples: int

    @property
    def headline(self) -> float:
        """Top-1 accuracy: the number early stopping and ``max_accuracy_drop`` watch."""
        return self.top1


@dataclass(frozen=True)
class AgreementMetrics:
    """How closely an output tensor matches a reference output of the same shape.

    ``mse`` and ``max_abs_err`` run over every element. ``cosine_similarity`` is the
    mean over samples of the cosine between the two flattened per-sample outputs
    (``[N, ...] → [N, D]``); when ``D == 1`` (one scalar per sample, e.g. a regression
    head) a per-sample cosine would only compare signs, so the cosine is taken once
    over the ``N`` values instead. Two all-zero vectors count as identical (cosine 1).

    Example: output ``[[1, 0]]`` vs reference ``[[0, 1]]`` → ``mse = 1.0``,
    ``max_abs_err = 1.0``, ``cosine_similarity = 0.0``.
    """

    headline_name: ClassVar[str] = "cosine_similarity"

    mse: float
    max_abs_err: float
    cosine_similarity: float
    samples: int

    @property
    def headline(self) -> float:
        """Mean cosine similarity to the reference (scale-free; see the module docstring)."""
        return self.cosine_similarity


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class.

    Example: ``confusion_matrix(tensor([0, 1, 1]), tensor([0, 1, 0]), 2)`` is
    ``[[1, 0], [1, 1]]``, the same as ``sklearn.metrics.confusion_matrix(..., labels=[0, 1])``.
    """
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_precision_recall_f1(confusion: torch.Tensor) -> tuple[float, float, float]:
    """Macro precision, recall and F1 from a confusion matrix, as sklearn computes them.

    Why not a plain mean over all C classes: sklearn averages over the classes that
    occur in the labels *or* the predictions, and a class the model never predicts
    scores precision 0 (``zero_division=0``) rather than being dropped. F1 is
    ``2·tp / (2·tp + fp + fn)``, which equals ``2PR / (P + R)`` wherever both are
    defined and is 0 for a class never predicted correctly.

    Example: confusion ``[[1, 0, 0], [1, 1, 0], [0, 0, 0]]`` (class 2 absent from both)
    averages over classes 0 and 1 only: precision ``(0.5 + 1) / 2 = 0.75``.
    """
    cm = confusion.to(torch.float64)
    tp = cm.diagonal()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    present = (predicted + actual) > 0
    if not bool(present.any()):
        return 0.0, 0.0, 0.0
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denominator = 2 * tp + (predicted - tp) + (actual - tp)
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    return (
        float(precision[present].mean()),
        float(recall[present].mean()),
        float(f1[present].mean()),
    )


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> ClassificationMetrics:
    """Score ``[N, C]`` logits (or probabilities) against ``[N]`` integer labels.

    ``num_classes`` defaults to ``C``; give it when the confusion matrix must have a
    fixed size. The prediction is the first arg-max (``torch.argmax``), top-k counts a
    sample as correct when its label is among the ``k = min(5, C)`` largest scores.

    Example: logits ``[[2, 1], [0, 3]]`` with labels ``[0, 0]`` → ``top1 = 0.5``,
    ``top5 = 1.0`` (``top_k = 2``), ``confusion = ((1, 1), (0, 0))``.

    Raises:
        ValueError: logits are not ``[N, C]``, labels are not ``[N]``, N is 0, or a
            label lies outside ``[0, num_classes)``.
    """
    if logits.dim() != 2:
        raise ValueError(f"classification_metrics: logits must be [N, C], got shape {list(logits.shape)}")
    n, c = logits.shape
    labels = labels.reshape(-1).long()
    if labels.numel() != n:
        raise ValueError(f"classification_metrics: {n} rows of logits but {labels.numel()} labels")
    if n == 0:
        raise ValueError("classification_metrics: no samples")
    classes = c if num_classes is None else num_classes
    if classes < c:
        raise ValueError(f"classification_metrics: num_classes={classes} but the logits have {c} columns")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"classification_metrics: labels span [{low}, {high}] but there are only {classes} classes"
        )
    logits = logits.detach()
    predictions = logits.argmax(dim=1)
    k = min(5, c)
    in_top_k = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    confusion = confusion_matrix(labels, predictions, classes)
    precision, recall, f1 = macro_precision_recall_f1(confusion)
    return ClassificationMetrics(
        top1=float((predictions == labels).double().mean()),
        top5=float(in_top_k.double().mean()),
        top_k=k,
        precision_macro=precision,
        recall_macro=recall,
        f1_macro=f1,
        confusion=tuple(tuple(int(v) for v in row) for row in confusion.tolist()),
        samples=n,
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``[N, D]`` tensors; two zero rows give 1, one zero row gives 0."""
    dot = (a * b).sum(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    both_zero = (na == 0) & (nb == 0)
    cos = dot / (na * nb).clamp(min=torch.finfo(a.dtype).tiny)
    return torch.where(both_zero, torch.ones_like(cos), cos.clamp(-1.0, 1.0))


def agreement_metrics(output: torch.Tensor, reference: torch.Tensor) -> AgreementMetrics:
    """Compare ``output`` with ``reference`` (same shape, batch first), in float64.

    Example: output ``[[1, 2], [3, 4]]`` vs reference ``[[1, 2], [3, 6]]`` → squared errors
    ``0, 0, 0, 4`` so ``mse = 1.0``, ``max_abs_err = 2.0``; cosines ``1`` and
    ``(9 + 24) / (5 · √45) ≈ 0.9839``, mean ≈ 0.99193.

    Raises:
        ValueError: the shapes differ or there are no samples.
    """
    if output.shape != reference.shape:
        raise ValueError(
            f"agreement_metrics: output shape {list(output.shape)} differs from reference shape "
            f"{list(reference.shape)}"
        )
    out = output.detach().to(torch.float64)
    ref = reference.detach().to(torch.float64)
    if out.dim() == 0:
        out, ref = out.reshape(1, 1), ref.reshape(1, 1)
    n = out.shape[0]
    if n == 0 or out.numel() == 0:
        raise ValueError("agreement_metrics: no samples")
    out, ref = out.reshape(n, -1), ref.reshape(n, -1)
    if out.shape[1] == 1:
        cosine = _cosine(out.reshape(1, -1), ref.reshape(1, -1))
    else:
        cosine = _cosine(out, ref)
    diff = out - ref
    return AgreementMetrics(
        mse=float((diff**2).mean()),
        max_abs_err=float(diff.abs().max()),
        cosine_similarity=float(cosine.mean()),
        samples=int(n),
    )
