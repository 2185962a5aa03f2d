"""Quantized ONNX for onnxruntime: fold weight quantization, small QDQ rewrites, and proof of fusion.

A model quantized under quantization.py's contract exports (dynamo exporter, eval mode) as
float ops between QuantizeLinear/DequantizeLinear (Q/DQ) pairs. Two things are missing from
that file, and one question is open:

- the weights are still float32: each is ``W → QuantizeLinear → Clip(−127, 127) → DQ`` (the
  Clip because effopt's weight range leaves out −128), which onnxruntime folds at every load,
  so the file is as big as the float one. `fold_weight_quantization` stores ``W_q`` (int8);
- a few exported ops have no int8 kernel in the form the exporter writes them (``ReduceMean``
  for a global average pool; a 2-D Linear with float output and a float bias);
  `reduce_mean_to_global_pool` and ``quantize_bias=True`` rewrite them;
- whether onnxruntime *really* runs the graph in int8 is only visible in the graph it builds:
  `ort_fusion_report` saves onnxruntime's optimized graph and counts int8 kernels, float compute
  ops and needless Q/DQ pairs.

`optimize_qdq_model` does all rewrites; ``export_onnx`` should call it on models with Q/DQ.
Example (ResNet-18, CIFAR, measured below)::

    model = optimize_qdq_model(onnx.load("model.onnx"))   # 44.7 MB -> 11.2 MB
    onnx.save(model, "model.onnx")
    ort_fusion_report(Path("model.onnx")).summary()
    # 'int8: QGemm 1, QLinearAdd 8, QLinearConv 20, QLinearGlobalAveragePool 1 | float: none | Q 1, DQ 0, redundant 0'

Findings: where Q/DQ must sit for onnxruntime to fuse
-----------------------------------------------------
onnxruntime 1.32.0, CPU EP, ORT_ENABLE_ALL, AMD EPYC (Zen 4, AVX-512 VNNI), opset 20 from the
torch 2.13 dynamo exporter; FakeQuant = FQ (uint8 asymmetric per tensor), weights int8
symmetric per channel. Each row is a small model placed by hand, exported, folded, and read
back with `ort_fusion_report`.

=============================================  ========================================  ===========
placement (torch)                              onnxruntime's graph                       verdict
=============================================  ========================================  ===========
FQ → conv(+bias) → relu → FQ                   QLinearConv (NHWC; Transposes only at      int8
                                               the edges of the int8 region)
conv without bias / no activation / depthwise  QLinearConv                                int8
/ conv1d, each → FQ
conv → relu6 or hardtanh(0, 6) → FQ            QLinearConv, the Clip removed -- only if   int8 if
                                               the FQ range lies inside [0, 6]            in range
  same, FQ range [0, 10] (e.g. learned scale)  FusedConv in float + Q/DQ                  float
  hardtanh(−1, 1), FQ s=2/255 z=128            FusedConv float ([−1.004, 0.996] ⊄         float
                                               [−1, 1]); s=1/128 z=128 → QLinearConv
conv → relu with no FQ after (float out)       DQ → FusedConv (float)                     float
no FQ on the model input                       the first Conv in float                    float
FQ(a) + FQ(b) → [relu] → FQ                    QLinearAdd (relu absorbed)                 int8
cat([FQ, FQ]) → FQ (different scales)          QLinearConcat                              int8
FQ → max_pool, no FQ → conv                    NhwcMaxPool → QLinearConv                  int8
  … → FQ with equal params                     same graph (the pair is dropped)           int8
  … → FQ with other params                     ReorderInput → MaxPool (float) → Q         float
avg_pool2d → FQ                                QLinearAveragePool                         int8
  no FQ after it                               AveragePool and the next Conv in float     float
AdaptiveAvgPool2d(1) / mean((2, 3)) → FQ       exported as ReduceMean: DQ → ReduceMean    float
                                               → Q                                        (cheap)
  after `reduce_mean_to_global_pool`           QLinearGlobalAveragePool                   int8
FQ → flatten / reshape / permute → linear      Reshape/Transpose on uint8, Q/DQ moved     int8
(no FQ after the view)                         past them
chunk / split (getitem), no FQ → conv          Split in float, the Conv and Add after it  float
                                               in float
  FQ with tied (copied) params on every output Split on uint8 → QLinearConv, QLinearAdd   int8
interpolate(nearest), no FQ → conv             Resize and the next Conv in float          float
  → FQ with tied params                        Resize on uint8 → QLinearConv              int8
linear (2-D) → FQ                              QGemm                                      int8
linear (2-D), float output, float bias         DQ → Gemm (float): the float bias blocks   float
                                               it; onnxruntime only quantizes biases of
                                               ops followed by Q
  no bias, or ``quantize_bias=True``           QGemm with float output                    int8
linear (3-D, exported MatMul + Add) → FQ       MatMulIntegerToFloat + float Add + Q       int8 GEMM
matmul(FQ, FQ) → FQ / float output             QLinearMatMul / MatMulIntegerToFloat       int8
FQ → sigmoid / leaky_relu / softmax → FQ       QLinearSigmoid / QLinearLeakyRelu /        int8
                                               QLinearSoftmax
FQ(a) * FQ(b) → FQ (squeeze-excite)            QLinearMul                                 int8
FQ → hardswish → FQ                            DQ → HardSigmoid + Mul (float) → Q         float op,
                                                                                          convs int8
conv → hardswish → FQ (no FQ between)          the Conv falls back to float too           float
FQ → silu / gelu / hardsigmoid / layer_norm    float between DQ and Q                     float op
model output after FQ                          a trailing DQ                              --
=============================================  ========================================  ===========

No placement above left a redundant Q/DQ pair (``redundant_qdq`` was empty everywhere, for
onnxruntime's own quantizer too). As data for the quantize pass: `ORT_INT8_KINDS`,
`PASS_THROUGH_KINDS`, `TIED_QPARAMS_KINDS`, `FUSED_ACTIVATIONS` (+ `activation_fuses`) and
`FLOAT_KINDS`, in effopt's canonical op kinds.

What this means for the contract in quantization.py: rules 1-3 and 5 hold as written (every
"float" row above breaks one of them). Rule 4 holds for max pool and views, but *not* for
getitem of a split/chunk or for nearest interpolate: onnxruntime does not move Q/DQ through
Split or Resize, so those need a FakeQuant on every output with the input's parameters tied.
Rule 2's activations fuse only when the FakeQuant's range lies inside the activation's range
(`activation_fuses`), which min/max calibration gives but a learned scale can break.

Speed and size (ResNet-18 CIFAR, 11.2 M params, hand-quantized as above, 256 N(0, 1) images
of calibration, 1 thread, interleaved medians of 30 runs)
------------------------------------------------------------------------------------------
================================================  =======  ============  =============
variant                                           size     p50 batch 1   p50 batch 32
================================================  =======  ============  =============
fp32 (export_onnx)                                44.69 MB 28.1 ms       646 ms
effopt placement, exported as is (no fold)        44.73 MB (same graph in onnxruntime as below)
effopt placement + `fold_weight_quantization`     11.23 MB 7.35 ms 3.8x  176 ms 3.7x
+ `reduce_mean_to_global_pool`                    11.23 MB 7.39 ms 3.8x  176 ms 3.7x
float logits + quantize_bias + pool rewrite       11.25 MB 7.32 ms 3.8x  178 ms 3.6x
onnxruntime quantize_static (QDQ, per-channel)    11.28 MB 7.40 ms 3.8x  176 ms 3.7x
================================================  =======  ============  =============

A second run on a busier machine gave 3.4x (batch 1) and 3.6x (batch 32) for every int8 variant;
effopt / onnxruntime-quantizer latency stayed within 0.98-1.01 in both runs. Same int8 kernels as
onnxruntime's own quantizer (20 QLinearConv, 8 QLinearAdd, 1 QGemm), so the same speed; the pool
rewrite only removes one small float ReduceMean (not measurable here). Logits agree with fp32 at
cosine 0.9999 for all. Folding cuts the file 4x and the session load from 170 ms to 56 ms.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper

from effopt.errors import EmitError
from effopt.optimizer.quant.schemes import QScheme

__all__ = [
    "FLOAT_KINDS",
    "FUSED_ACTIVATIONS",
    "ORT_INT8_KINDS",
    "PASS_THROUGH_KINDS",
    "TIED_QPARAMS_KINDS",
    "OrtFusion",
    "WeightFolding",
    "activation_fuses",
    "fold_weight_quantization",
    "fold_weight_quantization_detailed",
    "optimize_qdq_model",
    "ort_fusion_report",
    "qdq_graph_report",
    "quantize_linear",
    "reduce_mean_to_global_pool",
]


# --- placement rules (effopt canonical op kinds, `effopt.optimizer.ir.analysis.canonical_op`) -----

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
result goes through exactly one FakeQuant (contract rules 2-3); measured, see the table above."""

