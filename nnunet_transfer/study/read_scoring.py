"""[scoring] and [predict]: how the runs' test cases are predicted (nnUNetv2_predict's options) and then
evaluated and compared (``evaluate`` + ``compare``: labels, metrics, the test, the correction)."""
from __future__ import annotations

import math
from typing import Any

from nnunet_transfer.config import is_int
from nnunet_transfer.experiments.paired import CORRECTIONS, TESTS
from nnunet_transfer.experiments.metrics import METRIC_COLUMNS
from nnunet_transfer.study.model import PREDICT_CHECKPOINTS, Scoring
from nnunet_transfer.study.problems import Problems, read_int, read_table, suggest

SCORING_KEYS = ("labels", "nsd_tolerance", "metrics", "test", "alpha", "correction", "resamples",
                "lesion_connectivity")
PREDICT_KEYS = ("disable_tta", "processes", "checkpoint")


def read_scoring(p: Problems, content: Any) -> Scoring | None:
    before = len(p)
    sc = read_table(p, "scoring", content, SCORING_KEYS)
    if sc is None:
        return None
    labels = sc.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(is_int(v) and v > 0 for v in labels):
            p.add("scoring", f"labels = {labels!r} must be a list of foreground label values, e.g. [1, 2]")
        else:
            labels = tuple(dict.fromkeys(labels))
    tol = sc.get("nsd_tolerance", 1.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        p.add("scoring", f"nsd_tolerance = {tol!r} must be a distance in mm (a number >= 0)")
    metrics = sc.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, list) or not metrics:
            p.add("scoring", f"metrics = {metrics!r} must be a non-empty list, e.g. [\"dice\", \"hd95\"]")
        else:
            for m in metrics:
                if m not in METRIC_COLUMNS:
                    p.add("scoring", f"unknown metric {m!r}{suggest(m, METRIC_COLUMNS)}; metrics: "
                                     f"{', '.join(METRIC_COLUMNS)}")
            metrics = tuple(dict.fromkeys(metrics))
    test = sc.get("test", "ttest")
    if test not in TESTS:
        p.add("scoring", f"test = {test!r} is not one of {', '.join(TESTS)}")
    alpha = sc.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        p.add("scoring", f"alpha = {alpha!r} must be a probability in (0, 1), e.g. 0.05")
    correction = sc.get("correction", "holm")
    if correction not in CORRECTIONS:
        p.add("scoring", f"correction = {correction!r} is not one of {', '.join(map(repr, CORRECTIONS))}: \"holm\" "
                         f"corrects over the strategies compared with the baseline, \"none\" keeps the raw p (the "
                         f"papers' uncorrected tests)")
    conn = sc.get("lesion_connectivity", 26)
    if conn not in (6, 18, 26, 4, 8):
        p.add("scoring", f"lesion_connectivity = {conn!r} must be 6, 18 or 26 (3-D) or 4, 8 (2-D)")
    resamples = read_int(p, "scoring", "resamples", sc.get("resamples", 9999), 100)
    if len(p) > before:
        return None
    return Scoring(labels=labels, nsd_tolerance=float(tol), metrics=metrics, test=test, alpha=float(alpha),
                   resamples=resamples, lesion_connectivity=conn, correction=correction)



def read_predict(p: Problems, content: Any) -> tuple[Any, int | None, Any]:
    """[predict]: ``(disable_tta, processes, checkpoint)`` (a key of
    :data:`~nnunet_transfer.study.model.PREDICT_CHECKPOINTS`)."""
    pr = read_table(p, "predict", content, PREDICT_KEYS) or {}
    disable_tta = pr.get("disable_tta", False)
    if not isinstance(disable_tta, bool):
        p.add("predict", f"disable_tta = {disable_tta!r} must be true or false")
    processes = read_int(p, "predict", "processes", pr.get("processes", 3), 0)
    checkpoint = pr.get("checkpoint", "final")
    if checkpoint not in PREDICT_CHECKPOINTS:
        p.add("predict", f"checkpoint = {checkpoint!r} must be one of {', '.join(map(repr, PREDICT_CHECKPOINTS))} "
                         f"(\"best\": nnUNetv2_predict -chk checkpoint_best.pth)")
    return disable_tta, processes, checkpoint


__all__ = ["read_scoring", "read_predict", "SCORING_KEYS", "PREDICT_KEYS"]
