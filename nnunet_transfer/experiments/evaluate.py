"""``evaluate``: every metric of :mod:`~nnunet_transfer.experiments.metrics` for a folder of predictions.

Cases are paired by file name (``<case><file_ending>``, as nnU-Net writes predictions and labels); both
folders must hold the same cases. Files are read with nnU-Net's own reader for the file ending
(``nnunetv2.imageio``: SimpleITK for ``.nii.gz``, as nnU-Net itself reads them), which gives the voxel
spacing in mm in array order; prediction and reference must agree in shape and spacing. A 2-D image
(nnU-Net reads it as one slice, shape ``(1, y, x)``) is evaluated in 2-D.

Outputs (written only after every case was evaluated, so a failure leaves nothing behind):

* ``OUT/per_case.csv`` — one row per case and label: ``case, label`` and :data:`METRIC_COLUMNS`
  (infinite distances written as ``inf``);
* ``OUT/summary.json`` — per label and metric mean / median / sd over the finite values, with the count of
  infinite ones; lesion counts pooled over cases; the inputs, the settings and the run (``--run``); with
  ``before`` (``--before``: the *source* model's predictions of the same cases, e.g. its held-out test set),
  ``"forgetting"``: per label the mean Dice before and after fine-tuning, the drop and the share kept
  (:func:`forgetting`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.metrics import (COUNT_COLUMNS, METRIC_COLUMNS, case_metrics, check_connectivity,
                                                 dice, empty_label_metrics)
from nnunet_transfer.fileio import plain, write_atomic

PER_CASE = "per_case.csv"
SUMMARY = "summary.json"
#: file endings nnU-Net's readers handle, longest first (".nii.gz" before ".gz"-less ".nii")
FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".png", ".bmp")
#: files that mark a fold folder (a run): nnU-Net's checkpoints, our settings file
RUN_MARKERS = ("checkpoint_final.pth", "checkpoint_latest.pth", "transfer_config.json")
SPACING_RTOL = 1e-4  # float32 storage of spacings in image headers
#: what ``nsd`` means in this version's outputs (summary.json); see :mod:`~nnunet_transfer.experiments.metrics`
NSD_DEFINITION = "surface-distance surfels"


# --------------------------------------------------------------------------- cases and files
def _ending_of(name: str) -> str | None:
    low = name.lower()
    return next((e for e in FILE_ENDINGS if low.endswith(e)), None)


def detect_file_ending(folder: Path) -> str:
    """The one image file ending in ``folder`` (error when there are none or several)."""
    counts = Counter(e for p in folder.iterdir() if p.is_file() and (e := _ending_of(p.name)))
    if not counts:
        raise DataError(f"no segmentation files ({', '.join(FILE_ENDINGS)}) in {folder}")
    if len(counts) > 1:
        raise DataError(f"{folder} holds files with several endings ({dict(counts)}); "
                        f"fix: choose one with --file-ending")
    return next(iter(counts))


def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """``{case: path}`` of the files ``<case><file_ending>`` in ``folder``."""
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending) and len(p.name) > len(file_ending)}


def _short(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def pair_cases(pred: Path, ref: Path, file_ending: str) -> list[tuple[str, Path, Path]]:
    """``[(case, prediction, reference)]``; the two folders must hold the same cases."""
    p, r = list_cases(pred, file_ending), list_cases(ref, file_ending)
    if not r:
        raise DataError(f"no reference files *{file_ending} in {ref}")
    missing, extra = sorted(set(r) - set(p)), sorted(set(p) - set(r))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference case(s) have no prediction in {pred}: {_short(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction(s) have no reference in {ref}: {_short(extra)}")
        raise DataError("prediction and reference folders hold different cases: " + "; ".join(parts)
                        + f". Fix: predict every reference case (files <case>{file_ending}), or give folders "
                          f"with the same cases")
    return [(c, p[c], r[c]) for c in sorted(r)]


def reader_class(file_ending: str, example: Path):
    """nnU-Net's reader/writer class for the ending (the one nnUNetv2_predict writes with)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    try:
        return determine_reader_writer_from_file_ending(file_ending, str(example), verbose=False)
    except RuntimeError:
        raise DataError(f"nnU-Net has no reader that opens {example} (file ending {file_ending})") from None


