"""Shape propagation and cost facts: the only writer of ``node.meta["effopt"]``.

`annotate` runs the IR's example inputs through the graph with a torch.fx
Interpreter and, at each compute node, turns the real argument and result
tensors into a `NodeFacts` by the rule for the node's canonical op
(`canonical_op`). The rules work from shapes alone, so the same rule serves a
``call_module`` Conv2d, ``F.conv2d`` and ``aten.conv2d`` alike.

Counting conventions (1 MAC = 2 FLOPs; bias adds are not counted, as in
`torch.utils.flop_counter`):

- conv: out_elems × (C_in/groups) × prod(kernel) MACs; transposed conv counts
  per input element instead.
- linear / matmul / bmm / addmm: out_elems × K MACs.
- pooling: out_elems × prod(kernel) FLOPs; adaptive/global pooling in_elems.
- norms, activations, elementwise ops: a fixed number of FLOPs per output
  element (`PER_ELEMENT_FLOPS`), e.g. relu 1, batch_norm 2 (scale + shift).
- views (flatten, reshape, transpose, dropout/identity at eval, ...): 0 FLOPs
  and 0 bytes, as they move no data; concat moves data but computes nothing.
Anything else is recorded with ``counted=False`` and 0 FLOPs, never guessed.
"""

from __future__ import annotations

import math
import re
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.errors import TraceError
from effopt.optimizer.ir.trace import user_line
from effopt.optimizer.ir.core import IR, META_KEY, CostTotals, NodeFacts, TensorSpec, facts, has_facts, profile_dtype

# -- canonical op names -------------------------------------------------------------------------

_MODULE_OPS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.Bilinear, "bilinear"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"),
    (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "hardtanh"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.ELU, "elu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "log_softmax"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.Identity, "identity"),
    (nn.Flatten, "flatten"),
    (nn.Unflatten, "unflatten"),
    (nn.Embedding, "embedding"),
)

# Function / method / aten names that differ from the canonical name.
_ALIASES: dict[str, str] = {
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv", "_convolution": "conv",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose", "conv_transpose3d": "conv_transpose",
    "addmm": "linear", "mm": "matmul", "bmm": "matmul", "baddbmm": "matmul", "einsum_mm": "matmul",
    "_native_batch_norm_legit_no_training": "batch_norm", "native_batch_norm": "batch_norm",
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm",
    "max_pool1d": "max_pool", "max_pool2d": "max_pool", "max_pool3d": "max_pool",
    "max_pool2d_with_indices": "max_pool",
    "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool",
    "adaptive_avg_pool1d": "adaptive_avg_pool", "adaptive_avg_pool2d": "adaptive_avg_pool",
    "adaptive_avg_pool3d": "adaptive_avg_pool", "_adaptive_avg_pool2d": "adaptive_avg_pool",
    "adaptive_max_pool1d": "adaptive_max_pool", "adaptive_max_pool2d": "adaptive_max_pool",
    "truediv": "div", "floordiv": "div", "true_divide": "div", "iadd": "add", "isub": "sub", "imul": "mul",
    "itruediv": "div", "rsub": "sub", "multiply": "mul", "subtract": "sub", "divide": "div",
    "alpha_dropout": "dropout", "feature_alpha_dropout": "dropout", "dropout1d": "dropout",
    "dropout2d": "dropout", "dropout3d": "dropout", "clone": "identity", "detach": "identity",
    "_softmax": "softmax", "_log_softmax": "log_softmax", "silu_": "silu", "hardtanh_": "hardtanh",
    "concat": "cat", "concatenate": "cat", "stack": "cat", "_unsafe_view": "view", "view_as": "view",
    "flatten.using_ints": "flatten", "getitem": "getitem", "clamp_min": "clamp", "clamp_max": "clamp",
    "amax": "max", "amin": "min", "maximum": "max", "minimum": "min",
    "GuardsFn": "guard",  # torch.export's input-shape guard module: checks, computes nothing
    # quantize/dequantize as torch.export records a FakeQuant: an edge runtimes fuse away
    "quantize_per_tensor": "quantize", "dequantize_per_tensor": "quantize",
    "quantize_per_channel": "quantize", "dequantize_per_channel": "quantize",
}

