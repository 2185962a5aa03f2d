"""The quantize pass: graph contract, calibration, numerics, modes, QAT, mixed precision, lowering to QDQ."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from effopt.errors import PassError, RecipeError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.ir.analysis import annotate, layer_rows, totals
from effopt.optimizer.frontend.data import DataSource, sklearn_digits
from effopt.optimizer.train.finetune import FineTuner
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from effopt.optimizer.quant.schemes import FakeQuant, QuantConv, QuantLinear
from effopt.optimizer.ir.trace import trace_module
from tests.models import ZOO, make_input
from tests.passes.helpers import recipe_passes


passes = recipe_passes


def random_source(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> DataSource:
    g = torch.Generator().manual_seed(seed)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


def build(name: str) -> tuple[nn.Module, IR]:
    builder, shape = ZOO[name]
    model = builder()
    ir = annotate(IR(trace_module(model), (InputSpec("x", shape),), (make_input(shape),)))
    return model, ir


def fake_quants(ir: IR) -> list[torch.fx.Node]:
    return [n for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(ir.gm.get_submodule(str(n.target)), FakeQuant)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b**2).sum())


@pytest.mark.parametrize("name", ["resnet_style", "vgg_style", "mobilenet_style", "concat_net", "conv1d_net", "mlp"])
def test_static_quantization_follows_the_contract_and_stays_close(name: str) -> None:
    """
    x ─q─ conv ─relu─q─ conv ─q─ add ─relu─q─ ... : every conv/linear reads and writes quantized values,
    conv+relu and add+relu share one quantizer, max pool / flatten carry their input's quantizer.
    """
    model, ir = build(name)
    shape = ZOO[name][1]
    convs_before = [n for n in ir.gm.graph.nodes if n.op == "call_module"
                    and isinstance(ir.module_of(n), (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert convs_before and not fake_quants(ir)  # precondition
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=random_source(shape))
    ir, (fold, quant) = run_passes(ir, passes("fold_batchnorm", "quantize"), ctx)
    layers = [n for n in ir.gm.graph.nodes if n.op == "call_module" and isinstance(ir.module_of(n), (QuantConv, QuantLinear))]
    assert len(layers) == len(convs_before)
    assert quant.result.stats["quantized_layers"] == len(layers)
    for n in layers:  # rule 2: input quantized, output requantized (directly or after a fused relu)
        src = n.args[0]
        while not (src.op == "call_module" and isinstance(ir.gm.get_submodule(str(src.target)), FakeQuant)):
            src = src.args[0]
        users = list(n.users)
        if len(users) == 1 and users[0].op != "output" and not isinstance(
                ir.gm.get_submodule(str(users[0].target)) if users[0].op == "call_module" else None, FakeQuant):
            users = list(users[0].users)
        assert all(u.op == "call_module" and isinstance(ir.gm.get_submodule(str(u.target)), FakeQuant) for u in users), n
    x = make_input(shape, seed=3)
    with torch.no_grad():
        err = rel_error(ir.gm(x), model(x))
    assert 0 < err < 0.02, err  # quantized: not identical, but close
    after = totals(ir)
    if quant.before.params > 5000:  # in tiny models per-channel scales and fp32 biases weigh as much as weights
        assert after.size_bytes < 0.4 * quant.before.size_bytes
    int8_layers = [f for n, f in layer_rows(ir) if n in layers]
    assert all(f.compute_dtype == "int8" for f in int8_layers)


def test_calibration_is_required_for_static_mode() -> None:
    _, ir = build("vgg_style")
    with pytest.raises(PassError, match="needs calibration data.*data.calibration"):
        run_passes(ir, passes("quantize"), PassContext())


def test_quantize_must_follow_fold_batchnorm() -> None:
    with pytest.raises(RecipeError, match="'quantize' must run after 'fold_batchnorm'"):
        passes("quantize", "fold_batchnorm")


def test_options_are_validated_with_their_path() -> None:
    with pytest.raises(RecipeError, match=r"passes\[0\]\.bits"):
        passes({"name": "quantize", "bits": 3})
    with pytest.raises(RecipeError, match="qat and mixed_precision need mode: static"):
        passes({"name": "quantize", "mode": "dynamic", "mixed_precision": True})


def test_weight_only_keeps_float_compute_and_shrinks_weights() -> None:
    model, ir = build("mlp")
    ir, (record,) = run_passes(ir, passes({"name": "quantize", "mode": "weight_only", "bits": 4}), PassContext())
    assert not fake_quants(ir)
    rows = [f for _, f in layer_rows(ir) if f.op_kind == "linear"]
    assert rows and all(f.compute_dtype == "fp32" for f in rows)
    assert totals(ir).size_bytes < 0.2 * record.before.size_bytes  # 4-bit weights
    x = make_input(ZOO["mlp"][1])
    with torch.no_grad():
        assert 0 < rel_error(ir.gm(x), model(x)) < 0.05


def test_dynamic_mode_quantizes_linear_inputs_per_batch() -> None:
    model, ir = build("mlp")
    ir, _ = run_passes(ir, passes({"name": "quantize", "mode": "dynamic"}), PassContext())
    x = make_input(ZOO["mlp"][1])
    with torch.no_grad():
        small, big = ir.gm(x), ir.gm(100 * x)
        assert 0 < rel_error(small, model(x)) < 0.01
        assert rel_error(big, model(100 * x)) < 0.01  # a calibrated static range would clip 100× inputs


def test_sites_the_pass_cannot_handle_are_reported() -> None:
    _, ir = build("shared_module_net")
    ctx = PassContext(calibration=random_source(ZOO["shared_module_net"][1]))
    ir, (record,) = run_passes(ir, passes("quantize"), ctx)
    assert any("shared by several call sites" in s.reason for s in record.result.skipped)


@pytest.mark.parametrize("name", ["classifier.4", "classifier_4"])  # a module path or its fx node name
def test_keep_float_leaves_the_named_layer_in_float_and_says_so(name: str) -> None:
    """vgg_style's last Linear (module ``classifier.4``, node ``classifier_4``) stays float; the others quantize."""
    # setup
    _, ir = build("vgg_style")
    shape = ZOO["vgg_style"][1]
    assert isinstance(ir.gm.get_submodule("classifier.4"), nn.Linear)  # precondition: the layer exists
    assert "classifier_4" in [n.name for n in ir.gm.graph.nodes]
    # execute
    ir, (record,) = run_passes(ir, passes({"name": "quantize", "keep_float": [name]}),
                               PassContext(calibration=random_source(shape)))
    # assert
    kept = ir.gm.get_submodule("classifier.4")
    assert type(kept) is nn.Linear
    assert [s.node for s in record.result.skipped if s.reason == "listed in keep_float"] == ["classifier_4"]
    assert "classifier_4" not in record.result.changed
    assert isinstance(ir.gm.get_submodule("classifier.0"), QuantLinear)  # the pass did run on the rest
    assert record.result.stats["quantized_layers"] == 5  # 4 convs + classifier.0


