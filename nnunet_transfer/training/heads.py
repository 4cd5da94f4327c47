"""Segmentation-head rows from a checkpoint (setting ``heads``): which target row comes from which source row.

nnU-Net's ``load_pretrained_weights`` skips every ``.seg_layers.`` key, so without this the heads always start
from nnU-Net's random initialisation. :func:`plan_heads` resolves the setting against both datasets' labels
(label value = output channel in nnU-Net) before any folder exists; :func:`copy_head_rows` writes the planned
rows into every deep-supervision head after nnU-Net loaded the rest. Pure torch + dataset.json dictionaries:
testable without a trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.checkpoints import is_seg_key
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.netutil import unwrap


@dataclass
class HeadPlan:
    """Which target output rows come from which source rows (label value = output channel in nnU-Net)."""

    mode: str  # "by-name" | "mapping"
    copied: list[dict[str, Any]]  # {"target", "target_value", "source", "source_value"}
    new: list[str]  # target labels that keep nnU-Net's initialisation
    #: why nothing was copied when ``by-name`` fell back to new heads (empty otherwise)
    fallback: str = ""

    def to_dict(self) -> dict:
        return {"mode": self.mode, "copied": self.copied, "new": self.new,
                **({"fallback": self.fallback} if self.fallback else {})}

    def text(self) -> str:
        pairs = ", ".join(f"{c['target']} <- {c['source']}" for c in self.copied) or "nothing"
        return (f"heads ({self.mode}): copied {pairs}; new: {', '.join(self.new) or 'none'}"
                + (f" ({self.fallback})" if self.fallback else ""))


def label_values(dataset_json: Mapping, side: str, *,
                 why: str = "transferring heads is defined for label-based training only (heads=new)"
                 ) -> dict[str, int]:
    """``{name: value}`` of a dataset.json's labels without ``ignore``; regions refused in one line (``why``)."""
    labels = dataset_json.get("labels") if isinstance(dataset_json, Mapping) else None
    if not isinstance(labels, Mapping):
        raise DataError(f"the {side} dataset.json has no 'labels'")
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"the {side} dataset uses regions ({name!r}: {list(value)}); {why}")
        if name == "ignore":
            continue
        out[str(name)] = int(value)
    return out


def _find(labels: dict[str, int], item: Any, side: str, where: str) -> tuple[str, int]:
    text = str(item).strip()
    if text in labels:
        return text, labels[text]
    if text.lstrip("-").isdigit() and int(text) in labels.values():
        value = int(text)
        return next(n for n, v in labels.items() if v == value), value
    raise ConfigError(f"setting 'heads': {side} label {text!r} does not exist in {where}; its labels are "
                      f"{dict(labels)}")


def plan_heads(heads: str | Mapping, source_json: Mapping | None, target_json: Mapping, *,
               checkpoint: str, fallback_new: bool = False) -> HeadPlan | None:
    """Resolve the ``heads`` setting to rows: ``None`` for ``new``; raises on names that do not exist.

    ``by-name`` with no label name in common raises, unless ``fallback_new``: then every head row starts new
    and the plan says why (strategies whose heads train copy the heads "when the labels agree")."""
    if heads == "new":
        return None
    target = label_values(target_json, "target")
    if source_json is None:
        if heads == "by-name" or any(not str(v).strip().isdigit() for v in dict(heads).values()):
            raise DataError(f"heads={heads if isinstance(heads, str) else 'a mapping by name'} needs the source's "
                            f"label names, but {checkpoint} holds no dataset.json (nnU-Net stores it in the "
                            f"checkpoint's init_args['dataset_json']); give the source labels by value, e.g. "
                            f"heads=organ:1, or a checkpoint written by nnUNetv2_train")
        source = {str(v): int(v) for v in dict(heads).values()}
    else:
        source = label_values(source_json, "source")
    copied = []
    if heads == "by-name":
        for name, value in target.items():
            if name in source:
                copied.append({"target": name, "target_value": value, "source": name, "source_value": source[name]})
        mode = "by-name"
    else:
        seen: dict[int, str] = {}
        for t, s in dict(heads).items():
            t_name, t_value = _find(target, t, "target", "the target's dataset.json")
            s_name, s_value = _find(source, s, "source", f"the checkpoint's dataset.json ({checkpoint})")
            if t_value in seen:
                raise ConfigError(f"setting 'heads': target label {t_name!r} is mapped twice ({seen[t_value]!r} "
                                  f"and {t!r})")
            seen[t_value] = str(t)
            copied.append({"target": t_name, "target_value": t_value, "source": s_name, "source_value": s_value})
        mode = "mapping"
    done = {c["target_value"] for c in copied}
    new = [n for n, v in sorted(target.items(), key=lambda kv: kv[1]) if v not in done]
    if not copied and mode == "by-name" and fallback_new:
        return HeadPlan(mode, [], new, fallback=f"the checkpoint's labels {sorted(source)} share no name with the "
                                                f"target's {sorted(target)}: every head row starts new")
    if not copied:
        raise ConfigError(f"heads=by-name: the checkpoint's labels {sorted(source)} and the target's "
                          f"{sorted(target)} share no name, so no head row can be transferred; map them "
                          f"explicitly (heads=TARGET:SOURCE,…) or use heads=new")
    return HeadPlan(mode, sorted(copied, key=lambda c: c["target_value"]), new)


def seg_head_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_seg_key(k)}


@torch.no_grad()
def copy_head_rows(network: nn.Module, source_heads: Mapping[str, torch.Tensor], plan: HeadPlan) -> list[str]:
    """Copy the source rows into every deep-supervision head; returns the tensors written."""
    params = dict(unwrap(network).named_parameters())
    written = []
    for name, p in params.items():
        if not is_seg_key(name):
            continue
        src = source_heads.get(name)
        if src is None or src.shape[1:] != p.shape[1:]:
            raise DataError(f"the checkpoint's segmentation head {name} has shape "
                            f"{None if src is None else tuple(src.shape)}, the network's {tuple(p.shape)}: "
                            f"only the number of labels (the first axis) may differ")
        for c in plan.copied:
            if c["source_value"] >= src.shape[0] or c["target_value"] >= p.shape[0]:
                raise DataError(f"label value {c['source_value']} / {c['target_value']} is not an output row of "
                                f"{name} ({src.shape[0]} rows in the checkpoint, {p.shape[0]} in the network)")
            p[c["target_value"]].copy_(src[c["source_value"]].to(p.device, p.dtype))
        written.append(name)
    return written


__all__ = ["HeadPlan", "plan_heads", "seg_head_state", "copy_head_rows", "label_values"]
