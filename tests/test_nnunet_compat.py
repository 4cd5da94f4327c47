"""Every copy of nnU-Net behaviour in ``nnunet_transfer.nnunet_compat`` agrees with the installed nnU-Net, and
every guard fails — naming what to re-check — when either side changes.

The guards run nnU-Net's function and our copy on the same input (a trainer state, a batch, a plans file, a
checkpoint); the failure tests change one side with ``monkeypatch`` and expect :class:`CompatError`.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_transfer import nnunet_compat as compat
from nnunet_transfer.checkpoints import compare
from nnunet_transfer.nnunet_compat import CompatError


@pytest.mark.parametrize("check", compat.CHECKS, ids=lambda c: c.__name__)
def test_installed_nnunet_behaves_as_copied(check):
    check()


def test_every_copy_has_a_guard_named_in_the_table():
    doc = compat.__doc__
    for check in compat.CHECKS:
        assert f":func:`{check.__name__}`" in doc, check.__name__
    assert set(compat.__all__) >= {c.__name__ for c in compat.CHECKS}


def _fails(check, *words: str) -> str:
    with pytest.raises(CompatError) as info:
        check()
    message = str(info.value)
    for word in ("Re-check", compat.NNUNET_VERSION, *words):
        assert word in message, f"{word!r} not in: {message}"
    return message


# --------------------------------------------------------------------------- each guard can fail
def test_save_checkpoint_guard_fails_when_nnunet_writes_another_key(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def save_checkpoint(self, filename):  # a future nnU-Net that stores one more entry
        torch.save({**compat.checkpoint_dict(self), "ema_weights": {"w": torch.ones(1)}}, filename)

    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", save_checkpoint)
    message = _fails(compat.check_save_checkpoint, "nnUNetTrainer.save_checkpoint", "checkpoint_dict")
    assert "ema_weights" in message


def test_save_checkpoint_guard_fails_when_a_value_differs(monkeypatch):
    real = compat.checkpoint_dict
    monkeypatch.setattr(compat, "checkpoint_dict", lambda t: {**real(t), "current_epoch": t.current_epoch})
    assert "current_epoch" in _fails(compat.check_save_checkpoint, "save_checkpoint")


def test_train_step_guard_fails_when_nnunet_clips_differently(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def train_step(self, batch):  # nnU-Net's, clipping at 1 instead of 12
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(batch["data"]), batch["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    monkeypatch.setattr(nnUNetTrainer, "train_step", train_step)
    _fails(compat.check_train_step, "nnUNetTrainer.train_step", "penalised_step")


def test_sgd_guard_fails_when_nnunet_changes_momentum(monkeypatch):
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                              momentum=0.9, nesterov=True)
        return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

    monkeypatch.setattr(nnUNetTrainer, "configure_optimizers", configure_optimizers)
    assert "momentum" in _fails(compat.check_sgd, "configure_optimizers", "nnunet_sgd")


def test_poly_lr_guard_fails_when_the_exponent_changes(monkeypatch):
    from nnunetv2.training.lr_scheduler import polylr

    class Poly(polylr.PolyLRScheduler):
        def __init__(self, optimizer, initial_lr, max_steps, exponent=1.0, current_step=None):
            super().__init__(optimizer, initial_lr, max_steps, exponent, current_step)

    monkeypatch.setattr(polylr, "PolyLRScheduler", Poly)
    _fails(compat.check_poly_lr, "PolyLRScheduler", "poly_lr")


def test_move_plans_guard_fails_when_the_copy_differs(monkeypatch):
    real = compat.move_plans
    monkeypatch.setattr(compat, "move_plans", lambda plans, **kw: {**real(plans, **kw), "plans_name": "x"})
    assert "plans_name" in _fails(compat.check_move_plans, "move_plans_between_datasets")


def test_move_plans_guard_fails_when_nnunet_writes_more(monkeypatch):
    import json

    from nnunetv2.experiment_planning.plans_for_pretraining import move_plans_between_datasets as mod

    real = mod.move_plans_between_datasets

    def move(source, target, source_plans, target_plans=None):  # a future nnU-Net that also records the source
        real(source, target, source_plans, target_plans)
        path = f"{mod.nnUNet_preprocessed}/{target}/{target_plans or source_plans}.json"
        with open(path) as f:
            plans = json.load(f)
        with open(path, "w") as f:
            json.dump({**plans, "source_dataset": source}, f)

    monkeypatch.setattr(mod, "move_plans_between_datasets", move)
    assert "source_dataset" in _fails(compat.check_move_plans, "move_plans")


def test_mask_guard_fails_when_the_threshold_moves(monkeypatch):
    monkeypatch.setattr(compat, "MASK_RELATIVE_SIZE", 0.8)
    assert "0.75" in _fails(compat.check_mask_for_norm, "use_mask_for_norm", "mask_for_norm")


def test_uses_properties_guard_fails_when_the_set_differs(monkeypatch):
    monkeypatch.setattr(compat, "USES_PROPERTIES", {"CTNormalization", "ZScoreNormalization"})
    assert "ZScoreNormalization" in _fails(compat.check_uses_properties, "default_normalization_schemes")


def test_training_cases_guard_fails_when_nnunet_lists_otherwise(monkeypatch):
    from nnunetv2.utilities import utils

    real = utils.get_filenames_of_train_images_and_targets

    def listing(raw, dataset_json=None):  # a future nnU-Net that sorts the channels the other way
        return {k: {**v, "images": v["images"][::-1]} for k, v in real(raw, dataset_json).items()}

    monkeypatch.setattr(utils, "get_filenames_of_train_images_and_targets", listing)
    _fails(compat.check_training_cases, "get_filenames_of_train_images_and_targets", "list_training_cases")


def test_load_pretrained_weights_guard_fails_when_nnunet_loads_the_heads(monkeypatch):
    from nnunetv2.run import load_pretrained_weights as mod

    def load_pretrained_weights(network, fname, verbose=False):  # no skip strings any more
        state = torch.load(fname, weights_only=False)["network_weights"]
        for key, value in network.state_dict().items():
            assert key in state and state[key].shape == value.shape, f"Key {key} is missing or mis-shaped"
        network.load_state_dict(state, strict=False)

    monkeypatch.setattr(mod, "load_pretrained_weights", load_pretrained_weights)
    _fails(compat.check_load_pretrained_weights, "load_pretrained_weights", "pretrained_refusals")


def test_load_pretrained_weights_guard_fails_when_our_skip_rule_changes(monkeypatch):
    monkeypatch.setattr(compat, "SEG_KEY", ".seg_heads.")  # no key skipped: other labels would refuse
    _fails(compat.check_load_pretrained_weights, "pretrained_refusals")


def test_reinitialise_guard_fails_when_the_init_changes(monkeypatch):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    monkeypatch.setattr(PlainConvUNet, "initialize", staticmethod(lambda m: InitWeights_He(0.2)(m)))
    _fails(compat.check_reinitialise, "initialize", "reinitialise")


def test_trainer_name_guard_fails_when_a_trainer_is_not_read(monkeypatch):
    monkeypatch.setattr(compat, "nnunet_trainer_names", lambda: ["nnUNetTrainer"])
    _fails(compat.check_trainer_names, "recursive_find_trainer_class_by_name", "nnunet_trainer_names")


def test_trainer_name_guard_fails_when_the_message_changes(monkeypatch):
    import re

    monkeypatch.setattr(compat, "TRAINER_NOT_FOUND", re.compile(r"No trainer named (\S+)"))
    _fails(compat.check_trainer_names, "TRAINER_NOT_FOUND")


def test_command_line_guard_fails_when_an_option_disappears(monkeypatch):
    monkeypatch.setitem(compat.TRAIN_FLAGS, "continue", "--continue")
    assert "--continue" in _fails(compat.check_train_command_line, "run_training_entry", "TRAIN_FLAGS")


def test_check_all_reports_each_failing_guard(monkeypatch):
    monkeypatch.setattr(compat, "CHECKS", (compat.check_poly_lr, compat.check_train_command_line))
    monkeypatch.setitem(compat.TRAIN_FLAGS, "validate", "--validate")
    failed = compat.check_all()
    assert len(failed) == 1 and "TRAIN_FLAGS" in failed[0]


# --------------------------------------------------------------------------- restatements agree with the copy
def _unet(features=(2, 4), classes=2):
    return compat._small_unet(features, classes)


@pytest.mark.parametrize("case", ["same", "labels", "extra", "missing", "width", "no heads"])
def test_compare_blocks_exactly_where_nnunet_refuses(case):
    """``checkpoints.compare`` (which reports by tensor) blocks on the keys the guarded rule lists."""
    torch.manual_seed(0)
    source = _unet().state_dict()
    state = {"same": source, "labels": _unet(classes=3).state_dict(),
             "extra": {**source, "extra.weight": torch.zeros(1)},
             "missing": {k: v for i, (k, v) in enumerate(source.items()) if i != 0},
             "width": _unet(features=(3, 4)).state_dict(),
             "no heads": {k: v for k, v in source.items() if not compat.is_seg_key(k)}}[case]
    network = _unet()
    blocking = {k for m in compare(state, network).mismatches if m.blocking for k in m.keys}
    assert blocking == set(compat.pretrained_refusals(state, network.state_dict()))


def test_train_step_with_a_penalty_adds_its_gradient_before_clipping():
    """The L2-SP path of the copied train_step: the penalty's gradient is in what the optimizer used."""

    class Penalty:
        def __init__(self, net):
            self.net = net

        def add_to_grads(self):
            for p in self.net.parameters():
                p.grad.add_(1.0)

    plain, penalised = compat._StepState(None), compat._StepState(None)
    penalised.optimizer = torch.optim.SGD(penalised.network.parameters(), 0.1)
    plain.optimizer = torch.optim.SGD(plain.network.parameters(), 0.1)
    batch = {"data": torch.ones(1, 1, 4, 4, 4), "target": [torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)]}
    compat.train_step(plain, batch, penalty=None)
    compat.train_step(penalised, batch, penalty=Penalty(penalised.network))
    diff = [not torch.equal(a.grad, b.grad) for a, b in zip(plain.network.parameters(),
                                                            penalised.network.parameters())]
    assert all(diff)
