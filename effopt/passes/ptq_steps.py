"""The quantize pass's accuracy-keeping steps: equalization, AdaRound, bias correction, each measured.

Why a module of its own: the quantize pass owns the graph rewrite and calibration; these steps
only change float weights and biases before or after it, so they run unchanged for every
lowering (ONNX QDQ, torch int8, integer-only all read the same weights, scales and biases).
The numerics live in `effopt.optimizer.quant` (`equalize`, `adaround`, `bias_correction`);
this module decides where each one runs, measures it, and reports.

Order inside ``quantize``::

    lift → [equalize] → float copy → rewrite → calibrate activations, weights → mixed precision
         → [AdaRound] → [bias correction] → QAT

Each step is ``auto`` / ``true`` / ``false`` (AdaRound: ``false`` or its options). ``auto`` (the
default of equalization and bias correction) measures every site with and without the step on
calibration data and keeps it only where the error is lower; it acts in static mode (where
activations are calibrated) and does nothing without calibration data. ``true`` applies it
everywhere it can. The pass's per-layer table (``details`` in report.json, a table in
report.md) shows both errors per layer; when ``auto`` keeps nothing the report is left exactly as
it was without these steps.

Example row (the digits CNN with the defaults; errors are ‖ŷ − y‖² / ‖y‖²)::

    {"layer": "fc1", "equalized_pair": "conv3→fc1", "cle_error_off": 0.00035, "cle_error_on": 0.00029,
     "cle": "on", "bias_error_off": 0.00014, "bias_error_on": 0.00005, "bias_correction": "on"}
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from pydantic import Field
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.core import IR
from effopt.optimizer.quant.adaround import (
    AdaRoundConfig,
    GramObjective,
    SampledObjective,
    adaround_weight,
    conv_rows,
    output_rows,
    row_forward,
)
from effopt.optimizer.quant.bias_correction import (
    apply_shift,
    batchnorm_before,
    batchnorm_input_expectation,
    correct_biases,
    weight_shift,
)
from effopt.optimizer.quant.equalize import Declined, EqualizationPair, equalize, find_pairs, pair_errors
from effopt.optimizer.quant.observers import make_observer
from effopt.optimizer.quant.schemes import ACTIVATION_SCHEME, QScheme, QuantConv, QuantLinear, fake_quantize
from effopt.passes.base import PassContext, PassOptions, Skip

Toggle = bool | Literal["auto"]

#: calibration samples the equalization measurement uses at most (the model runs twice on them)
CLE_MEASURE_SAMPLES = 128
#: auto keeps a pair only if, equalized alone, its error drops below this fraction of the error without:
#: a pair's error on a hundred samples moves by a few percent with the sample, and an equalized pair
#: also reshapes the activation ranges downstream, so a gain inside the noise is not worth the change
CLE_MARGIN = 0.9


class AdaRoundOptions(PassOptions):
    """AdaRound settings: a few hundred Adam steps per layer on a few hundred calibration samples."""

    iterations: int = Field(300, ge=1, description="optimisation steps per layer")
    samples: int = Field(256, ge=1, description="calibration samples per layer (fewer for layers with big inputs)")
    batch_size: int = Field(32, ge=1, description="samples per step where a layer is too wide for the exact "
                            "(Gram) objective")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the rounding variables")
    reg_weight: float = Field(1.0, ge=0, description="λ of the rounding regulariser mean(1 − |2h − 1|^β), against the "
                              "reconstruction error relative to nearest rounding")
    time_budget_s: float = Field(
        300.0, gt=0, description="wall-clock budget of all layers; layers reached after it keep nearest rounding "
        "(reported: then the result depends on the machine's speed)"
    )
    seed: int | None = Field(None, description="minibatch order; default the recipe's seed")

    def config(self) -> AdaRoundConfig:
        return AdaRoundConfig(iterations=self.iterations, lr=self.lr, reg_weight=self.reg_weight)


@dataclass(frozen=True)
class PtqSettings:
    """What `PtqSteps` needs from the quantize options (kept apart so this module does not import the pass)."""

    equalize: Toggle
    bias_correction: Toggle
    adaround: AdaRoundOptions | None
    mode: str
    weight_scheme: QScheme
    weight_observer: str
    observer: str
    calibration_batches: int
    keep_float: tuple[str, ...] = ()
    adaround_auto: bool = False  # ``adaround: auto`` at 4/2 bits: layers within `AUTO_ADAROUND_FLOPS`, static, with data


def _state(value: Toggle, mode: str, has_data: bool) -> Literal["off", "auto", "on"]:
    if value is True:
        return "on"
    if value == "auto" and mode == "static" and has_data:
        return "auto"
    return "off"


def calibration_batches(ctx: PassContext, limit: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``limit`` calibration batches' inputs, or none when the recipe has no data."""
    if ctx.calibration is None:
        return []
    out = []
    for i, batch in enumerate(ctx.calibration.batches()):
        if i >= limit:
            break
        out.append(tuple(batch.inputs))
    return out


