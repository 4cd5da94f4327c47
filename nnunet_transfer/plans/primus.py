"""Primus as a target: a plans configuration that builds one, and a pretraining Primus' weights mapped onto it.

Primus (Wald, Roy, Isensee et al., "Primus: Enforcing attention usage for 3D medical image segmentation", 2025,
https://arxiv.org/abs/2503.01835; dynamic-network-architectures 0.4.4) is a patch embedding
(``down_projection``), an Eva transformer (``eva``: positional embedding, blocks, final norm) and a light
up-projection (``up_projection``). A pretraining Primus (nnssl's masked-image models) shares the first two with
the segmentation network; its up-projection predicts images, not classes.

:func:`map_primus_state` does what nnU-Net master's ``PretrainedTrainer.load_pretrained_weights`` does for a
Primus (``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``, the branch where the stem is not
inside the encoder): the stem (``key_to_stem`` = ``down_projection``) and the encoder (``key_to_encoder`` =
``eva``) come from the checkpoint, the decoder and the heads keep the target's initialisation;

* the input projection (``keys_to_in_proj`` = ``down_projection.proj``) of a 1-channel pretraining network is
  repeated over the target's C input channels and divided by C (its bias is kept), so that C copies of one
  image give the pretrained response;
* the learned positional embedding (``key_to_lpe`` = ``eva.pos_embed``) is resized with trilinear
  interpolation when the patch size differs (:func:`interpolate_pos_embed`, master's
  ``nnunetv2/utilities/load_weights_utils.py`` ``handle_pos_embed_resize`` with ``interpolate_trilinear``);
  register tokens' rows of the embedding (none in the published configurations, which master does not handle)
  are kept as they are;
* ``register_tokens`` (a parameter outside both) is not loaded, as in master.

Reading an nnssl checkpoint (its adaptation plan names the keys and patch sizes) is not done here; that reader
calls these functions. :func:`add_primus_configuration` writes a configuration our trainers build into a Primus
(nnU-Net 2.8.1's own build cannot: it passes ``deep_supervision``, see :mod:`nnunet_transfer.nnunet_io`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from nnunet_transfer.blocks import layout_from_architecture
from nnunet_transfer.config import PLANS_KEY, TransferConfig
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import load_json, plans_path
from nnunet_transfer.plans.configure import _NAME, check_specs, resolved_configuration, write_plans

PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
#: nnU-Net master's defaults for a Primus (``dynamic_network_architectures`` Primus attributes)
KEY_TO_STEM = "down_projection"
KEY_TO_ENCODER = "eva"
KEYS_TO_IN_PROJ = ("down_projection.proj",)
KEY_TO_LPE = "eva.pos_embed"


# --------------------------------------------------------------------------- positional embedding
def token_grid(patch_size: Sequence[int], patch_embed_size: Sequence[int]) -> tuple[int, ...]:
    """The token grid of a patch: ``patch_size // patch_embed_size`` per axis (each must divide)."""
    if len(patch_size) != len(patch_embed_size) or any(int(p) % int(e) for p, e in zip(patch_size, patch_embed_size)):
        raise ConfigError(f"patch size {list(patch_size)} is not a multiple of the patch embedding "
                          f"{list(patch_embed_size)} on every axis; choose a patch size divisible by it")
    return tuple(int(p) // int(e) for p, e in zip(patch_size, patch_embed_size))


def interpolate_pos_embed(pos_embed: torch.Tensor, *, source_grid: Sequence[int], target_grid: Sequence[int],
                          n_prefix: int = 0) -> torch.Tensor:
    r"""Resize a learned positional embedding from one token grid to another by trilinear interpolation.

    The embedding is ``(1, n_prefix + x·y·z, C)`` with the grid tokens in C order (``(w h d)``, as Primus
    flattens them); the grid rows are read as a ``(1, C, x, y, z)`` volume and resized with
    ``F.interpolate(mode="trilinear", align_corners=False)`` — nnU-Net master's ``interpolate_patch_embed_3d`` —
    and the ``n_prefix`` register-token rows are kept. Equal grids return the tensor unchanged.

    Shape: ``(1, n_prefix + prod(source_grid), C)`` → ``(1, n_prefix + prod(target_grid), C)``.
    """
    source_grid, target_grid = tuple(map(int, source_grid)), tuple(map(int, target_grid))
    if pos_embed.dim() != 3 or pos_embed.shape[1] != n_prefix + math.prod(source_grid):
        raise DataError(f"positional embedding of shape {tuple(pos_embed.shape)} does not hold {n_prefix} prefix + "
                        f"{math.prod(source_grid)} tokens of the grid {list(source_grid)}")
    if source_grid == target_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    c = grid.shape[-1]
    volume = grid.transpose(1, 2).reshape(grid.shape[0], c, *source_grid)
    resized = F.interpolate(volume.float(), size=target_grid, mode="trilinear", align_corners=False)
    resized = resized.to(pos_embed.dtype).reshape(grid.shape[0], c, -1).transpose(1, 2)
    return torch.cat([prefix, resized], dim=1)


# --------------------------------------------------------------------------- key mapping
@dataclass
class PrimusMapping:
    """What :func:`map_primus_state` did: the target's full state dict and where each tensor came from."""

    state: dict[str, torch.Tensor]
    from_checkpoint: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"from_checkpoint": list(self.from_checkpoint), "fresh": list(self.fresh), "notes": list(self.notes)}


