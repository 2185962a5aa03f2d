"""Rewrite K×K convs as depthwise-separable convs, initialised from the trained weights.

A ``Conv2d(C_in, C_out, K, groups=1)`` becomes a depthwise ``Conv2d(C_in, C_in·m, K,
groups=C_in)`` followed by a pointwise ``Conv2d(C_in·m, C_out, 1)``. The weights are not
thrown away: per input channel, the slice ``W[:, c]`` is replaced by its best rank-m
approximation (Network Decoupling, `effopt.passes.factorization.separable_init`), so at
m = K² the rewrite is exact and the error falls with m. ``refit: true`` then refits the
pointwise weights by least squares so the layer's *output* on calibration data is matched,
and ``finetune:`` recovers the rest by distillation from the original model through the
fine-tuning service (the recipe's ``finetune:`` block applies).

Worked example (the seed post's): a 3×3 conv, 64 → 128 channels, on a 112×112 map costs
112·112·128·64·9 = 924,844,032 MACs; at m = 1 the depthwise conv costs 112·112·64·9 =
7,225,344 and the pointwise 112·112·64·128 = 102,760,448: 8.4× fewer MACs. Whether that is
faster depends on the target: the depthwise conv is memory-bound (priced by bytes by the
roofline), and each extra op pays the target's per-op overhead, so ``apply: profitable`` (the
default) rewrites a layer only where the cost model predicts a gain on ``ctx.profile``. On a
GPU profile the rewrite often loses; ``apply: all`` rewrites every eligible layer anyway.

Stride, padding (including ``padding_mode``), dilation and bias are kept (the depthwise conv
takes the geometry, the pointwise conv the bias). A BatchNorm after the conv is either folded
first (``fold_batchnorm`` runs before this pass when both are listed) or stays after the
pointwise conv. The report shows, per layer, m, the relative kernel error, the predicted time
before and after, and a `Skip` with the reason for every conv left alone.

This module also holds what `low_rank` shares with it (layer filter, pricing, surgery,
recovery), so both passes read the same way.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.analysis import annotate, canonical_op
from effopt.optimizer.ir.core import IR, InputSpec, facts
from effopt.optimizer.ir.lift import LiftResult, lift_functional_layers
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.quant.schemes import QuantConv
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip
from effopt.passes.factorization import LeastSquares, multiplier_for_energy, separable_init
from effopt.passes.finetuning import FineTuneConfig

Apply = Literal["profitable", "all"]

# -- options shared with low_rank -------------------------------------------------------------


class LayerFilter(PassOptions):
    """Which layers a rewrite considers, by fnmatch patterns on node names or module paths.

    ``{include: ["features.*"], exclude: ["features.0"]}`` considers every conv under
    ``features`` except the first; an empty ``include`` means every layer.
    """

    include: tuple[str, ...] = Field((), description="patterns of node names or module paths to consider (empty: all)")
    exclude: tuple[str, ...] = Field(
        (), description="patterns of node names or module paths to leave alone (wins over include)")

    def __repr__(self) -> str:  # `effopt passes` prints the default
        return "{" + ", ".join(f"{k}: {list(getattr(self, k))}" for k in sorted(self.model_fields_set)) + "}"

    def why_not(self, names: Sequence[str]) -> str | None:
        """Why a layer known by ``names`` (node name, module path, name before lifting) is filtered out."""
        for pattern in self.exclude:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return f"excluded by layers.exclude ({pattern!r})"
        if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return f"not matched by layers.include ({', '.join(map(repr, self.include))})"
        return None


class RecoveryOptions(FineTuneConfig):
    """Recovery fine-tuning after a factorization: a run of the fine-tuning service (see `FineTuneConfig`).

    The student is the rewritten model, the teacher the model before this pass. A field set here
    overrides the recipe's ``finetune:`` block; one left out comes from that block if it sets it,
    else from `FineTuneConfig`'s defaults (`effopt.passes.finetuning.with_defaults`).
    """

    def __repr__(self) -> str:  # `effopt passes` prints the default: show only what is set
        return "{" + ", ".join(f"{k}: {getattr(self, k)!r}" for k in sorted(self.model_fields_set)) + "}"


FINETUNE_DESCRIPTION = (
    "recovery fine-tuning with distillation from the model before this pass (needs data.train; without it the "
    "rewritten layers keep their initialisation and the report says so); null: no fine-tuning"
)


class SeparableConvOptions(PassOptions):
    """Options of the separable_conv pass."""

    multiplier: PositiveInt | Literal["auto"] = Field(
        "auto", description="depth multiplier m (depthwise kernels per input channel, at most K²), or auto: per layer, "
        "the smallest m that keeps `energy` of the kernel's squared norm")
    energy: float = Field(0.9, gt=0, le=1, description="multiplier: auto keeps at least this fraction of ‖W‖² per layer")
    max_error: float | None = Field(
        None, gt=0,
        description="leave a layer alone when its relative kernel error ‖W − Ŵ‖/‖W‖ is above this (null: no limit)")
    apply: Apply = Field(
        "profitable", description="profitable: only where the cost model predicts a gain on the target; all: every "
        "eligible layer (e.g. to check exactness at multiplier K²)")
    refit: bool = Field(False, description="refit the pointwise weights by least squares on calibration data so the "
                        "layer's output, not its kernel, is matched")
    calibration_batches: int = Field(8, ge=1, description="calibration batches the refit reads at most")
    layers: LayerFilter = Field(LayerFilter(), description="include / exclude patterns (node names or module paths)")
    finetune: RecoveryOptions | None = Field(RecoveryOptions(), description=FINETUNE_DESCRIPTION)

    @model_validator(mode="after")
    def _consistent(self) -> SeparableConvOptions:
        if "energy" in self.model_fields_set and self.multiplier != "auto":
            raise ValueError(f"energy applies to multiplier: auto only (got multiplier: {self.multiplier})")
        return self


# -- pricing, surgery, recovery (shared with low_rank) ----------------------------------------


@dataclass(frozen=True)
class Priced:
    """Predicted seconds of the original layer and of its replacement on one profile."""

    profile: str
    before_s: float
    after_s: float

    @property
    def gain(self) -> bool:
        return self.after_s < self.before_s


def price_replacement(node: fx.Node, replacement: nn.Module, profile: Any) -> Priced:
    """Price ``node`` and the chain that would replace it with the same analysis and cost model.

    The replacement is traced and annotated alone, on an input of the node's shape, so its
    nodes get the facts they would get in the model (the cost of a node depends only on its
    own facts) without copying the whole IR. Example (x86-avx2, batch 1): a 3×3 conv 64 → 128
    on 16×16 is compute-bound at ~51 µs; its m = 1 separable pair is ~13 µs.
    """
    from effopt.optimizer.ir.cost_model import estimate, node_cost

    f = facts(node)
    before = node_cost(f, node.name, profile).time_s
    x = f.inputs[0]
    example = torch.zeros(x.shape, dtype=getattr(torch, x.dtype))
    mini = annotate(IR(trace_module(replacement), (InputSpec("x", x.shape, x.dtype),), (example,)))
    return Priced(profile.name, before, estimate(mini, profile).total_s)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs"


@dataclass
class LayerRewrite:
    """One layer's planned replacement: what replaces it, how close it is, what it costs.

    ``sizes`` is ``{"multiplier": 2}``, ``{"rank": 16}`` or ``{"rank_out": 8, "rank_in": 4}``;
    ``children`` are the modules of the chain in order (they become ``<module path>.<name>``);
    ``output_error`` is the relative output error on calibration data (before, after) a refit.
    """

    node: fx.Node
    sizes: dict[str, int]
    relative_error: float
    children: OrderedDict[str, nn.Module]
    price: Priced | None = None
    output_error: tuple[float, float] | None = None
    new_nodes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``m=2``, ``r=16`` or ``r=8×4 (out×in)``, as the report shows it."""
        if "multiplier" in self.sizes:
            return f"m={self.sizes['multiplier']}"
        if "rank" in self.sizes:
            return f"r={self.sizes['rank']}"
        return f"r={self.sizes['rank_out']}×{self.sizes['rank_in']} (out×in)"

    def stats(self) -> dict[str, float]:
        """Per-layer numbers for report.json, keyed ``<node>.<what>`` (``features_3.multiplier``)."""
        out = {f"{self.node.name}.{k}": float(v) for k, v in self.sizes.items()}
        out[f"{self.node.name}.relative_error"] = self.relative_error
        if self.output_error is not None:
            out[f"{self.node.name}.output_error_before_refit"] = self.output_error[0]
            out[f"{self.node.name}.output_error_after_refit"] = self.output_error[1]
        if self.price is not None:
            out[f"{self.node.name}.predicted_before_s"] = self.price.before_s
            out[f"{self.node.name}.predicted_after_s"] = self.price.after_s
        return out

    def decline(self, max_error: float | None, apply: Apply) -> str | None:
        """Why this rewrite is not applied (error over budget, no predicted gain), or None."""
        if max_error is not None and self.relative_error > max_error:
            return f"relative error {self.relative_error:.3g} at {self.label} is above max_error {max_error:g}"
        if apply == "all":
            return None
        if self.price is None:
            return "apply: profitable needs a target profile to price the rewrite; set target, or use apply: all"
        if not self.price.gain:
            p = self.price
            return (f"not profitable on {p.profile}: predicted {_us(p.before_s)} → {_us(p.after_s)} at {self.label} "
                    f"(relative error {self.relative_error:.3g}); apply: all rewrites it anyway")
        return None

    def note(self) -> str:
        parts = [f"'{self.node.name}': {self.label}, relative error {self.relative_error:.3g}"]
        if self.output_error is not None:
            before, after = self.output_error
            parts.append(f"output error on calibration {before:.3g} → {after:.3g} after refit")
        if self.price is not None:
            p = self.price
            parts.append(f"predicted {_us(p.before_s)} → {_us(p.after_s)} on {p.profile}")
        return ", ".join(parts) + f" (now {' → '.join(self.new_nodes)})"


