"""The study file: one TOML file that declares a whole transfer experiment.

Everything is read and checked here, whole, before anything is written or trained: unknown tables and
keys (with the closest valid name), missing tables, wrong types, unknown trainers, every strategy's
settings and sweep values, settings a trainer does not use, strategies that need pretrained weights but
name none, duplicate strategy names (also those a sweep generates), missing checkpoints, a baseline that
is not a strategy, an output folder that cannot be the study's, and the sizes, test and validation counts
against the dataset's cases (:func:`nnunet_transfer.study.folds.fold_plan`). Each problem names the table
and key ('[[strategy]] #3 "l2sp" settings.l2sp_alpha'), the value, what is valid and the fix.

The readers collect the problems (:class:`Problems`) and go on, so one pass finds them all: one problem
is raised as the one-line :class:`~nnunet_transfer.errors.ConfigError` (the file's content) or
:class:`~nnunet_transfer.errors.DataError` (a file or dataset it names) it is; several as one
:class:`StudyFileError` (a ConfigError): ``study file F has N problems:`` and one line per problem. A file
that is missing or not TOML stops there; a value with a problem skips the checks that need it. Every
``study`` command reads the file with :func:`load_study`.

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
    correction = "holm"          # Holm over the strategies (default), or "none": the papers' uncorrected tests
    resamples = 9999             # bootstrap resamples of the mean difference

    [predict]
    disable_tta = false
    processes = 3                # nnUNetv2_predict -npp and -nps; 0: no worker processes (sequential)
    checkpoint = "final"         # or "best": nnUNetv2_predict -chk checkpoint_best.pth (the lowest validation
                                 # loss with early_stopping = "val_loss", else nnU-Net's best EMA pseudo-Dice)

    [analysis]                   # Karimi et al.'s analyses of the study's own runs, by `study report`
    analyses = ["evolution", "groups", "reuse", "weights"]   # default: all four
    snapshot_every = 50          # required: `study plan` sets it on every run (weights-only snapshots)
    layers = "blocks:1,3,5,7,9,11"  # a block spec, as `analyze --layers` (default: analyze's)
    tl = ["finetune"]            # the T.L. strategies (default: every pretrained one); R.I. is the baseline
    groups_by = "size"           # groups per training-set size, or "all": every R.I. run vs every T.L. run
    patches = 64                 # analyze --patches, --voxels-per-patch, --measure (default: analyze's)

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

import nnunet_transfer.trainers as trainers
from nnunet_transfer.analysis.report import MEASURES
from nnunet_transfer.blocks import parse_spec
from nnunet_transfer.config import PLANS_KEY, TransferConfig, is_int
from nnunet_transfer.errors import ConfigError, DataError, SpecError, TransferError
from nnunet_transfer.experiments.compare import CORRECTIONS, TESTS
from nnunet_transfer.experiments.metrics import METRIC_COLUMNS
from nnunet_transfer.experiments.splits import parse_size, read_case_list
from nnunet_transfer.nnunet_io import check_configuration, dataset_name, load_json, plans_path
from nnunet_transfer.plans.configure import resolved_configuration
from nnunet_transfer.study.folds import SplitSpec, dataset_cases, fold_plan

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (pyproject depends on tomli there)
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
TOP_LEVEL = ("study", "pretrained", "splits", "settings", "scoring", "predict", "analysis", "environment", "slurm",
             "strategy")
STUDY_KEYS = ("name", "target", "configuration", "plans", "output", "baseline", "device")
SPLITS_KEYS = ("n_train", "repeats", "test", "test_cases", "folds", "folds_to_run", "val", "seed")
SCORING_KEYS = ("labels", "nsd_tolerance", "metrics", "test", "alpha", "correction", "resamples",
                "lesion_connectivity")
PREDICT_KEYS = ("disable_tta", "processes", "checkpoint")
#: [predict] checkpoint -> the file nnUNetv2_predict -chk reads
PREDICT_CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
STRATEGY_KEYS = ("name", "trainer", "pretrained", "settings", "title", "sweep")
ANALYSIS_KEYS = ("analyses", "snapshot_every", "layers", "tl", "groups_by", "patches", "voxels_per_patch", "measure")
#: [analysis] analyses: the ``analyze`` studies `study report` runs over the study's runs
ANALYSES = ("evolution", "groups", "reuse", "weights")
GROUPS_BY = ("size", "all")
#: [slurm] key -> the submitit parameter it becomes (generic ones work for every submitit cluster)
SLURM_KEYS = {"partition": "slurm_partition", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
              "mem_gb": "mem_gb", "timeout_min": "timeout_min", "array_parallelism": "slurm_array_parallelism",
              "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
              "setup": "slurm_setup", "max_requeue": "slurm_max_num_timeout",
              "additional": "slurm_additional_parameters"}
DEVICES = ("cuda", "cpu", "mps")
MARKER = ".nnunet_transfer_study"  # in a study folder: what makes it one (study plan writes it)


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
class Scoring:
    labels: tuple[int, ...] | None = None
    nsd_tolerance: float = 1.0
    metrics: tuple[str, ...] | None = None  # None: compare's defaults
    test: str = "ttest"
    alpha: float = 0.05
    resamples: int = 9999
    lesion_connectivity: int = 26
    correction: str = "holm"  # compare's --correction: "holm" or "none"


@dataclass(frozen=True)
class AnalysisSpec:
    """[analysis]: which of Karimi et al.'s analyses `study report` runs, on which strategies, with which options.

    R.I. is the study's baseline (trained from scratch), T.L. the strategies of ``tl``; evolution and filter change
    run on every run of both, groups and feature reuse compare them (per size, or over all sizes)."""

    snapshot_every: int
    analyses: tuple[str, ...] = ANALYSES
    layers: str | None = None      # analyze --layers (None: its default)
    ri: tuple[str, ...] = ()
    tl: tuple[str, ...] = ()
    groups_by: str = "size"
    patches: int | None = None     # analyze --patches (None: enough samples for every layer)
    voxels_per_patch: int | None = None  # None: analyze's default
    measure: str = "pwcca"

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.ri + self.tl


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
    predict_checkpoint: str = "final"  # a key of PREDICT_CHECKPOINTS
    environment: dict[str, str] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    base_settings: dict = field(default_factory=dict)  # the base configuration's own settings
    analysis: AnalysisSpec | None = None  # [analysis]; its snapshot_every is in ``settings``

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


# --------------------------------------------------------------------------- collecting the problems
class StudyFileError(ConfigError):
    """Several problems of one study file: a heading line, then one line per problem (table, key, message)."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.path = path
        self.problems = list(problems)
        super().__init__(f"study file {path} has {len(self.problems)} problems:\n"
                         + "\n".join(f"  {p}" for p in self.problems))


