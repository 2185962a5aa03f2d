"""The recipe's ``finetune:`` block is every fine-tuning pass's default; a pass's own options override it.

Precedence per field (`effopt.passes.finetuning.with_defaults`): set in the pass's options → set in
the recipe's block → the pass's own default (QAT: ``lr = 1e-4``). ``epochs``/``steps`` are one
budget. End to end, three tiny QAT compiles differ only in their learning rates:

    A  finetune: {lr: 1e-9}   qat: {steps: 3}              lr 1e-9: the model barely moves
    B  finetune: {lr: 0.05}   qat: {steps: 3}              lr 0.05: the recipe's block takes effect (A ≠ B)
    C  finetune: {lr: 0.05}   qat: {steps: 3, lr: 1e-9}    the pass's lr wins (C == A, bit for bit)

The last test compiles one QAT recipe twice and compares ``report.json`` bytes (no wall-clock
seconds in the report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import effopt
from effopt.errors import RecipeError
from effopt.passes.finetuning import DEFAULT_EPOCHS, FineTuneConfig, with_defaults
from effopt.passes.quantize import QatOptions
from effopt.recipes.loading import parse_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]


def _recipe(folder: Path, finetune: dict | None, qat: dict, formats: tuple[str, ...] = ()) -> dict:
    data = folder / "train.npz"
    if not data.is_file():
        np.savez(data, x=np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32))
    recipe = {
        "version": 1,
        "model": {"factory": "tests.models:mlp", "pythonpath": [str(REPO_ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 64]}],
        "passes": [{"name": "quantize", "qat": {"batch_size": 16, "progress": False, **qat}}],
        "data": {"train": str(data)},
        "output": {"formats": list(formats)},
    }
    return recipe | ({"finetune": finetune} if finetune is not None else {})


def _qat_state(tmp_path: Path, finetune: dict | None, qat: dict) -> dict[str, torch.Tensor]:
    result = effopt.compile(_recipe(tmp_path, finetune, qat), emit=False)
    assert result.report.passes[-1].result.stats["qat_steps"] == 3  # precondition: QAT really trained
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- end to end ------------------------------------------------------------------------------


def test_the_recipes_finetune_block_changes_the_qat_model_and_the_pass_overrides_it(tmp_path: Path) -> None:
    # execute
    tiny = _qat_state(tmp_path, {"lr": 1e-9}, {"steps": 3})
    large = _qat_state(tmp_path, {"lr": 0.05}, {"steps": 3})
    overridden = _qat_state(tmp_path, {"lr": 0.05}, {"steps": 3, "lr": 1e-9})
    # assert
    assert not _same(tiny, large)  # the recipe-level lr reached the QAT run
    assert _same(tiny, overridden)  # the pass-level lr beat the recipe-level one


def test_the_recipes_budget_applies_when_the_pass_sets_none(tmp_path: Path) -> None:
    result = effopt.compile(_recipe(tmp_path, {"steps": 3}, {}), emit=False)
    assert result.report.passes[-1].result.stats["qat_steps"] == 3  # not QAT's default of 3 epochs (9 steps)


def test_two_qat_compiles_write_byte_identical_reports(tmp_path: Path) -> None:
    # setup
    recipe = _recipe(tmp_path, {"lr": 1e-3}, {"steps": 3})
    # execute
    first = effopt.compile(recipe, output_dir=tmp_path / "a")
    effopt.compile(recipe, output_dir=tmp_path / "b")
    # assert
    assert first.report.passes[-1].result.stats["qat_steps"] == 3  # precondition: a QAT run is in the report
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    assert not any("seconds" in k for k in first.report.passes[-1].result.stats)


# --- the merge, field by field -----------------------------------------------------------------


def _qat(options: dict) -> QatOptions:
    """QAT options the way a recipe builds them: validated from a plain dict."""
    spec = {"version": 1, "model": {"factory": "tests.models:mlp"}, "inputs": [{"name": "x", "shape": [1, 64]}],
            "passes": [{"name": "quantize", "qat": options}]}
    return parse_recipe(spec).passes[0].options.qat  # type: ignore[attr-defined, return-value]


def _block(options: dict) -> FineTuneConfig:
    spec = {"version": 1, "model": {"factory": "tests.models:mlp"}, "inputs": [{"name": "x", "shape": [1, 64]}],
            "finetune": options}
    return parse_recipe(spec).recipe.finetune


@pytest.mark.parametrize(
    ("block", "qat", "expected"),
    [
        ({}, {}, {"lr": 1e-4, "epochs": DEFAULT_EPOCHS, "steps": None, "freeze_batchnorm": True}),  # QAT's defaults
        ({"lr": 0.5}, {}, {"lr": 0.5, "epochs": DEFAULT_EPOCHS}),                                 # block over defaults
        ({"lr": 0.5}, {"lr": 1e-5}, {"lr": 1e-5}),                                                # pass over block
        ({"optimizer": "sgd", "lr": 0.5}, {"lr": 1e-5}, {"optimizer": "sgd", "lr": 1e-5}),        # field by field
        ({"steps": 100}, {}, {"steps": 100, "epochs": None}),                                     # block's budget
        ({"steps": 100}, {"epochs": 2}, {"steps": None, "epochs": 2}),                            # one budget
        ({"epochs": 5}, {"steps": 7}, {"steps": 7, "epochs": None}),
        ({"freeze_batchnorm": False}, {}, {"freeze_batchnorm": False}),
    ],
)
def test_with_defaults_takes_each_field_from_the_pass_then_the_block_then_the_pass_default(
    block: dict, qat: dict, expected: dict
) -> None:
    merged = with_defaults(_qat(qat), _block(block))
    assert type(merged) is FineTuneConfig  # learnable_scales and other pass extras are dropped
    assert {k: getattr(merged, k) for k in expected} == expected


def test_no_block_leaves_the_pass_config_as_it_is() -> None:
    qat = _qat({"lr": 3e-4, "steps": 12, "patience": 2})
    assert with_defaults(qat, None) == with_defaults(qat, FineTuneConfig()) == FineTuneConfig(
        **qat.model_dump(exclude={"learnable_scales"})
    )


def test_the_default_budget_does_not_count_as_set() -> None:
    assert FineTuneConfig().epochs == DEFAULT_EPOCHS
    assert "epochs" not in FineTuneConfig().model_fields_set
    assert "epochs" not in _qat({"lr": 1e-3}).model_fields_set
    with pytest.raises(RecipeError, match="either epochs .* or steps"):
        _block({"epochs": 2, "steps": 3})
