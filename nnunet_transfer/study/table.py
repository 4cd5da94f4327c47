"""A study's run table: one run per strategy × training-set size × repeat × fold, over the nnU-Net folds and
test cases of :mod:`.folds` (issue 11's splits). The table is pure: it reads the raw dataset's case list,
writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import DataError
from nnunet_transfer.study.folds import StudySplits, dataset_cases, fold_plan
from nnunet_transfer.study.model import Strategy, Study
from nnunet_transfer.study.read_strategies import trainer_classes


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


def size_slug(size: str | int) -> str:
    return str(size).replace("%", "pct")


def test_folder(study: Study, fold: int) -> Path:
    """Where the test cases of an outer fold are linked (imagesTs/, labelsTs/)."""
    base = study.output / "test"
    return base / f"fold_{fold}" if study.splits.cross_validation else base


def plan_study_splits(study: Study, files: dict | None = None, file_ending: str | None = None) -> StudySplits:
    """The study's folds and test sets (module docstring); raises with the file's key names."""
    if files is None:
        files, file_ending = dataset_cases(study.dataset)
    try:
        return fold_plan(study.splits, study.dataset, files, file_ending)
    except DataError as e:
        raise DataError(f"study file {study.path} [splits]: {e}") from None


def build_table(study: Study, splits: StudySplits) -> list[Run]:
    """Every run of the study in a stable order: strategy, then fold, repeat and size."""
    classes = trainer_classes()
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


__all__ = ["Run", "plan_study_splits", "build_table", "format_table", "test_folder", "size_slug"]
