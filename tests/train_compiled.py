"""Run ``nnUNetv2_train`` with nnU-Net's ``torch.compile`` path on, on the CPU.

nnU-Net's ``_do_i_compile`` answers False on a CPU whatever ``nnUNet_compile`` says, so a CPU test never
reaches the code that compiles the network before ``configure_optimizers`` freezes it (parameter names gain
``_orig_mod.``; the heads are copied into the compiled module). This script answers True instead, and lets
``torch.compile`` use the ``aot_eager`` backend: TorchDynamo and AOTAutograd, which decide how frozen
parameters enter the graph, without the C++ code generation that costs ~90 s on two cores. Everything else
is nnU-Net's own ``nnUNetv2_train`` (``run_training_entry``), with the same command line.

    python train_compiled.py DATASET CONFIGURATION FOLD -tr TRAINER [nnUNetv2_train options]
"""
from __future__ import annotations

import functools
import sys


def main(args: list[str]) -> None:
    import torch
    from nnunetv2.run.run_training import run_training_entry
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    nnUNetTrainer._do_i_compile = lambda self: True
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    sys.argv = ["nnUNetv2_train", *args]  # what our trainers read -pretrained_weights from
    run_training_entry()


if __name__ == "__main__":
    main(sys.argv[1:])
