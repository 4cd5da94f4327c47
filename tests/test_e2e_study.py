"""Studies end to end with the real nnU-Net programs: the three examples' smoke studies (examples/*/smoke.toml)
on generated data, `study run` killed in the middle of a run and resumed (locally, then the rest as SLURM
jobs through submitit's LocalExecutor — the same code path as on a cluster), two `study run` at once on one
study (each run trained once; one of them killed mid-training, the other or a rerun finishes), and every
template's file through `study plan`.

Datasets of their own (tests/conftest.py's smoke_data; 912: held-out test set, shared by the Karimi and Sagie smoke studies, whose splits
are identical; 913: the same images under another id for Amiri's cross-validation): a study writes its
dataset's splits_final.json, which would change every other test's folds on the shared target 902.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.pipeline import executable
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.state import read_state, results_folder, run_dir
from nnunet_transfer.study.status import study_status

# the studies' datasets (smoke_data) and Karimi's study (karimi) are session fixtures: tests/test_e2e_analyze.py
# analyses the Karimi study's runs too
from conftest import CV, FIXED, copy_example, load_checkpoint, trained_logs

pytestmark = pytest.mark.slow


def run_and_report(name: str, tmp_path_factory) -> Path:
    """Copy example NAME's smoke study, run it whole and write its report next to it."""
    path = copy_example(name, tmp_path_factory.mktemp(name))
    assert main(["study", "run", str(path)]) == 0
    assert main(["study", "report", str(path), "-o", str(path.parent / "report")]) == 0
    return path


# --------------------------------------------------------------------------- Karimi: kill, resume, SLURM path
def test_finished_runs_were_never_retrained(karimi):
    before = karimi["before"]
    assert before and karimi["killed"].id not in before  # at least one run finished before the kill
    for stage in ("after_local", "after_slurm", "after_all"):
        for rid, fact in before.items():
            assert karimi[stage][rid] == fact, (stage, rid)  # same bytes, same mtime, no new training log
    assert karimi["after_all"] == karimi["after_slurm"]
    for r in karimi["runs"]:
        assert len(trained_logs(results_folder(karimi["study"], r))) == (2 if r.id == karimi["killed"].id else 1)


def test_the_killed_run_continued_from_its_checkpoint(karimi):
    study, killed = karimi["study"], karimi["killed"]
    status = karimi["status_after_kill"][killed.id]
    assert status.state == "interrupted" and status.epochs == 1 and status.resume
    assert karimi["latest_epoch"] == 1
    folder = run_dir(study, killed)
    second = (folder / "train_2.log").read_text().splitlines()[0]
    assert "--c" in second and "-pretrained_weights" not in second
    fold = results_folder(study, killed)
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    epochs = [ln.split(": Epoch ")[1].strip() for ln in logs[-1].read_text().splitlines()
              if ": Epoch " in ln and "time" not in ln]
    assert epochs == ["1"]  # the continued attempt trained epoch 1 only
    final = load_checkpoint(fold / "checkpoint_final.pth")["logging"]
    assert len(final["epoch_end_timestamps"]) == 2
    assert final["epoch_start_timestamps"][0] == karimi["latest_log"]["epoch_start_timestamps"][0]  # epoch 0 kept
    state = read_state(study, killed)
    assert state["state"] == "done" and state["attempt"] == 2


def test_the_rest_ran_as_submitit_jobs(karimi):
    study = karimi["study"]
    assert karimi["pending"], "the kill left no run for the SLURM path"
    for r in karimi["pending"]:
        state = read_state(study, r)
        assert state["state"] == "done" and state["cluster"] == "local" and state["job_id"]
        job = state["job_id"]
        assert (study.output / "slurm" / job / f"{job}_0_result.pkl").is_file()
    status = {p.run.id: p for p in study_status(karimi["path"]).progress}
    assert all(p.state == "done" for p in status.values())
    assert {status[r.id].job_id for r in karimi["pending"]} == {read_state(study, r)["job_id"] for r in karimi["pending"]}


