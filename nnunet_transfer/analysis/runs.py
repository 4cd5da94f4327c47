"""Which networks an analysis reads: checkpoints, snapshots, training runs and their convergence epoch.

A *network reference* (``NET`` on the command line) is one of::

    path/to/file.pth          an nnU-Net checkpoint (key ``network_weights``), a snapshot or a state dict
    path/to/fold_0            the run's checkpoint_final.pth
    path/to/fold_0@12         the run's snapshot of epoch 12 (snapshots/epoch_0012.pth)
    path/to/fold_0@start      = @0, the network as training started (pretrained weights loaded); without
                              snapshots the run's start_weights.pth (every trainer of this package writes it)
    path/to/fold_0@converged  the snapshot at the convergence epoch (:func:`convergence_epoch`, from
                              nnU-Net's EMA pseudo-Dice of the snapshot index)
    path/to/fold_0@final | @latest | @best   checkpoint_final / _latest / _best.pth

Every file is read with ``map_location="cpu"`` and its keys lose the ``module.`` / ``_orig_mod.``
prefixes of DDP / ``torch.compile``. A checkpoint is refused, with one message naming every
difference, when its keys or shapes differ from the network the plans build.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_transfer.experiments.convergence import (
    CONVERGENCE_TOLERANCE,
    DEFAULT_SOURCE,
    INDEX_KEYS,
    Convergence,
    curve_convergence,
    index_curve,
)
from nnunet_transfer.checkpoints import compare, is_seg_key, load_state
from nnunet_transfer.checkpoints import load_into as load_into_network
from nnunet_transfer.errors import ArchitectureError, ConfigError, DataError
from nnunet_transfer.training.snapshots import SNAPSHOT_DIR, START_FILE, read_index, snapshot_name

#: ``@name`` -> checkpoint file of nnU-Net in a fold folder.
CHECKPOINTS = {"final": "checkpoint_final.pth", "latest": "checkpoint_latest.pth",
               "best": "checkpoint_best.pth"}
_AT = re.compile(r"(.+)@(\d+|start|converged|final|latest|best)")


@dataclass(frozen=True)
class NetworkRef:
    """A resolved network reference: where the weights are and how to call them in tables."""

    label: str
    path: Path
    run: Path | None = None  # fold folder, when the reference came from one
    epoch: int | None = None  # snapshot epoch (completed epochs), when it is a snapshot
    #: how ``@converged`` chose the epoch, when it did
    convergence: Convergence | None = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = {"label": self.label, "path": str(self.path), "run": None if self.run is None else str(self.run),
             "epoch": self.epoch}
        if self.convergence is not None:
            d["convergence"] = {k: v for k, v in self.convergence.to_dict().items() if k != "curve"}
        return d


def run_label(fold: Path) -> str:
    """``…/nnUNetTrainerFinetune__nnUNetPlans__ft/fold_0`` -> ``nnUNetTrainerFinetune__nnUNetPlans__ft/fold_0``."""
    fold = Path(fold)
    return f"{fold.parent.name}/{fold.name}" if fold.name.startswith("fold_") else fold.name


def snapshot_epochs(fold: str | Path) -> list[int]:
    """Epochs with a snapshot file listed in the run's ``snapshots/index.json``."""
    fold = Path(fold)
    return [int(e["epoch"]) for e in read_index(fold)
            if (fold / SNAPSHOT_DIR / e.get("file", snapshot_name(int(e["epoch"])))).is_file()]


def require_snapshots(fold: str | Path) -> list[int]:
    fold = Path(fold)
    if not fold.is_dir():
        raise DataError(f"run folder {fold} does not exist; give a fold folder such as "
                        f"$nnUNet_results/DatasetXXX/Trainer__Plans__Config/fold_0")
    epochs = snapshot_epochs(fold)
    if not epochs:
        raise DataError(f"run {fold} has no snapshots ({SNAPSHOT_DIR}/{'index.json'} missing or empty); "
                        f"train with a trainer of this package (e.g. nnUNetTrainerTransferBase) and the "
                        f"setting snapshot_every > 0 (nnunet_transfer configure -d D -c BASE -n NEW "
                        f"--set snapshot_every=1)")
    return epochs


def snapshot_ref(fold: str | Path, epoch: int) -> NetworkRef:
    fold = Path(fold)
    epochs = require_snapshots(fold)
    if epoch not in epochs:
        raise DataError(f"run {fold} has no snapshot of epoch {epoch}; snapshots exist for epochs "
                        f"{_epochs_text(epochs)}")
    entry = next(e for e in read_index(fold) if int(e["epoch"]) == epoch)
    return NetworkRef(label=f"{run_label(fold)}@{epoch}", path=fold / SNAPSHOT_DIR / entry.get("file", snapshot_name(epoch)),
                      run=fold, epoch=epoch)


