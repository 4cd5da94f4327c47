"""``doctor --install-hints``: the start-up file and what it does (only in nnU-Net's two programs)."""
from __future__ import annotations

import sys

from nnunet_transfer import _hints
from nnunet_transfer.cli.main import main
from nnunet_transfer.trainer_messages import missing_model_message, our_trainer_names


def test_install_and_remove_the_hints_file(tmp_path, capsys):
    assert main(["doctor", "--install-hints", "--site-dir", str(tmp_path)]) == 0
    path = tmp_path / _hints.PTH_NAME
    assert path.read_text() == _hints.PTH_LINE and path.read_text().startswith("import ")  # site runs it
    assert main(["doctor", "--remove-hints", "--site-dir", str(tmp_path)]) == 0
    assert not path.exists()
    assert main(["doctor", "--install-hints", "--site-dir", str(tmp_path / "nope")]) == 2
    assert "site-packages folder" in capsys.readouterr().err


def test_hook_only_in_nnunet_programs(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert _hints.install(["/venv/bin/python", "-c", "x"]) is False
    assert sys.excepthook is sys.__excepthook__
    assert _hints.install(["/venv/bin/nnUNetv2_predict", "-h"]) is True
    assert getattr(sys.excepthook, "_nnunet_transfer", False)


def test_missing_model_message(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/somewhere")
    ds = tmp_path / "Dataset902_T"
    (ds / "nnUNetTrainerFinetune__nnUNetPlans__tiny" / "fold_0").mkdir(parents=True)
    msg = missing_model_message(str(ds / "nnUNetTrainerFinetun__nnUNetPlans__tiny" / "dataset.json"))
    assert msg.startswith(f"no trained model {ds / 'nnUNetTrainerFinetun__nnUNetPlans__tiny'}: Dataset902_T has "
                          f"nnUNetTrainerFinetune__nnUNetPlans__tiny; for the trainer 'nnUNetTrainerFinetun'; "
                          f"closest of nnunet_transfer: nnUNetTrainerFinetune")
    assert "nnUNet_extTrainer=/somewhere (it does not contain this package's trainers" in msg
    assert missing_model_message(str(tmp_path / "other" / "file.json")) is None


def test_our_trainer_names_are_what_the_shim_exports():
    # the messages read the names from trainers/' sources (no import); they must be the shim's
    from nnunet_transfer.trainers import __all__ as exported

    assert our_trainer_names() == sorted(exported)
