"""Quantization primitives: schemes, scale/zero-point, and the fake-quant modules the IR carries.

A real value x maps to an integer q = clamp(round(x / s) + z, qmin, qmax) and
back to x̂ = (q − z)·s. Worked example, uint8 asymmetric over [−1, 3]:
s = 4/255 ≈ 0.01569, z = round(1/s) = 64; x = 0.5 → q = round(31.875) + 64 = 96
→ x̂ = 32·s ≈ 0.502.

The quantized model stays an fx graph of float ops with `FakeQuant` nodes on
the edges that are stored as integers and `QuantConv`/`QuantLinear` modules
whose weights pass through a per-channel `FakeQuant`. The same graph

- trains (QAT): rounding passes gradients straight through (STE), scales can
  be learned (LSQ);
- exports: in eval mode a `FakeQuant` calls ``torch.ops.quantized_decomposed``
  quantize/dequantize, which the ONNX exporter writes as QuantizeLinear /
  DequantizeLinear pairs that onnxruntime fuses into int8 kernels; inside
  `aten_export_form` (the ``model.pt2`` export) it computes the same numbers with
  core aten ops, so the program loads where only torch is imported;
- lowers to integers for int-only targets (`effopt.optimizer.lower.integer`).

Where the FakeQuants sit, and what each op kind does with them, is the quantized-graph
contract: `effopt.optimizer.quant.contract`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  (registers the ops)

_QD = torch.ops.quantized_decomposed

Storage = Literal["int8", "uint8"]


@dataclass(frozen=True)
class QScheme:
    """How one tensor is quantized.

    ``bits`` 8 or 4 (2 where useful); ``signed`` picks int8-style [−2^(b−1)+1, 2^(b−1)−1]
    (symmetric: the −128 code is left out so −x and x quantize alike) or uint8-style
    [0, 2^b − 1]; ``symmetric`` forces z = 0 (signed) or z = 2^(b−1) (unsigned);
    ``axis`` is the per-channel axis or None for one scale per tensor.
    """

    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + 1 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage(self) -> Storage:
        """The container dtype: sub-8-bit codes are stored in 8-bit tensors."""
        return "int8" if self.signed else "uint8"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


WEIGHT_SCHEME = QScheme(bits=8, signed=True, symmetric=True, axis=0)
ACTIVATION_SCHEME = QScheme(bits=8, signed=False, symmetric=False, axis=None)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) covering [lo, hi] (elementwise for per-channel), always including 0.

    Zero must be exactly representable (zero padding, ReLU outputs). A range of
    width 0 gets scale 1e-8-ish rather than a division by zero.

    >>> qparams_from_range(torch.tensor(-1.), torch.tensor(3.), QScheme())  # uint8
    (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    lo = torch.minimum(lo.double(), torch.zeros_like(lo, dtype=torch.float64))
    hi = torch.maximum(hi.double(), torch.zeros_like(hi, dtype=torch.float64))
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        bound = torch.maximum(-lo, hi)
        if scheme.signed:
            scale = bound / qmax
            zero = torch.zeros_like(scale)
        else:
            scale = 2 * bound / (qmax - qmin)
            zero = torch.full_like(scale, float((qmax + 1) // 2))
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    scale = torch.clamp(scale, min=1e-12)
    return scale.float(), zero.round().to(torch.int32)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient for the rounding.

    Forward equals ``dequantize(quantize(x))`` exactly as torch's decomposed
    ops compute it (``round(x · (1/s))``); backward passes dx through inside
    [qmin, qmax] and zero outside (clipped values do not move), and gives the
    scale an LSQ-style gradient when ``scale`` requires grad.
    """
    shape = [1] * x.dim()
    if scheme.axis is not None:
        shape[scheme.axis] = -1
    s = scale.reshape(shape) if scale.dim() else scale
    z = zero.reshape(shape).to(x.dtype) if zero.dim() else zero.to(x.dtype)
    inv = 1.0 / s
    scaled = x * inv
    rounded = scaled + (torch.round(scaled) - scaled).detach()  # STE
    q = torch.clamp(rounded + z, scheme.qmin, scheme.qmax)
    return (q - z) * s


