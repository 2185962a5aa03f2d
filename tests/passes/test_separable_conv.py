"""Tests for effopt.passes.separable_conv: surgery, exactness, selection by the cost model, skips, recovery.

Every case is a named builder returning ``(module, Expected)``; the same list drives the
structure and numerics tests. Each test first asserts its precondition (there are dense K×K
convs to rewrite, the error really is non-zero below full rank), so it cannot pass while the
pass does nothing. Passes are built from plain dicts through the recipe validator and run
through the pass manager, as a recipe runs them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from effopt.errors import PassError, RecipeError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource, sklearn_digits
from effopt.optimizer.ir.core import IR, facts
from effopt.optimizer.train.finetune import FineTuner
from effopt.passes.base import PassContext
from tests.models import ZOO, make_input, seeded
from tests.passes.helpers import build_ir, host_kernel_context, recipe_passes, rel
from tests.passes.helpers import run_recipe_passes as rewrite

EXACT = {"name": "separable_conv", "multiplier": "auto", "energy": 1.0, "apply": "all", "finetune": None}
REL_TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- helpers ----------------------------------------------------------------------------------




def dense_kxk_convs(ir: IR) -> list[str]:
    """Node names of groups=1 convs with a kernel larger than 1×1: what the pass rewrites."""
    return [n.name for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(m := ir.module_of(n), nn.Conv2d)
            and m.groups == 1 and m.kernel_size != (1, 1)]


def random_source(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> DataSource:
    g = torch.Generator().manual_seed(seed)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    rewritten: tuple[str, ...] = ()
    declined: tuple[tuple[str, str], ...] = ()   # (node, words its Skip reason must contain)


Case = tuple[nn.Module, Expected]


def vgg_style_case() -> Case:
    """3×3 convs with bias, each before a BatchNorm that stays (carried after the pointwise conv)::

        (conv+b ─ bn ─ relu) x2 ─ pool ─ (conv+b ─ bn ─ relu) x2 ─ pool ─ flatten ─ linear ─ bn1d ─ linear
    """
    rewritten = ("features_0", "features_3", "features_7", "features_10")
    return ZOO["vgg_style"][0](), Expected(ZOO["vgg_style"][1], rewritten)


def resnet_style_case() -> Case:
    """Residual adds; bias-less 3×3 convs; a 1×1 strided shortcut, which has nothing to separate::

        conv1 ─ bn ─┬─ conv ─ bn ─ relu ─ conv ─ bn ─ add ─┬─ conv/2 ─ ... ─ add ─ fc
                    └────────────────────────────────────┘└─ 1×1/2 ─ bn ─┘
    """
    rewritten = ("conv1", "layer1_conv1", "layer1_conv2", "layer2_conv1", "layer2_conv2")
    return ZOO["resnet_style"][0](), Expected(ZOO["resnet_style"][1], rewritten, (("layer2_downsample_0", "1×1 kernel"),))


def mobilenet_style_case() -> Case:
    """Depthwise convs are already separated, and the 1×1 convs have nothing to separate::

        stem 3×3 ─ bn ─┬─ dw g=16 ─ pw ─ add ─ pw ─ dw g=64 ─ pw ─ ... ─ head 1×1 ─ classifier
                       └────────────────┘
    """
    pw, dw = "1×1 kernel", "already depthwise"
    declined = (("blocks_0_conv_0", dw), ("blocks_0_conv_3", pw), ("blocks_1_conv_0", pw), ("blocks_1_conv_3", dw),
                ("blocks_1_conv_6", pw), ("blocks_2_conv_0", pw), ("blocks_2_conv_3", dw), ("blocks_2_conv_6", pw),
                ("head_0", pw))
    return ZOO["mobilenet_style"][0](), Expected(ZOO["mobilenet_style"][1], ("stem_0",), declined)


def concat_net_case() -> Case:
    """Two branches joined by cat::

           ┌─ conv_a 3×3 (no bias) ─ bn_a ─┐
        x ─┤                               cat ─ fuse 1×1
           └─ conv_b 1×1 (bias)    ─ bn_b ─┘
    """
    declined = (("conv_b", "1×1 kernel"), ("fuse", "1×1 kernel"))
    return ZOO["concat_net"][0](), Expected(ZOO["concat_net"][1], ("conv_a",), declined)


def fanout_net_case() -> Case:
    """The conv output feeds both its BN and the add; the rewrite keeps the value, so both see the same::

        x ─ conv ─ c ─ bn ─ add ─ relu
                   └────────┘
    """
    return ZOO["fanout_net"][0](), Expected(ZOO["fanout_net"][1], ("conv",))


def shared_module_net_case() -> Case:
    """One conv module called twice cannot be replaced at one call site only::

        stem ─ relu ─ shared ─ bn_a ─ relu ─ shared ─ bn_b ─ relu ─ pool ─ fc
    """
    reason = "module 'shared' is shared by several call sites"
    return ZOO["shared_module_net"][0](), Expected(ZOO["shared_module_net"][1], ("stem",),
                                                   (("shared", reason), ("shared_1", reason)))


class GeometryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(4, 12, (3, 5), stride=2, padding=(2, 1), dilation=(1, 2), padding_mode="reflect")
        self.relu = nn.ReLU()
        self.same = nn.Conv2d(12, 10, 3, padding="same", dilation=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.same(self.relu(self.strided(x)))


def geometry_case() -> Case:
    """Every geometry the depthwise conv must take over::

        x ─ strided 3×5 (stride 2, padding (2, 1), dilation (1, 2), reflect, bias) ─ relu
          ─ same 3×3 (padding 'same', dilation 2, no bias)
    """
    with seeded(3):
        model = GeometryNet().eval()
    return model, Expected((2, 4, 15, 17), ("strided", "same"))


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1_weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.conv1_bias = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, self.conv1_weight, self.conv1_bias, padding=1))


def functional_conv_case() -> Case:
    """``F.conv2d`` in a forward: lifted to a module (``conv1``), then rewritten::

        x ─ F.conv2d(conv1_weight, conv1_bias, padding=1) ─ relu
    """
    with seeded(4):
        model = FunctionalConv().eval()
    return model, Expected((2, 3, 8, 8), ("conv1",))


def nothing_to_do_case() -> Case:
    """An MLP: no conv at all, so nothing is rewritten and nothing is skipped::

        x ─ linear ─ relu ─ linear ─ relu ─ linear
    """
    return ZOO["mlp"][0](), Expected(ZOO["mlp"][1])


CASES: dict[str, Callable[[], Case]] = {f.__name__.removesuffix("_case"): f for f in (
    vgg_style_case, resnet_style_case, mobilenet_style_case, concat_net_case, fanout_net_case,
    shared_module_net_case, geometry_case, functional_conv_case, nothing_to_do_case)}


# --- structure and numerics -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_rewrites_exactly_the_expected_layers(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    if name != "functional_conv":
        assert dense_kxk_convs(ir) == [n for n in expected.rewritten] + [n for n, w in expected.declined if "shared" in w]
    # execute
    ir, record = rewrite(ir, EXACT)
    # assert
    result = record.result
    assert result.changed == expected.rewritten
    assert result.stats["rewritten_layers"] == len(expected.rewritten)
    assert [s.node for s in result.skipped] == [n for n, _ in expected.declined]
    for skip, (_, words) in zip(result.skipped, expected.declined):
        assert words in skip.reason, skip
    assert dense_kxk_convs(ir) == [n for n, w in expected.declined if "shared" in w]
    for node in expected.rewritten:
        dw, pw = (n for n in ir.gm.graph.nodes if n.name in (f"{node}_depthwise", f"{node}_pointwise"))
        assert ir.module_of(dw).groups == ir.module_of(dw).in_channels and ir.module_of(pw).kernel_size == (1, 1)
        assert list(dw.users) == [pw]


@pytest.mark.parametrize("name", list(CASES))
def test_exact_at_full_multiplier(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    x = make_input((3, *expected.shape[1:]), seed=7)
    # execute
    ir, _ = rewrite(ir, EXACT)
    # assert
    with torch.no_grad():
        y0, y = model(x), ir.gm(x)
    assert y.shape == y0.shape and rel(y, y0) < REL_TOL, rel(y, y0)


def test_vgg_style_at_m_equals_k_squared_matches_the_original() -> None:
    """A VGG-style model rewritten at m = K² = 9 everywhere, BatchNorms folded first."""
    model, expected = vgg_style_case()
    ir = build_ir(model, expected.shape)
    ir, record = rewrite(ir, "fold_batchnorm", {"name": "separable_conv", "multiplier": 9, "apply": "all"})
    assert record.result.changed == expected.rewritten
    assert all(record.result.stats[f"{n}.multiplier"] == 9 for n in expected.rewritten)
    x = make_input((4, 3, 16, 16), seed=1)
    with torch.no_grad():
        assert rel(ir.gm(x), model(x)) < REL_TOL


def test_error_falls_with_the_multiplier() -> None:
    model, expected = vgg_style_case()
    x = make_input((8, 3, 16, 16), seed=2)
    kernel, output = [], []
    for m in range(1, 10):
        ir, record = rewrite(build_ir(model, expected.shape), {"name": "separable_conv", "multiplier": m, "apply": "all"})
        kernel.append([record.result.stats[f"{n}.relative_error"] for n in expected.rewritten])
        with torch.no_grad():
            output.append(rel(ir.gm(x), model(x)))
    assert kernel[0][0] > 0.1, "precondition: m = 1 really is an approximation"
    for layer in zip(*kernel):
        assert all(a > b or a == b == 0.0 for a, b in zip(layer, layer[1:])) and layer[-1] == 0.0, layer
    assert output[0] > output[3] > output[-1] and output[-1] < REL_TOL, output


def test_issue_mac_numbers_through_the_facts() -> None:
    """3×3 conv, 64 → 128, on 112×112: 924,844,032 MACs; at m = 1, 7,225,344 depthwise + 102,760,448 pointwise."""
    with seeded(0):
        model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False)).eval()
    ir = build_ir(model, (1, 64, 112, 112))
    (conv,) = [n for n in ir.compute_nodes()]
    assert facts(conv).macs == 924_844_032
    ir, _ = rewrite(ir, {"name": "separable_conv", "multiplier": 1, "apply": "all"})
    assert [(n.name, facts(n).macs) for n in ir.compute_nodes()] == [("_0_depthwise", 7_225_344),
                                                                    ("_0_pointwise", 102_760_448)]


def test_geometry_and_bias_are_kept() -> None:
    model, expected = geometry_case()
    ir, _ = rewrite(build_ir(model, expected.shape), EXACT)
    strided_dw, strided_pw = ir.gm.get_submodule("strided.depthwise"), ir.gm.get_submodule("strided.pointwise")
    assert (strided_dw.stride, strided_dw.padding, strided_dw.dilation, strided_dw.padding_mode) == \
        ((2, 2), (2, 1), (1, 2), "reflect")
    assert strided_dw.bias is None and torch.equal(strided_pw.bias, model.strided.bias)
    assert strided_pw.stride == (1, 1) and strided_pw.padding == (0, 0)
    same_dw, same_pw = ir.gm.get_submodule("same.depthwise"), ir.gm.get_submodule("same.pointwise")
    assert same_dw.padding == "same" and same_dw.dilation == (2, 2) and same_pw.bias is None


def test_a_following_batchnorm_is_carried_when_not_folded() -> None:
    model, expected = vgg_style_case()
    ir, _ = rewrite(build_ir(model, expected.shape), EXACT)
    bn = next(n for n in ir.gm.graph.nodes if n.name == "features_1")
    assert isinstance(ir.module_of(bn), nn.BatchNorm2d) and bn.args[0].name == "features_0_pointwise"


def test_the_callers_model_is_not_edited() -> None:
    model, expected = vgg_style_case()
    before = copy.deepcopy(model.state_dict())
    rewrite(build_ir(model, expected.shape), EXACT)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_second_run_has_nothing_left_to_rewrite() -> None:
    model, expected = vgg_style_case()
    ir, first = rewrite(build_ir(model, expected.shape), EXACT)
    assert first.result.modified, "precondition: the first run rewrote something"
    ir, second = rewrite(ir, EXACT)
    assert not second.result.modified
    assert {s.reason.split(" (")[0] for s in second.result.skipped} == {"already depthwise", "1×1 kernel: nothing to separate"}


# --- selection by the cost model, and declines ------------------------------------------------


def cifar_conv() -> tuple[nn.Module, tuple[int, ...]]:
    """One 3×3 conv 64 → 128 on a 16×16 map (a VGG layer on CIFAR)."""
    with seeded(1):
        return nn.Sequential(nn.Conv2d(64, 128, 3, padding=1)).eval(), (1, 64, 16, 16)


def test_profitable_selection_follows_the_target() -> None:
    """x86-avx2: the dense conv is compute-bound (~51 µs), the separable pair ~13 µs: rewritten. a100: both are
    dominated by the 5 µs per-op overhead, so two ops lose to one: left alone, with the numbers."""
    model, shape = cifar_conv()
    entry = {"name": "separable_conv", "multiplier": 1}
    _, cpu = rewrite(build_ir(model, shape), entry)
    _, gpu = rewrite(build_ir(model, shape), entry, ctx=PassContext(profile=load_profile("a100")))
    assert cpu.result.changed == ("_0",)
    stats = cpu.result.stats
    assert stats["_0.predicted_after_s"] < stats["_0.predicted_before_s"] / 2
    (note,) = [w for w in cpu.result.warnings if w.startswith("'_0'")]
    assert "m=1, relative error" in note and "µs on x86-avx2" in note and "_0_depthwise → _0_pointwise" in note
    assert gpu.result.changed == () and len(gpu.result.skipped) == 1
    assert gpu.result.skipped[0].reason.startswith("not profitable on a100: predicted")
    assert cpu.after.macs < cpu.before.macs / 8 and gpu.after.macs == gpu.before.macs


@pytest.mark.parametrize(("options", "words"), [
    ({"multiplier": 1, "max_error": 0.05}, "is above max_error 0.05"),
    ({"multiplier": 16, "apply": "all"}, "multiplier 16 is above K² = 9"),
    ({"layers": {"exclude": ["_*"]}}, "excluded by layers.exclude ('_*')"),
    ({"layers": {"include": ["features.*"]}}, "not matched by layers.include"),
])
def test_declines_with_a_reason(options: dict, words: str) -> None:
    model, shape = cifar_conv()
    ir = build_ir(model, shape)
    code = ir.gm.code
    ir, record = rewrite(ir, {"name": "separable_conv"} | options)
    assert not record.result.modified and ir.gm.code == code
    (skip,) = record.result.skipped
    assert skip.node == "_0" and words in skip.reason, skip.reason


def test_profitable_without_a_profile_says_what_to_do() -> None:
    model, shape = cifar_conv()
    _, record = rewrite(build_ir(model, shape), {"name": "separable_conv"}, ctx=PassContext())
    assert "needs a target profile" in record.result.skipped[0].reason


def test_order_after_fold_batchnorm_is_enforced() -> None:
    model, expected = vgg_style_case()
    with pytest.raises(RecipeError, match="'separable_conv' must run after 'fold_batchnorm'"):
        rewrite(build_ir(model, expected.shape), EXACT, "fold_batchnorm")


# --- refit ------------------------------------------------------------------------------------


def test_refit_matches_the_layer_outputs_better() -> None:
    model, expected = vgg_style_case()
    entry = {"name": "separable_conv", "multiplier": 1, "apply": "all", "finetune": None}
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=random_source(expected.shape, n=128))
    plain, _ = rewrite(build_ir(model, expected.shape), "fold_batchnorm", entry, ctx=ctx)
    refit, record = rewrite(build_ir(model, expected.shape), "fold_batchnorm", entry | {"refit": True}, ctx=ctx)
    stats = record.result.stats
    for n in expected.rewritten:
        assert stats[f"{n}.output_error_after_refit"] < stats[f"{n}.output_error_before_refit"], n
    assert all("after refit" in w for w in record.result.warnings if w.startswith("'"))
    x = make_input((64, 3, 16, 16), seed=11)  # fresh samples of the calibration distribution
    with torch.no_grad():
        assert rel(refit.gm(x), model(x)) < rel(plain.gm(x), model(x))


def test_refit_without_calibration_data_is_an_error() -> None:
    model, shape = cifar_conv()
    with pytest.raises(PassError, match="refit: true needs calibration data"):
        rewrite(build_ir(model, shape), {"name": "separable_conv", "apply": "all", "refit": True})


# --- export, quantize, recovery ---------------------------------------------------------------


def test_rewritten_model_exports_to_onnx_and_agrees(tmp_path: Path) -> None:
    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.verify import compare_onnx

    model, expected = resnet_style_case()
    ir, _ = rewrite(build_ir(model, expected.shape), "fold_batchnorm",
                    {"name": "separable_conv", "multiplier": 2, "apply": "all"})
    path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "sep.onnx")
    import onnx

    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert sum(g > 1 for g in groups) == len(expected.rewritten)  # the depthwise convs
    assert compare_onnx(path, ir.gm, [(make_input((5, 3, 16, 16), seed=5),)], rtol=1e-4, atol=1e-5).passed


def test_rewritten_model_quantizes_and_runs_int8_in_onnxruntime(tmp_path: Path) -> None:
    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.verify import compare_onnx
    from effopt.optimizer.quant.schemes import QuantConv

    model, expected = vgg_style_case()
    ctx = PassContext(profile=host_kernel_context().profile, calibration=random_source(expected.shape))
    float_ir, _ = rewrite(build_ir(model, expected.shape), "fold_batchnorm",
                          {"name": "separable_conv", "multiplier": 2, "apply": "all"}, ctx=ctx)
    ir, _ = rewrite(copy.deepcopy(float_ir), "quantize", ctx=ctx)
    depthwise = [m for m in ir.gm.modules() if isinstance(m, QuantConv) and m.conv.groups > 1]
    assert len(depthwise) == len(expected.rewritten)
    x = make_input((8, 3, 16, 16), seed=6)
    with torch.no_grad():
        assert rel(ir.gm(x), float_ir.gm(x)) < 0.1
    path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "q.onnx")
    assert compare_onnx(path, ir.gm, [(x,)], rtol=0.05, atol=0.05).passed


def _digits(checkpoint: Path) -> tuple[nn.Module, DataSource, DataSource]:
    from examples.digits import DigitsNet

    model = DigitsNet()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    train = DataSource("sklearn-digits:train", sklearn_digits("train"), 64, True)
    return model.eval(), train, DataSource("sklearn-digits:test", sklearn_digits("test"), 128, True)


def test_fine_tuning_recovers_the_digits_accuracy(digits_checkpoint: Path) -> None:
    """m = 2 everywhere on the trained digits net, refit, then 60 steps of distillation: top-1 climbs back."""
    model, train, test = _digits(digits_checkpoint)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=train,
                      services={"finetune": FineTuner(train, test, "classification", seed=0)})
    entry = {"name": "separable_conv", "multiplier": 2, "apply": "all", "refit": True,
             "finetune": {"steps": 60, "lr": 3e-3, "eval_every": 20, "progress": False}}
    ir, record = rewrite(build_ir(model, (1, 1, 8, 8)), "fold_batchnorm", entry, ctx=ctx)
    stats = record.result.stats
    assert stats["finetune_steps"] == 60
    assert stats["finetune_initial_headline"] < 0.9, "precondition: the rewrite at m = 2 really lost accuracy"
    assert stats["finetune_best_headline"] > stats["finetune_initial_headline"] + 0.2
    assert any(w.startswith("fine-tuned 60 steps") for w in record.result.warnings)
    assert not ir.gm.training


def test_finetune_needs_the_service_only_when_asked_for() -> None:
    model, shape = cifar_conv()
    _, record = rewrite(build_ir(model, shape), {"name": "separable_conv", "multiplier": 1})
    assert any(w.startswith("not fine-tuned: the recipe has no data.train") for w in record.result.warnings)
    with pytest.raises(PassError, match="finetune: needs training data"):
        rewrite(build_ir(model, shape), {"name": "separable_conv", "multiplier": 1, "finetune": {"epochs": 1}})


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "words"), [
    ({"multiplier": 2, "energy": 0.8}, "energy applies to multiplier: auto only"),
    ({"multiplier": 0}, "passes[0].multiplier"),
    ({"apply": "sometimes"}, "passes[0].apply"),
    ({"rank": 3}, "passes[0].rank: unknown field"),
    ({"finetune": {"epochs": 1, "steps": 2}}, "not both"),
])
def test_bad_options_fail_when_the_recipe_loads(entry: dict, words: str) -> None:
    with pytest.raises(RecipeError) as e:
        recipe_passes({"name": "separable_conv"} | entry)
    assert words in str(e.value), str(e.value)


# --- the shipped recipe -----------------------------------------------------------------------


def test_digits_separable_recipe_compiles(tmp_path: Path, digits_checkpoint: Path) -> None:
    """The shipped recipe as written, less fine-tuning budget (2 epochs, a looser accuracy goal): ~15 s."""
    import effopt

    root = Path(__file__).resolve().parents[2]
    text = (root / "recipes" / "digits_separable.yaml").read_text()
    for old, new in [("checkpoints/digits.pt", str(digits_checkpoint)), ("pythonpath: [..]", f'pythonpath: ["{root}"]'),
                     ("../out/digits_separable", "out"), ("epochs: 10", "epochs: 2")]:
        assert old in text, f"recipes/digits_separable.yaml changed; update this test's edit of {old!r}"
        text = text.replace(old, new)
    (tmp_path / "digits_separable.yaml").write_text(text.replace("max_accuracy_drop: 0.01", "max_accuracy_drop: 0.2"))
    result = effopt.compile(tmp_path / "digits_separable.yaml")
    assert result.passed, result.report.failures()
    sep = result.report.passes[-1]
    assert sep.name == "separable_conv" and sep.result.changed == ("conv1", "conv2", "conv3")
    assert (tmp_path / "out" / "model.onnx").is_file()
