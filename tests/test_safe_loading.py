"""Checkpoints are read without running their code.

A ``.pth`` file is a pickle, and a pickle can call any importable function while it is read. The test file
here is an otherwise valid nnU-Net checkpoint whose training log holds an object that unpickles as
``os.system("touch MARKER")``. Every command and trainer that reads a checkpoint, snapshot, adapter file or
model folder must refuse it in one line naming the global it asked for and the opt-in, and MARKER must never
appear; the opt-in (``--trust-checkpoint``, ``nnUNet_transfer_trust_checkpoints=1``) reads it as nnU-Net does,
which is how the tests know the file really runs its command. Every checkpoint nnU-Net and our trainers write
still loads without the opt-in.
"""
from __future__ import annotations

import fractions
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_transfer.trainers as T
from nets import plans_network
from nnunet_transfer.checkpoints import (TRUST_ENV, TRUST_FLAG, UnsafeCheckpointError, load_weights,
                                         read_checkpoint, trusting_checkpoints)
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.nnunet_compat import same_values
from nnunet_transfer.plans.configure import add_configuration

from conftest import QUICK_SETTINGS, TARGET_ID, TINY

DATA = Path(__file__).parent / "data"
NAME = "Dataset902_TransferTarget"
#: what os.system pickles as (posix.system on Linux)
SYSTEM = f"{os.system.__module__}.system"


class RunsCommand:
    """Unpickling this runs ``touch MARKER`` through ``os.system``, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plans() -> dict:
    return add_configuration(json.loads((DATA / "nnUNetPlans_3d_32.json").read_text()), base="3d_fullres",
                             new="tiny", features="4,8,16", patch="16,16,16")


def dataset_json() -> dict:
    return json.loads((DATA / "dataset_ct2labels.json").read_text())


def nnunet_like(state: dict, payload=None) -> dict:
    """What nnU-Net's save_checkpoint writes (numpy scalars in the log), ``payload`` hidden in the log."""
    losses = [np.float32(0.5), np.float32(0.4)] + ([payload] if payload is not None else [])
    return {"network_weights": state, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None,
            "logging": {"train_losses": losses, "mean_fg_dice": [np.float64(0.3), np.float64(0.4)]},
            "_best_ema": np.float64(0.4), "current_epoch": 2, "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans(), "configuration": "tiny", "fold": 0, "dataset_json": dataset_json(),
                          "device": torch.device("cpu")},
            "inference_allowed_mirroring_axes": (0, 1, 2)}


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def evil(tmp_path, marker) -> Path:
    """A tiny-plans checkpoint that fits the network, with ``touch MARKER`` in its log."""
    state = plans_network(plans(), "tiny", dataset_json(), seed=0).state_dict()
    path = tmp_path / "evil.pth"
    torch.save(nnunet_like(state, RunsCommand(marker)), path)
    return path


def assert_refused(printed: str, command: str, marker: Path, wanted: str = SYSTEM) -> None:
    """One ``nnunet_transfer COMMAND: error:`` line naming the global and the opt-in; the command never ran."""
    assert printed.startswith(f"nnunet_transfer {command}: error: refused to load ") and printed.count("\n") == 1, \
        printed
    assert f"it asks for {wanted}," in printed and TRUST_FLAG in printed and f"{TRUST_ENV}=1" in printed, printed
    assert not marker.exists(), "the checkpoint's command ran"


# --------------------------------------------------------------------------- the loader
def test_a_file_that_runs_a_command_is_refused_and_runs_nothing(evil, marker):
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load checkpoint {evil}: it asks for {SYSTEM}, "):
        read_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError, match=rf"pass {TRUST_FLAG} or set {TRUST_ENV}=1$"):
        load_weights(evil)
    assert not marker.exists()
    # the opt-in reads it as nnU-Net does: the file really runs its command
    with trusting_checkpoints():
        loaded = read_checkpoint(evil)
    assert marker.exists() and loaded["logging"]["train_losses"][2] == 0  # os.system's exit status


def test_the_environment_variable_opts_in_and_an_explicit_trust_wins(evil, marker, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "0")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(evil)
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(evil, trust=False)
    assert not marker.exists()
    read_checkpoint(evil)
    assert marker.exists()


def test_a_bad_value_of_the_environment_variable_is_one_error(evil, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "maybe")
    with pytest.raises(ConfigError, match=rf"^{TRUST_ENV}='maybe' must be 1 \(load checkpoints unrestricted: only "
                                          rf"files you trust\) or 0; unset it to load safely$"):
        read_checkpoint(evil)


