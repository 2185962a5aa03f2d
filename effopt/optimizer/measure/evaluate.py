"""Run a model over a data source and score it for its task.

Why a separate module from `effopt.optimizer.measure.verify`: verification asks "is the optimized
model numerically the same function?" (tolerances), evaluation asks "how good is it?"
(accuracy, F1, agreement). Passes that trade accuracy for speed (pruning, QAT, the
separable rewrite) need the second question before and after they run, and the
fine-tuning service needs it for early stopping.

``model`` is any callable from input tensors to an output tensor, so the same code
scores an ``nn.Module``, a loaded ``.pt2`` program, an ONNX file through
`onnx_callable` or an AOTInductor package through `aoti_callable`. Example::

    ev = evaluate(model, eval_source, "classification", reference=original)
    ev.headline_name, ev.headline      # ("top1", 0.978)
    ev.agreement.cosine_similarity     # 0.9996 vs the original
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.errors import DataError, EmitError
from effopt.optimizer.emit.aoti import load_aoti
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.measure.metrics import (
    AgreementMetrics,
    ClassificationMetrics,
    agreement_metrics,
    classification_metrics,
)
from effopt.optimizer.measure.runtime import open_session

__all__ = ["Evaluation", "Task", "aoti_callable", "eval_mode", "evaluate", "first_tensor", "onnx_callable"]

#: What the model's output means. ``classification``: ``[N, C]`` logits scored against
#: labels. ``regression``/``generic``: outputs scored only by agreement with a reference
#: model (the original), because effopt cannot know what a good output is.
Task = Literal["classification", "regression", "generic"]

ModelLike = Callable[..., object]


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one data source.

    ``classification`` is set for the classification task (labels required);
    ``agreement`` is set whenever a reference model was given (always for
    regression/generic). The headline is the number compared across passes.

    Example: ``Evaluation("classification", "sklearn-digits:test", cls, None).headline``
    is ``cls.top1``.
    """

    task: Task
    dataset: str
    classification: ClassificationMetrics | None
    agreement: AgreementMetrics | None

    @property
    def headline(self) -> float:
        """Top-1 for classification, cosine similarity to the reference otherwise (higher is better)."""
        return self._headline_metrics().headline

    @property
    def headline_name(self) -> str:
        """``"top1"`` or ``"cosine_similarity"``: what `headline` is, for the report."""
        return self._headline_metrics().headline_name

    def _headline_metrics(self) -> ClassificationMetrics | AgreementMetrics:
        if self.task == "classification" and self.classification is not None:
            return self.classification
        if self.agreement is not None:
            return self.agreement
        raise ValueError(f"evaluation on {self.dataset}: no metrics to take a headline from")


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Put every submodule of an ``nn.Module`` in eval mode, then restore each one's flag.

    Why per submodule: a caller may deliberately hold a mixed state (e.g. BatchNorm frozen
    in eval while the rest trains); ``model.train(was_training)`` would flatten it.
    Non-modules pass through untouched.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False  # not model.eval(): torch.export's unlifted modules refuse eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def first_tensor(output: object, where: str) -> torch.Tensor:
    """The first tensor of a model output (a tensor, or a tuple/list/dict holding tensors).

    Example: ``first_tensor((logits, features), "m") is logits``.
    """
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise DataError(f"{where}: the model returned {type(output).__name__} with no tensor in it")


