"""The convergence epoch one noisy epoch cannot set, and what uses it: the EMA default, the real validation of
snapshots (against a forward pass written out here), ``analyze weights`` from the start to the convergence epoch
(against per-filter loops on the snapshot files), and ``convergence.json`` beside every result that uses one."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_transfer.experiments.convergence import curve_convergence, first_within, index_curve
from nnunet_transfer.analysis.runs import START_FILE, convergence_epoch, resolve_network
from nnunet_transfer.analysis.validation import case_dice, foreground_mean, run_fold, validation_cases
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import DataError
from nnunet_transfer.training.snapshots import save_snapshot, save_weights

from .test_activations import TINY, TOY, dataset_json, tiny_network, toy_env, toy_plans, toy_tree  # noqa: F401
from .test_weight_change import loop_ratios

#: one lucky epoch (0.9 at epoch 2) sets the raw maximum; the moving average keeps rising to epoch 6
NOISY = [None, 0.5, 0.9, 0.6, 0.62, 0.63, 0.64]


def nnunet_ema(values):
    """nnU-Net's logger: ema_0 = d_0, ema_t = 0.9 ema_(t-1) + 0.1 d_t (nnunet_logger.py)."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        out.append(ema)
    return out


def by_hand(curve, tol=0.005):
    """First (epoch, value) pair with value >= max - tol |max|."""
    best = max(v for _, v in curve)
    return next(e for e, v in curve if v >= best - tol * abs(best))


def ema_run(fold: Path, start: torch.nn.Module, dice, *, seed: int = 0, step: float = 0.05,
            snapshots: bool = True) -> Path:
    """A run as this package's trainers leave it: start_weights.pth, snapshots with nnU-Net's raw and EMA
    pseudo-Dice, checkpoint_final (with nnU-Net's logging) = the last state."""
    net = tiny_network(0)
    net.load_state_dict(start.state_dict())
    fold.mkdir(parents=True, exist_ok=True)
    save_weights(net, fold / START_FILE, trainer_name="nnUNetTrainerTransferBase", epoch=0)
    emas = [None] + nnunet_ema(dice[1:])
    g = torch.Generator().manual_seed(seed)
    for e, (d, m) in enumerate(zip(dice, emas)):
        if e:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(step * p.abs().mean() * torch.randn(p.shape, generator=g))
        if snapshots:
            save_snapshot(net, fold, e, trainer_name="nnUNetTrainerTransferBase", mean_fg_dice=d, ema_fg_dice=m,
                          same_as=fold / START_FILE if e == 0 else None)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerTransferBase",
                "logging": {"mean_fg_dice": list(dice[1:]), "ema_fg_dice": emas[1:]}}, fold / "checkpoint_final.pth")
    return fold


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


WHERE = ["-d", "990", "-c", TINY, "--device", "cpu", "--no-progress"]
FAST = [*WHERE, "--layers", "blocks:1,5", "--patches", "2", "--voxels-per-patch", "400"]


# --------------------------------------------------------------------------------------------------
# the rule


def test_ema_is_the_default_and_one_noisy_epoch_cannot_set_it():
    emas = [None] + nnunet_ema(NOISY[1:])
    index = [{"epoch": e, "mean_fg_dice": d, "ema_fg_dice": m} for e, (d, m) in enumerate(zip(NOISY, emas))]
    raw = [(e, d) for e, d in enumerate(NOISY) if d is not None]
    ema = [(e, m) for e, m in enumerate(emas) if m is not None]
    assert by_hand(raw) == 2 and by_hand(ema) == 6
    assert convergence_epoch(index) == 6
    assert convergence_epoch(index, source="raw") == 2
    assert index_curve(index) == ema and index_curve(index, source="raw") == raw
    conv = curve_convergence(ema, source="ema", tolerance=0.005, run="r")
    d = conv.to_dict()
    assert d["epoch"] == 6 and d["key"] == "ema_fg_dice" and d["maximum"] == pytest.approx(max(m for _, m in ema))
    assert d["threshold"] == pytest.approx(d["maximum"] * 0.995)
    assert [p["value"] for p in d["curve"]] == [m for _, m in ema]
    assert "within 0.5 %" in conv.rule() and "moving average" in conv.rule()
    assert curve_convergence([(0, None), (1, float("nan"))], source="raw") is None
    assert first_within([None, 0.3, 0.6, 0.599]) == 2  # the lead's function, unchanged


