"""A released nnU-Net model folder as the source of transfer learning.

What ``nnUNetv2_install_pretrained_model_from_zip`` installs (and what TotalSegmentator, challenge
winners and colleagues hand out) is one folder per trained configuration::

    Trainer__Plans__Configuration/
        plans.json               # the whole plans file the model was trained with
        dataset.json             # its channels and labels
        dataset_fingerprint.json
        fold_0/checkpoint_final.pth, fold_1/…, or fold_all/…

That is everything ``plans transfer`` and ``-pretrained_weights`` need from a source: no source data
in ``nnUNet_raw`` / ``nnUNet_preprocessed`` at all. A *fold* folder of such a model (``…/fold_0``) is
accepted wherever the model folder is, and chooses that fold.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nnunet_transfer.errors import DataError
from nnunet_transfer.nnunet_io import load_json

FINAL = "checkpoint_final.pth"
#: what a dataset argument looks like (``902``, ``Dataset902_Name``); anything else is a path
_DATASET = re.compile(r"(?:Dataset)?\d{1,3}(?:_.*)?")
LAYOUT = ("Trainer__Plans__Configuration/ with plans.json, dataset.json and fold_*/checkpoint_final.pth "
          "(what nnUNetv2_install_pretrained_model_from_zip installs)")


@dataclass(frozen=True)
class ModelFolder:
    """An installed nnU-Net model: its plans, dataset.json, trained folds and (optionally) a chosen fold."""

    path: Path
    plans: dict
    dataset_json: dict
    folds: tuple[Path, ...]  # fold folders holding checkpoint_final.pth, sorted
    chosen: Path | None = None  # the fold folder that was given instead of the model folder

    @property
    def trainer(self) -> str | None:
        parts = self.path.name.split("__")
        return parts[0] if len(parts) == 3 else None

    @property
    def plans_identifier(self) -> str:
        return str(self.plans.get("plans_name") or self._name_part(1) or "nnUNetPlans")

    @property
    def configuration(self) -> str | None:
        """From the folder name (nnU-Net's ``Trainer__Plans__Configuration``), if the plans have it."""
        name = self._name_part(2)
        return name if name in self.plans.get("configurations", {}) else None

    @property
    def source_name(self) -> str:
        return str(self.plans.get("dataset_name") or self.path.name)

    @property
    def fold(self) -> Path:
        """The fold to fine-tune from: the chosen one, else the first trained one (fold_0 when present)."""
        return self.chosen or self.folds[0]

    @property
    def checkpoint(self) -> Path:
        return self.fold / FINAL

    def _name_part(self, i: int) -> str | None:
        parts = self.path.name.split("__")
        return parts[i] if len(parts) == 3 else None


def is_path_argument(text: str | Path) -> bool:
    """Whether a ``-s`` argument names a folder rather than a dataset id or name."""
    text = str(text).strip()
    if _DATASET.fullmatch(text) and not (Path(text) / "plans.json").is_file():
        return False  # "902", "Dataset902_X": a dataset, even if a folder of that name is in the cwd
    return True


def trained_folds(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("fold_*") if (p / FINAL).is_file())


def _contents(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:12]) + (", …" if len(names) > 12 else "") if names else "nothing"


def resolve_checkpoint(path: str | Path, *, what: str = "checkpoint") -> Path:
    """A checkpoint file as given, or the ``checkpoint_final.pth`` of a fold folder / one-fold model folder.

    What ``-pretrained_weights``, ``weights check`` and ``weights adapt`` take. A model folder with several
    trained folds is ambiguous (the message names them); one without any says so. ``what`` names the
    argument in the messages ("pretrained weights" for ``-pretrained_weights``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} not found; give a checkpoint file (.pth), a fold folder or a model "
                        f"folder")
    if path.is_file():
        return path
    final = path / FINAL
    if final.is_file():
        return final
    folds = trained_folds(path)
    if len(folds) == 1:
        return folds[0] / FINAL
    if folds:
        raise DataError(f"model folder {path} has {len(folds)} trained folds ({', '.join(p.name for p in folds)}); "
                        f"choose one, e.g. {folds[0]}")
    if (path / "plans.json").is_file():
        raise DataError(f"model folder {path} has no trained fold: no fold_*/{FINAL} (it holds {_contents(path)}); "
                        f"expected {LAYOUT}")
    raise DataError(f"folder {path} holds no {FINAL} (neither directly nor in a fold_* folder; it holds "
                    f"{_contents(path)}); give a checkpoint file, a fold folder or a model folder")


def load_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder (or one fold folder of it); raises :class:`DataError` saying what is missing."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"model folder {path} not found; expected {LAYOUT}")
    if not path.is_dir():
        raise DataError(f"{path} is a file; give the model folder ({LAYOUT})")
    chosen = None
    if path.name.startswith("fold_") and (path.parent / "plans.json").is_file():
        if not (path / FINAL).is_file():
            raise DataError(f"fold folder {path} has no {FINAL} (it holds {_contents(path)}); a released model "
                            f"ships {FINAL} in every fold")
        chosen, path = path, path.parent
    for name in ("plans.json", "dataset.json"):
        if not (path / name).is_file():
            raise DataError(f"model folder {path} has no {name} (it holds {_contents(path)}); expected {LAYOUT}")
    plans = load_json(path / "plans.json")
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise DataError(f"{path / 'plans.json'} does not look like nnU-Net plans (no 'configurations')")
    dataset_json = load_json(path / "dataset.json")
    folds = trained_folds(path)
    if not folds:
        raise DataError(f"model folder {path} has no trained fold: no fold_*/{FINAL} (it holds {_contents(path)}); "
                        f"expected {LAYOUT}")
    return ModelFolder(path, plans, dataset_json, tuple(folds), chosen)


__all__ = ["ModelFolder", "load_model_folder", "resolve_checkpoint", "is_path_argument", "trained_folds", "FINAL", "LAYOUT"]