def test_int8_only_target_runs_a_fully_quantized_conv_net() -> None:
    from effopt.optimizer.ir.cost_model import estimate

    _, ir = build("vgg_style")
    mcu = load_profile("cortex-m7")
    assert estimate(ir, mcu).unsupported  # precondition: the float model cannot run there
    ctx = PassContext(profile=mcu, calibration=random_source(ZOO["vgg_style"][1]))
    ir, _ = run_passes(ir, passes("fold_batchnorm", "eliminate_dead_code", "quantize"), ctx)
    left = [c.node for c in estimate(ir, mcu).unsupported]
    assert left == [], left


def test_qdq_model_runs_int8_in_onnxruntime_and_agrees(tmp_path: Path) -> None:
    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.verify import compare_onnx

    model, ir = build("resnet_style")
    shape = ZOO["resnet_style"][1]
    ir, _ = run_passes(ir, passes("fold_batchnorm", "quantize"), PassContext(calibration=random_source(shape)))
    path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "q.onnx")
    agreement = compare_onnx(path, ir.gm, [(make_input(shape, seed=5),)], rtol=0.05, atol=0.05)
    assert agreement.passed, agreement
    import onnx

    from effopt.optimizer.lower.ort_fusion import ort_fusion_report

    proto = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == sum(isinstance(m, QuantConv) for m in ir.gm.modules())  # weights stored as int8
    fusion = ort_fusion_report(path)
    assert dict(fusion.int8_ops).get("QLinearConv", 0) >= 3 and dict(fusion.int8_ops).get("QLinearAdd", 0) >= 2
    assert "Conv" not in dict(fusion.float_compute_ops), fusion.summary()


