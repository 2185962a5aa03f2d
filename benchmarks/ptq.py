"""Post-training quantization that keeps the float model's decisions: effopt's steps vs onnxruntime and torch FX.

    python benchmarks/ptq.py            # full run, ~15-25 minutes on 2 shared cores
    python benchmarks/ptq.py --quick    # smoke run (fewer epochs, calibration images and AdaRound steps)
    python benchmarks/ptq.py --models pnet --regimes w4

Three trained models, all on scikit-learn's digits (8×8 images, 1347 train / 450 test):

- ``digits``: the bundled `examples.digits.DigitsNet` (recipes/checkpoints/digits.pt, or trained);
- ``mobilenet``: `benchmarks.ptq_models.DigitsMobileNet`, MobileNetV2's inverted residuals with
  depthwise convs, residual adds and BatchNorm, trained here (seeded);
- ``pnet``: `benchmarks.ptq_models.DigitsPNet`, an MTCNN PNet (PReLU, a softmax "face" head and a
  box-regression head) trained here to say "digit ≥ 5" and to box the ink. Its recipe has eval
  data without labels, so effopt's mixed precision uses the output-aware sensitivity.

Three regimes, each with its own references, configured the way each tool documents it:

==================  ========================================  ==============================================
regime              references                                effopt
==================  ========================================  ==============================================
``int8``            torch FX ``get_default_qconfig_mapping``  ``quantize`` defaults: per-channel weights
                    ("x86"); ORT ``quantize_static`` QDQ      (7 bits on a CPU without VNNI)
                    per-channel (8-bit and ``reduce_range``)
``per_tensor``      FX with a per-tensor weight observer;     ``per_channel: false``
                    ORT ``per_channel=False`` (its default)
                    with ``reduce_range``
``w4``              FX with a 4-bit (−8..7) per-channel       ``bits: 4`` (activations stay 8-bit)
                    weight observer; ORT with every weight
                    ``QInt4`` per channel (TensorQuantOverrides)
==================  ========================================  ==============================================

Per regime the effopt rows are: nearest rounding, +CLE, +CLE +bias correction, +bias correction
+AdaRound, all three, the defaults (``auto``: equalization and bias correction where they measure
better, and at 4 bits AdaRound) and the defaults with ``adaround: true``; each is
``effopt.compile`` of ``[fold_batchnorm, eliminate_dead_code, quantize]`` for ``x86-avx2``,
scored from the emitted ``model.onnx`` in onnxruntime.

What is scored: every tool calibrates on the same 256 training images (64 with ``--quick``).
Decisions are compared with the float model's on the 1541 images no tool calibrated on (the 450
test images, then the other training images): the decisions flipped (every flip is accuracy the
quantized model can lose, whatever the label says), the largest move of the probability of the
float model's decision (softmax of the logits; the PNet's own softmax), and the relative output
error ‖y_q − y‖² / ‖y‖² over every head. Top-1 against labels is on the 450 test images (one
image = 0.22 points). Below each table the target line compares effopt's best row with the
references, with a sign test on the images where exactly one of the two flips the decision.

Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import effopt  # noqa: E402
from benchmarks.ptq_models import pnet_targets, train_mobilenet, train_pnet  # noqa: E402
from benchmarks._common import INPUT_NAME, progress, quiet, work_folder  # noqa: E402
from benchmarks.quantization import CALIBRATION_BATCH, Case, _Batches, digits_case  # noqa: E402
from effopt.hardware_profiles import load_profile  # noqa: E402
from effopt.hardware_profiles.host import cpu_name, host_int8_weight_bits  # noqa: E402
from effopt.optimizer.emit.onnx import export_onnx  # noqa: E402
from effopt.optimizer.measure.runtime import open_session  # noqa: E402

# -- the cases -------------------------------------------------------------------------------------


def _calibration(quick: bool) -> list[torch.Tensor]:
    from examples import digits

    return list(digits.train_dataset(0).tensors[0][:64 if quick else 256].split(CALIBRATION_BATCH))


def trained_case(name: str, work: Path, quick: bool) -> Case:
    """``mobilenet`` or ``pnet``, trained here; the recipe points at files in ``work``."""
    from examples import digits

    epochs = 8 if quick else 20
    x_test, y_test = digits.eval_dataset(0).tensors
    calibration = _calibration(quick)
    work.mkdir(parents=True, exist_ok=True)
    torch.save({INPUT_NAME: torch.cat(calibration)}, work / "calibration.pt")
    if name == "mobilenet":
        model, factory, labels = train_mobilenet(epochs), "benchmarks.ptq_models:DigitsMobileNet", y_test
        eval_data = {"source": "sklearn-digits:test", "batch_size": 128}
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == labels).double().mean())
        what = f"DigitsMobileNet, trained {epochs} epochs here (test top-1 {100 * accuracy:.1f}%)"
    else:
        model, factory = train_pnet(epochs), "benchmarks.ptq_models:DigitsPNet"
        labels, box = pnet_targets(x_test, y_test)
        torch.save({INPUT_NAME: x_test}, work / "eval.pt")                    # no labels: output-aware
        eval_data = {"source": str(work / "eval.pt"), "batch_size": 128}
        with torch.no_grad():
            prob, pred = model(x_test)
        accuracy = float((prob.flatten(1).argmax(1) == labels).double().mean())
        box_err = float((pred.flatten(1) - box).abs().mean() * 8)
        what = (f"DigitsPNet (PReLU, softmax head + box head), trained {epochs} epochs here (test top-1 "
                f"{100 * accuracy:.1f}% on 'digit ≥ 5', box off by {box_err:.2f} px on average)")
    torch.save(model.state_dict(), work / "weights.pt")
    params = sum(p.numel() for p in model.parameters())
    return Case(
        name=name, model=model, input_shape=(1, 8, 8), calibration=calibration, eval_inputs=x_test,
        eval_labels=labels,
        recipe_model={"factory": factory, "weights": str(work / "weights.pt"), "pythonpath": [str(ROOT)]},
        recipe_data={"calibration": {"source": str(work / "calibration.pt"), "batch_size": CALIBRATION_BATCH},
                     "eval": eval_data},
        description=f"{what}, {params / 1e3:.0f} k params",
    )


def scoring_inputs(case: Case) -> torch.Tensor:
    """The test images, then the training images the calibration did not use."""
    from examples import digits

    x_train = digits.train_dataset(0).tensors[0]
    used = sum(len(b) for b in case.calibration)
    return torch.cat([case.eval_inputs, x_train[used:]])


# -- rows ------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    outputs: list[torch.Tensor] | None = None   # every head, over `scoring_inputs`
    note: str | None = None
    reference: bool = False
    quality: dict[str, float] = field(default_factory=dict)
    flipped: torch.Tensor | None = None          # bool per scored image


def _ort_outputs(path: Path, inputs: torch.Tensor) -> list[torch.Tensor]:
    session = open_session(path, 1)
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: x.contiguous().numpy()}) for x in inputs.split(128)]
    return [torch.cat([torch.from_numpy(np.asarray(c[i])) for c in chunks]).float() for i in range(len(chunks[0]))]


def _attempt(name: str, build: Callable[[], list[torch.Tensor]], reference: bool = False, note: str | None = None
             ) -> Row:
    """A row, or a row that says how its tool failed (a tool's failure is a result to report)."""
    progress(f"  {name}")
    try:
        return Row(name, build(), note, reference)
    except Exception as e:  # noqa: BLE001
        return Row(name, note=f"failed: {type(e).__name__}: {str(e)[:200]}", reference=reference)


@dataclass(frozen=True)
class Regime:
    """One way of quantizing, applied the same way by every tool: see the module docstring's table."""

    name: str
    title: str
    effopt: dict                                  # options every effopt row of the regime adds
    fx_weight: Callable[[], object] | None        # torch FX weight observer (None: the x86 default)
    ort: dict                                     # quantize_static arguments, plus "int4" for the override
    ort_label: str


def _per_tensor_weight() -> object:
    from torch.ao.quantization.observer import MinMaxObserver

    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def _four_bit_weight() -> object:
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                              quant_min=-8, quant_max=7)


