"""``nnunet_transfer configure``: inheriting configurations, tiny networks, atomic writes, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.configure import add_configuration, resolved_configuration

DATA = Path(__file__).parent / "data"
NAME = "Dataset901_TransferSource"


@pytest.fixture
def plans() -> dict:
    return json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())


@pytest.fixture
def preprocessed(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "pre" / NAME
    folder.mkdir(parents=True)
    shutil.copy(DATA / "nnUNetPlans_3d_32.json", folder / "nnUNetPlans.json")
    shutil.copy(DATA / "dataset_ct2labels.json", folder / "dataset.json")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return folder


def test_new_configuration_inherits_and_reuses_data(plans):
    out = add_configuration(plans, base="3d_fullres", new="lam8", settings={"l2sp_alpha": 8.0})
    assert out["configurations"]["lam8"] == {"inherits_from": "3d_fullres",
                                             "nnunet_transfer": {"l2sp_alpha": 8.0}}
    conf = resolved_configuration(out, "lam8")
    assert conf["data_identifier"] == plans["configurations"]["3d_fullres"]["data_identifier"]
    assert "lam8" not in plans["configurations"], "the input plans must not be modified"


def test_settings_inherit_key_by_key(plans):
    a = add_configuration(plans, base="3d_fullres", new="a", settings={"num_epochs": 5, "seed": 1})
    b = add_configuration(a, base="a", new="b", settings={"seed": 2})
    assert resolved_configuration(b, "b")["nnunet_transfer"] == {"num_epochs": 5, "seed": 2}


@pytest.mark.parametrize("features, patch, stages, strides", [
    ("8,16,32", "32,32,32", 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    ("4,8", None, 2, [[1, 1, 1], [2, 2, 2]]),
    ("8,16,32,64", "64,32,16", 4, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]),
])
def test_tiny_network_builds_and_runs(plans, features, patch, stages, strides):
    out = add_configuration(plans, base="3d_fullres", new="tiny", features=features, patch=patch,
                            batch_size=2)
    conf = resolved_configuration(out, "tiny")
    kw = conf["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == stages
    assert kw["features_per_stage"] == [int(f) for f in features.split(",")]
    assert kw["strides"] == strides
    assert len(kw["n_conv_per_stage"]) == stages and len(kw["n_conv_per_stage_decoder"]) == stages - 1
    assert conf["batch_size"] == 2
    dataset_json = json.loads((DATA / "dataset_ct2labels.json").read_text())
    net = build_network(out, "tiny", dataset_json, deep_supervision=False)
    shape = conf["patch_size"]
    with torch.no_grad():
        y = net(torch.zeros(1, 1, *shape))
    assert tuple(y.shape) == (1, 3, *shape)


@pytest.mark.parametrize("kwargs, message", [
    (dict(base="3d_lowres", new="x"), r"base configuration '3d_lowres' is not in the plans; available: "
                                      r"\['2d', '3d_fullres'\]"),
    (dict(base="3d_fullres", new="3d_fullres"), r"must have a name of its own"),
    (dict(base="3d_fullres", new="2d"), r"configuration '2d' already exists in the plans; pass --force"),
    (dict(base="3d_fullres", new="a/b"), r"configuration name 'a/b' may only hold"),
    (dict(base="3d_fullres", new="x", settings={"num_epochs": 0}), r"'num_epochs' must be an integer >= 1"),
    (dict(base="3d_fullres", new="x", patch="32,32"), r"--patch must be 3 positive integers, got '32,32'"),
    (dict(base="3d_fullres", new="x", features="8,x"), r"--features must be comma-separated integers"),
    (dict(base="3d_fullres", new="x", features="8,16,32,64,128", patch="32,32,32"),
     r"patch \[32, 32, 32\] cannot be downsampled 4 times"),
    (dict(base="3d_fullres", new="x", batch_size=0), r"--batch-size must be an integer >= 1, got 0"),
])
def test_configure_errors(plans, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        add_configuration(plans, **kwargs)


def test_cli_writes_atomically_with_backup(preprocessed, capsys):
    before = (preprocessed / "nnUNetPlans.json").read_text()
    rc = main(["configure", "-d", "901", "-c", "3d_fullres", "-n", "tiny", "--features", "8,16,32",
               "--patch", "32,32,32", "--set", "num_epochs=3", "--set", "lr_scale=0.5"])
    assert rc == 0
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["tiny"]["nnunet_transfer"] == {"num_epochs": 3, "lr_scale": 0.5}
    assert (preprocessed / "nnUNetPlans.json.bak").read_text() == before
    assert not list(preprocessed.glob("*.tmp"))
    assert "configuration 'tiny' (inherits '3d_fullres') written" in capsys.readouterr().out


def test_cli_error_is_one_line_and_leaves_plans_untouched(preprocessed, capsys):
    before = (preprocessed / "nnUNetPlans.json").read_text()
    rc = main(["configure", "-d", "901", "-c", "3d_fullres", "-n", "x", "--set", "lr_scale=-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == ("nnunet_transfer configure: error: setting 'lr_scale' must be a finite number "
                           "> 0, got -1")
    assert (preprocessed / "nnUNetPlans.json").read_text() == before
    assert not (preprocessed / "nnUNetPlans.json.bak").exists()


def test_cli_unknown_dataset(preprocessed, capsys):
    assert main(["configure", "-d", "977", "-c", "3d_fullres", "-n", "x"]) == 2
    assert "no dataset with id 977 (Dataset977_*)" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("trainable=blocks:1,12", r"setting 'trainable' of configuration 'bad' \(N=\d+ stages\): block 12 in spec"),
    ("l2sp_scope=encodr", r"setting 'l2sp_scope' of configuration 'bad' .*unknown term 'encodr'"),
    ("lora_targets=blocks:0", r"setting 'lora_targets' of configuration 'bad' .*block 0"),
    ("stages=decoder+seg:5,middle", r"setting 'stages\[1\]' of configuration 'bad' .*unknown term 'middle'"),
])
def test_block_specs_are_parsed_against_the_stage_count_when_written(preprocessed, capsys, setting, message):
    import re

    before = (preprocessed / "nnUNetPlans.json").read_bytes()
    assert main(["configure", "-d", NAME, "-c", "3d_fullres", "-n", "bad", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert (preprocessed / "nnUNetPlans.json").read_bytes() == before
