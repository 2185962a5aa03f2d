"""Tests for effopt.optimizer.lower.onnx_qdq and .ort_fusion: weight folding, bias/mean rewrites, onnxruntime's graph.

Models are quantized by hand the way the quantize pass does (effopt.optimizer.quant.contract,
placements measured in docs/quantization.md) and exported once per module; the tests that only read a file
share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from effopt.errors import EmitError
from effopt.optimizer.emit.onnx import export_onnx
from effopt.optimizer.lower.onnx_qdq import (
    FLOAT_KINDS,
    ORT_INT8_KINDS,
    activation_fuses,
    drop_conv_weight_zero_points,
    fold_weight_quantization,
    fold_weight_quantization_detailed,
    quantize_linear,
    reduce_mean_to_global_pool,
)
from effopt.optimizer.lower.ort_fusion import ort_fusion_report, qdq_graph_report
from effopt.optimizer.quant.contract import FUSED_ACTIVATIONS, PASS_THROUGH_KINDS, TIED_QPARAMS_KINDS, role
from effopt.optimizer.quant.schemes import (
    ACTIVATION_SCHEME,
    FakeQuant,
    QuantConv,
    QuantLinear,
    calibrate_weight,
    qparams_from_range,
)
from tests.passes.helpers import HOST_WEIGHT_SCHEME

# --- model builders (the models behind the measurements in docs/quantization.md) ---------------


def _fq() -> FakeQuant:
    return FakeQuant(ACTIVATION_SCHEME)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> QuantConv:
    """A biased conv (a folded BN's bias) with He-normal weights, so activations keep their scale."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.normal_(conv.bias, std=0.1)
    return QuantConv(conv, HOST_WEIGHT_SCHEME)  # weights this CPU's int8 kernels run exactly


class QuantBasicBlock(nn.Module):
    """ResNet BasicBlock with FakeQuants where effopt's quantize pass puts them::

        x(q) ─ conv1 ─ relu ─ FQ ─ conv2 ─ FQ ─┐
         └──────── [conv 1x1 ─ FQ] ────────── add ─ relu ─ FQ
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.q1 = _conv(cin, cout, 3, stride), _fq()
        self.conv2, self.q2 = _conv(cout, cout, 3), _fq()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), _fq())
        self.q_out = _fq()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.q1(torch.relu(self.conv1(x)))
        out = self.q2(self.conv2(out))
        return self.q_out(torch.relu(out + self.shortcut(x)))


class QuantResNet(nn.Module):
    """A CIFAR ResNet (3x3 stem, BasicBlocks, global average pool, fc) with FakeQuants in place.

    ``widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)`` is ResNet-18 (11.2 M parameters).
    Before calibration every FakeQuant passes values through, so the same module exports as
    the float model and, after `calibrate_minmax`, as the int8 one. ``quantize_head=False``
    drops the FakeQuant between the pool and the fc (a deliberately bad placement);
    ``quantize_logits`` adds one on the output; ``stem_pool`` adds a 2x2 max pool after the stem.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        stem_pool: bool = False,
        quantize_head: bool = True,
        quantize_logits: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q_in = _fq()
            self.stem, self.q_stem = _conv(3, widths[0], 3), _fq()
            self.stem_pool = stem_pool
            layers: list[nn.Module] = []
            cin = widths[0]
            for i, (cout, n) in enumerate(zip(widths, blocks, strict=True)):
                for j in range(n):
                    layers.append(QuantBasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.q_pool: nn.Module = _fq() if quantize_head else nn.Identity()
            self.fc = QuantLinear(nn.Linear(cin, 10), HOST_WEIGHT_SCHEME)
            self.q_logits: nn.Module = _fq() if quantize_logits else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_stem(torch.relu(self.stem(self.q_in(x))))
        if self.stem_pool:
            x = F.max_pool2d(x, 2)  # pass-through: no FakeQuant of its own (contract rule 4)
        x = self.q_pool(self.pool(self.layers(x)))
        return self.q_logits(self.fc(torch.flatten(x, 1)))


class _MinMax:
    """The simplest observer: running min and max of everything seen."""

    def __init__(self) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))

    def update(self, x: torch.Tensor) -> None:
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())


