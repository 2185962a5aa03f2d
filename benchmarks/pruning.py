"""Structured pruning, side by side: effopt ``prune_channels`` at 30 / 50 / 70 % vs Torch-Pruning, on ResNet-18.

    python benchmarks/pruning.py                 # full run, ~7 minutes on 2 shared cores
    python benchmarks/pruning.py --threads 1 2   # time at 1 and at 2 threads, same compiled models (~10 minutes)
    python benchmarks/pruning.py --quick         # smoke run, ~3 minutes (width 0.25, fewer runs)

What it builds, from one CIFAR ResNet-18 (`benchmarks.cifar_models.resnet18`: 3x32x32 input,
BasicBlocks 64-128-256-512 with 1x1 downsample shortcuts, BN, global pool, fc 10; random weights
with BatchNorm statistics set from random batches, so BN folding has real work to do):

==========================  ===========================================================================
row                         how
==========================  ===========================================================================
unpruned                    ``effopt.compile`` with ``[fold_batchnorm]``: the baseline of every ratio
effopt 30 / 50 / 70 %       ``[fold_batchnorm, {prune_channels, ratio: r, scope: uniform, importance: l2}]``;
                            ``protect`` and ``round_to`` left at their defaults (first conv and classifier
                            kept; channel counts multiples of the x86-avx2 profile's ``channel_multiple``, 8)
effopt 50 %, protect: []    the same at 50 % with the stem conv prunable too, as Torch-Pruning does: the
                            like-for-like comparison with the reference row
Torch-Pruning 50 %          ``tp.pruner.MagnitudePruner`` (MetaPruner), ``MagnitudeImportance(p=2)``,
                            ``pruning_ratio=0.5``, ``ignored_layers=[fc]``, ``round_to=8``, on the BN model;
                            then compiled by effopt with ``[fold_batchnorm]`` like the baseline, so FLOPs and
                            artefacts are counted and exported the same way
effopt 50 % + int8          ``[fold_batchnorm, prune_channels 50 %, {quantize, mode: static}]``, calibrated on
                            64 fixed-seed N(0, 1) images; weight bits from the profile (7 on x86-avx2). Timed as
                            ``model_int8.pt`` (torch's x86 int8 kernels, TorchScript) in the eager column and as
                            the QDQ ``model.onnx`` in the onnxruntime column
==========================  ===========================================================================

Every model goes through effopt's public path (`effopt.compile` on a recipe dict); its FLOPs and
params are effopt's IR totals after the passes (``report.after``), the predicted speed-up is the
cost model's on x86-avx2 at batch 1, and the ONNX files are what the compile emitted.

Timing (STYLE rule 25): every variant of every row is timed in *one* `bench_runtimes` call, at
batch 1 and 32, round-robin interleaved after warm-up, p50 of ``--runs`` calls; eager PyTorch in
eval mode under ``torch.inference_mode()``, onnxruntime on CPU; ``--threads`` intra-op threads in
both (default: ``torch.get_num_threads()``). Speed-ups are unpruned p50 / row p50 in the same
runtime at the same batch (> 1 is faster); the int8 row's eager column is torch int8 vs the
unpruned fp32 eager model.

At the end, the issue's acceptance checks (issue 12, "Proof") as PASS / FAIL, measured in this
run: 50 % leaves ≤ 30 % of the FLOPs; 50 % runs ≥ 2× faster at batch 1 and 32 in onnxruntime and in
eager; 50 % + int8 ≥ 8× eager fp32 at batch 32; the digits example pruned 50 % and fine-tuned loses
≤ 1 point of top-1 (``recipes/digits_pruned.yaml``: its top-1 before, after the cut, after fine-tuning
and after quantize, from the compile's report; ``--no-digits`` leaves it out). Nothing is adjusted to
pass: a miss is printed as FAIL.

Reading the numbers: the weights are random, so this measures speed and size, not accuracy (the
digits rows measure accuracy). On a CPU without VNNI (AVX2 only) int8 convolutions gain little
over fp32; the header says which this host is. On a shared machine, timing with as many threads as
cores lets other processes stall eager PyTorch's OpenMP threads, which inflates the slowest rows
(the baselines) most; a table where a quarter of the timings spread more than ``NOISY_SPREAD`` says
so under its title, and ``--threads 1 2`` shows both settings from the same compiled models.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
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
from torch import nn  # noqa: E402

import effopt  # noqa: E402
from benchmarks import cifar_models  # noqa: E402
from benchmarks._common import BATCHES, INPUT_NAME, Runner, Timings, p50, progress, quiet, ratio  # noqa: E402
from benchmarks._common import resolve_run_args, spreads, time_interleaved, timing_line, work_folder  # noqa: E402
from effopt.hardware_profiles import load_profile  # noqa: E402
from effopt.hardware_profiles.host import cpu_flags, cpu_name, host_int8_weight_bits  # noqa: E402
from effopt.optimizer.measure.bench import LatencyStats, eager_runner, onnxruntime_runner  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
PROFILE = "x86-avx2"
QUICK_WIDTH = 0.25
CALIBRATION_IMAGES = 64
EAGER, ORT = "eager", "onnxruntime"

# Acceptance thresholds of issue 12 ("Proof").
MAX_FLOPS_FRACTION_50 = 0.30
MIN_SPEEDUP_50 = 2.0
MIN_INT8_SPEEDUP = 8.0
MAX_DIGITS_DROP_POINTS = 1.0


# -- rows -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One model: its cost (effopt IR totals) and what runs in each runtime column.

    ``eager`` is the module eager PyTorch runs (the compiled GraphModule, or the TorchScript
    int8 module); ``onnx`` the emitted model.onnx, opened once per thread count. ``labels`` says
    what runs in a column when it is not the plain fp32 model (e.g. "torch int8").
    """

    name: str
    flops: float | None = None
    params: float | None = None
    predicted_s: float | None = None  # cost model on the recipe's profile at batch 1, after the passes
    eager: nn.Module | None = None
    onnx: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    build_s: float = 0.0

    def key(self, runtime: str) -> str:
        return f"{self.name} [{runtime}]"

    @property
    def runnable(self) -> bool:
        return self.eager is not None or self.onnx is not None

    def runners(self, threads: int) -> dict[str, Runner]:
        """One runner per column; onnxruntime sessions fix their thread count when opened."""
        out: dict[str, Runner] = {}
        if self.onnx is not None:
            out[ORT] = onnxruntime_runner(self.onnx, threads)
        if self.eager is not None:
            out[EAGER] = eager_runner(self.eager)
        return out


