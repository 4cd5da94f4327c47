"""nnssl checkpoints as a source: their adaptation plan, the architecture it names, and their encoder's tensors.

An nnssl checkpoint (self-supervised pretraining, https://github.com/MIC-DKFZ/nnssl) is a ``torch.save`` dict
like nnU-Net's — ``network_weights`` (the whole *pretraining* network: encoder, stem and a reconstruction
decoder), ``init_args``, ``trainer_name``, … — plus ``nnssl_adaptation_plan``, nnssl's
``AdaptationPlan.serialize()`` (``src/nnssl/adaptation_planning/adaptation_plan.py``)::

    architecture_plans: {arch_class_name, arch_kwargs (or null for a preset), arch_kwargs_requiring_import}
    pretrain_plan: {..., configurations: {NAME: {patch_size, spacing, ...}}}
    pretrain_num_input_channels, recommended_downstream_patchsize,
    key_to_encoder ("encoder.stages"), key_to_stem ("encoder.stem"),
    keys_to_in_proj (("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")), key_to_lpe (Primus)

A Primus pretraining (nnssl's ``BaseEvaMAETrainer`` and its kin) saves an ``EvaMAE`` — ``down_projection``
(patch embedding), ``eva`` (the transformer), a reconstruction ``decoder`` / ``up_projection`` and
``mask_token`` — with ``key_to_encoder = "eva"``, ``key_to_stem = "down_projection"``, ``keys_to_in_proj =
("down_projection.proj",)`` and ``key_to_lpe = "eva.pos_embed"``.

What a target takes from it is what nnU-Net master's ``PretrainedTrainer.load_pretrained_weights`` takes
(``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``): the tensors under ``key_to_encoder``
and ``key_to_stem``, renamed to the target network's own ``key_to_encoder`` / ``key_to_stem``; the stem's
input projection adapted to the target's input channels; the decoder and the heads start fresh.
:func:`encoder_tensors` does the selection and renaming; the mapping onto a network and its per-block report
are :func:`nnunet_transfer.plans.adapt.map_checkpoint`.

Architectures (:func:`read_plan`): the presets ``ResEncL`` / ``NoSkipResEncL`` (nnssl's
``architecture_registry``, restated in :data:`RESENC_L_KWARGS`), and ``ResidualEncoderUNet`` /
``PlainConvUNet`` with their kwargs, are built from nnU-Net 2.8.1 plans as dynamic-network-architectures'
classes (:meth:`NnsslPlan.architecture`). Primus: the presets ``PrimusS`` / ``PrimusB`` / ``PrimusM`` /
``PrimusL`` (nnssl's ``get_network_by_name`` and nnU-Net master's ``get_network_from_name``: dynamic-network-
architectures' ``PrimusX`` sizes with an 8³ patch embedding, :data:`PRIMUS_PRESETS`) and the class ``Primus``
with its kwargs (nnssl's ``get_network_from_plans`` builds it, for sizes other than the presets'), written to
nnU-Net 2.8.1 plans as ``dynamic_network_architectures.architectures.primus.Primus`` with explicit
``embed_dim`` / ``eva_depth`` / ``eva_numheads``, which this package's trainers build (nnU-Net 2.8.1's own build
cannot, :mod:`nnunet_transfer.nnunet_io`). Anything else is refused in one line that says why.
"""
from __future__ import annotations

import copy
import inspect
import pydoc
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from nnunet_transfer.checkpoints import NNSSL_KEY, LoadedWeights
from nnunet_transfer.errors import ArchitectureError, DataError
from nnunet_transfer.netutil import primus_module
from nnunet_transfer.plans.primus import PRIMUS_CLASS

UNET_MODULE = "dynamic_network_architectures.architectures.unet"
#: the convolutional classes a plan may name, and the dotted names nnU-Net 2.8.1 plans give them
CONV_CLASSES = {"ResidualEncoderUNet": f"{UNET_MODULE}.ResidualEncoderUNet",
                "PlainConvUNet": f"{UNET_MODULE}.PlainConvUNet"}
#: nnssl's ``get_res_enc_l`` (``src/nnssl/architectures/architecture_registry.py``; nnU-Net master's
#: ``get_network_from_name("ResEncL")`` builds the same), in nnU-Net plans' serialised form
RESENC_L_KWARGS = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.modules.activation.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
#: presets nnssl names without kwargs -> (class, kwargs)
PRESETS = {"ResEncL": ("ResidualEncoderUNet", RESENC_L_KWARGS),
           "NoSkipResEncL": ("ResidualEncoderUNet", RESENC_L_KWARGS)}
