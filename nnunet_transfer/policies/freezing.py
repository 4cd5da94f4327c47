"""Freezing parts of a network (pure torch; names come from :mod:`nnunet_transfer.blocks`).

Order of use in an nnU-Net trainer (why: DistributedDataParallel records which parameters require
grad when it wraps the network; a parameter frozen afterwards never gets a gradient and DDP fails
with "Expected to have finished reduction in the prior iteration ... parameters that were not used"):

1. ``configure_optimizers()`` — after the network is built (and compiled), *before* the DDP wrap:
   :func:`reinit_zeroed_residual_norms` on the frozen modules if they are random (ResEnc only),
   :func:`apply_freeze`, then build the optimizer from :func:`trainable_parameters`.
2. after every ``network.train()`` (``on_train_epoch_start``): :func:`keep_frozen_norms_in_eval`,
   so BatchNorm-type layers inside frozen blocks neither update their running statistics nor switch
   to batch statistics — a frozen block then computes the same function in training and inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from nnunet_transfer.errors import SpecError, TransferError
from nnunet_transfer.netutil import strip_prefixes, unwrap


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`apply_freeze` did. Names are canonical (unwrapped, de-aliased)."""

    trainable_names: tuple[str, ...]
    frozen_names: tuple[str, ...]
    n_trainable_scalars: int
    n_frozen_scalars: int
    #: top-most modules whose parameters are all frozen (feed to :func:`keep_frozen_norms_in_eval`)
    frozen_module_names: tuple[str, ...]

    @property
    def n_trainable_tensors(self) -> int:
        return len(self.trainable_names)

    @property
    def n_frozen_tensors(self) -> int:
        return len(self.frozen_names)

    @property
    def trainable_fraction(self) -> float:
        total = self.n_trainable_scalars + self.n_frozen_scalars
        return self.n_trainable_scalars / total if total else 0.0

    def summary(self) -> str:
        return (f"trainable {self.n_trainable_scalars:,} parameters in {self.n_trainable_tensors} tensors "
                f"({100 * self.trainable_fraction:.2f}%), frozen {self.n_frozen_scalars:,} in "
                f"{self.n_frozen_tensors} tensors")

    def to_dict(self) -> dict:
        return {"n_trainable_tensors": self.n_trainable_tensors, "n_frozen_tensors": self.n_frozen_tensors,
                "n_trainable_scalars": self.n_trainable_scalars, "n_frozen_scalars": self.n_frozen_scalars,
                "trainable_fraction": self.trainable_fraction,
                "frozen_module_names": list(self.frozen_module_names),
                "trainable_names": list(self.trainable_names), "frozen_names": list(self.frozen_names)}


