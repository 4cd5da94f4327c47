"""One analysis session: plans, template network, layers, patches, options, convergence epochs, output.

Every study of :mod:`.karimi` works in the same order, so that a bad input never leaves anything
behind:

1. :func:`check_out` — the output path is usable (a folder or creatable), nothing created yet;
2. :func:`open_analysis` and the study's own checks — options, plans, layers, networks, runs,
   data, sample counts; then the work (similarities, convergence epochs, weight change);
3. ``with writing(out):`` — the folder is created and the results written; a failure inside removes the
   folder if this call created it (never one that existed; there, only the files this call added).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from nnunet_transfer import __version__
from nnunet_transfer.analysis.activations import (CHUNK_PATCHES, DEFAULT_FOREGROUND, DEFAULT_VOXELS_PER_PATCH, Layer,
                                                  PatchSource, SamplingPlan, accumulate_pairs, pair_results,
                                                  plan_sampling, preprocessed_folder, probe_layers, resolve_device,
                                                  select_layers)
from nnunet_transfer.analysis.cases import CaseChoice, choose_cases, parse_cases
from nnunet_transfer.experiments.convergence import (CONVERGENCE_TOLERANCE, DEFAULT_SOURCE, SOURCES, Convergence,
                                                  curve_convergence, index_curve)
from nnunet_transfer.analysis.report import MEASURES, write_json, write_outputs
from nnunet_transfer.analysis.runs import (NetworkRef, index_convergence, load_into, load_networks, require_snapshots,
                                           run_label, snapshot_ref)
from nnunet_transfer.analysis.similarity import DEFAULT_SIDE, SIDES, SimilarityResult
from nnunet_transfer.analysis.validation import SnapshotValidator
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import (build_network, check_configuration, dataset_name, env_folder, load_dataset_json,
                                       load_plans)
from nnunet_transfer.training.snapshots import read_index

CONVERGENCE_FILE = "convergence.json"
#: validated convergence epochs already computed in this process, by everything that decides them
#: (:meth:`Analysis._validation_key`): ``study report`` asks for the same run's epoch in evolution, feature
#: reuse and filter change, and each validation predicts every snapshot on every validation case
_VALIDATED: dict[tuple, Convergence] = {}
#: how summary.md names each --pwcca-side
PWCCA_SIDE_TEXT = {"fewer": "weighted by the network with fewer live channels, the first on a tie, as google/svcca's "
                            "compute_pwcca (--pwcca-side fewer)",
                   "x": "weighted by the first network of each pair (--pwcca-side x)",
                   "y": "weighted by the second network of each pair (--pwcca-side y)",
                   "sym": "the mean of both weightings (--pwcca-side sym)"}


@dataclass
class Analysis:
    """Everything one analysis needs: plans, the template network, layers, patches and options.

    Build it with :func:`open_analysis`; the patch source and the sampling plan are created on first
    use, so studies that need no data (weight change) do not require preprocessed data.
    """

    dataset: str
    configuration: str
    plans_name: str
    plans: dict
    dataset_json: dict
    template: nn.Module
    model: BlockModel
    layers: list[Layer]
    layer_spec: str | None
    device: torch.device
    seed: int = 0
    side: str = DEFAULT_SIDE
    measure: str = "pwcca"
    progress: bool = True
    batch_size: int = 1
    patches: int | None = None
    voxels_per_patch: int = DEFAULT_VOXELS_PER_PATCH
    foreground: float = DEFAULT_FOREGROUND
    #: ``--cases`` as parsed (:func:`.cases.parse_cases`): None (test cases when known), "test", "all", a file, ids
    cases: Any = None
    #: the fold folders analysed, which tell the held-out test cases of a cross-validation (:mod:`.cases`)
    runs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    networks: list[NetworkRef] = field(default_factory=list)
    #: every convergence epoch this analysis used, in the order they were decided
    convergences: list[Convergence] = field(default_factory=list)
    _source: PatchSource | None = None
    _plan: SamplingPlan | None = None
    _cases: CaseChoice | None = None

    @property
    def where(self) -> str:
        return f"{self.dataset} / {self.plans_name} / {self.configuration}"

    @property
    def configuration_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_configuration(self.configuration)

    def use_runs(self, runs: Sequence[str | Path | None]) -> None:
        """Record the fold folders the analysis is about, before its patches are first drawn (:attr:`source`)."""
        for r in runs:
            if r is not None and Path(r) not in self.runs:
                self.runs.append(Path(r))

    @property
    def source(self) -> PatchSource:
        if self._source is None:
            cm = self.configuration_manager
            folder = preprocessed_folder(self.dataset, cm.data_identifier, self.configuration)
            choice = choose_cases(self.dataset, self.cases, self.runs)
            try:
                source = PatchSource(folder, cm.patch_size, seed=self.seed, foreground=self.foreground,
                                     cases=choice.cases)
            except DataError as e:
                if choice.kind != "test":
                    raise
                raise DataError(f"the held-out test cases ({choice.why}): {e}; preprocess them, or give "
                                f"--cases all") from None
            self._source, self._cases = source, choice
        return self._source

    @property
    def plan(self) -> SamplingPlan:
        if self._plan is None:
            src = self.source
            shapes = probe_layers(self.template, self.layers, (src.n_channels, *src.patch_size))
            self._plan = plan_sampling(shapes, patches=self.patches, voxels_per_patch=self.voxels_per_patch)
        return self._plan

    @property
    def allow_seg_mismatch(self) -> bool:
        return not any(layer.group == "seg" for layer in self.layers)

    def load(self, refs: Sequence[NetworkRef]) -> list[nn.Module]:
        nets, notes = load_networks(refs, self.template, device=self.device, where=self.where,
                                    allow_seg_mismatch=self.allow_seg_mismatch)
        self.notes += [n for n in notes if n not in self.notes]
        for r in refs:
            if r not in self.networks:
                self.networks.append(r)
            if r.convergence is not None and all(c is not r.convergence for c in self.convergences):
                self.convergences.append(r.convergence)  # FOLD@converged: say how the epoch was chosen
        return nets

    def similarities(self, refs: Sequence[NetworkRef], pairs: Sequence[tuple[int, int]], *,
                     desc: str) -> dict[tuple[str, int, int], SimilarityResult]:
        """Load ``refs``, stream the patches once through them, return every pair's result."""
        self.use_runs([r.run for r in refs])  # the test cases of a cross-validation follow from the runs' folds
        plan = self.plan  # checks data and sample counts before networks are loaded
        nets = self.load(refs)
        try:
            moments = accumulate_pairs(nets, pairs, self.layers, self.source, plan, seed=self.seed,
                                       device=self.device, batch_size=self.batch_size,
                                       progress=self.progress, desc=desc)
        finally:
            del nets
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return pair_results(moments, side=self.side)

    # ------------------------------------------------------------------ convergence
    def convergence(self, fold: str | Path, *, source: str = DEFAULT_SOURCE,
                    tolerance: float = CONVERGENCE_TOLERANCE) -> Convergence:
        """The run's convergence epoch from ``source`` (:data:`.convergence.SOURCES`), recorded for the output.

        ``ema`` / ``raw``: the curve of the snapshot index; ``validation``: every snapshot predicted on
        the fold's validation cases (:mod:`.validation`).
        """
        check_convergence_options(source, tolerance)
        fold = Path(fold)
        for c in self.convergences:
            if c.run == str(fold) and c.source == source and c.tolerance == tolerance:
                return c
        if source == "validation":
            key = self._validation_key(fold, tolerance)
            if key not in _VALIDATED:
                _VALIDATED[key] = self._validated(fold, tolerance)
            conv = copy.deepcopy(_VALIDATED[key])
        else:
            conv = index_convergence(fold, source=source, tolerance=tolerance)
        self.convergences.append(conv)
        return conv

    def given_convergence(self, fold: str | Path, epoch: int) -> Convergence:
        """A convergence epoch given by the user: recorded with the logged EMA curve for reference."""
        snapshot_ref(fold, epoch)  # exists?
        conv = Convergence(source="given", tolerance=float("nan"), epoch=int(epoch),
                           curve=index_curve(read_index(fold), source="ema"), run=str(Path(fold)),
                           details={"curve_key": "ema_fg_dice"})
        self.convergences.append(conv)
        return conv

    def _validation_key(self, fold: Path, tolerance: float) -> tuple:
        """What a validated convergence epoch depends on: the run and its snapshot index, the split file that
        names its validation cases, the plans and configuration they are predicted with, and the tolerance."""
        def stamp(path: Path) -> tuple | None:
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return st.st_size, st.st_mtime_ns

        splits = env_folder("nnUNet_preprocessed") / self.dataset / "splits_final.json"
        plans = hashlib.sha256(json.dumps(self.plans, sort_keys=True).encode()).hexdigest()
        return (str(fold.resolve()), stamp(fold / "snapshots" / "index.json"), stamp(splits), self.dataset,
                plans, self.configuration, str(self.device), float(tolerance))

    def _validated(self, fold: Path, tolerance: float) -> Convergence:
        from tqdm.auto import tqdm


        epochs = require_snapshots(fold)
        validator = SnapshotValidator.open(dataset_name=self.dataset, plans=self.plans,
                                           configuration=self.configuration, dataset_json=self.dataset_json,
                                           template=self.template, run=fold, device=self.device)
        curve, per_case = [], []
        net = copy.deepcopy(self.template)
        for e in tqdm(epochs, desc=f"validating {run_label(fold)}", unit="snapshot", disable=not self.progress,
                      leave=False):
            ref = snapshot_ref(fold, e)
            load_into(net, ref, where=self.where, allow_seg_mismatch=False)  # the heads are validated too
            dice, cases = validator.dice(net.state_dict())
            curve.append((e, dice))
            per_case.append({"epoch": e, "dice": dice,
                             "cases": {c: d for c, d in zip(validator.cases, cases)}})
        details = validator.details()
        details["validation"]["per_snapshot"] = per_case
        conv = curve_convergence(curve, source="validation", tolerance=tolerance, run=str(fold), details=details)
        if conv is None:
            raise DataError(f"run {fold}: the validation Dice is undefined (NaN) for every snapshot: no validation "
                            f"case of fold {validator.fold} holds a foreground label and no snapshot predicts one; "
                            f"use --convergence-from ema")
        return conv

    # ------------------------------------------------------------------ meta
    def layer_rows(self) -> list[dict]:
        plan = self._plan
        rows = []
        for layer in self.layers:
            row = layer.to_dict()
            if plan is not None:
                row |= {"channels": plan.channels[layer.name], "grid": list(plan.spatial[layer.name]),
                        "samples": plan.samples[layer.name]}
            rows.append(row)
        return rows

    def meta(self, study: str) -> dict:
        meta: dict[str, Any] = {
            "study": study, "package_version": __version__, "dataset": self.dataset,
            "configuration": self.configuration, "plans": self.plans_name,
            "architecture": self.model.architecture, "n_stages": self.model.n_stages,
            "layer_spec": self.layer_spec, "layers": self.layer_rows(), "measure": self.measure,
            "pwcca_side": self.side, "seed": self.seed, "device": str(self.device),
            "networks": [r.to_dict() for r in self.networks], "notes": list(self.notes),
        }
        if self.convergences:
            meta["convergence"] = [c.to_dict() for c in self.convergences]
        if self._source is not None:  # which cases the patches come from, and why (similarity and feature maps)
            meta["patches_from"] = {**self._cases.to_dict(), "cases": list(self._source.cases),
                                    "foreground": self.foreground}
        if self._plan is not None:
            src = self.source
            meta["sampling"] = {
                "folder": str(src.folder), "cases": len(src.cases), "patch_size": list(src.patch_size),
                "patches": self._plan.patches, "patches_auto": self._plan.auto,
                "voxels_per_patch": self._plan.voxels_per_patch, "foreground": self.foreground,
                "batch_size": self.batch_size, "chunk_patches": CHUNK_PATCHES,
                "first_patches": [src.location(i).to_dict() for i in range(min(5, self._plan.patches))],
            }
        return meta


