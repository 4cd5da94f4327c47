"""Benchmark: an L2-SP train step against the nnUNetTrainerFinetune step it extends (target ≤ 1.03×).

Same plans, same synthetic batch, one process per architecture holding every trainer; after a warm-up
round, each round times one ``train_step`` of each trainer in turn (order rotated) and the ratio
L2-SP / Finetune is formed within the round. Reported: medians. The trainers are built exactly as
``nnUNetv2_train`` builds them (harness shared with ``bench_freezing.py``); the L2-SP anchor is captured
from the initial weights (the values do not change the cost of a step).

    python benchmarks/bench_l2sp_step.py                    # PlainConvUNet + ResEnc-M plans, 32 mm data
    python benchmarks/bench_l2sp_step.py --workdir /tmp/bf --rounds 15
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_freezing", Path(__file__).with_name("bench_freezing.py"))
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)

BASELINE = "nnUNetTrainerFinetune"
VARIANTS = ["nnUNetTrainerL2SP", "nnUNetTrainerL2SP_Li"]
TARGET = 1.03


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    names = [BASELINE, *VARIANTS]
    trainers = {n: bf._build_trainer(n, spec)[0] for n in names}
    for n in VARIANTS:
        trainers[n].l2sp.capture(force=True)
    batch = bf._synthetic_batch(trainers[BASELINE])
    for tr in trainers.values():
        tr.on_train_epoch_start()
        tr.train_step(batch)  # warm-up: momentum buffers, allocator, oneDNN primitives
    rounds = []
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        times = {}
        for n in order:
            t = time.perf_counter()
            trainers[n].train_step(batch)
            times[n] = time.perf_counter() - t
        rounds.append(times)
    info = {n: {"anchored": len(trainers[n].l2sp.anchored_names),
                "anchored_scalars": sum(trainers[n].l2sp.state_dict()[k].numel()
                                        for k in trainers[n].l2sp.anchored_names)} for n in VARIANTS}
    return {"rounds": rounds, "info": info, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="setup folder (reused; default: a temporary one)")
    ap.add_argument("--size", type=float, default=32.0, help="generated volume size in mm (default 32)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per architecture (default 9)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see bench_freezing)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_l2sp_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"setup in {workdir}", flush=True)
    plans = bf.setup(workdir, args.size, workdir / "logs")
    from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
    env = nnunet_environment(workdir, defaults=SMALL_MACHINE)
    print(json.dumps(bf.machine(args.threads)))
    results = {}
    for arch, plans_file in plans.items():
        spec = {"plans_file": str(plans_file), "dataset_json": str(plans_file.with_name("dataset.json")),
                "rounds": args.rounds, "threads": args.threads}
        import subprocess
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["plan"] = bf.describe_plan(plans_file)
        results[arch] = res

    print(f"\n| plans | {BASELINE} step [s] | " + " | ".join(f"{v} step [s] | ratio" for v in VARIANTS) + " |")
    print("|---|---|" + "---|---|" * len(VARIANTS))
    verdicts = []
    for arch, res in results.items():
        base = statistics.median(r[BASELINE] for r in res["rounds"])
        cells = [f"{arch} ({res['plan']['class']}, {res['plan']['n_stages']} stages, patch "
                 f"{'x'.join(map(str, res['plan']['patch_size']))}, batch {res['plan']['batch_size']})",
                 f"{base:.3f}"]
        for v in VARIANTS:
            ratio = statistics.median(r[v] / r[BASELINE] for r in res["rounds"])
            cells += [f"{statistics.median(r[v] for r in res['rounds']):.3f}", f"{ratio:.3f}"]
            verdicts.append(f"{arch} {v}: {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")
        print("| " + " | ".join(cells) + " |")
    print("\nmedian of per-round ratios, " + f"{args.rounds} rounds, {results[next(iter(results))]['threads']} "
          "torch thread(s); anchored tensors: " + json.dumps(results[next(iter(results))]["info"]))
    print("\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
