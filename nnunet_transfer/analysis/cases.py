"""Which preprocessed cases ``analyze`` draws its patches from (``--cases``).

Karimi et al. sample "blocks from random locations in the test images" (Sec. 2.3): the representations are
compared on images none of the networks trained on. The held-out test cases of a dataset are what
``nnunet_transfer splits`` and ``study plan`` record in ``$nnUNet_preprocessed/<Dataset>/splits_mapping.json``
(:data:`nnunet_transfer.experiments.splits.MAPPING_FILE`): ``test`` for one held-out set, or for
cross-validation ``test_by_fold`` with each nnU-Net fold's ``outer_fold`` — there a run's test cases follow
from its fold folder (``fold_K``), and runs of different outer folds share none.

``cases`` (``--cases``):

* ``None`` (the default): the test cases when the mapping knows them for the runs analysed, else every
  preprocessed case; the output says which, and why;
* ``"test"``: the test cases, or an error that says why they are unknown;
* ``"all"``: every preprocessed case, training cases included (the behaviour before issue 21);
* a file (a JSON list, or one identifier a line, as ``splits --test-cases``), or identifiers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.experiments.splits import MAPPING_FILE, read_case_list
from nnunet_transfer.nnunet_io import env_folder, load_json

#: ``--cases`` words; anything else is a file or comma-separated identifiers
WORDS = ("test", "all")


@dataclass(frozen=True)
class CaseChoice:
    """The cases to draw from (``None``: every preprocessed case), how they were chosen, and one line saying so."""

    cases: list[str] | None
    kind: str  # "test", "all" (asked for), "all-fallback" (test cases unknown), "given"
    why: str

    def text(self, n: int) -> str:
        """The line of summary.md; ``n``: how many cases the patches are drawn from."""
        if self.kind == "test":
            return f"patches from the {n} held-out test cases ({self.why})"
        if self.kind == "given":
            return f"patches from the {n} cases given ({self.why})"
        if self.kind == "all":
            return f"patches from all {n} preprocessed cases, training cases included (--cases all)"
        return (f"patches from all {n} preprocessed cases, training cases included: {self.why}; --cases FILE names "
                f"the test cases")

    def to_dict(self) -> dict:
        return {"from": self.kind, "why": self.why}


def parse_cases(value: str | Path | Sequence[str] | None) -> str | Path | list[str] | None:
    """``--cases`` as given: None, ``"test"``, ``"all"``, an existing file, or identifiers (a list or "a,b,c")."""
    if value is None:
        return None
    if isinstance(value, Path):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in WORDS:
            return text
        if Path(text).expanduser().is_file():
            return Path(text).expanduser()
        ids = [c.strip() for c in text.split(",") if c.strip()]
        if not ids:
            raise ConfigError(f"--cases {value!r} names no case; give test, all, a file of case identifiers or "
                              f"identifiers separated by commas")
        return ids
    ids = [str(c).strip() for c in value if str(c).strip()]
    if not ids:
        raise ConfigError("--cases names no case; give test, all, a file of case identifiers or identifiers")
    return ids


def _fold_number(run: Path) -> int | None:
    name = Path(run).name
    return int(name[5:]) if name.startswith("fold_") and name[5:].isdigit() else None


def heldout_cases(dataset: str, runs: Sequence[Path]) -> tuple[list[str] | None, str]:
    """The held-out test cases of ``dataset`` for ``runs`` (fold folders) and where they come from; ``(None,
    why)`` when they are unknown."""
    path = env_folder("nnUNet_preprocessed") / dataset / MAPPING_FILE
    if not path.is_file():
        return None, (f"no held-out test cases are recorded for {dataset} ({path} does not exist; `nnunet_transfer "
                      f"splits` and `study plan` write it)")
    try:
        mapping = load_json(path)
    except Exception as e:  # noqa: BLE001 - an unreadable file is reported as the reason, in one line
        return None, f"{path} cannot be read ({e})"
    where = f"{path}, written by {mapping.get('tool', 'an unknown tool')}"
    if not mapping.get("cross_validation"):
        cases = list(mapping.get("test") or [])
        return (cases, where) if cases else (None, f"{path} lists no held-out test cases")
    folds = {int(f["fold"]): f.get("outer_fold") for f in mapping.get("folds") or [] if "fold" in f}
    by_outer = mapping.get("test_by_fold") or []
    # only this dataset's runs have their folds in this mapping (a source network's fold means nothing here)
    ours = [r for r in runs if Path(r).parent.parent.name == dataset and _fold_number(r) is not None]
    outer = sorted({folds.get(_fold_number(r)) for r in ours})
    if not ours:
        return None, (f"{path} holds cross-validation test folds and no run of {dataset} (a fold folder "
                      f"…/{dataset}/…/fold_K) is analysed to tell which")
    if None in outer or any(not isinstance(o, int) or o >= len(by_outer) for o in outer):
        return None, f"{path} does not know the outer fold of every run analysed"
    if len(outer) > 1:
        return None, (f"the runs analysed come from cross-validation outer folds {outer}, whose test cases differ "
                      f"({path})")
    return list(by_outer[outer[0]]), f"outer fold {outer[0]} of {where}"


def choose_cases(dataset: str, spec: str | Path | Sequence[str] | None, runs: Sequence[Path]) -> CaseChoice:
    """What ``spec`` (:func:`parse_cases`) means for ``dataset`` and the fold folders ``runs`` analysed."""
    spec = parse_cases(spec)
    if spec == "all":
        return CaseChoice(None, "all", "--cases all")
    if isinstance(spec, Path):
        if not spec.is_file():
            raise DataError(f"--cases file {spec} not found; give test, all, a file of case identifiers or "
                            f"identifiers separated by commas")
        return CaseChoice(read_case_list(spec), "given", f"--cases {spec}")
    if isinstance(spec, list):
        return CaseChoice(spec, "given", "--cases")
    cases, why = heldout_cases(dataset, runs)
    if cases is not None:
        return CaseChoice(cases, "test", why)
    if spec == "test":
        raise DataError(f"--cases test: {why}; name the test cases with --cases FILE, or sample every case with "
                        f"--cases all")
    return CaseChoice(None, "all-fallback", why)


__all__ = ["CaseChoice", "WORDS", "choose_cases", "heldout_cases", "parse_cases"]
