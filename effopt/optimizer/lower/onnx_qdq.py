"""Quantized ONNX for onnxruntime: fold weight quantization and a few small QDQ rewrites.

A model quantized under the quantized-graph contract (`effopt.optimizer.quant.contract`) exports
(dynamo exporter, eval mode) as float ops between QuantizeLinear/DequantizeLinear (Q/DQ) pairs.
Two things are missing from that file:

- the weights are still float32: each is ``W → QuantizeLinear → Clip(−127, 127) → DQ`` (the
  Clip because effopt's weight range leaves out −128), which onnxruntime folds at every load,
  so the file is as big as the float one. `fold_weight_quantization` stores ``W_q`` (int8);
- a few exported ops have no int8 kernel in the form the exporter writes them (``ReduceMean``
  for a global average pool; a 2-D Linear with float output and a float bias);
  `reduce_mean_to_global_pool` and ``quantize_bias=True`` rewrite them.

Whether onnxruntime *really* runs the graph in int8 is only visible in the graph it builds:
`effopt.optimizer.lower.ort_fusion.ort_fusion_report` counts its int8 kernels and float ops.
Where Q/DQ must sit for it to fuse was measured placement by placement; the placement kinds are
the contract's, onnxruntime's own capabilities are `ORT_INT8_KINDS`, `FLOAT_KINDS` and
`activation_fuses` here, and the measurements (tables, speed and size) are in
``docs/quantization.md``.

`optimize_qdq_model` does all rewrites; ``export_onnx`` calls it on models with Q/DQ. Example
(a ResNet-18 for CIFAR; a 64×64×3×3 conv weight goes from 147,456 to 36,864 bytes)::

    model = optimize_qdq_model(onnx.load("model.onnx"))   # 44.7 MB -> 11.2 MB
    onnx.save(model, "model.onnx")
    ort_fusion_report(Path("model.onnx")).summary()
    # 'int8: QGemm 1, QLinearAdd 8, QLinearConv 20, QLinearGlobalAveragePool 1 | float: none | Q 1, DQ 0, redundant 0'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from effopt.optimizer.lower.onnx_graph import dequantize_source, keep_identity, name_allocator
from effopt.optimizer.quant.schemes import QScheme

__all__ = [
    "FLOAT_KINDS",
    "ORT_INT8_KINDS",
    "WeightFolding",
    "activation_fuses",
    "drop_conv_weight_zero_points",
    "fold_weight_quantization",
    "fold_weight_quantization_detailed",
    "optimize_qdq_model",
    "quantize_linear",
    "reduce_mean_to_global_pool",
]


# --- onnxruntime's capabilities (effopt canonical op kinds; measurements in docs/quantization.md) -----

ORT_INT8_KINDS: frozenset[str] = frozenset({
    "conv",               # QLinearConv (1-D, 2-D, depthwise); needs a FakeQuant on its output
    "linear",             # 2-D: QGemm; 3-D (MatMul + Add): MatMulIntegerToFloat + float Add
    "matmul",             # QLinearMatMul with an output FakeQuant, MatMulIntegerToFloat without
    "add",                # QLinearAdd (a relu between add and FakeQuant is absorbed)
    "mul",                # QLinearMul
    "cat",                # QLinearConcat (inputs may have different scales)
    "avg_pool",           # QLinearAveragePool
    "adaptive_avg_pool",  # QLinearGlobalAveragePool, only after `reduce_mean_to_global_pool`
    "mean",               # the same, for a mean over all spatial dims
    "sigmoid",            # QLinearSigmoid
    "leaky_relu",         # QLinearLeakyRelu
    "softmax",            # QLinearSoftmax
})
"""Kinds onnxruntime 1.32 (CPU) runs on int8 codes when every input is a FakeQuant output and the
result goes through exactly one FakeQuant (contract rules 2-3). sigmoid, leaky_relu and softmax
are onnxruntime's extras: the quantize pass leaves them in float (contract role ``"float"``)."""

FLOAT_KINDS: frozenset[str] = frozenset({"hardswish", "hardsigmoid", "silu", "gelu", "layer_norm"})
"""Kinds onnxruntime runs in float even between DQ and Q (measured); a FakeQuant before and after
them costs a DQ/Q pair each but keeps the neighbouring convs in int8. Any activation outside the
contract's ``FUSED_ACTIVATIONS`` needs a FakeQuant *before* it, or the conv itself falls back to
float (``conv → hardswish → FQ``)."""


