"""nnUNetTrainer subclasses run by the stock ``nnUNetv2_train`` / ``nnUNetv2_predict``.

Every class listed in ``__all__`` is re-exported by the ``nnUNet_extTrainer`` shim; names must never
collide with nnU-Net's built-in trainers (nnU-Net searches its own package first).
"""
from nnunet_transfer.trainers.base import nnUNetTrainerFinetune, nnUNetTrainerTransferBase

__all__ = [
    "nnUNetTrainerTransferBase",
    "nnUNetTrainerFinetune",
]
