"""``study report``: evaluate every finished run, compare the strategies per training-set size, plot across
sizes, and write one ``report.md`` that reads like the papers' results sections.

1. **Evaluate** — each done run's predictions with ``evaluate`` (cached in ``runs/<id>/eval``, redone only
   when the predictions or the ``[scoring]`` settings changed), one run and one case at a time.
2. **Pool per strategy and size** — the per-case rows of all runs of a strategy at one size: with a
   held-out test set every repeat predicts the same cases, and a case's value is the **mean over the
   repeats**; with cross-validation every case comes from the one fold that held it out (Amiri et al.:
   the whole dataset is tested). Written as an ``evaluate``-shaped folder
   (``OUT/evaluations/n<size>/<strategy>/``), whose ``run`` is the strategy's first run (repeat 0, fold 0)
   for ``compare``'s trainable share and time to convergence.
3. **Compare** — ``compare`` of those folders per size against the file's baseline
   (``OUT/compare/n<size>/``: comparison.csv/.md/.json, tukey.csv, box plots, learning curves). A strategy
   enters a size's comparison only when every run of it at that size is done; the rest are listed.
4. **Across sizes** — ``dice_vs_ntrain.png`` (Dice ± sd over the test cases against the number of training
   cases, one line per strategy: Karimi et al. Fig. 3 / Amiri et al. Fig. 4), for every sweep
   ``<metric>_vs_<setting>.png`` (Dice and precision against the swept value, one line per size: Sagie
   et al. Fig. 1), ``runs.csv`` (every run: state, epochs, seconds, its own test Dice per label), and
   ``report.md``.
5. **Forgetting** — with ``[source_test]``, each done run's old classes scored on the *source's* test set against
   the source model's own predictions (``runs/<id>/source_eval``, written by ``study run``): a table of the mean
   old-class Dice before and after and the share kept, per strategy and size (``forgetting.csv``).
6. **Analysis** — with ``[analysis]``, Karimi et al.'s evolution, groups, feature reuse and filter change of the
   runs (``OUT/analysis/<study>/``, :mod:`nnunet_transfer.study.analysis`), linked from ``report.md``.

Cost: evaluation is per case (distance transforms on each case's bounding box), pooling and comparing are
per case and strategy; nothing else grows with the data — the time is linear in the number of cases.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.compare import DEFAULT_METRICS, compare_evaluations
from nnunet_transfer.experiments.evaluate import describe, read_per_case, summarize
from nnunet_transfer.experiments.metrics import METRIC_COLUMNS
from nnunet_transfer.figures import colors, figure
from nnunet_transfer.fileio import plain, write_atomic
from nnunet_transfer.nnunet_io import load_dataset_json
from nnunet_transfer.study.analysis import analyse_study
from nnunet_transfer.study.racing import mark_dropped, racing_markdown
from nnunet_transfer.study.plan import prepare
from nnunet_transfer.study.runner import SOURCE_EVAL, evaluate_run, job_alive
from nnunet_transfer.study.model import Study, sweep_label
from nnunet_transfer.study.state import (Progress, RunLock, evaluation_current, progress, read_state, results_folder,
                                         run_dir, write_json)
from nnunet_transfer.study.table import Run, size_slug, test_folder

REPORT = "report.md"
TITLES = {"dice": "Dice", "precision": "precision"}


@dataclass
class ReportResult:
    out: Path
    files: list[Path]
    evaluated: list[str]           # runs evaluated by this call
    compared: dict[str, list[str]]  # size label -> strategies compared
    missing: dict[str, list[str]]   # size label -> strategies left out (runs not done)
    progress: list[Progress] = field(default_factory=list)

    def text(self) -> str:
        done = sum(p.done for p in self.progress)
        lines = [f"report of {done} of {len(self.progress)} done runs -> {self.out / REPORT}"]
        if self.evaluated:
            lines.append(f"  evaluated {len(self.evaluated)} run(s) now (the others from their cached evaluation)")
        for size, names in self.compared.items():
            gone = {p.run.strategy.name for p in self.progress if p.state == "dropped" and str(p.run.size) == size}
            left = [n for n in self.missing.get(size, []) if n not in gone]
            dropped = [n for n in self.missing.get(size, []) if n in gone]
            lines.append(f"  n_train {size}: compared {', '.join(names) or 'nothing'}"
                         + (f"; left out (not done): {', '.join(left)}" if left else "")
                         + (f"; dropped by racing: {', '.join(dropped)}" if dropped else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------- pooling
def pool_rows(per_run: Sequence[Sequence[dict]]) -> list[dict]:
    """Per (case, label): the mean of every metric over the runs that predicted the case."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for rows in per_run:
        for r in rows:
            groups.setdefault((r["case"], int(r["label"])), []).append(r)
    out = []
    for (case, label), rows in sorted(groups.items()):
        row = {"case": case, "label": label}
        for m in METRIC_COLUMNS:
            vals = [float(r[m]) for r in rows if m in r]
            row[m] = float(np.mean(vals)) if vals else math.nan  # an infinite distance keeps the mean infinite
        row["n_runs"] = len(rows)
        out.append(row)
    return out


