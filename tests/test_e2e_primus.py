"""A Primus target end to end through the stock CLI: a tiny Primus configuration on the target, a source
checkpoint made from a pretraining Primus (1 output, 32³ patch: its positional embedding interpolated to the 16³
patch, its stem and encoder mapped as nnU-Net master maps them), ``nnUNetv2_train -tr nnUNetTrainerLoRA`` for one
epoch of two iterations, then ``nnUNetv2_predict`` on the merged checkpoint_final.

One training run carries every assertion: LoRA base kernels (attention, MLP, patch embedding, up-projection)
bit-identical to the source, merged = base + (α/r)·B·A, every other frozen tensor bit-identical, the heads moved,
and the stock prediction equal to the prediction of the network with the adapters applied (unmerged).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import QUICK_SETTINGS, TARGET_ID, assert_same_probabilities, load_checkpoint, predict_with_network
from nets import primus

pytestmark = pytest.mark.slow

LORA = "nnUNetTrainerLoRA"
CONF = "primus_lora"


def test_primus_lora_through_nnunetv2_train_and_predict(workspace, tmp_path):
    from nnunet_transfer.nnunet_io import build_network
    from nnunet_transfer.plans.primus import map_primus_state
    from nnunet_transfer.policies.lora import lora_modules
    from nnunet_transfer.trainers.lora import ADAPTER_FILE, merged_network

    ws = workspace
    ws.configure_primus(TARGET_ID, "3d_fullres", CONF, {**QUICK_SETTINGS, "num_epochs": 1,
                                                        "num_iterations_per_epoch": 2, "lora_rank": 4,
                                                        "lora_alpha": 8.0})
    # the source: a pretraining Primus (reconstruction head, 32³ patch) mapped onto the target's Primus
    plans = ws.plans(TARGET_ID)
    dataset_json = json.loads((ws.root / "preprocessed" / ws.target / "dataset.json").read_text())
    torch.manual_seed(0)
    target = build_network(plans, CONF, dataset_json).state_dict()
    pretrain = primus(seed=1, input_shape=(32, 32, 32), num_classes=1).state_dict()
    mapping = map_primus_state(pretrain, target, source_patch_size=(32, 32, 32), target_patch_size=(16, 16, 16),
                               patch_embed_size=(8, 8, 8))
    source_file = tmp_path / "primus_source.pth"
    torch.save({"network_weights": mapping.state}, source_file)
    source = mapping.state

    fold = ws.train(TARGET_ID, CONF, LORA, pretrained=source_file)
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    merged = ckpt["network_weights"]
    assert list(merged) == list(source)  # the plain Primus' keys: what nnUNetv2_predict loads
    state = ckpt["nnunet_transfer"]["lora_state"]
    assert {"eva.blocks.0.attn.q_proj", "eva.blocks.3.mlp.fc2", "down_projection.proj",
            "up_projection.decode.0.0"} <= set(state)
    for layer, s in state.items():
        assert torch.equal(s["weight"], source[f"{layer}.weight"]), f"base kernel {layer} moved"
        expected = s["weight"].double() + 2.0 * (s["lora_B"].double() @ s["lora_A"].double()).view(s["weight"].shape)
        assert (merged[f"{layer}.weight"].double() - expected).abs().max() <= 1e-6
    assert any(bool(s["lora_B"].any()) for s in state.values())
    heads = {"up_projection.decode.2.weight", "up_projection.decode.2.bias"}
    others = [k for k in source if k not in heads and k[: -len(".weight")] not in state]
    assert "eva.pos_embed" in others and all(torch.equal(merged[k], source[k]) for k in others)
    assert all(not torch.equal(merged[k], source[k]) for k in heads)
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["lora"]["convs"] == len(state) and info["pretrained_loaded"] is True
    linear = [c for c in state if c.startswith("eva.")]
    assert info["lora"]["linear"] == len(linear) == 4 * 7  # q, k, v, proj, fc1_g, fc1_x, fc2 of 4 blocks
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"LoRA rank 4 (alpha 8.0) on {len(state)} layers ({len(linear)} linear, {len(state) - len(linear)} " \
           f"convolutions)" in log

    # the stock predictor on the merged checkpoint_final ...
    stock = tmp_path / "stock"
    ws.run(["nnUNetv2_predict", "-i", ws.root / "raw" / ws.target / "imagesTs", "-o", stock, "-d", TARGET_ID, "-c",
            CONF, "-f", 0, "-tr", LORA, "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta",
            "--disable_progress_bar", "--save_probabilities"], f"predict {LORA} {CONF}")
    # ... against the network with the adapters applied on the source base (unmerged)
    net, payload = merged_network(fold / ADAPTER_FILE, source_file)
    assert type(net).__name__ == "Primus" and lora_modules(net) and payload["rank"] == 4
    adapted = predict_with_network(net, fold, CONF, LORA, ws.root / "raw" / ws.target / "imagesTs",
                                   tmp_path / "adapted")
    assert_same_probabilities(stock, adapted, cases=2)
