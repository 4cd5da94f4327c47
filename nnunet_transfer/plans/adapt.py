"""Pretrained weights for a target planned its own way: ``weights adapt CKPT -d TARGET -c CONFIG``.

nnU-Net plans every dataset for itself: an anisotropic MRI target gets 1×3×3 kernels where an isotropic
CT source has 3×3×3, a smaller target fewer stages, a larger one more. ``-pretrained_weights`` then
asserts on the first shape that differs. :func:`adapt_state` writes, for the network the *target's* plans
build, a state dict that ``-pretrained_weights`` accepts, and says per block what came from the source.

Correspondence
--------------
Both networks are U-Nets of dynamic-network-architectures; tensors are matched by canonical name
(:func:`nnunet_transfer.checkpoints.canonical_key`) after aligning stages **by resolution**:

* encoder stage ``s`` ↔ source encoder stage ``s`` (stage 0 works at full resolution);
* decoder index ``j`` of a target with ``N_t`` stages ↔ source decoder index ``j + N_s − N_t`` (decoder
  index 0 is the deepest; both then work at resolution level ``N_t − 2 − j``), for ``decoder.stages``,
  ``decoder.transpconvs`` and ``decoder.seg_layers``.

Extra target stages (deeper than the source's) have no counterpart and keep nnU-Net's initialisation
(built with ``torch.manual_seed(seed)``); source stages deeper than the target's are dropped. With fewer
target stages the target's bottleneck is the source's encoder stage of the same level.

The rules live by job: what each target tensor gets and the report (:mod:`.adapt_report`), the kernel
rules (:mod:`.kernels`), the architecture family check (:mod:`.family`); what a trainer records of the
file it loads is :mod:`.provenance`.

Refusals (nothing written)
--------------------------
Another architecture family (plain ↔ residual encoder, 2-D ↔ 3-D, not a U-Net): the encoders are built
from different modules, so nothing of them is transferable — one message naming both. A target whose
every stage differs in width (no parameter outside the heads from the source). A share below
``min_share``. A first convolution with another channel count and no ``--in-channels``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.blocks import BlockModel, is_primus
from nnunet_transfer.checkpoints import (ADAPTED_KEY, LoadedWeights, alias_groups, canonical_key, is_seg_key,
                                         load_into, load_weights)
from nnunet_transfer.errors import ArchitectureError, ConfigError, DataError, TransferError
from nnunet_transfer.fileio import atomic_path, save_atomic
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.nnunet_io import build_network, dataset_name, load_dataset_json, load_plans
from nnunet_transfer.plans.adapt_report import FRESH, FROM_SOURCE, AdaptReport, BlockRow, TensorAction, stage_module
from nnunet_transfer.plans.family import _n_stages, check_family
from nnunet_transfer.plans.kernels import KernelRuleError, describe_kernel_change, map_kernel
from nnunet_transfer.plans.model_folder import resolve_checkpoint
from nnunet_transfer.plans.nnssl import NnsslPlan, encoder_tensors, in_encoder, plan_of
from nnunet_transfer.plans.primus import map_primus_state, token_grid
from nnunet_transfer.plans.weights import METHODS, WeightsReport, adapt_first_conv, check_weights, find_first_conv

_DECODER = re.compile(r"^decoder\.(stages|transpconvs|seg_layers)\.(\d+)\.(.*)$")


def source_name_for(target_name: str, *, offset: int) -> str | None:
    """The source tensor aligned by resolution with a target tensor (``offset = N_s − N_t``)."""
    m = _DECODER.match(target_name)
    if not m:
        return target_name
    j = int(m.group(2)) + offset
    return None if j < 0 else f"decoder.{m.group(1)}.{j}.{m.group(3)}"


def _tensor_rule(name: str, s: torch.Tensor, t: torch.Tensor) -> tuple[str, str, torch.Tensor | None]:
    """``(action, reason, value)`` for a target tensor ``t`` with a source counterpart ``s`` (value None: the
    fresh initialisation)."""
    if s.shape == t.shape:
        return "copied", "", s.detach().clone().to(t.dtype)
    if not (name.endswith(".weight") and t.ndim >= 3 and s.ndim == t.ndim):
        return "not_transferable", f"width {list(s.shape)} vs {list(t.shape)}", None
    transposed = name.startswith("decoder.transpconvs.")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)  # ConvTranspose weights are (in, out, *k)
    if s.shape[out_dim] != t.shape[out_dim]:
        return "not_transferable", f"output width {s.shape[out_dim]} vs {t.shape[out_dim]}", None
    if s.shape[in_dim] != t.shape[in_dim]:
        return "reinit", f"input width {s.shape[in_dim]} vs {t.shape[in_dim]}", None
    try:
        mapped = map_kernel(s, kernel=t.shape[2:], transposed=transposed)
    except KernelRuleError as e:
        return "not_transferable", str(e), None
    return "mapped", describe_kernel_change(s.shape[2:], t.shape[2:], transposed=transposed), mapped.to(t.dtype)


def _block_rows(model: BlockModel, actions: Mapping[str, TensorAction]) -> tuple[list[BlockRow], dict[str, Any]]:
    """Per block of ``model``, the parameters by action; and the heads' summary."""
    param_action = {n: actions[n] for n in model.all_param_names if n in actions}
    rows = []
    for b in model.blocks:
        counts: dict[str, int] = {}
        mods: list[str] = []
        names = [n for n in b.param_names if n in param_action]
        for n in names:
            a = param_action[n]
            counts[a.action] = counts.get(a.action, 0) + a.numel
            if a.action in FROM_SOURCE and a.source and stage_module(a.source) not in mods:
                mods.append(stage_module(a.source))
        rows.append(BlockRow(b.number, b.group, sum(param_action[n].numel for n in names), counts, mods,
                             [n for n in names if param_action[n].action in FRESH]))
    carried = sum(param_action[n].reason == "source rows carried" for n in model.seg_param_names
                  if n in param_action)
    return rows, {"params": model.n_seg_params, "tensors": len(model.seg_param_names), "carried": carried}


