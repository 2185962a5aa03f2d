"""Pass manager: ordering constraints, error context, re-annotation and deltas."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from effopt.errors import EffoptError, InternalError, PassError, RecipeError
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, InputSpec, facts
from effopt.passes.base import Pass, PassContext, PassResult
from effopt.passes.manager import check_order, run_passes
from effopt.optimizer.ir.trace import trace_module
from effopt.passes import get_pass
from effopt.recipes import parse_recipe


class _Noop(Pass):
    name: ClassVar[str] = "noop"
    summary: ClassVar[str] = "does nothing"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        return PassResult(ir)


class _NeedsFold(_Noop):
    name: ClassVar[str] = "needs_fold"
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm",)


class _Broken(_Noop):
    """A pass with a bug in it: any exception that is not an EffoptError."""

    name: ClassVar[str] = "broken"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


class _Refuses(_Noop):
    """A pass that rejects its input on purpose (bad input, not a bug)."""

    name: ClassVar[str] = "refuses"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        raise EffoptError("node 'conv' is not supported; list it under keep_float")


class _DoubleRelu(_Noop):
    """Replaces the first relu with two relus in a row: a real edit whose cost the manager must see."""

    name: ClassVar[str] = "double_relu"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        node = next(n for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(ir.module_of(n), nn.ReLU))
        with ir.gm.graph.inserting_after(node):
            extra = ir.gm.graph.call_function(torch.relu, (node,))
        node.replace_all_uses_with(extra)
        extra.args = (node,)
        return PassResult(ir, changed=(extra.name,))


class _BreaksShapes(_Noop):
    """A buggy rewrite: feeds the conv's 4-D output straight into the Linear (the flatten is bypassed)."""

    name: ClassVar[str] = "breaks_shapes"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        flatten = next(n for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(ir.module_of(n), nn.Flatten))
        flatten.replace_all_uses_with(flatten.args[0])
        ir.gm.graph.erase_node(flatten)
        return PassResult(ir, changed=("flatten",))


def _ir() -> IR:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    spec = InputSpec("x", (1, 3, 8, 8))
    return annotate(IR(trace_module(model), (spec,), (torch.randn(1, 3, 8, 8),)))


def _fold():
    cls = get_pass("fold_batchnorm")
    return cls(cls.Options())


def test_order_violation_names_both_passes_and_the_fix() -> None:
    passes = [_NeedsFold(), _Noop(), _fold()]
    with pytest.raises(PassError, match=r"passes\[0\] 'needs_fold' must run after 'fold_batchnorm' \(passes\[2\]\).*move"):
        check_order(passes)
    check_order([_fold(), _NeedsFold()])
    check_order([_NeedsFold()])  # a constraint on an absent pass is ignored


def test_order_is_checked_when_the_recipe_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import effopt.passes as registry

    monkeypatch.setattr(registry, "REGISTRY", registry.REGISTRY + (_NeedsFold,))
    data = {"version": 1, "model": {"factory": "m:f"}, "inputs": [{"name": "x", "shape": [1]}],
            "passes": ["needs_fold", "fold_batchnorm"]}
    with pytest.raises(RecipeError, match="must run after 'fold_batchnorm'"):
        parse_recipe(data)
    assert [p.name for p in parse_recipe({**data, "passes": ["fold_batchnorm", "needs_fold"]}).passes] == [
        "fold_batchnorm", "needs_fold"]


def test_a_pass_that_rejects_its_input_is_a_pass_error_named_with_the_passes_before_it() -> None:
    with pytest.raises(PassError, match=r"pass 'refuses' failed \(after fold_batchnorm, noop\): node 'conv' is not"):
        run_passes(_ir(), [_fold(), _Noop(), _Refuses()], PassContext())


def test_a_bug_in_a_pass_is_an_internal_error_not_bad_input() -> None:
    # a ValueError from inside a pass is effopt's bug: not an EffoptError (the CLI exits 3 with the traceback)
    with pytest.raises(InternalError, match=r"pass 'broken' crashed \(after fold_batchnorm, noop\): ValueError: boom") as e:
        run_passes(_ir(), [_fold(), _Noop(), _Broken()], PassContext())
    assert not isinstance(e.value, EffoptError)
    assert isinstance(e.value.__cause__, ValueError)  # the original traceback is kept


def test_a_graph_a_pass_broke_is_an_internal_error_even_when_analysis_raises_a_trace_error() -> None:
    """The model was analysed before the pass; if re-analysing its output fails, the pass is to blame (exit 3)."""
    _ir_before = _ir()  # precondition: the untouched model analyses fine
    with pytest.raises(InternalError, match=r"pass 'breaks_shapes' left a graph effopt cannot analyse \(after noop\)"
                       ) as e:
        run_passes(_ir_before, [_Noop(), _BreaksShapes()], PassContext())
    assert not isinstance(e.value, EffoptError) and e.value.__cause__ is not None


def test_manager_reannotates_and_fills_deltas_from_totals() -> None:
    ir = _ir()
    seen = []
    ir, records = run_passes(ir, [_fold(), _DoubleRelu(), _Noop()], PassContext(), on_pass=seen.append)
    fold, double, noop = records
    assert seen == records
    assert fold.result.delta.params == -8 and fold.result.delta.nodes == -1
    assert fold.result.delta.flops == -2 * 4 * 6 * 6
    assert double.result.delta.flops == 4 * 6 * 6 and double.result.delta.nodes == 1
    assert noop.result.delta.flops == 0 and not noop.result.modified
    new_relu = next(n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    assert facts(new_relu).flops == 4 * 6 * 6  # the manager annotated the node the pass created
    assert fold.after == double.before
