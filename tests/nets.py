"""The test suites' tiny networks, built the way nnU-Net's plans describe them (one place for all of them).

``unet`` builds a dynamic-network-architectures U-Net directly; ``plans_network`` builds the network nnU-Net
would build for a plans configuration (random init with a seed).
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn


def unet_kwargs(n: int = 4, *, dim: int = 3, features: list[int] | None = None, n_conv_decoder: int = 1,
                norm=None, norm_kwargs: dict | None = None, num_classes: int = 2,
                deep_supervision: bool = True) -> dict:
    """Features min(4·2^i, 32), stride 2 after the stem, InstanceNorm (affine), LeakyReLU, conv bias."""
    norm = norm if norm is not None else (nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)
    return dict(input_channels=1, n_stages=n, features_per_stage=features or [min(4 * 2 ** i, 32) for i in range(n)],
                conv_op=nn.Conv3d if dim == 3 else nn.Conv2d, kernel_sizes=3, strides=[1] + [2] * (n - 1),
                num_classes=num_classes, n_conv_per_stage_decoder=n_conv_decoder, conv_bias=True, norm_op=norm,
                norm_op_kwargs=norm_kwargs or {"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def unet(arch: str = "plain", n: int = 4, *, seed: int | None = None, n_conv: int = 2,
         blocks_per_stage: list[int] | None = None, arch_kwargs: dict | None = None, **kwargs) -> nn.Module:
    """A ``PlainConvUNet`` (``n_conv`` convs per stage) or ``ResidualEncoderUNet`` (1 residual block in the
    stem stage, 2 in the others unless ``blocks_per_stage``), initialised as nnU-Net does. ``arch_kwargs`` go
    to the class as they are (e.g. ``block=BottleneckD``)."""
    if seed is not None:
        torch.manual_seed(seed)
    kw = {**unet_kwargs(n, **kwargs), **(arch_kwargs or {})}
    if arch == "plain":
        net = PlainConvUNet(n_conv_per_stage=n_conv, **kw)
    elif arch == "resenc":
        net = ResidualEncoderUNet(n_blocks_per_stage=blocks_per_stage or [1] + [2] * (n - 1), **kw)
    else:
        raise ValueError(f"arch must be 'plain' or 'resenc', got {arch!r}")
    net.apply(net.initialize)
    return net


#: the tiny Primus of the tests: embed_dim 48 with 2 heads (head dim 24: Eva's rotary embedding needs a head dim
#: divisible by 1.5 whose two-thirds are divisible by 4, so 32 with 2 heads cannot be built), 4 transformer blocks,
#: 8³ patch embedding, a 16³ input (a 2³ token grid)
PRIMUS = {"embed_dim": 48, "eva_depth": 4, "eva_numheads": 2, "patch_embed_size": (8, 8, 8)}


def primus(*, seed: int | None = None, input_shape=(16, 16, 16), num_classes: int = 3, input_channels: int = 1,
           **kwargs) -> nn.Module:
    """A tiny dynamic-network-architectures ``Primus`` (:data:`PRIMUS`, ``kwargs`` override)."""
    from dynamic_network_architectures.architectures.primus import Primus

    if seed is not None:
        torch.manual_seed(seed)
    return Primus(input_channels=input_channels, num_classes=num_classes, input_shape=tuple(input_shape),
                  **{**PRIMUS, **kwargs})


def plans_network(plans: dict, configuration: str, dataset_json: dict, *, seed: int,
                  deep_supervision: bool = True) -> nn.Module:
    """The network nnU-Net builds for ``plans`` / ``configuration`` (CPU), after ``torch.manual_seed(seed)``."""
    from nnunet_transfer.nnunet_io import build_network

    torch.manual_seed(seed)
    return build_network(plans, configuration, dataset_json, deep_supervision=deep_supervision)
