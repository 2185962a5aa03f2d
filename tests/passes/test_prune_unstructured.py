"""Tests for effopt.passes.prune_unstructured: mask math, sparsity per layer / global / 2:4, skips,
fine-tuning with masks kept, the cost model's 2:4 credit, export and composition with quantize.

Every case is a named builder returning ``(module, Expected)``; the same list drives the sparsity,
2:4 and exactness tests. Each test first asserts its precondition (the weights have no zeros yet,
the latency differs where it should), so it cannot pass while the pass does nothing. Passes are
built from plain dicts through `parse_recipe` and run through the pass manager.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import effopt
from effopt.errors import PassError, RecipeError
from effopt.hardware_profiles import load_profile
from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.core import IR
from effopt.optimizer.ir.cost_model import estimate, input_groups, is_2_4_sparse
from effopt.optimizer.train.finetune import FineTuner
from effopt.passes.base import PassContext
from effopt.passes.manager import PassRecord, run_passes
from effopt.passes.prune_unstructured import global_masks, magnitude_mask, mask_2_4, zeros_for
from tests.models import ZOO, seeded
from tests.passes.helpers import build_ir, recipe_passes

ROOT = Path(__file__).resolve().parents[2]


# --- helpers ----------------------------------------------------------------------------------


def prune(ir: IR, ctx: PassContext | None = None, **options: object) -> tuple[IR, PassRecord]:
    ir, records = run_passes(ir, recipe_passes({"name": "prune_unstructured", **options}), ctx or PassContext())
    (record,) = records
    return ir, record


def layer_weights(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Conv/Linear weights by module path."""
    layers = (nn.Conv1d, nn.Conv2d, nn.Linear)
    return {name: m.weight.detach() for name, m in gm.named_modules() if isinstance(m, layers)}


def zero_fraction(w: torch.Tensor) -> float:
    return int((w == 0).sum()) / w.numel()


def x_for(shape: tuple[int, ...], seed: int = 1234) -> torch.Tensor:
    return torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(seed))


# --- builders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What pruning must do to a builder's model."""

    shape: tuple[int, ...]                              # input shape, batch first
    pruned: tuple[str, ...]                             # module paths pruned (unstructured)
    declined_2_4: tuple[tuple[str, str], ...] = ()      # (node, words of its Skip reason) for 2:4


Case = tuple[nn.Module, Expected]


def mlp_case() -> Case:
    """Three Linear layers, every input length a multiple of 4::

        linear 64->32 ─ relu ─ linear 32->32 ─ relu ─ linear 32->10
    """
    return ZOO["mlp"][0](), Expected(ZOO["mlp"][1], pruned=("0", "2", "4"))


def resnet_style_case() -> Case:
    """Residual adds and a 1x1 downsample; the stem has 3 input channels (no 2:4 groups)::

        conv1 ─ bn1 ─ relu ─┬─ conv ─ bn ─ relu ─ conv ─ bn ─ add ─ ... ─ fc
                            └──────────────────────────────────┘
    """
    pruned = ("conv1", "layer1.conv1", "layer1.conv2", "layer2.downsample.0", "layer2.conv1", "layer2.conv2", "fc")
    return ZOO["resnet_style"][0](), Expected(ZOO["resnet_style"][1], pruned, (("conv1", "3 input channels"),))


def mobilenet_style_case() -> Case:
    """Depthwise convs (1 input channel per group: no 2:4 groups) between pointwise ones::

        stem ─ bn ─┬─ dw g=16 ─ bn ─ relu6 ─ pw ─ bn ─ add ─ pw ─ bn ─ dw g=64 ─ ... ─ head
                   └──────────────────────────────────┘
    """
    model = ZOO["mobilenet_style"][0]()
    pruned = tuple(name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    declined = tuple((name.replace(".", "_"), "is not a multiple of 4") for name, m in model.named_modules()
                     if isinstance(m, nn.Conv2d) and m.weight.shape[1] % 4)
    return model, Expected(ZOO["mobilenet_style"][1], pruned, declined)


def concat_net_case() -> Case:
    """Two conv branches joined by cat, then a 1x1 fuse conv::

           ┌─ conv_a ─ bn_a ─┐
        x ─┤                 cat ─ fuse
           └─ conv_b ─ bn_b ─┘
    """
    declined = (("conv_a", "3 input channels"), ("conv_b", "3 input channels"))
    return ZOO["concat_net"][0](), Expected(ZOO["concat_net"][1], ("conv_a", "conv_b", "fuse"), declined)


def shared_module_net_case() -> Case:
    """One conv module called twice: its weights are pruned once, at the first call::

        stem ─ relu ─ shared ─ bn_a ─ relu ─ shared ─ bn_b ─ relu ─ pool ─ fc
    """
    model = ZOO["shared_module_net"][0]()
    return model, Expected(ZOO["shared_module_net"][1], ("stem", "shared", "fc"), (("stem", "3 input channels"),))


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.b1 = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)


