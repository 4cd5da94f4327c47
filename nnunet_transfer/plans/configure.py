"""Add a plans configuration that inherits another one and carries this package's settings.

A configuration that ``inherits_from`` e.g. ``3d_fullres`` and keeps its ``data_identifier`` reuses the
preprocessed data and gets its own results folder (``Trainer__Plans__Configuration``): the natural
home for per-run settings (a λ, a block set, a short schedule). Optionally the network is made small
(features, patch, batch size) for CPU smoke runs.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from nnunet_transfer.blocks import Layout, layout_from_architecture, parse_spec
from nnunet_transfer.config import PLANS_KEY, TransferConfig
from nnunet_transfer.errors import ConfigError, DataError, SpecError
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.nnunet_io import load_json, plans_path

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# arch_kwargs entries that hold one value per encoder stage / per decoder stage
_PER_STAGE = ("n_conv_per_stage", "n_blocks_per_stage")
_PER_DECODER_STAGE = ("n_conv_per_stage_decoder",)


def _resize(values: Sequence[Any], n: int) -> list[Any]:
    values = list(values)
    return values[:n] if len(values) >= n else values + [values[-1]] * (n - len(values))


def _strides_for(patch: Sequence[int], n_stages: int) -> list[list[int]]:
    """Stride 1 for the stem, then 2 along every axis that stays >= 4 voxels (nnU-Net's habit)."""
    strides = [[1] * len(patch)]
    size = list(patch)
    for _ in range(1, n_stages):
        s = [2 if size[a] % 2 == 0 and size[a] // 2 >= 4 else 1 for a in range(len(patch))]
        if not any(x == 2 for x in s):
            raise ConfigError(f"patch {list(patch)} cannot be downsampled {n_stages - 1} times (each "
                              f"stage halves an axis that stays >= 4 voxels); use fewer --features or a "
                              f"larger --patch, e.g. --patch {','.join(str(4 * 2 ** (n_stages - 1)) for _ in patch)}")
        size = [size[a] // s[a] for a in range(len(patch))]
        strides.append(s)
    return strides


def shrink_architecture(base_conf: Mapping[str, Any], *, features: Sequence[int] | None,
                        patch: Sequence[int] | None) -> dict[str, Any]:
    """A copy of the base configuration's ``architecture`` with new features/stages/strides."""
    arch = copy.deepcopy(base_conf["architecture"])
    kw = arch["arch_kwargs"]
    n_stages = len(features) if features else int(kw["n_stages"])
    patch = list(patch) if patch else list(base_conf["patch_size"])
    dim = len(patch)
    kernel = kw.get("kernel_sizes") or [[3] * dim]
    if len(kernel[0]) != dim:
        raise ConfigError(f"--patch has {dim} axes but the base configuration's network is "
                          f"{len(kernel[0])}-D; give {len(kernel[0])} numbers")
    kw["n_stages"] = n_stages
    if features:
        kw["features_per_stage"] = list(features)
    else:
        kw["features_per_stage"] = _resize(kw["features_per_stage"], n_stages)
    kw["kernel_sizes"] = _resize(kernel, n_stages)
    kw["strides"] = _strides_for(patch, n_stages)
    for key in _PER_STAGE:
        if key in kw:
            kw[key] = _resize(kw[key], n_stages)
    for key in _PER_DECODER_STAGE:
        if key in kw:
            kw[key] = _resize(kw[key], n_stages - 1)
    return arch


def _parse_ints(text: str | Sequence[int] | None, what: str, n: int | None = None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or (n is not None and len(values) != n):
        need = f"{n} " if n else ""
        raise ConfigError(f"{what} must be {need}positive integers, got {text!r}")
    return values


def add_configuration(plans: dict, *, base: str, new: str, settings: Mapping[str, Any] | None = None,
                      features: str | Sequence[int] | None = None,
                      patch: str | Sequence[int] | None = None, batch_size: int | None = None,
                      force: bool = False) -> dict:
    """Return a copy of ``plans`` with configuration ``new`` inheriting ``base``.

    ``settings`` become the configuration's ``"nnunet_transfer"`` dict; they are validated here (keys,
    types, ranges) so that a typo fails now rather than at the start of training.
    """
    configs = plans.get("configurations", {})
    if base not in configs:
        raise ConfigError(f"base configuration {base!r} is not in the plans; available: {sorted(configs)}")
    if not _NAME.fullmatch(new):
        raise ConfigError(f"configuration name {new!r} may only hold letters, digits, '_', '.' and '-'")
    if new == base:
        raise ConfigError(f"the new configuration must have a name of its own, got {new!r} = base")
    if new in configs and not force:
        raise ConfigError(f"configuration {new!r} already exists in the plans; pass --force to replace it")
    base_conf = resolved_configuration(plans, base)
    # nnU-Net's inheritance replaces whole top-level keys; settings inherit key by key instead
    settings = {**base_conf.get(PLANS_KEY, {}), **(settings or {})}
    TransferConfig.from_mapping(settings)  # validation only; trainers check which keys they use
    conf: dict[str, Any] = {"inherits_from": base}
    patch_list = _parse_ints(patch, "--patch", len(base_conf["patch_size"]))
    feature_list = _parse_ints(features, "--features")
    if feature_list or patch_list:
        conf["architecture"] = shrink_architecture(base_conf, features=feature_list, patch=patch_list)
    if patch_list:
        conf["patch_size"] = patch_list
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
        conf["batch_size"] = batch_size
    if settings:
        conf[PLANS_KEY] = settings
    arch = conf.get("architecture", base_conf.get("architecture", {}))
    check_specs(settings, layout_from_architecture(arch), where=f"configuration {new!r}")
    out = copy.deepcopy(plans)
    out["configurations"][new] = conf
    return out


def check_specs(settings: Mapping[str, Any], layout: Layout | int | None, *, where: str) -> None:
    """Parse every block-spec setting against the network's block layout (a U-Net's stage count, a Primus'
    :class:`~nnunet_transfer.blocks.Layout`), so a bad spec fails here and not at the start of ``nnUNetv2_train``."""
    if isinstance(layout, int) and not isinstance(layout, bool) and layout >= 2:
        layout = Layout.unet(layout)
    if not isinstance(layout, Layout):
        return  # an architecture this package does not describe; the trainer reports it
    specs = [(key, settings.get(key)) for key in TransferConfig.spec_keys()]
    stages = settings.get("stages")
    if isinstance(stages, list):  # [[spec, end epoch], ..., [spec, null]]
        specs += [(f"stages[{i}]", st[0]) for i, st in enumerate(stages) if isinstance(st, (list, tuple)) and st]
    for key, spec in specs:
        if isinstance(spec, str):
            try:
                parse_spec(spec, layout)
            except SpecError as e:
                raise ConfigError(f"setting {key!r} of {where} ({layout.describe()}): {e}") from None


def resolved_configuration(plans: dict, name: str) -> dict:
    """The configuration ``name`` with ``inherits_from`` resolved (nnU-Net's rule: child keys win)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(copy.deepcopy(plans)).get_configuration(name).configuration


def write_plans(path: str | Path, plans: dict) -> Path | None:
    """Write atomically; the previous file is kept as ``<name>.json.bak``. Returns the backup path."""
    path = Path(path)
    backup = None
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        shutil.copy2(path, backup)
    write_atomic(path, json.dumps(plans, indent=4, sort_keys=False))
    return backup


def configure(dataset: str | int, *, base: str, new: str, plans_identifier: str = "nnUNetPlans",
              settings: Mapping[str, Any] | None = None, features=None, patch=None,
              batch_size: int | None = None, force: bool = False) -> Path:
    """Add configuration ``new`` to a dataset's preprocessed plans file; returns the plans path."""
    path = plans_path(dataset, plans_identifier)
    plans = load_json(path)
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise DataError(f"{path} does not look like nnU-Net plans (no 'configurations')")
    write_plans(path, add_configuration(plans, base=base, new=new, settings=settings,
                                        features=features, patch=patch, batch_size=batch_size,
                                        force=force))
    return path
