"""The report of ``weights adapt``: what each target tensor got, per tensor and per block.

What each target tensor gets
----------------------------
``copied``
    a source tensor of equal shape, bit for bit.
``mapped``
    a convolution / transposed convolution of equal widths whose kernel differs: the kernel rule
    (:mod:`nnunet_transfer.plans.kernels`).
``channels``
    the first convolution with another input channel count: adapted as ``--in-channels`` does
    (:func:`nnunet_transfer.plans.weights.adapt_first_conv`), then the kernel rule.
``reinit``
    a convolution whose output width matches but whose **input** width differs (the stage before it has
    another width): weight and bias keep the fresh initialisation and are listed.
``not_transferable``
    a tensor whose own width differs (the stage's features differ), or a kernel change without a rule:
    fresh initialisation — never reshaped, sliced or padded.
``new``
    no counterpart in the source (an extra stage, an extra convolution in a stage): fresh initialisation.
``head``
    the segmentation heads: nnU-Net never loads ``.seg_layers.``; the file carries the source's rows when
    their input width fits (for the ``heads`` setting), otherwise the fresh ones. Not counted in the share.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: actions whose tensors came from the source (and count toward the share)
FROM_SOURCE = ("copied", "mapped", "channels")
#: actions whose tensors keep the target's fresh initialisation
FRESH = ("reinit", "not_transferable", "new")
ACTIONS = FROM_SOURCE + FRESH + ("head",)
_STAGE_MODULE = re.compile(r"^(encoder\.stem|encoder\.stages\.\d+|decoder\.(?:stages|transpconvs|seg_layers)\.\d+)")


def stage_module(name: str) -> str:
    m = _STAGE_MODULE.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


@dataclass
class TensorAction:
    name: str  # canonical target name
    action: str  # one of ACTIONS
    source: str | None  # canonical source name
    source_shape: list[int] | None
    target_shape: list[int]
    numel: int
    reason: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "action": self.action, "source": self.source, "source_shape": self.source_shape,
                "target_shape": self.target_shape, "reason": self.reason}


@dataclass
class BlockRow:
    block: int
    group: str
    params: int
    counts: dict[str, int]  # parameters per action
    source_modules: list[str]  # source stages its tensors came from
    fresh: list[str]  # parameter names that keep the fresh initialisation

    @property
    def from_source(self) -> int:
        return sum(self.counts.get(a, 0) for a in FROM_SOURCE)

    @property
    def share(self) -> float:
        return self.from_source / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        return {"block": self.block, "group": self.group, "params": self.params, "from_source": self.from_source,
                "share": self.share, **{a: self.counts.get(a, 0) for a in FROM_SOURCE + FRESH},
                "source_modules": self.source_modules, "fresh": self.fresh}


@dataclass
class AdaptReport:
    source: str
    target: str
    architecture: str
    source_stages: int
    target_stages: int
    seed: int
    blocks: list[BlockRow]
    heads: dict[str, Any]
    tensors: list[TensorAction]
    dropped: dict[str, int]  # source stage module -> tensors not used
    channels: list[int] | None = None  # [C, K] when the first conv was adapted
    method: str | None = None
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    #: what the source was: "weights adapt" (an nnU-Net network) or "nnssl" (an nnssl checkpoint's encoder + stem)
    origin: str = "weights adapt"

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def from_source(self) -> int:
        return sum(b.from_source for b in self.blocks)

    @property
    def share(self) -> float:
        """Share of the target's parameters outside the heads that came from the source."""
        return self.from_source / self.params if self.params else 0.0

    def by_action(self, action: str) -> list[TensorAction]:
        return [t for t in self.tensors if t.action == action]

    def to_dict(self) -> dict:
        return {"kind": "adapted", "version": 1, "origin": self.origin, "source": self.source, "target": self.target,
                "architecture": self.architecture, "source_stages": self.source_stages,
                "target_stages": self.target_stages, "seed": self.seed, "channels": self.channels,
                "method": self.method, "output": self.output,
                "total": {"params": self.params, "from_source": self.from_source, "share": self.share},
                "blocks": [b.to_dict() for b in self.blocks], "heads": self.heads,
                "tensors": [t.to_dict() for t in self.tensors], "dropped": self.dropped, "notes": self.notes}

    def text(self) -> str:
        what = "weights adapt" if self.origin == "weights adapt" else f"{self.origin} encoder + stem"
        out = [f"{what}: {self.source} -> {self.target} ({self.architecture}, {self.target_stages} stages; "
               f"the checkpoint has {self.source_stages})",
               f"{'block':>5}  {'group':<10} {'parameters':>10}  {'from source':>11}  {'copied':>8} {'mapped':>8} "
               f"{'re-init':>8} {'not transf.':>11} {'new':>8}"]
        for b in self.blocks:
            c = b.counts
            out.append(f"{b.block:>5}  {b.group:<10} {b.params:>10,}  {b.share:>10.1%}  {c.get('copied', 0):>8,} "
                       f"{c.get('mapped', 0) + c.get('channels', 0):>8,} {c.get('reinit', 0):>8,} "
                       f"{c.get('not_transferable', 0):>11,} {c.get('new', 0):>8,}")
        out.append(f"{'seg':>5}  {'heads':<10} {self.heads['params']:>10,}  never loaded by -pretrained_weights "
                   f"(setting heads); source rows carried: {self.heads['carried']}")
        out.append(f"total: {self.share:.1%} of the target's {self.params:,} parameters outside the heads came from "
                   f"the source ({self.from_source:,})")
        for action, title in (("channels", "first convolution, input channels adapted"),
                              ("mapped", "kernel-mapped (rule in `weights adapt --help`)"),
                              ("reinit", "re-initialised (input width changed)"),
                              ("not_transferable", "not transferable (kept nnU-Net's initialisation)")):
            items = self.by_action(action)
            if items:
                out.append(f"{title} ({len(items)}):")
                out += [f"  {t.name}: {tuple(t.source_shape or ())} -> {tuple(t.target_shape)} {t.reason}".rstrip()
                        for t in items]
        new = self.by_action("new")
        if new:
            mods: dict[str, int] = {}
            for t in new:
                mods[stage_module(t.name)] = mods.get(stage_module(t.name), 0) + 1
            out.append(f"new, nnU-Net's initialisation with seed {self.seed} ({len(new)} tensors): "
                       + ", ".join(f"{m} ({n})" for m, n in mods.items()))
        if self.dropped:
            out.append("dropped from the checkpoint: " + ", ".join(f"{m} ({n})" for m, n in self.dropped.items()))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


__all__ = ["ACTIONS", "FROM_SOURCE", "FRESH", "AdaptReport", "BlockRow", "TensorAction", "stage_module"]
