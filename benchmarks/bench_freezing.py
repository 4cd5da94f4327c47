"""Benchmark: train-step time and peak training memory of the freezing trainers vs stock nnU-Net.

One run, the same plans for every trainer: the stock ``nnUNetTrainer`` against
``nnUNetTrainerFrozenEncoder`` and the Amiri presets ``nnUNetTrainerPartialFT_contracting``,
``…_expanding`` and ``…_exceptBottleneck``, on nnU-Net's default ``PlainConvUNet`` plan *and* on its
recommended ResEnc preset (``nnUNetPlannerResEncM`` → plans ``nnUNetResEncUNetMPlans``).

Setup (reused when ``--workdir`` already holds it): a generated CT-like dataset of four ``--size`` mm
cubes at 1 mm spacing, planned and preprocessed by nnU-Net's own programs. The default, 32 mm, plans a
32³ patch and a 4-stage U-Net; ``--size 64`` plans a 64³ patch and 5 stages, but one stock ResEnc step
then takes ~40 s on two CPU cores, too slow for the default run.

Every trainer is built exactly as ``nnUNetv2_train`` builds it (plans dict with
``continue_training=False``, configuration ``3d_fullres``, fold 0, ``dataset.json``, CPU device);
``initialize()`` runs our ``configure_optimizers`` — the freezing code that training runs — then
``on_train_epoch_start()`` (``network.train()``, LR, frozen norms to eval). The batch is synthetic:
the plan's batch size and patch, deep-supervision targets at ``_get_deep_supervision_scales()`` (a
random label map resized with nearest interpolation, as nnU-Net's DownsampleSegForDSTransform does).
Steps are the trainers' own ``train_step``.

**Memory** — one fresh process per trainer and repeat, so that RSS belongs to one trainer:
*idle* = VmRSS after ``initialize()`` with the batch allocated, after ``gc.collect()`` and glibc
``malloc_trim(0)`` (idle must not depend on what initialize() left in the allocator's free lists:
our trainers' float64 weight fingerprint can leave hundreds of MiB there, stock nnU-Net does not).
Then the kernel's peak-RSS mark is reset to idle (``/proc/self/clear_refs`` ← 5: ``ru_maxrss`` alone
never decreases, and initialize() may peak higher than a step), ``--mem-steps`` steps run, and
*peak* = VmHWM (fallbacks, named in the output: ``ru_maxrss`` when it rose above its pre-step value,
else a 5 ms VmRSS sampler). *Memory increment* = peak − idle: activations kept for backward,
gradients, momentum buffers (allocated by the first step, hence two steps), temporaries.
By default (``--allocator live``) these processes run glibc with fixed thresholds
(``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``): every tensor-sized block is mapped
and unmapped, so RSS follows the memory that is live, and identical runs give identical increments.
With glibc's default dynamic thresholds (``--allocator glibc``, what a plain ``nnUNetv2_train`` gets)
freed blocks stay in the heap and RSS carries allocator slack: increments then vary by ~10 % between
identical runs and every ratio moves towards 1; use more ``--mem-repeats`` there.

**Time** — one fresh process per plan and repeat holds *every* trainer; after one untimed warm-up
round, ``--steps`` rounds time one ``train_step`` of each trainer in turn (order rotated every round),
and the ratio variant / stock is formed within a round, seconds apart. On a CPU shared with other
work, load changes within a minute; pairing within a round is what makes the ratios usable.
Reported: medians over all rounds of all repeats (ratios: median of the per-round ratios), of wall
time and of the process's CPU time.

**Threads** — every measurement runs with ``--threads`` torch intra-op threads, default 1. On the
2-core machine this was written on, shared with other jobs (load average 4-5), two threads per
process made a PlainConvUNet step take 4.3 s of wall *and* 4.2 s of CPU time against 0.8 s wall /
0.55 s CPU with one thread — the threads spend their time waiting for each other — and per-round
ratios ranged 0.2-1.3 in one run. One thread gave per-round FrozenEncoder / stock ratios of
0.66-0.85 on PlainConvUNet, around the same median. Use ``--threads 0`` (torch's default) on a
dedicated machine.

**Models** (deterministic, from the first step of each memory process): *conv floor* = convolution
multiply-adds of forward plus the backward each convolution really needs (weight gradient if its
weight trains, input gradient if its input requires grad), relative to stock — the step-time ratio
if every multiply-add cost the same. On a CPU, backward convolutions over large, thin feature maps
cost more per multiply-add than forward ones, so freezing the high-resolution encoder can beat it. *Memory estimate* = bytes autograd
saves for backward (parameters excluded, each storage once) + gradient and momentum of the trainable
parameters — not a strict bound (gradients and saved tensors do not all coexist; tensors that are not
saved but still referenced, such as a frozen encoder's skip list, are not counted), a yardstick.

    python benchmarks/bench_freezing.py                      # defaults: ~10-12 min on 2 busy CPU cores
    python benchmarks/bench_freezing.py --quick              # smoke run: one repeat, one timed round
    python benchmarks/bench_freezing.py --workdir /tmp/bf --repeats 5 --json results.json
    python benchmarks/bench_freezing.py --allocator glibc --mem-repeats 3
    python benchmarks/bench_freezing.py --size 64 --variants nnUNetTrainerFrozenEncoder   # 5 stages
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET_ID = 950
DATASET_NAME = "BenchCT"
CONFIGURATION = "3d_fullres"
ARCHS = {  # label -> plans identifier
    "PlainConvUNet": "nnUNetPlans",
    "ResEncUNet-M": "nnUNetResEncUNetMPlans",
}
DEFAULT_VARIANTS = [
    "nnUNetTrainer",
    "nnUNetTrainerFrozenEncoder",
    "nnUNetTrainerPartialFT_contracting",
    "nnUNetTrainerPartialFT_expanding",
    "nnUNetTrainerPartialFT_exceptBottleneck",
]
STOCK = "nnUNetTrainer"
FROZEN_ENCODER = "nnUNetTrainerFrozenEncoder"
# issue 3, item 6: (step-time ratio, memory-increment ratio) upper bounds for nnUNetTrainerFrozenEncoder
TARGETS = {"ResEncUNet-M": (0.55, 0.5), "PlainConvUNet": (0.8, 0.8)}
RESULT_TAG = "BENCH_FREEZING_RESULT "
SETUP_FILE = "bench_freezing_setup.json"
# glibc settings for the memory processes (--allocator live): no dynamic mmap threshold, trim at once
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ====================================================================== child helpers
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status (Linux only)")


def _vmrss_kib() -> int:
    return _status_kib("VmRSS")


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, and ru_maxrss with it) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _vmrss_kib() + 1024


def _trainer_class(name: str):
    if name == STOCK:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    import nnunet_transfer.trainers as ours

    try:
        return getattr(ours, name)
    except AttributeError:
        raise SystemExit(f"unknown trainer {name!r}; choose from {[STOCK, *ours.__all__]}") from None


def _build_trainer(name: str, spec: dict):
    """Construct and initialize like nnUNetv2_train (no -pretrained_weights); returns (trainer, info)."""
    import torch

    cls = _trainer_class(name)
    plans = json.loads(Path(spec["plans_file"]).read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args adds
    dataset_json = json.loads(Path(spec["dataset_json"]).read_text())
    trainer = cls(plans=plans, configuration=CONFIGURATION, fold=0, dataset_json=dataset_json,
                  device=torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.initialize()
    init_s = time.perf_counter() - t0
    note = ""
    hook = getattr(trainer, "_on_weights_ready", None)
    if hook is not None:
        # what our on_train_start does for a run without -pretrained_weights (FrozenEncoder: re-initialise
        # ResEnc's zeroed residual norms); the values of the weights do not change the cost of a step
        from nnunet_transfer.errors import TransferError

        try:
            hook(False)
        except TransferError as e:
            note = f"_on_weights_ready refused without pretrained weights ({e}); cost does not depend on weights"
    net = trainer.network
    params = list({id(p): p for p in net.parameters()}.values())
    state = trainer.transfer_state.get("parameters") if hasattr(trainer, "transfer_state") else None
    info = {
        "init_s": init_s, "note": note, "network_class": type(net).__name__,
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        "params_in_optimizer": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
        "params_reported": None if state is None else {"trainable": state["trainable"], "total": state["total"]},
        "batch_size": trainer.batch_size,
        "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
    }
    return trainer, info


def _synthetic_batch(trainer, seed: int = 0) -> dict:
    """A batch shaped like nnU-Net's: data (b, c, *patch), target list at the deep-supervision scales."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    b = trainer.batch_size
    data = torch.randn(b, trainer.num_input_channels, *patch, generator=g)
    n_labels = trainer.label_manager.num_segmentation_heads
    seg = torch.randint(0, n_labels, (b, 1, *patch), generator=g).float()
    scales = trainer._get_deep_supervision_scales()
    if scales is None:
        target = seg
    else:
        target = [seg if all(s == 1 for s in sc) else
                  F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc)], mode="nearest")
                  for sc in scales]
    return {"data": data, "target": target}