PRIMUS = ("PrimusS", "PrimusB", "PrimusM", "PrimusL", "Primus")
#: nnssl's Primus presets: dynamic-network-architectures' ``_PRIMUS_CONFIGS`` sizes and ``PrimusS`` … ``PrimusL``
#: defaults (``init_values=0.1``, ``scale_attn_inner=True``), the 8³ patch embedding nnssl and nnU-Net master pass
#: (tests/plans/test_nnssl_primus.py holds them to the installed package)
PRIMUS_PRESETS = {
    "PrimusS": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6},
    "PrimusB": {"embed_dim": 792, "eva_depth": 12, "eva_numheads": 12},
    "PrimusM": {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12},
    "PrimusL": {"embed_dim": 1056, "eva_depth": 24, "eva_numheads": 16},
}
PRIMUS_PRESET_COMMON = {"patch_embed_size": [8, 8, 8], "init_values": 0.1, "scale_attn_inner": True}
#: Primus kwargs that name a class; nnU-Net plans pass them as dotted strings (``_kw_requires_import``)
_PRIMUS_CLASS_KWARGS = ("decoder_norm", "decoder_act", "rope_impl")
#: Primus kwargs nnU-Net or this package pass themselves (input_shape: the configuration's patch size)
_PRIMUS_PASSED = ("self", "input_channels", "num_classes", "input_shape")
#: kwargs that name a class (nnU-Net plans' ``_kw_requires_import``)
_CLASS_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin", "block")
#: kwargs nnU-Net passes itself when it builds a network from plans
_PASSED_BY_NNUNET = ("self", "input_channels", "num_classes", "deep_supervision")
_REQUIRED = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
             "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj")


@dataclass(frozen=True)
class NnsslPlan:
    """A validated nnssl adaptation plan, in the terms nnU-Net 2.8.1 plans use."""

    arch_class_name: str  # as the checkpoint names it (``ResEncL``, ``ResidualEncoderUNet``, ``PrimusM``, …)
    network_class_name: str  # dotted dynamic-network-architectures class
    arch_kwargs: dict  # plans form (classes as dotted strings)
    pretrain_num_input_channels: int
    recommended_downstream_patchsize: list[int]
    pretrain_patch_size: list[int] | None
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def is_primus(self) -> bool:
        return self.arch_class_name.rsplit(".", 1)[-1] in PRIMUS

    @property
    def spatial_dims(self) -> int:
        return len(self.recommended_downstream_patchsize)

    def architecture(self) -> dict:
        """The configuration's ``architecture`` entry of nnU-Net 2.8.1 plans that builds this network."""
        kwargs = dict(self.arch_kwargs)
        names = _PRIMUS_CLASS_KWARGS if self.is_primus else _CLASS_KWARGS
        return {"network_class_name": self.network_class_name, "arch_kwargs": kwargs,
                "_kw_requires_import": [k for k in names if k in kwargs]}

    @property
    def patch_embed_size(self) -> list[int] | None:
        """A Primus' patch embedding (its token size per axis); None for a convolutional U-Net."""
        return list(self.arch_kwargs["patch_embed_size"]) if self.is_primus else None

    def summary(self) -> str:
        cls = (self.network_class_name or self.arch_class_name).rsplit(".", 1)[-1]
        arch = self.arch_class_name if cls == self.arch_class_name.rsplit(".", 1)[-1] else f"{self.arch_class_name} ({cls})"
        return (f"nnssl checkpoint: {arch}, {self.pretrain_num_input_channels} input channel(s), recommended "
                f"patch size {self.recommended_downstream_patchsize}")


def _where(path: Any) -> str:
    return f"{path}: {NNSSL_KEY}"


def _ints(value: Any, what: str, where: str, *, n: int | None = None) -> list[int]:
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v > 0 for v in value)
    if not ok or (n is not None and len(value) != n):
        size = f"{n} " if n is not None else ""
        raise DataError(f"{where}.{what} must be a list of {size}positive integers, got {value!r}")
    return [int(v) for v in value]


