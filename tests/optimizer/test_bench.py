"""effopt.optimizer.measure.bench: timing helpers, interleaving order, runners, memory, Spearman, the table.

No assertion here depends on how fast the machine is (STYLE rule 24): only on counts, order,
and relations that hold for any timings (p50 <= p90, throughput = batch / p50).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from effopt.optimizer.measure.bench import (
    LatencyStats,
    bench_runtimes,
    bench_table,
    eager_runner,
    onnxruntime_runner,
    peak_rss_growth_bytes,
    pt2_runner,
    spearman,
    time_callable,
)
from effopt.optimizer.emit.onnx import export_onnx
from tests.models import ZOO


# -- time_callable ------------------------------------------------------------------------------------


def test_time_callable_warms_up_then_times_each_run() -> None:
    calls: list[int] = []
    times = time_callable(lambda x: calls.append(x), (7,), warmup=3, runs=5)
    assert calls == [7] * 8  # 3 untimed + 5 timed
    assert len(times) == 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="runs=0"):
        time_callable(lambda: None, (), runs=0)


# -- interleaving -------------------------------------------------------------------------------------


def test_runtimes_are_interleaved_round_robin_with_rotation() -> None:
    order: list[tuple[str, int]] = []

    def fake(name: str):
        return lambda batch: order.append((name, batch))

    stats = bench_runtimes(
        {"a": fake("a"), "b": fake("b"), "c": fake("c")},
        make_inputs=lambda b: (b,),
        batches=(1, 4),
        warmup=2,
        runs=3,
        measure_memory=False,
    )
    probe, warm0, warm1 = ["a", "b", "c"], ["a", "b", "c"], ["b", "c", "a"]
    timed = ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    per_batch = probe + warm0 + warm1 + timed
    assert order == [(n, 1) for n in per_batch] + [(n, 4) for n in per_batch]
    assert [(s.runtime, s.batch, s.runs) for s in stats] == [
        ("a", 1, 3), ("b", 1, 3), ("c", 1, 3), ("a", 4, 3), ("b", 4, 3), ("c", 4, 3)
    ]
    assert all(s.memory_method == "unavailable" and s.peak_memory_bytes is None for s in stats)


def test_a_runner_that_fails_at_a_batch_is_reported_not_timed() -> None:
    def fixed_batch(batch: int) -> None:
        if batch != 1:
            raise RuntimeError(f"expected batch 1, got {batch}\nsecond line")

    stats = bench_runtimes({"ok": lambda b: None, "fixed": fixed_batch}, lambda b: (b,), (1, 2), 1, 2, measure_memory=False)
    failed = [s for s in stats if s.note]
    assert [(s.runtime, s.batch) for s in failed] == [("fixed", 2)]
    assert math.isnan(failed[0].p50_s) and failed[0].runs == 0
    assert failed[0].note == "failed at batch 2: RuntimeError: expected batch 1, got 2"
    table = bench_table(stats, baseline="ok")
    assert "fixed: failed at batch 2" in table


def test_threads_are_set_during_the_run_and_restored() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    bench_runtimes({"a": lambda b: seen.append(torch.get_num_threads())}, lambda b: (b,), (1,), 0, 2, threads=1,
                   measure_memory=False)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


# -- real runtimes ------------------------------------------------------------------------------------


def test_eager_pt2_and_onnxruntime_give_sane_stats(tmp_path: Path) -> None:
    builder, shape = ZOO["mlp"]
    model = builder()
    example = torch.randn(shape)
    onnx_path = export_onnx(model, (example,), ["x"], [True], tmp_path / "mlp.onnx")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(tmp_path / "m.pt2"))
    runners = {
        "eager": eager_runner(model),
        "pt2": pt2_runner(tmp_path / "m.pt2"),
        "onnxruntime": onnxruntime_runner(onnx_path, threads=1),
    }
    stats = bench_runtimes(runners, lambda b: (torch.randn(b, *shape[1:]),), batches=(1, 8), warmup=2, runs=7)
    assert [(s.runtime, s.batch) for s in stats] == [
        ("eager", 1), ("pt2", 1), ("onnxruntime", 1), ("eager", 8), ("pt2", 8), ("onnxruntime", 8)
    ]
    for s in stats:
        assert s.note is None and s.runs == 7
        assert 0 < s.p50_s <= s.p90_s < 1.0
        assert s.throughput_per_s == pytest.approx(s.batch / s.p50_s)
        if s.memory_method == "rss-peak-growth":
            assert s.peak_memory_bytes is not None and s.peak_memory_bytes >= 0
    table = bench_table(stats, baseline="eager", predicted_s={("eager", 1): 1e-5})
    assert table.splitlines()[0].startswith("| runtime | batch | p50 ms |")
    assert "| eager | 1 |" in table and "1.00x" in table and "0.010" in table  # 1e-5 s = 0.010 ms


def test_onnxruntime_runner_rejects_a_missing_file(tmp_path: Path) -> None:
    from effopt.errors import EmitError

    with pytest.raises(EmitError, match="nope.onnx: onnxruntime cannot load the model"):
        onnxruntime_runner(tmp_path / "nope.onnx")


def test_peak_rss_growth_sees_a_large_temporary_allocation() -> None:
    def allocate() -> None:
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        del t

    growth = peak_rss_growth_bytes(allocate)
    if growth is None:
        pytest.skip("this kernel cannot reset the peak-RSS mark (/proc/self/clear_refs)")
    assert growth >= 48 * 2**20


# -- Spearman -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xs", "ys", "expected"),
    [
        ([1, 2, 3, 4], [10, 20, 40, 30], 0.8),  # 1 - 6*(0+0+1+1) / (4*15)
        ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7], 0.8207826816681233),  # ties: ys ranks 1, 2, 3.5, 5, 3.5
        ([1, 2, 3], [3, 2, 1], -1.0),
        ([0.1, 5.0, 2.0], [1e-3, 9.0, 8.0], 1.0),  # monotone, not linear
    ],
)
def test_spearman_hand_examples(xs: list[float], ys: list[float], expected: float) -> None:
    assert spearman(xs, ys) == pytest.approx(expected, abs=1e-12)


def test_spearman_edge_cases() -> None:
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="3 xs but 2 ys"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="need at least 2"):
        spearman([1], [1])


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xs = torch.randint(0, 6, (20,), generator=g).tolist()  # many ties
        ys = torch.randn(20, generator=g).tolist()
        assert spearman(xs, ys) == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)


def test_latency_stats_is_frozen() -> None:
    s = LatencyStats("eager", 1, 1e-3, 2e-3, 10, 1000.0, None, "unavailable")
    with pytest.raises(AttributeError):
        s.p50_s = 0.0  # type: ignore[misc]
