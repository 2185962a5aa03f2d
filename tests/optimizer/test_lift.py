"""Tests for effopt.optimizer.ir.lift: functional conv/linear/batch_norm calls become nn modules, bit-identically.

Every model here starts with functional layers (a ``torch.export`` program, or ``F.conv2d`` in a
forward) and each test first asserts that, so it cannot pass while the lift does nothing. Lifting
must run the same op on the same tensor objects, so outputs are compared with ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.core import IR
from effopt.optimizer.ir.lift import lift_functional_layers
from examples.digits import DigitsNet
from tests.models import ZOO, randomize_bn, seeded
from tests.passes.helpers import build_ir

LIFTABLE = ("conv", "linear", "batch_norm")
MODULE_CLASS = {"conv": nn.modules.conv._ConvNd, "linear": nn.Linear, "batch_norm": nn.modules.batchnorm._BatchNorm}


# --- helpers ----------------------------------------------------------------------------------


def exported(model: nn.Module, shape: tuple[int, ...], decompose: bool = False) -> fx.GraphModule:
    program = torch.export.export(model.eval(), (torch.randn(shape),))
    return (program.run_decompositions() if decompose else program).module()


def functional_layers(ir: IR) -> dict[str, str]:
    """call_function node name → canonical kind, for conv/linear/batch_norm."""
    kinds = {n.name: canonical_op(n, ir.gm) for n in ir.gm.graph.nodes if n.op == "call_function"}
    return {name: kind for name, kind in kinds.items() if kind in LIFTABLE}


def state_bytes(gm: nn.Module) -> int:
    """Bytes of every distinct parameter/buffer (a weight held twice would count twice)."""
    tensors = [*gm.parameters(), *gm.buffers()]
    return sum(t.nbytes for i, t in enumerate(tensors) if all(t is not u for u in tensors[:i]))


def digits() -> nn.Module:
    with seeded(0):
        return randomize_bn(DigitsNet(), seed=0).eval()


# --- whole models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    layers: int  # functional conv/linear/batch_norm calls in its export


MODELS = {
    "digits": Model(digits, (2, 1, 8, 8), 9),                              # 3 conv, 2 linear, 4 BN
    "resnet_style": Model(ZOO["resnet_style"][0], ZOO["resnet_style"][1], 13),  # 6 conv, 6 BN, 1 linear
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_layers_become_modules_with_identical_outputs(name: str) -> None:
    # setup
    spec = MODELS[name]
    model = spec.build()
    ir = build_ir(exported(model, spec.shape), spec.shape)
    before = functional_layers(ir)
    assert len(before) == spec.layers  # precondition: export gave functional layers
    x = torch.randn(spec.shape, generator=torch.Generator().manual_seed(7))  # export fixed the batch size
    with torch.no_grad():
        y_before = ir.gm(x)
    bytes_before = state_bytes(ir.gm)
    rng_before = torch.get_rng_state()
    # execute
    result = lift_functional_layers(ir)
    # assert: every layer is now a module of the right class, at the original model's path
    assert functional_layers(ir) == {}
    assert [x.old for x in result.lifted] == list(before) and result.declined == ()
    for lifted in result.lifted:
        (node,) = [n for n in ir.gm.graph.nodes if n.name == lifted.new]
        assert node.op == "call_module" and node.target == lifted.module
        assert isinstance(ir.module_of(node), MODULE_CLASS[before[lifted.old]])
        assert "val" in node.meta  # shapes stay known
    assert sorted(ir.gm.state_dict()) == sorted(model.state_dict())  # same names, nothing left behind
    assert state_bytes(ir.gm) == bytes_before  # the weights are held once
    with torch.no_grad():
        assert torch.equal(ir.gm(x), y_before)
    assert torch.equal(torch.get_rng_state(), rng_before)  # built without drawing random init
    ir.lint()


def test_lifted_modules_hold_the_very_same_tensors() -> None:
    # setup
    gm = exported(digits(), (2, 1, 8, 8))
    weight, running_var = gm.conv1.weight, gm.bn1.running_var
    ir = build_ir(gm, (2, 1, 8, 8))
    # execute
    lift_functional_layers(ir)
    # assert
    assert isinstance(ir.gm.conv1, nn.Conv2d) and ir.gm.conv1.weight is weight and ir.gm.conv1.bias is None
    assert isinstance(ir.gm.bn1, nn.BatchNorm2d) and ir.gm.bn1.running_var is running_var
    assert not ir.gm.bn1.training and ir.gm.bn1.eps == 1e-5
    assert isinstance(ir.gm.bn4, nn.BatchNorm1d)  # rank from the recorded input shape [N, 64]


def test_decomposed_export_lifts_convolution_and_no_training_batch_norm() -> None:
    """After run_decompositions: aten.convolution, _native_batch_norm_legit_no_training ─ getitem[0], and
    Linear as permute ─ addmm, which has no module form and stays, with its reason."""
    # setup
    ir = build_ir(exported(digits(), (2, 1, 8, 8), decompose=True), (2, 1, 8, 8))
    targets = {str(n.target) for n in ir.gm.graph.nodes}
    assert {"aten._native_batch_norm_legit_no_training.default", "aten.convolution.default"} <= targets
    x = torch.rand(2, 1, 8, 8)
    y_before = ir.gm(x)
    # execute
    result = lift_functional_layers(ir)
    # assert
    assert [x.module for x in result.lifted] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "bn4"]
    assert [(d.node, d.kind) for d in result.declined] == [("addmm", "linear"), ("addmm_1", "linear")]
    assert all("addmm has no nn module form" in d.reason for d in result.declined)
    assert not any("batch_norm" in str(n.target) for n in ir.gm.graph.nodes)
    assert torch.equal(ir.gm(x), y_before)


# --- small functional models ------------------------------------------------------------------


class Functional(nn.Module):
    """``F.conv1d/2d/3d``, ``F.linear`` and ``F.batch_norm`` on registered tensors, one of each."""

    def __init__(self, rank: int, padding: int | str = 1) -> None:
        super().__init__()
        self.rank, self.padding = rank, padding
        kernel = (3,) * rank
        self.conv_weight = nn.Parameter(torch.randn(4, 2, *kernel))
        self.conv_bias = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))
        self.beta = nn.Parameter(torch.randn(4))
        self.fc = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.rank]
        y = conv(x, self.conv_weight, self.conv_bias, padding=self.padding, groups=1)
        y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, training=False, eps=1e-3)
        return F.linear(y.flatten(2).mean(-1), self.fc)


@pytest.mark.parametrize("rank, padding", [(1, 1), (2, 1), (2, "same"), (3, "valid")])
def test_traced_functional_layers_lift_at_every_rank(rank: int, padding: int | str) -> None:
    # setup
    shape = (2, 2, *(5,) * rank)
    with seeded(rank):
        model = Functional(rank, padding).eval()
    ir = build_ir(model, shape)
    assert sorted(functional_layers(ir).values()) == ["batch_norm", "conv", "linear"]  # precondition
    x = torch.randn(shape)
    y_before = ir.gm(x)
    # execute
    result = lift_functional_layers(ir)
    # assert
    assert functional_layers(ir) == {} and len(result.lifted) == 3
    conv, bn, fc = (ir.gm.get_submodule(x.module) for x in result.lifted)
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]) and conv.padding == (
        padding if isinstance(padding, str) else (padding,) * rank)
    assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[rank - 1]) and bn.eps == 1e-3
    assert isinstance(fc, nn.Linear) and fc.bias is None
    assert [x.module for x in result.lifted] == ["conv", "gamma", "fc"]  # named after the weight attribute
    assert torch.equal(ir.gm(x), y_before)


class SharedWeight(nn.Module):
    """One weight read by two convs::

        x ─ F.conv2d(w) ─ F.conv2d(w) ─ out
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.weight, padding=1), self.weight, padding=1)


