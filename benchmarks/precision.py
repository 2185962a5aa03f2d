"""Half precision, side by side: fp32, bf16, fp16 and int8 artefacts, eager and AOTInductor, on three models.

    python benchmarks/precision.py            # full run: digits, ResNet-18, MobileNetV2 (CIFAR sizes)
    python benchmarks/precision.py --quick    # smoke run: width 0.25 CIFAR models, fewer runs
    python benchmarks/precision.py --models digits resnet18 --runs 30 --threads 2 --no-aoti

For the trained digits CNN and the random-weight CIFAR ResNet-18 and MobileNetV2 of
`benchmarks/cifar_models.py` (the same cases as `benchmarks/quantization.py`), it compiles
with ``effopt.compile`` and times what each compile wrote (inputs in the canonical NCHW layout, the
one an AOTInductor package assumes, see `make_case`):

==========================  ======================  ===========================================================
variant                     runtime                 recipe
==========================  ======================  ===========================================================
fp32                        eager                   the model itself (the baseline of every ratio)
fp32 model.onnx             onnxruntime             ``[fold_batchnorm]`` on ``x86-avx2``
fp32 model_aoti.pt2         AOTInductor             the same compile with ``formats: [..., aoti]``
bf16 model.pt2              torch.export (eager)    ``[fold_batchnorm, {half_precision, dtype: bf16}]``
bf16 model_aoti.pt2         AOTInductor             the same compile, ``aoti``
fp16 model.pt2              torch.export (eager)    ``dtype: fp16``
fp16 ONNX (forced)          onnxruntime             the fp16 model exported as is, *not* what effopt ships here:
                                                    it shows what onnxruntime does with fp16 on this CPU
int8 model.onnx / .pt       onnxruntime / torch.jit ``[fold_batchnorm, {quantize, mode: static}]`` on ``x86-avx2``
==========================  ======================  ===========================================================

The half compiles target ``x86-avx2`` *plus* bf16/fp16 peaks (`HALF_TARGET`, written for this
run), a CPU that computes in half precision (AVX512-BF16 or AMX): the shipped ``x86-avx2``
refuses ``half_precision``, because AVX2 has no half arithmetic. This benchmark measures what
that refusal is worth on the machine it runs on; the header says which half instructions the
CPU has. A compile on that target channels-lasts the 4-D convs (``memory_format: auto``).

Latency: p50 of ``--runs`` calls at batch 1 and 32, every variant of a model in one
`bench_runtimes` call, interleaved round-robin after warm-up, ``--threads`` intra-op threads
(STYLE rule 25). Ratios are fp32 eager p50 / variant p50 at the same batch (> 1 is faster).
Quality: digits top-1 accuracy on the 450 test images; CIFAR (random weights) top-1 agreement
with fp32 eager and mean logit cosine on N(0, 1) images. ``compile s``: AOTInductor's compile
time from the compile's ``measurements.json``, cold: each run uses a fresh Inductor cache unless
``--warm-cache``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
import yaml  # noqa: E402

import effopt  # noqa: E402
from benchmarks import quantization  # noqa: E402
from benchmarks._common import BATCHES, INPUT_NAME, QUICK_NOTE, Runner, Timings, ms, p50, progress  # noqa: E402
from benchmarks._common import quality_cell, quality_head, quiet, ratio, resolve_run_args, score  # noqa: E402
from benchmarks._common import print_report, spread_summary, time_interleaved, timing_line, work_folder  # noqa: E402
from benchmarks.quantization import QUICK_WIDTH, Case  # noqa: E402
from effopt.hardware_profiles.host import cpu_name  # noqa: E402
from effopt.optimizer.emit.aoti import AOTI_FILE, cpp_compiler_problem, load_aoti  # noqa: E402
from effopt.optimizer.emit.onnx import export_onnx  # noqa: E402
from effopt.optimizer.measure.bench import LatencyStats, eager_runner, onnxruntime_runner, pt2_runner  # noqa: E402

HALF_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


def cpu_half_flags() -> str:
    """The half-precision instructions /proc/cpuinfo lists (``none of avx512_bf16, ...`` on an AVX2 EPYC)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    have = [f for f in HALF_FLAGS if f in flags]
    return ", ".join(have) if have else f"none of {', '.join(HALF_FLAGS)}"


def half_target(work: Path) -> Path:
    """`HALF_TARGET`: the x86-avx2 profile plus bf16/fp16 peaks (2x fp32, as AVX512-BF16 doubles FMA throughput)."""
    data = yaml.safe_load((ROOT / "effopt" / "hardware_profiles" / "x86-avx2.yaml").read_text())
    data |= {"name": "x86-avx2+half", "description": "benchmark target: x86-avx2 with bf16/fp16 compute"}
    data["peak_flops_per_s"] |= {"bf16": 1536e9, "fp16": 1536e9}
    path = work / "x86-avx2-half.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


