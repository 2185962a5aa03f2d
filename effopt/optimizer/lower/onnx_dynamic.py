"""Dynamic quantization in ONNX: int8 weights, activations quantized by onnxruntime at run time.

The quantize pass's ``mode: dynamic`` wraps each Linear in `DynamicInput`
(`effopt.optimizer.quant.dynamic`), whose forward
fake-quantizes the input with that batch's own range. Exported as it is, that range is a pile of
float ops (ReduceMin, ReduceMax, Div, Round, Clip, ...) in front of a float Gemm: slower than the
float model, and nothing runs on integers. This module lowers it to onnxruntime's own dynamic
quantization in two steps:

1. torch side, `dynamic_export_form`: while the model is exported, each `DynamicInput` is
   replaced by its inner `QuantLinear`. The file then holds, per dynamic layer,
   ``x (float) → MatMul/Gemm ← [Transpose] ← DequantizeLinear(W_q int8, s_w[N], axis)``, and the
   weight initializer's name (``<layer>.weight_codes``, the buffer's state-dict key) marks the
   layer as dynamic. The names are what tell a dynamic layer from a weight-only one, whose ONNX
   form is the same;
2. ONNX side, `dynamic_quantize_matmuls`: each such MatMul/Gemm becomes the pattern
   onnxruntime's own ``quantize_dynamic`` writes::

       x ─ DynamicQuantizeLinear ─ x_q (uint8), s_x, z_x
       MatMulInteger(x_q, W_q [K, N] int8, z_x, z_w [N]) ─ int32 ─ Cast ─ Mul(s_x · s_w[N]) [─ Add(bias)]

   which onnxruntime fuses into ``DynamicQuantizeMatMul`` (u8 × s8 GEMM, per-column weight
   scales; see `effopt.optimizer.lower.ort_fusion.ort_fusion_report`).

Why the two sides agree: ``DynamicQuantizeLinear`` takes the range ``[min(x, 0), max(x, 0)]`` of
the whole tensor in float32, the rule `effopt.optimizer.quant.dynamic.dynamic_fake_quantize`
reproduces in torch bit for bit; given the same input one layer agrees with torch to ~4e-7 of its
output range. Through a network the two drift a little further apart (a last-bit difference in a
float sum moves the next scale by one ulp), about as far as onnxruntime's own ``quantize_dynamic``
is from torch. The measurements (fused graphs, speed and size against fp32 and onnxruntime's
quantizer) are in ``docs/quantization.md``: an MLP runs 2.1x (batch 1) to 3.1x (batch 32) faster
than fp32, as fast as onnxruntime's own quantizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from torch import nn

from effopt.optimizer.lower.onnx_graph import is_dequantized, keep_identity, name_allocator
from effopt.optimizer.quant.dynamic import DynamicInput

__all__ = [
    "DynamicRewrite",
    "dynamic_export_form",
    "dynamic_quantize_matmuls",
    "dynamic_quantize_matmuls_detailed",
]

_WEIGHT_TYPES = (np.int8, np.uint8)  # what MatMulInteger takes as B


@dataclass(frozen=True)
class DynamicRewrite:
    """What `dynamic_quantize_matmuls_detailed` did.

    ``rewritten`` names each MatMul/Gemm that now runs on integers, in graph order; ``skipped``
    pairs a node (or, for a requested weight that no node reads, the weight) with why it was left
    in float, e.g. ``("node_linear", "input is dequantized (a static int8 layer): left to ...")``.
    MatMuls between two activations (attention's ``q @ kᵀ``) are no candidates and are not listed.
    """

    model: onnx.ModelProto
    rewritten: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


@contextlib.contextmanager
def dynamic_export_form(module: nn.Module) -> Iterator[tuple[str, ...]]:
    """Inside the block every `DynamicInput` of ``module`` is its inner `QuantLinear`; yields their weight names.

    The names are the state-dict keys the exporter gives the weight initializers: the frozen
    codes (``fc1.weight_codes``, see `freeze_weights`) and, for an unfrozen layer, the float
    weight that `fold_weight_quantization` turns into codes under the same name
    (``fc1.linear.weight``). Pass them to `dynamic_quantize_matmuls`. The modules are put back
    afterwards, also on error. A `DynamicInput` that is ``module`` itself cannot be swapped and
    stays as it is (it still exports, as float ops).

    Example: a ``Sequential(DynamicInput(QuantLinear(...)), ReLU(), ...)`` yields
    ``("0.weight_codes", "0.linear.weight", ...)`` and exports ``0`` as DQ(int8) → Gemm.
    """
    sites = [(name, m) for name, m in module.named_modules() if isinstance(m, DynamicInput) and name]
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, m in sites:
            module.set_submodule(name, m.inner)
            done.append((name, m))
        yield tuple(key for name, _ in sites for key in (f"{name}.weight_codes", f"{name}.linear.weight"))
    finally:
        for name, m in reversed(done):
            module.set_submodule(name, m)


def dynamic_quantize_matmuls(model: onnx.ModelProto, weights: Collection[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` where MatMuls/Gemms with int8 dequantized weights quantize their float input at run time.

    ``weights`` names the weight initializers of the dynamic layers (from `dynamic_export_form`);
    None takes every ``MatMul/Gemm(x float, [Transpose] DQ(W_q const))`` whose input is not itself
    dequantized. Each becomes ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(s_x · s_w)
    [→ Add(bias)]`` (module docstring), which onnxruntime fuses into ``DynamicQuantizeMatMul``.
    The weight is stored as ``[K, N]`` int8 (transposed once here for a ``transB`` Gemm or a
    ``Transpose`` node, so onnxruntime packs it at load); per-output-channel scales become a
    ``[N]`` vector, zero points a ``[N]`` int8 ``b_zero_point``.

    MatMuls that read one tensor (attention's q, k, v) share one DynamicQuantizeLinear, as in
    onnxruntime's own quantizer; onnxruntime keeps it and runs one MatMulIntegerToFloat each.

    Example: Gemm(x [B, 64], DQ(W_q [32, 64] int8, s [32], axis 0), b [32], transB=1) becomes
    MatMulInteger(DQL(x), W_qᵀ [64, 32]) → Cast → Mul(s_x · s) → Add(b). Nodes stay in
    topological order and the bytes are deterministic.
    """
    return dynamic_quantize_matmuls_detailed(model, weights).model


def dynamic_quantize_matmuls_detailed(model: onnx.ModelProto, weights: Collection[str] | None = None) -> DynamicRewrite:
    """`dynamic_quantize_matmuls` plus which nodes were rewritten and which were left in float, and why."""
    if _default_opset(model) < 11:
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(model)
        reason = f"opset {_default_opset(model)} < 11 has no DynamicQuantizeLinear"
        return DynamicRewrite(unchanged, (), (("model", reason),))
    graph = gs.import_onnx(model)
    graph.toposort()
    fresh = name_allocator(graph)
    wanted = None if weights is None else frozenset(weights)
    seen: set[str] = set()
    rewritten: list[str] = []
    skipped: list[tuple[str, str]] = []
    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    weight_constants: dict[tuple[str, bool, bytes, bytes], tuple[gs.Constant, gs.Constant, gs.Constant]] = {}
    for node in list(graph.nodes):
        weight = _weight_dq(node)
        if weight is None:
            continue
        dq, transposed = weight
        name = dq.inputs[0].name
        if wanted is not None and name not in wanted:
            continue
        seen.add(name)
        site = _match(node, dq, transposed)
        if isinstance(site, str):
            skipped.append((node.name, site))
            continue
        _rewrite(graph, site, fresh, quantized_inputs, weight_constants)
        rewritten.append(node.name)
    if wanted is not None:
        # A layer is asked for under two names (frozen codes, folded float weight): found if either is.
        found = {_layer_of(w) for w in seen}
        for w in sorted(wanted):
            if _layer_of(w) not in found:
                found.add(_layer_of(w))  # report each layer once
                skipped.append((w, "no MatMul/Gemm reads this weight (renamed by the exporter?)"))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    keep_identity(model, out)
    return DynamicRewrite(out, tuple(rewritten), tuple(skipped))


# --- matching (guards only: nothing is edited here) ------------------------------------------


@dataclass(frozen=True)
class _Site:
    """One MatMul/Gemm to rewrite, with its weight as ``B [K, N]`` codes and per-column parameters."""

    node: gs.Node
    x: gs.Variable
    codes: np.ndarray          # [K, N], int8 or uint8
    scale: np.ndarray          # float32, shape () or [N]
    zero: np.ndarray           # codes' dtype, shape () or [N]
    bias: gs.Tensor | None     # Gemm's C
    weight: gs.Constant        # the W_q initializer the DequantizeLinear reads
    transposed: bool           # codes are W_qᵀ (a new initializer); else ``weight`` is used as is


def _weight_dq(node: gs.Node) -> tuple[gs.Node, bool] | None:
    """``(DequantizeLinear, through_transpose)`` if ``node`` is a MatMul/Gemm with B = ``[Transpose] DQ(constant)``."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    b = node.inputs[1]
    producer = b.inputs[0] if b.inputs else None
    transposed = False
    if producer is not None and producer.op == "Transpose":
        transposed = list(producer.attrs.get("perm", [1, 0])) != [0, 1]  # a 2-D weight: swap or identity
        b = producer.inputs[0]
        producer = b.inputs[0] if b.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not isinstance(producer.inputs[0], gs.Constant):
        return None
    return producer, transposed


def _match(node: gs.Node, dq: gs.Node, through_transpose: bool) -> _Site | str:
    """The rewrite of ``node`` or why it is left in float."""
    x = node.inputs[0]
    if is_dequantized(x):  # an input reached from a DQ through layout ops is a static int8 activation
        return "input is dequantized (a static int8 layer): left to onnxruntime's QDQ fusion"
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return f"input is {np.dtype(x.dtype)}: DynamicQuantizeLinear takes float32"
    bias = None
    transposed = through_transpose
    if node.op == "Gemm":
        attrs = node.attrs
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1"
        bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if bias is not None and float(attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with beta != 1"
        transposed = transposed != bool(int(attrs.get("transB", 0)))
    w = dq.inputs[0]
    codes = w.values
    if codes.dtype not in _WEIGHT_TYPES or codes.ndim != 2:
        return f"weight is {codes.dtype} of rank {codes.ndim}: MatMulInteger takes a 2-D int8/uint8 weight"
    if int(dq.attrs.get("block_size", 0)):
        return "blocked weight quantization (block_size)"
    scale_t = dq.inputs[1] if len(dq.inputs) > 1 else None
    zero_t = dq.inputs[2] if len(dq.inputs) > 2 and not dq.inputs[2].is_empty() else None
    if not isinstance(scale_t, gs.Constant) or (zero_t is not None and not isinstance(zero_t, gs.Constant)):
        return "weight scale or zero point is not a constant"
    scale = scale_t.values
    zero = zero_t.values if zero_t is not None else np.zeros((), codes.dtype)
    if scale.dtype != np.float32:
        return f"weight scale is {scale.dtype}: only float32"
    per_channel = scale.size > 1
    if per_channel:
        axis = int(dq.attrs.get("axis", 1)) % 2
        column_axis = 0 if transposed else 1  # the axis of W that becomes B's N
        if axis != column_axis:
            return f"weight scales run along K (axis {axis} of the weight): they cannot leave the integer product"
        scale = scale.reshape(-1)
        zero = zero.reshape(-1) if zero.size > 1 else np.full(scale.shape, zero.reshape(()), codes.dtype)
    else:
        scale = scale.reshape(())
        zero = zero.reshape(())
    kn = np.ascontiguousarray(codes.T) if transposed else codes
    return _Site(node, x, kn, scale.astype(np.float32), zero.astype(codes.dtype), bias, w, transposed)


def _layer_of(weight: str) -> str:
    for suffix in (".weight_codes", ".linear.weight"):
        if weight.endswith(suffix):
            return weight[: -len(suffix)]
    return weight


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --- the edit ------------------------------------------------------------------------------------


def _rewrite(
    graph: gs.Graph,
    site: _Site,
    fresh: Callable[[str], str],
    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]],
    weight_constants: dict[tuple[str, bool, bytes, bytes], tuple[gs.Constant, gs.Constant, gs.Constant]],
) -> None:
    """Replace ``site.node`` by DQL → MatMulInteger → Cast → Mul [→ Add]; its output tensor keeps its name.

    ``quantized_inputs`` (one DQL per input tensor) and ``weight_constants`` (one ``[K, N]`` copy
    per weight) are shared across calls, so fan-out and shared weights are quantized/stored once.
    """
    node, x = site.node, site.x
    base = node.name
    if x.name in quantized_inputs:
        x_q, x_scale, x_zero = quantized_inputs[x.name]
    else:
        x_q = gs.Variable(fresh(f"{x.name}_quantized"), dtype=np.uint8, shape=x.shape)
        x_scale = gs.Variable(fresh(f"{x.name}_scale"), dtype=np.float32, shape=[])
        x_zero = gs.Variable(fresh(f"{x.name}_zero_point"), dtype=np.uint8, shape=[])
        quantize = gs.Node("DynamicQuantizeLinear", fresh(f"{base}_quantize_input"), {}, [x], [x_q, x_scale, x_zero])
        graph.nodes.append(quantize)
        quantized_inputs[x.name] = (x_q, x_scale, x_zero)
    w = site.weight.name
    key = (w, site.transposed, site.scale.tobytes(), site.zero.tobytes())
    if key not in weight_constants:
        codes = gs.Constant(fresh(f"{w}_transposed"), site.codes) if site.transposed else site.weight
        weight_constants[key] = (codes, gs.Constant(fresh(f"{w}_zero_point"), site.zero),
                                 gs.Constant(fresh(f"{w}_scale"), site.scale))
    codes, w_zero, w_scale = weight_constants[key]
    out = node.outputs[0]
    acc = gs.Variable(fresh(f"{base}_int32"), dtype=np.int32)
    acc_f = gs.Variable(fresh(f"{base}_int32_float"), dtype=np.float32)
    scales = gs.Variable(fresh(f"{base}_scales"), dtype=np.float32)
    scaled = out if site.bias is None else gs.Variable(fresh(f"{base}_scaled"), dtype=np.float32)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes += [
        gs.Node("MatMulInteger", fresh(f"{base}_integer"), {}, [x_q, codes, x_zero, w_zero], [acc]),
        gs.Node("Mul", fresh(f"{base}_scales_mul"), {}, [x_scale, w_scale], [scales]),
        gs.Node("Cast", fresh(f"{base}_cast"), {"to": onnx.TensorProto.FLOAT}, [acc], [acc_f]),
        gs.Node("Mul", fresh(f"{base}_rescale"), {}, [acc_f, scales], [scaled]),
    ]
    if site.bias is not None:
        graph.nodes.append(gs.Node("Add", fresh(f"{base}_bias"), {}, [scaled, site.bias], [out]))