def check_convergence_options(source: str, tolerance: float) -> None:
    if source not in SOURCES:
        raise ConfigError(f"--convergence-from must be one of {', '.join(SOURCES)}, got {source!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance must be a fraction in [0, 1) (0.005 = 0.5 %), got {tolerance!r}")


def open_analysis(dataset: str | int, configuration: str, plans: str = "nnUNetPlans", *,
                  layers: str | None = None, patches: int | None = None,
                  voxels_per_patch: int = DEFAULT_VOXELS_PER_PATCH, foreground: float = DEFAULT_FOREGROUND,
                  cases: str | Path | Sequence[str] | None = None, seed: int = 0, device: str = "auto",
                  batch_size: int = 1, side: str = DEFAULT_SIDE, measure: str = "pwcca",
                  progress: bool = True) -> Analysis:
    """Read the plans, build the template network (random init, CPU) and resolve ``layers``.

    ``cases``: where patches come from (:mod:`.cases`): None — the held-out test cases when the dataset's
    ``splits_mapping.json`` knows them for the runs analysed, else every case (the output says which);
    ``"test"``, ``"all"``, a file or identifiers. ``foreground``: probability that a patch is centred on a
    foreground voxel (default 0: uniform locations, as Karimi et al.; nnU-Net's sampler uses 0.33).
    """
    if measure not in MEASURES:
        raise ConfigError(f"--measure must be one of {MEASURES}, got {measure!r}")
    if side not in SIDES:
        raise ConfigError(f"--pwcca-side must be one of {SIDES}, got {side!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if not isinstance(foreground, (int, float)) or isinstance(foreground, bool) or not 0.0 <= foreground <= 1.0:
        raise ConfigError(f"--foreground must be a probability in [0, 1], got {foreground!r}")
    if voxels_per_patch is not None and (isinstance(voxels_per_patch, bool) or not isinstance(voxels_per_patch, int)
                                         or voxels_per_patch < 1):
        raise ConfigError(f"--voxels-per-patch must be a positive integer, got {voxels_per_patch!r}")
    if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
        raise ConfigError(f"--patches must be a positive integer, got {patches!r}")
    cases = parse_cases(cases)
    name = dataset_name(dataset)
    plans_dict = load_plans(name, plans)
    check_configuration(plans_dict, configuration)
    dev = resolve_device(device)
    template = build_network(plans_dict, configuration, load_dataset_json(name), deep_supervision=False)
    model = BlockModel.from_network(template)
    chosen = select_layers(model, layers)
    return Analysis(dataset=name, configuration=configuration, plans_name=plans, plans=plans_dict,
                    dataset_json=load_dataset_json(name), template=template.eval(), model=model,
                    layers=chosen, layer_spec=layers, device=dev, seed=seed, side=side, measure=measure,
                    progress=progress, batch_size=batch_size, patches=patches,
                    voxels_per_patch=voxels_per_patch, foreground=foreground, cases=cases)


# --------------------------------------------------------------------------------------------------
# summary header and the written result
# --------------------------------------------------------------------------------------------------

def header(an: Analysis, title: str, *, similarity: bool = True) -> list[str]:
    """The first lines of every summary.md: plans, measure, samples, seed, convergence epochs, notes."""
    lines = [f"# {title}", "", f"- plans: {an.where} ({an.model.architecture}, N={an.model.n_stages} stages)"]
    if similarity:
        lines.append(f"- measure: {an.measure} (PWCCA {PWCCA_SIDE_TEXT[an.side]}; centred activations); each "
                     f"value is followed by its null "
                     f"baseline (the same statistic with misaligned samples)")
    if an._plan is not None:
        p = an._plan
        lines.append(f"- samples: {p.patches} patches x up to {p.voxels_per_patch} voxels; per layer "
                     + ", ".join(f"{k} {n} ({n / p.channels[k]:.0f}xc)" for k, n in p.samples.items()))
    if an._source is not None:
        lines.append(f"- {an._cases.text(len(an._source.cases))}; "
                     + ("uniform locations (--foreground 0)" if an.foreground == 0 else
                        f"a share {an.foreground:g} centred on foreground voxels (--foreground)"))
    lines.append(f"- seed {an.seed}, device {an.device}")
    for c in an.convergences:
        lines.append(f"- convergence of `{run_label(Path(c.run))}`: {c.text()} (curve in {CONVERGENCE_FILE})")
    lines += [f"- note: {n}" for n in an.notes]
    return lines + [""]


def finish(an: Analysis, out: str | Path, study: str, *, tables: dict[str, list[dict]], summary: list[str],
           plots_written: Mapping[str, Path], extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``<study>.json``, the CSV tables, summary.md and (when a convergence epoch was used)
    ``convergence.json``; return the study's result dict."""
    meta = an.meta(study)
    text = "\n".join(summary)
    files = write_outputs(out, study, meta=meta, tables=tables, summary=text, plots=plots_written, extra=extra)
    if an.convergences:
        files["convergence"] = write_json(Path(out) / CONVERGENCE_FILE,
                                          {"study": study, "runs": [c.to_dict() for c in an.convergences]})
    return {"study": study, "out": str(Path(out)), "files": {k: str(v) for k, v in files.items()},
            "tables": tables, "meta": meta, "summary": text, **(extra or {})}


# --------------------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------------------

def check_out(out: str | Path | None) -> Path:
    """The output folder, checked to be usable without creating anything.

    It must be an existing folder or a path whose first existing ancestor is a writable folder.
    """
    if out is None or not str(out).strip():
        raise ConfigError("an output folder is needed (-o OUT)")
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder; give -o a new or an existing folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise DataError(f"output folder {out} is not writable; give -o a folder you can write to")
        return out
    for anc in out.absolute().parents:
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise ConfigError(f"output folder {out} cannot be created: {anc} is a file, not a folder; give -o "
                                  f"a path that is not under a file")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise DataError(f"output folder {out} cannot be created: no write permission in {anc}; give -o a "
                                f"folder you can write to")
            break
    return out


@contextmanager
def writing(out: str | Path) -> Iterator[Path]:
    """Create ``out`` (and missing parents) for the results; undo on failure.

    A failure inside the block removes the topmost folder this call created; in a folder that already
    existed it removes only the files this call added (results it overwrote stay overwritten).
    """
    out = check_out(out)
    created = None
    if not out.exists():
        created = out
        for anc in out.absolute().parents:
            if anc.exists():
                break
            created = anc
    before = None if created is not None else {p.name for p in out.iterdir()}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if created is not None and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(f"cannot create output folder {out}: {e.strerror or e}; give -o a folder you can write "
                        f"to") from None
    try:
        yield out
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for p in out.iterdir():
                if p.name not in before and (p.is_file() or p.is_symlink()):
                    p.unlink(missing_ok=True)
        raise


__all__ = ["CONVERGENCE_FILE", "Analysis", "check_convergence_options", "check_out", "finish", "header",
           "open_analysis", "writing"]
