"""Run an `IntegerProgram` on int8 NumPy arrays with integer arithmetic only (what the firmware computes).

Accumulators are int32 (the lowering proved they cannot overflow for any input); the 32×32-bit
requantization product is int64, as on the MCU, through
`effopt.optimizer.lower.integer.fixed_point.multiply_by_quantized_multiplier`. Example::

    program = lower_to_integer(ir.gm, ir.example_inputs)
    (logits_q,) = IntegerExecutor(program).run(*program.quantize_inputs(x))   # int8 codes
    integer_accuracy(program, x_test, y_test)                                  # e.g. 0.97
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from effopt.errors import EffoptError
from effopt.optimizer.lower.integer.fixed_point import INT8_MIN, INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier
from effopt.optimizer.lower.integer.program import (
    IntAdd,
    IntAvgPool,
    IntCat,
    IntClamp,
    IntConv,
    IntegerProgram,
    IntLinear,
    IntMatMul,
    IntMaxPool,
    IntMean,
    IntMul,
    IntPReLU,
    IntRequantize,
    IntReshape,
    IntSlice,
    IntSoftmax,
    IntTranspose,
    Pads,
)

__all__ = ["IntegerExecutor", "integer_accuracy"]


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
            IntTranspose: self._transpose, IntSlice: self._slice, IntPReLU: self._prelu, IntSoftmax: self._softmax,
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

    def _prelu(self, op: IntPReLU, env: dict[str, np.ndarray]) -> np.ndarray:
        x = self._centered(op, env[op.input], op.input_zero)
        acc = self._log(op.name, "shifted", x << np.int32(op.left_shift))  # |x| ≤ 255: below 2^30 by construction
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m, s = op.neg_multiplier.reshape(shape), op.neg_shift.reshape(shape)
        neg_acc = np.where(m < 0, -acc, acc).astype(np.int32)  # a negative slope: MBQM(−acc, −M0)
        neg = self._log(op.name, "scaled_neg", multiply_by_quantized_multiplier(neg_acc, np.abs(m), s))
        pos = self._log(op.name, "scaled_pos", multiply_by_quantized_multiplier(acc, op.pos_multiplier, op.pos_shift))
        y = np.where(x >= 0, pos, neg)
        return np.clip(y + np.int32(op.output_zero), op.act_min, op.act_max).astype(np.int8)

    def _softmax(self, op: IntSoftmax, env: dict[str, np.ndarray]) -> np.ndarray:
        x = env[op.input].astype(np.int32)
        d = self._log(op.name, "distance", x.max(axis=op.axis, keepdims=True) - x)  # 0 … span
        e = self._log(op.name, "exp", op.exp_table[d])
        total = self._log(op.name, "sum", e.sum(axis=op.axis, keepdims=True, dtype=np.int32))  # ≥ 2^bits
        y = self._log(op.name, "quotient", (np.int32(2 * op.inv_scale) * e + total) // (np.int32(2) * total))
        return np.clip(y + np.int32(op.output_zero), op.act_min, op.act_max).astype(np.int8)

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