def adapt_state(source: Mapping[str, torch.Tensor], network: nn.Module, *, in_channels: int | None = None,
                method: str = "repeat", seed: int = 0, source_label: str = "checkpoint",
                target_label: str = "target", source_class: str | None = None, encoder_only: bool = False
                ) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """The target network's full ``state_dict`` (every alias) filled from ``source`` by the rules of
    :mod:`.adapt_report` (what each tensor gets) and :mod:`.kernels`.

    ``network`` is the target network as nnU-Net builds it (its current values are the fresh
    initialisation that new / re-initialised tensors keep). ``source`` is a prefix-stripped state dict.
    """
    net = unwrap(network)
    target_state = net.state_dict()
    target_class = type(net).__name__
    check_family(source, target_state, source_class=source_class, target_class=target_class,
                 encoder_only=encoder_only)
    model = BlockModel.from_network(net)
    src: dict[str, torch.Tensor] = {}
    for keys in alias_groups(source):  # state_dict order: a module's own name comes before all_modules.k
        src.setdefault(canonical_key(keys[0]), source[keys[0]])
    n_s, n_t = _n_stages(src), model.n_stages
    offset = n_s - n_t

    first_t = canonical_key(find_first_conv(target_state)[0])
    first_s = canonical_key(find_first_conv(src)[0])
    c_src, k_tgt = int(src[first_s].shape[1]), int(target_state[first_t].shape[1])
    channels = None
    if in_channels is not None and in_channels != k_tgt:
        raise ConfigError(f"--in-channels {in_channels} does not match the target: its plans and dataset.json "
                          f"give the first convolution {k_tgt} input channel(s); pass --in-channels {k_tgt}")
    if c_src != k_tgt:
        if in_channels is None:
            raise ConfigError(f"the checkpoint's first convolution takes {c_src} input channel(s), the target's "
                              f"{k_tgt}: add --in-channels {k_tgt} (--method repeat|mean|first) to adapt it in "
                              f"the same call")
        channels = [c_src, k_tgt]

    groups = alias_groups(target_state)
    canonical = [canonical_key(g[0]) for g in groups]
    values: dict[str, torch.Tensor] = {}
    fresh_values: dict[str, torch.Tensor] = {}
    actions: dict[str, TensorAction] = {}
    used: set[str] = set()
    for keys, name in zip(groups, canonical):
        t = target_state[keys[0]]
        s_name = source_name_for(name, offset=offset)
        s = src.get(s_name) if s_name is not None else None
        fresh = fresh_values[name] = t.detach().clone()
        s_shape = list(s.shape) if s is not None else None
        act = TensorAction(name, "new", s_name if s is not None else None, s_shape, list(t.shape), t.numel())
        if s is not None:
            used.add(s_name)
        if is_seg_key(name):
            act.action = "head"
            fits = s is not None and s.ndim == t.ndim and s.shape[1:] == t.shape[1:]
            if fits:
                values[name] = s.detach().clone().to(t.dtype)
            # else left out of the file: nnU-Net never loads heads, and a fresh head in the file would be
            # taken for source rows by the `heads` setting
            act.reason = "source rows carried" if fits else "not in the file (no source head of this input width)"
        elif s is None:
            stage = re.match(r"encoder\.stages\.(\d+)\.", name)
            act.reason = ("extra stage" if (stage and int(stage.group(1)) >= n_s) or
                          (_DECODER.match(name) and s_name is None) else "not in the checkpoint")
            values[name] = fresh
        else:
            if name == first_t and channels:
                s = adapt_first_conv(s, in_channels=k_tgt, method=method)
            act.action, act.reason, value = _tensor_rule(name, s, t)
            if act.action in ("copied", "mapped") and name == first_t and channels:
                act.action = "channels"
                act.reason = f"channels {c_src}->{k_tgt} by {method!r}" + (f"; {act.reason}" if act.reason else "")
            values[name] = fresh if value is None else value
        actions[name] = act

    # a re-initialised / untransferable convolution keeps its fresh bias too: one module, one origin
    for name, act in actions.items():
        if act.action in ("reinit", "not_transferable") and name.endswith(".weight"):
            bias = actions.get(name[:-len("weight")] + "bias")
            if bias is not None and bias.action == "copied":
                bias.action, bias.reason = act.action, f"bias of a convolution that is {act.action.replace('_', ' ')}"
                values[bias.name] = fresh_values[bias.name]

    state = {k: values[name] for keys, name in zip(groups, canonical) if name in values for k in keys}

    # parameters outside the state dict (LoRA's adapters, when a trainer's network is mapped at load time) are
    # nothing a checkpoint holds: the report counts the state dict's tensors
    rows, heads = _block_rows(model, actions)
    dropped: dict[str, int] = {}
    for n in src:
        # files whose aliases do not share memory still name norms as all_modules.k: not a tensor of their own
        if n not in used and ".all_modules." not in n:
            dropped[stage_module(n)] = dropped.get(stage_module(n), 0) + 1
    report = AdaptReport(source_label, target_label, target_class, n_s, n_t, seed, rows, heads,
                         list(actions.values()), dropped, channels, method if channels else None)
    if not report.from_source:
        widths = [(b.number, list(actions[b.param_names[0]].source_shape or []),
                   actions[b.param_names[0]].target_shape) for b in model.blocks if b.param_names][:3]
        raise TransferError(f"nothing of {source_label} is transferable to {target_label}: no parameter outside "
                            f"the segmentation heads came from the checkpoint (every stage differs in width, e.g. "
                            + "; ".join(f"block {k}: checkpoint {s or 'absent'} vs target {t}" for k, s, t in widths)
                            + "). Plan the target with the source's plans (nnunet_transfer plans transfer -s SOURCE "
                              "-t TARGET) or with the source's features_per_stage")
    return state, report


