"""How to cut: remove channel classes from a model, physically, given the channel analysis.

`effopt.optimizer.ir.channels` says which tensor dimensions hold each class (its `Member`s); this
module shrinks them: a Conv/Linear loses weight rows (``out``) or columns (``in``), a BatchNorm /
LayerNorm / GroupNorm / PReLU loses entries, a depthwise conv loses rows and ``groups``, and shape
literals in the graph (``x.view(-1, 400)``, ``x[:, :16]``, ``split(x, [8, 8], 1)``) are rewritten to
the new sizes. Modules are replaced by edited copies (never edited in place: a traced graph shares
its modules with the user's model).

Worked example: a Linear(4 → 3) reading a removed channel 2 loses column 2 of its weight
(``weight[:, [0, 1, 3]]``) and sets ``in_features = 3``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.channels import ChannelAnalysis, Member
from effopt.optimizer.ir.core import IR

_SHAPE_METHODS = {"view", "reshape", "expand", "repeat"}


def cut(ir: IR, analysis: ChannelAnalysis, removed: Iterable[int]) -> list[str]:
    """Remove ``removed`` classes from ``ir`` in place; returns the nodes whose modules changed.

    Compensation, if any, happens before the cut (`effopt.passes.prune_channels` folds it into the
    consumers' biases while the removed channels still exist).
    """
    gone = frozenset(int(c) for c in removed)
    if not gone:
        return []
    by_node: dict[str, list[Member]] = defaultdict(list)
    for m in analysis.members:
        if gone & set(m.classes):
            by_node[m.node].append(m)
    nodes = {n.name: n for n in ir.gm.graph.nodes}
    for name, members in by_node.items():
        node = nodes[name]
        mod = copy.deepcopy(ir.gm.get_submodule(str(node.target)))
        roles = {m.role: m for m in members}
        if "out" in roles:
            _cut_out(mod, roles["out"].kept(gone))
        if "in" in roles:
            _cut_in(mod, roles["in"].kept(gone), len(roles["in"].classes))
        if "param" in roles:
            if roles["param"].depthwise:
                _cut_depthwise(mod, roles["param"].kept(gone))
            else:
                _cut_per_channel(mod, roles["param"].kept(gone))
        ir.set_submodule(str(node.target), mod)
    _rewrite_literals(ir, analysis, gone)
    return sorted(by_node)


# -- modules ----------------------------------------------------------------------------------


def _keep(t: torch.Tensor | None, dim: int, kept: Sequence[int]) -> nn.Parameter | None:
    if t is None:
        return None
    out = t.detach().index_select(dim, torch.tensor(kept, dtype=torch.long)).clone()
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def _set(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    if isinstance(value, nn.Parameter):
        setattr(mod, name, value)
    else:
        mod.register_buffer(name, value)


def _cut_out(mod: nn.Module, kept: list[int]) -> None:
    """Output channels: weight dim 0 and bias of a Conv/Linear (grouped convs keep their groups)."""
    _set(mod, "weight", _keep(mod.weight, 0, kept))
    if getattr(mod, "bias", None) is not None:
        _set(mod, "bias", _keep(mod.bias, 0, kept))
    if isinstance(mod, nn.Linear):
        mod.out_features = len(kept)
    else:
        mod.out_channels = len(kept)


def _cut_in(mod: nn.Module, kept: list[int], size: int) -> None:
    """Input channels: weight dim 1, per conv group for a grouped conv (each group keeps the same count)."""
    if isinstance(mod, nn.Linear):
        _set(mod, "weight", _keep(mod.weight, 1, kept))
        mod.in_features = len(kept)
        return
    groups = mod.groups
    if groups == 1:
        _set(mod, "weight", _keep(mod.weight, 1, kept))
    else:
        per_in, rows = size // groups, mod.weight.shape[0] // groups
        parts = []
        for g in range(groups):
            local = [i - g * per_in for i in kept if g * per_in <= i < (g + 1) * per_in]
            block = mod.weight.detach()[g * rows:(g + 1) * rows]
            parts.append(block.index_select(1, torch.tensor(local, dtype=torch.long)))
        if len({p.shape[1] for p in parts}) != 1:
            raise AssertionError(f"grouped conv cut unevenly: {[p.shape[1] for p in parts]} inputs per group")
        mod.weight = nn.Parameter(torch.cat(parts).clone(), requires_grad=mod.weight.requires_grad)
    mod.in_channels = len(kept)


def _cut_depthwise(mod: nn.Module, kept: list[int]) -> None:
    """A depthwise conv: rows, bias, and its channel counts and groups (in = groups = out / multiplier)."""
    multiplier = mod.out_channels // mod.groups
    _cut_out(mod, kept)
    mod.in_channels = mod.groups = len(kept) // multiplier


def _cut_per_channel(mod: nn.Module, kept: list[int]) -> None:
    """Per-channel parameters and buffers of a norm or PReLU, and its size attribute."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] > 1:
            _set(mod, name, _keep(t, 0, kept))
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) or isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        mod.num_features = len(kept)
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (len(kept),)
    elif isinstance(mod, nn.GroupNorm):
        mod.num_channels = len(kept)
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = len(kept)


# -- shape literals in the graph ----------------------------------------------------------------