def test_report_tables_and_plots(karimi):
    import csv

    from matplotlib.image import imread

    study, rep = karimi["study"], karimi["report"]
    runs_csv = {r["run"]: r for r in csv.DictReader(open(rep / "runs.csv"))}
    for r in karimi["runs"]:
        summary = json.loads((run_dir(study, r) / "eval" / "summary.json").read_text())
        assert summary["run"] == str(results_folder(study, r).resolve())
        assert sorted(summary["cases"]) == sorted(r.test)
        for lab in (1, 2):
            mean = summary["per_label"][str(lab)]["dice"]["mean"]
            assert float(runs_csv[r.id][f"dice_{lab}"]) == mean
            rows = list(csv.DictReader(open(rep / "compare" / f"n{r.size}" / "comparison.csv")))
            row = next(x for x in rows if x["strategy"] == r.strategy.name and x["metric"] == "dice"
                       and x["label"] == str(lab))
            assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
    md = (rep / "report.md").read_text()
    assert "## n_train 2" in md and "## n_train all" in md and "| scratch (baseline) |" in md
    for png in ("dice_vs_ntrain.png", "compare/n2/learning_curves.png", "compare/nall/boxplot_label1.png"):
        assert imread(rep / png).shape[0] > 200, png


def _same_tables(mine: dict, theirs: dict, where: str) -> int:
    """Every cell equal (numbers to 1e-9, NaN to NaN); returns how many numbers were compared."""
    import math

    assert mine.keys() == theirs.keys(), where
    n = 0
    for name in mine:
        assert len(mine[name]) == len(theirs[name]) > 0, (where, name)
        for a, b in zip(mine[name], theirs[name]):
            assert a.keys() == b.keys(), (where, name)
            for k in a:
                if isinstance(a[k], float) and isinstance(b[k], float):
                    assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-9), \
                        (where, name, k, a[k], b[k])
                    n += 1
                else:
                    assert a[k] == b[k], (where, name, k)
    return n


def test_report_analysis_is_the_runs_own_and_equals_analyze_by_hand(karimi, tmp_path, monkeypatch):
    """[analysis] of smoke.toml: `study report` ran evolution, groups, feature reuse and filter change on the
    study's own runs and snapshots; `nnunet_transfer analyze` on the same fold folders with the same options gives
    the same numbers; a second report recomputes nothing."""
    study, rep, runs = karimi["study"], karimi["report"], karimi["runs"]
    a, root = study.analysis, karimi["report"] / "analysis" / study.name
    fold = {(r.strategy.name, str(r.size)): str(results_folder(study, r)) for r in runs}
    run_id = {(r.strategy.name, str(r.size)): r.id for r in runs}
    for r in runs:  # study plan gave every run snapshot_every = 1: epochs 0, 1, 2
        assert [e["epoch"] for e in json.loads((results_folder(study, r) / "snapshots" / "index.json")
                                               .read_text())] == [0, 1, 2], r.id
    md = (rep / "report.md").read_text()
    for title in ("### Evolution", "### Groups", "### Feature reuse", "### Weights (filter change)"):
        assert title in md, title
    assert sorted(p.name for p in (root / "evolution").iterdir()) == sorted(r.id for r in runs)
    assert sorted(p.name for p in (root / "weights").iterdir()) == sorted(r.id for r in runs)
    assert [p.name for p in (root / "groups").iterdir()] == ["all"]
    assert sorted(p.name for p in (root / "reuse").iterdir()) == ["n2", "nall"]
    common = ["-d", study.dataset, "-c", study.configuration, "--layers", a.layers, "--device", "cpu", "--no-progress"]
    data = ["--patches", str(a.patches), "--voxels-per-patch", str(a.voxels_per_patch), "--measure", a.measure]
    conv = ["--convergence-from", "validation"]
    ri = ",".join(fold[("scratch", s)] for s in ("2", "all"))
    tl = ",".join(fold[("finetune", s)] for s in ("2", "all"))
    by_hand = {f"evolution/{run_id[('finetune', 'all')]}": ["evolution", fold[("finetune", "all")], *conv, *data],
               "groups/all": ["groups", "--group", f"RI={ri}", "--group", f"TL={tl}", *data],
               "reuse/nall": ["reuse", "--ri", fold[("scratch", "all")], "--tl", fold[("finetune", "all")], *conv,
                              *data],
               f"weights/{run_id[('scratch', '2')]}": ["weights", fold[("scratch", "2")], *conv]}
    compared = 0
    # the command line in this process (the import of torch and nnU-Net saved 4 times), with no validation of the
    # report's reused: each convergence epoch is computed again from the snapshots
    from nnunet_transfer.analysis import session
    monkeypatch.setattr(session, "_VALIDATED", {})
    for key, args in by_hand.items():
        kind, out = key.split("/")[0], tmp_path / key.replace("/", "_")
        assert main(["analyze", *args, *common, "-o", str(out)]) == 0, key
        mine = json.loads((root / key / f"{kind}.json").read_text())
        theirs = json.loads((out / f"{kind}.json").read_text())
        compared += _same_tables(mine["tables"], theirs["tables"], key)
        assert mine["meta"]["patches_from"] == theirs["meta"]["patches_from"]
        if kind != "groups":  # Karimi's convergence epoch: the runs' validation Dice, not nnU-Net's EMA
            assert {c["source"] for c in mine["meta"]["convergence"]} == {"validation"}
            assert mine["meta"]["convergence"] == theirs["meta"]["convergence"]
        assert f"](analysis/{study.name}/{key}/{kind}.png)" in md  # report.md links its outputs
        assert (root / key / f"{kind}.png").is_file()
    assert compared > 50
    evo = json.loads((root / "evolution" / run_id[("finetune", "all")] / "evolution.json").read_text())
    assert evo["meta"]["patches_from"]["from"] == "test"  # the study's held-out test cases
    assert sorted(evo["meta"]["patches_from"]["cases"]) == sorted(runs[0].test)
    # a second report: the analyses' inputs are unchanged, nothing is computed again
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    assert main(["study", "report", str(karimi["path"]), "-o", str(rep)]) == 0
    states = [x["state"] for x in json.loads((rep / "report.json").read_text())["analysis"]]
    assert states == ["unchanged"] * (2 * len(runs) + 1 + 2)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.json")} == stamps


