"""``compare``: strategies scored on the same test cases, as the papers compare them.

Each strategy is an ``evaluate`` output folder. Cases are paired by identifier; a case missing from any
strategy is an error (or, with ``allow_missing``, left out of every strategy and listed). Per strategy,
metric and label (values over the cases; infinite distances are counted and left out):

* mean, sd (n − 1), median;
* against the baseline, on the cases where both values are finite — differences ``d_i = x_i − b_i``:
  the mean difference with a bootstrap 95 % interval (``scipy.stats.bootstrap`` of the mean of d, BCa,
  resampling cases), the paired t-test (``scipy.stats.ttest_rel``, Karimi et al. 2021) and the Wilcoxon
  signed-rank test (``scipy.stats.wilcoxon``, defaults: zero differences dropped, exact for small n),
  each Holm-corrected (``statsmodels`` ``multipletests(method="holm")``) over the strategies compared with
  the baseline, per metric and label; ``p_adjusted`` is the p of the chosen test under the chosen
  ``correction``: Holm's (the default) or ``"none"``, the raw p — the papers' protocol (Karimi et al.
  Tables 3–6 and Sagie et al. mark p < 0.05 of uncorrected paired t-tests);
* across all strategies, Tukey's HSD (``scipy.stats.tukey_hsd``, Amiri et al. 2020) on the cases where
  every strategy's value is finite.

When every difference is exactly zero both tests give p = 1 and the interval is [0, 0] (scipy returns
NaN / a degenerate-data warning there); when every difference is the same non-zero value the interval
is that value. With fewer than two pairs nothing is tested.

When a strategy's EVAL folder names its run (``evaluate --run``, or the EVAL folder sits in the fold
folder) the run's trainable share (``transfer_config.json``) and its time to convergence from the
checkpoint's log (:func:`nnunet_transfer.experiments.convergence.log_convergence`: nnU-Net's smoothed
validation pseudo-Dice first within 0.5 % of its maximum) are reported, with the seconds per epoch and
the learning curves.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.arms import ArmResults, load_arm_results, parse_evals, run_info
from nnunet_transfer.experiments.evaluate import _short, describe
from nnunet_transfer.experiments.metrics import DIRECTION, METRIC_COLUMNS
from nnunet_transfer.figures import colors, figure
from nnunet_transfer.fileio import plain, write_atomic
from nnunet_transfer.experiments.paired import CORRECTIONS, TESTS, holm, paired_comparison, tukey

DEFAULT_METRICS = ("dice", "hd95", "assd", "nsd", "precision", "recall", "lesion_f1")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 [mm]", "hd95_max": "HD95 max [mm]", "hd": "HD [mm]",
                 "assd": "ASSD [mm]", "nsd": "NSD", "precision": "precision", "recall": "recall",
                 "lesion_f1": "lesion F1", "lesion_tp": "lesion TP", "lesion_fp": "lesion FP",
                 "lesion_fn": "lesion FN", "volume_diff_ml": "ΔV [ml]", "rel_volume_diff": "ΔV/V"}
CSV_COLUMNS = ("strategy", "metric", "label", "label_name", "n", "n_infinite", "mean", "sd", "median", "n_pairs",
               "mean_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm",
               "p_adjusted", "significant", "p_tukey")
TUKEY_COLUMNS = ("metric", "label", "a", "b", "mean_diff", "ci_low", "ci_high", "p")


# --------------------------------------------------------------------------- the command
@dataclass
class ComparisonResult:
    out: Path
    rows: list[dict]
    tukey: list[dict]
    strategies: list[ArmResults]
    baseline: str
    cases: list[str]
    excluded: dict[str, list[str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"compared {len(self.strategies)} strategies on {len(self.cases)} cases (baseline "
                 f"{self.baseline}) -> {self.out}"]
        if self.excluded:
            lines.append(f"  left out (not in every strategy): {_short(sorted(self.excluded))}")
        lines += ["  " + p.name for p in self.files]
        return "\n".join(lines)


CORRECTION_TEXT = {"holm": "Holm over the strategies compared with the baseline, per metric and label",
                   "none": "none: each strategy's raw p against the baseline (the papers' uncorrected tests)"}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _best(values: Mapping[str, float | None], metric: str) -> set[str]:
    direction = DIRECTION.get(metric, True)
    vals = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not vals:
        return set()
    key = (lambda v: v) if direction is True else (lambda v: -v) if direction is False else (lambda v: -abs(v))
    best = max(key(v) for v in vals.values())
    return {k for k, v in vals.items() if key(v) == best}


def compare_evaluations(evals: Sequence[str | Path | tuple[str, str | Path]], out: str | Path, *,
                        baseline: str | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                        test: str = "ttest", alpha: float = 0.05, correction: str = "holm",
                        allow_missing: bool = False, confidence: float = 0.95, n_resamples: int = 9999,
                        seed: int = 0, plots: bool = True) -> ComparisonResult:
    """Compare ``evaluate`` outputs (module docstring); writes comparison.csv/.md/.json, tukey.csv, PNGs.

    ``baseline``: a strategy name (default the first); ``test``: ``"ttest"`` or ``"wilcoxon"``, whose
    p under ``correction`` (``"holm"``: Holm-adjusted; ``"none"``: as computed) is ``p_adjusted`` and
    marks significance at ``alpha``. The Holm columns are written either way.
    """
    out = Path(out)
    named = parse_evals(evals)
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRIC_COLUMNS]
    if bad or not metrics:
        raise DataError(f"unknown metric(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(METRIC_COLUMNS)}")
    if test not in TESTS:
        raise DataError(f"--test {test!r} is not one of {', '.join(TESTS)}")
    if correction not in CORRECTIONS:
        raise DataError(f"--correction {correction!r} is not one of {', '.join(CORRECTIONS)} (holm: Holm over the "
                        f"strategies compared with the baseline; none: uncorrected, as the papers)")
    if not 0 < alpha < 1:
        raise DataError(f"--alpha {alpha!r} must be a probability in (0, 1), e.g. 0.05")
    if not 0 < confidence < 1:
        raise DataError(f"confidence level {confidence!r} must be in (0, 1), e.g. 0.95")
    if not isinstance(n_resamples, int) or n_resamples < 100:
        raise DataError(f"--resamples {n_resamples!r} must be an integer >= 100")
    names = [n for n, _ in named]
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise DataError(f"--baseline {baseline!r} is not one of the strategies: {', '.join(names)}")
    if out.resolve() in {p.resolve() for _, p in named}:
        raise DataError(f"output folder {out} is one of the EVAL folders; give compare a folder of its own")
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    strategies = [load_arm_results(n, p) for n, p in named]

    # same question for everybody: labels, NSD tolerance, cases
    label_sets = {s.name: s.labels for s in strategies}
    if len({tuple(v) for v in label_sets.values()}) > 1:
        raise DataError("the EVAL folders evaluated different labels: "
                        + "; ".join(f"{n}: {v}" for n, v in label_sets.items())
                        + "; fix: evaluate every strategy with the same --labels")
    tols = {s.name: s.summary.get("nsd_tolerance_mm") for s in strategies}
    if len(set(tols.values())) > 1:
        raise DataError(f"the EVAL folders used different NSD tolerances (mm): {tols}; fix: evaluate every "
                        f"strategy with the same --nsd-tolerance")
    conns = {s.name: s.summary.get("lesion_connectivity") for s in strategies}
    if len(set(conns.values())) > 1:
        raise DataError(f"the EVAL folders used different lesion connectivities: {conns}; fix: evaluate every "
                        f"strategy with the same --lesion-connectivity")
    every = sorted(set().union(*(s.cases for s in strategies)))
    missing = {s.name: sorted(set(every) - set(s.cases)) for s in strategies}
    missing = {k: v for k, v in missing.items() if v}
    if missing and not allow_missing:
        raise DataError("the strategies were evaluated on different cases: "
                        + "; ".join(f"{k} lacks {len(v)}: {_short(v)}" for k, v in missing.items())
                        + ". Fix: evaluate every strategy on the same test cases, or --allow-missing to compare "
                          "on the cases all of them have (the others are listed)")
    cases = sorted(set.intersection(*(set(s.cases) for s in strategies)))
    if len(cases) < 2:
        raise DataError(f"the strategies share {len(cases)} case(s); paired comparisons need at least 2")
    excluded = {c: [s.name for s in strategies if c not in s.cases] for c in every if c not in cases}
    labels = strategies[0].labels
    label_names = {}
    for s in strategies:
        label_names.update(s.summary.get("label_names") or {})
    for s in strategies:
        if s.run is not None:
            s.run_info = run_info(s.run)

    # values[strategy][(metric, label)] -> array over `cases`
    values: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    for s in strategies:
        by_key = {(r["case"], int(r["label"])): r for r in s.rows}
        values[s.name] = {(m, lab): np.array([by_key[(c, lab)][m] for c in cases], dtype=np.float64)
                          for m in metrics for lab in labels}

    order = [baseline] + [n for n in names if n != baseline]
    others = order[1:]
    rows, tukey_rows = [], []
    # statsmodels' Holm branch runs gc.collect() on every call, ~0.2 s each with torch's objects alive;
    # the collector skips frozen objects, so freeze what exists now
    thaw = gc.get_freeze_count() == 0  # unfreeze only what this call froze
    gc.freeze()
    try:
        for lab in labels:
            for m in metrics:
                stats_ = {n: describe(list(values[n][(m, lab)])) for n in order}
                tests = {n: paired_comparison(values[n][(m, lab)], values[baseline][(m, lab)], confidence=confidence,
                                              n_resamples=n_resamples, seed=seed) for n in others}
                adj_t = holm([tests[n]["p_ttest"] for n in others])
                adj_w = holm([tests[n]["p_wilcoxon"] for n in others])
                all_finite = np.all([np.isfinite(values[n][(m, lab)]) for n in order], axis=0)
                tk = tukey({n: values[n][(m, lab)][all_finite] for n in order}, confidence=confidence)
                tukey_rows += [{"metric": m, "label": lab, **t} for t in tk]
                tk_base = {t["b"]: t["p"] for t in tk if t["a"] == baseline}
                for n in order:
                    st = stats_[n]
                    row = {"strategy": n, "metric": m, "label": lab, "label_name": label_names.get(str(lab), ""),
                           "n": st["n"], "n_infinite": st["n_infinite"], "mean": st["mean"], "sd": st["sd"],
                           "median": st["median"], "n_pairs": None, "mean_diff": None, "ci_low": None, "ci_high": None,
                           "p_ttest": None, "p_wilcoxon": None, "p_ttest_holm": None, "p_wilcoxon_holm": None,
                           "p_adjusted": None, "significant": None, "p_tukey": None}
                    if n != baseline:
                        i = others.index(n)
                        if correction == "holm":
                            p_adj = (adj_t if test == "ttest" else adj_w)[i]
                        else:
                            p_adj = tests[n]["p_ttest" if test == "ttest" else "p_wilcoxon"]
                        row.update({k: tests[n][k] for k in ("n_pairs", "mean_diff", "ci_low", "ci_high", "p_ttest",
                                                             "p_wilcoxon")},
                                   p_ttest_holm=adj_t[i], p_wilcoxon_holm=adj_w[i], p_adjusted=p_adj,
                                   significant=None if p_adj is None else bool(p_adj < alpha), p_tukey=tk_base.get(n))
                    rows.append(row)
    finally:
        if thaw:
            gc.unfreeze()

    settings = {"baseline": baseline, "test": test, "alpha": alpha, "confidence": confidence,
                "n_resamples": n_resamples, "seed": seed, "metrics": metrics, "labels": labels,
                "label_names": label_names, "nsd_tolerance_mm": next(iter(tols.values())),
                "correction": correction, "correction_text": CORRECTION_TEXT[correction]}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    try:
        files.append(write_atomic(out / "comparison.csv", _csv(rows, CSV_COLUMNS)))
        files.append(write_atomic(out / "tukey.csv", _csv(tukey_rows, TUKEY_COLUMNS)))
        files.append(write_atomic(out / "comparison.md", markdown_report(rows, strategies, order, settings, cases,
                                                                  excluded)))
        doc = {"tool": "nnunet_transfer compare", **settings, "strategies": [
            {"name": s.name, "folder": str(s.folder.resolve()), "run": None if s.run is None else str(s.run),
             "ref": s.summary.get("ref"), "run_info": s.run_info} for s in strategies],
            "cases": cases, "excluded_cases": excluded, "rows": rows, "tukey": tukey_rows}
        files.append(write_atomic(out / "comparison.json", json.dumps(plain(doc), indent=2)))
        if plots:
            for lab in labels:
                files.append(plot_boxes(out / f"boxplot_label{lab}.png", values, order, metrics, lab,
                                        label_names.get(str(lab))))
            curves = {s.name: s.run_info["convergence"] for s in strategies
                      if s.run_info and s.run_info.get("convergence")}
            if curves:
                files.append(plot_learning_curves(out / "learning_curves.png", curves, order))
    except BaseException:  # nothing half-written: remove what this call wrote
        for f in files:
            f.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return ComparisonResult(out=out, rows=rows, tukey=tukey_rows, strategies=strategies, baseline=baseline,
                            cases=cases, excluded=excluded, files=files)


def _csv(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
    return buf.getvalue()


# --------------------------------------------------------------------------- reports
def markdown_report(rows: Sequence[Mapping], strategies: Sequence[ArmResults], order: Sequence[str],
                    settings: Mapping, cases: Sequence[str], excluded: Mapping[str, list[str]]) -> str:
    """The papers' table: mean ± sd per strategy and metric, best in bold, * = significant vs the baseline."""
    baseline, metrics, alpha = settings["baseline"], settings["metrics"], settings["alpha"]
    test = "paired t-test" if settings["test"] == "ttest" else "Wilcoxon signed-rank test"
    holm_ = settings.get("correction", "holm") == "holm"
    how = (f"Holm-corrected over the {len(order) - 1} comparison(s)" if holm_ else
           f"uncorrected, as in the papers, over {len(order) - 1} comparison(s)")
    lines = [f"# compare: {len(order)} strategies on {len(cases)} test cases", "",
             f"Mean ± sd over the cases; **bold** = best mean; `*` = differs from the baseline *{baseline}* "
             f"({test}, {how}, p < {alpha}); "
             f"(k inf) = k cases with an infinite distance (an empty mask), left out of that mean. NSD at "
             f"{settings['nsd_tolerance_mm']} mm.", ""]
    by = {(r["strategy"], r["metric"], r["label"]): r for r in rows}
    for lab in settings["labels"]:
        name = settings["label_names"].get(str(lab))
        lines += [f"## label {lab}" + (f" ({name})" if name else ""), "",
                  "| strategy | " + " | ".join(METRIC_TITLES.get(m, m) for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        best = {m: _best({n: by[(n, m, lab)]["mean"] for n in order}, m) for m in metrics}
        for n in order:
            cells = []
            for m in metrics:
                r = by[(n, m, lab)]
                cell = f"{_fmt(r['mean'])} ± {_fmt(r['sd'])}" if r["mean"] is not None else "–"
                if n in best[m]:
                    cell = f"**{cell}**"
                if r["significant"]:
                    cell += "*"
                if r["n_infinite"]:
                    cell += f" ({r['n_infinite']} inf)"
                cells.append(cell)
            lines.append(f"| {n}{' (baseline)' if n == baseline else ''} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"Differences from the baseline (mean, bootstrap 95 % CI, p raw → "
                  f"{'Holm' if holm_ else 'uncorrected'}):", "",
                  "| strategy | metric | Δ mean | 95 % CI | p t-test | p Wilcoxon | p adjusted |",
                  "|---|---|---|---|---|---|---|"]
        for n in order[1:]:
            for m in metrics:
                r = by[(n, m, lab)]
                lines.append(f"| {n} | {METRIC_TITLES.get(m, m)} | {_fmt(r['mean_diff'])} | "
                             f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['p_ttest'], 4)} | "
                             f"{_fmt(r['p_wilcoxon'], 4)} | {_fmt(r['p_adjusted'], 4)}{'*' if r['significant'] else ''} |")
        lines.append("")
    runs = [s for s in strategies if s.run_info]
    if runs:
        lines += ["## runs", "",
                  "Time to convergence: the first epoch at which nnU-Net's smoothed validation pseudo-Dice "
                  "(`ema_fg_dice`) is within 0.5 % of its maximum, and the wall time from the start of training "
                  "to the end of that epoch.", "",
                  "| strategy | trainable parameters | epochs | converged at epoch | time to convergence [s] | "
                  "s / epoch |", "|---|---|---|---|---|---|"]
        conv = {s.name: (s.run_info.get("convergence") or {}) for s in runs}
        fastest = _best({n: c.get("seconds") for n, c in conv.items()}, "hd")  # "hd": lower is better
        for s in sorted(runs, key=lambda s: order.index(s.name)):
            info, c = s.run_info, conv[s.name]
            share = "–" if info["trainable_share"] is None else \
                f"{100 * info['trainable_share']:.1f} % ({info['trainable']:,} of {info['total']:,})"
            secs = _fmt(c.get("seconds"), 1)
            if s.name in fastest:
                secs = f"**{secs}**"
            lines.append(f"| {s.name} | {share} | {c.get('epochs', '–')} | "
                         f"{'–' if c.get('epochs_to_converge') is None else c['epochs_to_converge']} | {secs} | "
                         f"{_fmt(c.get('seconds_per_epoch'), 2)} |")
        lines += ["", "Epochs count from 1; the run folders: "
                  + ", ".join(f"{s.name} = `{s.run}`" for s in runs), ""]
    if excluded:
        lines += ["## cases left out", "", "Not evaluated by every strategy (compared without them):", ""]
        lines += [f"- {c}: missing from {', '.join(v)}" for c, v in sorted(excluded.items())]
        lines.append("")
    return "\n".join(lines)


def plot_boxes(path: Path, values: Mapping[str, Mapping[tuple[str, int], np.ndarray]], order: Sequence[str],
               metrics: Sequence[str], label: int, label_name: str | None) -> Path:
    """One box plot per metric, a box per strategy (finite values)."""
    cols = min(len(metrics), 4)
    nrows = math.ceil(len(metrics) / cols)
    with figure(path, rows=nrows, cols=cols) as p:
        for i, m in enumerate(metrics):
            ax = p.fig.add_subplot(nrows, cols, i + 1)
            data = [values[n][(m, label)][np.isfinite(values[n][(m, label)])] for n in order]
            ax.boxplot(data, showmeans=True)
            p.categories(ax, range(1, len(order) + 1), order)
            p.title(ax, METRIC_TITLES.get(m, m))
            ax.grid(alpha=0.3, axis="y")
        p.suptitle(f"label {label}" + (f" ({label_name})" if label_name else ""))
    return path


def plot_learning_curves(path: Path, curves: Mapping[str, Mapping], order: Sequence[str]) -> Path:
    """Smoothed validation pseudo-Dice against wall time, every run on one plot, convergence marked."""
    with figure(path) as p:
        ax = p.fig.add_subplot(1, 1, 1)
        names = [o for o in order if o in curves]
        for n, color in zip(names, colors(len(names))):
            c = curves[n]
            pts = [(q["seconds"], q["value"]) for q in c["curve"] if q["seconds"] is not None and q["value"] is not None]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker=".", color=color, label=n)
            if c.get("epoch") is not None and c["curve"][c["epoch"]]["seconds"] is not None:
                e = c["curve"][c["epoch"]]
                ax.plot([e["seconds"]], [e["value"]], marker="o", markersize=9, markerfacecolor="none", color=color)
        ax.set_xlabel("wall time [s]")
        ax.set_ylabel(f"validation pseudo-Dice ({next(iter(curves.values()))['key']})")
        p.title(ax, "learning curves (circle: convergence, within 0.5 % of the maximum)")
        ax.grid(alpha=0.3)
        p.legend(where="right")
    return path


__all__ = ["compare_evaluations", "paired_comparison", "holm", "tukey", "run_info", "parse_evals",
           "ComparisonResult", "DEFAULT_METRICS", "CSV_COLUMNS", "CORRECTIONS", "TESTS"]
