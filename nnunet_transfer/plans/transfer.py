"""Give a target dataset the source's plans, so a pretrained source network fits the target.

nnU-Net's ``nnUNetv2_move_plans_between_datasets`` copies the source plans (renaming ``dataset_name``,
``plans_name`` and, for a new plans identifier, every ``data_identifier``) and picks the image
reader for the target's files. It leaves three things that bite:

* ``foreground_intensity_properties_per_channel`` stays the *source's*, so ``CTNormalization`` clips
  and scales the target with the source's percentiles, mean and std;
* the target's ``dataset.json`` is not copied into ``nnUNet_preprocessed``, and
  ``nnUNetv2_preprocess`` reads it from there (it fails until someone copies it);
* nothing checks that the channels (count, normalisation) or the labels fit.

:func:`transfer_plans` does what nnU-Net's command does, plus all of the above. It works from this
package's path helpers (environment read at call time), not from ``nnunetv2.paths`` (read once, at
import).

The source may also be a released **model folder** (``Trainer__Plans__Configuration/`` with
``plans.json``, ``dataset.json`` and ``fold_*/checkpoint_final.pth``, see
:mod:`nnunet_transfer.plans.model_folder`): the plans and labels then come from the folder and no
source dataset needs to exist anywhere.
"""
from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_compat import USES_PROPERTIES, mask_for_norm, move_plans
from nnunet_transfer.nnunet_io import dataset_name, env_folder, load_dataset_json, load_json, plans_path
from nnunet_transfer.pipeline import executable
from nnunet_transfer.plans.configure import write_plans
from nnunet_transfer.plans.model_folder import LAYOUT, is_path_argument, load_model_folder

NORMALIZATION = ("target", "source")


@dataclass
class TransferResult:
    source: str
    target: str
    source_plans: str
    target_plans: str
    plans_file: Path
    backup: Path | None
    dataset_json: Path
    fingerprint: Path
    fingerprint_extracted: bool
    normalization: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    next_commands: list[str] = field(default_factory=list)
    model_folder: str | None = None  # the released model folder the plans came from, if any

    def text(self) -> str:
        origin = (f"{self.model_folder}/plans.json ({self.source}, {self.source_plans})" if self.model_folder
                  else f"{self.source}/{self.source_plans}")
        out = [f"plans {origin} -> {self.plans_file}"
               + (f" (previous file kept as {self.backup.name})" if self.backup else ""),
               f"dataset.json -> {self.dataset_json}",
               f"fingerprint {self.fingerprint}" + (" (extracted now)" if self.fingerprint_extracted else "")]
        out += [f"note: {n}" for n in self.notes]
        out += [f"WARNING: {w}" for w in self.warnings]
        out.append("next:")
        out += [f"  {c}" for c in self.next_commands]
        return "\n".join(out)


def _dataset_id(name: str) -> int:
    return int(name[len("Dataset"):len("Dataset") + 3])


def _channels(dataset_json: dict) -> dict[str, str]:
    ch = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(ch, dict) or not ch:
        raise DataError(f"dataset.json of {dataset_json.get('name', '?')} has no 'channel_names'")
    return {str(k): str(v) for k, v in sorted(ch.items(), key=lambda kv: int(kv[0]))}


def _scheme_for(channel_name: str) -> str:
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import \
        get_normalization_scheme

    return get_normalization_scheme(channel_name).__name__


def _norm_configs(plans: dict) -> dict[str, list[str]]:
    """Configurations that state ``normalization_schemes`` themselves (the others inherit them)."""
    return {name: list(c["normalization_schemes"]) for name, c in plans["configurations"].items()
            if "normalization_schemes" in c}


def _props(p: dict) -> str:
    return (f"clip [{p['percentile_00_5']:.4g}, {p['percentile_99_5']:.4g}], mean {p['mean']:.4g}, "
            f"std {p['std']:.4g}")


