"""Run a quantized graph on PyTorch's own x86 int8 kernels, and save it as TorchScript.

The ``model.pt2`` effopt emits for a quantized model holds
``torch.ops.quantized_decomposed`` quantize/dequantize reference ops: exact quantized
semantics, but eager PyTorch computes them in float (about 4x *slower* than the float
model). This torch build also has real int8 kernels for x86 (the ``x86`` quantized engine,
fbgemm with oneDNN behind it): ``torch.ao.nn.quantized`` conv/linear modules with packed
int8 weights, ``quantized::add``/``add_relu``/``mul``/``cat``, and max pool, average pool,
flatten and views that work on ``quint8`` tensors. `lower_to_torch_int8` rebuilds a graph
that follows the quantized-graph contract (`effopt.optimizer.quant.schemes`) from those
kernels, with exactly effopt's calibrated parameters; `save_torchscript` writes it as a
TorchScript archive that ``torch.jit.load`` runs without effopt or the user's code.

Mapping (source graph → lowered graph; "FQ" is a `FakeQuant`, s/z its scale/zero point)::

    input ─ FQ(s,z)                       torch.quantize_per_tensor(x, s, z, quint8)
    QuantConv ─[relu]─ FQ(s,z)            nnq.Conv{1,2,3}d / nniq.ConvReLU{1,2,3}d, .scale=s, .zero_point=z
    QuantConv ─ relu6|hardtanh ─ FQ       nnq.Conv*d then quantized hardtanh (clamps codes; same values)
    QuantLinear ─[relu]─ FQ               nnq.Linear / nniq.LinearReLU (relu6/hardtanh as for conv)
    add(FQ, FQ) ─[relu]─ FQ(s,z)          quantized::add / add_relu(a, b, s, z)
    mul(FQ, FQ) ─[relu]─ FQ(s,z)          quantized::mul / mul_relu(a, b, s, z)
    cat([FQ, ...]) ─ FQ(s,z)              quantized::cat(xs, dim, s, z)
    avg/adaptive-avg pool ─ FQ            the quantized kernel if s,z equal the input's, else:
    mean, x + c, x * c (c a number) ─ FQ  dequantize → float op → quantize (exact; see below)
    max pool, flatten, view/reshape,      the same op on the quint8 tensor (keeps s, z)
    permute, dropout, split/getitem, ...
    FQ after a quint8 tensor              nothing if s,z are equal, else dequantize → quantize
    graph output (quint8)                 .dequantize()

Weights: effopt's integer codes (``quantize_values``, the same codes the Q/DQ pt2 and ONNX
store) become a ``qint8`` tensor with the weight FakeQuant's per-channel (or per-tensor)
scales and zero points (``torch._make_per_channel_quantized_tensor``); the bias stays float,
as torch's quantized conv/linear expect (fbgemm adds it in float while requantizing).

Why the float detours: torch's quantized avg pools (and scalar add/mul) keep or rescale the
*input's* s, z and round to an input code; requantizing that to a smaller output scale (a
mean's range is narrower than its input's) would add up to 0.5·s_in of error, several output
steps. The detour rounds once, exactly like the fake-quant graph, and costs microseconds for a
global pool (512·4·4 values in ResNet-18). `Int8Summary` lists detours as float ops.

Numerics: each int8 layer matches its fake-quant counterpart to one output code, and only
where float round-off meets a rounding tie (about 1 element in 50,000 for ResNet-18's convs
fed the same input). Those flips propagate: small nets' logits stay within 1 output step
(DigitsNet, the test zoo), a random-weight ResNet-18 (CIFAR, chaotic on N(0, 1) inputs)
drifts to 8-10 steps, relative L2 error 0.06 -- half of onnxruntime's int8 drift on the same
model (15-18 steps, 0.14), with top-1 agreement 0.94-1.0. fbgemm adds the float bias in its
requantization. On CPUs without VNNI (AVX2 only), fbgemm's u8·s8 pair sums can saturate int16
when activation and weight codes are both near full range (PyTorch's own x86 qconfig avoids
this with ``reduce_range``); `lower_to_torch_int8` runs the lowered module against the
fake-quant graph on the example inputs and gives `Unsupported` past ``max_relative_error``.

What returns `Unsupported` (each reason names the node): float ops between quantized ops
(e.g. a gelu between two quantized convs; torch has no int8 kernel for it), layers the
quantize pass kept in float (mixed precision, weight-only or dynamic mode), activation
quantizers that are not 8-bit unsigned per tensor (the x86 kernels take ``quint8`` with
codes 0..255), asymmetric weights, convs padded other than with zeros or with string padding,
transposed convs, a quantized result that reaches anything but its FakeQuant, and kernels
that fail on the example inputs. Float ops before the first quantizer or after the last
quantized op are fine: they run in float on dequantized values.

Serialization (torch 2.13): ``torch.export`` fails on the packed-weight script objects
(``Conv2dPackedParamsBase ... does not have a field with name '__obj_flatten__'``), so the
artefact is TorchScript (``torch.jit.script`` of the lowered GraphModule, ``torch.jit.save``;
``torch.jit.trace`` where the script compiler rejects a float op copied from the user's code).
Loading it needs only ``torch``; the packed weights are stored unpacked and repacked by the
loading process's quantized engine (``x86`` by default on x86 CPUs).

Bytes: the zip entries carry a fixed 1980 timestamp and the serialization id derives from the
contents, so a fresh process saving the same model writes identical bytes (checked across
processes). Within one process the archive also records history: its debug info names fx's
generated-code key (``<eval_with_key>.N``, a process-wide counter), and TorchScript renames a
class it compiled before with other constants (``___torch_mangle_N``). Naming the lowered
class after a digest of its code and weights (`_content_digest`) and keeping submodules flat
removes the common renames, not all: do not promise a sha256 of model_int8.pt (as for
model.pt2).

Both torch.jit and quantized tensors print deprecation warnings in torch 2.13
(pytorch/pytorch#184982): this path works today but is on its way out. The non-deprecated
route, AOTInductor with ``freezing`` on effopt's Q/DQ program, does select oneDNN int8 convs
(``onednn.qconv_pointwise``, outputs equal to the fake-quant graph, ~20 s to compile) but ran
ResNet-18 no faster than fp32 with torch at 1 thread (0.8x at batch 1, 1.0x at batch 32), so
it is not used here.

Example::

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    if isinstance(lowered, Unsupported):
        note = f"quantize/dequantize reference ops: {lowered}"
    else:
        save_torchscript(lowered, out / "model_int8.pt", ir.example_inputs)  # torch.jit.load(...)(x): logits
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.errors import EmitError
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear, quantize_values
from effopt.optimizer.lower.walk import QuantizedGraphWalk, call_arg

__all__ = [
    "TORCH_INT8_NOTE",
    "Int8Agreement",
    "Int8Summary",
    "SavedTorchScript",
    "Unsupported",
    "int8_agreement",
    "int8_engine",
    "int8_summary",
    "lower_to_torch_int8",
    "quantized_engine",
    "save_torchscript",
]

#: What the report says about ``model_int8.pt`` when the lowering succeeds.
TORCH_INT8_NOTE = "x86 int8 kernels (fbgemm) via TorchScript"

#: Engines with the x86 int8 kernels, preferred first.
X86_ENGINES: tuple[str, ...] = ("x86", "fbgemm")

_FUSED = {"relu", "relu6", "hardtanh"}
_PASS_THROUGH = {
    "max_pool", "adaptive_max_pool", "flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze",
    "permute", "transpose", "t", "contiguous", "dropout", "identity", "getitem", "interpolate", "relu", "relu6",
    "hardtanh",
}
_AVERAGES = {"avg_pool", "adaptive_avg_pool", "mean"}
_CONV = {1: (nnq.Conv1d, nniq.ConvReLU1d), 2: (nnq.Conv2d, nniq.ConvReLU2d), 3: (nnq.Conv3d, nniq.ConvReLU3d)}


@dataclass(frozen=True)
class Unsupported:
    """Why a graph cannot run on torch's int8 kernels; one reason per offending node.

    Example: ``Unsupported(("node 'gelu_quant' (FakeQuant) requantizes a value computed in float from
    int8 values (float op gelu (gelu)): ...",))``. ``str()`` joins the reasons; `short` keeps a few.
    """

    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return "; ".join(self.reasons)

    def short(self, limit: int = 3) -> str:
        """The first ``limit`` reasons and how many more, for a one-line report note."""
        more = len(self.reasons) - limit
        return "; ".join(self.reasons[:limit]) + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True)
class Int8Agreement:
    """How the int8 module's outputs compare with the fake-quant graph's (first output).

    ``output_step`` is the output FakeQuant's scale, so ``max_abs_err / output_step`` is the
    error in output codes: 2.0 means two quantization steps. ``top1`` is the argmax agreement
    for 2-D outputs with more than one column, else None.
    """

    max_abs_err: float
    output_step: float | None
    top1: float | None
    samples: int

    @property
    def max_steps(self) -> float | None:
        return None if not self.output_step else self.max_abs_err / self.output_step


# -- the quantized engine --------------------------------------------------------------------------


def int8_engine() -> str | None:
    """The quantized engine with x86 int8 kernels in this torch build (``"x86"``, else ``"fbgemm"``), or None."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in X86_ENGINES if e in supported), None)


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` to ``name`` for the block, then restore the caller's engine.

    The engine decides how weights are packed when a quantized module is built (and when a
    TorchScript archive is loaded), so the lowering builds its modules inside this.
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def _quiet_torch_warnings() -> Iterator[None]:
    """Library code does not print: torch 2.13 warns that quantized tensors and torch.jit are deprecated
    (the module docstring says so), and TorchScript warns about an annotation in GraphModule.__init__."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*")
        warnings.filterwarnings("ignore", message=".*instance-level annotations on empty non-base types.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


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


@dataclass
class _Pending:
    """An int8 op whose output scale/zero point come from the FakeQuant after it (contract rules 2-3).

    ``build(scale, zero_point, act)`` emits the op into the lowered graph; ``act`` is the fused
    activation between the op and its FakeQuant (``("relu", None)``, ``("hardtanh", (lo, hi))``).
    """

    node: fx.Node
    kind: str
    build: Callable[[float, int, tuple[str, tuple[float, float] | None] | None], fx.Node]
    act: tuple[str, tuple[float, float] | None] | None = None
    act_node: fx.Node | None = None


_Value = Union[_Q, _QTuple, _F, _Other, _Bad, _Pending]


class _TensorKinds(fx.Interpreter):
    """Runs the source graph once and records which nodes produce a tensor."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.tensor: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.tensor[n] = isinstance(result, torch.Tensor)
        return result


# -- the lowering ----------------------------------------------------------------------------------


class _Lowering(QuantizedGraphWalk[_Value]):
    """One walk over the source graph in order, building the int8 graph; problems are collected, not raised."""

    def __init__(self, gm: fx.GraphModule, is_tensor: dict[fx.Node, bool], float_islands: bool) -> None:
        super().__init__(gm)
        self.is_tensor = is_tensor
        self.float_islands = float_islands
        self.int8_kinds: list[str] = []   # what runs on int8 kernels, in graph order
        self.float_ops: list[str] = []    # ops computed in float between int8 ops (detours, float_islands)
        self.float_built: set[fx.Node] = set()  # int8-contract ops this lowering computes in float (exact detours)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.copied: dict[str, str] = {}  # source module/attribute target → its flat name in the lowered root
        self.materialized: set[fx.Node] = set()

    # helpers ---------------------------------------------------------------------------------------
    def problem(self, n: fx.Node, kind: str, what: str) -> _Bad:
        self.record_problem(n, kind, what)
        return _Bad()

    def add_module(self, base: str, module: nn.Module) -> str:
        """Add ``module`` directly under the root as ``base`` with dots made underscores (made unique).

        Flat on purpose: container ``nn.Module``s would each become a TorchScript class whose
        name depends on what the process compiled before (see `_content_digest`)."""
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
        pending = next((v for v in inputs if isinstance(v, _Pending)), None)
        if pending is not None:
            if kind in _FUSED and len(inputs) == 1:
                return self.fuse(n, kind, pending)
            return self.problem(pending.node, pending.kind, f"result reaches '{n.name}' without a FakeQuant: torch's "
                                "int8 kernels need exactly one FakeQuant after it (optionally after a fused relu)")
        first = self.values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if kind in ("split", "chunk") and isinstance(first, _Q):
            return _QTuple(self._same_call(n), first.scale, first.zero_point)
        if kind == "getitem" and isinstance(first, _QTuple):
            return _Q(self._same_call(n), first.scale, first.zero_point)
        if not self.is_tensor.get(n, False):
            return _Other(self._same_call(n))  # sizes: x.size(0) works on a quint8 tensor too
        if not any(isinstance(v, (_Q, _QTuple)) for v in inputs):
            return self.float_op(n, kind, inputs)
        if kind in ("add", "mul", "matmul"):
            return self.binary(n, kind)
        if kind == "cat":
            return self.cat(n, kind)
        if kind in _AVERAGES:
            return self.average(n, kind)
        if kind in _PASS_THROUGH and isinstance(first, _Q):
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
        if isinstance(v, _Pending):
            if v.node in self.materialized:
                return self.problem(v.node, v.kind, "result is requantized by more than one FakeQuant")
            if v.act_node is not None and len(v.act_node.users) != 1:
                return self.problem(v.act_node, self.kind(v.act_node), "is a fused activation with more than one "
                                    "user: only its FakeQuant may read it")
            self.materialized.add(v.node)
            node = v.build(scale, zero, v.act)
            if v.node in self.float_built:
                self.float_ops.append(f"{v.node.name} ({v.kind})")
            else:
                self.int8_kinds.append(v.kind)
            return _Q(node, scale, zero)
        if isinstance(v, _Q):
            if (v.scale, v.zero_point) == (scale, zero):
                return v  # a tied quantizer (split, interpolate): nothing to do
            deq = self.graph.call_method("dequantize", (v.node,))
            return _Q(self.quantize(deq, scale, zero), scale, zero)
        return self.problem(n, "FakeQuant", f"quantizes '{getattr(src, 'name', src)}', which is not a tensor")

    def fuse(self, n: fx.Node, kind: str, p: _Pending) -> _Value:
        if p.act is not None or len(p.node.users) != 1:
            return self.problem(p.node, p.kind, f"result reaches '{n.name}' ({kind}) with other users or after "
                                "another activation: only one fused activation may sit before its FakeQuant")
        bounds = self._bounds(n, kind)
        if bounds is None:
            return self.problem(n, kind, "has non-constant bounds")
        act = ("relu", None) if kind == "relu" else ("hardtanh", bounds)
        return _Pending(p.node, p.kind, p.build, act, n)

    def _bounds(self, n: fx.Node, kind: str) -> tuple[float, float] | None:
        mod = self.module(n)
        if kind == "relu":
            return 0.0, math.inf
        if kind == "relu6":
            return 0.0, 6.0
        if mod is not None:
            return float(mod.min_val), float(mod.max_val)  # type: ignore[arg-type]
        lo, hi = call_arg(n, 1, "min_val", -1.0), call_arg(n, 2, "max_val", 1.0)
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return float(lo), float(hi)

    def activation(self, out: fx.Node, act: tuple[str, tuple[float, float] | None] | None, relu_fused: bool) -> fx.Node:
        """The activation the kernel did not fuse, on the int8 result: it clamps codes, so values are the same
        as clamping first and quantizing after (relu: codes below the zero point; hardtanh: outside its bounds)."""
        if act is None or (act[0] == "relu" and relu_fused):
            return out
        if act[0] == "relu":
            return self.graph.call_function(torch.relu, (out,))
        lo, hi = act[1]  # type: ignore[misc]
        return self.graph.call_function(F.hardtanh, (out, lo, hi))

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
        return build if isinstance(build, _Bad) else _Pending(n, kind, build)

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
              x: _Q) -> Callable[..., fx.Node] | _Bad:
        nd = weight.dim() - 2
        if isinstance(conv, nn.modules.conv._ConvTransposeNd) or nd not in _CONV:
            return self.problem(n, "conv", f"is a {type(conv).__name__}: no int8 kernel is lowered for it")
        if conv.padding_mode != "zeros":
            return self.problem(n, "conv", f"pads with mode '{conv.padding_mode}': the int8 convs pad with zeros only")
        if isinstance(conv.padding, str):
            return self.problem(n, "conv", f"has padding='{conv.padding}': give the padding as numbers")
        plain, with_relu = _CONV[nd]
        target = str(n.target)

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            cls = with_relu if act is not None and act[0] == "relu" else plain
            q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias is not None)
            q.set_weight_bias(weight, bias)
            q.scale, q.zero_point = scale, zero
            out = self.graph.call_module(self.add_module(target, q), (x.node,))
            return self.activation(out, act, relu_fused=True)

        return build

    def _linear(self, n: fx.Node, linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None,
                x: _Q) -> Callable[..., fx.Node]:
        target = str(n.target)

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            if act is not None and act[0] == "relu":
                q: nn.Module = nniq.LinearReLU(linear.in_features, linear.out_features, bias is not None)
            else:
                q = nnq.Linear(linear.in_features, linear.out_features, bias is not None)
            q.set_weight_bias(weight, bias)  # type: ignore[operator]
            q.scale, q.zero_point = scale, zero
            out = self.graph.call_module(self.add_module(target, q), (x.node,))
            return self.activation(out, act, relu_fused=True)

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

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            relu = act is not None and act[0] == "relu" and fused is not None
            op = fused if relu else plain
            out = self.graph.call_function(op, (a.node, b.node, scale, zero))
            return self.activation(out, act, relu_fused=relu)

        return _Pending(n, kind, build)

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

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            xs = [r.node for r in refs]
            out = self.graph.call_function(torch.ops.quantized.cat, (xs, int(dim), scale, zero))
            return self.activation(out, act, relu_fused=False)

        return _Pending(n, kind, build)

    def detour(self, n: fx.Node, kind: str) -> _Value:
        """An int8-in, int8-out op computed exactly in float: dequantize → op → quantize (one rounding).

        Used for a tensor-scalar add/mul (torch's scalar kernels keep or rescale the input's
        parameters, so a second rounding to the FakeQuant's would follow)."""
        x = next(self.values[a] for a in n.all_input_nodes)
        if not isinstance(x, _Q) or len(n.all_input_nodes) != 1:
            return self.problem(n, kind, "is not an op on one int8 tensor")
        src = n

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            self.float_built.add(src)
            out = self.copy_node(src, lambda a: self.dequantize(a, x))
            return self.quantize(self._float_activation(out, act), scale, zero)

        return _Pending(n, kind, build)

    def _float_activation(self, out: fx.Node, act: tuple[str, Any] | None) -> fx.Node:
        if act is None:
            return out
        lo, hi = act[1] if act[1] is not None else (0.0, math.inf)
        return self.graph.call_function(torch.clamp, (out, lo, None if math.isinf(hi) else hi))

    def average(self, n: fx.Node, kind: str) -> _Value:
        x = self.values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(x, _Q) or any(isinstance(self.values[a], _Q) for a in n.all_input_nodes[1:]):
            return self.problem(n, kind, "averages a value that is not one int8 tensor")
        src = n

        def build(scale: float, zero: int, act: tuple[str, Any] | None) -> fx.Node:
            if (scale, zero) == (x.scale, x.zero_point) and kind != "mean":
                return self.activation(self._same_call(src), act, relu_fused=False)
            # exact: one rounding, as the fake-quant graph (see the module docstring)
            self.float_built.add(src)
            first = src.args[0]

            def arg(a: fx.Node) -> fx.Node:
                return self.dequantize(a, x) if a is first else self.values[a].node  # type: ignore[union-attr]

            out = self.copy_node(src, arg)
            return self.quantize(self._float_activation(out, act), scale, zero)

        return _Pending(n, kind, build)

    # the graph output -------------------------------------------------------------------------------------
    def output(self, n: fx.Node) -> None:
        def arg(a: fx.Node) -> fx.Node:
            v = self.values[a]
            if isinstance(v, _Q):
                return self.dequantize(a, v)
            if isinstance(v, _Pending):
                self.problem(v.node, v.kind, "result is a model output without a FakeQuant after it")
                return a
            return v.node if isinstance(v, (_F, _Other)) else a

        leaves = [a for a in tree_leaves(n.args[0]) if isinstance(a, fx.Node)]
        if any(isinstance(self.values[a], _Bad) for a in leaves):
            return
        self.graph.output(fx.node.map_arg(n.args[0], arg))



@dataclass(frozen=True)
class Int8Summary:
    """What a lowered module runs where: ``int8`` op kinds in graph order, and ``float_ops``, the
    ops computed in float between int8 ops (exact detours such as a global average pool with new
    output parameters, and with ``float_islands`` any float op), as ``"name (kind)"``.

    ``str()`` is the report note, e.g. for ResNet-18 ``"x86 int8 kernels (fbgemm) via TorchScript:
    conv 20, add 8, linear 1 in int8; float between int8 ops: avgpool (adaptive_avg_pool)"``.
    """

    int8: tuple[str, ...]
    float_ops: tuple[str, ...] = ()

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for k in self.int8:
            counts[k] = counts.get(k, 0) + 1
        text = f"{TORCH_INT8_NOTE}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " in int8"
        if self.float_ops:
            text += "; float between int8 ops: " + ", ".join(self.float_ops)
        return text


SUMMARY_KEY = "effopt_torch_int8"


def int8_summary(lowered: fx.GraphModule) -> Int8Summary:
    """The `Int8Summary` `lower_to_torch_int8` stored in the lowered module's ``meta``."""
    summary = lowered.meta.get(SUMMARY_KEY)
    if not isinstance(summary, Int8Summary):
        raise EmitError("int8_summary: this module was not made by lower_to_torch_int8; lower the quantized graph "
                        "first")
    return summary


def lower_to_torch_int8(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    engine: str | None = None,
    max_relative_error: float = 0.25,
    float_islands: bool = False,
) -> fx.GraphModule | Unsupported:
    """A GraphModule that runs ``gm`` (quantized-graph contract) on torch's x86 int8 kernels, or why not.

    ``example_inputs`` are run through ``gm`` once to tell tensors from sizes, and through the
    lowered module once as a check: a kernel that fails, or outputs whose relative L2 error
    against ``gm`` (eval mode) exceeds ``max_relative_error``, give `Unsupported` rather than a
    wrong artefact. The bound is loose on purpose: it catches a wrong kernel or saturation,
    not the rounding drift of deep nets (0.06 on a random-weight ResNet-18, where onnxruntime's
    int8 kernels drift 0.14); use `int8_agreement` on real data for the report. ``engine``
    defaults to `int8_engine`; it is set only while the modules are built and checked, then
    the caller's engine is restored.
    ``float_islands=True`` runs float ops between quantized ops in float (dequantize → op →
    quantize, what the Q/DQ pt2 does for every op) instead of giving up; `int8_summary` lists them.
    ``gm`` is not changed (its train/eval mode is restored).

    Example (DigitsNet after fold_batchnorm, eliminate_dead_code, quantize)::

        lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
        lowered(x)               # float logits, within 1 output step of ir.gm.eval()(x)
        str(int8_summary(lowered))
        # 'x86 int8 kernels (fbgemm) via TorchScript: conv 3, linear 2 in int8; float between int8 ops:
        #  gap (adaptive_avg_pool)'
    """
    engine = engine or int8_engine()
    if engine is None:
        return Unsupported((f"this torch build has no x86 int8 engine (supported: "
                            f"{torch.backends.quantized.supported_engines})",))
    activation_quants = [n for n in gm.graph.nodes
                         if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuant)]
    if not activation_quants:
        return Unsupported(("the model has no quantized activations (no FakeQuant in the graph; weight-only or dynamic "
                            "quantization): nothing runs in int8",))
    was_training = gm.training
    gm.eval()
    try:
        with quantized_engine(engine), _quiet_torch_warnings(), torch.no_grad():
            kinds = _TensorKinds(gm)
            reference = kinds.run(*example_inputs)
            lowering = _Lowering(gm, kinds.tensor, float_islands)
            lowering.run()
            if lowering.problems:
                return Unsupported(tuple(lowering.problems))
            if not lowering.int8_kinds:
                return Unsupported(("no conv, linear, add, mul, matmul, cat or pool runs in int8: nothing to lower",))
            lowering.graph.lint()
            name = f"EffoptInt8Module_{_content_digest(lowering.root, lowering.graph)}"
            lowered = fx.GraphModule(lowering.root, lowering.graph, class_name=name).eval()
            lowered.meta[SUMMARY_KEY] = Int8Summary(tuple(lowering.int8_kinds), tuple(lowering.float_ops))
            failure = _check(lowered, example_inputs, reference, max_relative_error)
    finally:
        gm.train(was_training)
    return Unsupported((failure,)) if failure else lowered


def _content_digest(root: nn.Module, graph: fx.Graph) -> str:
    """12 hex digits of the lowered code and weights: the TorchScript class name's suffix.

    TorchScript renames (``___torch_mangle_N``) a class whose qualified name it has compiled
    before in this process, and the archive records the name; with one name per content, the
    class name does not depend on which other models the process saved before (an identical
    model saved twice still gets the renamed class the second time).
    """
    digest = hashlib.sha256(graph.python_code("self").src.encode())
    buffer = io.BytesIO()
    torch.save(root.state_dict(), buffer)
    digest.update(buffer.getvalue())
    return digest.hexdigest()[:12]


def _check(lowered: fx.GraphModule, inputs: Sequence[torch.Tensor], reference: Any,
           max_relative_error: float) -> str | None:
    """None if ``lowered`` runs and agrees with ``reference``; else what went wrong, naming the node."""
    runner = _NodeNamingInterpreter(lowered)
    try:
        out = runner.run(*inputs)
    except Exception as e:  # any kernel failure: the caller falls back to the Q/DQ artefact
        where = f" at node '{runner.current.name}'" if runner.current is not None else ""
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"the int8 module fails on the example inputs{where}: {type(e).__name__}: {first_line}"
    ref = [t.double() for t in tree_leaves(reference) if isinstance(t, torch.Tensor)]
    got = [t.double() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return "the int8 module's outputs do not have the fake-quant graph's shapes"
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, got))
    den = sum(float(a.pow(2).sum()) for a in ref)
    error = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    if not math.isfinite(error) or error > max_relative_error:
        return (f"the int8 module's outputs differ from the fake-quant graph by {error:.3g} (relative L2) on the "
                f"example inputs, over the {max_relative_error:g} allowed: the int8 kernels disagree with effopt's "
                "quantization here (on CPUs without VNNI, fbgemm's 16-bit pair sums may saturate)")
    return None


class _NodeNamingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _output_step(gm: fx.GraphModule) -> float | None:
    """The largest scale of the FakeQuants that feed the graph output (one output code), or None."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    steps = [float(m.frozen_scale) for a in out.all_input_nodes if a.op == "call_module"
             for m in [gm.get_submodule(str(a.target))] if isinstance(m, FakeQuant)]
    return max(steps) if steps else None


# -- serialization and agreement -------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTorchScript:
    """Where `save_torchscript` wrote the archive and how: ``"script"`` or, where TorchScript's
    compiler rejects a float op copied from the user's model, ``"trace"`` (checked at two batch sizes)."""

    path: Path
    method: str


def save_torchscript(module: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor]) -> SavedTorchScript:
    """Write the lowered module as a TorchScript archive (``model_int8.pt``) that needs only torch to run.

    ``torch.jit.script`` keeps every shape free; it rejects some Python-isms fx copies from the
    user's float ops (e.g. ``F.interpolate(x, scale_factor=2)``: an int where it wants a float),
    and then the module is traced instead. The lowered graph is straight-line fx code, so a
    trace records the same ops; sizes read with ``x.size(0)`` stay dynamic. Either way the
    saved module must reproduce ``module`` exactly on ``example_inputs`` and on a batch twice
    as large, else `EmitError`. Example::

        save_torchscript(lowered, out / "model_int8.pt", ir.example_inputs).method   # 'script'
    """
    path = Path(path)
    inputs = tuple(example_inputs)
    doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
    errors: list[str] = []
    with _quiet_torch_warnings(), torch.no_grad():
        for method in ("script", "trace"):
            try:
                compiled = torch.jit.script(module) if method == "script" else torch.jit.trace(module, inputs)
                for label, xs in (("the example inputs", inputs), ("a batch twice as large", doubled)):
                    if not _same_outputs(module(*xs), compiled(*xs)):
                        raise EmitError(f"the {method} differs from the int8 module on {label}")
                torch.jit.save(compiled, str(path))
                return SavedTorchScript(path, method)
            except Exception as e:  # TorchScript raises many unrelated types; try the next method
                text = str(e).strip()
                errors.append(f"{method}: {type(e).__name__}: {text.splitlines()[0] if text else ''}")
    raise EmitError(f"{path.name}: TorchScript cannot save the int8 module ({'; '.join(errors)}); "
                    "use model.pt2 instead")


def _same_outputs(a: Any, b: Any) -> bool:
    xs = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    ys = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(xs) == len(ys) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(xs, ys))


def int8_agreement(
    reference: nn.Module, int8: Callable[..., Any], batches: Iterable[Sequence[torch.Tensor]]
) -> Int8Agreement:
    """Compare the first output of ``int8`` with the fake-quant ``reference`` (eval mode) over ``batches``."""
    step = _output_step(reference) if isinstance(reference, fx.GraphModule) else None
    was_training = reference.training
    reference.eval()
    err, agree, total = 0.0, 0, 0
    try:
        with torch.no_grad(), _quiet_torch_warnings():
            for inputs in batches:
                r = next(t for t in tree_leaves(reference(*inputs)) if isinstance(t, torch.Tensor))
                o = next(t for t in tree_leaves(int8(*inputs)) if isinstance(t, torch.Tensor))
                err = max(err, float((r.float() - o.float()).abs().max()))
                if r.dim() == 2 and r.shape[1] > 1:
                    agree += int((r.argmax(1) == o.argmax(1)).sum())
                total += int(r.shape[0]) if r.dim() else 1
    finally:
        reference.train(was_training)
    top1 = agree / total if total and r.dim() == 2 and r.shape[1] > 1 else None
    return Int8Agreement(err, step, top1, total)

