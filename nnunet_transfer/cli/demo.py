"""``nnunet_transfer demo``: the whole pipeline on generated data, ending in a table per strategy."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate data, pretrain, transfer, compare strategies (CPU, minutes)",
                       description="Generate a source and a target dataset, plan and preprocess them "
                                   "with nnU-Net, pretrain on the source, fine-tune on the target with "
                                   "each strategy, predict the target test cases with nnUNetv2_predict "
                                   "and print a table of test Dice and training time. OUT is replaced.")
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out; replaced)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test, Dice meaningless)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_transfer.demo import QUICK, Schedule, run_demo

    run_demo(args.out, schedule=QUICK if args.quick else Schedule(), seed=args.seed)
    return 0
