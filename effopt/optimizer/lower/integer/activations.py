"""Integer PReLU and softmax (contract rule 7): their integer parameters, the way TFLite Micro runs them.

`effopt.optimizer.lower.integer.lowering` calls these once it knows the input's and the output's
qparams (the FakeQuant after the op); only `prelu_slopes` and `softmax_output_problem` read the graph.

PReLU has two real multipliers, M_pos = s_in/s_out for x ≥ z_in and M_neg[c] = s_in·α_c/s_out
below it, each a fixed-point pair from `quantize_multiplier` (a negative α stores −M0). Worked
example: s_in = 0.05, s_out = 0.04, α = (0.25, −0.5) → M_pos = 1.25, M_neg = (0.3125, −0.625).

Softmax keeps only an int32 table at run time: exp_table[d] = round(2^S·exp(−s_in·d)) for
d = max − q in [0, 255], computed here in float64. With s_in = 0.1 and S = 21:
exp_table = (2097152, 1897582, 1717003, ...). The output grid is fixed at 1/256 (contract
`SOFTMAX_OUTPUT_SCALE`), so y = round(256·e/Σ) + z_out with one integer division.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch.fx as fx

from effopt.errors import EffoptError, LoweringError
from effopt.optimizer.lower.integer.fixed_point import INT32_MAX, headroom_shift, quantize_multiplier
from effopt.optimizer.lower.integer.program import IntPReLU, IntSoftmax, QParams
from effopt.optimizer.quant.contract import call_arg
from effopt.optimizer.quant.schemes import FakeQuant

__all__ = ["exp_table", "prelu_op", "prelu_slopes", "softmax_op", "softmax_output_problem", "softmax_table_bits"]

#: The most fractional bits of the softmax exp table: 2^-22 relative error, far below the 1/256 output step.
MAX_TABLE_BITS = 22
#: The fewest the table may keep before the sum's headroom leaves too little precision.
MIN_TABLE_BITS = 8


def prelu_slopes(n: fx.Node, gm: fx.GraphModule) -> np.ndarray:
    """The slopes α of an ``nn.PReLU`` call or of ``F.prelu(x, self.weight)`` (a module attribute), float64, flat.

    ``nn.PReLU(10)`` gives 10 slopes (one per channel), ``nn.PReLU()`` one (shared by every channel).
    The caller checked with `integer_activation_refusal` that the slope is a constant.
    """
    if n.op == "call_module":
        weight = gm.get_submodule(str(n.target)).weight
    else:
        node = call_arg(n, 1, "weight", None)
        weight = functools.reduce(getattr, str(node.target).split("."), gm)
    return weight.detach().double().cpu().numpy().reshape(-1)


def _fixed_point(name: str, kind: str, real: float) -> tuple[int, int]:
    """(M0, shift) of ``real`` (negative M0 for a negative real), with the node named in an error."""
    try:
        m0, shift = quantize_multiplier(abs(real))
    except EffoptError as e:
        raise LoweringError(f"node '{name}' ({kind}): {e}") from e
    return (-m0 if real < 0 else m0), shift


def prelu_op(name: str, input_name: str, x: QParams, slopes: np.ndarray, qp: QParams, out: str, lo: int,
             hi: int) -> IntPReLU:
    """The `IntPReLU` writing ``qp``'s grid from the input tensor ``input_name`` (qparams ``x``) with ``slopes``.

    The left shift is the smallest `headroom_shift` over the nonzero multipliers, so none of them
    flushes to zero and the double rounding of MBQM stays exact for |q − z_in| ≤ ``x.span``.
    """
    pos = x.scale / qp.scale
    neg = [x.scale * float(a) / qp.scale for a in slopes]
    left = min(headroom_shift(x.span, abs(r)) for r in [pos, *neg] if r != 0.0)
    pos_m, pos_s = _fixed_point(name, "prelu", pos / 2**left)
    pairs = [_fixed_point(name, "prelu", r / 2**left) for r in neg]
    return IntPReLU(name, input_name, out, x.zero_point, left, pos_m, pos_s,
                    np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32),
                    qp.zero_point, lo, hi)


def _inverse_scale(qp: QParams) -> int | None:
    """1/scale when it is a whole number of steps per unit (256 for 1/256), else None."""
    inv = round(1.0 / qp.scale)
    return inv if inv >= 1 and abs(inv * qp.scale - 1.0) <= 1e-6 else None


def softmax_output_problem(n: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why the FakeQuant after softmax ``n`` is not a grid the integer softmax writes; None when it is (or is absent,
    which the site check reports). E.g. a min/max-calibrated one, scale 0.0031: ``its output FakeQuant has ...``."""
    users = list(n.users)
    fq = gm.get_submodule(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
    if not isinstance(fq, FakeQuant) or not fq.calibrated or fq.scheme.axis is not None:
        return None
    qp = QParams.of(fq)
    if _inverse_scale(qp) is None:
        return (f"has an output FakeQuant of scale {qp.scale:g}, but the integer softmax writes probabilities in steps "
                "of 1/n (the quantize pass fixes 1/256 on int-only targets): quantize the model for this target")
    return None


def softmax_table_bits(inv_scale: int, channels: int) -> int:
    """Fractional bits S of the exp table such that 2·inv_scale·e + Σ ≤ (2·inv_scale + C)·2^S fits int32.

    E.g. 256 steps over 2 channels: (512 + 2)·2^S ≤ 2^31 − 1 → S = 21; over 1000 channels S = 20.
    """
    return min(MAX_TABLE_BITS, int(math.floor(math.log2(INT32_MAX / (2 * inv_scale + channels)))))


def exp_table(scale: float, span: int, bits: int) -> np.ndarray:
    """int32 round(2^bits·exp(−scale·d)) for d = 0 … span (half up), computed once at lowering time.

    >>> exp_table(0.1, 2, 21).tolist()
    [2097152, 1897582, 1717003]
    """
    d = np.arange(span + 1, dtype=np.float64)
    return np.floor(np.exp(-scale * d) * float(1 << bits) + 0.5).astype(np.int32)


def softmax_op(name: str, input_name: str, x: QParams, axis: int, channels: int, qp: QParams, out: str, lo: int,
               hi: int) -> IntSoftmax:
    """The `IntSoftmax` over ``axis`` (``channels`` long) of the input ``input_name`` (qparams ``x``), onto ``qp``.

    ``qp`` must have an integer 1/scale (the quantize pass fixes it at 1/256 on int-only targets).
    """
    inv = _inverse_scale(qp)
    if inv is None:  # `softmax_output_problem` reported it first
        raise LoweringError(f"node '{name}' (softmax): output scale {qp.scale:g} is not 1/n")
    bits = softmax_table_bits(inv, channels)
    if bits < MIN_TABLE_BITS:
        raise LoweringError(f"node '{name}' (softmax): {channels} channels leave only {bits} bits for the exp table "
                            "in an int32 sum; split the softmax or choose a target with float support")
    table = exp_table(x.scale, x.qmax - x.qmin, bits)
    return IntSoftmax(name, input_name, out, axis, table, bits, inv, qp.zero_point, lo, hi)