HALF_TARGET = "x86-avx2 + bf16/fp16 peaks"


# -- variants ---------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    runtime: str
    runner: Runner | None
    note: str | None = None
    compile_s: float | None = None
    quality: dict[str, float] = field(default_factory=dict)


def _compile(case: Case, work: Path, label: str, target: str, passes: list, formats: list[str],
             data: bool = False) -> tuple[Path | None, str | None, effopt.Result | None]:
    """One effopt compile; returns its folder (or None), why it failed (or None) and the result."""
    out = work / label
    recipe = {
        "version": 1,
        "model": case.recipe_model,
        "inputs": [{"name": INPUT_NAME, "shape": [1, *case.input_shape], "dtype": "float32"}],
        "target": target,
        "passes": passes,
        "output": {"dir": str(out), "formats": formats},
    } | ({"data": {"calibration": case.recipe_data["calibration"]}} if data else {})
    started = time.perf_counter()
    try:
        with quiet():
            result = effopt.compile(recipe, output_dir=out, force=True)
    except effopt.EffoptError as e:
        return None, f"effopt.compile failed: {type(e).__name__}: {str(e)[:300]}", None
    verdict = "passed" if result.passed else "FAILED"
    progress(f"  {label}: compiled in {time.perf_counter() - started:.0f} s ({verdict})")
    return out, None if result.passed else "effopt report: failed: " + "; ".join(result.report.failures()), result


def _compile_s(folder: Path) -> float | None:
    path = folder / "measurements.json"
    return json.loads(path.read_text()).get("compile_s", {}).get(AOTI_FILE) if path.is_file() else None


def _aoti(folder: Path, dtype: str, threads: int) -> list[Variant]:
    if not (folder / AOTI_FILE).is_file():
        return [Variant(f"{dtype} {AOTI_FILE}", "AOTInductor", None, note="not written (see the compile's report)")]
    return [Variant(f"{dtype} {AOTI_FILE}", "AOTInductor", load_aoti(folder / AOTI_FILE), compile_s=_compile_s(folder))]


def build_variants(case: Case, work: Path, threads: int, aoti: bool) -> list[Variant]:
    variants = [Variant("fp32", "eager", eager_runner(case.model))]
    formats = ["pt2", "onnx"] + (["aoti"] if aoti else [])
    folder, why, _ = _compile(case, work, "fp32", "x86-avx2", ["fold_batchnorm"], formats)
    if folder is not None:
        variants.append(Variant("fp32 model.onnx", "onnxruntime", onnxruntime_runner(folder / "model.onnx", threads), why))
        variants += _aoti(folder, "fp32", threads) if aoti else []
    target = str(half_target(work))
    for dtype in ("bf16", "fp16"):
        spec = {"name": "half_precision", "dtype": dtype}
        fmts = formats if dtype == "bf16" else ["pt2"]
        folder, why, result = _compile(case, work, dtype, target, ["fold_batchnorm", spec], fmts)
        if folder is None:
            variants.append(Variant(f"{dtype} model.pt2", "—", None, why))
            continue
        variants.append(Variant(f"{dtype} model.pt2", "torch.export (eager)", pt2_runner(folder / "model.pt2"), why))
        if dtype == "bf16" and aoti:
            variants += _aoti(folder, "bf16", threads)
        if dtype == "fp16" and result is not None:  # what effopt does not ship here: the fp16 graph as is
            variants.append(_forced_fp16_onnx(case, result.model, work / "fp16_forced.onnx", threads))
    quantize = {"name": "quantize", "mode": "static"}
    folder, why, _ = _compile(case, work, "int8", "x86-avx2", ["fold_batchnorm", quantize], ["pt2", "onnx"], data=True)
    if folder is not None:
        variants.append(Variant("int8 model.onnx", "onnxruntime", onnxruntime_runner(folder / "model.onnx", threads), why))
        if (folder / "model_int8.pt").is_file():
            variants.append(Variant("int8 model_int8.pt", "torch.jit (fbgemm)",
                                    eager_runner(torch.jit.load(str(folder / "model_int8.pt")))))
    return variants


def _forced_fp16_onnx(case: Case, model: torch.nn.Module, path: Path, threads: int) -> Variant:
    """The fp16 model exported as it is: onnxruntime inserts Cast-to-fp32 around ops it has no fp16 kernel for."""
    name = "fp16 ONNX (forced)"
    try:
        with quiet():
            export_onnx(model, (case.example(1),), [INPUT_NAME], [True], path)
    except effopt.EffoptError as e:
        return Variant(name, "—", None, note=f"export failed: {str(e)[:200]}")
    return Variant(name, "onnxruntime", onnxruntime_runner(path, threads),
                   "not an effopt artefact here: onnxruntime casts to fp32 around Conv/Gemm (no fp16 kernels on this CPU)")


