"""The one place that reads checkpoints and compares them with a network.

Every command and trainer of this package reads a ``.pth`` file through :func:`read_checkpoint`, which
unpickles nothing but what nnU-Net checkpoints legitimately hold (:func:`checkpoint_globals`): tensors,
numbers, strings, containers, ``torch.device`` and the numpy scalars nnU-Net logs. A file that asks for
any other global — a pickle can call any importable function, e.g. ``os.system`` — is refused before
anything of it runs, in one line naming the global and the opt-in (:data:`TRUST_FLAG` on the commands,
:data:`TRUST_ENV` for ``nnUNetv2_train`` and studies), which reads the file as nnU-Net does
(``weights_only=False``).

Weights are read through :func:`load_weights` (an nnU-Net checkpoint, a snapshot, an nnssl checkpoint — its
``nnssl_adaptation_plan`` kept as stored, for :mod:`nnunet_transfer.plans.nnssl` — a dict holding a state
dict or a plain state dict; a pickled module only when trusted; wrapper prefixes ``module.`` /
``_orig_mod.`` stripped, tensors on the CPU) and compared with a network through :func:`compare`, which
applies the rules of nnU-Net's ``load_pretrained_weights``:

* every key of the *network's* ``state_dict()`` that does not contain ``.seg_layers.``
  (:data:`SEG_KEY`, nnU-Net's ``skip_strings_in_pretrained``) must exist in the file with an equal
  shape — nnU-Net asserts on the first failure and prints both tensors; :func:`compare` reports every
  mismatch at once, by name and shape only;
* keys only the file has are ignored; the segmentation heads are never loaded.

dynamic-network-architectures registers each tensor under several names (``decoder.encoder.*`` is the
encoder, ``…all_modules.0`` is ``…conv``); mismatches are grouped by tensor, canonical name first.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.netutil import strip_prefixes, unwrap
# nnU-Net's skip rule lives (and is guarded against nnU-Net's loader) in nnunet_compat
from nnunet_transfer.nnunet_compat import SEG_KEY, is_seg_key
#: where a dict may hold its state dict
CONTAINER_KEYS = ("network_weights", "state_dict", "model")
#: where a file written by ``weights adapt`` keeps its report (what came from the source, per block)
ADAPTED_KEY = "nnunet_transfer_adapted"
#: where an nnssl (self-supervised pretraining, github.com/MIC-DKFZ/nnssl) checkpoint keeps its adaptation plan:
#: ``AdaptationPlan.serialize()``, plain JSON types (read by :mod:`nnunet_transfer.plans.nnssl`)
NNSSL_KEY = "nnssl_adaptation_plan"


# --------------------------------------------------------------------------- reading files safely
#: the environment variable that opts in to unrestricted loading, for nnUNetv2_train and studies ("1"/"0")
TRUST_ENV = "nnUNet_transfer_trust_checkpoints"
#: the same opt-in on the commands that read checkpoints
TRUST_FLAG = "--trust-checkpoint"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("nnunet_transfer_trust_checkpoints", default=False)
# torch.serialization.safe_globals adds to and removes from one process-wide set: concurrent loads in
# threads would remove each other's entries mid-load
_SAFE_LOAD = threading.Lock()
#: numpy's scalar dtypes: nnU-Net logs np.float32/np.float64 (losses, Dice, ``_best_ema``)
_NUMPY_DTYPES = ("BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType",
                 "Int64DType", "UInt64DType", "LongLongDType", "ULongLongDType", "Float16DType", "Float32DType",
                 "Float64DType", "LongDoubleDType", "Complex64DType", "Complex128DType")


class UnsafeCheckpointError(DataError):
    """A checkpoint asks for a global outside :func:`checkpoint_globals`; nothing of it was run."""


def _refusal(path: Path, what: str, wanted: str) -> str:
    return (f"refused to load {what} {path}: it asks for {wanted}, which nnU-Net checkpoints do not hold (they hold "
            f"tensors, numbers, strings, containers and numpy scalars), and unpickling it could run code; if you "
            f"trust this file (you or your lab wrote it with a trusted nnU-Net / nnunet_transfer), pass {TRUST_FLAG} "
            f"or set {TRUST_ENV}=1")


@contextlib.contextmanager
def trusting_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within the block, :func:`read_checkpoint` loads unrestricted (``weights_only=False``) if ``trust``."""
    token = _trusted.set(bool(trust))
    try:
        yield
    finally:
        _trusted.reset(token)


