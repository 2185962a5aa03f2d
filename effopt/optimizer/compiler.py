"""The whole path: recipe → IR → passes → verification → artefacts + report.

`compile` is what ``effopt compile`` and ``effopt.compile`` run. Data flows one
way; each step is a function of the previous step's output, so a failure says
which step and which input broke.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effopt.errors import EmitError, PassError, RecipeError
from effopt.hardware_profiles import HardwareProfile, load_profile
from effopt.optimizer.analysis import annotate, totals
from effopt.optimizer.c_header import write_c_header
from effopt.optimizer.cost_model import ModelCost, estimate
from effopt.optimizer.data import DataSource, load_source
from effopt.optimizer.emit import atomic_dir, export_program, save_pt2, sha256
from effopt.optimizer.emit_onnx import compare_onnx, export_onnx
from effopt.optimizer.evaluate import Task, evaluate, onnx_callable
from effopt.optimizer.finetune import SERVICE_KEY as FINETUNE_SERVICE
from effopt.optimizer.finetune import FineTuner
from effopt.optimizer.integer_lowering import IntegerExecutor, IntegerProgram, lower_to_integer, reference_integer_model
from effopt.optimizer.ir import IR, InputSpec
from effopt.optimizer.model_loading import load_model
from effopt.optimizer.pass_base import PassContext
from effopt.optimizer.pass_manager import PassRecord, run_passes
from effopt.optimizer.planner import make_plan
from effopt.optimizer.quantization import FakeQuant, freeze_weights
from effopt.optimizer.report import ArtefactInfo, GoalCheck, PlanLine, Prediction, Report, StageEvaluation
from effopt.optimizer.torch_int8 import Unsupported, int8_summary, lower_to_torch_int8, save_torchscript
from effopt.optimizer.trace import trace_module
from effopt.optimizer.verify import OutputAgreement, compare, random_batches, verify
from effopt.passes import REGISTRY
from effopt.recipes.loading import LoadedRecipe, load_recipe, parse_recipe
from effopt.recipes.schema import Recipe


@dataclass(frozen=True)
class Prepared:
    """A loaded recipe with its model, target and IR: what `inspect` shows and `compile` starts from."""

    loaded: LoadedRecipe
    profile: HardwareProfile
    model: nn.Module
    ir: IR


@dataclass(frozen=True)
class Result:
    """What `compile` returns: the report, the optimized IR, and where artefacts went."""

    report: Report
    ir: IR
    original: nn.Module
    output_dir: Path | None

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def model(self) -> nn.Module:
        """The optimized model (a GraphModule)."""
        return self.ir.gm


def as_loaded(recipe: str | Path | Recipe | LoadedRecipe | dict) -> LoadedRecipe:
    if isinstance(recipe, LoadedRecipe):
        return recipe
    if isinstance(recipe, (Recipe, dict)):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def input_specs(recipe: Recipe) -> tuple[InputSpec, ...]:
    return tuple(
        InputSpec(
            i.name, tuple(i.shape), i.dtype, i.dynamic_batch,
            i.range[0] if i.range else None, i.range[1] if i.range else None,
        )
        for i in recipe.inputs
    )


def build_ir(model: nn.Module, loaded: LoadedRecipe) -> IR:
    """Trace (or take the exported graph of) ``model`` and annotate it on seeded example inputs."""
    recipe = loaded.recipe
    specs = input_specs(recipe)
    if recipe.model.exported is not None:
        gm = copy.deepcopy(model)
    else:
        gm = trace_module(model, recipe.model.leaf_modules)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(specs):
        raise RecipeError(
            f"{loaded.label}: inputs: the recipe declares {len(specs)} input(s) "
            f"({', '.join(s.name for s in specs)}) but the model's forward takes {len(placeholders)} "
            f"({', '.join(str(p.target) for p in placeholders)})"
        )
    g = torch.Generator().manual_seed(recipe.seed)
    examples = tuple(s.example(g) for s in specs)
    return annotate(IR(gm, specs, examples))


def prepare(recipe: str | Path | Recipe | LoadedRecipe | dict, target: str | None = None) -> Prepared:
    """Load the recipe, its target profile and model, and build the annotated IR."""
    loaded = as_loaded(recipe)
    profile = load_profile(target or loaded.recipe.target, base_dir=loaded.base_dir)
    model = load_model(loaded)
    return Prepared(loaded, profile, model, build_ir(model, loaded))


def _source(loaded: LoadedRecipe, specs: tuple[InputSpec, ...], role: str) -> DataSource | None:
    spec = getattr(loaded.recipe.data, role)
    return load_source(spec, loaded, specs, role) if spec is not None else None


def resolve_task(task: str, eval_data: DataSource | None) -> Task | None:
    """``auto`` → classification when the eval data has labels, else generic; None without eval data."""
    if eval_data is None:
        return None
    if task == "auto":
        return "classification" if eval_data.has_labels else "generic"
    return task  # type: ignore[return-value]


def _check_goal_inputs(loaded: LoadedRecipe, eval_data: DataSource | None) -> None:
    if loaded.recipe.accuracy_budget is not None and eval_data is None:
        raise RecipeError(
            f"{loaded.label}: max_accuracy_drop needs data to measure accuracy on; add data.eval "
            "(e.g. {source: sklearn-digits:test}) or remove the goal"
        )


def _predict(before: ModelCost, ir: IR, profile: HardwareProfile) -> Prediction:
    after = estimate(ir, profile)
    problems = tuple(c.reason or c.node for c in after.unsupported[:5])
    if after.memory_reason:
        problems += (after.memory_reason,)
    return Prediction(profile.name, after.batch, before.total_s, after.total_s, after.runnable, problems)


def _goal_checks(recipe: Recipe, prediction: Prediction, evaluations: list[StageEvaluation]) -> tuple[GoalCheck, ...]:
    """Every goal the recipe sets, measured; plus 'runs on the target', which is always a goal."""
    checks = [GoalCheck(
        "runs_on_target", 1.0, 1.0 if prediction.runnable_after else 0.0, prediction.runnable_after,
        f"the optimized model runs on {prediction.profile}" if prediction.runnable_after
        else f"cannot run on {prediction.profile}: " + "; ".join(prediction.problems_after),
    )]
    g = recipe.goal
    if g.latency_budget_ms is not None:
        ms = prediction.after_s * 1e3
        checks.append(GoalCheck(
            "latency_budget_ms", g.latency_budget_ms, ms, ms <= g.latency_budget_ms,
            f"predicted {ms:.4g} ms on {prediction.profile} vs budget {g.latency_budget_ms:g} ms",
        ))
    if g.min_speedup is not None:
        checks.append(GoalCheck(
            "min_speedup", g.min_speedup, prediction.speedup, prediction.speedup >= g.min_speedup,
            f"predicted speedup {prediction.speedup:.3f}× on {prediction.profile} vs required {g.min_speedup:g}×",
        ))
    budget = recipe.accuracy_budget
    if budget is not None and evaluations:
        first, last = evaluations[0].evaluation, evaluations[-1].evaluation
        drop = first.headline - last.headline
        checks.append(GoalCheck(
            "max_accuracy_drop", budget, drop, drop <= budget + 1e-12,
            f"{first.headline_name} {first.headline:.4f} → {last.headline:.4f} on {first.dataset}: drop {drop:.4f} "
            f"vs allowed {budget:g}",
        ))
    return tuple(checks)


def compile(  # noqa: A001 - the public verb users expect: effopt.compile(recipe)
    recipe: str | Path | Recipe | LoadedRecipe | dict,
    output_dir: str | Path | None = None,
    emit: bool = True,
) -> Result:
    """Optimize the recipe's model; write artefacts unless ``emit=False``.

    Artefacts are written even when verification or a goal fails (``report.json``
    then says ``"status": "failed"`` and why), so a missed goal still leaves
    something to look at; callers check `Result.passed` (the CLI exits 1).
    """
    prepared = prepare(recipe)
    loaded, model, profile = prepared.loaded, prepared.model, prepared.profile
    r = loaded.recipe
    specs = prepared.ir.inputs
    eval_data = _source(loaded, specs, "eval")
    _check_goal_inputs(loaded, eval_data)
    task = resolve_task(r.task, eval_data)
    ctx = _context(loaded, specs, profile, eval_data, task, model)
    cost_before = estimate(prepared.ir, profile)

    passes, plan = loaded.passes, ()
    if r.auto:
        made = make_plan(prepared.ir, profile, loaded.passes, [cls() for cls in REGISTRY], ctx, r.accuracy_budget)
        passes, plan = made.passes, tuple(PlanLine(s.name, s.chosen, s.reason) for s in made.steps)

    probe = random_batches(specs, 1, r.verify.batch, r.seed + 1)
    pass_errors: list[float] = []
    evaluations: list[StageEvaluation] = []
    if eval_data is not None and task is not None:
        evaluations.append(StageEvaluation("original", evaluate(model, eval_data, task, reference=model)))

    def observe(record: PassRecord) -> None:
        checks = compare(model, record.result.ir.gm, probe, "probe", r.verify.rtol, r.verify.atol)
        pass_errors.append(max((c.max_abs_err for c in checks), default=0.0))
        if eval_data is not None and task is not None:
            stage = StageEvaluation(f"after {record.name}", evaluate(record.result.ir.gm, eval_data, task, reference=model))
            evaluations.append(stage)

    ir, records = run_passes(prepared.ir, passes, ctx, on_pass=observe)
    verification = verify(
        model, ir.gm, specs, r.verify.rtol, r.verify.atol, r.verify.samples, r.verify.batch, r.seed, eval_data
    )
    prediction = _predict(cost_before, ir, profile)
    integer = None
    if profile.integer_only and prediction.runnable_after:
        integer = lower_for_integer_target(ir, profile, model, eval_data, task, r.seed)
        if integer.evaluation is not None:
            evaluations.append(integer.evaluation)
    report = Report(
        recipe=loaded.label,
        model=type(model).__name__,
        target=profile.name,
        torch_version=torch.__version__,
        before=records[0].before if records else totals(ir),
        after=totals(ir),
        passes=tuple(records),
        verification=verification,
        pass_errors=tuple(pass_errors),
        inputs=specs,
        task=task,
        evaluations=tuple(evaluations),
        prediction=prediction,
        plan=plan,
        goals=_goal_checks(r, prediction, evaluations) + ((integer.goal,) if integer is not None else ()),
    )
    out = None
    if emit:
        out = Path(output_dir) if output_dir is not None else loaded.resolve(r.output.dir)
        try:
            report = _emit(out, report, ir, r, integer.program if integer is not None else None, profile)
        except EmitError as e:
            if not r.model.leaf_modules:
                raise
            raise EmitError(
                f"{e}. Note: model.leaf_modules ({', '.join(repr(m) for m in r.model.leaf_modules)}) are opaque to torch.fx only; "
                "torch.export, which writes both pt2 and ONNX, still traces into them, so their forward must be "
                "exportable (torch.where/torch.cond instead of Python if on tensor values), or set output.formats: []"
            ) from e
    return Result(report, ir, model, out)


def evaluate_artefacts(
    recipe: str | Path | Recipe | LoadedRecipe | dict, artefact_dir: str | Path | None = None
) -> list[StageEvaluation]:
    """Score the original model and each emitted artefact (model.pt2, model_int8.pt, model.onnx) on ``data.eval``.

    ``artefact_dir`` defaults to the recipe's ``output.dir``; artefacts that are not
    there are left out. Agreement is always measured against the original model.
    """
    loaded = as_loaded(recipe)
    model = load_model(loaded)
    specs = input_specs(loaded.recipe)
    eval_data = _source(loaded, specs, "eval")
    if eval_data is None:
        raise RecipeError(f"{loaded.label}: data.eval is needed to evaluate; add e.g. data: {{eval: sklearn-digits:test}}")
    task = resolve_task(loaded.recipe.task, eval_data)
    assert task is not None  # eval_data is not None
    folder = Path(artefact_dir) if artefact_dir is not None else loaded.resolve(loaded.recipe.output.dir)
    if artefact_dir is not None and not folder.is_dir():
        raise RecipeError(f"--artifact {folder}: no such folder; run effopt compile first")
    stages = [StageEvaluation("original (eager PyTorch)", evaluate(model, eval_data, task, reference=model))]
    pt2, onnx_path = folder / "model.pt2", folder / "model.onnx"
    if pt2.is_file():
        program = torch.export.load(str(pt2)).module()
        stages.append(StageEvaluation(f"{pt2.name} (torch.export)", evaluate(program, eval_data, task, reference=model)))
    int8_path = folder / "model_int8.pt"
    if int8_path.is_file():
        int8_module = torch.jit.load(str(int8_path))
        stages.append(StageEvaluation(
            f"{int8_path.name} (torch x86 int8, TorchScript)", evaluate(int8_module, eval_data, task, reference=model)
        ))
    if onnx_path.is_file():
        stages.append(StageEvaluation(
            f"{onnx_path.name} (onnxruntime)", evaluate(onnx_callable(onnx_path), eval_data, task, reference=model)
        ))
    return stages


def _context(
    loaded: LoadedRecipe, specs: tuple[InputSpec, ...], profile: HardwareProfile, eval_data: DataSource | None,
    task: Task | None, original: nn.Module,
) -> PassContext:
    """What passes may use: the target, calibration data, and the fine-tuning service when there is training data."""
    r = loaded.recipe
    train = _source(loaded, specs, "train")
    calibration = _source(loaded, specs, "calibration") or train or eval_data
    services: dict[str, object] = {}
    if eval_data is not None and task is not None and r.accuracy_budget is not None:
        services["accuracy_budget"] = r.accuracy_budget
        services["score"] = lambda m: evaluate(m, eval_data, task, reference=original).headline
    if train is not None:
        tune_eval = eval_data if (eval_data is not None and (eval_data.has_labels or task != "classification")) else None
        services[FINETUNE_SERVICE] = FineTuner(train, tune_eval, task or "generic", r.seed)
        services["finetune_config"] = r.finetune
    return PassContext(profile=profile, seed=r.seed, calibration=calibration, services=services)


QUANTIZED_ARTEFACT_MAX_REL_ERR = 0.05
"""How far a quantized artefact may drift from torch's fake-quant model, relative to the output's range:
onnxruntime's int8 kernels requantize with their own rounding at every layer, and in a deep network
(ResNet-18: 0.05–0.25 abs on logits of range ~5) those one-step differences add up."""


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
    except PassError as e:
        return IntegerLowering(None, GoalCheck("integer_program", 1.0, 0.0, False, str(e)), None)
    executor, reference = IntegerExecutor(program), reference_integer_model(program)
    mismatches = 0
    for batch in random_batches(ir.inputs, 2, 8, seed + 3):
        codes = program.quantize_inputs(*batch)
        ours = executor.run(*codes)
        with torch.no_grad():
            theirs = reference(*(torch.from_numpy(c) for c in codes))
        theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
        mismatches += sum(int((a != np.asarray(b)).sum()) for a, b in zip(ours, theirs))
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


def _emit(out: Path, report: Report, ir: IR, recipe: Recipe, program: IntegerProgram | None = None,
          profile: HardwareProfile | None = None) -> Report:
    """Write the artefacts named in ``output.formats`` (and an int-only target's C header) and the report, all or nothing."""
    artefacts: list[ArtefactInfo] = []
    check_batches = random_batches(ir.inputs, 2, recipe.verify.batch, recipe.seed + 2)
    model = freeze_weights(copy.deepcopy(ir.gm)).eval()  # quantized layers store int8 weights in artefacts
    quantized = _quantized(model)
    with atomic_dir(out) as tmp:
        if "pt2" in recipe.output.formats:
            path = save_pt2(export_program(model, ir.inputs, ir.example_inputs), tmp / "model.pt2")
            reloaded = torch.export.load(str(path)).module()
            checks = compare(ir.gm, reloaded, check_batches, "pt2 reload", recipe.verify.rtol, recipe.verify.atol)
            int8 = _torch_int8(ir, profile) if quantized else None
            int8_info = None
            if int8 is not None and not isinstance(int8, Unsupported):
                try:
                    int8_info = _emit_torch_int8(int8, ir, tmp / "model_int8.pt", check_batches, recipe)
                except EmitError as e:  # TorchScript refused it: the pt2 stays the PyTorch artefact
                    int8 = Unsupported((str(e),))
            note = _pt2_note(model, int8)
            artefacts.append(replace(_info(path, "torch.export.load + outputs vs optimized model", checks), note=note))
            artefacts += [int8_info] if int8_info is not None else []
        if "onnx" in recipe.output.formats:
            path = export_onnx(model, ir.example_inputs, [s.name for s in ir.inputs], [s.dynamic_batch for s in ir.inputs], tmp / "model.onnx")
            agreement = compare_onnx(path, ir.gm, check_batches, recipe.verify.rtol, max(recipe.verify.atol, 1e-5))
            ok = agreement.max_rel_err <= QUANTIZED_ARTEFACT_MAX_REL_ERR if quantized else agreement.passed
            check = ("onnx.checker + onnxruntime int8 outputs within 5% of the output range of the fake-quant model"
                     if quantized else "onnx.checker + onnxruntime outputs vs optimized model")
            artefacts.append(
                ArtefactInfo("model.onnx", path.stat().st_size, sha256(path), check,
                             agreement.max_abs_err, ok, _onnx_note(path, model))
            )
        if program is not None:
            header = tmp / "model.h"
            header.write_text(write_c_header(program, "effopt_model"))
            artefacts.append(ArtefactInfo(
                "model.h", header.stat().st_size, sha256(header), "integer program checked bit-exact (see goals)",
                None, True, f"int8 weights, int32 biases, fixed-point multipliers and shifts for {len(program.ops)} ops",
            ))
        report = replace(report, artefacts=tuple(artefacts))
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.to_markdown())
    return report


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuant) for m in model.modules())


