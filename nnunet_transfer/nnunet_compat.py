"""Every piece of this package that copies or restates nnU-Net's behaviour — the one file to read when
nnU-Net releases a new version.

Each piece names the nnU-Net 2.8.1 function it mirrors; each has a guard, :func:`check_<name>`, that runs
the *installed* nnU-Net and this copy on the same input and raises :class:`CompatError` naming what to
re-check when they differ (``tests/test_nnunet_compat.py`` runs every guard; ``python -m
nnunet_transfer.nnunet_compat`` runs them by hand). Where nothing can be run, a guard compares the source
text it depends on.

Copy → the nnU-Net 2.8.1 code it mirrors (paths under ``nnunetv2/``) → guard (how it compares):

* :func:`checkpoint_dict` → ``training/nnUNetTrainer/nnUNetTrainer.py`` ``nnUNetTrainer.save_checkpoint``
  (~l.1195) → :func:`check_save_checkpoint` (the same trainer state: the same keys and values).
* :func:`train_step`, :func:`penalised_step` → ``nnUNetTrainer.train_step`` (~l.1019) → :func:`check_train_step`
  (the same batch, two steps, with and without a grad scaler: loss, gradients and weights bit for bit).
* :func:`nnunet_sgd` → ``nnUNetTrainer.configure_optimizers`` (~l.552) → :func:`check_sgd` (optimizer class and
  settings).
* :func:`poly_lr` → ``training/lr_scheduler/polylr.py`` ``PolyLRScheduler.step`` → :func:`check_poly_lr` (the rate
  at every epoch).
* :func:`move_plans` → ``experiment_planning/plans_for_pretraining/move_plans_between_datasets.py``
  ``move_plans_between_datasets`` → :func:`check_move_plans` (the same generated plans file and raw target; a
  kept and a new plans identifier).
* :func:`mask_for_norm`, :data:`MASK_RELATIVE_SIZE` → ``experiment_planning/experiment_planners/
  default_experiment_planner.py`` ``ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm``
  (the 3/4 rule) → :func:`check_mask_for_norm` (every scheme, below, at and above 3/4).
* :data:`USES_PROPERTIES` → ``preprocessing/normalization/default_normalization_schemes.py`` (which schemes
  read the plans' intensity statistics) → :func:`check_uses_properties` (every scheme, one image, two statistics).
* :func:`list_training_cases` → ``utilities/utils.py`` ``get_filenames_of_train_images_and_targets`` (without
  a ``dataset`` entry) → :func:`check_training_cases` (the same generated raw folder).
* :func:`pretrained_refusals`, :data:`SEG_KEY` (also :func:`nnunet_transfer.checkpoints.compare`) →
  ``run/load_pretrained_weights.py`` ``load_pretrained_weights`` → :func:`check_load_pretrained_weights` (the same
  files: refused exactly when we list a refusal; loaded values).
* :func:`reinitialise` → dynamic-network-architectures ``PlainConvUNet.initialize`` as
  ``utilities/get_network_from_plans.py`` applies it → :func:`check_reinitialise` (every layer kind, same seed).
* :func:`nnunet_trainer_names`, :data:`TRAINER_NOT_FOUND` → ``utilities/find_objects.py``
  ``recursive_find_trainer_class_by_name`` → :func:`check_trainer_names` (its error for an unknown name; every
  trainer class it imports is among the names read from the source).
* :func:`network_without_deep_supervision` → ``utilities/get_network_from_plans.py`` ``get_network_from_plans``
  (it passes ``deep_supervision`` to every class, which Primus does not take; ``None`` leaves it out) and
  ``training/nnUNetTrainer/primus/primus_trainers.py`` (``input_shape`` = the patch size) →
  :func:`check_network_without_deep_supervision` (a tiny Primus: nnU-Net's call with a bool still fails, ours
  builds the class with the plans' kwargs).
* :data:`TRAIN_FLAGS` → ``run/run_training.py`` ``run_training_entry`` (option names) and
  ``maybe_load_checkpoint`` (looks ``load_pretrained_weights`` up in its module globals, which
  :func:`nnunet_transfer.runtime.redirect_nnunet_loader` relies on) → :func:`check_train_command_line` (source
  text: nothing of it runs without a dataset).

nnU-Net itself is imported inside the functions that need it, not here: the commands that only read
checkpoints or plans import this module and should start without loading nnU-Net's trainer.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from nnunet_transfer.netutil import ALL_CONV_TYPES

#: the nnU-Net release every copy below was read from
NNUNET_VERSION = "2.8.1"


class CompatError(AssertionError):
    """The installed nnU-Net behaves differently from this package's copy of it."""


def _differs(nnunet_function: str, ours: str, detail: str, recheck: str) -> CompatError:
    return CompatError(f"nnU-Net's {nnunet_function} differs from nnunet_compat.{ours} (copied from nnU-Net "
                       f"{NNUNET_VERSION}): {detail}. Re-check {recheck}")


