"""fold_batchnorm and quantize on functional layers: a torch.export program and F.conv2d in a forward.

Both passes first lift functional conv/linear/batch_norm calls to modules (`effopt.optimizer.ir.lift`),
then rewrite them like any module layer. Each test first asserts that the graph really holds
functional layers and no modules, so it cannot pass while nothing is lifted.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.core import IR, facts
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from effopt.optimizer.quant.schemes import QuantConv, QuantLinear
from examples.digits import DigitsNet
from tests.models import ZOO, randomize_bn, seeded
from tests.passes.helpers import build_ir, recipe_passes

RTOL = 1e-5
ATOL = 1e-6
DIGITS_SHAPE = (2, 1, 8, 8)


def exported(model: nn.Module, shape: tuple[int, ...]) -> fx.GraphModule:
    """``torch.export`` with a free batch size, as a user would save a servable model; deep-copied as the
    compiler does (`effopt.optimizer.compiler.build_ir`), which drops export's refusal of ``.eval()``."""
    batch = {"x": {0: torch.export.Dim.AUTO}}
    return copy.deepcopy(torch.export.export(model.eval(), (torch.randn(shape),), dynamic_shapes=batch).module())


def digits() -> nn.Module:
    """DigitsNet with randomized BN statistics, so an identity BN cannot hide a missing fold."""
    with seeded(0):
        return randomize_bn(DigitsNet(), seed=0).eval()


def kinds(ir: IR, op: str) -> list[str]:
    return [canonical_op(n, ir.gm) for n in ir.gm.graph.nodes if n.op == op]


def random_source(shape: tuple[int, ...], n: int = 64) -> DataSource:
    g = torch.Generator().manual_seed(0)
    return DataSource("random", TensorDataset(torch.rand(n, *shape[1:], generator=g)), 16, False)


# --- fold_batchnorm ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, shape, folded",
    [(digits, DIGITS_SHAPE, ("bn1", "bn2", "bn3", "bn4")),
     (ZOO["resnet_style"][0], ZOO["resnet_style"][1],
      ("bn1", "layer1_bn1", "layer1_bn2", "layer2_downsample_1", "layer2_bn1", "layer2_bn2"))],
    ids=["digits", "resnet_style"],
)
def test_fold_batchnorm_folds_every_bn_of_an_exported_program(build, shape: tuple[int, ...], folded: tuple[str, ...]) -> None:
    """x ─ aten.conv2d ─ aten.batch_norm ─ relu ─ ... ─ aten.linear ─ aten.batch_norm ─ relu ─ aten.linear"""
    # setup
    model = build()
    ir = build_ir(exported(model, shape), shape)
    assert kinds(ir, "call_function").count("batch_norm") == len(folded)  # precondition: functional BNs
    # execute
    ir, (record,) = run_passes(ir, recipe_passes("fold_batchnorm"), PassContext())
    # assert: structure
    assert "batch_norm" not in kinds(ir, "call_function") and "batch_norm" not in kinds(ir, "call_module")
    assert not any(isinstance(m, _BatchNorm) for m in ir.gm.modules())
    assert record.result.stats["folded"] == len(folded) and record.result.skipped == ()
    assert record.result.stats["lifted_functional_layers"] > len(folded)
    assert set(folded) <= set(record.result.changed)
    assert record.result.warnings[0].startswith(f"lifted {int(record.result.stats['lifted_functional_layers'])} ")
    assert record.result.delta is not None and record.result.delta.flops < 0  # the cost model sees the BNs gone
    # assert: numerics, at another batch size too
    for batch in (shape[0], 5):
        x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(ir.gm(x), model(x), rtol=RTOL, atol=ATOL)