def activation_fuses(lo: float, hi: float, scale: float, zero_point: int, scheme: QScheme) -> bool:
    """Whether onnxruntime drops a ``Clip(lo, hi)``/``Relu`` before a QuantizeLinear(scale, zero_point).

    ``(lo, hi)`` is the fused activation's range (`effopt.optimizer.quant.contract.activation_bounds`,
    one of the contract's ``FUSED_ACTIVATIONS``).

    onnxruntime's ClipQuantFusion/ReluQuantFusion remove the activation only when the quantized
    range ``[(qmin − z)·s, (qmax − z)·s]`` (float32) lies inside ``[lo, hi]`` (within float32 eps);
    otherwise the activation stays and the conv before it runs in float. Examples (uint8):
    relu6 with min/max calibration over [0, 6] gives s = 6/255, z = 0 → range [0, 6] → True;
    a learned scale of 10/255 → [0, 10] → False; hardtanh(−1, 1) with s = 2/255, z = 128 →
    [−1.0039, 0.996] → False (use s = 1/128, z = 128 → [−1, 0.992] → True).
    """
    s = np.float32(scale)
    lower = np.float32(s * np.float32(scheme.qmin - zero_point))
    upper = np.float32(s * np.float32(scheme.qmax - zero_point))
    eps = np.finfo(np.float32).eps
    return bool(lo - lower <= eps and upper - hi <= eps)


# --- numerics ---------------------------------------------------------------------------------

# QuantizeLinear output types that are folded, and their numpy dtypes.
_FOLDABLE_TYPES: dict[int, type[np.integer]] = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16,
}


def quantize_linear(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, dtype: type[np.integer]
) -> np.ndarray:
    """ONNX ``QuantizeLinear`` on float32 ``x``: ``saturate(round_half_even(x / scale) + zero_point)``.

    The division is done in float32, as onnxruntime's MLAS kernel does (``x / s``, not
    ``x · (1/s)``), so the codes equal what onnxruntime computes when it folds the node at load
    time. ``scale`` is a scalar (per tensor) or 1-D along ``axis`` (per channel).

    >>> quantize_linear(np.array([0.25, 0.75, -1.0, 300.0], np.float32), np.float32(0.5), np.int8(0), 1, np.int8)
    array([  0,   2,  -2, 127], dtype=int8)

    (0.25/0.5 = 0.5 rounds to even 0; 0.75/0.5 = 1.5 rounds to 2; 600 saturates at 127.)
    """
    info = np.iinfo(dtype)
    scale = np.asarray(scale, np.float32)
    zero = np.zeros((), np.float64) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if scale.size > 1 or (scale.ndim == 1 and x.ndim > 0):
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.ndim else zero
    quotient = np.asarray(x, np.float32) / scale  # float32 division, like MLAS
    codes = np.rint(quotient.astype(np.float64)) + zero
    return np.clip(codes, info.min, info.max).astype(dtype)


# --- weight folding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFolding:
    """What `fold_weight_quantization_detailed` did.

    ``folded`` names each integer initializer it wrote; ``skipped`` pairs a node name with why
    it was left alone, e.g. ``("q_w", "float16 weight / float16 scale: only float32 is folded")``
    (a QuantizeLinear on an activation is never a candidate, so it is not listed).
    ``float_bytes``/``int_bytes`` are the initializer bytes before and after: a ResNet-18
    goes from 44.7 MB to 11.2 MB.
    """

    model: onnx.ModelProto
    folded: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    float_bytes: int
    int_bytes: int


