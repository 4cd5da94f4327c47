"""L2-SP end to end through nnUNetv2_train on generated data."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import QUICK_SETTINGS, TARGET_ID, TINY, assert_one_line_error, load_checkpoint

pytestmark = pytest.mark.slow

L2SP = "nnUNetTrainerL2SP"


def params(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}


def encoder(state: dict) -> dict:
    return {k: v for k, v in params(state).items() if k.startswith("encoder.")}


def drift(final: dict, anchor: dict) -> float:
    return float(sum(((final[k].double() - a.double()) ** 2).sum() for k, a in anchor.items()) ** 0.5)


@pytest.fixture(scope="module")
def runs(workspace):
    ws, out = workspace, {}

    def run(name, trainer, settings, pretrained=True):
        ws.configure(TARGET_ID, TINY, name, {**QUICK_SETTINGS, **settings})
        out[name] = ws.train(TARGET_ID, name, trainer, pretrained=ws.source_checkpoint if pretrained else None)

    run("cmp_ft", "nnUNetTrainerFinetune", {})
    run("l2sp_0", L2SP, {"l2sp_alpha": 0.0})
    run("l2sp_small", L2SP, {"l2sp_alpha": 0.01})
    run("l2sp_big", L2SP, {"l2sp_alpha": 10.0})
    run("l2sp_inf", L2SP, {"l2sp_alpha": "inf"})
    run("l2sp_rnd", "nnUNetTrainerL2SP_Sagie", {"snapshot_every": 1})
    return ws, out


def test_alpha_zero_reproduces_finetune(runs):
    # Same seed, same data order (augmentation in the main process), same LR: with α = 0 the penalty adds
    # nothing and the anchored parameter group keeps nnU-Net's weight decay, so SGD performs the same float
    # operations per element. Tolerance 5e-7, not 0: two trainings on a loaded 2-core machine once differed by
    # 6e-8 (a CPU kernel's reduction order); the smallest real penalty, α = 0.01, moves them 3e-6 in these six
    # steps, and the test checks that it stays above the tolerance (else it could not tell α = 0 from α > 0).
    tolerance = 5e-7
    _, out = runs
    a = params(load_checkpoint(out["cmp_ft"] / "checkpoint_final.pth")["network_weights"])
    b = params(load_checkpoint(out["l2sp_0"] / "checkpoint_final.pth")["network_weights"])
    c = params(load_checkpoint(out["l2sp_small"] / "checkpoint_final.pth")["network_weights"])
    assert a.keys() == b.keys() == c.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tolerance, f"max |Finetune - L2SP(alpha=0)| = {worst}"
    penalised = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert penalised > 4 * tolerance, f"max |Finetune - L2SP(alpha=0.01)| = {penalised}: the tolerance cannot tell"


def test_anchor_is_the_pretrained_encoder(runs):
    ws, out = runs
    source = load_checkpoint(ws.source_checkpoint)["network_weights"]
    anchor = load_checkpoint(out["l2sp_small"] / "checkpoint_final.pth")["nnunet_transfer"]["l2sp_anchor"]
    assert set(anchor) == set(encoder(source))
    assert all(torch.equal(anchor[k], source[k]) for k in anchor)


def test_larger_alpha_drifts_less(runs):
    ws, out = runs
    source = encoder(load_checkpoint(ws.source_checkpoint)["network_weights"])
    small = drift(load_checkpoint(out["l2sp_small"] / "checkpoint_final.pth")["network_weights"], source)
    big = drift(load_checkpoint(out["l2sp_big"] / "checkpoint_final.pth")["network_weights"], source)
    free = drift(load_checkpoint(out["l2sp_0"] / "checkpoint_final.pth")["network_weights"], source)
    assert 0 < big < 0.9 * small and small < free, (big, small, free)
    log = json.loads((out["l2sp_big"] / "l2sp_log.json").read_text())
    assert [e["epoch"] for e in log] == [0, 1]
    assert all(e["penalty"] > 0 and 0 < e["relative_distance"] < 1 for e in log)
    text = next(out["l2sp_big"].glob("training_log_*.txt")).read_text()
    assert "L2-SP anchor captured on" in text and "L2-SP penalty" in text


def test_resume_keeps_the_anchor_bit_identical(runs):
    ws, out = runs
    fold = out["l2sp_big"]
    before = load_checkpoint(fold / "checkpoint_final.pth")["nnunet_transfer"]["l2sp_anchor"]
    ws.configure(TARGET_ID, TINY, "l2sp_big", {**QUICK_SETTINGS, "l2sp_alpha": 10.0, "num_epochs": 3})
    ws.train(TARGET_ID, "l2sp_big", L2SP, cont=True)
    ckpt = load_checkpoint(fold / "checkpoint_final.pth")
    assert ckpt["current_epoch"] == 3
    after = ckpt["nnunet_transfer"]["l2sp_anchor"]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # the resumed run trained away from the anchor, so a re-capture would have changed it
    assert drift(ckpt["network_weights"], after) > 0
    assert [e["epoch"] for e in json.loads((fold / "l2sp_log.json").read_text())] == [0, 1, 2]


def test_infinite_alpha_freezes_the_scope(runs):
    ws, out = runs
    source = encoder(load_checkpoint(ws.source_checkpoint)["network_weights"])
    final = load_checkpoint(out["l2sp_inf"] / "checkpoint_final.pth")["network_weights"]
    assert all(torch.equal(final[k], v) for k, v in source.items())
    assert any(not torch.equal(final[k], v) for k, v in params(
        load_checkpoint(ws.source_checkpoint)["network_weights"]).items() if k.startswith("decoder.stages"))
    info = json.loads((out["l2sp_inf"] / "transfer_config.json").read_text())
    assert info["parameters"]["frozen_blocks"] == [1, 2, 3]
    assert info["drift"]["encoder"] == 0.0 and info["drift"]["decoder"] > 0


def test_every_run_ends_with_the_drift_of_encoder_and_decoder(runs):
    # the figure that shows a lambda holding the encoder: smaller for larger alpha, equal to the
    # relative distance from the anchor computed here from the checkpoints
    ws, out = runs
    source = encoder(load_checkpoint(ws.source_checkpoint)["network_weights"])
    figures = {}
    for name in ("l2sp_0", "l2sp_small"):
        info = json.loads((out[name] / "transfer_config.json").read_text())
        final = load_checkpoint(out[name] / "checkpoint_final.pth")["network_weights"]
        norm = float(sum((v.double() ** 2).sum() for v in source.values()) ** 0.5)
        assert info["drift"]["encoder"] == pytest.approx(drift(final, source) / norm, rel=1e-9)
        figures[name] = info["drift"]["encoder"]
        log = next(out[name].glob("training_log_*.txt")).read_text().strip().splitlines()
        assert any("moved from the start" in line and f"encoder {info['drift']['encoder']:.4g}" in line
                   for line in log[-3:])
    assert figures["l2sp_small"] < figures["l2sp_0"]


def test_random_decoder_init_starts_from_scratch(runs):
    ws, out = runs
    source = params(load_checkpoint(ws.source_checkpoint)["network_weights"])
    start = load_checkpoint(out["l2sp_rnd"] / "snapshots" / "epoch_0000.pth")["network_weights"]
    dec = [k for k in source if k.startswith(("decoder.stages.", "decoder.transpconvs.")) and k.endswith("weight")]
    assert dec and all(not torch.equal(start[k], source[k]) for k in dec if "norm" not in k)
    assert all(torch.equal(start[k], source[k]) for k in source if k.startswith("encoder."))
    info = json.loads((out["l2sp_rnd"] / "transfer_config.json").read_text())
    assert info["settings"]["l2sp_alpha"] == 8.0 and info["settings"]["decoder_init"] == "random"


BAD = [  # settings, with -pretrained_weights, the message
    ({"l2sp_alpha": -1.0}, True, "setting 'l2sp_alpha' must be a number >= 0 (or inf), got -1.0"),
    ({"l2sp_alpha": float("nan")}, True, "setting 'l2sp_alpha' must be a number >= 0 (or inf), got nan"),
    ({"l2sp_scope": "encoderr"}, True, "setting 'l2sp_scope': unknown term 'encoderr'"),
    ({"l2sp_alpha": 1.0}, False, "L2-SP with l2sp_alpha=1.0 pulls the scope toward the PRETRAINED weights, "
                                 "but no pretrained weights were loaded"),
]


@pytest.fixture(scope="module")
def refused(workspace):
    """Refused while nnU-Net builds the trainer (get_trainer_from_args), all in one process
    (Workspace.refusals); tests/test_e2e_errors.py runs such refusals through the real nnUNetv2_train too."""
    ws = workspace
    commands = [["nnUNetv2_train", TARGET_ID, f"bad_l2sp{i}", 0, "-tr", L2SP, "-device", "cpu"]
                + (["-pretrained_weights", ws.source_checkpoint] if pretrained else [])
                for i, (_, pretrained, _) in enumerate(BAD)]
    with ws.unchecked_configurations(TARGET_ID, TINY, {f"bad_l2sp{i}": {**QUICK_SETTINGS, **s}
                                                       for i, (s, _, _) in enumerate(BAD)}):
        return ws.refusals(commands)


@pytest.mark.parametrize("i", range(len(BAD)), ids=[m.split(",")[0] for _, _, m in BAD])
def test_bad_l2sp_settings_end_in_one_message(workspace, refused, i):
    assert_one_line_error(refused[i], BAD[i][2])
    assert not workspace.fold_folder(TARGET_ID, f"bad_l2sp{i}", L2SP).parent.exists()
