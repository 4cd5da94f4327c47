"""The analysis studies of Karimi et al. (2021), "Transfer learning in medical image segmentation: new
insights from analysis of the dynamics of model parameters and learned representations"
(Artif. Intell. Med., https://doi.org/10.1016/j.artmed.2021.102078), on nnU-Net networks.

=============  =================================================================================
study          what it computes (every similarity with its null baseline)
=============  =================================================================================
compare        two or more networks layer by layer: all pairs, or each against the first
evolution      one run's snapshots against its convergence epoch (Fig. 6–7)
groups         named groups of networks: RSIM within and between groups per layer, a permutation
               test over network labels and Welch t-tests (Table 8)
reuse          per layer, mean RSIM(start, converged) over TL runs − the same over RI runs (Table 9)
weights        ‖Δw‖ / ‖w₀‖ per conv, block and group; filter and feature-map pictures (Fig. 8–10)
=============  =================================================================================

RSIM is PWCCA (Morcos et al. 2018) by default (``measure``); every table carries mean CCA, SVCCA,
PWCCA and linear CKA with their nulls. All networks of one analysis are built from one plans
configuration (``dataset``, ``configuration``, ``plans``) and see the same patches and voxels
(:mod:`.activations`); results are deterministic given ``seed`` on one device.

Each ``run_*`` function writes ``<study>.json``, ``<study>_<table>.csv``, PNG plots and
``summary.md`` into ``out`` and returns ``{"study", "out", "files", "tables", "meta", "summary", …}``.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_transfer.analysis import plots
from nnunet_transfer.analysis.activations import (
    CHUNK_PATCHES,
    DEFAULT_FOREGROUND,
    DEFAULT_VOXELS_PER_PATCH,
    Layer,
    PatchSource,
    SamplingPlan,
    accumulate_pairs,
    full_activations,
    pair_results,
    plan_sampling,
    preprocessed_folder,
    probe_layers,
    resolve_device,
    select_layers,
)
from nnunet_transfer.analysis.report import fmt, md_table, with_null, write_outputs
from nnunet_transfer.analysis.runs import (
    CONVERGENCE_TOLERANCE,
    NetworkRef,
    dice_curve,
    load_networks,
    require_snapshots,
    resolve_network,
    run_convergence,
    run_label,
    snapshot_ref,
    unique_labels,
)
from nnunet_transfer.analysis.similarity import SIDES, SimilarityResult
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.policies.snapshots import read_index

MEASURES = ("pwcca", "mean_cca", "svcca", "linear_cka")
DEFAULT_PERMUTATIONS = 10000


# --------------------------------------------------------------------------------------------------
# shared set-up
# --------------------------------------------------------------------------------------------------

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
    side: str = "sym"
    measure: str = "pwcca"
    progress: bool = True
    batch_size: int = 1
    patches: int | None = None
    voxels_per_patch: int = DEFAULT_VOXELS_PER_PATCH
    foreground: float = DEFAULT_FOREGROUND
    cases: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    networks: list[NetworkRef] = field(default_factory=list)
    _source: PatchSource | None = None
    _plan: SamplingPlan | None = None

    @property
    def where(self) -> str:
        return f"{self.dataset} / {self.plans_name} / {self.configuration}"

    @property
    def configuration_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans).get_configuration(self.configuration)

    @property
    def source(self) -> PatchSource:
        if self._source is None:
            cm = self.configuration_manager
            folder = preprocessed_folder(self.dataset, cm.data_identifier, self.configuration)
            self._source = PatchSource(folder, cm.patch_size, seed=self.seed, foreground=self.foreground,
                                       cases=self.cases)
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
        return nets

    def similarities(self, refs: Sequence[NetworkRef], pairs: Sequence[tuple[int, int]], *,
                     desc: str) -> dict[tuple[str, int, int], SimilarityResult]:
        """Load ``refs``, stream the patches once through them, return every pair's result."""
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
        from nnunet_transfer import __version__

        meta: dict[str, Any] = {
            "study": study, "package_version": __version__, "dataset": self.dataset,
            "configuration": self.configuration, "plans": self.plans_name,
            "architecture": self.model.architecture, "n_stages": self.model.n_stages,
            "layer_spec": self.layer_spec, "layers": self.layer_rows(), "measure": self.measure,
            "pwcca_side": self.side, "seed": self.seed, "device": str(self.device),
            "networks": [r.to_dict() for r in self.networks], "notes": list(self.notes),
        }
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


