"""Racing: which strategies of a study to stop at a rung, from a signal per run (pure; the study applies it).

A *unit* is one (repeat, fold) of a training-set size: every strategy has one run per unit, so the strategies'
signals are paired by unit. At each rung, per size, among the strategies still live:

* ``paired``: the rung's *best* is the strategy with the highest mean signal over the units. Every other live
  strategy ``s`` is tested against it on the paired differences ``d_u = signal(s, u) − signal(best, u)`` with a
  **one-sided** test of H1 "``s`` is worse" — scipy's paired t-test (``ttest_rel(..., alternative="less")``) or
  Wilcoxon's signed-rank test (``wilcoxon(d, alternative="less")``) — and the p-values are Holm-adjusted
  (statsmodels) across those strategies. ``s`` is dropped when its adjusted p < ``alpha``. Fewer than two units,
  or differences that are all equal to zero, drop nothing.
* ``halving`` (successive halving, Jamieson & Talwalkar 2016): keep the best ``ceil(n / eta)`` by mean signal (ties
  by name), drop the rest.

The baseline is never dropped (its evidence still says how it stands). Units a strategy lacks (a failed run) are
left out of its pairs. :func:`decide` returns one :class:`Verdict` per live strategy, in the order given.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from nnunet_transfer.experiments.paired import holm

RULES = ("paired", "halving")
SIGNALS = ("validation", "ema")
RACING_TESTS = ("ttest", "wilcoxon")


@dataclass(frozen=True)
class Verdict:
    strategy: str
    dropped: bool
    mean: float | None          # mean signal over its units
    n_units: int
    best: str                   # the rung's best (by mean)
    mean_diff: float | None = None   # paired: mean of signal − best's signal
    p: float | None = None           # paired: one-sided p (H1: worse than the best)
    p_holm: float | None = None      # paired: Holm-adjusted across the compared strategies
    rank: int | None = None          # halving: 1 = best
    kept: int | None = None          # halving: how many are kept
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: Mapping[str, float]) -> float | None:
    v = [x for x in values.values() if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def one_sided_p(diffs: Sequence[float], test: str) -> float | None:
    """p of H1 "the mean (t-test) / the distribution (Wilcoxon) of the differences is below 0"; None when undefined
    (fewer than 2 pairs). All-zero differences give 1."""
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], dtype=np.float64)
    if d.size < 2:
        return None
    if np.all(d == 0):
        return 1.0
    if np.all(d == d[0]):  # no spread: the t statistic is ±inf
        return 0.0 if d[0] < 0 else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if test == "ttest":
            return float(stats.ttest_1samp(d, 0.0, alternative="less").pvalue)
        if test == "wilcoxon":
            return float(stats.wilcoxon(d, alternative="less").pvalue)
    raise ValueError(f"test must be one of {RACING_TESTS}, got {test!r}")


def decide(signals: Mapping[str, Mapping[str, float]], *, baseline: str, rule: str, alpha: float = 0.05,
           test: str = "ttest", eta: int = 2) -> list[Verdict]:
    """The verdict of one rung of one size. ``signals``: ``{strategy: {unit: signal}}`` of the live strategies."""
    names = list(signals)
    means = {s: _mean(signals[s]) for s in names}
    ranked = sorted(names, key=lambda s: (-(means[s] if means[s] is not None else -math.inf), s))
    best = ranked[0]
    if rule == "halving":
        kept = max(1, math.ceil(len(names) / eta))
        out = []
        for s in names:
            rank = ranked.index(s) + 1
            drop = rank > kept and s != baseline
            why = (f"rank {rank} of {len(names)} by mean signal, outside the best {kept} (1/eta = 1/{eta})" if drop
                   else ("the baseline is never dropped" if rank > kept else f"rank {rank}, within the best {kept}"))
            out.append(Verdict(s, drop, means[s], len(signals[s]), best, rank=rank, kept=kept, reason=why))
        return out
    if rule != "paired":
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    others = [s for s in names if s != best]
    diffs, ps = {}, []
    for s in others:
        units = [u for u in signals[s] if u in signals[best]]
        diffs[s] = [signals[s][u] - signals[best][u] for u in units]
        ps.append(one_sided_p(diffs[s], test))
    adjusted = dict(zip(others, holm(ps)))
    raw = dict(zip(others, ps))
    out = []
    for s in names:
        if s == best:
            out.append(Verdict(s, False, means[s], len(signals[s]), best, reason="the rung's best"))
            continue
        d = [x for x in diffs[s] if math.isfinite(x)]
        md = float(np.mean(d)) if d else None
        pa = adjusted[s]
        worse = pa is not None and pa < alpha
        drop = worse and s != baseline
        if pa is None:
            why = f"not tested: {len(d)} paired unit(s), 2 needed"
        elif worse:
            why = (f"worse than {best}: mean paired difference {md:+.4f} over {len(d)} units, one-sided {test} "
                   f"p = {raw[s]:.3g}, Holm p = {pa:.3g} < alpha {alpha}")
            if not drop:
                why += "; kept: the baseline is never dropped"
        else:
            why = (f"not significantly worse than {best}: mean paired difference {md:+.4f} over {len(d)} units, "
                   f"Holm p = {pa:.3g} >= alpha {alpha}")
        out.append(Verdict(s, drop, means[s], len(signals[s]), best, mean_diff=md, p=raw[s], p_holm=pa,
                           reason=why))
    return out


def resolve_rungs(rungs: Sequence[float | int], num_epochs: int) -> list[int]:
    """Rungs as completed-epoch counts: an integer is an epoch count, a float in (0, 1) a fraction of
    ``num_epochs`` (rounded to the nearest epoch, at least 1)."""
    out = []
    for r in rungs:
        out.append(int(r) if isinstance(r, int) else max(1, int(round(r * num_epochs))))
    return out


__all__ = ["RULES", "SIGNALS", "RACING_TESTS", "Verdict", "decide", "one_sided_p", "resolve_rungs"]
