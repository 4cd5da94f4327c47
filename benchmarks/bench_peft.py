"""Benchmark: parameter-efficient fine-tuning against full fine-tuning — step time, training-memory
increment, trainable share and the per-target file.

One run, the plans of ``bench_freezing.py`` (nnU-Net's default ``PlainConvUNet`` plan and its ResEnc-M
preset, generated CT-like data; the setup is shared and reused with ``--workdir``): the baseline
``nnUNetTrainerFinetune`` (every parameter trains) against ``nnUNetTrainerLoRA`` with r = 4 and r = 16
(adapters on every encoder/decoder conv, α = 8), ``nnUNetTrainerNormOnly`` (``all:norm+seg``) and
``nnUNetTrainerBitFit`` (``all:bias+seg``).

Measured exactly as ``bench_freezing.py`` measures (its harness is imported and reused; read its module
docstring): step time in paired rounds inside one process per plan (ratios within a round, medians over
rounds; wall and CPU time), the memory increment (peak RSS during two steps − idle RSS after
``initialize()``) in a fresh process per trainer, one torch thread, glibc with fixed thresholds. Plus:

* **trainable share** — trainable parameters (adapters + heads for LoRA) / parameters of the plain network;
* **per-target file** — what one more target costs on disk next to a shared base: the LoRA adapter file
  exactly as the trainer writes it (``lora_adapters.pth``: adapters, heads, digests of the base, the plans),
  the trained tensors for norm-only / BitFit (``torch.save`` of them), the whole network's weights for full
  fine-tuning.

**Primus** (``--archs Primus-S``): the same measurements on a Primus-S (embed 396, 12 transformer blocks, 6
heads, 8³ patch embedding) built by our trainers from the PlainConvUNet plan's data and patch, full fine-tuning
against LoRA r = 8 on every attention / MLP linear, the patch embedding and the up-projection (the variant
``nnUNetTrainerLoRA@r8``); on a transformer the frozen base saves the optimizer state of most parameters.

Why LoRA's step is not cheaper here: the update is applied in weight space (W₀ + (α/r)·B·A, so the adapted
conv is exactly a conv with the merged kernel), so backward still computes each conv's kernel gradient —
LoRA saves the optimizer state and the gradients of the frozen kernels, not backward compute.

    python benchmarks/bench_peft.py                          # ~8-12 min on 2 CPU cores (quick: ~4 min)
    python benchmarks/bench_peft.py --quick                  # smoke run: one repeat, one timed round
    python benchmarks/bench_peft.py --workdir /tmp/bf --json peft.json   # reuse bench_freezing's setup
    python benchmarks/bench_peft.py --archs Primus-S --variants nnUNetTrainerLoRA@r8   # the Primus row
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_freezing", Path(__file__).with_name("bench_freezing.py"))
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)

BASELINE = "nnUNetTrainerFinetune"
#: variant label -> (trainer class, settings of its plans configuration)
VARIANTS = {
    BASELINE: (BASELINE, {}),
    "nnUNetTrainerLoRA@r4": ("nnUNetTrainerLoRA", {"lora_rank": 4}),
    "nnUNetTrainerLoRA@r8": ("nnUNetTrainerLoRA", {"lora_rank": 8}),
    "nnUNetTrainerLoRA@r16": ("nnUNetTrainerLoRA", {"lora_rank": 16}),
    "nnUNetTrainerNormOnly": ("nnUNetTrainerNormOnly", {}),
    "nnUNetTrainerBitFit": ("nnUNetTrainerBitFit", {}),
}
RESULT_TAG = "BENCH_PEFT_RESULT "
#: transformer targets: label -> Primus arch_kwargs (dynamic-network-architectures' Primus-S sizes), built on the
#: PlainConvUNet plan's configuration (its data and patch size)
PRIMUS_ARCHS = {"Primus-S": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6, "patch_embed_size": [8, 8, 8]}}
ALL_ARCHS = [*bf.ARCHS, *PRIMUS_ARCHS]


def configuration_of(variant: str) -> str:
    return bf.CONFIGURATION if not VARIANTS[variant][1] else "peft_" + variant.split("@", 1)[1]


def write_plans(plans_file: Path, out: Path, arch: str | None = None) -> Path:
    """The plans with one configuration per settings variant (inheriting 3d_fullres: the same data); for a
    Primus label, 3d_fullres builds that Primus (patch: the plan's)."""
    plans = json.loads(plans_file.read_text())
    if arch in PRIMUS_ARCHS:
        from nnunet_transfer.plans.primus import primus_architecture, token_grid

        conf = plans["configurations"][bf.CONFIGURATION]
        token_grid(conf["patch_size"], PRIMUS_ARCHS[arch]["patch_embed_size"])  # refuses a patch it cannot embed
        conf["architecture"] = primus_architecture(**PRIMUS_ARCHS[arch])
    for variant, (_, settings) in VARIANTS.items():
        if settings:
            plans["configurations"][configuration_of(variant)] = {"inherits_from": bf.CONFIGURATION,
                                                                  "nnunet_transfer": settings}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plans, indent=1))
    return out


