"""Every bad input is exit 2 with a message that names the file or field; only effopt's own bugs are exit 3.

The exit-code tests run the real ``effopt`` command in a subprocess (the code a shell
sees, and no traceback on stderr); the rest check the library's error types in-process.
Each case writes a tiny model module and recipe into ``tmp_path``; module names are
unique per test because Python caches imported modules by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import effopt
from effopt.errors import DataError, EffoptError, LoweringError, RecipeError

EFFOPT_SCRIPT = Path(sys.executable).with_name("effopt")

NET = """\
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(x)

def build(classes=3):
    return Net(classes)
"""


# A pickled object in a data file (loading it would import and run its class's code). A class from the
# standard library, not one defined here: under pytest's importlib mode this test module may be imported
# twice, and pickle refuses a class that is not the one its module path names.
from fractions import Fraction as Sample  # noqa: E402


def line_of(code: str, text: str) -> int:
    """The 1-based line of ``code`` that contains ``text`` (where the user's error is raised)."""
    return next(i for i, line in enumerate(code.splitlines(), 1) if text in line)


def effopt_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``effopt`` script (or ``python -m effopt.cli``) in a fresh process."""
    cmd = [str(EFFOPT_SCRIPT)] if EFFOPT_SCRIPT.is_file() else [sys.executable, "-m", "effopt.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_exit_2(run: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, one ``effopt: error:`` line naming ``words``, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("effopt: error: "), run.stderr
    for word in words:
        assert word in run.stderr, f"{word!r} missing from: {run.stderr}"
    return run.stderr


def project(tmp_path: Path, module: str, code: str, model: str = "", extra: str = "") -> Path:
    """``<module>.py`` holding ``code`` and ``recipe.yaml`` for ``<module>:build`` with input x: [2, 4]."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\n"
        f"model: {{factory: '{module}:build'{model}}}\n"
        "inputs: [{name: x, shape: [2, 4]}]\n"
        "passes: [eliminate_dead_code]\n"
        "output: {formats: []}\n" + textwrap.dedent(extra)
    )
    return recipe


# --- item 5: failures in the user's model code and files --------------------------------------------------------


def test_a_factory_module_that_raises_on_import_is_exit_2_naming_module_error_and_line(tmp_path: Path) -> None:
    code = NET + "\nCONFIG = {'width': 4}['depth']\n"
    recipe = project(tmp_path, "raises_on_import", code)
    run = effopt_cli("inspect", recipe, cwd=tmp_path)
    assert_exit_2(run, "recipe.yaml: model.factory", "importing module 'raises_on_import' raised KeyError: 'depth'",
                  f"raises_on_import.py:{line_of(code, 'CONFIG')}", "`import raises_on_import` succeeds")


def test_a_factory_module_with_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    code = NET + "\ndef broken(:\n    pass\n"
    recipe = project(tmp_path, "syntax_error_net", code)
    run = effopt_cli("inspect", recipe, cwd=tmp_path)
    assert_exit_2(run, "model.factory", "SyntaxError", f"syntax_error_net.py:{line_of(code, 'def broken')}")


def test_a_factory_that_raises_when_called_is_exit_2_naming_factory_and_kwargs(tmp_path: Path) -> None:
    code = NET + "\ndef build(classes=3):\n    raise ValueError(f'classes must be even, got {classes}')\n"
    recipe = project(tmp_path, "raises_when_called", code, ", kwargs: {classes: 3}")
    run = effopt_cli("inspect", recipe, cwd=tmp_path)
    assert_exit_2(run, "model.factory", "'raises_when_called:build' with model.kwargs {'classes': 3}",
                  "ValueError: classes must be even, got 3",
                  f"raises_when_called.py:{line_of(code, 'raise ValueError')}")


def test_kwargs_the_factory_cannot_take_name_its_parameters(tmp_path: Path) -> None:
    recipe = project(tmp_path, "wrong_kwargs_net", NET, ", kwargs: {clases: 3}")
    pattern = r"model.kwargs: 'wrong_kwargs_net:build' cannot be called with .*clases.*it takes classes"
    with pytest.raises(RecipeError, match=pattern):
        effopt.prepare(recipe)


