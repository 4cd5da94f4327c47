"""Studies: a whole transfer experiment — strategies × training-set sizes × repeats × folds — from one TOML
file, trained here or as SLURM jobs, resumable, ending in ``evaluate`` + ``compare`` and a report.

* :func:`load_study` reads and checks the file (:mod:`.spec`);
* :func:`prepare` expands it into its runs and writes the configurations, splits and test folders
  (``study plan``, :mod:`.plan`);
* :func:`run_study` trains, predicts and evaluates every run that is not done (``study run``, :mod:`.runner`;
  with [racing] rung by rung, :mod:`.racing`);
* :func:`replay_racing` simulates [racing] on a study that ran in full (``study replay-racing``, :mod:`.racing`);
* :func:`study_status` reads every run's state from its files (``study status``);
* :func:`report_study` pools, compares and plots (``study report``, :mod:`.report`);
* :func:`init_study` writes a paper's protocol as a study file (``study init``, :mod:`.templates`).

Each function imports its module when called (``# lazy``): ``import nnunet_transfer.study.x`` runs this file
first, and a verb loads only its own module (``study init`` and ``study plan`` never import submitit).
"""
from __future__ import annotations


def load_study(path, **kw):
    from nnunet_transfer.study.spec import load_study as f  # lazy: a verb imports only its module

    return f(path, **kw)


def prepare(study, **kw):
    from nnunet_transfer.study.plan import prepare as f  # lazy: a verb imports only its module

    return f(study, **kw)


def run_study(study, **kw):
    """``study run``: a study with [racing] rung by rung (:func:`.racing.run_racing`), any other every run not done
    (:func:`.runner.run_study`, to which run_racing hands it)."""
    from nnunet_transfer.study.racing import run_racing as f  # lazy: a verb imports only its module

    return f(study, **kw)


def replay_racing(study, **kw):
    from nnunet_transfer.study.racing import replay as f  # lazy: a verb imports only its module

    return f(study, **kw)


def study_status(study, **kw):
    from nnunet_transfer.study.status import study_status as f  # lazy: a verb imports only its module

    return f(study, **kw)


def report_study(study, out, **kw):
    from nnunet_transfer.study.report import report_study as f  # lazy: a verb imports only its module

    return f(study, out, **kw)


def init_study(template, dataset, pretrained, out, **kw):
    from nnunet_transfer.study.templates import init_study as f  # lazy: a verb imports only its module

    return f(template, dataset, pretrained, out, **kw)


__all__ = ["load_study", "prepare", "run_study", "replay_racing", "study_status", "report_study", "init_study"]
