"""torch.fx tracing with errors a user can act on.

fx's own failures ("symbolically traced variables cannot be used as inputs to
control flow") say neither which submodule nor which line broke. `trace_module`
remembers which module the tracer was inside and which user source line raised,
and tells the user to list that module under ``model.leaf_modules`` so it is
kept as one opaque node (which it then really is: see `_LeafTracer`).

Models as people write them take flags: ``forward(self, x, embed=False)`` with
``if embed:`` inside. Given the number of declared inputs, `trace_module` binds
every later ``forward`` parameter that has a default to that default (fx
``concrete_args``) and removes fx's guards on them, so the graph takes exactly
the declared inputs: ``forward(self, x, embed=False, *, scale=1.0)`` with one
declared input traces as ``forward(self, x)`` with ``embed=False, scale=1.0``.
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from effopt.errors import FxTraceError, TraceError

_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps named submodules opaque and remembers where it is."""

    def __init__(self, leaf_paths: frozenset[str], leaf_types: frozenset[str]) -> None:
        super().__init__()
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types
        self.scope_stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None  # innermost module being traced when tracing failed
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or type(m).__name__ in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.scope_stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.scope_stack[-1]
            raise
        finally:
            self.scope_stack.pop()


def raise_if_interrupted(error: BaseException) -> None:
    """Raise the KeyboardInterrupt that ``error`` was raised while handling, if there is one.

    A Ctrl-C can land inside torch's own clean-up (a half-imported ``torch._dynamo``),
    which then fails with an unrelated error whose ``__context__`` is the interrupt,
    e.g. ``AttributeError: module 'torch._dynamo' has no attribute 'guards'``. That is
    the user stopping effopt, not an untraceable model, so it must stay an interrupt:
    call this first in every broad ``except`` that turns errors into effopt's own.
    """
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if any(e is s for s in seen):
            continue
        if isinstance(e, KeyboardInterrupt):
            raise e
        seen.append(e)
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]


def _user_frame(e: BaseException) -> str | None:
    """The deepest 'file:line' of the traceback that is not inside torch or effopt."""
    return user_line([(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)])


def user_line(frames: Sequence[tuple[str, int | None]]) -> str | None:
    """The last (file, line) outside torch and effopt, as 'relative/path.py:42'."""
    mine = [(f, n) for f, n in frames if not f.startswith(_SKIP_DIRS)]
    if not mine:
        return None
    f, n = mine[-1]
    rel = os.path.relpath(f) if not f.startswith("<") else f
    return f"{f if rel.startswith('..') else rel}:{n}"  # relative only when under the working folder


