"""Freezing policy on tiny real U-Nets: SGD leaves frozen tensors bit-identical, norms in frozen blocks
stay in eval mode, and ResEnc's zeroed residual norms are revived only where they are still zero."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from torch import nn

from nets import unet
from nnunet_transfer.blocks import resolve_spec
from nnunet_transfer.errors import SpecError
from nnunet_transfer.policies.freezing import (
    apply_freeze,
    frozen_modules,
    keep_frozen_norms_in_eval,
    reinit_zeroed_residual_norms,
    trainable_parameters,
)


def plain(n: int = 4, **kw) -> PlainConvUNet:
    return unet("plain", n, seed=0, **kw)


def resenc(n: int = 4, **kw) -> ResidualEncoderUNet:
    return unet("resenc", n, seed=0, arch_kwargs=kw)


def assert_same_names(actual, expected) -> None:
    actual, expected = set(actual), set(expected)
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    assert not missing and not extra, f"\nmissing: {missing}\nextra: {extra}"


def loss_of(outputs) -> torch.Tensor:
    return sum(o.square().mean() for o in outputs)


def test_sgd_steps_leave_frozen_parameters_bit_identical():
    net = plain()
    trainable = resolve_spec(net, "contracting+seg")
    report = apply_freeze(net, trainable)
    params = dict(net.named_parameters())
    assert_same_names(report.trainable_names, trainable)
    assert_same_names(report.frozen_names, set(params) - trainable)
    assert report.n_trainable_scalars == sum(params[n].numel() for n in trainable)
    assert report.n_trainable_scalars + report.n_frozen_scalars == sum(p.numel() for p in net.parameters())
    assert report.n_trainable_tensors == len(trainable)

    opt_params = trainable_parameters(net)
    assert {id(p) for p in opt_params} == {id(params[n]) for n in trainable}
    opt = torch.optim.SGD(opt_params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = {n: p.detach().clone() for n, p in params.items()}
    had_grad: set[str] = set()
    torch.manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        loss_of(net(torch.randn(2, 1, 16, 16, 16))).backward()
        had_grad |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
    frozen = set(params) - trainable
    assert all(params[n].grad is None for n in frozen)
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert not changed & frozen, sorted(changed & frozen)
    assert had_grad <= trainable and had_grad <= changed
    assert {n for n in trainable if params[n].ndim > 1} <= changed  # every conv / transposed conv weight


def test_report_names_top_most_frozen_modules():
    net = plain(4)
    report = apply_freeze(net, resolve_spec(net, "contracting+seg"))
    # half 4b and blocks 5..7 frozen: the top-most wholly frozen modules (the decoder lists as a whole)
    assert set(report.frozen_module_names) == {"encoder.stages.3.0.convs.1", "decoder.transpconvs",
                                               "decoder.stages"}
    assert frozen_modules(net) == list(report.frozen_module_names)
    assert "frozen" in report.summary() and report.to_dict()["n_frozen_tensors"] == report.n_frozen_tensors
    # whole encoder frozen: the encoder module itself, not its aliases under decoder.encoder
    report = apply_freeze(net, resolve_spec(net, "decoder+seg"))
    assert report.frozen_module_names == ("encoder",)


def test_apply_freeze_is_a_function_of_the_names_only():
    net = plain()
    apply_freeze(net, resolve_spec(net, "first"))
    report = apply_freeze(net, resolve_spec(net, "all"))
    assert report.n_frozen_tensors == 0 and all(p.requires_grad for p in net.parameters())


def test_prefixes_and_aliases_are_accepted():
    net = plain()
    names = {"module._orig_mod.encoder.stages.0.0.convs.0.conv.weight",
             "decoder.encoder.stages.0.0.convs.0.all_modules.0.bias"}  # alias of ...conv.bias
    report = apply_freeze(net, names)
    assert report.trainable_names == ("encoder.stages.0.0.convs.0.conv.weight",
                                      "encoder.stages.0.0.convs.0.conv.bias")


def test_unknown_names_and_empty_optimizer():
    net = plain()
    with pytest.raises(SpecError, match=r"2 trainable name\(s\) are not parameters of this PlainConvUNet: "
                                        r"\['encoder.nope', 'x'\]; names are those of named_parameters\(\)"):
        apply_freeze(net, {"x", "encoder.nope", "encoder.stages.0.0.convs.0.conv.weight"})
    apply_freeze(net, set())
    with pytest.raises(SpecError, match=r"every parameter of this PlainConvUNet is frozen; the optimizer "
                                        r"would be empty"):
        trainable_parameters(net)


def _norms(module: nn.Module, kind) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_batchnorm_in_frozen_blocks_stays_in_eval():
    net = plain(3, norm=nn.BatchNorm3d, norm_kwargs={"eps": 1e-5, "affine": True})
    report = apply_freeze(net, resolve_spec(net, "decoder+seg"))
    enc_bn, dec_bn = _norms(net.encoder, nn.BatchNorm3d), _norms(net.decoder.stages, nn.BatchNorm3d)
    assert enc_bn and dec_bn
    net.train()
    assert keep_frozen_norms_in_eval(net, report.frozen_module_names) == len(enc_bn)
    assert not any(m.training for m in enc_bn) and all(m.training for m in dec_bn)
    enc_stats = [m.running_mean.clone() for m in enc_bn]
    dec_stats = [m.running_mean.clone() for m in dec_bn]
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 8, 8) + 3.0)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(enc_stats, enc_bn))
    assert not any(torch.equal(a, m.running_mean) for a, m in zip(dec_stats, dec_bn))
    net.train()  # what nnU-Net does each epoch; the default finds frozen modules from requires_grad
    assert keep_frozen_norms_in_eval(net) == len(enc_bn)
    assert not any(m.training for m in enc_bn)


def test_instance_norm_counts_only_with_running_stats():
    tracked = plain(3, norm_kwargs={"eps": 1e-5, "affine": True, "track_running_stats": True})
    apply_freeze(tracked, resolve_spec(tracked, "decoder+seg"))
    tracked.train()
    assert keep_frozen_norms_in_eval(tracked) == len(_norms(tracked.encoder, nn.InstanceNorm3d)) > 0
    untracked = plain(3)
    apply_freeze(untracked, resolve_spec(untracked, "decoder+seg"))
    assert keep_frozen_norms_in_eval(untracked) == 0
    with pytest.raises(SpecError, match=r"'encoder.nope' is not a module of this PlainConvUNet"):
        keep_frozen_norms_in_eval(untracked, ["encoder.nope"])


def test_frozen_random_resenc_blocks_have_dead_residual_branches_until_reinit():
    net = resenc()
    blocks = _norms(net, BasicBlockD)
    assert len(blocks) == 1 + 2 + 2 + 2
    outputs = []
    hook = blocks[-1].conv2.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 16, 16))
    assert torch.count_nonzero(outputs[-1]) == 0  # the residual branch adds nothing
    assert reinit_zeroed_residual_norms(net) == len(blocks)
    assert all(torch.equal(b.conv2.norm.weight, torch.ones_like(b.conv2.norm.weight)) for b in blocks)
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 16, 16))
    hook.remove()
    assert torch.count_nonzero(outputs[-1]) > 0
    assert reinit_zeroed_residual_norms(net) == 0  # nothing left at zero


def test_reinit_is_limited_to_modules_and_never_touches_loaded_weights():
    net = resenc()
    with torch.no_grad():
        net.encoder.stages[1].blocks[0].conv2.norm.weight.fill_(0.5)  # as if pretrained
    assert reinit_zeroed_residual_norms(net, ["encoder.stages.0", "encoder.stages.1"]) == 2
    assert torch.equal(net.encoder.stages[1].blocks[0].conv2.norm.weight,
                       torch.full_like(net.encoder.stages[1].blocks[0].conv2.norm.weight, 0.5))
    assert torch.count_nonzero(net.encoder.stages[2].blocks[0].conv2.norm.weight) == 0
    assert reinit_zeroed_residual_norms(plain()) == 0
    with pytest.raises(SpecError, match=r"'encoder.stages.9' is not a module"):
        reinit_zeroed_residual_norms(net, ["encoder.stages.9"])


def test_reinit_bottleneck_blocks():
    net = resenc(block=BottleneckD, bottleneck_channels=[2, 4, 8, 16])
    blocks = _norms(net, BottleneckD)
    assert reinit_zeroed_residual_norms(net) == len(blocks) == 7
    assert all(torch.equal(b.conv3.norm.weight, torch.ones_like(b.conv3.norm.weight)) for b in blocks)
