"""Half-precision artefacts and the AOTInductor package: written, checked, and loading without effopt.

One bf16 compile of the two-block ResNet (``fold_batchnorm, half_precision``) for a CPU
target that runs bf16 (``x86-avx2`` plus bf16/fp16 peaks, as a CPU with AMX would have; the
shipped ``x86-avx2`` refuses the pass) feeds the fast tests: its ``model.pt2`` loads in a
``python -I`` child that imports torch and nothing of effopt, and gives the same numbers
bit for bit; its ``model.onnx`` stays fp32 and says why (onnxruntime's CPU provider has no
bf16 Conv/Gemm). One AOTInductor compile (~45 s on 2 shared cores, marked slow) checks
``formats: [aoti]``: the package loads with ``torch._inductor.aoti_load_package`` in the same
kind of child, its compile time lands in measurements.json, and deploy and bench time it.
Without a C++ compiler the AOTI tests skip with the reason, and asking for the package is an
`EmitError` that says how to get one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

import effopt
from effopt.errors import EmitError
from effopt.hardware_profiles import load_profile
from effopt.optimizer import artefacts
from effopt.optimizer.emit.aoti import aoti_blocker, compile_aoti, cpp_compiler_problem
from effopt.optimizer.emit.pt2 import export_program
from effopt.optimizer.ir.core import InputSpec
from tests.test_artefacts_load_alone import BLOCKER, run_alone

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_COMPILER = cpp_compiler_problem()

TORCH_CHILD = BLOCKER + """\
import torch

x = torch.load("x.pt", weights_only=True)
outputs = {}
for name in sys.argv[2:]:
    if name.endswith("model_aoti.pt2"):
        run = torch._inductor.aoti_load_package(name)
    else:
        run = torch.export.load(name).module()
    with torch.no_grad():
        outputs[name] = run(x)
torch.save(outputs, "y.pt")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
"""


def half_cpu_profile(folder: Path) -> Path:
    """x86-avx2 plus bf16/fp16 peaks (a CPU with AMX): x86_64, so this host measures the deploy choice."""
    data = yaml.safe_load((REPO_ROOT / "effopt" / "hardware_profiles" / "x86-avx2.yaml").read_text())
    data |= {"name": "x86-half", "description": "test target: an x86-64 CPU with bf16/fp16 compute"}
    data["peak_flops_per_s"] |= {"bf16": 3072e9, "fp16": 3072e9}
    path = folder / "x86-half.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def recipe(folder: Path, formats: list[str], dtype: str = "bf16", factory: str = "resnet_style",
           shape: tuple[int, ...] = (1, 3, 16, 16)) -> dict:
    return {
        "version": 1,
        "model": {"factory": f"tests.models:{factory}", "pythonpath": [str(REPO_ROOT)]},
        "inputs": [{"name": "x", "shape": list(shape)}],
        "target": str(half_cpu_profile(folder)),
        "passes": ["fold_batchnorm", {"name": "half_precision", "dtype": dtype}],
        "output": {"formats": formats},
    }


@dataclass(frozen=True)
class Compiled:
    result: effopt.Result
    out: Path
    report: dict
    x: torch.Tensor  # batch 3: the artefacts' batch is dynamic


def _compile(root: Path, formats: list[str]) -> Compiled:
    result = effopt.compile(recipe(root, formats), output_dir=root / "out")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return Compiled(result, root / "out", json.loads((root / "out" / "report.json").read_text()), x)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return _compile(tmp_path_factory.mktemp("bf16"), ["pt2", "onnx"])


def artefact(report: dict, name: str) -> dict:
    return next(a for a in report["artefacts"] if a["file"] == name)


# --- half precision artefacts ------------------------------------------------------------------------


def test_bf16_pt2_loads_with_torch_alone_and_computes_in_bf16(bf16: Compiled, tmp_path: Path) -> None:
    # setup
    pt2 = bf16.out / "model.pt2"
    program = torch.export.load(str(pt2))
    assert any(t.dtype == torch.bfloat16 for t in program.state_dict.values())  # precondition: bf16 weights
    torch.save(bf16.x, tmp_path / "x.pt")
    # execute
    run_alone(TORCH_CHILD, "effopt,tests,examples", [str(pt2)], tmp_path)
    # assert
    got = torch.load(tmp_path / "y.pt", weights_only=True)[str(pt2)]
    assert got.dtype == torch.float32  # fp32 out, as the user fed fp32 in
    with torch.no_grad():
        assert torch.equal(got, program.module()(bf16.x))
        torch.testing.assert_close(got, bf16.result.model(bf16.x), rtol=0, atol=0)
    conv = next(t for k, t in program.state_dict.items() if t.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # CPU target: channels-last
    assert "bf16 compute" in artefact(bf16.report, "model.pt2")["note"]


def test_onnx_stays_fp32_where_onnxruntime_has_no_bf16_kernels_and_says_why(bf16: Compiled) -> None:
    info = artefact(bf16.report, "model.onnx")
    assert info["passed"] and "fp32, not bf16" in info["note"] and "bfloat16" in info["note"]
    model = onnx.load(str(bf16.out / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT}
    assert not [n for n in model.graph.node if n.op_type == "Cast"]  # the fp32 twin has no boundary casts


def test_report_lists_each_layers_dtype_and_deploy_times_the_half_artefacts(bf16: Compiled) -> None:
    rows = bf16.report["precision"]
    assert {r["dtype"] for r in rows} == {"bf16"} and any(r["op"] == "Conv2d" for r in rows)
    assert "## Precision per layer" in (bf16.out / "report.md").read_text()
    deploy = bf16.report["deploy"]
    assert deploy["basis"] == "measured" and deploy["artefact"] in ("model.onnx", "model.pt2")
    rows = json.loads((bf16.out / "measurements.json").read_text())["rows"]
    assert {r["artefact"] for r in rows} == {"model.onnx", "model.pt2"}


def test_fp16_onnx_where_onnxruntime_has_fp16_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's x86 build has no fp16 Gemm, so the kernel query is stubbed to 'it has them' (an arm64
    build's answer for some ops): the file then holds fp16 weights and passes the fp16 tolerance."""
    monkeypatch.setattr(artefacts, "half_onnx_blocker", lambda dtype, ops: None)
    result = effopt.compile(recipe(tmp_path, ["onnx"], "fp16", "mlp", (1, 64)), output_dir=tmp_path / "out")
    info = artefact(json.loads((tmp_path / "out" / "report.json").read_text()), "model.onnx")
    assert result.passed and info["passed"] and info["note"].startswith("fp16 weights and compute")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in model.graph.initializer}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 at the boundary


