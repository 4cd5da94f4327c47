"""Our trainers on a Primus configuration, in-process (no nnUNetv2_train): the network is built from the plans
without deep supervision, and every strategy freezes what its block spec says — frozen tensors bit-identical after
training steps, trained ones moved; LoRA keeps its base kernels and its merged checkpoint is a plain Primus."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import nnunet_transfer.trainers as T
from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.policies.lora import lora_modules
from nnunet_transfer.training.pretrained import planned_network

from inprocess import DATASET_JSON, build, plans_with  # noqa: F401 (build: a fixture)

_spec = importlib.util.spec_from_file_location("bench_freezing", Path(__file__).parents[1] / "benchmarks" /
                                               "bench_freezing.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
torch.set_num_threads(1)


def steps(trainer, n, seed=0):
    batch = bench._synthetic_batch(trainer, seed=seed)
    for _ in range(n):
        trainer.train_step(batch)


def train_and_compare(trainer, n=2):
    """(parameters by name, their values before, names that changed) after ``n`` steps."""
    params = dict(unwrap(trainer.network).named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    steps(trainer, n)
    return params, start, {k for k, p in params.items() if not torch.equal(p, start[k])}


def test_primus_is_built_from_plans_without_deep_supervision(build):
    tr = build(T.nnUNetTrainerTransferBase, {}, primus=True)
    net = unwrap(tr.network)
    assert type(net).__name__ == "Primus" and tr.enable_deep_supervision is False
    assert tuple(net.eva.pos_embed.shape) == (1, 8, 48)  # input_shape = the 16³ patch: a 2³ token grid
    assert bench._synthetic_batch(tr)["target"].shape == (2, 1, 16, 16, 16)  # one output, no scales
    # what nnUNetv2_predict calls (enable_deep_supervision=False) and what a bool from nnU-Net would pass
    for ds in (False, True):
        other = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3, ds)
        assert type(other).__name__ == "Primus" and list(other.state_dict()) == list(net.state_dict())
    tr.set_deep_supervision_enabled(True)  # nnU-Net's would touch network.decoder; a Primus has none
    meta = planned_network(T.nnUNetTrainerTransferBase, plans_with({}, primus=True), "run", DATASET_JSON)
    assert next(meta.parameters()).device.type == "meta"


@pytest.mark.parametrize("cls, settings, trains", [
    (T.nnUNetTrainerFrozenEncoder, {}, ("up_projection.",)),
    (T.nnUNetTrainerPartialFT, {"trainable": "blocks:3-4+decoder"},
     ("eva.blocks.2.", "eva.blocks.3.", "eva.norm.", "up_projection.")),
])
def test_freezing_by_transformer_block(build, cls, settings, trains):
    tr = build(cls, settings, primus=True)
    params, start, moved = train_and_compare(tr)
    for name, p in params.items():
        trainable = name.startswith(trains)
        assert p.requires_grad == trainable, name
        if not trainable:
            assert torch.equal(p, start[name]), name  # frozen: bit for bit
    assert {n for n in moved if n.startswith("up_projection.decode.2.")} == {
        "up_projection.decode.2.weight", "up_projection.decode.2.bias"}  # the heads train
    assert any(n.startswith(trains[0]) for n in moved)


@pytest.mark.parametrize("cls, kind", [(T.nnUNetTrainerNormOnly, "norm"), (T.nnUNetTrainerBitFit, "bias")])
def test_norm_only_and_bitfit_on_primus(build, cls, kind):
    tr = build(cls, {}, primus=True)
    selected = tr.blocks.kind_names[kind] | set(tr.blocks.seg_param_names)
    params, start, moved = train_and_compare(tr)
    assert {n for n, p in params.items() if p.requires_grad} == selected
    assert all(torch.equal(p, start[n]) for n, p in params.items() if n not in selected)
    assert any(n.startswith("eva.blocks.") for n in moved)  # the transformer's LayerNorms / biases move


def test_staged_on_primus_trains_the_encoder_in_its_stage_only(build):
    tr = build(T.nnUNetTrainerStaged, {"stages": "decoder+seg:1,all", "num_epochs": 3}, primus=True)
    params = dict(unwrap(tr.network).named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    encoder = [n for n in params if n.startswith(("down_projection.", "eva."))]
    tr.current_epoch = 0
    tr.on_train_epoch_start()
    steps(tr, 1)
    assert all(torch.equal(params[n], start[n]) for n in encoder)
    tr.current_epoch = 1
    tr.on_train_epoch_start()
    steps(tr, 1, seed=1)
    assert any(not torch.equal(params[n], start[n]) for n in encoder if n.startswith("eva.blocks."))


def test_l2sp_anchors_the_primus_encoder(build):
    tr = build(T.nnUNetTrainerL2SP, {"allow_random_anchor": True}, primus=True)
    net = unwrap(tr.network)
    assert set(tr.l2sp.anchored_names) == {n for n, _ in net.named_parameters()
                                           if n.startswith(("down_projection.", "eva."))}
    tr._on_weights_ready(False)  # what on_train_start calls: the anchor is captured here
    params, start, moved = train_and_compare(tr)
    assert any(n.startswith("eva.blocks.") for n in moved) and any(n.startswith("up_projection.") for n in moved)
    # the penalty α‖θ_S − θ̄_S‖² over the transformer, against an independent float64 sum from the start weights
    alpha = tr.transfer_config.l2sp_alpha
    want = alpha * sum(float(((params[n].detach().double() - start[n].double()) ** 2).sum()) for n in tr.l2sp.anchored_names)
    assert want > 0 and tr.l2sp.penalty_value() == pytest.approx(want, rel=1e-6)


def test_lora_on_primus_keeps_its_base_and_writes_a_plain_primus(build, tmp_path):
    tr = build(T.nnUNetTrainerLoRA, {"lora_rank": 4, "lora_alpha": 8.0}, primus=True)
    net = unwrap(tr.network)
    mods = lora_modules(net)
    assert "eva.blocks.0.attn.q_proj" in mods and "eva.blocks.3.mlp.fc2" in mods
    base = {n: m.weight.detach().clone() for n, m in mods.items()}
    steps(tr, 3)
    assert all(torch.equal(m.weight, base[n]) for n, m in mods.items())  # base kernels bit for bit
    assert any(bool(m.lora_B.any()) for m in mods.values())
    path = str(tmp_path / "ckpt.pth")
    tr.save_checkpoint(path)
    ckpt = read_checkpoint(path, trust=False)
    plain = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3, False)
    assert not lora_modules(plain)
    plain.load_state_dict(ckpt["network_weights"])  # what nnUNetv2_predict does with the checkpoint
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert (plain(x) - tr.network(x)).abs().max() <= 1e-6


def test_bad_primus_specs_fail_before_any_folder():
    plans = plans_with({"trainable": "bottleneck"}, primus=True)
    with pytest.raises(ConfigError, match=r"setting 'trainable': .*a Primus has no bottleneck"):
        T.nnUNetTrainerPartialFT.read_transfer_config(plans, "run")