def functional_linear_case() -> Case:
    """``F.linear`` with attribute weights: lifted to nn.Linear first, then pruned::

        x ─ F.linear(w1, b1) 8->16 ─ relu ─ F.linear(w2) 16->4
    """
    with seeded(7):
        model = FunctionalLinear().eval()
    return model, Expected((2, 8), pruned=("w1", "w2"))


CASES: dict[str, Callable[[], Case]] = {
    "mlp": mlp_case,
    "resnet_style": resnet_style_case,
    "mobilenet_style": mobilenet_style_case,
    "concat_net": concat_net_case,
    "shared_module_net": shared_module_net_case,
    "functional_linear": functional_linear_case,
}


def wide_mlp() -> nn.Module:
    """Compute-bound on a100 and h100 at batch 2048 (2 x 537e6 MACs), so a 2:4 credit shows in the total::

        linear 512->512 ─ relu ─ linear 512->512
    """
    with seeded(11):
        return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()


# --- the math ---------------------------------------------------------------------------------


def test_mask_math_matches_hand_computed_masks() -> None:
    assert zeros_for(0.3, 10) == 3 and zeros_for(0.0, 7) == 0 and zeros_for(0.99, 10) == 10
    assert magnitude_mask(torch.tensor([0.1, -3.0, 0.5, 2.0]), 0.5).tolist() == [False, True, False, True]
    a, b = global_masks([torch.tensor([0.1, 4.0]), torch.tensor([0.2, 0.3])], 0.75)
    assert a.tolist() == [False, True] and b.tolist() == [False, False]
    row = torch.tensor([[0.1, -3.0, 0.5, 2.0, 1.0, 1.0, 0.0, -2.0]])
    assert mask_2_4(row).int().tolist() == [[0, 1, 0, 1, 1, 0, 0, 1]]  # a tie keeps the first


def test_2_4_groups_are_input_channels_at_one_kernel_position() -> None:
    # a conv weight [out=1, in=4, kh=1, kw=2]: the groups are w[0, :, 0, 0] and w[0, :, 0, 1]
    w = torch.tensor([[[[1.0, 5.0]], [[2.0, 6.0]], [[3.0, 7.0]], [[4.0, 8.0]]]])
    assert input_groups(w).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    kept = w * mask_2_4(w)
    assert kept[0, :, 0, 0].tolist() == [0, 0, 3, 4] and kept[0, :, 0, 1].tolist() == [0, 0, 7, 8]
    assert is_2_4_sparse(kept) and not is_2_4_sparse(w)
    assert is_2_4_sparse(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]]))
    assert not is_2_4_sparse(torch.tensor([[1.0, 2, 3, 0, 0, 0, 0, 0]]))  # 62.5 % zeros, one group with 3
    assert not is_2_4_sparse(torch.zeros(4, 6))  # input length 6: no groups of 4


# --- sparsity as asked --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_each_layer_gets_the_sparsity_asked(name: str, sparsity: float) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    # execute
    ir, record = prune(ir, sparsity=sparsity)
    # assert
    weights = layer_weights(ir.gm)
    assert tuple(weights) == expected.pruned
    for path, w in weights.items():
        assert zero_fraction(layer_weights(model).get(path, w.new_ones(1))) == 0, "precondition: dense weights"
        assert int((w == 0).sum()) == zeros_for(sparsity, w.numel()), path
    stats = record.result.stats
    assert stats["pruned_layers"] == len(expected.pruned)
    assert stats["sparsity"] == pytest.approx(sparsity, abs=0.01)
    assert all(stats[f"sparsity/{n}"] == pytest.approx(sparsity, abs=0.05) for n in record.result.changed)
    with torch.no_grad():
        assert ir.gm(x_for(expected.shape)).shape == model(x_for(expected.shape)).shape


