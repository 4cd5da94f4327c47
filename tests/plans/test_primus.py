"""Primus weights onto a target Primus: the positional embedding resized as nnU-Net master resizes it, the input
projection repeated over channels / C, the decoder and heads kept; a Primus plans configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from nets import primus
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.plans.primus import (add_primus_configuration, interpolate_pos_embed, map_primus_state,
                                          primus_architecture, token_grid)

torch.set_num_threads(1)
DATA = Path(__file__).parents[1] / "data"


def master_interpolate_pos_embed(pretrained_pos_embed, *, pretrained_patch, patch, patch_embed_size):
    """nnU-Net master's ``handle_pos_embed_resize(..., "interpolate_trilinear", ...)`` with its
    ``interpolate_patch_embed_3d`` (nnunetv2/utilities/load_weights_utils.py, MIC-DKFZ/nnUNet master), restated
    line by line for a network without a cls token (a Primus)."""
    in_shape = dict(zip("xyz", [int(d / p) for d, p in zip(pretrained_patch, patch_embed_size)]))
    out_shape = dict(zip("xyz", [int(d / p) for d, p in zip(patch, patch_embed_size)]))
    patch_embed = pretrained_pos_embed.permute(0, 2, 1)
    patch_embed = rearrange(patch_embed, "B C (x y z) -> B C x y z", **in_shape)
    patch_embed = F.interpolate(patch_embed, size=list(out_shape.values()), mode="trilinear", align_corners=False)
    patch_embed = rearrange(patch_embed, "B C x y z -> B C (x y z)", **out_shape)
    return patch_embed.permute(0, 2, 1)


@pytest.mark.parametrize("source_patch, target_patch", [((32, 32, 32), (16, 16, 16)), ((16, 16, 16), (32, 48, 24)),
                                                        ((64, 32, 16), (32, 32, 32))])
def test_pos_embed_interpolation_is_nnunet_masters(source_patch, target_patch):
    g = torch.Generator().manual_seed(0)
    src_grid, tgt_grid = token_grid(source_patch, (8, 8, 8)), token_grid(target_patch, (8, 8, 8))
    pos = torch.randn(1, int(torch.tensor(src_grid).prod()), 12, generator=g)
    ours = interpolate_pos_embed(pos, source_grid=src_grid, target_grid=tgt_grid)
    ref = master_interpolate_pos_embed(pos, pretrained_patch=source_patch, patch=target_patch,
                                       patch_embed_size=(8, 8, 8))
    assert ours.shape == ref.shape == (1, int(torch.tensor(tgt_grid).prod()), 12)
    assert torch.equal(ours, ref)
    # register-token rows stay, the grid rows are the same interpolation
    prefixed = torch.cat([torch.full((1, 2, 12), 7.0), pos], dim=1)
    out = interpolate_pos_embed(prefixed, source_grid=src_grid, target_grid=tgt_grid, n_prefix=2)
    assert torch.equal(out[:, :2], prefixed[:, :2]) and torch.equal(out[:, 2:], ref)
    assert interpolate_pos_embed(pos, source_grid=src_grid, target_grid=src_grid) is pos


def test_a_constant_embedding_stays_constant_and_shapes_are_checked():
    pos = torch.ones(1, 8, 4)
    assert torch.allclose(interpolate_pos_embed(pos, source_grid=(2, 2, 2), target_grid=(3, 4, 5)), torch.ones(1, 60, 4))
    with pytest.raises(DataError, match=r"positional embedding of shape \(1, 8, 4\) does not hold 0 prefix \+ 27"):
        interpolate_pos_embed(pos, source_grid=(3, 3, 3), target_grid=(2, 2, 2))
    with pytest.raises(ConfigError, match=r"patch size \[20, 16, 16\] is not a multiple of the patch embedding"):
        token_grid((20, 16, 16), (8, 8, 8))


def test_map_takes_stem_and_encoder_and_keeps_decoder_and_heads():
    # a 1-channel pretraining Primus (a reconstruction head: 1 output) on 32³, the target: 2 channels, 16³
    source = primus(seed=1, input_shape=(32, 32, 32), num_classes=1).state_dict()
    target_net = primus(seed=2, input_channels=2)
    target = target_net.state_dict()
    m = map_primus_state(source, target, source_patch_size=(32, 32, 32), target_patch_size=(16, 16, 16),
                         patch_embed_size=(8, 8, 8))
    out = m.state
    w = source["down_projection.proj.weight"]
    assert torch.equal(out["down_projection.proj.weight"], torch.cat([w, w], dim=1) / 2)
    assert torch.equal(out["down_projection.proj.bias"], source["down_projection.proj.bias"])
    want_pos = master_interpolate_pos_embed(source["eva.pos_embed"], pretrained_patch=(32, 32, 32),
                                            patch=(16, 16, 16), patch_embed_size=(8, 8, 8))
    assert torch.equal(out["eva.pos_embed"], want_pos)
    eva = [k for k in target if k.startswith("eva.") and k != "eva.pos_embed"]
    assert eva and all(torch.equal(out[k], source[k]) for k in eva)
    dec = [k for k in target if k.startswith("up_projection.")]
    assert dec and all(torch.equal(out[k], target[k]) for k in dec)
    # the decoder, the heads and Primus' mask-token buffer (zeros; master loads it neither) stay the target's
    assert set(m.fresh) == set(dec) | {"mask_token"} and set(m.from_checkpoint) == set(target) - set(m.fresh)
    assert any("repeated over 2 channels / 2" in n for n in m.notes)
    assert any("interpolated (trilinear) from the token grid [4, 4, 4] to [2, 2, 2]" in n for n in m.notes)
    target_net.load_state_dict(out)  # a complete state dict of the target
    # C copies of one image give the pretrained stem's response
    x = torch.randn(1, 1, 16, 16, 16)
    one = primus(input_shape=(16, 16, 16))
    one.down_projection.load_state_dict({"proj.weight": w, "proj.bias": source["down_projection.proj.bias"]})
    with torch.no_grad():
        assert torch.allclose(target_net.down_projection(x.repeat(1, 2, 1, 1, 1)), one.down_projection(x), atol=1e-5)


def test_map_refuses_what_does_not_fit():
    target = primus(seed=2).state_dict()
    kw = dict(source_patch_size=(16, 16, 16), target_patch_size=(16, 16, 16), patch_embed_size=(8, 8, 8))
    with pytest.raises(DataError, match=r"the checkpoint has no 'down_projection' tensors .* keys start with "
                                        r"\['decoder', 'encoder'\]"):
        map_primus_state({"encoder.stem.w": torch.zeros(1), "decoder.x": torch.zeros(1)}, target, **kw)
    wider = primus(seed=1, embed_dim=96).state_dict()
    with pytest.raises(DataError, match=r"does not fit the target's down_projection\.proj\.weight"):
        map_primus_state(wider, target, **kw)
    deeper = primus(seed=1, eva_depth=5).state_dict()
    with pytest.raises(DataError, match=r"eva\.blocks\.4\.\S+ has no place in the target Primus"):
        map_primus_state(deeper, target, **kw)
    shallower = primus(seed=1, eva_depth=3).state_dict()
    with pytest.raises(DataError, match=r"the checkpoint lacks \d+ tensor\(s\) of the target's stem/encoder, e\.g\. "
                                        r"\['eva\.blocks\.3\."):
        map_primus_state(shallower, target, **kw)


def test_primus_configuration_in_plans():
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    arch = primus_architecture(embed_dim=48, eva_depth=4, eva_numheads=2, patch_embed_size=(8, 8, 8))
    out = add_primus_configuration(plans, base="3d_fullres", new="primus", architecture=arch, patch=(16, 16, 16),
                                   batch_size=2, settings={"trainable": "blocks:3-4+decoder"})
    conf = out["configurations"]["primus"]
    assert conf["inherits_from"] == "3d_fullres" and conf["patch_size"] == [16, 16, 16] and conf["batch_size"] == 2
    assert conf["architecture"]["network_class_name"].endswith(".primus.Primus")
    assert "primus" not in plans["configurations"]  # a copy
    with pytest.raises(ConfigError, match=r"setting 'trainable' of configuration 'p2' \(4 transformer blocks, 2 "
                                          r"decoder stages\): block 7 .* out of range"):
        add_primus_configuration(plans, base="3d_fullres", new="p2", architecture=arch, patch=(16, 16, 16),
                                 settings={"trainable": "blocks:7"})
    with pytest.raises(ConfigError, match=r"not a multiple of the patch embedding"):
        add_primus_configuration(plans, base="3d_fullres", new="p3", architecture=arch, patch=(20, 16, 16))
    with pytest.raises(ConfigError, match=r"embed_dim 48 is not divisible by eva_numheads 5"):
        primus_architecture(embed_dim=48, eva_depth=4, eva_numheads=5, patch_embed_size=(8, 8, 8))
