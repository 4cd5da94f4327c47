"""``splits``: a held-out test set and nested small-target training subsets as nnU-Net folds.

The papers score every strategy on the same held-out test cases at several training-set sizes (Karimi
et al.: 15 and 6 target images; Amiri et al.: 5, 50 and 80 % of the data). From a dataset's training
cases (``nnUNet_raw/<Dataset>``, read as nnU-Net reads them):

1. a **test set** — K cases drawn with the seed, or the cases listed in a file — that is in no fold's
   ``train`` or ``val``;
2. for each repeat r, a permutation of the remaining cases (seeded by ``(seed, r)``): its first V cases
   are the repeat's **validation** cases, and the training subsets are prefixes of the rest, so the sizes
   are **nested** (5 ⊂ 15 ⊂ all) and every size of a repeat is validated on the same cases;
3. one nnU-Net fold per (repeat, size), repeat-major: fold ``r·S + i`` is size i of repeat r.

Written: ``nnUNet_preprocessed/<Dataset>/splits_final.json`` (nnU-Net's format: a list of
``{"train": [...], "val": [...]}``, fold k = entry k), ``splits_mapping.json`` beside it (fold →
``n_train``, ``repeat``, the test cases, the seed), and the test cases linked into
``heldout_test/imagesTs`` (``<case>_<channel>.ext``, what ``nnUNetv2_predict -i`` reads) and
``heldout_test/labelsTs`` (what ``evaluate`` reads). Existing splits are replaced only with ``force``
(the old files are kept as ``.bak``).

Sizes are integers, ``all`` (every case that is neither test nor validation) or percentages ``P%`` of
those cases (rounded, at least 1).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.nnunet_io import dataset_name, env_folder, load_json, raw_training_cases
from nnunet_transfer.plans.pool import _place as place  # link, or copy where links fail

SPLITS_FILE = "splits_final.json"
MAPPING_FILE = "splits_mapping.json"
TEST_FOLDER = "heldout_test"


# --------------------------------------------------------------------------- the plan (pure)
def parse_size(value: str | int) -> str | int:
    """``5`` / ``"5"`` -> 5, ``"all"`` -> "all", ``"50%"`` -> "50%" (validated)."""
    if isinstance(value, bool):
        raise DataError(f"--n-train {value!r} is not a size")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        text = str(value).strip().lower()
        if text == "all":
            return "all"
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
        if m:
            if not 0 < float(m.group(1)) <= 100:
                raise DataError(f"--n-train {value!r}: a percentage must be in (0, 100]")
            return text
        if not re.fullmatch(r"\d+", text):
            raise DataError(f"--n-train {value!r} is not a size: give an integer, a percentage like 50% or all")
        n = int(text)
    if n < 1:
        raise DataError(f"--n-train {value!r}: a training set needs at least 1 case")
    return n


def resolve_size(size: str | int, available: int) -> int:
    if size == "all":
        return available
    if isinstance(size, str):  # "P%"
        return max(1, int(round(float(size[:-1]) / 100 * available)))
    return int(size)


@dataclass
class SplitPlan:
    test: list[str]
    val_count: int
    available: int  # training candidates per repeat (cases − test − validation)
    folds: list[dict] = field(default_factory=list)  # fold, repeat, n_train, n_train_requested, train, val


def plan_splits(cases: Sequence[str], *, n_train: Sequence[str | int], repeats: int = 1, test: int | None = None,
                test_cases: Sequence[str] | None = None, val: int | None = None, seed: int = 0,
                dataset: str = "the dataset") -> SplitPlan:
    """The test set and the nested folds (module docstring); validates every number first."""
    cases = sorted(dict.fromkeys(cases))
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise DataError(f"--repeats {repeats!r} must be an integer >= 1")
    if (test is None) == (test_cases is None):
        raise DataError("give the test set either as a number of cases (--test K) or as a file (--test-cases FILE)")
    if test_cases is not None:
        wanted = list(dict.fromkeys(test_cases))
        unknown = [c for c in wanted if c not in set(cases)]
        if unknown:
            raise DataError(f"test case(s) {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''} are not "
                            f"training cases of {dataset} ({len(cases)} cases, e.g. {', '.join(cases[:3])})")
        test_list = sorted(wanted)
    else:
        if not isinstance(test, int) or isinstance(test, bool) or test < 0:
            raise DataError(f"--test {test!r} must be a number of cases >= 0")
        if test >= len(cases):
            raise DataError(f"--test {test} leaves nothing to train on: {dataset} has {len(cases)} training cases")
        rng = np.random.default_rng(seed)
        test_list = sorted(rng.permutation(cases)[:test].tolist())
    pool = [c for c in cases if c not in set(test_list)]
    if val is None:
        val = max(1, int(round(0.2 * len(pool))))
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise DataError(f"--val {val!r} must be at least 1 (nnU-Net validates every epoch)")
    if val >= len(pool):
        raise DataError(f"--val {val} leaves no training case: {len(pool)} cases remain after the "
                        f"{len(test_list)} test cases of {dataset}'s {len(cases)}")
    available = len(pool) - val
    sizes = [parse_size(s) for s in n_train]
    if not sizes:
        raise DataError("--n-train needs at least one size, e.g. --n-train 5 15 all")
    resolved = [resolve_size(s, available) for s in sizes]
    too_big = [(s, n) for s, n in zip(sizes, resolved) if n > available]
    if too_big:
        s, n = too_big[0]
        raise DataError(f"--n-train {s} is larger than the {available} cases available for training "
                        f"({len(cases)} training cases of {dataset} − {len(test_list)} test − {val} validation); "
                        f"fix: a size <= {available}, a smaller --test/--val, or 'all'")
    seen: dict[int, str | int] = {}
    for s, n in zip(sizes, resolved):
        if n in seen:
            raise DataError(f"--n-train {seen[n]} and {s} are both {n} cases; give each size once")
        seen[n] = s
    order = sorted(range(len(sizes)), key=lambda i: resolved[i])
    plan = SplitPlan(test=test_list, val_count=val, available=available)
    for r in range(repeats):
        perm = np.random.default_rng([seed, r]).permutation(pool).tolist()
        val_cases, rest = sorted(perm[:val]), perm[val:]
        for i in order:
            plan.folds.append({"fold": len(plan.folds), "repeat": r, "n_train": resolved[i],
                               "n_train_requested": sizes[i], "train": sorted(rest[:resolved[i]]),
                               "val": val_cases})
    return plan


# --------------------------------------------------------------------------- files
def read_case_list(path: str | Path) -> list[str]:
    """Case identifiers from a file: a JSON list, or one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--test-cases file {path} not found")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path} starts like a JSON list but is not valid JSON: {e}") from None
        if not all(isinstance(i, str) for i in items):
            raise DataError(f"{path}: the JSON list must hold case identifiers (strings)")
    else:
        items = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        items = [i for i in items if i]
    if not items:
        raise DataError(f"{path} lists no test cases")
    return items