# =========================================================================== save_checkpoint
def checkpoint_dict(trainer) -> dict[str, Any]:
    """The dictionary nnU-Net's ``nnUNetTrainer.save_checkpoint`` writes (nnunetv2 2.8.1,
    ``nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py`` ~l.1195).

    nnU-Net builds and writes it inside that one method, with no hook for extra entries; our trainers
    write this dict plus their own key. ``trainer`` needs the attributes nnU-Net's method reads.
    """
    from torch._dynamo import OptimizedModule

    mod = trainer.network.module if trainer.is_ddp else trainer.network
    if isinstance(mod, OptimizedModule):
        mod = mod._orig_mod
    return {
        "network_weights": mod.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


class CheckpointState:
    """The attributes nnU-Net's save_checkpoint reads, with what its training puts there (numpy scalars)."""

    local_rank = 0
    disable_checkpointing = False
    is_ddp = False
    current_epoch = 3
    inference_allowed_mirroring_axes = (0, 1, 2)

    def __init__(self, folder: str):
        import numpy as np
        from nnunetv2.training.logging.nnunet_logger import MetaLogger

        self._best_ema = np.float64(0.25)
        torch.manual_seed(0)
        self.network = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True))
        self.optimizer = torch.optim.SGD(self.network.parameters(), 0.01, momentum=0.99, nesterov=True)
        self.network(torch.randn(1, 1, 4, 4, 4)).sum().backward()
        self.optimizer.step()
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.logger = MetaLogger(folder, False)
        self.logger.log("train_losses", np.float32(0.5), 0)
        self.logger.log("val_losses", np.float32(0.6), 0)
        self.logger.log("mean_fg_dice", np.float64(0.25), 0)
        self.logger.log("dice_per_class_or_region", [np.float64(0.2), np.float64(0.3)], 0)
        self.my_init_kwargs = {"plans": {"p": 1}, "configuration": "c", "fold": 0, "dataset_json": {"labels": {}}}

    def print_to_log_file(self, *args):
        raise AssertionError(f"nnU-Net's save_checkpoint logged {args} instead of writing")


def same_values(a, b) -> bool:
    """Equal as checkpoint entries: tensors of one dtype and value, containers of one type and length, NaN = NaN
    (nnU-Net logs NaN Dice for an absent label)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or a != a and b != b)


def check_save_checkpoint() -> None:
    """nnU-Net's ``save_checkpoint`` and :func:`checkpoint_dict` on the same state write the same entries."""
    import tempfile

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    with tempfile.TemporaryDirectory() as folder:
        state = CheckpointState(folder)
        path = Path(folder) / "nnunet.pth"
        nnUNetTrainer.save_checkpoint(state, str(path))
        if not path.is_file():
            raise _differs("nnUNetTrainer.save_checkpoint", "checkpoint_dict", f"it wrote no file at {path}",
                           "how nnU-Net writes checkpoints (nnunet_transfer.trainers.base.save_checkpoint)")
        theirs = torch.load(path, weights_only=False)
    ours = checkpoint_dict(state)
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        raise _differs("nnUNetTrainer.save_checkpoint", "checkpoint_dict",
                       f"nnU-Net writes keys {missing} that ours lacks, ours writes {extra} that nnU-Net does not",
                       "nnUNetTrainer.save_checkpoint and copy its checkpoint dict into checkpoint_dict "
                       "(our trainers' checkpoints would otherwise lose those entries)")
    # ours returns the live state dicts, nnU-Net's went through torch.save: compare after the same trip
    import io

    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    ours = torch.load(buffer, weights_only=False)
    different = [k for k in theirs if not same_values(theirs[k], ours[k])]
    if different:
        raise _differs("nnUNetTrainer.save_checkpoint", "checkpoint_dict",
                       f"the values of {different} differ on the same trainer state",
                       "how nnUNetTrainer.save_checkpoint fills those entries")


# =========================================================================== train_step
#: nnU-Net's gradient clipping threshold in ``train_step``
MAX_GRAD_NORM = 12.0


def penalised_step(loss: torch.Tensor, *, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter],
                   penalty, grad_scaler: torch.amp.GradScaler | None = None,
                   max_norm: float = MAX_GRAD_NORM) -> torch.Tensor:
    """nnU-Net's backward/clip/step (nnunetv2 2.8.1, ``nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py``
    ``nnUNetTrainer.train_step`` ~l.1037) with a penalty gradient added
    after unscaling, before clipping.

    Replaces the block after the loss in ``nnUNetTrainer.train_step`` (``optimizer.zero_grad`` and the
    forward stay the caller's). ``parameters`` are the ones nnU-Net clips (``network.parameters()``),
    ``max_norm`` its clipping threshold (12). ``penalty`` is an object with ``add_to_grads()`` (L2-SP's
    :class:`~nnunet_transfer.policies.l2sp.L2SPPenalty`) or None, which is nnU-Net's step unchanged.
    Returns the total gradient norm before clipping, as ``clip_grad_norm_`` does (of loss + penalty).
    """
    parameters = list(parameters)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
    else:
        loss.backward()
    if penalty is not None:
        penalty.add_to_grads()
    total_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    return total_norm