def open_analysis(dataset: str | int, configuration: str, plans: str = "nnUNetPlans", *,
                  layers: str | None = None, patches: int | None = None,
                  voxels_per_patch: int = DEFAULT_VOXELS_PER_PATCH, foreground: float = DEFAULT_FOREGROUND,
                  cases: Sequence[str] | None = None, seed: int = 0, device: str = "auto",
                  batch_size: int = 1, side: str = "sym", measure: str = "pwcca",
                  progress: bool = True) -> Analysis:
    """Read the plans, build the template network (random init, CPU) and resolve ``layers``."""
    from nnunet_transfer.nnunet_io import build_network, check_configuration, dataset_name, load_dataset_json, load_plans

    if measure not in MEASURES:
        raise ConfigError(f"--measure must be one of {MEASURES}, got {measure!r}")
    if side not in SIDES:
        raise ConfigError(f"--pwcca-side must be one of {SIDES}, got {side!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
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
                    voxels_per_patch=voxels_per_patch, foreground=foreground,
                    cases=list(cases) if cases else None)


def _sim_row(layer: Layer, res: SimilarityResult) -> dict:
    row = layer.to_dict() | {"channels": res.cx, "n": res.n}
    for m in MEASURES:
        row[m] = getattr(res, m)
    for m in MEASURES:
        row[f"null_{m}"] = getattr(res, f"null_{m}")
    row |= {"dead_a": res.dead_x, "dead_b": res.dead_y}
    return row


def _layer_label(layer: Layer) -> str:
    return "seg" if layer.block is None else f"{layer.name} ({layer.group[:3]} L{layer.level})"


def _header(an: Analysis, title: str, *, similarity: bool = True) -> list[str]:
    lines = [f"# {title}", "", f"- plans: {an.where} ({an.model.architecture}, N={an.model.n_stages} stages)"]
    if similarity:
        lines.append(f"- measure: {an.measure} (PWCCA side {an.side}); each value is followed by its null "
                     f"baseline (the same statistic with misaligned samples)")
    if an._plan is not None:
        p = an._plan
        lines.append(f"- samples: {p.patches} patches x up to {p.voxels_per_patch} voxels; per layer "
                     + ", ".join(f"{k} {n} ({n / p.channels[k]:.0f}xc)" for k, n in p.samples.items()))
    lines.append(f"- seed {an.seed}, device {an.device}")
    lines += [f"- note: {n}" for n in an.notes]
    return lines + [""]


def _finish(an: Analysis, out: str | Path, study: str, *, tables: dict[str, list[dict]], summary: list[str],
            plots_written: Mapping[str, Path], extra: Mapping[str, Any] | None = None) -> dict:
    meta = an.meta(study)
    text = "\n".join(summary)
    files = write_outputs(out, study, meta=meta, tables=tables, summary=text, plots=plots_written, extra=extra)
    return {"study": study, "out": str(Path(out)), "files": {k: str(v) for k, v in files.items()},
            "tables": tables, "meta": meta, "summary": text, **(extra or {})}


