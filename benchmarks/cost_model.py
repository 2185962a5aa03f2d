"""Is the roofline cost model right about *this* machine? Predicted vs measured onnxruntime latency.

    python benchmarks/cost_model.py [--quick] [--runs N]

For five architectures (ResNet-, VGG-, MobileNet-style, an MLP, a small transformer encoder)
at two batch sizes each, this script

1. measures the machine with `measure_host(threads=1)` (the `host` profile: matmul peak per
   dtype, DRAM copy bandwidth, per-op overhead in onnxruntime),
2. annotates each model's IR at batch 1 and predicts its latency at batch 1 and 8 with
   `estimate(ir, host, batch=b).total_s` (batch 8 uses the cost model's batch scaling),
3. exports each model once with effopt's `export_onnx` (dynamic batch) and measures
   onnxruntime latency with 1 thread: all 10 (model, batch) cases interleaved run by run
   after warm-up, median of N runs,
4. prints one markdown table and the Spearman rank correlation and median
   predicted/measured ratio, plus the same two numbers for the variants the cost model's
   design choices were decided by (which per-op overhead figure; whether views pay it;
   BatchNorm folded in the IR first, as onnxruntime's optimizer does),
5. repeats 3-4 on the test zoo's own tiny models (10-500 us), where per-op overhead is a
   large share of the time, since that is where the overhead choices show.

The cost model is a plain roofline with measured host peaks: nothing is fitted per model.
The main models are larger than the test zoo's so every latency sits well above the ~5 us
floor of one onnxruntime call. Runs in under a minute here (2 shared cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from effopt.hardware_profiles import HardwareProfile  # noqa: E402
from effopt.hardware_profiles.host import HostMeasurement, measure_host_details  # noqa: E402
from effopt.optimizer.ir.analysis import annotate  # noqa: E402
from effopt.optimizer.measure.bench import bench_runtimes, onnxruntime_runner, spearman  # noqa: E402
from effopt.optimizer.ir.cost_model import ERASED_KINDS, estimate, is_view  # noqa: E402
from effopt.optimizer.emit.onnx import export_onnx  # noqa: E402
from effopt.optimizer.ir.core import IR, InputSpec, facts, has_facts  # noqa: E402
from effopt.passes.base import PassContext  # noqa: E402
from effopt.optimizer.ir.trace import trace_module  # noqa: E402
from effopt.passes.fold_batchnorm import FoldBatchNorm  # noqa: E402
import tests.models as zoo  # noqa: E402
from tests.models import BasicBlock, InvertedResidual, TinyTransformer, randomize_bn, seeded  # noqa: E402

BATCHES = (1, 8)


# -- models (bigger than the test zoo's, same building blocks) ----------------------------------------


def resnet_style() -> nn.Module:
    """stem 3x3 3->32, BasicBlocks 32, 32->64 s2, 64->128 s2, pool, fc; input [3, 64, 64]."""
    with seeded(0):
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            BasicBlock(32, 32), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(128, 10),
        )
    return randomize_bn(model, 0).eval()


def vgg_style() -> nn.Module:
    """conv 3->32, 32->32, pool, 64, 64, pool, 128, pool, fc 8192->256->10; input [3, 64, 64]."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    with seeded(0):
        model = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.MaxPool2d(2),
            nn.Flatten(1), nn.Linear(128 * 8 * 8, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10),
        )
    return randomize_bn(model, 0).eval()


def mobilenet_style() -> nn.Module:
    """MobileNetV2-like: stem s2 3->32, 5 inverted residuals (t=1,6,6,6,6), head 1x1 ->256; input [3, 96, 96]."""
    with seeded(0):
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
            InvertedResidual(32, 16, 1, 1), InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6),
            InvertedResidual(24, 32, 2, 6), InvertedResidual(32, 32, 1, 6),
            nn.Conv2d(32, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2), nn.Linear(256, 10),
        )
    return randomize_bn(model, 0).eval()


def mlp() -> nn.Module:
    """784 -> 1024 -> 1024 -> 512 -> 10 with ReLUs; input [784]."""
    with seeded(0):
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10),
        )
    return model.eval()


def tiny_transformer() -> nn.Module:
    """4 pre-norm encoder layers, dim 128, 4 heads, MLP 256, sequence 64; input [64, 128]."""
    with seeded(0):
        model = TinyTransformer(dim=128, heads=4, seq=64, layers=4)
    return model.eval()