_COMPUTE_KINDS = {"conv", "conv_transpose", "linear", "matmul", "bilinear"}

PER_ELEMENT_FLOPS: dict[str, int] = {
    # activations
    "relu": 1, "relu6": 2, "hardtanh": 2, "clamp": 2, "leaky_relu": 2, "prelu": 2, "elu": 4, "sigmoid": 4,
    "tanh": 4, "hardsigmoid": 3, "hardswish": 4, "silu": 5, "gelu": 8, "mish": 8, "softmax": 5,
    "log_softmax": 5,
    # elementwise arithmetic, one op per output element
    "add": 1, "sub": 1, "mul": 1, "div": 1, "neg": 1, "abs": 1, "max": 1, "min": 1, "where": 1,
    "exp": 1, "log": 1, "sqrt": 1, "rsqrt": 1, "pow": 1, "erf": 1, "reciprocal": 1, "square": 1,
    # norms at inference: batch norm is a per-channel scale and shift; the others
    # compute mean and variance, normalise, then scale and shift
    "batch_norm": 2, "layer_norm": 7, "group_norm": 7, "instance_norm": 7, "rms_norm": 5,
}

_REDUCTIONS = {"mean", "sum", "adaptive_avg_pool", "adaptive_max_pool", "var", "std", "norm"}
_VIEWS = {
    "flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "t",
    "expand", "expand_as", "dropout", "identity", "getitem", "chunk", "split", "unbind", "narrow",
    "select", "slice", "alias", "size", "dim", "getattr", "type_as", "to", "guard",
    "quantize",  # a FakeQuant edge: runtimes fuse it into its producer (requantize) and consumers
}
_DATA_MOVES = {"cat", "contiguous", "repeat", "pad", "constant_pad_nd", "embedding", "gather", "roll",
               "interpolate", "upsample_nearest2d", "pixel_shuffle", "copy"}

KINDS_BY_CATEGORY: dict[str, set[str]] = {
    "compute": _COMPUTE_KINDS,
    "elementwise": set(PER_ELEMENT_FLOPS),
    "pooling": {"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"},
    "view": _VIEWS,
    "data_movement": _DATA_MOVES,
}


def _callable_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


def _canon(name: str) -> str:
    name = name.strip("_") if name.startswith("__") else name
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variants: relu_ -> relu, add_ -> add
    return _ALIASES.get(name, name)


def canonical_op(node: fx.Node, gm: fx.GraphModule) -> str:
    """The op a compute node performs, in effopt's vocabulary (``conv``, ``relu``, ``add``, ...).

    Leaf modules of types effopt does not know keep their class name, so the
    report can say ``Gate`` is uncounted.
    """
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        own = getattr(mod, "effopt_kind", None)  # effopt's quantized modules say what they compute
        if isinstance(own, str):
            return own
        for cls, kind in _MODULE_OPS:
            if isinstance(mod, cls):
                return kind
        return _ALIASES.get(type(mod).__name__, type(mod).__name__)
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        if node.target is getattr:
            return "getattr"
        return _canon(_callable_name(node.target))
    return _canon(str(node.target))  # call_method