# --------------------------------------------------------------------------- any checkpoint onto a network
#: why an nnssl source leaves the target's decoder fresh (the report's reason for every decoder tensor)
NNSSL_DECODER = ("the decoder starts fresh: an nnssl checkpoint brings its encoder and stem, as nnU-Net master's "
                 "PretrainedTrainer loads them")


def _nnunet_source_class(weights: LoadedWeights) -> str | None:
    """The network class an nnU-Net checkpoint's own plans name (from its ``init_args``), if they do."""
    arch = (weights.init_args.get("plans") or {}).get("configurations", {}) \
        .get(weights.init_args.get("configuration"), {}).get("architecture", {}).get("network_class_name")
    return arch.rsplit(".", 1)[-1] if isinstance(arch, str) else None


def map_checkpoint(weights: LoadedWeights, network: nn.Module, *, in_channels: int | None = None,
                   method: str = "repeat", seed: int = 0, source_label: str | None = None,
                   target_label: str = "target") -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """The one mapping of a checkpoint onto a target network: the target's full ``state_dict`` and the report of
    what each tensor got. Dispatches on what the checkpoint holds:

    * an nnU-Net network (or a state dict of one): :func:`adapt_state`, every part aligned by resolution;
    * an nnssl checkpoint of a convolutional U-Net (ResEncL, ResidualEncoderUNet, PlainConvUNet): its encoder
      and stem only (:func:`nnunet_transfer.plans.nnssl.encoder_tensors`), then :func:`adapt_state` with
      ``encoder_only``; the decoder and the heads keep the target's fresh initialisation (reason
      :data:`NNSSL_DECODER`). The input projection takes the target's K channels by ``method`` — ``repeat``
      from a 1-channel checkpoint is nnssl's rule, the weight repeated K times and divided by K;
    * an nnssl Primus checkpoint (onto a Primus target): its patch embedding and transformer, by
      :func:`nnunet_transfer.plans.primus.map_primus_state` — the positional embedding interpolated when the token
      grids differ, the input projection taking the target's channels by ``method``; the up-projection (decoder and
      heads) keeps the target's fresh initialisation (:func:`_map_nnssl_primus`).
    """
    label = source_label or str(weights.path)
    if not weights.is_nnssl:
        return adapt_state(weights.state, network, in_channels=in_channels, method=method, seed=seed,
                           source_label=label, target_label=target_label,
                           source_class=_nnunet_source_class(weights))
    plan = plan_of(weights)
    if plan.is_primus:
        return _map_nnssl_primus(weights, plan, network, in_channels=in_channels, method=method, seed=seed,
                                 source_label=label, target_label=target_label)
    if is_primus(unwrap(network)):
        raise ArchitectureError(f"the nnssl checkpoint holds a convolutional U-Net ({plan.arch_class_name}) and the "
                                f"target network is a Primus: plan the target for the checkpoint with nnunet_transfer "
                                f"plans from-checkpoint -d TARGET -c {weights.path} -n NAME")
    return _map_nnssl_conv(weights, plan, network, in_channels=in_channels, method=method, seed=seed,
                           source_label=label, target_label=target_label)


