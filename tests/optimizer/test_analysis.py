"""Cost facts: hand counts, FlopCounterMode, bytes, views, uncounted ops, and the facts() accessor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effopt.errors import IRError, TraceError
from effopt.optimizer.ir.analysis import annotate, layer_rows, totals
from effopt.optimizer.ir.core import IR, InputSpec, facts
from effopt.optimizer.ir.trace import trace_module
from tests.models import MNIST_CLASSIC_LAYER_FLOPS, MNIST_CLASSIC_TOTAL_FLOPS, ZOO, make_input


def build(model: nn.Module, shape: tuple[int, ...], dtype: str = "float32") -> IR:
    spec = InputSpec("x", shape, dtype)
    return annotate(IR(trace_module(model), (spec,), (make_input(shape).to(getattr(torch, dtype)),)))


def reference_flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_mnist_classic_cnn_matches_the_hand_count() -> None:
    builder, shape = ZOO["mnist_classic_cnn"]
    ir = build(builder(), shape)
    layer_flops = tuple(f.flops for _, f in layer_rows(ir) if f.op_kind in ("conv", "linear"))
    assert layer_flops == MNIST_CLASSIC_LAYER_FLOPS == (60_840, 259_200, 737_280, 2_560)
    assert sum(layer_flops) == MNIST_CLASSIC_TOTAL_FLOPS == 1_059_880
    assert all(f.flops == 2 * f.macs for _, f in layer_rows(ir) if f.op_kind in ("conv", "linear"))


@pytest.mark.parametrize(
    "name",
    ["mnist_classic_cnn", "resnet_style", "vgg_style", "mobilenet_style", "conv1d_net", "mlp", "tiny_transformer",
     "concat_net", "shared_module_net"],
)
def test_conv_linear_matmul_flops_match_flop_counter_mode(name: str) -> None:
    """FlopCounterMode counts exactly conv, mm/addmm/bmm; our compute kinds must sum to the same."""
    builder, shape = ZOO[name]
    model = builder()
    ir = build(model, shape)
    ours = sum(f.flops for _, f in layer_rows(ir) if f.op_kind in ("conv", "conv_transpose", "linear", "matmul"))
    expected = reference_flops(model, make_input(shape))
    assert expected > 0
    assert ours == expected


def test_depthwise_conv_counts_one_input_channel_per_output() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)).eval()
    ir = build(model, (1, 8, 10, 10))
    (node, f), = layer_rows(ir)
    assert f.macs == 8 * 10 * 10 * 9  # each output reads 3×3 of a single channel
    assert f.params == 8 * 9
    assert f.bytes_read == (8 * 10 * 10 + 8 * 9) * 4 and f.bytes_written == 8 * 10 * 10 * 4
    assert f.intensity == pytest.approx(f.flops / (f.bytes_read + f.bytes_written))


class _Mixed(nn.Module):
    """x → view → transpose → add(x') → F.relu → cat → max_pool → mean; a transposed conv on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.view(x.size(0), 4, 8, 8).transpose(2, 3)
        z = F.relu(y + y)
        c = torch.cat([z, z], dim=1)
        p = F.max_pool2d(c, 2)
        u = self.up(p)
        return u.mean(dim=(2, 3))


def test_views_move_nothing_and_each_kind_has_its_rule() -> None:
    ir = build(_Mixed().eval(), (2, 256))
    by_kind = {f.op_kind: f for _, f in layer_rows(ir)}
    for view in ("view", "transpose", "size"):
        assert by_kind[view].flops == 0 and by_kind[view].bytes_moved == 0
    assert by_kind["add"].flops == 2 * 4 * 8 * 8
    assert by_kind["relu"].flops == 2 * 4 * 8 * 8
    assert by_kind["cat"].flops == 0 and by_kind["cat"].bytes_written == 2 * 8 * 8 * 8 * 4
    assert by_kind["max_pool"].flops == (2 * 8 * 4 * 4) * 4  # out elems × 2×2 window
    # transposed conv: each of 2·8·4·4 input elements scatters C_out/groups·k² = 2·4 products
    assert by_kind["conv_transpose"].macs == (2 * 8 * 4 * 4) * 2 * 4
    assert by_kind["mean"].flops == 2 * 2 * 8 * 8
    assert all(f.counted for _, f in layer_rows(ir))


class _Exotic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


def test_unknown_ops_are_listed_as_uncounted_not_guessed() -> None:
    ir = build(_Exotic().eval(), (2, 16))
    rows = dict((n.name, f) for n, f in layer_rows(ir))
    uncounted = [name for name, f in rows.items() if not f.counted]
    assert uncounted == ["fft_rfft"]
    assert rows["fft_rfft"].flops == 0
    assert totals(ir).uncounted == ("fft_rfft",)


def test_totals_count_shared_weights_once() -> None:
    builder, shape = ZOO["shared_module_net"]
    model = builder()
    ir = build(model, shape)
    t = totals(ir)
    assert t.params == sum(p.numel() for p in model.parameters())
    per_node = sum(f.params for _, f in layer_rows(ir))
    assert per_node > t.params  # the shared conv is read at both call sites
    assert t.flops == sum(f.flops for _, f in layer_rows(ir))


def test_integer_inputs_and_embedding() -> None:
    model = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 5, 3)).eval()
    spec = InputSpec("x", (2, 5), "int64", low=0, high=100)
    ir = annotate(IR(trace_module(model), (spec,), (spec.example(torch.Generator().manual_seed(0)),)))
    emb = next(f for _, f in layer_rows(ir) if f.op_kind == "embedding")
    assert emb.op_kind == "embedding" and emb.inputs[0].dtype == "int64"
    assert emb.bytes_read == 2 * 5 * 8 + 2 * 5 * 16 * 4  # ids + gathered rows, not the whole table


