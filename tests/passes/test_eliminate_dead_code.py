"""Tests for effopt.passes.eliminate_dead_code: eval-mode no-ops and unused values go, nothing else.

Each case is a named builder returning ``(module, Expected)``: the nodes that must be
removed, in graph order, and the submodules that nothing calls afterwards. Every test
first asserts those nodes exist, so it cannot pass while the pass does nothing. The
outputs must be bit-identical: removing an identity changes no arithmetic. Passes are
built from plain dicts through `parse_recipe`, and run through the pass manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.errors import RecipeError
from effopt.optimizer.ir.core import IR, facts
from effopt.passes.base import PassContext
from effopt.passes.manager import PassRecord, run_passes
from examples.digits import DigitsNet
from tests.passes.helpers import build_ir, recipe_passes
from tests.models import ZOO, randomize_bn, seeded

_NO_OP_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


# --- helpers ----------------------------------------------------------------------------------




def eliminate(ir: IR) -> tuple[IR, PassRecord]:
    ir, records = run_passes(ir, recipe_passes({"name": "eliminate_dead_code"}), PassContext())
    (record,) = records
    return ir, record


def node_names(ir: IR) -> list[str]:
    return [n.name for n in ir.gm.graph.nodes]


def no_op_nodes(ir: IR) -> list[str]:
    """Dropout/Identity module calls and functional dropouts still in the graph."""
    return [
        n.name
        for n in ir.gm.graph.nodes
        if (n.op == "call_module" and isinstance(ir.module_of(n), _NO_OP_MODULES))
        or (n.op == "call_function" and n.target in _DROPOUT_FUNCTIONS)
    ]


def run_seeded(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run with a fixed global RNG, so a dropout that really drops gives the same mask twice."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return gm(x)


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the pass must do to a builder's model."""

    shape: tuple[int, ...]                      # input shape, batch first
    removed: tuple[str, ...] = ()               # nodes removed, in graph order
    modules_gone: tuple[str, ...] = ()          # submodules nothing calls afterwards
    skipped: tuple[tuple[str, str], ...] = ()   # (node, words its Skip reason must contain)


Case = tuple[nn.Module, Expected]


def dropout_identity_net_case() -> Case:
    """nn.Dropout, nn.Identity, F.dropout(training=self.training) and an unused ``x * 3``::

        x ─ conv ─ dropout ─ identity ─ relu ─ flatten ─ F.dropout ─ fc
        └─ mul(3) ─ (unused)
    """
    model = ZOO["dropout_identity_net"][0]()
    expected = Expected(
        ZOO["dropout_identity_net"][1],
        removed=("mul", "dropout", "identity", "dropout_1"),
        modules_gone=("dropout", "identity"),
    )
    return model, expected


def digits_net_case() -> Case:
    """The bundled example: one Dropout between the pooled features and fc1::

        conv1 ─ bn1 ─ relu ─ conv2 ─ bn2 ─ relu ─ pool ─ conv3 ─ bn3 ─ relu ─ gap ─ flatten
        ─ drop ─ fc1 ─ bn4 ─ relu ─ fc2
    """
    with seeded(0):
        model = DigitsNet()
    return randomize_bn(model, 0).eval(), Expected((4, 1, 8, 8), removed=("drop",), modules_gone=("drop",))


def vgg_style_case() -> Case:
    """A Dropout inside a Sequential classifier (node ``classifier_3``, module ``classifier.3``)::

        features ─ flatten ─ linear ─ bn1d ─ relu ─ dropout ─ linear
    """
    model = ZOO["vgg_style"][0]()
    return model, Expected(ZOO["vgg_style"][1], removed=("classifier_3",), modules_gone=("classifier.3",))


class DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unused = torch.relu(self.side(x))  # noqa: F841 -- a dead chain through a module call
        return self.conv(x) + self.skip(x)


def dead_branch_case() -> Case:
    """A dead two-node chain (module call, then relu) and an Identity on a residual shortcut::

        x ─┬─ side conv ─ relu ─ (unused)
           ├─ conv ──────┐
           └─ skip (Id) ─ add
    """
    with seeded(1):
        model = DeadBranch().eval()
    return model, Expected((2, 3, 8, 8), removed=("side", "relu", "skip"), modules_gone=("side", "skip"))


class SharedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.drop(x)
        return self.drop(self.conv(d)) + d


def shared_dropout_case() -> Case:
    """One Dropout module called twice; the first call's output fans out to conv and add::

        x ─ drop ─ d ─ conv ─ drop ─ add
                   └───────────────┘
    """
    with seeded(2):
        model = SharedDropout().eval()
    return model, Expected((2, 3, 8, 8), removed=("drop", "drop_1"), modules_gone=("drop",))


class ConcatIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ident = nn.Identity()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.dw(self.ident(x))
        b = F.dropout2d(x, 0.2, training=self.training)
        return self.fuse(torch.cat([a, b], dim=1))


def concat_identity_case() -> Case:
    """A depthwise branch behind an Identity and an F.dropout2d branch, joined by cat::

           ┌─ ident ─ dw 3x3 g=4 ─┐
        x ─┤                      cat ─ fuse 1x1
           └─ F.dropout2d ────────┘
    """
    with seeded(3):
        model = ConcatIdentity().eval()
    return model, Expected((2, 4, 8, 8), removed=("ident", "dropout2d"), modules_gone=("ident",))


class TrainingDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.drop(self.fc(x)), 0.5, training=True)  # MC dropout: on at inference too


def training_dropout_case() -> Case:
    """An eval-mode nn.Dropout (removed) and F.dropout with a literal training=True (kept)::

        x ─ fc ─ drop (eval: identity) ─ F.dropout(training=True)
    """
    with seeded(4):
        model = TrainingDropout().eval()
    skipped = (("dropout", "training=True"),)
    return model, Expected((2, 8), removed=("drop",), modules_gone=("drop",), skipped=skipped)


def default_training_graph_case() -> Case:
    """A hand-built graph calling dropouts without ``training``, so each function's default applies::

        x ─ F.dropout(x, 0.5) ─ F.alpha_dropout(·, 0.5) ─ relu
             default True: kept   default False: removed

    (fx's tracer always records ``training``; a graph written by hand or by another tool may not.)
    """
    graph = fx.Graph()
    x = graph.placeholder("x")
    d = graph.call_function(F.dropout, (x, 0.5))
    a = graph.call_function(F.alpha_dropout, (d, 0.5))
    graph.output(graph.call_function(torch.relu, (a,)))
    gm = fx.GraphModule(nn.Module(), graph)
    return gm, Expected((2, 8), removed=("alpha_dropout",), skipped=(("dropout", "training=True"),))


REMOVING: dict[str, Callable[[], Case]] = {
    "dropout_identity_net": dropout_identity_net_case,
    "digits_net": digits_net_case,
    "vgg_style": vgg_style_case,
    "dead_branch": dead_branch_case,
    "shared_dropout": shared_dropout_case,
    "concat_identity": concat_identity_case,
}
SKIPPING: dict[str, Callable[[], Case]] = {
    "training_dropout": training_dropout_case,
    "default_training_graph": default_training_graph_case,
}
CASES: dict[str, Callable[[], Case]] = {**REMOVING, **SKIPPING}


# --- structure and numerics -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_removes_exactly_the_expected_nodes(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    before = node_names(ir)
    assert [n for n in before if n in expected.removed] == list(expected.removed), "precondition: nodes exist"
    # execute
    ir, record = eliminate(ir)
    # assert
    result = record.result
    assert result.changed == expected.removed
    assert result.modified
    assert result.stats["removed"] == len(expected.removed)
    assert node_names(ir) == [n for n in before if n not in expected.removed]
    assert no_op_nodes(ir) == [node for node, _ in expected.skipped]
    assert record.result.delta is not None and record.result.delta.nodes == -len(expected.removed)


