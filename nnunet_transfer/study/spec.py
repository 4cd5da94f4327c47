"""The study file: one TOML file that declares a whole transfer experiment.

Everything is read and checked here, before anything is written or trained: unknown tables and keys
(with the closest valid name), wrong types, unknown trainers, settings a trainer does not use, strategies
that need pretrained weights but name none, missing checkpoints, a baseline that is not a strategy.
Sizes are checked against the dataset when the runs are expanded (:mod:`nnunet_transfer.study.table`).
Every problem is one :class:`~nnunet_transfer.errors.ConfigError` (the file's content) or
:class:`~nnunet_transfer.errors.DataError` (a file or dataset it names) whose message starts with the
file and the table, names the value, what is valid and the fix.

Layout (every table but ``[study]``, ``[splits]`` and ``[[strategy]]`` is optional)::

    [study]
    name = "karimi"              # configurations are named <name>_<strategy>; default: the file's stem
    target = 902                 # dataset id or name, preprocessed with the source's plans
    configuration = "3d_fullres" # the base configuration every strategy's configuration inherits
    plans = "nnUNetPlans"
    output = "karimi_study"      # the study folder, relative to this file; default: <file stem>/ beside it
    baseline = "scratch"         # compare's baseline (a strategy name)
    device = "cuda"              # -device of nnUNetv2_train / nnUNetv2_predict

    [pretrained]                 # named checkpoints (a file or a fold folder); $VARS and ~ are expanded
    source = "$nnUNet_results/Dataset901_Source/nnUNetTrainerTransferBase__nnUNetPlans__3d_fullres/fold_0"

    [splits]                     # issue 11's splits: held-out test set + nested training subsets
    n_train = [6, 15, "all"]     # integers, "P%" of the cases left after test and validation, "all"
    repeats = 1                  # independent draws of the subsets
    test = 12                    # held-out test cases; or test_cases = "FILE"; or folds = 5 (cross-validation)
    val = 3                      # validation cases per repeat (default 20 % of the non-test cases)
    seed = 0

    [settings]                   # settings of every strategy (any setting of this package)
    num_epochs = 1000

    [scoring]                    # evaluate + compare
    labels = [1, 2]              # default: every label of the references
    nsd_tolerance = 1.0          # mm
    metrics = ["dice", "hd95", "assd", "nsd", "lesion_f1"]
    test = "ttest"               # or "wilcoxon"
    alpha = 0.05
    resamples = 9999             # bootstrap resamples of the mean difference

    [predict]
    disable_tta = false
    processes = 3                # nnUNetv2_predict -npp and -nps; 0: no worker processes (sequential)

    [environment]                # extra environment variables of nnU-Net's programs
    nnUNet_n_proc_DA = "12"

    [slurm]                      # resources of each run's SLURM job (study run --executor slurm)
    partition = "gpu"
    gpus_per_node = 1
    cpus_per_task = 12
    mem_gb = 64
    timeout_min = 2880
    array_parallelism = 16

    [[strategy]]
    name = "finetune"
    trainer = "nnUNetTrainerFinetune"
    pretrained = "source"        # a name from [pretrained]; true = the only one; false/absent = none
    settings = { lr_scale = 0.5 }
    title = "fine-tune all layers, LR/2"

    [[strategy]]                 # a sweep: one strategy per value, named l2sp-0, l2sp-8, l2sp-inf, ...
    name = "l2sp"
    trainer = "nnUNetTrainerL2SP_Sagie"
    pretrained = "source"
    sweep = { l2sp_alpha = [0, 1, 2, 4, 8, 16, 50, inf] }
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nnunet_transfer.errors import ConfigError, DataError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (pyproject depends on tomli there)
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
TOP_LEVEL = ("study", "pretrained", "splits", "settings", "scoring", "predict", "environment", "slurm", "strategy")
STUDY_KEYS = ("name", "target", "configuration", "plans", "output", "baseline", "device")
SPLITS_KEYS = ("n_train", "repeats", "test", "test_cases", "folds", "folds_to_run", "val", "seed")
SCORING_KEYS = ("labels", "nsd_tolerance", "metrics", "test", "alpha", "resamples", "lesion_connectivity")
PREDICT_KEYS = ("disable_tta", "processes")
STRATEGY_KEYS = ("name", "trainer", "pretrained", "settings", "title", "sweep")
#: [slurm] key -> the submitit parameter it becomes (generic ones work for every submitit cluster)
SLURM_KEYS = {"partition": "slurm_partition", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
              "mem_gb": "mem_gb", "timeout_min": "timeout_min", "array_parallelism": "slurm_array_parallelism",
              "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
              "setup": "slurm_setup", "max_requeue": "slurm_max_num_timeout",
              "additional": "slurm_additional_parameters"}
DEVICES = ("cuda", "cpu", "mps")


# --------------------------------------------------------------------------- the parsed study
@dataclass(frozen=True)
class Strategy:
    """One strategy of the study (a sweep is expanded into one per value)."""

    name: str
    trainer: str
    pretrained: str | None  # a key of Study.pretrained
    settings: dict          # the strategy's own settings (the study's [settings] are merged at use)
    title: str
    sweep_key: str | None = None
    sweep_value: Any = None
    family: str | None = None  # the [[strategy]] name a sweep value came from


@dataclass(frozen=True)
class SplitSpec:
    n_train: tuple
    repeats: int = 1
    test: int | None = None
    test_cases: tuple[str, ...] | None = None
    test_cases_file: str | None = None
    folds: int | None = None  # cross-validation: every case is tested once
    folds_to_run: tuple[int, ...] | None = None
    val: int | None = None
    seed: int = 0

    @property
    def cross_validation(self) -> bool:
        return self.folds is not None

    def to_json(self) -> dict:
        return {"n_train": list(self.n_train), "repeats": self.repeats, "test": self.test,
                "test_cases": None if self.test_cases is None else list(self.test_cases), "folds": self.folds,
                "val": self.val, "seed": self.seed}


@dataclass(frozen=True)
class Scoring:
    labels: tuple[int, ...] | None = None
    nsd_tolerance: float = 1.0
    metrics: tuple[str, ...] | None = None  # None: compare's defaults
    test: str = "ttest"
    alpha: float = 0.05
    resamples: int = 9999
    lesion_connectivity: int = 26


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    dataset: str
    configuration: str
    plans: str
    output: Path
    baseline: str
    device: str
    pretrained: dict[str, Path]
    splits: SplitSpec
    settings: dict
    strategies: tuple[Strategy, ...]
    scoring: Scoring
    disable_tta: bool = False
    predict_processes: int = 3
    environment: dict[str, str] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    base_settings: dict = field(default_factory=dict)  # the base configuration's own settings

    def strategy(self, name: str) -> Strategy:
        return next(s for s in self.strategies if s.name == name)

    def configuration_of(self, strategy: Strategy) -> str:
        """The plans configuration of a strategy: its own results folder, inheriting the base."""
        return f"{self.name}_{strategy.name}"

    def effective_settings(self, strategy: Strategy) -> dict:
        """What the strategy's configuration holds: base configuration's settings < [settings] < its own."""
        return {**self.base_settings, **self.settings, **strategy.settings}

    @property
    def sweeps(self) -> dict[str, list[Strategy]]:
        """``{family: [strategies in sweep order]}`` for the sweeps of the file."""
        out: dict[str, list[Strategy]] = {}
        for s in self.strategies:
            if s.family is not None:
                out.setdefault(s.family, []).append(s)
        return out


# --------------------------------------------------------------------------- helpers
class _Where:
    """Prefix of every message: the file and the table being read."""

    def __init__(self, path: Path):
        self.path = path

    def err(self, table: str, text: str, cls=ConfigError):
        return cls(f"study file {self.path} [{table}]: {text}")


def _suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(w: _Where, table: str, content: Any, valid: Sequence[str]) -> dict:
    if not isinstance(content, dict):
        raise w.err(table, f"must be a table (section), got {type(content).__name__}: {content!r}")
    for key in content:
        if key not in valid:
            raise w.err(table, f"unknown key {key!r}{_suggest(key, valid)}; valid keys: {', '.join(valid)}")
    return content


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(w: _Where, table: str, key: str, v: Any, lo: int) -> int:
    if not _is_int(v) or v < lo:
        raise w.err(table, f"{key} = {v!r} must be an integer >= {lo}")
    return v


def _str(w: _Where, table: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise w.err(table, f"{key} = {v!r} must be a non-empty string")
    return v.strip()


def _name(w: _Where, table: str, key: str, v: Any) -> str:
    v = _str(w, table, key, v)
    if not NAME.fullmatch(v) or "__" in v:
        raise w.err(table, f"{key} = {v!r} may hold only letters, digits, '_', '.' and '-' (no '__': nnU-Net "
                           f"separates trainer, plans and configuration with it), starting with a letter or digit")
    return v


def expand_path(text: str, base: Path, *, what: str, w: _Where, table: str, strict: bool = True) -> Path:
    """``$VAR``/``~`` expanded; relative to the study file's folder; ``strict``: an unset variable is an error."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if left and strict:
        raise w.err(table, f"{what} {text!r} uses ${left[0]}, which is not set in the environment; "
                           f"fix: export {left[0]}=... or write the path out", DataError)
    p = Path(expanded)
    return p if p.is_absolute() else (base / p)


