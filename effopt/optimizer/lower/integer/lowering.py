"""Lower a quantized fx graph to an integer-only program, and run that program bit-exactly in NumPy.

Int-only targets (``integer_only: true`` profiles such as ``cortex-m7``, i.e.
CMSIS-NN / TFLite Micro) keep every tensor as int8 codes and every accumulator
as int32. The one float step left is the real multiplier
``M = s_in·s_w / s_out`` that rescales an accumulator to the output's scale;
it becomes a fixed-point pair ``(M0, shift)`` with ``M = M0·2^−31·2^shift``
(`quantize_multiplier`), applied with the exact gemmlowp/TFLite integer
routine (`multiply_by_quantized_multiplier`).

Pipeline::

    fx graph that follows the quantized-graph contract
      (effopt.optimizer.quant.schemes: FakeQuant edges, QuantConv/QuantLinear)
        │ lower_to_integer(gm, example_inputs)      every integer parameter, or a
        ▼                                           PassError naming each float node
    IntegerProgram  (IntQuantizeInput → IntConv/IntAdd/... → IntDequantizeOutput)
        ├─ IntegerExecutor(program).run(int8 arrays)   NumPy integer arithmetic only
        ├─ reference_integer_model(program)            the same arithmetic in torch (cross-check)
        └─ effopt.optimizer.emit.c_header.write_c_header    weights + qparams for firmware

Worked example (one conv output channel): s_in = 0.02, s_w = 0.005,
s_out = 0.05 → M = 0.002 = 0.512·2^−8 → M0 = round(0.512·2^31) = 1099511628,
shift = −8. An accumulator of 12,345 becomes 12,345·0.002 = 24.69 → 25, and
25 + z_out is clamped to the activation range.

All activation tensors become int8: a uint8-style scheme (codes 0…255, zero
point z) is stored as ``q − 128`` with zero point ``z − 128`` (in general
``2^(bits−1)`` for unsigned schemes), which represents exactly the same real
values. Sub-8-bit codes live in int8 containers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from numpy.lib.stride_tricks import as_strided
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.errors import EffoptError, PassError, TraceError
from effopt.optimizer.quant.schemes import (
    FakeQuant,
    QScheme,
    QuantConv,
    QuantLinear,
    quantize_bias,
    quantize_values,
    worst_case_accumulator_bits,
)
from effopt.optimizer.lower.walk import QuantizedGraphWalk, call_arg

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN = -128
INT8_MAX = 127
#: TFLite's add/sub left shift: inputs are scaled up by 2^20 before rescaling, so that
#: the per-input multipliers (≤ 0.5) keep ~20 fractional bits of precision.
ADD_LEFT_SHIFT = 20

# -- fixed-point arithmetic (gemmlowp / TFLite) -----------------------------------------------------


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(M0, shift)`` with ``real ≈ M0·2^−31·2^shift``, M0 an int32 in [2^30, 2^31) (0 for real == 0).

    Same as TFLite's ``QuantizeMultiplier`` (tensorflow/lite/kernels/internal/
    quantization_util.cc): ``frexp`` splits ``real = q·2^shift`` with q in
    [0.5, 1), ``M0 = round(q·2^31)`` (half away from zero); a q that rounds up
    to 2^31 becomes 2^30 with shift + 1; a shift below −31 flushes to (0, 0).
    A negative shift is a right shift.

    >>> quantize_multiplier(0.75)
    (1610612736, 0)
    >>> quantize_multiplier(0.002)
    (1099511628, -8)
    """
    if not math.isfinite(real) or real < 0:
        raise EffoptError(f"quantize_multiplier: multiplier {real!r} must be finite and ≥ 0")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m0 = int(math.floor(q * (1 << 31) + 0.5))  # q > 0: round half away from zero
    if m0 == 1 << 31:
        m0 //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise EffoptError(f"quantize_multiplier: multiplier {real!r} ≥ 2^30 cannot be applied to an int32 accumulator")
    return m0, shift


def _trunc_div_pow2_31(v: np.ndarray) -> np.ndarray:
    """C's ``v / 2^31`` on int64 (truncation toward zero), as gemmlowp's ``ab_64 / (1ll << 31)``."""
    mag = np.abs(v) >> 31
    return np.where(v < 0, -mag, mag)


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64 arrays.

    ``(a·b + nudge) / 2^31`` truncated, nudge = 2^30 for a·b ≥ 0 else 1 − 2^30; the
    single overflow case a = b = −2^31 saturates to 2^31 − 1. The effect is
    round-to-nearest of a·b/2^31 with ties toward +∞ (0.5 → 1, −0.5 → 0).
    """
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = _trunc_div_pow2_31(ab + nudge)
    overflow = (a == b) & (a == INT32_MIN)
    return np.where(overflow, np.int64(INT32_MAX), high)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: x / 2^exponent rounded to nearest, ties away from zero.

    Bit form (as gemmlowp writes it): ``(x >> e) + (remainder > threshold)``
    with ``remainder = x & (2^e − 1)`` and ``threshold = (2^e − 1) >> 1`` plus
    1 when x < 0. E.g. 5 / 2 → 3, −5 / 2 → −3, −6 / 4 → −2.
    """
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> exponent) + (remainder > threshold).astype(np.int64)


def multiply_by_quantized_multiplier(acc: np.ndarray, m0: int | np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """``round(acc · M0·2^−31·2^shift)`` exactly as TFLite's ``MultiplyByQuantizedMultiplier`` (int32 result).

    Reference: tensorflow/lite/kernels/internal/common.h (and CMSIS-NN's
    ``arm_nn_requantize`` without ``CMSIS_NN_USE_SINGLE_ROUNDING``)::

        left  = max(shift, 0); right = max(−shift, 0)
        RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc · 2^left, M0), right)

    So rounding happens twice: the doubling high multiply rounds ties toward
    +∞, the final right shift rounds ties away from zero. ``acc · 2^left``
    must fit int32 (in C an overflow there is undefined); here it saturates.
    ``m0``/``shift`` broadcast against ``acc`` (per-channel arrays). Everything
    is computed in int64, as the 32×32→64-bit multiply of the MCU does.

    >>> multiply_by_quantized_multiplier(np.array([10, -10, 12345]), 1 << 30, -1)  # × 0.25
    array([   3,   -3, 3087], dtype=int32)

    (12345·0.25 = 3086.25, but the high multiply first rounds 6172.5 up to 6173,
    and the shift rounds 3086.5 away from zero: double rounding is off by at
    most 1, and it is what the firmware computes.)
    """
    x = np.asarray(acc)
    if x.dtype.kind not in "iu":
        raise EffoptError(f"multiply_by_quantized_multiplier: accumulator must be an integer array, got {x.dtype}")
    x = x.astype(np.int64)
    m = np.asarray(m0, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    left = np.maximum(s, 0)
    right = np.maximum(-s, 0)
    x = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m), right).astype(np.int32)


