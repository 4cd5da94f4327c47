"""Each trainer's settings path: class defaults, allowed keys and start-time checks (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import nnunet_transfer.trainers as T
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.plans.configure import add_configuration

from inprocess import build  # noqa: F401 (a fixture)

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
    # Sagie et al. 2021 change the objective only, no learning rate: nnU-Net's, not L2SP's halved one
    (T.nnUNetTrainerL2SP, "lr_scale", 0.5),
    (T.nnUNetTrainerL2SP_Sagie, "lr_scale", 1.0),
    (T.nnUNetTrainerL2SP_Li, "l2sp_beta", 0.005),
    # Karimi: the last layer from the checkpoint, the halved LR of every transfer run
    (T.nnUNetTrainerFrozenDecoder, "heads", "by-name"),
    (T.nnUNetTrainerFrozenDecoder, "lr_scale", 0.5),
    (T.nnUNetTrainerFrozenDecoderAndHeads, "lr_scale", 0.5),
    # Amiri: the output layer is block 2N-1's; without that block it stays frozen at the pretrained weights
    (T.nnUNetTrainerPartialFT_first, "freeze_seg", True),
    (T.nnUNetTrainerPartialFT_first, "heads", "by-name"),
    (T.nnUNetTrainerPartialFT_last, "freeze_seg", False),
    (T.nnUNetTrainerPartialFT_last, "heads", "by-name"),
    (T.nnUNetTrainerTransferBase, "deep_supervision", True),
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
    (T.nnUNetTrainerPartialFT_first, {"heads": "new"},
     r"nnUNetTrainerPartialFT_first freezes the segmentation heads at the pretrained weights \(Amiri et al.: the "
     r"output layer belongs to block 2N-1, which this strategy leaves out\), so they must come from the checkpoint, "
     r"but heads=new would freeze random heads; .*--set freeze_seg=false"),
    (T.nnUNetTrainerPartialFT, {"trainable": "encoder", "freeze_seg": True},
     r"nnUNetTrainerPartialFT freezes the segmentation heads, so they must come from the checkpoint, but heads=new"),
    (T.nnUNetTrainerTransferBase, {"deep_supervision": "no"}, r"setting 'deep_supervision' must be true or false"),
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
    assert len(set(T.__all__)) == len(T.__all__) == 29


def test_new_heads_train_when_asked():
    # the way out the refusals name: new heads that train (not Amiri's strategy, but a valid run)
    cfg = T.nnUNetTrainerPartialFT_first.read_transfer_config(plans_with({"freeze_seg": False, "heads": "new"}), "run")
    assert (cfg.freeze_seg, cfg.heads) == (False, "new")
    assert T.nnUNetTrainerPartialFT_first.needs_pretrained(cfg) is None


def test_by_name_heads_fall_back_to_new_only_where_the_strategy_says_so():
    from nnunet_transfer.training.heads import plan_heads

    source = {"labels": {"background": 0, "liver": 1}}
    target = {"labels": {"background_": 0, "organ": 1, "lesion": 2}}
    with pytest.raises(ConfigError, match=r"heads=by-name: the checkpoint's labels \['background', 'liver'\] and "
                                          r"the target's .* share no name"):
        plan_heads("by-name", source, target, checkpoint="a.pth")
    plan = plan_heads("by-name", source, target, checkpoint="a.pth", fallback_new=True)
    assert (plan.copied, plan.new) == ([], ["background_", "organ", "lesion"])
    assert plan.text() == ("heads (by-name): copied nothing; new: background_, organ, lesion (the checkpoint's "
                           "labels ['background', 'liver'] share no name with the target's ['background_', "
                           "'lesion', 'organ']: every head row starts new)")
    assert plan.to_dict()["fallback"] == plan.fallback
    # a name in common: copied as before, the fallback does not apply
    plan = plan_heads("by-name", {"labels": {"background": 0, "organ": 1}}, target, checkpoint="a.pth",
                      fallback_new=True)
    assert ([c["target"] for c in plan.copied], plan.new, plan.fallback) == (["organ"], ["background_", "lesion"], "")
    assert [c.heads_fallback_new for c in (T.nnUNetTrainerFinetune, T.nnUNetTrainerFrozenDecoder,
                                           T.nnUNetTrainerPartialFT_first, T.nnUNetTrainerPartialFT)] == [
        False, True, True, False]


def test_frozen_heads_that_nothing_transfers_are_refused_with_the_way_out():
    from nnunet_transfer.errors import TransferError
    from nnunet_transfer.training.heads import plan_heads
    from nnunet_transfer.training.pretrained import PretrainedFile

    target = {"labels": {"background": 0, "organ": 1, "cyst": 2}}
    plan = plan_heads("by-name", {"labels": {"background": 0, "organ": 1}}, target, checkpoint="a.pth",
                      fallback_new=True)
    checked = PretrainedFile("a.pth", Path("a.pth"), plan, {}, {"background": 0, "organ": 1})
    for cls, settings, refused in [(T.nnUNetTrainerPartialFT_first, {}, True),
                                   (T.nnUNetTrainerPartialFT_first, {"freeze_seg": False}, False),
                                   (T.nnUNetTrainerPartialFT_last, {}, False),
                                   (T.nnUNetTrainerFrozenDecoder, {}, False),
                                   (T.nnUNetTrainerFrozenDecoderAndHeads, {}, True)]:
        trainer = object.__new__(cls)  # the refusal needs only the settings (it runs before nnU-Net's __init__)
        trainer.transfer_config = cls.read_transfer_config(plans_with(settings), "run")
        if not refused:
            trainer.check_pretrained_file(checked)
            continue
        with pytest.raises(TransferError) as e:
            trainer.check_pretrained_file(checked)
        assert f"{cls.__name__} freezes the segmentation heads" in str(e.value)
        assert "target label(s) cyst have no row in a.pth (its labels: background, organ)" in str(e.value)
        assert "\n" not in str(e.value)
        if cls is T.nnUNetTrainerPartialFT_first:
            assert str(e.value).endswith("Fix: map them (nnunet_transfer configure ... --set heads=TARGET:SOURCE,...), "
                                         "or train new heads with --set freeze_seg=false (not the paper's strategy)")


def test_sagie_trains_at_nnunets_learning_rate(build):
    # Sagie et al. 2021 add the penalty and change no learning rate: every group starts at nnU-Net's 1e-2
    # (nnUNetTrainerL2SP keeps Finetune's halved rate so that its alpha = 0 reproduces Finetune)
    sagie, l2sp = (build(cls, {"allow_random_anchor": True})
                   for cls in (T.nnUNetTrainerL2SP_Sagie, T.nnUNetTrainerL2SP))
    assert sagie.initial_lr == 1e-2 and {g["lr"] for g in sagie.optimizer.param_groups} == {1e-2}
    assert l2sp.initial_lr == 5e-3 and {g["lr"] for g in l2sp.optimizer.param_groups} == {5e-3}