Models = dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]

MODELS: Models = {
    "resnet_style": (resnet_style, (3, 64, 64)),
    "vgg_style": (vgg_style, (3, 64, 64)),
    "mobilenet_style": (mobilenet_style, (3, 96, 96)),
    "mlp": (mlp, (784,)),
    "tiny_transformer": (tiny_transformer, (64, 128)),
}

# The test zoo's own models and per-sample shapes: latencies of ~10-100 us, where per-op
# overhead is a large share, so the overhead choices show up here if anywhere.
SMALL_MODELS: Models = {name: (zoo.ZOO[name][0], zoo.ZOO[name][1][1:]) for name in MODELS}
SMALL_BATCHES = (1, 16)


# -- one suite ---------------------------------------------------------------------------------------


def build_ir(model: nn.Module, sample_shape: tuple[int, ...]) -> IR:
    x = torch.randn(1, *sample_shape, generator=torch.Generator().manual_seed(0))
    return annotate(IR(trace_module(model), (InputSpec("x", (1, *sample_shape), dynamic_batch=True),), (x,)))


def fold_bn(ir: IR) -> IR:
    """A copy of ``ir`` with effopt's fold_batchnorm pass applied (what onnxruntime's optimizer also does)."""
    result = FoldBatchNorm().run(IR(copy.deepcopy(ir.gm), ir.inputs, ir.example_inputs), PassContext())
    return annotate(result.ir)


def predict_s(ir: IR, profile: HardwareProfile, batch: int, views: str = "shipped") -> float:
    """``estimate(...).total_s``; ``views`` re-prices view nodes for the design-choice variants.

    ``"shipped"``: as the cost model does (reshape-like views pay op overhead, erased kinds
    such as dropout pay nothing); ``"free"``: no view pays anything; ``"all"``: every view,
    erased kinds included, pays op overhead.
    """
    cost = estimate(ir, profile, batch=batch)
    if views == "shipped":
        return cost.total_s
    view_nodes = [facts(n) for n in ir.compute_nodes() if has_facts(n) and is_view(facts(n))]
    if views == "free":
        return cost.total_s - cost.view_s
    erased = sum(1 for f in view_nodes if f.op_kind in ERASED_KINDS)
    return cost.total_s + erased * profile.op_overhead_s


def summary(pred: list[float], meas: list[float]) -> tuple[float, float]:
    return spearman(pred, meas), statistics.median(p / m for p, m in zip(pred, meas, strict=True))


@dataclass(frozen=True)
class Suite:
    """Measured onnxruntime p50 per (model, batch), and the IRs to predict from."""

    cases: list[tuple[str, int]]
    shapes: dict[str, tuple[int, ...]]
    irs: dict[str, tuple[IR, IR]]  # (as traced, BatchNorm folded)
    measured_s: list[float]
    spread: float


def run_suite(
    models: Models,
    batches: tuple[int, ...],
    warmup: int,
    runs: int,
    tmp: Path,
) -> Suite:
    """Export every model, then time all (model, batch) cases interleaved in one `bench_runtimes` call."""
    irs: dict[str, tuple[IR, IR]] = {}
    runners: dict[str, Callable[..., object]] = {}
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    for name, (builder, shape) in models.items():
        model = builder()
        ir = build_ir(model, shape)
        irs[name] = (ir, fold_bn(ir))
        path = export_onnx(model, (ir.example_inputs[0],), ["x"], [True], tmp / f"{name}-{len(shape)}.onnx")
        runners[name] = onnxruntime_runner(path, threads=1)
        for b in batches:
            inputs[name, b] = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))

    def per_model(name: str) -> Callable[..., object]:
        return lambda batch: runners[name](inputs[name, batch])  # each model feeds its own input

    stats = bench_runtimes(
        {name: per_model(name) for name in models},
        make_inputs=lambda b: (b,),
        batches=batches,
        warmup=warmup,
        runs=runs,
        threads=1,
        measure_memory=False,
    )
    measured = {(s.runtime, s.batch): s.p50_s for s in stats}
    cases = [(name, b) for name in models for b in batches]
    return Suite(
        cases=cases,
        shapes={name: shape for name, (_, shape) in models.items()},
        irs=irs,
        measured_s=[measured[c] for c in cases],
        spread=statistics.median(s.p90_s / s.p50_s for s in stats),
    )


