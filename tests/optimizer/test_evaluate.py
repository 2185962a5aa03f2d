"""Tests for effopt.optimizer.measure.evaluate: tasks, modes, errors, and scoring an ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.utils.data import TensorDataset

from effopt.errors import DataError, EmitError
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.measure.evaluate import Evaluation, evaluate, onnx_callable
from effopt.optimizer.measure.metrics import classification_metrics


def linear_source(labelled: bool = True, n: int = 10, batch: int = 4) -> DataSource:
    """``n`` samples of 3 features, labels 0..2; batch 4 so the last batch is short."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = torch.arange(n) % 3
    dataset = TensorDataset(x, y) if labelled else TensorDataset(x)
    return DataSource("toy", dataset, batch, labelled)


def toy_model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 3, generator=g))
        model[0].bias.copy_(torch.randn(3, generator=g))
    return model


def test_classification_matches_metrics_on_all_samples() -> None:
    source, model = linear_source(), toy_model()
    x, y = source.dataset.tensors  # type: ignore[attr-defined]

    ev = evaluate(model, source, "classification", reference=toy_model(seed=1))

    with torch.no_grad():
        expected = classification_metrics(model.eval()(x), y)
    assert ev.classification == expected
    assert ev.headline == expected.top1 and ev.headline_name == "top1"
    assert ev.agreement is not None and ev.agreement.samples == 10
    assert ev.agreement.cosine_similarity < 0.999  # a different model does not agree


def test_evaluate_uses_eval_mode_and_restores_mixed_modes() -> None:
    model = toy_model()
    model.train()
    model[0].eval()  # a deliberately mixed state

    first = evaluate(model, linear_source(), "classification")
    second = evaluate(model, linear_source(), "classification")

    assert first == second  # dropout was off: eval mode
    assert model.training and not model[0].training and model[1].training


def test_regression_scores_agreement_with_reference() -> None:
    model = toy_model()

    ev = evaluate(model, linear_source(labelled=False), "regression", reference=model)

    assert ev.classification is None
    assert ev.headline_name == "cosine_similarity" and ev.headline == pytest.approx(1.0)
    assert ev.agreement is not None and ev.agreement.mse == 0.0


def test_plain_callable_is_accepted() -> None:
    ev = evaluate(lambda x: torch.stack([x[:, 0], -x[:, 0], x[:, 1]], 1), linear_source(), "classification")

    assert isinstance(ev, Evaluation) and ev.classification is not None and ev.classification.samples == 10


def test_classification_without_labels_names_the_source() -> None:
    with pytest.raises(DataError, match="data toy: task 'classification' needs labels"):
        evaluate(toy_model(), linear_source(labelled=False), "classification")


def test_classification_needs_two_dimensional_logits() -> None:
    with pytest.raises(DataError, match=r"needs \[N, C\] logits; the model returned shape \[10\]"):
        evaluate(lambda x: x[:, 0], linear_source(), "classification")


def test_regression_without_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a reference"):
        evaluate(toy_model(), linear_source(), "generic")


def write_linear_onnx(path: Path, model: nn.Linear, batch: int | str) -> Path:
    """A one-node ``Gemm`` ONNX file computing ``model``; ``batch`` fixed (int) or symbolic (str)."""
    weight = numpy_helper.from_array(model.weight.detach().numpy(), "W")
    bias = numpy_helper.from_array(model.bias.detach().numpy(), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        initializer=[weight, bias],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, path)
    return path


@pytest.mark.parametrize("batch", [1, 3, "N"])
def test_onnx_file_scores_like_the_module(tmp_path: Path, batch: int | str) -> None:
    # Batch 1 and 3 are fixed export batches that differ from the data's batch of 4
    # (and 10 % 3 leaves a padded last chunk); "N" is a dynamic batch.
    model = toy_model()
    path = write_linear_onnx(tmp_path / "model.onnx", model[0], batch)

    from_onnx = evaluate(onnx_callable(path), linear_source(), "classification", reference=model)

    assert from_onnx.classification == evaluate(model, linear_source(), "classification").classification
    assert from_onnx.agreement is not None and from_onnx.agreement.max_abs_err < 1e-5
    assert np.isclose(from_onnx.agreement.cosine_similarity, 1.0)


def test_onnx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EmitError, match="missing.onnx: ONNX file not found"):
        onnx_callable(tmp_path / "missing.onnx")


def test_data_subset_is_the_first_n_or_a_seeded_random_n() -> None:
    from effopt.optimizer.frontend.data import load_source
    from effopt.optimizer.ir.core import InputSpec
    from effopt.recipes import parse_recipe
    from effopt.recipes.schema import DataSourceSpec

    loaded = parse_recipe({"version": 1, "model": {"factory": "m:f"}, "inputs": [{"name": "x", "shape": [1, 1, 8, 8]}]})
    specs = (InputSpec("x", (1, 1, 8, 8)),)
    first = load_source(DataSourceSpec(source="sklearn-digits:test", subset=10), loaded, specs, "eval")
    seeded = load_source(DataSourceSpec(source="sklearn-digits:test", subset=10, seed=3), loaded, specs, "eval")
    again = load_source(DataSourceSpec(source="sklearn-digits:test", subset=10, seed=3), loaded, specs, "eval")
    assert len(first) == len(seeded) == 10
    assert list(first.dataset.indices) == list(range(10))
    assert list(seeded.dataset.indices) == list(again.dataset.indices) != list(range(10))
