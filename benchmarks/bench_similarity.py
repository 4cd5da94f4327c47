"""Benchmark: streaming similarity (PairMoments) against a dense, google/svcca-like implementation.

Both variants see the same float32 activations of two 32-channel layers over 2,000,000 voxels
(x = z Wx + noise, y = tanh(z Wy) + noise, z a 16-dimensional latent), generated in chunks of
65,536 rows by a seeded generator:

- ``streaming``: every chunk goes straight into ``PairMoments.update`` and is dropped; memory is
  O(c²) plus one chunk. ``results()`` gives mean CCA, SVCCA, PWCCA, CKA and their null baselines.
- ``dense``: written here after google/svcca (``cca_core.get_cca_similarity``, ``compute_pwcca``,
  the SVCCA tutorial's SVD step) and Kornblith's feature-space linear CKA: all activations held as
  (channels, samples) float64, each measure its own call, then the same four on ``y`` with its
  samples permuted (the null baseline).
- ``dense-cov`` (reference point, not a target): the activations held in memory as ``dense``,
  but the measures computed from one covariance with this package's ``similarity()`` — it shows
  how much of the gain is memory alone.

Each repeat of each variant runs in its own Python process; the process reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the seconds spent computing similarities
(data generation, the same for every variant, is timed apart). An ``idle`` process (interpreter +
numpy + this package, no data) gives the baseline subtracted in the "net" memory column. Times are
medians over ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/bench_similarity.py [--samples 2000000] [--channels 32]
        [--repeats 3] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnunet_transfer.analysis import PairMoments, similarity  # noqa: E402

MEASURES = ("mean_cca", "svcca", "pwcca", "linear_cka")
EPS = 1e-10


# --------------------------------------------------------------------------------------------------
# Data: the same chunks for every variant


def weights(channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    k = max(channels // 2, 1)
    return (rng.standard_normal((k, channels)).astype(np.float32),
            rng.standard_normal((k, channels)).astype(np.float32))


def chunk(k: int, rows: int, wx: np.ndarray, wy: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``k`` of float32 activations (rows × channels) for both layers."""
    rng = np.random.default_rng([seed, 1, k])
    z = rng.standard_normal((rows, wx.shape[0]), dtype=np.float32)
    x = z @ wx
    x += rng.standard_normal(x.shape, dtype=np.float32)
    y = np.tanh(z @ wy)
    y += 0.5 * rng.standard_normal(y.shape, dtype=np.float32)
    return x, y


def chunk_bounds(samples: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, samples)) for a in range(0, samples, size)]


# --------------------------------------------------------------------------------------------------
# Dense, google/svcca-like (activations as (neurons, datapoints), float64)


def g_cca(acts1: np.ndarray, acts2: np.ndarray):
    """get_cca_similarity's core: np.cov of both, remove small, rescale, pinv, sqrt, SVD."""
    numx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:numx, :numx], cov[:numx, numx:], cov[numx:, numx:]
    xi = np.diag(sxx) > EPS * np.diag(sxx).max()
    yi = np.diag(syy) > EPS * np.diag(syy).max()
    sxx, sxy, syy = sxx[xi][:, xi], sxy[xi][:, yi], syy[yi][:, yi]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)

    def invsqrt(a):
        w, v = np.linalg.eigh(np.linalg.pinv(a))
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, vh = np.linalg.svd(invsqrt(sxx) @ sxy @ invsqrt(syy))
    return u, np.abs(s), vh, xi, yi


def g_mean_cca(acts1, acts2) -> float:
    return float(g_cca(acts1, acts2)[1].mean())


