"""Segmentation metrics on label maps (numpy): overlap, surface distances, lesion-wise detection.

For one label, with P the predicted and R the reference voxels (boolean masks on one grid with voxel
spacing ``s`` in mm, array axis order):

* ``dice = 2|P∩R| / (|P|+|R|)``, ``precision = |P∩R| / |P|``, ``recall = |P∩R| / |R|``.
* Surfaces as MedPy defines them: ``∂X = X xor erode(X)``, with the connectivity-1 structuring element
  (face neighbours) and everything outside the image counted as background (scipy's ``border_value=0``),
  so a mask touching the image border has a surface there.
* ``d(x, ∂Y)``: the Euclidean distance in mm from voxel centre ``x`` to the nearest voxel centre of ``∂Y``,
  from ``scipy.ndimage.distance_transform_edt(~∂Y, sampling=s)`` (the exact EDT MedPy and MONAI call).
  ``D_PR = {d(p, ∂R) : p ∈ ∂P}`` and ``D_RP = {d(r, ∂P) : r ∈ ∂R}``.
* ``hd95 = percentile_95(D_PR ∪ D_RP)`` — MedPy's ``hd95`` (95th percentile, numpy's linear interpolation,
  of the pooled distances of both directions); ``hd = max(D_PR ∪ D_RP)``.
* ``assd = mean(D_PR ∪ D_RP) = (ΣD_PR + ΣD_RP) / (|∂P| + |∂R|)`` — the average symmetric surface distance of
  Heimann et al. (2009) and MedPy's ``assd`` (≥ 0.5; MedPy 0.4 averaged the two directed means instead,
  which weights the smaller surface more).
* ``nsd`` and ``hd95_max`` are those of Nikolov et al. (2021, "Clinically applicable segmentation of head
  and neck anatomy for radiotherapy") as their code, DeepMind's ``surface-distance``, computes them, on
  *surface elements* instead of surface voxels. The mask is sampled at the corners of the voxels (the
  grid shifted by half a voxel, one point more per axis); a corner whose 2×2×2 neighbourhood (2×2 in 2-D)
  holds both inside and outside voxels carries a surfel, whose area (contour length in 2-D) is a
  marching-cubes-like table entry for that neighbourhood code, scaled by the spacing (the package's
  ``lookup_tables``). ``d`` is then the Euclidean distance in mm between surfel corners (EDT on the
  corner grid), giving ``E_PR = {(d(e, ∂'R), a_e) : e ∈ ∂'P}`` and ``E_RP`` likewise, with areas ``a``.

  - ``nsd = (Σ_{E_PR, d ≤ τ} a + Σ_{E_RP, d ≤ τ} a) / (Σ_{E_PR} a + Σ_{E_RP} a)`` — the normalised
    surface Dice at tolerance τ, ``compute_surface_dice_at_tolerance``.
  - ``hd95_max = max(q_95(E_PR), q_95(E_RP))`` with ``q_95`` the area-weighted 95th percentile (the
    smallest sorted distance whose cumulative area share reaches 0.95) — ``compute_robust_hausdorff(·, 95)``.
    It is not ``max(percentile_95(D_PR), percentile_95(D_RP))`` on surface voxels (up to 0.36 mm apart on
    the tests' shapes, 1.3–2.2 mm on issue 20's 2 mm data).

  Both call the package's own functions on :func:`surfel_distances`, which equals the package's
  ``compute_surface_distances`` (tested to 1e-12) but runs on the bounding box already cut, sorts in numpy
  and never reaches the package's empty-mask branch (which uses NumPy < 2 names).
* ``nsd_voxel`` — the voxel-count approximation of the NSD, on MedPy's surfaces:
  ``(|{d ∈ D_PR : d ≤ τ}| + |{d ∈ D_RP : d ≤ τ}|) / (|D_PR| + |D_RP|)``. Each surface voxel counts once,
  which over-weights surfaces facing the fine axes on anisotropic grids and, for τ below the voxel size,
  usually gives lower values than ``nsd`` (a box moved by one 2 mm voxel, τ = 1 mm: 0.53 against 0.68;
  issue 20's data: 0.13–0.18 against 0.21–0.30). Kept only to compare with earlier results.
* Volumes in ml: ``|X|·∏s / 1000``; ``volume_diff_ml = vol(P) − vol(R)`` (signed),
  ``rel_volume_diff = (|P| − |R|) / |R|``.
* Lesion-wise detection: connected components (cc3d, 26-connectivity by default) of P and of R. A
  reference component is detected (``lesion_tp``) when it shares at least one voxel with P, else it is
  missed (``lesion_fn``); a predicted component that shares no voxel with R is a false positive
  (``lesion_fp``). ``lesion_f1 = 2·TP / (2·TP + FP + FN)``. A predicted component that covers two reference
  lesions detects both; a reference lesion split into two predicted parts is one detection, no FP.

Empty masks — never an exception, always the same values:

============================  ====  ==========  ====  =========  ======  =============================
case                          dice  distances   nsd*  precision  recall  lesions
============================  ====  ==========  ====  =========  ======  =============================
both empty                    1     0           1     1          1       TP = FP = FN = 0, F1 = 1
empty prediction, R ≠ ∅       0     inf         0     1          0       FN = #components(R), F1 = 0
empty reference, P ≠ ∅        0     inf         0     0          1       FP = #components(P), F1 = 0
============================  ====  ==========  ====  =========  ======  =============================

Distances: hd95, assd, hd95_max, hd; nsd*: nsd and nsd_voxel. The rule behind the table: a ratio with
nothing in its denominator had nothing to get wrong and is 1 (``0/0 := 1``); a distance to an empty
surface does not exist and is ``inf`` (summaries report the mean over finite values and count the
infinite ones). ``rel_volume_diff`` is 0 when both are empty and inf
when only the reference is.

Speed: distance transforms dominate, four per label (MedPy's surfaces and the surfel corners, one per
direction each). Every distance to a surface of P or R is realised inside the bounding box of P ∪ R, so
the EDTs run on that box plus a one-voxel margin — the margin keeps the erosion exact, and at the image
border the box stops where the image does, as MedPy's erosion does; the corner grid is that box plus one
point per axis (outside the image is background, as for the package).
"""
from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_transfer.errors import DataError

