"""``evaluate`` on folders of NIfTI files: references written as the generated datasets are (nibabel),
predictions as nnU-Net writes them (SimpleITK); values against the metric functions on the arrays."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.data.synthetic import _save_nifti
from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.evaluate import evaluate_folders, read_per_case
from nnunet_transfer.experiments.metrics import METRIC_COLUMNS, case_metrics

SPACING = (2.0, 0.8, 0.9)  # (z, y, x) mm
STORED = tuple(float(np.float32(s)) for s in SPACING)  # what the NIfTI header gives back


def write_pred(arr: np.ndarray, spacing, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # ITK spacing is (x, y, z)
    sitk.WriteImage(img, str(path))


def reference_cases() -> dict[str, np.ndarray]:
    base = np.zeros((12, 20, 18), np.uint8)
    base[3:9, 4:15, 3:14] = 1
    with_lesions = base.copy()
    with_lesions[4:6, 5:8, 4:7] = 2
    with_lesions[6:8, 10:13, 9:12] = 2
    return {"case_a": with_lesions, "case_b": base.copy(), "case_c": with_lesions.copy()}


def prediction_cases(refs) -> dict[str, np.ndarray]:
    a = np.roll(refs["case_a"], 1, axis=0)  # shifted one voxel along z (2.0 mm)
    b = refs["case_b"].copy()
    b[1, 1, 1] = 2  # a false-positive lesion where the reference has none
    c = refs["case_c"].copy()
    c[c == 2] = 1  # both lesions missed: empty prediction of label 2
    return {"case_a": a, "case_b": b, "case_c": c}


@pytest.fixture
def folders(tmp_path):
    refs = reference_cases()
    preds = prediction_cases(refs)
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    for case, arr in refs.items():
        _save_nifti(arr, SPACING, tmp_path / "ref" / f"{case}.nii.gz")
        write_pred(preds[case], SPACING, tmp_path / "pred" / f"{case}.nii.gz")
    (tmp_path / "pred" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1,
                                                                           "lesion": 2}}))
    return tmp_path, refs, preds


def test_per_case_values_equal_the_metrics_on_the_arrays(folders):
    root, refs, preds = folders
    res = evaluate_folders(root / "pred", root / "ref", root / "ev", nsd_tolerance=1.5, progress=False)
    rows = read_per_case(root / "ev" / "per_case.csv")
    assert [(r["case"], r["label"]) for r in rows] == [(c, lab) for c in sorted(refs) for lab in (1, 2)]
    for r in rows:
        want = case_metrics(preds[r["case"]], refs[r["case"]], labels=[r["label"]], spacing=STORED,
                            nsd_tolerance=1.5)[r["label"]]
        for m in METRIC_COLUMNS:
            assert r[m] == pytest.approx(want[m], abs=1e-12) or (math.isinf(r[m]) and math.isinf(want[m])), (r, m)
    by = {(r["case"], r["label"]): r for r in rows}
    # spacing read in array order from the files: a one-voxel shift along z moves the surface by 2.0 mm
    assert by[("case_a", 1)]["hd"] == pytest.approx(2.0, abs=1e-12)
    assert by[("case_b", 2)]["lesion_fp"] == 1 and by[("case_b", 2)]["precision"] == 0.0  # label 2 only predicted
    assert by[("case_c", 2)]["dice"] == 0.0 and math.isinf(by[("case_c", 2)]["hd95"])  # empty prediction
    assert by[("case_c", 2)]["lesion_fn"] == 2
    with open(root / "ev" / "per_case.csv") as f:
        header = next(csv.reader(f))
    assert header[:12] == ["case", "label", "dice", "hd95", "assd", "nsd", "precision", "recall", "lesion_tp",
                           "lesion_fp", "lesion_fn", "lesion_f1"]
    assert res.summary["label_names"] == {"1": "organ", "2": "lesion"}


@pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # the reference's scipy imports
def test_nsd_and_hd95_max_from_files_equal_deepminds_surface_distance(folders):
    import surface_distance as sd

    root, refs, preds = folders
    rows = evaluate_folders(root / "pred", root / "ref", root / "ev", nsd_tolerance=1.5, progress=False).rows
    checked = 0
    for r in rows:
        p, q = preds[r["case"]] == r["label"], refs[r["case"]] == r["label"]
        if p.any() and q.any():
            want = sd.compute_surface_distances(q, p, STORED)  # reference first, as the package names it
            assert r["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(want, 1.5), abs=1e-12)
            assert r["hd95_max"] == pytest.approx(sd.compute_robust_hausdorff(want, 95), abs=1e-12)
            checked += 1
    assert checked >= 3
    summary = json.loads((root / "ev" / "summary.json").read_text())
    assert summary["nsd_definition"] == "surface-distance surfels"  # older outputs counted voxels, no key


def test_summary_statistics_over_finite_values(folders):
    root, refs, preds = folders
    evaluate_folders(root / "pred", root / "ref", root / "ev", progress=False)
    summary = json.loads((root / "ev" / "summary.json").read_text())
    rows = read_per_case(root / "ev" / "per_case.csv")
    for lab in (1, 2):
        for m in ("dice", "hd95", "assd", "nsd", "lesion_f1"):
            vals = np.array([r[m] for r in rows if r["label"] == lab])
            fin = vals[np.isfinite(vals)]
            s = summary["per_label"][str(lab)][m]
            assert s["n"] == fin.size and s["n_infinite"] == vals.size - fin.size
            assert s["mean"] == pytest.approx(fin.mean()) and s["median"] == pytest.approx(np.median(fin))
            assert s["sd"] == (pytest.approx(fin.std(ddof=1)) if fin.size > 1 else None)
    assert summary["per_label"]["2"]["hd95"]["n_infinite"] == 2  # case_b (no reference), case_c (no prediction)
    pooled = summary["lesions_pooled"]["2"]
    tp, fp, fn = (sum(r[k] for r in rows if r["label"] == 2) for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (tp, fp, fn)
    assert pooled["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert summary["cases"] == sorted(refs) and summary["n_cases"] == 3 and summary["run"] is None
    assert summary["spacing_mm"]["case_a"] == list(STORED)


def test_parallel_equals_serial_and_labels_can_be_chosen(folders):
    root, _, _ = folders
    serial = evaluate_folders(root / "pred", root / "ref", root / "s", progress=False)
    evaluate_folders(root / "pred", root / "ref", root / "p", num_processes=2, progress=False)
    assert (root / "s" / "per_case.csv").read_text() == (root / "p" / "per_case.csv").read_text()
    assert serial.labels == [1, 2]
    only = evaluate_folders(root / "pred", root / "ref", root / "one", labels=[2], progress=False)
    assert {r["label"] for r in only.rows} == {2}


def test_label_absent_from_both_in_one_case_gets_the_documented_values(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    a = np.zeros((6, 8, 8), np.uint8)
    a[2:4, 2:5, 2:5] = 1
    b = a.copy()
    b[3, 3, 3] = 2
    for case, arr in (("x", a), ("y", b)):
        _save_nifti(arr, SPACING, tmp_path / "ref" / f"{case}.nii.gz")
        write_pred(arr, SPACING, tmp_path / "pred" / f"{case}.nii.gz")
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev", progress=False)
    row = next(r for r in res.rows if r["case"] == "x" and r["label"] == 2)
    assert (row["dice"], row["hd95"], row["nsd"], row["lesion_f1"], row["ref_voxels"]) == (1.0, 0.0, 1.0, 1.0, 0)


@pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # the reference's scipy imports
def test_2d_png_is_evaluated_in_2d(tmp_path):
    from medpy.metric import binary as mb
    from skimage.io import imsave

    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    rng = np.random.default_rng(0)
    from scipy import ndimage

    r = (ndimage.gaussian_filter(rng.normal(size=(40, 50)), 2) > 0.1).astype(np.uint8)
    p = (ndimage.gaussian_filter(rng.normal(size=(40, 50)), 2) > 0.1).astype(np.uint8)
    imsave(tmp_path / "ref" / "img.png", r, check_contrast=False)
    imsave(tmp_path / "pred" / "img.png", p, check_contrast=False)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "ev", progress=False)
    row = res.rows[0]
    assert row["hd95"] == pytest.approx(mb.hd95(p, r), abs=1e-12)
    assert row["assd"] == pytest.approx(mb.assd(p, r), abs=1e-12)
    import surface_distance as sd  # and the 2-D surfels (contour lengths) of the NSD reference

    want = sd.compute_surface_distances(r.astype(bool), p.astype(bool), (1.0, 1.0))
    assert row["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(want, 1.0), abs=1e-12)
    assert row["hd95_max"] == pytest.approx(sd.compute_robust_hausdorff(want, 95), abs=1e-12)


def test_run_is_recorded(folders, tmp_path):
    root, _, _ = folders
    fold = tmp_path / "results" / "T__P__C" / "fold_0"
    fold.mkdir(parents=True)
    with pytest.raises(DataError, match="is not a fold folder"):
        evaluate_folders(root / "pred", root / "ref", root / "ev", run=fold, progress=False)
    assert not (root / "ev").exists()
    (fold / "transfer_config.json").write_text("{}")
    res = evaluate_folders(root / "pred", root / "ref", root / "ev", run=fold, progress=False)
    assert res.summary["run"] == str(fold.resolve()) and res.summary["run_given"]
    inside = evaluate_folders(root / "pred", root / "ref", fold / "test_eval", progress=False)
    assert inside.summary["run"] == str(fold.resolve()) and not inside.summary["run_given"]


# --------------------------------------------------------------------------- bad input
def _fails(root, match, **kw):
    with pytest.raises(DataError, match=match):
        evaluate_folders(root / "pred", root / "ref", root / "ev", progress=False, **kw)
    assert not (root / "ev").exists()  # nothing half-written


def test_shape_mismatch(folders):
    root, _, _ = folders
    write_pred(np.zeros((12, 20, 17), np.uint8), SPACING, root / "pred" / "case_b.nii.gz")
    _fails(root, r"case case_b: prediction .* has shape \(12, 20, 17\) but the reference .* has \(12, 20, 18\)")
    _fails(root, r"case case_b: prediction .* has shape", num_processes=2)  # raised in a worker, same error


def test_spacing_mismatch(folders):
    root, refs, preds = folders
    write_pred(preds["case_b"], (2.0, 0.8, 1.2), root / "pred" / "case_b.nii.gz")
    _fails(root, r"case case_b: prediction .* has spacing \(2\.0, 0\.8, 1\.2\) mm but the reference")


def test_mismatched_case_sets(folders):
    root, _, _ = folders
    (root / "pred" / "case_b.nii.gz").unlink()
    write_pred(np.zeros((2, 2, 2)), SPACING, root / "pred" / "other.nii.gz")
    _fails(root, r"1 reference case\(s\) have no prediction in .*: case_b; 1 prediction\(s\) have no reference "
                 r"in .*: other")


def test_label_absent_from_every_file(folders):
    root, _, _ = folders
    _fails(root, r"label\(s\) 3 occur in none of the 3 reference and prediction files \(labels found: 1, 2\); "
                 r"fix: --labels 1 2", labels=[1, 3])


def test_other_bad_arguments(folders):
    root, _, _ = folders
    _fails(root, "--nsd-tolerance -1", nsd_tolerance=-1)
    _fails(root, "connectivity 4", connectivity=4)
    _fails(root, "-np 0", num_processes=0)
    _fails(root, "label -1 is not a label value", labels=[-1])
    with pytest.raises(DataError, match="is the prediction folder"):
        evaluate_folders(root / "pred", root / "ref", root / "pred", progress=False)
    with pytest.raises(DataError, match="reference folder .* does not exist"):
        evaluate_folders(root / "pred", root / "nope", root / "ev", progress=False)


def test_command_line(folders, capsys):
    root, _, _ = folders
    assert main(["evaluate", str(root / "pred"), str(root / "ref"), "-o", str(root / "ev"), "--nsd-tolerance",
                 "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evaluated 3 cases" in out and "label 2 (lesion)" in out
    assert json.loads((root / "ev" / "summary.json").read_text())["nsd_tolerance_mm"] == 2.0
    assert main(["evaluate", str(root / "pred"), str(root / "ref"), "-o", str(root / "ev2"), "--labels", "7",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnunet_transfer evaluate: error: label(s) 7 occur in none")
    assert not (root / "ev2").exists()
