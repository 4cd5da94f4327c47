"""What a study knows about its runs, all of it in files, so that any process (a rerun, a SLURM job,
``study status``) reads the same truth.

Per run, ``<output>/runs/<run id>/`` holds

* ``run.json`` — the run's **definition** (dataset, base configuration, trainer, every setting that is
  not schedule-only, the pretrained checkpoint's SHA-256, the fold's training / validation / test cases),
  written when the run first starts. A study file edited afterwards in a way that would change a started
  run is refused (:func:`check_definitions`); schedule-only settings (``num_epochs`` …) may change, as
  ``--c`` allows;
* ``state.json`` — the last known state (running / failed / done / submitted), attempts, seconds, job id;
* ``.lock`` + ``.lock.json`` — the run's lock (:mod:`~nnunet_transfer.study.lock`): an ``flock`` the kernel
  releases when the holder dies, and the holder's record (pid, host, process start time, job, heartbeat) that
  says who holds it and lets another host tell a live holder from a dead one. A run whose lock is free but
  whose state says "running" was interrupted;
* ``train_<attempt>.log``, ``predict.log`` — nnU-Net's output; ``pred/`` — the test predictions, renamed
  into place only when complete, with a marker naming the ``checkpoint_final.pth`` they came from;
  ``eval/`` — ``evaluate``'s output, with a marker naming the predictions and the scoring settings.

nnU-Net's own files stay where nnU-Net puts them: ``$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<study>_
<strategy>/fold_<k>/``. A run is **done** when that folder holds ``checkpoint_final.pth`` of at least the
file's ``num_epochs`` and ``pred/`` holds every test case predicted from that checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import env_folder, load_plans
from nnunet_transfer.plans.configure import resolved_configuration
from nnunet_transfer.study.lock import Holder, RunLock, is_locked, lock_holder
from nnunet_transfer.study.model import PREDICT_CHECKPOINTS, Study
from nnunet_transfer.study.table import Run

RUN_FILE, STATE_FILE = "run.json", "state.json"
PRED_MARKER, EVAL_MARKER = ".study_prediction.json", ".study_evaluation.json"
RESUME_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order


# --------------------------------------------------------------------------- files
def write_json(path: Path, content: Any) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise DataError(f"{path} is not valid JSON; it is the study's own record: restore it, or remove the run "
                        f"folder {path.parent} to run it again") from None


def run_dir(study: Study, run: Run) -> Path:
    return study.output / "runs" / run.id


def results_folder(study: Study, run: Run) -> Path:
    return (env_folder("nnUNet_results") / study.dataset / f"{run.trainer}__{study.plans}__{run.configuration}"
            / f"fold_{run.nnunet_fold}")


def read_state(study: Study, run: Run) -> dict:
    return read_json(run_dir(study, run) / STATE_FILE) or {}


def update_state(study: Study, run: Run, **changes) -> dict:
    state = {**read_state(study, run), **changes, "updated": time.time()}
    write_json(run_dir(study, run) / STATE_FILE, state)
    return state


def file_stamp(path: Path) -> dict | None:
    """Size and mtime: what says a checkpoint was rewritten (cheap, unlike hashing hundreds of MB)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- definitions
_HASHES: dict[tuple, str] = {}


