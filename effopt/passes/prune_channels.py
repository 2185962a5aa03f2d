"""Structured pruning: remove whole channels, so the model really gets smaller and faster.

Three concerns, three modules, as in Torch-Pruning: *what is coupled* is
`effopt.optimizer.ir.channels` (groups of channels that must go together: residual adds, concats,
depthwise convs, flatten into a Linear...); *how to score* is `effopt.passes.prune_importance`
(magnitude, BatchNorm γ, Taylor, similarity); *how to cut* is `effopt.passes.channel_surgery`.
This pass decides how many channels each group loses and which:

- ``ratio`` with ``scope: uniform`` removes that fraction of every prunable group; ``scope: global``
  ranks every channel of every group by its normalised importance and removes the lowest ones;
  ``per_layer`` overrides the ratio of a layer's group;
- or a target on the recipe's hardware profile, ``flops_reduction``, ``speedup`` or
  ``latency_budget_ms``: channels are ranked by importance per unit of predicted time (or FLOPs)
  saved, and the smallest global cut that meets the target (by the cost model) is taken;
- ``round_to`` keeps channel counts multiples of the profile's ``channel_multiple``;
- removed channels' mean contribution is folded into their consumers' biases (``compensate``);
  ``similarity`` merges a channel into its most similar kept one instead (exact for duplicates).

Channels are first *masked* (their consumers' weights zeroed, which is exactly the pruned model), so
``iterative`` rounds and lottery-ticket ``rewind`` work on stable channel ids; the physical cut comes
last. Fine-tuning runs through the fine-tuning service, distilling from the unpruned model when the
training data has no labels.

Example: ``prune_channels: {ratio: 0.5}`` on a ResNet-style model halves every block's inner
channels and every residual stream group, keeps the first conv and the classifier, and rounds
channel counts to multiples of 8 on ``x86-avx2``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.analysis import annotate, totals
from effopt.optimizer.ir.channels import NONE, ChannelAnalysis, ChannelGroup, Member, analyze_channels
from effopt.optimizer.ir.core import IR
from effopt.optimizer.ir.cost_model import estimate
from effopt.optimizer.ir.lift import lift_functional_layers
from effopt.passes import prune_importance as imp
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip
from effopt.passes.channel_surgery import cut
from effopt.passes.finetuning import FineTuneConfig

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "similarity"]
DEFAULT_RATIO = 0.3
MAX_GROUP_RATIO = 0.9  # a group always keeps at least a tenth of its channels (and one per cell)


class PruneChannelsOptions(PassOptions):
    """Options of prune_channels: how much (a ratio or a target), which channels, and recovery."""

    ratio: float | None = Field(
        None, ge=0, lt=1, description=f"fraction of channels to remove from each prunable group (default "
        f"{DEFAULT_RATIO} when neither a target nor per_layer is given)")
    scope: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: the same ratio in every group; global: rank channels across all groups")
    per_layer: dict[str, float] = Field(
        default_factory=dict, description="ratio per layer (node name or module path of a group's producer)")
    protect: tuple[str, ...] | None = Field(
        None, description="layers whose output channels are never pruned; default: the first conv/linear (unless "
        "its channels are a residual stream other layers add into) and the final classifier")
    round_to: int | None = Field(
        None, ge=1, description="keep channel counts multiples of this; default: the profile's channel_multiple")
    flops_reduction: float | None = Field(None, gt=0, lt=1, description="target: remove this fraction of the FLOPs")
    speedup: float | None = Field(None, gt=1, description="target: predicted latency on the profile divided by this")
    latency_budget_ms: float | None = Field(None, gt=0, description="target: predicted latency on the profile (ms)")
    importance: Criterion = Field(
        "l2", description="l1 / l2: weight magnitude of the whole group; bn_scale: BatchNorm |γ|; taylor: "
        "|activation × gradient| on calibration data; similarity: merge near-duplicate channels (data-free)")
    compensate: bool = Field(True, description="fold each removed channel's mean contribution into the next biases")
    calibration_batches: int = Field(8, ge=1, description="batches of calibration data for taylor and compensation")
    iterative: int = Field(1, ge=1, description="prune in this many rounds, fine-tuning after each")
    rewind: bool = Field(False, description="lottery ticket: before each fine-tuning, reset surviving weights to the "
                         "original model's")
    finetune: FineTuneConfig | None = Field(
        None, description="fine-tune after each round (needs data.train; distils from the original without labels)")

    @model_validator(mode="after")
    def _one_amount(self) -> PruneChannelsOptions:
        given = [k for k in ("ratio", "flops_reduction", "speedup", "latency_budget_ms") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, flops_reduction, speedup, latency_budget_ms (got {', '.join(given)})")
        for name, r in self.per_layer.items():
            if not 0 <= r < 1:
                raise ValueError(f"per_layer[{name!r}] = {r}: a ratio must be in [0, 1)")
        if self.rewind and self.finetune is None:
            raise ValueError("rewind resets weights before fine-tuning: it needs finetune")
        return self

    @property
    def amount(self) -> float:
        """The ratio of groups ``per_layer`` does not name: ``ratio``, else 0.3 unless per_layer is given."""
        if self.ratio is not None:
            return self.ratio
        return 0.0 if self.per_layer else DEFAULT_RATIO

    @property
    def target(self) -> tuple[str, float] | None:
        for k in ("flops_reduction", "speedup", "latency_budget_ms"):
            v = getattr(self, k)
            if v is not None:
                return k, float(v)
        return None


@dataclass(frozen=True)
class _Plan:
    """Classes to remove per group (group index → class ids), plus merges for similarity."""

    removed: dict[int, tuple[int, ...]]
    merges: dict[int, tuple[imp.Merge, ...]] = field(default_factory=dict)  # similarity: class ids

    @property
    def all(self) -> frozenset[int]:
        return frozenset(c for cs in self.removed.values() for c in cs)


class PruneChannels(Pass):
    name: ClassVar[str] = "prune_channels"
    summary: ClassVar[str] = ("Structured pruning: remove whole channels (coupled through residuals, concats, "
                              "depthwise and grouped convs, flatten), by ratio or latency/FLOPs target.")
    Options = PruneChannelsOptions
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm",)
    lossy: ClassVar[bool] = True

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o: PruneChannelsOptions = self.options  # type: ignore[assignment]
        if o.target and o.target[0] != "flops_reduction" and ctx.profile is None:
            raise PassError(f"prune_channels {o.target[0]}: needs a hardware profile to predict latency")
        lift = lift_functional_layers(ir)
        annotate(ir)
        teacher = copy.deepcopy(ir.gm).eval()
        first = analyze_channels(ir)
        original_size = {g.root: g.channels for g in first.groups}
        round_to = o.round_to or (getattr(ctx.profile, "channel_multiple", 1) if ctx.profile is not None else 1)
        before = totals(ir)
        latency0 = _latency_ms(ir, ctx)
        batches = _batches(ctx, ir, o.calibration_batches)
        rewind = _Rewind(ir) if o.rewind else None
        base = None if o.target is None else _metric(o.target[0], ctx)(ir)
        stats: dict[str, float] = {}
        warnings: list[str] = []
        changed: list[str] = []
        channels_removed = 0
        for step in range(1, o.iterative + 1):
            # each round works on the model the previous round cut: analysis, scores, choice, cut, fine-tune
            analysis = first if step == 1 else analyze_channels(ir)
            protected = _protected(ir, analysis, o.protect)
            scores = _scores(ir, analysis, o.importance, batches)
            plan, note = self._choose(ir, analysis, scores, protected, round_to, ctx, step, base, original_size)
            if o.importance == "similarity":
                plan = _by_similarity(ir, analysis, plan)
            if note:
                warnings.append(note)
            _mask(ir, analysis, plan, batches, o)
            changed += cut(ir, analysis, plan.all)
            channels_removed += len(plan.all)
            annotate(ir.lint().recompile())
            if rewind is not None:
                rewind.cut(analysis, plan.all)
                rewind.restore(ir)
            if o.finetune is not None:
                stats |= _finetune(ir, teacher, ctx, o.finetune, step)
        after = totals(ir)
        latency1 = _latency_ms(ir, ctx)
        stats |= {"channels_removed": float(channels_removed), "flops_before": float(before.flops),
                  "flops_after": float(after.flops), "params_before": float(before.params),
                  "params_after": float(after.params)}
        if latency0 is not None and latency1 is not None:
            stats |= {"predicted_latency_ms_before": latency0, "predicted_latency_ms_after": latency1}
        details, skipped = _report(ir, first, _protected(ir, first, o.protect), o.importance)
        skipped += [Skip(n, r) for n, r in lift.reasons(frozenset({"conv", "linear"})).items()]
        return PassResult(ir, tuple(dict.fromkeys([*lift.new_names, *changed])), tuple(skipped), stats,
                          tuple(warnings), details=tuple(details))

    # -- how many, and which --

    def _choose(self, ir: IR, analysis: ChannelAnalysis, scores: dict[int, torch.Tensor], protected: dict[int, str],
                round_to: int, ctx: PassContext, step: int, base: float | None,
                original_size: Mapping[str, int]) -> tuple[_Plan, str | None]:
        """What round ``step`` of ``iterative`` removes: after the last round, the ratio or target is met."""
        o: PruneChannelsOptions = self.options  # type: ignore[assignment]
        groups = [g for g in analysis.groups if g.prunable and g.index not in protected]
        if o.target is None:
            ratios = {}
            for g in groups:
                r = _layer_ratio(ir, g, o.per_layer, o.amount)
                size = original_size.get(g.root, g.channels)
                # round `step` keeps size·(1−r)^(step/n): after the last round, exactly the one-shot count
                keep = size - math.floor(r * size + 1e-9) if step == o.iterative else round(size * (1 - r) ** (step / o.iterative))
                ratios[g.index] = max(0.0, (g.channels - keep) / g.channels)
            if o.scope == "global":
                return _global(groups, scores, ratios, round_to, lambda g: 1.0), None
            return _Plan({g.index: _lowest(g, scores[g.index], ratios[g.index], round_to) for g in groups}), None
        assert base is not None
        return self._to_target(ir, analysis, groups, scores, round_to, ctx, step / o.iterative, base)

    def _to_target(self, ir: IR, analysis: ChannelAnalysis, groups: list[ChannelGroup], scores: dict[int, torch.Tensor],
                   round_to: int, ctx: PassContext, fraction: float, base: float) -> tuple[_Plan, str | None]:
        """Smallest global cut whose predicted FLOPs / latency meets the target (bisection on the cut size).

        ``base`` is the original model's FLOPs or latency; round ``fraction`` of the way aims at that part
        of the way from ``base`` to the goal.
        """
        kind, value = self.options.target  # type: ignore[misc]
        metric = _metric(kind, ctx)
        final = {"flops_reduction": base * (1 - value), "speedup": base / value}.get(kind, value)
        goal = base - (base - final) * fraction
        current = metric(ir)
        if current <= goal:
            return _Plan({}), None
        base = current
        saving = {g.index: _saving_per_channel(ir, analysis, g, metric, base) for g in groups}

        def plan_at(t: float) -> _Plan:
            return _global(groups, scores, {g.index: t for g in groups}, round_to,
                           lambda g: max(saving[g.index], 1e-12))

        def value_at(plan: _Plan) -> float:
            trial = copy.deepcopy(ir)
            cut(trial, analysis, plan.all)
            return metric(annotate(trial.recompile()))

        lo, hi = 0.0, MAX_GROUP_RATIO
        best = plan_at(hi)
        if value_at(best) > goal:
            return best, (f"{kind} {value:g} not reached: the largest cut (each group keeps ≥ "
                          f"{1 - MAX_GROUP_RATIO:.0%}) predicts {value_at(best):.4g} vs goal {goal:.4g}")
        for _ in range(12):
            mid = (lo + hi) / 2
            plan = plan_at(mid)
            if value_at(plan) <= goal:
                hi, best = mid, plan
            else:
                lo = mid
        return best, None


# -- choosing channels --------------------------------------------------------------------------


def _metric(kind: str, ctx: PassContext) -> Callable[[IR], float]:
    """FLOPs for ``flops_reduction``, predicted latency (ms) on the profile otherwise."""
    if kind == "flops_reduction":
        return lambda x: float(totals(x).flops)
    return lambda x: float(_latency_ms(x, ctx) or 0.0)


class _Rewind:
    """Lottery-ticket rewinding: a shadow model whose weights are their own original flat indices.

    The shadow is cut exactly like the model, so after any number of rounds its values say which
    original entry each surviving weight is; `restore` copies those original values back.
    """

    def __init__(self, ir: IR) -> None:
        self.original = {k: v.detach().clone() for k, v in ir.gm.named_parameters()}
        gm = copy.deepcopy(ir.gm)
        with torch.no_grad():
            for name, p in gm.named_parameters():
                p.data = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
        self.shadow = IR(gm, ir.inputs, ir.example_inputs)

    def cut(self, analysis: ChannelAnalysis, removed: frozenset[int]) -> None:
        cut(self.shadow, analysis, removed)

    def restore(self, ir: IR) -> None:
        ids = dict(self.shadow.gm.named_parameters())
        with torch.no_grad():
            for name, p in ir.gm.named_parameters():
                if name in ids and name in self.original and ids[name].shape == p.shape:
                    p.copy_(self.original[name].reshape(-1)[ids[name].long().reshape(-1)].reshape(p.shape))


def _layer_ratio(ir: IR, g: ChannelGroup, per_layer: Mapping[str, float], default: float) -> float:
    for name in per_layer:
        if _names_group(ir, g, name):
            return per_layer[name]
    return default


def _names_group(ir: IR, g: ChannelGroup, name: str) -> bool:
    nodes = {n.name: n for n in ir.gm.graph.nodes}
    return any(name == p or name == str(nodes[p].target) for p in g.producers if p in nodes)


def _keep_count(g: ChannelGroup, ratio: float, round_to: int) -> int:
    """Channels a group keeps at ``ratio``: a multiple of its cells, rounded to ``round_to``, at least one per cell."""
    cells = len(g.cells)
    per_cell = min(len(c) for c in g.cells)
    total = per_cell * cells
    ratio = min(ratio, MAX_GROUP_RATIO)
    keep = total - math.floor(ratio * total + 1e-9)
    step = cells * math.ceil(round_to / cells) if round_to > 1 else cells
    if step < total and ratio > 0:
        keep = max(step, math.floor(keep / step + 0.5) * step)  # nearest multiple, ties keep more
    keep = max(cells, min(total, keep - keep % cells))
    return keep


def _lowest(g: ChannelGroup, score: torch.Tensor, ratio: float, round_to: int) -> tuple[int, ...]:
    """The lowest-scored classes of ``g``, the same number from each cell."""
    keep = _keep_count(g, ratio, round_to)
    per_cell_remove = (sum(min(len(c) for c in g.cells) for _ in g.cells) - keep) // len(g.cells)
    if per_cell_remove <= 0:
        return ()
    pos = {c: i for i, c in enumerate(g.classes)}
    out: list[int] = []
    for cell in g.cells:
        order = sorted(cell, key=lambda c: (float(score[pos[c]]), pos[c]))
        out += order[:per_cell_remove]
    return tuple(sorted(out, key=lambda c: pos[c]))


def _global(groups: Sequence[ChannelGroup], scores: Mapping[int, torch.Tensor], ratios: Mapping[int, float],
            round_to: int, cost: Callable[[ChannelGroup], float]) -> _Plan:
    """Rank every channel by normalised importance ÷ ``cost`` (saving per channel); remove the lowest."""
    total = sum(g.channels for g in groups)
    want = sum(ratios[g.index] * g.channels for g in groups)
    ranked = sorted(((float(imp.normalize(scores[g.index])[i]) / cost(g), g.index, i)
                     for g in groups for i in range(g.channels)))
    counts: dict[int, int] = {g.index: 0 for g in groups}
    for _, gi, _i in ranked[: int(round(want))] if total else []:
        counts[gi] += 1
    by_index = {g.index: g for g in groups}
    return _Plan({gi: _lowest(by_index[gi], scores[gi], n / by_index[gi].channels, round_to)
                  for gi, n in counts.items() if n})


def _saving_per_channel(ir: IR, analysis: ChannelAnalysis, g: ChannelGroup, metric: Callable[[IR], float],
                        base: float) -> float:
    """Predicted saving of removing half of ``g`` (a probe cut on a copy), per removed channel."""
    probe = _lowest(g, torch.zeros(g.channels), 0.5, 1)
    if not probe:
        return 0.0
    trial = copy.deepcopy(ir)
    cut(trial, analysis, probe)
    return max(base - metric(annotate(trial.recompile())), 0.0) / len(probe)


def _protected(ir: IR, analysis: ChannelAnalysis, protect: tuple[str, ...] | None) -> dict[int, str]:
    """Groups never pruned, with why: the named layers, or by default the first and the last layer."""
    out: dict[int, str] = {}
    if protect is None:
        producers = [m.node for m in analysis.members if m.role == "out"]
        if producers:
            first, last = producers[0], producers[-1]
            for g in analysis.groups:
                # the stem is cheap and sensitive; but when its channels are a residual stream that later
                # layers add into (a ResNet's layer1), protecting it would freeze the whole stream
                if first in g.producers and len(g.producers) == 1:
                    out[g.index] = f"protected: '{first}' is the first layer (protect: [] prunes it)"
                if last in g.producers:
                    out.setdefault(g.index, f"protected: '{last}' is the final layer")
        return out
    for name in protect:
        hits = [g for g in analysis.groups if _names_group(ir, g, name)]
        if not hits:
            known = sorted({p for g in analysis.groups for p in g.producers})
            raise PassError(f"prune_channels protect: no layer named {name!r}; layers: {', '.join(known)}")
        for g in hits:
            out[g.index] = f"protected: '{name}' is listed in protect"
    return out


# -- scoring --------------------------------------------------------------------------------------


def _positions(member: Member) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, c in enumerate(member.classes):
        if c != NONE:
            out.setdefault(c, []).append(i)
    return out


def _member_power(ir: IR, m: Member, p: int) -> torch.Tensor | None:
    """Σ|w|^p of each index along the member's dim (None for per-channel norm parameters)."""
    mod = ir.gm.get_submodule(m.module)
    w = mod.weight.detach().abs().pow(p)
    if m.role == "out" or m.depthwise:
        # weights only, as Torch-Pruning's MagnitudeImportance(bias=False): a channel with zero weights
        # and a bias is a constant, which compensation folds away exactly
        return w.reshape(w.shape[0], -1).sum(1)
    if m.role == "in":
        groups = getattr(mod, "groups", 1)
        if groups == 1:
            return w.transpose(0, 1).reshape(w.shape[1], -1).sum(1)
        rows, per_in = w.shape[0] // groups, w.shape[1]
        return torch.cat([w[g * rows:(g + 1) * rows].transpose(0, 1).reshape(per_in, -1).sum(1) for g in range(groups)])
    return None


