"""The analysis studies of Karimi et al. (2021), "Transfer learning in medical image segmentation: new
insights from analysis of the dynamics of model parameters and learned representations"
(Artif. Intell. Med., https://doi.org/10.1016/j.artmed.2021.102078), on nnU-Net networks.

=============  =================================================================================
study          what it computes (every similarity with its null baseline)
=============  =================================================================================
compare        two or more networks layer by layer: all pairs, or each against the first
evolution      one run's snapshots against its convergence epoch (Fig. 6–7)
groups         named groups of networks: RSIM within and between groups per layer, a permutation
               test over network labels and Welch t-tests (Table 8, :mod:`.stats`)
reuse          per layer, mean RSIM(start, converged) over TL runs − the same over RI runs (Table 9)
weights        per-filter ‖Δw_f‖/‖w_f‖ and |‖w_f,1‖−‖w_f,0‖|/‖w_f,0‖ (both readings of the paper's) and
               pooled ‖Δw‖/‖w₀‖ per conv, block and group,
               start → convergence epoch; filter and feature-map pictures (Fig. 8–10, :mod:`.weight_change`)
=============  =================================================================================

RSIM is PWCCA (Morcos et al. 2018) by default (``measure``); every table carries mean CCA, SVCCA,
PWCCA and linear CKA with their nulls. All networks of one analysis are built from one plans
configuration (``dataset``, ``configuration``, ``plans``) and see the same patches and voxels
(:mod:`.activations`); results are deterministic given ``seed`` on one device.

The convergence epoch (evolution, reuse, weights) is the first snapshot epoch whose validation curve
is within ``tolerance`` (0.5 %) of its maximum; the curve is ``convergence_from`` = ``"ema"``
(nnU-Net's moving average of the pseudo-Dice, default), ``"raw"`` (its per-epoch pseudo-Dice) or
``"validation"`` (a sliding-window validation of every snapshot, :mod:`.validation`). The choice and
the curve are written to ``convergence.json`` and summary.md.

Each ``run_*`` function checks every input before it creates ``out`` (:mod:`.session`), then writes
``<study>.json``, ``<study>_<table>.csv``, PNG plots and ``summary.md`` into it and returns
``{"study", "out", "files", "tables", "meta", "summary", …}``.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from nnunet_transfer.analysis import plots
from nnunet_transfer.analysis.activations import full_activations
from nnunet_transfer.experiments.convergence import CONVERGENCE_TOLERANCE, DEFAULT_SOURCE, DESCRIPTIONS, Convergence
from nnunet_transfer.analysis.report import MEASURES, fmt, layer_label, md_table, sim_row, similarity_table
from nnunet_transfer.analysis.runs import (
    NetworkRef,
    require_snapshots,
    resolve_network,
    run_label,
    snapshot_epochs,
    snapshot_ref,
    start_ref,
    unique_labels,
)
from nnunet_transfer.analysis.session import (
    Analysis,
    check_convergence_options,
    check_out,
    finish,
    header,
    open_analysis,
    writing,
)
from nnunet_transfer.analysis.similarity import SimilarityResult
from nnunet_transfer.analysis.stats import DEFAULT_PERMUTATIONS, between_minus_within, permutation_test, welch
from nnunet_transfer.analysis.weight_change import (
    conv_modules,
    filter_changes,
    middle_slice,
    relative_change,
    weight_change,
)
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.netutil import TRANSPOSED_TYPES
from nnunet_transfer.training.snapshots import read_index

#: ``converged`` of reuse and weights: the end state of a run
END_STATES = ("convergence", "final")

# names tests and notebooks import from here (they moved to session / stats / weight_change)
__all__ = ["DEFAULT_PERMUTATIONS", "END_STATES", "MEASURES", "Analysis", "between_minus_within", "conv_modules",
           "open_analysis", "permutation_test", "relative_change", "run_compare", "run_evolution", "run_groups",
           "run_reuse", "run_weights", "weight_change", "welch"]


def _check_end_state(converged: str) -> None:
    if converged not in END_STATES:
        raise ConfigError(f"--converged must be 'convergence' or 'final', got {converged!r}")


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------

def run_compare(networks: Sequence[str | Path], *, dataset: str | int, configuration: str,
                plans: str = "nnUNetPlans", out: str | Path, reference: str = "all", **options: Any) -> dict:
    """Compare two or more networks layer by layer.

    Args:
        networks: network references (:func:`.runs.resolve_network`).
        reference: ``"all"`` — every pair; ``"first"`` — each network against the first.
        **options: :func:`.session.open_analysis` keywords (layers, patches, voxels_per_patch, seed, device, …).
    """
    if reference not in ("all", "first"):
        raise ConfigError(f"--reference must be 'all' or 'first', got {reference!r}")
    out = check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    refs = unique_labels([resolve_network(n) for n in networks])
    if len(refs) < 2:
        raise ConfigError(f"compare needs at least two networks, got {len(refs)}")
    pairs = ([(0, j) for j in range(1, len(refs))] if reference == "first"
             else list(itertools.combinations(range(len(refs)), 2)))
    res = an.similarities(refs, pairs, desc="compare")
    rows = [{"a": refs[i].label, "b": refs[j].label, **sim_row(layer, res[(layer.name, i, j)])}
            for i, j in pairs for layer in an.layers]
    m = an.measure
    names = [f"{refs[i].label} vs {refs[j].label}" for i, j in pairs]
    series = {name: ([getattr(res[(l.name, i, j)], m) for l in an.layers],
                     [getattr(res[(l.name, i, j)], f"null_{m}") for l in an.layers]) for name, (i, j) in zip(names, pairs)}
    summary = header(an, "compare: layer similarity")
    summary += ["networks: " + ", ".join(f"`{r.label}`" for r in refs), ""]
    summary.append(similarity_table(an.layers, names, lambda l, k: res[(l.name, *pairs[k])], measure=m))
    with writing(out):
        png = plots.plot_layer_lines(out / "compare.png", [layer_label(l) for l in an.layers], series,
                                     measure=m, title="layer similarity")
        return finish(an, out, "compare", tables={"similarity": rows}, summary=summary, plots_written={"plot": png})


# --------------------------------------------------------------------------------------------------
# evolution
# --------------------------------------------------------------------------------------------------

def run_evolution(fold_folder: str | Path, *, dataset: str | int, configuration: str,
                  plans: str = "nnUNetPlans", out: str | Path, convergence_epoch: int | None = None,
                  tolerance: float = CONVERGENCE_TOLERANCE, convergence_from: str = DEFAULT_SOURCE,
                  max_networks: int = 16, **options: Any) -> dict:
    """Similarity of every snapshot's layers to the same layers at the convergence epoch (Fig. 6–7).

    The convergence epoch is the first snapshot epoch whose ``convergence_from`` curve (module
    docstring) is within ``tolerance`` (0.5 %) of the run's maximum, unless ``convergence_epoch`` is
    given. Networks are loaded ``max_networks`` at a time (the converged one in every round).

    Returns the common result dict plus ``convergence_epoch``, ``convergence_from`` and ``epochs``.
    """
    if isinstance(max_networks, bool) or not isinstance(max_networks, int) or max_networks < 2:
        raise ConfigError(f"max_networks must be an integer >= 2, got {max_networks!r}")
    if convergence_epoch is None:
        check_convergence_options(convergence_from, tolerance)
    elif isinstance(convergence_epoch, bool) or not isinstance(convergence_epoch, int) or convergence_epoch < 0:
        raise ConfigError(f"--convergence-epoch must be a snapshot epoch (integer >= 0), got {convergence_epoch!r}")
    out = check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    fold = Path(fold_folder)
    epochs = require_snapshots(fold)
    if len(epochs) < 2:
        raise DataError(f"run {fold} has only the snapshot of epoch {epochs[0]}; evolution needs at least "
                        f"two (set snapshot_every so that training writes more)")
    an.use_runs([fold])
    an.plan  # data and sample counts checked before any network is validated or loaded
    if convergence_epoch is None:
        conv = an.convergence(fold, source=convergence_from, tolerance=tolerance)
    else:
        conv = an.given_convergence(fold, convergence_epoch)
    e_conv = conv.epoch
    index = {int(e["epoch"]): e for e in read_index(fold)}
    conv_ref = snapshot_ref(fold, e_conv)
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
            rows.append({"epoch": e, "pseudo_dice": index[e].get("mean_fg_dice"),
                         "ema_pseudo_dice": index[e].get("ema_fg_dice"), "convergence_curve": conv.value_at(e),
                         "converged": e == e_conv, **sim_row(l, results[e][l.name])})
    m = an.measure
    series = {layer_label(l): ([getattr(results[e][l.name], m) for e in epochs],
                               [getattr(results[e][l.name], f"null_{m}") for e in epochs]) for l in an.layers}
    summary = header(an, f"evolution: {run_label(fold)}")
    summary += [f"convergence epoch: **{e_conv}** (the reference of every similarity below; curve `{conv.key}`)", ""]
    shown = sorted({epochs[0], epochs[len(epochs) // 2], e_conv, epochs[-1]})
    summary.append(similarity_table(an.layers, [f"epoch {e}" for e in shown],
                                    lambda l, k: results[shown[k]][l.name], measure=m))
    with writing(out):
        png = plots.plot_evolution(out / "evolution.png", epochs, series, convergence=e_conv, dice=conv.curve,
                                   measure=m, title=f"{run_label(fold)}: similarity to epoch {e_conv}",
                                   dice_label=_curve_label(conv))
        return finish(an, out, "evolution", tables={"similarity": rows}, summary=summary, plots_written={"plot": png},
                      extra={"convergence_epoch": e_conv, "convergence_from": conv.source, "epochs": epochs,
                             "run": str(fold)})


def _curve_label(conv: Convergence) -> str:
    return {"ema": "val. pseudo-Dice (EMA)", "raw": "val. pseudo-Dice", "validation": "validation Dice",
            "given": "val. pseudo-Dice (EMA)"}[conv.source]


# --------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------

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
    names, members = _parse_groups(groups)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ConfigError(f"--permutations must be a positive integer, got {permutations!r}")
    out = check_out(out)
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
                              "group_b": names[labels[j]], **sim_row(l, res[(l.name, i, j)])})
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
    summary = header(an, "groups: within- and between-group similarity")
    summary += ["groups: " + "; ".join(f"{n} = {len(ms)} networks" for n, ms in zip(names, members)), ""]
    hdr = ["layer"] + list(bars) + ["between − within", "p (permutation)"]
    rows_md = []
    for l in an.layers:
        cells = [layer_label(l)]
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
    with writing(out):
        png = plots.plot_bars(out / "groups.png", [layer_label(l) for l in an.layers], bars, nulls=null_means,
                              ylabel=m, title="within- and between-group similarity (mean ± std over pairs)")
        return finish(an, out, "groups", tables={"pairs": pair_rows, "groups": group_rows, "tests": test_rows},
                      summary=summary, plots_written={"plot": png},
                      extra={"groups": {n: [str(x) for x in ms] for n, ms in zip(names, members)}})


# --------------------------------------------------------------------------------------------------
# reuse
# --------------------------------------------------------------------------------------------------

def _start_end(an: Analysis, run: str | Path, converged: str, *, source: str,
               tolerance: float) -> tuple[NetworkRef, NetworkRef]:
    fold = Path(run)
    if converged == "convergence":
        end = snapshot_ref(fold, an.convergence(fold, source=source, tolerance=tolerance).epoch)
    else:
        end = resolve_network(f"{fold}@final")
    return start_ref(fold), end


def run_reuse(ri: Sequence[str | Path], tl: Sequence[str | Path], *, dataset: str | int, configuration: str,
              plans: str = "nnUNetPlans", out: str | Path, converged: str = "convergence",
              tolerance: float = CONVERGENCE_TOLERANCE, convergence_from: str = DEFAULT_SOURCE,
              **options: Any) -> dict:
    """Feature reuse per layer (Karimi et al. Table 9).

    ``reuse = mean over TL runs of RSIM(start, converged) − mean over RI runs of the same``, where
    start is a run's epoch-0 snapshot (pretrained weights already loaded for TL runs; its
    ``start_weights.pth`` without snapshots) and converged is the snapshot at its convergence epoch
    (``converged="convergence"``, curve ``convergence_from``) or checkpoint_final (``"final"``). Each
    run is streamed on its own (two networks in memory at a time) over the same patches and voxels.
    """
    _check_end_state(converged)
    if converged == "convergence":
        check_convergence_options(convergence_from, tolerance)
    ri, tl = list(ri), list(tl)
    if not ri or not tl:
        raise ConfigError(f"reuse needs at least one RI run and one TL run (--ri RUN,… --tl RUN,…), got "
                          f"{len(ri)} RI and {len(tl)} TL")
    out = check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    runs = [("RI", r) for r in ri] + [("TL", r) for r in tl]
    for _, r in runs:  # every run's files checked before any slow work (validation, streaming)
        if converged == "convergence":
            require_snapshots(r)
        else:
            resolve_network(f"{r}@final")
        start_ref(r)
    an.use_runs([r for _, r in runs])
    an.plan  # data and sample counts too
    ends = [_start_end(an, r, converged, source=convergence_from, tolerance=tolerance) for _, r in runs]
    m = an.measure
    run_rows = []
    per_run: list[dict[str, SimilarityResult]] = []
    for k, ((group, run), (start, end)) in enumerate(zip(runs, ends)):
        res = an.similarities([start, end], [(0, 1)], desc=f"reuse {k + 1}/{len(runs)}")
        per_run.append({l.name: res[(l.name, 0, 1)] for l in an.layers})
        for l in an.layers:
            run_rows.append({"group": group, "run": run_label(Path(run)), "start": start.label, "end": end.label,
                             "end_epoch": end.epoch, **sim_row(l, res[(l.name, 0, 1)])})
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
    summary = header(an, "reuse: feature reuse per layer")
    summary += [f"runs: {len(ri)} RI, {len(tl)} TL; end state: "
                + (f"snapshot at each run's convergence epoch (curve: {DESCRIPTIONS[convergence_from]})"
                   if converged == "convergence" else "checkpoint_final"), ""]
    summary.append(md_table(["layer", f"TL {m}(start, end)", f"RI {m}(start, end)", "reuse = TL − RI", "null"],
                            [[layer_label(l), f"{fmt(r[f'tl_{m}'])} ± {fmt(r[f'tl_{m}_std'])}",
                              f"{fmt(r[f'ri_{m}'])} ± {fmt(r[f'ri_{m}_std'])}", fmt(r[f"reuse_{m}"]),
                              fmt(r[f"null_{m}"])] for l, r in zip(an.layers, reuse_rows)]))
    with writing(out):
        png = plots.plot_bars(out / "reuse.png", [layer_label(l) for l in an.layers], bars, nulls=nulls, ylabel=m,
                              title=f"feature reuse: {m}(start, {'converged' if converged == 'convergence' else 'final'})",
                              ylim=None)
        return finish(an, out, "reuse", tables={"reuse": reuse_rows, "runs": run_rows}, summary=summary,
                      plots_written={"plot": png},
                      extra={"converged": converged,
                             "convergence_from": convergence_from if converged == "convergence" else None,
                             "runs": [{"group": g, "run": str(r), "start": s.label, "end": e.label, "end_epoch": e.epoch}
                                      for (g, r), (s, e) in zip(runs, ends)]})


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------

def _weights_refs(an: Analysis, start: str | Path, end: str | Path | None, *, converged: str, source: str,
                  tolerance: float) -> tuple[NetworkRef, NetworkRef, dict]:
    """START and END networks, and how each was chosen (``{"start_from", "end_from"}``)."""
    if end is not None:
        return resolve_network(start), resolve_network(end), {"start_from": "given", "end_from": "given"}
    fold = Path(start)
    if not fold.is_dir():
        raise ConfigError(f"with one network, weights compares a run's start and end: give a fold folder, "
                          f"got {start}; or give two networks (START END)")
    epochs = snapshot_epochs(fold)
    try:
        first = start_ref(fold)
        start_from = "epoch-0 snapshot" if first.path.parent.name == "snapshots" else f"{first.path.name}"
    except DataError:
        if not epochs:
            raise
        first = snapshot_ref(fold, epochs[0])  # resumed runs may lack both: the earliest state there is
        start_from = f"first snapshot (epoch {epochs[0]}; the run has no epoch-0 snapshot and no start_weights.pth)"
    if converged == "convergence" and any(e > 0 for e in epochs):
        try:
            conv = an.convergence(fold, source=source, tolerance=tolerance)
        except DataError as e:
            raise DataError(f"{e}; or compare with checkpoint_final (--converged final)") from None
        return first, snapshot_ref(fold, conv.epoch), {"start_from": start_from,
                                                       "end_from": f"convergence epoch {conv.epoch}"}
    if (fold / "checkpoint_final.pth").is_file():
        why = "" if converged == "final" else " (no snapshots after epoch 0: the convergence epoch is unknown)"
        return first, resolve_network(fold), {"start_from": start_from, "end_from": "checkpoint_final" + why}
    if epochs and epochs[-1] > first.epoch:
        return first, snapshot_ref(fold, epochs[-1]), {"start_from": start_from,
                                                       "end_from": f"last snapshot (epoch {epochs[-1]}; no checkpoint_final)"}
    resolve_network(fold)  # raises: no checkpoint_final and nothing else to compare with
    raise DataError(f"run {fold} has no end state to compare with its start")  # pragma: no cover


def _filter_pictures(an: Analysis, before: nn.Module, after: nn.Module, filters: int, rng) -> list[dict]:
    """Per selected layer, the middle slices of ``filters`` random (output, input) kernels of its first
    spatial conv at start and end."""
    convs_b = conv_modules(an.model, before)
    convs_a = {n: mod for n, _, mod in conv_modules(an.model, after)}
    pictures = []
    for l in an.layers:
        first = next(((n, mod) for n, o, mod in convs_b if o == l.name and max(mod.weight.shape[2:], default=1) > 1), None)
        if first is None:
            continue
        name, mod = first
        w0, w1 = mod.weight.detach(), convs_a[name].weight.detach()
        n_out, n_in = w0.shape[:2]
        picks = rng.choice(n_out * n_in, size=min(filters, n_out * n_in), replace=False)
        pairs = [(int(p) // n_in, int(p) % n_in) for p in picks]
        transposed = isinstance(mod, TRANSPOSED_TYPES)
        if transposed:
            lab = [f"in {o} out {i}" for o, i in pairs]  # transposed convs store (in, out, …)
        else:
            lab = [f"out {o} in {i}" for o, i in pairs]
        per_filter = filter_changes(w0, w1, transposed=transposed)
        pictures.append({"layer": l, "name": f"filters_{l.name}", "conv": name, "labels": lab,
                         "start": np.stack([middle_slice(w0[o, i]) for o, i in pairs]),
                         "end": np.stack([middle_slice(w1[o, i]) for o, i in pairs]),
                         "pooled": relative_change([w0], [w1]), "per_filter": float(np.nanmean(per_filter))})
    return pictures


def run_weights(start: str | Path, end: str | Path | None = None, *, dataset: str | int, configuration: str,
                plans: str = "nnUNetPlans", out: str | Path, filters: int = 8, feature_maps: bool = True,
                converged: str = "convergence", convergence_from: str = DEFAULT_SOURCE,
                tolerance: float = CONVERGENCE_TOLERANCE, **options: Any) -> dict:
    """How far weights moved (Karimi et al. Section 3.3, Fig. 8–10): per conv, block and group the mean
    per-filter change ``‖Δw_f‖/‖w_f‖`` and change of the norm ``|‖w_f,1‖ − ‖w_f,0‖|/‖w_f,0‖`` (the two
    readings of the paper's) beside the pooled ``‖Δw‖/‖w₀‖`` (:mod:`.weight_change`), and filter /
    feature-map pictures.

    Args:
        start, end: two network references; with ``end=None``, ``start`` is a fold folder and its start
            (epoch-0 snapshot, else ``start_weights.pth``) is compared with the snapshot at its
            convergence epoch (``converged="convergence"``, the default, when it has snapshots after
            epoch 0; curve ``convergence_from``), else with checkpoint_final (``"final"``).
        filters: filters (and feature maps) drawn per selected layer, chosen at random with ``seed``.
        feature_maps: also draw the selected layers' feature maps on patch 0 (needs preprocessed data).
    """
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise ConfigError(f"--filters must be a positive integer, got {filters!r}")
    _check_end_state(converged)
    check_convergence_options(convergence_from, tolerance)
    out = check_out(out)
    an = open_analysis(dataset, configuration, plans, **options)
    an.use_runs([start] if end is None else [resolve_network(n).run for n in (start, end)])
    if feature_maps:
        an.source  # preprocessed data checked before any network is validated or loaded
    a, b, how = _weights_refs(an, start, end, converged=converged, source=convergence_from, tolerance=tolerance)
    before, after = an.load([a, b])
    tables = weight_change(an.model, before, after)
    rng = np.random.default_rng([an.seed, 3])
    pictures = _filter_pictures(an, before, after, filters, rng)
    maps = []
    if feature_maps:
        src = an.source
        x = src.batch([0]).to(an.device)
        fa, fb = full_activations(before, an.layers, x), full_activations(after, an.layers, x)
        image = middle_slice(x[0, 0].cpu())
        for l in an.layers:
            s_map, e_map = fa[l.name][0], fb[l.name][0]
            chans = np.sort(rng.choice(s_map.shape[0], size=min(filters, s_map.shape[0]), replace=False))
            maps.append({"layer": l, "start": np.stack([middle_slice(s_map[c]) for c in chans]),
                         "end": np.stack([middle_slice(e_map[c]) for c in chans]),
                         "labels": [f"channel {c}" for c in chans], "case": src.location(0).case})
    summary = header(an, f"weights: {a.label} → {b.label}", similarity=False)
    summary += [f"start: `{a.label}` ({how['start_from']}); end: `{b.label}` ({how['end_from']})", "",
                "per filter: mean over a layer's filters f of ‖w₁[f] − w₀[f]‖ / ‖w₀[f]‖; per filter, norm: mean of "
                "|‖w₁[f]‖ − ‖w₀[f]‖| / ‖w₀[f]‖ — two readings of Karimi et al.'s \"average relative change in the "
                "norm of the filters\" (the paper does not say which); pooled: ‖W₁ − W₀‖ / ‖W₀‖ over all kernels "
                "together.", ""]
    summary.append(md_table(["group", "convs", "filters", "per filter (mean)", "per filter, norm (mean)", "pooled",
                             "mean per conv (pooled)", "max per conv (pooled)"],
                            [[r["group"], r["convs"], r["filters"], fmt(r["filter_ratio"]), fmt(r["filter_norm_ratio"]),
                              fmt(r["conv_ratio"]), fmt(r["mean_conv_ratio"]), fmt(r["max_conv_ratio"])]
                             for r in tables["group"] if r["convs"]]))
    summary += ["", md_table(["layer", "group", "level", "per filter (mean)", "per filter, norm (mean)",
                              "conv kernels (pooled)", "all parameters (pooled)"],
                             [[r["layer"], r["group"], r["level"], fmt(r["filter_ratio"]), fmt(r["filter_norm_ratio"]),
                               fmt(r["conv_ratio"]), fmt(r["param_ratio"])] for r in tables["block"]])]
    with writing(out):
        pngs: dict[str, Path] = {}
        blocks = [r for r in tables["block"] if r["convs"]]
        zeros = [0.0] * len(blocks)
        pngs["plot"] = plots.plot_bars(out / "weights.png", [r["layer"] for r in blocks],
                                       {"per filter (mean)": ([r["filter_ratio"] for r in blocks], zeros),
                                        "per filter, norm (mean)": ([r["filter_norm_ratio"] for r in blocks], zeros),
                                        "conv kernels (pooled)": ([r["conv_ratio"] for r in blocks], zeros),
                                        "all parameters (pooled)": ([r["param_ratio"] for r in blocks], zeros)},
                                       nulls=None, ylabel="relative change", ylim=None,
                                       title=f"weight change {a.label} → {b.label}")
        for p in pictures:
            pngs[p["name"]] = plots.plot_kernels(
                out / f"{p['name']}.png", p["start"], p["end"], p["labels"],
                title=f"{layer_label(p['layer'])} {p['conv']}: filters (middle slice), per filter "
                      f"{p['per_filter']:.3f}, pooled ‖Δw‖/‖w₀‖ = {p['pooled']:.3f}")
        for mp in maps:
            l = mp["layer"]
            pngs[f"featuremaps_{l.name}"] = plots.plot_feature_maps(
                out / f"featuremaps_{l.name}.png", image, mp["start"], mp["end"], mp["labels"],
                title=f"{layer_label(l)}: feature maps of patch 0 ({mp['case']}), middle slice")
        return finish(an, out, "weights", tables=tables, summary=summary, plots_written=pngs,
                      extra={"start": a.label, "end": b.label, **how, "end_epoch": b.epoch,
                             "convergence_from": convergence_from if how["end_from"].startswith("convergence") else None})
