"""Plain fine-tuning: every layer trains from the pretrained weights (Karimi et al. 2021's T.L. runs)."""
from __future__ import annotations

from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase


class nnUNetTrainerFinetune(nnUNetTrainerTransferBase):
    """Pretrain-then-fine-tune (Karimi et al. 2021): every layer trains, initial LR halved.

    Use with ``nnUNetv2_train ... -tr nnUNetTrainerFinetune -pretrained_weights SOURCE.pth``; nnU-Net
    loads every layer except the segmentation heads.
    """

    transfer_defaults = {"lr_scale": 0.5}

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:
            self.print_to_log_file(
                "WARNING nnunet_transfer: nnUNetTrainerFinetune started WITHOUT pretrained weights — this "
                "run is training from scratch with a halved learning rate. Pass -pretrained_weights "
                "SOURCE_CHECKPOINT to fine-tune.")