def _scores(ir: IR, analysis: ChannelAnalysis, criterion: Criterion,
            batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[int, torch.Tensor]:
    """Importance of every class of every group, in the group's class order (higher = keep)."""
    taylor: dict[str, torch.Tensor] = {}
    if criterion == "taylor":
        dims = {m.node: (1 if _is_conv(ir, m) else -1) for m in analysis.members if m.role == "out"}
        taylor = imp.taylor_scores(ir.gm, dims, batches, imp.pseudo_label_loss)
    out: dict[int, torch.Tensor] = {}
    for g in analysis.groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        for m in g.members:
            per: torch.Tensor | None
            if criterion in ("l1", "l2", "similarity"):
                per = _member_power(ir, m, 1 if criterion == "l1" else 2)
            elif criterion == "bn_scale":
                mod = ir.gm.get_submodule(m.module)
                per = mod.weight.detach().abs() if (m.role == "param" and not m.depthwise and
                                                    isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine) else None
            else:
                per = taylor.get(m.node) if m.role == "out" else None
            if per is None:
                continue
            s = _by_class(g, m, per)
            total += imp.normalize(s) if float(s.sum()) > 0 else s
        if criterion == "similarity":
            total = _uniqueness(ir, g)
        if criterion == "bn_scale" and float(total.sum()) == 0:
            total = _scores_l2(ir, g)
        out[g.index] = total
    return out


def _by_class(g: ChannelGroup, m: Member, per: torch.Tensor) -> torch.Tensor:
    """A member's per-index values summed per class of ``g``, in the group's class order."""
    pos = {c: i for i, c in enumerate(g.classes)}
    s = torch.zeros(g.channels, dtype=torch.float64)
    for c, idx in _positions(m).items():
        if c in pos:
            s[pos[c]] += float(per[idx].sum())
    return s


def _scores_l2(ir: IR, g: ChannelGroup) -> torch.Tensor:
    """Unnormalised Σ w² per class: bn_scale's fallback for a group without BatchNorm."""
    s = torch.zeros(g.channels, dtype=torch.float64)
    for m in g.members:
        per = _member_power(ir, m, 2)
        if per is not None:
            s += _by_class(g, m, per)
    return s


def _rows(ir: IR, g: ChannelGroup) -> torch.Tensor:
    """Each class's incoming weights (and bias) across the group's producers: [channels, k]."""
    pos = {c: i for i, c in enumerate(g.classes)}
    parts = []
    for m in g.members:
        if m.role != "out" and not m.depthwise:
            continue
        mod = ir.gm.get_submodule(m.module)
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        if getattr(mod, "bias", None) is not None:
            w = torch.cat([w, mod.bias.detach()[:, None]], 1)
        rows = torch.zeros(g.channels, w.shape[1] * max(len(v) for v in _positions(m).values()), dtype=w.dtype)
        for c, idx in _positions(m).items():
            if c in pos:
                flat = w[idx].reshape(-1)
                rows[pos[c], : flat.numel()] = flat
        parts.append(rows)
    return torch.cat(parts, 1).double() if parts else torch.zeros(g.channels, 1, dtype=torch.float64)


def _uniqueness(ir: IR, g: ChannelGroup) -> torch.Tensor:
    """Similarity score: 1 − the largest cosine to a same-sign multiple of another channel (0 = duplicate)."""
    rows = _rows(ir, g)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    cos.fill_diagonal_(-1.0)
    return (1 - cos.max(dim=1).values).clamp_min(0) + 1e-9 * rows.norm(dim=1)


def _is_conv(ir: IR, m: Member) -> bool:
    return isinstance(ir.gm.get_submodule(m.module), nn.modules.conv._ConvNd)


# -- masking (zeroing consumers), compensation, merges --------------------------------------------


def _mask(ir: IR, analysis: ChannelAnalysis, plan: _Plan, batches: Sequence[tuple[torch.Tensor, ...]],
          o: PruneChannelsOptions) -> None:
    """Make the removed classes inert: fold their contribution, then zero every consumer's weights for them."""
    gone = plan.all
    if not gone:
        return
    consumers = [m for m in analysis.members if m.role == "in" and gone & set(m.classes)]
    merged = {x.removed for ms in plan.merges.values() for x in ms}
    if plan.merges:
        _absorb(ir, [x for ms in plan.merges.values() for x in ms], consumers)
    if o.compensate and gone - merged:
        gone_plain = frozenset(gone - merged)
        means = _input_means(ir.gm, {m.node: (1 if _is_conv(ir, m) else -1) for m in consumers}, batches)
        for m in consumers:
            _fold_mean(ir, m, gone_plain, means[m.node])
    with torch.no_grad():
        for m in consumers:
            _zero_columns(ir, m, gone)


def _by_similarity(ir: IR, analysis: ChannelAnalysis, plan: _Plan) -> _Plan:
    """Re-pick each single-cell group's channels as merges into similar kept ones (same count, no chains)."""
    removed, merges = dict(plan.removed), {}
    for gi, cs in plan.removed.items():
        g = analysis.groups[gi]
        if not cs or len(g.cells) != 1:
            continue
        picked = imp.similarity_merges(_rows(ir, g), len(cs))
        merges[gi] = tuple(imp.Merge(g.classes[m.removed], g.classes[m.kept], m.scale) for m in picked)
        removed[gi] = tuple(m.removed for m in merges[gi])
    return _Plan(removed, merges)


def _absorb(ir: IR, merges: Sequence[imp.Merge], consumers: Sequence[Member]) -> None:
    """Each consumer adds scale × a merged-away channel's columns to its partner's (exact for duplicates)."""
    for m in consumers:
        mod = ir.gm.get_submodule(m.module)
        if _conv_groups(mod) > 1:
            continue  # grouped / depthwise consumers read one group's channels each: no cross-channel merge
        positions = _positions(m)
        ordered = sorted(positions)
        index = {c: i for i, c in enumerate(ordered)}
        local = [imp.Merge(index[x.removed], index[x.kept], x.scale) for x in merges
                 if x.removed in index and x.kept in index]
        if local:
            w = imp.absorb_merges(mod.weight.detach(), [positions[c] for c in ordered], local)
            with torch.no_grad():
                mod.weight.copy_(w)


def _fold_mean(ir: IR, m: Member, gone: frozenset[int], mean: torch.Tensor) -> None:
    mod = ir.gm.get_submodule(m.module)
    if _conv_groups(mod) > 1:
        return  # a grouped conv's outputs read only their group's inputs: no single bias column sum
    positions = [i for i, c in enumerate(m.classes) if c != NONE and c in gone]
    values = {i: float(mean[i]) for i in positions}
    delta = imp.constant_contribution(mod.weight.detach(), [[i] for i in positions],
                                      {j: values[i] for j, i in enumerate(positions)})
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype))
    mod.bias.data.add_(delta.to(mod.bias.dtype))


