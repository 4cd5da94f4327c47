"""Benchmark: how far Sagie's λ lets the encoder move under nnU-Net's optimiser (issue 21, item 8).

Sagie et al. 2021 sweep λ ∈ {0, 1, 2, 4, 8, 16, 50, ∞} for Cost = Loss + λ‖θ_enc − θ̄_enc‖² under their
own loss (weighted cross-entropy) and optimiser. Under nnU-Net's SGD (momentum 0.99, Nesterov, poly LR from 1e-2)
and Dice + CE with deep supervision the same λ means something else. This script measures it: on the test
suite's workspace (``tests/conftest.py``'s ``Workspace``: source Dataset901 pretrained in the ``tiny``
configuration, target Dataset902 preprocessed with its plans), one ``nnUNetv2_train -tr
nnUNetTrainerL2SP_Sagie -device cpu`` per λ from the same source checkpoint, with the same seed and
schedule, and the encoder's drift ‖θ_enc − θ_enc,0‖ / ‖θ_enc,0‖ from the start to the end of training, as
every run writes it to ``transfer_config.json`` (``drift``). λ = 0 is fine-tuning (decoder from scratch),
λ = inf the frozen encoder (drift 0 exactly).

    python benchmarks/sagie_lambda.py       # default grid: 15 min + 4.5 for the workspace on 2 cores at load 6
    python benchmarks/sagie_lambda.py --lambdas 0 0.01 0.1 inf --epochs 2 --workdir /tmp/sl --json sl.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
TRAINER = "nnUNetTrainerL2SP_Sagie"
DEFAULT_LAMBDAS = ["0", "1e-4", "1e-3", "1e-2", "1e-1", "1", "10", "100", "inf"]


def load_workspace_module():
    """tests/conftest.py as a module: its ``Workspace`` builds exactly the data the test suite trains on."""
    spec = importlib.util.spec_from_file_location("nnunet_transfer_test_conftest", TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slug(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}".replace(".", "p").replace("-", "m").replace("+", "")


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"


def collect(fold: Path) -> dict:
    """A finished run's drift (``transfer_config.json``) and the largest per-epoch distance of the anchored
    encoder from its anchor (``l2sp_log.json``; none at λ = inf, where nothing is anchored)."""
    cfg = json.loads((fold / "transfer_config.json").read_text())
    drift = cfg.get("drift") or {}
    log = fold / "l2sp_log.json"
    peak = max((e["relative_distance"] for e in json.loads(log.read_text())), default=None) if log.is_file() else None
    return {"encoder": drift.get("encoder"), "decoder": drift.get("decoder"), "peak": peak,
            "lr_scale": cfg["settings"]["lr_scale"]}


def transition(rows: list[dict], *, high: float, low: float) -> tuple[float | None, float | None]:
    """The largest λ whose encoder drift is still ≥ HIGH × fine-tuning's, and the smallest whose drift is
    ≤ LOW × fine-tuning's (finite λ > 0 only)."""
    finite = [r for r in rows if 0 < r["lambda"] < math.inf]
    keep = [r["lambda"] for r in finite if r["ratio"] is not None and r["ratio"] >= high]
    near0 = [r["lambda"] for r in finite if r["ratio"] is not None and r["ratio"] <= low]
    return (max(keep) if keep else None), (min(near0) if near0 else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambdas", nargs="+", default=DEFAULT_LAMBDAS, help="l2sp_alpha values (inf = frozen)")
    ap.add_argument("--epochs", type=int, default=3, help="target epochs per run (poly LR over them)")
    ap.add_argument("--iterations", type=int, default=10, help="training iterations per epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the nnU-Net tree (default: a temporary one, removed)")
    ap.add_argument("--reuse", action="store_true", help="reuse the source model and data already in --workdir")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    try:
        lambdas = [float(x) for x in args.lambdas]
    except ValueError:
        print(f"sagie_lambda: error: --lambdas must be numbers or inf, got {args.lambdas}", file=sys.stderr)
        return 2
    if any(math.isnan(x) or x < 0 for x in lambdas) or args.epochs < 1 or args.iterations < 1:
        print(f"sagie_lambda: error: need lambdas >= 0 (got {args.lambdas}), --epochs >= 1 and --iterations >= 1",
              file=sys.stderr)
        return 2

    conftest = load_workspace_module()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sagie_lambda_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ws = conftest.Workspace(root)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        os.environ[var] = ws.env[var]  # configure() runs in this process and reads nnU-Net's folders
    if args.reuse and args.workdir and (root / "results").is_dir():
        print(f"reusing the test workspace in {root}", flush=True)
        # a workdir this script built before: the same data and source model, only the target runs again
        ws.source, ws.target = (next((root / "raw").glob(f"Dataset{i}_*")).name
                                for i in (conftest.SOURCE_ID, conftest.TARGET_ID))
        for old in (root / "results" / ws.target).glob(f"{TRAINER}__*"):
            shutil.rmtree(old)
    else:
        print(f"[{time.perf_counter() - t0:5.0f}s] building the test workspace in {root} (source "
              f"{conftest.SOURCE_ID} pretrained, target {conftest.TARGET_ID} preprocessed)", flush=True)
        ws.build()
    build_s = time.perf_counter() - t0
    settings = {**conftest.QUICK_SETTINGS, "num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
                "seed": args.seed, "save_every": args.epochs}
    rows = []
    for lam in lambdas:
        config = f"sagie_{slug(lam)}"
        ws.configure(conftest.TARGET_ID, conftest.TINY, config,
                     {**settings, "l2sp_alpha": "inf" if math.isinf(lam) else lam})
        print(f"[{time.perf_counter() - t0:5.0f}s] nnUNetv2_train {conftest.TARGET_ID} {config} 0 -tr {TRAINER} "
              f"(l2sp_alpha={lam:g})", flush=True)
        t = time.perf_counter()
        fold = ws.train(conftest.TARGET_ID, config, TRAINER, pretrained=ws.source_checkpoint)
        seconds = time.perf_counter() - t
        rows.append({"lambda": lam, **collect(fold), "train_seconds": round(seconds, 1)})
    ft = next((r["encoder"] for r in rows if r["lambda"] == 0), None)
    for r in rows:
        r["ratio"] = None if not ft or r["encoder"] is None else r["encoder"] / ft
    total = time.perf_counter() - t0

    head = ("| λ (`l2sp_alpha`) | encoder drift | ÷ fine-tuning's (λ = 0) | largest per-epoch encoder distance | "
            "decoder drift | train s |\n|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['lambda']:g} | {fmt(r['encoder'])} | {fmt(r['ratio'])} | {fmt(r['peak'])} | "
             f"{fmt(r['decoder'])} | {r['train_seconds']:.0f} |" for r in rows]
    print("\n" + "\n".join([head, *lines]))
    hi, lo = transition(rows, high=0.9, low=0.1)
    lo1 = transition(rows, high=0.9, low=0.01)[1]
    print(f"\nencoder drift >= 90 % of fine-tuning's up to lambda = {hi}; <= 10 % from lambda = {lo}; "
          f"<= 1 % from lambda = {lo1}")
    print(f"schedule: {args.epochs} epochs x {args.iterations} iterations (poly LR from nnU-Net's 1e-2), seed "
          f"{args.seed}; workspace build {build_s / 60:.1f} min, total {total / 60:.1f} min on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date.today()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "epochs": args.epochs, "iterations": args.iterations,
                                               "seed": args.seed, "build_seconds": round(build_s, 1),
                                               "total_seconds": round(total, 1), "date": str(date.today()),
                                               "transition": {"ratio_ge_0.9_up_to": hi, "ratio_le_0.1_from": lo,
                                                              "ratio_le_0.01_from": lo1}}, indent=1))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
