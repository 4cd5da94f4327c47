"""nnUNetTrainer subclasses run by the stock ``nnUNetv2_train`` / ``nnUNetv2_predict``.

Every class listed in ``__all__`` is re-exported by the ``nnUNet_extTrainer`` shim; names must never
collide with nnU-Net's built-in trainers (nnU-Net searches its own package first).
"""
from nnunet_transfer.trainers import freezing as _freezing
from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase
from nnunet_transfer.trainers.continual import nnUNetTrainerContinual
from nnunet_transfer.trainers.finetune import nnUNetTrainerFinetune, nnUNetTrainerFinetune_warmup
from nnunet_transfer.trainers.freezing import *  # noqa: F401,F403 - frozen encoder/decoder, 12 presets
from nnunet_transfer.trainers.l2sp import (nnUNetTrainerL2SP, nnUNetTrainerL2SP_Li,
                                          nnUNetTrainerL2SP_Sagie)
from nnunet_transfer.trainers.lora import nnUNetTrainerLoRA
from nnunet_transfer.trainers.selective import nnUNetTrainerBitFit, nnUNetTrainerNormOnly
from nnunet_transfer.trainers.staged import (nnUNetTrainerStaged, nnUNetTrainerStaged_decoderFirst,
                                            nnUNetTrainerStaged_headsFirst)

__all__ = [
    "nnUNetTrainerTransferBase",
    "nnUNetTrainerFinetune",
    "nnUNetTrainerFinetune_warmup",
    *_freezing.__all__,
    "nnUNetTrainerL2SP",
    "nnUNetTrainerL2SP_Sagie",
    "nnUNetTrainerL2SP_Li",
    "nnUNetTrainerStaged",
    "nnUNetTrainerStaged_headsFirst",
    "nnUNetTrainerStaged_decoderFirst",
    "nnUNetTrainerNormOnly",
    "nnUNetTrainerBitFit",
    "nnUNetTrainerLoRA",
    "nnUNetTrainerContinual",
]
