"""``study run`` with [racing]: train every live run to the next rung, decide per size, record, continue the survivors.

The decisions live in ``<output>/racing.json`` (written atomically once a size's rung is decided, before any run
trains on)::

    {"rungs": [e1, e2], "rule": ..., "signal": ..., "alpha": ..., "test": ..., "eta": ...,
     "sizes": {"<size index>": {"<e1>": {"signals": {strategy: {unit: value}},
                                          "verdicts": [Verdict.to_dict(), ...], "dropped": [strategy, ...]}}}}

so a ``study run`` killed anywhere (kill -9 included) takes every decided rung from the file — it never decides a
rung twice — and every run from its files: a run paused at or past the rung is not trained again
(:func:`~nnunet_transfer.study.runner.execute_run` with ``until``). A unit is one (repeat, fold) of a size; the
signal (:mod:`.racing_signal`) is nnU-Net's EMA pseudo-Dice after the rung's epoch (``ema``) or the Dice of the
fold's validation cases predicted with the rung's weights (``validation``). The runs
of a dropped strategy stay paused (``study status``: "dropped"); the report compares the survivors.

:func:`replay` simulates racing on a study that ran in full, from the EMA pseudo-Dice curves in its
``checkpoint_final.pth`` files (``study replay-racing``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from nnunet_transfer.environment import nnunet_environment
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.experiments.racing import decide, resolve_rungs
from nnunet_transfer.study.model import Study
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.racing_signal import ema_at, validation_at
from nnunet_transfer.study.runner import (EXECUTORS, Outcome, RunSummary, _planning, execute_run, job_alive,
                                          run_study, select, submit)
from nnunet_transfer.study.spec import load_study
from nnunet_transfer.study.state import (Progress, evaluation_current, paused_after, progress, read_json,
                                         results_folder, run_dir, write_json)
from nnunet_transfer.study.table import Run, build_table, plan_study_splits

RACING_FILE = "racing.json"


def unit_of(run: Run) -> str:
    return f"r{run.repeat}f{run.fold}"


def signal_at(study: Study, run: Run, epoch: int) -> float | None:
    """The run's value of the study's [racing] signal after ``epoch`` completed epochs (:mod:`.racing_signal`)."""
    folder = results_folder(study, run)
    if study.racing.signal == "validation":
        return validation_at(folder, epoch, dataset=study.dataset, configuration=run.configuration,
                             plans=study.plans, device="cpu" if study.device == "cpu" else "auto")
    return ema_at(folder, epoch)


def _config(study: Study) -> dict:
    rc = study.racing
    return {"rungs": list(rc.rungs), "rule": rc.rule, "signal": rc.signal, "alpha": rc.alpha, "test": rc.test,
            "eta": rc.eta}


def read_decisions(study: Study) -> dict:
    """``racing.json`` (a new one when racing has not started); refuses one whose rungs or rule changed."""
    path = study.output / RACING_FILE
    saved = read_json(path)
    if saved is None:
        return {**_config(study), "sizes": {}}
    changed = {k: (saved.get(k), v) for k, v in _config(study).items() if saved.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"[racing] changed after racing started ({diff}); the decided rungs in {path} were made "
                          f"with the old values: restore the [racing] table, or start a new study")
    return saved


def dropped_before(decisions: dict, size_index: int, epoch: int | None = None) -> dict[str, int]:
    """``{strategy: rung epoch}`` of the strategies of a size dropped at rungs before ``epoch`` (None: all)."""
    out = {}
    for e, d in sorted(((int(e), d) for e, d in decisions["sizes"].get(str(size_index), {}).items())):
        if epoch is None or e < epoch:
            for s in d["dropped"]:
                out.setdefault(s, e)
    return out


def run_racing(study: Study | str | Path, *, executor: str = "local", only: str | None = None,
               cluster: str = "slurm", wait: bool = False, say: Callable[[str], None] = print,
               **_ignored) -> RunSummary:
    """``study run`` of a study with [racing] (module docstring); without [racing], :func:`run_study`.

    ``--executor slurm``: the live runs of a size that have not reached the rung go out as one job array that trains
    each to the rung (``until``); with ``--wait`` this process waits for it and decides, else the rung is decided by
    the next ``study run`` once the jobs have ended (a rung with jobs still queued or running is left alone)."""
    study = study if isinstance(study, Study) else load_study(study)
    if study.racing is None:
        return run_study(study, executor=executor, only=only, cluster=cluster, wait=wait, say=say)
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if only:
        raise ConfigError("--only cannot be used with [racing]: a rung is decided over every strategy of a size")
    with _planning(study):
        plan = prepare(study)
    study = plan.study
    runs = select(plan.runs, None)
    env = nnunet_environment(extra=study.environment)
    decisions = read_decisions(study)
    summary = RunSummary()
    rc = study.racing

    def train(todo: Sequence[Run], until: int | None, what: str) -> bool:
        """Train ``todo`` (to ``until``); whether every one of them got there here and now."""
        if executor == "local":
            for i, run in enumerate(todo, 1):
                say(f"[{what}] [{i}/{len(todo)}] {run.id}")
                out = execute_run(study, run, definition_=plan.definitions[run.id], env=env, say=say, until=until)
                if until is None or out.result in ("failed", "busy"):  # a pause at a rung is no outcome of its own
                    summary.outcomes.append(out)
            return not any(o.result in ("failed", "busy") for o in summary.outcomes)
        waiting = [r for r in todo if progress(study, r, job_alive=job_alive).state in ("queued", "running")]
        if waiting:
            say(f"[{what}] {len(waiting)} job(s) still queued or running (e.g. {waiting[0].id}): run `study run` "
                f"again when they have ended")
            return False
        if todo:
            summary.outcomes += submit(study, todo, plan.definitions, cluster=cluster, wait=wait, say=say,
                                       until=until)
            if not wait:
                say(f"[{what}] submitted; run `study run --executor {executor}` again when the jobs have ended"
                    + (" to decide the rung" if until is not None else ""))
                return False
        return not any(o.result in ("failed", "busy") for o in summary.outcomes)

    sizes = sorted({r.size_index for r in runs})
    for epoch in rc.rungs:
        for size in sizes:
            if str(epoch) in decisions["sizes"].get(str(size), {}):
                continue  # decided before (this process or one that was killed): never again
            gone = dropped_before(decisions, size, epoch)
            live = [r for r in runs if r.size_index == size and r.strategy.name not in gone]
            todo = [r for r in live if not _reached(study, r, epoch)]
            if not train(todo, epoch, f"rung {epoch}, size {live[0].n_train}"):
                if executor == "local" or wait:
                    say(f"rung {epoch} of size index {size} not decided: a run failed or is held; run `study run` "
                        f"again")
                return summary
            signals: dict[str, dict[str, float]] = {}
            for run in live:
                v = signal_at(study, run, epoch)
                if v is not None:
                    signals.setdefault(run.strategy.name, {})[unit_of(run)] = v
            verdicts = decide(signals, baseline=study.baseline, rule=rc.rule, alpha=rc.alpha, test=rc.test,
                              eta=rc.eta)
            dropped = [v.strategy for v in verdicts if v.dropped]
            decisions["sizes"].setdefault(str(size), {})[str(epoch)] = {
                "signals": signals, "verdicts": [v.to_dict() for v in verdicts], "dropped": dropped}
            write_json(study.output / RACING_FILE, decisions)  # durable before any run trains on
            say(f"rung {epoch} (size index {size}): dropped {', '.join(dropped) or 'none'}")
    gone_by_size = {size: dropped_before(decisions, size) for size in sizes}
    todo = []
    for run in runs:
        if run.strategy.name in gone_by_size[run.size_index]:
            summary.outcomes.append(Outcome(run.id, "dropped", message=f"dropped at epoch "
                                                                       f"{gone_by_size[run.size_index][run.strategy.name]}"))
        elif progress(study, run).done:
            summary.outcomes.append(Outcome(run.id, "skipped", message="done"))
        else:
            todo.append(run)
    train(todo, None, "final")
    return summary


def _reached(study: Study, run: Run, epoch: int) -> bool:
    """Whether the run has trained to the rung (paused there or later, or finished)."""
    at = paused_after(results_folder(study, run))
    return (at is not None and at >= epoch) or progress(study, run).done


# --------------------------------------------------------------------------- status and report
def mark_dropped(study: Study, prog: Sequence[Progress]) -> None:
    """The runs of a strategy dropped at a rung (paused there, never trained on) as state "dropped", with the rung
    (``study status``, ``study report``)."""
    if study.racing is None:
        return
    decisions = read_decisions(study)
    for p in prog:
        at = dropped_before(decisions, p.run.size_index).get(p.run.strategy.name)
        if at is not None and p.state in ("paused", "interrupted", "pending"):
            p.state, p.detail = "dropped", f"dropped by racing at epoch {at}"


def racing_lines(study: Study) -> list[str]:
    """What racing decided so far, per size and rung: live and dropped strategies with the evidence."""
    if study.racing is None:
        return []
    decisions = read_json(study.output / RACING_FILE) or {"sizes": {}}
    rc = study.racing
    lines = [f"racing: rule {rc.rule}, signal {rc.signal}, rungs {list(rc.rungs)} of {rc.num_epochs} epochs"
             + (f", alpha {rc.alpha} ({rc.test}, one-sided, Holm)" if rc.rule == "paired" else f", eta {rc.eta}")]
    for size, rungs in sorted(decisions["sizes"].items(), key=lambda kv: int(kv[0])):
        for epoch, d in sorted(rungs.items(), key=lambda kv: int(kv[0])):
            live = [v["strategy"] for v in d["verdicts"] if not v["dropped"]]
            lines.append(f"  size index {size}, rung {epoch}: live {', '.join(live)}; dropped "
                         f"{', '.join(d['dropped']) or 'none'}")
            lines += [f"    {v['strategy']}: {v['reason']}" for v in d["verdicts"] if v["dropped"]]
    if not decisions["sizes"]:
        lines.append("  no rung decided yet")
    return lines


def epochs_spent(study: Study, runs: Sequence[Run]) -> tuple[int, int]:
    """(training epochs of this racing study, epochs of the same study trained in full)."""
    decisions = read_json(study.output / RACING_FILE) or {"sizes": {}}
    full = sum(r.num_epochs for r in runs)
    spent = 0
    for r in runs:
        gone = dropped_before(decisions, r.size_index)
        spent += gone.get(r.strategy.name, r.num_epochs)
    return spent, full


def racing_markdown(study: Study, runs: Sequence[Run]) -> list[str]:
    """report.md's section: per size the dropped strategies, at which rung, on what evidence, and the epochs spent
    against the full study's (the comparisons below are among the survivors)."""
    if study.racing is None:
        return []
    decisions = read_json(study.output / RACING_FILE) or {"sizes": {}}
    spent, full = epochs_spent(study, runs)
    rc = study.racing
    lines = ["## Racing", "",
             f"Rule **{rc.rule}** on nnU-Net's EMA pseudo-Dice at epochs {', '.join(map(str, rc.rungs))} of "
             f"{rc.num_epochs}" + (f" (one-sided paired {rc.test} against the rung's best, Holm across the "
                                   f"strategies, alpha {rc.alpha})" if rc.rule == "paired" else
                                   f" (keep the best 1/{rc.eta})")
             + f"; the baseline is never dropped. Training epochs: **{spent}** of the full study's {full} "
               f"({100 * (1 - spent / full):.1f} % saved). The tables below compare the survivors.", "",
             "| n_train | strategy | dropped at epoch | evidence |", "|---|---|---|---|"]
    sizes = {r.size_index: r.size for r in runs}
    for size, rungs in sorted(decisions["sizes"].items(), key=lambda kv: int(kv[0])):
        for epoch, d in sorted(rungs.items(), key=lambda kv: int(kv[0])):
            for v in d["verdicts"]:
                if v["dropped"]:
                    lines.append(f"| {sizes.get(int(size), size)} | {v['strategy']} | {epoch} | {v['reason']} |")
    return lines + [""]


