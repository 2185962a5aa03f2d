"""The graph walk shared by the lowerings of a quantized fx graph.

`effopt.optimizer.lower.integer` (an integer-only program) and `effopt.optimizer.lower.torch_int8`
(torch's x86 int8 kernels) both read a graph that follows the quantized-graph contract
(`effopt.optimizer.quant.contract`), node by node in graph order, and collect every problem
instead of stopping at the first one. What a node *means* under the contract is the same for
both, so `QuantizedGraphWalk` owns it:

- the dispatch: a `FakeQuant` module fixes the integer grid of the value it reads, a
  `QuantConv`/`QuantLinear` is an int8 layer, every other call goes by its canonical op kind;
- the sites: a hook that lowers an integer op returns a `Pending` (its output grid is not known
  yet); the walk matches its site ``op → [activation] → FakeQuant`` with `match_site`, records
  the contract's `Mismatch` if there is none, folds the activation into the `Pending` (the
  lowering never sees it) and hands the `Pending` to the lowering's `fake_quant` hook, which
  builds it with the FakeQuant's scale and zero point and the site's `Bounds`;
- shapes: read from the IR's facts (`effopt.optimizer.ir.core.facts`), annotating the graph
  first if it has none.

Only what each lowering builds differs; a lowering overrides the hooks::

    class _Lowering(QuantizedGraphWalk[_Value]):
        def placeholder(self, n): ...        # a model input
        def get_attr(self, n): ...           # a constant attribute
        def output(self, n): ...             # the graph output (no value of its own)
        def problem(self, n, kind, what): ...  # record a problem; the value of a broken node
        def fake_quant(self, n, fq): ...     # a FakeQuant; builds a Pending that reaches it
        def weighted(self, n, mod): ...      # a QuantConv / QuantLinear, usually a Pending
        def other_op(self, n, kind): ...     # any other call, e.g. kind == "add"

Problems are worded one way for both (`record_problem`), e.g.
``node 'fq_3' (FakeQuant) is not calibrated: ...``, so a user who tries both targets reads the
same node names and kinds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import annotate, canonical_op
from effopt.optimizer.ir.core import IR, InputSpec, TensorSpec, facts, has_facts
from effopt.optimizer.quant.contract import SPLIT_KINDS, Mismatch, Site, match_site
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear

V = TypeVar("V")

_CALLS = ("call_module", "call_function", "call_method")


@dataclass
class Pending:
    """An integer op whose output grid is the FakeQuant's after it (contract rules 2-3).

    ``build`` is the lowering's own builder (called from its `fake_quant` hook with that
    FakeQuant's parameters); ``site`` is filled in by the walk once `match_site` found the
    FakeQuant and the fused activation, e.g. ``conv → relu → q`` with bounds (0, inf).
    """

    node: fx.Node
    kind: str
    build: Callable[..., Any]
    site: Site | None = None


def ensure_facts(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """``gm`` with facts on every compute node: as it is when it has them, else annotated with ``example_inputs``.

    The compiler lowers an IR the pass manager has annotated; a hand-built graph (tests, notebooks)
    is annotated here, which writes ``node.meta["effopt"]`` and nothing else. Returns ``gm``.
    """
    if all(has_facts(n) for n in gm.graph.nodes if n.op in _CALLS):
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = tuple(InputSpec(p.name, tuple(x.shape), str(x.dtype).removeprefix("torch."))
                  for p, x in zip(placeholders, example_inputs))
    annotate(IR(gm, specs, tuple(example_inputs)))
    return gm


class QuantizedGraphWalk(ABC, Generic[V]):
    """One walk over ``gm`` in graph order, keeping each node's lowered value of type ``V``.

    ``values`` maps every visited node (all but the output) to its value, so a hook
    reads its inputs' values with ``self.values[a]``: graph order guarantees they
    are there. ``problems`` collects every reason the graph cannot be lowered, so
    the caller can report them all at once instead of one per attempt.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
        self.gm = ensure_facts(gm, example_inputs)
        self.values: dict[fx.Node, V] = {}
        self.problems: list[str] = []
        self.fused: dict[fx.Node, Pending] = {}  # a site's activation → its op's Pending
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_specs = {p: TensorSpec.of(x) for p, x in zip(placeholders, example_inputs)}

    def kind(self, n: fx.Node) -> str:
        """The canonical op kind (``"conv"``, ``"add"``, ...), the same for a module, function or method."""
        return canonical_op(n, self.gm)

    def module(self, n: fx.Node) -> nn.Module | None:
        """The submodule a ``call_module`` node calls; None for every other node."""
        return self.gm.get_submodule(str(n.target)) if n.op == "call_module" else None

    def output_specs(self, n: fx.Node) -> tuple[TensorSpec, ...]:
        """Every tensor ``n`` yields, from its facts (a model input: its example; a size or attribute: none)."""
        if n.op == "placeholder":
            return (self.input_specs[n],) if n in self.input_specs else ()
        return facts(n).outputs if n.op in _CALLS else ()

    def tensor_shape(self, n: fx.Node) -> tuple[int, ...] | None:
        """The shape (batch first) of the one tensor ``n`` yields; None for a size, a constant or a split's tuple."""
        specs = self.output_specs(n)
        if len(specs) != 1 or (n.op in _CALLS and self.kind(n) in SPLIT_KINDS):
            return None
        return specs[0].shape

    def record_problem(self, n: fx.Node, kind: str, what: str) -> None:
        """Note that ``n`` cannot be lowered; ``what`` finishes the sentence and says what to do."""
        self.problems.append(f"node '{n.name}' ({kind}) {what}")

    def run(self) -> None:
        """Visit every node once, in order; afterwards ``problems`` is empty exactly when lowering worked."""
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.values[n] = self.placeholder(n)
            elif n.op == "get_attr":
                self.values[n] = self.get_attr(n)
            elif n.op == "output":
                self.output(n)
            else:
                self.values[n] = self.compute(n)

    def compute(self, n: fx.Node) -> V:
        """The value of a call node: a FakeQuant, a site's fused activation, a quantized layer, any other op."""
        mod = self.module(n)
        if isinstance(mod, FakeQuant):
            return self.fake_quant(n, mod)
        if n in self.fused:
            return self.fused[n]  # type: ignore[return-value]  # folded into its op: built at the FakeQuant
        if isinstance(mod, (QuantConv, QuantLinear)):
            value = self.weighted(n, mod)
        else:
            value = self.other_op(n, self.kind(n))
        return self._site(value) if isinstance(value, Pending) else value

    def _site(self, p: Pending) -> V:
        """Attach ``p``'s site, or record why it has none (one wording for every lowering)."""
        if not p.node.users:
            return p  # type: ignore[return-value]  # dead code: nothing builds it
        site = match_site(p.node, self.gm)
        if isinstance(site, Mismatch):
            return self.problem(site.node, site.kind, site.what)
        p.site = site
        if site.activation is not None:
            self.fused[site.activation] = p
        return p  # type: ignore[return-value]

    # hooks ---------------------------------------------------------------------------------------------
    @abstractmethod
    def placeholder(self, n: fx.Node) -> V:
        """The value of a model input."""

    @abstractmethod
    def get_attr(self, n: fx.Node) -> V:
        """The value of a constant attribute of ``gm``."""

    @abstractmethod
    def output(self, n: fx.Node) -> None:
        """Finish the lowered program at the graph output (its values are all in ``values``)."""

    @abstractmethod
    def problem(self, n: fx.Node, kind: str, what: str) -> V:
        """`record_problem`, then the value of a node that cannot be lowered (its users stay quiet about it)."""

    @abstractmethod
    def fake_quant(self, n: fx.Node, fq: FakeQuant) -> V:
        """The value of a `FakeQuant` call: the value it reads, stored on its integer grid
        (for a `Pending`, the op built with this FakeQuant's parameters)."""

    @abstractmethod
    def weighted(self, n: fx.Node, mod: QuantConv | QuantLinear) -> V | Pending:
        """The value of a quantized conv/linear call (usually a `Pending` until its FakeQuant)."""

    @abstractmethod
    def other_op(self, n: fx.Node, kind: str) -> V | Pending:
        """The value of any other call node, ``kind`` being its canonical op kind."""
