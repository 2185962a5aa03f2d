"""Tests for effopt.optimizer.lower.onnx_dynamic: dynamic int8 MatMul/Gemm in ONNX, and the torch export form.

Two layers of tests: small hand-built ONNX graphs (one situation each, with a drawing) check the
rewrite and its skips against a NumPy reference; models quantized by the quantize pass in
``mode: dynamic`` check the whole path (export form → export → rewrite → onnxruntime's fused
graph) against the torch fake-quant model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.emit.onnx import export_onnx
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.lower.onnx_dynamic import (
    dynamic_export_form,
    dynamic_quantize_matmuls,
    dynamic_quantize_matmuls_detailed,
)
from effopt.optimizer.lower.ort_fusion import ort_fusion_report, qdq_graph_report
from effopt.passes.manager import run_passes
from effopt.optimizer.quant.schemes import QuantLinear, calibrate_weight, freeze_weights
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.quant.dynamic import DynamicInput, dynamic_fake_quantize
from effopt.recipes import parse_recipe
from tests.models import ZOO, make_input
from tests.passes.helpers import HOST_WEIGHT_BITS, HOST_WEIGHT_SCHEME, host_kernel_context

FUSED_DYNAMIC = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")
FLOAT_GEMMS = ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def passes(*specs: object):
    recipe = {"version": 1, "model": {"factory": "m:f"}, "inputs": [{"name": "x", "shape": [1]}], "passes": list(specs)}
    return parse_recipe(recipe).passes


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    """onnxruntime's output; ``optimize=False`` runs the graph as written (onnxruntime turns a float
    ``DQ(int8 W) → Transpose → MatMul`` into MatMulNBits, which quantizes the input itself)."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _count(report_ops: tuple[tuple[str, int], ...], names: tuple[str, ...]) -> int:
    return sum(n for op, n in report_ops if op in names)


def _fused_graph(model: onnx.ModelProto, tmp: Path):
    path = tmp / "m.onnx"
    onnx.save(model, str(path))
    return ort_fusion_report(path)


# --- the torch-side rule -------------------------------------------------------------------------


def test_dynamic_fake_quantize_matches_the_worked_example() -> None:
    x = torch.tensor([-1.0, 3.0, 0.5])
    s = 4.0 / 255
    assert torch.allclose(dynamic_fake_quantize(x), torch.tensor([-64 * s, 191 * s, 32 * s]))
    # an all-positive range still includes 0 (z = 0), a constant tensor gets scale 1
    assert torch.allclose(dynamic_fake_quantize(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]), atol=4 / 255 / 2)
    assert torch.equal(dynamic_fake_quantize(torch.zeros(3)), torch.zeros(3))


def test_dynamic_fake_quantize_equals_onnx_dynamic_quantize_linear() -> None:
    """Bit-equal codes: same range rule, float32 division and round-half-even as onnxruntime."""
    x = torch.randn(64, 257, generator=torch.Generator().manual_seed(1)) * 3 + 0.7
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 257])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, s, z = session.run(None, {"x": x.numpy()})
    onnx_values = (q.astype(np.float32) - np.float32(z)) * s
    np.testing.assert_array_equal(dynamic_fake_quantize(x).numpy(), onnx_values)


# --- small graphs: one situation each ------------------------------------------------------------

K, N, BATCH = 24, 8, 5


@dataclass(frozen=True)
class Expected:
    rewritten: int                  # MatMul/Gemm nodes turned into integer ones
    skip_reason: str | None = None  # a fragment of the reason, for a declined site
    quantize_nodes: int = 0         # DynamicQuantizeLinear nodes after the rewrite
    reference: Callable[[np.ndarray], np.ndarray] | None = None  # when not `_reference` (quantizes x only)


def _codes(shape: tuple[int, ...], seed: int) -> np.ndarray:
    bound = 2 ** (HOST_WEIGHT_BITS - 1) - 1  # 127, or 63 where this CPU's int8 kernels saturate 8-bit weights
    return np.random.default_rng(seed).integers(-bound, bound + 1, size=shape).astype(np.int8)