# --------------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    rule: str
    rungs: list[int]
    rows: list[dict] = field(default_factory=list)  # per size
    judge: str = "the final EMA pseudo-Dice"  # what the full study's winner is judged on

    def text(self) -> str:
        out = [f"replay of racing: rule {self.rule}, rungs {self.rungs}; the full study judged on {self.judge}"]
        for r in self.rows:
            out.append(f"  size {r['n_train']}: dropped {', '.join(f'{s}@{e}' for s, e in r['dropped'].items()) or 'none'}"
                       f"; full winner {r['winner']} {'kept' if r['winner_kept'] else 'DROPPED'}; dropped wrongly "
                       f"{', '.join(r['wrong']) or 'none'}; epochs {r['spent']} of {r['full']} "
                       f"({100 * (1 - r['spent'] / r['full']):.0f} % saved)")
        spent, full = sum(r["spent"] for r in self.rows), sum(r["full"] for r in self.rows)
        out.append(f"  all sizes: {100 * (1 - spent / full):.1f} % of the training epochs saved")
        return "\n".join(out)


def report_dice(study: Study, run: Run) -> float | None:
    """A finished run's score in the report: Dice averaged over the test cases, then over the labels."""
    summary = read_json(run_dir(study, run) / "eval" / "summary.json") or {}
    return (summary.get("mean_over_labels") or {}).get("dice")