#: lesion-wise connected-component neighbourhoods for 3-D (cc3d's values); 2-D uses 4 / 8
CONNECTIVITIES = (6, 18, 26)

#: per label, the columns :func:`label_metrics` returns (in order), after ``case`` and ``label``
METRIC_COLUMNS = ("dice", "hd95", "assd", "nsd", "precision", "recall",
                  "lesion_tp", "lesion_fp", "lesion_fn", "lesion_f1",
                  "hd95_max", "hd", "nsd_voxel",
                  "volume_ref_ml", "volume_pred_ml", "volume_diff_ml", "rel_volume_diff",
                  "ref_voxels", "pred_voxels", "ref_lesions", "pred_lesions")
#: integer-valued columns
COUNT_COLUMNS = ("lesion_tp", "lesion_fp", "lesion_fn", "ref_voxels", "pred_voxels", "ref_lesions", "pred_lesions")
#: True: higher is better; False: lower is better; "abs": closer to 0 is better
DIRECTION = {"dice": True, "nsd": True, "nsd_voxel": True, "precision": True, "recall": True,
             "lesion_f1": True,
             "hd95": False, "hd95_max": False, "hd": False, "assd": False,
             "lesion_fp": False, "lesion_fn": False, "lesion_tp": True,
             "volume_diff_ml": "abs", "rel_volume_diff": "abs"}


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """2|P∩R| / (|P|+|R|) for one label; 1.0 when the label is absent from both (nothing to find)."""
    if pred.shape != ref.shape:
        raise DataError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    p, r = pred == label, ref == label
    denom = p.sum() + r.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, r).sum() / denom)


# --------------------------------------------------------------------------- helpers
def _ratio(num: float, den: float) -> float:
    """num / den with the module's convention 0/0 := 1."""
    return 1.0 if den == 0 else float(num) / float(den)


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    s = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise DataError(f"spacing {tuple(np.asarray(spacing).tolist())} does not fit a {ndim}-D image: "
                        f"expected {ndim} positive voxel sizes in mm (array axis order)")
    return s


def bounding_box(mask: np.ndarray, *, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        any_ = np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
        idx = np.flatnonzero(any_)
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """MedPy's surface: ``mask xor binary_erosion(mask, connectivity-1 structure)`` (outside = background)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    return mask ^ binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), iterations=1)


def _two_masks(pred, ref, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """PRED and REF as boolean arrays of one shape, both non-empty, and the spacing for their dimensions."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise DataError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    s = _spacing(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        raise DataError("surface distances need two non-empty masks "
                        f"(prediction {int(pred.sum())} voxels, reference {int(ref.sum())} voxels)")
    return pred, ref, s


