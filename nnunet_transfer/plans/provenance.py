"""What ``-pretrained_weights`` brought into a network, as a trainer records it: a plain same-plans load or
a ``weights adapt`` file (whose report lists what came from the source), and from it the one answer every
strategy uses, which parameters were transferred (:func:`source_param_names`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import LoadedWeights, is_seg_key
from nnunet_transfer.errors import ArchitectureError
from nnunet_transfer.netutil import unwrap


def transfer_record(weights: LoadedWeights, network: nn.Module, *, loaded_keys: int,
                    report: Mapping | None = None) -> dict:
    """What ``-pretrained_weights`` brings into ``network``: the adapt report of an adapted file (or ``report``,
    the mapping this package's loader applies to an nnssl checkpoint), or a plain same-plans load (every tensor
    but the heads). ``loaded_keys`` from :func:`checkpoints.compare`."""
    if report is None:
        report = weights.adapted if isinstance(getattr(weights, "adapted", None), Mapping) else None
    if report is not None and report.get("kind") == "adapted":
        keep = ("origin", "source", "target", "architecture", "source_stages", "target_stages", "seed", "channels",
                "method", "total", "heads", "dropped")
        return {"kind": "adapted", "file": str(weights.path), **{k: report.get(k) for k in keep},
                "blocks": [{k: b.get(k) for k in ("block", "group", "params", "from_source", "share", "copied",
                                                  "mapped", "channels", "reinit", "not_transferable", "new",
                                                  "fresh")} for b in report.get("blocks", [])]}
    record: dict[str, Any] = {"kind": "same-plans", "file": str(weights.path), "loaded_keys": loaded_keys}
    if report is not None:  # an --in-channels-only rewrite
        record["channels"] = report.get("in_channels")
        record["method"] = report.get("method")
    try:
        model = BlockModel.from_network(network)
    except ArchitectureError:
        return record
    params = sum(b.n_params for b in model.blocks)
    record["total"] = {"params": params, "from_source": params, "share": 1.0}
    return record


def fresh_names(record: Mapping | None) -> dict[int, list[str]]:
    """Per block, the parameters that did not come from the source (empty for same-plans loads)."""
    if not record or record.get("kind") != "adapted":
        return {}
    return {int(b["block"]): list(b.get("fresh") or []) for b in record.get("blocks", []) if b.get("fresh")}


def source_param_names(record: Mapping | None, network: nn.Module | Iterable[str], *,
                       heads_transferred: bool = False) -> frozenset[str] | None:
    """Canonical names of ``network``'s parameters whose values came from the source checkpoint (``network``: the
    network, or its canonical parameter names).

    The one decision every strategy uses for what was transferred (the freezing trainers' refusal, the
    parameters L2-SP anchors, what LoRA adapts and what norm-only / BitFit / a stage may freeze).
    ``record`` is what ``-pretrained_weights`` brings (:func:`transfer_record`):

    * a same-plans load: every parameter but the segmentation heads (nnU-Net's loader refuses a file that
      lacks one, and never loads ``.seg_layers.``);
    * a ``weights adapt`` file: the parameters its report lists as copied, mapped or channel-adapted — not those
      re-initialised, not transferable or new (absent from the checkpoint).

    The heads count only with ``heads_transferred`` (the ``heads`` setting copied a row for every target label).
    ``None`` when no pretrained weights are known (``record`` None): callers then treat the network as a whole.
    """
    if not record:
        return None
    names = [n for n, _ in unwrap(network).named_parameters()] if isinstance(network, nn.Module) else list(network)
    fresh = {n for block in fresh_names(record).values() for n in block}
    return frozenset(n for n in names if n not in fresh and (heads_transferred or not is_seg_key(n)))


def record_text(record: Mapping) -> str:
    """One log line for a transfer record."""
    total = record.get("total") or {}
    if record.get("kind") == "adapted" and record.get("origin") == "nnssl":
        via = "" if record.get("source") == record.get("file") else f" (through {record.get('file')})"
        return (f"encoder and stem of the nnssl checkpoint {record.get('source')}{via}: {total.get('share', 0):.1%} of "
                f"the {total.get('params', 0):,} parameters outside the heads came from it; the decoder and the "
                f"heads start fresh")
    if record.get("kind") == "adapted":
        partial = [f"{b['block']} ({b['share']:.0%})" for b in record.get("blocks", []) if b["share"] < 1]
        return (f"weights adapted by `weights adapt` from {record.get('source')}: {total.get('share', 0):.1%} of the "
                f"{total.get('params', 0):,} parameters outside the heads came from the source; blocks not fully "
                f"from it: {', '.join(partial) or 'none'}")
    channels = f", first convolution adapted to {record['channels'][1]} channels" if record.get("channels") else ""
    return (f"same-plans load from {record.get('file')}: every tensor but the segmentation heads "
            f"({record.get('loaded_keys')} state_dict keys){channels}")


__all__ = ["transfer_record", "fresh_names", "source_param_names", "record_text"]
