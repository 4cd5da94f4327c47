"""Build several trainers the way ``nnUNetv2_train`` does, in one process, and write what each refusal printed.

Used by ``Workspace.refusals`` (tests/conftest.py). Our trainers refuse bad settings, a bad
``-pretrained_weights`` file and command-line-only misuse in ``__init__``, which nnU-Net's
``get_trainer_from_args`` runs first thing in ``nnUNetv2_train``. For each command line this script sets
``sys.argv`` to it, calls nnU-Net's ``get_trainer_from_args`` with the same arguments ``nnUNetv2_train``
passes, and hands the exception to ``sys.excepthook`` -- the hook the ``nnUNet_extTrainer`` shim installed
when nnU-Net imported it -- with stderr captured. That is what the program prints before it exits 1; what
this saves is the ~8 s of imports and trainer search each extra process would cost. The test modules run
their first case of each kind through the real program as well.

    python refuse_many.py OUT.json < commands.json   # a JSON list of nnUNetv2_train argv lists
"""
from __future__ import annotations

import contextlib
import io
import json
import sys


def main(out: str) -> int:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    results = []
    for argv in json.load(sys.stdin):
        if argv[0] != "nnUNetv2_train" or "-tr" not in argv:
            raise SystemExit(f"not an nnUNetv2_train command line with -tr: {argv}")
        dataset, configuration, fold = argv[1:4]
        trainer = argv[argv.index("-tr") + 1]
        plans = argv[argv.index("-p") + 1] if "-p" in argv else "nnUNetPlans"
        sys.argv = list(argv)
        stderr = io.StringIO()
        try:
            get_trainer_from_args(dataset, configuration, int(fold), trainer, plans, "--c" in argv,
                                  device=torch.device("cpu"))
        except Exception as exc:  # noqa: BLE001 - every refusal is reported; the test judges it
            with contextlib.redirect_stderr(stderr):
                sys.excepthook(type(exc), exc, exc.__traceback__)
            results.append({"argv": argv, "refused": True, "stderr": stderr.getvalue()})
        else:
            results.append({"argv": argv, "refused": False, "stderr": ""})
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
