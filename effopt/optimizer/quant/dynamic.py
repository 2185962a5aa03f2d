"""Dynamic quantization: a Linear's input quantized at run time from each batch's own range.

The quantize pass's ``mode: dynamic`` wraps each Linear in `DynamicInput`. The rule is
onnxruntime's ``DynamicQuantizeLinear`` (`dynamic_fake_quantize`), so the ONNX artefact, where
`effopt.optimizer.lower.onnx_dynamic` lowers the layer to ``DynamicQuantizeMatMul``, computes the
same codes as the torch model. Runtime-independent math only: nothing here knows ONNX.

Example: x = [−1, 3, 0.5] → s = 4/255, z = 64, and 0.5 comes back as (96 − 64)·s ≈ 0.50196.
"""

from __future__ import annotations

import torch
from torch import nn

from effopt.optimizer.quant.schemes import FakeQuant, QuantLinear

__all__ = ["DynamicInput", "dynamic_fake_quantize"]


def dynamic_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` to uint8 with its own range, exactly as ``DynamicQuantizeLinear`` does.

    Range ``[min(x, 0), max(x, 0)]`` over the whole tensor, float32 throughout:
    ``s = (hi − lo) / 255`` (1 if hi = lo), ``z = round(clamp(−lo / s, 0, 255))``,
    ``q = clamp(round(x / s) + z, 0, 255)``, result ``(q − z) · s``; rounding is half to even and
    the division a true division (not ``x · (1/s)``), as in onnxruntime's MLAS kernels, so the
    codes are bit-equal. Rounding passes gradients straight through.

    Example: x = [−1, 3, 0.5] → s = 4/255 ≈ 0.015686, z = round(63.75) = 64,
    0.5 → round(31.875) + 64 = 96 → (96 − 64)·s ≈ 0.50196.
    """
    xd = x.detach().float()
    lo = torch.clamp(xd.min(), max=0.0)
    hi = torch.clamp(xd.max(), min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zero = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    scaled = x / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return (torch.clamp(rounded + zero, 0.0, 255.0) - zero) * scale


class DynamicInput(nn.Module):
    """Dynamic quantization of a Linear's input: the range of each batch gives its scale, at run time.

    The rule is onnxruntime's ``DynamicQuantizeLinear`` (`dynamic_fake_quantize`: uint8 over
    ``[min(x, 0), max(x, 0)]`` of the whole batch, float32 math), so the ONNX artefact, where
    `effopt.optimizer.lower.onnx_dynamic` lowers the layer to ``DynamicQuantizeMatMul``, computes the
    same codes. For export, `effopt.optimizer.lower.onnx_dynamic.dynamic_export_form` swaps this
    module for ``inner``.
    """

    effopt_kind = "linear"

    def __init__(self, inner: QuantLinear) -> None:
        super().__init__()
        self.inner = inner
        self.compute_dtype = "int8"

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def weight_quant(self) -> FakeQuant:
        return self.inner.weight_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(dynamic_fake_quantize(x))