def train_step(trainer, batch: dict, *, penalty=None) -> dict:
    """nnU-Net's ``nnUNetTrainer.train_step`` (nnunetv2 2.8.1, ``nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py``
    ~l.1019) with :func:`penalised_step` as its backward/clip/step.

    nnU-Net's method is one block with no hook between backward and clipping, where L2-SP's gradient must
    enter; ``trainer`` needs the attributes it reads (device, network, loss, optimizer, grad_scaler).
    """
    from torch import autocast

    from nnunetv2.utilities.helpers import dummy_context

    data = batch["data"].to(trainer.device, non_blocking=True)
    target = batch["target"]
    target = [i.to(trainer.device, non_blocking=True) for i in target] if isinstance(target, list) \
        else target.to(trainer.device, non_blocking=True)
    trainer.optimizer.zero_grad(set_to_none=True)
    # nnU-Net autocasts only on CUDA (on CPU it is slow, on MPS it complains even when disabled)
    with autocast(trainer.device.type, enabled=True) if trainer.device.type == "cuda" else dummy_context():
        output = trainer.network(data)
        loss = trainer.loss(output, target)
    penalised_step(loss, optimizer=trainer.optimizer, parameters=trainer.network.parameters(), penalty=penalty,
                   grad_scaler=trainer.grad_scaler)
    return {"loss": loss.detach().cpu().numpy()}


class _StepState:
    """What nnU-Net's train_step reads: a small conv net with a deep-supervision-like list target."""

    device = torch.device("cpu")

    def __init__(self, grad_scaler):
        torch.manual_seed(0)
        self.network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True),
                                     nn.LeakyReLU(), nn.Conv3d(4, 2, 1))
        self.optimizer = nnunet_sgd(self.network.parameters(), 0.01, weight_decay=3e-5)
        self.grad_scaler = grad_scaler

    @staticmethod
    def loss(output, target):
        # large enough that clipping at 12 acts
        return 1e3 * ((output - target[0]) ** 2).mean() + ((output[:, :1] - target[1]) ** 2).sum()


