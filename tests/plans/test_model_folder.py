"""A released model folder as the source: reading it, ``plans transfer -s MODEL_FOLDER`` without any source
data, the checkpoint it names, and the freezing trainers' refusal of blocks that did not come from it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.data import TARGET, make_dataset
from nnunet_transfer.errors import ConfigError, DataError, TransferError
from nnunet_transfer.plans.model_folder import is_path_argument, load_model_folder, resolve_checkpoint
from nnunet_transfer.plans.transfer import transfer_plans

DATA = Path(__file__).parent.parent / "data"
TGT = "Dataset902_Target"
MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def make_model(root: Path, folds=("fold_0",), files=("plans.json", "dataset.json")) -> Path:
    """What nnUNetv2_install_pretrained_model_from_zip leaves under nnUNet_results (checkpoints are stubs here)."""
    model = root / "Dataset777_Released" / MODEL
    model.mkdir(parents=True)
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    plans["dataset_name"] = "Dataset777_Released"
    if "plans.json" in files:
        (model / "plans.json").write_text(json.dumps(plans))
    if "dataset.json" in files:
        shutil.copy(DATA / "dataset_ct2labels.json", model / "dataset.json")
    for f in folds:
        (model / f).mkdir()
        (model / f / "checkpoint_final.pth").write_bytes(b"stub")
    return model


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    make_dataset(tmp_path / "raw", 902, "Target", TARGET, n_train=2, physical_size=8.0)
    (tmp_path / "pre" / TGT).mkdir()
    fp = {"spacings": [[1.5, 1.0, 1.0]] * 2, "shapes_after_crop": [[5, 8, 8]] * 2,
          "foreground_intensity_properties_per_channel": {"0": {
              "max": 300.0, "mean": 110.0, "median": 105.0, "min": -20.0, "percentile_00_5": 0.5,
              "percentile_99_5": 250.0, "std": 45.0}}, "median_relative_size_after_cropping": 1.0}
    (tmp_path / "pre" / TGT / "dataset_fingerprint.json").write_text(json.dumps(fp))
    return tmp_path


def test_reading_a_model_folder_and_a_fold_of_it(tmp_path):
    model = make_model(tmp_path, folds=("fold_0", "fold_3"))
    m = load_model_folder(model)
    assert (m.trainer, m.plans_identifier, m.configuration, m.source_name) == \
        ("nnUNetTrainer", "nnUNetPlans", "3d_fullres", "Dataset777_Released")
    assert [f.name for f in m.folds] == ["fold_0", "fold_3"] and m.checkpoint == model / "fold_0" / "checkpoint_final.pth"
    chosen = load_model_folder(model / "fold_3")
    assert chosen.path == model and chosen.checkpoint == model / "fold_3" / "checkpoint_final.pth"
    assert resolve_checkpoint(model / "fold_3") == model / "fold_3" / "checkpoint_final.pth"
    with pytest.raises(DataError, match=r"has 2 trained folds \(fold_0, fold_3\); choose one"):
        resolve_checkpoint(model)
    assert is_path_argument(model) and not is_path_argument("902") and not is_path_argument("Dataset902_Target")


@pytest.mark.parametrize("kw, message", [
    (dict(files=("dataset.json",)), r"model folder .* has no plans.json \(it holds dataset.json, fold_0/\); expected "
                                    r"Trainer__Plans__Configuration/ with plans.json"),
    (dict(files=("plans.json",)), r"has no dataset.json"),
    (dict(folds=()), r"model folder .* has no trained fold: no fold_\*/checkpoint_final.pth \(it holds dataset.json, "
                     r"plans.json\)"),
])
def test_broken_model_folders_say_what_is_missing(tmp_path, kw, message):
    model = make_model(tmp_path, **kw)
    with pytest.raises(DataError, match=message):
        load_model_folder(model)


def test_resolve_names_a_model_folder_without_folds(tmp_path):
    model = make_model(tmp_path, folds=())
    (model / "fold_0").mkdir()
    (model / "fold_0" / "checkpoint_latest.pth").write_bytes(b"")
    with pytest.raises(DataError, match=r"model folder .* has no trained fold"):
        resolve_checkpoint(model)
    with pytest.raises(DataError, match=r"pretrained weights .*nope not found"):
        resolve_checkpoint(tmp_path / "nope", what="pretrained weights")


def test_transfer_from_a_model_folder_needs_no_source_data(env):
    model = make_model(env / "res")
    assert not any((env / "pre").glob("Dataset777*")) and not any((env / "raw").glob("Dataset777*"))
    result = transfer_plans(model, 902)
    plans = json.loads((env / "pre" / TGT / "nnUNetPlans.json").read_text())
    source = json.loads((model / "plans.json").read_text())
    assert plans["configurations"] == source["configurations"] and plans["dataset_name"] == TGT
    assert plans["foreground_intensity_properties_per_channel"]["0"]["mean"] == 110.0  # the target's own
    assert (env / "pre" / TGT / "dataset.json").is_file()
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    assert result.next_commands == [
        "nnUNetv2_preprocess -d 902 -plans_name nnUNetPlans -c 3d_fullres",
        f"nnunet_transfer weights check {ckpt} -d 902 -c 3d_fullres -p nnUNetPlans",
        f"nnUNetv2_train 902 3d_fullres 0 -p nnUNetPlans -tr nnUNetTrainerFinetune -pretrained_weights {ckpt}"]
    assert result.text().startswith(f"plans {model}/plans.json (Dataset777_Released, nnUNetPlans) -> ")


def test_transfer_from_a_fold_folder_names_that_fold(env):
    model = make_model(env / "res", folds=("fold_0", "fold_2"))
    result = transfer_plans(model, 902)
    assert any("the model has 2 trained folds (fold_0, fold_2); the commands use fold_0" in n for n in result.notes)
    result = transfer_plans(model / "fold_2", 902, force=True)
    assert result.next_commands[-1].endswith(f"-pretrained_weights {model / 'fold_2' / 'checkpoint_final.pth'}")


def test_transfer_from_a_model_folder_refuses_what_does_not_fit(env, capsys):
    model = make_model(env / "res")
    with pytest.raises(ConfigError, match=r"-sp Other does not match the model folder .*, whose plans are "
                                          r"'nnUNetPlans'; leave -sp out"):
        transfer_plans(model, 902, source_plans="Other")
    with pytest.raises(ConfigError, match=r"configuration '3d_lowres' is not in the model folder"):
        transfer_plans(model, 902, configuration="3d_lowres")
    broken = make_model(env / "other", folds=())
    assert main(["plans", "transfer", "-s", str(broken), "-t", "902"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no trained fold" in err
    assert not (env / "pre" / TGT / "nnUNetPlans.json").exists()  # nothing written
    assert main(["plans", "transfer", "-s", str(env / "missing" / "model"), "-t", "902"]) == 2
    err = capsys.readouterr().err
    assert f"model folder {env / 'missing' / 'model'} not found; expected Trainer__Plans__Configuration/" in err


# --------------------------------------------------------------------------- freezing refusal
def _checked(fresh: dict[int, list[str]], n_stages: int = 3):
    """A PretrainedFile as check_pretrained returns it for an adapted file with these fresh parameters."""
    from nnunet_transfer.blocks import BlockModel
    from nnunet_transfer.training.pretrained import PretrainedFile
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, n_stages, [4, 8, 16][:n_stages], torch.nn.Conv3d, 3, [1, 2, 2][:n_stages], 2, 2, 1,
                        True, torch.nn.InstanceNorm3d, {"affine": True}, nonlin=torch.nn.LeakyReLU,
                        deep_supervision=True)
    model = BlockModel.from_network(net)
    blocks = [{"block": b.number, "share": 0.5, "fresh": [n for n in b.param_names if n in fresh.get(b.number, [])]}
              for b in model.blocks]
    return PretrainedFile("a.pth", Path("a.pth"), transfer={"kind": "adapted", "blocks": blocks}, blocks=model), model


def _trainer(cls, **settings):
    from nnunet_transfer.config import TransferConfig

    trainer = object.__new__(cls)  # the refusal needs only the settings (it runs before nnU-Net's __init__)
    trainer.transfer_config = TransferConfig.from_mapping(settings, defaults=cls.transfer_defaults)
    return trainer


def test_freezing_trainers_refuse_to_freeze_blocks_not_from_the_checkpoint():
    from nnunet_transfer.trainers.freezing import (nnUNetTrainerFrozenDecoder, nnUNetTrainerFrozenEncoder,
                                                   nnUNetTrainerPartialFT, nnUNetTrainerPartialFT_bottleneck)
    from nnunet_transfer.training.pretrained import frozen_not_from_source

    checked, model = _checked({})
    bottleneck = list(model.block(3).param_names)
    checked, _ = _checked({3: bottleneck[:2]})
    assert frozen_not_from_source(checked, "decoder") == {3: bottleneck[:2]}
    assert frozen_not_from_source(checked, "encoder") == {}
    assert frozen_not_from_source(checked, None) == {}
    with pytest.raises(TransferError, match=r"nnUNetTrainerFrozenEncoder would freeze parameters that did not come "
                                            r"from a.pth .* block 3: 2 tensor\(s\), e.g. encoder.stages.2.0.convs.0."
                                            r"conv.weight; frozen, they stay random.*--set freeze_reinit=true"):
        _trainer(nnUNetTrainerFrozenEncoder).check_pretrained_file(checked)
    _trainer(nnUNetTrainerFrozenEncoder, freeze_reinit=True).check_pretrained_file(checked)  # allowed
    _trainer(nnUNetTrainerFrozenDecoder).check_pretrained_file(checked)  # the bottleneck trains
    _trainer(nnUNetTrainerPartialFT_bottleneck).check_pretrained_file(checked)
    with pytest.raises(TransferError, match="nnUNetTrainerPartialFT would freeze"):
        _trainer(nnUNetTrainerPartialFT, trainable="blocks:1,2").check_pretrained_file(checked)
    same_plans, _ = _checked({})
    same_plans.transfer = {"kind": "same-plans"}
    _trainer(nnUNetTrainerFrozenEncoder).check_pretrained_file(same_plans)
