"""Run table, splits (held-out and cross-validation), what `study plan` writes, and the refusals of a changed file."""
from __future__ import annotations

import json

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.state import RUN_FILE, run_dir, results_folder, write_json

from study.fake_tree import DATASET, DEFAULT_STUDY, make_tree, set_env


@pytest.fixture
def tree(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    return tmp_path


def study_file(tree, text=DEFAULT_STUDY, n_cases=8):
    return make_tree(tree, n_cases=n_cases, study_text=text)


def splits_file(tree):
    return tree / "preprocessed" / DATASET / "splits_final.json"


def test_held_out_table_splits_and_files(tree):
    path = study_file(tree)
    plan = prepare(path)
    runs = plan.runs
    # 2 strategies x 2 sizes, strategy-major; 8 cases: 3 test, 1 validation, 4 left -> sizes 2 and 4
    assert [r.id for r in runs] == ["scratch__n2__r0__f0", "scratch__nall__r0__f0", "frozen__n2__r0__f0",
                                    "frozen__nall__r0__f0"]
    assert [(r.n_train, r.nnunet_fold, r.configuration) for r in runs[:2]] == [(2, 0, "fake_scratch"),
                                                                             (4, 1, "fake_scratch")]
    test = set(runs[0].test)
    assert len(test) == 3 and all(set(r.test) == test for r in runs)
    splits = json.loads(splits_file(tree).read_text())
    assert splits == [{"train": list(r.train), "val": list(r.val)} for r in runs[:2]]
    assert set(splits[0]["train"]) < set(splits[1]["train"])  # nested
    assert not test & {c for s in splits for c in s["train"] + s["val"]}
    mapping = json.loads((splits_file(tree).parent / "splits_mapping.json").read_text())
    assert mapping["test"] == sorted(test) and mapping["study"] == str(path.resolve())
    out = plan.study.output
    assert sorted(p.name for p in (out / "test" / "labelsTs").iterdir()) == sorted(f"{c}.nii.gz" for c in test)
    assert sorted(p.name for p in (out / "test" / "imagesTs").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in test)
    plans = json.loads((tree / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["fake_frozen"] == {"inherits_from": "3d_fullres",
                                                      "nnunet_transfer": {"num_epochs": 4, "seed": 0}}
    # a second plan rewrites neither the plans nor the splits
    stamps = {p: p.stat().st_mtime_ns for p in (splits_file(tree), tree / "preprocessed" / DATASET / "nnUNetPlans.json")}
    again = prepare(path)
    assert [r.id for r in again.runs] == [r.id for r in runs]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


CV = DEFAULT_STUDY.replace("test = 3\nval = 1", "folds = 4").replace('n_train = [2, "all"]', 'n_train = ["all", "50%"]')


def test_cross_validation_tests_every_case_once(tree):
    plan = prepare(study_file(tree, CV, n_cases=10))
    runs = [r for r in plan.runs if r.strategy.name == "scratch"]
    assert len(runs) == 4 * 2
    tests = {r.fold: set(r.test) for r in runs}
    cases = {p.name[:-7] for p in (tree / "raw" / DATASET / "labelsTr").iterdir()}
    assert sorted(len(t) for t in tests.values()) == [2, 2, 3, 3]
    assert set().union(*tests.values()) == cases and sum(map(len, tests.values())) == len(cases)
    for r in runs:
        assert not set(r.test) & (set(r.train) | set(r.val))
        assert r.nnunet_fold == r.fold * 2 + (0 if r.size == "50%" else 1)  # sizes in increasing order
    splits = json.loads(splits_file(tree).read_text())
    assert len(splits) == 8 and all(splits[r.nnunet_fold] == {"train": list(r.train), "val": list(r.val)} for r in runs)
    for k in range(4):
        folder = plan.study.output / "test" / f"fold_{k}" / "labelsTs"
        assert sorted(p.name[:-7] for p in folder.iterdir()) == sorted(tests[k])


def test_folds_to_run_selects_outer_folds(tree):
    text = CV.replace("folds = 4", "folds = 4\nfolds_to_run = [1]")
    plan = prepare(study_file(tree, text, n_cases=10))
    assert {r.fold for r in plan.runs} == {1} and len(plan.runs) == 4
    assert len(json.loads(splits_file(tree).read_text())) == 8  # every fold stays in the splits file


def test_size_larger_than_the_dataset_writes_nothing(tree, capsys):
    path = study_file(tree, DEFAULT_STUDY.replace('n_train = [2, "all"]', "n_train = [2, 9]"))
    plans = (tree / "preprocessed" / DATASET / "nnUNetPlans.json").read_text()
    assert main(["study", "plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("nnunet_transfer study: error: study file") and "[splits]: n_train 9 is larger than the 4 " \
        "cases available for training (8 training cases of Dataset950_Fake − 3 test − 1 validation)" in err
    assert not splits_file(tree).exists() and not (tree / "fake").exists()
    assert (tree / "preprocessed" / DATASET / "nnUNetPlans.json").read_text() == plans


def test_foreign_splits_are_refused(tree):
    path = study_file(tree)
    splits_file(tree).write_text(json.dumps([{"train": ["case_000"], "val": ["case_001"]}]))
    with pytest.raises(DataError, match="splits_final.json exists with other folds .* this study did not write it"):
        prepare(path)


def started(plan, run_id):
    run = next(r for r in plan.runs if r.id == run_id)
    write_json(run_dir(plan.study, run) / RUN_FILE, plan.definitions[run_id])
    results_folder(plan.study, run).mkdir(parents=True)
    return run


def test_a_change_that_would_change_a_started_run_is_refused(tree):
    path = study_file(tree)
    started(prepare(path), "frozen__n2__r0__f0")
    changes = [("seed = 0\n", "seed = 1\n", "run frozen__n2__r0__f0: settings seed: 0 -> 1"),
               ('n_train = [2, "all"]', 'n_train = [3, "all"]', "its cases (n_train 2 -> 3"),
               ("test = 3", "test = 2", "its cases"),
               ('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFrozenEncoder"\nsettings = { lr_scale = 2.0 }',
                "settings lr_scale: '(unset)' -> 2.0")]
    for old, new, words in changes:
        path.write_text(DEFAULT_STUDY.replace(old, new, 1))
        splits = splits_file(tree).read_text()
        with pytest.raises(ConfigError) as e:
            prepare(path)
        msg = str(e.value)
        assert "changed after runs started" in msg and words in msg and "restore the file" in msg, msg
        assert splits_file(tree).read_text() == splits  # nothing rewritten
    # schedule-only: allowed, and the configuration follows
    path.write_text(DEFAULT_STUDY.replace("num_epochs = 4", "num_epochs = 6"))
    plan = prepare(path)
    plans = json.loads((tree / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["fake_frozen"]["nnunet_transfer"]["num_epochs"] == 6
    assert next(r for r in plan.runs if r.id == "frozen__n2__r0__f0").num_epochs == 6


def test_adding_a_repeat_keeps_the_started_folds(tree):
    path = study_file(tree, n_cases=10)
    plan = prepare(path)
    started(plan, "scratch__nall__r0__f0")
    path.write_text(DEFAULT_STUDY.replace("val = 1", "val = 1\nrepeats = 2"))
    plan2 = prepare(path)
    assert len(plan2.runs) == 8 and len(json.loads(splits_file(tree).read_text())) == 4
    assert plan2.definitions["scratch__nall__r0__f0"] == plan.definitions["scratch__nall__r0__f0"]


def test_a_results_folder_this_study_did_not_start_is_refused(tree):
    path = study_file(tree)
    plan = prepare(path)
    results_folder(plan.study, plan.runs[0]).mkdir(parents=True)
    with pytest.raises(DataError, match="exists but study 'fake' never started run scratch__n2__r0__f0 in it"):
        prepare(path)


def test_output_that_is_not_a_study_folder(tree):
    path = study_file(tree)
    (tree / "fake").mkdir()
    (tree / "fake" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a study folder"):
        prepare(path)


def test_case_listing_is_nnunets(tree):
    """The study lists the raw cases with nnU-Net's own rules (not its 12-process pool: see dataset_cases)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_transfer.study.folds import dataset_cases

    study_file(tree)
    raw = tree / "raw" / DATASET
    (raw / "imagesTr" / "case_000_0001.nii.gz").write_bytes(b"")  # a second channel for one case
    files, ending = dataset_cases(DATASET)
    assert ending == ".nii.gz" and files == get_filenames_of_train_images_and_targets(str(raw))
    assert len(files["case_000"]["images"]) == 2


FIVE_MISTAKES = (DEFAULT_STUDY
                 .replace('baseline = "scratch"', 'basline = "scratch"')                      # unknown key
                 .replace('n_train = [2, "all"]', "n_train = [2, 9]")                         # larger than the data
                 .replace('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFrozenEncodr"')
                 + '\n[[strategy]]\nname = "scratch"\ntrainer = "nnUNetTrainerFinetune"\n'    # a name twice
                 + "settings = { lr_scale = -1 }\n")                                           # a bad value
FIVE_LINES = [
    "[study]: unknown key 'basline' (did you mean 'baseline'?); valid keys: name, target,",
    "[[strategy]] #2 \"frozen\": unknown trainer 'nnUNetTrainerFrozenEncodr' (did you mean "
    "'nnUNetTrainerFrozenEncoder'?)",
    "[[strategy]] #3 \"scratch\" settings.lr_scale: must be a finite number > 0, got -1",
    "[[strategy]]: strategy name 'scratch' appears more than once (#1, #3,",
    "[splits]: n_train 9 is larger than the 4 cases available for training (8 training cases of Dataset950_Fake "
    "− 3 test − 1 validation)",
]


def test_a_file_with_five_mistakes_gets_all_five_in_one_run_and_nothing_written(tree, capsys):
    path = study_file(tree, FIVE_MISTAKES)
    plans_file = tree / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = plans_file.read_text()
    assert main(["study", "plan", str(path)]) == 2
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    assert err[0] == f"nnunet_transfer study: error: study file {path.resolve()} has 5 problems:"
    assert len(err) == 6 and all(line.startswith("  [") for line in err[1:]), err
    for expected, line in zip(FIVE_LINES, err[1:]):
        assert line.startswith("  " + expected), (expected, line)
    assert not (tree / "fake").exists() and not splits_file(tree).exists()
    assert plans_file.read_text() == plans
    # status and run read the file the same way, before anything else
    for verb in ("status", "run"):
        assert main(["study", verb, str(path)]) == 2
        assert capsys.readouterr().err.splitlines()[0].endswith("has 5 problems:")
    assert not (tree / "fake").exists()


def test_five_mistakes_exit_code_of_the_command(tree):
    import os
    import subprocess
    import sys

    path = study_file(tree, FIVE_MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "nnunet_transfer.cli.main", "study", "plan", str(path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.rstrip("\n").splitlines()
    assert lines[0].endswith("has 5 problems:") and len(lines) == 6, proc.stderr
    assert proc.stdout == "" and not (tree / "fake").exists() and not splits_file(tree).exists()
