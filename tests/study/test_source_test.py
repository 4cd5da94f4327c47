"""[source_test]: a study scores every run's old classes on the source's test set against the source model's own
predictions (forgetting); nnU-Net's programs replaced by the fakes of test_run_report."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import nnunet_transfer.pipeline as pipeline
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.report import report_study
from nnunet_transfer.study.runner import run_study
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import run_dir

from study.fake_tree import DEFAULT_STUDY, blob, make_tree, set_env, write_label
from study.test_run_report import FakePrograms

SOURCE_TEST = """
[pretrained]
source = "source_model/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0"

[source_test]
images = "src/imagesTs"
labels = "src/labelsTs"
old_labels = [1, 2]
"""


def source_tree(root):
    fold = root / "source_model" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    torch.save({"trainer_name": "nnUNetTrainer"}, fold / "checkpoint_final.pth")
    rng = np.random.default_rng(3)
    for sub in ("imagesTs", "labelsTs"):
        (root / "src" / sub).mkdir(parents=True)
    for i in range(2):
        seg = blob(rng, (16, 16, 16), 5)
        write_label(root / "src" / "labelsTs" / f"src_{i}.nii.gz", seg)
        write_label(root / "src" / "imagesTs" / f"src_{i}_0000.nii.gz", seg * 50)
    return fold


def test_source_test_is_read_and_checked(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    source_tree(tmp_path)
    study = load_study(make_tree(tmp_path, study_text=DEFAULT_STUDY + SOURCE_TEST))
    st = study.source_test
    assert st.images == (tmp_path / "src" / "imagesTs").resolve() and st.pretrained == "source"
    assert st.old_labels == (1, 2)
    bad = SOURCE_TEST.replace('images = "src/imagesTs"', 'images = "src/nope"').replace("old_labels = [1, 2]",
                                                                                       "old_labels = [0]")
    with pytest.raises(ConfigError) as e:
        load_study(make_tree(tmp_path, study_text=DEFAULT_STUDY + bad))
    text = str(e.value)
    assert "[source_test]" in text and "src/nope" in text and "old_labels = [0]" in text


def test_every_run_is_scored_on_the_source_test_set_and_reported(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    fold = source_tree(tmp_path)
    path = make_tree(tmp_path, study_text=DEFAULT_STUDY + SOURCE_TEST)
    fake = FakePrograms(tmp_path)
    monkeypatch.setattr(pipeline, "run_step", fake)
    summary = run_study(path, say=lambda s: None)
    assert all(o.result == "done" for o in summary.outcomes)
    before = [c for c in fake.calls if c[0] == "nnUNetv2_predict_from_modelfolder"]
    assert len(before) == 1  # the source model predicts its test set once for the whole study
    args = before[0]
    assert args[args.index("-m") + 1] == str(fold.parent) and args[args.index("-f") + 1] == "0"
    assert args[args.index("-chk") + 1] == "checkpoint_final.pth"
    plan = prepare(path, write=False, check_weights=False)
    for r in plan.runs:
        f = json.loads((run_dir(plan.study, r) / "source_eval" / "summary.json").read_text())["forgetting"]
        # the fakes predict the references: before = after = 1
        assert f["labels"] == [1, 2] and f["mean"] == {"before": 1.0, "after": 1.0, "drop": 0.0, "kept": 1.0}
    res = report_study(path, tmp_path / "report", plots=False, say=lambda s: None)
    rows = list(csv.DictReader((res.out / "forgetting.csv").open()))
    assert sorted(r["run"] for r in rows) == sorted(r.id for r in plan.runs)
    md = (res.out / "report.md").read_text()
    assert "## Forgetting (source test set)" in md and "| scratch | 2 | 1 | 1.000 | 1.000 | 100 % |" in md
