"""A study's splits and its run table: one run per strategy × training-set size × repeat × fold.

The splits are issue 11's (:func:`nnunet_transfer.experiments.splits.plan_splits`): nested random training
subsets (5 ⊂ 15 ⊂ all) of each repeat, validated on the same cases, as nnU-Net folds. The test cases are
either

* a **held-out set** (``test = K`` or ``test_cases``; Karimi et al., Sagie et al.): in no fold's training
  or validation cases; every run predicts the same cases; or
* **F-fold cross-validation** (``folds = F``; Amiri et al.): the cases are dealt into F groups with the
  seed; outer fold k holds group k out as its test cases and draws its subsets from the others, so every
  case is tested exactly once per strategy and size, by a model that never saw it.

nnU-Net fold index = (outer fold · repeats + repeat) · sizes + i, with sizes in increasing order (as
``splits`` numbers them). The table is pure: it reads the raw dataset's case list, writes nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.study.spec import SplitSpec, Strategy, Study

# issue 11's messages name its command-line flags; a study file names its keys
_FLAG_WORDS = (("--n-train", "n_train"), ("--test-cases", "test_cases"), ("--test", "test"), ("--val", "val"),
               ("--repeats", "repeats"))


@dataclass(frozen=True)
class Run:
    id: str
    strategy: Strategy
    configuration: str
    size: str | int       # as the file gives it (6, "all", "50%")
    size_index: int       # position in [splits] n_train
    n_train: int          # resolved
    n_val: int
    repeat: int
    fold: int             # outer fold (cross-validation); 0 with a held-out test set
    nnunet_fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    num_epochs: int

    @property
    def trainer(self) -> str:
        return self.strategy.trainer

    def row(self) -> dict:
        return {"run": self.id, "strategy": self.strategy.name, "trainer": self.trainer,
                "configuration": self.configuration, "n_train": self.n_train, "size": str(self.size),
                "repeat": self.repeat, "fold": self.fold, "nnunet_fold": self.nnunet_fold, "n_val": self.n_val,
                "n_test": len(self.test), "pretrained": self.strategy.pretrained or ""}


@dataclass
class StudySplits:
    """The nnU-Net folds of the study and the test cases of each outer fold."""

    folds: list[dict]                  # nnU-Net fold order: fold, outer, repeat, n_train, n_train_requested, train, val
    tests: list[list[str]]             # per outer fold
    files: dict = field(repr=False)    # nnU-Net's case -> {"images": [...], "label": ...}
    file_ending: str = ".nii.gz"
    available: list[int] = field(default_factory=list)  # training candidates per outer fold

    def splits_final(self) -> list[dict]:
        return [{"train": f["train"], "val": f["val"]} for f in self.folds]


def size_slug(size: str | int) -> str:
    return str(size).replace("%", "pct")


def test_folder(study: Study, fold: int) -> Path:
    """Where the test cases of an outer fold are linked (imagesTs/, labelsTs/)."""
    base = study.output / "test"
    return base / f"fold_{fold}" if study.splits.cross_validation else base


def dataset_cases(dataset: str) -> tuple[dict, str]:
    """nnU-Net's training cases of the raw dataset (``{case: {"images", "label"}}``) and the file ending."""
    from nnunet_transfer.nnunet_io import raw_training_cases

    try:
        files, ending = raw_training_cases(dataset)
    except DataError as e:
        raise DataError(f"{e} (a study draws its splits from the raw dataset's training cases)") from None
    return files, ending


def _file_words(e: DataError) -> str:
    text = str(e)
    for flag, key in _FLAG_WORDS:
        text = re.sub(re.escape(flag) + r"(?![\w-])", key, text)
    return text


def plan_study_splits(study: Study, files: dict | None = None, file_ending: str | None = None) -> StudySplits:
    """The study's folds and test sets (module docstring); raises with the file's key names."""
    if files is None:
        files, file_ending = dataset_cases(study.dataset)
    try:
        return fold_plan(study.splits, study.dataset, files, file_ending)
    except DataError as e:
        raise DataError(f"study file {study.path} [splits]: {e}") from None


