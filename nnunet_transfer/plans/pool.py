"""Pool several raw datasets into one, for multi-centre pretraining.

The pooled dataset is an ordinary nnU-Net raw dataset (``imagesTr``/``labelsTr``/``dataset.json``):
its files are symbolic links to the sources' training files (copies where the filesystem refuses
links, or with ``copy=True``), each case renamed ``<SourceDatasetName>_<case>`` so that names cannot
clash and every case says where it came from. Test images (``imagesTs``) are not pooled: the pool is
for pretraining. Sources must agree on channels, labels (and ``regions_class_order``), file ending
and image reader; every disagreement is listed in one error.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import ENV_VARS, dataset_name, env_folder, load_json

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
# dataset.json entries every source must share; the pool inherits them
_SHARED = ("channel_names", "labels", "file_ending", "regions_class_order", "overwrite_image_reader_writer")


@dataclass
class PoolResult:
    folder: Path
    cases: dict[str, int]  # source dataset -> number of training cases
    linked: int
    copied: int
    next_commands: list[str] = field(default_factory=list)

    def text(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.cases.items())
        how = f"{self.linked} files linked" + (f", {self.copied} copied" if self.copied else "")
        return "\n".join([f"pooled {sum(self.cases.values())} training cases ({per}) into {self.folder} ({how})",
                          "next:", *[f"  {c}" for c in self.next_commands]])


def _taken(dataset_id: int) -> list[str]:
    prefix = f"Dataset{dataset_id:03d}_"
    out = []
    for var in ENV_VARS:
        root = os.environ.get(var)
        if root and Path(root).is_dir():
            out += [f"{p.name} in {var}" for p in Path(root).iterdir() if p.name.startswith(prefix)]
    return out


def _entry(dataset_json: dict, key: str):
    if key == "channel_names":
        ch = dataset_json.get("channel_names", dataset_json.get("modality"))
        return {str(k): v for k, v in ch.items()} if isinstance(ch, dict) else ch
    return dataset_json.get(key)


def _dict_difference(a: dict, b: dict, first: str, other: str) -> str:
    parts = []
    if missing := [k for k in a if k not in b]:
        parts.append(f"{other} lacks {missing}")
    if extra := [k for k in b if k not in a]:
        parts.append(f"{other} adds {extra}")
    if changed := [f"{k!r} {a[k]!r} vs {b[k]!r}" for k in a if k in b and a[k] != b[k]]:
        parts.append("other values " + ", ".join(changed))
    return "; ".join(parts)


def compare_dataset_jsons(jsons: dict[str, dict]) -> list[str]:
    """Every disagreement between the datasets' shared entries, each against the first dataset."""
    names = list(jsons)
    first = names[0]
    diffs = []
    for key in _SHARED:
        ref = _entry(jsons[first], key)
        for n in names[1:]:
            val = _entry(jsons[n], key)
            if val == ref:
                continue
            if isinstance(ref, dict) and isinstance(val, dict):
                diffs.append(f"{key} ({_dict_difference(ref, val, first, n)}): {first} {ref} vs {n} {val}")
            else:
                diffs.append(f"{key}: {first} {ref!r} vs {n} {val!r}")
    return diffs


def _place(src: str, dest: Path, copy: bool) -> bool:
    """Link ``dest`` to ``src`` (absolute); copy where links fail or ``copy``. True when linked."""
    if not copy:
        try:
            os.symlink(os.path.abspath(src), dest)
            return True
        except (OSError, NotImplementedError):
            pass
    shutil.copy2(src, dest)
    return False


def pool_datasets(datasets: Sequence[str | int], new_id: int, name: str, *, copy: bool = False) -> PoolResult:
    """Create ``nnUNet_raw/Dataset<new_id>_<name>`` pooling the training cases of ``datasets``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if len(datasets) < 2:
        raise ConfigError(f"pool needs at least two datasets, got {list(datasets)}")
    if isinstance(new_id, bool) or not isinstance(new_id, int) or not 1 <= new_id <= 999:
        raise ConfigError(f"the new dataset id must be an integer in 1..999, got {new_id!r}")
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"--name {name!r} may only hold letters, digits, '_' and '-' (it becomes "
                          f"Dataset{new_id:03d}_NAME)")
    if taken := _taken(new_id):
        raise ConfigError(f"dataset id {new_id} is taken ({', '.join(taken)}); choose another -o")
    names = [dataset_name(d) for d in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"a dataset is given twice: {names}")
    raw = env_folder("nnUNet_raw")
    jsons = {}
    for n in names:
        if not (raw / n / "dataset.json").is_file():
            raise DataError(f"{raw / n / 'dataset.json'} not found: pool reads raw datasets")
        jsons[n] = load_json(raw / n / "dataset.json")
    if diffs := compare_dataset_jsons(jsons):
        raise ConfigError("datasets cannot be pooled, they differ in " + "; ".join(diffs))
    ref = jsons[names[0]]
    ending = ref["file_ending"]
    n_channels = len(_entry(ref, "channel_names"))
    cases = {}
    for n in names:
        try:
            listed = get_filenames_of_train_images_and_targets(str(raw / n), jsons[n])
            cases[n] = {str(k): v for k, v in listed.items()}  # nnU-Net yields numpy strings
        except (OSError, KeyError) as e:
            raise DataError(f"cannot list the training cases of {raw / n}: {e}") from None
        if not cases[n]:
            raise DataError(f"{raw / n} has no training cases")
        for case, files in cases[n].items():
            missing = [f for f in [*files["images"], files["label"]] if not os.path.isfile(f)]
            if len(files["images"]) != n_channels or missing:
                raise DataError(f"{n} case {case!r}: expected {n_channels} image(s) and a label, found "
                                f"{len(files['images'])} image(s); missing {missing}")

    final = raw / f"Dataset{new_id:03d}_{name}"
    partial = raw / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    linked = copied = 0
    try:
        (partial / "imagesTr").mkdir(parents=True)
        (partial / "labelsTr").mkdir()
        for n in names:
            for case, files in cases[n].items():
                new_case = f"{n}_{case}"
                for c, img in enumerate(files["images"]):
                    ok = _place(img, partial / "imagesTr" / f"{new_case}_{c:04d}{ending}", copy)
                    linked, copied = linked + ok, copied + (not ok)
                ok = _place(files["label"], partial / "labelsTr" / f"{new_case}{ending}", copy)
                linked, copied = linked + ok, copied + (not ok)
        out = {k: _entry(ref, k) for k in _SHARED if _entry(ref, k) is not None}
        out.update({"numTraining": sum(len(c) for c in cases.values()), "name": name,
                    "description": "nnunet_transfer pool of " + ", ".join(names),
                    "nnunet_transfer_pool": {n: len(cases[n]) for n in names}})
        import json

        (partial / "dataset.json").write_text(json.dumps(out, indent=2))
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    cmds = [f"nnUNetv2_plan_and_preprocess -d {new_id} -c 3d_fullres --verify_dataset_integrity",
            f"nnUNetv2_train {new_id} 3d_fullres 0 -tr nnUNetTrainerTransferBase",
            f"nnunet_transfer plans transfer -s {new_id} -t TARGET"]
    return PoolResult(final, {n: len(cases[n]) for n in names}, linked, copied, cmds)


__all__ = ["pool_datasets", "compare_dataset_jsons", "PoolResult"]
