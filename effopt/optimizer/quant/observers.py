"""Calibration observers: statistics of a tensor → (scale, zero_point) for a `QScheme`.

During calibration `FakeQuant.forward` hands every tensor it sees to
``observer.update(x.detach())``; afterwards ``observer.qparams(scheme)`` picks a
clipping range [lo, hi] and turns it into (scale, zero_point) with
`qparams_from_range`, so zero is always exactly representable.

The four kinds differ only in how they choose [lo, hi]:

=================  =========================================================
``minmax``         running min/max of everything seen (never clips)
``moving_average`` EMA of per-batch min/max, r ← (1−m)·r + m·batch
``percentile``     the (100−p)% and p% quantiles of everything seen
``mse``            the range minimising E[(x − fq(x))²] over everything seen
=================  =========================================================

Why the last two exist: on Laplace-like activations the few largest values
stretch the min/max range, so every other value pays a coarse step. With
1M Laplace(0, 1) samples the extremes are ≈ ±13, the uint8 step ≈ 0.105 and
the rounding MSE ≈ 0.105²/12 ≈ 9e-4. Clipping at ≈ ±10 (step 0.078) adds
≈ 2·e⁻¹⁰ ≈ 1e-4 of clipping error but cuts the rounding error to 5e-4: 6e-4
in all. At 4 bits the gain is ≈ 5× (0.24 → 0.05).

Per-channel (``axis`` given): statistics are kept per index along ``axis``,
reduced over every other dim, and ``qparams`` returns [C]-shaped tensors.

Percentile and MSE share one bounded-memory `Histogram` (C × ``bins``
float64 counts, however many batches arrive). Its range starts at the first
batch's [min, max] and, when a later batch falls outside, widens by a power
of two so that 2^k old bins merge *exactly* into one new bin: every value
stays counted in a bin that contains it, never spread by interpolation. The
price is resolution: a batch with a huge outlier coarsens the bins for
everything observed, before and after. We chose the histogram over a
reservoir sample because it needs no randomness and sees every value (the
tails that decide the clipping range are exactly what a sample misses).

Inputs must be finite: a NaN or inf during calibration is a data bug, so
``update`` raises ValueError naming the observer kind rather than letting
NaN leak into a scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch

from effopt.optimizer.quant.schemes import QScheme, QuantConv, QuantLinear, qparams_from_range

ObserverKind = Literal["minmax", "moving_average", "percentile", "mse"]
OBSERVER_KINDS: tuple[ObserverKind, ...] = ("minmax", "moving_average", "percentile", "mse")

MSE_GRID = 100
"""Candidates per search stage of the MSE observer (clip at k/100 of the full range, k = 1..100)."""

_MSE_CHUNK_ELEMENTS = 1 << 20
"""C × candidates × bins per block of the MSE search (8 MiB float64 temporaries).

