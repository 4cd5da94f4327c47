"""``nnunet_transfer weights check|adapt``: will ``-pretrained_weights`` load this file, and make it load."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="check a checkpoint against target plans; adapt its input channels",
                       description="Pretrained weights for nnUNetv2_train -pretrained_weights.")
    ps = p.add_subparsers(dest="weights_command", metavar="ACTION")
    ps.required = True
    c = ps.add_parser(
        "check", help="report every mismatch between a checkpoint and the target network",
        description="Build the network nnU-Net builds for the target plans configuration and compare it with "
                    "the checkpoint under nnU-Net's rules: every key but '.seg_layers.' must exist with equal "
                    "shape. Reports all mismatches at once. Exit 0: -pretrained_weights will load it; 1: it "
                    "will not; 2: bad input.")
    c.add_argument("checkpoint", metavar="CHECKPOINT", help="nnU-Net checkpoint (.pth) or a state dict")
    c.add_argument("-d", dest="dataset", required=True, metavar="TARGET", help="target dataset name or id")
    c.add_argument("-c", dest="configuration", required=True, metavar="CONFIG", help="target configuration, e.g. 3d_fullres")
    c.add_argument("-p", dest="plans", default="nnUNetPlans", metavar="PLANS", help="target plans identifier (default nnUNetPlans)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run_check)
    a = ps.add_parser(
        "adapt", help="write a checkpoint -pretrained_weights accepts, first conv adapted to K channels",
        description="Write {'network_weights': ...} with wrapper prefixes stripped and tensors on the CPU. "
                    "With --in-channels K the first convolution (all its aliases) takes K channels: "
                    "repeat = new channel j is old channel j mod C, each filter split over its copies "
                    "(identical channels keep the original response); mean = the channel sum / K in every "
                    "channel (same response when all channels show the same image); first = the first "
                    "channel's filter / K in every channel (ignores the other source channels).")
    a.add_argument("checkpoint", metavar="CHECKPOINT", help="nnU-Net checkpoint (.pth) or a state dict")
    a.add_argument("-o", dest="output", required=True, metavar="OUT", help="output file")
    a.add_argument("--in-channels", dest="in_channels", type=int, default=None, metavar="K",
                   help="input channels K of the target (omit to only rewrite the file)")
    a.add_argument("--method", default="repeat", metavar="{repeat,mean,first}", help="repeat (default), mean or first")
    a.add_argument("--force", action="store_true", help="replace an existing output file")
    a.set_defaults(func=run_adapt)


def run_check(args) -> int:
    import json

    from nnunet_transfer.plans.weights import check_against_plans

    report = check_against_plans(args.checkpoint, args.dataset, args.configuration, args.plans)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.loadable else 1


def run_adapt(args) -> int:
    from nnunet_transfer.plans.weights import adapt_weights

    result = adapt_weights(args.checkpoint, args.output, in_channels=args.in_channels, method=args.method,
                           force=args.force)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output}")
    return 0
