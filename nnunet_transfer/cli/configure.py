"""``nnunet_transfer configure``: add a plans configuration carrying nnunet_transfer settings."""
from __future__ import annotations

from nnunet_transfer.errors import ConfigError


def add_parser(sub) -> None:
    from nnunet_transfer.config import TransferConfig

    settings = "\n".join(f"  {k} (default {d!r}): {doc}" for k, (d, doc) in TransferConfig.docs().items())
    p = sub.add_parser(
        "configure", help="add a configuration (inherits a base one) with transfer settings",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        description="Write configuration NEW into the dataset's preprocessed plans. It inherits BASE, so "
                    "the preprocessed data is reused and runs get their own results folder.\n\n"
                    "Settings (--set key=value):\n" + settings)
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="base", required=True, help="base configuration, e.g. 3d_fullres")
    p.add_argument("-n", dest="new", required=True, help="name of the new configuration")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting; repeat for several")
    p.add_argument("--features", help="features per stage, e.g. 8,16,32 (sets the number of stages)")
    p.add_argument("--patch", help="patch size, e.g. 32,32,32")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--force", action="store_true", help="replace an existing configuration NEW")
    p.set_defaults(func=run)


def parse_settings(items: list[str]) -> dict:
    from nnunet_transfer.config import parse_cli_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_cli_value(key.strip(), value)
    return out


def run(args) -> int:
    from nnunet_transfer.plans.configure import configure

    path = configure(args.dataset, base=args.base, new=args.new, plans_identifier=args.plans,
                     settings=parse_settings(args.settings), features=args.features,
                     patch=args.patch, batch_size=args.batch_size, force=args.force)
    print(f"configuration {args.new!r} (inherits {args.base!r}) written to {path}")
    return 0
