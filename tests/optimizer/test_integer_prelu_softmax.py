"""Integer-only PReLU and softmax (effopt.optimizer.lower.integer.activations, contract rule 7).

Models are float nets quantized by the real quantize pass for an int-only target (``cortex-m7``):
it puts a FakeQuant after each prelu / channel softmax (the softmax's fixed at 1/256), the
lowering turns them into `IntPReLU` / `IntSoftmax`, and the NumPy executor must equal the torch
reference bit for bit. Each builder carries a drawing and returns ``(module, input shape)``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import effopt
from effopt.errors import PassError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.emit.c_header import write_c_header
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.ir.cost_model import estimate
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.lower.integer import (
    IntDequantizeOutput,
    IntegerExecutor,
    IntegerProgram,
    IntPReLU,
    IntQuantizeInput,
    IntSoftmax,
    QParams,
    TensorInfo,
    lower_to_integer,
    reference_integer_model,
)
from effopt.optimizer.lower.integer.activations import exp_table, prelu_op, softmax_op, softmax_table_bits
from effopt.optimizer.quant.schemes import FakeQuant
from effopt.passes.base import PassContext, PassResult
from effopt.passes.manager import run_passes
from tests.passes.helpers import recipe_passes

REPO_ROOT = Path(__file__).resolve().parents[2]
MCU = load_profile("cortex-m7")
S = 1.0 / 256.0


# --- named model builders ------------------------------------------------------------------------------------


class PReLUConvNet(nn.Module):
    """x ─ conv(3→6) ─ PReLU(6 slopes, some negative) ─ max_pool ─ conv(6→4) ─ output"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.prelu = nn.PReLU(6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.tensor([0.25, -0.5, 0.0, 1.5, 0.1, -0.05]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.max_pool2d(self.prelu(self.conv1(x)), 2))


class SingleSlopeNet(nn.Module):
    """x ─ linear(8→5) ─ PReLU(one slope, −0.3) ─ linear(5→3) ─ output        ([N, C] tensors)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 5)
        self.prelu = nn.PReLU(init=-0.3)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.prelu(self.fc1(x)))


class FunctionalPReLUNet(nn.Module):
    """x ─ conv(2→3) ─ F.prelu(x, self.slope) ─ conv(3→2) ─ output     (slope: a module parameter)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.slope = nn.Parameter(torch.tensor([0.2, 0.7, -0.4]))
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.prelu(self.conv1(x), self.slope))


class SoftmaxLogitsNet(nn.Module):
    """x ─ linear(8→4) ─ torch.softmax(dim=1) ─ output        ([N, C] probabilities)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=1)


class SoftmaxMapNet(nn.Module):
    """x ─ conv(3→3, 1×1) ─ nn.Softmax(dim=1) ─ output        ([N, C, H, W]: one distribution per pixel)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.conv(x))


class ONetTail(nn.Module):
    """x ─ conv(3→4) ─ PReLU(4) ─ permute(0, 3, 2, 1) ─ contiguous ─ view ─ linear ─ PReLU(8) ─┬ linear(8→2) ─ softmax
                                                                                        └ linear(8→4)
    (the tail of facenet-pytorch's ONet: .contiguous() of int8 codes stays int8)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2)
        self.prelu1 = nn.PReLU(4)
        self.dense = nn.Linear(4 * 3 * 3, 8)
        self.prelu2 = nn.PReLU(8)
        self.face = nn.Linear(8, 2)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu2(self.dense(x.view(x.shape[0], -1)))
        return self.box(x), torch.softmax(self.face(x), dim=1)


class SoftmaxOverRowsNet(nn.Module):
    """x ─ conv(2→2, 1×1) ─ softmax(dim=2) ─ output        (refused: not the channel dim)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.conv(x), dim=2)