def replace_with_chain(ir: IR, node: fx.Node, children: OrderedDict[str, nn.Module]) -> tuple[str, ...]:
    """Replace the ``call_module`` ``node`` by a chain of calls to ``children``; returns the new node names.

    The module at ``node.target`` becomes an ``nn.Sequential`` of the children (so ``features.3``
    holds ``features.3.depthwise`` and ``features.3.pointwise``), and the graph calls each child:
    ``x ─ features_3 ─ y`` becomes ``x ─ features_3_depthwise ─ features_3_pointwise ─ y``.
    """
    target = str(node.target)
    old = ir.module_of(node)
    ir.set_submodule(target, nn.Sequential(children).train(old.training))
    graph = ir.gm.graph
    nodes_before = len(graph.nodes)
    new: list[fx.Node] = []
    with graph.inserting_before(node):
        for i, name in enumerate(children):
            args, kwargs = (node.args, dict(node.kwargs)) if i == 0 else ((new[-1],), {})
            new.append(graph.call_module(f"{target}.{name}", args, kwargs))
    node.replace_all_uses_with(new[-1])
    graph.erase_node(node)
    if len(graph.nodes) != nodes_before + len(children) - 1:
        raise AssertionError(f"replacing '{node.name}' did not add exactly {len(children) - 1} node(s)")
    return tuple(n.name for n in new)


