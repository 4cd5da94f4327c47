"""``nnunet_transfer analyze`` end to end on real nnUNetv2_train runs with snapshots: the four runs of the Karimi
smoke study (tests/conftest.py ``karimi``: 2 from scratch, 2 fine-tuned from the source model, on dataset 912 with
2 and all training cases, a snapshot every epoch), which the suite trains once for tests/test_e2e_study.py and
this module; then every study through the command line.

The bad-input checks add configurations to the plans of the shared target 902 (not to the study's 912, whose
plans file the study's report records) and analyse the study's runs with ``-d 902``: the same tiny network."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_transfer.analysis.runs import convergence_epoch, run_label
from nnunet_transfer.cli.main import main
from nnunet_transfer.study.state import results_folder
from nnunet_transfer.training.snapshots import read_index

from analysis.test_convergence import by_hand, check_filter_numbers, nanmean2, one_tile_dice
from conftest import FIXED, TARGET_ID, TINY, load_checkpoint

pytestmark = pytest.mark.slow

RI, TL = "nnUNetTrainerTransferBase", "nnUNetTrainerFinetune"
EPOCHS = 2  # examples/karimi/smoke.toml: num_epochs = 2, snapshot_every = 1
# 4 patches x 512 voxels = 2048 samples >= 100 x 16 channels: no sample-size warning
FAST = ["--patches", "4", "--device", "cpu", "--no-progress"]
TOL = 1e-9


@pytest.fixture(scope="module")
def runs(workspace, karimi):
    """The Karimi smoke study's finished runs: RI = scratch (2 cases, all), TL = finetune (2 cases, all); each run
    also by its plans configuration and nnU-Net fold (``study``) for the command line's -c/-tr/-f form."""
    study, out = karimi["study"], {"RI": [], "TL": [], "study": {}}
    by = {(r.strategy.name, r.size_index): r for r in karimi["runs"]}
    for group, strategy in (("RI", "scratch"), ("TL", "finetune")):
        for i in (0, 1):
            run = by[(strategy, i)]
            assert run.trainer == {"RI": RI, "TL": TL}[group]
            fold = results_folder(study, run)
            out[group].append(fold)
            out["study"][fold] = run
    return workspace, out


def analyze(capsys, *args) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def valid_png(path: Path) -> bool:
    from matplotlib.image import imread

    img = imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def in_unit(x) -> bool:
    return x is not None and -TOL <= x <= 1 + TOL


def test_runs_wrote_snapshots(runs):
    _, r = runs
    for fold in r["RI"] + r["TL"]:
        index = read_index(fold)
        assert [e["epoch"] for e in index] == list(range(EPOCHS + 1))
        assert all(e["mean_fg_dice"] is not None for e in index[1:])


def test_compare_with_default_sampling(runs, capsys, tmp_path):
    ws, r = runs
    code, out, err = analyze(capsys, "compare", r["TL"][0], r["TL"][1], r["RI"][0], "-d", FIXED, "-c", TINY,
                             "--device", "cpu", "-o", tmp_path)
    assert code == 0, err
    assert "warning" not in err
    data = json.loads((tmp_path / "compare.json").read_text())
    layers = data["meta"]["layers"]
    assert [l["block"] for l in layers] == [1, 2, 4, 5]  # the default for N = 3 stages
    assert all(l["samples"] >= 100 * l["channels"] for l in layers)
    assert data["meta"]["sampling"]["patches"] == 16 and data["meta"]["sampling"]["patches_auto"]
    rows = data["tables"]["similarity"]
    assert len(rows) == 3 * 4
    for row in rows:
        for m in ("pwcca", "mean_cca", "svcca", "linear_cka"):
            assert in_unit(row[m]) and in_unit(row[f"null_{m}"]), row
        assert row["null_pwcca"] < 0.25 and row["pwcca"] > row["null_pwcca"]
    # two fine-tuned copies of one source model stay closer than a fine-tuned and a scratch network
    tl0, tl1, ri0 = (f"{run_label(f)}@final" for f in (r["TL"][0], r["TL"][1], r["RI"][0]))
    tl_tl = [r_["pwcca"] for r_ in rows if r_["a"] == tl0 and r_["b"] == tl1]
    tl_ri = [r_["pwcca"] for r_ in rows if r_["a"] == tl0 and r_["b"] == ri0]
    assert len(tl_tl) == len(tl_ri) == 4 and sum(tl_tl) > sum(tl_ri)
    assert valid_png(tmp_path / "compare.png")
    assert (tmp_path / "summary.md").read_text().startswith("# compare")


