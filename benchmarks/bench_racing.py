"""Benchmark: what racing would have saved on a full study, and whether it would have kept the right strategies
(issue 25, item 5).

On the test suite's workspace (``tests/conftest.py``'s ``Workspace``: source Dataset901 pretrained in the ``tiny``
configuration, features 8-16-32, patch 32³) plus a generated target of its own (Dataset930, 16 cases, preprocessed
with the source's plans), this script writes a full study — no ``[racing]`` — with five strategies of clearly
different quality (from scratch = the baseline, fine-tuning, a random frozen encoder, L2-SP at a freezing λ = ∞ —
the pretrained encoder frozen, decoder from scratch — and norm-only), two training-set sizes and three repeats
(30 runs), runs it with ``nnunet_transfer study run`` (local executor: real ``nnUNetv2_train`` and
``nnUNetv2_predict`` on the CPU), then ``nnunet_transfer study replay-racing`` under the paired and the halving rule
at the same rungs, and prints one table: per rule and size, the strategies dropped (at which epoch), the training
epochs saved against the full study's, whether the full study's winner was kept, and the strategies dropped
wrongly — dropped although not significantly worse than the winner in the full study.

"The full study's winner" and "significantly worse" are judged twice: on the study's scoring — each run's mean
test-set Dice (its ``runs/<id>/eval/per_case.csv``: mean over the held-out test cases and foreground labels), the
same one-sided paired t-test with Holm as the paired rule, units = repeats — and on the final EMA pseudo-Dice, the
replay's own default. The replay's decisions (drops, epochs) do not depend on the judge.

The schedule is tiny (6 epochs x 2 iterations, rungs at epochs 1 and 3) so that 30 real runs fit a shared 2-core
CPU: 55 min there on 2026-12-07 at load average 6-17 (workspace 5.5 min, `study run` 49 min in two processes, each
replay 22 s); results in benchmarks/README.md and documentation/experiments.md.

    python benchmarks/bench_racing.py --workdir /tmp/br --json racing.json     # 55 min on 2 loaded cores
    python benchmarks/bench_racing.py --workdir /tmp/br --reuse                # replay again on the finished study
    python benchmarks/bench_racing.py --epochs 4 --iterations 2 --repeats 2    # a smoke run of the plumbing
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TESTS = ROOT / "tests"
TARGET_ID, TARGET_NAME = 930, "RacingBench"
STUDY_FILE = "racing_bench.toml"

STRATEGIES = """
[[strategy]]
name = "scratch"
trainer = "nnUNetTrainerTransferBase"
title = "from scratch (baseline)"

[[strategy]]
name = "finetune"
trainer = "nnUNetTrainerFinetune"
title = "fine-tune every layer, initial LR halved"
pretrained = "source"

[[strategy]]
name = "frozen-random"
trainer = "nnUNetTrainerFrozenEncoder"
title = "random frozen encoder (no pretrained weights), decoder trains"

[[strategy]]
name = "l2sp-inf"
trainer = "nnUNetTrainerL2SP_Sagie"
title = "L2-SP at a freezing lambda: pretrained encoder frozen, decoder from scratch"
pretrained = "source"
settings = { l2sp_alpha = inf }

[[strategy]]
name = "normonly"
trainer = "nnUNetTrainerNormOnly"
title = "norm-only: the pretrained network, only its normalisation layers and the heads train"
pretrained = "source"
"""


def study_text(source_fold: Path, *, epochs: int, iterations: int, val_iterations: int, repeats: int,
               sizes: list, test: int, val: int) -> str:
    size_list = ", ".join(f'"{s}"' if isinstance(s, str) else str(s) for s in sizes)
    return f"""# Written by benchmarks/bench_racing.py: a full study (no [racing]) that study replay-racing replays.
[study]
name = "racing_bench"
target = {TARGET_ID}
configuration = "tiny"
baseline = "scratch"
device = "cpu"

