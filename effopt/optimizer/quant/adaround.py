"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Why: rounding every weight to the nearest grid point minimises each weight's own error, not the
layer's output error. Weights interact through the input's correlations, so rounding some of
them the "wrong" way often cancels errors of others. AdaRound learns, per weight, whether to
round down or up, minimising the layer's output error on a few hundred calibration samples:

    W̃ = s · clamp(⌊W/s⌋ + h(V), qmin, qmax),   h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1

    minimise  ‖W x + b − (W̃ x̃ + b)‖²  +  λ Σ (1 − |2h(V) − 1|^β)

The rectified sigmoid h lets V reach exact 0 and 1; the regulariser pushes every h to 0 or 1,
and β is annealed from 20 (lets h move freely) to 2 (forces a decision) after a warm-up without it.
The target ``y = W x + b`` is the float layer on the float model's input; ``x̃`` is the
quantized model's input to the same layer (asymmetric reconstruction: the layer also learns to
undo its inputs' error). Afterwards the rounding is hard: up where V ≥ 0.

Two ways to evaluate the reconstruction term, chosen per layer by the caller:

- `GramObjective`: the term is a quadratic form in W̃, ``tr(W̃ G W̃ᵀ) − 2 tr(W̃ C) + const`` with
  G = E[x̃ x̃ᵀ] and C = E[x̃ (y − b)ᵀ] over every receptive field of every sample (`conv_rows`).
  Each step then costs out·d² and sees all the data: exact, no minibatch noise, cheap for the
  small fan-ins (d = C_in·k²) of CPU-sized models.
- `SampledObjective`: minibatches of rows or whole samples, for fan-ins too large for a d×d G
  (or convs `conv_rows` cannot unfold); the ``generator`` draws them.

The result is written back as float weights exactly on the grid (``W ← s·q``), so every lowering
(ONNX QDQ, torch int8, integer-only), which rounds weights to the nearest code, finds q again.

Worked example: weights [0.30, 0.35] with step s = 0.5 (fractions 0.6 and 0.7 of a step) both
round up to 0.5; for x = [1, 1] the layer gives 1.0 instead of 0.65. AdaRound rounds one of them
down: 0.5, an error of 0.15 instead of 0.35.

