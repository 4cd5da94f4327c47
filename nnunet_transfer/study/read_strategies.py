"""[settings] and [[strategy]]: the settings every strategy shares, each strategy's trainer, checkpoint and
own settings, and the sweeps (one strategy per swept value), checked against the trainer that reads them.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import nnunet_transfer.trainers as trainers
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.study.model import Strategy, sweep_label
from nnunet_transfer.study.problems import Problems, read_name, read_str, read_table, suggest

STRATEGY_KEYS = ("name", "trainer", "pretrained", "settings", "title", "sweep")


def plans_value(value: Any) -> Any:
    """A TOML value as the plans JSON holds it: JSON has no infinity, the settings take "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: plans_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plans_value(v) for v in value]
    return value


def _setting_problem(key: str, value: Any) -> str | None:
    """What is wrong with one setting's value on its own (None: nothing); the text starts after the key."""
    try:
        TransferConfig.from_mapping({key: value})
    except ConfigError as e:
        return re.sub(rf"^setting {re.escape(repr(key))}:? ", "", str(e))
    return None


def read_settings(p: Problems, where: str, content: Any, prefix: str = "") -> dict:
    """The known settings of a table (``prefix``: how their keys are located, e.g. "settings."); every
    unknown key and every bad value is a problem of its own."""
    if not isinstance(content, dict):
        p.add(where, f"settings must be a table of setting = value, got {content!r}")
        return {}
    keys = TransferConfig.keys()
    out = {}
    for key, value in content.items():
        if key not in keys:
            p.add(where, f"unknown setting {key!r}{suggest(key, keys)}; settings: {', '.join(keys)}")
            continue
        value = plans_value(value)
        problem = _setting_problem(key, value)
        if problem:
            p.add(f"{where} {prefix}{key}" if prefix else f"{_bracket(where)} {key}", problem)
            continue
        out[key] = value
    return out


def _bracket(where: str) -> str:
    return where if where.startswith("[") else f"[{where}]"


def trainer_classes() -> dict[str, type]:
    """``{name: class}`` of the trainers a study may name: this package's."""
    return {n: getattr(trainers, n) for n in trainers.__all__}


def read_strategies(p: Problems, entries: Any, pretrained: Mapping[str, Path | None], common: dict,
                    base_settings: dict, configuration: str | None) -> tuple[list[Strategy], list[str]]:
    """Every entry checked on its own; returns the strategies and every strategy name the file declares
    (sweeps expanded), also those of entries with problems, for the baseline and duplicate checks."""
    if not isinstance(entries, list) or not entries:
        p.add("strategy", "write the strategies as [[strategy]] entries (an array of tables)")
        return [], []
    classes = trainer_classes()
    out: list[Strategy] = []
    declared: list[tuple[str, int]] = []
    unused_common: dict[tuple[str, str], list[str]] = {}  # (setting, trainer) -> strategies
    for i, entry in enumerate(entries, 1):
        label = f"[[strategy]] #{i}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label += f" \"{entry['name']}\""
        strategies, names = _read_strategy(p, label, entry, classes, pretrained, common, base_settings,
                                           configuration, unused_common)
        out += strategies
        declared += [(n, i) for n in names]
    for key in dict.fromkeys(k for k, _ in unused_common):  # one problem per setting: one line to fix
        by = {t: users for (k, t), users in unused_common.items() if k == key}
        who = ", ".join(f"{t} (strategy {', '.join(map(repr, users))})" for t, users in by.items())
        valid = "; ".join(f"{t}: {sorted(classes[t].transfer_keys)}" for t in by)
        p.add(f"[settings] {key}", f"setting {key!r} is not used by {who}; valid settings of {valid}; set it in "
                                   f"the settings of the strategies that use it")
    names = [n for n, _ in declared]
    dup = sorted({n for n in names if names.count(n) > 1})
    for n in dup:
        where = ", ".join(f"#{i}" for m, i in declared if m == n)
        p.add("[[strategy]]", f"strategy name {n!r} appears more than once ({where}, counting the names a sweep "
                              f"generates); names must be unique (they name the configurations and the results "
                              f"folders)")
    return out, list(dict.fromkeys(names))