def checkpoints_trusted() -> bool:
    """Whether the opt-in is on: :func:`trusting_checkpoints` or ``nnUNet_transfer_trust_checkpoints=1``."""
    if _trusted.get():
        return True
    value = os.environ.get(TRUST_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        raise ConfigError(f"{TRUST_ENV}={os.environ[TRUST_ENV]!r} must be 1 (load checkpoints unrestricted: only "
                          f"files you trust) or 0; unset it to load safely")
    return False


def checkpoint_globals() -> list:
    """What :func:`read_checkpoint` allows beyond torch's own tensors and containers: numpy's ``scalar`` (under
    its numpy 1 and numpy 2 module names), ``numpy.dtype`` and the numeric dtype classes."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allowed: list = [np.dtype]
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.6":
        # (global, name) pairs (torch >= 2.6): a file written under the other numpy major names the other module
        allowed += [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    else:
        allowed.append(scalar)
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, n) for n in _NUMPY_DTYPES if hasattr(dtypes, n)]
    return allowed


#: what torch's weights-only unpickler says when a file asks for something it does not allow
_REFUSED = (re.compile(r"GLOBAL (\S+) was not an allowed global"),
            re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
            re.compile(r"but got <class '([^']+)'>"),
            re.compile(r"unrecognized function (<[^>]+>|\S+)"),
            re.compile(r"classes allowlisted via `add_safe_globals` but got (<[^>]+>|\S+)"))


def _refused_global(message: str) -> str | None:
    for pattern in _REFUSED:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def read_checkpoint(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False, what: str = "checkpoint",
                    trust: bool | None = None) -> Any:
    """``torch.load`` of a checkpoint, snapshot or adapter file that runs none of the file's code.

    Loads with ``weights_only=True`` and :func:`checkpoint_globals` allowed. A file that asks for another
    global raises :class:`UnsafeCheckpointError` naming it; a file torch cannot read raises
    :class:`DataError`. ``trust`` (default: :func:`checkpoints_trusted`) loads as nnU-Net does, with
    ``weights_only=False``: only for files you trust.
    """
    path = Path(path)
    trusted = checkpoints_trusted() if trust is None else trust
    if not trusted and not hasattr(torch.serialization, "safe_globals"):
        raise ConfigError(f"reading {path} without running its code needs torch >= 2.5 (this is torch "
                          f"{torch.__version__}); upgrade torch, or if you trust the file pass {TRUST_FLAG} or set "
                          f"{TRUST_ENV}=1")
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with _SAFE_LOAD, torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable checkpoint"
        wanted = _refused_global(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted is not None:
            raise UnsafeCheckpointError(_refusal(path, what, wanted)) from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's weights-only message starts with paragraphs about the default; the cause is after them
        cause = next((ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                               "Check the documentation"))), lines[0] if lines else "")
        cause = cause.replace("WeightsUnpickler error: ", "")[:200]
        raise DataError(f"cannot read {what} {path}: it is not a {what} torch.load can read "
                        f"({type(e).__name__}: {cause}); is the file complete (not truncated by an interrupted "
                        f"copy)?") from None


# --------------------------------------------------------------------------- reading weights
@dataclass
class LoadedWeights:
    """A checkpoint's network weights, prefixes stripped and on the CPU, and how they were stored."""

    path: Path
    state: dict[str, torch.Tensor]
    container: str | None  # "network_weights" (nnU-Net), "state_dict", "model", or None (plain dict)
    prefixed: list[str] = field(default_factory=list)  # stored keys that carried module./_orig_mod.
    devices: list[str] = field(default_factory=list)  # storage locations at save time, e.g. "cuda:0"
    meta: dict[str, Any] = field(default_factory=dict)  # trainer_name, configuration of nnU-Net files
    #: nnU-Net's ``init_args`` (plans, configuration, fold, dataset_json), when the file has them
    init_args: dict[str, Any] = field(default_factory=dict)
    #: the report ``weights adapt`` stored in the file (:data:`ADAPTED_KEY`), if any
    adapted: dict[str, Any] | None = None
    #: an nnssl checkpoint's adaptation plan (:data:`NNSSL_KEY`) as stored, if any: its ``state`` is then the
    #: whole *pretraining* network, of which only the encoder and stem are meant for a target
    nnssl_plan: Any = None

    @property
    def nnunet_format(self) -> bool:
        return self.container == "network_weights"

    @property
    def is_nnssl(self) -> bool:
        return self.nnssl_plan is not None

    @property
    def dataset_json(self) -> dict | None:
        dj = self.init_args.get("dataset_json")
        return dj if isinstance(dj, Mapping) else None


def load_weights(path: str | Path, *, trust: bool | None = None) -> LoadedWeights:
    """Read an nnU-Net checkpoint, a dict holding a state dict, a plain state dict or (trusted) a pickled module.

    Reads through :func:`read_checkpoint` (nothing of the file runs unless ``trust``). Raises
    :class:`DataError` (one line, never tensor values) for a missing file, a directory, a file
    ``torch.load`` cannot read (corrupt, truncated), one that asks for a global a checkpoint does not hold
    (:class:`UnsafeCheckpointError`) or one that holds no weights.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"checkpoint {path} is a folder; give a checkpoint file (.pth), e.g. "
                        f"{path}/checkpoint_final.pth")
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found")
    devices: set[str] = set()

    def on_cpu(storage, location):  # records where each tensor lived when it was saved
        devices.add(str(location))
        return storage

    obj = read_checkpoint(path, map_location=on_cpu, trust=trust)
    container, meta, init_args, adapted, nnssl_plan = None, {}, {}, None, None
    if isinstance(obj, nn.Module):
        container, state = "model", obj.state_dict()
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in CONTAINER_KEYS):
        container = next(k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping))
        state = obj[container]
        if isinstance(obj.get("init_args"), Mapping):
            init_args = dict(obj["init_args"])
        meta = {"trainer_name": obj.get("trainer_name"), "configuration": init_args.get("configuration")}
        meta = {k: v for k, v in meta.items() if v is not None}
        adapted = dict(obj[ADAPTED_KEY]) if isinstance(obj.get(ADAPTED_KEY), Mapping) else None
        nnssl_plan = obj.get(NNSSL_KEY)  # validated where it is used (plans.nnssl), not here
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise DataError(f"{path} holds {what}; expected an nnU-Net checkpoint or a state dict of tensors, "
                        f"and it is neither an nnU-Net checkpoint ({{'network_weights': ...}}) nor a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DataError(f"{path}: the {container or 'state'} dict holds no tensors")
    clean: dict[str, torch.Tensor] = {}
    prefixed = []
    for k, v in tensors.items():
        name = strip_prefixes(k)
        if name != k:
            prefixed.append(k)
        if name in clean:
            raise DataError(f"{path}: keys {k!r} and another one both become {name!r} once the "
                            f"'module.'/'_orig_mod.' prefixes are stripped")
        clean[name] = v.detach().cpu()
    return LoadedWeights(path, clean, container, prefixed, sorted(devices), meta, init_args, adapted, nnssl_plan)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the network weights of :func:`load_weights` (CPU tensors, wrapper prefixes removed)."""
    return load_weights(path).state


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from every key and move tensors to the CPU (for writing snapshots)."""
    return {strip_prefixes(k): v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------- names
def canonical_key(key: str) -> str:
    """One name per tensor: ``decoder.encoder.X`` -> ``encoder.X``, ``.all_modules.0.`` -> ``.conv.``.

    In dynamic-network-architectures ``decoder.encoder`` *is* the encoder and a conv block's
    ``all_modules`` Sequential starts with its ``conv``.
    """
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    return key.replace(".all_modules.0.", ".conv.")


def storage_key(t: torch.Tensor) -> tuple:
    """Identifies the memory a tensor views: aliases (same storage, offset, shape, strides) share it."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Keys grouped by the tensor they name, in first-seen order (``state_dict()`` aliases share memory)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in state.items():
        groups.setdefault(storage_key(v), []).append(k)
    return list(groups.values())


# --------------------------------------------------------------------------- comparing
@dataclass
class Mismatch:
    """One difference between a checkpoint and a network (all aliases of one tensor together)."""

    kind: str  # "missing" (network needs it), "shape", "unexpected" (only in the checkpoint)
    keys: list[str]  # every alias concerned, canonical first
    checkpoint_shape: list[int] | None
    network_shape: list[int] | None
    blocking: bool  # stops nnU-Net's -pretrained_weights
    reason: str

    @property
    def name(self) -> str:
        return self.keys[0]

    def line(self) -> str:
        alias = f" (+{len(self.keys) - 1} alias{'es' if len(self.keys) > 2 else ''})" if len(self.keys) > 1 else ""
        ck = "absent" if self.checkpoint_shape is None else tuple(self.checkpoint_shape)
        nw = "absent" if self.network_shape is None else tuple(self.network_shape)
        return f"{self.kind:<10} {self.name}{alias}: checkpoint {ck}, network {nw} — {self.reason}"


@dataclass
class Comparison:
    """Every difference between a checkpoint's state and a network's, under nnU-Net's loading rules."""

    mismatches: list[Mismatch]
    network_keys: int
    loaded_keys: int  # network keys -pretrained_weights copies (when it succeeds)

    def __bool__(self) -> bool:
        return bool(self.mismatches)

    @property
    def blocking(self) -> list[Mismatch]:
        return [m for m in self.mismatches if m.blocking]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(k for m in self.mismatches if m.kind == "missing" for k in m.keys)

    @property
    def unexpected(self) -> tuple[str, ...]:
        return tuple(k for m in self.mismatches if m.kind == "unexpected" for k in m.keys)

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]:
        """``(key, checkpoint shape, network shape)`` of every shape mismatch."""
        return tuple((k, tuple(m.checkpoint_shape), tuple(m.network_shape)) for m in self.mismatches
                     if m.kind == "shape" for k in m.keys)

    @property
    def only_seg(self) -> bool:
        """True when every difference concerns the segmentation heads (another label set)."""
        keys = [k for m in self.mismatches for k in m.keys]
        return bool(keys) and all(is_seg_key(k) for k in keys)

    def text(self) -> str:
        """One line: ``"3 shape mismatch(es) (e.g. encoder.x: checkpoint (8, 1, 3, 3, 3) vs network (4, …))"``."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} key(s) missing (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) (e.g. {self.unexpected[0]})")
        if self.shapes:
            k, a, b = self.shapes[0]
            parts.append(f"{len(self.shapes)} shape mismatch(es) (e.g. {k}: checkpoint {a} vs network {b})")
        return ", ".join(parts) if parts else "no differences"


def _state_of(network_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(network_or_state, nn.Module):
        return unwrap(network_or_state).state_dict()
    return dict(network_or_state)


def compare(state: Mapping[str, torch.Tensor], network: nn.Module | Mapping[str, torch.Tensor]) -> Comparison:
    """Apply nnU-Net's ``load_pretrained_weights`` rules to every key of ``network``; report all differences.

    ``state`` is a checkpoint's (prefix-stripped) state dict, ``network`` the target network or its
    state dict. Keys containing :data:`SEG_KEY` may differ without blocking (nnU-Net skips them). The
    blocking keys are :func:`nnunet_transfer.nnunet_compat.pretrained_refusals`, whose guard runs nnU-Net's
    loader (``tests/test_nnunet_compat.py`` checks that the two agree).
    """
    model = _state_of(network)
    mismatches: list[Mismatch] = []
    loaded = 0
    why_ok = "segmentation heads are never loaded (nnU-Net skips '.seg_layers.')"
    for keys in alias_groups(model):  # state_dict order: the canonical name comes first
        net_shape = list(model[keys[0]].shape)
        for blocking in (True, False):
            mine = [k for k in keys if (not is_seg_key(k)) == blocking]
            missing = [k for k in mine if k not in state]
            wrong = [k for k in mine if k in state and list(state[k].shape) != net_shape]
            if blocking:
                loaded += len(mine) - len(missing) - len(wrong)
            if missing:
                mismatches.append(Mismatch("missing", missing, None, net_shape, blocking,
                                           "the network needs it" if blocking else why_ok))
            by_shape: dict[tuple, list[str]] = {}
            for k in wrong:
                by_shape.setdefault(tuple(state[k].shape), []).append(k)
            for shape, ks in by_shape.items():
                mismatches.append(Mismatch("shape", ks, list(shape), net_shape, blocking,
                                           "shapes must be equal" if blocking else why_ok))
    extra: dict[str, list[str]] = {}
    for k in state:
        if k not in model:
            extra.setdefault(canonical_key(k), []).append(k)
    for ks in extra.values():
        mismatches.append(Mismatch("unexpected", ks, list(state[ks[0]].shape), None, False,
                                   "only in the checkpoint; ignored"))
    return Comparison(mismatches, len(model), loaded)


def file_problems(weights: LoadedWeights) -> list[str]:
    """Reasons nnU-Net's loader cannot read the file at all (format, prefixes, CUDA tensors without CUDA)."""
    problems = []
    if not weights.nnunet_format:
        problems.append(f"nnU-Net reads checkpoint['network_weights']; this file is "
                        f"{'a ' + repr(weights.container) + ' dict' if weights.container else 'a plain state dict'}")
    if weights.prefixed:
        problems.append(f"{len(weights.prefixed)} keys carry 'module.'/'_orig_mod.' prefixes (e.g. "
                        f"{weights.prefixed[0]!r}), which nnU-Net does not strip")
    cuda = [d for d in weights.devices if d.startswith("cuda")]
    if cuda and not torch.cuda.is_available():
        problems.append(f"tensors were saved on {cuda[0]} and nnU-Net loads without map_location; this "
                        f"machine has no CUDA device")
    return problems


