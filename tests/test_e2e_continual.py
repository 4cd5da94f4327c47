"""Adding a class without forgetting the ones the source knows, end to end through the stock command line.

The session's source model knows organ (1) and lesion (2). Target 921 is drawn from the source's scanner with
the organ and lesion in every image, but its training label maps annotate only a new class, cyst (3): organ and
lesion are labelled background there, and its dataset.json says so (``"unannotated": ["organ", "lesion"]``); its
test label maps hold every class. Four runs start from the source checkpoint with ``heads=by-name`` and the same
short schedule, each through ``nnUNetv2_train`` and ``nnUNetv2_predict``:

* plain fine-tuning (``unannotated=[]``: the dataset.json declaration switched off) — it learns to erase organ
  and lesion;
* partial labels (the marginal loss, from the dataset.json declaration), through nnU-Net's torch.compile path
  forced on the CPU;
* distillation (``nnUNetTrainerContinual``, through the same compiled path);
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
#: one epoch of 15 iterations at nnU-Net's LR (lr_scale 1): long enough for plain fine-tuning to erase most of
#: what the source knew about organ and lesion, short enough for a CPU test — too short for the new class (below)
SETTINGS = {"num_epochs": 1, "num_iterations_per_epoch": 15, "num_val_iterations_per_epoch": 1, "save_every": 1,
            "seed": 0, "final_validation": False, "heads": "by-name", "lr_scale": 1.0}
DISTILL_WEIGHT = 10.0
#: the criteria (issue 24): plain fine-tuning keeps less than this share of the source's old-class Dice ...
PLAIN_KEEPS_BELOW = 0.6
#: ... each remedy keeps at least this share ...
REMEDY_KEEPS = 0.9
#: ... while the new class is NOT learned at this budget: the cyst's Dice is printed, not asserted. Measured on this
#: data (2026-12-07): 40 iterations give plain fine-tuning a cyst Dice of 0.48, but at 30 iterations and nnU-Net's
#: LR the shared features drift so far that partial labels keep 0 % and distillation (weight 10) 13 % of the old
#: classes (pseudo-labels 98 %). Made easier to learn (a cyst darker than the organ, 10 HU, radii x 1.5-2), the cyst
#: is learned only where the old classes are lost (partial labels: 30 its 0.27 / 19 % kept, 40 its 0.43 / 1 %, 45
#: its 0.25 / 41 %; the network calls the organ "cyst"), and lr_scale 0.3 x 30 iterations learns no cyst at all;
#: distillation at weight 30 x 45 iterations keeps 114 % and learns no cyst. documentation/continual.md has the table
NEW_CLASS_LEARNED = False
TARGET_DOMAIN = SOURCE
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def newclass(workspace, tmp_path_factory):
    """Dataset 921 (see the module), its test images beside the source's in one input folder, and the source
    model's predictions of them (the "before")."""
    ws = workspace
    t0 = time.perf_counter()
    ws.add_target(NEW_ID, "NewClass", domain=TARGET_DOMAIN, n_train=6, n_test=2, seed=5, label_distractors=True,
                  unannotated=("organ", "lesion"), declare_unannotated=True)
    root = tmp_path_factory.mktemp("continual")
    images = root / "images"
    images.mkdir()
    for dataset in (SOURCE_ID, NEW_ID):
        for f in (ws.root / "raw" / ws.dataset_name(dataset) / "imagesTs").glob("*.nii.gz"):
            shutil.copy(f, images / f.name)
    before = predict(ws, SOURCE_ID, TINY, "nnUNetTrainerTransferBase", images, root / "before")
    ws.continual = {"root": root, "images": images, "before": before, "t0": t0}
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