def test_an_exotic_but_harmless_file_names_its_class_and_loads_with_the_opt_in(tmp_path):
    path = tmp_path / "exotic.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"it asks for fractions\.Fraction, which nnU-Net checkpoints "
                                                    r"do not hold"):
        read_checkpoint(path)
    with trusting_checkpoints():
        assert read_checkpoint(path)["ratio"] == fractions.Fraction(1, 3)
    assert torch.equal(load_weights(path, trust=True).state["w"], torch.ones(2))


def test_nnunet_checkpoint_content_loads_without_the_opt_in(tmp_path):
    """numpy scalars of every dtype nnU-Net logs, torch.device in init_args, tuples, None: all allowed."""
    content = nnunet_like({"w": torch.arange(3.0)})
    content["logging"]["extra"] = [np.float16(1), np.int64(2), np.uint8(3), np.bool_(True), np.int32(4)]
    torch.save(content, tmp_path / "c.pth")
    loaded = read_checkpoint(tmp_path / "c.pth")
    assert type(loaded["_best_ema"]) is np.float64 and type(loaded["logging"]["train_losses"][0]) is np.float32
    assert loaded["logging"]["extra"] == content["logging"]["extra"]
    assert [type(v) for v in loaded["logging"]["extra"]] == [type(v) for v in content["logging"]["extra"]]
    assert loaded["init_args"] == content["init_args"] and loaded["inference_allowed_mirroring_axes"] == (0, 1, 2)


def test_numpy_scalars_written_under_the_other_numpy_major_load(tmp_path):
    """numpy 1 pickles scalars as numpy.core.multiarray.scalar, numpy 2 as numpy._core.multiarray.scalar."""
    path = tmp_path / "legacy.pth"
    torch.save({"network_weights": {"w": torch.ones(1)}, "loss": np.float64(0.25)}, path,
               _use_new_zipfile_serialization=False)  # one plain pickle stream: the module name can be edited
    raw = path.read_bytes()
    this, other = (b"numpy._core.multiarray", b"numpy.core.multiarray") if b"numpy._core.multiarray" in raw else \
        (b"numpy.core.multiarray", b"numpy._core.multiarray")
    assert raw.count(this) == 1
    path.write_bytes(raw.replace(this, other))  # GLOBAL names end at a newline: no lengths to fix
    assert read_checkpoint(path)["loss"] == np.float64(0.25)


