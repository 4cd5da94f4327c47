r"""Distillation from the source network (Learning without Forgetting, Li & Hoiem 2017, as segmentation applies it).

The teacher is the ``-pretrained_weights`` network with its heads, frozen: built from the checkpoint's own plans,
configuration and ``dataset.json`` (nnU-Net's ``init_args``), its weights loaded exactly (``strict``), deep
supervision off (one full-resolution output). On every training batch it runs once, without gradient, and

    L = L_seg + w · KL(p_T ‖ p_S)   averaged over the voxels whose target label is background or unannotated,

with ``p_T`` the teacher's softmax over its classes, the classes it has and the target has not merged into its
background, and ``p_S`` the student's softmax reduced to the same classes, the target's new classes merged into
background (the "unbiased" distillation of Cermelli et al., CVPR 2020 — a new class is background to the old
model). Classes are matched by label name. The KL term is on the full-resolution output only (under deep
supervision the lower resolutions get the segmentation loss alone). Pure torch + dataset.json dictionaries.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.training.heads import label_values


def class_match(teacher_json: Mapping, student_json: Mapping) -> tuple[list[int], list[int], list[int], list[int]]:
    """(teacher background-merged values, teacher kept values, student background-merged values, student kept
    values): kept pairs are the old classes both know by name, in the teacher's order; the teacher's classes the
    target lacks go to its background, the student's classes the teacher lacks (the new ones) to the student's.
    Raises :class:`ConfigError` when they share no foreground class."""
    why = "distillation matches softmax classes by label name and is defined for label-based training only"
    teacher, student = (label_values(teacher_json, "source", why=why), label_values(student_json, "target", why=why))
    shared = [n for n, v in sorted(teacher.items(), key=lambda kv: kv[1]) if v != 0 and n in student
              and student[n] != 0]
    if not shared:
        raise ConfigError(f"distillation keeps the source's classes, but the source checkpoint's labels "
                          f"{sorted(teacher)} and the target's {sorted(student)} share no foreground class by name; "
                          f"the target's dataset.json must list the source's classes (by their source names) beside "
                          f"its new ones")
    t_kept = [teacher[n] for n in shared]
    s_kept = [student[n] for n in shared]
    t_bg = [v for v in sorted(teacher.values()) if v not in t_kept]
    s_bg = [v for v in sorted(student.values()) if v not in s_kept]
    return t_bg, t_kept, s_bg, s_kept


def reduced_log_softmax(logits: torch.Tensor, merged: Sequence[int], kept: Sequence[int]) -> torch.Tensor:
    """log p over ``[merged..., kept...]`` → ``(b, 1 + len(kept), ...)``: the merged channels' summed probability
    first (log-sum-exp of their log-probabilities), then the kept channels."""
    logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    idx = lambda v: torch.as_tensor(list(v), dtype=torch.long, device=logits.device)  # noqa: E731
    merged_lp = torch.logsumexp(logp.index_select(1, idx(merged)), dim=1, keepdim=True)
    return torch.cat([merged_lp, logp.index_select(1, idx(kept))], dim=1)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    match: tuple[list[int], list[int], list[int], list[int]]) -> torch.Tensor:
    """Mean over the voxels of ``mask`` (``(b, ...)``, bool) of KL(p_T ‖ p_S) on the reduced classes; 0 without
    such voxels."""
    t_bg, t_kept, s_bg, s_kept = match
    log_t = reduced_log_softmax(teacher_logits.detach(), t_bg, t_kept)
    log_s = reduced_log_softmax(student_logits, s_bg, s_kept)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (b, ...)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


class DistillationLoss(nn.Module):
    """``loss(output, target) + weight · KL`` where the teacher's logits for this batch were handed over
    (:attr:`teacher_logits`, taken once: validation steps, which hand none over, get the segmentation loss alone).
    ``background_values``: target values that count as background for the mask (0 and the unannotated classes)."""

    def __init__(self, loss: nn.Module, weight: float, background_values: Sequence[int] = (0,)):
        super().__init__()
        self.loss = loss
        self.weight = float(weight)
        self.background_values = sorted(set(int(v) for v in background_values) | {0})
        self.match: tuple | None = None
        self.teacher_logits: torch.Tensor | None = None
        self.last_kl: float | None = None

    def forward(self, output, target):
        seg = self.loss(output, target)
        teacher, self.teacher_logits = self.teacher_logits, None
        if teacher is None or self.match is None or self.weight == 0:
            return seg
        student = output[0] if isinstance(output, (list, tuple)) else output
        tgt = target[0] if isinstance(target, (list, tuple)) else target
        if teacher.shape[2:] != student.shape[2:]:
            raise DataError(f"the teacher's output has spatial shape {tuple(teacher.shape[2:])}, the network's "
                            f"{tuple(student.shape[2:])}: the source's plans must give the same patch geometry "
                            f"(train the target with the source's plans, `nnunet_transfer plans transfer`)")
        labels = tgt[:, 0]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for v in self.background_values:
            mask |= labels == v
        kl = distillation_kl(student, teacher, mask, self.match)
        self.last_kl = float(kl.detach())
        return seg + self.weight * kl


def teacher_from_weights(weights: Any, *, device: torch.device) -> tuple[nn.Module, dict]:
    """The frozen teacher of a loaded checkpoint (:class:`~nnunet_transfer.checkpoints.LoadedWeights`, or a dict
    ``{"state", "init_args"}`` read back from our own checkpoint) and its ``dataset.json``: built from the
    checkpoint's own plans and configuration, deep supervision off, weights loaded strictly, eval mode, no grad."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_transfer.nnunet_io import network_from_plans  # lazy: nnU-Net's network code

    state = weights["state"] if isinstance(weights, Mapping) else weights.state
    init_args = weights["init_args"] if isinstance(weights, Mapping) else weights.init_args
    where = weights.get("source", "the checkpoint") if isinstance(weights, Mapping) else str(weights.path)
    plans, configuration, dataset_json = (init_args.get(k) for k in ("plans", "configuration", "dataset_json"))
    if not isinstance(plans, Mapping) or not isinstance(configuration, str) or not isinstance(dataset_json, Mapping):
        raise DataError(f"{where} holds no plans, configuration and dataset.json (nnU-Net's init_args), so the "
                        f"source network cannot be rebuilt as a teacher; give a checkpoint written by "
                        f"nnUNetv2_train")
    pm = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
    cm = pm.get_configuration(configuration)
    net = network_from_plans(cm, determine_num_input_channels(pm, cm, dataset_json),
                             pm.get_label_manager(dataset_json).num_segmentation_heads, deep_supervision=False)
    missing, unexpected = net.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise DataError(f"{where}: the weights do not fit the network of its own plans (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the teacher must be the checkpoint's network as trained")
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, dict(dataset_json)


def teacher_state(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's tensors as stored in a checkpoint (CPU copies, exact)."""
    return {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}


__all__ = ["class_match", "reduced_log_softmax", "distillation_kl", "DistillationLoss", "teacher_from_weights",
           "teacher_state"]
