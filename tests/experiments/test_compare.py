"""``compare`` on fixed per-case tables: every number against scipy / statsmodels called directly."""
from __future__ import annotations

import csv
import gc
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from statsmodels.stats.multitest import multipletests

from nnunet_transfer.experiments.convergence import log_convergence
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import DataError
from nnunet_transfer.experiments.compare import compare_evaluations
from nnunet_transfer.experiments.paired import paired_comparison
from nnunet_transfer.experiments.evaluate import rows_to_csv
from nnunet_transfer.experiments.metrics import empty_label_metrics

CASES = [f"case_{i:02d}" for i in range(12)]
RESAMPLES = 999
STRATEGIES = ("scratch", "finetune", "frozen")


def make_rows(strategy: str, cases=CASES, labels=(1, 2)) -> list[dict]:
    base = np.random.default_rng(0)
    noise = np.random.default_rng(STRATEGIES.index(strategy) + 1)
    rows = []
    for i, case in enumerate(CASES):
        for lab in labels:
            b_dice, b_hd = base.uniform(0.55, 0.8), base.uniform(2, 9)
            shift = {"scratch": 0.0, "finetune": 0.1, "frozen": 0.0}.get(strategy, 0.0)
            row = {**empty_label_metrics(), "case": case, "label": lab,
                   "dice": float(np.clip(b_dice + shift + noise.normal(0, 0.02), 0, 1)),
                   "hd95": float(b_hd - 20 * shift + noise.normal(0, 0.5)),
                   "assd": float(b_hd / 3 + noise.normal(0, 0.2)),
                   "nsd": float(np.clip(b_dice + shift / 2 + noise.normal(0, 0.05), 0, 1)),
                   "precision": float(noise.uniform(0.6, 1.0)), "recall": float(noise.uniform(0.6, 1.0)),
                   "lesion_f1": float(noise.choice([0.5, 2 / 3, 1.0]))}
            if strategy == "frozen" and i == 3 and lab == 2:  # an empty prediction
                row.update(dice=0.0, hd95=math.inf, assd=math.inf, nsd=0.0)
            if case in cases:
                rows.append(row)
    return rows


def write_eval(folder: Path, rows, *, nsd=1.0, run=None, connectivity=26) -> Path:
    folder.mkdir(parents=True)
    (folder / "per_case.csv").write_text(rows_to_csv(rows))
    (folder / "summary.json").write_text(json.dumps({
        "nsd_tolerance_mm": nsd, "lesion_connectivity": connectivity, "run": None if run is None else str(run),
        "label_names": {"1": "organ", "2": "lesion"}, "cases": sorted({r["case"] for r in rows})}))
    return folder


@pytest.fixture
def evals(tmp_path):
    return [f"{s}={write_eval(tmp_path / s, make_rows(s))}" for s in STRATEGIES]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v: str):
    return None if v == "" else float(v)


def arrays(strategy, metric, label):
    by = {(r["case"], r["label"]): r[metric] for r in make_rows(strategy)}
    return np.array([by[(c, label)] for c in CASES])


@pytest.fixture
def frozen_gc():
    """statsmodels' Holm calls gc.collect() each time (slow with torch loaded); frozen objects are skipped."""
    gc.freeze()
    yield
    gc.unfreeze()


# dice: continuous; hd95: one infinite value
CHECKED = ("dice", "hd95")


