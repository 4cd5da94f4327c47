"""Early stopping end to end through nnUNetv2_train (issue 21, item 2): three training processes in all.

Adam at a negligible learning rate leaves the network as it starts, so the validation loss only moves with the
validation batches and the patience-1 rule stops the run early (the run is seeded: the same epoch every time).
The rule, the best checkpoint and the --c behaviour are checked against nnU-Net's own logged validation losses.
Early stopping on nnU-Net's EMA pseudo-Dice is checked the same way against its logged ``ema_fg_dice``.
"""
from __future__ import annotations

import json
import operator

import numpy as np
import pytest
import torch

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, load_checkpoint

pytestmark = pytest.mark.slow

CONF = "stop"
MAX_EPOCHS = 8
SETTINGS = {**QUICK_SETTINGS, "num_epochs": MAX_EPOCHS, "optimizer": "adam", "initial_lr": 1e-9,
            "lr_schedule": "constant", "early_stopping": "val_loss", "patience": 1}
TRAINER = "nnUNetTrainerTransferBase"


def expected_stop(values, patience, better=operator.lt):
    """The paper's rule by hand: (stop epoch, best epoch), 1-based; None if it never fires. ``better(v, best)``:
    v improves on the best (lower validation loss; ``operator.gt`` for the EMA pseudo-Dice)."""
    best, best_epoch = None, None
    for e, v in enumerate(values, 1):
        if best is None or better(v, best):
            best, best_epoch = v, e
        if e - best_epoch >= patience:
            return e, best_epoch
    return None, best_epoch


@pytest.fixture(scope="module")
def stopped(workspace):
    workspace.configure(TARGET_ID, TINY, CONF, SETTINGS)
    fold = workspace.train(TARGET_ID, CONF, TRAINER)
    first = {"final": load_checkpoint(fold / "checkpoint_final.pth"),
             "best": load_checkpoint(fold / "checkpoint_best.pth"),
             "config": json.loads((fold / "transfer_config.json").read_text())}
    return workspace, fold, first


def test_early_stopped_run_ends_before_num_epochs_with_both_checkpoints(stopped):
    ws, fold, first = stopped
    final, best = first["final"], first["best"]
    losses = [float(v) for v in final["logging"]["val_losses"]]
    stop, best_epoch = expected_stop(losses, 1)
    assert stop is not None and stop < MAX_EPOCHS, losses
    # nnU-Net's loop ended after the stop epoch, and checkpoint_final.pth is that epoch's
    assert final["current_epoch"] == stop == len(losses)
    assert not (fold / "checkpoint_latest.pth").exists()
    state = final["nnunet_transfer"]["stopping"]
    assert (state["stopped_epoch"], state["best_epoch"], state["converged"]) == (stop, best_epoch, True)
    assert state["best"] == pytest.approx(min(losses), rel=1e-12)
    assert first["config"]["stopping"] == state  # recorded next to the results
    # checkpoint_best.pth is the lowest validation loss (not nnU-Net's EMA pseudo-Dice), with the state then
    assert best["current_epoch"] == best_epoch
    assert len(best["logging"]["val_losses"]) == best_epoch
    assert best["nnunet_transfer"]["stopping"]["best_epoch"] == best_epoch
    # the optimizer is the configured one, at the configured constant rate
    groups = final["optimizer_state"]["param_groups"]
    assert {g["lr"] for g in groups} == {1e-9} and "betas" in groups[0]
    assert all("exp_avg" in s for s in final["optimizer_state"]["state"].values())
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"early stopping after epoch {stop}: val_loss has not improved for 1 epochs" in log


def test_resume_keeps_the_stopping_state(stopped):
    # --c of the stopped run, even with a larger maximum, does not train on: nnU-Net alone would run to 12
    ws, fold, first = stopped
    ws.configure(TARGET_ID, TINY, CONF, {**SETTINGS, "num_epochs": 12})
    ws.train(TARGET_ID, CONF, TRAINER, cont=True)
    again = load_checkpoint(fold / "checkpoint_final.pth")
    assert again["current_epoch"] == first["final"]["current_epoch"]
    assert np.array_equal(again["logging"]["val_losses"], first["final"]["logging"]["val_losses"])
    assert again["nnunet_transfer"]["stopping"] == first["final"]["nnunet_transfer"]["stopping"]
    w0, w1 = first["final"]["network_weights"], again["network_weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "nothing to continue" in log


# --------------------------------------------------------------------------- on nnU-Net's EMA pseudo-Dice
EMA_CONF = "stop_ema"
# from the source model at Adam's 1e-4 (seed 0): the EMA pseudo-Dice falls after epoch 1 while the validation
# loss still improves, so a run that read the loss instead would neither stop there nor keep epoch 1 as its best
EMA_SETTINGS = {**SETTINGS, "initial_lr": 1e-4, "early_stopping": "ema_dice"}


def test_early_stopping_on_the_ema_pseudo_dice(workspace):
    workspace.configure(TARGET_ID, TINY, EMA_CONF, EMA_SETTINGS)
    fold = workspace.train(TARGET_ID, EMA_CONF, TRAINER, pretrained=workspace.source_checkpoint)
    final, best = load_checkpoint(fold / "checkpoint_final.pth"), load_checkpoint(fold / "checkpoint_best.pth")
    ema = [float(v) for v in final["logging"]["ema_fg_dice"]]
    stop, best_epoch = expected_stop(ema, 1, better=operator.gt)
    assert stop is not None and stop < MAX_EPOCHS, ema
    assert final["current_epoch"] == stop == len(ema)
    state = final["nnunet_transfer"]["stopping"]
    assert (state["monitor"], state["stopped_epoch"], state["best_epoch"], state["converged"]) == \
        ("ema_dice", stop, best_epoch, True)
    assert state["best"] == pytest.approx(max(ema), rel=1e-12)
    # checkpoint_best.pth is nnU-Net's own, by the same EMA pseudo-Dice: the best epoch's, with its value
    assert best["current_epoch"] == best_epoch and len(best["logging"]["ema_fg_dice"]) == best_epoch
    assert best["_best_ema"] == pytest.approx(max(ema), rel=1e-12)
    # the validation losses of the same epochs would have decided otherwise: the rule read the EMA pseudo-Dice
    assert expected_stop([float(v) for v in final["logging"]["val_losses"]], 1) != (stop, best_epoch)
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"early stopping after epoch {stop}: ema_dice has not improved for 1 epochs" in log