class Problems:
    """The problems of one study file, collected in one pass.

    The readers below add to it instead of raising, and go on with the next key, table or strategy, so that a
    file is reported whole (as ``weights check`` reports a checkpoint); a value with a problem reads as None
    and the checks that need it are skipped. :meth:`raise_if_any` raises one problem as the one-line
    :class:`ConfigError` / :class:`DataError` it is, several as one :class:`StudyFileError`."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[tuple[str, str, type]] = []

    def add(self, where: str, text: str, cls: type = ConfigError) -> None:
        """``where``: a table ("splits" or "[splits]") or an entry and key ('[[strategy]] #2 "frozen" sweep')."""
        item = (where if where.startswith("[") else f"[{where}]", text, cls)
        if item not in self.items:  # a cause shared by the values of a sweep is one problem
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def error(self) -> TransferError | None:
        if not self.items:
            return None
        if len(self.items) == 1:
            where, text, cls = self.items[0]
            return cls(f"study file {self.path} {where}: {text}")
        return StudyFileError(self.path, [f"{where}: {text}" for where, text, _ in self.items])

    def raise_if_any(self) -> None:
        e = self.error()
        if e is not None:
            raise e


# --------------------------------------------------------------------------- helpers
def _suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _table(p: Problems, table: str, content: Any, valid: Sequence[str]) -> dict | None:
    """The table's content with every unknown key reported (and left out); None if it is not a table."""
    if not isinstance(content, dict):
        p.add(table, f"must be a table (section), got {type(content).__name__}: {content!r}")
        return None
    for key in content:
        if key not in valid:
            p.add(table, f"unknown key {key!r}{_suggest(key, valid)}; valid keys: {', '.join(valid)}")
    return {k: v for k, v in content.items() if k in valid}


