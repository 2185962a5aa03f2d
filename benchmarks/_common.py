"""What the side-by-side benchmarks share: interleaved timing, table cells, quality scores, headers.

`benchmarks/quantization.py`, `precision.py` and `pruning.py` each time several variants of a
model in one interleaved `bench_runtimes` call (STYLE rule 25) and print markdown tables of
p50 latencies and ratios; the pieces here are the ones they had written three times. Worked
example: a float model at 4.0 ms and its int8 twin at 2.5 ms (p50, batch 32) give
``ratio(4.0e-3, 2.5e-3) == "1.60×"`` and ``ms(stats) == "2.500"`` for the int8 cell; timings
whose p90 is 10% and 30% above their p50 give ``spread_summary(...) == "spread (p90/p50 − 1)
median 20%, max 30%"``.

Library code prints nothing (STYLE rule 19), but these are scripts: `progress` writes to stderr
so that stdout holds only the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from effopt.optimizer.emit.quiet import quiet_third_party
from effopt.optimizer.ir.compare import compare_tensors
from effopt.optimizer.measure.bench import LatencyStats, bench_runtimes

Runner = Callable[..., object]
Timings = dict[tuple[str, int], LatencyStats]  # (runner key, batch) -> its latency

BATCHES = (1, 32)
INPUT_NAME = "x"  # the forward argument of every model here; also the ONNX input name
QUICK_NOTE = " | QUICK mode: reduced widths and runs"


def progress(message: str) -> None:
    """A progress line on stderr (stdout is for the tables)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence deprecation warnings (torch.ao, torch.jit, quantized tensors) and third-party root-logger chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet_third_party(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created if missing) when given, else a temporary folder removed on exit."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def resolve_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, runs: tuple[int, int],
                     warmup: tuple[int, int]) -> None:
    """Fill ``--runs``/``--warmup`` left unset from ``(default, with --quick)`` and reject bad values.

    ``runs=(20, 5)``: 20 timed runs, or 5 with ``--quick``. ``--threads`` may be one int or a list.
    """
    args.runs = args.runs if args.runs is not None else runs[args.quick]
    args.warmup = args.warmup if args.warmup is not None else warmup[args.quick]
    threads = args.threads if isinstance(args.threads, int) else min(args.threads)
    if threads < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("need --threads >= 1, --runs >= 1, --warmup >= 0")


# -- timing -----------------------------------------------------------------------------------------


def time_interleaved(runners: Mapping[str, Runner], make_inputs: Callable[[int], tuple[object, ...]],
                     warmup: int, runs: int, threads: int) -> Timings:
    """Every runner at every batch of `BATCHES` in one interleaved `bench_runtimes` call, keyed by (key, batch)."""
    stats = bench_runtimes(runners, make_inputs, batches=BATCHES, warmup=warmup, runs=runs, threads=threads,
                           measure_memory=False)
    return {(s.runtime, s.batch): s for s in stats}


def p50(stats: Timings, key: str, batch: int) -> float:
    """The p50 seconds of ``key`` at ``batch``; NaN when it was not timed."""
    s = stats.get((key, batch))
    return math.nan if s is None else s.p50_s


def spreads(stats: Sequence[LatencyStats]) -> list[float]:
    """``p90 / p50 − 1`` of every timing that has one: 0.1 is a p90 10% above the median."""
    return [s.p90_s / s.p50_s - 1 for s in stats if s.p50_s > 0 and not math.isnan(s.p50_s)]


def spread_summary(stats: Sequence[LatencyStats]) -> str:
    """``spread (p90/p50 − 1) median 20%, max 30%`` for a header line, or ``spread n/a``."""
    values = spreads(stats)
    if not values:
        return "spread n/a"
    return f"spread (p90/p50 − 1) median {100 * statistics.median(values):.0f}%, max {100 * max(values):.0f}%"


def print_report(header: str, sections: Sequence[str], started: float) -> None:
    """The header line, the tables (a blank line between), then the wall time since ``started`` (perf_counter)."""
    print(header)
    print()
    print("\n\n".join(sections))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


def timing_line(warmup: int, runs: int) -> str:
    """How the p50s were taken, for a header line: ``warm-up 5 + 20 interleaved runs per (variant, batch), p50``."""
    return f"warm-up {warmup} + {runs} interleaved runs per (variant, batch), p50"


# -- table cells ------------------------------------------------------------------------------------


def ratio(num: float, den: float) -> str:
    """``num / den`` as ``1.60×`` (baseline / variant: > 1 is faster or smaller); ``—`` when either is missing."""
    return "—" if math.isnan(num) or math.isnan(den) or den <= 0 else f"{num / den:.2f}×"


def ms(s: LatencyStats | None) -> str:
    """A p50 in milliseconds, ``2.500``; ``—`` when not timed."""
    return "—" if s is None or math.isnan(s.p50_s) else f"{s.p50_s * 1e3:.3f}"


# -- quality ----------------------------------------------------------------------------------------


class Scored(Protocol):
    """A variant that can be scored: its runner (None when it has nothing to run) and the scores it gets."""

    runner: Runner | None
    quality: dict[str, float]


def logits(runner: Runner, inputs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``runner`` on ``inputs`` in chunks, as one float tensor (onnxruntime runners return a list of arrays)."""
    outs = []
    for x in inputs.split(chunk):
        y = runner(x.contiguous())
        outs.append(torch.from_numpy(np.asarray(y[0])) if isinstance(y, (list, tuple)) else y)
    return torch.cat(outs).float()


def score(variants: Sequence[Scored], inputs: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Fill ``quality``: top-1 agreement and mean logit cosine with ``variants[0]``, and accuracy when labelled."""
    reference = logits(variants[0].runner, inputs)  # type: ignore[arg-type]
    for v in variants:
        if v.runner is None:
            continue
        out = reference if v is variants[0] else logits(v.runner, inputs)
        v.quality["agreement"] = compare_tensors(out, reference).top1_agreement or 0.0  # [N, classes]: never None
        cosine = torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=1)
        v.quality["cosine"] = float(cosine.mean())
        if labels is not None:
            v.quality["accuracy"] = float((out.argmax(1) == labels).double().mean())


def quality_head(labelled: bool) -> str:
    """The quality column's title: accuracy when there are labels, else agreement with the baseline."""
    return "accuracy (Δ pt)" if labelled else "top-1 agree"


def quality_cell(quality: Mapping[str, float], base_accuracy: float | None) -> str:
    """``97.8% (-0.4)`` (accuracy and its change in points) when labelled, else ``99.2%`` (agreement)."""
    if "accuracy" in quality and base_accuracy is not None:
        return f"{100 * quality['accuracy']:.1f}% ({100 * (quality['accuracy'] - base_accuracy):+.1f})"
    return f"{100 * quality['agreement']:.1f}%"