def read_label_map(path: Path, reader) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer label map and spacing (mm, array order) of one segmentation file.

    nnU-Net reads a 2-D image as one slice ``(1, y, x)`` with a dummy slice spacing; it is returned as
    ``(y, x)`` so that surfaces and components are 2-D.
    """
    try:
        seg, props = reader().read_seg(str(path))
    except Exception as e:  # nnU-Net's readers raise RuntimeError/ITK errors with little context
        raise DataError(f"cannot read segmentation {path}: {type(e).__name__}: {e}") from None
    seg = seg[0]
    spacing = tuple(float(s) for s in props["spacing"])
    if seg.ndim == 3 and seg.shape[0] == 1:
        seg, spacing = seg[0], spacing[1:]
    labels = seg.astype(np.int32)
    if not np.array_equal(labels, seg):
        raise DataError(f"{path} is not a label map: it holds non-integer values "
                        f"(e.g. {float(seg[labels != seg].flat[0])}); give segmentations, not probabilities")
    if labels.size and labels.min() >= 0 and labels.max() <= 255:
        labels = labels.astype(np.uint8)  # a quarter of the memory for the per-label masks' inputs
    return labels, spacing


def present_labels(seg: np.ndarray) -> set[int]:
    if seg.dtype == np.uint8:  # bincount: one pass, no sort (np.unique sorts the whole volume)
        return {int(v) for v in np.flatnonzero(np.bincount(seg.ravel(), minlength=1))}
    return {int(v) for v in np.unique(seg)}


@dataclass(frozen=True)
class _Task:
    case: str
    pred: Path
    ref: Path
    labels: tuple[int, ...] | None  # None: every label present in this case
    nsd_tolerance: float
    connectivity: int
    reader: Any


def _mm(spacing: Sequence[float]) -> tuple[float, ...]:
    """Spacing for messages: headers store float32 (0.8 reads back as 0.800000011920929)."""
    return tuple(float(f"{s:.6g}") for s in spacing)


def _evaluate_case(task: _Task) -> dict:
    """One case: read both files, check the grids, compute every requested label (worker function)."""
    pred, sp_p = read_label_map(task.pred, task.reader)
    ref, sp_r = read_label_map(task.ref, task.reader)
    if pred.shape != ref.shape:
        raise DataError(f"case {task.case}: prediction {task.pred} has shape {pred.shape} but the reference "
                        f"{task.ref} has {ref.shape}; fix: predictions must be on the reference's grid "
                        f"(nnUNetv2_predict writes them so)")
    if len(sp_p) != len(sp_r) or not np.allclose(sp_p, sp_r, rtol=SPACING_RTOL, atol=0):
        raise DataError(f"case {task.case}: prediction {task.pred} has spacing {_mm(sp_p)} mm but the reference "
                        f"{task.ref} has {_mm(sp_r)} mm; fix: predictions must be on the reference's grid "
                        f"(nnUNetv2_predict writes them so)")
    in_ref, in_pred = present_labels(ref) - {0}, present_labels(pred) - {0}
    labels = task.labels if task.labels is not None else tuple(sorted(in_ref | in_pred))
    metrics = case_metrics(pred, ref, labels=labels, spacing=sp_r, nsd_tolerance=task.nsd_tolerance,
                           connectivity=task.connectivity)
    return {"case": task.case, "metrics": metrics, "ref_labels": sorted(in_ref), "pred_labels": sorted(in_pred),
            "spacing": list(sp_r), "shape": list(ref.shape)}


# --------------------------------------------------------------------------- summaries
def _finite(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), dtype=np.float64)
    return a[np.isfinite(a)]


def describe(values: Sequence[float]) -> dict:
    """mean, median, sd (n − 1), min, max over the finite values; ``n`` finite and ``n_infinite`` others."""
    v = _finite(values)
    out = {"n": int(v.size), "n_infinite": int(len(values) - v.size)}
    if v.size:
        out.update(mean=float(v.mean()), median=float(np.median(v)),
                   sd=float(v.std(ddof=1)) if v.size > 1 else None, min=float(v.min()), max=float(v.max()))
    else:
        out.update(mean=None, median=None, sd=None, min=None, max=None)
    return out


def summarize(rows: Sequence[Mapping], labels: Sequence[int]) -> dict:
    """Per-label statistics of every metric, pooled lesion counts, and label-averaged means."""
    per_label, pooled = {}, {}
    for lab in labels:
        sel = [r for r in rows if r["label"] == lab]
        per_label[str(lab)] = {m: describe([r[m] for r in sel]) for m in METRIC_COLUMNS}
        tp, fp, fn = (int(sum(r[k] for r in sel)) for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
        pooled[str(lab)] = {"tp": tp, "fp": fp, "fn": fn,
                            "f1": 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)}
    mean = {}
    for m in METRIC_COLUMNS:
        means = [per_label[str(lab)][m]["mean"] for lab in labels]
        means = [x for x in means if x is not None]
        mean[m] = float(np.mean(means)) if means else None
    return {"per_label": per_label, "lesions_pooled": pooled, "mean_over_labels": mean}


def label_names(*folders: Path) -> dict[int, str]:
    """``{value: name}`` from the first dataset.json found in the folders or their parents (best effort)."""
    for folder in folders:
        for cand in (folder / "dataset.json", folder.parent / "dataset.json"):
            if cand.is_file():
                try:
                    labels = json.loads(cand.read_text()).get("labels", {})
                    return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
                except (ValueError, AttributeError, TypeError):
                    continue
    return {}


def find_run(folder: Path) -> Path | None:
    """The fold folder an EVAL folder sits in (a parent holding a checkpoint or transfer_config.json)."""
    parent = folder.resolve().parent
    return parent if any((parent / m).is_file() for m in RUN_MARKERS) else None


def check_run(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir() or not any((run / m).is_file() for m in RUN_MARKERS):
        raise DataError(f"--run {run} is not a fold folder of a training run (expected one of "
                        f"{', '.join(RUN_MARKERS)} in it), e.g. $nnUNet_results/<Dataset>/<Trainer>__<Plans>__"
                        f"<Configuration>/fold_0")
    return run.resolve()


# --------------------------------------------------------------------------- the command
@dataclass
class EvaluationResult:
    out: Path
    rows: list[dict]
    summary: dict
    labels: list[int] = field(default_factory=list)

    def text(self) -> str:
        names = self.summary.get("label_names", {})
        lines = [f"evaluated {self.summary['n_cases']} cases -> {self.out / PER_CASE}, {self.out / SUMMARY}"]
        for lab in self.labels:
            s = self.summary["per_label"][str(lab)]

            def fmt(m):
                d = s[m]
                if d["mean"] is None:
                    return f"{m} -"
                inf = f" ({d['n_infinite']} inf)" if d["n_infinite"] else ""
                return f"{m} {d['mean']:.3f}{inf}"
            name = f" ({names[str(lab)]})" if str(lab) in names else ""
            lines.append(f"  label {lab}{name}: " + ", ".join(fmt(m) for m in ("dice", "hd95", "assd", "nsd",
                                                                                 "lesion_f1")))
        if "forgetting" in self.summary:
            lines.append(forgetting_text(self.summary["forgetting"]))
        return "\n".join(lines)


def _parse_labels(labels: Iterable[int] | None) -> tuple[int, ...] | None:
    if labels is None:
        return None
    out = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)) or lab < 0:
            raise DataError(f"label {lab!r} is not a label value (integers >= 0, e.g. --labels 1 2)")
        if int(lab) not in out:
            out.append(int(lab))
    if not out:
        raise DataError("--labels is empty; give label values, e.g. --labels 1 2, or leave it out for every "
                        "label of the references")
    return tuple(out)


def forgetting(before: Mapping[int, float], after: Mapping[int, float], names: Mapping | None = None) -> dict:
    """Forgetting of the old classes: per label the mean Dice ``before`` (the source model) and ``after``
    (fine-tuned) on the same cases, the drop (before − after) and the share kept (after / before; None when the
    source scored 0), and the same over the mean of the labels."""
    names = names or {}
    per = {}
    for lab in before:
        b, a = float(before[lab]), float(after[lab])
        per[str(lab)] = {"name": names.get(lab, names.get(str(lab))), "before": b, "after": a, "drop": b - a,
                         "kept": a / b if b > 0 else None}
    mb = float(np.mean([float(v) for v in before.values()]))
    ma = float(np.mean([float(after[lab]) for lab in before]))
    return {"labels": [int(lab) for lab in before], "per_label": per,
            "mean": {"before": mb, "after": ma, "drop": mb - ma, "kept": ma / mb if mb > 0 else None}}


def forgetting_text(f: Mapping) -> str:
    """One line per label and one for the mean: ``Dice before -> after (kept %)``."""
    def one(d):
        kept = "-" if d["kept"] is None else f"{100 * d['kept']:.0f} %"
        return f"Dice {d['before']:.3f} -> {d['after']:.3f} (drop {d['drop']:.3f}, kept {kept})"
    lines = [f"  forgetting, label {lab}{' (' + d['name'] + ')' if d.get('name') else ''}: {one(d)}"
             for lab, d in f["per_label"].items()]
    return "\n".join(lines + [f"  forgetting, mean of labels {f['labels']}: {one(f['mean'])}"])


def mean_dice(pred: Path, ref: Path, file_ending: str, labels: Sequence[int]) -> dict[int, float]:
    """Mean Dice per label of the predictions in ``pred`` against ``ref`` (same cases), nnU-Net's reader."""
    cases = pair_cases(pred, ref, file_ending)
    reader = reader_class(file_ending, cases[0][2])
    values: dict[int, list[float]] = {lab: [] for lab in labels}
    for _, p, r in cases:
        a, b = read_label_map(p, reader)[0], read_label_map(r, reader)[0]
        for lab in labels:
            values[lab].append(dice(a, b, lab))
    return {lab: float(np.mean(v)) for lab, v in values.items()}


