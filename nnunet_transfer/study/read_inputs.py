"""[pretrained] and [splits]: what a study starts from — the named checkpoints and the cases it trains and
tests on (:class:`~nnunet_transfer.study.folds.SplitSpec`; the sizes against the dataset's cases are checked
by :mod:`nnunet_transfer.study.spec`, which knows the dataset)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nnunet_transfer.config import is_int
from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.splits import parse_size, read_case_list
from nnunet_transfer.study.folds import SplitSpec
from nnunet_transfer.study.model import SourceTest
from nnunet_transfer.study.problems import Problems, expand_path, read_int, read_name, read_str, read_table

SOURCE_TEST_KEYS = ("images", "labels", "pretrained", "old_labels")
SPLITS_KEYS = ("n_train", "repeats", "test", "test_cases", "folds", "folds_to_run", "val", "seed")


def read_pretrained(p: Problems, content: Any, base: Path, check: bool) -> dict[str, Path | None]:
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
        text = read_str(p, "pretrained", key, value)
        if read_name(p, "pretrained", "name", key) is None or text is None:
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


def read_splits(p: Problems, content: Any, base: Path) -> SplitSpec | None:
    before = len(p)
    sp = read_table(p, "splits", content, SPLITS_KEYS)
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
        test = read_int(p, "splits", "test", sp["test"], 1)
    elif given == ["test_cases"]:
        test_cases, test_file = _test_cases(p, sp["test_cases"], base)
    elif given == ["folds"]:
        folds = read_int(p, "splits", "folds", sp["folds"], 2)
    if "folds_to_run" in sp:
        ftr = sp["folds_to_run"]
        if "folds" not in sp:
            p.add("splits", "folds_to_run needs folds = F (cross-validation)")
        elif folds is not None:
            if not isinstance(ftr, list) or not ftr or not all(is_int(f) and 0 <= f < folds for f in ftr):
                p.add("splits", f"folds_to_run = {ftr!r} must list fold numbers 0..{folds - 1}")
            else:
                folds_to_run = tuple(sorted(set(ftr)))
    val = read_int(p, "splits", "val", sp["val"], 1) if "val" in sp else None
    repeats = read_int(p, "splits", "repeats", sp.get("repeats", 1), 1)
    seed = read_int(p, "splits", "seed", sp.get("seed", 0), 0)
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
    text = read_str(p, "splits", "test_cases", v)
    f = expand_path(text, base, what="test_cases", p=p, table="splits") if text is not None else None
    if f is None:
        return None, None
    try:
        return tuple(read_case_list(f)), str(f)
    except DataError as e:
        p.add("splits", str(e).replace("--test-cases", "test_cases"), DataError)
        return None, None



def read_source_test(p: Problems, content: Any, base: Path, check: bool,
                     pretrained: dict[str, Path | None]) -> SourceTest | None:
    """[source_test]: the source's test images and labels, the [pretrained] entry that is the source model, the old
    classes (default: every label of the references)."""
    before = len(p)
    st = read_table(p, "source_test", content, SOURCE_TEST_KEYS)
    if st is None:
        return None
    folders = {}
    for key in ("images", "labels"):
        if key not in st:
            p.add("source_test", f"{key} is missing: the source's held-out test {key} (e.g. "
                                 f"\"$nnUNet_raw/Dataset901_Source/{key}Ts\")")
            continue
        text = read_str(p, "source_test", key, st[key])
        path = expand_path(text, base, what=f"{key} =", p=p, table="source_test", strict=check) if text else None
        if path is not None and check and not path.is_dir():
            p.add("source_test", f"{key} = {text!r}: folder {path} not found; fix the path (relative paths are "
                                 f"relative to the study file)", DataError)
            continue
        folders[key] = path.resolve() if (path is not None and check) else path
    name = st.get("pretrained")
    if name is None:
        if len(pretrained) != 1:
            p.add("source_test", f"pretrained is missing: name the [pretrained] entry that is the source model "
                                 f"(entries: {', '.join(pretrained) or 'none'})")
        else:
            name = next(iter(pretrained))
    elif name not in pretrained:
        p.add("source_test", f"pretrained = {name!r} is not an entry of [pretrained] (entries: "
                             f"{', '.join(pretrained) or 'none'})")
    old = st.get("old_labels")
    if old is not None:
        if not isinstance(old, list) or not old or not all(is_int(v) and v > 0 for v in old):
            p.add("source_test", f"old_labels = {old!r} must be a list of the source's foreground label values, "
                                 f"e.g. [1, 2]")
        else:
            old = tuple(dict.fromkeys(old))
    if len(p) > before or "images" not in folders or "labels" not in folders:
        return None
    return SourceTest(images=folders["images"], labels=folders["labels"], pretrained=name, old_labels=old)


__all__ = ["read_pretrained", "read_splits", "read_source_test", "SPLITS_KEYS", "SOURCE_TEST_KEYS"]
