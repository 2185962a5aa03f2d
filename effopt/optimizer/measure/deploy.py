"""Which artefact to ship on the recipe's target, and why: measured where this host can stand in for it.

A compile writes several artefacts (``model.onnx``, ``model.pt2``, ``model_int8.pt``,
``model.h``, and for a quantized model ``model_float.onnx``, the model before quantize).
The cost model alone can pick the wrong one: on an AMD EPYC without VNNI a LeNet-sized
int8 QDQ ONNX ran 2x slower than its float ONNX at batch 32 in onnxruntime, while the
roofline predicted int8 2.3x faster. So `choose_deploy` decides by the first rule that
applies:

1. **Integer-only target** (``cortex-m7``): ``model.h``, the integer program, is the only
   artefact that runs there.
2. **One candidate**: that one.
3. **The target's** ``arch`` **is this host's** (`host_arch`): the candidates are timed side
   by side (`make_timer`: `bench_runtimes`, interleaved round-robin after warm-up, 1 thread,
   p50) at batch 1 and 32 (or the recipe's batch), within a small time budget.
4. **Otherwise** the cost model's prediction on the target decides, and the reason says it
   is predicted, not measured.

In 3 and 4 noise must not flip the choice between runs: the candidates
are walked in the expected order (`EXPECTED_ORDER`: the int8 artefacts first when the
model was quantized, since that is what the recipe asked for), and a later candidate takes
over only when it is more than `MARGIN` (20%) faster than the current pick, by the
geometric mean over the batches of the p50 ratios. Worked example: int8 ``model.onnx``
p50 0.18 ms at batch 1 and 3.4 ms at 32, ``model_float.onnx`` 0.13 ms and 1.6 ms: ratios
1.38 and 2.13, geometric mean 1.72 > 1.2, so ``model_float.onnx`` is deployed (and the
report warns that quantize did not pay off on this host).

The decision and its reason go into ``report.json`` (`DeployChoice`), which must be
byte-identical run to run, so the reason names no measured number; the timings and
ratios go into ``measurements.json`` (`Measurements`).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
import torch

from effopt.hardware_profiles import HardwareProfile
from effopt.hardware_profiles.host import host_arch
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.ir.cost_model import estimate
from effopt.optimizer.emit.aoti import AOTI_FILE, load_aoti
from effopt.optimizer.measure.bench import bench_runtimes, eager_runner, onnxruntime_runner, pt2_runner, time_callable

__all__ = [
    "EXPECTED_ORDER",
    "MARGIN",
    "Candidate",
    "DeployChoice",
    "Measurements",
    "Timing",
    "candidates_in",
    "choose_deploy",
    "compile_times_json",
    "deploy_batches",
    "make_timer",
]

MEASUREMENTS_VERSION = 1
#: A later candidate replaces the current pick only when this much faster (geometric mean of p50 ratios).
MARGIN = 1.2
#: The larger batch timed next to batch 1 when the recipe's own batch is 1.
LARGE_BATCH = 32
#: Seconds of timed rounds per batch, all candidates together (the compile must stay fast).
BUDGET_S = 0.2
MIN_RUNS, MAX_RUNS, WARMUP = 5, 50, 3

#: The runtime that loads each artefact.
RUNTIMES: dict[str, str] = {
    "model.h": "C integer program",
    "model.onnx": "onnxruntime",
    "model_int8.pt": "torch.jit",
    "model.pt2": "torch.export",
    "model_float.onnx": "onnxruntime",
    "model_aoti.pt2": "AOTInductor",
}
#: Most expected first: what the recipe asked for (int8 when quantized), the portable runtime before torch.
EXPECTED_ORDER: tuple[str, ...] = tuple(RUNTIMES)

Basis = Literal["only", "measured", "predicted", "none"]


@dataclass(frozen=True)
class Candidate:
    """One artefact that could be deployed.

    ``ir`` is what the cost model prices it as (None: not priced, e.g. a quantized
    ``model.pt2``, whose reference quantize/dequantize ops run in float); ``path`` is where
    a timer loads it from.
    """

    file: str
    quantized: bool
    ir: IR | None = field(default=None, compare=False, repr=False)
    path: Path | None = field(default=None, compare=False, repr=False)
    dtypes: Mapping[str, str] | None = field(default=None, compare=False, repr=False)  # where it differs from ``ir``

    @property
    def runtime(self) -> str:
        return RUNTIMES[self.file]

    def predicted_s(self, profile: HardwareProfile, batch: int | None = None) -> float | None:
        return None if self.ir is None else estimate(self.ir, profile, dtypes=self.dtypes, batch=batch).total_s


@dataclass(frozen=True)
class Timing:
    """One candidate's p50/p90 at one batch; NaN times and a ``note`` when it could not run there."""

    file: str
    batch: int
    p50_s: float
    p90_s: float
    runs: int
    note: str | None = None