class _ConvCounter:
    """Forward hooks counting conv multiply-adds and what backward will compute for each conv."""

    def __init__(self, network):
        import torch.nn as nn

        self.fwd = 0
        self.bwd = 0
        self.transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *self.transposed)
        self.handles = [m.register_forward_hook(self._hook) for m in network.modules() if isinstance(m, convs)]

    def _hook(self, module, inputs, output):
        x, w = inputs[0], module.weight
        if isinstance(module, self.transposed):
            macs = x.numel() // x.shape[1] * w.numel()  # input voxels × (c_in · c_out/groups · kernel)
        else:
            macs = output.numel() * (w.numel() // w.shape[0])  # output elements × (c_in/groups · kernel)
        self.fwd += macs
        self.bwd += macs * (int(w.requires_grad) + int(x.requires_grad))

    def remove(self):
        for h in self.handles:
            h.remove()


class _SavedTensors:
    """``saved_tensors_hooks`` adding up the storage autograd keeps for backward (parameters excluded,
    each storage once)."""

    def __init__(self, network):
        self.param_storages = {p.untyped_storage().data_ptr() for p in network.parameters()}
        self.seen: set[int] = set()
        self.nbytes = 0

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.param_storages and st.data_ptr() not in self.seen:
            self.seen.add(st.data_ptr())
            self.nbytes += st.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


# ====================================================================== children
def run_memory_child(spec: dict) -> dict:
    import gc
    import threading

    import torch

    _trainer_class(spec["trainer"])  # imports first: they are not the trainer's memory
    rss_before_build = _vmrss_kib()
    trainer, info = _build_trainer(spec["trainer"], spec)
    batch = _synthetic_batch(trainer)
    trainer.on_train_epoch_start()  # network.train(), LR step, our frozen norms -> eval
    # initialize()'s own peak above the process before the trainer was built (reported, not used)
    init_peak_increment = _maxrss_kib() - rss_before_build
    gc.collect()
    rss_untrimmed = _vmrss_kib()
    trimmed = _malloc_trim()
    idle = _vmrss_kib()
    maxrss_before = _maxrss_kib()
    reset = _reset_peak_rss()

    peak_sampled = [idle]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_sampled[0] = max(peak_sampled[0], _vmrss_kib())
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    net = trainer.network
    counter, saved = _ConvCounter(net), _SavedTensors(net)
    times = []
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        t = time.perf_counter()
        losses = [float(trainer.train_step(batch)["loss"])]
        times.append(time.perf_counter() - t)
    counter.remove()
    for _ in range(spec["mem_steps"] - 1):
        t = time.perf_counter()
        losses.append(float(trainer.train_step(batch)["loss"]))
        times.append(time.perf_counter() - t)
    stop.set()
    sampler.join()
    maxrss_after = _maxrss_kib()
    if reset:
        peak, peak_source = _status_kib("VmHWM"), "VmHWM"
    elif maxrss_after > maxrss_before:
        peak, peak_source = maxrss_after, "ru_maxrss"
    else:
        # no reset and initialize() peaked higher than the steps: only the sampler sees them (lower bound)
        peak, peak_source = max(peak_sampled[0], _vmrss_kib()), "sampled"
    return {
        "kind": "memory", "trainer": spec["trainer"], "arch": spec["arch"], **info,
        "idle_kib": idle, "peak_kib": peak, "increment_kib": peak - idle, "peak_source": peak_source,
        "peak_sampled_kib": peak_sampled[0], "maxrss_before_steps_kib": maxrss_before,
        "init_peak_increment_kib": init_peak_increment, "idle_untrimmed_kib": rss_untrimmed,
        "malloc_trim": trimmed, "peak_reset": reset,
        "conv_macs_fwd": counter.fwd, "conv_macs_bwd": counter.bwd, "saved_for_backward_bytes": saved.nbytes,
        "step_times_s": times, "losses": losses, "threads": torch.get_num_threads(),
    }


def run_time_child(spec: dict) -> dict:
    import torch

    names = spec["trainers"]
    trainers, infos = {}, {}
    for name in names:
        trainers[name], infos[name] = _build_trainer(name, spec)
    shapes = {(i["batch_size"], tuple(i["patch_size"])) for i in infos.values()}
    if len(shapes) != 1:
        raise SystemExit(f"trainers disagree on (batch size, patch) for the same plans: {shapes}")
    batch = _synthetic_batch(next(iter(trainers.values())))
    for tr in trainers.values():
        tr.on_train_epoch_start()
    for name in names:  # warm-up round: first-touch allocations, momentum buffers, oneDNN primitives
        trainers[name].train_step(batch)
    rounds, cpu_rounds = [], []
    for r in range(spec["rounds"]):
        k = (spec["offset"] + r) % len(names)
        times, cpu = {}, {}
        for name in names[k:] + names[:k]:
            c, t = time.process_time(), time.perf_counter()
            trainers[name].train_step(batch)
            times[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        rounds.append(times)
        cpu_rounds.append(cpu)
    return {"kind": "time", "arch": spec["arch"], "rounds": rounds, "cpu_rounds": cpu_rounds, "infos": infos,
            "threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return run_memory_child(spec) if spec["kind"] == "memory" else run_time_child(spec)


# ====================================================================== setup
def setup(workdir: Path, size: float, log_dir: Path) -> dict[str, Path]:
    """Generate, plan and preprocess (what is already there is reused); returns arch label -> plans file."""
    from nnunet_transfer.data import SOURCE, make_dataset
    from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
    from nnunet_transfer.pipeline import run_step

    marker = workdir / SETUP_FILE
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("size") != size:
            raise SystemExit(f"{workdir} holds a setup for --size {done.get('size')}, not {size:g}; use "
                             f"another --workdir or the same --size")
    else:
        marker.write_text(json.dumps({"size": size}))
    env = nnunet_environment(workdir, defaults=SMALL_MACHINE)
    name = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    pre = workdir / "preprocessed" / name

    def step(args: list, log: str) -> None:
        what = " ".join(map(str, args))
        print(f"  {what}: {run_step(args, env=env, log=log_dir / log, what=what):.0f} s", flush=True)

    if not (workdir / "raw" / name / "dataset.json").exists():
        make_dataset(workdir / "raw", DATASET_ID, DATASET_NAME, SOURCE, n_train=4, physical_size=size)
    if not (pre / "nnUNetPlans.json").exists():
        step(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIGURATION, "-np", 1, "-npfp", 1],
             "plan_and_preprocess.log")
    if not (pre / "nnUNetResEncUNetMPlans.json").exists():
        step(["nnUNetv2_plan_experiment", "-d", DATASET_ID, "-pl", "nnUNetPlannerResEncM"], "plan_resenc.log")
    resenc = json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text())
    data = pre / resenc["configurations"][CONFIGURATION]["data_identifier"]
    if not data.is_dir() or not any(data.iterdir()):
        step(["nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", "nnUNetResEncUNetMPlans",
              "-c", CONFIGURATION, "-np", 1], "preprocess_resenc.log")
    return {label: pre / f"{plans}.json" for label, plans in ARCHS.items()}


def describe_plan(plans_file: Path) -> dict:
    conf = json.loads(plans_file.read_text())["configurations"][CONFIGURATION]
    arch = conf["architecture"]
    kw = arch["arch_kwargs"]
    return {"plans": plans_file.stem, "class": arch["network_class_name"].rsplit(".", 1)[-1],
            "n_stages": kw["n_stages"], "features": kw["features_per_stage"],
            "blocks_per_stage": kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage")),
            "patch_size": conf["patch_size"], "batch_size": conf["batch_size"], "spacing": conf["spacing"]}


def machine(threads: int) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": threads, "device": "CPU", "python": platform.python_version()}


# ====================================================================== parent
def run_one(spec: dict, env: dict, log: Path, *, script: str = __file__, tag: str = RESULT_TAG) -> dict:
    """Run ``script --child SPEC`` in a fresh process and return the result it prints after ``tag``."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    for line in proc.stdout.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
    raise SystemExit(f"{spec['kind']} measurement {spec['arch']} / {spec.get('trainer', 'all')} failed "
                     f"(exit {proc.returncode}); log {log}; last lines:\n{tail}")


def sanity_check(name: str, arch: str, info: dict) -> None:
    where = f"{arch} / {name}"
    if info["params_in_optimizer"] != info["params_trainable"]:
        raise SystemExit(f"{where}: the optimizer holds {info['params_in_optimizer']:,} parameters but "
                         f"{info['params_trainable']:,} require grad")
    if name == STOCK:
        if info["params_trainable"] != info["params_total"]:
            raise SystemExit(f"{where}: only {info['params_trainable']:,} of {info['params_total']:,} train")
        return
    rep = info["params_reported"]
    if rep is None or rep["trainable"] != info["params_trainable"] or rep["total"] != info["params_total"]:
        raise SystemExit(f"{where}: transfer_state['parameters'] = {rep} disagrees with requires_grad "
                         f"({info['params_trainable']:,} of {info['params_total']:,})")
    if rep["trainable"] >= rep["total"]:
        raise SystemExit(f"{where}: nothing is frozen (trainable {rep['trainable']:,} of {rep['total']:,}); "
                         f"the freezing code did not run — the benchmark would be void")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def _memory_estimate_bytes(r: dict) -> int:
    # what a step must add to the idle process: tensors saved for backward + a float32 gradient and
    # SGD momentum buffer per trainable parameter
    return r["saved_for_backward_bytes"] + 2 * 4 * r["params_trainable"]  # see "Memory estimate" above


def summarise(mem: list[dict], tim: list[dict], archs: list[str], variants: list[str]) -> dict:
    out = {}
    for arch in archs:
        m_arch = [r for r in mem if r["arch"] == arch]
        rounds = [rd for t in tim if t["arch"] == arch for rd in t["rounds"]]
        by_rep: dict[int, dict] = {}
        for r in m_arch:
            by_rep.setdefault(r["repeat"], {})[r["trainer"]] = r
        stock = next(r for r in m_arch if r["trainer"] == STOCK)
        rows = {}
        for v in variants:
            rs = [r for r in m_arch if r["trainer"] == v]
            mem_ratio = [rep[v]["increment_kib"] / rep[STOCK]["increment_kib"]
                         for rep in by_rep.values() if v in rep and STOCK in rep]
            step_ratio = [rd[v] / rd[STOCK] for rd in rounds]
            cpu_ratio = [rd[v] / rd[STOCK] for t in tim if t["arch"] == arch for rd in t["cpu_rounds"]]
            rows[v] = {
                "step_s": median([rd[v] for rd in rounds]),
                "step_ratio": median(step_ratio), "step_ratio_all": step_ratio,
                "cpu_ratio": median(cpu_ratio), "cpu_ratio_all": cpu_ratio,
                "conv_floor": (rs[0]["conv_macs_fwd"] + rs[0]["conv_macs_bwd"])
                / (stock["conv_macs_fwd"] + stock["conv_macs_bwd"]),
                "idle_mib": median([r["idle_kib"] / 1024 for r in rs]),
                "increment_mib": median([r["increment_kib"] / 1024 for r in rs]),
                "increment_mib_all": [r["increment_kib"] / 1024 for r in rs],
                "mem_ratio": median(mem_ratio), "mem_ratio_all": mem_ratio,
                "estimate_mib": _memory_estimate_bytes(rs[0]) / 2 ** 20,
                "memory_estimate": _memory_estimate_bytes(rs[0]) / _memory_estimate_bytes(stock),
                "trainable_fraction": rs[0]["params_trainable"] / rs[0]["params_total"],
                "params_total": rs[0]["params_total"],
                "peak_sources": sorted({r["peak_source"] for r in rs}),
                "init_peak_increment_mib": median([r["init_peak_increment_kib"] / 1024 for r in rs]),
                "trimmed_mib": median([(r["idle_untrimmed_kib"] - r["idle_kib"]) / 1024 for r in rs]),
            }
        out[arch] = rows
    return out


def short(name: str) -> str:
    return name.replace("nnUNetTrainer", "") or "nnUNetTrainer (stock)"


def report(meta: dict, plans: dict, summary: dict, variants: list[str]) -> list[str]:
    m = meta["machine"]
    lines = [
        "## Freezing benchmark: train step and peak training memory vs stock nnUNetTrainer",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; device **{m['device']}**, torch "
        f"{m['torch']}, {m['torch_threads']} intra-op threads, Python {m['python']}. Load average "
        f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end (other processes shared the CPU).",
        f"Settings: time: {meta['repeats']} repeats of one process per plan holding every trainer, 1 "
        f"warm-up + {meta['steps']} timed rounds of one train_step each, order rotated; memory: "
        f"{meta['mem_repeats']} repeats of a fresh process per trainer, peak over {meta['mem_steps']} "
        f"train_step calls, allocator '{meta['allocator']}'; generated data {meta['size']:g} mm cubes at "
        f"1 mm; total wall {meta['wall_s'] / 60:.1f} min.",
        "",
    ]
    for arch, p in plans.items():
        lines.append(f"- **{arch}**: plans `{p['plans']}`, {p['class']}, {p['n_stages']} stages, features "
                     f"{p['features']}, blocks/convs per stage {p['blocks_per_stage']}, patch {p['patch_size']}, "
                     f"batch {p['batch_size']}, {summary[arch][STOCK]['params_total']:,} parameters")
    lines += ["",
              "| plan | trainer | trainable | step s | step ratio | CPU ratio | conv floor | idle MiB "
              "| increment MiB | increment ratio | est. MiB | est. ratio |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch in plans:
        for v in variants:
            r = summary[arch][v]

            def ratio(x):
                return "1" if v == STOCK else f"{x:.2f}"

            lines.append(f"| {arch} | {short(v)} | {100 * r['trainable_fraction']:.1f}% | {r['step_s']:.2f} | "
                         f"{ratio(r['step_ratio'])} | {ratio(r['cpu_ratio'])} | {ratio(r['conv_floor'])} | "
                         f"{r['idle_mib']:.0f} | "
                         f"{r['increment_mib']:.0f} | {ratio(r['mem_ratio'])} | {r['estimate_mib']:.0f} | "
                         f"{ratio(r['memory_estimate'])} |")
    lines += ["",
              "step ratio: median over rounds of (variant step / stock step in the same round), wall "
              "clock; CPU ratio: the same with the process's CPU time (less sensitive to other load); increment "
              "ratio: median over repeats of the paired ratio; step s, MiB: medians. increment = peak RSS "
              "during the steps − idle RSS (after initialize(), batch allocated, malloc_trim). conv floor: "
              "conv multiply-adds of forward + the backward each conv needs, relative to stock. est. MiB: "
              "tensors saved for backward + gradient and momentum of the trainable parameters (a "
              "yardstick, not a bound); est. ratio: its ratio to stock.", ""]
    for arch, (t_step, t_mem) in TARGETS.items():
        if arch not in summary or FROZEN_ENCODER not in summary[arch]:
            continue
        r = summary[arch][FROZEN_ENCODER]
        for what, val, target, allv in (("step time", r["step_ratio"], t_step, r["step_ratio_all"]),
                                         ("memory increment", r["mem_ratio"], t_mem, r["mem_ratio_all"])):
            verdict = "met" if val <= target else "NOT MET"
            lines.append(f"- target {arch} FrozenEncoder {what} ≤ {target}×: **{verdict}** (median "
                         f"{val:.2f}×; all: {', '.join(f'{x:.2f}' for x in allv)})")
    sources = sorted({s for a in summary.values() for r in a.values() for s in r["peak_sources"]})
    lines.append(f"- peak RSS read from: {', '.join(sources)} (VmHWM = kernel peak mark reset at idle)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh-process repeats of the time measurement (default 3)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed rounds per time process, after one warm-up round (default 5)")
    parser.add_argument("--mem-repeats", type=int,
                        help="fresh-process repeats of every memory measurement (default: 2 with "
                             "--allocator live, where repeats agree to the MiB; 3 with glibc)")
    parser.add_argument("--allocator", choices=["live", "glibc"], default="live",
                        help="glibc settings of the memory processes: 'live' (fixed thresholds, RSS follows "
                             "live memory; default) or 'glibc' (its defaults, RSS includes allocator slack)")
    parser.add_argument("--mem-steps", type=int, default=2,
                        help="train steps per memory process; the first allocates momentum (default 2)")
    parser.add_argument("--size", type=float, default=32.0,
                        help="side of the generated cubes in mm at 1 mm spacing (default 32: 32³ patch, "
                             "4 stages; 64: 64³ patch, 5 stages, ~8× slower)")
    parser.add_argument("--workdir", type=Path, help="keep/reuse dataset, plans and logs here (default: a "
                                                     "temporary folder, removed at the end)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"trainer class names (stock {STOCK} is always included)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in each measurement (default 1, see the module "
                             "docstring; 0: torch's default, for a dedicated machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1 timed round")
    parser.add_argument("--json", type=Path, help="also write every measurement and the summary here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(RESULT_TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    if args.mem_repeats is None:
        args.mem_repeats = 2 if args.allocator == "live" else 3
    if args.quick:
        args.repeats, args.steps, args.mem_repeats = 1, 1, 1
    if min(args.repeats, args.steps, args.mem_steps, args.mem_repeats) < 1:
        parser.error("--repeats, --steps, --mem-repeats and --mem-steps must be at least 1")
    variants = [STOCK] + [v for v in dict.fromkeys(args.variants) if v != STOCK]
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()[0]

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench_freezing_")
    workdir = Path(tmp or args.workdir).resolve()
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment

        print(f"setup in {workdir} ({args.size:g} mm cubes)", flush=True)
        plans_files = setup(workdir, args.size, log_dir)
        plans_files = {a: plans_files[a] for a in args.archs}
        plans = {a: describe_plan(f) for a, f in plans_files.items()}
        for a, p in plans.items():
            print(f"  {a}: {p}", flush=True)
        env = nnunet_environment(workdir, defaults=SMALL_MACHINE)
        mem_env = {**env, **LIVE_ALLOCATOR_ENV} if args.allocator == "live" else env
        dataset_json = next(iter(plans_files.values())).parent / "dataset.json"
        common = {"dataset_json": str(dataset_json), "threads": args.threads}

        mem, tim = [], []
        n_total = len(plans_files) * (args.repeats + args.mem_repeats * len(variants))
        k = 0
        for rep in range(max(args.repeats, args.mem_repeats)):
            for arch, plans_file in plans_files.items():
                base = {**common, "arch": arch, "plans_file": str(plans_file)}
                if rep < args.repeats:
                    k += 1
                    t = time.perf_counter()
                    r = run_one({**base, "kind": "time", "trainers": variants, "rounds": args.steps,
                                 "offset": rep * args.steps}, env, log_dir / f"r{rep}_{arch}_time.log")
                    for name, info in r["infos"].items():
                        sanity_check(name, arch, info)
                    r["repeat"] = rep
                    tim.append(r)
                    steps = ", ".join(f"{short(v)} {median([rd[v] for rd in r['rounds']]):.2f}" for v in variants)
                    print(f"  [{k}/{n_total}] repeat {rep} {arch} time, s/step: {steps}  "
                          f"[{time.perf_counter() - t:.0f} s]", flush=True)
                if rep >= args.mem_repeats:
                    continue
                for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                    k += 1
                    t = time.perf_counter()
                    r = run_one({**base, "kind": "memory", "trainer": v, "mem_steps": args.mem_steps}, mem_env,
                                log_dir / f"r{rep}_{arch}_{v}_memory.log")
                    sanity_check(v, arch, r)
                    r["repeat"] = rep
                    mem.append(r)
                    print(f"  [{k}/{n_total}] repeat {rep} {arch} memory {short(v)}: idle "
                          f"{r['idle_kib'] / 1024:.0f} MiB, +{r['increment_kib'] / 1024:.0f} MiB "
                          f"({r['peak_source']}); initialize() peak +{r['init_peak_increment_kib'] / 1024:.0f} "
                          f"MiB, trimmed {(r['idle_untrimmed_kib'] - r['idle_kib']) / 1024:.0f} MiB; trainable "
                          f"{r['params_trainable']:,}/{r['params_total']:,}  [{time.perf_counter() - t:.0f} s]",
                          flush=True)
                    if r["note"]:
                        print(f"    note: {r['note']}", flush=True)

        summary = summarise(mem, tim, list(plans_files), variants)
        meta = {"machine": machine(tim[0]["threads"]), "repeats": args.repeats, "steps": args.steps,
                "mem_repeats": args.mem_repeats, "mem_steps": args.mem_steps, "allocator": args.allocator,
                "size": args.size, "loadavg_start": round(loadavg_start, 2),
                "loadavg_end": round(os.getloadavg()[0], 2), "wall_s": time.perf_counter() - t_start}
        print()
        print("\n".join(report(meta, plans, summary, variants)))
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "plans": plans, "summary": summary,
                                             "memory": mem, "time": tim}, indent=2))
            print(f"\nwritten: {args.json}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