def test_unreadable_files_are_not_called_unsafe(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(Exception, match=r"cannot read checkpoint .*junk\.pth: it is not a checkpoint torch\.load can "
                                        r"read \(UnpicklingError: Unsupported operand 0\)") as info:
        read_checkpoint(tmp_path / "junk.pth")
    assert not isinstance(info.value, UnsafeCheckpointError)


# --------------------------------------------------------------------------- commands (in-process)
@pytest.fixture
def target(tmp_path, monkeypatch) -> Path:
    """Dataset902's plans (with 'tiny') in nnUNet_preprocessed: what weights check/adapt -d 902 read."""
    folder = tmp_path / "pre" / NAME
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans()))
    (folder / "dataset.json").write_text(json.dumps(dataset_json()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return tmp_path


@pytest.mark.parametrize("command, argv", [
    ("weights", ["weights", "check", "{evil}", "-d", "902", "-c", "tiny"]),
    ("weights", ["weights", "adapt", "{evil}", "-o", "{out}", "--in-channels", "2"]),
    ("weights", ["weights", "adapt", "{evil}", "-o", "{out}", "-d", "902", "-c", "tiny"]),
    ("lora", ["lora", "info", "{evil}"]),
    ("lora", ["lora", "merge", "{evil}", "{evil}", "-o", "{out}"]),
    ("lora", ["lora", "merge", "{adapters}", "{evil}", "-o", "{out}"]),
    ("analyze", ["analyze", "weights", "{evil}", "{evil}", "-d", "902", "-c", "tiny", "-o", "{out}",
                 "--no-feature-maps"]),
])
def test_commands_refuse_it_in_one_line(target, evil, marker, capsys, command, argv):
    from nnunet_transfer.policies.lora import PAYLOAD_FORMAT

    out = target / "out.pth"
    adapters = target / "lora_adapters.pth"  # a readable adapter file: the BASE is what is refused
    torch.save({"format": PAYLOAD_FORMAT, "init_args": {"plans": plans(), "configuration": "tiny",
                                                        "dataset_json": dataset_json()}}, adapters)
    args = [a.format(evil=evil, out=out, adapters=adapters) for a in argv]
    assert main(args) == 2
    assert_refused(capsys.readouterr().err, command, marker)
    assert not out.exists() and not list(target.glob("out.pth*"))


def test_the_flag_loads_a_file_you_trust(target, tmp_path, capsys):
    exotic = tmp_path / "exotic.pth"
    content = nnunet_like(plans_network(plans(), "tiny", dataset_json(), seed=0).state_dict())
    content["note"] = fractions.Fraction(1, 3)
    torch.save(content, exotic)
    assert main(["weights", "check", str(exotic), "-d", "902", "-c", "tiny"]) == 2
    assert_refused(capsys.readouterr().err, "weights", tmp_path / "no-marker", wanted="fractions.Fraction")
    assert main(["weights", "check", str(exotic), "-d", "902", "-c", "tiny", TRUST_FLAG]) == 0
    assert "OK: -pretrained_weights will load" in capsys.readouterr().out


def test_compare_reads_the_training_log_safely(tmp_path, evil, marker):
    from nnunet_transfer.experiments.arms import run_info

    fold = tmp_path / "fold_0"
    fold.mkdir()
    os.link(evil, fold / "checkpoint_final.pth")
    with pytest.raises(UnsafeCheckpointError, match=rf"checkpoint_final\.pth: it asks for {SYSTEM},"):
        run_info(fold)
    assert not marker.exists()


@pytest.mark.parametrize("trainer", [T.nnUNetTrainerFinetune, T.nnUNetTrainerStaged_headsFirst, T.nnUNetTrainerLoRA])
def test_resume_reads_the_checkpoint_safely_before_nnunet_does(evil, marker, trainer):
    """``--c`` / ``--val``: nnU-Net hands the checkpoint to ``trainer.load_checkpoint``, whose own first read
    refuses it before nnU-Net's ``torch.load(weights_only=False)`` would run it."""
    from torch import nn

    bare = trainer.__new__(trainer)  # what load_checkpoint reads of an initialised trainer before the file
    bare.was_initialized, bare.network = True, nn.Sequential()
    with pytest.raises(UnsafeCheckpointError, match=rf"it asks for {SYSTEM},"):
        bare.load_checkpoint(str(evil))
    assert not marker.exists()


def test_plans_transfer_from_a_model_folder_never_unpickles_its_checkpoint(tmp_path, monkeypatch, evil, marker):
    from nnunet_transfer.data import TARGET, make_dataset
    from plans.test_model_folder import make_model

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    make_dataset(tmp_path / "raw", 902, "Target", TARGET, n_train=2, physical_size=8.0)
    (tmp_path / "pre" / "Dataset902_Target").mkdir()
    fp = {"spacings": [[1.5, 1.0, 1.0]] * 2, "shapes_after_crop": [[5, 8, 8]] * 2,
          "foreground_intensity_properties_per_channel": {"0": {
              "max": 300.0, "mean": 110.0, "median": 105.0, "min": -20.0, "percentile_00_5": 0.5,
              "percentile_99_5": 250.0, "std": 45.0}}, "median_relative_size_after_cropping": 1.0}
    (tmp_path / "pre" / "Dataset902_Target" / "dataset_fingerprint.json").write_text(json.dumps(fp))
    model = make_model(tmp_path / "res")
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    os.link(evil, model / "fold_0" / "checkpoint_final.pth")
    assert main(["plans", "transfer", "-s", str(model), "-t", "902"]) == 0  # plans and labels only
    assert not marker.exists()


def test_a_study_refuses_its_pretrained_checkpoint_before_any_run(tmp_path, monkeypatch, evil, marker, capsys):
    from study.fake_tree import DEFAULT_STUDY, make_tree, set_env

    set_env(monkeypatch, tmp_path)
    text = DEFAULT_STUDY.replace('trainer = "nnUNetTrainerFrozenEncoder"',
                                 'trainer = "nnUNetTrainerFrozenEncoder"\npretrained = "source"')
    text = text.replace("[splits]", f'[pretrained]\nsource = "{evil}"\n\n[splits]')
    path = make_tree(tmp_path, study_text=text)
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert_refused(err.replace(f"study file {path} [pretrained] 'source' for strategy 'frozen' "
                               f"(nnUNetTrainerFrozenEncoder): ", ""), "study", marker)
    assert not list((tmp_path / "results").rglob("fold_*"))


# --------------------------------------------------------------------------- real nnU-Net (session workspace)
SAFE = "safe_load"
#: trainers that need a setting of their own before they get to the file
OWN_SETTINGS = {"nnUNetTrainerStaged": {"stages": "decoder+seg:1,all"}, "nnUNetTrainerPartialFT": {"trainable": "decoder"}}
#: presets that refuse a 3-stage network before they get to the file: they are built with 4 stages (the file is
#: refused when it is read, before it is compared with the network)
FOUR_STAGES = {"nnUNetTrainerPartialFT_outer", "nnUNetTrainerPartialFT_inner", "nnUNetTrainerPartialFT_first2",
               "nnUNetTrainerPartialFT_deepEncoder"}


def configuration(trainer: str) -> str:
    return f"{SAFE}_4stages" if trainer in FOUR_STAGES else f"{SAFE}_{trainer}" if trainer in OWN_SETTINGS else SAFE


@pytest.fixture(scope="module")
def evil_source(workspace, tmp_path_factory):
    """The workspace's source checkpoint (fits the target's plans) with ``touch MARKER`` in its log."""
    ws = workspace
    ws.configure(TARGET_ID, TINY, SAFE, QUICK_SETTINGS)
    for trainer, settings in OWN_SETTINGS.items():
        ws.configure(TARGET_ID, TINY, configuration(trainer), {**QUICK_SETTINGS, **settings})
    ws.configure(TARGET_ID, "3d_fullres", f"{SAFE}_4stages", QUICK_SETTINGS, features="4,8,16,32", patch="32,32,32")
    folder = tmp_path_factory.mktemp("evil_source")
    content = read_checkpoint(ws.source_checkpoint)
    content["logging"]["train_losses"].append(RunsCommand(folder / "MARKER"))
    torch.save(content, folder / "evil.pth")
    return ws, folder / "evil.pth", folder / "MARKER"


@pytest.mark.slow
def test_nnunetv2_train_refuses_it_before_nnunet_unpickles_it(evil_source):
    ws, evil, marker = evil_source
    proc = ws.run_expect_failure(["nnUNetv2_train", TARGET_ID, SAFE, 0, "-tr", "nnUNetTrainerFinetune", "-device",
                                  "cpu", "-pretrained_weights", evil], train=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "nnunet_transfer: error:" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"nnunet_transfer: error: refused to load checkpoint {evil}: "
                                                   f"it asks for {SYSTEM},"), proc.stderr[-3000:]
    assert not marker.exists(), "the checkpoint's command ran"
    assert not ws.fold_folder(TARGET_ID, SAFE, "nnUNetTrainerFinetune").parent.exists()


@pytest.mark.slow
def test_every_trainer_refuses_it_as_pretrained_weights(evil_source):
    ws, evil, marker = evil_source
    trainers = list(T.__all__)
    commands = [["nnUNetv2_train", TARGET_ID, configuration(t), 0, "-tr", t, "-device", "cpu", "-pretrained_weights",
                 evil] for t in trainers]
    printed = ws.refusals(commands)
    wrong = {t: text for t, text in zip(trainers, printed)
             if not (text.startswith(f"nnunet_transfer: error: refused to load checkpoint {evil}: it asks for {SYSTEM},")
                     and text.count("\n") == 1 and TRUST_FLAG in text and f"{TRUST_ENV}=1" in text)}
    assert not wrong, wrong
    assert not marker.exists(), "the checkpoint's command ran"


@pytest.mark.slow
def test_analyze_compare_refuses_it(evil_source, tmp_path, capsys):
    ws, evil, marker = evil_source
    assert main(["analyze", "compare", str(ws.source_checkpoint), str(evil), "-d", str(TARGET_ID), "-c", TINY,
                 "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert_refused(capsys.readouterr().err, "analyze", marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_checkpoint_the_suite_wrote_loads_without_the_opt_in(workspace):
    """Checkpoints, start weights, snapshots and adapter files of every run in the session's results tree
    (nnU-Net's and our trainers' keys: logs with numpy scalars, settings, L2-SP anchors, LoRA state, transfer
    reports) read safely, and equal to what nnU-Net's unrestricted read gives."""
    results = workspace.root / "results"
    files = sorted(p for p in results.rglob("*.pth"))
    assert any(p.name == "checkpoint_final.pth" for p in files) and any(p.name == "start_weights.pth" for p in files)
    numpy_logs = 0
    for path in files:
        safe = read_checkpoint(path, trust=False)
        assert same_values(torch.load(path, map_location="cpu", weights_only=False), safe), path
        logging = safe.get("logging") or {}
        numpy_logs += any(isinstance(v, np.generic) for vals in logging.values() if isinstance(vals, list) for v in vals)
    assert numpy_logs >= 1, "no nnU-Net training log with numpy scalars was checked"