#: Times candidates at batches; one `Timing` per (candidate, batch). The seam tests inject timings through.
Timer = Callable[[Sequence[Candidate], Sequence[int]], Sequence[Timing]]


@dataclass(frozen=True)
class DeployChoice:
    """The ``deploy`` section of report.json: deterministic, no measured number in it.

    Example: ``DeployChoice("model_float.onnx", "onnxruntime", "measured", "measured more than
    20% faster than model.onnx ...", "model.onnx", 1.2e-05, 1)``.
    """

    artefact: str | None
    runtime: str | None
    basis: Basis
    reason: str
    expected: str | None  # what the walk started from: the int8 artefact when quantized
    predicted_s: float | None  # the cost model's latency for ``artefact`` on the target
    predicted_batch: int
    warning: str | None = None  # for the report's warnings: the deployed artefact is not what quantize made

    def to_dict(self) -> dict[str, Any]:
        return {
            "artefact": self.artefact,
            "runtime": self.runtime,
            "basis": self.basis,
            "reason": self.reason,
            "expected": self.expected,
            "predicted_latency_s": self.predicted_s,
            "predicted_batch": self.predicted_batch,
        }


@dataclass(frozen=True)
class Measurements:
    """What ``measurements.json`` holds: the timings behind a measured choice (not deterministic).

    ``speedups`` maps each candidate to its geometric-mean speed-up over ``expected`` (> 1: faster).
    """

    target: str
    host_arch: str | None
    threads: int
    batches: tuple[int, ...]
    margin: float
    expected: str
    chosen: str
    timings: tuple[Timing, ...]
    predicted_s: dict[tuple[str, int], float | None]
    speedups: dict[str, float | None]
    compile_s: dict[str, float] = field(default_factory=dict)  # e.g. {"model_aoti.pt2": 44.3}

    def to_json(self) -> str:
        data = {
            "measurements_version": MEASUREMENTS_VERSION,
            "what": "p50/p90 latency of each deploy candidate, timed side by side on the compiling host "
                    "(see the deploy section of report.json)",
            "target": self.target,
            "host": {"arch": self.host_arch, "machine": platform.machine(), "processor": platform.processor() or None},
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            "threads": self.threads,
            "batches": list(self.batches),
            "margin": self.margin,
            "expected": self.expected,
            "chosen": self.chosen,
            "speedup_vs_expected": {f: _finite(s) for f, s in self.speedups.items()},
            "rows": [
                {"artefact": t.file, "runtime": RUNTIMES[t.file], "batch": t.batch, "p50_s": _finite(t.p50_s),
                 "p90_s": _finite(t.p90_s), "runs": t.runs, "predicted_s": self.predicted_s.get((t.file, t.batch)),
                 "note": t.note}
                for t in self.timings
            ],
        } | ({"compile_s": self.compile_s} if self.compile_s else {})
        return json.dumps(data, indent=2) + "\n"