def _map_nnssl_conv(weights: LoadedWeights, plan: NnsslPlan, network: nn.Module, *, in_channels: int | None,
                    method: str, seed: int, source_label: str, target_label: str
                    ) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    net = unwrap(network)
    to_encoder, to_stem = getattr(net, "key_to_encoder", None), getattr(net, "key_to_stem", None)
    if not isinstance(to_encoder, str) or not isinstance(to_stem, str):
        raise ArchitectureError(f"the target network ({type(net).__name__}) names no key_to_encoder / key_to_stem, "
                                f"which dynamic-network-architectures' U-Nets do: an nnssl encoder has no place in "
                                f"it")
    source = encoder_tensors(weights, plan, to_encoder=to_encoder, to_stem=to_stem)
    own = net.state_dict()
    k_tgt = int(own[find_first_conv(own)[0]].shape[1])
    # the input projection always takes the target's channels (nnU-Net master does it unasked)
    state, report = adapt_state(source, net, in_channels=k_tgt if in_channels is None else in_channels,
                                method=method, seed=seed, source_label=source_label, target_label=target_label,
                                source_class=f"nnssl {plan.arch_class_name}", encoder_only=True)
    report.origin = "nnssl"
    for t in report.tensors:
        if t.action == "new" and t.name.startswith("decoder."):
            t.reason = NNSSL_DECODER
    # the pretraining network's other tensors, once each (decoder.encoder.* is the encoder, all_modules.0 a conv)
    rest = [k for k in weights.state if not in_encoder(k, plan) and not k.startswith("decoder.encoder.")
            and ".all_modules." not in k]
    if rest:
        report.dropped["pretraining decoder and heads (nnssl)"] = len(rest)
    report.notes.append(plan.summary())
    if report.channels:
        rule = " (nnssl's rule: the weight repeated over the channels and divided by their number)" \
            if report.channels[0] == 1 and method == "repeat" else ""
        report.notes.append(f"input projection: {report.channels[0]} -> {report.channels[1]} channels by "
                            f"{method!r}{rule}")
    report.notes.append(NNSSL_DECODER + "; the segmentation heads start fresh")
    report.notes.extend(plan.notes)
    return state, report