[pretrained]
source = "{source_fold}"

[splits]
n_train = [{size_list}]
repeats = {repeats}
test = {test}
val = {val}
seed = 0

[settings]
seed = 0
num_epochs = {epochs}
num_iterations_per_epoch = {iterations}
num_val_iterations_per_epoch = {val_iterations}
save_every = {epochs}
final_validation = false

[scoring]
metrics = ["dice"]
resamples = 200

[predict]
disable_tta = true
processes = 0

[environment]
nnUNet_n_proc_DA = "0"
{STRATEGIES}"""


def load_workspace_module():
    """tests/conftest.py as a module: its ``Workspace`` builds exactly the data the test suite trains on."""
    spec = importlib.util.spec_from_file_location("nnunet_transfer_test_conftest", TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli(args: list[str], env: dict, log: Path) -> tuple[float, str]:
    """``nnunet_transfer ARGS`` of this checkout (PYTHONPATH), output to LOG; returns (seconds, output)."""
    from nnunet_transfer.pipeline import executable

    t = time.perf_counter()
    with open(log, "w") as f:  # written as it goes: `tail -f LOG` follows a study run
        proc = subprocess.run([executable("nnunet_transfer"), *args], env=env, stdout=f, stderr=subprocess.PIPE,
                              text=True, stdin=subprocess.DEVNULL)
    out = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"bench_racing: error: nnunet_transfer {' '.join(args)} failed (exit {proc.returncode}); "
                         f"see {log}:\n{(out + proc.stderr)[-3000:]}")
    return time.perf_counter() - t, out


def study_run(path: Path, env: dict, processes: int, folder: Path) -> float:
    """``nnunet_transfer study run PATH`` in PROCESSES concurrent processes (a study's runs are locked: each process
    trains the runs no other holds), each logging to ``FOLDER/study_run<i>.log``; returns the wall seconds until the
    last one ends."""
    from nnunet_transfer.pipeline import executable

    t = time.perf_counter()
    procs = []
    for i in range(processes):
        log = folder / f"study_run{i + 1}.log"
        procs.append((subprocess.Popen([executable("nnunet_transfer"), "study", "run", str(path)], env=env,
                                       stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL),
                      log))
        time.sleep(20 if i + 1 < processes else 0)  # the first plans the study; the next find it planned
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"bench_racing: error: nnunet_transfer study run failed (exit {proc.returncode}); see "
                             f"{log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t


def test_dice(study, run) -> float:
    """The run's mean Dice over its held-out test cases and foreground labels (the study's evaluation)."""
    from nnunet_transfer.experiments.evaluate import read_per_case
    from nnunet_transfer.study.state import run_dir

    rows = read_per_case(run_dir(study, run) / "eval" / "per_case.csv")
    values = [r["dice"] for r in rows if r["label"] > 0 and math.isfinite(r["dice"])]
    return sum(values) / len(values)


def curves(study, runs, rungs: list[int]) -> list[dict]:
    """Per size and strategy: mean EMA pseudo-Dice at each rung and at the end, mean test Dice (over the repeats)."""
    from nnunet_transfer.study.racing import ema_at
    from nnunet_transfer.study.state import results_folder

    out = []
    for size in sorted({r.size_index for r in runs}):
        for name in [s.name for s in study.strategies]:
            here = [r for r in runs if r.size_index == size and r.strategy.name == name]
            row = {"n_train": here[0].n_train, "strategy": name}
            for e in [*rungs, here[0].num_epochs]:
                v = [ema_at(results_folder(study, r), e) for r in here]
                row[f"ema@{e}"] = [None if x is None else round(x, 4) for x in v]
            row["test_dice"] = [round(test_dice(study, r), 4) for r in here]
            out.append(row)
    return out


def mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="num_epochs of every run (poly LR over them)")
    ap.add_argument("--iterations", type=int, default=2, help="training iterations per epoch")
    ap.add_argument("--val-iterations", type=int, default=2, help="validation iterations per epoch (the EMA signal)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2,
                    help="concurrent `study run` processes (the study locks each run: N processes train N runs at "
                         "once; the runs and their results are the same as with one)")
    ap.add_argument("--sizes", default="3,all", help="training-set sizes, comma-separated (default 3,all = 3 and 10)")
    ap.add_argument("--rungs", default="0.2,0.5", help="the replay's rungs: epochs or fractions of --epochs")
    ap.add_argument("--workdir", help="folder for the nnU-Net tree and the study (default: a temporary one, removed)")
    ap.add_argument("--reuse", action="store_true", help="reuse the workspace and the study runs in --workdir")
    ap.add_argument("--json", help="write the table and the curves here")
    args = ap.parse_args(argv)
    if args.epochs < 2 or args.iterations < 1 or args.val_iterations < 1 or args.repeats < 2 or args.processes < 1:
        print("bench_racing: error: need --epochs >= 2, --iterations >= 1, --val-iterations >= 1, --repeats >= 2, "
              "--processes >= 1",
              file=sys.stderr)
        return 2
    sizes = [s if s == "all" else int(s) for s in args.sizes.split(",")]

    conftest = load_workspace_module()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_racing_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ws = conftest.Workspace(root)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        os.environ[var] = ws.env[var]  # replay and the evaluation files are read in this process
    env = {**ws.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    built = (root / "preprocessed").is_dir() and any((root / "preprocessed").glob(f"Dataset{TARGET_ID}_*"))
    if args.reuse and args.workdir and built:
        print(f"reusing the workspace in {root}", flush=True)
        ws.source, ws.target = (next((root / "raw").glob(f"Dataset{i}_*")).name
                                for i in (conftest.SOURCE_ID, conftest.TARGET_ID))
    else:
        print(f"[{time.perf_counter() - t0:5.0f}s] building the test workspace in {root} (source "
              f"{conftest.SOURCE_ID} pretrained, target {conftest.TARGET_ID} preprocessed)", flush=True)
        ws.build()
        print(f"[{time.perf_counter() - t0:5.0f}s] generating and preprocessing target {TARGET_ID} (16 cases)",
              flush=True)
        ws.add_target(TARGET_ID, TARGET_NAME, n_train=16, seed=30)
    build_s = time.perf_counter() - t0
    source_fold = ws.fold_folder(conftest.SOURCE_ID, conftest.TINY, "nnUNetTrainerTransferBase")

    study_dir = root / "study"
    study_dir.mkdir(exist_ok=True)
    path = study_dir / STUDY_FILE
    text = study_text(source_fold, epochs=args.epochs, iterations=args.iterations,
                      val_iterations=args.val_iterations, repeats=args.repeats, sizes=sizes, test=4, val=2)
    if path.is_file() and path.read_text() != text:
        print(f"bench_racing: error: {path} holds another study (other options); use another --workdir",
              file=sys.stderr)
        return 2
    path.write_text(text)
    print(f"[{time.perf_counter() - t0:5.0f}s] nnunet_transfer study run {path}  ({len(sizes)} sizes x "
          f"{args.repeats} repeats x 5 strategies, {args.epochs} epochs x {args.iterations} iterations)", flush=True)
    run_s = study_run(path, env, args.processes, study_dir)

    from nnunet_transfer.study.racing import replay
    from nnunet_transfer.study.spec import load_study
    from nnunet_transfer.study.table import build_table, plan_study_splits

    study = load_study(path)
    runs = build_table(study, plan_study_splits(study))
    replays, replay_s = {}, {}
    for rule in ("paired", "halving"):
        print(f"\n$ nnunet_transfer study replay-racing {path.name} --rule {rule} --rungs {args.rungs}")
        replay_s[rule], out = cli(["study", "replay-racing", str(path), "--rule", rule, "--rungs", args.rungs], env,
                                  study_dir / f"replay_{rule}.log")
        print(out.rstrip())
        rungs = [float(x) if "." in x else int(x) for x in args.rungs.split(",")]
        # the same replay in this process, judged by the study's test Dice and by the replay's final EMA
        replays[rule] = {"test": replay(study, rule=rule, rungs=rungs, final=test_dice),
                         "ema": replay(study, rule=rule, rungs=rungs)}
        if replays[rule]["ema"].text() != out.rstrip():
            raise SystemExit("bench_racing: error: the in-process replay differs from the command's output")
    epochs = replays["paired"]["ema"].rungs
    total = time.perf_counter() - t0

    rows = curves(study, runs, epochs)
    print(f"\nper strategy, mean over the {args.repeats} repeats: EMA pseudo-Dice at the rungs and at the end, test Dice")
    cols = [*(f"ema@{e}" for e in epochs), f"ema@{args.epochs}", "test_dice"]
    print("| n_train | strategy | " + " | ".join(cols) + " |\n|---|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['n_train']} | {r['strategy']} | " + " | ".join(f"{mean(r[c]):.3f}" for c in cols) + " |")

    table = []
    print(f"\nreplay at rungs {epochs} of {args.epochs} epochs (alpha 0.05, one-sided paired t-test, Holm; halving "
          f"eta 2); winner and 'not significantly worse' judged by the test Dice (by the final EMA)")
    print("| rule | n_train | dropped (at epoch) | epochs spent / full | saved | winner kept | dropped wrongly |\n"
          "|---|---|---|---:|---:|---|---|")
    for rule in ("paired", "halving"):
        for t, e in zip(replays[rule]["test"].rows, replays[rule]["ema"].rows):
            assert t["dropped"] == e["dropped"] and t["spent"] == e["spent"]
            row = {"rule": rule, "n_train": t["n_train"], "dropped": t["dropped"], "spent": t["spent"],
                   "full": t["full"], "saved": 1 - t["spent"] / t["full"],
                   "winner_test": t["winner"], "winner_kept_test": t["winner_kept"], "wrong_test": t["wrong"],
                   "winner_ema": e["winner"], "winner_kept_ema": e["winner_kept"], "wrong_ema": e["wrong"]}
            table.append(row)
            dropped = ", ".join(f"{s} ({ep})" for s, ep in t["dropped"].items()) or "none"
            print(f"| {rule} | {t['n_train']} | {dropped} | {t['spent']} / {t['full']} | {100 * row['saved']:.0f} % | "
                  f"{'yes' if t['winner_kept'] else 'NO'} ({t['winner']}; EMA: {e['winner']}, "
                  f"{'yes' if e['winner_kept'] else 'NO'}) | {', '.join(t['wrong']) or 'none'} "
                  f"(EMA: {', '.join(e['wrong']) or 'none'}) |")
        spent = sum(r["spent"] for r in table if r["rule"] == rule)
        full = sum(r["full"] for r in table if r["rule"] == rule)
        print(f"| {rule} | all | | {spent} / {full} | {100 * (1 - spent / full):.0f} % | | |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nworkspace {build_s / 60:.1f} min, study run {run_s / 60:.1f} min, replays "
          f"{replay_s['paired']:.0f} s + {replay_s['halving']:.0f} s; total {total / 60:.1f} min on {machine}, "
          f"load average {os.getloadavg()[0]:.1f} at the end, {date.today()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "table": table, "curves": rows, "rungs": epochs, "epochs": args.epochs, "iterations": args.iterations,
            "val_iterations": args.val_iterations, "repeats": args.repeats, "sizes": sizes,
            "seconds": {"workspace": round(build_s, 1), "study_run": round(run_s, 1),
                        "replay": {k: round(v, 1) for k, v in replay_s.items()}, "total": round(total, 1)},
            "machine": machine, "date": str(date.today())}, indent=1))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
