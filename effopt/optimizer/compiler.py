"""The whole path: recipe → IR → passes → verification → artefacts + report.

`compile` is what ``effopt compile`` and ``effopt.compile`` run. Data flows one
way; each step is a function of the previous step's output, so a failure says
which step and which input broke.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from effopt.errors import EmitError, FxTraceError, RecipeError, TraceError
from effopt.hardware_profiles import HardwareProfile, load_profile
from effopt.optimizer.ir.analysis import annotate, totals
from effopt.optimizer.artefacts import emit_artefacts, lower_for_integer_target
from effopt.optimizer.emit.writer import check_output_dir
from effopt.optimizer.ir.cost_model import ModelCost, estimate
from effopt.optimizer.frontend.data import DataSource, load_source
from effopt.optimizer.measure.evaluate import Task, aoti_callable, evaluate, onnx_callable
from effopt.optimizer.train.finetune import SERVICE_KEY as FINETUNE_SERVICE
from effopt.optimizer.train.finetune import FineTuner
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.frontend.model import load_model
from effopt.passes.base import PassContext
from effopt.passes.manager import PassRecord, run_passes
from effopt.passes.planner import make_plan
from effopt.optimizer.report.report import GoalCheck, PlanLine, Prediction, Report, StageEvaluation
from effopt.optimizer.emit.pt2 import export_args
from effopt.optimizer.emit.quiet import first_line, quiet_third_party
from effopt.optimizer.ir.trace import as_graph_module, raise_if_interrupted, trace_module
from effopt.optimizer.measure.verify import compare, random_batches, verify
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
    warnings: tuple[str, ...] = ()  # for the report, e.g. that torch.export traced the model because fx could not


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
    """Any accepted form of a recipe, loaded; anything else (``effopt.compile(42)``) is a `RecipeError`."""
    if isinstance(recipe, LoadedRecipe):
        return recipe
    if isinstance(recipe, (Recipe, dict)):
        return parse_recipe(recipe)
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(
            f"recipe: got {type(recipe).__name__} {recipe!r:.60}; pass a recipe file path, a dict with the recipe's "
            "content, or an effopt.Recipe"
        )
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
    return trace_ir(model, loaded)[0]


def trace_ir(model: nn.Module, loaded: LoadedRecipe) -> tuple[IR, tuple[str, ...]]:
    """`build_ir`, plus warnings for the report (the torch.export fallback, see `_graph_of`)."""
    recipe = loaded.recipe
    specs = input_specs(recipe)
    g = torch.Generator().manual_seed(recipe.seed)
    examples = tuple(s.example(g) for s in specs)
    gm, warnings = _graph_of(model, loaded, specs, examples)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(specs):
        raise RecipeError(
            f"{loaded.label}: inputs: the recipe declares {len(specs)} input(s) "
            f"({', '.join(s.name for s in specs)}) but the model's forward takes {len(placeholders)} "
            f"({', '.join(str(p.target) for p in placeholders)})"
        )
    return annotate(IR(gm, specs, examples)), warnings


def _graph_of(
    model: nn.Module, loaded: LoadedRecipe, specs: tuple[InputSpec, ...], examples: tuple[torch.Tensor, ...]
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """The model's graph: the exported program's, fx's, or torch.export's when fx cannot trace it.

    fx keeps module structure (``layer1.conv``) and is tried first; forward parameters
    beyond the declared inputs are bound to their defaults. When fx still fails (e.g.
    ``if x.dim() == 3:`` in forward), torch.export traces the aten-level graph, the
    same path as ``model.exported``, and the report says so. Only when both fail is it
    a `TraceError`, with both reasons and the fix that fits.
    """
    recipe = loaded.recipe
    if recipe.model.exported is not None:
        return copy.deepcopy(model), ()
    try:
        return trace_module(model, recipe.model.leaf_modules, n_inputs=len(specs)), ()
    except FxTraceError as fx_error:
        args, dynamic = export_args(specs, examples)
        try:
            with quiet_third_party():
                program = torch.export.export(model, args, dynamic_shapes=dynamic)
            # a copy, as for model.exported: passes edit it, and the copy drops module()'s refusal of .eval()
            gm = copy.deepcopy(as_graph_module(program))
        except Exception as export_error:
            raise_if_interrupted(export_error)
            text = str(export_error)
            raise TraceError(
                f"{loaded.label}: model: {fx_error.reason()}; torch.export, tried next, failed too: "
                f"{type(export_error).__name__}: {first_line(text)}. Fix: {_both_failed_hint(fx_error, text)}"
            ) from export_error
        line = os.path.basename(fx_error.line) if fx_error.line else None  # no absolute paths in the report
        return gm, (f"traced with torch.export because fx could not: {fx_error.reason(line)}",)


def _both_failed_hint(fx_error: FxTraceError, export_text: str) -> str:
    """The fix for a model neither tracer takes, chosen by what torch.export tripped on."""
    if "Constraints violated" in export_text or "specializ" in export_text:
        return ("torch.export needs a fixed batch for this forward: set dynamic_batch: false on the inputs (with "
                "the batch you need as shape[0]), or make the forward work for any batch size")
    if "data-dependent" in export_text or "DataDependent" in export_text:
        return (f"{fx_error.hint} (Python `if` on tensor values stops both tracers; torch.where or torch.cond "
                "works for both)")
    return fx_error.hint


def prepare(recipe: str | Path | Recipe | LoadedRecipe | dict, target: str | None = None) -> Prepared:
    """Load the recipe, its target profile and model, and build the annotated IR."""
    loaded = as_loaded(recipe)
    profile = load_profile(target or loaded.recipe.target, base_dir=loaded.base_dir)
    model = load_model(loaded)
    ir, warnings = trace_ir(model, loaded)
    return Prepared(loaded, profile, model, ir, warnings)


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
    force: bool = False,
) -> Result:
    """Optimize the recipe's model; write artefacts unless ``emit=False``.

    Artefacts are written even when verification or a goal fails (``report.json``
    then says ``"status": "failed"`` and why), so a missed goal still leaves
    something to look at; callers check `Result.passed` (the CLI exits 1).

    The output folder is checked before anything runs (`check_output_dir`): effopt
    replaces only a folder it wrote itself, so ``output_dir="."`` or a folder of
    the user's files raises `EmitError` at once; ``force=True`` writes effopt's
    files into such a folder and removes nothing effopt did not write.
    """
    loaded = as_loaded(recipe)
    out = None
    if emit:
        out = Path(output_dir) if output_dir is not None else loaded.resolve(loaded.recipe.output.dir)
        check_output_dir(out, force)
    prepared = prepare(loaded)
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
    # the model before quantize, for model_float.onnx (a float artefact to deploy where int8 does not pay off)
    wants_float = emit and "onnx" in r.output.formats and not profile.integer_only
    quantize_at = next((i for i, p in enumerate(passes) if p.name == "quantize"), None) if wants_float else None
    before_quantize = [copy.deepcopy(prepared.ir)] if quantize_at == 0 else []
    evaluations: list[StageEvaluation] = []
    if eval_data is not None and task is not None:
        evaluations.append(StageEvaluation("original", evaluate(model, eval_data, task, reference=model)))

    def observe(record: PassRecord) -> None:
        checks = compare(model, record.result.ir.gm, probe, "probe", r.verify.rtol, r.verify.atol)
        pass_errors.append(max((c.max_abs_err for c in checks), default=0.0))
        if quantize_at is not None and len(pass_errors) == quantize_at:
            before_quantize.append(copy.deepcopy(record.result.ir))
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
        warnings=prepared.warnings,
    )
    if out is not None:
        try:
            report = emit_artefacts(
                out, report, ir, r, model, integer.program if integer is not None else None, profile, force=force,
                float_ir=before_quantize[0] if before_quantize else None,
            )
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
    """Score the original model and each emitted artefact on ``data.eval``.

    The artefacts, in this order when present: model.pt2, model_aoti.pt2, model_int8.pt, model.onnx, model_float.onnx.

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
    aoti_path = folder / "model_aoti.pt2"  # formats: [aoti]; fed contiguous copies (see aoti_callable)
    if aoti_path.is_file():
        stages.append(StageEvaluation(
            f"{aoti_path.name} (AOTInductor)", evaluate(aoti_callable(aoti_path), eval_data, task, reference=model)
        ))
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
    float_path = folder / "model_float.onnx"  # the float fallback a quantized compile writes (see deploy)
    if float_path.is_file():
        stages.append(StageEvaluation(
            f"{float_path.name} (onnxruntime, before quantize)",
            evaluate(onnx_callable(float_path), eval_data, task, reference=model),
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
    if eval_data is not None:
        services["eval_inputs"] = eval_data  # held-out inputs, e.g. quantize's min_decision_agreement
    if eval_data is not None and task is not None and r.accuracy_budget is not None:
        services["accuracy_budget"] = r.accuracy_budget
        services["score"] = lambda m: evaluate(m, eval_data, task, reference=original).headline
    if train is not None:
        tune_eval = eval_data if (eval_data is not None and (eval_data.has_labels or task != "classification")) else None
        # the recipe's finetune: block is every fine-tuning pass's default (FineTuner.defaults)
        services[FINETUNE_SERVICE] = FineTuner(train, tune_eval, task or "generic", r.seed, defaults=r.finetune)
    return PassContext(profile=profile, seed=r.seed, calibration=calibration, services=services)
