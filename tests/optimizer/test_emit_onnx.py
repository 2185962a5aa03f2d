"""Tests for effopt.optimizer.emit.onnx: numerics, dynamic batch, determinism, cleanup, errors.

The numerics run the exported files through effopt.optimizer.measure (runtime sessions and
`compare_onnx`), which is how the compiler checks them.

Each model is exported once per module (exports cost ~1 s each) and shared by the tests that
only read the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from effopt.errors import EmitError
from effopt.optimizer.emit import onnx as emit_onnx
from effopt.optimizer.emit.onnx import export_onnx
from effopt.optimizer.ir.compare import compare_tensors
from effopt.optimizer.measure.runtime import run_onnx
from effopt.optimizer.measure.verify import OnnxAgreement, compare_onnx

RTOL = 1e-4
ATOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- model builders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A model with the arguments export_onnx needs, and a way to draw inputs at any batch."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    dynamic_batch: tuple[bool, ...]
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Non-trivial statistics, so an identity BN cannot hide a wrong export."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))


class ConvBnReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def conv_bn_relu_linear(seed: int = 0) -> Case:
    """
    image -> Conv -> BN -> ReLU -> mean(H, W) -> Linear -> logits
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = ConvBnReluLinear()
    _randomize_bn(module.bn, gen)
    module.eval()

    def make(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 8, 8, generator=g),)

    return Case(module, make(1, gen), ("image",), (True,), make)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def residual(seed: int = 0) -> Case:
    """
    x ──> Conv -> BN -> ReLU -> Conv ──> (+) -> ReLU
    └──────────────────────────────────────┘
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = Residual()
    _randomize_bn(module.bn1, gen)
    module.eval()

    def make(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 4, 6, 6, generator=g),)

    return Case(module, make(1, gen), ("x",), (True,), make)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x) + self.b(y))
        return h, h.sum(dim=1, keepdim=True) * 2.0


def two_in_two_out(seed: int = 0) -> Case:
    """
    x -> Linear ─┐
                 (+) -> tanh ─┬──────────────> h
    y -> Linear ─┘            └─> sum * 2 ──> s
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = TwoInTwoOut().eval()

    def make(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 6, generator=g), torch.randn(batch, 3, generator=g))

    return Case(module, make(1, gen), ("x", "y"), (True, True), make)


class ConstantSubexpression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("k", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.sin(self.k * 2 + 1)


def constant_subexpression(seed: int = 0) -> Case:
    """
    x -> Linear ──────────────────> (+) -> out
    k (buffer) -> *2 -> +1 -> sin ──┘      (the k-chain is constant: it should fold away)
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = ConstantSubexpression().eval()

    def make(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 4, generator=g),)

    return Case(module, make(1, gen), ("x",), (True,), make)


class DataDependentBranch(nn.Module):
    """torch.export cannot trace a Python `if` on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:
            return self.fc(x)
        return -self.fc(x)


BUILDERS = {
    "conv_bn_relu_linear": conv_bn_relu_linear,
    "residual": residual,
    "two_in_two_out": two_in_two_out,
}


def _export(case: Case, path: Path) -> Path:
    return export_onnx(case.module, case.example_inputs, case.input_names, case.dynamic_batch, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Path]]:
    """Every builder exported once: name -> (case, onnx path)."""
    out = tmp_path_factory.mktemp("onnx")
    return {name: (case, _export(case, out / f"{name}.onnx")) for name, build in BUILDERS.items() for case in [build()]}


# --- graph inspection helpers -----------------------------------------------------------------


def _node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def _dangling_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes none of whose outputs reach another node or a graph output."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    return [node.name for node in graph.node if not any(out in used for out in node.output)]


