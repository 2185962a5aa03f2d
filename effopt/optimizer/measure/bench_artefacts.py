"""`effopt bench`: time the original model and every emitted artefact side by side, next to predictions.

The original (eager PyTorch), ``model.pt2``, ``model_int8.pt``, ``model.onnx``,
``model_aoti.pt2`` (AOTInductor, when compiled) and ``model_float.onnx`` (the float model
before quantize, next to a quantized one) run interleaved,
round-robin, after warm-up, with a fixed thread count (see `effopt.optimizer.measure.bench`),
at batch 1 and a larger batch. Each row stands next to the roofline prediction
for the ``host`` profile (measured on the spot unless a profile file is given),
and the Spearman rank correlation between predicted and measured p50 says how
far the cost model's ordering can be trusted on this machine.

``model_float.onnx`` has no prediction (``—``): the folder holds no IR of the model before
quantize (``model.pt2`` is the quantized one), and pricing the quantized IR in fp32 would
still count its quantize/dequantize steps. Its measured row next to ``model.onnx`` is the point:
it says whether int8 paid off on this host (a LeNet-sized int8 QDQ ONNX ran 2x slower than its
float ONNX at batch 32 on an AMD EPYC without VNNI; see `effopt.optimizer.measure.deploy`). The result is
appended to ``report.json``/``report.md`` in the artefact folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from effopt.errors import RecipeError
from effopt.hardware_profiles import HardwareProfile, load_profile
from effopt.hardware_profiles.host import measure_host
from effopt.optimizer.emit.aoti import AOTI_FILE, load_aoti
from effopt.optimizer.ir.analysis import annotate, layer_rows
from effopt.optimizer.measure.bench import LatencyStats, bench_runtimes, bench_table, eager_runner, onnxruntime_runner, pt2_runner, spearman
from effopt.optimizer.ir.cost_model import estimate
from effopt.optimizer.ir.core import IR, InputSpec

BASELINE = "original (eager)"
_MD_MARKER = "\n## Benchmark (effopt bench)\n"


@dataclass(frozen=True)
class BenchResult:
    baseline: str  # the runtime ratios are taken against: the original, else model.pt2
    profile: str
    threads: int
    stats: tuple[LatencyStats, ...]
    predicted_s: dict[tuple[str, int], float]
    spearman: float | None

    def table(self) -> str:
        head = (
            f"torch {torch.__version__}, {self.threads} thread(s), predictions: roofline on profile `{self.profile}`; "
            f"p50/p90 of {self.stats[0].runs if self.stats else 0} interleaved runs after warm-up"
        )
        rho = "n/a" if self.spearman is None else f"{self.spearman:.3f}"
        return f"{head}\n\n{bench_table(self.stats, self.baseline, self.predicted_s)}\n\nSpearman(predicted, measured p50) = {rho}"

    def to_dict(self) -> dict[str, object]:
        return {
            "baseline": self.baseline,
            "profile": self.profile,
            "threads": self.threads,
            "torch_version": torch.__version__,
            "rows": [asdict(s) | {"predicted_s": self.predicted_s.get((s.runtime, s.batch))} for s in self.stats],
            "spearman_predicted_vs_measured": self.spearman,
        }


def _ir_of(module: torch.nn.Module, specs: Sequence[InputSpec], make: Callable[[int], tuple[torch.Tensor, ...]]) -> IR:
    """An annotated IR of an already-traced module (a GraphModule: the optimized model or a loaded pt2)."""
    examples = make(specs[0].shape[0] if specs and specs[0].shape else 1)
    return annotate(IR(module, tuple(specs), examples))  # type: ignore[arg-type]


def run_bench(
    original: torch.nn.Module | None,
    original_ir: IR | None,
    specs: Sequence[InputSpec],
    folder: Path,
    batches: Sequence[int] = (1, 32),
    runs: int = 30,
    warmup: int = 5,
    threads: int = 1,
    profile: HardwareProfile | None = None,
    seed: int = 0,
) -> BenchResult:
    """Time the original (when given) and the artefacts in ``folder``; predict each on ``profile`` (default: host)."""
    def make_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(s.example(g, batch if s.dynamic_batch else None) for s in specs)

    runners: dict[str, Callable[..., object]] = {}
    irs: dict[str, IR] = {}
    if original is not None:
        runners[BASELINE] = eager_runner(original)
        if original_ir is not None:
            irs[BASELINE] = original_ir
    pt2, onnx_path = folder / "model.pt2", folder / "model.onnx"
    if pt2.is_file():
        runners["model.pt2"] = pt2_runner(pt2)
        optimized_ir = _ir_of(torch.export.load(str(pt2)).module(), specs, make_inputs)
        irs["model.pt2"] = irs["model.onnx (onnxruntime)"] = optimized_ir
    aoti = folder / AOTI_FILE
    if aoti.is_file():
        runners["model_aoti.pt2 (AOTInductor)"] = load_aoti(aoti)
        if "model.pt2" in irs:
            irs["model_aoti.pt2 (AOTInductor)"] = irs["model.pt2"]
    int8_path = folder / "model_int8.pt"
    if int8_path.is_file():
        runners["model_int8.pt (torch int8)"] = eager_runner(torch.jit.load(str(int8_path)))
        if "model.pt2" in irs:
            irs["model_int8.pt (torch int8)"] = irs["model.pt2"]
    if onnx_path.is_file():
        runners["model.onnx (onnxruntime)"] = onnxruntime_runner(onnx_path, threads)
    float_path = folder / "model_float.onnx"  # the float fallback of a quantized compile; not priced (module doc)
    if float_path.is_file():
        runners["model_float.onnx (onnxruntime)"] = onnxruntime_runner(float_path, threads)
    if len(runners) < 2 and original is None:
        raise RecipeError(f"{folder}: no model.pt2 or model.onnx to benchmark; run effopt compile first")
    profile = profile or measure_host(threads=threads)
    stats = bench_runtimes(runners, make_inputs, batches=tuple(batches), warmup=warmup, runs=runs, threads=threads)
    dtypes = {"model.onnx (onnxruntime)": _fp32_onnx_dtypes(onnx_path, irs.get("model.pt2"))}
    predicted = {
        (name, b): estimate(ir, profile, dtypes=dtypes.get(name), batch=b).total_s for name, ir in irs.items() for b in batches
    }
    pairs = [(predicted[(s.runtime, s.batch)], s.p50_s) for s in stats
             if (s.runtime, s.batch) in predicted and not math.isnan(s.p50_s)]
    rho = spearman([p for p, _ in pairs], [m for _, m in pairs]) if len(pairs) >= 3 else None
    return BenchResult(next(iter(runners)), profile.name, threads, tuple(stats), predicted, rho)


def _fp32_onnx_dtypes(onnx_path: Path, ir: IR | None) -> dict[str, str] | None:
    """fp32 for every half node when ``model.onnx`` holds no half weights (a bf16 model's ONNX stays fp32
    where onnxruntime has no bf16 kernels), so its prediction prices fp32; None otherwise."""
    if ir is None or not onnx_path.is_file():
        return None
    half = [n.name for n, f in layer_rows(ir) if f.compute_dtype in ("bf16", "fp16")]
    if not half:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) for i in model.graph.initializer):
        return None
    return dict.fromkeys(half, "fp32")


def append_to_report(folder: Path, result: BenchResult) -> None:
    """Add (or replace) the ``bench`` section of report.json and report.md, each written atomically."""
    report_json, report_md = folder / "report.json", folder / "report.md"
    if report_json.is_file():
        data = json.loads(report_json.read_text())
        data["bench"] = _jsonable(result.to_dict())
        _write_atomic(report_json, json.dumps(data, indent=2, allow_nan=False) + "\n")
    if report_md.is_file():
        text = report_md.read_text().split(_MD_MARKER)[0].rstrip("\n") + "\n"
        _write_atomic(report_md, text + _MD_MARKER + "\n" + result.table() + "\n")


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def specs_from_report(folder: Path) -> tuple[InputSpec, ...]:
    """The input specs a compile recorded in ``report.json`` (for benchmarking a folder without its recipe)."""
    path = folder / "report.json"
    if not path.is_file():
        raise RecipeError(f"{folder}: no report.json; give the recipe instead, or run effopt compile first")
    inputs = json.loads(path.read_text()).get("inputs")
    if not inputs:
        raise RecipeError(f"{path}: records no inputs (written by an older effopt?); give the recipe instead")
    return tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["dynamic_batch"], i.get("low"), i.get("high"))
                 for i in inputs)


def load_bench_profile(name: str | None, threads: int) -> HardwareProfile:
    return load_profile(name) if name else measure_host(threads=threads)