def check_leaf_modules(model: nn.Module, leaf_modules: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Split ``leaf_modules`` entries into module paths and class names; reject ones that match nothing."""
    paths = {name for name, _ in model.named_modules() if name}
    types = {type(m).__name__ for m in model.modules()}
    unknown = [e for e in leaf_modules if e not in paths and e not in types]
    if unknown:
        sample = ", ".join(sorted(paths)[:12])
        raise TraceError(
            f"model.leaf_modules: {unknown[0]!r} matches no submodule path or class name of "
            f"{type(model).__name__}; paths include: {sample}"
        )
    return frozenset(e for e in leaf_modules if e in paths), frozenset(e for e in leaf_modules if e in types)


def trace_module(model: nn.Module, leaf_modules: Sequence[str] = (), n_inputs: int | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (in eval mode) into a GraphModule.

    ``leaf_modules`` entries are submodule paths (``layer1.gate``) or class
    names (``Gate``); those modules become single ``call_module`` nodes.
    With ``n_inputs`` (the recipe's declared inputs), later ``forward``
    parameters with defaults are bound to them (`bound_defaults`).
    The model is deep-copied, so the caller's module is never edited by passes.
    Raises `FxTraceError` naming the module, the user's line and the fix.
    """
    model = copy.deepcopy(model).eval()
    leaf_paths, leaf_types = check_leaf_modules(model, leaf_modules)
    tracer = _LeafTracer(leaf_paths, leaf_types)
    bound = bound_defaults(model, n_inputs) if n_inputs is not None else {}
    try:
        with warnings.catch_warnings():  # fx warns that it cannot guard a bound enum or tensor: we drop guards anyway
            warnings.filterwarnings("ignore", message="Was not able to add assertion")
            graph = tracer.trace(model, concrete_args=bound or None)
    except Exception as e:
        raise_if_interrupted(e)
        where = tracer.failed_in or ("", type(model).__name__)
        module_desc = f"module '{where[0]}' ({where[1]})" if where[0] else f"the top-level module ({where[1]})"
        hint = (
            f"add '{where[0]}' (or its class '{where[1]}') to model.leaf_modules in the recipe to keep it as one "
            "opaque node, or make its forward free of data-dependent Python control flow"
            if where[0]
            else "make the forward free of data-dependent Python control flow, or move that code into a "
            "submodule and list it in model.leaf_modules"
        )
        raise FxTraceError(module_desc, _user_frame(e), _first_line(e), hint) from e
    if bound:
        _drop_bound_inputs(graph, n_inputs or 0, type(model).__name__)
    try:
        return fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as e:  # fx's code generation (a forward signature it cannot reproduce)
        raise_if_interrupted(e)
        raise FxTraceError(f"the top-level module ({type(model).__name__})", None, _first_line(e),
                           "give forward plain parameters (no *args/**kwargs)") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def bound_defaults(model: nn.Module, n_inputs: int) -> dict[str, object]:
    """``forward``'s parameters after the first ``n_inputs`` positional ones that have defaults, with them.

    They are flags and options (``embed=False``, ``mask: Optional[Tensor] = None``,
    keyword-only ``scale=1.0``), not data: the recipe declares the data inputs.
    Empty for a forward with ``*args``/``**kwargs``, which fx cannot specialise.

        >>> bound_defaults(Net(), 1)  # forward(self, x, embed=False, *, scale=1.0)
        {'embed': False, 'scale': 1.0}
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    later = positional[n_inputs:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return {p.name: p.default for p in later if p.default is not p.empty}


# What fx inserts to guard a bound argument: `eq` + `_assert`, or `_assert_is_none` for None.
_GUARDS = (operator.eq, torch._assert, fx._symbolic_trace._assert_is_none)


def _drop_bound_inputs(graph: fx.Graph, n_inputs: int, model_name: str) -> None:
    """Remove the placeholders fx made for bound arguments and its guards on them.

    fx keeps a bound argument as a placeholder with a default plus a guard
    (``_assert(embed == False)``); the IR must take exactly the declared inputs.
    Anything else reading such a placeholder means the value is really used:
    that is an `FxTraceError` (the caller can still try torch.export).
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    doomed = set(placeholders[n_inputs:])  # membership only; edits below walk the graph in order
    for node in graph.nodes:
        if node.op == "placeholder" or not any(a in doomed for a in node.all_input_nodes):
            continue
        if node.op != "call_function" or node.target not in _GUARDS:
            raise FxTraceError(f"the top-level module ({model_name})", None,
                               f"a bound forward argument is used as a value by node '{node.name}'",
                               "declare that argument as one of the recipe's inputs")
        doomed.add(node)
    defaults = [a for p in placeholders[n_inputs:] for a in p.all_input_nodes]  # get_attr of a tensor default
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            graph.erase_node(node)
    for node in defaults:
        if not node.users:
            graph.erase_node(node)
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):  # fx flattened args and outputs for the bound pytree args
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        out_spec = codegen.pytree_info.out_spec
        if out_spec is not None:
            output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)
        graph._codegen = fx.graph.CodeGen()
    graph.lint()


def as_graph_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """An ExportedProgram as a plain GraphModule of aten ops (no re-tracing needed)."""
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise TraceError("the exported program's module() is not an fx.GraphModule; re-export with torch.export")
    return gm
