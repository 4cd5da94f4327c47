"""A real validation of a run's snapshots: the curve behind ``--convergence-from validation``.

nnU-Net's per-epoch pseudo-Dice is measured on a few random validation *patches*; this predicts the
fold's whole validation cases instead, for every snapshot:

1. the validation cases are ``splits_final.json[fold]["val"]`` of the preprocessed dataset (the split
   ``nnUNetv2_train`` wrote when it first trained the dataset); the fold is the run folder's
   ``fold_<k>``;
2. each case is read from nnU-Net's *preprocessed* data (``$nnUNet_preprocessed/<Dataset>/<data_identifier>``)
   and predicted with nnU-Net's own predictor (``nnUNetPredictor.predict_logits_from_preprocessed_data``:
   sliding window, tile step 0.5, Gaussian weighting; no test-time mirroring unless asked), the
   logits turned into a segmentation by nnU-Net's label manager;
3. Dice per foreground label (or region) and case is nnU-Net's ``2·TP / (2·TP + FP + FN)`` (NaN when the
   label is in neither; voxels of the ignore label left out); the snapshot's value is nnU-Net's
   ``foreground_mean``: the mean over cases (NaN skipped) per label, then the mean over labels.

The Dice is computed on the preprocessed grid (resampled, cropped to the non-zero region; voxels the
crop marked ``-1`` count as background), not in the original image space of nnU-Net's final
validation, so values can differ slightly from its ``summary.json``; the ranking of epochs is what
the convergence epoch needs.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nnunet_transfer.analysis.activations import _unpack, preprocessed_folder
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import env_folder, load_json


def run_fold(run: str | Path) -> int:
    """``…/fold_3`` -> 3; ``fold_all`` has no validation cases."""
    name = Path(run).name
    if name == "fold_all":
        raise DataError(f"run {run} was trained on fold 'all': it has no validation cases; use "
                        f"--convergence-from ema (nnU-Net's logged curve) instead")
    m = re.fullmatch(r"fold_(\d+)", name)
    if not m:
        raise DataError(f"run folder {run} is not named fold_<k>, so its validation fold is unknown; give the "
                        f"fold folder nnUNetv2_train wrote, e.g. .../Trainer__Plans__Config/fold_0")
    return int(m.group(1))


def validation_cases(dataset_name: str, fold: int, *, available: Sequence[str] | None = None) -> list[str]:
    """``splits_final.json[fold]["val"]`` of the preprocessed dataset, checked against ``available``."""
    path = env_folder("nnUNet_preprocessed") / dataset_name / "splits_final.json"
    if not path.is_file():
        raise DataError(f"{path} not found: the validation split is unknown; nnUNetv2_train writes it when it "
                        f"trains a fold of {dataset_name} (or use --convergence-from ema)")
    splits = load_json(path)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "val" in s for s in splits):
        raise DataError(f"{path} is not an nnU-Net split file (a list of {{'train': [...], 'val': [...]}})")
    if fold >= len(splits):
        raise DataError(f"{path} has {len(splits)} folds; the run is fold {fold}")
    val = [str(c) for c in splits[fold]["val"]]
    if not val:
        raise DataError(f"fold {fold} of {path} has no validation cases; use --convergence-from ema")
    if available is not None:
        missing = sorted(set(val) - set(available))
        if missing:
            raise DataError(f"validation case(s) {missing[:5]}{' …' if len(missing) > 5 else ''} of fold {fold} "
                            f"({path}) are not in the preprocessed folder; run nnUNetv2_preprocess for this "
                            f"configuration")
    return val


def case_dice(pred: np.ndarray, ref: np.ndarray, labels_or_regions: Sequence, *,
              ignore_label: int | None = None) -> list[float]:
    """Dice of every foreground label/region in one case, as nnU-Net's ``compute_metrics``.

    ``Dice = 2·TP / (2·TP + FP + FN)``, NaN when ``TP + FP + FN = 0``; voxels whose reference is the
    ignore label are not counted.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    ignore = (ref == ignore_label) if ignore_label is not None else None
    out = []
    for r in labels_or_regions:
        tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(ref, r), region_or_label_to_mask(pred, r), ignore)
        out.append(float("nan") if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn)))
    return out


