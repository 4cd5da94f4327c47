"""The study file's parts on their own, without a file or a trainer: the problem collector and value readers
(study/problems.py), the dataclasses' derived names (study/model.py), and section readers fed a table."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.study.folds import SplitSpec
from nnunet_transfer.study.model import Scoring, Strategy, Study, sweep_label
from nnunet_transfer.study.problems import (Problems, StudyFileError, expand_path, read_int, read_name, read_table,
                                            suggest)
from nnunet_transfer.study.read_analysis import read_analysis_table
from nnunet_transfer.study.read_execution import read_environment, read_slurm
from nnunet_transfer.study.read_inputs import read_splits
from nnunet_transfer.study.read_scoring import read_predict, read_scoring
from nnunet_transfer.study.read_strategies import plans_value, read_settings

F = Path("/x/s.toml")


def texts(p: Problems) -> list[str]:
    return [f"{where}: {text}" for where, text, _ in p.items]


def test_one_problem_is_its_own_class_several_are_one_study_file_error():
    p = Problems(F)
    assert p.error() is None and not p
    p.add("pretrained", "gone", DataError)
    e = p.error()
    assert type(e) is DataError and str(e) == "study file /x/s.toml [pretrained]: gone"
    p.add("[[strategy]] #1", "bad")
    p.add("[[strategy]] #1", "bad")  # the same cause twice is one problem
    e = p.error()
    assert isinstance(e, StudyFileError) and isinstance(e, ConfigError) and len(p) == 2
    assert str(e) == "study file /x/s.toml has 2 problems:\n  [pretrained]: gone\n  [[strategy]] #1: bad"
    with pytest.raises(StudyFileError):
        p.raise_if_any()


@pytest.mark.parametrize("reader,value,expected,problem", [
    (read_int, 3, 3, None),
    (read_int, True, None, "[t]: k = True must be an integer >= 1"),
    (read_int, 0, None, "[t]: k = 0 must be an integer >= 1"),
    (read_name, " ok-1.a ", "ok-1.a", None),
    (read_name, "a__b", None, "[t]: k = 'a__b' may hold only letters, digits, '_', '.' and '-' (no '__': nnU-Net "
                              "separates trainer, plans and configuration with it), starting with a letter or digit"),
    (read_name, "  ", None, "[t]: k = '  ' must be a non-empty string"),
])
def test_value_readers_return_the_value_or_none_and_word_the_problem(reader, value, expected, problem):
    p = Problems(F)
    args = (p, "t", "k", value, 1) if reader is read_int else (p, "t", "k", value)
    assert reader(*args) == expected
    assert texts(p) == ([problem] if problem else [])


def test_read_table_reports_unknown_keys_with_the_closest_and_drops_them():
    p = Problems(F)
    assert read_table(p, "predict", {"procesess": 2, "processes": 1}, ("processes", "checkpoint")) == {"processes": 1}
    assert texts(p) == ["[predict]: unknown key 'procesess' (did you mean 'processes'?); valid keys: processes, "
                        "checkpoint"]
    assert read_table(p, "slurm", [1], ("x",)) is None and texts(p)[-1] == \
        "[slurm]: must be a table (section), got list: [1]"
    assert suggest("zzz", ["dice"]) == ""


def test_expand_path_is_relative_to_the_file_and_an_unset_variable_is_a_data_problem(monkeypatch):
    monkeypatch.setenv("STUDY_T", "/abs")
    monkeypatch.delenv("STUDY_UNSET", raising=False)
    p = Problems(F)
    assert expand_path("$STUDY_T/a", F.parent, what="output", p=p, table="study") == Path("/abs/a")
    assert expand_path("rel/b", F.parent, what="output", p=p, table="study") == Path("/x/rel/b")
    assert expand_path("$STUDY_UNSET/c", F.parent, what="output", p=p, table="study") is None
    assert expand_path("$STUDY_UNSET/c", F.parent, what="output", p=p, table="study", strict=False) == \
        Path("/x/$STUDY_UNSET/c")
    assert p.items[0][2] is DataError and len(p) == 1


def test_model_names_sweeps_configurations_and_merged_settings():
    assert [sweep_label(v) for v in (8, 0.5, math.inf, 1e-4)] == ["8", "0.5", "inf", "0.0001"]
    a = Strategy("l2sp-0", "T", "src", {"l2sp_alpha": 0}, "t", "l2sp_alpha", 0, "l2sp")
    b = Strategy("l2sp-inf", "T", "src", {"l2sp_alpha": "inf"}, "t", "l2sp_alpha", math.inf, "l2sp")
    c = Strategy("scratch", "T", None, {"lr_scale": 2}, "t")
    study = Study(path=F, name="k", dataset="D", configuration="3d_fullres", plans="P", output=Path("/o"),
                  baseline="scratch", device="cpu", pretrained={}, splits=SplitSpec(n_train=(6,)), settings={"a": 1},
                  strategies=(c, a, b), scoring=Scoring(), base_settings={"a": 0, "lr_scale": 1})
    assert study.configuration_of(a) == "k_l2sp-0" and study.strategy("scratch") is c
    assert study.effective_settings(c) == {"a": 1, "lr_scale": 2}
    assert study.sweeps == {"l2sp": [a, b]}


def test_settings_reader_keeps_good_values_as_plans_hold_them_and_reports_each_bad_one():
    p = Problems(F)
    assert plans_value({"x": [math.inf, 1]}) == {"x": ["inf", 1]}
    out = read_settings(p, "settings", {"l2sp_alpha": math.inf, "nmu_epochs": 3})
    assert out == {"l2sp_alpha": "inf"}
    assert len(p) == 1 and p.items[0][0] == "[settings]" and "unknown setting 'nmu_epochs' (did you mean " \
                                                             "'num_epochs'?)" in p.items[0][1]


def test_section_readers_on_their_own_tables():
    p = Problems(F)
    assert read_scoring(p, {"labels": [2, 1, 2], "alpha": 0.01}) == Scoring(labels=(2, 1), alpha=0.01)
    assert read_predict(p, {"checkpoint": "best", "processes": 0}) == (False, 0, "best")
    assert read_environment(p, {"nnUNet_n_proc_DA": 12}) == {"nnUNet_n_proc_DA": "12"}
    assert read_slurm(p, {"partition": "gpu", "mem_gb": 64}) == {"partition": "gpu", "mem_gb": 64}
    assert read_splits(p, {"n_train": [6, "all"], "folds": 5, "folds_to_run": [3, 0]}, F.parent) == \
        SplitSpec(n_train=(6, "all"), folds=5, folds_to_run=(0, 3))
    an, every, settings = read_analysis_table(p, {"snapshot_every": 50}, {"num_epochs": 100})
    assert an == {"snapshot_every": 50} and every == 50 and settings == {"num_epochs": 100, "snapshot_every": 50}
    assert not p, texts(p)
    read_predict(p, {"checkpoint": "last", "disable_tta": 1})
    read_environment(p, {"nnUNet_raw": "/r"})
    assert texts(p) == [
        "[predict]: disable_tta = 1 must be true or false",
        "[predict]: checkpoint = 'last' must be one of 'final', 'best' (\"best\": nnUNetv2_predict -chk "
        "checkpoint_best.pth)",
        "[environment]: nnUNet_raw comes from the environment `study` runs in (every run must use the same folders); "
        "set it there, not in the study file"]
