"""Benchmark: ``nnunet_transfer evaluate`` against MedPy's ``hd95`` + ``assd`` and DeepMind's NSD + robust
Hausdorff on CT-sized cases (issue 11, item 4; issue 20, item 3).

Generated cases of 256 × 256 × 128 voxels (x, y, z; spacing 0.8 × 0.8 × 2.0 mm): the reference holds a
smooth organ (label 1, about a third of the field of view across) with three lesions inside (label 2);
the prediction is a perturbed copy — the organ boundary moved by a smooth random field of ±2 voxels,
one lesion shifted, one missed, one false-positive lesion near the organ. Files are written as
``.nii.gz`` with SimpleITK, as ``nnUNetv2_predict`` writes them.

The cases are generated in one process, and each variant runs in its own Python process, which reports
wall seconds and its peak RSS (the kernel's ``VmHWM``, reset when the process starts):

- ``evaluate``: :func:`evaluate_folders` end to end (read, every metric of ``per_case.csv`` for both labels,
  write), ``-np 1``; then, for the split of the time, each case read again (timed) and
  :func:`case_metrics` on it (timed: "metrics only").
- ``evaluate-1``: the same on the first case alone — its peak RSS against ``evaluate``'s over all cases
  shows that memory is bounded by one case, not by the number of cases.
- ``medpy``: each case read with the same nnU-Net reader (timed), then ``medpy.metric.binary.hd95`` and
  ``assd`` per label (timed) — the two surface values ``evaluate`` reports, MedPy's way (EDTs of the
  whole volume, each recomputed per call).
- ``surface-distance``: each case read the same way (timed), then DeepMind's ``compute_surface_distances``
  per label on the whole volume (it cuts its own bounding box), ``compute_surface_dice_at_tolerance``
  (τ = 1 mm, evaluate's default) and ``compute_robust_hausdorff(·, 95)`` — the reference of ``nsd`` and
  ``hd95_max``.

The values are compared (hd95, assd against MedPy; nsd, hd95_max against surface-distance: max
|difference|, must be < 1e-9) and the table printed:

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py [--cases 4] [--shape 128 256 256] [--organ 0.17] [-np 1]
        [--quick] [--json FILE]

``--quick``: 2 cases of 64 × 128 × 128, a smoke run of the script (a few seconds).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm
LABELS = (1, 2)


# --------------------------------------------------------------------------------------------------
# data
def _smooth_field(rng, shape, coarse=(8, 16, 16)) -> np.ndarray:
    """A smooth random field in [-1, 1] on ``shape``: coarse noise, linearly upsampled (cheap at 8 M voxels)."""
    from scipy import ndimage

    c = rng.standard_normal(coarse)
    f = ndimage.zoom(c, [s / k for s, k in zip(shape, coarse)], order=1)[tuple(slice(0, s) for s in shape)]
    return (f / np.abs(f).max()).astype(np.float32)


def _distance_mm(shape, center_vox) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return np.sqrt(sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, center_vox, SPACING))).astype(np.float32)


def make_case(rng, shape, organ: float = 0.17) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) label maps, uint8, (z, y, x); organ radius = ``organ`` × the smallest extent."""
    size_mm = np.array(shape) * SPACING
    center = np.array(shape) * rng.uniform(0.4, 0.6, size=3)
    radius = organ * size_mm.min() + 0.05 * size_mm.min() * _smooth_field(rng, shape)
    organ_d = _distance_mm(shape, center)
    ref = np.zeros(shape, np.uint8)
    ref[organ_d <= radius] = 1
    # prediction's organ: boundary moved by up to ±2 voxels in-plane (1.6 mm)
    pred = np.zeros(shape, np.uint8)
    pred[organ_d <= radius + 1.6 * _smooth_field(rng, shape)] = 1
    lesion_r = 0.025 * size_mm.min()
    inside = center + (rng.uniform(-0.5, 0.5, size=(4, 3)) * radius.mean() / np.array(SPACING))
    for i, c in enumerate(inside[:3]):
        d = _distance_mm(shape, c)
        ref[(d <= lesion_r) & (ref == 1)] = 2
        if i == 0:
            pred[(d <= lesion_r) & (pred == 1)] = 2  # found
        elif i == 1:
            pred[(_distance_mm(shape, c + [1, 2, 2]) <= lesion_r) & (pred == 1)] = 2  # found, shifted
        # i == 2: missed
    pred[(_distance_mm(shape, inside[3]) <= 0.8 * lesion_r) & (pred == 1)] = 2  # false positive
    return ref, pred