# ====================================================================== child
def _patch_harness() -> None:
    """bench_freezing builds trainers by class name on 3d_fullres; a variant adds its configuration."""
    build, trainer_class = bf._build_trainer, bf._trainer_class

    def build_variant(name, spec):
        saved = bf.CONFIGURATION
        bf.CONFIGURATION = configuration_of(name)
        try:
            return build(VARIANTS[name][0], spec)
        finally:
            bf.CONFIGURATION = saved

    bf._build_trainer = build_variant
    bf._trainer_class = lambda name: trainer_class(VARIANTS[name][0] if name in VARIANTS else name)


def per_target_file_bytes(name: str, trainer, folder: Path) -> int:
    import torch

    from nnunet_transfer.netutil import unwrap

    path = folder / f"{name}.pth"
    net = unwrap(trainer.network)
    if VARIANTS[name][0] == "nnUNetTrainerLoRA":
        trainer.write_adapter_file(path)  # exactly what training writes
    elif name == BASELINE:
        torch.save({"network_weights": net.state_dict()}, path)
    else:
        torch.save({n: p.detach() for n, p in net.named_parameters() if p.requires_grad}, path)
    return path.stat().st_size


def run_files_child(spec: dict) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in spec["trainers"]:
            trainer, info = bf._build_trainer(name, spec)
            out[name] = {"file_bytes": per_target_file_bytes(name, trainer, Path(tmp)), **info}
            del trainer
    return {"kind": "files", "arch": spec["arch"], "files": out}


def child(spec: dict) -> dict:
    import torch

    _patch_harness()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "files":
        return run_files_child(spec)
    return bf.run_memory_child(spec) if spec["kind"] == "memory" else bf.run_time_child(spec)


def run_one(spec: dict, env: dict, log: Path) -> dict:
    return bf.run_one(spec, env, log, script=__file__, tag=RESULT_TAG)


# ====================================================================== parent
def short(name: str) -> str:
    return name.replace("nnUNetTrainer", "").replace("@r", " r=") or name


def describe_plan(plans_file: Path, arch: str) -> dict:
    if arch not in PRIMUS_ARCHS:
        return bf.describe_plan(plans_file)
    conf = json.loads(plans_file.read_text())["configurations"][bf.CONFIGURATION]
    return {"plans": plans_file.stem, "class": "Primus", **PRIMUS_ARCHS[arch], "patch_size": conf["patch_size"],
            "batch_size": conf["batch_size"], "spacing": conf["spacing"]}


def plan_text(arch: str, p: dict, n_params: int) -> str:
    if p["class"] == "Primus":
        return (f"- **{arch}**: Primus, embed {p['embed_dim']}, {p['eva_depth']} transformer blocks, {p['eva_numheads']} "
                f"heads, patch embedding {p['patch_embed_size']}, patch {p['patch_size']}, batch {p['batch_size']}, "
                f"{n_params:,} parameters")
    return (f"- **{arch}**: {p['class']}, {p['n_stages']} stages, features {p['features']}, patch "
            f"{p['patch_size']}, batch {p['batch_size']}, {n_params:,} parameters")