def _int(p: Problems, table: str, key: str, v: Any, lo: int) -> int | None:
    if not is_int(v) or v < lo:
        return p.add(table, f"{key} = {v!r} must be an integer >= {lo}")
    return v


def _str(p: Problems, table: str, key: str, v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return p.add(table, f"{key} = {v!r} must be a non-empty string")
    return v.strip()


def _name(p: Problems, table: str, key: str, v: Any) -> str | None:
    v = _str(p, table, key, v)
    if v is not None and (not NAME.fullmatch(v) or "__" in v):
        return p.add(table, f"{key} = {v!r} may hold only letters, digits, '_', '.' and '-' (no '__': nnU-Net "
                            f"separates trainer, plans and configuration with it), starting with a letter or digit")
    return v


def expand_path(text: str, base: Path, *, what: str, p: Problems, table: str, strict: bool = True) -> Path | None:
    """``$VAR``/``~`` expanded; relative to the study file's folder; ``strict``: an unset variable is a problem."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if left and strict:
        return p.add(table, f"{what} {text!r} uses ${left[0]}, which is not set in the environment; "
                            f"fix: export {left[0]}=... or write the path out", DataError)
    path = Path(expanded)
    return path if path.is_absolute() else (base / path)


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be the study folder (None: it can): a file in the way, or a folder of other things."""
    blocking = next((q for q in [output, *output.parents] if q.exists() and not q.is_dir()), None)
    if blocking is not None:
        return f"output {output} cannot be a folder: {blocking} is a file"
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).exists():
        return f"output {output} exists and is not a study folder (no {MARKER}); choose an empty or new folder"
    return None


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
    """Read and check a study file whole (module docstring); ``check_data``: resolve the dataset, plans,
    checkpoints and sizes too (every command does; unit tests of the file grammar may not). Raises every
    problem at once (:class:`Problems`); a file that is missing or not TOML stops there."""
    path, doc = read_toml(path)
    p = Problems(path)
    study = _read_study(p, path, doc, check_data)
    p.raise_if_any()
    return study