def _check_out(out: str | Path | None) -> Path:
    if out is None or not str(out).strip():
        raise ConfigError("an output folder is needed (-o OUT)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------

def run_compare(networks: Sequence[str | Path], *, dataset: str | int, configuration: str,
                plans: str = "nnUNetPlans", out: str | Path, reference: str = "all", **options: Any) -> dict:
    """Compare two or more networks layer by layer.

    Args:
        networks: network references (:func:`.runs.resolve_network`).
        reference: ``"all"`` — every pair; ``"first"`` — each network against the first.
        **options: :func:`open_analysis` keywords (layers, patches, voxels_per_patch, seed, device, …).
    """
    if reference not in ("all", "first"):
        raise ConfigError(f"--reference must be 'all' or 'first', got {reference!r}")
    out = _check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    refs = unique_labels([resolve_network(n) for n in networks])
    if len(refs) < 2:
        raise ConfigError(f"compare needs at least two networks, got {len(refs)}")
    pairs = ([(0, j) for j in range(1, len(refs))] if reference == "first"
             else list(itertools.combinations(range(len(refs)), 2)))
    res = an.similarities(refs, pairs, desc="compare")
    rows = [{"a": refs[i].label, "b": refs[j].label, **_sim_row(layer, res[(layer.name, i, j)])}
            for i, j in pairs for layer in an.layers]
    m = an.measure
    series = {f"{refs[i].label} vs {refs[j].label}":
              ([getattr(res[(l.name, i, j)], m) for l in an.layers],
               [getattr(res[(l.name, i, j)], f"null_{m}") for l in an.layers]) for i, j in pairs}
    png = plots.plot_layer_lines(out / "compare.png", [_layer_label(l) for l in an.layers], series,
                                 measure=m, title="layer similarity")
    summary = _header(an, "compare: layer similarity")
    summary += ["networks: " + ", ".join(f"`{r.label}`" for r in refs), ""]
    summary.append(md_table(["layer"] + [f"{refs[i].label} vs {refs[j].label}" for i, j in pairs],
                            [[_layer_label(l)] + [with_null(getattr(res[(l.name, i, j)], m),
                                                            getattr(res[(l.name, i, j)], f"null_{m}"))
                                                  for i, j in pairs] for l in an.layers]))
    return _finish(an, out, "compare", tables={"similarity": rows}, summary=summary,
                   plots_written={"plot": png})


# --------------------------------------------------------------------------------------------------
# evolution
# --------------------------------------------------------------------------------------------------

def run_evolution(fold_folder: str | Path, *, dataset: str | int, configuration: str,
                  plans: str = "nnUNetPlans", out: str | Path, convergence_epoch: int | None = None,
                  tolerance: float = CONVERGENCE_TOLERANCE, max_networks: int = 16, **options: Any) -> dict:
    """Similarity of every snapshot's layers to the same layers at the convergence epoch (Fig. 6–7).

    The convergence epoch is the first snapshot epoch whose validation pseudo-Dice is within
    ``tolerance`` (0.5 %) of the run's maximum (:func:`.runs.convergence_epoch`), unless given.
    Networks are loaded ``max_networks`` at a time (the converged one in every round).

    Returns the common result dict plus ``convergence_epoch`` and ``epochs``.
    """
    out = _check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    fold = Path(fold_folder)
    epochs = require_snapshots(fold)
    if len(epochs) < 2:
        raise DataError(f"run {fold} has only the snapshot of epoch {epochs[0]}; evolution needs at least "
                        f"two (set snapshot_every so that training writes more)")
    if convergence_epoch is None:
        conv = run_convergence(fold, tolerance=tolerance)
        rule = f"first epoch with validation pseudo-Dice within {100 * tolerance:g} % of its maximum"
    else:
        conv = int(convergence_epoch)
        snapshot_ref(fold, conv)  # exists?
        rule = "given"
    if max_networks < 2:
        raise ConfigError(f"max_networks must be >= 2, got {max_networks}")
    index = {int(e["epoch"]): e for e in read_index(fold)}
    key, curve = dice_curve(list(index.values()))
    conv_ref = snapshot_ref(fold, conv)
    results: dict[int, dict[str, SimilarityResult]] = {}
    step = max_networks - 1
    for start in range(0, len(epochs), step):
        group = epochs[start:start + step]
        refs = [conv_ref] + [snapshot_ref(fold, e) for e in group]
        res = an.similarities(refs, [(k + 1, 0) for k in range(len(group))],
                              desc=f"evolution {start // step + 1}/{math.ceil(len(epochs) / step)}")
        for k, e in enumerate(group):
            results[e] = {l.name: res[(l.name, k + 1, 0)] for l in an.layers}
    rows = []
    for e in epochs:
        for l in an.layers:
            rows.append({"epoch": e, "pseudo_dice": index[e].get(key), "converged": e == conv,
                         **_sim_row(l, results[e][l.name])})
    m = an.measure
    series = {_layer_label(l): ([getattr(results[e][l.name], m) for e in epochs],
                                [getattr(results[e][l.name], f"null_{m}") for e in epochs]) for l in an.layers}
    png = plots.plot_evolution(out / "evolution.png", epochs, series, convergence=conv, dice=curve, measure=m,
                               title=f"{run_label(fold)}: similarity to epoch {conv}")
    summary = _header(an, f"evolution: {run_label(fold)}")
    summary += [f"convergence epoch: **{conv}** ({rule}; pseudo-Dice from `{key}`)", ""]
    shown = sorted(set([epochs[0], epochs[len(epochs) // 2], conv, epochs[-1]]))
    summary.append(md_table(["layer"] + [f"epoch {e}" for e in shown],
                            [[_layer_label(l)] + [with_null(getattr(results[e][l.name], m),
                                                            getattr(results[e][l.name], f"null_{m}"))
                                                  for e in shown] for l in an.layers]))
    return _finish(an, out, "evolution", tables={"similarity": rows}, summary=summary,
                   plots_written={"plot": png},
                   extra={"convergence_epoch": conv, "epochs": epochs, "run": str(fold)})


# --------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------

def between_minus_within(matrix: np.ndarray, labels: Sequence[int]) -> float:
    """Mean similarity of pairs from different groups minus the mean of pairs from the same group.

    ``matrix`` (n × n, symmetric; only the upper triangle is read), ``labels`` (n,) group ids.
    """
    labels = np.asarray(labels)
    iu, ju = np.triu_indices(len(labels), 1)
    vals = np.asarray(matrix, dtype=np.float64)[iu, ju]
    same = labels[iu] == labels[ju]
    if same.all() or not same.any():
        return float("nan")
    return float(vals[~same].mean() - vals[same].mean())


def _labelings(sizes: Sequence[int], n: int):
    """Every assignment of n networks to groups of the given sizes (as label arrays)."""
    def rec(remaining: tuple[int, ...], g: int, labels: list[int]):
        if g == len(sizes):
            yield np.array(labels)
            return
        for chosen in itertools.combinations(remaining, sizes[g]):
            new = labels.copy()
            for i in chosen:
                new[i] = g
            rest = tuple(i for i in remaining if i not in chosen)
            yield from rec(rest, g + 1, new)
    yield from rec(tuple(range(n)), 0, [0] * n)


def permutation_test(matrix: np.ndarray, labels: Sequence[int], *, permutations: int = DEFAULT_PERMUTATIONS,
                     seed: int = 0) -> dict[str, Any]:
    """Two-sided permutation test of ``between − within`` over the networks' group labels.

    Pairs of networks are not independent (each network is in n−1 pairs), so a test over pairs
    overstates significance; permuting which *network* belongs to which group keeps that dependence.
    When the number of distinct labelings (group sizes kept) is at most ``permutations`` every one
    is enumerated (exact p-value, the observed labeling included); otherwise ``permutations``
    random ones are drawn and ``p = (1 + #{|T*| ≥ |T|}) / (1 + permutations)``.

    Returns ``{"statistic", "p_value", "n_permutations", "exact"}``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    obs = between_minus_within(matrix, labels)
    if not math.isfinite(obs):
        return {"statistic": obs, "p_value": float("nan"), "n_permutations": 0, "exact": False}
    _, sizes = np.unique(labels, return_counts=True)
    total = math.factorial(n) // math.prod(math.factorial(int(s)) for s in sizes)
    tol = 1e-12 * max(1.0, abs(obs))
    if total <= permutations:
        stats = np.array([between_minus_within(matrix, lab) for lab in _labelings(list(sizes), n)])
        p = float(np.mean(np.abs(stats) >= abs(obs) - tol))
        return {"statistic": obs, "p_value": p, "n_permutations": int(total), "exact": True}
    rng = np.random.default_rng([int(seed), 2])
    hits = sum(abs(between_minus_within(matrix, rng.permutation(labels))) >= abs(obs) - tol
               for _ in range(permutations))
    return {"statistic": obs, "p_value": (1 + hits) / (1 + permutations), "n_permutations": int(permutations),
            "exact": False}


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test ``(t, p)`` (``scipy.stats.ttest_ind(equal_var=False)``); NaN with < 2 values a side."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = ttest_ind(a, b, equal_var=False)
    return float(r.statistic), float(r.pvalue)


def _parse_groups(groups: Mapping[str, Sequence[str | Path]]) -> tuple[list[str], list[list[str | Path]]]:
    if not isinstance(groups, Mapping) or len(groups) < 2:
        raise ConfigError(f"groups needs at least two named groups (--group NAME=NET,NET ...), got "
                          f"{list(groups) if isinstance(groups, Mapping) else groups!r}")
    names, members = [], []
    for name, nets in groups.items():
        nets = list(nets)
        if len(nets) < 2:
            raise ConfigError(f"group {name!r} has {len(nets)} network(s); within-group similarity needs at "
                              f"least 2 per group")
        names.append(str(name))
        members.append(nets)
    return names, members


def run_groups(groups: Mapping[str, Sequence[str | Path]], *, dataset: str | int, configuration: str,
               plans: str = "nnUNetPlans", out: str | Path, permutations: int = DEFAULT_PERMUTATIONS,
               **options: Any) -> dict:
    """Within- and between-group similarity per layer (Karimi et al. Table 8).

    Args:
        groups: ``{"RI": [net, …], "TL": [net, …]}`` (insertion order kept).
        permutations: label permutations of the permutation test (exact when fewer labelings exist).

    Tables: ``pairs`` (every pair, every layer), ``groups`` (mean ± std per layer and group pair,
    e.g. RSIM(RI,RI), RSIM(TL,TL), RSIM(RI,TL)), ``tests`` (per layer: between − within with its
    permutation p-value; Welch t-tests treating pairs as independent, for comparison with the paper).
    """
    out = _check_out(out)
    names, members = _parse_groups(groups)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ConfigError(f"--permutations must be a positive integer, got {permutations!r}")
    an = open_analysis(dataset, configuration, plans, **options)
    refs = unique_labels([resolve_network(n) for nets in members for n in nets])
    labels = np.array([g for g, nets in enumerate(members) for _ in nets])
    pairs = list(itertools.combinations(range(len(refs)), 2))
    res = an.similarities(refs, pairs, desc="groups")
    m = an.measure
    pair_rows, group_rows, test_rows = [], [], []
    for i, j in pairs:
        for l in an.layers:
            pair_rows.append({"a": refs[i].label, "group_a": names[labels[i]], "b": refs[j].label,
                              "group_b": names[labels[j]], **_sim_row(l, res[(l.name, i, j)])})
    group_pairs = [(g, h) for g in range(len(names)) for h in range(g, len(names))]
    bars: dict[str, tuple[list[float], list[float]]] = {
        f"{m}({names[g]},{names[h]})": ([], []) for g, h in group_pairs}
    null_means = []
    for l in an.layers:
        mat = np.full((len(refs), len(refs)), np.nan)
        for i, j in pairs:
            mat[i, j] = mat[j, i] = getattr(res[(l.name, i, j)], m)
        nulls = [getattr(res[(l.name, i, j)], f"null_{m}") for i, j in pairs]
        null_means.append(float(np.mean(nulls)))
        values: dict[tuple[int, int], list[float]] = {gp: [] for gp in group_pairs}
        value_nulls: dict[tuple[int, int], list[float]] = {gp: [] for gp in group_pairs}
        for i, j in pairs:
            gp = tuple(sorted((int(labels[i]), int(labels[j]))))
            values[gp].append(mat[i, j])
            value_nulls[gp].append(getattr(res[(l.name, i, j)], f"null_{m}"))
        for (g, h) in group_pairs:
            v = np.asarray(values[(g, h)])
            row = l.to_dict() | {"group_a": names[g], "group_b": names[h], "kind": "within" if g == h else "between",
                                 "measure": m, "mean": float(v.mean()),
                                 "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                                 "pairs": int(len(v)), "null_mean": float(np.mean(value_nulls[(g, h)]))}
            group_rows.append(row)
            bars[f"{m}({names[g]},{names[h]})"][0].append(row["mean"])
            bars[f"{m}({names[g]},{names[h]})"][1].append(row["std"] if len(v) > 1 else 0.0)
        perm = permutation_test(mat, labels, permutations=permutations, seed=an.seed)
        test_rows.append(l.to_dict() | {"test": "permutation (network labels)", "comparison": "between - within",
                                        "measure": m, "statistic": perm["statistic"], "p_value": perm["p_value"],
                                        "n_permutations": perm["n_permutations"], "exact": perm["exact"]})
        for g, h in itertools.combinations(range(len(names)), 2):
            for a_key, b_key in (((g, h), (g, g)), ((g, h), (h, h)), ((g, g), (h, h))):
                t, p = welch(values[a_key], values[b_key])
                la = f"{m}({names[a_key[0]]},{names[a_key[1]]})"
                lb = f"{m}({names[b_key[0]]},{names[b_key[1]]})"
                test_rows.append(l.to_dict() | {"test": "Welch t (pairs as independent)",
                                                "comparison": f"{la} vs {lb}", "measure": m, "statistic": t,
                                                "p_value": p, "n_permutations": None, "exact": None})
    png = plots.plot_bars(out / "groups.png", [_layer_label(l) for l in an.layers], bars, nulls=null_means,
                          ylabel=m, title="within- and between-group similarity (mean ± std over pairs)")
    summary = _header(an, "groups: within- and between-group similarity")
    summary += ["groups: " + "; ".join(f"{n} = {len(ms)} networks" for n, ms in zip(names, members)), ""]
    hdr = ["layer"] + list(bars) + ["between − within", "p (permutation)"]
    rows_md = []
    for k, l in enumerate(an.layers):
        cells = [_layer_label(l)]
        for gp in group_pairs:
            r = next(r for r in group_rows if r["layer"] == l.name and (r["group_a"], r["group_b"]) == (names[gp[0]], names[gp[1]]))
            spread = f" ± {fmt(r['std'])}" if r["pairs"] > 1 else ""
            cells.append(f"{fmt(r['mean'])}{spread} (null {fmt(r['null_mean'])})")
        t = next(r for r in test_rows if r["layer"] == l.name and r["test"].startswith("permutation"))
        cells += [fmt(t["statistic"]), fmt(t["p_value"])]
        rows_md.append(cells)
    summary.append(md_table(hdr, rows_md))
    summary += ["", "The permutation test permutes which network belongs to which group (pairs share networks "
                    "and are not independent); the Welch t-tests in `groups_tests.csv` treat pairs as independent "
                    "samples, as the paper's Table 8 does, and overstate significance."]
    return _finish(an, out, "groups", tables={"pairs": pair_rows, "groups": group_rows, "tests": test_rows},
                   summary=summary, plots_written={"plot": png}, extra={"groups": {n: [str(x) for x in ms]
                                                                                  for n, ms in zip(names, members)}})


# --------------------------------------------------------------------------------------------------
# reuse
# --------------------------------------------------------------------------------------------------

def _start_end(run: str | Path, converged: str, tolerance: float) -> tuple[NetworkRef, NetworkRef]:
    fold = Path(run)
    require_snapshots(fold)
    start = snapshot_ref(fold, 0)
    if converged == "convergence":
        end = snapshot_ref(fold, run_convergence(fold, tolerance=tolerance))
    else:
        end = resolve_network(f"{fold}@final")
    return start, end


def run_reuse(ri: Sequence[str | Path], tl: Sequence[str | Path], *, dataset: str | int, configuration: str,
              plans: str = "nnUNetPlans", out: str | Path, converged: str = "convergence",
              tolerance: float = CONVERGENCE_TOLERANCE, **options: Any) -> dict:
    """Feature reuse per layer (Karimi et al. Table 9).

    ``reuse = mean over TL runs of RSIM(start, converged) − mean over RI runs of the same``, where
    start is a run's epoch-0 snapshot (pretrained weights already loaded for TL runs) and converged
    is the snapshot at its convergence epoch (``converged="convergence"``) or checkpoint_final
    (``"final"``). Runs are fold folders trained with snapshots; each run is streamed on its own
    (two networks in memory at a time) over the same patches and voxels.
    """
    if converged not in ("convergence", "final"):
        raise ConfigError(f"--converged must be 'convergence' or 'final', got {converged!r}")
    out = _check_out(out)
    ri, tl = list(ri), list(tl)
    if not ri or not tl:
        raise ConfigError(f"reuse needs at least one RI run and one TL run (--ri RUN,… --tl RUN,…), got "
                          f"{len(ri)} RI and {len(tl)} TL")
    an = open_analysis(dataset, configuration, plans, **options)
    runs = [("RI", r) for r in ri] + [("TL", r) for r in tl]
    ends = [_start_end(r, converged, tolerance) for _, r in runs]  # every run checked before any work
    m = an.measure
    run_rows = []
    per_run: list[dict[str, SimilarityResult]] = []
    for k, ((group, run), (start, end)) in enumerate(zip(runs, ends)):
        res = an.similarities([start, end], [(0, 1)], desc=f"reuse {k + 1}/{len(runs)}")
        per_run.append({l.name: res[(l.name, 0, 1)] for l in an.layers})
        for l in an.layers:
            run_rows.append({"group": group, "run": run_label(Path(run)), "start": start.label, "end": end.label,
                             "end_epoch": end.epoch, **_sim_row(l, res[(l.name, 0, 1)])})
    reuse_rows = []
    bars: dict[str, tuple[list[float], list[float]]] = {"TL": ([], []), "RI": ([], []), "reuse = TL − RI": ([], [])}
    nulls = []
    for l in an.layers:
        row = l.to_dict() | {"n_ri": len(ri), "n_tl": len(tl)}
        for meas in (m,) + tuple(x for x in MEASURES if x != m):
            t = np.array([getattr(r[l.name], meas) for (g, _), r in zip(runs, per_run) if g == "TL"])
            i = np.array([getattr(r[l.name], meas) for (g, _), r in zip(runs, per_run) if g == "RI"])
            nl = np.array([getattr(r[l.name], f"null_{meas}") for r in per_run])
            row |= {f"tl_{meas}": float(t.mean()), f"ri_{meas}": float(i.mean()),
                    f"reuse_{meas}": float(t.mean() - i.mean()), f"null_{meas}": float(nl.mean())}
            if meas == m:
                row |= {f"tl_{meas}_std": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
                        f"ri_{meas}_std": float(i.std(ddof=1)) if len(i) > 1 else 0.0}
        reuse_rows.append(row)
        bars["TL"][0].append(row[f"tl_{m}"]), bars["TL"][1].append(row[f"tl_{m}_std"])
        bars["RI"][0].append(row[f"ri_{m}"]), bars["RI"][1].append(row[f"ri_{m}_std"])
        bars["reuse = TL − RI"][0].append(row[f"reuse_{m}"]), bars["reuse = TL − RI"][1].append(0.0)
        nulls.append(row[f"null_{m}"])
    png = plots.plot_bars(out / "reuse.png", [_layer_label(l) for l in an.layers], bars, nulls=nulls, ylabel=m,
                          title=f"feature reuse: {m}(start, {'converged' if converged == 'convergence' else 'final'})",
                          ylim=None)
    summary = _header(an, "reuse: feature reuse per layer")
    summary += [f"runs: {len(ri)} RI, {len(tl)} TL; end state: "
                + ("snapshot at each run's convergence epoch" if converged == "convergence" else "checkpoint_final"),
                ""]
    summary.append(md_table(["layer", f"TL {m}(start, end)", f"RI {m}(start, end)", "reuse = TL − RI", "null"],
                            [[_layer_label(l), f"{fmt(r[f'tl_{m}'])} ± {fmt(r[f'tl_{m}_std'])}",
                              f"{fmt(r[f'ri_{m}'])} ± {fmt(r[f'ri_{m}_std'])}", fmt(r[f"reuse_{m}"]),
                              fmt(r[f"null_{m}"])] for l, r in zip(an.layers, reuse_rows)]))
    return _finish(an, out, "reuse", tables={"reuse": reuse_rows, "runs": run_rows}, summary=summary,
                   plots_written={"plot": png},
                   extra={"runs": [{"group": g, "run": str(r), "start": s.label, "end": e.label}
                                   for (g, r), (s, e) in zip(runs, ends)]})


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def relative_change(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """``‖w₁ − w₀‖ / ‖w₀‖`` over the concatenation of the tensors (float64 Frobenius norms)."""
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for b, a in zip(before, after))
    den = sum(float((b.double() ** 2).sum()) for b in before)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def conv_modules(model: BlockModel, network: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(module name, owner, module)`` of every convolution, owner ``block<k>`` or ``seg``, in path order."""
    owners = [(f"block{b.number}", name) for b in model.blocks for name in b.module_names]
    owners += [("seg", name) for name in model.seg_module_names]
    out = []
    for owner, prefix in owners:
        for name, mod in network.get_submodule(prefix).named_modules():
            if isinstance(mod, _CONV_TYPES):
                out.append((f"{prefix}.{name}" if name else prefix, owner, mod))
    return out


def weight_change(model: BlockModel, before: nn.Module, after: nn.Module) -> dict[str, list[dict]]:
    """Tables ``conv``, ``block`` and ``group`` of ``‖Δw‖ / ‖w₀‖`` between two networks.

    ``conv``: each convolution's kernel; ``block``: a block's conv kernels together (``conv_ratio``)
    and all its parameters (``param_ratio``, norms and biases included); ``group``: encoder (blocks
    1..N−1), bottleneck, decoder, seg — pooled kernels and the mean of the per-conv ratios.
    """
    convs_b = conv_modules(model, before)
    convs_a = {name: mod for name, _, mod in conv_modules(model, after)}
    params_b, params_a = dict(before.named_parameters()), dict(after.named_parameters())
    group_of = {f"block{b.number}": (b.group, b.resolution_level, b.number) for b in model.blocks}
    group_of["seg"] = ("seg", 0, None)
    conv_rows = []
    for name, owner, mod in convs_b:
        w0, w1 = mod.weight.detach(), convs_a[name].weight.detach()
        g, level, block = group_of[owner]
        conv_rows.append({"conv": name, "layer": owner, "block": block, "group": g, "level": level,
                          "shape": list(w0.shape), "norm_start": float(w0.double().norm()),
                          "norm_change": float((w1.double() - w0.double()).norm()),
                          "ratio": relative_change([w0], [w1])})
    block_rows = []
    owners = [(f"block{b.number}", b.param_names) for b in model.blocks] + [("seg", model.seg_param_names)]
    for owner, pnames in owners:
        g, level, block = group_of[owner]
        convs = [(n, mod) for n, o, mod in convs_b if o == owner]
        block_rows.append({"layer": owner, "block": block, "group": g, "level": level, "convs": len(convs),
                           "conv_ratio": relative_change([mod.weight.detach() for _, mod in convs],
                                                         [convs_a[n].weight.detach() for n, _ in convs]),
                           "param_ratio": relative_change([params_b[p].detach() for p in pnames],
                                                          [params_a[p].detach() for p in pnames]),
                           "mean_conv_ratio": float(np.mean([r["ratio"] for r in conv_rows if r["layer"] == owner]))})
    group_rows = []
    for g in ("encoder", "bottleneck", "decoder", "seg"):
        convs = [(n, mod) for n, o, mod in convs_b if group_of[o][0] == g]
        ratios = [r["ratio"] for r in conv_rows if r["group"] == g]
        group_rows.append({"group": g, "convs": len(convs),
                           "conv_ratio": relative_change([mod.weight.detach() for _, mod in convs],
                                                         [convs_a[n].weight.detach() for n, _ in convs]),
                           "mean_conv_ratio": float(np.mean(ratios)), "median_conv_ratio": float(np.median(ratios)),
                           "max_conv_ratio": float(np.max(ratios))})
    return {"conv": conv_rows, "block": block_rows, "group": group_rows}


def _middle_slice(kernel: torch.Tensor) -> np.ndarray:
    """(…, kd, kh, kw) -> middle (kh, kw) slice; 2-D kernels unchanged."""
    k = kernel.detach().double().cpu().numpy()
    while k.ndim > 2:
        k = k[k.shape[0] // 2]
    return k


def _weights_refs(start: str | Path, end: str | Path | None) -> tuple[NetworkRef, NetworkRef]:
    if end is not None:
        return resolve_network(start), resolve_network(end)
    fold = Path(start)
    if not fold.is_dir():
        raise ConfigError(f"with one network, weights compares a run's start and end: give a fold folder, "
                          f"got {start}; or give two networks (START END)")
    epochs = require_snapshots(fold)
    first = snapshot_ref(fold, 0 if 0 in epochs else epochs[0])
    if (fold / "checkpoint_final.pth").is_file():
        last = resolve_network(fold)
    else:
        last = snapshot_ref(fold, epochs[-1])
    return first, last


def run_weights(start: str | Path, end: str | Path | None = None, *, dataset: str | int, configuration: str,
                plans: str = "nnUNetPlans", out: str | Path, filters: int = 8, feature_maps: bool = True,
                **options: Any) -> dict:
    """How far weights moved: ``‖Δw‖/‖w₀‖`` per conv, block and group, and pictures (Fig. 8–10).

    Args:
        start, end: two network references; with ``end=None``, ``start`` is a fold folder and the
            run's epoch-0 snapshot is compared with its checkpoint_final (else its last snapshot).
        filters: filters (and feature maps) drawn per selected layer, chosen at random with ``seed``.
        feature_maps: also draw the selected layers' feature maps on patch 0 (needs preprocessed data).
    """
    out = _check_out(out)
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise ConfigError(f"--filters must be a positive integer, got {filters!r}")
    an = open_analysis(dataset, configuration, plans, **options)
    a, b = _weights_refs(start, end)
    before, after = an.load([a, b])
    tables = weight_change(an.model, before, after)
    rng = np.random.default_rng([an.seed, 3])
    pngs: dict[str, Path] = {}
    blocks = [r for r in tables["block"] if r["convs"]]
    pngs["plot"] = plots.plot_bars(out / "weights.png", [r["layer"] for r in blocks],
                                   {"conv kernels": ([r["conv_ratio"] for r in blocks], [0.0] * len(blocks)),
                                    "all parameters": ([r["param_ratio"] for r in blocks], [0.0] * len(blocks))},
                                   nulls=None, ylabel="‖Δw‖ / ‖w₀‖", title=f"weight change {a.label} → {b.label}",
                                   ylim=None)
    convs_b = conv_modules(an.model, before)
    convs_a = {n: mod for n, _, mod in conv_modules(an.model, after)}
    for l in an.layers:
        first = next(((n, mod) for n, o, mod in convs_b if o == l.name and max(mod.weight.shape[2:], default=1) > 1), None)
        if first is None:
            continue
        name, mod = first
        w0, w1 = mod.weight.detach(), convs_a[name].weight.detach()
        n_out, n_in = w0.shape[:2]
        picks = rng.choice(n_out * n_in, size=min(filters, n_out * n_in), replace=False)
        pairs = [(int(p) // n_in, int(p) % n_in) for p in picks]
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            lab = [f"in {o} out {i}" for o, i in pairs]  # transposed convs store (in, out, …)
        else:
            lab = [f"out {o} in {i}" for o, i in pairs]
        s = np.stack([_middle_slice(w0[o, i]) for o, i in pairs])
        e = np.stack([_middle_slice(w1[o, i]) for o, i in pairs])
        pngs[f"filters_{l.name}"] = plots.plot_kernels(
            out / f"filters_{l.name}.png", s, e, lab,
            title=f"{_layer_label(l)} {name}: filters (middle slice), ‖Δw‖/‖w₀‖ = "
                  f"{relative_change([w0], [w1]):.3f}")
    if feature_maps:
        src = an.source
        x = src.batch([0]).to(an.device)
        fa, fb = full_activations(before, an.layers, x), full_activations(after, an.layers, x)
        image = _middle_slice(x[0, 0].cpu())
        for l in an.layers:
            s_map, e_map = fa[l.name][0], fb[l.name][0]
            chans = np.sort(rng.choice(s_map.shape[0], size=min(filters, s_map.shape[0]), replace=False))
            pngs[f"featuremaps_{l.name}"] = plots.plot_feature_maps(
                out / f"featuremaps_{l.name}.png", image,
                np.stack([_middle_slice(s_map[c]) for c in chans]), np.stack([_middle_slice(e_map[c]) for c in chans]),
                [f"channel {c}" for c in chans],
                title=f"{_layer_label(l)}: feature maps of patch 0 ({src.location(0).case}), middle slice")
    summary = _header(an, f"weights: {a.label} → {b.label}", similarity=False)
    summary.append(md_table(["group", "convs", "‖Δw‖/‖w₀‖ (pooled)", "mean per conv", "max per conv"],
                            [[r["group"], r["convs"], fmt(r["conv_ratio"]), fmt(r["mean_conv_ratio"]),
                              fmt(r["max_conv_ratio"])] for r in tables["group"] if r["convs"]]))
    summary += ["", md_table(["layer", "group", "level", "conv kernels", "all parameters"],
                             [[r["layer"], r["group"], r["level"], fmt(r["conv_ratio"]), fmt(r["param_ratio"])]
                              for r in tables["block"]])]
    return _finish(an, out, "weights", tables=tables, summary=summary, plots_written=pngs,
                   extra={"start": a.label, "end": b.label})
