"""The base trainer: it overrides nnU-Net's methods and dispatches to small named hooks.

Strategy trainers are declarations on top of this class: they set ``transfer_defaults`` and
``transfer_keys`` and override hooks only, never a method of ``nnUNetTrainer`` that this class
overrides (tests/test_trainer_hooks.py enforces it). Which nnU-Net method calls which hook, and where things
happen in nnU-Net 2.8's order of events: documentation/trainers.md, "Which nnU-Net method calls which hook".

The jobs live in their own modules of :mod:`nnunet_transfer.training`: the ``-pretrained_weights`` check and
load detection in ``pretrained``, head rows in ``heads``, what did not come from the source in
``not_transferred``, the checkpoint entry and ``--c`` checks in ``checkpoint_state``, start weights and
snapshots in ``snapshots``, drift in ``drift``, early stopping in ``stopping``, and ``transfer_config.json``
with the log lines in ``run_record``. ``self.blocks`` is the one :class:`~nnunet_transfer.blocks.BlockModel`
of the trainer's network.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
from typing import Any, ContextManager, Mapping, Union

import numpy as np
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_transfer.blocks import BlockModel, is_primus, layout_from_architecture, parse_spec, primus_class_named
from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.config import PLANS_KEY, TransferConfig
from nnunet_transfer.errors import ConfigError, SpecError, TransferError
from nnunet_transfer.fileio import save_atomic
from nnunet_transfer.netutil import unique_named_parameters, unwrap
from nnunet_transfer.nnunet_io import network_from_plans
from nnunet_transfer.nnunet_compat import checkpoint_dict, train_step as nnunet_train_step
from nnunet_transfer.policies.freezing import apply_freeze, keep_frozen_norms_in_eval
from nnunet_transfer.runtime import (apply_cpu_threads, nnunet_train_args, pretrained_weights_argument,
                                     redirect_nnunet_loader)
from nnunet_transfer.training.checkpoint_state import (CHECKPOINT_KEY, check_resume_settings, checkpoint_state,
                                                       not_ours_message, restore_transfer_state)
from nnunet_transfer.training.drift import drift_from_file
from nnunet_transfer.training.heads import copy_head_rows
from nnunet_transfer.training.partial_labels import MarginalLoss, declared_unannotated, resolve_unannotated
from nnunet_transfer.training.not_transferred import (not_transferred_names, not_transferred_text, source_names,
                                                      spare_not_transferred)
from nnunet_transfer.training.pretrained import (PretrainedFile, check_pretrained, planned_network,
                                                 weights_changed, weights_fingerprint)
from nnunet_transfer.training.run_record import (all_trainable_counts, config_file_content, drift_line,
                                                 parameter_counts, settings_line, start_lines,
                                                 write_config_file)
from nnunet_transfer.training.pausing import (PAUSED_KEY, RNG_KEY, capture_rng, pause_due, paused_text,
                                              restore_rng)
from nnunet_transfer.training.schedule import LR_SCHEDULES, WarmupPolyLRScheduler, make_optimizer
from nnunet_transfer.training.snapshots import START_FILE, save_snapshot, save_weights
from nnunet_transfer.training.stopping import (EarlyStopping, best_follows_monitor, end_of_epoch,
                                               stopped_text)

#: what every trainer reads; strategy trainers add the keys of their group (a new setting is one field)
BASE_KEYS = frozenset(TransferConfig.keys("schedule", "run"))


class nnUNetTrainerTransferBase(nnUNetTrainer):
    """Stock nnU-Net training with this package's settings, seeding, warm-up and snapshots.

    Use it for the *pretraining* run on the source dataset and for from-scratch baselines, so that
    every run of a comparison shares the same settings path.
    """

    transfer_defaults: dict[str, Any] = {}
    transfer_keys: frozenset[str] = BASE_KEYS
    #: on ``--c``: (transfer record, heads) of the run's start, read back before ``initialize`` (no __init__ change)
    _resume_origin: tuple | None = None
    #: ``heads=by-name`` with no label name shared with the checkpoint: start every head row new (said in the
    #: log) instead of refusing. Strategies that copy the heads "when the labels agree" set it.
    heads_fallback_new: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # validate before nnU-Net creates the output folder: bad settings, a refusal that depends only on
        # the command line, or an incompatible -pretrained_weights file leave nothing behind
        self.transfer_config = self.read_transfer_config(plans, configuration)
        self.check_network(self.transfer_config, functools.cache(
            lambda: planned_network(type(self), plans, configuration, dataset_json)))
        self.pretrained_file: PretrainedFile | None = self._check_command_line(plans, configuration,
                                                                               dataset_json)
        #: partial labels: {name: value} of the source classes the target does not annotate (marginal loss)
        self.unannotated = resolve_unannotated(
            *declared_unannotated(self.transfer_config.unannotated, dataset_json), dataset_json,
            self.pretrained_file.source_labels if self.pretrained_file else None)
        apply_cpu_threads(device)  # before nnU-Net's __init__ seeds or builds anything
        super().__init__(plans, configuration, fold, dataset_json, device)
        cfg = self.transfer_config
        self.num_epochs = cfg.num_epochs
        self.num_iterations_per_epoch = cfg.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.num_val_iterations_per_epoch
        self.save_every = cfg.save_every
        self.initial_lr = (cfg.initial_lr if cfg.initial_lr is not None else self.initial_lr) * cfg.lr_scale
        # what nnUNetTrainerNoDeepSupervision sets; nnU-Net reads it when it builds network, loss and loaders.
        # A Primus has one output (nnU-Net's own AbstractPrimus sets it off too)
        self.enable_deep_supervision = cfg.deep_supervision and not self.builds_primus(self.configuration_manager)
        self.transfer_state: dict[str, Any] = {"pretrained_loaded": None, "pretrained_source": None,
                                               "parameters": None, "transfer": None}
        self._fresh_fingerprint: torch.Tensor | None = None
        self._freeze_report = None
        self._resumed = False
        if self.unannotated:
            self.transfer_state["unannotated"] = dict(self.unannotated)
        if cfg.early_stopping != "none":
            # in transfer_state: it travels in every checkpoint and transfer_config.json, and --c restores it
            self.transfer_state["stopping"] = EarlyStopping(cfg.early_stopping, cfg.patience).state()
        self._writing_best = False
        self._paused = False  # this process ended the run at a pause (setting pause_at)
        self._rng_at_pause: dict | None = None  # the random state written into the pause's checkpoint
        self._rng_to_restore: dict | None = None  # read back from it on --c

    # ------------------------------------------------------------------ command line (before any folder)
    @classmethod
    def needs_pretrained(cls, cfg: TransferConfig) -> str | None:
        """Why this strategy cannot run without ``-pretrained_weights`` (None: it can)."""
        if cfg.heads != "new":
            return (f"heads={cfg.heads!r} copies segmentation-head rows from the PRETRAINED checkpoint, but no "
                    f"-pretrained_weights was given; add -pretrained_weights SOURCE_CHECKPOINT or set heads=new")
        return None

    def _check_command_line(self, plans: dict, configuration: str, dataset_json: dict) -> PretrainedFile | None:
        args = nnunet_train_args()
        if args is None or args.cont or args.val:
            return None  # in-process use, or the weights come from this run's own checkpoint
        if args.pretrained is None:
            why = self.needs_pretrained(self.transfer_config)
            if why:
                raise TransferError(why)
            return None
        checked = check_pretrained(args.pretrained, trainer_class=type(self), plans=plans,
                                   configuration=configuration, dataset_json=dataset_json,
                                   heads=self.transfer_config.heads, heads_fallback_new=self.heads_fallback_new)
        self.check_pretrained_file(checked)
        redirect_nnunet_loader(args.pretrained, checked.path, loader=checked.loader)
        return checked

    def check_pretrained_file(self, checked: PretrainedFile) -> None:
        """Strategy-specific refusals once the file is known (e.g. frozen heads that could not be copied)."""

    # ------------------------------------------------------------------ settings
    @classmethod
    def read_transfer_config(cls, plans: dict, configuration: str) -> TransferConfig:
        plans = {k: v for k, v in plans.items() if k != "continue_training"}
        conf = PlansManager(plans).get_configuration(configuration).configuration
        cfg = TransferConfig.from_mapping(conf.get(PLANS_KEY, {}), defaults=cls.transfer_defaults,
                                          allowed=set(cls.transfer_keys), owner=cls.__name__)
        cls.check_config(cfg, conf)
        return cfg

    @classmethod
    def check_config(cls, cfg: TransferConfig, configuration: dict) -> None:
        """Strategy-specific checks at start; block specs are parsed against the planned block layout."""
        layout = layout_from_architecture(configuration.get("architecture", {}))
        for key in TransferConfig.spec_keys():
            spec = getattr(cfg, key)
            if key in cls.settings_used() and spec is not None and layout is not None:
                try:
                    parse_spec(spec, layout)
                except SpecError as e:
                    raise ConfigError(f"setting {key!r}: {e}") from None

    @classmethod
    def check_network(cls, cfg: TransferConfig, network) -> None:
        """Checks that need the planned network's structure (parameter names and kinds, conv shapes), before any
        folder exists: ``network()`` builds it on the meta device (no memory, no initialisation cost). By
        default every block spec in use must select a parameter (``seg:norm`` selects none)."""
        if cfg.heads != "new" and is_primus(network()):
            raise ConfigError(f"setting 'heads'={cfg.heads!r} copies rows of nnU-Net's segmentation heads "
                              f"('.seg_layers.'), which a Primus has not: its heads are the last up-projection stage, "
                              f"which nnU-Net's -pretrained_weights loader loads with the rest when the class count "
                              f"is the same; use heads=new")
        specs = {k: getattr(cfg, k) for k in TransferConfig.spec_keys()
                 if k in cls.settings_used() and getattr(cfg, k) is not None}
        if specs:
            model = BlockModel.from_network(network())
            for key, spec in specs.items():
                try:
                    model.param_names(spec)
                except SpecError as e:
                    raise ConfigError(f"setting {key!r}: {e}") from None

    @classmethod
    def settings_used(cls) -> list[str]:
        """Keys this trainer reads: the ones plans may set plus the ones its class fixes."""
        return sorted(cls.transfer_keys | set(cls.transfer_defaults))

    def _log_settings(self) -> None:
        self.print_to_log_file(settings_line(self.__class__.__name__, self.transfer_config.to_json_dict(),
                                             self.settings_used()))

    # ------------------------------------------------------------------ build and optimizer
    @staticmethod
    def builds_primus(configuration_manager) -> bool:
        """Whether the configuration's ``network_class_name`` is a Primus (one output, no deep supervision)."""
        return primus_class_named(configuration_manager.network_arch_class_name) is not None

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        # nnU-Net 2.8.1's build always passes deep_supervision, which Primus does not take; nnUNetv2_predict builds
        # through this method of the checkpoint's trainer class too, so a Primus configuration predicts as it trains
        return network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  deep_supervision=enable_deep_supervision)

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net's sets decoder.deep_supervision, which a Primus has not (its AbstractPrimus does nothing either)
        if not self.builds_primus(self.configuration_manager):
            super().set_deep_supervision_enabled(enabled)

    def _wrap_loss(self, loss: nn.Module) -> nn.Module:
        """The training loss around nnU-Net's (with the marginal loss of partial labels already applied):
        Continual adds its distillation term here. Runs in ``initialize``, before any weights are loaded."""
        return loss

    def _build_loss(self):
        loss = super()._build_loss()
        if self.unannotated:
            # region-based targets were refused in __init__ (resolve_unannotated)
            loss = MarginalLoss(loss, self.label_manager.num_segmentation_heads, self.unannotated.values())
        return self._wrap_loss(loss)

    def initialize(self):
        seed = self.transfer_config.seed
        if seed is not None:
            # nnU-Net sets no seed; ours makes the random init (and a random frozen encoder) and
            # the single-process data augmentation reproducible
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        super().initialize()
        self._fresh_fingerprint = weights_fingerprint(self.network)

    @functools.cached_property
    def blocks(self) -> BlockModel:
        """The block model of the network (DDP / ``torch.compile`` wrappers removed), built once after
        ``initialize``; built again only after ``_adapt_network`` (which may add parameters)."""
        return BlockModel.from_network(unwrap(self.network))

    def trainable_spec(self) -> str | None:
        """Block spec of the parameters that train (None: all). Frozen-strategy trainers override."""
        return self.transfer_config.trainable

    def _param_groups(self, trainable: dict[str, nn.Parameter]) -> list[dict]:
        """Optimizer parameter groups; L2-SP overrides this to drop weight decay on its scope."""
        return [{"params": list(trainable.values())}]

    def _adapt_network(self, net: nn.Module) -> None:
        """Change the unwrapped network before anything is frozen (LoRA adds its adapters here): runs in
        ``configure_optimizers`` after build and compile, before the DDP wrap. ``self.blocks`` is built again
        afterwards."""

    def _make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The LR scheduler over ``optimizer`` (default: poly decay with the warm-up of ``warmup_epochs``)."""
        return WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, **self._schedule_kwargs())

    def configure_optimizers(self):
        # runs after build and torch.compile and before nnU-Net's DDP wrap: freezing here is what DDP
        # needs (parameters frozen later would be reported as unused by every rank)
        self._adapt_network(unwrap(self.network))
        self.__dict__.pop("blocks", None)  # the hook may have added parameters: describe the network again
        trainable = self._apply_trainable_spec()
        optimizer = make_optimizer(self._param_groups(trainable), self.transfer_config.optimizer, self.initial_lr,
                                   weight_decay=self.weight_decay)
        return optimizer, self._make_scheduler(optimizer)

    def _schedule_kwargs(self) -> dict:
        """Warm-up and exponent of the LR schedule (settings ``warmup_epochs``, ``lr_schedule``)."""
        return {"warmup_steps": self.transfer_config.warmup_epochs,
                "exponent": LR_SCHEDULES[self.transfer_config.lr_schedule]}

    def _trainable_names(self, net: nn.Module) -> set[str] | None:
        """Canonical names of the parameters that train; None = all (no block model needed)."""
        spec = self.trainable_spec()
        return None if spec is None else self.blocks.param_names(spec)

    def _apply_trainable_spec(self) -> dict[str, nn.Parameter]:
        """Freeze everything outside ``_trainable_names`` (+ the segmentation heads, see below)."""
        net = unwrap(self.network)
        params = unique_named_parameters(net)
        names = self._trainable_names(net)
        if names is None:
            self._spare_not_transferred(net, None)
            self.transfer_state["parameters"] = all_trainable_counts(params.values())
            return params
        names = self._spare_not_transferred(net, names)
        model = self.blocks
        if not self.transfer_config.freeze_seg:
            # nnU-Net never loads the segmentation heads from -pretrained_weights: frozen, they would
            # stay random. They train unless the user explicitly forces freeze_seg.
            names = names | set(model.seg_param_names)
        report = apply_freeze(net, names)
        self._freeze_report = report
        self.transfer_state["parameters"] = parameter_counts(report, model, names)
        return {n: params[n] for n in report.trainable_names}

    # ------------------------------------------------------------------ what was not transferred
    def _source_names(self, net: nn.Module) -> frozenset[str] | None:
        """Parameters that came from ``-pretrained_weights`` (:func:`.not_transferred.source_names`); None without
        pretrained weights (or in-process use without the file): the network counts as a whole."""
        if self._resume_origin is not None:
            record, heads = self._resume_origin
        elif getattr(self, "pretrained_file", None) is not None:  # a trainer built without __init__ has none
            record, heads = self.pretrained_file.transfer, self.pretrained_file.heads
            heads = heads.to_dict() if heads is not None else None
        else:
            return None
        return source_names(net, record, heads)

    def not_transferred(self, net: nn.Module) -> set[str]:
        """Parameters outside the heads that did not come from the source (re-initialised or new after `weights
        adapt`): no strategy freezes or anchors them unless ``freeze_reinit``; the heads follow ``freeze_seg``."""
        return not_transferred_names(unique_named_parameters(net), self._source_names(net))

    def _spare_not_transferred(self, net: nn.Module, names: set[str] | None) -> set[str] | None:
        """``names`` (what the strategy trains; None = all) plus the parameters not from the source, which train in
        full unless ``freeze_reinit``; the counts go to ``transfer_state["not_transferred"]``."""
        names, counts = spare_not_transferred(unique_named_parameters(net), self.not_transferred(net), names,
                                              freeze_reinit=self.transfer_config.freeze_reinit)
        self.transfer_state["not_transferred"] = {**counts, **self._not_transferred_extras()}
        return names

    def _not_transferred_extras(self) -> dict[str, Any]:
        """Strategy counts added to ``transfer_state["not_transferred"]`` (LoRA: convolutions without adapter)."""
        return {}

    def _not_transferred_text(self) -> str | None:
        return not_transferred_text(self.transfer_state.get("not_transferred"))

    def _before_train_epoch(self) -> None:
        """Start of every epoch, before nnU-Net's ``on_train_epoch_start`` calls ``network.train()`` and steps the
        LR (Staged enters a new stage here, so the new group's warm-up starts with this epoch)."""

    def _after_train_epoch_start(self) -> None:
        """After nnU-Net's ``on_train_epoch_start`` (the epoch's LR is set): per-epoch logs of a strategy."""

    def on_train_epoch_start(self):
        self._before_train_epoch()
        super().on_train_epoch_start()  # calls network.train()
        if self._freeze_report is not None and self._freeze_report.frozen_module_names:
            # BatchNorm-type layers in frozen blocks must not update running statistics
            keep_frozen_norms_in_eval(self.network, self._freeze_report.frozen_module_names)
        self._after_train_epoch_start()

    # ------------------------------------------------------------------ pretrained weights
    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        """Called once at the start of a new (not resumed) run, after pretrained weights loaded: capture an
        anchor, re-initialise, or refuse (before nnU-Net unpacks data and copies plans)."""

    def _after_train_start(self) -> None:
        """End of ``on_train_start`` (new and resumed runs), after the settings and the start are logged."""

    # ------------------------------------------------------------------ train start
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._resumed:
            loaded = weights_changed(self._fresh_fingerprint, self.network)
            st = self.transfer_state
            st["pretrained_loaded"] = loaded
            source = self.pretrained_file.path if self.pretrained_file else pretrained_weights_argument()
            st["pretrained_source"] = str(source) if loaded and source else None
            # what the file brought: a `weights adapt` report (per block) or a plain same-plans load
            st["transfer"] = self.pretrained_file.transfer if loaded and self.pretrained_file else None
            if loaded:
                self._transfer_heads()
            elif self.transfer_config.heads != "new":
                raise TransferError(self.needs_pretrained(self.transfer_config))
            # strategies may refuse here, before nnU-Net unpacks data and copies plans
            self._on_weights_ready(loaded)
        super().on_train_start()
        self._log_settings()
        for line in start_lines(self.transfer_state):
            self.print_to_log_file("nnunet_transfer: " + line)
        if self.unannotated:
            self.print_to_log_file(f"nnunet_transfer: partial labels: {sorted(self.unannotated)} are not annotated "
                                   f"by the target; the loss merges them with background (marginal loss)")
        if self.local_rank == 0:
            self._write_config_file()
            if not self._resumed:
                start = save_weights(self.network, os.path.join(self.output_folder, START_FILE),
                                     trainer_name=self.__class__.__name__, epoch=0)
                if self.transfer_config.snapshot_every:
                    save_snapshot(self.network, self.output_folder, 0, trainer_name=self.__class__.__name__,
                                  same_as=start)
        self._after_train_start()
        if self._rng_to_restore is not None:
            # after nnU-Net built its loaders (drawing a first batch each): the next epoch draws as it would have
            restore_rng(self._rng_to_restore, (self.dataloader_train, self.dataloader_val))
            self._rng_to_restore = None
            self.print_to_log_file("nnunet_transfer: continuing a paused run from epoch "
                                   f"{self.current_epoch}; the random state of the pause is restored")

    def _transfer_heads(self) -> None:
        """Copy the planned segmentation-head rows (setting ``heads``) after nnU-Net loaded the rest."""
        checked = self.pretrained_file
        if self.transfer_config.heads == "new":
            return
        if checked is None or checked.heads is None:
            raise TransferError(f"heads={self.transfer_config.heads!r} needs the checkpoint file, which is only "
                                f"known when the run is started by nnUNetv2_train -pretrained_weights FILE; "
                                f"set trainer.pretrained_file = check_pretrained(...) for in-process use")
        written = copy_head_rows(self.network, checked.source_heads, checked.heads)
        self.transfer_state["heads"] = {**checked.heads.to_dict(), "tensors": len(written),
                                        "source_labels": checked.source_labels}
        self.print_to_log_file(f"nnunet_transfer: {checked.heads.text()} ({len(written)} head tensors)")
        checked.source_heads = {}  # no longer needed

    def _write_config_file(self) -> None:
        """``transfer_config.json`` (:mod:`nnunet_transfer.training.run_record`) from the settings and
        ``transfer_state``."""
        write_config_file(self.output_folder, config_file_content(
            trainer=self.__class__.__name__, configuration=self.configuration_name,
            settings=self.transfer_config.to_json_dict(), settings_used=self.settings_used(),
            transfer_state=self.transfer_state))

    # ------------------------------------------------------------------ epochs
    def run_training(self):
        try:
            super().run_training()
        except _StopTraining:
            # nnU-Net's loop runs over a fixed range(current_epoch, num_epochs): leaving it is the only way to
            # end early; on_train_end then writes checkpoint_final.pth as after the last epoch
            self.on_train_end()
        except _PauseTraining:
            # not nnU-Net's on_train_end: no checkpoint_final.pth, checkpoint_latest.pth stays for --c
            self._paused = True
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):  # background augmentation workers
                    loader._finish()
            self.print_to_log_file("nnunet_transfer: " + paused_text(self.transfer_state[PAUSED_KEY]))

    def on_epoch_start(self):
        stopped = stopped_text(self.transfer_state.get("stopping"))
        if stopped:
            # --c of a run that stopped early: it is finished, nnU-Net would train on to num_epochs
            self.print_to_log_file("nnunet_transfer: " + stopped)
            raise _StopTraining
        super().on_epoch_start()

    def _after_epoch(self, epoch: int) -> None:
        """End of every epoch, after its checkpoints and snapshot (L2-SP logs its penalty here). ``epoch``: the
        0-based index of the epoch that ended (``current_epoch`` already counts it)."""

    def on_epoch_end(self):
        # the stopping state is updated before nnU-Net writes this epoch's checkpoints, so they carry it
        stop, new_best = self._update_stopping()
        epoch = self.current_epoch
        super().on_epoch_end()  # increments current_epoch: it now counts completed epochs
        every = self.transfer_config.snapshot_every
        done = self.current_epoch
        if self.local_rank == 0 and every and (done % every == 0 or done == self.num_epochs or stop):
            save_snapshot(self.network, self.output_folder, done, trainer_name=self.__class__.__name__,
                          mean_fg_dice=self.logger.get_value("mean_fg_dice", step=-1),
                          ema_fg_dice=self.logger.get_value("ema_fg_dice", step=-1))
        if new_best and self._best_follows_monitor():
            self.current_epoch -= 1  # nnU-Net's own checkpoints of this epoch are written before the increment
            self._writing_best = True
            try:
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
            finally:
                self._writing_best = False
                self.current_epoch += 1
        self._after_epoch(epoch)
        if stop:
            raise _StopTraining
        if pause_due(self.transfer_config.pause_at, done, self.num_epochs):
            self._pause(done)

    def _pause(self, done: int) -> None:
        """End this process's training after ``done`` completed epochs: checkpoint_latest.pth with the random
        state, transfer_config.json marked paused (:mod:`~nnunet_transfer.training.pausing`)."""
        self.transfer_state[PAUSED_KEY] = {"after_epoch": done, "num_epochs": self.num_epochs}
        self._rng_at_pause = capture_rng((self.dataloader_train, self.dataloader_val))
        if self.local_rank == 0:
            self.current_epoch -= 1  # nnU-Net's checkpoint stores current_epoch + 1
            try:
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            finally:
                self.current_epoch += 1
            self._write_config_file()
        raise _PauseTraining

    # ------------------------------------------------------------------ early stopping
    def _best_follows_monitor(self) -> bool:
        """checkpoint_best.pth is the best by the monitored quantity; nnU-Net's is by EMA pseudo-Dice already."""
        return best_follows_monitor(self.transfer_config.early_stopping)

    def _update_stopping(self) -> tuple[bool, bool]:
        """(stop now, new best) after the epoch nnU-Net is ending (setting ``early_stopping``)."""
        state = self.transfer_state.get("stopping")
        if not state:
            return False, False
        end = end_of_epoch(state, lambda key: self.logger.get_value(key, step=-1),
                           self.current_epoch + 1, self.num_epochs)  # completed epochs, this one included
        for line in end.messages:
            self.print_to_log_file("nnunet_transfer: " + line)
        self.transfer_state["stopping"] = end.state
        return end.stop, end.new_best

    def _on_training_end(self) -> None:
        """Rank 0, at the end of ``on_train_end`` (after checkpoint_final and the drift): a strategy's own files."""

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            if self.transfer_state.get("stopping"):
                self._write_config_file()  # converged or not, also when drift is unknown
            drift = self.drift_from_start()
            if drift is not None:
                self.transfer_state["drift"] = drift
                self.print_to_log_file("nnunet_transfer: " + drift_line(drift))
                self._write_config_file()
            self._on_training_end()

    def _weights_for_drift(self) -> Mapping[str, torch.Tensor]:
        """The weights the drift compares with the start, by canonical name (LoRA: the merged kernels)."""
        return dict(unwrap(self.network).named_parameters())

    def drift_from_start(self) -> dict[str, float | None] | None:
        """``‖θ − θ₀‖ / ‖θ₀‖`` of encoder, decoder and heads against ``start_weights.pth`` (None without it)."""
        return drift_from_file(self.blocks, os.path.join(self.output_folder, START_FILE), self._weights_for_drift())

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self._paused:
            self.print_to_log_file("nnunet_transfer: no final validation: the run is paused, not finished")
            return
        if not self.transfer_config.final_validation:
            self.print_to_log_file("nnunet_transfer: final validation skipped (final_validation=false); "
                                   "set it to true and run nnUNetv2_train ... --val to validate later")
            return
        super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ train step
    def _gradient_penalty(self):
        """An object whose ``add_to_grads()`` runs between backward and clipping (L2-SP), or None."""
        return None

    def _before_train_step(self, batch: dict) -> None:
        """Before nnU-Net's step on ``batch`` (its ``data`` still on the CPU): Continual runs its teacher here."""

    def train_step(self, batch: dict) -> dict:
        self._before_train_step(batch)
        penalty = self._gradient_penalty()
        if penalty is None:
            return super().train_step(batch)
        # nnU-Net's train_step (copied in nnunet_compat, guarded there) with the penalty gradient entering
        # after (unscaled) backward and before clipping, so clipping and the optimizer see the gradient of
        # the whole objective (tested against autograd in tests/policies/test_l2sp.py)
        return nnunet_train_step(self, batch, penalty=penalty)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extras(self) -> dict[str, Any]:
        """Strategy state that ``--c`` needs beyond ``transfer_state`` (L2-SP's anchor, LoRA's W0/A/B, the stage),
        added to the checkpoint's ``"nnunet_transfer"`` entry."""
        return {}

    def _restore_checkpoint_extras(self, state: dict) -> None:
        """Take back what ``_checkpoint_extras`` saved, after nnU-Net loaded weights and optimizer (``state``: the
        checkpoint's ``"nnunet_transfer"`` entry)."""

    def _before_checkpoint_load(self, state: dict) -> None:
        """On ``--c``, after the settings check and before nnU-Net loads weights and optimizer state (Staged
        replays its stage changes so that the optimizer has the saved groups)."""

    def _checkpoint_load_context(self) -> ContextManager:
        """Context in which the checkpoint is loaded (LoRA: the training form of its state dict)."""
        return contextlib.nullcontext()

    def _checkpoint_state(self) -> dict:
        """The checkpoint's ``"nnunet_transfer"`` entry (:func:`~nnunet_transfer.training.checkpoint_state.checkpoint_state`)."""
        extras = self._checkpoint_extras()
        if self._rng_at_pause is not None:
            extras = {**extras, RNG_KEY: self._rng_at_pause}
        return checkpoint_state(self.__class__.__name__, self.transfer_config.to_json_dict(), self.transfer_state,
                                extras)

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net 2.8 builds and writes its checkpoint dict inside this one method with no hook for
        # extra entries. We write the same dict (nnunet_compat.checkpoint_dict, guarded against nnU-Net's
        # own method) plus our key, so one file holds everything that resume, prediction and analysis need.
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        if (os.path.basename(filename) == "checkpoint_best.pth" and self._best_follows_monitor()
                and not self._writing_best):
            return  # nnU-Net's EMA-Dice best: checkpoint_best.pth follows the monitored quantity instead
        save_atomic(filename, {**checkpoint_dict(self), CHECKPOINT_KEY: self._checkpoint_state()})

    def _initialize_for_resume(self, filename_or_checkpoint: Union[dict, str]) -> dict:
        """``initialize()`` for ``--c``, with what came from the source read back from the checkpoint first:
        ``configure_optimizers`` decides on it (freezing, adapters, L2-SP groups) and no file is given now."""
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            # nnU-Net 2.8's load_checkpoint fails when handed a dict (it never binds its local
            # variable), so it gets the file name again; mmap keeps this first read cheap. This read runs
            # none of the file's code and refuses a file nnU-Net's own (weights_only=False) read would run
            checkpoint = read_checkpoint(checkpoint, mmap=True)
        if not self.was_initialized:
            state = checkpoint.get(CHECKPOINT_KEY) or {}
            self._resume_origin = (state.get("transfer"), state.get("heads"))
            self.initialize()
        return checkpoint

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        checkpoint = self._initialize_for_resume(filename_or_checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise TransferError(not_ours_message(
                filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "",
                checkpoint.get("trainer_name")))
        with self._checkpoint_load_context():
            longer = check_resume_settings(state.get("settings", {}), self.transfer_config.to_json_dict())
            if longer:
                self.print_to_log_file(f"nnunet_transfer: resuming with changed schedule settings {longer}")
            self._before_checkpoint_load(state)
            super().load_checkpoint(filename_or_checkpoint)
            restore_transfer_state(self.transfer_state, state)
            self._restore_checkpoint_extras(state)
        # a checkpoint written at a pause: its random state goes back once the loaders exist (on_train_start)
        self._rng_to_restore = state.get(RNG_KEY)
        self._resumed = True


class _StopTraining(Exception):
    """Raised at the end of an epoch to leave nnU-Net's training loop (early stopping)."""


class _PauseTraining(Exception):
    """Raised at the end of an epoch to leave nnU-Net's training loop at a pause (setting ``pause_at``)."""