def _pt2_note(model: nn.Module, int8: nn.Module | Unsupported | None = None) -> str:
    if not _quantized(model):
        return ""
    reference = ("int8 weights with quantize/dequantize reference ops (torch.ops.quantized_decomposed): exact "
                 "quantized semantics, but eager PyTorch runs them in float, slower than the float model; ")
    if int8 is None:
        return reference + "use model.onnx for int8 speed"
    if isinstance(int8, Unsupported):
        return reference + f"no torch int8 artefact ({int8.short()}); use model.onnx for int8 speed"
    return reference + "model_int8.pt runs the same model on torch's x86 int8 kernels"


def _x86_cpu(profile: HardwareProfile) -> bool:
    """Whether the target is an x86 CPU (the only one torch's int8 kernels here are built for).

    Profiles carry no ISA field yet: the shipped x86 profiles are named ``x86-*``, and a
    measured ``host`` profile is this machine."""
    if profile.kind != "cpu":
        return False
    if profile.name == "host":
        return platform.machine().lower() in ("x86_64", "amd64")
    return profile.name.startswith("x86")


def _torch_int8(ir: IR, profile: HardwareProfile | None) -> nn.Module | Unsupported:
    """The quantized model on torch's x86 int8 kernels, or why there is none (the report says which)."""
    if profile is None or not _x86_cpu(profile) or profile.integer_only or not profile.supports("int8"):
        name = profile.name if profile is not None else "unknown"
        return Unsupported((f"target {name} is not an x86 CPU with int8 compute",))
    return lower_to_torch_int8(ir.gm, ir.example_inputs)


