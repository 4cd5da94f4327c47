"""Run nnU-Net's own command-line programs as subprocesses, with logs, for the demo and the tests.

nnU-Net's output goes to one log file per step; a failing step raises :class:`TransferError` with the
log's last lines, so a broken pipeline says where and why. The environment they run in is
:func:`nnunet_transfer.environment.nnunet_environment` (with :data:`~nnunet_transfer.environment.SMALL_MACHINE`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_transfer.errors import TransferError


def executable(name: str) -> str:
    """An nnU-Net/nnunet_transfer console script: next to this Python first, then on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise TransferError(f"program {name!r} not found next to {sys.executable} or on PATH; "
                            f"is nnunetv2 installed in this environment? (pip install 'nnunetv2>=2.8,<2.9')")
    return found


def _die_with_parent(parent: int):
    """The child's ``preexec_fn`` on Linux: SIGKILL when the process that started it dies (``prctl``
    PR_SET_PDEATHSIG; it survives ``exec``). Without it a ``kill -9`` of ``study run`` would leave its
    ``nnUNetv2_train`` writing into a fold whose lock the kernel has just released to the next process."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here, before fork: nothing to import after
    except (OSError, AttributeError):  # not Linux
        return None

    kill = int(signal.SIGKILL)

    def preexec():
        prctl(1, kill)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def run_step(args: Sequence[str], *, env: Mapping[str, str], log: str | Path, what: str,
             extra_env: Mapping[str, str] | None = None, tail: int = 25) -> float:
    """Run one program, output to ``log``; returns wall seconds; raises with the log tail on failure. The
    program dies with this process (Linux), however this process dies."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [executable(args[0]), *map(str, args[1:])]
    full_env = {**env, **(extra_env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent(os.getpid()))
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()[-tail:]
        raise TransferError(f"{what} failed (exit {proc.returncode}); see {log}. Last lines:\n"
                            + "\n".join("    " + ln for ln in lines))
    return elapsed


def train_args(dataset: str | int, configuration: str, fold: int | str, trainer: str, *,
               pretrained: str | Path | None = None, cont: bool = False, device: str = "cpu",
               plans: str = "nnUNetPlans") -> list[str]:
    args = ["nnUNetv2_train", str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans,
            "-device", device]
    if pretrained is not None:
        args += ["-pretrained_weights", str(pretrained)]
    if cont:
        args.append("--c")
    return args


TRAIN_ENV = {"nnUNet_n_proc_DA": "0"}
