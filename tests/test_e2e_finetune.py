"""End to end through nnU-Net's own programs: pretrain → fine-tune → resume → predict."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.data import LABELS
from nnunet_transfer.experiments.metrics import dice
from nnunet_transfer.training.snapshots import read_index

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, assert_one_line_error, load_checkpoint

pytestmark = pytest.mark.slow

FT = "ft"
FT_SETTINGS = {**QUICK_SETTINGS, "snapshot_every": 1, "warmup_epochs": 1}


@pytest.fixture(scope="module")
def finetuned(workspace):
    workspace.configure(TARGET_ID, TINY, FT, FT_SETTINGS)
    fold = workspace.train(TARGET_ID, FT, "nnUNetTrainerFinetune", pretrained=workspace.source_checkpoint)
    # keep what the first run wrote before the resume test extends it
    first = {"final": load_checkpoint(fold / "checkpoint_final.pth"),
             "config": json.loads((fold / "transfer_config.json").read_text()),
             "start": load_checkpoint(fold / "snapshots" / "epoch_0000.pth")}
    return workspace, fold, first


def test_finetune_writes_checkpoints_and_effective_settings(finetuned):
    ws, fold, first = finetuned
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "transfer_config.json"):
        assert (fold / name).is_file(), name
    expected = TransferConfig.from_mapping(FT_SETTINGS, defaults={"lr_scale": 0.5}).to_json_dict()
    assert first["config"]["settings"] == expected
    assert first["config"]["trainer"] == "nnUNetTrainerFinetune"
    assert first["config"]["pretrained_loaded"] is True
    assert first["config"]["pretrained_source"] == str(ws.source_checkpoint)
    assert first["final"]["nnunet_transfer"]["settings"] == expected
    assert first["final"]["current_epoch"] == FT_SETTINGS["num_epochs"]
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "pretrained weights loaded from" in log
    # lr_scale 0.5 halves nnU-Net's 1e-2; warm-up epoch 0 runs at initial_lr * 1/1
    lrs = first["final"]["logging"]["lrs"]
    assert lrs[0] == pytest.approx(0.005)
    assert lrs[1] == pytest.approx(0.005 * (1 - 1 / 2) ** 0.9)


def test_initial_state_is_the_pretrained_checkpoint(finetuned):
    ws, fold, first = finetuned
    source = load_checkpoint(ws.source_checkpoint)["network_weights"]
    start = first["start"]["network_weights"]
    final = first["final"]["network_weights"]
    body = [k for k in start if ".seg_layers." not in k]
    assert len(body) > 20
    mismatched = [k for k in body if not torch.equal(start[k], source[k])]
    assert not mismatched, f"not loaded from the source: {mismatched}"
    # the run then trained: weights moved away from the pretrained ones
    moved = [k for k in body if k.endswith("conv.weight") and not torch.equal(final[k], start[k])]
    assert moved


def test_resume_with_c_continues_training(finetuned):
    ws, fold, first = finetuned
    ws.configure(TARGET_ID, TINY, FT, {**FT_SETTINGS, "num_epochs": 3})
    ws.train(TARGET_ID, FT, "nnUNetTrainerFinetune", cont=True)
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    assert ckpt["current_epoch"] == 3
    assert len(ckpt["logging"]["train_losses"]) == 3
    # the state of the first run travelled through the checkpoint
    assert ckpt["nnunet_transfer"]["pretrained_loaded"] is True
    assert ckpt["nnunet_transfer"]["settings"]["num_epochs"] == 3
    assert [e["epoch"] for e in read_index(fold)] == [0, 1, 2, 3]
    # the start snapshot is not overwritten on resume
    start_again = torch.load(fold / "snapshots" / "epoch_0000.pth", weights_only=False)["network_weights"]
    assert all(torch.equal(start_again[k], v) for k, v in first["start"]["network_weights"].items())
    logs = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "resuming with changed schedule settings" in logs


def test_resume_refuses_changed_strategy_settings(finetuned):
    ws, fold, _ = finetuned
    ws.configure(TARGET_ID, TINY, FT, {**FT_SETTINGS, "num_epochs": 3, "lr_scale": 0.1})
    try:
        proc = ws.run_expect_failure(["nnUNetv2_train", TARGET_ID, FT, 0, "-tr", "nnUNetTrainerFinetune",
                                      "-device", "cpu", "--c"], train=True)
    finally:
        ws.configure(TARGET_ID, TINY, FT, {**FT_SETTINGS, "num_epochs": 3})
    assert proc.returncode != 0
    assert "cannot resume with changed settings (lr_scale: checkpoint 0.5 vs plans 0.1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_with_finetune_trainer(finetuned, tmp_path):
    ws, fold, _ = finetuned
    # nnU-Net's default path, with preprocessing and export worker processes (the other tests: sequential)
    out = ws.predict(TARGET_ID, FT, "nnUNetTrainerFinetune", tmp_path / "pred", processes=1)
    images = sorted((ws.root / "raw" / ws.target / "imagesTs").glob("*.nii.gz"))
    assert images
    scores, chance = [], []
    for img_path in images:
        case = img_path.name.replace("_0000.nii.gz", ".nii.gz")
        pred = np.asarray(nib.load(out / case).dataobj)
        img = nib.load(img_path)
        ref = np.asarray(nib.load(ws.root / "raw" / ws.target / "labelsTs" / case).dataobj)
        assert pred.shape == img.shape
        assert set(np.unique(pred)) <= set(LABELS.values())
        scores.append(dice(pred, ref, LABELS["organ"]))
        # chance: as many voxels labelled organ as the prediction, placed at random
        rng = np.random.default_rng(0)
        shuffled = rng.permutation(pred.ravel()).reshape(pred.shape)
        chance.append(dice(shuffled, ref, LABELS["organ"]))
    assert np.mean(scores) > max(0.3, 3 * np.mean(chance)), (scores, chance)


def test_finetune_without_pretrained_weights_warns(workspace):
    workspace.configure(TARGET_ID, TINY, "ft_nopre", {**QUICK_SETTINGS, "num_epochs": 1})
    fold = workspace.train(TARGET_ID, "ft_nopre", "nnUNetTrainerFinetune")
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "WARNING nnunet_transfer: nnUNetTrainerFinetune started WITHOUT pretrained weights" in log
    assert json.loads((fold / "transfer_config.json").read_text())["pretrained_loaded"] is False


BAD_SETTINGS = [
    ({"num_epochs": -1}, "setting 'num_epochs' must be an integer >= 1, got -1"),
    ({"lr_scale": "fast"}, "setting 'lr_scale' must be a finite number > 0, got 'fast'"),
    ({"learning_rate": 0.1}, "unknown setting 'learning_rate'; valid settings for nnUNetTrainerFinetune"),
    ({"trainable": "encoder"}, "setting 'trainable' is not used by nnUNetTrainerFinetune"),
]


def _bad_train(i: int) -> list:
    return ["nnUNetv2_train", TARGET_ID, f"bad{i}", 0, "-tr", "nnUNetTrainerFinetune", "-device", "cpu"]


@pytest.fixture(scope="module")
def bad_settings(workspace):
    """Each bad configuration through the real ``nnUNetv2_train`` (the first) and built by nnU-Net in one
    process (all of them; ``Workspace.refusals``)."""
    ws = workspace
    with ws.unchecked_configurations(TARGET_ID, TINY, {f"bad{i}": s for i, (s, _) in enumerate(BAD_SETTINGS)}):
        program = ws.run_expect_failure(_bad_train(0), train=True)
        printed = ws.refusals([_bad_train(i) for i in range(len(BAD_SETTINGS))])
    return program, printed


def test_a_bad_setting_stops_nnunet_train_with_one_line(workspace, bad_settings):
    proc, _ = bad_settings
    assert proc.returncode != 0
    assert f"nnunet_transfer: error: {BAD_SETTINGS[0][1]}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing half-written: the run's results folder was never created
    assert not workspace.fold_folder(TARGET_ID, "bad0", "nnUNetTrainerFinetune").parent.exists()


@pytest.mark.parametrize("i", range(len(BAD_SETTINGS)), ids=[m.split(" must")[0] for _, m in BAD_SETTINGS])
def test_bad_settings_stop_before_any_folder_with_one_line(workspace, bad_settings, i):
    assert_one_line_error(bad_settings[1][i], BAD_SETTINGS[i][1])
    assert not workspace.fold_folder(TARGET_ID, f"bad{i}", "nnUNetTrainerFinetune").parent.exists()
