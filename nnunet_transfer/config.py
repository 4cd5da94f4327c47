"""One validated settings object for every trainer of this package.

Settings have one path: the trainer class's defaults, overridden by the ``"nnunet_transfer"`` dict in
the plans *configuration* the run uses (``nnunet_transfer configure`` writes such configurations).
nnU-Net rebuilds a trainer from its ``__init__`` signature, so settings cannot be constructor arguments.

Unknown keys, wrong types and values out of range raise :class:`ConfigError` naming the key, the value
and what is valid, before anything is trained.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from nnunet_transfer.errors import ConfigError

PLANS_KEY = "nnunet_transfer"
HEADS_MODES = ("new", "by-name")
L2SP_ANCHOR = ("all", "kernels")


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a count to a user)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(lo: int):
    def check(key: str, v: Any) -> None:
        if not is_int(v) or v < lo:
            raise ConfigError(f"setting {key!r} must be an integer >= {lo}, got {v!r}")
    return check


def _optional_int_at_least(lo: int):
    inner = _int_at_least(lo)

    def check(key: str, v: Any) -> None:
        if v is not None:
            inner(key, v)
    return check


def _positive_float(key: str, v: Any) -> None:
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"setting {key!r} must be a finite number > 0, got {v!r}")


def _optional_positive_float(key: str, v: Any) -> None:
    if v is not None:
        _positive_float(key, v)


def _non_negative_float_or_inf(key: str, v: Any) -> None:
    if not _is_number(v) or math.isnan(v) or v < 0:
        raise ConfigError(f"setting {key!r} must be a number >= 0 (or inf), got {v!r}")


def _finite_non_negative(key: str, v: Any) -> None:
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"setting {key!r} must be a finite number >= 0, got {v!r}")


def _optional_non_negative_float(key: str, v: Any) -> None:
    if v is not None and (not _is_number(v) or not math.isfinite(v) or v < 0):
        raise ConfigError(f"setting {key!r} must be a finite number >= 0 or null, got {v!r}")


def _optional_spec(key: str, v: Any) -> None:
    if v is not None and (not isinstance(v, str) or not v.strip()):
        raise ConfigError(f"setting {key!r} must be a non-empty block spec string (e.g. 'encoder', "
                          f"'blocks:1,2', a preset name) or null, got {v!r}")


def _spec(key: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"setting {key!r} must be a non-empty block spec string, got {v!r}")


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"setting {key!r} must be true or false, got {v!r}")


def _choice(*choices: str):
    def check(key: str, v: Any) -> None:
        if v not in choices:
            raise ConfigError(f"setting {key!r} must be one of {list(choices)}, got {v!r}")
    return check


def _heads(key: str, v: Any) -> None:
    if v in HEADS_MODES:
        return
    if isinstance(v, Mapping) and v and all(isinstance(k, str) and k.strip() for k in v) and all(
            isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip() for x in v.values()):
        return
    raise ConfigError(f"setting {key!r} must be one of {list(HEADS_MODES)} or a mapping target label -> source "
                      f"label (names or values), e.g. {{\"organ\": \"liver\"}} or organ:liver,lesion:tumour; "
                      f"got {v!r}")


def _pause_at(key: str, v: Any) -> None:
    """Epoch counts after which a run pauses: null, or a non-empty list of increasing integers >= 1."""
    if v is None:
        return
    if (not isinstance(v, list) or not v or not all(is_int(e) and e >= 1 for e in v)
            or any(b <= a for a, b in zip(v, v[1:]))):
        raise ConfigError(f"setting {key!r} must be null or a non-empty list of increasing epoch counts >= 1 "
                          f"(e.g. [10, 30]; text 10,30), got {v!r}")


def _optional_names(key: str, v: Any) -> None:
    if v is None:
        return
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise ConfigError(f"setting {key!r} must be a list of label names (text: organ,lesion; [] = none, whatever "
                          f"dataset.json says) or null, got {v!r}")
    if len(set(v)) != len(v):
        raise ConfigError(f"setting {key!r} names a label twice: {v!r}")


def _stages(key: str, v: Any) -> None:
    """A staged schedule: ``[[spec, end_epoch], ..., [spec, null]]``, end epochs increasing, the last open."""
    if v is None:
        return
    example = 'e.g. [["decoder+seg", 50], ["all", null]] (--set stages=decoder+seg:50,all)'
    if not isinstance(v, list) or not v:
        raise ConfigError(f"setting {key!r} must be a non-empty list of [block spec, end epoch] stages, "
                          f"{example}; got {v!r}")
    last_end = 0
    for i, item in enumerate(v, 1):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not item[0].strip()
                or not (item[1] is None or is_int(item[1]))):
            raise ConfigError(f"setting {key!r}: stage {i} must be [block spec, end epoch or null], got {item!r}; "
                              f"{example}")
        spec, end = item
        if i == len(v):
            if end is not None:
                raise ConfigError(f"setting {key!r}: the last stage ({spec!r}) runs until num_epochs, so it has "
                                  f"no end epoch; got {end} (write {spec!r} without ':{end}')")
        elif end is None:
            raise ConfigError(f"setting {key!r}: stage {i} ({spec!r}) has no end epoch; every stage but the last "
                              f"needs one, {example}")
        elif end <= last_end and i == 1:
            raise ConfigError(f"setting {key!r}: stage 1 ({spec!r}) must end at an epoch >= 1 (the epoch at which "
                              f"stage 2 starts), got {end}")
        elif end <= last_end:
            raise ConfigError(f"setting {key!r}: stage end epochs must increase (each is the epoch at which the next "
                              f"stage starts, the first >= 1); stage {i} ({spec!r}) ends at epoch {end}, not after "
                              f"{last_end}")
        else:
            last_end = end


#: setting groups: a trainer class reads the settings of its groups (its ``transfer_keys`` are built from
#: :meth:`TransferConfig.keys` of them, e.g. ``keys("schedule", "run")`` for every trainer)
SETTING_GROUPS = ("schedule", "run", "freeze", "blockwise", "l2sp", "stages", "lora", "distill")


def _setting(default: Any, check, doc: str, *, group: str, resumable: bool = False, spec: bool = False):
    """A setting: its default, validator and doc, the group of trainers that read it, whether it may change
    on ``--c`` (``resumable``: it only says how long / how often) and whether it is a block spec."""
    assert group in SETTING_GROUPS, group  # programming error, not user input
    return field(default=default, metadata={"check": check, "doc": doc, "group": group, "resumable": resumable,
                                            "spec": spec})


@dataclass(frozen=True)
class TransferConfig:
    """Every setting of every trainer; a trainer declares which of them it reads (``transfer_keys``)."""

    # -- training length and schedule (all trainers; may change on --c) --
    num_epochs: int = _setting(1000, _int_at_least(1), "epochs (nnU-Net default 1000)", group="schedule",
                               resumable=True)
    num_iterations_per_epoch: int = _setting(250, _int_at_least(1), "training iterations per epoch",
                                             group="schedule", resumable=True)
    num_val_iterations_per_epoch: int = _setting(50, _int_at_least(1), "validation iterations per epoch",
                                                 group="schedule", resumable=True)
    save_every: int = _setting(50, _int_at_least(1),
                               "write checkpoint_latest.pth every N epochs (nnU-Net default 50)",
                               group="schedule", resumable=True)
    final_validation: bool = _setting(True, _bool,
                                      "run nnU-Net's full validation of the fold at the end (and --val)",
                                      group="schedule", resumable=True)
    snapshot_every: int = _setting(0, _int_at_least(0),
                                   "save weights-only snapshots at the start and every N epochs (0 = off)",
                                   group="schedule", resumable=True)
    pause_at: list | None = _setting(None, _pause_at,
                                     "pause the run after these completed epochs (checkpoint_latest.pth written, no "
                                     "final validation, transfer_config.json says paused); --c continues to the "
                                     "next pause or num_epochs. The LR schedule stays the one of num_epochs",
                                     group="schedule", resumable=True)
    # -- the run (all trainers; fixed for a run) --
    lr_scale: float = _setting(1.0, _positive_float,
                               "multiplies nnU-Net's initial_lr (1e-2); Finetune defaults to 0.5", group="run")
    optimizer: str = _setting("sgd", _choice("sgd", "adam", "adamw"),
                              "sgd (nnU-Net's: momentum 0.99, Nesterov), adam or adamw; weight decay is nnU-Net's "
                              "3e-5 (L2 for sgd/adam, decoupled for adamw)", group="run")
    initial_lr: float | None = _setting(None, _optional_positive_float,
                                        "the initial learning rate before lr_scale (null = nnU-Net's 1e-2; Amiri et "
                                        "al.: adam with 1e-4)", group="run")
    lr_schedule: str = _setting("poly", _choice("poly", "constant"),
                                "poly (nnU-Net's (1 - epoch/num_epochs)^0.9) or constant (the initial LR "
                                "throughout, after any warm-up)", group="run")
    early_stopping: str = _setting("none", _choice("none", "val_loss", "ema_dice"),
                                   "stop when the monitored quantity (nnU-Net's validation loss, or its EMA pseudo "
                                   "Dice) has not improved for `patience` epochs; num_epochs is then the maximum "
                                   "and a run that reaches it is recorded as not converged. With val_loss, "
                                   "checkpoint_best.pth is the lowest validation loss", group="run")
    patience: int = _setting(20, _int_at_least(1),
                             "epochs without improvement of the monitored quantity before early stopping "
                             "(Amiri et al.: 20)", group="run")
    seed: int | None = _setting(None, _optional_int_at_least(0),
                                "seeds python/numpy/torch before the network is built (nnU-Net sets none)",
                                group="run")
    warmup_epochs: int = _setting(0, _int_at_least(0),
                                  "linear LR ramp over this many epochs before the poly schedule", group="run")
    heads: str | dict = _setting("new", _heads,
                                 "segmentation heads: new (nnU-Net: fresh init), by-name (copy the rows of the "
                                 "labels whose names match the checkpoint's), or a mapping target -> source label",
                                 group="run")
    deep_supervision: bool = _setting(True, _bool,
                                      "nnU-Net's deep supervision (a loss on every decoder resolution); false trains "
                                      "the full-resolution output only, as nnUNetTrainerNoDeepSupervision does",
                                      group="run")
    unannotated: list | None = _setting(None, _optional_names,
                                        "source classes the target's label maps do not annotate (they are labelled "
                                        "background there): the loss merges them with background (marginal loss); "
                                        "null = the target dataset.json's \"unannotated\" list, if any; [] = none",
                                        group="run")
    # -- freezing --
    freeze_seg: bool = _setting(False, _bool,
                                "freeze the segmentation heads too (only meaningful with heads transferred; "
                                "Amiri presets without block 2N-1 default to true)",
                                group="freeze")
    freeze_reinit: bool = _setting(False, _bool,
                                   "freeze parameters not from the checkpoint (re-initialised or new after `weights "
                                   "adapt`) where the strategy freezes; false: the freezing trainers refuse, "
                                   "norm-only / BitFit / LoRA / stages train them in full", group="freeze")
    trainable: str | None = _setting(None, _optional_spec,
                                     "block spec of what trains; everything else is frozen", group="blockwise",
                                     spec=True)
    # -- L2-SP --
    l2sp_alpha: float = _setting(0.0, _non_negative_float_or_inf,
                                 "lambda of lambda*||theta_S - theta_S0||^2 over the scope; inf = freeze",
                                 group="l2sp")
    l2sp_beta: float | None = _setting(None, _optional_non_negative_float,
                                       "L2 toward zero outside the scope (null = nnU-Net weight decay)",
                                       group="l2sp")
    l2sp_scope: str = _setting("encoder", _spec, "block spec of the anchored parameters", group="l2sp",
                               spec=True)
    l2sp_anchor: str = _setting("all", _choice(*L2SP_ANCHOR),
                                "what in the scope is anchored: all parameters, or only conv/linear kernels "
                                "(Li et al.'s reference implementation)", group="l2sp")
    decoder_init: str = _setting("pretrained", _choice("pretrained", "random"),
                                 "decoder from the checkpoint or re-initialised (Sagie: random)", group="l2sp")
    allow_random_anchor: bool = _setting(False, _bool,
                                         "allow L2-SP without pretrained weights (anchor = random init)",
                                         group="l2sp")
    # -- staged schedules --
    stages: list | None = _setting(None, _stages,
                                   "trainable set per stage: [[spec, end epoch], ..., [spec, null]]; text "
                                   "decoder+seg:50,all", group="stages")
    stage_warmup_epochs: int = _setting(0, _int_at_least(0),
                                        "linear LR warm-up of the parameters a stage adds, over this many epochs "
                                        "from the stage's start", group="stages")
    # -- low-rank adapters --
    lora_rank: int = _setting(8, _int_at_least(1), "rank r of the update B·A of every adapted convolution",
                              group="lora")
    lora_alpha: float = _setting(8.0, _positive_float, "the update is scaled by lora_alpha / lora_rank",
                                 group="lora")
    lora_targets: str = _setting("encoder+decoder", _spec, "block spec of the convolutions that get adapters",
                                 group="lora", spec=True)

    # -- distillation from the source (continual learning) --
    distill_weight: float = _setting(1.0, _finite_non_negative,
                                     "weight of the KL term that keeps the source's probabilities of the old "
                                     "classes where the target label is background/unannotated (0 = off)",
                                     group="distill")

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))

    # ------------------------------------------------------------------
    @classmethod
    def keys(cls, *groups: str) -> list[str]:
        """Every setting, or those of the given groups (see :data:`SETTING_GROUPS`)."""
        unknown = set(groups) - set(SETTING_GROUPS)
        if unknown:
            raise ValueError(f"unknown setting group(s) {sorted(unknown)}; groups: {SETTING_GROUPS}")
        return [f.name for f in fields(cls) if not groups or f.metadata["group"] in groups]

    @classmethod
    def resumable_keys(cls) -> frozenset[str]:
        """Settings that only say how long / how often: they may change between a run and its ``--c``."""
        return frozenset(f.name for f in fields(cls) if f.metadata["resumable"])

    @classmethod
    def spec_keys(cls) -> tuple[str, ...]:
        """Settings that hold a block spec (parsed against the network's stage count)."""
        return tuple(f.name for f in fields(cls) if f.metadata["spec"])

    @classmethod
    def docs(cls) -> dict[str, tuple[Any, str]]:
        return {f.name: (f.default, f.metadata["doc"]) for f in fields(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None,
                     allowed: set[str] | None = None, owner: str = "this trainer") -> "TransferConfig":
        """Build from class defaults overridden by ``values`` (the plans' ``nnunet_transfer`` dict)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"the plans configuration's {PLANS_KEY!r} entry must be a JSON object "
                              f"of settings, got {type(values).__name__}: {values!r}")
        known = set(cls.keys())
        valid = sorted(allowed if allowed is not None else known)
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}; valid settings for {owner}: {valid}")
            if allowed is not None and key not in allowed:
                raise ConfigError(f"setting {key!r} is not used by {owner}; valid settings for "
                                  f"{owner}: {valid} (use another configuration for other trainers)")
        merged = {**(defaults or {}), **values}
        return cls(**{k: _coerce_special(k, v) for k, v in merged.items()})

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # JSON has no infinity; keep the file valid JSON and round-trippable
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True)


def _coerce_special(key: str, v: Any) -> Any:
    # JSON cannot hold infinity: "inf" (any case) is accepted for number settings that allow it
    if key == "l2sp_alpha" and isinstance(v, str) and v.strip().lower() in ("inf", "infinity"):
        return math.inf
    if key == "heads" and isinstance(v, str) and v.strip() not in HEADS_MODES:
        return parse_heads_text(v)
    if key == "pause_at":
        if is_int(v):
            return [v]
        if isinstance(v, str) and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", v):
            return [int(e) for e in v.split(",")]
        if isinstance(v, tuple):
            return list(v)
    if key == "unannotated" and isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()] if v.strip() not in ("[]", "") else []
    if key == "stages":
        if isinstance(v, str):
            return parse_stages_text(v)
        if isinstance(v, (list, tuple)):  # (spec, end) tuples from Python callers: the JSON form is lists
            return [list(item) if isinstance(item, tuple) else item for item in v]
    return v


_BLOCK_ITEM = re.compile(r"\s*\d+\s*(?:[abAB]|-\s*\d+)?\s*(?::\s*\d+\s*)?")


def _json_value(key: str, text: str, kind: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"setting {key!r}: {text!r} is not a valid JSON {kind} ({e})") from None


def parse_stages_text(text: str) -> list:
    """``"decoder+seg:50,all"`` -> ``[["decoder+seg", 50], ["all", None]]`` (a JSON list is read as JSON).

    Stages are separated by ',' (or ';'); each is ``SPEC:END`` with END the epoch at which the next stage
    starts, the last one ``SPEC``. Commas inside a ``blocks:`` list stay in it (``blocks:1,2:20,all``)."""
    t = text.strip()
    if t.startswith("["):
        return _json_value("stages", t, "list")
    pieces: list[str] = []
    for raw in t.split(";") if ";" in t else t.split(","):
        prev = pieces[-1] if pieces else ""
        # "blocks:1,2:20": the "2:20" continues the block list of the stage before it
        last_term = prev.split("+")[-1].strip().lower()
        if ";" not in t and last_term.startswith("blocks:") and _BLOCK_ITEM.fullmatch(raw) \
                and not re.search(r":\s*\d+\s*$", last_term[len("blocks:"):]):
            pieces[-1] = f"{prev},{raw}"
        else:
            pieces.append(raw)
    out = []
    for piece in pieces:
        spec, end = piece.strip(), None
        m = re.fullmatch(r"(.*\S)\s*:\s*(\d+)", spec)
        # "blocks:3" is a block list, not "blocks" ending at epoch 3
        if m and m.group(1).split("+")[-1].strip().lower() != "blocks":
            spec, end = m.group(1).strip(), int(m.group(2))
        if not spec:
            raise ConfigError(f"setting 'stages': empty stage in {t!r}; write SPEC:END_EPOCH,...,SPEC, "
                              f"e.g. decoder+seg:50,all")
        out.append([spec, end])
    return out


def parse_heads_text(text: str) -> Any:
    """``"organ:liver,lesion:tumour"`` or a JSON object -> ``{"organ": "liver", …}``; other text unchanged."""
    t = text.strip()
    if t.startswith("{"):
        return _json_value("heads", t, "object")
    if ":" not in t:
        return t  # not a mapping: the validator names the valid choices
    out: dict[str, str] = {}
    for item in t.split(","):
        target, sep, source = item.partition(":")
        if not sep or not target.strip() or not source.strip():
            raise ConfigError(f"setting 'heads': malformed item {item!r} in {t!r}; write TARGET:SOURCE pairs "
                              f"separated by commas, e.g. organ:liver,lesion:tumour")
        if target.strip() in out:
            raise ConfigError(f"setting 'heads': target label {target.strip()!r} is mapped twice in {t!r}")
        out[target.strip()] = source.strip()
    return out


def parse_cli_value(key: str, text: str) -> Any:
    """Turn ``--set key=value`` text into the JSON value the plans will hold."""
    if key not in TransferConfig.keys():
        raise ConfigError(f"unknown setting {key!r}; valid settings: {sorted(TransferConfig.keys())}")
    t = text.strip()
    if key == "heads":
        return _coerce_special(key, t)
    if t.lower() in ("null", "none"):
        return None
    if key in ("stages", "pause_at", "unannotated"):
        return _coerce_special(key, t)
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("inf", "infinity"):
        return "inf"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        value = float(t)
    except ValueError:
        return t
    if math.isnan(value):
        raise ConfigError(f"setting {key!r} cannot be NaN, got {text!r}")
    return value
