"""``study plan``: expand the file into its runs, check everything, then write what the runs need.

Checked first, nothing written until all of it passes: the file whole, with the sizes against the dataset
and the output folder (:func:`~nnunet_transfer.study.spec.load_study`: every problem of the file at once),
then that no started run's definition changed, and every pretrained checkpoint against the network the
target's plans build, with each strategy's heads setting (the check ``nnUNetv2_train`` makes at start, made
once here so that a wrong file fails before hundreds of jobs are queued).

Written (each file atomically; an existing file is only replaced when its content changes):

* one plans **configuration per strategy**, ``<study>_<strategy>``, inheriting the base configuration
  with the strategy's settings (:func:`nnunet_transfer.plans.configure.add_configuration` validates them);
* the dataset's ``splits_final.json`` + ``splits_mapping.json`` (issue 11's format; a study owns its
  dataset's splits: a file written by someone else with other folds is refused, never replaced);
* the test cases linked into ``<output>/test/`` (``fold_<k>/`` with cross-validation): ``imagesTs/`` for
  ``nnUNetv2_predict``, ``labelsTs/`` for ``evaluate``;
* ``<output>/study.json`` (the resolved study) and ``<output>/runs.csv`` (the run table).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import DataError, TransferError
from nnunet_transfer.experiments.splits import MAPPING_FILE, SPLITS_FILE
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.nnunet_io import env_folder, load_dataset_json, load_json, load_plans, plans_path
from nnunet_transfer.plans.configure import add_configuration, write_plans
from nnunet_transfer.plans.pool import _place  # a link, or a copy where links fail
from nnunet_transfer.study.folds import StudySplits
from nnunet_transfer.study.model import Study, sweep_label
from nnunet_transfer.study.read_strategies import trainer_classes
from nnunet_transfer.study.spec import MARKER, load_study, output_problem
from nnunet_transfer.study.state import check_definitions, checkpoint_file, write_json
from nnunet_transfer.study.table import Run, build_table, format_table, plan_study_splits, test_folder
from nnunet_transfer.training.pretrained import check_pretrained as check

OWNED_SPLITS = "splits_final.json"  # the study's copy of the splits it wrote: what makes them its own


@dataclass
class Plan:
    study: Study
    splits: StudySplits
    runs: list[Run]
    definitions: dict[str, dict]
    written: list[str]

    def text(self) -> str:
        sp = self.study.splits
        how = (f"{sp.folds}-fold cross-validation (each case tested once)" if sp.cross_validation
               else f"{len(self.splits.tests[0])} held-out test cases")
        lines = [format_table(self.runs), "",
                 f"{len(self.runs)} runs: {len(self.study.strategies)} strategies x {len(sp.n_train)} sizes x "
                 f"{sp.repeats} repeat(s) x {len(sp.folds_to_run or self.splits.tests)} fold(s); {how}; "
                 f"target {self.study.dataset}, configurations {self.study.name}_<strategy> inheriting "
                 f"{self.study.configuration}"]
        lines += [f"written: {w}" for w in self.written]
        return "\n".join(lines)


def prepare(study: Study | str | Path, *, write: bool = True, check_weights: bool = True) -> Plan:
    """Check the study and (``write``) write its configurations, splits and test folders (module docstring)."""
    if not isinstance(study, Study):
        study = load_study(study)
    _check_output(study)
    splits = plan_study_splits(study)
    runs = build_table(study, splits)
    definitions = check_definitions(study, runs)
    if check_weights:
        check_pretrained(study)
    written: list[str] = []
    if write:
        study.output.mkdir(parents=True, exist_ok=True)
        (study.output / MARKER).write_text(f"study folder of {study.path}\n")
        written += write_splits(study, splits)
        written += write_configurations(study)
        write_json(study.output / "study.json", study_record(study, splits, runs))
        (study.output / "runs.csv").write_text(runs_csv(runs))
        written.append(str(study.output / "runs.csv"))
    return Plan(study=study, splits=splits, runs=runs, definitions=definitions, written=written)


def _check_output(study: Study) -> None:
    # load_study checks it with the rest of the file; again here for a Study read without check_data
    problem = output_problem(study.output)
    if problem:
        raise DataError(f"study file {study.path} [study]: {problem}")


# --------------------------------------------------------------------------- checks
def check_pretrained(study: Study) -> None:
    """Every (checkpoint, trainer, heads) of the study as ``nnUNetv2_train`` will check it at start."""
    classes = trainer_classes()
    plans = load_plans(study.dataset, study.plans)
    dataset_json = load_dataset_json(study.dataset)
    seen = set()
    for s in study.strategies:
        if s.pretrained is None:
            continue
        cls = classes[s.trainer]
        cfg = TransferConfig.from_mapping(study.effective_settings(s), defaults=cls.transfer_defaults,
                                          allowed=set(cls.transfer_keys), owner=s.trainer)
        key = (s.pretrained, s.trainer, json.dumps(cfg.heads, sort_keys=True), cfg.freeze_reinit)
        if key in seen:
            continue
        seen.add(key)
        path = checkpoint_file(study.pretrained[s.pretrained])
        try:
            checked = check(str(path), trainer_class=cls, plans=plans, configuration=study.configuration,
                            dataset_json=dataset_json, heads=cfg.heads)
            # the trainer's own refusals once the file is known (frozen heads that were not copied, frozen
            # blocks not from the file) read only its settings: ask them on a bare instance
            probe = cls.__new__(cls)
            probe.transfer_config = cfg
            try:
                probe.check_pretrained_file(checked)
            except AttributeError:  # a trainer whose check needs a built instance: nnUNetv2_train checks it
                pass
        except TransferError as e:
            raise type(e)(f"study file {study.path} [pretrained] {s.pretrained!r} for strategy {s.name!r} "
                          f"({s.trainer}): {e}") from None


# --------------------------------------------------------------------------- splits
def _mapping(study: Study, splits: StudySplits, splits_file: Path) -> dict:
    sp = study.splits
    first = [f for f in splits.folds if f["outer"] == 0 and f["repeat"] == 0]
    out = {"tool": "nnunet_transfer study", "study": str(study.path), "dataset": study.dataset, "seed": sp.seed,
           "repeats": sp.repeats, "n_train": [f["n_train_requested"] for f in first],
           "n_val": len(first[0]["val"]), "available_for_training": splits.available[0],
           "splits_file": str(splits_file.resolve()),
           "folds": [{k: f[k] for k in ("fold", "repeat", "n_train", "n_train_requested")}
                     | {"n_val": len(f["val"]), "outer_fold": f["outer"]} for f in splits.folds]}
    if sp.cross_validation:
        out.update(cross_validation=sp.folds, test=[], test_by_fold=splits.tests,
                   test_folder=None, test_folders=[str(test_folder(study, k)) for k in range(sp.folds)])
    else:
        out.update(test=splits.tests[0], test_folder=str(test_folder(study, 0)))
    return out


def write_splits(study: Study, splits: StudySplits) -> list[str]:
    base = env_folder("nnUNet_preprocessed") / study.dataset
    splits_file, mapping_file = base / SPLITS_FILE, base / MAPPING_FILE
    owned = study.output / OWNED_SPLITS
    wanted = splits.splits_final()
    written = []
    current = json.loads(splits_file.read_text()) if splits_file.is_file() else None
    if current != wanted:
        ours = owned.is_file() and current is not None and json.loads(owned.read_text()) == current
        if current is not None and not ours:
            raise DataError(f"{splits_file} exists with other folds than study file {study.path} [splits] describes, "
                            f"and this study did not write it (another study or `nnunet_transfer splits` did; "
                            f"nnU-Net reads one splits file per dataset). Fix: make [splits] match it, move it "
                            f"away, or use a copy of the dataset under another id")
        if splits_file.is_file():
            shutil.copy2(splits_file, splits_file.with_name(splits_file.name + ".bak"))
        write_json(owned, wanted)  # first: a crash between the two files leaves them ours, not foreign
        _write_plain_json(splits_file, wanted)
        _write_plain_json(mapping_file, _mapping(study, splits, splits_file))
        written += [str(splits_file), str(mapping_file)]
    # identical folds written by another study or `splits` are shared as they are, never recorded as ours
    for k, cases in enumerate(splits.tests):
        folder = test_folder(study, k)
        if _test_folder_ok(folder, cases, splits.file_ending):
            continue
        _link_test_cases(folder, cases, splits)
        written.append(str(folder))
    return written


def _write_plain_json(path: Path, content) -> None:
    # nnU-Net's own json reader: plain file, written atomically
    write_atomic(path, json.dumps(content, indent=2))


def _test_folder_ok(folder: Path, cases: list[str], ending: str) -> bool:
    labels = folder / "labelsTs"
    return labels.is_dir() and sorted(p.name for p in labels.iterdir()) == sorted(f"{c}{ending}" for c in cases)


def _link_test_cases(folder: Path, cases: list[str], splits: StudySplits) -> None:
    """imagesTs/<case>_<channel>.ext and labelsTs/<case>.ext, built aside and renamed into place."""
    ending = splits.file_ending
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "imagesTs").mkdir(parents=True)
        (tmp / "labelsTs").mkdir()
        for c in cases:
            for k, img in enumerate(splits.files[c]["images"]):
                _place(img, tmp / "imagesTs" / f"{c}_{k:04d}{ending}", False)
            _place(splits.files[c]["label"], tmp / "labelsTs" / f"{c}{ending}", False)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- configurations
def write_configurations(study: Study) -> list[str]:
    """One configuration per strategy; the plans file is written once, and only if something changed."""
    path = plans_path(study.dataset, study.plans)
    plans = load_json(path)
    before = json.dumps(plans, sort_keys=True)
    for s in study.strategies:
        plans = add_configuration(plans, base=study.configuration, new=study.configuration_of(s),
                                  settings={**study.settings, **s.settings}, force=True)
    if json.dumps(plans, sort_keys=True) == before:
        return []
    write_plans(path, plans)
    return [f"{path} ({len(study.strategies)} configurations {study.name}_*)"]


# --------------------------------------------------------------------------- records
def study_record(study: Study, splits: StudySplits, runs: list[Run]) -> dict:
    return {"file": str(study.path), "name": study.name, "dataset": study.dataset,
            "configuration": study.configuration, "plans": study.plans, "baseline": study.baseline,
            "splits": study.splits.to_json(), "test": splits.tests,
            "pretrained": {k: str(v) for k, v in study.pretrained.items()},
            "strategies": [{"name": s.name, "trainer": s.trainer, "pretrained": s.pretrained, "title": s.title,
                            "settings": study.effective_settings(s), "sweep": s.sweep_key,
                            "value": None if s.sweep_key is None else sweep_label(s.sweep_value)}
                           for s in study.strategies],
            "runs": [r.row() for r in runs]}


def runs_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    rows = [r.row() for r in runs]
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


__all__ = ["Plan", "prepare", "check_pretrained", "write_splits", "write_configurations"]
