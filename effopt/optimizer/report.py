"""The compile report: one typed object, rendered as JSON (for machines) and Markdown (for people).

Nothing run-dependent goes in: no timestamps, no absolute paths, floats rounded
to 6 significant digits, so the same recipe on the same inputs gives the same
bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from effopt.optimizer.ir import CostTotals
from effopt.optimizer.pass_manager import PassRecord
from effopt.optimizer.verify import Verification

REPORT_VERSION = 1


@dataclass(frozen=True)
class ArtefactInfo:
    file: str
    size_bytes: int
    sha256: str | None  # None where the format is not byte-deterministic (pt2)
    check: str  # what was checked, e.g. "onnx.checker + onnxruntime vs torch"
    max_abs_err: float | None = None
    passed: bool = True


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
    artefacts: tuple[ArtefactInfo, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verification.passed and all(a.passed for a in self.artefacts)

    def to_json(self) -> str:
        return json.dumps(_round(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def to_dict(self) -> dict[str, Any]:
        v = self.verification
        return {
            "report_version": REPORT_VERSION,
            "status": "passed" if self.passed else "failed",
            "recipe": self.recipe,
            "model": self.model,
            "target": self.target,
            "torch_version": self.torch_version,
            "totals": {"before": asdict(self.before), "after": asdict(self.after)},
            "passes": [
                {
                    "name": r.name,
                    "options": r.options,
                    "changed": list(r.result.changed),
                    "skipped": [asdict(s) for s in r.result.skipped],
                    "stats": dict(r.result.stats),
                    "delta": asdict(r.result.delta) if r.result.delta else None,
                    "max_abs_err_vs_original": self.pass_errors[i] if i < len(self.pass_errors) else None,
                }
                for i, r in enumerate(self.passes)
            ],
            "verification": {
                "passed": v.passed,
                "rtol": v.rtol,
                "atol": v.atol,
                "checks": [asdict(c) | {"within_tolerance": c.within_tolerance} for c in v.checks],
                "failures": v.failures(),
                "accuracy_before": asdict(v.accuracy_before) if v.accuracy_before else None,
                "accuracy_after": asdict(v.accuracy_after) if v.accuracy_after else None,
            },
            "artefacts": [asdict(a) for a in self.artefacts],
            "warnings": list(self.warnings),
        }

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
        skips = [(r.name, s) for r in self.passes for s in r.result.skipped]
        if skips:
            lines += ["", "Skipped sites:", ""] + [f"- `{name}` left `{s.node}`: {s.reason}" for name, s in skips]
        v = self.verification
        lines += [
            "",
            f"## Verification (rtol={v.rtol:g}, atol={v.atol:g}): {'passed' if v.passed else 'FAILED'}",
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
        if v.accuracy_before and v.accuracy_after:
            lines += [
                "",
                f"Top-1 accuracy on {v.accuracy_before.dataset} ({v.accuracy_before.samples} samples): "
                f"original {v.accuracy_before.top1:.4f}, optimized {v.accuracy_after.top1:.4f}.",
            ]
        lines += [f"- {f}" for f in v.failures()]
        if self.artefacts:
            lines += ["", "## Artefacts", "", "| file | size | check | max abs err | ok |", "|---|---:|---|---:|---|"]
            for art in self.artefacts:
                err = f"{art.max_abs_err:.3g}" if art.max_abs_err is not None else "–"
                lines.append(f"| {art.file} | {art.size_bytes:,} | {art.check} | {err} | {'yes' if art.passed else 'NO'} |")
        if a.uncounted:
            lines += ["", f"Uncounted ops (no cost rule, 0 FLOPs assumed): {', '.join(a.uncounted)}"]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def _totals_row(label: str, t: CostTotals) -> str:
    return (
        f"| {label} | {t.params:,} | {human_bytes(t.size_bytes)} | {t.macs:,} | {t.flops:,} | "
        f"{human_bytes(t.bytes_moved)} | {t.nodes} |"
    )


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "–"


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