@pytest.mark.parametrize(("bits", "higher"), [(4, "7-bit"), (8, "float")])  # x86-avx2: int8_weight_bits 7
def test_mixed_precision_promotes_the_most_sensitive_layers_until_within_budget(bits: int, higher: str) -> None:
    model, _ = build("vgg_style")
    shape = ZOO["vgg_style"][1]
    x = make_input(shape, seed=7)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=random_source(shape))
    plain, _ = run_passes(build("vgg_style")[1], passes("fold_batchnorm", {"name": "quantize", "bits": bits}), ctx)
    with torch.no_grad():
        plain_err = rel_error(plain.gm(x), model(x))
    budget = plain_err / 4  # precondition: plain quantization misses this budget
    spec = {"name": "quantize", "bits": bits, "mixed_precision": True, "max_output_error": budget}
    ir, (_, record) = run_passes(build("vgg_style")[1], passes("fold_batchnorm", spec), ctx)
    notes = [w for w in record.result.warnings if w.startswith("mixed precision")]
    assert len(notes) == record.result.stats["quantized_layers"]
    promoted = [w for w in notes if w.endswith(f"→ {higher}")]
    assert len(promoted) == record.result.stats["promoted_by_sensitivity"] >= 1
    with torch.no_grad():
        assert rel_error(ir.gm(x), model(x)) < plain_err
    from effopt.optimizer.quant.schemes import freeze_weights

    frozen = freeze_weights(copy.deepcopy(ir.gm))
    layers = [m for m in frozen.modules() if isinstance(m, (QuantConv, QuantLinear))]
    kept_float = [m for m in layers if not m.weight_quant.enabled]
    assert len(kept_float) == (len(promoted) if higher == "float" else 0)
    assert all(getattr(m, "weight_codes", None) is None for m in kept_float)  # float layers ship float weights
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), ir.gm(x))


def _digits_ctx(train_epochs: int = 8) -> tuple[nn.Module, PassContext, DataSource]:
    from examples.digits import train

    model, _ = train(epochs=train_epochs)
    train_src = DataSource("sklearn-digits:train", sklearn_digits("train"), 64, True)
    eval_src = DataSource("sklearn-digits:test", sklearn_digits("test"), 128, True)
    tuner = FineTuner(train_src, eval_src, "classification", seed=0)
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=train_src, services={"finetune": tuner})
    return model, ctx, eval_src


def _accuracy(model: nn.Module, source: DataSource) -> float:
    correct = total = 0
    with torch.no_grad():
        for b in source.batches():
            correct += int((model(*b.inputs).argmax(1) == b.labels).sum())
            total += len(b.labels)
    return correct / total


def _digits_ir(model: nn.Module) -> IR:
    spec = InputSpec("x", (1, 1, 8, 8))
    return annotate(IR(trace_module(model), (spec,), (torch.zeros(1, 1, 8, 8),)))


def test_int8_ptq_on_real_digits_stays_within_half_a_point() -> None:
    model, ctx, eval_src = _digits_ctx()
    ir, _ = run_passes(_digits_ir(model), passes("fold_batchnorm", "eliminate_dead_code", "quantize"), ctx)
    before, after = _accuracy(model, eval_src), _accuracy(ir.gm, eval_src)
    assert after >= before - 0.005, (before, after)


def test_qat_at_4_bits_recovers_what_4_bit_ptq_lost() -> None:
    model, ctx, eval_src = _digits_ctx()
    float_acc = _accuracy(model, eval_src)
    plain = {"name": "quantize", "bits": 4, "equalize": False, "bias_correction": False,
             "adaround": False}  # nearest rounding only
    ptq4, _ = run_passes(_digits_ir(copy.deepcopy(model)), passes("fold_batchnorm", plain), ctx)
    qat4, (_, rec) = run_passes(
        _digits_ir(copy.deepcopy(model)),
        passes("fold_batchnorm", {"name": "quantize", "bits": 4, "qat": {"epochs": 3, "lr": 1e-3, "progress": False}}),
        ctx,
    )
    ptq_acc, qat_acc = _accuracy(ptq4.gm, eval_src), _accuracy(qat4.gm, eval_src)
    assert ptq_acc < float_acc - 0.01, (float_acc, ptq_acc)  # precondition: 4-bit PTQ really loses accuracy
    assert qat_acc > ptq_acc + 0.5 * (float_acc - ptq_acc), (float_acc, ptq_acc, qat_acc)
    assert rec.result.stats["qat_steps"] > 0


def test_ste_passes_gradients_through_rounding() -> None:
    from effopt.optimizer.quant.schemes import ACTIVATION_SCHEME, fake_quantize

    x = torch.linspace(-1, 2, 50, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.05), torch.tensor(20, dtype=torch.int32), ACTIVATION_SCHEME)
    y.sum().backward()
    inside = (x.detach() > -1.0 + 1e-6) & (x.detach() < 0.05 * (255 - 20))
    assert torch.equal(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert 0.02 < float((y - x).detach().abs().max()) <= 0.025 + 1e-6  # at most half a step away
