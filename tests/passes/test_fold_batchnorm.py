"""Tests for effopt.passes.fold_batchnorm: weight math, graph surgery, skips and the cost delta.

Every case is a named builder returning ``(module, Expected)``; the same list drives the
numerics, structure and delta tests. Each test first asserts its precondition (there are
BatchNorm sites, the statistics are not the identity, a conv really lacks a bias), so it
cannot pass while the pass does nothing. Passes are built the way a recipe builds them,
from a plain dict through `parse_recipe`, and run through the pass manager, which fills
the cost delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effopt.errors import IRError, RecipeError
from effopt.optimizer.frontend.data import sklearn_digits
from effopt.optimizer.ir.core import IR, facts
from effopt.passes.base import PassContext
from effopt.passes.manager import PassRecord, run_passes
from effopt.passes.fold_batchnorm import fold_bn_into_weights
from examples.digits import DigitsNet
from tests.passes.helpers import build_ir, recipe_passes
from tests.models import ZOO, randomize_bn, seeded

RTOL = 1e-5
ATOL = 1e-6


# --- helpers ----------------------------------------------------------------------------------




def fold(ir: IR) -> tuple[IR, PassRecord]:
    ir, records = run_passes(ir, recipe_passes("fold_batchnorm"), PassContext())
    (record,) = records
    return ir, record


def bn_nodes(ir: IR) -> list[fx.Node]:
    return [n for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(ir.module_of(n), _BatchNorm)]


def bn_module_names(gm: nn.Module) -> set[str]:
    return {name for name, m in gm.named_modules() if isinstance(m, _BatchNorm)}


def inputs_like(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Random inputs at the example batch and at another batch size (the graph is batch-agnostic)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(shape, generator=g), torch.randn((5, *shape[1:]), generator=g)]


def assert_bn_statistics_nontrivial(model: nn.Module) -> None:
    """A BN with mean 0 / var 1 / weight 1 / bias 0 is the identity and would hide a no-op fold."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns, "precondition: the model has BatchNorm layers"
    for bn in bns:
        if bn.running_mean is not None:
            assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        if bn.affine:
            assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What folding must do to a builder's model."""

    shape: tuple[int, ...]                        # input shape, batch first
    folded: tuple[str, ...] = ()                  # BN nodes folded, in graph order
    declined: tuple[tuple[str, str], ...] = ()    # (BN node, words its Skip reason must contain)

    @property
    def sites(self) -> tuple[str, ...]:
        return self.folded + tuple(name for name, _ in self.declined)


Case = tuple[nn.Module, Expected]


def resnet_style_case() -> Case:
    """Residual adds and a 1x1 downsample shortcut; every conv is bias-less (see tests/models.py)::

        conv1 ─ bn1 ─ relu ─┬─ conv ─ bn ─ relu ─ conv ─ bn ─ add ─ ... ─ fc
                            └──────────────────────────────────┘
    """
    model = ZOO["resnet_style"][0]()
    folded = ("bn1", "layer1_bn1", "layer1_bn2", "layer2_downsample_1", "layer2_bn1", "layer2_bn2")
    return model, Expected(ZOO["resnet_style"][1], folded=folded)


def vgg_style_case() -> Case:
    """Biased convs before BN2d, and Linear ─ BatchNorm1d on [N, 32]::

        (conv+b ─ bn ─ relu) x4 with maxpools ─ flatten ─ linear ─ bn1d ─ relu ─ dropout ─ linear
    """
    model = ZOO["vgg_style"][0]()
    folded = ("features_1", "features_4", "features_8", "features_11", "classifier_1")
    return model, Expected(ZOO["vgg_style"][1], folded=folded)


def mobilenet_style_case() -> Case:
    """Depthwise convs (groups == channels) and linear bottlenecks with residual adds::

        stem ─ bn ─┬─ dw g=16 ─ bn ─ relu6 ─ pw ─ bn ─ add ─ pw ─ bn ─ dw g=64 ─ bn ─ ... ─ head ─ bn
                   └──────────────────────────────────┘
    """
    model = ZOO["mobilenet_style"][0]()
    folded = (
        "stem_1", "blocks_0_conv_1", "blocks_0_conv_4", "blocks_1_conv_1", "blocks_1_conv_4",
        "blocks_1_conv_7", "blocks_2_conv_1", "blocks_2_conv_4", "blocks_2_conv_7", "head_1",
    )
    return model, Expected(ZOO["mobilenet_style"][1], folded=folded)


