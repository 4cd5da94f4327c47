"""Staged, norm-only, BitFit and LoRA trainers in-process (no nnUNetv2_train): settings refused before any
folder, and the checkpoint round trips that ``--c`` relies on (optimizer groups of a later stage, the exact
LoRA training state), on the tiny plans configuration with a synthetic batch."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import nnunet_transfer.trainers as T
from nets import unet
from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.policies.lora import lora_modules, lora_state
from nnunet_transfer.training.pretrained import planned_network

from inprocess import DATASET_JSON, build, plans_with  # noqa: F401 (build: a fixture)
_spec = importlib.util.spec_from_file_location("bench_freezing", Path(__file__).parents[1] / "benchmarks" /
                                               "bench_freezing.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def check(trainer, settings):
    """What the trainer's __init__ runs before nnU-Net creates the fold folder."""
    plans = plans_with(settings)
    cfg = trainer.read_transfer_config(plans, "run")
    trainer.check_network(cfg, lambda: planned_network(trainer, plans, "run", DATASET_JSON))
    return cfg


# ---- settings -----------------------------------------------------------------------------------------

def test_class_defaults():
    assert check(T.nnUNetTrainerStaged_decoderFirst, {}).stages == [["decoder+seg", 50], ["all", None]]
    assert check(T.nnUNetTrainerStaged_headsFirst, {}).stages == [["seg", 50], ["all", None]]
    assert check(T.nnUNetTrainerNormOnly, {}).trainable == "all:norm+seg"
    assert check(T.nnUNetTrainerBitFit, {}).trainable == "all:bias+seg"
    cfg = check(T.nnUNetTrainerLoRA, {})
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (8, 8.0, "encoder+decoder")
    assert check(T.nnUNetTrainerStaged, {"stages": "decoder+seg:5,all"}).stages == [["decoder+seg", 5], ["all", None]]


@pytest.mark.parametrize("trainer, settings, message", [
    (T.nnUNetTrainerStaged, {}, r"nnUNetTrainerStaged needs the setting 'stages', e\.g\. --set "
                                r"stages=decoder\+seg:50,all"),
    (T.nnUNetTrainerStaged, {"stages": []}, r"'stages' must be a non-empty list"),
    (T.nnUNetTrainerStaged, {"stages": "decoder:5,all:3"}, r"the last stage \('all'\) runs until num_epochs"),
    (T.nnUNetTrainerStaged, {"stages": "decoder:5,encoder:5,all"}, r"stage 2 \('encoder'\) ends at epoch 5, not "
                                                                   r"after 5"),
    (T.nnUNetTrainerStaged, {"stages": "blocks:9:5,all"}, r"setting 'stages': stage 1 \('blocks:9', epochs 0 until "
                                                          r"epoch 5\): block 9 .* out of range: valid range 1\.\.5"),
    (T.nnUNetTrainerStaged, {"stages": "seg:norm:5,all"}, r"setting 'stages': stage 1 \('seg:norm'.*norm of seg "
                                                          r"matches no parameter of this PlainConvUNet"),
    (T.nnUNetTrainerStaged, {"trainable": "all"}, r"'trainable' is not used by nnUNetTrainerStaged"),
    (T.nnUNetTrainerPartialFT, {"trainable": "seg:norm"}, r"setting 'trainable': spec 'seg:norm': norm of seg "
                                                          r"matches no parameter"),
    (T.nnUNetTrainerLoRA, {"lora_rank": 0}, r"'lora_rank' must be an integer >= 1, got 0"),
    (T.nnUNetTrainerLoRA, {"lora_rank": 9}, r"'lora_rank'=9 is larger than the smallest dimension of \d+ adapted "
                                            r"convolution\(s\), e\.g\. encoder\.stages\.0\.0\.convs\.0\.conv \(kernel "
                                            r"as a 8 x 27 matrix.*use lora_rank <= 8"),
    (T.nnUNetTrainerLoRA, {"lora_targets": "encoder:norm"}, r"'lora_targets'='encoder:norm' \(norm of blocks 1-3\) "
                                                            r"selects no convolution kernel"),
    (T.nnUNetTrainerLoRA, {"lora_targets": "all"}, r"includes the segmentation heads"),
    (T.nnUNetTrainerLoRA, {"lora_targets": "blocks:7"}, r"setting 'lora_targets': block 7 .* out of range"),
    (T.nnUNetTrainerLoRA, {"trainable": "decoder"}, r"'trainable'='decoder' trains \d+ kernel\(s\) that carry "
                                                    r"adapters"),
    (T.nnUNetTrainerLoRA, {"lora_alpha": 0}, r"'lora_alpha' must be a finite number > 0"),
])
def test_bad_settings_fail_before_any_folder(trainer, settings, message):
    with pytest.raises(ConfigError, match=message):
        check(trainer, settings)