def calibrate_minmax(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Weights per channel (`calibrate_weight`), activations by min/max over ``batches``; eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, (QuantConv, QuantLinear)):
            calibrate_weight(module)
    activations = [m for m in model.modules() if isinstance(m, FakeQuant) and m.scheme.axis is None]
    for fq in activations:
        fq.observer = _MinMax()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for fq in activations:
        observer, fq.observer = fq.observer, None
        fq.set_qparams(*qparams_from_range(observer.lo, observer.hi, fq.scheme))
    return model


def cifar_batches(n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(n)]


def _export_quantized(model: nn.Module, path: Path) -> Path:
    calibrate_minmax(model, cifar_batches(2, 8))
    return export_onnx(model, (torch.zeros(2, 3, 32, 32),), ["x"], [True], path, optimize_qdq=False)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_quant")


@pytest.fixture(scope="module")
def good_model(tmp_dir: Path) -> tuple[QuantResNet, Path]:
    """conv-relu-maxpool-(conv-relu-conv + add + relu) x2-gap-fc, placed as the findings say; as exported."""
    model = QuantResNet(widths=(8, 16), blocks=(1, 1), stem_pool=True, quantize_logits=True)
    return model, _export_quantized(model, tmp_dir / "good.onnx")


@pytest.fixture(scope="module")
def good_onnx(good_model: tuple[QuantResNet, Path]) -> Path:
    return good_model[1]


@pytest.fixture(scope="module")
def bad_onnx(tmp_dir: Path) -> Path:
    """The same net without the FakeQuant between the pool and the fc."""
    model = QuantResNet(widths=(8, 16), blocks=(1, 1), stem_pool=True, quantize_head=False, quantize_logits=True)
    return _export_quantized(model, tmp_dir / "bad.onnx")


@pytest.fixture(scope="module")
def inputs() -> Iterator[np.ndarray]:
    yield torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()


# --- numerics -----------------------------------------------------------------------------------


def test_quantize_linear_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.25, 0.75, -1.0, 300.0, -300.0], np.float32)
    got = quantize_linear(x, np.float32(0.5), np.int8(0), axis=1, dtype=np.int8)
    assert got.tolist() == [0, 2, -2, 127, -128]


def test_quantize_linear_per_channel_with_zero_points() -> None:
    w = np.array([[1.0, -1.0], [1.0, -1.0]], np.float32)  # channels on axis 0
    got = quantize_linear(w, np.array([0.5, 0.25], np.float32), np.array([10, 0], np.uint8), 0, np.uint8)
    assert got.tolist() == [[12, 8], [4, 0]]  # row 1: -4 saturates at 0


# --- fold_weight_quantization -------------------------------------------------------------------


def test_exported_file_keeps_float_weights_behind_quantize_linear(good_onnx: Path) -> None:
    """Precondition: without folding, the file stores float32 weights (so the fold has work to do)."""
    model = onnx.load(good_onnx)
    ops = [n.op_type for n in model.graph.node]
    weights = [t for t in model.graph.initializer if len(t.dims) >= 2]
    assert {t.data_type for t in weights} == {TensorProto.FLOAT}
    assert ops.count("QuantizeLinear") > ops.count("DequantizeLinear") - ops.count("QuantizeLinear")
    assert "Clip" in ops


def test_fold_gives_int8_weights_and_removes_weight_quantize(good_onnx: Path) -> None:
    before = onnx.load(good_onnx)
    result = fold_weight_quantization_detailed(before)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) >= 2}
    assert weights and {t.data_type for t in weights.values()} == {TensorProto.INT8}
    assert "stem.conv.weight" in weights  # folded weights keep their names
    assert set(result.folded) == set(weights) and result.skipped == ()
    ops = [n.op_type for n in model.graph.node]
    assert "Clip" not in ops
    assert ops.count("QuantizeLinear") == [n.op_type for n in before.graph.node].count("QuantizeLinear") - len(weights)
    assert result.int_bytes < 0.3 * result.float_bytes


