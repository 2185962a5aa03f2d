"""Tests for effopt.optimizer.lower.integer (and the C header of effopt.optimizer.emit.c_header).

Every quantized model here is built by hand the way the quantized-graph contract of
`effopt.optimizer.quant.contract` describes it (FakeQuant on integer edges, QuantConv /
QuantLinear, fused relu before the output FakeQuant, pass-through max pool / flatten),
calibrated with min/max ranges on seeded data, and traced with FakeQuant, QuantConv and
QuantLinear as leaf modules. Each builder carries a drawing and returns
``(module, Expected)``; the same list drives the bit-exactness, float-agreement,
no-float and C-header tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.emit.c_header import c_identifier, write_c_header
from effopt.optimizer.lower.integer.geometry import pool_window
from effopt.optimizer.lower.integer import (
    INT32_MAX,
    INT32_MIN,
    IntAdd,
    IntConv,
    IntegerExecutor,
    IntegerProgram,
    IntLinear,
    QParams,
    headroom_shift,
    integer_accuracy,
    lower_to_integer,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    reference_integer_model,
)
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.passes.base import PassContext
from effopt.optimizer.quant.schemes import (
    FakeQuant,
    QScheme,
    QuantConv,
    QuantLinear,
    calibrate_weight,
    qparams_from_range,
)
from effopt.optimizer.ir.trace import trace_module
from effopt.passes.fold_batchnorm import FoldBatchNorm

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

ACT = QScheme(bits=8, signed=False, symmetric=False)            # uint8-style, stored as int8 (z − 128)
SIGNED_ACT = QScheme(bits=8, signed=True, symmetric=False)      # int8-style [−127, 127]
ACT4 = QScheme(bits=4, signed=False, symmetric=False)           # 4-bit codes in an int8 container
W4 = QScheme(bits=4, signed=True, symmetric=True, axis=0)
INT8_RANGE = (-128, 127)


# --- helpers ----------------------------------------------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def init_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic non-trivial weights and biases (biases non-zero so their int32 path is exercised)."""
    g = seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.2))
    return module


class _MinMax:
    """The observer calibration installs on an activation FakeQuant: the running min and max."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.min(), x.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


def calibrate(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> nn.Module:
    """Weights per channel (`calibrate_weight`), activations from min/max over ``batches`` (float model ranges)."""
    weight_quants = set()
    for m in model.modules():
        if isinstance(m, (QuantConv, QuantLinear)):
            fq = m.weight_quant
            if fq.scheme.axis is None:  # one scale for the whole weight (calibrate_weight is per channel)
                w = m.weight.detach()
                fq.set_qparams(*qparams_from_range(w.min(), w.max(), fq.scheme))
            else:
                calibrate_weight(m)
            weight_quants.add(id(fq))
    acts = [m for m in model.modules() if isinstance(m, FakeQuant) and id(m) not in weight_quants]
    for fq in acts:
        fq.observer = _MinMax()
    with torch.no_grad():
        for inputs in batches:
            model(*inputs)
    for fq in acts:
        obs = fq.observer
        fq.observer = None
        fq.set_qparams(*qparams_from_range(obs.lo, obs.hi, fq.scheme))
    return model.eval()


def trace_quantized(model: nn.Module) -> fx.GraphModule:
    present = {type(m).__name__ for m in model.modules()}
    leaves = tuple(t for t in ("FakeQuant", "QuantConv", "QuantLinear") if t in present)
    return trace_module(model, leaf_modules=leaves)


def qconv(conv: nn.Module, seed: int, scheme: QScheme | None = None) -> QuantConv:
    return QuantConv(init_(conv, seed)) if scheme is None else QuantConv(init_(conv, seed), scheme)


def qlinear(linear: nn.Linear, seed: int, scheme: QScheme | None = None) -> QuantLinear:
    return QuantLinear(init_(linear, seed)) if scheme is None else QuantLinear(init_(linear, seed), scheme)


def random_codes(program: IntegerProgram, batch: int, seed: int) -> tuple[np.ndarray, ...]:
    """Uniform int8 codes over each input's [qmin, qmax] (the full range, not just calibrated data)."""
    rng = np.random.default_rng(seed)
    return tuple(
        rng.integers(q.qparams.qmin, q.qparams.qmax + 1, size=(batch, *program.tensor(q.output).shape)).astype(np.int8)
        for q in program.inputs
    )


