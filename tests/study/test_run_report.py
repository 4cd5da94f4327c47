"""`study run` orchestration (nnU-Net's programs replaced by fakes: failures, skips, retries) and `study report` on
finished runs: tables equal evaluate's numbers, pooling over repeats, each case evaluated once."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_transfer.pipeline as pipeline
from nnunet_transfer.errors import TransferError
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.report import report_study
from nnunet_transfer.study.runner import run_study
from nnunet_transfer.study.state import read_state, results_folder, run_dir
from nnunet_transfer.study.status import study_status

from study.fake_tree import DEFAULT_STUDY, fake_log, finish_run, make_tree, set_env


@pytest.fixture
def tree(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    return tmp_path


class FakePrograms:
    """nnUNetv2_train / nnUNetv2_predict as the study calls them; trainers in ``fail`` exit non-zero."""

    def __init__(self, root: Path, fail=()):
        self.root, self.fail, self.calls = root, set(fail), []

    def __call__(self, args, *, env, log, what, extra_env=None, tail=25):
        args = [str(a) for a in args]
        self.calls.append(args)
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text("$ " + " ".join(args) + "\n")
        if args[0] == "nnUNetv2_train":
            dataset, conf, fold, trainer = args[1], args[2], args[3], args[args.index("-tr") + 1]
            if trainer in self.fail:
                raise TransferError(f"{what} failed (exit 1); see {log}. Last lines:\n    boom")
            folder = self.root / "results" / dataset / f"{trainer}__nnUNetPlans__{conf}" / f"fold_{fold}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"logging": fake_log(4), "trainer_name": trainer}, folder / "checkpoint_final.pth")
            (folder / "training_log_1.txt").write_text("".join(f"t: Epoch {e}\nt: Epoch time: 1 s\n" for e in range(4)))
        else:
            images, out = Path(args[args.index("-i") + 1]), Path(args[args.index("-o") + 1])
            out.mkdir(parents=True, exist_ok=True)
            for label in (images.parent / "labelsTs").iterdir():
                shutil.copy(label, out / label.name)
        return 0.0


def test_a_failed_run_is_recorded_and_the_others_go_on(tree, monkeypatch):
    path = make_tree(tree)
    fake = FakePrograms(tree, fail={"nnUNetTrainerFrozenEncoder"})
    monkeypatch.setattr(pipeline, "run_step", fake)
    summary = run_study(path, say=lambda s: None)
    assert [(o.run, o.result) for o in summary.outcomes] == [
        ("scratch__n2__r0__f0", "done"), ("scratch__nall__r0__f0", "done"),
        ("frozen__n2__r0__f0", "failed"), ("frozen__nall__r0__f0", "failed")]
    plan = prepare(path, write=False, check_weights=False)
    failed = next(r for r in plan.runs if r.id == "frozen__n2__r0__f0")
    state = read_state(plan.study, failed)
    assert state["state"] == "failed" and "boom" in state["error"]
    assert state["log"] == str(run_dir(plan.study, failed) / "train_1.log") and Path(state["log"]).is_file()
    status = {p.run.id: p for p in study_status(path).progress}
    assert status["frozen__n2__r0__f0"].state == "failed" and "failed (exit 1)" in status["frozen__n2__r0__f0"].detail
    assert status["scratch__n2__r0__f0"].state == "done" and status["scratch__n2__r0__f0"].epochs == 4
    # fresh training from the start: no --c, no weights
    train = [c for c in fake.calls if c[0] == "nnUNetv2_train"]
    assert all("--c" not in c and "-pretrained_weights" not in c for c in train)
    # a second run trains only the failed runs again (attempt 2), never the done ones
    fake.calls.clear()
    fake.fail.clear()
    summary = run_study(path, say=lambda s: None)
    assert [(o.run, o.result) for o in summary.outcomes] == [
        ("scratch__n2__r0__f0", "skipped"), ("scratch__nall__r0__f0", "skipped"),
        ("frozen__n2__r0__f0", "done"), ("frozen__nall__r0__f0", "done")]
    assert sorted(c[2] for c in fake.calls if c[0] == "nnUNetv2_train") == ["fake_frozen", "fake_frozen"]
    assert read_state(plan.study, failed)["attempt"] == 2 and (run_dir(plan.study, failed) / "train_2.log").is_file()
    # and a third does nothing at all
    fake.calls.clear()
    assert all(o.result == "skipped" for o in run_study(path, say=lambda s: None).outcomes) and fake.calls == []


def test_interrupted_run_continues_with_c_and_trained_run_is_only_predicted(tree, monkeypatch):
    path = make_tree(tree)
    plan = prepare(path)
    interrupted, trained = plan.runs[0], plan.runs[1]
    fold = results_folder(plan.study, interrupted)
    fold.mkdir(parents=True)
    torch.save({"logging": fake_log(2)}, fold / "checkpoint_latest.pth")
    from nnunet_transfer.study.state import RUN_FILE, update_state, write_json

    for r in (interrupted, trained):
        write_json(run_dir(plan.study, r) / RUN_FILE, plan.definitions[r.id])
    update_state(plan.study, interrupted, state="running", attempt=1)  # the process died: the lock is free
    fold2 = results_folder(plan.study, trained)
    fold2.mkdir(parents=True)
    torch.save({"logging": fake_log(4)}, fold2 / "checkpoint_final.pth")
    status = {p.run.id: p.state for p in study_status(path).progress}
    assert status[interrupted.id] == "interrupted" and status[trained.id] == "trained"
    fake = FakePrograms(tree)
    monkeypatch.setattr(pipeline, "run_step", fake)
    run_study(path, only="scratch", say=lambda s: None)
    train = [c for c in fake.calls if c[0] == "nnUNetv2_train"]
    assert len(train) == 1 and train[0][2:4] == ["fake_scratch", str(interrupted.nnunet_fold)] and "--c" in train[0]
    assert "-pretrained_weights" not in train[0]
    assert sum(c[0] == "nnUNetv2_predict" for c in fake.calls) == 2  # the trained run: predicted, not trained


def test_a_run_another_live_process_holds_is_skipped_named_and_not_failed(tree, monkeypatch, capsys):
    import os
    import signal
    import socket

    from nnunet_transfer.cli.main import main
    from nnunet_transfer.study.runner import execute_run

    from study.test_lock import holder_process, wait_until_held

    path = make_tree(tree)
    plan = prepare(path)
    held = plan.runs[0]
    fake = FakePrograms(tree)
    monkeypatch.setattr(pipeline, "run_step", fake)
    proc = holder_process(run_dir(plan.study, held))  # another `study run`, as far as the lock can tell
    try:
        wait_until_held(proc)
        who = f"held by pid {proc.pid} on host {socket.gethostname()} since "
        status = {p.run.id: p for p in study_status(path).progress}
        assert status[held.id].state == "running" and status[held.id].detail.startswith(who)
        assert study_status(path).text().count(who) == 1
        assert main(["study", "run", str(path)]) == 0  # nothing it did failed
        out = capsys.readouterr().out
        assert f"skipped {held.id}: {who}" in out
        assert f"4 runs: 3 done, 1 held by another process\n  held: {held.id}: {who}" in out and "failed" not in out
        trained = {(c[2], c[3]) for c in fake.calls if c[0] == "nnUNetv2_train"}
        assert len(trained) == 3 and (held.configuration, str(held.nnunet_fold)) not in trained
        # taken between the check and the start: execute_run says the same
        said = []
        outcome = execute_run(plan.study, held, definition_=plan.definitions[held.id], say=said.append)
        assert (outcome.result, said) == ("busy", [f"skipped {held.id}: {outcome.message}"])
        assert outcome.message.startswith(who)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # its holder killed: the next `study run` takes the lock over and trains the run, once
    said = []
    summary = run_study(path, say=said.append)
    assert [(o.run, o.result) for o in summary.outcomes if o.result != "skipped"] == [(held.id, "done")]
    assert f"{held.id}: taking over the lock of pid {proc.pid} on host {socket.gethostname()}" in "\n".join(said)
    assert "its process is gone" in "\n".join(said)
    assert [c[2:4] for c in fake.calls if c[0] == "nnUNetv2_train"].count(
        [held.configuration, str(held.nnunet_fold)]) == 1


def finished_study(tree, text=DEFAULT_STUDY, n_cases=8):
    path = make_tree(tree, n_cases=n_cases, study_text=text)
    plan = prepare(path)
    for i, r in enumerate(plan.runs):
        finish_run(plan.study, r, plan.definitions[r.id], quality=0.95 if r.strategy.name == "scratch" else 0.6, seed=i)
    return path, plan


def per_case(folder: Path) -> list[dict]:
    with open(folder / "per_case.csv") as f:
        return list(csv.DictReader(f))


def test_report_numbers_equal_evaluate_and_each_case_is_evaluated_once(tree, monkeypatch):
    import nnunet_transfer.experiments.evaluate as ev

    path, plan = finished_study(tree)
    calls = []
    real = ev._evaluate_case
    monkeypatch.setattr(ev, "_evaluate_case", lambda task: calls.append(task.case) or real(task))
    res = report_study(path, tree / "rep", say=lambda s: None)
    assert len(calls) == len(plan.runs) * 3 and len(res.evaluated) == len(plan.runs)  # runs x test cases, once
    assert res.compared == {"2": ["scratch", "frozen"], "all": ["scratch", "frozen"]} and res.missing == {"2": [], "all": []}
    rows = {(r["strategy"], r["metric"], r["label"]): r for r in csv.DictReader(open(tree / "rep/compare/n2/comparison.csv"))}
    runs_csv = {r["run"]: r for r in csv.DictReader(open(tree / "rep/runs.csv"))}
    md = (tree / "rep/report.md").read_text()
    for r in plan.runs:
        summary = json.loads((run_dir(plan.study, r) / "eval/summary.json").read_text())
        for lab in (1, 2):
            mean = summary["per_label"][str(lab)]["dice"]["mean"]
            assert float(runs_csv[r.id][f"dice_{lab}"]) == mean
            if r.size == 2:  # one repeat: the pooled table is the run's own
                row = rows[(r.strategy.name, "dice", str(lab))]
                assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
                assert f"{mean:.3f} ± {float(row['sd']):.3f}" in md
    for name in ("report.md", "dice_vs_ntrain.png", "runs.csv", "compare/n2/comparison.md", "compare/nall/tukey.csv",
                 "compare/n2/learning_curves.png", "compare/nall/boxplot_label1.png"):
        assert (tree / "rep" / name).is_file(), name
    assert "## n_train 2" in md and "## Dice across training-set sizes — label 1 (organ)" in md
    # cached: a second report evaluates nothing; another NSD tolerance re-evaluates every run (no retraining)
    calls.clear()
    assert report_study(path, tree / "rep", say=lambda s: None).evaluated == [] and calls == []
    path.write_text(DEFAULT_STUDY.replace("resamples = 200", "resamples = 200\nnsd_tolerance = 2.0"))
    assert len(report_study(path, tree / "rep", say=lambda s: None).evaluated) == len(plan.runs)


def test_scoring_correction_reaches_compare_and_the_report(tree):
    path, plan = finished_study(tree, DEFAULT_STUDY.replace("resamples = 200", 'resamples = 200\ncorrection = "none"'))
    report_study(path, tree / "rep", plots=False, say=lambda s: None)
    doc = json.loads((tree / "rep/compare/n2/comparison.json").read_text())
    assert doc["correction"] == "none"
    tested = [r for r in doc["rows"] if r["p_ttest"] is not None]
    assert tested and all(r["p_adjusted"] == r["p_ttest"] for r in tested)  # the raw p marks significance
    md = (tree / "rep/report.md").read_text()
    assert "uncorrected, as the papers test: [scoring] correction = \"none\"" in md and "Holm-corrected" not in md


def test_repeats_are_pooled_as_the_mean_per_case(tree):
    path, plan = finished_study(tree, DEFAULT_STUDY.replace("val = 1", "val = 1\nrepeats = 2"), n_cases=9)
    report_study(path, tree / "rep", plots=False, say=lambda s: None)
    runs = [r for r in plan.runs if r.strategy.name == "frozen" and r.size == "all"]
    assert len(runs) == 2
    own = [{(x["case"], x["label"]): float(x["dice"]) for x in per_case(run_dir(plan.study, r) / "eval")} for r in runs]
    pooled = {(x["case"], x["label"]): (float(x["dice"]), int(x["n_runs"])) for x in per_case(tree / "rep/evaluations/nall/frozen")}
    assert pooled.keys() == own[0].keys()
    for k, (v, n) in pooled.items():
        assert n == 2 and v == pytest.approx(np.mean([own[0][k], own[1][k]]), abs=1e-12)


def test_report_leaves_out_unfinished_strategies_and_says_so(tree):
    path = make_tree(tree)
    plan = prepare(path)
    for i, r in enumerate(plan.runs):
        if r.id != "frozen__nall__r0__f0":
            finish_run(plan.study, r, plan.definitions[r.id], seed=i)
    res = report_study(path, tree / "rep", plots=False, say=lambda s: None)
    assert res.compared == {"2": ["scratch", "frozen"], "all": []} and res.missing == {"2": [], "all": ["frozen"]}
    md = (tree / "rep/report.md").read_text()
    assert "Not compared: fewer than two strategies are done. Not done: frozen." in md
    assert "Not done: frozen__nall__r0__f0 (pending)." in md


def test_sweep_plot(tree):
    ckpt = tree / "source.pth"
    torch.save({"network_weights": {}}, ckpt)
    text = DEFAULT_STUDY.replace("[splits]", f'[pretrained]\nsource = "{ckpt}"\n\n[splits]').replace(
        'baseline = "scratch"', 'baseline = "l2sp-0"') + (
        '\n[[strategy]]\nname = "l2sp"\ntrainer = "nnUNetTrainerL2SP_Sagie"\npretrained = true\n'
        'sweep = { l2sp_alpha = [0, 8, inf] }\n')
    path = make_tree(tree, study_text=text)
    plan = prepare(path, check_weights=False)  # the fake checkpoint is no network
    for i, r in enumerate(plan.runs):
        finish_run(plan.study, r, plan.definitions[r.id], seed=i)
    res = report_study(path, tree / "rep", say=lambda s: None)
    assert (tree / "rep/dice_vs_l2sp_alpha.png").is_file()
    assert res.compared["2"] == ["scratch", "frozen", "l2sp-0", "l2sp-8", "l2sp-inf"]
    assert "## The l2sp_alpha sweep (l2sp)" in (tree / "rep/report.md").read_text()


def test_cli_status_and_run_exit_codes(tree, monkeypatch, capsys):
    from nnunet_transfer.cli.main import main

    path = make_tree(tree)
    monkeypatch.setattr(pipeline, "run_step", FakePrograms(tree, fail={"nnUNetTrainerFrozenEncoder"}))
    assert main(["study", "run", str(path)]) == 1  # a failed run: exit 1 after the others ran
    out = capsys.readouterr().out
    assert "4 runs: 2 done, 2 failed" in out and "failed: frozen__n2__r0__f0: nnUNetv2_train of frozen__n2__r0__f0" in out
    assert main(["study", "status", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "state", "epoch", "elapsed", "job", "detail"]
    row = next(ln for ln in lines if ln.startswith("scratch__n2__r0__f0"))
    assert row.split()[1:3] == ["done", "4/4"]
    assert lines[-1] == "4 runs: 2 done, 2 failed"
    assert main(["study", "run", str(path), "--only", "nope"]) == 2
    assert "--only 'nope' matches none of the 4 runs" in capsys.readouterr().err


def test_predict_checkpoint_best_reaches_nnunetv2_predict_and_a_change_predicts_again(tree, monkeypatch):
    # [predict] checkpoint = "best": the study predicts with nnUNetv2_predict -chk checkpoint_best.pth, and a
    # file switched from final to best predicts its trained runs again (the marker names the file used)
    path = make_tree(tree)
    fake = FakePrograms(tree)
    monkeypatch.setattr(pipeline, "run_step", fake)
    run_study(path, only="scratch", say=lambda s: None)
    first = [c for c in fake.calls if c[0] == "nnUNetv2_predict"]
    assert first and all("-chk" not in c for c in first)
    path.write_text(path.read_text() + '\n[predict]\ncheckpoint = "best"\n')
    fake.calls.clear()
    run_study(path, only="scratch", say=lambda s: None)
    again = [c for c in fake.calls if c[0] == "nnUNetv2_predict"]
    assert len(again) == len(first) and not any(c[0] == "nnUNetv2_train" for c in fake.calls)
    assert all(c[c.index("-chk") + 1] == "checkpoint_best.pth" for c in again)


def test_report_counts_not_converged_runs_per_strategy_and_size(tree):
    from nnunet_transfer.study.state import write_json

    path = make_tree(tree)
    plan = prepare(path)
    for i, r in enumerate(plan.runs):
        finish_run(plan.study, r, plan.definitions[r.id], seed=i)
        # what an early-stopping trainer records in transfer_config.json: here only frozen at n_train 2 failed
        failed = r.strategy.name == "frozen" and r.size != "all"
        write_json(results_folder(plan.study, r) / "transfer_config.json",
                   {"stopping": {"monitor": "val_loss", "converged": not failed, "stopped_epoch": None if failed else 3}})
    report_study(path, tree / "rep", plots=False, say=lambda s: None)
    md = (tree / "rep/report.md").read_text()
    assert "## Convergence (early stopping)" in md
    assert "| scratch | 0 / 1 | 0 / 1 |" in md and "| frozen | 1 / 1 | 0 / 1 |" in md


def test_analysis_of_runs_without_snapshots_is_one_line_each_not_a_crash(tree):
    """[analysis] declared after the runs trained: the report says per run how to get snapshots, and per size why
    groups and reuse have nothing to compare; nothing is analysed, nothing crashes."""
    ckpt = tree / "source.pth"
    torch.save({"network_weights": {}}, ckpt)
    text = DEFAULT_STUDY.replace("[splits]", f'[pretrained]\nsource = "{ckpt}"\n\n[splits]').replace(
        'trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFinetune"\npretrained = "source"')
    path = make_tree(tree, study_text=text)
    plan = prepare(path, check_weights=False)  # the fake checkpoint is no network
    for i, r in enumerate(plan.runs):
        finish_run(plan.study, r, plan.definitions[r.id], seed=i)
    path.write_text(text + "\n[analysis]\nsnapshot_every = 2\n")  # snapshot_every may change after runs started
    report_study(path, tree / "rep", plots=False, say=lambda s: None)
    md = (tree / "rep/report.md").read_text()
    assert "## Analysis of the runs (Karimi et al.)" in md
    for r in plan.runs:
        fold = results_folder(plan.study, r)
        assert (f"- Run {r.id} has no snapshots ({fold}/snapshots): it was trained before [analysis] set "
                f"snapshot_every, so its evolution, reuse, weights cannot be computed. Fix: delete {fold} and "
                f"{run_dir(plan.study, r)}, then `nnunet_transfer study run {path.resolve()} --only {r.id}` trains it "
                f"again with snapshots.") in md
    for size in ("2", "all"):
        assert (f"- Groups at n_train {size}: 1 R.I. and 1 T.L. finished run(s); within-group similarity needs at "
                f"least 2 per group: set [splits] repeats >= 2") in md
        assert (f"- Feature reuse at n_train {size}: 0 R.I. and 0 T.L. finished run(s) with snapshots; it needs at "
                f"least one of each.") in md
    assert json.loads((tree / "rep/report.json").read_text())["analysis"] == []
    assert not (tree / "rep/analysis").exists()
