"""An independent torch evaluation of an `IntegerProgram`: the cross-check of `IntegerExecutor`.

Written without the executor's code (torch convolutions in float64, exact for int8×int8 sums
below 2^53, and the requantization from its rounding definitions rather than gemmlowp's bit
form), so executor == reference bit for bit is a real check of both. Example::

    ref = reference_integer_model(program)
    codes = program.quantize_inputs(x)
    assert all((a == b.numpy()).all() for a, b in zip(IntegerExecutor(program).run(*codes),
                                                      ref(*map(torch.from_numpy, codes))))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effopt.errors import EffoptError
from effopt.optimizer.lower.integer.fixed_point import INT8_MIN, INT32_MAX, INT32_MIN
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

__all__ = ["reference_integer_model"]


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

    def _prelu(self, op: IntPReLU, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[op.input] - op.input_zero
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m = torch.from_numpy(op.neg_multiplier).to(torch.int64).reshape(shape)
        s = torch.from_numpy(op.neg_shift).to(torch.int64).reshape(shape)
        acc = x * 2**op.left_shift
        neg = _torch_mbqm(acc * torch.sign(m), m.abs(), s)  # sign(0) = 0: a zero slope gives 0 either way
        pos = _torch_mbqm(acc, op.pos_multiplier, op.pos_shift)
        return (torch.where(x >= 0, pos, neg) + op.output_zero).clamp(op.act_min, op.act_max)

    def _softmax(self, op: IntSoftmax, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[op.input]
        e = torch.from_numpy(op.exp_table).to(torch.int64)[x.amax(dim=op.axis, keepdim=True) - x]
        total = e.sum(dim=op.axis, keepdim=True)
        # round(inv_scale·e / total), ties up, from quotient and remainder
        q = torch.div(op.inv_scale * e, total, rounding_mode="floor")
        q = q + (2 * (op.inv_scale * e - q * total) >= total).to(torch.int64)
        return (q + op.output_zero).clamp(op.act_min, op.act_max)

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
