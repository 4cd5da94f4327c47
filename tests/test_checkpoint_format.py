"""Our trainers rewrite nnU-Net's checkpoint dictionary (``save_checkpoint`` has no hook for extra entries).

This runs nnU-Net's own ``nnUNetTrainer.save_checkpoint`` and ours on the same trainer state: every key
nnU-Net writes must be in ours with the same value, and ours adds only ``"nnunet_transfer"``. A future
nnU-Net release that adds a key fails here instead of silently losing it. Both files hold what nnU-Net's
training writes (numpy scalars in the log) and load through the safe loader, without the opt-in.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.nnunet_compat import CheckpointState, same_values
from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase
from nnunet_transfer.training.checkpoint_state import CHECKPOINT_KEY


class _State(CheckpointState):
    """The trainer state nnU-Net's save_checkpoint guard uses, with what our base adds to a checkpoint."""

    def _checkpoint_state(self) -> dict:
        return {"trainer": "x"}


def test_our_checkpoint_holds_every_key_nnunet_writes(tmp_path):
    state = _State(str(tmp_path))
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
        assert same_values(theirs[key], ours[key]), key
    assert not (tmp_path / "ours.pth.tmp").exists()  # written atomically
