"""``nnunet_transfer evaluate PRED REF -o OUT``: per-case surface, overlap and lesion metrics of predictions."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="Dice, HD95, ASSD, NSD, precision/recall, volumes and lesion detection per case and label",
        description="Evaluate the segmentations in PRED against those in REF (files <case><ending>, as "
                    "nnUNetv2_predict writes them; both folders must hold the same cases, on the same grids). "
                    "Distances in mm from the files' spacing. Writes OUT/per_case.csv (one row per case and "
                    "label) and OUT/summary.json (mean, median, sd per label). Empty masks: both empty = "
                    "perfect (Dice 1, distances 0); one empty = Dice 0, distances inf (counted, left out of "
                    "means).")
    p.add_argument("pred", metavar="PRED", help="folder of predicted segmentations")
    p.add_argument("ref", metavar="REF", help="folder of reference segmentations (e.g. labelsTs)")
    p.add_argument("-o", "--out", dest="out", required=True, help="output folder (per_case.csv, summary.json)")
    p.add_argument("--labels", type=int, nargs="+", default=None, metavar="L",
                   help="label values to evaluate (default: every label found in the references)")
    p.add_argument("--nsd-tolerance", dest="nsd_tolerance", type=float, default=1.0, metavar="MM",
                   help="tolerance of the normalised surface Dice in mm (default 1.0)")
    p.add_argument("--lesion-connectivity", dest="connectivity", type=int, default=26, choices=[6, 18, 26],
                   help="neighbourhood of the lesion components (default 26; 2-D images use 8, or 4 for 6)")
    p.add_argument("-np", dest="num_processes", type=int, default=1, metavar="N",
                   help="cases evaluated in parallel (default 1; memory: one case per process)")
    p.add_argument("--file-ending", dest="file_ending", default=None,
                   help="segmentation file ending (default: the one ending found in REF, e.g. .nii.gz)")
    p.add_argument("--run", default=None, metavar="FOLD_FOLDER",
                   help="fold folder of the run that made the predictions (recorded in summary.json; compare "
                        "then reports its trainable share and time to convergence). Default: OUT's parent "
                        "when that is a fold folder")
    p.add_argument("--before", default=None, metavar="SOURCE_PRED",
                   help="the source model's predictions of the same cases (e.g. nnUNetv2_predict of the source on its "
                        "held-out imagesTs, evaluated against its labelsTs): summary.json then reports forgetting, "
                        "the Dice of each evaluated label before and after fine-tuning (documentation/continual.md)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_transfer.experiments.evaluate import evaluate_folders

    result = evaluate_folders(args.pred, args.ref, args.out, labels=args.labels, nsd_tolerance=args.nsd_tolerance,
                              connectivity=args.connectivity, num_processes=args.num_processes,
                              file_ending=args.file_ending, run=args.run, progress=args.progress,
                              before=args.before)
    print(result.text())
    return 0
