"""Amiri's 12 fine-tuning strategies as presets of the block-spec grammar (:mod:`.spec`).

Presets never include ``seg``: nnU-Net re-initialises the heads when it loads
``-pretrained_weights``, so a trainer decides about them. The preset trainers follow the paper, whose 1×1
output convolution is part of block 2N−1: the heads come from the checkpoint and train with a preset that
includes 2N−1, and stay frozen at the pretrained weights with one that leaves it out
(:mod:`nnunet_transfer.trainers.freezing`).

Presets — Amiri's 12 fine-tuning strategies, generalised to any N (numbers follow the order of the
strategy list this package was specified with; the sets for N = 5 are those of the paper's 9-block
U-Net; its Table II gives the share of parameters each trains, which the tests reproduce):

====  ==================  ==============================  ================  =========
 #    preset              blocks (any N)                  N = 5             min N
====  ==================  ==============================  ================  =========
 1    whole               1..2N−1                         1–9               2
 2    contracting         1..N−1 + Na                     1–4 + 5a          2
 3    expanding           Nb + N+1..2N−1                  5b + 6–9          2
 4    exceptBottleneck    all but N                       1–4, 6–9          2
 5    bottleneck          N                               5                 2
 6    outer               {1, 2, 2N−2, 2N−1}              1, 2, 8, 9        4
 7    inner               3..2N−3                         3–7               4
 8    first               {1}                             1                 2
 9    last                {2N−1}                          9                 2
10    firstLast           {1, 2N−1}                       1, 9              2
11    first2              1..h, h = ⌈(N−1)/2⌉             1, 2              4
12    deepEncoder         h+1..N−1                        3, 4              4
====  ==================  ==============================  ================  =========

``first2`` and ``deepEncoder`` are the two halves of the contracting path's N−1 encoder blocks (Amiri:
"the first two blocks (1,2) or the second half of the encoder (3,4)"); for an odd count the first half
has the extra block (N = 4: {1, 2} and {3}; N = 6: {1, 2, 3} and {4, 5}).

Why the minimum N: ``outer`` is the two outer resolution levels on both sides and ``inner`` the rest;
at N = 3 they would equal ``exceptBottleneck`` and ``bottleneck``. At N = 3 the contracting path has
two blocks, so ``first2`` would equal ``first`` and ``deepEncoder`` would be block 2 alone.
Degenerate presets are refused, not silently reduced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable


@dataclass(frozen=True)
class Preset:
    """One of Amiri's fine-tuning strategies as a function of the stage count ``N``."""

    name: str
    amiri: int
    rule: str
    min_stages: int
    why_min: str
    _blocks: Callable[[int], Iterable[int]] = field(repr=False, compare=False)

    def units(self, n_stages: int) -> frozenset[int | str]:
        """Block numbers and bottleneck halves (``"Na"``, ``"Nb"``) for ``n_stages`` stages (no minimum check)."""
        return frozenset(self._blocks(n_stages))

    def blocks(self, n_stages: int) -> frozenset[int]:
        """The whole blocks for a network with ``n_stages`` stages (no minimum check)."""
        return frozenset(u for u in self.units(n_stages) if isinstance(u, int))

    def halves(self, n_stages: int) -> frozenset[str]:
        """The bottleneck halves (``"Na"`` / ``"Nb"``) the preset takes."""
        return frozenset(u for u in self.units(n_stages) if isinstance(u, str))


def _r(a: int, b: int) -> range:
    return range(a, b + 1)


def _half_encoder(n: int) -> int:
    """Blocks in the first half of the contracting path's N−1 encoder blocks (the odd one goes first)."""
    return -(-(n - 1) // 2)


_PRESET_LIST = (
    Preset("whole", 1, "1..2N-1", 2, "", lambda n: _r(1, 2 * n - 1)),
    Preset("contracting", 2, "1..N-1 + Na", 2, "", lambda n: [*_r(1, n - 1), f"{n}a"]),
    Preset("expanding", 3, "Nb + N+1..2N-1", 2, "", lambda n: [f"{n}b", *_r(n + 1, 2 * n - 1)]),
    Preset("exceptBottleneck", 4, "all but N", 2, "",
           lambda n: [k for k in _r(1, 2 * n - 1) if k != n]),
    Preset("bottleneck", 5, "N", 2, "", lambda n: [n]),
    Preset("outer", 6, "{1,2,2N-2,2N-1}", 4, "at N=3 it equals exceptBottleneck",
           lambda n: [1, 2, 2 * n - 2, 2 * n - 1]),
    Preset("inner", 7, "3..2N-3", 4, "at N=3 it equals bottleneck", lambda n: _r(3, 2 * n - 3)),
    Preset("first", 8, "{1}", 2, "", lambda n: [1]),
    Preset("last", 9, "{2N-1}", 2, "", lambda n: [2 * n - 1]),
    Preset("firstLast", 10, "{1,2N-1}", 2, "", lambda n: [1, 2 * n - 1]),
    Preset("first2", 11, "1..ceil((N-1)/2)", 4, "at N=3 it equals first",
           lambda n: _r(1, _half_encoder(n))),
    Preset("deepEncoder", 12, "ceil((N-1)/2)+1..N-1", 4, "at N=3 it is block 2 alone",
           lambda n: _r(_half_encoder(n) + 1, n - 1)),
)
#: Presets by their canonical (camelCase) name, in Amiri order.
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}
_PRESETS_LOWER = {name.lower(): p for name, p in PRESETS.items()}


def preset_names() -> list[str]:
    """Canonical preset names in Amiri order (1–12)."""
    return list(PRESETS)

