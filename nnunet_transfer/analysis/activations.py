"""Activation sampling: the same patches and the same voxels for every network, streamed into moments.

Protocol (Karimi et al. 2021, after Morcos et al. 2018): every channel of a layer is a neuron, every
sampled voxel a sample. For each patch

1. :class:`PatchSource` cuts a patch of the configuration's patch size out of one case of nnU-Net's
   *preprocessed* data (``$nnUNet_preprocessed/<Dataset>/<data_identifier>``, read with nnU-Net's
   own dataset class). Patch ``i`` depends only on ``(seed, i)``: the case, whether it is centred on
   a foreground voxel (probability ``foreground``, nnU-Net's ``class_locations``, as its data loader
   does; default 0: uniform locations, as Karimi et al.) and the position; positions follow nnU-Net's
   bounding-box rule, padding with 0 where the case is smaller than the patch. Which cases:
   :mod:`.cases` (the held-out test cases by default, when they are known).
2. Every network sees the same patch batch. A forward hook on each selected layer's output module
   (``(B, C, *spatial)``) keeps the voxels :func:`voxel_indices` picks — ``voxels_per_patch`` of the
   layer's grid, depending only on ``(seed, patch index, spatial shape)``, so the same for every
   network — as ``(B · k, C)`` rows.
3. Rows of ``chunk_patches`` patches form a chunk; each layer pair's :class:`PairMoments` absorbs
   the chunk and it is dropped. Memory is one chunk plus O(c²) per pair: independent of the number
   of patches. Hooks are removed in ``finally`` — also when a forward pass fails.

Default layers (:func:`default_layer_blocks`): for a U-Net with N stages, blocks ``1``, ``⌈N/2⌉``,
``N−1`` of the encoder (full resolution, the middle level, the deepest level above the bottleneck)
and their decoder mirrors ``2N−k`` at the same resolution — the three encoder and three decoder
levels Karimi et al. show, generalised to any depth (for N = 3 the middle and the deepest coincide:
blocks 1, 2, 4, 5).

Default sample count: ``voxels_per_patch = 512`` and, unless given, the smallest number of patches
(at least 16) that gives every selected layer ``≥ 100 × c`` samples (``c`` its channel count; deep
layers have few voxels per patch, so they decide).
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_transfer.analysis.moments import PairMoments
from nnunet_transfer.analysis.similarity import (DEFAULT_SIDE, MIN_SAMPLES_PER_CHANNEL, SimilarityResult,
                                                 SimilarityWarning)
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.errors import ConfigError, DataError, SpecError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.nnunet_io import env_folder

DEFAULT_VOXELS_PER_PATCH = 512
#: With the automatic patch count, never fewer patches than this (samples spread over cases).
MIN_PATCHES = 16
#: Patches per streamed chunk: the null baseline misaligns rows inside a chunk, so a chunk of several
#: patches pairs voxels of different patches.
CHUNK_PATCHES = 8
#: Share of patches centred on a foreground voxel: 0, uniform locations — Karimi et al. sample "blocks from
#: random locations in the test images"; nnU-Net's sampler (its oversample_foreground_percent) uses 0.33.
DEFAULT_FOREGROUND = 0.0
NNUNET_FOREGROUND = 0.33


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text not in ("cpu", "cuda") and not text.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {text} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(text)


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """A hooked layer: a block's output (or the final segmentation head)."""

    name: str  # "block3" | "seg"
    block: int | None
    group: str  # encoder | bottleneck | decoder | seg
    level: int  # resolution level, 0 = full resolution
    module: str  # name of the module whose output is hooked

    def to_dict(self) -> dict:
        return {"layer": self.name, "block": self.block, "group": self.group, "level": self.level,
                "module": self.module}


def default_layer_blocks(n_stages: int) -> list[int]:
    """Encoder blocks ``1, ⌈N/2⌉, N−1`` and their decoder mirrors ``2N−k`` (sorted, unique)."""
    n = int(n_stages)
    enc = sorted({1, max(1, math.ceil(n / 2)), max(1, n - 1)})
    return sorted(set(enc) | {2 * n - k for k in enc})


def default_layer_spec(n_stages: int) -> str:
    return "blocks:" + ",".join(map(str, default_layer_blocks(n_stages)))