def conv1d_net_case() -> Case:
    """Conv1d ─ BatchNorm1d on [N, C, L], one conv with bias and one without::

        conv1d+b ─ bn1d ─ relu ─ conv1d ─ bn1d ─ relu ─ pool ─ flatten ─ linear
    """
    model = ZOO["conv1d_net"][0]()
    return model, Expected(ZOO["conv1d_net"][1], folded=("_1", "_4"))


def concat_net_case() -> Case:
    """Two conv-BN branches joined by cat::

           ┌─ conv_a (no bias) ─ bn_a ─┐
        x ─┤                           cat ─ fuse
           └─ conv_b (bias)    ─ bn_b ─┘
    """
    model = ZOO["concat_net"][0]()
    return model, Expected(ZOO["concat_net"][1], folded=("bn_a", "bn_b"))


def digits_net_case() -> Case:
    """The bundled example net with randomized BN statistics::

        conv1 ─ bn1 ─ relu ─ conv2+b ─ bn2 ─ relu ─ pool ─ conv3+b ─ bn3 ─ relu ─ gap ─ flatten
        ─ drop ─ fc1 ─ bn4 (BatchNorm1d) ─ relu ─ fc2
    """
    with seeded(0):
        model = DigitsNet()
    return randomize_bn(model, 0).eval(), Expected((4, 1, 8, 8), folded=("bn1", "bn2", "bn3", "bn4"))


def fanout_net_case() -> Case:
    """The conv output also feeds the residual add, so folding would change what the add sees::

        x ─ conv ─ c ─ bn ─ add ─ relu
                   └────────┘
    """
    model = ZOO["fanout_net"][0]()
    return model, Expected(ZOO["fanout_net"][1], declined=(("bn", "also used by add"),))


def shared_module_net_case() -> Case:
    """One conv module called twice, each call followed by a different BN::

        stem ─ relu ─ shared ─ bn_a ─ relu ─ shared ─ bn_b ─ relu ─ pool ─ fc
    """
    model = ZOO["shared_module_net"][0]()
    reason = "module 'shared' is shared by several call sites"
    return model, Expected(ZOO["shared_module_net"][1], declined=(("bn_a", reason), ("bn_b", reason)))


def bn_without_running_stats_case() -> Case:
    """A BN that normalizes with batch statistics even in eval::

        x ─ conv ─ bn (track_running_stats=False)
    """
    model = ZOO["bn_without_running_stats"][0]()
    return model, Expected(ZOO["bn_without_running_stats"][1], declined=(("bn", "track_running_stats=False"),))


class BnNotAfterLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn_relu = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_relu(self.relu(self.conv(self.bn_in(x))))


def bn_not_after_layer_case() -> Case:
    """BNs fed by the graph input and by a ReLU: there is no weight to fold into::

        x ─ bn_in ─ conv ─ relu ─ bn_relu
    """
    with seeded(1):
        model = BnNotAfterLayer()
    declined = (("bn_in", "not a Conv/Linear module output"), ("bn_relu", "input comes from ReLU"))
    return randomize_bn(model, 1).eval(), Expected((2, 3, 8, 8), declined=declined)


class Linear3dBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def linear_3d_bn_case() -> Case:
    """Linear on [N, L=8, 5] → [N, 8, C=8]; BatchNorm1d(8) normalizes axis 1 (L), not the Linear's C::

        x [N,8,5] ─ fc 5->8 ─ [N,8,8] ─ bn1d(8) over dim 1
    """
    with seeded(2):
        model = Linear3dBn()
    return randomize_bn(model, 2).eval(), Expected((2, 8, 5), declined=(("bn", "not [N, C]"),))


class SharedBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