def _read_strategy(p: Problems, label: str, entry: Any, classes: dict, pretrained: Mapping[str, Path | None],
                   common: dict, base_settings: dict, configuration: str | None,
                   unused_common: dict) -> tuple[list[Strategy], list[str]]:
    """One [[strategy]] entry: its strategies (one per sweep value) when it has no problem, and its names."""
    before = len(p)
    entry = read_table(p, label, entry, STRATEGY_KEYS)
    if entry is None:
        return [], []
    for key in ("name", "trainer"):
        if key not in entry:
            p.add(label, f"{key} is missing (every strategy has a name and a trainer)")
    name = read_name(p, label, "name", entry["name"]) if "name" in entry else None
    trainer = read_str(p, label, "trainer", entry["trainer"]) if "trainer" in entry else None
    cls = None
    if trainer is not None and trainer not in classes:
        if trainer == "nnUNetTrainer" or trainer.startswith("nnUNetTrainer_"):
            p.add(label, f"{trainer} is one of nnU-Net's own trainers, which ignore the study's settings "
                         f"(schedule, seed); for stock nnU-Net training use nnUNetTrainerTransferBase")
        else:
            p.add(label, f"unknown trainer {trainer!r}{suggest(trainer, list(classes))}; a study trains this "
                         f"package's trainers (they read the study's settings; for nnU-Net's own baseline use "
                         f"nnUNetTrainerTransferBase): {', '.join(classes)}")
    elif trainer is not None:
        cls = classes[trainer]
    own = read_settings(p, label, entry.get("settings", {}), prefix="settings.")
    ref = entry.get("pretrained", False)
    if ref is True:
        if len(pretrained) != 1:
            p.add(label, f"pretrained = true needs exactly one checkpoint in [pretrained], there are "
                         f"{len(pretrained)}; name one: pretrained = \"NAME\"")
        ref = next(iter(pretrained)) if len(pretrained) == 1 else True
    elif ref is False:
        ref = None
    elif not isinstance(ref, str) or ref not in pretrained:
        p.add(label, f"pretrained = {ref!r} is not a checkpoint of [pretrained] "
                     f"({', '.join(pretrained) or 'none declared'}); give its name, true or false")
    title = entry.get("title", name)
    if not isinstance(title, str) and title is not None:
        p.add(label, f"title = {title!r} must be a string")
    # the variants: one, or one per swept value
    variants: list[tuple[str, dict, str | None, Any]] = [(name, own, None, None)]
    sweep = entry.get("sweep")
    if sweep is not None:
        variants = _sweep_variants(p, label, sweep, name, own)
    if name is None or variants is None:
        return [], []
    names = [v[0] for v in variants]
    out = []
    for vname, vsettings, key, value in variants:
        read_name(p, label, "name", vname)
        if cls is None:
            continue
        for k in vsettings:
            if k not in cls.transfer_keys:
                where = f"{label} {'sweep' if k == key else 'settings'}.{k}"
                p.add(where, f"setting {k!r} is not used by {trainer}; valid settings for {trainer}: "
                             f"{sorted(cls.transfer_keys)}")
        for k in common:
            if k not in cls.transfer_keys and k not in vsettings:
                users = unused_common.setdefault((k, trainer), [])
                if vname not in users:
                    users.append(vname)
        for k in [k for k in base_settings if k not in cls.transfer_keys and k not in {**common, **vsettings}]:
            p.add("study", f"configuration = {configuration!r}: its setting {k!r} (plans, nnunet_transfer) is not "
                           f"used by {trainer} (strategy {vname!r}); valid settings for {trainer}: "
                           f"{sorted(cls.transfer_keys)}; inherit from a configuration without it")
        merged = {**base_settings, **common, **vsettings}
        if len(p) > before or any(k not in cls.transfer_keys for k in merged):
            continue  # reported above (settings a trainer does not use: [settings]'s once, after every entry)
        try:
            cfg = TransferConfig.from_mapping(merged, defaults=cls.transfer_defaults, allowed=set(cls.transfer_keys),
                                              owner=trainer)
        except ConfigError as e:  # a value that is only wrong together with the base configuration's
            text = str(e).replace(" (use another configuration for other trainers)", "")
            p.add(label, f"{text} (settings of {vname!r}: the base configuration's, [settings] and its own)")
            continue
        if ref is None:
            why = cls.needs_pretrained(cfg)
            if why:
                p.add(label, f"{trainer} needs pretrained weights ({why.split(';')[0]}); add "
                             f"pretrained = \"NAME\" with the checkpoint in [pretrained]")
        vtitle = title if key is None else f"{title} ({key} = {sweep_label(value)})"
        out.append(Strategy(name=vname, trainer=trainer, pretrained=ref, settings=vsettings, title=vtitle,
                            sweep_key=key, sweep_value=value, family=name if key is not None else None))
    return (out if len(p) == before else []), names


def _sweep_variants(p: Problems, label: str, sweep: Any, name: str | None,
                    own: dict) -> list[tuple[str, dict, str, Any]] | None:
    """``(name-value, settings, key, value)`` per swept value; None when the sweep itself is malformed."""
    if not isinstance(sweep, dict) or len(sweep) != 1:
        return p.add(label, f"sweep = {sweep!r} must name one setting and its values, e.g. "
                            f"sweep = {{ l2sp_alpha = [0, 1, 8, inf] }}")
    (key, values), = sweep.items()
    if key not in TransferConfig.keys():
        return p.add(label, f"sweep setting {key!r} is not a setting{suggest(key, TransferConfig.keys())}")
    if key in own:
        return p.add(label, f"{key} is both swept and set in the strategy's settings; keep one")
    if not isinstance(values, list) or len(values) < 2:
        return p.add(label, f"sweep {key} = {values!r} needs a list of at least two values")
    labels = [sweep_label(v) for v in values]
    if len(set(labels)) != len(labels):
        return p.add(label, f"sweep {key} = {values!r} lists a value twice")
    for v in values:  # a bad value still names its strategy: the duplicate check sees every name
        problem = _setting_problem(key, plans_value(v))
        if problem:
            p.add(f"{label} sweep.{key}", f"value {v!r}: {problem}")
    return [(f"{name}-{lab}", {**own, key: plans_value(v)}, key, v) for lab, v in zip(labels, values)]



__all__ = ["read_settings", "read_strategies", "trainer_classes", "plans_value", "STRATEGY_KEYS"]
