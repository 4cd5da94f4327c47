"""Check a checkpoint against the network of a target's plans, and adapt its input channels.

**Check.** ``nnUNetv2_train -pretrained_weights FILE`` runs nnU-Net's ``load_pretrained_weights``:
it reads ``torch.load(FILE)["network_weights"]`` (no ``map_location``, no prefix stripping), then
asserts, key by key of the *target network's* ``state_dict()``, that every key not containing
``.seg_layers.`` exists in the file with an equal shape — stopping at the first failure and printing
the whole tensor. Keys only the file has are ignored; the segmentation heads are never loaded.
:func:`check_weights` applies exactly these rules but reports every mismatch at once, by name and
shape, grouped by alias (dynamic-network-architectures registers each tensor under several names:
``decoder.encoder.*`` is the encoder, ``…all_modules.0`` is ``…conv``; nnU-Net checks every name).

**Adapt.** :func:`adapt_weights` rewrites the first convolution for K input channels and writes a
file nnU-Net accepts (``{"network_weights": …}``, wrapper prefixes stripped, tensors on the CPU).
With ``W`` of shape ``(O, C, *k)`` and ``W'`` of shape ``(O, K, *k)``:

``repeat``
    K ≥ C: new channel ``j`` is old channel ``j mod C``; each old filter is split evenly over its
    copies, ``W'[:, j] = W[:, j mod C] / n_(j mod C)`` (``n_c`` copies of channel ``c``; the factor is
    C/K when C divides K). Preserves the response exactly when every copy shows the image its old
    channel showed — in particular, identical channels give the original response.
    K < C: old channels ``c ≡ j (mod K)`` merge into new channel ``j``,
    ``W'[:, j] = Σ_{c ≡ j} W[:, c]``; exact when the merged old channels showed the same image.
``mean``
    ``W'[:, j] = Σ_c W[:, c] / K`` for every ``j``. Assumes no correspondence between old and new
    channels; preserves the response when all channels (old and new) show the same image.
``first``
    ``W'[:, j] = W[:, 0] / K``. Keeps only the first channel's filter; preserves the response to an
    image shown in every new channel as it was in old channel 0 alone (other old channels zero) —
    for sources whose first channel is the only one that means something to the target.

Every key aliasing the first convolution gets the same adapted tensor.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.netutil import strip_prefixes, unwrap

SKIP = ".seg_layers."  # nnU-Net's skip_strings_in_pretrained
METHODS = ("repeat", "mean", "first")
# where dynamic-network-architectures puts the first convolution (PlainConvUNet, ResidualEncoderUNet)
FIRST_CONV_ANCHORS = ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stem.convs.0.conv.weight")
_CONTAINER_KEYS = ("network_weights", "state_dict", "model")


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedWeights:
    """A checkpoint's network weights, prefixes stripped and on the CPU, and how they were stored."""

    path: Path
    state: dict[str, torch.Tensor]
    container: str | None  # "network_weights" (nnU-Net), "state_dict", "model", or None (plain dict)
    prefixed: list[str] = field(default_factory=list)  # stored keys that carried module./_orig_mod.
    devices: list[str] = field(default_factory=list)  # storage locations at save time, e.g. "cuda:0"
    meta: dict[str, Any] = field(default_factory=dict)  # trainer_name, configuration of nnU-Net files

    @property
    def nnunet_format(self) -> bool:
        return self.container == "network_weights"


