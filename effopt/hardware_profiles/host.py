"""Measure this machine and describe it as a `HardwareProfile` named ``host``.

    m = measure_host_details(threads=1)        # ~10-20 s; quick=True takes ~2 s
    m.profile.peak("fp32")                     # e.g. 9.8e10 FLOP/s for one Zen 4 core
    Path("host.yaml").write_text(profile_to_yaml(m.profile, m.notes))

What is measured, each as the *best* of several timed repeats after one warm-up call (the
best run is the one least disturbed by other processes on a shared machine; every figure is
rounded to 4 significant digits, as repeat runs differ by more than that anyway):

- ``peak_flops_per_s``: ``torch.mm`` of two square matrices (512 and 1024; quick: 512) per
  float dtype, counting 2 FLOPs per MAC. fp32 always; bf16 and fp16 only when they reach at
  least half the fp32 rate (`HALF_PRECISION_FLOOR`), since a slower half type is emulated
  (converted to fp32 and back) and planning for it would be wrong. int8 via
  ``torch._int_mm`` (int8 x int8 -> int32) when this torch build runs it on CPU, 2 ops/MAC.
- DRAM bandwidth: ``dst.copy_(src)`` of an fp32 tensor much larger than the last-level
  cache (128 MiB; quick: 64 MiB), bytes read + bytes written over time.
- cache levels: sizes from ``/sys/devices/system/cpu/cpu0/cache`` (L2 and up, as ``cache:
  true`` levels), with the copy bandwidth of a buffer that fits in half of each.
- ``op_overhead_s``: the fixed cost per op. Three candidates are measured: the per-node
  time in onnxruntime (a chain of 101 tiny ``Add`` nodes minus a 1-node graph, over 100;
  ~0.5 us here), the whole ``session.run`` of a 1-node graph (~5 us: mostly the fixed cost
  of a call, which the schema has no field for), and one tiny eager ``torch.add`` (~1-2 us).
  The cost model is validated against onnxruntime, and on the validation benchmark
  (`benchmarks/cost_model.py`) the per-node figure ranked the small, overhead-dominated
  models as well as the torch.add figure (equal, or within 0.012, Spearman, in each of five
  runs) and no worse than the 1-call figure, which overshoots them ~3x; on the larger
  models the choice does not matter. It measures the runtime the model is checked
  against, so it is the default (`overhead_from`). Both small figures swing between runs
  on a shared machine (0.27-0.50 us and 1.1-1.9 us over five runs).

Threads: every figure is taken with ``threads`` intra-op threads (torch and onnxruntime),
the same setting `effopt bench` uses, so predictions and measurements agree on it.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from effopt.errors import ProfileError
from effopt.hardware_profiles.schema import SCHEMA_VERSION, Arch, HardwareProfile, MemoryLevel, PeakFlopsPerS

__all__ = [
    "HALF_PRECISION_FLOOR",
    "HostMeasurement",
    "measure_host",
    "measure_host_details",
    "profile_to_yaml",
]

HALF_PRECISION_FLOOR = 0.5
"""A half-precision dtype enters the profile only at >= this fraction of the fp32 matmul rate."""

OverheadSource = Literal["torch", "onnxruntime-node", "onnxruntime-call"]

_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class HostMeasurement:
    """Everything `measure_host_details` measured, the resulting profile, and how.

    ``flops_per_s`` holds every dtype that ran (including ones left out of the profile for
    being below the floor); the two overheads are both kept so a benchmark can compare them.
    """

    profile: HardwareProfile
    flops_per_s: dict[str, float]
    dram_bytes_per_s: float
    cache_bytes_per_s: dict[str, float]
    onnxruntime_op_overhead_s: float
    onnxruntime_call_overhead_s: float
    torch_op_overhead_s: float
    threads: int
    notes: tuple[str, ...]


def _sig4(x: float) -> float:
    """``x`` rounded to 4 significant digits: 98765432.1 -> 98770000.0."""
    return float(f"{x:.4g}")


def _best_s(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Fastest of ``repeats`` timings of ``inner`` back-to-back calls, per call, after one warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


# -- compute -------------------------------------------------------------------------------------


def _matmul_flops_per_s(dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> float | None:
    """Best ``torch.mm`` rate over ``sizes``; None if this dtype does not run here."""
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for n in sizes:
        try:
            a = torch.randn(n, n, generator=g).to(dtype)
            b = torch.randn(n, n, generator=g).to(dtype)
            t = _best_s(lambda: torch.mm(a, b), repeats)
        except (RuntimeError, NotImplementedError):
            return None
        best = max(best, 2 * n**3 / t)
    return best


def _probe_s(fn: Callable[[], object]) -> float | None:
    """One timed call (after a warm-up); None when the op does not run on this build."""
    try:
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    except (RuntimeError, NotImplementedError):
        return None


def _half_flops_per_s(dtype: torch.dtype, fp32_flops_per_s: float, sizes: Sequence[int], repeats: int) -> float | None:
    """Like `_matmul_flops_per_s`, but gives up after one small probe if the dtype is emulated.

    An emulated fp16 runs ~100x slower than fp32 (a 1024^2 product would take seconds), so a
    128^2 probe decides first: a dtype that is 10x below the floor there is not timed further.
    """
    n = 128
    a = torch.ones(n, n, dtype=dtype)
    t = _probe_s(lambda: torch.mm(a, a))
    if t is None or 2 * n**3 / t < HALF_PRECISION_FLOOR * fp32_flops_per_s / 10:
        return None if t is None else 2 * n**3 / t
    return _matmul_flops_per_s(dtype, sizes, repeats)


def _int8_ops_per_s(sizes: Sequence[int], repeats: int) -> float | None:
    """``torch._int_mm`` rate (2 ops per MAC), or None when it is missing or unsupported on CPU."""
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is None:
        return None
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for n in sizes:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        try:
            t = _best_s(lambda: int_mm(a, b), repeats)
        except (RuntimeError, NotImplementedError):
            return None
        best = max(best, 2 * n**3 / t)
    return best


# -- memory --------------------------------------------------------------------------------------


def _copy_bytes_per_s(nbytes: int, repeats: int, inner: int = 1) -> float:
    """Bandwidth of ``dst.copy_(src)`` on two fp32 tensors of ``nbytes`` each: (read + write) / time."""
    n = max(1, nbytes // 4)
    src = torch.ones(n)
    dst = torch.zeros(n)  # both touched, so page faults are not timed
    return 2 * n * 4 / _best_s(lambda: dst.copy_(src), repeats, inner)


def _cache_levels() -> list[tuple[str, int]]:
    """(name, bytes) of cpu0's data/unified caches at level >= 2, e.g. [('l2', 1048576), ('l3', 33554432)]."""
    levels: dict[int, int] = {}
    if not _CACHE_SYSFS.is_dir():
        return []
    for entry in sorted(_CACHE_SYSFS.glob("index*")):
        try:
            level = int((entry / "level").read_text().strip())
            kind = (entry / "type").read_text().strip()
            size = (entry / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level < 2:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (ValueError, IndexError):
            continue
        levels[level] = max(levels.get(level, 0), nbytes)
    return [(f"l{level}", nbytes) for level, nbytes in sorted(levels.items())]


def _dram_capacity_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**34  # 16 GiB: only used when the OS will not say


def host_arch() -> Arch | None:
    """This machine's instruction-set family as a profile names it, or None if it is none of them."""
    machine = platform.machine().lower()
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)  # type: ignore[return-value]


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (``avx2``, ``avx512_vnni``, ...); empty where it lists none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_int8_weight_bits(arch: Arch | None = None, flags: frozenset[str] | None = None) -> int:
    """7 on an x86-64 CPU without VNNI, else 8: see `HardwareProfile.int8_weight_bits`.

    Without VNNI, fbgemm's and onnxruntime's uint8 x int8 kernels sum products in pairs into a
    saturating int16 (VPMADDUBSW): 255·127 + 255·127 = 64770 clips at 32767, so 8-bit weights give
    wrong results on large activations; 7-bit weights (|w| ≤ 63: 2·255·63 = 32130) never do.

    >>> host_int8_weight_bits("x86_64", frozenset({"avx2"})), host_int8_weight_bits("x86_64", frozenset({"avx512_vnni"}))
    (7, 8)
    """
    arch = host_arch() if arch is None else arch
    flags = cpu_flags() if flags is None else flags
    if arch != "x86_64":
        return 8
    return 8 if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else 7


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (for profile descriptions and benchmark headers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# -- per-op overhead -----------------------------------------------------------------------------


def _add_chain_onnx(nodes: int) -> bytes:
    """An ONNX graph ``y = x + x + ... `` of ``nodes`` Add nodes on a [1, 8] fp32 tensor."""
    import onnx
    from onnx import TensorProto, helper

    graph_nodes = []
    previous = "x"
    for i in range(nodes):
        out = "y" if i == nodes - 1 else f"t{i}"
        graph_nodes.append(helper.make_node("Add", [previous, previous], [out]))
        previous = out
    graph = helper.make_graph(
        graph_nodes,
        "add_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime effopt supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _onnxruntime_overheads_s(threads: int, repeats: int) -> tuple[float, float]:
    """(per-node cost, whole-call cost of a 1-node graph) in onnxruntime.

    Per node: (t(101-node chain) - t(1 node)) / 100, so the fixed cost of ``session.run``
    cancels out; the second figure is t(1 node) itself, that fixed cost plus one node.
    """
    import onnxruntime as ort

    def session(nodes: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        return ort.InferenceSession(_add_chain_onnx(nodes), options, providers=["CPUExecutionProvider"])

    feed = {"x": np.ones((1, 8), np.float32)}
    one, many = session(1), session(101)
    for _ in range(50):
        one.run(None, feed)
        many.run(None, feed)
    t_one = _best_s(lambda: one.run(None, feed), repeats, inner=200)
    t_many = _best_s(lambda: many.run(None, feed), repeats, inner=200)
    return max((t_many - t_one) / 100, 1e-9), t_one


def _torch_op_overhead_s(repeats: int) -> float:
    """Time of one eager ``torch.add`` on two 8-element tensors: dispatch, no arithmetic to speak of."""
    x, y = torch.ones(8), torch.ones(8)
    return _best_s(lambda: torch.add(x, y), repeats, inner=2000)


# -- the profile -----------------------------------------------------------------------------------


def measure_host_details(
    threads: int | None = None,
    quick: bool = False,
    overhead_from: OverheadSource = "onnxruntime-node",
) -> HostMeasurement:
    """Measure this machine with ``threads`` threads (default: torch's current setting).

    Takes ~10-20 s, or ~2 s with ``quick=True`` (fewer repeats, smaller matrices and
    buffers; figures a little lower and noisier). torch's thread count is restored after.
    """
    previous_threads = torch.get_num_threads()
    threads = previous_threads if threads is None else threads
    if threads < 1:
        raise ProfileError(f"profile-host: threads={threads}; give at least 1")
    sizes = (512,) if quick else (512, 1024)
    repeats = 3 if quick else 15
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            flops: dict[str, float] = {}
            fp32 = _matmul_flops_per_s(torch.float32, sizes, repeats)
            if fp32 is None:  # pragma: no cover - torch.mm in fp32 runs on every CPU build
                raise ProfileError("profile-host: torch.mm failed in fp32; this torch build cannot compute here")
            flops["fp32"] = fp32
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                rate = _half_flops_per_s(dtype, fp32, sizes, repeats)
                if rate is not None:
                    flops[name] = rate
            int8 = _int8_ops_per_s(sizes, repeats)
            if int8 is not None:
                flops["int8"] = int8
            dram = _copy_bytes_per_s((64 if quick else 128) * 2**20, repeats=3 if quick else 9)
            caches = _cache_levels()
            cache_bw = {
                name: _copy_bytes_per_s(nbytes // 4, repeats, inner=max(1, 2**26 // max(nbytes, 1)))
                for name, nbytes in caches
            }
            ort_overhead, ort_call = _onnxruntime_overheads_s(threads, repeats)
            torch_overhead = _torch_op_overhead_s(repeats)
    finally:
        torch.set_num_threads(previous_threads)

    floor = HALF_PRECISION_FLOOR * flops["fp32"]
    peaks = {d: _sig4(v) for d, v in flops.items() if d in ("fp32", "int8") or v >= floor}
    overhead = {"torch": torch_overhead, "onnxruntime-node": ort_overhead, "onnxruntime-call": ort_call}[overhead_from]
    memory = [
        MemoryLevel(
            name="dram",
            bandwidth_bytes_per_s=_sig4(dram),
            capacity_bytes=_dram_capacity_bytes(),
            holds="both",
        )
    ]
    memory += [
        MemoryLevel(name=name, bandwidth_bytes_per_s=_sig4(cache_bw[name]), capacity_bytes=nbytes, holds="both", cache=True)
        for name, nbytes in caches
    ]
    cpu = cpu_name()
    cpus = os.cpu_count() or 1
    profile = HardwareProfile(
        version=SCHEMA_VERSION,
        name="host",
        description=(
            f"This machine ({cpu}, {cpus} logical CPUs) at {threads} thread(s), measured by effopt "
            f"profile-host with torch {torch.__version__}{' (quick)' if quick else ''}"
        ),
        kind="cpu",
        arch=host_arch(),
        peak_flops_per_s=PeakFlopsPerS(**peaks),
        integer_only=False,
        memory=tuple(memory),
        roofline_memory="dram",
        structured_sparsity="none",
        op_overhead_s=_sig4(overhead),
        accumulator_bits=32,
        int8_weight_bits=host_int8_weight_bits(),
        channel_multiple=8 if host_arch() == "x86_64" else 4,
    )
    left_out = {d: v for d, v in flops.items() if d not in peaks}
    notes = [
        f"CPU: {cpu} ({cpus} logical CPUs); torch {torch.__version__}; {threads} intra-op thread(s).",
        "Every figure is the best of several timed repeats after a warm-up, rounded to 4 significant",
        "digits; on a shared machine repeat runs differ by up to ~20%.",
        f"peak_flops_per_s: torch.mm of {' and '.join(f'{n}x{n}' for n in sizes)} matrices, 2 FLOPs/MAC;",
        "  int8 via torch._int_mm (int8 x int8 -> int32), 2 ops per MAC."
        if "int8" in peaks
        else "  int8 left out: torch._int_mm does not run on this build.",
    ]
    for d, v in left_out.items():
        notes.append(
            f"  {d} left out: measured {v:.3g} FLOP/s, below {HALF_PRECISION_FLOOR:g} x fp32 (emulated)."
        )
    notes += [
        f"dram: dst.copy_(src) of {(64 if quick else 128)} MiB fp32 tensors, (bytes read + written) / time.",
        "cache levels: sizes from /sys/devices/system/cpu/cpu0/cache; bandwidth by the same copy",
        "  with each tensor a quarter of the level (informational: the roofline uses dram).",
        "op_overhead_s: candidates measured: onnxruntime per node",
        f"  {ort_overhead:.3g} s (a 101-node chain of tiny Adds minus a 1-node graph, / 100);",
        f"  onnxruntime 1-node session.run {ort_call:.3g} s; one eager torch.add {torch_overhead:.3g} s.",
        f"  This file uses the {overhead_from} figure.",
    ]
    return HostMeasurement(
        profile=profile,
        flops_per_s=flops,
        dram_bytes_per_s=dram,
        cache_bytes_per_s=cache_bw,
        onnxruntime_op_overhead_s=ort_overhead,
        onnxruntime_call_overhead_s=ort_call,
        torch_op_overhead_s=torch_overhead,
        threads=threads,
        notes=tuple(notes),
    )


def measure_host(threads: int | None = None, quick: bool = False) -> HardwareProfile:
    """The ``host`` profile of this machine; see `measure_host_details` for what is measured."""
    return measure_host_details(threads, quick).profile


# -- YAML ----------------------------------------------------------------------------------------


def _number(x: float | int) -> str:
    """Shortest text that reads back as ``x`` under effopt's YAML 1.2 loader: 9.877e+10, 4.2e-07."""
    if isinstance(x, int):
        return str(x)
    for digits in range(1, 18):
        text = f"{x:.{digits}g}"
        if float(text) == x:
            break
    if "e" not in text and "." not in text:
        text += ".0"  # '100' would read back as an int
    return text


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def profile_to_yaml(profile: HardwareProfile, notes: Sequence[str] = ()) -> str:
    """A hardware-profile YAML file for ``profile`` that `load_profile` reads back unchanged.

    Keys follow the schema's field order; ``notes`` (e.g. `HostMeasurement.notes`) become
    comment lines under a header saying the file was measured.
    """
    lines = [f"# Hardware profile '{profile.name}' written by effopt profile-host.", "#"]
    lines += [f"# {note}".rstrip() for note in notes]
    lines += [
        f"version: {profile.version}",
        f"name: {_quoted(profile.name)}",
        f"description: {_quoted(profile.description)}",
        f"kind: {profile.kind}",
    ]
    lines += [f"arch: {profile.arch}"] if profile.arch is not None else []
    lines += [
        "peak_flops_per_s:",
    ]
    lines += [f"  {d}: {_number(profile.peak(d))}" for d in profile.supported_dtypes]
    lines.append(f"integer_only: {'true' if profile.integer_only else 'false'}")
    lines.append("memory:")
    for level in profile.memory:
        lines.append(f"  - name: {_quoted(level.name)}")
        if level.bandwidth_bytes_per_s is not None:
            lines.append(f"    bandwidth_bytes_per_s: {_number(level.bandwidth_bytes_per_s)}")
        lines.append(f"    capacity_bytes: {level.capacity_bytes}")
        lines.append(f"    holds: {level.holds}")
        if level.cache:
            lines.append("    cache: true")
    lines += [
        f"roofline_memory: {_quoted(profile.roofline_memory)}",
        f"structured_sparsity: {_quoted(profile.structured_sparsity)}",
        f"op_overhead_s: {_number(profile.op_overhead_s)}",
        f"accumulator_bits: {profile.accumulator_bits}",
        f"int8_weight_bits: {profile.int8_weight_bits}",
        f"channel_multiple: {profile.channel_multiple}",
    ]
    return "\n".join(lines) + "\n"