def surface_distances(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(D_PR, D_RP)``: distances in mm from each surface voxel of P to ∂R, and of R to ∂P.

    Both masks must be non-empty (raises :class:`DataError` otherwise). One EDT per direction, on the
    bounding box of P ∪ R plus a one-voxel margin (exact; see the module docstring).
    """
    from scipy.ndimage import distance_transform_edt

    pred, ref, s = _two_masks(pred, ref, spacing)
    box = bounding_box(pred | ref, margin=1)
    p, r = pred[box], ref[box]
    sp, sr = surface(p), surface(r)
    d_pr = distance_transform_edt(~sr, sampling=s)[sp]
    d_rp = distance_transform_edt(~sp, sampling=s)[sr]
    return d_pr, d_rp


@functools.lru_cache(maxsize=16)
def _surfel_table(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """(neighbour-code kernel, area / length per code, code of a fully inside corner) of the reference."""
    from surface_distance import lookup_tables

    if len(spacing) == 3:
        return (lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL,
                lookup_tables.create_table_neighbour_code_to_surface_area(spacing), 0b11111111)
    return (lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL,
            lookup_tables.create_table_neighbour_code_to_contour_length(spacing), 0b1111)


def surfels(mask: np.ndarray, *, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(border, areas)``: DeepMind's surface elements of a 2-D or 3-D boolean mask.

    ``border`` is a boolean array on the corner grid (shape ``mask.shape + 1``; corner ``j`` lies between
    voxels ``j - 1`` and ``j``) marking the corners whose 2×2×2 (2×2) neighbourhood is neither all outside
    nor all inside; ``areas`` the surfel area in mm² (contour length in mm) of each marked corner, in
    ``border``'s C order. The neighbour code is the reference's correlation with its encoding kernel,
    computed as a sum of shifted copies of the zero-padded mask (outside the array = background).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise DataError(f"surface elements need a 2-D or 3-D mask, got {mask.ndim} dimensions")
    kernel, table, full = _surfel_table(tuple(float(x) for x in _spacing(spacing, mask.ndim)))
    padded = np.pad(mask.view(np.uint8), 1)
    corners = tuple(n + 1 for n in mask.shape)
    code = np.zeros(corners, np.uint8)
    for offset in np.ndindex(*kernel.shape):
        # correlate(mask, kernel)[j] = Σ_k kernel[k] · mask[j + k − 1]; padded[i] = mask[i − 1]
        code += padded[tuple(slice(o, o + n) for o, n in zip(offset, corners))] * np.uint8(kernel[offset])
    border = (code != 0) & (code != full)
    return border, table[code[border]]


def surfel_distances(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float] | None = None
                     ) -> dict[str, np.ndarray]:
    """The reference's ``compute_surface_distances(ref, pred, spacing)`` dictionary, for two non-empty masks.

    Keys ``distances_gt_to_pred``, ``distances_pred_to_gt`` (mm, from each surfel corner of one mask to
    the nearest surfel corner of the other) and ``surfel_areas_gt``, ``surfel_areas_pred``, each
    direction sorted by (distance, area) as the reference sorts it — ready for the package's
    ``compute_surface_dice_at_tolerance`` and ``compute_robust_hausdorff``. Raises :class:`DataError`
    for an empty mask (the reference's answer there is inf / nan, here the module's table applies).
    """
    from scipy.ndimage import distance_transform_edt

    pred, ref, s = _two_masks(pred, ref, spacing)
    box = bounding_box(pred | ref)
    bp, ap = surfels(pred[box], spacing=s)
    br, ar = surfels(ref[box], spacing=s)
    d_pr = distance_transform_edt(~br, sampling=s)[bp]
    d_rp = distance_transform_edt(~bp, sampling=s)[br]
    o_pr, o_rp = np.lexsort((ap, d_pr)), np.lexsort((ar, d_rp))
    return {"distances_gt_to_pred": d_rp[o_rp], "distances_pred_to_gt": d_pr[o_pr],
            "surfel_areas_gt": ar[o_rp], "surfel_areas_pred": ap[o_pr]}


def check_connectivity(connectivity: int) -> None:
    if connectivity not in CONNECTIVITIES:
        raise DataError(f"lesion connectivity {connectivity!r} is not one of {CONNECTIVITIES} "
                        f"(6 = faces, 18 = faces + edges, 26 = all neighbours); fix: e.g. --lesion-connectivity 26")


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    import cc3d

    if mask.ndim == 3:
        conn = connectivity
    elif mask.ndim == 2:
        conn = 4 if connectivity == 6 else 8
    else:
        raise DataError(f"lesion-wise detection needs a 2-D or 3-D image, got {mask.ndim} dimensions")
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=conn, return_N=True)
    return labels, int(n)


def lesion_counts(pred: np.ndarray, ref: np.ndarray, *, connectivity: int = 26) -> dict[str, int | float]:
    """Lesion-wise detection: components matched by overlap (module docstring). Counts and F1."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    check_connectivity(connectivity)
    box = bounding_box(pred | ref)
    if box is None:
        return {"lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0, "lesion_f1": 1.0, "ref_lesions": 0, "pred_lesions": 0}
    p, r = pred[box], ref[box]
    lp, n_p = _components(p, connectivity)
    lr, n_r = _components(r, connectivity)
    both = p & r
    tp = int(np.unique(lr[both]).size)  # reference components touched by the prediction
    fp = n_p - int(np.unique(lp[both]).size)  # predicted components touching no reference voxel
    fn = n_r - tp
    return {"lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn, "lesion_f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "ref_lesions": n_r, "pred_lesions": n_p}


def label_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float] | None = None,
                  nsd_tolerance: float = 1.0, connectivity: int = 26) -> dict[str, float | int]:
    """Every metric of :data:`METRIC_COLUMNS` for two boolean masks (definitions: module docstring).

    ``spacing``: voxel size in mm per array axis (default 1); ``nsd_tolerance``: τ in mm.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise DataError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    s = _spacing(spacing, pred.ndim)
    if not (isinstance(nsd_tolerance, numbers.Real) and math.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise DataError(f"NSD tolerance must be a finite distance >= 0 in mm, got {nsd_tolerance!r}")
    check_connectivity(connectivity)
    box = bounding_box(pred | ref, margin=1)
    if box is None:
        return empty_label_metrics()
    # everything below happens inside the box (exact: see the module docstring)
    pred, ref = pred[box], ref[box]
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    n_pr = int(np.count_nonzero(pred & ref))
    voxel_ml = float(np.prod(s)) / 1000.0
    out: dict[str, float | int] = {
        "dice": _ratio(2 * n_pr, n_p + n_r), "precision": _ratio(n_pr, n_p), "recall": _ratio(n_pr, n_r)}
    if n_p and n_r:
        from surface_distance import compute_robust_hausdorff, compute_surface_dice_at_tolerance

        d_pr, d_rp = surface_distances(pred, ref, spacing=s)
        pooled = np.concatenate([d_pr, d_rp])
        surf = surfel_distances(pred, ref, spacing=s)
        out.update(hd95=float(np.percentile(pooled, 95)), assd=float(pooled.mean()), hd=float(pooled.max()),
                   nsd=float(compute_surface_dice_at_tolerance(surf, nsd_tolerance)),
                   hd95_max=float(compute_robust_hausdorff(surf, 95)),
                   nsd_voxel=float((np.count_nonzero(d_pr <= nsd_tolerance) + np.count_nonzero(d_rp <= nsd_tolerance))
                                   / pooled.size))
    else:  # exactly one is empty: no surface to measure to
        out.update(hd95=math.inf, assd=math.inf, nsd=0.0, nsd_voxel=0.0, hd95_max=math.inf, hd=math.inf)
    out.update(lesion_counts(pred, ref, connectivity=connectivity))
    out.update(volume_ref_ml=n_r * voxel_ml, volume_pred_ml=n_p * voxel_ml, volume_diff_ml=(n_p - n_r) * voxel_ml,
               rel_volume_diff=(n_p - n_r) / n_r if n_r else (0.0 if n_p == 0 else math.inf),
               ref_voxels=n_r, pred_voxels=n_p)
    return {k: out[k] for k in METRIC_COLUMNS}


def empty_label_metrics() -> dict[str, float | int]:
    """The values of a label absent from both masks (the first row of the module's table)."""
    return {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "precision": 1.0, "recall": 1.0,
            "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0, "lesion_f1": 1.0, "hd95_max": 0.0, "hd": 0.0,
            "nsd_voxel": 1.0, "volume_ref_ml": 0.0, "volume_pred_ml": 0.0, "volume_diff_ml": 0.0,
            "rel_volume_diff": 0.0, "ref_voxels": 0, "pred_voxels": 0, "ref_lesions": 0, "pred_lesions": 0}


def case_metrics(pred: np.ndarray, ref: np.ndarray, *, labels: Iterable[int], spacing: Sequence[float] | None = None,
                 nsd_tolerance: float = 1.0, connectivity: int = 26) -> dict[int, dict[str, float | int]]:
    """:func:`label_metrics` of every label in ``labels`` for two label maps of one case."""
    if pred.shape != ref.shape:
        raise DataError(f"prediction and reference differ in shape: {pred.shape} vs {ref.shape}")
    out = {}
    for lab in labels:
        out[int(lab)] = label_metrics(pred == lab, ref == lab, spacing=spacing, nsd_tolerance=nsd_tolerance,
                                      connectivity=connectivity)
    return out


# --------------------------------------------------------------------------- the demo's Dice helper
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
