"""Forgetting (``evaluate --before``) and the pseudo-label merge, on hand-built arrays and files."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.evaluate import evaluate_folders, forgetting
from nnunet_transfer.experiments.metrics import dice
from nnunet_transfer.experiments.pseudo_labels import merge_case, plan_merge

from experiments.test_evaluate import SPACING, write_pred

SOURCE = {"background": 0, "organ": 1, "lesion": 2}
TARGET = {"labels": {"background": 0, "organ": 1, "lesion": 2, "cyst": 3}, "unannotated": ["organ", "lesion"]}


def test_forgetting_is_the_drop_and_the_share_kept():
    f = forgetting({1: 0.8, 2: 0.4}, {1: 0.2, 2: 0.4}, {1: "organ"})
    assert f["per_label"]["1"] == {"name": "organ", "before": 0.8, "after": 0.2, "drop": pytest.approx(0.6),
                                   "kept": pytest.approx(0.25)}
    assert f["mean"]["before"] == pytest.approx(0.6) and f["mean"]["kept"] == pytest.approx(0.3 / 0.6)
    assert forgetting({1: 0.0}, {1: 0.5})["per_label"]["1"]["kept"] is None


def test_evaluate_before_reports_the_dice_of_both_prediction_folders(tmp_path):
    rng = np.random.default_rng(0)
    ref, before, after = (tmp_path / n for n in ("ref", "before", "after"))
    for d in (ref, before, after):
        d.mkdir()
    arrays = {}
    for case in ("a", "b"):
        arrays[case] = [rng.integers(0, 3, (6, 7, 5)).astype(np.uint8) for _ in range(3)]
        for d, arr in zip((ref, before, after), arrays[case]):
            write_pred(arr, SPACING, d / f"{case}.nii.gz")
    result = evaluate_folders(after, ref, tmp_path / "out", labels=[1, 2], before=before, progress=False)
    f = result.summary["forgetting"]
    for lab in (1, 2):
        b = np.mean([dice(arrays[c][1], arrays[c][0], lab) for c in arrays])
        a = np.mean([dice(arrays[c][2], arrays[c][0], lab) for c in arrays])
        assert f["per_label"][str(lab)]["before"] == pytest.approx(b, abs=1e-12)
        assert f["per_label"][str(lab)]["after"] == pytest.approx(a, abs=1e-12)
    assert "forgetting, mean of labels [1, 2]" in result.text()
    with pytest.raises(DataError, match="--before"):
        evaluate_folders(after, ref, tmp_path / "out2", before=tmp_path / "nope", progress=False)


def test_plan_merge_by_name_and_its_refusals():
    merged, mapping = plan_merge(SOURCE, TARGET)
    assert merged == TARGET["labels"] and mapping == {1: 1, 2: 2}
    # a source class the target does not list gets the next value
    merged, mapping = plan_merge({**SOURCE, "liver": 3}, TARGET, ["liver"])
    assert merged["liver"] == 4 and mapping == {3: 4}
    with pytest.raises(DataError, match="does not segment"):
        plan_merge(SOURCE, TARGET, ["cyst"])
    with pytest.raises(DataError, match="labels clash: \\['organ'\\]"):
        plan_merge(SOURCE, {"labels": TARGET["labels"]}, ["organ"])
    with pytest.raises(DataError, match="labels clash, value\\(s\\) \\[1\\]"):
        plan_merge(SOURCE, {"labels": {"background": 0, "organ": 1, "cyst": 1}})


def test_merge_case_keeps_the_target_and_thresholds_the_source():
    target = np.array([[0, 3, 0, 0]])
    probs = np.array([[[0.1, 0.1, 0.6, 0.2]],   # background
                      [[0.8, 0.9, 0.3, 0.45]],  # organ
                      [[0.1, 0.0, 0.1, 0.35]]])  # lesion
    out = merge_case(target, probs, {1: 1, 2: 2}, threshold=0.5)
    assert out.tolist() == [[1, 3, 0, 0]]  # organ where confident; the target's cyst kept; 0.45 < 0.5 stays 0
    assert merge_case(target, probs, {1: 1, 2: 2}, threshold=0.4).tolist() == [[1, 3, 0, 1]]
