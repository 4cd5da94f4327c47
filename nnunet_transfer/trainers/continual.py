"""Adding classes without forgetting: fine-tuning with distillation from the source (``nnUNetTrainerContinual``).

The teacher is the ``-pretrained_weights`` network with its heads, frozen (:mod:`nnunet_transfer.training.distill`);
on every training batch it runs once and a KL term (weight ``distill_weight``) keeps the source's probabilities of
the old classes where the target label says background or unannotated. The heads start from the source's rows by
label name (``heads=by-name``), so the target's ``dataset.json`` lists the source's classes beside its new ones;
with partial labels declared (setting ``unannotated`` or the target ``dataset.json``) the segmentation loss is the
marginal one as well. The teacher's tensors are stored once, in the checkpoint's ``"nnunet_transfer"`` entry (not in
the network's weights, which stay the plain network ``nnUNetv2_predict`` loads), and ``--c`` rebuilds the teacher
from there: it never comes from fine-tuned weights.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from nnunet_transfer.checkpoints import load_weights
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import TransferError
from nnunet_transfer.trainers.base import BASE_KEYS, nnUNetTrainerTransferBase
from nnunet_transfer.training.distill import DistillationLoss, class_match, teacher_from_weights, teacher_state

CONTINUAL_KEYS = BASE_KEYS | frozenset(TransferConfig.keys("distill"))
TEACHER_KEY = "distill_teacher"


class nnUNetTrainerContinual(nnUNetTrainerTransferBase):
    """Fine-tuning (LR × 0.5, heads by name) + distillation from the frozen source network (LwF)."""

    transfer_defaults = {"lr_scale": 0.5, "heads": "by-name"}
    transfer_keys = CONTINUAL_KEYS

    # set in initialize / on_train_start / load_checkpoint; no __init__ override (nnU-Net rebuilds trainers from
    # the fixed __init__ signature)
    teacher: nn.Module | None = None
    _distill: DistillationLoss | None = None
    _teacher_record: dict | None = None  # {"state", "init_args", "source"}: what the checkpoint stores once

    @classmethod
    def needs_pretrained(cls, cfg):
        return ("nnUNetTrainerContinual distils from the source network, which is the -pretrained_weights "
                "checkpoint; add -pretrained_weights SOURCE_CHECKPOINT (nnUNetTrainerFinetune trains without a "
                "teacher)")

    def check_pretrained_file(self, checked) -> None:
        if checked.loader is not None or checked.source_labels is None:
            raise TransferError(f"-pretrained_weights {checked.path}: distillation needs the source's segmentation "
                                f"network with its labels, and this checkpoint has none (an nnssl or label-less "
                                f"file); give a checkpoint written by nnUNetv2_train")

    def _wrap_loss(self, loss: nn.Module) -> nn.Module:
        self._distill = DistillationLoss(loss, self.transfer_config.distill_weight,
                                         [0, *self.unannotated.values()])
        return self._distill

    # ------------------------------------------------------------------ the teacher
    def _set_teacher(self, record: dict) -> None:
        self.teacher, teacher_json = teacher_from_weights(record, device=self.device)
        self._teacher_record = record
        self._distill.match = class_match(teacher_json, self.dataset_json)

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded or self.pretrained_file is None:
            raise TransferError(self.needs_pretrained(self.transfer_config))
        weights = load_weights(self.pretrained_file.path)
        self._set_teacher({"state": weights.state, "init_args": {k: weights.init_args.get(k) for k in
                                                                 ("plans", "configuration", "dataset_json")},
                           "source": str(self.pretrained_file.path)})
        t, _, _, kept = self._distill.match
        names = {v: n for n, v in self.dataset_json["labels"].items() if not isinstance(v, list)}
        self.print_to_log_file(f"nnunet_transfer: distillation from {self.pretrained_file.path} (frozen teacher, "
                               f"{sum(p.numel() for p in self.teacher.parameters())} parameters): KL weight "
                               f"{self.transfer_config.distill_weight} on {[names[v] for v in kept]} where the target "
                               f"label is background" + (" or unannotated" if self.unannotated else ""))

    def _before_train_step(self, batch: dict) -> None:
        if self.teacher is None or self.transfer_config.distill_weight == 0:
            return
        data = batch["data"].to(self.device, non_blocking=True)
        amp = (torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda"
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            self._distill.teacher_logits = self.teacher(data)

    def _after_epoch(self, epoch: int) -> None:
        if self._distill is not None and self._distill.last_kl is not None:
            self.print_to_log_file(f"nnunet_transfer: distillation KL (last step) {self._distill.last_kl:.6g}")

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_extras(self) -> dict:
        if self._teacher_record is None:
            return {}
        # the teacher's tensors once, as loaded (exact copies); never part of the network's own weights
        return {TEACHER_KEY: {"state": teacher_state(self.teacher), "init_args": self._teacher_record["init_args"],
                              "source": self._teacher_record["source"]}}

    def _restore_checkpoint_extras(self, state: dict) -> None:
        record = state.get(TEACHER_KEY)
        if not isinstance(record, dict) or "state" not in record:
            raise TransferError("this nnUNetTrainerContinual checkpoint holds no teacher; it cannot be resumed (the "
                                "teacher must never be rebuilt from fine-tuned weights): start a new run with "
                                "-pretrained_weights SOURCE_CHECKPOINT")
        self._set_teacher(record)


__all__ = ["nnUNetTrainerContinual"]
