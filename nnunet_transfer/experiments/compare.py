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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_transfer.experiments.convergence import CONVERGENCE_TOLERANCE, log_convergence
from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.evaluate import PER_CASE, SUMMARY, _short, describe, find_run, read_per_case
from nnunet_transfer.experiments.metrics import DIRECTION, METRIC_COLUMNS
from nnunet_transfer.figures import colors, figure
from nnunet_transfer.fileio import plain, write_atomic

DEFAULT_METRICS = ("dice", "hd95", "assd", "nsd", "precision", "recall", "lesion_f1")
TESTS = ("ttest", "wilcoxon")
#: multiple-comparison correction of ``p_adjusted``: Holm over the strategies, or none (the papers' tests)
CORRECTIONS = ("holm", "none")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 [mm]", "hd95_max": "HD95 max [mm]", "hd": "HD [mm]",
                 "assd": "ASSD [mm]", "nsd": "NSD", "precision": "precision", "recall": "recall",
                 "lesion_f1": "lesion F1", "lesion_tp": "lesion TP", "lesion_fp": "lesion FP",
                 "lesion_fn": "lesion FN", "volume_diff_ml": "ΔV [ml]", "rel_volume_diff": "ΔV/V"}
CSV_COLUMNS = ("strategy", "metric", "label", "label_name", "n", "n_infinite", "mean", "sd", "median", "n_pairs",
               "mean_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm",
               "p_adjusted", "significant", "p_tukey")
TUKEY_COLUMNS = ("metric", "label", "a", "b", "mean_diff", "ci_low", "ci_high", "p")


# --------------------------------------------------------------------------- statistics
def paired_comparison(x: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95,
                      n_resamples: int = 9999, seed: int = 0) -> dict:
    """Paired statistics of ``x`` against ``baseline`` (same cases, same order) on the finite pairs.

    Returns ``n_pairs, mean_diff, ci_low, ci_high, p_ttest, p_wilcoxon`` (None where undefined).
    """
    from scipy import stats

    x, b = np.asarray(x, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if x.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {b.shape}")
    ok = np.isfinite(x) & np.isfinite(b)
    x, b = x[ok], b[ok]
    d = x - b
    out: dict[str, Any] = {"n_pairs": int(d.size), "mean_diff": float(d.mean()) if d.size else None,
                           "ci_low": None, "ci_high": None, "p_ttest": None, "p_wilcoxon": None}
    if d.size < 2:
        return out
    if np.all(d == d[0]):  # no variation: scipy's tests and BCa are undefined here
        out.update(ci_low=float(d[0]), ci_high=float(d[0]))
        if d[0] == 0:
            out.update(p_ttest=1.0, p_wilcoxon=1.0)
        else:
            out.update(p_ttest=float(stats.ttest_rel(x, b).pvalue), p_wilcoxon=float(stats.wilcoxon(x, b).pvalue))
        return out
    ci = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                         rng=np.random.default_rng(seed)).confidence_interval
    with warnings.catch_warnings():
        # a handful of zero differences makes scipy warn about its normal approximation; the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_w = stats.wilcoxon(x, b).pvalue
    out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_ttest=float(stats.ttest_rel(x, b).pvalue),
               p_wilcoxon=float(p_w))
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (statsmodels) over the defined ones; None stays None."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        adj = multipletests([pvalues[i] for i in idx], method="holm")[1]
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out


