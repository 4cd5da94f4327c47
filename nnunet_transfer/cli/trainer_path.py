"""``nnunet_transfer trainer-path``: the folder nnUNet_extTrainer must point at."""
from __future__ import annotations

from pathlib import Path


def ext_trainer_folder() -> Path:
    """Folder holding the single shim module that re-exports this package's trainers."""
    return Path(__file__).resolve().parent.parent / "_ext"


def add_parser(sub) -> None:
    p = sub.add_parser("trainer-path", help="print the folder for nnUNet_extTrainer",
                       description="Print the folder that nnU-Net's nnUNet_extTrainer variable must "
                                   "contain: export nnUNet_extTrainer=$(nnunet_transfer trainer-path)")
    p.set_defaults(func=run)


def run(args) -> int:
    print(ext_trainer_folder())
    return 0
