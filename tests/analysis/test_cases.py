"""Which cases ``analyze`` samples (``--cases``) and where in them (``--foreground``): by default the held-out
test cases that ``splits`` / ``study plan`` record in splits_mapping.json, at uniform locations (Karimi et al.:
"blocks from random locations in the test images"); every case, or nnU-Net's foreground oversampling, one
flag away; the output says which."""
from __future__ import annotations

import json

import pytest

from nnunet_transfer.analysis.activations import NNUNET_FOREGROUND
from nnunet_transfer.analysis.cases import choose_cases, parse_cases
from nnunet_transfer.errors import ConfigError, DataError

from .test_activations import TOY, source, toy_env, toy_tree  # noqa: F401 (fixtures)
from .test_karimi import FAST, cli, runs  # noqa: F401 (fixture)

ALL = ["case_000", "case_001", "case_002"]


@pytest.fixture
def mapping(toy_env):
    """Write splits_mapping.json into the shared toy tree for one test, and take it away after."""
    path = toy_env["nnUNet_preprocessed"] / TOY / "splits_mapping.json"

    def write(content: dict):
        path.write_text(json.dumps(content))
        return path

    yield write
    path.unlink(missing_ok=True)


def held_out(cases):
    return {"tool": "nnunet_transfer splits", "dataset": TOY, "test": cases,
            "folds": [{"fold": 0, "repeat": 0, "n_train": 1, "n_train_requested": 1, "n_val": 1}]}


def cross_validation(tests_by_outer):
    return {"tool": "nnunet_transfer study", "dataset": TOY, "cross_validation": len(tests_by_outer), "test": [],
            "test_by_fold": tests_by_outer,
            "folds": [{"fold": k, "repeat": 0, "n_train": 1, "n_train_requested": "all", "n_val": 1,
                       "outer_fold": k} for k in range(len(tests_by_outer))]}


def compare(capsys, tmp_path, nets, *extra):
    code, out, err = cli(capsys, "analyze", "compare", *nets, *FAST, "-o", tmp_path, *extra)
    assert code == 0, err
    meta = json.loads((tmp_path / "compare.json").read_text())["meta"]
    return meta, (tmp_path / "summary.md").read_text(), out


def test_parse_cases():
    assert parse_cases(None) is None and parse_cases("test") == "test" and parse_cases(" all ") == "all"
    assert parse_cases("case_000, case_001") == ["case_000", "case_001"] and parse_cases(["a"]) == ["a"]
    with pytest.raises(ConfigError, match="--cases ',' names no case"):
        parse_cases(",")


def test_without_recorded_test_cases_every_case_is_sampled_and_the_output_says_so(toy_env, runs, capsys, tmp_path):
    ri = runs["RI"][0]
    meta, summary, out = compare(capsys, tmp_path / "a", [ri, f"{ri}@start"])
    assert meta["patches_from"]["from"] == "all-fallback" and meta["patches_from"]["cases"] == ALL
    line = "patches from all 3 preprocessed cases, training cases included: no held-out test cases are recorded"
    assert line in summary and line in out  # printed, not only written
    assert "uniform locations (--foreground 0)" in summary
    assert meta["patches_from"]["foreground"] == 0.0
    assert not any(p["foreground"] for p in meta["sampling"]["first_patches"])
    # --cases test insists: one line saying why and what to do
    code, out, err = cli(capsys, "analyze", "compare", ri, f"{ri}@start", *FAST, "-o", tmp_path / "b",
                         "--cases", "test")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--cases test: no held-out test cases are recorded" in lines[0]
    assert "--cases FILE" in lines[0] and "--cases all" in lines[0] and not (tmp_path / "b").exists()