# --------------------------------------------------------------------------- Amiri: cross-validation, in 2-D
TINY2D = "tiny2d"  # examples/amiri/smoke.toml's configuration


@pytest.fixture(scope="module")
def source_2d(smoke_data):
    """Amiri's network is 2-D: nnU-Net's planned 2d configuration made tiny as ``tiny`` is in 3-D (features
    8-16-32, patch 32², batch 2), a source model trained in it for seconds (3 epochs of 5 iterations), and the
    Amiri target preprocessed for it. Only the Amiri smoke study uses it, so the rest of the suite pays nothing."""
    from conftest import QUICK_SETTINGS, SOURCE_ID

    ws = smoke_data
    tiny2d = {"features": "8,16,32", "patch": "32,32", "batch_size": 2}
    ws.run(["nnUNetv2_preprocess", "-d", SOURCE_ID, "-plans_name", "nnUNetPlans", "-c", "2d", "-np", 1],
           "preprocess source 2d")
    ws.configure(SOURCE_ID, "2d", TINY2D, {**QUICK_SETTINGS, "num_epochs": 3, "num_iterations_per_epoch": 5},
                 **tiny2d)
    ws.train(SOURCE_ID, TINY2D, "nnUNetTrainerTransferBase")
    ws.run(["nnUNetv2_preprocess", "-d", CV, "-plans_name", "nnUNetPlans", "-c", "2d", "-np", 1],
           "preprocess target 2d")
    ws.configure(CV, "2d", TINY2D, {}, **tiny2d)
    return ws


@pytest.fixture(scope="module")
def amiri(source_2d, tmp_path_factory):
    return run_and_report("amiri", tmp_path_factory)


def test_amiri_smoke_cross_validation_fold(amiri):
    plan = prepare(amiri, write=False)
    runs = plan.runs
    assert len(runs) == 4 and {r.fold for r in runs} == {0} and sorted({r.n_train for r in runs}) == [1, 6]
    splits = json.loads((Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{CV}_StudySmokeCV" /
                         "splits_final.json").read_text())
    assert len(splits) == 5 * 2  # every fold is in the splits file; only fold 0 was run
    for r in runs:
        assert not set(r.test) & (set(r.train) | set(r.val))
        log = "\n".join(p.read_text() for p in results_folder(plan.study, r).glob("training_log_*.txt"))
        assert f"This split has {r.n_train} training and {r.n_val} validation cases." in log
    frozen = json.loads((results_folder(plan.study, runs[-1]) / "transfer_config.json").read_text())
    assert frozen["trainer"] == "nnUNetTrainerPartialFT_exceptBottleneck" and frozen["drift"]["encoder"] > 0
    md = (amiri.parent / "report" / "report.md").read_text()
    assert "5-fold cross-validation" in md and "## n_train 6.25%" in md


