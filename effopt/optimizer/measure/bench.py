"""Measure inference latency of several runtimes side by side, the way STYLE rule 25 asks.

    runners = {"eager": eager_runner(model), "onnxruntime": onnxruntime_runner(path, threads=1)}
    stats = bench_runtimes(runners, lambda b: (torch.randn(b, 3, 32, 32),), batches=(1, 32))
    print(bench_table(stats, baseline="eager"))

Why it is built this way: on a shared machine absolute times swing by +-20% within minutes,
so runtimes are compared only when measured in the same process, interleaved run by run,
after warm-up, with the thread count fixed, and summarised by medians:

- **Interleaved, rotating.** Each timed round calls every runtime once; round ``r`` starts
  with runtime ``r mod k``, so drift, cache state and position in the round hit all runtimes
  alike. E.g. with runtimes a, b, c: a b c | b c a | c a b | a b c ...
- **Warm-up** rounds (same rotation) come first and are not timed: first calls pay for
  lazy initialisation (oneDNN primitive creation, onnxruntime arena growth).
- **Threads.** torch's intra-op threads are set to ``threads`` for the duration and restored
  afterwards; onnxruntime sessions fix theirs when created, so `onnxruntime_runner` takes
  the same ``threads``.
- **Peak memory** (``peak_memory_bytes``) is measured, not estimated, where Linux allows it:
  just before the first call of a runtime at a batch, freed heap memory is handed back to
  the OS (``malloc_trim``) and the process's peak-RSS mark is reset
  (``/proc/self/clear_refs`` = 5); after the call, ``VmHWM - VmRSS(before)`` is the resident
  memory that call needed beyond what was already resident (activations, workspaces,
  first-call caches; weights loaded earlier are not in it). Runtimes with a memory arena
  (onnxruntime) reuse what an earlier, smaller batch took, so read it as "new memory this
  batch needed". Where the kernel does not support the reset, it is ``None`` and
  ``memory_method`` says ``"unavailable"``. tracemalloc is not used: it does not see
  torch's or onnxruntime's allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effopt.errors import EmitError
from effopt.optimizer.measure.runtime import open_session

__all__ = [
    "LatencyStats",
    "bench_runtimes",
    "bench_table",
    "eager_runner",
    "onnxruntime_runner",
    "peak_rss_growth_bytes",
    "pt2_runner",
    "spearman",
    "time_callable",
]

Runner = Callable[..., object]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one runtime at one batch size.

    ``p50_s``/``p90_s`` are percentiles of ``runs`` timed calls (linear interpolation);
    ``throughput_per_s`` is samples per second at the median, ``batch / p50_s``: batch 32 at
    p50 = 4 ms gives 8,000 samples/s. ``note`` says why a runtime has no timings at this batch
    (e.g. an artefact exported for a fixed batch), in which case the times are NaN.
    """

    runtime: str
    batch: int
    p50_s: float
    p90_s: float
    runs: int
    throughput_per_s: float
    peak_memory_bytes: int | None
    memory_method: str
    note: str | None = None


# -- timing ----------------------------------------------------------------------------------------


