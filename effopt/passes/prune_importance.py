"""Scoring and compensation math for structured pruning: pure tensor functions, no IR types.

`prune_channels` owns the graph (which channels are coupled, how to cut them); this module owns
the numbers, so each formula can be tested against hand-computed values. Vocabulary:

- a *group* has C channels; a *slice* is a tensor whose dim 0 is indexed by group channel: a
  producer's weight rows ``W[c]`` or bias ``b[c]``, a consumer's input columns moved to dim 0, a
  BatchNorm's ``γ[c]``;
- a consumer may see several input positions per channel (a Linear after ``flatten`` sees H·W
  features per channel), so consumer functions take ``positions``: ``positions[c]`` lists the
  indices along the consumer weight's dim 1 that belong to channel c, in aligned order (position t
  of every channel is the same spatial location).

Scores: `magnitude` (L1/L2), `bn_scale` (Σ|γ|), `taylor_scores` (|Σ a·∂L/∂a|), `normalize`.
Compensation (the seed lecture's formulas (5) and (6)): `similarity_merges` + `absorb_merges` +
`merge_incoming` merge near-duplicate channels, and `constant_contribution` folds a constant
channel's output into the consumer's bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "Merge",
    "absorb_merges",
    "bn_scale",
    "constant_contribution",
    "magnitude",
    "merge_incoming",
    "normalize",
    "pseudo_label_loss",
    "similarity_merges",
    "taylor_scores",
]


# --- importance scores ------------------------------------------------------------------------


def _channels(slices: Sequence[torch.Tensor]) -> int:
    if not slices:
        raise ValueError("need at least one slice (a tensor whose dim 0 is the group channel)")
    counts = [int(s.shape[0]) if s.dim() else -1 for s in slices]
    if len(set(counts)) != 1 or counts[0] < 1:
        raise ValueError(f"every slice needs the same channel count on dim 0; got dim-0 sizes {counts}")
    return counts[0]


def magnitude(slices: Sequence[torch.Tensor], p: int) -> torch.Tensor:
    """[C] float64 scores: Σ over slices of Σ|slice[c]|^p, each slice first divided by its channel mean.

    Dividing each slice's per-channel sums by their mean makes every slice weigh the same in total,
    so a consumer with 4096 inputs per channel does not drown the producer's 9 taps; a slice whose
    mean is 0 (all zero) contributes nothing. Worked example, p=1: producer rows [[1, 1], [3, 3]]
    give sums [2, 6], mean 4 → [0.5, 1.5]; consumer columns [[10], [30]] give [0.5, 1.5] too;
    scores [1.0, 3.0]. Scaling either slice by 1000 leaves the scores unchanged.
    """
    if p not in (1, 2):
        raise ValueError(f"magnitude: p must be 1 or 2, got {p!r}")
    c = _channels(slices)
    total = torch.zeros(c, dtype=torch.float64)
    for s in slices:
        per_channel = s.detach().to(torch.float64).reshape(c, -1).abs().pow(p).sum(dim=1)
        mean = per_channel.mean()
        if mean > 0:
            total += per_channel / mean
    return total


def bn_scale(gammas: Sequence[torch.Tensor]) -> torch.Tensor:
    """[C] float64 scores: Σ over the group's BatchNorms of |γ[c]| (network slimming, Liu et al. 2017).

    A BN channel with γ ≈ 0 outputs ≈ β whatever its input, so it carries little information.
    Example: γ₁ = [0.5, -2], γ₂ = [1, 0] → [1.5, 2.0].
    """
    c = _channels(gammas)
    return sum((g.detach().to(torch.float64).reshape(c, -1).abs().sum(dim=1) for g in gammas),
               torch.zeros(c, dtype=torch.float64))


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """``scores / mean(scores)`` in float64, so groups of different layers rank on one scale.

    A group whose scores are all 0 (or empty) comes back as zeros, not NaN.
    Example: [1, 3] → [0.5, 1.5]; [0, 0] → [0, 0].
    """
    s = scores.detach().to(torch.float64)
    mean = s.mean() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    return s / mean if mean > 0 else torch.zeros_like(s)


def pseudo_label_loss(output: object) -> torch.Tensor:
    """Cross-entropy of the logits against their own argmax: a loss for data without labels.

    ``output`` is the model's output: the logits tensor ([N, classes, ...]), or a tuple/list whose
    first tensor is the logits. The gradient is non-zero unless the model is fully confident, which
    is what Taylor importance needs. Example: logits [[2, 0]] → target [0], loss log(1 + e⁻²) ≈ 0.127.
    """
    logits = output
    while isinstance(logits, (tuple, list)):
        tensors = [t for t in logits if isinstance(t, (torch.Tensor, tuple, list))]
        if not tensors:
            raise ValueError("pseudo_label_loss: the model output holds no tensor")
        logits = tensors[0]
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"pseudo_label_loss: expected floating-point logits, got {type(logits).__name__}")
    class_dim = 1 if logits.dim() > 1 else 0
    return F.cross_entropy(logits, logits.detach().argmax(dim=class_dim))


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the outputs of the named nodes as autograd inputs.

    A named output that does not require grad (frozen parameters, no grad input) becomes a leaf that
    does; it cannot lie on a path from an earlier named node, or it would require grad already. The
    graph continues on a clone, so an in-place op downstream (``ReLU(inplace=True)``) cannot change
    the captured activation.
    """

    def __init__(self, gm: fx.GraphModule, names: Mapping[str, int]) -> None:
        super().__init__(gm)
        self.names = names
        self.captured: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if n.name not in self.names:
            return result
        if not isinstance(result, torch.Tensor) or not result.is_floating_point():
            raise ValueError(f"taylor_scores: node {n.name!r} does not output a floating-point tensor")
        a = result if result.requires_grad else result.detach().requires_grad_(True)
        self.captured[n.name] = a
        return a.clone()