def test_amiri_smoke_trains_2d_and_predicts_with_the_best_checkpoint(amiri, source_2d, tmp_path):
    """The paper's protocol in small through nnUNetv2_train / nnUNetv2_predict, in 2-D: every run trains with Adam
    and stops early on the validation loss; with [predict] checkpoint = "best" the study's predictions are
    ``nnUNetv2_predict -chk checkpoint_best.pth`` run by hand, voxel for voxel, and not checkpoint_final's (with
    seed 0 the transfer run on all the data stops after epoch 2 with its best at epoch 1, and the two differ)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from nnunet_transfer.study.table import test_folder

    plan = prepare(amiri, write=False)
    study = plan.study
    failed = {}  # (strategy, size) -> not converged, from each run's own stopping record
    for r in plan.runs:
        fold = results_folder(study, r)
        cfg = json.loads((fold / "transfer_config.json").read_text())
        assert (cfg["settings"]["optimizer"], cfg["stopping"]["monitor"]) == ("adam", "val_loss"), r.id
        failed[(r.strategy.name, r.n_train)] = int(not cfg["stopping"]["converged"])
        first_conv = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"][
            "encoder.stages.0.0.convs.0.conv.weight"]
        assert first_conv.shape == (8, 1, 3, 3), r.id  # Conv2d of the tiny 2d network
    assert set(failed.values()) == {0, 1}  # some runs stopped early within num_epochs = 3, some did not
    md = (amiri.parent / "report" / "report.md").read_text()
    for name in ("scratch", "exceptBottleneck"):  # the report counts the paper's failed runs per strategy and size
        assert f"| {name} | {failed[(name, 6)]} / 1 | {failed[(name, 1)]} / 1 |" in md
    run = next(r for r in plan.runs if r.strategy.name == "exceptBottleneck" and r.n_train == 6)
    fold = results_folder(study, run)
    best, final = load_checkpoint(fold / "checkpoint_best.pth"), load_checkpoint(fold / "checkpoint_final.pth")
    stopping = final["nnunet_transfer"]["stopping"]
    assert stopping["converged"] and stopping["stopped_epoch"] == final["current_epoch"]
    assert best["current_epoch"] == stopping["best_epoch"] < final["current_epoch"]
    w_best, w_final = best["network_weights"], final["network_weights"]
    assert any(not torch.equal(w_best[k], w_final[k]) for k in w_final)
    by_hand = {}
    for chk in ("checkpoint_best.pth", "checkpoint_final.pth"):
        by_hand[chk] = tmp_path / chk
        source_2d.run(["nnUNetv2_predict", "-i", test_folder(study, run.fold) / "imagesTs", "-o", by_hand[chk],
                       "-d", study.dataset, "-c", run.configuration, "-f", run.nnunet_fold, "-tr", run.trainer,
                       "-p", study.plans, "-chk", chk, "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta",
                       "--disable_progress_bar"], f"predict {run.id} -chk {chk} by hand")

    def seg(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    pred = run_dir(study, run) / "pred"
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in run.test)
    differ = 0
    for case in run.test:
        mine = seg(pred / f"{case}.nii.gz")
        assert np.array_equal(mine, seg(by_hand["checkpoint_best.pth"] / f"{case}.nii.gz")), case
        differ += int((mine != seg(by_hand["checkpoint_final.pth"] / f"{case}.nii.gz")).sum())
    assert differ > 0  # checkpoint_final.pth predicts otherwise: the comparison tells the two apart


# --------------------------------------------------------------------------- Sagie: the lambda sweep
@pytest.fixture(scope="module")
def sagie(karimi, tmp_path_factory):
    # after Karimi's study: both use dataset 912 with the same splits
    return run_and_report("sagie", tmp_path_factory)


def test_sagie_smoke_sweep(sagie):
    plan = prepare(sagie, write=False)
    names = sorted({r.strategy.name for r in plan.runs})
    assert names == ["l2sp-0", "l2sp-inf"] and len(plan.runs) == 4
    for r in plan.runs:
        cfg = json.loads((results_folder(plan.study, r) / "transfer_config.json").read_text())
        assert cfg["settings"]["l2sp_alpha"] == (0.0 if r.strategy.name == "l2sp-0" else "inf")
        assert cfg["settings"]["decoder_init"] == "random"
        if r.strategy.name == "l2sp-inf":
            assert cfg["drift"]["encoder"] == 0.0  # lambda = inf: the encoder does not move
        else:
            assert cfg["drift"]["encoder"] > 0.0
    rep = sagie.parent / "report"
    assert (rep / "dice_vs_l2sp_alpha.png").is_file() and "## The l2sp_alpha sweep (l2sp)" in (rep / "report.md").read_text()


# --------------------------------------------------------------------------- the templates
@pytest.mark.parametrize("template,runs", [("karimi", 5 * 3), ("amiri", (1 + 8) * 3 * 5), ("sagie", 8)])
def test_template_passes_study_plan(smoke_data, tmp_path, template, runs):
    """`study init` on a 30-case dataset (the tiny configuration: 3 stages, so Amiri's 4 presets that need 4 are
    written commented out), then `study plan`."""
    ws = smoke_data
    did, name = 914, "Dataset914_StudyTemplates"
    raw, pre = ws.root / "raw" / name, ws.root / "preprocessed" / name
    if not raw.exists():  # plan reads only the case list and links the test files: empty files will do
        for sub in ("imagesTr", "labelsTr"):
            (raw / sub).mkdir(parents=True)
        for i in range(30):
            (raw / "imagesTr" / f"tpl_{i:03d}_0000.nii.gz").touch()
            (raw / "labelsTr" / f"tpl_{i:03d}.nii.gz").touch()
        src = ws.root / "preprocessed" / ws.extra_datasets[FIXED]
        pre.mkdir(parents=True)
        shutil.copy(src / "dataset.json", raw / "dataset.json")
        shutil.copy(src / "dataset.json", pre / "dataset.json")
        plans = json.loads((src / "nnUNetPlans.json").read_text())
        plans["dataset_name"] = name
        (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "splits_final.json").unlink(missing_ok=True)  # each template its own splits
    out = tmp_path / f"{template}.toml"
    assert main(["study", "init", "--template", template, "-d", str(did), "--pretrained",
                 str(ws.source_checkpoint.parent), "-o", str(out), "-c", "tiny", "--device", "cpu"]) == 0
    plan = prepare(out)
    assert len(plan.runs) == runs
    text = out.read_text()
    if template == "amiri":
        assert text.count("\n# [[strategy]]") == 4 and "not for this network (3 stages)" in text
    if template == "sagie":
        assert [s.name for s in plan.study.strategies][-1] == "l2sp-inf" and plan.study.baseline == "l2sp-0"
    assert main(["study", "init", "--template", template, "-d", str(did), "--pretrained",
                 str(ws.source_checkpoint.parent), "-o", str(out), "-c", "tiny"]) == 2  # exists: --force


# --------------------------------------------------------------------------- two `study run` at once
_CONCURRENT = iter(range(1000))


ONLY = "*__n2__*"  # the concurrent studies run the smaller size only: one run for each of the two processes


def concurrent_study(tmp_path: Path) -> tuple[Path, list]:
    """Karimi's smoke study under a name of its own (its own configurations and folds on dataset 912, the same
    splits), of which `study run --only ONLY` runs the smaller size: 2 strategies = 2 runs of 2 epochs x 2
    iterations."""
    path = copy_example("karimi", tmp_path)
    name = f"concurrent{next(_CONCURRENT)}_{os.getpid()}"
    path.write_text(path.read_text().replace('name = "karimi_smoke"', f'name = "{name}"'))
    runs = [r for r in prepare(path, write=False).runs if "__n2__" in r.id]
    assert len(runs) == 2
    return path, runs


def start_study_run(ws, path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    log = path.parent / f"study_run_{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([executable("nnunet_transfer"), "study", "run", str(path), "--only", ONLY],
                                env=ws.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, log


def trainer_starts(study, run) -> int:
    """How many nnUNetv2_train processes trained into the run's fold: each start prints its split once (into
    a log named by the second it started, so two trainers of one second would share a file: count lines)."""
    fold = results_folder(study, run)
    return sum(p.read_text().count("This split has ") for p in fold.glob("training_log_*.txt"))


def finish(procs, timeout: float = 1800) -> list[int]:
    deadline = time.monotonic() + timeout  # a guard against a hang, not a measurement
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def held_pids(text: str) -> set[int]:
    return {int(line.split(": held by pid ")[1].split()[0]) for line in text.splitlines()
            if line.startswith("skipped ") and ": held by pid " in line}


def test_a_study_run_killed_mid_training_is_finished_by_the_other_or_a_rerun(smoke_data, tmp_path, capsys):
    """Two `study run` at once on one study (two runs): a is killed while it trains; b trains what it holds once,
    skips only what a held, takes over a's lock once a is gone (or the rerun does); nothing is trained twice but
    the killed run, which continues from its checkpoint with --c."""
    path, runs = concurrent_study(tmp_path)
    study = prepare(path, write=False).study
    (a, log_a), (b, log_b) = start_study_run(smoke_data, path, "a"), start_study_run(smoke_data, path, "b")
    killed = None
    deadline = time.monotonic() + 1800
    try:
        while killed is None and a.poll() is None and time.monotonic() < deadline:
            for r in runs:
                fold, record = results_folder(study, r), run_dir(study, r) / ".lock.json"
                logs = sorted(fold.glob("training_log_*.txt"))
                holder = json.loads(record.read_text()) if record.is_file() else {}
                # "Epoch 1": epoch 0's checkpoint_latest is complete; a's own run, mid-training
                if (holder.get("pid") == a.pid and logs and not (fold / "checkpoint_final.pth").exists()
                        and "Epoch 1" in logs[-1].read_text()):
                    os.killpg(a.pid, signal.SIGSTOP)  # freeze a and its trainer, look again: never mid-final
                    if not (fold / "checkpoint_final.pth").exists():
                        os.kill(a.pid, signal.SIGKILL)  # study run only: its nnUNetv2_train must die with it
                        killed = r
                    try:
                        os.killpg(a.pid, signal.SIGCONT)
                    except ProcessLookupError:  # a and its trainer are gone already
                        pass
                    break
            time.sleep(0.02)
    finally:
        if killed is None:
            finish([a, b], timeout=1)
    assert killed is not None, f"a ended before one of its runs could be killed mid-run: {log_a}"
    assert finish([a, b]) == [-signal.SIGKILL, 0], log_b.read_text()[-3000:]
    # a's trainer went with it (pipeline.run_step's parent-death signal): a's session is empty
    while subprocess.run(["pgrep", "-s", str(a.pid)], capture_output=True).stdout.strip() and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-s", str(a.pid)], capture_output=True).stdout.strip() == b""
    assert main(["study", "run", str(path), "--only", ONLY]) == 0  # the rerun: whatever b left
    rerun = capsys.readouterr().out
    took = [t for t in (log_b.read_text(), rerun) if f"taking over the lock of pid {a.pid} on host " in t]
    assert len(took) == 1 and "its process is gone" in took[0]
    for r in runs:
        state = read_state(study, r)
        assert state["state"] == "done", (r.id, state)
        if r.id == killed.id:  # resumed once with --c from the killed attempt's checkpoint
            assert trainer_starts(study, r) == 2 and state["attempt"] == 2
            second = (run_dir(study, r) / "train_2.log").read_text().splitlines()[0]
            assert "--c" in second and "-pretrained_weights" not in second
            final = load_checkpoint(results_folder(study, r) / "checkpoint_final.pth")["logging"]
            assert len(final["epoch_end_timestamps"]) == 2
        else:
            assert trainer_starts(study, r) == 1 and state["attempt"] == 1, (r.id, state)
    mine = {r.id for r in runs}
    assert all(p.state == "done" and p.holder is None for p in study_status(path).progress if p.run.id in mine)
    # b, the survivor: every run it trained once, none it skipped was held by anyone but a, and nothing failed
    text = log_b.read_text()
    assert held_pids(text) <= {a.pid} and "failed" not in text
    trained_by_b = [line.split()[1] for line in text.splitlines() if line.startswith("training ")]
    assert len(trained_by_b) == len(set(trained_by_b)) >= 1
