"""``nnunet_transfer pool``: one raw dataset from several, for multi-centre pretraining."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pool", help="pool raw datasets with the same channels and labels into a new one",
        description="Create nnUNet_raw/DatasetNEW_NAME whose training cases are links to (or copies of) those "
                    "of the given datasets, named <SourceDataset>_<case>, with a merged dataset.json. "
                    "Datasets must agree on channels, labels, file ending and reader.")
    p.add_argument("-d", dest="datasets", nargs="+", required=True, metavar="ID", help="datasets to pool (names or ids)")
    p.add_argument("-o", dest="new_id", type=int, required=True, metavar="NEW_ID", help="id of the new dataset (must be free)")
    p.add_argument("--name", required=True, help="name of the new dataset (DatasetNEW_NAME)")
    p.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_transfer.plans.pool import pool_datasets

    print(pool_datasets(args.datasets, args.new_id, args.name, copy=args.copy).text())
    return 0
