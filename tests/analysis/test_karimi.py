"""Studies: convergence rule, permutation test, weight change, and every ``analyze`` study through the
command line on toy runs (snapshots written by this package's snapshot policy, no training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ttest_ind

from nnunet_transfer.analysis.runs import convergence_epoch, dice_curve
from nnunet_transfer.analysis.karimi import between_minus_within, permutation_test, weight_change, welch
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import DataError
from nnunet_transfer.training.snapshots import save_snapshot

from .test_activations import TINY, TOY, tiny_network, toy_env, toy_tree  # noqa: F401 (fixtures)

# --------------------------------------------------------------------------------------------------
# convergence epoch


def idx(*dice, key="mean_fg_dice"):
    return [{"epoch": e, key: d, "file": f"epoch_{e:04d}.pth"} for e, d in enumerate(dice)]


@pytest.mark.parametrize("index, tolerance, expected", [
    (idx(None, 0.2, 0.5, 0.9, 0.9, 0.88), 0.005, 3),  # first epoch at the maximum
    (idx(None, 0.2, 0.896, 0.9, 0.7), 0.005, 2),  # 0.896 >= 0.9 * 0.995 = 0.8955
    (idx(None, 0.2, 0.895, 0.9, 0.7), 0.005, 3),  # 0.895 < 0.8955
    (idx(None, 0.2, 0.85, 0.9), 0.1, 2),  # a looser tolerance
    (idx(None, 0.2, 0.85, 0.9), 0.0, 3),
    (idx(None, 0.5, 0.6, key="ema_fg_dice"), 0.005, 2),  # only the moving average was recorded
    ([{"epoch": 0, "mean_fg_dice": None}, {"epoch": 5, "mean_fg_dice": 0.7},
      {"epoch": 10, "mean_fg_dice": 0.7}], 0.005, 5),  # snapshot_every > 1: epochs are the snapshots'
])
def test_convergence_epoch(index, tolerance, expected):
    # the curve these indexes record, given explicitly (the default is the EMA since issue 9)
    source = "ema" if any("ema_fg_dice" in e for e in index) else "raw"
    assert convergence_epoch(index, tolerance=tolerance, source=source) == expected


def test_convergence_prefers_mean_dice_and_needs_one():
    mixed = [{"epoch": 0, "mean_fg_dice": None, "ema_fg_dice": None},
             {"epoch": 1, "mean_fg_dice": 0.9, "ema_fg_dice": 0.1},
             {"epoch": 2, "mean_fg_dice": 0.2, "ema_fg_dice": 0.5}]
    assert dice_curve(mixed, source="raw") == ("mean_fg_dice", [(1, 0.9), (2, 0.2)])
    assert convergence_epoch(mixed, source="raw") == 1
    with pytest.raises(DataError, match=r"no validation pseudo-Dice .*\(--convergence-epoch E\)"):
        convergence_epoch(idx(None), source="raw")


# --------------------------------------------------------------------------------------------------
# permutation and Welch tests


def constructed(labels, within=0.9, between=0.3, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = len(labels)
    s = np.where(labels[:, None] == labels[None, :], within, between) + noise * rng.standard_normal((n, n))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def test_between_minus_within_by_hand():
    s = np.array([[1, .9, .2, .4], [.9, 1, .3, .5], [.2, .3, 1, .7], [.4, .5, .7, 1]])
    # within: (0,1)=.9, (2,3)=.7 -> .8; between: .2 .4 .3 .5 -> .35
    assert between_minus_within(s, [0, 0, 1, 1]) == pytest.approx(0.35 - 0.8)


def test_permutation_test_exact_on_constructed_groups():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    res = permutation_test(constructed(labels), labels, permutations=10000)
    assert res["exact"] and res["n_permutations"] == 70  # 8! / (4! 4!) labelings
    assert res["statistic"] == pytest.approx(-0.6, abs=0.02)
    # only the observed labeling and its mirror image are as extreme
    assert res["p_value"] == pytest.approx(2 / 70)
    flat = np.full((8, 8), 0.5)
    assert permutation_test(flat, labels)["p_value"] == 1.0
    three = [0, 0, 1, 1, 2, 2]
    res3 = permutation_test(constructed(three), three)
    assert res3["n_permutations"] == 90 and res3["p_value"] == pytest.approx(6 / 90)  # 3! relabelings


def test_permutation_test_monte_carlo():
    labels = [0] * 6 + [1] * 6  # 924 labelings > 200 permutations -> random draws, +1 correction
    res = permutation_test(constructed(labels), labels, permutations=200, seed=1)
    assert not res["exact"] and res["n_permutations"] == 200
    assert 1 / 201 <= res["p_value"] < 0.05
    assert res == permutation_test(constructed(labels), labels, permutations=200, seed=1)  # seeded
    noise = constructed(labels, within=0.5, between=0.5, noise=0.1)
    assert permutation_test(noise, labels, permutations=200)["p_value"] > 0.05


def test_welch_is_scipys_unequal_variance_test():
    a, b = [0.9, 0.85, 0.95, 0.8], [0.3, 0.5, 0.35]
    ref = ttest_ind(a, b, equal_var=False)
    assert welch(a, b) == pytest.approx((ref.statistic, ref.pvalue))
    assert all(np.isnan(welch([0.9], b)))


# --------------------------------------------------------------------------------------------------
# weight change


def test_weight_change_equals_direct_computation():
    before, after = tiny_network(0), tiny_network(1)
    model = BlockModel.from_network(before)
    tables = weight_change(model, before, after)
    s0, s1 = before.state_dict(), after.state_dict()

    def direct(keys):
        num = sum(((s1[k].double() - s0[k].double()) ** 2).sum() for k in keys)
        den = sum((s0[k].double() ** 2).sum() for k in keys)
        return float(torch.sqrt(num / den))

    conv = {r["conv"]: r for r in tables["conv"]}
    k = "encoder.stages.1.0.convs.0.conv"
    assert conv[k]["ratio"] == pytest.approx(direct([k + ".weight"]), rel=1e-12)
    assert conv[k]["layer"] == "block2" and conv[k]["group"] == "encoder"
    assert "decoder.transpconvs.0" in conv and conv["decoder.transpconvs.0"]["layer"] == "block4"
    # block 4: its transposed conv and the decoder stage's two convs; all parameters incl. norms
    block4 = next(r for r in tables["block"] if r["layer"] == "block4")
    kernels = [n + ".weight" for n in conv if conv[n]["layer"] == "block4"]
    assert block4["convs"] == 3 and block4["conv_ratio"] == pytest.approx(direct(kernels), rel=1e-12)
    assert block4["param_ratio"] == pytest.approx(direct(list(model.block(4).param_names)), rel=1e-12)
    enc = next(r for r in tables["group"] if r["group"] == "encoder")
    enc_kernels = [n + ".weight" for n in conv if conv[n]["group"] == "encoder"]
    assert enc["conv_ratio"] == pytest.approx(direct(enc_kernels), rel=1e-12)
    assert {r["group"] for r in tables["group"]} == {"encoder", "bottleneck", "decoder", "seg"}
    same = weight_change(model, before, before)
    assert all(r["ratio"] == 0.0 for r in same["conv"])


# --------------------------------------------------------------------------------------------------
# every study through the command line, on toy runs


def fake_run(fold: Path, start: torch.nn.Module, dice, *, seed: int, step: float = 0.03) -> Path:
    """Snapshots 0..len(dice)-1 whose weights drift from ``start``; checkpoint_final = the last."""
    net = tiny_network(0)
    net.load_state_dict(start.state_dict())
    g = torch.Generator().manual_seed(seed)
    for e, d in enumerate(dice):
        if e:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(step * p.abs().mean() * torch.randn(p.shape, generator=g))
        save_snapshot(net, fold, e, trainer_name="nnUNetTrainerTransferBase", mean_fg_dice=d)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerTransferBase"},
               fold / "checkpoint_final.pth")
    return fold


@pytest.fixture(scope="module")
def runs(toy_tree):
    res = toy_tree["nnUNet_results"] / TOY
    pretrained = tiny_network(10)
    out = {"RI": [fake_run(res / f"RI__nnUNetPlans__{TINY}" / f"fold_{s}", tiny_network(20 + s),
                           [None, 0.4, 0.7, 0.71, 0.69], seed=s, step=0.2) for s in range(2)],
           "TL": [fake_run(res / f"TL__nnUNetPlans__{TINY}" / f"fold_{s}", pretrained,
                           [None, 0.6, 0.8, 0.8, 0.8], seed=s, step=0.02) for s in range(2)]}
    bare = res / "bare__nnUNetPlans__tiny" / "fold_0"
    bare.mkdir(parents=True)
    torch.save({"network_weights": tiny_network(3).state_dict()}, bare / "checkpoint_final.pth")
    torch.save({"network_weights": tiny_network(4, features="8,16,24").state_dict()}, bare.parent / "other.pth")
    out["bare"] = bare
    return out


FAST = ["-d", "990", "-c", TINY, "--layers", "blocks:1,5", "--patches", "2", "--voxels-per-patch", "400",
        "--device", "cpu", "--no-progress"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_identical_checkpoints_score_one(toy_env, runs, capsys, tmp_path):
    ri = runs["RI"][0]
    code, out, err = cli(capsys, "analyze", "compare", ri, f"{ri}@final", f"{ri}@start", *FAST, "-o", tmp_path,
                         "--reference", "first")
    assert code == 0, err
    data = json.loads((tmp_path / "compare.json").read_text())
    rows = data["tables"]["similarity"]
    same = [r for r in rows if r["b"].endswith("@final#2")]
    assert len(same) == 2 and all(r["pwcca"] == pytest.approx(1, abs=1e-9) for r in same)
    assert all(r["linear_cka"] == pytest.approx(1, abs=1e-9) for r in same)
    # PWCCA weighted as google/svcca's compute_pwcca: by the network with fewer live channels, the first on a tie
    assert data["meta"]["pwcca_side"] == "fewer"
    assert all(r["pwcca_by"] == ("a" if r["dead_a"] >= r["dead_b"] else "b") for r in rows)
    assert "fewer live channels, the first on a tie" in (tmp_path / "summary.md").read_text()
    assert data["meta"]["sampling"]["patches"] == 2 and [l["samples"] for l in data["meta"]["layers"]] == [800, 800]
    assert is_png(tmp_path / "compare.png") and (tmp_path / "compare_similarity.csv").is_file()
    assert "(null " in (tmp_path / "summary.md").read_text()
    assert "warning" not in err  # 800 = 100 x 8 samples
    # deterministic given --seed: the same tables again
    code, out, err = cli(capsys, "analyze", "compare", ri, f"{ri}@final", f"{ri}@start", *FAST, "-o",
                         tmp_path / "again", "--reference", "first")
    assert (tmp_path / "again" / "compare_similarity.csv").read_bytes() == \
        (tmp_path / "compare_similarity.csv").read_bytes()


def test_evolution_groups_reuse_weights(toy_env, runs, capsys, tmp_path):
    ri0 = runs["RI"][0]
    code, out, err = cli(capsys, "analyze", "evolution", ri0, *FAST, "-o", tmp_path / "evo",
                         "--convergence-from", "raw")
    assert code == 0, err
    evo = json.loads((tmp_path / "evo" / "evolution.json").read_text())
    assert evo["convergence_epoch"] == 3 and evo["epochs"] == [0, 1, 2, 3, 4]
    rows = evo["tables"]["similarity"]
    conv_rows = [r for r in rows if r["epoch"] == 3]
    assert all(r["converged"] and r["pwcca"] == pytest.approx(1, abs=1e-9) for r in conv_rows)
    assert all(-1e-9 <= r["pwcca"] <= 1 + 1e-9 and r["null_pwcca"] < 0.3 for r in rows)
    assert is_png(tmp_path / "evo" / "evolution.png")

    groups = ["--group", "RI=" + ",".join(map(str, runs["RI"])), "--group", "TL=" + ",".join(map(str, runs["TL"]))]
    code, out, err = cli(capsys, "analyze", "groups", *groups, *FAST, "-o", tmp_path / "grp")
    assert code == 0, err
    grp = json.loads((tmp_path / "grp" / "groups.json").read_text())
    kinds = {(r["layer"], r["group_a"], r["group_b"]): r for r in grp["tables"]["groups"]}
    # TL runs share their start: more alike than RI runs with different starts
    assert kinds[("block1", "TL", "TL")]["mean"] > kinds[("block1", "RI", "RI")]["mean"]
    perm = [r for r in grp["tables"]["tests"] if r["test"].startswith("permutation")]
    assert len(perm) == 2 and all(r["exact"] and r["n_permutations"] == 6 for r in perm)
    assert is_png(tmp_path / "grp" / "groups.png") and (tmp_path / "grp" / "groups_tests.csv").is_file()

    code, out, err = cli(capsys, "analyze", "reuse", "--ri", ",".join(map(str, runs["RI"])),
                         "--tl", ",".join(map(str, runs["TL"])), *FAST, "-o", tmp_path / "reuse",
                         "--convergence-from", "raw")
    assert code == 0, err
    reuse = json.loads((tmp_path / "reuse" / "reuse.json").read_text())["tables"]["reuse"]
    assert [r["layer"] for r in reuse] == ["block1", "block5"]
    # TL runs moved little from their start, RI runs a lot: positive reuse
    assert all(r["reuse_pwcca"] > 0 and r["reuse_pwcca"] == pytest.approx(r["tl_pwcca"] - r["ri_pwcca"])
               for r in reuse)
    assert is_png(tmp_path / "reuse" / "reuse.png")

    code, out, err = cli(capsys, "analyze", "weights", runs["TL"][0], *FAST[:6], "--device", "cpu",
                         "--no-progress", "--filters", "4", "-o", tmp_path / "w", "--converged", "final")
    assert code == 0, err
    w = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert w["start"].endswith("@0") and w["end"].endswith("@final")
    assert all(0 < r["ratio"] < 1 for r in w["tables"]["conv"])
    assert all(0 <= r["filter_norm_ratio"] <= r["filter_ratio"] for r in w["tables"]["conv"])  # both readings
    assert "per filter, norm (mean)" in (tmp_path / "w" / "summary.md").read_text()
    for name in ("weights.png", "filters_block1.png", "filters_block5.png", "featuremaps_block1.png",
                 "featuremaps_block5.png"):
        assert is_png(tmp_path / "w" / name), name


@pytest.mark.parametrize("args, message", [
    (["compare", "{bare}", "{other}"], r"other \(.*other.pth\) is not a network of Dataset990_Toy / nnUNetPlans / "
                                       r"tiny: .*shape mismatch"),
    (["compare", "{bare}", "{bare}", "--layers", "blocks:1+foo"], r"unknown term 'foo' in spec"),
    (["evolution", "{bare}"], r"run .*bare__nnUNetPlans__tiny/fold_0 has no snapshots"),
    (["compare", "{bare}", "{bare}", "--patches", "1", "--voxels-per-patch", "4"], r"too few samples: layer block1"),
    (["compare", "{bare}", "{bare}", "-c", "nodata"], r"preprocessed folder .*nnUNetPlans_missing does not exist"),
    (["compare", "{bare}", "{bare}", "-c", "emptydata"], r"preprocessed folder .*nnUNetPlans_empty holds no cases"),
    (["compare", "{bare}@3", "{bare}"], r"has no snapshots"),
    (["weights", "{bare}", "--no-feature-maps"], r"has no snapshots"),
])
def test_bad_input_gives_one_clear_line(toy_env, runs, capsys, tmp_path, args, message):
    import re

    pre = toy_env["nnUNet_preprocessed"] / TOY
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["configurations"]["nodata"] = {"inherits_from": TINY, "data_identifier": "nnUNetPlans_missing"}
    plans["configurations"]["emptydata"] = {"inherits_from": TINY, "data_identifier": "nnUNetPlans_empty"}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "nnUNetPlans_empty").mkdir(exist_ok=True)
    subs = {"bare": runs["bare"], "other": runs["bare"].parent / "other.pth"}
    argv = [a.format(**subs) for a in args]
    base = ["-d", "990", "-c", TINY, "--device", "cpu", "--no-progress", "-o", tmp_path]
    if "-c" in argv:  # the case's own configuration replaces the default one
        i = argv.index("-c")
        base[3] = argv[i + 1]
        del argv[i:i + 2]
    code, out, err = cli(capsys, "analyze", *argv, *base)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet_transfer analyze: error: "), err
    assert re.search(message, lines[0]), lines[0]
