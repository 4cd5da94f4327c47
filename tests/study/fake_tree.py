"""A study on a fake nnU-Net tree, for unit tests and the report benchmark: no training.

``make_tree`` writes a raw dataset of small label maps, the real plans of ``tests/data`` as its preprocessed
plans, and a study file. ``finish_run`` makes a run look exactly as ``study run`` leaves a finished one: its
``run.json``, nnU-Net's fold folder with a ``checkpoint_final.pth`` holding a training log, the predictions
with their marker, and the state — so ``study status`` / ``study report`` read it as they read a real one.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np

DATA = Path(__file__).parents[1] / "data"
DATASET_ID, DATASET = 950, "Dataset950_Fake"


def set_env(monkeypatch, root: Path) -> None:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))


def write_label(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path))


def blob(rng: np.random.Generator, shape, radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    c = [s / 2 + rng.uniform(-2, 2) for s in shape]
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    seg = (r < radius).astype(np.uint8)
    seg[r < radius / 3] = 2
    return seg


def make_tree(root: Path, *, n_cases: int = 8, shape=(16, 16, 16), study_text: str | None = None,
              seed: int = 0) -> Path:
    """The dataset and a study file ``root/study.toml`` (``study_text``: its body; default two strategies)."""
    rng = np.random.default_rng(seed)
    raw = root / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        seg = blob(rng, shape, rng.uniform(4, 6))
        write_label(raw / "labelsTr" / f"case_{i:03d}.nii.gz", seg)
        write_label(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz", seg * 50)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                    "numTraining": n_cases, "file_ending": ".nii.gz", "name": "Fake"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    pre = root / "preprocessed" / DATASET
    pre.mkdir(parents=True, exist_ok=True)
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    plans["dataset_name"] = DATASET
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy(raw / "dataset.json", pre / "dataset.json")
    text = study_text if study_text is not None else DEFAULT_STUDY
    path = root / "study.toml"
    path.write_text(textwrap.dedent(text))
    return path


DEFAULT_STUDY = """
[study]
name = "fake"
target = 950
configuration = "3d_fullres"
baseline = "scratch"
device = "cpu"

[splits]
n_train = [2, "all"]
test = 3
val = 1

[settings]
num_epochs = 4
seed = 0

[scoring]
resamples = 200

[[strategy]]
name = "scratch"
trainer = "nnUNetTrainerTransferBase"

[[strategy]]
name = "frozen"
trainer = "nnUNetTrainerFrozenEncoder"
"""


def fake_log(epochs: int, *, seconds_per_epoch: float = 10.0, start: float = 1000.0, rng=None) -> dict:
    """nnU-Net's ``checkpoint["logging"]`` for ``epochs`` epochs."""
    rng = rng or np.random.default_rng(0)
    ema = list(np.minimum(1.0, np.linspace(0.2, 0.9, epochs) + rng.normal(0, 0.01, epochs)))
    starts = [start + seconds_per_epoch * i for i in range(epochs)]
    return {"mean_fg_dice": ema, "ema_fg_dice": ema, "train_losses": [1.0] * epochs, "val_losses": [1.0] * epochs,
            "lrs": [0.01] * epochs, "epoch_start_timestamps": starts,
            "epoch_end_timestamps": [s + seconds_per_epoch for s in starts], "dice_per_class_or_region": [[0.5]] * epochs}


def finish_run(study, run, definition: dict, *, quality: float = 0.9, seed: int = 0) -> None:
    """Make ``run`` look finished: run.json, fold folder + checkpoint_final, predictions (+ marker), state."""
    import torch

    from nnunet_transfer.study.state import (PRED_MARKER, RUN_FILE, file_stamp, results_folder, run_dir,
                                             update_state, write_json)
    from nnunet_transfer.study.table import test_folder

    folder = run_dir(study, run)
    write_json(folder / RUN_FILE, definition)
    fold = results_folder(study, run)
    fold.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.save({"logging": fake_log(run.num_epochs, rng=rng), "trainer_name": run.trainer,
                "current_epoch": run.num_epochs}, fold / "checkpoint_final.pth")
    pred = folder / "pred"
    pred.mkdir(parents=True, exist_ok=True)
    labels = test_folder(study, run.fold) / "labelsTs"
    import SimpleITK as sitk

    for case in run.test:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f"{case}.nii.gz")))
        out = ref.copy()
        flip = rng.random(ref.shape) > quality  # a prediction that is wrong on a fraction of the voxels near the mask
        out[flip & (ref > 0)] = 0
        write_label(pred / f"{case}.nii.gz", out)
    write_json(pred / PRED_MARKER, {"checkpoint": file_stamp(fold / "checkpoint_final.pth"), "cases": len(run.test)})
    update_state(study, run, state="done", epochs_trained=run.num_epochs, seconds=1.0, attempt=1)
