"""A roofline cost model: what an annotated IR costs on one `HardwareProfile`.

Target numbers never live on IR nodes (STYLE rule 12): this module reads each node's
target-independent `NodeFacts` (FLOPs, bytes moved, compute dtype) and a profile, and
returns a fresh `ModelCost`. The same IR can be priced against any number of profiles.

Per node, in the node's compute dtype (after quantization)::

    compute_s = flops / profile.peak(dtype)
    memory_s  = bytes_moved / profile.memory_bandwidth_bytes_per_s
    time_s    = max(compute_s, memory_s) + profile.op_overhead_s

Worked example (a100: fp32 19.5e12 FLOP/s, 2.039e12 B/s, 5 us per op): a dense 3x3 conv,
256->256 channels on 56x56 at batch 32 does 2 * (32*256*56*56) * (256*9) = 118.4e9 FLOPs
and moves 2 * 102.8e6 activation bytes + 2.36e6 weight bytes = 207.9e6 bytes, so
compute_s = 6.071 ms > memory_s = 0.102 ms: compute-bound, time_s = 6.076 ms.

Conventions, each a deliberate choice:

- **Views move nothing.** A node with 0 FLOPs and 0 bytes (reshape, flatten, transpose,
  getitem, dropout at eval, ...) has compute_s = memory_s = 0 and bound ``"none"``. Those
  that reach a runtime graph (reshape, flatten, transpose, ...: ONNX Reshape/Transpose
  nodes, aten view ops) still pay ``op_overhead_s``; those that no runtime executes
  (`ERASED_KINDS`: eval-mode dropout and identity, getitem, shape queries) cost 0 s.
  Decided by data: on the validation benchmark (`benchmarks/cost_model.py`, onnxruntime,
  1 thread), making every view free lowered the rank correlation on the overhead-dominated
  small models by 0.05-0.06 in each of four runs (e.g. 0.915 -> 0.867), while also
  charging dropout/identity changed nothing; on the larger models neither choice moved it
  (0.952).
- **Unsupported dtypes** are priced, not infinite: a node whose dtype the target cannot
  compute in is costed at the target's *slowest* supported peak, marked
  ``supported=False`` with a reason saying what to do, and listed in
  `ModelCost.unsupported`. A finite time keeps totals and tables comparable across
  plans; `check_runnable` is what turns the verdict into an error. Views are always
  supported (they compute nothing).
- **dtype overrides** (`estimate(..., dtypes={...})`) let a planner ask "what if these
  layers were int8" without editing the IR: compute uses the override's peak, and the
  node's bytes scale by the element-size ratio (int8 moves 1/4 of fp32's bytes), which
  assumes every tensor the node touches is stored in its compute dtype.
- **Batch** (`estimate(..., batch=B)`): FLOPs and activation bytes scale by ``B / b0``
  where ``b0`` is the IR's example batch (dim 0 of its first input); weight bytes do not.
  This is exact for models whose every activation carries the batch as a dimension
  (conv nets, MLPs, transformers over a batch of sequences), and approximate otherwise.
- **Peak activation memory** is the largest sum of live activation bytes at any point of
  a graph-order schedule: a tensor is live from the node that makes it to its last user
  (a view keeps its base alive), graph inputs count, nothing is computed in place. It
  ignores runtime workspaces and in-place reuse, so a runtime may need somewhat more or
  less; it is an estimate, not a measurement.
- **2:4 sparsity** is credited only on a profile with ``structured_sparsity: "2:4"``
  (a100, h100-sxm), and only to a Conv/Linear whose weights hold the pattern now
  (`is_2_4_sparse`, read from the module when pricing: facts stay target-free and
  nothing goes stale). Such a layer's MACs take half the compute time, and its weights
  move as the kept half plus a 2-bit position per kept value. Everywhere else zeros are
  priced like any weight: unstructured sparsity saves storage (see `prune_unstructured`),
  not time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from effopt.errors import ProfileError
from effopt.hardware_profiles.schema import DTYPES, HardwareProfile
from effopt.optimizer.ir.analysis import totals
from effopt.optimizer.ir.core import IR, NodeFacts, facts, has_facts

__all__ = [
    "BYTES_PER_ELEMENT",
    "ERASED_KINDS",
    "ModelCost",
    "NodeCost",
    "check_runnable",
    "estimate",
    "input_groups",
    "ir_batch",
    "is_2_4_sparse",
    "is_free",
    "is_view",
    "node_cost",
]

Bound = Literal["compute", "memory", "none"]

BYTES_PER_ELEMENT: Mapping[str, float] = {
    "fp32": 4.0, "tf32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5,
}
"""Storage size of one element per profile dtype (tf32 is stored as fp32; int4 packs two per byte)."""

_MAX_LISTED = 5  # unsupported layers named in one `check_runnable` message


@dataclass(frozen=True)
class NodeCost:
    """What one IR node costs on one target.

    ``time_s = max(compute_s, memory_s) + overhead_s``; ``bound`` says which term won
    (``"none"`` for a view, which costs nothing). ``flops`` and ``bytes_moved`` are the
    figures priced, after any batch scaling and dtype override.

    Example (a100, fp32): a dense 3x3 conv with 118.4e9 FLOPs and 207.9e6 bytes gives
    compute_s 6.071 ms, memory_s 0.102 ms, overhead_s 5 us: ``bound="compute"``,
    ``time_s`` 6.076 ms.
    """

    node: str
    op_kind: str
    op: str
    dtype: str
    flops: float
    bytes_moved: float
    compute_s: float
    memory_s: float
    overhead_s: float
    time_s: float
    bound: Bound
    supported: bool
    reason: str | None = None
    sparse_2_4: bool = False  # priced with the target's 2:4 sparse kernels (half the MAC time)


@dataclass(frozen=True)
class ModelCost:
    """A whole model's cost on one target: per-node costs in graph order, totals and verdicts.

    ``total_s = compute_bound_s + memory_bound_s + view_s``: the first two sum the nodes by
    their bound, ``view_s`` is the op overhead of view nodes (bound ``"none"``). ``fits_memory`` compares ``weight_bytes`` and
    ``peak_activation_bytes`` with the profile's capacities; ``memory_reason`` says why not.
    """

    profile: str
    batch: int
    nodes: tuple[NodeCost, ...]
    total_s: float
    compute_bound_s: float
    memory_bound_s: float
    view_s: float
    unsupported: tuple[NodeCost, ...]
    fits_memory: bool
    memory_reason: str | None
    weight_bytes: int
    peak_activation_bytes: int

    @property
    def runnable(self) -> bool:
        """True when every node's dtype runs on the target and the model fits its memory."""
        return not self.unsupported and self.fits_memory

    def by_name(self) -> dict[str, NodeCost]:
        """Node costs keyed by node name (graph order preserved)."""
        return {c.node: c for c in self.nodes}