def _is_ddp_wrapped(network: nn.Module) -> bool:
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            return True
        inner = getattr(network, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        network = inner


def _alias_map(net: nn.Module) -> dict[str, str]:
    """Every name a parameter is reachable by (aliases included) -> its canonical name."""
    canonical = {id(p): name for name, p in net.named_parameters()}
    return {name: canonical[id(p)] for name, p in net.named_parameters(remove_duplicate=False)}


def frozen_modules(network: nn.Module) -> list[str]:
    """Top-most modules (canonical names) that hold parameters and all of them frozen.

    ``""`` is the whole network when nothing trains.
    """
    net = unwrap(network)
    chosen: list[str] = []
    for name, module in net.named_modules():
        if any(name == c or name.startswith(c + ".") or c == "" for c in chosen):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            chosen.append(name)
    return chosen


def apply_freeze(network: nn.Module, trainable_names: Iterable[str]) -> FreezeReport:
    """Make exactly ``trainable_names`` trainable and freeze every other parameter.

    ``requires_grad_`` is set on every parameter of the unwrapped network (``True`` for the named ones,
    ``False`` otherwise), so the result depends on the names only, not on earlier calls. Names may carry
    wrapper prefixes or be aliases (``decoder.encoder.…``, ``…all_modules.0.…``); unknown names raise
    :class:`SpecError`. Call it before the network is wrapped in DistributedDataParallel.
    """
    net = unwrap(network)
    aliases = _alias_map(net)
    wanted: set[str] = set()
    unknown: list[str] = []
    for raw in trainable_names:
        name = strip_prefixes(raw)
        if name in aliases:
            wanted.add(aliases[name])
        else:
            unknown.append(raw)
    if unknown:
        example = next(iter(aliases), "<no parameters>")
        raise SpecError(f"{len(unknown)} trainable name(s) are not parameters of this "
                        f"{type(net).__name__}: {sorted(unknown)[:5]}; names are those of "
                        f"named_parameters() of the unwrapped network, e.g. {example!r}")
    params = dict(net.named_parameters())
    if _is_ddp_wrapped(network) and any(p.requires_grad != (n in wanted) for n, p in params.items()):
        raise TransferError("apply_freeze was called on a network already wrapped in "
                            "DistributedDataParallel; DDP fixes the set of gradient-receiving "
                            "parameters when it wraps, so freeze before wrapping (in nnU-Net: in "
                            "configure_optimizers, which runs before the DDP wrap)")
    trainable, frozen = [], []
    n_train = n_frozen = 0
    for name, p in params.items():
        keep = name in wanted
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
            n_train += p.numel()
        else:
            frozen.append(name)
            n_frozen += p.numel()
    return FreezeReport(trainable_names=tuple(trainable), frozen_names=tuple(frozen),
                        n_trainable_scalars=n_train, n_frozen_scalars=n_frozen,
                        frozen_module_names=tuple(frozen_modules(net)))


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad, de-duplicated, in ``named_parameters()`` order — the list to give
    the optimizer, so frozen tensors carry no optimizer state (momentum, weight decay) at all."""
    out = [p for p in unwrap(network).parameters() if p.requires_grad]
    if not out:
        raise SpecError(f"every parameter of this {type(unwrap(network)).__name__} is frozen; the "
                        f"optimizer would be empty. Select something to train (e.g. add '+seg')")
    return out


def is_tracking_norm(module: nn.Module) -> bool:
    """Norms whose behaviour differs between train() and eval(): every BatchNorm variant, and
    InstanceNorm with ``track_running_stats=True`` (nnU-Net's default InstanceNorm has none)."""
    if isinstance(module, _BatchNorm):
        return True
    return isinstance(module, _InstanceNorm) and bool(module.track_running_stats)


def _submodule(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(strip_prefixes(name))
    except AttributeError:
        raise SpecError(f"{name!r} is not a module of this {type(net).__name__}; expected names of "
                        f"the unwrapped network such as 'encoder.stages.0'") from None


def keep_frozen_norms_in_eval(network: nn.Module, frozen_module_names: Iterable[str] | None = None) -> int:
    """Put the tracking norms inside frozen modules into eval mode; returns how many.

    Call after every ``network.train()``. ``frozen_module_names`` are module names of the unwrapped
    network (e.g. :attr:`FreezeReport.frozen_module_names` or a block's ``module_names``); by default
    they are found from ``requires_grad`` with :func:`frozen_modules`.
    """
    net = unwrap(network)
    names = frozen_modules(net) if frozen_module_names is None else list(frozen_module_names)
    seen: set[int] = set()
    for name in names:
        for m in _submodule(net, name).modules():
            if id(m) not in seen and is_tracking_norm(m):
                m.eval()
                seen.add(id(m))
    return len(seen)


def reinit_zeroed_residual_norms(network: nn.Module, module_names: Iterable[str] | None = None) -> int:
    """Set the zeroed last norm weight of residual blocks back to 1; returns how many were changed.

    ``ResidualEncoderUNet.initialize`` (dynamic-network-architectures ``init_last_bn_before_add_to_0``)
    sets weight and bias of ``conv2.norm`` of every ``BasicBlockD`` and ``conv3.norm`` of every
    ``BottleneckD`` to zero, so each residual block starts as the identity. That is harmless while the
    block trains, but a *frozen random* block would output its skip path forever: its residual branch
    is dead. Only norms whose weight is entirely zero are changed, so pretrained weights are never
    touched. ``module_names`` limits the search (e.g. to the frozen blocks); default: whole network.
    """
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD

    net = unwrap(network)
    scopes = [net] if module_names is None else [_submodule(net, n) for n in module_names]
    seen: set[int] = set()
    count = 0
    for scope in scopes:
        for m in scope.modules():
            if isinstance(m, BasicBlockD):
                norm = getattr(m.conv2, "norm", None)
            elif isinstance(m, BottleneckD):
                norm = getattr(m.conv3, "norm", None)
            else:
                continue
            weight = getattr(norm, "weight", None)
            if weight is None or id(weight) in seen:
                continue
            seen.add(id(weight))
            if not bool(weight.detach().eq(0).all()):
                continue
            with torch.no_grad():
                weight.fill_(1.0)
            count += 1
    return count