def test_fold_keeps_onnxruntime_outputs_bit_identical(good_onnx: Path, inputs: np.ndarray) -> None:
    folded = fold_weight_quantization(onnx.load(good_onnx))
    np.testing.assert_array_equal(_run(folded, inputs), _run(good_onnx, inputs))


def test_fold_codes_equal_torch_fake_quant_codes(good_model: tuple[QuantResNet, Path]) -> None:
    """The int8 codes are the ones the FakeQuant computes (torch rounds x·(1/s), ONNX x/s: same here)."""
    model, path = good_model
    weights = {t.name: numpy_helper.to_array(t) for t in fold_weight_quantization(onnx.load(path)).graph.initializer}
    conv = model.layers[0].conv1
    fq = conv.weight_quant
    expected = torch.ops.quantized_decomposed.quantize_per_channel(
        conv.weight.detach(), fq.scale, fq.zero_point.long(), 0, -127, 127, torch.int8
    )
    np.testing.assert_array_equal(weights["layers.0.conv1.conv.weight"], expected.numpy())


def test_fold_is_smaller_and_deterministic(good_onnx: Path) -> None:
    first = fold_weight_quantization(onnx.load(good_onnx)).SerializeToString(deterministic=True)
    second = fold_weight_quantization(onnx.load(good_onnx)).SerializeToString(deterministic=True)
    assert first == second
    assert len(first) < 0.5 * good_onnx.stat().st_size


def test_fold_is_idempotent_and_leaves_float_models_alone(good_onnx: Path) -> None:
    once = fold_weight_quantization(onnx.load(good_onnx))
    twice = fold_weight_quantization_detailed(once)
    assert twice.folded == () and twice.skipped == ()
    assert [n.op_type for n in twice.model.graph.node] == [n.op_type for n in once.graph.node]