def fold_plan(sp: SplitSpec, dataset: str, files: dict, file_ending: str) -> StudySplits:
    """:func:`plan_study_splits` of a ``[splits]`` table alone (``load_study`` checks the sizes with it); a
    problem is a :class:`DataError` in the file's words, without the file's name."""
    from nnunet_transfer.experiments.splits import plan_splits

    cases = sorted(files)
    if sp.cross_validation:
        if sp.folds > len(cases):
            raise DataError(f"folds = {sp.folds} needs at least {sp.folds} cases; {dataset} has {len(cases)}")
        perm = np.random.default_rng(sp.seed).permutation(cases).tolist()
        groups = [sorted(perm[k::sp.folds]) for k in range(sp.folds)]
    else:
        groups = [None]
    folds, tests, available = [], [], []
    for outer, group in enumerate(groups):
        try:
            if group is None:
                plan = plan_splits(cases, n_train=list(sp.n_train), repeats=sp.repeats, test=sp.test,
                                   test_cases=list(sp.test_cases) if sp.test_cases is not None else None, val=sp.val,
                                   seed=sp.seed, dataset=dataset)
            else:
                plan = plan_splits(cases, n_train=list(sp.n_train), repeats=sp.repeats, test_cases=group, val=sp.val,
                                   seed=sp.seed, dataset=dataset)
        except DataError as e:
            where = f" (cross-validation fold {outer}: {len(group)} test cases)" if group is not None else ""
            raise DataError(f"{_file_words(e)}{where}") from None
        offset = len(folds)
        for f in plan.folds:
            folds.append({**f, "fold": offset + f["fold"], "outer": outer})
        tests.append(list(plan.test))
        available.append(plan.available)
    return StudySplits(folds=folds, tests=tests, files=files, file_ending=file_ending, available=available)


def build_table(study: Study, splits: StudySplits) -> list[Run]:
    """Every run of the study in a stable order: strategy, then fold, repeat and size."""
    from nnunet_transfer.config import TransferConfig
    from nnunet_transfer.study.spec import _trainer_classes

    classes = _trainer_classes()
    index = {str(s): i for i, s in enumerate(study.splits.n_train)}
    outer_folds = study.splits.folds_to_run or tuple(range(len(splits.tests)))
    runs = []
    for s in study.strategies:
        cls = classes[s.trainer]
        cfg = TransferConfig.from_mapping(study.effective_settings(s), defaults=cls.transfer_defaults,
                                          allowed=set(cls.transfer_keys), owner=s.trainer)
        for f in splits.folds:
            if f["outer"] not in outer_folds:
                continue
            size = f["n_train_requested"]
            rid = f"{s.name}__n{size_slug(size)}__r{f['repeat']}__f{f['outer']}"
            runs.append(Run(id=rid, strategy=s, configuration=study.configuration_of(s), size=size,
                            size_index=index[str(size)], n_train=f["n_train"], n_val=len(f["val"]),
                            repeat=f["repeat"], fold=f["outer"], nnunet_fold=f["fold"], train=tuple(f["train"]),
                            val=tuple(f["val"]), test=tuple(splits.tests[f["outer"]]), num_epochs=cfg.num_epochs))
    runs.sort(key=lambda r: ([x.name for x in study.strategies].index(r.strategy.name), r.fold, r.repeat,
                             r.size_index))
    return runs


def format_table(runs: list[Run]) -> str:
    head = ("run", "trainer", "n_train", "repeat", "fold", "nnU-Net fold", "test")
    rows = [(r.id, r.trainer, str(r.n_train), str(r.repeat), str(r.fold), str(r.nnunet_fold), str(len(r.test)))
            for r in runs]
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), *map(line, rows)])


__all__ = ["Run", "StudySplits", "plan_study_splits", "fold_plan", "build_table", "format_table", "test_folder",
           "size_slug", "dataset_cases"]
