"""The compile report: one typed object, rendered as JSON (for machines) and Markdown (for people).

Nothing run-dependent goes in: no timestamps, no absolute paths, floats rounded
to 6 significant digits, so the same recipe on the same inputs gives the same
bytes. (Measured latencies are added only by ``effopt bench``, into a
separate section; the timings behind the ``deploy`` choice go to
``measurements.json``, and its reason names no measured number.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from collections.abc import Mapping, Sequence
from typing import Any

from effopt.optimizer.measure.deploy import DeployChoice
from effopt.optimizer.measure.evaluate import Evaluation
from effopt.optimizer.ir.core import CostTotals, InputSpec
from effopt.passes.manager import PassRecord
from effopt.optimizer.measure.verify import Verification

REPORT_VERSION = 1


@dataclass(frozen=True)
class ArtefactInfo:
    file: str
    size_bytes: int
    sha256: str | None  # None where the format is not byte-deterministic (pt2)
    check: str  # what was checked, e.g. "onnx.checker + onnxruntime vs torch"
    max_abs_err: float | None = None
    passed: bool = True
    note: str = ""  # what runs inside, e.g. whether int8 kernels or quantize/dequantize reference ops


@dataclass(frozen=True)
class StageEvaluation:
    """The model scored on ``data.eval`` at one stage: ``original``, after a pass, or an artefact."""

    stage: str
    evaluation: Evaluation


@dataclass(frozen=True)
class GoalCheck:
    """One goal of the recipe and whether the optimized model meets it."""

    goal: str
    limit: float
    actual: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class Prediction:
    """Roofline-predicted latency on the recipe's target at the recipe's batch."""

    profile: str
    batch: int
    before_s: float
    after_s: float
    runnable_after: bool
    problems_after: tuple[str, ...] = ()

    @property
    def speedup(self) -> float:
        return self.before_s / self.after_s if self.after_s else 1.0


@dataclass(frozen=True)
class LayerPrecision:
    """The dtype one compute node runs in, for a model with more than one float precision.

    E.g. ``LayerPrecision("fc", "Linear", "bf16")`` and ``LayerPrecision("softmax", "F.softmax", "fp32")``
    after ``half_precision``; only models with a bf16/fp16 node carry the list, so the report of an
    fp32 or int8 model keeps its bytes.
    """

    node: str
    op: str
    dtype: str


@dataclass(frozen=True)
class PlanLine:
    name: str
    chosen: bool
    reason: str


@dataclass(frozen=True)
class Report:
    recipe: str
    model: str
    target: str
    torch_version: str
    before: CostTotals
    after: CostTotals
    passes: tuple[PassRecord, ...]
    verification: Verification
    pass_errors: tuple[float, ...] = ()  # max |optimized − original| on one random batch after each pass
    inputs: tuple[InputSpec, ...] = ()
    task: str | None = None
    evaluations: tuple[StageEvaluation, ...] = ()
    prediction: Prediction | None = None
    plan: tuple[PlanLine, ...] = ()
    goals: tuple[GoalCheck, ...] = ()
    artefacts: tuple[ArtefactInfo, ...] = ()
    warnings: tuple[str, ...] = ()
    deploy: DeployChoice | None = None  # which artefact to ship on the target, and why (set with the artefacts)
    precision: tuple[LayerPrecision, ...] = ()  # per-layer dtype, only when a layer computes in bf16/fp16

    @property
    def lossy(self) -> bool:
        """A lossy pass ran: outputs may differ by design, so accuracy goals gate instead of rtol/atol."""
        return any(r.lossy for r in self.passes)

    @property
    def passed(self) -> bool:
        outputs_ok = self.verification.passed or self.lossy
        return outputs_ok and all(a.passed for a in self.artefacts) and all(g.passed for g in self.goals)

    def failures(self) -> list[str]:
        """Every reason the compile failed, in the order a user should read them."""
        out = [] if self.lossy else self.verification.failures()
        out += [f"goal {g.goal}: {g.detail}" for g in self.goals if not g.passed]
        out += [f"artefact {a.file}: {a.check} failed (max abs err {a.max_abs_err})" for a in self.artefacts if not a.passed]
        return out

    def to_json(self) -> str:
        return json.dumps(_round(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def to_dict(self) -> dict[str, Any]:
        v = self.verification
        return {
            "report_version": REPORT_VERSION,
            "status": "passed" if self.passed else "failed",
            "failures": self.failures(),
            "recipe": self.recipe,
            "model": self.model,
            "target": self.target,
            "torch_version": self.torch_version,
            "inputs": [asdict(i) for i in self.inputs],
            "totals": {"before": asdict(self.before), "after": asdict(self.after)},
            "predicted_latency": asdict(self.prediction) | {"speedup": self.prediction.speedup} if self.prediction else None,
            "plan": [asdict(p) for p in self.plan],
            "passes": [
                {
                    "name": r.name,
                    "options": r.options,
                    "lossy": r.lossy,
                    "changed": list(r.result.changed),
                    "skipped": [asdict(s) for s in r.result.skipped],
                    "stats": dict(r.result.stats),
                    "warnings": list(r.result.warnings),
                    "delta": asdict(r.result.delta) if r.result.delta else None,
                    "max_abs_err_vs_original": self.pass_errors[i] if i < len(self.pass_errors) else None,
                } | ({"details": [dict(row) for row in r.result.details]} if r.result.details else {})
                for i, r in enumerate(self.passes)
            ],
            "verification": {
                "passed": v.passed,
                "gating": not self.lossy,
                "rtol": v.rtol,
                "atol": v.atol,
                "checks": [asdict(c) | {"within_tolerance": c.within_tolerance} for c in v.checks],
                "failures": v.failures(),
            },
            "task": self.task,
            "evaluations": [
                {"stage": s.stage, "headline_name": s.evaluation.headline_name, "headline": s.evaluation.headline}
                | asdict(s.evaluation)
                for s in self.evaluations
            ],
            "goals": [asdict(g) for g in self.goals],
            "artefacts": [asdict(a) for a in self.artefacts],
            "deploy": self.deploy.to_dict() if self.deploy is not None else None,
            "warnings": list(self.warnings),
        } | ({"precision": [asdict(p) for p in self.precision]} if self.precision else {})

    def to_markdown(self) -> str:
        b, a = self.before, self.after
        lines = [
            f"# effopt report: {self.model} ({self.recipe})",
            "",
            f"Target `{self.target}`, torch {self.torch_version}. Status: **{'passed' if self.passed else 'FAILED'}**.",
            "",
            "| | params | size | MACs | FLOPs | bytes moved | nodes |",
            "|---|---:|---:|---:|---:|---:|---:|",
            _totals_row("original", b),
            _totals_row("optimized", a),
            f"| ratio (original/optimized) | {_ratio(b.params, a.params)} | {_ratio(b.size_bytes, a.size_bytes)} | "
            f"{_ratio(b.macs, a.macs)} | {_ratio(b.flops, a.flops)} | {_ratio(b.bytes_moved, a.bytes_moved)} | "
            f"{_ratio(b.nodes, a.nodes)} |",
        ]
        if self.prediction:
            p = self.prediction
            lines += [
                "",
                f"Predicted latency on `{p.profile}` at batch {p.batch} (roofline): {_ms(p.before_s)} → "
                f"{_ms(p.after_s)} ({p.speedup:.2f}×)" + ("" if p.runnable_after else " — NOT runnable: " + "; ".join(p.problems_after)),
            ]
        if self.plan:
            lines += ["", "## Plan (passes: auto)", ""]
            lines += [f"- {'chosen' if s.chosen else 'skipped'} `{s.name}`: {s.reason}" for s in self.plan]
        lines += [
            "",
            "## Passes",
            "",
            "| pass | changed | skipped | Δparams | ΔFLOPs | Δnodes | max abs err vs original |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(self.passes):
            d = r.result.delta
            err = f"{self.pass_errors[i]:.3g}" if i < len(self.pass_errors) else "–"
            lines.append(
                f"| {r.name} | {len(r.result.changed)} | {len(r.result.skipped)} | {d.params if d else 0:+,} | "
                f"{d.flops if d else 0:+,} | {d.nodes if d else 0:+,} | {err} |"
            )
        for r in self.passes:
            lines += _details_lines(r.name, r.result.details)
        skips = [(r.name, s) for r in self.passes for s in r.result.skipped]
        if skips:
            lines += ["", "Skipped sites:", ""] + [f"- `{name}` left `{s.node}`: {s.reason}" for name, s in skips]
        v = self.verification
        gate = "" if not self.lossy else " (informational: a lossy pass ran; accuracy goals decide)"
        lines += [
            "",
            f"## Verification (rtol={v.rtol:g}, atol={v.atol:g}): {'passed' if v.passed else 'FAILED'}{gate}",
            "",
            "| inputs | output | samples | max abs err | max rel err | top-1 agreement | ok |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for c in v.checks:
            top1 = f"{c.top1_agreement:.4f}" if c.top1_agreement is not None else "–"
            lines.append(
                f"| {c.input_set} | {c.output} | {c.samples} | {c.max_abs_err:.3g} | {c.max_rel_err:.3g} | {top1} | "
                f"{'yes' if c.within_tolerance else 'NO'} |"
            )
        lines += _evaluation_lines(self.evaluations)
        if self.goals:
            lines += ["", "## Goals", "", "| goal | limit | actual | met |", "|---|---:|---:|---|"]
            lines += [f"| {g.goal} | {g.limit:g} | {g.actual:.4g} | {'yes' if g.passed else 'NO'} |" for g in self.goals]
        failures = self.failures()
        if failures:
            lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
        if self.artefacts:
            lines += ["", "## Artefacts", "", "| file | size | check | max abs err | ok |", "|---|---:|---|---:|---|"]
            for art in self.artefacts:
                err = f"{art.max_abs_err:.3g}" if art.max_abs_err is not None else "–"
                lines.append(f"| {art.file} | {art.size_bytes:,} | {art.check} | {err} | {'yes' if art.passed else 'NO'} |")
            lines += [f"- `{art.file}`: {art.note}" for art in self.artefacts if art.note]
        lines += _deploy_lines(self.deploy)
        lines += _precision_lines(self.precision)
        pass_warnings = [(r.name, w) for r in self.passes for w in r.result.warnings]
        if pass_warnings:
            lines += ["", "## Pass notes", ""] + [f"- `{name}`: {w}" for name, w in pass_warnings]
        if a.uncounted:
            lines += ["", f"Uncounted ops (no cost rule, 0 FLOPs assumed): {', '.join(a.uncounted)}"]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def evaluation_table(stages: tuple[StageEvaluation, ...] | list[StageEvaluation]) -> list[str]:
    """A markdown table of evaluations: classification metrics, or agreement with the original."""
    if not stages:
        return []
    if any(s.evaluation.classification for s in stages):
        rows = ["| stage | top-1 | top-5 | precision | recall | F1 | cosine vs original |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in stages:
            c, ag = s.evaluation.classification, s.evaluation.agreement
            cos = f"{ag.cosine_similarity:.6f}" if ag else "–"
            if c is None:
                rows.append(f"| {s.stage} | – | – | – | – | – | {cos} |")
                continue
            rows.append(
                f"| {s.stage} | {c.top1:.4f} | {c.top5:.4f} | {c.precision_macro:.4f} | {c.recall_macro:.4f} | "
                f"{c.f1_macro:.4f} | {cos} |"
            )
        return rows
    rows = ["| stage | cosine vs original | MSE | max abs err |", "|---|---:|---:|---:|"]
    for s in stages:
        ag = s.evaluation.agreement
        if ag is not None:
            rows.append(f"| {s.stage} | {ag.cosine_similarity:.6f} | {ag.mse:.4g} | {ag.max_abs_err:.4g} |")
    return rows


def _deploy_lines(d: DeployChoice | None) -> list[str]:
    """The Deploy section: what to ship and why; measured timings stay in measurements.json (not deterministic)."""
    if d is None:
        return []
    if d.artefact is None:
        return ["", "## Deploy", "", f"Nothing to deploy: {d.reason}."]
    predicted = "" if d.predicted_s is None else f" Predicted {_ms(d.predicted_s)} at batch {d.predicted_batch} (roofline)."
    lines = ["", "## Deploy", "", f"`{d.artefact}` ({d.runtime}): {d.reason}.{predicted}"]
    if d.basis == "measured":
        lines += ["", "Timings of every candidate: `measurements.json`."]
    return lines


def _precision_lines(rows: tuple[LayerPrecision, ...]) -> list[str]:
    """Per-layer dtype, with a count per dtype first: ``bf16 14, fp32 3``."""
    if not rows:
        return []
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.dtype] = counts.get(r.dtype, 0) + 1
    summary = ", ".join(f"{d} {n}" for d, n in sorted(counts.items()))
    lines = ["", "## Precision per layer", "", f"Compute nodes by dtype: {summary}.", "", "| node | op | dtype |",
             "|---|---|---|"]
    return lines + [f"| {r.node} | {r.op} | {r.dtype} |" for r in rows]


def _evaluation_lines(stages: tuple[StageEvaluation, ...]) -> list[str]:
    if not stages:
        return []
    first = stages[0].evaluation
    return ["", f"## Evaluation on {first.dataset} ({first.task})", "", *evaluation_table(stages)]


def _totals_row(label: str, t: CostTotals) -> str:
    return (
        f"| {label} | {t.params:,} | {human_bytes(t.size_bytes)} | {t.macs:,} | {t.flops:,} | "
        f"{human_bytes(t.bytes_moved)} | {t.nodes} |"
    )


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "–"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _round(x: Any) -> Any:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)  # "nan", "inf", "-inf": JSON has no literal for them
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def _details_lines(name: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A pass's per-site table (``PassResult.details``): one column per key of the first row."""
    if not rows:
        return []
    keys = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "–" if v is None else str(v)

    out = ["", f"`{name}` per site:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return out + ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
