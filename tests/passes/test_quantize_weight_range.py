"""The quantize pass keeps int8 weights in the range the target's kernels multiply without overflow.

x86 CPUs without VNNI (the ``x86-avx2`` profile) multiply uint8 activations by int8 weights with
VPMADDUBSW, which adds two products into a saturating int16: 255·127·2 = 64770 clips at 32767, so an
int8 runtime there (fbgemm, onnxruntime) silently computes something else than the quantized model.
Weights with |code| ≤ 63 (7 bits) never overflow: 255·63·2 = 32130.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.hardware_profiles.host import host_int8_weight_bits
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.quant.schemes import QuantConv, QuantLinear
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import ZOO
from tests.passes.helpers import build_ir, recipe_passes


def _calibration(shape: tuple[int, ...]) -> DataSource:
    g = torch.Generator().manual_seed(0)
    return DataSource("random", TensorDataset(torch.randn(32, *shape[1:], generator=g)), 16, False)


def _max_weight_codes(ir) -> list[int]:  # noqa: ANN001
    layers = [m for m in ir.gm.modules() if isinstance(m, (QuantConv, QuantLinear))]
    assert layers  # precondition: the pass quantized something
    return [int(m.weight_quant(m.weight).div(m.weight_quant.scale.reshape(-1, *[1] * (m.weight.dim() - 1)))
                .round().abs().max()) for m in layers]


@pytest.mark.parametrize(("target", "mode", "widest"), [
    ("x86-avx2", "static", 63),       # no VNNI: 7-bit weights
    ("x86-avx2", "dynamic", 63),
    ("arm-cortex-a", "static", 127),  # SDOT accumulates in int32: full int8
    ("cortex-m7", "static", 127),     # SMLAD: 16x16 -> 32, full int8
])
def test_weight_codes_stay_within_the_targets_kernel_range(target: str, mode: str, widest: int) -> None:
    builder, shape = ZOO["mlp"] if mode == "dynamic" else ZOO["vgg_style"]
    ir = build_ir(builder(), shape)
    profile = load_profile(target)
    ctx = PassContext(profile=profile, calibration=_calibration(shape))
    ir, records = run_passes(ir, recipe_passes("fold_batchnorm", {"name": "quantize", "mode": mode}), ctx)
    codes = _max_weight_codes(ir)
    assert max(codes) == widest, codes  # the largest weight of each layer maps to the top code
    warned = [w for r in records for w in r.result.warnings if "saturating int16" in w]
    assert bool(warned) == (widest == 63), warned


def test_weight_only_mode_keeps_8_bits_on_x86_avx2() -> None:
    """Weight-only layers compute in float: no int8 kernel, nothing to saturate."""
    builder, shape = ZOO["mlp"]
    ir = build_ir(builder(), shape)
    ctx = PassContext(profile=load_profile("x86-avx2"))
    ir, _ = run_passes(ir, recipe_passes({"name": "quantize", "mode": "weight_only"}), ctx)
    assert max(_max_weight_codes(ir)) == 127


def test_host_detection_follows_the_cpu_flags() -> None:
    assert host_int8_weight_bits("x86_64", frozenset({"avx2", "fma"})) == 7
    assert host_int8_weight_bits("x86_64", frozenset({"avx2", "avx512_vnni"})) == 8
    assert host_int8_weight_bits("x86_64", frozenset({"avx_vnni"})) == 8
    assert host_int8_weight_bits("aarch64", frozenset()) == 8
