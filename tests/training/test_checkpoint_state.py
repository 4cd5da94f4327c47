"""The checkpoint's "nnunet_transfer" entry and the checks of a --c resume, on plain dictionaries."""
from __future__ import annotations

import pytest

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, TransferError
from nnunet_transfer.training.checkpoint_state import (CHECKPOINT_KEY, RESUMABLE_KEYS, check_resume_settings,
                                                       checkpoint_state, not_ours_message, restore_transfer_state)


def settings(**changes) -> dict:
    return TransferConfig.from_mapping(changes).to_json_dict()


def test_the_entry_holds_trainer_settings_state_and_extras_in_that_order_of_precedence():
    state = checkpoint_state("T", settings(), {"pretrained_loaded": True, "stage": 0}, {"stage": 2, "lora_state": {}})
    assert state["trainer"] == "T" and state["settings"] == settings()
    assert (state["pretrained_loaded"], state["stage"], state["lora_state"]) == (True, 2, {})


def test_resume_allows_only_schedule_length_settings_to_change():
    assert {"num_epochs", "save_every"} <= RESUMABLE_KEYS and "lr_scale" not in RESUMABLE_KEYS
    assert check_resume_settings(settings(), settings()) == {}
    assert check_resume_settings(settings(num_epochs=5), settings(num_epochs=9)) == {"num_epochs": (5, 9)}
    with pytest.raises(ConfigError, match=r"cannot resume with changed settings \(lr_scale: checkpoint 0.5 vs "
                                          r"plans 1.0\).*nnunet_transfer configure -n NEW"):
        check_resume_settings(settings(lr_scale=0.5), settings(lr_scale=1.0))
    old = {k: v for k, v in settings().items() if k != "lr_scale"}  # a key an older release did not write
    assert check_resume_settings(old, settings(lr_scale=0.25)) == {}


def test_restore_takes_known_entries_and_refuses_another_trainable_set():
    now = {"parameters": {"trainable": 10, "trainable_blocks": [1, 2]}, "heads": None, "stopping": None}
    saved = {"parameters": {"trainable": 10, "trainable_blocks": [1, 2], "total": 20}, "heads": {"copied": []},
             "stopping": {"best": 0.1}, "l2sp_anchor": {}, "trainer": "T"}
    restore_transfer_state(now, saved)
    assert now == {"parameters": saved["parameters"], "heads": {"copied": []}, "stopping": {"best": 0.1}}
    with pytest.raises(TransferError, match=r"trained with trainable_blocks=\[1\] but this run would use \[1, 2\]"):
        restore_transfer_state({"parameters": {"trainable": 10, "trainable_blocks": [1, 2]}},
                               {"parameters": {"trainable": 10, "trainable_blocks": [1]}})


def test_a_checkpoint_of_another_trainer_is_explained():
    msg = not_ours_message("c.pth", "nnUNetTrainer")
    assert f"no {CHECKPOINT_KEY!r} entry" in msg and "(nnUNetTrainer)" in msg and msg.startswith("checkpoint c.pth ")
