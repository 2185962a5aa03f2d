"""Magnitude pruning: set the smallest weights of each Conv/Linear to zero, or keep 2 of every 4.

Two patterns:

- ``unstructured``: the ``sparsity`` fraction of weights with the smallest ``|w|`` become 0,
  chosen per layer (``scope: layer``: every layer loses the same fraction) or across all pruned
  layers at once (``scope: global``: one threshold, each layer's magnitudes compared as they are,
  so layers with small weights lose more). Example: ``w = [0.1, -3, 0.5, 2]`` at sparsity 0.5
  keeps ``[0, -3, 0, 2]``.
- ``2:4``: in every group of 4 consecutive input channels of each output row (`input_groups`),
  the 2 largest ``|w|`` stay: 50 % by construction. Example: the row ``[0.1, -3, 0.5, 2, 1, 1, 0,
  -2]`` becomes ``[0, -3, 0, 2, 1, 0, 0, -2]`` (a tie keeps the first).

The weights stay dense tensors holding zeros, so ``model.pt2`` and ONNX work unchanged. Speed:
the cost model halves a layer's MAC time only where the profile has sparse kernels
(``structured_sparsity: "2:4"``: a100, h100-sxm) and the layer holds the 2:4 pattern; everywhere
else the pass says so in its warnings and reports what sparsity does buy, the compressed size:
``bitmask`` = 1 bit per weight of a pruned layer + its non-zero values in their dtype (what a
sparse file format or a zip of the weights approaches), and for 2:4 the kept half of the values +
a 2-bit position each (the sparse tensor-core format). Other tensors count dense.

``finetune:`` retrains the pruned model through the fine-tuning service (distillation from the
unpruned model when the data has no labels); the masks are re-applied after every optimizer step
(``on_step``), so zeros stay zeros. Functional conv/linear calls are lifted to modules first
(`effopt.optimizer.ir.lift`), as in `fold_batchnorm`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator
from torch import nn

from effopt.errors import InternalError, PassError
from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.core import IR
from effopt.optimizer.ir.cost_model import input_groups
from effopt.optimizer.ir.lift import LiftResult, lift_functional_layers
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip
from effopt.passes.finetuning import FineTuneConfig

_KINDS = frozenset({"conv", "linear"})
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class PruneUnstructuredOptions(PassOptions):
    """Options of the prune_unstructured pass."""

    sparsity: float = Field(
        0.5, ge=0, lt=1, description="fraction of each pruned layer's weights set to zero (0 <= s < 1); "
        "pattern '2:4' is 0.5 by construction: leave it unset or 0.5"
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every pruned layer loses the same fraction; global: one |w| threshold "
        "across all pruned layers, magnitudes compared as they are (pattern unstructured only)"
    )
    pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="unstructured: any weight may go; 2:4: keep the 2 largest |w| of every 4 "
        "consecutive input channels (runs faster only on profiles with structured_sparsity: 2:4)"
    )
    layers: tuple[str, ...] | None = Field(
        None, description="prune only these layers (node names or module paths); unset: every Conv/Linear"
    )
    exclude: tuple[str, ...] = Field((), description="layers (node names or module paths) to leave dense")
    min_params: int = Field(0, ge=0, description="leave layers with fewer weights than this dense")
    finetune: FineTuneConfig | None = Field(
        None, description="fine-tune after pruning with the masks kept (needs data.train); fields left out "
        "come from the recipe's finetune: block"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PruneUnstructuredOptions:
        if self.pattern == "2:4":
            if self.sparsity != 0.5:
                raise ValueError(
                    f"sparsity {self.sparsity} with pattern '2:4': 2:4 keeps 2 of every 4 weights, so its "
                    "sparsity is 0.5 by construction; leave sparsity unset (or 0.5), or use pattern: unstructured"
                )
            if self.scope == "global":
                raise ValueError(
                    "scope 'global' with pattern '2:4': 2:4 chooses within each group of 4 weights, there is "
                    "nothing to rank across layers; remove scope or use pattern: unstructured"
                )
        return self


# -- the math: pure tensor functions ----------------------------------------------------------------


def zeros_for(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights to zero: ``sparsity · numel`` rounded to nearest (0.3 · 10 → 3)."""
    return min(numel, int(round(sparsity * numel)))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) zeroing the ``zeros_for(sparsity, n)`` smallest ``|w|``; ties: first index first.

    >>> magnitude_mask(torch.tensor([0.1, -3.0, 0.5, 2.0]), 0.5).tolist()
    [False, True, False, True]
    """
    return global_masks([weight], sparsity)[0]


def global_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks for ``weights`` ranked together: the smallest ``|w|`` of all of them go first.

    Each layer's magnitudes are compared as they are (no per-layer normalisation). Example:
    ``[[0.1, 4], [0.2, 0.3]]`` at sparsity 0.5 zeroes 0.1 and 0.2: the first layer loses 1 of 2,
    the second 1 of 2; at 0.75 it also zeroes 0.3, so the second layer is then all zeros.
    A stable sort makes ties deterministic: equal magnitudes go in layer, then index order.
    """
    flat = torch.cat([w.detach().abs().flatten().to(torch.float64) for w in weights])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    order = torch.sort(flat, stable=True).indices
    keep[order[: zeros_for(sparsity, flat.numel())]] = False
    return [k.reshape(w.shape) for k, w in zip(keep.split([w.numel() for w in weights]), weights)]


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask with the 2 largest ``|w|`` of every `input_groups` group of 4 (ties: first index first).

    >>> mask_2_4(torch.tensor([[0.1, -3.0, 0.5, 2.0, 1.0, 1.0, 0.0, -2.0]])).int().tolist()
    [[0, 1, 0, 1, 1, 0, 0, 1]]
    """
    groups = input_groups(weight.abs())
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    moved = weight.movedim(1, -1).shape  # input_groups' channels-last layout, back to the weight's
    return keep.reshape(moved).movedim(-1, 1)


# -- the pass ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """A Conv/Linear module to prune, found at its first call in graph order."""

    node: fx.Node
    target: str
    weight: torch.Tensor


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned layer after the pass: weights, zeros, and its size in each format (bytes)."""

    node: str
    numel: int
    zeros: int
    element_bytes: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def dense_bytes(self) -> int:
        return self.numel * self.element_bytes

    @property
    def bitmask_bytes(self) -> int:
        """1 bit per weight + the non-zeros: 1000 fp32 weights at 90 % → 125 + 400 = 525 bytes."""
        return math.ceil(self.numel / 8) + (self.numel - self.zeros) * self.element_bytes

    @property
    def two_four_bytes(self) -> int:
        """The kept half + a 2-bit index per kept value: 1000 fp32 weights → 2000 + 125 = 2125 bytes."""
        return (self.numel // 2) * self.element_bytes + math.ceil(self.numel / 8)


class PruneUnstructured(Pass):
    name: ClassVar[str] = "prune_unstructured"
    summary: ClassVar[str] = ("Magnitude pruning of Conv/Linear weights (per layer or global) or 2:4 semi-structured "
                              "sparsity; dense tensors with zeros, optional fine-tuning with masks kept.")
    Options = PruneUnstructuredOptions
    lossy: ClassVar[bool] = True

    options: PruneUnstructuredOptions

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o = self.options
        lift = lift_functional_layers(ir, _KINDS)
        sites, skipped = self._select(ir, lift)
        teacher = copy.deepcopy(ir.gm).eval() if o.finetune is not None and sites else None
        masks = self._masks(sites)
        pruned: list[str] = []
        params: list[tuple[nn.Parameter, torch.Tensor]] = []
        for site, mask in zip(sites, masks):
            param = _apply(ir, site, mask)
            params.append((param, mask))
            if bool((site.weight.detach()[~mask] != 0).any()):
                pruned.append(site.node.name)
        stats: dict[str, float] = {}
        warnings: list[str] = []
        if o.finetune is not None and pruned:
            assert teacher is not None
            stats |= _finetune(ir, teacher, params, ctx, o.finetune)
        _check_masks(params, sites)
        layers = [LayerSparsity(s.node.name, p.numel(), int((p == 0).sum()), p.element_size())
                  for s, (p, _) in zip(sites, params)]
        stats |= _stats(ir, layers, o)
        warnings += _notes(layers, o, ctx.profile)
        if lift.lifted:
            stats["lifted_functional_layers"] = float(len(lift.lifted))
            warnings.append(f"lifted {len(lift.lifted)} functional layer(s) to modules: "
                            + ", ".join(f"{x.old} → {x.module}" for x in lift.lifted))
        changed = [*lift.new_names, *(n for n in pruned if n not in lift.new_names)]
        order = {n.name: i for i, n in enumerate(ir.gm.graph.nodes)}
        return PassResult(ir, tuple(sorted(changed, key=order.__getitem__)), tuple(skipped), stats, tuple(warnings))

    # guards ---------------------------------------------------------------------------------------
    def _select(self, ir: IR, lift: LiftResult) -> tuple[list[_Site], list[Skip]]:
        """Every Conv/Linear call in graph order: a site to prune, or a `Skip` saying why not."""
        o = self.options
        functional = lift.reasons(_KINDS)
        old_names = lift.old_names
        sites: list[_Site] = []
        skipped: list[Skip] = []
        seen: set[str] = set()
        known: list[str] = []  # every name a layer answers to, for the unknown-name error
        for n in ir.gm.graph.nodes:
            if n.op not in ("call_module", "call_function", "call_method") or canonical_op(n, ir.gm) not in _KINDS:
                continue
            names = [n.name] + ([str(n.target)] if n.op == "call_module" else []) + [old_names.get(n.name, "")]
            known += [m for m in names if m and m not in known]
            reason = self._why_not(ir, n, names, functional)
            if reason is not None:
                skipped.append(Skip(n.name, reason))
                continue
            if str(n.target) in seen:  # a shared module is pruned once, at its first call
                continue
            seen.add(str(n.target))
            sites.append(_Site(n, str(n.target), ir.module_of(n).weight))
        for field_name in ("layers", "exclude"):
            unknown = [m for m in (getattr(o, field_name) or ()) if m not in known]
            if unknown:
                raise PassError(
                    f"prune_unstructured: {field_name} names {', '.join(map(repr, unknown))}, which is no Conv/Linear "
                    f"node or module; Conv/Linear layers: {', '.join(known) or 'none'}"
                )
        return sites, skipped

    def _why_not(self, ir: IR, n: fx.Node, names: list[str], functional: Mapping[str, str]) -> str | None:
        o = self.options
        if n.op != "call_module":
            return functional.get(n.name, "functional conv/linear: only nn.Conv*/nn.Linear modules are pruned")
        if any(m in o.exclude for m in names):
            return "listed in exclude"
        if o.layers is not None and not any(m in o.layers for m in names):
            return "not listed in layers"
        module = ir.module_of(n)
        if not isinstance(module, _PRUNABLE):
            kind = "already quantized: put prune_unstructured before quantize" if hasattr(module, "weight_quant") \
                else "not pruned (only Conv1d/2d/3d and Linear)"
            return f"{type(module).__name__}: {kind}"
        weight = module.weight
        if not weight.dtype.is_floating_point:
            return f"weight dtype {weight.dtype} is not floating point"
        if weight.numel() < o.min_params:
            return f"{weight.numel()} weights < min_params {o.min_params}"
        if o.pattern == "2:4" and weight.shape[1] % 4:
            groups = getattr(module, "groups", 1)
            per_group = f" per group (groups={groups})" if groups > 1 else ""
            return f"{weight.shape[1]} input channels{per_group} is not a multiple of 4: no groups of 4 for 2:4"
        return None

    # edits ----------------------------------------------------------------------------------------
    def _masks(self, sites: list[_Site]) -> list[torch.Tensor]:
        o = self.options
        if not sites:
            return []
        if o.pattern == "2:4":
            return [mask_2_4(s.weight) for s in sites]
        if o.scope == "global":
            return global_masks([s.weight for s in sites], o.sparsity)
        return [magnitude_mask(s.weight, o.sparsity) for s in sites]


def _apply(ir: IR, site: _Site, mask: torch.Tensor) -> nn.Parameter:
    """Put a copy of the layer with ``weight · mask`` in place (the caller's model is never edited)."""
    layer = copy.deepcopy(ir.module_of(site.node))
    with torch.no_grad():
        layer.weight = nn.Parameter(site.weight.detach() * mask.to(site.weight.dtype),
                                    requires_grad=site.weight.requires_grad)
    ir.set_submodule(site.target, layer)
    return layer.weight


def _check_masks(params: list[tuple[nn.Parameter, torch.Tensor]], sites: list[_Site]) -> None:
    """Postcondition: every masked weight is exactly zero (after fine-tuning too)."""
    for (param, mask), site in zip(params, sites):
        if bool((param.detach()[~mask] != 0).any()):
            raise InternalError(f"prune_unstructured: layer '{site.node.name}' has non-zero pruned weights")


def _finetune(
    ir: IR, teacher: nn.Module, params: list[tuple[nn.Parameter, torch.Tensor]], ctx: PassContext,
    config: FineTuneConfig,
) -> dict[str, float]:
    """Retrain through ``ctx.services["finetune"]``, zeroing the pruned weights after every step."""
    tuner = ctx.services.get("finetune")
    if tuner is None:
        raise PassError("prune_unstructured finetune: needs training data for the fine-tuning service: "
                        "add data.train to the recipe, or remove finetune")

    def keep_masks(model: nn.Module, step: int) -> None:
        for param, mask in params:
            param.mul_(mask.to(param.dtype))

    result = tuner.run(ir.gm, teacher, config, on_step=keep_masks)
    with torch.no_grad():
        keep_masks(ir.gm, result.steps)
    ir.gm.eval()
    # no wall-clock seconds: stats go into report.json, which must be byte-identical between runs
    stats = {"finetune_steps": float(result.steps)}
    if result.initial_headline is not None and result.best_headline is not None:
        stats |= {"finetune_initial_headline": result.initial_headline, "finetune_best_headline": result.best_headline}
    return stats


# -- what it achieved -------------------------------------------------------------------------------


def _model_bytes(gm: nn.Module) -> int:
    """Bytes of every parameter and buffer, each tensor once (``parameters()`` skips shared ones)."""
    return sum(t.nbytes for t in gm.parameters()) + sum(t.nbytes for t in gm.buffers())


def _stats(ir: IR, layers: list[LayerSparsity], o: PruneUnstructuredOptions) -> dict[str, float]:
    """Achieved sparsity (pruned layers, every Conv/Linear, each pruned layer) and the compressed sizes."""
    numel, zeros = sum(x.numel for x in layers), sum(x.zeros for x in layers)
    all_weights = [m.weight for m in ir.gm.modules() if isinstance(m, _PRUNABLE)]
    all_numel = sum(w.numel() for w in all_weights)
    dense = sum(x.dense_bytes for x in layers)
    model = _model_bytes(ir.gm)
    stats = {
        "pruned_layers": float(len(layers)),
        "sparsity": zeros / numel if numel else 0.0,
        "sparsity_all_layers": sum(int((w == 0).sum()) for w in all_weights) / all_numel if all_numel else 0.0,
        "dense_size_bytes": float(model),
        "bitmask_size_bytes": float(model - dense + sum(x.bitmask_bytes for x in layers)),
    }
    if o.pattern == "2:4":
        stats["2_4_size_bytes"] = float(model - dense + sum(x.two_four_bytes for x in layers))
    stats |= {f"sparsity/{x.node}": x.sparsity for x in layers}
    return stats


def _notes(layers: list[LayerSparsity], o: PruneUnstructuredOptions, profile: Any) -> list[str]:
    """What the sparsity buys on the target (speed only with sparse kernels), and the compressed size."""
    if not layers:
        return []
    dense = sum(x.dense_bytes for x in layers)
    bitmask = sum(x.bitmask_bytes for x in layers)
    notes = [
        f"compressed size of the {len(layers)} pruned layer(s) as bitmask + non-zeros (1 bit per weight, "
        f"then the non-zero values in their dtype): {bitmask:,} bytes vs {dense:,} dense "
        f"({dense / max(bitmask, 1):.2f}x smaller); stored dense with zeros in model.pt2 / model.onnx"
    ]
    if o.pattern == "2:4":
        two_four = sum(x.two_four_bytes for x in layers)
        notes.append(f"2:4 format (kept values + a 2-bit index each): {two_four:,} bytes vs {dense:,} dense")
    name = getattr(profile, "name", None)
    sparse_kernels = getattr(profile, "structured_sparsity", "none")
    if name is None:
        notes.append("no target profile: sparsity is credited to latency only on a profile with "
                     "structured_sparsity: 2:4, and then only for the 2:4 pattern")
    elif sparse_kernels != "2:4":
        notes.append(f"{name} has no sparse kernels: sparsity reduces compressed size only, not latency")
    elif o.pattern == "2:4":
        notes.append(f"{name} runs 2:4 sparse weights (structured_sparsity: 2:4): the cost model halves the "
                     "MAC time of each layer that holds the pattern")
    else:
        notes.append(f"{name} speeds up only the 2:4 pattern: unstructured sparsity reduces compressed size "
                     "only, not latency; use pattern: '2:4' for speed")
    return notes