# -- one node -----------------------------------------------------------------------------------


ERASED_KINDS: frozenset[str] = frozenset(
    {"dropout", "identity", "getitem", "getattr", "size", "dim", "alias", "guard", "quantize"}
)
"""Op kinds that no inference runtime executes: eval-mode dropout and identity are dropped by
every exporter, tuple indexing and shape queries are bookkeeping, and a quantizer edge is fused
into the int8 kernels on either side of it (QLinearConv requantizes its own output). They cost 0 s."""


def is_view(f: NodeFacts) -> bool:
    """True for nodes that move and compute nothing (reshape, transpose, dropout, ...)."""
    return f.flops == 0 and f.bytes_moved == 0


def is_free(f: NodeFacts) -> bool:
    """True for nodes that cost nothing at all, overhead included: views of an `ERASED_KINDS` kind."""
    return is_view(f) and f.op_kind in ERASED_KINDS


def _weight_bytes_of(f: NodeFacts) -> int:
    """Bytes of weights a node reads: what it reads beyond its activation inputs."""
    return max(0, f.bytes_read - sum(t.nbytes for t in f.inputs))


def _slowest_supported(profile: HardwareProfile) -> str:
    return min(profile.supported_dtypes, key=profile.peak)


def _unsupported_reason(name: str, f: NodeFacts, dtype: str, profile: HardwareProfile) -> str:
    runs = ", ".join(profile.supported_dtypes)
    only = "only " if len(profile.supported_dtypes) == 1 else ""
    if profile.integer_only or all(d in ("int8", "int4") for d in profile.supported_dtypes):
        fix = "quantize it (passes: quantize) or choose another target"
    else:
        fix = f"convert it to one of {runs} or choose another target"
    return (
        f"layer '{name}' ({f.op}) computes in {dtype} but {profile.name} runs {only}{runs}: {fix}"
    )


