"""torch.fx tracing with errors a user can act on.

fx's own failures ("symbolically traced variables cannot be used as inputs to
control flow") say neither which submodule nor which line broke. `trace_module`
remembers which module the tracer was inside and which user source line raised,
and tells the user to list that module under ``model.leaf_modules`` so it is
kept as one opaque node (which it then really is: see `_LeafTracer`).
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from effopt.errors import TraceError

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


def trace_module(model: nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (in eval mode) into a GraphModule.

    ``leaf_modules`` entries are submodule paths (``layer1.gate``) or class
    names (``Gate``); those modules become single ``call_module`` nodes.
    The model is deep-copied, so the caller's module is never edited by passes.
    """
    model = copy.deepcopy(model).eval()
    leaf_paths, leaf_types = check_leaf_modules(model, leaf_modules)
    tracer = _LeafTracer(leaf_paths, leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in or ("", type(model).__name__)
        line = _user_frame(e)
        module_desc = f"module '{where[0]}' ({where[1]})" if where[0] else f"the top-level module ({where[1]})"
        hint = (
            f"add '{where[0]}' (or its class '{where[1]}') to model.leaf_modules in the recipe to keep it as one "
            "opaque node, or make its forward free of data-dependent Python control flow"
            if where[0]
            else "make the forward free of data-dependent Python control flow, or move that code into a "
            "submodule and list it in model.leaf_modules"
        )
        raise TraceError(
            f"torch.fx cannot trace {module_desc}{f' at {line}' if line else ''}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix: {hint}"
        ) from e
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def as_graph_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """An ExportedProgram as a plain GraphModule of aten ops (no re-tracing needed)."""
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise TraceError("the exported program's module() is not an fx.GraphModule; re-export with torch.export")
    return gm