def check_recovery(ctx: PassContext, options: RecoveryOptions | None, explicit: bool, pass_name: str) -> None:
    """Raise `PassError` before any edit when ``finetune:`` was asked for but the recipe has no data.train."""
    if options is not None and explicit and ctx.services.get("finetune") is None:
        raise PassError(f"{pass_name} finetune: needs training data for the fine-tuning service: add data.train to "
                        "the recipe, or set finetune: null")


def recover(
    ir: IR, teacher: nn.Module | None, ctx: PassContext, options: RecoveryOptions | None, pass_name: str
) -> tuple[dict[str, float], list[str]]:
    """Fine-tune the rewritten ``ir.gm`` towards ``teacher`` through ``ctx.services["finetune"]``.

    Returns stats (steps, headline before/after) and notes; without the service (and a default
    ``finetune:``, see `check_recovery`) a note says the layers were not fine-tuned. No wall-clock
    numbers: stats go into report.json, which must be byte-identical between runs.
    """
    tuner = ctx.services.get("finetune")
    if options is None or teacher is None:
        return {}, []
    if tuner is None:
        return {}, ["not fine-tuned: the recipe has no data.train, so the rewritten layers keep their initialisation "
                    "(add data.train to recover accuracy, or set finetune: null to silence this)"]
    result = tuner.run(ir.gm, teacher.eval(), options)
    ir.gm.eval()
    stats = {"finetune_steps": float(result.steps)}
    note = f"fine-tuned {result.steps} steps towards the model before {pass_name} (loss {result.loss})"
    if result.initial_headline is not None and result.best_headline is not None:
        stats |= {"finetune_initial_headline": result.initial_headline, "finetune_best_headline": result.best_headline}
        note += (f": eval headline {result.initial_headline:.4g} → {result.best_headline:.4g} "
                 f"(best, at step {result.best_step})")
    return stats, [note]


def shared_weight_reason(ir: IR, node: fx.Node) -> str | None:
    """Why ``node``'s module cannot be replaced: called from several places, or its tensors read directly."""
    target = str(node.target)
    if len(ir.users_of_module(target)) > 1:
        return f"module '{target}' is shared by several call sites"
    readers = [n.name for n in ir.gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(target + ".")]
    if readers:
        return f"its parameters are also read directly by {', '.join(readers)}"
    return None


