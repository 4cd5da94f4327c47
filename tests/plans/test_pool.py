"""``pool``: links, prefixed case names, merged dataset.json, and every disagreement in one error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_transfer.cli.main import main
from nnunet_transfer.data import SOURCE, TARGET, make_dataset
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.plans import pool as pool_module
from nnunet_transfer.plans.pool import pool_datasets

A, B = "Dataset901_CentreA", "Dataset902_CentreB"


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    make_dataset(tmp_path / "raw", 901, "CentreA", SOURCE, n_train=2, physical_size=8.0, seed=1)
    make_dataset(tmp_path / "raw", 902, "CentreB", TARGET, n_train=3, physical_size=8.0, seed=2)
    return tmp_path / "raw"


def edit_json(folder: Path, **changes) -> None:
    dj = json.loads((folder / "dataset.json").read_text())
    dj.update(changes)
    (folder / "dataset.json").write_text(json.dumps(dj))


def test_pool_links_prefixed_cases_and_merges_dataset_json(raw):
    from nnunet_transfer.nnunet_io import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    result = pool_datasets([901, "902"], 950, "Pool")
    folder = raw / "Dataset950_Pool"
    assert result.folder == folder and result.cases == {A: 2, B: 3}
    assert result.linked == 10 and result.copied == 0
    dj = load_json(folder / "dataset.json")
    assert dj["numTraining"] == 5 and dj["name"] == "Pool"
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert dj["file_ending"] == ".nii.gz" and dj["nnunet_transfer_pool"] == {A: 2, B: 3}
    # nnU-Net's own listing finds every case, named by its source
    cases = get_filenames_of_train_images_and_targets(str(folder), dj)
    assert sorted(cases) == [f"{A}_centrea_000", f"{A}_centrea_001", f"{B}_centreb_000", f"{B}_centreb_001",
                             f"{B}_centreb_002"]
    img = folder / "imagesTr" / f"{B}_centreb_002_0000.nii.gz"
    assert img.is_symlink() and img.resolve() == (raw / B / "imagesTr" / "centreb_002_0000.nii.gz").resolve()
    assert (folder / "labelsTr" / f"{A}_centrea_000.nii.gz").is_symlink()
    assert not list(raw.glob(".*partial"))
    assert result.next_commands[0] == "nnUNetv2_plan_and_preprocess -d 950 -c 3d_fullres --verify_dataset_integrity"


def test_copy_and_fallback_when_links_fail(raw, monkeypatch):
    result = pool_datasets([901, 902], 950, "Copied", copy=True)
    assert result.copied == 10 and result.linked == 0
    assert not any(p.is_symlink() for p in (raw / "Dataset950_Copied").rglob("*"))

    def no_links(src, dst):
        raise OSError("operation not permitted")

    monkeypatch.setattr(pool_module.os, "symlink", no_links)
    result = pool_datasets([901, 902], 951, "Fallback")
    assert result.copied == 10 and result.linked == 0
    assert "10 copied" in result.text()


def test_failure_half_way_leaves_nothing(raw, monkeypatch):
    calls = []

    def place(src, dest, copy):
        calls.append(src)
        if len(calls) == 3:
            raise OSError("disk full")
        return pool_module.os.symlink(src, dest) or True

    monkeypatch.setattr(pool_module, "_place", place)
    with pytest.raises(OSError, match="disk full"):
        pool_datasets([901, 902], 950, "Pool")
    assert sorted(p.name for p in raw.iterdir()) == [A, B]


def test_every_disagreement_is_listed(raw):
    edit_json(raw / B, labels={"background": 0, "organ": 1, "tumour": 2}, channel_names={"0": "MRI"},
              file_ending=".nii")
    with pytest.raises(ConfigError) as e:
        pool_datasets([901, 902], 950, "Pool")
    msg = str(e.value)
    assert msg.startswith("datasets cannot be pooled, they differ in ")
    assert (f"channel_names (other values '0' 'CT' vs 'MRI'): {A} {{'0': 'CT'}} vs {B} {{'0': 'MRI'}}") in msg
    assert (f"labels ({B} lacks ['lesion']; {B} adds ['tumour']): {A} {{'background': 0, 'organ': 1, 'lesion': 2}} "
            f"vs {B} {{'background': 0, 'organ': 1, 'tumour': 2}}") in msg
    assert f"file_ending: {A} '.nii.gz' vs {B} '.nii'" in msg
    assert not (raw / "Dataset950_Pool").exists()


@pytest.mark.parametrize("args, error, message", [
    (([901], 950, "P"), ConfigError, r"pool needs at least two datasets, got \[901\]"),
    (([901, "Dataset901_CentreA"], 950, "P"), ConfigError, r"a dataset is given twice"),
    (([901, 902], 0, "P"), ConfigError, r"the new dataset id must be an integer in 1..999, got 0"),
    (([901, 902], 950, "a b"), ConfigError, r"--name 'a b' may only hold letters, digits"),
    (([901, 902], 902, "P"), ConfigError, r"dataset id 902 is taken \(Dataset902_CentreB in nnUNet_raw\); "
                                          r"choose another -o"),
    (([901, 977], 950, "P"), DataError, r"no dataset with id 977"),
])
def test_argument_errors(raw, args, error, message):
    with pytest.raises(error, match=message):
        pool_datasets(*args)


def test_missing_files_and_dataset_json(raw):
    (raw / B / "labelsTr" / "centreb_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Dataset902_CentreB case 'centreb_001': expected 1 image\(s\) and a "
                                        r"label, found 1 image\(s\); missing \['.*centreb_001.nii.gz'\]"):
        pool_datasets([901, 902], 950, "Pool")
    (raw / B / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"Dataset902_CentreB/dataset.json not found: pool reads raw datasets"):
        pool_datasets([901, 902], 950, "Pool")


def test_cli(raw, capsys):
    assert main(["pool", "-d", "901", "902", "-o", "950", "--name", "Pool"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pooled 5 training cases ({A}: 2, {B}: 3) into {raw}/Dataset950_Pool (10 files linked)")
    assert main(["pool", "-d", "901", "902", "-o", "950", "--name", "Again"]) == 2
    err = capsys.readouterr().err
    assert err == ("nnunet_transfer pool: error: dataset id 950 is taken (Dataset950_Pool in nnUNet_raw); "
                   "choose another -o\n")