def test_global_scope_ranks_magnitudes_across_layers() -> None:
    # setup: scale the last layer down so a global threshold must take more from it
    model, expected = mlp_case()
    with torch.no_grad():
        model[4].weight.mul_(0.5)
    ir = build_ir(model, expected.shape)
    # execute
    ir, record = prune(ir, sparsity=0.5, scope="global")
    # assert
    weights = list(layer_weights(ir.gm).values())
    originals = list(layer_weights(model).values())
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == zeros_for(0.5, total)
    # fan-in 32 vs 64 and the 0.5 scale: the last layer's |w| is smallest, the middle one's largest
    assert zero_fraction(weights[2]) > 0.7 > zero_fraction(weights[0]) > zero_fraction(weights[1])
    pruned_max = max(float(o[w == 0].abs().max()) for o, w in zip(originals, weights) if (w == 0).any())
    kept_min = min(float(w[w != 0].abs().min()) for w in weights if (w != 0).any())
    assert pruned_max <= kept_min
    assert record.result.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_2_4_pattern_holds_in_every_group_of_4(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    assert not any(is_2_4_sparse(w) for w in layer_weights(ir.gm).values()), "precondition: dense weights"
    # execute
    ir, record = prune(ir, pattern="2:4")
    # assert
    result = record.result
    declined = {node for node, _ in expected.declined_2_4}
    assert [s.node for s in result.skipped] == [n for n, _ in expected.declined_2_4]
    for skip, (_, words) in zip(result.skipped, expected.declined_2_4):
        assert words in skip.reason, skip
    assert result.changed and not set(result.changed) & declined
    for path, w in layer_weights(ir.gm).items():
        if path.replace(".", "_") in declined:
            assert zero_fraction(w) == 0, path
            continue
        assert is_2_4_sparse(w), path
        assert ((input_groups(w) == 0).sum(dim=1) == 2).all(), path  # exactly 2 kept: no weight was 0 before
    assert all(result.stats[f"sparsity/{n}"] == 0.5 for n in result.changed)
    assert result.stats["2_4_size_bytes"] < result.stats["dense_size_bytes"]


@pytest.mark.parametrize("name", list(CASES))
def test_sparsity_0_is_exact(name: str) -> None:
    # setup
    model, expected = CASES[name]()
    ir = build_ir(model, expected.shape)
    x = x_for(expected.shape)
    with torch.no_grad():
        y = model(x)
    # execute
    ir, record = prune(ir, sparsity=0)
    # assert
    assert len(record.result.changed) == record.result.stats.get("lifted_functional_layers", 0)  # only lifting
    assert record.result.stats["sparsity"] == 0
    for path, w in layer_weights(ir.gm).items():
        assert torch.equal(w, layer_weights(model).get(path, w)), path
    with torch.no_grad():
        assert torch.equal(ir.gm(x), y)


def test_the_callers_model_is_not_edited() -> None:
    # setup
    model, expected = resnet_style_case()
    before = {k: v.clone() for k, v in layer_weights(model).items()}
    # execute
    prune(build_ir(model, expected.shape), sparsity=0.9)
    # assert
    assert all(torch.equal(w, before[k]) for k, w in layer_weights(model).items())


# --- selection and skips ------------------------------------------------------------------------


def test_layers_exclude_and_min_params_select_what_is_pruned() -> None:
    # setup
    model, expected = mlp_case()  # weights: 0: 2048, 2: 1024, 4: 320
    # execute
    ir_a, rec_a = prune(build_ir(model, expected.shape), layers=["_0", "4"])
    ir_b, rec_b = prune(build_ir(model, expected.shape), exclude=["_2"], min_params=1000)
    # assert
    assert rec_a.result.changed == ("_0", "_4")
    assert [(s.node, s.reason) for s in rec_a.result.skipped] == [("_2", "not listed in layers")]
    assert rec_b.result.changed == ("_0",)
    assert [(s.node, s.reason) for s in rec_b.result.skipped] == [
        ("_2", "listed in exclude"), ("_4", "320 weights < min_params 1000")]
    assert zero_fraction(layer_weights(ir_b.gm)["4"]) == 0


def test_a_quantized_layer_is_a_skip_with_the_fix() -> None:
    # setup
    model, expected = mlp_case()
    ir, _ = run_passes(build_ir(model, expected.shape), recipe_passes({"name": "quantize", "mode": "weight_only"}),
                       PassContext())
    # execute
    ir, record = prune(ir)
    # assert
    assert record.result.changed == ()
    assert len(record.result.skipped) == 3
    assert all("already quantized: put prune_unstructured before quantize" in s.reason for s in record.result.skipped)


def test_an_unknown_layer_name_is_an_error_listing_the_layers() -> None:
    model, expected = mlp_case()
    with pytest.raises(PassError, match=r"layers names 'conv9', which is no Conv/Linear node or module.*_0, 0, _2"):
        prune(build_ir(model, expected.shape), layers=["conv9"])


@pytest.mark.parametrize(("options", "words"), [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"pattern": "2:4", "sparsity": 0.3}, "sparsity is 0.5 by construction; leave sparsity unset"),
    ({"pattern": "2:4", "scope": "global"}, "nothing to rank across layers"),
    ({"pattern": "4:8"}, "pattern"),
    ({"min_params": -1}, "min_params"),
    ({"ratio": 0.5}, "ratio"),
])
def test_bad_options_are_recipe_errors_naming_the_field(options: dict, words: str) -> None:
    with pytest.raises(RecipeError, match=words):
        recipe_passes({"name": "prune_unstructured", **options})


