"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): even out per-channel weight ranges.

Why: a layer whose output channels have very different weight ranges (depthwise convs, layers
after PReLU, BatchNorm folded with tiny variances) wastes most of a per-tensor grid on its widest
channel, and the next layer's input channels inherit the imbalance. For two layers joined by a
positively homogeneous op f (f(x/s) = f(x)/s for s > 0: ReLU, PReLU, leaky ReLU, identity,
max/avg pooling), dividing output channel i of the first layer by s_i and multiplying input
channel i of the second by s_i leaves the pair's function unchanged::

    W2 · f(W1 x + b1)  =  (W2 S) · f(S⁻¹ W1 x + S⁻¹ b1)      S = diag(s), s_i > 0

With r1_i = max|W1[i, ...]| and r2_i = max|W2[:, i, ...]|, s_i = sqrt(r1_i · r2_i) / r2_i gives both
layers the range sqrt(r1_i · r2_i) on channel i. Worked example: r1 = [4, 0.25], r2 = [1, 1]
gives s = [2, 0.5]; the first layer's rows become [2, 0.5] wide, the second layer's columns
[2, 0.5]: both now span the same ranges channel by channel.

PReLU keeps its slopes: prelu(x/s) = prelu(x)/s for every s > 0 whatever the slope is (the
sign of x decides which slope applies and dividing by s > 0 keeps the sign), so the slopes must
*not* be rescaled, and a negative s would break it (hence only positive scales).

A pair is equalized only when the value between the two layers feeds nothing else: a residual
or a branch would see the rescaled channels too (`find_pairs` declines it with the reason).
Chains (conv1 → conv2 → conv3) share a layer between two pairs, so the scales are recomputed in
sweeps until they stop changing (`equalize`).

