"""Bias correction: fold each quantized layer's expected output shift into its bias.

Why: rounding a layer's weights changes its output by (W_q − W)·x. The part of that error that
is the same on every input, E[(W_q − W)·x] per output channel, is a systematic shift that the
next layers read as signal (a ReLU threshold moves, a softmax tilts). Subtracting it from the
bias removes it for free (Nagel et al. 2019, §4.2; Finkelstein et al. 2019). Two ways to get it:

- **from calibration data** (`correct_biases`, the usual path): run the quantized model once over
  the calibration batches; every quantized layer computes both W_q x and W x on the input x it
  really gets (the quantized model's), and shift = E[W_q x] − E[W x] per output channel. Each
  layer corrects only its own rounding, so no shift is corrected twice, and one run serves
  every layer.
- **data-free, from BatchNorm statistics** (`batchnorm_input_expectation`, `weight_shift`): when
  the layer's input is ``relu(bn(·))`` (or ``bn(·)``) and the BatchNorm is still in the graph, the
  input channel c is modelled as N(β_c, γ_c²) clipped by the ReLU, whose mean is
  β·Φ(β/|γ|) + |γ|·φ(β/|γ|), and shift = (W_q − W)·E[x]. After ``fold_batchnorm`` the statistics
  are gone and calibration data is the path.

Worked example (data-free): one input channel with β = 0, |γ| = 1 after a ReLU has
E[x] = φ(0) = 0.3989; a 1×1 weight 0.30 quantized to 0.25 shifts the output by −0.05·0.3989 =
−0.01995, so the bias grows by 0.01995.

Whether a correction helps is measured, not assumed (`ShiftStats`): the shift is estimated on
the even calibration batches and the layer's error with and without it is compared on the odd
ones (in-sample when there is a single batch), so "auto" turns it on only where it lowers the
held-out error; the correction applied is then the mean over every batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.quant.schemes import QuantConv, QuantLinear

__all__ = [
    "BiasCorrection",
    "ShiftStats",
    "apply_shift",
    "batchnorm_before",
    "batchnorm_input_expectation",
    "correct_biases",
    "expected_relu_of_normal",
    "weight_shift",
]


def expected_relu_of_normal(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[max(z, 0)] for z ~ N(mean, std²), elementwise: mean·Φ(mean/std) + std·φ(mean/std).

    std = 0 gives max(mean, 0). Example: mean 0, std 1 → 1/sqrt(2π) = 0.3989; mean 2, std 0 → 2.
    """
    mean, std = mean.double(), std.double().abs()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    t = mean / safe
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return torch.where(std > 0, mean * cdf + std * pdf, mean.clamp(min=0)).float()


def batchnorm_input_expectation(bn: nn.modules.batchnorm._BatchNorm, relu: bool) -> torch.Tensor:
    """Per channel, the expected value of ``relu(bn(z))`` (or ``bn(z)``) if bn's output is N(β, γ²).

    That is the data-free assumption of Nagel et al.: BatchNorm normalises its input, so its
    output has mean β (the bias) and standard deviation |γ| (the weight), per channel.
    """
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
    return expected_relu_of_normal(beta, gamma) if relu else beta.float()


def weight_shift(w_quantized: torch.Tensor, w: torch.Tensor, expected_input: torch.Tensor,
                 groups: int = 1) -> torch.Tensor:
    """(W_q − W)·E[x] per output channel for an input that is E[x]_c at every position of channel c.

    The kernel's spatial taps all see the same channel mean, so they are summed first (padding
    borders are ignored: a border position reads fewer taps). A grouped conv's output o reads
    only its group's channels. Example: ΔW = [[−0.05]], E[x] = [0.3989] → [−0.01995].
    """
    dw = (w_quantized.detach() - w.detach()).double()
    out, per_group = dw.shape[0], dw.shape[1]
    summed = dw.reshape(out, per_group, -1).sum(dim=2)  # [out, in/groups]
    ex = expected_input.double().reshape(groups, per_group)
    group_of = torch.arange(out) // (out // groups)
    return (summed * ex[group_of]).sum(dim=1).float()


def apply_shift(layer: nn.Module, shift: torch.Tensor) -> None:
    """bias ← bias − shift on a conv/linear (or the float layer inside a QuantConv/QuantLinear); adds a bias if none."""
    inner = getattr(layer, "conv", None) or getattr(layer, "linear", None) or layer
    with torch.no_grad():
        if inner.bias is None:
            inner.bias = nn.Parameter(-shift.to(inner.weight.dtype).clone())
        else:
            inner.bias.sub_(shift.to(inner.bias.dtype))


