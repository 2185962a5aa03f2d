"""Does the optimized model still compute what the original did?

Both models run on the same inputs: fixed random batches drawn from the
recipe's seed, and the recipe's real eval data when it has some. For each
output we record the worst absolute error, where it occurred, the error relative
to the output's magnitude, and (for [N, C] logits) how often the top-1 class
agrees. A model passes when every output is within ``numpy.allclose``-style
tolerance ``|opt − ref| ≤ atol + rtol·|ref|`` on every input set.

The same questions are asked of the artefacts: `compare_onnx` (the ONNX file in
onnxruntime vs the torch model it was exported from) and `quantized_fidelity` (an int8
artefact vs the original, next to the fake-quant model). Every number comes from
`effopt.optimizer.ir.compare`, so "max abs error" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effopt.optimizer.emit.onnx import eval_mode_as_exported
from effopt.errors import EmitError
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.compare import Agreement, compare_tensors, concat_batches, concat_flat, output_tensors
from effopt.optimizer.ir.core import InputSpec
from effopt.optimizer.measure.runtime import flatten_outputs, open_session, run_session, to_numpy


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


def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(*inputs))


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
    """Per-output agreement of ``optimized`` with ``reference`` over ``batches``, all batches pooled.

    Each output's batches are joined along dim 0 and compared once (`compare_tensors`), so
    top-1 and the worst element are over every sample. E.g. two batches of ``[8, 10]`` logits
    give one `OutputAgreement` with ``samples`` 16.
    """
    refs: list[list[torch.Tensor]] = []
    opts: list[list[torch.Tensor]] = []
    for inputs in batches:
        r, o = _outputs(reference, inputs), _outputs(optimized, inputs)
        if len(r) != len(o):
            raise ValueError(f"{input_set}: original returns {len(r)} tensors, optimized {len(o)}")
        refs.append(r)
        opts.append(o)
    return [_output_agreement(input_set, k, compare_tensors(opt, ref, rtol, atol))
            for k, (ref, opt) in enumerate(zip(concat_batches(refs), concat_batches(opts), strict=True))]


def _output_agreement(input_set: str, output: int, a: Agreement) -> OutputAgreement:
    return OutputAgreement(
        input_set=input_set,
        output=output,
        samples=a.samples,
        max_abs_err=a.max_abs_err,
        max_rel_err=a.max_rel_err,
        worst_index=a.worst_index,
        reference_at_worst=a.want_at_worst,
        optimized_at_worst=a.got_at_worst,
        worst_excess=a.worst_excess,
        top1_agreement=a.top1_agreement,
    )


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


HALF_ULPS = 8
"""Half-precision ulps of headroom when two runtimes run the same bf16/fp16 graph (see `dtype_tolerance`)."""

_HALF_EPS = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}  # machine epsilon: 8 and 11 bits of significand


def dtype_tolerance(dtype: str | None, rtol: float, atol: float) -> tuple[float, float]:
    """The (rtol, atol) to compare two runtimes of one model computing in ``dtype`` with.

    Two runtimes (eager PyTorch, AOTInductor, onnxruntime) running the same half-precision
    graph round differently: Inductor keeps a fused chain in fp32 and rounds once, eager
    rounds after every op, so they differ by a few half ulps per layer. The recipe's
    tolerances (1e-4 by default) are fp32 numbers; for a half model both are raised to
    `HALF_ULPS` machine epsilons: bf16 8 x 2^-8 = 0.031, fp16 8 x 2^-11 = 0.0039. fp32 (None)
    keeps the recipe's, e.g. ``dtype_tolerance(None, 1e-4, 1e-5) == (1e-4, 1e-5)``.
    """
    eps = _HALF_EPS.get(dtype or "")
    if eps is None:
        return rtol, atol
    return max(rtol, HALF_ULPS * eps), max(atol, HALF_ULPS * eps)


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
            a = output_tensors(artefact(*inputs))
        if not len(o) == len(f) == len(a) or any(x.shape != y.shape for x, y in zip(f, a)):
            raise ValueError(f"the artefact returns {[tuple(t.shape) for t in a]}, the fake-quant model "
                             f"{[tuple(t.shape) for t in f]}")
        originals.append(o), fakes.append(f), arts.append(a)
    per_output: list[tuple[float, float, float, bool, float]] = []  # (ratio, artefact rms, fake-quant rms, ok, drift)
    for k in range(len(originals[0]) if originals else 0):
        ref, fq, art = (concat_flat([b[k] for b in runs]) for runs in (originals, fakes, arts))
        art_rms, fq_rms = compare_tensors(art, ref).rms_err, compare_tensors(fq, ref).rms_err
        ratio = art_rms / fq_rms if fq_rms > 0 else (0.0 if art_rms == 0 else float("inf"))
        drift = compare_tensors(art, fq).max_abs_err
        per_output.append((ratio, art_rms, fq_rms, art_rms <= QUANTIZED_FIDELITY_SLACK * fq_rms + atol, drift))
    if not per_output:
        return QuantizedFidelity(0.0, 0.0, 0.0, 0.0, True)
    ratio, art_rms, fq_rms, _, _ = max(per_output, key=lambda r: r[0])
    return QuantizedFidelity(art_rms, fq_rms, ratio, max(r[4] for r in per_output), all(r[3] for r in per_output))


# -- ONNX artefact vs torch -------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxAgreement:
    """How closely onnxruntime reproduces torch, over every output of every input tuple.

    ``max_rel_err`` is ``max|a - b| / max|b|`` per output (b = torch), then the worst output:
    scale-aware without the blow-ups of an element-wise ``|a - b| / |b|`` near zeros. E.g.
    torch ``[10, -20]`` vs onnx ``[10.001, -20]`` gives max_abs_err 1e-3, max_rel_err 5e-5.
    ``passed`` is ``np.allclose(onnx, torch, rtol, atol)`` for every output.
    """

    max_abs_err: float
    max_rel_err: float
    passed: bool


def compare_onnx(
    path: Path,
    module: torch.nn.Module,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    rtol: float,
    atol: float,
) -> OnnxAgreement:
    """Run every input tuple through ``module`` (eval, no_grad) and the ONNX file; compare.

    Tuple/list/dict outputs are flattened in order and matched to the ONNX outputs by position.
    A different number of outputs or a different shape is an emit defect, not a tolerance
    question, so it raises instead of returning ``passed=False``. Each output of each input
    tuple is compared on its own (`compare_tensors`), then the worst is kept. Example::

        path = export_onnx(model, (torch.randn(1, 3, 32, 32),), ["image"], [True], Path("m.onnx"))
        compare_onnx(path, model, [(torch.randn(5, 3, 32, 32),)], rtol=1e-4, atol=1e-5).passed  # True

    Raises:
        EmitError: no inputs, onnxruntime fails, or output counts/shapes do not match.
    """
    if len(inputs) == 0:
        raise EmitError(f"{path}: compare_onnx got no input tuples; pass at least one batch to compare")
    session = open_session(path, threads=1)
    checks: list[Agreement] = []
    for index, args in enumerate(inputs):
        with eval_mode_as_exported(module), torch.no_grad():
            expected = flatten_outputs(module(*args), where=f"model {type(module).__name__!r} output")
        actual = run_session(session, [to_numpy(t) for t in args], path)
        _check_output_structure(actual, expected, where=f"{path}: input tuple {index}")
        checks += [compare_tensors(got, ref, rtol, atol) for got, ref in zip(actual, expected, strict=True)]
    return OnnxAgreement(
        max_abs_err=max([0.0, *(c.max_abs_err for c in checks)]),
        max_rel_err=max([0.0, *(c.max_rel_err for c in checks)]),
        passed=all(c.within_tolerance for c in checks),
    )


def _check_output_structure(actual: list[np.ndarray], expected: list[np.ndarray], where: str) -> None:
    """Same number of outputs and same shapes, else the artefact is wrong, not just imprecise."""
    if len(actual) != len(expected):
        raise EmitError(f"{where}: ONNX gives {len(actual)} outputs but torch gives {len(expected)}")
    for i, (got, ref) in enumerate(zip(actual, expected, strict=True)):
        if got.shape != ref.shape:
            raise EmitError(f"{where}: output {i} has shape {got.shape} in ONNX but {ref.shape} in torch")
