"""Bad input through the real ``nnUNetv2_train``: one message, no traceback, no tensor values, nothing left behind.

Our trainers check ``-pretrained_weights`` and the command-line-only refusals in ``__init__``, before
nnU-Net's ``nnUNetTrainer.__init__`` creates the fold folder; nnU-Net itself creates nothing before it
constructs the trainer (``get_trainer_from_args`` only finds the class and reads plans and dataset.json).
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from nnunet_transfer.checkpoints import canonical_key
from nnunet_transfer.cli.main import main
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.runtime import CPU_THREADS_VAR

from conftest import QUICK_SETTINGS, SOURCE_ID, TARGET_ID, TINY, assert_one_line_error, load_checkpoint

pytestmark = pytest.mark.slow

CFG = "err"


@pytest.fixture(scope="module")
def bad_files(workspace, tmp_path_factory):
    ws = workspace
    ws.configure(TARGET_ID, TINY, CFG, QUICK_SETTINGS)
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    source = load_checkpoint(ws.source_checkpoint)
    raw = ws.source_checkpoint.read_bytes()
    files = {"missing": folder / "does_not_exist.pth"}
    (folder / "corrupt.pth").write_bytes(b"\x00garbage" * 100)
    files["corrupt"] = folder / "corrupt.pth"
    (folder / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = folder / "truncated.pth"
    # another architecture: the same plans with other feature widths in the deepest stage
    plans = add_configuration(ws.plans(TARGET_ID), base="3d_fullres", new="wide", features="8,16,24",
                              patch="32,32,32")
    other = build_network(plans, "wide", json.loads((ws.root / "preprocessed" / ws.target / "dataset.json").read_text()))
    torch.save({"network_weights": other.state_dict()}, folder / "wrong_shape.pth")
    files["wrong_shape"] = folder / "wrong_shape.pth"
    dropped = ["encoder.stages.1.0.convs.0.conv.weight", "decoder.stages.0.convs.1.norm.bias"]
    # every alias of the two tensors goes, as in a checkpoint of a network without them
    state = {k: v for k, v in source["network_weights"].items() if canonical_key(k) not in dropped}
    torch.save({"network_weights": state}, folder / "missing_keys.pth")
    files["missing_keys"] = folder / "missing_keys.pth"
    return ws, files, dropped


def _train(ws, trainer: str, *extra):
    return ws.run_expect_failure(["nnUNetv2_train", TARGET_ID, CFG, 0, "-tr", trainer, "-device", "cpu", *extra],
                                 train=True)


#: the kind whose refusal runs through the real ``nnUNetv2_train`` program; the others are built in one process
#: by nnU-Net's own ``get_trainer_from_args`` (tests/refuse_many.py), which saves ~8 s of start-up each
REAL_PROGRAM = "wrong_shape"


@pytest.fixture(scope="module")
def train_with(bad_files):
    """``nnUNetv2_train ... -pretrained_weights <the bad file of KIND>``: what it printed, once per kind."""
    ws, files, _ = bad_files
    done = {REAL_PROGRAM: _train(ws, "nnUNetTrainerFinetune", "-pretrained_weights", files[REAL_PROGRAM])}
    kinds = [k for k in files if k != REAL_PROGRAM]
    printed = ws.refusals([["nnUNetv2_train", TARGET_ID, CFG, 0, "-tr", "nnUNetTrainerFinetune", "-device", "cpu",
                            "-pretrained_weights", files[k]] for k in kinds])
    done |= {k: subprocess.CompletedProcess([], 1, "", err) for k, err in zip(kinds, printed)}
    return done.__getitem__


def _clean_failure(ws, proc, trainer: str) -> str:
    assert proc.returncode != 0
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert "tensor(" not in err + proc.stdout  # never tensor values (nnU-Net's assert prints both tensors)
    assert not ws.fold_folder(TARGET_ID, CFG, trainer).parent.exists(), "a refused run left its results folder"
    return err


@pytest.mark.parametrize("kind, expected", [
    ("missing", [r"pretrained weights .*does_not_exist\.pth not found"]),
    ("corrupt", [r"cannot read checkpoint .*corrupt\.pth: it is not a checkpoint torch\.load can read"]),
    ("truncated", [r"cannot read checkpoint .*truncated\.pth", r"truncated"]),
    ("wrong_shape", [r"-pretrained_weights .*wrong_shape\.pth cannot be loaded into the Dataset902_\w+ / err network",
                     r"shape +encoder\.stages\.2\.0\.convs\.0\.conv\.weight \(\+3 aliases\): checkpoint \(24, 16, 3, 3, 3\), "
                     r"network \(32, 16, 3, 3, 3\)", r"nnunet_transfer weights adapt", r"plans transfer"]),
    ("missing_keys", [r"missing +encoder\.stages\.1\.0\.convs\.0\.conv\.weight \(\+3 aliases\): checkpoint absent, "
                      r"network \(16, 8, 3, 3, 3\) — the network needs it",
                      r"missing +decoder\.stages\.0\.convs\.1\.norm\.bias.*network \(16,\)"]),
])
def test_incompatible_pretrained_weights_are_one_message_before_any_folder(bad_files, train_with, kind, expected):
    import re

    ws, files, _ = bad_files
    err = _clean_failure(ws, train_with(kind), "nnUNetTrainerFinetune")
    assert err.count("nnunet_transfer: error:") == 1, err
    for pattern in expected:
        assert re.search(pattern, err), (pattern, err)


def test_wrong_shape_lists_every_mismatch(bad_files, train_with):
    ws, files, _ = bad_files
    err = train_with("wrong_shape").stderr
    wide, tiny = load_checkpoint(files["wrong_shape"])["network_weights"], \
        load_checkpoint(ws.source_checkpoint)["network_weights"]
    differing = {k for k in tiny if ".seg_layers." not in k and wide[k].shape != tiny[k].shape}
    canonical = {k for k in differing if not k.startswith("decoder.encoder.") and ".all_modules." not in k}
    assert len(canonical) > 3
    listed = {line.split()[1].rstrip(":") for line in err.splitlines() if line.strip().startswith("shape ")}
    assert listed == canonical


NEEDS_WEIGHTS = [  # trainer, the message without -pretrained_weights
    ("nnUNetTrainerFrozenDecoder", "nnUNetTrainerFrozenDecoder keeps the PRETRAINED decoder frozen, but no "
                                   "pretrained weights were loaded; add -pretrained_weights SOURCE_CHECKPOINT"),
    ("nnUNetTrainerL2SP", "L2-SP with l2sp_alpha=0.01 pulls the scope toward the PRETRAINED weights, but no "
                          "pretrained weights were loaded"),
    ("nnUNetTrainerFrozenDecoderAndHeads", "nnUNetTrainerFrozenDecoderAndHeads keeps the PRETRAINED decoder frozen"),
]


def test_refusal_without_pretrained_weights_comes_before_the_fold_folder(bad_files):
    ws, _, _ = bad_files
    trainer, message = NEEDS_WEIGHTS[0]
    err = _clean_failure(ws, _train(ws, trainer), trainer)
    assert f"nnunet_transfer: error: {message}" in err


@pytest.fixture(scope="module")
def refused_without_weights(bad_files):
    """All of NEEDS_WEIGHTS built by nnU-Net's get_trainer_from_args in one process (Workspace.refusals)."""
    ws, _, _ = bad_files
    return ws.refusals([["nnUNetv2_train", TARGET_ID, CFG, 0, "-tr", t, "-device", "cpu"] for t, _ in NEEDS_WEIGHTS])


