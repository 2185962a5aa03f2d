"""Lower a quantized fx graph to an `IntegerProgram`: every integer parameter, or every reason why not.

The walk (`effopt.optimizer.lower.walk`) reads the graph in order under the quantized-graph
contract (`effopt.optimizer.quant.contract`): each site ``op → [activation] → FakeQuant``
becomes one integer op whose output takes the FakeQuant's qparams, with the activation folded
into its output clamp ``[act_min, act_max]``; pass-through ops become data moves (`IntReshape`,
`IntTranspose`, `IntMaxPool`, aliases), a tied getitem of a split piece an `IntSlice`, and a
FakeQuant on an already int8 value an `IntRequantize` (nothing when the qparams are equal, as for
a tied FakeQuant). The one float step, ``M = s_in·s_w / s_out``, becomes a fixed-point
multiplier (`effopt.optimizer.lower.integer.fixed_point`).

Worked example (one conv output channel, relu6 fused): s_in = 0.02, s_w = 0.005, s_out = 0.05
→ M = 0.002 → (M0, shift) = (1099511628, −8); the output clamp is relu6's [0, 6] in codes,
[z_out, z_out + 120]. An accumulator of 12,345 becomes 12,345·0.002 = 24.69 → 25, then 25 + z_out
clamped to that range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from effopt.errors import EffoptError, LoweringError, TraceError
from effopt.optimizer.lower.integer.activations import prelu_op, prelu_slopes, softmax_op, softmax_output_problem
from effopt.optimizer.lower.integer.geometry import Window, conv_window, pool_window
from effopt.optimizer.lower.integer.fixed_point import ADD_LEFT_SHIFT, INT32_MAX, headroom_shift, quantize_multiplier
from effopt.optimizer.lower.integer.program import (
    IntAdd,
    IntAvgPool,
    IntCat,
    IntClamp,
    IntConv,
    IntDequantizeOutput,
    IntegerProgram,
    IntLinear,
    IntMatMul,
    IntMaxPool,
    IntMean,
    IntMul,
    IntOp,
    IntQuantizeInput,
    IntRequantize,
    IntReshape,
    IntSlice,
    IntTranspose,
    QParams,
    TensorInfo,
)
from effopt.optimizer.lower.walk import Pending, QuantizedGraphWalk
from effopt.optimizer.quant.contract import (FUSED_ACTIVATIONS, INTEGER_ACTIVATION_KINDS, Bounds, Mismatch,
                                             activation_bounds, call_arg, integer_activation_refusal)
from effopt.optimizer.quant.schemes import (
    FakeQuant,
    QScheme,
    QuantConv,
    QuantLinear,
    quantize_bias,
    quantize_values,
    worst_case_accumulator_bits,
)

__all__ = ["lower_to_integer"]


# How each pass-through kind of the contract lowers (a test checks these cover PASS_THROUGH_KINDS).
_RESHAPES = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"})
_ALIASES = frozenset({"dropout", "identity", "contiguous"})
_TRANSPOSES = frozenset({"transpose", "permute", "t"})
_MAX_POOLS = frozenset({"max_pool", "adaptive_max_pool"})
_HINT = "keep it off the int-only path or choose a target with float support"


@dataclass(frozen=True)
class _Ref:
    """A node whose value is an int8 tensor of the program."""

    name: str
    qp: QParams
    shape: tuple[int, ...]    # without batch
    scheme: QScheme           # the FakeQuant scheme (for accumulator bounds)


@dataclass(frozen=True)
class _Float:
    """A value computed in float (a problem already reported, or the raw model input)."""

    node: fx.Node
    is_input: bool = False


@dataclass(frozen=True)
class _Split:
    """The tuple a split/chunk of an int8 tensor returns (pieces become `IntSlice` ops at getitem)."""

    ref: _Ref
    axis: int
    bounds: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Other:
    """A non-tensor value (a size, a constant)."""


_Value = Union[_Ref, Pending, _Float, _Split, _Other]
# A Pending's build: (output qparams, output tensor name, act_min, act_max) → the op.
_Make = Callable[[QParams, str, int, int], IntOp]


def _act_range(bounds: Bounds | None, qp: QParams) -> tuple[int, int]:
    """The codes [act_min, act_max] an activation's real bounds leave of ``qp``'s range (all of it without one).

    E.g. relu6 (0, 6) on s = 0.05, z = −128: [−128, −8]. A range that excludes the whole output
    range gives a constant output (act_min == act_max).
    """
    lo_code, hi_code = qp.qmin, qp.qmax
    if bounds is not None:
        if not math.isinf(bounds.lo):
            lo_code = max(lo_code, qp.code_of(bounds.lo))
        if not math.isinf(bounds.hi):
            hi_code = min(hi_code, qp.code_of(bounds.hi))
    return lo_code, max(lo_code, hi_code)


class _Lowering(QuantizedGraphWalk[_Value]):
    """One walk over the graph in order; every problem is collected, then raised together."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], accumulator_bits: int) -> None:
        super().__init__(gm, example_inputs)
        self.acc_limit = accumulator_bits
        self.ops: list[IntOp] = []
        self.inputs: list[IntQuantizeInput] = []
        self.outputs: list[IntDequantizeOutput] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.acc_bits = 0

    # helpers -------------------------------------------------------------------------------------------
    def problem(self, n: fx.Node, kind: str, what: str) -> _Float:
        self.record_problem(n, kind, what)
        return _Float(n)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        """The shape (batch first) of the tensor ``n`` yields, from its facts."""
        s = self.tensor_shape(n)
        if s is None:
            raise LoweringError(f"node '{n.name}': no tensor shape recorded; check the example inputs")
        return s

    def add_tensor(self, name: str, shape: tuple[int, ...], qp: QParams) -> str:
        self.tensors[name] = TensorInfo(name, tuple(shape), qp)
        return name

    def emit_ref(self, op: IntOp, out: fx.Node, qp: QParams, scheme: QScheme) -> _Ref:
        self.ops.append(op)
        shape = self.shape(out)[1:]
        self.add_tensor(op.output, shape, qp)
        return _Ref(op.output, qp, shape, scheme)

    def operands(self, n: fx.Node, kind: str, args: Sequence[Any]) -> list[_Ref] | _Float:
        """The int8 operands of an integer op, or the problem that stops it (reported once)."""
        refs: list[_Ref] = []
        for a in args:
            if not isinstance(a, fx.Node):
                return self.problem(n, kind, f"has a constant operand {a!r}: only tensor-tensor {kind} has an "
                                    f"integer kernel here; {_HINT}")
            v = self.values[a]
            if isinstance(v, _Ref):
                refs.append(v)
            elif isinstance(v, _Float) and v.is_input:
                return self.problem(n, kind, f"reads the float model input '{a.name}' directly: put a FakeQuant "
                                    "after the input")
            elif isinstance(v, _Float):
                return _Float(n)  # the float producer is already listed
            else:
                return self.problem(n, kind, f"reads '{a.name}', which is not an int8 tensor; {_HINT}")
        return refs

    # the walk (QuantizedGraphWalk.run calls these) ------------------------------------------------------
    def placeholder(self, n: fx.Node) -> _Value:
        return _Float(n, is_input=True)

    def get_attr(self, n: fx.Node) -> _Value:
        return _Other()

    def other_op(self, n: fx.Node, kind: str) -> _Value:
        if not self.output_specs(n):
            return _Other()  # no tensor out (x.size(0), shape arithmetic): nothing to lower; a tensor op using it fails
        handler = {
            "add": self.add, "mul": self.mul, "matmul": self.matmul, "cat": self.cat, "mean": self.mean,
            "avg_pool": self.avg_pool, "adaptive_avg_pool": self.avg_pool,
            "split": self.split, "chunk": self.split, "getitem": self.getitem,
        }.get(kind)
        if kind in FUSED_ACTIVATIONS:  # not fused into a site: it clamps the codes of an int8 value
            return self.activation(n, kind)
        if kind in INTEGER_ACTIVATION_KINDS:
            return self.integer_activation(n, kind)
        if kind in _RESHAPES:
            return self.reshape(n, kind)
        if kind in _TRANSPOSES:
            return self.transpose(n, kind)
        if kind in _MAX_POOLS:
            return self.max_pool(n, kind)
        if kind in _ALIASES:
            refs = self.operands(n, kind, [n.args[0]])
            return refs if isinstance(refs, _Float) else refs[0]
        if handler is not None:
            return handler(n, kind)
        if kind in ("conv", "linear", "conv_transpose"):
            return self.problem(n, kind, f"is a float {kind} (not a QuantConv/QuantLinear with calibrated weights): "
                                "quantize it, or choose a target with float support")
        return self.problem(n, kind, f"has no integer implementation on an int-only target: {_HINT}")

    # FakeQuant: where outputs get their qparams ---------------------------------------------------------------
    def fake_quant(self, n: fx.Node, fq: FakeQuant) -> _Value:
        if fq.observer is not None or not fq.calibrated:
            return self.problem(n, "FakeQuant", "is not calibrated: run calibration before lowering")
        if getattr(fq, "enabled", True) is False:
            return self.problem(n, "FakeQuant", "is disabled (its layer was kept in float, e.g. by mixed precision): "
                                f"{_HINT}")
        if fq.scheme.axis is not None:
            return self.problem(n, "FakeQuant", f"quantizes an activation per channel (axis={fq.scheme.axis}): "
                                "int-only kernels need one scale per tensor")
        qp = QParams.of(fq)
        src = n.args[0]
        v = self.values.get(src) if isinstance(src, fx.Node) else None
        shape = self.shape(n)[1:]
        if isinstance(v, _Float) and v.is_input:
            self.add_tensor(n.name, shape, qp)
            self.inputs.append(IntQuantizeInput(src.name, n.name, qp))
            return _Ref(n.name, qp, shape, fq.scheme)
        if isinstance(v, _Float):  # the float region ends here; its producer is already listed
            return _Ref(n.name, qp, shape, fq.scheme)
        if isinstance(v, Pending) and v.site is not None:  # the end of a site: the op writes this grid
            lo, hi = _act_range(v.site.bounds, qp)
            return self.emit_ref(v.build(qp, n.name, lo, hi), n, qp, fq.scheme)
        if isinstance(v, _Ref):
            if v.qp == qp:
                return v
            left, m0, sh = self._scaled_multiplier(n, v.qp.scale / qp.scale, v.qp.span)
            op = IntRequantize(n.name, v.name, n.name, v.qp.zero_point, left, m0, sh, qp.zero_point, qp.qmin, qp.qmax)
            return self.emit_ref(op, n, qp, fq.scheme)
        return self.problem(n, "FakeQuant", f"quantizes '{getattr(src, 'name', src)}', which is not a tensor the "
                            "integer program computes (a constant or attribute)")

    def _multiplier(self, n: fx.Node, real: float) -> tuple[int, int]:
        try:
            return quantize_multiplier(real)
        except EffoptError as e:
            raise LoweringError(f"node '{n.name}': {e}") from e

    def _scaled_multiplier(self, n: fx.Node, real: float, max_abs_acc: int) -> tuple[int, int, int]:
        """(left_shift, M0, shift) for a small accumulator: see `headroom_shift`."""
        left = headroom_shift(max_abs_acc, real)
        return (left, *self._multiplier(n, real / 2**left))

    # conv / linear --------------------------------------------------------------------------------------------
    def weighted(self, n: fx.Node, mod: QuantConv | QuantLinear) -> _Value:
        kind = "conv" if isinstance(mod, QuantConv) else "linear"
        wq = mod.weight_quant
        if getattr(mod, "compute_dtype", "int8") != "int8" or getattr(wq, "enabled", True) is False:
            return self.problem(n, kind, f"was kept in float by the quantize pass (compute_dtype "
                                f"{getattr(mod, 'compute_dtype', '?')}): {_HINT}")
        if wq.observer is not None or not wq.calibrated:
            return self.problem(n, kind, "has an uncalibrated weight quantizer: run calibrate_weight before lowering")
        refs = self.operands(n, kind, [n.args[0]] if n.args else [])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        w = mod.weight.detach()
        ws = wq.scheme
        scale = wq.scale.detach().float().reshape(-1)
        zero = wq.zero_point.detach().reshape(-1)
        if ws.axis is not None and ws.axis != 0:
            return self.problem(n, kind, f"quantizes its weight per channel along axis {ws.axis}: int-only kernels "
                                "take one scale per output channel (axis 0)")
        if ws.axis is None:
            codes = quantize_values(w, scale.reshape(()), zero.reshape(()), ws)
            scale = scale.expand(w.shape[0]).clone()
            zero = zero.expand(w.shape[0]).clone()
        else:
            codes = quantize_values(w, scale, zero, ws)
        offset = 2 ** (ws.bits - 1) if not ws.signed else 0
        codes = codes.to(torch.int32) - offset
        zero = zero.to(torch.int32) - offset
        if bool((zero != 0).any()):
            return self.problem(n, kind, "has asymmetric weights (zero point ≠ 0): int-only kernels need symmetric "
                                "weights; quantize the weights symmetrically")
        bias = getattr(mod, "bias", None)
        b = bias.detach() if bias is not None else torch.zeros(w.shape[0])
        bq = quantize_bias(b, torch.tensor(x.qp.scale, dtype=torch.float64), scale)
        bits = worst_case_accumulator_bits(codes, x.scheme, bq)
        self.acc_bits = max(self.acc_bits, bits)
        if bits > self.acc_limit:
            return self.problem(n, kind, f"needs a {bits}-bit accumulator in the worst case, over the target's "
                                f"{self.acc_limit} bits: use fewer weight or activation bits, or split the layer")
        weight = codes.numpy().astype(np.int8)
        bias_np = bq.numpy().astype(np.int32)
        w_scales = scale.double().numpy()
        s_in, z_in = x.qp.scale, x.qp.zero_point
        if kind == "linear":
            if self.shape(n)[:-1] != self.shape(n.args[0])[:-1]:
                raise LoweringError(f"node '{n.name}': linear output shape does not match its input")

            def make_linear(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
                m, s = self._channel_multipliers(n, s_in * w_scales / qp.scale)
                return IntLinear(n.name, x.name, out, weight, bias_np, m, s, z_in, qp.zero_point, lo, hi)

            return Pending(n, kind, make_linear)
        conv = mod.conv
        if conv.padding_mode != "zeros":
            return self.problem(n, kind, f"uses padding_mode={conv.padding_mode!r}: only zero padding lowers")
        win = conv_window(n.name, conv, tuple(int(k) for k in w.shape[2:]), self.shape(n.args[0])[2:],
                          self.shape(n)[2:])

        def make_conv(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            m, s = self._channel_multipliers(n, s_in * w_scales / qp.scale)
            return IntConv(n.name, x.name, out, weight, bias_np, m, s, z_in, qp.zero_point, win.stride, win.padding,
                           win.dilation, int(conv.groups), lo, hi)

        return Pending(n, kind, make_conv)

    def _channel_multipliers(self, n: fx.Node, reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._multiplier(n, float(r)) for r in reals]
        return np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32)

    # activations on an int8 value ------------------------------------------------------------------------------
    def activation(self, n: fx.Node, kind: str) -> _Value:
        """A relu/relu6/hardtanh/clamp outside a site: it clamps the codes, same qparams (`IntClamp`)."""
        bounds = activation_bounds(n, self.gm)
        if isinstance(bounds, Mismatch):
            return self.problem(bounds.node, bounds.kind, f"{bounds.what}; {_HINT}")
        refs = self.operands(n, kind, [n.args[0] if n.args else n.kwargs.get("input")])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        lo, hi = _act_range(bounds, x.qp)
        return self.emit_ref(IntClamp(n.name, x.name, n.name, lo, hi), n, x.qp, x.scheme)

    def integer_activation(self, n: fx.Node, kind: str) -> _Value:
        """prelu / softmax over channels (contract rule 7): a site like add's, built by `activations`."""
        why = integer_activation_refusal(n, self.gm, len(self.shape(n)))
        why = why or (softmax_output_problem(n, self.gm) if kind == "softmax" else None)
        refs = self.problem(n, kind, why) if why else self.operands(n, kind, [call_arg(n, 0, "input", None)])
        if isinstance(refs, _Float):
            return refs
        (x,), channels = refs, self.shape(n)[1]
        if kind == "softmax":
            return Pending(n, kind, lambda qp, out, lo, hi: softmax_op(n.name, x.name, x.qp, 1, channels, qp, out,
                                                                       lo, hi))
        slopes = prelu_slopes(n, self.gm)
        if slopes.size not in (1, channels):
            return self.problem(n, kind, f"has {slopes.size} slopes for {channels} channels")
        return Pending(n, kind, lambda qp, out, lo, hi: prelu_op(n.name, x.name, x.qp, slopes, qp, out, lo, hi))

    # elementwise / reductions --------------------------------------------------------------------------------------
    def add(self, n: fx.Node, kind: str) -> _Value:
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            return self.problem(n, kind, f"has alpha={alpha}: {_HINT}")
        refs = self.operands(n, kind, [n.args[0], n.args[1]] if len(n.args) >= 2 else [])
        if isinstance(refs, _Float):
            return refs
        a, b = refs
        twice_max = 2.0 * max(a.qp.scale, b.qp.scale)
        ma, sa = self._multiplier(n, a.qp.scale / twice_max)
        mb, sb = self._multiplier(n, b.qp.scale / twice_max)
        span = max(a.qp.qmax - a.qp.qmin, b.qp.qmax - b.qp.qmin)
        if span << ADD_LEFT_SHIFT > INT32_MAX:
            return self.problem(n, kind, f"inputs span {span} codes, too wide for the 2^{ADD_LEFT_SHIFT} add "
                                "accumulator: use ≤ 8-bit activations")

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            real_out = twice_max / ((1 << ADD_LEFT_SHIFT) * qp.scale)
            if real_out >= 1.0:
                raise LoweringError(f"node '{n.name}' (add): output scale {qp.scale:g} is below 2^-{ADD_LEFT_SHIFT} of "
                                "the input scales; recalibrate the FakeQuant after it")
            mo, so = self._multiplier(n, real_out)
            return IntAdd(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), (ma, mb), (sa, sb),
                          ADD_LEFT_SHIFT, mo, so, qp.zero_point, lo, hi)

        return Pending(n, kind, make)

    def mul(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, list(n.args[:2]) if len(n.args) >= 2 else [])
        if isinstance(refs, _Float):
            return refs
        a, b = refs

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, a.qp.scale * b.qp.scale / qp.scale, a.qp.span * b.qp.span)
            return IntMul(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), left, m, s,
                          qp.zero_point, lo, hi)

        return Pending(n, kind, make)

    def matmul(self, n: fx.Node, kind: str) -> _Value:
        name = getattr(n.target, "__name__", str(n.target))
        if name not in ("matmul", "bmm", "mm") or len(n.args) < 2:
            return self.problem(n, kind, f"({name}) has no integer implementation on an int-only target: {_HINT}")
        refs = self.operands(n, kind, list(n.args[:2]))
        if isinstance(refs, _Float):
            return refs
        a, b = refs
        if len(a.shape) < 1 or len(b.shape) < 2:
            return self.problem(n, kind, "multiplies a vector: only batched matrix products lower")
        k = self.shape(n.args[0])[-1]
        worst = int(k * a.qp.span * b.qp.span)
        bits = worst.bit_length() + 1
        self.acc_bits = max(self.acc_bits, bits)
        if bits > self.acc_limit:
            return self.problem(n, kind, f"needs a {bits}-bit accumulator in the worst case, over the target's "
                                f"{self.acc_limit} bits")

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, a.qp.scale * b.qp.scale / qp.scale, worst)
            return IntMatMul(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), left, m, s,
                             qp.zero_point, lo, hi)

        return Pending(n, kind, make)

    def cat(self, n: fx.Node, kind: str) -> _Value:
        name = getattr(n.target, "__name__", str(n.target))
        tensors = call_arg(n, 0, "tensors", ())
        if name == "stack" or not isinstance(tensors, (list, tuple)):
            return self.problem(n, kind, f"({name}) has no integer implementation on an int-only target: {_HINT}")
        refs = self.operands(n, kind, list(tensors))
        if isinstance(refs, _Float):
            return refs
        ndim = len(self.shape(n))
        axis = int(call_arg(n, 1, "dim", 0)) % ndim
        if axis == 0:
            return self.problem(n, kind, "concatenates along the batch axis: the integer program is batch-agnostic")

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left = min(headroom_shift(r.qp.span, r.qp.scale / qp.scale) for r in refs)
            pairs = [self._multiplier(n, r.qp.scale / qp.scale / 2**left) for r in refs]
            return IntCat(n.name, tuple(r.name for r in refs), out, axis, tuple(r.qp.zero_point for r in refs), left,
                          tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), qp.zero_point, lo, hi)

        return Pending(n, kind, make)

    def mean(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        in_shape = self.shape(n.args[0])
        dims = call_arg(n, 1, "dim", None)
        if dims is None:
            return self.problem(n, kind, "reduces over every axis including the batch: give explicit dims")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not all(isinstance(d, int) for d in dims):
            return self.problem(n, kind, "has non-constant dims")
        axes = tuple(sorted({int(d) % len(in_shape) for d in dims}))
        if 0 in axes:
            return self.problem(n, kind, "reduces over the batch axis: the integer program is batch-agnostic")
        keepdim = bool(call_arg(n, 2, "keepdim", False))
        count = math.prod(in_shape[a] for a in axes)

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, x.qp.scale / (qp.scale * count), count * x.qp.span)
            return IntMean(n.name, x.name, out, axes, keepdim, count, x.qp.zero_point, left, m, s, qp.zero_point,
                           lo, hi)

        return Pending(n, kind, make)

    # pooling --------------------------------------------------------------------------------------------------------
    def _pool_window(self, n: fx.Node, kind: str) -> Window | str:
        """The pool's `Window` (`geometry.pool_window`), or why it cannot lower."""
        mod = self.module(n)

        def param(attr: str, pos: int, default: Any) -> Any:
            return getattr(mod, attr, default) if mod is not None else call_arg(n, pos, attr, default)

        return pool_window(n.name, kind, param, self.shape(n.args[0])[2:], self.shape(n)[2:])

    def _pool_operand(self, n: fx.Node, kind: str) -> tuple[Any, Any] | _Value:
        """The pooled input's reference and the pool window, or the value to return instead
        (a float input stays float; a window the integer ops cannot express is a problem)."""
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        win = self._pool_window(n, kind)
        if isinstance(win, str):
            return self.problem(n, kind, win)
        return refs[0], win

    def max_pool(self, n: fx.Node, kind: str) -> _Value:
        pooled = self._pool_operand(n, kind)
        if not isinstance(pooled, tuple):
            return pooled
        x, win = pooled
        op = IntMaxPool(n.name, x.name, n.name, win.kernel, win.stride, win.padding, win.dilation)
        return self.emit_ref(op, n, x.qp, x.scheme)

    def avg_pool(self, n: fx.Node, kind: str) -> _Value:
        pooled = self._pool_operand(n, kind)
        if not isinstance(pooled, tuple):
            return pooled
        x, win = pooled
        kernel, stride, pads = win.kernel, win.stride, win.padding
        mod = self.module(n)
        if kind == "adaptive_avg_pool":
            include_pad, divisor = True, None
        elif mod is not None:
            include_pad, divisor = mod.count_include_pad, getattr(mod, "divisor_override", None)
        else:
            include_pad, divisor = call_arg(n, 5, "count_include_pad", True), call_arg(n, 6, "divisor_override", None)
        overhang = any(after > before for before, after in pads)
        if divisor is not None:
            count = int(divisor)
        elif overhang or (not include_pad and any(b for b, _ in pads)):
            return self.problem(n, kind, "averages windows of different sizes (padding with count_include_pad=False "
                                "or ceil_mode): only equal-size windows lower")
        else:
            count = math.prod(kernel)

        window = math.prod(kernel)

        def make(qp: QParams, out: str, lo_code: int, hi_code: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, x.qp.scale / (qp.scale * count), window * x.qp.span)
            return IntAvgPool(n.name, x.name, out, kernel, stride, pads, count, x.qp.zero_point, left, m, s,
                              qp.zero_point, lo_code, hi_code)

        return Pending(n, kind, make)

    # data movement --------------------------------------------------------------------------------------------------
    def reshape(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        in_shape, out_shape = self.shape(n.args[0]), self.shape(n)
        if not out_shape or out_shape[0] != in_shape[0]:
            return self.problem(n, kind, "changes the batch dimension: the integer program is batch-agnostic")
        return self.emit_ref(IntReshape(n.name, x.name, n.name, out_shape[1:]), n, x.qp, x.scheme)

    def transpose(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        ndim = len(self.shape(n.args[0]))
        perm = list(range(ndim))
        if kind == "permute":
            first = call_arg(n, 1, "dims", ())
            dims = first if isinstance(first, (list, tuple)) else n.args[1:]  # x.permute(0, 2, 1) or ((0, 2, 1))
            perm = [int(d) % ndim for d in dims]
        elif kind == "t":
            perm[-1], perm[-2] = perm[-2], perm[-1]
        else:
            d0, d1 = int(call_arg(n, 1, "dim0", 0)) % ndim, int(call_arg(n, 2, "dim1", 1)) % ndim
            perm[d0], perm[d1] = perm[d1], perm[d0]
        if perm[0] != 0:
            return self.problem(n, kind, "moves the batch axis: the integer program is batch-agnostic")
        return self.emit_ref(IntTranspose(n.name, x.name, n.name, tuple(perm)), n, x.qp, x.scheme)

    def split(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        shapes = [spec.shape for spec in self.output_specs(n)]
        ndim = len(self.shape(n.args[0]))
        axis = int(call_arg(n, 2, "dim", 0)) % ndim
        if not shapes or axis == 0:
            return self.problem(n, kind, "splits along the batch axis or returns no tensors")
        bounds, start = [], 0
        for s in shapes:
            bounds.append((start, start + s[axis]))
            start += s[axis]
        return _Split(x, axis, tuple(bounds))

    def getitem(self, n: fx.Node, kind: str) -> _Value:
        src = n.args[0]
        v = self.values.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, _Split) and isinstance(n.args[1], int):
            start, stop = v.bounds[n.args[1]]
            return self.emit_ref(IntSlice(n.name, v.ref.name, n.name, v.axis, start, stop), n, v.ref.qp, v.ref.scheme)
        if isinstance(v, _Float):
            return _Float(n)
        return self.problem(n, kind, f"(indexing) has no integer implementation on an int-only target: {_HINT}")

    # the graph output --------------------------------------------------------------------------------------
    def output(self, n: fx.Node) -> None:
        leaves = [a for a in tree_leaves(n.args[0]) if isinstance(a, fx.Node)]
        for i, a in enumerate(leaves):
            v = self.values[a]
            name = "output" if len(leaves) == 1 else f"output_{i}"
            if isinstance(v, _Ref):
                self.outputs.append(IntDequantizeOutput(name, v.name, v.qp))
            elif isinstance(v, _Float) and v.is_input:
                self.problem(a, "placeholder", "is returned as a float model input; " + _HINT)
            elif not isinstance(v, _Float):
                self.problem(a, self.kind(a) if a.op.startswith("call") else a.op,
                             "is returned but is not an int8 tensor; " + _HINT)


def lower_to_integer(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                     accumulator_bits: int = 32) -> IntegerProgram:
    """Every integer parameter of a contract-following quantized graph, as an `IntegerProgram`.

    ``gm`` follows the quantized-graph contract of `effopt.optimizer.quant.contract`
    (FakeQuant, QuantConv and QuantLinear as leaf ``call_module`` nodes); shapes come from
    its facts, annotated with ``example_inputs`` if it has none (the batch size does not
    matter: the program is batch-agnostic). ``accumulator_bits`` is the target's
    accumulator width (the profile's ``accumulator_bits``).

    Raises `LoweringError` listing every node that cannot be integer: float ops
    between quantized ones (layer_norm, gelu, a softmax not over channels, ...), float conv/linear,
    uncalibrated FakeQuants, asymmetric weights, accumulators wider than the
    target's, conv/linear results that reach another op without a FakeQuant.
    """
    try:
        low = _Lowering(gm, example_inputs, accumulator_bits)
    except TraceError as e:  # shape propagation (annotate) failed on the example inputs
        raise LoweringError(f"integer lowering: {e}") from e
    low.run()
    if low.problems:
        raise LoweringError(
            f"cannot lower to an int-only program: {len(low.problems)} node(s) cannot be made integer:\n  - "
            + "\n  - ".join(low.problems)
        )
    if not low.inputs:
        raise LoweringError("cannot lower to an int-only program: no model input is quantized by a FakeQuant "
                        "(put one right after each input placeholder)")
    placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    return IntegerProgram(tuple(low.inputs), tuple(low.ops), tuple(low.outputs), tuple(low.tensors.values()),
                          placeholders, low.acc_bits)
