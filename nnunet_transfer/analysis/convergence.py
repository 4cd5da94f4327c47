"""When did a run converge? One definition for ``analyze`` (evolution, reuse, weights) and ``compare``.

Karimi et al. (2021) call a run converged at the first epoch whose validation Dice is within 0.5 % of its
maximum. Taken from nnU-Net's raw per-epoch pseudo-Dice (a few validation patches) one lucky epoch
sets the maximum; by default the curve is nnU-Net's own exponential moving average of it
(``ema_fg_dice``, logged every epoch), which one noisy epoch cannot dominate.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

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




def log_convergence(logging: Mapping[str, Sequence], *, key: str = "ema_fg_dice",
                    tolerance: float = CONVERGENCE_TOLERANCE) -> dict:
    """Time to convergence from nnU-Net's training log (``checkpoint["logging"]``).

    The curve is ``logging[key]`` (default nnU-Net's EMA of the validation pseudo-Dice, one value per
    epoch); the convergence epoch is :func:`first_within` of it. Returns::

        {"key", "tolerance", "epoch" (0-based index of the epoch in the log, None if no finite value),
         "epochs_to_converge" (epoch + 1), "seconds" (wall time from the start of epoch 0 to the end of that
         epoch), "seconds_per_epoch" (mean epoch duration), "curve": [{"epoch", "seconds", "value"}]}
    """
    if key not in logging:
        raise KeyError(f"the training log has no {key!r}; keys: {sorted(logging)}")
    values = list(logging[key])
    starts = list(logging.get("epoch_start_timestamps") or [])
    ends = list(logging.get("epoch_end_timestamps") or [])
    n = min(len(values), len(ends)) if ends else len(values)
    values = values[:n]
    t0 = float(starts[0]) if starts else None
    curve = [{"epoch": i, "seconds": (float(ends[i]) - t0) if t0 is not None and i < len(ends) else None,
              "value": None if v is None else float(v)} for i, v in enumerate(values)]
    epoch = first_within(values, tolerance=tolerance)
    durations = [float(e) - float(s) for s, e in zip(starts[:n], ends[:n])]
    return {"key": key, "tolerance": tolerance, "epoch": epoch,
            "epochs_to_converge": None if epoch is None else epoch + 1,
            "seconds": None if epoch is None else curve[epoch]["seconds"],
            "seconds_per_epoch": sum(durations) / len(durations) if durations else None, "curve": curve}


__all__ = ["CONVERGENCE_TOLERANCE", "first_within", "log_convergence"]
