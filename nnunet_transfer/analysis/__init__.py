"""Representation analysis: how similar are two networks' layers?

Notebook use::

    from nnunet_transfer.analysis import pwcca, similarity, PairMoments
    pwcca(x, y)                      # x: (samples, cx), y: (samples, cy), numpy or torch
    similarity(x, y).as_dict()       # all four measures, null baselines, dead/rank counts

    acc = PairMoments(cx, cy)        # streaming: exact, O((cx + cy)²) memory
    for xb, yb in chunks:
        acc.update(xb, yb)
    acc.results()
"""

from .moments import PairMoments
from .similarity import (
    MIN_SAMPLES_PER_CHANNEL,
    RELATIVE_EPS,
    SimilarityResult,
    SimilarityWarning,
    canonical_correlations,
    linear_cka,
    mean_cca,
    null_permutation,
    pwcca,
    similarity,
    similarity_from_statistics,
    svcca,
)

__all__ = [
    "MIN_SAMPLES_PER_CHANNEL",
    "RELATIVE_EPS",
    "PairMoments",
    "SimilarityResult",
    "SimilarityWarning",
    "canonical_correlations",
    "linear_cka",
    "mean_cca",
    "null_permutation",
    "pwcca",
    "similarity",
    "similarity_from_statistics",
    "svcca",
]