def sweep_label(value: Any) -> str:
    """8 -> "8", 0.5 -> "0.5", inf -> "inf" (for strategy names and axis labels)."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:g}"
    return str(value)


def plans_value(value: Any) -> Any:
    """A TOML value as the plans JSON holds it: JSON has no infinity, the settings take "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: plans_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plans_value(v) for v in value]
    return value


# --------------------------------------------------------------------------- reading
def read_toml(path: str | Path) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"study file {path} not found; write one with `nnunet_transfer study init --template "
                        f"karimi|amiri|sagie -d TARGET --pretrained CHECKPOINT -o {path}`")
    try:
        with open(path, "rb") as f:
            return path.resolve(), tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study file {path} is not valid TOML: {e}") from None


def load_study(path: str | Path, *, check_data: bool = True) -> Study:
    """Read and check a study file (module docstring); ``check_data``: resolve the dataset, plans and
    checkpoints too (every command does; unit tests of the file grammar may not)."""
    path, doc = read_toml(path)
    w = _Where(path)
    for key in doc:
        if key not in TOP_LEVEL:
            raise w.err(key, f"unknown table{_suggest(key, TOP_LEVEL)}; valid tables: {', '.join(TOP_LEVEL)}")
    for required in ("study", "splits", "strategy"):
        if required not in doc:
            hint = "[[strategy]] entries" if required == "strategy" else f"a [{required}] table"
            raise w.err(required, f"missing: a study file needs {hint} (see `nnunet_transfer study init`)")

    st = _check_keys(w, "study", doc["study"], STUDY_KEYS)
    name = _name(w, "study", "name", st.get("name", path.stem.replace(" ", "_")))
    if "target" not in st:
        raise w.err("study", "target is missing: the dataset the strategies are trained on, e.g. target = 902")
    target = st["target"]
    if not (_is_int(target) or isinstance(target, str)):
        raise w.err("study", f"target = {target!r} must be a dataset id (902) or name ('Dataset902_Liver')")
    configuration = _str(w, "study", "configuration", st.get("configuration", "3d_fullres"))
    plans = _str(w, "study", "plans", st.get("plans", "nnUNetPlans"))
    output = expand_path(_str(w, "study", "output", st.get("output", name)), path.parent, what="output", w=w,
                         table="study")
    device = _str(w, "study", "device", st.get("device", "cuda"))
    if device not in DEVICES:
        raise w.err("study", f"device = {device!r} is not one of {', '.join(DEVICES)} (nnUNetv2_train -device)")

    dataset, base_settings = str(target), {}
    if check_data:
        dataset, base_settings = _check_target(w, target, plans, configuration)
    pretrained = _read_pretrained(w, doc.get("pretrained"), path.parent, check_data)
    splits = _read_splits(w, doc["splits"], path.parent)
    settings = _read_settings(w, "settings", doc.get("settings", {}))
    strategies = _read_strategies(w, doc["strategy"], pretrained, {**base_settings, **settings})
    names = [s.name for s in strategies]
    baseline = st.get("baseline", names[0])
    if baseline not in names:
        raise w.err("study", f"baseline = {baseline!r} is not a strategy{_suggest(baseline, names)}; "
                             f"strategies: {', '.join(names)}")
    scoring = _read_scoring(w, doc.get("scoring", {}))
    pr = _check_keys(w, "predict", doc.get("predict", {}), PREDICT_KEYS)
    disable_tta = pr.get("disable_tta", False)
    if not isinstance(disable_tta, bool):
        raise w.err("predict", f"disable_tta = {disable_tta!r} must be true or false")
    processes = _int(w, "predict", "processes", pr.get("processes", 3), 0)
    environment = _read_environment(w, doc.get("environment", {}))
    slurm = _read_slurm(w, doc.get("slurm", {}))

    return Study(path=path, name=name, dataset=dataset, configuration=configuration, plans=plans, output=output,
                 baseline=baseline, device=device, pretrained=pretrained, splits=splits, settings=settings,
                 strategies=tuple(strategies), scoring=scoring, disable_tta=disable_tta,
                 predict_processes=processes, environment=environment, slurm=slurm, base_settings=base_settings)


