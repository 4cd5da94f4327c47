"""Streaming, exact statistics of a layer pair: the sample count, means and centred (co)variances.

Every similarity in :mod:`.similarity` is a function of the joint covariance of ``[x y]``, so feeding
activations chunk by chunk gives the *same* value as holding all of them, in O((cx + cy)²) memory:

    per chunk (n_b rows):  μ_b = mean of Z_b = [x y],   S_b = (Z_b − μ_b)ᵀ (Z_b − μ_b)
    merge (Chan et al.):   n = n_a + n_b,   δ = μ_b − μ_a,   μ = μ_a + δ · n_b / n,
                           S = S_a + S_b + δ δᵀ · n_a n_b / n

Each chunk is centred on its own mean before the one matmul, which keeps float64 accurate even
when the activations' means are large against their spread.

**Null baseline in streaming.** Inside each chunk, row ``i`` of ``x`` is paired with row
``perm[i]`` of the same chunk's ``y``, ``perm = null_permutation(n_b, seed=null_seed)`` — a fixed
seeded permutation that depends only on the chunk length. The misaligned cross scatter
``Σᵢ xᶜᵢ yᶜ_{perm[i]}ᵀ`` is accumulated separately and merged with the same δ-term as the aligned
one (a permutation keeps the chunk mean of ``y``); means and auto-covariances are shared. Because
the permutation depends on ``(seed, n_b)`` only, the null does not depend on the order of chunks
or on merging, but it does depend on how rows are cut into chunks. Misalignment never crosses a
chunk: with chunks made of several patches it pairs voxels of different patches; within one patch
it keeps whatever the two networks share at patch level (a slightly conservative null).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .similarity import (
    DEFAULT_SIDE,
    SimilarityResult,
    check_options,
    check_pair,
    check_seed,
    chunk_statistics,
    null_permutation,
    similarity_from_statistics,
)

__all__ = ["PairMoments"]


def _check_channels(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer (number of channels), got {value!r}")
    return int(value)


class PairMoments:
    """Float64 streaming moments of a layer pair ``x`` (cx channels) and ``y`` (cy channels).

    Args:
        cx, cy: channels of the two layers (they may differ).
        null_seed: seed of the null baseline's misalignment (:func:`.null_permutation`);
            ``None`` skips the null (saves one cx × cy matmul per chunk).

    Use::

        acc = PairMoments(32, 32)
        for xb, yb in chunks:          # (n_i, 32) each, same voxels for both networks
            acc.update(xb, yb)
        res = acc.results()            # SimilarityResult: all measures + null baselines + counts

    ``update`` takes numpy arrays or torch tensors. Torch chunks are reduced in float64 on their
    own device (one matmul there) and only the small matrices come back; the state is numpy.
    Accumulators built in different workers combine with :meth:`merge` (they pickle).
    """

    def __init__(self, cx: int, cy: int, *, null_seed: int | None = 0) -> None:
        self.cx = _check_channels(cx, "cx")
        self.cy = _check_channels(cy, "cy")
        check_seed(null_seed)
        self.null_seed = None if null_seed is None else int(null_seed)
        c = self.cx + self.cy
        self.n = 0
        self._mean = np.zeros(c)
        self._scatter = np.zeros((c, c))
        self._scatter_null = None if null_seed is None else np.zeros((self.cx, self.cy))
        self._perm: tuple[int, np.ndarray] | None = None  # cache: chunks usually share one length

    def __repr__(self) -> str:
        return f"PairMoments(cx={self.cx}, cy={self.cy}, n={self.n}, null_seed={self.null_seed})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_perm"} | {"_perm": None}

    # ---------------------------------------------------------------------------------------------
    # accumulation

    def _permutation(self, n: int) -> np.ndarray | None:
        if self.null_seed is None:
            return None
        if self._perm is None or self._perm[0] != n:
            self._perm = (n, null_permutation(n, seed=self.null_seed))
        return self._perm[1]

    def update(self, x: Any, y: Any) -> PairMoments:
        """Add a chunk: ``x`` (n_i, cx), ``y`` (n_i, cy), rows are the same samples. Returns self.

        An empty chunk (n_i = 0) is a no-op. A chunk with NaN/inf raises ``ValueError`` and
        leaves the state unchanged.
        """
        n, cx, cy = check_pair(x, y)
        if (cx, cy) != (self.cx, self.cy):
            raise ValueError(
                f"chunk has cx={cx}, cy={cy} channels but this accumulator was created with "
                f"cx={self.cx}, cy={self.cy}; got x.shape={(n, cx)}, y.shape={(n, cy)}"
            )
        if n == 0:
            return self
        n, mean, scatter, null = chunk_statistics(x, y, perm=self._permutation(n))
        self._absorb(n, mean, scatter, null)
        return self

    def _absorb(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray, null_b: np.ndarray | None) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean
        f = n_a * n_b / n
        self._scatter += scatter_b + f * np.outer(delta, delta)
        if self._scatter_null is not None:
            self._scatter_null += null_b + f * np.outer(delta[: self.cx], delta[self.cx :])
        self._mean += delta * (n_b / n)
        self.n = n

    def merge(self, other: PairMoments) -> PairMoments:
        """Add another accumulator's samples to this one (in place; returns self).

        Equal to having fed this accumulator all of ``other``'s chunks, null included when both
        use the same ``null_seed``.
        """
        if not isinstance(other, PairMoments):
            raise TypeError(f"can only merge another PairMoments, got {type(other).__name__}")
        if (other.cx, other.cy) != (self.cx, self.cy):
            raise ValueError(f"cannot merge {other!r} into {self!r}: channel counts differ")
        if other.null_seed != self.null_seed:
            raise ValueError(
                f"cannot merge {other!r} into {self!r}: their null baselines use different "
                f"misalignments (null_seed={other.null_seed} vs {self.null_seed})"
            )
        if other.n:
            self._absorb(other.n, other._mean.copy(), other._scatter.copy(),
                         None if other._scatter_null is None else other._scatter_null.copy())
        return self

    # ---------------------------------------------------------------------------------------------
    # statistics

    @property
    def mean_x(self) -> np.ndarray:
        """(cx,) mean of ``x``."""
        return self._mean[: self.cx].copy()

    @property
    def mean_y(self) -> np.ndarray:
        """(cy,) mean of ``y``."""
        return self._mean[self.cx :].copy()

    @property
    def cov(self) -> np.ndarray:
        """((cx + cy) × (cx + cy)) population covariance ``S / n`` of ``[x y]``."""
        self._require_samples()
        return self._scatter / self.n

    @property
    def cov_xx(self) -> np.ndarray:
        return self.cov[: self.cx, : self.cx]

    @property
    def cov_yy(self) -> np.ndarray:
        return self.cov[self.cx :, self.cx :]

    @property
    def cov_xy(self) -> np.ndarray:
        return self.cov[: self.cx, self.cx :]

    @property
    def cov_xy_null(self) -> np.ndarray | None:
        """(cx × cy) cross-covariance of ``x`` with misaligned ``y``; ``None`` without a null."""
        self._require_samples()
        return None if self._scatter_null is None else self._scatter_null / self.n

    def _require_samples(self) -> None:
        if self.n == 0:
            raise ValueError(f"{self!r} holds no samples yet: call update(x, y) first")

    # ---------------------------------------------------------------------------------------------
    # measures

    def results(self, *, keep: float = 0.99, side: str = DEFAULT_SIDE) -> SimilarityResult:
        """All measures, null baselines, dead-channel counts and n (see
        :func:`.similarity_from_statistics`); equal to :func:`.similarity` on the concatenated
        chunks (the null: when fed as one chunk)."""
        check_options(keep=keep, side=side)
        return similarity_from_statistics(self.n, self.cx, self.cy, self.cov, self.cov_xy_null,
                                          keep=keep, side=side)

    def mean_cca(self) -> float:
        """Mean canonical correlation of everything accumulated."""
        return self.results().mean_cca

    def svcca(self, *, keep: float = 0.99) -> float:
        """SVCCA keeping ``keep`` of each side's variance."""
        return self.results(keep=keep).svcca

    def pwcca(self, *, side: str = DEFAULT_SIDE) -> float:
        """PWCCA weighted by ``side`` ("fewer", "x", "y" or "sym"; :func:`.similarity.pwcca`)."""
        return self.results(side=side).pwcca

    def linear_cka(self) -> float:
        """Linear CKA of everything accumulated."""
        return self.results().linear_cka
