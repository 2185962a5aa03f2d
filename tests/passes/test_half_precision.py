"""Tests for effopt.passes.half_precision: bf16/fp16 rewrite, what stays fp32, target support, the cost model.

Every case is a named builder returning ``(module, Expected)``; the same list drives the
numerics and structure tests. Each test first asserts its precondition (the model computes in
fp32, there is a softmax to keep), so it cannot pass while the pass does nothing. Passes are
built from plain dicts through the recipe validator and run through the pass manager, after
``fold_batchnorm`` as a recipe would. Tolerances (relative L2 error of the output vs the fp32
model, `REL_L2`): measured 3-4e-3 for bf16 and 3-6e-4 for fp16 on these models, bounded at
about 3x that.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.errors import PassError, RecipeError
from effopt.hardware_profiles import HardwareProfile, load_profile
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, facts
from effopt.optimizer.ir.cost_model import estimate
from effopt.passes.base import PassContext
from effopt.passes.half_precision import (
    HalfPrecision,
    float32_copy,
    half_dtype_of,
    is_boundary_cast,
    preferred_half_dtype,
    relative_error,
)
from effopt.passes.manager import PassRecord, run_passes
from tests.models import ZOO, seeded
from tests.passes.helpers import build_ir, recipe_passes

REL_L2 = {"bf16": 1.2e-2, "fp16": 2e-3}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_with_half() -> HardwareProfile:
    """x86-avx2 plus bf16/fp16 peaks: a CPU target that runs half precision (e.g. one with AMX), for channels-last."""
    peaks = load_profile("x86-avx2").peak_flops_per_s.model_copy(update={"bf16": 3072e9, "fp16": 3072e9})
    return load_profile("x86-avx2").model_copy(update={"name": "x86-half", "peak_flops_per_s": peaks})


def half(ir: IR, spec: dict | None = None, profile: HardwareProfile | None = None) -> tuple[IR, PassRecord]:
    entry = {"name": "half_precision", **(spec or {})}
    ir, records = run_passes(ir, recipe_passes("fold_batchnorm", entry), PassContext(profile=profile or load_profile("a100")))
    return ir, records[-1]


def casts(ir: IR) -> list[fx.Node]:
    return [n for n in ir.gm.graph.nodes if is_boundary_cast(n)]


def node_of_kind(ir: IR, kind: str) -> fx.Node:
    return next(n for n in ir.compute_nodes() if facts(n).op_kind == kind)


def x_for(shape: tuple[int, ...], batch: int = 4) -> torch.Tensor:
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(7))


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the pass must do to a builder's model (after fold_batchnorm)."""

    shape: tuple[int, ...]
    casts: int                                  # boundary casts inserted
    fp32_kinds: frozenset[str] = frozenset()    # op kinds that stay fp32 (keep_float_ops)
    changes: bool = True                        # False: nothing runs in half precision


def residual() -> tuple[nn.Module, Expected]:
    """Two BasicBlocks (identity and strided 1x1 shortcut); BNs fold, so only the boundary casts::

        x ─ to(bf16) ─ conv ─ relu ─ [conv ─ relu ─ conv ─ add(skip) ─ relu] x2 ─ pool ─ fc ─ to(fp32)
    """
    builder, shape = ZOO["resnet_style"]
    return builder(), Expected(shape, casts=2)


def fan_out() -> tuple[nn.Module, Expected]:
    """The BN cannot fold (the conv output also feeds the add), so it stays fp32 with casts around it::

        x ─ to ─ conv ─ c ─ to(fp32) ─ bn ─ to(bf16) ─ add ─ relu ─ to(fp32)
                        └─────────────────────────────┘
    """
    builder, shape = ZOO["fanout_net"]
    return builder(), Expected(shape, casts=4, fp32_kinds=frozenset({"batch_norm"}))


def concat() -> tuple[nn.Module, Expected]:
    """Two folded conv branches (one without bias) joined by cat, then a 1x1 conv::

           ┌─ conv_a (no bias) ─┐
        x ─┤                    cat ─ fuse ─ to(fp32)
           └─ conv_b ───────────┘
    """
    builder, shape = ZOO["concat_net"]
    return builder(), Expected(shape, casts=2)