@dataclass(frozen=True)
class Setup:
    """Files every compile shares: the unpruned weights and the calibration images."""

    work: Path
    width: float
    model: nn.Module
    weights: Path
    calibration: Path
    example: torch.Tensor  # batch 32; batch b is its first b images


def make_setup(work: Path, width: float) -> Setup:
    model = cifar_models.build("resnet18", width=width, seed=0)
    weights, calibration = work / "resnet18.pt", work / "calibration.pt"
    torch.save(model.state_dict(), weights)
    images = torch.randn(CALIBRATION_IMAGES, *cifar_models.INPUT_SHAPE, generator=torch.Generator().manual_seed(100))
    torch.save({INPUT_NAME: images}, calibration)
    example = torch.randn(max(BATCHES), *cifar_models.INPUT_SHAPE, generator=torch.Generator().manual_seed(200))
    return Setup(work, width, model, weights, calibration, example)


def recipe(setup: Setup, model: dict, passes: list, formats: Sequence[str]) -> dict:
    """An effopt recipe for the CIFAR model: batch-1 input (dynamic batch), x86-avx2, random calibration data."""
    return {
        "version": 1,
        "model": model | {"pythonpath": [str(ROOT)]},
        "inputs": [{"name": INPUT_NAME, "shape": [1, *cifar_models.INPUT_SHAPE], "dtype": "float32"}],
        "target": PROFILE,
        "passes": passes,
        "data": {"calibration": {"source": str(setup.calibration), "batch_size": 32}},
        "verify": {"samples": 2, "batch": 4},
        "output": {"dir": str(setup.work / "out"), "formats": list(formats)},
    }