def test_at_converged_follows_the_rule(tmp_path):
    fold = ema_run(tmp_path / "T__nnUNetPlans__tiny" / "fold_0", tiny_network(1), NOISY)
    ref = resolve_network(f"{fold}@converged")
    assert ref.epoch == 6 and ref.convergence.source == "ema"
    assert resolve_network(f"{fold}@converged", source="raw").epoch == 2
    assert "convergence" in ref.to_dict() and ref.to_dict()["convergence"]["epoch"] == 6


# --------------------------------------------------------------------------------------------------
# the validation Dice


def test_case_dice_and_foreground_mean_are_nnunets():
    rng = np.random.default_rng(0)
    ref, pred = rng.integers(0, 4, (6, 7, 8)), rng.integers(0, 4, (6, 7, 8))
    ref[0, 0, :4] = 3  # 3 = ignore label below

    def direct(label, ignore=None):
        keep = np.ones(ref.shape, bool) if ignore is None else ref != ignore
        r, p = (ref == label) & keep, (pred == label) & keep
        tp, fp, fn = (r & p).sum(), (~r & p).sum(), (r & ~p).sum()
        return 2 * tp / (2 * tp + fp + fn)

    assert case_dice(pred, ref, [1, 2]) == pytest.approx([direct(1), direct(2)], rel=1e-15)
    assert case_dice(pred, ref, [1, 2], ignore_label=3) == pytest.approx([direct(1, 3), direct(2, 3)], rel=1e-15)
    # a region is the union of its labels
    both = ((ref == 1) | (ref == 2)), ((pred == 1) | (pred == 2))
    tp, fp, fn = (both[0] & both[1]).sum(), (~both[0] & both[1]).sum(), (both[0] & ~both[1]).sum()
    assert case_dice(pred, ref, [(1, 2)]) == pytest.approx([2 * tp / (2 * tp + fp + fn)])
    assert math.isnan(case_dice(np.zeros((2, 2)), np.zeros((2, 2)), [1])[0])  # in neither: undefined
    # mean over cases per label (NaN skipped), then over labels; an all-NaN label is left out
    nan = float("nan")
    assert foreground_mean([[0.5, nan, nan], [0.7, 0.2, nan]]) == pytest.approx(((0.5 + 0.7) / 2 + 0.2) / 2)
    assert math.isnan(foreground_mean([[nan], [nan]]))


def test_fold_and_split_errors(toy_env, tmp_path):
    assert run_fold(tmp_path / "fold_3") == 3
    with pytest.raises(DataError, match="fold 'all': it has no validation cases"):
        run_fold(tmp_path / "fold_all")
    with pytest.raises(DataError, match="not named fold_<k>"):
        run_fold(tmp_path / "run")
    with pytest.raises(DataError, match=r"splits_final.json not found: the validation split is unknown"):
        validation_cases(TOY, 0)


def tile_weights(patch) -> torch.Tensor:
    """nnU-Net's tile weighting: a Gaussian (sigma = patch / 8) with maximum 10, stored in float16, its zeros
    (underflow far from the centre) raised to the smallest non-zero value."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(delta, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = torch.from_numpy(g / (g.max() / 10)).half()
    g[g == 0] = g[g != 0].min()
    return g


def one_tile_dice(net, data: np.ndarray, seg: np.ndarray, patch, labels) -> list[float]:
    """Dice of a case no larger than the patch, predicted here in one forward pass.

    The case is padded as nnU-Net pads (content centred, the odd voxel above) and cropped back; -1 (outside
    the crop mask) is background. nnU-Net accumulates the Gaussian-weighted logits of a tile in float16 and
    divides by the weights; near the patch corners the weights are float16 subnormals, so the rounding
    there decides near-ties of the argmax (random heads at epoch 0 have many): the same rounding is
    applied here, so the segmentations agree voxel for voxel instead of to a few percent.
    """
    shape = data.shape[1:]
    assert all(s <= p for s, p in zip(shape, patch)), f"case {shape} is larger than the patch {patch}"
    pads = [((p - s) // 2, p - s - (p - s) // 2) for s, p in zip(shape, patch)]
    x = np.pad(np.asarray(data, dtype=np.float32), [(0, 0), *pads])
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(x)[None])[0]
    g = tile_weights(tuple(patch))
    logits = ((logits * g).half().float() / g.float()).half()
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
    pred = logits[(slice(None), *crop)].argmax(0).numpy()
    ref = np.where(np.asarray(seg)[0] < 0, 0, np.asarray(seg)[0])
    out = []
    for lab in labels:
        r, p = ref == lab, pred == lab
        tp, fp, fn = int((r & p).sum()), int((~r & p).sum()), int((r & ~p).sum())
        out.append(float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return out


def nanmean2(per_case):
    per_label = [np.nanmean([c[k] for c in per_case]) for k in range(len(per_case[0]))]
    return float(np.nanmean(per_label))


@pytest.fixture
def patch_tree(tmp_path, monkeypatch):
    """A toy tree whose cases fit one patch (32³), with nnU-Net's split file: fold 0 validates 2 cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    env = {v: tmp_path / s for v, s in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res"))}
    for var, p in env.items():
        p.mkdir()
        monkeypatch.setenv(var, str(p))
    pre = env["nnUNet_preprocessed"] / TOY
    folder = pre / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(toy_plans()))
    (pre / "dataset.json").write_text(json.dumps(dataset_json()))
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(32, 32, 32), (30, 32, 27), (32, 25, 32), (32, 32, 32)]):
        data = rng.standard_normal((1, *shape)).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int8)
        seg[0, 4:20, 6:22, 5:25] = 1
        seg[0, 8:12, 9:14, 10:16] = 2
        seg[0, :2] = -1  # nnU-Net marks voxels outside the non-zero mask
        nnUNetDatasetNumpy.save_case(data, seg, {"class_locations": {1: np.argwhere(seg == 1), 2: np.argwhere(seg == 2)}},
                                     str(folder / f"case_{i:03d}"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["case_000", "case_003"], "val": ["case_001", "case_002"]}]))
    return env