def _primus_depth(state: Mapping[str, torch.Tensor], encoder: str) -> int:
    """The number of transformer blocks under ``encoder`` (``eva.blocks.<i>.…``)."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(encoder) + r"\.blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def target_token_grid(network: nn.Module, patch_embed_size: list[int]) -> tuple[int, ...]:
    """The token grid a Primus was built for: its rotary embedding's feature shape (``input_shape`` / patch
    embedding), which dynamic-network-architectures keeps; refused for a Primus without one."""
    grid = getattr(getattr(getattr(network, "eva", None), "rope", None), "feat_shape", None)
    if grid is None or len(grid) != len(patch_embed_size):
        raise ArchitectureError(f"cannot tell the token grid of the target {type(network).__name__} (it has no "
                                f"rotary embedding with a feature shape); build it with use_rot_pos_emb=True")
    return tuple(int(g) for g in grid)


def _map_nnssl_primus(weights: LoadedWeights, plan: NnsslPlan, network: nn.Module, *, in_channels: int | None,
                      method: str, seed: int, source_label: str, target_label: str
                      ) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """An nnssl Primus checkpoint's patch embedding and transformer onto a Primus target (see
    :func:`map_checkpoint`); the report's blocks are the target's (patch embedding + transformer blocks, then the
    up-projection stages)."""
    net = unwrap(network)
    if not is_primus(net):
        raise ArchitectureError(f"the nnssl checkpoint holds a Primus transformer ({plan.arch_class_name}) and the "
                                f"target network is a {type(net).__name__}: plan the target for the checkpoint with "
                                f"nnunet_transfer plans from-checkpoint -d TARGET -c {weights.path} -n NAME")
    state, kw = weights.state, plan.arch_kwargs
    proj = plan.keys_to_in_proj[0] + ".weight"
    if proj not in state or state[proj].ndim != 5:
        raise DataError(f"{weights.path}: keys_to_in_proj[0] {plan.keys_to_in_proj[0]!r} has no patch-embedding "
                        f"weight {proj!r} in network_weights")
    embed, depth = int(state[proj].shape[0]), _primus_depth(state, plan.key_to_encoder)
    if (embed, depth) != (kw["embed_dim"], kw["eva_depth"]) or list(state[proj].shape[2:]) != kw["patch_embed_size"]:
        raise DataError(f"{weights.path}: its tensors are a Primus of embed_dim {embed}, {depth} transformer blocks "
                        f"and a {list(state[proj].shape[2:])} patch embedding, but its plan names "
                        f"{plan.arch_class_name} (embed_dim {kw['embed_dim']}, {kw['eva_depth']} blocks, "
                        f"{kw['patch_embed_size']}): the checkpoint does not match its own adaptation plan")
    if plan.pretrain_patch_size is None:
        raise DataError(f"{weights.path}: the adaptation plan gives no pretraining patch size (pretrain_plan's "
                        f"configuration patch_size), which the positional embedding was learned for")
    own = net.state_dict()
    target_proj = "down_projection.proj.weight"
    k_tgt = int(own[target_proj].shape[1])
    if in_channels is not None and in_channels != k_tgt:
        raise ConfigError(f"--in-channels {in_channels} does not match the target: its plans and dataset.json give "
                          f"the patch embedding {k_tgt} input channel(s); pass --in-channels {k_tgt}")
    source = dict(state)
    c_src = int(state[proj].shape[1])
    if c_src != k_tgt:
        source[proj] = adapt_first_conv(state[proj], in_channels=k_tgt, method=method)
    pe = kw["patch_embed_size"]
    src_grid = token_grid(plan.pretrain_patch_size, pe)
    tgt_grid = target_token_grid(net, pe)
    n_prefix = int(getattr(net.eva, "num_prefix_tokens", 0))  # register tokens' rows of the embedding, kept
    mapping = map_primus_state(source, own, source_patch_size=[g * e for g, e in zip(src_grid, pe)],
                               target_patch_size=[g * e for g, e in zip(tgt_grid, pe)], patch_embed_size=pe,
                               n_prefix=n_prefix, key_to_stem=plan.key_to_stem, key_to_encoder=plan.key_to_encoder,
                               keys_to_in_proj=plan.keys_to_in_proj, key_to_lpe=plan.key_to_lpe)
    model = BlockModel.from_network(net)
    seg = set(model.seg_param_names)
    got = set(mapping.from_checkpoint)
    stem_enc = {"down_projection": plan.key_to_stem, "eva": plan.key_to_encoder}
    actions: dict[str, TensorAction] = {}
    for name, t in own.items():
        part = name.split(".", 1)[0]
        src_name = stem_enc[part] + name[len(part):] if part in stem_enc else None
        act = TensorAction(name, "new", None, None, list(t.shape), t.numel())
        if name in got:
            act.source, act.source_shape = src_name, list(state[src_name].shape)
            act.action = "copied"
            if name == target_proj and c_src != k_tgt:
                act.action, act.reason = "channels", f"channels {c_src}->{k_tgt} by {method!r}"
            elif src_name == plan.key_to_lpe and src_grid != tgt_grid:
                act.action = "mapped"
                act.reason = f"interpolated (trilinear) from the token grid {list(src_grid)} to {list(tgt_grid)}"
        elif name in seg:
            act.action, act.reason = "head", "the heads start fresh (an nnssl checkpoint has none)"
        elif name.startswith("up_projection."):
            act.reason = NNSSL_DECODER
        else:
            act.reason = "not in the checkpoint (nnU-Net master does not load it either)"
        actions[name] = act
    rows, heads = _block_rows(model, actions)
    report = AdaptReport(source_label, target_label, type(net).__name__, depth, _primus_depth(own, "eva"), seed,
                         rows, heads, list(actions.values()), {}, [c_src, k_tgt] if c_src != k_tgt else None,
                         method if c_src != k_tgt else None, origin="nnssl")
    rest = [k for k in state if not in_encoder(k, plan)]
    if rest:
        report.dropped["pretraining decoder and heads (nnssl)"] = len(rest)
    report.notes.append(plan.summary())
    if c_src != k_tgt:
        rule = " (nnssl's rule: the weight repeated over the channels and divided by their number)" \
            if c_src == 1 and method == "repeat" else ""
        report.notes.append(f"patch embedding: {c_src} -> {k_tgt} channels by {method!r}{rule}")
    report.notes += [n for n in mapping.notes if "input projection" not in n]
    report.notes.append(NNSSL_DECODER + "; the up-projection (decoder and heads) starts fresh")
    return mapping.state, report


@dataclass
class NnsslCheck:
    """``weights check`` of an nnssl checkpoint: what ``-pretrained_weights`` loads with this package's trainers."""

    checkpoint: str
    target: str
    report: AdaptReport
    loadable: bool = True

    def text(self) -> str:
        return "\n".join([self.report.text(),
                          f"OK: -pretrained_weights {self.checkpoint} with this package's trainers loads the encoder "
                          f"and stem ({self.report.share:.1%} of the target's parameters outside the heads); the "
                          f"decoder and heads keep nnU-Net's initialisation",
                          f"hint: nnU-Net's own trainers would load the pretraining decoder too: for them, write "
                          f"the mapped file with nnunet_transfer weights adapt {self.checkpoint} -d TARGET -c CONFIG "
                          f"-o ADAPTED.pth"])

    def to_dict(self) -> dict:
        return {"kind": "nnssl", "checkpoint": self.checkpoint, "target": self.target, "loadable": self.loadable,
                "report": self.report.to_dict()}


