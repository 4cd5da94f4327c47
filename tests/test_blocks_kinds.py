"""Parameter kinds in the block spec (``all:norm``, ``all:bias``, ``encoder:kernel``) on real
dynamic-network-architectures U-Nets. Expected sets come from module types and attribute names here,
independently of the block model, and are compared as sets."""
from __future__ import annotations

import json

import pytest
from torch import nn

from nets import unet
from nnunet_transfer.blocks import KINDS, BlockModel, KindPart, parse_spec
from nnunet_transfer.errors import SpecError

NORMS = (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.BatchNorm3d, nn.BatchNorm2d)
CONVS = (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d)


def expected(net: nn.Module, kind: str, prefixes: tuple[str, ...]) -> set[str]:
    """Independent rule over the canonical names (aliases skipped by named_parameters)."""
    owner = {}
    for mname, m in net.named_modules(remove_duplicate=False):
        for local, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (m, local))
    out = set()
    for name, p in net.named_parameters():
        m, local = owner[id(p)]
        ok = {"norm": isinstance(m, NORMS), "bias": local == "bias",
              "kernel": local == "weight" and isinstance(m, CONVS)}[kind]
        if ok and name.startswith(prefixes):
            out.add(name)
    return out


def assert_same(actual: set[str], want: set[str]) -> None:
    missing, extra = sorted(want - actual), sorted(actual - want)
    assert not missing and not extra, f"\nmissing: {missing}\nextra: {extra}"


ALL = ("encoder.", "decoder.stages.", "decoder.transpconvs.", "decoder.seg_layers.")
ENCODER = ("encoder.",)
SEG = ("decoder.seg_layers.",)