def compile_times_json(compile_s: Mapping[str, float]) -> str:
    """``measurements.json`` when only compile times were measured (the deploy choice was predicted)."""
    data = {
        "measurements_version": MEASUREMENTS_VERSION,
        "what": "seconds each compiled artefact took to build on this host (the deploy choice was not measured)",
        "host": {"machine": platform.machine(), "processor": platform.processor() or None},
        "torch_version": torch.__version__,
        "compile_s": dict(compile_s),
    }
    return json.dumps(data, indent=2) + "\n"


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


# -- candidates and batches ------------------------------------------------------------------------


def candidates_in(folder: Path, ir: IR, float_ir: IR | None, quantized: bool,
                  onnx_dtypes: Mapping[str, str] | None = None) -> tuple[Candidate, ...]:
    """The deployable artefacts present in ``folder``, in `EXPECTED_ORDER`.

    ``ir`` is the optimized model (what ``model.onnx``/``model_int8.pt``/``model.h``/
    ``model_aoti.pt2`` hold), ``float_ir`` the model before quantize (``model_float.onnx``).
    ``onnx_dtypes`` prices ``model.onnx`` where it computes in other dtypes than ``ir``: a
    bf16 model's ONNX stays fp32 where onnxruntime has no bf16 kernels. A quantized
    ``model.pt2`` is a reference (its quantize/dequantize ops run in float, 30x slower than
    the int8 ONNX on the digits model, and timing it next to the others chills their
    caches), so it is a candidate only when nothing else was written; the cost model does
    not price it, nor a quantized ``model_aoti.pt2`` (Inductor compiles those reference ops).
    """
    out = []
    for name in EXPECTED_ORDER:
        path = folder / name
        if not path.is_file() or (name == "model.pt2" and quantized):
            continue
        if name == "model_float.onnx":
            out.append(Candidate(name, False, float_ir, path))
        elif name == "model_aoti.pt2":
            out.append(Candidate(name, quantized, None if quantized else ir, path))
        elif name == "model.onnx" and onnx_dtypes:
            out.append(Candidate(name, quantized, ir, path, onnx_dtypes))
        else:
            out.append(Candidate(name, quantized or name in ("model.h", "model_int8.pt"), ir, path))
    if not out and quantized and (folder / "model.pt2").is_file():
        out.append(Candidate("model.pt2", True, None, folder / "model.pt2"))
    return tuple(out)


def deploy_batches(specs: Sequence[InputSpec]) -> tuple[int, ...]:
    """Batch 1 and a larger one (the recipe's, else 32); the recipe's batch alone if an input's batch is fixed.

    >>> free = lambda shape: InputSpec("x", shape, dynamic_batch=True)
    >>> deploy_batches((free((1, 3, 8, 8)),)), deploy_batches((free((8, 3)),)), deploy_batches((InputSpec("x", (8, 3)),))
    ((1, 32), (1, 8), (8,))
    """
    b0 = specs[0].shape[0] if specs and specs[0].shape else 1
    if not all(s.dynamic_batch for s in specs):
        return (b0,)
    return (1, b0 if b0 > 1 else LARGE_BATCH)


# -- the choice ------------------------------------------------------------------------------------


