r"""L2-SP: fine-tuning with an L2 penalty toward the pretrained weights (pure torch).

Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
ICML 2018, https://arxiv.org/abs/1802.01483; applied to U-Net encoders by Sagie, Greenspan & Goldberger,
"Transfer Learning via Parameter Regularization for Medical Image Segmentation", EUSIPCO 2021.

The objective, over the anchored scope :math:`S` (e.g. the encoder) and the trainable parameters
:math:`N` outside it that ``beta`` applies to:

.. math::

    \mathrm{Cost}(\theta) = \mathrm{Loss}(\theta)
        + \alpha \, \lVert \theta_S - \bar\theta_S \rVert_2^2
        + \beta \, \lVert \theta_N \rVert_2^2

with :math:`\bar\theta` the pretrained weights (the *anchor*). This is Sagie's form, **without** a
factor 1/2, so the penalty's gradient is :math:`2\alpha(\theta_S - \bar\theta_S)` and
:math:`2\beta\theta_N`. Li et al. write :math:`\tfrac{\alpha}{2}\lVert\cdot\rVert^2`:
their :math:`\alpha_{Li}` corresponds to ``alpha = alpha_Li / 2`` here (likewise ``beta``).

``alpha = inf`` would mean "do not move the scope at all" — that is freezing, which the trainer does
by freezing (no gradient, no optimizer state), not by an infinite penalty; this class rejects it.
``alpha = 0`` switches the penalty off: :func:`param_groups` then leaves nnU-Net's weight decay on the
scope, so the run is plain nnU-Net fine-tuning, bit for bit. ``beta = None`` keeps nnU-Net's SGD
weight decay on :math:`N`; a number (0 included) replaces it by the explicit term above.

Where the penalty enters nnU-Net's ``train_step`` (why: the issue requires the update to equal the
gradient of loss + penalty *exactly*, nnU-Net's gradient clipping and AMP grad scaler included)::

    optimizer.zero_grad(set_to_none=True)
    l = loss(network(x), y)
    scaler.scale(l).backward()          # or l.backward() without a grad scaler
    scaler.unscale_(optimizer)          # grads are now true (unscaled) gradients of the loss
    penalty.add_to_grads()              # + 2α(θ_S − θ̄_S) + 2β θ_N  -> gradient of the full Cost
    clip_grad_norm_(network.parameters(), 12)   # clips the gradient of the full Cost
    scaler.step(optimizer); scaler.update()     # or optimizer.step()

:func:`nnunet_transfer.nnunet_compat.penalised_step` (beside its guarded copy of nnU-Net's ``train_step``) is
exactly this sequence. Adding the penalty gradient *before* clipping makes
clipping act on the gradient of the whole objective, which is what autograd on ``loss + penalty``
followed by the same clipping computes. Adding it *after* ``unscale_`` keeps it out of the loss
scale (autograd on the scaled sum would scale and unscale it by a power of two: the same numbers);
if ``unscale_`` found an inf/NaN, ``scaler.step`` skips the step as it would without the penalty.
Under DistributedDataParallel the grads are already all-reduced when ``backward`` returns, and every
rank holds the same weights and anchor, so every rank adds the same penalty gradient.

The anchor must be captured **after** the pretrained weights are loaded (nnU-Net loads them after
``configure_optimizers``, so build this object and the param groups there and call :meth:`capture`
in ``on_train_start``), stored in every checkpoint via :meth:`L2SPPenalty.state_dict` and restored
via :meth:`L2SPPenalty.load_state_dict` on ``--c`` — never re-captured from fine-tuned weights.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Iterable, Mapping, NamedTuple, Union

import torch
from torch import nn

from nnunet_transfer.errors import ConfigError, TransferError

NamedParameters = Union[Mapping[str, nn.Parameter], Iterable[tuple[str, nn.Parameter]]]

#: names of the groups :func:`param_groups` returns (extra keys in a param group are kept by torch.optim)
GROUP_ANCHORED, GROUP_BETA, GROUP_OTHER = "l2sp_anchored", "l2sp_beta", "other"


class AnchorError(TransferError, ValueError):
    """The L2-SP anchor is missing, captured twice, or does not match the anchored parameters."""


class RelativeDistance(NamedTuple):
    """How far the scope moved from the anchor (both ratios are 0 at the anchor).

    ``per_tensor_mean``: mean over the anchored tensors of ``‖θ_t − θ̄_t‖ / ‖θ̄_t‖`` — every tensor
    counts the same, so small tensors (norm weights, biases) weigh as much as big convolutions;
    tensors whose anchor is all zeros (ratio undefined) are left out; NaN if all are.
    ``overall``: ``‖θ_S − θ̄_S‖ / ‖θ̄_S‖`` with all anchored tensors as one vector — dominated by the
    big convolutions; NaN if the anchor is all zeros.
    """

    per_tensor_mean: float
    overall: float


def _check_coefficient(name: str, value, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"`{name}` must be a non-negative finite number{' or None' if allow_none else ''}, "
                          f"got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ConfigError(f"`{name}` must be a non-negative finite number, got {value}")
    if math.isinf(value):
        if name == "alpha":
            raise ConfigError("`alpha` = inf means the anchored scope must not move: freeze it instead (the "
                              "trainers turn l2sp_alpha: inf into freezing the scope); an infinite penalty has "
                              "no finite gradient")
        raise ConfigError(f"`{name}` must be finite, got {value}")
    return value


def _as_named_list(named: NamedParameters, what: str) -> list[tuple[str, nn.Parameter]]:
    items = list(named.items()) if isinstance(named, Mapping) else list(named)
    seen: dict[int, str] = {}
    names: set[str] = set()
    for name, p in items:
        if not isinstance(p, torch.Tensor):
            raise ConfigError(f"{what}: {name!r} is a {type(p).__name__}, not a parameter tensor")
        if name in names:
            raise ConfigError(f"{what}: the name {name!r} appears twice")
        if id(p) in seen:
            # aliased modules (dynamic-network-architectures' decoder.encoder, all_modules.k) would
            # count one tensor twice; select from the unwrapped network's named_parameters()
            raise ConfigError(f"{what}: {name!r} and {seen[id(p)]!r} are the same tensor (an alias); "
                              f"take names from the unwrapped network's named_parameters()")
        seen[id(p)] = name
        names.add(name)
    return items


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _squared_norms(tensors: list[torch.Tensor], *, consume: bool = False) -> torch.Tensor:
    """``‖t‖₂²`` of every tensor as one float64 CPU vector; ``consume=True`` squares ``tensors`` in place.

    Per-tensor sums use torch's pairwise summation in the tensors' dtype and are combined in float64
    by the caller. Not ``torch._foreach_norm``: on the CPU its float32 result is off by ~1e-4
    (relative) on conv-sized tensors, and asking it for float64 costs ~20x.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if consume:
        torch._foreach_mul_(tensors, tensors)
        sums = [t.sum() for t in tensors]
    else:  # one temporary at a time: a foreach copy of all of them would be a second network's worth
        sums = [(t * t).sum() for t in tensors]
    return torch.stack(sums).to("cpu", torch.float64)