def resnet_model(setup: Setup) -> dict:
    return {"factory": "benchmarks.cifar_models:resnet18", "kwargs": {"width": setup.width},
            "weights": str(setup.weights)}


def prune(ratio: float, **extra: object) -> dict:
    return {"name": "prune_channels", "ratio": ratio, "scope": "uniform", "importance": "l2"} | extra


def compile_row(name: str, setup: Setup, model: dict, passes: list, int8: bool = False) -> Row:
    """Compile one recipe and turn what it emitted into runners: the GraphModule (eager), model.onnx (ORT).

    With ``int8`` the eager column is model_int8.pt (torch's int8 kernels) instead of the fake-quant
    GraphModule, which eager PyTorch would run in float with quantize/dequantize around every op.
    """
    started = time.perf_counter()
    out = setup.work / name.replace(" ", "_").replace("%", "pct").replace(":", "").replace("[]", "none")
    with quiet():
        result = effopt.compile(recipe(setup, model, passes, ["pt2", "onnx"] if int8 else ["onnx"]), output_dir=out)
    report = result.report
    row = Row(name, float(report.after.flops), float(report.after.params),
              report.prediction.after_s if report.prediction else None)
    if int8:
        if (out / "model_int8.pt").is_file():
            with quiet():
                row.eager = torch.jit.load(str(out / "model_int8.pt"))
            row.labels[EAGER] = "torch int8 (model_int8.pt)"
        else:
            row.note = "no model_int8.pt: " + "; ".join(a.note for a in report.artefacts if a.file == "model.pt2")
        row.labels[ORT] = "QDQ int8 (model.onnx)"
    else:
        row.eager = result.model
    if (out / "model.onnx").is_file():
        row.onnx = out / "model.onnx"
    pruned = [r for r in report.passes if r.name == "prune_channels"]
    if pruned and pruned[0].result.details:
        cut = [d for d in pruned[0].result.details if d["channels_after"] != d["channels_before"]]
        row.note = f"groups cut: {channel_counts(cut)}" + (f"; {row.note}" if row.note else "")
    failures = report.failures()
    if failures:
        row.note = (row.note + "; " if row.note else "") + "effopt report: " + "; ".join(failures)
    row.build_s = time.perf_counter() - started
    return row


def channel_counts(rows: Sequence[dict]) -> str:
    """'64→32' for the pruned groups of a prune_channels report, e.g. '64→32 ×2, 128→64 ×3'."""
    counts: dict[str, int] = {}
    for d in rows:
        key = f"{d['channels_before']}→{d['channels_after']}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in counts.items())


# -- Torch-Pruning reference ------------------------------------------------------------------------


