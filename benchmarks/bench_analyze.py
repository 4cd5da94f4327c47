"""Benchmark: cost of ``nnunet_transfer analyze`` beyond the forward passes, and its memory scaling.

A generated nnU-Net tree (plans from ``tests/data`` with configuration ``bench``: features
16-32-64-128, patch 64³ by default; cases written by nnU-Net's own Blosc2 dataset class, as
``nnUNetv2_preprocess`` 2.8 does) and two random networks saved as checkpoints. Each measurement runs
in a fresh Python process, which reports its wall time and peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``forward``: the same patches (loaded into memory before the clock starts) through both networks,
  ``torch.inference_mode``, batch 1 — the forward passes alone.
- ``analyze P``: ``run_compare`` of the two networks on P patches, the whole analysis: plans, network
  build, shape probe, checkpoint loading, patch reading, hooks, voxel sampling, streaming moments,
  results, JSON/CSV/PNG/markdown. ``stream`` is the part inside ``accumulate_pairs`` (patch reading +
  forward + hooks + moments), timed in the same process.

Printed ratios (targets of issue 5):

- analysis wall time / forward passes alone on ``--patches-time`` patches (target ≤ 1.3×). The two
  kinds of process run alternately ``--repeats`` times and the fastest of each is compared: on a
  shared machine the load of other jobs changes between processes, and the fastest run is the one
  least disturbed;
- peak memory of ``analyze --patches-large`` / ``analyze --patches-small`` (target ≤ 1.1×).

Allocator: every child runs with ``MALLOC_MMAP_THRESHOLD_=1048576``. glibc raises its mmap threshold
whenever a large block is freed, after which the multi-MB activation tensors of each forward pass come
from the heap and fragment it: peak RSS of *identical* runs then varies by ±10 % (measured here:
1215–1361 MB for three 24-patch runs), more than the effect being measured. A fixed threshold returns
every large tensor to the system when freed; the analysis code is the same either way.
``--default-malloc`` measures with glibc's defaults instead.

    python benchmarks/bench_analyze.py [--patches-small 10] [--patches-large 100] [--patches-time 24]
        [--repeats 3] [--features 16,32,64,128] [--patch 64,64,64] [--device cpu|cuda|auto]
        [--default-malloc]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = "Dataset980_Bench"
CONFIG = "bench"


# --------------------------------------------------------------------------------------------------
# the generated tree (parent process)


def build_tree(root: Path, *, features: str, patch: str, cases: int = 4) -> dict[str, str]:
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from nnunet_transfer.nnunet_io import build_network
    from nnunet_transfer.plans.configure import add_configuration

    env = {v: str(root / s) for v, s in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                         ("nnUNet_results", "results"))}
    for p in env.values():
        Path(p).mkdir(parents=True, exist_ok=True)
    pre = Path(env["nnUNet_preprocessed"]) / DATASET
    folder = pre / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    plans = json.loads((ROOT / "tests" / "data" / "nnUNetPlans_3d_32.json").read_text())
    plans = add_configuration(plans, base="3d_fullres", new=CONFIG, features=features, patch=patch)
    plans["dataset_name"] = DATASET
    dataset_json = json.loads((ROOT / "tests" / "data" / "dataset_ct2labels.json").read_text())
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    patch_size = [int(p) for p in patch.split(",")]
    rng = np.random.default_rng(0)
    for i in range(cases):
        shape = tuple(int(1.5 * p) for p in patch_size)
        data = rng.standard_normal((1, *shape)).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int16)
        seg[0, 10:30, 10:30, 10:30] = 1
        props = {"class_locations": {1: np.argwhere(seg == 1), 2: np.zeros((0, 4), dtype=np.int64)}}
        blocks, chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
        bs, cs = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, props, str(folder / f"case_{i:03d}"), chunks=chunks,
                                      blocks=blocks, chunks_seg=cs, blocks_seg=bs)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_network(plans, CONFIG, dataset_json, deep_supervision=False)
        path = root / f"net{seed}.pth"
        torch.save({"network_weights": net.state_dict()}, path)
        nets.append(str(path))
    env["NETS"] = os.pathsep.join(nets)
    return env


# --------------------------------------------------------------------------------------------------
# children


def child_forward(patches: int, device: str) -> dict:
    import torch

    from nnunet_transfer.analysis.karimi import open_analysis
    from nnunet_transfer.analysis.runs import resolve_network

    an = open_analysis(DATASET, CONFIG, device=device, progress=False)
    nets = an.load([resolve_network(p) for p in os.environ["NETS"].split(os.pathsep)])
    batches = [an.source.batch([i]).to(an.device) for i in range(patches)]
    with torch.inference_mode():
        for net in nets:  # warm-up, as the analysis' probe and first batch would be
            net(batches[0])
        if an.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            for net in nets:
                net(x)
        if an.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds}


def child_analyze(patches: int, device: str, out: str) -> dict:
    import warnings

    import nnunet_transfer.analysis.activations as act
    from nnunet_transfer.analysis.karimi import run_compare

    inner = act.accumulate_pairs
    stream = {"seconds": 0.0}

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            stream["seconds"] += time.perf_counter() - t

    import nnunet_transfer.analysis.session as session  # where the studies call it

    session.accumulate_pairs = timed
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_compare(os.environ["NETS"].split(os.pathsep), dataset=DATASET, configuration=CONFIG, out=out,
                          patches=patches, device=device, progress=False)
    seconds = time.perf_counter() - t0
    layers = res["meta"]["layers"]
    return {"seconds": seconds, "stream_seconds": stream["seconds"],
            "samples": {l["layer"]: l["samples"] for l in layers}}


def child_main(argv: list[str]) -> None:
    kind, patches, device = argv[0], int(argv[1]), argv[2]
    t_import = time.perf_counter()
    result = child_forward(patches, device) if kind == "forward" else child_analyze(patches, device, argv[3])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["process_seconds"] = time.perf_counter() - t_import
    print("RESULT " + json.dumps(result))


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def run_child(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env={**os.environ, **env},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches-small", type=int, default=10)
    ap.add_argument("--patches-large", type=int, default=100)
    ap.add_argument("--patches-time", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", default="16,32,64,128")
    ap.add_argument("--patch", default="64,64,64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--default-malloc", action="store_true", help="do not fix glibc's mmap threshold")
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    fwd, ana = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = build_tree(root, features=args.features, patch=args.patch)
        if not args.default_malloc:
            env |= MALLOC_ENV
        for k in range(args.repeats):
            fwd.append(run_child(env, "forward", str(args.patches_time), device))
            ana.append(run_child(env, "analyze", str(args.patches_time), device, str(root / f"out_t{k}")))
        small = run_child(env, "analyze", str(args.patches_small), device, str(root / "out_small"))
        large = run_child(env, "analyze", str(args.patches_large), device, str(root / "out_large"))
    print(f"bench_analyze: compare of 2 networks (PlainConvUNet, features {args.features}, patch {args.patch}), "
          f"default layers, 512 voxels/patch, batch 1, device {device}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{'glibc default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=1048576'}")
    print(f"samples per layer at {args.patches_large} patches: {large['samples']}")
    print()
    print(f"{'run (fresh process each)':<34}{'wall s':>10}{'peak RSS MB':>14}")
    for k, (f, a) in enumerate(zip(fwd, ana)):
        print(f"{f'forward only, {args.patches_time} patches #{k + 1}':<34}{f['seconds']:>10.2f}{f['peak_rss_mb']:>14.0f}")
        print(f"{f'analyze, {args.patches_time} patches #{k + 1}':<34}{a['seconds']:>10.2f}{a['peak_rss_mb']:>14.0f}"
              f"   (streaming {a['stream_seconds']:.2f} s)")
    for name, r in ((f"analyze, {args.patches_small} patches", small), (f"analyze, {args.patches_large} patches", large)):
        print(f"{name:<34}{r['seconds']:>10.2f}{r['peak_rss_mb']:>14.0f}")
    print()
    best_f = min(f["seconds"] for f in fwd)
    best_a = min(a["seconds"] for a in ana)
    best_s = min(a["stream_seconds"] for a in ana)
    ratio_t, ratio_s = best_a / best_f, best_s / best_f
    ratio_m = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"analysis wall / forward passes alone ({args.patches_time} patches, fastest of {args.repeats}): "
          f"{ratio_t:.3f}x (target <= 1.3x) {'OK' if ratio_t <= 1.3 else 'MISSED'}")
    print(f"  streaming part only / forward passes alone: {ratio_s:.3f}x")
    print(f"peak memory {args.patches_large} / {args.patches_small} patches: {ratio_m:.3f}x "
          f"(target <= 1.1x) {'OK' if ratio_m <= 1.1 else 'MISSED'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
