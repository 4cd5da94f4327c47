"""Collecting a study file's problems (:class:`Problems`) and reading one value of a table into it.

Every section reader (``read_*.py``) adds a problem and goes on instead of raising, so that one pass reports
the file whole; the value readers here (:func:`read_table`, :func:`read_int`, :func:`read_str`,
:func:`read_name`, :func:`expand_path`) return None for a value with a problem (the checks that need it are
skipped) and word their problems the same way in every table.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Sequence

from nnunet_transfer.config import is_int
from nnunet_transfer.errors import ConfigError, DataError, TransferError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class StudyFileError(ConfigError):
    """Several problems of one study file: a heading line, then one line per problem (table, key, message)."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.path = path
        self.problems = list(problems)
        super().__init__(f"study file {path} has {len(self.problems)} problems:\n"
                         + "\n".join(f"  {p}" for p in self.problems))


class Problems:
    """The problems of one study file, collected in one pass.

    The readers add to it instead of raising, and go on with the next key, table or strategy, so that a
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


def suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_table(p: Problems, table: str, content: Any, valid: Sequence[str]) -> dict | None:
    """The table's content with every unknown key reported (and left out); None if it is not a table."""
    if not isinstance(content, dict):
        p.add(table, f"must be a table (section), got {type(content).__name__}: {content!r}")
        return None
    for key in content:
        if key not in valid:
            p.add(table, f"unknown key {key!r}{suggest(key, valid)}; valid keys: {', '.join(valid)}")
    return {k: v for k, v in content.items() if k in valid}


def read_int(p: Problems, table: str, key: str, v: Any, lo: int) -> int | None:
    if not is_int(v) or v < lo:
        return p.add(table, f"{key} = {v!r} must be an integer >= {lo}")
    return v


def read_str(p: Problems, table: str, key: str, v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return p.add(table, f"{key} = {v!r} must be a non-empty string")
    return v.strip()


def read_name(p: Problems, table: str, key: str, v: Any) -> str | None:
    v = read_str(p, table, key, v)
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



__all__ = ["Problems", "StudyFileError", "NAME", "suggest", "read_table", "read_int", "read_str", "read_name",
           "expand_path"]
