"""``splits`` → two strategies through the real ``nnUNetv2_train`` on one small fold each → ``nnUNetv2_predict``
on the held-out test folder → ``evaluate`` → ``compare`` (issue 11's "done when").

A dataset of its own (911: tests/conftest.py's smoke_data gives it the cases and preprocessed data of the
studies' 912, copied before anything writes into 912): writing splits_final.json into the shared target 902 would
change every other test's folds.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from nnunet_transfer.experiments.convergence import log_convergence
from nnunet_transfer.cli.main import main
from nnunet_transfer.experiments.metrics import label_metrics
from nnunet_transfer.pipeline import train_args

from conftest import EVAL_ID, QUICK_SETTINGS, TINY, load_checkpoint

pytestmark = pytest.mark.slow

CONFIG = "ev_quick"
EPOCHS = 3
STRATEGIES = {"scratch": ("nnUNetTrainerTransferBase", False), "tl_frozen": ("nnUNetTrainerFrozenEncoder", True)}


@pytest.fixture(scope="module")
def study(smoke_data, tmp_path_factory):
    ws = smoke_data
    folder = ws.root / "raw" / ws.dataset_name(EVAL_ID)
    # 10 cases: 3 held out, 1 validation, training subsets of 2 and all (6) -> folds 0 and 1
    assert main(["splits", "-d", str(EVAL_ID), "--n-train", "2", "all", "--test", "3", "--val", "1"]) == 0
    ws.configure(EVAL_ID, TINY, CONFIG, {**QUICK_SETTINGS, "num_epochs": EPOCHS})
    base = ws.root / "preprocessed" / folder.name
    out = tmp_path_factory.mktemp("experiments")
    runs = {}
    for name, (trainer, pretrained) in STRATEGIES.items():
        ws.run(train_args(EVAL_ID, CONFIG, 0, trainer, pretrained=ws.source_checkpoint if pretrained else None),
               f"train {trainer} fold 0 of 911", train=True)
        fold = ws.root / "results" / folder.name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
        pred = out / f"pred_{name}"
        ws.run(["nnUNetv2_predict", "-i", base / "heldout_test" / "imagesTs", "-o", pred, "-d", EVAL_ID, "-c", CONFIG,
                "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta",
                "--disable_progress_bar"], f"predict {trainer} on the held-out cases")
        assert main(["evaluate", str(pred), str(base / "heldout_test" / "labelsTs"), "-o", str(out / f"eval_{name}"),
                     "--run", str(fold), "--nsd-tolerance", "1.5", "--no-progress"]) == 0
        runs[name] = {"trainer": trainer, "fold": fold, "pred": pred, "eval": out / f"eval_{name}"}
    assert main(["compare", *(f"{n}={r['eval']}" for n, r in runs.items()), "--baseline", "scratch",
                 "-o", str(out / "cmp"), "--resamples", "500"]) == 0
    return {"ws": ws, "folder": folder, "base": base, "runs": runs, "out": out}


def test_no_test_case_was_trained_on(study):
    base, folder = study["base"], study["folder"]
    mapping = json.loads((base / "splits_mapping.json").read_text())
    splits = json.loads((base / "splits_final.json").read_text())
    test = set(mapping["test"])
    assert len(test) == 3 and [len(s["train"]) for s in splits] == [2, 6] and [len(s["val"]) for s in splits] == [1, 1]
    assert set(splits[0]["train"]) < set(splits[1]["train"])
    assert not test & {c for s in splits for c in s["train"] + s["val"]}
    assert test | set(splits[1]["train"]) | set(splits[1]["val"]) == {p.name[:-7] for p in (folder / "labelsTr").iterdir()}
    for r in study["runs"].values():
        log = "\n".join(p.read_text() for p in r["fold"].glob("training_log_*.txt"))
        # nnU-Net read our file and trained fold 0 of it: 2 training cases, 1 validation case
        assert f"Using splits from existing split file: {base / 'splits_final.json'}" in log
        assert "This split has 2 training and 1 validation cases." in log
        assert sorted(p.name for p in r["pred"].glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in test)


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))  # an independent reader (nibabel), (x, y, z) -> (z, y, x)
    return np.asarray(img.dataobj).transpose(2, 1, 0).round().astype(int), tuple(img.header.get_zooms()[::-1])


def test_evaluate_matches_an_independent_reading(study):
    base = study["base"]
    for r in study["runs"].values():
        summary = json.loads((r["eval"] / "summary.json").read_text())
        assert summary["run"] == str(r["fold"].resolve()) and summary["labels"] == [1, 2]
        assert summary["label_names"] == {"1": "organ", "2": "lesion"}  # from the prediction's dataset.json
        with open(r["eval"] / "per_case.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 * 2
        for row in rows:
            pred, sp = read_nifti(r["pred"] / f"{row['case']}.nii.gz")
            ref, sp_r = read_nifti(base / "heldout_test" / "labelsTs" / f"{row['case']}.nii.gz")
            assert sp == pytest.approx(sp_r) and sp == pytest.approx((1.5, 1.0, 1.0))
            lab = int(row["label"])
            want = label_metrics(pred == lab, ref == lab, spacing=sp, nsd_tolerance=1.5)
            for m in ("dice", "hd95", "assd", "nsd", "precision", "recall", "lesion_tp", "lesion_fp", "lesion_fn"):
                got = float(row[m])
                assert got == pytest.approx(want[m], abs=1e-9) or (math.isinf(got) and math.isinf(want[m])), (row, m)


def test_compare_tables_plots_and_convergence(study):
    from matplotlib.image import imread

    cmp, runs = study["out"] / "cmp", study["runs"]
    with open(cmp / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 7 * 2
    # the paired t-test of Dice (organ) equals scipy's on the two per-case tables
    per = {}
    for name, r in runs.items():
        with open(r["eval"] / "per_case.csv") as f:
            per[name] = {x["case"]: float(x["dice"]) for x in csv.DictReader(f) if x["label"] == "1"}
    cases = sorted(per["scratch"])
    x, b = np.array([per["tl_frozen"][c] for c in cases]), np.array([per["scratch"][c] for c in cases])
    row = next(r for r in rows if r["strategy"] == "tl_frozen" and r["metric"] == "dice" and r["label"] == "1")
    if np.any(x != b):
        assert float(row["p_ttest"]) == pytest.approx(stats.ttest_rel(x, b).pvalue, abs=1e-12)
    assert float(row["mean_diff"]) == pytest.approx((x - b).mean(), abs=1e-12)
    doc = json.loads((cmp / "comparison.json").read_text())
    md = (cmp / "comparison.md").read_text()
    for s in doc["strategies"]:
        r = runs[s["name"]]
        info = s["run_info"]
        log = load_checkpoint(r["fold"] / "checkpoint_final.pth")["logging"]
        want = log_convergence({k: [v.item() if isinstance(v, np.generic) else v for v in vals]  # np.float32
                                for k, vals in log.items()})
        assert want["epoch"] is not None
        assert info["convergence"]["epoch"] == want["epoch"] and info["convergence"]["epochs"] == EPOCHS
        assert info["convergence"]["seconds"] == pytest.approx(want["seconds"])
        assert info["convergence"]["seconds_per_epoch"] == pytest.approx(want["seconds_per_epoch"])
        params = json.loads((r["fold"] / "transfer_config.json").read_text())["parameters"]
        assert info["trainable_share"] == pytest.approx(params["trainable"] / params["total"])
        assert (f"| {s['name']} | {100 * info['trainable_share']:.1f} % ({params['trainable']:,} of "
                f"{params['total']:,}) | {EPOCHS} | {want['epoch'] + 1} | ") in md
    shares = {s["name"]: s["run_info"]["trainable_share"] for s in doc["strategies"]}
    assert shares["scratch"] == 1.0 and 0 < shares["tl_frozen"] < 1  # the frozen encoder does not train
    assert "## label 1 (organ)" in md and "| scratch (baseline) |" in md
    for name in ("boxplot_label1.png", "boxplot_label2.png", "learning_curves.png"):
        assert imread(cmp / name).shape[0] > 200
