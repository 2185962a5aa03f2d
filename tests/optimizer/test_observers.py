"""Tests for effopt.optimizer.quant.observers: ranges by hand, error bounds, clipping wins, edge cases, determinism."""

from __future__ import annotations

import pytest
import torch

from effopt.optimizer.quant.observers import (
    OBSERVER_KINDS,
    Histogram,
    Range,
    add_to_histogram,
    grow_histogram,
    histogram_quantile,
    histogram_sq_errors,
    interval_sq_code_error,
    make_observer,
    mean_sq_code_error,
)
from effopt.optimizer.quant.schemes import WEIGHT_SCHEME, QScheme, fake_quantize, qparams_from_range

UINT8 = QScheme(bits=8)
UINT4 = QScheme(bits=4)
INT8_SYM = QScheme(bits=8, signed=True, symmetric=True)
INT4_SYM = QScheme(bits=4, signed=True, symmetric=True)


def laplace(n: int, g: torch.Generator, b: float = 1.0) -> torch.Tensor:
    """Laplace(0, b) samples by inverse CDF from the given generator (no global RNG)."""
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-b * torch.sign(u) * torch.log1p(-2 * u.abs()).clamp(min=-50.0)).float()


def calibrated(kind: str, batches: list[torch.Tensor], axis: int | None = None, **options: float):
    obs = make_observer(kind, axis, **options)  # type: ignore[arg-type]
    for b in batches:
        obs.update(b)
    return obs


def mse(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QScheme) -> float:
    return float(((x.double() - fake_quantize(x, scale, zero, scheme).double()) ** 2).mean())


@pytest.fixture(scope="module")
def heavy_tailed() -> list[torch.Tensor]:
    """1M Laplace(0, 1) values in 8 calibration batches: tails long enough that clipping pays."""
    g = torch.Generator().manual_seed(0)
    return [laplace(125_000, g) for _ in range(8)]


# --------------------------------------------------------------------------- error kernels by hand


def test_interval_sq_code_error_hand_values() -> None:
    d = torch.float64
    # [−½, 3½] with codes 0..3: four whole sawtooth periods, 1/12 each
    assert float(interval_sq_code_error(torch.tensor(-0.5, dtype=d), torch.tensor(3.5, dtype=d), 0, 3)) == \
        pytest.approx(4 / 12, abs=1e-12)
    # [5, 6] clipped at 3: ∫ (u − 3)² = (27 − 8)/3
    assert float(interval_sq_code_error(torch.tensor(5.0, dtype=d), torch.tensor(6.0, dtype=d), 0, 3)) == \
        pytest.approx(19 / 3, abs=1e-12)
    # a point interval falls back to the squared error at the point
    assert float(mean_sq_code_error(torch.tensor(1.25, dtype=d), torch.tensor(1.25, dtype=d), 0, 3)) == 0.0625


@pytest.mark.parametrize("a, b", [(-2.3, 1.7), (2.2, 6.1), (-5.0, 9.0), (1.2, 1.3), (0.4, 0.6), (1e4, 1e4 + 0.1)])
def test_interval_sq_code_error_matches_numerical_integration(a: float, b: float) -> None:
    t = torch.linspace(a, b, 400_001, dtype=torch.float64)
    numeric = float(((t - t.round().clamp(0, 3)) ** 2).mean()) * (b - a)
    exact = float(interval_sq_code_error(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                         0, 3))
    assert exact == pytest.approx(numeric, rel=1e-4)


def test_histogram_error_estimate_matches_fake_quantize(heavy_tailed: list[torch.Tensor]) -> None:
    x = heavy_tailed[0][:50_000]
    h = add_to_histogram(None, x.double().reshape(1, -1), 2048)
    lo = torch.tensor([[-3.0, -6.0, float(x.min())]], dtype=torch.float64)
    hi = torch.tensor([[3.0, 6.0, float(x.max())]], dtype=torch.float64)
    for scheme in (UINT8, UINT4, INT8_SYM):
        est = histogram_sq_errors(h, lo, hi, scheme)[0] / x.numel()
        for k in range(3):
            s, z = qparams_from_range(lo[0, k], hi[0, k], scheme)
            assert float(est[k]) == pytest.approx(mse(x, s, z, scheme), rel=0.03), (scheme, k)


# --------------------------------------------------------------------------- histogram