def check_to_plans(checkpoint: str | Path, dataset: str | int, configuration: str,
                   plans: str = "nnUNetPlans") -> WeightsReport | NnsslCheck:
    """``weights check``: an nnU-Net checkpoint under nnU-Net's loading rules
    (:func:`nnunet_transfer.plans.weights.check_weights`), an nnssl checkpoint by :func:`map_checkpoint`."""
    weights = load_weights(resolve_checkpoint(checkpoint))  # a file, a fold folder or a one-fold model folder
    network = build_network(load_plans(dataset, plans), configuration, load_dataset_json(dataset))
    target = f"{dataset_name(dataset)} / {plans} / {configuration}"
    if not weights.is_nnssl:
        return check_weights(weights, network, target=target)
    _, report = map_checkpoint(weights, network, source_label=str(weights.path), target_label=target)
    return NnsslCheck(str(weights.path), target, report)


def load_nnssl_encoder(network: nn.Module, path: str | Path, *, verbose: bool = False) -> AdaptReport:
    """What ``-pretrained_weights NNSSL.pth`` does with this package's trainers (in place of nnU-Net's
    ``load_pretrained_weights``, which would load the pretraining decoder as well): the tensors that
    :func:`map_checkpoint` takes from the checkpoint go into ``network``; everything else keeps the values
    nnU-Net initialised it with."""
    weights = load_weights(path)
    state, report = map_checkpoint(weights, network, source_label=str(path))
    action = {t.name: t.action for t in report.tensors}
    keys = [k for k in state if action.get(canonical_key(k)) in FROM_SOURCE]
    load_into(network, state, keys=keys)
    print(f"nnunet_transfer: loaded the encoder and stem of nnssl checkpoint {path} ({len(keys)} state_dict keys, "
          f"{report.share:.1%} of the parameters outside the heads); the decoder and heads keep nnU-Net's "
          f"initialisation")
    if verbose:
        print(report.text())
    return report