def _conv_groups(mod: nn.Module) -> int:
    """A consumer's conv groups (1 for a Linear or a plain conv)."""
    return 1 if isinstance(mod, nn.Linear) else int(getattr(mod, "groups", 1))


def _zero_columns(ir: IR, m: Member, gone: frozenset[int]) -> None:
    mod = ir.gm.get_submodule(m.module)
    positions = [i for i, c in enumerate(m.classes) if c != NONE and c in gone]
    if not positions:
        return
    groups = _conv_groups(mod)
    if groups == 1:
        mod.weight.data[:, positions] = 0
        return
    rows, per_in = mod.weight.shape[0] // groups, mod.weight.shape[1]
    for i in positions:
        g = i // per_in
        mod.weight.data[g * rows:(g + 1) * rows, i - g * per_in] = 0


def _finetune(ir: IR, teacher: nn.Module, ctx: PassContext, config: FineTuneConfig, step: int) -> dict[str, float]:
    """Fine-tune the cut model (distilling from the unpruned one) through the fine-tuning service."""
    tuner = ctx.services.get("finetune")
    if tuner is None:
        raise PassError("prune_channels finetune: needs training data for the fine-tuning service: add data.train "
                        "to the recipe (or drop finetune)")
    result = tuner.run(ir.gm, teacher, config)
    stats = {f"finetune_round{step}_steps": float(result.steps)}
    if result.initial_headline is not None and result.best_headline is not None:
        stats |= {f"headline_after_cut_round{step}": result.initial_headline,
                  f"headline_after_finetune_round{step}": result.best_headline}
    return stats


