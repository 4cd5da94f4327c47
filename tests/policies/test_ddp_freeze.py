"""Freeze first, then wrap in DistributedDataParallel (no find_unused_parameters): two CPU processes
(gloo) train a few steps on a real nnU-Net-built PlainConvUNet with a frozen encoder."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
ARCH = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
ARCH_KWARGS = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
REQ_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from torch.nn.parallel import DistributedDataParallel as DDP

        from nnunet_transfer.blocks import resolve_spec
        from nnunet_transfer.errors import TransferError
        from nnunet_transfer.policies.freezing import apply_freeze, trainable_parameters

        torch.manual_seed(rank)  # different random init per rank: DDP must broadcast rank 0's weights
        net = get_network_from_plans(ARCH, ARCH_KWARGS, REQ_IMPORT, 1, 2, allow_init=True,
                                     deep_supervision=True)  # nnU-Net trains with deep supervision
        trainable = resolve_spec(net, "decoder+seg")
        report = apply_freeze(net, trainable)  # the order nnU-Net's configure_optimizers allows
        ddp = DDP(net)
        try:
            apply_freeze(ddp, resolve_spec(ddp, "all"))
            refused_after_wrap = False
        except TransferError:
            refused_after_wrap = True
        assert resolve_spec(ddp, "decoder+seg") == trainable  # 'module.' removed once
        params = dict(net.named_parameters())
        start = {n: p.detach().clone() for n, p in params.items()}  # after DDP's broadcast
        opt = torch.optim.SGD(trainable_parameters(ddp), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(STEPS):
            x = torch.randn(2, 1, 16, 16, 16, generator=gen)
            opt.zero_grad()
            sum(o.square().mean() for o in ddp(x)).backward()
            opt.step()

        def gather(names) -> list[torch.Tensor]:
            vec = torch.cat([params[n].detach().flatten() for n in sorted(names)])
            out = [torch.empty_like(vec) for _ in range(WORLD)]
            dist.all_gather(out, vec)
            return out

        trained, frozen = gather(trainable), gather(set(params) - trainable)
        result = {
            "refused_after_wrap": refused_after_wrap,
            "n_frozen": report.n_frozen_tensors,
            "frozen_unchanged": all(torch.equal(params[n], start[n]) for n in params if n not in trainable),
            "trainable_changed": all(not torch.equal(params[n], start[n]) for n in trainable
                                     if params[n].ndim > 1),
            "trainable_equal_across_ranks": all(torch.equal(trained[0], t) for t in trained),
            "frozen_equal_across_ranks": all(torch.equal(frozen[0], t) for t in frozen),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # the work is done and written: leave without the interpreter's teardown, where torch 2.14's gloo now and
    # then aborts ("terminate called without an active exception", SIGABRT) after destroy_process_group
    os._exit(0)


def test_freeze_then_ddp_trains_without_unused_parameter_errors(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"refused_after_wrap": True, "n_frozen": result["n_frozen"], "frozen_unchanged": True,
                          "trainable_changed": True, "trainable_equal_across_ranks": True,
                          "frozen_equal_across_ranks": True}, (rank, result)
        assert result["n_frozen"] > 0
