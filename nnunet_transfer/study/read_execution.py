"""[environment] and [slurm]: how nnU-Net's programs are started for each run — extra environment
variables, and the resources of each run's SLURM job (``study run --executor slurm``)."""
from __future__ import annotations

import re
from typing import Any

from nnunet_transfer.study.problems import Problems, read_int, read_str, read_table

#: [slurm] key -> the submitit parameter it becomes (generic ones work for every submitit cluster)
SLURM_KEYS = {"partition": "slurm_partition", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
              "mem_gb": "mem_gb", "timeout_min": "timeout_min", "array_parallelism": "slurm_array_parallelism",
              "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
              "setup": "slurm_setup", "max_requeue": "slurm_max_num_timeout",
              "additional": "slurm_additional_parameters"}


def read_environment(p: Problems, content: Any) -> dict[str, str]:
    if not isinstance(content, dict):
        p.add("environment", f"must be a table of NAME = \"value\", got {content!r}")
        return {}
    out = {}
    for k, v in content.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            p.add("environment", f"{k!r} is not an environment variable name")
        elif k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            p.add("environment", f"{k} comes from the environment `study` runs in (every run must use "
                                 f"the same folders); set it there, not in the study file")
        elif isinstance(v, bool) or not isinstance(v, (str, int, float)):
            p.add("environment", f"{k} = {v!r} must be a string or a number")
        else:
            out[k] = str(v)
    return out


def read_slurm(p: Problems, content: Any) -> dict[str, Any]:
    sl = read_table(p, "slurm", content, list(SLURM_KEYS)) or {}
    out: dict[str, Any] = {}
    for key, value in sl.items():
        if key in ("gpus_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "max_requeue"):
            value = read_int(p, "slurm", key, value, 0 if key in ("gpus_per_node", "max_requeue") else 1)
        elif key == "mem_gb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                value = p.add("slurm", f"mem_gb = {value!r} must be a number of GB > 0")
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                value = p.add("slurm", f"setup = {value!r} must be a list of shell lines, e.g. "
                                       f"[\"module load cuda\"]")
        elif key == "additional":
            if not isinstance(value, dict):
                value = p.add("slurm", f"additional = {value!r} must be a table of sbatch options, e.g. "
                                       f"{{ gres = \"gpu:a100:1\" }}")
        else:
            value = read_str(p, "slurm", key, value)
        out[key] = value
    return out



__all__ = ["read_environment", "read_slurm", "SLURM_KEYS"]
