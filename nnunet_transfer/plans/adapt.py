"""Pretrained weights for a target planned its own way: ``weights adapt CKPT -d TARGET -c CONFIG``.

nnU-Net plans every dataset for itself: an anisotropic MRI target gets 1×3×3 kernels where an isotropic
CT source has 3×3×3, a smaller target fewer stages, a larger one more. ``-pretrained_weights`` then
asserts on the first shape that differs. :func:`adapt_state` writes, for the network the *target's* plans
build, a state dict that ``-pretrained_weights`` accepts, and says per block what came from the source.

Correspondence
--------------
Both networks are U-Nets of dynamic-network-architectures; tensors are matched by canonical name
(:func:`nnunet_transfer.checkpoints.canonical_key`) after aligning stages **by resolution**:

* encoder stage ``s`` ↔ source encoder stage ``s`` (stage 0 works at full resolution);
* decoder index ``j`` of a target with ``N_t`` stages ↔ source decoder index ``j + N_s − N_t`` (decoder
  index 0 is the deepest; both then work at resolution level ``N_t − 2 − j``), for ``decoder.stages``,
  ``decoder.transpconvs`` and ``decoder.seg_layers``.

Extra target stages (deeper than the source's) have no counterpart and keep nnU-Net's initialisation
(built with ``torch.manual_seed(seed)``); source stages deeper than the target's are dropped. With fewer
target stages the target's bottleneck is the source's encoder stage of the same level.

What each target tensor gets
----------------------------
``copied``
    a source tensor of equal shape, bit for bit.
``mapped``
    a convolution / transposed convolution of equal widths whose kernel differs: the kernel rule below.
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

Kernel rule (convolutions)
--------------------------
PyTorch convolves by cross-correlation, ``y[p] = Σ_t w[t] · x[p + t]`` with centred taps
``t = −h … h`` (``h = (k − 1)/2``, odd ``k``). The rule acts on each spatial axis separately,
``w'[u] = Σ_t M[u, t] · w[t]`` with a ``k' × k`` matrix ``M`` (:func:`conv_axis_matrix`):

* **equal size**: ``M = I``.
* **removed axis** (``k' = 1``, e.g. 3×3×3 → 1×3×3): ``M = [1 … 1]``, the **sum** along the axis.
  Input constant along that axis gives exactly the old response, ``Σ_t w[t] · c = (Σ_t w[t]) · c``.
  For a ramp ``x = a + b·z`` along the removed axis the term ``b · Σ_t t·w[t]`` is lost (zero for
  filters symmetric along it): one tap cannot hold a first moment.
* **growing** (``k' > k``, e.g. 1×3×3 → 3×3×3, 3 → 5): **centre-embed**, ``M[u, t] = δ(u, t)``; zero
  taps around the old kernel. The response is exactly the old one for *every* input (with nnU-Net's
  ``k'//2`` zero padding, borders included).
* **shrinking** (``1 < k' < k``, e.g. 5 → 3): inner taps (``|t| ≤ h'``) stay where they are; an outer tap
  ``t`` (``|t| > h'``) is spread over the new taps ``u`` with the smallest weights that keep its zeroth
  and first moment, ``M[u, t] = 1/k' + u·t / Σ_v v²`` (so ``Σ_u M[u, t] = 1`` and ``Σ_u u·M[u, t] = t``).
  Hence ``Σ w' = Σ w`` and ``Σ u·w'[u] = Σ t·w[t]``: the response to constant **and linear-ramp**
  input ``a + b·p`` is kept exactly away from the borders. For 5 → 3 the outer tap at −2 becomes
  ``(4/3, 1/3, −2/3)`` on the taps −1, 0, 1.

Even kernel sizes (nnU-Net plans none for convolutions) have no rule: ``not_transferable``.

Kernel rule (transposed convolutions)
-------------------------------------
nnU-Net's decoder upsamples with kernel = stride ``s`` (1 or 2 per axis): ``y[s·p + t] = W[t] · x[p]``,
no overlap. Per axis:

* **equal**: kept.
* **no longer upsampled** (``s → 1``): the **mean** of the ``s`` taps, ``W'[0] = Σ_t W[t] / s`` — for
  constant input the target's one output is the mean of the source's ``s`` outputs (their block average).
* **newly upsampled** (``1 → s'``): the tap **repeated**, ``W'[u] = W[0]`` — the source's output followed
  by nearest-neighbour upsampling, exact for every input.
* any other change (``2 → 3``) has no rule: ``not_transferable``.

Refusals (nothing written)
--------------------------
Another architecture family (plain ↔ residual encoder, 2-D ↔ 3-D, not a U-Net): the encoders are built
from different modules, so nothing of them is transferable — one message naming both. A target whose
every stage differs in width (no parameter outside the heads from the source). A share below
``min_share``. A first convolution with another channel count and no ``--in-channels``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import (ADAPTED_KEY, LoadedWeights, alias_groups, canonical_key, is_seg_key,
                                         load_weights)
from nnunet_transfer.errors import ArchitectureError, ConfigError, DataError, TransferError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.nnunet_io import build_network, dataset_name, load_dataset_json, load_plans
from nnunet_transfer.plans.model_folder import resolve_checkpoint
from nnunet_transfer.plans.weights import METHODS, adapt_first_conv, find_first_conv

#: actions whose tensors came from the source (and count toward the share)
FROM_SOURCE = ("copied", "mapped", "channels")
#: actions whose tensors keep the target's fresh initialisation
FRESH = ("reinit", "not_transferable", "new")
ACTIONS = FROM_SOURCE + FRESH + ("head",)
_FAMILY_CLASS = {("plain", "plain"): "PlainConvUNet", ("residual", "plain"): "ResidualEncoderUNet",
                 ("residual", "residual"): "ResidualUNet", ("plain", "residual"): "plain encoder + residual decoder"}
_DECODER = re.compile(r"^decoder\.(stages|transpconvs|seg_layers)\.(\d+)\.(.*)$")
_STAGE_MODULE = re.compile(r"^(encoder\.stem|encoder\.stages\.\d+|decoder\.(?:stages|transpconvs|seg_layers)\.\d+)")


class KernelRuleError(TransferError, ValueError):
    """A kernel change the documented rule does not cover (an even kernel, a stride 2 → 3)."""


# --------------------------------------------------------------------------- kernel rules
def conv_axis_matrix(*, source: int, target: int) -> torch.Tensor:
    """``M`` (``target × source``, float64) of the convolution rule along one axis (module docstring).

    ``M[u, t]`` with centred taps: identity on shared taps; an outer tap ``t`` of a shrinking kernel goes
    to ``1/k' + u·t/Σv²`` (``k' > 1``) or, for ``k' = 1``, to the single tap (the sum).
    """
    if source < 1 or target < 1 or source % 2 == 0 or target % 2 == 0:
        raise KernelRuleError(f"the convolution kernel rule needs odd sizes, got {source} -> {target}")
    h, h2 = (source - 1) // 2, (target - 1) // 2
    u = torch.arange(-h2, h2 + 1, dtype=torch.float64)
    m = torch.zeros(target, source, dtype=torch.float64)
    for i, t in enumerate(range(-h, h + 1)):
        if abs(t) <= h2:
            m[t + h2, i] = 1.0
        elif target == 1:
            m[0, i] = 1.0
        else:  # the minimum-norm weights with sum 1 and first moment t
            m[:, i] = 1.0 / target + u * t / (u * u).sum()
    return m


def transposed_axis_matrix(*, source: int, target: int) -> torch.Tensor:
    """``M`` (``target × source``) of the transposed-convolution rule along one axis (kernel = stride)."""
    if source == target:
        return torch.eye(source, dtype=torch.float64)
    if target == 1:
        return torch.full((1, source), 1.0 / source, dtype=torch.float64)
    if source == 1:
        return torch.ones(target, 1, dtype=torch.float64)
    raise KernelRuleError(f"no transposed-convolution rule for stride {source} -> {target} (only s -> 1 and "
                          f"1 -> s)")


def map_kernel(weight: torch.Tensor, *, kernel: Sequence[int], transposed: bool = False) -> torch.Tensor:
    """``weight`` ``(A, B, *k)`` -> ``(A, B, *kernel)`` by the axis rules; float64 inside, same dtype out."""
    kernel = tuple(int(k) for k in kernel)
    if weight.ndim != 2 + len(kernel):
        raise KernelRuleError(f"weight of shape {tuple(weight.shape)} has {weight.ndim - 2} spatial axes, the "
                              f"target kernel {kernel} has {len(kernel)}")
    rule = transposed_axis_matrix if transposed else conv_axis_matrix
    w = weight.detach().to(torch.float64)
    for axis, (k_from, k_to) in enumerate(zip(weight.shape[2:], kernel)):
        if k_from == k_to:
            continue
        m = rule(source=int(k_from), target=k_to)
        w = torch.movedim(torch.tensordot(w, m, dims=([2 + axis], [1])), -1, 2 + axis)
    return w.contiguous().to(weight.dtype)


def describe_kernel_change(source: Sequence[int], target: Sequence[int], *, transposed: bool) -> str:
    parts = []
    for axis, (a, b) in enumerate(zip(source, target)):
        if a == b:
            continue
        if transposed:
            how = "mean" if b == 1 else "repeat"
        else:
            how = "sum" if b == 1 else "centre-embed" if b > a else "moment-preserving shrink"
        parts.append(f"axis {axis} {a}->{b} {how}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- architecture
def _family(names: Iterable[str]) -> tuple[str | None, str | None]:
    names = list(names)
    if any(n.startswith("encoder.stem.") or re.match(r"encoder\.stages\.\d+\.blocks\.", n) for n in names):
        enc = "residual"
    elif any(re.match(r"encoder\.stages\.\d+\.\d+\.convs\.", n) for n in names):
        enc = "plain"
    else:
        enc = None
    if any(re.match(r"decoder\.stages\.\d+\.blocks\.", n) for n in names):
        dec = "residual"
    elif any(re.match(r"decoder\.stages\.\d+\.convs\.", n) for n in names):
        dec = "plain"
    else:
        dec = None
    return enc, dec


def _n_stages(names: Iterable[str]) -> int:
    stages = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.stages\.(\d+)\.", n))}
    return max(stages) + 1 if stages else 0


def _spatial_dims(state: Mapping[str, torch.Tensor]) -> set[int]:
    return {v.ndim - 2 for k, v in state.items() if v.ndim >= 3 and re.match(r"encoder\.", k)}


def check_family(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
                 source_class: str | None = None, target_class: str | None = None) -> None:
    """Refuse a checkpoint of another architecture family (one message naming both)."""
    s_fam, t_fam = _family(source), _family(target)
    if None in s_fam:
        first = list(source)[:3]
        raise ArchitectureError(f"the checkpoint holds no U-Net of dynamic-network-architectures (no "
                                f"encoder.stages.*/decoder.stages.* keys; first keys {first}); weights adapt maps "
                                f"PlainConvUNet, ResidualEncoderUNet and ResidualUNet checkpoints")
    s_cls = source_class or _FAMILY_CLASS.get(s_fam, str(s_fam))
    t_cls = target_class or _FAMILY_CLASS.get(t_fam, str(t_fam))
    if s_fam != t_fam:
        part = " and ".join(p for p, a, b in (("encoder", s_fam[0], t_fam[0]), ("decoder", s_fam[1], t_fam[1]))
                            if a != b)
        raise ArchitectureError(
            f"the checkpoint is a {s_cls} ({s_fam[0]} encoder, {s_fam[1]} decoder), the target a {t_cls} "
            f"({t_fam[0]} encoder, {t_fam[1]} decoder): the {part} of different families are built from "
            f"different modules, so they are not transferable. Plan the target with the source's architecture "
            f"(nnunet_transfer plans transfer -s SOURCE -t TARGET) or with a planner of the same family "
            f"(e.g. nnUNetPlannerResEncM for residual encoders)")
    s_dims, t_dims = _spatial_dims(source), _spatial_dims(target)
    if s_dims and t_dims and s_dims != t_dims:
        raise ArchitectureError(f"the checkpoint is a {'/'.join(map(str, sorted(s_dims)))}-D network, the target "
                                f"{'/'.join(map(str, sorted(t_dims)))}-D: convolutions of another dimension are "
                                f"not transferable; adapt to a target configuration of the same dimension "
                                f"(e.g. 3d_fullres for a 3-D checkpoint)")


def source_name_for(target_name: str, *, offset: int) -> str | None:
    """The source tensor aligned by resolution with a target tensor (``offset = N_s − N_t``)."""
    m = _DECODER.match(target_name)
    if not m:
        return target_name
    j = int(m.group(2)) + offset
    return None if j < 0 else f"decoder.{m.group(1)}.{j}.{m.group(3)}"


def stage_module(name: str) -> str:
    m = _STAGE_MODULE.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------- the plan
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
        return {"kind": "adapted", "version": 1, "source": self.source, "target": self.target,
                "architecture": self.architecture, "source_stages": self.source_stages,
                "target_stages": self.target_stages, "seed": self.seed, "channels": self.channels,
                "method": self.method, "output": self.output,
                "total": {"params": self.params, "from_source": self.from_source, "share": self.share},
                "blocks": [b.to_dict() for b in self.blocks], "heads": self.heads,
                "tensors": [t.to_dict() for t in self.tensors], "dropped": self.dropped, "notes": self.notes}

    def text(self) -> str:
        out = [f"weights adapt: {self.source} -> {self.target} ({self.architecture}, {self.target_stages} stages; "
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


def _tensor_rule(name: str, s: torch.Tensor, t: torch.Tensor) -> tuple[str, str, torch.Tensor | None]:
    """``(action, reason, value)`` for a target tensor ``t`` with a source counterpart ``s`` (value None: the
    fresh initialisation)."""
    if s.shape == t.shape:
        return "copied", "", s.detach().clone().to(t.dtype)
    if not (name.endswith(".weight") and t.ndim >= 3 and s.ndim == t.ndim):
        return "not_transferable", f"width {list(s.shape)} vs {list(t.shape)}", None
    transposed = name.startswith("decoder.transpconvs.")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)  # ConvTranspose weights are (in, out, *k)
    if s.shape[out_dim] != t.shape[out_dim]:
        return "not_transferable", f"output width {s.shape[out_dim]} vs {t.shape[out_dim]}", None
    if s.shape[in_dim] != t.shape[in_dim]:
        return "reinit", f"input width {s.shape[in_dim]} vs {t.shape[in_dim]}", None
    try:
        mapped = map_kernel(s, kernel=t.shape[2:], transposed=transposed)
    except KernelRuleError as e:
        return "not_transferable", str(e), None
    return "mapped", describe_kernel_change(s.shape[2:], t.shape[2:], transposed=transposed), mapped.to(t.dtype)


def adapt_state(source: Mapping[str, torch.Tensor], network: nn.Module, *, in_channels: int | None = None,
                method: str = "repeat", seed: int = 0, source_label: str = "checkpoint",
                target_label: str = "target", source_class: str | None = None
                ) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """The target network's full ``state_dict`` (every alias) filled from ``source`` by the rules above.

    ``network`` is the target network as nnU-Net builds it (its current values are the fresh
    initialisation that new / re-initialised tensors keep). ``source`` is a prefix-stripped state dict.
    """
    net = unwrap(network)
    target_state = net.state_dict()
    target_class = type(net).__name__
    check_family(source, target_state, source_class=source_class, target_class=target_class)
    model = BlockModel.from_network(net)
    src: dict[str, torch.Tensor] = {}
    for keys in alias_groups(source):  # state_dict order: a module's own name comes before all_modules.k
        src.setdefault(canonical_key(keys[0]), source[keys[0]])
    n_s, n_t = _n_stages(src), model.n_stages
    offset = n_s - n_t

    first_t = canonical_key(find_first_conv(target_state)[0])
    first_s = canonical_key(find_first_conv(src)[0])
    c_src, k_tgt = int(src[first_s].shape[1]), int(target_state[first_t].shape[1])
    channels = None
    if in_channels is not None and in_channels != k_tgt:
        raise ConfigError(f"--in-channels {in_channels} does not match the target: its plans and dataset.json "
                          f"give the first convolution {k_tgt} input channel(s); pass --in-channels {k_tgt}")
    if c_src != k_tgt:
        if in_channels is None:
            raise ConfigError(f"the checkpoint's first convolution takes {c_src} input channel(s), the target's "
                              f"{k_tgt}: add --in-channels {k_tgt} (--method repeat|mean|first) to adapt it in "
                              f"the same call")
        channels = [c_src, k_tgt]

    groups = alias_groups(target_state)
    canonical = [canonical_key(g[0]) for g in groups]
    values: dict[str, torch.Tensor] = {}
    fresh_values: dict[str, torch.Tensor] = {}
    actions: dict[str, TensorAction] = {}
    used: set[str] = set()
    for keys, name in zip(groups, canonical):
        t = target_state[keys[0]]
        s_name = source_name_for(name, offset=offset)
        s = src.get(s_name) if s_name is not None else None
        fresh = fresh_values[name] = t.detach().clone()
        s_shape = list(s.shape) if s is not None else None
        act = TensorAction(name, "new", s_name if s is not None else None, s_shape, list(t.shape), t.numel())
        if s is not None:
            used.add(s_name)
        if is_seg_key(name):
            act.action = "head"
            fits = s is not None and s.ndim == t.ndim and s.shape[1:] == t.shape[1:]
            if fits:
                values[name] = s.detach().clone().to(t.dtype)
            # else left out of the file: nnU-Net never loads heads, and a fresh head in the file would be
            # taken for source rows by the `heads` setting
            act.reason = "source rows carried" if fits else "not in the file (no source head of this input width)"
        elif s is None:
            stage = re.match(r"encoder\.stages\.(\d+)\.", name)
            act.reason = ("extra stage" if (stage and int(stage.group(1)) >= n_s) or
                          (_DECODER.match(name) and s_name is None) else "not in the checkpoint")
            values[name] = fresh
        else:
            if name == first_t and channels:
                s = adapt_first_conv(s, in_channels=k_tgt, method=method)
            act.action, act.reason, value = _tensor_rule(name, s, t)
            if act.action in ("copied", "mapped") and name == first_t and channels:
                act.action = "channels"
                act.reason = f"channels {c_src}->{k_tgt} by {method!r}" + (f"; {act.reason}" if act.reason else "")
            values[name] = fresh if value is None else value
        actions[name] = act

    # a re-initialised / untransferable convolution keeps its fresh bias too: one module, one origin
    for name, act in actions.items():
        if act.action in ("reinit", "not_transferable") and name.endswith(".weight"):
            bias = actions.get(name[:-len("weight")] + "bias")
            if bias is not None and bias.action == "copied":
                bias.action, bias.reason = act.action, f"bias of a convolution that is {act.action.replace('_', ' ')}"
                values[bias.name] = fresh_values[bias.name]

    state = {k: values[name] for keys, name in zip(groups, canonical) if name in values for k in keys}

    param_action = {n: actions[n] for n in model.all_param_names}
    rows = []
    for b in model.blocks:
        counts: dict[str, int] = {}
        mods: list[str] = []
        for n in b.param_names:
            a = param_action[n]
            counts[a.action] = counts.get(a.action, 0) + a.numel
            if a.action in FROM_SOURCE and a.source and stage_module(a.source) not in mods:
                mods.append(stage_module(a.source))
        rows.append(BlockRow(b.number, b.group, b.n_params, counts, mods,
                             [n for n in b.param_names if param_action[n].action in FRESH]))
    carried = sum(param_action[n].reason == "source rows carried" for n in model.seg_param_names)
    heads = {"params": model.n_seg_params, "tensors": len(model.seg_param_names), "carried": carried}
    dropped: dict[str, int] = {}
    for n in src:
        # files whose aliases do not share memory still name norms as all_modules.k: not a tensor of their own
        if n not in used and ".all_modules." not in n:
            dropped[stage_module(n)] = dropped.get(stage_module(n), 0) + 1
    report = AdaptReport(source_label, target_label, target_class, n_s, n_t, seed, rows, heads,
                         list(actions.values()), dropped, channels, method if channels else None)
    if not report.from_source:
        widths = [(b.number, list(actions[b.param_names[0]].source_shape or []),
                   actions[b.param_names[0]].target_shape) for b in model.blocks if b.param_names][:3]
        raise TransferError(f"nothing of {source_label} is transferable to {target_label}: no parameter outside "
                            f"the segmentation heads came from the checkpoint (every stage differs in width, e.g. "
                            + "; ".join(f"block {k}: checkpoint {s or 'absent'} vs target {t}" for k, s, t in widths)
                            + "). Plan the target with the source's plans (nnunet_transfer plans transfer -s SOURCE "
                              "-t TARGET) or with the source's features_per_stage")
    return state, report


# --------------------------------------------------------------------------- the command
def report_path(output: str | Path) -> Path:
    """Where the JSON report goes: beside OUT, ``adapted.pth`` -> ``adapted.report.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".report.json")