def report(meta: dict, plans: dict, summary: dict, files: dict, variants: list[str]) -> list[str]:
    m = meta["machine"]
    lines = ["## PEFT benchmark: step time, training-memory increment and per-target file vs full fine-tuning",
             "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; device **{m['device']}**, torch "
             f"{m['torch']}, {m['torch_threads']} intra-op thread(s). Load average {meta['loadavg_start']} at "
             f"start, {meta['loadavg_end']} at end. Time: {meta['repeats']} repeats × {meta['steps']} paired rounds; "
             f"memory: {meta['mem_repeats']} fresh processes per trainer, {meta['mem_steps']} steps; "
             f"total {meta['wall_s'] / 60:.1f} min.", ""]
    for arch, p in plans.items():
        lines.append(plan_text(arch, p, files[arch][BASELINE]["params_total"]))
    lines += ["", "| plan | trainer | trainable | step ratio | CPU ratio | step s | increment MiB | increment ratio "
                  "| per-target file |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch in plans:
        plain = files[arch][BASELINE]["params_total"]
        for v in variants:
            r, f = summary[arch][v], files[arch][v]

            def ratio(x):
                return "1" if v == BASELINE else f"{x:.2f}"

            size = f["file_bytes"]
            size_text = f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 1024:.0f} KiB"
            lines.append(f"| {arch} | {short(v)} | {100 * f['params_trainable'] / plain:.2f}% | {ratio(r['step_ratio'])} | "
                         f"{ratio(r['cpu_ratio'])} | {r['step_s']:.2f} | {r['increment_mib']:.0f} | "
                         f"{ratio(r['mem_ratio'])} | {size_text} |")
    lines += ["", "trainable: trainable parameters / parameters of the plain network (LoRA: adapters + heads); "
                  "ratios: median of paired per-round (time) and per-repeat (memory) ratios to "
                  f"{BASELINE}; per-target file: the LoRA adapter file as written by the trainer, the trained "
                  "tensors for norm-only / BitFit, the network's weights for full fine-tuning."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="time processes per plan (default 3)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per time process (default 5)")
    ap.add_argument("--mem-repeats", type=int, default=2, help="memory processes per trainer (default 2)")
    ap.add_argument("--mem-steps", type=int, default=2, help="train steps per memory process (default 2)")
    ap.add_argument("--size", type=float, default=32.0, help="generated cube side in mm (default 32: 32³ patch)")
    ap.add_argument("--workdir", type=Path, help="keep/reuse the setup here (bench_freezing's works too)")
    ap.add_argument("--archs", nargs="+", default=list(bf.ARCHS), choices=ALL_ARCHS,
                    help=f"plans to measure (default {' '.join(bf.ARCHS)}; {', '.join(PRIMUS_ARCHS)}: a Primus on "
                         f"the PlainConvUNet plan's data)")
    ap.add_argument("--variants", nargs="+", default=[v for v in list(VARIANTS)[1:] if v != "nnUNetTrainerLoRA@r8"],
                    choices=list(VARIANTS)[1:],
                    help=f"variants besides the baseline {BASELINE}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1 timed round, 1 memory repeat")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.repeats, args.steps, args.mem_repeats = 1, 1, 1
    variants = [BASELINE, *dict.fromkeys(args.variants)]
    bf.STOCK = BASELINE  # the harness's checks and summary treat its STOCK trainer as the baseline
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bench_peft_")
    workdir = Path(tmp or args.workdir).resolve()
    logs = workdir / "logs_peft"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        from nnunet_transfer.environment import SMALL_MACHINE, nnunet_environment

        print(f"setup in {workdir} ({args.size:g} mm cubes)", flush=True)
        plans_files = bf.setup(workdir, args.size, workdir / "logs")
        base_of = {a: plans_files[a] if a in plans_files else plans_files["PlainConvUNet"] for a in args.archs}
        plans = {a: describe_plan(base_of[a], a) for a in args.archs}
        env = nnunet_environment(workdir, defaults=SMALL_MACHINE)
        mem_env = {**env, **bf.LIVE_ALLOCATOR_ENV}
        mem, tim, files = [], [], {}
        for arch in args.archs:
            peft_plans = write_plans(base_of[arch], workdir / "peft_plans" / f"{arch}.json", arch)
            base = {"arch": arch, "plans_file": str(peft_plans), "threads": args.threads,
                    "dataset_json": str(base_of[arch].parent / "dataset.json")}
            r = run_one({**base, "kind": "files", "trainers": variants}, env, logs / f"{arch}_files.log")
            files[arch] = r["files"]
            for name, info in r["files"].items():
                sane = {k: v for k, v in info.items() if k != "file_bytes"}
                bf.sanity_check(name, arch, sane)
            print(f"  {arch} per-target files: " + ", ".join(f"{short(v)} {files[arch][v]['file_bytes'] / 1024:.0f} KiB"
                                                            for v in variants), flush=True)
            for rep in range(max(args.repeats, args.mem_repeats)):
                if rep < args.repeats:
                    t = time.perf_counter()
                    r = run_one({**base, "kind": "time", "trainers": variants, "rounds": args.steps,
                                 "offset": rep * args.steps}, env, logs / f"r{rep}_{arch}_time.log")
                    r["repeat"] = rep
                    tim.append(r)
                    print(f"  repeat {rep} {arch} time [{time.perf_counter() - t:.0f} s]: " + ", ".join(
                        f"{short(v)} {bf.median([rd[v] for rd in r['rounds']]):.2f} s" for v in variants), flush=True)
                if rep < args.mem_repeats:
                    for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                        r = run_one({**base, "kind": "memory", "trainer": v, "mem_steps": args.mem_steps}, mem_env,
                                    logs / f"r{rep}_{arch}_{v}_memory.log")
                        r["repeat"] = rep
                        mem.append(r)
                        print(f"  repeat {rep} {arch} memory {short(v)}: +{r['increment_kib'] / 1024:.0f} MiB "
                              f"({r['peak_source']})", flush=True)
        summary = bf.summarise(mem, tim, list(args.archs), variants)
        meta = {"machine": bf.machine(tim[0]["threads"]), "repeats": args.repeats, "steps": args.steps,
                "mem_repeats": args.mem_repeats, "mem_steps": args.mem_steps, "size": args.size,
                "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
                "wall_s": time.perf_counter() - t_start}
        print()
        print("\n".join(report(meta, plans, summary, files, variants)))
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "plans": plans, "summary": summary, "files": files,
                                             "memory": mem, "time": tim}, indent=1))
            print(f"\nwritten: {args.json}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
