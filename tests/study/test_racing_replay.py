"""study replay-racing and the racing record: on a study tree whose runs 'ran in full' (checkpoint_final.pth with
an EMA pseudo-Dice curve of known values), the replay drops what the rules say, counts the epochs exactly, and
``study status`` shows the decisions of racing.json."""
from __future__ import annotations

import re

import pytest
import torch

from nnunet_transfer.experiments.racing import decide
from nnunet_transfer.study.racing import RACING_FILE, racing_lines, replay, unit_of
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import results_folder, write_json
from nnunet_transfer.study.table import build_table, plan_study_splits

from study.fake_tree import DEFAULT_STUDY, make_tree, set_env

TEXT = DEFAULT_STUDY.replace("val = 1", "val = 1\nrepeats = 3") + "\n[racing]\nrungs = [1, 2]\n"


@pytest.fixture
def study(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    s = load_study(make_tree(tmp_path, n_cases=8, study_text=TEXT))
    runs = build_table(s, plan_study_splits(s))
    for r in runs:
        # scratch: 0.5, 0.6, 0.7, 0.8 (+ a per-unit offset); frozen: 0.25 below, with a different offset per unit
        offset = 0.01 * r.repeat
        curve = [0.4 + 0.1 * e + offset - (0.25 + 0.02 * (r.repeat % 2) if r.strategy.name == "frozen" else 0.0)
                 for e in range(1, r.num_epochs + 1)]
        fold = results_folder(s, r)
        fold.mkdir(parents=True, exist_ok=True)
        torch.save({"logging": {"ema_fg_dice": curve}, "current_epoch": r.num_epochs}, fold / "checkpoint_final.pth")
    return s, runs


def test_replay_drops_the_worse_strategy_at_the_first_rung_and_counts_the_epochs(study):
    s, runs = study
    for rule in ("paired", "halving"):
        result = replay(s, rule=rule)
        assert [row["n_train"] for row in result.rows] == [2, 4]
        for row in result.rows:
            assert row["dropped"] == {"frozen": 1}
            assert (row["winner"], row["winner_kept"], row["wrong"]) == ("scratch", True, [])
            # 2 strategies x 3 repeats x 4 epochs; frozen stops after 1 epoch in each of its 3 units
            assert (row["full"], row["spent"]) == (24, 24 - 3 * 3)
        assert "37.5 % of the training epochs saved" in result.text()


def test_replay_with_other_rungs_and_a_study_without_them(study):
    s, _ = study
    assert replay(s, rule="paired", rungs=[2]).rows[0]["dropped"] == {"frozen": 2}


def test_status_lines_show_the_recorded_decisions_with_evidence(study):
    s, runs = study
    units = {n: {unit_of(r): 0.5 - (0.2 if n == "frozen" else 0) + 0.01 * r.repeat
                 for r in runs if r.size_index == 0 and r.strategy.name == n} for n in ("scratch", "frozen")}
    verdicts = decide(units, baseline="scratch", rule="paired")
    write_json(s.output / RACING_FILE, {"rungs": [1, 2], "sizes": {"0": {"1": {
        "signals": units, "verdicts": [v.to_dict() for v in verdicts], "dropped": ["frozen"]}}}})
    text = "\n".join(racing_lines(s))
    assert "size index 0, rung 1: live scratch; dropped frozen" in text
    assert "frozen: worse than scratch: mean paired difference -0.2000 over 3 units" in text


def test_replay_leaves_out_nan_signals_and_refuses_rungs_past_the_schedule(study, tmp_path):
    """A run whose pseudo-Dice is NaN at a rung (no foreground in nnU-Net's validation patches: nnU-Net's EMA stays
    NaN) is left out of that rung's pairs, as `study run` leaves it out, instead of failing the replay; rungs at or
    after num_epochs, or not increasing, are refused with the epochs they resolve to."""
    import math

    from nnunet_transfer.errors import ConfigError

    s, runs = study
    nan_run = next(r for r in runs if r.strategy.name == "frozen" and r.size_index == 0 and r.repeat == 0)
    path = results_folder(s, nan_run) / "checkpoint_final.pth"
    curve = torch.load(path)["logging"]["ema_fg_dice"]
    torch.save({"logging": {"ema_fg_dice": [math.nan] + curve[1:]}, "current_epoch": 4}, path)
    result = replay(s, rule="paired")
    # size 0: frozen keeps 2 units at rung 1 (differences -0.27, -0.25: one-sided t-test p = 0.012 on 1 df)
    assert result.rows[0]["dropped"] == result.rows[1]["dropped"] == {"frozen": 1}
    assert [(r["winner"], r["winner_kept"]) for r in result.rows] == [("scratch", True)] * 2
    for rungs, epochs in (([4], [4]), ([2, 1], [2, 1]), ([0.9], [4])):
        with pytest.raises(ConfigError, match=re.escape(f"are epochs {epochs} of num_epochs 4")):
            replay(s, rule="paired", rungs=rungs)


def test_the_replay_racing_command_prints_the_replay(study, capsys):
    """`nnunet_transfer study replay-racing` through the command line (it failed to import its function before)."""
    from nnunet_transfer.cli.main import main

    s, _ = study
    assert main(["study", "replay-racing", str(s.path), "--rule", "halving", "--rungs", "1,2"]) == 0
    printed = capsys.readouterr().out
    assert printed == replay(s, rule="halving", rungs=[1, 2]).text() + "\n"
    assert "size 2: dropped frozen@1; full winner scratch kept; dropped wrongly none; epochs 15 of 24" in printed


def test_replay_judges_the_full_study_on_the_reports_test_dice_once_every_run_is_evaluated(study):
    """The full study's winner is the report's (mean test Dice over cases, then labels) when `study report` has
    evaluated every run; here the test Dice ranks the strategies against their pseudo-Dice, so the replay, which
    drops frozen on its pseudo-Dice, drops the full study's winner — and says so."""
    from nnunet_transfer.study.state import EVAL_MARKER, run_dir

    s, runs = study
    assert replay(s, rule="paired").rows[0]["winner"] == "scratch"  # not evaluated: judged on the EMA
    for r in runs[:-1]:
        write_ev(s, r, 0.9 if r.strategy.name == "frozen" else 0.3 + 0.01 * r.repeat)
    assert "final EMA pseudo-Dice (not every run is evaluated" in replay(s, rule="paired").text()
    write_ev(s, runs[-1], 0.9 if runs[-1].strategy.name == "frozen" else 0.3)
    result = replay(s, rule="paired")
    assert "judged on the mean test Dice of `study report`'s evaluations" in result.text()
    for row in result.rows:
        assert (row["winner"], row["winner_kept"], row["dropped"]) == ("frozen", False, {"frozen": 1})
    # an evaluation made for other settings is not current: back to the EMA
    (run_dir(s, runs[0]) / "eval" / EVAL_MARKER).write_text('"stale"')
    assert replay(s, rule="paired").rows[0]["winner"] == "scratch"


def write_ev(s, r, dice: float) -> None:
    from nnunet_transfer.study.state import EVAL_MARKER, evaluation_key, run_dir

    ev = run_dir(s, r) / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    write_json(ev / "summary.json", {"mean_over_labels": {"dice": dice}})
    write_json(ev / EVAL_MARKER, evaluation_key(s, r))
