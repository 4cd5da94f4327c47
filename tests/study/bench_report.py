"""How `study report` scales: a synthetic tree of 100 finished runs, the number of test cases varied; and the
memory of `study run` against its number of runs.

    python tests/study/bench_report.py [--cases 4 8 16 32] [--shape 48] [--runs 100]
    python tests/study/bench_report.py --run-memory [--runs-list 10 100] [--shape 48]

Each size runs in a fresh process (peak RSS from ``ru_maxrss`` is that process's own): the fake tree of
``tests/study/fake_tree.py`` (5 strategies x 2 sizes x 10 repeats = 100 runs on one held-out test set,
label maps of shape^3 voxels), then ``report_study`` twice — the first evaluates every run's test cases,
the second finds the evaluations cached and only pools, compares (compare's defaults: 9999 bootstrap
resamples, every metric) and plots. ``--run-memory``: ``run_study`` over 10 and 100 runs with nnU-Net's two
programs replaced by stand-ins (a training writes a checkpoint, a prediction copies the reference), so what
is measured is the study process itself — state files, one run's predictions and its evaluation, case by
case — whose peak RSS must not grow with the number of runs. Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def study_text(n_test: int, strategies: int, repeats: int) -> str:
    body = f"""
[study]
name = "bench"
target = 950
configuration = "3d_fullres"
baseline = "s0"
device = "cpu"

[splits]
n_train = [2, "all"]
test = {n_test}
val = 1
repeats = {repeats}

[settings]
num_epochs = 20
"""
    for i in range(strategies):
        body += f'\n[[strategy]]\nname = "s{i}"\ntrainer = "nnUNetTrainerTransferBase"\n'
    return body


def one(n_test: int, shape: int, runs: int) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from study.fake_tree import finish_run, make_tree

    strategies, repeats = 5, runs // 10
    root = Path(tempfile.mkdtemp(prefix="bench_report_"))
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir()
        os.environ[var] = str(root / sub)
    from nnunet_transfer.study.plan import prepare
    from nnunet_transfer.study.report import report_study

    path = make_tree(root, n_cases=n_test + 1 + 4, shape=(shape,) * 3, study_text=study_text(n_test, strategies, repeats))
    plan = prepare(path)
    assert len(plan.runs) == runs, len(plan.runs)
    for i, r in enumerate(plan.runs):
        finish_run(plan.study, r, plan.definitions[r.id], quality=0.7 + 0.05 * (i % 5), seed=i)
    t0 = time.perf_counter()
    report_study(path, root / "rep", say=lambda s: None)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    report_study(path, root / "rep", say=lambda s: None)
    cached = time.perf_counter() - t0
    return {"test_cases": n_test, "runs": runs, "case_evaluations": runs * n_test, "first_s": first,
            "cached_s": cached, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_memory(runs: int, shape: int) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from study.fake_tree import make_tree
    from study.test_run_report import FakePrograms

    import nnunet_transfer.pipeline as pipeline
    from nnunet_transfer.study.runner import run_study

    root = Path(tempfile.mkdtemp(prefix="bench_run_"))
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir()
        os.environ[var] = str(root / sub)
    path = make_tree(root, n_cases=8 + 1 + 4, shape=(shape,) * 3, study_text=study_text(8, 5, runs // 10))
    pipeline.run_step = FakePrograms(root)
    import gc

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    summary = run_study(path, say=lambda s: None)
    assert summary.count("done") == runs, summary.text()
    return {"runs": runs, "seconds": time.perf_counter() - t0, "peak_rss_mb_before": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--shape", type=int, default=48)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-memory", action="store_true")
    ap.add_argument("--runs-list", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--one-run", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one_run is not None:
        print(json.dumps(run_memory(a.one_run, a.shape)))
        return
    if a.run_memory:
        print("| runs | study run [s] | peak RSS before run_study [MB] | peak RSS at the end [MB] |\n|---|---|---|---|")
        for n in a.runs_list:
            out = subprocess.run([sys.executable, __file__, "--one-run", str(n), "--shape", str(a.shape)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['runs']} | {r['seconds']:.1f} | {r['peak_rss_mb_before']:.0f} | {r['peak_rss_mb']:.0f} |")
        return
    if a.one is not None:
        print(json.dumps(one(a.one, a.shape, a.runs)))
        return
    rows = []
    for n in a.cases:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--shape", str(a.shape), "--runs", str(a.runs)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| test cases | runs | case evaluations | report (evaluates) [s] | s per case evaluation | "
          "report (cached) [s] | peak RSS [MB] |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['test_cases']} | {r['runs']} | {r['case_evaluations']} | {r['first_s']:.1f} | "
              f"{(r['first_s'] - r['cached_s']) / r['case_evaluations']:.4f} | {r['cached_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