def map_primus_state(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
                     source_patch_size: Sequence[int], target_patch_size: Sequence[int],
                     patch_embed_size: Sequence[int], n_prefix: int = 0, key_to_stem: str = KEY_TO_STEM,
                     key_to_encoder: str = KEY_TO_ENCODER, keys_to_in_proj: Sequence[str] = KEYS_TO_IN_PROJ,
                     key_to_lpe: str = KEY_TO_LPE) -> PrimusMapping:
    """The target Primus' state dict with stem and encoder from a pretraining Primus' ``source`` state dict.

    ``source`` keys are the pretraining network's (``key_to_stem`` / ``key_to_encoder`` / ``keys_to_in_proj`` /
    ``key_to_lpe`` as its adaptation plan names them); ``target`` is the target network's ``state_dict()``
    (decoder and heads are kept from it). Raises :class:`DataError` when the source lacks the stem or the encoder,
    or when a tensor does not fit after the channel repeat and the embedding resize (another ``embed_dim``,
    depth or patch embedding).
    """
    out = {k: v for k, v in target.items()}
    mapping = PrimusMapping(state=out)
    parts = {KEY_TO_STEM: key_to_stem, KEY_TO_ENCODER: key_to_encoder}
    in_proj = {f"{k}.weight" for k in keys_to_in_proj}
    for ours, theirs in parts.items():
        keys = [k for k in source if k == theirs or k.startswith(theirs + ".")]
        if not keys:
            raise DataError(f"the checkpoint has no {theirs!r} tensors (the Primus {ours} expected there); its keys "
                            f"start with {sorted({k.split('.')[0] for k in source})[:6]}")
        for key in keys:
            name = ours + key[len(theirs):]
            value = source[key]
            if name not in out:
                if "cls_token" in name:  # master filters a cls token out
                    mapping.notes.append(f"{key} dropped (Primus has no class token)")
                    continue
                raise DataError(f"checkpoint tensor {key} has no place in the target Primus ({name} does not exist); "
                                f"the checkpoint's architecture differs from the target's")
            if key in in_proj and value.shape[1] != out[name].shape[1]:
                value = _repeat_in_channels(key, value, int(out[name].shape[1]))
                mapping.notes.append(f"{key}: input projection repeated over {out[name].shape[1]} channels / "
                                     f"{out[name].shape[1]}")
            if key == key_to_lpe:
                src_grid = token_grid(source_patch_size, patch_embed_size)
                tgt_grid = token_grid(target_patch_size, patch_embed_size)
                if src_grid != tgt_grid:
                    value = interpolate_pos_embed(value, source_grid=src_grid, target_grid=tgt_grid,
                                                  n_prefix=n_prefix)
                    mapping.notes.append(f"{key}: positional embedding interpolated (trilinear) from the token grid "
                                         f"{list(src_grid)} to {list(tgt_grid)}")
            if tuple(value.shape) != tuple(out[name].shape):
                raise DataError(f"checkpoint tensor {key} {tuple(value.shape)} does not fit the target's {name} "
                                f"{tuple(out[name].shape)}: embed_dim, depth or patch embedding differ")
            out[name] = value.to(dtype=out[name].dtype)
            mapping.from_checkpoint.append(name)
    got = set(mapping.from_checkpoint)
    mapping.fresh = [k for k in out if k not in got]
    missing = [k for k in mapping.fresh if k.startswith((KEY_TO_STEM + ".", KEY_TO_ENCODER + "."))]
    if missing:
        raise DataError(f"the checkpoint lacks {len(missing)} tensor(s) of the target's stem/encoder, e.g. "
                        f"{missing[:3]}; the checkpoint's Primus is smaller than the target's")
    return mapping


