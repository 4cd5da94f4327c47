"""Reading nnU-Net's folders and plans, with errors that say what to fix.

Everything here reads the environment at call time (nnU-Net's own path objects do too), so tests and
notebooks may set ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` after import.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nnunet_transfer.errors import ConfigError, DataError

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def env_folder(var: str) -> Path:
    """The folder an nnU-Net environment variable points at; it must be set and exist."""
    value = os.environ.get(var)
    if not value:
        raise DataError(f"environment variable {var} is not set; fix: export {var}=/path/to/{var}")
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"{var}={value} does not exist or is not a folder; fix: mkdir -p {value}")
    return path


def dataset_name(dataset: str | int) -> str:
    """``902`` / ``"902"`` / ``"Dataset902_X"`` -> ``"Dataset902_X"``, found in raw or preprocessed."""
    text = str(dataset).strip()
    m = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_.*)?", text)
    if not m:
        raise DataError(f"dataset {dataset!r} is neither an id (e.g. 902) nor a name like "
                        f"'Dataset902_Name'")
    if text.startswith("Dataset") and "_" in text:
        return text
    wanted = f"Dataset{int(m.group(1)):03d}_"
    found: set[str] = set()
    for var in ENV_VARS:
        root = os.environ.get(var)
        if root and Path(root).is_dir():
            found |= {p.name for p in Path(root).iterdir() if p.name.startswith(wanted)}
    if not found:
        roots = ", ".join(f"{v}={os.environ.get(v, '<unset>')}" for v in ENV_VARS)
        raise DataError(f"no dataset with id {int(m.group(1))} ({wanted}*) in {roots}")
    if len(found) > 1:
        raise DataError(f"dataset id {int(m.group(1))} is ambiguous: {sorted(found)}; pass the full name")
    return found.pop()


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def plans_path(dataset: str | int, plans: str = "nnUNetPlans") -> Path:
    name = dataset_name(dataset)
    path = env_folder("nnUNet_preprocessed") / name / f"{plans}.json"
    if not path.is_file():
        raise DataError(f"plans {path} not found; run nnUNetv2_plan_and_preprocess -d {name} first "
                        f"(or give the plans identifier with -p)")
    return path


def load_plans(dataset: str | int, plans: str = "nnUNetPlans") -> dict:
    return load_json(plans_path(dataset, plans))


def load_dataset_json(dataset: str | int) -> dict:
    """dataset.json from the preprocessed folder (what training uses), else from the raw folder."""
    name = dataset_name(dataset)
    for var in ("nnUNet_preprocessed", "nnUNet_raw"):
        root = os.environ.get(var)
        if root and (Path(root) / name / "dataset.json").is_file():
            return load_json(Path(root) / name / "dataset.json")
    raise DataError(f"dataset.json of {name} not found in nnUNet_preprocessed or nnUNet_raw")


def check_configuration(plans: dict, configuration: str) -> None:
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise DataError(f"configuration {configuration!r} is not in plans {plans.get('plans_name')!r}; "
                        f"available: {sorted(configs)}")


def network_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int, *,
                       deep_supervision: bool = True):
    """The network of a configuration as nnU-Net builds it (``get_network_from_plans``, random init). A Primus
    (``network_class_name`` a Primus class of dynamic-network-architectures) has one output and takes no
    ``deep_supervision``: it is built as nnU-Net's own Primus trainers build it, ``input_shape`` = the patch size
    (:func:`nnunet_transfer.nnunet_compat.network_without_deep_supervision`)."""
    import inspect

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_transfer.blocks import primus_class_named  # lazy: torch; `--help` imports this module
    from nnunet_transfer.nnunet_compat import network_without_deep_supervision  # lazy: torch, as above

    cm = configuration_manager
    cls = primus_class_named(cm.network_arch_class_name)
    if cls is None:
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=deep_supervision)
    if "num_classes" not in inspect.signature(cls.__init__).parameters:
        raise ConfigError(f"network_class_name {cm.network_arch_class_name!r} takes 'output_channels' and a "
                          f"'config_name', which nnU-Net's plans cannot pass; use "
                          f"dynamic_network_architectures.architectures.primus.Primus with its embed_dim, eva_depth "
                          f"and eva_numheads in arch_kwargs")
    kwargs = dict(cm.network_arch_init_kwargs)
    patch = [int(v) for v in cm.patch_size]
    given = kwargs.pop("input_shape", None)
    if given is not None and [int(v) for v in given] != patch:
        raise ConfigError(f"arch_kwargs input_shape {list(given)} differs from the configuration's patch_size {patch}; "
                          f"a Primus is built for the patch it is trained on: remove input_shape from arch_kwargs")
    return network_without_deep_supervision(cm.network_arch_class_name, kwargs, cm.network_arch_init_kwargs_req_import,
                                            num_input_channels, num_output_channels, patch_size=patch)


def build_network(plans: dict, configuration: str, dataset_json: dict, *,
                  deep_supervision: bool = True):
    """The network nnU-Net would build for these plans (random init), on the CPU (a Primus: one output)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    check_configuration(plans, configuration)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    return network_from_plans(cm, determine_num_input_channels(pm, cm, dataset_json), lm.num_segmentation_heads,
                              deep_supervision=deep_supervision)


def raw_training_cases(dataset: str) -> tuple[dict, str]:
    """nnU-Net's training cases of the raw dataset (``{case: {"images", "label"}}``) and the file ending."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_transfer.nnunet_compat import list_training_cases  # lazy: torch; `--help` imports this module

    raw = env_folder("nnUNet_raw") / dataset
    if not (raw / "dataset.json").is_file():
        raise DataError(f"{raw}/dataset.json not found (nnUNet_raw/{dataset})")
    dataset_json = load_json(raw / "dataset.json")
    ending = dataset_json.get("file_ending")
    if not ending:
        raise DataError(f"{raw}/dataset.json has no file_ending")
    if "dataset" in dataset_json:  # files listed in dataset.json: nnU-Net's own reading
        files = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    else:
        # nnU-Net's rules without its Pool(12), which a submitit job would wait on forever (see there)
        images = raw / "imagesTr"
        if not images.is_dir():
            raise DataError(f"{images} not found: the raw dataset's training images")
        files = list_training_cases(raw, dataset_json)
    if not files:
        raise DataError(f"{dataset} has no training cases in {raw}")
    return files, ending