def node_cost(
    f: NodeFacts,
    name: str,
    profile: HardwareProfile,
    dtype: str | None = None,
    batch_scale: float = 1.0,
    sparse_2_4_numel: int = 0,
) -> NodeCost:
    """Roofline cost of one node with facts ``f`` on ``profile``.

    ``dtype`` (default ``f.compute_dtype``) is the dtype it computes in; when it differs
    from the facts' dtype, bytes scale by the element-size ratio. ``batch_scale``
    multiplies FLOPs and activation bytes (not weight bytes), for a batch other than the
    one the IR was annotated at. A node effopt could not count (``counted=False``, 0 FLOPs)
    is priced by the bytes it moves alone.

    Example on a100 (fp32 19.5e12 FLOP/s, 2.039e12 B/s, 5 us overhead): a depthwise 3x3
    conv, 256 channels, 56x56, batch 32 does 2 * 25.7e6 * 9 = 462.4e6 FLOPs (23.7 us) and
    moves 205.5e6 bytes (100.8 us): memory-bound, time_s = 100.8 + 5 = 105.8 us.

    ``sparse_2_4_numel`` is the number of weight elements that hold the 2:4 pattern (0:
    dense); it counts only where ``profile.structured_sparsity == "2:4"``, see `_sparse_2_4`.
    """
    dtype = dtype or f.compute_dtype
    if dtype not in DTYPES:
        raise ProfileError(
            f"layer '{name}': dtype '{dtype}' is not one effopt knows; use one of {', '.join(DTYPES)}"
        )
    if is_view(f):  # no arithmetic, no data: supported anywhere; a runtime op unless erased
        overhead_s = 0.0 if f.op_kind in ERASED_KINDS else profile.op_overhead_s
        return NodeCost(name, f.op_kind, f.op, dtype, 0.0, 0.0, 0.0, 0.0, overhead_s, overhead_s, "none", True, None)
    weight_bytes = _weight_bytes_of(f)
    size_ratio = BYTES_PER_ELEMENT[dtype] / BYTES_PER_ELEMENT.get(f.compute_dtype, 4.0)
    sparse = sparse_2_4_numel > 0 and profile.structured_sparsity == "2:4"
    saved_bytes, index_bytes, saved_flops = _sparse_2_4(f, sparse_2_4_numel if sparse else 0)
    kept_weight_bytes = max(0.0, weight_bytes - saved_bytes)
    bytes_moved = ((f.bytes_moved - weight_bytes) * batch_scale + kept_weight_bytes) * size_ratio + index_bytes
    flops = (f.flops - saved_flops) * batch_scale
    supported = profile.supports(dtype)
    reason = None if supported else _unsupported_reason(name, f, dtype, profile)
    peak = profile.peak(dtype if supported else _slowest_supported(profile))
    compute_s = flops / peak
    memory_s = bytes_moved / profile.memory_bandwidth_bytes_per_s
    bound: Bound = "compute" if compute_s >= memory_s else "memory"
    overhead_s = profile.op_overhead_s
    return NodeCost(
        node=name,
        op_kind=f.op_kind,
        op=f.op,
        dtype=dtype,
        flops=flops,
        bytes_moved=bytes_moved,
        compute_s=compute_s,
        memory_s=memory_s,
        overhead_s=overhead_s,
        time_s=max(compute_s, memory_s) + overhead_s,
        bound=bound,
        supported=supported,
        reason=reason,
        sparse_2_4=sparse,
    )


