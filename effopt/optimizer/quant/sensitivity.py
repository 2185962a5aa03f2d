"""Output-aware sensitivity: does quantizing a layer change what the model *decides*, head by head?

Why: a relative output error of 1 % can be harmless (every logit moves a little) or decisive (a
face probability crosses 0.5, a class flips). Without labels (``data.eval`` has none) effopt
cannot score accuracy, but it can compare the quantized model's decisions with the float
model's on the same inputs: top-1 agreement per decision head. Mixed precision sorts the
layers whose quantization flips decisions first, and the per-layer report shows the agreement.

Which outputs are decisions (`decision_axes`): a head produced by softmax / log-softmax decides
along the softmax dim (``[N, 2, H, W]`` face probabilities: dim 1, per position); when no head
has a softmax, a ``[N, C]`` output with C > 1 is taken as logits (as `compare_tensors` does). In
a model that has softmax heads, its other heads (boxes, landmarks) are regression heads: only
their relative error counts.

Example: float decisions [0, 1, 1, 0] and quantized [0, 1, 0, 0] on a face head give agreement
0.75; with a second head of boxes, `OutputSensitivity.decision_agreement` is 0.75 (the worst
decision head) and ``relative_error`` pools both heads, as the mixed-precision budget does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.compare import compare_tensors, concat_flat, output_tensors

__all__ = ["HeadAgreement", "OutputSensitivity", "decision_axes", "measure_outputs"]

_SOFTMAX_KINDS = ("softmax", "log_softmax")


@dataclass(frozen=True)
class HeadAgreement:
    """One output head: its relative error ‖y_q − y‖² / ‖y‖² and, for a decision head, its top-1 agreement."""

    index: int
    relative_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class OutputSensitivity:
    """Every head of one comparison, and the pooled relative error over all of them."""

    heads: tuple[HeadAgreement, ...]
    relative_error: float  # ‖y_q − y‖² / ‖y‖² over every output: the mixed-precision budget's number

    @property
    def decision_agreement(self) -> float | None:
        """The worst decision head's top-1 agreement, None when the model has no decision head."""
        values = [h.top1_agreement for h in self.heads if h.top1_agreement is not None]
        return min(values) if values else None

    @property
    def flips(self) -> float:
        """Fraction of decisions that changed on the worst head (0 without decision heads)."""
        agreement = self.decision_agreement
        return 0.0 if agreement is None else 1.0 - agreement

    def sort_key(self) -> tuple[float, float]:
        """Most sensitive first: decision flips, then relative error (so without flips the old order holds)."""
        return (-self.flips, -self.relative_error)


def _softmax_dim(n: fx.Node, gm: fx.GraphModule) -> int | None:
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "dim", None)
    if "dim" in n.kwargs:
        return n.kwargs["dim"]
    return n.args[1] if len(n.args) > 1 and isinstance(n.args[1], int) else None


def decision_axes(gm: nn.Module) -> tuple[int | None, ...] | None:
    """Per graph output (flattened in order), the dim a softmax head decides along, or None for the others.

    Returns None for a module without an fx graph (then `measure_outputs` falls back to the
    ``[N, C]`` rule). A softmax whose dim is not a constant counts as dim −1.
    """
    if not isinstance(gm, fx.GraphModule):
        return None
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    axes: list[int | None] = []
    for leaf in tree_leaves(out.args[0]):
        if not isinstance(leaf, fx.Node) or leaf.op not in ("call_module", "call_function", "call_method"):
            axes.append(None)
            continue
        if canonical_op(leaf, gm) in _SOFTMAX_KINDS:
            dim = _softmax_dim(leaf, gm)
            axes.append(dim if isinstance(dim, int) else -1)
        else:
            axes.append(None)
    return tuple(axes)


def _top1(got: torch.Tensor, want: torch.Tensor, axis: int) -> float:
    return float((got.argmax(dim=axis) == want.argmax(dim=axis)).double().mean())


def measure_outputs(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    axes: tuple[int | None, ...] | None = None,
) -> OutputSensitivity:
    """Compare ``model`` with ``reference`` over ``batches``: per head error and decision agreement.

    ``axes`` from `decision_axes` of the float graph; None or all-None applies the ``[N, C]``
    logits rule. The pooled ``relative_error`` equals the squared `Agreement.relative_l2` of every
    output joined, as the quantize pass's mixed precision has always measured it.
    """
    got_runs: list[list[torch.Tensor]] = []
    want_runs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for inputs in batches:
            got_runs.append(output_tensors(model(*inputs)))
            want_runs.append(output_tensors(reference(*inputs)))
    got_all = [t for run in got_runs for t in run]
    want_all = [t for run in want_runs for t in run]
    pooled = compare_tensors(concat_flat(got_all), concat_flat(want_all)).relative_l2 ** 2
    heads_n = len(want_runs[0]) if want_runs else 0
    any_softmax = axes is not None and any(a is not None for a in axes)
    heads = []
    for k in range(heads_n):
        got = torch.cat([run[k].detach().double().reshape(-1, *run[k].shape[1:]) if run[k].dim() else
                         run[k].detach().double().reshape(1) for run in got_runs])
        want = torch.cat([run[k].detach().double().reshape(-1, *run[k].shape[1:]) if run[k].dim() else
                          run[k].detach().double().reshape(1) for run in want_runs])
        err = compare_tensors(got, want).relative_l2 ** 2
        axis = axes[k] if axes is not None and k < len(axes) else None
        if axis is not None and want.dim() > 1:
            agreement: float | None = _top1(got, want, axis)
        elif not any_softmax and want.dim() == 2 and want.shape[1] > 1:
            agreement = _top1(got, want, 1)
        else:
            agreement = None
        heads.append(HeadAgreement(k, err, agreement))
    return OutputSensitivity(tuple(heads), pooled)
