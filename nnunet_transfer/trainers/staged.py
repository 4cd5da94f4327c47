"""Staged schedules: the trainable set changes at epoch boundaries ("heads / decoder first, then all").

Setting ``stages`` (``[[spec, end epoch], ..., [spec, null]]``, text ``decoder+seg:50,all``): stage ``i``
trains its block spec until the epoch at which stage ``i+1`` starts; everything else is frozen as in the
freezing trainers (the segmentation heads train in every stage unless ``freeze_seg``; parameters that did not
come from the source, re-initialised or new after ``weights adapt``, train in every stage unless ``freeze_reinit``). At each change the
parameters that start training get their own optimizer group with a linear LR warm-up over
``stage_warmup_epochs``; those already training keep their optimizer state. Under DDP the network is
wrapped again at the change (see :mod:`nnunet_transfer.policies.stages` for why and how). ``--c`` in the
middle of a stage restores the same trainable set, optimizer groups and learning rates.

Per epoch the stage, its trainable count and the learning rate of every group go to ``stages_log.json``
in the fold folder.
"""
from __future__ import annotations

import json
import os

from nnunet_transfer.blocks import BlockModel, layout_from_architecture, parse_spec
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, SpecError
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.policies.stages import (GROUP_STAGE, Stage, StagedLRScheduler, add_stage_parameters,
                                             rewrap_ddp, schedule, stage_at)
from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase
from nnunet_transfer.trainers.freezing import FREEZE_KEYS

STAGED_KEYS = FREEZE_KEYS | frozenset(TransferConfig.keys("stages"))
LOG_FILE = "stages_log.json"


