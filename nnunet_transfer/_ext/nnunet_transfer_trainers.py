"""The one module nnU-Net imports from ``nnUNet_extTrainer`` (as a top-level module).

nnU-Net imports every module in the folder and looks the trainer class up by name, both in
``nnUNetv2_train`` and in ``nnUNetv2_predict`` (from ``checkpoint["trainer_name"]``). Keep this folder to
this single, uniquely named file: relative imports fail there, and a second module could shadow others.
"""
from nnunet_transfer.trainers import *  # noqa: F401,F403
from nnunet_transfer.trainers import __all__  # noqa: F401
from nnunet_transfer.runtime import install_excepthook

# nnUNetv2_train is nnU-Net's program: a bad setting found by one of our trainers would otherwise end
# in a traceback. Print such errors as one line (the process still exits non-zero).
install_excepthook()