class PNet(nn.Module):
    """facenet-pytorch's MTCNN PNet, as written there: conv → PReLU → max pool …, a softmax face head, a box head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        x = self.prelu1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.prelu2(x)
        x = self.conv3(x)
        x = self.prelu3(x)
        a = self.conv4_1(x)
        a = self.softmax4_1(a)
        b = self.conv4_2(x)
        return b, a


def pnet() -> PNet:
    """The recipe factory: seeded random weights (random PReLU slopes too, some negative)."""
    torch.manual_seed(0)
    model = PNet()
    with torch.no_grad():
        for m in (model.prelu1, model.prelu2, model.prelu3):
            m.weight.uniform_(-0.3, 0.6)
    return model.eval()


BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "prelu_per_channel": (PReLUConvNet, (1, 3, 8, 8)),
    "prelu_single_negative_slope": (SingleSlopeNet, (1, 8)),
    "prelu_functional": (FunctionalPReLUNet, (1, 2, 6, 6)),
    "softmax_nc": (SoftmaxLogitsNet, (1, 8)),
    "softmax_nchw": (SoftmaxMapNet, (1, 3, 4, 4)),
    "pnet": (pnet, (1, 3, 12, 12)),
    "onet_tail": (ONetTail, (1, 3, 4, 4)),
}
KINDS = {"prelu_per_channel": IntPReLU, "prelu_single_negative_slope": IntPReLU, "prelu_functional": IntPReLU,
         "softmax_nc": IntSoftmax, "softmax_nchw": IntSoftmax, "pnet": IntSoftmax, "onet_tail": IntPReLU}


# --- helpers ---------------------------------------------------------------------------------------------------


def random_source(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> DataSource:
    g = torch.Generator().manual_seed(seed)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


def quantized(model: nn.Module, shape: tuple[int, ...], target: str = "cortex-m7",
              seed: int = 0) -> tuple[IR, PassResult]:
    """``model``'s IR after the quantize pass for ``target`` (calibrated on seeded random data), and the pass result."""
    example = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ir = annotate(IR(trace_module(model), (InputSpec("x", shape),), (example,)))
    ctx = PassContext(profile=load_profile(target), calibration=random_source(shape))
    ir, records = run_passes(ir, recipe_passes({"name": "quantize"}), ctx)
    return ir, records[0].result


def fake_quant_after(ir: IR, name: str) -> FakeQuant | None:
    """The FakeQuant that directly reads node ``name``'s value, if any."""
    node = next(n for n in ir.gm.graph.nodes if n.name == name)
    for u in node.users:
        mod = ir.gm.get_submodule(str(u.target)) if u.op == "call_module" else None
        if isinstance(mod, FakeQuant):
            return mod
    return None


def run_both(program: IntegerProgram, codes: tuple[np.ndarray, ...]) -> tuple[tuple[np.ndarray, ...], tuple]:
    ours = IntegerExecutor(program).run(*codes)
    with torch.no_grad():
        theirs = reference_integer_model(program)(*(torch.from_numpy(c) for c in codes))
    return ours, theirs


def one_op(op: IntPReLU | IntSoftmax, shape: tuple[int, ...], x: QParams, y: QParams) -> IntegerProgram:
    """A program of just ``op``: input tensor ``x`` of ``shape`` (no batch) → ``op`` → output ``y``."""
    return IntegerProgram((IntQuantizeInput("in", "x", x),), (op,), (IntDequantizeOutput("output", "y", y),),
                          (TensorInfo("x", shape, x), TensorInfo("y", shape, y)), ("in",), 0)


def run_codes(program: IntegerProgram, codes: list[list[int]]) -> list[list[int]]:
    """The executor's output codes for ``codes``, after checking the reference gives the same."""
    ours, theirs = run_both(program, (np.array(codes, dtype=np.int8),))
    assert ours[0].tolist() == theirs[0].tolist()
    return ours[0].tolist()


def random_codes(program: IntegerProgram, batch: int, seed: int) -> tuple[np.ndarray, ...]:
    """Uniform int8 codes over each input's whole [qmin, qmax], not just calibrated data."""
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(q.qparams.qmin, q.qparams.qmax + 1, size=(batch, *program.tensor(q.output).shape))
                 .astype(np.int8) for q in program.inputs)


@pytest.fixture(scope="module")
def lowered() -> dict[str, tuple[nn.Module, IR, IntegerProgram]]:
    out = {}
    for name, (build, shape) in BUILDERS.items():
        torch.manual_seed(1)
        model = build().eval()
        ir, _ = quantized(copy.deepcopy(model), shape)  # PTQ steps may edit the traced model's weights in place
        out[name] = (model, ir, lower_to_integer(ir.gm, ir.example_inputs, accumulator_bits=MCU.accumulator_bits))
    return out