def _repeat_in_channels(key: str, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """nnssl's / nnU-Net master's stem rule: a 1-channel kernel repeated over C channels, divided by C."""
    if weight.shape[1] != 1:
        raise DataError(f"{key} has {weight.shape[1]} input channels and the target {channels}; only a 1-channel "
                        f"input projection can be repeated over the target's channels (nnU-Net master's rule)")
    return weight.repeat(1, channels, *([1] * (weight.dim() - 2))) / channels


# --------------------------------------------------------------------------- a plans configuration
def primus_architecture(*, embed_dim: int, eva_depth: int, eva_numheads: int,
                        patch_embed_size: Sequence[int], **more: Any) -> dict[str, Any]:
    """A plans ``architecture`` entry that our trainers build into ``Primus`` (``input_shape`` = the patch size)."""
    for name, value in (("embed_dim", embed_dim), ("eva_depth", eva_depth), ("eva_numheads", eva_numheads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"Primus {name} must be an integer >= 1, got {value!r}")
    if embed_dim % eva_numheads:
        raise ConfigError(f"Primus embed_dim {embed_dim} is not divisible by eva_numheads {eva_numheads}")
    return {"network_class_name": PRIMUS_CLASS,
            "arch_kwargs": {"embed_dim": embed_dim, "patch_embed_size": [int(v) for v in patch_embed_size],
                            "eva_depth": eva_depth, "eva_numheads": eva_numheads, **more},
            "_kw_requires_import": []}


def add_primus_configuration(plans: dict, *, base: str, new: str, architecture: Mapping[str, Any],
                             patch: Sequence[int], batch_size: int | None = None,
                             settings: Mapping[str, Any] | None = None, force: bool = False) -> dict:
    """A copy of ``plans`` with configuration ``new``: ``base``'s data (it ``inherits_from`` it) and a Primus."""
    configs = plans.get("configurations", {})
    if base not in configs:
        raise ConfigError(f"base configuration {base!r} is not in the plans; available: {sorted(configs)}")
    if not _NAME.fullmatch(new) or new == base:
        raise ConfigError(f"configuration name {new!r} must differ from the base and hold only letters, digits, "
                          f"'_', '.' and '-'")
    if new in configs and not force:
        raise ConfigError(f"configuration {new!r} already exists in the plans; pass force to replace it")
    base_conf = resolved_configuration(plans, base)
    patch = [int(v) for v in patch]
    if len(patch) != 3:
        raise ConfigError(f"a Primus is 3-D: give a 3-D patch, got {patch}")
    token_grid(patch, architecture["arch_kwargs"]["patch_embed_size"])
    settings = {**base_conf.get(PLANS_KEY, {}), **(settings or {})}
    TransferConfig.from_mapping(settings)
    conf: dict[str, Any] = {"inherits_from": base, "patch_size": patch, "architecture": copy.deepcopy(dict(architecture))}
    if batch_size is not None:
        conf["batch_size"] = int(batch_size)
    if settings:
        conf[PLANS_KEY] = settings
    check_specs(settings, layout_from_architecture(conf["architecture"]), where=f"configuration {new!r}")
    out = copy.deepcopy(plans)
    out["configurations"][new] = conf
    return out


def configure_primus(dataset: str | int, *, base: str, new: str, architecture: Mapping[str, Any],
                     patch: Sequence[int], batch_size: int | None = None, plans_identifier: str = "nnUNetPlans",
                     settings: Mapping[str, Any] | None = None, force: bool = False) -> Any:
    """Add a Primus configuration (:func:`add_primus_configuration`) to a dataset's preprocessed plans file, written
    atomically with a ``.bak`` of the previous one; returns the plans path."""
    path = plans_path(dataset, plans_identifier)
    plans = load_json(path)
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise DataError(f"{path} does not look like nnU-Net plans (no 'configurations')")
    write_plans(path, add_primus_configuration(plans, base=base, new=new, architecture=architecture, patch=patch,
                                               batch_size=batch_size, settings=settings, force=force))
    return path


__all__ = ["PRIMUS_CLASS", "KEY_TO_STEM", "KEY_TO_ENCODER", "KEYS_TO_IN_PROJ", "KEY_TO_LPE", "token_grid",
           "interpolate_pos_embed", "PrimusMapping", "map_primus_state", "primus_architecture",
           "add_primus_configuration", "configure_primus"]