def _conv_kwargs(cls_name: str, kwargs: Any, where: str) -> dict:
    """``arch_kwargs`` checked against the dynamic-network-architectures class it is for (no network built)."""
    if not isinstance(kwargs, Mapping):
        raise DataError(f"{where}.architecture_plans.arch_kwargs is {kwargs!r}: a {cls_name} plan needs its kwargs "
                        f"(n_stages, features_per_stage, conv_op, kernel_sizes, strides, …)")
    cls = pydoc.locate(CONV_CLASSES[cls_name])
    params = inspect.signature(cls.__init__).parameters
    allowed = {k for k in params if k not in _PASSED_BY_NNUNET}
    kwargs = {k: v for k, v in kwargs.items() if k != "deep_supervision"}  # nnU-Net passes its own
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ArchitectureError(f"{where}.architecture_plans.arch_kwargs has {unknown}, which {cls_name} of "
                                f"dynamic-network-architectures does not take (it takes {sorted(allowed)}); nnU-Net "
                                f"2.8.1 cannot build this network from plans")
    missing = [k for k in allowed if params[k].default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise DataError(f"{where}.architecture_plans.arch_kwargs lacks {missing}, which {cls_name} needs")
    out = dict(kwargs)
    for k in _CLASS_KWARGS:
        v = out.get(k)
        if v is None:
            continue
        if isinstance(v, type):  # a plan built in-process (DynamicArchitecturePlans before serialize())
            v = out[k] = f"{v.__module__}.{v.__name__}"
        if not isinstance(v, str) or pydoc.locate(v) is None:
            raise ArchitectureError(f"{where}.architecture_plans.arch_kwargs.{k} = {v!r} names no importable class; "
                                    f"nnU-Net 2.8.1 cannot build this network from plans")
    conv = pydoc.locate(out["conv_op"])
    if conv not in (torch.nn.Conv2d, torch.nn.Conv3d):
        raise ArchitectureError(f"{where}.architecture_plans.arch_kwargs.conv_op = {out['conv_op']!r}: nnU-Net "
                                f"builds 2-D and 3-D networks (torch.nn.Conv2d / Conv3d)")
    return out


def _primus_kwargs(name: str, arch: Mapping, where: str) -> dict:
    """A Primus plan's kwargs in plans form: a preset's (:data:`PRIMUS_PRESETS`), or the class ``Primus``'s own
    ``arch_kwargs`` checked against dynamic-network-architectures' signature (no network built)."""
    short = name.rsplit(".", 1)[-1]
    if short in PRIMUS_PRESETS:
        return {**PRIMUS_PRESETS[short], **copy.deepcopy(PRIMUS_PRESET_COMMON)}
    if short != "Primus" or name not in ("Primus", PRIMUS_CLASS):
        raise ArchitectureError(f"{where}.architecture_plans.arch_class_name is {name!r}: of the Primus family this "
                                f"package builds {sorted(PRIMUS_PRESETS)} and {PRIMUS_CLASS} (with its kwargs)")
    kwargs = arch.get("arch_kwargs")
    if not isinstance(kwargs, Mapping):
        raise DataError(f"{where}.architecture_plans.arch_kwargs is {kwargs!r}: the class Primus needs its kwargs "
                        f"(embed_dim, patch_embed_size, eva_depth, eva_numheads, …); a preset names PrimusS/B/M/L")
    Primus = primus_module().Primus
    params = inspect.signature(Primus.__init__).parameters
    allowed = {k for k in params if k not in _PRIMUS_PASSED}
    unknown = sorted(set(kwargs) - allowed - {"input_shape"})
    if unknown:
        raise ArchitectureError(f"{where}.architecture_plans.arch_kwargs has {unknown}, which Primus of "
                                f"dynamic-network-architectures does not take (it takes {sorted(allowed)})")
    out = {k: copy.deepcopy(v) for k, v in kwargs.items() if k != "input_shape"}  # the target's patch size
    for k in ("embed_dim", "patch_embed_size"):
        if k not in out:
            raise DataError(f"{where}.architecture_plans.arch_kwargs lacks {k!r}, which Primus needs")
    for k in ("embed_dim", "eva_depth", "eva_numheads"):
        v = out.get(k, params[k].default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{where}.architecture_plans.arch_kwargs.{k} must be an integer >= 1, got {v!r}")
        out[k] = v  # explicit: nnU-Net plans state the network, not dynamic-network-architectures' defaults
    out["patch_embed_size"] = _ints(out["patch_embed_size"], "architecture_plans.arch_kwargs.patch_embed_size",
                                    where, n=3)
    if out["embed_dim"] % out["eva_numheads"]:
        raise DataError(f"{where}.architecture_plans.arch_kwargs: embed_dim {out['embed_dim']} is not divisible by "
                        f"eva_numheads {out['eva_numheads']}")
    for k in _PRIMUS_CLASS_KWARGS:
        v = out.get(k)
        if v is None:
            continue
        if isinstance(v, type):
            v = out[k] = f"{v.__module__}.{v.__name__}"
        if not isinstance(v, str) or pydoc.locate(v) is None:
            raise ArchitectureError(f"{where}.architecture_plans.arch_kwargs.{k} = {v!r} names no importable class; "
                                    f"nnU-Net 2.8.1 plans pass a class as its dotted name")
    return out


def read_plan(raw: Any, *, path: Any = "checkpoint") -> NnsslPlan:
    """Validate an nnssl checkpoint's ``nnssl_adaptation_plan``; one-line errors naming the key that is missing
    or odd (:class:`DataError`) or why the architecture cannot be built from nnU-Net 2.8.1 plans
    (:class:`ArchitectureError`)."""
    where = _where(path)
    if not isinstance(raw, Mapping):
        raise DataError(f"{where} is a {type(raw).__name__}, expected a dict (nnssl's AdaptationPlan.serialize())")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise DataError(f"{where} lacks {missing}; nnssl's AdaptationPlan.serialize() writes {list(_REQUIRED)}")
    arch = raw["architecture_plans"]
    if not isinstance(arch, Mapping) or not isinstance(arch.get("arch_class_name"), str):
        raise DataError(f"{where}.architecture_plans must be a dict with a string arch_class_name, got {arch!r}"[:300])
    name = arch["arch_class_name"]
    short = name.rsplit(".", 1)[-1]
    for key in ("key_to_encoder", "key_to_stem"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise DataError(f"{where}.{key} must be a module path such as 'encoder.stages', got {raw[key]!r}")
    in_proj = raw["keys_to_in_proj"]
    if isinstance(in_proj, str) or not isinstance(in_proj, (list, tuple)) or not in_proj \
            or not all(isinstance(k, str) and k for k in in_proj):
        raise DataError(f"{where}.keys_to_in_proj must be a list of module paths (the stem's input projection), "
                        f"got {in_proj!r}")
    lpe = raw.get("key_to_lpe")
    if lpe is not None and not isinstance(lpe, str):
        raise DataError(f"{where}.key_to_lpe must be a module path or null, got {lpe!r}")
    channels = raw["pretrain_num_input_channels"]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise DataError(f"{where}.pretrain_num_input_channels must be an integer >= 1, got {channels!r}")
    patch = _ints(raw["recommended_downstream_patchsize"], "recommended_downstream_patchsize", where)
    pretrain_patch = None
    if raw.get("pretrain_patch_size") is not None:  # nnU-Net master lets it override the pretraining plan's
        pretrain_patch = _ints(raw["pretrain_patch_size"], "pretrain_patch_size", where, n=len(patch))
    else:
        configs = raw["pretrain_plan"].get("configurations") if isinstance(raw["pretrain_plan"], Mapping) else None
        first = next(iter(configs.values()), None) if isinstance(configs, Mapping) else None
        if isinstance(first, Mapping) and first.get("patch_size") is not None:
            pretrain_patch = _ints(first["patch_size"], "pretrain_plan.configurations.*.patch_size", where)
    common = dict(arch_class_name=name, pretrain_num_input_channels=channels,
                  recommended_downstream_patchsize=patch, pretrain_patch_size=pretrain_patch,
                  key_to_encoder=raw["key_to_encoder"], key_to_stem=raw["key_to_stem"],
                  keys_to_in_proj=tuple(in_proj), key_to_lpe=lpe)
    if short in PRIMUS:
        kwargs = _primus_kwargs(name, arch, where)
        if len(patch) != 3:
            raise DataError(f"{where}.recommended_downstream_patchsize {patch} has {len(patch)} axes, a Primus is 3-D")
        for what, size in (("recommended_downstream_patchsize", patch), ("pretrain patch size", pretrain_patch)):
            if size is not None and any(p % e for p, e in zip(size, kwargs["patch_embed_size"])):
                raise DataError(f"{where}: the {what} {size} is not a multiple of the patch embedding "
                                f"{kwargs['patch_embed_size']} on every axis")
        if lpe is None:
            raise DataError(f"{where}.key_to_lpe is null: a Primus checkpoint names its positional embedding "
                            f"(nnssl writes 'eva.pos_embed')")
        return NnsslPlan(network_class_name=PRIMUS_CLASS, arch_kwargs=kwargs, **common)
    notes: list[str] = []
    if short in PRESETS:
        cls_name, kwargs = PRESETS[short]
        if short == "NoSkipResEncL":
            notes.append("NoSkipResEncL's encoder is ResEncL's; its skip-less decoder is nnssl's own class, which "
                         "nnU-Net does not build: the target is a ResidualEncoderUNet, whose decoder starts fresh "
                         "in any case")
        kwargs = _conv_kwargs(cls_name, kwargs, where)
    elif short in CONV_CLASSES:
        cls_name = short
        kwargs = _conv_kwargs(cls_name, arch.get("arch_kwargs"), where)
    else:
        raise ArchitectureError(f"{where}.architecture_plans.arch_class_name is {name!r}, which nnU-Net 2.8.1 plans "
                                f"cannot build: this package maps {sorted(PRESETS) + sorted(CONV_CLASSES)} and "
                                f"{list(PRIMUS)}")
    dims = 3 if kwargs["conv_op"].endswith("3d") else 2
    if len(patch) != dims:
        raise DataError(f"{where}.recommended_downstream_patchsize {patch} has {len(patch)} axes, the network is "
                        f"{dims}-D")
    return NnsslPlan(network_class_name=CONV_CLASSES[cls_name], arch_kwargs=kwargs, notes=tuple(notes), **common)


def plan_of(weights: LoadedWeights) -> NnsslPlan:
    """The validated plan of an nnssl checkpoint (raises :class:`DataError` for a file that is not one)."""
    if not weights.is_nnssl:
        raise DataError(f"{weights.path} is not an nnssl checkpoint (it has no {NNSSL_KEY!r})")
    return read_plan(weights.nnssl_plan, path=weights.path)


def _under(key: str, prefix: str) -> str | None:
    """``key`` relative to module ``prefix`` (``""`` for the prefix itself), or None when outside it."""
    if key == prefix:
        return ""
    return key[len(prefix):] if key.startswith(prefix + ".") else None


def in_encoder(key: str, plan: NnsslPlan) -> bool:
    """Whether a checkpoint key lies under the plan's ``key_to_encoder`` or ``key_to_stem``."""
    return _under(key, plan.key_to_encoder) is not None or _under(key, plan.key_to_stem) is not None


def encoder_tensors(weights: LoadedWeights, plan: NnsslPlan, *, to_encoder: str,
                    to_stem: str) -> dict[str, torch.Tensor]:
    """The checkpoint's encoder and stem tensors, renamed from the plan's ``key_to_encoder`` / ``key_to_stem`` to
    the target network's (its ``key_to_encoder`` / ``key_to_stem`` attributes, as nnU-Net master's loader reads
    them). Everything else of the pretraining network (its decoder and heads) is left out.

    Raises :class:`DataError` when a key names no tensor, or the input projection's channel count differs from
    ``pretrain_num_input_channels``.
    """
    state = weights.state
    out: dict[str, torch.Tensor] = {}
    for src, dst in ((plan.key_to_encoder, to_encoder), (plan.key_to_stem, to_stem)):
        picked = {k: rest for k in state if (rest := _under(k, src)) is not None}
        if not picked:
            starts = sorted({k.split(".", 1)[0] for k in state})[:6]
            raise DataError(f"{_where(weights.path)}: {src!r} (key_to_"
                            f"{'encoder' if src == plan.key_to_encoder else 'stem'}) names no tensor of "
                            f"network_weights (its keys start with {starts})")
        # a stem inside the encoder (PlainConvUNet) is picked twice under the same target name
        out.update({dst + rest: state[k] for k, rest in picked.items()})
    proj = plan.keys_to_in_proj[0] + ".weight"
    if proj not in state:
        raise DataError(f"{_where(weights.path)}: keys_to_in_proj[0] {plan.keys_to_in_proj[0]!r} has no weight "
                        f"{proj!r} in network_weights")
    if state[proj].ndim < 3 or state[proj].shape[1] != plan.pretrain_num_input_channels:
        raise DataError(f"{_where(weights.path)}: the input projection {proj} has shape {tuple(state[proj].shape)}, "
                        f"which does not take pretrain_num_input_channels = {plan.pretrain_num_input_channels}")
    return out


__all__ = ["CONV_CLASSES", "RESENC_L_KWARGS", "PRESETS", "PRIMUS", "PRIMUS_CLASS", "PRIMUS_PRESETS",
           "PRIMUS_PRESET_COMMON", "NnsslPlan", "read_plan", "plan_of", "in_encoder", "encoder_tensors"]
