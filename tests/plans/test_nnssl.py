"""nnssl checkpoints as a source: the adaptation plan read and refused in one line, the encoder and stem mapped
onto a target network (tensor for tensor against independent computations: nnU-Net master's stem rule, the
checkpoint's own tensors, the target's own initialisation), the per-block report and the provenance every
strategy reads, and the commands that take a checkpoint."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from nnssl_ckpt import adaptation_plan, resenc_kwargs, write_nnssl_checkpoint
from nnunet_transfer.checkpoints import ADAPTED_KEY, load_weights, read_checkpoint
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ArchitectureError, DataError
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.adapt import NNSSL_DECODER, load_nnssl_encoder, map_checkpoint
from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.plans.nnssl import RESENC_L_KWARGS, read_plan
from nnunet_transfer.plans.provenance import record_text, source_param_names, transfer_record

DATA = Path(__file__).parent.parent / "data"
TGT = "Dataset902_TransferTarget"
IN_PROJ = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")


def dataset_json(channels: int = 1) -> dict:
    dj = json.loads((DATA / "dataset_ct2labels.json").read_text())
    dj["channel_names"] = {str(i): "CT" for i in range(channels)}
    return dj


def target_plans(architecture: dict, patch=(32, 32, 32)) -> dict:
    """The test plans with a configuration 'net' whose architecture is ``architecture``."""
    plans = add_configuration(json.loads((DATA / "nnUNetPlans_3d_32.json").read_text()), base="3d_fullres",
                              new="net", patch=",".join(map(str, patch)))
    plans["configurations"]["net"]["architecture"] = copy.deepcopy(architecture)
    return plans


def target_network(architecture: dict, *, channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_network(target_plans(architecture), "net", dataset_json(channels))


@pytest.fixture
def ckpt(tmp_path):
    """(path, network_weights, plan) of a 1-channel nnssl ResEnc checkpoint, features 8-16-32."""
    return write_nnssl_checkpoint(tmp_path / "nnssl.pth")


# --------------------------------------------------------------------------- the adaptation plan
def test_the_plan_as_nnssl_writes_it_is_read_in_nnunet_plans_terms():
    plan = read_plan(adaptation_plan(resenc_kwargs()))
    assert plan.network_class_name == "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch = plan.architecture()
    assert arch["arch_kwargs"] == resenc_kwargs()
    assert arch["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    assert plan.pretrain_patch_size == [32, 32, 32] and plan.recommended_downstream_patchsize == [32, 32, 32]
    assert plan.keys_to_in_proj == ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
    # nnssl's presets name no kwargs: ResEncL is nnssl's get_res_enc_l
    resencl = read_plan(adaptation_plan(None, arch_class_name="ResEncL", patch=(160, 160, 160)))
    assert resencl.arch_kwargs == RESENC_L_KWARGS and resencl.notes == ()
    assert read_plan(adaptation_plan(None, arch_class_name="NoSkipResEncL")).notes[0].startswith(
        "NoSkipResEncL's encoder is ResEncL's")


def _drop(key):
    def f(p):
        del p[key]
    return f


def _set(*path_and_value):
    *path, value = path_and_value

    def f(p):
        d = p
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


REFUSALS = [  # (change to the plan nnssl writes, error type, what the one line says)
    (_drop("key_to_encoder"), DataError, "lacks ['key_to_encoder']"),
    (_set("architecture_plans", "arch_class_name", "SwinUNETR"), ArchitectureError,
     "arch_class_name is 'SwinUNETR', which nnU-Net 2.8.1 plans cannot build"),
    (_set("architecture_plans", "arch_kwargs", None), DataError, "a ResidualEncoderUNet plan needs its kwargs"),
    (_set("architecture_plans", "arch_kwargs", "n_conv_per_stage", [2, 2, 2]), ArchitectureError,
     "has ['n_conv_per_stage'], which ResidualEncoderUNet of dynamic-network-architectures does not take"),
    (_set("architecture_plans", "arch_kwargs", "conv_op", "torch.nn.NoSuchConv"), ArchitectureError,
     "arch_kwargs.conv_op = 'torch.nn.NoSuchConv' names no importable class"),
    (_set("architecture_plans", "arch_kwargs", "conv_op", "torch.nn.Conv1d"), ArchitectureError,
     "nnU-Net builds 2-D and 3-D networks"),
    (_set("keys_to_in_proj", "encoder.stem.convs.0.conv"), DataError, "keys_to_in_proj must be a list"),
    (_set("pretrain_num_input_channels", 0), DataError, "pretrain_num_input_channels must be an integer >= 1, got 0"),
    (_set("recommended_downstream_patchsize", [32, 32]), DataError,
     "recommended_downstream_patchsize [32, 32] has 2 axes, the network is 3-D"),
    (_set("recommended_downstream_patchsize", [32, 0, 32]), DataError, "must be a list of positive integers"),
]


@pytest.mark.parametrize("change, error, message", REFUSALS)
def test_an_odd_plan_is_refused_in_one_line_naming_the_key(change, error, message):
    raw = adaptation_plan(resenc_kwargs())
    change(raw)
    with pytest.raises(error) as e:
        read_plan(raw, path="x.pth")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith("x.pth: nnssl_adaptation_plan")
    with pytest.raises(DataError, match="is a list, expected a dict"):
        read_plan([], path="x.pth")


# --------------------------------------------------------------------------- the mapping
def test_encoder_and_stem_come_from_the_checkpoint_stem_repeated_over_channels_decoder_fresh(ckpt):
    path, pt, raw = ckpt
    arch = read_plan(raw).architecture()
    fresh = {k: v.clone() for k, v in target_network(arch, channels=2, seed=4).state_dict().items()}
    net = target_network(arch, channels=2, seed=4)
    state, report = map_checkpoint(load_weights(path), net)
    assert set(state) <= set(fresh)
    for name, value in state.items():
        if name.endswith(IN_PROJ):  # encoder.stem... and its decoder.encoder.stem... aliases
            # nnU-Net master's rule for a 1-channel checkpoint: repeat over the C channels, divide by C
            expected = pt["encoder.stem.convs.0.conv.weight"].repeat(1, 2, 1, 1, 1) / 2
            assert torch.equal(value, expected), name
        elif name.startswith("encoder.") or name.startswith("decoder.encoder."):
            assert torch.equal(value, pt[name]), name  # bit for bit
        else:  # decoder and heads: the target's own initialisation
            assert torch.equal(value, fresh[name]), name
    # heads with another label count are not in the pretraining network: left out (nnU-Net never loads them)
    assert not any(".seg_layers." in k for k in state)
    params = dict(net.named_parameters())
    encoder = {n for n in params if n.startswith("encoder.")}
    outside_heads = {n for n in params if ".seg_layers." not in n}
    assert report.origin == "nnssl" and report.channels == [1, 2] and report.method == "repeat"
    assert report.params == sum(params[n].numel() for n in outside_heads)
    assert report.from_source == sum(params[n].numel() for n in encoder)
    assert {b.block: b.share for b in report.blocks} == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0}
    acts = {t.name: t for t in report.tensors}
    assert all(acts[n].action == "new" and acts[n].reason == NNSSL_DECODER for n in params if n.startswith("decoder.")
               and ".seg_layers." not in n)
    assert acts[IN_PROJ[0]].action == "channels"
    assert report.dropped == {"pretraining decoder and heads (nnssl)": sum(
        1 for k in pt if k.startswith("decoder.") and not k.startswith("decoder.encoder.")
        and ".all_modules." not in k)}
    text = report.text()
    assert text.startswith("nnssl encoder + stem: ") and "nnssl's rule" in text and "tensor(" not in text
    # the one decision every strategy reads: what came from the source is the encoder, nothing else
    record = transfer_record(load_weights(path), net, loaded_keys=0, report=report.to_dict())
    assert source_param_names(record, net) == frozenset(encoder), source_param_names(record, net) ^ encoder
    assert record_text(record).startswith(f"encoder and stem of the nnssl checkpoint {path}: ")


def test_a_target_with_more_blocks_per_stage_gets_them_fresh_and_reported(ckpt):
    path, pt, raw = ckpt
    arch = read_plan(raw).architecture()
    arch["arch_kwargs"]["n_blocks_per_stage"] = [2, 2, 2]  # one more residual block at full resolution
    fresh = dict(target_network(arch, seed=1).named_parameters())
    state, report = map_checkpoint(load_weights(path), target_network(arch, seed=1))
    extra = [n for n in fresh if n.startswith("encoder.stages.0.blocks.1.")]
    assert extra and all(torch.equal(state[n], fresh[n]) for n in extra)
    row = report.blocks[0]
    assert row.counts["new"] == sum(fresh[n].numel() for n in extra) and 0 < row.share < 1
    assert sorted(row.fresh) == sorted(extra)


def test_load_nnssl_encoder_leaves_everything_else_as_nnunet_initialised_it(ckpt):
    path, pt, raw = ckpt
    arch = read_plan(raw).architecture()
    net = target_network(arch, seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_nnssl_encoder(net, path)
    after = net.state_dict()
    for k, v in after.items():
        if k.startswith(("encoder.", "decoder.encoder.")):
            assert torch.equal(v, pt[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert report.share == pytest.approx(sum(p.numel() for n, p in net.named_parameters() if n.startswith("encoder."))
                                         / sum(p.numel() for n, p in net.named_parameters()
                                               if ".seg_layers." not in n), abs=0)


def test_refusals_of_the_mapping_are_one_line(ckpt, tmp_path):
    path, pt, raw = ckpt
    weights = load_weights(path)
    arch = read_plan(raw).architecture()
    plain = {**arch, "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "arch_kwargs": {**{k: v for k, v in arch["arch_kwargs"].items() if k != "n_blocks_per_stage"},
                             "n_conv_per_stage": [2, 2, 2]}}
    cases = [(lambda: map_checkpoint(weights, target_network(plain)), ArchitectureError,
              "the checkpoint is a nnssl ResidualEncoderUNet (residual encoder"),
             ]
    primus = adaptation_plan(None, arch_class_name="PrimusM")
    primus.update(key_to_encoder="eva", key_to_stem="down_projection", keys_to_in_proj=("down_projection.proj",),
                  key_to_lpe="eva.pos_embed")
    p2, _, _ = write_nnssl_checkpoint(tmp_path / "primus.pth", plan=primus)
    cases.append((lambda: map_checkpoint(load_weights(p2), target_network(arch)), ArchitectureError,
                  "holds a Primus transformer (PrimusM) and the target network is a ResidualEncoderUNet: plan the "
                  "target for the checkpoint with nnunet_transfer plans from-checkpoint"))
    wrong_key = copy.deepcopy(raw)
    wrong_key["key_to_encoder"] = "encoder.blocks"
    p3, _, _ = write_nnssl_checkpoint(tmp_path / "key.pth", plan=wrong_key)
    cases.append((lambda: map_checkpoint(load_weights(p3), target_network(arch)), DataError,
                  "'encoder.blocks' (key_to_encoder) names no tensor of network_weights"))
    channels = copy.deepcopy(raw)
    channels["pretrain_num_input_channels"] = 2
    p4, _, _ = write_nnssl_checkpoint(tmp_path / "channels.pth", plan=channels)
    cases.append((lambda: map_checkpoint(load_weights(p4), target_network(arch)), DataError,
                  "does not take pretrain_num_input_channels = 2"))
    for call, error, message in cases:
        with pytest.raises(error) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------- the commands
@pytest.fixture
def env(tmp_path, monkeypatch, ckpt) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "pre" / TGT).mkdir()
    (tmp_path / "pre" / TGT / "nnUNetPlans.json").write_text(json.dumps(target_plans(
        read_plan(ckpt[2]).architecture())))
    (tmp_path / "pre" / TGT / "dataset.json").write_text(json.dumps(dataset_json(2)))
    return tmp_path


def test_weights_check_and_adapt_take_an_nnssl_checkpoint(env, ckpt, capsys):
    path, pt, _ = ckpt
    assert main(["weights", "check", str(path), "-d", "902", "-c", "net"]) == 0
    printed = capsys.readouterr().out
    assert "OK: -pretrained_weights" in printed and "loads the encoder and stem" in printed
    out = env / "adapted.pth"
    assert main(["weights", "adapt", str(path), "-d", "902", "-c", "net", "-o", str(out), "--seed", "3"]) == 0
    saved = read_checkpoint(out, trust=False)
    assert saved[ADAPTED_KEY]["origin"] == "nnssl" and saved[ADAPTED_KEY]["channels"] == [1, 2]
    # the file nnU-Net's own loader takes: the encoder from the checkpoint, the rest as seed 3 initialises it
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    net = target_network(read_plan(ckpt[2]).architecture(), channels=2, seed=9)
    load_pretrained_weights(net, str(out))
    fresh = target_network(read_plan(ckpt[2]).architecture(), channels=2, seed=3).state_dict()
    for k, v in net.state_dict().items():
        if k.startswith("encoder.stages."):
            assert torch.equal(v, pt[k]), k
        elif k.startswith("decoder.stages.") or k.startswith("decoder.transpconvs."):
            assert torch.equal(v, fresh[k]), k
    # without target plans the whole pretraining network would be rewritten: refused, nothing written
    assert main(["weights", "adapt", str(path), "-o", str(env / "plain.pth")]) == 2
    err = capsys.readouterr().err
    assert "is an nnssl checkpoint" in err and err.count("\n") == 1 and not (env / "plain.pth").exists()


def test_plans_from_checkpoint_writes_a_configuration_that_builds_the_checkpoints_network(env, ckpt, capsys):
    path, pt, raw = ckpt
    plans_file = env / "pre" / TGT / "nnUNetPlans.json"
    assert main(["plans", "from-checkpoint", "-d", "902", "-c", str(path), "-n", "ssl", "--set",
                 "num_epochs=3"]) == 0
    printed = capsys.readouterr().out
    conf = json.loads(plans_file.read_text())["configurations"]["ssl"]
    assert conf == {"inherits_from": "3d_fullres", "architecture": read_plan(raw).architecture(),
                    "patch_size": [32, 32, 32], "batch_size": 2, "nnunet_transfer": {"num_epochs": 3}}
    assert "-pretrained_weights with this package's trainers loads the encoder and stem: " in printed
    assert f"-tr nnUNetTrainerFinetune_warmup -pretrained_weights {path}" in printed
    # refusals: one line, the plans file untouched
    before = plans_file.read_bytes()
    for argv, message in ((["-n", "ssl"], "already exists"), (["-n", "ssl2", "--patch-size", "32,30,32"],
                                                              "axis 1 is not divisible by 4"),
                          (["-n", "ssl2", "--base", "nope"], "base configuration 'nope' is not in")):
        assert main(["plans", "from-checkpoint", "-d", "902", "-c", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert plans_file.read_bytes() == before
    torch.save({"network_weights": pt}, env / "plain.pth")
    assert main(["plans", "from-checkpoint", "-d", "902", "-c", str(env / "plain.pth"), "-n", "x"]) == 2
    assert "is not an nnssl checkpoint" in capsys.readouterr().err


def test_the_trainers_check_an_nnssl_checkpoint_before_any_folder_exists(ckpt):
    """What nnUNetv2_train's trainers learn from -pretrained_weights CKPT in __init__ (and a study's plan check)."""
    from nnunet_transfer import trainers as T
    from nnunet_transfer.errors import TransferError
    from nnunet_transfer.training.pretrained import check_pretrained

    path, _, raw = ckpt
    plans = target_plans(read_plan(raw).architecture())
    dj = dataset_json(1)
    checked = check_pretrained(str(path), trainer_class=T.nnUNetTrainerFrozenEncoder, plans=plans,
                               configuration="net", dataset_json=dj)
    assert checked.loader is load_nnssl_encoder and checked.heads is None
    assert checked.transfer["origin"] == "nnssl"
    assert [b["share"] for b in checked.transfer["blocks"]] == [1.0, 1.0, 1.0, 0.0, 0.0]
    # a strategy whose heads come "by name when the labels agree": every row new, said why
    cls = T.nnUNetTrainerFrozenDecoder
    cfg = cls.read_transfer_config(plans, "net")
    checked = check_pretrained(str(path), trainer_class=cls, plans=plans, configuration="net", dataset_json=dj,
                               heads=cfg.heads, heads_fallback_new=cls.heads_fallback_new)
    assert checked.heads.copied == [] and "pretrained without labels" in checked.heads.fallback
    # ... and then refused: it would freeze a decoder that never saw the checkpoint
    probe = cls.__new__(cls)
    probe.transfer_config = cfg
    with pytest.raises(TransferError, match=r"would freeze parameters that did not come from .* block 4: "):
        probe.check_pretrained_file(checked)
    with pytest.raises(TransferError, match="is an nnssl checkpoint, pretrained without labels; set heads=new"):
        check_pretrained(str(path), trainer_class=cls, plans=plans, configuration="net", dataset_json=dj,
                         heads="by-name")


def test_plans_transfer_points_an_nnssl_checkpoint_to_from_checkpoint(env, ckpt, capsys):
    path = ckpt[0]
    assert main(["plans", "transfer", "-s", str(path), "-t", "902"]) == 2
    err = capsys.readouterr().err
    assert f"-s {path} is a file" in err and f"plans from-checkpoint -d 902 -c {path} -n NAME" in err
    assert err.count("\n") == 1


def test_load_nnssl_encoder_into_a_network_that_already_carries_lora_adapters(ckpt):
    """nnUNetTrainerLoRA adds its adapters in configure_optimizers, before nnU-Net loads -pretrained_weights: the
    loader maps onto the plain state dict (adapters are no checkpoint tensors) and the layers compute with the
    checkpoint's kernels (B = 0)."""
    from nnunet_transfer.policies.lora import inject_lora

    path, pt, raw = ckpt
    net = target_network(read_plan(raw).architecture(), seed=2)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d) and n.startswith("encoder.stages.")]
    inject_lora(net, convs, rank=2, alpha=2.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_nnssl_encoder(net, path)
    after = net.state_dict()
    assert all(torch.equal(after[k], pt[k]) if k.startswith(("encoder.", "decoder.encoder.")) else
               torch.equal(after[k], before[k]) for k in after)
    assert all(not n.endswith(("lora_A", "lora_B")) for t in report.tensors for n in [t.name])
    assert {b.block: b.share for b in report.blocks} == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0}


