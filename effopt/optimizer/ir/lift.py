"""Lift functional conv / linear / inference batch norm calls into ``nn`` modules.

The rewriting passes (`fold_batchnorm`, `quantize`) work on ``call_module``
nodes: a BN folds into an ``nn.Conv2d``'s parameters, a ``QuantConv`` wraps an
``nn.Conv2d``. A ``torch.export`` program, or a model whose forward calls
``F.conv2d(x, self.weight, ...)``, has the same layers as ``call_function``
nodes reading ``get_attr`` weights, which those passes cannot touch. Lifting
replaces each such call by a ``call_module`` of a new module that holds the
*same* tensor objects and runs the same op, so the output is bit-identical and
the weights are stored once::

    w = get_attr conv1.weight                       conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
    y = aten.conv2d(x, w, None, [1, 1], [1, 1])  →  y = call_module conv1 (x)

A call is lifted only when its tensors are constants (``get_attr``) that no
other node reads, and its hyper-parameters are Python constants the module
accepts; anything else stays functional, with the reason.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op, op_label
from effopt.optimizer.ir.core import IR, facts, has_facts

LIFTABLE_KINDS = frozenset({"conv", "linear", "batch_norm"})

# Positional parameter order of each functional form (aten, torch.* and F.* share one per family,
# except F.batch_norm, whose statistics come before weight and bias).
_PARAMS: dict[str, tuple[str, ...]] = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
    "linear": ("input", "weight", "bias"),
    "F.batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                   "cudnn_enabled"),
    "_native_batch_norm_legit_no_training": ("input", "weight", "bias", "running_mean", "running_var", "momentum",
                                             "eps"),
}
_DEFAULTS: dict[str, Any] = {
    "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "weight": None, "training": False,
    "momentum": 0.1, "eps": 1e-5, "cudnn_enabled": True, "output_padding": 0,
}
_TENSOR_ROLES = ("weight", "bias", "running_mean", "running_var")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank


@dataclass(frozen=True)
class Lifted:
    """One call turned into a module: the old node's name, the new node's name, the module's path."""

    old: str
    new: str
    module: str


@dataclass(frozen=True)
class Declined:
    """A functional layer left as it was; ``kind`` is its canonical op (conv, linear, batch_norm)."""

    node: str
    kind: str
    reason: str


@dataclass(frozen=True)
class LiftResult:
    """What `lift_functional_layers` did to ``ir`` (edited in place)."""

    ir: IR
    lifted: tuple[Lifted, ...] = ()
    declined: tuple[Declined, ...] = ()

    @property
    def new_names(self) -> tuple[str, ...]:
        """The lifted layers' node names, in graph order."""
        return tuple(x.new for x in self.lifted)

    @property
    def old_names(self) -> Mapping[str, str]:
        """New node name → the name the node had before lifting (``conv1`` → ``conv2d``)."""
        return {x.new: x.old for x in self.lifted}

    def reasons(self, kinds: frozenset[str] = LIFTABLE_KINDS) -> dict[str, str]:
        """Node name → why it stayed functional, for declined layers of ``kinds``."""
        return {d.node: d.reason for d in self.declined if d.kind in kinds}


class _Decline(Exception):
    """Raised by a guard with the reason the site stays functional (caught in `_plan`)."""


@dataclass(frozen=True)
class _Site:
    """A guarded site, ready to edit: nothing in the graph has changed yet."""

    node: fx.Node
    activation: fx.Node
    module: nn.Module
    attr_nodes: tuple[fx.Node, ...]   # get_attr nodes whose tensors move into ``module``
    extra_attrs: tuple[str, ...]      # further attributes the module adopts (a BN's num_batches_tracked)
    outputs: tuple[fx.Node, ...]      # nodes whose value the module call replaces (the call, or its getitem[0]s)
    prefix: str                       # module path wanted, e.g. 'layer1.conv1'


def lift_functional_layers(ir: IR, kinds: frozenset[str] = LIFTABLE_KINDS) -> LiftResult:
    """Replace every liftable functional layer of ``kinds`` by a module call, in graph order.

    Returns which nodes were lifted and why the others were not; the IR is
    linted and recompiled when anything changed. Facts on the new nodes are
    copied from the old ones (same shapes); the pass manager re-annotates.
    """
    lifted: list[Lifted] = []
    declined: list[Declined] = []
    for node in list(ir.gm.graph.nodes):
        if node.op != "call_function":
            continue
        kind = canonical_op(node, ir.gm)
        if kind not in kinds or kind not in LIFTABLE_KINDS:
            continue
        site = _plan(ir, node, kind)
        if isinstance(site, str):
            declined.append(Declined(node.name, kind, f"functional {op_label(node, ir.gm)} not lifted to a module: {site}"))
            continue
        lifted.append(_lift(ir, site))
    if lifted:
        ir.lint().recompile()
    return LiftResult(ir, tuple(lifted), tuple(declined))


# -- guards ----------------------------------------------------------------------------------------


def _plan(ir: IR, node: fx.Node, kind: str) -> _Site | str:
    """Every precondition, checked before anything is edited: a `_Site`, or the reason to decline."""
    try:
        form = _form(node)
        args = _bind(node, form)
        activation = args["input"]
        if not isinstance(activation, fx.Node):
            raise _Decline("its input is not a graph value")
        tensors = {r: _constant(ir, node, r, args[r]) for r in _TENSOR_ROLES if r in args and args[r] is not None}
        for name, value in args.items():
            if name not in _TENSOR_ROLES and name != "input" and not _is_constant(value):
                raise _Decline(f"{name} is not a Python constant ({value})")
        values = {r: t for r, (_, t) in tensors.items()}
        extra: tuple[str, ...] = ()
        if kind == "conv":
            module = _conv(form, args, values)
        elif kind == "linear":
            module = _linear(values)
        else:
            module = _batch_norm(node, args, values)
            extra = _adopt_num_batches_tracked(ir, module, tensors["running_mean"][0])
        outputs = _outputs(node, form)
    except _Decline as e:
        return str(e)
    anchor = tensors["weight"][0] if "weight" in tensors else tensors["running_mean"][0]
    role = "weight" if "weight" in tensors else "running_mean"
    prefix = _module_prefix(str(anchor.target), role, type(module).__name__.lower())
    return _Site(node, activation, module, tuple(a for a, _ in tensors.values()), extra, outputs, prefix)


def _form(node: fx.Node) -> str:
    if node.target is F.batch_norm:
        return "F.batch_norm"
    t = node.target
    name = t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
    if name in ("conv1d", "conv2d", "conv3d"):
        return "conv"
    if name in _PARAMS:
        return name
    raise _Decline(f"{name} has no nn module form here (lifted: conv1d/2d/3d, convolution, linear, batch_norm)")


def _bind(node: fx.Node, form: str) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    names = _PARAMS[form]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        raise _Decline(f"unexpected arguments for {form}: {node.args} {node.kwargs}")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    for name in names:
        if name not in bound:
            if name not in _DEFAULTS:
                raise _Decline(f"argument '{name}' is missing")
            bound[name] = _DEFAULTS[name]
    return bound


def _constant(ir: IR, node: fx.Node, role: str, arg: Any) -> tuple[fx.Node, torch.Tensor]:
    """``arg`` as (get_attr node, tensor) when only ``node`` reads that tensor; else decline."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        where = f"'{arg.name}' ({arg.op})" if isinstance(arg, fx.Node) else repr(arg)
        raise _Decline(f"{role} is computed by {where}, not read from a constant attribute")
    tensor = _resolve(ir.gm, str(arg.target))
    if not isinstance(tensor, torch.Tensor):
        raise _Decline(f"{role} attribute '{arg.target}' is not a tensor")
    others = [u.name for u in arg.users if u is not node]
    if others:
        raise _Decline(f"{role} '{arg.target}' is shared with {', '.join(others)}; a shared weight stays functional")
    aliases = [a.target for a in ir.gm.graph.nodes
               if a.op == "get_attr" and a is not arg and _resolve(ir.gm, str(a.target)) is tensor]
    if sum(1 for v in [*node.args, *node.kwargs.values()] if v is arg) > 1 or aliases:
        shared = ", ".join(str(t) for t in aliases) or node.name
        raise _Decline(f"{role} '{arg.target}' is shared with {shared}; a shared weight stays functional")
    return arg, tensor


def _is_constant(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_constant(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    parent, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return None
    return getattr(owner, attr, None)


def _outputs(node: fx.Node, form: str) -> tuple[fx.Node, ...]:
    """What the module call replaces: the call itself, or (for the tuple-returning aten BN) its getitem[0]s."""
    if form != "_native_batch_norm_legit_no_training":
        return (node,)
    users = list(node.users)
    if not users or any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0 for u in users):
        raise _Decline("saved mean/invstd outputs are read; only output 0 has a module form")
    return tuple(users)


# -- module builders (no graph edits; tensors are the very objects the graph reads) -----------------


def _as_parameter(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def _conv(form: str, args: dict[str, Any], t: dict[str, torch.Tensor]) -> nn.Module:
    if form == "convolution" and args["transposed"]:
        raise _Decline("transposed convolution")
    w = t["weight"]
    cls = _CONV.get(w.dim() - 2)
    if cls is None:
        raise _Decline(f"weight has {w.dim()} dims, not 3/4/5 (conv1d/2d/3d)")
    groups = int(args["groups"])
    try:
        conv = nn.utils.skip_init(  # no init: skip_init draws nothing from the global RNG
            cls, w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=args["stride"], padding=args["padding"],
            dilation=args["dilation"], groups=groups, bias="bias" in t,
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise _Decline(f"nn.{cls.__name__} rejects these arguments: {e}") from e
    conv.weight = _as_parameter(w)
    if "bias" in t:
        conv.bias = _as_parameter(t["bias"])
    return conv


def _linear(t: dict[str, torch.Tensor]) -> nn.Module:
    w = t["weight"]
    if w.dim() != 2:
        raise _Decline(f"weight has {w.dim()} dims, not 2")
    linear = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias="bias" in t)
    linear.weight = _as_parameter(w)
    if "bias" in t:
        linear.bias = _as_parameter(t["bias"])
    return linear


def _batch_norm(node: fx.Node, args: dict[str, Any], t: dict[str, torch.Tensor]) -> nn.Module:
    if args.get("training", False):
        raise _Decline("training=True: it normalises with batch statistics")
    if "running_mean" not in t or "running_var" not in t:
        raise _Decline("no running statistics")
    if ("weight" in t) != ("bias" in t):
        raise _Decline("weight without bias (or bias without weight): nn.BatchNorm has both or neither")
    rank = _input_rank(node)
    cls = _BATCH_NORM.get(rank) if rank is not None else None
    if cls is None:
        raise _Decline(f"input rank {rank} has no nn.BatchNorm (needs 2-5 dims, known from shape propagation)")
    bn = nn.utils.skip_init(cls, t["running_mean"].numel(), eps=float(args["eps"]), momentum=args["momentum"],
                            affine="weight" in t)
    if "weight" in t:
        bn.weight, bn.bias = _as_parameter(t["weight"]), _as_parameter(t["bias"])
    bn.running_mean, bn.running_var = t["running_mean"], t["running_var"]
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long)
    return bn.eval()


def _input_rank(node: fx.Node) -> int | None:
    """Rank of the BN's input (= its output's) from effopt facts, else torch.export's ``val``/``tensor_meta``."""
    if has_facts(node) and facts(node).outputs:
        return len(facts(node).outputs[0].shape)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    for meta in (source.meta if source is not None else {}, node.meta):
        val = meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.dim()
        tm = meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return len(tm.shape)
    return None