@dataclass
class RewriteRun:
    """The loop both passes share: consider each layer, plan, decide, then edit and recover.

    ``why_not(ir, node)`` is the pass's structural guard, ``plan(ir, node, ctx)`` builds a
    `LayerRewrite` (or says why it cannot), and ``before_edit(ir, rewrites, ctx)`` may adjust the
    planned modules with data (the separable refit). Every precondition is checked before the
    graph is touched.
    """

    pass_name: str
    kinds: frozenset[str]
    layers: LayerFilter
    max_error: float | None
    apply: Apply
    finetune: RecoveryOptions | None
    finetune_explicit: bool
    why_not: Callable[[IR, fx.Node], str | None]
    plan: Callable[[IR, fx.Node, PassContext], LayerRewrite | str]
    before_edit: Callable[[IR, list[LayerRewrite], PassContext], None] | None = None
    skipped: list[Skip] = field(default_factory=list)

    def _candidates(self, ir: IR, lift: LiftResult, ctx: PassContext) -> list[LayerRewrite]:
        stays_functional = lift.reasons(self.kinds)
        old_names = lift.old_names
        chosen: list[LayerRewrite] = []
        for node in ir.compute_nodes():
            if canonical_op(node, ir.gm) not in self.kinds:
                continue
            if node.op != "call_module":
                reason = stays_functional.get(node.name, "functional layer that was not lifted to a module")
                self.skipped.append(Skip(node.name, reason))
                continue
            names = [node.name, str(node.target)] + ([old_names[node.name]] if node.name in old_names else [])
            reason = self.layers.why_not(names) or self.why_not(ir, node)
            planned = self.plan(ir, node, ctx) if reason is None else reason
            if isinstance(planned, str):
                self.skipped.append(Skip(node.name, planned))
                continue
            declined = planned.decline(self.max_error, self.apply)
            if declined:
                self.skipped.append(Skip(node.name, declined))
                continue
            chosen.append(planned)
        return chosen

    def __call__(self, ir: IR, ctx: PassContext) -> PassResult:
        check_recovery(ctx, self.finetune, self.finetune_explicit, self.pass_name)
        lift = lift_functional_layers(ir, self.kinds)
        rewrites = self._candidates(ir, lift, ctx)
        # the teacher is the model before this pass; copied only when there will be a run (or a note) to make
        teacher = copy.deepcopy(ir.gm).eval() if rewrites and self.finetune is not None else None
        if rewrites and self.before_edit is not None:
            self.before_edit(ir, rewrites, ctx)
        for r in rewrites:
            r.new_nodes = replace_with_chain(ir, r.node, r.children)
        stats: dict[str, float] = {"rewritten_layers": float(len(rewrites))}
        if rewrites and all(r.price is not None for r in rewrites):
            stats["predicted_before_s"] = sum(r.price.before_s for r in rewrites if r.price)
            stats["predicted_after_s"] = sum(r.price.after_s for r in rewrites if r.price)
        for r in rewrites:
            stats |= r.stats()
        notes = [r.note() for r in rewrites]
        tuned, tune_notes = recover(ir, teacher, ctx, self.finetune, self.pass_name)
        stats |= tuned
        notes += tune_notes
        if lift.lifted:
            stats["lifted_functional_layers"] = float(len(lift.lifted))
            notes.append(f"lifted {len(lift.lifted)} functional layer(s) to modules: "
                         + ", ".join(f"{x.old} → {x.module}" for x in lift.lifted))
        rewritten = [r.node.name for r in rewrites]
        changed = rewritten + [n for n in lift.new_names if n not in rewritten]
        return PassResult(ir, tuple(changed), tuple(self.skipped), stats, tuple(notes))


# -- the separable rewrite ---------------------------------------------------------------------


def separable_modules(conv: nn.Conv2d, multiplier: int) -> tuple[OrderedDict[str, nn.Module], float]:
    """The depthwise and pointwise convs replacing ``conv`` at ``multiplier``, and the relative kernel error."""
    f = separable_init(conv.weight, multiplier)
    c_in, c_out = conv.in_channels, conv.out_channels
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    dw = nn.Conv2d(c_in, c_in * multiplier, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
                   conv.padding, conv.dilation, groups=c_in, bias=False, padding_mode=conv.padding_mode, **like)
    pw = nn.Conv2d(c_in * multiplier, c_out, 1, bias=conv.bias is not None, **like)
    with torch.no_grad():
        dw.weight.copy_(f.depthwise)
        pw.weight.copy_(f.pointwise)
        if conv.bias is not None:
            pw.bias.copy_(conv.bias)
    return OrderedDict(depthwise=dw, pointwise=pw), f.relative_error


