"""[analysis]: which of Karimi et al.'s analyses `study report` runs over the study's own runs, on which
strategies (R.I.: the baseline, T.L.: those that start from a checkpoint), with which ``analyze`` options;
and its snapshot_every, which every run gets as a setting."""
from __future__ import annotations

from typing import Any, Sequence

from nnunet_transfer.analysis.report import MEASURES
from nnunet_transfer.blocks import parse_spec
from nnunet_transfer.errors import SpecError, TransferError
from nnunet_transfer.nnunet_io import load_json, plans_path
from nnunet_transfer.plans.configure import resolved_configuration
from nnunet_transfer.study.model import ANALYSES, AnalysisSpec, Strategy
from nnunet_transfer.study.problems import Problems, read_int, read_str, read_table, suggest

ANALYSIS_KEYS = ("analyses", "snapshot_every", "layers", "tl", "groups_by", "patches", "voxels_per_patch", "measure")
GROUPS_BY = ("size", "all")


def read_analysis_table(p: Problems, content: Any, settings: dict) -> tuple[dict | None, int | None, dict]:
    """[analysis]'s known keys and its snapshot_every, read before the strategies: ``(table, snapshot_every,
    settings)``, the study's [settings] with snapshot_every added (the runs get it as every other setting)."""
    an = read_table(p, "analysis", content, ANALYSIS_KEYS)
    every = None
    if an is not None:
        every = read_int(p, "analysis", "snapshot_every", an["snapshot_every"], 1) if "snapshot_every" in an else \
            p.add("analysis", "snapshot_every is missing: the epochs between the weights-only snapshots the analyses "
                              "read, e.g. snapshot_every = 50 (`study plan` sets it on every run)")
        if "snapshot_every" in settings:
            p.add("analysis", f"snapshot_every is set in [analysis] and in [settings] "
                              f"({settings['snapshot_every']!r}); keep the one in [analysis]")
        elif every is not None:
            settings = {**settings, "snapshot_every": every}  # the runs get it as every other setting
    return an, every, settings


def read_analysis(p: Problems, an: dict, every: int | None, strategies: Sequence[Strategy], declared: Sequence[str],
                  baseline: str | None, configuration: str | None, check_data: bool, dataset: str | None,
                  plans: str | None) -> AnalysisSpec | None:
    """[analysis] (its snapshot_every was read with [settings]); ``strategies``: those without problems,
    ``declared``: every strategy name of the file (those with problems too: they are reported once, there)."""
    before = len(p)
    analyses = an.get("analyses", list(ANALYSES))
    if not isinstance(analyses, list) or not analyses or not all(isinstance(a, str) for a in analyses):
        p.add("analysis", f"analyses = {analyses!r} must be a non-empty list of {', '.join(map(repr, ANALYSES))}")
        analyses = []
    for a in analyses:
        if a not in ANALYSES:
            p.add("analysis", f"unknown analysis {a!r}{suggest(a, ANALYSES)}; analyses: {', '.join(ANALYSES)}")
    layers = an.get("layers")
    if layers is not None:
        layers = read_str(p, "analysis", "layers", layers)
        if layers is not None and check_data:
            problem = _layers_problem(layers, dataset, plans, configuration)
            if problem:
                p.add("analysis", f"layers = {layers!r}: {problem}")
    groups_by = an.get("groups_by", "size")
    if groups_by not in GROUPS_BY:
        p.add("analysis", f"groups_by = {groups_by!r} must be \"size\" (groups per training-set size) or \"all\" "
                          f"(every R.I. run against every T.L. run, all sizes together)")
    patches = read_int(p, "analysis", "patches", an["patches"], 1) if "patches" in an else None
    voxels = (read_int(p, "analysis", "voxels_per_patch", an["voxels_per_patch"], 1) if "voxels_per_patch" in an
              else None)
    measure = an.get("measure", "pwcca")
    if measure not in MEASURES:
        p.add("analysis", f"measure = {measure!r} is not one of {', '.join(MEASURES)}{suggest(measure, MEASURES)}")
    names = {s.name: s for s in strategies}
    tl = an.get("tl")
    if tl is None:
        tl = [s.name for s in strategies if s.pretrained is not None]
    elif not isinstance(tl, list) or not tl or not all(isinstance(t, str) for t in tl):
        p.add("analysis", f"tl = {tl!r} must be a non-empty list of strategy names (the transfer strategies)")
        tl = []
    else:
        for t in tl:
            if t not in declared:
                p.add("analysis", f"tl: {t!r} is not a strategy{suggest(t, declared)}; strategies: "
                                  f"{', '.join(declared)}")
            elif t in names and names[t].pretrained is None:
                p.add("analysis", f"tl: strategy {t!r} starts from no pretrained weights; T.L. strategies name a "
                                  f"checkpoint (pretrained = \"NAME\")")
    if baseline in names and names[baseline].pretrained is not None:
        p.add("analysis", f"the baseline {baseline!r} starts from pretrained weights; the analyses compare with "
                          f"training from scratch (R.I.): make [study] baseline a strategy without pretrained weights")
    if strategies and not tl and len(p) == before:
        p.add("analysis", "no T.L. strategy: no strategy names pretrained weights; add one, or drop [analysis]")
    if len(p) > before or every is None:
        return None
    return AnalysisSpec(snapshot_every=every, analyses=tuple(dict.fromkeys(analyses)), layers=layers,
                        ri=(baseline,), tl=tuple(dict.fromkeys(tl)), groups_by=groups_by, patches=patches,
                        voxels_per_patch=voxels, measure=measure)


def _layers_problem(layers: str, dataset: str, plans: str | None, configuration: str | None) -> str | None:
    """Why the block spec ``layers`` selects nothing on the base configuration's network (None: it is fine)."""
    try:
        arch = resolved_configuration(load_json(plans_path(dataset, plans)), configuration)["architecture"]
        n_stages = int(arch["arch_kwargs"]["n_stages"])
    except (TransferError, KeyError, TypeError, ValueError):
        return None  # an architecture this reader does not know: analyze checks the spec when it runs
    try:
        parse_spec(layers, n_stages)
    except SpecError as e:
        return str(e)
    return None



__all__ = ["read_analysis_table", "read_analysis", "ANALYSIS_KEYS", "GROUPS_BY"]
