r"""Staged schedules: the trainable set changes at epoch boundaries (pure torch).

A schedule is a list of stages ``[[spec, end], ..., [spec, None]]`` (setting ``stages``): stage ``i`` trains
the block spec ``spec_i`` from epoch ``end_{i-1}`` (0 for the first) until epoch ``end_i``, the last stage
until the end of the run — "train the heads / the decoder first, then everything" (MultiTalent's
fine-tuning, Ulrich et al. 2023; gradual unfreezing, Howard & Ruder, ULMFiT, ACL 2018).

At a stage change (:func:`enter_stage`; the trainer composes the same steps with its own reporting):

* every parameter is set to ``requires_grad`` exactly as the new stage says (:func:`~nnunet_transfer.policies.
  freezing.apply_freeze`), so parameters outside it get no gradient and cost no weight-gradient compute;
* parameters that train for the first time join the optimizer as a **new parameter group** (fresh
  momentum); those that already trained keep their group and their optimizer state (momentum buffers);
  parameters that stop training keep their state too — SGD skips a parameter whose ``grad`` is None,
  so neither momentum nor weight decay moves it;
* the new group's learning rate ramps linearly over ``stage_warmup_epochs`` from the stage's start
  (:func:`stage_warmup_factor`, applied by :class:`StagedLRScheduler` on top of nnU-Net's poly decay),
  so pretrained weights that were frozen until now are not hit by the full rate with no momentum built up;
* under DistributedDataParallel the network is **wrapped again** (:func:`rewrap_ddp`). DDP fixes, when it
  wraps, which parameters it all-reduces (those with ``requires_grad``): a parameter unfrozen afterwards
  would get only its local gradient — the ranks would silently drift apart — and one frozen afterwards
  would never be reduced and DDP fails with "Expected to have finished reduction in the prior iteration".
  The old wrapper's autograd hooks are removed first, so no reducer of it fires again.

Resume (``--c``) in the middle of stage ``k``: the optimizer built by ``configure_optimizers`` holds the
first stage's group; :func:`enter_stage` is replayed for stages 1..k before nnU-Net loads the optimizer
state, so the groups (and their order) are those the checkpoint was saved with. The stage boundaries and
therefore each group's warm-up anchor come from the settings, so the learning rates after a resume are
those of an uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn
from torch.optim import Optimizer

from nnunet_transfer.errors import ConfigError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.policies.freezing import FreezeReport, apply_freeze
from nnunet_transfer.training.schedule import WarmupPolyLRScheduler

#: keys this module adds to an optimizer parameter group (torch.optim keeps extra keys)
GROUP_STAGE, GROUP_START, GROUP_WARMUP = "stage", "stage_start", "stage_warmup"


@dataclass(frozen=True)
class Stage:
    """One stage: ``spec`` trains during epochs ``start`` .. ``end`` − 1 (``end`` None: until the run ends)."""

    index: int  # 0-based
    spec: str
    start: int
    end: int | None

    def text(self) -> str:
        until = f"epoch {self.end}" if self.end is not None else "the end"
        return f"stage {self.index + 1} ({self.spec!r}, epochs {self.start} until {until})"


def schedule(stages: Sequence[Sequence]) -> list[Stage]:
    """``[[spec, end], ..., [spec, None]]`` (the validated ``stages`` setting) -> :class:`Stage` objects."""
    if not stages:
        raise ConfigError("a staged schedule needs at least one stage, e.g. [['decoder+seg', 50], ['all', None]]")
    out, start = [], 0
    for i, (spec, end) in enumerate(stages):
        out.append(Stage(i, spec, start, end))
        start = end if end is not None else start
    return out


def stage_at(stages: Sequence[Stage], epoch: int) -> int:
    """Index of the stage that epoch ``epoch`` (0-based) belongs to."""
    for s in stages:
        if s.end is None or epoch < s.end:
            return s.index
    return stages[-1].index


def stage_warmup_factor(step: int, *, start: int, warmup: int) -> float:
    """``(step − start + 1) / warmup`` during the ``warmup`` epochs after ``start``, else 1."""
    if warmup <= 0 or step >= start + warmup:
        return 1.0
    return max(step - start + 1, 0) / warmup


class StagedLRScheduler(WarmupPolyLRScheduler):
    """nnU-Net's poly decay (with the run's warm-up) times each stage group's own linear warm-up.

    lr_g(step) = poly_warmup_lr(step) · lr_factor_g · stage_warmup_factor(step, start_g, warmup_g); groups
    without the stage keys (the first stage's) follow the run's schedule alone.
    """

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr  # what the parent will use before incrementing it
        super().step(current_step)
        for group in self.optimizer.param_groups:
            if GROUP_START in group:
                group["lr"] *= stage_warmup_factor(current_step, start=group[GROUP_START],
                                                   warmup=group.get(GROUP_WARMUP, 0))
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def add_stage_parameters(optimizer: Optimizer, parameters: Iterable[nn.Parameter], *, stage: int, start: int,
                         warmup: int) -> list[nn.Parameter]:
    """Add the parameters the optimizer does not hold yet as one new group; returns them (may be empty).

    Parameters already in a group stay there with their state. The group records its stage and warm-up
    (:class:`StagedLRScheduler` reads them); its other hyper-parameters are the optimizer's defaults.
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in parameters if id(p) not in held]
    if new:
        optimizer.add_param_group({"params": new, GROUP_STAGE: stage, GROUP_START: start, GROUP_WARMUP: warmup})
    return new