@dataclass
class PtqSteps:
    """Runs the steps for one quantize run and collects their rows, skips, notes and stats."""

    settings: PtqSettings
    ctx: PassContext
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    _batches: list[tuple[torch.Tensor, ...]] | None = None
    _explicit: bool = False
    _float_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → its weight before AdaRound

    def __post_init__(self) -> None:
        s = self.settings
        self._explicit = s.equalize is True or s.bias_correction is True or (s.adaround is not None
                                                                              and not s.adaround_auto)

    # -- data -------------------------------------------------------------------------------------
    @property
    def batches(self) -> list[tuple[torch.Tensor, ...]]:
        if self._batches is None:
            self._batches = calibration_batches(self.ctx, self.settings.calibration_batches)
        return self._batches

    @property
    def has_data(self) -> bool:
        return self.ctx.calibration is not None

    @property
    def needs_float_model(self) -> bool:
        """AdaRound's targets are the float model's layer outputs: the pass keeps a float copy for it."""
        s = self.settings
        return s.adaround is not None and self.has_data and (not s.adaround_auto or s.mode == "static")

    def _row(self, layer: str) -> dict[str, Any]:
        return self.rows.setdefault(layer, {})

    # -- 1. cross-layer equalization (float graph, before the rewrite) -----------------------------
    def equalize(self, ir: IR) -> None:
        state = _state(self.settings.equalize, self.settings.mode, self.has_data)
        if state == "off":
            return
        gm = ir.gm
        pairs, declined = find_pairs(gm)
        kept_float = set(self.settings.keep_float)
        for p in pairs:
            if kept_float & {p.first, p.second, p.first_module, p.second_module}:
                declined.append(Declined(p.first, f"{p.label}: a layer of the pair is listed in keep_float"))
        pairs = [p for p in pairs if not kept_float & {p.first, p.second, p.first_module, p.second_module}]
        if state == "on":  # asked for: say where it could not be done (auto's verdicts are in the table)
            self.skipped += [Skip(d.node, f"equalize: {d.reason}") for d in declined]
        if not pairs:
            return
        if state == "on" and not self.has_data:
            equalize(gm, pairs)
            for p in pairs:
                self._row(p.second).update({"equalized_pair": p.label, "cle": "on"})
            self.stats["equalized_pairs"] = float(len(pairs))
            return
        batches = _first_samples(self.batches, CLE_MEASURE_SAMPLES)
        kept, before, after = self._measured_equalization(gm, pairs, batches, force=state == "on")
        for p in pairs:
            on = p in kept
            self._row(p.second).update({"equalized_pair": p.label, "cle_error_off": before[p.label],
                                        "cle_error_on": after[p.label], "cle": "on" if on else "off"})
        if kept:
            self.stats["equalized_pairs"] = float(len(kept))

    def _measured_equalization(
        self, gm: fx.GraphModule, pairs: list[EqualizationPair], batches: Sequence[tuple[torch.Tensor, ...]],
        force: bool,
    ) -> tuple[list[EqualizationPair], dict[str, float], dict[str, float]]:
        """Measure each pair without and alone-equalized; keep those below `CLE_MARGIN` of their error,
        equalize them together (sweeps), measure again, and drop any that ended no better (then redo)."""
        quantize_weight, quantize_activation = self._weight_quantizer(), self._activation_quantizer()
        labels = [p.label for p in pairs]
        before = dict(zip(labels, pair_errors(gm, pairs, batches, quantize_weight, quantize_activation)))
        after = dict(zip(labels, pair_errors(gm, pairs, batches, quantize_weight, quantize_activation, alone=True)))
        kept = list(pairs) if force else [p for p in pairs if after[p.label] < CLE_MARGIN * before[p.label]]
        paths = sorted({path for p in kept for path in (p.first_module, p.second_module)})
        original = {path: copy.deepcopy(gm.get_submodule(path).state_dict()) for path in paths}
        while kept:
            equalize(gm, kept)
            errors = pair_errors(gm, kept, batches, quantize_weight, quantize_activation)
            measured = dict(zip((p.label for p in kept), errors))
            after.update(measured)
            worse = [p for p in kept if not measured[p.label] < before[p.label]]
            if force or not worse:
                break
            for path in paths:
                gm.get_submodule(path).load_state_dict(original[path])
            kept = [p for p in kept if p not in worse]
        return kept, before, after

    def _weight_quantizer(self):  # noqa: ANN202 (a closure)
        scheme, kind = self.settings.weight_scheme, self.settings.weight_observer

        def quantize(w: torch.Tensor) -> torch.Tensor:
            obs = make_observer(kind, axis=scheme.axis)  # type: ignore[arg-type]
            obs.update(w)
            scale, zero = obs.qparams(scheme)
            return fake_quantize(w, scale, zero, scheme)

        return quantize

    def _activation_quantizer(self):  # noqa: ANN202 (a closure)
        kind = self.settings.observer

        def calibrated(values: list[torch.Tensor]):  # noqa: ANN202
            obs = make_observer(kind)  # type: ignore[arg-type]
            for v in values:
                obs.update(v)
            scale, zero = obs.qparams(ACTIVATION_SCHEME)
            return lambda x: fake_quantize(x, scale, zero, ACTIVATION_SCHEME)

        return calibrated

    # -- 2. AdaRound and 3. bias correction (quantized graph, after calibration) ------------------
    def after_calibration(self, gm: fx.GraphModule, layer_nodes: Sequence[fx.Node],
                          layers: Sequence[QuantConv | QuantLinear], float_model: nn.Module | None) -> None:
        """AdaRound, then bias correction, on the layers that still quantize their weights (mixed
        precision may have kept some in float)."""
        active = [(n, q) for n, q in zip(layer_nodes, layers) if q.weight_quant.calibrated and q.weight_quant.enabled]
        layer_nodes, layers = [n for n, _ in active], [q for _, q in active]
        state = _state(self.settings.bias_correction, self.settings.mode, self.has_data)
        if self.settings.adaround_auto and not self.needs_float_model:
            pass  # auto: nothing to learn from (no calibration data, or weights only)
        elif self.settings.adaround is not None:
            if not self.has_data or float_model is None:
                raise PassError("quantize adaround: needs calibration data (a few hundred samples): add "
                                "data.calibration to the recipe, or set adaround: false")
            refit = self._adaround(gm, layer_nodes, layers, float_model, self.settings.adaround, state)
            rest = [(n, q) for n, q in zip(layer_nodes, layers) if n.name not in refit]
            layer_nodes, layers = [n for n, _ in rest], [q for _, q in rest]
        if state == "off":
            return
        if not self.has_data:
            self._data_free_bias_correction(gm, layer_nodes, layers)
            return
        originals = [self._float_weights.get(n.name) for n in layer_nodes]
        results = correct_biases(gm, layers, self.batches, force=True if state == "on" else None,
                                 float_weights=originals)
        applied = int(self.stats.get("bias_corrected_layers", 0))  # AdaRound's bias refits count too
        for n, r in zip(layer_nodes, results):
            if r is None:
                continue
            self._row(n.name).update({"bias_error_off": r.error_without, "bias_error_on": r.error_with,
                                      "bias_correction": "on" if r.applied else "off"})
            applied += r.applied
        if applied:
            self.stats["bias_corrected_layers"] = float(applied)

    def _data_free_bias_correction(self, gm: fx.GraphModule, layer_nodes: Sequence[fx.Node],
                                   layers: Sequence[QuantConv | QuantLinear]) -> None:
        """No calibration data: E[x] from a BatchNorm still in the graph (the DFQ formula), else a Skip."""
        applied = 0
        for n, layer in zip(layer_nodes, layers):
            found = batchnorm_before(n, gm)
            if isinstance(found, str):
                self.skipped.append(Skip(n.name, f"bias_correction: no calibration data and {found}"))
                continue
            bn, relu = found
            inner = layer.conv if isinstance(layer, QuantConv) else layer.linear
            with torch.no_grad():
                quantized = layer.weight_quant(inner.weight)
            expected = batchnorm_input_expectation(bn, relu)
            shift = weight_shift(quantized, inner.weight, expected, getattr(inner, "groups", 1))
            apply_shift(layer, shift)
            self._row(n.name).update({"bias_correction": "on (data-free)"})
            applied += 1
        if applied:
            self.stats["bias_corrected_layers"] = float(applied)

    def _adaround(self, gm: fx.GraphModule, layer_nodes: Sequence[fx.Node], layers: Sequence[QuantConv | QuantLinear],
                  float_model: nn.Module, o: AdaRoundOptions, bias_state: str) -> set[str]:
        """Round each layer in graph order (each sees its input as the layers before it now produce it).

        With bias correction on (or auto), a rounded layer's bias is refitted on AdaRound's own data
        right away: AdaRound's target is the float model's output on *float* inputs, so the mean shift
        to remove is E[W̃ x̃ − W x], not the weight-only E[W̃ x̃ − W x̃] the generic step measures (which
        would undo what AdaRound learned about its inputs' error). Returns the layers refitted so.
        """
        refit: set[str] = set()
        budget = AUTO_ADAROUND_FLOPS if self.settings.adaround_auto else math.inf
        over_budget: list[str] = []
        seed = o.seed if o.seed is not None else self.ctx.seed
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        rounded = 0
        gm.eval()
        float_model.eval()
        for n, layer in zip(layer_nodes, layers):
            if not _has_path(float_model, n):
                continue
            if time.perf_counter() - start > o.time_budget_s:
                why = f"adaround: time budget of {o.time_budget_s:g} s spent; nearest rounding"
                self.skipped.append(Skip(n.name, why))
                self.warnings.append(f"adaround: the time budget ({o.time_budget_s:g} s) ran out at '{n.name}'; "
                                     "the remaining layers keep nearest rounding and the result depends on this "
                                     "machine's speed (raise adaround.time_budget_s)")
                break
            cost = adaround_cost(layer, o.iterations)
            if cost > budget:
                over_budget.append(n.name)
                self._row(n.name).update({"adaround": "off (auto: over its compute budget)"})
                continue
            budget -= cost
            inputs, targets = _layer_samples(gm, layer, float_model, float_model.get_submodule(str(n.target)),
                                             self.batches, o.samples)
            if inputs is None or targets is None:
                continue
            inner = layer.conv if isinstance(layer, QuantConv) else layer.linear
            objective = _adaround_objective(inner, inputs, targets, o.batch_size, generator)
            fq = layer.weight_quant
            result = adaround_weight(inner.weight, fq.scale, fq.zero_point, fq.scheme, objective, o.config())
            self._row(n.name).update({"adaround_error_off": result.nearest_error,
                                      "adaround_error_on": result.adaround_error,
                                      "adaround": "on" if result.better else "off"})
            if result.better:
                self._float_weights[n.name] = inner.weight.detach().clone()
                with torch.no_grad():
                    inner.weight.copy_(result.weight)
                rounded += 1
                if bias_state != "off":
                    on = bias_state == "on" or result.shifted_error < result.adaround_error
                    if on:
                        apply_shift(layer, result.bias_shift)
                    self._row(n.name).update({"bias_error_off": result.adaround_error,
                                              "bias_error_on": result.shifted_error,
                                              "bias_correction": "on (AdaRound's data)" if on else "off"})
                    refit.add(n.name)
                    self.stats["bias_corrected_layers"] = self.stats.get("bias_corrected_layers", 0.0) + on
        if rounded or not self.settings.adaround_auto:
            self.stats["adarounded_layers"] = float(rounded)
        if over_budget and rounded:
            self.warnings.append(f"adaround: auto rounded {rounded} layer(s) within its compute budget and left "
                                 f"{len(over_budget)} at nearest rounding ({', '.join(over_budget)}); "
                                 "adaround: true rounds every layer")
        return refit

    # -- the report -------------------------------------------------------------------------------
    @property
    def reported(self) -> bool:
        """Whether the steps show in the report: one was asked for explicitly, or ``auto`` kept one somewhere."""
        return self._explicit or self.changed_anything()

    def report_skips(self) -> list[Skip]:
        return self.skipped if self.reported else []

    def report_warnings(self) -> list[str]:
        return self.warnings if self.reported else []

    def changed_anything(self) -> bool:
        return any(isinstance(v, str) and (v == "on" or v.startswith("on "))
                   for row in self.rows.values() for v in row.values())

    def details(self, layer_order: Sequence[str],
                extra: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict[str, Any], ...]:
        """One row per quantized layer with every column any step filled (None elsewhere), in graph order.

        Empty when nothing was asked for explicitly and ``auto`` kept nothing (and no ``extra`` rows, e.g.
        mixed precision's): then report.json keeps the bytes it had before these steps existed.
        """
        extra = extra or {}
        if not (self.reported or extra):
            return ()
        columns: list[str] = []
        for source in (*self.rows.values(), *extra.values()):
            for key in source:
                if key not in columns:
                    columns.append(key)
        order = _COLUMN_ORDER
        columns.sort(key=lambda c: order.index(c) if c in order else len(order))
        out = []
        for name in layer_order:
            merged = {**self.rows.get(name, {}), **extra.get(name, {})}
            out.append({"layer": name, **{c: merged.get(c) for c in columns}})
        return tuple(out)


