"""The walk that rebuilds a quantized fx graph from torch's x86 int8 kernels (used by `torch_int8`).

Mapping (source graph → lowered graph; "FQ" is a `FakeQuant`, s/z its scale/zero point)::

    input ─ FQ(s,z)                       torch.quantize_per_tensor(x, s, z, quint8)
    QuantConv ─[relu]─ FQ(s,z)            nnq.Conv{1,2,3}d / nniq.ConvReLU{1,2,3}d, .scale=s, .zero_point=z
    QuantConv ─ relu6|hardtanh|clamp ─ FQ nnq.Conv*d, then quantized hardtanh / clamp (clamps codes; same values)
    QuantLinear ─[act]─ FQ                nnq.Linear / nniq.LinearReLU (other activations as for conv)
    add(FQ, FQ) ─[relu]─ FQ(s,z)          quantized::add / add_relu(a, b, s, z)
    mul(FQ, FQ) ─[relu]─ FQ(s,z)          quantized::mul / mul_relu(a, b, s, z)
    cat([FQ, ...]) ─ FQ(s,z)              quantized::cat(xs, dim, s, z)
    avg/adaptive-avg pool ─ FQ            the quantized kernel if s,z equal the input's, else:
    mean, x + c, x * c (c a number) ─ FQ  dequantize → float op → quantize (exact; see below)
    pass-through and tied kinds           the same op on the quint8 tensor (keeps s, z)
    (max pool, flatten, view, split/getitem, interpolate, ...)
    FQ after a quint8 tensor              nothing if s,z are equal (a tied FQ), else dequantize → quantize
    graph output (quint8)                 .dequantize()

Weights: effopt's integer codes (``quantize_values``, the same codes the Q/DQ pt2 and ONNX
store) become a ``qint8`` tensor with the weight FakeQuant's per-channel (or per-tensor)
scales and zero points (``torch._make_per_channel_quantized_tensor``); the bias stays float,
as torch's quantized conv/linear expect (fbgemm adds it in float while requantizing).

Why the float detours: torch's quantized avg pools (and scalar add/mul) keep or rescale the
*input's* s, z and round to an input code; requantizing that to a smaller output scale (a
mean's range is narrower than its input's) would add up to 0.5·s_in of error, several output
steps. The detour rounds once, exactly like the fake-quant graph, and costs microseconds for a
global pool (512·4·4 values in ResNet-18).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.optimizer.lower.walk import Pending, QuantizedGraphWalk
from effopt.optimizer.quant.contract import FUSED_ACTIVATIONS, QPARAMS_FOLLOW_INPUT, SPLIT_KINDS, Bounds, call_arg
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear, quantize_values

__all__ = ["TorchInt8Lowering"]

# On a quint8 tensor these keep its scale and zero point: the contract's pass-through and tied kinds,
# and the fused activations, which clamp codes (quantized relu / hardtanh / clamp).
_ON_CODES = QPARAMS_FOLLOW_INPUT | FUSED_ACTIVATIONS
_AVERAGES = {"avg_pool", "adaptive_avg_pool", "mean"}
_CONV = {1: (nnq.Conv1d, nniq.ConvReLU1d), 2: (nnq.Conv2d, nniq.ConvReLU2d), 3: (nnq.Conv3d, nniq.ConvReLU3d)}


# -- values in the lowered graph -------------------------------------------------------------------


@dataclass(frozen=True)
class _Q:
    """A ``quint8`` tensor of the lowered graph with its scale and zero point."""

    node: fx.Node
    scale: float
    zero_point: int


@dataclass(frozen=True)
class _F:
    """A float tensor; ``after_int8`` lists the float ops since the last int8 values, e.g.
    ``("gelu (gelu)",)``; empty before any int8 value (the model's float head)."""

    node: fx.Node
    after_int8: tuple[str, ...] = ()


@dataclass(frozen=True)
class _QTuple:
    """The tuple a split/chunk of a quint8 tensor returns; each piece keeps the scale and zero point."""

    node: fx.Node
    scale: float
    zero_point: int


@dataclass(frozen=True)
class _Other:
    """A non-tensor value (a size) or a constant attribute."""

    node: fx.Node


@dataclass(frozen=True)
class _Bad:
    """A value whose producer is already reported as unsupported."""


_Value = Union[_Q, _QTuple, _F, _Other, _Bad, Pending]
# A Pending's build: (scale, zero_point, bounds of the fused activation or None) → the lowered node.
_Build = Callable[[float, int, Union[Bounds, None]], fx.Node]


class TorchInt8Lowering(QuantizedGraphWalk[_Value]):
    """One walk over the source graph in order, building the int8 graph; problems are collected, not raised.

    After `run`: ``graph`` and ``root`` make the lowered GraphModule, ``int8_kinds`` lists what runs
    on int8 kernels (graph order) and ``float_ops`` the ops computed in float between int8 ops.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], float_islands: bool) -> None:
        super().__init__(gm, example_inputs)
        self.float_islands = float_islands
        self.int8_kinds: list[str] = []   # what runs on int8 kernels, in graph order
        self.float_ops: list[str] = []    # ops computed in float between int8 ops (detours, float_islands)
        self.float_built: set[fx.Node] = set()  # int8-contract ops this lowering computes in float (exact detours)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.copied: dict[str, str] = {}  # source module/attribute target → its flat name in the lowered root

    # helpers ---------------------------------------------------------------------------------------
    def problem(self, n: fx.Node, kind: str, what: str) -> _Bad:
        self.record_problem(n, kind, what)
        return _Bad()

    def add_module(self, base: str, module: nn.Module) -> str:
        """Add ``module`` directly under the root as ``base`` with dots made underscores (made unique).

        Flat on purpose: container ``nn.Module``s would each become a TorchScript class whose
        name depends on what the process compiled before (see `torch_int8._content_digest`)."""
        name = self.fresh(base.replace(".", "_"))
        self.root.add_module(name, module)
        return name

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while hasattr(self.root, name):
            name, k = f"{base}_{k}", k + 1
        return name

    def quantize(self, x: fx.Node, scale: float, zero_point: int) -> fx.Node:
        return self.graph.call_function(torch.quantize_per_tensor, (x, scale, zero_point, torch.quint8))

    def dequantize(self, src: fx.Node, q: _Q) -> fx.Node:
        """One shared ``.dequantize()`` per quantized source value."""
        if src not in self.dequantized:
            self.dequantized[src] = self.graph.call_method("dequantize", (q.node,))
        return self.dequantized[src]

    def copy_node(self, n: fx.Node, arg: Callable[[fx.Node], fx.Node]) -> fx.Node:
        """``n`` in the lowered graph, its node arguments mapped by ``arg``, its module or attribute copied
        (once per source target: a module called twice stays one module)."""
        new = self.graph.node_copy(n, arg)
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            if target not in self.copied:
                self.copied[target] = self._copy_target(n, target)
            new.target = self.copied[target]
        return new

    def _copy_target(self, n: fx.Node, target: str) -> str:
        if n.op == "call_module":
            return self.add_module(target, copy.deepcopy(self.module(n)))
        *path, leaf = target.split(".")
        value = getattr(self.gm.get_submodule(".".join(path)) if path else self.gm, leaf)
        name = self.fresh(target.replace(".", "_"))
        if isinstance(value, torch.Tensor):
            self.root.register_buffer(name, value.detach().clone())
        else:
            setattr(self.root, name, copy.deepcopy(value))
        return name

    # the walk (QuantizedGraphWalk.run calls these) ------------------------------------------------
    def placeholder(self, n: fx.Node) -> _Value:
        default = n.args[0] if n.args else inspect.Signature.empty
        # untyped: TorchScript cannot resolve the alias fx writes for a torch.Tensor annotation ("_torch_Tensor_")
        return _F(self.graph.placeholder(n.name, default_value=default))

    def get_attr(self, n: fx.Node) -> _Value:
        return _Other(self.copy_node(n, lambda a: a))

    def other_op(self, n: fx.Node, kind: str) -> _Value:
        inputs = [self.values[a] for a in n.all_input_nodes]
        if any(isinstance(v, _Bad) for v in inputs):
            return _Bad()
        first = self.values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if kind in SPLIT_KINDS and isinstance(first, _Q):
            return _QTuple(self._same_call(n), first.scale, first.zero_point)
        if kind == "getitem" and isinstance(first, _QTuple):
            return _Q(self._same_call(n), first.scale, first.zero_point)
        if self.tensor_shape(n) is None:
            return _Other(self._same_call(n))  # sizes: x.size(0) works on a quint8 tensor too
        if not any(isinstance(v, (_Q, _QTuple)) for v in inputs):
            return self.float_op(n, kind, inputs)
        if kind in ("add", "mul", "matmul"):
            return self.binary(n, kind)
        if kind == "cat":
            return self.cat(n, kind)
        if kind in _AVERAGES:
            return self.average(n, kind)
        if kind in _ON_CODES and isinstance(first, _Q):
            if n.op == "call_method" and n.target == "view":  # int8 conv outputs are channels-last: view fails
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._lowered)
                return _Q(self.graph.call_method("reshape", args, kwargs), first.scale, first.zero_point)
            return _Q(self._same_call(n), first.scale, first.zero_point)
        return self.float_op(n, kind, inputs)

    def _lowered(self, a: fx.Node) -> fx.Node:
        """The lowered node that holds source value ``a`` as it is (quint8 stays quint8)."""
        return self.values[a].node  # type: ignore[union-attr]

    def _same_call(self, n: fx.Node) -> fx.Node:
        """The same call on the lowered values (quint8 tensors stay quint8)."""
        return self.copy_node(n, self._lowered)

    def float_op(self, n: fx.Node, kind: str, inputs: Sequence[_Value]) -> _Value:
        """A float op: runs on dequantized values; fine before the first and after the last quantizer."""
        region = tuple(dict.fromkeys(op for v in inputs if isinstance(v, _F) for op in v.after_int8))
        if region or any(isinstance(v, _Q) for v in inputs):
            region += (f"{n.name} ({kind})",)
        if any(isinstance(v, _QTuple) for v in inputs):
            return self.problem(n, kind, "reads the pieces of a split int8 tensor as one value: index them first")

        def arg(a: fx.Node) -> fx.Node:
            v = self.values[a]
            return self.dequantize(a, v) if isinstance(v, _Q) else v.node  # type: ignore[union-attr]

        return _F(self.copy_node(n, arg), region)

    # FakeQuant: where int8 values get their scale and zero point ------------------------------------------
    def fake_quant(self, n: fx.Node, fq: FakeQuant) -> _Value:
        s = fq.scheme
        if fq.observer is not None or not fq.calibrated:
            return self.problem(n, "FakeQuant", "is not calibrated: run the quantize pass's calibration first")
        if not fq.enabled:
            return self.problem(n, "FakeQuant", "is disabled (its layer was kept in float, e.g. by mixed precision): "
                                "torch's int8 kernels cannot compute it")
        if s.axis is not None:
            return self.problem(n, "FakeQuant", f"quantizes an activation per channel (axis={s.axis}): the x86 int8 "
                                "kernels take one scale per tensor")
        if s.signed or s.qmin != 0 or s.qmax != 255:
            sign = "signed" if s.signed else "unsigned"
            return self.problem(n, "FakeQuant", f"stores {s.bits}-bit {sign} codes [{s.qmin}, {s.qmax}]: the x86 int8 "
                                "kernels take quint8 activations with codes [0, 255]")
        scale, zero = float(fq.frozen_scale), int(fq.frozen_zero)
        src = n.args[0]
        v = self.values.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, _Bad):  # already reported: go on as if it were int8, to find independent problems
            return _Q(self.graph.call_function(torch.quantize_per_tensor, ()), scale, zero)
        if isinstance(v, _F):
            if v.after_int8 and not self.float_islands:
                self.problem(n, "FakeQuant", f"requantizes a value computed in float from int8 values (float op "
                             f"{', '.join(v.after_int8)}): torch has no int8 kernel for it, so it would run in float "
                             "between quantized ops (float_islands=True runs it so)")
            self.float_ops.extend(op for op in v.after_int8 if op not in self.float_ops)
            return _Q(self.quantize(v.node, scale, zero), scale, zero)
        if isinstance(v, Pending) and v.site is not None:  # the end of a site: build the op now
            node = v.build(scale, zero, v.site.bounds)
            if v.node in self.float_built:
                self.float_ops.append(f"{v.node.name} ({v.kind})")
            else:
                self.int8_kinds.append(v.kind)
            return _Q(node, scale, zero)
        if isinstance(v, _Q):
            if (v.scale, v.zero_point) == (scale, zero):
                return v  # a tied quantizer (getitem, interpolate): nothing to do
            deq = self.graph.call_method("dequantize", (v.node,))
            return _Q(self.quantize(deq, scale, zero), scale, zero)
        return self.problem(n, "FakeQuant", f"quantizes '{getattr(src, 'name', src)}', which is not a tensor")

    def activation(self, out: fx.Node, bounds: Bounds | None, relu_fused: bool) -> fx.Node:
        """The activation the kernel did not fuse, on the int8 result: it clamps codes, so values are the same
        as clamping first and quantizing after (relu: codes below the zero point; hardtanh: outside its bounds)."""
        if bounds is None or (bounds.is_relu and relu_fused):
            return out
        if bounds.is_relu:
            return self.graph.call_function(torch.relu, (out,))
        if math.isinf(bounds.lo) or math.isinf(bounds.hi):  # clamp(min=...) / clamp(max=...): one open side
            lo, hi = (None if math.isinf(b) else b for b in (bounds.lo, bounds.hi))
            return self.graph.call_function(torch.clamp, (out, lo, hi))
        return self.graph.call_function(F.hardtanh, (out, bounds.lo, bounds.hi))

    def _float_activation(self, out: fx.Node, bounds: Bounds | None) -> fx.Node:
        if bounds is None:
            return out
        lo, hi = (None if math.isinf(b) else b for b in (bounds.lo, bounds.hi))
        return self.graph.call_function(torch.clamp, (out, lo, hi))

    # conv / linear ---------------------------------------------------------------------------------------
    def weighted(self, n: fx.Node, mod: QuantConv | QuantLinear) -> _Value:
        kind = "conv" if isinstance(mod, QuantConv) else "linear"
        wq = mod.weight_quant
        if getattr(mod, "compute_dtype", "int8") != "int8" or not wq.enabled:
            return self.problem(n, kind, f"computes in {getattr(mod, 'compute_dtype', 'float')} (kept in float or "
                                "weight-only quantized): torch's int8 kernels cannot run it")
        if wq.observer is not None or not wq.calibrated:
            return self.problem(n, kind, "has an uncalibrated weight quantizer: run the quantize pass first")
        x = self.values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(x, _Bad):
            return x
        if not isinstance(x, _Q):
            return self.problem(n, kind, "reads a float value: its input needs a FakeQuant (quantized-graph contract, "
                                "rule 2)")
        weight = self._qweight(n, kind, mod)
        if isinstance(weight, _Bad):
            return weight
        bias = mod.bias.detach().clone() if mod.bias is not None else None
        if isinstance(mod, QuantConv):
            build = self._conv(n, mod.conv, weight, bias, x)
        else:
            build = self._linear(n, mod.linear, weight, bias, x)
        return build if isinstance(build, _Bad) else Pending(n, kind, build)

    def _qweight(self, n: fx.Node, kind: str, mod: QuantConv | QuantLinear) -> torch.Tensor | _Bad:
        """effopt's weight codes as a qint8 tensor with the weight FakeQuant's scales."""
        wq = mod.weight_quant
        s = wq.scheme
        codes = getattr(mod, "weight_codes", None)
        if codes is None:
            codes = quantize_values(mod.weight.detach(), wq.scale.detach(), wq.zero_point, s)
        offset = 0 if s.signed else 2 ** (s.bits - 1)
        codes = codes.to(torch.int32) - offset
        zero = wq.zero_point.detach().to(torch.int64).reshape(-1) - offset
        if bool((zero != 0).any()):
            return self.problem(n, kind, "has asymmetric weights (zero point ≠ 0): quantize weights symmetrically")
        if int(codes.min()) < -128 or int(codes.max()) > 127:
            return self.problem(n, kind, f"has {s.bits}-bit weight codes outside int8")
        codes = codes.to(torch.int8)
        if s.axis is None:
            return torch._make_per_tensor_quantized_tensor(codes, float(wq.frozen_scale), 0)
        if s.axis != 0:
            return self.problem(n, kind, f"quantizes its weight along axis {s.axis}: the kernels take axis 0")
        scale = wq.scale.detach().double().reshape(-1)
        return torch._make_per_channel_quantized_tensor(codes, scale, torch.zeros_like(zero), 0)

    def _conv(self, n: fx.Node, conv: nn.modules.conv._ConvNd, weight: torch.Tensor, bias: torch.Tensor | None,
              x: _Q) -> _Build | _Bad:
        nd = weight.dim() - 2
        if isinstance(conv, nn.modules.conv._ConvTransposeNd) or nd not in _CONV:
            return self.problem(n, "conv", f"is a {type(conv).__name__}: no int8 kernel is lowered for it")
        if conv.padding_mode != "zeros":
            return self.problem(n, "conv", f"pads with mode '{conv.padding_mode}': the int8 convs pad with zeros only")
        if isinstance(conv.padding, str):
            return self.problem(n, "conv", f"has padding='{conv.padding}': give the padding as numbers")
        plain, with_relu = _CONV[nd]
        target = str(n.target)

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            cls = with_relu if bounds is not None and bounds.is_relu else plain
            q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias is not None)
            q.set_weight_bias(weight, bias)
            q.scale, q.zero_point = scale, zero
            out = self.graph.call_module(self.add_module(target, q), (x.node,))
            return self.activation(out, bounds, relu_fused=True)

        return build

    def _linear(self, n: fx.Node, linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None,
                x: _Q) -> _Build:
        target = str(n.target)

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            if bounds is not None and bounds.is_relu:
                q: nn.Module = nniq.LinearReLU(linear.in_features, linear.out_features, bias is not None)
            else:
                q = nnq.Linear(linear.in_features, linear.out_features, bias is not None)
            q.set_weight_bias(weight, bias)  # type: ignore[operator]
            q.scale, q.zero_point = scale, zero
            out = self.graph.call_module(self.add_module(target, q), (x.node,))
            return self.activation(out, bounds, relu_fused=True)

        return build

    # elementwise / cat / averages ---------------------------------------------------------------------------
    def _operands(self, n: fx.Node, kind: str, args: Sequence[Any]) -> list[_Q] | _Value:
        """The int8 operands of ``n``; else (an operand is a constant or float) ``n`` in float, or the problem."""
        refs = []
        for a in args:
            v = self.values.get(a) if isinstance(a, fx.Node) else None
            if not isinstance(v, _Q):
                if self.float_islands:
                    return self.float_op(n, kind, [self.values[x] for x in n.all_input_nodes])
                what = f"a constant {a!r}" if not isinstance(a, fx.Node) else f"'{a.name}', a float value"
                return self.problem(n, kind, f"mixes an int8 operand with {what}: torch's int8 {kind} takes "
                                    "quantized tensors only; quantize all operands (or keep the op in float)")
            refs.append(v)
        return refs

    def binary(self, n: fx.Node, kind: str) -> _Value:
        if n.kwargs.get("alpha", 1) != 1:
            return self.problem(n, kind, f"has alpha={n.kwargs['alpha']}: no int8 kernel")
        scalars = [a for a in n.args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if kind in ("add", "mul") and len(n.args) == 2 and len(scalars) == 1:
            return self.detour(n, kind)  # x * 0.25: the quantize pass treats it as int8 in, int8 out
        refs = self._operands(n, kind, list(n.args[:2]) if len(n.args) >= 2 else [])
        if not isinstance(refs, list):
            return refs
        a, b = refs
        if kind == "matmul" and getattr(n.target, "__name__", str(n.target)) not in ("matmul", "bmm", "mm"):
            return self.problem(n, kind, f"({getattr(n.target, '__name__', n.target)}) has no int8 kernel")
        plain, fused = {
            "add": (torch.ops.quantized.add, torch.ops.quantized.add_relu),
            "mul": (torch.ops.quantized.mul, torch.ops.quantized.mul_relu),
            "matmul": (torch.ops.quantized.matmul, None),
        }[kind]

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            relu = bounds is not None and bounds.is_relu and fused is not None
            op = fused if relu else plain
            out = self.graph.call_function(op, (a.node, b.node, scale, zero))
            return self.activation(out, bounds, relu_fused=relu)

        return Pending(n, kind, build)

    def cat(self, n: fx.Node, kind: str) -> _Value:
        tensors = call_arg(n, 0, "tensors", ())
        if getattr(n.target, "__name__", "") == "stack" or not isinstance(tensors, (list, tuple)):
            return self.problem(n, kind, "is a stack: only torch.cat has an int8 kernel")
        refs = self._operands(n, kind, list(tensors))
        if not isinstance(refs, list):
            return refs
        dim = call_arg(n, 1, "dim", 0)
        if isinstance(dim, fx.Node):
            return self.problem(n, kind, "has a computed dim")

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            xs = [r.node for r in refs]
            out = self.graph.call_function(torch.ops.quantized.cat, (xs, int(dim), scale, zero))
            return self.activation(out, bounds, relu_fused=False)

        return Pending(n, kind, build)

    def detour(self, n: fx.Node, kind: str) -> _Value:
        """An int8-in, int8-out op computed exactly in float: dequantize → op → quantize (one rounding).

        Used for a tensor-scalar add/mul (torch's scalar kernels keep or rescale the input's
        parameters, so a second rounding to the FakeQuant's would follow)."""
        x = next(self.values[a] for a in n.all_input_nodes)
        if not isinstance(x, _Q) or len(n.all_input_nodes) != 1:
            return self.problem(n, kind, "is not an op on one int8 tensor")
        src = n

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            self.float_built.add(src)
            out = self.copy_node(src, lambda a: self.dequantize(a, x))
            return self.quantize(self._float_activation(out, bounds), scale, zero)

        return Pending(n, kind, build)

    def average(self, n: fx.Node, kind: str) -> _Value:
        x = self.values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(x, _Q) or any(isinstance(self.values[a], _Q) for a in n.all_input_nodes[1:]):
            return self.problem(n, kind, "averages a value that is not one int8 tensor")
        src = n

        def build(scale: float, zero: int, bounds: Bounds | None) -> fx.Node:
            if (scale, zero) == (x.scale, x.zero_point) and kind != "mean":
                return self.activation(self._same_call(src), bounds, relu_fused=False)
            # exact: one rounding, as the fake-quant graph (see the module docstring)
            self.float_built.add(src)
            first = src.args[0]

            def arg(a: fx.Node) -> fx.Node:
                return self.dequantize(a, x) if a is first else self.values[a].node  # type: ignore[union-attr]

            out = self.copy_node(src, arg)
            return self.quantize(self._float_activation(out, bounds), scale, zero)

        return Pending(n, kind, build)

    # the graph output -------------------------------------------------------------------------------------
    def output(self, n: fx.Node) -> None:
        def arg(a: fx.Node) -> fx.Node:
            v = self.values[a]
            if isinstance(v, _Q):
                return self.dequantize(a, v)
            return v.node if isinstance(v, (_F, _Other)) else a

        leaves = [a for a in tree_leaves(n.args[0]) if isinstance(a, fx.Node)]
        if any(isinstance(self.values[a], _Bad) for a in leaves):
            return
        self.graph.output(fx.node.map_arg(n.args[0], arg))
