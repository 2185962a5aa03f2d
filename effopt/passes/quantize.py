"""Quantize the model: int8 (or 4-bit) weights and activations, calibrated or trained (QAT).

Modes:
- ``static``: weights per output channel (symmetric int8) and activations per
  tensor (asymmetric uint8), scales calibrated on ``data.calibration``. The
  rewrite follows the quantized-graph contract of `effopt.optimizer.quant.contract`:
  conv/linear become `QuantConv`/`QuantLinear`, a `FakeQuant` goes on every
  integer-stored edge, conv+relu and add+relu share one output quantizer, and
  pass-through ops (max pool, flatten, ...) keep their input's quantizer.
- ``dynamic``: weights int8; activations of Linear layers are quantized at run
  time from each batch's own range (for Linear/matmul-heavy models).
- ``weight_only``: int8/int4 weights, float compute (smaller, not faster).

``qat:`` fine-tunes the fake-quantized model through the fine-tuning service
with distillation from the float model (rounding has a straight-through
gradient; ``learnable_scales`` trains the scales, LSQ). ``mixed_precision``
measures each layer's sensitivity (only that layer quantized) and keeps the
most sensitive ones in float until the output error is within budget,
preferring layers the cost model says are cheap to keep in float: three
levels, int8 → bf16/fp16 where the target runs one (`preferred_half_dtype`) → fp32.

Functional conv/linear calls (a ``torch.export`` program's ``aten.conv2d`` /
``aten.linear``, ``F.conv2d`` in a forward) are first lifted to ``nn`` modules
(`effopt.optimizer.ir.lift`, bit-identical), so they quantize like module layers;
``keep_float`` may name a lifted layer by its old node name or its new one.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator
from torch import nn

from effopt.errors import InternalError, PassError
from effopt.optimizer.ir.analysis import canonical_op
from effopt.passes.finetuning import FineTuneConfig
from effopt.optimizer.ir.core import IR, facts, has_facts
from effopt.optimizer.ir.lift import LiftResult, lift_functional_layers
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip
from effopt.passes.mixed_precision import DecisionCheck, LayerSensitivity, choose_precisions, float_word
from effopt.passes.ptq_steps import AdaRoundOptions, PtqSteps, Toggle, ptq_settings
from effopt.optimizer.quant.contract import (
    INTEGER_ACTIVATION_KINDS,
    PASS_THROUGH_KINDS,
    REQUANTIZED_KINDS,
    SPLIT_KINDS,
    TIED_QPARAMS_KINDS,
    WEIGHTED_KINDS,
    activation_after,
    integer_activation_refusal,
    quantizer_node,
    softmax_output_qparams,
)
from effopt.optimizer.quant.dynamic import DynamicInput
from effopt.optimizer.quant.observers import calibrate_weight
from effopt.optimizer.quant.schemes import (
    FakeQuant,
    QScheme,
    QuantConv,
    QuantLinear,
    quantize_values,
    worst_case_accumulator_bits,
)


class QatOptions(FineTuneConfig):
    """Quantization-aware training: a fine-tuning run on the fake-quantized model (see `FineTuneConfig`).

    A field set here overrides the recipe's ``finetune:`` block; one left out comes from that block
    if it sets it, else from the defaults below (`effopt.passes.finetuning.with_defaults`).
    """

    learnable_scales: bool = Field(False, description="train the quantizer scales too (LSQ)")
    freeze_batchnorm: bool = Field(True, description="keep any BatchNorm statistics fixed while training")
    lr: float = Field(1e-4, gt=0, description="learning rate (QAT starts from a trained model: keep it small)")


class QuantizeOptions(PassOptions):
    """Options of the quantize pass."""

    mode: Literal["static", "dynamic", "weight_only"] = Field("static", description="what is quantized, see the pass docs")
    bits: Literal[8, 4, 2] = Field(8, description="weight bits (4 and 2 are stored in int8 containers)")
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)")
    observer: Literal["minmax", "moving_average", "percentile", "mse"] = Field(
        "minmax", description="how activation ranges are chosen from calibration data"
    )
    weight_observer: Literal["minmax", "mse"] = Field("minmax", description="how weight ranges are chosen")
    calibration_batches: int = Field(16, ge=1, description="calibration batches to observe at most")
    keep_float: tuple[str, ...] = Field((), description="node names or module paths to leave in float")
    mixed_precision: bool = Field(False, description="keep the most sensitive layers in float (static mode)")
    max_output_error: float = Field(
        0.01, gt=0, description="mixed precision budget when the recipe has no max_accuracy_drop with data.eval: "
        "relative output error ||y_q − y||² / ||y||² on calibration data"
    )
    min_decision_agreement: float | None = Field(
        None, gt=0, le=1, description="mixed precision budget on decisions: promote layers until every decision head "
        "(a softmax output, or [N, C] logits) agrees with the float model on at least this fraction of data.eval's "
        "inputs (calibration data without data.eval); replaces max_output_error unless that is set too"
    )
    qat: QatOptions | None = Field(None, description="quantization-aware training after calibration (needs data.train)")
    equalize: Toggle = Field("auto", description="cross-layer equalization of conv/linear pairs before calibration; "
                             "auto: per pair where it lowers the measured error (static mode), see docs/ptq.md")
    bias_correction: Toggle = Field("auto", description="fold each layer's expected output shift into its bias; "
                                    "auto: per layer where it lowers the held-out error (static mode)")
    adaround: AdaRoundOptions | Toggle = Field(
        "auto", description="learn each weight's rounding direction (AdaRound) on calibration data; auto: with "
        "weights below 8 bits, on the layers that fit a fixed compute budget (small models: all), kept per layer "
        "where it beats nearest; true: every layer, any bit width"
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeOptions:
        if self.mode != "static" and (self.qat is not None or self.mixed_precision):
            raise ValueError(f"qat and mixed_precision need mode: static (got mode: {self.mode})")
        if self.min_decision_agreement is not None and not self.mixed_precision:
            raise ValueError("min_decision_agreement is a mixed precision budget: add mixed_precision: true")
        return self


def within_kernel_weight_range(options: QuantizeOptions, profile: object | None) -> tuple[QuantizeOptions, list[str]]:
    """The options with weight bits cut to what the target's int8 kernels multiply without overflow.

    On ``x86-avx2`` (`HardwareProfile.int8_weight_bits` = 7: no VNNI, pair sums saturate in int16)
    ``bits: 8`` becomes 7 (codes −63..63) for static and dynamic mode; 4 and 2 bits, weight-only mode
    (float compute) and targets without the limit are left alone.
    """
    cap = getattr(profile, "int8_weight_bits", 8)
    if options.mode == "weight_only" or options.bits <= cap:
        return options, []
    note = (f"weights use {cap} bits, not {options.bits}: {getattr(profile, 'name', 'the target')}'s int8 kernels "
            f"add u8 x s8 products in pairs into a saturating int16 (int8_weight_bits: {cap} in the profile)")
    return options.model_copy(update={"bits": cap}), [note]


def weight_scheme(options: QuantizeOptions) -> QScheme:
    return QScheme(bits=options.bits, signed=True, symmetric=True, axis=0 if options.per_channel else None)


ACTIVATION = QScheme(bits=8, signed=False, symmetric=False, axis=None)


class Quantize(Pass):
    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "Int8/int4 quantization: calibrated static, dynamic or weight-only; optional QAT and mixed precision."
    Options = QuantizeOptions
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm",)
    lossy: ClassVar[bool] = True

    options: QuantizeOptions

    def target_support(self, profile: object) -> str | None:
        if self.options.mode == "weight_only":
            return None
        if not profile.supports("int8"):  # type: ignore[attr-defined]
            return f"{profile.name} has no int8 compute; use mode: weight_only"  # type: ignore[attr-defined]
        return None

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o, warnings = within_kernel_weight_range(self.options, ctx.profile)
        lift = lift_functional_layers(ir, WEIGHTED_KINDS)
        ptq = PtqSteps(ptq_settings(o, weight_scheme(o)), ctx)
        ptq.equalize(ir)  # before the float copy and calibration: exact in float
        float_model = copy.deepcopy(ir.gm) if (o.qat or o.mixed_precision or ptq.needs_float_model) else None
        rewrite = _Rewrite(ir, o, lift, integer_only=bool(getattr(ctx.profile, "integer_only", False)))
        rewrite.apply()
        stats: dict[str, float] = {"quantized_layers": float(len(rewrite.layers))}
        if lift.lifted:
            stats["lifted_functional_layers"] = float(len(lift.lifted))
            warnings.append(f"lifted {len(lift.lifted)} functional layer(s) to modules: "
                            + ", ".join(f"{x.old} → {x.module}" for x in lift.lifted))
        if o.mode == "static":
            if ctx.calibration is None:
                raise PassError(
                    "quantize (mode: static) needs calibration data to choose activation ranges: add data.calibration "
                    "(or data.train / data.eval) to the recipe, or use mode: weight_only"
                )
            batches = ptq.batches  # the first calibration_batches batches, read once for every step
            _calibrate_activations(ir.gm, rewrite.activation_quants, batches, o.observer)
            for fq, source in rewrite.tied:
                fq.set_qparams(source.scale.detach(), source.zero_point)
            for fq in rewrite.fixed:  # contract rule 7: a softmax output is on the fixed 1/256 grid
                scale, zero = softmax_output_qparams(fq.scheme.qmin)
                fq.set_qparams(torch.tensor(scale), torch.tensor(zero))
            stats["fake_quant_nodes"] = float(len(rewrite.activation_quants))
        for layer in rewrite.layers:
            calibrate_weight(layer, o.weight_observer)
        if o.mode == "static":
            warnings += _accumulator_warnings(ir, rewrite, ctx)
        sens: list[LayerSensitivity] = []
        decisions: DecisionCheck | None = None
        if o.mixed_precision:
            assert float_model is not None
            sens, decisions = choose_precisions(ir, rewrite, float_model, ctx, o, ptq.batches)
            stats["promoted_by_sensitivity"] = float(sum(s.precision != f"{o.bits}-bit" for s in sens))
            word = float_word(ctx.profile)
            warnings += [
                f"mixed precision: '{s.node}' sensitivity {s.sensitivity:.3g} ({word} would cost "
                f"{s.float_cost_s * 1e6:.2f} µs more) → {s.precision}"
                for s in sens
            ]
        # AdaRound, bias correction: after mixed precision, so they fit the precision each layer ended with
        ptq.after_calibration(ir.gm, rewrite.layer_nodes, rewrite.layers, float_model)
        if decisions is not None:  # what the finished model keeps (AdaRound and bias correction ran after the budget)
            stats["decision_agreement"] = decisions.kept()
        if o.qat is not None:
            assert float_model is not None
            stats.update(_qat(ir, rewrite, float_model, ctx, o.qat))
        ir.gm.eval()
        changed = [*rewrite.changed, *(name for name in lift.new_names if name not in rewrite.changed)]
        rows = {s.node: {"sensitivity": s.sensitivity, "top1_agreement": s.top1_agreement, "precision": s.precision}
                for s in sens}
        details = ptq.details([n.name for n in rewrite.layer_nodes], rows)
        return PassResult(ir, tuple(changed), (*rewrite.skipped, *ptq.report_skips()), stats | ptq.stats,
                          (*warnings, *ptq.report_warnings()), details=details)


# -- the graph rewrite -----------------------------------------------------------------------------


class _Rewrite:
    """Turns a float graph into one that follows the quantized-graph contract (guard, then edit)."""

    def __init__(self, ir: IR, options: QuantizeOptions, lift: LiftResult | None = None,
                 integer_only: bool = False) -> None:
        self.integer_only = integer_only  # contract rule 7: prelu/softmax become integer sites
        self.fixed: list[FakeQuant] = []  # softmax outputs' quantizers (fixed qparams, not calibrated)
        self.ir = ir
        self.o = options
        self.old_names = dict(lift.old_names) if lift is not None else {}  # lifted node → its name before lifting
        self.stays_functional = lift.reasons(WEIGHTED_KINDS) if lift is not None else {}
        self.gm = ir.gm
        self.graph = ir.gm.graph
        self.quantized: dict[fx.Node, fx.Node] = {}  # value → the node holding its quantized version
        self.activation_quants: list[FakeQuant] = []
        self.layers: list[QuantConv | QuantLinear] = []
        self.layer_nodes: list[fx.Node] = []
        self.groups: dict[str, list[FakeQuant]] = {}  # layer node → the quantizers that make it integer
        self.changed: list[str] = []
        self.skipped: list[Skip] = []
        self.tied: list[tuple[FakeQuant, FakeQuant]] = []  # (quantizer, the one whose parameters it copies)

    def kind(self, n: fx.Node) -> str:
        return canonical_op(n, self.gm)

    def _kept_float(self, n: fx.Node) -> bool:
        names = (n.name, self.old_names.get(n.name))
        return any(m in self.o.keep_float for m in names) or (n.op == "call_module" and str(n.target) in self.o.keep_float)

    def apply(self) -> None:
        for n in list(self.graph.nodes):
            if n.op not in ("call_module", "call_function", "call_method"):
                continue
            kind = self.kind(n)
            if self._kept_float(n):
                self.skipped.append(Skip(n.name, "listed in keep_float"))
                continue
            if kind in WEIGHTED_KINDS:
                self._weighted(n, kind)
            elif kind in REQUANTIZED_KINDS and self.o.mode == "static":
                self._int8_op(n, kind)
            elif kind in PASS_THROUGH_KINDS:
                first = n.all_input_nodes[0] if n.all_input_nodes else None
                if first is not None and first in self.quantized and self.quantized[first] is first:
                    self.quantized[n] = n
            elif kind in TIED_QPARAMS_KINDS and self.o.mode == "static":
                self._tied(n)
            elif kind in INTEGER_ACTIVATION_KINDS and self.o.mode == "static" and self.integer_only:
                self._integer_activation(n, kind)
        self.ir.lint().recompile()

    # guards -----------------------------------------------------------------------------------
    def _weighted_module(self, n: fx.Node) -> nn.Module | None:
        if n.op != "call_module":
            reason = self.stays_functional.get(n.name, "functional conv/linear: only nn.Conv*/nn.Linear modules are quantized")
            self.skipped.append(Skip(n.name, reason))
            return None
        mod = self.ir.module_of(n)
        if isinstance(mod, (QuantConv, QuantLinear)):
            self.skipped.append(Skip(n.name, "already quantized"))
            return None
        if isinstance(mod, nn.modules.conv._ConvTransposeNd) or not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            self.skipped.append(Skip(n.name, f"{type(mod).__name__} has no int8 rewrite"))
            return None
        if len(self.ir.users_of_module(str(n.target))) > 1:
            self.skipped.append(Skip(n.name, f"module '{n.target}' is shared by several call sites"))
            return None
        return mod

    # edits --------------------------------------------------------------------------------------
    def _weighted(self, n: fx.Node, kind: str) -> None:
        mod = self._weighted_module(n)
        if mod is None:
            return
        compute = "int8" if self.o.mode == "static" else "fp32"
        scheme = weight_scheme(self.o)
        q = QuantConv(mod, scheme, compute) if kind == "conv" else QuantLinear(mod, scheme, compute)  # type: ignore[arg-type]
        if self.o.mode == "dynamic":
            q = DynamicInput(q) if kind == "linear" else q  # type: ignore[assignment]
        self.ir.set_submodule(str(n.target), q)
        layer = q.inner if isinstance(q, DynamicInput) else q
        self.layers.append(layer)  # type: ignore[arg-type]
        self.layer_nodes.append(n)
        self.groups[n.name] = [layer.weight_quant]  # type: ignore[union-attr]
        if self.o.mode == "static":
            self._quantize_inputs(n)
            self._quantize_output(n)
        self.changed.append(n.name)

    def _int8_op(self, n: fx.Node, kind: str) -> None:
        tensor_inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        flat_args = [a for a in _flatten(n.args) if not isinstance(a, (int, float, bool, str, type(None), torch.dtype))]
        if len(tensor_inputs) != len(flat_args) or not tensor_inputs:
            return  # an operand is a constant or attribute: stays float, nothing to report
        if kind == "mean" and not all(isinstance(d, int) for d in _flatten(n.args[1:])):
            return
        self.groups[n.name] = []
        self._quantize_inputs(n)
        self._quantize_output(n)
        self.changed.append(n.name)

    def _integer_activation(self, n: fx.Node, kind: str) -> None:
        """Contract rule 7 on an int-only target: quantize the input (not an F.prelu's slope) and the output."""
        ndim = len(facts(n).inputs[0].shape) if has_facts(n) and facts(n).inputs else 0
        why = integer_activation_refusal(n, self.gm, ndim)
        if why is not None:
            self.skipped.append(Skip(n.name, f"stays float, so the int-only target cannot run it: {kind} {why}"))
            return
        self.groups[n.name] = []
        self._quantize_inputs(n)
        self._quantize_output(n)
        if kind == "softmax":
            self.fixed.append(self._fake_quant_of(self.quantized[activation_after(n, self.gm) or n]))
        self.changed.append(n.name)

    def _tied(self, n: fx.Node) -> None:
        """split/chunk outputs and interpolate keep their input's scale, but onnxruntime needs a Q/DQ after them."""
        source = n.all_input_nodes[0] if n.all_input_nodes else None
        if source is not None and self.kind(source) in SPLIT_KINDS:
            source = source.all_input_nodes[0] if source.all_input_nodes else None
        if source is None or source not in self.quantized or self.quantized[source] is not source:
            return
        users = list(n.users)
        q = self._quantizer_after(n)
        for u in users:
            u.replace_input_with(n, q)
        self.tied.append((self._fake_quant_of(q), self._fake_quant_of(source)))

    def _quantizer_after(self, value: fx.Node) -> fx.Node:
        """The FakeQuant node after ``value`` (made once per value; every quantized user shares it)."""
        if value in self.quantized:
            return self.quantized[value]
        fq = FakeQuant(ACTIVATION)
        name = self.ir.fresh_name(f"{value.name}_quant".replace(".", "_"))
        self.gm.add_submodule(name, fq)
        with self.graph.inserting_after(value):
            node = self.graph.call_module(name, (value,))
        self.activation_quants.append(fq)
        self.quantized[value] = node
        self.quantized[node] = node
        return node

    def _fake_quant_of(self, node: fx.Node) -> FakeQuant:
        """The FakeQuant that quantized ``node``'s value (walking back through pass-through ops)."""
        quant = quantizer_node(node, self.gm)
        if quant is None:
            raise InternalError(f"quantize: node '{node.name}' should carry a quantized value but no FakeQuant "
                                "precedes it through pass-through ops")
        return self.gm.get_submodule(str(quant.target))  # type: ignore[return-value]

    def _quantize_inputs(self, n: fx.Node) -> None:
        for a in list(n.all_input_nodes):
            if a.op == "get_attr":
                continue
            q = self._quantizer_after(a)
            if q is not a:
                n.replace_input_with(a, q)
            self.groups[n.name].append(self._fake_quant_of(q))

    def _quantize_output(self, n: fx.Node) -> None:
        tail = activation_after(n, self.gm) or n  # conv → relu → q: the relu shares the conv's quantizer
        old_users = list(tail.users)
        q = self._quantizer_after(tail)
        for u in old_users:
            u.replace_input_with(tail, q)
        self.groups[n.name].append(self._fake_quant_of(q))


# -- calibration --------------------------------------------------------------------------------


def _calibrate_activations(gm: fx.GraphModule, quants: list[FakeQuant], batches: list[tuple[torch.Tensor, ...]], kind: str) -> None:
    from effopt.optimizer.quant.observers import make_observer

    for fq in quants:
        fq.observer = make_observer(kind)  # type: ignore[arg-type]
    try:
        with torch.no_grad():
            gm.eval()
            for inputs in batches:
                gm(*inputs)
    finally:
        observers = [fq.observer for fq in quants]
        for fq in quants:
            fq.observer = None
    for fq, obs in zip(quants, observers):
        fq.set_qparams(*obs.qparams(fq.scheme))  # type: ignore[union-attr]


def _accumulator_warnings(ir: IR, rw: _Rewrite, ctx: PassContext) -> list[str]:
    width = getattr(ctx.profile, "accumulator_bits", 32) if ctx.profile is not None else 32
    out = []
    for node, layer in zip(rw.layer_nodes, rw.layers):
        fq = layer.weight_quant
        codes = quantize_values(layer.weight.detach(), fq.scale.detach(), fq.zero_point, fq.scheme)
        bits = worst_case_accumulator_bits(codes, ACTIVATION)
        if bits > width:
            out.append(
                f"layer '{node.name}': worst-case accumulator needs {bits} bits but the target accumulates in "
                f"{width}: it may overflow on adversarial inputs (split the layer or use fewer weight bits)"
            )
    return out


# -- QAT ----------------------------------------------------------------------------------------


def _qat(ir: IR, rw: _Rewrite, teacher: nn.Module, ctx: PassContext, qat: QatOptions) -> dict[str, float]:
    tuner = ctx.services.get("finetune")
    if tuner is None:
        raise PassError("quantize qat: needs training data for the fine-tuning service: add data.train to the recipe")
    if qat.learnable_scales:
        for fq in rw.activation_quants:
            if not any(fq is fixed for fixed in rw.fixed):  # a softmax output keeps its 1/256 grid
                fq.make_learnable()
        for layer in rw.layers:
            layer.weight_quant.make_learnable()
    # the service lays qat's explicit fields over the recipe's finetune: block (with_defaults), so
    # pass qat itself: a copy through model_dump would mark every field as set by the user
    result = tuner.run(ir.gm, teacher.eval(), qat)  # type: ignore[attr-defined]
    for fq in [*rw.activation_quants, *(layer.weight_quant for layer in rw.layers)]:
        fq.sync()
    # no wall-clock seconds here: stats go into report.json, which must be byte-identical between runs
    stats = {"qat_steps": float(result.steps)}
    if result.initial_headline is not None and result.best_headline is not None:
        stats |= {"qat_initial_headline": result.initial_headline, "qat_best_headline": result.best_headline}
    return stats


def _flatten(args: object) -> list[object]:
    if isinstance(args, (list, tuple)):
        return [x for a in args for x in _flatten(a)]
    return [args]