def g_svcca(acts1, acts2, keep: float = 0.99) -> float:
    reduced = []
    for acts in (acts1, acts2):
        cacts = acts - acts.mean(axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(cacts, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = min(int(np.searchsorted(frac, keep)) + 1, s.size)
        reduced.append(s[:k, None] * vt[:k])
        del cacts, vt
    return g_mean_cca(*reduced)


def g_pwcca(acts1, acts2) -> float:
    """compute_pwcca on centred activations, weighted by x (its first branch)."""
    u, s, _, xi, _ = g_cca(acts1, acts2)
    cacts = acts1[xi] - acts1[xi].mean(axis=1, keepdims=True)
    dirns = u.T @ cacts
    p, _ = np.linalg.qr(dirns.T)
    w = np.abs(p.T @ cacts.T).sum(axis=1)[: s.size]
    w /= w.sum()
    return float(w @ s)


def g_cka(acts1, acts2) -> float:
    x = acts1 - acts1.mean(axis=1, keepdims=True)
    y = acts2 - acts2.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(x @ y.T) ** 2 / (np.linalg.norm(x @ x.T) * np.linalg.norm(y @ y.T)))


def dense_measures(acts1, acts2, null_seed: int = 0) -> dict[str, float]:
    out = {"mean_cca": g_mean_cca(acts1, acts2), "svcca": g_svcca(acts1, acts2),
           "pwcca": g_pwcca(acts1, acts2), "linear_cka": g_cka(acts1, acts2)}
    perm = np.random.default_rng([null_seed, acts2.shape[1]]).permutation(acts2.shape[1])
    shuffled = acts2[:, perm]
    out |= {"null_mean_cca": g_mean_cca(acts1, shuffled), "null_svcca": g_svcca(acts1, shuffled),
            "null_pwcca": g_pwcca(acts1, shuffled), "null_linear_cka": g_cka(acts1, shuffled)}
    return out


# --------------------------------------------------------------------------------------------------
# One variant in this process


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def run_variant(variant: str, samples: int, channels: int, chunk_rows: int, seed: int) -> dict:
    wx, wy = weights(channels, seed)
    bounds = chunk_bounds(samples, chunk_rows)
    t_gen = t_comp = 0.0
    values: dict[str, float] = {}
    if variant == "streaming":
        acc = PairMoments(channels, channels)
        for k, (a, b) in enumerate(bounds):
            t0 = time.perf_counter()
            x, y = chunk(k, b - a, wx, wy, seed)
            t1 = time.perf_counter()
            acc.update(x, y)
            t_gen += t1 - t0
            t_comp += time.perf_counter() - t1
        t0 = time.perf_counter()
        r = acc.results()
        t_comp += time.perf_counter() - t0
        values = {k: v for k, v in r.as_dict().items() if k in MEASURES or k.removeprefix("null_") in MEASURES}
    elif variant in ("dense", "dense-cov"):
        t0 = time.perf_counter()
        acts1 = np.empty((channels, samples))  # (neurons, datapoints) float64, as google/svcca holds them
        acts2 = np.empty((channels, samples))
        for k, (a, b) in enumerate(bounds):
            x, y = chunk(k, b - a, wx, wy, seed)
            acts1[:, a:b] = x.T
            acts2[:, a:b] = y.T
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        if variant == "dense":
            values = dense_measures(acts1, acts2)
        else:
            r = similarity(acts1.T, acts2.T)
            values = {k: v for k, v in r.as_dict().items() if k in MEASURES or k.removeprefix("null_") in MEASURES}
        t_comp = time.perf_counter() - t0
    elif variant != "idle":
        raise ValueError(f"unknown variant {variant!r}")
    return {"variant": variant, "compute_s": t_comp, "generate_s": t_gen, "peak_rss_mib": peak_rss_mib(),
            "values": values}


def child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--samples", str(args.samples), "--channels",
           str(args.channels), "--chunk", str(args.chunk), "--seed", str(args.seed)]
    env = os.environ | {k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} child failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}; {os.cpu_count()} CPUs; {platform.system()} {platform.release()}; numpy {np.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=65_536, help="rows per streamed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of every child process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["streaming", "dense", "dense-cov"],
                        choices=["streaming", "dense", "dense-cov"])
    parser.add_argument("--quick", action="store_true", help="200,000 samples, 1 repeat")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.samples, args.channels, args.chunk, args.seed)))
        return
    if args.quick:
        args.samples, args.repeats = 200_000, 1

    gib = 2 * args.samples * args.channels * 8 / 2**30
    print(f"machine: {machine()}")
    print(f"data: 2 layers x {args.channels} channels x {args.samples:,} samples (float32 chunks of "
          f"{args.chunk:,} rows; {gib:.2f} GiB as float64); {args.threads} BLAS thread(s) per process; "
          f"median of {args.repeats} repeat(s), each in a fresh process")
    idle = child("idle", args)["peak_rss_mib"]
    rows = {}
    for variant in args.variants:
        runs = [child(variant, args) for _ in range(args.repeats)]
        rows[variant] = {
            "compute_s": statistics.median(r["compute_s"] for r in runs),
            "generate_s": statistics.median(r["generate_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "values": runs[0]["values"],
        }

    print(f"\n{'variant':<11} {'compute s':>10} {'generate s':>11} {'peak RSS MiB':>13} {'net MiB':>9}   "
          + " ".join(f"{m:>10}" for m in MEASURES) + "   " + " ".join(f"{'null_' + m[:5]:>10}" for m in MEASURES))
    for variant, r in rows.items():
        v = r["values"]
        print(f"{variant:<11} {r['compute_s']:>10.2f} {r['generate_s']:>11.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['peak_rss_mib'] - idle:>9.0f}   " + " ".join(f"{v[m]:>10.6f}" for m in MEASURES) + "   "
              + " ".join(f"{v['null_' + m]:>10.6f}" for m in MEASURES))
    print(f"{'idle':<11} {'':>10} {'':>11} {idle:>13.0f} {0:>9.0f}   (interpreter + numpy + nnunet_transfer.analysis)")

    if "streaming" in rows:
        s = rows["streaming"]
        print()
        for other in ("dense", "dense-cov"):
            if other not in rows:
                continue
            d = rows[other]
            diff = max(abs(s["values"][m] - d["values"][m]) for m in MEASURES)
            net_s, net_d = s["peak_rss_mib"] - idle, d["peak_rss_mib"] - idle
            print(f"{other} / streaming: time x{d['compute_s'] / s['compute_s']:.1f} (compute), "
                  f"x{(d['compute_s'] + d['generate_s']) / (s['compute_s'] + s['generate_s']):.1f} (with generation); "
                  f"memory streaming = 1/{d['peak_rss_mib'] / s['peak_rss_mib']:.0f} of {other} (peak RSS), "
                  f"1/{net_d / max(net_s, 1):.0f} (net of idle); max |difference| of the 4 measures {diff:.1e}")
        if "dense" in rows:
            d = rows["dense"]
            ok_t = d["compute_s"] / s["compute_s"] >= 10
            ok_m = s["peak_rss_mib"] <= d["peak_rss_mib"] / 20
            print(f"targets: streaming >= 10x faster: {'met' if ok_t else 'NOT met'}; "
                  f"<= 1/20 of the memory: {'met' if ok_m else 'NOT met'}")
        print("(null baselines differ between variants by design: streaming misaligns within each chunk, "
              "dense permutes all samples at once)")


if __name__ == "__main__":
    main()
