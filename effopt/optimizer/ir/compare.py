"""How far is one model's output from another's? One answer for every check that asks.

Verification (optimized vs original), the artefact checks (pt2, ONNX, int8 vs the
optimized model), the quantized-fidelity check, the torch int8 lowering's self-check, the
quantize pass's sensitivity and the benchmarks all compare outputs. They share these rules,
so a number means the same thing wherever the report shows it:

- everything is computed in float64 (bool and integer outputs too);
- NaN on both sides at the same place, or the same infinity, is agreement (error 0); a NaN
  or infinity on one side only is an infinite error;
- the relative error is ``max|got - want| / max|want|`` (the finite part of ``want``):
  scale-aware, without the blow-ups of an element-wise ``|a - b| / |b|`` next to zeros;
- tolerance is ``numpy.allclose``'s ``|got - want| <= atol + rtol * |want|``;
- top-1 agreement is reported for ``[N, C]`` outputs with ``C > 1`` (logits), else None.

This module is pure tensor numerics (torch and numpy only), so passes and lowerings can use
it as well as measurement. Example::

    a = compare_tensors(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    a.max_abs_err, a.max_rel_err     # (1.5, 0.75): |2.0 - 0.5| at [1, 0], over max|want| = 2
    a.worst_index, a.top1_agreement  # ((1, 0), 0.5): row 1 picks class 0, the reference class 1
    a.rms_err                        # sqrt((0 + 1 + 2.25 + 1) / 4) = 1.0308
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

__all__ = [
    "Agreement",
    "compare_outputs",
    "compare_tensors",
    "concat_batches",
    "concat_flat",
    "elementwise_errors",
    "output_tensors",
]

# Added to max|want| before dividing, so an all-zero reference gives a huge but finite ratio.
_SCALE_EPS = 1e-12


@dataclass(frozen=True)
class Agreement:
    """How closely ``got`` reproduces ``want`` (one tensor each, same shape).

    ``worst_*`` describe the element that is furthest outside the tolerance the comparison
    was made with (with ``rtol = atol = 0``: the largest error); ``worst_excess`` is its
    ``|got - want| - (atol + rtol * |want|)``, so ``<= 0`` means within tolerance.
    ``relative_l2`` is ``||got - want||_2 / ||want||_2``, or the plain ``||got - want||_2``
    when ``want`` is all zeros. ``mismatches`` counts elements that differ at all (the check
    for integer programs, which must agree bit for bit).

    Example: got ``[10.001, -20]`` vs want ``[10, -20]`` gives max_abs_err 1e-3,
    max_rel_err 5e-5, rms_err 7.07e-4, mismatches 1, top1_agreement None (1-D).
    """

    elements: int
    samples: int
    max_abs_err: float
    max_rel_err: float
    rms_err: float
    relative_l2: float
    mismatches: int
    worst_excess: float
    worst_index: tuple[int, ...]
    want_at_worst: float
    got_at_worst: float
    top1_agreement: float | None

    @property
    def within_tolerance(self) -> bool:
        """Every element within ``atol + rtol * |want|`` (the tolerance the comparison used)."""
        return self.worst_excess <= 0.0


def elementwise_errors(opt: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|opt − ref|, |opt − ref| − (atol + rtol·|ref|)) in float64, treating equal non-finite values as equal.

    NaN where the original has NaN, or the same infinity, is agreement (error 0);
    a NaN or infinity on one side only is an infinite error. E.g. opt [1, nan, 3],
    ref [1, nan, 2], rtol 0, atol 0.5 → errors [0, 0, 1], excess [-0.5, -0.5, 0.5].
    """
    opt, ref = opt.double(), ref.double()
    same = (opt == ref) | (opt.isnan() & ref.isnan())
    diff = torch.where(same, torch.zeros_like(opt), (opt - ref).abs()).nan_to_num(nan=float("inf"))
    excess = diff - (atol + rtol * ref.abs().nan_to_num(nan=0.0, posinf=0.0))
    return diff, torch.where(same, torch.full_like(excess, -atol), excess)