def tukey(groups: Mapping[str, Sequence[float]], *, confidence: float = 0.95) -> list[dict]:
    """Tukey's HSD over the groups (scipy); one row per unordered pair ``a < b`` (by order given)."""
    from scipy import stats

    names = list(groups)
    data = [np.asarray(groups[n], dtype=np.float64) for n in names]
    if len(data) < 2 or any(g.size < 2 for g in data):
        return []
    if all(np.all(g == data[0][0]) for g in data):  # all values identical: no variance to test against
        return [{"a": names[i], "b": names[j], "mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0}
                for i in range(len(names)) for j in range(i + 1, len(names))]
    res = stats.tukey_hsd(*data)
    ci = res.confidence_interval(confidence_level=confidence)
    return [{"a": names[i], "b": names[j], "mean_diff": float(res.statistic[i, j]), "ci_low": float(ci.low[i, j]),
             "ci_high": float(ci.high[i, j]), "p": float(res.pvalue[i, j])}
            for i in range(len(names)) for j in range(i + 1, len(names))]


# --------------------------------------------------------------------------- inputs
@dataclass
class ArmResults:
    """The evaluated results of one arm of the comparison: one EVAL folder (``evaluate``'s per-case rows and
    summary) under its name, and the run it evaluated."""

    name: str
    folder: Path
    rows: list[dict]
    summary: dict
    run: Path | None = None
    run_info: dict | None = None

    @property
    def cases(self) -> list[str]:
        return sorted({r["case"] for r in self.rows})

    @property
    def labels(self) -> list[int]:
        return sorted({int(r["label"]) for r in self.rows})


def parse_evals(items: Sequence[str | Path | tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """``name=path`` / ``path`` (named by its folder) / ``(name, path)`` -> ``[(name, path)]``, names unique."""
    out = []
    for item in items:
        if isinstance(item, tuple):
            name, path = item
        else:
            text = str(item)
            name, sep, path = text.partition("=")
            if not sep or not name or "/" in name:
                name, path = Path(text).name, text
        out.append((str(name), Path(path)))
    if not out:
        raise DataError("compare needs at least two EVAL folders (outputs of nnunet_transfer evaluate)")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"several EVAL folders are named {', '.join(map(repr, dup))}; name them: NAME=PATH, "
                        f"e.g. scratch=runs/a/eval finetune=runs/b/eval")
    if len(out) < 2:
        raise DataError(f"compare needs at least two EVAL folders, got one ({out[0][1]})")
    return out


def run_info(fold: Path, *, tolerance: float | None = None) -> dict:
    """Trainable share and time to convergence of one run (fold folder)."""
    info: dict[str, Any] = {"run": str(fold), "trainer": None, "trainable": None, "total": None,
                            "trainable_share": None, "checkpoint": None, "convergence": None}
    cfg = fold / "transfer_config.json"
    if cfg.is_file():
        try:
            content = json.loads(cfg.read_text())
        except ValueError:
            raise DataError(f"{cfg} is not valid JSON") from None
        params = content.get("parameters") or {}
        info["trainer"] = content.get("trainer")
        if params.get("total"):
            info.update(trainable=int(params["trainable"]), total=int(params["total"]),
                        trainable_share=params["trainable"] / params["total"])
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        ckpt = fold / name
        if ckpt.is_file():
            from nnunet_transfer.checkpoints import read_checkpoint  # lazy: torch; `--help` imports this module

            content = read_checkpoint(ckpt)  # a truncated file or one that would run code: one line naming it
            logging = content.get("logging") if isinstance(content, dict) else None
            if not logging:
                raise DataError(f"checkpoint {ckpt} has no training log ('logging'); is it an nnU-Net checkpoint?")
            info["checkpoint"] = name
            info["trainer"] = info["trainer"] or content.get("trainer_name")
            # nnU-Net logs numpy scalars (np.float32), which first_within does not count as numbers
            logging = {k: [v.item() if isinstance(v, np.generic) else v for v in vals]
                       if isinstance(vals, (list, tuple)) else vals for k, vals in logging.items()}
            conv = log_convergence(logging, tolerance=CONVERGENCE_TOLERANCE if tolerance is None else tolerance)
            conv["epochs"] = len(conv["curve"])
            info["convergence"] = conv
            break
    return info


def load_arm_results(name: str, folder: Path) -> ArmResults:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"EVAL folder {folder} ({name}) does not exist")
    rows = read_per_case(folder / PER_CASE)
    summary_path = folder / SUMMARY
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found; is {folder} an output folder of nnunet_transfer evaluate?")
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError:
        raise DataError(f"{summary_path} is not valid JSON") from None
    if not rows:
        raise DataError(f"{folder / PER_CASE} holds no cases")
    run = Path(summary["run"]) if summary.get("run") else find_run(folder)
    if run is not None and not run.is_dir():
        raise DataError(f"{summary_path} names the run {run}, which does not exist; re-run evaluate with --run, "
                        f"or move the run back")
    return ArmResults(name=name, folder=folder, rows=rows, summary=summary, run=run)


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