def gm_output_codes(gm: fx.GraphModule, program: IntegerProgram, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """The fake-quant model's outputs in eval mode, as the int8 codes of the program's output qparams."""
    with torch.no_grad():
        ys = gm.eval()(*inputs)
    ys = ys if isinstance(ys, (tuple, list)) else (ys,)
    return [o.qparams.quantize(y.numpy()) for o, y in zip(program.outputs, ys)]


# --- named model builders ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    input_shapes: tuple[tuple[int, ...], ...]   # one sample, no batch
    kinds: frozenset[str]                      # op kinds the program must contain
    input_scale: float = 1.0                   # calibration/test inputs: randn · input_scale
    # agreement of the integer program's output codes with the fake-quant model's (see
    # test_executor_agrees_with_fake_quant_model): worst difference in output steps, share of equal codes
    max_steps: int = 2
    min_equal: float = 0.9

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = seeded(seed)
        return tuple(torch.randn((n, *s), generator=g) * self.input_scale for s in self.input_shapes)


class ResidualNet(nn.Module):
    """A digits-sized residual CNN (every int8 op kind of a small ResNet).

    x ─ q_in ─ conv1 ─ relu ─ q1 ─ maxpool ─┬─ conv2 ─ q2 ─ add ─ relu ─ q3 ─ gap ─ q4 ─ flatten ─ fc ─ q_out
      [1,8,8]  1→8 3×3                      │  8→8 3×3     ↑                [8,1,1]               8→10
                                            └──────────────┘ (residual: max pool output, q1's qparams)
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_in = FakeQuant(ACT)
        self.conv1 = qconv(nn.Conv2d(1, 8, 3, padding=1), 1)
        self.relu = nn.ReLU()
        self.q1 = FakeQuant(ACT)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = qconv(nn.Conv2d(8, 8, 3, padding=1), 2)
        self.q2 = FakeQuant(ACT)
        self.q3 = FakeQuant(ACT)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.q4 = FakeQuant(ACT)
        self.flatten = nn.Flatten()
        self.fc = qlinear(nn.Linear(8, 10), 3)
        self.q_out = FakeQuant(ACT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_in(x)
        x = self.pool(self.q1(self.relu(self.conv1(x))))
        y = self.q2(self.conv2(x))
        x = self.q3(F.relu(x + y))
        x = self.flatten(self.q4(self.gap(x)))
        return self.q_out(self.fc(x))


def residual_net() -> tuple[nn.Module, Expected]:
    kinds = frozenset({"conv", "max_pool", "add", "avg_pool", "reshape", "linear"})
    return ResidualNet(), Expected(((1, 8, 8),), kinds)


class DepthwiseNet(nn.Module):
    """Depthwise-separable block with strided, dilated depthwise conv and 4-bit tensors.

    x ─ q_in ─ conv 1→8 ─ relu6 ─ q1 ─ dw 8→8 (groups 8, stride 2, dilation 2, pad 2) ─ hardtanh(−1, 2) ─ q2 (4-bit)
        ─ pw 8→16 1×1 (4-bit weights) ─ q3 ─ mean(2, 3) ─ q4 ─ fc 16→5 ─ relu (module after .relu()) ─ q_out
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_in = FakeQuant(ACT)
        self.conv = qconv(nn.Conv2d(1, 8, 3, padding=1), 11)
        self.q1 = FakeQuant(ACT)
        self.dw = qconv(nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8), 12)
        self.act = nn.Hardtanh(-1.0, 2.0)
        self.q2 = FakeQuant(ACT4)
        self.pw = qconv(nn.Conv2d(8, 16, 1), 13, W4)
        self.q3 = FakeQuant(ACT)
        self.q4 = FakeQuant(ACT)
        self.fc = qlinear(nn.Linear(16, 5), 14)
        self.q_out = FakeQuant(ACT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q1(F.relu6(self.conv(self.q_in(x))))
        x = self.q2(self.act(self.dw(x)))
        x = self.q3(self.pw(x))
        x = self.q4(x.mean((2, 3)))
        return self.q_out(self.fc(x).relu())


def depthwise_net() -> tuple[nn.Module, Expected]:
    # 4-bit q2 (step 0.2) feeds a 1×1 conv whose output step is 0.043: one code that rounds the other way
    # upstream moves the output by up to ~7 steps, and the bias, rounded at the coarse s_in·s_w, shifts
    # whole channels by a fraction of a step (the fake-quant model keeps a float bias).
    return DepthwiseNet(), Expected(((1, 9, 9),), frozenset({"conv", "mean", "linear"}), max_steps=8, min_equal=0.5)


class CatMulNet(nn.Module):
    """Two branches joined by mul and cat, signed (int8-style) activations, average pooling.

    x ─ q_in ─┬─ conv_a 1→4 ─ q_a ─┬──────────────── cat ─ q_cat ─ avg_pool2d(2) ─ q_pool ─ flatten ─ relu ─ fc ─ q_out
              └─ conv_b 1→4 ─ q_b ─┼─ mul ─ q_mul ───┘ (inputs at       (relu on an int8 tensor: a clamp)   ↑
                                   └─────────────────┘  three scales)             per-tensor weight scale ┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_in = FakeQuant(SIGNED_ACT)
        self.conv_a = qconv(nn.Conv2d(1, 4, 3, padding=1), 21)
        self.conv_b = qconv(nn.Conv2d(1, 4, 3, padding=1, bias=False), 22)
        self.q_a = FakeQuant(SIGNED_ACT)
        self.q_b = FakeQuant(SIGNED_ACT)
        self.q_mul = FakeQuant(SIGNED_ACT)
        self.q_cat = FakeQuant(SIGNED_ACT)
        self.q_pool = FakeQuant(SIGNED_ACT)
        self.fc = qlinear(nn.Linear(12 * 4 * 4, 10), 23, QScheme(bits=8, signed=True, symmetric=True, axis=None))
        self.q_out = FakeQuant(SIGNED_ACT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_in(x)
        a, b = self.q_a(self.conv_a(x)), self.q_b(self.conv_b(x))
        x = self.q_cat(torch.cat([a, b, self.q_mul(a * b)], dim=1))
        x = self.q_pool(F.avg_pool2d(x, 2))
        return self.q_out(self.fc(F.relu(torch.flatten(x, 1))))


def cat_mul_net() -> tuple[nn.Module, Expected]:
    kinds = frozenset({"conv", "mul", "cat", "avg_pool", "reshape", "clamp", "linear"})
    return CatMulNet(), Expected(((1, 8, 8),), kinds)


class SequenceNet(nn.Module):
    """1-D conv with asymmetric 'same' padding, ceil-mode pooling, transpose, 3-D linear, split and two outputs.

    x [4,15] ─ q_in ─ conv1d 4→8 k4 'same' (pad 1|2) ─ relu ─ q1 ─ maxpool1d(2, ceil) ─ transpose(1,2) ─┬─ fc 8→6 ─ q2
      ─ chunk(2, dim=2) ─ add(c0, c1) ─ q3 ─ flatten ─ q_signed (requantize to int8-style) ─ out0      │
                                                                                    t @ tᵀ ─ q_mm ─ view ─ out1
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_in = FakeQuant(ACT)
        self.conv = qconv(nn.Conv1d(4, 8, 4, padding="same"), 31)
        self.q1 = FakeQuant(ACT)
        self.pool = nn.MaxPool1d(2, ceil_mode=True)
        self.fc = qlinear(nn.Linear(8, 6), 32)
        self.q2 = FakeQuant(ACT)
        self.q3 = FakeQuant(ACT)
        self.q_signed = FakeQuant(SIGNED_ACT)
        self.q_mm = FakeQuant(ACT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.q1(torch.relu(self.conv(self.q_in(x))))
        t = self.pool(x).transpose(1, 2)
        c0, c1 = self.q2(self.fc(t)).chunk(2, dim=2)
        out0 = self.q_signed(torch.flatten(self.q3(torch.add(c0, c1)), 1))
        mm = self.q_mm(torch.matmul(t, t.transpose(1, 2)))
        return out0, mm.view(mm.size(0), -1)


def sequence_net() -> tuple[nn.Module, Expected]:
    kinds = frozenset({"conv", "max_pool", "transpose", "linear", "slice", "add", "matmul", "reshape", "requantize"})
    return SequenceNet(), Expected(((4, 15),), kinds)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Expected]]] = {
    "residual": residual_net,
    "depthwise": depthwise_net,
    "cat_mul": cat_mul_net,
    "sequence": sequence_net,
}


