"""``study run``: train, predict and score every run, resumably, here or as SLURM jobs (submitit).

One run is :func:`execute_run`: ``nnUNetv2_train`` (fresh with ``-pretrained_weights``, or ``--c`` from the
checkpoint an interrupted attempt left), ``nnUNetv2_predict`` on the fold's test cases, ``evaluate``. Each
program is a subprocess with its own log, so the study process itself never holds a network, a dataset
or more than one case of evaluation in memory. A run whose files say it is done is skipped; one whose
lock another live process holds is left alone ("held", not failed: the summary says by which pid on which
host); a failing program marks the run failed with its log, and the others go on. Locks and states live in
files (:mod:`~nnunet_transfer.study.state`, :mod:`~nnunet_transfer.study.lock`), which is what makes a
second ``study run`` — on this machine or in a SLURM job — never train anything twice, and what lets it take
over the lock of a holder that was killed. Concurrent ``study run`` processes plan one after the other
(an ``flock`` on the study file): planning writes the splits, plans and test folders they share.

``--executor slurm`` submits the runs that are not done as one job array through submitit (resources
from the file's ``[slurm]``); each job runs :class:`RunJob`, i.e. :func:`execute_run` on the node. Jobs
are :class:`submitit.helpers.Checkpointable`: at a time limit or a preemption submitit requeues them,
and the requeued job continues the run with ``--c``. ``cluster="local"`` is submitit's LocalExecutor —
the same code path, with the jobs as local processes (the tests use it).
"""
from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import submitit

from nnunet_transfer import pipeline  # pipeline.run_step looked up at call time: the tests' fake programs
from nnunet_transfer.environment import nnunet_environment
from nnunet_transfer.errors import ConfigError, TransferError
from nnunet_transfer.experiments.evaluate import evaluate_folders
from nnunet_transfer.nnunet_io import load_dataset_json
from nnunet_transfer.study.model import PREDICT_CHECKPOINTS, Study
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.read_execution import SLURM_KEYS
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import (EVAL_MARKER, PRED_MARKER, RUN_FILE, RunLock, base_configuration_hash,
                                         definition, evaluation_current, evaluation_key, file_stamp, host_pid, paused_after, progress,
                                         read_json, read_state, results_folder, run_dir, update_state, write_json)
from nnunet_transfer.study.table import Run, build_table, plan_study_splits, test_folder

EXECUTORS = ("local", "slurm")
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                       "REQUEUE_HOLD", "REQUEUE_FED")
DEFAULT_TIMEOUT_MIN = 1440  # sbatch's own default in submitit is 5 minutes


@dataclass
class Outcome:
    run: str
    result: str  # done | skipped | failed | busy (held by another live process) | submitted | queued
    seconds: float = 0.0
    message: str = ""


@dataclass
class RunSummary:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(o.result == result for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "failed"]

    def text(self) -> str:
        names = {"busy": "held by another process"}
        parts = [f"{self.count(k)} {names.get(k, k)}" for k in ("done", "skipped", "paused", "dropped", "submitted",
                                                                "queued", "busy", "failed") if self.count(k)]
        lines = [f"{len(self.outcomes)} runs: " + ", ".join(parts)]
        lines += [f"  held: {o.run}: {o.message}" for o in self.outcomes if o.result == "busy"]
        lines += [f"  failed: {o.run}: {o.message.splitlines()[0] if o.message else ''}" for o in self.failed]
        return "\n".join(lines)


# --------------------------------------------------------------------------- one run
def _predict_args(study: Study, run: Run, out: Path, images: Path | None = None) -> list:
    images = images if images is not None else test_folder(study, run.fold) / "imagesTs"
    args = ["nnUNetv2_predict", "-i", images, "-o", out, "-d", study.dataset,
            "-c", run.configuration, "-f", run.nnunet_fold, "-tr", run.trainer, "-p", study.plans,
            "-device", study.device, "-npp", study.predict_processes, "-nps", study.predict_processes,
            "--disable_progress_bar"]
    if study.predict_checkpoint != "final":
        args += ["-chk", PREDICT_CHECKPOINTS[study.predict_checkpoint]]
    return args + (["--disable_tta"] if study.disable_tta else [])