@pytest.mark.parametrize("name", list(CASES))
def test_changed_is_in_graph_order(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    order = node_names(ir)
    # execute
    _, record = eliminate(ir)
    # assert
    changed = record.result.changed
    assert len(changed) >= 1, "precondition of the check: something was removed"
    assert list(changed) == sorted(changed, key=order.index)


def test_dead_code_before_the_no_ops_is_reported_first() -> None:
    """``mul`` (dead) precedes the dropouts in the graph, though fx's DCE sweep finds it last."""
    model, expected = dropout_identity_net_case()
    ir = build_ir(model, expected.shape)
    assert node_names(ir).index("mul") < node_names(ir).index("dropout"), "precondition: mul comes first"
    _, record = eliminate(ir)
    assert record.result.changed[0] == "mul"


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_bit_identical(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    g = torch.Generator().manual_seed(99)
    xs = [torch.randn(expected.shape, generator=g), torch.randn((3, *expected.shape[1:]), generator=g)]
    before = [run_seeded(ir.gm, x) for x in xs]
    # execute
    ir, _ = eliminate(ir)
    # assert
    for x, y in zip(xs, before):
        assert torch.equal(run_seeded(ir.gm, x), y)
        if not expected.skipped:  # a dropout that still drops is random; compare to the source only without one
            assert torch.equal(run_seeded(ir.gm, x), run_seeded(model, x))


@pytest.mark.parametrize("name", list(CASES))
def test_unused_submodules_are_deleted(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    modules = dict(ir.gm.named_modules())
    assert all(m in modules for m in expected.modules_gone), "precondition: the modules exist"
    # execute
    ir, _ = eliminate(ir)
    # assert
    modules = dict(ir.gm.named_modules())
    assert [m for m in expected.modules_gone if m in modules] == []
    called = {str(n.target) for n in ir.gm.graph.nodes if n.op == "call_module"}
    assert called <= set(modules)


def test_digits_dropout_module_is_gone() -> None:
    model, expected = digits_net_case()
    ir = build_ir(model, expected.shape)
    assert isinstance(dict(ir.gm.named_modules())["drop"], nn.Dropout), "precondition"
    ir, _ = eliminate(ir)
    assert "drop" not in dict(ir.gm.named_modules())
    assert not any(isinstance(m, nn.Dropout) for m in ir.gm.modules())


def test_delta_drops_the_dead_multiply_flops() -> None:
    """dropout_identity_net: views cost nothing; the dead ``x * 3`` costs 1 FLOP per element, 2·3·16·16 = 1,536."""
    model, expected = dropout_identity_net_case()
    ir = build_ir(model, expected.shape)
    removed_flops = sum(facts(n).flops for n in ir.gm.graph.nodes if n.name in expected.removed)
    assert removed_flops == 1536, "precondition: the hand count"
    _, record = eliminate(ir)
    assert record.result.delta is not None
    assert (record.result.delta.flops, record.result.delta.nodes, record.result.delta.params) == (-1536, -4, 0)


def test_delta_drops_the_dead_module_params() -> None:
    """dead_branch: the unused 1x1 conv 3->4 holds 4·3 weights + 4 biases = 16 params."""
    model, expected = dead_branch_case()
    _, record = eliminate(build_ir(model, expected.shape))
    assert record.result.delta is not None and record.result.delta.params == -16


# --- skips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SKIPPING))
def test_dropout_that_trains_is_skipped_and_kept(name: str) -> None:
    # setup
    model, expected = SKIPPING[name]()
    ir = build_ir(model, expected.shape)
    kept = [node for node, _ in expected.skipped]
    assert all(node in node_names(ir) for node in kept), "precondition: the training dropouts exist"
    # execute
    ir, record = eliminate(ir)
    # assert
    result = record.result
    assert [s.node for s in result.skipped] == kept
    for skip, (_, words) in zip(result.skipped, expected.skipped):
        assert words in skip.reason, skip
    assert all(node in node_names(ir) for node in kept)
    assert not set(kept) & set(result.changed)


def test_training_dropout_still_drops() -> None:
    """The kept F.dropout(training=True) still zeroes about half the values after the pass."""
    model, expected = training_dropout_case()
    ir, _ = eliminate(build_ir(model, expected.shape))
    with torch.no_grad():
        y = ir.gm(torch.ones(64, 8))
    assert 0.3 < float((y == 0).to(torch.float32).mean()) < 0.7


# --- nothing to do ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "mnist_classic_cnn", "resnet_style"])
def test_nothing_to_eliminate(name: str) -> None:
    # setup
    builder, shape = ZOO[name]
    model = builder()
    ir = build_ir(model, shape)
    assert no_op_nodes(ir) == [], "precondition: no dropout or identity"
    code_before = ir.gm.code
    # execute
    ir, record = eliminate(ir)
    # assert
    result = record.result
    assert not result.modified
    assert result.changed == () and result.skipped == ()
    assert result.delta is not None and all(v == 0 for v in vars(result.delta).values())
    assert ir.gm.code == code_before
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ir.gm(x), model(x))


def test_second_run_finds_nothing() -> None:
    model, expected = dropout_identity_net_case()
    ir, first = eliminate(build_ir(model, expected.shape))
    assert first.result.modified, "precondition: the first run removed something"
    _, second = eliminate(ir)
    assert not second.result.modified


# --- recipe -----------------------------------------------------------------------------------


def test_with_fold_batchnorm_in_one_recipe() -> None:
    """digits: ``[fold_batchnorm, eliminate_dead_code]`` leaves neither BatchNorm nor Dropout."""
    model, expected = digits_net_case()
    ir = build_ir(model, expected.shape)
    ir, records = run_passes(ir, recipe_passes("fold_batchnorm", {"name": "eliminate_dead_code"}), PassContext())
    assert [r.name for r in records] == ["fold_batchnorm", "eliminate_dead_code"]
    assert records[1].result.changed == ("drop",)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in ir.gm.modules())
    x = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ir.gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_unknown_option_fails_when_the_recipe_loads() -> None:
    with pytest.raises(RecipeError, match=r"passes\[0\]\.aggressive: unknown field"):
        recipe_passes({"name": "eliminate_dead_code", "aggressive": True})