# -- 2:4 sparsity -------------------------------------------------------------------------------


def input_groups(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as rows of 4 consecutive input channels, ``[-1, 4]``: the groups 2:4 sparsity prunes.

    A Linear ``[out, in]`` is grouped along ``in``; a conv ``[out, in/groups, *kernel]`` is read
    channels-last (``[out, *kernel, in/groups]``), so a group is 4 neighbouring input channels at
    one kernel position, the reduction order of sparse tensor-core kernels (NVIDIA's ASP does the
    same). Example: a Linear weight ``[2, 8]`` gives 4 groups ``w[0, 0:4], w[0, 4:8], w[1, 0:4],
    w[1, 4:8]``. Raises `ValueError` when the input length is not a multiple of 4.
    """
    if weight.dim() < 2 or weight.shape[1] % 4:
        raise ValueError(f"weight {list(weight.shape)}: input length must be a multiple of 4 for 2:4 groups")
    return weight.detach().movedim(1, -1).reshape(-1, 4)


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True when every `input_groups` group of ``weight`` has at most 2 non-zeros.

    Example: ``[[1, 0, 2, 0, 0, 0, 0, 3]]`` is 2:4 sparse; ``[[1, 2, 3, 0, 0, 0, 0, 0]]`` is not
    (3 non-zeros in its first group), although both are 62.5 % zeros. A weight whose input length
    is not a multiple of 4 never is.
    """
    if weight.dim() < 2 or weight.shape[1] % 4 or weight.numel() == 0:
        return False
    w = weight.detach()
    if int((w == 0).sum()) * 2 < w.numel():  # fewer than half zeros: cannot hold the pattern
        return False
    return bool(((input_groups(w) != 0).sum(dim=1) <= 2).all())


def _sparse_2_4(f: NodeFacts, numel: int) -> tuple[float, float, float]:
    """(weight bytes not moved, index bytes moved, FLOPs not computed) for ``numel`` 2:4 weights.

    Half the values are skipped and each kept one carries a 2-bit position. Example: a fp32
    Linear(1024, 1024) at batch 512 (f.macs = 536.9e6) saves 2.10e6 of its 4.19e6 weight bytes,
    adds 0.13e6 index bytes and computes 536.9e6 of its 1073.7e6 FLOPs: on a100 (fp32 19.5e12
    FLOP/s) compute_s falls from 55.1 us to 27.5 us.
    """
    if numel <= 0:
        return 0.0, 0.0, 0.0
    kept = numel / 2
    return kept * BYTES_PER_ELEMENT.get(f.compute_dtype, 4.0), kept * 2 / 8, float(f.macs)


def _sparse_2_4_numel(ir: IR, n: fx.Node, f: NodeFacts) -> int:
    """Weight elements of a Conv/Linear node whose module's weight holds the 2:4 pattern (else 0)."""
    if n.op != "call_module" or f.op_kind not in ("conv", "linear"):
        return 0
    module = ir.module_of(n)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight is [in, out, ...]: another layout
        return 0
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) and is_2_4_sparse(weight) else 0


# -- whole model --------------------------------------------------------------------------------


def ir_batch(ir: IR) -> int:
    """The example batch the IR was annotated at: dim 0 of its first input (1 if it has none)."""
    for x in ir.example_inputs:
        if x.dim() > 0:
            return int(x.shape[0])
    return 1