PASS_THROUGH_KINDS: frozenset[str] = frozenset({
    "max_pool", "flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze",
    "dropout", "identity",
})
"""Kinds that need *no* FakeQuant of their own: onnxruntime moves the surrounding Q/DQ through
them and runs them on int8 (NhwcMaxPool; Reshape/Transpose on uint8). A FakeQuant after them with
equal parameters is harmless (onnxruntime drops the pair); with other parameters it turns the op
into float (DQ → MaxPool → Q)."""

TIED_QPARAMS_KINDS: frozenset[str] = frozenset({"split", "chunk", "getitem", "unbind", "interpolate"})
"""Kinds that keep their input's scale but need a FakeQuant on *every* output with parameters
copied (tied) from their input's FakeQuant: onnxruntime does not propagate Q/DQ through Split or
Resize, so without it they run in float and so do their consumers (``chunk`` → conv: float Conv)."""

FUSED_ACTIVATIONS: Mapping[str, tuple[float, float] | None] = {
    "relu": (0.0, float("inf")),
    "relu6": (0.0, 6.0),
    "hardtanh": None,  # Clip(min_val, max_val): the node's own bounds
    "clamp": None,
}
"""Activations onnxruntime removes between a conv/linear/add and its output FakeQuant, with the
clip range the FakeQuant's range must lie inside (None: the op's own bounds) -- see
`activation_fuses`. Any other activation (hardswish, silu, gelu, hardsigmoid, ...) needs a
FakeQuant *before* it, or the conv itself falls back to float."""