# -- the integer program ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QParams:
    """Scale, zero point and code range of one int8 tensor: real = (q − zero_point)·scale.

    ``scale`` is only for the float boundary (quantizing the sensor input,
    dequantizing the reported output) and for computing multipliers at
    lowering time; no integer op reads it.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float → int8 codes, bit-identical to torch's ``quantize_per_tensor`` (float32 ``x·(1/s)``, half-even)."""
        xf = np.asarray(x, dtype=np.float32)
        q = np.round(xf * np.float32(1.0 / self.scale)) + np.float32(self.zero_point)
        return np.clip(q, self.qmin, self.qmax).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """int8 codes → float32 values, as torch's ``dequantize_per_tensor`` computes them."""
        return ((np.asarray(q).astype(np.int32) - self.zero_point).astype(np.float32) * np.float32(self.scale))


@dataclass(frozen=True)
class TensorInfo:
    """One int8 tensor of the program; ``shape`` leaves out the batch dimension."""

    name: str
    shape: tuple[int, ...]
    qparams: QParams


Pads = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class IntQuantizeInput:
    """The only float → int step, at a model input: q = clamp(round(x/s) + z, qmin, qmax).

    It is not part of `IntegerProgram.ops` and `IntegerExecutor.run` does not
    execute it: on a device the caller (the firmware's sensor pipeline) hands
    over int8 codes, typically by folding 1/s into its own fixed-point
    scaling of raw sensor values. `IntegerProgram.quantize_inputs` does it in
    NumPy for testing and accuracy reports.
    """

    name: str      # the fx placeholder (model input) it quantizes
    output: str    # the int8 tensor it produces
    qparams: QParams
    kind: ClassVar[str] = "quantize_input"


@dataclass(frozen=True, eq=False)
class IntDequantizeOutput:
    """Optional last step for reporting: real = (q − z)·s of one model output (not run by the executor)."""

    name: str      # output name: ``output`` or ``output_<i>``
    input: str
    qparams: QParams
    kind: ClassVar[str] = "dequantize_output"


@dataclass(frozen=True, eq=False)
class IntConv:
    """acc = Σ (x − z_in)·w + b (int32); y = clamp(MBQM(acc, M0[c], shift[c]) + z_out, act_min, act_max).

    ``padding`` is (before, after) per spatial dim; padded positions hold the
    input zero point (real 0), so they add nothing to the accumulator. A fused
    ReLU/ReLU6/hardtanh is folded into [act_min, act_max].
    """

    name: str
    input: str
    output: str
    weight: np.ndarray       # int8 [C_out, C_in/groups, *kernel]
    bias: np.ndarray         # int32 [C_out], at scale s_in·s_w[c]
    multiplier: np.ndarray   # int32 [C_out]
    shift: np.ndarray        # int32 [C_out]
    input_zero: int
    output_zero: int
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]
    groups: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "conv"


@dataclass(frozen=True, eq=False)
class IntLinear:
    """As `IntConv` over the last axis: acc = (x − z_in) @ wᵀ + b, per-output-feature requantization."""

    name: str
    input: str
    output: str
    weight: np.ndarray       # int8 [out_features, in_features]
    bias: np.ndarray         # int32 [out_features]
    multiplier: np.ndarray   # int32 [out_features]
    shift: np.ndarray        # int32 [out_features]
    input_zero: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "linear"


@dataclass(frozen=True, eq=False)
class IntAdd:
    """TFLite's int8 add: both inputs rescaled to a common fixed-point accumulator, summed, requantized.

    a' = MBQM((q_a − z_a)·2^left_shift, M_a), b' likewise, with M_a = s_a/(2·max(s_a, s_b))
    and M_b = s_b/(2·max(s_a, s_b)) (both ≤ 0.5); y = clamp(MBQM(a' + b', M_out) + z_out)
    with M_out = 2·max(s_a, s_b)/(2^left_shift·s_out).
    """

    name: str
    inputs: tuple[str, str]
    output: str
    input_zeros: tuple[int, int]
    input_multipliers: tuple[int, int]
    input_shifts: tuple[int, int]
    left_shift: int
    output_multiplier: int
    output_shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "add"


@dataclass(frozen=True, eq=False)
class IntMul:
    """y = clamp(MBQM((q_a − z_a)·(q_b − z_b)·2^left_shift, M/2^left_shift) + z_out) with M = s_a·s_b/s_out."""

    name: str
    inputs: tuple[str, str]
    output: str
    input_zeros: tuple[int, int]
    left_shift: int
    multiplier: int
    shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "mul"


@dataclass(frozen=True, eq=False)
class IntMatMul:
    """acc = (q_a − z_a) @ (q_b − z_b) (int32, batched); y = clamp(MBQM(acc·2^left_shift, M/2^left_shift) + z_out).

    M = s_a·s_b/s_out.
    """

    name: str
    inputs: tuple[str, str]
    output: str
    input_zeros: tuple[int, int]
    left_shift: int
    multiplier: int
    shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "matmul"


@dataclass(frozen=True, eq=False)
class IntMaxPool:
    """Max over each window of int8 codes; padding holds −128 (never the max). Output keeps the input's qparams."""

    name: str
    input: str
    output: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]
    kind: ClassVar[str] = "max_pool"


@dataclass(frozen=True, eq=False)
class IntAvgPool:
    """acc = Σ_window (q − z_in) (int32); y = clamp(MBQM(acc·2^left_shift, M/2^left_shift) + z_out).

    M = s_in/(s_out·count). Only windows with one element count (``count``)
    lower; padding holds real 0.
    """

    name: str
    input: str
    output: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    count: int
    input_zero: int
    left_shift: int
    multiplier: int
    shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "avg_pool"


@dataclass(frozen=True, eq=False)
class IntMean:
    """acc = Σ over ``axes`` of (q − z_in) (int32); y = clamp(MBQM(acc·2^left_shift, M/2^left_shift) + z_out).

    M = s_in/(s_out·count).

    ``axes`` count the batch dimension (axis 0 is never reduced).
    """

    name: str
    input: str
    output: str
    axes: tuple[int, ...]
    keepdim: bool
    count: int
    input_zero: int
    left_shift: int
    multiplier: int
    shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "mean"