# -- data ---------------------------------------------------------------------------------------


def _batches(ctx: PassContext, ir: IR, limit: int) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches, or the IR's example inputs when the recipe has no data."""
    source = ctx.calibration
    if source is None:
        return [tuple(ir.example_inputs)]
    out = []
    for i, batch in enumerate(source.batches()):
        if i >= limit:
            break
        out.append(tuple(batch.inputs))
    return out or [tuple(ir.example_inputs)]


def _input_means(gm: fx.GraphModule, consumers: Mapping[str, int], batches: Sequence[tuple[torch.Tensor, ...]]
                 ) -> dict[str, torch.Tensor]:
    """Mean of each consumer's input along its input dim (1 for convs, -1 for Linear) over the batches."""
    sums: dict[str, torch.Tensor] = {}
    count = 0

    class _Tap(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.name in consumers:
                x = self.env[n.args[0]]  # type: ignore[index]
                d = consumers[n.name] % x.dim()
                m = x.detach().double().movedim(d, 0).reshape(x.shape[d], -1).mean(1)
                sums[n.name] = sums.get(n.name, 0) + m
            return super().run_node(n)

    was = gm.training
    gm.eval()
    with torch.no_grad():
        for b in batches:
            _Tap(gm).run(*b)
            count += 1
    gm.train(was)
    return {k: v / max(count, 1) for k, v in sums.items()}


def _latency_ms(ir: IR, ctx: PassContext) -> float | None:
    if ctx.profile is None:
        return None
    return estimate(ir, ctx.profile).total_s * 1e3


# -- report -------------------------------------------------------------------------------------


def _report(ir: IR, analysis: ChannelAnalysis, protected: Mapping[int, str], criterion: str
            ) -> tuple[list[dict[str, Any]], list[Skip]]:
    """One row per group of the original model (channels before / after), and a Skip for every group left alone."""
    rows, skips = [], []
    for g in analysis.groups:
        root = next(m for m in g.members if m.node == g.root and m.role == "out")
        after = _width(ir.gm.get_submodule(root.module)) * g.channels // max(len(root.classes), 1)
        why = g.locked or protected.get(g.index) or (None if g.channels > 1 else "a single channel")
        rows.append({"layer": g.root, "producers": len(g.producers), "channels_before": g.channels,
                     "channels_after": after, "criterion": criterion if after < g.channels else "–",
                     "note": why or ("" if after < g.channels else "ratio 0")})
        if why:
            skips.append(Skip(g.root, why))
    return rows, skips


def _width(mod: nn.Module) -> int:
    return int(mod.out_channels if hasattr(mod, "out_channels") else mod.out_features)
