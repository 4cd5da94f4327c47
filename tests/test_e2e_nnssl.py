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


def test_every_strategy_from_an_nnssl_resenc_checkpoint_through_the_stock_cli(workspace, tmp_path):
    """PartialFT (a block range), Staged (across --c), L2-SP and LoRA (nnU-Net's torch.compile path forced, and
    --c) on the encoder and stem of an nnssl ResEnc checkpoint: what each strategy freezes or anchors is the
    checkpoint's, bit for bit, after training and after --c; the decoder, which the checkpoint did not bring,
    trains in full under every strategy."""
    ws = workspace
    ckpt, pt, _ = write_nnssl_checkpoint(tmp_path / "nnssl_resenc.pth", features=(8, 16, 32), seed=5)
    encoder = [k for k in parameters(pt) if k.startswith("encoder.")]

    # PartialFT, blocks 3-5 trainable: blocks 1-2 (stem + stage 0, stage 1) frozen at the checkpoint's
    from_checkpoint(TARGET_ID, ckpt, "nnssl_pft", settings={**ONE_EPOCH, "trainable": "blocks:3-5"})
    fold = ws.train(TARGET_ID, "nnssl_pft", "nnUNetTrainerPartialFT", pretrained=ckpt)
    final = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    frozen = [k for k in encoder if k.startswith(("encoder.stem.", "encoder.stages.0.", "encoder.stages.1."))]
    block3 = [k for k in encoder if k.startswith("encoder.stages.2.") and k.endswith("conv.weight")]
    assert frozen and block3 and all(torch.equal(final[k], pt[k]) for k in frozen)
    assert all(not torch.equal(final[k], pt[k]) for k in block3)
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["parameters"]["frozen"] == sum(pt[k].numel() for k in frozen)

    # Staged, decoder + heads first: one epoch (encoder still the checkpoint's), then --c into the second stage
    from_checkpoint(TARGET_ID, ckpt, "nnssl_staged", settings={**ONE_EPOCH, "stages": [["decoder+seg", 1],
                                                                                        ["all", None]]})
    fold = ws.train(TARGET_ID, "nnssl_staged", "nnUNetTrainerStaged", pretrained=ckpt)
    first = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    assert all(torch.equal(first[k], pt[k]) for k in encoder)
    from_checkpoint(TARGET_ID, ckpt, "nnssl_staged", force=True,
                    settings={**ONE_EPOCH, "num_epochs": 2, "stages": [["decoder+seg", 1], ["all", None]]})
    ws.train(TARGET_ID, "nnssl_staged", "nnUNetTrainerStaged", cont=True)
    second = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    assert all(not torch.equal(second[k], pt[k]) for k in encoder if k.endswith("conv.weight"))
    assert [e["stage"] for e in json.loads((fold / "stages_log.json").read_text())] == [1, 2]

    # L2-SP: the anchor is the checkpoint's encoder; the decoder (not from the checkpoint) is not anchored; the
    # penalty logged after the epoch is alpha * ||theta - checkpoint||^2 over the anchor, computed here apart
    from_checkpoint(TARGET_ID, ckpt, "nnssl_l2sp", settings=ONE_EPOCH)
    fold = ws.train(TARGET_ID, "nnssl_l2sp", "nnUNetTrainerL2SP", pretrained=ckpt)
    saved = load_checkpoint(fold / "checkpoint_final.pth")
    anchor = saved["nnunet_transfer"]["l2sp_anchor"]
    assert sorted(anchor) == sorted(encoder) and all(torch.equal(anchor[k], pt[k]) for k in encoder)
    weights = parameters(saved["network_weights"])
    alpha = json.loads((fold / "transfer_config.json").read_text())["settings"]["l2sp_alpha"]
    expected = alpha * sum(float(((weights[k].double() - pt[k].double()) ** 2).sum()) for k in encoder)
    logged = json.loads((fold / "l2sp_log.json").read_text())[-1]["penalty"]
    assert expected > 0 and logged == pytest.approx(expected, rel=1e-9)

    # LoRA through the compiled path: base kernels of the encoder are the checkpoint's after training and --c
    lora = {**ONE_EPOCH, "lora_rank": 2, "lora_alpha": 4.0}
    from_checkpoint(TARGET_ID, ckpt, "nnssl_lora", settings=lora)
    fold = ws.train_compiled(TARGET_ID, "nnssl_lora", "nnUNetTrainerLoRA", pretrained=ckpt)
    state = load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]["lora_state"]
    assert state and all(layer.startswith("encoder.") for layer in state)
    assert all(torch.equal(s["weight"], pt[f"{layer}.weight"]) for layer, s in state.items())
    assert any(bool(s["lora_B"].any()) for s in state.values())
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["lora"]["convs_not_transferred"] > 0  # the decoder's convs train in full, without adapters
    from_checkpoint(TARGET_ID, ckpt, "nnssl_lora", settings={**lora, "num_epochs": 2}, force=True)
    ws.train_compiled(TARGET_ID, "nnssl_lora", "nnUNetTrainerLoRA", cont=True)
    resumed = load_checkpoint(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 2
    after = resumed["nnunet_transfer"]["lora_state"]
    assert all(torch.equal(s["weight"], pt[f"{layer}.weight"]) for layer, s in after.items())
    assert any(not torch.equal(after[layer]["lora_B"], state[layer]["lora_B"]) for layer in state)
