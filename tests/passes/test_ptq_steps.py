"""The quantize pass's accuracy-keeping steps together: options, the report, and every lowering.

The steps only change float weights, biases and scales before the fake-quant graph is lowered, so
a model quantized with all of them on must still lower to ONNX QDQ (int8 kernels in onnxruntime),
torch's x86 int8 kernels and an integer-only program, and agree with its fake-quant self there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from effopt.errors import RecipeError
from effopt.optimizer.frontend.data import DataSource, sklearn_digits
from effopt.optimizer.ir.core import IR
from effopt.optimizer.quant.schemes import QuantConv, QuantLinear
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from effopt.passes.ptq_steps import AdaRoundOptions
from examples.digits import DigitsNet
from tests.passes.helpers import build_ir, host_kernel_context, recipe_passes

ALL_ON = {"name": "quantize", "equalize": True, "bias_correction": True, "adaround": {"iterations": 100},
          "calibration_batches": 4}


def test_options_come_from_the_recipe_with_their_defaults() -> None:
    (q,) = recipe_passes({"name": "quantize", "adaround": True})
    assert q.options.equalize == "auto" and q.options.bias_correction == "auto"
    (q,) = recipe_passes({"name": "quantize", "adaround": {"iterations": 50, "seed": 7}})
    assert isinstance(q.options.adaround, AdaRoundOptions) and q.options.adaround.iterations == 50
    with pytest.raises(RecipeError, match="adaround"):
        recipe_passes({"name": "quantize", "adaround": {"iteration": 50}})


@pytest.fixture(scope="module")
def digits_all_on(digits_checkpoint: Path) -> dict:
    model = DigitsNet()
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    model.eval()
    train = DataSource("sklearn-digits:train", sklearn_digits("train"), 64, True)
    ctx = PassContext(profile=host_kernel_context().profile, calibration=train)
    ir, records = run_passes(build_ir(model, (1, 1, 8, 8)),
                             recipe_passes("fold_batchnorm", "eliminate_dead_code", ALL_ON), ctx)
    x, y = sklearn_digits("test").tensors
    return {"ir": ir, "result": records[-1].result, "x": x, "y": y, "float": model}


def _top1(out: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    out = torch.as_tensor(np.asarray(out))
    return float((out.argmax(1) == ref.argmax(1)).double().mean())


def test_all_steps_ran_and_report_every_layer(digits_all_on: dict) -> None:
    result, ir = digits_all_on["result"], digits_all_on["ir"]
    layers = [n.name for n in ir.gm.graph.nodes
              if n.op == "call_module" and isinstance(ir.module_of(n), (QuantConv, QuantLinear))]
    assert [r["layer"] for r in result.details] == layers
    assert result.stats["equalized_pairs"] >= 3 and result.stats["bias_corrected_layers"] == len(layers)
    assert result.stats["adarounded_layers"] >= 1
    keys = set(result.details[0])
    assert all(set(r) == keys for r in result.details)  # one table: the same columns in every row
    with torch.no_grad():
        fake = ir.gm.eval()(digits_all_on["x"])
        want = digits_all_on["float"](digits_all_on["x"])
    assert _top1(fake, want) >= 0.99


def test_onnx_qdq_lowering_runs_int8_in_onnxruntime_and_agrees(digits_all_on: dict, tmp_path: Path) -> None:
    import onnx

    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.runtime import open_session

    ir: IR = digits_all_on["ir"]
    path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    session = open_session(path)
    x = digits_all_on["x"]
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        fake = ir.gm.eval()(x)
    assert _top1(out, fake) >= 0.99
    assert np.abs(out - fake.numpy()).max() < 0.1 * float(fake.abs().max())


def test_torch_int8_lowering_agrees(digits_all_on: dict) -> None:
    from effopt.optimizer.lower.torch_int8 import Unsupported, int8_agreement, int8_engine, lower_to_torch_int8

    if int8_engine() is None:
        pytest.skip("this torch build has no x86 int8 engine")
    ir: IR = digits_all_on["ir"]
    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered
    x = digits_all_on["x"]
    agreement = int8_agreement(ir.gm, lowered, [(x[i:i + 128],) for i in range(0, len(x), 128)])
    assert agreement.top1 is not None and agreement.top1 >= 0.99, agreement
    assert agreement.output_step is not None and agreement.max_abs_err <= 3 * agreement.output_step, agreement


def test_integer_only_lowering_agrees(digits_all_on: dict) -> None:
    from effopt.optimizer.lower.integer import IntegerExecutor, lower_to_integer, reference_integer_model

    ir: IR = digits_all_on["ir"]
    x = digits_all_on["x"]
    program = lower_to_integer(ir.gm, (x[:2],))
    inputs = program.quantize_inputs(x)
    (got,) = IntegerExecutor(program).run(*inputs)
    (ref,) = reference_integer_model(program)(*(torch.from_numpy(a) for a in inputs))
    np.testing.assert_array_equal(got, ref.numpy())  # the executor is the integer program, bit for bit
    with torch.no_grad():
        fake = ir.gm.eval()(x)
    assert float((torch.from_numpy(got.astype(np.int64)).argmax(1) == fake.argmax(1)).double().mean()) >= 0.98


def test_auto_that_keeps_nothing_leaves_the_result_as_before() -> None:
    """``equalize``/``bias_correction`` off and auto-without-data both give the plain pass's result (report bytes)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    off = {"name": "quantize", "mode": "weight_only", "equalize": False, "bias_correction": False}
    auto = {"name": "quantize", "mode": "weight_only"}  # no data: auto cannot measure, so it does nothing
    a, (ra,) = run_passes(build_ir(model, (1, 8)), recipe_passes(off), PassContext())
    b, (rb,) = run_passes(build_ir(model, (1, 8)), recipe_passes(auto), PassContext())
    assert ra.result.details == rb.result.details == () and ra.result.skipped == rb.result.skipped == ()
    assert dict(ra.result.stats) == dict(rb.result.stats)
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(a.gm(x), b.gm(x))


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10)).eval()


