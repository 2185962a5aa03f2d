"""Artefacts of a compile: model.pt2, model_int8.pt, model.onnx, model_float.onnx, model.h, model_aoti.pt2
and the report, atomically.

Each artefact is checked as it is written (reloaded and compared with the optimized
model), and the report says what runs inside it: float ops, torch's reference
quantize/dequantize ops, torch's x86 int8 kernels, or onnxruntime's int8 kernels.
For an integer-only target the quantized graph is also lowered to an integer
program, checked bit for bit and scored (`lower_for_integer_target`).
A half-precision model (``half_precision``) ships ``model.pt2`` in its dtype; its
``model.onnx`` is in that dtype only where onnxruntime has kernels for it
(`half_onnx_blocker`), else fp32 with the reason in the artefact's note (`_emit_half_onnx`).
``model_aoti.pt2`` (``formats: [aoti]``) is the program compiled by AOTInductor for this
CPU (`_emit_aoti`); its compile time goes to ``measurements.json``.
Last, the report's ``deploy`` section names the artefact to ship on the target
(`effopt.optimizer.measure.deploy`: timed side by side when this host has the
target's arch, with the timings in ``measurements.json``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effopt.errors import EmitError, LoweringError
from effopt.hardware_profiles import HardwareProfile
from effopt.hardware_profiles.host import host_arch, host_int8_weight_bits
from effopt.optimizer.emit.aoti import AOTI_FILE, INPUT_LAYOUT, aoti_blocker, compile_aoti, load_aoti
from effopt.optimizer.emit.c_header import write_c_header
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.emit.pt2 import export_program, save_pt2, sha256
from effopt.optimizer.emit.writer import atomic_dir
from effopt.optimizer.emit.onnx import export_onnx, half_onnx_blocker
from effopt.optimizer.ir.compare import compare_outputs
from effopt.optimizer.measure.deploy import (
    Timer,
    candidates_in,
    choose_deploy,
    compile_times_json,
    deploy_batches,
    make_timer,
)
from effopt.optimizer.measure.evaluate import Task, evaluate
from effopt.optimizer.lower.integer import IntegerExecutor, IntegerProgram, lower_to_integer, reference_integer_model
from effopt.optimizer.ir.core import IR, facts, has_facts
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear, freeze_weights
from effopt.optimizer.report.report import ArtefactInfo, GoalCheck, LayerPrecision, Report, StageEvaluation
from effopt.optimizer.lower.torch_int8 import Unsupported, int8_summary, lower_to_torch_int8
from effopt.optimizer.emit.torchscript import save_torchscript
from effopt.optimizer.measure.runtime import onnx_runner
from effopt.optimizer.measure.verify import (
    OutputAgreement,
    compare,
    compare_onnx,
    dtype_tolerance,
    quantized_fidelity,
    random_batches,
)
from effopt.passes.half_precision import float32_copy, half_dtype_of
from effopt.recipes.schema import Recipe

@dataclass(frozen=True)
class IntegerLowering:
    """An int-only target's integer program, whether it checks out, and its accuracy."""

    program: IntegerProgram | None
    goal: GoalCheck
    evaluation: StageEvaluation | None


def lower_for_integer_target(
    ir: IR, profile: HardwareProfile, original: nn.Module, eval_data: DataSource | None, task: Task | None, seed: int
) -> IntegerLowering:
    """Lower the quantized graph to integers, check the NumPy executor against the torch integer
    reference bit for bit on random inputs, and score the executor on the eval data."""
    try:
        program = lower_to_integer(ir.gm, ir.example_inputs, accumulator_bits=profile.accumulator_bits)
    except LoweringError as e:  # not lowerable is a missed goal ("runs on the target"), not an aborted compile
        return IntegerLowering(None, GoalCheck("integer_program", 1.0, 0.0, False, str(e)), None)
    executor, reference = IntegerExecutor(program), reference_integer_model(program)
    mismatches = 0
    for batch in random_batches(ir.inputs, 2, 8, seed + 3):
        codes = program.quantize_inputs(*batch)
        ours = executor.run(*codes)
        with torch.no_grad():
            theirs = reference(*(torch.from_numpy(c) for c in codes))
        mismatches += sum(a.mismatches for a in compare_outputs(ours, theirs))  # integer codes: exact
    goal = GoalCheck(
        "integer_program", 1.0, 1.0 if mismatches == 0 else 0.0, mismatches == 0,
        f"{len(program.ops)} integer ops; NumPy executor == torch integer reference on random inputs"
        if mismatches == 0 else f"NumPy executor differs from the torch integer reference in {mismatches} outputs",
    )
    evaluation = None
    if eval_data is not None and task is not None:

        def run_float(*xs: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(executor.run_float(*xs)[0]))

        evaluation = StageEvaluation("integer program (NumPy executor)", evaluate(run_float, eval_data, task, reference=original))
    return IntegerLowering(program, goal, evaluation)


