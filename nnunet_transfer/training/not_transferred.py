"""What did not come from the source: which parameters, how many train because of the rule, and the log line.

A parameter outside the segmentation heads that ``-pretrained_weights`` did not bring (re-initialised, or new
after ``weights adapt``) is treated alike by every strategy: none freezes or anchors it unless ``freeze_reinit``
keeps it frozen; the heads follow ``freeze_seg``. The counts go to ``transfer_state["not_transferred"]`` (and so
to every checkpoint and ``transfer_config.json``) as::

    {"tensors", "parameters", "trained_in_full_by_rule", "frozen_by_freeze_reinit", ...strategy counts}

where a strategy adds its own counts (L2-SP: ``l2sp_beta``, ``l2sp_not_anchored``; LoRA:
``lora_convs_without_adapter``), which :func:`not_transferred_text` reads.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from nnunet_transfer.checkpoints import is_seg_key
from nnunet_transfer.plans.provenance import source_param_names


def source_names(network: nn.Module | Iterable[str], record: Mapping | None,
                 heads: Mapping | None) -> frozenset[str] | None:
    """Parameters of ``network`` (the network, or its canonical parameter names) that came from the source
    (``record``: the run's transfer record; ``heads``: its head-copy record, whose rows count as transferred only
    when every target label got one). None without a record: the network counts as a whole."""
    return source_param_names(record, network, heads_transferred=bool(heads and heads.get("copied")
                                                                      and not heads.get("new")))


def not_transferred_names(params: Mapping[str, torch.Tensor], source: frozenset[str] | None) -> set[str]:
    """Names in ``params`` outside the heads and outside ``source`` (empty when ``source`` is None)."""
    if source is None:
        return set()
    return {n for n in params if n not in source and not is_seg_key(n)}


def spare_not_transferred(params: Mapping[str, torch.Tensor], fresh: set[str], names: set[str] | None, *,
                          freeze_reinit: bool) -> tuple[set[str] | None, dict[str, int]]:
    """``(what trains, counts)``: ``names`` (what the strategy trains; None = all) plus the ``fresh`` parameters it
    would freeze, unless ``freeze_reinit``; ``counts`` in scalars, as ``transfer_state["not_transferred"]`` holds
    them."""
    sizes = {n: p.numel() for n, p in params.items()}
    spared = set() if names is None else fresh - names
    counts = {"tensors": len(fresh), "parameters": sum(sizes[n] for n in fresh),
              "trained_in_full_by_rule": 0 if freeze_reinit else sum(sizes[n] for n in spared),
              "frozen_by_freeze_reinit": sum(sizes[n] for n in spared) if freeze_reinit else 0}
    return (names if names is None or freeze_reinit else names | spared), counts


def not_transferred_text(nt: Mapping[str, Any] | None) -> str | None:
    """The log line for ``transfer_state["not_transferred"]``; None when everything came from the source."""
    nt = nt or {}
    if not nt.get("tensors"):
        return None
    rules = [f"{nt['trained_in_full_by_rule']:,} would be frozen by this strategy and train in full"
             if nt["trained_in_full_by_rule"] else "",
             f"{nt['frozen_by_freeze_reinit']:,} stay frozen (freeze_reinit=true)"
             if nt["frozen_by_freeze_reinit"] else "",
             f"L2-SP anchors none of them, {nt['l2sp_beta']:,} are in its beta group" if "l2sp_beta" in nt else "",
             f"{nt['lora_convs_without_adapter']} convolution(s) train in full instead of carrying adapters"
             if nt.get("lora_convs_without_adapter") else ""]
    return (f"{nt['parameters']:,} parameters in {nt['tensors']} tensors did not come from the source "
            f"(re-initialised or new in the `weights adapt` report): "
            + ("; ".join(r for r in rules if r) or "they train as every other parameter"))