def load_into(network: nn.Module, state: Mapping[str, torch.Tensor], *, keys: Iterable[str] | None = None) -> None:
    """Copy ``state`` into ``network`` (only ``keys`` if given), strictly by name and shape."""
    model = unwrap(network)
    own = model.state_dict()
    wanted = list(state) if keys is None else list(keys)
    bad = [k for k in wanted if k not in own or own[k].shape != state[k].shape]
    if bad:
        raise DataError(f"{len(bad)} tensors do not fit the network: {bad[:5]}")
    model.load_state_dict({**own, **{k: state[k] for k in wanted}}, strict=True)


def comparison_to_dict(c: Comparison) -> dict:
    return {"mismatches": [asdict(m) for m in c.mismatches], "network_keys": c.network_keys,
            "loaded_keys": c.loaded_keys}


__all__ = ["TRUST_ENV", "TRUST_FLAG", "UnsafeCheckpointError", "trusting_checkpoints", "checkpoints_trusted",
           "checkpoint_globals", "read_checkpoint",
           "SEG_KEY", "CONTAINER_KEYS", "ADAPTED_KEY", "NNSSL_KEY", "LoadedWeights", "load_weights", "load_state", "clean_state_dict",
           "canonical_key", "storage_key", "alias_groups", "Mismatch", "Comparison", "compare", "file_problems",
           "load_into", "is_seg_key"]
