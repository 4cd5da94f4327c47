"""``plans transfer`` on a real 2.8 plans file and small generated raw datasets (no nnU-Net subprocess)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.data import TARGET, make_dataset
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.plans.transfer import transfer_plans

DATA = Path(__file__).parent.parent / "data"
SRC, TGT = "Dataset901_TransferSource", "Dataset902_Target"
TARGET_PROPS = {"max": 300.0, "mean": 110.0, "median": 105.0, "min": -20.0, "percentile_00_5": 0.5,
                "percentile_99_5": 250.0, "std": 45.0}


def fingerprint(channels: int = 1, relative_size: float = 1.0) -> dict:
    return {"spacings": [[1.5, 1.0, 1.0], [1.5, 1.0, 1.0]], "shapes_after_crop": [[5, 8, 8], [5, 8, 8]],
            "foreground_intensity_properties_per_channel": {str(i): dict(TARGET_PROPS) for i in range(channels)},
            "median_relative_size_after_cropping": relative_size}


def set_channels(raw_dataset: Path, names: list[str]) -> None:
    """Rewrite a generated 1-channel raw dataset to ``names`` channels (copies of channel 0)."""
    dj = json.loads((raw_dataset / "dataset.json").read_text())
    dj["channel_names"] = {str(i): n for i, n in enumerate(names)}
    (raw_dataset / "dataset.json").write_text(json.dumps(dj))
    for img in (raw_dataset / "imagesTr").glob("*_0000.nii.gz"):
        for i in range(1, len(names)):
            shutil.copy(img, img.with_name(img.name.replace("_0000.", f"_{i:04d}.")))


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    src = tmp_path / "pre" / SRC
    src.mkdir()
    shutil.copy(DATA / "nnUNetPlans_3d_32.json", src / "nnUNetPlans.json")
    shutil.copy(DATA / "dataset_ct2labels.json", src / "dataset.json")
    make_dataset(tmp_path / "raw", 902, "Target", TARGET, n_train=2, physical_size=8.0)
    (tmp_path / "pre" / TGT).mkdir()
    (tmp_path / "pre" / TGT / "dataset_fingerprint.json").write_text(json.dumps(fingerprint()))
    return tmp_path


def source_plans() -> dict:
    return json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())


def written(env: Path, name: str = "nnUNetPlans") -> dict:
    return json.loads((env / "pre" / TGT / f"{name}.json").read_text())


def test_transfer_does_nnunets_part_and_fixes_the_rest(env):
    result = transfer_plans(901, 902)
    plans, src = written(env), source_plans()
    # nnU-Net's move_plans_between_datasets: names, reader, everything else verbatim
    assert plans["dataset_name"] == TGT and plans["plans_name"] == "nnUNetPlans"
    assert plans["image_reader_writer"] in ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
    assert plans["configurations"] == src["configurations"]
    # ... plus the target's own statistics, its dataset.json where preprocessing reads it
    assert plans["foreground_intensity_properties_per_channel"] == {"0": TARGET_PROPS}
    assert (env / "pre" / TGT / "dataset.json").read_text() == (env / "raw" / TGT / "dataset.json").read_text()
    assert result.backup is None and not result.fingerprint_extracted
    assert any("channel 0 (CTNormalization) normalised with the target's own statistics: clip [0.5, 250], "
               "mean 110, std 45 (the source's: clip [-22.55, 145.9], mean 49.98, std 33.16)" in n
               for n in result.notes), result.notes
    assert any("resamples the target (median spacing [1.5, 1.0, 1.0]) to the source's spacing [1.0, 1.0, 1.0]"
               in n for n in result.notes), result.notes
    assert result.next_commands == [
        "nnUNetv2_preprocess -d 902 -plans_name nnUNetPlans -c 3d_fullres",
        f"nnunet_transfer weights check $nnUNet_results/{SRC}/TRAINER__nnUNetPlans__3d_fullres/fold_0/"
        f"checkpoint_final.pth -d 902 -c 3d_fullres -p nnUNetPlans",
        f"nnUNetv2_train 902 3d_fullres 0 -p nnUNetPlans -tr nnUNetTrainerFinetune -pretrained_weights "
        f"$nnUNet_results/{SRC}/TRAINER__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"]


def test_next_commands_name_the_trained_source_checkpoint(env):
    ckpt = env / "res" / SRC / "nnUNetTrainerX__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    result = transfer_plans(901, 902, configuration="2d")
    assert result.next_commands[-1] == (f"nnUNetv2_train 902 2d 0 -p nnUNetPlans -tr nnUNetTrainerFinetune "
                                        f"-pretrained_weights {ckpt}")


def test_new_plans_identifier_renames_data_identifiers(env):
    transfer_plans(901, 902, target_plans="nnUNetPlansFrom901")
    plans = written(env, "nnUNetPlansFrom901")
    assert plans["plans_name"] == "nnUNetPlansFrom901"
    assert [c["data_identifier"] for c in plans["configurations"].values()] == \
           ["nnUNetPlansFrom901_2d", "nnUNetPlansFrom901_3d_fullres"]


def test_source_normalization_keeps_the_sources_statistics_and_warns(env):
    result = transfer_plans(901, 902, normalization="source")
    assert written(env)["foreground_intensity_properties_per_channel"] == \
           source_plans()["foreground_intensity_properties_per_channel"]
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith(f"--normalization source: channel 0 of {TGT} is clipped and scaled with "
                                         f"the SOURCE's statistics (clip [-22.55, 145.9], mean 49.98, std 33.16), "
                                         f"not its own (clip [0.5, 250], mean 110, std 45)")


def declare_unannotated(env: Path, names: list[str]) -> None:
    path = env / "raw" / TGT / "dataset.json"
    dj = json.loads(path.read_text())
    path.write_text(json.dumps({**dj, "unannotated": names}))


def test_declared_unannotated_classes_keep_the_sources_statistics_by_default(env):
    # adding classes: the target's fingerprint sees only the voxels it labels (the new class), so its clip range
    # would cut the classes it leaves unlabelled; without --normalization the source's statistics stay
    declare_unannotated(env, ["organ", "lesion"])
    result = transfer_plans(901, 902)
    assert result.normalization == "source" and result.warnings == []
    assert written(env)["foreground_intensity_properties_per_channel"] == \
           source_plans()["foreground_intensity_properties_per_channel"]
    assert any(n.startswith("channel 0 (CTNormalization) normalised with the SOURCE's statistics (clip [-22.55, "
                            "145.9], mean 49.98, std 33.16), not the target's (clip [0.5, 250], mean 110, std 45): "
                            f"{TGT}'s dataset.json declares ['organ', 'lesion'] unannotated") for n in result.notes)


def test_declared_unannotated_classes_with_target_statistics_asked_for_warn(env):
    declare_unannotated(env, ["organ"])
    result = transfer_plans(901, 902, normalization="target")
    assert result.normalization == "target"
    assert written(env)["foreground_intensity_properties_per_channel"] == {"0": TARGET_PROPS}
    assert [w.split(":")[0] for w in result.warnings] == [f"{TGT}'s dataset.json declares ['organ'] unannotated, "
                                                          f"and its own statistics come from the voxels it labels only"]


def test_existing_plans_need_force_and_keep_a_backup(env):
    transfer_plans(901, 902, normalization="source")
    before = (env / "pre" / TGT / "nnUNetPlans.json").read_text()
    with pytest.raises(ConfigError, match=r"nnUNetPlans.json exists; pass --force to replace it \(the old file is "
                                          r"kept as nnUNetPlans.json.bak\) or choose another name with -tp"):
        transfer_plans(901, 902)
    result = transfer_plans(901, 902, force=True)
    assert result.backup.read_text() == before
    assert written(env)["foreground_intensity_properties_per_channel"] == {"0": TARGET_PROPS}


def test_label_differences_are_reported_not_refused(env):
    dj = json.loads((env / "raw" / TGT / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
    (env / "raw" / TGT / "dataset.json").write_text(json.dumps(dj))
    result = transfer_plans(901, 902)
    assert any(n.startswith("labels differ: source {'background': 0, 'organ': 1, 'lesion': 2} (3 outputs), "
                            "target {'background': 0, 'organ': 1, 'lesion': 2, 'vessel': 3} (4 outputs)")
               for n in result.notes), result.notes


def test_channel_name_with_the_same_normalisation_is_a_note(env):
    set_channels(env / "raw" / TGT, ["ct"])
    result = transfer_plans(901, 902)
    assert "channel 0 is 'CT' in the source and 'ct' in the target (both CTNormalization)" in result.notes


def test_channel_change_follows_the_targets_channels(env):
    set_channels(env / "raw" / TGT, ["CT", "MRI"])
    (env / "pre" / TGT / "dataset_fingerprint.json").write_text(json.dumps(fingerprint(2, relative_size=0.5)))
    result = transfer_plans(901, 902, allow_channel_change=True)
    plans = written(env)
    for c in plans["configurations"].values():
        assert c["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"]
        # nnU-Net's planner rule: cropping kept < 3/4 of the image -> masks for schemes that allow them
        assert c["use_mask_for_norm"] == [False, True]
    assert set(plans["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    assert any(w.startswith("channels follow the target ('CT': CTNormalization, 'MRI': ZScoreNormalization)")
               for w in result.warnings)
    assert result.next_commands[1].startswith("nnunet_transfer weights adapt ")
    assert result.next_commands[1].endswith(f" -o {SRC}_3d_fullres_2ch.pth --in-channels 2 --method repeat")
    assert result.next_commands[-1].endswith(f"-pretrained_weights {SRC}_3d_fullres_2ch.pth")


def test_missing_fingerprint_is_extracted_with_nnunet(env, monkeypatch):
    (env / "pre" / TGT / "dataset_fingerprint.json").unlink()
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        (env / "pre" / TGT / "dataset_fingerprint.json").write_text(json.dumps(fingerprint()))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("nnunet_transfer.plans.transfer.subprocess.run", fake_run)
    echoed = []
    result = transfer_plans(901, 902, num_processes=1, echo=echoed.append)
    assert result.fingerprint_extracted
    assert calls[0][0].endswith("nnUNetv2_extract_fingerprint") and calls[0][1:] == ["-d", "902", "-np", "1"]
    assert echoed == [f"extracting the fingerprint of {TGT}: nnUNetv2_extract_fingerprint -d 902 -np 1"]


def test_failed_fingerprint_extraction_says_why(env, monkeypatch):
    (env / "pre" / TGT / "dataset_fingerprint.json").unlink()
    monkeypatch.setattr("nnunet_transfer.plans.transfer.subprocess.run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "start\n", "RuntimeError: boom\n"))
    with pytest.raises(DataError, match=r"nnUNetv2_extract_fingerprint -d 902 failed \(exit 1\): start \| "
                                        r"RuntimeError: boom"):
        transfer_plans(901, 902)
    assert not (env / "pre" / TGT / "nnUNetPlans.json").exists()


@pytest.mark.parametrize("setup, kwargs, error, message", [
    (None, dict(normalization="both"), ConfigError, r"--normalization must be one of target, source, got 'both'"),
    (None, dict(target=901), ConfigError, r"source and target are the same dataset \(Dataset901_TransferSource\)"),
    (None, dict(source_plans="Nope"), DataError, r"plans .*Nope.json not found; run nnUNetv2_plan_and_preprocess"),
    (None, dict(configuration="3d_lowres"), ConfigError,
     r"configuration '3d_lowres' is not in Dataset901_TransferSource/nnUNetPlans; available: \['2d', '3d_fullres'\]"),
    (None, dict(target=977), DataError, r"no dataset with id 977"),
    ("no_raw_json", {}, DataError, r"raw/Dataset902_Target/dataset.json not found: nnU-Net preprocesses the target "
                                   r"from nnUNet_raw"),
    ("two_channels", {}, ConfigError,
     r"the source Dataset901_TransferSource has 1 channel\(s\) \['CT'\], the target Dataset902_Target has 2 "
     r"\['CT', 'CT'\]; the pretrained first layer takes 1. To go on, pass --allow-channel-change and adapt the "
     r"checkpoint with `nnunet_transfer weights adapt CKPT -o OUT --in-channels 2`"),
    ("two_channels", dict(allow_channel_change=True, normalization="source"), ConfigError,
     r"--normalization source needs the same channels in source and target"),
    ("mri", {}, ConfigError,
     r"channel normalisation differs: channel 0 'CT' \(CTNormalization in 2d, 3d_fullres\) vs target 'MRI' "
     r"\(ZScoreNormalization\). If the target channel is the same modality, name it like the source's"),
    ("stale_fingerprint", {}, DataError, r"has intensity properties for channels \['0', '1'\], the target has "
                                         r"\['0'\]; delete the file and run again"),
    ("no_images", {}, DataError, r"has no training cases"),
])
def test_errors(env, setup, kwargs, error, message):
    raw = env / "raw" / TGT
    if setup == "no_raw_json":
        (raw / "dataset.json").unlink()
    elif setup == "two_channels":
        set_channels(raw, ["CT", "CT"])
    elif setup == "mri":
        set_channels(raw, ["MRI"])
    elif setup == "stale_fingerprint":
        (env / "pre" / TGT / "dataset_fingerprint.json").write_text(json.dumps(fingerprint(2)))
    elif setup == "no_images":
        shutil.rmtree(raw / "imagesTr")
        (raw / "imagesTr").mkdir()
    args = {"source": 901, "target": 902, **kwargs}
    with pytest.raises(error, match=message):
        transfer_plans(args.pop("source"), args.pop("target"), **args)
    assert not (env / "pre" / TGT / "nnUNetPlans.json").exists()


def test_cli_prints_result_and_next_commands(env, capsys):
    assert main(["plans", "transfer", "-s", "901", "-t", "902", "-tp", "nnUNetPlansFrom901"]) == 0
    out = capsys.readouterr().out
    assert f"plans {SRC}/nnUNetPlans -> {env}/pre/{TGT}/nnUNetPlansFrom901.json" in out
    assert "\nnext:\n  nnUNetv2_preprocess -d 902 -plans_name nnUNetPlansFrom901 -c 3d_fullres\n" in out


@pytest.mark.parametrize("argv, message", [
    (["-s", "901", "-t", "902", "--normalization", "mine"], "--normalization must be one of target, source, got 'mine'"),
    (["-s", "901", "-t", "950"], "no dataset with id 950 (Dataset950_*)"),
])
def test_cli_errors_are_one_line(env, capsys, argv, message):
    assert main(["plans", "transfer", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunet_transfer plans: error: ") and message in err
