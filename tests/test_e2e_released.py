"""End to end with nnU-Net's own programs: what users actually have as a source.

* A **released model folder**: the session's source model exported with ``nnUNetv2_export_model_to_zip`` and
  installed with ``nnUNetv2_install_pretrained_model_from_zip`` into a fresh results folder of a *separate*
  nnU-Net tree whose source dataset is deleted; ``plans transfer -s MODEL_FOLDER``, preprocess, ``weights
  check`` and fine-tune through ``nnUNetv2_train -pretrained_weights MODEL_FOLDER``.
* A target **planned its own way** (dataset 907, 3 mm × 1 mm × 1 mm voxels): nnU-Net's planner gives it another
  patch, 1×3×3 kernels at full resolution and one more stage than the source; ``weights adapt`` maps the
  source checkpoint, ``nnUNetv2_train -pretrained_weights`` fine-tunes from it, the network as training started
  holds the source's tensors bit for bit and the adapted kernels by the documented rule, and a frozen-encoder
  run that would freeze the new stage is refused before any folder exists.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nnunet_transfer.checkpoints import canonical_key
from nnunet_transfer.cli.main import main
from nnunet_transfer.data import TARGET, make_dataset
from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
from nnunet_transfer.pipeline import TRAIN_ENV, run_step, train_args
from nnunet_transfer.plans.configure import configure, write_plans

from conftest import QUICK_SETTINGS, SOURCE_ID, TARGET_ID, TINY, load_checkpoint

pytestmark = pytest.mark.slow

OWN_ID, OWN_NAME = 907, "Dataset907_Aniso"
MODEL = f"nnUNetTrainerTransferBase__nnUNetPlans__{TINY}"
# one short epoch: these runs show what the network starts from, not what it learns
SHORT = {**QUICK_SETTINGS, "num_epochs": 1}


@contextlib.contextmanager
def environment(env: dict):
    """nnU-Net's folders of another tree for in-process calls (nnunet_transfer reads them at call time)."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def non_seg(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".seg_layers." not in k}


# --------------------------------------------------------------------------- a released model folder
@pytest.fixture(scope="module")
def released(workspace, tmp_path_factory):
    ws = workspace
    tmp = tmp_path_factory.mktemp("released")
    zip_file = tmp / "model.zip"
    ws.run(["nnUNetv2_export_model_to_zip", "-d", SOURCE_ID, "-o", zip_file, "-c", TINY, "-tr",
            "nnUNetTrainerTransferBase", "-f", 0], "export the source model")
    # the user's machine: the target's raw data, nothing of the source but the zip
    user = tmp / "user"
    env = nnunet_environment(user, defaults=SMALL_MACHINE)
    for name in (ws.source, ws.target):
        shutil.copytree(ws.root / "raw" / name, user / "raw" / name)
    shutil.rmtree(user / "raw" / ws.source)  # the source dataset is gone
    logs = user / "logs"

    def run(args, what, train=False):
        log = logs / f"{len(list(logs.glob('*.log'))) if logs.is_dir() else 0:02d}_{Path(str(args[0])).name}.log"
        run_step(args, env=env, log=log, what=what, extra_env=TRAIN_ENV if train else None)
        return log.read_text()

    run(["nnUNetv2_install_pretrained_model_from_zip", zip_file], "install the model")
    model = user / "results" / ws.source / MODEL
    transfer = run(["nnunet_transfer", "plans", "transfer", "-s", model, "-t", TARGET_ID, "-np", 1], "plans transfer")
    run(["nnUNetv2_preprocess", "-d", TARGET_ID, "-plans_name", "nnUNetPlans", "-c", TINY, "-np", 1], "preprocess")
    with environment(env):
        configure(TARGET_ID, base=TINY, new="ft_released", settings=SHORT)
    train = run(train_args(TARGET_ID, "ft_released", 0, "nnUNetTrainerFinetune", pretrained=model),
                "fine-tune from the model folder", train=True)
    fold = user / "results" / ws.target / "nnUNetTrainerFinetune__nnUNetPlans__ft_released" / "fold_0"
    return ws, env, user, model, transfer, train, fold


