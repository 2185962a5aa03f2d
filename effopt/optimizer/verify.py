"""Does the optimized model still compute what the original did?

Both models run on the same inputs: fixed random batches drawn from the
recipe's seed, and the recipe's real eval data when it has some. For each
output we record the worst absolute error, where it occurred, the error relative
to the output's magnitude, and (for [N, C] logits) how often the top-1 class
agrees. A model passes when every output is within ``numpy.allclose``-style
tolerance ``|opt − ref| ≤ atol + rtol·|ref|`` on every input set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.optimizer.data import DataSource
from effopt.optimizer.ir import InputSpec


@dataclass(frozen=True)
class OutputAgreement:
    """Agreement of one model output over one input set."""

    input_set: str
    output: int
    samples: int
    max_abs_err: float
    max_rel_err: float
    worst_index: tuple[int, ...]
    reference_at_worst: float
    optimized_at_worst: float
    worst_excess: float  # max of |opt − ref| − (atol + rtol·|ref|); ≤ 0 means within tolerance
    top1_agreement: float | None

    @property
    def within_tolerance(self) -> bool:
        return self.worst_excess <= 0.0

    def describe(self, rtol: float, atol: float) -> str:
        return (
            f"output {self.output} on {self.input_set}: |optimized − original| = {self.max_abs_err:.3g} at index "
            f"{list(self.worst_index)} (original {self.reference_at_worst:.6g}, optimized "
            f"{self.optimized_at_worst:.6g}) exceeds atol={atol:g} + rtol={rtol:g}·|original|"
        )


@dataclass(frozen=True)
class Verification:
    rtol: float
    atol: float
    checks: tuple[OutputAgreement, ...]

    @property
    def passed(self) -> bool:
        return all(c.within_tolerance for c in self.checks)

    def failures(self) -> list[str]:
        return [c.describe(self.rtol, self.atol) for c in self.checks if not c.within_tolerance]


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


def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]


def random_batches(specs: Sequence[InputSpec], count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` reproducible random batches; the batch size applies only to dynamic-batch inputs."""
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(s.example(g, batch if s.dynamic_batch else None) for s in specs)
        for _ in range(count)
    ]


def compare(
    reference: nn.Module,
    optimized: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    input_set: str,
    rtol: float,
    atol: float,
) -> list[OutputAgreement]:
    """Per-output agreement of ``optimized`` with ``reference`` over ``batches``."""
    refs: list[list[torch.Tensor]] = []
    opts: list[list[torch.Tensor]] = []
    for inputs in batches:
        r, o = _outputs(reference, inputs), _outputs(optimized, inputs)
        if len(r) != len(o):
            raise ValueError(f"{input_set}: original returns {len(r)} tensors, optimized {len(o)}")
        refs.append(r)
        opts.append(o)
    checks = []
    for k in range(len(refs[0]) if refs else 0):
        ref = torch.cat([r[k].reshape(-1, *r[k].shape[1:]) if r[k].dim() else r[k].reshape(1) for r in refs]).double()
        opt = torch.cat([o[k].reshape(-1, *o[k].shape[1:]) if o[k].dim() else o[k].reshape(1) for o in opts]).double()
        diff, excess = elementwise_errors(opt, ref, rtol, atol)
        flat = int(torch.argmax(excess).item()) if excess.numel() else 0
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ref.shape)) if ref.numel() else ()
        scale = float(ref.abs().nan_to_num(nan=0.0, posinf=0.0).max()) if ref.numel() else 0.0
        top1 = None
        if ref.dim() == 2 and ref.shape[1] > 1:
            top1 = float((ref.argmax(1) == opt.argmax(1)).double().mean())
        checks.append(
            OutputAgreement(
                input_set=input_set,
                output=k,
                samples=int(ref.shape[0]) if ref.dim() else 1,
                max_abs_err=float(diff.max()) if diff.numel() else 0.0,
                max_rel_err=float(diff.max()) / (scale + 1e-12) if diff.numel() else 0.0,
                worst_index=index,
                reference_at_worst=float(ref.reshape(-1)[flat]) if ref.numel() else 0.0,
                optimized_at_worst=float(opt.reshape(-1)[flat]) if opt.numel() else 0.0,
                worst_excess=float(excess.max()) if excess.numel() else 0.0,
                top1_agreement=top1,
            )
        )
    return checks


def verify(
    original: nn.Module,
    optimized: nn.Module,
    specs: Sequence[InputSpec],
    rtol: float,
    atol: float,
    samples: int,
    batch: int,
    seed: int,
    eval_data: DataSource | None = None,
) -> Verification:
    """Compare outputs on random batches and on ``eval_data`` (accuracy is `effopt.optimizer.evaluate`'s job)."""
    checks = compare(original, optimized, random_batches(specs, samples, batch, seed), "random inputs", rtol, atol)
    if eval_data is not None:
        checks += compare(original, optimized, (b.inputs for b in eval_data.batches()), f"data.eval ({eval_data.name})", rtol, atol)
    return Verification(rtol, atol, tuple(checks))
