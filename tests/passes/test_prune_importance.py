"""Tests for effopt.passes.prune_importance: pruning scores and compensation math, no IR.

The seed lecture's formulas are worked numeric cases: (5) a neuron with constant output σ(B₂)
folds W⁽²⁾[:, 2]·σ(B₂) into the next bias, (6) two similar neurons merge by averaging their
incoming rows and summing their outgoing columns. Exactness cases build a small network with
duplicated (or constant) channels, first assert that the duplicate is one and that a plain cut
really changes the output, then check merge/fold + cut against the original (atol 1e-5).

    producer ──σ──▶ consumer          (Linear/conv → ReLU → Linear/conv, or conv → ReLU → flatten → Linear)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effopt.passes.prune_importance import (
    Merge,
    absorb_merges,
    bn_scale,
    constant_contribution,
    magnitude,
    merge_incoming,
    normalize,
    pseudo_label_loss,
    similarity_merges,
    taylor_scores,
)

ATOL = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows_of(layer: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """Incoming rows: weights flattened, bias as the last column."""
    return torch.cat([layer.weight.detach().flatten(1), layer.bias.detach()[:, None]], dim=1)


def cut(layer: nn.Module, keep: list[int], dim: int) -> nn.Module:
    """A copy of ``layer`` keeping only ``keep`` along weight dim 0 (outputs, with bias) or 1 (inputs)."""
    weight = layer.weight.detach().index_select(dim, torch.tensor(keep))
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0])
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, padding=layer.padding)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(layer.bias[keep] if dim == 0 else layer.bias)
    return new


def flat_positions(channels: int, per_channel: int) -> list[list[int]]:
    """Positions of each channel in a flattened [C, H, W] map: a contiguous block of H·W features."""
    return [list(range(c * per_channel, (c + 1) * per_channel)) for c in range(channels)]


# --- magnitude, bn_scale, normalize -----------------------------------------------------------


def test_magnitude_worked_example() -> None:
    producer = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    consumer = torch.tensor([[10.0], [30.0]])
    assert torch.equal(magnitude([producer, consumer], p=1), torch.tensor([1.0, 3.0], dtype=torch.float64))
    # p=2: sums of squares [2, 18], mean 10 → [0.2, 1.8] for the producer; consumer [100, 900] → [0.2, 1.8]
    assert torch.allclose(magnitude([producer, consumer], p=2), torch.tensor([0.4, 3.6], dtype=torch.float64))


def test_magnitude_each_slice_weighs_the_same() -> None:
    g = gen(1)
    producer, consumer = torch.randn(6, 9, generator=g), torch.randn(6, 4096, generator=g)
    assert consumer.abs().sum() > 100 * producer.abs().sum()  # precondition: the consumer would drown the producer
    base = magnitude([producer, consumer], p=1)
    assert torch.allclose(magnitude([producer, 1000 * consumer], p=1), base)
    assert torch.allclose(base.sum(), torch.tensor(12.0, dtype=torch.float64))  # each slice sums to C


def test_magnitude_zero_slice_contributes_nothing() -> None:
    producer = torch.randn(4, 3, generator=gen(2))
    scores = magnitude([producer, torch.zeros(4, 5)], p=2)
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, magnitude([producer], p=2))


@pytest.mark.parametrize(
    "slices, p, message",
    [([torch.ones(3, 2)], 3, "p must be 1 or 2"), ([torch.ones(3, 2), torch.ones(4, 2)], 1, "same channel count"),
     ([], 1, "at least one slice")],
)
def test_magnitude_rejects_bad_input(slices: list[torch.Tensor], p: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        magnitude(slices, p)


def test_bn_scale_sums_abs_gamma() -> None:
    scores = bn_scale([torch.tensor([0.5, -2.0]), torch.tensor([1.0, 0.0])])
    assert torch.equal(scores, torch.tensor([1.5, 2.0], dtype=torch.float64))


def test_normalize_is_zero_safe() -> None:
    assert torch.equal(normalize(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.equal(normalize(torch.zeros(3)), torch.zeros(3, dtype=torch.float64))
    assert normalize(torch.zeros(0)).numel() == 0


# --- Taylor -----------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """x ─▶ conv ─▶ relu ─▶ conv2 ─▶ flatten ─▶ fc ─▶ logits (dropout between, off in eval)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 3, 3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.conv2(self.relu(self.conv(x))), 1)))