def _check_dtypes(ir: IR, dtypes: Mapping[str, str]) -> None:
    names = {n.name for n in ir.compute_nodes()}
    unknown = [k for k in dtypes if k not in names]
    if unknown:
        sample = ", ".join(n.name for n in ir.compute_nodes()[:8])
        raise ProfileError(
            f"dtype override for node(s) {', '.join(map(repr, unknown))}: no such compute node in the IR; "
            f"compute nodes include {sample}"
        )
    bad = {k: v for k, v in dtypes.items() if v not in DTYPES}
    if bad:
        k, v = next(iter(bad.items()))
        raise ProfileError(f"dtype override for node '{k}': '{v}' is not a dtype; use one of {', '.join(DTYPES)}")


def _peak_activation_bytes(ir: IR, scale_of: Mapping[str, float]) -> int:
    """Largest sum of live activation bytes over a graph-order schedule (see module docstring).

    ``scale_of`` maps a node name to the factor its output bytes are multiplied by
    (batch scale times dtype-size ratio); graph inputs use the batch scale under ``""``.
    """
    order = list(ir.gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    size: dict[fx.Node, float] = {}
    examples = iter(ir.example_inputs)
    for n in order:
        if n.op == "placeholder":
            x = next(examples, None)
            size[n] = x.nbytes * scale_of.get("", 1.0) if x is not None else 0.0
        elif has_facts(n):
            f = facts(n)
            size[n] = 0.0 if is_view(f) else sum(t.nbytes for t in f.outputs) * scale_of.get(n.name, 1.0)

    end: dict[fx.Node, int] = {}

    def last_use(n: fx.Node) -> int:
        if n not in end:
            uses = [index[n]]
            for u in n.users:
                aliases = u.op != "output" and has_facts(u) and is_view(facts(u))
                uses.append(last_use(u) if aliases else (len(order) if u.op == "output" else index[u]))
            end[n] = max(uses)
        return end[n]

    delta = [0.0] * (len(order) + 2)
    for n, nbytes in size.items():
        if nbytes:
            delta[index[n]] += nbytes
            delta[last_use(n) + 1] -= nbytes
    live = peak = 0.0
    for d in delta:
        live += d
        peak = max(peak, live)
    return int(round(peak))


def _fmt_bytes(n: float) -> str:
    return f"{int(n):,} bytes ({n / 2**20:.2f} MiB)"


def _memory_verdict(weight_bytes: int, activation_bytes: int, profile: HardwareProfile) -> str | None:
    problems = []
    if weight_bytes > profile.weight_capacity_bytes:
        problems.append(
            f"weights need {_fmt_bytes(weight_bytes)} but {profile.name} has "
            f"{_fmt_bytes(profile.weight_capacity_bytes)} for weights"
        )
    if activation_bytes > profile.activation_capacity_bytes:
        problems.append(
            f"activations need {_fmt_bytes(activation_bytes)} at peak but {profile.name} has "
            f"{_fmt_bytes(profile.activation_capacity_bytes)} for activations"
        )
    if not problems and weight_bytes + activation_bytes > profile.memory_capacity_bytes:
        problems.append(
            f"weights + peak activations need {_fmt_bytes(weight_bytes + activation_bytes)} but "
            f"{profile.name} has {_fmt_bytes(profile.memory_capacity_bytes)} of memory"
        )
    if not problems:
        return None
    return "; ".join(problems) + ": shrink the model (passes: quantize, prune) or use a smaller batch"


def estimate(
    ir: IR,
    profile: HardwareProfile,
    dtypes: Mapping[str, str] | None = None,
    batch: int | None = None,
) -> ModelCost:
    """Price every annotated compute node of ``ir`` on ``profile``, in graph order.

    ``dtypes`` overrides the compute dtype of named nodes (``{"conv1": "int8"}``) without
    touching the IR. ``batch`` prices a batch other than the IR's example batch (FLOPs and
    activation bytes scale linearly; weights do not).

    Example: a 1-layer MLP ``Linear(1024, 1024)`` at batch 1 on x86-avx2 (768e9 FLOP/s,
    42.656e9 B/s, 2 us): 2.1e6 FLOPs (2.7 us) vs 4.2e6 weight bytes (98.5 us): memory-bound,
    ``total_s`` = 100.5 us; at ``batch=64`` compute grows 64x (175 us) and weights stay,
    so it turns compute-bound.
    """
    dtypes = dict(dtypes or {})
    _check_dtypes(ir, dtypes)
    b0 = ir_batch(ir)
    batch = b0 if batch is None else batch
    if batch < 1:
        raise ProfileError(f"batch {batch}: the cost model needs a batch of at least 1")
    batch_scale = batch / b0

    nodes: list[NodeCost] = []
    scale_of: dict[str, float] = {"": batch_scale}
    weight_bytes = totals(ir).size_bytes
    for n in ir.compute_nodes():
        if not has_facts(n):
            continue
        f = facts(n)
        dtype = dtypes.get(n.name, f.compute_dtype)
        sparse_numel = _sparse_2_4_numel(ir, n, f) if profile.structured_sparsity == "2:4" else 0
        cost = node_cost(f, n.name, profile, dtype, batch_scale, sparse_numel)
        nodes.append(cost)
        size_ratio = BYTES_PER_ELEMENT[dtype] / BYTES_PER_ELEMENT.get(f.compute_dtype, 4.0)
        scale_of[n.name] = batch_scale * size_ratio
        if n.name in dtypes and f.params:
            # a params count without its storage size: assume parameters were in the facts' dtype
            weight_bytes += int(round(f.params * (BYTES_PER_ELEMENT[dtype] - BYTES_PER_ELEMENT.get(f.compute_dtype, 4.0))))

    activation_bytes = _peak_activation_bytes(ir, scale_of)
    weight_bytes = max(0, weight_bytes)
    memory_reason = _memory_verdict(weight_bytes, activation_bytes, profile)
    return ModelCost(
        profile=profile.name,
        batch=batch,
        nodes=tuple(nodes),
        total_s=math.fsum(c.time_s for c in nodes),
        compute_bound_s=math.fsum(c.time_s for c in nodes if c.bound == "compute"),
        memory_bound_s=math.fsum(c.time_s for c in nodes if c.bound == "memory"),
        view_s=math.fsum(c.time_s for c in nodes if c.bound == "none"),
        unsupported=tuple(c for c in nodes if not c.supported),
        fits_memory=memory_reason is None,
        memory_reason=memory_reason,
        weight_bytes=weight_bytes,
        peak_activation_bytes=activation_bytes,
    )


def check_runnable(cost: ModelCost) -> None:
    """Raise `ProfileError` if the priced model cannot run on its target; return None if it can.

    The message names the first unsupported layers (up to 5) and what to do, then the memory
    problem, e.g. ``model cannot run on 'cortex-m7': 7 layer(s) in a dtype it cannot compute
    in: layer '_0' (Conv2d) computes in fp32; layer '_1' (ReLU) computes in fp32; ... and 2
    more; cortex-m7 runs only int8: quantize it (passes: quantize) or choose another target``.
    """
    if cost.runnable:
        return
    parts = []
    if cost.unsupported:
        listed = "; ".join(f"layer '{c.node}' ({c.op}) computes in {c.dtype}" for c in cost.unsupported[:_MAX_LISTED])
        more = len(cost.unsupported) - _MAX_LISTED
        tail = f"; and {more} more" if more > 0 else ""
        advice = (cost.unsupported[0].reason or "").partition(" but ")[2]
        parts.append(
            f"{len(cost.unsupported)} layer(s) in a dtype it cannot compute in: {listed}{tail}"
            + (f"; {advice}" if advice else "")
        )
    if cost.memory_reason:
        parts.append(f"does not fit memory: {cost.memory_reason}")
    raise ProfileError(f"model cannot run on '{cost.profile}': " + ". ".join(parts))