def _scales(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.001, 0.02, size=n).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int | str],
           y_shape: list[int | str]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _dq(name: str, codes: np.ndarray, scale: np.ndarray, axis: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    zero = np.zeros(scale.shape, np.int8)
    inits = [numpy_helper.from_array(codes, f"{name}.weight_codes"), numpy_helper.from_array(scale, f"{name}.scale"),
             numpy_helper.from_array(zero, f"{name}.zero")]
    node = helper.make_node("DequantizeLinear", [f"{name}.weight_codes", f"{name}.scale", f"{name}.zero"],
                            [f"{name}.w"], axis=axis)
    return node, inits


def gemm_trans_b_graph() -> tuple[onnx.ModelProto, Expected]:
    """nn.Linear on 2-D input, as the exporter writes it::

        x [B, K] ── Gemm(transB=1) ── y
        W_q [N, K] ─ DQ(s[N], axis 0) ─┘ + bias [N]
    """
    dq, inits = _dq("fc", _codes((N, K), 0), _scales(N, 1), 0)
    inits.append(numpy_helper.from_array(np.linspace(-1, 1, N, dtype=np.float32), "fc.bias"))
    gemm = helper.make_node("Gemm", ["x", "fc.w", "fc.bias"], ["y"], transB=1)
    return _model([dq, gemm], inits, ["batch", K], ["batch", N]), Expected(1, quantize_nodes=1)


def matmul_transpose_graph() -> tuple[onnx.ModelProto, Expected]:
    """nn.Linear on 3-D input (transformer), as the exporter writes it::

        x [B, T, K] ── MatMul ── Add(bias) ── y
        W_q [N, K] ─ DQ(axis 0) ─ Transpose ─┘
    """
    dq, inits = _dq("fc", _codes((N, K), 2), _scales(N, 3), 0)
    inits.append(numpy_helper.from_array(np.full(N, 0.25, np.float32), "fc.bias"))
    nodes = [dq, helper.make_node("Transpose", ["fc.w"], ["fc.wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "fc.wt"], ["mm"]), helper.make_node("Add", ["mm", "fc.bias"], ["y"])]
    return _model(nodes, inits, ["batch", 3, K], ["batch", 3, N]), Expected(1, quantize_nodes=1)


def matmul_direct_per_tensor_graph() -> tuple[onnx.ModelProto, Expected]:
    """A [K, N] weight read directly, one scale for the whole tensor::

        x [B, K] ── MatMul ── y
        W_q [K, N] ─ DQ(s scalar) ─┘
    """
    codes = _codes((K, N), 4)
    inits = [numpy_helper.from_array(codes, "w.weight_codes"), numpy_helper.from_array(np.float32(0.01), "w.scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w.weight_codes", "w.scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, inits, ["batch", K], ["batch", N]), Expected(1, quantize_nodes=1)


def fan_out_graph() -> tuple[onnx.ModelProto, Expected]:
    """One input read by two layers (attention's q and k): one DynamicQuantizeLinear for both::

        x ─┬─ Gemm(DQ W_a) ─┐
           └─ Gemm(DQ W_b) ─┴─ Add ── y
    """
    dq_a, inits_a = _dq("a", _codes((N, K), 5), _scales(N, 6), 0)
    dq_b, inits_b = _dq("b", _codes((N, K), 7), _scales(N, 8), 0)
    nodes = [dq_a, dq_b, helper.make_node("Gemm", ["x", "a.w"], ["ya"], transB=1),
             helper.make_node("Gemm", ["x", "b.w"], ["yb"], transB=1), helper.make_node("Add", ["ya", "yb"], ["y"])]
    return _model(nodes, inits_a + inits_b, ["batch", K], ["batch", N]), Expected(2, quantize_nodes=1)


def shared_weight_graph() -> tuple[onnx.ModelProto, Expected]:
    """One weight read by two layers (a shared module): one [K, N] copy, two input quantizers::

        x ── Gemm ── Relu ── Gemm ── y
             └── DQ(W_q [K, K]) ──┘
    """
    dq, inits = _dq("shared", _codes((K, K), 14), _scales(K, 15), 0)
    nodes = [dq, helper.make_node("Gemm", ["x", "shared.w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "shared.w"], ["y"], transB=1)]
    codes, scale = (numpy_helper.to_array(t) for t in inits[:2])
    w = torch.from_numpy(codes.astype(np.float32) * scale[:, None])

    def reference(x: np.ndarray) -> np.ndarray:  # both layers' inputs quantized
        h = torch.relu(dynamic_fake_quantize(torch.from_numpy(x)) @ w.T)
        return (dynamic_fake_quantize(h) @ w.T).numpy()

    return _model(nodes, inits, ["batch", K], ["batch", K]), Expected(2, quantize_nodes=2, reference=reference)


def k_axis_scales_graph() -> tuple[onnx.ModelProto, Expected]:
    """Scales along K cannot leave the int32 sum: declined::

        x [B, K] ── MatMul ── y
        W_q [K, N] ─ DQ(s[K], axis 0) ─┘
    """
    dq, inits = _dq("w", _codes((K, N), 9), _scales(K, 10), 0)
    model = _model([dq, helper.make_node("MatMul", ["x", "w.w"], ["y"])], inits, ["batch", K], ["batch", N])
    return model, Expected(0, "along K")


def static_input_graph() -> tuple[onnx.ModelProto, Expected]:
    """A static int8 layer (input already dequantized): declined, onnxruntime's QDQ fusion makes it QGemm::

        x ─ Q ─ DQ ── Gemm ── y
        W_q ─ DQ ─────┘
    """
    dq, inits = _dq("fc", _codes((N, K), 11), _scales(N, 12), 0)
    inits += [numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.uint8(128), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]), dq,
             helper.make_node("Gemm", ["xd", "fc.w"], ["y"], transB=1)]
    return _model(nodes, inits, ["batch", K], ["batch", N]), Expected(0, "dequantized")


def activation_matmul_graph() -> tuple[onnx.ModelProto, Expected]:
    """Nothing to do: a MatMul of two activations (q @ kᵀ) has no weight::

        x ─┬──────────── MatMul ── y
           └─ Transpose ─┘
    """
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "xt"], ["y"])]
    return _model(nodes, [], [BATCH, K], [BATCH, BATCH]), Expected(0)


GRAPHS: dict[str, Callable[[], tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (gemm_trans_b_graph, matmul_transpose_graph, matmul_direct_per_tensor_graph, fan_out_graph,
                            shared_weight_graph, k_axis_scales_graph, static_input_graph, activation_matmul_graph)
}


def _x_for(model: onnx.ModelProto) -> np.ndarray:
    dims = [d.dim_value or BATCH for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (np.random.default_rng(13).standard_normal(dims) * 2 + 0.3).astype(np.float32)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The original graph, run as written in float, on the input fake-quantized by the torch rule."""
    xq = dynamic_fake_quantize(torch.from_numpy(x)).numpy()
    return _run(model, {"x": xq}, optimize=False)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_rewrite_on_small_graphs(name: str, tmp_path: Path) -> None:
    model, expected = GRAPHS[name]()
    before = [n.op_type for n in model.graph.node]
    assert "MatMulInteger" not in before and "DynamicQuantizeLinear" not in before  # precondition
    result = dynamic_quantize_matmuls_detailed(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert len(result.rewritten) == expected.rewritten
    assert ops.count("MatMulInteger") == expected.rewritten
    assert ops.count("DynamicQuantizeLinear") == expected.quantize_nodes
    if expected.skip_reason is None:
        assert result.skipped == ()
    else:
        assert len(result.skipped) == 1 and expected.skip_reason in result.skipped[0][1]
    onnx.checker.check_model(result.model, full_check=True)
    x = _x_for(model)
    got = _run(result.model, {"x": x})
    if expected.rewritten:
        want = expected.reference(x) if expected.reference else _reference(model, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, _run(model, {"x": x}, optimize=False), rtol=1e-4, atol=1e-4)  # input quantized
        report = _fused_graph(result.model, tmp_path)
        assert _count(report.int8_ops, FUSED_DYNAMIC) == expected.rewritten
        assert _count(report.float_compute_ops, FLOAT_GEMMS) == 0
        weights = [t for t in result.model.graph.initializer if t.name.endswith(("weight_codes", "_transposed"))]
        assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    else:
        assert ops == before  # left exactly as it was
        np.testing.assert_array_equal(got, _run(model, {"x": x}))


def test_shared_weight_is_stored_once() -> None:
    model, _ = shared_weight_graph()
    out = dynamic_quantize_matmuls(model)
    weights = [t.name for t in out.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert weights == ["shared.weight_codes_transposed"]


def test_weight_names_select_the_dynamic_layers() -> None:
    """Only named weights are rewritten: a weight-only layer has the same ONNX form and must stay float."""
    model, _ = fan_out_graph()
    result = dynamic_quantize_matmuls_detailed(model, ["a.weight_codes"])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("Gemm") == 1
    assert result.skipped == ()


def test_a_named_weight_that_no_node_reads_is_reported() -> None:
    model, _ = gemm_trans_b_graph()
    result = dynamic_quantize_matmuls_detailed(model, ["fc.weight_codes", "gone.weight_codes"])
    assert result.rewritten
    assert result.skipped == (("gone.weight_codes", "no MatMul/Gemm reads this weight (renamed by the exporter?)"),)


def test_rewrite_is_deterministic_and_idempotent() -> None:
    model, _ = fan_out_graph()
    once = dynamic_quantize_matmuls(model)
    again = dynamic_quantize_matmuls(model)
    assert once.SerializeToString(deterministic=True) == again.SerializeToString(deterministic=True)
    twice = dynamic_quantize_matmuls_detailed(once)
    assert twice.rewritten == () and [n.op_type for n in twice.model.graph.node] == [n.op_type for n in once.graph.node]


# --- the whole path: quantize pass (mode: dynamic) → export form → export → rewrite --------------


@dataclass(frozen=True)
class Exported:
    name: str                      # the ZOO model
    ir: IR
    float_model: nn.Module
    weights: tuple[str, ...]
    exported: onnx.ModelProto      # the export form, before the rewrite
    rewritten: onnx.ModelProto
    layers: int                    # DynamicInput modules in the quantized model


def _export_dynamic(name: str, tmp: Path) -> Exported:
    builder, shape = ZOO[name]
    model = builder()
    ir = annotate(IR(trace_module(model), (InputSpec("x", shape, dynamic_batch=True),), (make_input(shape),)))
    ir, _ = run_passes(ir, passes({"name": "quantize", "mode": "dynamic"}), host_kernel_context())
    frozen = freeze_weights(copy.deepcopy(ir.gm)).eval()
    with dynamic_export_form(frozen) as weights:
        path = export_onnx(frozen, ir.example_inputs, ["x"], [True], tmp / f"{name}.onnx", optimize_qdq=False)
    layers = sum(isinstance(m, DynamicInput) for m in ir.gm.modules())
    exported = onnx.load(str(path))
    return Exported(name, ir, model, weights, exported, dynamic_quantize_matmuls(exported, weights), layers)


@pytest.fixture(scope="module", params=["mlp", "tiny_transformer"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export_dynamic(request.param, tmp_path_factory.mktemp("onnx_dynamic"))


def test_export_form_is_restored_and_names_every_dynamic_layer(exported: Exported) -> None:
    assert exported.layers > 0  # precondition: the pass wrapped the Linears
    assert len(exported.weights) == 2 * exported.layers
    inits = {t.name for t in exported.exported.graph.initializer}
    assert sum(w in inits for w in exported.weights) == exported.layers  # one key per layer is in the file


def test_export_form_before_the_rewrite_has_no_dynamic_int8_kernels(exported: Exported, tmp_path: Path) -> None:
    """2-D layers stay float Gemms; onnxruntime turns 3-D ones (DQ → Transpose → MatMul) into MatMulNBits."""
    report = _fused_graph(exported.exported, tmp_path)
    assert _count(report.int8_ops, FUSED_DYNAMIC) == 0
    assert _count(report.op_counts, (*FLOAT_GEMMS, "MatMulNBits")) >= exported.layers


def test_rewritten_model_runs_every_dynamic_layer_on_int8_kernels(exported: Exported, tmp_path: Path) -> None:
    report = _fused_graph(exported.rewritten, tmp_path)
    assert _count(report.int8_ops, FUSED_DYNAMIC) == exported.layers
    assert _count(report.float_compute_ops, ("Gemm", "FusedGemm")) == 0
    # what stays a float MatMul is attention's activation × activation (2 per transformer layer)
    activation_matmuls = sum(n.op == "call_function" and "matmul" in str(n.target) for n in exported.ir.gm.graph.nodes)
    assert _count(report.float_compute_ops, ("MatMul", "FusedMatMul")) == activation_matmuls
    int8 = [t for t in exported.rewritten.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == exported.layers
    assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and "weight" in t.name
                   for t in exported.rewritten.graph.initializer)


@pytest.mark.parametrize("batch", [1, 7])
def test_rewritten_model_agrees_with_the_torch_dynamic_model(exported: Exported, batch: int) -> None:
    shape = (batch, *ZOO[exported.name][1][1:])
    x = make_input(shape, seed=batch)
    with torch.no_grad():
        dynamic = exported.ir.gm.eval()(x).numpy()
        floating = exported.float_model(x).numpy()
    got = _run(exported.rewritten, {"x": x.numpy()})
    scale = np.abs(dynamic).max()
    assert np.abs(got - dynamic).max() <= 1e-4 * scale
    assert np.abs(dynamic - floating).max() > 10 * np.abs(got - dynamic).max()  # tells quantized from float


def test_rewritten_model_passes_the_checker_and_is_deterministic(exported: Exported) -> None:
    onnx.checker.check_model(exported.rewritten, full_check=True)
    again = dynamic_quantize_matmuls(exported.exported, exported.weights)
    assert again.SerializeToString(deterministic=True) == exported.rewritten.SerializeToString(deterministic=True)


def test_weight_only_layer_next_to_a_dynamic_one_stays_float(tmp_path: Path) -> None:
    """
    x ─ DynamicInput(QuantLinear 16→12) ─ relu ─ QuantLinear 12→4 (weight-only, fp32 compute)
    Both export as DQ(int8) → Gemm; only the first is named by the export form.
    """
    gen = torch.Generator().manual_seed(0)
    first, second = QuantLinear(nn.Linear(16, 12), HOST_WEIGHT_SCHEME), QuantLinear(nn.Linear(12, 4), compute_dtype="fp32")
    for layer in (first, second):
        with torch.no_grad():
            layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=gen))
        calibrate_weight(layer)
    model = freeze_weights(nn.Sequential(DynamicInput(first), nn.ReLU(), second)).eval()
    with dynamic_export_form(model) as weights:
        assert isinstance(model[0], QuantLinear)  # swapped inside the block
        path = export_onnx(model, (torch.randn(2, 16),), ["x"], [True], tmp_path / "mixed.onnx", optimize_qdq=False)
    assert isinstance(model[0], DynamicInput)  # and put back
    result = dynamic_quantize_matmuls_detailed(onnx.load(str(path)), weights)
    assert len(result.rewritten) == 1 and result.skipped == ()
    report = _fused_graph(result.model, tmp_path)
    assert _count(report.int8_ops, FUSED_DYNAMIC) == 1
    assert _count(report.float_compute_ops, FLOAT_GEMMS) == 1
    x = torch.randn(3, 16, generator=gen)
    with torch.no_grad():
        np.testing.assert_allclose(_run(result.model, {"x": x.numpy()}), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_unfrozen_dynamic_layer_is_found_after_weight_folding(tmp_path: Path) -> None:
    """Without freeze_weights the exporter writes Q → Clip → DQ on the float weight; folding names the codes
    after the float weight (``0.linear.weight``), which the export form names too."""
    from effopt.optimizer.lower.onnx_qdq import optimize_qdq_model

    layer = QuantLinear(nn.Linear(16, 4))
    calibrate_weight(layer)
    model = nn.Sequential(DynamicInput(layer)).eval()
    with dynamic_export_form(model) as weights:
        path = export_onnx(model, (torch.randn(2, 16),), ["x"], [True], tmp_path / "unfrozen.onnx", optimize_qdq=False)
    assert qdq_graph_report(onnx.load(str(path))).quantize_nodes == 1  # precondition: a float weight behind Q
    result = dynamic_quantize_matmuls_detailed(optimize_qdq_model(onnx.load(str(path))), weights)
    assert len(result.rewritten) == 1 and result.skipped == ()


def test_export_onnx_lowers_dynamic_layers_to_int8_kernels(exported: Exported, tmp_path: Path) -> None:
    """export_onnx does the whole path itself: export form, then the rewrite."""
    frozen = freeze_weights(copy.deepcopy(exported.ir.gm)).eval()
    path = export_onnx(frozen, exported.ir.example_inputs, ["x"], [True], tmp_path / "hooked.onnx")
    assert sum(isinstance(m, DynamicInput) for m in frozen.modules()) == exported.layers  # put back
    report = ort_fusion_report(path)
    assert _count(report.int8_ops, FUSED_DYNAMIC) == exported.layers
    assert _count(report.float_compute_ops, ("Gemm", "FusedGemm")) == 0
    plain = export_onnx(frozen, exported.ir.example_inputs, ["x"], [True], tmp_path / "plain.onnx", optimize_qdq=False)
    assert _count(ort_fusion_report(plain).int8_ops, FUSED_DYNAMIC) == 0  # optimize_qdq=False: exported as is
