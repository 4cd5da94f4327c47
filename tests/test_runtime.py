"""``nnunet_transfer.runtime``: every effect on the process, each installed by its function, listed in its docstring."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from nnunet_transfer import runtime
from nnunet_transfer.errors import ConfigError, DataError


def test_the_docstring_lists_every_function_that_acts_on_the_process():
    for name in ("nnunet_train_args", "pretrained_weights_argument", "redirect_nnunet_loader", "install_excepthook",
                 "install_startup_hint", "remove_startup_hint", "install_hint_hook", "apply_cpu_threads"):
        assert f":func:`{name}`" in runtime.__doc__, name


def test_importing_it_at_start_up_loads_neither_torch_nor_nnunet():
    code = "import sys, nnunet_transfer._hints; print(sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/nnUNetv2_train", "1", "3d", "0", "-pretrained_weights", "w.pth"], ("w.pth", False, False)),
    (["nnUNetv2_train", "1", "3d", "0", "--c"], (None, True, False)),
    (["run_training.py", "1", "3d", "0", "--val", "--pretrained_weights", "x"], ("x", False, True)),
    (["/venv/bin/python", "-pretrained_weights", "w.pth"], None),
    ([], None),
])
def test_train_command_line(argv, expected):
    args = runtime.nnunet_train_args(argv)
    assert (None if args is None else tuple(args)) == expected


def test_pretrained_weights_argument_is_absolute():
    assert runtime.pretrained_weights_argument(["p", "-pretrained_weights", "w.pth"]) == os.path.abspath("w.pth")
    assert runtime.pretrained_weights_argument(["p", "-pretrained_weights"]) is None


def test_loader_redirect_swaps_only_the_given_name_and_never_stacks(monkeypatch, tmp_path):
    calls = []
    module = types.ModuleType("nnunetv2.run.run_training")
    module.load_pretrained_weights = lambda network, fname, verbose=False: calls.append(fname)
    original = module.load_pretrained_weights
    monkeypatch.setitem(sys.modules, "nnunetv2.run.run_training", module)
    folder, file = tmp_path / "model", tmp_path / "model" / "fold_0" / "checkpoint_final.pth"
    assert runtime.redirect_nnunet_loader(str(file), file) is False  # the file itself: nothing to do
    assert runtime.redirect_nnunet_loader(str(folder), file) is True
    assert runtime.redirect_nnunet_loader(str(folder), file) is True
    assert module.load_pretrained_weights._nnunet_transfer_original is original
    module.load_pretrained_weights(None, str(folder))
    module.load_pretrained_weights(None, "other.pth")
    assert calls == [str(file), "other.pth"]


def test_loader_redirect_hands_the_given_file_to_our_loader_and_every_other_to_nnunets(monkeypatch, tmp_path):
    """An nnssl checkpoint: our loader (encoder and stem only) takes it, even given as the file itself."""
    calls, ours = [], []
    module = types.ModuleType("nnunetv2.run.run_training")
    module.load_pretrained_weights = lambda network, fname, verbose=False: calls.append(fname)
    monkeypatch.setitem(sys.modules, "nnunetv2.run.run_training", module)
    file = tmp_path / "nnssl.pth"
    assert runtime.redirect_nnunet_loader(str(file), file,
                                          loader=lambda network, path, verbose=False: ours.append((path, verbose)))
    module.load_pretrained_weights(None, str(file), verbose=True)
    module.load_pretrained_weights(None, "other.pth")
    assert ours == [(str(file), True)] and calls == ["other.pth"]


def test_excepthook_prints_our_errors_as_one_line_once(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[0]))
    runtime.install_excepthook()
    hook = sys.excepthook
    runtime.install_excepthook()
    assert sys.excepthook is hook
    hook(ConfigError, ConfigError("bad setting"), None)
    assert capsys.readouterr().err == "nnunet_transfer: error: bad setting\n"
    hook(KeyError, KeyError("x"), None)
    assert seen == [KeyError]


def test_startup_hint_file_round_trip(tmp_path):
    path = runtime.install_startup_hint(str(tmp_path))
    assert path == Path(tmp_path) / runtime.PTH_NAME and path.read_text() == runtime.PTH_LINE
    assert runtime.remove_startup_hint(str(tmp_path)) == (path, True)
    assert runtime.remove_startup_hint(str(tmp_path)) == (path, False)


def test_cpu_threads_setting_sets_torch_threads_on_the_cpu_only_and_refuses_a_bad_value(monkeypatch):
    import torch

    from nnunet_transfer.runtime import CPU_THREADS_VAR, apply_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(CPU_THREADS_VAR, raising=False)
        assert apply_cpu_threads(torch.device("cpu")) is None and torch.get_num_threads() == before
        monkeypatch.setenv(CPU_THREADS_VAR, "1")
        assert apply_cpu_threads(torch.device("cuda")) is None and torch.get_num_threads() == before
        assert apply_cpu_threads(torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        for bad in ("0", "two", "-1", "1.5"):
            monkeypatch.setenv(CPU_THREADS_VAR, bad)
            with pytest.raises(DataError, match=f"{CPU_THREADS_VAR}='{re.escape(bad)}' is not a positive number"):
                apply_cpu_threads(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