def emit_artefacts(out: Path, report: Report, ir: IR, recipe: Recipe, original: nn.Module,
                   program: IntegerProgram | None = None, profile: HardwareProfile | None = None,
                   force: bool = False, float_ir: IR | None = None, timer: Timer | None = None) -> Report:
    """Write the artefacts named in ``output.formats`` (and an int-only target's C header) and the report, all or nothing.

    ``float_ir`` is the model before quantize: for a quantized model with ``onnx`` in the
    formats (and a target that runs float) it is written as ``model_float.onnx``, a float
    fallback to deploy where int8 does not pay off. ``timer`` times the deploy candidates
    (default `make_timer`; tests inject timings here).

    A float artefact must reproduce the optimized model within the recipe's tolerances. A
    quantized one runs int8 kernels with their own rounding, so it is held to
    `quantized_fidelity` instead: no further from ``original`` than the fake-quant model
    (within `QUANTIZED_FIDELITY_SLACK`), on ``verify.samples`` random batches.
    """
    artefacts: list[ArtefactInfo] = []
    fidelity_batches = random_batches(ir.inputs, max(recipe.verify.samples, 4), recipe.verify.batch, recipe.seed + 2)
    check_batches = fidelity_batches[:2]  # the same draws: one seeded generator
    model = freeze_weights(copy.deepcopy(ir.gm)).eval()  # quantized layers store int8 weights in artefacts
    quantized = _quantized(model)
    half = half_dtype_of(model)
    onnx_dtypes: dict[str, str] | None = None  # model.onnx's dtypes where they are not the IR's (fp32 twin)
    compile_s: dict[str, float] = {}
    warnings: list[str] = []
    exported = None  # the torch.export program of model.pt2, compiled again by AOTInductor
    with atomic_dir(out, force=force) as tmp:  # force: see effopt.optimizer.emit.writer
        if "pt2" in recipe.output.formats:
            exported = export_program(model, ir.inputs, ir.example_inputs)
            path = save_pt2(exported, tmp / "model.pt2")
            reloaded = torch.export.load(str(path)).module()
            checks = compare(ir.gm, reloaded, check_batches, "pt2 reload", recipe.verify.rtol, recipe.verify.atol)
            int8 = _torch_int8(ir, profile) if quantized else None
            int8_info = None
            if int8 is not None and not isinstance(int8, Unsupported):
                try:
                    int8_info = _emit_torch_int8(int8, ir, original, tmp / "model_int8.pt", fidelity_batches, recipe)
                except EmitError as e:  # TorchScript refused it: the pt2 stays the PyTorch artefact
                    int8 = Unsupported((str(e),))
            note = _pt2_note(model, int8) or _half_pt2_note(model, half)
            artefacts.append(replace(_info(path, "torch.export.load + outputs vs optimized model", checks), note=note))
            artefacts += [int8_info] if int8_info is not None else []
        if "onnx" in recipe.output.formats and half is not None:
            info, onnx_dtypes = _emit_half_onnx(model, ir, half, tmp / "model.onnx", check_batches, recipe)
            artefacts.append(info)
        elif "onnx" in recipe.output.formats:
            path = export_onnx(model, ir.example_inputs, [s.name for s in ir.inputs], [s.dynamic_batch for s in ir.inputs], tmp / "model.onnx")
            # raises on a different output count/shape (an emit defect); a quantized model's numbers are
            # then judged by their fidelity to the original, not by these float tolerances
            agreement = compare_onnx(path, ir.gm, check_batches, recipe.verify.rtol, max(recipe.verify.atol, 1e-5))
            if quantized:
                kernels_exact = _widest_weight_bits(model) <= host_int8_weight_bits()
                runner = onnx_runner(path, optimize=kernels_exact)
                fidelity = quantized_fidelity(original, ir.gm, runner, fidelity_batches, recipe.verify.atol)
                how = "" if kernels_exact else f"; {_REFERENCE_CHECK}"
                artefacts.append(ArtefactInfo(
                    "model.onnx", path.stat().st_size, sha256(path), "onnx.checker + " + _FIDELITY_CHECK,
                    fidelity.max_drift, fidelity.passed, f"{_onnx_note(path, model)}; {fidelity.describe()}{how}",
                ))
            else:
                artefacts.append(ArtefactInfo(
                    "model.onnx", path.stat().st_size, sha256(path), "onnx.checker + onnxruntime outputs vs optimized model",
                    agreement.max_abs_err, agreement.passed,
                ))
        if quantized and float_ir is not None and "onnx" in recipe.output.formats and not (profile and profile.integer_only):
            artefacts.append(_emit_float_onnx(float_ir, tmp / "model_float.onnx", check_batches, recipe))
        if "aoti" in recipe.output.formats:
            blocker = aoti_blocker(profile, host_arch())
            if blocker is None:
                exported = exported if exported is not None else export_program(model, ir.inputs, ir.example_inputs)
                info, compile_s[AOTI_FILE] = _emit_aoti(exported, tmp / AOTI_FILE, ir, original, half, quantized,
                                                        fidelity_batches, recipe)
                artefacts.append(info)
            else:
                warnings.append(f"{AOTI_FILE} (formats: aoti) not written: {blocker}")
        if program is not None:
            header = tmp / "model.h"
            header.write_text(write_c_header(program, "effopt_model"))
            artefacts.append(ArtefactInfo(
                "model.h", header.stat().st_size, sha256(header), "integer program checked bit-exact (see goals)",
                None, True, f"int8 weights, int32 biases, fixed-point multipliers and shifts for {len(program.ops)} ops",
            ))
        report = replace(report, artefacts=tuple(artefacts), precision=layer_precision(ir),
                         warnings=(*report.warnings, *warnings))
        if profile is not None:
            report = _with_deploy(report, tmp, ir, float_ir, quantized, profile, timer or make_timer(ir.inputs, recipe.seed),
                                  onnx_dtypes, compile_s)
        if compile_s and not (tmp / "measurements.json").is_file():
            (tmp / "measurements.json").write_text(compile_times_json(compile_s))
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.to_markdown())
    return report


