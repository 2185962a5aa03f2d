"""Tests for effopt.optimizer.ir.channels: which channels are coupled, on its own (no cutting).

Each test builds a small graph, runs the analysis and checks the groups: who is in them, which
positions of each member belong to which channel, and why a group is locked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effopt.optimizer.ir.channels import NONE, ChannelGroup, _cells, analyze_channels
from tests.passes.helpers import build_ir
from tests.passes.pruning_models import CASES


def groups_by_root(model: nn.Module, shape: tuple[int, ...]) -> dict[str, ChannelGroup]:
    return {g.root: g for g in analyze_channels(build_ir(model.eval(), shape)).groups}


def member(g: ChannelGroup, node: str, role: str):
    return next(m for m in g.members if m.node == node and m.role == role)


def test_residual_add_couples_its_producers_channel_by_channel() -> None:
    model, shape, _ = CASES["residual_add"]()
    groups = groups_by_root(model, shape)
    stream = groups["stem"]
    assert set(stream.producers) == {"stem", "conv_b"}
    assert member(stream, "stem", "out").classes == member(stream, "conv_b", "out").classes  # index i ↔ index i
    assert {(m.node, m.role) for m in stream.members} >= {("bn", "param"), ("conv_a", "in"), ("fc", "in")}
    assert stream.locked is None and groups["conv_a"].locked is None
    assert groups["fc"].locked == "reaches the model output"


def test_concat_maps_index_ranges_to_its_inputs() -> None:
    model, shape, _ = CASES["dense_concat"]()
    groups = groups_by_root(model, shape)
    c2_in = member(groups["c0"], "c2", "in").classes  # c2 reads cat(c0 [8], c1 [4])
    assert c2_in[:8] == groups["c0"].classes
    assert member(groups["c1"], "c2", "in").classes[8:] == groups["c1"].classes
    trans_in = member(groups["c2"], "trans", "in").classes  # trans reads cat(c0, c1, c2)
    assert trans_in[12:] == groups["c2"].classes and trans_in[:8] == groups["c0"].classes


def test_depthwise_conv_is_cut_with_its_input_and_is_decided_by_groups_not_shapes() -> None:
    model, shape, _ = CASES["inverted_residual"]()
    groups = groups_by_root(model, shape)
    dw = member(groups["expand"], "dw", "param")
    assert dw.depthwise and dw.classes == groups["expand"].classes
    assert "dw" not in {g.root for g in groups.values()}  # not a producer of its own channels

    class OneOutput(nn.Module):  # groups=1 with one input channel: a regular conv, not depthwise
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 1, 3), nn.Conv2d(1, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    g = groups_by_root(OneOutput(), (1, 3, 6, 6))
    assert "b" in g and member(g["b"], "b", "out").classes != member(g["a"], "a", "out").classes


def test_depthwise_multiplier_maps_each_input_channel_to_its_outputs() -> None:
    class Multiplier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.dw, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.dw(self.a(x)))

    g = groups_by_root(Multiplier(), (1, 3, 6, 6))["a"]
    a = g.classes
    assert member(g, "dw", "param").classes == (a[0], a[0], a[1], a[1], a[2], a[2], a[3], a[3])
    assert member(g, "c", "in").classes == member(g, "dw", "param").classes


def test_flatten_maps_each_channel_to_its_block_of_features() -> None:
    model, shape, _ = CASES["flatten_linear"]()
    g = groups_by_root(model, shape)["conv2"]
    fc1_in = member(g, "fc1", "in").classes
    assert len(fc1_in) == 128
    assert all(fc1_in[c * 16:(c + 1) * 16] == (g.classes[c],) * 16 for c in range(8))


def test_permute_then_reshape_maps_channels_with_the_permutations_stride() -> None:
    model, shape, _ = CASES["permute_reshape_linear"]()
    g = groups_by_root(model, shape)["conv"]
    fc_in = member(g, "fc", "in").classes  # time-major: feature t·8 + c is channel c
    assert fc_in == tuple(g.classes[i % 8] for i in range(48))


def test_channel_shuffle_ties_the_channels_it_interleaves() -> None:
    model, shape, _ = CASES["grouped_shuffle"]()
    groups = groups_by_root(model, shape)
    g1 = member(groups["g1"], "g1", "out").classes
    assert groups["g1"].channels == 8  # 16 outputs tied in pairs: j and 8 + j
    assert all(g1[j] == g1[8 + j] for j in range(8)) and len(set(g1)) == 8
    assert len(groups["g1"].cells) == 2  # g2 reads the shuffled channels in 2 groups: equal cuts per half


def test_grouped_conv_input_needs_equal_cuts_per_group() -> None:
    model, shape, _ = CASES["grouped_shuffle"]()
    stem = groups_by_root(model, shape)["stem"]
    assert [len(c) for c in stem.cells] == [4, 4]


def test_shared_module_and_unknown_ops_lock_with_a_reason() -> None:
    model, shape, _ = CASES["shared_module"]()
    groups = groups_by_root(model, shape)
    assert "called at 2 sites" in groups["shared"].locked and "called at 2 sites" in groups["stem"].locked

    class SoftmaxOverChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.softmax(self.a(x), dim=1))

    g = groups_by_root(SoftmaxOverChannels(), (1, 3, 4, 4))["a"]
    assert g.locked is not None and "softmax over the channel dim" in g.locked


def test_transformer_attention_is_locked_and_mlp_hidden_is_free() -> None:
    model, shape, _ = CASES["transformer_mlp"]()
    groups = groups_by_root(model, shape)
    assert groups["fc1"].prunable
    assert "matmul" in groups["q"].locked
    stream = groups["embed"]
    assert set(stream.producers) == {"embed", "out", "fc2"} and stream.prunable
    assert {m.node for m in stream.members if m.role == "param"} == {"ln1", "ln2"}


def test_chunk_needs_equal_cuts_per_piece() -> None:
    class Glu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u, v = self.a(x).chunk(2, dim=-1)
            return self.b(u * torch.sigmoid(v))

    g = groups_by_root(Glu(), (2, 4))["a"]
    assert g.channels == 4 and g.prunable  # u_i * v_i ties channel i with 4 + i
    a = member(g, "a", "out").classes
    assert all(a[i] == a[4 + i] for i in range(4))


def test_cells_partition_and_refuse_conflicts() -> None:
    assert _cells([0, 1, 2, 3], []) == (((0, 1, 2, 3),), None)
    cells, why = _cells([0, 1, 2, 3], [("g", [[0, 1], [2, 3]])])
    assert why is None and sorted(map(sorted, cells)) == [[0, 1], [2, 3]]
    _, why = _cells([0, 1, 2], [("g", [[0, 1], [2]])])  # one cell per block: equal cuts per cell stay equal
    assert why is None
    _, why = _cells([0, 1, 2, 3], [("a", [[0, 1], [2, 3]]), ("b", [[0], [1, 2, 3]])])
    assert why is not None


def test_model_input_channels_are_never_members() -> None:
    model, shape, _ = CASES["mlp"]()
    g = groups_by_root(model, shape)
    first_in = [m for gg in g.values() for m in gg.members if m.node == "fc1" and m.role == "in"]
    assert all(c == NONE for m in first_in for c in m.classes)


@pytest.mark.parametrize("case", sorted(CASES))
def test_analysis_is_pure(case: str) -> None:
    model, shape, _ = CASES[case]()
    ir = build_ir(model, shape)
    before = {k: v.clone() for k, v in ir.gm.state_dict().items()}
    code = ir.gm.code
    analyze_channels(ir)
    assert ir.gm.code == code
    assert all(torch.equal(before[k], v) for k, v in ir.gm.state_dict().items())
