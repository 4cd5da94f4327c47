"""How far the weights moved between two networks (Karimi et al. 2021, Section 3.3, Fig. 8–9).

Three relative changes, all in float64:

* **pooled** — ``‖W₁ − W₀‖_F / ‖W₀‖_F`` over all kernels of a conv (block, group) together;
* **per filter**, as the paper reports it ("the average relative change in the norm of the filters"
  from the start of training to convergence) — for a conv with filters ``f = 1..F``

  .. math::  \\bar r = \\frac{1}{F} \\sum_f \\frac{\\lVert W_1[f] - W_0[f] \\rVert}{\\lVert W_0[f] \\rVert}

  where a filter is one output channel's kernel: ``W[f]`` of a ``Conv`` weight ``(out, in, k…)`` and
  ``W[:, f]`` of a ``ConvTranspose`` weight ``(in, out, k…)``. A block's (group's) value is the mean
  over every filter of its convs, each filter counted once. Filters whose start norm is 0 have no
  relative change; they are left out of the mean and counted (``zero_filters``);
* **per filter, change of the norm** — the literal reading of the same sentence, the relative change
  *in the norm*: ``|‖W₁[f]‖ − ‖W₀[f]‖| / ‖W₀[f]‖``, averaged the same way (``filter_norm_ratio``). It is
  at most the first (triangle inequality) and is 0 for a filter that only rotates.

The pooled value is dominated by the largest filters; the per-filter means weigh every filter alike. The
paper does not say which per-filter reading it computed; both are reported.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_transfer import blocks
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.netutil import ALL_CONV_TYPES, TRANSPOSED_TYPES

#: the groups a parameter belongs to: the block-spec groups but ``all``
GROUPS = tuple(g for g in blocks.GROUPS if g != "all")


def relative_change(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """``‖w₁ − w₀‖ / ‖w₀‖`` over the concatenation of the tensors (float64 Frobenius norms)."""
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for b, a in zip(before, after))
    den = sum(float((b.double() ** 2).sum()) for b in before)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def _filters(before: torch.Tensor, after: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both kernels as ``(F, rest)`` float64, one row per filter."""
    if before.shape != after.shape:
        raise ValueError(f"kernels differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    if before.ndim < 2:
        raise ValueError(f"a conv kernel has at least 2 axes (filters, inputs, ...), got {tuple(before.shape)}")
    w0, w1 = before.detach().double(), after.detach().double()
    if transposed:
        w0, w1 = w0.transpose(0, 1), w1.transpose(0, 1)
    return w0.reshape(w0.shape[0], -1), w1.reshape(w1.shape[0], -1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def filter_changes(before: torch.Tensor, after: torch.Tensor, *, transposed: bool = False) -> np.ndarray:
    """``‖W₁[f] − W₀[f]‖ / ‖W₀[f]‖`` for every filter ``f`` of one conv kernel, shape ``(F,)`` float64.

    ``transposed``: the kernel is a ``ConvTranspose`` weight ``(in, out, k…)``, whose filter ``f`` is
    ``W[:, f]``. A filter with ``‖W₀[f]‖ = 0`` gives NaN.
    """
    w0, w1 = _filters(before, after, transposed)
    return _ratio(torch.linalg.vector_norm(w1 - w0, dim=1).cpu().numpy(),
                  torch.linalg.vector_norm(w0, dim=1).cpu().numpy())


def filter_norm_changes(before: torch.Tensor, after: torch.Tensor, *, transposed: bool = False) -> np.ndarray:
    """``|‖W₁[f]‖ − ‖W₀[f]‖| / ‖W₀[f]‖`` for every filter ``f`` (the relative change *in the norm*), ``(F,)``.

    Filters as in :func:`filter_changes`; a filter with ``‖W₀[f]‖ = 0`` gives NaN.
    """
    w0, w1 = _filters(before, after, transposed)
    n0 = torch.linalg.vector_norm(w0, dim=1).cpu().numpy()
    n1 = torch.linalg.vector_norm(w1, dim=1).cpu().numpy()
    return _ratio(np.abs(n1 - n0), n0)


def _filter_summary(ratios: Sequence[np.ndarray], norm_ratios: Sequence[np.ndarray]) -> dict:
    def flat(rs):
        return np.concatenate([np.asarray(r, dtype=np.float64) for r in rs]) if len(rs) else np.zeros(0)

    allr, alln = flat(ratios), flat(norm_ratios)
    ok, okn = allr[np.isfinite(allr)], alln[np.isfinite(alln)]  # the same filters: ‖W₀[f]‖ > 0
    return {"filters": int(allr.size), "zero_filters": int(allr.size - ok.size),
            "filter_ratio": float(ok.mean()) if ok.size else float("nan"),
            "filter_norm_ratio": float(okn.mean()) if okn.size else float("nan")}


def conv_modules(model: BlockModel, network: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(module name, owner, module)`` of every convolution, owner ``block<k>`` or ``seg``, in path order."""
    owners = [(f"block{b.number}", name) for b in model.blocks for name in b.module_names]
    owners += [("seg", name) for name in model.seg_module_names]
    out = []
    for owner, prefix in owners:
        for name, mod in network.get_submodule(prefix).named_modules():
            if isinstance(mod, ALL_CONV_TYPES):
                out.append((f"{prefix}.{name}" if name else prefix, owner, mod))
    return out


def weight_change(model: BlockModel, before: nn.Module, after: nn.Module) -> dict[str, list[dict]]:
    """Tables ``conv``, ``block`` and ``group`` of the weight change between two networks.

    ``conv``: each convolution's kernel — pooled ``ratio`` = ``‖ΔW‖ / ‖W₀‖``, ``filter_ratio``, the
    mean per-filter change, and ``filter_norm_ratio``, the mean per-filter change of the norm (module
    docstring); ``block``: a block's conv kernels together
    (``conv_ratio``, pooled), all its parameters (``param_ratio``, norms and biases included) and the
    means over its filters (``filter_ratio``, ``filter_norm_ratio``); ``group``: encoder (blocks 1..N−1), bottleneck, decoder,
    seg — pooled kernels, the mean/median/max of the per-conv pooled ratios, and the mean over the
    group's filters (both readings).
    """
    convs_b = conv_modules(model, before)
    convs_a = {name: mod for name, _, mod in conv_modules(model, after)}
    params_b, params_a = dict(before.named_parameters()), dict(after.named_parameters())
    group_of = {f"block{b.number}": (b.group, b.resolution_level, b.number) for b in model.blocks}
    group_of["seg"] = ("seg", 0, None)
    conv_rows, per_filter, per_norm = [], {}, {}
    for name, owner, mod in convs_b:
        w0, w1 = mod.weight.detach(), convs_a[name].weight.detach()
        g, level, block = group_of[owner]
        per_filter[name] = filter_changes(w0, w1, transposed=isinstance(mod, TRANSPOSED_TYPES))
        per_norm[name] = filter_norm_changes(w0, w1, transposed=isinstance(mod, TRANSPOSED_TYPES))
        conv_rows.append({"conv": name, "layer": owner, "block": block, "group": g, "level": level,
                          "shape": list(w0.shape), "norm_start": float(w0.double().norm()),
                          "norm_change": float((w1.double() - w0.double()).norm()),
                          "ratio": relative_change([w0], [w1]),
                          **_filter_summary([per_filter[name]], [per_norm[name]])})
    block_rows = []
    owners = [(f"block{b.number}", b.param_names) for b in model.blocks] + [("seg", model.seg_param_names)]
    for owner, pnames in owners:
        g, level, block = group_of[owner]
        convs = [(n, mod) for n, o, mod in convs_b if o == owner]
        block_rows.append({"layer": owner, "block": block, "group": g, "level": level, "convs": len(convs),
                           "conv_ratio": relative_change([mod.weight.detach() for _, mod in convs],
                                                         [convs_a[n].weight.detach() for n, _ in convs]),
                           "param_ratio": relative_change([params_b[p].detach() for p in pnames],
                                                          [params_a[p].detach() for p in pnames]),
                           "mean_conv_ratio": float(np.mean([r["ratio"] for r in conv_rows if r["layer"] == owner])),
                           **_filter_summary([per_filter[n] for n, _ in convs], [per_norm[n] for n, _ in convs])})
    group_rows = []
    for g in GROUPS:
        convs = [(n, mod) for n, o, mod in convs_b if group_of[o][0] == g]
        ratios = [r["ratio"] for r in conv_rows if r["group"] == g]
        group_rows.append({"group": g, "convs": len(convs),
                           "conv_ratio": relative_change([mod.weight.detach() for _, mod in convs],
                                                         [convs_a[n].weight.detach() for n, _ in convs]),
                           "mean_conv_ratio": float(np.mean(ratios)), "median_conv_ratio": float(np.median(ratios)),
                           "max_conv_ratio": float(np.max(ratios)),
                           **_filter_summary([per_filter[n] for n, _ in convs], [per_norm[n] for n, _ in convs])})
    return {"conv": conv_rows, "block": block_rows, "group": group_rows}


def middle_slice(kernel: torch.Tensor) -> np.ndarray:
    """(…, kd, kh, kw) -> middle (kh, kw) slice; 2-D kernels unchanged."""
    k = kernel.detach().double().cpu().numpy()
    while k.ndim > 2:
        k = k[k.shape[0] // 2]
    return k


__all__ = ["GROUPS", "conv_modules", "filter_changes", "filter_norm_changes", "middle_slice", "relative_change",
           "weight_change"]
