"""A study's ``[splits]`` table and the nnU-Net folds and test cases it gives, from the raw dataset's cases.

The splits are issue 11's (:func:`nnunet_transfer.experiments.splits.plan_splits`): nested random training
subsets (5 ⊂ 15 ⊂ all) of each repeat, validated on the same cases, as nnU-Net folds. The test cases are
either

* a **held-out set** (``test = K`` or ``test_cases``; Karimi et al., Sagie et al.): in no fold's training
  or validation cases; every run predicts the same cases; or
* **F-fold cross-validation** (``folds = F``; Amiri et al.): the cases are dealt into F groups with the
  seed; outer fold k holds group k out as its test cases and draws its subsets from the others, so every
  case is tested exactly once per strategy and size, by a model that never saw it.

nnU-Net fold index = (outer fold · repeats + repeat) · sizes + i, with sizes in increasing order (as
``splits`` numbers them). The study file's checks (:mod:`.spec`: the sizes against the dataset) and the run
table (:mod:`.table`) both use it; it imports neither. It reads the raw dataset's case list, writes nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.splits import plan_splits
from nnunet_transfer.nnunet_io import raw_training_cases

# issue 11's messages name its command-line flags; a study file names its keys
_FLAG_WORDS = (("--n-train", "n_train"), ("--test-cases", "test_cases"), ("--test", "test"), ("--val", "val"),
               ("--repeats", "repeats"))


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


def dataset_cases(dataset: str) -> tuple[dict, str]:
    """nnU-Net's training cases of the raw dataset (``{case: {"images", "label"}}``) and the file ending."""
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


def fold_plan(sp: SplitSpec, dataset: str, files: dict, file_ending: str) -> StudySplits:
    """:func:`plan_study_splits` of a ``[splits]`` table alone (``load_study`` checks the sizes with it); a
    problem is a :class:`DataError` in the file's words, without the file's name."""
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


__all__ = ["SplitSpec", "StudySplits", "dataset_cases", "fold_plan"]