def foreground_mean(per_case: Sequence[Sequence[float]]) -> float:
    """nnU-Net's ``foreground_mean`` Dice: mean over cases per label (NaN skipped), then over labels.

    A label that is NaN in every case (in no reference and never predicted) is left out, where
    nnU-Net's summary would be NaN as a whole.
    """
    arr = np.asarray(per_case, dtype=np.float64)
    if arr.size == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN label gives NaN, skipped below
        per_label = np.nanmean(arr, axis=0)
        return float(np.nanmean(per_label)) if np.isfinite(per_label).any() else float("nan")


@dataclass
class SnapshotValidator:
    """Predicts the validation cases of one fold with any network of the analysis' plans.

    Build it with :meth:`open`; :meth:`dice` validates one network (weights loaded already).
    """

    predictor: Any
    dataset: Any
    cases: list[str]
    fold: int
    labels_or_regions: list
    ignore_label: int | None
    mirroring: bool

    @classmethod
    def open(cls, *, dataset_name: str, plans: dict, configuration: str, dataset_json: dict, template: torch.nn.Module,
             run: str | Path, device: torch.device, mirroring: bool = False) -> "SnapshotValidator":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        if cm.previous_stage_name is not None:
            raise ConfigError(f"configuration {configuration!r} is a cascade stage (previous stage "
                              f"{cm.previous_stage_name!r}): --convergence-from validation does not predict cascades; "
                              f"use --convergence-from ema")
        fold = run_fold(run)
        folder = preprocessed_folder(dataset_name, cm.data_identifier, configuration)
        ds_cls = infer_dataset_class(str(folder))
        ids = list(ds_cls.get_identifiers(str(folder)))
        cases = validation_cases(dataset_name, fold, available=ids)
        _unpack(folder)
        lm = pm.get_label_manager(dataset_json)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, allow_tqdm=False)
        predictor.manual_initialization(copy.deepcopy(template).eval(), pm, cm, None, dataset_json, "analyze",
                                        tuple(range(len(cm.patch_size))) if mirroring else None)
        return cls(predictor=predictor, dataset=ds_cls(str(folder), identifiers=cases), cases=cases, fold=fold,
                   labels_or_regions=list(lm.foreground_regions if lm.has_regions else lm.foreground_labels),
                   ignore_label=lm.ignore_label, mirroring=mirroring)

    def segment(self, state: dict[str, torch.Tensor], case: str) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, reference)`` of one case on the preprocessed grid, ``(x, y, z)`` int arrays."""
        data, seg, _, _ = self.dataset.load_case(case)
        self.predictor.list_of_parameters = [state]
        logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)).float())
        pred = self.predictor.label_manager.convert_logits_to_segmentation(logits)
        pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        ref = np.asarray(seg)[0]
        return pred, np.where(ref < 0, 0, ref)  # -1 = outside the non-zero crop: background

    def dice(self, state: dict[str, torch.Tensor]) -> tuple[float, list[list[float]]]:
        """``(foreground mean Dice, per case × label Dice)`` of the network holding ``state``."""
        per_case = []
        for case in self.cases:
            pred, ref = self.segment(state, case)
            per_case.append(case_dice(pred, ref, self.labels_or_regions, ignore_label=self.ignore_label))
        return foreground_mean(per_case), per_case

    def details(self) -> dict:
        return {"validation": {"fold": self.fold, "cases": list(self.cases),
                               "labels_or_regions": [list(r) if isinstance(r, tuple) else r for r in self.labels_or_regions],
                               "tile_step_size": 0.5, "gaussian": True, "mirroring": self.mirroring,
                               "space": "preprocessed", "aggregate": "nnU-Net foreground_mean (cases, then labels)"}}


__all__ = ["SnapshotValidator", "case_dice", "foreground_mean", "run_fold", "validation_cases"]
