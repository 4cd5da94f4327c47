"""The whole pipeline on generated data: pretrain on a source, transfer to a small target, compare.

Every step runs nnU-Net's (or this package's) own command-line program as a subprocess, exactly as a
user would type it; each step's output is in ``OUT/logs/``. The result is a table of test Dice per
strategy with training time, printed and written as ``OUT/results.md`` and ``OUT/results.json``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nnunet_transfer.data import LABELS, make_transfer_pair
from nnunet_transfer.errors import TransferError
from nnunet_transfer.experiments.metrics import dice_folder
from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
from nnunet_transfer.pipeline import TRAIN_ENV, run_step, train_args

SOURCE_ID, TARGET_ID = 901, 902
MARKER = ".nnunet_transfer_demo"
BASE_CONFIG = "3d_fullres"
DEMO_CONFIG = "demo"  # tiny network: features 8-16-32, patch 32^3, batch 2
TARGET_CONFIG = "target"  # inherits DEMO_CONFIG in the moved plans, with the fine-tuning schedule


@dataclass(frozen=True)
class DemoRun:
    """One strategy as the demo runs it, one row of the table: a trainer, its settings, and whether it starts
    from the source model (a study file's strategy is :class:`nnunet_transfer.study.model.Strategy`)."""

    name: str
    trainer: str
    pretrained: bool
    settings: dict[str, Any] = field(default_factory=dict)
    slug: str = ""

    @property
    def configuration(self) -> str:
        return f"{TARGET_CONFIG}_{self.slug}" if self.settings else TARGET_CONFIG


STRATEGIES: list[DemoRun] = [
    DemoRun("from scratch (random init)", "nnUNetTrainerTransferBase", pretrained=False),
    DemoRun("fine-tune all layers, LR/2 (Karimi)", "nnUNetTrainerFinetune", pretrained=True),
    DemoRun("random frozen encoder, decoder trained (Karimi)", "nnUNetTrainerFrozenEncoder",
             pretrained=False),
    DemoRun("block-wise: all but the bottleneck (Amiri #4)", "nnUNetTrainerPartialFT_exceptBottleneck",
             pretrained=True),
    DemoRun("L2-SP on the encoder, decoder from scratch (Sagie, lambda=8)", "nnUNetTrainerL2SP_Sagie",
             pretrained=True),
]


@dataclass(frozen=True)
class Schedule:
    pretrain_epochs: int = 12
    finetune_epochs: int = 8
    iterations: int = 20
    val_iterations: int = 4


QUICK = Schedule(pretrain_epochs=2, finetune_epochs=2, iterations=4, val_iterations=2)


def _settings(epochs: int, sched: Schedule, seed: int) -> list[str]:
    return ["--set", f"num_epochs={epochs}", "--set", f"num_iterations_per_epoch={sched.iterations}",
            "--set", f"num_val_iterations_per_epoch={sched.val_iterations}", "--set", f"seed={seed}",
            "--set", "save_every=1", "--set", "final_validation=false"]


def _set_args(settings: dict[str, Any]) -> list[str]:
    return [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]


def run_demo(out: str | Path, *, schedule: Schedule = Schedule(), strategies: list[DemoRun] | None = None,
             seed: int = 0, say: Callable[[str], None] = print) -> dict:
    out = Path(out).resolve()
    strategies = STRATEGIES if strategies is None else strategies
    blocking = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TransferError(f"--out {out} cannot be created: {blocking} is a file; choose a folder with --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise TransferError(f"{out} exists and is not a folder this demo wrote (no {MARKER}); "
                                f"choose a new or empty folder with --out")
        shutil.rmtree(out)  # a demo folder of ours: a rerun starts clean so results never mix
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by nnunet_transfer demo; the demo replaces this folder on rerun\n")
    env = nnunet_environment(out, defaults=SMALL_MACHINE)
    logs = out / "logs"
    t_start = time.perf_counter()

    def step(what: str, args: list[str], log: str, train: bool = False) -> float:
        say(f"[{time.perf_counter() - t_start:6.0f}s] {what}")
        return run_step(args, env=env, log=logs / log, what=what, extra_env=TRAIN_ENV if train else None)

    say(f"[{0:6.0f}s] generating source (good scanner) and target (low-quality centre) datasets in {out}/raw")
    src, tgt = make_transfer_pair(out / "raw", source_id=SOURCE_ID, target_id=TARGET_ID, seed=seed)

    step("planning + preprocessing the source", ["nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, "-c",
                                                  BASE_CONFIG, "-np", 1, "-npfp", 1,
                                                  "--verify_dataset_integrity"], "01_plan_source.log")
    step("adding the small CPU configuration to the source plans",
         ["nnunet_transfer", "configure", "-d", SOURCE_ID, "-c", BASE_CONFIG, "-n", DEMO_CONFIG,
          "--features", "8,16,32", "--patch", "32,32,32", "--batch-size", 2,
          *_settings(schedule.pretrain_epochs, schedule, seed)], "02_configure_source.log")
    step("pretraining on the source (nnUNetTrainerTransferBase)",
         train_args(SOURCE_ID, DEMO_CONFIG, 0, "nnUNetTrainerTransferBase"), "03_pretrain.log", train=True)
    source_ckpt = (out / "results" / src / f"nnUNetTrainerTransferBase__nnUNetPlans__{DEMO_CONFIG}"
                   / "fold_0" / "checkpoint_final.pth")

    # The target is preprocessed with the SOURCE's plans so that the architectures match; `plans
    # transfer` also brings the target's dataset.json and fingerprint and its own CT statistics.
    step("transferring the source plans to the target",
         ["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", TARGET_ID, "-np", 1],
         "04_plans_transfer.log")
    step("preprocessing the target with the source plans",
         ["nnUNetv2_preprocess", "-d", TARGET_ID, "-plans_name", "nnUNetPlans", "-c", BASE_CONFIG,
          "-np", 1], "05_preprocess_target.log")
    step("setting the target's schedule (weights snapshots for the analysis)",
         ["nnunet_transfer", "configure", "-d", TARGET_ID, "-c", DEMO_CONFIG, "-n", TARGET_CONFIG,
          *_settings(schedule.finetune_epochs, schedule, seed), "--set",
          f"snapshot_every={max(1, schedule.finetune_epochs // 4)}"], "06_configure_target.log")

    rows = []
    for i, s in enumerate(strategies):
        if s.settings:
            step(f"configuration {s.configuration}", ["nnunet_transfer", "configure", "-d", TARGET_ID, "-c",
                                                      TARGET_CONFIG, "-n", s.configuration,
                                                      *_set_args(s.settings)], f"1{i}_configure.log")
        seconds = step(f"training on the target: {s.name} ({s.trainer})",
                       train_args(TARGET_ID, s.configuration, 0, s.trainer,
                                  pretrained=source_ckpt if s.pretrained else None),
                       f"1{i}_train_{s.trainer}.log", train=True)
        pred = out / "predictions" / f"{s.trainer}__{s.configuration}"
        step(f"predicting the target test cases with {s.trainer}",
             ["nnUNetv2_predict", "-i", out / "raw" / tgt / "imagesTs", "-o", pred, "-d", TARGET_ID, "-c",
              s.configuration, "-f", 0, "-tr", s.trainer, "-device", "cpu", "-npp", 1, "-nps", 1,
              "--disable_tta", "--disable_progress_bar"], f"1{i}_predict_{s.trainer}.log")
        scores = dice_folder(pred, out / "raw" / tgt / "labelsTs", [v for v in LABELS.values() if v])
        fold = out / "results" / tgt / f"{s.trainer}__nnUNetPlans__{s.configuration}" / "fold_0"
        drift = json.loads((fold / "transfer_config.json").read_text()).get("drift") or {}
        rows.append({"strategy": s.name, "trainer": s.trainer, "configuration": s.configuration,
                     "pretrained": s.pretrained, "dice_mean": scores["mean"],
                     "dice_per_label": {name: scores["mean_per_label"][v] for name, v in LABELS.items() if v},
                     "train_seconds": round(seconds, 1),
                     "drift": {k: drift.get(k) for k in ("encoder", "decoder")}})
    results = {"source": src, "target": tgt, "schedule": schedule.__dict__, "seed": seed,
               "rows": rows, "total_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    n_test = len(list((out / "raw" / tgt / "labelsTs").glob("*.nii.gz")))
    table = (format_table(rows) + f"\n\nTest Dice on the {n_test} target test cases (nnUNetv2_predict "
             f"without test-time mirroring); train time is the wall time of nnUNetv2_train, start-up "
             f"included; 'moved' is ||theta - theta_0|| / ||theta_0|| of the part between the start and the end "
             f"of training. Source: {schedule.pretrain_epochs}x{schedule.iterations} iterations; target: "
             f"{schedule.finetune_epochs}x{schedule.iterations}, seed {seed}.")
    (out / "results.md").write_text(table + "\n")
    if any(s.trainer == "nnUNetTrainerFinetune" and not s.settings for s in strategies):
        # Karimi et al.'s evolution study on the fine-tuned run: each layer's similarity (PWCCA) to
        # the same layer at the convergence epoch
        step("analysing the fine-tuned run: layer similarity to the convergence epoch",
             ["nnunet_transfer", "analyze", "evolution", "-d", TARGET_ID, "-c", TARGET_CONFIG, "-tr",
              "nnUNetTrainerFinetune", "-o", out / "analysis" / "evolution", "--seed", seed,
              "--patches", 8, "--no-progress"], "20_analyze_evolution.log")
        results["analysis"] = str(out / "analysis" / "evolution")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    say("")
    say(table)
    say(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}; logs in {logs}")
    return results


def _drift(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_table(rows: list[dict]) -> str:
    """Test Dice per strategy, training time, and how far encoder and decoder moved from where training
    started (‖θ − θ₀‖/‖θ₀‖, from each run's transfer_config.json): 0 for a frozen part, small when an L2-SP
    λ held it near the pretrained weights."""
    head = ("| strategy | trainer | test Dice (mean) | organ | lesion | train time [s] | encoder moved | "
            "decoder moved |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['strategy']} | `{r['trainer']}` | {r['dice_mean']:.3f} | "
             f"{r['dice_per_label']['organ']:.3f} | {r['dice_per_label']['lesion']:.3f} | "
             f"{r['train_seconds']:.0f} | {_drift(r['drift']['encoder'])} | {_drift(r['drift']['decoder'])} |"
             for r in rows]
    return "\n".join([head, *lines])
