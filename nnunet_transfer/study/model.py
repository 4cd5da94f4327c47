"""What a study file becomes: the dataclasses every ``study`` command reads (:class:`Study` and its parts), and
the names they share — the checkpoint files of [predict], the analyses of [analysis], a sweep value's label.

:func:`nnunet_transfer.study.spec.load_study` builds them, whole and checked; nothing here reads a file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_transfer.study.folds import SplitSpec

#: [predict] checkpoint -> the file nnUNetv2_predict -chk reads
PREDICT_CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: [analysis] analyses: the ``analyze`` studies `study report` runs over the study's runs
ANALYSES = ("evolution", "groups", "reuse", "weights")


@dataclass(frozen=True)
class Strategy:
    """One strategy of the study (a sweep is expanded into one per value)."""

    name: str
    trainer: str
    pretrained: str | None  # a key of Study.pretrained
    settings: dict          # the strategy's own settings (the study's [settings] are merged at use)
    title: str
    sweep_key: str | None = None
    sweep_value: Any = None
    family: str | None = None  # the [[strategy]] name a sweep value came from


@dataclass(frozen=True)
class Scoring:
    labels: tuple[int, ...] | None = None
    nsd_tolerance: float = 1.0
    metrics: tuple[str, ...] | None = None  # None: compare's defaults
    test: str = "ttest"
    alpha: float = 0.05
    resamples: int = 9999
    lesion_connectivity: int = 26
    correction: str = "holm"  # compare's --correction: "holm" or "none"


@dataclass(frozen=True)
class AnalysisSpec:
    """[analysis]: which of Karimi et al.'s analyses `study report` runs, on which strategies, with which options.

    R.I. is the study's baseline (trained from scratch), T.L. the strategies of ``tl``; evolution and filter change
    run on every run of both, groups and feature reuse compare them (per size, or over all sizes)."""

    snapshot_every: int
    analyses: tuple[str, ...] = ANALYSES
    layers: str | None = None      # analyze --layers (None: its default)
    ri: tuple[str, ...] = ()
    tl: tuple[str, ...] = ()
    groups_by: str = "size"
    patches: int | None = None     # analyze --patches (None: enough samples for every layer)
    voxels_per_patch: int | None = None  # None: analyze's default
    measure: str = "pwcca"

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.ri + self.tl


@dataclass(frozen=True)
class SourceTest:
    """[source_test]: the source's held-out test set, on which every run's old classes are scored against the source
    model's own predictions (forgetting, documentation/continual.md)."""

    images: Path
    labels: Path
    pretrained: str                       # a key of Study.pretrained: the source model (a fold folder or checkpoint)
    old_labels: tuple[int, ...] | None = None  # None: every label of the references


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    dataset: str
    configuration: str
    plans: str
    output: Path
    baseline: str
    device: str
    pretrained: dict[str, Path]
    splits: SplitSpec
    settings: dict
    strategies: tuple[Strategy, ...]
    scoring: Scoring
    disable_tta: bool = False
    predict_processes: int = 3
    predict_checkpoint: str = "final"  # a key of PREDICT_CHECKPOINTS
    environment: dict[str, str] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    base_settings: dict = field(default_factory=dict)  # the base configuration's own settings
    analysis: AnalysisSpec | None = None  # [analysis]; its snapshot_every is in ``settings``
    racing: Any = None  # [racing] (:class:`~nnunet_transfer.study.read_racing.Racing`); its rungs are pause_at
    source_test: SourceTest | None = None  # [source_test]: forgetting on the source's test set

    def strategy(self, name: str) -> Strategy:
        return next(s for s in self.strategies if s.name == name)

    def configuration_of(self, strategy: Strategy) -> str:
        """The plans configuration of a strategy: its own results folder, inheriting the base."""
        return f"{self.name}_{strategy.name}"

    def effective_settings(self, strategy: Strategy) -> dict:
        """What the strategy's configuration holds: base configuration's settings < [settings] < its own."""
        return {**self.base_settings, **self.settings, **strategy.settings}

    @property
    def sweeps(self) -> dict[str, list[Strategy]]:
        """``{family: [strategies in sweep order]}`` for the sweeps of the file."""
        out: dict[str, list[Strategy]] = {}
        for s in self.strategies:
            if s.family is not None:
                out.setdefault(s.family, []).append(s)
        return out



def sweep_label(value: Any) -> str:
    """8 -> "8", 0.5 -> "0.5", inf -> "inf" (for strategy names and axis labels)."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:g}"
    return str(value)



__all__ = ["Study", "SourceTest", "Strategy", "Scoring", "AnalysisSpec", "ANALYSES", "PREDICT_CHECKPOINTS", "sweep_label"]