def test_weights_with_the_right_names_but_wrong_shapes_list_every_mismatch(tmp_path: Path) -> None:
    five = {f"fc.{k}": v for k, v in nn.Linear(4, 5).state_dict().items()}  # the model has 3 classes
    torch.save(five, tmp_path / "five_classes.pt")
    recipe = project(tmp_path, "shape_mismatch_net", NET, ", weights: five_classes.pt")
    run = effopt_cli("inspect", recipe, cwd=tmp_path)
    assert_exit_2(run, "model.weights: five_classes.pt", "2 tensor(s) of the wrong shape",
                  "fc.weight: file [5, 4], model [3, 4]", "fc.bias: file [5], model [3]", "model.kwargs")


def test_a_plain_text_weights_file_says_what_the_file_is(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    recipe = project(tmp_path, "text_weights_net", NET, ", weights: weights.pt")
    run = effopt_cli("inspect", recipe, cwd=tmp_path)
    stderr = assert_exit_2(run, "model.weights: weights.pt is not a torch.save file: it is a text file",
                           "version https://git-lfs", "torch.save(model.state_dict(), path)")
    assert "pop from empty list" not in stderr


def test_a_whole_pickled_module_as_weights_is_refused_saying_why(tmp_path: Path) -> None:
    torch.save(nn.Linear(4, 3), tmp_path / "whole_model.pt")
    recipe = project(tmp_path, "pickled_module_net", NET, ", weights: whole_model.pt")
    with pytest.raises(RecipeError) as e:
        effopt.prepare(recipe)
    for words in ("refused by torch.load(weights_only=True)", "torch.nn.modules.linear.Linear", "would run that code",
                  "torch.save(model.state_dict(), path)"):
        assert words in str(e.value)


def data_project(tmp_path: Path, module: str, source: str) -> Path:
    return project(tmp_path, module, NET, extra=f"data: {{eval: {{source: {source}}}}}\n")


def test_a_data_pt_refused_by_weights_only_says_it_was_refused_and_why(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(8, 4), "meta": Sample(1, 3)}, tmp_path / "data.pt")
    recipe = data_project(tmp_path, "refused_data_net", "data.pt")
    run = effopt_cli("compile", recipe, "-o", tmp_path / "out", cwd=tmp_path)
    assert_exit_2(run, "data.eval (data.pt)", "refused by torch.load(weights_only=True)", "Fraction",
                  "never runs code", "np.savez(path, x=x, y=labels)")


@pytest.mark.parametrize(
    ("file", "content", "words"),
    [
        ("data.pt", b"x,y\n0.1,0.2\n", ("data.pt is not a torch.save file: it is a text file", "'x,y'")),
        ("data.npz", b"x,y\n0.1,0.2\n", ("data.npz is not a NumPy .npz archive: it is a text file",)),
        ("data.npz", None, ("data.npz is not a NumPy .npz archive: it is a single NumPy array",)),
        ("data.pt", b"", ("data.pt is not a torch.save file: it is an empty file",)),
    ],
    ids=["text-as-pt", "text-as-npz", "npy-as-npz", "empty-pt"],
)
def test_a_data_file_that_is_not_a_torch_or_numpy_file_says_what_it_is(
    tmp_path: Path, file: str, content: bytes | None, words: tuple[str, ...]
) -> None:
    if content is None:
        with open(tmp_path / file, "wb") as f:
            np.save(f, np.zeros((8, 4), np.float32))
    else:
        (tmp_path / file).write_bytes(content)
    recipe = data_project(tmp_path, f"not_data_{file.replace('.', '_')}_{len(content or b'1')}", file)
    run = effopt_cli("compile", recipe, "-o", tmp_path / "out", cwd=tmp_path)
    assert_exit_2(run, f"data.eval ({file})", *words)


def test_an_npz_with_object_arrays_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 8, dtype=object))
    recipe = data_project(tmp_path, "object_npz_net", "objects.npz")
    with pytest.raises(DataError, match=r"array 'x' holds Python objects \(dtype=object\).*never runs code"):
        effopt.compile(recipe, emit=False)


# --- item 6: NaN and Inf in data --------------------------------------------------------------------------------


