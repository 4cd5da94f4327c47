"""``study report``'s analyses: Karimi et al.'s evolution, groups, feature reuse and filter change, computed
from the study's own finished runs and their snapshots as ``[analysis]`` declares
(:class:`~nnunet_transfer.study.model.AnalysisSpec`).

Each analysis is one call of :mod:`nnunet_transfer.analysis.karimi` — exactly what ``nnunet_transfer analyze``
runs for the same fold folders and options — into ``OUT/analysis/<study>/``:

=====================  ============================================================================
``evolution/<run>/``   every run of R.I. (the baseline) and T.L. (``tl``): each snapshot against the
                       run's convergence epoch (Fig. 6–7)
``groups/n<size>/``    R.I. runs against T.L. runs at one training-set size, by their final checkpoints
                       (Table 8); ``groups/all/`` with ``groups_by = "all"``
``reuse/n<size>/``     feature reuse, RSIM(start, converged) of T.L. − of R.I., per size (Table 9)
``weights/<run>/``     filter change start → convergence epoch, both readings (Fig. 8–10)
=====================  ============================================================================

The convergence epoch is Karimi's: the first snapshot whose validation Dice (a sliding-window validation of
every snapshot on the run's validation cases, ``analyze --convergence-from validation``) is within 0.5 % of
its maximum. Patches come from the study's held-out test cases (``analyze``'s default: the
``splits_mapping.json`` that ``study plan`` writes).

An analysis whose inputs did not change since it was computed — the same call, options and run files
(checkpoint_final, start weights and snapshot index by size and mtime, the splits mapping and the plans) —
is not computed again: ``inputs.json`` beside its results records them. A run without snapshots (trained
before ``[analysis]`` set ``snapshot_every``) is left out of the analyses that need them, with one line in
the report saying how to fix it; an analysis that fails for a reason of its data is one line, not a crash.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from nnunet_transfer import __version__
from nnunet_transfer.analysis import karimi
from nnunet_transfer.analysis.runs import snapshot_epochs
from nnunet_transfer.errors import TransferError
from nnunet_transfer.experiments.splits import MAPPING_FILE, SPLITS_FILE
from nnunet_transfer.nnunet_io import env_folder, plans_path
from nnunet_transfer.study.model import Study
from nnunet_transfer.study.state import Progress, file_stamp, results_folder, run_dir
from nnunet_transfer.study.table import Run, size_slug

#: the convergence epoch of evolution, reuse and filter change (Karimi et al.: validation Dice within 0.5 %)
CONVERGENCE_FROM = "validation"
INPUTS = "inputs.json"
#: what each analysis shows, for report.md
WHAT = {
    "evolution": "similarity of each snapshot's layers to the same layers at the run's convergence epoch "
                 "(Karimi et al. Fig. 6–7): how early each layer settles",
    "groups": "similarity of the final networks within and between R.I. and T.L. runs per layer (Table 8): "
              "whether transfer makes networks more alike than random initialisation does",
    "reuse": "feature reuse per layer (Table 9): RSIM(start, converged) averaged over T.L. runs minus the same "
             "over R.I. runs — how much of the pretrained representation survives fine-tuning",
    "weights": "relative filter change from the start to the convergence epoch per block (Fig. 8–10), both "
               "readings of the paper's: per filter ‖Δw_f‖/‖w_f‖ and |‖w_f,1‖ − ‖w_f,0‖|/‖w_f,0‖",
}


@dataclass
class Job:
    """One ``analyze`` call: its folder (relative to the analysis root), inputs and how to run it."""

    kind: str
    key: str
    title: str
    folds: list[Path]
    args: dict
    call: Callable[[Path], dict]


@dataclass
class Outcome:
    job: Job
    state: str  # "computed", "unchanged" or "failed"
    out: Path
    error: str | None = None
    result: dict | None = None  # the analysis' <kind>.json


@dataclass
class StudyAnalysis:
    root: Path
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # runs left out and why, sizes without a comparison

    def markdown(self, report_folder: Path) -> list[str]:
        return _markdown(self, report_folder)


def _options(study: Study, *, data: bool = True) -> dict:
    a = study.analysis
    opts: dict[str, Any] = {"layers": a.layers, "device": "cpu" if study.device == "cpu" else "auto",
                            "progress": False}
    if data:
        opts["measure"] = a.measure
        if a.patches is not None:
            opts["patches"] = a.patches
        if a.voxels_per_patch is not None:
            opts["voxels_per_patch"] = a.voxels_per_patch
    return opts


def plan_jobs(study: Study, runs: Sequence[Run], done: set[str]) -> tuple[list[Job], list[str]]:
    """The analyses ``[analysis]`` asks for over the done runs, and a line for each one left out."""
    a = study.analysis
    where = {"dataset": study.dataset, "configuration": study.configuration, "plans": study.plans}
    mine = [r for r in runs if r.strategy.name in a.strategies]
    notes: list[str] = []
    pending = [r.id for r in mine if r.id not in done]
    if pending:
        notes.append(f"Not done yet, so not analysed: {', '.join(pending)}.")
    ready = [r for r in mine if r.id in done]
    fold = {r.id: results_folder(study, r) for r in ready}
    with_snapshots = [r for r in ready if snapshot_epochs(fold[r.id])]
    needs = [k for k in ("evolution", "reuse", "weights") if k in a.analyses]
    for r in ready:
        if r not in with_snapshots and needs:
            notes.append(f"Run {r.id} has no snapshots ({fold[r.id]}/snapshots): it was trained before [analysis] set "
                         f"snapshot_every, so its {', '.join(needs)} cannot be computed. Fix: delete "
                         f"{fold[r.id]} and {run_dir(study, r)}, then `nnunet_transfer study run {study.path} --only "
                         f"{r.id}` trains it again with snapshots.")
    tl = set(a.tl)
    jobs: list[Job] = []
    common = _options(study)
    conv = {"convergence_from": CONVERGENCE_FROM}
    for kind in ("evolution", "weights"):
        if kind not in a.analyses:
            continue
        for r in with_snapshots:
            f = fold[r.id]
            if kind == "evolution":
                args = {**where, **common, **conv}
                call = (lambda out, f=f, args=args: karimi.run_evolution(f, out=out, **args))
            else:
                args = {**where, **_options(study, data=False), **conv}
                call = (lambda out, f=f, args=args: karimi.run_weights(f, out=out, **args))
            group = "T.L." if r.strategy.name in tl else "R.I."
            jobs.append(Job(kind, f"{kind}/{r.id}", f"{r.id} ({group})", [f], {"run": str(f), **args}, call))
    sizes = [str(s) for s in study.splits.n_train]
    if "groups" in a.analyses:
        scopes = ([("all", "all sizes", ready)] if a.groups_by == "all" else
                  [(f"n{size_slug(s)}", f"n_train {s}", [r for r in ready if r.size_index == i])
                   for i, s in enumerate(sizes)])
        for key, label, members in scopes:
            ri = [fold[r.id] for r in members if r.strategy.name not in tl]
            tls = [fold[r.id] for r in members if r.strategy.name in tl]
            if len(ri) < 2 or len(tls) < 2:
                fix = ("set [splits] repeats >= 2 (Karimi et al. trained 10 of each) or [analysis] groups_by = \"all\""
                       if a.groups_by == "size" else "train more repeats or T.L. strategies")
                notes.append(f"Groups at {label}: {len(ri)} R.I. and {len(tls)} T.L. finished run(s); within-group "
                             f"similarity needs at least 2 per group: {fix}.")
                continue
            args = {**where, **common}
            groups = {"RI": [str(x) for x in ri], "TL": [str(x) for x in tls]}
            jobs.append(Job("groups", f"groups/{key}", label, ri + tls, {"groups": groups, **args},
                            lambda out, g=groups, args=args: karimi.run_groups(g, out=out, **args)))
    if "reuse" in a.analyses:
        for i, s in enumerate(sizes):
            members = [r for r in with_snapshots if r.size_index == i]
            ri = [fold[r.id] for r in members if r.strategy.name not in tl]
            tls = [fold[r.id] for r in members if r.strategy.name in tl]
            if not ri or not tls:
                notes.append(f"Feature reuse at n_train {s}: {len(ri)} R.I. and {len(tls)} T.L. finished run(s) with "
                             f"snapshots; it needs at least one of each.")
                continue
            args = {**where, **common, **conv}
            jobs.append(Job("reuse", f"reuse/n{size_slug(s)}", f"n_train {s}", ri + tls,
                            {"ri": [str(x) for x in ri], "tl": [str(x) for x in tls], **args},
                            lambda out, ri=ri, tls=tls, args=args: karimi.run_reuse(ri, tls, out=out, **args)))
    return jobs, notes


def _inputs(study: Study, job: Job) -> dict:
    """What the job's results depend on, as a JSON-comparable record."""
    pre = env_folder("nnUNet_preprocessed") / study.dataset
    files = [pre / MAPPING_FILE, pre / SPLITS_FILE, plans_path(study.dataset, study.plans)]
    for f in job.folds:
        files += [f / "checkpoint_final.pth", f / "start_weights.pth", f / "snapshots" / "index.json"]
    return {"analysis": job.kind, "package_version": __version__, "args": job.args,
            "files": {str(p): file_stamp(p) for p in files}}


