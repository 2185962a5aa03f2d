"""effopt's IR: a `torch.fx.GraphModule` whose nodes carry typed cost facts.

The graph itself is plain torch.fx, so every fx tool (lint, recompile,
Interpreter, subgraph rewriting) works on it. What effopt adds lives in one
place per node, ``node.meta["effopt"]``, as a frozen `NodeFacts` written only by
`effopt.optimizer.ir.analysis.annotate`. Passes read facts through `facts(node)`
and never patch them: the pass manager re-annotates after every change, so a
pass's claimed savings cannot drift from what the cost model sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from effopt.errors import IRError

META_KEY = "effopt"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor flowing along an edge.

    >>> TensorSpec((1, 16, 8, 8), "float32").nbytes
    4096
    """

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class NodeFacts:
    """What one node costs, independent of any target.

    ``macs`` counts multiply-accumulates of conv/linear/matmul; ``flops`` counts
    every floating-point (or integer) operation, with 1 MAC = 2 FLOPs. Bytes
    count data moved if each node reads its inputs and weights from memory and
    writes its outputs back (views move nothing). A node whose cost effopt has
    no rule for is ``counted=False`` rather than guessed.

    A 3×3 conv, 1→5 channels, on 28×28 without padding:
    26·26·5 = 3,380 outputs × 9 MACs = 30,420 MACs = 60,840 FLOPs.
    """

    op_kind: str
    op: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    params: int
    macs: int
    flops: int
    bytes_read: int
    bytes_written: int
    counted: bool = True
    compute_dtype: str = "fp32"  # hardware-profile vocabulary: fp32, fp16, bf16, int8, int4 (see `profile_dtype`)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOPs per byte moved (0 when nothing moves)."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0


_PROFILE_DTYPES = {
    "float32": "fp32", "float64": "fp32", "float16": "fp16", "bfloat16": "bf16",
    "int8": "int8", "uint8": "int8", "qint8": "int8", "quint8": "int8", "int32": "int8",
}


def profile_dtype(torch_dtype: str) -> str:
    """The hardware-profile dtype a tensor of ``torch_dtype`` is computed in (``float32`` → ``fp32``).

    int32 maps to int8 because effopt only produces int32 as the accumulator of
    int8 products; integer index tensors (int64) are not compute and map to fp32.
    """
    return _PROFILE_DTYPES.get(torch_dtype, "fp32")


@dataclass(frozen=True)
class InputSpec:
    """One model input as the recipe declares it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic_batch: bool = False
    low: float | None = None
    high: float | None = None

    def example(self, generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
        """A random tensor of this spec; ``batch`` overrides dim 0.

        Floats are standard normal unless ``low``/``high`` bound them; integer
        inputs (token ids) are uniform in [low, high).
        """
        shape = list(self.shape)
        if batch is not None and shape:
            shape[0] = batch
        dtype = getattr(torch, self.dtype)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=generator)
            if self.low is not None and self.high is not None:
                t = torch.rand(shape, generator=generator) * (self.high - self.low) + self.low
            return t.to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).to(torch.bool)
        low = int(self.low) if self.low is not None else 0
        high = int(self.high) if self.high is not None else 2
        return torch.randint(low, high, shape, generator=generator, dtype=dtype)


@dataclass(frozen=True)
class CostTotals:
    """Whole-model totals; ``params`` and ``size_bytes`` count each tensor once."""

    params: int
    size_bytes: int
    macs: int
    flops: int
    bytes_moved: int
    nodes: int
    uncounted: tuple[str, ...]

    def delta(self, after: CostTotals) -> CostDelta:
        return CostDelta(
            params=after.params - self.params,
            size_bytes=after.size_bytes - self.size_bytes,
            macs=after.macs - self.macs,
            flops=after.flops - self.flops,
            bytes_moved=after.bytes_moved - self.bytes_moved,
            nodes=after.nodes - self.nodes,
        )


@dataclass(frozen=True)
class CostDelta:
    """after − before for each total; negative means the pass saved something."""

    params: int
    size_bytes: int
    macs: int
    flops: int
    bytes_moved: int
    nodes: int


@dataclass
class IR:
    """The model being compiled: graph module, declared inputs, example inputs.

    ``example_inputs`` are fixed random tensors drawn once from the recipe's
    seed; shape propagation runs on them, so every annotation of the same IR
    sees the same values.
    """

    gm: fx.GraphModule
    inputs: tuple[InputSpec, ...]
    example_inputs: tuple[torch.Tensor, ...]
    _names: set[str] = field(default_factory=set, repr=False)

    def compute_nodes(self) -> list[fx.Node]:
        """Nodes that compute something, in graph order."""
        return [n for n in self.gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]

    def fresh_name(self, prefix: str) -> str:
        """A submodule/attribute name not yet used in the module, like graphsurgeon's `_generate_name`.

        >>> # with 'fused' and 'fused_1' taken, fresh_name('fused') -> 'fused_2'
        """
        taken = {name for name, _ in self.gm.named_modules()} | {n for n, _ in self.gm.named_parameters()}
        taken |= {n for n, _ in self.gm.named_buffers()} | self._names
        candidate, i = prefix, 0
        while candidate in taken or hasattr(self.gm, candidate):
            i += 1
            candidate = f"{prefix}_{i}"
        self._names.add(candidate)
        return candidate

    def recompile(self) -> IR:
        self.gm.recompile()
        return self

    def lint(self) -> IR:
        self.gm.graph.lint()
        return self

    def module_of(self, node: fx.Node) -> torch.nn.Module:
        """The submodule a ``call_module`` node calls."""
        if node.op != "call_module":
            raise IRError(f"node '{node.name}' is a {node.op}, not a call_module")
        return self.gm.get_submodule(str(node.target))

    def set_submodule(self, target: str, module: torch.nn.Module) -> IR:
        """Put ``module`` at the dotted path ``target`` (replacing what is there)."""
        parent_name, _, attr = target.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        setattr(parent, attr, module)
        return self

    def users_of_module(self, target: str) -> list[fx.Node]:
        """Every node that calls the submodule at ``target`` (more than one means it is shared)."""
        return [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == target]


def facts(node: fx.Node) -> NodeFacts:
    """The cost facts of ``node``; raises `IRError` telling how to get them."""
    f = node.meta.get(META_KEY)
    if not isinstance(f, NodeFacts):
        raise IRError(
            f"node '{node.name}' ({node.op} {node.target}) has no effopt facts; "
            "run effopt.optimizer.ir.analysis.annotate(ir) after editing the graph"
        )
    return f


def has_facts(node: fx.Node) -> bool:
    return isinstance(node.meta.get(META_KEY), NodeFacts)
