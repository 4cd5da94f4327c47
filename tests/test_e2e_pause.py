"""Pausing (setting ``pause_at``) through the stock ``nnUNetv2_train``: a run paused twice and continued with
``--c`` is the run never paused, bit for bit (CPU, ``seed``, ``nnUNet_n_proc_DA=0``).

nnU-Net sets ``torch.set_num_threads(cpu_count())`` on the CPU, and two *unpaused* runs with 2 threads differ in
the last float32 bit when the machine is loaded (measured: train loss 1.7611138 vs 1.7611136 at epoch 0), so
every run here is nnU-Net's own entry point (what the ``nnUNetv2_train`` script calls) on one thread: then runs
are identical under any load (``OMP_THREAD_LIMIT=1`` instead makes nnU-Net hang in its first epoch).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from nnunet_transfer.errors import DataError
from nnunet_transfer.pipeline import TRAIN_ENV
from nnunet_transfer.study.racing_signal import validation_at

from conftest import SOURCE_ID, TARGET_ID, TINY, load_checkpoint

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerTransferBase"
# 3 epochs x 2 iterations; no checkpoint_latest of nnU-Net's own before the end (save_every 50)
SETTINGS = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 50,
            "seed": 0, "final_validation": False}


ONE_THREAD = ("import sys, torch; torch.set_num_threads(1); torch.set_num_threads = lambda n: None; "
              "from nnunetv2.run.run_training import run_training_entry; sys.argv[0] = 'nnUNetv2_train'; "
              "run_training_entry()")


def train(ws, configuration: str, cont: bool = False):
    args = [sys.executable, "-c", ONE_THREAD, str(TARGET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu"]
    proc = subprocess.run(args + (["--c"] if cont else []), env={**ws.env, **TRAIN_ENV}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws.fold_folder(TARGET_ID, configuration, TRAINER)


@pytest.fixture(scope="module")
def runs(workspace):
    ws = workspace
    ws.configure(TARGET_ID, TINY, "pause_never", SETTINGS)
    # final validation on for the paused one: it must not run at a pause, and does at the end
    ws.configure(TARGET_ID, TINY, "pause_twice", {**SETTINGS, "pause_at": [1, 2], "final_validation": True})
    never = train(ws, "pause_never")
    fold = train(ws, "pause_twice")
    seen = []
    for cont in (True, True):
        record = json.loads((fold / "transfer_config.json").read_text())
        latest = load_checkpoint(fold / "checkpoint_latest.pth")
        seen.append({"paused": record.get("paused"), "final": (fold / "checkpoint_final.pth").exists(),
                     "validation": (fold / "validation").exists(), "epoch": latest["current_epoch"],
                     "latest_paused": latest["nnunet_transfer"].get("paused")})
        train(ws, "pause_twice", cont=cont)
    return ws, never, fold, seen


def test_a_paused_run_stops_with_checkpoint_latest_and_no_final_validation(runs):
    _, _, _, seen = runs
    assert seen == [
        {"paused": {"after_epoch": 1, "num_epochs": 3}, "final": False, "validation": False, "epoch": 1,
         "latest_paused": {"after_epoch": 1, "num_epochs": 3}},
        {"paused": {"after_epoch": 2, "num_epochs": 3}, "final": False, "validation": False, "epoch": 2,
         "latest_paused": {"after_epoch": 2, "num_epochs": 3}}]


def test_paused_and_continued_is_bit_identical_to_never_paused(runs):
    _, never, fold, _ = runs
    a, b = load_checkpoint(never / "checkpoint_final.pth"), load_checkpoint(fold / "checkpoint_final.pth")
    assert a["current_epoch"] == b["current_epoch"] == 3
    assert a["network_weights"].keys() == b["network_weights"].keys()
    for k, v in a["network_weights"].items():
        assert torch.equal(v, b["network_weights"][k]), k
    # the same batches and the same schedule: every logged loss and learning rate is equal, not close
    for key in ("train_losses", "val_losses", "lrs", "ema_fg_dice"):
        assert a["logging"][key] == b["logging"][key], key
    opt_a, opt_b = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)


def test_the_finished_run_is_done_not_paused_and_validated(runs):
    _, _, fold, _ = runs
    record = json.loads((fold / "transfer_config.json").read_text())
    assert "paused" not in record
    assert "paused" not in load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]
    assert not (fold / "checkpoint_latest.pth").exists()
    assert (fold / "validation" / "summary.json").is_file()
    logs = "".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert logs.count("the random state of the pause is restored") == 2
    assert logs.count("no final validation: the run is paused") == 2


def test_racing_validation_signal_is_nnunets_own_prediction_and_evaluation_of_the_fold(runs, tmp_path):
    """[racing] signal = "validation" equals what nnU-Net's own programs give: ``nnUNetv2_predict -chk`` of the
    fold's validation cases (no test-time mirroring, as the signal) scored by nnU-Net's
    ``compute_metrics_on_folder_simple`` (foreground mean). On the source dataset, planned for itself, whose
    preprocessed grid is the images' own (the signal is computed on the preprocessed grid; the target's plans
    resample it); the rung's weights are read as a paused run holds them (``checkpoint_latest.pth``)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    ws, _, fold, _ = runs
    source = ws.fold_folder(SOURCE_ID, TINY, TRAINER)
    name, epochs = ws.source, load_checkpoint(source / "checkpoint_final.pth")["current_epoch"]
    val = json.loads((ws.root / "preprocessed" / name / "splits_final.json").read_text())[0]["val"]
    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir(), refs.mkdir()
    for case in val:
        shutil.copy(ws.root / "raw" / name / "imagesTr" / f"{case}_0000.nii.gz", images)
        shutil.copy(ws.root / "raw" / name / "labelsTr" / f"{case}.nii.gz", refs)
    rung = tmp_path / "rung" / "fold_0"
    rung.mkdir(parents=True)
    shutil.copy(source / "checkpoint_final.pth", rung / "checkpoint_latest.pth")
    signal = validation_at(rung, epochs, dataset=name, configuration=TINY, plans="nnUNetPlans", device="cpu")
    ws.run(["nnUNetv2_predict", "-i", images, "-o", tmp_path / "pred", "-d", SOURCE_ID, "-c", TINY, "-f", 0,
            "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta",
            "--disable_progress_bar"], "predict the source's validation cases")
    labels = [v for k, v in json.loads((ws.root / "raw" / name / "dataset.json").read_text())["labels"].items()
              if k != "background"]
    compute_metrics_on_folder_simple(str(refs), str(tmp_path / "pred"), labels, num_processes=1)
    nnunet = json.loads((tmp_path / "pred" / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert signal is not None and 0 < nnunet and signal == pytest.approx(nnunet, abs=1e-6)
    # the paused-and-finished run holds no weights of epoch 1 any more: one line, not another epoch's value
    with pytest.raises(DataError, match="not the weights after rung 1: the run went past the rung"):
        validation_at(fold, 1, dataset=ws.target, configuration="pause_twice", plans="nnUNetPlans", device="cpu")
