"""Partial labels: a target that does not annotate some of the source's classes (the marginal loss).

A target dataset that adds a class to a trained model rarely labels the classes the model already knows: its
label map calls them background. Trained on that, the network learns to *erase* them. Declared as
``unannotated`` (the setting, or ``"unannotated": [...]`` in the target's ``dataset.json``), those classes are
merged with background inside the loss: a voxel labelled background may be background *or* any unannotated
class, so the loss sees the summed probability ``p(background) + Σ_u p(u)`` (the marginal loss of Shi et al.,
MedIA 2021, "Marginal loss and exclusion loss for partially supervised multi-organ segmentation").

:class:`MarginalLoss` wraps nnU-Net's own loss (``DC_and_CE_loss``, under its ``DeepSupervisionWrapper`` or not):
every output's logits are reduced to the merged classes first — the merged channel is ``logsumexp`` of the merged
logits, so its softmax is exactly the summed probability and nnU-Net's CE and soft Dice run unchanged on it — and
the target values are renumbered to the reduced channels. The network keeps every output channel (source
classes + new ones), so the target's ``dataset.json`` lists the union of the labels, the old classes under their
source names and values (they simply never occur in its label maps). Pure torch + dataset.json dictionaries.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from nnunet_transfer.errors import ConfigError

#: the key of a target ``dataset.json`` that names the classes its label maps do not annotate
DATASET_JSON_KEY = "unannotated"


def _label_values(dataset_json: Mapping) -> dict[str, int]:
    labels = dataset_json.get("labels") if isinstance(dataset_json, Mapping) else None
    if not isinstance(labels, Mapping):
        raise ConfigError("the target dataset.json has no 'labels'")
    return {str(k): v for k, v in labels.items()}


def declared_unannotated(setting: Sequence[str] | None, dataset_json: Mapping) -> tuple[list[str], str]:
    """The declared names and where they come from: the setting ``unannotated`` wins over ``dataset.json``'s
    ``"unannotated"``; ``([], "")`` when neither declares any."""
    if setting is not None:
        return list(setting), "setting 'unannotated'"
    value = dataset_json.get(DATASET_JSON_KEY) if isinstance(dataset_json, Mapping) else None
    if value is None:
        return [], ""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"the target dataset.json's {DATASET_JSON_KEY!r} must be a list of label names, got "
                          f"{value!r}; e.g. \"{DATASET_JSON_KEY}\": [\"organ\", \"lesion\"]")
    return list(value), f"dataset.json {DATASET_JSON_KEY!r}"


def resolve_unannotated(names: Sequence[str], where: str, dataset_json: Mapping,
                        source_labels: Mapping | None = None) -> dict[str, int]:
    """``{name: label value}`` of the declared unannotated classes, checked against the target's labels and (when
    known) the source checkpoint's: each must be a non-background label of both, by name; region-based targets
    are refused. Raises :class:`ConfigError` (one line)."""
    if not names:
        return {}
    labels = _label_values(dataset_json)
    regions = [n for n, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        raise ConfigError(f"{where} declares unannotated classes {list(names)}, but the target uses regions "
                          f"({regions[0]!r}: {list(labels[regions[0]])}); the marginal loss merges label "
                          f"probabilities of a softmax and is defined for label-based training only: remove "
                          f"{where} or train with labels instead of regions")
    out: dict[str, int] = {}
    for name in names:
        if name not in labels or name == "ignore":
            raise ConfigError(f"{where}: unannotated class {name!r} is not a label of the target dataset.json "
                              f"(its labels: {sorted(labels)}); the target's dataset.json must list every class the "
                              f"network outputs — the source's classes by their source names and values, plus the "
                              f"new ones — so add {name!r} there or remove it from {where}")
        if labels[name] == 0:
            raise ConfigError(f"{where}: {name!r} is the background (value 0), which is always merged; name the "
                              f"source classes the target does not annotate")
        if name in out:
            raise ConfigError(f"{where}: unannotated class {name!r} is named twice")
        out[name] = int(labels[name])
    if source_labels is not None:
        unknown = [n for n in out if n not in source_labels]
        if unknown:
            raise ConfigError(f"{where}: unannotated class(es) {unknown} unknown to the source checkpoint, whose "
                              f"labels are {sorted(map(str, source_labels))}; an unannotated class is one the "
                              f"source model knows and the target does not label: check the names")
    if len(out) >= len([v for v in labels.values() if v != 0]) and "ignore" not in labels:
        raise ConfigError(f"{where}: every foreground class of the target {sorted(out)} is declared unannotated, "
                          f"so its label maps would teach nothing but background; leave at least one annotated")
    return out


class MarginalLoss(nn.Module):
    """nnU-Net's loss on logits whose background and unannotated channels are merged into one.

    ``merged``: the label values merged into background (0 first). For each output (a tensor, or the list of
    deep-supervision outputs) the reduced logits are ``[logsumexp(z_merged), z_kept...]``, kept = every other
    channel in order; target values are renumbered to their channel among the reduced ones (values outside
    ``num_classes``, nnU-Net's ignore label, stay as they are). A target value of a merged class other than
    background would be a label that was declared unannotated: it is read as background.
    """

    def __init__(self, loss: nn.Module, num_classes: int, merged: Sequence[int]):
        super().__init__()
        merged = sorted(set(int(v) for v in merged) | {0})
        if any(v < 0 or v >= num_classes for v in merged):
            raise ValueError(f"merged values {merged} outside 0..{num_classes - 1}")  # programming error
        self.loss = loss
        self.num_classes = num_classes
        self.merged = merged
        self.kept = [c for c in range(num_classes) if c not in merged]
        lookup = torch.arange(max(num_classes, 256))
        for c in merged:
            lookup[c] = 0
        for i, c in enumerate(self.kept, 1):
            lookup[c] = i
        self.register_buffer("lookup", lookup, persistent=False)
        self.register_buffer("merged_index", torch.tensor(merged), persistent=False)
        self.register_buffer("kept_index", torch.tensor(self.kept, dtype=torch.long), persistent=False)

    def reduce_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``(b, C, ...)`` logits -> ``(b, 1 + len(kept), ...)``: the merged channel first, then the kept ones."""
        merged = torch.logsumexp(logits.index_select(1, self.merged_index.to(logits.device)), dim=1, keepdim=True)
        return torch.cat([merged, logits.index_select(1, self.kept_index.to(logits.device))], dim=1)

    def reduce_target(self, target: torch.Tensor) -> torch.Tensor:
        lookup = self.lookup.to(target.device)
        return lookup[target.long()].to(target.dtype)

    def forward(self, output, target):
        if isinstance(output, (list, tuple)):
            return self.loss([self.reduce_logits(o) for o in output], [self.reduce_target(t) for t in target])
        return self.loss(self.reduce_logits(output), self.reduce_target(target))


__all__ = ["DATASET_JSON_KEY", "declared_unannotated", "resolve_unannotated", "MarginalLoss"]