def test_unset_sparsity_is_one_half_for_both_patterns() -> None:
    (p,) = recipe_passes("prune_unstructured")
    (q,) = recipe_passes({"name": "prune_unstructured", "pattern": "2:4"})
    (r,) = recipe_passes({"name": "prune_unstructured", "pattern": "2:4", "sparsity": 0.5})
    assert p.options.sparsity == q.options.sparsity == r.options.sparsity == 0.5


# --- fine-tuning -------------------------------------------------------------------------------


def random_source(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> DataSource:
    g = torch.Generator().manual_seed(seed)
    return DataSource("random", TensorDataset(torch.randn(n, *shape[1:], generator=g)), 16, False)


def test_zeros_stay_zeros_after_finetuning() -> None:
    # setup
    model, expected = mlp_case()
    pruned_only, _ = prune(build_ir(model, expected.shape), sparsity=0.6)
    tuner = FineTuner(random_source(expected.shape), None, "classification", seed=0)
    ctx = PassContext(services={"finetune": tuner})
    # execute
    ir, record = prune(build_ir(model, expected.shape), ctx, sparsity=0.6,
                       finetune={"steps": 8, "lr": 0.05, "weight_decay": 0.01, "progress": False})
    # assert
    assert record.result.stats["finetune_steps"] == 8
    for path, w in layer_weights(ir.gm).items():
        before = layer_weights(pruned_only.gm)[path]
        assert torch.equal(w == 0, before == 0), path  # the same weights are zero, and only those
        assert not torch.equal(w, before), f"{path}: precondition: fine-tuning changed the kept weights"
    assert record.result.stats["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_finetune_without_training_data_says_what_to_add() -> None:
    model, expected = mlp_case()
    with pytest.raises(PassError, match="add data.train to the recipe"):
        prune(build_ir(model, expected.shape), finetune={"steps": 1})


# --- cost model: speed only where the hardware has sparse kernels ---------------------------------


@pytest.mark.parametrize(("profile", "faster"), [("a100", True), ("h100-sxm", True), ("x86-avx2", False),
                                                  ("arm-cortex-a", False)])
def test_2_4_lowers_predicted_latency_only_on_profiles_with_sparse_kernels(profile: str, faster: bool) -> None:
    # setup
    target = load_profile(profile)
    ir = build_ir(wide_mlp(), (2, 512))
    before = estimate(ir, target, batch=2048)
    # execute
    ir, record = prune(ir, PassContext(profile=target), pattern="2:4")
    # assert
    after = estimate(ir, target, batch=2048)
    layers = [c for c in after.nodes if c.op_kind == "linear"]
    dense = {c.node: c for c in before.nodes}
    if faster:
        assert after.total_s < 0.8 * before.total_s
        assert all(c.sparse_2_4 and c.compute_s == pytest.approx(dense[c.node].compute_s / 2) for c in layers)
        assert any("halves the MAC time" in w for w in record.result.warnings)
    else:
        assert after.total_s == before.total_s and not any(c.sparse_2_4 for c in layers)
        assert f"{profile} has no sparse kernels: sparsity reduces compressed size only, not latency" \
            in record.result.warnings


def test_unstructured_sparsity_is_not_credited_even_on_a100() -> None:
    a100 = load_profile("a100")
    ir = build_ir(wide_mlp(), (2, 512))
    before = estimate(ir, a100, batch=2048).total_s
    ir, record = prune(ir, PassContext(profile=a100), sparsity=0.75)
    assert estimate(ir, a100, batch=2048).total_s == before
    assert any("speeds up only the 2:4 pattern" in w for w in record.result.warnings)
    stats = record.result.stats
    # bitmask format: 1 bit per weight + the 25 % kept values at 4 bytes
    weights = 2 * 512 * 512
    assert stats["dense_size_bytes"] - stats["bitmask_size_bytes"] == weights * 4 - (weights // 8 + weights // 4 * 4)


def test_2_4_survives_quantize_and_keeps_its_credit() -> None:
    # setup
    a100 = load_profile("a100")
    ir = build_ir(wide_mlp(), (2, 512))
    ctx = PassContext(profile=a100, calibration=random_source((2, 512)))
    # execute
    ir, _ = run_passes(ir, recipe_passes({"name": "prune_unstructured", "pattern": "2:4"}, "quantize"), ctx)
    # assert
    layers = [c for c in estimate(ir, a100, batch=2048).nodes if c.op_kind == "linear"]
    assert len(layers) == 2 and all(c.dtype == "int8" and c.sparse_2_4 for c in layers)


# --- export and compile -------------------------------------------------------------------------


def test_pruned_model_exports_to_onnx_with_its_zeros(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from effopt.optimizer.emit.onnx import export_onnx
    from effopt.optimizer.measure.runtime import run_onnx

    # setup
    model, expected = resnet_style_case()
    ir, _ = prune(build_ir(model, expected.shape), pattern="2:4")
    # execute
    path = export_onnx(ir.gm.eval(), ir.example_inputs, ["x"], [True], tmp_path / "pruned.onnx")
    # assert
    x = x_for(expected.shape)
    (y,) = run_onnx(path, [x.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(y, ir.gm(x).numpy(), rtol=1e-4, atol=1e-5)
    inits = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert sum(int((a == 0).sum()) for a in inits if a.ndim >= 2) >= 0.45 * sum(a.size for a in inits if a.ndim >= 2)


def test_prune_then_quantize_recipe_compiles(tmp_path: Path) -> None:
    # setup
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    recipe = {
        "version": 1,
        "model": {"factory": "tests.models:resnet_style", "pythonpath": [str(ROOT)]},
        "inputs": [{"name": "x", "shape": [1, 3, 16, 16]}],
        "passes": ["fold_batchnorm", {"name": "prune_unstructured", "pattern": "2:4"}, "quantize"],
        "data": {"calibration": str(tmp_path / "calib.npz")},
        "output": {"formats": ["onnx"]},
    }
    # execute
    result = effopt.compile(recipe, output_dir=tmp_path / "out")
    # assert
    assert result.passed, result.report.failures()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    prune_entry = next(p for p in report["passes"] if p["name"] == "prune_unstructured")
    assert prune_entry["options"]["sparsity"] == 0.5 and prune_entry["stats"]["sparsity"] == 0.5
    assert any("x86-avx2 has no sparse kernels" in w for w in prune_entry["warnings"])
    assert (tmp_path / "out" / "model.onnx").is_file()
