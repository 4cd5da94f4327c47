"""Generated CT-like datasets in nnU-Net raw format, for tests and the demo.

Each case holds an irregular "organ" (label 1: a smooth random blob, randomly placed, sized and
oriented) with one or two "lesions" inside it (label 2), in a textured background with a few organ-like
distractor blobs that are *not* labelled, so a network must learn shape and context, not a threshold.

The *target* domain imitates a lower-quality scanning centre: less contrast between organ, lesion and
background, an intensity offset (other calibration), more noise, a multiplicative bias field and a
coarser, anisotropic voxel spacing. Everything is deterministic given the seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from nnunet_transfer.errors import DataError

LABELS = {"background": 0, "organ": 1, "lesion": 2}
#: a third foreground class for targets that add a label the source never saw: the distractor blobs
EXTRA_LABEL = ("cyst", 3)


@dataclass(frozen=True)
class Domain:
    """Appearance of one scanning centre (intensities in HU-like units)."""

    background: float = -80.0
    organ: float = 60.0
    lesion: float = 140.0
    distractor: float = 55.0
    noise_std: float = 12.0
    texture_std: float = 15.0
    bias_strength: float = 0.0  # peak relative amplitude of the multiplicative bias field
    offset: float = 0.0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (z, y, x) in mm


SOURCE = Domain()
TARGET = Domain(background=-40.0, organ=45.0, lesion=85.0, distractor=45.0, noise_std=22.0,
                texture_std=20.0, bias_strength=0.25, offset=30.0, spacing=(1.5, 1.0, 1.0))


def _smooth_blob(rng: np.random.Generator, grid: np.ndarray, center: np.ndarray, radii: np.ndarray,
                 roughness: float) -> np.ndarray:
    """Boolean mask of a randomly rotated ellipsoid with a smoothly perturbed surface (grid in mm)."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    d = np.tensordot(q.T, grid - center[:, None, None, None], axes=1)
    r = np.sqrt(sum((d[i] / radii[i]) ** 2 for i in range(3)))
    shape = grid.shape[1:]
    wobble = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(2.0, min(shape) / 8))
    wobble /= np.abs(wobble).max() + 1e-12
    return r < 1.0 + roughness * wobble


def make_case(rng: np.random.Generator, domain: Domain, physical_size: float = 40.0, *,
              label_distractors: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image and its label map, sampled on the domain's grid (arrays in (z, y, x) order).

    ``label_distractors``: the organ-like distractor blobs get label 3 (:data:`EXTRA_LABEL`) instead of
    staying background — the same images, one more class.
    """
    spacing = np.asarray(domain.spacing, dtype=float)
    shape = tuple(int(round(physical_size / s)) for s in spacing)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))

    organ_center = rng.uniform(0.35, 0.65, size=3) * physical_size
    organ_radii = rng.uniform(0.17, 0.27, size=3) * physical_size
    organ = _smooth_blob(rng, grid, organ_center, organ_radii, roughness=0.25)

    lesion = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 3)):
        # lesion centred at a point inside the organ, so it never sticks out much
        inside = np.argwhere(organ)
        c = inside[rng.integers(len(inside))] * spacing
        lesion |= _smooth_blob(rng, grid, c, rng.uniform(0.08, 0.13, size=3) * physical_size, 0.2)
    lesion &= organ

    distractors = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(0.1, 0.9, size=3) * physical_size
        distractors |= _smooth_blob(rng, grid, c, rng.uniform(0.06, 0.12, size=3) * physical_size, 0.3)
    distractors &= ~ndimage.binary_dilation(organ, iterations=2)

    img = np.full(shape, domain.background, dtype=np.float64)
    img[distractors] = domain.distractor
    img[organ] = domain.organ
    img[lesion] = domain.lesion
    img = ndimage.gaussian_filter(img, sigma=0.8)
    img += domain.texture_std * ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0) * 3.0
    if domain.bias_strength:
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=min(shape) / 3)
        field /= np.abs(field).max() + 1e-12
        img = img * (1.0 + domain.bias_strength * field) + domain.bias_strength * 50.0 * field
    img += domain.offset + rng.normal(scale=domain.noise_std, size=shape)

    seg = np.zeros(shape, dtype=np.uint8)
    seg[organ] = LABELS["organ"]
    seg[lesion] = LABELS["lesion"]
    if label_distractors:
        seg[distractors] = EXTRA_LABEL[1]
    return img.astype(np.float32), seg


def _save_nifti(arr: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    # NIfTI stores (x, y, z); our arrays are (z, y, x) as nnU-Net reads them back through SimpleITK
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), affine), str(path))


def make_dataset(raw_root: str | Path, dataset_id: int, name: str, domain: Domain, *, n_train: int,
                 n_test: int = 0, seed: int = 0, physical_size: float = 40.0,
                 label_distractors: bool = False, unannotated: tuple[str, ...] = (),
                 declare_unannotated: bool = False) -> Path:
    """Write ``DatasetXXX_name`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json) under raw_root.

    ``unannotated``: label names (of :data:`LABELS`) whose voxels the *training* label maps call background —
    a target that labels only its new class (``label_distractors``) while the organ and lesion are in every
    image; ``dataset.json`` still lists every label (the union the network outputs) and, with
    ``declare_unannotated``, names them under ``"unannotated"``. The test label maps keep every class."""
    if not 1 <= dataset_id <= 999:
        raise DataError(f"dataset id must be in 1..999, got {dataset_id}")
    unknown = [n for n in unannotated if n not in LABELS or LABELS[n] == 0]
    if unknown:
        raise DataError(f"unannotated labels {unknown} are not foreground labels of the generated data {LABELS}")
    if n_train < 2:
        raise DataError(f"n_train must be at least 2 (nnU-Net needs a train/val split), got {n_train}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"{name.lower()}_{i:03d}"
        img, seg = make_case(rng, domain, physical_size, label_distractors=label_distractors)
        if split == "Tr":
            for n in unannotated:
                seg[seg == LABELS[n]] = 0
        _save_nifti(img, domain.spacing, folder / f"images{split}" / f"{case}_0000.nii.gz")
        _save_nifti(seg, domain.spacing, folder / f"labels{split}" / f"{case}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {**LABELS, **({EXTRA_LABEL[0]: EXTRA_LABEL[1]} if label_distractors else {})},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        **({"unannotated": list(unannotated)} if unannotated and declare_unannotated else {}),
        "name": name,
        "description": "nnunet-transfer generated data: " + repr(domain),
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def make_transfer_pair(raw_root: str | Path, *, source_id: int = 901, target_id: int = 902,
                       n_source: int = 12, n_target: int = 6, n_test: int = 4, seed: int = 0,
                       physical_size: float = 40.0) -> tuple[str, str]:
    """A source dataset (good scanner) and a smaller target dataset (low-quality centre).

    Returns the two dataset folder names (``Dataset901_TransferSource``, ``Dataset902_TransferTarget``).
    """
    src = make_dataset(raw_root, source_id, "TransferSource", SOURCE, n_train=n_source, n_test=n_test,
                       seed=seed, physical_size=physical_size)
    tgt = make_dataset(raw_root, target_id, "TransferTarget", TARGET, n_train=n_target, n_test=n_test,
                       seed=seed + 1, physical_size=physical_size)
    return src.name, tgt.name


__all__ = ["Domain", "SOURCE", "TARGET", "LABELS", "EXTRA_LABEL", "make_case", "make_dataset", "make_transfer_pair"]
