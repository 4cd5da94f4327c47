"""Settings: every bad value is one clear ConfigError naming the key, the value and what is valid."""
from __future__ import annotations

import math

import pytest

from nnunet_transfer.cli.configure import parse_settings
from nnunet_transfer.config import TransferConfig, parse_cli_value
from nnunet_transfer.errors import ConfigError

BAD = [
    # (settings, message fragment)
    ({"num_epochs": -1}, r"setting 'num_epochs' must be an integer >= 1, got -1"),
    ({"num_epochs": 0}, r"setting 'num_epochs' must be an integer >= 1, got 0"),
    ({"num_epochs": 2.5}, r"setting 'num_epochs' must be an integer >= 1, got 2.5"),
    ({"num_epochs": True}, r"setting 'num_epochs' must be an integer >= 1, got True"),
    ({"num_epochs": "10"}, r"setting 'num_epochs' must be an integer >= 1, got '10'"),
    ({"num_iterations_per_epoch": -5}, r"'num_iterations_per_epoch' must be an integer >= 1, got -5"),
    ({"num_val_iterations_per_epoch": None}, r"'num_val_iterations_per_epoch' must be an integer >= 1"),
    ({"lr_scale": -0.5}, r"setting 'lr_scale' must be a finite number > 0, got -0.5"),
    ({"lr_scale": 0}, r"setting 'lr_scale' must be a finite number > 0, got 0"),
    ({"lr_scale": math.nan}, r"setting 'lr_scale' must be a finite number > 0, got nan"),
    ({"lr_scale": math.inf}, r"setting 'lr_scale' must be a finite number > 0, got inf"),
    ({"lr_scale": "0.5"}, r"setting 'lr_scale' must be a finite number > 0, got '0.5'"),
    ({"seed": -1}, r"setting 'seed' must be an integer >= 0, got -1"),
    ({"seed": 1.0}, r"setting 'seed' must be an integer >= 0, got 1.0"),
    ({"warmup_epochs": -2}, r"setting 'warmup_epochs' must be an integer >= 0, got -2"),
    ({"snapshot_every": -1}, r"setting 'snapshot_every' must be an integer >= 0, got -1"),
    ({"save_every": 0}, r"setting 'save_every' must be an integer >= 1, got 0"),
    ({"l2sp_alpha": -1.0}, r"setting 'l2sp_alpha' must be a number >= 0 \(or inf\), got -1.0"),
    ({"l2sp_alpha": math.nan}, r"setting 'l2sp_alpha' must be a number >= 0 \(or inf\), got nan"),
    ({"decoder_init": "zeros"}, r"setting 'decoder_init' must be one of \['pretrained', 'random'\]"),
    ({"freeze_seg": 1}, r"setting 'freeze_seg' must be true or false, got 1"),
    ({"trainable": ""}, r"setting 'trainable' must be a non-empty block spec string"),
    ({"pause_at": [3, 2]}, r"setting 'pause_at' must be null or a non-empty list of increasing epoch counts >= 1 "
                           r"\(e.g. \[10, 30\]; text 10,30\), got \[3, 2\]"),
    ({"pause_at": [0]}, r"setting 'pause_at' must be null or a non-empty list of increasing epoch counts"),
    ({"pause_at": []}, r"setting 'pause_at' must be null or a non-empty list of increasing epoch counts"),
    ({"epochs": 10}, r"unknown setting 'epochs'; valid settings for this trainer: \['allow_random_anchor'"),
]


@pytest.mark.parametrize("settings, message", BAD, ids=[str(s) for s, _ in BAD])
def test_bad_settings_are_rejected_with_key_value_and_valid_range(settings, message):
    with pytest.raises(ConfigError, match=message):
        TransferConfig.from_mapping(settings)


def test_keys_a_trainer_does_not_use_are_rejected():
    with pytest.raises(ConfigError, match=r"setting 'l2sp_alpha' is not used by nnUNetTrainerX; valid "
                                          r"settings for nnUNetTrainerX: \['lr_scale', 'num_epochs'\]"):
        TransferConfig.from_mapping({"l2sp_alpha": 1.0}, allowed={"num_epochs", "lr_scale"},
                                    owner="nnUNetTrainerX")


def test_settings_must_be_an_object():
    with pytest.raises(ConfigError, match=r"must be a JSON object of settings, got list"):
        TransferConfig.from_mapping([("num_epochs", 3)])


def test_defaults_then_class_defaults_then_plans():
    cfg = TransferConfig.from_mapping({"num_epochs": 3}, defaults={"lr_scale": 0.5, "num_epochs": 7})
    assert (cfg.num_epochs, cfg.lr_scale, cfg.num_iterations_per_epoch) == (3, 0.5, 250)


def test_infinite_alpha_round_trips_through_json():
    cfg = TransferConfig.from_mapping({"l2sp_alpha": "inf"})
    assert math.isinf(cfg.l2sp_alpha)
    d = cfg.to_json_dict()
    assert d["l2sp_alpha"] == "inf"
    assert TransferConfig.from_mapping(d) == cfg


@pytest.mark.parametrize("key, text, value", [
    ("num_epochs", "12", 12), ("lr_scale", "0.25", 0.25), ("seed", "null", None),
    ("freeze_seg", "true", True), ("l2sp_alpha", "inf", "inf"), ("trainable", "blocks:1,2", "blocks:1,2"),
])
def test_cli_values_are_parsed_to_json_types(key, text, value):
    assert parse_cli_value(key, text) == value


@pytest.mark.parametrize("items, message", [
    (["num_epochs"], r"--set expects KEY=VALUE, got 'num_epochs'"),
    (["=3"], r"--set expects KEY=VALUE"),
    (["epochs=3"], r"unknown setting 'epochs'; valid settings: \["),
    (["lr_scale=nan"], r"setting 'lr_scale' cannot be NaN, got 'nan'"),
])
def test_cli_set_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_settings(items)


def test_pause_at_text_and_single_epoch():
    assert parse_cli_value("pause_at", "10, 30") == [10, 30]
    assert parse_cli_value("pause_at", "5") == [5]
    assert parse_cli_value("pause_at", "null") is None
    assert TransferConfig.from_mapping({"pause_at": 4}).pause_at == [4]
    assert "pause_at" in TransferConfig.resumable_keys()  # a pause says when, not what: --c may change it
