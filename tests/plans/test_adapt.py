"""``weights adapt -d TARGET -c CONFIG``: the per-tensor plan against independent computations, nnU-Net's
loader taking the result, the report, and every refusal (nothing written). The kernel rules' laws:
``test_kernels.py``."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from nnunet_transfer.checkpoints import ADAPTED_KEY, LoadedWeights, load_weights, read_checkpoint
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ArchitectureError, ConfigError, TransferError
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.adapt import adapt_state, adapt_to_plans, report_path
from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.plans.provenance import fresh_names, record_text, transfer_record
from nnunet_transfer.plans.weights import adapt_first_conv

DATA = Path(__file__).parent.parent / "data"
TGT = "Dataset902_TransferTarget"


# --------------------------------------------------------------------------- networks
def base_plans() -> dict:
    return json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())


def dataset_json(channels: int = 1, labels: int = 3) -> dict:
    dj = json.loads((DATA / "dataset_ct2labels.json").read_text())
    dj["channel_names"] = {str(i): "CT" for i in range(channels)}
    dj["labels"] = {"background": 0, **{f"l{i}": i for i in range(1, labels)}}
    return dj


def plans_with(features, *, kernels=None, strides=None, patch=(32, 32, 32), arch=None) -> dict:
    """A 'net' configuration of the test plans with explicit features / kernels / strides (as a planner writes)."""
    plans = add_configuration(base_plans(), base="3d_fullres", new="net", features=",".join(map(str, features)),
                              patch=",".join(map(str, patch)))
    kw = plans["configurations"]["net"]["architecture"]["arch_kwargs"]
    if kernels is not None:
        kw["kernel_sizes"] = [list(k) for k in kernels]
    if strides is not None:
        kw["strides"] = [list(s) for s in strides]
    if arch == "resenc":
        a = plans["configurations"]["net"]["architecture"]
        a["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kw["n_blocks_per_stage"] = kw.pop("n_conv_per_stage")
    return plans


def network(plans, *, seed: int, channels: int = 1, labels: int = 3):
    torch.manual_seed(seed)
    return build_network(plans, "net", dataset_json(channels, labels))


SOURCE = dict(features=(8, 16, 32))
# what nnU-Net plans for 3 mm x 1 mm x 1 mm data: 1x3x3 at full resolution, z pooled later, one more stage
ANISO = dict(features=(8, 16, 32, 64), kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)],
             strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)], patch=(12, 32, 32))


def source_state(seed: int = 1, **kw):
    return network(plans_with(**{**SOURCE, **kw}), seed=seed).state_dict()


def canonical_params(net) -> dict[str, torch.Tensor]:
    return dict(net.named_parameters())


def test_same_plans_copies_every_tensor_bit_for_bit():
    src = source_state()
    target = network(plans_with(**SOURCE), seed=0)
    state, report = adapt_state(src, target)
    assert set(state) == set(target.state_dict())
    assert all(torch.equal(state[k], src[k]) for k in state)
    assert report.share == 1.0 and all(b.share == 1.0 for b in report.blocks)
    assert {t.action for t in report.tensors} == {"copied", "head"}
    assert report.heads["carried"] == len([n for n in canonical_params(target) if ".seg_layers." in n])
    assert report.dropped == {}


def test_own_plans_target_follows_the_rules_tensor_by_tensor(tmp_path):
    src = source_state()
    plans = plans_with(**ANISO)
    fresh = canonical_params(network(plans, seed=5))  # what seed 5 gives nnU-Net's initialisation
    target = network(plans, seed=5)
    state, report = adapt_state(src, target, seed=5)
    acts = {t.name: t for t in report.tensors}
    # the independent expectation, stage by stage (target 4 stages, source 3: decoder index shifts by -1)
    mapped_z = {"encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.1.conv.weight",
                "decoder.stages.2.convs.0.conv.weight", "decoder.stages.2.convs.1.conv.weight"}
    for name, p in canonical_params(target).items():
        if ".seg_layers." in name:
            continue
        got = state[name]
        if name.startswith(("encoder.stages.3.", "decoder.stages.0.", "decoder.transpconvs.0.")):
            assert acts[name].action == "new", name
            assert torch.equal(got, fresh[name]), name
            continue
        s_name = name
        for part in ("stages", "transpconvs"):
            prefix = f"decoder.{part}."
            if name.startswith(prefix):
                j = int(name[len(prefix):].split(".")[0])
                s_name = f"{prefix}{j - 1}.{name[len(prefix):].split('.', 1)[1]}"
        s = src[s_name]
        if name in mapped_z:
            assert acts[name].action == "mapped" and acts[name].reason == "axis 0 3->1 sum"
            torch.testing.assert_close(got, s.double().sum(2, keepdim=True).float(), rtol=0, atol=0)
        elif name == "decoder.transpconvs.2.weight":  # stride (2,2,2) -> (1,2,2): mean along z
            assert acts[name].action == "mapped" and acts[name].reason == "axis 0 2->1 mean"
            torch.testing.assert_close(got, s.double().mean(2, keepdim=True).float(), rtol=0, atol=0)
        else:
            assert acts[name].action == "copied", name
            assert torch.equal(got, s), name
    # per block: shares against an independent count
    params = canonical_params(target)
    new_count = sum(p.numel() for n, p in params.items()
                    if n.startswith(("encoder.stages.3.", "decoder.stages.0.", "decoder.transpconvs.0.")))
    outside_heads = sum(p.numel() for n, p in params.items() if ".seg_layers." not in n)
    assert report.params == outside_heads
    assert report.from_source == outside_heads - new_count
    assert report.share == pytest.approx((outside_heads - new_count) / outside_heads, abs=0)
    shares = {b.block: b.share for b in report.blocks}
    assert shares == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 1.0, 7: 1.0}
    assert report.dropped == {}
    assert sorted(fresh_names(report.to_dict())) == [4, 5]
    # nnU-Net's own loader takes it
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    torch.save({"network_weights": state}, tmp_path / "a.pth")
    load_pretrained_weights(network(plans, seed=9), str(tmp_path / "a.pth"))
    text = report.text()
    assert "total: " in text and f"{report.share:.1%}" in text and "tensor(" not in text
    assert "new, nnU-Net's initialisation with seed 5 (18 tensors): encoder.stages.3 (8), decoder.stages.0 (8), " \
           "decoder.transpconvs.0 (2)" in text


def test_fewer_target_stages_align_by_resolution_and_drop_the_rest():
    src = network(plans_with((8, 16, 32, 64), patch=(32, 32, 32)), seed=1).state_dict()
    target = network(plans_with((8, 16, 32)), seed=0)
    state, report = adapt_state(src, target)
    assert report.share == 1.0
    # the target's deepest decoder stage (index 0, level 1) is the source's decoder index 1
    for k in target.state_dict():
        if k.startswith("decoder.stages.0."):
            assert torch.equal(state[k], src[k.replace("decoder.stages.0.", "decoder.stages.1.")])
        if k.startswith("encoder.stages.2."):  # the target's bottleneck = the source's third encoder stage
            assert torch.equal(state[k], src[k])
    assert report.dropped == {"encoder.stages.3": 8, "decoder.stages.0": 8, "decoder.transpconvs.0": 2,
                              "decoder.seg_layers.0": 2}


def test_width_change_is_not_transferable_and_the_next_conv_is_reinitialised():
    src = source_state()
    target = network(plans_with((8, 24, 32)), seed=0)
    fresh = canonical_params(network(plans_with((8, 24, 32)), seed=0))
    state, report = adapt_state(src, target)
    acts = {t.name: t.action for t in report.tensors}
    assert all(acts[n] == "not_transferable" for n in acts if n.startswith("encoder.stages.1."))
    assert acts["encoder.stages.2.0.convs.0.conv.weight"] == "reinit"  # input 16 -> 24
    assert acts["encoder.stages.2.0.convs.0.conv.bias"] == "reinit"  # its bias with it
    assert acts["encoder.stages.2.0.convs.0.norm.weight"] == "copied"
    assert acts["encoder.stages.2.0.convs.1.conv.weight"] == "copied"
    assert acts["decoder.transpconvs.0.weight"] == "not_transferable"  # 32 -> 24 out
    assert acts["decoder.transpconvs.1.weight"] == "reinit"  # 24 in, 8 out
    assert acts["decoder.stages.1.convs.0.conv.weight"] == "copied"  # (8, 16): skip 8 + up 8 as before
    for n, a in acts.items():
        if a in ("reinit", "not_transferable"):
            assert torch.equal(state[n], fresh[n]), n
    rows = {b.block: b for b in report.blocks}
    assert rows[2].share == 0.0 and 0 < rows[3].share < 1
    assert rows[3].counts["reinit"] == 32 * 24 * 27 + 32  # the target's (32, 24, 3, 3, 3) conv and its bias
    assert "re-initialised (input width changed) (" in report.text()


def test_every_stage_of_another_width_is_refused():
    with pytest.raises(TransferError, match=r"nothing of checkpoint is transferable to target: no parameter outside "
                                            r"the segmentation heads came from the checkpoint \(every stage differs "
                                            r"in width, e.g. block 1: checkpoint \[8, 1, 3, 3, 3\] vs target "
                                            r"\[4, 1, 3, 3, 3\]"):
        adapt_state(source_state(), network(plans_with((4, 12, 20)), seed=0))


def test_another_family_is_refused():
    with pytest.raises(ArchitectureError, match=r"the checkpoint is a PlainConvUNet \(plain encoder, plain decoder\), "
                                                r"the target a ResidualEncoderUNet \(residual encoder, plain decoder\): "
                                                r"the encoder of different families"):
        adapt_state(source_state(), network(plans_with(SOURCE["features"], arch="resenc"), seed=0))
    flat = {k: v.flatten(2)[..., :3] if v.ndim == 5 else v for k, v in source_state().items()}  # 1-D convolutions
    with pytest.raises(ArchitectureError, match=r"the checkpoint is a 1-D network, the target 3-D"):
        adapt_state(flat, network(plans_with(**SOURCE), seed=0))
    with pytest.raises(ArchitectureError, match="holds no U-Net of dynamic-network-architectures"):
        adapt_state({"blocks.0.weight": torch.zeros(2, 2, 3)}, network(plans_with(**SOURCE), seed=0))


def test_input_channels_in_the_same_call():
    src = source_state()
    target = network(plans_with(**ANISO), seed=0, channels=2)
    with pytest.raises(ConfigError, match=r"first convolution takes 1 input channel\(s\), the target's 2: add "
                                          r"--in-channels 2"):
        adapt_state(src, target)
    with pytest.raises(ConfigError, match=r"--in-channels 3 does not match the target"):
        adapt_state(src, target, in_channels=3)
    state, report = adapt_state(src, target, in_channels=2, method="mean")
    first = "encoder.stages.0.0.convs.0.conv.weight"
    expected = adapt_first_conv(src[first], in_channels=2, method="mean").double().sum(2, keepdim=True).float()
    torch.testing.assert_close(state[first], expected, rtol=0, atol=0)
    assert {t.name: t.action for t in report.tensors}[first] == "channels"
    assert report.channels == [1, 2] and report.method == "mean"
    # the same kernel: channels only, and every other tensor copied
    state, report = adapt_state(src, network(plans_with(**SOURCE), seed=0, channels=2), in_channels=2)
    torch.testing.assert_close(state[first], adapt_first_conv(src[first], in_channels=2, method="repeat"),
                               rtol=0, atol=0)
    acts = {t.name: t for t in report.tensors}
    assert acts[first].action == "channels" and acts[first].reason == "channels 1->2 by 'repeat'"
    assert {t.action for n, t in acts.items() if n != first} == {"copied", "head"} and report.share == 1.0


def test_heads_are_carried_only_when_their_input_width_fits():
    src = source_state()
    target = network(plans_with((8, 16, 32)), seed=0, labels=5)
    state, report = adapt_state(src, target)
    assert torch.equal(state["decoder.seg_layers.1.weight"], src["decoder.seg_layers.1.weight"])  # 3 rows, not 5
    target = network(plans_with((8, 24, 32)), seed=0)
    state, report = adapt_state(src, target)
    assert "decoder.seg_layers.0.weight" not in state  # (3, 24) vs the source's (3, 16): not in the file
    assert torch.equal(state["decoder.seg_layers.1.weight"], src["decoder.seg_layers.1.weight"])


# --------------------------------------------------------------------------- the command, files and records
@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "pre" / TGT).mkdir()
    (tmp_path / "pre" / TGT / "nnUNetPlans.json").write_text(json.dumps(plans_with(**ANISO)))
    (tmp_path / "pre" / TGT / "dataset.json").write_text(json.dumps(dataset_json()))
    torch.save({"network_weights": source_state(), "init_args": {"dataset_json": dataset_json()},
                "trainer_name": "nnUNetTrainer"}, tmp_path / "source.pth")
    return tmp_path


def test_adapt_to_plans_writes_the_file_and_the_report_beside_it(env, capsys):
    out = env / "adapted.pth"
    rc = main(["weights", "adapt", str(env / "source.pth"), "-d", "902", "-c", "net", "-o", str(out), "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} and {env / 'adapted.report.json'}" in printed
    saved = read_checkpoint(out, trust=False)  # the report travels in the file as plain containers
    report = json.loads(report_path(out).read_text())
    assert saved[ADAPTED_KEY] == report and report["seed"] == 3 and report["kind"] == "adapted"
    assert report["source"] == str(env / "source.pth") and report["target"] == f"{TGT} / nnUNetPlans / net"
    _, expected = adapt_state(source_state(), network(plans_with(**ANISO), seed=3), seed=3)
    assert report["total"]["share"] == expected.share
    assert [b["share"] for b in report["blocks"]] == [b.share for b in expected.blocks]
    assert saved["init_args"] == {"dataset_json": dataset_json()}  # heads carried: labels for heads=by-name
    # fresh parts are nnU-Net's init with that seed
    fresh = network(plans_with(**ANISO), seed=3).state_dict()
    assert torch.equal(saved["network_weights"]["encoder.stages.3.0.convs.0.conv.weight"],
                       fresh["encoder.stages.3.0.convs.0.conv.weight"])
    # the trainers' record of it
    target = network(plans_with(**ANISO), seed=0)
    record = transfer_record(load_weights(out), target, loaded_keys=1)
    assert record["kind"] == "adapted" and record["total"] == report["total"]
    assert [b["fresh"] for b in record["blocks"]] == [b["fresh"] for b in report["blocks"]]
    assert record_text(record).startswith(f"weights adapted by `weights adapt` from {env / 'source.pth'}: "
                                          f"{expected.share:.1%} of the")
    assert "blocks not fully from it: 4 (0%), 5 (0%)" in record_text(record)
    # weights check agrees that -pretrained_weights takes it
    assert main(["weights", "check", str(out), "-d", "902", "-c", "net"]) == 0


def test_same_plans_record():
    target = network(plans_with(**SOURCE), seed=0)
    record = transfer_record(LoadedWeights(Path("x.pth"), source_state(), "network_weights"), target, loaded_keys=7)
    n = sum(p.numel() for k, p in target.named_parameters() if ".seg_layers." not in k)
    assert record == {"kind": "same-plans", "file": "x.pth", "loaded_keys": 7,
                      "total": {"params": n, "from_source": n, "share": 1.0}}
    assert fresh_names(record) == {}
    assert record_text(record) == ("same-plans load from x.pth: every tensor but the segmentation heads (7 "
                                   "state_dict keys)")


def _nothing_written(env: Path) -> bool:
    return not any(p.name.startswith("adapted") for p in env.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--min-share", "0.9"], r"only \d+\.\d% of the target's parameters outside the heads would come from the "
                             r"checkpoint, below --min-share 0.9 \(lowest: block 4 0%, block 5 0%, block 1 100%\); "
                             r"nothing written"),
    (["--min-share", "1.5"], r"--min-share must be a number in \[0, 1\]"),
    (["--seed", "-1"], r"--seed must be an integer >= 0, got -1"),
    (["-c", "nope"], r"configuration 'nope' is not in plans"),
])
def test_refusals_write_nothing(env, capsys, argv, message):
    args = ["weights", "adapt", str(env / "source.pth"), "-d", "902", "-c", "net", "-o", str(env / "adapted.pth")]
    assert main(args + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunet_transfer weights: error: ")
    assert re.search(message, err), err
    assert _nothing_written(env)


def test_family_refusal_writes_nothing(env, capsys):
    plans = plans_with(SOURCE["features"], arch="resenc")
    (env / "pre" / TGT / "nnUNetPlans.json").write_text(json.dumps(plans))
    assert main(["weights", "adapt", str(env / "source.pth"), "-d", "902", "-c", "net", "-o",
                 str(env / "adapted.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the checkpoint is a PlainConvUNet" in err and "ResidualEncoderUNet" in err
    assert _nothing_written(env)


def test_output_is_not_replaced_without_force(env, capsys):
    out = env / "adapted.pth"
    args = ["weights", "adapt", str(env / "source.pth"), "-d", "902", "-c", "net", "-o", str(out)]
    assert main(args) == 0
    report_path(out).unlink()
    out.write_bytes(b"mine")
    assert main(args) == 2
    assert f"{out} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"mine" and not report_path(out).exists()
    assert main(args + ["--force"]) == 0 and report_path(out).is_file()


@pytest.mark.parametrize("argv, message", [
    (["-c", "net"], "-c only apply when adapting to target plans: add -d TARGET -c CONFIG"),
    (["--min-share", "0.5", "--seed", "2"], "--seed, --min-share only apply when adapting to target plans"),
    (["-d", "902"], "-d TARGET needs -c CONFIG"),
])
def test_cli_flag_combinations(env, capsys, argv, message):
    assert main(["weights", "adapt", str(env / "source.pth"), "-o", str(env / "adapted.pth"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert _nothing_written(env)


def test_model_folder_as_the_checkpoint(env, capsys):
    model = env / "res" / "Dataset901_S" / "nnUNetTrainer__nnUNetPlans__net"
    (model / "fold_0").mkdir(parents=True)
    shutil.copy(env / "source.pth", model / "fold_0" / "checkpoint_final.pth")
    (model / "plans.json").write_text(json.dumps(plans_with(**SOURCE)))
    (model / "dataset.json").write_text(json.dumps(dataset_json()))
    out = env / "adapted.pth"
    assert main(["weights", "adapt", str(model), "-d", "902", "-c", "net", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(model / "fold_0" / "checkpoint_final.pth")
    (model / "fold_1").mkdir()
    shutil.copy(env / "source.pth", model / "fold_1" / "checkpoint_final.pth")
    assert main(["weights", "check", str(model), "-d", "902", "-c", "net"]) == 2
    assert f"model folder {model} has 2 trained folds (fold_0, fold_1); choose one, e.g. {model / 'fold_0'}" in \
        capsys.readouterr().err
    assert main(["weights", "check", str(model / "fold_1"), "-d", "902", "-c", "net"]) == 1  # other plans: FAIL
    assert "weights adapt" in capsys.readouterr().out


def test_adapt_to_plans_writes_both_files_or_neither(env, monkeypatch):
    """A failed save leaves neither the weights, nor the report, nor a temporary."""
    def fail(obj, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    out = env / "adapted.pth"
    with pytest.raises(OSError, match="disk full"):
        adapt_to_plans(env / "source.pth", out, dataset="902", configuration="net")
    assert sorted(p.name for p in env.iterdir() if p.is_file()) == ["source.pth"]