def test_evolution(runs, capsys, tmp_path):
    ws, r = runs
    fold = r["RI"][0]
    run = r["study"][fold]
    expected = convergence_epoch(read_index(fold), source="ema")
    # the run by trainer and fold, as nnU-Net names it
    code, out, err = analyze(capsys, "evolution", "-d", FIXED, "-c", run.configuration, "-tr", RI, "-f",
                             run.nnunet_fold, *FAST, "-o", tmp_path)
    assert code == 0, err
    evo = json.loads((tmp_path / "evolution.json").read_text())
    assert evo["convergence_epoch"] == expected
    assert evo["epochs"] == list(range(EPOCHS + 1))
    assert Path(evo["run"]) == fold
    for row in evo["tables"]["similarity"]:
        assert in_unit(row["pwcca"]) and in_unit(row["null_pwcca"]) and row["null_pwcca"] < 0.25
        if row["epoch"] == expected:
            assert row["converged"] and row["pwcca"] == pytest.approx(1, abs=TOL)
    assert f"convergence epoch: **{expected}**" in (tmp_path / "summary.md").read_text()
    assert valid_png(tmp_path / "evolution.png")
    # the default curve is nnU-Net's own EMA: the snapshot index holds, at snapshot epoch e (completed epochs),
    # the value nnU-Net logged at the end of epoch e - 1; the epoch is the first within 0.5 % of its maximum
    log = load_checkpoint(fold / "checkpoint_final.pth")["logging"]["ema_fg_dice"]
    conv = json.loads((tmp_path / "convergence.json").read_text())["runs"][0]
    assert conv["source"] == "ema" and conv["epoch"] == expected
    assert [(c["epoch"], c["value"]) for c in conv["curve"]] == [(i + 1, pytest.approx(v)) for i, v in enumerate(log)]
    assert expected == by_hand([(i + 1, v) for i, v in enumerate(log)])
    # an explicit convergence epoch
    code, out, err = analyze(capsys, "evolution", fold, "-d", FIXED, "-c", TINY, "--convergence-epoch", 0,
                             "--layers", "blocks:1", *FAST, "-o", tmp_path / "e0")
    assert code == 0, err
    assert json.loads((tmp_path / "e0" / "evolution.json").read_text())["convergence_epoch"] == 0