def torch_pruned_resnet18(width: float, weights: str, ratio: float, round_to: int) -> nn.Module:
    """Recipe factory of the reference row: the CIFAR ResNet-18 with ``weights``, pruned by Torch-Pruning.

    ``MagnitudePruner`` (Torch-Pruning's MetaPruner) with ``MagnitudeImportance(p=2)``, the
    classifier ignored, channel counts rounded to ``round_to``; its dependency graph is traced on
    one seeded example image. Magnitude importance needs no data, so the same call gives the
    same model: ``torch_pruned_resnet18(1.0, "w.pt", 0.5, 8)`` keeps 32 of layer1's 64 channels.
    """
    import torch_pruning as tp

    model = cifar_models.resnet18(width=width)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    example = torch.randn(1, *cifar_models.INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    pruner_class = getattr(tp.pruner, "MagnitudePruner", tp.pruner.MetaPruner)
    with quiet():
        pruner = pruner_class(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                              pruning_ratio=ratio, ignored_layers=[model.fc], round_to=round_to)
        pruner.step()
    return model.eval()


def torch_pruning_row(setup: Setup, round_to: int) -> Row:
    """Torch-Pruning at 50 % on the BN model, then effopt ``[fold_batchnorm]`` like the baseline."""
    name = "Torch-Pruning 50 %"
    try:
        import torch_pruning as tp
    except ImportError:
        return Row(name, note="torch_pruning is not installed (pip install -e '.[bench]'): row skipped")
    factory = {"factory": "benchmarks.pruning:torch_pruned_resnet18",
               "kwargs": {"width": setup.width, "weights": str(setup.weights), "ratio": 0.5, "round_to": round_to}}
    row = compile_row(name, setup, factory, ["fold_batchnorm"])
    modules = row.eager.modules() if row.eager is not None else ()
    widths = dict.fromkeys(m.out_channels for m in modules if isinstance(m, nn.Conv2d))
    row.note = (f"Torch-Pruning {tp.__version__}; conv widths {'/'.join(str(c) for c in widths)}"
                + (f"; {row.note}" if row.note else ""))
    return row


# -- digits: accuracy after cut, fine-tune, quantize -----------------------------------------------


@dataclass
class DigitsResult:
    stages: list[tuple[str, float]]  # (stage, top-1)
    flops: tuple[float, float]
    params: tuple[float, float]
    seconds: float
    note: str = ""


def digits_rows(work: Path) -> DigitsResult:
    """Compile ``recipes/digits_pruned.yaml`` (prune 50 %, fine-tune, int8) and read top-1 per stage from its report."""
    checkpoint = ROOT / "recipes" / "checkpoints" / "digits.pt"
    if not checkpoint.is_file():
        progress("digits: no checkpoint; training it with examples.digits")
        subprocess.run([sys.executable, "-m", "examples.digits", "--out", str(checkpoint)], cwd=ROOT, check=True)
    started = time.perf_counter()
    with quiet():
        result = effopt.compile(ROOT / "recipes" / "digits_pruned.yaml", output_dir=work / "digits_pruned")
    d = result.report.to_dict()
    top1 = {e["stage"]: float(e["headline"]) for e in d["evaluations"]}
    prune_pass = next(p for p in d["passes"] if p["name"] == "prune_channels")
    quantize = next(p for p in d["passes"] if p["name"] == "quantize")
    stats, o = prune_pass["stats"], prune_pass["options"]
    tune = o.get("finetune") or {}
    budget = f"{tune['epochs']} epochs" if tune.get("epochs") else f"{tune.get('steps')} steps"
    stages = [("original (trained DigitsNet)", top1["original"]),
              (f"after the {100 * o['ratio']:.0f} % cut by {o['importance']} (before fine-tuning)",
               stats["headline_after_cut_round1"]),
              (f"after fine-tuning ({budget}, labels + distillation)", stats["headline_after_finetune_round1"]),
              (f"after quantize ({quantize['options']['mode']} int8)", top1["after quantize"])]
    note = "; ".join(result.report.failures())
    return DigitsResult(stages, (stats["flops_before"], stats["flops_after"]),
                        (stats["params_before"], stats["params_after"]), time.perf_counter() - started, note)


def digits_table(r: DigitsResult) -> str:
    base = r.stages[0][1]
    lines = [f"### digits: recipes/digits_pruned.yaml (FLOPs {_count(r.flops[0])} → {_count(r.flops[1])}, "
             f"params {_count(r.params[0])} → {_count(r.params[1])}; compiled in {r.seconds:.0f} s)", "",
             "| stage | top-1 | Δ vs original (points) |", "|---|---:|---:|"]
    lines += [f"| {s} | {100 * v:.2f}% | {100 * (v - base):+.2f} |" for s, v in r.stages]
    if r.note:
        lines += ["", f"effopt report: {r.note}"]
    return "\n".join(lines)


# -- timing and tables ------------------------------------------------------------------------------


def time_rows(rows: Sequence[Row], example: torch.Tensor, warmup: int, runs: int, threads: int
              ) -> tuple[Timings, dict[str, float]]:
    """Every runner of every row in one interleaved `bench_runtimes` call, keyed by (row key, batch);
    and max |onnxruntime − eager| of each row's logits on 4 images (the two artefacts are one model)."""
    by_row = {row.name: row.runners(threads) for row in rows}
    runners = {row.key(rt): fn for row in rows for rt, fn in by_row[row.name].items()}
    with quiet():
        stats = time_interleaved(runners, lambda b: (example[:b].contiguous(),), warmup, runs, threads)
    agree = {}
    x = example[:4].contiguous()
    for row in rows:
        fns = by_row[row.name]
        if EAGER in fns and ORT in fns:
            with quiet(), torch.inference_mode():
                a = torch.as_tensor(fns[EAGER](x))
                b = torch.from_numpy(np.asarray(fns[ORT](x)[0]))  # type: ignore[index]
            agree[row.name] = float((a - b).abs().max())
    return stats, agree


def _count(n: float | None) -> str:
    if n is None or math.isnan(n):
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def table(rows: Sequence[Row], stats: Timings, agree: dict[str, float]) -> str:
    base = rows[0]
    head = ("| model | FLOPs | % of unpruned FLOPs | params | predicted × (x86-avx2, b1) | "
            + " | ".join(f"{rt} b{b} ms | × unpruned" for rt in (ORT, EAGER) for b in BATCHES)
            + " | max abs(ORT − eager) |")
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|---:|" * (2 * len(BATCHES)) + "---:|"]
    notes = []
    for row in rows:
        if not row.runnable:
            lines.append(f"| {row.name} | — | — | — | — |" + " — | — |" * (2 * len(BATCHES)) + " — |")
            notes.append(f"- {row.name}: {row.note}")
            continue
        frac = f"{100 * row.flops / base.flops:.1f}%" if row.flops and base.flops else "—"
        pred = ratio(base.predicted_s or math.nan, row.predicted_s or math.nan)
        cells = []
        for rt in (ORT, EAGER):
            for b in BATCHES:
                mine, ref = p50(stats, row.key(rt), b), p50(stats, base.key(rt), b)
                cells += ["—" if math.isnan(mine) else f"{mine * 1e3:.2f}", ratio(ref, mine)]
        dev = f"{agree[row.name]:.1e}" if row.name in agree else "—"
        lines.append(f"| {row.name} | {_count(row.flops)} | {frac} | {_count(row.params)} | {pred} | "
                     + " | ".join(cells) + f" | {dev} |")
        for rt, label in row.labels.items():
            notes.append(f"- {row.name}, {rt} column: {label}")
        if row.note:
            notes.append(f"- {row.name}: {row.note}")
        for rt in (ORT, EAGER):
            for b in BATCHES:
                s = stats.get((row.key(rt), b))
                if s is not None and s.note:
                    notes.append(f"- {row.name} [{rt}] b{b}: {s.note}")
    return "\n".join(lines + ([""] + notes if notes else []))


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def checks(rows: Sequence[Row], stats: Timings, digits: DigitsResult | None) -> list[str]:
    """The issue's acceptance checks, measured in this run (a missing number is a FAIL, never a pass)."""
    by = {r.name: r for r in rows}
    base, half, int8 = by["unpruned"], by.get("effopt 50 %"), by.get("effopt 50 % + int8")
    out = []
    if half is not None and half.flops and base.flops:
        frac = half.flops / base.flops
        out.append(f"{_verdict(frac <= MAX_FLOPS_FRACTION_50)}: effopt 50 % leaves {100 * frac:.1f}% of the FLOPs "
                   f"(need ≤ {100 * MAX_FLOPS_FRACTION_50:.0f}%)")
    for rt in (ORT, EAGER):
        for b in BATCHES:
            mine = p50(stats, half.key(rt), b) if half else math.nan
            speed = p50(stats, base.key(rt), b) / mine if mine > 0 else math.nan
            out.append(f"{_verdict(speed >= MIN_SPEEDUP_50)}: effopt 50 % is {speed:.2f}× faster than unpruned in "
                       f"{rt} at batch {b} (need ≥ {MIN_SPEEDUP_50:g}×)")
    fp32 = p50(stats, base.key(EAGER), 32)
    candidates = {int8.labels.get(rt, rt): p50(stats, int8.key(rt), 32) for rt in (ORT, EAGER)} if int8 else {}
    live = {k: v for k, v in candidates.items() if not math.isnan(v)}
    if live:
        which = min(live, key=live.__getitem__)
        speed = fp32 / live[which]
        others = ", ".join(f"{k} {fp32 / v:.2f}×" for k, v in live.items() if k != which)
        out.append(f"{_verdict(speed >= MIN_INT8_SPEEDUP)}: effopt 50 % + int8 ({which}) is {speed:.2f}× faster than "
                   f"unpruned eager fp32 at batch 32 (need ≥ {MIN_INT8_SPEEDUP:g}×)"
                   + (f"; {others}" if others else ""))
    else:
        out.append(f"FAIL: effopt 50 % + int8 has no timed artefact ({int8.note if int8 else 'row missing'})")
    if digits is not None:
        drop = 100 * (digits.stages[0][1] - digits.stages[2][1])
        drop_q = 100 * (digits.stages[0][1] - digits.stages[3][1])
        out.append(f"{_verdict(drop <= MAX_DIGITS_DROP_POINTS)}: digits pruned 50 % and fine-tuned loses {drop:.2f} "
                   f"points of top-1 (need ≤ {MAX_DIGITS_DROP_POINTS:g}; after int8 too: {drop_q:.2f})")
    else:
        out.append("not run: digits accuracy after pruning + fine-tuning (--no-digits, or it failed)")
    return out


def header(args: argparse.Namespace) -> str:
    vnni = any("vnni" in f for f in cpu_flags())
    int8 = (f"int8: {'VNNI' if vnni else 'no VNNI (AVX2 only)'}, weights {host_int8_weight_bits()}-bit"
            + ("" if vnni else ", so int8 convs gain little over fp32 here"))
    try:
        import torch_pruning as tp
        tp_version = f"torch-pruning {tp.__version__}"
    except ImportError:
        tp_version = "torch-pruning not installed"
    return (f"{datetime.date.today().isoformat()} | torch {torch.__version__} | onnxruntime {ort.__version__} | "
            f"{tp_version} | {cpu_name()}, {os.cpu_count()} logical CPUs | {int8} | "
            f"{timing_line(args.warmup, args.runs)}"
            + (f" | QUICK mode: ResNet-18 width {QUICK_WIDTH}, fewer runs; checks not meaningful"
               if args.quick else ""))


#: When a quarter of the (variant, batch) timings have a p90/p50 spread above this, the machine was
#: too busy for the ratios to mean much (a quiet run here shows 5-30%); the table is still printed,
#: with a warning under its title.
NOISY_SPREAD = 0.5


def noisy(stats: Sequence[LatencyStats]) -> bool:
    """A quarter of the timings spread more than `NOISY_SPREAD`: the machine was busy."""
    values = spreads(stats)
    return bool(values) and float(np.percentile(values, 75)) > NOISY_SPREAD


def spread_line(threads: int, stats: Sequence[LatencyStats]) -> str:
    values = spreads(stats)
    if not values:
        return f"threads {threads} (torch and onnxruntime intra-op) | spread n/a"
    median, p75 = (float(v) for v in np.percentile(values, [50, 75]))
    line = (f"threads {threads} (torch and onnxruntime intra-op) | spread (p90/p50 − 1) median {100 * median:.0f}%, "
            f"p75 {100 * p75:.0f}%, max {100 * max(values):.0f}%")
    if noisy(stats):
        line += (f"\n\nWarning: p75 spread above {100 * NOISY_SPREAD:.0f}%: other processes competed for the "
                 f"CPUs during this timing, so these ratios (eager's most: its {threads} OpenMP threads wait on each "
                 "other) are unreliable; read the table with the smallest spread.")
    return line


# -- main -------------------------------------------------------------------------------------------


def build_rows(setup: Setup) -> list[Row]:
    """Compile every variant (one `effopt.compile` each); a variant that fails is a row that says why."""
    round_to = load_profile(PROFILE).channel_multiple
    model = resnet_model(setup)
    plan: list[tuple[str, Callable[[], Row]]] = [
        ("unpruned", lambda: compile_row("unpruned", setup, model, ["fold_batchnorm"]))]
    for r in RATIOS:
        name = f"effopt {100 * r:.0f} %"
        plan.append((name, lambda r=r, name=name: compile_row(name, setup, model, ["fold_batchnorm", prune(r)])))
    plan += [
        ("effopt 50 %, protect: []", lambda: compile_row(
            "effopt 50 %, protect: []", setup, model, ["fold_batchnorm", prune(0.5, protect=[])])),
        ("Torch-Pruning 50 %", lambda: torch_pruning_row(setup, round_to)),
        ("effopt 50 % + int8", lambda: compile_row(
            "effopt 50 % + int8", setup, model, ["fold_batchnorm", prune(0.5), {"name": "quantize", "mode": "static"}],
            int8=True)),
    ]
    rows = []
    for name, build in plan:
        try:
            row = build()
        except Exception as e:  # a failing variant is a result to report, not a crash
            first = (str(e).strip().splitlines() or [""])[0][:300]
            row = Row(name, note=f"failed: {type(e).__name__}: {first}")
        progress(f"  {name}: built in {row.build_s:.0f} s" + (f" ({row.note})" if row.note else ""))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_threads = torch.get_num_threads()
    parser.add_argument("--threads", type=int, nargs="+", default=[default_threads],
                        help="intra-op threads for torch and onnxruntime; several values time (and tabulate) each "
                        f"with the same compiled models (default torch's: {default_threads})")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per (variant, batch) (default 15; 5 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2; 1 quick)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: ResNet-18 at width {QUICK_WIDTH}, fewer runs")
    parser.add_argument("--no-digits", action="store_true",
                        help="leave out the digits rows (recipes/digits_pruned.yaml: prune 50 %%, fine-tune, int8; "
                        "~15 s on an idle machine, minutes on a busy one)")
    parser.add_argument("--keep", type=Path, default=None, help="write artefacts here instead of a temp folder")
    args = parser.parse_args(argv)
    resolve_run_args(parser, args, runs=(15, 5), warmup=(2, 1))

    torch.backends.quantized.engine = "x86"
    started = time.perf_counter()
    width = QUICK_WIDTH if args.quick else 1.0
    timed: list[tuple[int, Timings, dict[str, float]]] = []
    digits = None
    with work_folder(args.keep, "effopt-prune-bench-") as work:
        progress(f"resnet18 (width {width:g}): compiling {len(RATIOS) + 4} variants")
        setup = make_setup(work, width)
        rows = build_rows(setup)
        live = [r for r in rows if r.runnable]
        for threads in args.threads:
            progress(f"timing {len(live)} models x (onnxruntime, eager) at batches {BATCHES}, {threads} threads")
            timed.append((threads, *time_rows(live, setup.example, args.warmup, args.runs, threads)))
        if not args.no_digits:
            progress("digits: compiling recipes/digits_pruned.yaml")
            try:
                digits = digits_rows(work)
            except Exception as e:  # report it, keep the ResNet tables
                progress(f"digits failed: {type(e).__name__}: {e}")
    params = _count(sum(p.numel() for p in setup.model.parameters()))
    print(header(args))
    print()
    print(f"### ResNet-18 CIFAR (width {width:g}, {params} params with BN; random weights, BN statistics from "
          "random batches)")
    for threads, stats, agree in timed:
        print()
        print(f"#### {spread_line(threads, list(stats.values()))}")
        print()
        print(table(rows, stats, agree))
        print()
        caveat = " (timings unreliable: see the warning above the table)" if noisy(list(stats.values())) else ""
        print(f"Acceptance checks (issue 12), measured on this machine at {threads} threads{caveat}:")
        for line in checks(rows, stats, digits):
            print(f"- {line}")
    if digits is not None:
        print()
        print(digits_table(digits))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