class nnUNetTrainerStaged(nnUNetTrainerTransferBase):
    """A staged schedule of trainable sets from the setting ``stages``, e.g.
    ``nnunet_transfer configure ... --set stages=decoder+seg:50,all --set stage_warmup_epochs=10``."""

    transfer_keys = STAGED_KEYS
    # no __init__ override (nnU-Net rebuilds trainers from the fixed signature): the active stage lives here
    _stage: int = 0

    # ------------------------------------------------------------------ settings (before any folder)
    @classmethod
    def check_config(cls, cfg, configuration):
        super().check_config(cfg, configuration)
        if cfg.stages is None:
            raise ConfigError(f"{cls.__name__} needs the setting 'stages', e.g. --set stages=decoder+seg:50,all "
                              f"(the decoder and heads for 50 epochs, then everything); or use "
                              f"nnUNetTrainerStaged_decoderFirst / nnUNetTrainerStaged_headsFirst")
        layout = layout_from_architecture(configuration.get("architecture", {}))
        for s in schedule(cfg.stages):
            if layout is not None:
                try:
                    parse_spec(s.spec, layout)
                except SpecError as e:
                    raise ConfigError(f"setting 'stages': {s.text()}: {e}") from None

    @classmethod
    def check_network(cls, cfg, network):
        super().check_network(cfg, network)
        model = BlockModel.from_network(network())  # the planned (meta) network: no trainer exists yet
        for s in schedule(cfg.stages):
            try:
                model.param_names(s.spec)
            except SpecError as e:  # e.g. 'seg:norm': the heads have no norm parameters
                raise ConfigError(f"setting 'stages': {s.text()}: {e}") from None

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> list[Stage]:
        return schedule(self.transfer_config.stages)

    def trainable_spec(self) -> str | None:
        return self.stages[self._stage].spec

    def _param_groups(self, trainable):
        return [{**g, GROUP_STAGE: 0} for g in super()._param_groups(trainable)]

    def _make_scheduler(self, optimizer):
        # the optimizer is frozen to the first stage; later stages' groups get their own warm-up
        return StagedLRScheduler(optimizer, self.initial_lr, self.num_epochs, **self._schedule_kwargs())

    def _enter_stage(self, k: int) -> None:
        """Replay the stage changes up to stage ``k`` (one at a stage boundary, several on ``--c``)."""
        added = []
        for j in range(self._stage + 1, k + 1):
            self._stage = j
            trainable = self._apply_trainable_spec()  # requires_grad per stage j, on the unwrapped network
            added += add_stage_parameters(self.optimizer, trainable.values(), stage=j, start=self.stages[j].start,
                                          warmup=self.transfer_config.stage_warmup_epochs)
        # DDP fixed its reduced parameters when it wrapped: wrap again (no-op without DDP)
        self.network = rewrap_ddp(self.network)
        self.transfer_state["stage"] = k
        p = self.transfer_state["parameters"]
        self.print_to_log_file(
            f"nnunet_transfer: {self.stages[k].text()}: trainable parameters {p['trainable']:,} of {p['total']:,}; "
            f"{sum(t.numel() for t in added):,} join the optimizer with a "
            f"{self.transfer_config.stage_warmup_epochs}-epoch LR warm-up")

    def _after_train_start(self) -> None:
        for s in self.stages[1:]:
            if s.start >= self.num_epochs:
                self.print_to_log_file(f"WARNING nnunet_transfer: {s.text()} starts at or after num_epochs="
                                       f"{self.num_epochs} and will not run (unless the run is resumed with more "
                                       f"epochs)")

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:
            self.print_to_log_file(f"WARNING nnunet_transfer: {self.__class__.__name__} started WITHOUT pretrained "
                                   f"weights: the first stage trains part of a randomly initialised network")

    def _before_train_epoch(self) -> None:
        k = stage_at(self.stages, self.current_epoch)
        if k != self._stage:
            self._enter_stage(k)  # before nnU-Net steps the LR, so the new group's warm-up starts now

    def _after_train_epoch_start(self) -> None:
        if self.local_rank == 0:
            self._log_epoch()

    def _log_epoch(self) -> None:
        path = os.path.join(self.output_folder, LOG_FILE)
        entries = json.load(open(path)) if os.path.isfile(path) else []
        entries = [e for e in entries if e["epoch"] < self.current_epoch]  # a resume rewrites what follows
        entries.append({"epoch": self.current_epoch, "stage": self._stage + 1, "spec": self.stages[self._stage].spec,
                        "trainable": self.transfer_state["parameters"]["trainable"],
                        "lr": [g["lr"] for g in self.optimizer.param_groups],
                        "group_stage": [g.get(GROUP_STAGE, 0) + 1 for g in self.optimizer.param_groups]})
        write_atomic(path, json.dumps(entries, indent=1))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extras(self) -> dict:
        return {"stage": self._stage}

    def _before_checkpoint_load(self, state: dict) -> None:
        # the settings (so the stage list) were checked unchanged; the optimizer must have the saved groups,
        # in the saved order, before nnU-Net loads its state
        if state.get("stage"):
            self._enter_stage(int(state["stage"]))


class nnUNetTrainerStaged_headsFirst(nnUNetTrainerStaged):
    """The segmentation heads alone for the first 50 epochs, then everything with a 10-epoch warm-up of the
    rest (MultiTalent's fine-tuning order: new heads on a frozen pretrained network first). LR halved as in
    ``nnUNetTrainerFinetune``."""

    transfer_defaults = {"lr_scale": 0.5, "stages": [["seg", 50], ["all", None]], "stage_warmup_epochs": 10}


class nnUNetTrainerStaged_decoderFirst(nnUNetTrainerStaged):
    """Decoder and heads for the first 50 epochs, then everything (the encoder joins with a 10-epoch warm-up)
    — the "warm-up decoder" stage nnU-Net's pretrained fine-tuning trainer declares but refuses. LR halved as
    in ``nnUNetTrainerFinetune``."""

    transfer_defaults = {"lr_scale": 0.5, "stages": [["decoder+seg", 50], ["all", None]], "stage_warmup_epochs": 10}


__all__ = ["nnUNetTrainerStaged", "nnUNetTrainerStaged_headsFirst", "nnUNetTrainerStaged_decoderFirst"]