def evaluate_run(study: Study, run: Run) -> Path:
    """``evaluate`` of the run's predictions against its test labels, into ``runs/<id>/eval``."""
    folder = run_dir(study, run)
    out = folder / "eval"
    sc = study.scoring
    # one case in memory at a time (num_processes=1): a study's memory is one run's worth
    evaluate_folders(folder / "pred", test_folder(study, run.fold) / "labelsTs", out, labels=sc.labels,
                     nsd_tolerance=sc.nsd_tolerance, connectivity=sc.lesion_connectivity, num_processes=1,
                     run=results_folder(study, run), progress=False)
    write_json(out / EVAL_MARKER, evaluation_key(study, run))
    return out


SOURCE_PRED, SOURCE_EVAL = "source_pred", "source_eval"


def source_before(study: Study, env: dict) -> Path:
    """The source model's predictions of [source_test]'s images (``OUTPUT/source_test/before``), made once with
    ``nnUNetv2_predict_from_modelfolder`` from the [pretrained] entry's fold folder and checkpoint."""
    st = study.source_test
    out = study.output / "source_test" / "before"
    if (out / PRED_MARKER).is_file():
        return out
    given = Path(study.pretrained[st.pretrained])
    fold, chk = (given, "checkpoint_final.pth") if given.is_dir() else (given.parent, given.name)
    if not fold.name.startswith("fold_"):
        raise TransferError(f"[source_test] pretrained = {st.pretrained!r}: {given} is not in a fold folder of an "
                            f"nnU-Net model folder (TRAINER__PLANS__CONFIGURATION/fold_N), which "
                            f"nnUNetv2_predict_from_modelfolder needs to predict the source's test set")
    partial = out.with_name(f"before.partial.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    args = ["nnUNetv2_predict_from_modelfolder", "-i", st.images, "-o", partial, "-m", fold.parent,
            "-f", fold.name[len("fold_"):], "-chk", chk, "-device", study.device, "-npp", study.predict_processes,
            "-nps", study.predict_processes, "--disable_progress_bar"] + (["--disable_tta"] if study.disable_tta else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline.run_step(args, env=env, log=out.parent / "before.log", what="nnUNetv2_predict of the source model on "
                                                                          "[source_test]")
    write_json(partial / PRED_MARKER, {"checkpoint": file_stamp(fold / chk)})
    if (out / PRED_MARKER).is_file():  # another study process was quicker: its predictions are the same
        shutil.rmtree(partial, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        partial.replace(out)
    return out


def forgetting_run(study: Study, run: Run, env: dict) -> Path:
    """The run's model on [source_test]'s images, scored against the source model's predictions of them
    (``evaluate --before``) into ``runs/<id>/source_eval``: the old classes' Dice before and after."""
    st = study.source_test
    before = source_before(study, env)
    folder = run_dir(study, run)
    pred, partial = folder / SOURCE_PRED, folder / f"{SOURCE_PRED}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.run_step(_predict_args(study, run, partial, images=st.images), env=env, log=folder / "source_predict.log",
                      what=f"nnUNetv2_predict of {run.id} on [source_test]")
    shutil.rmtree(pred, ignore_errors=True)
    partial.replace(pred)
    out = folder / SOURCE_EVAL
    evaluate_folders(pred, st.labels, out, labels=st.old_labels, before=before, num_processes=1,
                     run=results_folder(study, run), progress=False)
    return out


def execute_run(study: Study, run: Run, *, definition_: dict | None = None, job_id: str | None = None,
                env: dict | None = None, say: Callable[[str], None] = print, until: int | None = None) -> Outcome:
    """Train (or continue), predict and evaluate one run, unless it is done or another process holds it.

    A run that pauses (setting ``pause_at``, the rungs of [racing]) ends as "paused" after its training;
    ``until``: a rung — a run paused there or later is not trained now (racing trains every run to a rung)."""
    folder = run_dir(study, run)
    lock = RunLock(folder)
    if not lock.acquire(job_id=job_id, job_alive=job_alive):
        message = f"held by {lock.holder.describe()}"
        say(f"skipped {run.id}: {message}")
        return Outcome(run.id, "busy", message=message)
    if lock.took_over:
        holder, why = lock.took_over
        say(f"{run.id}: taking over the lock of {holder.describe()}: {why}")
    try:
        p = progress(study, run, locked=False)  # the lock is ours
        if p.done:
            try:
                if not evaluation_current(study, run):
                    evaluate_run(study, run)
                if study.source_test is not None and not (folder / SOURCE_EVAL / "summary.json").is_file():
                    forgetting_run(study, run, env if env is not None else nnunet_environment(extra=study.environment))
            except Exception as e:  # a scoring problem: the run stays done, the report says it again
                return Outcome(run.id, "failed", message=f"evaluate: {e}")
            return Outcome(run.id, "skipped", message="done")
        fold = results_folder(study, run)
        at = paused_after(fold)
        if until is not None and at is not None and at >= until:
            return Outcome(run.id, "paused", message=f"paused after epoch {at}")
        d = definition_
        saved = read_json(folder / RUN_FILE)
        if saved is None:
            if d is None:
                raise TransferError(f"run {run.id} has no definition to start with (internal: plan first)")
            write_json(folder / RUN_FILE, d)
        elif d is not None and saved != d:
            raise ConfigError(f"run {run.id} was started with another definition than study file {study.path} "
                              f"gives now; restore the file (see {folder / RUN_FILE})")
        env = env if env is not None else nnunet_environment(extra=study.environment)
        state = read_state(study, run)
        attempt = int(state.get("attempt", 0)) + 1
        now = time.time()
        update_state(study, run, state="running", attempt=attempt, attempt_started=now,
                     started=state.get("started", now), job_id=job_id or state.get("job_id"), error=None,
                     **host_pid())
        t0 = time.perf_counter()
        log = None
        try:
            if not p.trained:
                cont = p.resume
                pretrained = None
                if not cont and run.strategy.pretrained is not None:
                    pretrained = study.pretrained[run.strategy.pretrained]
                log = folder / f"train_{attempt}.log"
                what = f"{'continuing' if cont else 'training'} {run.id}"
                say(f"{what} ({run.trainer}, {run.configuration}, fold {run.nnunet_fold}){' with --c' if cont else ''}")
                args = pipeline.train_args(study.dataset, run.configuration, run.nnunet_fold, run.trainer,
                                           pretrained=pretrained, cont=cont, device=study.device, plans=study.plans)
                pipeline.run_step(args, env=env, log=log, what=f"nnUNetv2_train of {run.id}")
                at = paused_after(fold)
                if at is not None:
                    seconds = time.perf_counter() - t0
                    update_state(study, run, state="paused", epochs_trained=at, attempt_started=None, log=None,
                                 seconds=(state.get("seconds") or 0.0) + seconds)
                    say(f"{run.id} paused after epoch {at}")
                    return Outcome(run.id, "paused", seconds, f"paused after epoch {at}")
                if not (fold / "checkpoint_final.pth").is_file():
                    raise TransferError(f"nnUNetv2_train of {run.id} ended without {fold}/checkpoint_final.pth; "
                                        f"see {log}")
            log = folder / "predict.log"
            pred, partial = folder / "pred", folder / "pred.partial"
            shutil.rmtree(partial, ignore_errors=True)
            say(f"predicting {run.id} on {len(run.test)} test cases")
            pipeline.run_step(_predict_args(study, run, partial), env=env, log=log,
                              what=f"nnUNetv2_predict of {run.id}")
            ending = _file_ending(study, run)
            missing = [c for c in run.test if not (partial / f"{c}{ending}").is_file()]
            if missing:
                raise TransferError(f"nnUNetv2_predict of {run.id} wrote no prediction for {', '.join(missing[:5])}; "
                                    f"see {log}")
            write_json(partial / PRED_MARKER, {"checkpoint": file_stamp(fold / "checkpoint_final.pth"),
                                              "chk": PREDICT_CHECKPOINTS[study.predict_checkpoint],
                                              "cases": len(run.test)})
            shutil.rmtree(pred, ignore_errors=True)
            partial.replace(pred)  # the predictions appear complete or not at all
            log = None
            evaluate_run(study, run)
            if study.source_test is not None:
                forgetting_run(study, run, env)
        except Exception as e:  # a program failed (TransferError with its log's tail), or anything else: the
            # run is recorded as failed and the study goes on with the next one
            seconds = time.perf_counter() - t0
            text = str(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {e}"
            update_state(study, run, state="failed", error=text, log=None if log is None else str(log),
                         seconds=(state.get("seconds") or 0.0) + seconds, attempt_started=None)
            say(f"FAILED {run.id}: {text.splitlines()[0] if text else ''}")
            return Outcome(run.id, "failed", seconds, text)
        except BaseException:
            # killed or interrupted: the lock goes with the process; the state says where it stopped
            update_state(study, run, state="interrupted", attempt_started=None,
                         seconds=(state.get("seconds") or 0.0) + time.perf_counter() - t0)
            raise
        seconds = time.perf_counter() - t0
        update_state(study, run, state="done", epochs_trained=run.num_epochs, finished=time.time(),
                     seconds=(state.get("seconds") or 0.0) + seconds, attempt_started=None, log=None)
        return Outcome(run.id, "done", seconds)
    finally:
        lock.release()


def _file_ending(study: Study, run: Run) -> str:
    return load_dataset_json(study.dataset)["file_ending"]


# --------------------------------------------------------------------------- selecting
def select(runs: Sequence[Run], only: str | None) -> list[Run]:
    """``--only``: a strategy name, or a shell pattern over run ids (``finetune__n6__*``)."""
    if not only:
        return list(runs)
    chosen = [r for r in runs if r.strategy.name == only or fnmatch.fnmatchcase(r.id, only)]
    if not chosen:
        examples = ", ".join(r.id for r in runs[:3])
        raise ConfigError(f"--only {only!r} matches none of the {len(runs)} runs (a strategy name or a pattern over "
                          f"run ids, e.g. {examples})")
    return chosen


def job_alive(state: dict) -> bool | None:
    """Whether the job recorded in a run's state still exists (None: cannot tell)."""
    cluster, job = state.get("cluster"), state.get("job_id")
    if not job:
        return None
    if cluster == "local":
        try:
            os.kill(int(str(job).split("_")[0]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return None
        return True
    try:
        st = submitit.SlurmJob(folder=state.get("submit_folder") or ".", job_id=str(job)).state
    except Exception:  # no sacct here, or SLURM unreachable
        return None
    if st in ("UNKNOWN", None):
        return None
    return st.split(" ")[0] in ACTIVE_SLURM_STATES


# --------------------------------------------------------------------------- the command
def run_study(study: Study | str | Path, *, executor: str = "local", only: str | None = None,
              cluster: str = "slurm", wait: bool = False, say: Callable[[str], None] = print) -> RunSummary:
    """Plan (idempotent), then execute every run that is not done: here, one after the other, or as jobs."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    study = study if isinstance(study, Study) else load_study(study)
    if study.racing is not None:
        # nnunet_transfer.study.run_study dispatches a racing study to study.racing.run_racing
        raise ConfigError(f"study file {study.path} has [racing]: run it with `nnunet_transfer study run` "
                          f"(nnunet_transfer.study.run_study), which trains rung by rung")
    with _planning(study):
        plan = prepare(study)
    study = plan.study
    runs = select(plan.runs, only)
    summary = RunSummary()
    todo = []
    for run in runs:
        p = progress(study, run, job_alive=job_alive)
        if p.done:
            if not evaluation_current(study, run):
                with RunLock(run_dir(study, run)) as lock:
                    if lock.acquire():
                        evaluate_run(study, run)
            summary.outcomes.append(Outcome(run.id, "skipped", message="done"))
        elif p.state == "running":
            message = p.detail or "held by another process"
            say(f"skipped {run.id}: {message}")
            summary.outcomes.append(Outcome(run.id, "busy", message=message))
        elif p.state == "queued":
            summary.outcomes.append(Outcome(run.id, "queued", message=f"job {p.job_id} is queued or running"))
        else:
            todo.append(run)
    if not todo:
        say("nothing to run: every selected run is done, running or queued")
        return summary
    if executor == "local":
        env = nnunet_environment(extra=study.environment)
        for i, run in enumerate(todo, 1):
            say(f"[{i}/{len(todo)}] {run.id}")
            summary.outcomes.append(execute_run(study, run, definition_=plan.definitions[run.id], env=env, say=say))
    else:
        summary.outcomes += submit(study, todo, plan.definitions, cluster=cluster, wait=wait, say=say)
    return summary


class _planning:
    """Concurrent ``study run`` processes plan one at a time (waiting): planning writes files they share. The
    ``flock`` is on the study file itself (read-only), which exists before the output folder may be touched."""

    def __init__(self, study: Study):
        self.path = study.path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: plan unguarded, as a single `study run` does
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock


# --------------------------------------------------------------------------- SLURM (submitit)
class RunJob(submitit.helpers.Checkpointable):
    """What a SLURM job runs: one run of a study. Requeued (Checkpointable) at a time limit or preemption;
    the requeued job continues the run with ``--c``."""

    def __call__(self, study_file: str, run_id: str, env: dict, until: int | None = None) -> dict:
        os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
        study = load_study(study_file)
        runs = {r.id: r for r in build_table(study, plan_study_splits(study))}
        if run_id not in runs:
            raise ConfigError(f"run {run_id} is no longer in study file {study_file}; it was edited after submission")
        run = runs[run_id]
        try:
            job = submitit.JobEnvironment().job_id
        except RuntimeError:
            job = None
        env = nnunet_environment(base={**os.environ, **env}, extra=study.environment)
        outcome = execute_run(study, run, definition_=definition(study, run, base_configuration_hash(study)),
                              job_id=job, env=env, until=until)
        return outcome.__dict__


def executor_parameters(study: Study, cluster: str) -> dict:
    """The ``[slurm]`` table as submitit parameters (generic ones reach every submitit cluster)."""
    params = {"name": f"nnunet_transfer-{study.name}"}
    for key, value in study.slurm.items():
        if key != "max_requeue":
            params[SLURM_KEYS[key]] = value
    params.setdefault("timeout_min", DEFAULT_TIMEOUT_MIN)
    return params


def submit(study: Study, runs: Sequence[Run], definitions: dict, *, cluster: str = "slurm", wait: bool = False,
           say: Callable[[str], None] = print, until: int | None = None) -> list[Outcome]:
    """One job array of the runs (``executor.map_array``); job ids go into each run's state. ``until``: a rung of
    [racing] — each job trains its run to that rung and pauses there (:func:`execute_run`)."""
    folder = study.output / "slurm"
    ctor = {}
    if "max_requeue" in study.slurm:
        ctor["slurm_max_num_timeout"] = study.slurm["max_requeue"]
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, **ctor)
        executor.update_parameters(**executor_parameters(study, cluster))
    except (ValueError, NameError, RuntimeError) as e:
        raise ConfigError(f"study file {study.path} [slurm]: submitit refuses the resources: {e}") from None
    env = {k: v for k, v in nnunet_environment(extra=study.environment).items() if k.startswith("nnUNet")}
    for run in runs:  # the definition is fixed at submission: a later edit of the file cannot change it
        saved = read_json(run_dir(study, run) / RUN_FILE)
        if saved is None:
            write_json(run_dir(study, run) / RUN_FILE, definitions[run.id])
    jobs = executor.map_array(RunJob(), [str(study.path)] * len(runs), [r.id for r in runs], [env] * len(runs),
                              [until] * len(runs))
    outcomes = []
    for run, job in zip(runs, jobs):
        update_state(study, run, state="submitted", job_id=str(job.job_id), cluster=cluster,
                     submit_folder=str(folder / "%j"), submitted=time.time())
        say(f"submitted {run.id} as job {job.job_id}")
        outcomes.append(Outcome(run.id, "submitted", message=f"job {job.job_id}"))
    if wait:
        outcomes = []
        for run, job in zip(runs, jobs):
            try:
                result = job.result()
                outcomes.append(Outcome(run.id, result["result"], result.get("seconds", 0.0),
                                        result.get("message", "")))
            except Exception as e:  # the job died outside execute_run (import error, node failure, cancelled)
                last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                message = f"job {job.job_id} failed: {type(e).__name__}: {last}"
                if read_state(study, run).get("state") != "done":
                    update_state(study, run, state="failed", error=message, log=str(job.paths.stderr))
                outcomes.append(Outcome(run.id, "failed", message=message))
    return outcomes


__all__ = ["run_study", "execute_run", "evaluate_run", "submit", "RunJob", "RunSummary", "Outcome", "select",
           "job_alive", "EXECUTORS"]
