"""When did a run converge? One definition for ``analyze`` (evolution, reuse, weights) and ``compare``.

Karimi et al. (2021) call a run converged at the first epoch whose validation Dice is within 0.5 % of its
maximum. Taken from nnU-Net's raw per-epoch pseudo-Dice (a few validation patches) one lucky epoch
sets the maximum; by default the curve is nnU-Net's own exponential moving average of it
(``ema_fg_dice``, logged every epoch), which one noisy epoch cannot dominate.
"""
from __future__ import annotations

import math
from typing import Sequence

#: the first epoch within this fraction of the curve's maximum is the convergence epoch
CONVERGENCE_TOLERANCE = 0.005


def first_within(values: Sequence[float | None], *, tolerance: float = CONVERGENCE_TOLERANCE) -> int | None:
    """Index of the first finite value ``v ≥ max − tolerance·|max|`` (None when no value is finite)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be a fraction in [0, 1), got {tolerance!r}")
    finite = [(i, float(v)) for i, v in enumerate(values)
              if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    best = max(v for _, v in finite)
    threshold = best - tolerance * abs(best)
    return next(i for i, v in finite if v >= threshold)


__all__ = ["CONVERGENCE_TOLERANCE", "first_within"]