def load_weights(path: str | Path) -> LoadedWeights:
    """Read an nnU-Net checkpoint, a dict holding a state dict, a plain state dict or a pickled module.

    Loads with ``weights_only=False`` as nnU-Net does (its checkpoints hold plans and logs): only load
    files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found")
    devices: set[str] = set()

    def on_cpu(storage, location):  # records where each tensor lived when it was saved
        devices.add(str(location))
        return storage

    try:
        obj = torch.load(path, map_location=on_cpu, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable checkpoint"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a checkpoint torch.load can read ({type(e).__name__}: {first})") from None
    container, meta = None, {}
    if isinstance(obj, nn.Module):
        container, state = "model", obj.state_dict()
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in _CONTAINER_KEYS):
        container = next(k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping))
        state = obj[container]
        meta = {"trainer_name": obj.get("trainer_name"),
                "configuration": (obj.get("init_args") or {}).get("configuration")
                if isinstance(obj.get("init_args"), Mapping) else None}
        meta = {k: v for k, v in meta.items() if v is not None}
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise DataError(f"{path} holds {what}; expected an nnU-Net checkpoint ({{'network_weights': ...}}) "
                        f"or a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DataError(f"{path}: the {container or 'state'} dict holds no tensors")
    clean: dict[str, torch.Tensor] = {}
    prefixed = []
    for k, v in tensors.items():
        name = strip_prefixes(k)
        if name != k:
            prefixed.append(k)
        if name in clean:
            raise DataError(f"{path}: keys {k!r} and another one both become {name!r} once the "
                            f"'module.'/'_orig_mod.' prefixes are stripped")
        clean[name] = v.detach().cpu()
    return LoadedWeights(path, clean, container, prefixed, sorted(devices), meta)


# --------------------------------------------------------------------------- aliases, first conv
def canonical_key(key: str) -> str:
    """One name per tensor: ``decoder.encoder.X`` -> ``encoder.X``, ``.all_modules.0.`` -> ``.conv.``.

    In dynamic-network-architectures ``decoder.encoder`` *is* the encoder and a conv block's
    ``all_modules`` Sequential starts with its ``conv``.
    """
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    return key.replace(".all_modules.0.", ".conv.")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def find_first_conv(state: Mapping[str, torch.Tensor]) -> list[str]:
    """All keys of the first convolution's weight (the canonical name first); raises if none."""
    anchor = next((a for a in FIRST_CONV_ANCHORS if any(canonical_key(k) == a for k in state)), None)
    if anchor is None:  # other U-Nets of the same family: the first encoder conv weight in order
        anchor = next((canonical_key(k) for k, v in state.items()
                       if canonical_key(k).startswith("encoder.") and k.endswith(".weight")
                       and v.ndim >= 3), None)
    if anchor is None:
        raise DataError(f"no first convolution found: expected a key {FIRST_CONV_ANCHORS[0]!r} or "
                        f"{FIRST_CONV_ANCHORS[1]!r} (dynamic-network-architectures U-Nets); the first "
                        f"keys are {list(state)[:4]}")
    keys = [k for k in state if canonical_key(k) == anchor]
    # anything else stored on the very same memory is an alias too
    shared = {_storage_key(state[k]) for k in keys}
    keys += [k for k, v in state.items() if k not in keys and _storage_key(v) in shared]
    shapes = {tuple(state[k].shape) for k in keys}
    if len(shapes) != 1 or state[keys[0]].ndim < 3:
        raise DataError(f"the first convolution's keys {keys} have shapes {sorted(shapes)}; expected one "
                        f"conv weight shape (out, in, *kernel)")
    return sorted(keys, key=lambda k: (k != anchor, k))


# --------------------------------------------------------------------------- check
@dataclass
class Mismatch:
    kind: str  # "missing" (network needs it), "shape", "unexpected" (only in the checkpoint)
    keys: list[str]  # every alias concerned, canonical first
    checkpoint_shape: list[int] | None
    network_shape: list[int] | None
    blocking: bool
    reason: str

    @property
    def name(self) -> str:
        return self.keys[0]

    def line(self) -> str:
        alias = f" (+{len(self.keys) - 1} alias{'es' if len(self.keys) > 2 else ''})" if len(self.keys) > 1 else ""
        ck = "absent" if self.checkpoint_shape is None else tuple(self.checkpoint_shape)
        nw = "absent" if self.network_shape is None else tuple(self.network_shape)
        return f"{self.kind:<10} {self.name}{alias}: checkpoint {ck}, network {nw} — {self.reason}"