@pytest.mark.parametrize("arch", ["plain", "resenc"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kinds_select_exactly_their_parameters(arch, kind):
    net = unet(arch, 4, seed=0)
    model = BlockModel.from_network(net)
    assert_same(model.param_names(f"all:{kind}"), expected(net, kind, ALL))
    assert_same(model.param_names(f"encoder:{kind}"), expected(net, kind, ENCODER))


@pytest.mark.parametrize("arch", ["plain", "resenc"])
def test_norm_only_and_bitfit_specs(arch):
    net = unet(arch, 4, seed=0)
    model = BlockModel.from_network(net)
    seg = {n for n, _ in net.named_parameters() if n.startswith(SEG)}
    assert_same(model.param_names("all:norm+seg"), expected(net, "norm", ALL) | seg)
    assert_same(model.param_names("all:bias+seg"), expected(net, "bias", ALL) | seg)
    both = model.param_names("all:norm,bias")
    assert_same(both, expected(net, "norm", ALL) | expected(net, "bias", ALL))
    # a kind of a unit that is also selected whole adds nothing; counts agree with the names
    assert model.param_names("decoder+decoder:norm") == model.param_names("decoder")
    sizes = dict((n, p.numel()) for n, p in net.named_parameters())
    for spec in ("all:norm+seg", "all:bias+seg", "encoder:kernel+seg", "contracting:norm+blocks:1"):
        assert model.n_selected(spec) == sum(sizes[n] for n in model.param_names(spec)), spec


def test_kinds_inside_block_lists_presets_and_halves():
    net = unet("plain", 5, seed=0)
    model = BlockModel.from_network(net)
    assert_same(model.param_names("blocks:1,9:kernel"),
                expected(net, "kernel", ("encoder.stages.0.", "decoder.stages.3.", "decoder.transpconvs.3.")))
    half = model.block(5).half("5a")[2]
    assert_same(model.param_names("blocks:5a:bias"), {n for n in half if n.endswith(".bias")})
    assert_same(model.param_names("contracting:norm"),
                expected(net, "norm", tuple(f"encoder.stages.{i}." for i in range(4)))
                | {n for n in half if ".norm." in n})


@pytest.mark.parametrize("spec, blocks, seg, parts", [
    ("all:norm+seg", set(), True, (KindPart("norm", frozenset(range(1, 8)), frozenset(), False),)),
    ("all:norm", set(), False, (KindPart("norm", frozenset(range(1, 8)), frozenset(), True),)),
    ("encoder+all:bias", {1, 2, 3, 4}, False, (KindPart("bias", frozenset({5, 6, 7}), frozenset(), True),)),
    ("all:norm+all", set(range(1, 8)), True, ()),
    ("blocks:1:Norms,Kernels", set(), False, (KindPart("norm", frozenset({1}), frozenset(), False),
                                               KindPart("kernel", frozenset({1}), frozenset(), False))),
])
def test_parse(spec, blocks, seg, parts):
    sel = parse_spec(spec, 4)
    assert (set(sel.blocks), sel.seg, sel.parts) == (blocks, seg, parts)


def test_describe_table_and_dict_show_the_counts():
    net = unet("plain", 4, seed=0)
    model = BlockModel.from_network(net)
    sel = model.select("all:norm+seg")
    assert sel.describe() == "seg + norm of blocks 1-7"
    lines = model.table("all:norm+seg").splitlines()
    assert "trains seg + norm of blocks 1-7" in lines[0]
    rows = {ln.split()[0]: ln for ln in lines[3:] if ln and not ln.startswith("-")}
    norms1 = sum(p.numel() for n, p in net.named_parameters() if n.startswith("encoder.stages.0.") and ".norm." in n)
    assert rows["1"].rstrip().endswith(f"norm: {norms1:,}")
    assert rows["seg"].rstrip().endswith("yes")
    n_train = model.n_selected("all:norm+seg")
    assert rows["total"].rstrip().endswith(f"{n_train:,} ({100 * n_train / model.n_params:.2f}%)")
    data = model.to_dict("all:bias")
    assert data["spec"]["kinds"] == [{"kind": "bias", "blocks": list(range(1, 8)), "halves": [], "seg": True}]
    assert data["blocks"][0]["trainable_kinds"] == ["bias"] and data["blocks"][0]["trainable"] is False
    assert data["blocks"][0]["n_selected"] == sum(p.numel() for n, p in net.named_parameters()
                                                  if n.startswith("encoder.stages.0.") and n.endswith(".bias"))
    assert data["seg"]["trainable_kinds"] == ["bias"]
    assert data["spec"]["n_trainable_params"] == model.n_selected("all:bias")
    json.dumps(data)


@pytest.mark.parametrize("spec, pattern", [
    ("all:nrm", r"unknown parameter kind 'nrm' in term 'all:nrm' of spec 'all:nrm' \(did you mean 'norm'\?\); "
                r"kinds: norm \(weight and bias of normalisation layers\), bias"),
    ("all:", r"unknown parameter kind ''"),
    ("seg:norm", r"spec 'seg:norm': norm of seg matches no parameter of this PlainConvUNet \(it has no norm "
                 r"parameters there"),
    ("blocks:1:norm:bias", r"unknown parameter kind 'norm:bias'.*join several with ','"),
    ("blokcs:1:norm", r"unknown term 'blokcs:1:norm' in spec 'blokcs:1:norm' \(did you mean 'blocks:'\?\)"),
])
def test_kind_errors(spec, pattern):
    with pytest.raises(SpecError, match=pattern):
        BlockModel.from_network(unet("plain", 4)).param_names(spec)


def test_modules_and_layers_refuse_kinds():
    model = BlockModel.from_network(unet("plain", 4))
    with pytest.raises(SpecError, match=r"spec 'encoder:norm' narrows terms to parameter kinds \(norm\), which "
                                        r"select parameters, not modules; a layer's output has no kind"):
        model.output_modules("encoder:norm")
    with pytest.raises(SpecError, match=r"not modules"):
        model.module_names("all:bias")
    assert model.output_modules("encoder+blocks:1") == model.output_modules("encoder")


def test_analyze_layer_spec_with_a_kind_is_one_clear_error():
    from nnunet_transfer.analysis.activations import select_layers

    with pytest.raises(SpecError, match=r"a layer's output has no kind: name whole blocks \(drop the ':kind'\)"):
        select_layers(BlockModel.from_network(unet("plain", 4)), "blocks:1,7:norm")


def test_conv_bias_false_has_no_conv_biases():
    net = unet("plain", 3, arch_kwargs={"conv_bias": False})
    model = BlockModel.from_network(net)
    assert all(".norm." in n or ".seg_layers." in n for n in model.param_names("all:bias"))
    assert_same(model.param_names("all:bias"), expected(net, "bias", ALL))