def _collect(
    model: ModelLike, reference: ModelLike | None, data: DataSource
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    outputs: list[torch.Tensor] = []
    references: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(model), eval_mode(reference):
        for batch in data.batches():
            outputs.append(first_tensor(model(*batch.inputs), f"data {data.name}").detach().cpu())
            if reference is not None:
                references.append(first_tensor(reference(*batch.inputs), f"data {data.name}").detach().cpu())
            if batch.labels is not None:
                labels.append(batch.labels.cpu())
    if not outputs:
        raise DataError(f"data {data.name}: the data source yielded no batches")
    return (
        torch.cat(outputs),
        torch.cat(references) if references else None,
        torch.cat(labels) if labels else None,
    )


def evaluate(
    model: ModelLike,
    data: DataSource,
    task: Task,
    reference: ModelLike | None = None,
) -> Evaluation:
    """Score ``model`` on every batch of ``data`` for ``task``; agreement vs ``reference`` when given.

    Runs under ``torch.no_grad`` with any ``nn.Module`` (model and reference) in eval mode,
    restoring each submodule's previous mode afterwards. Only the first tensor of each
    output is scored.

    Raises:
        DataError: classification on a source without labels, logits that are not
            ``[N, C]``, or output shapes that differ from the reference's.
        ValueError: regression/generic without a reference (nothing to score against).
    """
    if task == "classification" and not data.has_labels:
        raise DataError(
            f"data {data.name}: task 'classification' needs labels but this source has none; "
            "give a labelled eval source or set task: generic to compare with the original only"
        )
    if task != "classification" and reference is None:
        raise ValueError(f"evaluate on {data.name}: task {task!r} is scored by agreement and needs a reference")
    output, ref, labels = _collect(model, reference, data)
    classification = None
    if task == "classification":
        if output.dim() != 2 or labels is None:
            raise DataError(
                f"data {data.name}: task 'classification' needs [N, C] logits; the model returned shape "
                f"{list(output.shape)}; set task: regression or generic"
            )
        try:
            classification = classification_metrics(output, labels)
        except ValueError as e:
            raise DataError(f"data {data.name}: {e}") from e
    agreement = None
    if ref is not None:
        if ref.shape != output.shape:
            raise DataError(
                f"data {data.name}: the model's output shape {list(output.shape)} differs from the "
                f"reference's {list(ref.shape)}"
            )
        agreement = agreement_metrics(output, ref)
    return Evaluation(task, data.name, classification, agreement)


class OnnxCallable:
    """An onnxruntime session that takes and returns torch tensors, for `evaluate`.

    One CPU thread, so scores are reproducible. Inputs with a fixed leading (batch)
    dimension are fed in chunks of that size, the last chunk padded by repeating its
    final sample and the padding dropped from the output, so a batch-1 export can still
    be scored on batches of 64. Returns the first output.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise EmitError(f"{path}: ONNX file not found")
        self.path = path
        self.session = open_session(path, threads=1)
        self.inputs = self.session.get_inputs()
        leading = {i.shape[0] for i in self.inputs if i.shape and isinstance(i.shape[0], int)}
        self.fixed_batch: int | None = min(leading) if leading else None

    def _run(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        feeds = {spec.name: array for spec, array in zip(self.inputs, arrays, strict=True)}
        return self.session.run(None, feeds)[0]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise DataError(
                f"{self.path.name}: the ONNX model takes {len(self.inputs)} input(s) "
                f"({', '.join(i.name for i in self.inputs)}), got {len(inputs)}"
            )
        arrays = [t.detach().cpu().numpy() for t in inputs]
        n = arrays[0].shape[0] if arrays[0].ndim else 1
        size = self.fixed_batch
        if size is None or size == n:
            return torch.from_numpy(np.ascontiguousarray(self._run(arrays)))
        chunks = []
        for start in range(0, n, size):
            part = [a[start : start + size] for a in arrays]
            short = size - part[0].shape[0]
            if short:
                part = [np.concatenate([p, np.repeat(p[-1:], short, axis=0)]) for p in part]
            chunks.append(self._run(part)[: size - short])
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks)))


def onnx_callable(path: str | Path) -> OnnxCallable:
    """Wrap ``model.onnx`` so `evaluate` can score it: ``evaluate(onnx_callable(p), data, task)``.

    Raises:
        EmitError: the file does not exist.
    """
    return OnnxCallable(Path(path))


class AotiCallable:
    """A loaded ``model_aoti.pt2`` that copies each input into the contiguous layout first, for `evaluate`.

    Why the copy: torch 2.13's compiled code reads an input with the strides of the export
    example and checks nothing (`effopt.optimizer.emit.aoti.INPUT_LAYOUT`). A data source may
    hand over a view: digits images from ``a.reshape(n, 8, 8, 1)`` permuted to NCHW have strides
    (64, 1, 8, 1), count as contiguous (one channel), so ``x.contiguous()`` keeps them, and the
    package's logits came out up to 7.7 off. ``x.clone(memory_format=torch.contiguous_format)``
    gives (64, 64, 8, 1). One copy per batch is noise next to the model.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise EmitError(f"{path}: AOTInductor package not found")
        self.path = path
        self.run = load_aoti(path)

    def __call__(self, *inputs: torch.Tensor) -> object:
        return self.run(*(t.detach().cpu().clone(memory_format=torch.contiguous_format) for t in inputs))


def aoti_callable(path: str | Path) -> AotiCallable:
    """Wrap ``model_aoti.pt2`` so `evaluate` can score it: ``evaluate(aoti_callable(p), data, task)``.

    Raises:
        EmitError: the file does not exist.
    """
    return AotiCallable(Path(path))
