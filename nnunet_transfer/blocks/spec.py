"""The block-spec grammar: which blocks, bottleneck halves, heads and parameter kinds a spec selects.

It needs only the stage count ``N``; :class:`~nnunet_transfer.blocks.model.BlockModel` resolves a
:class:`Selection` against a real network. Blocks are numbered as in :mod:`nnunet_transfer.blocks.model`.

Spec grammar
------------
A spec is terms joined by ``+`` (union); whitespace is ignored, names are case-insensitive::

    spec   := term ("+" term)*
    term   := unit [":" kind ("," kind)*]
    unit   := group | "blocks:" items | preset
    group  := "encoder" (blocks 1..N, bottleneck included: nnU-Net's ``encoder`` module)
            | "decoder" (blocks N+1..2N−1) | "bottleneck" (block N)
            | "seg" (the segmentation heads) | "all" (every block and seg)
    items  := item ("," item)*      item := k | a "-" b | N "a" | N "b"   (1 <= k, a <= b <= 2N−1)
    kind   := "norm" (weight and bias of normalisation layers) | "bias" (every bias: convolutions
              and normalisation layers) | "kernel" (convolution / linear kernels)

A kind narrows its term to those parameters of the unit: ``all:norm+seg`` tunes the normalisation
parameters and the heads (norm-only tuning), ``all:bias+seg`` every bias and the heads (BitFit, Ben Zaken
et al., ACL 2022), ``encoder:kernel`` the encoder's kernels (what Li et al.'s L2-SP anchors). Kinds select
*parameters*: module and layer selections (``analyze`` hooks block outputs) refuse them.

``Na`` and ``Nb`` are the two halves of the bottleneck (block N) along the path: ``Na`` its first
⌊c/2⌋ convolutions (``PlainConvUNet``; residual blocks for the residual encoders), ``Nb`` the rest, so
an odd count gives the middle one to ``Nb`` and a one-conv bottleneck is all ``Nb``. Amiri et al. split
the network "precisely in half by path length, splitting in the middle of the bottleneck layer": the
contracting half is blocks 1..N−1 + ``Na``, the expanding half ``Nb`` + blocks N+1..2N−1.

Other layouts
-------------
A spec is parsed against a :class:`Layout`: how many encoder and decoder blocks a network has and whether it
has a bottleneck. A U-Net of ``N`` stages is ``Layout.unet(N)`` (an ``int`` is read as that). A Primus
transformer (:mod:`nnunet_transfer.blocks.model`) with ``D`` transformer blocks and ``S`` up-projection stages
is ``Layout.transformer(D, S)``: ``encoder`` is blocks 1..D (the patch embedding is in block 1, as a U-Net's
stem), ``decoder`` blocks D+1..D+S, ``blocks:1-6`` the first six transformer blocks; it has no bottleneck,
so ``bottleneck``, the halves and Amiri's presets (defined on a U-Net) are refused with the reason.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

from nnunet_transfer.blocks.presets import _PRESETS_LOWER, PRESETS, _r
from nnunet_transfer.errors import ArchitectureError, SpecError

GROUPS = ("encoder", "bottleneck", "decoder", "seg", "all")
#: parameter kinds a term narrows to with ``unit:kind`` (see the grammar above)
KINDS = {"norm": "weight and bias of normalisation layers",
         "bias": "every bias, of convolutions and of normalisation layers",
         "kernel": "convolution / linear kernels"}
_KIND_ALIASES = {"norms": "norm", "biases": "bias", "kernels": "kernel"}


@dataclass(frozen=True)
class Layout:
    """How a network's blocks are numbered: encoder blocks ``1..n_encoder``, decoder blocks after them.

    A U-Net (``bottleneck=True``): ``n_encoder = N`` (block N is the bottleneck), ``n_decoder = N − 1``. A
    transformer such as Primus (``bottleneck=False``): ``n_encoder`` transformer blocks and ``n_decoder``
    up-projection stages (0 for a one-step up-projection)."""

    n_encoder: int
    n_decoder: int
    bottleneck: bool = True
    name: str = "U-Net"

    @classmethod
    def unet(cls, n_stages: int) -> "Layout":
        if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 2:
            raise ValueError(f"n_stages must be an int >= 2, got {n_stages!r}")
        return cls(n_stages, n_stages - 1, True, "U-Net")

    @classmethod
    def transformer(cls, depth: int, n_decoder: int, name: str = "Primus") -> "Layout":
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1 or n_decoder < 0:
            raise ValueError(f"a transformer layout needs depth >= 1 and n_decoder >= 0, got {depth!r}, {n_decoder!r}")
        return cls(depth, n_decoder, False, name)

    @property
    def n_blocks(self) -> int:
        return self.n_encoder + self.n_decoder

    @property
    def n_stages(self) -> int:
        """A U-Net's stage count N; a network without U-Net stages raises :class:`ArchitectureError`."""
        if not self.bottleneck:
            raise ArchitectureError(f"a {self.name} has no U-Net stages (its encoder is {self.n_encoder} transformer "
                                    f"blocks, its decoder {self.n_decoder} up-projection stages); this operation is "
                                    f"defined for the convolutional U-Nets only")
        return self.n_encoder

    def describe(self) -> str:
        if self.bottleneck:
            return f"N={self.n_encoder} stages"
        return f"{self.n_encoder} transformer blocks, {self.n_decoder} decoder stages"