def _pooled_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", *METRIC_COLUMNS, "n_runs"])
    for r in rows:
        w.writerow([r["case"], r["label"], *(repr(float(r[m])) for m in METRIC_COLUMNS), r["n_runs"]])
    return buf.getvalue()


def write_pooled(folder: Path, study: Study, runs: Sequence[Run], label_names: dict) -> list[dict]:
    """An ``evaluate``-shaped folder of the pooled rows of ``runs`` (one strategy, one size)."""
    per_run = [read_per_case(run_dir(study, r) / "eval" / "per_case.csv") for r in runs]
    rows = pool_rows(per_run)
    labels = sorted({r["label"] for r in rows})
    first = sorted(runs, key=lambda r: (r.fold, r.repeat))[0]
    summary = {"tool": "nnunet_transfer study report", "pooled": "mean over the runs that predicted a case",
               "runs": [r.id for r in runs], "run": str(results_folder(study, first)), "run_given": True,
               "ref": str(test_folder(study, first.fold) / "labelsTs"), "labels": labels,
               "label_names": {str(k): v for k, v in label_names.items() if k in labels},
               "nsd_tolerance_mm": study.scoring.nsd_tolerance,
               "lesion_connectivity": study.scoring.lesion_connectivity,
               "n_cases": len({r["case"] for r in rows}), "cases": sorted({r["case"] for r in rows}),
               **summarize(rows, labels)}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "per_case.csv", _pooled_csv(rows))
    write_atomic(folder / "summary.json", json.dumps(plain(summary), indent=2))
    return rows


# --------------------------------------------------------------------------- plots
def _label_title(label: int, names: dict) -> str:
    return f"label {label}" + (f" ({names[label]})" if label in names else "")


def plot_vs_ntrain(path: Path, points: dict, strategies: Sequence[str], labels: Sequence[int], names: dict,
                   metric: str = "dice") -> Path:
    """``points[(strategy, label)] = [(n_train, mean, sd)]`` -> one panel per label, one line per strategy."""
    from matplotlib.ticker import MaxNLocator


    with figure(path, cols=len(labels)) as p:
        for i, lab in enumerate(labels):
            ax = p.fig.add_subplot(1, len(labels), i + 1)
            for s, color in zip(strategies, colors(len(strategies))):
                pts = sorted(points.get((s, lab), []))
                if not pts:
                    continue
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=[0 if v is None else v for v in e], marker="o", capsize=3, color=color,
                            label=s)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("training cases (n_train)")
            ax.set_ylabel(f"test {TITLES.get(metric, metric)}")
            p.title(ax, _label_title(lab, names))
            ax.grid(alpha=0.3)
        p.legend(where="below")
        p.suptitle(f"test {TITLES.get(metric, metric)} against the training-set size (mean ± sd over the test cases)")
    return path