class ComputedWeight(nn.Module):
    """The weight depends on the input::

        x ─ mean ─ mul(w) ─┐
        x ──────────── F.conv2d ─ out
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * x.mean())


class TrainingBatchNorm(nn.Module):
    """``F.batch_norm(training=True)`` normalises with the batch's own statistics: no eval module says that."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=True)


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize(
    "build, words",
    [(SharedWeight, ("shared", "weight")), (ComputedWeight, ("computed by", "mul")),
     (TrainingBatchNorm, ("training=True",))],
    ids=["shared_weight", "computed_weight", "training_batch_norm"],
)
def test_sites_that_cannot_be_lifted_stay_with_a_reason(build: type[nn.Module], words: tuple[str, ...], export: bool) -> None:
    # setup
    shape = (2, 3, 6, 6)
    with seeded(0):
        model = build().eval()
    ir = build_ir(exported(model, shape) if export else model, shape)
    before = functional_layers(ir)
    assert before  # precondition
    code_before = ir.gm.code
    # execute
    result = lift_functional_layers(ir)
    # assert
    assert result.lifted == () and ir.gm.code == code_before
    assert [d.node for d in result.declined] == list(before)
    for d in result.declined:
        assert d.reason.startswith("functional ") and all(w in d.reason for w in words), d.reason
    assert next(iter(result.reasons())) == result.declined[0].node


def test_kinds_limits_what_is_lifted() -> None:
    # setup
    ir = build_ir(exported(digits(), (2, 1, 8, 8)), (2, 1, 8, 8))
    # execute
    result = lift_functional_layers(ir, frozenset({"conv", "linear"}))
    # assert
    assert [x.module for x in result.lifted] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert sorted(functional_layers(ir).values()) == ["batch_norm"] * 4


def test_nothing_to_lift_leaves_the_graph_alone() -> None:
    # setup: an fx-traced model already calls modules
    model, shape = ZOO["resnet_style"][0](), ZOO["resnet_style"][1]
    ir = build_ir(model, shape)
    code_before = ir.gm.code
    # execute
    result = lift_functional_layers(ir)
    # assert
    assert result.lifted == () and result.declined == () and ir.gm.code == code_before
