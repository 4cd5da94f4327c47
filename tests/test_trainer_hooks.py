"""A strategy trainer is a declaration: it overrides hooks of the base, never an nnU-Net method the base overrides.

``nnUNetTrainerTransferBase`` overrides nnU-Net's methods (``configure_optimizers``, ``on_train_start``,
``load_checkpoint``, ...) and calls small named hooks from them; a subclass that overrode one of those methods
again would have to re-implement the order of events the base keeps in one place.
"""
from __future__ import annotations

import inspect

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_transfer.trainers as T
from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase

#: nnU-Net methods the base overrides: the ones no strategy may override again
BASE_OVERRIDES = frozenset(name for name, value in vars(nnUNetTrainerTransferBase).items()
                           if callable(value) and name in vars(nnUNetTrainer))
STRATEGIES = [getattr(T, name) for name in T.__all__ if getattr(T, name) is not nnUNetTrainerTransferBase]


def test_the_base_overrides_the_nnunet_methods_it_dispatches():
    assert {"initialize", "configure_optimizers", "on_train_start", "on_train_epoch_start", "on_epoch_start",
            "on_epoch_end", "on_train_end", "train_step", "save_checkpoint", "load_checkpoint", "run_training",
            "perform_actual_validation"} <= BASE_OVERRIDES


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_strategy_overrides_only_hooks(cls):
    assert issubclass(cls, nnUNetTrainerTransferBase)
    overridden = {name: klass.__name__ for klass in cls.__mro__[:cls.__mro__.index(nnUNetTrainerTransferBase)]
                  for name in vars(klass) if name in BASE_OVERRIDES}
    assert not overridden, (f"{cls.__name__} overrides nnU-Net method(s) the base already overrides: {overridden} "
                            f"(class that defines each); override the base's hooks instead")


def test_every_hook_the_strategies_override_is_documented_in_the_base():
    hooks = {name for cls in STRATEGIES for klass in cls.__mro__[:cls.__mro__.index(nnUNetTrainerTransferBase)]
             for name, value in vars(klass).items()
             if callable(value) and name.startswith("_") and not name.startswith("__")
             and hasattr(nnUNetTrainerTransferBase, name)}
    undocumented = sorted(h for h in hooks if not inspect.getdoc(getattr(nnUNetTrainerTransferBase, h)))
    assert hooks and not undocumented, undocumented


def _documented_hooks() -> dict[str, list[str]]:
    """documentation/trainers.md's table "Which nnU-Net method calls which hook": method -> hooks."""
    from pathlib import Path
    import re

    text = (Path(__file__).parents[1] / "documentation" / "trainers.md").read_text()
    table = text.split("Which nnU-Net method calls which hook", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        method, hooks = (cell.strip() for cell in line.strip("|").split("|"))
        rows[method.strip("`")] = re.findall(r"`(\w+)`", hooks)
    return rows


def _reached(method: str) -> set[str]:
    """The base's own methods that METHOD calls, directly or through other methods of the base."""
    import re

    own = {n for n, v in vars(nnUNetTrainerTransferBase).items() if callable(v) or isinstance(v, classmethod)}
    seen, todo = set(), [method]
    while todo:
        name = todo.pop()
        source = inspect.getsource(getattr(nnUNetTrainerTransferBase, name))
        for called in set(re.findall(r"\.(\w+)\(", source)) & own - seen - {name}:
            seen.add(called)
            todo.append(called)
    return seen


def test_the_documented_hook_table_is_what_the_base_calls():
    rows = _documented_hooks()
    assert len(rows) >= 9 and "configure_optimizers" in rows
    for method, hooks in rows.items():
        assert method == "__init__" or method in BASE_OVERRIDES, f"{method} is not an nnU-Net method the base overrides"
        reached = _reached(method)
        for hook in hooks:
            assert callable(getattr(nnUNetTrainerTransferBase, hook, None)), f"{hook} is not a hook of the base"
            assert hook in reached, f"documentation/trainers.md says {method} calls {hook}; the base's code does not"