# --------------------------------------------------------------------------- Primus checkpoints
def primus_plans(architecture: dict, patch=(16, 16, 16)) -> dict:
    """The test plans with a Primus configuration 'net' (``architecture``, ``patch``)."""
    from nnunet_transfer.plans.primus import add_primus_configuration

    return add_primus_configuration(json.loads((DATA / "nnUNetPlans_3d_32.json").read_text()), base="3d_fullres",
                                    new="net", architecture=architecture, patch=patch)


def primus_network(architecture: dict, *, patch=(16, 16, 16), channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_network(primus_plans(architecture, patch), "net", dataset_json(channels))


@pytest.fixture
def primus_ckpt(tmp_path):
    """(path, network_weights, plan) of a tiny 1-channel nnssl EvaMAE checkpoint pretrained on 32³ patches."""
    from nnssl_ckpt import write_nnssl_primus_checkpoint

    return write_nnssl_primus_checkpoint(tmp_path / "nnssl_primus.pth")


def test_primus_presets_are_dynamic_network_architectures_and_build_the_same_network():
    """nnssl names PrimusS/B/M/L without kwargs; the plan states them as the class Primus with explicit sizes, which
    must be dynamic-network-architectures' PrimusX (its size table and its defaults) — checked by building PrimusS
    both ways: same tensors, same output."""
    import inspect

    from dynamic_network_architectures.architectures import primus as dna
    from nnssl_ckpt import primus_adaptation_plan
    from nnunet_transfer.plans.nnssl import PRIMUS_PRESET_COMMON, PRIMUS_PRESETS

    assert PRIMUS_PRESETS == {f"Primus{k}": v for k, v in dna._PRIMUS_CONFIGS.items()}
    for name in PRIMUS_PRESETS:
        params = inspect.signature(getattr(dna, name).__init__).parameters
        assert {k: params[k].default for k in ("init_values", "scale_attn_inner")} == \
            {k: PRIMUS_PRESET_COMMON[k] for k in ("init_values", "scale_attn_inner")}
    plan = read_plan(primus_adaptation_plan(arch_class_name="PrimusS", patch=(160, 160, 160)))
    arch = plan.architecture()
    assert arch == {"network_class_name": "dynamic_network_architectures.architectures.primus.Primus",
                    "arch_kwargs": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6,
                                    "patch_embed_size": [8, 8, 8], "init_values": 0.1, "scale_attn_inner": True},
                    "_kw_requires_import": []}
    ours = primus_network(arch, seed=0).eval()
    torch.manual_seed(1)
    theirs = dna.PrimusS(input_channels=1, output_channels=3, patch_embed_size=(8, 8, 8),
                         input_shape=(16, 16, 16)).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_a_primus_checkpoint_maps_its_patch_embedding_and_transformer_decoder_fresh(primus_ckpt):
    """Pretrained on 32³, fine-tuned on 16³ with 2 channels: every tensor of the stem and the encoder is the
    checkpoint's (the positional embedding as nnU-Net master interpolates it, the patch embedding repeated over the
    channels / 2), the up-projection and the rest the target's own; the report's shares counted independently."""
    from plans.test_primus import master_interpolate_pos_embed

    path, pt, raw = primus_ckpt
    arch = read_plan(raw).architecture()
    net = primus_network(arch, channels=2, seed=4)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    state, report = map_checkpoint(load_weights(path), net, source_label="ckpt", target_label="tgt")
    assert list(state) == list(fresh)
    from_ckpt = set()
    for k, v in state.items():
        if k == "eva.pos_embed":
            expected = master_interpolate_pos_embed(pt[k], pretrained_patch=(32, 32, 32), patch=(16, 16, 16),
                                                    patch_embed_size=(8, 8, 8))
        elif k == "down_projection.proj.weight":
            expected = pt[k].repeat(1, 2, 1, 1, 1) / 2
        elif k.startswith(("eva.", "down_projection.")):
            expected = pt[k]
        else:
            expected = fresh[k]
        assert torch.equal(v, expected), k
        if k.startswith(("eva.", "down_projection.")):
            from_ckpt.add(k)
    assert report.origin == "nnssl" and report.channels == [1, 2]
    action = {t.name: t.action for t in report.tensors}
    assert action["eva.pos_embed"] == "mapped" and action["down_projection.proj.weight"] == "channels"
    assert {action[k] for k in from_ckpt} <= {"copied", "mapped", "channels"}
    assert action["up_projection.decode.2.weight"] == "head" and action["mask_token"] == "new"
    params = dict(net.named_parameters())
    from nnunet_transfer.blocks import BlockModel

    for b, row in zip(BlockModel.from_network(net).blocks, report.blocks):
        n = sum(params[p].numel() for p in b.param_names)
        assert row.params == n and row.from_source == sum(params[p].numel() for p in b.param_names if p in from_ckpt)
    # blocks 1-4: patch embedding + transformer blocks; 5-6: the up-projection stages (the heads apart)
    assert [b.share for b in report.blocks] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert report.dropped == {"pretraining decoder and heads (nnssl)":
                              sum(not k.startswith(("eva.", "down_projection.")) for k in pt)}
    assert "positional embedding interpolated (trilinear) from the token grid [4, 4, 4] to [2, 2, 2]" in report.text()
    # the loader the trainers use leaves everything else as nnU-Net initialised it
    net2 = primus_network(arch, channels=2, seed=4)
    load_nnssl_encoder(net2, path)
    assert all(torch.equal(v, state[k]) for k, v in net2.state_dict().items())


