"""A quantized compile end to end: int8 ONNX that onnxruntime runs in int8 kernels, checked and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

import effopt

ROOT = Path(__file__).resolve().parents[1]


def _resnet_recipe(tmp_path: Path) -> dict:
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    return {
        "version": 1,
        "model": {"factory": "tests.models:resnet_style", "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 3, 16, 16]}],
        "passes": ["fold_batchnorm", {"name": "quantize", "observer": "percentile"}],
        "data": {"calibration": str(tmp_path / "calib.npz")},
        "output": {"formats": ["pt2", "onnx"]},
    }


def test_quantized_resnet_compiles_to_int8_onnx(tmp_path: Path) -> None:
    result = effopt.compile(_resnet_recipe(tmp_path), output_dir=tmp_path / "out")
    assert result.passed, result.report.failures()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    onnx_entry = next(a for a in report["artefacts"] if a["file"] == "model.onnx")
    assert "int8: " in onnx_entry["note"] and "QLinearConv" in onnx_entry["note"] and "float: none" in onnx_entry["note"]
    assert "x the fake-quant model's" in onnx_entry["note"] and onnx_entry["passed"]
    pt2_entry = next(a for a in report["artefacts"] if a["file"] == "model.pt2")
    assert "quantize/dequantize reference ops" in pt2_entry["note"]
    int8_entry = next(a for a in report["artefacts"] if a["file"] == "model_int8.pt")
    assert int8_entry["note"].startswith("x86 int8 kernels (fbgemm) via TorchScript") and int8_entry["passed"]
    assert "model_int8.pt runs the same model" in pt2_entry["note"]
    assert report["verification"]["gating"] is False  # lossy: tolerances inform, goals decide
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)
    assert report["totals"]["after"]["size_bytes"] < 0.5 * report["totals"]["before"]["size_bytes"]


def test_mixed_precision_uses_the_recipes_accuracy_budget_on_eval_data(tmp_path: Path) -> None:
    import torch

    from examples.digits import train

    model, _ = train(epochs=4)
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    recipe = {
        "version": 1,
        "model": {"factory": "examples.digits:DigitsNet", "weights": str(tmp_path / "digits.pt"),
                  "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "range": [0, 1]}],
        "passes": ["fold_batchnorm", {"name": "quantize", "bits": 2, "mixed_precision": True}],
        "data": {"calibration": "sklearn-digits:train", "eval": "sklearn-digits:test"},
        "max_accuracy_drop": 0.01,
        "output": {"formats": []},
    }
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    quant = result.report.passes[-1]
    assert quant.result.stats["promoted_by_sensitivity"] >= 1  # 2-bit everywhere loses far more than 1 point
    goal = next(g for g in result.report.goals if g.goal == "max_accuracy_drop")
    assert goal.passed, goal.detail


def test_a_lowering_defect_in_the_onnx_file_fails_the_compile(tmp_path: Path, monkeypatch) -> None:
    """One layer's weight scales 1.5x too large: onnxruntime still runs int8, but it is another model."""
    from onnx import numpy_helper

    from effopt.optimizer import artefacts

    def broken_export(*args, **kwargs) -> Path:
        path = real_export(*args, **kwargs)
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and numpy_helper.to_array(inits[n.input[0]]).ndim == 4]
        if not weight_dq:  # model_float.onnx, the float fallback: nothing quantized to break
            return path
        scale = inits[weight_dq[len(weight_dq) // 2].input[1]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
        onnx.save(model, str(path))
        return path

    real_export = artefacts.export_onnx
    monkeypatch.setattr(artefacts, "export_onnx", broken_export)
    result = effopt.compile(_resnet_recipe(tmp_path) | {"output": {"formats": ["onnx"]}}, output_dir=tmp_path / "out")
    assert not result.passed
    entry = next(a for a in result.report.artefacts if a.file == "model.onnx")
    assert not entry.passed and "limit 1.25x" in entry.note, entry.note
    assert any("model.onnx" in f for f in result.report.failures())


def test_the_torch_int8_artefact_follows_the_profiles_arch(tmp_path: Path) -> None:
    """model_int8.pt only for an x86_64 CPU; a CPU profile that does not say its arch gets a reason, not a guess."""
    import yaml

    from effopt.hardware_profiles import load_profile

    shipped = load_profile("x86-avx2").model_dump(mode="json", exclude_none=True)
    shipped.pop("arch")
    (tmp_path / "anon-cpu.yaml").write_text(yaml.safe_dump(shipped | {"name": "anon-cpu"}))
    for target, expected in [("anon-cpu.yaml", "does not name its arch"), ("arm-cortex-a", "not an x86_64 CPU")]:
        out = tmp_path / f"out-{target}"  # not the profile file itself: effopt never replaces a file
        recipe = _resnet_recipe(tmp_path) | {"target": str(tmp_path / target) if target.endswith(".yaml") else target,
                                             "output": {"formats": ["pt2"]}}
        result = effopt.compile(recipe, output_dir=out)
        assert not (out / "model_int8.pt").exists()
        pt2 = next(a for a in result.report.artefacts if a.file == "model.pt2")
        assert expected in pt2.note, pt2.note


def test_an_exported_program_folds_and_quantizes_to_int8_onnx(tmp_path: Path) -> None:
    """``model: {exported: x.pt2}``: its aten.conv2d / aten.batch_norm / aten.linear calls are lifted to
    modules, so the BNs fold and every conv and linear runs in onnxruntime's int8 kernels."""
    import torch

    from examples.digits import DigitsNet
    from tests.models import randomize_bn, seeded

    # setup: a saved program with a free batch size, and calibration data under its input name
    with seeded(0):
        model = randomize_bn(DigitsNet(), seed=0).eval()
    batch = {"x": {0: torch.export.Dim.AUTO}}
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=batch)
    assert not any(n.op == "call_module" for n in program.module().graph.nodes if n.name != "_guards_fn")
    torch.export.save(program, str(tmp_path / "digits.pt2"))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((64, 1, 8, 8)).astype(np.float32))
    recipe = {
        "version": 1,
        "model": {"exported": str(tmp_path / "digits.pt2")},
        "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "range": [0, 1]}],
        "passes": ["fold_batchnorm", {"name": "quantize", "mode": "static"}],
        "data": {"calibration": str(tmp_path / "calib.npz")},
        "output": {"formats": ["pt2", "onnx"]},
    }
    # execute
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    # assert
    assert result.passed, result.report.failures()
    fold, quant = result.report.passes
    assert fold.result.stats["folded"] == 4 and fold.result.stats["lifted_functional_layers"] == 9
    assert quant.result.stats["quantized_layers"] == 5 and quant.result.skipped == ()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    note = next(a for a in report["artefacts"] if a["file"] == "model.onnx")["note"]
    assert "QLinearConv 3" in note and "QGemm 2" in note and "float: none" in note, note