@pytest.fixture(scope="module")
def lowered() -> dict[str, tuple[fx.GraphModule, IntegerProgram, Expected]]:
    """Each builder calibrated on 4 seeded batches, traced and lowered once."""
    out = {}
    for name, build in BUILDERS.items():
        model, expected = build()
        calibrate(model, [expected.batch(64, seed) for seed in range(4)])
        gm = trace_quantized(model)
        out[name] = (gm, lower_to_integer(gm, expected.batch(2, 99)), expected)
    return out


# --- fixed-point arithmetic ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (0.5, (1 << 30, 0)),
        (0.25, (1 << 30, -1)),
        (1.0, (1 << 30, 1)),
        (0.75, (1610612736, 0)),
        (0.002, (1099511628, -8)),       # 0.512·2^−8; 0.512·2^31 = 1099511627.78 → 1099511628
        (1 - 2**-40, (1 << 30, 1)),      # q rounds up to 2^31 → halved, shift + 1
        (0.0, (0, 0)),
        (2**-40, (0, 0)),                # shift −39 < −31 flushes to zero (TFLite)
    ],
)
def test_quantize_multiplier_hand_examples(real: float, expected: tuple[int, int]) -> None:
    assert quantize_multiplier(real) == expected


def test_quantize_multiplier_represents_the_real_value() -> None:
    # setup: multipliers from 1e-9 to 1e3
    rng = np.random.default_rng(0)
    for real in 10.0 ** rng.uniform(-9, 3, size=2000):
        # execute
        m0, shift = quantize_multiplier(float(real))
        # assert: M0 in [2^30, 2^31) and M0·2^(shift−31) within half a unit of M0's last place
        assert (1 << 30) <= m0 < (1 << 31)
        approx = Fraction(m0) * Fraction(2) ** (shift - 31)
        assert abs(approx - Fraction(float(real))) <= Fraction(2) ** (shift - 32)


