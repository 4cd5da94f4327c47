"""The U-Net block model: which parameters and modules of a real network each block holds.

Block model
-----------
A U-Net with ``N`` resolution stages (nnU-Net plans give 4–8) has ``2N − 1`` blocks, numbered along
the path an image takes (Amiri et al., "Fine-tuning U-Net for ultrasound image segmentation:
different layers, different outcomes", IEEE TUFFC 2020, https://doi.org/10.1109/TUFFC.2020.3015081)::

    1 ─────────────────────────────── 2N−1        resolution level 0 (full resolution)
      2 ─────────────────────── 2N−2              level 1
        …                   …
          N−1 ───────── N+1                       level N−2
                   N                              level N−1 (bottleneck)

=========  ============  ===================================================================
block      group         modules (dynamic-network-architectures 0.4.4)
=========  ============  ===================================================================
1          encoder       ``encoder.stem`` (ResEnc only) + ``encoder.stages.0``
2..N−1     encoder       ``encoder.stages.{k−1}``
N          bottleneck    ``encoder.stages.{N−1}``
N+1..2N−1  decoder       ``decoder.transpconvs.{j}`` + ``decoder.stages.{j}``, j = k − N − 1
seg        seg           ``decoder.seg_layers.*`` (all deep-supervision heads)
=========  ============  ===================================================================

Decoder index 0 is the *deepest* decoder stage, so block ``N+1+j`` holds decoder index ``j`` and
block ``2N − k`` works at the resolution of block ``k``. Depth, both of Amiri's schemes:

* scheme 1 (path order): depth = block number, 1..2N−1;
* scheme 2 (distance from the top of the "U" through the skip connections): blocks ``k`` and
  ``2N − k`` have depth ``k``, the bottleneck has depth ``N``.

Primus (dynamic-network-architectures' ViT: a patch embedding, ``D`` Eva transformer blocks, a light
up-projection of ``S`` stages) has ``D + S − 1`` blocks, no bottleneck and no skip connections
(:meth:`Layout.transformer <nnunet_transfer.blocks.spec.Layout.transformer>`)::

    =========  ========  ============================================================================
    block      group     modules / parameters
    =========  ========  ============================================================================
    1          encoder   ``down_projection`` (patch embedding) + ``eva.pos_embed`` + ``register_tokens``
                         + ``eva.blocks.0``
    2..D       encoder   ``eva.blocks.{k−1}``; block D also ``eva.norm`` (the encoder's last norm)
    D+1..      decoder   ``up_projection.decode.{j}``, j = k − D − 1 (transposed conv, LayerNormNd, GELU)
    seg        seg       ``up_projection.decode.{S−1}``: the last transposed conv, to the classes
    =========  ========  ============================================================================

The positional embedding and the register tokens go with the patch embedding, as nnU-Net master's
``PretrainedTrainer.load_pretrained_weights`` loads them with the stem and encoder (``key_to_lpe``
``eva.pos_embed``); ``S`` is the up-projection's length (log2 of the largest patch-embedding side). Depth in
both schemes is the block number (there are no skip connections); the resolution level of every encoder block
is ``S`` (the token grid), decoder block ``D+1+j`` works at level ``S − 1 − j``.

Parameter names are those of the *unwrapped* network's ``named_parameters()``: wrappers
(``module.``, ``_orig_mod.``) are removed once by :func:`nnunet_transfer.netutil.unwrap`, and the
aliases dynamic-network-architectures creates (``decoder.encoder`` *is* the encoder, every conv is
also ``all_modules.k``) are resolved by module identity, so each parameter belongs to exactly one
block or to ``seg``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from nnunet_transfer.blocks.spec import KINDS, KindPart, Layout, Selection, _range_text, parse_spec
from nnunet_transfer.errors import ArchitectureError, SpecError
from nnunet_transfer.netutil import KERNEL_MODULES, primus_module, unwrap

SUPPORTED_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.ResidualUNet",
    "dynamic_network_architectures.architectures.primus.Primus",
)


@dataclass(frozen=True)
class Block:
    """One U-Net block. ``param_names`` are canonical names in ``named_parameters()`` order."""

    number: int
    group: str  # 'encoder' | 'bottleneck' | 'decoder'
    module_names: tuple[str, ...]
    output_module: str  # the module whose output is this block's output (for forward hooks)
    param_names: tuple[str, ...]
    n_params: int
    depth_scheme1: int
    depth_scheme2: int
    resolution_level: int  # 0 = full resolution, N-1 = bottleneck
    #: the bottleneck's two halves along the path, ``(("Na", modules, params, count), ("Nb", …))``;
    #: empty for every other block
    halves: tuple[tuple[str, tuple[str, ...], tuple[str, ...], int], ...] = ()

    def half(self, name: str) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        for h in self.halves:
            if h[0] == name:
                return h
        raise SpecError(f"block {self.number} has no half {name!r}")


def _path_units(module: nn.Module, prefix: str) -> list[str]:
    """Names of the bottleneck's units along the path: its convolution blocks (``StackedConvBlocks.convs``)
    or residual blocks (``StackedResidualBlocks.blocks``)."""
    for name, m in module.named_modules():
        for attr in ("convs", "blocks"):
            seq = getattr(m, attr, None)
            if isinstance(seq, nn.Sequential) and len(seq):
                base = f"{prefix}.{name}.{attr}" if name else f"{prefix}.{attr}"
                return [f"{base}.{i}" for i in range(len(seq))]
    return [prefix]


def _bottleneck_halves(net: nn.Module, number: int, module_name: str, names: tuple[str, ...]):
    """Split the bottleneck in the middle of its path: the first ⌊c/2⌋ units, then the rest."""
    units = _path_units(net.get_submodule(module_name), module_name)
    cut = len(units) // 2
    params = dict(net.named_parameters())
    out = []
    for tag, mods in (("a", units[:cut]), ("b", units[cut:])):
        mine = tuple(p for p in names if any(p.startswith(m + ".") for m in mods))
        out.append((f"{number}{tag}", tuple(mods), mine, sum(params[p].numel() for p in mine)))
    covered = set(out[0][2]) | set(out[1][2])
    rest = tuple(p for p in names if p not in covered)
    if rest:  # parameters outside the units (none in dynamic-network-architectures 0.4.4): second half
        tag, mods, mine, count = out[1]
        out[1] = (tag, mods, mine + rest, count + sum(params[p].numel() for p in rest))
    return tuple(out)


def _supported_classes() -> tuple[type, ...]:
    from dynamic_network_architectures.architectures.unet import (
        PlainConvUNet,
        ResidualEncoderUNet,
        ResidualUNet,
    )
    return PlainConvUNet, ResidualEncoderUNet, ResidualUNet


def _primus_class() -> type:
    return primus_module().Primus


def is_primus(network: nn.Module) -> bool:
    """Whether ``network`` (wrappers removed) is a Primus of dynamic-network-architectures (or a subclass)."""
    return isinstance(unwrap(network), _primus_class())


def _unsupported(net: nn.Module, why: str) -> ArchitectureError:
    cls = type(net)
    return ArchitectureError(
        f"{cls.__module__}.{cls.__qualname__} is not supported by the U-Net block model ({why}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (and their subclasses)")


@dataclass(frozen=True)
class BlockModel:
    """Blocks of a PlainConvUNet / ResidualEncoderUNet / ResidualUNet with any stage count, or of a Primus.

    Build it with :meth:`from_network`; it holds only names and counts, no reference to the network.
    """

    architecture: str
    layout: Layout
    blocks: tuple[Block, ...]
    seg_module_names: tuple[str, ...]
    seg_param_names: tuple[str, ...]
    n_seg_params: int
    #: canonical parameter names of each kind (:data:`KINDS`) and the size of every parameter
    kind_names: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, hash=False)
    param_sizes: dict[str, int] = field(default_factory=dict, repr=False, hash=False)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_network(cls, network: nn.Module) -> "BlockModel":
        """Describe ``network`` (DDP / ``torch.compile`` wrappers are removed first)."""
        net = unwrap(network)
        if isinstance(net, _primus_class()):
            layout, specs, seg_modules = _primus_units(net)
        elif isinstance(net, _supported_classes()):
            layout, specs, seg_modules = _unet_units(net)
        else:
            raise _unsupported(net, "not a convolutional U-Net or a Primus of dynamic-network-architectures")
        n = layout.n_encoder

        # Assign by module identity, then name by the canonical (first registered) name, so the
        # aliases (decoder.encoder, all_modules.k) cannot put a parameter in two places.
        params = dict(net.named_parameters())
        canonical = {id(p): name for name, p in params.items()}
        order = {pid: i for i, pid in enumerate(canonical)}
        owner: dict[int, str] = {}

        def collect(mod_names: Iterable[str], label: str) -> tuple[tuple[str, ...], int]:
            ids = []
            for m in mod_names:
                # a unit is a module, or a parameter held directly by a module (Primus' eva.pos_embed)
                found = [params[m]] if m in params else net.get_submodule(m).parameters()
                for p in found:
                    if id(p) in owner and owner[id(p)] != label:
                        raise _unsupported(net, f"parameter {canonical[id(p)]} is shared by "
                                                f"{owner[id(p)]} and {label}")
                    if id(p) not in owner:
                        owner[id(p)] = label
                        ids.append(id(p))
            ids.sort(key=order.__getitem__)
            return tuple(canonical[i] for i in ids), sum(params[canonical[i]].numel() for i in ids)

        blocks = []
        for k, group, mods, extra, out, depth2, level in specs:
            names, count = collect(mods + extra, f"block {k}")
            halves = _bottleneck_halves(net, k, mods[-1], names) if layout.bottleneck and k == n else ()
            blocks.append(Block(number=k, group=group, module_names=mods, output_module=out,
                                param_names=names, n_params=count, depth_scheme1=k,
                                depth_scheme2=depth2, resolution_level=level, halves=halves))
        seg_names, seg_count = collect(seg_modules, "seg")
        missing = [name for pid, name in canonical.items() if pid not in owner]
        if missing:
            raise _unsupported(net, f"{len(missing)} parameter(s) belong to no block, e.g. "
                                    f"{missing[:3]}")
        cls_ = type(net)
        return cls(architecture=cls_.__name__, layout=layout, blocks=tuple(blocks),
                   seg_module_names=seg_modules, seg_param_names=seg_names, n_seg_params=seg_count,
                   kind_names=_kind_names(net, canonical), param_sizes={k: v.numel() for k, v in params.items()})

    # ---- plain facts --------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        """A U-Net's stage count N; a Primus raises :class:`ArchitectureError` (it has no U-Net stages)."""
        return self.layout.n_stages

    @property
    def n_blocks(self) -> int:
        return self.layout.n_blocks

    @property
    def all_param_names(self) -> tuple[str, ...]:
        """Every parameter: blocks 1..2N−1 in order, then the seg heads."""
        return tuple(n for b in self.blocks for n in b.param_names) + self.seg_param_names

    @property
    def n_params(self) -> int:
        return sum(b.n_params for b in self.blocks) + self.n_seg_params

    def block(self, number: int) -> Block:
        if not 1 <= number <= self.n_blocks:
            raise SpecError(f"block {number} is out of range: {_range_text(self.layout)}")
        return self.blocks[number - 1]

    # ---- spec resolution ----------------------------------------------------------------------------
    def select(self, spec: str | Selection) -> Selection:
        if isinstance(spec, Selection):
            if spec.layout != self.layout:
                raise SpecError(f"selection {spec.spec!r} was parsed for {spec.layout.describe()}; "
                                f"this network has {self.layout.describe()}")
            return spec
        return parse_spec(spec, self.layout)

    def _unit_names(self, blocks: Iterable[int], halves: Iterable[str], seg: bool) -> set[str]:
        names = {n for k in blocks for n in self.blocks[k - 1].param_names}
        names |= {n for h in halves for n in self.block(self.layout.n_encoder).half(h)[2]}
        return names | set(self.seg_param_names) if seg else names

    def _part_names(self, sel: Selection) -> list[tuple[KindPart, set[str]]]:
        return [(p, self._unit_names(p.blocks, p.halves, p.seg) & self.kind_names.get(p.kind, frozenset()))
                for p in sel.parts]

    def param_names(self, spec: str | Selection) -> set[str]:
        """Canonical names of the parameters a spec selects; raises if it selects none, or if a
        kind-qualified term finds no parameter of its kind (e.g. ``seg:norm``: the heads have no norms)."""
        sel = self.select(spec)
        names = self._unit_names(sel.blocks, sel.halves, sel.seg)
        for part, mine in self._part_names(sel):
            if not mine:
                raise SpecError(f"spec {sel.spec!r}: {part.describe()} matches no parameter of this "
                                f"{self.architecture} (it has no {part.kind} parameters there: "
                                f"{part.kind} = {KINDS[part.kind]})")
            names |= mine
        if not names:
            raise SpecError(f"spec {sel.spec!r} ({sel.describe()}) matches no parameter of this "
                            f"{self.architecture}")
        return names

    def module_names(self, spec: str | Selection) -> list[str]:
        """Names of the modules a spec selects, in block order (seg heads last)."""
        sel = self.select(spec)
        sel.refuse_kinds("give whole blocks or groups here")
        units: list[tuple[int, list[str]]] = [(k, list(self.blocks[k - 1].module_names)) for k in sel.blocks]
        n = self.layout.n_encoder
        units += [(n, list(self.block(n).half(h)[1])) for h in sorted(sel.halves)]
        out = [m for _, mods in sorted(units, key=lambda u: u[0]) for m in mods]
        return out + (list(self.seg_module_names) if sel.seg else [])

    def n_selected(self, spec: str | Selection) -> int:
        """Parameters (scalars) a spec selects; 0 when it selects nothing."""
        sel = self.select(spec)
        whole = (sum(self.blocks[k - 1].n_params for k in sel.blocks)
                 + sum(self.block(self.layout.n_encoder).half(h)[3] for h in sel.halves)
                 + (self.n_seg_params if sel.seg else 0))
        if not sel.parts:
            return whole
        extra = set().union(*(mine for _, mine in self._part_names(sel)))
        extra -= self._unit_names(sel.blocks, sel.halves, sel.seg)
        return whole + sum(self.param_sizes[n] for n in extra)

    def _kind_mark(self, sel: Selection, names: Iterable[str]) -> str:
        """``"norm,bias: 1,234"``: the kinds selected inside a unit and how many scalars they are."""
        names = set(names)
        kinds, chosen = [], set()
        for part, mine in self._part_names(sel):
            if mine & names:
                kinds.append(part.kind)
                chosen |= mine & names
        return f"{','.join(kinds)}: {sum(self.param_sizes[n] for n in chosen):,}" if kinds else ""

    def _train_mark(self, sel: Selection, b: Block) -> str:
        if b.number in sel.blocks:
            return "yes"
        mine = sorted(h for h in sel.halves if b.halves and h in (x[0] for x in b.halves))
        marks = ["half " + ",".join(mine)] if mine else []
        kind = self._kind_mark(sel, b.param_names)
        return "; ".join(marks + ([kind] if kind else [])) or "-"

    def output_modules(self, spec: str | Selection) -> dict[int, str]:
        """``{block number: name of the module whose output is the block's output}``."""
        sel = self.select(spec)
        sel.refuse_kinds("a layer's output has no kind: name whole blocks (drop the ':kind')")
        return {k: self.blocks[k - 1].output_module for k in sorted(sel.blocks)}

    # ---- presentation -------------------------------------------------------------------------------
    def to_dict(self, spec: str | Selection | None = None) -> dict:
        """Everything :meth:`table` shows, plus parameter names, as JSON-ready data."""
        sel = self.select(spec) if spec is not None else None
        total = self.n_params
        chosen = self.param_names(sel) if sel is not None and sel.parts else set()

        def frac(c: int) -> float:
            return c / total if total else 0.0

        rows = []
        for b in self.blocks:
            row = {"block": b.number, "group": b.group, "modules": list(b.module_names),
                   "output_module": b.output_module, "n_params": b.n_params,
                   "fraction": frac(b.n_params), "depth_scheme1": b.depth_scheme1,
                   "depth_scheme2": b.depth_scheme2, "resolution_level": b.resolution_level,
                   "param_names": list(b.param_names)}
            if b.halves:
                row["halves"] = [{"half": h, "modules": list(m), "n_params": c, "fraction": frac(c)}
                                 for h, m, _, c in b.halves]
            if sel is not None:
                row["trainable"] = b.number in sel.blocks
                if b.halves:
                    row["trainable_halves"] = sorted(h for h in sel.halves if h.startswith(str(b.number)))
                if sel.parts:
                    row["trainable_kinds"] = [p.kind for p, mine in self._part_names(sel)
                                              if mine & set(b.param_names)]
                    row["n_selected"] = sum(self.param_sizes[n] for n in chosen if n in set(b.param_names))
            rows.append(row)
        seg = {"modules": list(self.seg_module_names), "n_params": self.n_seg_params,
               "fraction": frac(self.n_seg_params), "param_names": list(self.seg_param_names)}
        if sel is not None:
            seg["trainable"] = sel.seg
            if sel.parts:
                seg["trainable_kinds"] = [p.kind for p, mine in self._part_names(sel)
                                          if mine & set(self.seg_param_names)]
                seg["n_selected"] = sum(self.param_sizes[n] for n in chosen if n in set(self.seg_param_names))
        out = {"architecture": self.architecture,
               "n_stages": self.layout.n_encoder if self.layout.bottleneck else None,
               "layout": {"n_encoder": self.layout.n_encoder, "n_decoder": self.layout.n_decoder,
                          "bottleneck": self.layout.bottleneck, "name": self.layout.name},
               "n_blocks": self.n_blocks,
               "n_params": total, "blocks": rows, "seg": seg}
        if sel is not None:
            n_train = self.n_selected(sel)
            out["spec"] = {"spec": sel.spec, "blocks": sorted(sel.blocks), "halves": sorted(sel.halves),
                           "seg": sel.seg, "n_trainable_params": n_train, "trainable_fraction": frac(n_train),
                           "kinds": [{"kind": p.kind, "blocks": sorted(p.blocks), "halves": sorted(p.halves),
                                      "seg": p.seg} for p in sel.parts]}
        return out

    def table(self, spec: str | Selection | None = None) -> str:
        """A text table in the manner of Amiri's Table II; with ``spec`` a ``train`` column."""
        sel = self.select(spec) if spec is not None else None
        total = self.n_params

        def pct(c: int) -> str:
            if not total:
                return "-"
            share = 100.0 * c / total
            return "<0.01%" if 0 < share < 0.005 else f"{share:.2f}%"

        header = ["block", "group", "modules", "params", "share", "depth1", "depth2", "level"]
        if sel is not None:
            header.append("train")
        rows = []
        for b in self.blocks:
            row = [str(b.number), b.group, " + ".join(b.module_names), f"{b.n_params:,}",
                   pct(b.n_params), str(b.depth_scheme1), str(b.depth_scheme2), str(b.resolution_level)]
            if sel is not None:
                row.append(self._train_mark(sel, b))
            rows.append(row)
        seg_text = (f"decoder.seg_layers.0-{self.layout.n_encoder - 2}" if self.layout.bottleneck
                    else " + ".join(self.seg_module_names))
        seg_row = ["seg", "seg", seg_text, f"{self.n_seg_params:,}",
                   pct(self.n_seg_params), "-", "-", "-"]
        if sel is not None:
            seg_row.append("yes" if sel.seg else (self._kind_mark(sel, self.seg_param_names) or "-"))
        rows.append(seg_row)
        total_row = ["total", "", "", f"{total:,}", pct(total), "", "", ""]
        if sel is not None:
            n_train = self.n_selected(sel)
            total_row.append(f"{n_train:,} ({pct(n_train)})")
        rows.append(total_row)
        right = {3, 4, 5, 6, 7}
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
            return "  ".join(cells).rstrip()

        title = (f"{self.architecture}: {self.layout.describe()}, {self.n_blocks} blocks, "
                 f"{total:,} parameters")
        if sel is not None:
            title += f"; spec {sel.spec!r} trains {sel.describe()}"
        lines = [title, fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows[:-1]),
                 fmt(["-" * w for w in widths]), fmt(rows[-1])]
        return "\n".join(lines)


