"""What onnxruntime builds from a (quantized) ONNX file: which ops run on integers, which in float.

The file only says where Q/DQ pairs are; whether onnxruntime fused them into QLinearConv & co.
shows only in the graph it builds after optimization. `ort_fusion_report` saves that graph and
reads it back (`qdq_graph_report`), so a test or the report can prove the int8 placement worked.
Example (a conv-relu-add-maxpool-mean-linear model with a FakeQuant missing after the mean)::

    ort_fusion_report(Path("model.onnx")).summary()
    # 'int8: NhwcMaxPool 1, QLinearAdd 1, QLinearConv 2 | float: Gemm 1, ReduceMean 1 | Q 1, DQ 2, redundant 0'

The placements it was used to measure are tabulated in ``docs/quantization.md``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from effopt.errors import EmitError

__all__ = ["OrtFusion", "ort_fusion_report", "qdq_graph_report"]


# --- what onnxruntime builds ------------------------------------------------------------------

# Kernels that compute on 8-bit codes whatever their input dtype says (onnxruntime's contrib ops
# and the ONNX integer ops). Seen on this CPU: QLinearConv, QLinearAdd, QLinearMul,
# QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool, QLinearSigmoid, QLinearMatMul,
# QGemm, NhwcMaxPool, MatMulIntegerToFloat (dynamic quantization).
_INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearWhere", "QLinearConvTranspose", "QGemm", "QAttention", "QEmbedLayerNormalization", "NhwcMaxPool",
    "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
    "QuickGeluQuant", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
})
# Ops that only move or re-view data: they compute nothing, whatever the dtype.
_LAYOUT_OPS = frozenset({
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Gather",
    "Expand", "Cast", "Shape", "Size", "Constant", "ConstantOfShape", "ReorderInput", "ReorderOutput",
    "Dropout", "Tile", "Pad", "DepthToSpace", "SpaceToDepth",
})
# Ops whose output has their first input's element type.
_KEEPS_INPUT_TYPE = (_INTEGER_KERNELS | _LAYOUT_OPS | {"MaxPool", "GlobalMaxPool", "Concat", "Resize"}) - {
    "Shape", "Size", "Cast", "Constant", "ConstantOfShape", "MatMulInteger", "ConvInteger"}
_QUANTIZE_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
_DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})
_INT8_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})
_INT_OUT = {"MatMulInteger": onnx.TensorProto.INT32, "ConvInteger": onnx.TensorProto.INT32}
_FLOAT_OUT = frozenset({"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits"})
_INT8_COMPUTE_LEVEL = 4  # MatMulNBits accuracy_level 4: int8 input (quantized per block of K), int8 GEMM


@dataclass(frozen=True)
class OrtFusion:
    """Which ops of a (quantized) ONNX graph run on integers and which still run in float.

    Counts are sorted ``(op_type, count)`` tuples. ``int8_ops`` are integer kernels (QLinear*,
    QGemm, NhwcMaxPool, ...) and ordinary ops whose data input is 8-bit (e.g. a MaxPool on
    uint8); ``float_compute_ops`` are non-layout ops whose data input is float (Conv, Gemm,
    ReduceMean, Add, ...); layout ops (Transpose, Reshape, ...) are in neither.
    ``redundant_qdq`` pairs a DequantizeLinear with the QuantizeLinear it feeds directly when both
    use equal scale, zero point and axis: ``Q(DQ(q)) == q``, so the pair is pure overhead.

    Example (a conv-relu-add-maxpool-mean-linear model with a FakeQuant missing after the mean)::

        int8: NhwcMaxPool 1, QLinearAdd 1, QLinearConv 2 | float: Gemm 1, ReduceMean 1 | Q 1, DQ 2, redundant 0
    """

    op_counts: tuple[tuple[str, int], ...]
    int8_ops: tuple[tuple[str, int], ...]
    float_compute_ops: tuple[tuple[str, int], ...]
    float_compute_nodes: tuple[str, ...]  # "node_name (OpType)", graph order
    quantize_nodes: int
    dequantize_nodes: int
    redundant_qdq: tuple[tuple[str, str], ...]  # (DequantizeLinear name, QuantizeLinear name)

    @property
    def int8_op_count(self) -> int:
        return sum(n for _, n in self.int8_ops)

    @property
    def float_op_count(self) -> int:
        return sum(n for _, n in self.float_compute_ops)

    def summary(self) -> str:
        def fmt(counts: tuple[tuple[str, int], ...]) -> str:
            return ", ".join(f"{op} {n}" for op, n in counts) or "none"

        return (
            f"int8: {fmt(self.int8_ops)} | float: {fmt(self.float_compute_ops)} | "
            f"Q {self.quantize_nodes}, DQ {self.dequantize_nodes}, redundant {len(self.redundant_qdq)}"
        )


def ort_fusion_report(path: Path) -> OrtFusion:
    """`qdq_graph_report` of the graph onnxruntime builds from the file at ``path`` (CPU, ORT_ENABLE_ALL).

    This is the proof that Q/DQ placement worked: the file only says where Q/DQ pairs are, while
    the graph onnxruntime saves after optimization shows whether they became QLinearConv & co.
    The saved graph may hold hardware-specific NCHWc ops; it is only read, in a temp dir.

    Raises:
        EmitError: onnxruntime cannot load or optimize the file.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="effopt_ort_") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # the "hardware specific NCHWc" warning goes to stderr
        try:
            ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            model = onnx.load(str(optimized))
        except Exception as e:  # onnxruntime raises its own pybind types
            raise EmitError(f"{path}: onnxruntime cannot optimize the model: {e}; re-export it with export_onnx") from e
    return qdq_graph_report(model)


