"""The shipped study files: each paper's protocol as its file declares it, and the smoke variants' shape."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.templates import AMIRI

EXAMPLES = Path(__file__).parents[2] / "examples"


def load(path: Path):
    return load_study(path, check_data=False)  # the public datasets are not here: the grammar and the trainers


def test_every_example_has_its_files():
    for paper in ("karimi", "amiri", "sagie"):
        assert {p.name for p in (EXAMPLES / paper).iterdir()} >= {"README.md", f"{paper}.toml", "smoke.toml"}


def test_karimi_protocol():
    s = load(EXAMPLES / "karimi" / "karimi.toml")
    assert [(x.name, x.trainer, x.pretrained) for x in s.strategies] == [
        ("scratch", "nnUNetTrainerTransferBase", None), ("finetune", "nnUNetTrainerFinetune", "source"),
        ("frozen_random_encoder", "nnUNetTrainerFrozenEncoder", None),
        ("frozen_decoder", "nnUNetTrainerFrozenDecoder", "source"),
        ("frozen_decoder_heads", "nnUNetTrainerFrozenDecoderAndHeads", "source")]
    assert s.splits.n_train == (15, 150) and s.splits.test == 56 and not s.splits.cross_validation  # Table 5
    assert s.baseline == "scratch" and s.scoring.test == "ttest"
    assert s.scoring.correction == "none"  # Tables 3-6: paired t-tests at p = 0.05, no correction


def test_amiri_protocol():
    s = load(EXAMPLES / "amiri" / "amiri.toml")
    assert [x.name for x in s.strategies] == ["scratch", *(p for p, _ in AMIRI)]  # Table II's order
    assert all(x.trainer == f"nnUNetTrainerPartialFT_{x.name}" for x in s.strategies[1:])
    assert s.splits.folds == 5 and s.splits.n_train == ("all", "62.5%", "6.25%") and s.splits.folds_to_run is None
    assert len(s.strategies) * 3 * 5 == 195  # the count of Amiri's runs
    # 80/50/5 % of the data: after a 20 % test fold and 20 % of the rest for validation, 64 % remain
    assert [0.64 * f for f in (1.0, 0.625, 0.0625)] == pytest.approx([0.64, 0.40, 0.04])
    # Sec. II-D: Adam, lr 1e-4, early stopping on the validation loss after 20 epochs, failed after 200, the
    # best-validation model tested
    assert {k: s.settings[k] for k in ("optimizer", "initial_lr", "lr_schedule", "early_stopping", "patience",
                                       "num_epochs")} == {"optimizer": "adam", "initial_lr": 1e-4,
                                                          "lr_schedule": "constant", "early_stopping": "val_loss",
                                                          "patience": 20, "num_epochs": 200}
    assert s.predict_checkpoint == "best"


def test_sagie_protocol():
    s = load(EXAMPLES / "sagie" / "sagie.toml")
    swept = s.sweeps["l2sp"]
    # where the encoder's drift goes from fine-tuning's to near zero under nnU-Net's optimiser (examples/sagie/
    # README.md, benchmarks/sagie_lambda.py), log-spaced, with 0 and inf
    assert [x.sweep_value for x in swept][:-1] == [0, 1e-4, 1e-3, 1e-2, 0.1, 1, 10]
    assert math.isinf(swept[-1].sweep_value)
    assert [x.name for x in swept][1:3] == ["l2sp-0.0001", "l2sp-0.001"]
    assert all(x.trainer == "nnUNetTrainerL2SP_Sagie" for x in swept) and s.baseline == "l2sp-0"
    assert s.splits.n_train == ("all",) and (s.splits.test, s.splits.val) == (11, 7)  # 5/29 and 3/29 of 63
    assert s.scoring.correction == "none"  # the paper's p-values against λ = 0 are uncorrected


@pytest.mark.parametrize("paper,n_strategies", [("karimi", 2), ("amiri", 2), ("sagie", 2)])
def test_smoke_variants(paper, n_strategies):
    s = load(EXAMPLES / paper / "smoke.toml")
    # Amiri's network is 2-D: its smoke study trains the tiny 2d configuration tests/test_e2e_study.py writes
    assert s.configuration == ("tiny2d" if paper == "amiri" else "tiny") and s.device == "cpu"
    assert len(s.strategies) == n_strategies and s.splits.repeats == 1 and len(s.splits.n_train) == 2
    assert (s.splits.folds_to_run == (0,)) if s.splits.cross_validation else s.splits.test is not None


def test_amiri_smoke_is_the_papers_protocol_in_small():
    s = load(EXAMPLES / "amiri" / "smoke.toml")
    assert {k: s.settings[k] for k in ("optimizer", "initial_lr", "lr_schedule", "early_stopping", "patience")} == \
        {"optimizer": "adam", "initial_lr": 1e-4, "lr_schedule": "constant", "early_stopping": "val_loss",
         "patience": 1}
    assert s.settings["num_epochs"] <= 3 and s.predict_checkpoint == "best"


def test_amiri_template_declares_the_papers_protocol():
    import tomllib

    from nnunet_transfer.study.templates import amiri

    doc = tomllib.loads("\n".join(amiri("Dataset914_X", 30, n_stages=5, configuration="2d", name="amiri",
                                        pretrained=Path("/x/fold_0"), device="cpu")))
    assert {k: doc["settings"][k] for k in ("optimizer", "initial_lr", "lr_schedule", "early_stopping", "patience",
                                            "num_epochs")} == {"optimizer": "adam", "initial_lr": 1e-4,
                                                               "lr_schedule": "constant", "early_stopping": "val_loss",
                                                               "patience": 20, "num_epochs": 200}
    assert doc["predict"] == {"checkpoint": "best"}
    # the shipped example is the template's protocol
    s = load(EXAMPLES / "amiri" / "amiri.toml")
    assert {k: s.settings[k] for k in doc["settings"]} == doc["settings"]


def test_karimi_declares_the_papers_analysis_and_the_template_the_same():
    import tomllib

    from nnunet_transfer.study.templates import karimi

    a = load(EXAMPLES / "karimi" / "karimi.toml").analysis
    # Figs. 6-10 and Tables 8-9; the six layers of Fig. 1 on nnU-Net's 6-stage network; T.L. = fine-tuning
    assert a.analyses == ("evolution", "groups", "reuse", "weights") and a.layers == "blocks:1,3,5,7,9,11"
    assert a.ri == ("scratch",) and a.tl == ("finetune",) and a.snapshot_every == 50 and a.patches is None
    doc = tomllib.loads("\n".join(karimi("Dataset907_X", 281, n_stages=6, configuration="3d_fullres",
                                         name="karimi", pretrained=Path("/x/fold_0"), device="cpu")))
    assert doc["analysis"] == {"analyses": list(a.analyses), "snapshot_every": 50, "layers": a.layers,
                               "tl": ["finetune"], "groups_by": a.groups_by}
    smoke = load(EXAMPLES / "karimi" / "smoke.toml")
    assert smoke.analysis.snapshot_every == 1 and smoke.analysis.patches == 2  # cheap: seconds in the test suite
    assert smoke.effective_settings(smoke.strategies[0])["snapshot_every"] == 1


def test_sagie_keeps_the_papers_grid_as_written_and_the_template_the_example_grid():
    import tomllib

    from nnunet_transfer.study.templates import sagie

    text = "\n".join(sagie("Dataset906_X", 63, configuration="3d_fullres", name="sagie", pretrained=Path("/x/fold_0"),
                           device="cpu"))
    grid = [0, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, math.inf]
    assert tomllib.loads(text)["strategy"][0]["sweep"] == {"l2sp_alpha": grid}
    example = (EXAMPLES / "sagie" / "sagie.toml").read_text()
    for t in (text, example):  # Fig. 1's grid, one uncommented '#' away
        paper = [ln[2:] for ln in t.splitlines() if ln.startswith("# sweep = ")]
        assert [tomllib.loads(ln)["sweep"] for ln in paper] == [{"l2sp_alpha": [0, 1, 2, 4, 8, 16, 50, math.inf]}]
