"""The whole path: recipe → IR → passes → verification → artefacts + report.

`compile` is what ``effopt compile`` and ``effopt.compile`` run. Data flows one
way; each step is a function of the previous step's output, so a failure says
which step and which input broke.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effopt.errors import EmitError, RecipeError
from effopt.hardware_profiles import HardwareProfile, load_profile
from effopt.optimizer.analysis import annotate, totals
from effopt.optimizer.data import DataSource, load_source
from effopt.optimizer.emit import atomic_dir, export_program, save_pt2, sha256
from effopt.optimizer.emit_onnx import compare_onnx, export_onnx
from effopt.optimizer.ir import IR, InputSpec
from effopt.optimizer.model_loading import load_model
from effopt.optimizer.pass_base import PassContext
from effopt.optimizer.pass_manager import PassRecord, run_passes
from effopt.optimizer.report import ArtefactInfo, Report
from effopt.optimizer.trace import trace_module
from effopt.optimizer.verify import OutputAgreement, compare, random_batches, verify
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


def _eval_data(loaded: LoadedRecipe, specs: tuple[InputSpec, ...]) -> DataSource | None:
    spec = loaded.recipe.data.eval
    return load_source(spec, loaded, specs, "eval") if spec is not None else None


def compile(  # noqa: A001 - the public verb users expect: effopt.compile(recipe)
    recipe: str | Path | Recipe | LoadedRecipe | dict,
    output_dir: str | Path | None = None,
    emit: bool = True,
) -> Result:
    """Optimize the recipe's model; write artefacts unless ``emit=False``.

    Artefacts are written even when verification fails (``report.json`` then
    says ``"status": "failed"`` and why), so a missed goal still leaves
    something to look at; callers check `Result.passed` (the CLI exits 1).
    """
    prepared = prepare(recipe)
    loaded, model = prepared.loaded, prepared.model
    r = loaded.recipe
    specs = prepared.ir.inputs
    eval_data = _eval_data(loaded, specs)
    ctx = PassContext(profile=prepared.profile, seed=r.seed)

    probe = random_batches(specs, 1, r.verify.batch, r.seed + 1)
    pass_errors: list[float] = []

    def measure(record: PassRecord) -> None:
        checks = compare(model, record.result.ir.gm, probe, "probe", r.verify.rtol, r.verify.atol)
        pass_errors.append(max((c.max_abs_err for c in checks), default=0.0))

    ir, records = run_passes(prepared.ir, loaded.passes, ctx, on_pass=measure)
    verification = verify(
        model, ir.gm, specs, r.verify.rtol, r.verify.atol, r.verify.samples, r.verify.batch, r.seed, eval_data
    )
    before = records[0].before if records else totals(ir)
    report = Report(
        recipe=loaded.label,
        model=type(model).__name__,
        target=prepared.profile.name,
        torch_version=torch.__version__,
        before=before,
        after=totals(ir),
        passes=tuple(records),
        verification=verification,
        pass_errors=tuple(pass_errors),
    )
    out = None
    if emit:
        out = Path(output_dir) if output_dir is not None else loaded.resolve(r.output.dir)
        try:
            report = _emit(out, report, ir, r)
        except EmitError as e:
            if not r.model.leaf_modules:
                raise
            raise EmitError(
                f"{e}. Note: model.leaf_modules ({', '.join(repr(m) for m in r.model.leaf_modules)}) are opaque to torch.fx only; "
                "torch.export, which writes both pt2 and ONNX, still traces into them, so their forward must be "
                "exportable (torch.where/torch.cond instead of Python if on tensor values), or set output.formats: []"
            ) from e
    return Result(report, ir, model, out)


def _emit(out: Path, report: Report, ir: IR, recipe: Recipe) -> Report:
    """Write the artefacts named in ``output.formats`` and the report, all or nothing."""
    artefacts: list[ArtefactInfo] = []
    check_batches = random_batches(ir.inputs, 2, recipe.verify.batch, recipe.seed + 2)
    with atomic_dir(out) as tmp:
        if "pt2" in recipe.output.formats:
            path = save_pt2(export_program(ir.gm, ir.inputs, ir.example_inputs), tmp / "model.pt2")
            reloaded = torch.export.load(str(path)).module()
            checks = compare(ir.gm, reloaded, check_batches, "pt2 reload", recipe.verify.rtol, recipe.verify.atol)
            artefacts.append(_info(path, "torch.export.load + outputs vs optimized model", checks))
        if "onnx" in recipe.output.formats:
            path = export_onnx(ir.gm, ir.example_inputs, [s.name for s in ir.inputs], [s.dynamic_batch for s in ir.inputs], tmp / "model.onnx")
            agreement = compare_onnx(path, ir.gm, check_batches, recipe.verify.rtol, max(recipe.verify.atol, 1e-5))
            artefacts.append(
                ArtefactInfo("model.onnx", path.stat().st_size, sha256(path),
                             "onnx.checker + onnxruntime outputs vs optimized model",
                             agreement.max_abs_err, agreement.passed)
            )
        report = Report(**{**report.__dict__, "artefacts": tuple(artefacts)})
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.to_markdown())
    return report


def _info(path: Path, check: str, checks: list[OutputAgreement]) -> ArtefactInfo:
    """A pt2 artefact's entry; no sha256, as torch.export.save writes a random serialization id."""
    err = max((c.max_abs_err for c in checks), default=0.0)
    ok = all(c.within_tolerance for c in checks)
    if not path.is_file():
        raise EmitError(f"{path.name} was not written")
    return ArtefactInfo(path.name, path.stat().st_size, None, check, err, ok)