def analyse_study(study: Study, prog: Sequence[Progress], out: Path,
                  say: Callable[[str], None] = print) -> StudyAnalysis:
    """Run (or reuse) every analysis of ``[analysis]`` into ``out/analysis/<study>/`` (module docstring)."""
    root = Path(out) / "analysis" / study.name
    done = {p.run.id for p in prog if p.done}
    jobs, notes = plan_jobs(study, [p.run for p in prog], done)
    result = StudyAnalysis(root=root, notes=notes)
    for job in jobs:
        folder = root / job.key
        inputs = json.loads(json.dumps(_inputs(study, job)))  # as read back from the file
        record = folder / INPUTS
        previous = json.loads(record.read_text()) if record.is_file() else None
        if previous == inputs and (folder / f"{job.kind}.json").is_file():
            result.outcomes.append(Outcome(job, "unchanged", folder, result=_read(folder, job.kind)))
            continue
        shutil.rmtree(folder, ignore_errors=True)  # never a mix of an old and a new result
        say(f"analysing: {job.kind} {job.title}")
        try:
            job.call(folder)
        except TransferError as e:  # the data's problem (e.g. no validation case with foreground): one line
            shutil.rmtree(folder, ignore_errors=True)
            result.outcomes.append(Outcome(job, "failed", folder, error=str(e).splitlines()[0]))
            continue
        (folder / INPUTS).write_text(json.dumps(inputs, indent=2))
        result.outcomes.append(Outcome(job, "computed", folder, result=_read(folder, job.kind)))
    return result