def test_validation_mode_predicts_every_snapshot(patch_tree, capsys, tmp_path):
    fold = ema_run(patch_tree["nnUNet_results"] / TOY / "T__nnUNetPlans__tiny" / "fold_0", tiny_network(2),
                   [None, 0.1, 0.2, 0.3], step=0.3)
    code, out, err = cli(capsys, "analyze", "weights", fold, *WHERE, "--no-feature-maps", "--convergence-from",
                         "validation", "-o", tmp_path / "w")
    assert code == 0, err
    conv = json.loads((tmp_path / "w" / "convergence.json").read_text())["runs"][0]
    assert conv["source"] == "validation" and conv["validation"]["cases"] == ["case_001", "case_002"]
    folder = patch_tree["nnUNet_preprocessed"] / TOY / "nnUNetPlans_3d_fullres"
    expected = []
    for e in range(4):
        net = tiny_network(0)
        net.load_state_dict(torch.load(fold / "snapshots" / f"epoch_{e:04d}.pth")["network_weights"])
        per_case = []
        for case in ("case_001", "case_002"):
            z = np.load(folder / f"{case}.npz")
            per_case.append(one_tile_dice(net, z["data"], z["seg"], (32, 32, 32), [1, 2]))
        expected.append(nanmean2(per_case))
        got = conv["validation"]["per_snapshot"][e]
        for case, dice in zip(("case_001", "case_002"), per_case):
            # equal here; 1e-3 = a few voxels, should float32 sums be ordered differently (thread counts)
            assert got["cases"][case] == pytest.approx(dice, abs=1e-3, nan_ok=True)
    assert [p["value"] for p in conv["curve"]] == pytest.approx(expected, abs=1e-3)
    assert [p["epoch"] for p in conv["curve"]] == [0, 1, 2, 3]  # the start is validated too
    assert conv["epoch"] == by_hand([(p["epoch"], p["value"]) for p in conv["curve"]])
    w = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert w["end"].endswith(f"@{conv['epoch']}") and w["convergence_from"] == "validation"
    assert "sliding-window validation" in (tmp_path / "w" / "summary.md").read_text()


