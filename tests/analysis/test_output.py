"""Issue 10 item 4 for ``analyze``: every mode checks its inputs before it creates the output folder, a failure
removes a folder it created (never one that existed), and an output path that cannot be made is one clear line."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from nnunet_transfer.analysis import report, session
from nnunet_transfer.analysis.karimi import run_compare, run_weights
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.training.snapshots import save_snapshot

from .test_activations import TINY, TOY, tiny_network, toy_env, toy_tree  # noqa: F401 (fixtures)
from .test_convergence import NOISY, ema_run

BASE = ["-d", "990", "-c", TINY, "--device", "cpu", "--no-progress"]
FAST = ["--layers", "blocks:1", "--patches", "2", "--voxels-per-patch", "400"]


@pytest.fixture(scope="module")
def runs(toy_tree):
    res = toy_tree["nnUNet_results"] / TOY
    good = ema_run(res / "G__nnUNetPlans__tiny" / "fold_0", tiny_network(1), NOISY[:4])
    bare = res / "B__nnUNetPlans__tiny" / "fold_0"  # checkpoint_final only: no snapshots, no start weights
    bare.mkdir(parents=True)
    torch.save({"network_weights": tiny_network(3).state_dict()}, bare / "checkpoint_final.pth")
    other = res / "other.pth"  # another architecture
    torch.save({"network_weights": tiny_network(4, features="8,16,24").state_dict()}, other)
    raw_only = res / "R__nnUNetPlans__tiny" / "fold_0"  # snapshots without the EMA curve
    for e, d in enumerate([None, 0.4, 0.5]):
        save_snapshot(tiny_network(5), raw_only, e, trainer_name="T", mean_fg_dice=d)
    return {"good": good, "bare": bare, "other": other, "raw_only": raw_only}


def cli(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet_transfer analyze: error: "), err
    assert "Traceback" not in err
    return lines[0]


# every mode, a bad input found at each stage: options, plans, networks, runs, data, convergence
CASES = [
    (["compare", "{good}", "{other}"], r"is not a network of Dataset990_Toy"),
    (["compare", "{good}", "{good}", "--measure", "pwcca", "-c", "nope"], r"configuration 'nope' is not in plans"),
    (["compare", "{good}", "{good}", "--patches", "1", "--voxels-per-patch", "4"], r"too few samples"),
    (["evolution", "{bare}"], r"has no snapshots"),
    (["evolution", "{good}", "--convergence-epoch", "9"], r"no snapshot of epoch 9"),
    (["evolution", "{raw_only}"], r"no validation pseudo-Dice \(ema_fg_dice\)"),
    (["evolution", "{good}", "--convergence-from", "validation"], r"splits_final.json not found"),
    (["evolution", "{good}", "--tolerance", "2"], r"--tolerance must be a fraction"),
    (["groups", "--group", "A={good},{good}@1", "--group", "B={good}@2,{other}"], r"is not a network of"),
    (["groups", "--group", "A={good},{good}@1", "--group", "B={good}@2"], r"group 'B' has 1 network"),
    (["reuse", "--ri", "{good}", "--tl", "{bare}"], r"has no snapshots"),
    (["reuse", "--ri", "{good}", "--tl", "{bare}", "--converged", "final"], r"has no snapshots .* and no start_weights"),
    (["weights", "{bare}", "--no-feature-maps"], r"has no snapshots"),
    (["weights", "{raw_only}", "--no-feature-maps"], r"ema_fg_dice.*--converged final"),
    (["weights", "{good}", "{other}", "--no-feature-maps"], r"is not a network of"),
    (["weights", "{good}", "--filters", "0"], r"--filters must be a positive integer"),
]


def argv_of(args, runs, out):
    argv = [a.format(**runs) for a in args]
    base = list(BASE)
    if "-c" in argv:
        i = argv.index("-c")
        base[3] = argv[i + 1]
        del argv[i:i + 2]
    fast = [] if argv[0] == "weights" else list(FAST)
    if "--patches" in argv:
        fast = fast[:2]
    return ["analyze", *argv, *base, *fast, "-o", out]


@pytest.mark.parametrize("args, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_a_failure_creates_nothing(toy_env, runs, capsys, tmp_path, args, message):
    out = tmp_path / "new" / "out"
    code, _, err = cli(capsys, *argv_of(args, runs, out))
    assert code == 2
    assert re.search(message, one_line(err)), err
    assert not (tmp_path / "new").exists()


def test_a_failure_keeps_an_existing_folder(toy_env, runs, capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, *argv_of(["evolution", "{bare}"], runs, tmp_path))
    assert code == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("study", ["compare", "evolution", "groups", "reuse", "weights"])
def test_an_output_path_under_a_file_is_one_line(toy_env, runs, capsys, tmp_path, study):
    f = tmp_path / "file.txt"
    f.write_text("x")
    args = {"compare": ["compare", "{good}", "{good}@1"], "evolution": ["evolution", "{good}"],
            "groups": ["groups", "--group", "A={good},{good}@1", "--group", "B={good}@2,{good}@3"],
            "reuse": ["reuse", "--ri", "{good}", "--tl", "{good}"], "weights": ["weights", "{good}"]}[study]
    code, _, err = cli(capsys, *argv_of(args, runs, f / "sub" / "out"))
    assert code == 2
    assert f"{f} is a file, not a folder" in one_line(err)
    code, _, err = cli(capsys, *argv_of(args, runs, f))
    assert code == 2 and "exists and is not a folder" in one_line(err)
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_folder_that_cannot_be_created_is_one_line(toy_env, runs, capsys, tmp_path, monkeypatch):
    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = cli(capsys, *argv_of(["compare", "{good}", "{good}@1"], runs, tmp_path / "out"))
    assert code == 2 and "cannot create output folder" in one_line(err) and "Permission denied" in err
    monkeypatch.undo()
    # no write permission in the first existing ancestor (root passes os.access, so it is simulated)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    code, _, err = cli(capsys, *argv_of(["compare", "{good}", "{good}@1"], runs, tmp_path / "a" / "b"))
    assert code == 2 and f"no write permission in {tmp_path}" in one_line(err)
    assert not (tmp_path / "a").exists()


def test_a_failure_while_writing_removes_what_this_call_made(toy_env, runs, tmp_path, monkeypatch):
    calls = []

    def broken(path, rows):  # the JSON is written, then the first CSV fails (a full disk, say)
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_csv", broken)
    opts = dict(dataset=990, configuration=TINY, device="cpu", progress=False, layers="blocks:1", patches=2,
                voxels_per_patch=400)
    with pytest.raises(OSError, match="No space"):
        run_compare([runs["good"], f"{runs['good']}@1"], out=tmp_path / "made" / "here", **opts)
    assert calls and not (tmp_path / "made").exists()  # the folder this call created is gone
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "compare.json").write_text("an older result")
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="No space"):
        run_compare([runs["good"], f"{runs['good']}@1"], out=existing, **opts)
    # the folder and its files stay; compare.png, added by this call, is gone; compare.json was overwritten
    assert sorted(p.name for p in existing.iterdir()) == ["compare.json", "notes.txt"]
    assert json.loads((existing / "compare.json").read_text())["study"] == "compare"
    assert (existing / "notes.txt").read_text() == "mine"


def test_writing_never_removes_a_folder_it_did_not_make(tmp_path):
    with pytest.raises(RuntimeError):
        with session.writing(tmp_path):
            (tmp_path / "new.txt").write_text("x")
            raise RuntimeError("boom")
    assert tmp_path.is_dir() and not (tmp_path / "new.txt").exists()
    with pytest.raises(ConfigError, match="an output folder is needed"):
        run_weights("x", dataset=990, configuration=TINY, out="  ")