class SharedConvBn(nn.Module):
    """A conv weight read twice, so neither conv is lifted; the BN after them is, but cannot fold::

        x ─ F.conv2d(w) ─ F.conv2d(w) ─ F.batch_norm(mean, var) ─ out
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))
        self.register_buffer("mean", torch.randn(3))
        self.register_buffer("var", torch.rand(3) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(F.conv2d(x, self.weight, padding=1), self.weight, padding=1)
        return F.batch_norm(y, self.mean, self.var, training=False)


def test_fold_batchnorm_says_why_a_bn_after_a_functional_conv_stays() -> None:
    # setup
    with seeded(1):
        model = SharedConvBn().eval()
    ir = build_ir(model, (2, 3, 6, 6))
    assert kinds(ir, "call_function") == ["conv", "conv", "batch_norm"]  # precondition
    # execute
    ir, (record,) = run_passes(ir, recipe_passes("fold_batchnorm"), PassContext())
    # assert
    (skip,) = record.result.skipped
    assert skip.node == "mean_1" and "input 'conv2d_1' stays functional" in skip.reason and "shared" in skip.reason
    assert record.result.stats == {"folded": 0.0, "lifted_functional_layers": 1.0}
    assert isinstance(ir.gm.get_submodule("mean"), nn.BatchNorm2d)
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(ir.gm(x), model(x))  # lifting alone is bit-identical


# --- quantize ---------------------------------------------------------------------------------


def quantized_layers(ir: IR) -> list[str]:
    return [n.name for n in ir.gm.graph.nodes
            if n.op == "call_module" and isinstance(ir.module_of(n), (QuantConv, QuantLinear))]


def test_static_quantize_quantizes_every_layer_of_an_exported_program() -> None:
    # setup
    model = digits()
    ir = build_ir(exported(model, DIGITS_SHAPE), DIGITS_SHAPE)
    functional = [k for k in kinds(ir, "call_function") if k in ("conv", "linear")]
    assert len(functional) == 5 and not quantized_layers(ir)  # precondition: 3 conv + 2 linear, all functional
    ctx = PassContext(calibration=random_source(DIGITS_SHAPE))
    # execute
    ir, (fold, quant) = run_passes(ir, recipe_passes("fold_batchnorm", {"name": "quantize", "mode": "static"}), ctx)
    # assert: structure
    assert quantized_layers(ir) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert quant.result.stats["quantized_layers"] == 5 and quant.result.skipped == ()
    assert "lifted_functional_layers" not in quant.result.stats  # fold_batchnorm lifted them already
    assert fold.result.stats["lifted_functional_layers"] == 9
    assert all(facts(n).compute_dtype == "int8" for n in ir.gm.graph.nodes if n.name in quantized_layers(ir))
    # assert: numerics, quantized is close, not equal
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, ref = ir.gm(x), model(x)
    err = float(((y - ref) ** 2).sum() / (ref**2).sum())
    assert 0 < err < 0.02, err


def test_quantize_alone_lifts_conv_and_linear_and_honours_old_names_in_keep_float() -> None:
    # setup
    ir = build_ir(exported(digits(), DIGITS_SHAPE), DIGITS_SHAPE)
    entry = {"name": "quantize", "mode": "weight_only", "keep_float": ["linear_1"]}  # fc2's node name in the export
    # execute
    ir, (quant,) = run_passes(ir, recipe_passes(entry), PassContext())
    # assert
    assert quantized_layers(ir) == ["conv1", "conv2", "conv3", "fc1"]
    assert type(ir.gm.get_submodule("fc2")) is nn.Linear
    assert quant.result.stats["lifted_functional_layers"] == 5  # conv and linear only; BNs stay functional
    assert kinds(ir, "call_function").count("batch_norm") == 4
    assert [(s.node, s.reason) for s in quant.result.skipped] == [("fc2", "listed in keep_float")]
    assert "fc2" in quant.result.changed and "linear_1 → fc2" in quant.result.warnings[0]


def test_quantize_reports_why_a_functional_conv_stays_float() -> None:
    # setup
    with seeded(2):
        model = SharedConvBn().eval()
    ir = build_ir(model, (2, 3, 6, 6))
    # execute
    ir, (quant,) = run_passes(ir, recipe_passes({"name": "quantize", "mode": "weight_only"}), PassContext())
    # assert
    assert [s.node for s in quant.result.skipped] == ["conv2d", "conv2d_1"]
    assert all("weight 'weight' is shared" in s.reason for s in quant.result.skipped)
    assert quant.result.changed == () and quant.result.stats["quantized_layers"] == 0