# -- the table --------------------------------------------------------------------------------------


def table(case: Case, variants: list[Variant], stats: Timings) -> str:
    def rel(base: str, name: str, batch: int) -> str:
        return ratio(p50(stats, base, batch), p50(stats, name, batch))

    base_acc = variants[0].quality.get("accuracy")
    lines = [f"### {case.name}: {case.description}", "",
             f"| variant | runtime | compile s | b1 p50 ms | b1 × fp32 | b32 p50 ms | b32 × fp32 | b32 × fp32 ONNX | "
             f"{quality_head(case.eval_labels is not None)} | cos vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for v in variants:
        if v.runner is None:
            lines.append(f"| {v.name} | — | — | — | — | — | — | — | — | — |")
            notes.append(f"- {v.name}: {v.note}")
            continue
        compile_s = "—" if v.compile_s is None else f"{v.compile_s:.0f}"
        lines.append(
            f"| {v.name} | {v.runtime} | {compile_s} | {ms(stats.get((v.name, 1)))} | {rel('fp32', v.name, 1)} | "
            f"{ms(stats.get((v.name, 32)))} | {rel('fp32', v.name, 32)} | {rel('fp32 model.onnx', v.name, 32)} | "
            f"{quality_cell(v.quality, base_acc)} | {v.quality['cosine']:.5f} |")
        if v.note:
            notes.append(f"- {v.name}: {v.note}")
    timed = [v for v in variants if v.runner is not None and not math.isnan(p50(stats, v.name, 32))]
    if timed:
        best = min(timed, key=lambda v: p50(stats, v.name, 32))
        lines += ["", f"Fastest at batch 32: {best.name} ({rel('fp32', best.name, 32)} fp32 eager); "
                      f"bf16 model.pt2 vs fp32 eager at batch 32: {rel('fp32', 'bf16 model.pt2', 32)}."]
    return "\n".join(lines + ([""] + notes if notes else []))


def header(args: argparse.Namespace, all_stats: list[LatencyStats]) -> str:
    return (f"torch {torch.__version__} | onnxruntime {ort.__version__} | {cpu_name()} | half-precision ISA: "
            f"{cpu_half_flags()} | half target: {HALF_TARGET} | threads {args.threads} | "
            f"{timing_line(args.warmup, args.runs)} | {spread_summary(all_stats)}" + (QUICK_NOTE if args.quick else ""))


# -- main -------------------------------------------------------------------------------------------

FULL_MODELS = ("digits", "resnet18", "mobilenet_v2")


def make_case(name: str, work: Path, quick: bool) -> Case:
    """The model and its data; inputs in the canonical NCHW layout, the one an AOTInductor package assumes.

    The digits test images come as a NumPy reshape with strides (64, 1, 8, 1): valid for one channel,
    but torch 2.13's AOTInductor reads inputs with the exported strides and gave 11% accuracy on them."""
    case = quantization.make_case(name, work, quick)
    case.eval_inputs = case.eval_inputs.clone(memory_format=torch.contiguous_format)
    return case


def run_model(name: str, args: argparse.Namespace, work: Path) -> tuple[str, list[LatencyStats]]:
    started = time.perf_counter()
    progress(f"{name}: building variants")
    case = make_case(name, work / name, args.quick)
    variants = build_variants(case, work / name, args.threads, args.aoti)
    score(variants, case.eval_inputs, case.eval_labels)
    progress(f"{name}: timing {sum(v.runner is not None for v in variants)} variants at batches {BATCHES}")
    runners = {v.name: v.runner for v in variants if v.runner is not None}
    stats = time_interleaved(runners, lambda b: (case.example(b),), args.warmup, args.runs, args.threads)
    progress(f"{name}: done in {time.perf_counter() - started:.0f} s")
    return table(case, variants, stats), list(stats.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per (variant, batch) (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: CIFAR models at width {QUICK_WIDTH}, fewer runs")
    parser.add_argument("--models", nargs="+", choices=FULL_MODELS, default=None, help="subset of models to run")
    parser.add_argument("--no-aoti", dest="aoti", action="store_false", help="leave out the AOTInductor variants")
    parser.add_argument("--keep", type=Path, default=None, help="write artefacts here instead of a temp folder")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the user's Inductor cache (default: a fresh one, so compile s is a cold compile)")
    args = parser.parse_args(argv)
    resolve_run_args(parser, args, runs=(20, 5), warmup=(3, 1))
    if args.aoti and cpp_compiler_problem() is not None:
        progress(f"no AOTInductor variants: {cpp_compiler_problem()}")
        args.aoti = False
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with work_folder(args.keep, "effopt-pbench-") as work:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.mkdtemp(prefix="inductor-", dir=work)).resolve())
        results = [run_model(name, args, work) for name in args.models or FULL_MODELS]
    print_report(header(args, [s for _, stats in results for s in stats]), [t for t, _ in results], started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