def _read_study(p: Problems, path: Path, doc: dict, check_data: bool) -> Study | None:
    for key in doc:
        if key not in TOP_LEVEL:
            p.add(key, f"unknown table{_suggest(key, TOP_LEVEL)}; valid tables: {', '.join(TOP_LEVEL)}")
    for required in ("study", "splits", "strategy"):
        if required not in doc:
            hint = "[[strategy]] entries" if required == "strategy" else f"a [{required}] table"
            p.add(required, f"missing: a study file needs {hint} (see `nnunet_transfer study init`)")

    st = _table(p, "study", doc["study"], STUDY_KEYS) if "study" in doc else None
    name = target = output = baseline = None
    configuration, plans, device = "3d_fullres", "nnUNetPlans", "cuda"
    if st is not None:
        name = _name(p, "study", "name", st.get("name", path.stem.replace(" ", "_")))
        if "target" not in st:
            p.add("study", "target is missing: the dataset the strategies are trained on, e.g. target = 902")
        elif is_int(st["target"]) or isinstance(st["target"], str):
            target = st["target"]
        else:
            p.add("study", f"target = {st['target']!r} must be a dataset id (902) or name ('Dataset902_Liver')")
        configuration = _str(p, "study", "configuration", st.get("configuration", "3d_fullres"))
        plans = _str(p, "study", "plans", st.get("plans", "nnUNetPlans"))
        out_text = _str(p, "study", "output", st["output"]) if "output" in st else name
        if out_text is not None:
            output = expand_path(out_text, path.parent, what="output", p=p, table="study")
        if output is not None and check_data:
            problem = output_problem(output)
            if problem:
                p.add("study", problem, DataError)
        device = _str(p, "study", "device", st.get("device", "cuda"))
        if device is not None and device not in DEVICES:
            p.add("study", f"device = {device!r} is not one of {', '.join(DEVICES)} (nnUNetv2_train -device)")
        baseline = st.get("baseline")

    dataset, base_settings = (str(target) if target is not None else None), {}
    if check_data and None not in (target, plans, configuration):
        dataset, base_settings = _check_target(p, target, plans, configuration)
    pretrained = _read_pretrained(p, doc.get("pretrained"), path.parent, check_data)
    splits = _read_splits(p, doc["splits"], path.parent) if "splits" in doc else None
    settings = _read_settings(p, "settings", doc.get("settings", {}))
    an = _table(p, "analysis", doc["analysis"], ANALYSIS_KEYS) if "analysis" in doc else None
    every = None
    if an is not None:
        every = _int(p, "analysis", "snapshot_every", an["snapshot_every"], 1) if "snapshot_every" in an else \
            p.add("analysis", "snapshot_every is missing: the epochs between the weights-only snapshots the analyses "
                              "read, e.g. snapshot_every = 50 (`study plan` sets it on every run)")
        if "snapshot_every" in settings:
            p.add("analysis", f"snapshot_every is set in [analysis] and in [settings] "
                              f"({settings['snapshot_every']!r}); keep the one in [analysis]")
        elif every is not None:
            settings = {**settings, "snapshot_every": every}  # the runs get it as every other setting
    strategies, names = ([], [])
    if "strategy" in doc:
        strategies, names = _read_strategies(p, doc["strategy"], pretrained, settings, base_settings,
                                             configuration)
    if baseline is None and names:
        baseline = names[0]
    elif names and baseline not in names:
        p.add("study", f"baseline = {baseline!r} is not a strategy{_suggest(baseline, names)}; "
                       f"strategies: {', '.join(map(str, names))}")
    analysis = _read_analysis(p, an, every, strategies, names, baseline, configuration,
                              check_data and dataset is not None, dataset, plans) if an is not None else None
    scoring = _read_scoring(p, doc.get("scoring", {}))
    pr = _table(p, "predict", doc.get("predict", {}), PREDICT_KEYS) or {}
    disable_tta = pr.get("disable_tta", False)
    if not isinstance(disable_tta, bool):
        p.add("predict", f"disable_tta = {disable_tta!r} must be true or false")
    processes = _int(p, "predict", "processes", pr.get("processes", 3), 0)
    checkpoint = pr.get("checkpoint", "final")
    if checkpoint not in PREDICT_CHECKPOINTS:
        p.add("predict", f"checkpoint = {checkpoint!r} must be one of {', '.join(map(repr, PREDICT_CHECKPOINTS))} "
                         f"(\"best\": nnUNetv2_predict -chk checkpoint_best.pth)")
    environment = _read_environment(p, doc.get("environment", {}))
    slurm = _read_slurm(p, doc.get("slurm", {}))
    if check_data and splits is not None and dataset is not None:
        _check_sizes(p, splits, dataset)
    if p:
        return None
    return Study(path=path, name=name, dataset=dataset, configuration=configuration, plans=plans, output=output,
                 baseline=baseline, device=device, pretrained=pretrained, splits=splits, settings=settings,
                 strategies=tuple(strategies), scoring=scoring, disable_tta=disable_tta,
                 predict_processes=processes, predict_checkpoint=checkpoint, environment=environment, slurm=slurm,
                 base_settings=base_settings, analysis=analysis)


def _check_target(p: Problems, target, plans: str, configuration: str) -> tuple[str | None, dict]:
    """The dataset's name and the base configuration's own settings (every strategy inherits them)."""
    try:
        dataset = dataset_name(target)
        plans_file = plans_path(dataset, plans)
    except DataError as e:
        p.add("study", f"target = {target!r}: {e}", DataError)
        return None, {}
    content = load_json(plans_file)
    try:
        check_configuration(content, configuration)
    except DataError as e:
        p.add("study", f"configuration = {configuration!r}: {e}; fix: the target must be preprocessed with the "
                       f"source's plans (nnunet_transfer plans transfer, then nnUNetv2_preprocess)", DataError)
        return dataset, {}
    return dataset, dict(resolved_configuration(content, configuration).get(PLANS_KEY) or {})