def ensure_fingerprint(name: str, *, num_processes: int | None = None,
                       echo: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """``nnUNet_preprocessed/<name>/dataset_fingerprint.json``, extracted with nnU-Net if missing.

    Runs ``nnUNetv2_extract_fingerprint`` as a subprocess: nnU-Net's Python API reads its folders from
    ``nnunetv2.paths``, fixed when first imported, while the environment may have changed since.
    """
    path = env_folder("nnUNet_preprocessed") / name / "dataset_fingerprint.json"
    if path.is_file():
        return path, False
    cmd = [executable("nnUNetv2_extract_fingerprint"), "-d", str(_dataset_id(name))]
    if num_processes is not None:
        cmd += ["-np", str(num_processes)]
    if echo:
        echo(f"extracting the fingerprint of {name}: {' '.join(['nnUNetv2_extract_fingerprint', *cmd[1:]])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not path.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise DataError(f"nnUNetv2_extract_fingerprint -d {_dataset_id(name)} failed (exit {proc.returncode}): "
                        f"{tail}")
    return path, True


def _reader_writer(raw: Path, dataset_json: dict) -> str:
    """What nnU-Net's move_plans_between_datasets writes as ``image_reader_writer``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    try:
        cases = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    except (OSError, KeyError) as e:
        raise DataError(f"cannot list the training cases of {raw}: {e}") from None
    if not cases:
        raise DataError(f"{raw} has no training cases (imagesTr/ with {dataset_json.get('file_ending')} files)")
    example = next(iter(cases.values()))["images"][0]
    try:
        rw = determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                       verbose=False)
    except Exception as e:  # noqa: BLE001 - nnU-Net raises RuntimeError/AssertionError alike
        raise DataError(f"nnU-Net finds no image reader for {example}: {e}") from None
    return rw.__name__


def _find_checkpoints(source: str, plans: str, configuration: str) -> list[Path]:
    results = os.environ.get("nnUNet_results")
    if not results:
        return []
    pattern = os.path.join(glob.escape(results), glob.escape(source), f"*__{glob.escape(plans)}__"
                           f"{glob.escape(configuration)}", "fold_*", "checkpoint_final.pth")
    return sorted(Path(p) for p in glob.glob(pattern))


def transfer_plans(source: str | int | Path, target: str | int, *, source_plans: str | None = None,
                   target_plans: str | None = None, normalization: str | None = None,
                   allow_channel_change: bool = False, configuration: str | None = None,
                   num_processes: int | None = None, force: bool = False,
                   echo: Callable[[str], None] | None = None) -> TransferResult:
    """Write the source's plans for the target; see the module docstring for what differs from nnU-Net.

    ``normalization="target"`` takes the intensity properties from the target's own fingerprint;
    ``"source"`` keeps the source's (nnU-Net's behaviour). The default (``None``) is ``"target"``, except for a
    target whose ``dataset.json`` declares ``"unannotated"`` classes (adding classes to the source's): its
    fingerprint's foreground holds only the classes it labels, so the source's statistics are kept — the
    target's window would clip the classes it leaves unlabelled (a bright lesion to the new class's range).
    ``allow_channel_change`` accepts a target whose channel count or channel normalisation differs: per-channel
    schemes then follow the target's channel names, as nnU-Net's planner would set them. ``configuration`` only chooses which
    configuration the printed next commands use (a model folder's own configuration by default).

    ``source`` is a dataset (id or name; its plans in ``nnUNet_preprocessed``) or a **model folder** as
    ``nnUNetv2_install_pretrained_model_from_zip`` installs it (or one fold folder of it): plans and
    dataset.json then come from the folder, no source data is needed, and the next commands name its
    ``fold_*/checkpoint_final.pth``. ``source_plans`` defaults to ``nnUNetPlans`` for a dataset and to the
    model's own plans name for a model folder.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if normalization is not None and normalization not in NORMALIZATION:
        raise ConfigError(f"--normalization must be one of {', '.join(NORMALIZATION)}, got {normalization!r}")
    if is_path_argument(source) and Path(source).is_file():
        raise DataError(f"-s {source} is a file: plans transfer takes a dataset or a model folder ({LAYOUT}); for an "
                        f"nnssl checkpoint write a target configuration for it with nnunet_transfer plans "
                        f"from-checkpoint -d {target} -c {source} -n NAME")
    model = load_model_folder(source) if is_path_argument(source) else None
    tgt = dataset_name(target)
    if model is not None:
        if source_plans is not None and source_plans != model.plans_identifier:
            raise ConfigError(f"-sp {source_plans} does not match the model folder {model.path}, whose plans are "
                              f"{model.plans_identifier!r}; leave -sp out for a model folder")
        source_plans = model.plans_identifier
        src, plans, src_json = model.source_name, model.plans, model.dataset_json
        source_label = f"the model folder {model.path}"
        configuration = configuration or model.configuration
    else:
        source_plans = source_plans or "nnUNetPlans"
        src = dataset_name(source)
        if src == tgt:
            raise ConfigError(f"source and target are the same dataset ({src}); give two datasets")
        plans = load_json(plans_path(src, source_plans))
        source_where, source_label = plans_path(src, source_plans), f"{src}/{source_plans}"
        if not isinstance(plans, dict) or "configurations" not in plans:
            raise DataError(f"{source_where} does not look like nnU-Net plans (no 'configurations')")
        src_json = load_dataset_json(src)
    target_plans = target_plans or source_plans
    raw = env_folder("nnUNet_raw") / tgt
    if not (raw / "dataset.json").is_file():
        raise DataError(f"{raw / 'dataset.json'} not found: nnU-Net preprocesses the target from nnUNet_raw")
    tgt_json = load_json(raw / "dataset.json")
    out_folder = env_folder("nnUNet_preprocessed") / tgt
    out_file = out_folder / f"{target_plans}.json"
    if out_file.exists() and not force:
        raise ConfigError(f"{out_file} exists; pass --force to replace it (the old file is kept as "
                          f"{out_file.name}.bak) or choose another name with -tp")
    if configuration is not None and configuration not in plans["configurations"]:
        raise ConfigError(f"configuration {configuration!r} is not in {source_label}; available: "
                          f"{sorted(plans['configurations'])}")

    notes: list[str] = []
    warnings: list[str] = []
    # ---- channels: count and normalisation (checked before anything is written or extracted)
    s_ch, t_ch = _channels(src_json), _channels(tgt_json)
    t_schemes = [_scheme_for(n) for n in t_ch.values()]
    norm_configs = _norm_configs(plans)
    by_channel: dict[tuple[int, str], list[str]] = {}
    for c, schemes in norm_configs.items():
        for i in range(min(len(schemes), len(t_schemes))):
            if schemes[i] != t_schemes[i]:
                by_channel.setdefault((i, schemes[i]), []).append(c)
    changed = [f"channel {i} {list(s_ch.values())[i] if i < len(s_ch) else '-'!r} ({scheme} in "
               f"{', '.join(confs)}) vs target {list(t_ch.values())[i]!r} ({t_schemes[i]})"
               for (i, scheme), confs in by_channel.items()]
    count_differs = len(s_ch) != len(t_ch)
    if count_differs and not allow_channel_change:
        raise ConfigError(f"the source {src} has {len(s_ch)} channel(s) {list(s_ch.values())}, the target {tgt} "
                          f"has {len(t_ch)} {list(t_ch.values())}; the pretrained first layer takes "
                          f"{len(s_ch)}. To go on, pass --allow-channel-change and adapt the checkpoint with "
                          f"`nnunet_transfer weights adapt CKPT -o OUT --in-channels {len(t_ch)}`")
    if changed and not allow_channel_change:
        raise ConfigError(f"channel normalisation differs: {'; '.join(changed)}. If the target channel is "
                          f"the same modality, name it like the source's in the target's dataset.json; to "
                          f"normalise it as its own name says, pass --allow-channel-change")
    declared = tgt_json.get("unannotated")
    unannotated = [str(n) for n in declared] if isinstance(declared, list) else []
    chosen = normalization
    if normalization is None:
        normalization = "source" if unannotated and not count_differs else "target"
    if count_differs and normalization == "source":
        raise ConfigError("--normalization source needs the same channels in source and target (the source's "
                          f"statistics are per channel: {len(s_ch)} vs {len(t_ch)}); use --normalization target")
    for i, (a, b) in enumerate(zip(s_ch.values(), t_ch.values())):
        if a != b and i < len(t_schemes) and not any(i < len(s) and s[i] != t_schemes[i]
                                                     for s in norm_configs.values()):
            notes.append(f"channel {i} is {a!r} in the source and {b!r} in the target (both {t_schemes[i]})")

    # ---- fingerprint and reader (nnU-Net's own code for both)
    fp_path, extracted = ensure_fingerprint(tgt, num_processes=num_processes, echo=echo)
    fingerprint = load_json(fp_path)
    t_props = {str(k): v for k, v in fingerprint.get("foreground_intensity_properties_per_channel", {}).items()}
    if sorted(t_props, key=int) != list(t_ch):
        raise DataError(f"{fp_path} has intensity properties for channels {sorted(t_props)}, the target has "
                        f"{list(t_ch)}; delete the file and run again to extract it anew")
    reader = _reader_writer(raw, tgt_json)

    # ---- what nnU-Net's move_plans_between_datasets does (its copy is guarded in nnunet_compat)
    new = move_plans(plans, target_dataset=tgt, source_plans=source_plans, target_plans=target_plans,
                     reader_writer=reader)

    # ---- channels that change: schemes and mask use as nnU-Net's planner would set them
    if allow_channel_change and (count_differs or changed):
        from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import \
            get_normalization_scheme

        classes = [get_normalization_scheme(n) for n in t_ch.values()]
        mask = mask_for_norm(classes, fingerprint["median_relative_size_after_cropping"])
        for c in new["configurations"].values():
            if "normalization_schemes" in c:
                c["normalization_schemes"] = [k.__name__ for k in classes]
                c["use_mask_for_norm"] = list(mask)
        warnings.append(f"channels follow the target ({', '.join(f'{n!r}: {s}' for n, s in zip(t_ch.values(), t_schemes))}); "
                        f"the source network was trained on {len(s_ch)} channel(s) "
                        f"{list(s_ch.values())} normalised as {sorted({s for v in norm_configs.values() for s in v})}")

    # ---- intensity properties
    s_props = {str(k): v for k, v in plans.get("foreground_intensity_properties_per_channel", {}).items()}
    schemes_now = next(iter(_norm_configs(new).values()), [])
    ct = [i for i, s in enumerate(schemes_now) if s in USES_PROPERTIES]
    if normalization == "target":
        new["foreground_intensity_properties_per_channel"] = t_props
        for i in ct:
            k = str(i)
            was = f" (the source's: {_props(s_props[k])})" if k in s_props else ""
            notes.append(f"channel {i} ({schemes_now[i]}) normalised with the target's own statistics: "
                         f"{_props(t_props[k])}{was}")
        if ct and unannotated:
            warnings.append(f"{tgt}'s dataset.json declares {unannotated} unannotated, and its own statistics come "
                            f"from the voxels it labels only: classes it leaves unlabelled may fall outside that "
                            f"clip range and look alike to the network. Leave --normalization out to keep the "
                            f"source's statistics")
    elif chosen is None:
        for i in ct:
            k = str(i)
            notes.append(f"channel {i} ({schemes_now[i]}) normalised with the SOURCE's statistics "
                         f"({_props(s_props[k])}), not the target's ({_props(t_props[k])}): {tgt}'s dataset.json "
                         f"declares {unannotated} unannotated, so its foreground statistics cover only the classes "
                         f"it labels and would clip the others; --normalization target uses its own")
    else:
        for i in ct:
            k = str(i)
            warnings.append(f"--normalization source: channel {i} of {tgt} is clipped and scaled with the "
                            f"SOURCE's statistics ({_props(s_props[k])}), not its own ({_props(t_props[k])}). "
                            f"Right only when both are on the same intensity scale (e.g. calibrated HU) and "
                            f"the network should see the same absolute mapping; a target with an offset or "
                            f"other units ends up clipped and shifted")
    if not ct:
        notes.append(f"no channel uses {'/'.join(sorted(USES_PROPERTIES))}: the intensity statistics are not used "
                     f"(per-image normalisation), --normalization makes no difference")

    # ---- labels: the heads are not loaded, so differences are allowed
    pm = PlansManager(copy.deepcopy(new))
    try:
        s_heads = pm.get_label_manager(src_json).num_segmentation_heads
        t_heads = pm.get_label_manager(tgt_json).num_segmentation_heads
    except Exception as e:  # noqa: BLE001 - nnU-Net asserts on malformed label dicts
        raise DataError(f"the labels of {src} or {tgt} are not valid for nnU-Net: {e}") from None
    if src_json.get("labels") != tgt_json.get("labels"):
        notes.append(f"labels differ: source {src_json.get('labels')} ({s_heads} outputs), target "
                     f"{tgt_json.get('labels')} ({t_heads} outputs); -pretrained_weights never loads the "
                     f"segmentation heads, so they start from random weights")

    # ---- spacing
    conf = configuration or ("3d_fullres" if "3d_fullres" in plans["configurations"]
                             else next(iter(plans["configurations"])))
    try:
        spacing = pm.get_configuration(conf).spacing
        tf = new.get("transpose_forward", list(range(len(spacing))))
        med = np.median(np.asarray(fingerprint["spacings"], dtype=float), 0)[tf]
        if not np.allclose(med, spacing, rtol=1e-3):
            notes.append(f"{conf} resamples the target (median spacing {[round(float(x), 4) for x in med]}) to the "
                         f"source's spacing {[round(float(x), 4) for x in spacing]}")
    except (KeyError, ValueError, IndexError):
        pass

    # ---- write: plans, dataset.json (nnU-Net's preprocessing reads it from here), splits if any
    out_folder.mkdir(parents=True, exist_ok=True)
    backup = write_plans(out_file, new)
    shutil.copy(raw / "dataset.json", out_folder / "dataset.json")
    if (raw / "splits_final.json").is_file() and not (out_folder / "splits_final.json").exists():
        shutil.copy(raw / "splits_final.json", out_folder / "splits_final.json")

    # ---- what to run next
    tid = _dataset_id(tgt)
    if model is not None:
        found = [model.checkpoint]
        if model.chosen is None and len(model.folds) > 1:
            notes.append(f"the model has {len(model.folds)} trained folds ({', '.join(f.name for f in model.folds)}); "
                         f"the commands use {model.fold.name}")
        if model.configuration is not None and conf != model.configuration:
            warnings.append(f"the model folder holds a {model.configuration} network; -c {conf} builds another "
                            f"network, which its checkpoint will not fit")
    else:
        found = _find_checkpoints(src, source_plans, conf)
    ckpt = str(found[0]) if found else (f"$nnUNet_results/{src}/TRAINER__{source_plans}__{conf}/fold_0/"
                                        f"checkpoint_final.pth")
    if len(found) > 1:
        notes.append(f"{len(found)} source checkpoints for {conf}: {', '.join(map(str, found))}")
    cmds = [f"nnUNetv2_preprocess -d {tid} -plans_name {target_plans} -c {conf}"]
    if count_differs:
        adapted = f"{src}_{conf}_{len(t_ch)}ch.pth"
        cmds.append(f"nnunet_transfer weights adapt {ckpt} -o {adapted} --in-channels {len(t_ch)} --method repeat")
        ckpt = adapted
    cmds.append(f"nnunet_transfer weights check {ckpt} -d {tid} -c {conf} -p {target_plans}")
    cmds.append(f"nnUNetv2_train {tid} {conf} 0 -p {target_plans} -tr nnUNetTrainerFinetune "
                f"-pretrained_weights {ckpt}")
    return TransferResult(src, tgt, source_plans, target_plans, out_file, backup, out_folder / "dataset.json",
                          fp_path, extracted, normalization, notes, warnings, cmds,
                          str(model.path) if model is not None else None)


__all__ = ["transfer_plans", "ensure_fingerprint", "TransferResult", "NORMALIZATION"]
