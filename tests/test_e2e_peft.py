"""Staged schedules, norm-only / BitFit and LoRA end to end through nnUNetv2_train / nnUNetv2_predict.

* staged (decoder + heads for epoch 0, then all): the encoder is bit-identical until the stage change and
  moves after it; ``--c`` in the middle of the second stage keeps its trainable set and learning rates;
* norm-only: every kernel and conv bias bit-identical, the norms moved; BitFit likewise for the kernels;
* LoRA: base kernels bit-identical in the training state, merged kernels = base + (α/r)·B·A to 1e-6, every
  other frozen tensor bit-identical; the stock predictor on checkpoint_final (merged) gives the prediction
  of the network with the adapters applied; ``lora merge`` of the adapter file into the source checkpoint
  rebuilds checkpoint_final; bad settings are one line before any folder exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (QUICK_SETTINGS, TARGET_ID, TINY, assert_one_line_error, assert_same_probabilities,
                      load_checkpoint, predict_with_network)
from test_e2e_freezing import parameters

pytestmark = pytest.mark.slow

SETTINGS = {**QUICK_SETTINGS, "snapshot_every": 1}
STAGED = "nnUNetTrainerStaged_decoderFirst"
LORA = "nnUNetTrainerLoRA"


def poly(epoch: int, num_epochs: int, lr: float = 0.01 * 0.5) -> float:
    return lr * (1 - epoch / num_epochs) ** 0.9


def predict(ws, configuration: str, trainer: str, out: Path, *extra) -> Path:
    ws.run(["nnUNetv2_predict", "-i", ws.root / "raw" / ws.target / "imagesTs", "-o", out, "-d", TARGET_ID, "-c",
            configuration, "-f", 0, "-tr", trainer, "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta",
            "--disable_progress_bar", *extra], f"predict {trainer}")
    return out


def test_staged_run_unfreezes_the_encoder_at_the_boundary_and_resumes_mid_stage(workspace):
    ws = workspace
    settings = {**SETTINGS, "stages": "decoder+seg:1,all", "stage_warmup_epochs": 2}
    ws.configure(TARGET_ID, TINY, "staged", settings)
    fold = ws.train(TARGET_ID, "staged", STAGED, pretrained=ws.source_checkpoint)
    snap = {e: parameters(load_checkpoint(fold / "snapshots" / f"epoch_{e:04d}.pth")["network_weights"])
            for e in (0, 1, 2)}
    enc = [k for k in snap[0] if k.startswith("encoder.")]
    dec = [k for k in snap[0] if k.startswith(("decoder.stages.", "decoder.transpconvs."))]
    assert all(torch.equal(snap[1][k], snap[0][k]) for k in enc), "encoder moved in the first stage"
    assert all(not torch.equal(snap[1][k], snap[0][k]) for k in dec if k.endswith("conv.weight"))
    assert all(not torch.equal(snap[2][k], snap[1][k]) for k in enc if k.endswith("conv.weight"))
    log = json.loads((fold / "stages_log.json").read_text())
    assert [(e["epoch"], e["stage"], e["group_stage"]) for e in log] == [(0, 1, [1]), (1, 2, [1, 2])]
    # the encoder joins at epoch 1 with a 2-epoch ramp: half of the poly rate there
    assert log[1]["lr"] == pytest.approx([poly(1, 2), poly(1, 2) / 2], rel=1e-12)
    first = load_checkpoint(fold / "checkpoint_final.pth")

    # --c for one more epoch: still stage 2, same groups, the ramp's anchor is the stage start (epoch 1)
    ws.configure(TARGET_ID, TINY, "staged", {**settings, "num_epochs": 3})
    ws.train(TARGET_ID, "staged", STAGED, cont=True)
    log = json.loads((fold / "stages_log.json").read_text())
    assert [(e["epoch"], e["stage"]) for e in log] == [(0, 1), (1, 2), (2, 2)]
    assert log[2]["lr"] == pytest.approx([poly(2, 3), poly(2, 3)], rel=1e-12)  # ramp over: 2/2
    resumed = load_checkpoint(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 3 and resumed["nnunet_transfer"]["stage"] == 1
    assert resumed["nnunet_transfer"]["parameters"] == first["nnunet_transfer"]["parameters"]
    assert len(resumed["optimizer_state"]["param_groups"]) == 2


@pytest.mark.parametrize("trainer, trains", [
    ("nnUNetTrainerNormOnly", lambda k: ".norm." in k),
    ("nnUNetTrainerBitFit", lambda k: k.endswith(".bias")),
])
def test_norm_only_and_bitfit_keep_every_other_tensor_bit_identical(workspace, trainer, trains):
    ws = workspace
    name = trainer.replace("nnUNetTrainer", "").lower()
    ws.configure(TARGET_ID, TINY, name, {**SETTINGS, "num_epochs": 1})
    fold = ws.train(TARGET_ID, name, trainer, pretrained=ws.source_checkpoint)
    start = parameters(load_checkpoint(fold / "snapshots" / "epoch_0000.pth")["network_weights"])
    final = parameters(load_checkpoint(fold / "checkpoint_final.pth")["network_weights"])
    frozen = [k for k in start if not trains(k) and ".seg_layers." not in k]
    assert any(k.endswith("conv.weight") for k in frozen)
    assert all(torch.equal(final[k], start[k]) for k in frozen), "a frozen tensor moved"
    assert all(not torch.equal(final[k], start[k]) for k in start if k.endswith(".norm.weight" if "Norm" in trainer
                                                                               else ".norm.bias"))
    p = json.loads((fold / "transfer_config.json").read_text())["parameters"]
    assert p["trainable"] == sum(v.numel() for k, v in start.items() if trains(k) or ".seg_layers." in k)


@pytest.fixture(scope="module")
def lora_run(workspace):
    ws = workspace
    ws.configure(TARGET_ID, TINY, "lora", {**SETTINGS, "lora_rank": 4, "lora_alpha": 8.0})
    return ws.train(TARGET_ID, "lora", LORA, pretrained=ws.source_checkpoint)


def test_lora_base_frozen_and_merged_weights_are_base_plus_scaled_ba(workspace, lora_run):
    ws, fold = workspace, lora_run
    source = parameters(load_checkpoint(ws.source_checkpoint)["network_weights"])
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    merged = parameters(ckpt["network_weights"])
    assert merged.keys() == source.keys()  # the plain network's keys: stock predict / -pretrained_weights
    state = ckpt["nnunet_transfer"]["lora_state"]
    kernels = {k for k, v in source.items() if ".seg_layers." not in k and v.ndim >= 3}
    assert {f"{c}.weight" for c in state} == kernels  # every conv and transposed conv but the heads
    for conv, s in state.items():
        assert torch.equal(s["weight"], source[f"{conv}.weight"]), f"base kernel {conv} moved"
        expected = s["weight"].double() + 2.0 * (s["lora_B"].double() @ s["lora_A"].double()).view(s["weight"].shape)
        assert (merged[f"{conv}.weight"].double() - expected).abs().max() <= 1e-6
    assert any(s["lora_B"].abs().sum() > 0 for s in state.values())
    others = [k for k in source if k not in kernels and ".seg_layers." not in k]  # norms, conv biases
    assert others and all(torch.equal(merged[k], source[k]) for k in others)
    assert all(not torch.equal(merged[k], source[k]) for k in source if k.startswith("decoder.seg_layers.1."))
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["lora"]["rank"] == 4 and info["lora"]["convs"] == len(state)
    assert info["parameters"]["trainable"] == info["lora"]["adapter_params"] + sum(
        v.numel() for k, v in source.items() if ".seg_layers." in k)


def test_lora_stock_prediction_equals_the_adapted_network_and_merge_rebuilds_it(workspace, lora_run, tmp_path):
    from nnunet_transfer.cli.main import main
    from nnunet_transfer.policies.lora import lora_modules
    from nnunet_transfer.trainers.lora import ADAPTER_FILE, merged_network

    ws, fold = workspace, lora_run
    stock = predict(ws, "lora", LORA, tmp_path / "stock", "--save_probabilities")  # merged checkpoint_final
    # the same cases through the network with the adapters applied (base = the source checkpoint, unmerged)
    net, payload = merged_network(fold / ADAPTER_FILE, ws.source_checkpoint)
    assert lora_modules(net) and payload["rank"] == 4
    net.decoder.deep_supervision = False
    adapted = predict_with_network(net, fold, "lora", LORA, ws.root / "raw" / ws.target / "imagesTs",
                                   tmp_path / "adapted")
    assert_same_probabilities(stock, adapted, cases=2)
    import SimpleITK as sitk
    for seg in sorted(stock.glob("*.nii.gz")):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(seg))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(adapted / seg.name))))

    # one base, a small file per target: merge rebuilds what the stock predictor read from checkpoint_final
    assert (fold / ADAPTER_FILE).stat().st_size < (fold / "checkpoint_final.pth").stat().st_size / 3
    out = tmp_path / "checkpoint_merged.pth"
    assert main(["lora", "merge", str(fold / ADAPTER_FILE), str(ws.source_checkpoint), "-o", str(out)]) == 0
    rebuilt, final = load_checkpoint(out), load_checkpoint(fold / "checkpoint_final.pth")
    for key in ("trainer_name", "init_args", "inference_allowed_mirroring_axes", "current_epoch"):
        assert rebuilt[key] == final[key], key
    assert list(rebuilt["network_weights"]) == list(final["network_weights"])
    assert max(float((rebuilt["network_weights"][k] - v).abs().max())
               for k, v in final["network_weights"].items()) <= 1e-6


def test_lora_resume_keeps_the_base_and_continues_the_adapters(workspace, lora_run):
    ws, fold = workspace, lora_run
    before = load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]["lora_state"]
    ws.configure(TARGET_ID, TINY, "lora", {**SETTINGS, "lora_rank": 4, "lora_alpha": 8.0, "num_epochs": 3})
    ws.train(TARGET_ID, "lora", LORA, cont=True)
    after = load_checkpoint(fold / "checkpoint_final.pth")
    assert after["current_epoch"] == 3
    state = after["nnunet_transfer"]["lora_state"]
    assert all(torch.equal(state[c]["weight"], before[c]["weight"]) for c in before)
    assert any(not torch.equal(state[c]["lora_B"], before[c]["lora_B"]) for c in before)
    groups = after["optimizer_state"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(before) * 2 + 4  # A, B of every conv + 2 heads × 2


# the other refusals (empty / open-ended lists, kinds, targets without convs, ...) go through the same
# __init__ path and are unit-tested in tests/test_peft_trainers.py
BAD = [  # trainer, settings, the message
    ("nnUNetTrainerStaged", {"stages": "seg:norm:1,all"},
     "setting 'stages': stage 1 ('seg:norm', epochs 0 until epoch 1): spec 'seg:norm': norm of seg matches no "
     "parameter of this PlainConvUNet"),
    (LORA, {"lora_rank": 9}, "setting 'lora_rank'=9 is larger than the smallest dimension of"),
]


@pytest.fixture(scope="module")
def refused(workspace):
    """Built by nnU-Net's get_trainer_from_args in one process (Workspace.refusals); tests/test_e2e_errors.py
    runs such refusals through the real nnUNetv2_train as well."""
    ws = workspace
    # configure would refuse some: written unchecked, to test the trainers' own checks
    with ws.unchecked_configurations(TARGET_ID, TINY, {f"badpeft{i}": {**SETTINGS, **s}
                                                       for i, (_, s, _) in enumerate(BAD)}):
        return ws.refusals([["nnUNetv2_train", TARGET_ID, f"badpeft{i}", 0, "-tr", t, "-device", "cpu"]
                            for i, (t, _, _) in enumerate(BAD)])


@pytest.mark.parametrize("i", range(len(BAD)), ids=[t for t, _, _ in BAD])
def test_bad_settings_are_one_line_before_any_folder(workspace, refused, i):
    trainer, _, message = BAD[i]
    assert_one_line_error(refused[i], message)
    assert not workspace.fold_folder(TARGET_ID, f"badpeft{i}", trainer).parent.exists()