def _check_target(w: _Where, target, plans: str, configuration: str) -> tuple[str, dict]:
    """The dataset's name and the base configuration's own settings (every strategy inherits them)."""
    from nnunet_transfer.config import PLANS_KEY
    from nnunet_transfer.nnunet_io import check_configuration, dataset_name, load_json, plans_path
    from nnunet_transfer.plans.configure import resolved_configuration

    try:
        dataset = dataset_name(target)
        plans_file = plans_path(dataset, plans)
    except DataError as e:
        raise w.err("study", f"target = {target!r}: {e}", DataError) from None
    content = load_json(plans_file)
    try:
        check_configuration(content, configuration)
    except DataError as e:
        raise w.err("study", f"configuration = {configuration!r}: {e}; fix: the target must be preprocessed "
                             f"with the source's plans (nnunet_transfer plans transfer, then nnUNetv2_preprocess)",
                    DataError) from None
    return dataset, dict(resolved_configuration(content, configuration).get(PLANS_KEY) or {})


def _read_pretrained(w: _Where, content: Any, base: Path, check: bool) -> dict[str, Path]:
    if content is None:
        return {}
    if isinstance(content, str):
        content = {"pretrained": content}
    if not isinstance(content, dict):
        raise w.err("pretrained", f"must be a table of name = \"checkpoint\" entries, got {content!r}")
    out = {}
    for key, value in content.items():
        _name(w, "pretrained", "name", key)
        p = expand_path(_str(w, "pretrained", key, value), base, what=f"{key} =", w=w, table="pretrained",
                        strict=check)
        if check:
            if p.is_dir():
                if not (p / "checkpoint_final.pth").is_file():
                    raise w.err("pretrained", f"{key} = {str(value)!r}: the folder {p} holds no checkpoint_final.pth; "
                                              f"give a checkpoint file or a finished fold folder", DataError)
            elif not p.is_file():
                raise w.err("pretrained", f"{key} = {str(value)!r}: checkpoint {p} not found; fix the path (relative "
                                          f"paths are relative to the study file)", DataError)
        out[key] = p.resolve() if check else p
    return out