def test_held_out_test_cases_are_the_default(toy_env, runs, mapping, capsys, tmp_path):
    path = mapping(held_out(["case_001"]))
    ri = runs["RI"][0]
    meta, summary, _ = compare(capsys, tmp_path / "a", [ri, f"{ri}@start"])
    assert meta["patches_from"]["from"] == "test" and meta["patches_from"]["cases"] == ["case_001"]
    assert meta["sampling"]["cases"] == 1
    assert all(p["case"] == "case_001" for p in meta["sampling"]["first_patches"])
    assert f"patches from the 1 held-out test cases ({path}, written by nnunet_transfer splits)" in summary
    # the old behaviour, one flag away: every case, a third of the patches on foreground
    meta, summary, _ = compare(capsys, tmp_path / "b", [ri, f"{ri}@start"], "--cases", "all",
                               "--foreground", str(NNUNET_FOREGROUND))
    assert meta["patches_from"]["from"] == "all" and meta["patches_from"]["cases"] == ALL
    assert "training cases included (--cases all)" in summary and "a share 0.33 centred on foreground" in summary
    # a file of identifiers
    listed = tmp_path / "cases.txt"
    listed.write_text("# mine\ncase_002\ncase_000\n")
    meta, summary, _ = compare(capsys, tmp_path / "c", [ri, f"{ri}@start"], "--cases", listed)
    assert meta["patches_from"]["from"] == "given" and meta["patches_from"]["cases"] == ["case_000", "case_002"]


def test_cross_validation_test_cases_follow_the_runs_fold(toy_env, runs, mapping, capsys, tmp_path):
    mapping(cross_validation([["case_000"], ["case_002"]]))
    ri0, ri1 = runs["RI"]  # fold_0 and fold_1 of Dataset990_Toy
    meta, summary, _ = compare(capsys, tmp_path / "a", [ri1, f"{ri1}@start"])
    assert meta["patches_from"]["cases"] == ["case_002"] and "outer fold 1 of" in summary
    # networks of two outer folds share no test case: every case, and why
    meta, summary, _ = compare(capsys, tmp_path / "b", [ri0, ri1])
    assert meta["patches_from"]["from"] == "all-fallback"
    assert "the runs analysed come from cross-validation outer folds [0, 1], whose test cases differ" in summary
    # the same through evolution (one run) and weights' feature-map patch
    code, out, err = cli(capsys, "analyze", "evolution", ri0, *FAST, "-o", tmp_path / "evo", "--convergence-from", "raw")
    assert code == 0, err
    evo = json.loads((tmp_path / "evo" / "evolution.json").read_text())["meta"]
    assert evo["patches_from"]["cases"] == ["case_000"]
    code, out, err = cli(capsys, "analyze", "weights", ri1, *FAST[:6], "--device", "cpu", "--no-progress",
                         "--filters", "2", "-o", tmp_path / "w", "--converged", "final")
    assert code == 0, err
    w = json.loads((tmp_path / "w" / "weights.json").read_text())["meta"]
    assert w["patches_from"]["cases"] == ["case_002"]
    assert "patches from the 1 held-out test cases (outer fold 1" in (tmp_path / "w" / "summary.md").read_text()


def test_choose_cases_reasons(toy_env, mapping, tmp_path):
    runs_dir = toy_env["nnUNet_results"] / TOY / "T__nnUNetPlans__tiny"
    assert choose_cases(TOY, None, []).kind == "all-fallback"
    mapping(cross_validation([["case_000"], ["case_002"]]))
    why = choose_cases(TOY, None, [tmp_path / "Dataset001_Other" / "T__P__c" / "fold_0"]).why
    assert "no run of Dataset990_Toy" in why  # a source network's fold says nothing about this dataset's test folds
    assert choose_cases(TOY, "test", [runs_dir / "fold_1"]).cases == ["case_002"]
    with pytest.raises(DataError, match="does not know the outer fold of every run"):
        choose_cases(TOY, "test", [runs_dir / "fold_7"])
    with pytest.raises(DataError, match=r"--cases file .*nope.txt not found"):
        choose_cases(TOY, tmp_path / "nope.txt", [])


def test_test_cases_missing_from_the_preprocessed_data_are_one_line(toy_env, runs, mapping, capsys, tmp_path):
    mapping(held_out(["case_009"]))
    code, out, err = cli(capsys, "analyze", "compare", runs["RI"][0], f"{runs['RI'][0]}@start", *FAST,
                         "-o", tmp_path / "a")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "the held-out test cases (" in lines[0]
    assert "case(s) ['case_009'] not in" in lines[0] and "--cases all" in lines[0]
