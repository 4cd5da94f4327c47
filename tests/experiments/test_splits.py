"""``splits``: held-out test set, nested seeded subsets, nnU-Net's splits_final.json, links, refusals."""
from __future__ import annotations

import json
import os

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.data.synthetic import TARGET, make_dataset
from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.splits import make_splits, plan_splits, read_case_list

CASES = [f"c{i:02d}" for i in range(20)]


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    for var in ("raw", "preprocessed", "results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(f"nnUNet_{var}", str(tmp_path / var))
    folder = make_dataset(tmp_path / "raw", 931, "Splits", TARGET, n_train=12, physical_size=6.0)
    return tmp_path, folder


def flat(folds, key):
    return {c for f in folds for c in f[key]}


# --------------------------------------------------------------------------- the plan
def test_nested_subsets_disjoint_from_test_and_validation():
    plan = plan_splits(CASES, n_train=["all", 5, "50%"], repeats=3, test=4, val=3, seed=1)
    assert len(plan.test) == 4 and plan.available == 20 - 4 - 3
    assert [(f["repeat"], f["n_train"]) for f in plan.folds] == [(r, n) for r in range(3) for n in (5, 6, 13)]
    assert [f["fold"] for f in plan.folds] == list(range(9))
    assert not (flat(plan.folds, "train") | flat(plan.folds, "val")) & set(plan.test)
    for r in range(3):
        folds = [f for f in plan.folds if f["repeat"] == r]
        assert all(f["val"] == folds[0]["val"] and len(f["val"]) == 3 for f in folds)  # one val set per repeat
        assert set(folds[0]["train"]) < set(folds[1]["train"]) < set(folds[2]["train"])  # 5 ⊂ 6 ⊂ all
        assert set(folds[2]["train"]) | set(folds[0]["val"]) | set(plan.test) == set(CASES)
        assert not set(folds[2]["train"]) & set(folds[0]["val"])
    # repeats draw different subsets; the same seed draws the same ones
    assert plan.folds[0]["train"] != plan.folds[3]["train"]
    again = plan_splits(CASES, n_train=["all", 5, "50%"], repeats=3, test=4, val=3, seed=1)
    assert again.folds == plan.folds and again.test == plan.test
    assert plan_splits(CASES, n_train=[5], test=4, val=3, seed=2).test != plan.test


def test_given_test_cases_and_default_validation():
    plan = plan_splits(CASES, n_train=["all"], test_cases=["c03", "c07"], seed=0)
    assert plan.test == ["c03", "c07"] and plan.val_count == round(0.2 * 18)
    assert len(plan.folds[0]["train"]) == 18 - 4


@pytest.mark.parametrize("kw, match", [
    ({"n_train": [15], "test": 4, "val": 3},
     r"--n-train 15 is larger than the 13 cases available for training \(20 training cases of the dataset − 4 "
     r"test − 3 validation\)"),
    ({"n_train": [5], "test": 20}, "--test 20 leaves nothing to train on: the dataset has 20 training cases"),
    ({"n_train": [5], "test": 2, "val": 18}, "--val 18 leaves no training case"),
    ({"n_train": [5], "test": 2, "val": 0}, "--val 0 must be at least 1"),
    ({"n_train": [5, "5"], "test": 2}, "--n-train 5 and 5 are both 5 cases"),
    ({"n_train": ["five"], "test": 2}, "--n-train 'five' is not a size"),
    ({"n_train": ["0"], "test": 2}, "at least 1 case"),
    ({"n_train": ["150%"], "test": 2}, r"percentage must be in \(0, 100\]"),
    ({"n_train": [5], "test_cases": ["c01", "x9"]}, "test case\\(s\\) x9 are not training cases"),
    ({"n_train": [5]}, "either as a number of cases"),
    ({"n_train": [5], "test": 2, "repeats": 0}, "--repeats 0"),
])
def test_bad_plans_are_one_clear_error(kw, match):
    with pytest.raises(DataError, match=match):
        plan_splits(CASES, **kw)


def test_case_list_files(tmp_path):
    (tmp_path / "a.txt").write_text("c01\n\n# held out\nc02  # second\n")
    (tmp_path / "b.json").write_text('["c05", "c06"]')
    assert read_case_list(tmp_path / "a.txt") == ["c01", "c02"]
    assert read_case_list(tmp_path / "b.json") == ["c05", "c06"]
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="lists no test cases"):
        read_case_list(tmp_path / "e.txt")


