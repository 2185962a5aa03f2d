"""Fixed-point arithmetic of int-only targets (gemmlowp / TFLite / CMSIS-NN), bit for bit in NumPy.

The one float step of an integer network is the real multiplier ``M = s_in·s_w / s_out`` that
rescales an int32 accumulator to the output's scale. It becomes a fixed-point pair
``(M0, shift)`` with ``M = M0·2^−31·2^shift`` (`quantize_multiplier`), applied with the exact
gemmlowp/TFLite routine (`multiply_by_quantized_multiplier`), which is what the firmware runs.

Worked example (one conv output channel): s_in = 0.02, s_w = 0.005, s_out = 0.05 →
M = 0.002 = 0.512·2^−8 → M0 = round(0.512·2^31) = 1099511628, shift = −8. An accumulator of
12,345 becomes 12,345·0.002 = 24.69 → 25.
"""

from __future__ import annotations

import math

import numpy as np

from effopt.errors import EffoptError, LoweringError

__all__ = [
    "ADD_LEFT_SHIFT",
    "INT32_MAX",
    "INT32_MIN",
    "INT8_MAX",
    "INT8_MIN",
    "headroom_shift",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN = -128
INT8_MAX = 127
#: TFLite's add/sub left shift: inputs are scaled up by 2^20 before rescaling, so that
#: the per-input multipliers (≤ 0.5) keep ~20 fractional bits of precision.
ADD_LEFT_SHIFT = 20


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
        raise LoweringError(f"quantize_multiplier: multiplier {real!r} must be finite and ≥ 0")
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
        raise LoweringError(f"quantize_multiplier: multiplier {real!r} ≥ 2^30 cannot be applied to an int32 accumulator")
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