def rewrap_ddp(network: nn.Module) -> nn.Module:
    """A new ``DistributedDataParallel`` around the module an old one wraps, with the old one's settings.

    Call after changing ``requires_grad`` (the parameter set DDP reduces is fixed when it wraps). The old
    wrapper's autograd hooks are removed, so only the new reducer acts on the gradients. Ranks must call it
    at the same point (a stage change is at the same epoch on every rank): construction is collective.
    A network that is not DDP-wrapped is returned as it is.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(network, DDP):
        return network
    old = network
    old._remove_autograd_hooks()  # the C++ reducer's hooks on the gradient accumulators
    for handle in getattr(old, "_accum_grad_hooks", []):  # the python reducer's (compiled DDP)
        handle.remove()
    buffers = ({"forward_sync_buffers": old.forward_sync_buffers} if hasattr(old, "forward_sync_buffers")
               else {"broadcast_buffers": old.broadcast_buffers})
    return DDP(old.module, device_ids=old.device_ids, output_device=old.output_device,
               process_group=old.process_group, find_unused_parameters=old.find_unused_parameters,
               gradient_as_bucket_view=old.gradient_as_bucket_view, static_graph=old.static_graph, **buffers)


def enter_stage(network: nn.Module, optimizer: Optimizer, trainable_names: Iterable[str], *, stage: Stage,
                warmup: int) -> tuple[nn.Module, FreezeReport, list[nn.Parameter]]:
    """Switch to ``stage``: freeze all but ``trainable_names``, add the new ones to the optimizer, re-wrap DDP.

    Returns ``(network, report, added)`` — the network to use from now on (a new DDP wrapper if it was
    wrapped), the freeze report and the parameters that got a new optimizer group.
    """
    net = unwrap(network)
    report = apply_freeze(net, trainable_names)  # on the unwrapped module: the wrapper is replaced below
    params = dict(net.named_parameters())
    added = add_stage_parameters(optimizer, [params[n] for n in report.trainable_names], stage=stage.index,
                                 start=stage.start, warmup=warmup)
    return rewrap_ddp(network), report, added


__all__ = ["Stage", "schedule", "stage_at", "stage_warmup_factor", "StagedLRScheduler", "add_stage_parameters",
           "rewrap_ddp", "enter_stage", "GROUP_STAGE", "GROUP_START", "GROUP_WARMUP"]