def _adopt_num_batches_tracked(ir: IR, bn: nn.Module, running_mean: fx.Node) -> tuple[str, ...]:
    """torch.export keeps ``bnX.num_batches_tracked`` beside the statistics, read by no node: move it along."""
    parent = str(running_mean.target).rpartition(".")[0]
    target = f"{parent}.num_batches_tracked" if parent else "num_batches_tracked"
    counter = _resolve(ir.gm, target)
    readers = [n for n in ir.gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if not isinstance(counter, torch.Tensor) or any(n.users for n in readers):
        return ()
    bn.num_batches_tracked = counter
    return (target,)


def _module_prefix(target: str, role: str, fallback: str) -> str:
    """Module path named after the weight: ``conv1.weight`` → ``conv1``, ``fc_weight`` → ``fc``, ``w`` → ``w``.

    The weight's attribute is deleted before the module is placed, so these names are usually free;
    a bare top-level ``weight`` gives ``fallback`` (the module class, e.g. ``conv2d``).
    """
    parent, _, attr = target.rpartition(".")
    if attr == role:
        return parent or fallback
    if attr.endswith("_" + role):
        stem = attr[: -len(role) - 1]
        return f"{parent}.{stem}" if parent else stem
    return target


# -- the edit --------------------------------------------------------------------------------------


def _lift(ir: IR, site: _Site) -> Lifted:
    """Move the tensors into the module, call it instead of the function, drop the old attributes."""
    gm, graph = ir.gm, ir.gm.graph
    readers = [n for n in graph.nodes if n.op == "get_attr" and n.target in site.extra_attrs]  # read by no node
    dead = [*(o for o in site.outputs if o is not site.node), site.node, *site.attr_nodes, *readers]
    nodes_before = len(graph.nodes)
    for target in [str(a.target) for a in site.attr_nodes] + list(site.extra_attrs):
        _delete_attr(gm, target, dying=dead)
    path = ir.fresh_name(site.prefix)
    ir.set_submodule(path, site.module)
    with graph.inserting_before(site.node):
        call = graph.call_module(path, (site.activation,))
    call.meta = dict(site.outputs[0].meta)  # same value: keep 'val'/'tensor_meta' and the facts until re-annotation
    for out in site.outputs:
        out.replace_all_uses_with(call)
    for n in dead:
        graph.erase_node(n)
    if len(graph.nodes) != nodes_before - len(dead) + 1:
        raise AssertionError(f"lift: replacing '{site.node.name}' did not swap {len(dead)} nodes for one")
    return Lifted(site.node.name, call.name, path)


def _delete_attr(gm: fx.GraphModule, target: str, dying: list[fx.Node]) -> None:
    """Delete ``target``; then its owner too, when that is now an empty container that no node
    (other than the ``dying`` ones) uses, so the new module can take its name."""
    parent, _, attr = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    delattr(owner, attr)
    if not parent or _has_state(owner):
        return
    used = any(n.op in ("call_module", "get_attr") and (n.target == parent or str(n.target).startswith(parent + "."))
               for n in gm.graph.nodes if n not in dying)
    if not used:
        grand, _, name = parent.rpartition(".")
        delattr(gm.get_submodule(grand) if grand else gm, name)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)) \
        or any(True for _ in module.children())