def select_layers(model: BlockModel, spec: str | None = None) -> list[Layer]:
    """The layers a block spec selects (``None``: :func:`default_layer_spec`), in path order.

    ``seg`` hooks the full-resolution head (the only one that runs without deep supervision).
    """
    spec = default_layer_spec(model.n_stages) if spec is None else spec
    sel = model.select(spec)
    layers = []
    for k, module in model.output_modules(sel).items():
        b = model.block(k)
        layers.append(Layer(f"block{k}", k, b.group, b.resolution_level, module))
    if sel.seg:
        layers.append(Layer("seg", None, "seg", 0, model.seg_module_names[-1]))
    if not layers:
        raise SpecError(f"layer spec {spec!r} selects no layer")
    return layers


# --------------------------------------------------------------------------------------------------
# data: patches of nnU-Net's preprocessed cases
# --------------------------------------------------------------------------------------------------

def preprocessed_folder(dataset_name: str, data_identifier: str, configuration: str | None = None) -> Path:
    """``$nnUNet_preprocessed/<Dataset>/<data_identifier>``, checked to hold cases."""
    folder = env_folder("nnUNet_preprocessed") / dataset_name / data_identifier
    fix = (f"run nnUNetv2_preprocess -d {dataset_name} -c {configuration or '<configuration>'} "
           f"(data identifier {data_identifier!r})")
    if not folder.is_dir():
        raise DataError(f"preprocessed folder {folder} does not exist; {fix}")
    if not any(p.suffix in (".b2nd", ".npz") and not p.name.endswith("_seg.b2nd") for p in folder.iterdir()):
        raise DataError(f"preprocessed folder {folder} holds no cases (*.b2nd or *.npz); {fix}")
    return folder


def _unpack(folder: Path) -> None:
    """``case.npz`` -> ``case.npy`` + ``case_seg.npy`` where missing, as nnU-Net's training does.

    In-process: nnU-Net's ``unpack_dataset`` always starts a spawn pool (seconds per call), for
    work that is nothing once the folder is unpacked.
    """
    todo = [p for p in sorted(folder.glob("*.npz")) if not p.with_suffix(".npy").is_file()
            or not p.with_name(p.stem + "_seg.npy").is_file()]
    if todo:
        from nnunetv2.training.dataloading.utils import _convert_to_npy

        for p in todo:
            _convert_to_npy(str(p), True, False, True)


@dataclass(frozen=True)
class PatchLocation:
    index: int
    case: str
    bbox: tuple[tuple[int, int], ...]  # half-open [lo, hi) per spatial axis of the case
    foreground: bool

    def to_dict(self) -> dict:
        return {"patch": self.index, "case": self.case, "bbox": [list(b) for b in self.bbox],
                "foreground": self.foreground}


