"""``nnunet_transfer analyze compare|evolution|groups|reuse|weights``: representation analysis of runs.

Thin over :mod:`nnunet_transfer.analysis.karimi`. A network (NET) is a checkpoint file, a fold folder
(its checkpoint_final.pth) or FOLD@EPOCH / FOLD@start / FOLD@converged / FOLD@final / @latest / @best.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager

from nnunet_transfer.cli import add_trust_argument

CONVERGENCE_HELP = ("curve of the convergence epoch (first snapshot epoch within --tolerance of its maximum): "
                    "ema = nnU-Net's moving average of the validation pseudo-Dice (default; one noisy epoch cannot "
                    "set the maximum), raw = its per-epoch pseudo-Dice, validation = a sliding-window validation "
                    "of every snapshot on the fold's validation cases (slower); written to convergence.json")

CASES_HELP = ("cases to draw patches from: test = the held-out test cases recorded by `splits` / `study plan` "
              "(splits_mapping.json), all = every preprocessed case (training cases included; the old default), "
              "a file (one identifier a line, or a JSON list), or identifiers a,b,c. Default: the test cases when "
              "they are known for the runs analysed, else all; the output says which")

NET_HELP = ("a checkpoint file, a fold folder (its checkpoint_final.pth), or FOLD@EPOCH, FOLD@start, "
            "FOLD@converged, FOLD@final, FOLD@latest, FOLD@best")


def _convergence(p: argparse.ArgumentParser) -> None:
    p.add_argument("--convergence-from", dest="convergence_from", default="ema", choices=["ema", "raw", "validation"],
                   help=CONVERGENCE_HELP)
    p.add_argument("--tolerance", type=float, default=0.005, help="convergence tolerance (default 0.005 = 0.5%%)")


def _common(p: argparse.ArgumentParser, *, data: bool = True, run_flags: bool = False) -> None:
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id (plans and preprocessed data)")
    p.add_argument("-c", dest="configuration", required=True,
                   help="configuration the networks were built with, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    if run_flags:
        p.add_argument("-tr", dest="trainer", help="trainer of the run (with -f, instead of RUN): "
                       "$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>")
        p.add_argument("-f", dest="fold", default="0", help="fold of the run given by -tr (default 0)")
    p.add_argument("-o", "--out", dest="out", required=True, help="output folder (JSON, CSV, PNG, summary.md)")
    add_trust_argument(p)
    p.add_argument("--layers", default=None,
                   help="block spec of the layers to hook (encoder, decoder, bottleneck, seg, all, "
                        "blocks:1,2,8-9, presets); default: blocks 1, ceil(N/2), N-1 and their decoder "
                        "mirrors 2N-k")
    p.add_argument("--seed", type=int, default=0, help="seed of patches, voxels, null baseline, pictures (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto: cuda if present")
    if data:
        p.add_argument("--patches", type=int, default=None,
                       help="number of patches (default: enough for >= 100 x channels samples in every layer, "
                            "at least 16)")
        p.add_argument("--voxels-per-patch", dest="voxels_per_patch", type=int, default=512,
                       help="voxels sampled per patch and layer (default 512)")
        p.add_argument("--foreground", type=float, default=0.0,
                       help="probability that a patch is centred on foreground (default 0: uniform locations, as "
                            "Karimi et al.; 0.33 is nnU-Net's sampler, the old default)")
        p.add_argument("--cases", default=None, help=CASES_HELP)
        p.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                       help="patches per forward pass (default 1)")
        p.add_argument("--measure", default="pwcca", choices=["pwcca", "mean_cca", "svcca", "linear_cka"],
                       help="measure of plots, summaries and tests (default pwcca = RSIM); tables hold all")
        p.add_argument("--pwcca-side", dest="side", default="fewer", choices=["fewer", "x", "y", "sym"],
                       help="PWCCA weighting: fewer (default) = by the network with fewer live channels, the first "
                            "on a tie, as Morcos et al.'s reference (google/svcca compute_pwcca), on centred "
                            "activations; x / y = by the first / second network of each pair; sym = the mean of "
                            "both (the old default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="representation analysis: compare, evolution, groups, reuse, weights",
        description="Similarity of layer representations (mean CCA, SVCCA, PWCCA/RSIM, linear CKA, each with a "
                    "null baseline) on patches of nnU-Net's preprocessed data, streamed (memory independent "
                    "of the number of patches), and weight change. NET is " + NET_HELP + ".")
    ps = p.add_subparsers(dest="analyze_command", metavar="STUDY")
    ps.required = True

    c = ps.add_parser("compare", help="two or more networks, layer by layer",
                      description="Similarity of every selected layer between networks: all pairs, or each "
                                  "against the first (--reference first).")
    c.add_argument("networks", nargs="+", metavar="NET", help=NET_HELP)
    c.add_argument("--reference", default="all", choices=["all", "first"], help="all pairs (default) or vs the first")
    _common(c)
    c.set_defaults(func=run_compare)

    e = ps.add_parser("evolution", help="a run's snapshots against its convergence epoch (Karimi Fig. 6-7)",
                      description="Similarity of each snapshot's layers to the same layers at the convergence "
                                  "epoch: the first snapshot epoch whose validation curve (--convergence-from, default "
                                  "nnU-Net's EMA pseudo-Dice) is within 0.5 percent of its maximum, unless "
                                  "--convergence-epoch is given.")
    e.add_argument("run", nargs="?", metavar="RUN", help="fold folder with snapshots (or -tr/-f)")
    e.add_argument("--convergence-epoch", dest="convergence_epoch", type=int, default=None,
                   help="use this snapshot epoch as the reference")
    _convergence(e)
    _common(e, run_flags=True)
    e.set_defaults(func=run_evolution)

    g = ps.add_parser("groups", help="within/between-group similarity + permutation and Welch tests (Table 8)",
                      description="RSIM within and between named groups of networks per layer, a permutation "
                                  "test over network labels (pairs are not independent) and Welch t-tests.")
    g.add_argument("--group", action="append", required=True, metavar="NAME=NET,NET,...",
                   help="a named group; repeat, e.g. --group RI=runA,runB --group TL=runC,runD")
    g.add_argument("--permutations", type=int, default=10000, help="label permutations (default 10000; exact when fewer exist)")
    _common(g)
    g.set_defaults(func=run_groups)

    r = ps.add_parser("reuse", help="feature reuse per layer from RI and TL runs (Table 9)",
                      description="reuse = mean RSIM(start, converged) over TL runs - the same over RI runs; "
                                  "start is each run's epoch-0 snapshot.")
    r.add_argument("--ri", action="append", required=True, metavar="RUN,RUN", help="random-init runs (fold folders)")
    r.add_argument("--tl", action="append", required=True, metavar="RUN,RUN", help="transfer runs (fold folders)")
    r.add_argument("--converged", default="convergence", choices=["convergence", "final"],
                   help="end state: the convergence-epoch snapshot (default) or checkpoint_final")
    _convergence(r)
    _common(r)
    r.set_defaults(func=run_reuse)

    w = ps.add_parser("weights", help="per-filter and pooled ||dw||/||w0|| per conv/block/group; filter and "
                                      "feature-map pictures",
                      description="Weight change between START and END: per conv, block and group the mean over "
                                  "filters of ||w1[f] - w0[f]|| / ||w0[f]|| and of | ||w1[f]|| - ||w0[f]|| | / "
                                  "||w0[f]|| (two readings of Karimi et al.'s filter change) and the pooled "
                                  "||W1 - W0|| / ||W0||. With one RUN: its start (epoch-0 snapshot, else "
                                  "start_weights.pth) against the snapshot at its convergence epoch when it has "
                                  "snapshots (--converged convergence, default), else checkpoint_final. Filters "
                                  "(middle slice) and feature maps of the selected layers.")
    w.add_argument("networks", nargs="*", metavar="NET", help="RUN, or START END (or -tr/-f for a run)")
    w.add_argument("--filters", type=int, default=8, help="filters / feature maps drawn per layer (default 8)")
    w.add_argument("--no-feature-maps", dest="feature_maps", action="store_false",
                   help="skip feature maps (then no preprocessed data is read)")
    w.add_argument("--converged", default="convergence", choices=["convergence", "final"],
                   help="end state of a RUN: the convergence-epoch snapshot (default, when it has snapshots) or "
                        "checkpoint_final")
    _convergence(w)
    _common(w, data=False, run_flags=True)
    w.add_argument("--foreground", type=float, default=0.0,
                   help="probability that patch 0 is centred on foreground (default 0; 0.33 as nnU-Net's sampler)")
    w.add_argument("--cases", default=None, help="cases to draw the feature-map patch from: " + CASES_HELP)
    w.set_defaults(func=run_weights)


def _split(items: list[str] | None) -> list[str]:
    return [x.strip() for item in items or [] for x in item.split(",") if x.strip()]


def _options(args, data: bool = True) -> dict:
    opts = {"layers": args.layers, "seed": args.seed, "device": args.device, "progress": args.progress}
    if data:
        opts |= {"patches": args.patches, "voxels_per_patch": args.voxels_per_patch,
                 "foreground": args.foreground, "cases": args.cases,
                 "batch_size": args.batch_size, "measure": args.measure, "side": args.side}
    return opts


def _where(args) -> dict:
    return {"dataset": args.dataset, "configuration": args.configuration, "plans": args.plans, "out": args.out}


def _run_folder(args, given: str | None) -> str:
    from nnunet_transfer.errors import ConfigError

    if given:
        if args.trainer:
            raise ConfigError("give either RUN or -tr/-f, not both")
        return given
    if not args.trainer:
        raise ConfigError("give the run: a fold folder (RUN) or -tr TRAINER [-f FOLD]")
    from nnunet_transfer.nnunet_io import dataset_name, env_folder

    fold = "fold_all" if args.fold == "all" else f"fold_{args.fold}"
    return str(env_folder("nnUNet_results") / dataset_name(args.dataset)
               / f"{args.trainer}__{args.plans}__{args.configuration}" / fold)


def _report(result: dict) -> int:
    print(result["summary"])
    print()
    print(f"wrote {len(result['files'])} files to {result['out']}")
    return 0


@contextmanager
def _one_line_warnings():
    """Warnings as one line each on stderr: ``nnunet_transfer analyze: warning: …``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"nnunet_transfer analyze: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _call(fn, *a, **kw) -> int:
    with _one_line_warnings():
        return _report(fn(*a, **kw))


