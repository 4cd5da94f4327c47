"""Racing ([racing] in the study file) end to end through the stock programs: ``nnunet_transfer study run`` ->
``nnUNetv2_train`` (paused at the rungs, continued with ``--c``) / ``nnUNetv2_predict``, on generated data.

One racing study, one size, two repeats, three strategies, 3 epochs x 2 iterations, rungs after epochs 1 and 2,
rule ``halving`` with eta 3 (keep the best one by mean EMA pseudo-Dice, and the baseline): ``finetune`` (from the
session's source model; its pseudo-Dice after one epoch is several times the others'), ``scratch`` (the baseline)
and ``still`` (random initialisation with initial_lr 1e-6: it cannot learn). Halving is a rank, not a test: given
the signals nothing about it is left to chance. ``study run`` is killed (``kill -9`` of its process group) right
after it recorded the first rung, and run again as SLURM jobs (submitit's LocalExecutor: one job array for rung 2,
then one for the survivors' last epoch); beside it a study of the same two surviving strategies without
[racing] (same splits, seeds, settings) trains in full, and the racing study's report must give its numbers.

Dataset 916: dataset 912's cases and preprocessed data under another id (tests/conftest.py's ``alias_target``, no
preprocessing): two repeats write their own splits file, which would change the other studies' folds on 912.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.pipeline import executable
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.state import file_stamp, paused_after, read_json, results_folder, run_dir, sha256
from nnunet_transfer.study.status import study_status

from conftest import FIXED, load_checkpoint

pytestmark = pytest.mark.slow

RACING_ID = 916
STUDY = """
[study]
name = "{name}"
target = 916
configuration = "tiny"
baseline = "scratch"
device = "cpu"

[pretrained]
source = "$nnUNet_results/Dataset901_TransferSource/nnUNetTrainerTransferBase__nnUNetPlans__tiny/fold_0"

[splits]
n_train = [4]
test = 2
val = 1
repeats = 2
seed = 0

[settings]
seed = 0
num_epochs = 3
num_iterations_per_epoch = 2
num_val_iterations_per_epoch = 1
final_validation = false

[scoring]
metrics = ["dice"]
resamples = 100

[predict]
disable_tta = true
processes = 0

[environment]
nnUNet_n_proc_DA = "0"
{racing}
[[strategy]]
name = "scratch"
trainer = "nnUNetTrainerTransferBase"