def seeded_convnet(inplace: bool = False) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(inplace)


def calibration(n: int = 2) -> list[tuple[torch.Tensor]]:
    g = gen(3)
    return [(torch.randn(3, 2, 6, 6, generator=g),) for _ in range(n)]


def test_taylor_worked_example() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.w.weight.copy_(torch.tensor([[1.0, 0.0]]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w(torch.relu(x))

    gm = fx.symbolic_trace(Tiny())
    scores = taylor_scores(gm, {"relu": 1}, [(torch.tensor([[2.0, 3.0]]),)], lambda out: out.sum())
    assert torch.equal(scores["relu"], torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_taylor_matches_hand_autograd_and_averages_batches() -> None:
    model = seeded_convnet().eval()
    batches = calibration()
    expected = []
    for (x,) in batches:
        a = model.conv(x).detach().requires_grad_(True)
        out = model.fc(torch.flatten(model.conv2(model.relu(a)), 1))
        (g,) = torch.autograd.grad(pseudo_label_loss(out), a)
        expected.append((a * g).double().sum(dim=(0, 2, 3)).abs())
    assert not torch.allclose(expected[0], expected[1])  # precondition: the batches differ
    scores = taylor_scores(fx.symbolic_trace(model), {"conv": 1}, batches, pseudo_label_loss)
    assert torch.allclose(scores["conv"], (expected[0] + expected[1]) / 2, rtol=1e-5, atol=1e-9)


def test_taylor_leaves_the_module_untouched() -> None:
    gm = fx.symbolic_trace(seeded_convnet())
    gm.train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    scores = taylor_scores(gm, {"conv": 1, "conv2": 1}, calibration(), pseudo_label_loss)
    assert set(scores) == {"conv", "conv2"} and scores["conv"].shape == (4,) and scores["conv2"].shape == (3,)
    assert all(p.grad is None for p in gm.parameters())
    assert all(m.training for m in gm.modules())
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    # eval mode inside: dropout off, so the result is deterministic
    assert torch.equal(taylor_scores(gm, {"conv": 1}, calibration(), pseudo_label_loss)["conv"], scores["conv"])


def test_taylor_works_without_grad_and_with_frozen_params_and_inplace_ops() -> None:
    reference = taylor_scores(fx.symbolic_trace(seeded_convnet()), {"conv": 1}, calibration(), pseudo_label_loss)
    assert (reference["conv"] > 0).all()
    frozen = fx.symbolic_trace(seeded_convnet(inplace=True))
    for p in frozen.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        scores = taylor_scores(frozen, {"conv": 1}, calibration(), pseudo_label_loss)
    assert torch.allclose(scores["conv"], reference["conv"], rtol=1e-6, atol=1e-12)


def test_taylor_channel_with_no_outgoing_weight_scores_zero() -> None:
    model = seeded_convnet()
    with torch.no_grad():
        model.conv2.weight[:, 1] = 0.0
    scores = taylor_scores(fx.symbolic_trace(model), {"relu": 1}, calibration(), pseudo_label_loss)["relu"]
    assert scores[1] == 0.0 and (scores[[0, 2, 3]] > 0).all()


def test_taylor_rejects_unknown_nodes_and_no_batches() -> None:
    gm = fx.symbolic_trace(seeded_convnet())
    with pytest.raises(ValueError, match="no node named"):
        taylor_scores(gm, {"nope": 1}, calibration(), pseudo_label_loss)
    with pytest.raises(ValueError, match="no calibration batches"):
        taylor_scores(gm, {"conv": 1}, [], pseudo_label_loss)


def test_pseudo_label_loss_uses_own_argmax() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = F.cross_entropy(logits, torch.tensor([0, 1]))
    assert torch.equal(pseudo_label_loss(logits), expected)
    assert torch.equal(pseudo_label_loss((logits, torch.zeros(1))), expected)
    assert math.isclose(pseudo_label_loss(torch.tensor([[2.0, 0.0]])).item(), math.log(1 + math.exp(-2)), rel_tol=1e-6)


# --- similarity merging -----------------------------------------------------------------------


def test_similarity_docstring_example() -> None:
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert similarity_merges(rows, 1) == (Merge(removed=1, kept=0, scale=2.0),)


def test_seed_formula_6_merge_neurons_1_and_2() -> None:
    """Seed (6): W⁽¹⁾ row 1 ← (row 1 + row 2)/2, B⁽¹⁾₁ ← (B₁ + B₂)/2, W⁽²⁾ column 1 ← column 1 + column 2."""
    w1 = torch.tensor([[1.0, 0.0], [1.0, 0.5], [-1.0, 1.0]])
    b1 = torch.tensor([1.0, 1.0, 0.0])
    w2 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows = torch.cat([w1, b1[:, None]], dim=1)
    (merge,) = similarity_merges(rows, 1)
    assert merge == Merge(removed=1, kept=0, scale=1.0)  # ⟨r₂, r₁⟩/‖r₁‖² = 2/2: neuron 2 merges into 1
    new_rows = merge_incoming(rows, [merge])
    assert torch.equal(new_rows[0], torch.tensor([1.0, 0.25, 1.0]))  # weights and bias averaged
    assert torch.equal(new_rows[1:], rows[1:])
    new_w2 = absorb_merges(w2, [[0], [1], [2]], [merge])
    assert torch.equal(new_w2, torch.tensor([[3.0, 2.0, 3.0], [9.0, 5.0, 6.0]]))  # removed column left to cut


def test_merge_incoming_averages_only_when_scale_is_one() -> None:
    rows = torch.tensor([[1.0, 2.0], [2.0, 4.0], [1.0, 2.1]])
    out = merge_incoming(rows, [Merge(removed=1, kept=0, scale=2.0)])
    assert torch.equal(out, rows)  # averaging would give 1.5·row 0 and break absorb_merges' λ = 2
    out = merge_incoming(rows, [Merge(removed=2, kept=0, scale=1.0)])
    assert torch.allclose(out[0], torch.tensor([1.0, 2.05]))


def mlp_with_duplicates() -> tuple[nn.Sequential, list[set[int]]]:
    """x[4] ─▶ fc1[6] ─▶ relu ─▶ fc2[3]; hidden 4 = 2.5 × hidden 1, hidden 5 = 0.5 × hidden 3 (bias too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[4], model[0].bias[4] = 2.5 * model[0].weight[1], 2.5 * model[0].bias[1]
        model[0].weight[5], model[0].bias[5] = 0.5 * model[0].weight[3], 0.5 * model[0].bias[3]
    return model, [{1, 4}, {3, 5}]


def conv_with_duplicates(flatten: bool) -> tuple[nn.Sequential, list[set[int]]]:
    """x[2,6,6] ─▶ conv[5] ─▶ relu ─▶ conv2[4] (padding 1), or ─▶ flatten ─▶ fc[3]; channel 4 = 0.7 × channel 2."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 5, 3)
    tail: list[nn.Module] = [nn.Flatten(), nn.Linear(5 * 4 * 4, 3)] if flatten else [nn.Conv2d(5, 4, 3, padding=1)]
    model = nn.Sequential(conv, nn.ReLU(), *tail)
    with torch.no_grad():
        conv.weight[4], conv.bias[4] = 0.7 * conv.weight[2], 0.7 * conv.bias[2]
    return model, [{2, 4}]


@pytest.mark.parametrize("builder", ["mlp", "conv", "conv_flatten_linear"])
def test_similarity_merge_of_duplicates_is_exact(builder: str) -> None:
    model, duplicates = {"mlp": mlp_with_duplicates, "conv": lambda: conv_with_duplicates(False),
                         "conv_flatten_linear": lambda: conv_with_duplicates(True)}[builder]()
    producer, consumer = model[0], model[-1]
    shape = (8, 4) if builder == "mlp" else (8, 2, 6, 6)
    x = torch.randn(shape, generator=gen(4))
    c = producer.weight.shape[0]
    positions = flat_positions(c, 16) if builder == "conv_flatten_linear" else [[i] for i in range(c)]
    rows = rows_of(producer)
    for pair in duplicates:  # precondition: each pair really is a positive multiple
        j, k = sorted(pair)
        lam = (rows[k] @ rows[j]) / (rows[j] @ rows[j])
        assert lam > 0 and torch.allclose(rows[k], lam * rows[j], atol=1e-6)
    merges = similarity_merges(rows, len(duplicates))
    assert sorted(sorted((m.removed, m.kept)) for m in merges) == sorted(sorted(d) for d in duplicates)
    assert all(m.scale > 0 for m in merges)
    keep = [i for i in range(c) if i not in {m.removed for m in merges}]
    kept_positions = [p for i in keep for p in positions[i]]
    with torch.no_grad():
        reference = model(x)
        plain_cut = nn.Sequential(cut(producer, keep, 0), nn.ReLU(), *model[2:-1], cut(consumer, kept_positions, 1))
        assert (plain_cut(x) - reference).abs().max() > 1e-2  # precondition: the duplicates carry signal
        new_consumer = cut(consumer, kept_positions, 1)
        new_consumer.weight.copy_(absorb_merges(consumer.weight, positions, merges)[:, kept_positions])
        merged = nn.Sequential(cut(producer, keep, 0), nn.ReLU(), *model[2:-1], new_consumer)
        assert (merged(x) - reference).abs().max() < ATOL


def test_negative_scale_only_without_positive_only() -> None:
    rows = torch.tensor([[1.0, 2.0, 0.5], [-2.0, -4.0, -1.0], [1.0, 0.0, 0.0]])
    (free,) = similarity_merges(rows, 1, positive_only=False)
    assert free == Merge(removed=1, kept=0, scale=-2.0)
    (relu,) = similarity_merges(rows, 1, positive_only=True)
    assert relu.scale >= 0 and {relu.removed, relu.kept} != {0, 1}
    # forced past the positive pairs, a negative pair falls back to plain removal (λ = 0)
    assert all(m.scale >= 0 for m in similarity_merges(rows, 2, positive_only=True))


def test_negative_scale_merge_is_exact_for_a_linear_between() -> None:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
    with torch.no_grad():
        fc1.weight[3], fc1.bias[3] = -1.5 * fc1.weight[0], -1.5 * fc1.bias[0]
        x = torch.randn(5, 3, generator=gen(5))
        (merge,) = similarity_merges(rows_of(fc1), 1, positive_only=False)
        assert merge.removed == 3 and merge.kept == 0 and math.isclose(merge.scale, -1.5, rel_tol=1e-6)
        new_fc2 = cut(fc2, [0, 1, 2], 1)
        new_fc2.weight.copy_(absorb_merges(fc2.weight, [[i] for i in range(4)], [merge])[:, :3])
        assert (new_fc2(cut(fc1, [0, 1, 2], 0)(x)) - fc2(fc1(x))).abs().max() < ATOL


@pytest.mark.parametrize("positive_only", [True, False])
def test_similarity_always_returns_n_merges_without_chains(positive_only: bool) -> None:
    # Two tight pairs: a naive greedy merges 1→0 and 3→2, then cannot make a third merge without a chain.
    pairs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.01, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.01]])
    random_rows = torch.randn(10, 5, generator=gen(6))
    for rows in (pairs, random_rows):
        c = rows.shape[0]
        for n in range(c):
            merges = similarity_merges(rows, n, positive_only)
            removed = [m.removed for m in merges]
            assert len(merges) == n and len(set(removed)) == n
            assert not {m.kept for m in merges} & set(removed)
            assert merges == similarity_merges(rows.clone(), n, positive_only)  # deterministic
    with pytest.raises(ValueError, match="0 <= n < C"):
        similarity_merges(pairs, 4)


