"""Writing analysis results: JSON (everything), CSV (one file per table) and a markdown summary, and
the table rows and markdown cells every study shares.

NaN and infinities become ``null`` in JSON and empty cells in CSV; floats keep full precision
(``repr``) so tables can be re-read without loss.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from nnunet_transfer.fileio import plain, write_atomic

if TYPE_CHECKING:
    from nnunet_transfer.analysis.activations import Layer
    from nnunet_transfer.analysis.similarity import SimilarityResult

#: the similarity measures every table carries (each with its null baseline)
MEASURES = ("pwcca", "mean_cca", "svcca", "linear_cka")


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    write_atomic(path, json.dumps(plain(data), indent=2) + "\n")
    return path


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _cell(v: Any) -> str:
    v = plain(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "x".join(map(str, v))
    return str(v)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    header = columns(rows)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([_cell(r.get(k)) for k in header])
    os.replace(tmp, path)
    return path


def fmt(v: Any, digits: int = 3) -> str:
    """Short number for markdown: ``0.912``; NaN/None -> ``n/a``."""
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)


def with_null(value: Any, null: Any, digits: int = 3) -> str:
    """``0.912 (null 0.043)``: every similarity beside its null baseline."""
    return f"{fmt(value, digits)} (null {fmt(null, digits)})"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def sim_row(layer: "Layer", res: "SimilarityResult") -> dict:
    """One table row: the layer, channels, samples, every measure, every null, dead channels."""
    row = layer.to_dict() | {"channels": res.cx, "n": res.n}
    for m in MEASURES:
        row[m] = getattr(res, m)
    for m in MEASURES:
        row[f"null_{m}"] = getattr(res, f"null_{m}")
    row |= {"dead_a": res.dead_x, "dead_b": res.dead_y,
            "pwcca_by": {"x": "a", "y": "b", "sym": "both"}[res.pwcca_side]}  # the side PWCCA is weighted by
    return row


def layer_label(layer: "Layer") -> str:
    """``block3 (enc L2)``; ``seg`` for the segmentation head."""
    return "seg" if layer.block is None else f"{layer.name} ({layer.group[:3]} L{layer.level})"


def similarity_table(layers: Sequence["Layer"], columns: Sequence[str],
                     result: Callable[["Layer", int], "SimilarityResult"], *, measure: str) -> str:
    """Markdown: one row per layer, one column per comparison, each cell ``value (null …)``.

    ``result(layer, k)`` is the :class:`SimilarityResult` of comparison ``k`` at ``layer``.
    """
    return md_table(["layer", *columns],
                    [[layer_label(l)] + [with_null(getattr(result(l, k), measure), getattr(result(l, k), f"null_{measure}"))
                                         for k in range(len(columns))] for l in layers])


def write_outputs(out: str | Path, study: str, *, meta: Mapping[str, Any], tables: Mapping[str, list[dict]],
                  summary: str, plots: Mapping[str, Path] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``<study>.json`` (meta, tables, extra), ``<study>_<table>.csv`` per table, ``summary.md``.

    Returns every file written (plots included), by name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["json"] = write_json(out / f"{study}.json", {"study": study, "meta": meta, **(extra or {}),
                                                        "tables": tables})
    for name, rows in tables.items():
        files[f"csv_{name}"] = write_csv(out / f"{study}_{name}.csv", rows)
    summary_path = out / "summary.md"
    write_atomic(summary_path, summary.rstrip() + "\n")
    files["summary"] = summary_path
    for name, p in (plots or {}).items():
        files[name] = Path(p)
    return files