def _read(folder: Path, kind: str) -> dict:
    return json.loads((folder / f"{kind}.json").read_text())


# --------------------------------------------------------------------------- report.md
def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _markdown(res: StudyAnalysis, report: Path) -> list[str]:
    lines = ["## Analysis of the runs (Karimi et al.)", "",
             "Computed by `study report` from the runs' snapshots with `nnunet_transfer analyze` (the same functions "
             "and options as by hand; the convergence epoch is the first snapshot whose validation Dice is within "
             "0.5 % of its maximum, `--convergence-from validation`; patches from the held-out test cases). R.I. is "
             "the baseline trained from scratch, T.L. the transfer strategies. Each folder holds summary.md, the "
             "CSV tables and the JSON with every number.", ""]
    lines += [f"- {n}" for n in res.notes]
    if res.notes:
        lines.append("")
    for kind in ("evolution", "groups", "reuse", "weights"):
        outs = [o for o in res.outcomes if o.job.kind == kind]
        if not outs:
            continue
        lines += [f"### {kind.capitalize() if kind != 'reuse' else 'Feature reuse'}"
                  + (" (filter change)" if kind == "weights" else ""), "", f"Shows the {WHAT[kind]}.", ""]
        for o in outs:
            rel = o.out.relative_to(report)
            if o.state == "failed":
                lines += [f"- **{o.job.title}**: not computed: {o.error}", ""]
                continue
            lines += [f"**{o.job.title}** — {_sentence(kind, o.result)} "
                      f"([summary]({rel}/summary.md), tables `{rel}/{kind}_*.csv`"
                      + ("; unchanged since the last report, not recomputed" if o.state == "unchanged" else "") + ")",
                      "", f"![{kind} {o.job.title}]({rel}/{kind}.png)", ""]
    return lines


def _sentence(kind: str, r: dict) -> str:
    meta = r["meta"]
    m = meta.get("measure", "pwcca")
    if kind == "evolution":
        rows = r["tables"]["similarity"]
        first = min(row["epoch"] for row in rows)
        per_layer = "; ".join(f"{row['layer']} {_f(row[m])}" for row in rows if row["epoch"] == first)
        return (f"convergence epoch {r['convergence_epoch']} of snapshots {r['epochs'][0]}–{r['epochs'][-1]}; "
                f"{m} of epoch {first} to it: {per_layer}.")
    if kind == "groups":
        parts = []
        for layer in dict.fromkeys(row["layer"] for row in r["tables"]["groups"]):
            g = {(row["group_a"], row["group_b"]): row["mean"] for row in r["tables"]["groups"] if row["layer"] == layer}
            p = next(row["p_value"] for row in r["tables"]["tests"]
                     if row["layer"] == layer and row["test"].startswith("permutation"))
            parts.append(f"{layer} {m}(RI,RI) {_f(g.get(('RI', 'RI')))}, (TL,TL) {_f(g.get(('TL', 'TL')))}, "
                         f"(RI,TL) {_f(g.get(('RI', 'TL')))}, permutation p {_f(p)}")
        return "; ".join(parts) + "."
    if kind == "reuse":
        return "reuse = TL − RI per layer: " + "; ".join(
            f"{row['layer']} {_f(row[f'reuse_{m}'])} (TL {_f(row[f'tl_{m}'])}, RI {_f(row[f'ri_{m}'])})"
            for row in r["tables"]["reuse"]) + "."
    rows = [row for row in r["tables"]["group"] if row["convs"]]
    return (f"{r['start_from']} → {r['end_from']}; per filter / per filter, norm: " + "; ".join(
        f"{row['group']} {_f(row['filter_ratio'])} / {_f(row['filter_norm_ratio'])}" for row in rows) + ".")


__all__ = ["analyse_study", "plan_jobs", "StudyAnalysis", "CONVERGENCE_FROM"]