def _emit_float_onnx(float_ir: IR, path: Path, batches: list, recipe: Recipe) -> ArtefactInfo:
    """``model_float.onnx``: the model before quantize, held to the float tolerances against that model."""
    before = copy.deepcopy(float_ir.gm).eval()
    export_onnx(before, float_ir.example_inputs, [s.name for s in float_ir.inputs], [s.dynamic_batch for s in float_ir.inputs], path)
    agreement = compare_onnx(path, float_ir.gm, batches, recipe.verify.rtol, max(recipe.verify.atol, 1e-5))
    return ArtefactInfo(
        path.name, path.stat().st_size, sha256(path), "onnx.checker + onnxruntime outputs vs the model before quantize",
        agreement.max_abs_err, agreement.passed,
        "float fallback: the model before quantize, in float; deployed where int8 does not pay off (see deploy)",
    )


def _with_deploy(report: Report, folder: Path, ir: IR, float_ir: IR | None, quantized: bool,
                 profile: HardwareProfile, timer: Timer, onnx_dtypes: dict[str, str] | None = None,
                 compile_s: dict[str, float] | None = None) -> Report:
    """``report`` with its ``deploy`` section; writes ``measurements.json`` when the choice was measured
    (with ``compile_s``, the seconds each compiled artefact took to build).

    When ``passes: auto`` chose quantize and the float model is deployed, the plan line says so too.
    """
    auto_quantize = any(p.name == "quantize" and p.chosen for p in report.plan)
    pool = candidates_in(folder, ir, float_ir if quantized else None, quantized, onnx_dtypes)
    choice, measurements = choose_deploy(pool, profile, deploy_batches(ir.inputs), timer, auto_quantize=auto_quantize)
    if measurements is not None:
        measurements = replace(measurements, compile_s=dict(compile_s or {}))
        (folder / "measurements.json").write_text(measurements.to_json())
    if choice.warning is None:
        return replace(report, deploy=choice)
    plan = report.plan
    if auto_quantize:
        note = f"; but the int8 artefacts {choice.basis} slower, so {choice.artefact} (before quantize) is deployed"
        plan = tuple(replace(p, reason=p.reason + note) if p.name == "quantize" and p.chosen else p for p in plan)
    return replace(report, deploy=choice, plan=plan, warnings=(*report.warnings, choice.warning))


# -- half precision and AOTInductor -----------------------------------------------------------------------