def _rewrite_literals(ir: IR, analysis: ChannelAnalysis, gone: frozenset[int]) -> None:
    """Give every shape literal that named a pruned size its new value."""
    for n in ir.gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        out = analysis.labels.get(n.name)
        if n.op == "call_module":
            if isinstance(ir.gm.get_submodule(str(n.target)), nn.Unflatten) and isinstance(out, torch.Tensor):
                _rewrite_unflatten(ir, n, analysis, gone, out)
            continue
        name = canonical_op(n, ir.gm)  # view for x.view, torch.reshape's reshape, aten.view.default...
        if isinstance(out, torch.Tensor) and name in _SHAPE_METHODS | {"_reshape_alias"}:
            _rewrite_shape_args(n, analysis, gone, out)
        elif name == "getitem" and isinstance(n.args[0], fx.Node):
            _rewrite_slices(n, analysis, gone)
        elif name in ("split", "split_with_sizes") and isinstance(out, (tuple, list)):
            _rewrite_split(n, analysis, gone, out)
        elif name == "narrow":
            _rewrite_narrow(n, analysis, gone)


def _rewrite_unflatten(ir: IR, n: fx.Node, analysis: ChannelAnalysis, gone: frozenset[int], out: torch.Tensor) -> None:
    mod = ir.gm.get_submodule(str(n.target))
    d = mod.dim % (out.dim() - len(mod.unflattened_size) + 1)
    new = tuple(len(analysis.kept_along(n.name, d + i, gone)) for i in range(len(mod.unflattened_size)))
    if new != tuple(mod.unflattened_size):
        fresh = copy.deepcopy(mod)
        fresh.unflattened_size = new
        ir.set_submodule(str(n.target), fresh)


def _new_sizes(analysis: ChannelAnalysis, name: str, gone: frozenset[int], t: torch.Tensor) -> list[int]:
    return [len(analysis.kept_along(name, d, gone, arg=t)) for d in range(t.dim())]


def _rewrite_shape_args(n: fx.Node, analysis: ChannelAnalysis, gone: frozenset[int], out: torch.Tensor) -> None:
    """``view`` / ``reshape`` / ``expand`` / ``repeat``: literal sizes at pruned dims take the new size."""
    old, new = list(out.shape), _new_sizes(analysis, n.name, gone, out)
    if old == new:
        return
    args = list(n.args)
    packed = len(args) == 2 and isinstance(args[1], (tuple, list))
    sizes = list(args[1]) if packed else args[1:]
    if len(sizes) != len(old):
        raise AssertionError(f"'{n.name}': {len(sizes)} sizes for a {len(old)}-d result")
    for d, (s, o, w) in enumerate(zip(sizes, old, new)):
        if isinstance(s, int) and s != -1 and o != w:
            if s != o:
                raise AssertionError(f"'{n.name}': literal {s} at dim {d} is not the traced size {o}")
            sizes[d] = w
    n.args = (args[0], type(args[1])(sizes)) if packed else (args[0], *sizes)


def _rewrite_slices(n: fx.Node, analysis: ChannelAnalysis, gone: frozenset[int]) -> None:
    """``x[:, a:b]`` on a pruned dim: the bounds count only the surviving positions before them."""
    src = n.args[0]
    labels = analysis.labels.get(src.name)
    index = n.args[1]
    if not isinstance(labels, torch.Tensor):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    if any(it is Ellipsis for it in items):
        return
    changed = False
    for d, it in enumerate(items):
        if not isinstance(it, slice) or d >= labels.dim():
            continue
        kept = analysis.kept_along(src.name, d, gone)
        size = labels.shape[d]
        if len(kept) == size:
            continue
        start, stop, step = it.indices(size)
        if step != 1:
            raise AssertionError(f"'{n.name}' slices a pruned dim with step {step}")
        new = slice(None if it.start is None else sum(1 for k in kept if k < start),
                    None if it.stop is None else sum(1 for k in kept if k < stop))
        items[d], changed = new, True
    if changed:
        n.args = (src, tuple(items) if isinstance(index, tuple) else items[0])


def _rewrite_split(n: fx.Node, analysis: ChannelAnalysis, gone: frozenset[int], out: Sequence[Any]) -> None:
    """``split(x, 16, dim)`` / ``split(x, [8, 24], dim)``: sizes of the pieces after the cut."""
    args = list(n.args)
    dim = n.kwargs.get("dim", args[2] if len(args) > 2 else 0)
    pieces = [len(analysis.kept_along(n.name, int(dim) % t.dim(), gone, arg=t)) for t in out]
    sizes = args[1] if len(args) > 1 else n.kwargs.get("split_size_or_sections", n.kwargs.get("split_size"))
    if isinstance(sizes, int):
        new: Any = pieces[0]
    elif isinstance(sizes, (list, tuple)):
        new = type(sizes)(pieces)
    else:
        return
    if len(args) > 1:
        args[1] = new
        n.args = tuple(args)
    else:
        key = "split_size_or_sections" if "split_size_or_sections" in n.kwargs else "split_size"
        n.kwargs = {**n.kwargs, key: new}


def _rewrite_narrow(n: fx.Node, analysis: ChannelAnalysis, gone: frozenset[int]) -> None:
    src, dim, start, length = (list(n.args) + [None] * 4)[:4]
    if not all(isinstance(v, int) for v in (dim, start, length)) or not isinstance(src, fx.Node):
        return
    kept = analysis.kept_along(src.name, dim, gone)
    new_start = sum(1 for k in kept if k < start)
    new_len = sum(1 for k in kept if start <= k < start + length)
    n.args = (src, dim, new_start, new_len)


__all__ = ["cut"]