[[strategy]]
name = "finetune"
trainer = "nnUNetTrainerFinetune"
pretrained = "source"
{still}"""
RACING = """
[racing]
rungs = [1, 2]
rule = "halving"
eta = 3
"""
STILL = """
[[strategy]]
name = "still"
trainer = "nnUNetTrainerTransferBase"
title = "random initialisation that cannot learn (initial_lr 1e-6)"
settings = { initial_lr = 1e-6 }
"""
SURVIVORS, DROPPED = ("scratch", "finetune"), "still"


def _starts(fold: Path) -> int:
    """nnUNetv2_train processes that trained into the fold: each start prints its split once."""
    return sum(p.read_text().count("This split has ") for p in fold.glob("training_log_*.txt"))


def _snapshot(study, runs) -> dict:
    """What every run of the racing study has on disk (taken while ``study run`` is frozen)."""
    out = {}
    for r in runs:
        fold = results_folder(study, r)
        latest = fold / "checkpoint_latest.pth"
        out[r.id] = {"logs": {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in fold.glob("training_log_*.txt")},
                     "starts": _starts(fold), "paused": paused_after(fold),
                     "final": (fold / "checkpoint_final.pth").exists(),
                     "latest": (file_stamp(latest), sha256(latest)) if latest.is_file() else None,
                     "epoch0": (load_checkpoint(latest)["logging"]["epoch_start_timestamps"][0]
                                if latest.is_file() else None)}
    return out


def _safe_to_kill(study, runs, pid: int) -> bool:
    """No trainer of ``study run`` (frozen) can be writing a checkpoint: the run it holds, if any, has not ended an
    epoch in its current attempt (nnU-Net's checkpoints are written in place, not atomically; this test is about
    rungs, not about torn files)."""
    for r in runs:
        holder = read_json(run_dir(study, r) / ".lock.json") or {}
        if holder.get("pid") != pid:
            continue
        logs = list(results_folder(study, r).glob("training_log_*.txt"))  # named by the second, not zero-padded
        return not logs or "Epoch time" not in max(logs, key=lambda p: p.stat().st_mtime_ns).read_text()
    return True


def race(ws, folder: Path, tag: str = "", full_study: bool = True) -> dict:
    """The module's studies in FOLDER (study names suffixed with TAG): the racing study's `study run` killed after
    rung 1 and run again, the full study's beside it, both reported; the facts the tests check."""
    path, full = folder / "racing.toml", folder / "full.toml"
    path.write_text(STUDY.format(name=f"racing_smoke{tag}", racing=RACING, still=STILL))
    full.write_text(STUDY.format(name=f"racing_full{tag}", racing="", still=""))
    # both studies planned here, one after the other: the two `study run` below then find their configurations and
    # the (identical) splits written and write nothing shared while they run side by side
    plan = prepare(path)
    full_plan = prepare(full) if full_study else None
    study, runs = plan.study, plan.runs
    assert len(runs) == 6
    starts = (("racing", path), ("full", full)) if full_study else (("racing", path),)
    logs = {k: open(folder / f"{k}.log", "w") for k, _ in starts}
    procs = {k: subprocess.Popen([executable("nnunet_transfer"), "study", "run", str(p)], env=ws.env,
                                 stdout=logs[k], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
             for k, p in starts}
    proc = procs["racing"]
    decisions = study.output / "racing.json"
    facts = None
    deadline = time.monotonic() + 1800  # a guard against a hang, not a measurement
    try:
        while facts is None and proc.poll() is None and time.monotonic() < deadline:
            if decisions.is_file():  # written atomically, once rung 1 is decided
                os.killpg(proc.pid, signal.SIGSTOP)  # freeze study run and its trainer, then look
                if _safe_to_kill(study, runs, proc.pid):
                    facts = {"decisions": json.loads(decisions.read_text()), "at_kill": _snapshot(study, runs)}
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        if proc.poll() is None and facts is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if facts is None and "full" in procs:
            os.killpg(procs["full"].pid, signal.SIGKILL)
            procs["full"].wait()
    assert facts is not None, f"study run ended before it could be killed after rung 1: {folder / 'racing.log'}"
    assert proc.returncode == -signal.SIGKILL
    facts["status_after_kill"] = {p.run.id: p for p in study_status(path).progress}
    # a new `study run` takes it from there (here, while the full study may still be training beside it): as SLURM
    # jobs through submitit's LocalExecutor, one job array per rung (rung 2), then one for the survivors' ends
    assert main(["study", "run", str(path), "--executor", "slurm", "--cluster", "local", "--wait"]) == 0
    if full_study:
        assert procs["full"].wait(timeout=max(1.0, deadline - time.monotonic())) == 0, (folder / "full.log").read_text()
    for f in logs.values():
        f.close()
    facts["after"] = _snapshot(study, runs)
    facts["decisions_after"] = json.loads(decisions.read_text())
    facts["status"] = study_status(path)
    for p, out in ((path, "report"), (full, "full_report"))[:2 if full_study else 1]:
        assert main(["study", "report", str(p), "-o", str(folder / out)]) == 0
    return {**facts, "path": path, "study": study, "runs": runs, "full": full_plan, "folder": folder}


@pytest.fixture(scope="module")
def racing(smoke_data, tmp_path_factory):
    ws = smoke_data
    if RACING_ID not in ws.extra_datasets:
        ws.alias_target(RACING_ID, "RacingSmoke", of=FIXED)
    return race(ws, tmp_path_factory.mktemp("racing"))


def test_the_worse_strategy_is_dropped_at_the_first_rung_baseline_and_winner_survive(racing):
    d = racing["decisions_after"]
    assert (d["rule"], d["rungs"], d["eta"]) == ("halving", [1, 2], 3)
    rung1, rung2 = d["sizes"]["0"]["1"], d["sizes"]["0"]["2"]
    assert rung1["dropped"] == [DROPPED] and rung2["dropped"] == []
    units = {"r0f0", "r1f0"}
    assert {s: set(v) for s, v in rung1["signals"].items()} == {s: units for s in (*SURVIVORS, DROPPED)}
    assert set(rung2["signals"]) == set(SURVIVORS)  # the dropped strategy was not trained to rung 2
    # the signal is nnU-Net's EMA pseudo-Dice after the rung's epoch, as logged in each run's checkpoint
    for r in racing["runs"]:
        logged = load_checkpoint(results_folder(racing["study"], r) / (
            "checkpoint_latest.pth" if r.strategy.name == DROPPED else "checkpoint_final.pth"))["logging"]
        assert rung1["signals"][r.strategy.name][f"r{r.repeat}f{r.fold}"] == float(logged["ema_fg_dice"][0])
        if r.strategy.name != DROPPED:
            assert rung2["signals"][r.strategy.name][f"r{r.repeat}f{r.fold}"] == float(logged["ema_fg_dice"][1])
    verdicts = {v["strategy"]: v for v in rung1["verdicts"]}
    mean = {s: sum(v.values()) / 2 for s, v in rung1["signals"].items()}
    assert verdicts["finetune"]["rank"] == 1 and mean["finetune"] > 2 * max(mean["scratch"], mean[DROPPED])
    assert verdicts[DROPPED]["dropped"] and "outside the best 1 (1/eta = 1/3)" in verdicts[DROPPED]["reason"]
    assert not verdicts["scratch"]["dropped"]  # the baseline, whatever its rank
    assert {v["strategy"]: v["dropped"] for v in rung2["verdicts"]} == {"scratch": False, "finetune": False}


def test_status_shows_the_rungs_and_the_dropped_runs_with_the_evidence(racing):
    status = racing["status"]
    states = {p.run.id: (p.run.strategy.name, p.state, p.detail) for p in status.progress}
    for rid, (name, state, detail) in states.items():
        if name == DROPPED:
            assert (state, detail) == ("dropped", "dropped by racing at epoch 1"), rid
        else:
            assert state == "done", rid
    text = status.text()
    assert "racing: rule halving, signal ema, rungs [1, 2] of 3 epochs, eta 3" in text
    assert "size index 0, rung 1: live scratch, finetune; dropped still" in text
    assert "size index 0, rung 2: live scratch, finetune; dropped none" in text
    reason = next(v["reason"] for v in racing["decisions_after"]["sizes"]["0"]["1"]["verdicts"]
                  if v["strategy"] == DROPPED)
    assert f"    still: {reason}" in text
    # right after the kill: the dropped runs were shown dropped already, nothing was done
    after_kill = racing["status_after_kill"]
    assert {p.state for p in after_kill.values() if p.run.strategy.name == DROPPED} == {"dropped"}
    assert not any(p.state == "done" for p in after_kill.values())


def test_killed_after_the_first_rung_the_rerun_keeps_the_decision_and_retrains_no_finished_rung(racing):
    study, before, after = racing["study"], racing["decisions"], racing["decisions_after"]
    assert set(before["sizes"]["0"]) == {"1"}  # killed between the rungs
    assert after["sizes"]["0"]["1"] == before["sizes"]["0"]["1"]  # never decided again
    at_kill, now = racing["at_kill"], racing["after"]
    assert all(f["latest"] is not None and f["epoch0"] for f in at_kill.values())  # every run had reached rung 1
    for r in racing["runs"]:
        k, n = at_kill[r.id], now[r.id]
        for name, stamp in k["logs"].items():  # the attempts before the kill: their logs untouched
            assert n["logs"][name] == stamp, (r.id, name)
        if r.strategy.name == DROPPED:  # paused at rung 1 and never trained again: the same files
            assert n == k and k["paused"] == 1 and not k["final"] and k["starts"] == 1, r.id
            continue
        # two more starts: to rung 2 and to the end, each with --c; never epoch 0 again
        assert n["final"] and n["starts"] == k["starts"] + 2, (r.id, k, n)
        final = load_checkpoint(results_folder(study, r) / "checkpoint_final.pth")
        assert final["current_epoch"] == 3 and len(final["logging"]["epoch_start_timestamps"]) == 3
        assert final["logging"]["epoch_start_timestamps"][0] == k["epoch0"], r.id
        attempts = sorted(run_dir(study, r).glob("train_*.log"))
        assert [a.read_text().splitlines()[0].count(" --c") for a in attempts] == [0] + [1] * (len(attempts) - 1)


# The workspace trains with NNUNET_TRANSFER_CPU_THREADS=1 (one torch thread, tests/conftest.py): runs are then
# bit-reproducible under any load (with nnU-Net's two threads on a loaded machine two runs of one seed drift apart
# from the last float32 bit on; measured here before: up to 6.9e-6), so the survivors must equal their full-study
# twins exactly.


def test_survivors_equal_the_same_runs_trained_in_full_without_racing(racing):
    """Paused at both rungs and continued (and one of them killed on the way): the weights and test Dice of the full
    study's runs of the same strategy, split and seed."""
    study, full = racing["study"], racing["full"]
    full_runs = {(r.strategy.name, r.repeat, r.fold): r for r in full.runs}
    compared = 0
    for r in racing["runs"]:
        if r.strategy.name == DROPPED:
            continue
        twin = full_runs[(r.strategy.name, r.repeat, r.fold)]
        assert (twin.train, twin.val, twin.test) == (r.train, r.val, r.test)
        a = load_checkpoint(results_folder(study, r) / "checkpoint_final.pth")
        b = load_checkpoint(results_folder(full.study, twin) / "checkpoint_final.pth")
        assert a["network_weights"].keys() == b["network_weights"].keys()
        for key, w in b["network_weights"].items():
            assert torch.equal(a["network_weights"][key], w), (r.id, key)  # bit for bit
        for key in ("train_losses", "val_losses", "lrs", "ema_fg_dice"):
            assert a["logging"][key] == b["logging"][key], (r.id, key)
        mine = json.loads((run_dir(study, r) / "eval" / "summary.json").read_text())["per_label"]
        theirs = json.loads((run_dir(full.study, twin) / "eval" / "summary.json").read_text())["per_label"]
        assert mine.keys() == theirs.keys()
        for lab in mine:
            assert mine[lab]["dice"]["mean"] == theirs[lab]["dice"]["mean"], (r.id, lab)
        compared += 1
    assert compared == 4


def _dice_tables(md: str) -> dict[str, list[str]]:
    """report.md's 'Dice across training-set sizes' tables: {title: [row lines]}."""
    out = {}
    for block in md.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        if title.startswith("Dice across training-set sizes"):
            out[title] = [ln for ln in body.splitlines() if ln.startswith("| ")]
    return out


def test_the_report_says_what_racing_decided_and_cost_and_compares_the_survivors_as_the_full_study(racing):
    folder, study = racing["folder"], racing["study"]
    md, full_md = (folder / "report" / "report.md").read_text(), (folder / "full_report" / "report.md").read_text()
    # epochs spent, counted from the checkpoints: survivors 3 each, the dropped runs stopped at rung 1
    spent = sum(load_checkpoint(results_folder(study, r) / (
        "checkpoint_latest.pth" if r.strategy.name == DROPPED else "checkpoint_final.pth"))["current_epoch"]
        for r in racing["runs"])
    assert spent == 4 * 3 + 2 * 1 == 14
    assert (f"Training epochs: **{spent}** of the full study's {6 * 3} ({100 * (1 - spent / 18):.1f} % saved)."
            in md)
    reason = next(v["reason"] for v in racing["decisions_after"]["sizes"]["0"]["1"]["verdicts"]
                  if v["strategy"] == DROPPED)
    assert f"| 4 | still | 1 | {reason} |" in md
    assert "Dropped by racing at this size (see Racing): still." in md and "Not done" not in md
    # the final tables: the survivors' rows are the full study's, number for number; the dropped one has none
    mine, theirs = _dice_tables(md), _dice_tables(full_md)
    assert mine.keys() == theirs.keys() and mine  # one per label
    for title in mine:
        header, rows = mine[title][:1], mine[title][1:]
        assert header == theirs[title][:1]
        assert rows == [*theirs[title][1:3], "| still | – |"], title
    rows = lambda rep: list(csv.DictReader(open(folder / rep / "compare" / "n4" / "comparison.csv")))  # noqa: E731
    mine, theirs = rows("report"), rows("full_report")
    assert len(mine) == len(theirs) and {r["strategy"] for r in mine} == set(SURVIVORS)
    for a, b in zip(mine, theirs):
        assert (a["strategy"], a["metric"], a["label"]) == (b["strategy"], b["metric"], b["label"])
        if a["metric"] == "dice":
            assert a["mean"] == b["mean"], a
    states = {r["run"]: r["state"] for r in csv.DictReader(open(folder / "report" / "runs.csv"))}
    assert {rid for rid, s in states.items() if s == "dropped"} == {r.id for r in racing["runs"]
                                                                      if r.strategy.name == DROPPED}
