"""The inputs of ``compare``: one arm's evaluated results (an ``evaluate`` folder) and what its run says of
itself (trainable share, time to convergence from the checkpoint's log).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.convergence import CONVERGENCE_TOLERANCE, log_convergence
from nnunet_transfer.experiments.evaluate import PER_CASE, SUMMARY, find_run, read_per_case


@dataclass
class ArmResults:
    """The evaluated results of one arm of the comparison: one EVAL folder (``evaluate``'s per-case rows and
    summary) under its name, and the run it evaluated."""

    name: str
    folder: Path
    rows: list[dict]
    summary: dict
    run: Path | None = None
    run_info: dict | None = None

    @property
    def cases(self) -> list[str]:
        return sorted({r["case"] for r in self.rows})

    @property
    def labels(self) -> list[int]:
        return sorted({int(r["label"]) for r in self.rows})


def parse_evals(items: Sequence[str | Path | tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """``name=path`` / ``path`` (named by its folder) / ``(name, path)`` -> ``[(name, path)]``, names unique."""
    out = []
    for item in items:
        if isinstance(item, tuple):
            name, path = item
        else:
            text = str(item)
            name, sep, path = text.partition("=")
            if not sep or not name or "/" in name:
                name, path = Path(text).name, text
        out.append((str(name), Path(path)))
    if not out:
        raise DataError("compare needs at least two EVAL folders (outputs of nnunet_transfer evaluate)")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"several EVAL folders are named {', '.join(map(repr, dup))}; name them: NAME=PATH, "
                        f"e.g. scratch=runs/a/eval finetune=runs/b/eval")
    if len(out) < 2:
        raise DataError(f"compare needs at least two EVAL folders, got one ({out[0][1]})")
    return out


def run_info(fold: Path, *, tolerance: float | None = None) -> dict:
    """Trainable share and time to convergence of one run (fold folder)."""
    info: dict[str, Any] = {"run": str(fold), "trainer": None, "trainable": None, "total": None,
                            "trainable_share": None, "checkpoint": None, "convergence": None}
    cfg = fold / "transfer_config.json"
    if cfg.is_file():
        try:
            content = json.loads(cfg.read_text())
        except ValueError:
            raise DataError(f"{cfg} is not valid JSON") from None
        params = content.get("parameters") or {}
        info["trainer"] = content.get("trainer")
        if params.get("total"):
            info.update(trainable=int(params["trainable"]), total=int(params["total"]),
                        trainable_share=params["trainable"] / params["total"])
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        ckpt = fold / name
        if ckpt.is_file():
            from nnunet_transfer.checkpoints import read_checkpoint  # lazy: torch; `--help` imports this module

            content = read_checkpoint(ckpt)  # a truncated file or one that would run code: one line naming it
            logging = content.get("logging") if isinstance(content, dict) else None
            if not logging:
                raise DataError(f"checkpoint {ckpt} has no training log ('logging'); is it an nnU-Net checkpoint?")
            info["checkpoint"] = name
            info["trainer"] = info["trainer"] or content.get("trainer_name")
            # nnU-Net logs numpy scalars (np.float32), which first_within does not count as numbers
            logging = {k: [v.item() if isinstance(v, np.generic) else v for v in vals]
                       if isinstance(vals, (list, tuple)) else vals for k, vals in logging.items()}
            conv = log_convergence(logging, tolerance=CONVERGENCE_TOLERANCE if tolerance is None else tolerance)
            conv["epochs"] = len(conv["curve"])
            info["convergence"] = conv
            break
    return info


def load_arm_results(name: str, folder: Path) -> ArmResults:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"EVAL folder {folder} ({name}) does not exist")
    rows = read_per_case(folder / PER_CASE)
    summary_path = folder / SUMMARY
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found; is {folder} an output folder of nnunet_transfer evaluate?")
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError:
        raise DataError(f"{summary_path} is not valid JSON") from None
    if not rows:
        raise DataError(f"{folder / PER_CASE} holds no cases")
    run = Path(summary["run"]) if summary.get("run") else find_run(folder)
    if run is not None and not run.is_dir():
        raise DataError(f"{summary_path} names the run {run}, which does not exist; re-run evaluate with --run, "
                        f"or move the run back")
    return ArmResults(name=name, folder=folder, rows=rows, summary=summary, run=run)