#: one unit of a block: (number, group, modules, parameters held directly by a module, output module,
#: depth in Amiri's scheme 2, resolution level)
_Unit = tuple[int, str, tuple[str, ...], tuple[str, ...], str, int, int]


def _unet_units(net: nn.Module) -> tuple[Layout, list[_Unit], tuple[str, ...]]:
    enc, dec = net.encoder, net.decoder
    n = len(enc.stages)
    if n < 2:
        raise _unsupported(net, f"it has {n} stage(s); a U-Net needs at least 2")
    for part in ("stages", "transpconvs", "seg_layers"):
        got = len(getattr(dec, part))
        if got != n - 1:
            raise _unsupported(net, f"decoder.{part} has {got} entries, expected N-1 = {n - 1} "
                                    f"for {n} encoder stages")
    specs: list[_Unit] = []
    for k in range(1, n + 1):
        mods = (f"encoder.stages.{k - 1}",)
        if k == 1 and getattr(enc, "stem", None) is not None:
            mods = ("encoder.stem",) + mods
        specs.append((k, "bottleneck" if k == n else "encoder", mods, (), f"encoder.stages.{k - 1}",
                      min(k, 2 * n - k), min(k, 2 * n - k) - 1))
    for j in range(n - 1):
        k = n + 1 + j
        specs.append((k, "decoder", (f"decoder.transpconvs.{j}", f"decoder.stages.{j}"), (),
                      f"decoder.stages.{j}", min(k, 2 * n - k), min(k, 2 * n - k) - 1))
    return Layout.unet(n), specs, tuple(f"decoder.seg_layers.{j}" for j in range(n - 1))


