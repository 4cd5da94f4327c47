"""``nnunet_transfer doctor`` and ``trainer-path`` against real nnU-Net lookups."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.environment import ext_trainer_folder
from nnunet_transfer.trainers import __all__ as TRAINERS


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path


def test_trainer_path_is_the_shim_folder(capsys):
    assert main(["trainer-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == ext_trainer_folder()
    # exactly one module there: nnU-Net imports every module of the folder as a top-level module
    assert sorted(p.name for p in folder.glob("*.py")) == ["nnunet_transfer_trainers.py"]


def test_doctor_passes_on_a_good_environment(folders, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", str(ext_trainer_folder()))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in TRAINERS:
        assert f"[ok] {name} resolves to nnunet_transfer.trainers." in out
    assert out.strip().endswith("all checks passed")


def test_doctor_reports_each_problem_with_its_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "missing"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[PROBLEM] nnUNet_raw is not set\n    fix: export nnUNet_raw=/path/to/nnUNet_raw" in out
    assert (f"[PROBLEM] nnUNet_preprocessed={tmp_path / 'missing'} does not exist\n"
            f"    fix: mkdir -p {tmp_path / 'missing'}") in out
    assert f"[ok] nnUNet_results={tmp_path}" in out
    assert (f'fix: export nnUNet_extTrainer="$nnUNet_extTrainer{os.pathsep}$(nnunet_transfer '
            f'trainer-path)"') in out
    # nnU-Net's own lookup cannot find our trainers through that variable
    assert f"[PROBLEM] nnU-Net cannot resolve {TRAINERS[0]}: RuntimeError: Could not find" in out
    assert out.strip().endswith("problem(s) found")


def test_doctor_unset_ext_trainer_fix_line(folders, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["doctor"]) == 1
    assert "fix: export nnUNet_extTrainer=$(nnunet_transfer trainer-path)" in capsys.readouterr().out


def test_console_script_exit_code_on_problem(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    proc = subprocess.run([sys.executable, "-m", "nnunet_transfer.cli.main", "doctor"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "nnUNet_raw is not set" in proc.stdout