def compare_tensors(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray,
                    rtol: float = 0.0, atol: float = 0.0) -> Agreement:
    """Every `Agreement` number of ``got`` against the reference ``want``; numpy arrays work too.

    An empty pair agrees (all errors 0). Example: got ``[1.0, 2.5]``, want ``[1.0, 2.0]``
    gives max_abs_err 0.5, max_rel_err 0.25, worst_index (1,), within_tolerance only if
    ``atol + rtol * 2.0 >= 0.5``.

    Raises:
        ValueError: the shapes differ (a different model, not an imprecise one).
    """
    got64, want64 = _float64(got), _float64(want)
    if got64.shape != want64.shape:
        raise ValueError(f"cannot compare shape {list(got64.shape)} with the reference's {list(want64.shape)}")
    top1 = None
    if want64.dim() == 2 and want64.shape[1] > 1:
        top1 = float((want64.argmax(1) == got64.argmax(1)).double().mean())
    samples = int(want64.shape[0]) if want64.dim() else 1
    if want64.numel() == 0:
        return Agreement(0, samples, 0.0, 0.0, 0.0, 0.0, 0, 0.0, (), 0.0, 0.0, top1)
    diff, excess = elementwise_errors(got64, want64, rtol, atol)
    flat = int(torch.argmax(excess).item())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), want64.shape))
    max_abs = float(diff.max())
    scale = float(want64.abs().nan_to_num(nan=0.0, posinf=0.0).max())
    squared, want_squared = float(diff.pow(2).sum()), float(want64.pow(2).sum())
    return Agreement(
        elements=want64.numel(),
        samples=samples,
        max_abs_err=max_abs,
        max_rel_err=max_abs / (scale + _SCALE_EPS),
        rms_err=float(diff.pow(2).mean().sqrt()),
        relative_l2=math.sqrt(squared / want_squared) if want_squared > 0 else math.sqrt(squared),
        mismatches=int((diff != 0).sum()),
        worst_excess=float(excess.max()),
        worst_index=index,
        want_at_worst=float(want64.reshape(-1)[flat]),
        got_at_worst=float(got64.reshape(-1)[flat]),
        top1_agreement=top1,
    )


def compare_outputs(got: object, want: object, rtol: float = 0.0, atol: float = 0.0) -> tuple[Agreement, ...]:
    """`compare_tensors` for each tensor of two (nested) outputs, matched by position.

    Outputs may be a tensor, a numpy array, or a tuple/list/dict holding them (non-tensor
    leaves are ignored), e.g. ``(logits, (features,))``. Example: ``compare_outputs((a, b),
    (a, b + 1))`` gives two agreements, the second with max_abs_err 1.0.

    Raises:
        ValueError: a different number of tensors, or a tensor of a different shape.
    """
    got_tensors, want_tensors = output_tensors(got), output_tensors(want)
    if len(got_tensors) != len(want_tensors):
        raise ValueError(f"cannot compare {len(got_tensors)} output tensors with the reference's {len(want_tensors)}")
    agreements = []
    for i, (g, w) in enumerate(zip(got_tensors, want_tensors, strict=True)):
        try:
            agreements.append(compare_tensors(g, w, rtol, atol))
        except ValueError as e:
            raise ValueError(f"output {i}: {e}") from e
    return tuple(agreements)


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a (nested) model output in order, numpy arrays as tensors, other leaves dropped.

    Example: ``output_tensors((x, {"aux": y}, 3))`` is ``[x, y]``.
    """
    leaves = tree_leaves(output)
    return [torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
            for t in leaves if isinstance(t, (torch.Tensor, np.ndarray))]


def concat_batches(runs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per output, the tensors of every run joined along the batch dimension (a 0-d one as one row).

    ``runs[b][k]`` is output ``k`` on batch ``b``; every run must have as many outputs as the
    first. Example: two runs of ``[N=8, 10]`` logits give one ``[16, 10]`` tensor, so top-1 and
    RMS are taken over all 16 samples.
    """
    if not runs:
        return []
    return [torch.cat([r[k].reshape(-1, *r[k].shape[1:]) if r[k].dim() else r[k].reshape(1) for r in runs])
            for k in range(len(runs[0]))]


def concat_flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every tensor flattened and joined into one float64 vector: for one number over all outputs.

    Example: ``concat_flat([torch.ones(2, 2), torch.zeros(3)])`` has 7 elements; no tensors
    give an empty vector.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _float64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    return torch.from_numpy(np.asarray(x).astype(np.float64))