def _size(w: _Where, v: Any):
    from nnunet_transfer.experiments.splits import parse_size

    if isinstance(v, float) or isinstance(v, bool):
        raise w.err("splits", f"n_train value {v!r} is not a size: give an integer, a percentage like \"50%\" or "
                              f"\"all\"")
    try:
        return parse_size(v)
    except DataError as e:
        raise w.err("splits", str(e).replace("--n-train", "n_train")) from None


def _read_splits(w: _Where, content: Any, base: Path) -> SplitSpec:
    sp = _check_keys(w, "splits", content, SPLITS_KEYS)
    if "n_train" not in sp:
        raise w.err("splits", "n_train is missing: the training-set sizes, e.g. n_train = [6, 15, \"all\"]")
    sizes = sp["n_train"] if isinstance(sp["n_train"], list) else [sp["n_train"]]
    if not sizes:
        raise w.err("splits", "n_train is empty; give at least one size, e.g. n_train = [6, 15]")
    sizes = tuple(_size(w, v) for v in sizes)
    if len(set(map(str, sizes))) != len(sizes):
        raise w.err("splits", f"n_train = {list(sizes)} lists a size twice")
    given = [k for k in ("test", "test_cases", "folds") if k in sp]
    if len(given) != 1:
        raise w.err("splits", "give the test cases in exactly one way: test = K (a held-out set of K cases), "
                              "test_cases = \"FILE\" (listed cases) or folds = F (F-fold cross-validation, every "
                              f"case tested once); got {', '.join(given) or 'none'}")
    test = test_cases = folds = test_file = folds_to_run = None
    if "test" in sp:
        test = _int(w, "splits", "test", sp["test"], 1)
    elif "test_cases" in sp:
        from nnunet_transfer.experiments.splits import read_case_list

        v = sp["test_cases"]
        if isinstance(v, list):
            if not v or not all(isinstance(c, str) and c for c in v):
                raise w.err("splits", "test_cases must be a file name or a non-empty list of case identifiers")
            test_cases = tuple(v)
        else:
            f = expand_path(_str(w, "splits", "test_cases", v), base, what="test_cases", w=w, table="splits")
            try:
                test_cases = tuple(read_case_list(f))
            except DataError as e:
                raise w.err("splits", str(e).replace("--test-cases", "test_cases"), DataError) from None
            test_file = str(f)
    else:
        folds = _int(w, "splits", "folds", sp["folds"], 2)
    if "folds_to_run" in sp:
        if folds is None:
            raise w.err("splits", "folds_to_run needs folds = F (cross-validation)")
        ftr = sp["folds_to_run"]
        if not isinstance(ftr, list) or not ftr or not all(_is_int(f) and 0 <= f < folds for f in ftr):
            raise w.err("splits", f"folds_to_run = {ftr!r} must list fold numbers 0..{folds - 1}")
        folds_to_run = tuple(sorted(set(ftr)))
    val = _int(w, "splits", "val", sp["val"], 1) if "val" in sp else None
    return SplitSpec(n_train=sizes, repeats=_int(w, "splits", "repeats", sp.get("repeats", 1), 1), test=test,
                     test_cases=test_cases, test_cases_file=test_file, folds=folds, folds_to_run=folds_to_run,
                     val=val, seed=_int(w, "splits", "seed", sp.get("seed", 0), 0))