def test_fold_declines_float16_weights_with_a_reason() -> None:
    w = numpy_helper.from_array(np.ones((4, 2), np.float16), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float16), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="q_w"),
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dq_w"),
            helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2])],
        [w, scale, zero],
    )
    result = fold_weight_quantization_detailed(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert result.folded == ()
    assert result.skipped == (("q_w", "float16 weight / float16 scale: only float32 is folded"),)
    assert [n.op_type for n in result.model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "MatMul"]


def test_shared_weight_is_folded_once_per_reader_and_float_copy_kept() -> None:
    """A weight also read in float keeps its float initializer; the int8 copy gets a new name."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2), "w")
    scale = numpy_helper.from_array(np.array(1 / 127, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="q_w"),
            helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dq_w"),
            helper.make_node("MatMul", ["x", "wd"], ["y1"], name="mm_q"),
            helper.make_node("MatMul", ["x", "w"], ["y2"], name="mm_f"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 2])],
        [w, scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    result = fold_weight_quantization_detailed(model)
    inits = {t.name: t.data_type for t in result.model.graph.initializer}
    assert inits["w"] == TensorProto.FLOAT and inits["wq"] == TensorProto.INT8
    assert result.folded == ("wq",)
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    after = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


# --- bias and mean rewrites ---------------------------------------------------------------------


def test_quantized_bias_lets_a_float_output_linear_run_as_qgemm(tmp_dir: Path, inputs: np.ndarray) -> None:
    """An fc without an output FakeQuant stays a float Gemm unless its bias is an int32 DQ."""
    model = QuantResNet(widths=(8,), blocks=(1,), seed=2)
    path = _export_quantized(model, tmp_dir / "float_logits.onnx")
    plain, biased = tmp_dir / "plain.onnx", tmp_dir / "biased.onnx"
    onnx.save(fold_weight_quantization(onnx.load(path)), plain)
    onnx.save(fold_weight_quantization(onnx.load(path), quantize_bias=True), biased)
    assert dict(ort_fusion_report(plain).float_compute_ops).get("Gemm") == 1  # precondition
    report = ort_fusion_report(biased)
    assert "Gemm" not in dict(report.float_compute_ops) and dict(report.int8_ops)["QGemm"] == 1
    expected = _run(plain, inputs)  # same int8 path up to the fc; only the bias rounding differs
    np.testing.assert_allclose(_run(biased, inputs), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_quantized_bias_is_bit_identical_where_onnxruntime_quantizes_it_anyway(
    good_onnx: Path, inputs: np.ndarray
) -> None:
    """Conv biases: onnxruntime's WeightBiasQuantization computes the same int32 codes at load."""
    plain = fold_weight_quantization(onnx.load(good_onnx))
    biased = fold_weight_quantization(onnx.load(good_onnx), quantize_bias=True)
    dq_bias = [t for t in biased.graph.initializer if t.data_type == TensorProto.INT32]
    assert len(dq_bias) == 7  # stem + 2 blocks x 2 convs + 1 shortcut conv + fc
    np.testing.assert_array_equal(_run(biased, inputs), _run(plain, inputs))


def test_mean_rewrite_makes_the_pool_int8(good_onnx: Path, inputs: np.ndarray) -> None:
    folded = fold_weight_quantization(onnx.load(good_onnx))
    rewritten = reduce_mean_to_global_pool(folded)
    assert "ReduceMean" in [n.op_type for n in folded.graph.node]  # precondition
    assert "ReduceMean" not in [n.op_type for n in rewritten.graph.node]
    onnx.checker.check_model(rewritten, full_check=True)
    path = good_onnx.with_name("good_gap.onnx")
    onnx.save(rewritten, path)
    report = ort_fusion_report(path)
    assert report.float_compute_ops == () and "QLinearGlobalAveragePool" in dict(report.int8_ops)
    np.testing.assert_allclose(_run(rewritten, inputs), _run(folded, inputs), rtol=0, atol=0.05)


def test_conv_weights_lose_their_zero_points_and_still_fuse(good_onnx: Path, inputs: np.ndarray, tmp_dir: Path) -> None:
    folded = reduce_mean_to_global_pool(fold_weight_quantization(onnx.load(good_onnx), quantize_bias=True))
    dropped = drop_conv_weight_zero_points(folded)
    readers = {name: n.op_type for n in dropped.graph.node for name in n.input}
    inits = {i.name for i in dropped.graph.initializer}
    weight_dq = [n for n in dropped.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and n.output[0] in readers and readers[n.output[0]] in ("Conv", "Gemm")
                 and not n.input[0].endswith("int32")]
    assert {readers[n.output[0]] for n in weight_dq} == {"Conv", "Gemm"}  # precondition: both kinds present
    for n in weight_dq:  # Conv: no zero point; Gemm keeps its own (onnxruntime needs it for QGemm)
        assert len(n.input) == (2 if readers[n.output[0]] == "Conv" else 3), n.name
    assert dropped.ByteSize() < folded.ByteSize()
    onnx.checker.check_model(dropped, full_check=True)
    path = tmp_dir / "no_zero_points.onnx"
    onnx.save(dropped, path)
    report = ort_fusion_report(path)
    assert report.float_compute_ops == () and "QGemm" in dict(report.int8_ops)
    np.testing.assert_array_equal(_run(dropped, inputs), _run(folded, inputs))


# --- ort_fusion_report --------------------------------------------------------------------------


def test_good_placement_fuses_conv_add_pool_and_linear(good_onnx: Path) -> None:
    report = ort_fusion_report(good_onnx)
    int8 = dict(report.int8_ops)
    assert int8["QLinearConv"] == 6 and int8["QLinearAdd"] == 2 and int8["NhwcMaxPool"] == 1
    assert int8["QGemm"] == 1
    floats = dict(report.float_compute_ops)
    assert "Conv" not in floats and "FusedConv" not in floats and "Add" not in floats
    assert floats == {"ReduceMean": 1}  # the one op onnxruntime has no QDQ kernel for (see the rewrite)
    assert report.redundant_qdq == ()
    assert report.summary().startswith("int8: NhwcMaxPool 1, QGemm 1, QLinearAdd 2, QLinearConv 6 | float: ReduceMean 1")


def test_missing_fake_quant_before_linear_shows_as_float_gemm(bad_onnx: Path) -> None:
    report = ort_fusion_report(bad_onnx)
    assert dict(report.float_compute_ops)["Gemm"] == 1
    assert any(name.endswith("(Gemm)") for name in report.float_compute_nodes)
    assert dict(report.int8_ops)["QLinearConv"] == 6  # the rest still fuses


def test_file_report_sees_only_float_ops_before_onnxruntime(good_onnx: Path) -> None:
    """The file itself has float Conv between DQ and Q: only onnxruntime's graph proves the fusion."""
    report = qdq_graph_report(onnx.load(good_onnx))
    assert dict(report.int8_ops) == {"Clip": 7}  # the weight codes' Clip(-127, 127), on int8
    assert dict(report.float_compute_ops)["Conv"] == 6


def test_ort_fusion_report_names_the_file_on_failure(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EmitError, match="broken.onnx: onnxruntime cannot optimize"):
        ort_fusion_report(bad)


def _qdq_chain(second_scale: float) -> onnx.ModelProto:
    """x ─ Q(s=0.1) ─ DQ(s=0.1) ─ Q(s=second) ─ DQ(s=second) ─ Relu."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s1"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s1_copy"),  # equal values, other name
        numpy_helper.from_array(np.array(second_scale, np.float32), "s2"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z"], ["a"], name="q1"),
        helper.make_node("DequantizeLinear", ["a", "s1", "z"], ["b"], name="dq1"),
        helper.make_node("QuantizeLinear", ["b", "s1_copy" if second_scale == 0.1 else "s2", "z"], ["c"], name="q2"),
        helper.make_node("DequantizeLinear", ["c", "s2", "z"], ["d"], name="dq2"),
        helper.make_node("Relu", ["d"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_redundant_qdq_pair_is_found_by_value() -> None:
    report = qdq_graph_report(_qdq_chain(0.1))
    assert report.redundant_qdq == (("dq1", "q2"),)
    assert (report.quantize_nodes, report.dequantize_nodes) == (2, 2)
    assert dict(report.float_compute_ops) == {"Relu": 1}
    assert "redundant 1" in report.summary()


def test_requantize_with_other_scale_is_not_redundant() -> None:
    assert qdq_graph_report(_qdq_chain(0.2)).redundant_qdq == ()


# --- placement tables ---------------------------------------------------------------------------


def test_placement_tables_use_canonical_kinds() -> None:
    assert {"conv", "linear", "matmul", "add", "cat", "avg_pool"} <= ORT_INT8_KINDS
    assert {"relu", "relu6", "hardtanh", "clamp"} == set(FUSED_ACTIVATIONS)
    assert {"max_pool", "flatten", "view", "reshape"} <= PASS_THROUGH_KINDS
    tables = [ORT_INT8_KINDS, PASS_THROUGH_KINDS, TIED_QPARAMS_KINDS, FLOAT_KINDS, frozenset(FUSED_ACTIVATIONS)]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not (a & b), a & b
    assert all(role(k) == "float" for k in FLOAT_KINDS)  # measured float in onnxruntime: the contract agrees


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "zero", "fuses"),
    [
        (0.0, 6.0, 6 / 255, 0, True),          # relu6 calibrated by min/max
        (0.0, 6.0, 10 / 255, 0, False),        # a learned scale past 6: conv falls back to float
        (-1.0, 1.0, 2 / 255, 128, False),      # hardtanh with plain asymmetric params
        (-1.0, 1.0, 1 / 128, 128, True),       # ... and with params inside [-1, 1]
        (0.0, float("inf"), 0.1, 0, True),     # relu: zero point at qmin
        (0.0, float("inf"), 0.1, 3, False),
    ],
)
def test_activation_fuses_matches_onnxruntime_rule(lo: float, hi: float, scale: float, zero: int, fuses: bool) -> None:
    assert activation_fuses(lo, hi, scale, zero, ACTIVATION_SCHEME) is fuses