def refit_pointwise(ir: IR, rewrites: list[LayerRewrite], ctx: PassContext, max_batches: int) -> None:
    """Least-squares refit of each planned pointwise conv on the original layer's calibration inputs.

    One sweep of the unedited model: a pre-hook on each conv feeds its input through the planned
    depthwise conv (``d``) and the original kernel without bias (``y``), accumulating the normal
    equations (`LeastSquares`); then ``P = argmin Σ‖y − P d‖²`` replaces the SVD pointwise weights.
    """
    if ctx.calibration is None:
        raise PassError("separable_conv refit: true needs calibration data: add data.calibration (or data.train) "
                        "to the recipe, or set refit: false")
    systems = {r.node.name: LeastSquares() for r in rewrites}

    def hook_for(r: LayerRewrite) -> Callable[..., None]:
        dw, ls = r.children["depthwise"], systems[r.node.name]

        def hook(module: nn.Conv2d, args: tuple[Any, ...]) -> None:
            x = args[0]
            d, y = dw(x), module._conv_forward(x, module.weight, None)
            ls.update(d.permute(0, 2, 3, 1).reshape(-1, d.shape[1]), y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]))
        return hook

    handles = [ir.module_of(r.node).register_forward_pre_hook(hook_for(r)) for r in rewrites]
    try:
        with torch.no_grad():
            ir.gm.eval()
            for i, batch in enumerate(ctx.calibration.batches()):
                if i >= max_batches:
                    break
                ir.gm(*batch.inputs)
    finally:
        for h in handles:
            h.remove()
    for r in rewrites:
        ls, pw = systems[r.node.name], r.children["pointwise"]
        if ls.samples == 0:
            continue
        before = ls.error(pw.weight.detach()[:, :, 0, 0])
        p = ls.solve()
        r.output_error = (before, ls.error(p))
        with torch.no_grad():
            pw.weight.copy_(p.reshape(pw.weight.shape).to(pw.weight.dtype))


class SeparableConv(Pass):
    name: ClassVar[str] = "separable_conv"
    summary: ClassVar[str] = ("K×K conv → depthwise (multiplier m) + pointwise, initialised by per-channel SVD of the "
                              "trained kernel; where the cost model predicts a gain; optional refit and fine-tuning.")
    Options = SeparableConvOptions
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm",)
    lossy: ClassVar[bool] = True

    options: SeparableConvOptions

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o = self.options
        return RewriteRun(
            self.name, frozenset({"conv"}), o.layers, o.max_error, o.apply, o.finetune, "finetune" in o.model_fields_set,
            why_not=self._why_not, plan=self._plan,
            before_edit=(lambda i, rs, c: refit_pointwise(i, rs, c, o.calibration_batches)) if o.refit else None,
        )(ir, ctx)

    @staticmethod
    def _why_not(ir: IR, node: fx.Node) -> str | None:
        """Every structural precondition, checked before anything is edited; None means eligible."""
        mod = ir.module_of(node)
        if not isinstance(mod, nn.Conv2d):
            hint = " (run separable_conv before quantize)" if isinstance(mod, QuantConv) else ""
            return f"{type(mod).__name__} is not an nn.Conv2d{hint}"
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels else "grouped"
            return f"already {kind} (groups={mod.groups}): only groups=1 convs are separated"
        if mod.kernel_size[0] * mod.kernel_size[1] == 1:
            return "1×1 kernel: nothing to separate (low_rank factors 1×1 convs)"
        if not mod.weight.is_floating_point():
            return f"weight is {mod.weight.dtype}, not floating point"
        return shared_weight_reason(ir, node)

    def _plan(self, ir: IR, node: fx.Node, ctx: PassContext) -> LayerRewrite | str:
        o = self.options
        conv: nn.Conv2d = ir.module_of(node)  # type: ignore[assignment]
        k2 = conv.kernel_size[0] * conv.kernel_size[1]
        m = multiplier_for_energy(conv.weight, o.energy) if o.multiplier == "auto" else o.multiplier
        if m > k2:
            return f"multiplier {m} is above K² = {k2} for a {conv.kernel_size[0]}×{conv.kernel_size[1]} kernel"
        children, error = separable_modules(conv, m)
        price = price_replacement(node, nn.Sequential(children), ctx.profile) if ctx.profile is not None else None
        return LayerRewrite(node, {"multiplier": m}, error, children, price)
