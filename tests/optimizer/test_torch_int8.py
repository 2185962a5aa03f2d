"""Tests for effopt.optimizer.lower.torch_int8: lowering quantized graphs to torch's x86 int8 kernels.

Each model is quantized the way a recipe does it (fold_batchnorm, eliminate_dead_code,
quantize through the pass manager, with calibration data), then lowered. Every test first
asserts its precondition (the source graph really is fake-quantized), checks structure (the
lowered graph holds torch.ao quantized modules / quantized ops and no FakeQuant) and
numerics against the fake-quant graph in eval mode, in output quantization steps.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from effopt.hardware_profiles import load_profile
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.frontend.data import DataSource, sklearn_digits
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from effopt.optimizer.quant.schemes import FakeQuant, QScheme, QuantConv, QuantLinear
from effopt.optimizer.lower.torch_int8 import (
    TORCH_INT8_NOTE,
    Unsupported,
    int8_agreement,
    int8_engine,
    int8_summary,
    lower_to_torch_int8,
    quantized_engine,
)
from effopt.optimizer.emit.torchscript import load_torchscript, save_torchscript
from effopt.optimizer.ir.trace import trace_module
from effopt.recipes import parse_recipe
from examples.digits import DigitsNet
from tests.models import ZOO, make_input, randomize_bn, seeded

pytestmark = pytest.mark.skipif(int8_engine() is None, reason="this torch build has no x86 int8 engine")

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_CHECKPOINT = REPO_ROOT / "recipes" / "checkpoints" / "digits.pt"
MAX_STEPS = 2.0  # int8 kernels vs fake-quant: rounding ties may flip a code, and flips propagate a little

# --- helpers ----------------------------------------------------------------------------------


def recipe_passes(*entries: object) -> tuple:
    recipe = {"version": 1, "model": {"factory": "m:f"}, "inputs": [{"name": "x", "shape": [1]}],
              "passes": list(entries)}
    return parse_recipe(recipe).passes


def quantized_ir(model: nn.Module, shape: tuple[int, ...], calibration: DataSource,
                 quantize: object = "quantize") -> IR:
    ir = annotate(IR(trace_module(model), (InputSpec("x", shape),), (make_input(shape),)))
    ctx = PassContext(profile=load_profile("x86-avx2"), calibration=calibration)
    ir, _ = run_passes(ir, recipe_passes("fold_batchnorm", "eliminate_dead_code", quantize), ctx)
    return ir


def random_source(shape: tuple[int, ...], n: int = 64) -> DataSource:
    g = torch.Generator().manual_seed(0)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


def fake_quants(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuant)]


def int8_modules(gm: nn.Module) -> list[str]:
    """torch.ao quantized layers (not their packed-weight holders), e.g. ["ConvReLU2d", "Linear"]."""
    prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return [type(m).__name__ for m in gm.modules()
            if type(m).__module__.startswith(prefixes) and not type(m).__name__.endswith("PackedParams")]


def quantized_ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("quantized.")]


# --- graph builders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    int8_modules: tuple[str, ...]      # torch.ao quantized module types in the lowered graph, sorted
    quantized_ops: tuple[str, ...] = ()  # torch.ops.quantized calls, sorted


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(F.relu(self.bn1(self.conv1(x))))
        y = F.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.avgpool(y), 1))


def residual_net() -> tuple[nn.Module, tuple[int, ...], Expected]:
    """
    x ─q─ conv1 ─ bn ─ relu ─q─ maxpool ─┬─ conv2 ─q─ add ─ relu ─q─ avgpool ─q─ flatten ─ fc ─q─ out
                                         └────────────┘
    conv+relu → ConvReLU2d, the residual add+relu → quantized::add_relu, max pool and flatten
    on quint8 tensors, fc → quantized Linear.
    """
    with seeded(0):
        model = randomize_bn(ResidualNet(), 0).eval()
    return model, (2, 3, 16, 16), Expected(("ConvReLU2d", "Conv2d", "Linear"), ("quantized.add_relu",))


def zoo(name: str, expected: Expected) -> Callable[[], tuple[nn.Module, tuple[int, ...], Expected]]:
    def build() -> tuple[nn.Module, tuple[int, ...], Expected]:
        builder, shape = ZOO[name]
        return builder(), shape, expected

    build.__name__ = name
    return build


BUILDERS = [
    residual_net,
    # depthwise convs with relu6 (hardtanh on quint8 after a plain Conv2d), residual add without relu
    zoo("mobilenet_style", Expected(("Conv2d",) * 10 + ("Linear",), ("quantized.add",) * 2)),
    zoo("conv1d_net", Expected(("ConvReLU1d", "ConvReLU1d", "Linear"))),  # Conv1d, AdaptiveAvgPool1d
    zoo("concat_net", Expected(("Conv2d",) * 3, ("quantized.cat",))),  # two branches, cat, 1x1 conv; no relu
]


# --- lowering: structure and numerics ----------------------------------------------------------


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_lowered_graph_runs_on_int8_kernels_and_matches_fake_quant(builder: Callable) -> None:
    model, shape, expected = builder()
    ir = quantized_ir(model, shape, random_source(shape))
    layers = [m for m in ir.gm.modules() if isinstance(m, (QuantConv, QuantLinear))]
    assert fake_quants(ir.gm) and layers  # precondition: a fake-quantized graph

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert not isinstance(lowered, Unsupported), lowered
    assert sorted(int8_modules(lowered)) == sorted(expected.int8_modules)
    assert sorted(quantized_ops(lowered)) == sorted(expected.quantized_ops)
    assert not fake_quants(lowered) and "quantized_decomposed" not in lowered.code
    xs = [(make_input((4, *shape[1:]), seed=s),) for s in range(3)]
    agreement = int8_agreement(ir.gm, lowered, xs)
    assert agreement.max_steps is not None and agreement.max_steps <= MAX_STEPS, agreement
    with torch.no_grad():  # and it is quantized: not the float model
        assert not torch.allclose(lowered(*xs[0]), model(*xs[0]), atol=1e-6)


def test_weights_are_effopts_codes_and_scales() -> None:
    model, shape, _ = residual_net()
    ir = quantized_ir(model, shape, random_source(shape))
    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered
    source = ir.gm.get_submodule("conv1")
    fq = source.weight_quant
    assert isinstance(source, QuantConv) and fq.scheme.axis == 0  # precondition: per-channel weights

    weight = lowered.get_submodule("conv1").weight()

    assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
    torch.testing.assert_close(weight.q_per_channel_scales().float(), fq.scale.detach().float(), rtol=0, atol=0)
    expected_codes = torch.clamp(torch.round(source.weight.detach() * (1 / fq.scale.view(-1, 1, 1, 1))), -127, 127)
    assert torch.equal(weight.int_repr().to(torch.float32), expected_codes)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, IR]:
    model = DigitsNet()
    if DIGITS_CHECKPOINT.is_file():
        model.load_state_dict(torch.load(DIGITS_CHECKPOINT, weights_only=True))
    else:  # pragma: no cover - the checkpoint ships with the repository
        from examples.digits import train

        model, _ = train(epochs=5)
    model.eval()
    calibration = DataSource("digits", sklearn_digits("train"), 64, True)
    return model, quantized_ir(model, (2, 1, 8, 8), calibration)


def test_digits_net_agrees_with_the_fake_quant_model(digits: tuple[nn.Module, IR]) -> None:
    model, ir = digits
    assert fake_quants(ir.gm)  # precondition
    test_images = sklearn_digits("test").tensors[0]

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert not isinstance(lowered, Unsupported), lowered
    assert sorted(int8_modules(lowered)) == ["ConvReLU2d"] * 3 + ["Linear", "LinearReLU"]
    agreement = int8_agreement(ir.gm, lowered, [(test_images,)])
    assert agreement.samples == len(test_images) == 450
    assert agreement.top1 is not None and agreement.top1 >= 0.99, agreement
    assert agreement.max_steps is not None and agreement.max_steps <= MAX_STEPS, agreement
    assert str(int8_summary(lowered)).startswith(TORCH_INT8_NOTE + ": conv 3")


def test_torchscript_loads_and_runs_without_effopt(digits: tuple[nn.Module, IR], tmp_path: Path) -> None:
    """The saved archive runs in `python -I -S` with only site-packages on the path, effopt not importable."""
    _, ir = digits
    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered
    x = sklearn_digits("test").tensors[0][:16]
    with torch.no_grad():
        expected = lowered(x)
    saved = save_torchscript(lowered, tmp_path / "model_int8.pt", ir.example_inputs)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    child = (
        "import importlib.util, sys\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "hidden = ('effopt', 'examples', 'tests')\n"
        "assert all(importlib.util.find_spec(m) is None for m in hidden), 'effopt importable'\n"
        "import torch\n"
        "m = torch.jit.load('model_int8.pt')\n"
        "io = torch.load('io.pt')\n"
        "y = m(io['x'])\n"
        "one = m(io['x'][:1])\n"
        "print(float((y - io['y']).abs().max()), list(one.shape), torch.backends.quantized.engine, sep='|')\n"
    )

    run = subprocess.run([sys.executable, "-I", "-S", "-c", child], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)

    assert saved.method == "script" and run.returncode == 0, run.stderr[-2000:]
    err, shape, engine = run.stdout.strip().split("|")
    assert float(err) == 0.0 and shape == "[1, 10]", run.stdout  # same kernels, any batch size
    assert engine in ("x86", "fbgemm")
    with torch.no_grad():
        assert torch.equal(load_torchscript(saved.path)(x), expected)  # effopt's own loader: the same module


# --- what cannot be lowered ---------------------------------------------------------------------


class GeluBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


def test_a_float_op_between_quantized_ops_is_unsupported_and_named() -> None:
    """
    x ─q─ conv1 ─q─ gelu ─q─ conv2 ─q─ out : gelu has no int8 kernel, so the graph falls back
    """
    with seeded(0):
        model = GeluBetween().eval()
    ir = quantized_ir(model, (2, 3, 8, 8), random_source((2, 3, 8, 8)))
    gelu = [n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is F.gelu]
    assert gelu and len([m for m in ir.gm.modules() if isinstance(m, QuantConv)]) == 2  # precondition

    result = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert isinstance(result, Unsupported)
    assert len(result.reasons) == 1 and f"float op {gelu[0].name} (gelu)" in result.reasons[0], result
    assert "between quantized ops" in str(result)

    islands = lower_to_torch_int8(ir.gm, ir.example_inputs, float_islands=True)  # opting in runs gelu in float
    assert not isinstance(islands, Unsupported), islands
    assert int8_summary(islands).float_ops == (f"{gelu[0].name} (gelu)",)
    assert int8_agreement(ir.gm, islands, [ir.example_inputs]).max_abs_err <= 1e-6 + 2 * _out_step(ir.gm)


def _out_step(gm: fx.GraphModule) -> float:
    return gm.get_submodule(str(fake_quants(gm)[-1].target)).frozen_scale


def test_weight_only_quantization_is_unsupported() -> None:
    builder, shape = ZOO["vgg_style"]
    ir = quantized_ir(builder(), shape, random_source(shape), {"name": "quantize", "mode": "weight_only"})
    assert any(isinstance(m, QuantConv) for m in ir.gm.modules())  # precondition: quantized weights

    result = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert isinstance(result, Unsupported)
    assert "no quantized activations" in str(result)


def test_signed_activations_are_unsupported_and_named() -> None:
    model, shape, _ = residual_net()
    ir = quantized_ir(model, shape, random_source(shape))
    first = fake_quants(ir.gm)[0]
    fq = ir.gm.get_submodule(str(first.target))
    fq.scheme = QScheme(bits=8, signed=True, symmetric=True)  # int8 activations: x86 kernels take quint8

    result = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert isinstance(result, Unsupported)
    assert f"node '{first.name}' (FakeQuant) stores 8-bit signed codes" in str(result)


def test_four_bit_weights_run_in_int8_containers() -> None:
    model, shape, _ = residual_net()
    ir = quantized_ir(model, shape, random_source(shape), {"name": "quantize", "bits": 4})
    codes = ir.gm.get_submodule("conv1").weight_quant.scheme
    assert codes.bits == 4  # precondition

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert not isinstance(lowered, Unsupported), lowered
    assert int(lowered.get_submodule("conv1").weight().int_repr().abs().max()) <= 7
    assert int8_agreement(ir.gm, lowered, [ir.example_inputs]).max_steps <= MAX_STEPS


def test_quantized_engine_is_restored() -> None:
    model, shape, _ = residual_net()
    ir = quantized_ir(model, shape, random_source(shape))
    previous = torch.backends.quantized.engine
    other = "qnnpack" if "qnnpack" in torch.backends.quantized.supported_engines else previous
    try:
        torch.backends.quantized.engine = other
        lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
        assert torch.backends.quantized.engine == other
        assert not isinstance(lowered, Unsupported), lowered
        with pytest.raises(RuntimeError), quantized_engine(int8_engine() or "x86"):
            assert torch.backends.quantized.engine == int8_engine()
            raise RuntimeError("boom")
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = previous


def test_source_graph_is_left_as_it_was() -> None:
    model, shape, _ = residual_net()
    ir = quantized_ir(model, shape, random_source(shape))
    ir.gm.train()
    code, x = ir.gm.code, make_input(shape, seed=5)

    lower_to_torch_int8(ir.gm, ir.example_inputs)

    assert ir.gm.training and ir.gm.code == code
    ir.gm.eval()
    assert fake_quants(ir.gm) and torch.isfinite(ir.gm(x)).all()
