"""Tests of the ``groups`` study (Karimi et al. 2021, Table 8): are networks of one group more alike?

``between − within`` is the mean similarity of pairs from different groups minus the mean of pairs
from the same group. Pairs share networks (each network is in n−1 pairs), so they are not
independent samples: :func:`permutation_test` permutes which *network* belongs to which group, which
keeps that dependence. :func:`welch` treats pairs as independent, as the paper's Table 8 does, for
comparison only.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

DEFAULT_PERMUTATIONS = 10000


def between_minus_within(matrix: np.ndarray, labels: Sequence[int]) -> float:
    """Mean similarity of pairs from different groups minus the mean of pairs from the same group.

    ``matrix`` (n × n, symmetric; only the upper triangle is read), ``labels`` (n,) group ids.
    """
    labels = np.asarray(labels)
    iu, ju = np.triu_indices(len(labels), 1)
    vals = np.asarray(matrix, dtype=np.float64)[iu, ju]
    same = labels[iu] == labels[ju]
    if same.all() or not same.any():
        return float("nan")
    return float(vals[~same].mean() - vals[same].mean())


def labelings(sizes: Sequence[int], n: int) -> Iterator[np.ndarray]:
    """Every assignment of n networks to groups of the given sizes (as label arrays)."""
    def rec(remaining: tuple[int, ...], g: int, labels: list[int]):
        if g == len(sizes):
            yield np.array(labels)
            return
        for chosen in itertools.combinations(remaining, sizes[g]):
            new = labels.copy()
            for i in chosen:
                new[i] = g
            rest = tuple(i for i in remaining if i not in chosen)
            yield from rec(rest, g + 1, new)
    yield from rec(tuple(range(n)), 0, [0] * n)


def permutation_test(matrix: np.ndarray, labels: Sequence[int], *, permutations: int = DEFAULT_PERMUTATIONS,
                     seed: int = 0) -> dict[str, Any]:
    """Two-sided permutation test of ``between − within`` over the networks' group labels.

    When the number of distinct labelings (group sizes kept), ``n! / ∏ n_g!``, is at most
    ``permutations`` every one is enumerated (exact p-value, the observed labeling included);
    otherwise ``permutations`` random ones are drawn and ``p = (1 + #{|T*| ≥ |T|}) / (1 + permutations)``.

    Returns ``{"statistic", "p_value", "n_permutations", "exact"}``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    obs = between_minus_within(matrix, labels)
    if not math.isfinite(obs):
        return {"statistic": obs, "p_value": float("nan"), "n_permutations": 0, "exact": False}
    _, sizes = np.unique(labels, return_counts=True)
    total = math.factorial(n) // math.prod(math.factorial(int(s)) for s in sizes)
    tol = 1e-12 * max(1.0, abs(obs))  # ties of the observed labeling with itself despite rounding
    if total <= permutations:
        stats = np.array([between_minus_within(matrix, lab) for lab in labelings(list(sizes), n)])
        p = float(np.mean(np.abs(stats) >= abs(obs) - tol))
        return {"statistic": obs, "p_value": p, "n_permutations": int(total), "exact": True}
    rng = np.random.default_rng([int(seed), 2])
    hits = sum(abs(between_minus_within(matrix, rng.permutation(labels))) >= abs(obs) - tol
               for _ in range(permutations))
    return {"statistic": obs, "p_value": (1 + hits) / (1 + permutations), "n_permutations": int(permutations),
            "exact": False}


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test ``(t, p)`` (``scipy.stats.ttest_ind(equal_var=False)``); NaN with < 2 values a side."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance on both sides: t undefined
        r = ttest_ind(a, b, equal_var=False)
    return float(r.statistic), float(r.pvalue)


__all__ = ["DEFAULT_PERMUTATIONS", "between_minus_within", "labelings", "permutation_test", "welch"]