def evaluate_folders(pred: str | Path, ref: str | Path, out: str | Path, *, labels: Iterable[int] | None = None,
                     nsd_tolerance: float = 1.0, connectivity: int = 26, num_processes: int = 1,
                     file_ending: str | None = None, run: str | Path | None = None,
                     progress: bool = True, before: str | Path | None = None) -> EvaluationResult:
    """Evaluate every prediction in ``pred`` against ``ref``; write ``per_case.csv`` and ``summary.json``.

    ``labels``: label values (default: every label found in the references); ``nsd_tolerance``: τ in mm;
    ``connectivity``: lesion components (6, 18, 26); ``num_processes``: cases in parallel (one case in
    memory per process); ``run``: the fold folder of the run that made the predictions (for ``compare``);
    ``before``: the source model's predictions of the same cases (forgetting of the evaluated labels).
    """
    from tqdm.auto import tqdm

    pred, ref, out = Path(pred), Path(ref), Path(out)
    for what, folder in (("prediction", pred), ("reference", ref)):
        if not folder.is_dir():
            raise DataError(f"{what} folder {folder} does not exist")
    if out.resolve() in (pred.resolve(), ref.resolve()):
        raise DataError(f"output folder {out} is the {'prediction' if out.resolve() == pred.resolve() else 'reference'}"
                        f" folder; give evaluate a folder of its own (nnU-Net keeps its summary.json there)")
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    labels_t = _parse_labels(labels)
    if before is not None and not Path(before).is_dir():
        raise DataError(f"--before {before}: folder not found; give the source model's predictions of the same "
                        f"cases (nnUNetv2_predict of the source on REF's images)")
    if isinstance(nsd_tolerance, bool) or not isinstance(nsd_tolerance, numbers.Real) or \
            not math.isfinite(nsd_tolerance) or nsd_tolerance < 0:
        raise DataError(f"--nsd-tolerance {nsd_tolerance!r} is not a distance in mm (a number >= 0)")
    check_connectivity(connectivity)
    if not isinstance(num_processes, int) or num_processes < 1:
        raise DataError(f"-np {num_processes!r}: the number of processes must be an integer >= 1")
    run_path = check_run(run) if run is not None else find_run(out)
    if file_ending is None:
        file_ending = detect_file_ending(ref)
    elif not file_ending.startswith("."):
        raise DataError(f"--file-ending {file_ending!r} must start with a dot, e.g. .nii.gz")
    cases = pair_cases(pred, ref, file_ending)
    reader = reader_class(file_ending, cases[0][2])

    tasks = [_Task(c, p, r, labels_t, float(nsd_tolerance), int(connectivity), reader) for c, p, r in cases]
    results = []
    with tqdm(total=len(tasks), desc="evaluate", unit="case", disable=not progress) as bar:
        if num_processes == 1 or len(tasks) == 1:
            for t in tasks:
                results.append(_evaluate_case(t))
                bar.update()
        else:
            import multiprocessing as mp

            # spawn, as nnU-Net does: no fork of a process that may hold threads (torch, ITK)
            with mp.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
                for res in pool.imap(_evaluate_case, tasks, chunksize=1):
                    results.append(res)
                    bar.update()

    found_ref = set().union(*(r["ref_labels"] for r in results))
    found_pred = set().union(*(r["pred_labels"] for r in results))
    if labels_t is None:
        if not found_ref:
            raise DataError(f"no reference in {ref} holds a foreground label; give the labels to evaluate "
                            f"with --labels")
        final = sorted(found_ref)
    else:
        absent = [lab for lab in labels_t if lab not in found_ref | found_pred]
        if absent:
            raise DataError(f"label(s) {', '.join(map(str, absent))} occur in none of the {len(results)} "
                            f"reference and prediction files (labels found: "
                            f"{', '.join(map(str, sorted(found_ref | found_pred))) or 'none'}); "
                            f"fix: --labels {' '.join(map(str, sorted(found_ref))) or '...'}")
        final = list(labels_t)
    rows = []
    for res in results:
        for lab in final:
            m = res["metrics"].get(lab) or empty_label_metrics()  # absent from both in this case
            rows.append({"case": res["case"], "label": lab, **m})

    names = label_names(pred, ref)
    summary = {
        "tool": "nnunet_transfer evaluate", "pred": str(pred.resolve()), "ref": str(ref.resolve()),
        "run": None if run_path is None else str(run_path), "run_given": run is not None,
        "file_ending": file_ending, "labels": final,
        "label_names": {str(k): v for k, v in names.items() if k in final},
        "nsd_tolerance_mm": float(nsd_tolerance), "lesion_connectivity": int(connectivity),
        # evaluations before issue 20 counted surface voxels under the name nsd (now nsd_voxel) and lack
        # this key: a comparison can tell the two apart
        "nsd_definition": NSD_DEFINITION,
        "n_cases": len(results), "cases": [r["case"] for r in results],
        "spacing_mm": {r["case"]: r["spacing"] for r in results},
        **summarize(rows, final),
        "conventions": ("both masks empty: dice = nsd = nsd_voxel = precision = recall = lesion_f1 = 1, "
                        "distances 0; one empty: dice = nsd = nsd_voxel = 0, distances inf (statistics over "
                        "finite values, n_infinite counts the others), precision (empty prediction) or recall "
                        "(empty reference) = 1; hd95, assd and hd as MedPy >= 0.5 (surface voxels, pooled over "
                        "both directions); nsd and hd95_max as DeepMind's surface-distance (surface elements "
                        "weighted by area); nsd_voxel counts MedPy's surface voxels within the tolerance"),
    }
    if before is not None:
        after = {lab: float(np.mean([r["dice"] for r in rows if r["label"] == lab])) for lab in final}
        summary["forgetting"] = {"before_pred": str(Path(before).resolve()),
                                 **forgetting(mean_dice(Path(before), ref, file_ending, final), after, names)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PER_CASE, rows_to_csv(rows))
    write_atomic(out / SUMMARY, json.dumps(plain(summary), indent=2))
    return EvaluationResult(out=out, rows=rows, summary=summary, labels=final)


def rows_to_csv(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", *METRIC_COLUMNS])
    for r in rows:
        w.writerow([r["case"], r["label"], *(repr(float(r[m])) if m not in COUNT_COLUMNS else int(r[m])
                                             for m in METRIC_COLUMNS)])
    return buf.getvalue()


def read_per_case(path: str | Path) -> list[dict]:
    """Rows of a ``per_case.csv`` (numbers parsed; ``inf`` back to infinity)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; is {path.parent} an output folder of nnunet_transfer evaluate?")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"case", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} is not a per_case.csv of evaluate (columns case, label, metrics)")
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                rows.append({k: (v if k == "case" else int(v) if k == "label" else float(v))
                             for k, v in row.items()})
            except (TypeError, ValueError):
                raise DataError(f"{path} line {i} holds a value that is not a number: {row}") from None
    return rows


__all__ = ["EvaluationResult", "evaluate_folders", "read_per_case", "describe", "summarize", "pair_cases",
           "read_label_map", "PER_CASE", "SUMMARY", "NSD_DEFINITION", "find_run", "check_run"]
