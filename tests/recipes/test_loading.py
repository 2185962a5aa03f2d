"""Tests for effopt.recipes.loading: valid recipes load; every bad one says file:line: field.path: what.

Every bad-recipe case edits one line of `BASE`, whose layout (line numbers on the left) the
expected lines refer to::

     1 version: 1
     2 model:
     3   factory: tests.models:resnet_style
     4   kwargs: {num_classes: 10}
     5 inputs:
     6   - {name: x, shape: [1, 3, 16, 16], dtype: float32}
     7 passes:
     8   - fold_batchnorm
     9   - {name: eliminate_dead_code}
    10 verify: {rtol: 1.0e-4, atol: 1.0e-5}
    11 output: {formats: [pt2, onnx]}

Loading never imports the model, so no case needs `tests.models` on the path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from effopt.errors import RecipeError
from effopt.passes.eliminate_dead_code import EliminateDeadCode
from effopt.passes.fold_batchnorm import FoldBatchNorm
from effopt.recipes.loading import format_loc, load_recipe, parse_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]

BASE = """\
version: 1
model:
  factory: tests.models:resnet_style
  kwargs: {num_classes: 10}
inputs:
  - {name: x, shape: [1, 3, 16, 16], dtype: float32}
passes:
  - fold_batchnorm
  - {name: eliminate_dead_code}
verify: {rtol: 1.0e-4, atol: 1.0e-5}
output: {formats: [pt2, onnx]}
"""

INPUT_LINE = "  - {name: x, shape: [1, 3, 16, 16], dtype: float32}"


def edit(old: str, new: str) -> Callable[[str], str]:
    """A text edit of BASE that fails loudly if ``old`` is not there (so no case is a no-op)."""

    def apply(text: str) -> str:
        assert text.count(old) == 1, f"test bug: {old!r} not found exactly once in BASE"
        return text.replace(old, new)

    return apply


def append(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


# --- valid recipes ----------------------------------------------------------------------------


def test_base_recipe_loads_with_bare_and_mapping_pass_forms(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, BASE, "good.yaml"))

    r = loaded.recipe
    assert r.version == 1
    assert r.model.factory == "tests.models:resnet_style"
    assert r.model.kwargs == {"num_classes": 10}
    assert [(i.name, i.shape, i.dtype) for i in r.inputs] == [("x", (1, 3, 16, 16), "float32")]
    assert [p.name for p in r.passes] == ["fold_batchnorm", "eliminate_dead_code"]
    assert [type(p) for p in loaded.passes] == [FoldBatchNorm, EliminateDeadCode]
    assert r.verify.rtol == 1e-4 and r.verify.atol == 1e-5
    assert r.output.formats == ("pt2", "onnx")
    assert loaded.label == "good.yaml"
    assert loaded.path == (tmp_path / "good.yaml").resolve()


def test_explicit_options_mapping_and_defaults(tmp_path: Path) -> None:
    text = """\
version: 1
model: {factory: pkg.mod:build}
inputs: [{name: tokens, shape: [2, 16], dtype: int64, range: [0, 100], dynamic_batch: false}]
passes:
  - name: fold_batchnorm
    options: {}
"""
    loaded = load_recipe(write(tmp_path, text, "opts.yaml"))

    r = loaded.recipe
    assert [type(p) for p in loaded.passes] == [FoldBatchNorm]
    assert r.inputs[0].range == (0.0, 100.0) and r.inputs[0].dynamic_batch is False
    assert r.target == "x86-avx2" and r.seed == 0
    assert r.output.formats == ("pt2", "onnx") and r.output.dir == "out"


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    loaded = load_recipe(write(sub, BASE, "r.yaml"))

    assert loaded.resolve("ckpt/w.pt") == sub.resolve() / "ckpt" / "w.pt"
    assert loaded.resolve("/abs/w.pt") == Path("/abs/w.pt")


def test_shipped_digits_recipe_loads() -> None:
    loaded = load_recipe(REPO_ROOT / "recipes" / "digits.yaml")

    assert loaded.recipe.model.factory == "examples.digits:DigitsNet"
    assert [p.name for p in loaded.passes] == ["fold_batchnorm", "eliminate_dead_code"]


def test_parse_recipe_from_dict_labels_errors_as_recipe() -> None:
    ok = parse_recipe({"version": 1, "model": {"factory": "a:b"}, "inputs": [{"name": "x", "shape": [1, 4]}]})
    assert ok.label == "<recipe>" and ok.passes == ()

    with pytest.raises(RecipeError, match=r"^<recipe>: inputs\[0\]\.shape: every dimension"):
        parse_recipe({"version": 1, "model": {"factory": "a:b"}, "inputs": [{"name": "x", "shape": [1, 0]}]})


# --- bad recipes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad edit of BASE and what its message must say: ``bad.yaml:<line>: <field>...<words>``."""

    edit: Callable[[str], str]
    line: int
    field: str
    words: tuple[str, ...] = ()


