"""Output-aware sensitivity: decision heads, per-head agreement, and mixed precision keeping decisions first."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.compare import compare_tensors, concat_flat
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.quant.sensitivity import OutputSensitivity, HeadAgreement, decision_axes, measure_outputs
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import seeded
from tests.passes.helpers import build_ir, recipe_passes


class TwoHeads(nn.Module):
    """x ─ trunk ─ relu ─┬─ prob ─ softmax(dim=1)    a face/no-face decision, logits close to the boundary
                         └─ box × 100               regression: large values, no decision
    """

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(16, 32)
        self.prob = nn.Linear(32, 2)
        self.box = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return torch.softmax(self.prob(h), dim=1), self.box(h)


def two_heads() -> nn.Module:
    with seeded(0):
        model = TwoHeads()
    with torch.no_grad():
        model.prob.weight.mul_(0.3)
        model.prob.bias.zero_()
        model.box.weight.mul_(100.0)
    return model.eval()


class Fixed(nn.Module):
    def __init__(self, *outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.outputs


def test_softmax_heads_decide_and_the_other_heads_do_not() -> None:
    assert decision_axes(trace_module(two_heads())) == (1, None)
    assert decision_axes(nn.Linear(2, 2)) is None  # no graph: the [N, C] rule applies


def test_agreement_per_head_is_the_worked_example() -> None:
    want_p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    got_p = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.7, 0.3]])  # row 2 flips
    want_b, got_b = torch.ones(4, 4), torch.ones(4, 4) * 1.1
    out = measure_outputs(Fixed(got_p, got_b), Fixed(want_p, want_b), [(torch.zeros(1),)], axes=(1, None))
    assert out.heads[0].top1_agreement == 0.75 and out.heads[1].top1_agreement is None
    assert out.decision_agreement == 0.75 and out.flips == pytest.approx(0.25)
    pooled = compare_tensors(concat_flat([got_p, got_b]), concat_flat([want_p, want_b])).relative_l2 ** 2
    assert out.relative_error == pytest.approx(pooled)
    # without a softmax anywhere, [N, C] outputs count as logits (and the [N, 4] box as well)
    plain = measure_outputs(Fixed(got_p, got_b), Fixed(want_p, want_b), [(torch.zeros(1),)], axes=None)
    assert plain.heads[0].top1_agreement == 0.75 and plain.heads[1].top1_agreement == 1.0


def test_flips_sort_before_relative_error() -> None:
    flips = OutputSensitivity((HeadAgreement(0, 0.001, 0.9),), 0.001)
    loud = OutputSensitivity((HeadAgreement(0, 0.5, 1.0),), 0.5)
    quiet = OutputSensitivity((HeadAgreement(0, 0.01, None),), 0.01)
    assert sorted([quiet, loud, flips], key=OutputSensitivity.sort_key) == [flips, loud, quiet]


def test_mixed_precision_keeps_the_layer_that_flips_decisions_first() -> None:
    """The box layer's error dominates the pooled output error; the prob layer's error is tiny in
    comparison but flips face decisions. Mixed precision promotes the prob layer first; the budget
    here is "keep every face decision" (a score service, as the compiler provides one), so with
    the prob layer in float it is met and the box layer stays int8."""
    model = two_heads()
    g = torch.Generator().manual_seed(0)
    source = DataSource("random", TensorDataset(torch.randn(256, 16, generator=g)), 64, False)
    batches = [tuple(b.inputs) for b in source.batches()]
    with torch.no_grad():
        decisions = torch.cat([model(*b)[0].argmax(1) for b in batches])

    def decisions_kept(m: nn.Module) -> float:
        with torch.no_grad():
            return float((torch.cat([m(*b)[0].argmax(1) for b in batches]) == decisions).double().mean())

    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=source,
                      services={"score": decisions_kept, "accuracy_budget": 0.0})
    spec = {"name": "quantize", "equalize": False, "bias_correction": False, "keep_float": ["trunk"],
            "mixed_precision": True}
    _, (record,) = run_passes(build_ir(model, (1, 16)), recipe_passes(spec), ctx)
    rows = {r["layer"]: r for r in record.result.details}
    assert rows["prob"]["top1_agreement"] < 1.0 and rows["box"]["top1_agreement"] == 1.0  # precondition: prob flips
    assert rows["box"]["sensitivity"] > 3 * rows["prob"]["sensitivity"]  # precondition: box is far louder
    assert [r["layer"] for r in record.result.details if r["precision"] != "7-bit"] == ["prob"]


def test_min_decision_agreement_is_a_budget_on_decisions_kept() -> None:
    """No labels, no accuracy budget: ``min_decision_agreement: 1.0`` alone promotes the prob layer (the
    one that flips face decisions) and stops there; the loud box layer stays int8, and the stats say
    how many decisions the result keeps on the held-out inputs."""
    model = two_heads()
    g = torch.Generator().manual_seed(0)
    calibration = DataSource("random", TensorDataset(torch.randn(256, 16, generator=g)), 64, False)
    held_out = DataSource("random", TensorDataset(torch.randn(256, 16, generator=g)), 64, False)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=calibration, services={"eval_inputs": held_out})
    spec = {"name": "quantize", "equalize": False, "bias_correction": False, "keep_float": ["trunk"],
            "mixed_precision": True, "min_decision_agreement": 1.0}
    plain = {**spec, "min_decision_agreement": None, "mixed_precision": False}
    _, (before,) = run_passes(build_ir(model, (1, 16)), recipe_passes(plain), ctx)
    qmodel = before.result.ir.gm
    kept = measure_outputs(qmodel, model, [tuple(b.inputs) for b in held_out.batches()], (1, None))
    assert kept.decision_agreement is not None and kept.decision_agreement < 1.0  # precondition: int8 flips some
    _, (record,) = run_passes(build_ir(model, (1, 16)), recipe_passes(spec), ctx)
    assert [r["layer"] for r in record.result.details if r["precision"] != "7-bit"] == ["prob"]
    assert record.result.stats["decision_agreement"] == 1.0


def test_min_decision_agreement_needs_mixed_precision_and_a_decision_head() -> None:
    from pydantic import ValidationError

    from effopt.errors import PassError
    from effopt.passes.quantize import QuantizeOptions

    with pytest.raises(ValidationError, match="add mixed_precision: true"):
        QuantizeOptions(min_decision_agreement=0.99)
    source = DataSource("random", TensorDataset(torch.randn(64, 16)), 64, False)
    regression = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    spec = {"name": "quantize", "mixed_precision": True, "min_decision_agreement": 0.99}
    with pytest.raises(PassError, match="no decision head"):
        run_passes(build_ir(regression, (1, 16)), recipe_passes(spec),
                   PassContext(profile=load_profile("x86-avx2"), calibration=source))
