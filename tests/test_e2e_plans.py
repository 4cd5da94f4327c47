"""End to end with nnU-Net's own programs: ``plans transfer`` → preprocess → fine-tune, ``weights check`` /
``adapt`` → ``-pretrained_weights``, ``pool`` → plan and preprocess.

Datasets of this module: 905 (CT-like, stored as HU + 1024 by an "other scanner"), 906 (two identical CT
channels, copied from the source 901), 950 (the pool of 901 and 902).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.data import TARGET, make_dataset
from nnunet_transfer.nnunet_io import build_network, load_dataset_json, load_plans
from nnunet_transfer.pipeline import train_args
from nnunet_transfer.plans.configure import add_configuration

from conftest import QUICK_SETTINGS, SOURCE_ID, TINY, load_checkpoint

pytestmark = pytest.mark.slow

CT_ID, TWO_ID, POOL_ID = 905, 906, 950
CT_NAME, TWO_NAME = "Dataset905_OtherScanner", "Dataset906_TwoChannels"
# an "other scanner" storing HU + 1024 (unsigned), on top of the target domain's other contrast and noise
OTHER_SCANNER = dataclasses.replace(TARGET, offset=TARGET.offset + 1024.0)
SRC_NORM = "nnUNetPlansSrcNorm"
FIRST = {"encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight",
         "decoder.encoder.stages.0.0.convs.0.conv.weight", "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"}


def run_logged(ws, args, what: str, train: bool = False) -> str:
    ws.run(args, what, train=train)
    return (ws.logs / f"{ws.n_logs:03d}_{Path(str(args[0])).name}.log").read_text()


def train(ws, dataset: int, configuration: str, pretrained: Path) -> Path:
    ws.run(train_args(dataset, configuration, 0, "nnUNetTrainerFinetune", pretrained=pretrained),
           f"fine-tune {dataset}", train=True)
    name = {CT_ID: CT_NAME, TWO_ID: TWO_NAME}[dataset]
    return ws.root / "results" / name / f"nnUNetTrainerFinetune__nnUNetPlans__{configuration}" / "fold_0"


def check_json(capsys, *argv) -> tuple[int, dict]:
    rc = main(["weights", "check", *map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def case_intensities(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background voxels of every preprocessed case, read with nnU-Net's dataset class."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ds = infer_dataset_class(str(folder))(str(folder))
    fg, bg = [], []
    for case in sorted(ds.identifiers):
        data, seg, _, _ = ds.load_case(case)
        data, seg = np.asarray(data[:])[0], np.asarray(seg[:])[0]
        fg.append(data[seg > 0])
        bg.append(data[seg == 0])
    return np.concatenate(fg), np.concatenate(bg)


# --------------------------------------------------------------------------- 905: transfer + preprocess
@pytest.fixture(scope="module")
def ct(workspace):
    ws = workspace
    make_dataset(ws.root / "raw", CT_ID, "OtherScanner", OTHER_SCANNER, n_train=6, n_test=2, seed=5,
                 physical_size=32.0)
    source_plans = ws.plans(SOURCE_ID)  # other modules may add configurations later
    logs = {"transfer": run_logged(ws, ["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", CT_ID,
                                        "-c", TINY, "-np", 1], "plans transfer")}
    # nnU-Net's own command into a second plans file, then ours over it (the .bak keeps nnU-Net's)
    ws.run(["nnUNetv2_move_plans_between_datasets", "-s", SOURCE_ID, "-t", CT_ID, "-sp", "nnUNetPlans",
            "-tp", SRC_NORM], "nnU-Net move plans")
    logs["source"] = run_logged(ws, ["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", CT_ID, "-tp",
                                     SRC_NORM, "--normalization", "source", "--force"], "plans transfer (source)")
    # the printed command (-c tiny shares 3d_fullres's data), and the same data with the source's statistics
    ws.run(["nnUNetv2_preprocess", "-d", CT_ID, "-plans_name", "nnUNetPlans", "-c", TINY, "-np", 1], "preprocess")
    ws.run(["nnUNetv2_preprocess", "-d", CT_ID, "-plans_name", SRC_NORM, "-c", "3d_fullres", "-np", 1],
           "preprocess with the source's statistics")
    return ws, logs, source_plans


def test_transfer_puts_fingerprint_dataset_json_and_own_statistics_in_place(ct):
    ws, logs, source = ct
    pre = ws.root / "preprocessed" / CT_NAME
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert f"extracting the fingerprint of {CT_NAME}: nnUNetv2_extract_fingerprint -d {CT_ID} -np 1" in logs["transfer"]
    assert (pre / "dataset.json").read_text() == (ws.root / "raw" / CT_NAME / "dataset.json").read_text()
    assert plans["foreground_intensity_properties_per_channel"] == \
        fingerprint["foreground_intensity_properties_per_channel"]
    assert plans["foreground_intensity_properties_per_channel"]["0"]["mean"] > 900  # HU + 1024
    assert plans["configurations"] == source["configurations"]
    assert plans["dataset_name"] == CT_NAME
    ckpt = ws.source_checkpoint
    assert ("next:\n"
            f"  nnUNetv2_preprocess -d {CT_ID} -plans_name nnUNetPlans -c {TINY}\n"
            f"  nnunet_transfer weights check {ckpt} -d {CT_ID} -c {TINY} -p nnUNetPlans\n"
            f"  nnUNetv2_train {CT_ID} {TINY} 0 -p nnUNetPlans -tr nnUNetTrainerFinetune -pretrained_weights {ckpt}\n"
            ) in logs["transfer"]


def test_source_normalization_is_exactly_nnunets_own_command(ct):
    ws, logs, _ = ct
    pre = ws.root / "preprocessed" / CT_NAME
    ours = json.loads((pre / f"{SRC_NORM}.json").read_text())
    nnunet = json.loads((pre / f"{SRC_NORM}.json.bak").read_text())
    assert ours == nnunet
    assert ours["configurations"]["3d_fullres"]["data_identifier"] == f"{SRC_NORM}_3d_fullres"
    assert "WARNING: --normalization source: channel 0 of Dataset905_OtherScanner is clipped and scaled with " \
           "the SOURCE's statistics" in logs["source"]


def test_preprocessed_intensities_follow_the_targets_own_statistics(ct):
    ws, _, source_plans = ct
    pre = ws.root / "preprocessed" / CT_NAME
    own_fg, own_bg = case_intensities(pre / "nnUNetPlans_3d_fullres")
    src_fg, _ = case_intensities(pre / f"{SRC_NORM}_3d_fullres")
    # own statistics: the foreground is standardised, and organ/lesion/background stay apart
    assert abs(own_fg.mean()) < 0.25 and 0.7 < own_fg.std() < 1.3, (own_fg.mean(), own_fg.std())
    assert own_bg.mean() < own_fg.mean() - 0.5
    # the source's statistics: every voxel lies above the source's 99.5th percentile -> one clipped value
    source = source_plans["foreground_intensity_properties_per_channel"]["0"]
    top = (source["percentile_99_5"] - source["mean"]) / source["std"]
    assert np.allclose(src_fg, top, atol=1e-4), (src_fg.min(), src_fg.max(), top)


def test_finetuning_with_pretrained_weights_runs(ct, capsys):
    ws, _, _ = ct
    rc, report = check_json(capsys, ws.source_checkpoint, "-d", CT_ID, "-c", TINY)
    assert rc == 0 and report["loadable"] and report["mismatches"] == []
    ws.configure(CT_ID, TINY, "ft", QUICK_SETTINGS)
    fold = train(ws, CT_ID, "ft", ws.source_checkpoint)
    config = json.loads((fold / "transfer_config.json").read_text())
    assert config["pretrained_loaded"] is True
    assert (fold / "checkpoint_final.pth").is_file()


def test_check_lists_exact_mismatches_for_a_checkpoint_from_other_plans(ct, capsys, tmp_path):
    ws, _, source_plans = ct
    wide = add_configuration(source_plans, base="3d_fullres", new="wide", features="16,32",
                             patch="32,32,32")
    source = build_network(wide, "wide", load_dataset_json(SOURCE_ID)).state_dict()
    torch.save({"network_weights": source}, tmp_path / "wide.pth")
    rc, report = check_json(capsys, tmp_path / "wide.pth", "-d", CT_ID, "-c", TINY)
    assert rc == 1 and not report["loadable"]
    target = build_network(load_plans(CT_ID), TINY, load_dataset_json(CT_ID)).state_dict()
    got = {kind: {k for m in report["mismatches"] if m["kind"] == kind for k in m["keys"]}
           for kind in ("missing", "shape", "unexpected")}
    assert got["missing"] == {k for k in target if k not in source}
    assert got["shape"] == {k for k in target if k in source and source[k].shape != target[k].shape}
    assert got["unexpected"] == set(source) - set(target)
    assert got["missing"] and got["shape"]
    blocking = {k for m in report["mismatches"] if m["blocking"] for k in m["keys"]}
    assert blocking == {k for k in got["missing"] | got["shape"] if ".seg_layers." not in k}


# --------------------------------------------------------------------------- 906: another channel count
@pytest.fixture(scope="module")
def two(workspace):
    ws = workspace
    src, dst = ws.root / "raw" / ws.source, ws.root / "raw" / TWO_NAME
    (dst / "imagesTr").mkdir(parents=True)
    shutil.copytree(src / "labelsTr", dst / "labelsTr")
    for img in sorted((src / "imagesTr").glob("*_0000.nii.gz")):
        for c in range(2):  # the same image in both channels
            shutil.copy(img, dst / "imagesTr" / img.name.replace("_0000.", f"_{c:04d}."))
    dj = json.loads((src / "dataset.json").read_text())
    dj.update(channel_names={"0": "CT", "1": "CT"}, name="TwoChannels")
    (dst / "dataset.json").write_text(json.dumps(dj))
    refused = ws.run_expect_failure(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", TWO_ID])
    ws.run(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", TWO_ID, "-c", TINY, "-np", 1,
            "--allow-channel-change"], "plans transfer 906")
    ws.run(["nnUNetv2_preprocess", "-d", TWO_ID, "-plans_name", "nnUNetPlans", "-c", "3d_fullres", "-np", 1],
           "preprocess 906")
    return ws, refused


def test_other_channel_count_is_refused_without_the_flag(two):
    _, refused = two
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith(f"nnunet_transfer plans: error: the source {'Dataset901_TransferSource'} has "
                                     f"1 channel(s) ['CT'], the target {TWO_NAME} has 2 ['CT', 'CT']")


def test_check_and_adapt_for_another_channel_count(two, capsys, tmp_path):
    ws, _ = two
    rc, report = check_json(capsys, ws.source_checkpoint, "-d", TWO_ID, "-c", TINY)
    assert rc == 1
    assert [(set(m["keys"]), m["checkpoint_shape"], m["network_shape"], m["blocking"])
            for m in report["mismatches"]] == [(FIRST, [8, 1, 3, 3, 3], [8, 2, 3, 3, 3], True)]
    adapted = tmp_path / "two.pth"
    assert main(["weights", "adapt", str(ws.source_checkpoint), "-o", str(adapted), "--in-channels", "2",
                 "--method", "repeat"]) == 0
    capsys.readouterr()
    rc, report = check_json(capsys, adapted, "-d", TWO_ID, "-c", TINY)
    assert rc == 0 and report["mismatches"] == []

    # identical channels: the first layer (and so the whole network) answers as the source does
    source = build_network(ws.plans(SOURCE_ID), TINY, load_dataset_json(SOURCE_ID))
    source.load_state_dict(load_checkpoint(ws.source_checkpoint)["network_weights"])
    target = build_network(load_plans(TWO_ID), TINY, load_dataset_json(TWO_ID))
    target.load_state_dict(torch.load(adapted, weights_only=False)["network_weights"])
    source.eval(), target.eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    x2 = x.expand(-1, 2, -1, -1, -1)
    with torch.no_grad():
        first_src = source.encoder.stages[0][0].convs[0].conv(x)
        first_tgt = target.encoder.stages[0][0].convs[0].conv(x2)
        torch.testing.assert_close(first_tgt, first_src, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target(x2)[0], source(x)[0], rtol=1e-4, atol=1e-4)

    # and nnU-Net's -pretrained_weights takes it
    ws.configure(TWO_ID, TINY, "ft2", QUICK_SETTINGS)
    fold = train(ws, TWO_ID, "ft2", adapted)
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["nnunet_transfer"]["pretrained_loaded"] is True


# --------------------------------------------------------------------------- 950: pool
def test_pool_plans_and_preprocesses(workspace):
    ws = workspace
    log = run_logged(ws, ["nnunet_transfer", "pool", "-d", SOURCE_ID, 902, "-o", POOL_ID, "--name", "Pool"], "pool")
    assert "pooled 12 training cases (Dataset901_TransferSource: 6, Dataset902_TransferTarget: 6)" in log
    ws.run(["nnUNetv2_plan_and_preprocess", "-d", POOL_ID, "-c", "3d_fullres", "-np", 1, "-npfp", 1,
            "--verify_dataset_integrity"], "plan pool")
    pre = ws.root / "preprocessed" / "Dataset950_Pool"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    folder = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = sorted(p.name[:-len(".pkl")] for p in folder.glob("*.pkl"))
    assert len(cases) == 12
    assert sum(c.startswith("Dataset901_TransferSource_") for c in cases) == 6
    assert sum(c.startswith("Dataset902_TransferTarget_") for c in cases) == 6
