"""``nnunet_transfer plans transfer``: the source's plans for a target, ready to preprocess and fine-tune;
``plans from-checkpoint``: a target configuration for an nnssl checkpoint."""
from __future__ import annotations

from nnunet_transfer.cli import add_trust_argument


def add_parser(sub) -> None:
    p = sub.add_parser("plans", help="move plans between datasets for transfer learning",
                       description="Plans for transfer learning.")
    ps = p.add_subparsers(dest="plans_command", metavar="ACTION")
    ps.required = True
    t = ps.add_parser(
        "transfer", help="give a target dataset the source's plans (nnUNetv2_move_plans_between_datasets, fixed)",
        description="Do what nnUNetv2_move_plans_between_datasets does, plus: copy the target's dataset.json "
                    "into nnUNet_preprocessed, extract the target's fingerprint if missing, take the intensity "
                    "statistics (CT normalisation) from the target's own fingerprint, check that channels and "
                    "their normalisation fit and report label differences. Prints the next commands.")
    t.add_argument("-s", dest="source", required=True, metavar="SOURCE",
                   help="source dataset name or id (planned, pretrained), or a released model folder "
                        "(Trainer__Plans__Configuration/ with plans.json, dataset.json, fold_*/checkpoint_final.pth, "
                        "as nnUNetv2_install_pretrained_model_from_zip installs it; no source data needed)")
    t.add_argument("-t", dest="target", required=True, help="target dataset name or id (in nnUNet_raw)")
    t.add_argument("-sp", dest="source_plans", default=None,
                   help="source plans identifier (default nnUNetPlans; a model folder's own plans)")
    t.add_argument("-tp", dest="target_plans", default=None,
                   help="target plans identifier (default: the source's)")
    t.add_argument("--normalization", default=None, metavar="{target,source}",
                   help="intensity statistics for CT-normalised channels: the target's own (default) or the "
                        "source's (nnU-Net's behaviour; only right when both share one intensity scale). A target "
                        "whose dataset.json declares \"unannotated\" classes keeps the source's by default")
    t.add_argument("--allow-channel-change", action="store_true",
                   help="accept another channel count or channel normalisation; schemes then follow the "
                        "target's channel names (adapt the checkpoint with `weights adapt --in-channels K`)")
    t.add_argument("-c", dest="configuration", default=None, metavar="CONFIG",
                   help="configuration the printed next commands use (default: a model folder's own, else "
                        "3d_fullres)")
    t.add_argument("-np", dest="num_processes", type=int, default=None, metavar="N",
                   help="processes for fingerprint extraction, if it is needed (nnU-Net's default otherwise)")
    t.add_argument("--force", action="store_true",
                   help="replace existing target plans of that name (kept as <name>.json.bak)")
    t.set_defaults(func=run)
    f = ps.add_parser(
        "from-checkpoint",
        help="a target configuration built for an nnssl checkpoint (its architecture and patch size)",
        description="Write configuration NAME into the target's plans for the nnssl (self-supervised) checkpoint "
                    "CKPT: it inherits BASE (spacing, the target's own normalisation, preprocessed data) and takes "
                    "the checkpoint's architecture (class and kwargs), its recommended downstream patch size unless "
                    "--patch-size, and batch size 2 unless --batch-size (what nnU-Net master's "
                    "nnUNetv2_preprocess_like_nnssl writes). Checks that the network builds and the checkpoint's "
                    "encoder maps onto it before writing. Then: nnUNetv2_train TARGET NAME FOLD -tr STRATEGY "
                    "-pretrained_weights CKPT (the encoder and stem are loaded, the decoder starts fresh).")
    f.add_argument("-d", dest="dataset", required=True, metavar="TARGET", help="target dataset name or id (planned)")
    f.add_argument("-c", dest="checkpoint", required=True, metavar="CKPT", help="the nnssl checkpoint (.pth)")
    f.add_argument("-n", dest="name", required=True, metavar="NAME", help="name of the new configuration")
    f.add_argument("-p", dest="plans", default="nnUNetPlans", metavar="PLANS",
                   help="target plans identifier (default nnUNetPlans)")
    f.add_argument("--base", default="3d_fullres", help="configuration NAME inherits (default 3d_fullres)")
    f.add_argument("--patch-size", dest="patch_size", default=None, metavar="X,Y,Z",
                   help="patch size (default: the checkpoint's recommended_downstream_patchsize)")
    f.add_argument("--batch-size", dest="batch_size", type=int, default=None, metavar="B",
                   help="batch size (default 2)")
    f.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a transfer setting of the configuration (as `nnunet_transfer configure --set`); repeat")
    f.add_argument("--force", action="store_true", help="replace an existing configuration NAME")
    add_trust_argument(f)
    f.set_defaults(func=run_from_checkpoint)


def run(args) -> int:
    from nnunet_transfer.plans.transfer import transfer_plans

    result = transfer_plans(args.source, args.target, source_plans=args.source_plans,
                            target_plans=args.target_plans, normalization=args.normalization,
                            allow_channel_change=args.allow_channel_change, configuration=args.configuration,
                            num_processes=args.num_processes, force=args.force, echo=print)
    print(result.text())
    return 0


def run_from_checkpoint(args) -> int:
    from nnunet_transfer.cli.configure import parse_settings
    from nnunet_transfer.plans.from_checkpoint import from_checkpoint

    result = from_checkpoint(args.dataset, args.checkpoint, args.name, base=args.base, plans_identifier=args.plans,
                             patch_size=args.patch_size, batch_size=args.batch_size,
                             settings=parse_settings(args.settings), force=args.force)
    print(result.text())
    return 0