def _strip_ending(case: str, ending: str) -> str:
    return case[: -len(ending)] if case.endswith(ending) else case


@dataclass
class SplitsResult:
    dataset: str
    splits_file: Path
    mapping_file: Path
    test_folder: Path | None
    plan: SplitPlan
    backups: list[Path] = field(default_factory=list)

    def text(self) -> str:
        p = self.plan
        lines = [f"{self.splits_file}: {len(p.folds)} folds; {len(p.test)} held-out test cases in no fold",
                 "fold  repeat  n_train  n_val"]
        lines += [f"{f['fold']:>4}  {f['repeat']:>6}  {f['n_train']:>7}  {len(f['val']):>5}" for f in p.folds]
        lines.append(f"mapping: {self.mapping_file}")
        if self.backups:
            lines.append("previous files kept as: " + ", ".join(map(str, self.backups)))
        if self.test_folder is not None:
            lines += [f"test cases: {self.test_folder}/imagesTs (images), {self.test_folder}/labelsTs (labels)",
                      "next, per strategy and fold (never fold 'all': it would train on the test cases):",
                      f"  nnUNetv2_train {self.dataset} CONFIG FOLD -tr TRAINER",
                      f"  nnUNetv2_predict -i {self.test_folder}/imagesTs -o PRED -d {self.dataset} -c CONFIG "
                      f"-f FOLD -tr TRAINER",
                      f"  nnunet_transfer evaluate PRED {self.test_folder}/labelsTs -o EVAL --run FOLD_FOLDER"]
        return "\n".join(lines)


def _place(src: str, dest: Path, copy: bool) -> None:
    place(src, dest, copy)