def qdq_graph_report(model: onnx.ModelProto) -> OrtFusion:
    """`OrtFusion` of ``model`` as it is (no onnxruntime): for a file, or an optimized graph."""
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    dtypes = _element_types(model)
    counts: Counter[str] = Counter()
    int8: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    float_nodes: list[str] = []
    producers = {out: node for node in graph.node for out in node.output}
    redundant: list[tuple[str, str]] = []
    for node in graph.node:
        op = node.op_type
        counts[op] += 1
        if op in _QUANTIZE_OPS:
            dq = producers.get(node.input[0])
            if op == "QuantizeLinear" and dq is not None and dq.op_type in _DEQUANTIZE_OPS and _same_qparams(dq, node, consts):
                redundant.append((dq.name, node.name))
            continue
        if op in _DEQUANTIZE_OPS or op in _LAYOUT_OPS:
            continue
        data_type = dtypes.get(node.input[0]) if node.input else None
        if op in _INTEGER_KERNELS or data_type in _INT8_TYPES or _int8_matmul_nbits(node):
            int8[op] += 1
        elif data_type in (None, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            floats[op] += 1
            float_nodes.append(f"{node.name} ({op})")
    return OrtFusion(
        op_counts=tuple(sorted(counts.items())),
        int8_ops=tuple(sorted(int8.items())),
        float_compute_ops=tuple(sorted(floats.items())),
        float_compute_nodes=tuple(float_nodes),
        quantize_nodes=sum(counts[op] for op in _QUANTIZE_OPS),
        dequantize_nodes=sum(counts[op] for op in _DEQUANTIZE_OPS),
        redundant_qdq=tuple(redundant),
    )


def _int8_matmul_nbits(node: onnx.NodeProto) -> bool:
    """A MatMulNBits that computes in int8 (``accuracy_level`` 4, onnxruntime's default for it).

    onnxruntime builds it from ``DQ(int8/int4 W const) → [Transpose →] MatMul`` with a float input,
    i.e. from a weight-only layer on 3-D input, and then quantizes that input itself (blockwise,
    32 values of K per scale): it is int8 compute, with other numerics than the torch model's.
    """
    level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
    return node.op_type == "MatMulNBits" and level == _INT8_COMPUTE_LEVEL


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, propagated in graph order (onnxruntime's saved value_info is stale).

    Rules: QuantizeLinear gives its zero point's type (uint8 without one); DequantizeLinear and
    every unknown op give float; integer kernels and layout ops keep their first input's type.
    """
    graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info]:
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        first = types.get(node.input[0]) if node.input else None
        op = node.op_type
        if op == "QuantizeLinear":
            attrs = {a.name: a for a in node.attribute}
            zero = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            out = zero or (attrs["output_dtype"].i if "output_dtype" in attrs else onnx.TensorProto.UINT8)
        elif op == "DynamicQuantizeLinear":
            out = onnx.TensorProto.UINT8
        elif op in _INT_OUT:
            out = _INT_OUT[op]
        elif op in _FLOAT_OUT or op in _DEQUANTIZE_OPS or (op == "QGemm" and len(node.input) < 9):
            out = onnx.TensorProto.FLOAT
        elif op == "Shape" or op == "Size":
            out = onnx.TensorProto.INT64
        elif op == "Cast":
            out = next(a.i for a in node.attribute if a.name == "to")
        elif op in _KEEPS_INPUT_TYPE:
            out = first or onnx.TensorProto.FLOAT
        else:  # float compute, or an op these rules do not know: trust value_info when it has the name
            for name in node.output:
                types.setdefault(name, onnx.TensorProto.FLOAT)
            continue
        for name in node.output:
            types[name] = out
    return types


def _same_qparams(dq: onnx.NodeProto, q: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> bool:
    """Equal scale, zero point (by value and type, not by name) and axis on a DQ and the Q it feeds."""
    a, b = _qparams(dq, consts), _qparams(q, consts)
    if a is None or b is None:
        return False
    (scale_a, zero_a, axis_a), (scale_b, zero_b, axis_b) = a, b
    per_tensor = scale_a.size == 1 and scale_b.size == 1
    return (
        scale_a.shape == scale_b.shape and np.array_equal(scale_a, scale_b)
        and zero_a.dtype == zero_b.dtype and np.array_equal(zero_a, zero_b)
        and (per_tensor or axis_a == axis_b)
    )


def _qparams(node: onnx.NodeProto, consts: Mapping[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scale, zero point, axis) of a Q/DQ node whose parameters are constants, else None.

    A missing zero point is a uint8 zero (the ONNX default without ``output_dtype``).
    """
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    has_zero = len(node.input) > 2 and bool(node.input[2])
    zero = consts.get(node.input[2]) if has_zero else None
    if scale is None or (has_zero and zero is None):
        return None
    zero_values = numpy_helper.to_array(zero) if zero is not None else np.zeros((), np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return numpy_helper.to_array(scale), zero_values, axis