def check_train_step() -> None:
    """nnU-Net's ``train_step`` and :func:`train_step` (no penalty) on the same batch: the same loss,
    gradients and updated weights, bit for bit — with and without a grad scaler."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    g = torch.Generator().manual_seed(1)
    batch = {"data": torch.randn(2, 1, 6, 6, 6, generator=g),
             "target": [torch.randn(2, 2, 6, 6, 6, generator=g), torch.randn(2, 1, 6, 6, 6, generator=g)]}
    scalers = [None]
    try:
        scalers.append(lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
        scalers[-1]()
    except Exception:  # noqa: BLE001 - a torch without a CPU grad scaler: the plain path is still checked
        scalers.pop()
    for make_scaler in scalers:
        runs = []
        for step in (nnUNetTrainer.train_step, lambda s, b: train_step(s, b, penalty=None)):
            state = _StepState(make_scaler() if make_scaler else None)
            outs = [step(state, batch) for _ in range(2)]  # the second step sees momentum
            runs.append(([o["loss"] for o in outs], {n: (p.detach().clone(), p.grad.clone())
                                                      for n, p in state.network.named_parameters()}))
        (loss_a, params_a), (loss_b, params_b) = runs
        how = "with a grad scaler" if make_scaler else "without a grad scaler"
        # the first loss tells the forward part apart; weights and gradients after two steps the update
        if loss_a[0].tobytes() != loss_b[0].tobytes() or loss_a[0].dtype != loss_b[0].dtype:
            raise _differs("nnUNetTrainer.train_step", "train_step",
                           f"the loss of the first step differs {how}: {loss_a[0]} vs {loss_b[0]}",
                           "nnUNetTrainer.train_step (forward, autocast, loss) and copy it into train_step")
        bad = [n for n in params_a if not (torch.equal(params_a[n][0], params_b[n][0])
                                           and torch.equal(params_a[n][1], params_b[n][1]))]
        if bad or loss_a[1].tobytes() != loss_b[1].tobytes():
            raise _differs("nnUNetTrainer.train_step", "train_step",
                           f"weights or gradients of {bad} differ after two steps {how}",
                           "the backward / gradient clipping / optimizer step of nnUNetTrainer.train_step and "
                           "copy it into penalised_step (L2-SP's gradient must enter before clipping)")


# =========================================================================== optimizer and LR
def nnunet_sgd(params, lr: float, *, weight_decay: float) -> torch.optim.SGD:
    """nnU-Net's optimizer (nnunetv2 2.8.1, ``nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py``
    ``nnUNetTrainer.configure_optimizers`` ~l.552): SGD, momentum 0.99, Nesterov,
    L2 weight decay. ``params`` may be parameter groups (a group's own ``weight_decay`` wins)."""
    return torch.optim.SGD(params, lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)


def poly_lr(step: int, *, initial_lr: float, max_steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly decay (nnunetv2 2.8.1, ``nnunetv2/training/lr_scheduler/polylr.py``
    ``PolyLRScheduler.step``): ``initial_lr · (1 − step / max_steps) ^ exponent``."""
    return initial_lr * (1 - step / max_steps) ** exponent


class _OptimizerState:
    initial_lr = 1e-2
    weight_decay = 3e-5
    num_epochs = 7

    def __init__(self):
        self.network = nn.Conv3d(1, 2, 3)


def check_sgd() -> None:
    """nnU-Net's ``configure_optimizers`` and :func:`nnunet_sgd` build the same optimizer (class, settings)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    state = _OptimizerState()
    theirs, _ = nnUNetTrainer.configure_optimizers(state)
    ours = nnunet_sgd(state.network.parameters(), state.initial_lr, weight_decay=state.weight_decay)
    # defaults, not param_groups: nnU-Net's scheduler adds "initial_lr" to its groups
    a, b = theirs.defaults, ours.defaults
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    if type(theirs) is not type(ours) or diff:
        raise _differs("nnUNetTrainer.configure_optimizers", "nnunet_sgd",
                       f"{type(theirs).__name__} vs {type(ours).__name__}, settings (nnU-Net, ours) {diff}",
                       "the optimizer in nnUNetTrainer.configure_optimizers and copy it into nnunet_sgd "
                       "(setting optimizer='sgd' promises nnU-Net's)")


def check_poly_lr() -> None:
    """nnU-Net's ``PolyLRScheduler`` and :func:`poly_lr` give the same rate at every epoch."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    state = _OptimizerState()
    opt = nnunet_sgd(state.network.parameters(), state.initial_lr, weight_decay=0.0)
    sched = PolyLRScheduler(opt, state.initial_lr, state.num_epochs)
    theirs, ours = [], []
    for epoch in range(state.num_epochs):
        sched.step(epoch)  # nnU-Net's on_train_epoch_start passes the epoch
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(poly_lr(epoch, initial_lr=state.initial_lr, max_steps=state.num_epochs))
    if theirs != ours:
        raise _differs("PolyLRScheduler.step", "poly_lr", f"rates per epoch {theirs} vs {ours}",
                       "nnunetv2/training/lr_scheduler/polylr.py and copy its formula into poly_lr "
                       "(lr_schedule='poly' promises nnU-Net's)")


# =========================================================================== plans
def move_plans(plans: Mapping[str, Any], *, target_dataset: str, source_plans: str, target_plans: str | None,
               reader_writer: str) -> dict[str, Any]:
    """What nnU-Net's ``move_plans_between_datasets`` writes for the target, as a new dict.

    Mirrors nnunetv2 2.8.1 ``nnunetv2/experiment_planning/plans_for_pretraining/move_plans_between_datasets.py``
    ``move_plans_between_datasets``: the source plans
    with ``dataset_name`` set to the target, every ``data_identifier`` renamed for a new plans identifier,
    the target's image reader (``reader_writer``, a class name) and ``plans_name``.
    """
    target_plans = target_plans or source_plans
    new = copy.deepcopy(dict(plans))
    new["dataset_name"] = target_dataset
    if target_plans != source_plans:
        for c in new["configurations"].values():
            if "data_identifier" in c:
                old = c["data_identifier"]
                c["data_identifier"] = (target_plans + old[len(source_plans):] if old.startswith(source_plans)
                                        else f"{target_plans}_{old}")
    new["image_reader_writer"] = reader_writer
    new["plans_name"] = target_plans
    return new


def check_move_plans() -> None:
    """nnU-Net's ``move_plans_between_datasets`` and :func:`move_plans` on the same generated plans file:
    the same target plans, for a kept and for a new plans identifier."""
    import json
    import tempfile

    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.experiment_planning.plans_for_pretraining import move_plans_between_datasets as mod

    plans = {"dataset_name": "Dataset991_CompatSource", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "image_reader_writer": "NibabelIO",
             "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0, "std": 2.0}},
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [8, 8, 8]},
                                "3d_lowres": {"data_identifier": "other_3d_lowres"},
                                "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    source, target = "Dataset991_CompatSource", "Dataset992_CompatTarget"
    with tempfile.TemporaryDirectory() as tmp:
        pre, raw = Path(tmp) / "pre", Path(tmp) / "raw"
        (pre / source).mkdir(parents=True)
        (pre / target).mkdir(parents=True)
        (pre / source / "nnUNetPlans.json").write_text(json.dumps(plans))
        (raw / target / "imagesTr").mkdir(parents=True)
        (raw / target / "labelsTr").mkdir(parents=True)
        dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 1,
                        "file_ending": ".nii.gz"}
        (raw / target / "dataset.json").write_text(json.dumps(dataset_json))
        image = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
        sitk.WriteImage(image, str(raw / target / "imagesTr" / "case_0000.nii.gz"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8), str(raw / target / "labelsTr" / "case.nii.gz"))
        saved = mod.nnUNet_preprocessed, mod.nnUNet_raw  # read once at import in nnU-Net: set for this call
        mod.nnUNet_preprocessed, mod.nnUNet_raw = str(pre), str(raw)
        try:
            for target_plans in (None, "nnUNetPlansMoved"):
                mod.move_plans_between_datasets(source, target, "nnUNetPlans", target_plans)
                written = pre / target / f"{target_plans or 'nnUNetPlans'}.json"
                theirs = json.loads(written.read_text())
                ours = move_plans(plans, target_dataset=target, source_plans="nnUNetPlans", target_plans=target_plans,
                                  reader_writer=theirs.get("image_reader_writer"))
                if theirs != ours:
                    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                    raise _differs("move_plans_between_datasets", "move_plans",
                                   f"with target plans {target_plans!r} the entries {diff} differ "
                                   f"(nnU-Net: {[theirs.get(k) for k in diff]}, ours: {[ours.get(k) for k in diff]})",
                                   "experiment_planning/plans_for_pretraining/move_plans_between_datasets.py and "
                                   "copy it into move_plans (nnunet_transfer plans transfer promises nnU-Net's "
                                   "result plus its own fixes)")
        finally:
            mod.nnUNet_preprocessed, mod.nnUNet_raw = saved


#: the planner uses the non-zero mask for normalisation only when cropping to the non-zero region
#: left less than this share of the image (median over cases)
MASK_RELATIVE_SIZE = 3 / 4.


def mask_for_norm(scheme_classes: list[type], median_relative_size_after_cropping: float) -> list[bool]:
    """``use_mask_for_norm`` as nnU-Net's planner sets it for these normalisation classes (from
    ``get_normalization_scheme``): nnunetv2 2.8.1
    ``nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py``
    ``ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm``."""
    if median_relative_size_after_cropping < MASK_RELATIVE_SIZE:
        return [bool(c.leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true) for c in scheme_classes]
    return [False] * len(scheme_classes)


class _PlannerState:
    def __init__(self, channel_names: dict, relative_size: float):
        self.dataset_json = {"channel_names": channel_names}
        self.dataset_fingerprint = {"median_relative_size_after_cropping": relative_size}


def check_mask_for_norm() -> None:
    """nnU-Net's planner and :func:`mask_for_norm` choose the same ``use_mask_for_norm`` (and schemes)
    for channels of every normalisation kind, below, at and above the 3/4 threshold."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    channels = {"0": "CT", "1": "T2", "2": "noNorm", "3": "zscore", "4": "rescale_to_0_1", "5": "rgb_to_0_1"}
    for size in (0.5, 0.7499, 0.75, 0.9):
        schemes, theirs = ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm(
            _PlannerState(channels, size))
        classes = [get_normalization_scheme(n) for n in channels.values()]
        ours = mask_for_norm(classes, size)
        if list(theirs) != ours or list(schemes) != [c.__name__ for c in classes]:
            raise _differs("ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm",
                           "mask_for_norm", f"at median relative size {size}: use_mask_for_norm {list(theirs)} vs "
                           f"{ours}, schemes {list(schemes)} vs {[c.__name__ for c in classes]}",
                           "the planner's rule and copy it into mask_for_norm (plans transfer "
                           "--allow-channel-change sets the target channels with it)")


#: nnU-Net's normalisation schemes that read ``foreground_intensity_properties_per_channel`` (the plans'
#: intensity statistics); every other scheme normalises each image by itself (nnunetv2 2.8.1,
#: ``nnunetv2/preprocessing/normalization/default_normalization_schemes.py``)
USES_PROPERTIES = {"CTNormalization"}


def check_uses_properties() -> None:
    """Of nnU-Net's normalisation schemes (``preprocessing/normalization/default_normalization_schemes.py``),
    exactly :data:`USES_PROPERTIES` change their output when the intensity properties change."""
    import inspect

    import numpy as np
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    image = np.linspace(0, 200, 64, dtype=np.float32).reshape(4, 4, 4)
    seg = np.ones((4, 4, 4), dtype=np.int8)
    props = [{"mean": 10.0, "std": 5.0, "percentile_00_5": 0.0, "percentile_99_5": 100.0},
             {"mean": 50.0, "std": 20.0, "percentile_00_5": 20.0, "percentile_99_5": 150.0}]
    uses = set()
    for name, cls in vars(schemes).items():
        if not (inspect.isclass(cls) and issubclass(cls, schemes.ImageNormalization)) or inspect.isabstract(cls):
            continue
        outs = [cls(use_mask_for_norm=False, intensityproperties=p).run(image.copy(), seg) for p in props]
        if not np.array_equal(outs[0], outs[1]):
            uses.add(name)
    if uses != set(USES_PROPERTIES):
        raise _differs("default_normalization_schemes", "USES_PROPERTIES",
                       f"the schemes that read the intensity properties are {sorted(uses)}, ours "
                       f"{sorted(USES_PROPERTIES)}",
                       "which normalisations read foreground_intensity_properties_per_channel and update "
                       "USES_PROPERTIES (plans transfer --normalization decides with it)")


def list_training_cases(raw: str | Path, dataset_json: Mapping[str, Any]) -> dict[str, dict]:
    """``{case: {"images": [...], "label": ...}}`` of a raw dataset without a ``dataset`` entry in
    ``dataset.json``: nnunetv2 2.8.1 ``nnunetv2/utilities/utils.py`` ``get_filenames_of_train_images_and_targets`` for
    ``imagesTr`` / ``labelsTr``, without the ``Pool(12)`` it lists the files with (it forks this torch-laden
    process twelve times and ends the pool with SIGTERM, which the workers of a submitit job ignore, so a
    job would wait for them forever)."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    raw = Path(raw)
    images = raw / "imagesTr"
    ending = dataset_json["file_ending"]
    identifiers = get_identifiers_from_splitted_dataset_folder(str(images), ending)
    names = subfiles(str(images), suffix=ending, join=False, sort=True)
    return {str(i): {"images": create_paths_fn(str(images), names, ending, i),
                     "label": str(raw / "labelsTr" / f"{i}{ending}")} for i in identifiers}


def check_training_cases() -> None:
    """nnU-Net's ``get_filenames_of_train_images_and_targets`` and :func:`list_training_cases` list the same
    cases, images (in channel order) and labels for a raw folder with several cases and channels."""
    import tempfile

    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "a": 1},
                    "numTraining": 3, "file_ending": ".nii.gz"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "Dataset993_CompatRaw"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        for case in ("case_b", "case_a", "case_10"):
            for channel in (1, 0):
                (raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz").touch()
            (raw / "labelsTr" / f"{case}.nii.gz").touch()
        (raw / "imagesTr" / "notes.txt").touch()
        theirs = get_filenames_of_train_images_and_targets(str(raw), dict(dataset_json))
        ours = list_training_cases(raw, dataset_json)
    theirs = {k: {"images": list(v["images"]), "label": v["label"]} for k, v in theirs.items()}
    if theirs != ours:
        raise _differs("get_filenames_of_train_images_and_targets", "list_training_cases",
                       f"nnU-Net lists {theirs}, ours {ours}",
                       "how nnunetv2/utilities/utils.py lists imagesTr/labelsTr and copy it into "
                       "list_training_cases (splits and study tables read the cases with it)")


# =========================================================================== load_pretrained_weights
#: nnU-Net's ``skip_strings_in_pretrained`` (nnunetv2 2.8.1, ``nnunetv2/run/load_pretrained_weights.py``
#: ``load_pretrained_weights``): keys of the segmentation heads, never loaded by it.
SEG_KEY = ".seg_layers."


def is_seg_key(key: str) -> bool:
    """Whether nnU-Net's ``load_pretrained_weights`` skips this key (a segmentation head)."""
    return SEG_KEY in key


def pretrained_refusals(state: Mapping[str, torch.Tensor], network_state: Mapping[str, torch.Tensor]) -> list[str]:
    """The network keys on which nnU-Net's ``load_pretrained_weights`` (nnunetv2 2.8.1,
    ``nnunetv2/run/load_pretrained_weights.py``) asserts (it stops at the first): every
    key of the network's state dict that is not a segmentation head must be in ``state`` with an equal shape.
    Keys only ``state`` has are ignored. :func:`nnunet_transfer.checkpoints.compare` applies the same rule
    and groups the result by tensor."""
    return [k for k, v in network_state.items()
            if not is_seg_key(k) and (k not in state or state[k].shape != v.shape)]


def _small_unet(features: tuple[int, ...] = (2, 4), classes: int = 2) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, len(features), list(features), nn.Conv3d, 3, [1] + [2] * (len(features) - 1), 1,
                         classes, 1, False, nn.InstanceNorm3d, {"affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True})


def check_load_pretrained_weights() -> None:
    """nnU-Net's ``load_pretrained_weights`` and :func:`pretrained_refusals` on the same files: it refuses
    exactly when we list a refusal, and loads every other key but the heads."""
    import contextlib
    import io
    import tempfile

    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    torch.manual_seed(0)
    source = _small_unet().state_dict()
    cases = {"same network": source,
             "other labels": _small_unet(classes=3).state_dict(),
             "extra key": {**source, "extra.weight": torch.zeros(1)},
             "missing key": {k: v for i, (k, v) in enumerate(source.items()) if i != 0},
             "other width": _small_unet(features=(3, 4)).state_dict(),
             "missing head": {k: v for k, v in source.items() if not is_seg_key(k)}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in cases.items():
            path = Path(tmp) / "w.pth"
            torch.save({"network_weights": state}, path)
            net = _small_unet()
            before = {k: v.clone() for k, v in net.state_dict().items()}
            refused = None
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    load_pretrained_weights(net, str(path))
            except AssertionError as e:
                refused = str(e)
            ours = pretrained_refusals(state, before)
            if bool(refused) != bool(ours) or (refused and f"{ours[0]} " not in refused):
                raise _differs("load_pretrained_weights", "pretrained_refusals",
                               f"for a file with '{name}' nnU-Net {'refuses: ' + refused if refused else 'loads it'}, "
                               f"ours lists {ours[:3] or 'no refusal'}",
                               "run/load_pretrained_weights.py (skip_strings_in_pretrained, its assertions) and "
                               "copy its rules into pretrained_refusals, SEG_KEY and checkpoints.compare "
                               "(weights check and our trainers' pre-flight check promise nnU-Net's verdict)")
            if refused:
                continue
            after = net.state_dict()
            wrong = [k for k in after if not torch.equal(after[k], before[k] if is_seg_key(k) else state[k])]
            if wrong:
                raise _differs("load_pretrained_weights", "pretrained_refusals / SEG_KEY",
                               f"for a file with '{name}' the loaded values of {wrong[:3]} are not what we expect "
                               f"(every key from the file, the heads ({SEG_KEY!r}) kept)",
                               "which keys run/load_pretrained_weights.py copies")


# =========================================================================== initialisation
def reinitialise(modules: list[nn.Module]) -> int:
    """nnU-Net's initialisation for the given modules (He-normal convs, zero biases, fresh norms), as
    ``get_network_from_plans`` (nnunetv2 2.8.1, ``nnunetv2/utilities/get_network_from_plans.py``) applies
    dynamic-network-architectures' ``PlainConvUNet.initialize`` (``InitWeights_He(1e-2)``) to a new network.
    Returns the number of layers it set."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    init = InitWeights_He(1e-2)
    n = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, ALL_CONV_TYPES):
                init(m)
                n += 1
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                m.reset_parameters()
                n += 1
    return n


def check_reinitialise() -> None:
    """A network's own ``initialize`` (what ``get_network_from_plans`` applies to a new network) and
    :func:`reinitialise` give every kind of layer the same weights from the same seed; norms come out as a
    new norm layer's. (Per layer: nnU-Net's ``apply`` visits aliased layers twice, so whole networks draw
    different random numbers from the same distribution.)"""
    import inspect

    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.utilities import get_network_from_plans as gnp

    if "network.apply(network.initialize)" not in inspect.getsource(gnp.get_network_from_plans):
        raise _differs("get_network_from_plans", "reinitialise",
                       "it no longer applies network.initialize to a new network",
                       "how nnU-Net initialises a network and copy it into reinitialise")
    layers = {"Conv3d": lambda: nn.Conv3d(2, 4, 3, bias=True),
              "ConvTranspose3d": lambda: nn.ConvTranspose3d(4, 2, 2, 2),
              "Conv2d": lambda: nn.Conv2d(2, 4, 3), "InstanceNorm3d": lambda: nn.InstanceNorm3d(4, affine=True)}
    for kind, make in layers.items():
        torch.manual_seed(3)
        fresh = make()
        ref, mine = make(), make()
        for m in (ref, mine):  # trained values, so that a no-op would show
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1.5)
        torch.manual_seed(7)
        if isinstance(ref, ALL_CONV_TYPES):
            ref.apply(PlainConvUNet.initialize)
        else:
            ref.load_state_dict(fresh.state_dict())  # nnU-Net's norms are as constructed
        torch.manual_seed(7)
        reinitialise([mine])
        a, b = ref.state_dict(), mine.state_dict()
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad:
            raise _differs("PlainConvUNet.initialize", "reinitialise", f"a {kind} gets other values of {bad}",
                           "dynamic_network_architectures' initialize / InitWeights_He and copy it into "
                           "reinitialise (L2-SP's decoder re-initialisation promises nnU-Net's)")


# =========================================================================== trainer lookup
#: nnU-Net's error for a ``-tr`` it cannot find (nnunetv2 2.8.1, ``nnunetv2/utilities/find_objects.py``
#: ``recursive_find_trainer_class_by_name``); group 1 is the name
TRAINER_NOT_FOUND = re.compile(r"Could not find requested nnunet trainer (\S+) in")


def nnunet_trainer_names() -> list[str]:
    """Class names ``nnUNetTrainer*`` of nnU-Net's own trainers, read from the source files of the folder that
    nnunetv2 2.8.1 ``nnunetv2/utilities/find_objects.py`` ``recursive_find_trainer_class_by_name`` searches
    (``training/nnUNetTrainer``); nothing imported."""
    import nnunetv2

    root = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    names: set[str] = set()
    for path in root.rglob("*.py"):
        try:
            names |= set(re.findall(r"^class (nnUNetTrainer\w*)\s*[(:]", path.read_text(errors="replace"), re.M))
        except OSError:
            continue
    return sorted(names)


def check_trainer_names() -> None:
    """nnU-Net's trainer lookup raises the error :data:`TRAINER_NOT_FOUND` parses, and searches the folder
    :func:`nnunet_trainer_names` reads: every trainer class it imported from there is among the names."""
    import inspect
    import os

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities import find_objects

    if '"training", "nnUNetTrainer"' not in inspect.getsource(find_objects.recursive_find_trainer_class_by_name):
        raise _differs("recursive_find_trainer_class_by_name", "nnunet_trainer_names",
                       "it no longer searches nnunetv2/training/nnUNetTrainer",
                       "where nnU-Net looks up trainers and point nnunet_trainer_names there")
    name = "nnUNetTrainerCompatGuardNoSuchName"
    saved = os.environ.pop("nnUNet_extTrainer", None)
    try:
        find_objects.recursive_find_trainer_class_by_name(name)
        message = ""
    except RuntimeError as e:
        message = str(e)
    finally:
        if saved is not None:
            os.environ["nnUNet_extTrainer"] = saved
    m = TRAINER_NOT_FOUND.search(message)
    if not m or m.group(1) != name:
        raise _differs("recursive_find_trainer_class_by_name", "TRAINER_NOT_FOUND",
                       f"its error for an unknown trainer is {message[:200]!r}",
                       "the message in utilities/find_objects.py and update TRAINER_NOT_FOUND (the one-line "
                       "error for a misspelt -tr depends on it)")
    found = set(nnunet_trainer_names())

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # the hints name trainers called nnUNetTrainer* (nnU-Net's Primus helpers are not meant for -tr)
    imported = {c.__name__ for c in subclasses(nnUNetTrainer)
                if c.__module__.startswith("nnunetv2.") and c.__name__.startswith("nnUNetTrainer")}
    imported.add("nnUNetTrainer")
    if imported - found:
        raise _differs("recursive_find_trainer_class_by_name", "nnunet_trainer_names",
                       f"nnU-Net's trainers {sorted(imported - found)[:5]} are not found by reading its source",
                       "how nnU-Net's trainer classes are declared and fix the pattern in nnunet_trainer_names")


# =========================================================================== nnUNetv2_train's command line
#: ``nnUNetv2_train``'s options that decide what a trainer starts from (nnunetv2 2.8.1,
#: ``nnunetv2/run/run_training.py`` ``run_training_entry``)
TRAIN_FLAGS = {"pretrained": ("-pretrained_weights", "--pretrained_weights"), "continue": "--c", "validate": "--val"}


def check_train_command_line() -> None:
    """``nnUNetv2_train`` still has the options :data:`TRAIN_FLAGS` reads from ``sys.argv``, and
    ``maybe_load_checkpoint`` still calls ``load_pretrained_weights`` through its module globals (which
    :func:`nnunet_transfer.runtime.redirect_nnunet_loader` replaces). Source text: nothing of
    it can run without a dataset."""
    import inspect

    from nnunetv2.run import run_training

    entry = inspect.getsource(run_training.run_training_entry)
    missing = [f for f in (TRAIN_FLAGS["pretrained"][0], TRAIN_FLAGS["continue"], TRAIN_FLAGS["validate"])
               if f"'{f}'" not in entry and f'"{f}"' not in entry]
    if missing:
        raise _differs("run_training.run_training_entry", "TRAIN_FLAGS", f"it has no option {missing}",
                       "nnUNetv2_train's arguments and update TRAIN_FLAGS (our trainers read them from sys.argv "
                       "to check -pretrained_weights before nnU-Net creates folders)")
    loader = inspect.getsource(run_training.maybe_load_checkpoint)
    if "load_pretrained_weights(" not in loader or not hasattr(run_training, "load_pretrained_weights"):
        raise _differs("run_training.maybe_load_checkpoint", "TRAIN_FLAGS",
                       "it no longer calls the module-level load_pretrained_weights",
                       "how nnUNetv2_train loads -pretrained_weights (redirect_nnunet_loader replaces that name)")


# =========================================================================== networks without deep supervision
def network_without_deep_supervision(arch_class_name: str, arch_kwargs: Mapping[str, Any],
                                     arch_kwargs_req_import: Iterable[str], input_channels: int,
                                     output_channels: int, *, patch_size: Iterable[int]) -> nn.Module:
    """nnU-Net's ``get_network_from_plans`` for a class that takes no ``deep_supervision`` argument (Primus).

    nnU-Net 2.8.1's ``nnUNetTrainer.build_network_architecture`` always passes ``deep_supervision=`` a bool,
    which ``Primus.__init__`` refuses; its own ``AbstractPrimus`` trainers build Primus by hand with
    ``input_shape`` = the configuration's patch size. ``get_network_from_plans(..., deep_supervision=None)``
    leaves the argument out and keeps everything else of nnU-Net's way (class lookup, imported kwargs)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kwargs = dict(arch_kwargs)
    kwargs["input_shape"] = tuple(int(v) for v in patch_size)
    return get_network_from_plans(arch_class_name, kwargs, list(arch_kwargs_req_import), input_channels,
                                  output_channels, allow_init=True, deep_supervision=None)


#: the tiny Primus the guard builds (dynamic-network-architectures 0.4.4's kwargs)
_TINY_PRIMUS = {"embed_dim": 24, "patch_embed_size": [4, 4, 4], "eva_depth": 1, "eva_numheads": 1}


def check_network_without_deep_supervision() -> None:
    """nnU-Net's ``get_network_from_plans`` with ``deep_supervision=False`` still refuses a Primus (so our build
    is needed) and :func:`network_without_deep_supervision` builds one of the plans' sizes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    name = "dynamic_network_architectures.architectures.primus.Primus"
    kwargs = {**_TINY_PRIMUS, "input_shape": (8, 8, 8)}
    try:
        get_network_from_plans(name, kwargs, [], 1, 2, allow_init=True, deep_supervision=False)
        passes = False
    except TypeError as e:
        passes = "deep_supervision" in str(e)
    if not passes:
        raise _differs("get_network_from_plans", "network_without_deep_supervision",
                       "building a Primus with deep_supervision=False no longer fails on that argument",
                       "utilities/get_network_from_plans.py and nnUNetTrainer.build_network_architecture: if nnU-Net "
                       "now builds Primus itself, drop our dispatch in nnunet_io.network_from_plans")
    net = network_without_deep_supervision(name, _TINY_PRIMUS, [], 1, 2, patch_size=(8, 8, 8))
    got = (type(net).__name__, tuple(net.down_projection.proj.weight.shape), len(net.eva.blocks),
           tuple(net.eva.pos_embed.shape))
    want = ("Primus", (24, 1, 4, 4, 4), 1, (1, 8, 24))
    if got != want:
        raise _differs("get_network_from_plans", "network_without_deep_supervision",
                       f"the tiny Primus came out as {got}, expected {want}",
                       "how get_network_from_plans passes kwargs and num_classes to the class")


#: every guard, in the order of the table above
CHECKS = (check_save_checkpoint, check_train_step, check_sgd, check_poly_lr, check_move_plans,
          check_mask_for_norm, check_uses_properties, check_training_cases, check_load_pretrained_weights,
          check_reinitialise, check_trainer_names, check_network_without_deep_supervision, check_train_command_line)


def check_all() -> list[str]:
    """Run every guard; the messages of those that fail (empty: the installed nnU-Net behaves as copied)."""
    failed = []
    for check in CHECKS:
        try:
            check()
        except CompatError as e:
            failed.append(str(e))
    return failed


if __name__ == "__main__":  # pragma: no cover - by hand, after installing another nnU-Net
    problems = check_all()
    print("\n".join(problems) if problems else f"every copy agrees with the installed nnU-Net ({len(CHECKS)} guards)")
    raise SystemExit(1 if problems else 0)


__all__ = ["NNUNET_VERSION", "CompatError", "checkpoint_dict", "MAX_GRAD_NORM", "penalised_step", "train_step",
           "nnunet_sgd", "poly_lr", "move_plans", "MASK_RELATIVE_SIZE", "mask_for_norm",
           "USES_PROPERTIES", "list_training_cases", "SEG_KEY", "is_seg_key",
           "pretrained_refusals", "reinitialise", "TRAINER_NOT_FOUND", "nnunet_trainer_names",
           "network_without_deep_supervision", "TRAIN_FLAGS",
           "CHECKS", "check_all", *[c.__name__ for c in CHECKS]]