def _constant_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that depend on no graph input, i.e. that constant folding should have removed."""
    graph = model.graph
    dynamic = {value.name for value in graph.input}
    constant: list[str] = []
    for node in graph.node:  # graph order is topological
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
        else:
            constant.append(f"{node.op_type}:{node.name}")
    return constant


def _batch_dim(value: onnx.ValueInfoProto) -> str | int:
    dim = value.type.tensor_type.shape.dim[0]
    return dim.dim_param if dim.HasField("dim_param") else dim.dim_value


# --- numerics and structure -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_export_passes_checker_and_names_inputs(exported: dict[str, tuple[Case, Path]], name: str) -> None:
    # setup
    case, path = exported[name]
    # execute
    model = onnx.load(str(path))
    # assert
    onnx.checker.check_model(model, full_check=True)
    assert [value.name for value in model.graph.input] == list(case.input_names)
    assert all(_batch_dim(value) == "batch" for value in model.graph.input)  # one shared symbol
    assert _dangling_nodes(model) == []
    assert _constant_nodes(model) == []


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_torch_at_batch(exported: dict[str, tuple[Case, Path]], name: str, batch: int) -> None:
    # setup: batch 5 differs from the batch-2 copy the exporter saw, so it proves the batch is dynamic
    case, path = exported[name]
    gen = torch.Generator().manual_seed(100 + batch)
    inputs = [case.make_inputs(batch, gen) for _ in range(2)]
    # execute
    agreement = compare_onnx(path, case.module, inputs, rtol=RTOL, atol=ATOL)
    outputs = run_onnx(path, [t.numpy() for t in inputs[0]])
    # assert
    assert agreement.passed, agreement
    assert agreement.max_abs_err < 1e-4
    assert all(out.shape[0] == batch for out in outputs)


def test_two_outputs_come_back_in_order(exported: dict[str, tuple[Case, Path]]) -> None:
    # setup
    case, path = exported["two_in_two_out"]
    x, y = case.make_inputs(3, torch.Generator().manual_seed(3))
    # execute
    h, s = run_onnx(path, [x.numpy(), y.numpy()])
    # assert
    with torch.no_grad():
        h_ref, s_ref = case.module(x, y)
    assert len(onnx.load(str(path)).graph.output) == 2
    np.testing.assert_allclose(h, h_ref.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(s, s_ref.numpy(), rtol=RTOL, atol=ATOL)


def test_static_input_keeps_its_batch_size(tmp_path: Path) -> None:
    # setup: y is marked static, so its leading dim must stay a number
    case = two_in_two_out()
    # execute
    path = export_onnx(case.module, case.example_inputs, ("x", "y"), (True, False), tmp_path / "m.onnx")
    # assert
    x_info, y_info = onnx.load(str(path)).graph.input
    assert (_batch_dim(x_info), _batch_dim(y_info)) == ("batch", 1)


def test_compare_reports_a_real_mismatch(exported: dict[str, tuple[Case, Path]]) -> None:
    # setup: a model that differs from the exported one, so compare cannot pass vacuously
    case, path = exported["residual"]
    other = residual(seed=1).module
    inputs = [case.make_inputs(2, torch.Generator().manual_seed(0))]
    # execute
    agreement = compare_onnx(path, other, inputs, rtol=RTOL, atol=ATOL)
    # assert
    assert not agreement.passed
    assert agreement.max_abs_err > 1e-2
    assert 0 < agreement.max_rel_err < float("inf")


def test_agreement_is_frozen() -> None:
    agreement = OnnxAgreement(max_abs_err=0.0, max_rel_err=0.0, passed=True)
    with pytest.raises(AttributeError):
        agreement.passed = False  # type: ignore[misc]


def test_errors_relative_to_reference_scale() -> None:
    a = compare_tensors(np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    assert (a.max_abs_err, a.max_rel_err) == pytest.approx((0.5, 0.25))
    empty = compare_tensors(np.zeros((0, 3)), np.zeros((0, 3)))
    assert (empty.max_abs_err, empty.max_rel_err, empty.within_tolerance) == (0.0, 0.0, True)


def test_training_model_exports_in_eval_and_keeps_its_state(tmp_path: Path) -> None:
    # setup: a model left in training mode; BN would use batch statistics and update its buffers
    case = conv_bn_relu_linear()
    module = case.module.train()
    running_mean = module.bn.running_mean.clone()
    # execute
    path = export_onnx(module, case.example_inputs, case.input_names, case.dynamic_batch, tmp_path / "m.onnx")
    agreement = compare_onnx(path, module, [case.make_inputs(4, torch.Generator().manual_seed(1))], RTOL, ATOL)
    # assert
    assert module.training and module.bn.training
    assert torch.equal(module.bn.running_mean, running_mean)
    assert agreement.passed, agreement
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(path)).graph.node}


# --- cleanup and determinism ------------------------------------------------------------------


def test_cleanup_folds_constant_subexpression() -> None:
    # setup: the raw export (exporter optimizer off) still computes sin(k * 2 + 1) at run time
    case = constant_subexpression()
    args, shapes = emit_onnx._export_args(case.example_inputs, case.dynamic_batch)
    raw = emit_onnx._torch_to_onnx(case.module, args, case.input_names, shapes, None, optimize=False)
    assert _constant_nodes(raw) != []  # precondition: there is something to fold
    # execute
    cleaned = emit_onnx._clean_graph(raw, where="ConstantSubexpression")
    # assert
    assert _node_count(cleaned) < _node_count(raw)
    assert _constant_nodes(cleaned) == []
    assert _dangling_nodes(cleaned) == []
    assert [node.op_type for node in cleaned.graph.node] == ["Gemm", "Add"]


def test_strip_removes_source_paths() -> None:
    # setup: the exporter records stack traces that name this test file
    case = residual()
    args, shapes = emit_onnx._export_args(case.example_inputs, case.dynamic_batch)
    raw = emit_onnx._torch_to_onnx(case.module, args, case.input_names, shapes, None, optimize=True)
    here = Path(__file__).name.encode()
    assert here in raw.SerializeToString()  # precondition
    # execute
    stripped = emit_onnx._strip_debug_info(raw)
    # assert
    data = stripped.SerializeToString()
    assert here not in data
    assert b"stack_trace" not in data
    assert _node_count(stripped) == _node_count(raw)


def test_export_writes_no_default_attributes_and_no_intermediate_shapes(exported: dict[str, tuple[Case, Path]]) -> None:
    """Bookkeeping every consumer re-derives is not shipped; inputs and outputs keep their shapes."""
    for _, path in exported.values():
        model = onnx.load(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert not model.graph.value_info
        assert all(v.type.tensor_type.shape.dim for v in model.graph.input)
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            schema = onnx.defs.get_schema(node.op_type, opset, "")
            for attribute in node.attribute:
                default = schema.attributes[attribute.name].default_value
                if default.type == attribute.type:
                    assert onnx.helper.get_attribute_value(default) != onnx.helper.get_attribute_value(attribute), (
                        f"{node.name}.{attribute.name} equals its default")


def test_two_exports_are_byte_identical(tmp_path: Path, exported: dict[str, tuple[Case, Path]]) -> None:
    # setup: a freshly built, identical model (same seed)
    case = two_in_two_out()
    _, first = exported["two_in_two_out"]
    # execute
    second = _export(case, tmp_path / "again.onnx")
    # assert
    assert second.read_bytes() == first.read_bytes()


def test_export_is_byte_identical_in_another_process(tmp_path: Path, exported: dict[str, tuple[Case, Path]]) -> None:
    # setup: a new interpreter with a different hash seed, started from another directory
    _, first = exported["conv_bn_relu_linear"]
    out = tmp_path / "other_process.onnx"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_emit_onnx as t
        t._export(t.conv_bn_relu_linear(), Path({str(out)!r}))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    # execute
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    # assert
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes() == first.read_bytes()


def test_export_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder) -> None:
    # execute
    _export(residual(), tmp_path / "m.onnx")
    with pytest.raises(EmitError):
        export_onnx(DataDependentBranch().eval(), (torch.randn(2, 4),), ["x"], [True], tmp_path / "bad.onnx")
    # assert
    assert capfd.readouterr() == ("", "")
    assert [str(w.message) for w in recwarn] == []


# --- errors -----------------------------------------------------------------------------------


def test_untraceable_model_raises_emit_error(tmp_path: Path) -> None:
    # setup
    path = tmp_path / "bad.onnx"
    # execute
    with pytest.raises(EmitError) as info:
        export_onnx(DataDependentBranch().eval(), (torch.randn(2, 4),), ["x"], [True], path)
    # assert
    message = str(info.value)
    assert "'DataDependentBranch'" in message
    assert "data-dependent" in message
    assert "torch.where" in message  # the hint
    assert "\n" not in message and "\x1b" not in message
    assert info.value.__cause__ is not None
    assert not path.exists() and not path.with_name(path.name + ".tmp").exists()


@pytest.mark.parametrize(
    ("names", "flags", "expected"),
    [
        (["a", "b"], [True], "1 example inputs but 2 input_names and 1 dynamic_batch"),
        (["a"], [True, False], "1 example inputs but 1 input_names and 2 dynamic_batch"),
    ],
)
def test_bad_arguments_raise_before_export(tmp_path: Path, names: list[str], flags: list[bool], expected: str) -> None:
    with pytest.raises(EmitError, match=expected):
        export_onnx(nn.Linear(4, 4), (torch.randn(2, 4),), names, flags, tmp_path / "m.onnx")


def test_dynamic_inputs_with_different_batches_are_rejected(tmp_path: Path) -> None:
    case = two_in_two_out()
    inputs = (torch.randn(2, 6), torch.randn(3, 3))
    with pytest.raises(EmitError, match=r"batch sizes \[2, 3\]"):
        export_onnx(case.module, inputs, ("x", "y"), (True, True), tmp_path / "m.onnx")


def test_run_onnx_errors_name_the_file(tmp_path: Path, exported: dict[str, tuple[Case, Path]]) -> None:
    # setup
    _, path = exported["two_in_two_out"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    # execute / assert
    with pytest.raises(EmitError, match="takes 2 inputs"):
        run_onnx(path, [np.zeros((1, 6), np.float32)])
    with pytest.raises(EmitError, match=str(path.name)):
        run_onnx(path, [np.zeros((1, 7), np.float32), np.zeros((1, 3), np.float32)])
    with pytest.raises(EmitError, match="garbage.onnx: onnxruntime cannot load"):
        run_onnx(garbage, [])


class FixedBatch(nn.Module):
    """Broadcasting against a (2, 4) constant only works at batch 2 (or 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(2, 4)


def test_exporter_fixing_a_dynamic_batch_is_an_error(tmp_path: Path) -> None:
    # setup: torch.onnx.export silently re-exports this with batch = 2 instead of failing
    path = tmp_path / "fixed.onnx"
    # execute
    with pytest.raises(EmitError) as info:
        export_onnx(FixedBatch(), (torch.randn(2, 4),), ["x"], [True], path)
    # assert
    assert "input 'x' was marked dynamic_batch but the exporter fixed its batch to 2" in str(info.value)
    assert "set dynamic_batch false" in str(info.value)
    assert not path.exists()
    # and with a static batch the same model exports
    static = export_onnx(FixedBatch(), (torch.randn(2, 4),), ["x"], [False], tmp_path / "static.onnx")
    assert _batch_dim(onnx.load(str(static)).graph.input[0]) == 2