FLOAT_KINDS: frozenset[str] = frozenset({"hardswish", "hardsigmoid", "silu", "gelu", "layer_norm"})
"""Kinds onnxruntime runs in float even between DQ and Q (measured); a FakeQuant before and after
them costs a DQ/Q pair each but keeps the neighbouring convs in int8."""


def activation_fuses(lo: float, hi: float, scale: float, zero_point: int, scheme: QScheme) -> bool:
    """Whether onnxruntime drops a ``Clip(lo, hi)``/``Relu`` before a QuantizeLinear(scale, zero_point).

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
        fresh = _name_allocator(graph)
        for node in list(graph.nodes):
            if node.op in ("Conv", "Gemm"):
                reason = _quantize_bias(graph, node, fresh)
                if reason:
                    skipped.append((node.name, reason))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    _keep_identity(model, out)
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
    fresh = _name_allocator(graph)
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
    _keep_identity(model, out_model)
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


# Ops a per-tensor DequantizeLinear commutes with (onnxruntime's QDQ propagation moves it past them).
_SCALE_PRESERVING_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool"})


def _quantize_bias(graph: gs.Graph, node: gs.Node, fresh: Callable[[str], str]) -> str:
    """Feed ``node``'s float bias through ``DequantizeLinear(int32 b_q, s_x·s_w)``; '' or why not.

    The arithmetic is onnxruntime's WeightBiasQuantization (float32 ``s_x · s_w``, float32
    division, round half to even), so where onnxruntime would quantize the bias itself the codes,
    and the outputs, are identical. E.g. b = 0.3, s_x = 0.02, s_w = 0.005 → b_q = 3000.
    """
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return ""  # no bias: nothing to do, not a skip
    x, w, b = node.inputs[0], node.inputs[1], node.inputs[2]
    while x.inputs and x.inputs[0].op in _SCALE_PRESERVING_OPS:  # onnxruntime moves the DQ past these
        x = x.inputs[0].inputs[0]
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


def _name_allocator(graph: gs.Graph) -> Callable[[str], str]:
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


def _keep_identity(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """gs.export_onnx rebuilds the model; keep the source's identity fields."""
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.ir_version = source.ir_version


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
