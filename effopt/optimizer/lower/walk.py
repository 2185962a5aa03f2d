"""The graph walk shared by the lowerings of a quantized fx graph.

`effopt.optimizer.lower.integer.lowering` (an integer-only program) and
`effopt.optimizer.lower.torch_int8` (torch's x86 int8 kernels) both read a graph that
follows the quantized-graph contract of `effopt.optimizer.quant.schemes`, node by
node in graph order, and collect every problem instead of stopping at the first
one. What a node *means* under the contract is the same for both: a `FakeQuant`
module fixes the integer grid of the value it reads, a `QuantConv`/`QuantLinear`
is an int8 layer, every other call is dispatched on its canonical op kind. Only
what each lowering builds differs, so `QuantizedGraphWalk` owns the walk and the
dispatch and a lowering overrides the hooks::

    class _Lowering(QuantizedGraphWalk[_Value]):
        def placeholder(self, n): ...        # a model input
        def get_attr(self, n): ...           # a constant attribute
        def output(self, n): ...             # the graph output (no value of its own)
        def fake_quant(self, n, fq): ...     # rules 1-3: the quantizer after a value
        def weighted(self, n, mod): ...      # rule 2: a QuantConv / QuantLinear
        def other_op(self, n, kind): ...     # rules 3-5, e.g. kind == "add"

Problems are worded one way for both (`record_problem`), e.g.
``node 'fq_3' (FakeQuant) is not calibrated: ...``, so a user who tries both
targets reads the same node names and kinds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear

V = TypeVar("V")


def call_arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call_function/call_method node, given by keyword or at position ``pos``.

    Position 0 is the input (``self`` of a method), so for ``F.hardtanh(x, 0.0, 6.0)``
    ``call_arg(n, 2, "max_val", 1.0)`` is 6.0, and 1.0 for ``F.hardtanh(x)``. A name
    cannot be given both ways (Python rejects the call), so the order of the checks
    does not matter.
    """
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[pos] if len(n.args) > pos else default


class QuantizedGraphWalk(ABC, Generic[V]):
    """One walk over ``gm`` in graph order, keeping each node's lowered value of type ``V``.

    ``values`` maps every visited node (all but the output) to its value, so a hook
    reads its inputs' values with ``self.values[a]``: graph order guarantees they
    are there. ``problems`` collects every reason the graph cannot be lowered, so
    the caller can report them all at once instead of one per attempt.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.values: dict[fx.Node, V] = {}
        self.problems: list[str] = []

    def kind(self, n: fx.Node) -> str:
        """The canonical op kind (``"conv"``, ``"add"``, ...), the same for a module, function or method."""
        return canonical_op(n, self.gm)

    def module(self, n: fx.Node) -> nn.Module | None:
        """The submodule a ``call_module`` node calls; None for every other node."""
        return self.gm.get_submodule(str(n.target)) if n.op == "call_module" else None

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
        """The value of a call node: the contract's two module kinds first, then any other op by kind."""
        mod = self.module(n)
        if isinstance(mod, FakeQuant):
            return self.fake_quant(n, mod)
        if isinstance(mod, (QuantConv, QuantLinear)):
            return self.weighted(n, mod)
        return self.other_op(n, self.kind(n))

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
    def fake_quant(self, n: fx.Node, fq: FakeQuant) -> V:
        """The value of a `FakeQuant` call: the value it reads, stored on its integer grid."""

    @abstractmethod
    def weighted(self, n: fx.Node, mod: QuantConv | QuantLinear) -> V:
        """The value of a quantized conv/linear call (usually pending until its FakeQuant)."""

    @abstractmethod
    def other_op(self, n: fx.Node, kind: str) -> V:
        """The value of any other call node, ``kind`` being its canonical op kind."""
