"""``nnunet_transfer labels merge``: pseudo-labels of a source model where a target does not annotate."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("labels", help="pseudo-labels: merge a source model's classes into a target dataset",
                       description="Adding a class to a trained model without forgetting the ones it knows "
                                   "(documentation/continual.md): the simple baseline.")
    ps = p.add_subparsers(dest="labels_command", metavar="ACTION")
    ps.required = True
    m = ps.add_parser(
        "merge", help="write a new raw dataset: the target's labels where annotated, the source's prediction "
                      "elsewhere",
        description="nnU-Net's predictor runs the source model on the target's training images; the new raw dataset "
                    "NEW_ID holds the target's images and label maps in which every background voxel gets the "
                    "source's class when it is a pseudo class (--classes, else the target dataset.json's "
                    "\"unannotated\", else the source classes the target does not name) and its probability is >= "
                    "--threshold. dataset.json is merged by label name. Nothing is written on a refusal.")
    m.add_argument("-m", dest="model", required=True, metavar="SOURCE_MODEL",
                   help="the source's model folder (nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION)")
    m.add_argument("-d", dest="target", required=True, metavar="TARGET", help="target dataset (id or name)")
    m.add_argument("-o", dest="new_id", required=True, type=int, metavar="NEW_ID", help="id of the new raw dataset")
    m.add_argument("--threshold", type=float, default=0.5, metavar="P",
                   help="least probability of the source's class for a pseudo-label (default 0.5)")
    m.add_argument("--classes", default=None, metavar="NAME,...", help="the source classes to take (by name)")
    m.add_argument("-f", dest="folds", default=None, metavar="F,...", help="folds of the source model (default: "
                                                                          "every fold with a checkpoint)")
    m.add_argument("-device", dest="device", default="cpu", help="cpu or cuda (default cpu)")
    m.set_defaults(func=run_merge)


def run_merge(args) -> int:
    from nnunet_transfer.experiments.pseudo_labels import merge_pseudo_labels

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    out = merge_pseudo_labels(args.model, args.target, args.new_id, threshold=args.threshold, classes=classes,
                              folds=folds, device=args.device)
    dj = __import__("json").loads((out / "dataset.json").read_text())
    print(f"wrote {out} ({dj['numTraining']} cases; labels {dj['labels']}; pseudo-labelled voxels "
          f"{dj['pseudo_labels']['voxels']})")
    return 0