class L2SPPenalty:
    """The penalty ``α ‖θ_S − θ̄_S‖² + β ‖θ_N‖²``, applied as gradients, no autograd graph.

    Args:
        anchored: ``{name: parameter}`` (or ``(name, parameter)`` pairs) of the scope ``S``; names are
            canonical (unwrapped network, no ``module.``/``_orig_mod.``) — they key the anchor's
            :meth:`state_dict`.
        alpha: ``α ≥ 0``, finite (``inf`` = freezing: freeze instead). ``0`` switches the penalty off.
        beta: ``β ≥ 0`` on ``new`` (explicit L2 toward zero, replacing weight decay there), or ``None``
            (keep nnU-Net's weight decay on ``new``; the penalty then adds nothing there).
        new: the trainable parameters outside ``S`` that ``beta`` applies to.

    Every parameter must require grad (frozen ones never move: leave them out, as
    :meth:`from_named_parameters` does) and appear once; ``S`` and ``new`` must be disjoint.
    The anchor has each parameter's dtype and device; nothing is anchored until :meth:`capture` or
    :meth:`load_state_dict`.
    """

    def __init__(self, anchored: NamedParameters, *, alpha: float, beta: float | None = None,
                 new: NamedParameters = ()) -> None:
        self.alpha = _check_coefficient("alpha", alpha, allow_none=False)
        self.beta = _check_coefficient("beta", beta, allow_none=True)
        scope = _as_named_list(anchored, "anchored parameters")
        others = _as_named_list(new, "beta parameters")
        if not scope:
            raise ConfigError("L2-SP needs at least one anchored parameter; the scope selected none")
        scope_names, scope_ids = {n for n, _ in scope}, {id(p) for _, p in scope}
        both = sorted(n for n, p in others if n in scope_names or id(p) in scope_ids)
        if both:
            raise ConfigError(f"parameters both anchored and under beta: {both}; the two sets must be disjoint")
        frozen = [n for n, p in scope + others if not p.requires_grad]
        if frozen:
            raise ConfigError(f"L2-SP got parameters that do not require grad (frozen): {frozen}; frozen "
                              f"parameters never move — leave them out (from_named_parameters does)")
        self.anchored_names: tuple[str, ...] = tuple(n for n, _ in scope)
        self.new_names: tuple[str, ...] = tuple(n for n, _ in others)
        self._params: list[nn.Parameter] = [p for _, p in scope]
        self._new: list[nn.Parameter] = [p for _, p in others]
        self._anchor: list[torch.Tensor] | None = None
        self._anchor_norms: torch.Tensor | None = None

    @classmethod
    def from_named_parameters(cls, named: NamedParameters, anchored: Iterable[str], *, alpha: float,
                              beta: float | None = None, scope: Iterable[str] | None = None) -> "L2SPPenalty":
        """Split a network's parameters: names in ``anchored`` are anchored, every trainable one outside
        ``scope`` gets ``beta``.

        ``named`` is the unwrapped network's ``named_parameters()`` (canonical names, see
        :func:`nnunet_transfer.netutil.unique_named_parameters`); ``anchored`` a set of those names
        (e.g. from :func:`nnunet_transfer.blocks.resolve_spec`). ``scope`` (default: ``anchored``) is the
        set of transferred parameters the anchored ones were chosen from: its members that are not
        anchored (e.g. biases and norms when only kernels are anchored, as in Li et al.'s reference
        implementation) get neither the anchor nor ``beta``. Frozen parameters are left out of both.
        """
        items = _as_named_list(named, "network parameters")
        anchored = set(anchored)
        scope = anchored if scope is None else set(scope)
        known = {n for n, _ in items}
        unknown = sorted((anchored | scope) - known)
        if unknown:
            raise ConfigError(f"L2-SP scope names not among the network's parameters: {unknown[:10]}"
                              f"{' ...' if len(unknown) > 10 else ''} ({len(unknown)} in all); use canonical "
                              f"names of the unwrapped network")
        if not anchored <= scope:
            raise ConfigError(f"L2-SP: anchored parameters outside the scope: {sorted(anchored - scope)[:5]}")
        pinned = [(n, p) for n, p in items if n in anchored and p.requires_grad]
        new = [(n, p) for n, p in items if n not in scope and p.requires_grad]
        return cls(pinned, alpha=alpha, beta=beta, new=new)

    # -- the anchor -----------------------------------------------------------
    @property
    def captured(self) -> bool:
        return self._anchor is not None

    @torch.no_grad()
    def capture(self, *, force: bool = False) -> None:
        """Take the current values of the anchored parameters as the anchor ``θ̄``.

        Call it once, right after the pretrained weights are loaded. A second call raises unless
        ``force=True``: re-capturing later would anchor to fine-tuned weights (on ``--c`` restore the
        stored anchor with :meth:`load_state_dict` instead).
        """
        if self.captured and not force:
            raise AnchorError("the L2-SP anchor is already captured; capturing again would anchor to the "
                              "current (possibly fine-tuned) weights. Restore a stored anchor with "
                              "load_state_dict(), or pass force=True if re-anchoring is really intended")
        self._set_anchor([p.detach().clone() for p in self._params])

    def _set_anchor(self, anchor: list[torch.Tensor]) -> None:
        self._anchor = anchor
        self._anchor_norms = _squared_norms(anchor).sqrt()

    def _require_anchor(self) -> list[torch.Tensor]:
        if self._anchor is None:
            raise AnchorError("the L2-SP anchor is not captured yet: call capture() after the pretrained "
                              "weights are loaded, or load_state_dict() with the anchor stored in a checkpoint")
        return self._anchor

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The anchor as ``{canonical name: CPU tensor}`` (detached copies, the parameters' dtypes)."""
        return {n: a.detach().to("cpu", copy=True) for n, a in zip(self.anchored_names, self._require_anchor())}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore an anchor saved by :meth:`state_dict` (e.g. from a checkpoint on ``--c``).

        Names must be exactly the anchored names and shapes must match; otherwise :class:`AnchorError`
        lists every missing, unexpected and mis-shaped entry. Values are copied to each parameter's
        device and dtype (bit-identical when the dtype is unchanged). Replaces any captured anchor.
        """
        expected = dict(zip(self.anchored_names, self._params))
        missing = [n for n in self.anchored_names if n not in state]
        unexpected = sorted(n for n in state if n not in expected)
        shapes = [f"{n}: stored {_shape_of(state[n])}, parameter {tuple(p.shape)}"
                  for n, p in expected.items() if n in state
                  and (not isinstance(state[n], torch.Tensor) or state[n].shape != p.shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing ({len(missing)}): {missing}")
            if unexpected:
                parts.append(f"unexpected ({len(unexpected)}): {unexpected}")
            if shapes:
                parts.append(f"shape mismatch ({len(shapes)}): {shapes}")
            raise AnchorError("the stored L2-SP anchor does not match the anchored parameters — was it saved "
                              "with another l2sp scope or network? " + "; ".join(parts))
        self._set_anchor([state[n].detach().to(device=p.device, dtype=p.dtype, copy=True)
                          for n, p in expected.items()])

    # -- values ---------------------------------------------------------------
    @torch.no_grad()
    def _diffs(self) -> list[torch.Tensor]:
        return torch._foreach_sub(self._params, self._require_anchor())

    def _value_from(self, diffs: list[torch.Tensor]) -> float:
        """The penalty; ``diffs`` (θ_S − θ̄_S, owned by the caller) are squared in place."""
        value = self.alpha * float(_squared_norms(diffs, consume=True).sum()) if self.alpha else 0.0
        if self.beta:
            value += self.beta * float(_squared_norms(self._new).sum())
        return value

    @torch.no_grad()
    def penalty_value(self) -> float:
        """``α Σ_S ‖θ_t − θ̄_t‖² + β Σ_N ‖θ_t‖²`` (no β part if ``beta=None``).

        Per-tensor sums of squares combined in float64; no autograd graph.
        """
        self._require_anchor()
        return self._value_from(self._diffs() if self.alpha else [])

    @torch.no_grad()
    def relative_distance(self) -> RelativeDistance:
        """Distance of the scope from the anchor, per tensor and overall (see :class:`RelativeDistance`)."""
        dist = _squared_norms(self._diffs(), consume=True).sqrt()
        ref = self._anchor_norms
        ok = ref > 0
        per_tensor = float((dist[ok] / ref[ok]).mean()) if bool(ok.any()) else math.nan
        total_ref = float(ref.square().sum().sqrt())
        overall = float(dist.square().sum().sqrt()) / total_ref if total_ref > 0 else math.nan
        return RelativeDistance(per_tensor, overall)

    # -- gradients ------------------------------------------------------------
    @torch.no_grad()
    def add_to_grads(self, *, return_value: bool = False) -> float | None:
        """Add the penalty's gradient to ``.grad``: ``2α(θ_S − θ̄_S)`` and, if ``beta`` is set, ``2β θ_N``.

        In-place ``torch._foreach_*`` ops under ``no_grad``: no autograd graph. A parameter whose
        ``.grad`` is ``None`` (no loss gradient) gets the penalty gradient as its grad. Call it after
        ``backward()`` (and after ``GradScaler.unscale_``) and before gradient clipping — see the
        module docstring. With ``return_value=True`` also returns :meth:`penalty_value`, computed from
        the same differences (one pass fewer than calling both).
        """
        # the anchor is required even with alpha == 0: a forgotten capture() is a trainer bug to surface
        self._require_anchor()
        diffs: list[torch.Tensor] = []
        if self.alpha:
            diffs = self._diffs()
            self._add(self._params, diffs, 2.0 * self.alpha)
        if self.beta:
            self._add(self._new, self._new, 2.0 * self.beta)
        return self._value_from(diffs) if return_value else None

    @staticmethod
    def _add(params: list[nn.Parameter], terms: list[torch.Tensor], scale: float) -> None:
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if with_grad:
            torch._foreach_add_([params[i].grad for i in with_grad], [terms[i] for i in with_grad], alpha=scale)
        if len(with_grad) < len(params):
            have = set(with_grad)
            for i, p in enumerate(params):
                if i not in have:
                    p.grad = torch.mul(terms[i], scale)


def param_groups(parameters: Iterable[nn.Parameter], penalty: L2SPPenalty | None, *,
                 weight_decay: float) -> list[dict]:
    """Optimizer param groups for L2-SP, in the order anchored, beta, other (empty groups left out).

    The penalty replaces weight decay where it acts: anchored parameters get ``weight_decay=0`` when
    ``alpha > 0`` (with ``alpha == 0`` the penalty is off and they keep ``weight_decay``), beta
    parameters get ``weight_decay=0`` when ``beta`` is not ``None`` (else nnU-Net's ``weight_decay``),
    every other parameter keeps ``weight_decay``. ``parameters`` is what the optimizer should train
    (e.g. the trainable parameters after freezing); every anchored and beta parameter must be among
    them. Each group carries a ``"name"`` key; ``torch.optim.SGD(groups, lr, momentum=..., ...)``
    accepts the list as is. ``penalty=None`` gives one group with ``weight_decay``.
    """
    params = list(parameters)
    if penalty is None:
        return [{"params": params, "weight_decay": weight_decay, "name": GROUP_OTHER}]
    where = {id(p): GROUP_OTHER for p in params}
    absent = []
    for names, group, plist in ((penalty.anchored_names, GROUP_ANCHORED, penalty._params),
                                (penalty.new_names, GROUP_BETA, penalty._new)):
        for n, p in zip(names, plist):
            if id(p) in where:
                where[id(p)] = group
            else:
                absent.append(n)
    if absent:
        raise ConfigError(f"L2-SP parameters missing from the optimizer's parameters: {absent}; give "
                          f"param_groups every trainable parameter (a penalised parameter must be optimized)")
    decay = {GROUP_ANCHORED: 0.0 if penalty.alpha else weight_decay,
             GROUP_BETA: weight_decay if penalty.beta is None else 0.0, GROUP_OTHER: weight_decay}
    groups = []
    for name in (GROUP_ANCHORED, GROUP_BETA, GROUP_OTHER):
        members = [p for p in params if where[id(p)] == name]
        if members:
            groups.append({"params": members, "weight_decay": decay[name], "name": name})
    return groups