def test_histogram_growth_merges_bins_exactly() -> None:
    d = torch.float64
    one = torch.ones(1, dtype=d)
    h = Histogram(0 * one, one, torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=d), 0 * one, 4 * one)
    wide = grow_histogram(h, Range(9 * one, 9 * one))  # k = 2: width 4 over [0, 16)
    assert wide.counts.tolist() == [[4.0, 0.0, 0.0, 0.0]] and float(wide.width) == 4.0
    left = grow_histogram(h, Range(-3 * one, 2 * one))  # k = 1, two new bins below: [−4, 4)
    assert left.counts.tolist() == [[0.0, 0.0, 1.0, 3.0]] and float(left.edge_lo) == -4.0
    assert float(left.data_min) == -3.0 and float(left.data_max) == 4.0


def test_histogram_stays_bounded_and_counts_everything() -> None:
    g = torch.Generator().manual_seed(1)
    h = None
    for i in range(20):  # range grows on both sides as batches widen
        h = add_to_histogram(h, (torch.randn(2, 5000, generator=g) * (1 + i)).double(), 64)
    assert h is not None and h.counts.shape == (2, 64)
    assert h.counts.sum(dim=1).tolist() == [100_000.0, 100_000.0]


def test_histogram_quantile_against_torch_quantile() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50_000, generator=g, dtype=torch.float64)
    h = add_to_histogram(None, x.reshape(1, -1), 2048)
    n, w = x.numel(), float(h.width)
    for q in (0.0001, 0.01, 0.5, 0.99, 0.9999):
        # within a bin of the order statistics around q·n (tails are sparse, so those can be far apart)
        got = float(histogram_quantile(h, q))
        assert float(torch.quantile(x, q - 1 / n)) - w <= got <= float(torch.quantile(x, q + 1 / n)) + w
    assert float(histogram_quantile(h, 0.0)) == float(x.min()) and float(histogram_quantile(h, 1.0)) == float(x.max())


# --------------------------------------------------------------------------- minmax / moving average


@pytest.mark.parametrize("scheme", [UINT8, UINT4, INT8_SYM], ids=["uint8", "uint4", "int8-sym"])
def test_minmax_round_trip_within_half_a_step(scheme: QScheme) -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 100, generator=g) * 2 + 0.5, torch.randn(7, generator=g) * 3]
    scale, zero = calibrated("minmax", batches).qparams(scheme)
    lo, hi = min(float(b.min()) for b in batches), max(float(b.max()) for b in batches)
    x = torch.cat([torch.linspace(lo, hi, 10_001), torch.tensor([lo, hi, 0.0])] + [b.reshape(-1) for b in batches])
    err = (x - fake_quantize(x, scale, zero, scheme)).abs()
    assert scale.dim() == 0 and zero.dim() == 0
    assert float(err.max()) <= float(scale) / 2 + 1e-6
    assert float(err.max()) > float(scale) / 4  # precondition: the bound is tight, not vacuous


def test_minmax_range_by_hand() -> None:
    obs = calibrated("minmax", [torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 3.0])])
    scale, zero = obs.qparams(UINT8)
    assert float(scale) == pytest.approx(4 / 255) and int(zero) == 64