def run_compare(args) -> int:
    from nnunet_transfer.analysis.karimi import run_compare as api

    return _call(api, args.networks, reference=args.reference, **_where(args), **_options(args))


def run_evolution(args) -> int:
    from nnunet_transfer.analysis.karimi import run_evolution as api

    return _call(api, _run_folder(args, args.run), convergence_epoch=args.convergence_epoch,
                 tolerance=args.tolerance, convergence_from=args.convergence_from, **_where(args), **_options(args))


def run_groups(args) -> int:
    from nnunet_transfer.errors import ConfigError
    from nnunet_transfer.analysis.karimi import run_groups as api

    groups: dict[str, list[str]] = {}
    for item in args.group:
        name, sep, nets = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--group expects NAME=NET,NET,..., got {item!r}")
        if name.strip() in groups:
            raise ConfigError(f"group {name.strip()!r} is given twice")
        groups[name.strip()] = _split([nets])
    return _call(api, groups, permutations=args.permutations, **_where(args), **_options(args))


def run_reuse(args) -> int:
    from nnunet_transfer.analysis.karimi import run_reuse as api

    return _call(api, _split(args.ri), _split(args.tl), converged=args.converged, tolerance=args.tolerance,
                 convergence_from=args.convergence_from, **_where(args), **_options(args))


def run_weights(args) -> int:
    from nnunet_transfer.errors import ConfigError
    from nnunet_transfer.analysis.karimi import run_weights as api

    nets = list(args.networks)
    if len(nets) > 2:
        raise ConfigError(f"weights takes RUN or START END, got {len(nets)} networks")
    if len(nets) == 2:
        if args.trainer:
            raise ConfigError("give either START END or -tr/-f, not both")
        start, end = nets
    else:
        start, end = _run_folder(args, nets[0] if nets else None), None
    opts = _options(args, data=False) | {"foreground": args.foreground, "cases": args.cases}
    return _call(api, start, end, filters=args.filters, feature_maps=args.feature_maps, converged=args.converged,
                 convergence_from=args.convergence_from, tolerance=args.tolerance, **_where(args), **opts)