def _quantize_small_cnn(**options: object) -> tuple[dict[str, dict], dict[str, float], tuple[str, ...]]:
    train = DataSource("sklearn-digits:train", sklearn_digits("train"), 64, True)
    ctx = PassContext(profile=host_kernel_context().profile, calibration=train)
    spec = {"name": "quantize", "equalize": False, "bias_correction": False, "calibration_batches": 2, **options}
    _, (record,) = run_passes(build_ir(_small_cnn(), (1, 1, 8, 8)), recipe_passes(spec), ctx)
    r = record.result
    return {row["layer"]: row for row in r.details}, r.stats, r.warnings


def test_adaround_auto_rounds_4_bit_weights_and_leaves_8_bit_alone() -> None:
    """The default ``adaround: auto`` learns the rounding at 4 bits (kept where it beats nearest) and does
    not run at 8 bits, where it costs seconds for a gain benchmarks/ptq.py cannot tell from noise."""
    rows, stats, _ = _quantize_small_cnn(bits=4)
    assert stats["adarounded_layers"] >= 1
    assert all(r["adaround_error_on"] <= r["adaround_error_off"] for r in rows.values() if r["adaround"] == "on")
    rows8, stats8, _ = _quantize_small_cnn()
    assert "adarounded_layers" not in stats8 and not rows8  # nothing ran, nothing reported


def test_adaround_auto_stops_at_its_compute_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers whose estimated cost no longer fits the budget keep nearest rounding, with a row and a note."""
    import effopt.passes.ptq_steps as steps

    conv = QuantConv(nn.Conv2d(32, 64, 3))
    assert steps.adaround_cost(conv, 300) == pytest.approx(300 * (2 * 64 * 288**2 + steps.STEP_OVERHEAD_FLOPS))
    wide = QuantLinear(nn.Linear(4096, 8))  # 4096² Gram values > GRAM_LIMIT: never within auto's budget
    assert steps.adaround_cost(wide, 1) == float("inf")
    first_two = steps.adaround_cost(QuantConv(nn.Conv2d(1, 8, 3)), 300) + steps.adaround_cost(
        QuantConv(nn.Conv2d(8, 16, 3)), 300)
    monkeypatch.setattr(steps, "AUTO_ADAROUND_FLOPS", first_two * 1.01)  # the linear (d = 1024) no longer fits
    rows, stats, warnings = _quantize_small_cnn(bits=4)
    last = list(rows)[-1]
    assert rows[last]["adaround"] == "off (auto: over its compute budget)"
    assert any(f"({last})" in w and "adaround: true" in w for w in warnings)
