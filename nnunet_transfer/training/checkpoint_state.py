"""What travels in every checkpoint of our trainers under the key ``"nnunet_transfer"``, and what ``--c`` checks.

A checkpoint holds nnU-Net's own dict (:func:`nnunet_transfer.nnunet_compat.checkpoint_dict`) plus one entry::

    {"nnunet_transfer": {"trainer": class name, "settings": TransferConfig.to_json_dict(),
                         **transfer_state,          # pretrained_loaded/source, parameters, transfer, heads, ...
                         **strategy extras}}        # e.g. "l2sp_anchor", "lora_state", "stage"

On ``--c`` (:func:`check_resume_settings`) only the settings that say how long or how often
(``TransferConfig.resumable_keys()``) may differ from the checkpoint's; everything else defines the experiment.
The trainable set must be the same (:func:`check_same_trainable`), and the saved ``transfer_state`` entries are
restored (:func:`restore_transfer_state`). Plain dictionaries only: testable without a trainer.
"""
from __future__ import annotations

from typing import Any, Mapping

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, TransferError

CHECKPOINT_KEY = "nnunet_transfer"

# Settings that only say how long / how often: they may change between a run and its ``--c`` resume
# (e.g. to train a finished run for longer). Everything else defines the experiment and must not.
RESUMABLE_KEYS = TransferConfig.resumable_keys()


def checkpoint_state(trainer_name: str, settings: Mapping[str, Any], transfer_state: Mapping[str, Any],
                     extras: Mapping[str, Any] | None = None) -> dict:
    """The value of :data:`CHECKPOINT_KEY`: trainer, effective settings, the run's transfer state, strategy extras."""
    return {"trainer": trainer_name, "settings": dict(settings), **transfer_state, **(extras or {})}


def not_ours_message(filename: str, trainer_name: Any) -> str:
    """Why a checkpoint without :data:`CHECKPOINT_KEY` cannot be resumed by our trainers, and what to do."""
    return (f"checkpoint {filename} was not written by an nnunet_transfer trainer (no {CHECKPOINT_KEY!r} entry); "
            f"resume it with the trainer that wrote it ({trainer_name}), or start a new run with -pretrained_weights")


def check_resume_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Refuse (:class:`ConfigError`) settings that changed outside :data:`RESUMABLE_KEYS`; return the resumable
    ones that changed, ``{key: (checkpoint, now)}``, for the log. A key the checkpoint lacks (an older release)
    counts as unchanged."""
    changed = {k: (saved.get(k), now.get(k)) for k in now
               if k not in RESUMABLE_KEYS and saved.get(k, now.get(k)) != now.get(k)}
    if changed:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs plans {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"cannot resume with changed settings ({diff}); only "
                          f"{sorted(RESUMABLE_KEYS)} may change on --c. Restore the plans "
                          f"configuration or train into a new configuration "
                          f"(nnunet_transfer configure -n NEW ...)")
    return {k: (saved.get(k), now[k]) for k in RESUMABLE_KEYS if k in saved and k in now and saved[k] != now[k]}


def check_same_trainable(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> None:
    """Refuse (:class:`TransferError`) a resume whose trainable count or blocks differ from the checkpoint's
    (``transfer_state["parameters"]`` of both)."""
    saved, now = saved or {}, now or {}
    for key in ("trainable", "trainable_blocks"):
        if key in saved and key in now and saved[key] != now[key]:
            raise TransferError(f"the checkpoint was trained with {key}={saved[key]!r} but this run "
                                f"would use {now[key]!r}; resume with the same trainer and settings")


def restore_transfer_state(transfer_state: dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Check the trainable set, then take every entry ``transfer_state`` knows from the checkpoint (in place)."""
    check_same_trainable(saved.get("parameters"), transfer_state.get("parameters"))
    for k in transfer_state:
        if k in saved:
            transfer_state[k] = saved[k]


__all__ = ["CHECKPOINT_KEY", "RESUMABLE_KEYS", "checkpoint_state", "not_ours_message", "check_resume_settings",
           "check_same_trainable", "restore_transfer_state"]
