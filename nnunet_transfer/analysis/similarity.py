"""Similarity of two layers' activations: mean CCA, SVCCA, PWCCA and linear CKA.

All four measures are functions of three centred covariance matrices,

    Σxx = Xᶜᵀ Xᶜ / N   (cx × cx),   Σyy = Yᶜᵀ Yᶜ / N   (cy × cy),   Σxy = Xᶜᵀ Yᶜ / N   (cx × cy),

where ``X`` (N × cx) and ``Y`` (N × cy) hold the same N samples (voxels) seen by two layers and
``Xᶜ = X − 1 μxᵀ`` is the mean-centred matrix. That is why :class:`~.moments.PairMoments` can compute
them *exactly* from statistics streamed chunk by chunk, in O((cx + cy)²) memory, however many voxels
are used. This module holds the maths from those statistics and the one-shot functions on arrays;
both paths share :func:`chunk_statistics`, so the functions here equal the accumulator fed the same
rows in one chunk.

Conventions (shared by every measure):

- float64 throughout; numpy arrays or torch tensors of shape ``(samples, channels)``.
- **Dead channels**: a channel whose variance is ``≤ RELATIVE_EPS × (largest variance of its side)``
  is dropped and counted (``dead_x``, ``dead_y``).
- **Rank**: each side is diagonalised, ``Σxx = V Λ Vᵀ``; directions with eigenvalue
  ``≤ RELATIVE_EPS × λmax`` (exactly collinear channels) are dropped (``rank_x``, ``rank_y``).
- **CCA** whitens each side with its eigendecomposition and takes the SVD of the whitened
  cross-covariance ``T = Λx^{-1/2} Vxᵀ Σxy Vy Λy^{-1/2} = U diag(ρ) Wᵀ``; the canonical correlations
  are ``ρ₁ ≥ … ≥ ρₘ``, ``m = min(rank_x, rank_y)``. No ridge is added to the covariances.
- **Null baseline**: the same statistic with ``y``'s rows misaligned by :func:`null_permutation`
  (see :mod:`.moments` for the streamed version). Independent layers already score about
  ``√(c/N)``; read every similarity beside its null.
- Fewer than ``MIN_SAMPLES_PER_CHANNEL × max(cx, cy)`` samples issue a :class:`SimilarityWarning`;
  fewer samples than channels raise ``ValueError``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MIN_SAMPLES_PER_CHANNEL",
    "RELATIVE_EPS",
    "SIDES",
    "DEFAULT_SIDE",
    "SimilarityResult",
    "SimilarityWarning",
    "canonical_correlations",
    "chunk_statistics",
    "linear_cka",
    "mean_cca",
    "null_permutation",
    "pwcca",
    "similarity",
    "similarity_from_statistics",
    "svcca",
]

#: Relative threshold for dead channels (variance) and for collinear directions (eigenvalues).
RELATIVE_EPS = 1e-10
#: Below this many samples per channel a :class:`SimilarityWarning` is issued.
MIN_SAMPLES_PER_CHANNEL = 100
#: Valid values of the ``side`` option of PWCCA: ``fewer`` (the default) weights by the side with fewer
#: live channels, ``x`` on a tie — google/svcca's ``compute_pwcca`` choice (``np.sum(x_idxs) <=
#: np.sum(y_idxs)``); ``x`` / ``y`` by that side; ``sym`` the mean of both.
SIDES = ("fewer", "x", "y", "sym")
DEFAULT_SIDE = "fewer"

_FLATTEN_HINT = (
    "flatten (batch, channels, *spatial) activations to (samples, channels) first, "
    "e.g. a.movedim(1, -1).reshape(-1, a.shape[1])"
)


class SimilarityWarning(UserWarning):
    """A similarity was computed from too few samples, or from a layer without live channels."""


def _warn(message: str) -> None:
    """Warn at the first caller outside this package folder (the user's line, not ours)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, SimilarityWarning, stacklevel=level)


# --------------------------------------------------------------------------------------------------
# Input checks


def _shape(a: Any) -> tuple[int, ...]:
    shape = getattr(a, "shape", None)
    if shape is None:
        shape = np.shape(a)
    return tuple(int(s) for s in shape)


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def check_pair(x: Any, y: Any) -> tuple[int, int, int]:
    """Check that ``x`` (n, cx) and ``y`` (n, cy) are a valid pair; return ``(n, cx, cy)``."""
    xs, ys = _shape(x), _shape(y)
    for name, shape in (("x", xs), ("y", ys)):
        if len(shape) != 2:
            raise ValueError(
                f"{name} must have shape (samples, channels), got {name}.shape={shape}; {_FLATTEN_HINT}"
            )
        if shape[1] == 0:
            raise ValueError(f"{name} must have at least one channel, got {name}.shape={shape}")
    if xs[0] != ys[0]:
        raise ValueError(
            "x and y must hold the same samples (rows) in the same order, "
            f"got x.shape={xs} and y.shape={ys}"
        )
    return xs[0], xs[1], ys[1]


def check_options(*, keep: float = 0.99, side: str = DEFAULT_SIDE) -> None:
    """Validate the ``keep`` (SVCCA) and ``side`` (PWCCA) options."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"`keep` must be a fraction of variance in (0, 1], got {keep!r}")
    if side not in SIDES:
        raise ValueError(f"`side` must be one of {SIDES}, got {side!r}")


def check_seed(seed: int | None) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`null_seed` must be a non-negative integer or None, got {seed!r}")


def null_permutation(n: int, *, seed: int) -> np.ndarray:
    """The fixed misalignment of a chunk of ``n`` rows used by the null baseline.

    Row ``i`` of ``x`` is paired with row ``perm[i]`` of ``y``. The permutation depends only on
    ``(seed, n)`` — ``numpy.random.default_rng([seed, n]).permutation(n)`` — so a streamed null is
    independent of the order of chunks and of how accumulators are merged.
    """
    check_seed(seed)
    return np.random.default_rng([int(seed), int(n)]).permutation(n)


# --------------------------------------------------------------------------------------------------
# Statistics of one chunk (shared by the one-shot functions and the streaming accumulator)


def chunk_statistics(
    x: Any, y: Any, *, perm: np.ndarray | None = None
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean and centred scatter of one chunk, with one matmul of the stacked ``[x y]``.

    Args:
        x: (n, cx) numpy array or torch tensor.
        y: (n, cy), same rows as ``x``.
        perm: optional (n,) row permutation; when given, also ``Σᵢ xᶜᵢ yᶜ_{perm[i]}ᵀ`` (the null
            baseline's cross scatter; a permutation keeps the chunk mean of ``y``).

    Returns:
        ``(n, mean, scatter, null_scatter)``: ``mean`` (cx + cy,), ``scatter = Zᶜᵀ Zᶜ``
        ((cx + cy) × (cx + cy)) for ``Z = [x y]``, ``null_scatter`` (cx × cy) or ``None``; all numpy
        float64. Torch tensors are reduced in float64 on their own device (the tensor of ``x``
        decides), so only the small matrices travel to the host.

    Raises:
        ValueError: bad shapes, or NaN/inf values (checked on the chunk's statistics).
    """
    n, cx, cy = check_pair(x, y)
    if perm is not None and perm.shape != (n,):
        raise ValueError(f"perm must have shape ({n},), got perm.shape={perm.shape}")
    if _is_torch(x) or _is_torch(y):
        mean, scatter, null = _torch_chunk(x, y, perm)
    else:
        z = np.empty((n, cx + cy), dtype=np.float64)
        z[:, :cx] = np.asarray(x)
        z[:, cx:] = np.asarray(y)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported below
            mean = z.mean(axis=0) if n else np.zeros(cx + cy)
            z -= mean
            scatter = z.T @ z  # numpy dispatches Aᵀ A to syrk: half the work of a general matmul
            null = None if perm is None else z[:, :cx].T @ z[perm, cx:]
    for name, sl in (("x", slice(0, cx)), ("y", slice(cx, cx + cy))):
        if not (np.isfinite(mean[sl]).all() and np.isfinite(np.diag(scatter)[sl]).all()):
            raise ValueError(
                f"{name} contains NaN or inf values (or values too large to square in float64); "
                f"got a chunk with {name}.shape={(n, sl.stop - sl.start)}"
            )
    return n, mean, scatter, null


def _torch_chunk(x: Any, y: Any, perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    import torch

    device = x.device if _is_torch(x) else y.device
    xt = torch.as_tensor(x.detach() if _is_torch(x) else np.asarray(x))
    yt = torch.as_tensor(y.detach() if _is_torch(y) else np.asarray(y))
    cx = xt.shape[1]
    z = torch.empty((xt.shape[0], cx + yt.shape[1]), dtype=torch.float64, device=device)
    z[:, :cx] = xt  # one float64 copy of the chunk, converted in place
    z[:, cx:] = yt
    mean = z.mean(dim=0) if z.shape[0] else torch.zeros(z.shape[1], dtype=torch.float64, device=device)
    z -= mean
    scatter = z.T @ z
    null = None
    if perm is not None:
        idx = torch.from_numpy(np.asarray(perm, dtype=np.int64)).to(device)
        null = (z[:, :cx].T @ z[idx, cx:]).cpu().numpy()
    return mean.cpu().numpy(), scatter.cpu().numpy(), null


# --------------------------------------------------------------------------------------------------
# Maths from statistics


@dataclass(frozen=True, eq=False)
class SimilarityResult:
    """Every measure for one layer pair, with its null baseline and the bookkeeping to judge it.

    Attributes:
        n: number of samples; ``cx``, ``cy``: channels given; ``dead_x``, ``dead_y``: channels
            dropped for (relative) zero variance; ``rank_x``, ``rank_y``: directions kept after
            dropping collinear ones.
        mean_cca, svcca, pwcca, linear_cka: the similarities (``pwcca`` for the chosen ``side``;
            ``pwcca_x``, ``pwcca_y`` are both one-sided values).
        pwcca_side: the side ``pwcca`` is weighted by — ``"x"``, ``"y"`` or ``"sym"``; for
            ``side="fewer"`` the side with fewer live channels (``x`` on a tie).
        null_*: the same statistic with ``y``'s rows misaligned (:func:`null_permutation`); NaN
            when no null was computed.
        rho: (m,) canonical correlations, descending, ``m = min(rank_x, rank_y)``.
        pwcca_weights_x, pwcca_weights_y: (m,) PWCCA weights αᵢ (sum to 1) with ``x`` / ``y`` as the
            reference side, in the order of ``rho``.
        svcca_dims: directions kept by SVCCA on each side for ``keep``.
        keep, side: the options used.
    """

    n: int
    cx: int
    cy: int
    dead_x: int
    dead_y: int
    rank_x: int
    rank_y: int
    mean_cca: float
    svcca: float
    pwcca: float
    linear_cka: float
    pwcca_x: float
    pwcca_y: float
    null_mean_cca: float
    null_svcca: float
    null_pwcca: float
    null_linear_cka: float
    rho: np.ndarray
    pwcca_weights_x: np.ndarray
    pwcca_weights_y: np.ndarray
    svcca_dims: tuple[int, int]
    keep: float
    side: str
    pwcca_side: str

    def as_dict(self) -> dict[str, Any]:
        """The scalar fields (no arrays), e.g. for one row of a pandas/CSV table."""
        return {
            k: v
            for k, v in self.__dict__.items()
            if not isinstance(v, np.ndarray) and k != "svcca_dims"
        } | {"svcca_dims_x": self.svcca_dims[0], "svcca_dims_y": self.svcca_dims[1]}


@dataclass(frozen=True)
class _Side:
    live: np.ndarray  # (c,) bool, channels kept
    values: np.ndarray  # (r,) eigenvalues of the live covariance, descending, above the threshold
    vectors: np.ndarray  # (c_live, r) matching eigenvectors

    @property
    def dead(self) -> int:
        return int((~self.live).sum())

    @property
    def rank(self) -> int:
        return int(self.values.size)


def _side(cov: np.ndarray) -> _Side:
    var = np.diag(cov)
    vmax = float(var.max())
    live = var > RELATIVE_EPS * vmax if vmax > 0 else np.zeros(var.shape, dtype=bool)
    if not live.any():
        return _Side(live, np.zeros(0), np.zeros((0, 0)))
    w, v = np.linalg.eigh(cov[np.ix_(live, live)])
    w, v = w[::-1], v[:, ::-1]
    kept = w > RELATIVE_EPS * w[0]
    return _Side(live, w[kept], v[:, kept])


def _whitened_cross(sx: _Side, sy: _Side, cov_xy: np.ndarray) -> np.ndarray:
    """``T = Λx^{-1/2} Vxᵀ Σxy Vy Λy^{-1/2}`` (rank_x × rank_y), in each side's eigenbasis."""
    c = sx.vectors.T @ cov_xy[np.ix_(sx.live, sy.live)] @ sy.vectors
    return c / np.sqrt(sx.values)[:, None] / np.sqrt(sy.values)[None, :]


def _svcca_dims(values: np.ndarray, keep: float) -> int:
    """Smallest k whose leading eigenvalues explain at least ``keep`` of the variance."""
    frac = np.cumsum(values) / values.sum()
    return min(int(np.searchsorted(frac, keep, side="left")) + 1, values.size)


def _pwcca_weights(side: _Side, dirs: np.ndarray) -> np.ndarray:
    """PWCCA weights αᵢ ∝ Σⱼ |⟨qᵢ, xⱼ⟩| from moments only.

    ``dirs`` (r × m) are the canonical directions in the side's eigenbasis (``U`` or ``W``). In
    channel coordinates they are google/svcca's ``u = V U`` (left singular vectors of
    ``Σxx^{-1/2} Σxy Σyy^{-1/2}``), whose projections ``H = Xᶜ V U`` (N × m) ``compute_pwcca``
    orthonormalises by QR, ``H = Q R``. Because ``Xᶜ V = Ũ Λ^{1/2} √N`` with orthonormal ``Ũ``,
    ``H = √N Ũ B`` with ``B = Λ^{1/2} U``; the QR ``B = Q_B R_B`` gives ``Q = Ũ Q_B`` and

        ⟨qᵢ, xⱼ⟩ = (Qᵀ Xᶜ)ᵢⱼ = √N (Q_Bᵀ Λ^{1/2} Vᵀ)ᵢⱼ,

    an m × c_live matrix — no pass over the samples. The √N cancels when α is normalised. Column
    signs of ``U`` flip rows of ``Q_B`` and vanish under |·|: no dependence on SVD sign choices.
    """
    root = np.sqrt(side.values)
    q, _ = np.linalg.qr(root[:, None] * dirs)
    inner = q.T @ (root[:, None] * side.vectors.T)
    alpha = np.abs(inner).sum(axis=1)
    return alpha / alpha.sum()


def weighting_side(side: str, live_x: int, live_y: int) -> str:
    """The side PWCCA is weighted by: ``side`` itself, or for ``"fewer"`` the side with fewer live
    channels, ``x`` on a tie (google/svcca ``compute_pwcca``: ``np.sum(x_idxs) <= np.sum(y_idxs)``)."""
    if side == "fewer":
        return "x" if live_x <= live_y else "y"
    return side


def _measures(sx: _Side, sy: _Side, cov_xy: np.ndarray, cov_xx: np.ndarray, cov_yy: np.ndarray,
              *, keep: float, side: str) -> dict[str, Any]:
    t = _whitened_cross(sx, sy, cov_xy)
    u, s, wt = np.linalg.svd(t, full_matrices=False)
    rho = np.clip(s, 0.0, 1.0)
    kx, ky = _svcca_dims(sx.values, keep), _svcca_dims(sy.values, keep)
    rho_sv = np.clip(np.linalg.svd(t[:kx, :ky], compute_uv=False), 0.0, 1.0)
    wx = _pwcca_weights(sx, u)
    wy = _pwcca_weights(sy, wt.T)
    px, py = float(wx @ rho), float(wy @ rho)
    lx, ly = np.ix_(sx.live, sx.live), np.ix_(sy.live, sy.live)
    cka = float(np.sum(cov_xy[np.ix_(sx.live, sy.live)] ** 2)
                / (np.linalg.norm(cov_xx[lx]) * np.linalg.norm(cov_yy[ly])))
    return {
        "mean_cca": float(rho.mean()),
        "svcca": float(rho_sv.mean()),
        "pwcca": {"x": px, "y": py, "sym": 0.5 * (px + py)}[side],  # side resolved: x, y or sym
        "pwcca_x": px,
        "pwcca_y": py,
        "linear_cka": cka,
        "rho": rho,
        "pwcca_weights_x": wx,
        "pwcca_weights_y": wy,
        "svcca_dims": (kx, ky),
    }


def similarity_from_statistics(
    n: int,
    cx: int,
    cy: int,
    cov: np.ndarray,
    cov_xy_null: np.ndarray | None = None,
    *,
    keep: float = 0.99,
    side: str = DEFAULT_SIDE,
) -> SimilarityResult:
    """All measures from the joint covariance of ``[x y]`` (and optionally a null cross-covariance).

    Args:
        n: number of samples the statistics were computed from.
        cx, cy: channels of ``x`` and ``y``.
        cov: ((cx + cy) × (cx + cy)) centred covariance (or scatter: every measure is invariant to
            a common scale) of the stacked ``[x y]``.
        cov_xy_null: (cx × cy) cross-covariance of ``x`` with misaligned ``y``, same scale as ``cov``.

    Measures (``ρ``, ``U``, ``W``, ``V``, ``Λ`` as in the module docstring):

    - mean CCA ``= (1/m) Σᵢ ρᵢ`` over all ``m = min(rank_x, rank_y)`` canonical correlations.
    - SVCCA (Raghu et al. 2017, arXiv:1706.05806): keep each side's ``k`` leading eigen-directions
      with ``Σ_{i≤k} λᵢ ≥ keep · Σ λᵢ``, then mean CCA of the reduced sides — the singular values
      of the leading ``kx × ky`` block of ``T``. Invariant to rotations and isotropic scaling of a
      side, not to a general invertible map (the SVD step is not).
    - PWCCA (Morcos et al. 2018, arXiv:1806.05759; google/svcca ``compute_pwcca`` on centred
      activations): ``PWCCA_x = Σᵢ αᵢ ρᵢ`` with
      ``αᵢ ∝ Σⱼ |⟨qᵢ, xⱼ⟩|``, ``Σ αᵢ = 1``, where ``q₁…qₘ`` orthonormalise (QR, in order of
      decreasing ρ) the projections ``Xᶜ uᵢ`` of the centred reference side on its CCA directions
      ``uᵢ = V Uᵢ`` (as the reference, the whitened-space directions, not ``Σ^{-1/2} uᵢ``), and
      ``xⱼ`` are the centred live channels. ``side="fewer"`` (the default) weights by the side with
      fewer live channels, ``x`` on a tie, as the reference does; ``"x"`` / ``"y"`` by that side;
      ``"sym"`` averages both. Deliberate departure from the reference: it adds each neuron's mean
      back to the projections before the QR and weights by the raw activations, which makes its value
      depend on the sign LAPACK picks for each singular vector whenever activations have a non-zero
      mean; here both sides are centred, so the value is sign-free and equals the reference run on
      mean-centred activations (its ``else`` branch, which reads ``acts1`` where ``acts2`` is meant,
      is not reproduced).
    - linear CKA (Kornblith et al. 2019, arXiv:1905.00414):
      ``‖Σxy‖²_F / (‖Σxx‖_F ‖Σyy‖_F)`` on the live channels.

    Raises:
        ValueError: fewer samples than channels (or fewer than 2), or bad options.

    Warns:
        SimilarityWarning: ``n < 100 · max(cx, cy)``; or one side has no live channel (every measure
        is then NaN).
    """
    check_options(keep=keep, side=side)
    if n < max(cx, cy, 2):
        raise ValueError(
            f"need at least as many samples as channels (and at least 2): got n={n} samples for "
            f"cx={cx}, cy={cy} channels; use at least {MIN_SAMPLES_PER_CHANNEL}×c = "
            f"{MIN_SAMPLES_PER_CHANNEL * max(cx, cy)} samples"
        )
    c = max(cx, cy)
    if n < MIN_SAMPLES_PER_CHANNEL * c:
        _warn(
            f"similarity from only n={n} samples for c={c} channels: even independent layers score "
            f"about sqrt(c/n) = {math.sqrt(c / n):.2f}; use at least {MIN_SAMPLES_PER_CHANNEL}×c = "
            f"{MIN_SAMPLES_PER_CHANNEL * c} samples and read the value beside its null baseline"
        )
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (cx + cy, cx + cy):
        raise ValueError(f"cov must have shape ({cx + cy}, {cx + cy}) for cx={cx}, cy={cy}, got cov.shape={cov.shape}")
    cov_xx, cov_yy, cov_xy = cov[:cx, :cx], cov[cx:, cx:], cov[:cx, cx:]
    sx, sy = _side(cov_xx), _side(cov_yy)
    wside = weighting_side(side, cx - sx.dead, cy - sy.dead)
    base = dict(n=int(n), cx=cx, cy=cy, dead_x=sx.dead, dead_y=sy.dead, rank_x=sx.rank,
                rank_y=sy.rank, keep=float(keep), side=side, pwcca_side=wside)
    nan = float("nan")
    if sx.rank == 0 or sy.rank == 0:
        _warn(
            f"no live channel left (dead_x={sx.dead} of cx={cx}, dead_y={sy.dead} of cy={cy}): "
            "a layer whose channels are all constant has no similarity; every measure is NaN"
        )
        empty = np.zeros(0)
        return SimilarityResult(**base, mean_cca=nan, svcca=nan, pwcca=nan, linear_cka=nan,
                                pwcca_x=nan, pwcca_y=nan, null_mean_cca=nan, null_svcca=nan,
                                null_pwcca=nan, null_linear_cka=nan, rho=empty,
                                pwcca_weights_x=empty, pwcca_weights_y=empty, svcca_dims=(0, 0))
    real = _measures(sx, sy, cov_xy, cov_xx, cov_yy, keep=keep, side=wside)
    if cov_xy_null is None:
        null = dict.fromkeys(("mean_cca", "svcca", "pwcca", "linear_cka"), nan)
    else:
        cov_xy_null = np.asarray(cov_xy_null, dtype=np.float64)
        if cov_xy_null.shape != (cx, cy):
            raise ValueError(f"cov_xy_null must have shape ({cx}, {cy}), got cov_xy_null.shape={cov_xy_null.shape}")
        null = _measures(sx, sy, cov_xy_null, cov_xx, cov_yy, keep=keep, side=wside)
    return SimilarityResult(
        **base,
        **real,
        null_mean_cca=null["mean_cca"],
        null_svcca=null["svcca"],
        null_pwcca=null["pwcca"],
        null_linear_cka=null["linear_cka"],
    )


# --------------------------------------------------------------------------------------------------
# One-shot functions on arrays


def similarity(
    x: Any, y: Any, *, keep: float = 0.99, side: str = DEFAULT_SIDE, null_seed: int | None = 0
) -> SimilarityResult:
    """Every measure, with its null baseline, for activations ``x`` (N × cx) and ``y`` (N × cy).

    Equal to ``PairMoments(cx, cy, null_seed=null_seed).update(x, y).results(keep=keep, side=side)``
    (one chunk: the null pairs ``x[i]`` with ``y[null_permutation(N, seed=null_seed)[i]]``).
    ``null_seed=None`` skips the null (its fields are NaN). See :func:`similarity_from_statistics`
    for the formulas.
    """
    check_options(keep=keep, side=side)
    check_seed(null_seed)
    n, cx, cy = check_pair(x, y)
    perm = None if null_seed is None else null_permutation(n, seed=null_seed)
    n, _, scatter, null = chunk_statistics(x, y, perm=perm)
    return similarity_from_statistics(n, cx, cy, scatter / max(n, 1),
                                      None if null is None else null / max(n, 1), keep=keep, side=side)


def canonical_correlations(x: Any, y: Any) -> np.ndarray:
    """Canonical correlations ``ρ₁ ≥ … ≥ ρₘ`` (m,) of ``x`` (N × cx) and ``y`` (N × cy)."""
    return similarity(x, y, null_seed=None).rho


def mean_cca(x: Any, y: Any) -> float:
    """Mean canonical correlation ``(1/m) Σᵢ ρᵢ`` of ``x`` (N × cx) and ``y`` (N × cy); in [0, 1]."""
    return similarity(x, y, null_seed=None).mean_cca


def svcca(x: Any, y: Any, *, keep: float = 0.99) -> float:
    """SVCCA: mean CCA after keeping each side's leading principal directions explaining ``keep``
    of its variance (Raghu et al. 2017). ``x`` (N × cx), ``y`` (N × cy)."""
    return similarity(x, y, keep=keep, null_seed=None).svcca


def pwcca(x: Any, y: Any, *, side: str = DEFAULT_SIDE) -> float:
    """PWCCA ``Σᵢ αᵢ ρᵢ`` (Morcos et al. 2018) weighted by ``side``: "fewer" (default: the side with
    fewer live channels, ``x`` on a tie, as google/svcca's ``compute_pwcca``), "x", "y" or "sym"
    (mean of both). ``x`` (N × cx), ``y`` (N × cy). Weights: :attr:`SimilarityResult.pwcca_weights_x`."""
    return similarity(x, y, side=side, null_seed=None).pwcca


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA ``‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)`` (Kornblith et al. 2019); in [0, 1]."""
    return similarity(x, y, null_seed=None).linear_cka
