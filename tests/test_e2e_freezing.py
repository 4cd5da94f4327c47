"""Freezing strategies end to end through nnUNetv2_train / nnUNetv2_predict on generated data.

For each strategy: every frozen parameter in checkpoint_final.pth is bit-identical to its value at the
start of training (random init or pretrained), trainable ones moved; the same after a ``--c`` resume.
Expected frozen sets come from prefix rules written here, independent of the block model.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, assert_one_line_error, load_checkpoint

pytestmark = pytest.mark.slow

SETTINGS = {**QUICK_SETTINGS, "snapshot_every": 1}


def parameters(state: dict) -> dict:
    # state_dict holds aliases of the same tensors (decoder.encoder.* is the encoder, every conv is also
    # all_modules.k); the canonical parameter names are the others
    return {k: v for k, v in state.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}


# tiny network: N = 3 stages -> blocks 1,2 encoder, 3 bottleneck, 4,5 decoder (decoder index 0 = block 4)
FROZEN_RULES = {
    "nnUNetTrainerFrozenEncoder": lambda k: k.startswith("encoder."),
    "nnUNetTrainerFrozenDecoder": lambda k: k.startswith(("decoder.stages.", "decoder.transpconvs.")),
    "nnUNetTrainerPartialFT_firstLast": lambda k: not k.startswith(
        ("encoder.stages.0.", "decoder.stages.1.", "decoder.transpconvs.1.", "decoder.seg_layers.")),
}


def check_frozen(final: dict, start: dict, is_frozen) -> None:
    final, start = parameters(final), parameters(start)
    assert final.keys() == start.keys()
    frozen = [k for k in final if is_frozen(k)]
    trainable = [k for k in final if not is_frozen(k)]
    assert frozen and trainable
    changed_frozen = [k for k in frozen if not torch.equal(final[k], start[k])]
    assert not changed_frozen, f"frozen parameters changed: {changed_frozen}"
    assert any(not torch.equal(final[k], start[k]) for k in trainable if k.endswith("weight"))
    assert all(not torch.equal(final[k], start[k]) for k in trainable if k.endswith("conv.weight"))


# trainers whose heads come from the checkpoint (heads=by-name by default) and train
HEADS_FROM_SOURCE = {"nnUNetTrainerFrozenDecoder", "nnUNetTrainerPartialFT_firstLast"}

CASES = [
    # (trainer, configuration, pretrained)
    ("nnUNetTrainerFrozenEncoder", "fe_random", False),
    ("nnUNetTrainerFrozenEncoder", "fe_pretrained", True),
    ("nnUNetTrainerFrozenDecoder", "fd", True),
    ("nnUNetTrainerPartialFT_firstLast", "pft", True),
]


@pytest.mark.parametrize("trainer, configuration, pretrained", CASES, ids=[c[1] for c in CASES])
def test_frozen_parameters_stay_bit_identical_and_survive_resume(workspace, trainer, configuration,
                                                                 pretrained):
    ws = workspace
    ws.configure(TARGET_ID, TINY, configuration, SETTINGS)
    fold = ws.train(TARGET_ID, configuration, trainer,
                    pretrained=ws.source_checkpoint if pretrained else None)
    start = load_checkpoint(fold / "snapshots" / "epoch_0000.pth")["network_weights"]
    if pretrained:
        source = parameters(load_checkpoint(ws.source_checkpoint)["network_weights"])
        assert all(torch.equal(start[k], v) for k, v in source.items() if ".seg_layers." not in k)
    final = load_checkpoint(fold / "checkpoint_final.pth")
    check_frozen(final["network_weights"], start, FROZEN_RULES[trainer])
    if trainer in HEADS_FROM_SOURCE:
        # Karimi's "last layer" / Amiri's block 2N-1 (= 5) with its 1x1 output conv: the heads start as the
        # source's (by name: 901 and 902 share their labels) and train
        heads = [k for k in source if ".seg_layers." in k]
        assert heads and all(torch.equal(start[k], source[k]) for k in heads)
        assert any(not torch.equal(final["network_weights"][k], start[k]) for k in heads)
        assert json.loads((fold / "transfer_config.json").read_text())["heads"]["new"] == []
    if trainer == "nnUNetTrainerFrozenDecoder":  # Karimi halves the initial LR of every transfer run
        assert final["logging"]["lrs"][0] == pytest.approx(0.005)

    info = json.loads((fold / "transfer_config.json").read_text())
    p = info["parameters"]
    n_frozen = sum(v.numel() for k, v in parameters(start).items() if FROZEN_RULES[trainer](k))
    assert (p["frozen"], p["trainable"] + p["frozen"]) == (n_frozen,
                                                          sum(v.numel() for v in parameters(start).values()))
    assert info["pretrained_loaded"] is pretrained
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"trainable parameters {p['trainable']:,} of {p['total']:,} (frozen {p['frozen']:,})" in log
    if trainer == "nnUNetTrainerFrozenEncoder":
        assert ("encoder frozen at the PRETRAINED weights" if pretrained
                else "encoder frozen at its RANDOM initialisation (seed=0)") in log

    # resume for one more epoch: the frozen set is the same and still untouched
    ws.configure(TARGET_ID, TINY, configuration, {**SETTINGS, "num_epochs": 3})
    ws.train(TARGET_ID, configuration, trainer, cont=True)
    resumed = load_checkpoint(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 3
    check_frozen(resumed["network_weights"], start, FROZEN_RULES[trainer])
    moved = [k for k in parameters(final["network_weights"])
             if not FROZEN_RULES[trainer](k) and k.endswith("conv.weight")
             and not torch.equal(final["network_weights"][k], resumed["network_weights"][k])]
    assert moved, "the resumed epoch did not train"
    assert resumed["nnunet_transfer"]["parameters"] == final["nnunet_transfer"]["parameters"]


def test_random_frozen_encoder_is_reproducible_with_seed(workspace, karimi):
    # the from-scratch start of another trainer with the same seed has the same random encoder: the start
    # snapshot of the Karimi smoke study's scratch runs (nnUNetTrainerTransferBase, seed 0, snapshot_every 1, the
    # same tiny network on 912; trained once in the session, tests/conftest.py), not a training of its own
    from nnunet_transfer.study.state import results_folder

    ws = workspace
    scratch = [r for r in karimi["runs"] if r.strategy.name == "scratch"]
    assert scratch and all(r.trainer == "nnUNetTrainerTransferBase" for r in scratch)
    fold = results_folder(karimi["study"], scratch[0])
    assert load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]["settings"]["seed"] == 0
    other = ws.fold_folder(TARGET_ID, "fe_random", "nnUNetTrainerFrozenEncoder")
    a = load_checkpoint(fold / "snapshots" / "epoch_0000.pth")["network_weights"]
    b = load_checkpoint(other / "snapshots" / "epoch_0000.pth")["network_weights"]
    assert all(torch.equal(a[k], b[k]) for k in parameters(a))


def test_predict_with_frozen_encoder_trainer(workspace, tmp_path):
    out = workspace.predict(TARGET_ID, "fe_random", "nnUNetTrainerFrozenEncoder", tmp_path / "pred")
    assert len(list(out.glob("*.nii.gz"))) == len(list((workspace.root / "raw" / workspace.target /
                                                         "imagesTs").glob("*.nii.gz")))


# the refusals below are built by nnU-Net's own get_trainer_from_args, all in one process
# (Workspace.refusals); tests/test_e2e_errors.py and test_e2e_finetune.py run such refusals through the
# real nnUNetv2_train as well (one line on stderr, non-zero exit, no folder)
BAD = [  # configuration, its settings, trainer, the message
    ("fd_nopre", {}, "nnUNetTrainerFrozenDecoder",
     "nnUNetTrainerFrozenDecoder keeps the PRETRAINED decoder frozen, but no pretrained weights were loaded; add "
     "-pretrained_weights SOURCE_CHECKPOINT"),
    ("badspec0", {}, "nnUNetTrainerPartialFT", "nnUNetTrainerPartialFT needs the setting 'trainable'"),
    ("badspec1", {"trainable": "blocks:1,7"}, "nnUNetTrainerPartialFT",
     "setting 'trainable': block 7 in spec 'blocks:1,7' is out of range: valid range 1..5"),
    ("badspec2", {"trainable": "middle"}, "nnUNetTrainerPartialFT", "setting 'trainable': unknown term 'middle'"),
    ("badspec3", {}, "nnUNetTrainerPartialFT_outer",
     "setting 'trainable': preset 'outer' ({1,2,2N-2,2N-1}) needs a network with at least 4 stages"),
    # Amiri without block 2N-1 keeps the PRETRAINED output layer frozen: no checkpoint, or random heads, is refused
    ("amiri_nopre", {}, "nnUNetTrainerPartialFT_first",
     "nnUNetTrainerPartialFT_first keeps the segmentation heads frozen at the PRETRAINED weights, but no "
     "-pretrained_weights was given; add -pretrained_weights SOURCE_CHECKPOINT (or train new heads: --set "
     "freeze_seg=false heads=new, which is not the paper's strategy)"),
    ("amiri_new", {"heads": "new"}, "nnUNetTrainerPartialFT_bottleneck",
     "nnUNetTrainerPartialFT_bottleneck freezes the segmentation heads at the pretrained weights (Amiri et al.: the "
     "output layer belongs to block 2N-1, which this strategy leaves out), so they must come from the checkpoint, "
     "but heads=new would freeze random heads"),
]


@pytest.fixture(scope="module")
def refused(workspace):
    ws = workspace
    # configure would refuse some of them: written unchecked, to test the trainers' own checks
    with ws.unchecked_configurations(TARGET_ID, TINY, {c: {**SETTINGS, **s} for c, s, _, _ in BAD}):
        return ws.refusals([["nnUNetv2_train", TARGET_ID, c, 0, "-tr", t, "-device", "cpu"] for c, _, t, _ in BAD])


@pytest.mark.parametrize("i", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_trainable_specs_and_missing_weights_fail_before_training(workspace, refused, i):
    configuration, _, trainer, message = BAD[i]
    assert_one_line_error(refused[i], message)
    assert not workspace.fold_folder(TARGET_ID, configuration, trainer).parent.exists()