def layer_precision(ir: IR) -> tuple[LayerPrecision, ...]:
    """Each compute node's dtype when some node computes in bf16/fp16 (else nothing: the report keeps its bytes).

    Views and casts are left out (they compute nothing); a quantized layer shows int8, a layer the
    quantize pass promoted shows the half dtype or fp32.
    """
    rows = [LayerPrecision(n.name, facts(n).op, facts(n).compute_dtype) for n in ir.compute_nodes()
            if has_facts(n) and facts(n).flops > 0]
    return tuple(rows) if any(r.dtype in ("bf16", "fp16") for r in rows) else ()


def _half_pt2_note(model: nn.Module, half: str | None) -> str:
    if half is None:
        return ""
    layout = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                 for p in model.parameters())
    return (f"{half} compute with fp32 inputs and outputs (cast at the boundary)"
            + ("; 4-D conv weights channels-last" if layout else "") + "; loads with torch alone")


def _compute_op_types(ir: IR) -> list[str]:
    """The ONNX compute ops the exported model has: Conv / ConvTranspose / Gemm and MatMul."""
    by_kind = {"conv": ["Conv"], "conv_transpose": ["ConvTranspose"], "linear": ["Gemm", "MatMul"], "matmul": ["MatMul"]}
    ops: list[str] = []
    for n in ir.compute_nodes():
        for op in by_kind.get(facts(n).op_kind, []) if has_facts(n) else []:
            ops += [op] if op not in ops else []
    return ops


def _emit_half_onnx(model: nn.Module, ir: IR, half: str, path: Path, batches: list,
                    recipe: Recipe) -> tuple[ArtefactInfo, dict[str, str] | None]:
    """``model.onnx`` of a half-precision model, and the dtypes to price it in when they are not the IR's.

    In ``half`` where onnxruntime has CPU kernels in that dtype for every compute op (checked
    against the half model at `dtype_tolerance`); else the model's fp32 twin (`float32_copy`: the
    same half-rounded weights, fp32 compute, no casts), held to the recipe's tolerances against
    that twin, and the note says why.
    """
    names, dynamic = [s.name for s in ir.inputs], [s.dynamic_batch for s in ir.inputs]
    blocker = half_onnx_blocker(half, _compute_op_types(ir))
    if blocker is None:
        export_onnx(model, ir.example_inputs, names, dynamic, path)
        rtol, atol = dtype_tolerance(half, recipe.verify.rtol, recipe.verify.atol)
        agreement = compare_onnx(path, ir.gm, batches, rtol, atol)
        return ArtefactInfo(path.name, path.stat().st_size, sha256(path),
                            f"onnx.checker + onnxruntime outputs vs optimized model (rtol {rtol:.3g}, atol {atol:.3g})",
                            agreement.max_abs_err, agreement.passed,
                            f"{half} weights and compute, fp32 inputs and outputs"), None
    twin = float32_copy(model).eval()
    export_onnx(twin, ir.example_inputs, names, dynamic, path)
    agreement = compare_onnx(path, twin, batches, recipe.verify.rtol, max(recipe.verify.atol, 1e-5))
    fp32 = {n.name: "fp32" for n in ir.compute_nodes() if has_facts(n) and facts(n).compute_dtype in ("bf16", "fp16")}
    return ArtefactInfo(path.name, path.stat().st_size, sha256(path),
                        f"onnx.checker + onnxruntime outputs vs the model's fp32 twin ({half} weights widened)",
                        agreement.max_abs_err, agreement.passed,
                        f"fp32, not {half}: {blocker}; the {half}-rounded weights are widened to fp32 exactly"), fp32


def _emit_aoti(program: torch.export.ExportedProgram, path: Path, ir: IR, original: nn.Module, half: str | None,
               quantized: bool, batches: list, recipe: Recipe) -> tuple[ArtefactInfo, float]:
    """``model_aoti.pt2``: compile, reload as a user would, compare; returns its entry and the compile seconds.

    Checked against the optimized model at `dtype_tolerance` (Inductor fuses and rounds a half chain
    once), or, for a quantized model, by `quantized_fidelity` like the other int8 artefacts.
    """
    package = compile_aoti(program, path)
    loaded = load_aoti(package.path)
    note = (f"AOTInductor package compiled for this host's CPU ({host_arch() or 'unknown arch'}); loads with "
            f"torch alone: torch._inductor.aoti_load_package(path)(x); {INPUT_LAYOUT}; compile time in measurements.json")
    check = "aoti_load_package + outputs vs optimized model"
    if quantized:
        fidelity = quantized_fidelity(original, ir.gm, loaded, batches, recipe.verify.atol)
        info = ArtefactInfo(path.name, path.stat().st_size, None, check.replace("optimized model", "the original")
                            + " (RMS, 1.25x the fake-quant model's)", fidelity.max_drift, fidelity.passed,
                            f"{note}; {fidelity.describe()}")
        return info, package.compile_s
    rtol, atol = dtype_tolerance(half, recipe.verify.rtol, recipe.verify.atol)
    checks = compare(ir.gm, loaded, batches[:2], "aoti reload", rtol, atol)
    err = max((c.max_abs_err for c in checks), default=0.0)
    ok = all(c.within_tolerance for c in checks)
    return ArtefactInfo(path.name, path.stat().st_size, None, f"{check} (rtol {rtol:.3g}, atol {atol:.3g})", err, ok,
                        note), package.compile_s


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuant) for m in model.modules())