def quantize_values(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """The integer codes of ``x`` (as the storage dtype), with the same rounding as `fake_quantize`."""
    if scheme.axis is None:
        return _QD.quantize_per_tensor(x, float(scale), int(zero), scheme.qmin, scheme.qmax, scheme.torch_dtype)
    return _QD.quantize_per_channel(x, scale.float(), zero.to(torch.int64), scheme.axis, scheme.qmin, scheme.qmax,
                                    scheme.torch_dtype)


class FakeQuant(nn.Module):
    """A quantizer on one tensor: observes during calibration, fake-quantizes afterwards.

    States: ``observing`` (pass-through, statistics go to ``observer``) →
    ``calibrated`` (scale/zero_point set). In training mode it applies
    `fake_quantize` (STE; the scale is a learnable parameter when
    ``learnable``); in eval mode it calls torch's quantized_decomposed ops so
    that the ONNX export sees real quantize/dequantize nodes (`aten_export_form`:
    the same numbers in core aten ops, for ``model.pt2``).
    """

    effopt_kind = "quantize"

    def __init__(self, scheme: QScheme, channels: int = 1, learnable: bool = False) -> None:
        super().__init__()
        self.scheme = scheme
        n = channels if scheme.axis is not None else 1
        self.learnable = learnable
        scale = torch.ones(n) if scheme.axis is not None else torch.tensor(1.0)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32) if scheme.axis is not None
                             else torch.tensor(0, dtype=torch.int32))
        self.observer: object | None = None  # set by calibration, removed after
        self.calibrated = False
        self.enabled = True  # False: pass values through (mixed precision keeps a layer in float)
        # Python numbers of a per-tensor scale/zero point: torch.export must see them as
        # constants (reading a buffer with float() would be data-dependent).
        self.frozen_scale = 1.0
        self.frozen_zero = 0
        self.aten_form = False  # True inside `aten_export_form`: the reference ops as plain aten ops

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> FakeQuant:
        with torch.no_grad():
            self.scale.data = scale.reshape(self.scale.shape).float().clone()
            self.zero_point.data = zero_point.reshape(self.zero_point.shape).to(torch.int32).clone()
        self.calibrated = True
        return self.sync()

    def sync(self) -> FakeQuant:
        """Copy the (possibly learned) per-tensor scale into the constants the eval path uses."""
        if self.scheme.axis is None:
            self.frozen_scale = float(self.scale.detach().abs().clamp(min=1e-12))
            self.frozen_zero = int(self.zero_point)
        return self

    def train(self, mode: bool = True) -> FakeQuant:
        super().train(mode)
        return self if mode else self.sync()

    @property
    def storage(self) -> Storage:
        return self.scheme.storage

    def extra_repr(self) -> str:
        s = self.scheme
        kind = f"per-channel(axis={s.axis})" if s.axis is not None else "per-tensor"
        return f"{s.bits}-bit {'signed' if s.signed else 'unsigned'} {'symmetric' if s.symmetric else 'asymmetric'} {kind}"

    def make_learnable(self) -> FakeQuant:
        """LSQ: the scale becomes a trained parameter (the zero point stays fixed)."""
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)
            self.learnable = True
        return self

    def _aten_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode inside `aten_export_form`: the reference ops' arithmetic, written in aten ops.

        ``quantize_per_tensor`` is ``clamp(round(x · (1/s)) + z, qmin, qmax)`` cast to the storage
        dtype and ``dequantize_per_tensor`` is ``(q − z) · s`` in float32 (per channel: with
        ``s``, ``z`` broadcast along the axis). The same ops on the same operands give the same
        bits; the cast to int8/uint8 and back is left out, as it changes no value in
        [qmin, qmax]. (``torch.fake_quantize_per_tensor_affine`` gives the same numbers, but
        torch.export cannot trace it: it has no meta kernel.)
        """
        s = self.scheme
        x = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x  # as the reference ops do
        if s.axis is None:
            scale, zero = self.frozen_scale, self.frozen_zero
            inverse: torch.Tensor | float = 1.0 / scale
        else:
            shape = [1] * x.dim()
            shape[s.axis] = -1
            scale, zero = self.scale.detach().float().reshape(shape), self.zero_point.to(torch.int64).reshape(shape)
            inverse = 1.0 / scale
        q = torch.clamp(torch.round(x * inverse) + zero, s.qmin, s.qmax)
        return (q - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())  # type: ignore[attr-defined]
            return x
        if not (self.calibrated and self.enabled):
            return x
        if self.training:
            return fake_quantize(x, self.scale, self.zero_point, self.scheme)
        s = self.scheme
        if self.aten_form:
            return self._aten_forward(x)
        if s.axis is None:
            scale, zero = self.frozen_scale, self.frozen_zero
            q = _QD.quantize_per_tensor(x, scale, zero, s.qmin, s.qmax, s.torch_dtype)
            return _QD.dequantize_per_tensor(q, scale, zero, s.qmin, s.qmax, s.torch_dtype)
        scale, zero = self.scale.detach().float(), self.zero_point.to(torch.int64)
        q = _QD.quantize_per_channel(x, scale, zero, s.axis, s.qmin, s.qmax, s.torch_dtype)
        return _QD.dequantize_per_channel(q, scale, zero, s.axis, s.qmin, s.qmax, s.torch_dtype)


# --- the core-aten form of the reference ops (model.pt2) ------------------------------------------


def _dequantize_aten(codes: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int, s: QScheme) -> torch.Tensor:
    """``quantized_decomposed.dequantize_per_tensor/_per_channel`` in aten ops: ``(q − z)·s`` in float32.

    The integers are exact in float32, so this is the reference op bit for bit; a per-channel
    scale broadcasts along ``s.axis``. Example: codes [−63, 2], s = 0.5, z = 0 → [−31.5, 1.0].
    """
    if s.axis is not None:
        shape = [1] * codes.dim()
        shape[s.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)  # type: ignore[union-attr]
    return (codes.to(torch.float32) - zero) * scale


@contextlib.contextmanager
def aten_export_form(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every `FakeQuant` of ``module`` (and every frozen int8 weight) uses core aten ops.

    Why: the ``quantized_decomposed`` ops are registered only when
    ``torch.ao.quantization.fx._decomposed`` is imported, so a ``model.pt2`` holding them
    fails in ``torch.export.load`` where only torch is imported. In the aten form a
    quantizer is ``mul → round → add → clamp → sub → mul``, i.e.
    ``(clamp(round(x · (1/s)) + z, qmin, qmax) − z) · s`` with round half to even: the
    arithmetic of the reference ops, so the same bits (tested on random data and ties); a
    frozen weight is ``(w_int8 − z) · s_w[C]`` (`_dequantize_aten`). The ONNX export keeps
    the reference ops (they become QuantizeLinear/DequantizeLinear), so this form is for
    torch.export only.

    Example: ``with aten_export_form(model): torch.export.export(model, args)``; with s = 0.25,
    z = 0 an input 0.625 (2.5 steps) comes out 0.5 and 0.875 (3.5 steps) 1.0. The flags are
    put back afterwards, also on error.
    """
    quants = [m for m in module.modules() if isinstance(m, FakeQuant)]
    before = [fq.aten_form for fq in quants]
    try:
        for fq in quants:
            fq.aten_form = True
        yield module
    finally:
        for fq, flag in zip(quants, before):
            fq.aten_form = flag