This module is pure weight arithmetic plus a graph matcher; it never quantizes anything. The
quantize pass runs it before calibration (`effopt.passes.ptq_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.core import facts, has_facts

__all__ = [
    "Declined",
    "EqualizationPair",
    "equalization_scales",
    "equalize",
    "find_pairs",
    "input_channel_ranges",
    "output_channel_ranges",
    "pair_errors",
    "scale_pair",
]

#: ops between two layers through which a positive per-channel scale passes unchanged
SCALE_EQUIVARIANT_KINDS: frozenset[str] = frozenset({
    "relu", "prelu", "leaky_relu", "identity", "dropout", "max_pool", "adaptive_max_pool", "avg_pool",
    "adaptive_avg_pool",
})
#: ops that keep the channel order when every other per-sample dim is 1 ([N, C, 1, 1] → [N, C])
_RESHAPE_KINDS: frozenset[str] = frozenset({"flatten", "view", "reshape", "squeeze"})
_WHY_NOT: dict[str, str] = {
    "relu6": "ReLU6 clips at 6, which moves when the channel is rescaled (replace it by ReLU to equalize)",
    "hardtanh": "hardtanh clips at fixed bounds, which move when the channel is rescaled",
    "batch_norm": "a BatchNorm sits between the layers (run fold_batchnorm first)",
}


@dataclass(frozen=True)
class EqualizationPair:
    """Two layers whose shared channels can be rescaled: ``first`` → ``through`` → ``second`` (fx node names).

    ``first_module``/``second_module`` are the module paths whose weights change.
    E.g. ``EqualizationPair("conv1", "conv2", "conv1", "conv2", ("relu",))``.
    """

    first: str
    second: str
    first_module: str
    second_module: str
    through: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.first}→{self.second}"


@dataclass(frozen=True)
class Declined:
    """A layer `find_pairs` looked at and did not pair, with the reason (the pass turns it into a Skip)."""

    node: str
    reason: str


def output_channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """max|w| per output channel (dim 0): ``[[1, -3], [0.5, 0]]`` → ``[3, 0.5]``."""
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)


def input_channel_ranges(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """max|w| per *input* channel of a conv/linear weight ``[out, in/groups, ...]``.

    A grouped conv's input channel c feeds only the outputs of its group, through column
    ``c % (in/groups)``. E.g. a depthwise weight ``[C, 1, k, k]`` gives filter c's range for
    channel c; a Linear ``[[1, -3], [0.5, 0]]`` gives ``[1, 3]``.
    """
    out, per_group = w.shape[0], w.shape[1]
    v = w.detach().abs().reshape(groups, out // groups, per_group, -1)
    return v.amax(dim=(1, 3)).reshape(groups * per_group)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = sqrt(r1_i · r2_i) / r2_i, and 1 where a channel is dead in either layer.

    >>> equalization_scales(torch.tensor([4.0, 0.25]), torch.tensor([1.0, 1.0]))
    tensor([2.0000, 0.5000])
    """
    r1, r2 = r1.double(), r2.double()
    alive = (r1 > 0) & (r2 > 0)
    s = torch.where(alive, torch.sqrt(r1 / torch.where(alive, r2, torch.ones_like(r2))), torch.ones_like(r1))
    return s.clamp(1e-8, 1e8).float()


def scale_pair(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, s: torch.Tensor,
               groups2: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(W1 / s by output channel, b1 / s, W2 · s by input channel): the pair's function is unchanged.

    E.g. w1 = [[4], [0.25]], w2 = [[1, 1]], s = [2, 0.5] → w1 = [[2], [0.5]], w2 = [[2, 0.5]].
    """
    if bool((s <= 0).any()):
        raise ValueError("equalization scales must be positive: a negative scale flips ReLU/PReLU")
    shape1 = [-1] + [1] * (w1.dim() - 1)
    new_w1 = w1 / s.reshape(shape1).to(w1.dtype)
    new_b1 = None if b1 is None else b1 / s.to(b1.dtype)
    out, per_group = w2.shape[0], w2.shape[1]
    v = w2.reshape(groups2, out // groups2, per_group, -1)
    new_w2 = (v * s.reshape(groups2, 1, per_group, 1).to(w2.dtype)).reshape(w2.shape)
    return new_w1, new_b1, new_w2


# -- matching -----------------------------------------------------------------------------------


def _weighted_layer(n: fx.Node, gm: fx.GraphModule) -> nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear | None:
    if n.op != "call_module":
        return None
    mod = gm.get_submodule(str(n.target))
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return None
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        return mod  # type: ignore[return-value]
    return None


def _groups(mod: nn.Module) -> int:
    return int(getattr(mod, "groups", 1))


def _out_channels(mod: nn.Module) -> int:
    return int(mod.weight.shape[0])  # type: ignore[union-attr]


def _in_channels(mod: nn.Module) -> int:
    return int(mod.weight.shape[1]) * _groups(mod)  # type: ignore[union-attr]


def _keeps_channels(n: fx.Node, channels: int) -> bool:
    """A flatten/view/reshape/squeeze that maps ``[N, C, 1, ...]`` to ``[N, C]`` (shapes from the facts)."""
    if not has_facts(n):
        return False
    f = facts(n)
    if not f.inputs or not f.outputs:
        return False
    src, dst = f.inputs[0].shape, f.outputs[0].shape
    return (len(src) >= 2 and src[1] == channels and all(d == 1 for d in src[2:])
            and len(dst) == 2 and dst[0] == src[0] and dst[1] == channels)


def _through_reason(n: fx.Node, gm: fx.GraphModule, channels: int) -> str | None:
    """Why ``n`` cannot sit between an equalized pair, or None if a positive channel scale passes through it."""
    kind = canonical_op(n, gm) if n.op in ("call_module", "call_function", "call_method") else n.op
    if kind in SCALE_EQUIVARIANT_KINDS:
        if kind == "prelu" and n.op != "call_module":
            return "a functional prelu: its slope is not a module parameter"
        return None
    if kind in _RESHAPE_KINDS:
        return None if _keeps_channels(n, channels) else f"{kind} '{n.name}' mixes channels into features"
    return _WHY_NOT.get(kind, f"{kind} '{n.name}' is not scale-equivariant (f(x/s) ≠ f(x)/s)")


def find_pairs(gm: fx.GraphModule) -> tuple[list[EqualizationPair], list[Declined]]:
    """Every conv/linear → (scale-equivariant ops) → conv/linear chain whose middle values feed nothing else.

    Walks forward from each conv/linear module call in graph order. Declined (with a reason): a
    value between the layers with several users (a residual, a branch: the other user would see the
    rescaled channels), an op that does not commute with a channel scale (ReLU6, BatchNorm, sigmoid, a
    flatten of a spatial map), a module called from several places, channel counts that differ.
    A layer whose output reaches the graph output, or a non-layer consumer, is left out silently:
    there is nothing to pair it with.

    Example: ``conv1 → relu → conv2 → relu → maxpool → conv3`` gives pairs conv1→conv2 and conv2→conv3;
    with ``y = conv2(x) + x`` the add shares conv1's output, so conv1 is declined.
    """
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    pairs: list[EqualizationPair] = []
    declined: list[Declined] = []
    for n in gm.graph.nodes:
        first = _weighted_layer(n, gm)
        if first is None:
            continue
        channels = _out_channels(first)
        value, through = n, []
        while True:
            users = list(value.users)
            if len(users) != 1:
                if len(users) > 1:
                    names = ", ".join(u.name for u in users)
                    why = f"'{value.name}' feeds {len(users)} users ({names}): a residual or branch would see the rescaled"
                    declined.append(Declined(n.name, why + " channels"))
                break
            nxt = users[0]
            if nxt.op == "output":
                break
            second = _weighted_layer(nxt, gm)
            if second is not None:
                reason = _pair_reason(n, nxt, first, second, value, calls)
                if reason is None:
                    pairs.append(EqualizationPair(n.name, nxt.name, str(n.target), str(nxt.target), tuple(through)))
                else:
                    declined.append(Declined(n.name, reason))
                break
            why = _through_reason(nxt, gm, channels)
            if why is None and any(a is not value for a in nxt.all_input_nodes):
                why = f"'{nxt.name}' also reads another value"
            if why is not None:
                if _leads_to_layer(nxt, gm):
                    declined.append(Declined(n.name, f"no equalization with the next layer: {why}"))
                break
            through.append(nxt.name)
            value = nxt
    return pairs, declined


def _leads_to_layer(n: fx.Node, gm: fx.GraphModule, depth: int = 4) -> bool:
    """Does a conv/linear consume ``n``'s value within a few single-user steps? (Only then is a decline news.)"""
    value = n
    for _ in range(depth):
        users = list(value.users)
        if len(users) != 1:
            return False
        if _weighted_layer(users[0], gm) is not None:
            return True
        value = users[0]
    return False


def _pair_reason(n1: fx.Node, n2: fx.Node, first: nn.Module, second: nn.Module, value: fx.Node,
                 calls: dict[str, int]) -> str | None:
    if calls.get(str(n1.target), 0) > 1:
        return f"module '{n1.target}' is called from several places"
    if calls.get(str(n2.target), 0) > 1:
        return f"module '{n2.target}' (the next layer) is called from several places"
    if n2.args[0] is not value:
        return f"'{n2.name}' does not read '{value.name}' as its input"
    if _in_channels(second) != _out_channels(first):
        return f"'{n1.name}' has {_out_channels(first)} output channels but '{n2.name}' reads {_in_channels(second)}"
    return None


# -- the rescaling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EqualizationResult:
    """What `equalize` did: per pair the product of every sweep's scales, and how many sweeps ran."""

    scales: dict[str, torch.Tensor]  # pair label → s (the first layer's channel i was divided by s_i)
    sweeps: int
    converged: bool


def equalize(gm: fx.GraphModule, pairs: Sequence[EqualizationPair], max_sweeps: int = 20,
             tolerance: float = 1e-4) -> EqualizationResult:
    """Rescale every pair in place, sweeping in graph order until no scale moves by more than ``tolerance``.

    One sweep is exact for separate pairs; a layer in two pairs (the middle of conv1 → conv2 →
    conv3) is pulled by both, so a few sweeps are needed (Nagel et al. iterate too). The model
    computes the same function after every sweep (up to float rounding); returns the accumulated
    scales. Deterministic: graph order, no randomness.
    """
    total = {p.label: torch.ones(_out_channels(gm.get_submodule(p.first_module))) for p in pairs}
    sweeps, converged = 0, not pairs
    while pairs and sweeps < max_sweeps:
        sweeps += 1
        moved = 0.0
        for p in pairs:
            s = _equalize_pair(gm, p)
            total[p.label] = total[p.label] * s
            moved = max(moved, float((s - 1).abs().max()) if s.numel() else 0.0)
        if moved <= tolerance:
            converged = True
            break
    return EqualizationResult(total, sweeps, converged)


def _equalize_pair(gm: fx.GraphModule, p: EqualizationPair) -> torch.Tensor:
    first, second = gm.get_submodule(p.first_module), gm.get_submodule(p.second_module)
    w1, b1, w2 = first.weight, first.bias, second.weight  # type: ignore[union-attr]
    s = equalization_scales(output_channel_ranges(w1), input_channel_ranges(w2, _groups(second)))
    bias = None if b1 is None else b1.detach()
    new_w1, new_b1, new_w2 = scale_pair(w1.detach(), bias, w2.detach(), s, _groups(second))
    with torch.no_grad():
        w1.copy_(new_w1)
        if b1 is not None and new_b1 is not None:
            b1.copy_(new_b1)
        w2.copy_(new_w2)
    return s


# -- measuring a pair ------------------------------------------------------------------------------


def pair_errors(
    gm: fx.GraphModule,
    pairs: Sequence[EqualizationPair],
    batches: Sequence[tuple[torch.Tensor, ...]],
    quantize_weight: Callable[[torch.Tensor], torch.Tensor],
    quantize_activation: Callable[[list[torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]],
    alone: bool = False,
) -> list[float]:
    """Per pair, the relative error ‖ŷ2 − y2‖² / ‖y2‖² at the second layer's output on ``batches``.

    ``alone=True`` measures each pair as if it alone were equalized (one step of `scale_pair` on
    the current weights, the model left as it is): the per-pair verdict, independent of the others.

    ŷ2 is computed with both layers' weights quantized (``quantize_weight``: a fake-quant of one
    weight tensor) and the value entering the second layer quantized (``quantize_activation``:
    given that value on every batch, returns its fake-quant, e.g. a calibrated per-tensor uint8
    grid); the first layer reads its float input, so the number is the pair's own error. y2 is the
    float output; equalization leaves it unchanged, so errors with and without it compare directly.
    The model runs once (to capture each first layer's input); the pairs are then computed alone.
    """
    firsts = {p.first_module: [] for p in pairs}  # type: dict[str, list[torch.Tensor]]
    removers = [gm.get_submodule(path).register_forward_pre_hook(
        lambda _m, a, store=store: store.append(a[0].detach())).remove for path, store in firsts.items()]
    try:
        with torch.no_grad():
            for inputs in batches:
                gm(*inputs)
    finally:
        for remove in removers:
            remove()
    nodes = {n.name: n for n in gm.graph.nodes}
    errors = []
    with torch.no_grad():
        for p in pairs:
            first, second = gm.get_submodule(p.first_module), gm.get_submodule(p.second_module)
            w1, b1, w2 = first.weight.detach(), first.bias, second.weight.detach()  # type: ignore[union-attr]
            b1 = None if b1 is None else b1.detach()
            if alone:
                s = equalization_scales(output_channel_ranges(w1), input_channel_ranges(w2, _groups(second)))
                w1, b1, w2 = scale_pair(w1, b1, w2, s, _groups(second))
            q1, q2 = quantize_weight(w1), quantize_weight(w2)
            xs = firsts[p.first_module]
            wants = [_layer(second, _chain(gm, nodes, p, _layer(first, x, w1, b1)), w2) for x in xs]
            middles = [_chain(gm, nodes, p, _layer(first, x, q1, b1)) for x in xs]
            fq = quantize_activation(middles)
            gots = [_layer(second, fq(m), q2) for m in middles]
            num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(gots, wants))
            den = sum(float(w.double().pow(2).sum()) for w in wants)
            errors.append(num / (den or 1.0))
    return errors


_OWN_BIAS = object()


def _layer(mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: object = _OWN_BIAS) -> torch.Tensor:
    """A conv/linear module's computation with another weight (and bias, if given)."""
    bias = mod.bias if b is _OWN_BIAS else b
    if isinstance(mod, nn.Linear):
        return torch.nn.functional.linear(x, w, bias)  # type: ignore[arg-type]
    return mod._conv_forward(x, w, bias)  # type: ignore[union-attr, operator]


def _chain(gm: fx.GraphModule, nodes: dict[str, fx.Node], p: EqualizationPair, value: torch.Tensor) -> torch.Tensor:
    """Run the ops between the two layers (``p.through``) on ``value``, as the graph calls them."""
    previous = nodes[p.first]
    for name in p.through:
        n = nodes[name]
        args = tuple(value if a is previous else a for a in n.args)
        kwargs = {k: (value if v is previous else v) for k, v in n.kwargs.items()}
        if n.op == "call_module":
            value = gm.get_submodule(str(n.target))(*args, **kwargs)
        elif n.op == "call_function":
            value = n.target(*args, **kwargs)  # type: ignore[operator]
        else:
            value = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        previous = n
    return value
