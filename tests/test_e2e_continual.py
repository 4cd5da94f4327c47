"""Adding a class without forgetting the ones the source knows, end to end through the stock command line.

The module trains its own source on the session's dataset 901 (organ = 1, lesion = 2): the session's model (50
iterations, lesion Dice 0) is too weak to have anything to forget, and its 8 output features too few to learn a
third class on. Target 921 is drawn from the source's scanner with the organ and lesion in every image, but its
training label maps annotate only a new class, cyst (3: the organ-like blobs outside the organ that the source
learned to call background): organ and lesion are labelled background there, and its dataset.json says so
(``"unannotated": ["organ", "lesion"]``; ``plans transfer`` therefore keeps the source's CT statistics); its test
label maps hold every class. Four runs start from the source checkpoint with ``heads=by-name`` and the same
schedule, each through ``nnUNetv2_train`` and ``nnUNetv2_predict``:

* plain fine-tuning (``unannotated=[]``: the dataset.json declaration switched off) — it learns to erase organ
  and lesion;
* partial labels (the marginal loss, from the dataset.json declaration), through nnU-Net's torch.compile path
  forced on the CPU;
* distillation (``nnUNetTrainerContinual`` with the declaration: the marginal cross-entropy plus the KL term, as
  Cermelli et al. combine them; through the same compiled path);
* pseudo-labels (``nnunet_transfer labels merge`` writes dataset 922; plain fine-tuning on it).

Forgetting is measured on the *source's* held-out test set (``evaluate --before``): the old classes' Dice of
each run against the source model's own; the new class's Dice on the target's test set.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.data import SOURCE
from nnunet_transfer.experiments.evaluate import evaluate_folders, mean_dice

from conftest import SOURCE_ID, TARGET_ID, TINY, assert_one_line_error, load_checkpoint

pytestmark = pytest.mark.slow

NEW_ID, PSEUDO_ID = 921, 922  # 911-914, 916: the study tests' datasets; 929: the refused merges' output (free)
OLD, NEW = [1, 2], 3
#: the module's network: nnU-Net's 3d_fullres on the 32³ images with 16, 32, 64 features (the session's "tiny"
#: has 8, 16, 32: with 8 features before the heads neither partial labels nor distillation learned the cyst
#: without losing the lesion)
ARCH = {"features": "16,32,64", "patch": "32,32,32", "batch_size": 2}
SOURCE_CONFIG = "cl_source"
#: the source: 400 iterations (16 epochs of 25), nnU-Net's LR decaying to 0: organ Dice 0.94, lesion 0.77
SOURCE_SETTINGS = {"num_epochs": 16, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 1,
                   "save_every": 16, "seed": 0, "final_validation": False}
#: every run on the target: one epoch of 100 iterations at nnU-Net's LR from the source checkpoint
SETTINGS = {"num_epochs": 1, "num_iterations_per_epoch": 100, "num_val_iterations_per_epoch": 1, "save_every": 1,
            "seed": 0, "final_validation": False, "heads": "by-name", "lr_scale": 1.0}
DISTILL_WEIGHT = 10.0
#: the criteria (issue 24): plain fine-tuning keeps less than this share of the source's old-class Dice ...
PLAIN_KEEPS_BELOW = 0.6
#: ... distillation and pseudo-labels keep at least this share ...
REMEDY_KEEPS = 0.9
#: ... while they learn the cyst to at least this Dice on the target's test set
NEW_CLASS_DICE = 0.25
TARGET_DOMAIN = SOURCE
RESULTS: dict[str, dict] = {}


def configure(ws, dataset, name: str, settings: dict) -> None:
    ws.configure(dataset, "3d_fullres", name, settings, **ARCH)


@pytest.fixture(scope="module")
def newclass(workspace, tmp_path_factory):
    """The module's source model, dataset 921 (see the module), its test images beside the source's in one input
    folder, and the source model's predictions of them (the "before")."""
    ws = workspace
    t0 = time.perf_counter()
    configure(ws, SOURCE_ID, SOURCE_CONFIG, SOURCE_SETTINGS)
    source = ws.train(SOURCE_ID, SOURCE_CONFIG, "nnUNetTrainerTransferBase") / "checkpoint_final.pth"
    ws.add_target(NEW_ID, "NewClass", domain=TARGET_DOMAIN, n_train=6, n_test=2, seed=5, label_distractors=True,
                  unannotated=("organ", "lesion"), declare_unannotated=True)
    root = tmp_path_factory.mktemp("continual")
    images = root / "images"
    images.mkdir()
    for dataset in (SOURCE_ID, NEW_ID):
        for f in (ws.root / "raw" / ws.dataset_name(dataset) / "imagesTs").glob("*.nii.gz"):
            shutil.copy(f, images / f.name)
    before = predict(ws, SOURCE_ID, SOURCE_CONFIG, "nnUNetTrainerTransferBase", images, root / "before")
    ws.continual = {"root": root, "images": images, "before": before, "t0": t0, "source": source,
                    "model": source.parent.parent}
    yield ws
    RESULTS["_module_seconds"] = time.perf_counter() - t0
    print_results()


