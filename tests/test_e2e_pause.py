"""Pausing (setting ``pause_at``) through the stock ``nnUNetv2_train``: a run paused twice and continued with
``--c`` is the run never paused, bit for bit (CPU, ``seed``, ``nnUNet_n_proc_DA=0``).

nnU-Net sets ``torch.set_num_threads(cpu_count())`` on the CPU, and two *unpaused* runs with 2 threads differ in
the last float32 bit when the machine is loaded (measured: train loss 1.7611138 vs 1.7611136 at epoch 0), so
every run here is nnU-Net's own entry point (what the ``nnUNetv2_train`` script calls) on one thread: then runs
are identical under any load (``OMP_THREAD_LIMIT=1`` instead makes nnU-Net hang in its first epoch).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nnunet_transfer.pipeline import TRAIN_ENV

from conftest import TARGET_ID, TINY, load_checkpoint

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