def start_ref(fold: str | Path) -> NetworkRef:
    """The network as the run started: the epoch-0 snapshot, else ``start_weights.pth``.

    Both hold the weights after pretrained weights were loaded, before the first step.
    """
    fold = Path(fold)
    if not fold.is_dir():
        raise DataError(f"run folder {fold} does not exist; give a fold folder such as "
                        f"$nnUNet_results/DatasetXXX/Trainer__Plans__Config/fold_0")
    if 0 in snapshot_epochs(fold):
        return snapshot_ref(fold, 0)
    if (fold / START_FILE).is_file():
        return NetworkRef(label=f"{run_label(fold)}@start", path=fold / START_FILE, run=fold, epoch=0)
    raise DataError(f"run {fold} has no snapshots ({SNAPSHOT_DIR}/index.json with epoch 0) and no {START_FILE}, so "
                    f"its start weights are unknown; train with a trainer of this package (it writes {START_FILE}; "
                    f"the setting snapshot_every > 0 adds snapshots), or give the start network explicitly")


def _epochs_text(epochs: Sequence[int]) -> str:
    epochs = list(epochs)
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else (
        ", ".join(map(str, epochs[:5])) + ", …, " + ", ".join(map(str, epochs[-3:])))


# --------------------------------------------------------------------------------------------------
# convergence epoch
# --------------------------------------------------------------------------------------------------

def dice_curve(index: Sequence[Mapping], *, source: str = DEFAULT_SOURCE) -> tuple[str, list[tuple[int, float]]]:
    """``(key, [(epoch, value), …])`` of a snapshot index's curve (:func:`.convergence.index_curve`).

    ``source="ema"`` (default): nnU-Net's moving average ``ema_fg_dice``; ``"raw"``: the epoch's
    validation pseudo-Dice ``mean_fg_dice``. Entries without a finite value (epoch 0) are skipped.
    """
    _index_source(source)
    return INDEX_KEYS[source], index_curve(index, source=source)


def _index_source(source: str) -> None:
    if source not in INDEX_KEYS:
        raise ConfigError(f"the snapshot index records the curves {', '.join(INDEX_KEYS)}; {source!r} needs "
                          f"an analysis (nnunet_transfer analyze ... --convergence-from {source})")


def _convergence_of_index(index: Sequence[Mapping], *, source: str, tolerance: float,
                          run: str | None = None) -> Convergence:
    _index_source(source)
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be a fraction in [0, 1), got {tolerance!r}")
    conv = curve_convergence(index_curve(index, source=source), source=source, tolerance=tolerance, run=run)
    if conv is None:
        other = next(k for k in INDEX_KEYS if k != source)
        raise DataError(f"no validation pseudo-Dice ({INDEX_KEYS[source]}) is recorded in the snapshot index "
                        f"(index.json), so the convergence epoch is unknown; use --convergence-from {other} or "
                        f"validation, or give it explicitly (--convergence-epoch E)")
    return conv


def convergence_epoch(index: Sequence[Mapping], *, tolerance: float = CONVERGENCE_TOLERANCE,
                      source: str = DEFAULT_SOURCE) -> int:
    """First snapshot epoch whose curve value ``d`` satisfies ``d ≥ max(d) − tolerance · |max(d)|``.

    Karimi et al. (2021) call it the convergence epoch: the first epoch within 0.5 % of the best
    validation Dice. The curve is nnU-Net's EMA pseudo-Dice by default (``source="ema"``; one noisy
    epoch cannot set its maximum), the raw per-epoch pseudo-Dice with ``source="raw"``. Only epochs
    with a snapshot (and a recorded value) are candidates, so the answer always has a snapshot.

    Raises:
        DataError: no entry has a value of that curve (e.g. only the start snapshot exists).
    """
    return _convergence_of_index(index, source=source, tolerance=tolerance).epoch


def index_convergence(fold: str | Path, *, source: str = DEFAULT_SOURCE,
                      tolerance: float = CONVERGENCE_TOLERANCE) -> Convergence:
    """The run's :class:`.convergence.Convergence` from its snapshot index (``ema`` or ``raw``)."""
    fold = Path(fold)
    require_snapshots(fold)
    try:
        return _convergence_of_index(read_index(fold), source=source, tolerance=tolerance, run=str(fold))
    except DataError as e:
        raise DataError(f"run {fold}: {e}") from None


def run_convergence(fold: str | Path, *, tolerance: float = CONVERGENCE_TOLERANCE,
                    source: str = DEFAULT_SOURCE) -> int:
    return index_convergence(fold, source=source, tolerance=tolerance).epoch


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------

