"""An int-only target end to end: quantize, lower to integers, check bit-exactness, score, write model.h."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import effopt
from examples.digits import train

ROOT = Path(__file__).resolve().parents[1]


def test_digits_for_cortex_m7_compiles_to_a_checked_integer_program(tmp_path: Path) -> None:
    model, _ = train(epochs=4)
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    recipe = {
        "version": 1,
        "model": {"factory": "examples.digits:DigitsNet", "weights": str(tmp_path / "digits.pt"),
                  "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "range": [0, 1]}],
        "target": "cortex-m7",
        "passes": ["fold_batchnorm", "eliminate_dead_code", {"name": "quantize"}],
        "data": {"calibration": "sklearn-digits:train", "eval": "sklearn-digits:test"},
        "max_accuracy_drop": 0.02,
        "output": {"formats": ["onnx"]},
    }
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    assert result.passed, result.report.failures()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["runs_on_target"]["passed"] and goals["integer_program"]["passed"]
    stages = [e["stage"] for e in report["evaluations"]]
    assert stages[-1] == "integer program (NumPy executor)"
    assert report["evaluations"][-1]["classification"]["top1"] > 0.9
    header = (tmp_path / "out" / "model.h").read_text()
    assert "int8_t" in header and "#ifndef" in header


def test_a_float_op_on_an_int_only_target_fails_naming_it(tmp_path: Path) -> None:
    recipe = {
        "version": 1,
        "model": {"factory": "tests.models:tiny_transformer", "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [2, 16, 32]}],
        "target": "cortex-m7",
        "passes": [{"name": "quantize"}],
        "data": {"calibration": str(tmp_path / "calib.npz")},
        "output": {"formats": []},
    }
    import numpy as np

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 16, 32)).astype(np.float32))
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    assert not result.passed
    failures = " ".join(result.report.failures())
    assert "cannot run on cortex-m7" in failures and "(LayerNorm) computes in fp32" in failures
