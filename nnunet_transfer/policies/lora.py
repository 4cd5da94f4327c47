r"""Low-rank adapters (LoRA) on 2-D / 3-D convolutions and linear layers, serialised as the plain layers they compute.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, https://arxiv.org/abs/2106.09685.
For a convolution with kernel :math:`W \in \mathbb{R}^{o \times i \times k_1 \times k_2 \times k_3}` (a
transposed one stores :math:`i \times o \times \dots`) viewed as the matrix :math:`W_{(1)}` of its first
axis against the rest (:math:`d_1 \times d_2`, :math:`d_1 = o`, :math:`d_2 = i k_1 k_2 k_3`), the layer
computes with (a linear layer, e.g. a transformer's attention ``q_proj`` / ``proj`` or its MLP ``fc1`` / ``fc2``,
is the case :math:`W \in \mathbb{R}^{o \times i}`: :math:`d_1 = o`, :math:`d_2 = i`, Hu et al.'s own setting)

.. math::

    W' = W_0 + \frac{\alpha}{r} \, \mathrm{reshape}(B A), \qquad
    B \in \mathbb{R}^{d_1 \times r}, \; A \in \mathbb{R}^{r \times d_2}, \; 1 \le r \le \min(d_1, d_2)

with :math:`W_0` frozen, :math:`A` Kaiming-uniform and :math:`B = 0` at the start (peft's initialisation),
so training starts at the pretrained function. The update is applied in weight space — one small matmul
per convolution and step — so the adapted layer *is* a convolution with kernel :math:`W'`: merging is
exact in the sense that the merged layer computes the same kernel, bit for bit.

Why the layers keep their class and their state-dict keys: nnU-Net's ``-pretrained_weights`` loader,
``--c`` loader and ``nnUNetv2_predict`` all work with the *plain* network's ``state_dict`` keys
(``...conv.weight``), and dynamic-network-architectures reaches every conv under two names
(``...conv`` and ``...all_modules.0``). peft's wrapper modules (``base_layer.weight``) would rename keys and
break all three. So :func:`inject_lora` swaps the class of each chosen conv in place to a generated
subclass (as ``torch.nn.utils.parametrize`` does) that adds ``lora_A`` / ``lora_B``; every alias sees the
change and ``isinstance(m, nn.Conv3d)`` still holds. Its state dict is the *plain form*:

* ``state_dict()`` holds ``weight`` = :math:`W'` (the merged kernel) and ``bias`` — what the layer computes
  with — and no adapter keys; aliases share one merged tensor per call. Every file nnU-Net writes from
  the network is therefore a plain checkpoint that the stock predictor and loaders read.
* loading a plain ``weight`` :math:`K` sets :math:`W_0 = K - \frac{\alpha}{r} BA` so that the layer computes
  with :math:`K` (exactly :math:`K` while :math:`B = 0`, i.e. when pretrained weights are loaded at start).
* the *training form* — :math:`W_0`, :math:`A`, :math:`B` under ``weight``, ``lora_A``, ``lora_B`` — comes from
  :func:`lora_state` and goes back exactly with :func:`load_lora_state` (resume), or through
  ``load_state_dict`` of a dict that holds the adapter keys (e.g. from :func:`training_form`).
"""
from __future__ import annotations

import hashlib
import math
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.netutil import CONV_TYPES, TRANSPOSED_TYPES, unwrap

#: the layers that take an adapter: forward and transposed convolutions, and linear layers
ADAPTABLE_TYPES = CONV_TYPES + TRANSPOSED_TYPES + (nn.Linear,)

ADAPTER_PARAMS = ("lora_A", "lora_B")
PAYLOAD_FORMAT = "nnunet_transfer.lora/1"


def kernel_matrix_shape(conv: nn.Module) -> tuple[int, int]:
    """``(d1, d2)``: the kernel's first axis against the rest (out × in·k³; transposed: in × out·k³; linear:
    out × in)."""
    w = conv.weight
    return int(w.shape[0]), int(w[0].numel())