def test_primus_checkpoints_are_refused_in_one_line(primus_ckpt, tmp_path, ckpt):
    from nnssl_ckpt import TINY_PRIMUS, primus_adaptation_plan, write_nnssl_primus_checkpoint

    path, pt, raw = primus_ckpt
    arch = read_plan(raw).architecture()
    cases = []
    # weights of the tiny Primus under a plan naming PrimusS
    p1, _, _ = write_nnssl_primus_checkpoint(tmp_path / "mislabelled.pth")
    mislabelled = read_checkpoint(p1, trust=False)
    mislabelled["nnssl_adaptation_plan"] = primus_adaptation_plan(arch_class_name="PrimusS")
    torch.save(mislabelled, p1)
    cases.append((lambda: map_checkpoint(load_weights(p1), primus_network(arch)), DataError,
                  "its tensors are a Primus of embed_dim 48, 4 transformer blocks and a [8, 8, 8] patch embedding, "
                  "but its plan names PrimusS (embed_dim 396, 12 blocks"))
    cases.append((lambda: map_checkpoint(load_weights(path), target_network(read_plan(ckpt[2]).architecture())),
                  ArchitectureError, "holds a Primus transformer (Primus) and the target network is a "
                                     "ResidualEncoderUNet"))
    cases.append((lambda: map_checkpoint(load_weights(ckpt[0]), primus_network(arch)), ArchitectureError,
                  "holds a convolutional U-Net (ResidualEncoderUNet) and the target network is a Primus"))
    for call, error, message in cases:
        with pytest.raises(error) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    plan_cases = [
        (dict(arch_class_name="Primus", arch_kwargs=None), DataError, "the class Primus needs its kwargs"),
        (dict(arch_class_name="Primus", arch_kwargs={**TINY_PRIMUS, "depth": 3}), ArchitectureError,
         "has ['depth'], which Primus of dynamic-network-architectures does not take"),
        (dict(arch_class_name="Primus", arch_kwargs={**TINY_PRIMUS, "eva_numheads": 5}), DataError,
         "embed_dim 48 is not divisible by eva_numheads 5"),
        (dict(arch_class_name="PrimusV2S"), ArchitectureError, "arch_class_name is 'PrimusV2S', which nnU-Net 2.8.1"),
        (dict(arch_class_name="Primus", arch_kwargs=TINY_PRIMUS, patch=(36, 32, 32)), DataError,
         "[36, 32, 32] is not a multiple of the patch embedding [8, 8, 8]"),
    ]
    for kw, error, message in plan_cases:
        with pytest.raises(error) as e:
            read_plan(primus_adaptation_plan(**kw), path="x.pth")
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    no_lpe = primus_adaptation_plan(arch_kwargs=TINY_PRIMUS)
    no_lpe["key_to_lpe"] = None
    with pytest.raises(DataError, match="key_to_lpe is null: a Primus checkpoint names its positional embedding"):
        read_plan(no_lpe, path="x.pth")