def resolve_network(text: str | Path, *, tolerance: float = CONVERGENCE_TOLERANCE,
                    source: str = DEFAULT_SOURCE) -> NetworkRef:
    """Resolve a network reference (see the module docstring) to a file.

    ``@converged`` uses the snapshot index's curve ``source`` (``ema`` or ``raw``) and ``tolerance``.
    """
    raw = str(text).strip()
    if not raw:
        raise DataError("empty network reference; give a checkpoint file, a fold folder or FOLD@EPOCH")
    m = _AT.fullmatch(raw)
    if m and not Path(raw).exists():
        fold, what = Path(m.group(1)), m.group(2)
        if what in CHECKPOINTS:
            return _checkpoint_ref(fold, what)
        if what == "converged":
            conv = index_convergence(fold, source=source, tolerance=tolerance)
            ref = snapshot_ref(fold, conv.epoch)
            return NetworkRef(ref.label, ref.path, ref.run, ref.epoch, convergence=conv)
        if what == "start":
            return start_ref(fold)
        return snapshot_ref(fold, int(what))
    path = Path(raw)
    if path.is_dir():
        return _checkpoint_ref(path, "final")
    if path.is_file():
        return NetworkRef(label=_file_label(path), path=path, run=_fold_of(path), epoch=_epoch_of(path))
    raise DataError(f"network {raw!r} not found: give a checkpoint file (.pth), a fold folder (its "
                    f"checkpoint_final.pth) or FOLD@EPOCH / FOLD@start / FOLD@converged / FOLD@final")


def _checkpoint_ref(fold: Path, what: str) -> NetworkRef:
    if not fold.is_dir():
        raise DataError(f"run folder {fold} does not exist")
    path = fold / CHECKPOINTS[what]
    if not path.is_file():
        have = sorted(p.name for p in fold.glob("checkpoint_*.pth"))
        epochs = snapshot_epochs(fold)
        hint = f"; snapshots exist for epochs {_epochs_text(epochs)} (use {fold}@EPOCH)" if epochs else ""
        raise DataError(f"{path} does not exist (checkpoints there: {have or 'none'}){hint}")
    return NetworkRef(label=f"{run_label(fold)}@{what}", path=path, run=fold)


def _fold_of(path: Path) -> Path | None:
    if path.parent.name == SNAPSHOT_DIR:
        return path.parent.parent
    if path.name in CHECKPOINTS.values():
        return path.parent
    return None


def _epoch_of(path: Path) -> int | None:
    m = re.fullmatch(r"epoch_(\d+)\.pth", path.name)
    return int(m.group(1)) if m and path.parent.name == SNAPSHOT_DIR else None


def _file_label(path: Path) -> str:
    fold = _fold_of(path)
    if fold is None:
        return path.stem
    epoch = _epoch_of(path)
    if epoch is not None:
        return f"{run_label(fold)}@{epoch}"
    what = next(k for k, v in CHECKPOINTS.items() if v == path.name)
    return f"{run_label(fold)}@{what}"


def unique_labels(refs: Sequence[NetworkRef]) -> list[NetworkRef]:
    """Append ``#2``, ``#3`` … to repeated labels (the same file may be given twice)."""
    seen: dict[str, int] = {}
    out = []
    for r in refs:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r if seen[r.label] == 1 else
                   NetworkRef(f"{r.label}#{seen[r.label]}", r.path, r.run, r.epoch, convergence=r.convergence))
    return out


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------

compare_state = compare  # (state, reference network or state dict) -> Comparison


def load_into(network: nn.Module, ref: NetworkRef, *, where: str, allow_seg_mismatch: bool) -> bool:
    """Load ``ref``'s weights into ``network`` (a fresh copy of the plans' network), strictly.

    Segmentation heads may differ (another label set: a source model) when ``allow_seg_mismatch``
    (the heads are not analysed); they then keep their random weights. Returns whether they did.

    Raises:
        ArchitectureError: any other difference of keys or shapes.
    """
    state = load_state(ref.path)
    mismatch = compare(state, network)
    if mismatch and not (allow_seg_mismatch and mismatch.only_seg):
        raise ArchitectureError(
            f"{ref.label} ({ref.path}) is not a network of {where}: {mismatch.text()}; every network of "
            f"one analysis must have the architecture these plans build - give the -d/-c/-p it was "
            f"trained with")
    if mismatch:
        load_into_network(network, state, keys=[k for k in state if k in network.state_dict() and not is_seg_key(k)])
        return True
    network.load_state_dict(state, strict=True)
    return False


def load_networks(refs: Sequence[NetworkRef], template: nn.Module, *, device: torch.device | str, where: str,
                  allow_seg_mismatch: bool) -> tuple[list[nn.Module], list[str]]:
    """Copies of ``template`` (the plans' network) holding each reference's weights, on ``device``,
    in eval mode; and a note for every network whose segmentation heads were not loaded."""
    import copy

    networks, notes = [], []
    for ref in refs:
        net = copy.deepcopy(template)
        if load_into(net, ref, where=where, allow_seg_mismatch=allow_seg_mismatch):
            notes.append(f"{ref.label}: segmentation heads differ from the plans' (another label set) and "
                         f"were not loaded; they are not analysed")
        networks.append(net.to(device).eval())
    return networks, notes
