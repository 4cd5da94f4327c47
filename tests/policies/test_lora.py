"""LoRA on 3-D convolutions: the update is base + (α/r)·B·A, gradients follow the chain rule through the
kernel, and the adapted network serialises as the plain network it computes (keys, aliases, loaders)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import unet
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import alias_groups, canonical_key
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.policies.lora import (adapter_parameter_names, adapter_payload, apply_adapter_payload,
                                           inject_lora, kernel_matrix_shape, load_lora_state, lora_modules,
                                           lora_state, remove_lora, training_form)
from nnunet_transfer.trainers.lora import target_convs

torch.set_num_threads(1)


def randomise_adapters(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(net).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def adapted(arch="plain", n=3, rank=2, alpha=4.0, seed=0, spec="encoder+decoder"):
    net = unet(arch, n, seed=seed)
    convs = target_convs(BlockModel.from_network(net), spec)
    inject_lora(net, convs, rank=rank, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    return net, convs


@pytest.mark.parametrize("conv", [nn.Conv3d(3, 5, 3, padding=1), nn.ConvTranspose3d(6, 4, 2, stride=2),
                                  nn.Conv2d(4, 6, (3, 1)), nn.Conv3d(8, 3, 1)])
def test_merged_kernel_and_chain_rule_gradients(conv):
    torch.manual_seed(0)
    w0 = conv.weight.detach().clone()
    inject_lora(conv, [""], rank=2, alpha=3.0)
    d1, d2 = kernel_matrix_shape(conv)
    assert (conv.lora_A.shape, conv.lora_B.shape) == ((2, d2), (d1, 2)) and not conv.lora_B.any()
    with torch.no_grad():
        conv.lora_B.normal_()
    x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.dim() - 2)))
    # independent: float64 kernel, the plain functional op, autograd on the kernel itself
    merged = (w0.double() + 1.5 * (conv.lora_B.double() @ conv.lora_A.double()).view(w0.shape))
    assert (conv.state_dict()["weight"].double() - merged).abs().max() < 1e-6
    kernel = merged.detach().float().requires_grad_(True)
    op = F.conv_transpose3d if isinstance(conv, nn.ConvTranspose3d) else (
        F.conv3d if conv.weight.dim() == 5 else F.conv2d)
    kw = dict(stride=conv.stride, padding=conv.padding)
    ref = op(x, kernel, conv.bias, **kw)
    out = conv(x)
    assert torch.allclose(out, ref, atol=1e-5)
    g_out = torch.randn_like(out)
    (ref * g_out).sum().backward()
    (out * g_out).sum().backward()
    gk = kernel.grad.reshape(d1, d2)  # dL/dW'; dL/dB = s·G·Aᵀ, dL/dA = s·Bᵀ·G
    assert torch.allclose(conv.lora_B.grad, 1.5 * gk @ conv.lora_A.detach().T, atol=1e-4)
    assert torch.allclose(conv.lora_A.grad, 1.5 * conv.lora_B.detach().T @ gk, atol=1e-4)
    assert isinstance(conv, type(conv).__bases__[1])  # still an nn.ConvNd


def test_starts_at_the_pretrained_function_and_keeps_plain_keys_and_aliases():
    plain = unet("plain", 3, seed=0)
    net, convs = adapted()
    assert len(convs) == 10 and all(not c.startswith("decoder.seg_layers") for c in convs)
    assert {n[:-len(".weight")] for n in BlockModel.from_network(plain).kind_names["kernel"]
            if "seg_layers" not in n} == set(convs)  # every conv and transposed conv but the heads
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(x), net(x)))  # B = 0: bit-identical outputs
    sd, ref = net.state_dict(), plain.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert len(alias_groups(sd)) == len(alias_groups(ref))  # conv / all_modules.0 share one merged tensor
    with training_form(net):
        extra = set(net.state_dict()) - set(ref)  # the adapters, under every alias of their conv
    assert {canonical_key(k) for k in extra} == {f"{c}.{p}" for c in convs for p in ("lora_A", "lora_B")}


def test_plain_state_is_merged_and_loads_back_as_the_same_function():
    net, convs = adapted()
    randomise_adapters(net)
    sd = net.state_dict()
    for name, m in lora_modules(net).items():
        expected = m.weight.double() + m.lora_scale * (m.lora_B.double() @ m.lora_A.double()).view(m.weight.shape)
        assert (sd[name + ".weight"].double() - expected).abs().max() < 1e-6
    plain = unet("plain", 3, seed=5)
    plain.load_state_dict(sd)  # a plain network computes the same
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], net(x)[0], atol=1e-5)
    # loading a plain kernel K sets the base so that the layer computes with K, adapters kept
    other, _ = adapted(seed=3)
    randomise_adapters(other, seed=2)
    before = lora_state(other)
    other.load_state_dict(sd)
    for name, m in lora_modules(other).items():
        assert torch.equal(m.lora_B, before[name]["lora_B"])
        assert torch.allclose(m.merged_weight(), sd[name + ".weight"], atol=1e-6)


def test_pretrained_load_at_start_sets_the_base_exactly():
    source = unet("plain", 3, seed=7).state_dict()
    net, _ = adapted()
    net.load_state_dict(source)  # what nnU-Net's -pretrained_weights loader does (B = 0)
    for name, m in lora_modules(net).items():
        assert torch.equal(m.weight, source[name + ".weight"])


def test_training_state_round_trips_exactly():
    net, _ = adapted()
    randomise_adapters(net)
    state = lora_state(net)
    with training_form(net):
        full = {k: v.clone() for k, v in net.state_dict().items()}
    fresh, _ = adapted(seed=9)
    fresh.load_state_dict(net.state_dict())  # the plain form first, as nnU-Net's --c does
    load_lora_state(fresh, state)
    assert all(torch.equal(getattr(fresh.get_submodule(n), k), v) for n, s in state.items() for k, v in s.items())
    again, _ = adapted(seed=11)
    again.load_state_dict(full)  # the training form through load_state_dict
    assert all(torch.equal(getattr(again.get_submodule(n), k), v) for n, s in state.items() for k, v in s.items())
    with pytest.raises(DataError, match=r"saved shape \(2, .*\), network \(3, .*another lora_rank"):
        load_lora_state(adapted(rank=3)[0], state)


def test_remove_lora_merges_into_a_plain_network():
    net, convs = adapted()
    randomise_adapters(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert remove_lora(net) == len(convs)
    assert not lora_modules(net) and not adapter_parameter_names(net)
    assert type(net.get_submodule(convs[0])) is nn.Conv3d
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_block_model_and_kinds_of_an_adapted_network():
    net, convs = adapted()
    model = BlockModel.from_network(net)
    assert set(model.all_param_names) == set(dict(net.named_parameters()))
    adapters = adapter_parameter_names(net)
    assert len(adapters) == 2 * len(convs)
    assert not adapters & set().union(*model.kind_names.values())


@pytest.mark.parametrize("rank, message", [
    (0, r"'lora_rank' must be an integer >= 1, got 0"),
    (5, r"'lora_rank'=5 is larger than the smallest dimension of .*e\.g\. encoder\.stages\.0\.0\.convs\.0\.conv "
        r"\(kernel as a 4 x 27 matrix.*use lora_rank <= 4"),
])
def test_bad_ranks(rank, message):
    net = unet("plain", 3, seed=0)
    with pytest.raises(ConfigError, match=message):
        inject_lora(net, target_convs(BlockModel.from_network(net), "encoder+decoder"), rank=rank, alpha=1.0)


@pytest.mark.parametrize("spec, message", [
    ("all", r"includes the segmentation heads"),
    ("encoder+seg:bias", r"includes the segmentation heads"),
    ("encoder:norm", r"selects no convolution kernel"),
    ("decoder:bias", r"selects no convolution kernel"),
])
def test_bad_targets(spec, message):
    with pytest.raises(ConfigError, match=message):
        target_convs(BlockModel.from_network(unet("plain", 3)), spec)


def test_kernel_kind_targets_and_non_convs_are_refused():
    model = BlockModel.from_network(unet("plain", 3))
    assert target_convs(model, "blocks:1:kernel") == ["encoder.stages.0.0.convs.0.conv",
                                                      "encoder.stages.0.0.convs.1.conv"]
    net = unet("plain", 3)
    with pytest.raises(ConfigError, match=r"is a InstanceNorm3d; adapters go on convolutions"):
        inject_lora(net, ["encoder.stages.0.0.convs.0.norm"], rank=1, alpha=1.0)
    inject_lora(net, ["encoder.stages.0.0.convs.0.conv"], rank=1, alpha=1.0)
    with pytest.raises(ConfigError, match=r"already has an adapter"):
        inject_lora(net, ["encoder.stages.0.0.convs.0.all_modules.0"], rank=1, alpha=1.0)


def test_adapter_payload_rebuilds_the_function_on_the_same_base_only():
    base = unet("plain", 3, seed=4).state_dict()
    net, _ = adapted()
    net.load_state_dict(base)
    randomise_adapters(net)
    heads = [n for n, _ in net.named_parameters() if ".seg_layers." in n]
    with torch.no_grad():
        for n in heads:
            net.get_parameter(n).add_(1.0)  # "trained" heads
    payload = adapter_payload(net, trained_names=heads + sorted(adapter_parameter_names(net)))
    assert set(payload["trained"]) == set(heads) and payload["rank"] == 2 and payload["alpha"] == 4.0
    assert set(payload["base_digests"]).isdisjoint(heads)
    target = unet("plain", 3, seed=4)
    apply_adapter_payload(target, payload)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(target(x)[0], net(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), net.state_dict().values()))
    with pytest.raises(DataError, match=r"the base is not the network these adapters were trained on: \d+ of \d+"):
        apply_adapter_payload(unet("plain", 3, seed=5), payload)


def test_adapters_train_and_the_base_stays_bit_identical():
    net, convs = adapted()
    base = {c: net.get_submodule(c).weight.detach().clone() for c in convs}
    trainable = adapter_parameter_names(net)
    params = dict(net.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    opt = torch.optim.SGD([params[n] for n in sorted(trainable)], lr=0.1, momentum=0.9)
    x = torch.randn(2, 1, 16, 16, 16)
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in net(x)).backward()
        opt.step()
    assert all(torch.equal(net.get_submodule(c).weight, w) for c, w in base.items())
    assert all(net.get_submodule(c).lora_B.abs().sum() > 0 for c in convs)
    assert not math.isnan(float(net.state_dict()[convs[0] + ".weight"].sum()))