def _primus_units(net: nn.Module) -> tuple[Layout, list[_Unit], tuple[str, ...]]:
    """Primus: patch embedding + transformer blocks (encoder), up-projection stages (decoder), last stage (seg)."""
    depth = len(net.eva.blocks)
    decode = net.up_projection.decode
    n_dec = len(decode) - 1  # the last entry is the projection to the classes: the heads
    if depth < 1:
        raise _unsupported(net, "its Eva encoder has no transformer block")
    params = dict(net.named_parameters())
    # parameters outside the transformer blocks that travel with the stem (nnU-Net master loads them with it)
    extra_first = tuple(p for p in ("eva.pos_embed", "register_tokens") if p in params)
    specs: list[_Unit] = []
    for k in range(1, depth + 1):
        mods = (f"eva.blocks.{k - 1}",)
        if k == 1:
            mods = ("down_projection",) + mods
        if k == depth:
            mods = mods + ("eva.norm",)
        specs.append((k, "encoder", mods, extra_first if k == 1 else (),
                      "eva.norm" if k == depth else f"eva.blocks.{k - 1}", k, n_dec + 1))
    for j in range(n_dec):
        k = depth + 1 + j
        specs.append((k, "decoder", (f"up_projection.decode.{j}",), (), f"up_projection.decode.{j}", k,
                      n_dec - j))
    return Layout.transformer(depth, n_dec, type(net).__name__), specs, (f"up_projection.decode.{n_dec}",)


