"""[racing]: stop the strategies already losing at rungs (``study run``; :mod:`nnunet_transfer.experiments.racing`
holds the rules)::

    [racing]
    rungs = [0.1, 0.3]      # completed epochs (integers) or fractions of num_epochs (floats in (0, 1))
    signal = "ema"          # nnU-Net's EMA pseudo-Dice at the rung, or "validation" (sliding-window validation
                            # of the fold's validation cases with the rung's weights)
    rule = "paired"         # or "halving"
    alpha = 0.05            # paired: one-sided level, Holm across the strategies of a size
    test = "ttest"          # paired: scipy's one-sided paired t-test, or "wilcoxon" (signed-rank)
    eta = 3                 # halving: keep the best ceil(n / eta)

Every strategy runs with ``pause_at`` = the rungs in epochs (a schedule setting: the runs are the same runs as
without racing), so all strategies must share one ``num_epochs`` and every rung must fall before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from nnunet_transfer.config import is_int
from nnunet_transfer.experiments.racing import RACING_TESTS, RULES, SIGNALS, resolve_rungs
from nnunet_transfer.study.problems import Problems, read_table, suggest

RACING_KEYS = ("rungs", "signal", "rule", "alpha", "test", "eta")


@dataclass(frozen=True)
class Racing:
    rungs: tuple[int, ...]        # completed epochs
    signal: str = "ema"
    rule: str = "paired"
    alpha: float = 0.05
    test: str = "ttest"
    eta: int = 2
    num_epochs: int = 0           # the full schedule every strategy shares


def read_racing(p: Problems, content: Any, num_epochs: Sequence[int]) -> Racing | None:
    """The table, checked; ``num_epochs``: the effective num_epochs of every strategy."""
    before = len(p)
    rc = read_table(p, "racing", content, RACING_KEYS)
    if rc is None:
        return None
    rungs = rc.get("rungs")
    if rungs is None:
        p.add("racing", "rungs is missing: the completed epochs (or fractions of num_epochs) at which strategies "
                        "are compared, e.g. rungs = [0.1, 0.3]")
    elif (not isinstance(rungs, list) or not rungs
          or not (all(is_int(r) and r >= 1 for r in rungs)
                  or all(isinstance(r, float) and 0 < r < 1 for r in rungs))):
        p.add("racing", f"rungs = {rungs!r} must be a non-empty list of epoch counts >= 1 (e.g. [10, 30]) or of "
                        f"fractions of num_epochs in (0, 1) (e.g. [0.1, 0.3]), not mixed")
        rungs = None
    choices = {"signal": SIGNALS, "rule": RULES, "test": RACING_TESTS}
    values = {"signal": rc.get("signal", "ema"), "rule": rc.get("rule", "paired"), "test": rc.get("test", "ttest")}
    for key, valid in choices.items():
        if values[key] not in valid:
            p.add("racing", f"{key} = {values[key]!r} is not one of {', '.join(valid)}"
                            f"{suggest(str(values[key]), valid)}")
    alpha = rc.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        p.add("racing", f"alpha = {alpha!r} must be a level in (0, 1), e.g. 0.05")
    eta = rc.get("eta", 2)
    if not is_int(eta) or eta < 2:
        p.add("racing", f"eta = {eta!r} must be an integer >= 2 (halving keeps the best ceil(n / eta))")
    epochs = sorted(set(num_epochs))
    if len(epochs) > 1:
        p.add("racing", f"the strategies have different num_epochs ({', '.join(map(str, epochs))}); racing compares "
                        f"them at the same epochs: give every strategy one num_epochs ([settings])")
    if len(p) > before or rungs is None or not epochs:
        return None
    n = epochs[0]
    resolved = resolve_rungs(rungs, n)
    if any(b <= a for a, b in zip(resolved, resolved[1:])) or resolved[-1] >= n:
        p.add("racing", f"rungs = {rungs!r} are epochs {resolved} of num_epochs {n}; they must increase and fall "
                        f"before num_epochs")
        return None
    return Racing(tuple(resolved), values["signal"], values["rule"], float(alpha), values["test"], eta, n)


__all__ = ["Racing", "read_racing", "RACING_KEYS"]