@pytest.mark.parametrize(
    ("acc", "m0", "shift", "expected"),
    [
        (10, 1 << 30, -1, 3),         # 2.5 → 3: the final shift rounds ties away from zero
        (-10, 1 << 30, -1, -3),       # −2.5 → −3
        (-6, 1 << 30, -1, -2),        # −1.5 → −2
        (1, 1 << 30, 0, 1),           # 0.5 → 1: the doubling high multiply rounds ties toward +∞
        (-1, 1 << 30, 0, 0),          # −0.5 → 0 (gemmlowp's nudge 1 − 2^30 for negative products)
        (12345, 1 << 30, -1, 3087),   # 3086.25: double rounding (6172.5 → 6173, 3086.5 → 3087)
        (12345, 1099511628, -8, 25),  # 12345 · 0.002 = 24.69
        (7, 1 << 30, 1, 7),           # × 1.0 (left shift 1) is exact
        (-7, 1 << 30, 1, -7),
        (INT32_MAX, (1 << 31) - 1, 0, INT32_MAX - 1),
        (INT32_MIN, 1 << 30, 0, INT32_MIN // 2),
    ],
)
def test_multiply_by_quantized_multiplier_hand_examples(acc: int, m0: int, shift: int, expected: int) -> None:
    out = multiply_by_quantized_multiplier(np.array([acc], dtype=np.int32), m0, shift)
    assert out.dtype == np.int32
    assert int(out[0]) == expected


def test_multiply_by_quantized_multiplier_matches_float_rounding_within_one() -> None:
    # setup: 200 multipliers from 2^-20 to 8, 5000 accumulators each (kept small enough for the left shift)
    rng = np.random.default_rng(1)
    reals = 2.0 ** rng.uniform(-20, 3, size=200)
    diffs = []
    for real in reals:
        m0, shift = quantize_multiplier(float(real))
        limit = INT32_MAX >> max(shift, 0)
        acc = rng.integers(-limit, limit, size=5000, dtype=np.int64).astype(np.int32)
        # execute
        got = multiply_by_quantized_multiplier(acc, m0, shift).astype(np.int64)
        # assert: within 1 of round(acc · M) with M the exact fixed-point multiplier
        exact = np.round(acc.astype(np.float64) * (m0 * 2.0 ** (shift - 31)))
        diffs.append(np.abs(got - exact).max())
    assert max(diffs) <= 1
    assert min(diffs) == 0 or max(diffs) == 1  # precondition: the comparison is not vacuous


def test_headroom_shift_makes_small_rescales_exact() -> None:
    # setup: rescaling int8 codes by M ≈ 0.2505 (e.g. a cat input onto a coarser output scale)
    real = 0.2505
    acc = np.arange(-255, 256, dtype=np.int32)
    exact = np.sign(acc) * np.floor(np.abs(acc) * real + 0.5)  # round half away from zero
    # execute
    plain = multiply_by_quantized_multiplier(acc, *quantize_multiplier(real))
    left = headroom_shift(255, real)
    shifted = multiply_by_quantized_multiplier(acc << left, *quantize_multiplier(real / 2**left))
    # assert: without headroom the double rounding is off by one (1 · 0.2505 → 1); with it, exact
    assert left == 22
    assert int(plain[acc == 1][0]) == 1 and (plain != exact).any()
    np.testing.assert_array_equal(shifted, exact)


def test_multiply_by_quantized_multiplier_per_channel_broadcast() -> None:
    acc = np.array([[100, 100], [-100, -100]], dtype=np.int32)
    m = np.array([1 << 30, 1 << 30])
    s = np.array([-1, -2])  # × 0.25, × 0.125
    assert multiply_by_quantized_multiplier(acc, m, s).tolist() == [[25, 13], [-25, -13]]


def test_multiply_by_quantized_multiplier_rejects_float_accumulators() -> None:
    with pytest.raises(Exception, match="integer array"):
        multiply_by_quantized_multiplier(np.array([1.5]), 1 << 30, 0)


# --- qparams and window geometry -------------------------------------------------------------------------------


def test_qparams_of_an_unsigned_fake_quant_shift_to_int8() -> None:
    fq = FakeQuant(QScheme()).set_qparams(torch.tensor(6 / 255), torch.tensor(0))  # relu output over [0, 6]
    qp = QParams.of(fq)
    assert (qp.zero_point, qp.qmin, qp.qmax) == (-128, -128, 127)
    assert qp.code_of(6.0) == 127 and qp.code_of(0.0) == -128 and qp.span == 255


@pytest.mark.parametrize(
    ("kind", "params", "in_sp", "out_sp", "padding"),
    [
        ("max_pool", {"kernel_size": 3, "stride": 2, "padding": 1}, (8, 8), (5, 5), ((1, 2), (1, 2))),  # ceil_mode
        ("max_pool", {"kernel_size": 2}, (8, 8), (4, 4), ((0, 0), (0, 0))),
        ("adaptive_avg_pool", {}, (8, 8), (2, 2), ((0, 0), (0, 0))),
    ],
)
def test_pool_window_reproduces_torch_output_sizes(kind: str, params: dict, in_sp: tuple, out_sp: tuple,
                                                   padding: tuple) -> None:
    win = pool_window("p", kind, lambda attr, pos, default: params.get(attr, default), in_sp, out_sp)
    assert not isinstance(win, str) and win.padding == padding
    assert pool_window("p", "adaptive_avg_pool", lambda *a: None, (8, 8), (3, 3)) == (
        "has output size (3, 3) that does not divide the input (8, 8): windows differ in size")


# --- lowering: structure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lowering_produces_integer_ops_of_every_expected_kind(lowered, name: str) -> None:
    gm, program, expected = lowered[name]
    kinds = {op.kind for op in program.ops}
    assert expected.kinds <= kinds, f"missing {sorted(expected.kinds - kinds)}"
    for op in program.ops:
        if isinstance(op, (IntConv, IntLinear)):
            assert op.weight.dtype == np.int8 and op.bias.dtype == np.int32
            assert op.multiplier.dtype == np.int32 and ((op.multiplier >= 1 << 30) | (op.multiplier == 0)).all()
    for t in program.tensors:
        assert INT8_RANGE[0] <= t.qparams.qmin <= t.qparams.zero_point <= t.qparams.qmax <= INT8_RANGE[1]
    assert program.accumulator_bits <= 32


def test_uint8_activations_are_stored_as_int8_with_shifted_zero_point(lowered) -> None:
    gm, program, _ = lowered["residual"]
    fq = gm.get_submodule("q_in")
    qp = program.inputs[0].qparams
    assert fq.scheme.qmin == 0 and qp.qmin == -128 and qp.qmax == 127
    assert qp.zero_point == int(fq.zero_point) - 128


def test_fused_relu_becomes_the_output_clamp(lowered) -> None:
    _, program, _ = lowered["residual"]
    conv1 = next(op for op in program.ops if op.name == "conv1")
    add = next(op for op in program.ops if isinstance(op, IntAdd))
    assert conv1.act_min == conv1.output_zero and add.act_min == add.output_zero  # relu: clamp at real 0
    conv2 = next(op for op in program.ops if op.name == "conv2")
    assert conv2.act_min == -128  # no activation


def test_depthwise_conv_keeps_groups_stride_dilation(lowered) -> None:
    _, program, _ = lowered["depthwise"]
    dw = next(op for op in program.ops if op.name == "dw")
    assert (dw.groups, dw.stride, dw.dilation, dw.padding) == (8, (2, 2), (2, 2), ((2, 2), (2, 2)))
    pw = next(op for op in program.ops if op.name == "pw")
    assert np.abs(pw.weight).max() <= 7  # 4-bit weights in an int8 container


# --- lowering: numerics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_executor_matches_torch_integer_reference_bit_exactly(lowered, name: str) -> None:
    # setup
    _, program, _ = lowered[name]
    inputs = random_codes(program, batch=32, seed=5)
    # execute
    got = IntegerExecutor(program).run(*inputs)
    ref = reference_integer_model(program)(*(torch.from_numpy(x) for x in inputs))
    # assert
    assert len(got) == len(ref) == len(program.outputs)
    for g, r in zip(got, ref):
        assert g.dtype == np.int8
        assert g.std() > 0  # precondition: outputs are not saturated to a constant
        np.testing.assert_array_equal(g, r.numpy())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_executor_agrees_with_fake_quant_model(lowered, name: str) -> None:
    """The integer program's output codes vs the fake-quant graph's eval output (float rounding vs fixed point)."""
    gm, program, expected = lowered[name]
    x = expected.batch(256, seed=7)
    got = IntegerExecutor(program).run(*program.quantize_inputs(*x))
    want = gm_output_codes(gm, program, x)
    for g, w in zip(got, want):
        steps = np.abs(g.astype(np.int32) - w.astype(np.int32))
        assert steps.max() <= expected.max_steps, f"max difference {steps.max()} output steps"
        assert (steps == 0).mean() >= expected.min_equal


def test_input_quantization_matches_fake_quant_codes(lowered) -> None:
    gm, program, expected = lowered["residual"]
    (x,) = expected.batch(64, seed=3)
    fq = gm.get_submodule("q_in")
    torch_codes = torch.round(x * (1.0 / fq.frozen_scale)) + fq.frozen_zero - 128
    np.testing.assert_array_equal(program.quantize_inputs(x)[0], torch_codes.clamp(-128, 127).numpy().astype(np.int8))


def test_executor_computes_in_integers_only(lowered) -> None:
    _, program, _ = lowered["residual"]
    ex = IntegerExecutor(program, debug=True)
    ex.run(*random_codes(program, batch=4, seed=0))
    kinds = {np.dtype(d).kind for _, _, d in ex.dtype_log}
    assert ex.dtype_log and {op.name for op in program.ops} <= {name for name, _, _ in ex.dtype_log}
    assert kinds <= {"i"}, [entry for entry in ex.dtype_log if np.dtype(entry[2]).kind != "i"]
    assert {d for _, what, d in ex.dtype_log if what == "accumulator"} == {"int32"}


def test_executor_rejects_float_inputs(lowered) -> None:
    _, program, _ = lowered["residual"]
    with pytest.raises(Exception, match="int8 codes"):
        IntegerExecutor(program).run(np.zeros((1, 1, 8, 8), dtype=np.float32))


# --- real data: a trained DigitsNet, BN folded, quantized by hand ----------------------------------------------


class QuantDigitsNet(nn.Module):
    """The folded DigitsNet, quantized as the contract says (module, function and method relu forms).

    x ─ q_in ─ conv1 ─ relu ─ q1 ─ conv2 ─ F.relu ─ q2 ─ maxpool ─ conv3 ─ .relu() ─ q3 ─ gap ─ q_gap
      ─ flatten ─ dropout ─ fc1 ─ relu ─ q4 ─ fc2 ─ q5
    """

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        self.q_in, self.q1, self.q2, self.q3, self.q_gap, self.q4, self.q5 = (FakeQuant(ACT) for _ in range(7))
        self.conv1, self.conv2, self.conv3 = (QuantConv(folded.get_submodule(n)) for n in ("conv1", "conv2", "conv3"))
        self.fc1, self.fc2 = QuantLinear(folded.fc1), QuantLinear(folded.fc2)
        self.pool, self.gap, self.drop, self.relu = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Dropout(0.1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q1(self.relu(self.conv1(self.q_in(x))))
        x = self.pool(self.q2(F.relu(self.conv2(x))))
        x = self.q_gap(self.gap(self.q3(self.conv3(x).relu())))
        x = self.drop(torch.flatten(x, 1))
        return self.q5(self.fc2(self.q4(self.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def digits() -> dict[str, object]:
    from examples.digits import eval_dataset, train, train_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # examples.digits.train is deterministic for a fixed thread count (and fast with 1)
    try:
        model, float_acc = train(seed=0, epochs=5)
    finally:
        torch.set_num_threads(threads)
    ir = IR(trace_module(model), (InputSpec("x", (1, 1, 8, 8)),), (torch.zeros(1, 1, 8, 8),))
    result = FoldBatchNorm().run(annotate(ir), PassContext())
    assert len(result.changed) == 4  # precondition: every BN folded
    qmodel = QuantDigitsNet(result.ir.gm)
    x_train = train_dataset().tensors[0]
    calibrate(qmodel, [(x_train[i:i + 256],) for i in range(0, len(x_train), 256)])
    gm = trace_quantized(qmodel)
    x_test, y_test = eval_dataset().tensors
    program = lower_to_integer(gm, (x_test[:2],))
    return {"gm": gm, "program": program, "x": x_test, "y": y_test, "float_acc": float_acc, "float": model}


def test_digits_integer_program_keeps_accuracy(digits) -> None:
    gm, program, x, y = digits["gm"], digits["program"], digits["x"], digits["y"]
    (q,) = IntegerExecutor(program).run(*program.quantize_inputs(x))
    with torch.no_grad():
        fake = gm.eval()(x).argmax(1).numpy()
        flt = digits["float"](x).argmax(1).numpy()
    ints = q.argmax(1)
    assert (ints == fake).mean() >= 0.95
    assert (ints == flt).mean() >= 0.95
    accuracy = integer_accuracy(program, x, y)
    assert accuracy >= digits["float_acc"] - 0.03
    assert accuracy == float((ints == y.numpy()).mean())


def test_digits_executor_matches_reference_and_fake_quant_codes(digits) -> None:
    gm, program, x = digits["gm"], digits["program"], digits["x"]
    inputs = program.quantize_inputs(x)
    (got,) = IntegerExecutor(program).run(*inputs)
    (ref,) = reference_integer_model(program)(*(torch.from_numpy(a) for a in inputs))
    np.testing.assert_array_equal(got, ref.numpy())
    (want,) = gm_output_codes(gm, program, (x,))
    steps = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert steps.max() <= 3 and (steps == 0).mean() >= 0.9


# --- errors: nodes that cannot be integer ----------------------------------------------------------------------------


class SoftmaxInTheMiddle(nn.Module):
    """x ─ q_in ─ conv ─ q1 ─ softmax ─ q2 ─ flatten ─ fc ─ q_out  (q2 calibrated, not softmax's fixed 1/256 grid)"""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.q1, self.q2, self.q_out = (FakeQuant(ACT) for _ in range(4))
        self.conv = qconv(nn.Conv2d(1, 4, 3, padding=1), 41)
        self.fc = qlinear(nn.Linear(4 * 8 * 8, 10), 42)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q2(torch.softmax(self.q1(self.conv(self.q_in(x))), dim=1))
        return self.q_out(self.fc(torch.flatten(x, 1)))


class FloatOps(nn.Module):
    """x ─ q_in ─ fc1 ─ q1 ─ layer_norm ─ gelu ─ q2 ─ conv-less float Linear ─ q3 ─ fc2 ─ q_out"""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.q1, self.q2, self.q3, self.q_out = (FakeQuant(ACT) for _ in range(5))
        self.fc1 = qlinear(nn.Linear(16, 16), 51)
        self.norm = nn.LayerNorm(16)
        self.float_fc = init_(nn.Linear(16, 16), 52)
        self.fc2 = qlinear(nn.Linear(16, 4), 53)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q2(F.gelu(self.norm(self.q1(self.fc1(self.q_in(x))))))
        return self.q_out(self.fc2(self.q3(self.float_fc(x))))


def test_softmax_in_the_middle_is_rejected_naming_the_node() -> None:
    model = calibrate(SoftmaxInTheMiddle(), [(torch.randn(16, 1, 8, 8, generator=seeded(0)),)])
    gm = trace_quantized(model)
    assert any(n.name == "softmax" for n in gm.graph.nodes)  # precondition
    with pytest.raises(PassError) as e:
        lower_to_integer(gm, (torch.randn(2, 1, 8, 8),))
    msg = str(e.value)
    assert "node 'softmax' (softmax) has an output FakeQuant of scale" in msg
    assert "1 node(s)" in msg  # only the float op, not the integer layers around it


def test_every_float_node_is_listed() -> None:
    model = calibrate(FloatOps(), [(torch.randn(32, 16, generator=seeded(1)),)])
    gm = trace_quantized(model)
    with pytest.raises(PassError) as e:
        lower_to_integer(gm, (torch.randn(2, 16),))
    msg = str(e.value)
    assert "node 'norm' (layer_norm)" in msg and "node 'gelu' (gelu)" in msg
    assert "node 'float_fc' (linear) is a float linear" in msg


def test_uncalibrated_fake_quant_is_rejected() -> None:
    model, expected = residual_net()
    calibrate(model, [expected.batch(16, 0)])
    model.q2.calibrated = False
    with pytest.raises(PassError, match="node 'q2' \\(FakeQuant\\) is not calibrated"):
        lower_to_integer(trace_quantized(model), expected.batch(2, 1))


def test_conv_without_output_fake_quant_is_rejected() -> None:
    class NoRequant(nn.Module):
        """x ─ q_in ─ conv ─ (no FakeQuant) ─ maxpool ─ output"""

        def __init__(self) -> None:
            super().__init__()
            self.q_in = FakeQuant(ACT)
            self.conv = qconv(nn.Conv2d(1, 2, 3), 61)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(self.conv(self.q_in(x)), 2)

    gm = trace_quantized(calibrate(NoRequant(), [(torch.randn(4, 1, 8, 8),)]))
    with pytest.raises(PassError, match="node 'conv' \\(conv\\) result reaches 'max_pool2d' without a FakeQuant"):
        lower_to_integer(gm, (torch.randn(2, 1, 8, 8),))


def test_accumulator_wider_than_target_is_listed(lowered) -> None:
    gm, program, expected = lowered["residual"]
    assert 16 < program.accumulator_bits <= 32  # precondition: fits 32 bits, not 16
    with pytest.raises(PassError) as e:
        lower_to_integer(gm, expected.batch(2, 0), accumulator_bits=16)
    pattern = r"node 'conv2' \(conv\) needs a \d+-bit accumulator in the worst case, over the target's 16"
    assert re.search(pattern, str(e.value))


# --- C header -------------------------------------------------------------------------------------------------------


def _parse_arrays(header: str) -> dict[str, np.ndarray]:
    arrays = {}
    declaration = r"static const (int8_t|int32_t) (\w+)\[(\d+)\] = \{(.*?)\};"
    for ctype, name, size, body in re.findall(declaration, header, re.S):
        values = [int(eval(v)) for v in body.replace("\n", " ").split(",")]  # "(-2147483647 - 1)" included
        assert len(values) == int(size)
        arrays[name] = np.array(values, dtype=np.int8 if ctype == "int8_t" else np.int32)
    return arrays


@pytest.mark.parametrize("name", list(BUILDERS))
def test_c_header_round_trips_the_parameters(lowered, name: str) -> None:
    _, program, _ = lowered[name]
    header = write_c_header(program, f"{name} model")
    assert header == write_c_header(program, f"{name} model")  # deterministic
    arrays = _parse_arrays(header)
    prefix = c_identifier(f"{name} model").lower()
    layers = [op for op in program.ops if isinstance(op, (IntConv, IntLinear))]
    assert layers  # precondition
    for op in layers:
        lid = c_identifier(op.name).lower()
        np.testing.assert_array_equal(arrays[f"{prefix}_{lid}_weights"], op.weight.reshape(-1))
        np.testing.assert_array_equal(arrays[f"{prefix}_{lid}_bias"], op.bias)
        np.testing.assert_array_equal(arrays[f"{prefix}_{lid}_multiplier"], op.multiplier)
        np.testing.assert_array_equal(arrays[f"{prefix}_{lid}_shift"], op.shift)
        assert f"#define {prefix.upper()}_{lid.upper()}_OUTPUT_ZERO " in header
    assert max(len(line) for line in header.splitlines()) <= 100


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
@pytest.mark.parametrize("name", ["residual", "sequence"])
def test_c_header_compiles_as_c99(lowered, name: str, tmp_path: Path) -> None:
    _, program, _ = lowered[name]
    (tmp_path / "model.h").write_text(write_c_header(program, name))
    first = next(op for op in program.ops if isinstance(op, (IntConv, IntLinear)))
    array = f"{name}_{c_identifier(first.name).lower()}_weights"
    (tmp_path / "main.c").write_text(
        '#include "model.h"\n'
        f"int main(void) {{ return (int){array}[0] + {name.upper()}_NUM_LAYERS + {name.upper()}_INPUT0_ZERO_POINT; }}\n"
    )
    proc = subprocess.run(
        ["gcc", "-fsyntax-only", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "main.c"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_c_identifier_sanitises_names() -> None:
    assert c_identifier("layer1.0-conv") == "layer1_0_conv"
    assert c_identifier("3x3") == "_3x3"
