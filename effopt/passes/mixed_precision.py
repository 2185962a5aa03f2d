"""Mixed precision for the quantize pass: measure each layer alone, promote the most sensitive first.

Why a module of its own: the quantize pass decides *where* quantizers go; this decides *which
layers keep more precision* once they are calibrated, and against which budget — the recipe's
accuracy budget on labelled eval data, ``min_decision_agreement`` (decisions kept against the
float model, no labels needed) or ``max_output_error``.

Order: most decisions flipped first (`OutputSensitivity.sort_key`), then the largest relative
output error, then the cheapest to keep (`_float_cost`). The ladder (`_promote`): 4/2-bit →
8-bit (or the target's `int8_weight_bits`) → bf16/fp16 where the target runs one → fp32.
Example: on x86-avx2 an int8 layer whose quantization flips a face decision becomes ``float``
before a box-head layer with 7× its output error is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.compare import compare_tensors, concat_flat, output_tensors
from effopt.optimizer.ir.core import IR, facts, has_facts
from effopt.optimizer.quant.observers import calibrate_weight
from effopt.optimizer.quant.schemes import FakeQuant, QScheme, QuantConv, QuantLinear
from effopt.optimizer.quant.sensitivity import OutputSensitivity, decision_axes, measure_outputs
from effopt.passes.base import PassContext
from effopt.passes.half_precision import HALF_TORCH_DTYPES, preferred_half_dtype

__all__ = ["DecisionCheck", "LayerSensitivity", "Sites", "choose_precisions", "float_word", "relative_error"]


class Sites(Protocol):
    """What mixed precision reads from the quantize pass's rewrite: each layer, its node, its quantizers."""

    layer_nodes: list[fx.Node]
    layers: list[QuantConv | QuantLinear]
    groups: dict[str, list[FakeQuant]]  # layer node name → the quantizers that make it integer


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    sensitivity: float     # relative output error with only this layer quantized
    float_cost_s: float    # predicted extra latency of keeping it in float (bf16/fp16 where the target runs it)
    precision: str         # what it got: the pass's bits, "8-bit" (promoted from 4/2), "bf16"/"fp16" or "float"
    top1_agreement: float | None = None  # decisions kept with only this layer quantized (worst head; None: no decision head)