def plot_sweep(path: Path, key: str, values: Sequence, series: dict, labels: Sequence[int], names: dict,
               metrics: Sequence[str]) -> Path:
    """``series[(size, metric, label)] = [mean per value]`` -> metric against the swept value, a line per size."""
    ticks = ["∞" if sweep_label(v) == "inf" else sweep_label(v) for v in values]
    sizes = list(dict.fromkeys(size for size, _, _ in series))
    color = dict(zip(sizes, colors(len(sizes))))
    with figure(path, rows=len(metrics), cols=len(labels)) as p:
        for j, m in enumerate(metrics):
            for i, lab in enumerate(labels):
                ax = p.fig.add_subplot(len(metrics), len(labels), j * len(labels) + i + 1)
                for (size, metric, label), ys in series.items():
                    if metric == m and label == lab:
                        ax.plot(range(len(values)), [math.nan if y is None else y for y in ys], marker="o",
                                color=color[size], label=f"n_train {size}")
                p.categories(ax, range(len(values)), ticks)
                ax.set_xlabel(key)
                ax.set_ylabel(f"test {TITLES.get(m, m)}")
                p.title(ax, _label_title(lab, names))
                ax.grid(alpha=0.3)
        p.legend(where="right")
    return path


# --------------------------------------------------------------------------- the command
def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _mean_sd(rows: Sequence[dict], metric: str, label: int) -> tuple[float | None, float | None]:
    d = describe([r[metric] for r in rows if r["label"] == label])
    return d["mean"], d["sd"]


def report_study(study: Study | str | Path, out: str | Path, *, plots: bool = True,
                 say: Callable[[str], None] = print) -> ReportResult:
    """Evaluate, pool, compare and plot (module docstring); returns what was written."""
    plan = prepare(study, write=False, check_weights=False)
    study, runs = plan.study, plan.runs
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"report output {out} exists and is not a folder")
    o, so = out.resolve(), study.output.resolve()
    if o == so or any(p in (so / "runs", so / "test", so / "slurm") for p in [o, *o.parents]):
        raise DataError(f"report output {out} is inside the study's own records; give it a folder of its own")
    prog = [progress(study, r, job_alive=job_alive) for r in runs]
    mark_dropped(study, prog)  # [racing]: not "paused" but dropped, at their rung
    done = {p.run.id for p in prog if p.done}
    evaluated = []
    for r in runs:
        if r.id in done and not evaluation_current(study, r):
            with RunLock(run_dir(study, r)) as lock:
                if not lock.acquire():
                    continue  # being extended right now; its old evaluation stays out
                say(f"evaluating {r.id}")
                evaluate_run(study, r)
                evaluated.append(r.id)
    names = {int(v): k for k, v in (load_dataset_json(study.dataset).get("labels") or {}).items()
             if isinstance(v, int) and v > 0}
    metrics = list(study.scoring.metrics or DEFAULT_METRICS)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("evaluations", "compare"):  # a rerun never mixes old and new tables
        shutil.rmtree(out / sub, ignore_errors=True)
    files: list[Path] = []
    order = [s.name for s in study.strategies]
    compared, missing, comparisons, pooled = {}, {}, {}, {}
    for i, size in enumerate(study.splits.n_train):
        key = str(size)
        at_size = [r for r in runs if r.size_index == i]
        ready = [n for n in order if all(r.id in done for r in at_size if r.strategy.name == n)]
        missing[key] = [n for n in order if n not in ready]
        for n in ready:
            folder = out / "evaluations" / f"n{size_slug(size)}" / n
            pooled[(key, n)] = (folder, write_pooled(folder, study, [r for r in at_size if r.strategy.name == n],
                                                     names))
        compared[key] = []
        if study.baseline in ready and len(ready) >= 2:
            res = compare_evaluations([(n, pooled[(key, n)][0]) for n in ready],
                                      out / "compare" / f"n{size_slug(size)}", baseline=study.baseline,
                                      metrics=metrics, test=study.scoring.test, alpha=study.scoring.alpha,
                                      correction=study.scoring.correction, n_resamples=study.scoring.resamples,
                                      plots=plots)
            comparisons[key] = res
            compared[key] = ready
            files += res.files
    labels = sorted({r["label"] for _, rows in pooled.values() for r in rows})
    n_train = {(p.run.strategy.name, p.run.size_index): [] for p in prog}
    for r in runs:
        n_train[(r.strategy.name, r.size_index)].append(r.n_train)
    if plots and pooled:
        points = {}
        for (key, n), (_, rows) in pooled.items():
            i = [str(s) for s in study.splits.n_train].index(key)
            for lab in labels:
                mean, sd = _mean_sd(rows, "dice", lab)
                if mean is not None:
                    points.setdefault((n, lab), []).append((float(np.mean(n_train[(n, i)])), mean, sd))
        files.append(plot_vs_ntrain(out / "dice_vs_ntrain.png", points, order, labels, names))
        for family, members in study.sweeps.items():
            key_name = members[0].sweep_key
            series = {}
            for size in study.splits.n_train:
                for m in ("dice", "precision"):
                    for lab in labels:
                        ys = [(_mean_sd(pooled[(str(size), s.name)][1], m, lab)[0]
                               if (str(size), s.name) in pooled else None) for s in members]
                        if any(y is not None for y in ys):
                            series[(str(size), m, lab)] = ys
            if series:
                files.append(plot_sweep(out / f"dice_vs_{key_name}.png", key_name, [s.sweep_value for s in members],
                                        series, labels, names, ("dice", "precision")))
    files.append(_write_runs_csv(out / "runs.csv", study, prog, labels))
    analysis = None
    if study.analysis is not None:  # [analysis]: Karimi's analyses of the runs (nnunet_transfer.study.analysis)

        analysis = analyse_study(study, prog, out, say=say)
    forget = forgetting_lines(study, runs, done, out) if study.source_test is not None else []
    if forget:
        files.append(out / FORGETTING)
    extra = [*forget, *(analysis.markdown(out) if analysis is not None else ())]
    text = report_markdown(study, prog, comparisons, pooled, labels, names, metrics, missing, n_train, out,
                           extra=extra)
    (out / REPORT).write_text(text)
    files.append(out / REPORT)
    write_json(out / "report.json", {"study": str(study.path), "compared": compared, "missing": missing,
                                     "evaluated_now": evaluated, "labels": labels,
                                     "analysis": None if analysis is None else
                                     [{"analysis": o.job.kind, "folder": str(o.out.relative_to(out)), "state": o.state,
                                       "error": o.error} for o in analysis.outcomes]})
    return ReportResult(out=out, files=files, evaluated=evaluated, compared=compared, missing=missing, progress=prog)