def test_groups_reuse_weights(runs, capsys, tmp_path):
    ws, r = runs
    groups = [f"RI={r['RI'][0]},{r['RI'][1]}", f"TL={r['TL'][0]},{r['TL'][1]}"]
    code, out, err = analyze(capsys, "groups", "--group", groups[0], "--group", groups[1], "-d", FIXED,
                             "-c", TINY, *FAST, "-o", tmp_path / "groups")
    assert code == 0, err
    g = json.loads((tmp_path / "groups" / "groups.json").read_text())["tables"]
    assert len(g["pairs"]) == 6 * 4
    assert {(x["group_a"], x["group_b"]) for x in g["groups"]} == {("RI", "RI"), ("RI", "TL"), ("TL", "TL")}
    assert all(in_unit(x["mean"]) and in_unit(x["null_mean"]) for x in g["groups"])
    perm = [t for t in g["tests"] if t["test"].startswith("permutation")]
    assert len(perm) == 4 and all(t["exact"] and 0 < t["p_value"] <= 1 for t in perm)
    welch = [t for t in g["tests"] if t["test"].startswith("Welch")]
    assert len(welch) == 3 * 4  # within groups of 2 networks there is one pair: t is undefined
    assert valid_png(tmp_path / "groups" / "groups.png")

    code, out, err = analyze(capsys, "reuse", "--ri", f"{r['RI'][0]},{r['RI'][1]}", "--tl", str(r["TL"][0]),
                             "--tl", str(r["TL"][1]), "-d", FIXED, "-c", TINY, *FAST, "-o", tmp_path / "reuse")
    assert code == 0, err
    reuse = json.loads((tmp_path / "reuse" / "reuse.json").read_text())
    for row in reuse["tables"]["reuse"]:
        assert in_unit(row["tl_pwcca"]) and in_unit(row["ri_pwcca"])
        assert row["reuse_pwcca"] == pytest.approx(row["tl_pwcca"] - row["ri_pwcca"])
        assert -1 <= row["reuse_pwcca"] <= 1 and row["null_pwcca"] < 0.25
    assert [x["start"].endswith("@0") for x in reuse["runs"]] == [True] * 4
    assert valid_png(tmp_path / "reuse" / "reuse.png")

    code, out, err = analyze(capsys, "weights", r["TL"][0], "-d", FIXED, "-c", TINY, "--device", "cpu",
                             "--no-progress", "--filters", "4", "-o", tmp_path / "weights", "--converged", "final")
    assert code == 0, err
    w = json.loads((tmp_path / "weights" / "weights.json").read_text())
    name = r["TL"][0].name  # fold_N
    assert w["start"].endswith(f"{name}@0") and w["end"].endswith(f"{name}@final")
    assert all(math.isfinite(c["ratio"]) and c["ratio"] >= 0 for c in w["tables"]["conv"])
    assert {x["group"] for x in w["tables"]["group"]} == {"encoder", "bottleneck", "decoder", "seg"}
    pngs = sorted(p.name for p in (tmp_path / "weights").glob("*.png"))
    assert pngs == ["featuremaps_block1.png", "featuremaps_block2.png", "featuremaps_block4.png",
                    "featuremaps_block5.png", "filters_block1.png", "filters_block2.png", "filters_block4.png",
                    "filters_block5.png", "weights.png"]
    assert all(valid_png(tmp_path / "weights" / p) for p in pngs)