def test_p_values_and_intervals_equal_scipy(evals, tmp_path, frozen_gc):
    res = compare_evaluations(evals, tmp_path / "cmp", baseline="scratch", metrics=CHECKED, n_resamples=RESAMPLES,
                              seed=3)
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    by = {(r["strategy"], r["metric"], int(r["label"])): r for r in rows}
    assert len(rows) == 3 * len(CHECKED) * 2
    for lab in (1, 2):
        for metric in CHECKED:
            b = arrays("scratch", metric, lab)
            p_t, p_w = [], []
            for s in ("finetune", "frozen"):
                x = arrays(s, metric, lab)
                ok = np.isfinite(x) & np.isfinite(b)
                d = x[ok] - b[ok]
                r = by[(s, metric, lab)]
                assert int(r["n_pairs"]) == ok.sum()
                assert num(r["mean_diff"]) == pytest.approx(d.mean(), abs=1e-12)
                if np.all(d == d[0]):
                    assert num(r["p_ttest"]) == 1.0 and num(r["ci_low"]) == num(r["ci_high"]) == d[0]
                    p_t.append(1.0)
                    p_w.append(1.0)
                    continue
                ci = stats.bootstrap((d,), np.mean, n_resamples=RESAMPLES, method="BCa",
                                     rng=np.random.default_rng(3)).confidence_interval
                assert num(r["ci_low"]) == pytest.approx(ci.low, abs=1e-12)
                assert num(r["ci_high"]) == pytest.approx(ci.high, abs=1e-12)
                t = stats.ttest_rel(x[ok], b[ok]).pvalue
                w = stats.wilcoxon(x[ok], b[ok]).pvalue
                assert num(r["p_ttest"]) == pytest.approx(t, abs=1e-12)
                assert num(r["p_wilcoxon"]) == pytest.approx(w, abs=1e-12)
                p_t.append(t)
                p_w.append(w)
            for s, a_t, a_w in zip(("finetune", "frozen"), multipletests(p_t, method="holm")[1],
                                   multipletests(p_w, method="holm")[1]):
                r = by[(s, metric, lab)]
                assert num(r["p_ttest_holm"]) == pytest.approx(a_t, abs=1e-12)
                assert num(r["p_wilcoxon_holm"]) == pytest.approx(a_w, abs=1e-12)
                assert num(r["p_adjusted"]) == num(r["p_ttest_holm"])  # --test ttest
                assert r["significant"] == str(a_t < 0.05)
            # Tukey's HSD on the cases finite for every strategy
            groups = {s: arrays(s, metric, lab) for s in STRATEGIES}
            ok = np.all([np.isfinite(g) for g in groups.values()], axis=0)
            tk = stats.tukey_hsd(*[groups[s][ok] for s in STRATEGIES])
            got = [t for t in res.tukey if t["metric"] == metric and t["label"] == lab]
            assert [(t["a"], t["b"]) for t in got] == [("scratch", "finetune"), ("scratch", "frozen"),
                                                      ("finetune", "frozen")]
            for t, (i, j) in zip(got, [(0, 1), (0, 2), (1, 2)]):
                assert t["p"] == pytest.approx(tk.pvalue[i, j], abs=1e-12)
                assert t["mean_diff"] == pytest.approx(tk.statistic[i, j], abs=1e-12)
                assert t["ci_low"] == pytest.approx(tk.confidence_interval(0.95).low[i, j], abs=1e-12)
            assert num(by[("finetune", metric, lab)]["p_tukey"]) == pytest.approx(tk.pvalue[0, 1], abs=1e-12)
    # descriptive statistics over the finite values, the baseline without test columns
    x = arrays("frozen", "hd95", 2)
    r = by[("frozen", "hd95", 2)]
    fin = x[np.isfinite(x)]
    assert (int(r["n"]), int(r["n_infinite"])) == (11, 1)
    assert num(r["mean"]) == pytest.approx(fin.mean()) and num(r["sd"]) == pytest.approx(fin.std(ddof=1))
    assert num(r["median"]) == pytest.approx(np.median(fin))
    base = by[("scratch", "dice", 1)]
    assert all(base[c] == "" for c in ("n_pairs", "mean_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon",
                                       "p_adjusted", "significant"))
    assert base["label_name"] == "organ"


