"""The math of `separable_conv` and `low_rank`: factorizations of trained weights, no graphs.

Every function here takes and returns tensors (STYLE rule 7), works in float64 and casts back
to the weight's dtype, so the passes' surgery can be tested apart from the numerics.

**Network Decoupling** (Guo et al. 2018), used by `separable_conv`. A K×K conv with weight
``W`` of shape ``[C_out, C_in, K, K]`` computes, per input channel ``c``, the map
``W[:, c]``: a ``C_out × K²`` matrix. Its truncated SVD ``Σ_i s_i u_i v_iᵀ`` (top ``m``
terms) is a depthwise conv with ``m`` kernels ``v_i`` on channel ``c`` followed by a 1×1 conv
whose weights are ``s_i u_i``. Worked example: ``W[:, c] = [[3, 0], [0, 1]]`` (C_out = 2,
"K²" = 2) has s = (3, 1); at m = 1 it keeps ``[[3, 0], [0, 0]]``, energy 9/10, relative error
``√(1/10) = 0.316``; at m = K² = 2 it is exact.

**Low rank** (`low_rank`): a Linear ``[out, in]`` is ``U S Vᵀ``; keeping rank ``r`` gives
``Linear(in, r)`` with ``√S Vᵀ`` then ``Linear(r, out)`` with ``U √S`` (the singular values
are split evenly so both factors have the same scale, which fine-tuning likes). A K×K conv is
treated the same way on its mode-0 unfolding ``[C_out, C_in·K²]`` (*channel decomposition*,
Zhang et al. 2015): a K×K conv to ``r`` channels, then a 1×1 conv. Both are optimal in the
Frobenius norm (Eckart–Young), so plain SVD is the right tool. *Tucker-2* decomposes the input
and output modes at once (1×1 to r_in, K×K r_in → r_out, 1×1 to C_out); there is no closed
form, and tensorly's HOOI (`partial_tucker`) refines the HOSVD start better than a hand-written
loop would, so it is used there.

Energy is the fraction of ``‖W‖²_F`` kept; the relative error is ``‖W − Ŵ‖_F / ‖W‖_F =
√(1 − energy)`` for an SVD truncation, so ``energy: 0.9`` means a kernel error of at most 0.316.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "LeastSquares",
    "LowRankFactors",
    "SeparableFactors",
    "Tucker2Conv",
    "channel_low_rank",
    "conv_unfolding_spectrum",
    "kept_energy",
    "largest_rank_within",
    "linear_low_rank",
    "multiplier_for_energy",
    "rank_for_energy",
    "relative_error",
    "separable_energy",
    "separable_init",
    "separable_weight",
    "tucker2",
    "tucker2_weight",
]


def _check_conv(weight: torch.Tensor) -> None:
    if weight.dim() != 4:
        raise ValueError(f"expected a Conv2d weight [C_out, C_in, kh, kw], got shape {tuple(weight.shape)}")


# -- energy and rank choice ------------------------------------------------------------------


def kept_energy(singular_values: torch.Tensor, r: int) -> float:
    """Fraction of ``Σ s²`` in the top ``r`` of each row of ``singular_values`` (1.0 for all zeros).

    >>> kept_energy(torch.tensor([3.0, 1.0]), 1)   # 9 / 10
    0.9
    """
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    return 1.0 if total == 0 else float(s2[..., :r].sum()) / total


def relative_error(energy: float) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` of an SVD truncation that keeps ``energy`` of ``‖W‖²``: √(1 − energy)."""
    return math.sqrt(max(0.0, 1.0 - energy))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` whose top-``r`` singular values (of every row) keep at least ``energy``.

    >>> rank_for_energy(torch.tensor([3.0, 1.0]), 0.9), rank_for_energy(torch.tensor([3.0, 1.0]), 0.95)
    (1, 2)
    """
    k = singular_values.shape[-1]
    for r in range(1, k + 1):
        if kept_energy(singular_values, r) >= energy - 1e-12:
            return r
    return k


def largest_rank_within(cost_of_rank: Callable[[int], int], budget: float, max_rank: int) -> int:
    """Largest ``r`` in ``1..max_rank`` with ``cost_of_rank(r) <= budget`` (1 when even r = 1 is over).

    The cost is monotone in ``r``. Example: a Linear 100 → 100 factored at rank r costs
    ``200·r`` MACs; half of the original 10,000 MACs allows r = 25.
    """
    best = 1
    for r in range(1, max_rank + 1):
        if cost_of_rank(r) <= budget:
            best = r
        else:
            break
    return best


# -- separable (Network Decoupling) ----------------------------------------------------------


@dataclass(frozen=True)
class SeparableFactors:
    """A depthwise K×K conv with multiplier ``m`` and a pointwise 1×1 conv approximating one conv.

    ``depthwise`` is ``[C_in·m, 1, kh, kw]`` (channels ``c·m … c·m+m−1`` read input channel c,
    PyTorch's grouped-conv layout with ``groups = C_in``); ``pointwise`` is ``[C_out, C_in·m, 1, 1]``.
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    multiplier: int
    energy: float

    @property
    def relative_error(self) -> float:
        return relative_error(self.energy)


def _per_channel_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched SVD of the ``C_in`` slices ``W[:, c]`` (``C_out × K²``).

    Returns U ``[C_in, C_out, k]``, S ``[C_in, k]`` and Vh ``[C_in, k, K²]`` with k = min(C_out, K²).
    """
    _check_conv(weight)
    c_out, c_in, kh, kw = weight.shape
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)
    return torch.linalg.svd(slices, full_matrices=False)


def separable_energy(weight: torch.Tensor) -> list[float]:
    """Kept energy at multiplier m = 0, 1, …, K² (all channels together; non-decreasing, 1.0 at K²).

    Channels with fewer than m singular values (C_out < K²) are already exact there.
    """
    _, s, _ = _per_channel_svd(weight)
    k2 = weight.shape[2] * weight.shape[3]
    return [kept_energy(s, m) for m in range(k2 + 1)]


def multiplier_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest depth multiplier whose per-channel truncations keep ``energy`` of ``‖W‖²``."""
    curve = separable_energy(weight)
    return next((m for m in range(1, len(curve)) if curve[m] >= energy - 1e-12), len(curve) - 1)


def separable_init(weight: torch.Tensor, multiplier: int) -> SeparableFactors:
    """The best depthwise(m) + pointwise factorization of a Conv2d weight, channel by channel.

    For channel c with ``W[:, c] = U S Vᵀ``: depthwise kernels ``c·m + i`` are ``v_i`` (as K×K),
    pointwise column ``c·m + i`` is ``s_i u_i``. When a slice has fewer than m singular values
    (C_out < K²), the extra kernels and columns are zero. Exact at ``multiplier = K²``.
    """
    _check_conv(weight)
    c_out, c_in, kh, kw = weight.shape
    m = multiplier
    if not 1 <= m <= kh * kw:
        raise ValueError(f"depth multiplier {m} outside 1..K² = {kh * kw}")
    u, s, vh = _per_channel_svd(weight)
    k = s.shape[1]
    keep = min(m, k)
    dw = torch.zeros(c_in, m, kh * kw, dtype=torch.float64)
    pw = torch.zeros(c_out, c_in, m, dtype=torch.float64)
    dw[:, :keep] = vh[:, :keep]
    pw[:, :, :keep] = (u[:, :, :keep] * s[:, None, :keep]).permute(1, 0, 2)
    return SeparableFactors(
        depthwise=dw.reshape(c_in * m, 1, kh, kw).to(weight.dtype),
        pointwise=pw.reshape(c_out, c_in * m, 1, 1).to(weight.dtype),
        multiplier=m,
        energy=kept_energy(s, m),
    )


def separable_weight(depthwise: torch.Tensor, pointwise: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The dense K×K kernel a depthwise + pointwise pair computes: ``Ŵ[o, c] = Σ_i P[o, c·m+i] · D[c·m+i]``.

    A check, not a rewrite: ``separable_weight(f.depthwise, f.pointwise, C_in) ≈ W`` for
    ``f = separable_init(W, K²)``.
    """
    n, _, kh, kw = depthwise.shape
    m = n // in_channels
    c_out = pointwise.shape[0]
    d = depthwise.double().reshape(in_channels, m, kh * kw)
    p = pointwise.double().reshape(c_out, in_channels, m)
    return torch.einsum("ocm,cmk->ock", p, d).reshape(c_out, in_channels, kh, kw).to(depthwise.dtype)


# -- least-squares refit of the pointwise weights ---------------------------------------------


@dataclass
class LeastSquares:
    """Normal equations of ``min_P Σ ‖y − P d‖²`` over many samples, accumulated batch by batch.

    ``d`` are the depthwise outputs (one row per pixel, ``C_in·m`` columns) and ``y`` the original
    layer's outputs without bias (``C_out`` columns) on calibration data. Only ``DᵀD``, ``DᵀY`` and
    ``‖Y‖²`` are kept, so memory does not grow with the data. Worked example: samples
    d = [1], [2] with y = [2], [4] give DᵀD = 5, DᵀY = 10, so P = 2 and the error is 0.
    """

    gram: torch.Tensor | None = None      # Σ dᵀd  [k, k]
    cross: torch.Tensor | None = None     # Σ dᵀy  [k, C_out]
    target_energy: float = 0.0            # Σ ‖y‖²
    samples: int = 0
    _dims: tuple[int, int] = field(default=(0, 0), repr=False)

    def update(self, d: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``d [n, k]`` and ``y [n, C_out]``."""
        d64, y64 = d.detach().double(), y.detach().double()
        g, c = d64.T @ d64, d64.T @ y64
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.target_energy += float((y64 ** 2).sum())
        self.samples += d64.shape[0]

    def error(self, p: torch.Tensor) -> float:
        """Relative output error ``√(Σ‖y − P d‖² / Σ‖y‖²)`` of weights ``p [C_out, k]`` on the samples seen.

        The same measure as the kernel's ``‖W − Ŵ‖/‖W‖``, taken on the layer's outputs instead.
        """
        if self.gram is None or self.cross is None or self.target_energy == 0:
            return 0.0
        pt = p.double().T
        residual = self.target_energy - 2 * float((pt * self.cross).sum()) + float((pt * (self.gram @ pt)).sum())
        return math.sqrt(max(0.0, residual) / self.target_energy)

    def solve(self, ridge: float = 1e-6) -> torch.Tensor:
        """``P [C_out, k]`` minimising the squared error, with ridge ``ridge · mean(diag DᵀD)`` for stability."""
        if self.gram is None or self.cross is None:
            raise ValueError("LeastSquares.solve: no samples were added")
        k = self.gram.shape[0]
        scale = float(self.gram.diagonal().mean()) or 1.0
        a = self.gram + ridge * scale * torch.eye(k, dtype=torch.float64)
        return torch.linalg.solve(a, self.cross).T


# -- low rank: Linear and conv channel decomposition ------------------------------------------


@dataclass(frozen=True)
class LowRankFactors:
    """A layer ≈ ``first`` (to ``rank`` channels) then ``second`` (back to the layer's outputs).

    For a ``Linear(in, out)``: ``first`` is ``[r, in]`` (a ``Linear(in, r, bias=False)``) and
    ``second`` ``[out, r]`` (a ``Linear(r, out)``). For a K×K conv: ``first`` is ``[r, C_in, kh, kw]``
    (a K×K conv to ``r`` channels) and ``second`` ``[C_out, r, 1, 1]`` (a 1×1 conv). One type for
    both, since only the shapes differ. Example: a Linear 512 → 256 at r = 32 gives first
    ``[32, 512]`` and second ``[256, 32]``.
    """

    first: torch.Tensor
    second: torch.Tensor
    rank: int
    energy: float

    @property
    def relative_error(self) -> float:
        return relative_error(self.energy)


def _balanced_svd(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U √S, √S Vᵀ, S)`` truncated to rank ``r`` of a float64 matrix."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], s


def linear_low_rank(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Rank-``rank`` factors of a Linear weight ``[out, in]``; exact at ``rank = min(out, in)``.

    Example: ``[[3, 0], [0, 1]]`` at rank 1 gives first ``[[√3, 0]]``, second ``[[√3], [0]]``,
    energy 0.9.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a Linear weight [out, in], got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} outside 1..{min(weight.shape)} for a {tuple(weight.shape)} weight")
    left, right, s = _balanced_svd(weight.detach().double(), rank)
    return LowRankFactors(right.to(weight.dtype), left.to(weight.dtype), rank, kept_energy(s, rank))


def conv_unfolding_spectrum(weight: torch.Tensor, mode: int = 0) -> torch.Tensor:
    """Singular values of a conv weight unfolded along output (mode 0) or input (mode 1) channels."""
    _check_conv(weight)
    w = weight.detach().double()
    if mode == 1:
        w = w.transpose(0, 1)
    return torch.linalg.svdvals(w.reshape(w.shape[0], -1))


def channel_low_rank(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Channel decomposition of a Conv2d weight at ``rank``; exact at ``rank = min(C_out, C_in·K²)``.

    The unfolding ``[C_out, C_in·K²] = U S Vᵀ``: the K×K conv gets ``√S Vᵀ`` (reshaped to
    ``[r, C_in, kh, kw]``), the 1×1 conv ``U √S``.
    """
    _check_conv(weight)
    c_out, c_in, kh, kw = weight.shape
    if not 1 <= rank <= min(c_out, c_in * kh * kw):
        raise ValueError(f"rank {rank} outside 1..{min(c_out, c_in * kh * kw)} for a {tuple(weight.shape)} conv")
    left, right, s = _balanced_svd(weight.detach().double().reshape(c_out, -1), rank)
    return LowRankFactors(right.reshape(rank, c_in, kh, kw).to(weight.dtype),
                          left.reshape(c_out, rank, 1, 1).to(weight.dtype), rank, kept_energy(s, rank))


@dataclass(frozen=True)
class Tucker2Conv:
    """A K×K conv ≈ 1×1 to ``r_in`` (``first`` ``[r_in, C_in, 1, 1]``), K×K ``r_in → r_out`` (``core``),
    1×1 to ``C_out`` (``last`` ``[C_out, r_out, 1, 1]``)."""

    first: torch.Tensor
    core: torch.Tensor
    last: torch.Tensor
    ranks: tuple[int, int]  # (r_out, r_in)
    relative_error: float


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100) -> Tucker2Conv:
    """Tucker-2 of a Conv2d weight over its output and input channels, by tensorly's HOOI.

    ``W ≈ core ×₀ U_out ×₁ U_in``; deterministic (SVD initialisation). Exact when ``r_out = C_out``
    and ``r_in = C_in``.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    _check_conv(weight)
    c_out, c_in = weight.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= c_out and 1 <= r_in <= c_in):
        raise ValueError(f"Tucker-2 ranks {ranks} outside (1..{c_out}, 1..{c_in})")
    w64 = weight.detach().double().cpu()
    w = w64.numpy()
    with tl.backend_context("numpy"):
        (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max,
                                                  init="svd", random_state=0)
    core_t, u_out_t, u_in_t = (torch.from_numpy(a.copy()) for a in (core, u_out, u_in))
    approx = tucker2_weight(u_in_t.T[:, :, None, None], core_t, u_out_t[:, :, None, None])
    err = float(torch.linalg.norm(approx - w64) / torch.linalg.norm(w64).clamp_min(1e-300))
    return Tucker2Conv(u_in_t.T.reshape(r_in, c_in, 1, 1).to(weight.dtype), core_t.to(weight.dtype),
                       u_out_t.reshape(c_out, r_out, 1, 1).to(weight.dtype), (r_out, r_in), err)


def tucker2_weight(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The dense kernel of the 1×1 → K×K → 1×1 chain: ``Ŵ[o, c] = Σ_ab last[o, a] core[a, b] first[b, c]``."""
    return torch.einsum("oa,abhw,bc->ochw", last.double()[:, :, 0, 0], core.double(), first.double()[:, :, 0, 0])
