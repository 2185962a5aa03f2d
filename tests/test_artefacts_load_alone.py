"""Every artefact runs in its own runtime alone, as the README promises.

``model.pt2`` and ``model_int8.pt`` are loaded in a fresh ``python -I`` that imports torch and
nothing of effopt (``torch.export.load`` / ``torch.jit.load``); every ``.onnx`` file in one that imports
onnxruntime and not even torch. Each child's outputs must equal, bit for bit, what the same file
gives in this process. Four compiles cover the forms a program can take: float, static int8 on
``x86-avx2`` (which also writes ``model_int8.pt``), dynamic and weight-only.

Why it matters: a quantized FakeQuant computes with ``torch.ops.quantized_decomposed`` ops, which
exist only after ``torch.ao.quantization.fx._decomposed`` is imported; exported as they are, the
program fails in ``torch.export.load`` with "... not registered". The pt2 export therefore writes
them as core aten ops (`aten_export_form`), which must give the same numbers, ties included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import effopt
from effopt.optimizer.quant.schemes import (
    FakeQuant,
    QScheme,
    QuantLinear,
    aten_export_form,
    calibrate_weight,
    freeze_weights,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- the compiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    factory: str
    shape: tuple[int, ...]
    passes: tuple[object, ...]
    artefacts: tuple[str, ...]  # torch artefacts the compile must write (all .pt2/.pt files are loaded)
    onnx_op: str | None = None  # an op the quantized ONNX form must have (None: a float model)

    @property
    def quantized(self) -> bool:
        return self.onnx_op is not None


CASES = {
    "float": Case("tests.models:resnet_style", (1, 3, 16, 16), ("fold_batchnorm",), ("model.pt2",)),
    "static_x86_avx2": Case(
        "tests.models:resnet_style", (1, 3, 16, 16), ("fold_batchnorm", {"name": "quantize"}),
        ("model.pt2", "model_int8.pt"), "QuantizeLinear",
    ),
    "dynamic": Case(
        "tests.models:mlp", (1, 64), ({"name": "quantize", "mode": "dynamic"},), ("model.pt2",), "DynamicQuantizeLinear"
    ),
    "weight_only": Case(
        "tests.models:mlp", (1, 64), ({"name": "quantize", "mode": "weight_only", "bits": 4},), ("model.pt2",),
        "DequantizeLinear",
    ),
}


@dataclass(frozen=True)
class Compiled:
    case: Case
    result: effopt.Result
    out: Path
    x: torch.Tensor  # batch 3: the artefacts' batch is dynamic


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    calib = np.random.default_rng(0).standard_normal((32, *case.shape[1:])).astype(np.float32)
    np.savez(root / "calib.npz", x=calib)
    recipe = {
        "version": 1,
        "model": {"factory": case.factory, "pythonpath": [str(REPO_ROOT)]},
        "inputs": [{"name": "x", "shape": list(case.shape)}],
        "target": "x86-avx2",
        "passes": list(case.passes),
        "data": {"calibration": str(root / "calib.npz")},
        "output": {"formats": ["pt2", "onnx"]},
    }
    result = effopt.compile(recipe, output_dir=root / "out")
    x = torch.randn(3, *case.shape[1:], generator=torch.Generator().manual_seed(1))
    return Compiled(case, result, root / "out", x)


# --- the children ------------------------------------------------------------------------------

BLOCKER = """\
import importlib.abc, sys

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name}: the artefact must run without it")
        return None

sys.meta_path.insert(0, Block())
"""

TORCH_CHILD = BLOCKER + """\
import torch

x = torch.load("x.pt", weights_only=True)
outputs = {}
for name in sys.argv[2:]:
    module = torch.export.load(name).module() if name.endswith(".pt2") else torch.jit.load(name)
    with torch.no_grad():
        outputs[name] = module(x)
torch.save(outputs, "y.pt")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
"""

ONNX_CHILD = BLOCKER + """\
import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 1
for i, name in enumerate(sys.argv[2:]):
    session = ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: np.load("x.npy")})
    np.save(f"y{i}.npy", y)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