# --- hand-computed numerics ----------------------------------------------------------------------------------------


def test_prelu_op_hand_example() -> None:
    # s_in = s_out = 0.05, α = 0.25 and −0.5, zero points 0: −2.0 → −0.5 (code −10) and +1.0 (code 20)
    qp = QParams(0.05, 0, -128, 127)
    op = prelu_op("p", "x", qp, np.array([0.25, -0.5]), qp, "y", -128, 127)
    assert op.neg_multiplier[0] > 0 > op.neg_multiplier[1]  # a negative slope keeps its sign
    assert run_codes(one_op(op, (2,), qp, qp), [[-40, -40], [40, 40], [-1, 0]]) == [[-10, 20], [40, 40], [0, 0]]


def test_softmax_op_hand_example() -> None:
    # s_in = 0.1, codes (10, 0): p = (0.7311, 0.2689) → round(256·p) = (187, 69) → int8 (59, −59)
    assert softmax_table_bits(256, 2) == 21 and softmax_table_bits(256, 1000) == 20
    assert exp_table(0.1, 2, 21).tolist() == [2097152, 1897582, 1717003]
    x, y = QParams(0.1, 0, -128, 127), QParams(S, -128, -128, 127)
    op = softmax_op("s", "x", x, 1, 2, y, "y", -128, 127)
    assert op.exp_table[10] == 771499 and op.inv_scale == 256
    got = run_codes(one_op(op, (2,), x, y), [[10, 0], [0, 0], [127, -128]])
    assert got == [[59, -59], [0, 0], [127, -128]]  # p = 1 saturates to the top code (255/256)


# --- the quantize pass on an int-only target ---------------------------------------------------------------------


def test_quantize_puts_a_fake_quant_after_prelu_and_a_fixed_one_after_softmax() -> None:
    ir, result = quantized(pnet(), (1, 3, 12, 12))
    for name in ("prelu1", "prelu2", "prelu3"):
        assert fake_quant_after(ir, name) is not None, name
    fq = fake_quant_after(ir, "softmax4_1")
    assert fq is not None and QParams.of(fq) == QParams(S, -128, -128, 127)
    assert {"prelu1", "softmax4_1"} <= set(result.changed)


def test_quantize_for_float_capable_target_leaves_prelu_and_softmax_float() -> None:
    # (prelu2/prelu3 feed a conv, whose input FakeQuant sits right after them on every target)
    ir, _ = quantized(pnet(), (1, 3, 12, 12), target="x86-avx2")
    assert fake_quant_after(ir, "prelu1") is None and fake_quant_after(ir, "softmax4_1") is None
    ir, _ = quantized(pnet(), (1, 3, 12, 12), target="cortex-m7")
    assert fake_quant_after(ir, "prelu1") is not None  # precondition: the int-only target differs


# --- lowering, bit exactness, agreement ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lowering_emits_the_integer_activation(lowered, name: str) -> None:
    _, _, program = lowered[name]
    ops = [op for op in program.ops if isinstance(op, KINDS[name])]
    assert ops
    for op in ops:
        if isinstance(op, IntPReLU):
            assert op.neg_multiplier.dtype == np.int32 and op.neg_shift.dtype == np.int32
        else:
            assert op.exp_table.dtype == np.int32 and op.exp_table[0] == 2**op.table_bits and op.axis == 1
    if name == "prelu_single_negative_slope":
        (op,) = ops
        assert op.neg_multiplier.shape == (1,) and op.neg_multiplier[0] < 0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_cost_model_says_it_runs_on_the_int_only_target(lowered, name: str) -> None:
    # the runs_on_target goal: no node computes in fp32 (prelu, softmax, max pool, contiguous included)
    _, ir, _ = lowered[name]
    assert estimate(ir, MCU).unsupported == ()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_executor_matches_torch_reference_bit_exactly(lowered, name: str) -> None:
    _, _, program = lowered[name]
    for seed in range(3):
        ours, theirs = run_both(program, random_codes(program, 16, seed))
        for a, b in zip(ours, theirs):
            assert a.dtype == np.int8
            np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_executor_computes_in_integers_only(lowered, name: str) -> None:
    _, _, program = lowered[name]
    ex = IntegerExecutor(program, debug=True)
    ex.run(*random_codes(program, 4, 0))
    assert ex.dtype_log and all(d.startswith("int") for _, _, d in ex.dtype_log)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_integer_program_agrees_with_float_model(lowered, name: str) -> None:
    # on the calibration inputs (no value outside a calibrated range, which would clip in any int8 model)
    model, ir, program = lowered[name]
    x = random_source(BUILDERS[name][1]).dataset.tensors[0]
    with torch.no_grad():
        want, fake = model(x), ir.gm(x)
    want, fake = (want, fake) if isinstance(want, tuple) else ((want,), (fake,))
    got = IntegerExecutor(program).run_float(x)
    for g, w, f, o in zip(got, want, fake, program.outputs):
        assert np.abs(g - w.numpy()).max() / o.qparams.scale <= 4, f"{name} output '{o.name}' vs float"
        assert np.abs(g - f.numpy()).max() / o.qparams.scale <= 2 + 1e-4, f"{name} output '{o.name}' vs fake-quant"