class LoRAConvMixin:
    """Adds ``lora_A`` (r × d2) and ``lora_B`` (d1 × r) to a convolution or linear layer; see the module
    docstring."""

    lora_rank: int
    lora_alpha: float
    _lora_training_form: bool = False

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def lora_delta(self) -> torch.Tensor:
        """``scale · reshape(B A)``, shaped like the kernel."""
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.lora_scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.lora_delta()

    def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:  # noqa: A002 - torch's name
        weight = self.merged_weight()
        if isinstance(self, nn.Linear):
            return F.linear(input, weight, self.bias)
        if isinstance(self, CONV_TYPES):
            return self._conv_forward(input, weight, self.bias)
        # the transposed convolutions' forward, with the merged kernel (torch/nn/modules/conv.py)
        if self.padding_mode != "zeros":
            raise ValueError(f"only 'zeros' padding is supported for {type(self).__name__}")
        dims = weight.dim() - 2
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              dims, self.dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(input, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation)

    # ---- plain-form state dict ------------------------------------------------------------------------
    def _plain_weight(self, keep_vars: bool) -> torch.Tensor:
        # one merged tensor per state_dict() call, shared by the aliases (conv / all_modules.0), without
        # keeping a copy of the kernel alive: the cache is a weak reference, valid while nothing changed
        key = (self.weight._version, self.lora_A._version, self.lora_B._version, keep_vars)
        cached = getattr(self, "_lora_plain_cache", None)
        if cached is not None and cached[0] == key and cached[1]() is not None:
            return cached[1]()
        if keep_vars:
            merged = self.merged_weight()
        else:
            with torch.no_grad():
                merged = self.merged_weight()
        self._lora_plain_cache = (key, weakref.ref(merged))
        return merged

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._lora_training_form:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, p in self._parameters.items():
            if p is None or name in ADAPTER_PARAMS:
                continue
            destination[prefix + name] = self._plain_weight(keep_vars) if name == "weight" else (
                p if keep_vars else p.detach())
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if any(prefix + name in state_dict for name in ADAPTER_PARAMS):  # training form: exact
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        view = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        key = prefix + "weight"
        if key in view and tuple(view[key].shape) == tuple(self.weight.shape):
            with torch.no_grad():
                if bool(self.lora_B.any()):
                    kernel = view[key].to(self.weight.device, self.weight.dtype)
                    view[key] = kernel - self.lora_delta()
        for name in ADAPTER_PARAMS:  # keep the adapters: a plain file says nothing about them
            view[prefix + name] = getattr(self, name).detach()
        return super()._load_from_state_dict(view, prefix, local_metadata, strict, missing_keys,
                                             unexpected_keys, error_msgs)


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAConvMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, LoRAConvMixin)


def lora_modules(network: nn.Module) -> dict[str, nn.Module]:
    """Adapted convolutions and linear layers by canonical (first registered) module name."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in unwrap(network).named_modules():
        if is_lora(m) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def check_rank(rank: int, convs: Mapping[str, nn.Module]) -> None:
    """``rank`` must be in ``1..min(d1, d2)`` for every conv (meta-device modules are fine)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"setting 'lora_rank' must be an integer >= 1, got {rank!r}")
    too_small = [(n, kernel_matrix_shape(m)) for n, m in convs.items() if rank > min(kernel_matrix_shape(m))]
    if too_small:
        name, (d1, d2) = min(too_small, key=lambda t: min(t[1]))
        limit = min(min(s) for _, s in too_small)
        raise ConfigError(f"setting 'lora_rank'={rank} is larger than the smallest dimension of {len(too_small)} "
                          f"adapted convolution(s), e.g. {name} (kernel as a {d1} x {d2} matrix: a rank-{rank} update "
                          f"cannot exist); use lora_rank <= {limit}, or leave those layers out of lora_targets")