_COLUMN_ORDER = (
    "equalized_pair", "cle_error_off", "cle_error_on", "cle", "adaround_error_off", "adaround_error_on", "adaround",
    "bias_error_off", "bias_error_on", "bias_correction", "sensitivity", "top1_agreement", "precision",
)


def _first_samples(batches: Sequence[tuple[torch.Tensor, ...]], samples: int) -> list[tuple[torch.Tensor, ...]]:
    """The leading batches holding ``samples`` samples (the last one cut), e.g. 64 + 64 of 64-sample batches for 128."""
    out, seen = [], 0
    for inputs in batches:
        if seen >= samples:
            break
        n = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        take = min(n, samples - seen)
        out.append(tuple(t[:take] if t.dim() and t.shape[0] == n else t for t in inputs) if take < n else inputs)
        seen += take
    return out


def _has_path(model: nn.Module, n: fx.Node) -> bool:
    try:
        model.get_submodule(str(n.target))
    except AttributeError:
        return False
    return True


#: a layer whose Gram matrices hold at most this many values (groups · d²) is optimised on all rows at once
GRAM_LIMIT = 4 * 2**20


def _gram_fits(groups: int, d: int) -> bool:
    """Whether a layer's per-group d×d Gram matrices stay within `GRAM_LIMIT` (the exact objective)."""
    return groups * d * d <= GRAM_LIMIT