BAD: dict[str, Bad] = {
    "unknown_top_level_key": Bad(append("optimise: true\n"), 12, "optimise", ("unknown field",)),
    "typo_in_model_weights": Bad(
        edit("  kwargs:", "  weigths: w.pt\n  kwargs:"), 4, "model.weigths", ("unknown field", "spelling")
    ),
    "wrong_version": Bad(edit("version: 1", "version: 2"), 1, "version", ("should be 1", "got 2")),
    "missing_version": Bad(edit("version: 1\n", ""), 1, "version", ("required",)),
    "missing_inputs": Bad(edit("inputs:\n" + INPUT_LINE + "\n", ""), 1, "inputs", ("required",)),
    "empty_inputs": Bad(edit("inputs:\n" + INPUT_LINE + "\n", "inputs: []\n"), 5, "inputs", ("at least 1",)),
    "zero_dim": Bad(edit("[1, 3, 16, 16]", "[1, 0, 16, 16]"), 6, "inputs[0].shape", ("positive", "[1, 0, 16, 16]")),
    "negative_dim": Bad(edit("[1, 3, 16, 16]", "[1, 3, -16, 16]"), 6, "inputs[0].shape", ("positive", "-16")),
    "empty_shape": Bad(edit("[1, 3, 16, 16]", "[]"), 6, "inputs[0].shape", ("positive",)),
    "bad_dtype": Bad(edit("float32}", "float33}"), 6, "inputs[0].dtype", ("float33", "'float16'")),
    "bad_input_name": Bad(edit("name: x,", "name: 'x y',"), 6, "inputs[0].name", ("'x y'", "argument name")),
    "duplicate_input_names": Bad(
        edit(INPUT_LINE, INPUT_LINE + "\n  - {name: x, shape: [1, 4]}"), 5, "inputs", ("unique", "repeated: x")
    ),
    "factory_without_colon": Bad(
        edit("tests.models:resnet_style", "tests.models.resnet_style"), 3, "model.factory",
        ("tests.models.resnet_style", "module:callable"),
    ),
    "factory_and_exported": Bad(
        edit("  kwargs: {num_classes: 10}\n", "  exported: model.pt2\n"), 2, "model",
        ("exactly one", "factory", "exported"),
    ),
    "neither_factory_nor_exported": Bad(
        edit("  factory: tests.models:resnet_style\n", ""), 2, "model", ("exactly one", "factory", "exported")
    ),
    "unknown_pass": Bad(
        edit("  - fold_batchnorm", "  - fold_batchnrom"), 8, "passes[0]",
        ("unknown pass 'fold_batchnrom'", "valid passes", "fold_batchnorm", "eliminate_dead_code"),
    ),
    "unknown_pass_option_inline": Bad(
        edit("{name: eliminate_dead_code}", "{name: eliminate_dead_code, agressive: true}"), 9, "passes[1].agressive",
        ("unknown field", "eliminate_dead_code", "effopt passes"),
    ),
    "unknown_pass_option_in_options": Bad(
        edit("  - fold_batchnorm", "  - name: fold_batchnorm\n    options: {sparsity: 0.5}"), 9, "passes[0].sparsity",
        ("unknown field", "'fold_batchnorm'"),
    ),
    "negative_rtol": Bad(edit("rtol: 1.0e-4", "rtol: -1.0e-4"), 10, "verify.rtol", ("greater than or equal to 0",)),
    "unknown_output_format": Bad(
        edit("[pt2, onnx]", "[pt2, tflite]"), 11, "output.formats[1]", ("tflite", "'pt2'", "'onnx'")
    ),
    "unknown_verify_key": Bad(edit("atol: 1.0e-5}", "atol: 1.0e-5, samples: 4, tol: 1}"), 10, "verify.tol"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_recipe_names_file_line_and_field(tmp_path: Path, case: Bad) -> None:
    text = case.edit(BASE)
    assert text != BASE  # precondition: the case really changes the recipe

    msg = load_error(write(tmp_path, text))

    assert msg.startswith(f"bad.yaml:{case.line}: {case.field}"), msg
    for word in case.words:
        assert word in msg, f"{word!r} missing from: {msg}"
    assert "errors.pydantic.dev" not in msg and "Traceback" not in msg


def test_every_error_of_a_recipe_is_reported_on_its_own_line(tmp_path: Path) -> None:
    text = edit("version: 1", "version: 3")(edit("[1, 3, 16, 16]", "[1, 0]")(BASE))

    msg = load_error(write(tmp_path, text))

    lines = msg.splitlines()
    assert any(line.startswith("bad.yaml:1: version:") for line in lines), msg
    assert any(line.startswith("bad.yaml:6: inputs[0].shape:") for line in lines), msg


@pytest.mark.parametrize(
    "bad, line",
    [
        pytest.param(edit("16, 16], dtype: float32}", "16, 16], dtype: float32"), 7, id="unclosed_flow_mapping"),
        pytest.param(
            edit("verify: {rtol: 1.0e-4, atol: 1.0e-5}", "verify:\n  rtol: 1\n    atol: 2"), 12, id="bad_indent"
        ),
        pytest.param(edit("  - fold_batchnorm", "\t- fold_batchnorm"), 8, id="tab"),
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path: Path, bad: Callable[[str], str], line: int) -> None:
    msg = load_error(write(tmp_path, bad(BASE)))

    assert msg.startswith(f"bad.yaml:{line}: not valid YAML"), msg


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"], ids=["empty", "list", "scalar"])
def test_recipe_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    msg = load_error(write(tmp_path, text))

    assert msg.startswith("bad.yaml: a recipe is a YAML mapping"), msg


def test_missing_recipe_file_is_a_recipe_error(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "nope.yaml")

    assert "nope.yaml" in msg and "not found" in msg


# --- format_loc -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loc, expected",
    [
        ((), "<root>"),
        (("version",), "version"),
        (("model", "weigths"), "model.weigths"),
        (("inputs", 0, "shape"), "inputs[0].shape"),
        (("passes", 2, "options", "sparsity"), "passes[2].sparsity"),
        (("output", "formats", 1), "output.formats[1]"),
        (("inputs", 0, "function-after[_positive()]", "shape"), "inputs[0].shape"),
        ((0,), "[0]"),
    ],
)
def test_format_loc(loc: tuple[object, ...], expected: str) -> None:
    assert format_loc(loc) == expected
