"""An nnssl Primus checkpoint fine-tuned with every strategy, end to end through the stock CLI.

The source is a tiny nnssl pretraining checkpoint (tests/nnssl_ckpt.py: nnssl's EvaMAE — patch embedding, Eva
encoder, reconstruction decoder — pretrained on 32³ patches, the adaptation plan as nnssl's Eva trainers write
it). ``plans from-checkpoint --patch-size 16,16,16`` writes the target's Primus configuration; every run takes
``-pretrained_weights CKPT``, so the positional embedding is interpolated from the 4³ to the 2³ token grid and the
decoder (the up-projection) starts fresh. Per strategy, one epoch of two iterations:

* FrozenEncoder (nnU-Net's torch.compile path forced) and --c: patch embedding, positional embedding and
  transformer bit-identical to the mapped checkpoint after training and after --c;
* PartialFT ``blocks:3-6``: blocks 1-2 (the embeddings and the first two transformer blocks) frozen, block 3 moves;
* Staged ``decoder+seg:1,all``: the encoder the checkpoint's after the first stage, moved after --c into the second;
* L2-SP: the anchor is the mapped checkpoint, the logged penalty α‖θ − θ̄‖² computed here apart;
* LoRA, and --c: base kernels of every attention / MLP linear and of the patch embedding bit-identical to the
  checkpoint's, the decoder (not from the checkpoint) trained in full; the stock ``nnUNetv2_predict`` of the merged
  checkpoint_final predicts what the network with the adapters applied on the nnssl base (unmerged) predicts.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TARGET_ID, assert_same_probabilities, load_checkpoint, predict_with_network
from nnssl_ckpt import write_nnssl_primus_checkpoint
from nnunet_transfer.plans.from_checkpoint import from_checkpoint
from nnunet_transfer.training.snapshots import START_FILE
from plans.test_primus import master_interpolate_pos_embed

pytestmark = pytest.mark.slow

ONE_EPOCH = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
             "seed": 0, "final_validation": False}
ENCODER = ("down_projection.", "eva.")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint path, the stem and encoder a 16³ target must start from)."""
    path, pt, _ = write_nnssl_primus_checkpoint(tmp_path_factory.mktemp("nnssl") / "nnssl_primus.pth", seed=3)
    expected = {k: v for k, v in pt.items() if k.startswith(ENCODER)}
    expected["eva.pos_embed"] = master_interpolate_pos_embed(pt["eva.pos_embed"], pretrained_patch=(32, 32, 32),
                                                             patch=(16, 16, 16), patch_embed_size=(8, 8, 8))
    return path, expected


def configure(name: str, ckpt, settings: dict, **kw) -> None:
    from_checkpoint(TARGET_ID, ckpt, name, patch_size="16,16,16", settings={**ONE_EPOCH, **settings}, **kw)


def weights(fold, name: str = "checkpoint_final.pth") -> dict:
    return load_checkpoint(fold / name)["network_weights"]