Deterministic: V starts from the fractional parts, Adam has no randomness, and minibatches (if
any) come from a seeded `torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.quant.schemes import QScheme

__all__ = [
    "AdaRoundConfig",
    "AdaRoundResult",
    "GramObjective",
    "Objective",
    "SampledObjective",
    "adaround_weight",
    "conv_rows",
    "output_rows",
    "rectified_sigmoid",
    "round_nearest",
    "row_forward",
]

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Optimisation settings (CPU-friendly defaults: a few hundred Adam steps per layer).

    ``reg_weight`` is λ; ``warmup`` the fraction of steps without the regulariser; β goes linearly
    from ``beta_start`` to ``beta_end`` over the rest.
    """

    iterations: int = 300
    lr: float = 0.05
    reg_weight: float = 1.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2


@dataclass(frozen=True)
class AdaRoundResult:
    """The learned grid weight and the layer's relative output error (‖ŷ − y‖² / ‖y‖²) both ways."""

    weight: torch.Tensor        # s·(q − z): exactly on the grid
    nearest_error: float
    adaround_error: float
    flipped: int                # weights that round the other way than nearest
    bias_shift: torch.Tensor    # E[ŷ − y] per output channel with the learned weight (subtract it from the bias)
    shifted_error: float        # the relative error once that shift is subtracted

    @property
    def better(self) -> bool:
        return self.adaround_error < self.nearest_error


class Objective(Protocol):
    """The reconstruction term of one layer: ``loss`` for the optimiser, ``error`` for the verdict."""

    def loss(self, weight: torch.Tensor) -> torch.Tensor:
        """Σ over output channels of the squared error, averaged over rows/samples (differentiable)."""
        ...

    def error(self, weight: torch.Tensor, shift: torch.Tensor | None = None) -> float:
        """‖ŷ − shift − y‖² / ‖y‖² over all the data (float64); ``shift`` per output channel, e.g. a bias fix."""
        ...

    def mean_residual(self, weight: torch.Tensor) -> torch.Tensor:
        """E[ŷ − y] per output channel: what `bias_correction` would subtract from the bias."""
        ...


class GramObjective:
    """The reconstruction term as a quadratic form: exact over all rows, out·d² per step.

    ``rows`` ``[R, groups, d]`` are the layer's inputs (`conv_rows`, or a linear's input vectors
    as ``[R, 1, in]``), ``targets`` ``[R, out]`` the float outputs y (bias included).
    Example: rows [[1, 1]] (one row, one group), target [0.65], no bias: G = [[1, 1], [1, 1]],
    C = [[0.65], [0.65]]; the weight [[0.5, 0.5]] gives loss 1.0 − 1.3 + 0.4225 = 0.1225 = 0.35².
    """

    def __init__(self, rows: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, groups: int) -> None:
        x = rows.double()
        t = targets.double() - (bias.detach().double() if bias is not None else 0.0)
        n, out = x.shape[0], t.shape[1]
        tg = t.reshape(n, groups, out // groups)
        self.groups = groups
        self.gram = torch.einsum("rgd,rge->gde", x, x) / n           # [g, d, d]
        self.cross = torch.einsum("rgd,rgo->gdo", x, tg) / n         # [g, d, out/g]
        self.const = float(t.pow(2).sum()) / n
        self.scale = float(targets.double().pow(2).sum()) / n or 1.0  # ‖y‖² per row: the relative error's denominator
        self.mean_x, self.mean_t = x.mean(dim=0), t.mean(dim=0)      # [g, d], [out]
        self._gram32, self._cross32 = self.gram.float(), self.cross.float()

    def _quadratic(self, weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        wg = weight.reshape(self.groups, weight.shape[0] // self.groups, -1)  # [g, out/g, d]
        return (torch.bmm(wg, gram) * wg).sum() - 2 * (wg * cross.transpose(1, 2)).sum()

    def loss(self, weight: torch.Tensor) -> torch.Tensor:
        return self._quadratic(weight, self._gram32, self._cross32) + self.const

    def mean_residual(self, weight: torch.Tensor) -> torch.Tensor:
        wg = weight.detach().double().reshape(self.groups, weight.shape[0] // self.groups, -1)
        return torch.bmm(wg, self.mean_x.unsqueeze(2)).reshape(-1) - self.mean_t

    def error(self, weight: torch.Tensor, shift: torch.Tensor | None = None) -> float:
        value = float(self._quadratic(weight.detach().double(), self.gram, self.cross)) + self.const
        if shift is not None:  # E‖r − s‖² = E‖r‖² − 2 s·E[r] + ‖s‖²
            s = shift.double()
            value += float(s.pow(2).sum() - 2 * (s * self.mean_residual(weight)).sum())
        return max(value, 0.0) / self.scale


class SampledObjective:
    """The reconstruction term on minibatches of ``batch_size`` rows or samples drawn with ``generator``.

    ``forward(x, weight)`` computes the layer (bias included), e.g. `row_forward` on `conv_rows`
    data or ``lambda x, w: conv._conv_forward(x, w, conv.bias)`` on whole samples (then
    ``channel_axis=1``: the output channels' dim).
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 targets: torch.Tensor, batch_size: int, generator: torch.Generator, channel_axis: int = -1) -> None:
        self.forward, self.inputs, self.targets = forward, inputs, targets
        self.batch_size, self.generator, self.channel_axis = batch_size, generator, channel_axis

    def _residuals(self, weight: torch.Tensor, chunk: int = 256):  # noqa: ANN202 (a generator)
        with torch.no_grad():
            for i in range(0, self.inputs.shape[0], chunk):
                want = self.targets[i:i + chunk].double()
                out = self.forward(self.inputs[i:i + chunk], weight).double()
                yield (out - want).movedim(self.channel_axis, -1), want

    def mean_residual(self, weight: torch.Tensor) -> torch.Tensor:
        total, count = torch.zeros(weight.shape[0], dtype=torch.float64), 0
        for r, _ in self._residuals(weight):
            flat = r.reshape(-1, r.shape[-1])
            total += flat.sum(dim=0)
            count += flat.shape[0]
        return total / max(count, 1)

    def loss(self, weight: torch.Tensor) -> torch.Tensor:
        n = self.inputs.shape[0]
        idx = torch.randint(0, n, (min(self.batch_size, n),), generator=self.generator)
        out = self.forward(self.inputs[idx], weight)
        return (out - self.targets[idx]).pow(2).sum() * (weight.shape[0] / out.numel())  # Σ channels, mean elsewhere

    def error(self, weight: torch.Tensor, shift: torch.Tensor | None = None) -> float:
        num = den = 0.0
        for r, want in self._residuals(weight):
            if shift is not None:
                r = r - shift.double()
            num += float(r.pow(2).sum())
            den += float(want.pow(2).sum())
        return num / (den or 1.0) if not math.isnan(num) else math.inf


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1): 0 at V ≤ −2.4, 1 at V ≥ 2.4, 0.5 at V = 0."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def _shape(scale: torch.Tensor, w: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    if scheme.axis is None or scale.dim() == 0:
        return scale
    shape = [1] * w.dim()
    shape[scheme.axis] = -1
    return scale.reshape(shape)


def round_nearest(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """s·(clamp(round(W/s) + z) − z): the nearest-rounding grid weight (half to even, as the runtimes)."""
    s, z = _shape(scale, w, scheme), _shape(zero.to(w.dtype), w, scheme)
    return (torch.clamp(torch.round(w / s) + z, scheme.qmin, scheme.qmax) - z) * s


def adaround_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QScheme,
                    objective: Objective, config: AdaRoundConfig) -> AdaRoundResult:
    """Learn the rounding of ``w`` (on the grid ``scale``/``zero``/``scheme``) that minimises ``objective``.

    The reconstruction term is normalised by its value at nearest rounding, so ``reg_weight``
    weighs the rounding regulariser (a mean over the weights) against "how much of nearest's
    error is left", the same for every layer size and data scale. The hard rounding is kept
    by the caller only if `AdaRoundResult.better`.
    """
    w = w.detach().float()
    s, z = _shape(scale.detach().float(), w, scheme), _shape(zero.to(torch.float32), w, scheme)
    floor = torch.floor(w / s)
    v = torch.nn.Parameter(_inverse_rectified_sigmoid(w / s - floor))
    optimizer = torch.optim.Adam([v], lr=config.lr)
    warm = int(config.warmup * config.iterations)

    def grid(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(floor + h + z, scheme.qmin, scheme.qmax) - z) * s

    nearest = round_nearest(w, scale.detach().float(), zero, scheme)
    with torch.no_grad():
        norm = max(float(objective.loss(nearest)), 1e-30)
    with torch.enable_grad():
        for step in range(config.iterations):
            loss = objective.loss(grid(rectified_sigmoid(v))) / norm
            if step >= warm:
                progress = (step - warm) / max(1, config.iterations - warm)
                beta = config.beta_start + (config.beta_end - config.beta_start) * progress
                h = rectified_sigmoid(v)
                loss = loss + config.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        learned = grid((v >= 0).float())
        flipped = int((torch.round(learned / s) != torch.round(nearest / s)).sum())
        shift = objective.mean_residual(learned).float()
        return AdaRoundResult(learned, objective.error(nearest), objective.error(learned), flipped, shift,
                              objective.error(learned, shift))


def conv_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A 1-D/2-D zero-padded conv's input as receptive-field rows ``[N·L, groups, C/groups·k]``, or None.

    Row r holds what one output position reads, so the conv is a matrix product per group
    (`row_forward`) and a step of AdaRound can draw positions from every sample. Returns None
    (use whole samples) for 3-D convs, non-zero padding modes and string padding.
    Example: x [2, 4, 8, 8], a 3×3 conv with padding 1 → rows [128, 1, 36].
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, p, s = (1, *conv.kernel_size), (1, *conv.dilation), (0, *conv.padding), (1, *conv.stride)
    else:
        k, d, p, s = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [N, C·kh·kw, L]
    n, feats, positions = cols.shape
    return cols.transpose(1, 2).reshape(n * positions, conv.groups, feats // conv.groups)


def output_rows(y: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """A layer output as rows ``[positions, channels]`` matching `conv_rows` (conv: axis 1) or a linear (axis −1)."""
    y = y.movedim(channel_axis, -1)
    return y.reshape(-1, y.shape[-1])


def row_forward(bias: torch.Tensor | None, groups: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``forward(rows, weight)`` for `adaround_weight` on `conv_rows` data: a grouped matrix product plus bias.

    The weight ``[out, C/groups, *k]`` is flattened per group in `conv_rows`' order (channel, then taps).
    """
    def forward(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = w.shape[0]
        wg = w.reshape(groups, out // groups, -1)                     # [g, out/g, d]
        y = torch.einsum("rgd,god->rgo", rows, wg).reshape(rows.shape[0], out)
        return y if bias is None else y + bias

    return forward
