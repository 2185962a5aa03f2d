"""Readable tables for the terminal: the per-layer IR view and the pass catalogue."""

from __future__ import annotations

from typing import Any

from effopt.optimizer.analysis import layer_rows, totals
from effopt.optimizer.ir import IR
from effopt.optimizer.report import human_bytes


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def layer_table(ir: IR, profile: Any = None) -> str:
    """One row per compute node, then totals."""
    header = ["node", "op", "kind", "output shape", "params", "MACs", "FLOPs", "bytes", "FLOP/B"]
    rows = []
    for node, f in layer_rows(ir):
        shape = "×".join(str(d) for d in f.outputs[0].shape) if f.outputs else "–"
        rows.append([
            node.name, f.op, f.op_kind if f.counted else f"{f.op_kind} (uncounted)", shape,
            f"{f.params:,}", f"{f.macs:,}", f"{f.flops:,}", f"{f.bytes_moved:,}", f"{f.intensity:.2f}",
        ])
    t = totals(ir)
    rows.append(["TOTAL", "", "", "", f"{t.params:,}", f"{t.macs:,}", f"{t.flops:,}", f"{t.bytes_moved:,}",
                 f"{t.flops / t.bytes_moved:.2f}" if t.bytes_moved else "0.00"])
    lines = [_markdown(header, rows, {4, 5, 6, 7, 8}), "",
             f"model size {human_bytes(t.size_bytes)} ({t.params:,} params); {t.nodes} compute nodes"]
    if profile is not None:
        lines.append(f"target: {profile.name}")
    if t.uncounted:
        lines.append(f"uncounted (no cost rule, 0 FLOPs assumed): {', '.join(t.uncounted)}")
    return "\n".join(lines)


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
            default = "required" if f.is_required() else f"default {f.default!r}"
            out.append(f"  {name} ({default}): {f.description or ''}")
    return "\n".join(out)