def test_frozen_encoder_partial_and_staged_on_an_nnssl_primus(workspace, source):
    ws = workspace
    ckpt, expected = source
    configure("primus_fe", ckpt, {})
    fold = ws.train_compiled(TARGET_ID, "primus_fe", "nnUNetTrainerFrozenEncoder", pretrained=ckpt)
    start, final = weights(fold, START_FILE), weights(fold)
    assert all(torch.equal(start[k], v) for k, v in expected.items())  # the mapped checkpoint, bit for bit
    assert all(torch.equal(final[k], v) for k, v in expected.items())  # frozen
    decoder = [k for k in final if k.startswith("up_projection.") and k.endswith(".weight")]
    assert decoder and all(not torch.equal(final[k], start[k]) for k in decoder)
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["transfer"]["origin"] == "nnssl" and info["parameters"]["frozen"] == sum(
        v.numel() for v in expected.values())
    configure("primus_fe", ckpt, {"num_epochs": 2}, force=True)
    ws.train_compiled(TARGET_ID, "primus_fe", "nnUNetTrainerFrozenEncoder", cont=True)
    resumed = load_checkpoint(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 2
    assert all(torch.equal(resumed["network_weights"][k], v) for k, v in expected.items())

    # PartialFT: blocks 3-6 train, so blocks 1-2 — patch + positional embedding, transformer blocks 0 and 1 — stay
    configure("primus_pft", ckpt, {"trainable": "blocks:3-6"})
    fold = ws.train(TARGET_ID, "primus_pft", "nnUNetTrainerPartialFT", pretrained=ckpt)
    final = weights(fold)
    frozen = [k for k in expected if k.startswith(("down_projection.", "eva.pos_embed", "eva.blocks.0.",
                                                   "eva.blocks.1."))]
    assert all(torch.equal(final[k], expected[k]) for k in frozen)
    block3 = [k for k in expected if k.startswith("eva.blocks.2.") and k.endswith("proj.weight")]
    assert block3 and all(not torch.equal(final[k], expected[k]) for k in block3)

    # Staged: the up-projection first (the encoder the checkpoint's), then --c into "all"
    stages = {"stages": [["decoder+seg", 1], ["all", None]]}
    configure("primus_staged", ckpt, stages)
    fold = ws.train(TARGET_ID, "primus_staged", "nnUNetTrainerStaged", pretrained=ckpt)
    assert all(torch.equal(weights(fold)[k], v) for k, v in expected.items())
    configure("primus_staged", ckpt, {**stages, "num_epochs": 2}, force=True)
    ws.train(TARGET_ID, "primus_staged", "nnUNetTrainerStaged", cont=True)
    final = weights(fold)
    assert all(not torch.equal(final[k], expected[k]) for k in expected if k.endswith("proj.weight"))
    assert [e["stage"] for e in json.loads((fold / "stages_log.json").read_text())] == [1, 2]


def test_l2sp_and_lora_on_an_nnssl_primus(workspace, source, tmp_path):
    from nnunet_transfer.policies.lora import lora_modules
    from nnunet_transfer.trainers.lora import ADAPTER_FILE, merged_network

    ws = workspace
    ckpt, expected = source
    configure("primus_l2sp", ckpt, {})
    fold = ws.train(TARGET_ID, "primus_l2sp", "nnUNetTrainerL2SP", pretrained=ckpt)
    saved = load_checkpoint(fold / "checkpoint_final.pth")
    anchor = saved["nnunet_transfer"]["l2sp_anchor"]
    assert set(anchor) == set(expected) and all(torch.equal(anchor[k], expected[k]) for k in anchor)
    alpha = json.loads((fold / "transfer_config.json").read_text())["settings"]["l2sp_alpha"]
    final = saved["network_weights"]
    penalty = alpha * sum(float(((final[k].double() - anchor[k].double()) ** 2).sum()) for k in anchor)
    assert penalty > 0 and json.loads((fold / "l2sp_log.json").read_text())[-1]["penalty"] == \
        pytest.approx(penalty, rel=1e-9)

    lora = {"lora_rank": 4, "lora_alpha": 8.0}
    configure("primus_lora", ckpt, lora)
    fold = ws.train(TARGET_ID, "primus_lora", "nnUNetTrainerLoRA", pretrained=ckpt)
    state = load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]["lora_state"]
    linear = [c for c in state if c.startswith("eva.")]
    assert len(linear) == 4 * 7  # q, k, v, proj, fc1_g, fc1_x, fc2 of 4 transformer blocks
    assert set(state) == set(linear) | {"down_projection.proj"}  # the up-projection trains in full
    assert all(torch.equal(s["weight"], expected[f"{layer}.weight"]) for layer, s in state.items())
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "LoRA rank 4 (alpha 8.0) on 29 layers (28 linear, 1 convolutions)" in log
    configure("primus_lora", ckpt, {**lora, "num_epochs": 2}, force=True)
    ws.train(TARGET_ID, "primus_lora", "nnUNetTrainerLoRA", cont=True)
    ckpt_final = load_checkpoint(fold / "checkpoint_final.pth")
    assert ckpt_final["current_epoch"] == 2
    after = ckpt_final["nnunet_transfer"]["lora_state"]
    assert all(torch.equal(s["weight"], expected[f"{layer}.weight"]) for layer, s in after.items())
    merged = ckpt_final["network_weights"]
    for layer, s in after.items():
        w = s["weight"].double() + 2.0 * (s["lora_B"].double() @ s["lora_A"].double()).view(s["weight"].shape)
        assert (merged[f"{layer}.weight"].double() - w).abs().max() <= 1e-6
    assert any(bool(s["lora_B"].any()) for s in after.values())
    others = [k for k in expected if k[: -len(".weight")] not in after]
    assert "eva.pos_embed" in others and all(torch.equal(merged[k], expected[k]) for k in others)

    # the stock predictor on the merged checkpoint_final ...
    stock = tmp_path / "stock"
    ws.run(["nnUNetv2_predict", "-i", ws.root / "raw" / ws.target / "imagesTs", "-o", stock, "-d", TARGET_ID, "-c",
            "primus_lora", "-f", 0, "-tr", "nnUNetTrainerLoRA", "-device", "cpu", "-npp", 0, "-nps", 0,
            "--disable_tta", "--disable_progress_bar", "--save_probabilities"], "predict LoRA primus")
    # ... against the network with the adapters applied (unmerged) on the nnssl checkpoint as its base
    net, payload = merged_network(fold / ADAPTER_FILE, ckpt)
    assert type(net).__name__ == "Primus" and lora_modules(net) and payload["rank"] == 4
    adapted = predict_with_network(net, fold, "primus_lora", "nnUNetTrainerLoRA",
                                   ws.root / "raw" / ws.target / "imagesTs", tmp_path / "adapted")
    assert_same_probabilities(stock, adapted, cases=2)
