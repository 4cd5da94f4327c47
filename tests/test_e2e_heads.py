"""Pretrained segmentation heads through the real ``nnUNetv2_train`` (setting ``heads``; Karimi's second
frozen-decoder variant, ``nnUNetTrainerFrozenDecoderAndHeads``; Amiri's presets without block 2N−1, which keep
the pretrained output layer frozen).

Target 903 has the source's images style and labels plus one the source never saw (``cyst``): a
fine-tune with ``heads=by-name`` keeps background, organ and lesion from the source model and gives the
new label nnU-Net's fresh initialisation.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from nnunet_transfer.trainers import nnUNetTrainerFinetune
from nnunet_transfer.training.pretrained import target_network

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, assert_one_line_error, load_checkpoint
from test_e2e_freezing import parameters

pytestmark = pytest.mark.slow

PLUS_ID = 903
SETTINGS = {**QUICK_SETTINGS, "num_epochs": 1}


def heads_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".seg_layers." in k and ".all_modules." not in k}


@pytest.fixture(scope="module")
def plus(workspace):
    """Dataset 903 (4 labels; 5 cases, the fewest nnU-Net's default 5-fold split takes) preprocessed with the
    source's plans."""
    ws = workspace
    ws.add_target(PLUS_ID, "TargetPlus", n_train=5, seed=5, label_distractors=True)
    return ws


def test_by_name_keeps_known_classes_and_adds_a_new_one(plus):
    ws = plus
    ws.configure(PLUS_ID, TINY, "heads", {**SETTINGS, "heads": "by-name"})
    fold = ws.train(PLUS_ID, "heads", "nnUNetTrainerFinetune", pretrained=ws.source_checkpoint)
    source = heads_of(load_checkpoint(ws.source_checkpoint)["network_weights"])
    start = heads_of(torch.load(fold / "start_weights.pth", weights_only=False)["network_weights"])
    assert source.keys() == start.keys() and len(start) == 4  # 2 deep-supervision heads x (weight, bias)
    for k in start:
        assert start[k].shape[0] == 4 and source[k].shape[0] == 3
        assert torch.equal(start[k][:3], source[k]), k  # background, organ, lesion: the source's rows
    # cyst keeps nnU-Net's initialisation: the network the trainer builds with seed 0 (same calls, CPU)
    plans = json.loads((ws.root / "preprocessed" / ws.dataset_name(PLUS_ID) / "nnUNetPlans.json").read_text())
    dj = json.loads((ws.root / "preprocessed" / ws.dataset_name(PLUS_ID) / "dataset.json").read_text())
    torch.manual_seed(0)
    fresh = heads_of(target_network(nnUNetTrainerFinetune, plans, "heads", dj).state_dict())
    for k in start:
        assert torch.equal(start[k][3], fresh[k][3]), k
        if k.endswith(".weight"):  # (biases start at zero either way)
            assert not torch.equal(start[k][:3], fresh[k][:3])
    info = json.loads((fold / "transfer_config.json").read_text())
    assert [(c["target"], c["source"]) for c in info["heads"]["copied"]] == [
        ("background", "background"), ("organ", "organ"), ("lesion", "lesion")]
    assert info["heads"]["new"] == ["cyst"]
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "heads (by-name): copied background <- background, organ <- organ, lesion <- lesion; new: cyst" in log


def test_encoder_only_variant_keeps_decoder_and_heads_bit_identical(workspace, tmp_path):
    ws = workspace
    ws.configure(TARGET_ID, TINY, "fdh", SETTINGS)
    fold = ws.train(TARGET_ID, "fdh", "nnUNetTrainerFrozenDecoderAndHeads", pretrained=ws.source_checkpoint)
    source = load_checkpoint(ws.source_checkpoint)["network_weights"]
    final = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    fixed = [k for k in source if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert any(".seg_layers." in k for k in fixed) and any(".transpconvs." in k for k in fixed)
    changed = [k for k in fixed if not torch.equal(final[k], source[k])]
    assert not changed, changed  # decoder AND heads are the source's, bit for bit
    assert any(not torch.equal(final[k], source[k]) for k in source if k.startswith("encoder.") and
               k.endswith("conv.weight"))
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["parameters"]["seg_trainable"] is False and info["heads"]["new"] == []
    assert info["drift"]["decoder"] == 0.0 and info["drift"]["seg"] == 0.0 and info["drift"]["encoder"] > 0
    out = ws.predict(TARGET_ID, "fdh", "nnUNetTrainerFrozenDecoderAndHeads", tmp_path / "pred")
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_amiri_preset_without_block_2n_minus_1_keeps_the_pretrained_heads_frozen_compiled(workspace):
    # Amiri's "block 1" strategy: the 1x1 output layer is part of block 2N-1 (= 5 here), which it leaves out, so
    # the heads are the source's and stay so -- through nnU-Net's torch.compile path, with one output (no deep
    # supervision: the paper's network has one)
    ws = workspace
    ws.configure(TARGET_ID, TINY, "amiri_first", {**SETTINGS, "deep_supervision": False})
    fold = ws.train_compiled(TARGET_ID, "amiri_first", "nnUNetTrainerPartialFT_first", pretrained=ws.source_checkpoint)
    source = parameters(load_checkpoint(ws.source_checkpoint)["network_weights"])
    final = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    assert final.keys() == source.keys()
    heads = [k for k in source if ".seg_layers." in k]
    assert len(heads) == 4 and all(torch.equal(final[k], source[k]) for k in heads)  # bit for bit
    block1 = [k for k in source if k.startswith("encoder.stages.0.")]
    assert all(not torch.equal(final[k], source[k]) for k in block1 if k.endswith("conv.weight"))
    assert all(torch.equal(final[k], source[k]) for k in source if k not in block1)  # blocks 2-5 frozen too
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["settings"]["freeze_seg"] is True and info["settings"]["heads"] == "by-name"
    assert info["parameters"]["seg_trainable"] is False and info["parameters"]["trainable_blocks"] == [1]
    assert [c["target"] for c in info["heads"]["copied"]] == ["background", "organ", "lesion"]
    assert info["drift"]["seg"] == 0.0 and info["drift"]["decoder"] == 0.0
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Using torch.compile..." in log
    assert "heads (by-name): copied background <- background, organ <- organ, lesion <- lesion; new: none" in log
    assert json.loads((fold / "debug.json").read_text())["enable_deep_supervision"] == "False"


def test_drift_figures_equal_an_independent_computation(workspace):
    ws = workspace
    fold = ws.fold_folder(TARGET_ID, "fdh", "nnUNetTrainerFrozenDecoderAndHeads")
    start = torch.load(fold / "start_weights.pth", weights_only=False)["network_weights"]
    final = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    enc = [k for k in start if k.startswith("encoder.") and ".all_modules." not in k]
    num = sum(float(((final[k].double() - start[k].double()) ** 2).sum()) for k in enc)
    den = sum(float((start[k].double() ** 2).sum()) for k in enc)
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["drift"]["encoder"] == pytest.approx((num / den) ** 0.5, rel=1e-12)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "moved from the start, ||theta - theta_0|| / ||theta_0||: encoder " in log


# refused while nnU-Net builds the trainer (get_trainer_from_args), all in one process (Workspace.refusals);
# tests/test_e2e_errors.py runs such refusals through the real nnUNetv2_train as well
BAD = [  # dataset, configuration, trainer, settings, -pretrained_weights ("bare": no init_args), message
    (TARGET_ID, "badheads0", "nnUNetTrainerFinetune", {"heads": {"organ": "liver"}}, "source",
     "setting 'heads': source label 'liver' does not exist in the checkpoint's dataset.json"),
    (TARGET_ID, "badheads1", "nnUNetTrainerFinetune", {"heads": {"spleen": "organ"}}, "source",
     "setting 'heads': target label 'spleen' does not exist in the target's dataset.json"),
    (PLUS_ID, "badheads2", "nnUNetTrainerFrozenDecoderAndHeads", {}, "source",
     "nnUNetTrainerFrozenDecoderAndHeads freezes the segmentation heads, but target label(s) cyst have no row"),
    (TARGET_ID, "badheads3", "nnUNetTrainerFinetune", {"heads": "by-name"}, "bare",
     "heads=by-name needs the source's label names, but {bare} holds no dataset.json (nnU-Net stores it in the "
     "checkpoint's init_args['dataset_json'])"),
    # Amiri without block 2N-1: the frozen output layer has no row for cyst
    (PLUS_ID, "amiri_cyst", "nnUNetTrainerPartialFT_contracting", {}, "source",
     "nnUNetTrainerPartialFT_contracting freezes the segmentation heads at the pretrained weights (Amiri et al.: the "
     "output layer belongs to block 2N-1, which this strategy leaves out), but target label(s) cyst have no row in "),
]


@pytest.fixture(scope="module")
def refused(plus, tmp_path_factory):
    ws = plus
    bare = tmp_path_factory.mktemp("bare") / "bare.pth"
    torch.save({"network_weights": load_checkpoint(ws.source_checkpoint)["network_weights"]}, bare)
    weights = {"source": ws.source_checkpoint, "bare": bare}
    commands = [["nnUNetv2_train", d, c, 0, "-tr", t, "-device", "cpu", "-pretrained_weights", weights[w]]
                for d, c, t, _, w, _ in BAD]
    with contextlib.ExitStack() as stack:
        for dataset in {d for d, *_ in BAD}:
            stack.enter_context(ws.unchecked_configurations(
                dataset, TINY, {c: {**SETTINGS, **s} for d, c, _, s, _, _ in BAD if d == dataset}))
        return ws.refusals(commands), bare


@pytest.mark.parametrize("i", range(len(BAD)), ids=[b[1] for b in BAD])
def test_bad_head_settings_stop_before_any_folder(plus, refused, i):
    dataset, configuration, trainer, _, _, message = BAD[i]
    printed, bare = refused
    assert_one_line_error(printed[i], message.format(bare=bare))
    if "Amiri" in message:  # the way out: a mapping, or new heads that train
        assert printed[i].rstrip().endswith("Fix: map them (nnunet_transfer configure ... --set heads=TARGET:SOURCE,"
                                            "...), or train new heads with --set freeze_seg=false (not the paper's "
                                            "strategy)"), printed[i]
    assert not plus.fold_folder(dataset, configuration, trainer).parent.exists()