@dataclass(frozen=True, eq=False)
class IntCat:
    """Concatenation along ``axis``; input i is requantized: MBQM((q_i − z_i)·2^left_shift, M_i/2^left_shift) + z_out.

    M_i = s_i/s_out.
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    axis: int
    input_zeros: tuple[int, ...]
    left_shift: int
    multipliers: tuple[int, ...]
    shifts: tuple[int, ...]
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "cat"


@dataclass(frozen=True, eq=False)
class IntRequantize:
    """y = clamp(MBQM((q − z_in)·2^left_shift, M/2^left_shift) + z_out), M = s_in/s_out.

    A FakeQuant directly after an already-quantized tensor.
    """

    name: str
    input: str
    output: str
    input_zero: int
    left_shift: int
    multiplier: int
    shift: int
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "requantize"


@dataclass(frozen=True, eq=False)
class IntClamp:
    """y = clamp(q, act_min, act_max): a ReLU/ReLU6/hardtanh on a quantized tensor, same qparams."""

    name: str
    input: str
    output: str
    act_min: int
    act_max: int
    kind: ClassVar[str] = "clamp"


@dataclass(frozen=True, eq=False)
class IntReshape:
    """Flatten/view/reshape/squeeze/unsqueeze: no arithmetic; ``shape`` leaves out the batch dimension."""

    name: str
    input: str
    output: str
    shape: tuple[int, ...]
    kind: ClassVar[str] = "reshape"


@dataclass(frozen=True, eq=False)
class IntTranspose:
    """Permute/transpose: no arithmetic; ``perm`` includes the batch axis (always first)."""

    name: str
    input: str
    output: str
    perm: tuple[int, ...]
    kind: ClassVar[str] = "transpose"


@dataclass(frozen=True, eq=False)
class IntSlice:
    """One piece of a split/chunk: codes [start, stop) along ``axis`` (batch included); no arithmetic."""

    name: str
    input: str
    output: str
    axis: int
    start: int
    stop: int
    kind: ClassVar[str] = "slice"


IntOp = Union[IntConv, IntLinear, IntAdd, IntMul, IntMatMul, IntMaxPool, IntAvgPool, IntMean, IntCat,
              IntRequantize, IntClamp, IntReshape, IntTranspose, IntSlice]


@dataclass(frozen=True, eq=False)
class IntegerProgram:
    """An integer-only model: int8 inputs → ``ops`` in order → int8 outputs.

    ``inputs`` describe how each float model input becomes int8 (done by the
    caller), ``outputs`` how each int8 output reads as a real number.
    ``accumulator_bits`` is the worst case over conv/linear/matmul layers.
    """

    inputs: tuple[IntQuantizeInput, ...]
    ops: tuple[IntOp, ...]
    outputs: tuple[IntDequantizeOutput, ...]
    tensors: tuple[TensorInfo, ...]
    placeholders: tuple[str, ...]     # float model inputs, in call order
    accumulator_bits: int

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"integer program has no tensor {name!r}")

    def quantize_inputs(self, *xs: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        """Float model inputs (one per placeholder, in call order) → the int8 arrays `IntegerExecutor.run` takes."""
        if len(xs) != len(self.placeholders):
            raise EffoptError(f"integer program takes {len(self.placeholders)} input(s) "
                              f"({', '.join(self.placeholders)}), got {len(xs)}")
        by_name = {p: np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                   for p, x in zip(self.placeholders, xs)}
        return tuple(q.qparams.quantize(by_name[q.name]) for q in self.inputs)

    def dequantize_outputs(self, *qs: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(o.qparams.dequantize(q) for o, q in zip(self.outputs, qs))

    @property
    def weight_bytes(self) -> int:
        """Bytes of int8 weights plus int32 biases and requantization parameters."""
        total = 0
        for op in self.ops:
            for v in vars(op).values():
                if isinstance(v, np.ndarray):
                    total += v.nbytes
        return total


# -- lowering: fx graph → IntegerProgram ----------------------------------------------------------------

_FUSABLE = {"relu", "relu6", "hardtanh", "clamp"}
_RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
_ALIASES = {"dropout", "identity", "contiguous"}
_HINT = "keep it off the int-only path or choose a target with float support"


@dataclass(frozen=True)
class _Ref:
    """A node whose value is an int8 tensor of the program."""

    name: str
    qp: QParams
    shape: tuple[int, ...]    # without batch
    scheme: QScheme           # the FakeQuant scheme (for accumulator bounds)


@dataclass
class _Pending:
    """An integer op whose output qparams come from the FakeQuant that follows it."""

    node: fx.Node
    kind: str
    make: Callable[[QParams, str, int, int], IntOp]   # (out qparams, out tensor, act_min, act_max) → op
    act: tuple[float | None, float | None] | None = None
    act_node: fx.Node | None = None


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


_Value = Union[_Ref, _Pending, _Float, _Split, _Other]


def _span(qp: QParams) -> int:
    """The largest |q − z| a tensor can hold."""
    return max(qp.qmax - qp.zero_point, qp.zero_point - qp.qmin, 1)


def headroom_shift(max_abs_acc: int, real: float) -> int:
    """How far to shift a small accumulator left before requantizing it, so the rounding is exact.

    `multiply_by_quantized_multiplier` rounds twice; the first rounding (of
    acc·M0/2^31) is coarse when the final right shift is small, e.g. a rescale
    by M ≈ 0.25 maps acc = 1 to 1, not 0. Shifting acc left by L (staying
    below 2^30) and dividing M by 2^L moves that rounding L bits further down,
    as TFLite's add does with its fixed L = 20. L is also kept small enough
    that M/2^L does not flush to zero (shift ≥ −30). E.g. a requantize of
    int8 codes (|acc| ≤ 255, 8 bits) by 0.25 gets L = 22.
    """
    left = max(0, 30 - int(max_abs_acc).bit_length())
    if real > 0:
        left = min(left, max(0, math.floor(math.log2(real)) + 31))
    return left


def _fq_qparams(fq: FakeQuant) -> QParams:
    """The int8 qparams a per-tensor FakeQuant stores with (what its eval path uses after `sync`)."""
    s = fq.scheme
    offset = 2 ** (s.bits - 1) if not s.signed else 0
    scale = float(fq.scale.detach().abs().clamp(min=1e-12))
    return QParams(scale, int(fq.zero_point) - offset, s.qmin - offset, s.qmax - offset)


def _code_of(value: float, qp: QParams) -> int:
    """The code torch's quantize_per_tensor gives a real bound (float32 ``v·(1/s)``, half-even), unclamped."""
    return int(np.round(np.float32(value) * np.float32(1.0 / qp.scale))) + qp.zero_point


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and keeps each node's output shape(s), nothing else."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}
        self.failed_at: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed_at = self.failed_at or n
            raise
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(int(d) for d in result.shape)
        elif isinstance(result, (tuple, list)) and result and all(isinstance(t, torch.Tensor) for t in result):
            self.shapes[n] = tuple(tuple(int(d) for d in t.shape) for t in result)
        return result