def predict(ws, dataset, configuration: str, trainer: str, images: Path, out: Path) -> dict[str, Path]:
    """Stock ``nnUNetv2_predict`` of the four test images; the predictions split into the source's cases and the
    target's (``{"source": folder, "target": folder}``)."""
    ws.run(["nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset, "-c", configuration, "-f", 0, "-tr", trainer,
            "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_tta", "--disable_progress_bar"], f"predict {trainer}")
    split = {}
    for side, dataset_id in (("source", SOURCE_ID), ("target", NEW_ID)):
        folder = out / side
        folder.mkdir()
        for f in (ws.root / "raw" / ws.dataset_name(dataset_id) / "labelsTs").glob("*.nii.gz"):
            shutil.move(out / f.name, folder / f.name)
        split[side] = folder
    return split


def measure(ws, name: str, dataset, configuration: str, trainer: str) -> dict:
    """Forgetting on the source's test set (``evaluate --before``) and the new class's Dice on the target's."""
    c = ws.continual
    pred = predict(ws, dataset, configuration, trainer, c["images"], c["root"] / name)
    src_labels = ws.root / "raw" / ws.source / "labelsTs"
    result = evaluate_folders(pred["source"], src_labels, c["root"] / f"{name}_eval", labels=OLD,
                              before=c["before"]["source"], progress=False)
    f = result.summary["forgetting"]
    new = mean_dice(pred["target"], ws.root / "raw" / ws.dataset_name(NEW_ID) / "labelsTs", ".nii.gz", [NEW])[NEW]
    RESULTS[name] = {"forgetting": f, "new": new}
    return RESULTS[name]


def print_results() -> None:
    lines = ["", "issue 24: old classes' Dice on the source's test set (organ, lesion; mean) and cyst's on the "
                 "target's test set"]
    for name, r in RESULTS.items():
        if name.startswith("_"):
            continue
        f = r["forgetting"]
        per = ", ".join(f"{d['after']:.3f}" for d in f["per_label"].values())
        lines.append(f"  {name:14s} old [{per}] mean {f['mean']['after']:.3f} = {100 * f['mean']['kept']:.0f} % of "
                     f"the source's {f['mean']['before']:.3f}; cyst {r['new']:.3f}")
    if "_module_seconds" in RESULTS:
        lines.append(f"  module time {RESULTS['_module_seconds']:.0f} s")
    print("\n".join(lines))


def kept(name: str) -> float:
    return RESULTS[name]["forgetting"]["mean"]["kept"]


def organ_kept(name: str) -> float:
    return RESULTS[name]["forgetting"]["per_label"]["1"]["kept"]


def test_the_target_keeps_the_sources_intensity_statistics(newclass):
    # the target's own fingerprint sees only its labelled voxels (the cyst): clipped at its 99.5th percentile the
    # source's bright lesion would look like the cyst to every run (measured: the lesion lost by all four remedies)
    ws = newclass
    assert ws.plans(NEW_ID)["foreground_intensity_properties_per_channel"] == \
           ws.plans(SOURCE_ID)["foreground_intensity_properties_per_channel"]


def test_plain_fine_tuning_forgets_the_old_classes(newclass):
    ws = newclass
    configure(ws, NEW_ID, "cl_plain", {**SETTINGS, "unannotated": []})
    fold = ws.train(NEW_ID, "cl_plain", "nnUNetTrainerFinetune", pretrained=ws.continual["source"])
    assert "partial labels" not in next(fold.glob("training_log_*.txt")).read_text()
    r = measure(ws, "plain", NEW_ID, "cl_plain", "nnUNetTrainerFinetune")
    print_results()
    assert r["forgetting"]["mean"]["before"] > 0.7  # the source knows both classes: something to forget
    assert kept("plain") < PLAIN_KEEPS_BELOW


def test_partial_labels_learn_the_cyst_and_keep_the_organ_not_the_lesion(newclass):
    """The marginal loss takes away the wrong signal and nothing more: the cyst's voxels push every other class
    down, and within "background or unannotated" no term tells the merged classes apart. Measured here: the organ
    is kept, the lesion is lost to the organ (the README states it; documentation/continual.md: with a hypodense
    cyst both were lost to background). Distillation, which takes the same declaration, is the remedy."""
    ws = newclass
    configure(ws, NEW_ID, "cl_partial", SETTINGS)  # organ and lesion: the dataset.json's declaration
    fold = ws.train_compiled(NEW_ID, "cl_partial", "nnUNetTrainerFinetune", pretrained=ws.continual["source"])
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Using torch.compile..." in log and "partial labels" in log
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["unannotated"] == {"organ": 1, "lesion": 2}
    r = measure(ws, "partial", NEW_ID, "cl_partial", "nnUNetTrainerFinetune")
    print_results()
    assert r["new"] >= NEW_CLASS_DICE
    assert organ_kept("partial") >= 0.6
    assert kept("partial") >= 0.3  # plain fine-tuning: less than PLAIN_KEEPS_BELOW, 0 % measured