def test_installed_model_folder_is_what_nnunet_exports_and_the_source_data_is_gone(released):
    ws, _, user, model, _, _, _ = released
    assert sorted(p.name for p in model.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "fold_0",
                                                       "plans.json"]
    assert (model / "fold_0" / "checkpoint_final.pth").read_bytes() == ws.source_checkpoint.read_bytes()
    for sub in ("raw", "preprocessed"):
        assert not list((user / sub).glob(f"Dataset{SOURCE_ID}_*")), sub


def test_plans_transfer_from_the_model_folder(released):
    ws, _, user, model, transfer, _, _ = released
    pre = user / "preprocessed" / ws.target
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    source = json.loads((model / "plans.json").read_text())
    added = {"ft_released"}  # configure's, after the transfer
    assert {k: v for k, v in plans["configurations"].items() if k not in added} == source["configurations"]
    assert plans["dataset_name"] == ws.target
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"] == \
        fingerprint["foreground_intensity_properties_per_channel"]  # the target's own statistics
    assert (pre / "dataset.json").read_text() == (user / "raw" / ws.target / "dataset.json").read_text()
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    assert f"plans {model}/plans.json ({ws.source}, nnUNetPlans) -> {pre / 'nnUNetPlans.json'}" in transfer
    assert ("next:\n"
            f"  nnUNetv2_preprocess -d {TARGET_ID} -plans_name nnUNetPlans -c {TINY}\n"
            f"  nnunet_transfer weights check {ckpt} -d {TARGET_ID} -c {TINY} -p nnUNetPlans\n"
            f"  nnUNetv2_train {TARGET_ID} {TINY} 0 -p nnUNetPlans -tr nnUNetTrainerFinetune -pretrained_weights {ckpt}\n"
            ) in transfer