def sha256(path: Path) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) for this process."""
    stamp = file_stamp(path)
    key = (str(path), stamp["size"], stamp["mtime_ns"])
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def checkpoint_file(path: Path) -> Path:
    return path / "checkpoint_final.pth" if path.is_dir() else path


def base_configuration_hash(study: Study) -> str:
    """The resolved base configuration (what every run's network and data are made of)."""
    conf = resolved_configuration(load_plans(study.dataset, study.plans), study.configuration)
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()


def definition(study: Study, run: Run, base_hash: str) -> dict:
    """Everything that makes a run what it is; schedule-only settings are kept apart (they may change)."""
    resumable = TransferConfig.resumable_keys()
    settings = study.effective_settings(run.strategy)
    ckpt = None
    if run.strategy.pretrained is not None:
        path = checkpoint_file(study.pretrained[run.strategy.pretrained])
        ckpt = {"name": run.strategy.pretrained, "path": str(path), "sha256": sha256(path)}
    return {"dataset": study.dataset, "plans": study.plans, "base_configuration": study.configuration,
            "base_configuration_sha256": base_hash, "configuration": run.configuration, "trainer": run.trainer,
            "settings": {k: v for k, v in sorted(settings.items()) if k not in resumable},
            "pretrained": ckpt, "nnunet_fold": run.nnunet_fold, "n_train": run.n_train, "train": list(run.train),
            "val": list(run.val), "test": list(run.test)}


def _difference(old: dict, new: dict) -> str:
    if old.get("settings") != new.get("settings"):
        a, b = old.get("settings") or {}, new.get("settings") or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "settings " + ", ".join(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys)
    if old.get("pretrained") != new.get("pretrained"):
        o, n = old.get("pretrained") or {}, new.get("pretrained") or {}
        if o.get("sha256") and n.get("sha256") and o.get("path") == n.get("path"):
            return f"the pretrained checkpoint {n['path']} was replaced (its SHA-256 differs)"
        return f"pretrained {o.get('path', 'none')} -> {n.get('path', 'none')}"
    for key, what in (("trainer", "trainer"), ("dataset", "target"), ("base_configuration", "configuration"),
                      ("plans", "plans")):
        if old.get(key) != new.get(key):
            return f"{what} {old.get(key)!r} -> {new.get(key)!r}"
    if old.get("base_configuration_sha256") != new.get("base_configuration_sha256"):
        return f"the base configuration {new['base_configuration']!r} in the plans changed (re-planned?)"
    if (old.get("train"), old.get("val"), old.get("test")) != (new.get("train"), new.get("val"), new.get("test")):
        return (f"its cases (n_train {old.get('n_train')} -> {new.get('n_train')}, or another test set, validation "
                f"set, seed or size list moved the fold)")
    return "its definition"


def existing_definitions(study: Study) -> dict[tuple, tuple[str, dict]]:
    """``{(configuration, trainer, nnU-Net fold): (run id, definition)}`` of every run ever started here."""
    out = {}
    root = study.output / "runs"
    if root.is_dir():
        for d in sorted(root.iterdir()):
            content = read_json(d / RUN_FILE) if d.is_dir() else None
            if content:
                out[(content["configuration"], content["trainer"], content["nnunet_fold"])] = (d.name, content)
    return out


def check_definitions(study: Study, runs: list[Run]) -> dict[str, dict]:
    """Definitions of the table's runs; refuses (one message) when a started run's definition changed, or
    when a results folder a run would use exists without this study having started it."""
    base_hash = base_configuration_hash(study)
    existing = existing_definitions(study)
    defs, changed = {}, []
    for run in runs:
        d = definition(study, run, base_hash)
        defs[run.id] = d
        old = existing.get((run.configuration, run.trainer, run.nnunet_fold))
        if old is not None and old[1] != d:
            changed.append(f"run {old[0]}: {_difference(old[1], d)}")
        elif old is None and results_folder(study, run).exists() and _started_meanwhile(study, run) is None:
            raise DataError(f"results folder {results_folder(study, run)} exists but study {study.name!r} never "
                            f"started run {run.id} in it (an earlier study of that name, or a hand-made run); "
                            f"remove that folder, or give the study another [study] name")
    if changed:
        more = f" (and {len(changed) - 1} more run(s))" if len(changed) > 1 else ""
        raise ConfigError(f"study file {study.path} changed after runs started, in a way that would change finished "
                          f"or running runs: {changed[0]}{more}. A started run keeps its definition; restore the "
                          f"file, or put the new definition in a new study (another [study] name and output). "
                          f"Only schedule settings ({', '.join(sorted(_resumable()))}) may change")
    return defs


def _started_meanwhile(study: Study, run: Run) -> dict | None:
    # another `study run` may have started the run since existing_definitions() read the folders
    return read_json(run_dir(study, run) / RUN_FILE)


def _resumable() -> frozenset[str]:
    return TransferConfig.resumable_keys()


# --------------------------------------------------------------------------- progress
_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r": Epoch time: ")


def epochs_done(fold: Path) -> int | None:
    """Epochs finished, from nnU-Net's newest training log (``Epoch N`` ... ``Epoch time``) — no checkpoint
    needs loading to know it."""
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime) if fold.is_dir() else []
    if not logs:
        return None
    current, done = None, None
    with open(logs[-1], errors="replace") as f:
        for line in f:
            m = _EPOCH.search(line)
            if m:
                current = int(m.group(1))
            elif current is not None and _EPOCH_TIME.search(line):
                done = current + 1
    return done


def prediction_current(study: Study, run: Run) -> bool:
    """``pred/`` is complete and made from the current ``checkpoint_final.pth``'s run, with the file that
    ``[predict] checkpoint`` names (a marker without ``chk`` is from ``checkpoint_final.pth``)."""
    pred = run_dir(study, run) / "pred"
    marker = read_json(pred / PRED_MARKER) if pred.is_dir() else None
    final = file_stamp(results_folder(study, run) / "checkpoint_final.pth")
    return (bool(marker) and final is not None and marker.get("checkpoint") == final
            and marker.get("chk", "checkpoint_final.pth") == PREDICT_CHECKPOINTS[study.predict_checkpoint])


