"""Separable and low-rank rewrites, side by side: MACs, latency in onnxruntime and eager PyTorch, top-1.

    python benchmarks/separable.py            # full run: VGG-11-BN at width 1, 20 runs, 10 fine-tune epochs
    python benchmarks/separable.py --quick    # smoke run: width 0.5, 5 runs, 3 fine-tune epochs

Two tables.

**VGG-11-BN on CIFAR-shaped input** (`benchmarks/cifar_models.py`, random weights with calibrated
BatchNorm: latency does not depend on the values). The baseline is the model after
``fold_batchnorm`` (an exact pass), so every variant differs from it by the rewrite alone:
``separable_conv`` at m = 1, 2, 4 and ``low_rank`` at two ranks per layer (the largest r whose
factors cost at most 50% and 25% of the layer's MACs, ``flop_reduction: 0.5 / 0.75``), all with
``apply: all`` and no fine-tuning. Per variant: MACs (effopt's IR facts), the relative output
error against the original on random inputs (no recovery), measured p50 latency at batch 1 and
32 in onnxruntime (effopt's ``export_onnx``) and in eager PyTorch (the rewritten fx module), all
variants of a runtime timed in one `bench_runtimes` call, interleaved round-robin after warm-up,
with ``--threads`` intra-op threads (STYLE rule 25); ratios are baseline / variant (> 1 is
faster); next to them the roofline's predicted ratio on the ``x86-avx2`` and ``a100`` profiles,
and how many of the 8 convs ``apply: profitable`` would rewrite on each (it prices at the IR's
batch, 1). The classifier (one small Linear) is left out of the low-rank variants, as the
10-class head ``fc2`` is on digits. Random weights have flat singular spectra, so the output error
column is pessimistic: it is there to show that a rewrite needs recovery, which the digits table
measures on a trained net.

**Digits** (`examples.digits`, the trained checkpoint ``recipes/checkpoints/digits.pt``, built if
missing): top-1 on the 450 test images of the original, of each rewrite right after it
(separable: with the least-squares ``refit``), and after recovery fine-tuning with distillation
from the original (``finetune: {epochs: N, lr: 3e-3}``, Adam, cosine schedule, best state by
test top-1 as the fine-tuning service keeps it: the same split effopt's recipes evaluate on).

Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import cifar_models  # noqa: E402
from effopt.hardware_profiles import load_profile  # noqa: E402
from effopt.hardware_profiles.host import cpu_name  # noqa: E402
from effopt.optimizer.emit.onnx import export_onnx  # noqa: E402
from effopt.optimizer.emit.quiet import quiet_third_party  # noqa: E402
from effopt.optimizer.frontend.data import DataSource, sklearn_digits  # noqa: E402
from effopt.optimizer.ir.analysis import annotate, totals  # noqa: E402
from effopt.optimizer.ir.core import IR, InputSpec  # noqa: E402
from effopt.optimizer.ir.cost_model import estimate  # noqa: E402
from effopt.optimizer.ir.trace import trace_module  # noqa: E402
from effopt.optimizer.measure.bench import LatencyStats, bench_runtimes, eager_runner, onnxruntime_runner  # noqa: E402
from effopt.optimizer.measure.evaluate import evaluate  # noqa: E402
from effopt.optimizer.train.finetune import FineTuner  # noqa: E402
from effopt.passes.base import Pass, PassContext  # noqa: E402
from effopt.passes.manager import run_passes  # noqa: E402
from effopt.recipes import parse_recipe  # noqa: E402

BATCHES = (1, 32)
NO_TUNE = {"apply": "all", "finetune": None}
VGG_VARIANTS: dict[str, dict] = {
    "separable m=1": {"name": "separable_conv", "multiplier": 1} | NO_TUNE,
    "separable m=2": {"name": "separable_conv", "multiplier": 2} | NO_TUNE,
    "separable m=4": {"name": "separable_conv", "multiplier": 4} | NO_TUNE,
    "low-rank 50% MACs": {"name": "low_rank", "flop_reduction": 0.5, "layers": {"exclude": ["classifier"]}} | NO_TUNE,
    "low-rank 25% MACs": {"name": "low_rank", "flop_reduction": 0.75, "layers": {"exclude": ["classifier"]}} | NO_TUNE,
}
BASELINE = "original (BN folded)"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def passes(*entries: object) -> tuple[Pass, ...]:
    """Passes built the way a recipe builds them (the validator path)."""
    recipe = {"version": 1, "model": {"factory": "tests.models:mlp"}, "inputs": [{"name": "x", "shape": [1, 64]}],
              "passes": list(entries)}
    return parse_recipe(recipe).passes


def traced(model: nn.Module, shape: tuple[int, ...]) -> IR:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return annotate(IR(trace_module(model), (InputSpec("x", shape),), (x,)))


def _ratio(num: float, den: float) -> str:
    return "—" if math.isnan(num) or math.isnan(den) or den <= 0 else f"{num / den:.2f}×"


def _ms(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


# -- VGG ----------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    ir: IR
    onnx: Path
    output_error: float
    profitable: dict[str, int] = field(default_factory=dict)  # profile -> convs apply: profitable would rewrite


def vgg_variants(width: float, work: Path) -> tuple[nn.Module, list[Variant]]:
    model = cifar_models.build("vgg11_bn", width=width, seed=0)
    shape = (1, *cifar_models.INPUT_SHAPE)
    x = torch.randn(64, *cifar_models.INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    ctx = PassContext(profile=load_profile("x86-avx2"))
    base, _ = run_passes(traced(model, shape), passes("fold_batchnorm"), ctx)
    out = []
    for name, entry in {BASELINE: None, **VGG_VARIANTS}.items():
        ir = base if entry is None else run_passes(copy.deepcopy(base), passes(entry), ctx)[0]
        with torch.no_grad():
            err = float((ir.gm(x) - reference).norm() / reference.norm())
        with quiet_third_party():
            path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], work / f"{len(out)}.onnx")
        v = Variant(name, ir, path, err)
        if entry is not None:
            for profile in ("x86-avx2", "a100"):
                probe = {k: v for k, v in entry.items() if k != "apply"}
                _, (rec,) = run_passes(copy.deepcopy(base), passes(probe), PassContext(profile=load_profile(profile)))
                v.profitable[profile] = len([c for c in rec.result.changed if not c.startswith("classifier")])
        out.append(v)
        _progress(f"  {name}: built (relative output error {err:.3g})")
    return model, out


def time_vgg(variants: list[Variant], args: argparse.Namespace) -> dict[tuple[str, str, int], LatencyStats]:
    """p50 per (variant, runtime, batch): one interleaved `bench_runtimes` call per runtime."""
    def inputs(batch: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *cifar_models.INPUT_SHAPE, generator=torch.Generator().manual_seed(batch)),)

    out: dict[tuple[str, str, int], LatencyStats] = {}
    for runtime in ("onnxruntime", "eager"):
        runners = {v.name: (onnxruntime_runner(v.onnx, args.threads) if runtime == "onnxruntime" else eager_runner(v.ir.gm))
                   for v in variants}
        _progress(f"  timing {len(runners)} variants in {runtime} at batches {BATCHES}")
        for s in bench_runtimes(runners, inputs, BATCHES, args.warmup, args.runs, args.threads, measure_memory=False):
            out[(s.runtime, runtime, s.batch)] = s
    return out


def vgg_table(width: float, variants: list[Variant], stats: dict[tuple[str, str, int], LatencyStats]) -> str:
    profiles = {p: load_profile(p) for p in ("x86-avx2", "a100")}
    base = variants[0]

    def p50(v: Variant, runtime: str, batch: int) -> float:
        s = stats.get((v.name, runtime, batch))
        return math.nan if s is None else s.p50_s

    def predicted(v: Variant, profile: str, batch: int) -> float:
        return estimate(v.ir, profiles[profile], batch=batch).total_s

    lines = [
        f"### VGG-11-BN (width {width:g}), 3×32×32, random weights: rewrites vs the BN-folded original",
        "",
        "| variant | MACs/image | × fewer MACs | output rel. err | ORT b1 ms | ORT b1 × | ORT b32 ms | ORT b32 × | "
        "eager b1 × | eager b32 × | predicted × x86-avx2 b1 / b32 | predicted × a100 b1 / b32 | profitable convs x86 / a100 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_macs = totals(base.ir).macs
    for v in variants:
        macs = totals(v.ir).macs
        pred_x86, pred_gpu = (" / ".join(_ratio(predicted(base, p, b), predicted(v, p, b)) for b in BATCHES)
                              for p in ("x86-avx2", "a100"))
        profitable = f"{v.profitable['x86-avx2']} / {v.profitable['a100']}" if v.profitable else "—"
        lines.append(
            f"| {v.name} | {macs / 1e6:.1f} M | {_ratio(base_macs, macs)} | {v.output_error:.3g} | "
            f"{_ms(p50(v, 'onnxruntime', 1))} | {_ratio(p50(base, 'onnxruntime', 1), p50(v, 'onnxruntime', 1))} | "
            f"{_ms(p50(v, 'onnxruntime', 32))} | {_ratio(p50(base, 'onnxruntime', 32), p50(v, 'onnxruntime', 32))} | "
            f"{_ratio(p50(base, 'eager', 1), p50(v, 'eager', 1))} | {_ratio(p50(base, 'eager', 32), p50(v, 'eager', 32))} | "
            f"{pred_x86} | {pred_gpu} | {profitable} |"
        )
    return "\n".join(lines)


# -- digits -------------------------------------------------------------------------------------

DIGITS_VARIANTS: dict[str, dict] = {
    "separable m=1 + refit": {"name": "separable_conv", "multiplier": 1, "apply": "all", "refit": True},
    "separable m=2 + refit": {"name": "separable_conv", "multiplier": 2, "apply": "all", "refit": True},
    "separable m=4 + refit": {"name": "separable_conv", "multiplier": 4, "apply": "all", "refit": True},
    "low-rank 50% MACs": {"name": "low_rank", "flop_reduction": 0.5, "apply": "all", "layers": {"exclude": ["fc2"]}},
    "low-rank 25% MACs": {"name": "low_rank", "flop_reduction": 0.75, "apply": "all", "layers": {"exclude": ["fc2"]}},
}


def digits_model() -> nn.Module:
    from examples import digits

    checkpoint = ROOT / "recipes" / "checkpoints" / "digits.pt"
    if not checkpoint.is_file():
        _progress("digits: no checkpoint; training it (python -m examples.digits --out recipes/checkpoints/digits.pt)")
        trained, _ = digits.train(seed=0, epochs=30)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained.state_dict(), checkpoint)
    model = digits.DigitsNet()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def top1(model: nn.Module, source: DataSource) -> float:
    """Top-1 on ``source`` as effopt's own evaluation scores it (the number the fine-tuning reports)."""
    return evaluate(model, source, "classification").headline


