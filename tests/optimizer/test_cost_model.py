"""Roofline cost model: hand-computed layers on a100, dtype verdicts on cortex-m7, memory, views, batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effopt.errors import ProfileError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.ir.analysis import annotate, layer_rows
from effopt.optimizer.ir.cost_model import check_runnable, estimate, node_cost
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.ir.trace import trace_module
from tests.models import ZOO, make_input

A100_FP32_FLOPS_PER_S = 19.5e12
A100_FP16_FLOPS_PER_S = 312e12
A100_BYTES_PER_S = 2.039e12
A100_OVERHEAD_S = 5.0e-6


def build(model: nn.Module, shape: tuple[int, ...]) -> IR:
    return annotate(IR(trace_module(model), (InputSpec("x", shape),), (make_input(shape),)))


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100")


@pytest.fixture(scope="module")
def m7():
    return load_profile("cortex-m7")


# -- hand-computed roofline on a100 ----------------------------------------------------------------
#
# Both layers: 256 channels, 56x56, 3x3, padding 1, no bias, fp32, priced at batch 32 from an IR
# annotated at batch 1 (annotating at batch 32 would run 118 GFLOPs on the test machine).
#   activations: 32 * 256 * 56 * 56 = 25,690,112 elements = 102,760,448 bytes, in and out alike
#
# dense conv:   MACs  = 25,690,112 * (256 * 9)   = 59,190,018,048  -> FLOPs 118,380,036,096
#               bytes = 2 * 102,760,448 + 256*256*9*4 (2,359,296)   = 207,880,192
#               compute 118.38e9 / 19.5e12  = 6.0708 ms  >  memory 207.88e6 / 2.039e12 = 0.1020 ms
# depthwise:    MACs  = 25,690,112 * 9           = 231,211,008      -> FLOPs 462,422,016
#               bytes = 2 * 102,760,448 + 256*9*4 (9,216)           = 205,530,112
#               compute 462.4e6 / 19.5e12 = 23.71 us  <  memory 205.5e6 / 2.039e12 = 100.80 us
ACT_BYTES = 32 * 256 * 56 * 56 * 4
DENSE_FLOPS = 2 * 32 * 256 * 56 * 56 * 256 * 9
DENSE_BYTES = 2 * ACT_BYTES + 256 * 256 * 9 * 4
DW_FLOPS = 2 * 32 * 256 * 56 * 56 * 9
DW_BYTES = 2 * ACT_BYTES + 256 * 9 * 4


def conv_ir(groups: int) -> IR:
    return build(nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, groups=groups, bias=False)).eval(), (1, 256, 56, 56))


@pytest.fixture(scope="module")
def dense_ir() -> IR:
    return conv_ir(groups=1)


@pytest.fixture(scope="module")
def depthwise_ir() -> IR:
    return conv_ir(groups=256)


def test_dense_conv_is_compute_bound_on_a100(dense_ir: IR, a100) -> None:
    assert DENSE_FLOPS == 118_380_036_096 and DENSE_BYTES == 207_880_192
    (cost,) = estimate(dense_ir, a100, batch=32).nodes
    assert cost.flops == DENSE_FLOPS and cost.bytes_moved == DENSE_BYTES
    assert cost.compute_s == pytest.approx(DENSE_FLOPS / A100_FP32_FLOPS_PER_S, rel=1e-12)
    assert cost.compute_s == pytest.approx(6.0708e-3, rel=1e-4)
    assert cost.memory_s == pytest.approx(DENSE_BYTES / A100_BYTES_PER_S, rel=1e-12)
    assert cost.bound == "compute"
    assert cost.overhead_s == A100_OVERHEAD_S
    assert cost.time_s == pytest.approx(DENSE_FLOPS / A100_FP32_FLOPS_PER_S + A100_OVERHEAD_S, rel=1e-12)
    assert cost.supported and cost.reason is None and cost.dtype == "fp32"


def test_depthwise_conv_is_memory_bound_on_a100(depthwise_ir: IR, a100) -> None:
    assert DW_FLOPS == 462_422_016 and DW_BYTES == 205_530_112
    (cost,) = estimate(depthwise_ir, a100, batch=32).nodes
    assert cost.flops == DW_FLOPS and cost.bytes_moved == DW_BYTES
    assert cost.compute_s == pytest.approx(23.714e-6, rel=1e-4)
    assert cost.memory_s == pytest.approx(100.799e-6, rel=1e-4)
    assert cost.bound == "memory"
    assert cost.time_s == pytest.approx(DW_BYTES / A100_BYTES_PER_S + A100_OVERHEAD_S, rel=1e-12)


def test_node_cost_matches_estimate_and_defaults_to_the_facts_dtype(depthwise_ir: IR, a100) -> None:
    ((node, f),) = layer_rows(depthwise_ir)
    assert f.compute_dtype == "fp32"
    direct = node_cost(f, node.name, a100, batch_scale=32)
    assert direct == estimate(depthwise_ir, a100, batch=32).nodes[0]


def test_fp16_override_divides_compute_by_the_peak_ratio_and_halves_bytes(dense_ir: IR, a100) -> None:
    (fp32,) = estimate(dense_ir, a100).nodes
    (fp16,) = estimate(dense_ir, a100, dtypes={fp32.node: "fp16"}).nodes
    assert fp16.dtype == "fp16"
    assert fp32.compute_s / fp16.compute_s == pytest.approx(A100_FP16_FLOPS_PER_S / A100_FP32_FLOPS_PER_S)  # 16x
    assert fp16.bytes_moved == pytest.approx(fp32.bytes_moved / 2)
    assert fp16.flops == fp32.flops


def test_unknown_override_names_the_node(dense_ir: IR, a100) -> None:
    with pytest.raises(ProfileError, match=r"'nope'.*no such compute node"):
        estimate(dense_ir, a100, dtypes={"nope": "int8"})
    (cost,) = estimate(dense_ir, a100).nodes
    with pytest.raises(ProfileError, match=r"'fp8' is not a dtype"):
        estimate(dense_ir, a100, dtypes={cost.node: "fp8"})


# -- dtype verdicts: an int8-only MCU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_ir() -> IR:
    builder, shape = ZOO["mnist_classic_cnn"]
    return build(builder(), shape)


def test_int8_only_target_rejects_a_float_plan_naming_the_layer(mnist_ir: IR, m7) -> None:
    cost = estimate(mnist_ir, m7)
    first_conv = next(c for c in cost.nodes if c.op_kind == "conv")
    assert not first_conv.supported
    assert first_conv.reason == (
        f"layer '{first_conv.node}' (Conv2d) computes in fp32 but cortex-m7 runs only int8: "
        "quantize it (passes: quantize) or choose another target"
    )
    assert cost.unsupported[0] == first_conv
    assert not cost.runnable
    with pytest.raises(ProfileError) as info:
        check_runnable(cost)
    message = str(info.value)
    assert message.startswith("model cannot run on 'cortex-m7': 7 layer(s) in a dtype it cannot compute in")
    assert f"layer '{first_conv.node}' (Conv2d) computes in fp32; layer" in message
    assert message.endswith(
        "; and 2 more; cortex-m7 runs only int8: quantize it (passes: quantize) or choose another target"
    )  # 7 unsupported (4 layers + 3 ReLUs), 5 listed, the advice once


def test_unsupported_layer_is_priced_at_the_slowest_supported_peak(mnist_ir: IR, m7) -> None:
    cost = estimate(mnist_ir, m7)
    conv = next(c for c in cost.nodes if c.op_kind == "conv")
    assert conv.compute_s == pytest.approx(conv.flops / m7.peak("int8"))
    assert cost.total_s < float("inf")


def test_all_int8_plan_runs_on_the_mcu(mnist_ir: IR, m7) -> None:
    plan = {c.node: "int8" for c in estimate(mnist_ir, m7).nodes}
    cost = estimate(mnist_ir, m7, dtypes=plan)
    # 737,280 + ... params at 1 byte: 369,347 int8 weight bytes fit the 2 MiB flash
    assert cost.unsupported == () and cost.fits_memory and cost.runnable
    check_runnable(cost)  # does not raise


def test_model_too_big_for_the_mcu_is_flagged(m7) -> None:
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    ir = build(model, (1, 1024))
    plan = {c.node: "int8" for c in estimate(ir, m7).nodes}
    cost = estimate(ir, m7, dtypes=plan)
    params = 2 * (1024 * 1024 + 1024) + 1024 * 10 + 10
    assert cost.weight_bytes == params  # int8: one byte per parameter
    assert cost.unsupported == ()
    assert not cost.fits_memory
    assert cost.memory_reason is not None
    assert f"weights need {params:,} bytes" in cost.memory_reason
    assert "2,097,152 bytes (2.00 MiB) for weights" in cost.memory_reason
    with pytest.raises(ProfileError, match=r"does not fit memory: weights need 2,109,450 bytes"):
        check_runnable(cost)


def test_activations_too_big_for_the_mcu_sram_are_flagged(m7) -> None:
    ir = build(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)).eval(), (1, 3, 64, 64))
    cost = estimate(ir, m7, dtypes={c.node: "int8" for c in estimate(ir, m7).nodes})
    # live at the conv: the fp32 graph input (3*64*64*4 = 49,152 bytes; an override changes the
    # node, not the input) + the int8 output (64*64*64 = 262,144) = 311,296 <= 524,288 bytes of SRAM
    assert cost.peak_activation_bytes == 311_296 and cost.fits_memory
    big = estimate(ir, m7, dtypes={c.node: "int8" for c in cost.nodes}, batch=4)
    assert big.peak_activation_bytes == 4 * 311_296 == 1_245_184
    assert not big.fits_memory
    assert "activations need 1,245,184 bytes (1.19 MiB) at peak but cortex-m7 has 524,288 bytes" in (big.memory_reason or "")


# -- views, liveness, batch ----------------------------------------------------------------------------


def test_erased_views_cost_nothing_and_reshape_like_views_pay_only_overhead(m7, a100) -> None:
    """dropout_identity_net: x ─ conv ─ dropout ─ identity ─ relu ─ flatten ─ F.dropout ─ fc."""
    builder, shape = ZOO["dropout_identity_net"]
    ir = build(builder(), shape)
    for profile in (a100, m7):
        cost = estimate(ir, profile)
        erased = [c for c in cost.nodes if c.op_kind in ("dropout", "identity")]
        (flatten,) = [c for c in cost.nodes if c.op_kind == "flatten"]
        assert len(erased) == 3  # nn.Dropout, nn.Identity, F.dropout
        for c in erased:
            assert (c.time_s, c.overhead_s, c.compute_s, c.memory_s) == (0.0, 0.0, 0.0, 0.0)
            assert c.bound == "none" and c.supported  # even on the int8-only MCU
        assert (flatten.compute_s, flatten.memory_s) == (0.0, 0.0)
        assert flatten.time_s == flatten.overhead_s == profile.op_overhead_s
        assert flatten.bound == "none" and flatten.supported
        assert cost.view_s == profile.op_overhead_s
        assert cost.total_s == pytest.approx(cost.compute_bound_s + cost.memory_bound_s + cost.view_s)
        assert cost.total_s == pytest.approx(sum(c.time_s for c in cost.nodes))


def test_peak_activation_bytes_keeps_a_residual_alive(a100) -> None:
    """fanout_net: x ─ conv ─ c ─ bn ─ y ─ add(y, c) ─ relu. At the add c, y and the sum are live."""
    builder, shape = ZOO["fanout_net"]
    ir = build(builder(), shape)
    tensor = 2 * 8 * 16 * 16 * 4  # 16,384 bytes per [2, 8, 16, 16] fp32 activation
    assert estimate(ir, a100).peak_activation_bytes == 3 * tensor


def test_peak_activation_bytes_of_a_chain(a100) -> None:
    """x [1,4] ─ fc1 [1,8] ─ relu [1,8] ─ fc2 [1,2]: the peak is fc1's output + relu's, 32 + 32 bytes."""
    ir = build(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), (1, 4))
    assert estimate(ir, a100).peak_activation_bytes == 64
    assert estimate(ir, a100, batch=10).peak_activation_bytes == 640


@pytest.mark.parametrize("name", ["resnet_style", "mobilenet_style", "mlp", "tiny_transformer"])
def test_batch_scaling_matches_annotating_at_that_batch(name: str, a100) -> None:
    builder, shape = ZOO[name]
    model = builder()
    small = build(model, shape)  # batch 2
    large = build(model, (8, *shape[1:]))
    scaled, direct = estimate(small, a100, batch=8), estimate(large, a100)
    assert scaled.batch == direct.batch == 8
    for s, d in zip(scaled.nodes, direct.nodes, strict=True):
        assert s.flops == pytest.approx(d.flops) and s.bytes_moved == pytest.approx(d.bytes_moved), s.node
    assert scaled.total_s == pytest.approx(direct.total_s, rel=1e-9)
    assert scaled.peak_activation_bytes == direct.peak_activation_bytes
    assert scaled.weight_bytes == direct.weight_bytes


def test_weights_do_not_scale_with_batch(a100) -> None:
    """Linear(1024, 1024): memory-bound on its weights at batch 1, compute grows 64x at batch 64."""
    ir = build(nn.Sequential(nn.Linear(1024, 1024)).eval(), (1, 1024))
    (one,) = estimate(ir, a100).nodes
    (many,) = estimate(ir, a100, batch=64).nodes
    weights = (1024 * 1024 + 1024) * 4
    assert one.bytes_moved == weights + 2 * 1024 * 4
    assert many.bytes_moved == weights + 64 * 2 * 1024 * 4
    assert many.flops == 64 * one.flops == 64 * 2 * 1024 * 1024
    with pytest.raises(ProfileError, match="batch 0"):
        estimate(ir, a100, batch=0)


def test_the_same_ir_prices_differently_on_two_profiles_and_stays_unchanged(dense_ir: IR, a100) -> None:
    before = [n.meta.copy() for n in dense_ir.gm.graph.nodes]
    gpu, cpu = estimate(dense_ir, a100), estimate(dense_ir, load_profile("x86-avx2"))
    assert cpu.total_s > 10 * gpu.total_s
    assert [n.meta for n in dense_ir.gm.graph.nodes] == before  # nothing written on the IR
    assert torch.is_tensor(dense_ir.example_inputs[0])
