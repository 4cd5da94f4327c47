"""Helpers to reach the plain network inside nnU-Net's wrappers.

nnU-Net may wrap its network in ``torch.compile`` (names gain ``_orig_mod.``) and in
``DistributedDataParallel`` (names gain ``module.``). Everything in this package selects parameters by
the names of the *unwrapped* network, so the unwrapping lives here, once.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from torch import nn

_PREFIXES = ("module.", "_orig_mod.")


def unwrap(network: nn.Module) -> nn.Module:
    """Return the plain network inside DDP and/or ``torch.compile`` wrappers (any nesting order)."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod") and isinstance(getattr(network, "_orig_mod"), nn.Module):
            network = network._orig_mod
        else:
            return network


def primus_module() -> ModuleType:
    """``dynamic_network_architectures.architectures.primus``, imported without the FutureWarning that timm (which
    it imports) raises on torch >= 2.5 for its ``torch.jit.interface``: not ours to fix, and on a command's stderr it
    reads as a problem with the user's run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
        return importlib.import_module("dynamic_network_architectures.architectures.primus")


def strip_prefixes(name: str) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x``."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
    return name


def unique_named_parameters(network: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the unwrapped network by canonical name.

    dynamic-network-architectures aliases modules (``decoder.encoder`` *is* the encoder, every conv is
    also ``all_modules.k``); ``named_parameters()`` de-duplicates and yields the first registered name,
    which is the canonical one used everywhere in this package.
    """
    return dict(unwrap(network).named_parameters())


#: forward convolutions; a transposed one stores its kernel as ``(in, out, *k)``, not ``(out, in, *k)``
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: transposed convolutions (nnU-Net's decoders upsample with them)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: every convolution, forward or transposed
ALL_CONV_TYPES = CONV_TYPES + TRANSPOSED_TYPES
#: modules whose ``weight`` is a kernel (what Li et al.'s L2-SP anchors; "conv kernels" in the block specs)
KERNEL_MODULES = ALL_CONV_TYPES + (nn.Linear,)


def kernel_names(network: nn.Module) -> set[str]:
    """Canonical names of the convolution / linear *kernels* (``weight``; not biases, not norm parameters)."""
    net = unwrap(network)
    canonical = {id(p): name for name, p in net.named_parameters()}
    out = set()
    for module in net.modules():
        if isinstance(module, KERNEL_MODULES) and getattr(module, "weight", None) is not None:
            out.add(canonical[id(module.weight)])
    return out
