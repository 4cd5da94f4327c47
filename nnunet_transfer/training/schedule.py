"""Learning-rate schedule: nnU-Net's poly decay, an optional linear warm-up, per-group factors.

nnU-Net's ``PolyLRScheduler`` writes one learning rate into every parameter group; strategies that
give groups different rates (``lr_factor`` in a group) need this one. With ``warmup_steps=0`` and no
factors it reproduces ``PolyLRScheduler`` exactly; ``exponent=0`` is a constant rate (after the warm-up).

:func:`make_optimizer` builds the optimizer of setting ``optimizer``: nnU-Net's SGD, or Adam / AdamW.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_transfer.nnunet_compat import nnunet_sgd, poly_lr


#: setting ``optimizer``
OPTIMIZERS = ("sgd", "adam", "adamw")
#: setting ``lr_schedule`` -> the exponent of ``(1 - step / max_steps) ** exponent``
LR_SCHEDULES = {"poly": 0.9, "constant": 0.0}


def make_optimizer(groups: list[dict], name: str, lr: float, *, weight_decay: float) -> Optimizer:
    """The optimizer of setting ``optimizer`` over parameter groups (a group's own ``weight_decay``, e.g.
    L2-SP's 0 on its scope, overrides ``weight_decay``).

    * ``sgd``: nnU-Net's ``nnUNetTrainer.configure_optimizers`` (momentum 0.99, Nesterov, L2 weight decay).
    * ``adam``: ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8), ``weight_decay`` added to the gradient (L2).
    * ``adamw``: ``torch.optim.AdamW``, the same decay decoupled from the gradient (Loshchilov & Hutter).
    """
    if name == "sgd":
        return nnunet_sgd(groups, lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def poly_warmup_lr(step: int, *, initial_lr: float, max_steps: int, warmup_steps: int = 0,
                   exponent: float = 0.9) -> float:
    """lr(step) = initial_lr · (step+1)/warmup for step < warmup, else initial_lr · (1 − step/max)^0.9."""
    if step < warmup_steps:
        return initial_lr * (step + 1) / warmup_steps
    return poly_lr(step, initial_lr=initial_lr, max_steps=max_steps, exponent=exponent)


class PretrainedWarmupLRScheduler(_LRScheduler):
    """nnU-Net master's fine-tuning schedule (``PretrainedTrainer`` in
    ``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``), by nnU-Net's own classes of
    ``nnunetv2.training.lr_scheduler.warmup`` (shipped with 2.8.1 too)::

        lr(e) = initial_lr · (e + 1) / W                                e < W   (Lin_incr_LRScheduler)
        lr(e) = initial_lr · (1 − (e − W) / (max_steps − W))^exponent   e ≥ W   (PolyLRScheduler_offset)

    Master builds the first for epochs ``0 … W−1`` and switches to the second at epoch ``W`` on the same
    optimizer (its momentum kept); here one scheduler steps whichever applies, stepped once per epoch by nnU-Net
    with the epoch index. Every parameter group gets the same rate, as there.
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float, max_steps: int, *, warmup_steps: int,
                 exponent: float = 0.9):
        # nnU-Net's own classes; imported here so that the pure-torch policies importing this module stay so
        from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

        self.initial_lr, self.max_steps = initial_lr, max_steps
        self.warmup_steps, self.exponent = warmup_steps, exponent
        self.ctr = 0
        # each writes the rate of its own first step on construction; step() below sets the one that applies
        self._warmup = Lin_incr_LRScheduler(optimizer, initial_lr, warmup_steps) if warmup_steps > 0 else None
        # a run no longer than the warm-up never reaches the poly phase (its length max_steps − W would be <= 0)
        self._poly = PolyLRScheduler_offset(optimizer, initial_lr, max_steps, warmup_steps, exponent) \
            if max_steps > warmup_steps else None
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        phase = self._warmup if current_step < self.warmup_steps or self._poly is None else self._poly
        phase.step(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


class WarmupPolyLRScheduler(_LRScheduler):
    """Stepped once per epoch by nnU-Net with the epoch index, like ``PolyLRScheduler``."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, max_steps: int, *,
                 warmup_steps: int = 0, exponent: float = 0.9):
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = poly_warmup_lr(current_step, initial_lr=self.initial_lr, max_steps=self.max_steps,
                            warmup_steps=self.warmup_steps, exponent=self.exponent)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr
