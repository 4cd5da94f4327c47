"""LR schedule equals nnU-Net's poly schedule without warm-up; snapshots round-trip."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_transfer.training.schedule import WarmupPolyLRScheduler
from nnunet_transfer.training.snapshots import load_snapshot_weights, read_index, save_snapshot


def _opt(groups=1):
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in ps], lr=0.1)


def test_without_warmup_equals_nnunet_poly():
    a, b = _opt(), _opt()
    ours, theirs = WarmupPolyLRScheduler(a, 0.01, 50), PolyLRScheduler(b, 0.01, 50)
    for epoch in range(50):
        ours.step(epoch)
        theirs.step(epoch)
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]


def test_warmup_ramps_linearly_then_decays_and_keeps_group_factors():
    opt = _opt(2)
    opt.param_groups[1]["lr_factor"] = 0.1
    sched = WarmupPolyLRScheduler(opt, 0.01, 10, warmup_steps=4)
    lrs = []
    for epoch in range(10):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * lrs[-1])
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert all(x > y for x, y in zip(lrs[3:], lrs[4:]))


def _master_lrs(initial_lr: float, num_epochs: int, warmup: int) -> list[float]:
    """The rates nnU-Net master's PretrainedTrainer sets, driven as it drives them: Lin_incr_LRScheduler built at
    epoch 0, PolyLRScheduler_offset built on the same optimizer at epoch ``warmup``; nnU-Net's
    on_train_epoch_start steps the current one with the epoch index."""
    from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

    opt, lrs, sched = _opt(), [], None
    for epoch in range(num_epochs):
        if epoch == 0:
            sched = Lin_incr_LRScheduler(opt, initial_lr, warmup)
        elif epoch == warmup:
            sched = PolyLRScheduler_offset(opt, initial_lr, num_epochs, warmup)
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_finetune_warmup_follows_nnunet_masters_pretrained_trainer():
    import json
    from pathlib import Path

    from nnunet_transfer.trainers import nnUNetTrainerFinetune_warmup as T

    plans = json.loads((Path(__file__).parent.parent / "data" / "nnUNetPlans_3d_32.json").read_text())
    cfg = T.read_transfer_config(plans, "3d_fullres")
    assert (cfg.initial_lr * cfg.lr_scale, cfg.warmup_epochs, cfg.deep_supervision) == (1e-3, 50, False)
    trainer = object.__new__(T)  # the hook needs the settings, the LR and the epochs only
    trainer.transfer_config, trainer.initial_lr, trainer.num_epochs = cfg, 1e-3, 120
    opt = _opt()
    ours = trainer._make_scheduler(opt)
    got = []
    for epoch in range(120):
        ours.step(epoch)
        got.append(opt.param_groups[0]["lr"])
    assert got == _master_lrs(1e-3, 120, 50)  # equal floats: the same classes, driven alike
    # and the formula, independently: linear to 1e-3 over 50 epochs, then poly over the remaining 70
    assert got[:50] == pytest.approx([1e-3 * (e + 1) / 50 for e in range(50)], rel=1e-12)
    assert got[50:] == pytest.approx([1e-3 * (1 - (e - 50) / 70) ** 0.9 for e in range(50, 120)], rel=1e-12)


def test_a_run_shorter_than_the_warmup_only_warms_up():
    from nnunet_transfer.training.schedule import PretrainedWarmupLRScheduler

    for epochs in (1, 5):  # 5 = the warm-up's length: the poly phase would have no length
        opt = _opt()
        sched = PretrainedWarmupLRScheduler(opt, 1e-3, epochs, warmup_steps=5)
        got = []
        for epoch in range(epochs):
            sched.step(epoch)
            got.append(opt.param_groups[0]["lr"])
        assert got == pytest.approx([1e-3 * (e + 1) / 5 for e in range(epochs)], rel=1e-12)


def test_snapshot_round_trip_and_index(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    save_snapshot(net, tmp_path, 0, trainer_name="T")
    with torch.no_grad():
        net[0].weight.add_(1)
    save_snapshot(net, tmp_path, 5, trainer_name="T", mean_fg_dice=0.5, ema_fg_dice=0.4)
    save_snapshot(net, tmp_path, 5, trainer_name="T", mean_fg_dice=0.6, ema_fg_dice=0.45)  # replaces
    index = read_index(tmp_path)
    assert [(e["epoch"], e["mean_fg_dice"]) for e in index] == [(0, None), (5, 0.6)]
    w5 = load_snapshot_weights(tmp_path / "snapshots" / "epoch_0005.pth")
    assert torch.equal(w5["0.weight"], net[0].weight.detach())
    w0 = load_snapshot_weights(tmp_path / "snapshots" / "epoch_0000.pth")
    assert torch.equal(w0["0.weight"] + 1, w5["0.weight"])
