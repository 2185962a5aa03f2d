"""Runs passes in recipe order, checks their ordering constraints, re-annotates after each.

After a pass that changed something the manager lints the graph, recompiles,
deletes submodules nothing calls any more, re-runs the analysis and records the
before/after totals, so a pass's savings come from the one counter the cost
model also reads. A pass that rejects its input (any `EffoptError`) is re-raised as
`PassError` naming the pass and the passes that ran before it: bad input, exit 2.
Any other exception is a bug in the pass, re-raised as `InternalError` with the
same names and the original as ``__cause__``, so the CLI prints the traceback and
exits 3 instead of blaming the user's model. So is any failure to lint or re-analyse
the graph a pass returned (even a `TraceError`): the graph analysed before the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from effopt.errors import EffoptError, InternalError, PassError
from effopt.optimizer.ir.analysis import annotate, totals
from effopt.optimizer.ir.core import IR, CostTotals
from effopt.optimizer.ir.trace import raise_if_interrupted
from effopt.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class PassRecord:
    """One pass's run: its result (with ``delta`` filled) and the totals around it."""

    name: str
    options: dict[str, object]
    result: PassResult
    before: CostTotals
    after: CostTotals
    lossy: bool = False


def check_order(passes: Sequence[Pass]) -> None:
    """Raise `PassError` if a pass comes before one it must follow.

    ``[quantize, fold_batchnorm]`` fails because quantize declares
    ``after = ("fold_batchnorm",)``; a constraint on an absent pass is ignored.
    """
    position = {p.name: i for i, p in enumerate(passes)}
    for i, p in enumerate(passes):
        for earlier in p.after:
            j = position.get(earlier)
            if j is not None and j > i:
                raise PassError(
                    f"passes[{i}] '{p.name}' must run after '{earlier}' (passes[{j}]): {p.name} declares "
                    f"after={p.after}; move '{earlier}' before '{p.name}' in the recipe"
                )


def run_passes(
    ir: IR, passes: Sequence[Pass], ctx: PassContext, on_pass: Callable[[PassRecord], None] | None = None
) -> tuple[IR, list[PassRecord]]:
    """Run ``passes`` over ``ir`` in order; returns the final IR and one record per pass.

    ``on_pass`` sees the IR after each pass (e.g. to measure the error each
    pass introduces, so a failed verification can name the pass).
    """
    check_order(passes)
    records: list[PassRecord] = []
    before = totals(annotate(ir))
    for p in passes:
        try:
            result = p.run(ir, ctx)
        except EffoptError as e:
            raise PassError(f"pass '{p.name}' failed{_after(records)}: {e}") from e
        except Exception as e:  # a bug in a pass, not bad input: name it, keep the traceback
            raise_if_interrupted(e)  # Ctrl-C stays an interrupt
            raise InternalError(f"pass '{p.name}' crashed{_after(records)}: {type(e).__name__}: {e}") from e
        ir = result.ir
        if result.modified:
            try:
                ir.gm.delete_all_unused_submodules()
                annotate(ir.lint().recompile())
            except Exception as e:  # the graph analysed before the pass: what broke it is the pass, a bug
                raise_if_interrupted(e)
                raise InternalError(f"pass '{p.name}' left a graph effopt cannot analyse{_after(records)}: "
                                    f"{type(e).__name__}: {e}") from e
        after = totals(ir)
        records.append(
            PassRecord(
                p.name, p.options.model_dump(mode="json"), replace(result, delta=before.delta(after)), before, after, p.lossy
            )
        )
        before = after
        if on_pass is not None:
            on_pass(records[-1])
    return ir, records


def _after(records: list[PassRecord]) -> str:
    return f" (after {', '.join(r.name for r in records)})" if records else ""
