"""Weights-only training snapshots for representation analysis.

Layout in a fold folder::

    snapshots/epoch_0000.pth   # the network as training starts (pretrained weights already loaded)
    snapshots/epoch_0005.pth   # after 5 completed epochs
    snapshots/index.json       # [{"epoch", "file", "mean_fg_dice", "ema_fg_dice"}, ...]

and beside them, written by every trainer of this package whether or not snapshots are on::

    start_weights.pth          # START_FILE: the network as training started, in the snapshot layout

``epoch`` counts *completed* epochs, so epoch 0 is the initial state. Each file holds
``{"network_weights": state_dict (CPU, no wrapper prefixes), "epoch": int, "trainer_name": str}``,
which is also what nnU-Net's ``-pretrained_weights`` reads, so any snapshot can seed another run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnunet_transfer.checkpoints import clean_state_dict, load_state
from nnunet_transfer.fileio import save_atomic, write_atomic
from nnunet_transfer.netutil import unwrap

SNAPSHOT_DIR = "snapshots"
INDEX_FILE = "index.json"
#: the network as training started (pretrained weights, transferred heads, re-initialisations applied);
#: the same layout as a snapshot, so ``-pretrained_weights`` and ``analyze`` read it
START_FILE = "start_weights.pth"


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pth"


def _atomic_write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def read_index(fold_folder: str | Path) -> list[dict]:
    path = Path(fold_folder) / SNAPSHOT_DIR / INDEX_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def save_weights(network: nn.Module, path: str | Path, *, trainer_name: str, epoch: int) -> Path:
    """Write ``{"network_weights", "epoch", "trainer_name"}`` atomically (the snapshot file layout)."""
    return save_atomic(path, {"network_weights": clean_state_dict(unwrap(network).state_dict()), "epoch": epoch,
                              "trainer_name": trainer_name})


def save_snapshot(network: nn.Module, fold_folder: str | Path, epoch: int, *, trainer_name: str,
                  mean_fg_dice: float | None = None, ema_fg_dice: float | None = None,
                  same_as: str | Path | None = None) -> Path:
    """Write one snapshot and record it in the index (replacing an entry for the same epoch).

    ``same_as``: a file already holding exactly these weights (the run's start weights), hard-linked
    instead of written again where the file system allows it.
    """
    folder = Path(fold_folder) / SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / snapshot_name(epoch)
    linked = False
    if same_as is not None:
        try:
            if path.exists():
                path.unlink()
            os.link(same_as, path)
            linked = True
        except OSError:
            linked = False
    if not linked:
        save_weights(network, path, trainer_name=trainer_name, epoch=epoch)
    index = [e for e in read_index(fold_folder) if e["epoch"] != epoch]
    index.append({"epoch": epoch, "file": path.name,
                  "mean_fg_dice": None if mean_fg_dice is None else float(mean_fg_dice),
                  "ema_fg_dice": None if ema_fg_dice is None else float(ema_fg_dice)})
    _atomic_write_json(folder / INDEX_FILE, sorted(index, key=lambda e: e["epoch"]))
    return path


def load_snapshot_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_state(path)
