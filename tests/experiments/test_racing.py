"""Racing rules (nnunet_transfer.experiments.racing) against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nnunet_transfer.experiments.racing import decide, one_sided_p, resolve_rungs

UNITS = ["r0f0", "r0f1", "r1f0", "r1f1", "r2f0", "r2f1"]
GOOD = [0.80, 0.82, 0.79, 0.81, 0.83, 0.80]
SIGNALS = {
    "scratch": dict(zip(UNITS, [0.60, 0.61, 0.58, 0.63, 0.59, 0.62])),   # baseline, clearly worse
    "finetune": dict(zip(UNITS, GOOD)),
    "l2sp": dict(zip(UNITS, [g + d for g, d in zip(GOOD, [0.01, -0.01, 0.005, -0.012, 0.003, -0.002])])),  # as good
    "frozen": dict(zip(UNITS, [0.50, 0.52, 0.49, 0.55, 0.51, 0.50])),    # clearly worse
}


def test_one_sided_p_is_scipys_paired_t_test_halved_on_the_worse_side():
    a, b = np.array(list(SIGNALS["frozen"].values())), np.array(GOOD)
    two = stats.ttest_rel(a, b).pvalue
    assert one_sided_p(a - b, "ttest") == pytest.approx(two / 2, rel=1e-12)  # mean difference < 0
    assert one_sided_p(b - a, "ttest") == pytest.approx(1 - two / 2, rel=1e-12)
    assert one_sided_p([0.0, 0.0, 0.0], "ttest") == 1.0
    assert one_sided_p([-0.1], "ttest") is None


def test_paired_rule_drops_the_clearly_worse_keeps_baseline_and_the_equal():
    verdicts = {v.strategy: v for v in decide(SIGNALS, baseline="scratch", rule="paired", alpha=0.05)}
    assert {s for s, v in verdicts.items() if v.dropped} == {"frozen"}
    assert verdicts["finetune"].reason == "the rung's best" and verdicts["finetune"].best == "finetune"
    # Holm over the three compared strategies, from scipy's one-sided p-values (computed here independently)
    raw = {s: stats.ttest_rel(list(SIGNALS[s].values()), GOOD, alternative="less").pvalue
           for s in ("scratch", "l2sp", "frozen")}
    order = sorted(raw, key=raw.get)
    holm, running = {}, 0.0
    for i, s in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * raw[s]))
        holm[s] = running
    for s in raw:
        assert verdicts[s].p == pytest.approx(raw[s], rel=1e-9)
        assert verdicts[s].p_holm == pytest.approx(holm[s], rel=1e-9)
    assert verdicts["scratch"].p_holm < 0.05 and not verdicts["scratch"].dropped  # the baseline stays
    assert "the baseline is never dropped" in verdicts["scratch"].reason
    assert verdicts["l2sp"].mean_diff == pytest.approx(-0.001)


def test_halving_keeps_the_best_ceil_n_over_eta_and_the_baseline():
    verdicts = {v.strategy: v for v in decide(SIGNALS, baseline="scratch", rule="halving", eta=2)}
    assert [verdicts[s].rank for s in ("finetune", "l2sp", "scratch", "frozen")] == [1, 2, 3, 4]
    assert {s for s, v in verdicts.items() if v.dropped} == {"frozen"}  # scratch is rank 3 but the baseline
    verdicts = decide(SIGNALS, baseline="finetune", rule="halving", eta=4)
    assert {v.strategy for v in verdicts if v.dropped} == {"l2sp", "scratch", "frozen"}


def test_rungs_as_epochs_or_fractions():
    assert resolve_rungs([0.1, 0.3], 50) == [5, 15]
    assert resolve_rungs([2, 4], 50) == [2, 4]
    assert resolve_rungs([0.01], 10) == [1]
    assert math.isclose(0.3 * 50, 15)