def depthwise() -> tuple[nn.Module, Expected]:
    """MobileNetV2-like: depthwise convs (groups == channels) and linear bottlenecks, BNs folded."""
    builder, shape = ZOO["mobilenet_style"]
    return builder(), Expected(shape, casts=2)


def shared_module() -> tuple[nn.Module, Expected]:
    """One conv called twice, each call followed by a BN that cannot fold; the conv is bf16 at both sites::

        x ─ to ─ stem ─ relu ─ shared ─ to(fp32) ─ bn_a ─ to ─ relu ─ shared ─ to(fp32) ─ bn_b ─ to ─ relu ─ ... fc ─ to(fp32)
    """
    builder, shape = ZOO["shared_module_net"]
    return builder(), Expected(shape, casts=6, fp32_kinds=frozenset({"batch_norm"}))


class _SoftmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def softmax_head() -> tuple[nn.Module, Expected]:
    """A classifier ending in softmax, which stays fp32 (its output needs no cast back)::

        x ─ to(bf16) ─ fc1 ─ relu ─ fc2 ─ to(fp32) ─ softmax
    """
    with seeded(0):
        return _SoftmaxHead().eval(), Expected((2, 16), casts=2, fp32_kinds=frozenset({"softmax"}))


class _ConvNoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


def conv_without_bias() -> tuple[nn.Module, Expected]:
    """``x ─ to ─ conv (no bias) ─ relu ─ to(fp32)``."""
    with seeded(0):
        return _ConvNoBias().eval(), Expected((2, 3, 8, 8), casts=2)


def nothing_to_do() -> tuple[nn.Module, Expected]:
    """``x ─ softmax``: the only op stays fp32, so nothing changes and the softmax is a Skip."""
    return nn.Softmax(dim=1), Expected((2, 10), casts=0, fp32_kinds=frozenset({"softmax"}), changes=False)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Expected]]] = {
    f.__name__: f for f in (residual, fan_out, concat, depthwise, shared_module, softmax_head, conv_without_bias,
                            nothing_to_do)
}


# --- numerics and structure -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", list(BUILDERS))
def test_half_model_stays_within_tolerance_of_fp32(case: str, dtype: str) -> None:
    model, expected = BUILDERS[case]()
    ir = build_ir(copy.deepcopy(model), expected.shape)
    assert all(facts(n).compute_dtype == "fp32" for n in ir.compute_nodes())  # precondition: an fp32 model
    out, record = half(ir, {"dtype": dtype})
    x = x_for(expected.shape)
    with torch.no_grad():
        want, got = model(x), out.gm(x)
    assert got.dtype == torch.float32  # users feed and get fp32
    assert relative_error(got, want) <= REL_L2[dtype]
    if expected.changes:
        assert relative_error(got, want) > 0  # really computed in half precision


@pytest.mark.parametrize("case", list(BUILDERS))
def test_structure_half_weights_casts_and_facts(case: str) -> None:
    model, expected = BUILDERS[case]()
    ir, record = half(build_ir(model, expected.shape))
    assert len(casts(ir)) == expected.casts == record.result.stats.get("casts", 0.0)
    assert record.result.modified == expected.changes
    kept = {facts(n).op_kind for n in ir.compute_nodes() if n.name in {s.node for s in record.result.skipped}}
    assert kept == set(expected.fp32_kinds)
    for n in ir.compute_nodes():
        f = facts(n)
        if f.op_kind in expected.fp32_kinds:
            assert f.compute_dtype == "fp32" and all(t.dtype == "float32" for t in f.outputs), n.name
        elif f.op_kind in ("conv", "linear"):
            assert f.compute_dtype == "bf16" and ir.module_of(n).weight.dtype == torch.bfloat16, n.name
    if expected.changes:
        assert half_dtype_of(ir.gm) == "bf16"
        assert set(record.result.changed) <= {n.name for n in ir.compute_nodes()}


def test_keep_float_keeps_softmax_in_fp32_and_an_empty_list_does_not() -> None:
    model, expected = softmax_head()
    kept_ir, kept = half(build_ir(copy.deepcopy(model), expected.shape))
    softmax = node_of_kind(kept_ir, "softmax")
    assert facts(softmax).inputs[0].dtype == facts(softmax).outputs[0].dtype == "float32"
    assert is_boundary_cast(softmax.all_input_nodes[0])  # fc2's bf16 output is cast up before it
    assert any(s.node == softmax.name and "keep_float_ops" in s.reason for s in kept.result.skipped)
    bare_ir, _ = half(build_ir(copy.deepcopy(model), expected.shape), {"keep_float_ops": []})
    assert facts(node_of_kind(bare_ir, "softmax")).outputs[0].dtype == "bfloat16"  # precondition of the above


