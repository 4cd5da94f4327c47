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
itself. An nnssl checkpoint (self-supervised; :mod:`nnunet_transfer.plans.nnssl`) is mapped instead of compared:
nnU-Net's loader is redirected to :func:`nnunet_transfer.plans.adapt.load_nnssl_encoder`, which loads its encoder
and stem and leaves the decoder and heads as nnU-Net initialised them. What the file brings is recorded
(:func:`nnunet_transfer.plans.provenance.transfer_record`): the per-block report of a ``weights adapt`` file or
of the nnssl mapping, or a plain same-plans load.

In-process use (a notebook building a trainer and calling nnU-Net's loader) has no command line: the
trainers then still detect a load from the weights themselves: :func:`weights_fingerprint` of the fresh
network in ``initialize`` against the one at ``on_train_start`` (:func:`weights_changed`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import LoadedWeights, canonical_key, compare, file_problems, load_weights
from nnunet_transfer.errors import ArchitectureError, TransferError
from nnunet_transfer.netutil import unique_named_parameters
from nnunet_transfer.plans.adapt import load_nnssl_encoder, map_checkpoint
from nnunet_transfer.plans.adapt_report import FROM_SOURCE
from nnunet_transfer.plans.provenance import source_param_names, transfer_record
from nnunet_transfer.plans.model_folder import resolve_checkpoint
from nnunet_transfer.training.heads import HeadPlan, plan_heads, seg_head_state


# --------------------------------------------------------------------------- detection without a command line
def weights_fingerprint(network: nn.Module) -> torch.Tensor:
    """One float64 per unique parameter tensor (sum + L1 norm): cheap, and any load of real weights changes it.

    Reductions run in the weights' own dtype: no copy of the network (a float64 cast of a 60 M-parameter net
    cost ~0.5 GB at start); equality is all :func:`weights_changed` needs."""
    with torch.no_grad():
        return torch.stack([p.detach().sum() + torch.linalg.vector_norm(p.detach(), 1)
                            for p in unique_named_parameters(network).values()]).double().cpu()


def weights_changed(fresh: torch.Tensor | None, network: nn.Module) -> bool:
    """Whether ``network`` holds other weights than when ``fresh`` (:func:`weights_fingerprint`) was taken:
    pretrained weights were loaded in between. False without a fresh fingerprint."""
    if fresh is None:
        return False
    return not torch.equal(fresh, weights_fingerprint(network))


@dataclass
class PretrainedFile:
    """A checked ``-pretrained_weights`` file: where it is and what of it the run will use."""

    given: str
    path: Path
    heads: HeadPlan | None = None
    source_heads: dict[str, torch.Tensor] = field(default_factory=dict)
    source_labels: dict | None = None
    #: what the file brings (nnunet_transfer.plans.provenance.transfer_record): a `weights adapt` report or a
    #: plain same-plans load
    transfer: dict | None = None
    #: the target network's blocks (names only), for strategies that refuse to freeze fresh parameters
    blocks: Any = None
    #: what loads the file in place of nnU-Net's ``load_pretrained_weights`` (``(network, path, verbose=)``), or
    #: None for nnU-Net's own: an nnssl checkpoint's encoder and stem only
    loader: Any = None

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


def planned_network(trainer_class, plans: dict, configuration: str, dataset_json: dict) -> nn.Module:
    """The network ``trainer_class`` builds for these plans, on the meta device: structure and shapes only."""
    with torch.device("meta"):
        return target_network(trainer_class, plans, configuration, dataset_json)


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
    if weights.is_nnssl:
        return _check_nnssl(given, weights, network, heads=heads, heads_fallback_new=heads_fallback_new,
                            dataset_json=dataset_json, target=f"{plans.get('dataset_name', '?')} / {configuration}")
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


def _check_nnssl(given: str, weights: LoadedWeights, network: nn.Module, *, heads: str | Mapping,
                 heads_fallback_new: bool, dataset_json: dict, target: str) -> PretrainedFile:
    """An nnssl checkpoint given to ``-pretrained_weights``: its encoder and stem will be loaded by
    :func:`nnunet_transfer.plans.adapt.load_nnssl_encoder` (the trainer redirects nnU-Net's loader to it), the
    rest keeps nnU-Net's initialisation; the record says so per block. It has no labels: ``heads=by-name`` of a
    strategy that falls back to new heads starts every row new (said in the log), any other ``heads`` is refused."""
    head_plan = None
    if heads == "by-name" and heads_fallback_new:
        labels = {str(k): v for k, v in (dataset_json.get("labels") or {}).items() if k != "ignore"}
        head_plan = HeadPlan("by-name", [], [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])],
                             fallback=f"the nnssl checkpoint {weights.path} was pretrained without labels: every "
                                      f"head row starts new")
    elif heads != "new":
        raise TransferError(f"heads={heads!r} copies segmentation-head rows from the checkpoint, but "
                            f"{weights.path} is an nnssl checkpoint, pretrained without labels; set heads=new")
    try:
        state, report = map_checkpoint(weights, network, source_label=str(weights.path), target_label=target)
    except TransferError as e:
        raise type(e)(f"-pretrained_weights {weights.path} (an nnssl checkpoint) cannot be mapped onto the {target} "
                      f"network: {e}") from None
    try:
        blocks = BlockModel.from_network(network)
    except ArchitectureError:
        blocks = None
    action = {t.name: t.action for t in report.tensors}
    loaded = sum(action.get(canonical_key(k)) in FROM_SOURCE for k in state)
    return PretrainedFile(given, weights.path, head_plan, {}, None,
                          transfer_record(weights, network, loaded_keys=loaded, report=report.to_dict()), blocks,
                          loader=load_nnssl_encoder)


__all__ = ["weights_fingerprint", "weights_changed", "PretrainedFile", "check_pretrained", "target_network",
           "planned_network", "frozen_not_from_source"]
