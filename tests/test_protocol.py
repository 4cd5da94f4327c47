"""Protocol settings (issue 21, item 2): the optimizer, the LR schedule and the early-stopping rule (no training).

The end-to-end run (an early stop through nnUNetv2_train, both checkpoints, --c) is in test_e2e_protocol.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

import nnunet_transfer.trainers as T
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.training.schedule import WarmupPolyLRScheduler, make_optimizer
from nnunet_transfer.training.stopping import EarlyStopping

from inprocess import DATASET_JSON, build, plans_with  # noqa: F401 (build: a fixture)


# ---- the stopping rule ----------------------------------------------------------------------------------

def run_rule(monitor, patience, values, num_epochs=None):
    """Feed ``values`` epoch by epoch as the trainer does; (stopped after epoch, best epoch, best, converged)."""
    rule = EarlyStopping(monitor, patience)
    num_epochs = num_epochs or len(values)
    for epoch, v in enumerate(values, 1):
        rule.update(v, epoch)
        if rule.should_stop():
            rule.finish(epoch, stopped=True)
            break
        if epoch == num_epochs:
            rule.finish(epoch, stopped=False)
    return rule.stopped_epoch, rule.best_epoch, rule.best, rule.converged


@pytest.mark.parametrize("monitor, patience, values, expected", [
    # the paper's rule: stop once `patience` epochs passed without a new minimum
    ("val_loss", 2, [1.0, 0.9, 0.95, 0.91, 0.5], (4, 2, 0.9, True)),
    ("val_loss", 1, [1.0, 0.9, 0.9], (3, 2, 0.9, True)),           # equal is no improvement
    ("val_loss", 3, [1.0, 0.9, 0.8, 0.7, 0.6], (None, 5, 0.6, False)),  # improving to the end: not converged
    ("val_loss", 2, [1.0, 2.0, 0.5, 0.6, 0.7], (5, 3, 0.5, True)),  # the stop can fall on the last epoch
    ("val_loss", 1, [float("nan"), 1.0, 1.0], (3, 2, 1.0, True)),  # NaN never improves
    ("ema_dice", 2, [0.1, 0.3, 0.2, 0.3, 0.4], (4, 2, 0.3, True)),  # higher is better, strict like nnU-Net's
    ("ema_dice", 2, [0.1, 0.2, 0.3], (None, 3, 0.3, False)),
])
def test_stopping_rule(monitor, patience, values, expected):
    assert run_rule(monitor, patience, values) == expected


def test_stopping_state_round_trips_and_continues_the_count():
    # --c restores the state from the checkpoint: the count goes on where it was, not from zero
    whole = EarlyStopping("val_loss", 3)
    first = EarlyStopping("val_loss", 3)
    values = [1.0, 0.8, 0.9, 0.85, 0.95, 0.7]
    for e, v in enumerate(values[:4], 1):
        whole.update(v, e)
        first.update(v, e)
    resumed = EarlyStopping.from_state(json.loads(json.dumps(first.state())))
    assert resumed.state()["epochs_without_improvement"] == 2
    assert not resumed.should_stop()
    for e, v in enumerate(values[4:], 5):
        whole.update(v, e)
        resumed.update(v, e)
        if e == 5:
            assert resumed.should_stop() and whole.should_stop()  # epochs 3, 4, 5 without a new best
    assert resumed.state() == whole.state()
    with pytest.raises(ValueError, match="recorded already"):
        resumed.update(0.1, 6)


def test_stopping_refuses_bad_arguments():
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping("dice", 3)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("val_loss", 0)


# ---- optimizer and schedule -----------------------------------------------------------------------------

def _params(n=2):
    return [torch.nn.Parameter(torch.ones(3)) for _ in range(n)]


def test_make_optimizer_kinds_and_group_weight_decay():
    p = _params()
    groups = [{"params": [p[0]]}, {"params": [p[1]], "weight_decay": 0.0}]  # e.g. L2-SP's anchored group
    sgd = make_optimizer(groups, "sgd", 0.01, weight_decay=3e-5)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["momentum"], sgd.defaults["nesterov"], sgd.defaults["weight_decay"]) == (0.99, True, 3e-5)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = make_optimizer([dict(g) for g in groups], name, 1e-4, weight_decay=3e-5)
        assert type(opt) is cls and opt.defaults["lr"] == 1e-4
        assert [g["weight_decay"] for g in opt.param_groups] == [3e-5, 0.0]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(groups, "rmsprop", 0.1, weight_decay=0)


def test_adam_step_equals_torch_reference():
    # one step of our adam on a quadratic equals torch.optim.Adam's by hand: -lr * sign(g) on the first step
    (p,) = _params(1)
    opt = make_optimizer([{"params": [p]}], "adam", 1e-4, weight_decay=0.0)
    (p * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([1 - 1e-4, 1 + 1e-4, 1 - 1e-4]), atol=1e-9)


def test_constant_schedule_and_poly_default():
    opt = torch.optim.SGD(_params(1), lr=0.1)
    const = WarmupPolyLRScheduler(opt, 1e-4, 10, warmup_steps=2, exponent=0.0)
    lrs = []
    for epoch in range(10):
        const.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-5, 1e-4] + [1e-4] * 8, rel=1e-15)
    a, b = torch.optim.SGD(_params(1), lr=0.1), torch.optim.SGD(_params(1), lr=0.1)
    ours, theirs = WarmupPolyLRScheduler(a, 0.01, 7), PolyLRScheduler(b, 0.01, 7)
    for epoch in range(7):
        ours.step(epoch)
        theirs.step(epoch)
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]


# ---- settings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "rmsprop"}, "setting 'optimizer' must be one of ['sgd', 'adam', 'adamw'], got 'rmsprop'"),
    ({"initial_lr": 0}, "setting 'initial_lr' must be a finite number > 0, got 0"),
    ({"lr_schedule": "cosine"}, "setting 'lr_schedule' must be one of ['poly', 'constant'], got 'cosine'"),
    ({"early_stopping": "dice"}, "setting 'early_stopping' must be one of ['none', 'val_loss', 'ema_dice']"),
    ({"patience": 0}, "setting 'patience' must be an integer >= 1, got 0"),
])
def test_bad_protocol_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as e:
        TransferConfig.from_mapping(settings)
    assert message in str(e.value)


def test_protocol_settings_are_fixed_for_a_run():
    # they define the experiment: --c with another optimizer or stopping rule is refused
    assert not {"optimizer", "initial_lr", "lr_schedule", "early_stopping", "patience"} & TransferConfig.resumable_keys()


# ---- in a trainer ----------------------------------------------------------------------------------------


def test_trainer_builds_the_configured_optimizer_and_schedule(build):
    default = build(T.nnUNetTrainerTransferBase, {})
    assert type(default.optimizer) is torch.optim.SGD and default.optimizer.defaults["lr"] == 1e-2
    amiri = build(T.nnUNetTrainerTransferBase, {"optimizer": "adam", "initial_lr": 1e-4, "lr_schedule": "constant",
                                                "num_epochs": 200})
    assert type(amiri.optimizer) is torch.optim.Adam and amiri.initial_lr == 1e-4
    for epoch in (0, 100, 199):
        amiri.lr_scheduler.step(epoch)
        assert amiri.optimizer.param_groups[0]["lr"] == 1e-4
    # lr_scale multiplies the configured rate; L2-SP keeps its own groups (no weight decay on the anchored scope)
    l2sp = build(T.nnUNetTrainerL2SP, {"optimizer": "adamw", "initial_lr": 1e-3, "l2sp_alpha": 0.1,
                                       "allow_random_anchor": True})
    assert type(l2sp.optimizer) is torch.optim.AdamW and l2sp.initial_lr == pytest.approx(1e-3 * l2sp.transfer_config.lr_scale)
    decays = sorted({g["weight_decay"] for g in l2sp.optimizer.param_groups})
    assert decays[0] == 0.0 and len(l2sp.optimizer.param_groups) >= 2
    staged = build(T.nnUNetTrainerStaged, {"optimizer": "adam", "lr_schedule": "constant",
                                           "stages": "decoder+seg:1,all"})
    assert type(staged.optimizer) is torch.optim.Adam and staged.lr_scheduler.exponent == 0.0


def test_trainer_stopping_hook_reads_nnunets_logged_value(build):
    tr = build(T.nnUNetTrainerTransferBase, {"early_stopping": "val_loss", "patience": 2, "num_epochs": 10})
    seen = []
    for epoch, v in enumerate([0.5, 0.4, 0.45, 0.41], 0):
        tr.logger.log("val_losses", v, epoch)
        tr.current_epoch = epoch
        seen.append(tr._update_stopping())
    assert seen == [(False, True), (False, True), (False, False), (True, False)]
    st = tr.transfer_state["stopping"]
    assert (st["stopped_epoch"], st["best_epoch"], st["best"], st["converged"]) == (4, 2, 0.4, True)
    # without early stopping nothing is tracked and nnU-Net's EMA-Dice best stays checkpoint_best.pth
    plain = build(T.nnUNetTrainerTransferBase, {})
    assert "stopping" not in plain.transfer_state and plain._update_stopping() == (False, False)
    assert not plain._best_follows_monitor() and tr._best_follows_monitor()
    assert math.isclose(tr.optimizer.defaults["lr"], 1e-2)
