"""[racing] in the study file: validated with the rest of the file; its rungs become every run's pause_at."""
from __future__ import annotations

import textwrap

import pytest

from nnunet_transfer.errors import ConfigError
from nnunet_transfer.study.problems import StudyFileError
from nnunet_transfer.study.spec import load_study

from study.fake_tree import DEFAULT_STUDY, make_tree, set_env


@pytest.fixture
def tree(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    make_tree(tmp_path, n_cases=8)
    return tmp_path


def write(tree, racing: str, extra: str = ""):
    path = tree / "s.toml"
    path.write_text(DEFAULT_STUDY + extra + "\n[racing]\n" + textwrap.dedent(racing))
    return path


def test_rungs_as_fractions_become_pause_at_of_every_strategy(tree):
    s = load_study(write(tree, 'rungs = [0.25, 0.5]\nrule = "halving"\neta = 3\n'))  # num_epochs = 4
    assert (s.racing.rungs, s.racing.rule, s.racing.eta, s.racing.num_epochs) == ((1, 2), "halving", 3, 4)
    assert all(s.effective_settings(x)["pause_at"] == [1, 2] for x in s.strategies)


@pytest.mark.parametrize("racing, words", [
    ("rungs = [2, 1]\n", "rungs = [2, 1] are epochs [2, 1] of num_epochs 4; they must increase and fall before"),
    ("rungs = [4]\n", "they must increase and fall before num_epochs"),
    ("rungs = [1, 0.5]\n", "must be a non-empty list of epoch counts >= 1 (e.g. [10, 30]) or of fractions"),
    ("rungs = [1]\nrule = \"pairs\"\n", "rule = 'pairs' is not one of paired, halving"),
    ("rungs = [1]\nalpha = 1.5\n", "alpha = 1.5 must be a level in (0, 1)"),
    ("rungs = [1]\neta = 1\n", "eta = 1 must be an integer >= 2"),
    ("rule = \"paired\"\n", "rungs is missing"),
    ("rungs = [1]\nrungz = 2\n", "rungz"),
])
def test_bad_racing_is_one_clear_problem(tree, racing, words):
    with pytest.raises(ConfigError) as e:
        load_study(write(tree, racing))
    assert words in str(e.value)


def test_racing_problems_are_collected_with_the_others(tree):
    path = tree / "s.toml"
    path.write_text(DEFAULT_STUDY.replace("[study]", "[study]\nbogus = 1", 1) + "\n[racing]\nrungs = [1]\neta = 0\n")
    with pytest.raises(StudyFileError) as e:
        load_study(path)
    assert "bogus" in str(e.value) and "eta = 0 must be an integer >= 2" in str(e.value)
