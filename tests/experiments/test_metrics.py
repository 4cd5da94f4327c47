"""Metrics on analytic shapes, against a brute-force surface computation, against MedPy (Dice, HD95, ASSD,
HD) and against DeepMind's surface-distance (NSD, hd95_max)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.metrics import (METRIC_COLUMNS, case_metrics, label_metrics, lesion_counts,
                                                 surface_distances, surfel_distances, surfels)

ANISO = (2.5, 0.7, 1.1)
EXACT = 1e-12


def ball(shape, spacing, center_mm, radius_mm) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    return np.sqrt(((grid - np.asarray(center_mm, float)[:, None, None, None]) ** 2).sum(0)) <= radius_mm


def brute_force_distances(pred, ref, spacing):
    """Independent of the implementation: surface voxel = in the mask with a face neighbour outside the mask
    or outside the image; distances by all-pairs Euclidean distance between voxel centres in mm."""
    def surf(m):
        pad = np.pad(m, 1, constant_values=False)
        inner = np.ones_like(m)
        for ax in range(m.ndim):
            for step in (-1, 1):
                inner &= np.roll(pad, step, axis=ax)[tuple(slice(1, -1) for _ in range(m.ndim))]
        return np.argwhere(m & ~inner) * np.asarray(spacing, float)

    sp, sr = surf(pred), surf(ref)
    d = cdist(sp, sr)
    return d.min(axis=1), d.min(axis=0)


# --------------------------------------------------------------------------- analytic shapes
def test_single_voxels_anisotropic_distance_follows_the_axis_order():
    p, r = np.zeros((6, 5, 9), bool), np.zeros((6, 5, 9), bool)
    p[1, 2, 3] = r[4, 2, 7] = True  # 3 voxels apart on axis 0, 4 on axis 2
    d = math.hypot(3 * ANISO[0], 4 * ANISO[2])
    m = label_metrics(p, r, spacing=ANISO, nsd_tolerance=d)
    assert m["hd95"] == pytest.approx(d, abs=EXACT) and m["assd"] == pytest.approx(d, abs=EXACT)
    assert m["hd"] == pytest.approx(d, abs=EXACT)
    # every corner of one voxel has the matching corner of the other exactly d away (a translation)
    assert m["nsd"] == 1.0 and m["nsd_voxel"] == 1.0
    below = label_metrics(p, r, spacing=ANISO, nsd_tolerance=d - 1e-9)
    assert below["nsd_voxel"] == 0.0
    # ... and the corners facing away from the other voxel have nothing nearer: part of the surface is out
    assert 0.0 < below["nsd"] < 1.0
    assert (m["dice"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"], m["lesion_f1"]) == (0, 1, 1, 0.0)
    assert m["volume_ref_ml"] == pytest.approx(np.prod(ANISO) / 1000, abs=EXACT)


@pytest.mark.parametrize("k, j", [(1, 0), (2, 3), (3, 1)])
def test_sheets_shifted_on_an_anisotropic_grid(k, j):
    """One-voxel-thick boxes (every voxel is surface) shifted by k along axis 0 and j along axis 2: the
    distances are known in closed form, sqrt((k·s0)² + (m·s2)²) with m = 0 for the W − j overlapping
    columns and m = 1..j for the others, H voxels each, in both directions."""
    H, W = 6, 10
    p, r = np.zeros((8, 12, 20), bool), np.zeros((8, 12, 20), bool)
    p[2, 3:3 + H, 4:4 + W] = True
    r[2 + k, 3:3 + H, 4 + j:4 + j + W] = True
    one_side = [math.hypot(k * ANISO[0], 0.0)] * (H * (W - j)) + \
        [math.hypot(k * ANISO[0], mm * ANISO[2]) for mm in range(1, j + 1) for _ in range(H)]
    pooled = np.array(one_side * 2)
    tau = math.hypot(k * ANISO[0], ANISO[2]) + 1e-9  # within: m = 0 and m = 1
    m = label_metrics(p, r, spacing=ANISO, nsd_tolerance=tau)
    assert m["hd95"] == pytest.approx(np.percentile(pooled, 95), abs=EXACT)
    assert m["assd"] == pytest.approx(pooled.mean(), abs=EXACT)
    assert m["hd"] == pytest.approx(pooled.max(), abs=EXACT)
    assert m["nsd_voxel"] == pytest.approx(np.mean(pooled <= tau), abs=EXACT)
    assert m["dice"] == 0.0


def test_thick_box_shifted_along_the_coarse_axis_has_hausdorff_k_times_spacing():
    r = np.zeros((20, 16, 16), bool)
    r[4:12, 3:13, 2:14] = True
    for k in (1, 2, 3):
        p = np.roll(r, k, axis=0)
        m = label_metrics(p, r, spacing=ANISO)
        assert m["hd"] == pytest.approx(k * ANISO[0], abs=EXACT)
        overlap = (8 - k) / 8
        assert m["dice"] == pytest.approx(overlap, abs=EXACT) and m["precision"] == pytest.approx(overlap, abs=EXACT)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO, (0.5, 0.5, 3.0)])
def test_concentric_spheres(spacing):
    """Surfaces of balls of radii 12 and 17 mm are 5 mm apart up to the voxel discretisation."""
    shape = tuple(int(60 / s) for s in spacing)
    c = [n * s / 2 for n, s in zip(shape, spacing)]
    p, r = ball(shape, spacing, c, 12.0), ball(shape, spacing, c, 17.0)
    m = label_metrics(p, r, spacing=spacing, nsd_tolerance=5.0 + max(spacing))
    h = max(spacing)
    assert abs(m["assd"] - 5.0) <= h / 2 and abs(m["hd95"] - 5.0) <= h and abs(m["hd"] - 5.0) <= h
    assert m["nsd"] == 1.0 and m["nsd_voxel"] == 1.0 and abs(m["hd95_max"] - 5.0) <= h
    assert m["dice"] == pytest.approx(2 * 12 ** 3 / (12 ** 3 + 17 ** 3), rel=0.02)
    assert m["volume_ref_ml"] == pytest.approx(4 / 3 * math.pi * 17 ** 3 / 1000, rel=0.015)
    assert m["recall"] == pytest.approx(p.sum() / r.sum(), abs=EXACT) and m["precision"] == 1.0


def test_several_separated_lesions_are_counted_by_overlap():
    shape, sp = (30, 60, 60), (2.0, 1.0, 1.0)
    r = ball(shape, sp, (20, 15, 15), 5) | ball(shape, sp, (20, 45, 15), 5) | ball(shape, sp, (40, 30, 45), 5)
    # lesion 1 found exactly, lesion 2 found shifted, lesion 3 missed, one false positive far away
    p = ball(shape, sp, (20, 15, 15), 5) | ball(shape, sp, (22, 47, 16), 5) | ball(shape, sp, (45, 50, 50), 4)
    m = lesion_counts(p, r)
    assert m == {"lesion_tp": 2, "lesion_fp": 1, "lesion_fn": 1, "lesion_f1": 4 / 6, "ref_lesions": 3,
                 "pred_lesions": 3}
    assert label_metrics(p, r, spacing=sp)["lesion_f1"] == pytest.approx(4 / 6, abs=EXACT)
    # the same counts from scipy's labelling (an independent component finder)
    lr, nr = ndimage.label(r, structure=np.ones((3, 3, 3)))
    lp, np_ = ndimage.label(p, structure=np.ones((3, 3, 3)))
    tp = len(set(np.unique(lr[p & r])) - {0})
    fp = np_ - len(set(np.unique(lp[p & r])) - {0})
    assert (tp, fp, nr - tp) == (2, 1, 1)


def test_merged_and_split_lesions():
    r = np.zeros((10, 30, 30), bool)
    r[3:6, 5:10, 5:10] = r[3:6, 5:10, 15:20] = True  # two lesions
    merged = np.zeros_like(r)
    merged[3:6, 5:10, 5:20] = True  # one predicted component covering both
    assert lesion_counts(merged, r) == {"lesion_tp": 2, "lesion_fp": 0, "lesion_fn": 0, "lesion_f1": 1.0,
                                              "ref_lesions": 2, "pred_lesions": 1}
    one = np.zeros_like(r)
    one[3:6, 5:10, 5:20] = True
    halves = one.copy()
    halves[:, :, 12] = False  # one reference lesion predicted in two parts
    assert lesion_counts(halves, one) == {"lesion_tp": 1, "lesion_fp": 0, "lesion_fn": 0, "lesion_f1": 1.0,
                                          "ref_lesions": 1, "pred_lesions": 2}


def test_lesion_connectivity():
    r = np.zeros((5, 5, 5), bool)
    r[1, 1, 1] = r[2, 2, 2] = True  # corner neighbours
    assert lesion_counts(r, r, connectivity=26)["ref_lesions"] == 1
    assert lesion_counts(r, r, connectivity=18)["ref_lesions"] == 2
    assert lesion_counts(r, r, connectivity=6)["ref_lesions"] == 2
    with pytest.raises(DataError, match="connectivity 5 is not one of"):
        lesion_counts(r, r, connectivity=5)


# --------------------------------------------------------------------------- empty masks
def test_empty_mask_conventions():
    z = np.zeros((6, 7, 8), bool)
    x = z.copy()
    x[1:3, 2:4, 2:6] = True
    x[4, 5, 6] = True  # two components
    both = label_metrics(z, z, spacing=ANISO)
    assert (both["dice"], both["hd95"], both["assd"], both["nsd"], both["precision"], both["recall"]) == \
        (1.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    assert (both["lesion_tp"], both["lesion_fp"], both["lesion_fn"], both["lesion_f1"]) == (0, 0, 0, 1.0)
    assert (both["nsd_voxel"], both["hd95_max"], both["hd"]) == (1.0, 0.0, 0.0)
    no_pred = label_metrics(z, x, spacing=ANISO)
    assert (no_pred["dice"], no_pred["nsd"], no_pred["precision"], no_pred["recall"]) == (0.0, 0.0, 1.0, 0.0)
    assert math.isinf(no_pred["hd95"]) and math.isinf(no_pred["assd"]) and math.isinf(no_pred["hd"])
    assert math.isinf(no_pred["hd95_max"]) and no_pred["nsd_voxel"] == 0.0
    assert (no_pred["lesion_tp"], no_pred["lesion_fp"], no_pred["lesion_fn"], no_pred["lesion_f1"]) == (0, 0, 2, 0.0)
    assert no_pred["volume_diff_ml"] == pytest.approx(-x.sum() * np.prod(ANISO) / 1000) and no_pred["rel_volume_diff"] == -1
    no_ref = label_metrics(x, z, spacing=ANISO)
    assert (no_ref["dice"], no_ref["nsd"], no_ref["precision"], no_ref["recall"]) == (0.0, 0.0, 0.0, 1.0)
    assert math.isinf(no_ref["hd95"]) and math.isinf(no_ref["rel_volume_diff"])
    assert math.isinf(no_ref["hd95_max"]) and no_ref["nsd_voxel"] == 0.0
    assert (no_ref["lesion_tp"], no_ref["lesion_fp"], no_ref["lesion_fn"], no_ref["lesion_f1"]) == (0, 2, 0, 0.0)
    for m in (both, no_pred, no_ref):
        assert list(m) == list(METRIC_COLUMNS)


def test_case_metrics_of_a_label_map():
    ref = np.zeros((10, 12, 12), np.uint8)
    ref[2:6, 2:8, 2:8] = 1
    ref[3:5, 3:5, 3:5] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # lesion missed (predicted as organ)
    out = case_metrics(pred, ref, labels=[1, 2, 3], spacing=ANISO)
    assert out[1] == label_metrics(pred == 1, ref == 1, spacing=ANISO)
    assert out[2]["dice"] == 0.0 and out[2]["lesion_fn"] == 1 and math.isinf(out[2]["hd95"])
    assert out[3]["dice"] == 1.0 and out[3]["hd95"] == 0.0  # absent from both


# --------------------------------------------------------------------------- independent implementations
def _random_masks(rng, shape, ndim_border=False):
    a = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.15
    b = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.15
    if not ndim_border:  # keep one case away from the border, the others touch it
        a[..., :2] = b[..., :2] = False
    return a, b


@pytest.mark.parametrize("seed", range(6))
def test_surface_metrics_equal_a_brute_force_computation(seed):
    rng = np.random.default_rng(seed)
    a, b = _random_masks(rng, (9, 14, 12), ndim_border=bool(seed % 2))
    sp = tuple(rng.uniform(0.4, 3.0, size=3))
    d_pr, d_rp = brute_force_distances(a, b, sp)
    e_pr, e_rp = surface_distances(a, b, spacing=sp)
    np.testing.assert_allclose(np.sort(e_pr), np.sort(d_pr), atol=1e-12)
    np.testing.assert_allclose(np.sort(e_rp), np.sort(d_rp), atol=1e-12)
    pooled = np.concatenate([d_pr, d_rp])
    u = np.unique(np.round(pooled, 9))
    tau = float(u[len(u) // 2] + u[len(u) // 2 + 1]) / 2  # between two distances: no ties at the boundary
    m = label_metrics(a, b, spacing=sp, nsd_tolerance=tau)
    assert m["hd95"] == pytest.approx(np.percentile(pooled, 95), abs=EXACT)
    assert m["assd"] == pytest.approx(pooled.mean(), abs=EXACT)
    assert m["nsd_voxel"] == pytest.approx(np.mean(pooled <= tau), abs=EXACT)


@pytest.mark.parametrize("seed", range(8))
def test_equal_to_medpy_on_random_shapes(seed):
    from medpy.metric import binary as mb

    rng = np.random.default_rng(100 + seed)
    shape = (18, 26, 22) if seed < 6 else (40, 36)  # 3-D and 2-D
    a, b = _random_masks(rng, shape, ndim_border=bool(seed % 2))
    sp = tuple(rng.uniform(0.4, 3.0, size=len(shape)))
    m = label_metrics(a, b, spacing=sp)
    assert m["hd95"] == pytest.approx(mb.hd95(a, b, voxelspacing=sp), abs=EXACT)
    assert m["assd"] == pytest.approx(mb.assd(a, b, voxelspacing=sp), abs=EXACT)
    assert m["hd"] == pytest.approx(mb.hd(a, b, voxelspacing=sp), abs=EXACT)
    assert m["dice"] == pytest.approx(mb.dc(a, b), abs=EXACT)
    assert m["precision"] == pytest.approx(mb.precision(a, b), abs=EXACT)
    assert m["recall"] == pytest.approx(mb.recall(a, b), abs=EXACT)


def test_bad_input_is_one_clear_error():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(DataError, match=r"differ in shape: \(4, 4, 4\) vs \(4, 4, 5\)"):
        label_metrics(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(DataError, match="does not fit a 3-D image"):
        label_metrics(a, a, spacing=(1.0, 1.0))
    with pytest.raises(DataError, match="does not fit"):
        label_metrics(a, a, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(DataError, match="NSD tolerance"):
        label_metrics(a, a, nsd_tolerance=-1)
    with pytest.raises(DataError, match="non-empty"):
        surface_distances(a, a)
    with pytest.raises(DataError, match="non-empty"):
        surfel_distances(a, a)
    with pytest.raises(DataError, match="2-D or 3-D mask, got 1 dimensions"):
        surfels(np.ones(4, bool), spacing=(1.0,))


# --------------------------------------------------------------------------- the reference for nsd, hd95_max
# DeepMind's surface-distance (Nikolov et al. 2021), the package itself. Its 0.1 release imports through
# scipy.ndimage's deprecated `filters` / `morphology` namespaces: those warnings are the reference's.
reference = pytest.importorskip("surface_distance")
REFERENCE_WARNINGS = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")
SPACING = (2.0, 0.7, 1.3)


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def analytic_pairs():
    """(name, prediction, reference, spacing): spheres, boxes, shifted boxes, 2-D, touching the border."""
    sp = SPACING
    shape = (24, 60, 36)
    c = [n * s / 2 for n, s in zip(shape, sp)]
    c2 = [c[0] + 3.0, c[1] - 2.1, c[2] + 1.3]
    yield "concentric spheres", ball(shape, sp, c, 9.0), ball(shape, sp, c, 12.0), sp
    yield "offset spheres", ball(shape, sp, c2, 10.0), ball(shape, sp, c, 11.0), sp
    yield "sphere in a box", ball(shape, sp, c, 10.0), box(shape, (6, 14, 9), (18, 46, 27)), sp
    yield "box shifted along the coarse axis", box(shape, (6, 14, 9), (16, 40, 25)), \
        box(shape, (7, 14, 9), (17, 40, 25)), sp
    yield "box shifted on all axes", box(shape, (5, 15, 8), (15, 42, 24)), box(shape, (7, 12, 10), (16, 40, 27)), sp
    yield "boxes touching the image border", box(shape, (0, 0, 3), (10, 30, 36)), \
        box(shape, (0, 2, 0), (12, 60, 30)), sp
    yield "isotropic spheres", ball((30, 30, 30), (1.0,) * 3, (14, 15, 16), 8.0), \
        ball((30, 30, 30), (1.0,) * 3, (15, 15, 15), 9.5), (1.0, 1.0, 1.0)
    grid = np.stack(np.meshgrid(np.arange(50) * 0.7, np.arange(40) * 1.3, indexing="ij"))
    disc = lambda cy, cx, r: np.hypot(grid[0] - cy, grid[1] - cx) <= r  # noqa: E731
    yield "2-D discs", disc(17.0, 26.0, 9.0), disc(18.0, 24.0, 11.0), (0.7, 1.3)
    yield "2-D rectangles", box((50, 40), (10, 5), (30, 25)), box((50, 40), (12, 4), (33, 22)), (0.7, 1.3)


PAIRS = list(analytic_pairs())
TOLERANCES = (0.0, 0.35, 1.0, 1.3, 2.5, 6.0)  # below, at and above the voxel sizes 0.7 / 1.3 / 2.0


@REFERENCE_WARNINGS
@pytest.mark.parametrize("name, pred, ref, sp", PAIRS, ids=[p[0] for p in PAIRS])
def test_nsd_and_hd95_max_equal_deepminds_surface_distance(name, pred, ref, sp):
    """On the whole image, as a user of the package would call it (evaluate cuts a box first)."""
    want = reference.compute_surface_distances(ref, pred, sp)
    got = surfel_distances(pred, ref, spacing=sp)
    assert sorted(got) == sorted(want)
    for key in want:  # same surfels in the same order (sorted by distance, then area)
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=EXACT, err_msg=key)
    hd95_max = reference.compute_robust_hausdorff(want, 95)
    for tau in TOLERANCES:
        m = label_metrics(pred, ref, spacing=sp, nsd_tolerance=tau)
        assert m["nsd"] == pytest.approx(reference.compute_surface_dice_at_tolerance(want, tau), abs=EXACT), tau
        assert m["hd95_max"] == pytest.approx(hd95_max, abs=EXACT)
        # the voxel count is another number, kept under its own name
        d_pr, d_rp = surface_distances(pred, ref, spacing=sp)
        assert m["nsd_voxel"] == pytest.approx(np.mean(np.concatenate([d_pr, d_rp]) <= tau), abs=EXACT)


@REFERENCE_WARNINGS
def test_nsd_of_a_coarse_shift_is_the_reference_not_the_voxel_count():
    """Issue 20's case: 2 mm voxels, τ = 1 mm, a boundary moved by one voxel on the coarse axis. Counting
    voxels misses the side faces that the surfels (corner grid, weighted by area) find within τ."""
    ref = box((20, 30, 30), (5, 5, 5), (15, 25, 25))
    pred = box((20, 30, 30), (6, 5, 5), (16, 25, 25))
    sp = (2.0, 1.0, 1.0)
    m = label_metrics(pred, ref, spacing=sp, nsd_tolerance=1.0)
    want = reference.compute_surface_dice_at_tolerance(reference.compute_surface_distances(ref, pred, sp), 1.0)
    assert m["nsd"] == pytest.approx(want, abs=EXACT)
    assert m["nsd"] - m["nsd_voxel"] > 0.05


@REFERENCE_WARNINGS
@pytest.mark.parametrize("seed", range(6))
def test_surfel_distances_equal_the_reference_on_random_shapes(seed):
    rng = np.random.default_rng(200 + seed)
    shape = (14, 20, 17) if seed < 4 else (40, 36)
    a, b = _random_masks(rng, shape, ndim_border=bool(seed % 2))
    sp = tuple(rng.uniform(0.4, 3.0, size=len(shape)))
    want = reference.compute_surface_distances(b, a, sp)
    got = surfel_distances(a, b, spacing=sp)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=EXACT, err_msg=key)
    m = label_metrics(a, b, spacing=sp, nsd_tolerance=1.0)
    assert m["nsd"] == pytest.approx(reference.compute_surface_dice_at_tolerance(want, 1.0), abs=EXACT)
    assert m["hd95_max"] == pytest.approx(reference.compute_robust_hausdorff(want, 95), abs=EXACT)