def choose_deploy(
    candidates: Sequence[Candidate],
    profile: HardwareProfile,
    batches: Sequence[int],
    timer: Timer | None,
    this_host: str | None = None,
    threads: int = 1,
    auto_quantize: bool = False,
) -> tuple[DeployChoice, Measurements | None]:
    """The artefact to deploy on ``profile`` (rules in the module docstring), and the timings if measured.

    ``timer`` is called only when the target's arch is ``this_host`` (default: `host_arch()`);
    None there means "do not measure" and falls back to the prediction. ``auto_quantize``
    (``passes: auto`` chose quantize) only changes the warning's words when the float
    artefact wins.
    """
    this_host = host_arch() if this_host is None else this_host
    batch = _predicted_batch(candidates)
    if profile.integer_only:
        program = next((c for c in candidates if c.file == "model.h"), None)
        if program is None:
            why = f"{profile.name} is integer-only and no integer program (model.h) was written; see the goals"
            return DeployChoice(None, None, "none", why, None, None, batch), None
        why = f"{profile.name} is integer-only: the integer program (model.h) is the only artefact that runs there"
        return _choice(program, program, profile, "only", why, batch), None
    candidates = [c for c in candidates if c.file != "model.h"]
    if not candidates:
        return DeployChoice(None, None, "none", "no artefact was written (output.formats is empty)", None, None, batch), None
    first = candidates[0]
    if len(candidates) == 1:
        return _choice(first, first, profile, "only", f"the only artefact written that runs on {profile.name}", batch), None
    batch_text = " and ".join(str(b) for b in batches)
    if profile.arch is not None and profile.arch == this_host and timer is not None:
        timings = tuple(timer(candidates, batches))
        p50 = {(t.file, t.batch): t.p50_s for t in timings}
        speedup = lambda a, b: _geomean_speedup(p50, a.file, b.file, batches)  # noqa: E731 - b over a
        ran = [c for c in candidates if any(math.isfinite(p50.get((c.file, b), math.nan)) for b in batches)]
        start = ran[0] if ran else first
        chosen = _walk(start, [c for c in ran if c is not start], speedup)
        where = f"on this host ({this_host}, the same arch as {profile.name}) at batch {batch_text}"
        why = _reason("measured", start, chosen, candidates, where, "was")
        measurements = Measurements(
            profile.name, this_host, threads, tuple(batches), MARGIN, start.file, chosen.file, timings,
            {(c.file, b): c.predicted_s(profile, b) for c in candidates for b in batches},
            {c.file: speedup(start, c) for c in candidates},
        )
        return _choice(chosen, start, profile, "measured", why, batch, candidates, auto_quantize), measurements
    priced = [c for c in candidates if c.ir is not None] or list(candidates)
    start = priced[0]
    predicted = {c.file: c.predicted_s(profile) for c in priced}

    def predicted_speedup(a: Candidate, b: Candidate) -> float | None:
        pa, pb = predicted[a.file], predicted[b.file]
        return pa / pb if pa and pb else None

    chosen = _walk(start, priced[1:], predicted_speedup)
    if profile.arch is None:
        host = f"{profile.name}'s profile names no arch, so this host cannot stand in for it"
    else:
        host = f"this host's arch ({this_host or 'unknown'}) is not {profile.name}'s ({profile.arch})"
    where = f"by the cost model (roofline on {profile.name}, batch {batch}), not measured: {host}"
    why = _reason("predicted", start, chosen, priced, where, "is")
    return _choice(chosen, start, profile, "predicted", why, batch, candidates, auto_quantize), None


def _walk(start: Candidate, challengers: Sequence[Candidate],
          speedup: Callable[[Candidate, Candidate], float | None]) -> Candidate:
    """The expected candidate, replaced in turn by each later one that is more than `MARGIN` faster than it."""
    current = start
    for c in challengers:
        s = speedup(current, c)
        if s is not None and s > MARGIN:
            current = c
    return current


def _geomean_speedup(p50: dict[tuple[str, int], float], base: str, other: str, batches: Sequence[int]) -> float | None:
    """Geometric mean over ``batches`` of p50(base) / p50(other); None when they share no timed batch."""
    logs = [math.log(p50[(base, b)] / p50[(other, b)]) for b in batches
            if all(math.isfinite(p50.get((f, b), math.nan)) and p50[(f, b)] > 0 for f in (base, other))]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _reason(verb: str, start: Candidate, chosen: Candidate, pool: Sequence[Candidate], where: str, tense: str) -> str:
    pct = round((MARGIN - 1) * 100)
    if chosen is start:
        others = ", ".join(c.file for c in pool if c is not start)
        return (f"{verb} {where}: no other candidate ({others}) {tense} more than {pct}% faster than "
                f"{start.file}, the expected artefact")
    return f"{verb} more than {pct}% faster than {start.file}, the expected artefact, {where}"


