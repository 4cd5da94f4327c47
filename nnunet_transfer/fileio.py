"""Writing result files: whole or not at all, and JSON-ready values.

Every command that writes results (analyze, evaluate, compare, splits, study, the snapshot index) writes
each text file through :func:`write_atomic` and each ``torch.save`` file (checkpoints, snapshots, adapted
weights, adapters) through :func:`save_atomic`, both (and the PNG figures) through :func:`atomic_path`, so an interrupted run never leaves a half-written file
that a later run or nnU-Net would read.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside PATH to write to: moved onto PATH when the block ends, removed if it fails.

    Blocks nest: a file written inside another's block lands first, the outer one only if it did (two files,
    both or neither, as ``weights adapt`` writes its weights and their report)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    """Write TEXT to PATH through a temporary file beside it and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_atomic(path: str | Path, obj: Any) -> Path:
    """``torch.save`` OBJ to PATH through a temporary file beside it and a rename (nothing half-written)."""
    import torch  # here, not at the top: the commands that write text only do not load torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def plain(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays -> Python, NaN/inf -> None, Path -> str, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
