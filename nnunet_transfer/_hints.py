"""Opt-in one-line hints in nnU-Net's own programs, installed by ``nnunet_transfer doctor --install-hints``.

``nnUNetv2_predict`` with a misspelt ``-tr`` fails looking for the model folder *before* it imports any
external trainer, so the excepthook the ``nnUNet_extTrainer`` shim installs (which covers
``nnUNetv2_train``) never runs. ``doctor --install-hints`` writes ``nnunet_transfer_hints.pth`` into the
environment's site-packages; Python runs its one ``import`` line at start-up, and :func:`install`
installs the hook only when the program is ``nnUNetv2_train`` or ``nnUNetv2_predict``. Nothing else is
imported at start-up; the hook imports the rest only when an error reaches it. ``--remove-hints``
deletes the file.
"""
from __future__ import annotations

import os
import sys

PROGRAMS = ("nnUNetv2_train", "nnUNetv2_predict")
PTH_NAME = "nnunet_transfer_hints.pth"
PTH_LINE = "import nnunet_transfer._hints as _h; _h.install()\n"


def install(argv: list[str] | None = None) -> bool:
    """Install the excepthook in ``nnUNetv2_train`` / ``nnUNetv2_predict`` processes; returns whether it did."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in PROGRAMS:
        return False
    from nnunet_transfer.trainers.cli_errors import install_excepthook

    install_excepthook()
    return True
