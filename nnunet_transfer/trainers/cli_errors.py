"""One-line errors for our trainers when they run inside nnU-Net's own command line."""
from __future__ import annotations

import sys

from nnunet_transfer.errors import TransferError


def install_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, "_nnunet_transfer", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, TransferError):
            print(f"nnunet_transfer: error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook._nnunet_transfer = True
    sys.excepthook = hook
