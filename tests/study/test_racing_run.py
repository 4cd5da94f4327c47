"""``study run`` / ``study replay-racing`` reach the racing code through the command line (no training): a study
with [racing] is run rung by rung by :func:`nnunet_transfer.study.racing.run_racing`, not refused by the plain
runner, and its refusals are one clear line."""
from __future__ import annotations

import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import results_folder
from nnunet_transfer.study.table import build_table, plan_study_splits

from study.fake_tree import DEFAULT_STUDY, make_tree, set_env

TEXT = DEFAULT_STUDY.replace("val = 1", "val = 1\nrepeats = 2") + "\n[racing]\nrungs = [1, 2]\nrule = \"halving\"\n"


@pytest.fixture
def path(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    return make_tree(tmp_path, n_cases=8, study_text=TEXT)


@pytest.mark.parametrize("args, words", [
    (["--only", "scratch"], "--only cannot be used with [racing]"),
])
def test_study_run_hands_a_racing_study_to_the_racing_loop(path, capsys, args, words):
    # before: "study file ... has [racing]: run it with `nnunet_transfer study run`" from the plain runner, always
    assert main(["study", "run", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet_transfer study: error: ") and err.count("\n") == 1 and words in err, err


def test_study_replay_racing_on_the_command_line(path, capsys):
    s = load_study(path)
    for r in build_table(s, plan_study_splits(s)):
        fold = results_folder(s, r)
        fold.mkdir(parents=True, exist_ok=True)
        curve = [0.3 + 0.1 * e + 0.01 * r.repeat - (0.2 if r.strategy.name == "frozen" else 0) for e in range(4)]
        torch.save({"logging": {"ema_fg_dice": curve}, "current_epoch": 4}, fold / "checkpoint_final.pth")
    assert main(["study", "replay-racing", str(path)]) == 0
    out = capsys.readouterr().out
    assert "replay of racing: rule halving, rungs [1, 2]" in out and "dropped frozen@1" in out