def _check_sizes(p: Problems, splits: SplitSpec, dataset: str) -> None:
    """The sizes, test and validation counts against the raw dataset's cases (what the run table will need)."""
    try:
        files, ending = dataset_cases(dataset)
    except DataError as e:
        return p.add("study", f"target = {dataset!r}: {e}", DataError)
    try:
        fold_plan(splits, dataset, files, ending)
    except DataError as e:
        p.add("splits", str(e), DataError)


def _read_pretrained(p: Problems, content: Any, base: Path, check: bool) -> dict[str, Path | None]:
    """``{name: checkpoint}``; a declared name whose checkpoint has a problem maps to None (reported here,
    not again by the strategies that name it)."""
    if content is None:
        return {}
    if isinstance(content, str):
        content = {"pretrained": content}
    if not isinstance(content, dict):
        p.add("pretrained", f"must be a table of name = \"checkpoint\" entries, got {content!r}")
        return {}
    out: dict[str, Path | None] = {}
    for key, value in content.items():
        out[key] = None
        text = _str(p, "pretrained", key, value)
        if _name(p, "pretrained", "name", key) is None or text is None:
            continue
        path = expand_path(text, base, what=f"{key} =", p=p, table="pretrained", strict=check)
        if path is None:
            continue
        if check:
            if path.is_dir():
                if not (path / "checkpoint_final.pth").is_file():
                    p.add("pretrained", f"{key} = {str(value)!r}: the folder {path} holds no checkpoint_final.pth; "
                                        f"give a checkpoint file or a finished fold folder", DataError)
                    continue
            elif not path.is_file():
                p.add("pretrained", f"{key} = {str(value)!r}: checkpoint {path} not found; fix the path (relative "
                                    f"paths are relative to the study file)", DataError)
                continue
        out[key] = path.resolve() if check else path
    return out


def _size(p: Problems, v: Any):
    if isinstance(v, float) or isinstance(v, bool):
        return p.add("splits", f"n_train value {v!r} is not a size: give an integer, a percentage like \"50%\" or "
                               f"\"all\"")
    try:
        return parse_size(v)
    except DataError as e:
        return p.add("splits", str(e).replace("--n-train", "n_train"))


def _read_splits(p: Problems, content: Any, base: Path) -> SplitSpec | None:
    before = len(p)
    sp = _table(p, "splits", content, SPLITS_KEYS)
    if sp is None:
        return None
    sizes = None
    if "n_train" not in sp:
        p.add("splits", "n_train is missing: the training-set sizes, e.g. n_train = [6, 15, \"all\"]")
    else:
        sizes = sp["n_train"] if isinstance(sp["n_train"], list) else [sp["n_train"]]
        if not sizes:
            p.add("splits", "n_train is empty; give at least one size, e.g. n_train = [6, 15]")
        sizes = tuple(_size(p, v) for v in sizes)
        if None not in sizes and len(set(map(str, sizes))) != len(sizes):
            p.add("splits", f"n_train = {list(sizes)} lists a size twice")
    given = [k for k in ("test", "test_cases", "folds") if k in sp]
    if len(given) != 1:
        p.add("splits", "give the test cases in exactly one way: test = K (a held-out set of K cases), "
                        "test_cases = \"FILE\" (listed cases) or folds = F (F-fold cross-validation, every "
                        f"case tested once); got {', '.join(given) or 'none'}")
    test = test_cases = folds = test_file = folds_to_run = None
    if given == ["test"]:
        test = _int(p, "splits", "test", sp["test"], 1)
    elif given == ["test_cases"]:
        test_cases, test_file = _test_cases(p, sp["test_cases"], base)
    elif given == ["folds"]:
        folds = _int(p, "splits", "folds", sp["folds"], 2)
    if "folds_to_run" in sp:
        ftr = sp["folds_to_run"]
        if "folds" not in sp:
            p.add("splits", "folds_to_run needs folds = F (cross-validation)")
        elif folds is not None:
            if not isinstance(ftr, list) or not ftr or not all(is_int(f) and 0 <= f < folds for f in ftr):
                p.add("splits", f"folds_to_run = {ftr!r} must list fold numbers 0..{folds - 1}")
            else:
                folds_to_run = tuple(sorted(set(ftr)))
    val = _int(p, "splits", "val", sp["val"], 1) if "val" in sp else None
    repeats = _int(p, "splits", "repeats", sp.get("repeats", 1), 1)
    seed = _int(p, "splits", "seed", sp.get("seed", 0), 0)
    if len(p) > before:
        return None
    return SplitSpec(n_train=sizes, repeats=repeats, test=test, test_cases=test_cases, test_cases_file=test_file,
                     folds=folds, folds_to_run=folds_to_run, val=val, seed=seed)


