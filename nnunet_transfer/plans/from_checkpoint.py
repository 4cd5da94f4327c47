"""A target configuration for an nnssl checkpoint: ``plans from-checkpoint -d TARGET -c CKPT -n NAME``.

nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` writes a plans file whose configuration builds the
checkpoint's architecture with the patch size it recommends, for ``nnUNetv2_train_pretrained``. Here the
same configuration goes into the target's own plans file, as :mod:`nnunet_transfer.plans.configure` writes
one: ``NAME`` inherits a base configuration (``3d_fullres``) — its spacing, its normalisation (the target's
own) and its preprocessed data (same ``data_identifier``) — and states

* ``architecture``: the checkpoint's class and kwargs (:meth:`nnunet_transfer.plans.nnssl.NnsslPlan.architecture`),
* ``patch_size``: the checkpoint's ``recommended_downstream_patchsize`` unless ``--patch-size`` is given,
* ``batch_size``: 2, as ``preprocess_like_nnssl`` sets it, unless ``--batch-size`` is given,

so that the stock ``nnUNetv2_preprocess`` and ``nnUNetv2_train -tr <strategy> -pretrained_weights CKPT`` run on
it. Before anything is written the network is built from the new configuration and the checkpoint's encoder
mapped onto it (:func:`nnunet_transfer.plans.adapt.map_checkpoint`): a configuration that could not load it is
never written.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from nnunet_transfer.blocks import layout_from_architecture
from nnunet_transfer.checkpoints import load_weights
from nnunet_transfer.config import PLANS_KEY, TransferConfig
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import build_network, dataset_name, load_dataset_json, load_json, plans_path
from nnunet_transfer.plans.adapt import map_checkpoint
from nnunet_transfer.plans.adapt_report import AdaptReport
from nnunet_transfer.plans.configure import _NAME, _parse_ints, check_specs, resolved_configuration, write_plans
from nnunet_transfer.plans.model_folder import resolve_checkpoint
from nnunet_transfer.plans.nnssl import NnsslPlan, plan_of

#: nnU-Net master's ``preprocess_like_nnssl`` sets this batch size
NNSSL_BATCH_SIZE = 2


@dataclass
class FromCheckpointResult:
    plans_file: Path
    backup: Path | None
    configuration: str
    base: str
    plan: NnsslPlan
    patch_size: list[int]
    batch_size: int
    report: AdaptReport
    next_commands: list[str] = field(default_factory=list)

    def text(self) -> str:
        out = [f"configuration {self.configuration!r} (inherits {self.base!r}: its spacing, normalisation and "
               f"preprocessed data) written to {self.plans_file}"
               + (f" (previous file kept as {self.backup.name})" if self.backup else ""),
               self.plan.summary(),
               f"architecture {self.plan.network_class_name}, patch size {self.patch_size}, batch size "
               f"{self.batch_size}",
               f"-pretrained_weights with this package's trainers loads the encoder and stem: "
               f"{self.report.share:.1%} of the {self.report.params:,} parameters outside the heads; the decoder "
               f"and heads start fresh"]
        out += [f"note: {n}" for n in self.plan.notes]
        out.append("next:")
        out += [f"  {c}" for c in self.next_commands]
        return "\n".join(out)


def divisor(plan: NnsslPlan) -> list[int]:
    """Per axis, what a patch size must be divisible by: the product of the network's strides (a Primus: its
    patch embedding)."""
    if plan.is_primus:
        return plan.patch_embed_size
    strides = plan.arch_kwargs["strides"]
    dims = plan.spatial_dims
    per_stage = [[s] * dims if isinstance(s, int) else list(s) for s in strides]
    return [math.prod(int(s[a]) for s in per_stage) for a in range(dims)]


def check_patch(patch: list[int], plan: NnsslPlan) -> None:
    div = divisor(plan)
    bad = [a for a, (p, d) in enumerate(zip(patch, div)) if p % d]
    if bad:
        fix = [max(d, round(p / d) * d) for p, d in zip(patch, div)]
        how = f"the patch embedding is {div}" if plan.is_primus else f"the network downsamples by {div}"
        raise ConfigError(f"--patch-size {','.join(map(str, patch))}: axis {bad[0]} is not divisible by {div[bad[0]]} "
                          f"({how}); e.g. --patch-size {','.join(map(str, fix))}")


def from_checkpoint(dataset: str | int, checkpoint: str | Path, name: str, *, base: str = "3d_fullres",
                    plans_identifier: str = "nnUNetPlans", patch_size: Any = None, batch_size: int | None = None,
                    settings: Mapping[str, Any] | None = None, force: bool = False) -> FromCheckpointResult:
    """Write configuration ``name`` for the nnssl ``checkpoint`` into the target's plans (see the module
    docstring); nothing is written when a check fails."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"configuration name {name!r} may only hold letters, digits, '_', '.' and '-'")
    path = plans_path(dataset, plans_identifier)
    plans = load_json(path)
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise DataError(f"{path} does not look like nnU-Net plans (no 'configurations')")
    configs = plans["configurations"]
    if base not in configs:
        raise ConfigError(f"base configuration {base!r} is not in {path.name}; available: {sorted(configs)}")
    if name == base:
        raise ConfigError(f"the new configuration must have a name of its own, got {name!r} = --base")
    if name in configs and not force:
        raise ConfigError(f"configuration {name!r} already exists in {path.name}; pass --force to replace it")
    ckpt = resolve_checkpoint(checkpoint)
    weights = load_weights(ckpt)
    if not weights.is_nnssl:
        raise ConfigError(f"{ckpt} is not an nnssl checkpoint (it has no 'nnssl_adaptation_plan'); for an nnU-Net "
                          f"checkpoint give the target the source's plans (nnunet_transfer plans transfer -s SOURCE "
                          f"-t TARGET) or map it onto the target's (nnunet_transfer weights adapt)")
    plan = plan_of(weights)
    base_conf = resolved_configuration(plans, base)
    if len(base_conf.get("patch_size", [])) != plan.spatial_dims:
        raise ConfigError(f"base configuration {base!r} is {len(base_conf.get('patch_size', []))}-D, the checkpoint's "
                          f"network {plan.spatial_dims}-D; choose a {plan.spatial_dims}-D base with --base (e.g. "
                          f"3d_fullres)")
    patch = _parse_ints(patch_size, "--patch-size", plan.spatial_dims) or list(plan.recommended_downstream_patchsize)
    check_patch(patch, plan)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    batch = NNSSL_BATCH_SIZE if batch_size is None else batch_size
    conf: dict[str, Any] = {"inherits_from": base, "architecture": plan.architecture(), "patch_size": patch,
                            "batch_size": batch}
    if settings:
        merged = {**base_conf.get(PLANS_KEY, {}), **settings}
        TransferConfig.from_mapping(merged)  # a typo fails now, not at the start of training
        check_specs(merged, layout_from_architecture(conf["architecture"]), where=f"configuration {name!r}")
        conf[PLANS_KEY] = merged
    out = copy.deepcopy(plans)
    out["configurations"][name] = conf
    target = f"{dataset_name(dataset)} / {plans_identifier} / {name}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_network(out, name, load_dataset_json(dataset))
    _, report = map_checkpoint(weights, network, source_label=str(ckpt), target_label=target)
    del network
    backup = write_plans(path, out)
    ds = dataset_name(dataset)
    p = "" if plans_identifier == "nnUNetPlans" else f" -p {plans_identifier}"
    pn = "" if plans_identifier == "nnUNetPlans" else f" -plans_name {plans_identifier}"
    commands = [f"nnUNetv2_preprocess -d {ds}{pn} -c {name}   # only if {base!r} is not preprocessed yet "
                f"(same data)",
                f"nnUNetv2_train {ds} {name} 0{p} -tr nnUNetTrainerFinetune_warmup -pretrained_weights {ckpt}   "
                f"# nnU-Net master's recipe; or any strategy, e.g. -tr nnUNetTrainerFrozenEncoder"]
    return FromCheckpointResult(path, backup, name, base, plan, patch, batch, report, commands)


__all__ = ["NNSSL_BATCH_SIZE", "FromCheckpointResult", "divisor", "check_patch", "from_checkpoint"]