def test_lora_with_norms_trained_in_full_is_allowed():
    assert check(T.nnUNetTrainerLoRA, {"trainable": "all:norm", "lora_rank": 8}).trainable == "all:norm"


# ---- in-process runs -----------------------------------------------------------------------------------


def steps(trainer, n, seed=0):
    batch = bench._synthetic_batch(trainer, seed=seed)
    for _ in range(n):
        trainer.train_step(batch)


def test_norm_only_and_bitfit_keep_everything_else_bit_identical(build):
    # what must move: the norms' scales (norm-only) and shifts (BitFit). Conv biases train under BitFit but
    # get (numerically) no gradient: each conv is followed by InstanceNorm, which removes a per-channel offset
    for cls, keep, moves in ((T.nnUNetTrainerNormOnly, ".norm.", ".norm.weight"),
                             (T.nnUNetTrainerBitFit, ".bias", ".norm.bias")):
        tr = build(cls, {})
        params = dict(unwrap(tr.network).named_parameters())
        start = {n: p.detach().clone() for n, p in params.items()}
        steps(tr, 2)
        for n, p in params.items():
            trains = keep in n or ".seg_layers." in n
            assert p.requires_grad == trains, n
            if not trains:
                assert torch.equal(p, start[n]), n
        # the full-resolution head (nnU-Net gives the deepest deep-supervision output weight 0)
        assert all(not torch.equal(params[n], start[n]) for n in params
                   if n.endswith(moves) or n.startswith("decoder.seg_layers.1."))


def test_staged_resume_in_a_later_stage_rebuilds_groups_state_and_lr(build, tmp_path):
    settings = {"stages": "decoder+seg:1,encoder:norm+decoder+seg:2,all", "stage_warmup_epochs": 2,
                "num_epochs": 6}
    tr = build(T.nnUNetTrainerStaged, settings)
    params = dict(unwrap(tr.network).named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    for epoch in range(3):
        tr.current_epoch = epoch
        tr.on_train_epoch_start()
        steps(tr, 1, seed=epoch)
        if epoch < 2:
            assert all(torch.equal(p, start[n]) for n, p in params.items() if n.endswith("conv.weight")
                       and n.startswith("encoder."))  # encoder kernels wait for stage 3
    assert tr._stage == 2 and [g["stage"] for g in tr.optimizer.param_groups] == [0, 1, 2]
    lrs = [g["lr"] for g in tr.optimizer.param_groups]
    assert lrs[1] == pytest.approx(lrs[0]) and lrs[2] == pytest.approx(lrs[0] / 2)  # 2-epoch ramp of stage 3
    tr.current_epoch = 2  # nnU-Net saves current_epoch + 1
    path = str(tmp_path / "ckpt.pth")
    tr.save_checkpoint(path)
    saved_opt = copy.deepcopy(tr.optimizer.state_dict())

    again = build(T.nnUNetTrainerStaged, settings)
    again.load_checkpoint(path)
    assert again._stage == 2 and again.current_epoch == 3
    assert [g["stage"] for g in again.optimizer.param_groups] == [0, 1, 2]
    loaded = again.optimizer.state_dict()
    assert [g["params"] for g in loaded["param_groups"]] == [g["params"] for g in saved_opt["param_groups"]]
    assert all(torch.equal(loaded["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in saved_opt["state"].items())
    assert again.transfer_state["parameters"] == tr.transfer_state["parameters"]
    tr.current_epoch = again.current_epoch = 3
    tr.on_train_epoch_start()
    again.on_train_epoch_start()
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in tr.optimizer.param_groups]
    log = json.loads((Path(again.output_folder) / "stages_log.json").read_text())
    assert [e["epoch"] for e in log] == [0, 1, 2, 3] and [e["stage"] for e in log] == [1, 2, 3, 3]


def test_lora_loads_plain_pretrained_weights_and_resumes_exactly(build, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    tr = build(T.nnUNetTrainerLoRA, {"lora_rank": 4, "lora_alpha": 8.0})
    net = unwrap(tr.network)
    source_net = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3, True)
    assert type(source_net).__name__ == "PlainConvUNet" and not lora_modules(source_net)  # what predict builds
    torch.save({"network_weights": source_net.state_dict()}, tmp_path / "source.pth")
    load_pretrained_weights(tr.network, str(tmp_path / "source.pth"))  # nnU-Net's loader, unchanged
    src = source_net.state_dict()
    mods = lora_modules(net)
    assert all(torch.equal(m.weight, src[f"{name}.weight"]) for name, m in mods.items())
    steps(tr, 3)
    assert all(torch.equal(m.weight, src[f"{name}.weight"]) for name, m in mods.items())  # base frozen
    assert any(m.lora_B.abs().sum() > 0 for m in mods.values())
    path = str(tmp_path / "ckpt.pth")
    tr.save_checkpoint(path)
    ckpt = read_checkpoint(path, trust=False)  # LoRA state in our key: still nothing but tensors and containers
    # network_weights: the merged kernels under the plain keys -> a plain network computes the same
    plain = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3, True)
    plain.load_state_dict(ckpt["network_weights"])
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], tr.network(x)[0], atol=1e-5)
    for name, m in mods.items():
        merged = m.weight.double() + 2.0 * (m.lora_B.double() @ m.lora_A.double()).view(m.weight.shape)
        assert (ckpt["network_weights"][f"{name}.weight"].double() - merged).abs().max() < 1e-6

    again = build(T.nnUNetTrainerLoRA, {"lora_rank": 4, "lora_alpha": 8.0})
    again.load_checkpoint(path)
    want, got = lora_state(tr.network), lora_state(again.network)
    assert all(torch.equal(want[c][k], got[c][k]) for c in want for k in want[c])  # exact, not merged - BA
    heads = [n for n in dict(net.named_parameters()) if ".seg_layers." in n]
    assert all(torch.equal(net.get_parameter(n), unwrap(again.network).get_parameter(n)) for n in heads)
    steps(tr, 1, seed=5)
    steps(again, 1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(tr.network.state_dict().values(), again.network.state_dict().values()))


