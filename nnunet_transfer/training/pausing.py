"""Pausing a run without changing it (setting ``pause_at``): when to pause, and the random state that travels.

A run with ``pause_at = [k1, k2, ...]`` ends after completed epoch ``k`` (each ``k < num_epochs``) with
``checkpoint_latest.pth`` written, no ``checkpoint_final.pth`` and no final validation; ``transfer_config.json``
then holds ``"paused": {"after_epoch": k, "num_epochs": N}``. ``nnUNetv2_train ... --c`` continues it to the next
pause or to ``num_epochs``. The learning-rate schedule is the one of ``num_epochs`` throughout (nnU-Net steps it
with the epoch index), so nothing but the random state could tell a paused-and-continued run from one never
paused: the checkpoint written at a pause carries the state of Python's, NumPy's and torch's generators (and of
the data loaders' own), and ``--c`` puts it back once nnU-Net has built its data loaders (whose first batch, drawn
on construction, would otherwise shift every later one). With ``nnUNet_n_proc_DA=0`` and ``seed`` the result is
bit-identical on the CPU (tests/test_e2e_pause.py); with background augmentation workers nnU-Net's batches are not
reproducible in the first place.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch

#: ``transfer_state`` entry (and ``transfer_config.json`` key) of a paused run
PAUSED_KEY = "paused"
#: entry of the checkpoint's ``"nnunet_transfer"`` dict holding the random state at the pause
RNG_KEY = "rng_at_pause"


def pause_due(pause_at: Sequence[int] | None, completed: int, num_epochs: int) -> bool:
    """Whether the run pauses now, after ``completed`` epochs (a pause at or past ``num_epochs`` is the end)."""
    return bool(pause_at) and completed in pause_at and completed < num_epochs


def next_stop(pause_at: Sequence[int] | None, completed: int, num_epochs: int) -> int:
    """The completed-epoch count at which a run that has ``completed`` epochs stops next (a pause or the end)."""
    return min([k for k in (pause_at or ()) if completed < k < num_epochs] + [num_epochs])


def _loader_states(loaders: Sequence[Any]) -> list:
    # batchgenerators' DataLoader keeps a RandomState (``rs``) of its own; reachable with nnUNet_n_proc_DA=0 only
    out = []
    for gen in loaders:
        rs = getattr(getattr(gen, "data_loader", None), "rs", None)
        out.append(_np_state(rs.get_state()) if isinstance(rs, np.random.RandomState) else None)
    return out


def _np_state(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos), int(has_gauss),
            float(cached)]


def _np_tuple(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def capture_rng(loaders: Sequence[Any] = ()) -> dict:
    """The state of every generator a training epoch draws from (plain types and tensors: a weights-only load
    reads it)."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": _np_state(np.random.get_state()),
            "torch": torch.get_rng_state(), "loaders": _loader_states(loaders)}


def restore_rng(state: dict, loaders: Sequence[Any] = ()) -> None:
    """Put back what :func:`capture_rng` took (loaders in the same order)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_np_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    for gen, saved in zip(loaders, state.get("loaders") or ()):
        rs = getattr(getattr(gen, "data_loader", None), "rs", None)
        if saved is not None and isinstance(rs, np.random.RandomState):
            rs.set_state(_np_tuple(saved))


def paused_text(paused: dict | None) -> str | None:
    """The log / status line of a paused run (``transfer_state["paused"]``), or None."""
    if not paused:
        return None
    return (f"paused after epoch {paused['after_epoch']} of {paused['num_epochs']} (checkpoint_latest.pth); "
            f"nnUNetv2_train ... --c continues it")
