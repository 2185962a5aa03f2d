"""`effopt evaluate` scores ``model_aoti.pt2`` (``formats: [aoti]``) like the other artefacts.

The fast test stands a recording loader in for AOTInductor (a copy of ``model.pt2`` under the
package's name), so the wiring is checked in seconds: the package gets its own row, scored on
the same data with the same metrics, fed contiguous inputs. The slow ones compile the digits
net for real (~25 s on 2 shared cores) and check the row through the CLI, and that a strided
input, which the bare package computes wrongly (torch 2.13 reads the export's strides), is
copied to the contiguous layout first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import effopt
from effopt.cli import main
from effopt.optimizer.compiler import evaluate_artefacts
from effopt.optimizer.emit.aoti import AOTI_FILE, cpp_compiler_problem, load_aoti
from effopt.optimizer.measure import evaluate as evaluate_module
from effopt.optimizer.measure.evaluate import aoti_callable

ROOT = Path(__file__).resolve().parents[1]
NO_COMPILER = cpp_compiler_problem()
AOTI_ROW = f"{AOTI_FILE} (AOTInductor)"


def digits_recipe(checkpoint: Path, formats: list[str]) -> dict:
    """recipes/digits.yaml with absolute paths, for a tmp output folder."""
    return {
        "version": 1,
        "model": {"factory": "examples.digits:DigitsNet", "kwargs": {"num_classes": 10},
                  "weights": str(checkpoint), "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "range": [0, 1]}],
        "target": "x86-avx2",
        "passes": ["fold_batchnorm", "eliminate_dead_code"],
        "data": {"eval": {"source": "sklearn-digits:test", "batch_size": 128}},
        "output": {"formats": formats},
    }


@dataclass
class RecordingLoader:
    """Stands in for `load_aoti`: runs ``model.pt2`` and records each input's strides."""

    strides: list[tuple[int, ...]]

    def __call__(self, path: Path):
        program = torch.export.load(str(path)).module()

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            self.strides += [t.stride() for t in inputs]
            return program(*inputs)

        return run


def test_evaluate_scores_the_aoti_package_like_the_other_artefacts(
    tmp_path: Path, digits_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # setup: model.pt2 copied under the package's name, loaded by a recorder
    recipe = digits_recipe(digits_checkpoint, ["pt2"])
    out = tmp_path / "out"
    effopt.compile(recipe, output_dir=out)
    assert [s.stage for s in evaluate_artefacts(recipe, out)] == ["original (eager PyTorch)", "model.pt2 (torch.export)"]
    shutil.copy(out / "model.pt2", out / AOTI_FILE)
    loader = RecordingLoader([])
    monkeypatch.setattr(evaluate_module, "load_aoti", loader)
    # execute
    stages = evaluate_artefacts(recipe, out)
    # assert: its own row, after model.pt2, with the same metrics (it is the same program)
    names = [s.stage for s in stages]
    assert names == ["original (eager PyTorch)", "model.pt2 (torch.export)", AOTI_ROW]
    pt2, aoti = stages[1].evaluation, stages[2].evaluation
    assert aoti.classification == pt2.classification and aoti.agreement == pt2.agreement
    assert aoti.dataset == "sklearn-digits:test" and aoti.classification is not None
    assert aoti.classification.samples == 450
    assert loader.strides and all(s == (64, 64, 8, 1) for s in loader.strides)  # contiguous NCHW


def test_aoti_callable_refuses_a_missing_package(tmp_path: Path) -> None:
    with pytest.raises(effopt.EffoptError, match="model_aoti.pt2: AOTInductor package not found"):
        aoti_callable(tmp_path / AOTI_FILE)


@pytest.fixture(scope="module")
def compiled_aoti(tmp_path_factory: pytest.TempPathFactory, digits_checkpoint: Path) -> tuple[dict, Path]:
    if NO_COMPILER is not None:
        pytest.skip(NO_COMPILER)
    recipe = digits_recipe(digits_checkpoint, ["pt2", "aoti"])
    out = tmp_path_factory.mktemp("aoti") / "out"
    effopt.compile(recipe, output_dir=out)
    assert (out / AOTI_FILE).is_file()  # precondition: x86-avx2 is this host's arch
    return recipe, out


@pytest.mark.slow
def test_effopt_evaluate_prints_a_row_for_the_compiled_package(compiled_aoti: tuple[dict, Path]) -> None:
    # setup
    recipe, out = compiled_aoti
    recipe_file = out.parent / "digits_aoti.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    # execute
    result = CliRunner().invoke(main, ["evaluate", str(recipe_file), "--artifact", str(out)])
    # assert
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.output.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert list(rows) == ["original (eager PyTorch)", "model.pt2 (torch.export)", AOTI_ROW]
    top1 = {name: float(cells[0]) for name, cells in rows.items()}
    assert top1[AOTI_ROW] == top1["model.pt2 (torch.export)"] > 0.9  # 11% if the layout were wrong
    assert float(rows[AOTI_ROW][-1]) > 0.9999  # cosine vs original


@pytest.mark.slow
def test_aoti_callable_copies_a_strided_input_to_the_exported_layout(compiled_aoti: tuple[dict, Path]) -> None:
    # setup: NHWC images permuted to NCHW, strides (64, 1, 8, 1): "contiguous" for one channel
    _, out = compiled_aoti
    images = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert x.stride() == (64, 1, 8, 1) and x.is_contiguous()
    with torch.no_grad():
        expected = torch.export.load(str(out / "model.pt2")).module()(x)
        bare = load_aoti(out / AOTI_FILE)(x)
        assert not torch.allclose(bare, expected, atol=1e-3)  # precondition: the bare package misreads it
        # execute
        got = aoti_callable(out / AOTI_FILE)(x)
    # assert
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
