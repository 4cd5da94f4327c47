"""How far the parts of a network moved from where training started (pure torch).

``drift(part) = ‖θ_part − θ₀_part‖ / ‖θ₀_part‖`` with every parameter of the part as one vector (float64
sums of squares). Every trainer of this package logs it for the encoder (nnU-Net's ``encoder``: blocks
1..N, bottleneck included), the decoder (blocks N+1..2N−1) and the segmentation heads at the end of
training and writes it to ``transfer_config.json``, so a frozen part (0 exactly), an L2-SP-anchored
part (how strongly λ held it) and a freely fine-tuned one can be read side by side.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import torch

from nnunet_transfer.checkpoints import load_state

#: parts reported, in this order
PARTS = ("encoder", "decoder", "seg")


@torch.no_grad()
def relative_distance(names: Iterable[str], start: Mapping[str, torch.Tensor],
                      now: Mapping[str, torch.Tensor]) -> float | None:
    """``‖now − start‖ / ‖start‖`` over ``names`` (None without names or when ``start`` is all zero)."""
    num = den = 0.0
    seen = False
    for n in names:
        a = start[n].detach().to("cpu", torch.float64)
        b = now[n].detach().to("cpu", torch.float64)
        num += float(((b - a) ** 2).sum())
        den += float((a ** 2).sum())
        seen = True
    if not seen or den == 0:
        return None
    return math.sqrt(num) / math.sqrt(den)


def part_names(model) -> dict[str, list[str]]:
    """Canonical parameter names of encoder, decoder and heads from a :class:`~nnunet_transfer.blocks.BlockModel`."""
    enc = [n for b in model.blocks if b.group in ("encoder", "bottleneck") for n in b.param_names]
    dec = [n for b in model.blocks if b.group == "decoder" for n in b.param_names]
    return {"encoder": enc, "decoder": dec, "seg": list(model.seg_param_names)}


def group_drift(model, start: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """``{"encoder": …, "decoder": …, "seg": …}`` relative distances from ``start`` (names present in both)."""
    out = {}
    for part, names in part_names(model).items():
        names = [n for n in names if n in start and n in now]
        out[part] = relative_distance(names, start, now)
    return out


def drift_from_file(model, start_file: str | os.PathLike, now: Mapping[str, torch.Tensor]
                    ) -> dict[str, float | None] | None:
    """:func:`group_drift` against the weights of ``start_file`` (a snapshot-layout file such as a run's
    ``start_weights.pth``); None when the file does not exist (a run started before this package wrote it)."""
    if not os.path.isfile(start_file):
        return None
    return group_drift(model, load_state(start_file), now)


__all__ = ["PARTS", "relative_distance", "part_names", "group_drift", "drift_from_file"]
