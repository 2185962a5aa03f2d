"""Low-rank factorization of Linear and K×K conv layers, initialised from the trained weights.

- ``Linear(in, out)`` → ``Linear(in, r, bias=False)`` ─ ``Linear(r, out)``: the rank-r truncated
  SVD of the weight (`effopt.passes.factorization.linear_low_rank`).
- ``Conv2d(C_in, C_out, K)`` → ``Conv2d(C_in, r, K)`` ─ ``Conv2d(r, C_out, 1)`` (``decomposition:
  channel``, the default): the truncated SVD of the weight unfolded along output channels.
- ``decomposition: tucker2``: ``Conv2d(C_in, r_in, 1)`` ─ ``Conv2d(r_in, r_out, K)`` ─
  ``Conv2d(r_out, C_out, 1)``, by tensorly's HOOI (`factorization.tucker2`).

The rank is an int (``rank: 16``), or chosen per layer by an energy threshold (``rank: auto``,
``energy: 0.9``: the smallest r keeping 90% of ‖W‖²) or by a target MAC reduction
(``flop_reduction: 0.5``: the largest r whose factors cost at most half the layer's MACs). At
full rank the rewrite is exact. Worked example: a Linear 512 → 512 (262,144 MACs per row)
at r = 64 costs 64·(512 + 512) = 65,536 MACs, a 4× reduction, and keeps whatever fraction of
‖W‖² its top 64 singular values hold.

As for `separable_conv`: ``apply: profitable`` (the default) rewrites a layer only where the
cost model predicts it faster on the target (a factored Linear at batch 1 is memory-bound, so
it pays once its two weights are smaller than the one they replace); ``max_error`` bounds the
relative kernel error; the report gives, per layer, r, the error, the predicted time before and
after, and a `Skip` with the reason for every layer left alone; ``finetune:`` recovers accuracy
by distillation from the original through the fine-tuning service.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from effopt.optimizer.ir.core import IR
from effopt.optimizer.quant.schemes import QuantConv, QuantLinear
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult
from effopt.passes.factorization import (
    channel_low_rank,
    conv_unfolding_spectrum,
    largest_rank_within,
    linear_low_rank,
    rank_for_energy,
    tucker2,
)
from effopt.passes.separable_conv import (
    FINETUNE_DESCRIPTION,
    Apply,
    LayerFilter,
    LayerRewrite,
    RecoveryOptions,
    RewriteRun,
    price_replacement,
    shared_weight_reason,
)

DEFAULT_ENERGY = 0.9

_Planned = tuple[dict[str, int], float, "OrderedDict[str, nn.Module]"]  # sizes, relative error, the chain


class LowRankOptions(PassOptions):
    """Options of the low_rank pass."""

    rank: PositiveInt | Literal["auto"] = Field(
        "auto", description="rank r of every factored layer (Tucker-2: of both channel modes, capped per mode), or "
        "auto: per layer, by energy (default) or flop_reduction")
    energy: float | None = Field(
        None, gt=0, le=1,
        description=f"rank: auto keeps at least this fraction of ‖W‖² per layer (default {DEFAULT_ENERGY})")
    flop_reduction: float | None = Field(
        None, gt=0, lt=1, description="rank: auto takes the largest r whose factors cost at most (1 − this) of the "
        "layer's MACs; exclusive with energy")
    decomposition: Literal["channel", "tucker2"] = Field(
        "channel", description="K×K convs: channel (K×K conv to r channels + 1×1 conv, truncated SVD) or tucker2 "
        "(1×1 + K×K + 1×1 by tensorly's HOOI)")
    max_error: float | None = Field(
        None, gt=0,
        description="leave a layer alone when its relative kernel error ‖W − Ŵ‖/‖W‖ is above this (null: no limit)")
    apply: Apply = Field(
        "profitable", description="profitable: only where the cost model predicts a gain on the target; all: every "
        "eligible layer")
    layers: LayerFilter = Field(LayerFilter(), description="include / exclude patterns (node names or module paths)")
    finetune: RecoveryOptions | None = Field(RecoveryOptions(), description=FINETUNE_DESCRIPTION)

    @model_validator(mode="after")
    def _consistent(self) -> LowRankOptions:
        if self.energy is not None and self.flop_reduction is not None:
            raise ValueError("give energy or flop_reduction, not both")
        if self.rank != "auto" and (self.energy is not None or self.flop_reduction is not None):
            raise ValueError(f"energy and flop_reduction apply to rank: auto only (got rank: {self.rank})")
        return self

    @property
    def energy_or_default(self) -> float:
        return self.energy if self.energy is not None else DEFAULT_ENERGY


class LowRank(Pass):
    name: ClassVar[str] = "low_rank"
    summary: ClassVar[str] = ("Linear → two Linears of rank r, K×K conv → K×K conv to r channels + 1×1 (or Tucker-2), "
                              "from the SVD of the trained weights; where the cost model predicts a gain.")
    Options = LowRankOptions
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm",)
    lossy: ClassVar[bool] = True

    options: LowRankOptions

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o = self.options
        return RewriteRun(
            self.name, frozenset({"conv", "linear"}), o.layers, o.max_error, o.apply, o.finetune,
            "finetune" in o.model_fields_set, why_not=self._why_not, plan=self._plan,
        )(ir, ctx)

    def _why_not(self, ir: IR, node: fx.Node) -> str | None:
        """Every structural precondition, checked before anything is edited; None means eligible."""
        mod = ir.module_of(node)
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                return f"grouped conv (groups={mod.groups}): only groups=1 convs are factored"
            if self.options.decomposition == "tucker2" and mod.kernel_size == (1, 1):
                return "1×1 conv: Tucker-2 would give three 1×1 convs; use decomposition: channel"
        elif not isinstance(mod, nn.Linear):
            hint = " (run low_rank before quantize)" if isinstance(mod, (QuantConv, QuantLinear)) else ""
            return f"{type(mod).__name__} is neither nn.Linear nor nn.Conv2d{hint}"
        if not mod.weight.is_floating_point():
            return f"weight is {mod.weight.dtype}, not floating point"
        return shared_weight_reason(ir, node)

    # -- rank choice -----------------------------------------------------------------------------
    def _rank(self, spectrum: torch.Tensor, macs_of_rank: Callable[[int], int], layer_macs: int, full: int) -> int:
        o = self.options
        if o.rank != "auto":
            return o.rank
        if o.flop_reduction is not None:
            return largest_rank_within(macs_of_rank, (1 - o.flop_reduction) * layer_macs, full)
        return rank_for_energy(spectrum, o.energy_or_default)

    def _plan(self, ir: IR, node: fx.Node, ctx: PassContext) -> LayerRewrite | str:
        mod = ir.module_of(node)
        planned = self._plan_linear(mod) if isinstance(mod, nn.Linear) else self._plan_conv(mod)  # type: ignore[arg-type]
        if isinstance(planned, str):
            return planned
        sizes, error, children = planned
        price = price_replacement(node, nn.Sequential(children), ctx.profile) if ctx.profile is not None else None
        return LayerRewrite(node, sizes, error, children, price)

    def _plan_linear(self, mod: nn.Linear) -> _Planned | str:
        out_f, in_f = mod.weight.shape
        full = min(out_f, in_f)
        spectrum = torch.linalg.svdvals(mod.weight.detach().double())
        r = self._rank(spectrum, lambda k: k * (in_f + out_f), in_f * out_f, full)
        if r > full:
            return f"rank {r} is above the full rank {full} of a {in_f} → {out_f} Linear"
        f = linear_low_rank(mod.weight, r)
        like = {"device": mod.weight.device, "dtype": mod.weight.dtype}
        down, up = nn.Linear(in_f, r, bias=False, **like), nn.Linear(r, out_f, bias=mod.bias is not None, **like)
        _load(down, f.first)
        _load(up, f.second, mod.bias)
        return {"rank": r}, f.relative_error, OrderedDict(down=down, up=up)

    def _plan_conv(self, conv: nn.Conv2d) -> _Planned | str:
        if self.options.decomposition == "tucker2":
            return self._plan_tucker2(conv)
        c_out, c_in, kh, kw = conv.weight.shape
        k2 = kh * kw
        full = min(c_out, c_in * k2)
        r = self._rank(conv_unfolding_spectrum(conv.weight, 0), lambda k: k * (c_in * k2 + c_out), c_out * c_in * k2, full)
        if r > full:
            return f"rank {r} is above the full rank {full} of this conv (min(C_out, C_in·K²))"
        f = channel_low_rank(conv.weight, r)
        down = _conv_like(conv, c_in, r, conv.kernel_size, spatial=True, bias=False)
        up = _conv_like(conv, r, c_out, (1, 1), spatial=False, bias=conv.bias is not None)
        _load(down, f.first)
        _load(up, f.second, conv.bias)
        return {"rank": r}, f.relative_error, OrderedDict(down=down, up=up)

    def _plan_tucker2(self, conv: nn.Conv2d) -> _Planned | str:
        o = self.options
        c_out, c_in, kh, kw = conv.weight.shape
        k2 = kh * kw
        if o.rank != "auto":
            r_out, r_in = min(o.rank, c_out), min(o.rank, c_in)
        elif o.flop_reduction is not None:
            def macs(s: int) -> int:
                a, b = min(s, c_out), min(s, c_in)
                return c_in * b + b * a * k2 + a * c_out
            s = largest_rank_within(macs, (1 - o.flop_reduction) * c_out * c_in * k2, max(c_out, c_in))
            r_out, r_in = min(s, c_out), min(s, c_in)
        else:
            r_out = rank_for_energy(conv_unfolding_spectrum(conv.weight, 0), o.energy_or_default)
            r_in = rank_for_energy(conv_unfolding_spectrum(conv.weight, 1), o.energy_or_default)
        t = tucker2(conv.weight, (r_out, r_in))
        first = _conv_like(conv, c_in, r_in, (1, 1), spatial=False, bias=False)
        core = _conv_like(conv, r_in, r_out, conv.kernel_size, spatial=True, bias=False)
        last = _conv_like(conv, r_out, c_out, (1, 1), spatial=False, bias=conv.bias is not None)
        _load(first, t.first)
        _load(core, t.core)
        _load(last, t.last, conv.bias)
        return {"rank_out": r_out, "rank_in": r_in}, t.relative_error, OrderedDict(down=first, core=core, up=last)


def _conv_like(conv: nn.Conv2d, c_in: int, c_out: int, kernel: tuple[int, ...], spatial: bool, bias: bool) -> nn.Conv2d:
    """A groups=1 conv on ``conv``'s device and dtype; ``spatial`` ones take its stride, padding and dilation."""
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    if not spatial:
        return nn.Conv2d(c_in, c_out, kernel, bias=bias, **like)  # type: ignore[arg-type]
    return nn.Conv2d(c_in, c_out, kernel, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
                     bias=bias, padding_mode=conv.padding_mode, **like)


def _load(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)  # type: ignore[operator]
        if bias is not None:
            layer.bias.copy_(bias)  # type: ignore[union-attr, operator]