def _norm_classes() -> tuple[type, ...]:
    from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd

    return (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LayerNormNd, *(
        (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _kind_names(net: nn.Module, canonical: dict[int, str]) -> dict[str, frozenset[str]]:
    """Canonical parameter names of each kind: norm layers' parameters (Primus' ``LayerNormNd`` included), every
    ``bias``, conv/linear kernels."""
    norms = _norm_classes()
    out: dict[str, set[str]] = {k: set() for k in KINDS}
    for module in net.modules():
        for local, p in module.named_parameters(recurse=False):
            name = canonical[id(p)]
            if isinstance(module, norms):
                out["norm"].add(name)
            if local == "bias":
                out["bias"].add(name)
            if local == "weight" and isinstance(module, KERNEL_MODULES):
                out["kernel"].add(name)
    return {k: frozenset(v) for k, v in out.items()}


def primus_class_named(class_name: str | None) -> type | None:
    """The Primus class (or subclass) a plans' ``network_class_name`` names; None for any other class."""
    import pydoc

    if not isinstance(class_name, str) or not class_name:
        return None
    cls = pydoc.locate(class_name)
    if not isinstance(cls, type) or not any("Primus" in c.__name__ for c in cls.__mro__):
        return None  # a U-Net: no need to import Primus (and timm) to know
    return cls if issubclass(cls, _primus_class()) else None


def layout_from_architecture(architecture: dict) -> Layout | None:
    """The block layout a plans configuration's ``architecture`` entry describes, without building the network:
    a U-Net's ``n_stages``; a Primus' ``eva_depth`` and up-projection stages (log2 of the largest
    ``patch_embed_size`` side, the last of them the heads). None for an architecture this package does not
    describe (the trainer reports it when it builds the network)."""
    import math

    kw = architecture.get("arch_kwargs", {}) or {}
    cls = primus_class_named(architecture.get("network_class_name"))
    if cls is not None:
        depth, patch = kw.get("eva_depth"), kw.get("patch_embed_size")
        if "config_name" in kw:  # PrimusX variants: depth from dynamic-network-architectures' table
            depth = primus_module()._PRIMUS_CONFIGS.get(kw["config_name"], {}).get("eva_depth")
        if not isinstance(depth, int) or not patch:
            return None
        n_up = int(math.log(max(patch)) / math.log(2))  # PatchDecode's num_stages, as it computes it
        return Layout.transformer(depth, max(n_up - 1, 0), cls.__name__)
    n_stages = kw.get("n_stages")
    if isinstance(n_stages, int) and not isinstance(n_stages, bool) and n_stages >= 2:
        return Layout.unet(n_stages)
    return None


def block_model(network_or_model: nn.Module | BlockModel) -> BlockModel:
    if isinstance(network_or_model, BlockModel):
        return network_or_model
    return BlockModel.from_network(network_or_model)


def resolve_spec(network_or_model: nn.Module | BlockModel, spec: str | Selection) -> set[str]:
    """Canonical parameter names (of the unwrapped network) that ``spec`` selects."""
    return block_model(network_or_model).param_names(spec)