def test_lora_adapter_file_merges_into_the_base(build, tmp_path):
    from nnunet_transfer.errors import DataError
    from nnunet_transfer.trainers.lora import merge_adapters

    tr = build(T.nnUNetTrainerLoRA, {"lora_rank": 2})
    base = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3, True)
    torch.save({"network_weights": base.state_dict()}, tmp_path / "base.pth")
    unwrap(tr.network).load_state_dict(base.state_dict())
    steps(tr, 2)
    adapters = tr.write_adapter_file(tmp_path / "lora_adapters.pth")
    merged = merge_adapters(adapters, tmp_path / "base.pth", tmp_path / "merged.pth")
    ours = tr.network.state_dict()
    theirs = read_checkpoint(merged, trust=False)
    assert theirs["trainer_name"] == "nnUNetTrainerLoRA" and theirs["init_args"]["configuration"] == "run"
    assert list(theirs["network_weights"]) == list(ours)
    assert max(float((theirs["network_weights"][k] - v).abs().max()) for k, v in ours.items()) <= 1e-6
    assert adapters.stat().st_size < 0.6 * (tmp_path / "base.pth").stat().st_size  # rank 2 on a tiny net
    with pytest.raises(DataError, match=r"exists; pass --force"):
        merge_adapters(adapters, tmp_path / "base.pth", tmp_path / "merged.pth")
    torch.save({"network_weights": unet("plain", 3).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"does not fit the network"):
        merge_adapters(adapters, tmp_path / "other.pth", tmp_path / "m2.pth")
    other = copy.deepcopy(base.state_dict())
    other["encoder.stages.0.0.convs.0.norm.weight"] += 1
    torch.save({"network_weights": other}, tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"the base is not the network these adapters were trained on: 1 of"):
        merge_adapters(adapters, tmp_path / "other.pth", tmp_path / "m3.pth")


def test_settings_groups():
    assert set(TransferConfig.keys("stages")) == {"stages", "stage_warmup_epochs"}
    assert set(TransferConfig.keys("lora")) == {"lora_rank", "lora_alpha", "lora_targets"}
    assert "lora_targets" in TransferConfig.spec_keys()


def test_l2sp_scope_and_trainable_take_kinds(build):
    tr = build(T.nnUNetTrainerL2SP, {"l2sp_scope": "encoder:kernel", "allow_random_anchor": True})
    net = unwrap(tr.network)
    kernels = {n for n, p in net.named_parameters() if n.startswith("encoder.") and n.endswith("conv.weight")}
    assert set(tr.l2sp.anchored_names) == kernels
    tr = build(T.nnUNetTrainerPartialFT, {"trainable": "decoder+encoder:norm"})
    trainable = {n for n, p in unwrap(tr.network).named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(unwrap(tr.network).named_parameters())
                         if n.startswith("decoder.") or (n.startswith("encoder.") and ".norm." in n)}
