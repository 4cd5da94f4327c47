"""One-line errors for our trainers when they run inside nnU-Net's own command line: the messages.

The ``nnUNet_extTrainer`` shim installs :func:`nnunet_transfer.runtime.install_excepthook` when nnU-Net
imports it, which ``nnUNetv2_train`` does while it searches for a trainer class. From then on

* a :class:`~nnunet_transfer.errors.TransferError` (a bad setting, an incompatible
  ``-pretrained_weights`` file, a refused strategy) prints as ``nnunet_transfer: error: …``;
* nnU-Net's "Could not find requested nnunet trainer X" (a misspelt ``-tr``) prints as one line naming
  the closest trainers of this package and of nnU-Net and the ``nnUNet_extTrainer`` value in effect;
* in ``nnUNetv2_predict`` a model folder ``TRAINER__PLANS__CONFIG`` that does not exist prints as one line
  naming the models the dataset has and the closest trainers. ``nnUNetv2_predict`` looks for the folder
  before it imports any external trainer, so there the hook is installed at start-up by the opt-in
  ``nnunet_transfer doctor --install-hints`` (see :mod:`nnunet_transfer.runtime`).

The process still exits non-zero (Python exits with 1 after an uncaught exception).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from nnunet_transfer.environment import ext_trainer_folder
# what these messages know of nnU-Net's trainers is guarded there
from nnunet_transfer.nnunet_compat import nnunet_trainer_names

#: the package whose classes ``nnunet_transfer_trainers`` (``_ext/``) re-exports
TRAINERS_FOLDER = Path(__file__).resolve().parent / "trainers"


def our_trainer_names() -> list[str]:
    """Class names ``nnUNetTrainer*`` of this package's trainers, read from the source files of ``trainers/``
    (nothing imported: a hint must not import the trainers, torch and nnU-Net, and this module sits below the
    trainers); a test holds them equal to ``nnunet_transfer.trainers.__all__``, what the shim re-exports."""
    names: set[str] = set()
    for path in TRAINERS_FOLDER.rglob("*.py"):
        names |= set(re.findall(r"^class (nnUNetTrainer\w*)\s*[(:]", path.read_text(errors="replace"), re.M))
    return sorted(names)


def unknown_trainer_message(name: str, *, ours: list[str] | None = None, nnunet: list[str] | None = None,
                            ext: str | None = None) -> str:
    """``no trainer 'X'; closest of nnunet_transfer: …; of nnU-Net: …; nnUNet_extTrainer=…``."""
    ours = our_trainer_names() if ours is None else ours
    nnunet = nnunet_trainer_names() if nnunet is None else nnunet
    ext = os.environ.get("nnUNet_extTrainer", "") if ext is None else ext

    def close(pool: list[str]) -> str:
        found = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
        return ", ".join(found) if found else "none close"

    shim = str(ext_trainer_folder())
    hint = "" if shim in ext.split(os.pathsep) else (
        " (it does not contain this package's trainers: export nnUNet_extTrainer=$(nnunet_transfer trainer-path))")
    return (f"no trainer {name!r}; closest of nnunet_transfer: {close(list(ours))}; of nnU-Net: {close(nnunet)}; "
            f"nnUNet_extTrainer={ext or '<unset>'}{hint}")


_MODEL_FOLDER = re.compile(r"^(?P<trainer>[^/\\]+?)__(?P<plans>[^/\\]+?)__(?P<configuration>[^/\\]+)$")


def missing_model_message(path: str) -> str | None:
    """For ``nnUNetv2_predict``: a model folder ``…/DatasetXXX/TRAINER__PLANS__CONFIG`` that does not exist
    (a misspelt ``-tr``, ``-p`` or ``-c``) -> one line naming what exists; None for any other path."""
    p = Path(path)
    for folder in [p, *p.parents]:
        m = _MODEL_FOLDER.match(folder.name)
        if not m or folder.exists():
            continue
        dataset = folder.parent
        trained = sorted(x.name for x in dataset.iterdir() if x.is_dir() and _MODEL_FOLDER.match(x.name)) \
            if dataset.is_dir() else []
        have = ", ".join(trained) if trained else "none"
        return (f"no trained model {folder}: {dataset.name} has {have}; "
                + unknown_trainer_message(m.group("trainer")).replace("no trainer", "for the trainer", 1))
    return None
