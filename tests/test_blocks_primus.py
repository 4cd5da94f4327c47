"""Primus in the block model: patch embedding + transformer blocks (encoder), up-projection stages (decoder), the
projection to the classes (seg); the spec grammar on that layout; parameter kinds of its Linear / LayerNorm
layers. On the tiny Primus of tests/nets.py (4 blocks, 8³ patch embedding: 3 up-projection stages)."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
from torch import nn

from nets import PRIMUS, primus
from nnunet_transfer.blocks import BlockModel, Layout, layout_from_architecture, parse_spec
from nnunet_transfer.errors import ArchitectureError, SpecError
from nnunet_transfer.plans.primus import primus_architecture

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    return primus(seed=0)


@pytest.fixture(scope="module")
def model(net):
    return BlockModel.from_network(net)


def names_under(net, *prefixes):
    return {n for n, _ in net.named_parameters() if n.startswith(prefixes)}


def test_layout_blocks_and_every_parameter_once(net, model):
    assert model.layout == Layout.transformer(4, 2, "Primus") and model.n_blocks == 6
    assert model.architecture == "Primus"
    params = dict(net.named_parameters())
    assert sorted(model.all_param_names) == sorted(params)  # each parameter in exactly one place
    assert sum(b.n_params for b in model.blocks) + model.n_seg_params == sum(p.numel() for p in net.parameters())
    b = model.blocks
    assert set(b[0].param_names) == names_under(net, "down_projection.", "eva.blocks.0.") | {"eva.pos_embed"}
    assert set(b[1].param_names) == names_under(net, "eva.blocks.1.")
    assert set(b[3].param_names) == names_under(net, "eva.blocks.3.", "eva.norm.")
    assert set(b[4].param_names) == names_under(net, "up_projection.decode.0.")
    assert set(b[5].param_names) == names_under(net, "up_projection.decode.1.")
    assert set(model.seg_param_names) == names_under(net, "up_projection.decode.2.")
    assert net.up_projection.decode[2].out_channels == 3  # the heads: the projection to the classes
    assert [x.group for x in b] == ["encoder"] * 4 + ["decoder"] * 2
    assert [x.output_module for x in b] == ["eva.blocks.0", "eva.blocks.1", "eva.blocks.2", "eva.norm",
                                            "up_projection.decode.0", "up_projection.decode.1"]
    assert [x.resolution_level for x in b] == [3, 3, 3, 3, 2, 1]
    assert [x.depth_scheme2 for x in b] == [1, 2, 3, 4, 5, 6] and not any(x.halves for x in b)
    for name in (x.output_module for x in b):
        net.get_submodule(name)  # hookable modules


def test_register_tokens_go_with_the_patch_embedding():
    net = primus(seed=0, num_register_tokens=2)
    model = BlockModel.from_network(net)
    assert "register_tokens" in model.blocks[0].param_names
    assert sorted(model.all_param_names) == sorted(dict(net.named_parameters()))


def test_specs_on_primus(net, model):
    assert model.param_names("blocks:1-2") == set(model.blocks[0].param_names) | set(model.blocks[1].param_names)
    assert model.param_names("encoder") == names_under(net, "down_projection.", "eva.") | {"eva.pos_embed"}
    assert model.param_names("decoder") == names_under(net, "up_projection.decode.0.", "up_projection.decode.1.")
    assert model.param_names("all") == set(dict(net.named_parameters()))
    assert model.n_selected("encoder+seg") == sum(p.numel() for n, p in net.named_parameters()
                                                  if not n.startswith(("up_projection.decode.0.",
                                                                       "up_projection.decode.1.")))
    assert model.module_names("blocks:1+seg") == ["down_projection", "eva.blocks.0", "up_projection.decode.2"]
    assert "Primus: 4 transformer blocks, 2 decoder stages, 6 blocks" in model.table("blocks:1-2")


@pytest.mark.parametrize("spec, message", [
    ("bottleneck", r"a Primus has no bottleneck .* name transformer blocks instead, e\.g\. blocks:4"),
    ("blocks:4a", r"a Primus has no bottleneck to split in halves"),
    ("blocks:7", r"block 7 .* out of range: valid range 1\.\.6 for this network \(Primus: transformer blocks "
                 r"1\.\.4, the patch embedding in block 1; decoder 5\.\.6\)"),
    ("first2", r"preset 'first2' is one of Amiri's strategies for a U-Net .* Select transformer blocks"),
    ("decoder:norm+decodr", r"unknown term 'decodr'.*did you mean 'decoder'.*a term is a group \(encoder, decoder, "
                            r"seg, all\) or 'blocks:'"),
])
def test_bad_specs_name_the_primus_layout(model, spec, message):
    with pytest.raises(SpecError, match=message):
        model.param_names(spec)


def test_a_u_net_only_question_on_primus_is_one_clear_error(model):
    with pytest.raises(ArchitectureError, match=r"a Primus has no U-Net stages"):
        model.n_stages


def test_kinds_of_linear_and_layernorm_layers(net, model):
    # independent enumeration: the modules' own classes
    norms, biases, kernels = set(), set(), set()
    for mname, m in net.named_modules():
        for local, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{local}" if mname else local
            if isinstance(m, (nn.LayerNorm, LayerNormNd)):
                norms.add(full)
            if local == "bias":
                biases.add(full)
            if local == "weight" and isinstance(m, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)):
                kernels.add(full)
    assert norms and any(".attn." not in n and ".norm1." in n for n in norms)
    assert any(n.startswith("up_projection.") for n in norms)  # LayerNormNd of the decoder counts
    assert model.param_names("all:norm") == norms
    assert model.param_names("all:bias") == biases
    enc_kernels = {n for n in kernels if not n.startswith("up_projection.")}
    assert model.param_names("encoder:kernel") == enc_kernels
    assert {n for n in enc_kernels if "eva." in n} == {n for n in enc_kernels if n.endswith(
        ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attn.proj.weight", "fc1_g.weight", "fc1_x.weight",
         "fc2.weight"))}


def test_the_plans_layout_is_the_networks():
    arch = primus_architecture(**PRIMUS)
    arch["network_class_name"] = "dynamic_network_architectures.architectures.primus.Primus"
    assert layout_from_architecture(arch) == BlockModel.from_network(primus()).layout
    four = primus_architecture(**{**PRIMUS, "patch_embed_size": (4, 4, 4)})
    assert layout_from_architecture(four) == BlockModel.from_network(primus(patch_embed_size=(4, 4, 4))).layout
    assert layout_from_architecture({"network_class_name": "x.Y", "arch_kwargs": {}}) is None
    assert parse_spec("blocks:1-3", Layout.transformer(4, 2)).blocks == frozenset({1, 2, 3})