def replay(study: Study | str | Path, *, rule: str | None = None, rungs: Sequence[float | int] | None = None,
           final: Callable[[Study, Run], float] | None = None) -> ReplayResult:
    """Simulate racing on a study that ran in full (every run has ``checkpoint_final.pth``): the EMA pseudo-Dice at
    the rungs from each run's logged curve. ``final(study, run)``: the final score a strategy is judged by (default:
    the report's mean test Dice when ``study report`` evaluated every run, else the EMA pseudo-Dice at the end);
    "not significantly worse than the winner" is the paired rule's test at the file's alpha on the final scores."""
    study = study if isinstance(study, Study) else load_study(study)
    rc = study.racing
    if rc is None and (rule is None or rungs is None):
        raise ConfigError(f"study file {study.path} has no [racing]: give --rule and --rungs")
    runs = build_table(study, plan_study_splits(study))
    num_epochs = runs[0].num_epochs
    rule = rule or rc.rule
    epochs = resolve_rungs(rungs, num_epochs) if rungs is not None else list(rc.rungs)
    if any(b <= a for a, b in zip(epochs, epochs[1:])) or not 1 <= epochs[0] or epochs[-1] >= num_epochs:
        raise ConfigError(f"--rungs {list(rungs if rungs is not None else rc.rungs)} are epochs {epochs} of "
                          f"num_epochs {num_epochs}; they must increase and fall before num_epochs, e.g. 0.1,0.3")
    alpha, test, eta = (rc.alpha, rc.test, rc.eta) if rc is not None else (0.05, "ttest", 2)
    missing = [r.id for r in runs if not (results_folder(study, r) / "checkpoint_final.pth").is_file()]
    if missing:
        raise DataError(f"replay needs a study that ran in full; {len(missing)} run(s) have no checkpoint_final.pth, "
                        f"e.g. {missing[0]}: finish them with `study run` (without [racing])")
    judge = "a given final score"
    if final is None and all(evaluation_current(study, r) for r in runs):
        final, judge = report_dice, "the mean test Dice of `study report`'s evaluations"
    elif final is None:
        final = lambda s, r: ema_at(results_folder(s, r), r.num_epochs)  # noqa: E731
        judge = "the final EMA pseudo-Dice (not every run is evaluated on the test set: run `study report` first)"
    result = ReplayResult(rule, epochs, judge=judge)
    for size in sorted({r.size_index for r in runs}):
        here = [r for r in runs if r.size_index == size]
        full_scores: dict[str, dict[str, float]] = {}
        for r in here:
            v = final(study, r)
            full_scores.setdefault(r.strategy.name, {})
            if v is not None and math.isfinite(v):
                full_scores[r.strategy.name][unit_of(r)] = v
        verdicts = {v.strategy: v for v in decide(full_scores, baseline=study.baseline, rule="paired", alpha=alpha,
                                                  test=test)}
        winner = next(iter(verdicts.values())).best
        equal = {s for s, v in verdicts.items() if s == winner or not (v.p_holm is not None and v.p_holm < alpha)}
        live, dropped = sorted(full_scores), {}
        for e in epochs:
            signals = {s: {} for s in live}
            for r in here:
                if r.strategy.name in signals:
                    v = ema_at(results_folder(study, r), e)
                    if v is not None:  # NaN pseudo-Dice (no foreground in the patches): left out, as study run does
                        signals[r.strategy.name][unit_of(r)] = v
            for v in decide(signals, baseline=study.baseline, rule=rule, alpha=alpha, test=test, eta=eta):
                if v.dropped:
                    dropped[v.strategy] = e
            live = [s for s in live if s not in dropped]
        n_units = len(here) // len(full_scores)
        full = sum(r.num_epochs for r in here)
        spent = full - sum((num_epochs - e) * n_units for e in dropped.values())
        result.rows.append({"n_train": here[0].n_train, "dropped": dropped, "winner": winner,
                            "winner_kept": winner not in dropped, "wrong": sorted(set(dropped) & equal),
                            "spent": spent, "full": full, "live": live})
    return result


__all__ = ["run_racing", "mark_dropped", "racing_lines", "racing_markdown", "epochs_spent", "replay", "ReplayResult",
           "ema_at", "report_dice", "RACING_FILE"]