def per_tensor_and_per_channel_errors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors of ``w`` under int8 per-tensor and per-output-channel (axis 0) min/max quantization."""
    per_tensor = calibrated("minmax", [w]).qparams(INT8_SYM)
    per_channel = calibrated("minmax", [w], axis=0).qparams(WEIGHT_SCHEME)
    assert per_channel[0].shape == (w.shape[0],) and per_tensor[0].dim() == 0
    return (w - fake_quantize(w, *per_tensor, INT8_SYM)) ** 2, (w - fake_quantize(w, *per_channel, WEIGHT_SCHEME)) ** 2


def test_per_channel_beats_per_tensor_on_an_outlier_channel() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    w[5] *= 100  # one channel 100× the rest: per-tensor gives the other 31 a step 100× too coarse
    e_tensor, e_channel = per_tensor_and_per_channel_errors(w)
    assert float(e_tensor.mean()) >= 10 * float(e_channel.mean())  # measured ≈ 38×


def test_per_channel_beats_per_tensor_on_geometric_channel_ranges() -> None:
    """Channel c scaled by 10^(c/4): plain MSE is dominated by the top channels in both cases.

    Per-tensor, the small channels round to zero, costing only their own (tiny)
    variance, so the plain-MSE gain is capped near 10× (measured ≈ 8×). Relative
    to each channel's power, which is what a following BN or activation sees,
    per-channel wins by four orders of magnitude.
    """
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g) * (10 ** (torch.arange(32) / 4.0))[:, None]
    e_tensor, e_channel = per_tensor_and_per_channel_errors(w)
    power = w.pow(2).mean(dim=1, keepdim=True)
    assert float(e_tensor.mean()) >= 4 * float(e_channel.mean())
    assert float((e_tensor / power).mean()) >= 1000 * float((e_channel / power).mean())


def test_moving_average_follows_ema_formula_and_damps_outlier() -> None:
    b1 = torch.tensor([-1.0, 0.0, 2.0])
    b2 = torch.tensor([-3.0, 1.0, 100.0])  # a later outlier batch
    ema = calibrated("moving_average", [b1, b2], momentum=0.1)
    by_hand = qparams_from_range(torch.tensor(0.9 * -1 + 0.1 * -3), torch.tensor(0.9 * 2 + 0.1 * 100), UINT8)
    got = ema.qparams(UINT8)
    assert torch.equal(got[0], by_hand[0]) and torch.equal(got[1], by_hand[1])
    minmax = calibrated("minmax", [b1, b2]).qparams(UINT8)
    assert float(minmax[0]) > 5 * float(got[0])  # min/max jumped to 100, the EMA to 10.9
    first_only = calibrated("moving_average", [b1]).qparams(UINT8)
    assert torch.equal(first_only[0], calibrated("minmax", [b1]).qparams(UINT8)[0])  # first batch initialises


def test_moving_average_per_channel() -> None:
    b1 = torch.tensor([[0.0, 1.0], [-2.0, 2.0]])  # channels along axis 1: ch0 ∈ [−2, 0], ch1 ∈ [1, 2]
    b2 = torch.tensor([[10.0, 1.0], [0.0, 1.0]])  # ch0 ∈ [0, 10], ch1 ∈ [1, 1]
    scale, zero = calibrated("moving_average", [b1, b2], axis=1, momentum=0.5).qparams(QScheme(bits=8, axis=1))
    lo, hi = torch.tensor([-1.0, 1.0]), torch.tensor([5.0, 1.5])
    ref = qparams_from_range(lo, hi, UINT8)
    assert torch.equal(scale, ref[0]) and torch.equal(zero, ref[1])


# --------------------------------------------------------------------------- percentile / mse


@pytest.fixture(scope="module")
def heavy_tailed_observers(heavy_tailed: list[torch.Tensor]) -> dict[str, object]:
    """One calibration per kind, shared by the scheme-parametrized tests (qparams may be asked per scheme)."""
    return {kind: calibrated(kind, heavy_tailed) for kind in ("minmax", "percentile", "mse")}


@pytest.mark.parametrize("scheme, min_gain", [(UINT8, 1.0), (UINT4, 2.0), (INT8_SYM, 1.0), (INT4_SYM, 2.0)],
                         ids=["uint8", "uint4", "int8-sym", "int4-sym"])
def test_clipping_observers_beat_minmax_on_heavy_tails(heavy_tailed: list[torch.Tensor],
                                                       heavy_tailed_observers: dict, scheme: QScheme,
                                                       min_gain: float) -> None:
    x = torch.cat(heavy_tailed)
    errors = {kind: mse(x, *obs.qparams(scheme), scheme) for kind, obs in heavy_tailed_observers.items()}
    # measured (uint8): minmax 9.1e-4, percentile 8.0e-4, mse 6.0e-4; (uint4): 0.241, 0.104, 0.051
    assert errors["percentile"] * min_gain < errors["minmax"], errors
    assert errors["mse"] * min_gain < errors["minmax"], errors
    assert errors["mse"] <= errors["percentile"], errors


def test_mse_observer_is_close_to_brute_force_optimum(heavy_tailed: list[torch.Tensor]) -> None:
    x = heavy_tailed[0][:20_000]
    got = mse(x, *calibrated("mse", [x]).qparams(INT4_SYM), INT4_SYM)
    bound = float(x.abs().max())
    brute = min(mse(x, *qparams_from_range(torch.tensor(-b), torch.tensor(b), INT4_SYM), INT4_SYM)
                for b in torch.linspace(0.02 * bound, bound, 300).tolist())
    assert got <= 1.01 * brute, (got, brute)


def test_percentile_100_is_minmax(heavy_tailed: list[torch.Tensor]) -> None:
    batches = heavy_tailed[:2]
    for scheme in (UINT8, INT4_SYM):
        got = calibrated("percentile", batches, percentile=100.0).qparams(scheme)
        ref = calibrated("minmax", batches).qparams(scheme)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_percentile_clips_at_the_requested_quantiles() -> None:
    x = torch.arange(10_000, dtype=torch.float32)  # quantiles 0.01 and 0.99 are ≈ 100 and 9900
    obs = calibrated("percentile", [x[:5000], x[5000:]], percentile=99.0)
    scale, zero = obs.qparams(UINT8)
    # lo ≈ 100 > 0 is widened to 0 by qparams_from_range; hi ≈ 9900 sets the scale
    assert int(zero) == 0
    assert float(scale) * 255 == pytest.approx(9900, abs=2 * 10_000 / 2048)


@pytest.mark.parametrize("kind", ["percentile", "mse"])
def test_per_channel_equals_per_tensor_on_each_channel(kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.stack([laplace(3000, g, b) for b in (0.1, 1.0, 7.0)], dim=1)  # [3000, 3], channels on axis 1
    scale, zero = calibrated(kind, [x[:1000], x[1000:]], axis=1).qparams(QScheme(bits=4, axis=1))
    for c in range(3):
        s, z = calibrated(kind, [x[:1000, c], x[1000:, c]]).qparams(UINT4)
        assert float(scale[c]) == pytest.approx(float(s), rel=1e-6) and int(zero[c]) == int(z)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("kind", OBSERVER_KINDS)
@pytest.mark.parametrize("value", [0.0, 2.5, -3.0])
@pytest.mark.parametrize("scheme", [UINT8, UINT4, INT8_SYM], ids=["uint8", "uint4", "int8-sym"])
def test_constant_tensors_give_finite_scales_and_exact_zero(kind: str, value: float, scheme: QScheme) -> None:
    obs = calibrated(kind, [torch.full((3, 5), value), torch.full((7,), value)])
    scale, zero = obs.qparams(scheme)
    assert bool(torch.isfinite(scale)) and float(scale) > 0
    probe = torch.tensor([0.0, value])
    fq = fake_quantize(probe, scale, zero, scheme)
    assert float(fq[0]) == 0.0
    assert float(fq[1]) == pytest.approx(value, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("kind", OBSERVER_KINDS)
def test_all_zero_channel_in_per_channel_weight(kind: str) -> None:
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(6))
    w[2] = 0.0
    scale, zero = calibrated(kind, [w], axis=0).qparams(WEIGHT_SCHEME)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert float(fake_quantize(w, scale, zero, WEIGHT_SCHEME)[2].abs().max()) == 0.0


@pytest.mark.parametrize("kind", OBSERVER_KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_naming_the_observer(kind: str, bad: float) -> None:
    obs = make_observer(kind)
    obs.update(torch.randn(10, generator=torch.Generator().manual_seed(7)))
    x = torch.zeros(2, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=f"{kind} observer.*NaN/inf"):
        obs.update(x)


@pytest.mark.parametrize("kind", OBSERVER_KINDS)
def test_same_data_gives_identical_qparams(kind: str, heavy_tailed: list[torch.Tensor]) -> None:
    batches = [b[:4000].reshape(8, -1) for b in heavy_tailed[:3]]
    for axis, scheme in ((None, UINT8), (0, QScheme(bits=4, signed=True, symmetric=True, axis=0))):
        first = calibrated(kind, batches, axis).qparams(scheme)
        second = calibrated(kind, [b.clone() for b in batches], axis).qparams(scheme)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        assert first[0].dtype == torch.float32 and first[1].dtype == torch.int32


def test_misuse_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown observer kind 'max'"):
        make_observer("max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum 0.0"):
        make_observer("moving_average", momentum=0.0)
    with pytest.raises(ValueError, match="percentile 40"):
        make_observer("percentile", percentile=40)
    with pytest.raises(ValueError, match="mse observer: no data observed"):
        make_observer("mse").qparams(UINT8)
    obs = make_observer("minmax", axis=0)
    obs.update(torch.ones(3, 2))
    with pytest.raises(ValueError, match="axis=0 but the scheme has axis=None"):
        obs.qparams(UINT8)
    with pytest.raises(ValueError, match="4 channels, earlier batches had 3"):
        obs.update(torch.ones(4, 2))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        make_observer("percentile", axis=2).update(torch.ones(3, 2))
