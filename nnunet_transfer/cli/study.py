"""``nnunet_transfer study init|plan|run|status|report``: a whole transfer experiment from one study file."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "study", help="a whole transfer experiment from one study file: plan, run (local or SLURM), status, report",
        description="A study file (TOML) declares the target, the pretrained checkpoint(s), the strategies, the "
                    "training-set sizes, repeats and folds, the schedule and the scoring. `plan` expands it into "
                    "runs (strategy x size x repeat x fold) and writes their configurations and splits; `run` "
                    "trains, predicts and evaluates every run that is not done (resumable); `status` shows the "
                    "runs; `report` compares the strategies per size and writes report.md with plots.")
    verbs = p.add_subparsers(dest="study_command", metavar="VERB")
    verbs.required = True

    i = verbs.add_parser("init", help="write a study file with one paper's protocol",
                         description="Write a study file with the protocol of Karimi et al. 2021 (from scratch, "
                                     "fine-tune, random frozen encoder, two frozen-decoder variants at several "
                                     "target sizes), Amiri et al. 2020 (12 block-wise strategies + from scratch, "
                                     "5-fold, 80/50/5 %% of the data) or Sagie et al. 2021 (L2-SP lambda in "
                                     "0, 1, 2, 4, 8, 16, 50, inf, decoder from scratch), sized for the target.")
    i.add_argument("--template", required=True, choices=("karimi", "amiri", "sagie"))
    i.add_argument("-d", dest="dataset", required=True, help="target dataset (id or name), preprocessed with the "
                                                             "source's plans")
    i.add_argument("--pretrained", required=True, metavar="CKPT",
                   help="the source model: a checkpoint file or a finished fold folder")
    i.add_argument("-o", dest="out", required=True, metavar="FILE", help="study file to write (.toml)")
    i.add_argument("-c", dest="configuration", default="3d_fullres",
                   help="base configuration of the target plans (default 3d_fullres)")
    i.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    i.add_argument("--name", default=None, help="study name (names its configurations; default the template's)")
    i.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"), help="-device of training/prediction")
    i.add_argument("--force", action="store_true", help="replace an existing file")
    i.set_defaults(func=run_init)

    pl = verbs.add_parser("plan", help="expand the file into its runs; write configurations, splits, test folders",
                          description="Check the study file, expand it into one run per strategy x size x repeat x "
                                      "fold, write the plans configurations, the dataset's splits and the test "
                                      "folders it needs, and print the run table.")
    pl.add_argument("file", help="study file (.toml)")
    pl.set_defaults(func=run_plan)

    r = verbs.add_parser("run", help="train, predict and evaluate every run that is not done (resumable)",
                         description="Plan, then run every run that is not done: finished runs are skipped, "
                                     "interrupted ones continue with --c, a failed one is recorded with its log and "
                                     "the others go on. `--executor slurm` submits them as one SLURM job array "
                                     "through submitit, with the resources of the file's [slurm] table.")
    r.add_argument("file", help="study file (.toml)")
    r.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: one run after the other here (default); slurm: a job per run through submitit")
    r.add_argument("--only", default=None, metavar="PATTERN",
                   help="only these runs: a strategy name or a pattern over run ids, e.g. 'finetune__n6__*'")
    r.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="with --executor slurm: submitit's cluster; 'local' runs the jobs as local processes "
                        "(submitit's LocalExecutor: the SLURM code path without a cluster)")
    r.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs and report them")
    r.set_defaults(func=run_run)

    s = verbs.add_parser("status", help="a table of the runs: state, epoch, elapsed, job id")
    s.add_argument("file", help="study file (.toml)")
    s.set_defaults(func=run_status)

    rr = verbs.add_parser("replay-racing", help="simulate [racing] on a study that ran in full",
                          description="From the EMA pseudo-Dice curves logged in the runs' checkpoint_final.pth, "
                                      "simulate racing: which strategies each size would have dropped at which rung, "
                                      "the training epochs saved, and whether the full study's winner and every "
                                      "strategy not significantly worse than it (paired test, Holm) survive.")
    rr.add_argument("file", help="study file (.toml) of a study that ran in full")
    rr.add_argument("--rule", choices=("paired", "halving"), default=None, help="default: the file's [racing]")
    rr.add_argument("--rungs", default=None, help="comma-separated epochs or fractions, e.g. 0.1,0.3")
    rr.set_defaults(func=run_replay)

    rep = verbs.add_parser("report", help="evaluate, compare per size, plot across sizes, write report.md",
                           description="Evaluate every done run on its test cases, compare the strategies per "
                                       "training-set size against the file's baseline, plot Dice against n_train "
                                       "(and against a swept setting), and write OUT/report.md.")
    rep.add_argument("file", help="study file (.toml)")
    rep.add_argument("-o", dest="out", required=True, help="output folder")
    rep.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    rep.set_defaults(func=run_report)


def run_init(args) -> int:
    from nnunet_transfer.study import init_study

    out = init_study(args.template, args.dataset, args.pretrained, args.out, configuration=args.configuration,
                     plans=args.plans, name=args.name, device=args.device, force=args.force)
    print(f"wrote {out} ({args.template}'s protocol); next: nnunet_transfer study plan {out}")
    return 0


def run_plan(args) -> int:
    from nnunet_transfer.study import prepare

    print(prepare(args.file).text())
    return 0


def run_run(args) -> int:
    from nnunet_transfer.study import run_study

    summary = run_study(args.file, executor=args.executor, only=args.only, cluster=args.cluster, wait=args.wait)
    print(summary.text())
    return 1 if summary.failed else 0


def run_status(args) -> int:
    from nnunet_transfer.study import study_status

    print(study_status(args.file).text())
    return 0


def run_replay(args) -> int:
    from nnunet_transfer.errors import ConfigError
    from nnunet_transfer.study import replay_racing

    rungs = None
    if args.rungs is not None:
        try:
            rungs = [float(x) if "." in x else int(x) for x in args.rungs.split(",")]
        except ValueError:
            raise ConfigError(f"--rungs {args.rungs!r} must be comma-separated epochs (10,30) or fractions "
                              f"(0.1,0.3)") from None
    print(replay_racing(args.file, rule=args.rule, rungs=rungs).text())
    return 0


def run_report(args) -> int:
    from nnunet_transfer.study import report_study

    print(report_study(args.file, args.out, plots=args.plots).text())
    return 0
