"""The one environment of nnU-Net's programs (demo, tests, benchmarks, ``study run``) and the shim folder."""
from __future__ import annotations

import os

import pytest

from nnunet_transfer.environment import (SMALL_MACHINE, ext_trainer_folder, nnunet_environment,
                                         with_ext_trainer)
from nnunet_transfer.errors import DataError

OURS = str(ext_trainer_folder())


def test_the_shim_folder_holds_the_one_shim_module():
    assert sorted(p.name for p in ext_trainer_folder().glob("*.py")) == ["nnunet_transfer_trainers.py"]


@pytest.mark.parametrize("value, expected", [
    (None, [OURS]),
    ("", [OURS]),
    ("/mine", [OURS, "/mine"]),
    (f"/mine{os.pathsep}/other", [OURS, "/mine", "/other"]),
    (f"/mine{os.pathsep}{OURS}", ["/mine", OURS]),  # already there: the user's order is kept
])
def test_ext_trainer_is_put_first_unless_there(value, expected):
    assert with_ext_trainer(value).split(os.pathsep) == expected


def test_workspace_environment(tmp_path):
    base = {"nnUNet_extTrainer": "/mine", "nnUNet_compile": "t", "PATH": "/bin"}
    env = nnunet_environment(tmp_path / "ws", base, defaults=SMALL_MACHINE)
    root = (tmp_path / "ws").resolve()
    assert {v: env[v] for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")} == {
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results")}
    assert all((root / sub).is_dir() for sub in ("raw", "preprocessed", "results"))
    assert env["nnUNet_extTrainer"] == f"{OURS}{os.pathsep}/mine"  # the user's own folder is kept
    assert env["nnUNet_compile"] == "t" and env["nnUNet_def_n_proc"] == "1"  # defaults only where unset
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    assert base == {"nnUNet_extTrainer": "/mine", "nnUNet_compile": "t", "PATH": "/bin"}  # not changed


def test_study_environment_uses_this_process_folders(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var / ".." / var))
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    env = nnunet_environment(extra={"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "0"})
    assert env["nnUNet_results"] == str((tmp_path / "nnUNet_results").resolve())
    assert env["nnUNet_extTrainer"] == OURS
    assert "nnUNet_def_n_proc" not in env  # no small-machine defaults unless asked
    assert env["OMP_NUM_THREADS"] == "2" and env["PYTHONUNBUFFERED"] == "0"  # extra comes last
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(DataError, match="nnUNet_results is not set"):
        nnunet_environment()


def test_given_environment_is_taken_as_it_is(tmp_path):
    base = {"nnUNet_raw": "r", "nnUNet_preprocessed": "p", "nnUNet_results": "x",
            "nnUNet_extTrainer": OURS}
    env = nnunet_environment(base=base)
    assert (env["nnUNet_raw"], env["nnUNet_results"], env["nnUNet_extTrainer"]) == ("r", "x", OURS)
    with pytest.raises(DataError, match="nnUNet_preprocessed is not set for nnU-Net's programs"):
        nnunet_environment(base={"nnUNet_raw": "r", "nnUNet_results": "x"})