@dataclass
class ShiftStats:
    """Running per-channel sums of d = W_q x − W x, split into even and odd batches.

    From these alone follow the shift (mean of d) and the held-out errors: with μ estimated on
    the even batches, Σ_odd ||d − μ||² = Σ_odd ||d||² − 2 μ·Σ_odd d + n_odd·||μ||² per channel.
    ``axis`` is the channel axis of the layer output (1 for conv, −1 for linear).
    """

    axis: int
    sums: list[torch.Tensor] = field(default_factory=list)     # [even, odd]: Σ d per channel
    squares: list[torch.Tensor] = field(default_factory=list)  # [even, odd]: Σ d² per channel
    counts: list[int] = field(default_factory=lambda: [0, 0])  # [even, odd]: values per channel
    reference: list[float] = field(default_factory=lambda: [0.0, 0.0])  # Σ y_float²
    batches: int = 0

    def observe(self, quantized: torch.Tensor, reference: torch.Tensor, batch_index: int) -> None:
        d = quantized.detach() - reference.detach()
        axis = self.axis % d.dim()
        flat = d.movedim(axis, 0).reshape(d.shape[axis], -1)
        if not self.sums:
            zeros = torch.zeros(flat.shape[0], dtype=torch.float64)
            self.sums, self.squares = [zeros.clone(), zeros.clone()], [zeros.clone(), zeros.clone()]
        k = batch_index % 2  # one batch's partial sums in float32, the running totals in float64
        self.sums[k] += flat.sum(dim=1).double()
        self.squares[k] += (flat * flat).sum(dim=1).double()
        self.counts[k] += flat.shape[1]
        self.reference[k] += float(reference.detach().pow(2).sum())
        self.batches += 1

    def decide(self, force: bool | None = None) -> BiasCorrection:
        """The shift over every batch, and the held-out relative errors without and with it.

        ``force`` True/False overrides the decision (explicit ``bias_correction: true``); None
        applies it only where the held-out error is lower.
        """
        if not self.sums:
            raise ValueError("ShiftStats.decide: no batch observed")
        total = self.counts[0] + self.counts[1]
        shift = (self.sums[0] + self.sums[1]) / total
        est, test = (0, 1) if self.counts[1] else (0, 0)  # a single batch: in-sample
        mu = self.sums[est] / self.counts[est]
        without = float(self.squares[test].sum())
        with_it = float((self.squares[test] - 2 * mu * self.sums[test] + self.counts[test] * mu * mu).sum())
        denominator = self.reference[test] or 1.0
        e0, e1 = without / denominator, max(with_it, 0.0) / denominator
        applied = force if force is not None else e1 < e0
        return BiasCorrection(shift.float(), e0, e1, applied, held_out=bool(self.counts[1]))


@dataclass(frozen=True)
class BiasCorrection:
    """One layer's measured shift and relative output errors (‖y_q − y‖² / ‖y‖²) without and with it."""

    shift: torch.Tensor
    error_without: float
    error_with: float
    applied: bool
    held_out: bool  # the errors are on batches the shift was not estimated on


def _float_output(layer: QuantConv | QuantLinear, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The layer's output with its float weight (W x + b) on the input it was given."""
    if isinstance(layer, QuantConv):
        return layer.conv._conv_forward(x, layer.conv.weight if weight is None else weight, layer.conv.bias)
    return F.linear(x, layer.linear.weight if weight is None else weight, layer.linear.bias)


def correct_biases(
    model: nn.Module,
    layers: Sequence[QuantConv | QuantLinear],
    batches: Sequence[tuple[torch.Tensor, ...]],
    force: bool | None = None,
    float_weights: Sequence[torch.Tensor | None] = (),
) -> list[BiasCorrection | None]:
    """Measure and (where it helps, or always with ``force=True``) correct each quantized layer's bias.

    One run of ``model`` over ``batches``: each layer of ``layers`` (submodules of ``model``) also
    computes W x + b with its float weight on the same input x, so d = W_q x − W x is its own
    rounding error and shift = E[d] per output channel (the channel dim is 1 for conv, the last
    for linear). Each layer corrects only its own shift, so none is corrected twice. Returns
    None for a layer that did not run. ``float_weights[i]``, when given, is layer i's float weight
    before something else (AdaRound) moved its stored weight onto the grid. ``model`` is changed
    in place (only biases).
    """
    stats = [ShiftStats(1 if isinstance(layer, QuantConv) else -1) for layer in layers]
    originals = list(float_weights) + [None] * (len(layers) - len(float_weights))
    batch = [0]

    def hook(layer: QuantConv | QuantLinear, st: ShiftStats, weight: torch.Tensor | None):  # noqa: ANN202 (a closure)
        def observe(_m: nn.Module, args: tuple, output: torch.Tensor) -> None:
            st.observe(output, _float_output(layer, args[0], weight), batch[0])

        return observe

    removers = [layer.register_forward_hook(hook(layer, st, w)).remove
                for layer, st, w in zip(layers, stats, originals)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, inputs in enumerate(batches):
                batch[0] = i
                model(*inputs)
    finally:
        for remove in removers:
            remove()
        model.train(was_training)
    results: list[BiasCorrection | None] = []
    for layer, st in zip(layers, stats):
        if not st.sums:
            results.append(None)
            continue
        decision = st.decide(force)
        if decision.applied:
            apply_shift(layer, decision.shift)
        results.append(decision)
    return results


def batchnorm_before(node: fx.Node, gm: fx.GraphModule) -> tuple[nn.modules.batchnorm._BatchNorm, bool] | str:
    """The BatchNorm whose output (through an optional ReLU) is ``node``'s input, and whether a ReLU follows it.

    Walks back through quantizers, dropout/identity and average pooling (which keep a channel's
    mean). Returns the reason as a string when there is none: e.g. ``fold_batchnorm`` already
    folded it, or a max pool changes the channel means.
    """
    value = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    relu = False
    while value is not None and value.op in ("call_module", "call_function", "call_method"):
        kind = canonical_op(value, gm)
        if kind == "batch_norm" and value.op == "call_module":
            return gm.get_submodule(str(value.target)), relu  # type: ignore[return-value]
        if kind == "relu" and not relu:
            relu = True
        elif kind not in ("quantize", "dropout", "identity", "avg_pool", "adaptive_avg_pool"):
            return f"its input comes from {kind} '{value.name}', not from a BatchNorm (folded or absent)"
        value = value.args[0] if value.args and isinstance(value.args[0], fx.Node) else None
    return "its input is not produced by a BatchNorm (fold_batchnorm folded it, or there is none)"
