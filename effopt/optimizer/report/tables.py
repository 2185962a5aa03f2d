"""Readable tables for the terminal: the per-layer IR view and the pass catalogue."""

from __future__ import annotations

from typing import Any

from effopt.optimizer.ir.analysis import layer_rows, totals
from effopt.optimizer.ir.cost_model import ModelCost, estimate
from effopt.optimizer.ir.core import IR
from effopt.optimizer.report.report import human_bytes


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def layer_table(ir: IR, profile: Any = None) -> str:
    """One row per compute node, then totals; with a profile, the roofline time and bottleneck per node."""
    header = ["node", "op", "kind", "output shape", "params", "MACs", "FLOPs", "bytes", "FLOP/B"]
    cost = estimate(ir, profile) if profile is not None else None
    by_name = cost.by_name() if cost is not None else {}
    if cost is not None:
        header += ["dtype", "time µs", "bound"]
    rows = []
    for node, f in layer_rows(ir):
        shape = "×".join(str(d) for d in f.outputs[0].shape) if f.outputs else "–"
        row = [
            node.name, f.op, f.op_kind if f.counted else f"{f.op_kind} (uncounted)", shape,
            f"{f.params:,}", f"{f.macs:,}", f"{f.flops:,}", f"{f.bytes_moved:,}", f"{f.intensity:.2f}",
        ]
        if cost is not None:
            c = by_name[node.name]
            row += [c.dtype + ("" if c.supported else " ✗"), f"{c.time_s * 1e6:.3f}", c.bound]
        rows.append(row)
    t = totals(ir)
    total = ["TOTAL", "", "", "", f"{t.params:,}", f"{t.macs:,}", f"{t.flops:,}", f"{t.bytes_moved:,}",
             f"{t.flops / t.bytes_moved:.2f}" if t.bytes_moved else "0.00"]
    if cost is not None:
        total += ["", f"{cost.total_s * 1e6:.3f}", ""]
    rows.append(total)
    right = {4, 5, 6, 7, 8, 10}
    lines = [_markdown(header, rows, right), "",
             f"model size {human_bytes(t.size_bytes)} ({t.params:,} params); {t.nodes} compute nodes"]
    if t.uncounted:
        lines.append(f"uncounted (no cost rule, 0 FLOPs assumed): {', '.join(t.uncounted)}")
    if cost is not None:
        lines += _cost_footer(cost)
    return "\n".join(lines)


def _cost_footer(cost: ModelCost) -> list[str]:
    lines = [
        f"target {cost.profile} at batch {cost.batch}: predicted {cost.total_s * 1e3:.4g} ms "
        f"(compute-bound {cost.compute_bound_s * 1e3:.4g} ms, memory-bound {cost.memory_bound_s * 1e3:.4g} ms); "
        f"weights {human_bytes(cost.weight_bytes)}, peak activations {human_bytes(cost.peak_activation_bytes)}",
    ]
    if cost.memory_reason:
        lines.append(f"does not fit: {cost.memory_reason}")
    lines += [f"✗ {c.reason}" for c in cost.unsupported]
    return lines


def passes_table() -> str:
    """Every registered pass with its summary, ordering constraints and options."""
    from effopt.passes import REGISTRY

    out = []
    for p in REGISTRY:
        out.append(f"{p.name}: {p.summary}")
        if p.after:
            out.append(f"  runs after: {', '.join(p.after)}")
        fields = p.Options.model_fields
        if not fields:
            out.append("  options: none")
        for name, f in fields.items():
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            out.append(f"  {name} ({default}): {f.description or ''}")
    return "\n".join(out)
