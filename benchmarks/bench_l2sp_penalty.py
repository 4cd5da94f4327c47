"""Micro-benchmark: cost of the L2-SP penalty step next to an SGD step, on an nnU-Net-size parameter set.

The network is nnU-Net's default 3d_fullres PlainConvUNet for a 128³ patch (6 stages, features
32..320, two convs per stage); only its parameters are used (no forward/backward): the gradients
are random. The anchored scope is the encoder (as in Sagie et al.); beta, when set, acts on the rest.
Reported: median wall time of ``optimizer.step()`` (SGD, momentum 0.99, nesterov, nnU-Net's param
groups), of ``add_to_grads()``, of ``penalty_value()`` and of ``add_to_grads(return_value=True)``,
and each as a ratio to the optimizer step. The trainer-level overhead (per full train step) is a
separate benchmark.

    OMP_NUM_THREADS=1 python benchmarks/bench_l2sp_penalty.py [--repeats 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_transfer.policies.l2sp import L2SPPenalty, param_groups


def nnunet_default_3d_unet() -> PlainConvUNet:
    n = 6
    return PlainConvUNet(input_channels=1, n_stages=n, features_per_stage=[min(32 * 2 ** i, 320) for i in range(n)],
                         conv_op=nn.Conv3d, kernel_sizes=3, strides=[1] + [2] * (n - 1), n_conv_per_stage=2,
                         num_classes=2, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def median_times(ops: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per op; the ops are interleaved round by round so that load from other processes
    on a shared machine hits all of them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in ops.values():  # warm-up: first-touch allocations, optimizer state
        fn()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = nnunet_default_3d_unet().to(device)
    named = dict(net.named_parameters())
    scope = {n for n in named if n.startswith("encoder.")}
    n_all = sum(p.numel() for p in named.values())
    n_scope = sum(named[n].numel() for n in scope)
    print(f"PlainConvUNet 3d, 6 stages, features 32..320: {n_all / 1e6:.1f} M parameters in {len(named)} tensors; "
          f"encoder scope {n_scope / 1e6:.1f} M in {len(scope)} tensors; device {device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes make CPU times noisy)")
    for p in named.values():
        p.grad = torch.randn_like(p) * 1e-3

    for beta in (None, 1e-4):
        penalty = L2SPPenalty.from_named_parameters(named, scope, alpha=1e-2, beta=beta)
        penalty.capture(force=True)
        optimizer = torch.optim.SGD(param_groups(net.parameters(), penalty, weight_decay=3e-5), 1e-2,
                                    momentum=0.99, nesterov=True)
        # the optimizer step moves θ away from θ̄ as it goes, as in training
        rows = median_times({"SGD optimizer.step()": optimizer.step,
                             "add_to_grads()": penalty.add_to_grads,
                             "penalty_value()": penalty.penalty_value,
                             "add_to_grads(return_value=True)": lambda: penalty.add_to_grads(return_value=True)},
                            args.repeats, device)
        step = rows.pop("SGD optimizer.step()")
        rows["add_to_grads() + penalty_value()"] = rows["add_to_grads()"] + rows["penalty_value()"]
        print(f"\nalpha=1e-2, beta={beta}")
        print(f"  {'SGD optimizer.step()':34s} {1e3 * step:8.1f} ms   1.00 x step")
        for name, t in rows.items():
            print(f"  {name:34s} {1e3 * t:8.1f} ms   {t / step:4.2f} x step")


if __name__ == "__main__":
    main()