FORGETTING = "forgetting.csv"


def forgetting_lines(study: Study, runs: Sequence[Run], done: set, out: Path) -> list[str]:
    """[source_test]: ``forgetting.csv`` (one row per done run) and a markdown table per strategy and size (means
    over the runs of the old classes' Dice on the source's test set, before = the source model, after = the run)."""
    rows = []
    for r in runs:
        path = run_dir(study, r) / SOURCE_EVAL / "summary.json"
        if r.id not in done or not path.is_file():
            continue
        f = json.loads(path.read_text()).get("forgetting")
        if f:
            rows.append({"run": r.id, "strategy": r.strategy.name, "n_train": r.n_train, "size_index": r.size_index,
                         "before": f["mean"]["before"], "after": f["mean"]["after"], "kept": f["mean"]["kept"],
                         **{f"after_{lab}": d["after"] for lab, d in f["per_label"].items()}})
    if not rows:
        return ["", "## Forgetting (source test set)", "",
                "No run has been scored on [source_test] yet (`study run` does it after each run's evaluation)."]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / FORGETTING, buf.getvalue())
    lines = ["", "## Forgetting (source test set)", "",
             f"Old classes' mean Dice on the source's held-out test set ({study.source_test.labels}): the source model "
             f"(before) and each run (after), means over the runs; kept = after / before. Per run: "
             f"[{FORGETTING}]({FORGETTING}).", "",
             "| strategy | n_train | runs | before | after | kept |", "|---|---|---|---|---|---|"]
    order = [s.name for s in study.strategies]
    for i, size in enumerate(study.splits.n_train):
        for n in order:
            sel = [row for row in rows if row["strategy"] == n and row["size_index"] == i]
            if sel:
                b, a = float(np.mean([x["before"] for x in sel])), float(np.mean([x["after"] for x in sel]))
                lines.append(f"| {n} | {size} | {len(sel)} | {b:.3f} | {a:.3f} | "
                             f"{'-' if b <= 0 else f'{100 * a / b:.0f} %'} |")
    return lines


