"""The integer program: int8 tensors with their qparams, and the ops of an int-only network as data.

`effopt.optimizer.lower.integer.lowering.lower_to_integer` fills these in from a quantized fx
graph; `IntegerExecutor` (NumPy), `reference_integer_model` (torch) and the C header emitter
(`effopt.optimizer.emit.c_header`) read them. Every op is a frozen dataclass holding only
integers (weights int8, biases and multipliers int32): no float is left once a program exists,
apart from the scales at the model's input and output boundary.

All activation tensors are int8: a uint8-style scheme (codes 0…255, zero point z) is stored as
``q − 128`` with zero point ``z − 128``, which represents exactly the same real values. E.g. a
ReLU output calibrated over [0, 6] (s = 6/255, z = 0) becomes codes −128…127 with zero point −128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np
import torch

from effopt.errors import EffoptError
from effopt.optimizer.quant.schemes import FakeQuant

__all__ = [
    "IntAdd",
    "IntAvgPool",
    "IntCat",
    "IntClamp",
    "IntConv",
    "IntDequantizeOutput",
    "IntLinear",
    "IntMatMul",
    "IntMaxPool",
    "IntMean",
    "IntMul",
    "IntOp",
    "IntPReLU",
    "IntQuantizeInput",
    "IntRequantize",
    "IntReshape",
    "IntSlice",
    "IntSoftmax",
    "IntTranspose",
    "IntegerProgram",
    "Pads",
    "QParams",
    "TensorInfo",
]


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

    def code_of(self, value: float) -> int:
        """The code ``quantize`` gives one real value (float32 ``v·(1/s)``, half-even), not clamped."""
        return int(np.round(np.float32(value) * np.float32(1.0 / self.scale))) + self.zero_point

    @property
    def span(self) -> int:
        """The largest |q − z| a tensor can hold (at least 1): the bound accumulator sizes are computed from."""
        return max(self.qmax - self.zero_point, self.zero_point - self.qmin, 1)

    @classmethod
    def of(cls, fq: FakeQuant) -> QParams:
        """The int8 qparams a per-tensor FakeQuant stores with (what its eval path uses after `sync`).

        An unsigned scheme moves by 2^(bits−1): uint8 z = 128 over [0, 255] is int8 z = 0 over [−128, 127].
        """
        s = fq.scheme
        offset = 2 ** (s.bits - 1) if not s.signed else 0
        scale = float(fq.scale.detach().abs().clamp(min=1e-12))
        return cls(scale, int(fq.zero_point) - offset, s.qmin - offset, s.qmax - offset)


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


@dataclass(frozen=True, eq=False)
class IntPReLU:
    """TFLite's int8 PReLU: one multiplier for x ≥ z_in, one per channel (axis 1) for x < z_in.

    acc = (q − z_in)·2^left_shift; y = clamp(MBQM(acc, M_pos) + z_out) where q ≥ z_in, else
    clamp(MBQM(acc, M_neg[c]) + z_out), with M_pos = s_in/(s_out·2^left_shift) and
    M_neg[c] = s_in·α_c/(s_out·2^left_shift). A negative slope α_c < 0 stores a negative
    ``neg_multiplier[c]``; kernels apply it as MBQM(−acc, −neg_multiplier[c]) (TFLite's MBQM
    takes a multiplier ≥ 0). One slope (``nn.PReLU()``) is one entry, broadcast over channels.

    E.g. s_in = s_out = 0.05, α = 0.25, z_in = z_out = 0: q = −40 (−2.0) → −10 (−0.5); q = 40 → 40.
    """

    name: str
    input: str
    output: str
    input_zero: int
    left_shift: int
    pos_multiplier: int
    pos_shift: int
    neg_multiplier: np.ndarray   # int32 [C] or [1]
    neg_shift: np.ndarray        # int32 [C] or [1]
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "prelu"


@dataclass(frozen=True, eq=False)
class IntSoftmax:
    """Softmax over ``axis`` (the channel axis, 1) with a lookup table: no float at run time.

    d = max_axis(q) − q ∈ [0, len(exp_table) − 1]; e = exp_table[d], where
    exp_table[d] = round(2^table_bits · exp(−s_in·d)) was computed at lowering time;
    Σ = sum_axis(e) (int32); y = clamp(⌊(2·inv_scale·e + Σ) / (2·Σ)⌋ + z_out, act_min, act_max),
    i.e. round(inv_scale·e/Σ) with ties up: the probability in steps of 1/inv_scale (1/256).
    The lowering picks ``table_bits`` so that 2·inv_scale·e + Σ fits int32.

    E.g. s_in = 0.1, codes (10, 0) → d = (0, 10), e = (2^21, 771_499), Σ = 2_868_651:
    y + 128 = (187, 69), p ≈ (0.731, 0.269) (float: 0.7311, 0.2689).
    """

    name: str
    input: str
    output: str
    axis: int
    exp_table: np.ndarray        # int32 [span + 1], indexed by max − q
    table_bits: int
    inv_scale: int               # 1/s_out (256)
    output_zero: int
    act_min: int
    act_max: int
    kind: ClassVar[str] = "softmax"


IntOp = Union[IntConv, IntLinear, IntAdd, IntMul, IntMatMul, IntMaxPool, IntAvgPool, IntMean, IntCat,
              IntRequantize, IntClamp, IntReshape, IntTranspose, IntSlice, IntPReLU, IntSoftmax]


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
