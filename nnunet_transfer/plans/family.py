"""What U-Net a state dict holds, read from its tensor names: the architecture family (plain or residual
encoder and decoder), the stage count and the spatial dimension; and the refusal of another family.

``weights adapt`` maps tensors between networks of one family only: plain ↔ residual encoders (or 2-D ↔ 3-D
networks) are built from different modules, so nothing of them is transferable.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from nnunet_transfer.errors import ArchitectureError

_FAMILY_CLASS = {("plain", "plain"): "PlainConvUNet", ("residual", "plain"): "ResidualEncoderUNet",
                 ("residual", "residual"): "ResidualUNet", ("plain", "residual"): "plain encoder + residual decoder"}


def _family(names: Iterable[str]) -> tuple[str | None, str | None]:
    names = list(names)
    if any(n.startswith("encoder.stem.") or re.match(r"encoder\.stages\.\d+\.blocks\.", n) for n in names):
        enc = "residual"
    elif any(re.match(r"encoder\.stages\.\d+\.\d+\.convs\.", n) for n in names):
        enc = "plain"
    else:
        enc = None
    if any(re.match(r"decoder\.stages\.\d+\.blocks\.", n) for n in names):
        dec = "residual"
    elif any(re.match(r"decoder\.stages\.\d+\.convs\.", n) for n in names):
        dec = "plain"
    else:
        dec = None
    return enc, dec


def _n_stages(names: Iterable[str]) -> int:
    stages = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.stages\.(\d+)\.", n))}
    return max(stages) + 1 if stages else 0


def _spatial_dims(state: Mapping[str, torch.Tensor]) -> set[int]:
    return {v.ndim - 2 for k, v in state.items() if v.ndim >= 3 and re.match(r"encoder\.", k)}


def check_family(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
                 source_class: str | None = None, target_class: str | None = None,
                 encoder_only: bool = False) -> None:
    """Refuse a checkpoint of another architecture family (one message naming both). ``encoder_only``: the
    source holds an encoder alone (an nnssl checkpoint's encoder and stem); only the encoders are compared."""
    s_fam, t_fam = _family(source), _family(target)
    if encoder_only:
        s_fam = (s_fam[0], t_fam[1])
    if None in s_fam:
        first = list(source)[:3]
        raise ArchitectureError(f"the checkpoint holds no U-Net of dynamic-network-architectures (no "
                                f"encoder.stages.*/decoder.stages.* keys; first keys {first}); weights adapt maps "
                                f"PlainConvUNet, ResidualEncoderUNet and ResidualUNet checkpoints")
    s_cls = source_class or _FAMILY_CLASS.get(s_fam, str(s_fam))
    t_cls = target_class or _FAMILY_CLASS.get(t_fam, str(t_fam))
    if s_fam != t_fam:
        part = " and ".join(p for p, a, b in (("encoder", s_fam[0], t_fam[0]), ("decoder", s_fam[1], t_fam[1]))
                            if a != b)
        raise ArchitectureError(
            f"the checkpoint is a {s_cls} ({s_fam[0]} encoder, {s_fam[1]} decoder), the target a {t_cls} "
            f"({t_fam[0]} encoder, {t_fam[1]} decoder): the {part} of different families are built from "
            f"different modules, so they are not transferable. Plan the target with the source's architecture "
            f"(nnunet_transfer plans transfer -s SOURCE -t TARGET) or with a planner of the same family "
            f"(e.g. nnUNetPlannerResEncM for residual encoders)")
    s_dims, t_dims = _spatial_dims(source), _spatial_dims(target)
    if s_dims and t_dims and s_dims != t_dims:
        raise ArchitectureError(f"the checkpoint is a {'/'.join(map(str, sorted(s_dims)))}-D network, the target "
                                f"{'/'.join(map(str, sorted(t_dims)))}-D: convolutions of another dimension are "
                                f"not transferable; adapt to a target configuration of the same dimension "
                                f"(e.g. 3d_fullres for a 3-D checkpoint)")

__all__ = ["check_family"]