def _write_runs_csv(path: Path, study: Study, prog: Sequence[Progress], labels: Sequence[int]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "strategy", "trainer", "n_train", "repeat", "fold", "nnunet_fold", "state", "epochs",
                "seconds", "job_id", *(f"dice_{lab}" for lab in labels), "log"])
    for p in prog:
        r = p.run
        dice = {}
        summary = run_dir(study, r) / "eval" / "summary.json"
        if p.done and summary.is_file():
            per_label = json.loads(summary.read_text()).get("per_label", {})
            dice = {lab: (per_label.get(str(lab), {}).get("dice") or {}).get("mean") for lab in labels}
        w.writerow([r.id, r.strategy.name, r.trainer, r.n_train, r.repeat, r.fold, r.nnunet_fold, p.state,
                    "" if p.epochs is None else p.epochs, "" if p.seconds is None else f"{p.seconds:.1f}",
                    p.job_id or "", *("" if dice.get(lab) is None else repr(dice[lab]) for lab in labels),
                    _log_of(study, r, p)])
    path.write_text(buf.getvalue())
    return path


def _log_of(study: Study, run: Run, p: Progress) -> str:
    return read_state(study, run).get("log") or "" if p.state == "failed" else ""


# --------------------------------------------------------------------------- report.md
def stopping_of(study: Study, run: Run) -> dict | None:
    """The early-stopping record of a finished run (``transfer_config.json``'s ``stopping``); None without one."""
    path = results_folder(study, run) / "transfer_config.json"
    try:
        return json.loads(path.read_text()).get("stopping") if path.is_file() else None
    except (OSError, ValueError):
        return None


def _convergence_lines(study: Study, done: Sequence[Progress], strategies: Sequence[str],
                       size_keys: Sequence[str]) -> list[str]:
    """Runs that did not stop early within num_epochs (Amiri et al.'s "failed" runs), per strategy and size."""
    counts: dict[tuple[str, str], list[int]] = {}
    for p in done:
        st = stopping_of(study, p.run)
        if st is None or st.get("converged") is None:
            continue
        c = counts.setdefault((p.run.strategy.name, size_keys[p.run.size_index]), [0, 0])
        c[0] += 1
        c[1] += not st["converged"]
    if not counts:
        return []
    lines = ["## Convergence (early stopping)", "",
             "Runs that did not stop early within `num_epochs` are **not converged** (Amiri et al.'s failed runs) / "
             "runs with early stopping. They are included in the tables below; the paper averaged over the "
             "converged runs only.", "",
             "| strategy | " + " | ".join(f"n_train {k}" for k in size_keys) + " |", "|---|" + "---|" * len(size_keys)]
    for n in strategies:
        if any((n, k) in counts for k in size_keys):
            lines.append(f"| {n} | " + " | ".join(f"{counts[(n, k)][1]} / {counts[(n, k)][0]}" if (n, k) in counts
                                                  else "–" for k in size_keys) + " |")
    return lines + [""]


