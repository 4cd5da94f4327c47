"""``nnunet_transfer doctor``: find what stands between this environment and ``-tr nnUNetTrainer…``.

Each problem is printed with the exact line that fixes it; the exit code is 1 when any is found.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import dataclass

from nnunet_transfer.environment import ext_trainer_folder
from nnunet_transfer.runtime import install_startup_hint, remove_startup_hint


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version_check() -> Check:
    try:
        from importlib.metadata import version

        v = version("nnunetv2")
    except Exception:  # noqa: BLE001 - any failure means the same thing here
        return Check("nnunetv2", False, "nnunetv2 is not installed", "pip install 'nnunetv2>=2.8,<2.9'")
    parts = tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
    ok = parts[:2] == (2, 8)
    return Check("nnunetv2", ok, f"nnunetv2 {v}" + ("" if ok else " (need 2.8.x: external trainer "
                                                    "discovery and the 2.7+ network-builder signature)"),
                 "" if ok else "pip install 'nnunetv2>=2.8,<2.9'")


def _path_checks() -> list[Check]:
    out = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        if not value:
            out.append(Check(var, False, f"{var} is not set", f"export {var}=/path/to/{var}"))
        elif not os.path.isdir(value):
            out.append(Check(var, False, f"{var}={value} does not exist", f"mkdir -p {value}"))
        else:
            out.append(Check(var, True, f"{var}={value}"))
    return out


def _ext_trainer_check(folder: str) -> Check:
    value = os.environ.get("nnUNet_extTrainer", "")
    paths = [os.path.realpath(p) for p in value.split(os.pathsep) if p.strip()]
    if os.path.realpath(folder) in paths:
        return Check("nnUNet_extTrainer", True, f"nnUNet_extTrainer contains {folder}")
    fix = ("export nnUNet_extTrainer=$(nnunet_transfer trainer-path)" if not value else
           f'export nnUNet_extTrainer="$nnUNet_extTrainer{os.pathsep}$(nnunet_transfer trainer-path)"')
    return Check("nnUNet_extTrainer", False,
                 f"nnUNet_extTrainer={value or '<unset>'} does not contain {folder}; nnUNetv2_train and "
                 f"nnUNetv2_predict will not find this package's trainers", fix)


def _torchvision_check() -> Check:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report whatever breaks the import
        import torch

        return Check("torchvision", False,
                     f"torchvision does not import ({type(e).__name__}: {e}); nnU-Net's trainer search "
                     f"imports it and crashes before reaching external trainers",
                     f"pip install torchvision matching torch {torch.__version__} (e.g. torch==2.14.1 "
                     f"with torchvision==0.29.1)")
    return Check("torchvision", True, f"torchvision {torchvision.__version__} imports")


def _lookup_checks() -> list[Check]:
    from nnunet_transfer.trainers import __all__ as names

    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except Exception as e:  # noqa: BLE001
        return [Check("trainer lookup", False, f"nnU-Net's trainer lookup does not import: {e}",
                      "pip install 'nnunetv2>=2.8,<2.9'")]
    out = []
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cls = recursive_find_trainer_class_by_name(name)
            ok = cls.__module__.startswith(("nnunet_transfer", "nnunet_transfer_trainers"))
            out.append(Check(f"trainer {name}", ok,
                             f"{name} resolves to {cls.__module__}.{cls.__qualname__}" +
                             ("" if ok else " — a class of the same name shadows ours"),
                             "" if ok else "remove or rename the other class of that name"))
        except Exception as e:  # noqa: BLE001 - nnU-Net raises RuntimeError or import errors
            out.append(Check(f"trainer {name}", False,
                             f"nnU-Net cannot resolve {name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}",
                             "export nnUNet_extTrainer=$(nnunet_transfer trainer-path)"))
    return out


def run_checks() -> list[Check]:
    checks = [_version_check(), *_path_checks(), _ext_trainer_check(str(ext_trainer_folder())),
              _torchvision_check()]
    if checks[0].ok and checks[-1].ok:
        checks += _lookup_checks()
    return checks


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check the environment nnU-Net needs to find these trainers",
                       description="Check nnunetv2's version, nnU-Net's folder variables, "
                                   "nnUNet_extTrainer, torchvision, and that nnU-Net's own lookup "
                                   "resolves every trainer of this package. Exit 1 on any problem.")
    hints = p.add_mutually_exclusive_group()
    hints.add_argument("--install-hints", action="store_true",
                       help="opt in: one-line errors for a misspelt -tr/-p/-c in nnUNetv2_predict too (writes "
                            "nnunet_transfer_hints.pth into this environment's site-packages; only nnUNetv2_train "
                            "and nnUNetv2_predict processes are affected)")
    hints.add_argument("--remove-hints", action="store_true", help="delete that file again")
    p.add_argument("--site-dir", default=None, help=argparse.SUPPRESS)  # tests: another site folder
    p.set_defaults(func=run)


def run(args) -> int:
    if args.remove_hints:
        path, existed = remove_startup_hint(args.site_dir)
        print(f"removed {path}" if existed else f"{path} was not installed")
        return 0
    if args.install_hints:
        path = install_startup_hint(args.site_dir)
        print(f"wrote {path}: nnUNetv2_train and nnUNetv2_predict now print misspelt trainer names as one line")
        return 0
    checks = run_checks()
    for c in checks:
        print(f"[{'ok' if c.ok else 'PROBLEM'}] {c.detail}")
        if not c.ok and c.fix:
            print(f"    fix: {c.fix}")
    problems = [c for c in checks if not c.ok]
    print(f"{len(problems)} problem(s) found" if problems else "all checks passed")
    return 1 if problems else 0
