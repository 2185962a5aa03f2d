"""Fold an inference-mode BatchNorm into the Conv/Linear that feeds it.

At inference BatchNorm is the per-channel affine map
``y = γ·(x − μ)/√(σ² + ε) + β``. When ``x = W·u + b`` comes straight from a
conv or linear layer, the map folds into that layer's weights:
``W' = W·s``, ``b' = (b − μ)·s + β`` with ``s = γ/√(σ² + ε)``, and the BN node
disappears. Worked example, one channel: W=2, b=1, μ=3, σ²=4−ε, γ=0.5, β=1
gives s=0.25, W'=0.5, b'=0.5.

A site is folded only when nothing else can observe the layer's raw output:
the conv output feeds the BN alone, neither module is shared, and the BN uses
running statistics. Anything else is reported as a `Skip`.

Functional layers (a ``torch.export`` program's ``aten.conv2d``/``aten.batch_norm``,
or ``F.conv2d`` in a forward) are first lifted to modules
(`effopt.optimizer.ir.lift`), bit-identically, so they fold the same way.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.core import IR, facts
from effopt.optimizer.ir.lift import lift_functional_layers
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_bn_into_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') such that ``layer(W', b')(x) == bn(layer(W, b)(x))`` in eval mode.

    Output channels are dim 0 of ``weight`` for Conv{1,2,3}d and Linear.
    Computed in float64 so the folded layer stays within float32 rounding of
    the original.
    """
    w64 = weight.detach().double()
    scale = running_var.double().add(eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros_like(running_mean, dtype=torch.float64)
    shift = beta.detach().double() if beta is not None else torch.zeros_like(b)
    new_w = w64 * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_b = (b - running_mean.double()) * scale + shift
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


class FoldBatchNormOptions(PassOptions):
    """fold_batchnorm has no options: a fold is exact, so there is nothing to trade."""


class FoldBatchNorm(Pass):
    name: ClassVar[str] = "fold_batchnorm"
    summary: ClassVar[str] = "Fold eval-mode BatchNorm into the preceding Conv1d/2d/3d or Linear (exact)."
    Options = FoldBatchNormOptions

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        lift = lift_functional_layers(ir)
        stays_functional = lift.reasons()
        changed: list[str] = list(lift.new_names)  # lifting alone changes the graph (same numerics)
        folded: list[str] = []
        skipped: list[Skip] = []
        for bn_node in list(ir.gm.graph.nodes):
            if bn_node.op != "call_module" or not isinstance(ir.module_of(bn_node), nn.modules.batchnorm._BatchNorm):
                continue
            reason = self._why_not(ir, bn_node)
            if reason:
                producer = bn_node.args[0] if bn_node.args else None
                if isinstance(producer, fx.Node) and producer.name in stays_functional:
                    reason = f"input '{producer.name}' stays functional: {stays_functional[producer.name]}"
                skipped.append(Skip(bn_node.name, reason))
                continue
            producer = bn_node.args[0]
            assert isinstance(producer, fx.Node)
            self._fold(ir, producer, bn_node)
            folded.append(bn_node.name)
        skipped += [Skip(node, reason) for node, reason in lift.reasons(frozenset({"batch_norm"})).items()]
        changed += [name for name in folded if name not in changed]
        stats = {"folded": float(len(folded))}
        warnings: tuple[str, ...] = ()
        if lift.lifted:
            stats["lifted_functional_layers"] = float(len(lift.lifted))
            warnings = (f"lifted {len(lift.lifted)} functional layer(s) to modules: "
                        + ", ".join(f"{x.old} → {x.module}" for x in lift.lifted),)
        return PassResult(ir, tuple(changed), tuple(skipped), stats, warnings)

    @staticmethod
    def _why_not(ir: IR, bn_node: fx.Node) -> str | None:
        """Every precondition, checked before anything is edited; None means fold."""
        bn = ir.module_of(bn_node)
        producer = bn_node.args[0] if bn_node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            return "input is not a Conv/Linear module output"
        layer = ir.module_of(producer)
        if not isinstance(layer, _FOLDABLE):
            return f"input comes from {type(layer).__name__}, not Conv1d/Conv2d/Conv3d/Linear"
        if bn.running_mean is None or bn.running_var is None:
            return "BatchNorm has track_running_stats=False: it normalises with batch statistics even in eval"
        if len(producer.users) != 1:
            others = ", ".join(sorted(u.name for u in producer.users if u is not bn_node))
            return f"'{producer.name}' output is also used by {others}; folding would change what they see"
        if len(ir.users_of_module(str(producer.target))) > 1:
            return f"module '{producer.target}' is shared by several call sites"
        if len(ir.users_of_module(str(bn_node.target))) > 1:
            return f"BatchNorm module '{bn_node.target}' is shared by several call sites"
        out_channels = layer.weight.shape[0]
        if bn.num_features != out_channels:
            return f"BatchNorm has {bn.num_features} features but '{producer.name}' has {out_channels} outputs"
        if isinstance(layer, nn.Linear) and len(facts(producer).outputs[0].shape) != 2:
            # facts(), not meta.get(): without shapes a [N, L, C] Linear would be folded wrongly
            return "Linear output is not [N, C]: BatchNorm1d would normalise a different axis"
        return None

    @staticmethod
    def _fold(ir: IR, producer: fx.Node, bn_node: fx.Node) -> None:
        layer = ir.module_of(producer)
        bn = ir.module_of(bn_node)
        w, b = fold_bn_into_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        fused = copy.deepcopy(layer)
        fused.weight = nn.Parameter(w)
        fused.bias = nn.Parameter(b)
        ir.set_submodule(str(producer.target), fused)
        nodes_before = len(ir.gm.graph.nodes)
        bn_node.replace_all_uses_with(producer)
        ir.gm.graph.erase_node(bn_node)
        if len(ir.gm.graph.nodes) != nodes_before - 1:
            raise AssertionError(f"fold_batchnorm: erasing '{bn_node.name}' did not remove exactly one node")