REGIMES = {
    "int8": Regime("int8", "int8, per-channel weights", {}, None, {"per_channel": True},
                   "ORT quantize_static"),
    "per_tensor": Regime("per_tensor", "int8, per-tensor weights (one scale per layer)", {"per_channel": False},
                         _per_tensor_weight, {"per_channel": False, "reduce_range": True},
                         "ORT quantize_static per-tensor, reduce_range"),
    "w4": Regime("w4", "4-bit per-channel weights, 8-bit activations", {"bits": 4}, _four_bit_weight,
                 {"per_channel": True, "int4": True}, "ORT quantize_static, QInt4 weights"),
}


def fx_outputs(case: Case, regime: Regime, inputs: torch.Tensor, reference_ops: bool) -> list[torch.Tensor]:
    """torch.ao FX PTQ, x86 backend, its default qconfigs except for the regime's weight observer.

    ``reference_ops``: ``convert_to_reference_fx`` instead of ``convert_fx``: the same quantization
    choices, run as quantize → dequantize → float op. It is what FX's choices give with correct
    kernels: torch 2.13's quantized PReLU multiplies positive inputs by a slope too
    (``torch.ops.quantized.prelu`` of [-1, -0.5, 0.5, 1] with slope 0.25 gives
    [-0.25, -0.13, 0.13, 0.26]), which breaks the native row of any PReLU model.
    """
    from torch.ao.quantization import QConfig, get_default_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    mapping = get_default_qconfig_mapping("x86")
    if regime.fx_weight is not None:
        mapping.set_global(QConfig(activation=get_default_qconfig("x86").activation, weight=regime.fx_weight()))
    with quiet():
        prepared = prepare_fx(copy.deepcopy(case.model).eval(), mapping, (case.example(1),))
        with torch.inference_mode():
            for batch in case.calibration:
                prepared(batch)
            converted = (convert_to_reference_fx if reference_ops else convert_fx)(prepared)
            outs = [converted(x) for x in inputs.split(128)]
    return _heads(outs)