def test_a_validated_convergence_is_computed_once_per_process_until_its_inputs_change(patch_tree, monkeypatch,
                                                                                      tmp_path):
    # study report asks evolution, reuse and filter change for the same run's epoch: one validation while the
    # run's snapshots, split, plans and tolerance are the same, a new one as soon as any of them changed
    from nnunet_transfer.analysis import karimi, session
    from nnunet_transfer.analysis.validation import SnapshotValidator

    fold = ema_run(patch_tree["nnUNet_results"] / TOY / "T__nnUNetPlans__tiny" / "fold_0", tiny_network(2),
                   [None, 0.1, 0.2], step=0.3)
    opened = []
    real_open = SnapshotValidator.open.__func__
    monkeypatch.setattr(SnapshotValidator, "open",
                        classmethod(lambda cls, **kw: opened.append(kw["run"]) or real_open(cls, **kw)))
    monkeypatch.setattr(session, "_VALIDATED", {})
    where = {"dataset": TOY, "configuration": "tiny", "convergence_from": "validation", "progress": False,
             "feature_maps": False}

    def convergence(out: str, **change) -> dict:
        karimi.run_weights(fold, out=tmp_path / out, **{**where, **change})
        return json.loads((tmp_path / out / "convergence.json").read_text())["runs"][0]

    first = convergence("w1")
    assert convergence("w2") == first and len(opened) == 1
    convergence("w3", tolerance=0.2)
    assert len(opened) == 2  # another tolerance
    split = patch_tree["nnUNet_preprocessed"] / TOY / "splits_final.json"
    split.write_text(json.dumps([{"train": ["case_000", "case_001"], "val": ["case_002", "case_003"]}]))
    assert convergence("w4")["validation"]["cases"] == ["case_002", "case_003"] and len(opened) == 3
    index = fold / "snapshots" / "index.json"
    index.write_text(index.read_text() + " ")  # the snapshot index rewritten (as when a snapshot is added)
    convergence("w5")
    assert len(opened) == 4


# --------------------------------------------------------------------------------------------------
# weights: start -> convergence epoch


@pytest.fixture(scope="module")
def ema_runs(toy_tree):
    res = toy_tree["nnUNet_results"] / TOY
    return {"snap": ema_run(res / "E__nnUNetPlans__tiny" / "fold_0", tiny_network(5), NOISY),
            "nosnap": ema_run(res / "N__nnUNetPlans__tiny" / "fold_0", tiny_network(6), NOISY, snapshots=False),
            "snap2": ema_run(res / "E__nnUNetPlans__tiny" / "fold_1", tiny_network(5), NOISY, seed=1)}


def check_filter_numbers(tables, start_file: Path, end_file: Path):
    s0 = torch.load(start_file)["network_weights"]
    s1 = torch.load(end_file)["network_weights"]
    for row in tables["conv"]:
        k = row["conv"] + ".weight"
        ratios = loop_ratios(s0[k], s1[k], transposed="transpconvs" in k)
        assert row["filter_ratio"] == pytest.approx(float(np.mean(ratios)), rel=1e-12), k
        num = math.sqrt(float(((s1[k].double() - s0[k].double()) ** 2).sum()))
        assert row["ratio"] == pytest.approx(num / math.sqrt(float((s0[k].double() ** 2).sum())), rel=1e-12)


def test_weights_of_a_run_go_from_start_to_the_convergence_epoch(toy_env, ema_runs, capsys, tmp_path):
    fold = ema_runs["snap"]
    code, out, err = cli(capsys, "analyze", "weights", fold, *WHERE, "--filters", "2", "--layers", "blocks:1",
                         "-o", tmp_path / "w")
    assert code == 0, err
    w = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert w["start"].endswith("fold_0@0") and w["end"].endswith("fold_0@6")
    assert w["start_from"] == "epoch-0 snapshot" and w["end_from"] == "convergence epoch 6"
    assert w["convergence_from"] == "ema" and w["end_epoch"] == 6
    check_filter_numbers(w["tables"], fold / "snapshots" / "epoch_0000.pth", fold / "snapshots" / "epoch_0006.pth")
    conv = json.loads((tmp_path / "w" / "convergence.json").read_text())
    assert conv["study"] == "weights" and len(conv["runs"]) == 1
    r = conv["runs"][0]
    emas = nnunet_ema(NOISY[1:])
    assert r["source"] == "ema" and r["epoch"] == 6 and r["tolerance"] == 0.005
    assert [(p["epoch"], p["value"]) for p in r["curve"]] == [(e + 1, pytest.approx(v)) for e, v in enumerate(emas)]
    assert w["meta"]["convergence"][0]["epoch"] == 6
    summary = (tmp_path / "w" / "summary.md").read_text()
    assert "end: `E__nnUNetPlans__tiny/fold_0@6` (convergence epoch 6)" in summary
    assert "convergence of `E__nnUNetPlans__tiny/fold_0`: epoch **6**, the first snapshot epoch whose moving " \
           "average of nnU-Net's validation pseudo-Dice (ema_fg_dice) is within 0.5 % of its maximum" in summary
    assert "per filter (mean)" in summary
    # the raw curve: the lucky epoch 2
    code, out, err = cli(capsys, "analyze", "weights", fold, *WHERE, "--no-feature-maps", "--convergence-from",
                         "raw", "-o", tmp_path / "raw")
    assert code == 0, err
    w = json.loads((tmp_path / "raw" / "weights.json").read_text())
    assert w["end"].endswith("@2")
    check_filter_numbers(w["tables"], fold / "snapshots" / "epoch_0000.pth", fold / "snapshots" / "epoch_0002.pth")
    # checkpoint_final when asked: no convergence epoch used, no convergence.json
    code, out, err = cli(capsys, "analyze", "weights", fold, *WHERE, "--no-feature-maps", "--converged", "final",
                         "-o", tmp_path / "final")
    assert code == 0, err
    w = json.loads((tmp_path / "final" / "weights.json").read_text())
    assert w["end"].endswith("@final") and w["end_from"] == "checkpoint_final"
    assert not (tmp_path / "final" / "convergence.json").exists() and "convergence" not in w["meta"]


