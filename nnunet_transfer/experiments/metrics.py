"""Segmentation metrics on label maps (numpy), and on prediction folders written by nnU-Net."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from nnunet_transfer.errors import DataError


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """2|P∩R| / (|P|+|R|) for one label; 1.0 when the label is absent from both (nothing to find)."""
    if pred.shape != ref.shape:
        raise DataError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    p, r = pred == label, ref == label
    denom = p.sum() + r.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, r).sum() / denom)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def dice_folder(pred_folder: str | Path, ref_folder: str | Path, labels: Iterable[int], *,
                file_ending: str = ".nii.gz") -> dict:
    """Per-case and mean Dice of every prediction in ``pred_folder`` against ``ref_folder``.

    Returns ``{"per_case": {case: {label: dice}}, "mean_per_label": {label: d}, "mean": d}``.
    """
    pred_folder, ref_folder = Path(pred_folder), Path(ref_folder)
    refs = sorted(ref_folder.glob("*" + file_ending))
    if not refs:
        raise DataError(f"no reference files *{file_ending} in {ref_folder}")
    labels = list(labels)
    per_case: dict[str, dict[int, float]] = {}
    for ref_path in refs:
        pred_path = pred_folder / ref_path.name
        if not pred_path.exists():
            raise DataError(f"prediction {pred_path} missing for reference {ref_path}")
        pred, ref = _load(pred_path), _load(ref_path)
        per_case[ref_path.name[: -len(file_ending)]] = {lab: dice(pred, ref, lab) for lab in labels}
    mean_per_label = {lab: float(np.mean([c[lab] for c in per_case.values()])) for lab in labels}
    return {"per_case": per_case, "mean_per_label": mean_per_label,
            "mean": float(np.mean(list(mean_per_label.values())))}
