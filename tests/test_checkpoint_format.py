"""Our trainers rewrite nnU-Net's checkpoint dictionary (``save_checkpoint`` has no hook for extra entries).

This runs nnU-Net's own ``nnUNetTrainer.save_checkpoint`` and ours on the same trainer state: every key
nnU-Net writes must be in ours with the same value, and ours adds only ``"nnunet_transfer"``. A future
nnU-Net release that adds a key fails here instead of silently losing it. Both files hold what nnU-Net's
training writes (numpy scalars in the log) and load through the safe loader, without the opt-in.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.trainers.base import CHECKPOINT_KEY, nnUNetTrainerTransferBase


class _State:
    """The attributes both save_checkpoint methods read."""

    local_rank = 0
    disable_checkpointing = False
    is_ddp = False
    _best_ema = np.float64(0.25)  # nnU-Net's EMA of np.nanmean values
    current_epoch = 3
    inference_allowed_mirroring_axes = (0, 1, 2)

    def __init__(self, folder):
        torch.manual_seed(0)
        self.network = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True))
        self.optimizer = torch.optim.SGD(self.network.parameters(), 0.01, momentum=0.99, nesterov=True)
        self.network(torch.randn(1, 1, 4, 4, 4)).sum().backward()
        self.optimizer.step()
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.logger = MetaLogger(str(folder), False)
        # what nnU-Net logs in an epoch: np.mean of the losses, np.nanmean of the per-class Dice
        self.logger.log("train_losses", np.float32(0.5), 0)
        self.logger.log("val_losses", np.float32(0.6), 0)
        self.logger.log("mean_fg_dice", np.float64(0.25), 0)
        self.logger.log("dice_per_class_or_region", [np.float64(0.2), np.float64(0.3)], 0)
        self.my_init_kwargs = {"plans": {"p": 1}, "configuration": "c", "fold": 0, "dataset_json": {"labels": {}}}

    def print_to_log_file(self, *args):  # pragma: no cover - only on disabled checkpointing
        raise AssertionError(args)

    def _transfer_checkpoint_state(self) -> dict:
        return {"trainer": "x"}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_our_checkpoint_holds_every_key_nnunet_writes(tmp_path):
    state = _State(tmp_path)
    nnUNetTrainer.save_checkpoint(state, str(tmp_path / "nnunet.pth"))
    nnUNetTrainerTransferBase.save_checkpoint(state, str(tmp_path / "ours.pth"))
    theirs = read_checkpoint(tmp_path / "nnunet.pth", trust=False)  # nothing of the files runs
    ours = read_checkpoint(tmp_path / "ours.pth", trust=False)
    assert type(theirs["logging"]["train_losses"][0]) is np.float32 and type(theirs["_best_ema"]) is np.float64
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"nnU-Net writes keys our save_checkpoint drops: {missing}"
    assert set(ours) - set(theirs) == {CHECKPOINT_KEY}
    for key in theirs:
        if key == "trainer_name":  # the class name of the object that saved (both: _State)
            continue
        assert _equal(theirs[key], ours[key]), key
    assert not (tmp_path / "ours.pth.tmp").exists()  # written atomically
