"""Which channels of a model must be pruned together: the channel-dependency analysis.

Removing output channel 3 of a conv also removes input channel 3 of every layer that reads it,
channel 3 of the BatchNorm in between, and, through a residual ``add``, channel 3 of every other
producer feeding that add. Torch-Pruning calls this the dependency graph; effopt computes it by
*labelling every element of every tensor with the channel it came from* and pushing those labels
through the graph:

- each Conv/Linear output gets fresh labels, one per output channel (an *element* id);
- per-channel ops (activations, BatchNorm, pooling, dropout) keep their input's labels;
- an ``add`` / ``sub`` / ``mul`` of two labelled tensors *unifies* the labels meeting at each
  position (a residual couples its producers channel by channel);
- shape ops (``cat``, ``split``, ``view``, ``flatten``, ``permute``, a channel shuffle) are run on
  the label tensor itself, so a ``flatten`` into a Linear maps channel c to its block of features
  and a ``permute`` before the reshape maps it with the stride the permutation implies;
- a consumer (Conv/Linear input, BatchNorm parameters) reads the labels along its channel dim.

Labels that end up unified form one *class*: the unit that is kept or removed as a whole. Classes
whose producers are connected form a `ChannelGroup`, the unit that is scored and reported.
Anything the analysis does not understand (an unknown op reading the channels, a model output, a
shared module, a softmax over channels) *locks* the group with the reason, so pruning never
produces a broken model. This module only says what is coupled; how to score is
`effopt.passes.prune_importance`, how to cut is `effopt.passes.prune_channels`.

Worked example: ``y = conv2(relu(bn(conv1(x)))) + conv3(x)`` with conv1 → 8 channels and conv2,
conv3 → 16 channels gives two groups: {conv1 out, bn, conv2 in} with 8 classes, and
{conv2 out, conv3 out} with 16 classes — locked, because ``y`` is the model output.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import PER_ELEMENT_FLOPS, canonical_op
from effopt.optimizer.ir.core import IR

NONE = -1  # the label of an element that is no prunable channel (a model input, a constant)

Role = Literal["out", "in", "param"]

# ops that keep each element's channel: activations and other one-tensor elementwise functions
_UNARY = set(PER_ELEMENT_FLOPS) - {"softmax", "log_softmax", "batch_norm", "layer_norm", "group_norm",
                                   "instance_norm", "rms_norm"}
_PASS = {"dropout", "identity", "contiguous", "to", "type_as", "float", "half", "bfloat16", "clone", "detach"}
_BINARY = {"add", "sub", "mul", "div", "max", "min", "where", "pow"}
_SPATIAL = {"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "interpolate",
            "upsample_nearest2d", "upsample_bilinear2d", "pad", "constant_pad_nd"}
_STRUCTURAL = {"flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "t",
               "expand", "expand_as", "getitem", "chunk", "split", "unbind", "narrow", "cat", "stack",
               "repeat", "roll", "flip", "view_as", "movedim", "swapaxes", "split_with_sizes", "tensor_split"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var"}
_NORMALIZE_OVER_DIM = {"softmax", "log_softmax"}


@dataclass(frozen=True)
class Member:
    """One tensor dimension a cut must shrink: a layer's output or input channels, or a per-channel parameter.

    ``classes[i]`` is the class of index ``i`` along that dimension (`NONE`: never removed). A Linear
    after ``flatten`` of 4 channels × 3×3 has 36 input positions, ``classes = (a,)*9 + (b,)*9 + ...``.
    ``role``: ``out`` = weight dim 0 (+ bias) of a Conv/Linear; ``in`` = the input dim of a
    Conv/Linear (dim 1, per conv group for grouped convs); ``param`` = the per-channel parameters and
    buffers of a BatchNorm, LayerNorm, GroupNorm, InstanceNorm or PReLU, and a depthwise conv's
    weight rows (``depthwise``) whose ``groups`` shrinks with them.
    """

    node: str
    module: str
    role: Role
    classes: tuple[int, ...]
    depthwise: bool = False

    def kept(self, removed: frozenset[int] | set[int]) -> list[int]:
        """Indices along the member's dimension that survive removing ``removed`` classes."""
        return [i for i, c in enumerate(self.classes) if c == NONE or c not in removed]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together, scored and reported as one unit.

    ``classes`` are the group's channels in the root producer's order; ``cells`` partition them so that
    removing the same number from every cell keeps every equal-split constraint (grouped convs,
    ``chunk``, GroupNorm) satisfied; one cell when there is none. ``locked`` says why the group may
    not be pruned (None: it may).
    """

    index: int
    root: str
    producers: tuple[str, ...]
    classes: tuple[int, ...]
    cells: tuple[tuple[int, ...], ...]
    members: tuple[Member, ...]
    locked: str | None = None

    @property
    def channels(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return self.locked is None and self.channels > 1


@dataclass
class ChannelAnalysis:
    """The result: groups, members and each node's label tensor (to recompute shapes after a cut)."""

    groups: tuple[ChannelGroup, ...]
    members: tuple[Member, ...]
    labels: dict[str, Any] = field(repr=False)  # node name -> class-label tensor / tuple / None
    class_group: dict[int, int] = field(repr=False)

    def group_of(self, name: str) -> ChannelGroup | None:
        """The group whose root or one of whose producers is node ``name``."""
        for g in self.groups:
            if name == g.root or name in g.producers:
                return g
        return None

    def kept_along(self, node: str, dim: int, removed: frozenset[int], arg: Any = None) -> list[int]:
        """Positions along ``dim`` of ``node``'s output (or of the label tensor ``arg``) that survive ``removed``.

        A position is dropped when every element in its slice belongs to a removed class.
        """
        t = arg if arg is not None else self.labels[node]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"node '{node}' has no label tensor")
        slices = t.movedim(dim, 0).reshape(t.shape[dim], -1)
        if not removed:
            return list(range(t.shape[dim]))
        gone = torch.isin(slices, torch.tensor(sorted(removed), dtype=torch.int64)) & (slices != NONE)
        return [i for i in range(t.shape[dim]) if not bool(gone[i].all())]


