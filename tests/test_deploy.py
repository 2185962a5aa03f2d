"""Which artefact to deploy (`effopt.optimizer.measure.deploy`, wired into the compile by `artefacts.py`).

The rule is tested with injected timings (the `Timer` seam), so no test depends on this
machine's speed: a LeNet-sized model whose int8 QDQ ONNX is 4x slower than its float ONNX at
batch 32 (what onnxruntime did on an AMD EPYC without VNNI, issue 11), a gap within the 20%
margin, an integer-only target, and targets of another arch. One compile is timed for real
and checked for structure only: deploy section, measurements.json, a chosen artefact that loads.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import TensorDataset

import effopt
from effopt.hardware_profiles import load_profile
from effopt.hardware_profiles.host import host_arch
from effopt.optimizer import artefacts
from effopt.optimizer.compiler import evaluate_artefacts
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.core import IR
from effopt.optimizer.measure.deploy import (
    MARGIN,
    Candidate,
    Timing,
    Timer,
    candidates_in,
    choose_deploy,
    deploy_batches,
)
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import mnist_classic_cnn
from tests.passes.helpers import build_ir, recipe_passes

ROOT = Path(__file__).resolve().parents[1]
LENET_SHAPE = (1, 1, 28, 28)
BATCHES = (1, 32)
# p50 in ms at batch 1 and 32: the int8 artefacts slower than the float ONNX, 4x at batch 32
INT8_SLOWER = {"model.onnx": (0.18, 6.4), "model_int8.pt": (0.25, 8.0), "model_float.onnx": (0.13, 1.6)}


# --- helpers --------------------------------------------------------------------------------------


def fake_timer(p50_ms: Mapping[str, Sequence[float]], calls: list | None = None) -> Timer:
    """A `Timer` that returns the given p50s (ms, one per batch in `BATCHES`); NaN marks a failed run."""

    def timer(candidates: Sequence[Candidate], batches: Sequence[int]) -> list[Timing]:
        if calls is not None:
            calls.append([c.file for c in candidates])
        out = []
        for b in batches:
            for c in candidates:
                ms = p50_ms[c.file][BATCHES.index(b)]
                note = "failed" if math.isnan(ms) else None
                out.append(Timing(c.file, b, ms / 1e3, ms / 1e3, 0 if note else 20, note))
        return out

    return timer


def refuse_to_time(candidates: Sequence[Candidate], batches: Sequence[int]) -> list[Timing]:
    raise AssertionError("this choice must not be measured")


@pytest.fixture(scope="module")
def lenet_irs() -> tuple[IR, IR]:
    """(float IR, int8 IR) of the LeNet-sized model, the int8 one calibrated on random images."""
    float_ir = build_ir(mnist_classic_cnn(), LENET_SHAPE)
    images = torch.rand(32, *LENET_SHAPE[1:], generator=torch.Generator().manual_seed(0))
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=DataSource("random", TensorDataset(images), 16, False))
    int8_ir, _ = run_passes(copy.deepcopy(float_ir), recipe_passes({"name": "quantize", "mode": "static"}), ctx)
    return float_ir, int8_ir


def quantized_pool(lenet_irs: tuple[IR, IR], files: Sequence[str] = tuple(INT8_SLOWER)) -> list[Candidate]:
    float_ir, int8_ir = lenet_irs
    return [Candidate(f, f != "model_float.onnx", float_ir if f == "model_float.onnx" else int8_ir) for f in files]


# --- the rule, with injected timings ---------------------------------------------------------------


def test_int8_measured_slower_than_float_deploys_the_float_onnx_and_warns(lenet_irs) -> None:
    profile = load_profile("x86-avx2")
    pool = quantized_pool(lenet_irs)
    # precondition: the cost model alone would ship int8 (the mistake issue 11 reports)
    assert pool[0].predicted_s(profile, 32) < pool[2].predicted_s(profile, 32)

    choice, measured = choose_deploy(pool, profile, BATCHES, fake_timer(INT8_SLOWER), this_host="x86_64")

    assert (choice.artefact, choice.runtime, choice.basis, choice.expected) == (
        "model_float.onnx", "onnxruntime", "measured", "model.onnx")
    assert "measured more than 20% faster than model.onnx" in choice.reason and "same arch as x86-avx2" in choice.reason
    assert choice.warning is not None and choice.warning.startswith("deploy: quantize did not pay off on this host")
    assert "model.onnx, model_int8.pt" in choice.warning and "still written" in choice.warning
    assert choice.predicted_s == pytest.approx(pool[2].predicted_s(profile))
    assert measured is not None and measured.chosen == "model_float.onnx" and measured.batches == BATCHES
    # the exact ratio lives in measurements.json: geometric mean of 0.18/0.13 and 6.4/1.6
    assert measured.speedups["model_float.onnx"] == pytest.approx(math.sqrt(0.18 / 0.13 * 6.4 / 1.6))
    rows = json.loads(measured.to_json())["rows"]
    assert {(r["artefact"], r["batch"]) for r in rows} == {(f, b) for f in INT8_SLOWER for b in BATCHES}


def test_a_gap_within_the_margin_keeps_the_expected_int8_artefact(lenet_irs) -> None:
    within = {"model.onnx": (0.20, 2.0), "model_int8.pt": (0.21, 2.1), "model_float.onnx": (0.19, 1.8)}
    assert within["model_float.onnx"][1] < within["model.onnx"][1]  # precondition: float is a bit faster

    choice, measured = choose_deploy(quantized_pool(lenet_irs), load_profile("x86-avx2"), BATCHES,
                                     fake_timer(within), this_host="x86_64")

    assert choice.artefact == "model.onnx" and choice.warning is None
    assert "no other candidate (model_int8.pt, model_float.onnx) was more than 20% faster" in choice.reason
    assert measured is not None and 1 < measured.speedups["model_float.onnx"] < MARGIN


def test_a_later_candidate_must_beat_the_current_pick_not_just_the_first(lenet_irs) -> None:
    """int8.pt 1.3x faster than model.onnx takes over; float, 1.1x faster than int8.pt, does not."""
    timings = {"model.onnx": (1.3, 13.0), "model_int8.pt": (1.0, 10.0), "model_float.onnx": (0.91, 9.1)}
    choice, _ = choose_deploy(quantized_pool(lenet_irs), load_profile("x86-avx2"), BATCHES,
                              fake_timer(timings), this_host="x86_64")
    assert choice.artefact == "model_int8.pt" and choice.runtime == "torch.jit" and choice.warning is None


def test_report_text_names_no_measured_number(lenet_irs) -> None:
    """Two different timings that lead to the same choice give the same deploy section (byte-identical reports)."""
    pool, profile = quantized_pool(lenet_irs), load_profile("x86-avx2")
    other = {"model.onnx": (0.3, 9.0), "model_int8.pt": (0.4, 9.5), "model_float.onnx": (0.1, 1.0)}

    first, m1 = choose_deploy(pool, profile, BATCHES, fake_timer(INT8_SLOWER), this_host="x86_64")
    second, m2 = choose_deploy(pool, profile, BATCHES, fake_timer(other), this_host="x86_64")

    assert m1 is not None and m2 is not None and m1.speedups != m2.speedups  # precondition: timings differ
    assert first == second and first.to_dict() == second.to_dict()


def test_the_auto_plans_quantize_is_named_in_the_warning(lenet_irs) -> None:
    choice, _ = choose_deploy(quantized_pool(lenet_irs), load_profile("x86-avx2"), BATCHES,
                              fake_timer(INT8_SLOWER), this_host="x86_64", auto_quantize=True)
    assert choice.warning is not None and "the auto plan's quantize" in choice.warning


def test_a_candidate_that_cannot_run_is_never_chosen(lenet_irs) -> None:
    broken = {"model.onnx": (0.2, 2.0), "model_int8.pt": (0.25, 2.5), "model_float.onnx": (math.nan, math.nan)}
    choice, _ = choose_deploy(quantized_pool(lenet_irs), load_profile("x86-avx2"), BATCHES,
                              fake_timer(broken), this_host="x86_64")
    assert choice.artefact == "model.onnx"
    expected_broken = {"model.onnx": (math.nan, math.nan), "model_int8.pt": (0.25, 2.5), "model_float.onnx": (0.2, 2.4)}
    choice, _ = choose_deploy(quantized_pool(lenet_irs), load_profile("x86-avx2"), BATCHES,
                              fake_timer(expected_broken), this_host="x86_64")
    assert choice.artefact == "model_int8.pt" and choice.expected == "model_int8.pt"


def test_an_integer_only_target_deploys_model_h_without_timing(lenet_irs) -> None:
    _, int8_ir = lenet_irs
    pool = [Candidate("model.h", True, int8_ir), Candidate("model.onnx", True, int8_ir)]

    choice, measured = choose_deploy(pool, load_profile("cortex-m7"), BATCHES, refuse_to_time, this_host="armv7e-m")

    assert (choice.artefact, choice.runtime, choice.basis, measured) == ("model.h", "C integer program", "only", None)
    assert "cortex-m7 is integer-only" in choice.reason
    none, _ = choose_deploy(pool[1:], load_profile("cortex-m7"), BATCHES, refuse_to_time)
    assert none.artefact is None and "no integer program (model.h) was written" in none.reason


@pytest.mark.parametrize("target", ["a100", "arm-cortex-a"])
def test_a_target_of_another_arch_is_chosen_by_prediction_and_says_so(target: str, lenet_irs) -> None:
    profile = load_profile(target)
    assert profile.arch != "x86_64"  # precondition: this (pretended) host cannot stand in for it

    choice, measured = choose_deploy(quantized_pool(lenet_irs), profile, BATCHES, refuse_to_time, this_host="x86_64")

    assert choice.basis == "predicted" and measured is None
    assert choice.reason.startswith("predicted") and "not measured" in choice.reason
    assert f"this host's arch (x86_64) is not {target}'s ({profile.arch})" in choice.reason
    assert choice.artefact == "model.onnx"  # int8 is predicted no slower: the expected artefact stays
    assert choice.predicted_s == pytest.approx(quantized_pool(lenet_irs)[0].predicted_s(profile))


def test_one_candidate_is_deployed_without_timing(lenet_irs) -> None:
    float_ir, _ = lenet_irs
    choice, measured = choose_deploy([Candidate("model.onnx", False, float_ir)], load_profile("x86-avx2"), BATCHES,
                                     refuse_to_time, this_host="x86_64")
    assert (choice.artefact, choice.basis, measured) == ("model.onnx", "only", None)
    nothing, _ = choose_deploy([], load_profile("x86-avx2"), BATCHES, refuse_to_time, this_host="x86_64")
    assert nothing.artefact is None and "output.formats is empty" in nothing.reason


def test_candidates_come_in_the_expected_order_and_a_quantized_pt2_only_alone(tmp_path: Path, lenet_irs) -> None:
    float_ir, int8_ir = lenet_irs
    for name in ("model_float.onnx", "model.pt2", "model_int8.pt", "model.onnx", "report.json"):
        (tmp_path / name).write_bytes(b"")

    quantized = candidates_in(tmp_path, int8_ir, float_ir, quantized=True)
    plain = candidates_in(tmp_path, float_ir, None, quantized=False)

    assert [c.file for c in quantized] == ["model.onnx", "model_int8.pt", "model_float.onnx"]
    assert [c.quantized for c in quantized] == [True, True, False]
    assert [c.file for c in plain] == ["model.onnx", "model_int8.pt", "model.pt2", "model_float.onnx"]
    for name in ("model_float.onnx", "model_int8.pt", "model.onnx"):
        (tmp_path / name).unlink()
    (alone,) = candidates_in(tmp_path, int8_ir, float_ir, quantized=True)
    assert alone.file == "model.pt2" and alone.ir is None  # its reference ops run in float: not priced


def test_batches_are_1_and_32_unless_the_batch_is_fixed() -> None:
    from effopt.optimizer.ir.core import InputSpec

    assert deploy_batches((InputSpec("x", LENET_SHAPE, dynamic_batch=True),)) == (1, 32)
    assert deploy_batches((InputSpec("x", (8, 64), dynamic_batch=True),)) == (1, 8)
    assert deploy_batches((InputSpec("x", (4, 64), dynamic_batch=False),)) == (4,)


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, x=np.random.default_rng(0).random((64, *LENET_SHAPE[1:]), dtype=np.float32))
    return path


def lenet_recipe(images: Path, passes: object, target: str = "x86-avx2", formats: Sequence[str] = ("pt2", "onnx"),
                 **extra: object) -> dict:
    return {
        "version": 1,
        "model": {"factory": "tests.models:mnist_classic_cnn", "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": list(LENET_SHAPE), "range": [0, 1]}],
        "target": target,
        "passes": passes,
        "data": {"calibration": str(images)},
        "output": {"formats": list(formats)},
    } | extra


def inject(monkeypatch: pytest.MonkeyPatch, timer: Timer) -> None:
    monkeypatch.setattr(artefacts, "make_timer", lambda specs, seed: timer)
    monkeypatch.setattr("effopt.optimizer.measure.deploy.host_arch", lambda: "x86_64")


QUANTIZE = [{"name": "quantize", "mode": "static"}]


def test_explicit_quantize_that_measures_slower_writes_int8_and_float_and_deploys_float(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, fake_timer(INT8_SLOWER))
    result = effopt.compile(lenet_recipe(images, QUANTIZE), output_dir=tmp_path / "a")
    inject(monkeypatch, fake_timer({"model.onnx": (0.4, 9.0), "model_int8.pt": (0.5, 9.9), "model_float.onnx": (0.1, 2.0)}))
    effopt.compile(lenet_recipe(images, QUANTIZE), output_dir=tmp_path / "b")

    out = tmp_path / "a"
    assert result.passed, result.report.failures()
    report = json.loads((out / "report.json").read_text())
    # the int8 artefacts are still written, and so is the float fallback, checked like any float ONNX
    proto = onnx.load(str(out / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)
    assert (out / "model_int8.pt").is_file()
    fallback = next(a for a in report["artefacts"] if a["file"] == "model_float.onnx")
    assert fallback["passed"] and fallback["sha256"] and "before quantize" in fallback["check"]
    assert not any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(out / "model_float.onnx")).graph.initializer)
    # deploy: the faster, with a warning; the ratio itself only in measurements.json
    assert report["deploy"]["artefact"] == "model_float.onnx" and report["deploy"]["basis"] == "measured"
    assert [w for w in report["warnings"] if w.startswith("deploy: quantize did not pay off")]
    measured = json.loads((out / "measurements.json").read_text())
    assert measured["speedup_vs_expected"]["model_float.onnx"] == pytest.approx(math.sqrt(0.18 / 0.13 * 6.4 / 1.6))
    assert "## Deploy" in (out / "report.md").read_text()
    # other timings, same decision: the reports are identical, the measurements are not. (Except for
    # model_int8.pt's size: a TorchScript archive records process history, see emit/torchscript.py.)
    for name in ("model.onnx", "model_float.onnx"):
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert without_torchscript(out) == without_torchscript(tmp_path / "b")
    assert (out / "measurements.json").read_bytes() != (tmp_path / "b" / "measurements.json").read_bytes()


def without_torchscript(folder: Path) -> tuple[dict, list[str]]:
    """report.json and report.md's lines, less model_int8.pt's entry (its size varies within one process)."""
    report = json.loads((folder / "report.json").read_text())
    report["artefacts"] = [a for a in report["artefacts"] if a["file"] != "model_int8.pt"]
    lines = [line for line in (folder / "report.md").read_text().splitlines() if not line.startswith("| model_int8.pt |")]
    return report, lines


def test_auto_plans_quantize_but_deploys_float_when_it_measures_slower(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, fake_timer(INT8_SLOWER))
    recipe = lenet_recipe(images, "auto", formats=["onnx"], max_accuracy_drop=0.5)
    recipe["data"]["eval"] = str(images)

    result = effopt.compile(recipe, output_dir=tmp_path / "out")

    assert result.passed, result.report.failures()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    quantize = next(p for p in report["plan"] if p["name"] == "quantize")
    assert quantize["chosen"] and quantize["reason"].startswith("predicted")  # precondition: the plan chose it
    assert "measured slower, so model_float.onnx (before quantize) is deployed" in quantize["reason"]
    assert report["deploy"]["artefact"] == "model_float.onnx"
    assert any("the auto plan's quantize" in w and "did not pay off on this host" in w for w in report["warnings"])
    # effopt evaluate scores the float fallback too, since it may be what ships
    stages = [s.stage for s in evaluate_artefacts(recipe, tmp_path / "out")]
    assert stages[-2:] == ["model.onnx (onnxruntime)", "model_float.onnx (onnxruntime, before quantize)"]


def test_a_target_of_another_arch_gets_model_float_onnx_and_a_predicted_choice(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artefacts, "make_timer", lambda specs, seed: refuse_to_time)
    result = effopt.compile(lenet_recipe(images, QUANTIZE, target="arm-cortex-a", formats=["onnx"]),
                            output_dir=tmp_path / "out")

    assert result.passed, result.report.failures()
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.onnx", "model_float.onnx"} <= files and "measurements.json" not in files
    deploy = json.loads((tmp_path / "out" / "report.json").read_text())["deploy"]
    assert deploy["basis"] == "predicted" and "not measured" in deploy["reason"]


def test_an_integer_only_target_deploys_model_h(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artefacts, "make_timer", lambda specs, seed: refuse_to_time)
    result = effopt.compile(lenet_recipe(images, QUANTIZE, target="cortex-m7", formats=["onnx"]),
                            output_dir=tmp_path / "out")

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "model.h").is_file(), result.report.failures()
    assert "model_float.onnx" not in {p.name for p in (tmp_path / "out").iterdir()}  # float cannot run there
    assert report["deploy"]["artefact"] == "model.h" and report["deploy"]["runtime"] == "C integer program"


def test_a_real_measured_choice_is_recorded_and_loads(tmp_path: Path, images: Path) -> None:
    """Timed for real: asserts structure only (which artefact wins depends on this machine's CPU)."""
    result = effopt.compile(lenet_recipe(images, QUANTIZE), output_dir=tmp_path / "out")

    assert result.passed, result.report.failures()
    out = tmp_path / "out"
    deploy = json.loads((out / "report.json").read_text())["deploy"]
    chosen = out / deploy["artefact"]
    assert chosen.is_file() and deploy["predicted_latency_s"] > 0
    x = torch.rand(*LENET_SHAPE)
    if chosen.suffix == ".onnx":
        session = ort.InferenceSession(str(chosen), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    else:
        y = torch.jit.load(str(chosen))(x).numpy()
    assert y.shape == (1, 10)
    if host_arch() != "x86_64":
        assert deploy["basis"] == "predicted"
        return
    assert deploy["basis"] == "measured"
    measured = json.loads((out / "measurements.json").read_text())
    assert measured["chosen"] == deploy["artefact"] and measured["batches"] == [1, 32]
    rows = {(r["artefact"], r["batch"]) for r in measured["rows"] if r["p50_s"] is not None and r["p50_s"] > 0}
    assert rows == {(f, b) for f in ("model.onnx", "model_int8.pt", "model_float.onnx") for b in (1, 32)}