@dataclass
class WeightsReport:
    checkpoint: str
    target: str
    container: str | None
    network_keys: int
    loaded_keys: int  # network keys -pretrained_weights copies (when it succeeds)
    problems: list[str]  # file-level reasons nnU-Net cannot read it
    mismatches: list[Mismatch]
    hints: list[str]
    saved_by: dict[str, Any] = field(default_factory=dict)  # trainer_name, configuration (nnU-Net files)

    @property
    def loadable(self) -> bool:
        return not self.problems and not any(m.blocking for m in self.mismatches)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loadable"] = self.loadable
        return d

    def text(self) -> str:
        kind = {"network_weights": "nnU-Net checkpoint", None: "plain state dict"}.get(
            self.container, f"{self.container!r} dict")
        by = ", ".join(f"{k} {v}" for k, v in self.saved_by.items())
        out = [f"checkpoint: {self.checkpoint} ({kind}{'; ' + by if by else ''})",
               f"target:     {self.target} ({self.network_keys} state_dict keys)"]
        blocking = [m for m in self.mismatches if m.blocking]
        harmless = [m for m in self.mismatches if not m.blocking]
        if self.problems or blocking:
            out.append(f"stop -pretrained_weights ({len(self.problems) + len(blocking)}):")
            out += [f"  file       {p}" for p in self.problems]
            out += ["  " + m.line() for m in blocking]
        if harmless:
            out.append(f"harmless ({len(harmless)}):")
            out += ["  " + m.line() for m in harmless]
        if self.loadable:
            out.append(f"OK: -pretrained_weights will load {self.loaded_keys} of {self.network_keys} keys "
                       f"(the segmentation heads keep their random initialisation)")
        else:
            out.append("FAIL: nnUNetv2_train -pretrained_weights would stop on this checkpoint")
        out += [f"hint: {h}" for h in self.hints]
        return "\n".join(out)


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def check_weights(weights: LoadedWeights, network: nn.Module, *, target: str = "network") -> WeightsReport:
    """Apply nnU-Net's ``load_pretrained_weights`` rules to every key; report all mismatches."""
    model = unwrap(network).state_dict(keep_vars=True)
    ckpt = weights.state
    groups: dict[int, list[str]] = {}
    for k, v in model.items():  # aliases are the same tensor object
        groups.setdefault(id(v), []).append(k)
    mismatches: list[Mismatch] = []
    loaded = 0
    for keys in groups.values():
        net_shape = list(model[keys[0]].shape)
        for blocking in (True, False):
            mine = [k for k in keys if (SKIP not in k) == blocking]
            missing = [k for k in mine if k not in ckpt]
            wrong = [k for k in mine if k in ckpt and list(ckpt[k].shape) != net_shape]
            if blocking:
                loaded += len(mine) - len(missing) - len(wrong)
            why_ok = "segmentation heads are never loaded (nnU-Net skips '.seg_layers.')"
            if missing:
                mismatches.append(Mismatch("missing", missing, None, net_shape, blocking,
                                           "the network needs it" if blocking else why_ok))
            by_shape: dict[tuple, list[str]] = {}
            for k in wrong:
                by_shape.setdefault(tuple(ckpt[k].shape), []).append(k)
            for shape, ks in by_shape.items():
                mismatches.append(Mismatch("shape", ks, list(shape), net_shape, blocking,
                                           "shapes must be equal" if blocking else why_ok))
    extra: dict[str, list[str]] = {}
    for k in ckpt:
        if k not in model:
            extra.setdefault(canonical_key(k), []).append(k)
    for ks in extra.values():
        mismatches.append(Mismatch("unexpected", ks, _shape(ckpt[ks[0]]), None, False,
                                   "only in the checkpoint; ignored"))

    problems, hints = [], []
    src = str(weights.path)
    if not weights.nnunet_format:
        problems.append(f"nnU-Net reads checkpoint['network_weights']; this file is "
                        f"{'a ' + repr(weights.container) + ' dict' if weights.container else 'a plain state dict'}")
    if weights.prefixed:
        problems.append(f"{len(weights.prefixed)} keys carry 'module.'/'_orig_mod.' prefixes (e.g. "
                        f"{weights.prefixed[0]!r}), which nnU-Net does not strip")
    cuda = [d for d in weights.devices if d.startswith("cuda")]
    if cuda and not torch.cuda.is_available():
        problems.append(f"tensors were saved on {cuda[0]} and nnU-Net loads without map_location; this "
                        f"machine has no CUDA device")
    blocking = [m for m in mismatches if m.blocking]
    if problems:
        hints.append(f"rewrite it for nnU-Net: nnunet_transfer weights adapt {src} -o ADAPTED.pth")
    try:
        first = find_first_conv(model)
    except DataError:
        first = []
    in_channel = [m for m in blocking if m.kind == "shape" and set(m.keys) <= set(first)
                  and m.checkpoint_shape[:1] + m.checkpoint_shape[2:] == m.network_shape[:1] + m.network_shape[2:]]
    if in_channel:
        k = in_channel[0].network_shape[1]
        hints.append(f"only the number of input channels differs ({in_channel[0].checkpoint_shape[1]} -> {k}): "
                     f"nnunet_transfer weights adapt {src} -o ADAPTED.pth --in-channels {k}")
    if len(blocking) > len(in_channel):
        hints.append("the checkpoint comes from another architecture: train the target with the source's "
                     "plans and configuration (nnunet_transfer plans transfer -s SOURCE -t TARGET)")
    heads = [m for m in mismatches if not m.blocking and m.kind != "unexpected"]
    if heads and not blocking:
        hints.append("the segmentation heads differ (other labels): harmless, they are trained from scratch")
    return WeightsReport(src, target, weights.container, len(model), loaded, problems, mismatches, hints,
                         dict(weights.meta))