def test_keep_float_takes_node_names_and_module_paths() -> None:
    model, expected = residual()
    ir, record = half(build_ir(model, expected.shape), {"keep_float": ["layer2", "fc"]})
    kept = {s.node for s in record.result.skipped if s.reason == "listed in keep_float"}
    assert "fc" in kept and {"layer2_conv1", "layer2_conv2", "layer2_downsample_0"} <= kept
    assert ir.gm.get_submodule("layer2.conv1").weight.dtype == torch.float32
    assert ir.gm.get_submodule("layer1.conv1").weight.dtype == torch.bfloat16


def test_channels_last_on_a_cpu_target_contiguous_on_a_gpu() -> None:
    model, expected = residual()
    cpu_ir, cpu = half(build_ir(copy.deepcopy(model), expected.shape), profile=cpu_with_half())
    w = cpu_ir.gm.get_submodule("conv1").weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert casts(cpu_ir)[0].kwargs["memory_format"] == torch.channels_last
    assert any("channels-last" in w for w in cpu.result.warnings)
    gpu_ir, _ = half(build_ir(copy.deepcopy(model), expected.shape))
    assert gpu_ir.gm.get_submodule("conv1").weight.is_contiguous()
    with torch.no_grad():  # same numbers either way
        torch.testing.assert_close(cpu_ir.gm(x_for(expected.shape)), gpu_ir.gm(x_for(expected.shape)))


def test_the_report_names_the_worst_layers_error() -> None:
    model, expected = residual()
    _, record = half(build_ir(model, expected.shape))
    note = next(w for w in record.result.warnings if w.startswith("largest relative error"))
    assert "%" in note and "'" in note


# --- what the pass declines ----------------------------------------------------------------------


@pytest.mark.parametrize(("target", "says"), [
    ("cortex-m7", "integer-only"),
    ("x86-avx2", "has no bf16 compute"),
    ("arm-cortex-a", "use dtype: fp16"),
])
def test_targets_without_the_dtype_refuse_with_a_reason(target: str, says: str) -> None:
    profile = load_profile(target)
    (p,) = recipe_passes({"name": "half_precision", "dtype": "bf16"})
    reason = p.target_support(profile)
    assert reason is not None and says in reason and profile.name in reason
    model, expected = residual()
    with pytest.raises(PassError, match=says):
        run_passes(build_ir(model, expected.shape), [p], PassContext(profile=profile))


def test_targets_with_the_dtype_accept() -> None:
    (bf16,) = recipe_passes({"name": "half_precision"})
    (fp16,) = recipe_passes({"name": "half_precision", "dtype": "fp16"})
    assert bf16.target_support(load_profile("a100")) is None and fp16.target_support(load_profile("arm-cortex-a")) is None
    assert preferred_half_dtype(load_profile("a100")) == "bf16"
    assert preferred_half_dtype(load_profile("arm-cortex-a")) == "fp16"
    assert preferred_half_dtype(load_profile("x86-avx2")) is None


def test_dtype_auto_takes_the_half_dtype_the_target_runs() -> None:
    (auto,) = recipe_passes({"name": "half_precision"})
    assert auto.options.dtype == "auto" and auto.target_support(load_profile("arm-cortex-a")) is None
    assert "has no bf16 or fp16 compute" in (auto.target_support(load_profile("x86-avx2")) or "")
    model, expected = conv_without_bias()
    ir, _ = half(build_ir(model, expected.shape), profile=load_profile("arm-cortex-a"))
    assert ir.gm.get_submodule("conv").weight.dtype == torch.float16


def test_a_quantized_model_is_left_to_quantize() -> None:
    model, expected = residual()
    ir = build_ir(model, expected.shape)
    from tests.passes.test_quantize import random_source  # the calibration source the quantize tests use

    ctx = PassContext(profile=load_profile("a100"), calibration=random_source(expected.shape))
    ir, records = run_passes(ir, recipe_passes("fold_batchnorm", "quantize", "half_precision"), ctx)
    assert not records[-1].result.modified
    assert "already quantized" in records[-1].result.skipped[0].reason


