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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from nnunet_transfer.checkpoints import (SEG_KEY, LoadedWeights, Mismatch, canonical_key, compare, file_problems,
                                         load_weights, storage_key)
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.fileio import save_atomic
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.plans.model_folder import resolve_checkpoint

SKIP = SEG_KEY  # nnU-Net's skip_strings_in_pretrained
METHODS = ("repeat", "mean", "first")
# where dynamic-network-architectures puts the first convolution (PlainConvUNet, ResidualEncoderUNet)
FIRST_CONV_ANCHORS = ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stem.convs.0.conv.weight")


# --------------------------------------------------------------------------- aliases, first conv
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
    shared = {storage_key(state[k]) for k in keys}
    keys += [k for k, v in state.items() if k not in keys and storage_key(v) in shared]
    shapes = {tuple(state[k].shape) for k in keys}
    if len(shapes) != 1 or state[keys[0]].ndim < 3:
        raise DataError(f"the first convolution's keys {keys} have shapes {sorted(shapes)}; expected one "
                        f"conv weight shape (out, in, *kernel)")
    return sorted(keys, key=lambda k: (k != anchor, k))


# --------------------------------------------------------------------------- check
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


def check_weights(weights: LoadedWeights, network: nn.Module, *, target: str = "network") -> WeightsReport:
    """Apply nnU-Net's ``load_pretrained_weights`` rules to every key; report all mismatches."""
    model = unwrap(network).state_dict()
    comparison = compare(weights.state, model)
    mismatches = comparison.mismatches
    hints: list[str] = []
    src = str(weights.path)
    problems = file_problems(weights)
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
                     "plans and configuration (nnunet_transfer plans transfer -s SOURCE -t TARGET), or map "
                     f"the weights to the target's own plans (nnunet_transfer weights adapt {src} -d TARGET "
                     f"-c CONFIG -o ADAPTED.pth)")
    heads = [m for m in mismatches if not m.blocking and m.kind != "unexpected"]
    if heads and not blocking:
        hints.append("the segmentation heads differ (other labels): harmless, they are trained from scratch")
    return WeightsReport(src, target, weights.container, comparison.network_keys, comparison.loaded_keys,
                         problems, mismatches, hints,
                         dict(weights.meta))


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
    weights = load_weights(resolve_checkpoint(checkpoint))
    if weights.is_nnssl:
        raise ConfigError(f"{weights.path} is an nnssl checkpoint: it holds the whole pretraining network, of which a "
                          f"target takes the encoder and stem only; map it onto the target's network with -d TARGET "
                          f"-c CONFIG (or give it to -pretrained_weights of this package's trainers directly)")
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
    record = {"source": str(weights.path), "method": method if channels else None,
              "in_channels": list(channels) if channels else None, "first_conv": first}
    save_atomic(output, {"network_weights": state, "nnunet_transfer_adapted": record})
    return AdaptResult(output, first, channels, method if channels else None, notes)


__all__ = ["LoadedWeights", "load_weights", "canonical_key", "find_first_conv", "Mismatch", "WeightsReport",
           "check_weights", "adapt_first_conv", "adapt_weights", "AdaptResult",
           "METHODS"]
