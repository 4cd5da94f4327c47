"""The signal a rung of [racing] compares strategies on, per run (``signal`` of the table).

* ``ema`` — nnU-Net's EMA pseudo-Dice after the rung's epoch, from the run's own checkpoint log (free: nnU-Net
  logs it every epoch; measured on a few random validation *patches*).
* ``validation`` — a real validation with the rung's weights: the run's ``checkpoint_latest.pth`` (written when the
  run paused at the rung) predicts the whole validation cases of its fold with nnU-Net's sliding-window predictor,
  and the signal is nnU-Net's foreground-mean Dice of them: :class:`~nnunet_transfer.analysis.validation
  .SnapshotValidator`, the validation behind ``analyze --convergence-from validation``, on the preprocessed grid.
  One prediction pass over the fold's validation cases per live run and rung.

Either value is recorded in ``racing.json`` with the decision, so a rung is never measured or decided twice.
"""
from __future__ import annotations

import math
from pathlib import Path

from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.errors import DataError


def ema_at(run_folder: Path, epoch: int) -> float | None:
    """nnU-Net's EMA pseudo-Dice after ``epoch`` completed epochs, from the run's newest checkpoint's log."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = run_folder / name
        if path.is_file():
            logged = read_checkpoint(path, mmap=True)["logging"].get("ema_fg_dice") or []
            if len(logged) >= epoch:
                v = float(logged[epoch - 1])
                return v if math.isfinite(v) else None
    return None


def rung_checkpoint(run_folder: Path, epoch: int) -> Path:
    """The checkpoint holding the weights after ``epoch`` completed epochs: the paused run's
    ``checkpoint_latest.pth``, or ``checkpoint_final.pth`` of a run whose schedule ends there (nnU-Net's
    ``current_epoch`` counts completed epochs)."""
    found = {}
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        path = run_folder / name
        if path.is_file():
            found[name] = at = read_checkpoint(path, mmap=True).get("current_epoch")
            if at == epoch:
                return path
    if not found:
        raise DataError(f"{run_folder} holds no checkpoint: the run has not reached rung {epoch}; run `study run` "
                        f"again")
    held = ", ".join(f"{name} after epoch {at}" for name, at in found.items())
    raise DataError(f"{run_folder} holds {held}, not the weights after rung {epoch}: the run went past the rung "
                    f"before it was measured (trained outside `study run`?); its validation at the rung cannot be "
                    f"measured now — start the racing study again, or use signal = 'ema'")


def validation_at(run_folder: Path, epoch: int, *, dataset: str, configuration: str, plans: str,
                  device: str = "auto") -> float | None:
    """Foreground-mean Dice of the fold's validation cases predicted with the weights after ``epoch`` (module
    docstring); None when no validation case holds a foreground label and nothing is predicted (NaN)."""
    from nnunet_transfer.analysis.runs import NetworkRef, load_into, run_label  # lazy: not for signal = "ema"
    from nnunet_transfer.analysis.session import open_analysis  # lazy: not for signal = "ema"
    from nnunet_transfer.analysis.validation import SnapshotValidator  # lazy: not for signal = "ema"

    ref = NetworkRef(label=f"{run_label(run_folder)}@{epoch}", path=rung_checkpoint(run_folder, epoch),
                     run=run_folder, epoch=epoch)
    an = open_analysis(dataset, configuration, plans, device=device, progress=False)
    net = an.template
    load_into(net, ref, where=an.where, allow_seg_mismatch=False)
    validator = SnapshotValidator.open(dataset_name=an.dataset, plans=an.plans, configuration=configuration,
                                       dataset_json=an.dataset_json, template=an.template, run=run_folder,
                                       device=an.device)
    dice, _ = validator.dice(net.state_dict())
    return dice if math.isfinite(dice) else None


__all__ = ["ema_at", "rung_checkpoint", "validation_at"]
