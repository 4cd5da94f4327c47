"""What a run records about itself: its parameter counts, its start lines in the log, and ``transfer_config.json``.

``transfer_config.json`` (:data:`CONFIG_FILE`) sits in the fold folder and holds::

    {"trainer", "configuration", "settings" (all), "settings_used" (the keys this trainer reads),
     **transfer_state}   # pretrained_loaded, pretrained_source, transfer, parameters, heads, not_transferred,
                         # stopping, drift and a strategy's own entries

A trainer writes it at the start of training and again at the end once the early-stopping verdict and the drift
are known; ``compare``, ``study report`` and the demo read it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.plans.provenance import record_text
from nnunet_transfer.policies.freezing import FreezeReport
from nnunet_transfer.training.not_transferred import not_transferred_text

CONFIG_FILE = "transfer_config.json"


def all_trainable_counts(params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """``transfer_state["parameters"]`` when everything trains."""
    total = sum(p.numel() for p in params)
    return {"trainable": total, "frozen": 0, "total": total, "trainable_blocks": "all"}


def parameter_counts(report: FreezeReport, model: BlockModel, names: set[str]) -> dict[str, Any]:
    """``transfer_state["parameters"]`` after freezing: scalars, the blocks (numbers) that train or are frozen as a
    whole, the halves that train within a block that does not, and whether the heads train (``names``: what
    trains)."""
    return {"trainable": report.n_trainable_scalars, "frozen": report.n_frozen_scalars,
            "total": report.n_trainable_scalars + report.n_frozen_scalars,
            "trainable_blocks": [b.number for b in model.blocks if set(b.param_names) <= names],
            "frozen_blocks": [b.number for b in model.blocks if not set(b.param_names) & names],
            "trainable_halves": [h for b in model.blocks for h, _, pn, _ in b.halves
                                 if pn and set(pn) <= names and not set(b.param_names) <= names],
            "seg_trainable": set(model.seg_param_names) <= names}


def settings_line(trainer: str, settings: Mapping[str, Any], used: Iterable[str]) -> str:
    """The log line of the effective settings a trainer reads."""
    used = set(used)
    return (f"nnunet_transfer settings ({trainer}): "
            + json.dumps({k: v for k, v in settings.items() if k in used}, sort_keys=True))


def start_lines(state: Mapping[str, Any]) -> list[str]:
    """What the log says when training starts (``state``: ``transfer_state``): where the weights came from, what
    the transfer brought, how much trains, and what did not come from the source."""
    lines = []
    if state["pretrained_loaded"]:
        heads = state.get("heads")
        what = ("all layers but the segmentation heads" if not heads or not heads["copied"] else
                f"all layers; segmentation-head rows of {', '.join(c['target'] for c in heads['copied'])} "
                f"from the checkpoint")
        if (state.get("transfer") or {}).get("origin") == "nnssl":
            what = "the encoder and stem of an nnssl checkpoint; the decoder and heads as nnU-Net initialised them"
        source = state["pretrained_source"]
        lines.append(f"pretrained weights loaded{' from ' + source if source else ''} ({what})")
        if state.get("transfer"):
            lines.append(record_text(state["transfer"]))
    else:
        lines.append("no pretrained weights were loaded; the network starts from its random initialisation")
    p = state["parameters"]
    lines.append(f"trainable parameters {p['trainable']:,} of {p['total']:,} (frozen {p['frozen']:,})")
    nt = not_transferred_text(state.get("not_transferred"))
    if nt:
        lines.append(nt)
    return lines


def drift_line(drift: Mapping[str, float | None]) -> str:
    """The log line of the drift from the start (parts whose drift is unknown are left out)."""
    return ("moved from the start, ||theta - theta_0|| / ||theta_0||: "
            + ", ".join(f"{k} {v:.4g}" for k, v in drift.items() if v is not None))


def config_file_content(*, trainer: str, configuration: str, settings: dict, settings_used: list[str],
                        transfer_state: Mapping[str, Any]) -> dict:
    return {"trainer": trainer, "configuration": configuration, "settings": settings, "settings_used": settings_used,
            **transfer_state}


def write_config_file(folder: str | Path, content: Mapping[str, Any]) -> Path:
    """Write :data:`CONFIG_FILE` into ``folder`` whole or not at all."""
    return write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(content, indent=2, sort_keys=True))