# --------------------------------------------------------------------------- files
def test_writes_nnunet_splits_mapping_and_test_links(dataset):
    root, folder = dataset
    res = make_splits(931, n_train=[3, "all"], repeats=2, test=3, val=2, seed=0)
    base = root / "preprocessed" / folder.name
    splits = json.loads((base / "splits_final.json").read_text())
    assert [sorted(s) for s in splits] == [["train", "val"]] * 4  # nnU-Net's format
    assert [len(s["train"]) for s in splits] == [3, 7, 3, 7]
    mapping = json.loads((base / "splits_mapping.json").read_text())
    assert [(f["fold"], f["n_train"], f["repeat"]) for f in mapping["folds"]] == [(0, 3, 0), (1, 7, 0), (2, 3, 1),
                                                                                  (3, 7, 1)]
    assert mapping["test"] == res.plan.test and mapping["n_train"] == [3, "all"]
    test = set(res.plan.test)
    assert not test & {c for s in splits for c in s["train"] + s["val"]}
    images = sorted(p.name for p in (base / "heldout_test" / "imagesTs").iterdir())
    labels = sorted(p.name for p in (base / "heldout_test" / "labelsTs").iterdir())
    assert images == [f"{c}_0000.nii.gz" for c in sorted(test)] and labels == [f"{c}.nii.gz" for c in sorted(test)]
    for c in test:
        link = base / "heldout_test" / "labelsTs" / f"{c}.nii.gz"
        assert os.path.samefile(link, folder / "labelsTr" / f"{c}.nii.gz")
        assert os.path.samefile(base / "heldout_test" / "imagesTs" / f"{c}_0000.nii.gz",
                                folder / "imagesTr" / f"{c}_0000.nii.gz")
    assert "nnUNetv2_predict -i" in res.text() and "never fold 'all'" in res.text()


def test_existing_splits_need_force_and_are_kept(dataset):
    root, folder = dataset
    base = root / "preprocessed" / folder.name
    make_splits(931, n_train=[3], test=2, val=2, seed=0)
    before = (base / "splits_final.json").read_text()
    with pytest.raises(DataError, match="exist.*--force replaces them"):
        make_splits(931, n_train=[4], test=2, val=2, seed=1)
    assert (base / "splits_final.json").read_text() == before  # untouched
    res = make_splits(931, n_train=[4], test=2, val=2, seed=1, force=True)
    assert (base / "splits_final.json.bak").read_text() == before
    assert [len(s["train"]) for s in json.loads((base / "splits_final.json").read_text())] == [4]
    assert sorted(p.name[:-len(".nii.gz")] for p in (base / "heldout_test" / "labelsTs").iterdir()) == res.plan.test


def test_failures_write_nothing(dataset):
    root, folder = dataset
    base = root / "preprocessed" / folder.name
    with pytest.raises(DataError, match=r"--n-train 20 is larger than the 7 cases available"):
        make_splits(931, n_train=[20], test=3, val=2)
    assert not base.exists()
    (root / "list.txt").write_text(f"{folder.name.split('_')[1].lower()}_000.nii.gz\nnope\n")
    with pytest.raises(DataError, match="nope are not training cases"):
        make_splits(931, n_train=[2], test_cases=root / "list.txt")
    assert not base.exists()


def test_command_line(dataset, capsys):
    root, folder = dataset
    (root / "test.txt").write_text("splits_000\nsplits_001\n")
    assert main(["splits", "-d", "931", "--n-train", "2", "all", "--test-cases", str(root / "test.txt"),
                 "--val", "2", "--seed", "4", "--copy"]) == 0
    out = capsys.readouterr().out
    assert "2 folds; 2 held-out test cases in no fold" in out
    base = root / "preprocessed" / folder.name
    assert json.loads((base / "splits_mapping.json").read_text())["test"] == ["splits_000", "splits_001"]
    assert not (base / "heldout_test" / "labelsTs" / "splits_000.nii.gz").is_symlink()  # --copy
    assert main(["splits", "-d", "931", "--n-train", "2", "--test", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force replaces them" in err[0]
