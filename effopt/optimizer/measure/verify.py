"""Does the optimized model still compute what the original did?

Both models run on the same inputs: fixed random batches drawn from the
recipe's seed, and the recipe's real eval data when it has some. For each
output we record the worst absolute error, where it occurred, the error relative
to the output's magnitude, and (for [N, C] logits) how often the top-1 class
agrees. A model passes when every output is within ``numpy.allclose``-style
tolerance ``|opt − ref| ≤ atol + rtol·|ref|`` on every input set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.core import InputSpec


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
    """Compare outputs on random batches and on ``eval_data`` (accuracy is `effopt.optimizer.measure.evaluate`'s job)."""
    checks = compare(original, optimized, random_batches(specs, samples, batch, seed), "random inputs", rtol, atol)
    if eval_data is not None:
        checks += compare(original, optimized, (b.inputs for b in eval_data.batches()), f"data.eval ({eval_data.name})", rtol, atol)
    return Verification(rtol, atol, tuple(checks))


QUANTIZED_FIDELITY_SLACK = 1.25
"""How much further from the original a quantized artefact may be than torch's fake-quant model.

An int8 runtime does not reproduce the fake-quant model code for code: it accumulates in
int32 and requantizes with its own rounding, so wherever a value sits on a rounding
boundary it lands one code away, and in a deep network those flips compound. The flips are
a second draw of the same quantization noise, not a new error: measured on ResNet-18,
VGG-11 and MobileNetV2 (onnxruntime and torch int8), the artefact's RMS error against the
float original is 0.95-1.10x the fake-quant model's, even where the artefact and the
fake-quant model disagree by 10% of the output range. A lowering defect is a different
model: one weight scale off by 1.5x in one layer gives 1.4-11x. So the check compares
the artefact with the *original*, against the error the recipe already accepted."""


@dataclass(frozen=True)
class QuantizedFidelity:
    """How close a quantized artefact stays to the original, next to the fake-quant model it was lowered from.

    Per output over the same inputs: ``artefact_rms`` = RMS(artefact − original),
    ``fake_quant_rms`` = RMS(fake-quant − original); ``ratio`` is the worst output's
    quotient. ``max_drift`` = max |artefact − fake-quant|, for the report. E.g. fake-quant
    RMS 0.021 and artefact RMS 0.023 give ratio 1.10, within `QUANTIZED_FIDELITY_SLACK`.
    """

    artefact_rms: float
    fake_quant_rms: float
    ratio: float
    max_drift: float
    passed: bool

    def describe(self) -> str:
        return (f"RMS error vs the original {self.artefact_rms:.3g} = {self.ratio:.2f}x the fake-quant model's "
                f"{self.fake_quant_rms:.3g} (limit {QUANTIZED_FIDELITY_SLACK:g}x); max |artefact − fake-quant| "
                f"{self.max_drift:.3g}")


def quantized_fidelity(
    original: nn.Module,
    fake_quant: nn.Module,
    artefact: Callable[..., object],
    batches: Iterable[Sequence[torch.Tensor]],
    atol: float,
) -> QuantizedFidelity:
    """Run the three models on ``batches`` and check the artefact against `QUANTIZED_FIDELITY_SLACK`.

    ``artefact`` is any callable returning a tensor or a (nested) tuple of tensors, e.g. a
    TorchScript module or an onnxruntime wrapper. ``atol`` is an absolute floor, so a model
    whose quantization error happens to be ~0 is not failed for float rounding noise.

    Raises:
        ValueError: the three models return different numbers or shapes of outputs.
    """
    originals: list[list[torch.Tensor]] = []
    fakes: list[list[torch.Tensor]] = []
    arts: list[list[torch.Tensor]] = []
    for inputs in batches:
        o, f = _outputs(original, inputs), _outputs(fake_quant, inputs)
        with torch.no_grad():
            a = [t for t in tree_leaves(artefact(*inputs)) if isinstance(t, torch.Tensor)]
        if not len(o) == len(f) == len(a) or any(x.shape != y.shape for x, y in zip(f, a)):
            raise ValueError(f"the artefact returns {[tuple(t.shape) for t in a]}, the fake-quant model "
                             f"{[tuple(t.shape) for t in f]}")
        originals.append(o), fakes.append(f), arts.append(a)
    per_output: list[tuple[float, float, float, bool, float]] = []  # (ratio, artefact rms, fake-quant rms, ok, drift)
    for k in range(len(originals[0]) if originals else 0):
        ref, fq, art = (torch.cat([b[k].reshape(-1).double() for b in runs]) for runs in (originals, fakes, arts))
        art_rms, fq_rms = _rms(elementwise_errors(art, ref, 0.0, 0.0)[0]), _rms(elementwise_errors(fq, ref, 0.0, 0.0)[0])
        ratio = art_rms / fq_rms if fq_rms > 0 else (0.0 if art_rms == 0 else float("inf"))
        drift = float(elementwise_errors(art, fq, 0.0, 0.0)[0].max()) if art.numel() else 0.0
        per_output.append((ratio, art_rms, fq_rms, art_rms <= QUANTIZED_FIDELITY_SLACK * fq_rms + atol, drift))
    if not per_output:
        return QuantizedFidelity(0.0, 0.0, 0.0, 0.0, True)
    ratio, art_rms, fq_rms, _, _ = max(per_output, key=lambda r: r[0])
    return QuantizedFidelity(art_rms, fq_rms, ratio, max(r[4] for r in per_output), all(r[3] for r in per_output))


def _rms(errors: torch.Tensor) -> float:
    """Root mean square of `elementwise_errors` (already NaN-aware: a NaN on one side only is inf)."""
    return float(errors.pow(2).mean().sqrt()) if errors.numel() else 0.0
