"""Sanity checks for the shared model zoo in ``tests/models.py``.

Why: every pass test trusts these builders to be what their drawings say. If a
builder silently stopped being traceable, lost its randomized BN statistics or
changed its FLOPs, pass tests would pass or fail for the wrong reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.models import (
    MNIST_CLASSIC_CNN_INPUT,
    MNIST_CLASSIC_LAYER_FLOPS,
    MNIST_CLASSIC_TOTAL_FLOPS,
    ZOO,
    Gate,
    make_input,
)

UNTRACEABLE = "untraceable_net"

#: Output shape of each model on its zoo input: catches a builder whose drawing drifted.
EXPECTED_OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet_style": (2, 10),
    "vgg_style": (2, 10),
    "mobilenet_style": (2, 10),
    "conv1d_net": (2, 5),
    "mnist_classic_cnn": (1, 10),
    "mlp": (2, 10),
    "tiny_transformer": (2, 10),
    "shared_module_net": (2, 10),
    "fanout_net": (2, 8, 16, 16),
    "concat_net": (2, 8, 16, 16),
    "untraceable_net": (2, 10),
    "dropout_identity_net": (2, 10),
    "bn_without_running_stats": (2, 8, 16, 16),
}


class _GateLeafTracer(torch.fx.Tracer):
    """Treats :class:`Gate` as an opaque leaf, the way a recipe's ``leaf_modules`` would."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Gate) or super().is_leaf_module(m, module_qualified_name)


def test_zoo_names_match_expected_shapes() -> None:
    assert list(ZOO) == list(EXPECTED_OUTPUT_SHAPES)


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_runs_in_eval_mode(name: str) -> None:
    # setup
    builder, shape = ZOO[name]
    model = builder()
    # execute
    with torch.no_grad():
        out = model(make_input(shape))
    # assert
    assert not any(m.training for m in model.modules()), f"{name}: a submodule is in training mode"
    assert tuple(out.shape) == EXPECTED_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(ZOO))
def test_builders_are_deterministic_and_leave_global_rng_alone(name: str) -> None:
    builder, _ = ZOO[name]
    rng_before = torch.get_rng_state()
    first, second = builder().state_dict(), builder().state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{name}: {key} differs between builds"


@pytest.mark.parametrize("name", [n for n in ZOO if any(isinstance(m, _BatchNorm) for m in ZOO[n][0]().modules())])
def test_batchnorms_are_not_identity(name: str) -> None:
    for bn_name, bn in ZOO[name][0]().named_modules():
        if not isinstance(bn, _BatchNorm):
            continue
        where = f"{name}: {bn_name}"
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight)), where
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias)), where
        if bn.track_running_stats:
            assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean)), where
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), where
            assert (bn.running_var > 0).all(), where


@pytest.mark.parametrize("name", [n for n in ZOO if n != UNTRACEABLE])
def test_symbolic_trace_succeeds_and_matches_eager(name: str) -> None:
    builder, shape = ZOO[name]
    model = builder()
    traced = torch.fx.symbolic_trace(model)
    traced.graph.lint()
    x = make_input(shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_untraceable_net_fails_in_gate_and_traces_with_gate_as_leaf() -> None:
    builder, shape = ZOO[UNTRACEABLE]
    model = builder()
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)

    graph = _GateLeafTracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    assert [n.target for n in graph.nodes if n.op == "call_module" and n.target == "gate"] == ["gate"]
    x = make_input(shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_mnist_classic_cnn_flops_match_hand_count() -> None:
    """Recount conv/linear FLOPs from observed output shapes, independently of effopt."""
    builder, shape = ZOO["mnist_classic_cnn"]
    model = builder()
    flops: list[int] = []

    def count(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs_per_output = (module.in_channels // module.groups) * kh * kw
        else:
            assert isinstance(module, nn.Linear)
            macs_per_output = module.in_features
        flops.append(2 * out.numel() * macs_per_output)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(make_input(shape))

    assert shape == MNIST_CLASSIC_CNN_INPUT == (1, 1, 28, 28)
    assert tuple(flops) == MNIST_CLASSIC_LAYER_FLOPS
    assert sum(MNIST_CLASSIC_LAYER_FLOPS) == MNIST_CLASSIC_TOTAL_FLOPS == 1_059_880


def test_dropout_identity_net_keeps_its_dead_code_after_tracing() -> None:
    """The DCE target must survive tracing, or a DCE test could pass without doing anything."""
    traced = torch.fx.symbolic_trace(ZOO["dropout_identity_net"][0]())
    dead = [n for n in traced.graph.nodes if n.op not in ("output",) and not n.users]
    assert [n.name for n in dead] == ["mul"]


def test_tiny_transformer_has_four_matmuls() -> None:
    """Two layers x (q @ k^T, attn @ v): what a matmul-counting analysis must find."""
    traced = torch.fx.symbolic_trace(ZOO["tiny_transformer"][0]())
    matmuls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    assert len(matmuls) == 4