def time_callable(fn: Runner, inputs: Sequence[object], warmup: int = 5, runs: int = 30) -> list[float]:
    """Seconds of each of ``runs`` calls ``fn(*inputs)`` after ``warmup`` untimed calls.

    >>> ts = time_callable(lambda x: x + 1, (1,), warmup=2, runs=5)
    >>> len(ts), all(t >= 0 for t in ts)
    (5, True)
    """
    if runs < 1:
        raise ValueError(f"time_callable: runs={runs}; need at least 1")
    for _ in range(warmup):
        fn(*inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return times


def _rotation(names: Sequence[str], round_index: int) -> list[str]:
    """Round ``round_index``'s call order: ``names`` rotated left by ``round_index``."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def _stats(runtime: str, batch: int, times: Sequence[float], memory: int | None, method: str) -> LatencyStats:
    p50, p90 = (float(v) for v in np.percentile(np.asarray(times, dtype=np.float64), [50, 90]))
    return LatencyStats(
        runtime=runtime,
        batch=batch,
        p50_s=p50,
        p90_s=p90,
        runs=len(times),
        throughput_per_s=batch / p50 if p50 > 0 else math.inf,
        peak_memory_bytes=memory,
        memory_method=method,
    )


def bench_runtimes(
    runners: Mapping[str, Runner],
    make_inputs: Callable[[int], tuple[object, ...]],
    batches: Sequence[int] = (1, 32),
    warmup: int = 5,
    runs: int = 30,
    threads: int = 1,
    measure_memory: bool = True,
) -> list[LatencyStats]:
    """Time every runner at every batch, interleaved (see the module docstring); one stat per pair.

    ``make_inputs(batch)`` returns the positional inputs for that batch; every runner gets
    the same tensors. Results come batch by batch, runners in mapping order. A runner that
    raises on its first call at a batch is left out of that batch's timing and reported
    with NaN times and a ``note``.
    """
    names = list(runners)
    if not names:
        raise ValueError("bench_runtimes: no runners given")
    if runs < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"bench_runtimes: runs={runs}, warmup={warmup}, threads={threads}; need runs>=1, warmup>=0, threads>=1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results: list[LatencyStats] = []
    try:
        for batch in batches:
            inputs = make_inputs(batch)
            failed: dict[str, str] = {}
            memory: dict[str, int | None] = {}
            for name in names:  # first call: checks it runs, and measures its memory
                try:
                    memory[name] = _first_call(runners[name], inputs, measure_memory)
                except Exception as e:  # any runtime's failure: report it, keep benchmarking the others
                    failed[name] = f"failed at batch {batch}: {type(e).__name__}: {_first_line(str(e))}"
            live = [n for n in names if n not in failed]
            times: dict[str, list[float]] = {n: [] for n in live}
            for r in range(warmup):
                for name in _rotation(live, r) if live else []:
                    runners[name](*inputs)
            for r in range(runs):
                for name in _rotation(live, r) if live else []:
                    start = time.perf_counter()
                    runners[name](*inputs)
                    times[name].append(time.perf_counter() - start)
            method = "rss-peak-growth" if measure_memory and _rss_reset_supported() else "unavailable"
            for name in names:
                if name in failed:
                    results.append(
                        LatencyStats(name, batch, math.nan, math.nan, 0, math.nan, None, "unavailable", failed[name])
                    )
                else:
                    results.append(_stats(name, batch, times[name], memory.get(name), method))
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else ""


def _first_call(fn: Runner, inputs: Sequence[object], measure_memory: bool) -> int | None:
    """Call ``fn`` once; with ``measure_memory``, return the memory that call needed."""
    if measure_memory:
        return peak_rss_growth_bytes(lambda: fn(*inputs))
    fn(*inputs)
    return None


# -- memory ----------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _rss_reset_supported() -> bool:
    return _CLEAR_REFS.exists() and _status_bytes("VmHWM") is not None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so an earlier call's freed pages are not reused."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


def peak_rss_growth_bytes(call: Callable[[], object]) -> int | None:
    """Resident memory ``call()`` needed beyond what was resident before it, or None if unmeasurable.

    Resets the kernel's peak-RSS mark, runs ``call`` once, and returns ``VmHWM`` after minus
    ``VmRSS`` before. Example: a call that allocates and frees a 400 MB tensor returns about
    400e6; calling it again without a trim in between may return less (the allocator reuses).
    """
    gc.collect()
    _malloc_trim()
    before = _status_bytes("VmRSS")
    if before is None or not _reset_peak_rss():
        call()
        return None
    call()
    peak = _status_bytes("VmHWM")
    return None if peak is None else max(0, peak - before)


# -- runners ---------------------------------------------------------------------------------------


def eager_runner(module: nn.Module) -> Runner:
    """``module`` in eval mode under ``torch.inference_mode()``."""
    module.eval()

    def run(*inputs: object) -> object:
        with torch.inference_mode():
            return module(*inputs)

    return run


def pt2_runner(path: str | Path) -> Runner:
    """The program saved at ``path`` (``model.pt2``), loaded with ``torch.export.load(path).module()``."""
    try:
        module = torch.export.load(str(path)).module()
    except Exception as e:  # torch.export.load raises several unrelated types
        raise EmitError(f"{path}: cannot load the pt2 program: {type(e).__name__}: {e}; re-run effopt compile") from e

    def run(*inputs: object) -> object:
        with torch.inference_mode():
            return module(*inputs)

    return run


def onnxruntime_runner(path: str | Path, threads: int = 1) -> Runner:
    """A CPU onnxruntime session on ``path`` with ``threads`` intra-op threads, 1 inter-op, sequential.

    Inputs are fed by position; torch tensors are passed as (zero-copy) numpy views. Graph
    optimizations stay at onnxruntime's default (all), as in deployment.
    """
    session = open_session(Path(path), threads, deterministic=False)
    names = [value.name for value in session.get_inputs()]

    def run(*inputs: object) -> object:
        feed = {
            n: (x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for n, x in zip(names, inputs, strict=True)
        }
        return session.run(None, feed)

    return run


# -- statistics and table --------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks.

    NaN when either side is constant. ``spearman([1, 2, 3, 4], [10, 20, 40, 30])`` is 0.8
    (rank differences 0, 0, 1, -1: 1 - 6*2 / (4*15)).
    """
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} xs but {len(ys)} ys; give pairs")
    if len(xs) < 2:
        raise ValueError(f"spearman: {len(xs)} pair(s); need at least 2")
    rx, ry = _ranks(list(xs)), _ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def bench_table(
    stats: Sequence[LatencyStats],
    baseline: str,
    predicted_s: Mapping[tuple[str, int], float] | None = None,
) -> str:
    """One markdown table of ``stats`` with speed-ups vs the ``baseline`` runtime at the same batch.

    ``speed-up`` is baseline p50 / this p50, so > 1 means faster than the baseline.
    ``predicted_s`` maps (runtime, batch) to a cost-model prediction shown next to the p50.
    """
    base = {s.batch: s.p50_s for s in stats if s.runtime == baseline}
    predicted_s = predicted_s or {}
    header = "| runtime | batch | p50 ms | p90 ms | predicted ms | samples/s | peak mem MiB | speed-up vs " + baseline + " |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = [f"{s.runtime}: {s.note}" for s in stats if s.note]
    for s in stats:
        ref = base.get(s.batch, math.nan)
        ratio = ref / s.p50_s if s.p50_s and not math.isnan(s.p50_s) and not math.isnan(ref) else math.nan
        pred = predicted_s.get((s.runtime, s.batch))
        lines.append(
            f"| {s.runtime} | {s.batch} | {_ms(s.p50_s)} | {_ms(s.p90_s)} | "
            f"{'—' if pred is None else _ms(pred)} | "
            f"{'n/a' if math.isnan(s.throughput_per_s) else f'{s.throughput_per_s:,.0f}'} | "
            f"{_mib(s.peak_memory_bytes)} | {'n/a' if math.isnan(ratio) else f'{ratio:.2f}x'} |"
        )
    return "\n".join(lines + ([""] + notes if notes else []))
