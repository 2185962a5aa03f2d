"""Small helpers the ONNX rewrites share (`onnx_qdq`, `onnx_dynamic`): names, identity, Q/DQ reach.

Each rewrite imports a model into onnx-graphsurgeon, edits it and exports it again; these keep
that round trip deterministic and faithful. Example::

    graph = gs.import_onnx(model)
    fresh = name_allocator(graph)          # fresh("fc_scale") -> "fc_scale", then "fc_scale_1", ...
    ...                                    # add nodes named with fresh(...)
    out = gs.export_onnx(graph)
    keep_identity(model, out)              # producer name/version and IR version as in `model`
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_graphsurgeon as gs

__all__ = ["SCALE_PRESERVING_OPS", "dequantize_source", "is_dequantized", "keep_identity", "name_allocator"]

SCALE_PRESERVING_OPS: frozenset[str] = frozenset(
    {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool"}
)
"""Ops a per-tensor DequantizeLinear commutes with: onnxruntime's QDQ propagation moves it past them
(the ONNX form of the contract's pass-through kinds)."""


def name_allocator(graph: gs.Graph) -> Callable[[str], str]:
    """``fresh(prefix)``: ``prefix``, or ``prefix_1``, ``prefix_2``, ... if a tensor or node has it."""
    taken = set(graph.tensors()) | {node.name for node in graph.nodes}

    def fresh(prefix: str) -> str:
        name, i = prefix, 0
        while name in taken:
            i += 1
            name = f"{prefix}_{i}"
        taken.add(name)
        return name

    return fresh


def keep_identity(source: onnx.ModelProto, target: onnx.ModelProto) -> onnx.ModelProto:
    """gs.export_onnx rebuilds the model; copy the source's identity fields onto ``target`` (returned)."""
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.ir_version = source.ir_version
    return target


def dequantize_source(x: gs.Tensor) -> gs.Tensor:
    """``x`` itself, or the tensor before a chain of `SCALE_PRESERVING_OPS` that produced it."""
    while x.inputs and x.inputs[0].op in SCALE_PRESERVING_OPS:
        x = x.inputs[0].inputs[0]
    return x


def is_dequantized(x: gs.Tensor) -> bool:
    """Whether ``x`` is a DequantizeLinear output, possibly through `SCALE_PRESERVING_OPS`."""
    x = dequantize_source(x)
    return bool(x.inputs) and x.inputs[0].op == "DequantizeLinear"