@pytest.mark.parametrize("i", range(len(NEEDS_WEIGHTS)), ids=[t for t, _ in NEEDS_WEIGHTS])
def test_every_refusal_without_pretrained_weights_is_one_line(bad_files, refused_without_weights, i):
    ws, _, _ = bad_files
    trainer, message = NEEDS_WEIGHTS[i]
    assert_one_line_error(refused_without_weights[i], message)
    assert not ws.fold_folder(TARGET_ID, CFG, trainer).parent.exists()


def test_bad_cpu_thread_count_is_one_line_before_the_fold_folder(bad_files):
    # runtime.apply_cpu_threads in the trainer's __init__, under the real nnUNetv2_train (unit-tested in
    # tests/test_runtime.py; here: the same one line from the program, and nothing written)
    ws, _, _ = bad_files
    trainer = "nnUNetTrainerTransferBase"
    proc = ws.run_expect_failure(["nnUNetv2_train", TARGET_ID, CFG, 0, "-tr", trainer, "-device", "cpu"], train=True,
                                 extra_env={CPU_THREADS_VAR: "two"})
    err = _clean_failure(ws, proc, trainer)
    line, = [x for x in err.splitlines() if x.startswith("nnunet_transfer: error:")]
    assert line == (f"nnunet_transfer: error: {CPU_THREADS_VAR}='two' is not a positive number of torch threads for "
                    f"CPU training; set e.g. {CPU_THREADS_VAR}=1, or unset it for nnU-Net's default (every core)")


def test_misspelt_trainer_names_the_closest(bad_files):
    ws, _, _ = bad_files
    proc = _train(ws, "nnUNetTrainerFrozenEncodr")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("nnunet_transfer: error:"))
    assert "no trainer 'nnUNetTrainerFrozenEncodr'; closest of nnunet_transfer: nnUNetTrainerFrozenEncoder" in line
    assert f"nnUNet_extTrainer={ws.env['nnUNet_extTrainer']}" in line
    assert "of nnU-Net: " in line


def test_misspelt_trainer_in_predict_is_one_line(bad_files, tmp_path):
    ws, _, _ = bad_files
    # a trained model of this dataset, for the message to name
    assert ws.source_checkpoint.is_file()
    proc = ws.run_expect_failure(["nnUNetv2_predict", "-i", ws.root / "raw" / ws.target / "imagesTs", "-o",
                                  tmp_path / "pred", "-d", SOURCE_ID, "-c", TINY, "-f", 0, "-tr",
                                  "nnUNetTrainerTransferBas", "-device", "cpu"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("nnunet_transfer: error:"))
    assert "nnUNetTrainerTransferBas__nnUNetPlans__tiny" in line
    assert f"{ws.source} has nnUNetTrainerTransferBase__nnUNetPlans__tiny" in line
    assert "closest of nnunet_transfer: nnUNetTrainerTransferBase" in line


def test_configure_parses_specs_against_the_stage_count(bad_files, capsys):
    ws, _, _ = bad_files
    plans_file = ws.root / "preprocessed" / ws.target / "nnUNetPlans.json"
    before = plans_file.read_bytes()
    assert main(["configure", "-d", str(TARGET_ID), "-c", TINY, "-n", "badspec2", "--set",
                 "trainable=blocks:1,7"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert ("setting 'trainable' of configuration 'badspec2' (N=3 stages): block 7 in spec 'blocks:1,7' is out "
            "of range: valid range 1..5") in err
    assert main(["configure", "-d", str(TARGET_ID), "-c", TINY, "-n", "badspec2", "--set", "l2sp_scope=middle"]) == 2
    assert "unknown term 'middle'" in capsys.readouterr().err
    assert plans_file.read_bytes() == before  # nothing written
