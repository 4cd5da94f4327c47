"""``nnunet_transfer compare EVAL… --baseline NAME -o OUT``: paired tests between strategies, as the papers do."""
from __future__ import annotations

from nnunet_transfer.cli import add_trust_argument
from nnunet_transfer.experiments.compare import DEFAULT_METRICS
from nnunet_transfer.experiments.paired import CORRECTIONS
from nnunet_transfer.experiments.metrics import METRIC_COLUMNS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare strategies on the same test cases: paired t/Wilcoxon tests (Holm), bootstrap "
                        "CIs, Tukey HSD, tables, box plots, time to convergence",
        description="Compare evaluate outputs (EVAL = NAME=FOLDER or FOLDER, named by the folder) case by case. "
                    "Per strategy, metric and label: mean, sd, median; against the baseline: mean difference "
                    "with a bootstrap 95%% CI, paired t-test and Wilcoxon signed-rank test, Holm-corrected over "
                    "the comparisons (--correction none: uncorrected); Tukey's HSD across all strategies. Writes comparison.csv, comparison.md "
                    "(best in bold, * significant), comparison.json, tukey.csv, box plots and, for EVAL folders "
                    "that name their run, the trainable share, time to convergence and learning curves.")
    p.add_argument("evals", nargs="+", metavar="EVAL", help="evaluate output folder, optionally NAME=FOLDER")
    p.add_argument("--baseline", default=None, metavar="NAME", help="strategy the others are tested against "
                                                                    "(default: the first EVAL)")
    p.add_argument("-o", "--out", dest="out", required=True, help="output folder")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="M",
                   help=f"metrics to compare (default {' '.join(DEFAULT_METRICS)}; any of {', '.join(METRIC_COLUMNS)})")
    p.add_argument("--test", default="ttest", choices=["ttest", "wilcoxon"],
                   help="test whose p (under --correction) marks significance (default ttest, as Karimi et al.; "
                        "both are always reported)")
    p.add_argument("--correction", default="holm", choices=list(CORRECTIONS),
                   help="multiple-comparison correction of the marked p: holm (default; Holm over the strategies "
                        "compared with the baseline) or none (uncorrected, the papers' protocol: Karimi et al. "
                        "Tables 3-6, Sagie et al.); the Holm columns are written either way")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                   help="compare on the cases every strategy has (the others are listed) instead of refusing")
    p.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples (default 9999)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG figures")
    add_trust_argument(p)  # the runs' checkpoint_final.pth (training log) for time to convergence
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_transfer.experiments.compare import compare_evaluations

    result = compare_evaluations(args.evals, args.out, baseline=args.baseline, metrics=args.metrics, test=args.test,
                                 alpha=args.alpha, correction=args.correction, allow_missing=args.allow_missing, n_resamples=args.resamples,
                                 seed=args.seed, plots=args.plots)
    print(result.text())
    return 0