def report_markdown(study: Study, prog: Sequence[Progress], comparisons: dict, pooled: dict, labels: Sequence[int],
                    names: dict, metrics: Sequence[str], missing: dict, n_train: dict, out: Path,
                    extra: Sequence[str] = ()) -> str:
    sp = study.splits
    done = [p for p in prog if p.done]
    strategies = [s.name for s in study.strategies]
    test_sets = (f"{sp.folds}-fold cross-validation: every case is tested once, by the model of the fold that held "
                 f"it out" if sp.cross_validation else
                 f"{len(prog[0].run.test) if prog else 0} held-out test cases that no run trained or validated on")
    lines = [f"# {study.name}: results", "",
             f"Target **{study.dataset}** (configuration `{study.configuration}`, plans `{study.plans}`); "
             f"{test_sets}; training-set sizes {', '.join(map(str, sp.n_train))} (nested subsets), "
             f"{sp.repeats} repeat(s) with seed {sp.seed}. {len(done)} of {len(prog)} runs are done. "
             f"Per strategy and size the test cases' values are pooled over the runs (held-out set: the mean over "
             f"the repeats; cross-validation: each case from its own fold) and compared with the baseline "
             f"**{study.baseline}** by a {_test_name(study)} ({_correction_text(study)}, p < {study.scoring.alpha}) and "
             f"Tukey's HSD across all strategies.", "",
             "| strategy | trainer | pretrained | settings |", "|---|---|---|---|"]
    for s in study.strategies:
        settings = ", ".join(f"{k}={sweep_label(v) if not isinstance(v, str) else v}" for k, v in s.settings.items())
        lines.append(f"| {s.name} | `{s.trainer}` | {s.pretrained or '–'} | {settings or '–'} |")
    lines.append("")
    size_keys = [str(s) for s in sp.n_train]
    lines += _convergence_lines(study, done, strategies, size_keys)
    lines += racing_markdown(study, [p.run for p in prog])
    for lab in labels:
        lines += [f"## Dice across training-set sizes — {_label_title(lab, names)}", "",
                  "Mean ± sd over the test cases; **bold** = best at that size; `*` = differs from the baseline; "
                  "n = mean number of training cases.", "",
                  "| strategy | " + " | ".join(f"n_train {k} (n = {_mean_n(n_train, strategies, i)})"
                                             for i, k in enumerate(size_keys)) + " |",
                  "|---|" + "---|" * len(size_keys)]
        cells = {}
        for k in size_keys:
            res = comparisons.get(k)
            for n in strategies:
                if res is not None and any(r["strategy"] == n for r in res.rows):
                    row = next(r for r in res.rows
                               if r["strategy"] == n and r["metric"] == "dice" and r["label"] == lab)
                    cells[(n, k)] = (row["mean"], row["sd"], bool(row["significant"]))
                elif (k, n) in pooled:
                    mean, sd = _mean_sd(pooled[(k, n)][1], "dice", lab)
                    cells[(n, k)] = (mean, sd, False)
        for n in strategies:
            row = []
            for k in size_keys:
                c = cells.get((n, k))
                if c is None or c[0] is None:
                    row.append("–")
                    continue
                best = max((v[0] for (m, kk), v in cells.items() if kk == k and v[0] is not None), default=None)
                text = f"{c[0]:.3f} ± {_fmt(c[1])}"
                row.append((f"**{text}**" if c[0] == best else text) + ("*" if c[2] else ""))
            lines.append(f"| {n}{' (baseline)' if n == study.baseline else ''} | " + " | ".join(row) + " |")
        lines.append("")
    if (out / "dice_vs_ntrain.png").exists():
        lines += ["![Dice against the training-set size](dice_vs_ntrain.png)", ""]
    for family, members in study.sweeps.items():
        key = members[0].sweep_key
        lines += [f"## The {key} sweep ({family})", ""]
        for k in size_keys:
            for lab in labels:
                vals = [(s, _mean_sd(pooled[(k, s.name)][1], "dice", lab)[0]) for s in members if (k, s.name) in pooled]
                vals = [(s, v) for s, v in vals if v is not None]
                if len(vals) >= 2:
                    best = max(vals, key=lambda t: t[1])
                    first = vals[0]
                    lines.append(f"- n_train {k}, {_label_title(lab, names)}: the best Dice, {best[1]:.3f}, at {key} = "
                                 f"{sweep_label(best[0].sweep_value)} ({first[1]:.3f} at {key} = "
                                 f"{sweep_label(first[0].sweep_value)}).")
        if (out / f"dice_vs_{key}.png").exists():
            lines += ["", f"![Dice and precision against {key}](dice_vs_{key}.png)"]
        lines.append("")
    for k in size_keys:
        res = comparisons.get(k)
        lines += [f"## n_train {k}", ""]
        if res is None:
            why = ("the baseline's runs are not all done" if study.baseline in missing.get(k, [])
                   else "fewer than two strategies are done")
            lines += [f"Not compared: {why}." + (f" Not done: {', '.join(missing[k])}." if missing.get(k) else ""), ""]
            continue
        for sentence in _findings(study, res, labels, names):
            lines += [sentence, ""]
        lines += _convergence(study, res) + [""]
        cmp_md = (res.out / "comparison.md").read_text()
        body = cmp_md.split("\n", 1)[1] if cmp_md.startswith("# ") else cmp_md
        lines += [ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln for ln in body.splitlines()]
        rel = res.out.relative_to(out)
        lines += ["", f"Tables: `{rel}/comparison.csv` (every metric, label, test), `{rel}/tukey.csv` (Tukey's HSD)."]
        pngs = [p for p in res.files if p.suffix == ".png"]
        lines += [f"![{p.stem}]({rel}/{p.name})" for p in pngs]
        gone = {p.run.strategy.name for p in prog if p.state == "dropped" and str(p.run.size) == k}
        if [n for n in missing.get(k, []) if n not in gone]:
            lines.append(f"Left out at this size (runs not done): "
                         f"{', '.join(n for n in missing[k] if n not in gone)}.")
        if gone & set(missing.get(k, [])):
            lines.append(f"Dropped by racing at this size (see Racing): "
                         f"{', '.join(n for n in missing[k] if n in gone)}.")
        lines.append("")
    lines += list(extra)
    lines += ["## Runs", "", "Every run's state, epochs, seconds and own test Dice: `runs.csv`."]
    failed = [p for p in prog if p.state == "failed"]
    pending = [p for p in prog if not p.done and p.state not in ("failed", "dropped")]
    if failed:
        lines += ["", "Failed (see the log; `study run` tries them again):", ""]
        lines += [f"- {p.run.id}: {p.detail} (`{_log_of(study, p.run, p)}`)" for p in failed]
    if pending:
        lines += ["", f"Not done: {', '.join(f'{p.run.id} ({p.state})' for p in pending)}."]
    lines.append("")
    return "\n".join(lines)


