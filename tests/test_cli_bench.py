"""`effopt bench`, `effopt profile-host` and `effopt inspect --target` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from effopt.cli import main
from effopt.hardware_profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    recipe = tmp / "r.yaml"
    recipe.write_text(
        "version: 1\n"
        f"model: {{factory: 'tests.models:vgg_style', pythonpath: ['{ROOT}']}}\n"
        "inputs: [{name: x, shape: [1, 3, 16, 16]}]\n"
        "passes: [fold_batchnorm, eliminate_dead_code]\n"
        "output: {dir: out}\n"
    )
    assert run("compile", recipe).exit_code == 0
    return recipe, tmp / "out"


def test_bench_times_every_runtime_and_appends_to_the_report(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, out = compiled
    host = tmp_path / "host.yaml"
    assert run("profile-host", "-o", host, "--quick").exit_code == 0
    result = run("bench", recipe, "--runs", 5, "--warmup", 1, "--batches", "1,4", "--profile", host)
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1].strip() for line in result.output.splitlines() if line.startswith("| ") and not line.startswith("| runtime |")]
    assert rows == ["original (eager)", "model.pt2", "model.onnx (onnxruntime)"] * 2
    assert "Spearman(predicted, measured p50)" in result.output
    report = json.loads((out / "report.json").read_text())
    bench = report["bench"]
    assert {(r["runtime"], r["batch"]) for r in bench["rows"]} == {
        (name, b) for name in ("original (eager)", "model.pt2", "model.onnx (onnxruntime)") for b in (1, 4)}
    assert all(r["p50_s"] > 0 and r["p50_s"] <= r["p90_s"] and r["predicted_s"] > 0 for r in bench["rows"])
    assert report["status"] == "passed"  # the compile's own sections are untouched
    md = (out / "report.md").read_text()
    assert md.count("## Benchmark (effopt bench)") == 1
    run("bench", recipe, "--runs", 3, "--warmup", 1, "--batches", "1,2", "--profile", host)
    assert (out / "report.md").read_text().count("## Benchmark (effopt bench)") == 1  # replaced, not stacked


def test_bench_on_an_artefact_folder_alone(compiled: tuple[Path, Path]) -> None:
    _, out = compiled
    result = run("bench", out, "--runs", 3, "--warmup", 1, "--batches", "1,2", "--profile", "x86-avx2")
    assert result.exit_code == 0, result.output
    assert "model.onnx (onnxruntime)" in result.output and "original (eager)" not in result.output
    assert "speed-up vs model.pt2" in result.output


def test_bench_rejects_bad_batches(compiled: tuple[Path, Path]) -> None:
    recipe, _ = compiled
    result = run("bench", recipe, "--batches", "1,x")
    assert result.exit_code == 2 and "--batches" in result.output


def test_profile_host_writes_a_loadable_profile(tmp_path: Path) -> None:
    out = tmp_path / "host.yaml"
    result = run("profile-host", "-o", out, "--quick")
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.name == "host" and profile.peak("fp32") > 1e8
    assert "GB/s" in result.output


def test_inspect_with_a_target_shows_time_and_bottleneck(compiled: tuple[Path, Path]) -> None:
    recipe, _ = compiled
    result = run("inspect", recipe, "--target", "a100")
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "time µs" in header and "bound" in header
    assert "target a100 at batch 1: predicted" in result.output
    mcu = run("inspect", recipe, "--target", "cortex-m7")
    assert "✗ layer 'features_0' (Conv2d) computes in fp32 but cortex-m7 runs only int8" in mcu.output
