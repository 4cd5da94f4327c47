"""The kernel rules of ``weights adapt``: a source kernel mapped to the size the target's plans give.

Pure tensor maths (float64 inside), used by :func:`nnunet_transfer.plans.adapt.adapt_state` for
``mapped`` tensors.

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

"""
from __future__ import annotations

from typing import Sequence

import torch

from nnunet_transfer.errors import TransferError


class KernelRuleError(TransferError, ValueError):
    """A kernel change the documented rule does not cover (an even kernel, a stride 2 → 3)."""



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


__all__ = ["KernelRuleError", "conv_axis_matrix", "transposed_axis_matrix", "map_kernel", "describe_kernel_change"]