#: ``adaround: auto``'s compute budget for a whole model, in (estimated) floating-point operations.
#: 3e10 is a few seconds on two CPU cores: every layer of the digits CNN, an MTCNN stage or a small
#: MobileNet fits; a ResNet-18 gets its cheap early layers. Counted, not timed, so output is deterministic.
AUTO_ADAROUND_FLOPS = 3e10

#: What one Adam step costs beyond its arithmetic (a dozen small torch ops), as FLOPs at CPU speed.
STEP_OVERHEAD_FLOPS = 2e6


def adaround_cost(layer: QuantConv | QuantLinear, iterations: int) -> float:
    """Estimated FLOPs of AdaRound on ``layer``: ``iterations`` × (2·out·d² + overhead) on the exact
    (Gram) objective, infinite where the Gram matrices would not fit (`GRAM_LIMIT`: minibatches, slow).

    Example: a 3×3 conv 32 → 64 (d = 288, out = 64) at 300 steps: 300 × (2·64·288² + 2e6) ≈ 3.8e9.
    """
    inner = layer.conv if isinstance(layer, QuantConv) else layer.linear
    weight = inner.weight
    d, out, groups = weight[0].numel(), weight.shape[0], getattr(inner, "groups", 1)
    if not _gram_fits(groups, d):
        return math.inf
    return iterations * (2.0 * out * d * d + STEP_OVERHEAD_FLOPS)


