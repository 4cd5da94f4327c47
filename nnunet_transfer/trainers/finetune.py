"""Plain fine-tuning: every layer trains from the pretrained weights (Karimi et al. 2021's T.L. runs), and nnU-Net
master's fine-tuning recipe for nnssl checkpoints as a preset."""
from __future__ import annotations

import torch

from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase
from nnunet_transfer.training.schedule import LR_SCHEDULES, PretrainedWarmupLRScheduler


class nnUNetTrainerFinetune(nnUNetTrainerTransferBase):
    """Pretrain-then-fine-tune (Karimi et al. 2021): every layer trains, initial LR halved.

    Use with ``nnUNetv2_train ... -tr nnUNetTrainerFinetune -pretrained_weights SOURCE.pth``; nnU-Net
    loads every layer except the segmentation heads.
    """

    transfer_defaults = {"lr_scale": 0.5}

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:
            self.print_to_log_file(
                f"WARNING nnunet_transfer: {type(self).__name__} started WITHOUT pretrained weights — this "
                "run is training from scratch with a fine-tuning learning rate. Pass -pretrained_weights "
                "SOURCE_CHECKPOINT to fine-tune.")


class nnUNetTrainerFinetune_warmup(nnUNetTrainerFinetune):
    """nnU-Net master's ``PretrainedTrainer`` recipe (``nnUNetv2_train_pretrained``), so that a study can set
    master's default beside this package's strategies on the same source: the whole network trains, initial LR
    1e-3, a linear warm-up over ``warmup_epochs`` (50) epochs, then poly decay over the remaining epochs
    (:class:`~nnunet_transfer.training.schedule.PretrainedWarmupLRScheduler`, nnU-Net's own schedulers), no deep
    supervision; nnU-Net's SGD (momentum 0.99, Nesterov, weight decay 3e-5), as there.

    Master also sets batch size 2: ``plans from-checkpoint`` writes it into the configuration (this trainer
    leaves the plans' batch size alone).
    """

    transfer_defaults = {"initial_lr": 1e-3, "warmup_epochs": 50, "deep_supervision": False}

    def _make_scheduler(self, optimizer: torch.optim.Optimizer):
        return PretrainedWarmupLRScheduler(optimizer, self.initial_lr, self.num_epochs,
                                           warmup_steps=self.transfer_config.warmup_epochs,
                                           exponent=LR_SCHEDULES[self.transfer_config.lr_schedule])