def make_splits(dataset: str | int, *, n_train: Sequence[str | int], repeats: int = 1, test: int | None = None,
                test_cases: Sequence[str] | str | Path | None = None, val: int | None = None, seed: int = 0,
                force: bool = False, test_folder: str | Path | None = None, copy: bool = False) -> SplitsResult:
    """Plan and write the splits of ``dataset`` (module docstring). Validates everything before writing.

    ``test_cases``: identifiers, or a file of them; ``test_folder``: where the test cases are linked
    (default ``nnUNet_preprocessed/<Dataset>/heldout_test``); ``copy``: copy instead of linking.
    """
    name = dataset_name(dataset)
    try:
        files, ending = raw_training_cases(name)
    except DataError as e:
        raise DataError(f"{e}: splits are drawn from the raw dataset's training cases") from None
    if isinstance(test_cases, (str, Path)):
        test_cases = read_case_list(test_cases)
    if test_cases is not None:
        test_cases = [_strip_ending(c, ending) for c in test_cases]
    plan = plan_splits(list(files), n_train=n_train, repeats=repeats, test=test, test_cases=test_cases, val=val,
                       seed=seed, dataset=name)

    base = env_folder("nnUNet_preprocessed") / name
    splits_file, mapping_file = base / SPLITS_FILE, base / MAPPING_FILE
    tfolder = (Path(test_folder) if test_folder is not None else base / TEST_FOLDER) if plan.test else None
    existing = [p for p in (splits_file, mapping_file) if p.exists()]
    if tfolder is not None and tfolder.exists():
        existing.append(tfolder)
    if existing and not force:
        raise DataError(f"{', '.join(map(str, existing))} exist(s); --force replaces them (the old splits are "
                        f"kept as {SPLITS_FILE}.bak)")
    if tfolder is not None and tfolder.exists():
        extra = sorted(p.name for p in tfolder.iterdir() if p.name not in ("imagesTs", "labelsTs"))
        if not tfolder.is_dir() or extra:
            raise DataError(f"test folder {tfolder} holds more than a previous splits run wrote ({extra[:5]}); "
                            f"give another --test-folder or remove it")
    for c in plan.test:  # every file must be there before anything is written
        for f in [*files[c]["images"], files[c]["label"]]:
            if not os.path.isfile(f):
                raise DataError(f"file {f} of test case {c} not found")

    created_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    backups: list[Path] = []
    written: list[Path] = []
    tmp_folder = None if tfolder is None else tfolder.with_name(tfolder.name + ".partial")
    try:
        if tmp_folder is not None:
            shutil.rmtree(tmp_folder, ignore_errors=True)
            (tmp_folder / "imagesTs").mkdir(parents=True)
            (tmp_folder / "labelsTs").mkdir()
            for c in plan.test:
                for k, img in enumerate(files[c]["images"]):
                    _place(img, tmp_folder / "imagesTs" / f"{c}_{k:04d}{ending}", copy)
                _place(files[c]["label"], tmp_folder / "labelsTs" / f"{c}{ending}", copy)
        splits = [{"train": f["train"], "val": f["val"]} for f in plan.folds]
        mapping = {"tool": "nnunet_transfer splits", "dataset": name, "seed": seed, "repeats": repeats,
                   "n_train": [f["n_train_requested"] for f in plan.folds[: len(plan.folds) // repeats]],
                   "n_val": plan.val_count, "available_for_training": plan.available, "test": plan.test,
                   "test_folder": None if tfolder is None else str(tfolder.resolve()),
                   "splits_file": str(splits_file.resolve()),
                   "folds": [{k: f[k] for k in ("fold", "repeat", "n_train", "n_train_requested")}
                             | {"n_val": len(f["val"])} for f in plan.folds]}
        for p in (splits_file, mapping_file):
            if p.exists():
                bak = p.with_name(p.name + ".bak")
                shutil.copy2(p, bak)
                backups.append(bak)
        for p, content in ((splits_file, splits), (mapping_file, mapping)):
            write_atomic(p, json.dumps(content, indent=2))
            written.append(p)
        if tmp_folder is not None:
            if tfolder.exists():
                shutil.rmtree(tfolder)
            os.replace(tmp_folder, tfolder)
    except BaseException:
        if tmp_folder is not None:
            shutil.rmtree(tmp_folder, ignore_errors=True)
        for p in written:
            p.unlink(missing_ok=True)
        for bak in backups:  # put the previous files back
            os.replace(bak, bak.with_name(bak.name[: -len(".bak")]))
        if created_base:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return SplitsResult(dataset=name, splits_file=splits_file, mapping_file=mapping_file, test_folder=tfolder,
                        plan=plan, backups=backups)


def read_mapping(dataset: str | int) -> dict:
    """The ``splits_mapping.json`` of a dataset (written by :func:`make_splits`)."""
    return load_json(env_folder("nnUNet_preprocessed") / dataset_name(dataset) / MAPPING_FILE)


__all__ = ["make_splits", "plan_splits", "read_case_list", "read_mapping", "SplitsResult", "SplitPlan",
           "SPLITS_FILE", "MAPPING_FILE", "TEST_FOLDER"]
