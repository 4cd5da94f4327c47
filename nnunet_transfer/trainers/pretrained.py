"""What a trainer knows about ``-pretrained_weights`` before nnU-Net loads them.

nnU-Net never tells a trainer which file it will load; ``nnUNetv2_train`` only calls ``initialize()``
and then ``load_pretrained_weights(network, file)``, which asserts on the first incompatible key and
prints both tensors. Our trainers read the file name from the command line (the same ``sys.argv`` the
process was started with, :func:`nnunet_transfer.runtime.nnunet_train_args`) in ``__init__``, *before*
nnU-Net creates the fold folder, and

* check the file against the network the plans build, under nnU-Net's own rules
  (:func:`nnunet_transfer.checkpoints.compare`): a missing, corrupt, truncated or incompatible file is
  one message naming the file and every mismatch by name and shape, never tensor values; a file whose
  pickle asks for more than a checkpoint holds (e.g. ``os.system``) is refused before nnU-Net's own
  ``torch.load(weights_only=False)`` would run it (:func:`nnunet_transfer.checkpoints.read_checkpoint`);
* plan which segmentation-head rows to transfer (setting ``heads``): nnU-Net skips ``.seg_layers.``,
  so without this the heads always start from random weights.

A folder given to ``-pretrained_weights`` (a fold folder or an installed model folder, see
:mod:`nnunet_transfer.plans.model_folder`) is resolved to its ``checkpoint_final.pth``; nnU-Net's loader
is then handed that file (see :func:`nnunet_transfer.runtime.redirect_nnunet_loader`), because it would ``torch.load`` the folder
itself. What the file brings is recorded (:func:`nnunet_transfer.plans.adapt.transfer_record`): the
per-block report of a ``weights adapt`` file, or a plain same-plans load.

In-process use (a notebook building a trainer and calling nnU-Net's loader) has no command line: the
trainers then still detect a load from the weights themselves (the fingerprint in ``base.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import LoadedWeights, compare, file_problems, is_seg_key, load_weights
from nnunet_transfer.errors import ArchitectureError, ConfigError, DataError, TransferError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.plans.adapt import source_param_names, transfer_record
from nnunet_transfer.plans.model_folder import resolve_checkpoint  # noqa: F401 - part of this module's API


# --------------------------------------------------------------------------- heads
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


def _labels(dataset_json: Mapping, side: str) -> dict[str, int]:
    labels = dataset_json.get("labels") if isinstance(dataset_json, Mapping) else None
    if not isinstance(labels, Mapping):
        raise DataError(f"the {side} dataset.json has no 'labels'")
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"the {side} dataset uses regions ({name!r}: {list(value)}); transferring heads "
                              f"is defined for label-based training only (heads=new)")
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
    target = _labels(target_json, "target")
    if source_json is None:
        if heads == "by-name" or any(not str(v).strip().isdigit() for v in dict(heads).values()):
            raise DataError(f"heads={heads if isinstance(heads, str) else 'a mapping by name'} needs the source's "
                            f"label names, but {checkpoint} holds no dataset.json (nnU-Net stores it in the "
                            f"checkpoint's init_args['dataset_json']); give the source labels by value, e.g. "
                            f"heads=organ:1, or a checkpoint written by nnUNetv2_train")
        source = {str(v): int(v) for v in dict(heads).values()}
    else:
        source = _labels(source_json, "source")
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


# --------------------------------------------------------------------------- the whole check
@dataclass
class PretrainedFile:
    """A checked ``-pretrained_weights`` file: where it is and what of it the run will use."""

    given: str
    path: Path
    heads: HeadPlan | None = None
    source_heads: dict[str, torch.Tensor] = field(default_factory=dict)
    source_labels: dict | None = None
    #: what the file brings (nnunet_transfer.plans.adapt.transfer_record): a `weights adapt` report or a
    #: plain same-plans load
    transfer: dict | None = None
    #: the target network's blocks (names only), for strategies that refuse to freeze fresh parameters
    blocks: Any = None

    def to_dict(self) -> dict:
        return {"given": self.given, "path": str(self.path),
                "heads": self.heads.to_dict() if self.heads else None}


def frozen_not_from_source(checked: PretrainedFile, trainable_spec: str | None) -> dict[int, list[str]]:
    """Blocks that ``trainable_spec`` leaves (partly) frozen and that hold parameters which did not come from
    the checkpoint (re-initialised, not transferable or new in a `weights adapt` report): ``{block: names}``."""
    if trainable_spec is None or checked.blocks is None:
        return {}
    # the decision every strategy uses (L2-SP's anchor, LoRA's adapters, what norm-only / BitFit / stages train)
    source = source_param_names(checked.transfer, checked.blocks.all_param_names)
    if source is None:
        return {}
    trainable = checked.blocks.param_names(trainable_spec)
    out = {}
    for block in checked.blocks.blocks:
        frozen = [n for n in block.param_names if n not in source and n not in trainable]
        if frozen:
            out[block.number] = frozen
    return out


def target_network(trainer_class, plans: dict, configuration: str, dataset_json: dict) -> nn.Module:
    """The network ``trainer_class`` builds for these plans (nnU-Net's own calls, CPU, random init)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
    cm = pm.get_configuration(configuration)
    return trainer_class.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset_json),
        pm.get_label_manager(dataset_json).num_segmentation_heads, True)


def incompatibility_message(weights: LoadedWeights, problems: list[str], mismatches, *, target: str) -> str:
    lines = [f"-pretrained_weights {weights.path} cannot be loaded into the {target} network:"]
    lines += [f"  file   {p}" for p in problems]
    lines += ["  " + m.line() for m in mismatches]
    lines.append("fix: check it with `nnunet_transfer weights check FILE -d DATASET -c CONFIG`; train the target "
                 "with the source's plans (`nnunet_transfer plans transfer -s SOURCE -t TARGET`, then "
                 "nnUNetv2_preprocess), or rewrite the checkpoint for these plans (`nnunet_transfer weights "
                 "adapt FILE -d TARGET -c CONFIG -o OUT`)")
    return "\n".join(lines)


def check_pretrained(given: str, *, trainer_class, plans: dict, configuration: str, dataset_json: dict,
                     heads: str | Mapping = "new", heads_fallback_new: bool = False) -> PretrainedFile:
    """Everything that can be said about the file before nnU-Net loads it; raises :class:`TransferError`.
    ``heads_fallback_new``: see :func:`plan_heads`."""
    path = resolve_checkpoint(given, what="pretrained weights")
    weights = load_weights(path)
    network = target_network(trainer_class, plans, configuration, dataset_json)
    comparison = compare(weights.state, network)
    problems = file_problems(weights)
    if problems or comparison.blocking:
        raise TransferError(incompatibility_message(weights, problems, comparison.blocking,
                                                    target=f"{plans.get('dataset_name', '?')} / {configuration}"))
    plan = plan_heads(heads, weights.dataset_json, dataset_json, checkpoint=str(path),
                      fallback_new=heads_fallback_new)
    heads_state = seg_head_state(weights.state) if plan is not None else {}
    try:
        blocks = BlockModel.from_network(network)
    except ArchitectureError:  # other architectures load fine; only block-wise reports need blocks
        blocks = None
    return PretrainedFile(given, path, plan, heads_state,
                          dict(weights.dataset_json.get("labels", {})) if weights.dataset_json else None,
                          transfer_record(weights, network, loaded_keys=comparison.loaded_keys), blocks)


__all__ = ["resolve_checkpoint", "HeadPlan",
           "plan_heads", "copy_head_rows", "PretrainedFile", "check_pretrained", "target_network",
           "frozen_not_from_source"]