class PatchSource:
    """Deterministic patches from a folder of nnU-Net preprocessed cases.

    Args:
        folder: ``$nnUNet_preprocessed/<Dataset>/<data_identifier>``.
        patch_size: the configuration's patch size (2 or 3 axes; a 2-D patch takes one slice).
        seed: patch ``i`` depends only on ``(seed, i)``, so 10 patches are a prefix of 100.
        foreground: probability that a patch is centred on a random foreground voxel.
        cases: case identifiers to draw from (default: every case in the folder).

    Compressed ``.npz`` cases are unpacked to ``.npy`` first, as nnU-Net's training does.
    """

    def __init__(self, folder: str | Path, patch_size: Sequence[int], *, seed: int = 0,
                 foreground: float = DEFAULT_FOREGROUND, cases: Sequence[str] | None = None) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        self.folder = Path(folder)
        if not 0.0 <= foreground <= 1.0:
            raise ConfigError(f"--foreground must be a probability in [0, 1], got {foreground!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed = int(seed)
        self.foreground = float(foreground)
        try:
            cls = infer_dataset_class(str(self.folder))
        except (AssertionError, KeyError) as e:
            raise DataError(f"cannot tell the case format of {self.folder} ({e}); it should hold nnU-Net "
                            f"preprocessed cases of one kind (*.b2nd or *.npz)") from None
        _unpack(self.folder)
        self.dataset = cls(str(self.folder))
        ids = list(self.dataset.identifiers)
        if cases:
            unknown = sorted(set(cases) - set(ids))
            if unknown:
                raise DataError(f"case(s) {unknown} not in {self.folder}; available: {ids[:10]}"
                                f"{' …' if len(ids) > 10 else ''}")
            ids = [c for c in ids if c in set(cases)]
        if not ids:
            raise DataError(f"no cases in {self.folder}")
        self.cases = ids
        data = self.dataset.load_case(ids[0])[0]
        self.n_channels = int(data.shape[0])
        if len(self.patch_size) not in (2, 3) or data.ndim != 4:
            raise DataError(f"expected 3-D cases (channels, z, y, x) and a 2-D or 3-D patch, got case shape "
                            f"{tuple(data.shape)} and patch {self.patch_size}")

    def _draw(self, index: int):
        rng = np.random.default_rng([self.seed, 0, int(index)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        data, _, _, props = self.dataset.load_case(case)
        return self._locate(index, case, tuple(int(s) for s in data.shape[1:]), props, rng), data

    def location(self, index: int) -> PatchLocation:
        """Where patch ``index`` comes from (case, bounding box, foreground-centred or not)."""
        return self._draw(index)[0]

    def _locate(self, index: int, case: str, shape: tuple[int, ...], props: Mapping, rng) -> PatchLocation:
        voxel = None
        want_fg = bool(rng.random() < self.foreground)
        if want_fg:
            locs = props.get("class_locations") or {}
            eligible = [k for k in locs if len(locs[k]) > 0]
            if eligible:
                pts = locs[eligible[int(rng.integers(len(eligible)))]]
                voxel = [int(v) for v in pts[int(rng.integers(len(pts)))][1:]]  # drop the channel column
        bbox: list[tuple[int, int]] = []
        axes = list(range(3))
        if len(self.patch_size) == 2:  # 2-D configuration: one slice, then a 2-D patch in it
            z = voxel[0] if voxel is not None else int(rng.integers(shape[0]))
            bbox.append((z, z + 1))
            axes = [1, 2]
        for a, p in zip(axes, self.patch_size):
            need = max(0, p - shape[a])
            lo_min = -(need // 2)
            lo_max = shape[a] + need // 2 + need % 2 - p
            if voxel is not None:
                lo = min(max(voxel[a] - p // 2, lo_min), lo_max)
            else:
                lo = int(rng.integers(lo_min, lo_max + 1))
            bbox.append((lo, lo + p))
        return PatchLocation(int(index), case, tuple(bbox), voxel is not None)

    def patch(self, index: int) -> np.ndarray:
        """Patch ``index`` as float32 ``(channels, *patch_size)``."""
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        loc, data = self._draw(index)
        out = np.asarray(crop_and_pad_nd(data, [list(b) for b in loc.bbox], 0), dtype=np.float32)
        return out[:, 0] if len(self.patch_size) == 2 else out

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.patch(i) for i in indices]))


def voxel_indices(spatial_shape: Sequence[int], k: int, *, seed: int, patch_index: int) -> np.ndarray:
    """The sorted flat indices of the ``min(k, V)`` voxels sampled from a layer grid of ``V`` voxels.

    Depends only on ``(seed, patch_index, spatial_shape)``: every network, and every layer with the
    same grid, sees the same voxels of a patch.
    """
    shape = tuple(int(s) for s in spatial_shape)
    v = int(np.prod(shape))
    if k >= v:
        return np.arange(v, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 1, int(patch_index), *shape])
    return np.sort(rng.choice(v, size=int(k), replace=False)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------------

@contextmanager
def hooked(modules: Mapping[object, nn.Module], fn: Callable[[object, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(key, output)`` after each module's forward; every hook is removed on exit, errors included."""
    handles = []
    try:
        for key, module in modules.items():
            def hook(_mod, _inp, out, key=key):
                fn(key, out[0] if isinstance(out, (tuple, list)) else out)
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def layer_modules(network: nn.Module, layers: Sequence[Layer]) -> dict[str, nn.Module]:
    net = unwrap(network)
    return {layer.name: net.get_submodule(layer.module) for layer in layers}


def probe_layers(network: nn.Module, layers: Sequence[Layer], input_shape: Sequence[int]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{layer: (channels, spatial shape)}`` for one input of ``input_shape`` (channels, *patch).

    Runs a copy of the network on the ``meta`` device (shapes only, no arithmetic); falls back to a
    real CPU forward for modules without meta kernels.
    """
    shapes: dict[str, tuple[int, tuple[int, ...]]] = {}

    def record(key, out):
        shapes[key] = (int(out.shape[1]), tuple(int(s) for s in out.shape[2:]))

    for device in ("meta", "cpu"):
        try:
            net = copy.deepcopy(unwrap(network)).to(device).eval()
            with torch.inference_mode(), hooked(layer_modules(net, layers), record):
                net(torch.zeros((1, *map(int, input_shape)), device=device))
            return shapes
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    return shapes


# --------------------------------------------------------------------------------------------------
# how many samples
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingPlan:
    """Patches, voxels per patch and the resulting samples per layer."""

    patches: int
    voxels_per_patch: int
    channels: dict[str, int]
    spatial: dict[str, tuple[int, ...]]
    samples: dict[str, int]
    auto: bool

    def short_layers(self) -> dict[str, tuple[int, int]]:
        """Layers below ``100 × c`` samples: ``{layer: (samples, 100·c)}``."""
        return {k: (n, MIN_SAMPLES_PER_CHANNEL * self.channels[k]) for k, n in self.samples.items()
                if n < MIN_SAMPLES_PER_CHANNEL * self.channels[k]}


def plan_sampling(shapes: Mapping[str, tuple[int, tuple[int, ...]]], *, patches: int | None = None,
                  voxels_per_patch: int = DEFAULT_VOXELS_PER_PATCH) -> SamplingPlan:
    """Choose the patch count (when ``patches`` is None) and check the samples per layer.

    Raises:
        DataError: a layer would get fewer samples than it has channels (every canonical
            correlation would be 1: no information).

    Warns:
        SimilarityWarning: one message for all layers below ``100 × c`` samples.
    """
    if isinstance(voxels_per_patch, bool) or not isinstance(voxels_per_patch, int) or voxels_per_patch < 1:
        raise ConfigError(f"--voxels-per-patch must be a positive integer, got {voxels_per_patch!r}")
    if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
        raise ConfigError(f"--patches must be a positive integer, got {patches!r}")
    channels = {k: c for k, (c, _) in shapes.items()}
    spatial = {k: s for k, (_, s) in shapes.items()}
    per_patch = {k: min(voxels_per_patch, int(np.prod(s))) for k, s in spatial.items()}
    auto = patches is None
    if auto:
        patches = max([MIN_PATCHES] + [math.ceil(MIN_SAMPLES_PER_CHANNEL * channels[k] / per_patch[k])
                                       for k in shapes])
    samples = {k: patches * per_patch[k] for k in shapes}
    plan = SamplingPlan(patches, voxels_per_patch, channels, spatial, samples, auto)
    few = {k: (n, channels[k]) for k, n in samples.items() if n <= channels[k]}
    if few:
        k, (n, c) = next(iter(few.items()))
        need = math.ceil(MIN_SAMPLES_PER_CHANNEL * c / per_patch[k])
        raise DataError(f"too few samples: layer {k} would get {n} samples for {c} channels "
                        f"({patches} patches x {per_patch[k]} voxels); with no more samples than "
                        f"channels every canonical correlation is 1. Use at least "
                        f"{MIN_SAMPLES_PER_CHANNEL}xc = {MIN_SAMPLES_PER_CHANNEL * c} samples, e.g. "
                        f"--patches {need} (or leave --patches out to choose it automatically)")
    short = plan.short_layers()
    if short:
        text = ", ".join(f"{k} {n} < {m}" for k, (n, m) in short.items())
        warnings.warn(f"fewer than {MIN_SAMPLES_PER_CHANNEL}x channels samples ({text}): even unrelated "
                      f"layers score about sqrt(c/n); read each value beside its null baseline or "
                      f"raise --patches / --voxels-per-patch", SimilarityWarning, stacklevel=2)
    return plan


# --------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------

def sampled_activations(networks: Sequence[nn.Module], layers: Sequence[Layer], source: PatchSource,
                        plan: SamplingPlan, *, seed: int = 0, device: torch.device | str = "cpu",
                        batch_size: int = 1, chunk_patches: int = CHUNK_PATCHES, progress: bool = False,
                        desc: str = "patches") -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yield chunks ``{layer: [rows of network 0, rows of network 1, …]}``, rows ``(n_chunk, C)``.

    Row ``r`` is the same voxel of the same patch for every network. The networks must already be
    on ``device`` and in eval mode. Hooks live while the generator runs and are removed when it
    ends, fails or is closed.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    names = [layer.name for layer in layers]
    modules = {(i, name): m for i, net in enumerate(networks)
               for name, m in layer_modules(net, layers).items()}
    buffers: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in modules}
    batch_ids: list[int] = []
    index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def indices(spatial: tuple[int, ...]) -> torch.Tensor:
        if spatial not in index_cache:
            idx = [voxel_indices(spatial, plan.voxels_per_patch, seed=seed, patch_index=p) for p in batch_ids]
            index_cache[spatial] = torch.from_numpy(np.stack(idx)).to(device)
        return index_cache[spatial]

    def keep(key, out: torch.Tensor) -> None:
        b, c = out.shape[:2]
        idx = indices(tuple(int(s) for s in out.shape[2:]))  # (b, k)
        picked = torch.gather(out.reshape(b, c, -1), 2, idx[:, None, :].expand(b, c, idx.shape[1]))
        buffers[key].append(picked.transpose(1, 2).reshape(-1, c).float())

    with hooked(modules, keep), torch.inference_mode(), \
            tqdm(total=plan.patches, desc=desc, unit="patch", disable=not progress, leave=False) as bar:
        in_chunk = 0
        for start in range(0, plan.patches, batch_size):
            batch_ids[:] = range(start, min(plan.patches, start + batch_size))
            index_cache.clear()
            x = source.batch(batch_ids).to(device)
            for net in networks:
                net(x)
            in_chunk += len(batch_ids)
            bar.update(len(batch_ids))
            if in_chunk >= chunk_patches or batch_ids[-1] == plan.patches - 1:
                chunk = {name: [torch.cat(buffers[(i, name)]) for i in range(len(networks))] for name in names}
                for v in buffers.values():
                    v.clear()
                in_chunk = 0
                yield chunk


def accumulate_pairs(networks: Sequence[nn.Module], pairs: Sequence[tuple[int, int]], layers: Sequence[Layer],
                     source: PatchSource, plan: SamplingPlan, *, seed: int = 0,
                     device: torch.device | str = "cpu", batch_size: int = 1,
                     chunk_patches: int = CHUNK_PATCHES, progress: bool = False,
                     desc: str = "patches") -> dict[tuple[str, int, int], PairMoments]:
    """Stream the patches once through all networks; ``{(layer, i, j): PairMoments}`` per pair.

    ``x`` of pair ``(i, j)`` is network ``i``, ``y`` network ``j``. The null baseline's
    misalignment is seeded with ``seed``.
    """
    moments = {(layer.name, i, j): PairMoments(plan.channels[layer.name], plan.channels[layer.name], null_seed=seed)
               for layer in layers for i, j in pairs}
    stream = sampled_activations(networks, layers, source, plan, seed=seed, device=device,
                                 batch_size=batch_size, chunk_patches=chunk_patches, progress=progress, desc=desc)
    with closing(stream):
        for chunk in stream:
            for (name, i, j), acc in moments.items():
                acc.update(chunk[name][i], chunk[name][j])
    return moments


def pair_results(moments: Mapping[tuple[str, int, int], PairMoments], *,
                 side: str = DEFAULT_SIDE) -> dict[tuple[str, int, int], SimilarityResult]:
    """Results of every accumulator; the sample-size warning was given once by :func:`plan_sampling`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimilarityWarning)
        return {key: acc.results(side=side) for key, acc in moments.items()}


def full_activations(network: nn.Module, layers: Sequence[Layer], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whole outputs ``(B, C, *spatial)`` of the layers for one batch, on the CPU (feature-map pictures)."""
    out: dict[str, torch.Tensor] = {}

    def keep(key, t):
        out[key] = t.detach().float().cpu().clone()

    with hooked(layer_modules(network, layers), keep), torch.inference_mode():
        network(x)
    return out