def _pt2_note(model: nn.Module, int8: nn.Module | Unsupported | None = None) -> str:
    if not _quantized(model):
        return ""
    reference = ("int8 weights with quantize/dequantize reference ops written in plain aten (loads with torch alone): exact "
                 "quantized semantics, but eager PyTorch runs them in float, slower than the float model; ")
    if int8 is None:
        return reference + "use model.onnx for int8 speed"
    if isinstance(int8, Unsupported):
        return reference + f"no torch int8 artefact ({int8.short()}); use model.onnx for int8 speed"
    return reference + "model_int8.pt runs the same model on torch's x86 int8 kernels"


def _torch_int8(ir: IR, profile: HardwareProfile | None) -> nn.Module | Unsupported:
    """The quantized model on torch's x86 int8 kernels, or why there is none (the report says which)."""
    if profile is None:
        return Unsupported(("no target profile",))
    if profile.arch is None and profile.kind == "cpu":
        return Unsupported((f"target {profile.name} does not name its arch (arch: x86_64 in the profile "
                            "would allow torch's x86 int8 kernels)",))
    if profile.kind != "cpu" or profile.arch != "x86_64" or profile.integer_only or not profile.supports("int8"):
        return Unsupported((f"target {profile.name} is not an x86_64 CPU with int8 compute",))
    return lower_to_torch_int8(ir.gm, ir.example_inputs)


_FIDELITY_CHECK = "int8 outputs no further from the original than the fake-quant model's (RMS, 1.25x)"


def _emit_torch_int8(lowered: nn.Module, ir: IR, original: nn.Module, path: Path, batches: list,
                     recipe: Recipe) -> ArtefactInfo:
    """Save ``model_int8.pt`` (TorchScript), reload it, and check its fidelity like model.onnx's.

    No sha256: the archive records some process history (see effopt.optimizer.emit.torchscript)."""
    saved = save_torchscript(lowered, path, ir.example_inputs)
    fidelity = quantized_fidelity(original, ir.gm, torch.jit.load(str(saved.path)), batches, recipe.verify.atol)
    note = str(int8_summary(lowered))  # type: ignore[arg-type]
    if saved.method != "script":
        note += " (traced: torch.jit.script rejected a float op)"
    return ArtefactInfo(
        saved.path.name, saved.path.stat().st_size, None, "torch.jit.load + " + _FIDELITY_CHECK,
        fidelity.max_drift, fidelity.passed, f"{note}; {fidelity.describe()}",
    )


_REFERENCE_CHECK = (
    "checked with onnxruntime's graph optimizations off (Q/DQ run as written): this host's int8 kernels "
    "(x86 without VNNI) saturate 8-bit weights in int16 pair sums, the target's kernels do not"
)


def _widest_weight_bits(model: nn.Module) -> int:
    """The most bits any int8-computing layer's weights use (0 for none): 8 for cortex-m7, 7 for x86-avx2."""
    return max((m.weight_quant.scheme.bits for m in model.modules()
                if isinstance(m, (QuantConv, QuantLinear)) and m.compute_dtype == "int8"), default=0)


def _onnx_note(path: Path, model: nn.Module) -> str:
    """For a quantized model: what onnxruntime actually built from the QDQ graph (int8 kernels vs float)."""
    if not _quantized(model):
        return ""
    from effopt.optimizer.lower.ort_fusion import ort_fusion_report

    return f"QDQ graph; onnxruntime's optimized graph: {ort_fusion_report(path).summary()}"


def _info(path: Path, check: str, checks: list[OutputAgreement]) -> ArtefactInfo:
    """A pt2 artefact's entry; no sha256, as torch.export.save writes a random serialization id."""
    err = max((c.max_abs_err for c in checks), default=0.0)
    ok = all(c.within_tolerance for c in checks)
    if not path.is_file():
        raise EmitError(f"{path.name} was not written")
    return ArtefactInfo(path.name, path.stat().st_size, None, check, err, ok)