def _test_cases(p: Problems, v: Any, base: Path) -> tuple[tuple[str, ...] | None, str | None]:
    if isinstance(v, list):
        if not v or not all(isinstance(c, str) and c for c in v):
            p.add("splits", "test_cases must be a file name or a non-empty list of case identifiers")
            return None, None
        return tuple(v), None
    text = _str(p, "splits", "test_cases", v)
    f = expand_path(text, base, what="test_cases", p=p, table="splits") if text is not None else None
    if f is None:
        return None, None
    try:
        return tuple(read_case_list(f)), str(f)
    except DataError as e:
        p.add("splits", str(e).replace("--test-cases", "test_cases"), DataError)
        return None, None


def _setting_problem(key: str, value: Any) -> str | None:
    """What is wrong with one setting's value on its own (None: nothing); the text starts after the key."""
    try:
        TransferConfig.from_mapping({key: value})
    except ConfigError as e:
        return re.sub(rf"^setting {re.escape(repr(key))}:? ", "", str(e))
    return None


def _read_settings(p: Problems, where: str, content: Any, prefix: str = "") -> dict:
    """The known settings of a table (``prefix``: how their keys are located, e.g. "settings."); every
    unknown key and every bad value is a problem of its own."""
    if not isinstance(content, dict):
        p.add(where, f"settings must be a table of setting = value, got {content!r}")
        return {}
    keys = TransferConfig.keys()
    out = {}
    for key, value in content.items():
        if key not in keys:
            p.add(where, f"unknown setting {key!r}{_suggest(key, keys)}; settings: {', '.join(keys)}")
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


def _trainer_classes() -> dict[str, type]:
    return {n: getattr(trainers, n) for n in trainers.__all__}


def _read_strategies(p: Problems, entries: Any, pretrained: Mapping[str, Path | None], common: dict,
                     base_settings: dict, configuration: str | None) -> tuple[list[Strategy], list[str]]:
    """Every entry checked on its own; returns the strategies and every strategy name the file declares
    (sweeps expanded), also those of entries with problems, for the baseline and duplicate checks."""
    if not isinstance(entries, list) or not entries:
        p.add("strategy", "write the strategies as [[strategy]] entries (an array of tables)")
        return [], []
    classes = _trainer_classes()
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
    entry = _table(p, label, entry, STRATEGY_KEYS)
    if entry is None:
        return [], []
    for key in ("name", "trainer"):
        if key not in entry:
            p.add(label, f"{key} is missing (every strategy has a name and a trainer)")
    name = _name(p, label, "name", entry["name"]) if "name" in entry else None
    trainer = _str(p, label, "trainer", entry["trainer"]) if "trainer" in entry else None
    cls = None
    if trainer is not None and trainer not in classes:
        if trainer == "nnUNetTrainer" or trainer.startswith("nnUNetTrainer_"):
            p.add(label, f"{trainer} is one of nnU-Net's own trainers, which ignore the study's settings "
                         f"(schedule, seed); for stock nnU-Net training use nnUNetTrainerTransferBase")
        else:
            p.add(label, f"unknown trainer {trainer!r}{_suggest(trainer, list(classes))}; a study trains this "
                         f"package's trainers (they read the study's settings; for nnU-Net's own baseline use "
                         f"nnUNetTrainerTransferBase): {', '.join(classes)}")
    elif trainer is not None:
        cls = classes[trainer]
    own = _read_settings(p, label, entry.get("settings", {}), prefix="settings.")
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
        _name(p, label, "name", vname)
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
        return p.add(label, f"sweep setting {key!r} is not a setting{_suggest(key, TransferConfig.keys())}")
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