# -- union-find over element ids ------------------------------------------------------------------


class _Elements:
    """Element ids with union-find, the producer (space) each came from, and why a class is locked."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.space: list[int] = []
        self.lock: dict[int, str] = {}
        self.space_parent: list[int] = []

    def fresh(self, n: int) -> torch.Tensor:
        start, space = len(self.parent), len(self.space_parent)
        self.space_parent.append(space)
        self.parent.extend(range(start, start + n))
        self.space.extend([space] * n)
        return torch.arange(start, start + n, dtype=torch.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def _find_space(self, s: int) -> int:
        while self.space_parent[s] != s:
            self.space_parent[s] = self.space_parent[self.space_parent[s]]
            s = self.space_parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        sa, sb = self._find_space(self.space[a]), self._find_space(self.space[b])
        if sa != sb:
            self.space_parent[max(sa, sb)] = min(sa, sb)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor, reason_if_none: str) -> None:
        """Unify the labels meeting position by position; a label meeting `NONE` is locked."""
        pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)], dim=1), dim=0)
        for x, y in pairs.tolist():
            if x == NONE and y == NONE:
                continue
            if x == NONE or y == NONE:
                self.lock_ids([y if x == NONE else x], reason_if_none)
            else:
                self.union(x, y)

    def lock_ids(self, ids: Iterable[int], reason: str) -> None:
        for i in ids:
            if i != NONE:
                self.lock.setdefault(i, reason)

    def group_key(self, a: int) -> int:
        return self._find_space(self.space[a])


def _ids_in(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(i) for i in torch.unique(value).tolist() if i != NONE]
    if isinstance(value, (tuple, list)):
        return sorted({i for v in value for i in _ids_in(v)})
    return []


def _labels_along(t: torch.Tensor, dim: int) -> list[int] | None:
    """The label of each index along ``dim``, or None if a slice mixes labels (channels mixed with other dims)."""
    rows = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    if rows.shape[1] == 0:
        return None
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if not bool((lo == hi).all()):
        return None
    return [int(v) for v in lo.tolist()]


def _along(labels: torch.Tensor, dim: int, shape: Sequence[int]) -> torch.Tensor:
    """``labels`` (1-D) laid along ``dim`` of a tensor of ``shape``, broadcast over the rest."""
    view = [1] * len(shape)
    view[dim] = len(labels)
    return labels.reshape(view).expand(*shape)


# -- the analysis -----------------------------------------------------------------------------


def analyze_channels(ir: IR) -> ChannelAnalysis:
    """The channel groups of ``ir``: what is coupled, what may be cut, and why not where it may not.

    Runs the model once on its example inputs (to know every shape and every Python value a shape op
    reads) and once on label tensors. Pure: the IR is not modified.
    """
    return _Analyzer(ir).run()


class _Analyzer:
    def __init__(self, ir: IR) -> None:
        self.ir = ir
        self.gm = ir.gm
        self.el = _Elements()
        self.labels: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        self.members: list[Member] = []
        self.constraints: list[tuple[str, list[list[int]]]] = []  # (why, blocks of element ids)
        self.producers: dict[int, str] = {}  # element id -> producing node (first element of a layer's output)
        self.call_sites: dict[str, int] = defaultdict(int)

    # -- driver --

    def run(self) -> ChannelAnalysis:
        self.values = _concrete_values(self.gm, self.ir.example_inputs)
        for n in self.gm.graph.nodes:
            if n.op == "call_module":
                self.call_sites[str(n.target)] += 1
        for n in self.gm.graph.nodes:
            self.labels[n.name] = self._visit(n)
        return self._collect()

    def _visit(self, n: fx.Node) -> Any:
        value = self.values.get(n.name)
        if n.op == "placeholder":
            return _none_like(value)
        if n.op == "get_attr":
            return _none_like(value)
        if n.op == "output":
            self.el.lock_ids(_ids_in(self._arg_labels(n.args[0])), "reaches the model output")
            return None
        if not _has_tensor(value):
            return None  # shape arithmetic (x.size(1), getattr(x, 'shape')): reads no channel
        kind = canonical_op(n, self.gm)
        if n.op == "call_module":
            return self._module(n, kind, self.gm.get_submodule(str(n.target)), value)
        return self._function(n, kind, value)

    # -- helpers over node arguments --

    def _arg_labels(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.labels.get(a.name)
        if isinstance(a, (tuple, list)):
            return type(a)(self._arg_labels(x) for x in a)
        return None

    def _tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if isinstance(self.labels.get(a.name), torch.Tensor)]

    def _lock_inputs(self, n: fx.Node, reason: str) -> None:
        for a in n.all_input_nodes:
            self.el.lock_ids(_ids_in(self.labels.get(a.name)), reason)

    def _unknown(self, n: fx.Node, kind: str, value: Any) -> Any:
        self._lock_inputs(n, f"read by '{n.name}' ({kind}), which channel pruning does not understand")
        return _none_like(value)

    def _first_input(self, n: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
        a = n.args[0] if n.args else None
        t = self.labels.get(a.name) if isinstance(a, fx.Node) else None
        return (a, t) if isinstance(t, torch.Tensor) else None

    # -- modules --

    def _module(self, n: fx.Node, kind: str, mod: nn.Module, value: Any) -> Any:
        first = self._first_input(n)
        shared = self.call_sites[str(n.target)] > 1
        if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
            return self._layer(n, mod, first, value, channel_dim=1, shared=shared)
        if isinstance(mod, nn.Linear):
            return self._layer(n, mod, first, value, channel_dim=-1, shared=shared)
        if first is None:
            return self._unknown(n, kind, value)
        src, t = first
        if kind in _UNARY or kind in _PASS or isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)):
            if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                return self._per_channel(n, mod, t, 1, shared)
            return t
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            return self._per_channel(n, mod, t, 1, shared)
        if isinstance(mod, nn.LayerNorm):
            if len(mod.normalized_shape) != 1:
                return self._unknown(n, f"LayerNorm over {tuple(mod.normalized_shape)}", value)
            return self._per_channel(n, mod, t, t.dim() - 1, shared)
        if isinstance(mod, nn.GroupNorm):
            out = self._per_channel(n, mod, t, 1, shared)
            labels = _labels_along(t, 1)
            if labels is not None and mod.num_groups > 1:
                size = len(labels) // mod.num_groups
                self.constraints.append((f"GroupNorm '{n.name}' ({mod.num_groups} groups)",
                                         [labels[i * size:(i + 1) * size] for i in range(mod.num_groups)]))
            return out
        if kind in _SPATIAL:
            return self._spatial(n, kind, t, value)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._structural(n, kind, value, call=lambda x: mod(x))
        return self._unknown(n, type(mod).__name__, value)

    def _layer(self, n: fx.Node, mod: nn.Module, first: tuple[fx.Node, torch.Tensor] | None, value: Any,
               channel_dim: int, shared: bool) -> Any:
        """A Conv or Linear: reads channels along ``channel_dim`` of its input, writes fresh ones."""
        if not isinstance(value, torch.Tensor):
            return self._unknown(n, type(mod).__name__, value)
        if shared:
            why = f"module '{n.target}' is called at {self.call_sites[str(n.target)]} sites (shared weights)"
            self._lock_inputs(n, why)
            fresh = self.el.fresh(value.shape[channel_dim])
            self.producers[int(fresh[0])] = n.name
            self._add_member(Member(n.name, str(n.target), "out", tuple(fresh.tolist())))
            out = _along(fresh, channel_dim % value.dim(), value.shape)
            self.el.lock_ids(_ids_in(out), why)
            return out
        in_labels = _labels_along(first[1], channel_dim % first[1].dim()) if first is not None else None
        groups = getattr(mod, "groups", 1)
        in_channels = getattr(mod, "in_channels", None)
        mixed = f"'{n.name}' reads a tensor whose channel dim mixes channels with other dims"
        if first is not None and in_labels is None:
            self._lock_inputs(n, mixed)
        if groups > 1 and groups == in_channels and in_labels is not None:  # depthwise: out o reads in o // m
            m = mod.out_channels // groups
            out_labels = torch.tensor(in_labels, dtype=torch.int64).repeat_interleave(m)
            self._add_member(Member(n.name, str(n.target), "param", tuple(out_labels.tolist()), depthwise=True))
            return _along(out_labels, channel_dim % value.dim(), value.shape)
        fresh = self.el.fresh(value.shape[channel_dim])
        self.producers[int(fresh[0])] = n.name
        if groups > 1 and in_labels is None:
            self.el.lock_ids(fresh.tolist(), mixed)
        self._add_member(Member(n.name, str(n.target), "out", tuple(fresh.tolist())))
        if in_labels is not None:
            self._add_member(Member(n.name, str(n.target), "in", tuple(in_labels)))
            if groups > 1:
                size_in, size_out = len(in_labels) // groups, len(fresh) // groups
                why = f"grouped conv '{n.name}' ({groups} groups)"
                self.constraints.append((why, [in_labels[i * size_in:(i + 1) * size_in] for i in range(groups)]))
                ids = fresh.tolist()
                self.constraints.append((why, [ids[i * size_out:(i + 1) * size_out] for i in range(groups)]))
        return _along(fresh, channel_dim % value.dim(), value.shape)

    def _per_channel(self, n: fx.Node, mod: nn.Module, t: torch.Tensor, dim: int, shared: bool) -> torch.Tensor:
        labels = _labels_along(t, dim)
        if labels is None:
            self._lock_inputs(n, f"'{n.name}' has per-channel parameters on a dim that mixes channels")
        elif shared:
            self._lock_inputs(n, f"module '{n.target}' is called at {self.call_sites[str(n.target)]} sites")
        else:
            self._add_member(Member(n.name, str(n.target), "param", tuple(labels)))
        return t

    def _add_member(self, m: Member) -> None:
        self.members.append(m)

    # -- functions and methods --

    def _function(self, n: fx.Node, kind: str, value: Any) -> Any:
        first = self._first_input(n)
        if kind in _BINARY:
            return self._binary(n, kind, value)
        if kind in _STRUCTURAL:
            return self._structural(n, kind, value)
        if first is None:
            return self._unknown(n, kind, value)
        src, t = first
        if kind in _NORMALIZE_OVER_DIM:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            if dim is None or _varies(t, int(dim) % t.dim()):
                return self._unknown(n, f"{kind} over the channel dim", value)
            return t
        if kind in _UNARY or kind in _PASS:
            if len(self._tensor_inputs(n)) > 1:
                return self._binary(n, kind, value)
            return t if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(t.shape) else \
                self._unknown(n, kind, value)
        if kind in _SPATIAL:
            return self._spatial(n, kind, t, value)
        if kind in _REDUCE:
            return self._reduce(n, kind, t, value)
        return self._unknown(n, kind, value)

    def _binary(self, n: fx.Node, kind: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return self._unknown(n, kind, value)
        operands: list[torch.Tensor] = []
        for a in n.all_input_nodes:
            lab = self.labels.get(a.name)
            if not isinstance(lab, torch.Tensor):
                continue
            const = self.values.get(a.name)
            if a.op == "get_attr" and isinstance(const, torch.Tensor) and const.numel() > 1:
                self._lock_inputs(n, f"'{n.name}' combines the channels with the constant tensor '{a.target}'")
                return _none_like(value)
            if a.op == "get_attr" or (isinstance(const, torch.Tensor) and const.numel() == 1):
                continue  # a scalar-like constant broadcasts over every channel
            operands.append(lab.expand(value.shape) if lab.dim() <= value.dim() else lab)
        if not operands:
            return _none_like(value)
        if any(tuple(o.shape) != tuple(value.shape) for o in operands):
            return self._unknown(n, f"{kind} with broadcasting that changes the shape", value)
        for other in operands[1:]:
            self.el.union_pairs(operands[0], other,
                                f"'{n.name}' ({kind}) combines these channels with a tensor that is not pruned with them")
        # the result carries, at each position, whichever label is set
        out = operands[0].clone()
        for other in operands[1:]:
            out = torch.where(out == NONE, other, out)
        return out

    def _spatial(self, n: fx.Node, kind: str, t: torch.Tensor, value: Any) -> Any:
        """Pooling, padding, resizing: per channel over dims 2.., so each channel must be one label there."""
        if not isinstance(value, torch.Tensor) or value.dim() != t.dim() or t.dim() < 3:
            return self._unknown(n, kind, value)
        labels = _labels_along(t, 1)
        if labels is None or value.shape[:2] != t.shape[:2]:
            return self._unknown(n, kind, value)
        return _along(torch.tensor(labels, dtype=torch.int64), 1, value.shape)

    def _reduce(self, n: fx.Node, kind: str, t: torch.Tensor, value: Any) -> Any:
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        if dims is None or not isinstance(value, torch.Tensor):
            return self._unknown(n, f"{kind} over every dim", value)
        dims = [int(d) % t.dim() for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if any(_varies(t, d) for d in dims):
            return self._unknown(n, f"{kind} over the channel dim", value)
        keep = bool(n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False))
        out = t.amax(dim=dims, keepdim=keep)
        return out if tuple(out.shape) == tuple(value.shape) else self._unknown(n, kind, value)

    def _structural(self, n: fx.Node, kind: str, value: Any, call: Any = None) -> Any:
        """Run the shape op on the label tensors themselves: labels land where the data lands."""
        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                lab = self.labels.get(a.name)
                if isinstance(lab, torch.Tensor):
                    return lab.contiguous()  # expanded labels cannot be .view()ed
                return lab if lab is not None else self.values.get(a.name)
            return a

        args = fx.node.map_aggregate(n.args, arg)
        kwargs = fx.node.map_aggregate(n.kwargs, arg)
        try:
            if call is not None:
                out = call(args[0])
            elif n.op == "call_method":
                out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                out = n.target(*args, **kwargs)
        except Exception as e:  # an op that does not run on integer labels: be safe, lock
            return self._unknown(n, f"{kind} ({type(e).__name__} on labels)", value)
        if not _same_structure(out, value):
            return self._unknown(n, kind, value)
        first = self._first_input(n)
        if kind in ("chunk", "split", "tensor_split", "unbind") and first is not None:
            self._split_constraint(n, kind, first[1])
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._tie_slices(n, t)
        return out

    def _split_constraint(self, n: fx.Node, kind: str, t: torch.Tensor) -> None:
        """``chunk`` (and ``split`` by one size) must keep equal pieces: each piece loses as many channels."""
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        dim = int(dim) % t.dim()
        labels = _labels_along(t, dim)
        if labels is None or not _varies(t, dim):
            return
        size_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("chunks", n.kwargs.get("split_size_or_sections"))
        if kind == "chunk" or (kind == "split" and isinstance(size_arg, int)):
            pieces = int(size_arg) if kind == "chunk" else -(-len(labels) // int(size_arg))
            size = -(-len(labels) // pieces)
            blocks = [labels[i:i + size] for i in range(0, len(labels), size)]
            if len({len(b) for b in blocks}) > 1:
                self.el.lock_ids(labels, f"'{n.name}' splits the channels into unequal pieces")
            else:
                self.constraints.append((f"'{n.name}' ({kind} into {len(blocks)})", blocks))

    def _tie_slices(self, n: fx.Node, t: torch.Tensor) -> None:
        """Keep a reshaped tensor rectangular: when channels spread over several dims, tie each slice.

        A channel shuffle views [N, 8, H, W] as [N, 2, 4, H, W]: channel k·4 + j sits at (k, j). A cut
        must remove whole positions of the larger dim (j), so channels j and 4 + j are tied together.
        """
        carriers = [d for d in range(t.dim()) if _varies(t, d)]
        if len(carriers) < 2:
            return
        p = max(carriers, key=lambda d: (t.shape[d], d))
        rows = t.movedim(p, 0).reshape(t.shape[p], -1)
        for row in rows:
            ids = torch.unique(row).tolist()
            if NONE in ids and len(ids) > 1:
                self.el.lock_ids(ids, f"'{n.name}' reshapes these channels together with unprunable data")
                continue
            for other in ids[1:]:
                self.el.union(ids[0], other)

    # -- collect groups --

    def _collect(self) -> ChannelAnalysis:
        el = self.el
        cls = {i: el.find(i) for i in range(len(el.parent))}
        locked_class: dict[int, str] = {}
        for i, reason in el.lock.items():
            locked_class.setdefault(cls[i], reason)
        members = tuple(Member(m.node, m.module, m.role, tuple(NONE if c == NONE else cls[c] for c in m.classes),
                               m.depthwise) for m in self.members)
        # group = producers connected through unions; key by the space root
        by_group: dict[int, list[int]] = defaultdict(list)
        for c in sorted(set(cls.values())):
            by_group[el.group_key(c)].append(c)
        producers_of: dict[int, list[str]] = defaultdict(list)
        for first_id, node in self.producers.items():
            producers_of[el.group_key(first_id)].append(node)
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        groups: list[ChannelGroup] = []
        class_group: dict[int, int] = {}
        for key, classes in by_group.items():
            producers = sorted(producers_of.get(key, []), key=lambda s: order.get(s, 0))
            if not producers:
                continue
            root = producers[0]
            root_member = next(m for m in members if m.node == root and m.role == "out")
            ordered = list(dict.fromkeys(c for c in root_member.classes if c != NONE))
            ordered += [c for c in classes if c not in set(ordered)]
            cset = set(ordered)
            locked = next((locked_class[c] for c in ordered if c in locked_class), None)
            group_members = tuple(m for m in members if cset & set(m.classes))
            cells, why = _cells(ordered, [(w, [[cls[i] for i in b if i != NONE] for b in blocks]) for w, blocks in self.constraints])
            if locked is None and why is not None:
                locked = why
            index = len(groups)
            groups.append(ChannelGroup(index, root, tuple(producers), tuple(ordered), cells, group_members, locked))
            class_group.update({c: index for c in ordered})
        groups.sort(key=lambda g: order.get(g.root, 0))
        groups = [ChannelGroup(i, g.root, g.producers, g.classes, g.cells, g.members, g.locked)
                  for i, g in enumerate(groups)]
        class_group = {c: i for i, g in enumerate(groups) for c in g.classes}
        labels = {name: _map_labels(v, cls) for name, v in self.labels.items()}
        return ChannelAnalysis(tuple(groups), members, labels, class_group)


def _cells(classes: list[int], constraints: list[tuple[str, list[list[int]]]]) -> tuple[tuple[tuple[int, ...], ...], str | None]:
    """Partition ``classes`` so equal removal per cell satisfies every equal-split constraint.

    Each constraint is a list of blocks (class per position); every block must lose the same number
    of positions. A class is constrained by a constraint when it appears in some block; it must then
    sit in exactly one block. Cells group classes by the block they sit in for every constraint; the
    split is consistent when each constraint's blocks hold the same number of cells.

    >>> _cells([0, 1, 2, 3], [("g", [[0, 1], [2, 3]])])
    (((0, 1), (2, 3)), None)
    """
    cset = set(classes)
    key: dict[int, list[int | None]] = {c: [] for c in classes}
    relevant = []
    for why, blocks in constraints:
        where: dict[int, set[int]] = defaultdict(set)
        counts: dict[int, int] = defaultdict(int)
        for b, block in enumerate(blocks):
            for c in block:
                if c in cset:
                    where[c].add(b)
                    counts[c] += 1
        if not where:
            continue
        if any(len(bs) > 1 for bs in where.values()) and not all(len(bs) == len(blocks) for bs in where.values()):
            return ((tuple(classes),), f"{why}: a channel spans several of its pieces")
        if all(len(bs) == len(blocks) for bs in where.values()):
            continue  # every class spans every block: any removal is balanced
        relevant.append((why, len(blocks)))
        for c in classes:
            key[c].append(next(iter(where[c])) if c in where else None)
    if not relevant:
        return ((tuple(classes),), None)
    cells: dict[tuple[int | None, ...], list[int]] = defaultdict(list)
    for c in classes:
        cells[tuple(key[c])].append(c)
    for i, (why, n_blocks) in enumerate(relevant):
        per_block: dict[int, int] = defaultdict(int)
        for k in cells:
            if k[i] is not None:
                per_block[k[i]] += 1
        if len(per_block) != n_blocks or len(set(per_block.values())) != 1:
            return ((tuple(classes),), f"{why}: its pieces cannot lose equal numbers of channels together "
                                       f"with the other constraints on these channels")
    return tuple(tuple(v) for v in cells.values()), None


# -- small helpers ----------------------------------------------------------------------------


def _varies(t: torch.Tensor, dim: int) -> bool:
    if t.shape[dim] <= 1:
        return False
    first = t.narrow(dim, 0, 1)
    return not bool((t == first).all())


def _none_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.full(value.shape, NONE, dtype=torch.int64)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_none_like(v) for v in value)
    return None


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)


def _same_structure(labels: Any, value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return isinstance(labels, (tuple, list)) and len(labels) == len(value) and all(
            _same_structure(a, b) for a, b in zip(labels, value))
    return not isinstance(labels, torch.Tensor)


def _map_labels(v: Any, cls: dict[int, int]) -> Any:
    """Element ids → class ids in a label tensor (or tuple of them)."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 0:
            return v
        lut_size = max(cls) + 2 if cls else 1
        lut = torch.full((lut_size,), NONE, dtype=torch.int64)
        if cls:
            keys = torch.tensor(list(cls.keys()), dtype=torch.int64)
            lut[keys] = torch.tensor(list(cls.values()), dtype=torch.int64)
        flat = v.reshape(-1)
        return torch.where(flat == NONE, flat, lut[flat.clamp(min=0)]).reshape(v.shape)
    if isinstance(v, (tuple, list)):
        return type(v)(_map_labels(x, cls) for x in v)
    return v


def _concrete_values(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Every node's value on the example inputs (shapes, and the ints shape ops read)."""
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    finally:
        gm.train(was_training)
    return values


__all__ = ["NONE", "ChannelAnalysis", "ChannelGroup", "Member", "analyze_channels"]