def test_an_opaque_leaf_module_stays_fp32() -> None:
    from tests.models import Gate

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.gate = nn.Linear(8, 8), Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(self.fc(x))

    from effopt.optimizer.ir.trace import trace_module

    with seeded(0):
        net = Net().eval()
    gm = trace_module(net, ("gate",), n_inputs=1)
    ir, record = half(build_ir(gm, (2, 8)))
    assert any(s.node == "gate" and "opaque" in s.reason for s in record.result.skipped)
    assert facts(next(n for n in ir.compute_nodes() if n.name == "gate")).compute_dtype == "fp32"


def test_options_are_checked_when_the_recipe_loads() -> None:
    with pytest.raises(RecipeError, match="softmaxx"):
        recipe_passes({"name": "half_precision", "keep_float_ops": ["softmaxx"]})
    with pytest.raises(RecipeError, match="dtype"):
        recipe_passes({"name": "half_precision", "dtype": "fp8"})


def test_half_precision_must_follow_quantize_and_folding() -> None:
    assert HalfPrecision.after == ("fold_batchnorm", "quantize")
    with pytest.raises(RecipeError, match="must run after 'fold_batchnorm'"):
        recipe_passes("half_precision", "fold_batchnorm")


# --- what the cost model and the artefact stage read --------------------------------------------------


def test_the_cost_model_prices_half_nodes_at_the_half_peak() -> None:
    model, expected = residual()
    ir = build_ir(model, expected.shape)
    a100 = load_profile("a100")
    before = {c.node: c for c in estimate(ir, a100).nodes}
    out, _ = half(ir)
    after = {c.node: c for c in estimate(out, a100).nodes}
    conv = after["layer1_conv1"]
    assert conv.dtype == "bf16" and conv.compute_s == pytest.approx(conv.flops / a100.peak("bf16"))
    assert conv.bytes_moved < before["layer1_conv1"].bytes_moved  # 2-byte activations and weights
    cast = next(c for c in estimate(out, a100).nodes if c.op_kind == "to")
    assert cast.bytes_moved > 0  # a dtype cast copies, it is not a free view


def test_float32_copy_is_the_half_model_without_activation_rounding() -> None:
    model, expected = residual()
    out, _ = half(build_ir(copy.deepcopy(model), expected.shape), profile=cpu_with_half())
    twin = float32_copy(out.gm)
    assert half_dtype_of(twin) is None and not [n for n in twin.graph.nodes if is_boundary_cast(n)]
    assert torch.equal(twin.get_submodule("conv1").weight, out.gm.get_submodule("conv1").weight.float())
    x = x_for(expected.shape)
    with torch.no_grad():
        assert relative_error(twin(x), model(x)) < relative_error(out.gm(x), model(x))


def test_quantize_mixed_precision_promotes_to_bf16_where_the_target_runs_it() -> None:
    from tests.passes.test_quantize import random_source, rel_error

    builder, shape = ZOO["vgg_style"]
    model = builder()
    ctx = PassContext(profile=load_profile("a100"), calibration=random_source(shape))
    plain, _ = run_passes(build_ir(builder(), shape), recipe_passes("fold_batchnorm", "quantize"), ctx)
    x = x_for(shape)
    with torch.no_grad():
        budget = rel_error(plain.gm(x), model(x)) / 4  # precondition: plain int8 misses it
    spec = {"name": "quantize", "mixed_precision": True, "max_output_error": budget}
    ir, (_, record) = run_passes(build_ir(builder(), shape), recipe_passes("fold_batchnorm", spec), ctx)
    promoted = [w for w in record.result.warnings if w.startswith("mixed precision") and w.endswith("→ bf16")]
    assert len(promoted) == record.result.stats["promoted_by_sensitivity"] >= 1
    annotate(ir)
    dtypes = {facts(n).compute_dtype for n in ir.compute_nodes() if facts(n).op_kind in ("conv", "linear")}
    assert dtypes == {"int8", "bf16"}  # three levels on a100: int8, bf16, and no fp32 layer needed
    layer = next(m for m in ir.gm.modules() if getattr(m, "compute_dtype", None) == "bf16")
    w = layer.weight.detach()
    assert torch.equal(w, w.to(torch.bfloat16).float())  # its weights are bf16 values
