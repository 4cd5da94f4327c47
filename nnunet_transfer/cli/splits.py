"""``nnunet_transfer splits -d D --n-train 5 15 all --repeats 3 --test K``: held-out test set + nested folds."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "splits", help="held-out test set and nested small training subsets as nnU-Net folds (splits_final.json)",
        description="Write nnUNet_preprocessed/<Dataset>/splits_final.json: a fixed held-out test set in no fold; "
                    "for each repeat, validation cases and nested random training subsets (5 in 15 in all), one "
                    "fold per (repeat, size); splits_mapping.json beside it (fold -> n_train, repeat); the test "
                    "cases linked into heldout_test/imagesTs and heldout_test/labelsTs for nnUNetv2_predict and "
                    "evaluate.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id (its nnUNet_raw training cases)")
    p.add_argument("--n-train", dest="n_train", nargs="+", required=True, metavar="N",
                   help="training-set sizes: integers, percentages (50%%) of the cases left after test and "
                        "validation, or all")
    p.add_argument("--repeats", type=int, default=1, help="independent random draws of the subsets (default 1)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--test", type=int, metavar="K", help="number of held-out test cases, drawn with the seed")
    t.add_argument("--test-cases", dest="test_cases", metavar="FILE",
                   help="file listing the test cases (one per line, or a JSON list)")
    p.add_argument("--val", type=int, default=None, metavar="V",
                   help="validation cases per repeat (default 20%% of the non-test cases, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--test-folder", dest="test_folder", default=None,
                   help="where to link the test cases (default nnUNet_preprocessed/<Dataset>/heldout_test)")
    p.add_argument("--copy", action="store_true", help="copy the test files instead of linking them")
    p.add_argument("--force", action="store_true", help="replace existing splits (the old ones are kept as .bak)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_transfer.experiments.splits import make_splits

    result = make_splits(args.dataset, n_train=args.n_train, repeats=args.repeats, test=args.test,
                         test_cases=args.test_cases, val=args.val, seed=args.seed, force=args.force,
                         test_folder=args.test_folder, copy=args.copy)
    print(result.text())
    return 0