@pytest.fixture
def primus_env(tmp_path, monkeypatch, primus_ckpt) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "pre" / TGT).mkdir()
    (tmp_path / "pre" / TGT / "nnUNetPlans.json").write_text(json.dumps(primus_plans(
        read_plan(primus_ckpt[2]).architecture())))
    (tmp_path / "pre" / TGT / "dataset.json").write_text(json.dumps(dataset_json(1)))
    return tmp_path


def test_the_commands_take_a_primus_checkpoint(primus_env, primus_ckpt, capsys):
    """plans from-checkpoint writes the class Primus with explicit sizes and the recommended patch; weights check /
    adapt report per block; the adapted file is what nnU-Net's own loader takes."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    path, pt, raw = primus_ckpt
    plans_file = primus_env / "pre" / TGT / "nnUNetPlans.json"
    assert main(["plans", "from-checkpoint", "-d", "902", "-c", str(path), "-n", "ssl", "--patch-size",
                 "16,16,24"]) == 0
    printed = capsys.readouterr().out
    conf = json.loads(plans_file.read_text())["configurations"]["ssl"]
    assert conf == {"inherits_from": "3d_fullres", "architecture": read_plan(raw).architecture(),
                    "patch_size": [16, 16, 24], "batch_size": 2}
    assert conf["architecture"]["arch_kwargs"] == {"embed_dim": 48, "patch_embed_size": [8, 8, 8], "eva_depth": 4,
                                                   "eva_numheads": 2}
    assert "architecture dynamic_network_architectures.architectures.primus.Primus, patch size [16, 16, 24]" in printed
    assert main(["plans", "from-checkpoint", "-d", "902", "-c", str(path), "-n", "ssl2", "--patch-size",
                 "16,16,20"]) == 2
    err = capsys.readouterr().err
    assert "axis 2 is not divisible by 8 (the patch embedding is [8, 8, 8]); e.g. --patch-size 16,16,16" in err
    assert err.count("\n") == 1
    assert main(["weights", "check", str(path), "-d", "902", "-c", "ssl"]) == 0
    printed = capsys.readouterr().out
    assert "nnssl encoder + stem:" in printed and "OK: -pretrained_weights" in printed
    out = primus_env / "adapted.pth"
    assert main(["weights", "adapt", str(path), "-d", "902", "-c", "ssl", "-o", str(out), "--seed", "3"]) == 0
    saved = read_checkpoint(out, trust=False)
    assert saved[ADAPTED_KEY]["origin"] == "nnssl"
    plans = json.loads(plans_file.read_text())
    torch.manual_seed(9)
    net = build_network(plans, "ssl", dataset_json(1))
    load_pretrained_weights(net, str(out))
    torch.manual_seed(3)
    fresh = build_network(plans, "ssl", dataset_json(1)).state_dict()
    for k, v in net.state_dict().items():
        if k.startswith(("eva.blocks.", "down_projection.")):
            assert torch.equal(v, pt[k]), k
        elif k.startswith("up_projection."):
            assert torch.equal(v, fresh[k]), k