def test_zero_row_is_removed_first() -> None:
    rows = torch.tensor([[1.0, 0.2], [0.0, 0.0], [0.9, 0.3], [0.0, 1.0]])
    assert similarity_merges(rows, 1) == (Merge(removed=1, kept=0, scale=0.0),)


def test_absorb_merges_rejects_chains_and_misaligned_positions() -> None:
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match="removed after absorbing"):
        absorb_merges(w, [[0], [1], [2], [3]], [Merge(1, 0, 1.0), Merge(0, 2, 1.0)])
    with pytest.raises(ValueError, match="aligned"):
        absorb_merges(w, [[0], [1, 2], [3]], [Merge(1, 0, 1.0)])
    assert torch.equal(absorb_merges(torch.tensor([[1.0, 10.0, 100.0]]), [[0], [1], [2]], [Merge(2, 0, 0.5)]),
                       torch.tensor([[51.0, 10.0, 100.0]]))


# --- constant channels ------------------------------------------------------------------------


def test_seed_formula_5_constant_neuron_folds_into_next_bias() -> None:
    """Seed (5): neuron 2 with zero incoming weights outputs σ(B⁽¹⁾₂); B⁽²⁾ₖ += W⁽²⁾ₖ,₂·σ(B⁽¹⁾₂)."""
    fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
        fc1.bias.copy_(torch.tensor([0.1, 0.2, 0.0, -0.3]))  # σ = sigmoid: σ(0) = 0.5
        fc2.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, -2.0, 1.0]]))
        fc2.bias.copy_(torch.tensor([0.25, -0.25]))
        value = float(torch.sigmoid(fc1.bias[2]))
        delta = constant_contribution(fc2.weight, [[0], [1], [2], [3]], {2: value})
        assert torch.equal(delta, torch.tensor([1.5, -1.0]))  # W⁽²⁾[:, 2]·σ(0) = [3, −2]·0.5

        x = torch.randn(6, 3, generator=gen(7))
        reference = fc2(torch.sigmoid(fc1(x)))
        keep = [0, 1, 3]
        new_fc1, new_fc2 = cut(fc1, keep, 0), cut(fc2, keep, 1)
        assert (new_fc2(torch.sigmoid(new_fc1(x))) - reference).abs().max() > 0.5  # precondition
        new_fc2.bias += delta
        assert (new_fc2(torch.sigmoid(new_fc1(x))) - reference).abs().max() < ATOL