def _test_name(study: Study) -> str:
    return "paired t-test" if study.scoring.test == "ttest" else "Wilcoxon signed-rank test"


def _correction_text(study: Study) -> str:
    """How the marked p-values are corrected ([scoring] correction)."""
    if study.scoring.correction == "none":
        return "uncorrected, as the papers test: [scoring] correction = \"none\""
    return "Holm-corrected over the strategies"


def _mean_n(n_train: dict, strategies: Sequence[str], i: int) -> str:
    vals = [v for s in strategies for v in n_train.get((s, i), [])]
    return "–" if not vals else f"{np.mean(vals):g}"


def _findings(study: Study, res, labels: Sequence[int], names: dict) -> list[str]:
    """One sentence per label: the best strategy, and every difference from the baseline that is significant."""
    test = _test_name(study)
    out = []
    for lab in labels:
        rows = [r for r in res.rows if r["metric"] == "dice" and r["label"] == lab and r["mean"] is not None]
        if not rows:
            continue
        base = next((r for r in rows if r["strategy"] == study.baseline), None)
        best = max(rows, key=lambda r: r["mean"])
        text = (f"**{_label_title(lab, names)}**: the highest mean Dice on the {len(res.cases)} test cases is "
                f"{best['strategy']}'s, {best['mean']:.3f} ± {_fmt(best['sd'])}")
        if base is not None and best["strategy"] != study.baseline:
            text += (f", {best['mean_diff']:+.3f} against {study.baseline} ({base['mean']:.3f} ± {_fmt(base['sd'])}; "
                     f"95 % CI [{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}], {test} p = "
                     f"{_fmt(best['p_adjusted'], 4)}"
                     f"{' after Holm' if study.scoring.correction == 'holm' else ', uncorrected'})")
        sig = [r for r in rows if r["significant"]]
        if sig:
            text += ". Significantly different from the baseline: " + ", ".join(
                f"{r['strategy']} ({r['mean_diff']:+.3f}, p = {_fmt(r['p_adjusted'], 4)})" for r in sig)
        else:
            text += f". No strategy differs significantly from {study.baseline} (p < {study.scoring.alpha})"
        out.append(text + ".")
    return out


def _convergence(study: Study, res) -> list[str]:
    """Karimi et al.'s "transfer converges faster": time to convergence against the baseline's."""
    info = {s.name: (s.run_info or {}).get("convergence") or {} for s in res.strategies}
    base = info.get(study.baseline, {}).get("seconds")
    parts = []
    for s in res.strategies:
        sec = info[s.name].get("seconds")
        if sec is None:
            continue
        rel = f" ({100 * (sec - base) / base:+.0f} % vs {study.baseline})" if base and s.name != study.baseline else ""
        parts.append(f"{s.name} {sec:.1f} s at epoch {info[s.name].get('epochs_to_converge')}{rel}")
    if not parts:
        return []
    return ["Time to convergence (nnU-Net's smoothed validation pseudo-Dice first within 0.5 % of its maximum; "
            "each strategy's first run): " + "; ".join(parts) + "."]


__all__ = ["report_study", "ReportResult", "pool_rows", "write_pooled", "REPORT"]
