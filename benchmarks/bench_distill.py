"""Benchmark: what distillation costs — an nnUNetTrainerContinual train step against nnUNetTrainerFinetune's.

Same plans, same synthetic batch, in one run (harness shared with ``bench_freezing.py``: trainers built exactly as
``nnUNetv2_train`` builds them). The Continual trainer gets a teacher built as its ``on_train_start`` builds it —
the source network of the same plans, frozen, from a state dict (the values do not change the cost of a step).

* **time**: one process holds both trainers; after a warm-up round each timed round runs one ``train_step`` of
  each (order rotated) and the ratio Continual / Finetune is formed within the round; medians reported.
* **memory**: a fresh process per trainer; *increment* = peak RSS during the steps − RSS once the trainer (and
  the teacher) are built and idle (VmHWM reset at idle, glibc trimmed), as in ``bench_freezing.py``; the
  teacher's own weights are reported apart (they are held whether a step runs or not).

    python benchmarks/bench_distill.py                      # PlainConvUNet + ResEnc-M plans, 32 mm data
    python benchmarks/bench_distill.py --workdir /tmp/bd --rounds 15 --json out.json
"""
from __future__ import annotations

import argparse
import gc
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
VARIANT = "nnUNetTrainerContinual"
TAG = "BENCH_DISTILL_RESULT "


def _build(name: str, spec: dict):
    trainer, info = bf._build_trainer(name, spec)
    if name == VARIANT:
        # the teacher on_train_start builds from -pretrained_weights: the source network of these plans, frozen
        plans = json.loads(Path(spec["plans_file"]).read_text())
        dataset_json = json.loads(Path(spec["dataset_json"]).read_text())
        state = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
        trainer._set_teacher({"state": state, "init_args": {"plans": plans, "configuration": bf.CONFIGURATION,
                                                            "dataset_json": dataset_json}, "source": "bench"})
        info["teacher_params"] = sum(p.numel() for p in trainer.teacher.parameters())
        info["teacher_bytes"] = sum(p.numel() * p.element_size() for p in trainer.teacher.parameters())
    return trainer, info


def time_child(spec: dict) -> dict:
    names = [BASELINE, VARIANT]
    trainers = {n: _build(n, spec)[0] for n in names}
    batch = bf._synthetic_batch(trainers[BASELINE])
    for tr in trainers.values():
        tr.on_train_epoch_start()
        tr.train_step(batch)  # warm-up: momentum buffers, allocator, oneDNN primitives
    rounds = []
    for r in range(spec["rounds"]):
        times = {}
        for n in names[r % 2:] + names[:r % 2]:
            t = time.perf_counter()
            trainers[n].train_step(batch)
            times[n] = time.perf_counter() - t
        rounds.append(times)
    kl = trainers[VARIANT]._distill.last_kl
    return {"rounds": rounds, "last_kl": kl}


def memory_child(spec: dict) -> dict:
    bf._trainer_class(spec["trainer"])  # imports first: they are not the trainer's memory
    trainer, info = _build(spec["trainer"], spec)
    batch = bf._synthetic_batch(trainer)
    trainer.on_train_epoch_start()
    gc.collect()
    bf._malloc_trim()
    idle = bf._vmrss_kib()
    reset = bf._reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t)
    peak = bf._status_kib("VmHWM") if reset else bf._maxrss_kib()
    return {"trainer": spec["trainer"], "idle_kib": idle, "peak_kib": peak, "increment_kib": peak - idle,
            "peak_reset": reset, "step_times_s": times, **info}


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return time_child(spec) if spec["kind"] == "time" else memory_child(spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="setup folder (reused; default: a temporary one)")
    ap.add_argument("--size", type=float, default=32.0, help="generated volume size in mm (default 32)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per architecture (default 9)")
    ap.add_argument("--steps", type=int, default=2, help="train steps of each memory process (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see bench_freezing)")
    ap.add_argument("--archs", default=None, help="comma-separated plans labels to run (default: all)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(TAG + json.dumps(child(json.loads(args.child))))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_distill_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    print(f"setup in {workdir}", flush=True)
    plans = bf.setup(workdir, args.size, workdir / "logs")
    if args.archs:
        plans = {k: v for k, v in plans.items() if k in args.archs.split(",")}
    from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment
    env = nnunet_environment(workdir, defaults=SMALL_MACHINE)
    print(json.dumps(bf.machine(args.threads)))
    results = {}
    for arch, plans_file in plans.items():
        base = {"plans_file": str(plans_file), "dataset_json": str(plans_file.with_name("dataset.json")),
                "threads": args.threads, "arch": arch}
        tim = bf.run_one({**base, "kind": "time", "rounds": args.rounds}, env, workdir / "logs" / f"time_{arch}.log",
                         script=__file__, tag=TAG)
        mem = {n: bf.run_one({**base, "kind": "memory", "trainer": n, "steps": args.steps}, env,
                             workdir / "logs" / f"memory_{arch}_{n}.log", script=__file__, tag=TAG)
               for n in (BASELINE, VARIANT)}
        results[arch] = {"time": tim, "memory": mem, "plan": bf.describe_plan(plans_file)}

    print(f"\n| plans | {BASELINE} step [s] | {VARIANT} step [s] | time ratio | step memory increment [MiB] "
          f"Finetune / Continual | memory ratio | teacher weights [MiB] |")
    print("|---|---|---|---|---|---|---|")
    for arch, res in results.items():
        rounds = res["time"]["rounds"]
        b = statistics.median(r[BASELINE] for r in rounds)
        v = statistics.median(r[VARIANT] for r in rounds)
        ratio = statistics.median(r[VARIANT] / r[BASELINE] for r in rounds)
        mb, mv = (res["memory"][n]["increment_kib"] / 1024 for n in (BASELINE, VARIANT))
        teacher = res["memory"][VARIANT]["teacher_bytes"] / 2 ** 20
        p = res["plan"]
        print(f"| {arch} ({p['class']}, {p['n_stages']} stages, patch {'x'.join(map(str, p['patch_size']))}, batch "
              f"{p['batch_size']}) | {b:.3f} | {v:.3f} | {ratio:.2f} | {mb:.0f} / {mv:.0f} | {mv / mb:.2f} | "
              f"{teacher:.1f} |")
    print(f"\nmedian of per-round ratios, {args.rounds} rounds, {args.threads} torch thread(s); memory: peak RSS "
          f"increment over the idle trainer during {args.steps} steps, one fresh process per trainer")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