def test_exported_program_graph_is_counted_like_the_module() -> None:
    builder, shape = ZOO["mnist_classic_cnn"]
    model = builder()
    gm = torch.export.export(model, (make_input(shape),)).module()
    ir = annotate(IR(gm, (InputSpec("x", shape),), (make_input(shape),)))
    flops = tuple(f.flops for _, f in layer_rows(ir) if f.op_kind in ("conv", "linear"))
    assert flops == MNIST_CLASSIC_LAYER_FLOPS


def test_facts_accessor_says_how_to_fix_missing_facts() -> None:
    builder, shape = ZOO["mlp"]
    ir = IR(trace_module(builder()), (InputSpec("x", shape),), (make_input(shape),))
    node = ir.compute_nodes()[0]
    with pytest.raises(IRError, match=rf"node '{node.name}'.*run effopt.optimizer.ir.analysis.annotate"):
        facts(node)


def test_shape_mismatch_names_the_node() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(TraceError, match=r"node '_0' \(Conv2d\).*5 channels.*recipe's inputs"):
        build(model, (1, 5, 8, 8))


def test_untraceable_model_names_module_line_and_leaf_modules() -> None:
    builder, _ = ZOO["untraceable_net"]
    with pytest.raises(TraceError, match=r"module 'gate' \(Gate\) at .*models\.py:\d+.*leaf_modules") as e:
        trace_module(builder())
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize("leaf", ["gate", "Gate"])
def test_leaf_modules_make_it_trace_and_it_stays_one_uncounted_node(leaf: str) -> None:
    builder, shape = ZOO["untraceable_net"]
    model = builder()
    gm = trace_module(model, [leaf])
    ir = annotate(IR(gm, (InputSpec("x", shape),), (make_input(shape),)))
    gate = [n for n in ir.compute_nodes() if n.op == "call_module" and n.target == "gate"]
    assert len(gate) == 1 and not facts(gate[0]).counted
    torch.testing.assert_close(gm(make_input(shape)), model(make_input(shape)))


def test_unknown_leaf_module_is_an_error_listing_paths() -> None:
    builder, _ = ZOO["untraceable_net"]
    with pytest.raises(TraceError, match=r"leaf_modules: 'gat' matches no submodule.*gate"):
        trace_module(builder(), ["gat"])
