"""The zoo of models as people write them (`tests/zoo_as_written.py`), compiled end to end.

Each model goes through a float recipe (fold_batchnorm + eliminate_dead_code) and an
int8 one (quantize static, calibrated on a small random ``.npz`` or a callable source);
the compile must pass and write its artefacts. `dim_check_net` is the one fx cannot
trace: it must compile through the torch.export fallback, and the report must say so,
while the others' reports carry no warning.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import effopt
from effopt.errors import TraceError
from tests.zoo_as_written import AS_WRITTEN, IMAGE, DimCheckNet

REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK = "dim_check_net"  # fx cannot trace it; torch.export can
_source, _first = inspect.getsourcelines(DimCheckNet.forward)
DIM_CHECK_LINE = _first + next(i for i, line in enumerate(_source) if "x.dim() == 3" in line)  # the `if` fx stops at


def recipe(name: str, passes: list, data: dict | None = None) -> dict:
    r = {
        "version": 1,
        "model": {"factory": f"tests.zoo_as_written:{name}", "pythonpath": [str(REPO_ROOT)]},
        "inputs": [{"name": "x", "shape": list(AS_WRITTEN[name][1])}],
        "passes": passes,
        "output": {"formats": ["pt2", "onnx"]},
    }
    return r | ({"data": data} if data else {})


def assert_compiled(result: effopt.Result, out: Path, name: str) -> dict:
    assert result.passed, result.report.failures()
    assert {"model.pt2", "model.onnx", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "passed"
    warnings = [w for w in report["warnings"] if not w.startswith("deploy: ")]  # int8 slower on this host: timed
    if name == FALLBACK:
        assert warnings == [
            "traced with torch.export because fx could not: torch.fx cannot trace the top-level module (DimCheckNet) "
            f"at zoo_as_written.py:{DIM_CHECK_LINE}: TraceError: symbolically traced variables cannot be used as "
            "inputs to control flow"
        ]
    else:
        assert warnings == []  # fx traced it: nothing new in the report
    return report


@pytest.mark.parametrize("name", list(AS_WRITTEN))
def test_float_compile_passes_and_writes_artefacts(name: str, tmp_path: Path) -> None:
    result = effopt.compile(recipe(name, ["fold_batchnorm", "eliminate_dead_code"]), output_dir=tmp_path / "out")
    report = assert_compiled(result, tmp_path / "out", name)
    # the graph takes exactly the declared input: flags were bound, not turned into inputs
    assert [n.name for n in result.ir.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    # every model holds a batch norm (a module, or F.batch_norm that the pass lifts) and it was folded
    assert report["passes"][0]["changed"] and report["totals"]["after"]["nodes"] < report["totals"]["before"]["nodes"]


@pytest.fixture(scope="module")
def calibration_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "images.npz"
    np.savez(path, x=np.random.default_rng(0).random((64, *IMAGE[1:]), dtype=np.float32))
    return path


@pytest.mark.parametrize("name", list(AS_WRITTEN))
def test_int8_compile_passes_and_writes_artefacts(name: str, tmp_path: Path, calibration_npz: Path) -> None:
    # half the models calibrate on an .npz, half on a callable source, so both paths are covered
    by_file = list(AS_WRITTEN).index(name) % 2 == 0
    source = str(calibration_npz) if by_file else "tests.zoo_as_written:calibration_images"
    passes = ["fold_batchnorm", "eliminate_dead_code", {"name": "quantize", "mode": "static"}]
    result = effopt.compile(recipe(name, passes, {"calibration": {"source": source, "batch_size": 16}}),
                            output_dir=tmp_path / "out")
    report = assert_compiled(result, tmp_path / "out", name)
    quantize = report["passes"][-1]
    assert quantize["name"] == "quantize" and quantize["changed"]  # precondition: it really quantized something


@pytest.mark.parametrize("name", list(AS_WRITTEN))
def test_pruned_compile_passes_and_really_shrinks(name: str, tmp_path: Path, calibration_npz: Path) -> None:
    passes = ["fold_batchnorm", {"name": "prune_channels", "ratio": 0.5, "round_to": 1, "protect": []}]
    result = effopt.compile(recipe(name, passes, {"calibration": {"source": str(calibration_npz), "batch_size": 16}}),
                            output_dir=tmp_path / "out")
    report = assert_compiled(result, tmp_path / "out", name)
    prune = report["passes"][-1]
    assert prune["name"] == "prune_channels"
    assert prune["stats"]["flops_after"] < 0.8 * prune["stats"]["flops_before"], prune["skipped"]
    assert report["totals"]["after"]["params"] < report["totals"]["before"]["params"]


def test_the_flag_still_works_on_the_original_model() -> None:
    builder, shape = AS_WRITTEN["flag_net"]
    model = builder()
    x = torch.randn(shape)
    assert model(x).shape == (2, 10) and model(x, embed=True).shape == (2, 16, 8, 8)  # the zoo is what it says


def test_a_model_neither_tracer_takes_names_both_reasons_and_a_fitting_fix(tmp_path: Path) -> None:
    (tmp_path / "as_written_data_dependent.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:  # data-dependent: neither fx nor torch.export can trace a Python if on values\n"
        "            return self.fc(x)\n"
        "        return -self.fc(x)\n"
    )
    data = {"version": 1, "model": {"factory": "as_written_data_dependent:Net", "pythonpath": [str(tmp_path)]},
            "inputs": [{"name": "x", "shape": [2, 4]}], "passes": ["eliminate_dead_code"]}
    with pytest.raises(TraceError) as e:
        effopt.prepare(data)
    msg = str(e.value)
    assert "torch.fx cannot trace the top-level module (Net) at" in msg and "as_written_data_dependent.py:10" in msg
    assert "torch.export, tried next, failed too" in msg
    assert "Fix: make the forward free of data-dependent Python control flow" in msg
    assert "torch.where or torch.cond works for both" in msg


def test_a_fixed_batch_forward_gets_the_dynamic_batch_hint(tmp_path: Path) -> None:
    class FixedBatch(nn.Module):  # fx: Proxy in an if; export: the batch is specialised to 2
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 2:
                return self.fc(x).reshape(2, 3)
            return self.fc(x)

    from effopt.optimizer.compiler import build_ir
    from effopt.recipes import parse_recipe

    loaded = parse_recipe({"version": 1, "model": {"factory": "m:f"}, "inputs": [{"name": "x", "shape": [2, 4]}]})
    with pytest.raises(TraceError, match="torch.export, tried next, failed too.*Fix: .*dynamic_batch: false"):
        build_ir(FixedBatch().eval(), loaded)
    fixed = parse_recipe({"version": 1, "model": {"factory": "m:f"},
                          "inputs": [{"name": "x", "shape": [2, 4], "dynamic_batch": False}]})
    ir = build_ir(FixedBatch().eval(), fixed)  # with a fixed batch torch.export takes it
    assert [n.name for n in ir.gm.graph.nodes if n.op == "placeholder"] == ["x"]
