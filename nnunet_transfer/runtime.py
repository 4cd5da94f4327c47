"""Everything this package does to the Python process it runs in, each installed by one named function.

Our trainers run inside nnU-Net's own programs (``nnUNetv2_train``, ``nnUNetv2_predict``), which give them no
hook for what they need before nnU-Net acts; these are the places where the package reaches into the process
instead. Each is legitimate; all of them are here, so that none is a surprise.

Effect on the process → the function that does it → when:

* reads ``sys.argv`` of ``nnUNetv2_train`` (``-pretrained_weights``, ``--c``, ``--val``) →
  :func:`nnunet_train_args`, :func:`pretrained_weights_argument` → a trainer's ``__init__`` and
  ``on_train_start``: ``-pretrained_weights`` is checked before nnU-Net creates folders (nnU-Net never tells
  the trainer which file it loads).
* replaces ``nnunetv2.run.run_training.load_pretrained_weights`` with a wrapper that swaps the file name and
  calls nnU-Net's own → :func:`redirect_nnunet_loader` → a trainer's ``__init__``, when ``-pretrained_weights``
  names a fold or model folder rather than the file; for an nnssl checkpoint the wrapper calls this package's
  loader instead (encoder and stem only).
* sets torch's CPU thread count when ``NNUNET_TRANSFER_CPU_THREADS`` is set → :func:`apply_cpu_threads` → a
  trainer's ``__init__`` on the CPU: ``nnUNetv2_train -device cpu`` sets ``torch.set_num_threads(cpu_count())``
  before it builds the trainer, so neither ``OMP_NUM_THREADS`` nor anything else reaches it.
* replaces ``sys.excepthook`` (our ``TransferError`` and a misspelt trainer or model folder print as one line)
  → :func:`install_excepthook` → when nnU-Net imports the ``nnUNet_extTrainer`` shim (``_ext/``), or at
  start-up (next item).
* writes ``nnunet_transfer_hints.pth`` into site-packages, whose line runs :func:`install_hint_hook` at every
  Python start-up; that installs the excepthook in ``nnUNetv2_train`` / ``nnUNetv2_predict`` only →
  :func:`install_startup_hint`, :func:`remove_startup_hint` → ``nnunet_transfer doctor --install-hints`` /
  ``--remove-hints`` (opt-in).

What these functions know of nnU-Net (its option names, that ``maybe_load_checkpoint`` looks the loader up in
its module globals) is guarded in :mod:`nnunet_transfer.nnunet_compat`.

This module is imported by the start-up file in *every* Python process of the environment: it imports only
the standard library and :mod:`nnunet_transfer.errors` at the top; the rest is imported by the function that
needs it, when it runs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from nnunet_transfer.errors import DataError, TransferError

#: program names under which ``sys.argv`` is nnU-Net's training command line
TRAIN_PROGRAMS = ("nnUNetv2_train", "run_training.py")
#: nnU-Net's programs in which the start-up file installs the excepthook
HINT_PROGRAMS = ("nnUNetv2_train", "nnUNetv2_predict")
#: the start-up file and its one line (Python's ``site`` runs lines of ``.pth`` files that start with ``import``)
PTH_NAME = "nnunet_transfer_hints.pth"
PTH_LINE = "import nnunet_transfer._hints as _h; _h.install()\n"


# --------------------------------------------------------------------------- sys.argv
class TrainArgs(NamedTuple):
    pretrained: str | None  # the -pretrained_weights argument as given
    cont: bool  # --c
    val: bool  # --val


def _train_flags() -> dict:
    from nnunet_transfer.nnunet_compat import TRAIN_FLAGS  # lazy: torch; every Python start-up may import runtime

    return TRAIN_FLAGS


def nnunet_train_args(argv: list[str] | None = None) -> TrainArgs | None:
    """The parts of ``nnUNetv2_train``'s command line that decide what a trainer starts from.

    ``None`` when this process is not ``nnUNetv2_train`` (tests, notebooks, ``nnUNetv2_predict``).
    """
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in TRAIN_PROGRAMS:
        return None
    flags = _train_flags()
    pretrained = None
    for i, a in enumerate(argv[:-1]):
        if a in flags["pretrained"]:
            pretrained = argv[i + 1]
    return TrainArgs(pretrained, flags["continue"] in argv, flags["validate"] in argv)


def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """The file given to ``-pretrained_weights`` (absolute; None if not given), whatever the program name."""
    argv = sys.argv if argv is None else argv
    flags = _train_flags()
    for i, a in enumerate(argv[:-1]):
        if a in flags["pretrained"]:
            return os.path.abspath(argv[i + 1])
    return None


# --------------------------------------------------------------------------- nnU-Net's loader
def redirect_nnunet_loader(given: str, resolved: Path, loader=None) -> bool:
    """Make ``nnUNetv2_train`` load ``resolved`` when its command line names the folder ``given``, and load it with
    ``loader(network, path, verbose=...)`` instead of nnU-Net's own function when one is given (an nnssl
    checkpoint: its encoder and stem only, where nnU-Net's would load the pretraining decoder too).

    ``maybe_load_checkpoint`` in ``nnunetv2.run.run_training`` looks ``load_pretrained_weights`` up in
    its module globals at call time; it gets a wrapper that swaps the path and calls nnU-Net's own
    function — what is loaded and how stays nnU-Net's for every other file. Returns whether a redirect
    was installed.
    """
    if Path(given) == resolved and loader is None:
        return False
    module = sys.modules.get("nnunetv2.run.run_training")
    if module is None:
        return False
    original = getattr(module, "load_pretrained_weights")
    original = getattr(original, "_nnunet_transfer_original", original)

    def load_pretrained_weights(network, fname, verbose=False):
        if os.path.abspath(str(fname)) == os.path.abspath(given):
            if loader is not None:
                return loader(network, str(resolved), verbose=verbose)
            fname = str(resolved)
        return original(network, fname, verbose=verbose)

    load_pretrained_weights._nnunet_transfer_original = original
    module.load_pretrained_weights = load_pretrained_weights
    return True


# --------------------------------------------------------------------------- sys.excepthook
CPU_THREADS_VAR = "NNUNET_TRANSFER_CPU_THREADS"


def apply_cpu_threads(device) -> int | None:
    """With ``NNUNET_TRANSFER_CPU_THREADS=n``, a CPU training run uses n torch threads instead of nnU-Net's every core:
    runs sharing a machine (two test workers, a study's ``--processes``) do not oversubscribe its cores, and a run
    with one thread is bit-reproducible under any load (two threads are not: their float32 sums differ in the last
    bit when the machine is loaded). Unset: nnU-Net's choice stands. Returns the count set, None when untouched."""
    text = os.environ.get(CPU_THREADS_VAR)
    if not text or getattr(device, "type", str(device)) != "cpu":
        return None
    n = int(text) if text.strip().isdigit() else 0
    if n < 1:
        raise DataError(f"{CPU_THREADS_VAR}={text!r} is not a positive number of torch threads for CPU training; set "
                        f"e.g. {CPU_THREADS_VAR}=1, or unset it for nnU-Net's default (every core)")
    import torch  # the start-up file imports this module in every process: torch only when a trainer runs

    torch.set_num_threads(n)
    return n


def install_excepthook() -> None:
    """Print our errors (and nnU-Net's for a misspelt trainer or model folder) as one line; once per process.

    * a :class:`~nnunet_transfer.errors.TransferError` (a bad setting, an incompatible ``-pretrained_weights``
      file, a refused strategy) prints as ``nnunet_transfer: error: …``;
    * nnU-Net's "Could not find requested nnunet trainer X" names the closest trainers and the
      ``nnUNet_extTrainer`` in effect; a missing model folder in ``nnUNetv2_predict`` names the models that
      exist (messages: :mod:`nnunet_transfer.trainer_messages`);
    * anything else goes to the previous hook. The process still exits non-zero.
    """
    previous = sys.excepthook
    if getattr(previous, "_nnunet_transfer", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, TransferError):
            print(f"nnunet_transfer: error: {exc}", file=sys.stderr)
            return
        if issubclass(exc_type, (RuntimeError, FileNotFoundError)):
            try:
                # imported when an error reaches the hook: the start-up file installs it in every run
                from nnunet_transfer.nnunet_compat import TRAINER_NOT_FOUND  # lazy: torch, only on an error
                from nnunet_transfer.trainer_messages import (  # lazy: torch, only on an error
                    missing_model_message, unknown_trainer_message)

                message = None
                if issubclass(exc_type, RuntimeError):
                    m = TRAINER_NOT_FOUND.search(str(exc))
                    message = unknown_trainer_message(m.group(1)) if m else None
                elif getattr(exc, "filename", None):
                    message = missing_model_message(str(exc.filename))
            except Exception:  # noqa: BLE001 - never hide nnU-Net's own error behind a failing hint
                message = None
            if message:
                print(f"nnunet_transfer: error: {message}", file=sys.stderr)
                return
        previous(exc_type, exc, tb)

    hook._nnunet_transfer = True
    sys.excepthook = hook


# --------------------------------------------------------------------------- the start-up file
def startup_hint_file(site_dir: str | None = None) -> Path:
    """Where :func:`install_startup_hint` writes (this environment's site-packages unless ``site_dir``)."""
    import sysconfig

    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_startup_hint(site_dir: str | None = None) -> Path:
    """Write the start-up file (``doctor --install-hints``); returns its path."""
    path = startup_hint_file(site_dir)
    if not path.parent.is_dir():
        raise DataError(f"site-packages folder {path.parent} does not exist")
    try:
        path.write_text(PTH_LINE)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror}; run it in an environment you may write to") from None
    return path


def remove_startup_hint(site_dir: str | None = None) -> tuple[Path, bool]:
    """Delete the start-up file (``doctor --remove-hints``); returns its path and whether it existed."""
    path = startup_hint_file(site_dir)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return path, existed


def install_hint_hook(argv: list[str] | None = None) -> bool:
    """What the start-up file runs: :func:`install_excepthook` in ``nnUNetv2_train`` / ``nnUNetv2_predict``
    processes only (``nnUNetv2_predict`` looks for the model folder before it imports any external trainer,
    so the shim's hook would come too late there). Returns whether it installed the hook."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in HINT_PROGRAMS:
        return False
    install_excepthook()
    return True


__all__ = ["CPU_THREADS_VAR", "apply_cpu_threads", "TRAIN_PROGRAMS", "HINT_PROGRAMS", "PTH_NAME", "PTH_LINE",
           "TrainArgs", "nnunet_train_args", "pretrained_weights_argument", "redirect_nnunet_loader", "install_excepthook", "startup_hint_file",
           "install_startup_hint", "remove_startup_hint", "install_hint_hook"]
