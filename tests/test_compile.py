"""End-to-end tests of the Python API, `effopt.compile(recipe, output_dir=..., emit=...)`.

One resnet-style recipe is compiled twice per module (to two folders) and shared by the
tests that only read the artefacts: ~2 s per compile. Other tests compile their own recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import effopt
from effopt.errors import EmitError
from effopt.hardware_profiles.host import host_arch
from effopt.optimizer import artefacts

REPO_ROOT = Path(__file__).resolve().parents[1]
# the marker: see test_output_dir.py; measurements.json: the deploy timings, where x86-avx2 is this host's arch
ARTEFACTS = [".effopt-output"] + ["measurements.json"] * (host_arch() == "x86_64") + [
    "model.onnx", "model.pt2", "report.json", "report.md"]
RTOL, ATOL = 1e-4, 1e-5

RESNET_RECIPE = """\
version: 1
model: {{factory: "tests.models:resnet_style", pythonpath: ["{repo}"]}}
inputs: [{{name: x, shape: [1, 3, 16, 16]}}]
passes: [fold_batchnorm, eliminate_dead_code]
output: {{formats: [pt2, onnx]}}
"""


def write_resnet_recipe(folder: Path) -> Path:
    path = folder / "resnet.yaml"
    path.write_text(RESNET_RECIPE.format(repo=REPO_ROOT))
    return path


def leftovers(folder: Path) -> list[str]:
    """Temp or backup folders that `atomic_dir` must never leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@dataclass(frozen=True)
class Compiled:
    result: effopt.Result
    root: Path
    out: Path
    out_again: Path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    root = tmp_path_factory.mktemp("resnet")
    recipe = write_resnet_recipe(root)
    result = effopt.compile(recipe, output_dir=root / "out")
    effopt.compile(recipe, output_dir=root / "again")
    return Compiled(result, root, root / "out", root / "again")