def test_nan_in_data_is_exit_2_naming_the_source_and_first_sample(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    x[7, 2], x[12, 0] = np.nan, np.inf
    np.savez(tmp_path / "with_nan.npz", x=x, y=np.zeros(20, np.int64))
    recipe = data_project(tmp_path, "nan_data_net", "with_nan.npz")
    run = effopt_cli("compile", recipe, "-o", tmp_path / "out", cwd=tmp_path)
    assert_exit_2(run, "data.eval (with_nan.npz)", "sample 7 has NaN or Inf in 'x'", "2 of 20 samples")
    assert not (tmp_path / "out" / "report.json").exists()


def test_nan_in_a_callable_source_under_subset_names_the_sources_own_index(tmp_path: Path) -> None:
    code = NET + textwrap.dedent("""
        from torch.utils.data import Dataset

        class Rows(Dataset):
            def __len__(self):
                return 30

            def __getitem__(self, i):
                x = torch.full((4,), float(i))
                return (x * float("nan") if i % 4 == 0 and i > 0 else x,)

        def rows():
            return Rows()
        """)
    recipe = project(tmp_path, "nan_callable_net", code,
                     extra="data: {eval: {source: 'nan_callable_net:rows', subset: 10, seed: 2}}\n")
    kept = sorted(torch.randperm(30, generator=torch.Generator().manual_seed(2))[:10].tolist())
    bad = [i for i in kept if i % 4 == 0 and i > 0]
    assert bad and bad[0] != kept.index(bad[0])  # precondition: a NaN row whose subset position differs from its index
    with pytest.raises(DataError, match=rf"sample {bad[0]} has NaN or Inf in 'x' \({len(bad)} of 10 samples"):
        effopt.compile(recipe, emit=False)


def test_finite_data_still_compiles(tmp_path: Path) -> None:
    np.savez(tmp_path / "finite.npz", x=np.random.default_rng(0).random((20, 4), dtype=np.float32))
    recipe = data_project(tmp_path, "finite_data_net", "finite.npz")
    assert effopt.compile(recipe, emit=False).passed


# --- item 7: bad input vs effopt's own bugs ----------------------------------------------------------------------

CRASHING_PASS = """\
import sys
from effopt.cli import main
from effopt.passes.eliminate_dead_code import EliminateDeadCode

def run(self, ir, ctx):
    return {}["conv1"]  # a bug inside a pass

EliminateDeadCode.run = run
sys.exit(main())
"""


def test_a_bug_inside_a_pass_is_exit_3_with_the_traceback_and_the_pass_named(tmp_path: Path) -> None:
    recipe = project(tmp_path, "bug_in_pass_net", NET)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", CRASHING_PASS, "compile", str(recipe), "-o", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, (run.returncode, run.stderr[-3000:])
    assert "Traceback" in run.stderr and "KeyError: 'conv1'" in run.stderr
    assert "pass 'eliminate_dead_code' crashed" in run.stderr
    assert "effopt: error:" not in run.stderr  # not reported as bad input


def test_compile_of_something_that_is_no_recipe_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="recipe: got int 42; pass a recipe file path, a dict"):
        effopt.compile(42)  # type: ignore[arg-type]


def test_lowering_failures_have_their_own_class_exported_at_the_top() -> None:
    from effopt.optimizer.ir.trace import trace_module
    from effopt.optimizer.lower.integer.lowering import lower_to_integer

    assert effopt.LoweringError is LoweringError and issubclass(LoweringError, EffoptError)
    float_model = nn.Sequential(nn.Linear(4, 3)).eval()  # no FakeQuant anywhere: nothing is integer
    with pytest.raises(LoweringError, match="cannot lower to an int-only program: 1 node"):
        lower_to_integer(trace_module(float_model), (torch.randn(2, 4),))


def test_a_lowering_failure_is_a_missed_goal_not_an_aborted_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from effopt.hardware_profiles import load_profile
    from effopt.optimizer import artefacts
    from effopt.optimizer.ir.analysis import annotate
    from effopt.optimizer.ir.core import IR, InputSpec
    from effopt.optimizer.ir.trace import trace_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise LoweringError("node 'gelu' (gelu) has no integer implementation on an int-only target")

    monkeypatch.setattr(artefacts, "lower_to_integer", refuse)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    ir = annotate(IR(trace_module(model), (InputSpec("x", (2, 4)),), (torch.randn(2, 4),)))
    lowering = artefacts.lower_for_integer_target(ir, load_profile("cortex-m7"), model, None, None, 0)
    assert lowering.program is None and not lowering.goal.passed
    assert "node 'gelu'" in lowering.goal.detail