def _check_min_share(min_share: Any) -> None:
    if min_share is None:
        return
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 <= min_share <= 1:
        raise ConfigError(f"--min-share must be a number in [0, 1] (a share of the parameters, e.g. 0.5), got "
                          f"{min_share!r}")


def adapt_to_plans(checkpoint: str | Path, output: str | Path, *, dataset: str | int, configuration: str,
                   plans: str = "nnUNetPlans", in_channels: int | None = None, method: str = "repeat",
                   seed: int = 0, min_share: float | None = None, force: bool = False) -> AdaptReport:
    """``weights adapt CHECKPOINT -d TARGET -c CONFIG [-p PLANS] -o OUT``: validate, adapt, then write
    ``OUT`` (``{"network_weights": …, "nnunet_transfer_adapted": report}``) and its JSON report beside it.

    ``checkpoint`` may be a file, a fold folder or a one-fold model folder. Nothing is written when any
    check fails.
    """
    _check_min_share(min_share)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if in_channels is not None and (isinstance(in_channels, bool) or not isinstance(in_channels, int)
                                    or in_channels < 1):
        raise ConfigError(f"--in-channels must be an integer >= 1, got {in_channels!r}")
    output = Path(output)
    json_path = report_path(output)
    source_path = resolve_checkpoint(checkpoint)
    if output.resolve() == source_path.resolve():
        raise ConfigError(f"the output {output} is the input checkpoint; write to another file")
    for p in (output, json_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise DataError(f"folder {output.parent} does not exist; create it first")

    weights: LoadedWeights = load_weights(source_path)
    plans_dict = load_plans(dataset, plans)
    target_json = load_dataset_json(dataset)
    with torch.random.fork_rng(devices=[]):
        # the fresh initialisation that new / re-initialised tensors keep: nnU-Net's own init, seeded
        torch.manual_seed(seed)
        network = build_network(plans_dict, configuration, target_json)
    arch = (weights.init_args.get("plans") or {}).get("configurations", {}) \
        .get(weights.init_args.get("configuration"), {}).get("architecture", {}).get("network_class_name")
    state, report = adapt_state(weights.state, network, in_channels=in_channels, method=method, seed=seed,
                                source_label=str(source_path),
                                target_label=f"{dataset_name(dataset)} / {plans} / {configuration}",
                                source_class=arch.rsplit(".", 1)[-1] if isinstance(arch, str) else None)
    report.output = str(output)
    if min_share is not None and report.share < min_share:
        low = sorted(report.blocks, key=lambda b: b.share)[:3]
        raise TransferError(f"only {report.share:.1%} of the target's parameters outside the heads would come from "
                            f"the checkpoint, below --min-share {min_share:g} (lowest: "
                            + ", ".join(f"block {b.block} {b.share:.0%}" for b in low)
                            + "); nothing written. Lower --min-share, or plan the target closer to the source")
    payload = report.to_dict()
    tmp_json, tmp_pth = json_path.with_name(json_path.name + ".tmp"), output.with_name(output.name + ".tmp")
    try:
        tmp_json.write_text(json.dumps(payload, indent=2))
        content = {"network_weights": state, ADAPTED_KEY: payload}
        if weights.dataset_json is not None and report.heads["carried"]:
            # the source's labels, so that heads=by-name can pick rows from the carried heads
            content["init_args"] = {"dataset_json": weights.dataset_json}
        torch.save(content, tmp_pth)
        os.replace(tmp_pth, output)
        os.replace(tmp_json, json_path)
    except BaseException:
        for p in (tmp_json, tmp_pth):
            p.unlink(missing_ok=True)
        raise
    return report


# --------------------------------------------------------------------------- what a trainer records
def transfer_record(weights: LoadedWeights, network: nn.Module, *, loaded_keys: int) -> dict:
    """What ``-pretrained_weights`` brings into ``network``: the adapt report of an adapted file, or a plain
    same-plans load (every tensor but the heads). ``loaded_keys`` from :func:`checkpoints.compare`."""
    report = weights.adapted if isinstance(getattr(weights, "adapted", None), Mapping) else None
    if report is not None and report.get("kind") == "adapted":
        keep = ("source", "target", "architecture", "source_stages", "target_stages", "seed", "channels", "method",
                "total", "heads", "dropped")
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
    if record.get("kind") == "adapted":
        partial = [f"{b['block']} ({b['share']:.0%})" for b in record.get("blocks", []) if b["share"] < 1]
        return (f"weights adapted by `weights adapt` from {record.get('source')}: {total.get('share', 0):.1%} of the "
                f"{total.get('params', 0):,} parameters outside the heads came from the source; blocks not fully "
                f"from it: {', '.join(partial) or 'none'}")
    channels = f", first convolution adapted to {record['channels'][1]} channels" if record.get("channels") else ""
    return (f"same-plans load from {record.get('file')}: every tensor but the segmentation heads "
            f"({record.get('loaded_keys')} state_dict keys){channels}")


__all__ = ["ADAPTED_KEY", "ACTIONS", "FROM_SOURCE", "FRESH", "KernelRuleError", "conv_axis_matrix",
           "transposed_axis_matrix", "map_kernel", "check_family", "source_name_for", "adapt_state",
           "adapt_to_plans", "AdaptReport", "BlockRow", "TensorAction", "report_path", "transfer_record",
           "fresh_names", "source_param_names", "record_text"]
