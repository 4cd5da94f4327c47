"""The study file: one TOML file that declares a whole transfer experiment.

Everything is read and checked here, whole, before anything is written or trained: unknown tables and
keys (with the closest valid name), missing tables, wrong types, unknown trainers, every strategy's
settings and sweep values, settings a trainer does not use, strategies that need pretrained weights but
name none, duplicate strategy names (also those a sweep generates), missing checkpoints, a baseline that
is not a strategy, an output folder that cannot be the study's, and the sizes, test and validation counts
against the dataset's cases (:func:`nnunet_transfer.study.folds.fold_plan`). Each problem names the table
and key ('[[strategy]] #3 "l2sp" settings.l2sp_alpha'), the value, what is valid and the fix.

The readers collect the problems (:class:`~nnunet_transfer.study.problems.Problems`) and go on, so one pass
finds them all: one problem is raised as the one-line :class:`~nnunet_transfer.errors.ConfigError` (the file's
content) or :class:`~nnunet_transfer.errors.DataError` (a file or dataset it names) it is; several as one
:class:`~nnunet_transfer.study.problems.StudyFileError` (a ConfigError): ``study file F has N problems:`` and
one line per problem. A file that is missing or not TOML stops there; a value with a problem skips the checks
that need it. Every ``study`` command reads the file with :func:`load_study`.

This module reads [study] and checks the file as a whole (the tables, the target and its plans, the baseline,
the sizes against the dataset); each other table has its reader: :mod:`.read_inputs` ([pretrained],
[splits]), :mod:`.read_strategies` ([settings], [[strategy]], sweeps), :mod:`.read_analysis`,
:mod:`.read_scoring` ([scoring], [predict]), :mod:`.read_execution` ([environment], [slurm]); what they build
is :mod:`.model`'s (:class:`~nnunet_transfer.study.model.Study` and its parts).

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

    [source_test]                # forgetting: every run's old classes scored on the SOURCE's test set
    images = "$nnUNet_raw/Dataset901_Source/imagesTs"
    labels = "$nnUNet_raw/Dataset901_Source/labelsTs"
    pretrained = "source"        # the [pretrained] entry that is the source model (default: the only one)
    old_labels = [1, 2]          # default: every label of the references

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

from pathlib import Path

from nnunet_transfer.config import PLANS_KEY, is_int
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import check_configuration, dataset_name, load_json, plans_path
from nnunet_transfer.plans.configure import resolved_configuration
from nnunet_transfer.study.folds import SplitSpec, dataset_cases, fold_plan
from nnunet_transfer.study.model import Study
from nnunet_transfer.study.problems import Problems, expand_path, read_name, read_str, read_table, suggest
from nnunet_transfer.study.read_analysis import read_analysis, read_analysis_table
from nnunet_transfer.study.read_execution import read_environment, read_slurm
from nnunet_transfer.study.read_inputs import read_pretrained, read_source_test, read_splits
from nnunet_transfer.study.read_racing import read_racing
from nnunet_transfer.study.read_scoring import read_predict, read_scoring
from nnunet_transfer.study.read_strategies import read_settings, read_strategies

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (pyproject depends on tomli there)
    import tomli as tomllib

TOP_LEVEL = ("study", "pretrained", "splits", "settings", "scoring", "predict", "analysis", "environment", "slurm",
             "racing", "source_test", "strategy")
STUDY_KEYS = ("name", "target", "configuration", "plans", "output", "baseline", "device")
DEVICES = ("cuda", "cpu", "mps")
MARKER = ".nnunet_transfer_study"  # in a study folder: what makes it one (study plan writes it)


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be the study folder (None: it can): a file in the way, or a folder of other things."""
    blocking = next((q for q in [output, *output.parents] if q.exists() and not q.is_dir()), None)
    if blocking is not None:
        return f"output {output} cannot be a folder: {blocking} is a file"
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).exists():
        return f"output {output} exists and is not a study folder (no {MARKER}); choose an empty or new folder"
    return None



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
            p.add(key, f"unknown table{suggest(key, TOP_LEVEL)}; valid tables: {', '.join(TOP_LEVEL)}")
    for required in ("study", "splits", "strategy"):
        if required not in doc:
            hint = "[[strategy]] entries" if required == "strategy" else f"a [{required}] table"
            p.add(required, f"missing: a study file needs {hint} (see `nnunet_transfer study init`)")

    st = read_table(p, "study", doc["study"], STUDY_KEYS) if "study" in doc else None
    name = target = output = baseline = None
    configuration, plans, device = "3d_fullres", "nnUNetPlans", "cuda"
    if st is not None:
        name = read_name(p, "study", "name", st.get("name", path.stem.replace(" ", "_")))
        if "target" not in st:
            p.add("study", "target is missing: the dataset the strategies are trained on, e.g. target = 902")
        elif is_int(st["target"]) or isinstance(st["target"], str):
            target = st["target"]
        else:
            p.add("study", f"target = {st['target']!r} must be a dataset id (902) or name ('Dataset902_Liver')")
        configuration = read_str(p, "study", "configuration", st.get("configuration", "3d_fullres"))
        plans = read_str(p, "study", "plans", st.get("plans", "nnUNetPlans"))
        out_text = read_str(p, "study", "output", st["output"]) if "output" in st else name
        if out_text is not None:
            output = expand_path(out_text, path.parent, what="output", p=p, table="study")
        if output is not None and check_data:
            problem = output_problem(output)
            if problem:
                p.add("study", problem, DataError)
        device = read_str(p, "study", "device", st.get("device", "cuda"))
        if device is not None and device not in DEVICES:
            p.add("study", f"device = {device!r} is not one of {', '.join(DEVICES)} (nnUNetv2_train -device)")
        baseline = st.get("baseline")

    dataset, base_settings = (str(target) if target is not None else None), {}
    if check_data and None not in (target, plans, configuration):
        dataset, base_settings = _check_target(p, target, plans, configuration)
    pretrained = read_pretrained(p, doc.get("pretrained"), path.parent, check_data)
    splits = read_splits(p, doc["splits"], path.parent) if "splits" in doc else None
    settings = read_settings(p, "settings", doc.get("settings", {}))
    an, every = None, None
    if "analysis" in doc:
        an, every, settings = read_analysis_table(p, doc["analysis"], settings)
    strategies, names = ([], [])
    if "strategy" in doc:
        strategies, names = read_strategies(p, doc["strategy"], pretrained, settings, base_settings,
                                            configuration)
    if baseline is None and names:
        baseline = names[0]
    elif names and baseline not in names:
        p.add("study", f"baseline = {baseline!r} is not a strategy{suggest(baseline, names)}; "
                       f"strategies: {', '.join(map(str, names))}")
    analysis = read_analysis(p, an, every, strategies, names, baseline, configuration,
                             check_data and dataset is not None, dataset, plans) if an is not None else None
    racing = None
    if "racing" in doc:
        epochs = [{**base_settings, **settings, **s.settings}.get("num_epochs", 1000) for s in strategies]
        racing = read_racing(p, doc["racing"], epochs)
        if racing is not None:
            # every run pauses at the rungs (a schedule setting: the runs stay the runs of the study without racing)
            settings = {**settings, "pause_at": list(racing.rungs)}
    scoring = read_scoring(p, doc.get("scoring", {}))
    disable_tta, processes, checkpoint = read_predict(p, doc.get("predict", {}))
    environment = read_environment(p, doc.get("environment", {}))
    slurm = read_slurm(p, doc.get("slurm", {}))
    source_test = (read_source_test(p, doc["source_test"], path.parent, check_data, pretrained)
                   if "source_test" in doc else None)
    if check_data and splits is not None and dataset is not None:
        _check_sizes(p, splits, dataset)
    if p:
        return None
    return Study(path=path, name=name, dataset=dataset, configuration=configuration, plans=plans, output=output,
                 baseline=baseline, device=device, pretrained=pretrained, splits=splits, settings=settings,
                 strategies=tuple(strategies), scoring=scoring, disable_tta=disable_tta,
                 predict_processes=processes, predict_checkpoint=checkpoint, environment=environment, slurm=slurm,
                 base_settings=base_settings, analysis=analysis, racing=racing,
                 source_test=source_test)



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



__all__ = ["load_study", "read_toml", "output_problem", "MARKER", "TOP_LEVEL", "STUDY_KEYS", "DEVICES"]
