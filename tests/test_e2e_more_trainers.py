"""The trainers not covered elsewhere, through nnUNetv2_train / nnUNetv2_predict: the configurable
PartialFT (user block set) and L2-SP in Li et al.'s form."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, load_checkpoint
from test_e2e_freezing import FROZEN_RULES, check_frozen, parameters

pytestmark = pytest.mark.slow


def test_partialft_with_a_user_block_set_equals_the_firstlast_preset_rule(workspace):
    ws = workspace
    ws.configure(TARGET_ID, TINY, "pft_user", {**QUICK_SETTINGS, "snapshot_every": 1,
                                               "trainable": "blocks:1,5"})
    fold = ws.train(TARGET_ID, "pft_user", "nnUNetTrainerPartialFT", pretrained=ws.source_checkpoint)
    start = load_checkpoint(fold / "snapshots" / "epoch_0000.pth")["network_weights"]
    final = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    # blocks 1 and 2N-1 = 5 of the 3-stage network: the same set as the firstLast preset
    check_frozen(final, start, FROZEN_RULES["nnUNetTrainerPartialFT_firstLast"])
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["settings"]["trainable"] == "blocks:1,5"
    assert info["parameters"]["trainable_blocks"] == [1, 5] and info["parameters"]["seg_trainable"]


def test_l2sp_li_anchors_every_transferred_layer_and_predicts(workspace, tmp_path):
    ws = workspace
    ws.configure(TARGET_ID, TINY, "li", QUICK_SETTINGS)
    fold = ws.train(TARGET_ID, "li", "nnUNetTrainerL2SP_Li", pretrained=ws.source_checkpoint)
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    source = parameters(load_checkpoint(ws.source_checkpoint)["network_weights"])
    anchor = ckpt["nnunet_transfer"]["l2sp_anchor"]
    # Li et al.'s reference implementation: alpha on the conv kernels of everything that was transferred
    # (all but the heads; not biases, not norm parameters), beta on the new heads
    assert set(anchor) == {k for k, v in source.items() if ".seg_layers." not in k and v.ndim >= 3}
    assert ckpt["nnunet_transfer"]["settings"]["l2sp_anchor"] == "kernels"
    assert all(torch.equal(anchor[k], source[k]) for k in anchor)
    assert ckpt["nnunet_transfer"]["settings"]["l2sp_beta"] == 0.005
    out = ws.predict(TARGET_ID, "li", "nnUNetTrainerL2SP_Li", tmp_path / "pred")
    assert len(list(out.glob("*.nii.gz"))) == len(list((ws.root / "raw" / ws.target / "imagesTs").glob("*.nii.gz")))