def print_table(suite: Suite, predicted: list[float]) -> None:
    print("| model | input | predicted ms | measured ms | predicted/measured |")
    print("|---|---|---:|---:|---:|")
    for (name, b), p, m in zip(suite.cases, predicted, suite.measured_s, strict=True):
        shape = "x".join(str(d) for d in (b, *suite.shapes[name]))
        print(f"| {name} | {shape} | {p * 1e3:.3f} | {m * 1e3:.3f} | {p / m:.2f} |")


def print_variants(suite: Suite, host: HostMeasurement) -> None:
    profile = host.profile

    def with_overhead(seconds: float) -> HardwareProfile:
        return profile.model_copy(update={"op_overhead_s": seconds})

    variants = {
        "as shipped": [predict_s(suite.irs[n][0], profile, b) for n, b in suite.cases],
        f"op overhead = eager torch.add ({host.torch_op_overhead_s * 1e6:.2f} us)": [
            predict_s(suite.irs[n][0], with_overhead(host.torch_op_overhead_s), b) for n, b in suite.cases
        ],
        f"op overhead = onnxruntime per node ({host.onnxruntime_op_overhead_s * 1e6:.2f} us)": [
            predict_s(suite.irs[n][0], with_overhead(host.onnxruntime_op_overhead_s), b) for n, b in suite.cases
        ],
        f"op overhead = onnxruntime 1-node call ({host.onnxruntime_call_overhead_s * 1e6:.2f} us)": [
            predict_s(suite.irs[n][0], with_overhead(host.onnxruntime_call_overhead_s), b) for n, b in suite.cases
        ],
        "views free (no overhead)": [predict_s(suite.irs[n][0], profile, b, views="free") for n, b in suite.cases],
        "every view pays overhead, dropout/identity too": [
            predict_s(suite.irs[n][0], profile, b, views="all") for n, b in suite.cases
        ],
        "BatchNorm folded into convs before pricing (as onnxruntime does)": [
            predict_s(suite.irs[n][1], profile, b) for n, b in suite.cases
        ],
    }
    for label, values in variants.items():
        v_rho, v_ratio = summary(values, suite.measured_s)
        print(f"- {label}: Spearman {v_rho:.3f}, median predicted/measured {v_ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick host measurement and fewer runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 60, quick 15)")
    args = parser.parse_args(argv)
    runs = args.runs or (15 if args.quick else 60)
    warmup = 3 if args.quick else 5
    started = time.perf_counter()

    host = measure_host_details(threads=1, quick=args.quick)
    profile = host.profile
    with tempfile.TemporaryDirectory() as tmp:
        main_suite = run_suite(MODELS, BATCHES, warmup, runs, Path(tmp))
        small_suite = run_suite(SMALL_MODELS, SMALL_BATCHES, warmup, 3 * runs, Path(tmp))

    pred = [predict_s(main_suite.irs[n][0], profile, b) for n, b in main_suite.cases]
    peaks = ", ".join(f"{d} {profile.peak(d) / 1e9:.1f} GFLOP/s" for d in profile.supported_dtypes)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, 1 thread; host profile: {peaks}, "
        f"DRAM {profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, op overhead "
        f"{profile.op_overhead_s * 1e6:.2f} us (onnxruntime; torch.add {host.torch_op_overhead_s * 1e6:.2f} us); "
        f"N={runs} interleaved runs after {warmup} warm-up, median p90/p50 spread {main_suite.spread:.2f}"
    )
    print()
    print_table(main_suite, pred)
    rho, ratio = summary(pred, main_suite.measured_s)
    print()
    print(f"Spearman rank correlation (predicted vs measured): {rho:.3f}")
    print(f"Median predicted/measured: {ratio:.2f}")
    print()
    print("Design-choice variants, same measurements:")
    print_variants(main_suite, host)
    print()
    print(
        f"Overhead-dominated regime: the test zoo's models at their own tiny sizes (tests/models.py), "
        f"N={3 * runs}, spread {small_suite.spread:.2f}:"
    )
    small_pred = [predict_s(small_suite.irs[n][0], profile, b) for n, b in small_suite.cases]
    print()
    print_table(small_suite, small_pred)
    print()
    print_variants(small_suite, host)
    print(f"\n(total time {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