# --- AOTInductor -------------------------------------------------------------------------------------


def test_aoti_is_built_only_for_a_cpu_of_this_hosts_arch() -> None:
    assert aoti_blocker(load_profile("x86-avx2"), "x86_64") is None
    assert "gpu" in (aoti_blocker(load_profile("a100"), "x86_64") or "")
    assert "machine code" in (aoti_blocker(load_profile("arm-cortex-a"), "x86_64") or "")


def test_without_a_cpp_compiler_asking_for_aoti_says_how_to_get_one(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    model = torch.nn.Linear(4, 2).eval()
    program = export_program(model, (InputSpec("x", (1, 4), dynamic_batch=True),), (torch.randn(1, 4),))
    with inductor_config.patch({"cpp.cxx": ("effopt-no-such-c++",)}):
        assert cpp_compiler_problem() is not None  # precondition: no compiler now
        with pytest.raises(EmitError, match="needs a C\\+\\+ compiler.*remove aoti from output.formats"):
            compile_aoti(program, tmp_path / "model_aoti.pt2")
    assert cpp_compiler_problem() == NO_COMPILER  # the setting is back


@pytest.mark.slow
@pytest.mark.skipif(NO_COMPILER is not None, reason=str(NO_COMPILER))
def test_aoti_package_is_checked_timed_and_loads_with_torch_alone(tmp_path: Path) -> None:
    # setup
    compiled = _compile(tmp_path, ["pt2", "aoti"])
    package = compiled.out / "model_aoti.pt2"
    assert package.is_file()  # precondition
    torch.save(compiled.x, tmp_path / "x.pt")
    # execute
    run_alone(TORCH_CHILD, "effopt,tests,examples", [str(package)], tmp_path)
    # assert
    got = torch.load(tmp_path / "y.pt", weights_only=True)[str(package)]
    with torch.no_grad():
        half_model = compiled.result.model(compiled.x)
    assert got.dtype == torch.float32 and got.shape == half_model.shape
    torch.testing.assert_close(got, half_model, rtol=0.031, atol=0.031)  # dtype_tolerance("bf16")
    info = artefact(compiled.report, "model_aoti.pt2")
    assert info["passed"] and "AOTInductor" in info["note"] and "contiguous NCHW" in info["note"]
    measured = json.loads((compiled.out / "measurements.json").read_text())
    assert measured["compile_s"]["model_aoti.pt2"] > 0
    assert "model_aoti.pt2" in {r["artefact"] for r in measured["rows"]}  # deploy timed it
    assert "compile_s" not in compiled.report  # report.json holds no measured number
    from effopt.optimizer.measure.bench_artefacts import run_bench

    bench = run_bench(None, None, compiled.result.ir.inputs, compiled.out, batches=(1,), runs=3, warmup=1,
                      profile=load_profile(str(half_cpu_profile(tmp_path))))
    assert "model_aoti.pt2 (AOTInductor)" in {s.runtime for s in bench.stats}
    assert np.isfinite([s.p50_s for s in bench.stats]).all()