class _Lowering(QuantizedGraphWalk[_Value]):
    """One walk over the graph in order; every problem is collected, then raised together."""

    def __init__(self, gm: fx.GraphModule, shapes: Mapping[fx.Node, Any], accumulator_bits: int) -> None:
        super().__init__(gm)
        self.shapes = shapes
        self.acc_limit = accumulator_bits
        self.ops: list[IntOp] = []
        self.inputs: list[IntQuantizeInput] = []
        self.outputs: list[IntDequantizeOutput] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.acc_bits = 0
        self.materialized: set[fx.Node] = set()

    # helpers -------------------------------------------------------------------------------------------
    def problem(self, n: fx.Node, kind: str, what: str) -> _Float:
        self.record_problem(n, kind, what)
        return _Float(n)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        s = self.shapes.get(n)
        if s is None or (s and isinstance(s[0], tuple)):
            raise TraceError(f"node '{n.name}': no tensor shape recorded; check the example inputs")
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
            elif isinstance(v, _Pending):
                return self.problem(v.node, v.kind, f"result reaches '{n.name}' without a FakeQuant: the int-only "
                                    "path needs exactly one FakeQuant after it (optionally after a fused relu)")
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
        if n not in self.shapes:
            return _Other()  # no tensor out (x.size(0), shape arithmetic): nothing to lower; a tensor op using it fails
        handler = {
            "add": self.add, "mul": self.mul, "matmul": self.matmul, "cat": self.cat, "mean": self.mean,
            "max_pool": self.max_pool, "adaptive_max_pool": self.max_pool,
            "avg_pool": self.avg_pool, "adaptive_avg_pool": self.avg_pool,
            "transpose": self.transpose, "permute": self.transpose, "t": self.transpose,
            "split": self.split, "chunk": self.split, "getitem": self.getitem,
        }.get(kind)
        if kind in _FUSABLE:
            return self.activation(n, kind)
        if kind in _RESHAPES:
            return self.reshape(n, kind)
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
        qp = _fq_qparams(fq)
        src = n.args[0]
        v = self.values.get(src) if isinstance(src, fx.Node) else None
        shape = self.shape(n)[1:]
        if isinstance(v, _Float) and v.is_input:
            self.add_tensor(n.name, shape, qp)
            self.inputs.append(IntQuantizeInput(src.name, n.name, qp))
            return _Ref(n.name, qp, shape, fq.scheme)
        if isinstance(v, _Float):  # the float region ends here; its producer is already listed
            return _Ref(n.name, qp, shape, fq.scheme)
        if isinstance(v, _Pending):
            if v.node in self.materialized:
                return self.problem(v.node, v.kind, "result is requantized by more than one FakeQuant: the int-only "
                                    "path needs exactly one FakeQuant after it")
            self.materialized.add(v.node)
            if v.act is not None and v.act_node is not None and len(v.act_node.users) != 1:
                return self.problem(v.act_node, self.kind(v.act_node), "is a fused activation with more than one "
                                    "user: only its FakeQuant may read it")
            lo, hi = self._act_range(v, qp)
            return self.emit_ref(v.make(qp, n.name, lo, hi), n, qp, fq.scheme)
        if isinstance(v, _Ref):
            if v.qp == qp:
                return v
            left, m0, sh = self._scaled_multiplier(n, v.qp.scale / qp.scale, _span(v.qp))
            op = IntRequantize(n.name, v.name, n.name, v.qp.zero_point, left, m0, sh, qp.zero_point, qp.qmin, qp.qmax)
            return self.emit_ref(op, n, qp, fq.scheme)
        return self.problem(n, "FakeQuant", f"quantizes '{getattr(src, 'name', src)}', which is not a tensor the "
                            "integer program computes (a constant or attribute)")

    def _act_range(self, p: _Pending, qp: QParams) -> tuple[int, int]:
        lo_code, hi_code = qp.qmin, qp.qmax
        if p.act is not None:
            lo, hi = p.act
            if lo is not None:
                lo_code = max(lo_code, _code_of(lo, qp))
            if hi is not None:
                hi_code = min(hi_code, _code_of(hi, qp))
        if lo_code > hi_code:
            hi_code = lo_code  # an activation range that excludes the whole output range: constant output
        return lo_code, hi_code

    def _multiplier(self, n: fx.Node, real: float) -> tuple[int, int]:
        try:
            return quantize_multiplier(real)
        except EffoptError as e:
            raise PassError(f"node '{n.name}': {e}") from e

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
                raise TraceError(f"node '{n.name}': linear output shape does not match its input")

            def make_linear(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
                m, s = self._channel_multipliers(n, s_in * w_scales / qp.scale)
                return IntLinear(n.name, x.name, out, weight, bias_np, m, s, z_in, qp.zero_point, lo, hi)

            return _Pending(n, kind, make_linear)
        conv = mod.conv
        if conv.padding_mode != "zeros":
            return self.problem(n, kind, f"uses padding_mode={conv.padding_mode!r}: only zero padding lowers")
        nd = w.dim() - 2
        rev = conv._reversed_padding_repeated_twice
        pads = tuple((int(rev[2 * (nd - 1 - i)]), int(rev[2 * (nd - 1 - i) + 1])) for i in range(nd))
        stride, dilation = _tuple(conv.stride, nd), _tuple(conv.dilation, nd)
        kernel = tuple(int(k) for k in w.shape[2:])
        in_sp, out_sp = self.shape(n.args[0])[2:], self.shape(n)[2:]
        got = tuple((i + lo + hi - d * (k - 1) - 1) // s + 1
                    for i, (lo, hi), d, k, s in zip(in_sp, pads, dilation, kernel, stride))
        if got != out_sp:
            raise TraceError(f"node '{n.name}': conv output {out_sp} does not match its parameters ({got})")

        def make_conv(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            m, s = self._channel_multipliers(n, s_in * w_scales / qp.scale)
            return IntConv(n.name, x.name, out, weight, bias_np, m, s, z_in, qp.zero_point, stride, pads, dilation,
                           int(conv.groups), lo, hi)

        return _Pending(n, kind, make_conv)

    def _channel_multipliers(self, n: fx.Node, reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._multiplier(n, float(r)) for r in reals]
        return np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32)

    # fused activations -----------------------------------------------------------------------------------------------
    def activation(self, n: fx.Node, kind: str) -> _Value:
        bounds = self._act_bounds(n, kind)
        if bounds is None:
            return self.problem(n, kind, f"has bounds that are not constants: {_HINT}")
        src = n.args[0] if n.args else n.kwargs.get("input")
        v = self.values.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, _Pending) and v.act is None:
            if len(v.node.users) != 1:
                return self.problem(v.node, v.kind, "result is used by more than its fused activation before the "
                                    "FakeQuant: the int-only path needs exactly one FakeQuant after it")
            return _Pending(v.node, v.kind, v.make, bounds, n)
        refs = self.operands(n, kind, [src])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        lo = x.qp.qmin if bounds[0] is None else max(x.qp.qmin, _code_of(bounds[0], x.qp))
        hi = x.qp.qmax if bounds[1] is None else min(x.qp.qmax, _code_of(bounds[1], x.qp))
        return self.emit_ref(IntClamp(n.name, x.name, n.name, lo, max(lo, hi)), n, x.qp, x.scheme)

    def _act_bounds(self, n: fx.Node, kind: str) -> tuple[float | None, float | None] | None:
        mod = self.module(n)
        if kind == "relu":
            return 0.0, None
        if kind == "relu6":
            return 0.0, 6.0
        if kind == "hardtanh":
            if mod is not None:
                return float(mod.min_val), float(mod.max_val)
            lo = call_arg(n, 1, "min_val", -1.0)
            hi = call_arg(n, 2, "max_val", 1.0)
        else:  # clamp / clamp_min / clamp_max
            name = getattr(n.target, "__name__", str(n.target))
            if "clamp_min" in name:
                lo, hi = call_arg(n, 1, "min", None), None
            elif "clamp_max" in name:
                lo, hi = None, call_arg(n, 1, "max", None)
            else:
                lo, hi = call_arg(n, 1, "min", None), call_arg(n, 2, "max", None)
        if any(isinstance(b, fx.Node) for b in (lo, hi)):
            return None
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))

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
                raise PassError(f"node '{n.name}' (add): output scale {qp.scale:g} is below 2^-{ADD_LEFT_SHIFT} of "
                                "the input scales; recalibrate the FakeQuant after it")
            mo, so = self._multiplier(n, real_out)
            return IntAdd(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), (ma, mb), (sa, sb),
                          ADD_LEFT_SHIFT, mo, so, qp.zero_point, lo, hi)

        return _Pending(n, kind, make)

    def mul(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, list(n.args[:2]) if len(n.args) >= 2 else [])
        if isinstance(refs, _Float):
            return refs
        a, b = refs

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, a.qp.scale * b.qp.scale / qp.scale, _span(a.qp) * _span(b.qp))
            return IntMul(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), left, m, s,
                          qp.zero_point, lo, hi)

        return _Pending(n, kind, make)

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
        worst = int(k * _span(a.qp) * _span(b.qp))
        bits = worst.bit_length() + 1
        self.acc_bits = max(self.acc_bits, bits)
        if bits > self.acc_limit:
            return self.problem(n, kind, f"needs a {bits}-bit accumulator in the worst case, over the target's "
                                f"{self.acc_limit} bits")

        def make(qp: QParams, out: str, lo: int, hi: int) -> IntOp:
            left, m, s = self._scaled_multiplier(n, a.qp.scale * b.qp.scale / qp.scale, worst)
            return IntMatMul(n.name, (a.name, b.name), out, (a.qp.zero_point, b.qp.zero_point), left, m, s,
                             qp.zero_point, lo, hi)

        return _Pending(n, kind, make)

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
            left = min(headroom_shift(_span(r.qp), r.qp.scale / qp.scale) for r in refs)
            pairs = [self._multiplier(n, r.qp.scale / qp.scale / 2**left) for r in refs]
            return IntCat(n.name, tuple(r.name for r in refs), out, axis, tuple(r.qp.zero_point for r in refs), left,
                          tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), qp.zero_point, lo, hi)

        return _Pending(n, kind, make)

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
            left, m, s = self._scaled_multiplier(n, x.qp.scale / (qp.scale * count), count * _span(x.qp))
            return IntMean(n.name, x.name, out, axes, keepdim, count, x.qp.zero_point, left, m, s, qp.zero_point,
                           lo, hi)

        return _Pending(n, kind, make)

    # pooling --------------------------------------------------------------------------------------------------------
    def _pool_geometry(self, n: fx.Node, kind: str) -> tuple[tuple[int, ...], ...] | str:
        """(kernel, stride, pad_lo, dilation) of a pool node, or why it cannot lower."""
        in_sp, out_sp = self.shape(n.args[0])[2:], self.shape(n)[2:]
        nd = len(in_sp)
        mod = self.module(n)
        if kind.startswith("adaptive"):
            if any(i % o for i, o in zip(in_sp, out_sp)):
                return f"has output size {out_sp} that does not divide the input {in_sp}: windows differ in size"
            kernel = tuple(i // o for i, o in zip(in_sp, out_sp))
            return kernel, kernel, (0,) * nd, (1,) * nd
        get = (lambda attr, pos, default: getattr(mod, attr, default)) if mod is not None else \
            (lambda attr, pos, default: call_arg(n, pos, attr, default))
        kernel = _tuple(get("kernel_size", 1, None), nd)
        stride_v = get("stride", 2, None)
        stride = kernel if stride_v in (None, (), []) else _tuple(stride_v, nd)
        pad = _tuple(get("padding", 3, 0), nd)
        dilation = _tuple(get("dilation", 4, 1), nd) if kind == "max_pool" else (1,) * nd
        if kind == "max_pool" and get("return_indices", 6, False):
            return "returns indices: only the pooled values lower"
        return kernel, stride, pad, dilation

    def _pads(self, n: fx.Node, kernel: tuple[int, ...], stride: tuple[int, ...], lo: tuple[int, ...],
              dilation: tuple[int, ...]) -> Pads:
        """(before, after) padding reproducing torch's output size (ceil_mode may need more after)."""
        in_sp, out_sp = self.shape(n.args[0])[2:], self.shape(n)[2:]
        pads = []
        for i, o, k, s, p, d in zip(in_sp, out_sp, kernel, stride, lo, dilation):
            after = max((o - 1) * s + d * (k - 1) + 1 - i - p, 0)
            if (i + p + after - d * (k - 1) - 1) // s + 1 != o:
                raise TraceError(f"node '{n.name}': pool output {out_sp} does not match its parameters")
            pads.append((p, after))
        return tuple(pads)

    def max_pool(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        geo = self._pool_geometry(n, kind)
        if isinstance(geo, str):
            return self.problem(n, kind, geo)
        kernel, stride, lo, dilation = geo
        op = IntMaxPool(n.name, x.name, n.name, kernel, stride, self._pads(n, kernel, stride, lo, dilation), dilation)
        return self.emit_ref(op, n, x.qp, x.scheme)

    def avg_pool(self, n: fx.Node, kind: str) -> _Value:
        refs = self.operands(n, kind, [n.args[0]])
        if isinstance(refs, _Float):
            return refs
        (x,) = refs
        geo = self._pool_geometry(n, kind)
        if isinstance(geo, str):
            return self.problem(n, kind, geo)
        kernel, stride, lo, dilation = geo
        pads = self._pads(n, kernel, stride, lo, dilation)
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
            left, m, s = self._scaled_multiplier(n, x.qp.scale / (qp.scale * count), window * _span(x.qp))
            return IntAvgPool(n.name, x.name, out, kernel, stride, pads, count, x.qp.zero_point, left, m, s,
                              qp.zero_point, lo_code, hi_code)

        return _Pending(n, kind, make)

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
        shapes = self.shapes.get(n)
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
            elif isinstance(v, _Pending):
                self.problem(v.node, v.kind, "result is returned without a FakeQuant: quantize the model output "
                             "(the int-only path has no float output)")
            elif isinstance(v, _Float) and v.is_input:
                self.problem(a, "placeholder", "is returned as a float model input; " + _HINT)
            elif not isinstance(v, _Float):
                self.problem(a, self.kind(a) if a.op.startswith("call") else a.op,
                             "is returned but is not an int8 tensor; " + _HINT)


def lower_to_integer(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                     accumulator_bits: int = 32) -> IntegerProgram:
    """Every integer parameter of a contract-following quantized graph, as an `IntegerProgram`.

    ``gm`` follows the quantized-graph contract of `effopt.optimizer.quant.schemes`
    (FakeQuant, QuantConv and QuantLinear as leaf ``call_module`` nodes);
    ``example_inputs`` fix every non-batch shape. ``accumulator_bits`` is the
    target's accumulator width (the profile's ``accumulator_bits``).

    Raises `PassError` listing every node that cannot be integer: float ops
    between quantized ones (softmax, layer_norm, gelu, ...), float conv/linear,
    uncalibrated FakeQuants, asymmetric weights, accumulators wider than the
    target's, conv/linear results that reach another op without a FakeQuant.
    """
    recorder = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as e:
        where = f" at node '{recorder.failed_at.name}'" if recorder.failed_at is not None else ""
        raise TraceError(f"integer lowering: running the example inputs failed{where}: {type(e).__name__}: {e}") from e
    low = _Lowering(gm, recorder.shapes, accumulator_bits)
    low.run()
    if low.problems:
        raise PassError(
            f"cannot lower to an int-only program: {len(low.problems)} node(s) cannot be made integer:\n  - "
            + "\n  - ".join(low.problems)
        )
    if not low.inputs:
        raise PassError("cannot lower to an int-only program: no model input is quantized by a FakeQuant "
                        "(put one right after each input placeholder)")
    placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    return IntegerProgram(tuple(low.inputs), tuple(low.ops), tuple(low.outputs), tuple(low.tensors.values()),
                          placeholders, low.acc_bits)


# -- the NumPy integer executor ---------------------------------------------------------------------------


def _windows(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    """A read-only [N, C, *out, *kernel] view of every window of the (already padded) [N, C, *spatial] array."""
    sp = x.shape[2:]
    out = tuple((s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(sp, kernel, stride, dilation))
    strides = (x.strides[0], x.strides[1],
               *(x.strides[2 + i] * stride[i] for i in range(len(sp))),
               *(x.strides[2 + i] * dilation[i] for i in range(len(sp))))
    return as_strided(x, (*x.shape[:2], *out, *kernel), strides, writeable=False)


def _pad(x: np.ndarray, pads: Pads, value: int) -> np.ndarray:
    if not any(lo or hi for lo, hi in pads):
        return x
    return np.pad(x, [(0, 0), (0, 0), *pads], constant_values=value)


class IntegerExecutor:
    """Runs an `IntegerProgram` on int8 NumPy arrays with integer arithmetic only.

    Accumulators are int32 (the lowering proved they cannot overflow for any
    input); the 32×32-bit requantization product is int64, as on the MCU. With
    ``debug=True`` every intermediate array is logged in ``dtype_log`` as
    ``(op name, what, dtype)`` so a test can show no float ever appears.

    >>> # ex = IntegerExecutor(program); (logits_q,) = ex.run(*program.quantize_inputs(x))
    """

    def __init__(self, program: IntegerProgram, debug: bool = False) -> None:
        self.program = program
        self.debug = debug
        self.dtype_log: list[tuple[str, str, str]] = []
        self._run_op: dict[type, Callable[[Any, dict[str, np.ndarray]], np.ndarray]] = {
            IntConv: self._conv, IntLinear: self._linear, IntAdd: self._add, IntMul: self._mul,
            IntMatMul: self._matmul, IntMaxPool: self._max_pool, IntAvgPool: self._avg_pool, IntMean: self._mean,
            IntCat: self._cat, IntRequantize: self._requantize_op, IntClamp: self._clamp, IntReshape: self._reshape,
            IntTranspose: self._transpose, IntSlice: self._slice,
        }

    def _log(self, op: str, what: str, a: np.ndarray) -> np.ndarray:
        if self.debug:
            self.dtype_log.append((op, what, str(a.dtype)))
        return a

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """int8 arrays, one per `IntegerProgram.inputs` entry → int8 arrays, one per output."""
        p = self.program
        if len(inputs) != len(p.inputs):
            raise EffoptError(f"integer program takes {len(p.inputs)} int8 input(s), got {len(inputs)}")
        env: dict[str, np.ndarray] = {}
        for spec, x in zip(p.inputs, inputs):
            x = np.asarray(x)
            if x.dtype != np.int8:
                raise EffoptError(f"input '{spec.name}' must be int8 codes (use program.quantize_inputs), "
                                  f"got {x.dtype}")
            if x.shape[1:] != p.tensor(spec.output).shape:
                raise EffoptError(f"input '{spec.name}' has shape {x.shape[1:]} per sample, the program was lowered "
                                  f"for {p.tensor(spec.output).shape}")
            env[spec.output] = self._log(spec.name, "input", x)
        for op in p.ops:
            out = self._run_op[type(op)](op, env)
            env[op.output] = self._log(op.name, "output", out)
        return tuple(env[o.input] for o in p.outputs)

    def run_float(self, *xs: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        """Quantize float inputs, run the integer program, dequantize: for accuracy reports (float only at the ends)."""
        return self.program.dequantize_outputs(*self.run(*self.program.quantize_inputs(*xs)))

    # helpers -------------------------------------------------------------------------------------------------
    def _centered(self, op: Any, x: np.ndarray, zero: int) -> np.ndarray:
        return self._log(op.name, "centered", x.astype(np.int32) - np.int32(zero))

    def _requant(self, op: Any, acc: np.ndarray, m0: Any, shift: Any, zero: int, lo: int, hi: int,
                 left_shift: int = 0) -> np.ndarray:
        self._log(op.name, "accumulator", acc)
        if left_shift:
            acc = self._log(op.name, "shifted", acc << np.int32(left_shift))  # |acc| < 2^(30 − L) by construction
        scaled = self._log(op.name, "scaled", multiply_by_quantized_multiplier(acc, m0, shift))
        return np.clip(scaled + np.int32(zero), lo, hi).astype(np.int8)

    @staticmethod
    def _check_acc(op: Any, acc64: np.ndarray) -> np.ndarray:
        if acc64.size and (acc64.max() > INT32_MAX or acc64.min() < INT32_MIN):
            raise EffoptError(f"op '{op.name}': int32 accumulator overflow (the lowering's worst-case bound was wrong)")
        return acc64.astype(np.int32)

    # ops -----------------------------------------------------------------------------------------------------
    def _conv(self, op: IntConv, env: dict[str, np.ndarray]) -> np.ndarray:
        x = _pad(self._centered(op, env[op.input], op.input_zero), op.padding, 0)  # 0 here = z_in before centering
        kernel = op.weight.shape[2:]
        nd = len(kernel)
        win = self._log(op.name, "windows", _windows(x, kernel, op.stride, op.dilation))
        n, c = x.shape[:2]
        out_sp = win.shape[2:2 + nd]
        g = op.groups
        cout = op.weight.shape[0]
        # [N, G, Cg, *out, *k] → [G, N·out, Cg·k]
        win = win.reshape(n, g, c // g, *out_sp, *kernel)
        order = (1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
        cols = win.transpose(order).reshape(g, n * math.prod(out_sp), (c // g) * math.prod(kernel))
        w = op.weight.astype(np.int32).reshape(g, cout // g, -1)
        acc = np.einsum("gmk,gok->gmo", cols, w)  # int32 in, int32 accumulate (bounded by the lowering)
        acc = acc + op.bias.reshape(g, 1, cout // g)
        acc = acc.reshape(g, n, *out_sp, cout // g)
        acc = np.moveaxis(acc, -1, 1).reshape(g * (cout // g), n, *out_sp)  # [G·Cog, N, *out] == [Cout, N, *out]
        acc = np.ascontiguousarray(np.moveaxis(acc, 0, 1))
        shape = (1, cout) + (1,) * nd
        return self._requant(op, acc, op.multiplier.reshape(shape), op.shift.reshape(shape), op.output_zero,
                             op.act_min, op.act_max)

    def _linear(self, op: IntLinear, env: dict[str, np.ndarray]) -> np.ndarray:
        x = self._centered(op, env[op.input], op.input_zero)
        acc = np.matmul(x, op.weight.astype(np.int32).T) + op.bias
        return self._requant(op, acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max)

    def _add(self, op: IntAdd, env: dict[str, np.ndarray]) -> np.ndarray:
        a = self._centered(op, env[op.inputs[0]], op.input_zeros[0]) << np.int32(op.left_shift)
        b = self._centered(op, env[op.inputs[1]], op.input_zeros[1]) << np.int32(op.left_shift)
        a = multiply_by_quantized_multiplier(a, op.input_multipliers[0], op.input_shifts[0])
        b = multiply_by_quantized_multiplier(b, op.input_multipliers[1], op.input_shifts[1])
        self._log(op.name, "scaled_a", a)
        self._log(op.name, "scaled_b", b)
        return self._requant(op, a + b, op.output_multiplier, op.output_shift, op.output_zero, op.act_min, op.act_max)

    def _mul(self, op: IntMul, env: dict[str, np.ndarray]) -> np.ndarray:
        a = self._centered(op, env[op.inputs[0]], op.input_zeros[0])
        b = self._centered(op, env[op.inputs[1]], op.input_zeros[1])
        return self._requant(op, a * b, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max, op.left_shift)

    def _matmul(self, op: IntMatMul, env: dict[str, np.ndarray]) -> np.ndarray:
        a = self._centered(op, env[op.inputs[0]], op.input_zeros[0])
        b = self._centered(op, env[op.inputs[1]], op.input_zeros[1])
        return self._requant(op, np.matmul(a, b), op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max,
                             op.left_shift)

    def _max_pool(self, op: IntMaxPool, env: dict[str, np.ndarray]) -> np.ndarray:
        x = _pad(env[op.input], op.padding, INT8_MIN)
        win = self._log(op.name, "windows", _windows(x, op.kernel, op.stride, op.dilation))
        nd = len(op.kernel)
        return win.max(axis=tuple(range(2 + nd, 2 + 2 * nd)))

    def _avg_pool(self, op: IntAvgPool, env: dict[str, np.ndarray]) -> np.ndarray:
        x = _pad(self._centered(op, env[op.input], op.input_zero), op.padding, 0)
        win = self._log(op.name, "windows", _windows(x, op.kernel, op.stride, (1,) * len(op.kernel)))
        nd = len(op.kernel)
        acc = win.sum(axis=tuple(range(2 + nd, 2 + 2 * nd)), dtype=np.int32)
        return self._requant(op, acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max, op.left_shift)

    def _mean(self, op: IntMean, env: dict[str, np.ndarray]) -> np.ndarray:
        x = self._centered(op, env[op.input], op.input_zero)
        acc = x.sum(axis=op.axes, keepdims=op.keepdim, dtype=np.int32)
        return self._requant(op, acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max, op.left_shift)

    def _cat(self, op: IntCat, env: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        for name, z, m, s in zip(op.inputs, op.input_zeros, op.multipliers, op.shifts):
            parts.append(self._requant(op, self._centered(op, env[name], z), m, s, op.output_zero, op.act_min,
                                       op.act_max, op.left_shift))
        return np.concatenate(parts, axis=op.axis)

    def _requantize_op(self, op: IntRequantize, env: dict[str, np.ndarray]) -> np.ndarray:
        x = self._centered(op, env[op.input], op.input_zero)
        return self._requant(op, x, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max, op.left_shift)

    def _clamp(self, op: IntClamp, env: dict[str, np.ndarray]) -> np.ndarray:
        return np.clip(env[op.input], op.act_min, op.act_max).astype(np.int8)

    def _reshape(self, op: IntReshape, env: dict[str, np.ndarray]) -> np.ndarray:
        x = env[op.input]
        return x.reshape((x.shape[0], *op.shape))

    def _transpose(self, op: IntTranspose, env: dict[str, np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(env[op.input].transpose(op.perm))

    def _slice(self, op: IntSlice, env: dict[str, np.ndarray]) -> np.ndarray:
        x = env[op.input]
        index = [slice(None)] * x.ndim
        index[op.axis] = slice(op.start, op.stop)
        return np.ascontiguousarray(x[tuple(index)])


def integer_accuracy(program: IntegerProgram, inputs: torch.Tensor | np.ndarray,
                     labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy of the integer program on float ``inputs`` (quantized at the input, argmax of the int8 output).

    The argmax of int8 codes equals the argmax of the dequantized logits (the
    scale is positive), so no float is needed after the input.
    """
    (q,) = IntegerExecutor(program).run(*program.quantize_inputs(inputs))
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return float((q.reshape(q.shape[0], -1).argmax(axis=1) == y).mean())


# -- the torch reference: the same integer arithmetic, independently written ------------------------------------


def _torch_mbqm(x: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """`multiply_by_quantized_multiplier` in torch int64, from the rounding definitions (not gemmlowp's bit form)."""
    x = x.to(torch.int64)
    m = torch.as_tensor(m0, dtype=torch.int64)
    s = torch.as_tensor(shift, dtype=torch.int64)
    left, right = s.clamp(min=0), (-s).clamp(min=0)
    x = (x * (torch.ones_like(left) << left)).clamp(INT32_MIN, INT32_MAX)
    ab = x * m
    high = torch.div(ab + torch.where(ab >= 0, 1 << 30, 1 - (1 << 30)), 1 << 31, rounding_mode="trunc")
    high = torch.where((x == INT32_MIN) & (m == INT32_MIN), torch.full_like(high, INT32_MAX), high)
    # round(high / 2^right), ties away from zero: sign · floor((|high| + 2^(right−1)) / 2^right)
    div = torch.ones_like(right) << right
    half = torch.where(right > 0, div // 2, torch.zeros_like(div))
    return torch.sign(high) * torch.div(high.abs() + half, div, rounding_mode="floor")


class _IntegerReference(nn.Module):
    """Evaluates an `IntegerProgram` with torch ops: float64 convolutions (exact for these ranges), int64 sums."""

    def __init__(self, program: IntegerProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = {}
        for spec, x in zip(self.program.inputs, inputs):
            env[spec.output] = torch.as_tensor(x).to(torch.int64)
        for op in self.program.ops:
            env[op.output] = getattr(self, f"_{op.kind}")(op, env)
        return tuple(env[o.input].to(torch.int8) for o in self.program.outputs)

    @staticmethod
    def _finish(acc: torch.Tensor, m0: Any, shift: Any, zero: int, lo: int, hi: int) -> torch.Tensor:
        return (_torch_mbqm(acc, m0, shift) + zero).clamp(lo, hi)

    @staticmethod
    def _as_int64(y: torch.Tensor) -> torch.Tensor:
        if y.numel() and (not torch.equal(y.round(), y) or float(y.abs().max()) >= 2.0**53):
            raise EffoptError("integer reference: a float64 sum was not an exact integer")
        return y.to(torch.int64)

    def _conv(self, op: IntConv, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = (env[op.input] - op.input_zero).double()
        nd = op.weight.ndim - 2
        x = F.pad(x, [p for lo_hi in reversed(op.padding) for p in lo_hi])
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        y = conv(x, torch.from_numpy(op.weight).double(), None, op.stride, 0, op.dilation, op.groups)
        acc = self._as_int64(y) + torch.from_numpy(op.bias).to(torch.int64).reshape(1, -1, *([1] * nd))
        shape = (1, -1) + (1,) * nd
        m, s = torch.from_numpy(op.multiplier).reshape(shape), torch.from_numpy(op.shift).reshape(shape)
        return self._finish(acc, m, s, op.output_zero, op.act_min, op.act_max)

    def _linear(self, op: IntLinear, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = (env[op.input] - op.input_zero).double()
        acc = self._as_int64(F.linear(x, torch.from_numpy(op.weight).double()))
        acc = acc + torch.from_numpy(op.bias).to(torch.int64)
        return self._finish(acc, torch.from_numpy(op.multiplier), torch.from_numpy(op.shift), op.output_zero,
                            op.act_min, op.act_max)

    def _add(self, op: IntAdd, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = _torch_mbqm((env[op.inputs[0]] - op.input_zeros[0]) * 2**op.left_shift, op.input_multipliers[0],
                        op.input_shifts[0])
        b = _torch_mbqm((env[op.inputs[1]] - op.input_zeros[1]) * 2**op.left_shift, op.input_multipliers[1],
                        op.input_shifts[1])
        return self._finish(a + b, op.output_multiplier, op.output_shift, op.output_zero, op.act_min, op.act_max)

    def _mul(self, op: IntMul, env: dict[str, torch.Tensor]) -> torch.Tensor:
        acc = (env[op.inputs[0]] - op.input_zeros[0]) * (env[op.inputs[1]] - op.input_zeros[1]) * 2**op.left_shift
        return self._finish(acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max)

    def _matmul(self, op: IntMatMul, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = (env[op.inputs[0]] - op.input_zeros[0]).double()
        b = (env[op.inputs[1]] - op.input_zeros[1]).double()
        acc = self._as_int64(a @ b) * 2**op.left_shift
        return self._finish(acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max)

    def _max_pool(self, op: IntMaxPool, env: dict[str, torch.Tensor]) -> torch.Tensor:
        nd = len(op.kernel)
        x = F.pad(env[op.input].double(), [p for lo_hi in reversed(op.padding) for p in lo_hi], value=float(INT8_MIN))
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, op.kernel, op.stride, 0, op.dilation).to(torch.int64)

    def _window_sum(self, x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                    pads: Pads) -> torch.Tensor:
        nd = len(kernel)
        x = F.pad(x.double(), [p for lo_hi in reversed(pads) for p in lo_hi])
        ones = torch.ones((x.shape[1], 1, *kernel), dtype=torch.float64)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return self._as_int64(conv(x, ones, None, stride, 0, 1, x.shape[1]))

    def _avg_pool(self, op: IntAvgPool, env: dict[str, torch.Tensor]) -> torch.Tensor:
        acc = self._window_sum(env[op.input] - op.input_zero, op.kernel, op.stride, op.padding) * 2**op.left_shift
        return self._finish(acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max)

    def _mean(self, op: IntMean, env: dict[str, torch.Tensor]) -> torch.Tensor:
        acc = (env[op.input] - op.input_zero).sum(dim=op.axes, keepdim=op.keepdim) * 2**op.left_shift
        return self._finish(acc, op.multiplier, op.shift, op.output_zero, op.act_min, op.act_max)

    def _cat(self, op: IntCat, env: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self._finish((env[n] - z) * 2**op.left_shift, m, s, op.output_zero, op.act_min, op.act_max)
                 for n, z, m, s in zip(op.inputs, op.input_zeros, op.multipliers, op.shifts)]
        return torch.cat(parts, dim=op.axis)

    def _requantize(self, op: IntRequantize, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._finish((env[op.input] - op.input_zero) * 2**op.left_shift, op.multiplier, op.shift,
                            op.output_zero, op.act_min, op.act_max)

    def _clamp(self, op: IntClamp, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[op.input].clamp(op.act_min, op.act_max)

    def _reshape(self, op: IntReshape, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[op.input]
        return x.reshape(x.shape[0], *op.shape)

    def _transpose(self, op: IntTranspose, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[op.input].permute(*op.perm)

    def _slice(self, op: IntSlice, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[op.input].narrow(op.axis, op.start, op.stop - op.start)


def reference_integer_model(program: IntegerProgram) -> nn.Module:
    """A torch module computing the program's integer arithmetic exactly (int8 tensors in, int8 tensors out).

    Written independently of `IntegerExecutor` (torch convolutions in float64,
    which are exact for int8×int8 sums below 2^53, and the requantization from
    its rounding definitions), so executor == reference bit for bit is a real
    cross-check of both.
    """
    return _IntegerReference(program)