class QuantConv(nn.Module):
    """A Conv1d/2d/3d whose weight is fake-quantized per output channel (float weight kept for QAT)."""

    effopt_kind = "conv"

    def __init__(self, conv: nn.modules.conv._ConvNd, weight_scheme: QScheme = WEIGHT_SCHEME, compute_dtype: str = "int8") -> None:
        super().__init__()
        self.conv = conv
        self.weight_quant = FakeQuant(weight_scheme, conv.out_channels)
        self.compute_dtype = compute_dtype  # "int8"; "fp32" when only the weights are quantized

    @property
    def weight(self) -> torch.Tensor:
        return _stored_weight(self, "conv")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, _layer_weight(self, "conv"), self.conv.bias)


class QuantLinear(nn.Module):
    """A Linear whose weight is fake-quantized per output feature."""

    effopt_kind = "linear"

    def __init__(self, linear: nn.Linear, weight_scheme: QScheme = WEIGHT_SCHEME, compute_dtype: str = "int8") -> None:
        super().__init__()
        self.linear = linear
        self.weight_quant = FakeQuant(weight_scheme, linear.out_features)
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        return _stored_weight(self, "linear")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _layer_weight(self, "linear"), self.linear.bias)


def _layer_weight(layer: nn.Module, inner: str) -> torch.Tensor:
    """The weight a quantized layer computes with: fake-quantized float, or dequantized int codes once frozen."""
    codes = getattr(layer, "weight_codes", None)
    if codes is None:
        return layer.weight_quant(getattr(layer, inner).weight)
    fq = layer.weight_quant
    s = fq.scheme
    scale, zero = fq.scale.detach().float(), fq.zero_point.to(torch.int64)
    if s.axis is None:
        if fq.aten_form:
            return _dequantize_aten(codes, fq.frozen_scale, fq.frozen_zero, s)
        return _QD.dequantize_per_tensor(codes, fq.frozen_scale, fq.frozen_zero, s.qmin, s.qmax, s.torch_dtype)
    if fq.aten_form:
        return _dequantize_aten(codes, scale, zero, s)
    return _QD.dequantize_per_channel(codes, scale, zero, s.axis, s.qmin, s.qmax, s.torch_dtype)