def digits_table(epochs: int) -> str:
    model = digits_model()
    train = DataSource("sklearn-digits:train", sklearn_digits("train"), 64, True)
    test = DataSource("sklearn-digits:test", sklearn_digits("test"), 128, True)
    tuner = FineTuner(train, test, "classification", seed=0)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=train, services={"finetune": tuner})
    original = top1(model, test)
    base, _ = run_passes(traced(model, (1, 1, 8, 8)), passes("fold_batchnorm"), ctx)
    base_macs = totals(base).macs
    lines = [
        f"### Digits (DigitsNet, trained): top-1 on the 450 test images, fine-tuning {epochs} epochs at lr 3e-3",
        "",
        "| variant | MACs/image | × fewer MACs | top-1 after rewrite | top-1 after fine-tuning | Δ vs original (pt) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| original | {base_macs:,} | 1.00× | {100 * original:.1f}% | — | — |",
    ]
    for name, entry in DIGITS_VARIANTS.items():
        started = time.perf_counter()
        tuned = entry | {"finetune": {"epochs": epochs, "lr": 3e-3, "progress": False}}
        ir, (record,) = run_passes(copy.deepcopy(base), passes(tuned), ctx)
        stats = record.result.stats
        before, after = stats.get("finetune_initial_headline", math.nan), top1(ir.gm, test)
        macs = totals(ir).macs
        lines.append(f"| {name} | {macs:,} | {_ratio(base_macs, macs)} | {100 * before:.1f}% | {100 * after:.1f}% | "
                     f"{100 * (after - original):+.1f} |")
        _progress(f"  digits {name}: {100 * before:.1f}% → {100 * after:.1f}% in {time.perf_counter() - started:.0f} s")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def header(args: argparse.Namespace, all_stats: Sequence[LatencyStats]) -> str:
    spreads = [s.p90_s / s.p50_s - 1 for s in all_stats if s.p50_s > 0 and not math.isnan(s.p50_s)]
    spread = (f"spread (p90/p50 − 1) median {100 * statistics.median(spreads):.0f}%, max {100 * max(spreads):.0f}%"
              if spreads else "spread n/a")
    return (f"torch {torch.__version__} | onnxruntime {ort.__version__} | {cpu_name()} | threads {args.threads} | "
            f"warm-up {args.warmup} + {args.runs} interleaved runs per (variant, batch), p50 | {spread}"
            + (" | QUICK mode" if args.quick else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per (variant, batch) (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 5; 2 with --quick)")
    parser.add_argument("--width", type=float, default=None, help="VGG-11 width multiplier (default 1; 0.5 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="digits fine-tuning epochs (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: VGG width 0.5, 5 runs, 3 fine-tune epochs")
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.width = args.width if args.width is not None else (0.5 if args.quick else 1.0)
    args.epochs = args.epochs if args.epochs is not None else (3 if args.quick else 10)
    if args.threads < 1 or args.runs < 1 or args.warmup < 0 or args.epochs < 1:
        parser.error("need --threads >= 1, --runs >= 1, --warmup >= 0, --epochs >= 1")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effopt-sepbench-") as folder:
        work = Path(folder)
        _progress(f"VGG-11-BN width {args.width:g}: building variants")
        _, variants = vgg_variants(args.width, work)
        stats = time_vgg(variants, args)
        vgg = vgg_table(args.width, variants, stats)
    _progress("digits: rewriting and fine-tuning")
    digits = digits_table(args.epochs)
    print(header(args, list(stats.values())))
    print()
    print(vgg)
    print()
    print(digits)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