"""


def run_alone(script: str, blocked: str, args: list[str], cwd: Path) -> None:
    """``python -I`` (no PYTHONPATH, no cwd on the path) with ``blocked`` packages refused at import."""
    (cwd / "child.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-I", "child.py", blocked, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- tests -------------------------------------------------------------------------------------


def test_torch_artefacts_load_and_run_with_torch_alone(compiled: Compiled, tmp_path: Path) -> None:
    # setup
    found = sorted(p.name for p in compiled.out.iterdir() if p.suffix in (".pt2", ".pt"))
    assert set(compiled.case.artefacts) <= set(found), found  # precondition
    files = [str(compiled.out / name) for name in found]
    quantizers = [m for m in compiled.result.model.modules() if isinstance(m, FakeQuant) and m.calibrated]
    assert bool(quantizers) == compiled.case.quantized  # precondition: the quantized cases hold quantizers
    torch.save(compiled.x, tmp_path / "x.pt")
    # execute
    run_alone(TORCH_CHILD, "effopt,tests,examples", files, tmp_path)
    # assert
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        optimized = compiled.result.model(compiled.x)
        for name in files:
            here = torch.export.load(name).module() if name.endswith(".pt2") else torch.jit.load(name)
            assert torch.equal(got[name], here(compiled.x)), name
    program = got[str(compiled.out / "model.pt2")]
    assert program.shape == optimized.shape
    # the program computes what the optimized (fake-quant) model computes, reference ops or aten ops
    torch.testing.assert_close(program, optimized, rtol=1e-5, atol=1e-6)


def test_pt2_holds_only_aten_ops_and_int8_weights_when_quantized(compiled: Compiled) -> None:
    program = torch.export.load(str(compiled.out / "model.pt2"))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    namespaces = sorted({getattr(t, "namespace", type(t).__name__) for t in targets})
    assert namespaces == ["aten"], namespaces
    stored = [*program.state_dict.values(), *program.constants.values()]
    assert any(t.dtype == torch.int8 for t in stored) == compiled.case.quantized  # int8 weight codes


def test_onnx_loads_and_runs_with_onnxruntime_alone(compiled: Compiled, tmp_path: Path) -> None:
    # setup
    paths = sorted(p for p in compiled.out.iterdir() if p.suffix == ".onnx")  # model.onnx, model_float.onnx, ...
    assert compiled.out / "model.onnx" in paths, paths  # precondition
    ops = {n.op_type for n in onnx.load(str(compiled.out / "model.onnx")).graph.node}
    if compiled.case.quantized:  # the ONNX export keeps its Q/DQ form; only the pt2 export changes form
        assert compiled.case.onnx_op in ops, ops
    x = compiled.x.numpy()
    np.save(tmp_path / "x.npy", x)
    # execute
    run_alone(ONNX_CHILD, "effopt,tests,examples,torch", [str(p) for p in paths], tmp_path)
    # assert
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for i, path in enumerate(paths):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (here,) = session.run(None, {session.get_inputs()[0].name: x})
        np.testing.assert_array_equal(np.load(tmp_path / f"y{i}.npy"), here, err_msg=path.name)


# --- the aten form is the reference ops, bit for bit ----------------------------------------------


def _quantizer(scheme: QScheme, scale: torch.Tensor, zero: torch.Tensor) -> FakeQuant:
    fq = FakeQuant(scheme, channels=scale.numel())
    fq.set_qparams(scale if scheme.axis is not None else scale[0], zero if scheme.axis is not None else zero[0])
    return fq.eval()


SCHEMES = [
    QScheme(bits=8, signed=False, symmetric=False, axis=None),  # activations
    QScheme(bits=7, signed=True, symmetric=True, axis=1),       # x86-avx2 weights
    QScheme(bits=4, signed=True, symmetric=True, axis=None),
    QScheme(bits=8, signed=False, symmetric=False, axis=1),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.bits}{'s' if s.signed else 'u'}-axis{s.axis}")
@pytest.mark.parametrize("ties", [False, True])
def test_aten_form_equals_the_reference_ops_bit_for_bit(scheme: QScheme, ties: bool) -> None:
    """Random scales and inputs; with ``ties`` the scales are powers of two and every x·(1/s) is k + 0.5,
    so round-half-to-even decides each code."""
    g = torch.Generator().manual_seed(int(ties) * 10 + scheme.bits)
    for _ in range(20):
        # setup
        if ties:
            scale = 2.0 ** -torch.randint(0, 8, (6,), generator=g).float()
        else:
            scale = torch.rand(6, generator=g) * 0.1 + 1e-4
        zero = (torch.zeros(6) if scheme.signed else torch.randint(0, 256, (6,), generator=g)).to(torch.int32)
        fq = _quantizer(scheme, scale, zero)
        step = scale.view(1, 6, 1, 1) if scheme.axis is not None else scale[0]
        k = torch.randint(-scheme.qmax - 8, scheme.qmax + 8, (4, 6, 5, 5), generator=g).float()
        x = (k + 0.5) * step if ties else torch.randn(4, 6, 5, 5, generator=g) * scheme.qmax * step
        reference = fq(x)
        # execute
        with aten_export_form(fq):
            aten = fq(x)
        # assert
        assert not fq.aten_form  # the switch is put back
        assert aten.dtype == reference.dtype == torch.float32
        assert torch.equal(aten.view(torch.int32), reference.view(torch.int32))


def test_aten_form_rounds_ties_to_even() -> None:
    fq = _quantizer(SCHEMES[0], torch.ones(1), torch.zeros(1, dtype=torch.int32))  # s = 1, z = 0, uint8
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5])
    with aten_export_form(fq):
        assert torch.equal(fq(x), torch.tensor([0.0, 2.0, 2.0, 4.0, 0.0]))
    assert torch.equal(fq(x), torch.tensor([0.0, 2.0, 2.0, 4.0, 0.0]))  # the reference ops agree


@pytest.mark.parametrize("per_channel", [True, False])
def test_frozen_int8_weights_dequantize_alike_in_the_aten_form(per_channel: bool) -> None:
    # setup
    g = torch.Generator().manual_seed(3)
    layer = QuantLinear(nn.Linear(16, 8), QScheme(bits=7, signed=True, symmetric=True, axis=0 if per_channel else None))
    with torch.no_grad():
        layer.linear.weight.copy_(torch.randn(8, 16, generator=g))
    calibrate_weight(layer)
    frozen = freeze_weights(nn.Sequential(layer)).eval()
    assert getattr(layer, "weight_codes", None) is not None  # precondition: int8 codes, no float weight
    x = torch.randn(5, 16, generator=g)
    # execute
    reference = frozen(x)
    with aten_export_form(frozen):
        aten = frozen(x)
    # assert
    assert torch.equal(aten, reference)