Few large blocks rather than many cache-sized ones: each torch op is a parallel
region, and on an oversubscribed CPU every region can stall for a scheduler tick
(measured: 2^16-element blocks made a test 4× slower under load, no faster idle).
"""


class Observer(Protocol):
    """Collects tensor statistics during calibration, then chooses quantization parameters."""

    def update(self, x: torch.Tensor) -> None: ...

    def qparams(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Range:
    """Per-channel interval [lo, hi] (float64, shape [C]; C = 1 for per-tensor)."""

    lo: torch.Tensor
    hi: torch.Tensor


def channel_rows(x: torch.Tensor, axis: int | None, kind: str) -> torch.Tensor:
    """``x`` as float64 rows [C, N]: one row per channel along ``axis``, or a single row.

    Why rows: every statistic below is then a reduction over dim 1, the same
    code for per-tensor and per-channel.
    Example: x of shape [4, 3, 2] with axis=1 → rows [3, 8]; axis=None → [1, 24].
    """
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{kind} observer: calibration tensor of shape {tuple(x.shape)} contains {bad} NaN/inf value(s); "
            "observers assume finite data, so check the calibration inputs and the model's float outputs"
        )
    x = x.to(torch.float64)
    if axis is None:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{kind} observer: axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def batch_range(rows: torch.Tensor) -> Range:
    """Per-row [min, max]. Example: rows [[1, -2, 3]] → Range(lo=[-2], hi=[3])."""
    return Range(rows.amin(dim=1), rows.amax(dim=1))


def merge_minmax(prev: Range | None, batch: Range) -> Range:
    """Running min/max. Example: [−1, 2] then [0, 5] → [−1, 5]."""
    if prev is None:
        return batch
    return Range(torch.minimum(prev.lo, batch.lo), torch.maximum(prev.hi, batch.hi))


def ema_range(prev: Range | None, batch: Range, momentum: float) -> Range:
    """r ← (1 − m)·r + m·batch, with the first batch as the start.

    Example (m = 0.1): hi 1.0 then a batch with hi 100 → 0.9·1 + 0.1·100 = 10.9,
    where min/max would jump to 100.
    """
    if prev is None:
        return batch
    return Range((1 - momentum) * prev.lo + momentum * batch.lo, (1 - momentum) * prev.hi + momentum * batch.hi)


def range_qparams(r: Range, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """`qparams_from_range` of a per-channel range; a per-tensor range ([1]) gives 0-dim tensors."""
    scale, zero = qparams_from_range(r.lo, r.hi, scheme)
    if scheme.axis is None:
        return scale[0], zero[0]
    return scale, zero


@dataclass(frozen=True)
class Histogram:
    """Per-channel equal-width histogram whose range only grows.

    Row c covers [edge_lo[c], edge_lo[c] + bins·width[c]); ``data_min`` /
    ``data_max`` are the exact extremes seen, so answers never leave the data.
    Example: bins=4 over [0, 4) with counts [1, 0, 2, 1]; a value 9 arrives →
    `grow_histogram` doubles the width twice to 4, range [0, 16), the four old
    bins merge into bin 0: counts [4, 0, 0, 0]; then 9 is counted in bin 2.
    """

    edge_lo: torch.Tensor  # [C] float64
    width: torch.Tensor  # [C] float64, > 0
    counts: torch.Tensor  # [C, bins] float64
    data_min: torch.Tensor  # [C]
    data_max: torch.Tensor  # [C]

    @property
    def bins(self) -> int:
        return self.counts.shape[1]


def empty_histogram(r: Range, bins: int) -> Histogram:
    """A histogram spanning exactly ``r`` (a zero-width range gets a tiny positive one).

    Example: constant 5.0 → range [5, 5 + 5·2⁻²⁰) so a constant tensor still has bins.
    """
    span = r.hi - r.lo
    tiny = torch.clamp(torch.maximum(r.lo.abs(), r.hi.abs()) * 2.0**-20, min=2.0**-40)
    span = torch.maximum(span, tiny)
    counts = torch.zeros(r.lo.shape[0], bins, dtype=torch.float64, device=r.lo.device)
    return Histogram(r.lo.clone(), span / bins, counts, r.lo.clone(), r.hi.clone())


def grow_histogram(h: Histogram, r: Range) -> Histogram:
    """Widen ``h`` to cover ``r`` by doubling the bin width k times, merging 2^k old bins exactly.

    The new left edge sits a whole number j of new bins below the old one, so
    old bin i lands in new bin j + ⌊i / 2^k⌋. Channels already covering ``r``
    keep k = 0, j = 0 (unchanged).
    Example: bins=4 over [0, 4), r = [−3, 2]: k = 1 (width 2), j = 2 →
    range [−4, 4); old bins 0,1 → new bin 2, old bins 2,3 → new bin 3.
    """
    bins = h.bins
    top = h.edge_lo + bins * h.width
    need_lo = torch.minimum(h.edge_lo, r.lo)
    need_hi = torch.maximum(top, r.hi)
    if bool(((need_lo >= h.edge_lo) & (need_hi <= top)).all()):
        return Histogram(h.edge_lo, h.width, h.counts, torch.minimum(h.data_min, r.lo), torch.maximum(h.data_max, r.hi))
    k = torch.ceil(torch.log2((need_hi - need_lo) / (bins * h.width))).clamp(min=0)
    # k usually fits and k + 1 always does for bins ≥ 4 (a new bin is then at most the needed span);
    # the extra tries cover 2 or 3 bins.
    for _ in range(4):
        width = h.width * torch.pow(2.0, k)
        j = torch.ceil((h.edge_lo - need_lo) / width)
        fits = h.edge_lo - j * width + bins * width >= need_hi
        if bool(fits.all()):
            break
        k = torch.where(fits, k, k + 1)
    width = h.width * torch.pow(2.0, k)
    j = torch.ceil((h.edge_lo - need_lo) / width)
    old = torch.arange(bins, dtype=torch.float64, device=h.counts.device)
    target = (j[:, None] + torch.floor(old[None, :] / torch.pow(2.0, k)[:, None])).clamp(0, bins - 1).long()
    counts = torch.zeros_like(h.counts).scatter_add_(1, target, h.counts)
    return Histogram(h.edge_lo - j * width, width, counts, torch.minimum(h.data_min, r.lo),
                     torch.maximum(h.data_max, r.hi))


def add_to_histogram(h: Histogram | None, rows: torch.Tensor, bins: int) -> Histogram:
    """Count ``rows`` ([C, N]) into ``h``, growing it first if needed. The first call sizes it to the batch."""
    r = batch_range(rows)
    h = empty_histogram(r, bins) if h is None else grow_histogram(h, r)
    c = rows.shape[0]
    idx = torch.floor((rows - h.edge_lo[:, None]) / h.width[:, None]).clamp(0, h.bins - 1).long()
    idx = idx + torch.arange(c, device=rows.device)[:, None] * h.bins
    added = torch.bincount(idx.reshape(-1), minlength=c * h.bins).reshape(c, h.bins).to(torch.float64)
    return Histogram(h.edge_lo, h.width, h.counts + added, h.data_min, h.data_max)


def histogram_quantile(h: Histogram, q: float) -> torch.Tensor:
    """Per-channel q-quantile, interpolating linearly inside the bin where the CDF crosses q.

    Example: one row, bins [0,1),[1,2) with counts [3, 1], q = 0.5 → target 2
    of 4 values, reached 2/3 of the way through bin 0 → 0.667. q = 0 and q = 1 give
    the exact min and max (so percentile 100 is min/max).
    """
    if q <= 0.0:
        return h.data_min.clone()
    if q >= 1.0:
        return h.data_max.clone()
    cum = h.counts.cumsum(dim=1)
    target = q * cum[:, -1:]
    idx = torch.searchsorted(cum, target).clamp(max=h.bins - 1)
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
    n = h.counts.gather(1, idx)
    frac = torch.where(n > 0, (target - before) / n.clamp(min=1e-300), torch.zeros_like(n)).clamp(0, 1)
    value = h.edge_lo + (idx[:, 0].to(torch.float64) + frac[:, 0]) * h.width
    return torch.clamp(value, h.data_min, h.data_max)


def _cube_difference(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(x2³ − x1³)/3 = ∫_{x1}^{x2} t² dt, factored so that nearby large x1, x2 do not cancel."""
    return (x2 - x1) * (x2 * x2 + x1 * x2 + x1 * x1) / 3