def test_distillation_keeps_the_old_classes_and_its_teacher_bit_for_bit_compiled(newclass):
    ws = newclass
    configure(ws, NEW_ID, "cl_distill", {**SETTINGS, "distill_weight": DISTILL_WEIGHT})
    fold = ws.train_compiled(NEW_ID, "cl_distill", "nnUNetTrainerContinual", pretrained=ws.continual["source"])
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Using torch.compile..." in log and "distillation from" in log and "partial labels" in log
    source = load_checkpoint(ws.continual["source"])["network_weights"]

    def assert_teacher_is_the_source(path: Path) -> dict:
        ckpt = load_checkpoint(path)
        teacher = ckpt["nnunet_transfer"]["distill_teacher"]["state"]
        assert teacher.keys() == source.keys()
        assert all(torch.equal(teacher[k], source[k]) for k in source)  # bit for bit
        # stored once: the network's own weights hold the student only (what nnUNetv2_predict loads)
        assert ckpt["network_weights"].keys() == source.keys()
        assert all(ckpt["network_weights"][k].shape[0] == 4 for k in source if ".seg_layers." in k)  # all classes
        return ckpt

    first = assert_teacher_is_the_source(fold / "checkpoint_final.pth")
    r = measure(ws, "distillation", NEW_ID, "cl_distill", "nnUNetTrainerContinual")
    print_results()
    assert kept("distillation") >= REMEDY_KEEPS and r["new"] >= NEW_CLASS_DICE
    # --c: the teacher is rebuilt from the checkpoint's entry (never from fine-tuned weights) and saved again
    ws.train(NEW_ID, "cl_distill", "nnUNetTrainerContinual", cont=True)
    again = assert_teacher_is_the_source(fold / "checkpoint_final.pth")
    assert all(torch.equal(again["network_weights"][k], first["network_weights"][k]) for k in first["network_weights"])


def test_pseudo_labels_keep_the_old_classes(newclass):
    ws = newclass
    ws.run(["nnunet_transfer", "labels", "merge", "-m", ws.continual["model"], "-d", NEW_ID, "-o", PSEUDO_ID,
            "--threshold", 0.5], "labels merge")
    folder = ws.root / "raw" / f"Dataset{PSEUDO_ID}_NewClassPseudo"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "organ": 1, "lesion": 2, "cyst": 3} and "unannotated" not in dj
    assert dj["pseudo_labels"]["classes"] == ["organ", "lesion"] and dj["pseudo_labels"]["voxels"]["organ"] > 0
    ws.extra_datasets[PSEUDO_ID] = folder.name
    ws.run(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", PSEUDO_ID, "-np", 1], "plans transfer")
    ws.run(["nnUNetv2_preprocess", "-d", PSEUDO_ID, "-plans_name", "nnUNetPlans", "-c", "3d_fullres", "-np", 1],
           "preprocess pseudo")
    configure(ws, PSEUDO_ID, "cl_pseudo", SETTINGS)
    ws.train(PSEUDO_ID, "cl_pseudo", "nnUNetTrainerFinetune", pretrained=ws.continual["source"])
    r = measure(ws, "pseudo-labels", PSEUDO_ID, "cl_pseudo", "nnUNetTrainerFinetune")
    print_results()
    assert kept("pseudo-labels") >= REMEDY_KEEPS and r["new"] >= NEW_CLASS_DICE


def test_bad_input_is_one_line_and_writes_nothing(newclass, capsys):
    ws = newclass
    # a declared unannotated class the source does not know: refused while nnU-Net builds the trainer
    with ws.unchecked_configurations(NEW_ID, TINY, {"cl_bad": {**SETTINGS, "unannotated": ["cyst"]}}):
        printed, = ws.refusals([["nnUNetv2_train", NEW_ID, "cl_bad", 0, "-tr", "nnUNetTrainerFinetune",
                                 "-pretrained_weights", ws.source_checkpoint]])
    assert_one_line_error(printed, "unannotated class(es) ['cyst'] unknown to the source checkpoint")
    assert not ws.fold_folder(NEW_ID, "cl_bad", "nnUNetTrainerFinetune").exists()
    model = ws.fold_folder(SOURCE_ID, TINY, "nnUNetTrainerTransferBase").parent
    raw = ws.root / "raw"
    cases = [
        # the source model does not segment the named class
        (["-d", NEW_ID, "--classes", "cyst"], "names ['cyst'], which the source model does not segment"),
        # the target annotates organ itself (902 declares nothing unannotated): its labels and the source's clash
        (["-d", TARGET_ID, "--classes", "organ"], "labels clash: ['organ'] are labels the target annotates"),
    ]
    for args, message in cases:
        assert main(["labels", "merge", "-m", str(model), *map(str, args), "-o", "929"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nnunet_transfer labels: error: ") and err.count("\n") == 1 and message in err, err
        assert not list(raw.glob("Dataset929_*")) and not list(raw.glob(".Dataset929_*"))