@pytest.mark.parametrize("name", ["softmax_nc", "softmax_nchw", "pnet"])
def test_softmax_outputs_sum_to_one(lowered, name: str) -> None:
    _, _, program = lowered[name]
    out = next(i for i, o in enumerate(program.outputs) if o.qparams.scale == S)
    probs = program.dequantize_outputs(*IntegerExecutor(program).run(*random_codes(program, 16, 3)))[out]
    channels = probs.shape[1]
    assert probs.min() >= 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=channels / 512 + S)


def test_softmax_over_another_dim_is_refused_naming_node_and_reason() -> None:
    ir, result = quantized(SoftmaxOverRowsNet(), (1, 2, 3, 3))
    skip = next(s for s in result.skipped if s.node == "softmax")
    assert "normalizes over dim 2 of a 4-d tensor" in skip.reason
    with pytest.raises(PassError) as e:
        lower_to_integer(ir.gm, ir.example_inputs)
    assert re.search(r"node 'softmax' \(softmax\) normalizes over dim 2 of a 4-d tensor: the integer softmax runs "
                     r"over the channel dim \(1\)", str(e.value))


# --- C header ----------------------------------------------------------------------------------------------------


def test_c_header_holds_the_new_parameters(lowered) -> None:
    _, _, program = lowered["pnet"]
    header = write_c_header(program, "pnet")
    softmax = next(op for op in program.ops if isinstance(op, IntSoftmax))
    table = re.search(r"pnet_softmax4_1_exp_table\[256\] = \{([^}]*)\}", header)
    assert table is not None
    assert [int(v) for v in table.group(1).replace("\n", " ").split(",")] == softmax.exp_table.tolist()
    assert "#define PNET_SOFTMAX4_1_INV_SCALE 256" in header
    assert "pnet_prelu1_neg_multiplier[10]" in header and "#define PNET_PRELU1_POS_MULTIPLIER" in header


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_c_header_compiles_as_c99(lowered, tmp_path: Path) -> None:
    (tmp_path / "pnet.h").write_text(write_c_header(lowered["pnet"][2], "pnet"))
    (tmp_path / "main.c").write_text('#include "pnet.h"\nint main(void) { return pnet_softmax4_1_exp_table[0] > 0 '
                                     '? 0 : 1; }\n')
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-Wno-unused-const-variable", "-o",
                    str(tmp_path / "a.out"), str(tmp_path / "main.c")], check=True, cwd=tmp_path)


# --- end to end: the facenet-style PNet on cortex-m7 -------------------------------------------------------------


def test_compile_pnet_for_cortex_m7_writes_model_h(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 1, (64, 3, 12, 12)).astype(np.float32))
    recipe = {
        "version": 1,
        "model": {"factory": "tests.optimizer.test_integer_prelu_softmax:pnet", "pythonpath": [str(REPO_ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 3, 12, 12], "range": [0, 1]}],
        "target": "cortex-m7",
        "passes": [{"name": "quantize"}],
        "data": {"calibration": str(tmp_path / "calib.npz")},
        "output": {"formats": ["onnx"]},
    }
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["runs_on_target"]["passed"] and goals["integer_program"]["passed"], goals
    assert result.passed and report["status"] == "passed"
    header = (tmp_path / "out" / "model.h").read_text()
    assert "(prelu)" in header and "(softmax)" in header and "exp_table[256]" in header