def _read_settings(w: _Where, table: str, content: Any) -> dict:
    from nnunet_transfer.config import TransferConfig

    if not isinstance(content, dict):
        raise w.err(table, f"settings must be a table of setting = value, got {content!r}")
    keys = TransferConfig.keys()
    for key in content:
        if key not in keys:
            raise w.err(table, f"unknown setting {key!r}{_suggest(key, keys)}; settings: {', '.join(keys)}")
    return {k: plans_value(v) for k, v in content.items()}


def _trainer_classes() -> dict[str, type]:
    import nnunet_transfer.trainers as trainers

    return {n: getattr(trainers, n) for n in trainers.__all__}


def _read_strategies(w: _Where, entries: Any, pretrained: Mapping[str, Path], common: dict) -> list[Strategy]:
    from nnunet_transfer.config import TransferConfig

    if not isinstance(entries, list) or not entries:
        raise w.err("strategy", "write the strategies as [[strategy]] entries (an array of tables)")
    classes = _trainer_classes()
    out: list[Strategy] = []
    for i, entry in enumerate(entries, 1):
        label = f"strategy #{i}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = f"strategy {entry['name']!r}"
        _check_keys(w, label, entry, STRATEGY_KEYS)
        for key in ("name", "trainer"):
            if key not in entry:
                raise w.err(label, f"{key} is missing (every strategy has a name and a trainer)")
        name = _name(w, label, "name", entry["name"])
        trainer = _str(w, label, "trainer", entry["trainer"])
        if trainer not in classes and (trainer == "nnUNetTrainer" or trainer.startswith("nnUNetTrainer_")):
            raise w.err(label, f"{trainer} is one of nnU-Net's own trainers, which ignore the study's settings "
                               f"(schedule, seed); for stock nnU-Net training use nnUNetTrainerTransferBase")
        if trainer not in classes:
            raise w.err(label, f"unknown trainer {trainer!r}{_suggest(trainer, list(classes))}; a study trains this "
                               f"package's trainers (they read the study's settings; for nnU-Net's own baseline use "
                               f"nnUNetTrainerTransferBase): {', '.join(classes)}")
        cls = classes[trainer]
        own = _read_settings(w, label, entry.get("settings", {}))
        ref = entry.get("pretrained", False)
        if ref is True:
            if len(pretrained) != 1:
                raise w.err(label, f"pretrained = true needs exactly one checkpoint in [pretrained], there are "
                                   f"{len(pretrained)}; name one: pretrained = \"NAME\"")
            ref = next(iter(pretrained))
        elif ref is False:
            ref = None
        elif not isinstance(ref, str) or ref not in pretrained:
            raise w.err(label, f"pretrained = {ref!r} is not a checkpoint of [pretrained] "
                               f"({', '.join(pretrained) or 'none declared'}); give its name, true or false")
        title = entry.get("title", name)
        if not isinstance(title, str):
            raise w.err(label, f"title = {title!r} must be a string")
        sweep = entry.get("sweep")
        variants: list[tuple[str, dict, str | None, Any]] = [(name, own, None, None)]
        if sweep is not None:
            if not isinstance(sweep, dict) or len(sweep) != 1:
                raise w.err(label, f"sweep = {sweep!r} must name one setting and its values, e.g. "
                                   f"sweep = {{ l2sp_alpha = [0, 1, 8, inf] }}")
            (key, values), = sweep.items()
            if key not in TransferConfig.keys():
                raise w.err(label, f"sweep setting {key!r} is not a setting{_suggest(key, TransferConfig.keys())}")
            if key in own:
                raise w.err(label, f"{key} is both swept and set in the strategy's settings; keep one")
            if not isinstance(values, list) or len(values) < 2:
                raise w.err(label, f"sweep {key} = {values!r} needs a list of at least two values")
            labels = [sweep_label(v) for v in values]
            if len(set(labels)) != len(labels):
                raise w.err(label, f"sweep {key} = {values!r} lists a value twice")
            variants = [(f"{name}-{lab}", {**own, key: plans_value(v)}, key, v) for lab, v in zip(labels, values)]
        for vname, vsettings, key, value in variants:
            _name(w, label, "name", vname)
            merged = {**common, **vsettings}
            try:
                cfg = TransferConfig.from_mapping(merged, defaults=cls.transfer_defaults,
                                                  allowed=set(cls.transfer_keys), owner=trainer)
            except ConfigError as e:
                text = str(e).replace(" (use another configuration for other trainers)", "")
                raise w.err(label, f"{text} (settings of {vname!r}: the base configuration's, [settings] and its "
                                   f"own)") from None
            if ref is None:
                why = cls.needs_pretrained(cfg)
                if why:
                    raise w.err(label, f"{trainer} needs pretrained weights ({why.split(';')[0]}); add "
                                       f"pretrained = \"NAME\" with the checkpoint in [pretrained]")
            vtitle = title if key is None else f"{title} ({key} = {sweep_label(value)})"
            out.append(Strategy(name=vname, trainer=trainer, pretrained=ref, settings=vsettings, title=vtitle,
                                sweep_key=key, sweep_value=value, family=name if key is not None else None))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise w.err("strategy", f"strategy name(s) {', '.join(dup)} appear more than once; names must be unique "
                                f"(they name the configurations and the results folders)")
    return out