def _choice(chosen: Candidate, start: Candidate, profile: HardwareProfile, basis: Basis, why: str, batch: int,
            pool: Sequence[Candidate] = (), auto_quantize: bool = False) -> DeployChoice:
    warning = None
    if start.quantized and not chosen.quantized:
        int8 = ", ".join(c.file for c in pool if c.quantized)
        how = "measured" if basis == "measured" else "predicted"
        whose = "the auto plan's quantize (chosen by the cost model's prediction)" if auto_quantize else "quantize"
        warning = (
            f"deploy: {whose} did not pay off on {'this host' if basis == 'measured' else profile.name}: the int8 "
            f"artefacts ({int8}) {how} more than {round((MARGIN - 1) * 100)}% slower than {chosen.file}, which is "
            "deployed instead; the int8 artefacts are still written"
            + (" (exact ratios in measurements.json)" if basis == "measured" else "")
        )
    return DeployChoice(chosen.file, chosen.runtime, basis, why, start.file, chosen.predicted_s(profile), batch, warning)


def _predicted_batch(candidates: Sequence[Candidate]) -> int:
    ir = next((c.ir for c in candidates if c.ir is not None), None)
    if ir is None or not ir.inputs or not ir.inputs[0].shape:
        return 1
    return ir.inputs[0].shape[0]


# -- timing ----------------------------------------------------------------------------------------


def make_timer(specs: Sequence[InputSpec], seed: int, threads: int = 1, budget_s: float = BUDGET_S) -> Timer:
    """A `Timer` that loads each candidate from its path and times them with `bench_runtimes`.

    Per batch: one untimed call each sizes the run count so all timed rounds fit ``budget_s``
    (between `MIN_RUNS` and `MAX_RUNS`), then `WARMUP` untimed and that many timed rounds,
    interleaved. The digits model's four candidates take about 0.3 s in all.
    """

    def make_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(s.example(g, batch if s.dynamic_batch else None) for s in specs)

    def timer(candidates: Sequence[Candidate], batches: Sequence[int]) -> list[Timing]:
        runners, broken = {}, {}
        for c in candidates:
            try:
                runners[c.file] = _runner(c, threads)
            except Exception as e:  # any loader's failure: that candidate is not timed, the others are
                broken[c.file] = f"cannot load: {type(e).__name__}: {str(e).strip()[:200]}"
        out: list[Timing] = []
        for batch in batches:
            if runners:
                runs = _runs_within(runners, make_inputs(batch), budget_s, threads)
                stats = bench_runtimes(runners, make_inputs, (batch,), WARMUP, runs, threads, measure_memory=False)
                by_name = {s.runtime: s for s in stats}
            for c in candidates:
                if c.file in broken:
                    out.append(Timing(c.file, batch, math.nan, math.nan, 0, broken[c.file]))
                else:
                    s = by_name[c.file]
                    out.append(Timing(c.file, batch, s.p50_s, s.p90_s, s.runs, s.note))
        return out

    return timer


def _runner(c: Candidate, threads: int) -> Callable[..., object]:
    if c.path is None:
        raise ValueError(f"{c.file}: no path to load it from")
    if c.file.endswith(".onnx"):
        return onnxruntime_runner(c.path, threads)
    if c.file == AOTI_FILE:
        return load_aoti(c.path)
    if c.file.endswith(".pt2"):
        return pt2_runner(c.path)
    if c.file.endswith(".pt"):
        return eager_runner(torch.jit.load(str(c.path)))
    raise ValueError(f"{c.file}: no runtime on this host loads it")


def _runs_within(runners: dict[str, Callable[..., object]], inputs: tuple[torch.Tensor, ...], budget_s: float,
                 threads: int) -> int:
    """Timed rounds that fit ``budget_s``, from one call of each runner (a failing one counts 0 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    round_s = 0.0
    try:
        for run in runners.values():
            try:
                round_s += time_callable(run, inputs, warmup=0, runs=1)[0]
            except Exception:  # bench_runtimes reports it with a note
                continue
    finally:
        torch.set_num_threads(previous)
    if round_s <= 0:
        return MIN_RUNS
    return max(MIN_RUNS, min(MAX_RUNS, int(budget_s / round_s)))
