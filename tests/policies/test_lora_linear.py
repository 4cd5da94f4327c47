"""LoRA on linear layers (a Primus' attention q/k/v/proj and MLP fc1/fc2): W' = W₀ + (α/r)·B·A, gradients by the
chain rule, the plain form loads into a plain Primus and computes what the adapted one computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import primus
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.policies.lora import (adapter_parameter_names, inject_lora, kernel_matrix_shape, lora_modules,
                                           remove_lora)
from nnunet_transfer.trainers.lora import target_convs

torch.set_num_threads(1)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_merged_weight_and_chain_rule_gradients(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=bias)
    w0 = lin.weight.detach().clone()
    inject_lora(lin, [""], rank=3, alpha=6.0)
    assert kernel_matrix_shape(lin) == (5, 7) and (lin.lora_A.shape, lin.lora_B.shape) == ((3, 7), (5, 3))
    with torch.no_grad():
        lin.lora_B.normal_()
    merged = w0.double() + 2.0 * (lin.lora_B.double() @ lin.lora_A.double())
    assert (lin.state_dict()["weight"].double() - merged).abs().max() < 1e-6
    x = torch.randn(4, 3, 7)  # tokens: (batch, sequence, features)
    kernel = merged.detach().float().requires_grad_(True)
    ref = F.linear(x, kernel, lin.bias)
    out = lin(x)
    assert torch.allclose(out, ref, atol=1e-6)
    g_out = torch.randn_like(out)
    (ref * g_out).sum().backward()
    (out * g_out).sum().backward()
    gk = kernel.grad  # dL/dW'; dL/dB = s·G·Aᵀ, dL/dA = s·Bᵀ·G (closed form, against autograd on W')
    assert torch.allclose(lin.lora_B.grad, 2.0 * gk @ lin.lora_A.detach().T, atol=1e-5)
    assert torch.allclose(lin.lora_A.grad, 2.0 * lin.lora_B.detach().T @ gk, atol=1e-5)
    assert lin.weight.grad is not None  # W₀ is frozen by the trainer (requires_grad_), not by the layer
    assert isinstance(lin, nn.Linear)


def adapted_primus(rank=4, alpha=8.0, seed=0):
    net = primus(seed=seed)
    layers = target_convs(BlockModel.from_network(net), "encoder+decoder")
    inject_lora(net, layers, rank=rank, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    return net, layers


def test_primus_targets_are_every_linear_the_patch_embedding_and_the_decoder():
    net, layers = adapted_primus()
    linears = [n for n, m in primus().named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(layers)
    per_block = {n.rsplit(".", 1)[-1] for n in linears if n.startswith("eva.blocks.0.")}
    assert per_block == {"q_proj", "k_proj", "v_proj", "proj", "fc1_g", "fc1_x", "fc2"}
    assert set(layers) - set(linears) == {"down_projection.proj", "up_projection.decode.0.0",
                                          "up_projection.decode.1.0"}  # the heads (decode.2) train in full
    assert len(adapter_parameter_names(net)) == 2 * len(layers)


def test_primus_merged_checkpoint_computes_the_adapted_network():
    plain = primus(seed=0)
    net, _ = adapted_primus()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))  # B = 0: the pretrained function, bit for bit
        g = torch.Generator().manual_seed(3)
        for m in lora_modules(net).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        sd = net.state_dict()
        assert list(sd) == list(plain.state_dict())  # plain keys: stock loaders and nnUNetv2_predict read it
        other = primus(seed=9)
        other.load_state_dict(sd)
        adapted_out, merged_out = net(x), other(x)
        assert not torch.equal(adapted_out, plain(x))
        assert (adapted_out - merged_out).abs().max() <= 1e-6
    before = {k: v.clone() for k, v in sd.items()}
    remove_lora(net)
    assert type(net.get_submodule("eva.blocks.0.attn.q_proj")) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
