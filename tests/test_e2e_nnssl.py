"""End to end with an nnssl checkpoint as the source, through nnU-Net's own programs.

A tiny ResidualEncoderUNet checkpoint in nnssl's format (tests/nnssl_ckpt.py: the pretraining network, one
input channel, the adaptation plan as nnssl writes it) → ``plans from-checkpoint`` writes the target's
configuration (the checkpoint's architecture and recommended patch size, the target's 3d_fullres data) →
``nnUNetv2_train -tr nnUNetTrainerFrozenEncoder -pretrained_weights CKPT`` (1 epoch × 2 iterations): the network
as training started holds the checkpoint's encoder and stem bit for bit and a decoder of its own; the frozen
encoder is still the checkpoint's after training and after ``--c``; ``nnUNetv2_predict`` runs on the result.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TARGET_ID, load_checkpoint
from nnssl_ckpt import write_nnssl_checkpoint
from nnunet_transfer.plans.from_checkpoint import from_checkpoint
from nnunet_transfer.training.snapshots import START_FILE

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerFrozenEncoder"
CONF = "nnssl_fe"
ONE_EPOCH = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
             "seed": 0, "final_validation": False}


def parameters(state: dict) -> dict:
    # decoder.encoder.* is the encoder and every conv is also all_modules.0: the canonical names only
    return {k: v for k, v in state.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}


def test_frozen_encoder_from_an_nnssl_checkpoint_through_the_stock_cli(workspace, tmp_path):
    ws = workspace
    ckpt, pt, _ = write_nnssl_checkpoint(tmp_path / "nnssl_resenc.pth", features=(8, 16, 32))
    result = from_checkpoint(TARGET_ID, ckpt, CONF, settings=ONE_EPOCH)
    assert result.patch_size == [32, 32, 32] and result.report.share < 1
    fold = ws.train(TARGET_ID, CONF, TRAINER, pretrained=ckpt)

    start = parameters(load_checkpoint(fold / START_FILE)["network_weights"])
    encoder = [k for k in start if k.startswith("encoder.")]
    decoder = [k for k in start if k.startswith(("decoder.stages.", "decoder.transpconvs."))]
    assert encoder and decoder
    assert all(torch.equal(start[k], pt[k]) for k in encoder)  # encoder and stem: the checkpoint's, bit for bit
    # the decoder is the target's own (nnU-Net's initialisation), not the pretraining network's decoder
    assert all(not torch.equal(start[k], pt[k]) for k in decoder if k.endswith(".weight"))

    final = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    assert all(torch.equal(final[k], pt[k]) for k in encoder)  # frozen: still the checkpoint's
    assert all(not torch.equal(final[k], start[k]) for k in decoder if k.endswith("conv.weight"))

    info = json.loads((fold / "transfer_config.json").read_text())
    n_encoder = sum(start[k].numel() for k in encoder)
    n_outside_heads = sum(v.numel() for k, v in start.items() if ".seg_layers." not in k)
    assert info["pretrained_loaded"] is True and info["pretrained_source"] == str(ckpt)
    assert info["transfer"]["origin"] == "nnssl"
    assert info["transfer"]["total"] == {"params": n_outside_heads, "from_source": n_encoder,
                                         "share": n_encoder / n_outside_heads}
    assert [b["share"] for b in info["transfer"]["blocks"]] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert info["parameters"]["frozen"] == n_encoder
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"encoder and stem of the nnssl checkpoint {ckpt}: " in log
    assert (f"pretrained weights loaded from {ckpt} (the encoder and stem of an nnssl checkpoint; the decoder and "
            f"heads as nnU-Net initialised them)") in log

    # --c: one more epoch; the frozen encoder is still the checkpoint's
    from_checkpoint(TARGET_ID, ckpt, CONF, settings={**ONE_EPOCH, "num_epochs": 2}, force=True)
    ws.train(TARGET_ID, CONF, TRAINER, cont=True)
    resumed = load_checkpoint(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 2
    weights = parameters(resumed["network_weights"])
    assert all(torch.equal(weights[k], pt[k]) for k in encoder)
    assert any(not torch.equal(weights[k], final[k]) for k in decoder if k.endswith("conv.weight"))

    out = ws.predict(TARGET_ID, CONF, TRAINER, tmp_path / "pred")
    cases = sorted(p.name for p in (ws.root / "raw" / ws.target / "imagesTs").glob("*_0000.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [c.replace("_0000.nii.gz", ".nii.gz") for c in cases]