def taylor_scores(
    gm: fx.GraphModule,
    channel_dims: Mapping[str, int],
    batches: Iterable[tuple[torch.Tensor, ...]],
    loss: Callable[[object], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of activations (Molchanov et al. 2017, 2019), per channel.

    Zeroing channel c of activation a changes the loss by ≈ −Σ a·∂L/∂a over that channel, so per
    batch the score is ``|Σ over batch and every dim but the channel dim of a·∂L/∂a|``, and the
    result is its mean over batches (float64, one [C] tensor per name in ``channel_dims`` order).
    ``batches`` holds the positional inputs of ``gm``; ``loss`` maps its output to a scalar
    (`pseudo_label_loss` when there are no labels). The graph runs in eval mode through an
    `fx.Interpreter`; the training flags are restored afterwards and ``torch.autograd.grad`` asks only
    for the activations' gradients, so no parameter's ``.grad`` is set or changed.

    Example: y = w·relu(x) with w = [1, 0] and x = [[2, 3]]: a = [[2, 3]], ∂L/∂a = [[1, 0]] for
    L = y, so the scores of node ``relu`` along dim 1 are [2, 0].
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    unknown = [name for name in channel_dims if name not in nodes]
    if unknown:
        raise ValueError(f"taylor_scores: no node named {unknown} in the graph")
    totals: dict[str, torch.Tensor] = {}
    count = 0
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.enable_grad():
            for inputs in batches:
                interp = _Capture(gm, channel_dims)
                value = loss(interp.run(*((inputs,) if isinstance(inputs, torch.Tensor) else inputs)))
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise ValueError("taylor_scores: the loss must return a scalar tensor")
                acts = [interp.captured[name] for name in channel_dims]
                grads = torch.autograd.grad(value.reshape(()), acts, allow_unused=True) if value.requires_grad \
                    else (None,) * len(acts)
                for name, a, g in zip(channel_dims, acts, grads):
                    dim = channel_dims[name] % a.dim()
                    if g is None:
                        per_batch = torch.zeros(a.shape[dim], dtype=torch.float64)
                    else:
                        prod = (a.detach().double() * g.double()).movedim(dim, 0)
                        per_batch = prod.reshape(prod.shape[0], -1).sum(dim=1).abs()
                    totals[name] = totals[name] + per_batch if name in totals else per_batch
                count += 1
    finally:
        for m, training in modes:
            m.train(training)
    if count == 0:
        raise ValueError("taylor_scores: no calibration batches")
    return {name: totals[name] / count for name in channel_dims}


# --- similarity merging (seed formula (6)) ----------------------------------------------------


@dataclass(frozen=True)
class Merge:
    """Channel ``removed`` is represented by ``scale`` × channel ``kept``: row_removed ≈ scale·row_kept.

    Merge(removed=2, kept=0, scale=0.5): the consumer's column 0 absorbs 0.5 × column 2, then
    column 2 and producer row 2 are cut. ``scale == 0.0`` means plain removal (no good partner).
    """

    removed: int
    kept: int
    scale: float


def similarity_merges(rows: torch.Tensor, n: int, positive_only: bool = True) -> tuple[Merge, ...]:
    """Choose exactly ``n`` channels to merge away (0 ≤ n < C), most similar first.

    ``rows`` [C, k] holds each channel's incoming weights, bias as the last column (higher dims are
    flattened). Pairs (removed j, kept k) are taken greedily by cosine similarity (|cos| when not
    ``positive_only``: only for a purely linear path to the consumer), ``scale`` λ = ⟨r_j, r_k⟩/‖r_k‖² the least-squares fit r_j ≈ λ·r_k. When
    ``positive_only`` (the activation between is positively homogeneous, σ(λz) = λσ(z) for λ > 0,
    e.g. ReLU) λ is clamped at 0: a pair with cos ≤ 0 becomes a plain removal (λ = 0 is the
    constrained least-squares fit), ranked after every positive pair. A zero row scores 1 with λ = 0
    (σ(0) = 0 for such activations, so removing it is exact). No chains: a kept channel is never
    removed later, so the merges can be applied in any order. The greedy keeps enough free channels
    to always finish, so the result has exactly n merges even when few pairs are similar.
    Ties remove the higher index and keep the lower one (the seed lecture merges neuron 2 into 1).

    Example: rows [[1, 0], [2, 0], [0, 1]], n=1 → (Merge(removed=1, kept=0, scale=2.0),).
    """
    c = int(rows.shape[0])
    if not 0 <= n < max(c, 1):
        raise ValueError(f"similarity_merges: need 0 <= n < C, got n={n} with C={c}")
    if n == 0:
        return ()
    r = rows.detach().to(torch.float64).reshape(c, -1)
    norms = r.norm(dim=1)
    zero = norms == 0
    unit = r / torch.where(zero, torch.ones_like(norms), norms)[:, None]
    cos = unit @ unit.T
    cos = (cos + cos.T) / 2  # exactly symmetric, so the tie rule below decides which of a pair goes
    score = cos if positive_only else cos.abs()
    score[zero] = 1.0
    score.fill_diagonal_(-torch.inf)
    removed = torch.zeros(c, dtype=torch.bool)
    target = torch.zeros(c, dtype=torch.bool)
    neg_inf = torch.tensor(-torch.inf, dtype=torch.float64)

    def best(idx: torch.Tensor, col_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masked = torch.where(col_ok[None, :], score[idx], neg_inf)
        k = masked.argmax(dim=1)  # first maximum: the lowest index is kept on ties
        return masked.gather(1, k[:, None]).squeeze(1), k

    col_ok = ~removed
    best_val, best_k = best(torch.arange(c), col_ok)
    merges: list[Merge] = []
    while len(merges) < n:
        row_ok = ~removed & ~target
        cand = torch.where(row_ok, best_val, neg_inf).flip(0)
        j = c - 1 - int(cand.argmax())  # last maximum: the highest index is removed on ties
        k = int(best_k[j])
        lam = 0.0
        if not zero[j] and not zero[k]:
            lam = float(r[j] @ r[k]) / float(r[k] @ r[k])
            lam = max(lam, 0.0) if positive_only else lam
        merges.append(Merge(removed=j, kept=k, scale=lam))
        removed[j] = True
        target[k] = True
        # A new kept channel costs two free channels; once the remaining merges need every free
        # channel, only channels that already absorbed one may absorb more.
        free = c - int(removed.sum()) - int(target.sum())
        col_ok = ~removed if n - len(merges) < free else target.clone()
        stale = torch.nonzero(~removed & ~target & ~col_ok[best_k]).flatten()
        if stale.numel():
            best_val[stale], best_k[stale] = best(stale, col_ok)
    return tuple(merges)


def _check_positions(positions: Sequence[Sequence[int]], channels: Iterable[int], what: str) -> None:
    for ch in channels:
        if not 0 <= ch < len(positions):
            raise ValueError(f"{what}: channel {ch} has no positions (the group has {len(positions)} channels)")


def absorb_merges(weight: torch.Tensor, positions: Sequence[Sequence[int]], merges: Sequence[Merge]) -> torch.Tensor:
    """A new consumer weight where ``W[:, pos_kept[t]] += scale·W[:, pos_removed[t]]`` for every merge and t.

    The removed columns stay in place for the caller to cut. Exact when row_removed = scale·row_kept
    and σ(λz) = λσ(z): the consumer saw W_j·σ(λ z_k) + W_k·σ(z_k) = (W_k + λW_j)·σ(z_k).
    Seed formula (6) is the case λ = 1: the outgoing columns of neurons 1 and 2 are summed.
    Example: W = [[1, 10, 100]], positions [[0], [1], [2]], Merge(2, 0, 0.5) → [[51, 10, 100]].
    """
    removed = [m.removed for m in merges]
    if len(set(removed)) != len(removed) or {m.kept for m in merges} & set(removed):
        raise ValueError("absorb_merges: a channel is removed twice or removed after absorbing another")
    _check_positions(positions, [ch for m in merges for ch in (m.removed, m.kept)], "absorb_merges")
    out = weight.detach().to(torch.float64).clone()
    for m in merges:
        kept, gone = list(positions[m.kept]), list(positions[m.removed])
        if len(kept) != len(gone):
            raise ValueError(f"absorb_merges: channels {m.kept} and {m.removed} have {len(kept)} and "
                             f"{len(gone)} positions; they must be aligned")
        out[:, kept] += m.scale * out[:, gone]
    return out.to(weight.dtype)


def merge_incoming(rows: torch.Tensor, merges: Sequence[Merge], tol: float = 1e-2) -> torch.Tensor:
    """New incoming rows (the seed's formula (6)): a kept row becomes the mean of itself and the rows
    merged into it with ``|scale − 1| ≤ tol``; rows of other kept channels stay as they are.

    Why only scale ≈ 1: `absorb_merges` assumes the kept channel still computes z_k, so averaging r_k
    with r_j = λ·r_k would give ((1 + λ)/2)·r_k and scale the kept channel unless λ = 1. When λ ≈ 1 the
    mean is the midpoint of two near-equal rows, which splits the error between the two channels
    instead of putting it all on the removed one; for exact duplicates it changes nothing.
    ``rows`` [C, ...] (any trailing shape, e.g. conv weights, or a bias [C]); removed rows are left
    for the caller to cut. Example: rows [[1, 0, 1], [1, 0.5, 1]], Merge(1, 0, 1.0) → row 0 = [1, 0.25, 1].
    """
    out = rows.detach().to(torch.float64).clone()
    src = rows.detach().to(torch.float64)
    kept_order = list(dict.fromkeys(m.kept for m in merges))
    for k in kept_order:
        near = [m.removed for m in merges if m.kept == k and abs(m.scale - 1.0) <= tol]
        if near:
            out[k] = src[[k, *near]].mean(dim=0)
    return out.to(rows.dtype)


# --- constant channels (seed formula (5)) -----------------------------------------------------


def constant_contribution(
    weight: torch.Tensor, positions: Sequence[Sequence[int]], values: Mapping[int, float]
) -> torch.Tensor:
    """[out] bias delta ``Σ_c Σ_t W[:, pos_c[t], ...].sum(spatial) · values[c]`` for removed constant channels.

    A channel whose incoming weights are all pruned outputs the constant v_c = σ(b_c) (or, as an
    approximation, its mean activation); the consumer then adds W[:, c]·v_c to its output whatever
    the input, so that amount moves into its bias and the channel can be cut (seed formula (5):
    B2'_k = B2_k + W2[k, 2]·σ(B1_2)). Exact for a Linear consumer and for a conv without padding;
    with zero padding the border outputs see fewer than all kernel taps of the constant map, so
    there the fold over-counts (approximate at the borders only).
    Example: W = [[1, 2], [3, 4]], positions [[0], [1]], values {1: 0.5} → [1.0, 2.0].
    """
    _check_positions(positions, values, "constant_contribution")
    w = weight.detach().to(torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2) if w.dim() > 2 else w
    delta = torch.zeros(w.shape[0], dtype=torch.float64)
    for c in sorted(values):
        delta += w[:, list(positions[c])].sum(dim=1) * float(values[c])
    return delta.to(weight.dtype)