def shared_bn_case() -> Case:
    """One BatchNorm module after two different convs: it cannot fold into both::

           ┌─ conv_a ─ bn ─┐
        x ─┤               add
           └─ conv_b ─ bn ─┘     (same bn module)
    """
    with seeded(3):
        model = SharedBn()
    reason = "BatchNorm module 'bn' is shared"
    return randomize_bn(model, 3).eval(), Expected((2, 3, 8, 8), declined=(("bn", reason), ("bn_1", reason)))


class Partial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.bn2(c) * c


def partial_case() -> Case:
    """One foldable site and one declined one: a skip must not stop the other fold::

        x ─ conv1 ─ bn1 ─ relu ─ conv2 ─ c ─ bn2 ─ mul
                                         └────────┘
    """
    with seeded(4):
        model = Partial()
    expected = Expected((2, 3, 8, 8), folded=("bn1",), declined=(("bn2", "also used by mul"),))
    return randomize_bn(model, 4).eval(), expected


ALL_FOLDABLE: dict[str, Callable[[], Case]] = {
    "resnet_style": resnet_style_case,
    "vgg_style": vgg_style_case,
    "mobilenet_style": mobilenet_style_case,
    "conv1d_net": conv1d_net_case,
    "concat_net": concat_net_case,
    "digits_net": digits_net_case,
}
DECLINING: dict[str, Callable[[], Case]] = {
    "fanout_net": fanout_net_case,
    "shared_module_net": shared_module_net_case,
    "bn_without_running_stats": bn_without_running_stats_case,
    "bn_not_after_layer": bn_not_after_layer_case,
    "linear_3d_bn": linear_3d_bn_case,
    "shared_bn": shared_bn_case,
}
CASES: dict[str, Callable[[], Case]] = {**ALL_FOLDABLE, **DECLINING, "partial": partial_case}
FOLDING = {k: v for k, v in CASES.items() if k not in DECLINING}


# --- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_folded_model_matches_original(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    assert_bn_statistics_nontrivial(model)
    ir = build_ir(model, expected.shape)
    # execute
    ir, record = fold(ir)
    # assert
    assert record.result.changed == expected.folded
    with torch.no_grad():
        for x in inputs_like(expected.shape):
            torch.testing.assert_close(ir.gm(x), model(x), rtol=RTOL, atol=ATOL)


def test_digits_net_on_real_digits() -> None:
    # setup
    model, expected = digits_net_case()
    x, _ = sklearn_digits("test").tensors
    ir = build_ir(model, expected.shape)
    # execute
    ir, record = fold(ir)
    # assert
    assert record.result.changed == expected.folded
    assert not bn_module_names(ir.gm)
    with torch.no_grad():
        before, after = model(x), ir.gm(x)
    torch.testing.assert_close(after, before, rtol=RTOL, atol=ATOL)
    assert torch.equal(after.argmax(1), before.argmax(1))


