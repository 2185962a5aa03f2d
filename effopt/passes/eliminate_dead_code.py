"""Remove what does nothing at inference: dropout, identities, and values nobody uses.

In eval mode ``nn.Dropout``/``F.dropout(training=False)`` and ``nn.Identity``
return their input unchanged, so every use of their output can read the input
instead. Afterwards fx's dead-code elimination drops nodes whose results are
never used (it keeps impure ops such as in-place writes and asserts).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.ir.core import IR
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip

_IDENTITY_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


class EliminateDeadCodeOptions(PassOptions):
    """eliminate_dead_code has no options: removing no-ops and unused values is always exact."""


def _identity_reason(ir: IR, node: fx.Node) -> str | None:
    """Why ``node`` is an identity at inference, or None if it is not one."""
    if node.op == "call_module" and isinstance(ir.module_of(node), _IDENTITY_MODULES):
        return type(ir.module_of(node)).__name__
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return "functional dropout"
    return None


def _dropout_in_training(node: fx.Node) -> bool:
    """True unless a functional dropout is known to run with ``training=False``.

    A missing argument takes the function's own default, which differs:
    ``F.dropout(x)`` trains (default True), ``F.alpha_dropout(x)`` does not.
    A ``training`` computed in the graph is not known, so it counts as training.
    """
    default = inspect.signature(node.target).parameters["training"].default
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else default)
    return training is not False


class EliminateDeadCode(Pass):
    name: ClassVar[str] = "eliminate_dead_code"
    summary: ClassVar[str] = "Remove eval-mode dropout and identity ops, then nodes whose values are never used."
    Options = EliminateDeadCodeOptions

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed: list[str] = []
        skipped: list[Skip] = []
        graph = ir.gm.graph
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        for node in list(graph.nodes):
            if _identity_reason(ir, node) is None:
                continue
            source = node.args[0] if node.args else node.kwargs.get("input")
            if not isinstance(source, fx.Node):
                skipped.append(Skip(node.name, "its input is not a graph value"))
                continue
            if node.op == "call_function" and _dropout_in_training(node):
                skipped.append(Skip(node.name, "dropout is called with training=True, or a training flag that is "
                                               "not a literal False: it is not a no-op"))
                continue
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            changed.append(node.name)
        names_before = [n.name for n in graph.nodes]
        graph.eliminate_dead_code()
        alive = {n.name for n in graph.nodes}
        changed += [name for name in names_before if name not in alive]
        changed.sort(key=order.__getitem__)  # report in graph order, not in the order of the two sweeps
        return PassResult(ir, tuple(changed), tuple(skipped), {"removed": float(len(changed))})