def _emit_torch_int8(lowered: nn.Module, ir: IR, path: Path, check_batches: list, recipe: Recipe) -> ArtefactInfo:
    """Save ``model_int8.pt`` (TorchScript), reload it, and check it against the fake-quant model like model.onnx.

    No sha256: the archive records some process history (see effopt.optimizer.torch_int8)."""
    saved = save_torchscript(lowered, path, ir.example_inputs)
    reloaded = torch.jit.load(str(saved.path))
    checks = compare(ir.gm, reloaded, check_batches, "int8 TorchScript reload", recipe.verify.rtol,
                     max(recipe.verify.atol, 1e-5))
    worst_rel = max((c.max_rel_err for c in checks), default=0.0)
    note = str(int8_summary(lowered))  # type: ignore[arg-type]
    if saved.method != "script":
        note += " (traced: torch.jit.script rejected a float op)"
    return ArtefactInfo(
        saved.path.name, saved.path.stat().st_size, None,
        "torch.jit.load + torch int8 outputs within 5% of the output range of the fake-quant model",
        max((c.max_abs_err for c in checks), default=0.0), worst_rel <= QUANTIZED_ARTEFACT_MAX_REL_ERR, note,
    )


def _onnx_note(path: Path, model: nn.Module) -> str:
    """For a quantized model: what onnxruntime actually built from the QDQ graph (int8 kernels vs float)."""
    if not _quantized(model):
        return ""
    from effopt.optimizer.onnx_quant import ort_fusion_report

    return f"QDQ graph; onnxruntime's optimized graph: {ort_fusion_report(path).summary()}"


def _info(path: Path, check: str, checks: list[OutputAgreement]) -> ArtefactInfo:
    """A pt2 artefact's entry; no sha256, as torch.export.save writes a random serialization id."""
    err = max((c.max_abs_err for c in checks), default=0.0)
    ok = all(c.within_tolerance for c in checks)
    if not path.is_file():
        raise EmitError(f"{path.name} was not written")
    return ArtefactInfo(path.name, path.stat().st_size, None, check, err, ok)