def _heads(outs: list) -> list[torch.Tensor]:
    """Per-batch model outputs (a tensor or a tuple of them) → one tensor per head."""
    if isinstance(outs[0], torch.Tensor):
        return [torch.cat(outs).float()]
    return [torch.cat([o[i] for o in outs]).float() for i in range(len(outs[0]))]


def _int4_overrides(model_path: Path) -> dict:
    """TensorQuantOverrides putting every Conv/Gemm/MatMul weight initializer on int4, per output channel."""
    import onnx
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(model_path)).graph
    inits = {i.name for i in graph.initializer}
    overrides = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or trans_b else 1
            overrides[node.input[1]] = [{"quant_type": QuantType.QInt4, "axis": axis}]
    return overrides


def ort_outputs(case: Case, float_onnx: Path, work: Path, tag: str, settings: dict,
                inputs: torch.Tensor) -> list[torch.Tensor]:
    """onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ, u8 activations, s8 weights, MinMax)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    pre, out = work / f"ort_pre_{tag}.onnx", work / f"ort_{tag}.onnx"
    settings = dict(settings)
    extra = {"TensorQuantOverrides": _int4_overrides(float_onnx)} if settings.pop("int4", False) else {}
    with quiet():
        quant_pre_process(str(float_onnx), str(pre))
        quantize_static(str(pre), str(out), _Batches(case.calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra,
                        **settings)
    return _ort_outputs(out, inputs)


def reference_rows(case: Case, regime: Regime, float_onnx: Path, work: Path) -> list[Row]:
    inputs = scoring_inputs(case)
    fx_name = "torch FX (x86)" + ("" if regime.fx_weight is None else f", {regime.name} weights")
    rows = [_attempt(fx_name, lambda: fx_outputs(case, regime, inputs, False), reference=True),
            _attempt(f"{fx_name}, reference ops", lambda: fx_outputs(case, regime, inputs, True), reference=True),
            _attempt(regime.ort_label, lambda: ort_outputs(case, float_onnx, work, regime.name, regime.ort, inputs),
                     reference=True)]
    if regime.name == "int8":
        rows.append(_attempt("ORT quantize_static, reduce_range", reference=True, build=lambda: ort_outputs(
            case, float_onnx, work, "int8_rr", {"per_channel": True, "reduce_range": True}, inputs)))
    return rows


EFFOPT_SETTINGS = (
    ("nearest", {"equalize": False, "bias_correction": False, "adaround": False}),
    ("+CLE", {"equalize": True, "bias_correction": False, "adaround": False}),
    ("+CLE +BC", {"equalize": True, "bias_correction": True, "adaround": False}),
    ("+BC +AdaRound", {"equalize": False, "bias_correction": True, "adaround": True}),
    ("+CLE +BC +AdaRound", {"equalize": True, "bias_correction": True, "adaround": True}),
    ("defaults (auto)", {}),                 # at 4/2 bits this includes AdaRound (its auto)
    ("auto +AdaRound", {"adaround": True}),  # AdaRound on at every width
)


def effopt_row(case: Case, regime: Regime, work: Path, label: str, options: dict, iterations: int) -> Row:
    """Compile ``[fold_batchnorm, eliminate_dead_code, quantize{options}]`` for x86-avx2; score model.onnx."""
    options = {**regime.effopt, **options}
    if options.get("adaround") is True:
        options["adaround"] = {"iterations": iterations}
    out = work / f"effopt_{regime.name}_{label.replace(' ', '_').replace('+', 'p').strip('()')}"
    recipe = {
        "version": 1,
        "model": case.recipe_model,
        "inputs": [{"name": INPUT_NAME, "shape": [1, *case.input_shape], "dtype": "float32", "range": [0, 1]}],
        "target": "x86-avx2",
        "passes": ["fold_batchnorm", "eliminate_dead_code", {"name": "quantize", **options}],
        "data": {k: v for k, v in case.recipe_data.items() if k in ("calibration", "eval")},
        "output": {"dir": str(out), "formats": ["onnx"]},
    }
    notes: list[str] = []  # what the compile said, for the row's footnote

    def build() -> list[torch.Tensor]:
        started = time.perf_counter()
        with quiet():
            result = effopt.compile(recipe, output_dir=out)
        stats = {k: int(v) for k, v in result.report.passes[-1].result.stats.items()
                 if k in ("equalized_pairs", "bias_corrected_layers", "adarounded_layers")}
        notes.append(f"compile {time.perf_counter() - started:.0f} s" + "".join(f"; {k} {v}" for k, v in stats.items()))
        return _ort_outputs(out / "model.onnx", scoring_inputs(case))

    row = _attempt(f"effopt {label}", build)
    row.note = row.note or (notes[0] if notes else None)
    return row


# -- scoring ---------------------------------------------------------------------------------------


def _decision_probs(head: torch.Tensor, is_prob: bool) -> torch.Tensor:
    """The decision head as ``[N, classes]`` probabilities (a ``[N, 2, 1, 1]`` softmax map flattened)."""
    flat = head.flatten(1) if head.dim() > 2 else head
    return flat.double() if is_prob else torch.softmax(flat.double(), dim=1)


def score(case: Case, rows: list[Row]) -> None:
    """Fill ``Row.quality``: top-1 (test), decisions flipped, max Δp, relative error over all heads.

    Decisions are taken on the first head (logits, or the PNet's softmax probabilities); row 0 is float.
    """
    is_prob = case.name == "pnet"
    reference = rows[0].outputs
    assert reference is not None and case.eval_labels is not None
    p_ref = _decision_probs(reference[0], is_prob)
    decision = p_ref.argmax(1)
    n_test = len(case.eval_labels)
    for r in rows:
        if r.outputs is None:
            continue
        p = _decision_probs(r.outputs[0], is_prob)
        num = sum(float((o.double() - f.double()).pow(2).sum()) for o, f in zip(r.outputs, reference, strict=True))
        den = sum(float(f.double().pow(2).sum()) for f in reference)
        r.flipped = p.argmax(1) != decision
        r.quality = {
            "top1": float((p[:n_test].argmax(1) == case.eval_labels).double().mean()),
            "flips": float(r.flipped.sum()),
            "max_dp": float((p.gather(1, decision[:, None]) - p_ref.gather(1, decision[:, None])).abs().max()),
            "rel_error": num / den,
        }


def sign_test(only_ref: int, only_ours: int) -> float:
    """One-sided sign test: P(at least ``only_ref`` of the discordant images go the reference's way by chance).

    Example: the reference flips 9 images effopt keeps, effopt flips 1 the reference keeps →
    P(X ≥ 9 | X ~ Binomial(10, ½)) = 11/1024 ≈ 0.011.
    """
    n = only_ref + only_ours
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(only_ref, n + 1)) / 2**n


@dataclass
class Verdict:
    line: str
    summary: tuple[str, ...]


def target(rows: list[Row]) -> Verdict:
    """effopt's best row (fewest flips, then lowest error) against each reference."""
    scored = [r for r in rows if r.quality]
    refs = [r for r in scored if r.reference]
    ours = [r for r in scored if r.name.startswith("effopt")]
    defaults = next((r for r in ours if r.name == "effopt defaults (auto)"), None)
    if not refs or not ours:
        return Verdict("target: not measurable (a row failed)", ())
    best = min(ours, key=lambda r: (r.quality["flips"], r.quality["rel_error"]))
    best_ref = min(refs, key=lambda r: (r.quality["flips"], r.quality["rel_error"]))
    assert best.flipped is not None and best_ref.flipped is not None
    only_ref = int((best_ref.flipped & ~best.flipped).sum())
    only_ours = int((best.flipped & ~best_ref.flipped).sum())
    flips, ref_flips = best.quality["flips"], best_ref.quality["flips"]
    verdict = "met" if flips < ref_flips else ("tie" if flips == ref_flips else "NOT met")
    p = sign_test(only_ref, only_ours)
    line = (f"target (effopt's best flips fewer decisions than every reference): **{verdict}**: {best.name} "
            f"{flips:.0f} flipped vs {best_ref.name} {ref_flips:.0f} (images only the reference flips / only "
            f"effopt flips: {only_ref} / {only_ours}, sign test p = {p:.3g}); output error {best.quality['rel_error']:.2e}"
            f" vs {best_ref.quality['rel_error']:.2e}; top-1 {100 * best.quality['top1']:.2f}% vs "
            f"{100 * best_ref.quality['top1']:.2f}%")
    d = defaults.quality if defaults else {}
    summary = (f"{best_ref.name}: {ref_flips:.0f}", f"{best.name.removeprefix('effopt ')}: {flips:.0f}",
               f"{d.get('flips', float('nan')):.0f}", f"{only_ref} / {only_ours}", f"{p:.2g}", verdict)
    return Verdict(line, summary)


def table(title: str, rows: list[Row]) -> str:
    base = rows[0].quality["top1"]
    n = len(rows[0].outputs[0]) if rows[0].outputs else 0
    lines = [title, "", f"| row | top-1 (test) | Δ top-1 (pt) | decisions flipped (of {n}) | max Δp | "
             "rel. output error |", "|---|---:|---:|---:|---:|---:|"]
    notes = []
    for r in rows:
        if not r.quality:
            lines.append(f"| {r.name} | — | — | — | — | — |")
        else:
            q = r.quality
            lines.append(f"| {r.name} | {100 * q['top1']:.2f}% | {100 * (q['top1'] - base):+.2f} | {q['flips']:.0f} | "
                         f"{q['max_dp']:.3f} | {q['rel_error']:.2e} |")
        if r.note:
            notes.append(f"- {r.name}: {r.note}")
    return "\n".join(lines + ([""] + notes if notes else []))


def header(quick: bool) -> str:
    bits = host_int8_weight_bits()
    profile = load_profile("x86-avx2")
    return (f"torch {torch.__version__} | onnxruntime {ort.__version__} | {cpu_name()} | effopt target x86-avx2 "
            f"(int8 weight bits {min(bits, profile.int8_weight_bits)}) | threads {torch.get_num_threads()} | "
            f"one run" + (" | QUICK mode" if quick else ""))


MODELS = ("digits", "mobilenet", "pnet")


def run_model(name: str, regimes: Sequence[str], work: Path, quick: bool) -> tuple[str, list[tuple[str, ...]]]:
    started = time.perf_counter()
    progress(f"{name}: preparing")
    work = work / name
    case = digits_case(work, quick) if name == "digits" else trained_case(name, work, quick)
    float_onnx = export_onnx(case.model, (case.example(1),), [INPUT_NAME], [True], work / "float.onnx")
    float_row = Row("float", _ort_outputs(float_onnx, scoring_inputs(case)))
    iterations = 100 if quick else 300
    parts, summary = [f"### {case.name}: {case.description}"], []
    for regime in (REGIMES[r] for r in regimes):
        progress(f"{name}, {regime.name}")
        rows = [float_row, *reference_rows(case, regime, float_onnx, work)]
        rows += [effopt_row(case, regime, work, label, options, iterations) for label, options in EFFOPT_SETTINGS]
        score(case, rows)
        verdict = target(rows)
        parts.append(table(f"#### {case.name}, {regime.title}", rows) + "\n\n" + verdict.line)
        if verdict.summary:
            summary.append((case.name, regime.name, *verdict.summary))
    progress(f"{name}: done in {time.perf_counter() - started:.0f} s")
    return "\n\n".join(parts), summary


def summary_table(rows: list[tuple[str, ...]]) -> str:
    lines = ["### Summary: decisions flipped against float", "",
             "| model | regime | best reference | effopt best | effopt defaults | only ref / only effopt | "
             "sign test p | target |", "|---|---|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer training epochs, calibration images and AdaRound steps")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--keep", type=Path, default=None, help="write artefacts here instead of a temp folder")
    args = parser.parse_args(argv)
    torch.backends.quantized.engine = "x86"
    started = time.perf_counter()
    with work_folder(args.keep, "effopt-ptq-") as work:
        results = [run_model(name, args.regimes, work, args.quick) for name in args.models]
    print(header(args.quick))
    print()
    print(summary_table([s for _, summary in results for s in summary]))
    print()
    print("\n\n".join(text for text, _ in results))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
