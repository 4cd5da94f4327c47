"""Paired tests of one arm against a baseline on the same cases, Holm's correction, Tukey's HSD — the
statistics ``compare`` (and a study's report) applies, each by a well-kept library: scipy for the tests, the
bootstrap and Tukey, statsmodels for Holm. :mod:`nnunet_transfer.experiments.compare` documents what is
reported and how degenerate samples are handled.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

TESTS = ("ttest", "wilcoxon")
#: multiple-comparison correction of ``p_adjusted``: Holm over the strategies, or none (the papers' tests)
CORRECTIONS = ("holm", "none")


def paired_comparison(x: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95,
                      n_resamples: int = 9999, seed: int = 0) -> dict:
    """Paired statistics of ``x`` against ``baseline`` (same cases, same order) on the finite pairs.

    Returns ``n_pairs, mean_diff, ci_low, ci_high, p_ttest, p_wilcoxon`` (None where undefined).
    """
    from scipy import stats

    x, b = np.asarray(x, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if x.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {b.shape}")
    ok = np.isfinite(x) & np.isfinite(b)
    x, b = x[ok], b[ok]
    d = x - b
    out: dict[str, Any] = {"n_pairs": int(d.size), "mean_diff": float(d.mean()) if d.size else None,
                           "ci_low": None, "ci_high": None, "p_ttest": None, "p_wilcoxon": None}
    if d.size < 2:
        return out
    if np.all(d == d[0]):  # no variation: scipy's tests and BCa are undefined here
        out.update(ci_low=float(d[0]), ci_high=float(d[0]))
        if d[0] == 0:
            out.update(p_ttest=1.0, p_wilcoxon=1.0)
        else:
            out.update(p_ttest=float(stats.ttest_rel(x, b).pvalue), p_wilcoxon=float(stats.wilcoxon(x, b).pvalue))
        return out
    ci = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                         rng=np.random.default_rng(seed)).confidence_interval
    with warnings.catch_warnings():
        # a handful of zero differences makes scipy warn about its normal approximation; the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_w = stats.wilcoxon(x, b).pvalue
    out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_ttest=float(stats.ttest_rel(x, b).pvalue),
               p_wilcoxon=float(p_w))
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (statsmodels) over the defined ones; None stays None."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        adj = multipletests([pvalues[i] for i in idx], method="holm")[1]
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out


def tukey(groups: Mapping[str, Sequence[float]], *, confidence: float = 0.95) -> list[dict]:
    """Tukey's HSD over the groups (scipy); one row per unordered pair ``a < b`` (by order given)."""
    from scipy import stats

    names = list(groups)
    data = [np.asarray(groups[n], dtype=np.float64) for n in names]
    if len(data) < 2 or any(g.size < 2 for g in data):
        return []
    if all(np.all(g == data[0][0]) for g in data):  # all values identical: no variance to test against
        return [{"a": names[i], "b": names[j], "mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0}
                for i in range(len(names)) for j in range(i + 1, len(names))]
    res = stats.tukey_hsd(*data)
    ci = res.confidence_interval(confidence_level=confidence)
    return [{"a": names[i], "b": names[j], "mean_diff": float(res.statistic[i, j]), "ci_low": float(ci.low[i, j]),
             "ci_high": float(ci.high[i, j]), "p": float(res.pvalue[i, j])}
            for i in range(len(names)) for j in range(i + 1, len(names))]