def test_bad_input_on_real_runs(runs, capsys, tmp_path):
    ws, r = runs
    source_fold = ws.source_checkpoint.parent  # pretrained without snapshots
    plans_file = ws.root / "preprocessed" / ws.target / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["an_nodata"] = {"inherits_from": TINY, "data_identifier": "an_missing"}
    plans["configurations"]["an_empty"] = {"inherits_from": TINY, "data_identifier": "an_empty"}
    plans_file.write_text(json.dumps(plans, indent=4))
    (plans_file.parent / "an_empty").mkdir(exist_ok=True)
    cases = [
        (["compare", r["RI"][0], r["TL"][0], "-c", "3d_fullres"], "is not a network of"),
        (["compare", r["RI"][0], r["TL"][0], "-c", TINY, "--layers", "blocks:7"], "block 7 in spec 'blocks:7' is out of range"),
        (["evolution", source_fold, "-c", TINY], "has no snapshots"),
        (["compare", r["RI"][0], r["TL"][0], "-c", TINY, "--patches", "1", "--voxels-per-patch", "8"], "too few samples"),
        (["compare", r["RI"][0], r["TL"][0], "-c", TINY, "--cases", "nope"], "case(s) ['nope'] not in"),
        (["compare", r["RI"][0], r["TL"][0], "-c", "an_nodata"], "an_missing does not exist; run nnUNetv2_preprocess"),
        (["compare", r["RI"][0], r["TL"][0], "-c", "an_empty"], "an_empty holds no cases"),
    ]
    for args, message in cases:
        code, out, err = analyze(capsys, *args, "-d", TARGET_ID, "--device", "cpu", "--no-progress",
                                 "-o", tmp_path)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_weights_to_the_convergence_epoch_and_validation_mode(runs, capsys, tmp_path, monkeypatch):
    from nnunet_transfer.analysis import session

    ws, r = runs
    # the Karimi study's report validated these snapshots in this process already: validate them again here
    monkeypatch.setattr(session, "_VALIDATED", {})
    fold = r["TL"][0]
    # default: from the epoch-0 snapshot to the EMA convergence epoch
    code, out, err = analyze(capsys, "weights", fold, "-d", FIXED, "-c", TINY, "--device", "cpu", "--no-progress",
                             "--no-feature-maps", "-o", tmp_path / "ema")
    assert code == 0, err
    w = json.loads((tmp_path / "ema" / "weights.json").read_text())
    e_ema = convergence_epoch(read_index(fold), source="ema")
    name = fold.name  # fold_N
    assert w["start"].endswith(f"{name}@0") and w["end"].endswith(f"{name}@{e_ema}") and w["convergence_from"] == "ema"
    check_filter_numbers(w["tables"], fold / "snapshots" / "epoch_0000.pth", fold / "snapshots" / f"epoch_{e_ema:04d}.pth")
    assert (tmp_path / "ema" / "convergence.json").is_file()
    # a real validation of every snapshot on the fold's validation cases (nnU-Net's split)
    code, out, err = analyze(capsys, "weights", fold, "-d", FIXED, "-c", TINY, "--device", "cpu", "--no-progress",
                             "--no-feature-maps", "--convergence-from", "validation", "-o", tmp_path / "val")
    assert code == 0, err
    conv = json.loads((tmp_path / "val" / "convergence.json").read_text())["runs"][0]
    pre = ws.root / "preprocessed" / ws.dataset_name(FIXED)
    split = json.loads((pre / "splits_final.json").read_text())[r["study"][fold].nnunet_fold]["val"]
    assert conv["source"] == "validation" and conv["validation"]["cases"] == split and len(split) >= 1
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(ws.plans(FIXED)).get_configuration(TINY)
    ds = infer_dataset_class(str(pre / cm.data_identifier))(str(pre / cm.data_identifier))
    patch = cm.patch_size
    labels = conv["validation"]["labels_or_regions"]
    from nnunet_transfer.nnunet_io import build_network

    net = build_network(ws.plans(FIXED), TINY, json.loads((pre / "dataset.json").read_text()), deep_supervision=False)
    curve = []
    for entry in conv["validation"]["per_snapshot"]:
        net.load_state_dict(torch.load(fold / "snapshots" / f"epoch_{entry['epoch']:04d}.pth")["network_weights"])
        per_case = []
        for case in split:
            data, seg, _, _ = ds.load_case(case)
            per_case.append(one_tile_dice(net, np.asarray(data), np.asarray(seg), patch, labels))
            assert entry["cases"][case] == pytest.approx(per_case[-1], abs=1e-3, nan_ok=True), (entry["epoch"], case)
        curve.append((entry["epoch"], nanmean2(per_case)))
    assert [(c["epoch"], c["value"]) for c in conv["curve"]] == [(e, pytest.approx(v, abs=1e-3)) for e, v in curve]
    assert conv["epoch"] == by_hand([(c["epoch"], c["value"]) for c in conv["curve"]])
    w = json.loads((tmp_path / "val" / "weights.json").read_text())
    assert w["end"].endswith(f"{name}@{conv['epoch']}")
    check_filter_numbers(w["tables"], fold / "snapshots" / "epoch_0000.pth",
                         fold / "snapshots" / f"epoch_{conv['epoch']:04d}.pth")


def test_failures_on_real_runs_leave_no_folder(runs, capsys, tmp_path):
    ws, r = runs
    source_fold = ws.source_checkpoint.parent  # no snapshots
    (tmp_path / "file").write_text("x")
    cases = [
        (["compare", r["RI"][0], r["TL"][0], "-c", "3d_fullres"], tmp_path / "a" / "out", "is not a network of"),
        (["evolution", source_fold, "-c", TINY], tmp_path / "b" / "out", "has no snapshots"),
        (["weights", r["RI"][0], "-c", TINY, "--convergence-from", "validation", "--tolerance", "1.5"],
         tmp_path / "c" / "out", "--tolerance must be a fraction"),
        (["reuse", "--ri", r["RI"][0], "--tl", source_fold, "-c", TINY], tmp_path / "d" / "out", "has no snapshots"),
        (["compare", r["RI"][0], r["TL"][0], "-c", TINY], tmp_path / "file" / "out", "is a file, not a folder"),
    ]
    for args, out, message in cases:
        code, _, err = analyze(capsys, *args, "-d", TARGET_ID, "--device", "cpu", "--no-progress", "-o", out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