def _read_scoring(w: _Where, content: Any) -> Scoring:
    from nnunet_transfer.experiments.compare import TESTS
    from nnunet_transfer.experiments.metrics import METRIC_COLUMNS

    sc = _check_keys(w, "scoring", content, SCORING_KEYS)
    labels = sc.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(_is_int(v) and v > 0 for v in labels):
            raise w.err("scoring", f"labels = {labels!r} must be a list of foreground label values, e.g. [1, 2]")
        labels = tuple(dict.fromkeys(labels))
    tol = sc.get("nsd_tolerance", 1.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise w.err("scoring", f"nsd_tolerance = {tol!r} must be a distance in mm (a number >= 0)")
    metrics = sc.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, list) or not metrics:
            raise w.err("scoring", f"metrics = {metrics!r} must be a non-empty list, e.g. [\"dice\", \"hd95\"]")
        for m in metrics:
            if m not in METRIC_COLUMNS:
                raise w.err("scoring", f"unknown metric {m!r}{_suggest(m, METRIC_COLUMNS)}; metrics: "
                                       f"{', '.join(METRIC_COLUMNS)}")
        metrics = tuple(dict.fromkeys(metrics))
    test = sc.get("test", "ttest")
    if test not in TESTS:
        raise w.err("scoring", f"test = {test!r} is not one of {', '.join(TESTS)}")
    alpha = sc.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise w.err("scoring", f"alpha = {alpha!r} must be a probability in (0, 1), e.g. 0.05")
    conn = sc.get("lesion_connectivity", 26)
    if conn not in (6, 18, 26, 4, 8):
        raise w.err("scoring", f"lesion_connectivity = {conn!r} must be 6, 18 or 26 (3-D) or 4, 8 (2-D)")
    return Scoring(labels=labels, nsd_tolerance=float(tol), metrics=metrics, test=test, alpha=float(alpha),
                   resamples=_int(w, "scoring", "resamples", sc.get("resamples", 9999), 100),
                   lesion_connectivity=conn)