def _stored_weight(layer: nn.Module, inner: str) -> torch.Tensor:
    codes = getattr(layer, "weight_codes", None)
    return getattr(layer, inner).weight if codes is None else _layer_weight(layer, inner)


def freeze_weights(gm: nn.Module) -> nn.Module:
    """Replace every quantized layer's float weight by its integer codes (in place; returns ``gm``).

    For artefacts: the exported program and ONNX then store int8 weights (a
    DequantizeLinear of an int8 initializer) instead of float weights that are
    quantized at run time. The layer computes exactly what it did before.
    """
    for m in gm.modules():
        quantized = m.weight_quant.calibrated and m.weight_quant.enabled if isinstance(m, (QuantConv, QuantLinear)) else False
        if quantized and getattr(m, "weight_codes", None) is None:  # a layer mixed precision kept float stays float
            inner = m.conv if isinstance(m, QuantConv) else m.linear
            fq = m.weight_quant
            codes = quantize_values(inner.weight.detach(), fq.scale.detach(), fq.zero_point, fq.scheme)
            del inner._parameters["weight"]
            m.register_buffer("weight_codes", codes)
    return gm


def calibrate_weight(module: QuantConv | QuantLinear) -> None:
    """Per-channel symmetric range of the float weight (min/max over every dim but the channel axis)."""
    w = module.weight.detach()
    scheme = module.weight_quant.scheme
    if scheme.axis is None:
        scale, zero = qparams_from_range(w.min(), w.max(), scheme)
    else:
        flat = w.reshape(w.shape[0], -1)
        scale, zero = qparams_from_range(flat.min(dim=1).values, flat.max(dim=1).values, scheme)
    module.weight_quant.set_qparams(scale, zero)


def bias_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias scale s_b = s_x · s_w (per output channel), so bias adds straight into the accumulator."""
    return input_scale.double() * weight_scale.double()


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Round the float bias to int32 codes at scale s_x·s_w (saturating at the int32 range)."""
    q = torch.round(bias.double() / bias_scale(input_scale, weight_scale))
    return q.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def worst_case_accumulator_bits(weight_codes: torch.Tensor, input_scheme: QScheme, bias_codes: torch.Tensor | None = None) -> int:
    """Bits a signed accumulator needs for the worst input: Σ|w_q|·max|x_q − z| + |b_q|, per output channel.

    Example: 3×3×64 int8 weights all at 127 with uint8 inputs (|x − z| ≤ 255):
    576·127·255 = 18.65e6 → 26 bits (fits int32; would overflow int16).
    """
    w = weight_codes.to(torch.int64).reshape(weight_codes.shape[0], -1).abs().sum(dim=1)
    x_span = max(abs(input_scheme.qmax), abs(input_scheme.qmin)) if input_scheme.signed else input_scheme.qmax
    worst = w * x_span
    if bias_codes is not None:
        worst = worst + bias_codes.to(torch.int64).abs()
    return int(worst.max().item()).bit_length() + 1  # + sign bit