def inject_lora(network: nn.Module, conv_names: Iterable[str], *, rank: int, alpha: float,
                generator: torch.Generator | None = None) -> dict[str, nn.Module]:
    """Add adapters to the named convolutions / linear layers of the unwrapped network (in place); returns them
    by name.

    Call before the network is wrapped in DistributedDataParallel (the adapters are new parameters) and
    before the optimizer is built. ``A`` ~ Kaiming-uniform (a = √5, as peft), ``B`` = 0.
    """
    net = unwrap(network)
    convs: dict[str, nn.Module] = {}
    for name in conv_names:
        try:
            m = net.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{name!r} is not a module of this {type(net).__name__}") from None
        if not isinstance(m, ADAPTABLE_TYPES):
            raise ConfigError(f"{name} is a {type(m).__name__}; adapters go on convolutions and linear layers "
                              f"({', '.join(c.__name__ for c in ADAPTABLE_TYPES)})")
        if is_lora(m):
            raise ConfigError(f"{name} already has an adapter")
        convs[name] = m
    if not convs:
        raise ConfigError("no convolution or linear layer to adapt")
    check_rank(rank, convs)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"setting 'lora_alpha' must be a finite number > 0, got {alpha!r}")
    for m in convs.values():
        d1, d2 = kernel_matrix_shape(m)
        w = m.weight
        a = torch.empty(rank, d2, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            bound = 1 / math.sqrt(d2)  # kaiming_uniform_(a=√5): gain √(2/(1+5)) · √(3/fan_in) = 1/√fan_in
            a.uniform_(-bound, bound, generator=generator)
        m.__class__ = _lora_class(type(m))
        m.lora_rank, m.lora_alpha = rank, float(alpha)
        m.lora_A = nn.Parameter(a)
        m.lora_B = nn.Parameter(torch.zeros(d1, rank, device=w.device, dtype=w.dtype))
    return convs


def remove_lora(network: nn.Module) -> int:
    """Merge every adapter into its kernel and give the layers their plain class back; returns how many."""
    mods = lora_modules(network)
    with torch.no_grad():
        for m in mods.values():
            m.weight.copy_(m.merged_weight())
            del m.lora_A, m.lora_B
            m.__class__ = type(m).__bases__[1]  # LoRAConvN(LoRAConvMixin, ConvN)
            for attr in ("lora_rank", "lora_alpha", "_lora_plain_cache"):
                m.__dict__.pop(attr, None)
    return len(mods)


@contextmanager
def training_form(network: nn.Module) -> Iterator[None]:
    """While active, ``state_dict()`` holds W₀, ``lora_A``, ``lora_B`` (the exact training state)."""
    mods = list(lora_modules(network).values())
    for m in mods:
        m._lora_training_form = True
    try:
        yield
    finally:
        for m in mods:
            m._lora_training_form = False


def lora_state(network: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{conv name: {"weight": W₀, "lora_A": A, "lora_B": B}}`` on the CPU — what resume needs exactly."""
    return {name: {"weight": m.weight.detach().cpu(), "lora_A": m.lora_A.detach().cpu(),
                   "lora_B": m.lora_B.detach().cpu()} for name, m in lora_modules(network).items()}


def load_lora_state(network: nn.Module, state: Mapping[str, Mapping[str, torch.Tensor]], *,
                    keys: Iterable[str] = ("weight", "lora_A", "lora_B")) -> None:
    """Copy a :func:`lora_state` (or its adapters only, ``keys=ADAPTER_PARAMS``) back, in place, exactly."""
    mods = lora_modules(network)
    if set(state) != set(mods):
        raise DataError(f"the saved adapters are on {len(state)} convolution(s), this network has {len(mods)}; "
                        f"only in the file: {sorted(set(state) - set(mods))[:3]}, only in the network: "
                        f"{sorted(set(mods) - set(state))[:3]}")
    with torch.no_grad():
        for name, m in mods.items():
            for k in keys:
                target = getattr(m, k)
                if tuple(state[name][k].shape) != tuple(target.shape):
                    raise DataError(f"{name}.{k}: saved shape {tuple(state[name][k].shape)}, network "
                                    f"{tuple(target.shape)} (another lora_rank or another network)")
                target.copy_(state[name][k])  # in place: the optimizer keeps pointing at these tensors


def adapter_parameter_names(network: nn.Module) -> set[str]:
    """Canonical parameter names of every ``lora_A`` / ``lora_B``."""
    return {f"{name}.{p}" for name in lora_modules(network) for p in ADAPTER_PARAMS}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (identifies a frozen base tensor without storing it)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_payload(network: nn.Module, *, trained_names: Iterable[str]) -> dict:
    """What one target needs on top of its base network: the adapters, the parameters trained in full
    (the heads, …) and digests of every frozen base tensor (so a merge can refuse another base)."""
    net = unwrap(network)
    mods = lora_modules(net)
    if not mods:
        raise ConfigError("the network has no adapters")
    params = dict(net.named_parameters())
    adapters = set(adapter_parameter_names(net))
    trained = {n: params[n].detach().cpu() for n in trained_names if n not in adapters}
    frozen = [n for n in params if n not in adapters and n not in trained]
    first = next(iter(mods.values()))
    return {"format": PAYLOAD_FORMAT, "rank": first.lora_rank, "alpha": first.lora_alpha,
            "adapters": {name: {"lora_A": m.lora_A.detach().cpu(), "lora_B": m.lora_B.detach().cpu()}
                         for name, m in mods.items()},
            "trained": trained, "base_digests": {n: tensor_digest(params[n]) for n in frozen}}


def apply_adapter_payload(network: nn.Module, payload: Mapping) -> dict[str, nn.Module]:
    """Put a payload's adapters and trained tensors on a network holding its base (plain, not adapted)."""
    if payload.get("format") != PAYLOAD_FORMAT:
        raise DataError(f"not an adapter file of this package (format {payload.get('format')!r}, expected "
                        f"{PAYLOAD_FORMAT!r})")
    net = unwrap(network)
    params = dict(net.named_parameters())
    wrong = [n for n, d in payload["base_digests"].items() if n not in params or tensor_digest(params[n]) != d]
    if wrong:
        raise DataError(f"the base is not the network these adapters were trained on: {len(wrong)} of "
                        f"{len(payload['base_digests'])} frozen tensors differ or are missing (e.g. {wrong[0]}); "
                        f"merge into the checkpoint the LoRA run started from")
    mods = inject_lora(net, payload["adapters"], rank=int(payload["rank"]), alpha=float(payload["alpha"]))
    load_lora_state(net, payload["adapters"], keys=ADAPTER_PARAMS)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, t in payload["trained"].items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise DataError(f"trained tensor {n} {tuple(t.shape)} does not fit the network "
                                f"({tuple(params[n].shape) if n in params else 'absent'})")
            params[n].copy_(t)
    return mods


__all__ = ["ADAPTABLE_TYPES", "LoRAConvMixin", "inject_lora", "remove_lora", "lora_modules", "is_lora", "check_rank",
           "kernel_matrix_shape", "training_form", "lora_state", "load_lora_state", "adapter_parameter_names",
           "adapter_payload", "apply_adapter_payload", "tensor_digest", "ADAPTER_PARAMS", "PAYLOAD_FORMAT"]