def op_label(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short human label of what the node calls: ``Conv2d``, ``torch.add``, ``.view``."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return f"aten.{node.target.overloadpacket.__name__}"
    mod = getattr(node.target, "__module__", "") or ""
    prefix = "F" if mod.startswith("torch.nn.functional") else mod.split(".")[0] or "builtin"
    return f"{prefix}.{_callable_name(node.target)}"


# -- per-node rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """What a rule sees: the node's real tensors, split into activations and weights."""

    node: fx.Node
    module: nn.Module | None
    activations: tuple[torch.Tensor, ...]  # tensor args that flow from other nodes or inputs
    weights: tuple[torch.Tensor, ...]      # parameters/buffers the call reads (module's own or get_attr)
    outputs: tuple[torch.Tensor, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def weight(self) -> torch.Tensor:
        if self.module is not None and isinstance(getattr(self.module, "weight", None), torch.Tensor):
            return self.module.weight
        if len(self.args) > 1 and isinstance(self.args[1], torch.Tensor):
            return self.args[1]
        raise TraceError(f"node '{self.node.name}': cannot find the weight of this {self.node.target}")

    @property
    def out_numel(self) -> int:
        return sum(t.numel() for t in self.outputs)

    @property
    def in_numel(self) -> int:
        return self.activations[0].numel() if self.activations else 0


def _macs(kind: str, c: _Call) -> int:
    if kind == "conv":
        w = c.weight()
        return c.out_numel * (w.numel() // w.shape[0])
    if kind == "conv_transpose":
        w = c.weight()
        return c.in_numel * (w.numel() // w.shape[0])
    if kind == "linear":
        if c.module is None and c.node.op == "call_function" and _callable_name(c.node.target) == "addmm":
            return c.out_numel * c.args[1].shape[-1]
        return c.out_numel * c.weight().shape[-1]
    if kind == "bilinear":
        w = c.weight()
        return c.out_numel * w.shape[1] * w.shape[2]
    if kind == "matmul":
        tensors = [a for a in c.args if isinstance(a, torch.Tensor)]
        if _callable_name(c.node.target) == "baddbmm":
            tensors = tensors[1:]
        return c.out_numel * tensors[0].shape[-1]
    return 0


def _kernel_elems(c: _Call) -> int | None:
    if c.module is not None:
        k = getattr(c.module, "kernel_size", None)
    else:
        k = c.kwargs.get("kernel_size", c.args[1] if len(c.args) > 1 else None)
    if k is None:
        return None
    if isinstance(k, int):
        return k ** max(c.activations[0].dim() - 2, 1)
    return math.prod(int(v) for v in k)


def _flops(kind: str, c: _Call) -> int | None:
    """FLOPs of one call, or None when effopt has no rule for ``kind``."""
    if kind in _COMPUTE_KINDS:
        return 2 * _macs(kind, c)
    if kind in PER_ELEMENT_FLOPS:
        return PER_ELEMENT_FLOPS[kind] * c.out_numel
    if kind in ("max_pool", "avg_pool"):
        k = _kernel_elems(c)
        return None if k is None else c.out_numel * k
    if kind in _REDUCTIONS:
        return c.in_numel
    if kind in _VIEWS or kind in _DATA_MOVES:
        return 0
    return None


@dataclass(frozen=True)
class _Storage:
    """How the values around one node are stored: None = as computed (float), else an int dtype name."""

    inputs: tuple[str | None, ...]
    output: str | None


def _spec(t: torch.Tensor, stored: str | None) -> TensorSpec:
    spec = TensorSpec.of(t)
    return TensorSpec(spec.shape, stored) if stored is not None and t.dtype.is_floating_point else spec


def _facts_for(kind: str, label: str, c: _Call, storage: _Storage) -> NodeFacts:
    flops = _flops(kind, c)
    params = sum(w.numel() for w in c.weights if isinstance(w, nn.Parameter))
    inputs = tuple(_spec(t, s) for t, s in zip(c.activations, storage.inputs))
    outputs = tuple(_spec(t, storage.output) for t in c.outputs)
    if kind in _VIEWS and not _converts(kind, c):
        read = written = 0
    else:
        read = sum(i.nbytes for i in inputs) + _weight_bytes(c)
        written = sum(o.nbytes for o in outputs)
        if kind == "embedding":  # reads only the gathered rows, not the whole table
            read = sum(i.nbytes for i in inputs) + written
    return NodeFacts(
        op_kind=kind,
        op=label,
        inputs=inputs,
        outputs=outputs,
        params=params,
        macs=_macs(kind, c) if flops is not None else 0,
        flops=flops or 0,
        bytes_read=read,
        bytes_written=written,
        counted=flops is not None,
        compute_dtype=_compute_dtype(c, storage),
    )


def _converts(kind: str, c: _Call) -> bool:
    """A cast that changes dtype or layout (``x.to(torch.bfloat16)``) copies its input: it moves bytes, unlike a view.

    E.g. a [1, 64] fp32 → bf16 cast reads 256 bytes and writes 128; ``x.to(torch.float32)`` of an
    fp32 tensor returns ``x`` itself and stays a view.
    """
    if kind not in ("to", "type_as") or not c.activations or not c.outputs:
        return False
    x, y = c.activations[0], c.outputs[0]
    return x.dtype != y.dtype or (x.shape == y.shape and x.stride() != y.stride())


def _weight_bytes(c: _Call) -> int:
    """Weight bytes a call reads; a quantized layer's weight counts at its bit width."""
    total = sum(w.nbytes for w in c.weights)
    quant = getattr(c.module, "weight_quant", None) if c.module is not None else None
    if quant is not None and getattr(quant, "calibrated", False):
        w = c.module.weight  # type: ignore[union-attr]
        total += -w.nbytes + math.ceil(w.numel() * quant.scheme.bits / 8)
    return total


def _compute_dtype(c: _Call, storage: _Storage) -> str:
    """A quantized module says so; an op on integer-stored inputs producing integers is int8;
    else the weights' dtype where there are any, else the output's."""
    declared = getattr(c.module, "compute_dtype", None) if c.module is not None else None
    if isinstance(declared, str):
        return declared
    if storage.output is not None and storage.inputs and all(s is not None for s in storage.inputs):
        return "int8"
    floats = [w for w in c.weights if w.dtype.is_floating_point or w.dtype in (torch.int8, torch.uint8)]
    source = floats[0] if floats else (c.outputs[0] if c.outputs else None)
    return profile_dtype(str(source.dtype).removeprefix("torch.")) if source is not None else "fp32"


def _module_weights(mod: nn.Module) -> tuple[torch.Tensor, ...]:
    tensors: list[torch.Tensor] = list(mod.parameters())
    tensors += [b for name, b in mod.named_buffers() if not name.endswith("num_batches_tracked")]
    return tuple(tensors)


def _tensors(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tree_leaves(x) if isinstance(t, torch.Tensor))


class _Annotator(fx.Interpreter):
    """Runs the graph once and writes `NodeFacts` on every compute node."""

    failed_at: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.stored = integer_storage(gm)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed_at = self.failed_at or n
            raise
        if n.op in ("call_module", "call_function", "call_method"):
            n.meta[META_KEY] = self._facts(n, result)
        return result

    def _facts(self, n: fx.Node, result: Any) -> NodeFacts:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        from_attr = {id(self.env[a]) for a in n.all_input_nodes if a.op == "get_attr" and a in self.env}
        producer = {id(self.env[a]): a for a in n.all_input_nodes if a in self.env}
        flat_args = _tensors((args, kwargs))
        activations = tuple(t for t in flat_args if id(t) not in from_attr)
        weights = _module_weights(module) if module is not None else tuple(t for t in flat_args if id(t) in from_attr)
        call = _Call(n, module, activations, weights, _tensors(result), tuple(args), dict(kwargs))
        kind = canonical_op(n, self.module)
        storage = _Storage(
            tuple(self.stored.get(producer[id(t)]) if id(t) in producer else None for t in activations),
            self.stored.get(n),
        )
        return _facts_for(kind, op_label(n, self.module), call, storage)


# -- op vocabulary the quantization contract builds on (effopt.optimizer.quant.contract) ----------

CLAMP_ACTIVATIONS: frozenset[str] = frozenset({"relu", "relu6", "hardtanh", "clamp"})
"""Activations that only clamp to constant bounds: relu [0, ∞), relu6 [0, 6], hardtanh [min_val, max_val],
clamp [min, max]. Clamping commutes with rounding to a grid, so integer kernels fold them into the op
before them (the contract's fused activations)."""

STORAGE_PRESERVING: frozenset[str] = frozenset(
    (_VIEWS - {"quantize"}) | {"max_pool", "adaptive_max_pool", "contiguous"}
)
"""Kinds whose output is stored like their first input: views pick or re-view elements, max pools
pick one of them, contiguous copies them; none computes a new value. E.g. a flatten of uint8 codes is uint8 codes."""


def clamp_after(n: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """``n``'s only user when it is a `CLAMP_ACTIVATIONS` call, else None (a lookup, like ``dict.get``).

    For ``conv → relu → q`` it is the relu; for ``conv → {relu, add}`` or ``conv → sigmoid`` None.
    """
    users = list(n.users)
    if len(users) == 1 and users[0].op in ("call_module", "call_function", "call_method"):
        return users[0] if canonical_op(users[0], gm) in CLAMP_ACTIVATIONS else None
    return None


def integer_storage(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Which values a quantized graph stores as integers, and as which dtype.

    A FakeQuant output is stored in its scheme's container (uint8/int8); a
    `STORAGE_PRESERVING` op (max pool, flatten, view, ...) of a stored value stays
    stored; and an op whose result goes only into FakeQuants (directly, or via
    one `clamp_after` activation) writes integers, since runtimes fuse the
    requantization into it. A float graph has no stored values.
    """
    stored: dict[fx.Node, str] = {}

    def fq_storage(n: fx.Node) -> str | None:
        if n.op != "call_module":
            return None
        return getattr(getattr(gm.get_submodule(str(n.target)), "scheme", None), "storage", None)

    for n in gm.graph.nodes:
        own = fq_storage(n)
        if own is not None:
            stored[n] = own
            continue
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        kind = canonical_op(n, gm)
        first = n.all_input_nodes[0] if n.all_input_nodes else None
        if kind in STORAGE_PRESERVING and first is not None and first in stored:
            stored[n] = stored[first]
            continue
        users = list(n.users)
        activation = clamp_after(n, gm)
        if users and all(fq_storage(u) for u in users):
            stored[n] = fq_storage(users[0])  # type: ignore[assignment]
        elif activation is not None and activation.users and all(fq_storage(u) for u in activation.users):
            stored[n] = fq_storage(next(iter(activation.users)))  # type: ignore[assignment]
    return stored


def annotate(ir: IR) -> IR:
    """Propagate shapes from ``ir.example_inputs`` and write facts on every compute node.

    Returns the same IR (now annotated) so calls chain: ``annotate(ir).lint()``.
    """
    for n in ir.gm.graph.nodes:
        n.meta.pop(META_KEY, None)
    annotator = _Annotator(ir.gm)
    try:
        with torch.no_grad():
            annotator.run(*ir.example_inputs)
    except Exception as e:
        n = annotator.failed_at
        if n is None:
            raise
        frames = re.findall(r'File "([^"]+)", line (\d+)', n.meta.get("stack_trace") or "")
        line = user_line([(f, int(k)) for f, k in frames])
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(
            f"shape propagation failed at node '{n.name}' ({op_label(n, ir.gm)})"
            f"{f' from {line}' if line else ''}: {type(e).__name__}: {cause}. "
            "Check that the recipe's inputs (shape, dtype) match what the model expects"
        ) from e
    return ir


# -- totals -------------------------------------------------------------------------------------


def _unique_tensors(gm: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def model_size_bytes(gm: nn.Module) -> int:
    """Bytes of every unique parameter and buffer, quantized weights at their bit width."""
    size = sum(t.nbytes for t in _unique_tensors(gm))
    for m in gm.modules():
        quant = getattr(m, "weight_quant", None)
        if quant is not None and getattr(quant, "calibrated", False):
            w = m.weight
            size += -w.nbytes + math.ceil(w.numel() * quant.scheme.bits / 8)
    return size


def totals(ir: IR) -> CostTotals:
    """Whole-model totals of an annotated IR. Shared weights count once in params and size."""
    nodes = [n for n in ir.compute_nodes() if has_facts(n)]
    fs = [facts(n) for n in nodes]
    return CostTotals(
        params=sum(p.numel() for p in {id(p): p for p in ir.gm.parameters()}.values()),
        size_bytes=model_size_bytes(ir.gm),
        macs=sum(f.macs for f in fs),
        flops=sum(f.flops for f in fs),
        bytes_moved=sum(f.bytes_moved for f in fs),
        nodes=len(nodes),
        uncounted=tuple(n.name for n, f in zip(nodes, fs) if not f.counted),
    )


def layer_rows(ir: IR) -> list[tuple[fx.Node, NodeFacts]]:
    """(node, facts) for every annotated compute node, in graph order."""
    return [(n, facts(n)) for n in ir.compute_nodes() if has_facts(n)]