def as_layout(layout: "Layout | int") -> Layout:
    """A :class:`Layout`; an ``int`` is a U-Net's stage count."""
    return layout if isinstance(layout, Layout) else Layout.unet(layout)


def _units_text(blocks: Iterable[int], halves: Iterable[str], seg: bool) -> list[str]:
    parts = ["blocks " + format_block_ranges(blocks)] if blocks else []
    return parts + sorted(halves) + (["seg"] if seg else [])


@dataclass(frozen=True)
class KindPart:
    """Only the parameters of one kind (:data:`KINDS`) inside some units, e.g. the norms of blocks 1..9."""

    kind: str
    blocks: frozenset[int]
    halves: frozenset[str]
    seg: bool

    def describe(self) -> str:
        return f"{self.kind} of {' + '.join(_units_text(self.blocks, self.halves, self.seg))}"


@dataclass(frozen=True)
class Selection:
    """What a spec selects: whole blocks, bottleneck halves, whether the segmentation heads are in, and
    the kind-qualified parts (``all:norm`` -> the norm parameters of every block and of seg)."""

    spec: str
    layout: Layout
    blocks: frozenset[int]
    seg: bool
    #: bottleneck halves selected without the whole bottleneck: ``"Na"`` (contracting side), ``"Nb"``
    halves: frozenset[str] = frozenset()
    #: one entry per kind, units already selected whole removed
    parts: tuple[KindPart, ...] = ()

    def describe(self) -> str:
        """``"blocks 1-4 + 5a + seg"``, ``"seg + norm of blocks 1-9"``: compact, for logs and tables."""
        parts = _units_text(self.blocks, self.halves, self.seg) + [p.describe() for p in self.parts]
        return " + ".join(parts) if parts else "nothing"

    @property
    def n_stages(self) -> int:
        """The U-Net stage count the spec was parsed for (:attr:`Layout.n_stages`)."""
        return self.layout.n_stages

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.parts)

    def refuse_kinds(self, what: str) -> None:
        """Raise :class:`SpecError` if the spec narrows terms to parameter kinds (``what`` says why not)."""
        if self.parts:
            raise SpecError(f"spec {self.spec!r} narrows terms to parameter kinds ({', '.join(self.kinds)}), "
                            f"which select parameters, not modules; {what}")


def _normalise(n: int, blocks: set[int], halves: set[str]) -> tuple[frozenset[int], frozenset[str]]:
    """Both halves make the whole bottleneck; a half of a selected bottleneck is already in."""
    if {f"{n}a", f"{n}b"} <= halves:
        blocks = blocks | {n}
    if n in blocks:
        halves = set()
    return frozenset(blocks), frozenset(halves)


def format_block_ranges(numbers: Iterable[int]) -> str:
    """``{1, 2, 3, 8, 9}`` -> ``"1-3,8-9"``."""
    nums = sorted(set(numbers))
    out: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def _grammar_help(layout: Layout | int) -> str:
    lay = as_layout(layout)
    top = lay.n_blocks
    if not lay.bottleneck:
        groups = [g for g in GROUPS if g != "bottleneck"]
        return (f"a term is a group ({', '.join(groups)}) or 'blocks:' with numbers and ranges in 1..{top} (e.g. "
                f"blocks:1-{max(1, lay.n_encoder // 2)}), optionally narrowed to parameter kinds with ':' "
                f"({', '.join(KINDS)}; e.g. all:norm); join terms with '+'")
    n = lay.n_encoder
    return (f"a term is a group ({', '.join(GROUPS)}), 'blocks:' with numbers and ranges in 1..{top} "
            f"and the bottleneck halves {n}a/{n}b (e.g. blocks:1,2,{top - 1}-{top}), or a preset "
            f"({', '.join(PRESETS)}), optionally narrowed to parameter kinds with ':' ({', '.join(KINDS)}; "
            f"e.g. all:norm); join terms with '+'")


