"""Pseudo-labels (``nnunet_transfer labels merge``): the target's labels where it annotates, the source model's
prediction elsewhere — the simple baseline against forgetting when adding a class.

The source model (an nnU-Net model folder, ``TRAINER__PLANS__CONFIGURATION``) predicts the target's training images
with nnU-Net's own predictor (probabilities saved); a new raw dataset is written whose label maps are the target's
where it labels a voxel (any value but background), and elsewhere the source's class with the highest probability
when that class is one of the *pseudo classes* and its probability is at least ``threshold``. The pseudo classes
are ``classes`` if given, else the target ``dataset.json``'s ``"unannotated"`` list, else every source class the
target's labels do not name. ``dataset.json`` is merged by name: the target's labels keep their values, a pseudo
class the target does not list gets the next free value (nnU-Net wants consecutive values), and the pseudo classes
are annotated from then on (no ``"unannotated"`` entry). Everything is checked before anything is written, and
the dataset is written into a temporary folder that is renamed at the end: a refusal or a crash leaves nothing.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.nnunet_io import dataset_name, env_folder, load_json, raw_training_cases
from nnunet_transfer.training.partial_labels import DATASET_JSON_KEY


def _plain_labels(labels: Mapping, where: str) -> dict[str, int]:
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{where} uses regions ({name!r}: {list(value)}); pseudo-labels merge label maps and "
                            f"are defined for label-based datasets only")
        out[str(name)] = int(value)
    values = sorted(out.values())
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise DataError(f"{where}: labels clash, value(s) {twice} are given to more than one name in {out}")
    return out


def plan_merge(source_labels: Mapping, target_json: Mapping, classes: Sequence[str] | None = None
               ) -> tuple[dict[str, int], dict[int, int]]:
    """(merged labels ``{name: value}``, ``{source value: merged value}`` of the pseudo classes); raises
    :class:`DataError` (one line) for a pseudo class the source does not know or the target annotates itself, and
    for labels that clash (one value under two names, an ``ignore`` label among the pseudo classes)."""
    source = _plain_labels(source_labels, "the source model's dataset.json")
    target = _plain_labels(target_json.get("labels") or {}, "the target's dataset.json")
    declared = target_json.get(DATASET_JSON_KEY)
    if classes:
        names, where = list(classes), "--classes"
    elif declared:
        names, where = list(declared), f"the target dataset.json's {DATASET_JSON_KEY!r}"
    else:
        names, where = [n for n, v in source.items() if v != 0 and n != "ignore" and n not in target], \
            "the source classes the target does not name"
    if not names:
        raise DataError(f"no class to take from the source: every source class {sorted(source)} is a label of the "
                        f"target {sorted(target)} and none is declared {DATASET_JSON_KEY!r}; name them with --classes")
    unknown = [n for n in names if n not in source or source[n] == 0 or n == "ignore"]
    if unknown:
        raise DataError(f"{where} names {unknown}, which the source model does not segment (its labels: "
                        f"{sorted(source)}); pseudo-labels can only come from classes the source knows")
    annotated = [n for n in names if n in target and n not in (declared or [])]
    if annotated:
        raise DataError(f"labels clash: {annotated} are labels the target annotates itself (values "
                        f"{[target[n] for n in annotated]}), so the source's prediction would compete with them; "
                        f"declare them under {DATASET_JSON_KEY!r} in the target's dataset.json if its label maps "
                        f"leave them as background, or leave them out of --classes")
    if "ignore" in target:
        raise DataError(f"labels clash: the target has an ignore label (value {target['ignore']}), which must stay the "
                        f"highest value; merge pseudo-labels into a dataset without one")
    merged = dict(target)
    mapping = {}
    for n in names:
        if n not in merged:
            merged[n] = max(merged.values()) + 1
        mapping[source[n]] = merged[n]
    return merged, mapping


def merge_case(target_seg: np.ndarray, probabilities: np.ndarray, mapping: Mapping[int, int],
               threshold: float) -> np.ndarray:
    """The merged label map of one case: ``target_seg`` where it is not background, else the mapped source class
    whose probability is the highest and at least ``threshold`` (background otherwise)."""
    if probabilities.shape[1:] != target_seg.shape:
        raise DataError(f"the source's probabilities have shape {probabilities.shape[1:]}, the target's label map "
                        f"{target_seg.shape}")
    best = probabilities.argmax(0)
    conf = probabilities.max(0)
    out = target_seg.copy()
    free = target_seg == 0
    for s, m in mapping.items():
        out[free & (best == s) & (conf >= threshold)] = m
    return out


def _check_new_id(new_id: int) -> Path:
    if not 1 <= new_id <= 999:
        raise DataError(f"-o {new_id}: a dataset id must be in 1..999")
    raw = env_folder("nnUNet_raw")
    taken = sorted(raw.glob(f"Dataset{new_id:03d}_*"))
    if taken:
        raise DataError(f"-o {new_id}: {taken[0]} exists already; choose a free dataset id")
    return raw


def merge_pseudo_labels(model_folder: str | Path, target: str | int, new_id: int, *, threshold: float = 0.5,
                        classes: Sequence[str] | None = None, folds: Sequence[int] | None = None,
                        checkpoint: str = "checkpoint_final.pth", device: str = "cpu") -> Path:
    """Write ``nnUNet_raw/DatasetNEW_<target name>Pseudo`` (see the module) and return its folder."""
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"--threshold {threshold}: a probability must be in [0, 1]")
    model_folder = Path(model_folder)
    if not (model_folder / "dataset.json").is_file() or not (model_folder / "plans.json").is_file():
        raise DataError(f"-m {model_folder}: not an nnU-Net model folder (TRAINER__PLANS__CONFIGURATION holding "
                        f"dataset.json, plans.json and fold_N/{checkpoint})")
    if folds is None:
        folds = sorted(int(p.name[5:]) for p in model_folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint).is_file())
    missing = [f for f in folds if not (model_folder / f"fold_{f}" / checkpoint).is_file()]
    if not folds or missing:
        raise DataError(f"-m {model_folder}: no {checkpoint} in fold(s) {missing or 'fold_*'}; train the source first "
                        f"or name the folds with -f")
    name = dataset_name(target)
    raw = _check_new_id(new_id)
    target_json = load_json(raw / name / "dataset.json")
    merged_labels, mapping = plan_merge(load_json(model_folder / "dataset.json").get("labels") or {}, target_json,
                                        classes)
    cases, ending = raw_training_cases(name)
    new_name = f"Dataset{new_id:03d}_{name.split('_', 1)[1]}Pseudo"
    from nnunet_transfer.checkpoints import read_checkpoint  # lazy: torch

    for f in folds:  # refuses a checkpoint whose pickle would run code, before nnU-Net's own torch.load does
        read_checkpoint(model_folder / f"fold_{f}" / checkpoint, mmap=True)
    with tempfile.TemporaryDirectory(dir=raw, prefix=f".{new_name}.") as tmp:
        tmp = Path(tmp)
        probs = _predict(model_folder, folds, checkpoint, cases, tmp / "prediction", device)
        out = tmp / new_name
        _write(out, cases, ending, probs, mapping, threshold, target_json, merged_labels, model_folder, classes)
        final = raw / new_name
        out.rename(final)
    return final


def _predict(model_folder: Path, folds, checkpoint: str, cases: Mapping, out: Path, device: str) -> Path:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), tuple(folds), checkpoint_name=checkpoint)
    out.mkdir(parents=True)
    ids = sorted(cases)
    predictor.predict_from_files_sequential([list(cases[c]["images"]) for c in ids],
                                            [str(out / c) for c in ids], save_probabilities=True,
                                            overwrite=True, folder_with_segs_from_prev_stage=None)
    return out


def _write(out: Path, cases: Mapping, ending: str, probs: Path, mapping: Mapping[int, int], threshold: float,
           target_json: Mapping, merged_labels: Mapping[str, int], model_folder: Path, classes) -> None:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    io = determine_reader_writer_from_dataset_json(dict(target_json), next(iter(cases.values()))["images"][0])()
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    counts = {m: 0 for m in mapping.values()}
    for case in sorted(cases):
        seg, props = io.read_seg(cases[case]["label"])
        seg = seg[0].astype(np.int16)
        pseudo = set(np.unique(seg).tolist()) & set(mapping.values()) - {0}
        if pseudo:
            raise DataError(f"labels clash: the target's label map of {case} holds value(s) {sorted(pseudo)} of the "
                            f"pseudo classes, which it was said not to annotate")
        p = np.load(probs / f"{case}.npz")["probabilities"]
        merged = merge_case(seg, p, mapping, threshold)
        for m in counts:
            counts[m] += int(((merged == m) & (seg == 0)).sum())
        io.write_seg(merged.astype(np.uint8), str(out / "labelsTr" / f"{case}{ending}"), props)
        for image in cases[case]["images"]:
            shutil.copy2(image, out / "imagesTr" / Path(image).name)
    dj = {k: v for k, v in target_json.items() if k != DATASET_JSON_KEY}
    dj["labels"] = dict(sorted(merged_labels.items(), key=lambda kv: kv[1]))
    dj["numTraining"] = len(cases)
    dj["name"] = out.name.split("_", 1)[1]
    names = {v: n for n, v in merged_labels.items()}
    dj["pseudo_labels"] = {"source_model": str(model_folder), "threshold": threshold,
                           "classes": [names[m] for m in mapping.values()],
                           "voxels": {names[m]: c for m, c in counts.items()}}
    (out / "dataset.json").write_text(json.dumps(dj, indent=2))


__all__ = ["plan_merge", "merge_case", "merge_pseudo_labels"]