def optimize_qdq_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every rewrite here, for a model that holds Q/DQ: fold the weights, int32 biases, int8 pools.

    What ``export_onnx`` should call on a quantized model. A model without Q/DQ comes back
    unchanged in meaning (the rewrites only match dequantized tensors).
    """
    return drop_conv_weight_zero_points(reduce_mean_to_global_pool(fold_weight_quantization(model, quantize_bias=True)))


def drop_conv_weight_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the all-zero zero points of symmetric int8 conv weights.

    ONNX's default zero point for DequantizeLinear is 0 of the input's type, so the input is
    redundant; one per layer (int8 per output channel plus its node input) is a few percent
    of a small model's file. Only where every reader is a Conv: measured with onnxruntime
    1.32, a Conv still fuses into QLinearConv without it, but a Gemm whose weight has no
    zero point stays a float Gemm instead of becoming QGemm.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        codes, zero_point = constants.get(node.input[0]), constants.get(node.input[2])
        if codes is None or zero_point is None or codes.data_type != onnx.TensorProto.INT8:
            continue
        consumers = readers.get(node.output[0], [])
        conv_only = bool(consumers) and all(r.op_type == "Conv" for r in consumers)
        if conv_only and not onnx.numpy_helper.to_array(zero_point).any():
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def fold_weight_quantization(model: onnx.ModelProto, quantize_bias: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` where every constant ``W → QuantizeLinear → [Clip] → DequantizeLinear``
    chain reads an integer initializer: ``W_q → DequantizeLinear``.

    Why: the dynamo exporter writes a fake-quantized weight as QuantizeLinear (int8, saturating
    at −128) followed by ``Clip(−127, 127)`` (effopt's symmetric weight range) on the float
    weight, and does not fold it, so the file keeps float32 weights (no size win) and
    onnxruntime folds them at every load. Folding here gives the same codes (see
    `quantize_linear`), so onnxruntime's outputs are bit-identical, and the weights take 1 byte
    instead of 4. Example: a 64×64×3×3 conv weight goes from 147,456 bytes to 36,864 bytes.
    Nodes stay in topological order and the bytes are deterministic.

    With ``quantize_bias`` the float bias of a Conv/Gemm that reads dequantized input and
    weights becomes ``DequantizeLinear(int32 b_q, s_x·s_w)`` (see `_quantize_bias`). For convs
    that changes nothing in onnxruntime (it does the same at load, bit for bit) and adds one
    scale vector per layer (~0.1% of the file); for a Linear whose output stays float (logits)
    it is what lets onnxruntime pick QGemm instead of a float Gemm.
    """
    return fold_weight_quantization_detailed(model, quantize_bias).model


