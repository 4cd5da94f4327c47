"""``study status``: a table of the runs — state, epochs, elapsed time, job id — from the files alone.

Nothing is loaded but JSON and nnU-Net's text logs (epochs come from ``training_log_*.txt``, never from a
checkpoint), so it is instant on a study of hundreds of runs and safe while jobs are running.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nnunet_transfer.study.model import Study
from nnunet_transfer.study.racing import mark_dropped, racing_lines
from nnunet_transfer.study.runner import job_alive
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import Progress, progress
from nnunet_transfer.study.table import build_table, plan_study_splits


@dataclass
class StatusResult:
    study: Study
    progress: list[Progress]

    def counts(self) -> Counter:
        return Counter(p.state for p in self.progress)

    def text(self) -> str:
        head = ("run", "state", "epoch", "elapsed", "job", "detail")
        rows = []
        for p in self.progress:
            epoch = "–" if p.epochs is None else f"{p.epochs}/{p.run.num_epochs}"
            rows.append((p.run.id, p.state, epoch, _elapsed(p.seconds), p.job_id or "–", p.detail))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return "\n".join([fmt(head), *map(fmt, rows), "", f"{len(rows)} runs: {counts}",
                          *racing_lines(self.study)])


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def study_status(study: Study | str | Path, *, check_jobs: bool = True) -> StatusResult:
    """Every run's :class:`~nnunet_transfer.study.state.Progress` (``check_jobs``: ask submitit / the process
    table whether submitted jobs still exist)."""
    if not isinstance(study, Study):
        study = load_study(study)
    runs = build_table(study, plan_study_splits(study))
    out = [progress(study, r, job_alive=job_alive if check_jobs else None) for r in runs]
    mark_dropped(study, out)
    return StatusResult(study, out)


__all__ = ["study_status", "StatusResult"]