def x_batch(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- artefacts and report ---------------------------------------------------------------------


def test_compile_passes_and_writes_every_artefact(compiled: Compiled) -> None:
    assert compiled.result.passed
    assert compiled.result.output_dir == compiled.out
    assert sorted(p.name for p in compiled.out.iterdir()) == ARTEFACTS
    assert all((compiled.out / name).stat().st_size > 0 for name in ARTEFACTS)
    assert leftovers(compiled.root) == []


def test_report_has_totals_before_after_and_per_pass_deltas(compiled: Compiled) -> None:
    report = json.loads((compiled.out / "report.json").read_text())

    assert report["status"] == "passed" and report["model"] == "ResNetStyle"
    before, after = report["totals"]["before"], report["totals"]["after"]
    assert after["flops"] < before["flops"]
    assert after["nodes"] == before["nodes"] - 6  # resnet_style has 6 BatchNorms, all foldable
    fold, dce = report["passes"]
    assert fold["name"] == "fold_batchnorm" and len(fold["changed"]) == 6 and fold["skipped"] == []
    assert fold["delta"]["flops"] < 0 and fold["delta"]["nodes"] == -6
    for key in ("params", "flops", "nodes"):  # the deltas add up to the totals' change
        assert fold["delta"][key] + dce["delta"][key] == after[key] - before[key], key
    assert 0 < fold["max_abs_err_vs_original"] < ATOL
    assert report["verification"]["passed"] and report["verification"]["failures"] == []
    assert [(a["file"], a["passed"]) for a in report["artefacts"]] == [("model.pt2", True), ("model.onnx", True)]


def test_report_records_the_onnx_hash_and_no_absolute_paths(compiled: Compiled) -> None:
    report_json = (compiled.out / "report.json").read_text()
    onnx_entry = next(a for a in json.loads(report_json)["artefacts"] if a["file"] == "model.onnx")

    assert onnx_entry["sha256"] == hashlib.sha256((compiled.out / "model.onnx").read_bytes()).hexdigest()
    for text in (report_json, (compiled.out / "report.md").read_text()):
        assert str(compiled.root) not in text and str(REPO_ROOT) not in text


def test_two_compiles_give_byte_identical_onnx_and_reports(compiled: Compiled) -> None:
    for name in ("model.onnx", "report.json", "report.md"):
        first, second = (compiled.out / name).read_bytes(), (compiled.out_again / name).read_bytes()
        assert first == second, f"{name} differs between two compiles of the same recipe"


# --- the artefacts run on their own -----------------------------------------------------------

LOAD_PT2 = """\
import importlib.abc, sys

BLOCKED = {"effopt", "tests", "examples"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is the user's/effopt's code; model.pt2 must not need it")
        return None

sys.meta_path.insert(0, Block())
import torch

program = torch.export.load(sys.argv[1])
y = program.module()(torch.load(sys.argv[2], weights_only=True))
torch.save(y, sys.argv[3])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
"""


def test_pt2_loads_and_runs_without_the_users_code(compiled: Compiled, tmp_path: Path) -> None:
    x = x_batch(3)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "load_pt2.py").write_text(LOAD_PT2)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}

    proc = subprocess.run(
        [sys.executable, "-I", "load_pt2.py", str(compiled.out / "model.pt2"), "x.pt", "y.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        expected = compiled.result.model(x)
    assert y.shape == (3, 10)
    torch.testing.assert_close(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_torch_in_onnxruntime_at_any_batch(compiled: Compiled, batch: int) -> None:
    session = ort.InferenceSession(str(compiled.out / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "x" and isinstance(graph_input.shape[0], str)  # a symbolic batch dim
    x = x_batch(batch, seed=batch)

    (got,) = session.run(None, {"x": x.numpy()})

    with torch.no_grad():
        optimized, original = compiled.result.model(x), compiled.result.original(x)
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, optimized.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, original.numpy(), rtol=RTOL, atol=ATOL)


# --- atomic output, emit=False ----------------------------------------------------------------


def test_failed_emission_leaves_the_existing_output_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_resnet_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous artefact")
    (out / "notes.txt").write_text("keep me")
    seen_in_tmp: list[list[str]] = []

    def failing_export(module, example_inputs, input_names, dynamic_batch, path):  # noqa: ANN001, ANN202
        seen_in_tmp.append(sorted(p.name for p in Path(path).parent.iterdir()))
        raise EmitError("simulated ONNX export failure")

    monkeypatch.setattr(artefacts, "export_onnx", failing_export)

    with pytest.raises(EmitError, match="simulated"):
        effopt.compile(recipe, output_dir=out, force=True)  # force: notes.txt is the user's, not effopt's

    assert seen_in_tmp == [["model.pt2"]]  # precondition: a half-written folder really existed
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt"]
    assert (out / "model.onnx").read_bytes() == b"previous artefact"
    assert (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_emit_false_writes_nothing(tmp_path: Path) -> None:
    recipe = write_resnet_recipe(tmp_path)

    result = effopt.compile(recipe, output_dir=tmp_path / "out", emit=False)

    assert result.passed and result.output_dir is None
    assert result.report.artefacts == ()
    assert result.report.after.flops < result.report.before.flops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.yaml"]


# --- the shipped digits recipe on a freshly trained checkpoint --------------------------------


def test_digits_recipe_compiles_with_a_trained_checkpoint(tmp_path: Path) -> None:
    from examples.digits import train

    model, accuracy = train(seed=0, epochs=3)
    assert accuracy > 0.8  # precondition: a trained model, so accuracy can reveal a bad fold
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    text = (REPO_ROOT / "recipes" / "digits.yaml").read_text()
    edits = [
        ("checkpoints/digits.pt", str(tmp_path / "digits.pt")),
        ("pythonpath: [..]", f'pythonpath: ["{REPO_ROOT}"]'),
        ("../out/digits", "out"),
    ]
    for old, new in edits:
        assert old in text, f"recipes/digits.yaml changed; update this test's edit of {old!r}"
        text = text.replace(old, new)
    (tmp_path / "digits.yaml").write_text(text)

    result = effopt.compile(tmp_path / "digits.yaml")

    assert result.passed, result.report.verification.failures()
    assert result.output_dir == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ARTEFACTS
    stages = {s.stage: s.evaluation for s in result.report.evaluations}
    assert list(stages) == ["original", "after fold_batchnorm", "after eliminate_dead_code"]
    before, after = stages["original"].classification, stages["after eliminate_dead_code"].classification
    assert before is not None and after is not None and before.samples == 450
    assert after.top1 == pytest.approx(before.top1, abs=1 / 450)
    assert before.top1 == pytest.approx(accuracy, abs=1e-9)
    assert result.report.task == "classification"
    fold = result.report.passes[0]
    assert fold.name == "fold_batchnorm" and len(fold.result.changed) == 4  # bn1..bn4
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in result.model.modules())


# --- recipes are independent of each other ----------------------------------------------------


def test_same_named_module_in_two_recipe_folders_is_not_shadowed(tmp_path: Path) -> None:
    """Bug: the first recipe's ``compile_user_net`` stays in sys.modules and is used for the second."""
    for folder, classes in (("a", 3), ("b", 5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "compile_user_net.py").write_text(textwrap.dedent(f"""\
            from torch import nn

            def build():
                return nn.Sequential(nn.Linear(4, {classes})).eval()
            """))
        (tmp_path / folder / "r.yaml").write_text(
            'version: 1\nmodel: {factory: "compile_user_net:build"}\ninputs: [{name: x, shape: [1, 4]}]\n'
        )
    try:
        first = effopt.compile(tmp_path / "a" / "r.yaml", emit=False)
        second = effopt.compile(tmp_path / "b" / "r.yaml", emit=False)
    finally:
        sys.modules.pop("compile_user_net", None)

    x = torch.zeros(1, 4)
    assert first.model(x).shape == (1, 3)
    assert second.model(x).shape == (1, 5)


@pytest.mark.parametrize("batch", [1, 3])
def test_an_exported_program_with_a_fixed_batch_is_a_recipe_error_naming_the_fix(tmp_path: Path, batch: int) -> None:
    """Without this check the program's own guard fails deep inside calibration (exit 3, a traceback)."""
    from effopt.errors import RecipeError
    from tests.models import resnet_style

    program = torch.export.export(resnet_style().eval(), (torch.randn(batch, 3, 16, 16),))  # no dynamic_shapes
    torch.export.save(program, str(tmp_path / "fixed.pt2"))
    recipe = {"version": 1, "model": {"exported": str(tmp_path / "fixed.pt2")},
              "inputs": [{"name": "x", "shape": [1, 3, 16, 16]}], "passes": [], "output": {"formats": []}}
    with pytest.raises(RecipeError, match=f"fixed batch of {batch} for input 'x'.*Dim.AUTO.*dynamic_batch: false"):
        effopt.compile(recipe, output_dir=tmp_path / "out")
    fixed = recipe | {"inputs": [{"name": "x", "shape": [batch + 1, 3, 16, 16], "dynamic_batch": False}]}
    with pytest.raises(RecipeError, match=f"inputs\\[0\\].shape: .*batch of exactly {batch}.*shape\\[0\\]: {batch}"):
        effopt.compile(fixed, output_dir=tmp_path / "out")
    ok = recipe | {"inputs": [{"name": "x", "shape": [batch, 3, 16, 16], "dynamic_batch": False}]}
    assert effopt.compile(ok, output_dir=tmp_path / "out", emit=False).report.verification is not None
