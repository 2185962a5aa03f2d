"""Goals, passes: auto, integer-only targets and `effopt evaluate`, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from effopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def recipe(tmp_path: Path, body: str, factory: str = "tests.models:resnet_style", shape: str = "[1, 3, 16, 16]") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"version: 1\n"
        f"model: {{factory: '{factory}', pythonpath: ['{ROOT}']}}\n"
        f"inputs: [{{name: x, shape: {shape}}}]\n"
        f"output: {{formats: [onnx]}}\n" + body
    )
    return path


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_auto_plans_folding_and_reports_why(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("compile", recipe(tmp_path, "passes: auto\n"), "-o", out)
    assert result.exit_code == 0, result.output
    r = report(out)
    plan = {p["name"]: p for p in r["plan"]}
    assert plan["fold_batchnorm"]["chosen"] and "faster on x86-avx2" in plan["fold_batchnorm"]["reason"]
    assert [p["name"] for p in r["passes"]][0] == "fold_batchnorm"
    assert r["predicted_latency"]["after_s"] < r["predicted_latency"]["before_s"]
    assert "## Plan (passes: auto)" in (out / "report.md").read_text()


def test_a_missed_speedup_goal_exits_1_and_still_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("compile", recipe(tmp_path, "passes: [fold_batchnorm]\ngoal: {min_speedup: 50}\n"), "-o", out)
    assert result.exit_code == 1, result.output
    r = report(out)
    assert r["status"] == "failed"
    assert any(f.startswith("goal min_speedup: predicted speedup") for f in r["failures"])
    assert (out / "model.onnx").is_file()


def test_a_latency_budget_is_checked_against_the_target_prediction(tmp_path: Path) -> None:
    ok = run("compile", recipe(tmp_path, "goal: {latency_budget_ms: 1000}\n"), "-o", tmp_path / "a")
    assert ok.exit_code == 0, ok.output
    tight = run("compile", recipe(tmp_path, "goal: {latency_budget_ms: 0.000001}\n"), "-o", tmp_path / "b")
    assert tight.exit_code == 1
    assert "latency_budget_ms" in tight.output


def test_an_integer_only_target_rejects_a_float_model_naming_the_layer(tmp_path: Path) -> None:
    result = run("compile", recipe(tmp_path, "target: cortex-m7\n"), "-o", tmp_path / "out")
    assert result.exit_code == 1
    failures = report(tmp_path / "out")["failures"]
    assert any("cannot run on cortex-m7" in f and "layer 'conv1'" in f and "int8" in f for f in failures), failures


def test_max_accuracy_drop_needs_eval_data(tmp_path: Path) -> None:
    result = run("compile", recipe(tmp_path, "max_accuracy_drop: 0.01\n"), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "max_accuracy_drop needs data" in result.output


def test_max_accuracy_drop_is_measured_on_eval_data(tmp_path: Path) -> None:
    body = "passes: [fold_batchnorm]\nmax_accuracy_drop: 0.0\ndata: {eval: 'sklearn-digits:test'}\n"
    path = recipe(tmp_path, body, factory="examples.digits:DigitsNet", shape="[1, 1, 8, 8]")
    result = run("compile", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    r = report(tmp_path / "out")
    goal = next(g for g in r["goals"] if g["goal"] == "max_accuracy_drop")
    assert goal["passed"] and goal["actual"] == 0.0
    assert r["task"] == "classification" and [e["stage"] for e in r["evaluations"]] == ["original", "after fold_batchnorm"]
    assert r["evaluations"][0]["classification"]["samples"] == 450


def test_evaluate_scores_original_and_each_artefact(tmp_path: Path) -> None:
    body = "passes: [fold_batchnorm]\ndata: {eval: 'sklearn-digits:test'}\noutput: {formats: [pt2, onnx]}\n"
    path = recipe(tmp_path, body, factory="examples.digits:DigitsNet", shape="[1, 1, 8, 8]")
    path.write_text(path.read_text().replace("output: {formats: [onnx]}\n", ""))
    assert run("compile", path, "-o", tmp_path / "out").exit_code == 0
    result = run("evaluate", path, "--artifact", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and "stage" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "original (eager PyTorch)", "model.pt2 (torch.export)", "model.onnx (onnxruntime)"]
    top1 = {r.split("|")[2].strip() for r in rows}
    assert len(top1) == 1  # folding is exact: every artefact scores the same


def test_evaluate_without_eval_data_is_a_clear_error(tmp_path: Path) -> None:
    result = run("evaluate", recipe(tmp_path, ""))
    assert result.exit_code == 2
    assert "data.eval is needed" in result.output
