"""Representation analysis: how similar are two networks' layers?

Notebook use::

    from nnunet_transfer.analysis import pwcca, similarity, PairMoments
    pwcca(x, y)                      # x: (samples, cx), y: (samples, cy), numpy or torch
    similarity(x, y).as_dict()       # all four measures, null baselines, dead/rank counts

    acc = PairMoments(cx, cy)        # streaming: exact, O((cx + cy)²) memory
    for xb, yb in chunks:
        acc.update(xb, yb)
    acc.results()

Studies on nnU-Net runs (``nnunet_transfer analyze``; imported on first use, they need torch and
nnU-Net)::

    from nnunet_transfer.analysis import run_evolution
    run_evolution(fold_folder, dataset=902, configuration="target", out="analysis/evolution")
"""

from . import similarity as _similarity
from .moments import PairMoments
from .similarity import *  # noqa: F403 -- the measures are this package's face: its __all__ is theirs

# name -> submodule; loaded lazily so that the measures above stay a numpy-only import
_LAZY = {
    "run_compare": "karimi", "run_evolution": "karimi", "run_groups": "karimi", "run_reuse": "karimi",
    "run_weights": "karimi", "open_analysis": "session", "permutation_test": "stats",
    "weight_change": "weight_change", "filter_changes": "weight_change", "convergence_epoch": "runs",
    "resolve_network": "runs", "PatchSource": "activations", "select_layers": "activations",
    "default_layer_blocks": "activations",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PairMoments", *_similarity.__all__, *_LAZY]