def _adaround_objective(inner: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                        generator: torch.Generator) -> GramObjective | SampledObjective:
    """The reconstruction term for one layer: exact on every receptive-field row (`GramObjective`)
    where its d×d Gram matrices are small, else minibatches of ``batch_size`` samples' worth of rows,
    or of whole samples for convs `conv_rows` cannot unfold. Rows beyond `MAX_SAMPLE_VALUES` are
    subsampled with ``generator``."""
    if isinstance(inner, nn.Linear):
        rows, want, groups = inputs.reshape(-1, inputs.shape[-1]).unsqueeze(1), output_rows(targets, -1), 1
    else:
        maybe = conv_rows(inner, inputs)
        if maybe is None:
            conv = inner
            def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return conv._conv_forward(x, w, conv.bias)  # type: ignore[operator]

            return SampledObjective(forward, inputs, targets, batch_size, generator, channel_axis=1)
        rows, want, groups = maybe, output_rows(targets, 1), int(getattr(inner, "groups", 1))
    if _gram_fits(groups, rows.shape[2]):
        return GramObjective(rows, want, inner.bias, groups)
    per_sample = max(1, rows.shape[0] // max(1, inputs.shape[0]))
    cap = max(1, MAX_SAMPLE_VALUES // (rows[0].numel() + want.shape[1]))
    if rows.shape[0] > cap:
        keep = torch.randperm(rows.shape[0], generator=generator)[:cap].sort().values
        rows, want = rows[keep], want[keep]
    return SampledObjective(row_forward(inner.bias, groups), rows, want, batch_size * per_sample, generator)


#: at most this many values of a layer's input (or output) are kept for AdaRound (~128 MiB in float32)
MAX_SAMPLE_VALUES = 32 * 2**20


def _layer_samples(gm: nn.Module, layer: nn.Module, reference: nn.Module, float_layer: nn.Module,
                   batches: Sequence[tuple[torch.Tensor, ...]],
                   samples: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(``gm``'s inputs to ``layer``, ``reference``'s outputs of ``float_layer``) on the same batches, up to
    ``samples`` of them."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    h1 = layer.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()) and None)
    h2 = float_layer.register_forward_hook(lambda _m, _a, y: ys.append(y.detach()) and None)
    try:
        with torch.no_grad():
            count = 0
            for inputs in batches:
                gm(*inputs)
                reference(*inputs)
                count += int(xs[-1].shape[0]) if xs else 0
                per_sample = max(int(xs[-1][0].numel()), int(ys[-1][0].numel())) if xs and ys else 1
                if count >= min(samples, max(8, MAX_SAMPLE_VALUES // per_sample)):
                    break
    finally:
        h1.remove()
        h2.remove()
    if not xs or len(xs) != len(ys):
        return None, None
    x, y = torch.cat(xs), torch.cat(ys)
    limit = min(samples, max(8, MAX_SAMPLE_VALUES // max(int(x[0].numel()), int(y[0].numel()))))
    return x[:limit], y[:limit]



def ptq_settings(options: Any, weight_scheme: QScheme) -> PtqSettings:
    """The settings of a `QuantizeOptions` (``adaround: true`` / ``auto`` mean the default `AdaRoundOptions`)."""
    adaround = options.adaround
    # auto: 4- and 2-bit weights only (there nearest rounding costs the most: benchmarks/ptq.py measures 5-10×
    # less output error and 2-4× fewer flipped decisions at 4 bits, a tie on decisions at 8 bits for ~20× the
    # quantize time; 8 bits capped to 7 by a target count as 8), and not before QAT, which trains the weights
    auto = adaround == "auto" and getattr(options, "qat", None) is None and getattr(options, "bits", 8) <= 4
    if adaround is True or auto:
        adaround = AdaRoundOptions()
    return PtqSettings(
        equalize=options.equalize, bias_correction=options.bias_correction,
        adaround=adaround if isinstance(adaround, AdaRoundOptions) else None, mode=options.mode,
        weight_scheme=weight_scheme, weight_observer=options.weight_observer, observer=options.observer,
        calibration_batches=options.calibration_batches, keep_float=tuple(options.keep_float),
        adaround_auto=auto,
    )
