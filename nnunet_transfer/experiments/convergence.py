"""When did a run converge? One definition for ``analyze`` (evolution, reuse, weights) and ``compare``.

Karimi et al. (2021) call a run converged at the first epoch whose validation Dice is within 0.5 % of its
maximum. Taken from nnU-Net's raw per-epoch pseudo-Dice (a few validation patches) one lucky epoch
sets the maximum; by default the curve is nnU-Net's own exponential moving average of it
(``ema_fg_dice``, logged every epoch), which one noisy epoch cannot dominate.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

#: the first epoch within this fraction of the curve's maximum is the convergence epoch
CONVERGENCE_TOLERANCE = 0.005


def first_within(values: Sequence[float | None], *, tolerance: float = CONVERGENCE_TOLERANCE) -> int | None:
    """Index of the first finite value ``v ≥ max − tolerance·|max|`` (None when no value is finite)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be a fraction in [0, 1), got {tolerance!r}")
    finite = [(i, float(v)) for i, v in enumerate(values)
              if _finite(v)]
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


# --------------------------------------------------------------------------------------------------
# the convergence epoch of a run with snapshots (analyze evolution / reuse / weights)
# --------------------------------------------------------------------------------------------------

#: ``--convergence-from``: which validation curve decides the convergence epoch
SOURCES = ("ema", "raw", "validation")
DEFAULT_SOURCE = "ema"
#: the snapshot index (and nnU-Net log) key of each logged curve
INDEX_KEYS = {"ema": "ema_fg_dice", "raw": "mean_fg_dice"}
#: what each curve is, for summaries
DESCRIPTIONS = {
    "ema": "moving average of nnU-Net's validation pseudo-Dice (ema_fg_dice)",
    "raw": "per-epoch validation pseudo-Dice of nnU-Net (mean_fg_dice, a few patches)",
    "validation": "mean foreground Dice of a sliding-window validation of each snapshot",
    "given": "given on the command line",
}


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"--convergence-from must be one of {', '.join(SOURCES)}, got {source!r}")
    return source


def _finite(v: Any) -> bool:
    # numbers.Real covers numpy scalars: nnU-Net logs np.float32
    return v is not None and not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))


def index_curve(index: Sequence[Mapping], *, source: str = DEFAULT_SOURCE) -> list[tuple[int, float]]:
    """``[(snapshot epoch, value)]`` of a logged curve (``ema`` / ``raw``) from a snapshot index.

    Entries without a finite value (the epoch-0 snapshot: no validation yet) are skipped; sorted by epoch.
    """
    if source not in INDEX_KEYS:
        raise ValueError(f"a snapshot index records the curves {sorted(INDEX_KEYS)}, not {source!r}")
    key = INDEX_KEYS[source]
    return sorted((int(e["epoch"]), float(e[key])) for e in index if _finite(e.get(key)))


@dataclass
class Convergence:
    """A run's convergence epoch and the curve that decided it.

    ``epoch`` is :func:`first_within` of ``curve`` (values at snapshot epochs, so the answer always has a
    snapshot); with ``source="given"`` it was given and ``curve`` is for information only.
    """

    source: str  # ema | raw | validation | given
    tolerance: float
    epoch: int
    curve: list[tuple[int, float]]  # (snapshot epoch = completed epochs, value)
    run: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return INDEX_KEYS.get(self.source, "validation_dice" if self.source == "validation" else "given")

    @property
    def maximum(self) -> float | None:
        return max((v for _, v in self.curve), default=None)

    @property
    def threshold(self) -> float | None:
        m = self.maximum
        return None if m is None else m - self.tolerance * abs(m)

    def rule(self) -> str:
        if self.source == "given":
            return "given"
        return (f"first snapshot epoch whose {DESCRIPTIONS[self.source]} is within {100 * self.tolerance:g} % "
                f"of its maximum")

    def text(self) -> str:
        """One line for summary.md."""
        if self.source == "given":
            return f"epoch **{self.epoch}** (given)"
        return (f"epoch **{self.epoch}**, the {self.rule()} ({self.value_at(self.epoch):.4f} ≥ {self.threshold:.4f} "
                f"= (1 − {self.tolerance:g}) × max {self.maximum:.4f})")

    def value_at(self, epoch: int) -> float | None:
        return next((v for e, v in self.curve if e == epoch), None)

    def to_dict(self) -> dict:
        return {"run": self.run, "source": self.source, "key": self.key, "tolerance": self.tolerance,
                "epoch": self.epoch, "rule": self.rule(), "maximum": self.maximum, "threshold": self.threshold,
                "curve": [{"epoch": e, "value": v} for e, v in self.curve], **self.details}


def curve_convergence(curve: Sequence[tuple[int, float | None]], *, source: str,
                      tolerance: float = CONVERGENCE_TOLERANCE, run: str | None = None,
                      details: Mapping[str, Any] | None = None) -> Convergence | None:
    """The :class:`Convergence` of ``[(epoch, value)]`` (None when no value is finite)."""
    pts = sorted((int(e), float(v)) for e, v in curve if _finite(v))
    i = first_within([v for _, v in pts], tolerance=tolerance)
    if i is None:
        return None
    return Convergence(source=source, tolerance=tolerance, epoch=pts[i][0], curve=pts, run=run,
                       details=dict(details or {}))


__all__ = ["CONVERGENCE_TOLERANCE", "DEFAULT_SOURCE", "DESCRIPTIONS", "INDEX_KEYS", "SOURCES", "Convergence",
           "check_source", "curve_convergence", "first_within", "index_curve", "log_convergence"]