def fold_weight_quantization_detailed(model: onnx.ModelProto, quantize_bias: bool = False) -> WeightFolding:
    """`fold_weight_quantization` plus which initializers were folded and which chains were not."""
    graph = gs.import_onnx(model)
    graph.toposort()
    float_bytes = _initializer_bytes(model)
    folded: list[gs.Constant] = []
    skipped: list[tuple[str, str]] = []
    for node in list(graph.nodes):
        if node.op == "QuantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            reason = _fold_quantize(graph, node, folded)
            if reason:
                skipped.append((node.name, reason))
        elif node.op == "Clip" and node.inputs and any(node.inputs[0] is t for t in folded):
            reason = _fold_clip(graph, node, folded)
            if reason:
                skipped.append((node.name, reason))
    if quantize_bias:
        fresh = name_allocator(graph)
        for node in list(graph.nodes):
            if node.op in ("Conv", "Gemm"):
                reason = _quantize_bias(graph, node, fresh)
                if reason:
                    skipped.append((node.name, reason))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    keep_identity(model, out)
    names = tuple(t.name for t in folded if t.outputs)  # the ones still used after Clip folding
    return WeightFolding(out, names, tuple(skipped), float_bytes, _initializer_bytes(out))


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where a dequantized ``ReduceMean`` over all spatial axes is a ``GlobalAveragePool``.

    Why: the dynamo exporter writes ``AdaptiveAvgPool2d(1)`` and ``x.mean((2, 3))`` as
    ReduceMean, which onnxruntime only runs in float (DQ → ReduceMean → Q), while
    ``DQ → GlobalAveragePool → Q`` becomes QLinearGlobalAveragePool. Only a ReduceMean whose
    input comes from a DequantizeLinear and whose axes are exactly ``2..rank-1`` is rewritten;
    ``keepdims=0`` adds a ``Flatten(axis=1)`` ([N, C, 1, 1] → [N, C]). E.g. ReduceMean(axes=[2, 3],
    keepdims=1) on [N, 512, 4, 4] becomes GlobalAveragePool with the same [N, 512, 1, 1] output.
    The input's rank comes from ONNX shape inference (exported files carry no ``value_info``).
    """
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    fresh = name_allocator(graph)
    for node in list(graph.nodes):
        axes = _global_mean_axes(node)
        if axes is None:
            continue
        x = node.inputs[0]
        if not x.inputs or x.inputs[0].op != "DequantizeLinear" or x.shape is None:
            continue
        rank = len(x.shape)
        if rank < 3 or sorted(a % rank for a in axes) != list(range(2, rank)):
            continue
        keep = int(node.attrs.get("keepdims", 1))
        node.op = "GlobalAveragePool"
        node.attrs = {}
        while len(node.inputs) > 1:
            node.inputs.pop()
        if not keep:
            _flatten_after(graph, node, fresh)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out_model = gs.export_onnx(graph)
    keep_identity(model, out_model)
    return out_model


def _flatten_after(graph: gs.Graph, pool: gs.Node, fresh: Callable[[str], str]) -> None:
    """Restore ``keepdims=0`` after ``pool`` with a ``Flatten(axis=1)``, after its QuantizeLinear when it has one.

    ``GAP → Q → Flatten → DQ`` keeps the pool next to its Q (so it fuses) and flattens the
    uint8 codes; ``GAP → Flatten → Q`` would leave the pool in float. Moving the Flatten past a
    per-tensor Q is exact: quantization is elementwise.
    """
    out = pool.outputs[0]
    pooled = gs.Variable(fresh(f"{out.name}_pooled"), dtype=out.dtype)
    pool.outputs[0] = pooled
    consumers = list(out.outputs)
    q = consumers[0] if len(consumers) == 1 else None
    if (q is not None and q.op == "QuantizeLinear" and out not in graph.outputs
            and isinstance(q.inputs[1], gs.Constant) and q.inputs[1].values.size == 1):
        q.inputs[0] = pooled
        codes = q.outputs[0]
        codes_pooled = gs.Variable(fresh(f"{codes.name}_pooled"), dtype=codes.dtype)
        q.outputs[0] = codes_pooled
        graph.nodes.append(gs.Node("Flatten", fresh(f"{pool.name}_flatten"), {"axis": 1}, [codes_pooled], [codes]))
        return
    graph.nodes.append(gs.Node("Flatten", fresh(f"{pool.name}_flatten"), {"axis": 1}, [pooled], [out]))


def _global_mean_axes(node: gs.Node) -> list[int] | None:
    """The constant axes of a ReduceMean (attribute before opset 18, input from 18), else None."""
    if node.op != "ReduceMean":
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in node.inputs[1].values.reshape(-1)]
    return None


def _fold_quantize(graph: gs.Graph, node: gs.Node, folded: list[gs.Constant]) -> str:
    """Replace ``node`` (QuantizeLinear on a constant) by an integer constant; '' or why not."""
    x = node.inputs[0]
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zero = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if not isinstance(scale, gs.Constant) or (zero is not None and not isinstance(zero, gs.Constant)):
        return "scale or zero point is not a constant"
    if x.values.dtype != np.float32 or scale.values.dtype != np.float32:
        return f"{x.values.dtype} weight / {scale.values.dtype} scale: only float32 is folded"
    if int(node.attrs.get("block_size", 0)) != 0:
        return "blocked quantization (block_size) is not folded"
    onnx_dtype = _quantize_output_dtype(node, zero)
    if onnx_dtype not in _FOLDABLE_TYPES:
        return f"output type {onnx.TensorProto.DataType.Name(onnx_dtype)} is not folded (8/16-bit integers only)"
    if not np.all(np.isfinite(x.values)):
        return f"weight {x.name!r} has NaN/inf values"
    out = node.outputs[0]
    if out in graph.outputs:
        return f"output {out.name!r} is a graph output"
    axis = int(node.attrs.get("axis", 1))
    axis = axis + x.values.ndim if axis < 0 else axis
    np_dtype = _FOLDABLE_TYPES[onnx_dtype]
    codes = quantize_linear(x.values, scale.values, None if zero is None else zero.values, axis, np_dtype)
    name = x.name if len(x.outputs) == 1 else out.name  # the weight keeps its name when only Q read it
    _replace_with_constant(node, out, codes, name)
    folded.append(out)
    return ""


def _fold_clip(graph: gs.Graph, node: gs.Node, folded: list[gs.Constant]) -> str:
    """Fold ``Clip(codes, lo, hi)`` on codes that `_fold_quantize` produced; '' or why not."""
    src = node.inputs[0]
    bounds = []
    for i in (1, 2):
        t = node.inputs[i] if len(node.inputs) > i else None
        if t is None or t.is_empty():
            bounds.append(None)
        elif isinstance(t, gs.Constant):
            bounds.append(t.values)
        else:
            return "Clip bounds are not constants"
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11 form
        bounds = [node.attrs.get("min"), node.attrs.get("max")]
    out = node.outputs[0]
    if out in graph.outputs:
        return f"output {out.name!r} is a graph output"
    values = src.values
    lo = np.iinfo(values.dtype).min if bounds[0] is None else bounds[0]
    hi = np.iinfo(values.dtype).max if bounds[1] is None else bounds[1]
    clipped = np.clip(values, lo, hi).astype(values.dtype)
    sole_reader = len(src.outputs) == 1
    name = src.name if sole_reader else out.name
    if sole_reader:
        src.name = f"{src.name}__unclipped"  # orphaned below; frees the name for the result
    _replace_with_constant(node, out, clipped, name)
    folded.append(out)
    return ""


def _quantize_bias(graph: gs.Graph, node: gs.Node, fresh: Callable[[str], str]) -> str:
    """Feed ``node``'s float bias through ``DequantizeLinear(int32 b_q, s_x·s_w)``; '' or why not.

    The arithmetic is onnxruntime's WeightBiasQuantization (float32 ``s_x · s_w``, float32
    division, round half to even), so where onnxruntime would quantize the bias itself the codes,
    and the outputs, are identical. E.g. b = 0.3, s_x = 0.02, s_w = 0.005 → b_q = 3000.
    """
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return ""  # no bias: nothing to do, not a skip
    x, w, b = node.inputs[0], node.inputs[1], node.inputs[2]
    x = dequantize_source(x)  # onnxruntime moves the DQ past layout ops
    dq_x = x.inputs[0] if x.inputs else None
    dq_w = w.inputs[0] if w.inputs else None
    if dq_x is None or dq_x.op != "DequantizeLinear" or dq_w is None or dq_w.op != "DequantizeLinear":
        return "bias left float: input or weight is not dequantized"
    s_x, s_w = dq_x.inputs[1], dq_w.inputs[1]
    if not (isinstance(s_x, gs.Constant) and isinstance(s_w, gs.Constant) and isinstance(dq_w.inputs[0], gs.Constant)):
        return "bias left float: scales or weight codes are not constants"
    bias = b.values
    if s_x.values.size != 1 or bias.dtype != np.float32 or bias.ndim != 1:
        return "bias left float: needs a per-tensor input scale and a 1-D float32 bias"
    expected_axis = 0 if node.op == "Conv" or int(node.attrs.get("transB", 0)) == 1 else 1
    weight_axis = int(dq_w.attrs.get("axis", 1)) % max(dq_w.inputs[0].values.ndim, 1)
    if s_w.values.size != 1 and (s_w.values.size != bias.size or weight_axis != expected_axis):
        return "bias left float: weight scales are not per output channel"
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return "bias left float: Gemm beta != 1"
    scale = (np.float32(s_x.values.reshape(())) * s_w.values.astype(np.float32).reshape(-1)).astype(np.float32)
    codes = np.rint((bias / scale).astype(np.float32).astype(np.float64))
    codes = np.clip(codes, -(2**31), 2**31 - 1).astype(np.int32)
    scale_c = gs.Constant(fresh(f"{b.name}_scale"), scale if scale.size > 1 else scale.reshape(()))
    codes_c = gs.Constant(fresh(f"{b.name}_int32"), codes)
    out = gs.Variable(fresh(f"{b.name}_dequantized"), dtype=np.float32, shape=list(bias.shape))
    attrs = {"axis": 0} if scale.size > 1 else {}
    dq = gs.Node("DequantizeLinear", fresh(f"{node.name}_bias_dq"), attrs, [codes_c, scale_c], [out])
    node.inputs[2] = out
    graph.nodes.append(dq)
    return ""


def _replace_with_constant(node: gs.Node, out: gs.Variable, values: np.ndarray, name: str) -> None:
    """Turn ``node``'s output into a constant called ``name`` and disconnect ``node``."""
    node.inputs.clear()
    node.outputs.clear()
    out.to_constant(values)
    out.name = name


def _quantize_output_dtype(node: gs.Node, zero: gs.Constant | None) -> int:
    """The element type of a QuantizeLinear's output: the zero point's, else ``output_dtype``, else uint8."""
    if zero is not None:
        return onnx.helper.np_dtype_to_tensor_dtype(zero.values.dtype)
    return int(node.attrs.get("output_dtype", 0)) or onnx.TensorProto.UINT8


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