@pytest.mark.parametrize("consumer_kind", ["conv_no_padding", "flatten_linear"])
def test_constant_channel_fold_is_exact(consumer_kind: str) -> None:
    torch.manual_seed(0)
    producer = nn.Conv2d(2, 4, 3)
    consumer = nn.Conv2d(4, 3, 3) if consumer_kind == "conv_no_padding" else nn.Linear(4 * 4 * 4, 3)
    flatten = consumer_kind == "flatten_linear"
    with torch.no_grad():
        producer.weight[1] = 0.0
        producer.bias[1] = 0.6
        positions = [[i] for i in range(4)] if consumer_kind == "conv_no_padding" else flat_positions(4, 16)
        keep = [0, 2, 3]
        kept_positions = [p for i in keep for p in positions[i]]
        x = torch.randn(5, 2, 6, 6, generator=gen(8))
        full = torch.relu(producer(x))
        assert torch.equal(full[:, 1], torch.full_like(full[:, 1], 0.6))  # precondition: channel 1 is constant
        reference = consumer(full.flatten(1) if flatten else full)
        h = torch.relu(cut(producer, keep, 0)(x))
        new_consumer = cut(consumer, kept_positions, 1)
        assert (new_consumer(h.flatten(1) if flatten else h) - reference).abs().max() > 1e-2  # precondition
        new_consumer.bias += constant_contribution(consumer.weight, positions, {1: 0.6})
        assert (new_consumer(h.flatten(1) if flatten else h) - reference).abs().max() < ATOL


def test_constant_fold_with_padding_is_exact_only_inside() -> None:
    torch.manual_seed(0)
    consumer = nn.Conv2d(2, 3, 3, padding=1)
    h = torch.randn(1, 2, 6, 6, generator=gen(9))
    h[:, 1] = 0.8
    with torch.no_grad():
        reference = consumer(h)
        new_consumer = cut(consumer, [0], 1)
        new_consumer.bias += constant_contribution(consumer.weight, [[0], [1]], {1: 0.8})
        error = (new_consumer(h[:, :1]) - reference).abs()
    assert error[..., 1:-1, 1:-1].max() < ATOL
    assert error[..., 0, :].max() > 1e-3  # the border saw zero padding, not the constant


def test_constant_contribution_docstring_example() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(constant_contribution(w, [[0], [1]], {1: 0.5}), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="channel 2 has no positions"):
        constant_contribution(w, [[0], [1]], {2: 1.0})