# --------------------------------------------------------------------------- the command
def report_path(output: str | Path) -> Path:
    """Where the JSON report goes: beside OUT, ``adapted.pth`` -> ``adapted.report.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".report.json")


def _check_min_share(min_share: Any) -> None:
    if min_share is None:
        return
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 <= min_share <= 1:
        raise ConfigError(f"--min-share must be a number in [0, 1] (a share of the parameters, e.g. 0.5), got "
                          f"{min_share!r}")


def adapt_to_plans(checkpoint: str | Path, output: str | Path, *, dataset: str | int, configuration: str,
                   plans: str = "nnUNetPlans", in_channels: int | None = None, method: str = "repeat",
                   seed: int = 0, min_share: float | None = None, force: bool = False) -> AdaptReport:
    """``weights adapt CHECKPOINT -d TARGET -c CONFIG [-p PLANS] -o OUT``: validate, adapt, then write
    ``OUT`` (``{"network_weights": …, "nnunet_transfer_adapted": report}``) and its JSON report beside it.

    ``checkpoint`` may be a file, a fold folder or a one-fold model folder. Nothing is written when any
    check fails.
    """
    _check_min_share(min_share)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if in_channels is not None and (isinstance(in_channels, bool) or not isinstance(in_channels, int)
                                    or in_channels < 1):
        raise ConfigError(f"--in-channels must be an integer >= 1, got {in_channels!r}")
    output = Path(output)
    json_path = report_path(output)
    source_path = resolve_checkpoint(checkpoint)
    if output.resolve() == source_path.resolve():
        raise ConfigError(f"the output {output} is the input checkpoint; write to another file")
    for p in (output, json_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise DataError(f"folder {output.parent} does not exist; create it first")

    weights: LoadedWeights = load_weights(source_path)
    plans_dict = load_plans(dataset, plans)
    target_json = load_dataset_json(dataset)
    with torch.random.fork_rng(devices=[]):
        # the fresh initialisation that new / re-initialised tensors keep: nnU-Net's own init, seeded
        torch.manual_seed(seed)
        network = build_network(plans_dict, configuration, target_json)
    state, report = map_checkpoint(weights, network, in_channels=in_channels, method=method, seed=seed,
                                   source_label=str(source_path),
                                   target_label=f"{dataset_name(dataset)} / {plans} / {configuration}")
    report.output = str(output)
    if min_share is not None and report.share < min_share:
        low = sorted(report.blocks, key=lambda b: b.share)[:3]
        raise TransferError(f"only {report.share:.1%} of the target's parameters outside the heads would come from "
                            f"the checkpoint, below --min-share {min_share:g} (lowest: "
                            + ", ".join(f"block {b.block} {b.share:.0%}" for b in low)
                            + "); nothing written. Lower --min-share, or plan the target closer to the source")
    payload = report.to_dict()
    content = {"network_weights": state, ADAPTED_KEY: payload}
    if weights.dataset_json is not None and report.heads["carried"]:
        # the source's labels, so that heads=by-name can pick rows from the carried heads
        content["init_args"] = {"dataset_json": weights.dataset_json}
    with atomic_path(json_path) as tmp_json:  # both files or neither: the report lands only if the weights did
        tmp_json.write_text(json.dumps(payload, indent=2))
        save_atomic(output, content)
    return report


__all__ = ["source_name_for", "adapt_state", "map_checkpoint", "NNSSL_DECODER", "NnsslCheck", "check_to_plans",
           "load_nnssl_encoder", "adapt_to_plans", "report_path"]
