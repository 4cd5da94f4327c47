"""Where nnU-Net finds this package's trainers, and the one environment nnU-Net's programs are started with.

nnU-Net's ``nnUNetv2_train`` and ``nnUNetv2_predict`` look trainers up by class name in the folders of
``nnUNet_extTrainer``; :func:`ext_trainer_folder` is ours (it holds the single shim module, ``_ext/``).
:func:`nnunet_environment` builds the environment of every nnU-Net program this package starts — the demo, the
tests and benchmarks (in a workspace folder) and ``study run`` (in the user's folders). It imports no more than
the standard library and :mod:`nnunet_transfer.nnunet_io`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from nnunet_transfer.errors import DataError
from nnunet_transfer.nnunet_io import ENV_VARS, env_folder

#: folders of a workspace ``root`` (:func:`nnunet_environment`) for nnU-Net's three variables
WORKSPACE_FOLDERS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
#: small machines (the demo, the tests, the benchmarks): one worker for preprocessing/export, no torch.compile.
#: Data augmentation in the main process is set per command (``pipeline.TRAIN_ENV``): planning crashes with
#: ``nnUNet_n_proc_DA=0``.
SMALL_MACHINE = {"nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}


def ext_trainer_folder() -> Path:
    """Folder holding the single shim module that re-exports this package's trainers."""
    return Path(__file__).resolve().parent / "_ext"


def with_ext_trainer(value: str | None) -> str:
    """``nnUNet_extTrainer`` with this package's folder first, unless it is already one of its folders: a
    user's own trainer folders are kept."""
    ours = str(ext_trainer_folder())
    current = [p for p in (value or "").split(os.pathsep) if p]
    return os.pathsep.join(current if ours in current else [ours, *current])


def nnunet_environment(root: str | Path | None = None, base: Mapping[str, str] | None = None, *,
                       defaults: Mapping[str, str] | None = None,
                       extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an nnU-Net program started by this package: ``base`` (default: this process's) with

    * nnU-Net's three folders: with ``root``, ``root/raw``, ``root/preprocessed``, ``root/results`` (created);
      without, the ones ``base`` names, or, with no ``base`` either, this process's (each must be set and
      exist; made absolute);
    * this package's trainers on ``nnUNet_extTrainer`` (:func:`with_ext_trainer`: put first unless there);
    * ``defaults`` where the variable is not set (e.g. :data:`SMALL_MACHINE`), ``PYTHONUNBUFFERED=1`` (logs
      as they happen), and ``extra`` last, over everything (a study file's ``[environment]``).
    """
    env = dict(os.environ if base is None else base)
    if root is not None:
        root = Path(root).resolve()
        for var, sub in WORKSPACE_FOLDERS.items():
            (root / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(root / sub)
    else:
        for var in ENV_VARS:
            if base is None:
                env[var] = str(env_folder(var).resolve())
            elif not env.get(var):
                raise DataError(f"environment variable {var} is not set for nnU-Net's programs; "
                                f"fix: export {var}=/path/to/{var}")
    env["nnUNet_extTrainer"] = with_ext_trainer(env.get("nnUNet_extTrainer"))
    for var, value in (defaults or {}).items():
        env.setdefault(var, value)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


__all__ = ["WORKSPACE_FOLDERS", "SMALL_MACHINE", "ext_trainer_folder", "with_ext_trainer", "nnunet_environment"]