def _split_kinds(term: str) -> tuple[str, str | None]:
    """``"all:norm,bias"`` -> ``("all", "norm,bias")``; ``"blocks:1,2:norm"`` -> ``("blocks:1,2", "norm")``."""
    if term.lower().startswith("blocks:"):
        body, sep, kinds = term[len("blocks:"):].partition(":")
        unit = term[:len("blocks:")] + body
    else:
        unit, sep, kinds = term.partition(":")
    return (unit.strip(), kinds) if sep else (term, None)


def _parse_kinds(kinds: str | None, term: str, spec: str) -> tuple[str, ...]:
    if kinds is None:
        return ()
    out = []
    for raw in kinds.split(","):
        k = raw.strip().lower()
        k = _KIND_ALIASES.get(k, k)
        if k not in KINDS:
            close = difflib.get_close_matches(k, list(KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"unknown parameter kind {raw.strip()!r} in term {term!r} of spec {spec!r}{hint}; "
                            f"kinds: " + ", ".join(f"{name} ({doc})" for name, doc in KINDS.items())
                            + "; join several with ',' (e.g. all:norm,bias)")
        out.append(k)
    return tuple(dict.fromkeys(out))


def _range_text(layout: Layout | int) -> str:
    lay = as_layout(layout)
    n, top = lay.n_encoder, lay.n_blocks
    if not lay.bottleneck:
        dec = f"decoder {n + 1}..{top}" if lay.n_decoder else "no decoder block"
        return (f"valid range 1..{top} for this network ({lay.name}: transformer blocks 1..{n}, the patch "
                f"embedding in block 1; {dec})")
    return (f"valid range 1..{top} for this network (N={n} stages: encoder 1..{n - 1}, "
            f"bottleneck {n}, decoder {n + 1}..{top})")


def _parse_blocks_term(term: str, body: str, spec: str, layout: Layout) -> tuple[set[int], set[str]]:
    top = layout.n_blocks
    n_stages = layout.n_encoder
    items = [s.strip() for s in body.split(",")]
    if not body.strip() or any(not s for s in items):
        raise SpecError(f"malformed term {term!r} in spec {spec!r}: 'blocks:' needs comma-separated "
                        f"numbers or ranges without empty items, e.g. blocks:1,2,{max(1, top - 1)}-{top}")
    out: set[int] = set()
    halves: set[str] = set()
    for item in items:
        h = re.fullmatch(r"(\d+)\s*([abAB])", item)
        if h:
            k = int(h.group(1))
            if not layout.bottleneck:
                raise SpecError(f"item {item!r} in spec {spec!r}: a {layout.name} has no bottleneck to split in "
                                f"halves; {_range_text(layout)}")
            if k != n_stages:
                raise SpecError(f"item {item!r} in spec {spec!r}: only the bottleneck (block {n_stages} of this "
                                f"network) has halves, {n_stages}a and {n_stages}b; {_range_text(layout)}")
            halves.add(f"{k}{h.group(2).lower()}")
            continue
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", item)
        if not m:
            expected = (f"a block number (e.g. 3), a range (e.g. 2-4) or a bottleneck half ({n_stages}a, "
                        f"{n_stages}b)" if layout.bottleneck else "a block number (e.g. 3) or a range (e.g. 2-4)")
            raise SpecError(f"malformed item {item!r} in term {term!r} of spec {spec!r}: expected {expected}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if a > b:
            raise SpecError(f"malformed range {item!r} in spec {spec!r}: it runs backwards; write {b}-{a}")
        for k in (a, b):
            if not 1 <= k <= top:
                raise SpecError(f"block {k} in spec {spec!r} is out of range: {_range_text(layout)}")
        out.update(_r(a, b))
    return out, halves


def parse_spec(spec: str, n_stages: int | Layout) -> Selection:
    """Parse ``spec`` for a U-Net with ``n_stages`` stages, or for a :class:`Layout` (e.g. a Primus).

    Raises :class:`SpecError` for an empty spec, a malformed term, an out-of-range block, an unknown
    name (with the list of what exists and the closest match) or a preset that is degenerate at this
    ``n_stages`` (or is given for a network that is not a U-Net).
    """
    if isinstance(n_stages, Layout):
        layout = n_stages
    else:
        if not isinstance(n_stages, int) or n_stages < 2:
            raise ValueError(f"n_stages must be an int >= 2, got {n_stages!r}")
        layout = Layout.unet(n_stages)
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string, got {type(spec).__name__} {spec!r}")
    if not spec.strip():
        raise SpecError(f"the spec is empty and selects nothing; {_grammar_help(layout)}")
    n = layout.n_encoder  # a U-Net's N; a transformer's depth (no bottleneck: no halves are ever found)
    blocks: set[int] = set()
    halves: set[str] = set()
    seg = False
    by_kind: dict[str, tuple[set[int], set[str], list[bool]]] = {}
    for raw in spec.split("+"):
        term = raw.strip()
        if not term:
            raise SpecError(f"malformed spec {spec!r}: empty term (a '+' with nothing on one side); "
                            f"{_grammar_help(layout)}")
        unit, kinds_text = _split_kinds(term)
        try:
            more, more_halves, more_seg = _parse_unit(unit, spec, layout)
        except SpecError:
            if kinds_text is not None and not unit.lower().startswith("blocks:"):
                _parse_unit(term, spec, layout)  # "blokcs:1": the error (and its hint) names the whole term
            raise
        kinds = _parse_kinds(kinds_text, term, spec)
        if not kinds:
            blocks |= more
            halves |= more_halves
            seg = seg or more_seg
        for k in kinds:
            b, h, s = by_kind.setdefault(k, (set(), set(), [False]))
            b |= more
            h |= more_halves
            s[0] = s[0] or more_seg
    whole, part = _normalise(n, blocks, halves)
    parts = []
    for kind in KINDS:  # fixed order: the same spec always gives the same Selection
        if kind not in by_kind:
            continue
        b, h, s = by_kind[kind]
        kb, kh = _normalise(n, b, h)
        kb = kb - whole
        kh = frozenset() if n in whole else kh - part
        ks = s[0] and not seg
        if kb or kh or ks:  # units selected whole already hold every kind
            parts.append(KindPart(kind, kb, kh, ks))
    return Selection(spec=spec, layout=layout, blocks=whole, seg=seg, halves=part, parts=tuple(parts))


def _parse_unit(term: str, spec: str, layout: Layout) -> tuple[set[int], set[str], bool]:
    """One term without its kinds -> (blocks, bottleneck halves, seg)."""
    low = term.lower()
    n, top = layout.n_encoder, layout.n_blocks
    if low.startswith("blocks:"):
        more, more_halves = _parse_blocks_term(term, term[len("blocks:"):], spec, layout)
        return more, more_halves, False
    if low == "encoder":
        return set(_r(1, n)), set(), False
    if low == "bottleneck":
        if not layout.bottleneck:
            raise SpecError(f"term {term!r} in spec {spec!r}: a {layout.name} has no bottleneck (its encoder is "
                            f"{n} transformer blocks); name transformer blocks instead, e.g. blocks:{n}; "
                            f"{_range_text(layout)}")
        return {n}, set(), False
    if low == "decoder":
        return set(_r(n + 1, top)), set(), False
    if low == "seg":
        return set(), set(), True
    if low == "all":
        return set(_r(1, top)), set(), True
    if low in _PRESETS_LOWER:
        p = _PRESETS_LOWER[low]
        if not layout.bottleneck:
            raise SpecError(f"preset {p.name!r} is one of Amiri's strategies for a U-Net ({p.rule}); a "
                            f"{layout.name} has no U-Net stages. Select transformer blocks with blocks:... "
                            f"({_range_text(layout)})")
        if n < p.min_stages:
            raise SpecError(
                f"preset {p.name!r} ({p.rule}) needs a network with at least {p.min_stages} stages "
                f"({p.why_min}); this network has N={n}. Select the blocks explicitly instead "
                f"with blocks:... ({_range_text(layout)})")
        return set(p.blocks(n)), set(p.halves(n)), False
    names = [*GROUPS, *PRESETS, "blocks:"] if layout.bottleneck else [
        *(g for g in GROUPS if g != "bottleneck"), "blocks:"]
    close = difflib.get_close_matches(low, [x.lower() for x in names], n=1)
    hint = ""
    if close:
        hint = f" (did you mean {next(x for x in names if x.lower() == close[0])!r}?)"
    elif re.fullmatch(r"[\d,\s-]+", term):
        hint = f" (block numbers need the prefix: blocks:{term})"
    raise SpecError(f"unknown term {term!r} in spec {spec!r}{hint}; {_grammar_help(layout)}")


def spec_blocks(spec: str, n_stages: int | Layout) -> list[int]:
    """The sorted block numbers a spec selects (``seg`` is not a block and is not listed)."""
    return sorted(parse_spec(spec, n_stages).blocks)
