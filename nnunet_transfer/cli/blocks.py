"""``nnunet_transfer blocks``: the block table of the network a plans configuration builds.

Shows what a block spec (``--spec``) selects before any training is started: block number, group,
modules, parameter count and share of the total, depth under Amiri's two schemes, resolution level.
"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "blocks", help="print the U-Net blocks of a plans configuration (and what a spec selects)",
        description="Build the network nnU-Net would build for the plans configuration (random "
                    "init, CPU) and print its blocks. A spec is terms joined by '+': a group "
                    "(encoder, bottleneck, decoder, seg, all), block numbers 'blocks:1,2,8-9', or a "
                    "preset (whole, contracting, expanding, exceptBottleneck, bottleneck, outer, "
                    "inner, first, last, firstLast, first2, deepEncoder); ':norm', ':bias' or ':kernel' "
                    "narrows a term to that kind of parameter (all:norm+seg = norm-only tuning, "
                    "all:bias+seg = BitFit) and the train column shows the count per block.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--spec", help="mark the blocks this spec selects (a 'train' column), e.g. contracting+seg")
    what.add_argument("-tr", dest="trainer",
                      help="mark what this freezing trainer trains with its defaults: its spec ('trainable') and the "
                           "segmentation heads unless it keeps them frozen (freeze_seg), e.g. "
                           "nnUNetTrainerPartialFT_exceptBottleneck")
    p.add_argument("--json", action="store_true", help="print JSON (with parameter names) instead of a table")
    p.set_defaults(func=run)


def trainer_spec(name: str) -> str:
    """The block spec a freezing trainer trains with its defaults: ``trainable``, plus ``seg`` unless
    ``freeze_seg`` (the heads are not part of a spec; the trainers decide them, e.g. Amiri's presets freeze
    them exactly when block 2N−1 is left out)."""
    import nnunet_transfer.trainers as trainers
    from nnunet_transfer.errors import ConfigError

    if name not in trainers.__all__:
        raise ConfigError(f"-tr {name}: not a trainer of nnunet_transfer; give one of its freezing trainers, e.g. "
                          f"nnUNetTrainerPartialFT_exceptBottleneck or nnUNetTrainerFrozenEncoder")
    defaults = getattr(trainers, name).transfer_defaults
    trainable = defaults.get("trainable")
    if not trainable:
        raise ConfigError(f"-tr {name}: this trainer freezes no blocks by default (no 'trainable' spec); give the "
                          f"blocks with --spec instead")
    return trainable if defaults.get("freeze_seg") else f"{trainable}+seg"


def run(args) -> int:
    import json

    from nnunet_transfer.blocks import BlockModel
    from nnunet_transfer.nnunet_io import build_network, load_dataset_json, load_plans

    if args.trainer:
        args.spec = trainer_spec(args.trainer)
    plans = load_plans(args.dataset, args.plans)
    network = build_network(plans, args.configuration, load_dataset_json(args.dataset))
    model = BlockModel.from_network(network)
    if args.json:
        data = model.to_dict(args.spec)
        data = {"dataset": plans.get("dataset_name", str(args.dataset)), "plans": args.plans,
                "configuration": args.configuration, **data}
        print(json.dumps(data, indent=2))
    else:
        print(f"{plans.get('dataset_name', args.dataset)} / {args.plans} / {args.configuration}")
        if args.trainer:
            print(f"{args.trainer} trains {args.spec} (its defaults; the heads are 'seg')")
        print(model.table(args.spec))
        if args.spec and not args.trainer:
            print("Note: the heads (seg) train only where the spec names them; a freezing trainer also trains them "
                  "unless freeze_seg=true: -tr TRAINER shows what a trainer trains")
    return 0
