"""``nnunet_transfer weights check|adapt``: will ``-pretrained_weights`` load this file, and make it load."""
from __future__ import annotations

from nnunet_transfer.cli import add_trust_argument

CHECKPOINT_HELP = ("nnU-Net checkpoint (.pth), a state dict, a fold folder or a one-fold model folder "
                   "(what nnUNetv2_install_pretrained_model_from_zip installs), or an nnssl checkpoint "
                   "(self-supervised; its encoder and stem are mapped, the decoder starts fresh)")


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="check a checkpoint against target plans; adapt it to them",
                       description="Pretrained weights for nnUNetv2_train -pretrained_weights.")
    ps = p.add_subparsers(dest="weights_command", metavar="ACTION")
    ps.required = True
    c = ps.add_parser(
        "check", help="report every mismatch between a checkpoint and the target network",
        description="Build the network nnU-Net builds for the target plans configuration and compare it with "
                    "the checkpoint under nnU-Net's rules: every key but '.seg_layers.' must exist with equal "
                    "shape. Reports all mismatches at once. Exit 0: -pretrained_weights will load it; 1: it "
                    "will not; 2: bad input.")
    c.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    c.add_argument("-d", dest="dataset", required=True, metavar="TARGET", help="target dataset name or id")
    c.add_argument("-c", dest="configuration", required=True, metavar="CONFIG", help="target configuration, e.g. 3d_fullres")
    c.add_argument("-p", dest="plans", default="nnUNetPlans", metavar="PLANS", help="target plans identifier (default nnUNetPlans)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    add_trust_argument(c)
    c.set_defaults(func=run_check)
    a = ps.add_parser(
        "adapt", help="write a checkpoint -pretrained_weights accepts: for the target's own plans (-d/-c) "
                      "and/or another input channel count",
        description="Write {'network_weights': ...} with wrapper prefixes stripped and tensors on the CPU.\n\n"
                    "With -d TARGET -c CONFIG [-p PLANS]: map the weights to the network the target's OWN plans "
                    "build, stages aligned by resolution. Equal name and shape: copied bit for bit. Another "
                    "kernel: per axis, removed axis (3->1) = sum along it (constant input keeps its response), "
                    "growing (1->3, 3->5) = centre-embed (exact), shrinking (5->3) = outer taps spread so that "
                    "the sum and first moment stay (constant and linear-ramp input keep their response); "
                    "transposed convolutions (kernel = stride): 2->1 = mean of the taps, 1->2 = tap repeated. "
                    "Extra target stages keep nnU-Net's initialisation (--seed), missing ones are dropped, convs "
                    "whose input width changed are re-initialised and listed, width or family differences are "
                    "not transferable (never reshaped). Prints the share of the target's parameters from the "
                    "source per block and in total, and writes it as JSON beside OUT (OUT.report.json).\n\n"
                    "With --in-channels K the first convolution takes K channels (also with -d): "
                    "repeat = new channel j is old channel j mod C, each filter split over its copies "
                    "(identical channels keep the original response); mean = the channel sum / K in every "
                    "channel (same response when all channels show the same image); first = the first "
                    "channel's filter / K in every channel (ignores the other source channels).")
    a.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    a.add_argument("-o", dest="output", required=True, metavar="OUT", help="output file")
    a.add_argument("-d", dest="dataset", default=None, metavar="TARGET",
                   help="target dataset name or id: adapt to the network of its plans (needs -c)")
    a.add_argument("-c", dest="configuration", default=None, metavar="CONFIG", help="target configuration (with -d)")
    a.add_argument("-p", dest="plans", default=None, metavar="PLANS",
                   help="target plans identifier (with -d; default nnUNetPlans)")
    a.add_argument("--in-channels", dest="in_channels", type=int, default=None, metavar="K",
                   help="input channels K of the target (omit to only rewrite the file)")
    a.add_argument("--method", default="repeat", metavar="{repeat,mean,first}", help="repeat (default), mean or first")
    a.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of nnU-Net's initialisation for the parts that do not come from the source (with -d; "
                        "default 0)")
    a.add_argument("--min-share", dest="min_share", type=float, default=None, metavar="X",
                   help="refuse (nothing written) when less than X (0..1) of the target's parameters outside the "
                        "segmentation heads would come from the source (with -d)")
    a.add_argument("--json", action="store_true", help="print the report as JSON (with -d)")
    a.add_argument("--force", action="store_true", help="replace an existing output file (and its report)")
    add_trust_argument(a)
    a.set_defaults(func=run_adapt)


def run_check(args) -> int:
    import json

    from nnunet_transfer.plans.adapt import check_to_plans

    report = check_to_plans(args.checkpoint, args.dataset, args.configuration, args.plans)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.loadable else 1


def run_adapt(args) -> int:
    from nnunet_transfer.errors import ConfigError

    with_plans = {"-c": args.configuration, "-p": args.plans, "--seed": args.seed if args.seed != 0 else None,
                  "--min-share": args.min_share, "--json": args.json or None}
    if args.dataset is None:
        given = [flag for flag, v in with_plans.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply when adapting to target plans: add -d TARGET -c CONFIG")
        return _adapt_channels(args)
    if args.configuration is None:
        raise ConfigError("-d TARGET needs -c CONFIG (the target configuration whose network the weights are for)")
    return _adapt_to_plans(args)


def _adapt_channels(args) -> int:
    from nnunet_transfer.plans.weights import adapt_weights

    result = adapt_weights(args.checkpoint, args.output, in_channels=args.in_channels, method=args.method,
                           force=args.force)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output}")
    return 0


def _adapt_to_plans(args) -> int:
    import json

    from nnunet_transfer.plans.adapt import adapt_to_plans, report_path

    report = adapt_to_plans(args.checkpoint, args.output, dataset=args.dataset, configuration=args.configuration,
                            plans=args.plans or "nnUNetPlans", in_channels=args.in_channels, method=args.method,
                            seed=args.seed, min_share=args.min_share, force=args.force)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.text())
        print(f"wrote {args.output} and {report_path(args.output)}")
    return 0
