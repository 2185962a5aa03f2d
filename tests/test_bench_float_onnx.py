"""`effopt bench` times ``model_float.onnx``, the float model before quantize, next to the int8 artefacts.

One static-quantize compile of the test MLP (calibrated on random rows, seconds) writes the int8
``model.onnx`` and the float ``model_float.onnx``; bench on that folder must give the float file
its own row at every batch, in the same interleaved run as the others, with no prediction (the
folder holds no IR of the model before quantize) and its rows appended to report.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import effopt
from effopt.cli import main
from effopt.hardware_profiles import load_profile
from effopt.optimizer.measure.bench_artefacts import run_bench, specs_from_report

ROOT = Path(__file__).resolve().parents[1]
FLOAT_ROW = "model_float.onnx (onnxruntime)"
BATCHES = (1, 4)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("float_onnx")
    rows = tmp / "rows.npz"
    np.savez(rows, x=np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32))
    recipe = {
        "version": 1,
        "model": {"factory": "tests.models:mlp", "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 64]}],
        "target": "x86-avx2",
        "passes": [{"name": "quantize", "mode": "static"}],
        "data": {"calibration": str(rows)},
        "output": {"formats": ["pt2", "onnx"]},
    }
    out = tmp / "out"
    effopt.compile(recipe, output_dir=out)
    assert (out / "model_float.onnx").is_file() and (out / "model.onnx").is_file()  # precondition
    return out


def test_bench_times_the_float_onnx_in_the_same_interleaved_run(quantized: Path) -> None:
    # execute
    result = run_bench(None, None, specs_from_report(quantized), quantized, batches=BATCHES, runs=3, warmup=1,
                       profile=load_profile("x86-avx2"))
    # assert: one row per runtime and batch, from one bench_runtimes call (same runs), float among them
    runtimes = [s.runtime for s in result.stats if s.batch == BATCHES[0]]
    assert "model.onnx (onnxruntime)" in runtimes and FLOAT_ROW in runtimes
    assert runtimes.index(FLOAT_ROW) == runtimes.index("model.onnx (onnxruntime)") + 1  # side by side
    floats = [s for s in result.stats if s.runtime == FLOAT_ROW]
    assert [s.batch for s in floats] == list(BATCHES)
    assert all(s.runs == 3 and math.isfinite(s.p50_s) and s.p50_s > 0 for s in floats)
    assert all((FLOAT_ROW, b) not in result.predicted_s for b in BATCHES)  # not priced: no float IR here
    assert f"| {FLOAT_ROW} | 4 |" in result.table()


def test_effopt_bench_on_the_folder_appends_the_float_rows_to_the_report(quantized: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(quantized), "--runs", "3", "--warmup", "1", "--batches", "1,4",
                                       "--profile", "x86-avx2"])
    assert result.exit_code == 0, result.output
    rows = json.loads((quantized / "report.json").read_text())["bench"]["rows"]
    floats = [r for r in rows if r["runtime"] == FLOAT_ROW]
    assert [r["batch"] for r in floats] == [1, 4]
    assert all(r["p50_s"] > 0 and r["predicted_s"] is None for r in floats)
