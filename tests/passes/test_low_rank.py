"""Tests for effopt.passes.low_rank: Linear SVD, conv channel decomposition and Tucker-2 in the graph.

Named builders with ASCII drawings return ``(module, Expected)`` and drive the structure and
numerics tests; every test asserts its precondition first. The shared machinery (layer filter,
pricing, surgery, recovery) is tested through `separable_conv` in test_separable_conv.py; here
what is specific to low rank: rank choice, exactness at full rank, MAC targets, declines.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from effopt.errors import RecipeError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.core import IR, facts
from effopt.passes.base import PassContext
from tests.models import ZOO, make_input, seeded
from tests.passes.helpers import build_ir, host_kernel_context, recipe_passes, rel
from tests.passes.helpers import run_recipe_passes as rewrite

EXACT = {"name": "low_rank", "rank": "auto", "energy": 1.0, "apply": "all", "finetune": None}
REL_TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py




def dense_layers(ir: IR) -> list[str]:
    """Linear and groups=1 Conv2d nodes: what the pass may factor."""
    return [n.name for n in ir.gm.graph.nodes if n.op == "call_module" and (
        isinstance(m := ir.module_of(n), nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    rewritten: tuple[str, ...] = ()
    declined: tuple[tuple[str, str], ...] = ()


Case = tuple[nn.Module, Expected]


def mlp_case() -> Case:
    """Three Linears::

        x [2, 64] ─ linear 64→32 ─ relu ─ linear 32→32 ─ relu ─ linear 32→10
    """
    return ZOO["mlp"][0](), Expected(ZOO["mlp"][1], ("_0", "_2", "_4"))


def vgg_style_case() -> Case:
    """Biased 3×3 convs before BatchNorms, and Linear ─ BatchNorm1d ─ Linear::

        (conv ─ bn ─ relu) x2 ─ pool ─ (conv ─ bn ─ relu) x2 ─ pool ─ flatten ─ linear ─ bn1d ─ relu ─ linear
    """
    rewritten = ("features_0", "features_3", "features_7", "features_10", "classifier_0", "classifier_4")
    return ZOO["vgg_style"][0](), Expected(ZOO["vgg_style"][1], rewritten)


def tiny_transformer_case() -> Case:
    """Linears on [N, L, C] (attention projections, MLP, head) around matmuls and residual adds::

        x ─┬─ q/k/v ─ attention ─ proj ─ add ─┬─ fc1 ─ gelu ─ fc2 ─ add ─ ... ─ head
           └──────────────────────────────┘  └─────────────────────┘
    """
    names = [f"layers_{i}_{p}" for i in range(2) for p in ("attn_q", "attn_k", "attn_v", "attn_proj", "fc1", "fc2")]
    return ZOO["tiny_transformer"][0](), Expected(ZOO["tiny_transformer"][1], (*names, "head"))


def mobilenet_style_case() -> Case:
    """Depthwise convs are declined; 3×3 stem and 1×1 convs are factored::

        stem 3×3 ─┬─ dw g=16 ─ pw 1×1 ─ add ─ pw ─ dw g=64 ─ pw ─ ... ─ head 1×1 ─ classifier
                  └─────────────────────┘
    """
    grouped = "grouped conv"
    rewritten = ("stem_0", "blocks_0_conv_3", "blocks_1_conv_0", "blocks_1_conv_6", "blocks_2_conv_0",
                 "blocks_2_conv_6", "head_0", "classifier")
    declined = (("blocks_0_conv_0", grouped), ("blocks_1_conv_3", grouped), ("blocks_2_conv_3", grouped))
    return ZOO["mobilenet_style"][0](), Expected(ZOO["mobilenet_style"][1], rewritten, declined)


def shared_module_net_case() -> Case:
    """A conv module called twice is left alone at both call sites::

        stem ─ relu ─ shared ─ bn_a ─ relu ─ shared ─ bn_b ─ relu ─ pool ─ fc
    """
    reason = "shared by several call sites"
    return ZOO["shared_module_net"][0](), Expected(ZOO["shared_module_net"][1], ("stem", "fc"),
                                                   (("shared", reason), ("shared_1", reason)))


def conv1d_net_case() -> Case:
    """Conv1d layers are not factored (only Conv2d and Linear); the Linear is::

        conv1d ─ bn ─ relu ─ conv1d ─ bn ─ relu ─ pool ─ flatten ─ linear
    """
    reason = "Conv1d is neither nn.Linear nor nn.Conv2d"
    return ZOO["conv1d_net"][0](), Expected(ZOO["conv1d_net"][1], ("_8",), (("_0", reason), ("_3", reason)))


class StridedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 12, (3, 5), stride=2, padding=(2, 1), dilation=(1, 2), padding_mode="reflect")
        self.fc = nn.Linear(12, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def strided_case() -> Case:
    """Stride, padding, dilation, reflect padding and bias on the K×K factor; a bias-less Linear::

        x ─ conv 3×5 (stride 2, padding (2, 1), dilation (1, 2), reflect) ─ mean ─ fc (no bias)
    """
    with seeded(5):
        model = StridedNet().eval()
    return model, Expected((2, 4, 15, 17), ("conv", "fc"))


def nothing_to_do_case() -> Case:
    """No Linear and no conv::

        x ─ relu ─ maxpool
    """
    return nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)).eval(), Expected((2, 3, 8, 8))


CASES: dict[str, Callable[[], Case]] = {f.__name__.removesuffix("_case"): f for f in (
    mlp_case, vgg_style_case, tiny_transformer_case, mobilenet_style_case, shared_module_net_case,
    conv1d_net_case, strided_case, nothing_to_do_case)}


# --- structure and numerics -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_factors_exactly_the_expected_layers(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    shared = [n for n, w in expected.declined if "shared" in w]
    assert sorted(dense_layers(ir)) == sorted([*expected.rewritten, *shared]), "precondition: the builder's layers"
    # execute
    ir, record = rewrite(ir, EXACT)
    # assert
    result = record.result
    assert result.changed == expected.rewritten
    assert [s.node for s in result.skipped] == [n for n, _ in expected.declined]
    for skip, (_, words) in zip(result.skipped, expected.declined):
        assert words in skip.reason, skip
    factors = [f"{n}_{part}" for n in expected.rewritten for part in ("down", "up")]
    assert sorted(dense_layers(ir)) == sorted([*factors, *shared])


@pytest.mark.parametrize("name", list(CASES))
def test_exact_at_full_rank(name: str) -> None:
    model, expected = CASES[name]()
    x = make_input((3, *expected.shape[1:]), seed=7) if name != "tiny_transformer" else make_input((3, 16, 32), seed=7)
    ir, _ = rewrite(build_ir(model, expected.shape), EXACT)
    with torch.no_grad():
        y0, y = model(x), ir.gm(x)
    assert rel(y, y0) < REL_TOL, rel(y, y0)


@pytest.mark.parametrize("name", ["vgg_style", "strided"])
def test_tucker2_is_exact_at_full_ranks(name: str) -> None:
    model, expected = CASES[name]()
    ir, record = rewrite(build_ir(model, expected.shape), EXACT | {"decomposition": "tucker2"})
    convs = [n for n in expected.rewritten if not n.startswith(("classifier", "fc"))]
    for n in convs:
        chain = [m for m in ir.gm.graph.nodes if m.name in (f"{n}_down", f"{n}_core", f"{n}_up")]
        assert [ir.module_of(m).kernel_size for m in chain][0::2] == [(1, 1), (1, 1)], n
        assert f"{n}.rank_out" in record.result.stats and f"{n}.rank_in" in record.result.stats
    x = make_input((3, *expected.shape[1:]), seed=8)
    with torch.no_grad():
        assert rel(ir.gm(x), model(x)) < 1e-4


def test_tucker2_declines_1x1_convs() -> None:
    model, expected = mobilenet_style_case()
    _, record = rewrite(build_ir(model, expected.shape), EXACT | {"decomposition": "tucker2"})
    assert record.result.changed == ("stem_0", "classifier")
    assert sum("Tucker-2 would give three 1×1 convs" in s.reason for s in record.result.skipped) == 6


def test_error_falls_with_the_rank() -> None:
    model, expected = mlp_case()
    errors = []
    for r in range(1, 33):
        _, record = rewrite(build_ir(model, expected.shape), {"name": "low_rank", "rank": r, "apply": "all", "layers": {"include": ["_2"]}})
        errors.append(record.result.stats["_2.relative_error"])
    assert errors[0] > 0.5, "precondition: rank 1 really approximates"
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] == 0.0


def test_flop_reduction_is_met_per_layer_through_the_facts() -> None:
    model, expected = vgg_style_case()
    ir = build_ir(model, expected.shape)
    macs_before = {n.name: facts(n).macs for n in ir.compute_nodes()}
    ir, record = rewrite(ir, {"name": "low_rank", "flop_reduction": 0.5, "apply": "all"})
    after = {n.name: facts(n).macs for n in ir.compute_nodes()}
    assert record.result.changed, "precondition: layers were factored"
    for n in record.result.changed:
        assert after[f"{n}_down"] + after[f"{n}_up"] <= 0.5 * macs_before[n], n
    assert record.after.macs < record.before.macs


def test_rank_above_full_rank_is_declined() -> None:
    """mlp: 64 → 32 and 32 → 32 have full rank 32, so rank 20 factors them; 32 → 10 has full rank 10."""
    model, expected = mlp_case()
    _, record = rewrite(build_ir(model, expected.shape), {"name": "low_rank", "rank": 20, "apply": "all"})
    assert record.result.changed == ("_0", "_2")
    assert record.result.stats["_0.rank"] == record.result.stats["_2.rank"] == 20
    (skip,) = record.result.skipped
    assert skip.node == "_4" and skip.reason == "rank 20 is above the full rank 10 of a 32 → 10 Linear"


def test_profitable_selection_prices_a_memory_bound_linear() -> None:
    """Linear 2880 → 128 at batch 1 on x86-avx2 moves 1.47 MB of weights: factored at half the MACs it moves
    about half the bytes, so it pays; at full rank it moves more and is declined, with the numbers."""
    with seeded(2):
        model = nn.Sequential(nn.Linear(2880, 128)).eval()
    half, _ = rewrite(build_ir(model, (1, 2880)), {"name": "low_rank", "flop_reduction": 0.5})
    _, full = rewrite(build_ir(model, (1, 2880)), {"name": "low_rank", "rank": 128})
    _, gpu = rewrite(build_ir(model, (1, 2880)), {"name": "low_rank", "flop_reduction": 0.5},
                     ctx=PassContext(profile=load_profile("a100")))
    assert [n.name for n in half.compute_nodes()] == ["_0_down", "_0_up"]
    assert full.result.changed == () and full.result.skipped[0].reason.startswith("not profitable on x86-avx2")
    assert gpu.result.changed == () and "not profitable on a100" in gpu.result.skipped[0].reason


# --- export, quantize, options ---------------------------------------------------------------


def test_factored_model_exports_to_onnx_and_quantizes(tmp_path: Path) -> None:
    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.verify import compare_onnx
    from effopt.optimizer.quant.schemes import QuantConv, QuantLinear

    model, expected = vgg_style_case()
    g = torch.Generator().manual_seed(0)
    calibration = DataSource("random", TensorDataset(torch.randn(64, 3, 16, 16, generator=g)), 16, False)
    ctx = PassContext(profile=host_kernel_context().profile, calibration=calibration)
    float_ir, _ = rewrite(build_ir(model, expected.shape), "fold_batchnorm",
                          {"name": "low_rank", "flop_reduction": 0.5, "apply": "all"}, ctx=ctx)
    x = make_input((6, 3, 16, 16), seed=4)
    path = export_onnx(float_ir.gm.eval(), float_ir.example_inputs, ["x"], [True], tmp_path / "lr.onnx")
    assert compare_onnx(path, float_ir.gm, [(x,)], rtol=1e-4, atol=1e-5).passed
    ir, _ = rewrite(copy.deepcopy(float_ir), "quantize", ctx=ctx)
    assert sum(isinstance(m, (QuantConv, QuantLinear)) for m in ir.gm.modules()) == 2 * len(expected.rewritten)
    with torch.no_grad():
        assert rel(ir.gm(x), float_ir.gm(x)) < 0.1
    qpath = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "q.onnx")
    assert compare_onnx(qpath, ir.gm, [(x,)], rtol=0.05, atol=0.05).passed


@pytest.mark.parametrize(("entry", "words"), [
    ({"energy": 0.8, "flop_reduction": 0.5}, "give energy or flop_reduction, not both"),
    ({"rank": 4, "energy": 0.8}, "apply to rank: auto only"),
    ({"flop_reduction": 1.0}, "passes[0].flop_reduction"),
    ({"decomposition": "cp"}, "passes[0].decomposition"),
    ({"multiplier": 2}, "passes[0].multiplier: unknown field"),
])
def test_bad_options_fail_when_the_recipe_loads(entry: dict, words: str) -> None:
    with pytest.raises(RecipeError) as e:
        recipe_passes({"name": "low_rank"} | entry)
    assert words in str(e.value), str(e.value)
