"""Each trainer's settings path: class defaults, allowed keys and start-time checks (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import nnunet_transfer.trainers as T
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.plans.configure import add_configuration

DATA = Path(__file__).parent / "data"


def plans_with(settings: dict) -> dict:
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    plans = add_configuration(plans, base="3d_fullres", new="tiny", features="8,16,32", patch="32,32,32")
    plans["configurations"]["run"] = {"inherits_from": "tiny", "nnunet_transfer": settings}
    plans["continue_training"] = False  # as nnUNetv2_train passes it
    return plans


@pytest.mark.parametrize("trainer, key, value", [
    (T.nnUNetTrainerFinetune, "lr_scale", 0.5),
    (T.nnUNetTrainerFrozenEncoder, "trainable", "decoder"),
    (T.nnUNetTrainerFrozenDecoder, "trainable", "encoder"),
    (T.nnUNetTrainerPartialFT_exceptBottleneck, "trainable", "exceptBottleneck"),
    (T.nnUNetTrainerL2SP, "l2sp_scope", "encoder"),
    (T.nnUNetTrainerL2SP_Sagie, "decoder_init", "random"),
    (T.nnUNetTrainerL2SP_Sagie, "l2sp_alpha", 8.0),
    (T.nnUNetTrainerL2SP_Li, "l2sp_beta", 0.005),
])
def test_class_defaults(trainer, key, value):
    assert getattr(trainer.read_transfer_config(plans_with({}), "run"), key) == value


def test_plans_override_class_defaults():
    cfg = T.nnUNetTrainerL2SP_Sagie.read_transfer_config(plans_with({"l2sp_alpha": "inf"}), "run")
    assert math.isinf(cfg.l2sp_alpha) and cfg.decoder_init == "random"


@pytest.mark.parametrize("trainer, settings, message", [
    (T.nnUNetTrainerFrozenEncoder, {"trainable": "encoder"},
     r"setting 'trainable' is not used by nnUNetTrainerFrozenEncoder"),
    (T.nnUNetTrainerPartialFT, {}, r"nnUNetTrainerPartialFT needs the setting 'trainable'"),
    (T.nnUNetTrainerPartialFT, {"trainable": "blocks:0"}, r"setting 'trainable': .*block 0"),
    (T.nnUNetTrainerPartialFT_deepEncoder, {}, r"preset 'deepEncoder' .* needs a network with at least 4"),
    (T.nnUNetTrainerL2SP, {"l2sp_alpha": "inf", "l2sp_beta": 0.1}, r"l2sp_beta is not supported with it"),
    (T.nnUNetTrainerL2SP, {"l2sp_scope": "blocks:9"}, r"setting 'l2sp_scope': block 9 .* out of range"),
    (T.nnUNetTrainerTransferBase, {"l2sp_alpha": 1.0}, r"'l2sp_alpha' is not used by nnUNetTrainerTransferBase"),
])
def test_start_time_errors(trainer, settings, message):
    with pytest.raises(ConfigError, match=message):
        trainer.read_transfer_config(plans_with(settings), "run")


def test_every_exported_trainer_has_a_unique_non_builtin_name():
    import nnunetv2
    from pathlib import Path as P
    builtin = {p.stem for p in P(nnunetv2.__path__[0], "training", "nnUNetTrainer").rglob("*.py")}
    source = "\n".join(p.read_text() for p in P(nnunetv2.__path__[0], "training", "nnUNetTrainer").rglob("*.py"))
    for name in T.__all__:
        assert name not in builtin and f"class {name}(" not in source, name
    assert len(set(T.__all__)) == len(T.__all__) == 27