def interval_sq_code_error(ua: torch.Tensor, ub: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """∫_{ua}^{ub} (u − clamp(round(u), qmin, qmax))² du, in code units (u = x/s + z).

    Three pieces, each integrated over the part of [ua, ub] it owns: clipping
    below, (u − qmin)² for u ≤ qmin + ½; the rounding sawtooth (u − round(u))²,
    whose every whole period adds 1/12; clipping above, (u − qmax)² for
    u ≥ qmax − ½. Each piece is a difference of nearby terms written so that
    it does not cancel, which keeps far-clipped bins (u ≈ 10⁴) exact.
    Example (qmin=0, qmax=3): [−½, 3½] → 1/12 + 2/12 + 1/12 = 4/12;
    [5, 6] → ∫ (u − 3)² = (27 − 8)/3 = 19/3.
    """
    left, right = qmin + 0.5, qmax - 0.5
    head = _cube_difference(ua.clamp(max=left) - qmin, ub.clamp(max=left) - qmin)
    tail = _cube_difference(ua.clamp(min=right) - qmax, ub.clamp(min=right) - qmax)
    t1, t2 = ua.clamp(left, right), ub.clamp(left, right)
    n1, n2 = torch.round(t1), torch.round(t2)
    d1, d2 = t1 - n1, t2 - n2
    mid = (n2 - n1) / 12 + (d2 * d2 * d2 - d1 * d1 * d1) / 3
    return head + mid + tail


def mean_sq_code_error(ua: torch.Tensor, ub: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """`interval_sq_code_error` / (ub − ua); for an interval under 1e-6 codes long, the error at its midpoint.

    Example (qmin=0, qmax=3): [5, 6] → 19/3 ≈ 6.33; [1.25, 1.25] → 0.25² = 0.0625.
    """
    length = ub - ua
    mid = (ua + ub) / 2
    point = mid - torch.clamp(torch.round(mid), qmin, qmax)
    return torch.where(length > 1e-6, interval_sq_code_error(ua, ub, qmin, qmax) / length.clamp(min=1e-6),
                       point * point)


def histogram_sq_errors(h: Histogram, lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Σ over observed values of (x − fq(x))² for each candidate range, assuming values spread evenly in a bin.

    ``lo``/``hi`` are [C, K] candidates; returns [C, K]. Each candidate goes
    through `qparams_from_range`, so the error is that of the (scale, zero)
    that would actually be used. A bin [a, b) (cut to the exact data range)
    contributes count · s² · `mean_sq_code_error`(a/s + z, b/s + z): the
    exact mean squared error of the staircase quantizer over the bin,
    rounding noise (≈ s²/12 for bins wider than a step) and clipping alike.
    Only non-empty bins are evaluated (a 576-value weight channel fills at
    most 576 of 2048 bins).
    Example: one bin of 10 values spread over [0, 1) and s = 1/15 (4-bit, z = 0)
    → 10 · s²/12 ≈ 0.0037.
    """
    a, b, counts = _occupied_bins(h)
    scale, zero = qparams_from_range(lo, hi, scheme)
    s, z = scale.double(), zero.double()
    c, k = lo.shape
    m = counts.shape[1]
    rows_step = max(1, min(c, _MSE_CHUNK_ELEMENTS // m))
    cand_step = max(1, _MSE_CHUNK_ELEMENTS // (rows_step * m))
    out = torch.empty(c, k, dtype=torch.float64, device=lo.device)
    for r0 in range(0, c, rows_step):
        rs = slice(r0, r0 + rows_step)
        for k0 in range(0, k, cand_step):
            ks = slice(k0, k0 + cand_step)
            sc, zc = s[rs, ks, None], z[rs, ks, None]
            mean_sq = mean_sq_code_error(a[rs, None, :] / sc + zc, b[rs, None, :] / sc + zc, scheme.qmin, scheme.qmax)
            out[rs, ks] = (counts[rs, None, :] * mean_sq).sum(dim=2)
    return out * s * s


def _occupied_bins(h: Histogram) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges [a, b) cut to the data range, and counts, of each row's non-empty bins, padded with empty ones: [C, M]."""
    occupied = h.counts > 0
    m = max(1, int(occupied.sum(dim=1).max()))
    index = torch.argsort((~occupied).to(torch.int8), dim=1, stable=True)[:, :m]
    a = h.edge_lo[:, None] + index.to(torch.float64) * h.width[:, None]
    b = a + h.width[:, None]
    lo, hi = h.data_min[:, None], h.data_max[:, None]
    return torch.clamp(a, lo, hi), torch.clamp(b, lo, hi), h.counts.gather(1, index)


def _best(errors: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the candidate (lo, hi) with the least error (the first one on ties, so the search is deterministic)."""
    i = errors.argmin(dim=1, keepdim=True)
    return lo.gather(1, i)[:, 0], hi.gather(1, i)[:, 0]


def mse_range(h: Histogram, scheme: QScheme, grid: int = MSE_GRID) -> Range:
    """The clipping range with the least histogram-estimated squared error.

    Candidates shrink the full range toward zero (zero stays inside because
    `qparams_from_range` keeps it): symmetric schemes search the bound
    b·k/grid; asymmetric ones search the pair (lo, hi)·k/grid, then hi alone
    with lo fixed, then lo alone with hi fixed (one round of coordinate
    descent, 3·grid evaluations instead of grid²). Each stage keeps its best
    so far, so the result is never worse (by the estimate) than min/max.
    Example: Laplace(0, 1), 1M values, 4-bit: min/max ≈ ±13, chosen ≈ ±5.
    """
    full_lo = torch.clamp(h.data_min, max=0.0)
    full_hi = torch.clamp(h.data_max, min=0.0)
    alphas = torch.arange(1, grid + 1, dtype=torch.float64, device=full_lo.device) / grid
    if scheme.symmetric:
        bound = torch.maximum(-full_lo, full_hi)[:, None] * alphas[None, :]
        lo, hi = _best(histogram_sq_errors(h, -bound, bound, scheme), -bound, bound)
        return Range(lo, hi)
    cand_lo, cand_hi = full_lo[:, None] * alphas, full_hi[:, None] * alphas
    lo, hi = _best(histogram_sq_errors(h, cand_lo, cand_hi, scheme), cand_lo, cand_hi)
    for move_hi in (True, False):
        cand_lo = torch.cat([lo[:, None], lo[:, None].expand(-1, grid) if move_hi else full_lo[:, None] * alphas], 1)
        cand_hi = torch.cat([hi[:, None], full_hi[:, None] * alphas if move_hi else hi[:, None].expand(-1, grid)], 1)
        lo, hi = _best(histogram_sq_errors(h, cand_lo, cand_hi, scheme), cand_lo, cand_hi)
    return Range(lo, hi)


# --------------------------------------------------------------------------- observers


class _RangeObserver:
    """Shared shell: validates input, feeds rows to ``_absorb``, turns ``_range`` into qparams."""

    kind: ClassVar[ObserverKind]

    def __init__(self, axis: int | None) -> None:
        self.axis = axis
        self.channels: int | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = channel_rows(x, self.axis, self.kind)
        if rows.numel() == 0:
            return
        if self.channels is not None and rows.shape[0] != self.channels:
            raise ValueError(f"{self.kind} observer (axis={self.axis}): tensor of shape {tuple(x.shape)} has "
                             f"{rows.shape[0]} channels, earlier batches had {self.channels}")
        self.channels = rows.shape[0]
        self._absorb(rows)

    def qparams(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
        if scheme.axis != self.axis:
            raise ValueError(f"{self.kind} observer: statistics were collected with axis={self.axis} but the scheme "
                             f"has axis={scheme.axis}; create the observer with make_observer(..., axis={scheme.axis})")
        if self.channels is None:
            raise ValueError(f"{self.kind} observer: no data observed; "
                             "run calibration batches before asking for qparams")
        return range_qparams(self._range(scheme), scheme)

    def _absorb(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, scheme: QScheme) -> Range:
        raise NotImplementedError


class MinMaxObserver(_RangeObserver):
    """Running min/max: never clips, so every observed value is within scale/2 of its code.

    Example: batches [−1, 0.5] and [0, 3] → range [−1, 3] → uint8 s = 4/255, z = 64.
    """

    kind: ClassVar[ObserverKind] = "minmax"

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.state: Range | None = None

    def _absorb(self, rows: torch.Tensor) -> None:
        self.state = merge_minmax(self.state, batch_range(rows))

    def _range(self, scheme: QScheme) -> Range:
        assert self.state is not None  # guarded by qparams
        return self.state


class MovingAverageObserver(_RangeObserver):
    """EMA of per-batch min/max: one outlier batch moves the range by only m of the jump.

    Example (m = 0.1): batch maxima 1, 100 → hi = 0.9·1 + 0.1·100 = 10.9 (min/max: 100).
    """

    kind: ClassVar[ObserverKind] = "moving_average"

    def __init__(self, axis: int | None = None, momentum: float = 0.1) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"moving_average observer: momentum {momentum} not in (0, 1]")
        super().__init__(axis)
        self.momentum = momentum
        self.state: Range | None = None

    def _absorb(self, rows: torch.Tensor) -> None:
        self.state = ema_range(self.state, batch_range(rows), self.momentum)

    def _range(self, scheme: QScheme) -> Range:
        assert self.state is not None  # guarded by qparams
        return self.state


class PercentileObserver(_RangeObserver):
    """Clip at the two-sided ``percentile`` of all observed values (from a bounded `Histogram`).

    Example: percentile 99.99 over 1M values → lo at the 100th smallest, hi at
    the 100th largest (bin-interpolated).
    """

    kind: ClassVar[ObserverKind] = "percentile"

    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile observer: percentile {percentile} not in (50, 100]")
        if bins < 2:
            raise ValueError(f"percentile observer: bins {bins} must be at least 2")
        super().__init__(axis)
        self.percentile = percentile
        self.bins = bins
        self.hist: Histogram | None = None

    def _absorb(self, rows: torch.Tensor) -> None:
        self.hist = add_to_histogram(self.hist, rows, self.bins)

    def _range(self, scheme: QScheme) -> Range:
        assert self.hist is not None  # guarded by qparams
        q = self.percentile / 100.0
        return Range(histogram_quantile(self.hist, 1.0 - q), histogram_quantile(self.hist, q))


class MSEObserver(_RangeObserver):
    """Clip where the estimated E[(x − fq(x))²] over all observed values is least (see `mse_range`).

    The search depends on the scheme (bits, symmetry), so ``qparams`` runs it
    per call; the histogram is shared.
    """

    kind: ClassVar[ObserverKind] = "mse"

    def __init__(self, axis: int | None = None, bins: int = 2048, grid: int = MSE_GRID) -> None:
        if bins < 2:
            raise ValueError(f"mse observer: bins {bins} must be at least 2")
        if grid < 1:
            raise ValueError(f"mse observer: grid {grid} must be at least 1")
        super().__init__(axis)
        self.bins = bins
        self.grid = grid
        self.hist: Histogram | None = None

    def _absorb(self, rows: torch.Tensor) -> None:
        self.hist = add_to_histogram(self.hist, rows, self.bins)

    def _range(self, scheme: QScheme) -> Range:
        assert self.hist is not None  # guarded by qparams
        return mse_range(self.hist, scheme, self.grid)


def make_observer(kind: ObserverKind, axis: int | None = None, *, momentum: float = 0.1,
                  percentile: float = 99.99, bins: int = 2048) -> Observer:
    """A fresh observer of ``kind``; ``axis`` must match the ``QScheme.axis`` it will serve.

    Options a kind does not use are ignored (``momentum`` only matters for
    moving_average, ``percentile`` for percentile, ``bins`` for percentile and mse).
    Example: ``make_observer("mse", axis=0)`` for per-output-channel weights.
    """
    if kind == "minmax":
        return MinMaxObserver(axis)
    if kind == "moving_average":
        return MovingAverageObserver(axis, momentum)
    if kind == "percentile":
        return PercentileObserver(axis, percentile, bins)
    if kind == "mse":
        return MSEObserver(axis, bins)
    raise ValueError(f"unknown observer kind {kind!r}; choose one of {', '.join(OBSERVER_KINDS)}")


def calibrate_weight(layer: QuantConv | QuantLinear, kind: str) -> None:
    """Set a quantized layer's weight qparams from its current weights with a ``kind`` observer (per its scheme's axis).

    Example: after `_promote` gives a 4-bit layer an 8-bit `FakeQuant`, this fits the new grid to the weights.
    """
    fq = layer.weight_quant
    obs = make_observer(kind, axis=fq.scheme.axis)  # type: ignore[arg-type]
    obs.update(layer.weight.detach())
    fq.set_qparams(*obs.qparams(fq.scheme))