def relative_error(gm: nn.Module, reference: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> float:
    """``||y_q − y||² / ||y||²`` over every output and batch: the squared `Agreement.relative_l2`.

    E.g. y = [3, 4], y_q = [3, 3.5] gives 0.25 / 25 = 0.01, exactly ``max_output_error``'s default."""
    got: list[torch.Tensor] = []
    want: list[torch.Tensor] = []
    with torch.no_grad():
        for inputs in batches:
            got += output_tensors(gm(*inputs))
            want += output_tensors(reference(*inputs))
    return compare_tensors(concat_flat(got), concat_flat(want)).relative_l2 ** 2


def _set_enabled(quants: Iterable[FakeQuant], enabled: bool) -> None:
    for fq in quants:
        fq.enabled = enabled


def choose_precisions(
    ir: IR, rw: Sites, float_model: nn.Module, ctx: PassContext, o: Any, calibration: Sequence[tuple[torch.Tensor, ...]]
) -> tuple[list[LayerSensitivity], DecisionCheck | None]:
    """Promote the most sensitive layers until the budget holds (`_budget_check`).

    Returns every layer's sensitivity row and, with ``min_decision_agreement``, the check that
    measures the decisions the quantized model keeps (None without that option).
    """
    batches = list(calibration[:4])  # each layer alone is measured on these: four batches rank them well enough
    gm = ir.gm.eval()
    every = [fq for g in rw.groups.values() for fq in g]
    _set_enabled(every, False)
    sens: dict[str, float] = {}
    outputs: dict[str, OutputSensitivity] = {}  # per head: decisions flipped first, then relative error
    axes = decision_axes(float_model)
    for node in rw.layer_nodes:
        _set_enabled(rw.groups[node.name], True)
        outputs[node.name] = measure_outputs(gm, float_model, batches, axes)
        sens[node.name] = outputs[node.name].relative_error
        _set_enabled(rw.groups[node.name], False)
    _set_enabled(every, True)
    cost = _float_cost(ir, rw, ctx)
    order = sorted(rw.layer_nodes, key=lambda n: (*outputs[n.name].sort_key(), cost.get(n.name, 0.0), n.name))
    decisions = _decision_check(gm, float_model, ctx, o, axes, batches)
    within_budget = _budget_check(gm, float_model, batches, ctx, o, decisions)
    promoted: dict[str, str] = {}
    for node in order:
        if within_budget():
            break
        layer = next(m for n, m in zip(rw.layer_nodes, rw.layers) if n is node)
        promoted[node.name] = _promote(layer, rw.groups[node.name], o, getattr(ctx.profile, "int8_weight_bits", 8),
                                       preferred_half_dtype(ctx.profile))
    rows = [LayerSensitivity(n.name, sens[n.name], cost.get(n.name, 0.0), promoted.get(n.name, f"{o.bits}-bit"),
                             outputs[n.name].decision_agreement) for n in rw.layer_nodes]
    return rows, decisions


@dataclass(frozen=True)
class DecisionCheck:
    """``min_decision_agreement``: the quantized model's decisions against the float model's, worst head."""

    gm: nn.Module
    float_model: nn.Module
    batches: list[tuple[torch.Tensor, ...]]
    axes: tuple[int | None, ...] | None
    floor: float

    def kept(self) -> float:
        agreement = measure_outputs(self.gm, self.float_model, self.batches, self.axes).decision_agreement
        return 1.0 if agreement is None else agreement

    def __call__(self) -> bool:
        return self.kept() >= self.floor - 1e-12


def _decision_check(gm: nn.Module, float_model: nn.Module, ctx: PassContext, o: Any,
                    axes: tuple[int | None, ...] | None, calibration: list[tuple[torch.Tensor, ...]]
                    ) -> DecisionCheck | None:
    """The decisions budget, measured on data.eval's inputs (held out) when the compiler passes them, else on
    the calibration batches; None without the option. Raises PassError for a model with no decision head."""
    if o.min_decision_agreement is None:
        return None
    source = ctx.services.get("eval_inputs")
    batches = [tuple(b.inputs) for _, b in zip(range(8), source.batches())] if source is not None else calibration
    check = DecisionCheck(gm, float_model, batches, axes, o.min_decision_agreement)
    if measure_outputs(float_model, float_model, batches[:1], axes).decision_agreement is None:
        raise PassError("quantize min_decision_agreement: the model has no decision head (a softmax output, or an "
                        "[N, C] logits output); use max_output_error or the recipe's max_accuracy_drop instead")
    return check


def _budget_check(
    gm: nn.Module, float_model: nn.Module, batches: list[tuple[torch.Tensor, ...]], ctx: PassContext,
    o: Any, decisions: DecisionCheck | None = None,
) -> Callable[[], bool]:
    """Is the quantized model good enough yet? Every budget that applies must hold: the recipe's accuracy
    budget on its eval data when the compiler provides one (``ctx.services["score"]`` and
    ``["accuracy_budget"]``), ``min_decision_agreement`` when set, and ``max_output_error`` when neither
    applies or when the recipe sets it next to ``min_decision_agreement``."""
    checks: list[Callable[[], bool]] = []
    score, budget = ctx.services.get("score"), ctx.services.get("accuracy_budget")
    if callable(score) and budget is not None:
        floor = score(float_model) - budget
        checks.append(lambda: score(gm) >= floor - 1e-12)
    if decisions is not None:
        checks.append(decisions)
    if not checks or (decisions is not None and "max_output_error" in o.model_fields_set):
        checks.append(lambda: relative_error(gm, float_model, batches) <= o.max_output_error)
    return lambda: all(check() for check in checks)


def _promote(layer: QuantConv | QuantLinear, group: list[FakeQuant], o: Any, widest: int = 8,
             half: str | None = None) -> str:
    """Give a sensitive layer the next higher precision the ladder has: ``widest``-bit weights (8, or the
    target's `int8_weight_bits`) after 4/2-bit, else ``half`` (bf16/fp16, where the target runs one), else fp32.

    A half layer's weights are rounded to that dtype, so the budget check and every artefact see its
    weight error; its activations are not rounded (2^-8 relative for bf16, far below int8's step), and
    the int8 runtimes run it in fp32. E.g. on a100 an int8 layer that breaks the budget becomes bf16
    (priced at the 312e12 FLOP/s bf16 peak), on x86-avx2 fp32 ("float").
    """
    if o.bits < widest:
        higher = QScheme(bits=widest, signed=True, symmetric=True, axis=layer.weight_quant.scheme.axis)
        layer.weight_quant = FakeQuant(higher, layer.weight.shape[0])
        calibrate_weight(layer, o.weight_observer)
        return f"{widest}-bit"
    _set_enabled(group, False)
    if half is not None:
        inner = layer.conv if isinstance(layer, QuantConv) else layer.linear
        with torch.no_grad():
            inner.weight.copy_(inner.weight.to(HALF_TORCH_DTYPES[half]).to(inner.weight.dtype))
        layer.compute_dtype = half  # the cost model prices it at the target's half peak
        return half
    layer.compute_dtype = "fp32"  # the cost model must see that it computes in float now
    return "float"


def float_word(profile: object | None) -> str:
    """How a promoted layer computes on ``profile``: ``bf16``/``fp16`` where it runs one, else ``float``."""
    return preferred_half_dtype(profile) or "float"


def _float_cost(ir: IR, rw: Sites, ctx: PassContext) -> dict[str, float]:
    """Predicted extra seconds of running each layer in float (bf16/fp16 where the target runs it, else fp32)
    instead of int8 on the target."""
    if ctx.profile is None or not all(has_facts(n) for n in rw.layer_nodes):
        return {}
    from effopt.optimizer.ir.cost_model import node_cost

    wider = preferred_half_dtype(ctx.profile) or "fp32"
    out = {}
    for n in rw.layer_nodes:
        f = facts(n)
        out[n.name] = node_cost(f, n.name, ctx.profile, wider).time_s - node_cost(f, n.name, ctx.profile, "int8").time_s
    return out