def evaluation_key(study: Study, run: Run) -> dict:
    pred_marker = read_json(run_dir(study, run) / "pred" / PRED_MARKER) or {}
    sc = study.scoring
    return {"prediction": pred_marker.get("checkpoint"), "labels": None if sc.labels is None else list(sc.labels),
            "nsd_tolerance": sc.nsd_tolerance, "lesion_connectivity": sc.lesion_connectivity}


def evaluation_current(study: Study, run: Run) -> bool:
    ev = run_dir(study, run) / "eval"
    return (ev / "summary.json").is_file() and read_json(ev / EVAL_MARKER) == evaluation_key(study, run)


@dataclass
class Progress:
    run: Run
    state: str            # done, running, queued, interrupted, trained, failed, pending
    epochs: int | None    # finished epochs (nnU-Net's log)
    seconds: float | None
    job_id: str | None
    detail: str = ""
    trained: bool = False  # checkpoint_final with enough epochs
    resume: bool = False   # a checkpoint --c continues from
    predicted: bool = False
    holder: Holder | None = None  # who executes it now (state "running")

    @property
    def done(self) -> bool:
        return self.state == "done"


def progress(study: Study, run: Run, *, job_alive=None, locked: bool | None = None) -> Progress:
    """The run's state from its files (module docstring). ``job_alive(state) -> bool | None`` says whether a
    submitted job (or the job of another host's lock holder) still exists (None: unknown); ``locked``: known
    already (the caller holds the lock)."""
    folder, fold = run_dir(study, run), results_folder(study, run)
    state = read_state(study, run)
    final = (fold / "checkpoint_final.pth").is_file()
    enough = final and (state.get("epochs_trained") or run.num_epochs) >= run.num_epochs
    resume = any((fold / c).is_file() for c in RESUME_CHECKPOINTS)
    predicted = enough and prediction_current(study, run)
    epochs = epochs_done(fold)
    seconds = state.get("seconds")
    holder = lock_holder(folder, job_alive=job_alive) if locked is None else None
    running = holder is not None if locked is None else locked
    if running and state.get("attempt_started"):
        seconds = (seconds or 0.0) + time.time() - state["attempt_started"]
    job = state.get("job_id")
    p = Progress(run=run, state="pending", epochs=epochs, seconds=seconds, job_id=job, trained=enough,
                 resume=resume, predicted=predicted, holder=holder)
    if running:
        p.state = "running"
        p.detail = f"held by {holder.describe()}" if holder is not None else ""
    elif predicted:
        p.state = "done"
    elif state.get("state") == "failed":
        p.state, p.detail = "failed", f"{state.get('error', '')}".splitlines()[0][:200] if state.get("error") else ""
    elif state.get("state") == "submitted":
        alive = job_alive(state) if job_alive is not None else None
        p.state = "queued" if alive is not False else "lost"
        if alive is False:
            p.detail = f"job {job} ended without running it; `study run` submits it again"
    elif final and not enough:
        p.state = "extend"
        p.detail = f"trained {state.get('epochs_trained')} epochs, the file now asks {run.num_epochs}"
    elif final:
        p.state = "trained"
        p.detail = "predictions missing or older than checkpoint_final"
    elif resume and paused_after(fold) is not None:
        p.state, p.detail = "paused", f"paused after epoch {paused_after(fold)} (racing rung)"
    elif resume or state.get("state") == "running":
        p.state = "interrupted"
    return p


def paused_after(fold: Path) -> int | None:
    """The completed epochs of a run that paused (setting ``pause_at``; ``transfer_config.json`` says so) and has
    not finished since, or None."""
    if (fold / "checkpoint_final.pth").is_file():
        return None
    record = read_json(fold / "transfer_config.json") if (fold / "transfer_config.json").is_file() else None
    paused = (record or {}).get("paused")
    return int(paused["after_epoch"]) if paused else None


def host_pid() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


__all__ = ["Holder", "lock_holder", "run_dir", "results_folder", "read_state", "update_state", "check_definitions", "definition",
           "RunLock", "is_locked", "progress", "Progress", "epochs_done", "prediction_current", "evaluation_current",
           "evaluation_key", "write_json", "paused_after", "read_json", "file_stamp", "sha256", "checkpoint_file",
           "PRED_MARKER", "EVAL_MARKER", "RUN_FILE", "STATE_FILE"]