def test_weights_check_takes_the_model_folder_and_its_fold(released, capsys):
    _, env, _, model, _, _, _ = released
    with environment(env):
        for given in (model, model / "fold_0"):
            assert main(["weights", "check", str(given), "-d", str(TARGET_ID), "-c", TINY, "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["loadable"] and report["checkpoint"] == str(model / "fold_0" / "checkpoint_final.pth")


def test_finetuning_from_the_model_folder_loads_it_bit_for_bit(released):
    _, _, _, model, _, train_log, fold = released
    config = json.loads((fold / "transfer_config.json").read_text())
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    assert config["pretrained_loaded"] is True and config["pretrained_source"] == str(ckpt)
    assert config["transfer"]["kind"] == "same-plans" and config["transfer"]["total"]["share"] == 1.0
    start = torch.load(fold / "start_weights.pth", weights_only=False)["network_weights"]
    source = load_checkpoint(ckpt)["network_weights"]
    assert non_seg(start).keys() == non_seg(source).keys()
    assert all(torch.equal(v, source[k]) for k, v in non_seg(start).items())
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"nnunet_transfer: same-plans load from {ckpt}: every tensor but the segmentation heads" in log
    assert (fold / "checkpoint_final.pth").is_file()


# --------------------------------------------------------------------------- a target planned its own way
@pytest.fixture(scope="module")
def own(workspace, tmp_path_factory):
    ws = workspace
    make_dataset(ws.root / "raw", OWN_ID, "Aniso", dataclasses.replace(TARGET, spacing=(3.0, 1.0, 1.0)),
                 n_train=6, n_test=0, seed=7, physical_size=32.0)
    ws.run(["nnUNetv2_plan_and_preprocess", "-d", OWN_ID, "-c", "3d_fullres", "-np", 1, "-npfp", 1],
           "plan the target its own way")
    path = ws.root / "preprocessed" / OWN_NAME / "nnUNetPlans.json"
    plans = json.loads(path.read_text())
    planned = plans["configurations"]["3d_fullres"]
    # nnU-Net's own plan, only narrower for the CPU (kernels, strides, patch and stage count as planned)
    arch = copy.deepcopy(planned["architecture"])
    arch["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64][:arch["arch_kwargs"]["n_stages"]]
    plans["configurations"]["own"] = {"inherits_from": "3d_fullres", "architecture": arch, "nnunet_transfer": SHORT}
    write_plans(path, plans)
    out = tmp_path_factory.mktemp("adapted") / "adapted.pth"
    assert main(["weights", "adapt", str(ws.source_checkpoint), "-d", str(OWN_ID), "-c", "own", "-o", str(out),
                 "--seed", "0", "--min-share", "0.1"]) == 0
    ws.run(train_args(OWN_ID, "own", 0, "nnUNetTrainerFinetune", pretrained=out), "fine-tune the adapted weights",
           train=True)
    fold = ws.root / "results" / OWN_NAME / "nnUNetTrainerFinetune__nnUNetPlans__own" / "fold_0"
    return ws, planned, out, fold


def test_nnunet_planned_the_target_differently(own):
    ws, planned, _, _ = own
    kw = planned["architecture"]["arch_kwargs"]
    source_kw = ws.plans(SOURCE_ID)["configurations"][TINY]["architecture"]["arch_kwargs"]
    assert kw["kernel_sizes"][0] == [1, 3, 3] and source_kw["kernel_sizes"][0] == [3, 3, 3]
    assert kw["n_stages"] == source_kw["n_stages"] + 1
    assert planned["patch_size"] != [32, 32, 32]
    assert [1, 2, 2] in kw["strides"]  # z not pooled at some stage: transposed kernels 1x2x2


def test_adapted_weights_start_the_finetuning_by_the_documented_rules(own):
    ws, planned, out, fold = own
    source = {canonical_key(k): v for k, v in load_checkpoint(ws.source_checkpoint)["network_weights"].items()}
    adapted = torch.load(out, weights_only=False)
    report = json.loads(out.with_name("adapted.report.json").read_text())
    assert adapted["nnunet_transfer_adapted"] == report
    start = torch.load(fold / "start_weights.pth", weights_only=False)["network_weights"]
    acts = {t["name"]: t for t in report["tensors"]}
    n_s = 3
    n_t = planned["architecture"]["arch_kwargs"]["n_stages"]
    counts = {}
    for name, t in acts.items():
        counts[t["action"]] = counts.get(t["action"], 0) + 1
        if t["action"] == "head":
            continue
        got = start[name]  # what nnUNetv2_train -pretrained_weights actually loaded
        if t["action"] == "new":
            assert torch.equal(got, adapted["network_weights"][name])  # nnU-Net's init, seed 0, via the file
            continue
        # the source tensor at the same resolution: decoder indices shift by N_s - N_t
        parts = name.split(".")
        if parts[0] == "decoder":
            parts[2] = str(int(parts[2]) + n_s - n_t)
        s = source[".".join(parts)]
        assert t["source"] == ".".join(parts)
        if t["action"] == "copied":
            assert torch.equal(got, s), name
        elif name.startswith("decoder.transpconvs."):
            assert t["action"] == "mapped"
            axes = [a for a in range(3) if s.shape[2 + a] == 2 and got.shape[2 + a] == 1]
            assert axes and t["reason"] == ", ".join(f"axis {a} 2->1 mean" for a in axes)
            assert torch.equal(got, s.double().mean([2 + a for a in axes], keepdim=True).float()), name
        else:
            assert t["action"] == "mapped" and got.shape[2] == 1 and s.shape[2] == 3, name
            assert t["reason"] == "axis 0 3->1 sum"
            assert torch.equal(got, s.double().sum(2, keepdim=True).float()), name
    assert counts["copied"] > 0 and counts["mapped"] >= 4 and counts["new"] > 0
    # the record of it in transfer_config.json and the log
    config = json.loads((fold / "transfer_config.json").read_text())
    assert config["transfer"]["kind"] == "adapted" and config["transfer"]["total"] == report["total"]
    assert [b["share"] for b in config["transfer"]["blocks"]] == [b["share"] for b in report["blocks"]]
    assert report["blocks"][n_t - 1]["share"] == 0.0  # the extra bottleneck is new
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"nnunet_transfer: weights adapted by `weights adapt` from {ws.source_checkpoint}: " \
           f"{report['total']['share']:.1%} of the" in log


def test_freezing_the_new_stage_is_refused_before_any_folder(own, monkeypatch):
    # the trainer as nnUNetv2_train constructs it, with that command line (in-process: nnU-Net's start-up
    # costs seconds; what refuses is the trainer's __init__, before nnU-Net's creates the fold folder)
    from nnunet_transfer.errors import TransferError
    from nnunet_transfer.trainers import nnUNetTrainerFrozenEncoder, nnUNetTrainerFrozenDecoder

    ws, planned, out, _ = own
    pre = ws.root / "preprocessed" / OWN_NAME
    plans, dataset_json = json.loads((pre / "nnUNetPlans.json").read_text()), json.loads((pre / "dataset.json").read_text())
    n_t = planned["architecture"]["arch_kwargs"]["n_stages"]
    for trainer in (nnUNetTrainerFrozenEncoder, nnUNetTrainerFrozenDecoder):
        argv = ["nnUNetv2_train", str(OWN_ID), "own", "0", "-tr", trainer.__name__, "-pretrained_weights", str(out)]
        monkeypatch.setattr(sys, "argv", argv)
        frozen = n_t if trainer is nnUNetTrainerFrozenEncoder else n_t + 1  # the new bottleneck / decoder stage
        with pytest.raises(TransferError, match=rf"{trainer.__name__} would freeze parameters that did not come "
                                                rf"from {out} .* block {frozen}: .*--set freeze_reinit=true"):
            trainer(plans, "own", 0, dataset_json, torch.device("cpu"))
        assert not (ws.root / "results" / OWN_NAME / f"{trainer.__name__}__nnUNetPlans__own").exists()


def test_l2sp_li_anchors_only_what_weights_adapt_brought(own):
    # nnUNetTrainerL2SP_Li through nnUNetv2_train from the adapted file: its anchor (stored in the checkpoint) is
    # exactly the kernels of encoder+decoder that the report lists as copied or mapped; the new stage's tensors are
    # in the beta group, and the log and transfer_config.json count them (in-process, compiled: test_not_transferred)
    ws, _, out, _ = own
    report = json.loads(out.with_name("adapted.report.json").read_text())
    ws.run(train_args(OWN_ID, "own", 0, "nnUNetTrainerL2SP_Li", pretrained=out), "L2-SP from the adapted weights",
           train=True)
    fold = ws.root / "results" / OWN_NAME / "nnUNetTrainerL2SP_Li__nnUNetPlans__own" / "fold_0"
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    kernels = {t["name"] for t in report["tensors"] if t["name"].endswith(".weight") and len(t["target_shape"]) == 5}
    transferred = {t["name"] for t in report["tensors"] if t["action"] in ("copied", "mapped")}
    fresh = {t["name"]: t for t in report["tensors"] if t["action"] in ("reinit", "not_transferable", "new")}
    anchored = set(ckpt["nnunet_transfer"]["l2sp_anchor"])
    assert anchored == (transferred & kernels) - {t["name"] for t in report["tensors"] if t["action"] == "head"}
    assert fresh and not anchored & set(fresh)
    nt = json.loads((fold / "transfer_config.json").read_text())["not_transferred"]
    n_fresh = sum(int(torch.Size(t["target_shape"]).numel()) for t in fresh.values())
    assert nt["tensors"] == len(fresh) and nt["parameters"] == n_fresh == nt["l2sp_beta"]
    assert nt["parameters"] == sum(b["reinit"] + b["not_transferable"] + b["new"] for b in report["blocks"])
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"L2-SP anchor captured on {len(anchored)} tensors of scope 'encoder+decoder'" in log
    assert (f"nnunet_transfer: {n_fresh:,} parameters in {len(fresh)} tensors did not come from the source "
            f"(re-initialised or new in the `weights adapt` report): L2-SP anchors none of them, {n_fresh:,} are in "
            f"its beta group") in log
