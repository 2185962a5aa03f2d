"""`passes: auto`: choose passes for a target by what the cost model says they gain.

For every registered pass the user did not list, in registry order, the planner
asks three questions and records the answer as a `PlanStep`:

1. can it run for this target (`Pass.target_support`)?
2. does the goal allow it (a lossy pass needs ``max_accuracy_drop > 0``)?
3. does it pay off: the pass is tried on a copy of the IR so far and the copy is
   priced with the roofline cost model; it is chosen when predicted latency drops.

The user's explicit passes are always kept, with their options and order; chosen
passes are inserted where their ordering constraints allow. New passes plug in
by being in the registry: the planner has no per-pass code.

A plan is a prediction. The roofline can be wrong about a runtime: on an x86 host
without VNNI a LeNet-sized model's int8 QDQ ONNX ran 2x slower in onnxruntime at
batch 32 than its float ONNX, while the plan said "predicted 2.192× faster". So the
planner is not the last word on what ships: after the compile, the deploy choice
(`effopt.optimizer.measure.deploy`, which passes may not import) times the
artefacts side by side where this host has the target's arch, and when the float
``model_float.onnx`` (the model before quantize) wins, it is what ``deploy`` names,
the plan line of ``quantize`` says so, and the report warns. Where the host can
stand in for the target, the deployed artefact is never an int8 one that measured
more than 20% slower than the model before quantize. (The exact passes,
fold_batchnorm and eliminate_dead_code, only remove work.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from effopt.errors import EffoptError
from effopt.hardware_profiles import HardwareProfile
from effopt.optimizer.ir.cost_model import estimate
from effopt.optimizer.ir.core import IR
from effopt.passes.base import Pass, PassContext
from effopt.passes.manager import run_passes


@dataclass(frozen=True)
class PlanStep:
    """One pass the planner considered, and why it was or was not chosen."""

    name: str
    chosen: bool
    reason: str
    predicted_before_s: float | None = None
    predicted_after_s: float | None = None


@dataclass(frozen=True)
class Plan:
    passes: tuple[Pass, ...]
    steps: tuple[PlanStep, ...]
    predicted_before_s: float
    predicted_after_s: float

    @property
    def predicted_speedup(self) -> float:
        return self.predicted_before_s / self.predicted_after_s if self.predicted_after_s else 1.0

    def describe(self) -> str:
        lines = [f"plan: {' → '.join(p.name for p in self.passes) or '(no passes)'}"]
        lines += [f"  {'+' if s.chosen else '-'} {s.name}: {s.reason}" for s in self.steps]
        lines.append(
            f"  predicted latency {self.predicted_before_s * 1e3:.4g} ms → {self.predicted_after_s * 1e3:.4g} ms "
            f"({self.predicted_speedup:.2f}×)"
        )
        return "\n".join(lines)


def _insert(plan: list[Pass], p: Pass) -> list[Pass] | None:
    """``plan`` with ``p`` at the earliest place its ordering constraints allow, or None if none does."""
    earliest = max((i + 1 for i, q in enumerate(plan) if q.name in p.after), default=0)
    latest = min((i for i, q in enumerate(plan) if p.name in q.after), default=len(plan))
    if earliest > latest:
        return None
    return plan[:latest] + [p] + plan[latest:]


def _price(ir: IR, passes: Sequence[Pass], ctx: PassContext, profile: HardwareProfile) -> tuple[float, int]:
    """Predicted latency after running ``passes`` on a copy of ``ir``, and its node count."""
    trial = copy.deepcopy(ir)
    trial, _ = run_passes(trial, passes, ctx)
    return estimate(trial, profile).total_s, len(trial.compute_nodes())


def make_plan(
    ir: IR,
    profile: HardwareProfile,
    explicit: Sequence[Pass],
    candidates: Sequence[Pass],
    ctx: PassContext,
    max_accuracy_drop: float | None,
) -> Plan:
    """Keep ``explicit``; add each candidate (registry order) that can run, is allowed, and pays off."""
    base_s, base_nodes = _price(ir, explicit, ctx, profile)
    start_s = estimate(ir, profile).total_s
    plan = list(explicit)
    steps: list[PlanStep] = []
    explicit_names = {p.name for p in explicit}
    for cand in candidates:
        if cand.name in explicit_names:
            continue
        why_not = cand.target_support(profile)
        if why_not:
            steps.append(PlanStep(cand.name, False, f"not for {profile.name}: {why_not}"))
            continue
        if cand.lossy and not max_accuracy_drop:
            steps.append(PlanStep(cand.name, False, "lossy, and the goal allows no accuracy drop (goal.max_accuracy_drop)"))
            continue
        trial_plan = _insert(plan, cand)
        if trial_plan is None:
            steps.append(PlanStep(cand.name, False, "its ordering constraints conflict with the explicit passes"))
            continue
        try:
            after_s, after_nodes = _price(ir, trial_plan, ctx, profile)
        except EffoptError as e:
            steps.append(PlanStep(cand.name, False, f"could not be tried: {e}"))
            continue
        if after_s < base_s:
            steps.append(PlanStep(cand.name, True, f"predicted {base_s / after_s:.3f}× faster on {profile.name}", base_s, after_s))
            plan, base_s, base_nodes = trial_plan, after_s, after_nodes
        elif not cand.lossy and after_s == base_s and after_nodes < base_nodes:
            reason = f"exact; no predicted latency change but {base_nodes - after_nodes} fewer nodes"
            steps.append(PlanStep(cand.name, True, reason, base_s, after_s))
            plan, base_nodes = trial_plan, after_nodes
        else:
            steps.append(PlanStep(cand.name, False, f"no predicted gain on {profile.name} (nothing to change)", base_s, after_s))
    return Plan(tuple(plan), tuple(steps), start_s, base_s)
