"""``nnunet_transfer trainer-path``: the folder nnUNet_extTrainer must point at."""
from __future__ import annotations

from nnunet_transfer.environment import ext_trainer_folder


def add_parser(sub) -> None:
    p = sub.add_parser("trainer-path", help="print the folder for nnUNet_extTrainer",
                       description="Print the folder that nnU-Net's nnUNet_extTrainer variable must "
                                   "contain: export nnUNet_extTrainer=$(nnunet_transfer trainer-path)")
    p.set_defaults(func=run)


def run(args) -> int:
    print(ext_trainer_folder())
    return 0
