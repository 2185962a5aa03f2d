"""passes: auto — the planner keeps explicit passes, adds those that pay off, and says why."""

from __future__ import annotations

from typing import ClassVar

import torch

from effopt.hardware_profiles import load_profile
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.passes.base import Pass, PassContext, PassResult
from effopt.passes.planner import make_plan
from effopt.optimizer.ir.trace import trace_module
from effopt.passes import REGISTRY, get_pass
from tests.models import ZOO, make_input


def _ir(name: str) -> IR:
    builder, shape = ZOO[name]
    return annotate(IR(trace_module(builder()), (InputSpec("x", shape),), (make_input(shape),)))


def _all() -> list[Pass]:
    return [cls() for cls in REGISTRY]


class _Lossy(Pass):
    name: ClassVar[str] = "lossy_thing"
    summary: ClassVar[str] = "pretends to be lossy"
    lossy: ClassVar[bool] = True

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        return PassResult(ir)


class _NeedsFp16(_Lossy):
    name: ClassVar[str] = "needs_fp16"

    def target_support(self, profile: object) -> str | None:
        return None if profile.supports("fp16") else "the target cannot compute in fp16"


def test_auto_chooses_folding_on_a_model_with_batchnorm_and_explains() -> None:
    ir = _ir("resnet_style")
    plan = make_plan(ir, load_profile("x86-avx2"), [], _all(), PassContext(), None)
    steps = {s.name: s for s in plan.steps}
    assert steps["fold_batchnorm"].chosen and "faster" in steps["fold_batchnorm"].reason
    assert [p.name for p in plan.passes][0] == "fold_batchnorm"
    assert plan.predicted_after_s < plan.predicted_before_s
    assert "fold_batchnorm" in plan.describe()
    # planning priced copies: the IR itself still has its BatchNorms
    assert any("bn" in n.name for n in ir.gm.graph.nodes)


def test_auto_skips_what_cannot_pay_off() -> None:
    plan = make_plan(_ir("mlp"), load_profile("x86-avx2"), [], _all(), PassContext(), None)
    assert plan.passes == ()
    steps = {s.name: s for s in plan.steps}
    assert all(not steps[name].chosen and "no predicted gain" in steps[name].reason
               for name in ("fold_batchnorm", "eliminate_dead_code"))
    assert "allows no accuracy drop" in steps["quantize"].reason


def test_explicit_passes_are_kept_and_not_reconsidered() -> None:
    fold = get_pass("fold_batchnorm")()
    plan = make_plan(_ir("vgg_style"), load_profile("a100"), [fold], _all(), PassContext(), None)
    assert plan.passes[0] is fold
    assert "fold_batchnorm" not in {s.name for s in plan.steps}


def test_lossy_passes_need_an_accuracy_budget_and_target_support() -> None:
    ir = _ir("mlp")
    no_budget = make_plan(ir, load_profile("a100"), [], [_Lossy()], PassContext(), None)
    assert not no_budget.steps[0].chosen and "allows no accuracy drop" in no_budget.steps[0].reason
    x86 = make_plan(ir, load_profile("x86-avx2"), [], [_NeedsFp16()], PassContext(), 0.01)
    assert not x86.steps[0].chosen
    assert x86.steps[0].reason == "not for x86-avx2: the target cannot compute in fp16"
    gpu = make_plan(ir, load_profile("a100"), [], [_NeedsFp16()], PassContext(), 0.01)
    assert "not for" not in gpu.steps[0].reason  # a100 has fp16: it is tried (and gains nothing here)


def test_planner_takes_randomness_from_nothing_global() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    make_plan(_ir("resnet_style"), load_profile("x86-avx2"), [], _all(), PassContext(), None)
    assert torch.equal(state, torch.random.get_rng_state())