@pytest.mark.parametrize("test", ["ttest", "wilcoxon"])
def test_uncorrected_p_values_are_scipys_raw_p(evals, tmp_path, frozen_gc, test):
    """--correction none (the papers' protocol): p_adjusted is scipy's paired test as it comes, significance is
    raw p < alpha; the Holm columns are still statsmodels' Holm."""
    compare_evaluations(evals, tmp_path / "cmp", baseline="scratch", metrics=CHECKED, test=test, correction="none",
                        alpha=0.05, n_resamples=RESAMPLES, plots=False)
    by = {(r["strategy"], r["metric"], int(r["label"])): r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    for lab in (1, 2):
        for metric in CHECKED:
            b = arrays("scratch", metric, lab)
            raw = {}
            for s in ("finetune", "frozen"):
                x = arrays(s, metric, lab)
                ok = np.isfinite(x) & np.isfinite(b)
                fn = stats.ttest_rel if test == "ttest" else stats.wilcoxon
                raw[s] = float(fn(x[ok], b[ok]).pvalue)
                r = by[(s, metric, lab)]
                assert num(r["p_adjusted"]) == pytest.approx(raw[s], abs=1e-12)
                assert r["significant"] == str(raw[s] < 0.05)
            holm = multipletests([raw["finetune"], raw["frozen"]], method="holm")[1]
            for s, a in zip(("finetune", "frozen"), holm):
                assert num(by[(s, metric, lab)][f"p_{test}_holm"]) == pytest.approx(a, abs=1e-12)
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["correction"] == "none"
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "uncorrected, as in the papers" in md and "Holm-corrected" not in md


def test_correction_changes_the_marks_where_holm_would_not(tmp_path, frozen_gc):
    """Two strategies whose raw p are 0.03 and 0.04 (both < 0.05): Holm makes them 0.06 and 0.06 (not marked),
    none keeps them marked. Built from fixed differences so that ttest_rel gives those p exactly."""
    from scipy.optimize import brentq

    base = make_rows("scratch")
    cases = CASES
    rng = np.random.default_rng(7)
    z = rng.standard_normal(len(cases))
    z = (z - z.mean()) / z.std(ddof=1)

    def shifted(target_p):
        # d = m + z: t = m * sqrt(n); choose m so that the two-sided p is target_p
        m = brentq(lambda m: stats.ttest_1samp(m + z, 0).pvalue - target_p, 1e-6, 10)
        d = dict(zip(cases, m + z))
        return [{**r, "dice": r["dice"] + 0.01 * d[r["case"]]} for r in base]

    folders = [write_eval(tmp_path / n, rows) for n, rows in
               (("scratch", base), ("a", shifted(0.03)), ("b", shifted(0.04)))]
    out = {}
    for corr in ("holm", "none"):
        res = compare_evaluations([f"{f.name}={f}" for f in folders], tmp_path / corr, metrics=["dice"],
                                  correction=corr, n_resamples=RESAMPLES, plots=False)
        out[corr] = {r["strategy"]: r for r in res.rows if r["label"] == 1}
    assert out["none"]["a"]["p_adjusted"] == pytest.approx(0.03, abs=1e-9)
    assert out["none"]["b"]["p_adjusted"] == pytest.approx(0.04, abs=1e-9)
    assert out["none"]["a"]["significant"] and out["none"]["b"]["significant"]
    holm = multipletests([0.03, 0.04], method="holm")[1]
    assert [out["holm"][s]["p_adjusted"] for s in "ab"] == pytest.approx(list(holm), abs=1e-9)
    assert not out["holm"]["a"]["significant"] and not out["holm"]["b"]["significant"]


def test_wilcoxon_can_mark_significance(evals, tmp_path):
    compare_evaluations(evals, tmp_path / "cmp", test="wilcoxon", metrics=["dice"], n_resamples=RESAMPLES,
                        plots=False)
    r = next(r for r in read_csv(tmp_path / "cmp" / "comparison.csv")
             if r["strategy"] == "finetune" and r["metric"] == "dice" and r["label"] == "1")
    assert r["p_adjusted"] == r["p_wilcoxon_holm"] and r["significant"] == "True"


def test_markdown_table_and_plots(evals, tmp_path):
    from matplotlib.image import imread

    res = compare_evaluations(evals, tmp_path / "cmp", metrics=["dice", "hd95", "nsd"], n_resamples=RESAMPLES)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## label 1 (organ)" in md and "## label 2 (lesion)" in md
    rows = {(r["strategy"], r["metric"], r["label"]): r for r in res.rows}
    fin = rows[("finetune", "dice", 1)]
    # finetune is best in Dice and significantly better than the baseline: bold and starred
    cell = f"**{fin['mean']:.3f} ± {fin['sd']:.3f}***"
    line = next(ln for ln in md.splitlines() if ln.startswith("| finetune |"))
    assert line.split(" | ")[1] == cell
    assert next(ln for ln in md.splitlines() if ln.startswith("| scratch (baseline) |"))
    label2 = md.split("## label 2")[1]
    frozen = next(ln for ln in label2.splitlines() if ln.startswith("| frozen |"))
    assert "(1 inf)" in frozen
    for name in ("boxplot_label1.png", "boxplot_label2.png"):
        img = imread(tmp_path / "cmp" / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert not (tmp_path / "cmp" / "learning_curves.png").exists()  # no run named
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["baseline"] == "scratch" and doc["cases"] == CASES and doc["excluded_cases"] == {}


def test_identical_strategies(tmp_path):
    rows = make_rows("scratch")
    a, b = write_eval(tmp_path / "a", rows), write_eval(tmp_path / "b", rows)
    res = compare_evaluations([a, b], tmp_path / "cmp", metrics=["dice", "hd95"], n_resamples=RESAMPLES,
                              plots=False)
    for r in res.rows:
        if r["strategy"] == "b":
            assert (r["p_ttest"], r["p_wilcoxon"], r["ci_low"], r["ci_high"], r["mean_diff"]) == (1.0, 1.0, 0, 0, 0)
    assert paired_comparison([1.0], [2.0])["p_ttest"] is None  # one pair: nothing to test


def fake_run(folder: Path, *, trainable: int, total: int, ema: list[float], epoch_s: float) -> Path:
    folder.mkdir(parents=True)
    starts = [100.0 + i * epoch_s for i in range(len(ema))]
    ema = [np.float32(v) for v in ema]  # as nnU-Net logs them
    logging = {"ema_fg_dice": ema, "mean_fg_dice": ema, "epoch_start_timestamps": starts,
               "epoch_end_timestamps": [s + epoch_s * 0.9 for s in starts]}
    torch.save({"logging": logging, "trainer_name": "T"}, folder / "checkpoint_final.pth")
    (folder / "transfer_config.json").write_text(json.dumps({"trainer": "T", "parameters": {
        "trainable": trainable, "frozen": total - trainable, "total": total}}))
    return folder


def test_runs_give_trainable_share_and_time_to_convergence(tmp_path):
    slow = fake_run(tmp_path / "r1" / "fold_0", trainable=1000, total=1000, ema=[0.1, 0.3, 0.5, 0.6, 0.7, 0.702],
                    epoch_s=10.0)
    fast = fake_run(tmp_path / "r2" / "fold_0", trainable=370, total=1000, ema=[0.3, 0.697, 0.7, 0.7, 0.7, 0.7],
                    epoch_s=8.0)
    a = write_eval(tmp_path / "a", make_rows("scratch"), run=slow)
    b = write_eval(fast / "test_eval", make_rows("finetune"))  # names its run by sitting in the fold folder
    res = compare_evaluations([f"scratch={a}", f"finetune={b}"], tmp_path / "cmp", metrics=["dice"],
                              n_resamples=RESAMPLES)
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    infos = {s["name"]: s["run_info"] for s in doc["strategies"]}
    for name, fold in (("scratch", slow), ("finetune", fast)):
        log = torch.load(fold / "checkpoint_final.pth", weights_only=False)["logging"]
        want = log_convergence({k: [float(v) for v in vals] for k, vals in log.items()})
        got = infos[name]["convergence"]
        assert (got["epoch"], got["seconds"], got["seconds_per_epoch"]) == \
            (want["epoch"], want["seconds"], want["seconds_per_epoch"])
    assert infos["finetune"]["convergence"]["epochs_to_converge"] == 2  # 0.697 >= 0.995 * 0.7
    assert infos["scratch"]["convergence"]["epochs_to_converge"] == 5
    assert infos["finetune"]["trainable_share"] == 0.37 and infos["scratch"]["trainable_share"] == 1.0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| finetune | 37.0 % (370 of 1,000) | 6 | 2 | **15.2** | 7.20 |" in md
    assert "| scratch | 100.0 % (1,000 of 1,000) | 6 | 5 | 49.0 | 9.00 |" in md
    assert (tmp_path / "cmp" / "learning_curves.png").is_file()
    assert res.strategies[1].run == fast.resolve()


# --------------------------------------------------------------------------- bad input
def _fails(evals, out: Path, match: str, **kw):
    with pytest.raises(DataError, match=match):
        compare_evaluations(evals, out, n_resamples=RESAMPLES, **kw)
    assert not out.exists()


def test_mismatched_case_sets_are_listed_never_dropped(tmp_path):
    a = write_eval(tmp_path / "a", make_rows("scratch"))
    b = write_eval(tmp_path / "b", make_rows("finetune", cases=CASES[2:]))
    _fails([a, b], tmp_path / "cmp", r"b lacks 2: case_00, case_01.*--allow-missing")
    res = compare_evaluations([a, b], tmp_path / "cmp", allow_missing=True, metrics=["dice"], n_resamples=RESAMPLES,
                              plots=False)
    assert res.cases == CASES[2:] and res.excluded == {"case_00": ["b"], "case_01": ["b"]}
    assert "- case_00: missing from b" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_other_bad_input(evals, tmp_path):
    out = tmp_path / "cmp"
    _fails(evals, out, "--baseline 'nope' is not one of the strategies: scratch, finetune, frozen", baseline="nope")
    _fails(evals, out, "unknown metric", metrics=["dice", "volume"])
    _fails(evals, out, r"--correction 'bonferroni' is not one of holm, none", correction="bonferroni")
    _fails(evals[:1], out, "at least two EVAL folders")
    _fails([evals[0], evals[0]], out, "several EVAL folders are named 'scratch'")
    _fails([evals[0], str(tmp_path / "missing")], out, "does not exist")
    other = write_eval(tmp_path / "t2", make_rows("finetune"), nsd=2.0)
    _fails([evals[0], other], out, "different NSD tolerances")
    one_label = write_eval(tmp_path / "l1", make_rows("finetune", labels=(1,)))
    _fails([evals[0], one_label], out, "evaluated different labels")
    (tmp_path / "broken").mkdir()
    _fails([evals[0], tmp_path / "broken"], out, "per_case.csv not found")


def test_command_line(evals, tmp_path, capsys):
    assert main(["compare", *evals, "--baseline", "finetune", "-o", str(tmp_path / "cmp"), "--metrics", "dice",
                 "hd95", "--resamples", "200", "--no-plots"]) == 0
    assert "compared 3 strategies on 12 cases (baseline finetune)" in capsys.readouterr().out
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert {r["metric"] for r in rows} == {"dice", "hd95"}
    assert all(r["p_ttest"] == "" for r in rows if r["strategy"] == "finetune")
    assert main(["compare", *evals, "-o", str(tmp_path / "c3"), "--metrics", "dice", "--resamples", "200",
                 "--no-plots", "--correction", "none"]) == 0
    rows = read_csv(tmp_path / "c3" / "comparison.csv")
    assert all(r["p_adjusted"] == r["p_ttest"] for r in rows) and any(r["p_adjusted"] for r in rows)
    capsys.readouterr()
    assert main(["compare", *evals, "--baseline", "x", "-o", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnunet_transfer compare: error: --baseline 'x'")