def test_trained_digits_net_keeps_its_accuracy(digits_checkpoint: Path) -> None:
    """On the trained net (`digits_checkpoint` in tests/conftest.py builds it when make demo has not)."""
    # setup
    model = DigitsNet()
    model.load_state_dict(torch.load(digits_checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    x, y = sklearn_digits("test").tensors
    ir = build_ir(model, (1, 1, 8, 8))
    # execute
    ir, record = fold(ir)
    # assert
    assert record.result.changed == ("bn1", "bn2", "bn3", "bn4")
    with torch.no_grad():
        before, after = model(x), ir.gm(x)
    # trained bn1 has running_var ~0.02 (a ~7x gain) and logits reach ~10, so float32 reordering
    # noise is ~4e-6 absolute: scale atol by the logit magnitude (still 1e-6 of it)
    torch.testing.assert_close(after, before, rtol=RTOL, atol=ATOL * float(before.abs().max()))
    assert (after.argmax(1) == y).sum() == (before.argmax(1) == y).sum()


# --- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_folds_exactly_the_expected_sites(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    nodes = bn_nodes(ir)
    assert tuple(n.name for n in nodes) == expected.sites, "precondition: the builder's BN sites, in graph order"
    declined_targets = {str(n.target) for n in nodes if n.name not in expected.folded}
    # execute
    ir, record = fold(ir)
    # assert
    result = record.result
    assert result.changed == expected.folded
    assert result.modified == bool(expected.folded)
    assert result.stats["folded"] == len(expected.folded)
    assert [n.name for n in bn_nodes(ir)] == [name for name, _ in expected.declined]
    assert bn_module_names(ir.gm) == declined_targets
    assert [s.node for s in result.skipped] == [name for name, _ in expected.declined]
    for skip, (_, words) in zip(result.skipped, expected.declined):
        assert words in skip.reason, skip


@pytest.mark.parametrize("name", list(ALL_FOLDABLE))
def test_no_batchnorm_left(name: str) -> None:
    # setup
    model, expected = ALL_FOLDABLE[name]()
    ir = build_ir(model, expected.shape)
    assert len(bn_nodes(ir)) > 0 and bn_module_names(ir.gm), "precondition: there is BatchNorm to fold"
    # execute
    ir, _ = fold(ir)
    # assert
    assert bn_nodes(ir) == []
    assert bn_module_names(ir.gm) == set()
    assert all(facts(n).op_kind != "batch_norm" for n in ir.compute_nodes())


BIASLESS = ["resnet_style", "mobilenet_style", "conv1d_net", "concat_net", "digits_net", "partial"]


@pytest.mark.parametrize("name", BIASLESS)
def test_layers_without_bias_get_the_folded_shift(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    producers = {str(n.args[0].target) for n in bn_nodes(ir) if n.name in expected.folded}
    biasless = sorted(t for t in producers if ir.gm.get_submodule(t).bias is None)
    assert biasless, "precondition: at least one folded layer has no bias"
    # execute
    ir, _ = fold(ir)
    # assert
    for target in biasless:
        layer = ir.gm.get_submodule(target)
        assert isinstance(layer.bias, nn.Parameter), target
        assert layer.bias.shape == (layer.weight.shape[0],)
        assert layer.bias.abs().sum() > 0, f"{target}: the new bias carries the BN shift, it cannot be all zero"


def test_the_callers_model_is_not_edited() -> None:
    # setup
    model, expected = resnet_style_case()
    weight_before = model.conv1.weight.detach().clone()
    # execute
    fold(build_ir(model, expected.shape))
    # assert
    assert model.conv1.bias is None
    assert torch.equal(model.conv1.weight, weight_before)
    assert len(bn_module_names(model)) == len(expected.folded)


# --- declines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DECLINING))
def test_declined_sites_are_left_untouched(name: str) -> None:
    # setup
    model, expected = DECLINING[name]()
    ir = build_ir(model, expected.shape)
    assert expected.declined and len(bn_nodes(ir)) == len(expected.declined), "precondition: BN sites exist"
    code_before = ir.gm.code
    x = inputs_like(expected.shape)[0]
    with torch.no_grad():
        y_before = ir.gm(x)
    # execute
    ir, record = fold(ir)
    # assert
    result = record.result
    assert not result.modified and result.changed == ()
    assert len(result.skipped) == len(expected.declined)
    assert all(s.reason for s in result.skipped)
    assert ir.gm.code == code_before
    assert record.result.delta is not None and record.result.delta.nodes == 0
    assert record.result.delta.params == 0 and record.result.delta.flops == 0
    with torch.no_grad():
        assert torch.equal(ir.gm(x), y_before)
        torch.testing.assert_close(ir.gm(x), model(x), rtol=RTOL, atol=ATOL)


class FunctionalBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mean", torch.tensor([0.5, -1.0, 2.0, 0.0]))
        self.register_buffer("var", torch.tensor([2.0, 0.5, 1.5, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False)


def test_functional_batch_norm_is_lifted_and_folded() -> None:
    """``x ─ conv ─ F.batch_norm(mean, var)``: the functional BN is lifted to a module (named after its
    statistics buffer), then folded like any BatchNorm."""
    # setup
    with seeded(5):
        model = FunctionalBn().eval()
    ir = build_ir(model, (2, 3, 4, 4))
    assert any(n.op == "call_function" and n.target is F.batch_norm for n in ir.gm.graph.nodes)
    # execute
    ir, record = fold(ir)
    # assert
    assert record.result.stats == {"folded": 1.0, "lifted_functional_layers": 1.0}
    assert record.result.changed == ("mean_1",) and record.result.skipped == ()
    assert not any("batch_norm" in str(n.target) for n in ir.gm.graph.nodes) and not bn_module_names(ir.gm)
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(ir.gm(x), model(x), rtol=RTOL, atol=ATOL)


def test_linear_site_without_facts_is_an_error_not_a_wrong_fold() -> None:
    """Without shapes the pass cannot tell [N, C] from [N, L, C]; it must say so, not guess."""
    # setup
    model, expected = linear_3d_bn_case()
    ir = build_ir(model, expected.shape)
    for n in ir.gm.graph.nodes:
        n.meta.pop("effopt", None)
    (fold_pass,) = recipe_passes("fold_batchnorm")
    # execute / assert
    with pytest.raises(IRError, match=r"node 'fc'.*annotate"):
        fold_pass.run(ir, PassContext())
    assert [n.name for n in bn_nodes(ir)] == ["bn"]


# --- cost delta -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FOLDING))
def test_delta_is_exactly_the_folded_batchnorms(name: str) -> None:
    # setup
    model, expected = FOLDING[name]()
    ir = build_ir(model, expected.shape)
    folded = [n for n in bn_nodes(ir) if n.name in expected.folded]
    assert len(folded) == len(expected.folded) > 0, "precondition: sites to fold"
    bns = [ir.module_of(n) for n in folded]
    layers = [ir.module_of(n.args[0]) for n in folded]
    # weight + bias per BN; running stats are buffers, not params; a bias-less layer gains a C-long bias
    params = -sum(2 * bn.num_features for bn in bns)
    params += sum(layer.weight.shape[0] for layer in layers if layer.bias is None)
    size_bytes = -sum(t.nbytes for bn in bns for t in [*bn.parameters(), *bn.buffers()])
    size_bytes += sum(layer.weight.shape[0] * layer.weight.element_size() for layer in layers if layer.bias is None)
    flops = -sum(2 * facts(n).outputs[0].numel for n in folded)  # scale + shift per output element
    # execute
    _, record = fold(ir)
    # assert
    delta = record.result.delta
    assert delta is not None
    assert delta.params == params
    assert delta.size_bytes == size_bytes
    assert delta.flops == flops
    assert delta.macs == 0
    assert delta.nodes == -len(expected.folded)
    assert record.after.nodes == record.before.nodes - len(expected.folded)


def test_delta_worked_numbers_for_resnet_style() -> None:
    """Six BNs of 8, 8, 8, 16, 16, 16 channels after bias-less convs.

    params: −2·72 (γ, β) + 72 (new biases) = −72. FLOPs: 2 per BN output element, per
    image 3·(8·16·16) + 3·(16·8·8) = 9,216 elements; batch 2 → 2·2·9,216 = 36,864.
    """
    model, expected = resnet_style_case()
    _, record = fold(build_ir(model, expected.shape))
    assert record.result.delta is not None
    assert (record.result.delta.params, record.result.delta.flops, record.result.delta.nodes) == (-72, -36864, -6)


# --- nothing to do ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "mnist_classic_cnn", "tiny_transformer"])
def test_nothing_to_fold(name: str) -> None:
    # setup
    builder, shape = ZOO[name]
    model = builder()
    ir = build_ir(model, shape)
    assert not bn_module_names(ir.gm), "precondition: no BatchNorm anywhere"
    code_before = ir.gm.code
    # execute
    ir, record = fold(ir)
    # assert
    result = record.result
    assert not result.modified
    assert result.changed == () and result.skipped == ()
    assert result.delta is not None and all(v == 0 for v in vars(result.delta).values())
    assert ir.gm.code == code_before
    x = inputs_like(shape)[0]
    with torch.no_grad():
        assert torch.equal(ir.gm(x), model(x))


def test_second_run_has_nothing_left_to_fold() -> None:
    # setup
    model, expected = vgg_style_case()
    ir, first = fold(build_ir(model, expected.shape))
    assert first.result.modified, "precondition: the first run folded something"
    # execute
    ir, second = fold(ir)
    # assert
    assert not second.result.modified and second.result.skipped == ()


# --- options ----------------------------------------------------------------------------------


def test_unknown_option_fails_when_the_recipe_loads() -> None:
    with pytest.raises(RecipeError, match=r"passes\[0\]\.eps: unknown field"):
        recipe_passes({"name": "fold_batchnorm", "eps": 1e-3})


# --- weight math ------------------------------------------------------------------------------


def test_fold_bn_into_weights_worked_example() -> None:
    """The module docstring's example: W=2, b=1, μ=3, σ²=4−ε, γ=0.5, β=1 → s=0.25, W'=0.5, b'=0.5."""
    eps = 1e-5
    w, b = fold_bn_into_weights(
        torch.tensor([[2.0]]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([4.0 - eps]), eps,
        torch.tensor([0.5]), torch.tensor([1.0]),
    )
    torch.testing.assert_close(w, torch.tensor([[0.5]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(b, torch.tensor([0.5]), rtol=1e-6, atol=0)


def test_fold_bn_into_weights_scales_output_channels() -> None:
    """Two output channels, ε = 0: s = γ/σ = [1/2, −1/0.5] = [0.5, −2].

    W' = [[1, 2]·0.5, [3, 4]·(−2)] = [[0.5, 1], [−6, −8]]
    b' = [(1 − 1)·0.5 + 0, (0 − 2)·(−2) + 3] = [0, 7]
    """
    w, b = fold_bn_into_weights(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, 0.0]),
        torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.25]), 0.0,
        torch.tensor([1.0, -1.0]), torch.tensor([0.0, 3.0]),
    )
    assert torch.equal(w, torch.tensor([[0.5, 1.0], [-6.0, -8.0]]))
    assert torch.equal(b, torch.tensor([0.0, 7.0]))


def test_fold_bn_into_weights_conv_kernel_and_dtype() -> None:
    """A [2, 3, 1, 1] conv kernel of ones scales per output channel (dim 0), not per input channel."""
    w, b = fold_bn_into_weights(
        torch.ones(2, 3, 1, 1, dtype=torch.float16), None,
        torch.tensor([1.0, 1.0]), torch.tensor([4.0, 0.25]), 0.0, torch.tensor([1.0, -1.0]), None,
    )
    assert w.dtype == b.dtype == torch.float16
    assert torch.equal(w[0], torch.full((3, 1, 1), 0.5, dtype=torch.float16))
    assert torch.equal(w[1], torch.full((3, 1, 1), -2.0, dtype=torch.float16))
    assert torch.equal(b, torch.tensor([-0.5, 2.0], dtype=torch.float16))


def test_fold_bn_into_weights_without_affine() -> None:
    """affine=False (γ, β None), ε = 0: s = 1/√4 = 0.5; W' = 2·0.5 = 1; b' = (1 − 3)·0.5 = −1, or −1.5 without bias."""
    args = (torch.tensor([3.0]), torch.tensor([4.0]), 0.0, None, None)
    w, b = fold_bn_into_weights(torch.tensor([[2.0]]), torch.tensor([1.0]), *args)
    assert torch.equal(w, torch.tensor([[1.0]])) and torch.equal(b, torch.tensor([-1.0]))
    w, b = fold_bn_into_weights(torch.tensor([[2.0]]), None, *args)
    assert torch.equal(w, torch.tensor([[1.0]])) and torch.equal(b, torch.tensor([-1.5]))


def test_fold_bn_into_weights_matches_an_affine_false_module() -> None:
    """End to end on a Conv2d ─ BatchNorm2d(affine=False) pair with random statistics."""
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = nn.BatchNorm2d(4, affine=False).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    w, b = fold_bn_into_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, None, None)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), rtol=RTOL, atol=ATOL)