def test_weights_of_a_run_without_snapshots_start_from_start_weights(toy_env, ema_runs, capsys, tmp_path):
    fold = ema_runs["nosnap"]
    code, out, err = cli(capsys, "analyze", "weights", fold, *WHERE, "--no-feature-maps", "-o", tmp_path / "w")
    assert code == 0, err
    w = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert w["start"].endswith("fold_0@start") and w["start_from"] == START_FILE
    assert w["end"].endswith("fold_0@final") and w["end_from"].startswith("checkpoint_final (no snapshots")
    check_filter_numbers(w["tables"], fold / START_FILE, fold / "checkpoint_final.pth")
    assert resolve_network(f"{fold}@start").path == fold / START_FILE


def test_evolution_and_reuse_write_the_curve(toy_env, ema_runs, capsys, tmp_path):
    fold = ema_runs["snap"]
    code, out, err = cli(capsys, "analyze", "evolution", fold, *FAST, "-o", tmp_path / "evo")
    assert code == 0, err
    evo = json.loads((tmp_path / "evo" / "evolution.json").read_text())
    assert evo["convergence_epoch"] == 6 and evo["convergence_from"] == "ema"
    rows = [r for r in evo["tables"]["similarity"] if r["layer"] == "block1"]
    assert rows[0]["convergence_curve"] is None  # no validation before the first epoch
    assert [r["convergence_curve"] for r in rows[1:]] == pytest.approx(nnunet_ema(NOISY[1:]))
    assert json.loads((tmp_path / "evo" / "convergence.json").read_text())["runs"][0]["epoch"] == 6
    summary = (tmp_path / "evo" / "summary.md").read_text()
    assert "convergence epoch: **6**" in summary and "curve `ema_fg_dice`" in summary
    # a given epoch is recorded as given
    code, out, err = cli(capsys, "analyze", "evolution", fold, *FAST, "--convergence-epoch", "3", "-o", tmp_path / "e3")
    assert code == 0, err
    given = json.loads((tmp_path / "e3" / "convergence.json").read_text())["runs"][0]
    assert given["source"] == "given" and given["epoch"] == 3
    # reuse: one entry per run
    code, out, err = cli(capsys, "analyze", "reuse", "--ri", ema_runs["snap"], "--tl", ema_runs["snap2"], *FAST,
                         "--convergence-from", "raw", "-o", tmp_path / "reuse")
    assert code == 0, err
    runs = json.loads((tmp_path / "reuse" / "convergence.json").read_text())["runs"]
    assert [(Path(r["run"]).name, r["source"], r["epoch"]) for r in runs] == [("fold_0", "raw", 2), ("fold_1", "raw", 2)]
    reuse = json.loads((tmp_path / "reuse" / "reuse.json").read_text())
    assert [x["end_epoch"] for x in reuse["runs"]] == [2, 2] and reuse["convergence_from"] == "raw"


def test_start_file_is_the_one_the_trainers_write():
    from nnunet_transfer.training.snapshots import START_FILE as TRAINERS_START_FILE

    assert START_FILE == TRAINERS_START_FILE


def test_numpy_scalars_count_as_values():
    # nnU-Net's logger holds np.float32; they must not be skipped as "not a number"
    import numpy as np

    from nnunet_transfer.experiments.convergence import first_within, log_convergence

    values = [np.float32(0.1), np.float32(0.5), np.float64(0.9), np.float32(0.899)]
    assert first_within(values) == 2
    log = log_convergence({"ema_fg_dice": values, "epoch_start_timestamps": [0, 1, 2, 3],
                           "epoch_end_timestamps": [1, 2, 3, 4]})
    assert (log["epoch"], log["seconds"]) == (2, 3.0)