def _read_scoring(p: Problems, content: Any) -> Scoring | None:
    before = len(p)
    sc = _table(p, "scoring", content, SCORING_KEYS)
    if sc is None:
        return None
    labels = sc.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(is_int(v) and v > 0 for v in labels):
            p.add("scoring", f"labels = {labels!r} must be a list of foreground label values, e.g. [1, 2]")
        else:
            labels = tuple(dict.fromkeys(labels))
    tol = sc.get("nsd_tolerance", 1.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        p.add("scoring", f"nsd_tolerance = {tol!r} must be a distance in mm (a number >= 0)")
    metrics = sc.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, list) or not metrics:
            p.add("scoring", f"metrics = {metrics!r} must be a non-empty list, e.g. [\"dice\", \"hd95\"]")
        else:
            for m in metrics:
                if m not in METRIC_COLUMNS:
                    p.add("scoring", f"unknown metric {m!r}{_suggest(m, METRIC_COLUMNS)}; metrics: "
                                     f"{', '.join(METRIC_COLUMNS)}")
            metrics = tuple(dict.fromkeys(metrics))
    test = sc.get("test", "ttest")
    if test not in TESTS:
        p.add("scoring", f"test = {test!r} is not one of {', '.join(TESTS)}")
    alpha = sc.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        p.add("scoring", f"alpha = {alpha!r} must be a probability in (0, 1), e.g. 0.05")
    correction = sc.get("correction", "holm")
    if correction not in CORRECTIONS:
        p.add("scoring", f"correction = {correction!r} is not one of {', '.join(map(repr, CORRECTIONS))}: \"holm\" "
                         f"corrects over the strategies compared with the baseline, \"none\" keeps the raw p (the "
                         f"papers' uncorrected tests)")
    conn = sc.get("lesion_connectivity", 26)
    if conn not in (6, 18, 26, 4, 8):
        p.add("scoring", f"lesion_connectivity = {conn!r} must be 6, 18 or 26 (3-D) or 4, 8 (2-D)")
    resamples = _int(p, "scoring", "resamples", sc.get("resamples", 9999), 100)
    if len(p) > before:
        return None
    return Scoring(labels=labels, nsd_tolerance=float(tol), metrics=metrics, test=test, alpha=float(alpha),
                   resamples=resamples, lesion_connectivity=conn, correction=correction)


def _read_analysis(p: Problems, an: dict, every: int | None, strategies: Sequence[Strategy], declared: Sequence[str],
                   baseline: str | None, configuration: str | None, check_data: bool, dataset: str | None,
                   plans: str | None) -> AnalysisSpec | None:
    """[analysis] (its snapshot_every was read with [settings]); ``strategies``: those without problems,
    ``declared``: every strategy name of the file (those with problems too: they are reported once, there)."""
    before = len(p)
    analyses = an.get("analyses", list(ANALYSES))
    if not isinstance(analyses, list) or not analyses or not all(isinstance(a, str) for a in analyses):
        p.add("analysis", f"analyses = {analyses!r} must be a non-empty list of {', '.join(map(repr, ANALYSES))}")
        analyses = []
    for a in analyses:
        if a not in ANALYSES:
            p.add("analysis", f"unknown analysis {a!r}{_suggest(a, ANALYSES)}; analyses: {', '.join(ANALYSES)}")
    layers = an.get("layers")
    if layers is not None:
        layers = _str(p, "analysis", "layers", layers)
        if layers is not None and check_data:
            problem = _layers_problem(layers, dataset, plans, configuration)
            if problem:
                p.add("analysis", f"layers = {layers!r}: {problem}")
    groups_by = an.get("groups_by", "size")
    if groups_by not in GROUPS_BY:
        p.add("analysis", f"groups_by = {groups_by!r} must be \"size\" (groups per training-set size) or \"all\" "
                          f"(every R.I. run against every T.L. run, all sizes together)")
    patches = _int(p, "analysis", "patches", an["patches"], 1) if "patches" in an else None
    voxels = _int(p, "analysis", "voxels_per_patch", an["voxels_per_patch"], 1) if "voxels_per_patch" in an else None
    measure = an.get("measure", "pwcca")
    if measure not in MEASURES:
        p.add("analysis", f"measure = {measure!r} is not one of {', '.join(MEASURES)}{_suggest(measure, MEASURES)}")
    names = {s.name: s for s in strategies}
    tl = an.get("tl")
    if tl is None:
        tl = [s.name for s in strategies if s.pretrained is not None]
    elif not isinstance(tl, list) or not tl or not all(isinstance(t, str) for t in tl):
        p.add("analysis", f"tl = {tl!r} must be a non-empty list of strategy names (the transfer strategies)")
        tl = []
    else:
        for t in tl:
            if t not in declared:
                p.add("analysis", f"tl: {t!r} is not a strategy{_suggest(t, declared)}; strategies: "
                                  f"{', '.join(declared)}")
            elif t in names and names[t].pretrained is None:
                p.add("analysis", f"tl: strategy {t!r} starts from no pretrained weights; T.L. strategies name a "
                                  f"checkpoint (pretrained = \"NAME\")")
    if baseline in names and names[baseline].pretrained is not None:
        p.add("analysis", f"the baseline {baseline!r} starts from pretrained weights; the analyses compare with "
                          f"training from scratch (R.I.): make [study] baseline a strategy without pretrained weights")
    if strategies and not tl and len(p) == before:
        p.add("analysis", "no T.L. strategy: no strategy names pretrained weights; add one, or drop [analysis]")
    if len(p) > before or every is None:
        return None
    return AnalysisSpec(snapshot_every=every, analyses=tuple(dict.fromkeys(analyses)), layers=layers,
                        ri=(baseline,), tl=tuple(dict.fromkeys(tl)), groups_by=groups_by, patches=patches,
                        voxels_per_patch=voxels, measure=measure)