def check_against_plans(checkpoint: str | Path, dataset: str | int, configuration: str,
                        plans: str = "nnUNetPlans") -> WeightsReport:
    """Build the target network nnU-Net would build, then :func:`check_weights`."""
    from nnunet_transfer.nnunet_io import build_network, dataset_name, load_dataset_json, load_plans

    weights = load_weights(checkpoint)
    plans_dict = load_plans(dataset, plans)
    network = build_network(plans_dict, configuration, load_dataset_json(dataset))
    return check_weights(weights, network, target=f"{dataset_name(dataset)} / {plans} / {configuration}")


# --------------------------------------------------------------------------- adapt
def adapt_first_conv(weight: torch.Tensor, *, in_channels: int, method: str = "repeat") -> torch.Tensor:
    """``(O, C, *k)`` -> ``(O, K, *k)`` by ``method`` (see the module docstring), same dtype."""
    _check_adapt_args(in_channels, method)
    if weight.ndim < 3:
        raise DataError(f"expected a conv weight (out, in, *kernel), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    c, k = w.shape[1], in_channels
    if method == "repeat" and k >= c:
        copies = torch.tensor([len(range(i, k, c)) for i in range(c)], dtype=torch.float64)
        idx = torch.arange(k) % c
        out = w[:, idx] / copies[idx].view(1, k, *[1] * (w.ndim - 2))
    elif method == "repeat":
        out = torch.stack([w[:, j::k].sum(1) for j in range(k)], dim=1)
    elif method == "mean":
        out = (w.sum(1, keepdim=True) / k).expand(-1, k, *w.shape[2:])
    else:  # first
        out = (w[:, :1] / k).expand(-1, k, *w.shape[2:])
    return out.contiguous().to(weight.dtype)


def _check_adapt_args(in_channels: Any, method: str) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"--in-channels must be an integer >= 1, got {in_channels!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass
class AdaptResult:
    output: Path
    first_conv: list[str]
    channels: tuple[int, int] | None  # (old C, new K); None when channels were left alone
    method: str | None
    notes: list[str]


def adapt_weights(checkpoint: str | Path, output: str | Path, *, in_channels: int | None = None,
                  method: str = "repeat", force: bool = False) -> AdaptResult:
    """Write ``{"network_weights": ...}`` for ``-pretrained_weights``; first conv adapted to K channels.

    Without ``in_channels`` the weights are only rewritten (prefixes stripped, CPU, nnU-Net layout).
    """
    if in_channels is not None:
        _check_adapt_args(in_channels, method)
    elif method not in METHODS:
        _check_adapt_args(1, method)
    output = Path(output)
    weights = load_weights(checkpoint)
    if output.resolve() == weights.path.resolve():
        raise ConfigError(f"the output {output} is the input checkpoint; write to another file")
    if output.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise DataError(f"folder {output.parent} does not exist; create it first")
    state = dict(weights.state)
    notes = []
    if weights.prefixed:
        notes.append(f"stripped 'module.'/'_orig_mod.' from {len(weights.prefixed)} keys")
    if any(d.startswith("cuda") for d in weights.devices):
        notes.append("moved tensors saved on the GPU to the CPU")
    channels = None
    first: list[str] = []
    if in_channels is not None:
        first = find_first_conv(state)
        old = state[first[0]]
        new = adapt_first_conv(old, in_channels=in_channels, method=method)
        for k in first:  # one tensor for every alias, so they stay one tensor in the saved file
            state[k] = new
        channels = (int(old.shape[1]), in_channels)
        notes.append(f"first convolution {first[0]} (+{len(first) - 1} aliases): {tuple(old.shape)} -> "
                     f"{tuple(new.shape)} by {method!r}")
    tmp = output.with_name(output.name + ".tmp")
    torch.save({"network_weights": state,
                "nnunet_transfer_adapted": {"source": str(weights.path), "method": method if channels else None,
                                            "in_channels": list(channels) if channels else None,
                                            "first_conv": first}}, tmp)
    os.replace(tmp, output)
    return AdaptResult(output, first, channels, method if channels else None, notes)


__all__ = ["LoadedWeights", "load_weights", "canonical_key", "find_first_conv", "Mismatch", "WeightsReport",
           "check_weights", "check_against_plans", "adapt_first_conv", "adapt_weights", "AdaptResult",
           "METHODS"]