def _read_environment(w: _Where, content: Any) -> dict[str, str]:
    if not isinstance(content, dict):
        raise w.err("environment", f"must be a table of NAME = \"value\", got {content!r}")
    out = {}
    for k, v in content.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise w.err("environment", f"{k!r} is not an environment variable name")
        if k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            raise w.err("environment", f"{k} comes from the environment `study` runs in (every run must use "
                                       f"the same folders); set it there, not in the study file")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise w.err("environment", f"{k} = {v!r} must be a string or a number")
        out[k] = str(v)
    return out


def _read_slurm(w: _Where, content: Any) -> dict[str, Any]:
    sl = _check_keys(w, "slurm", content, list(SLURM_KEYS))
    out: dict[str, Any] = {}
    for key, value in sl.items():
        if key in ("gpus_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "max_requeue"):
            value = _int(w, "slurm", key, value, 0 if key in ("gpus_per_node", "max_requeue") else 1)
        elif key == "mem_gb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise w.err("slurm", f"mem_gb = {value!r} must be a number of GB > 0")
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise w.err("slurm", f"setup = {value!r} must be a list of shell lines, e.g. [\"module load cuda\"]")
        elif key == "additional":
            if not isinstance(value, dict):
                raise w.err("slurm", f"additional = {value!r} must be a table of sbatch options, e.g. "
                                     f"{{ gres = \"gpu:a100:1\" }}")
        else:
            value = _str(w, "slurm", key, value)
        out[key] = value
    return out


__all__ = ["Study", "Strategy", "SplitSpec", "Scoring", "load_study", "read_toml", "sweep_label", "plans_value",
           "SLURM_KEYS"]