def test_plain_fine_tuning_forgets_the_old_classes(newclass):
    ws = newclass
    ws.configure(NEW_ID, TINY, "cl_plain", {**SETTINGS, "unannotated": []})
    fold = ws.train(NEW_ID, "cl_plain", "nnUNetTrainerFinetune", pretrained=ws.source_checkpoint)
    assert "partial labels" not in next(fold.glob("training_log_*.txt")).read_text()
    r = measure(ws, "plain", NEW_ID, "cl_plain", "nnUNetTrainerFinetune")
    print_results()
    assert r["forgetting"]["mean"]["before"] > 0.2  # the source knows something to forget
    assert kept("plain") < PLAIN_KEEPS_BELOW


def test_partial_labels_keep_the_old_classes(newclass):
    ws = newclass
    ws.configure(NEW_ID, TINY, "cl_partial", SETTINGS)  # organ and lesion: the dataset.json's declaration
    fold = ws.train_compiled(NEW_ID, "cl_partial", "nnUNetTrainerFinetune", pretrained=ws.source_checkpoint)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Using torch.compile..." in log and "partial labels" in log
    info = json.loads((fold / "transfer_config.json").read_text())
    assert info["unannotated"] == {"organ": 1, "lesion": 2}
    measure(ws, "partial", NEW_ID, "cl_partial", "nnUNetTrainerFinetune")
    print_results()
    assert kept("partial") >= REMEDY_KEEPS


def test_distillation_keeps_the_old_classes_and_its_teacher_bit_for_bit_compiled(newclass):
    ws = newclass
    ws.configure(NEW_ID, TINY, "cl_distill", {**SETTINGS, "unannotated": [], "distill_weight": DISTILL_WEIGHT})
    fold = ws.train_compiled(NEW_ID, "cl_distill", "nnUNetTrainerContinual", pretrained=ws.source_checkpoint)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Using torch.compile..." in log and "distillation from" in log
    source = load_checkpoint(ws.source_checkpoint)["network_weights"]

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
    measure(ws, "distillation", NEW_ID, "cl_distill", "nnUNetTrainerContinual")
    print_results()
    assert kept("distillation") >= REMEDY_KEEPS
    # --c: the teacher is rebuilt from the checkpoint's entry (never from fine-tuned weights) and saved again
    ws.train(NEW_ID, "cl_distill", "nnUNetTrainerContinual", cont=True)
    again = assert_teacher_is_the_source(fold / "checkpoint_final.pth")
    assert all(torch.equal(again["network_weights"][k], first["network_weights"][k]) for k in first["network_weights"])


def test_pseudo_labels_keep_the_old_classes(newclass):
    ws = newclass
    model = ws.fold_folder(SOURCE_ID, TINY, "nnUNetTrainerTransferBase").parent
    ws.run(["nnunet_transfer", "labels", "merge", "-m", model, "-d", NEW_ID, "-o", PSEUDO_ID, "--threshold", 0.5],
           "labels merge")
    folder = ws.root / "raw" / f"Dataset{PSEUDO_ID}_NewClassPseudo"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "organ": 1, "lesion": 2, "cyst": 3} and "unannotated" not in dj
    assert dj["pseudo_labels"]["classes"] == ["organ", "lesion"] and dj["pseudo_labels"]["voxels"]["organ"] > 0
    ws.extra_datasets[PSEUDO_ID] = folder.name
    ws.run(["nnunet_transfer", "plans", "transfer", "-s", SOURCE_ID, "-t", PSEUDO_ID, "-np", 1], "plans transfer")
    ws.run(["nnUNetv2_preprocess", "-d", PSEUDO_ID, "-plans_name", "nnUNetPlans", "-c", "3d_fullres", "-np", 1],
           "preprocess pseudo")
    ws.configure(PSEUDO_ID, TINY, "cl_pseudo", SETTINGS)
    ws.train(PSEUDO_ID, "cl_pseudo", "nnUNetTrainerFinetune", pretrained=ws.source_checkpoint)
    measure(ws, "pseudo-labels", PSEUDO_ID, "cl_pseudo", "nnUNetTrainerFinetune")
    print_results()
    assert kept("pseudo-labels") >= REMEDY_KEEPS


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