def write_cases(folder: Path, n: int, shape, seed: int, organ: float) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for sub in ("ref", "pred"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ref, pred = make_case(rng, shape, organ)
        for sub, arr in (("ref", ref), ("pred", pred)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(SPACING[::-1])
            sitk.WriteImage(img, str(folder / sub / f"case_{i:03d}.nii.gz"), useCompression=True)


# --------------------------------------------------------------------------------------------------
# workers (each in its own process)
def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM): a child starts with its parent's, which held the data."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_evaluate(data: Path, cases: int | None, num_processes: int) -> dict:
    from nnunet_transfer.experiments.evaluate import evaluate_folders, read_label_map, reader_class
    from nnunet_transfer.experiments.metrics import case_metrics

    pred, ref = data / "pred", data / "ref"
    if cases is not None:  # a folder with the first `cases` cases only (links)
        sub = data / f"first{cases}"
        for s in ("pred", "ref"):
            (sub / s).mkdir(parents=True, exist_ok=True)
            for p in sorted((data / s).glob("*.nii.gz"))[:cases]:
                if not (sub / s / p.name).exists():
                    (sub / s / p.name).symlink_to(p)
        pred, ref = sub / "pred", sub / "ref"
    # imports and reader lookup before the clock, as for the medpy worker
    import cc3d  # noqa: F401
    import nnunetv2.imageio.reader_writer_registry  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import tqdm.auto  # noqa: F401
    import_mb = _peak_mb()
    reader_class(".nii.gz", next(ref.glob("*.nii.gz")))
    t0 = time.perf_counter()
    res = evaluate_folders(pred, ref, data / f"eval_{cases or 'all'}", labels=list(LABELS), num_processes=num_processes,
                           progress=False)
    total = time.perf_counter() - t0
    peak = _peak_mb()
    n = res.summary["n_cases"]
    reader = reader_class(".nii.gz", next(ref.glob("*.nii.gz")))
    t_read = t_metrics = 0.0
    for case in res.summary["cases"]:
        t = time.perf_counter()
        p, sp = read_label_map(pred / f"{case}.nii.gz", reader)
        r, _ = read_label_map(ref / f"{case}.nii.gz", reader)
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        case_metrics(p, r, labels=LABELS, spacing=sp)
        t_metrics += time.perf_counter() - t
    values = {f"{row['case']}/{row['label']}": {m: row[m] for m in ("hd95", "assd", "nsd", "hd95_max")}
              for row in res.rows}
    return {"n": n, "total_s": total, "read_s": t_read, "metrics_s": t_metrics, "peak_mb": peak,
            "import_mb": import_mb, "values": values}


def _time_reference(data: Path, label_values) -> dict:
    """Read every case of DATA and time LABEL_VALUES(pred_mask, ref_mask, spacing) -> {metric: value} per label
    (a reference implementation, called the way its users call it)."""
    from nnunet_transfer.experiments.evaluate import read_label_map, reader_class

    import nnunetv2.imageio.reader_writer_registry  # noqa: F401

    files = sorted((data / "ref").glob("*.nii.gz"))
    import_mb = _peak_mb()
    reader = reader_class(".nii.gz", files[0])
    t_read = t_metrics = 0.0
    values = {}
    for f in files:
        case = f.name[: -len(".nii.gz")]
        t = time.perf_counter()
        p, sp = read_label_map(data / "pred" / f.name, reader)
        r, _ = read_label_map(f, reader)
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        for lab in LABELS:
            values[f"{case}/{lab}"] = label_values(p == lab, r == lab, sp)
        t_metrics += time.perf_counter() - t
    return {"n": len(files), "total_s": t_read + t_metrics, "read_s": t_read, "metrics_s": t_metrics,
            "peak_mb": _peak_mb(), "import_mb": import_mb, "values": values}


def worker_medpy(data: Path) -> dict:
    from medpy.metric import binary as mb

    return _time_reference(data, lambda pl, rl, sp: {"hd95": float(mb.hd95(pl, rl, voxelspacing=sp)),
                                                    "assd": float(mb.assd(pl, rl, voxelspacing=sp))})


def worker_deepmind(data: Path) -> dict:
    import warnings

    import surface_distance as sd

    warnings.filterwarnings("ignore", "Please import", DeprecationWarning)  # its scipy.ndimage.filters imports

    def label_values(pl, rl, sp):
        dist = sd.compute_surface_distances(rl, pl, sp)
        return {"nsd": float(sd.compute_surface_dice_at_tolerance(dist, 1.0)),
                "hd95_max": float(sd.compute_robust_hausdorff(dist, 95))}

    return _time_reference(data, label_values)


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"))
    ap.add_argument("-np", dest="num_processes", type=int, default=1, help="evaluate's processes (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--organ", type=float, default=0.17,
                    help="organ radius as a fraction of the smallest field-of-view extent (default 0.17, about a "
                         "third of the field across; 0.45 nearly fills it: the bounding box then saves little)")
    ap.add_argument("--quick", action="store_true", help="2 cases of 64 x 128 x 128 (smoke run)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["generate", "evaluate", "medpy", "deepmind"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _reset_peak()
    if args.worker == "generate":
        write_cases(Path(args.data), args.cases, tuple(args.shape), args.seed, args.organ)
        print(json.dumps({}))
        return
    if args.worker == "evaluate":
        print(json.dumps(worker_evaluate(Path(args.data), args.first, args.num_processes)))
        return
    if args.worker == "medpy":
        print(json.dumps(worker_medpy(Path(args.data))))
        return
    if args.worker == "deepmind":
        print(json.dumps(worker_deepmind(Path(args.data))))
        return
    if args.quick:
        args.cases, args.shape = 2, [64, 128, 128]
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        data = Path(tmp)
        t = time.perf_counter()
        # in a process of its own, so that the workers do not start with the generator's memory
        run_worker(["--worker", "generate", "--data", str(data), "--cases", str(args.cases), "--shape",
                    *map(str, shape), "--seed", str(args.seed), "--organ", str(args.organ)])
        print(f"generated {args.cases} cases of {shape[2]} x {shape[1]} x {shape[0]} voxels (x, y, z), spacing "
              f"{SPACING[::-1]} mm, in {time.perf_counter() - t:.1f} s", flush=True)
        common = ["--data", str(data), "-np", str(args.num_processes)]
        ev = run_worker(["--worker", "evaluate", *common])
        ev1 = run_worker(["--worker", "evaluate", "--first", "1", *common])
        md = run_worker(["--worker", "medpy", *common])
        dm = run_worker(["--worker", "deepmind", *common])
    diffs = {m: max(abs(ev["values"][k][m] - ref["values"][k][m]) for k in ref["values"])
             for ref, ms in ((md, ("hd95", "assd")), (dm, ("nsd", "hd95_max"))) for m in ms}
    equal = all(d < 1e-9 for d in diffs.values())
    n = ev["n"]
    case_mb = 2 * int(np.prod(shape)) * 4 / 2 ** 20  # nnU-Net's reader returns float32, two files per case
    rows = [("evaluate (every metric, 2 labels)", ev["total_s"] / n, ev["metrics_s"] / n, ev["peak_mb"]),
            ("medpy hd95 + assd (2 labels)", md["total_s"] / n, md["metrics_s"] / n, md["peak_mb"]),
            ("surface-distance nsd + hd95_max", dm["total_s"] / n, dm["metrics_s"] / n, dm["peak_mb"])]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.system()}, python "
          f"{platform.python_version()}, evaluate -np {args.num_processes}")
    print(f"{'implementation':<36} {'s/case (with reading)':>22} {'s/case (metrics only)':>22} {'peak RSS MB':>12}")
    for name, tot, met, peak in rows:
        print(f"{name:<36} {tot:>22.2f} {met:>22.2f} {peak:>12.0f}")
    speed_total = md["total_s"] / ev["total_s"]
    speed_metrics = md["metrics_s"] / ev["metrics_s"]
    both_total = (md["total_s"] + dm["total_s"]) / ev["total_s"]
    both_metrics = (md["metrics_s"] + dm["metrics_s"]) / ev["metrics_s"]
    print(f"\nspeed-up (medpy / evaluate): {speed_total:.1f}x with reading, {speed_metrics:.1f}x metrics only "
          f"(target >= 5x)")
    print(f"speed-up (medpy + surface-distance / evaluate): {both_total:.1f}x with reading, "
          f"{both_metrics:.1f}x metrics only")
    print("values: " + ", ".join(f"max |{m} diff| = {d:.2e}" for m, d in diffs.items()) +
          f" -> {'equal' if equal else 'NOT EQUAL'}")
    print(f"memory: evaluate peak RSS {ev['peak_mb']:.0f} MB over {n} cases vs {ev1['peak_mb']:.0f} MB for one case "
          f"(after imports {ev['import_mb']:.0f} MB; one case as read = {case_mb:.0f} MB)")
    result = {"shape_zyx": shape, "spacing_zyx": SPACING, "cases": n, "organ": args.organ, "evaluate": {k: v for k, v in ev.items() if k != "values"},
              "evaluate_one_case": {k: v for k, v in ev1.items() if k != "values"},
              "medpy": {k: v for k, v in md.items() if k != "values"}, "speedup_total": speed_total,
              "surface_distance": {k: v for k, v in dm.items() if k != "values"},
              "speedup_total_both": both_total, "speedup_metrics_both": both_metrics,
              "speedup_metrics": speed_metrics, "max_diff": diffs, "equal": equal}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not equal:
        raise SystemExit("values differ")


if __name__ == "__main__":
    main()
