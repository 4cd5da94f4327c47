"""What the start-up file ``nnunet_transfer_hints.pth`` imports (``doctor --install-hints``).

Its line names this module, also in environments where an older version wrote it; the start-up file, its hook
and the other process-wide effects live in :mod:`nnunet_transfer.runtime`.
"""
from nnunet_transfer.runtime import PTH_LINE, PTH_NAME, install_hint_hook as install  # noqa: F401

PROGRAMS = ("nnUNetv2_train", "nnUNetv2_predict")
