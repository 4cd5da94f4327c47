"""The U-Net block model and the block-spec grammar: one vocabulary for what trains, what L2-SP
anchors and which layers ``analyze`` hooks.

Three jobs, one module each:

* :mod:`.model` — :class:`BlockModel`: the ``2N − 1`` blocks (and the heads) of a real network, by
  parameter and module name (the numbering, Amiri et al. 2020, is drawn there), or a Primus' patch embedding
  and transformer blocks, up-projection stages and heads;
* :mod:`.spec` — the grammar: :func:`parse_spec` turns ``"encoder:kernel+seg"`` into a
  :class:`Selection` for a stage count ``N``, without a network;
* :mod:`.presets` — Amiri's 12 fine-tuning strategies as functions of ``N`` (:data:`PRESETS`).

This package's face exports the public names; import them from here.
"""
from nnunet_transfer.blocks.model import (
    SUPPORTED_ARCHITECTURES,
    Block,
    BlockModel,
    block_model,
    is_primus,
    layout_from_architecture,
    primus_class_named,
    resolve_spec,
)
from nnunet_transfer.blocks.presets import PRESETS, Preset, preset_names
from nnunet_transfer.blocks.spec import (
    GROUPS,
    KINDS,
    KindPart,
    Layout,
    Selection,
    as_layout,
    format_block_ranges,
    parse_spec,
    spec_blocks,
)

__all__ = ["GROUPS", "KINDS", "PRESETS", "SUPPORTED_ARCHITECTURES", "Block", "BlockModel", "KindPart", "Layout",
           "Preset", "Selection", "as_layout", "block_model", "format_block_ranges", "is_primus",
           "layout_from_architecture", "parse_spec", "preset_names", "primus_class_named", "resolve_spec",
           "spec_blocks"]