def _layers_problem(layers: str, dataset: str, plans: str | None, configuration: str | None) -> str | None:
    """Why the block spec ``layers`` selects nothing on the base configuration's network (None: it is fine)."""
    try:
        arch = resolved_configuration(load_json(plans_path(dataset, plans)), configuration)["architecture"]
        n_stages = int(arch["arch_kwargs"]["n_stages"])
    except (TransferError, KeyError, TypeError, ValueError):
        return None  # an architecture this reader does not know: analyze checks the spec when it runs
    try:
        parse_spec(layers, n_stages)
    except SpecError as e:
        return str(e)
    return None


def _read_environment(p: Problems, content: Any) -> dict[str, str]:
    if not isinstance(content, dict):
        p.add("environment", f"must be a table of NAME = \"value\", got {content!r}")
        return {}
    out = {}
    for k, v in content.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            p.add("environment", f"{k!r} is not an environment variable name")
        elif k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            p.add("environment", f"{k} comes from the environment `study` runs in (every run must use "
                                 f"the same folders); set it there, not in the study file")
        elif isinstance(v, bool) or not isinstance(v, (str, int, float)):
            p.add("environment", f"{k} = {v!r} must be a string or a number")
        else:
            out[k] = str(v)
    return out


def _read_slurm(p: Problems, content: Any) -> dict[str, Any]:
    sl = _table(p, "slurm", content, list(SLURM_KEYS)) or {}
    out: dict[str, Any] = {}
    for key, value in sl.items():
        if key in ("gpus_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "max_requeue"):
            value = _int(p, "slurm", key, value, 0 if key in ("gpus_per_node", "max_requeue") else 1)
        elif key == "mem_gb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                value = p.add("slurm", f"mem_gb = {value!r} must be a number of GB > 0")
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                value = p.add("slurm", f"setup = {value!r} must be a list of shell lines, e.g. "
                                       f"[\"module load cuda\"]")
        elif key == "additional":
            if not isinstance(value, dict):
                value = p.add("slurm", f"additional = {value!r} must be a table of sbatch options, e.g. "
                                       f"{{ gres = \"gpu:a100:1\" }}")
        else:
            value = _str(p, "slurm", key, value)
        out[key] = value
    return out


__all__ = ["Study", "Strategy", "AnalysisSpec", "ANALYSES", "Scoring", "Problems", "StudyFileError", "load_study", "read_toml",
           "sweep_label", "plans_value", "output_problem", "SLURM_KEYS", "MARKER"]
