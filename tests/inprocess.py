"""Our trainers built in-process, the way ``nnUNetv2_train`` builds them, on the tiny test plans (no data, no
subprocess): ``plans_with(settings)`` and the ``build`` fixture that test modules import."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.plans.primus import add_primus_configuration, primus_architecture

DATA = Path(__file__).parent / "data"
DATASET_JSON = json.loads((DATA / "dataset_ct2labels.json").read_text())


#: the tiny Primus of the in-process tests (tests/nets.py PRIMUS): 4 transformer blocks, 16³ patch
PRIMUS_ARCH = {"embed_dim": 48, "eva_depth": 4, "eva_numheads": 2, "patch_embed_size": [8, 8, 8]}


def plans_with(settings: dict, *, primus: bool = False) -> dict:
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    if primus:
        plans = add_primus_configuration(plans, base="3d_fullres", new="tiny",
                                         architecture=primus_architecture(**PRIMUS_ARCH), patch=(16, 16, 16),
                                         batch_size=2)
    else:
        plans = add_configuration(plans, base="3d_fullres", new="tiny", features="8,16,32", patch="32,32,32",
                                  batch_size=2)
    plans["configurations"]["run"] = {"inherits_from": "tiny", "nnunet_transfer": settings}
    plans["continue_training"] = False  # as nnUNetv2_train passes it
    return plans


@pytest.fixture
def build(tmp_path, monkeypatch):
    """``build(TrainerClass, settings, primus=False)``: an initialised trainer (seed 0) in its own nnU-Net folders
    (``primus=True``: on the tiny Primus configuration)."""
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    data = tmp_path / "pre" / "Dataset901_TransferSource" / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()  # nnU-Net infers the dataset class from the file endings in initialize()

    def make(cls, settings, primus=False):
        torch.manual_seed(0)
        trainer = cls(plans=plans_with({"seed": 0, **settings}, primus=primus), configuration="run", fold=0,
                      dataset_json=DATASET_JSON, device=torch.device("cpu"))
        trainer.initialize()
        return trainer
    return make
