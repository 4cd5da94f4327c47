"""Block model and spec grammar on real dynamic-network-architectures U-Nets of 4, 5, 6 and 8 stages.

Expected parameter sets are computed here independently, from prefix rules on ``named_parameters()``,
and compared as sets (both differences printed on failure).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_transfer.blocks import (
    PRESETS,
    BlockModel,
    Selection,
    parse_spec,
    preset_names,
    resolve_spec,
    spec_blocks,
)
from nnunet_transfer.errors import ArchitectureError, SpecError
from nets import unet

CASES = [(arch, n) for arch in ("plain", "resenc") for n in (4, 5, 6, 8)]


def make_net(arch: str, n: int, *, dim: int | None = None, deep_supervision: bool = True) -> nn.Module:
    """A tiny network built the way nnU-Net's plans describe it (8 stages in 2-D to stay cheap)."""
    return unet(arch, n, dim=dim or (2 if n >= 8 else 3), deep_supervision=deep_supervision)


@functools.cache
def cached(arch: str, n: int) -> tuple[nn.Module, BlockModel]:
    net = make_net(arch, n)
    return net, BlockModel.from_network(net)


def expected_names(net: nn.Module, arch: str, n: int, blocks, seg: bool) -> set[str]:
    """Independent rule: encoder block k = encoder.stages.{k-1} (+ encoder.stem for ResEnc block 1),
    decoder block k = decoder.stages.{j} + decoder.transpconvs.{j} with j = k - n - 1; the bottleneck
    halves "Na" / "Nb" are its first ⌊c/2⌋ convs (PlainConvUNet: stages.{n-1}.0.convs.i) or residual
    blocks (stages.{n-1}.blocks.i) and the rest."""
    prefixes = []
    for k in blocks:
        if isinstance(k, str):  # a bottleneck half
            stage = net.encoder.stages[n - 1]
            units = [f"encoder.stages.{n - 1}.0.convs.{i}." for i in range(len(stage[0].convs))] \
                if arch == "plain" else [f"encoder.stages.{n - 1}.blocks.{i}." for i in range(len(stage.blocks))]
            cut = len(units) // 2
            prefixes += units[:cut] if k.endswith("a") else units[cut:]
        elif k <= n:
            prefixes.append(f"encoder.stages.{k - 1}.")
            if k == 1 and arch == "resenc":
                prefixes.append("encoder.stem.")
        else:
            prefixes += [f"decoder.stages.{k - n - 1}.", f"decoder.transpconvs.{k - n - 1}."]
    if seg:
        prefixes.append("decoder.seg_layers.")
    return {name for name, _ in net.named_parameters() if name.startswith(tuple(prefixes))} if prefixes \
        else set()


def assert_same_names(actual: set[str], expected: set[str]) -> None:
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    assert not missing and not extra, f"\nmissing (expected, not selected): {missing}\n" \
                                      f"extra (selected, not expected): {extra}"


def expected_preset(name: str, n: int) -> set[int]:
    top = 2 * n - 1
    enc, dec = set(range(1, n)), set(range(n + 1, top + 1))
    outer = {1, 2, top - 1, top}
    half = (n - 1 + 1) // 2  # the first half of the N-1 encoder blocks takes the odd one
    return {"whole": enc | {n} | dec, "contracting": enc | {f"{n}a"}, "expanding": {f"{n}b"} | dec,
            "exceptBottleneck": enc | dec, "bottleneck": {n}, "outer": outer, "inner": (enc | {n} | dec) - outer,
            "first": {1}, "last": {top}, "firstLast": {1, top}, "first2": set(range(1, half + 1)),
            "deepEncoder": set(range(half + 1, n))}[name]


def whole_blocks(units) -> set[int]:
    return {u for u in units if isinstance(u, int)}


# ---- block model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,n", CASES)
def test_blocks_partition_all_parameters(arch, n):
    net, model = cached(arch, n)
    assert model.n_stages == n and model.n_blocks == 2 * n - 1 and len(model.blocks) == 2 * n - 1
    all_names = set(dict(net.named_parameters()))
    assert len(model.all_param_names) == len(set(model.all_param_names)), "a parameter is in two blocks"
    assert_same_names(set(model.all_param_names), all_names)
    assert model.n_params == sum(p.numel() for p in net.parameters())
    for b in model.blocks:
        assert_same_names(set(b.param_names), expected_names(net, arch, n, [b.number], False))
        assert b.n_params == sum(dict(net.named_parameters())[x].numel() for x in b.param_names)
    assert_same_names(set(model.seg_param_names), expected_names(net, arch, n, [], True))


@pytest.mark.parametrize("arch,n", CASES)
def test_block_groups_depths_and_modules(arch, n):
    _, model = cached(arch, n)
    for b in model.blocks:
        k = b.number
        assert b.group == ("encoder" if k < n else "bottleneck" if k == n else "decoder")
        assert b.depth_scheme1 == k
        assert b.depth_scheme2 == (k if k <= n else 2 * n - k)
        assert b.resolution_level == model.blocks[2 * n - k - 1].resolution_level
    assert model.blocks[0].module_names == (("encoder.stem", "encoder.stages.0") if arch == "resenc"
                                            else ("encoder.stages.0",))
    assert model.block(n).output_module == f"encoder.stages.{n - 1}"
    assert model.block(n + 1).module_names == ("decoder.transpconvs.0", "decoder.stages.0")
    assert model.block(2 * n - 1).output_module == f"decoder.stages.{n - 2}"


@pytest.mark.parametrize("arch", ["plain", "resenc"])
def test_block_2n_minus_k_runs_at_the_resolution_of_block_k(arch):
    n = 5
    net = make_net(arch, n, dim=2)
    model = BlockModel.from_network(net)
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = [net.get_submodule(name).register_forward_hook(
        lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape[2:])))
        for k, name in model.output_modules("all").items()]
    with torch.no_grad():
        net(torch.zeros(1, 1, 32, 32))
    for h in hooks:
        h.remove()
    for k in range(1, 2 * n):
        assert shapes[k] == shapes[2 * n - k]
        level = model.block(k).resolution_level
        assert shapes[k] == (32 // 2 ** level,) * 2


def test_residual_unet_is_supported_too():
    from dynamic_network_architectures.architectures.unet import ResidualUNet

    kw = dict(_plain_kwargs(4), n_blocks_per_stage=1)
    del kw["n_conv_per_stage"]
    net = ResidualUNet(**kw)
    model = BlockModel.from_network(net)
    assert model.blocks[0].module_names == ("encoder.stem", "encoder.stages.0")
    for b in model.blocks:
        assert_same_names(set(b.param_names), expected_names(net, "resenc", 4, [b.number], False))
    assert_same_names(set(model.seg_param_names), expected_names(net, "resenc", 4, [], True))


def test_wrappers_are_removed_once():
    net, model = cached("plain", 4)
    compiled = torch.compile(net)  # lazy: nothing is compiled until a forward pass
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    assert BlockModel.from_network(compiled) == model
    assert resolve_spec(compiled, "encoder") == resolve_spec(net, "encoder")


def test_table_and_dict():
    _, model = cached("plain", 5)
    text = model.table("contracting+seg")
    lines = text.splitlines()
    assert lines[0].startswith("PlainConvUNet: N=5 stages, 9 blocks")
    assert "trains blocks 1-4 + 5a + seg" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line and not line.startswith("-")}
    assert rows["1"][-1] == "yes" and rows["4"][-1] == "yes" and rows["5"][-2:] == ["half", "5a"]
    assert rows["seg"][-1] == "yes"
    assert rows["6"][1] == "decoder" and "decoder.transpconvs.0" in rows["6"]
    data = model.to_dict("expanding")
    assert [r["trainable"] for r in data["blocks"]] == [False] * 5 + [True] * 4
    assert data["blocks"][4]["trainable_halves"] == ["5b"] and data["spec"]["halves"] == ["5b"]
    assert data["seg"]["trainable"] is False
    assert sum(r["fraction"] for r in data["blocks"]) + data["seg"]["fraction"] == pytest.approx(1.0)
    assert data["spec"]["n_trainable_params"] == (sum(r["n_params"] for r in data["blocks"][5:])
                                                  + data["blocks"][4]["halves"][1]["n_params"])
    json.dumps(data)
    assert "train" not in model.table().splitlines()[1]


# ---- presets and grammar ------------------------------------------------------------------------------

def test_preset_catalogue():
    assert preset_names() == ["whole", "contracting", "expanding", "exceptBottleneck", "bottleneck", "outer",
                              "inner", "first", "last", "firstLast", "first2", "deepEncoder"]
    assert [p.amiri for p in PRESETS.values()] == list(range(1, 13))
    assert all(name.isidentifier() for name in PRESETS)  # they become trainer class suffixes


PAPER_N5 = {"whole": set(range(1, 10)), "contracting": {1, 2, 3, 4, "5a"}, "expanding": {"5b", 6, 7, 8, 9},
            "exceptBottleneck": {1, 2, 3, 4, 6, 7, 8, 9}, "bottleneck": {5}, "outer": {1, 2, 8, 9},
            "inner": {3, 4, 5, 6, 7}, "first": {1}, "last": {9}, "firstLast": {1, 9}, "first2": {1, 2},
            "deepEncoder": {3, 4}}


@pytest.mark.parametrize("name", list(PAPER_N5))
def test_presets_for_the_papers_9_block_unet(name):
    sel = parse_spec(name, 5)
    assert set(sel.blocks) | set(sel.halves) == PAPER_N5[name]
    assert set(spec_blocks(name, 5)) == whole_blocks(PAPER_N5[name])


@pytest.mark.parametrize("arch,n", CASES)
@pytest.mark.parametrize("name", list(PAPER_N5))
def test_presets_resolve_to_parameter_sets(arch, n, name):
    net, model = cached(arch, n)
    blocks = expected_preset(name, n)
    assert set(spec_blocks(name, n)) == whole_blocks(blocks)
    assert_same_names(resolve_spec(model, name), expected_names(net, arch, n, blocks, False))
    assert_same_names(resolve_spec(net, name + "+seg"), expected_names(net, arch, n, blocks, True))


@pytest.mark.parametrize("arch,n", CASES)
@pytest.mark.parametrize("spec,blocks,seg", [
    ("encoder", lambda n: range(1, n + 1), False),
    ("decoder", lambda n: range(n + 1, 2 * n), False),
    ("bottleneck", lambda n: [n], False),
    ("seg", lambda n: [], True),
    ("all", lambda n: range(1, 2 * n), True),
    ("blocks:1,2,3-4", lambda n: [1, 2, 3, 4], False),
    (" Contracting + SEG ", lambda n: [*range(1, n), f"{n}a"], True),
    ("blocks:1," + "{n}b", None, False),
    ("first+last+blocks:2", lambda n: [1, 2, 2 * n - 1], False),
    ("encoder+decoder", lambda n: range(1, 2 * n), False),
])
def test_groups_and_terms(arch, n, spec, blocks, seg):
    net, model = cached(arch, n)
    if blocks is None:  # a spec naming a bottleneck half of this N
        spec, units = spec.format(n=n), [1, f"{n}b"]
    else:
        units = list(blocks(n))
    sel = model.select(spec)
    assert sel.blocks == frozenset(whole_blocks(units)) and sel.seg is seg
    assert sel.halves == frozenset(u for u in units if isinstance(u, str))
    assert_same_names(model.param_names(spec), expected_names(net, arch, n, units, seg))


@pytest.mark.parametrize("arch,n", CASES)
def test_bottleneck_halves_partition_the_bottleneck(arch, n):
    net, model = cached(arch, n)
    a, b = model.param_names(f"blocks:{n}a"), model.param_names(f"blocks:{n}b")
    assert a and b and not a & b
    assert_same_names(a | b, model.param_names("bottleneck"))
    both = model.select(f"blocks:{n}a,{n}b")  # both halves = the block
    assert (both.blocks, both.halves) == (frozenset({n}), frozenset())
    assert model.select(f"bottleneck+blocks:{n}a").halves == frozenset()
    assert_same_names(model.param_names("contracting") | model.param_names("expanding"),
                      model.param_names("all") - model.param_names("seg"))
    assert not model.param_names("contracting") & model.param_names("expanding")


# Amiri et al., Table II ("Fraction of total parameters"), for their 2-D U-Net (64…1024 features,
# two 3×3 convs per block, no normalisation, upsampling + 2×2 conv, a 1×1 output conv)
TABLE_II = {"whole": 1, "contracting": 0.303, "expanding": 0.697, "exceptBottleneck": 0.544,
            "bottleneck": 0.456, "outer": 0.032, "inner": 0.968, "first": 0.001, "last": 0.005,
            "firstLast": 0.006, "first2": 0.008, "deepEncoder": 0.142}
# ... and its "Number of parameters" row, at the two significant digits it prints
TABLE_II_COUNTS = {"whole": 3.1e7, "contracting": 9.4e6, "expanding": 2.2e7, "exceptBottleneck": 1.7e7,
                   "bottleneck": 1.4e7, "outer": 9.8e5, "inner": 3.0e7, "first": 3.8e4, "last": 1.4e5,
                   "firstLast": 1.8e5, "first2": 2.6e5, "deepEncoder": 4.4e6}


def papers_unet() -> nn.Module:
    """The paper's network as a dynamic-network-architectures PlainConvUNet: same convs and parameter
    counts (a 2×2 transposed conv has the parameters of their 2×2 conv after upsampling)."""
    return PlainConvUNet(input_channels=1, n_stages=5, features_per_stage=[64, 128, 256, 512, 1024],
                         conv_op=nn.Conv2d, kernel_sizes=3, strides=[1, 2, 2, 2, 2], n_conv_per_stage=2,
                         num_classes=1, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=None,
                         nonlin=nn.ReLU, deep_supervision=False)


def trained_by(trainer_class, net: nn.Module) -> set[str]:
    """The parameters a trainer leaves trainable on ``net``: its own ``_apply_trainable_spec`` (what
    ``configure_optimizers`` runs) with its class defaults, on a trainer whose nnU-Net ``__init__`` is not run
    (the freezing needs only the settings and the network)."""
    from nnunet_transfer.config import TransferConfig

    trainer = object.__new__(trainer_class)
    trainer.transfer_config = TransferConfig.from_mapping({}, defaults=trainer_class.transfer_defaults)
    trainer.network, trainer.transfer_state, trainer._freeze_report = net, {}, None
    trainer.pretrained_file = None  # no checkpoint file: every parameter counts as transferred
    trainable = trainer._apply_trainable_spec()
    assert set(trainable) == {n for n, p in net.named_parameters() if p.requires_grad}
    return set(trainable)


def test_presets_train_the_shares_of_amiris_table_ii():
    from nnunet_transfer.trainers.freezing import PRESET_TRAINERS

    model = BlockModel.from_network(papers_unet())
    assert model.n_params == pytest.approx(3.1e7, rel=0.01)  # "around 31 million parameters"
    assert set(PRESET_TRAINERS) == set(TABLE_II)
    for name, share in TABLE_II.items():
        # what the trainer trains, heads included: the paper's 1x1 output conv is part of block 9
        net = papers_unet()
        trained = trained_by(PRESET_TRAINERS[name], net)
        count = sum(p.numel() for n, p in net.named_parameters() if n in trained)
        assert float(f"{count:.1e}") == TABLE_II_COUNTS[name], (name, count)
        # the paper prints 3 decimals (±0.0005); the largest difference is deepEncoder's, 0.14260 for its 0.142
        # (its count, 4,425,216, is the paper's 4.4e6)
        assert count / model.n_params == pytest.approx(share, abs=0.00061), (name, count / model.n_params, share)
        heads = set(model.seg_param_names)
        assert (heads <= trained) is (9 in PRESETS[name].blocks(5)) and (heads & trained in (set(), heads)), name


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_preset_trainers_freeze_the_heads_exactly_when_they_leave_block_2n_minus_1_out(n):
    from nnunet_transfer.trainers.freezing import PRESET_TRAINERS

    for name, cls in PRESET_TRAINERS.items():
        keeps_last = 2 * n - 1 in PRESETS[name].blocks(n)
        assert cls.transfer_defaults == {"trainable": name, "heads": "by-name",
                                         **({} if keeps_last else {"freeze_seg": True})}, name
        net = make_net("plain", n, dim=2)
        trained = trained_by(cls, net)
        seg = set(BlockModel.from_network(net).seg_param_names)
        assert (seg <= trained if keeps_last else not seg & trained), name


@pytest.mark.parametrize("arch", ["plain", "resenc"])
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_presets_stay_in_the_parts_they_name(arch, n):
    net = make_net(arch, n, dim=2)
    model = BlockModel.from_network(net)
    encoder_path = {x for k in range(1, n) for x in model.block(k).param_names}  # blocks 1..N-1
    first_half, second_half = model.block(n).halves[0][2], model.block(n).halves[1][2]
    decoder = model.param_names("decoder")
    assert model.param_names("contracting") == encoder_path | set(first_half)
    assert model.param_names("expanding") == decoder | set(second_half)
    if n >= 4:
        a, b = model.param_names("first2"), model.param_names("deepEncoder")
        assert a and b and not a & b and a | b == encoder_path  # the two halves of the contracting path
        assert min(int(x.split(".")[2]) for x in b) == max(int(x.split(".")[2]) for x in a if
                                                            x.startswith("encoder.stages.")) + 1
        n_a = len(whole_blocks(parse_spec("first2", n).blocks))
        assert n_a == (n - 1 + 1) // 2 and n_a + len(parse_spec("deepEncoder", n).blocks) == n - 1
        assert model.param_names("outer") <= model.param_names("all") - model.param_names("bottleneck")
    for name in ("contracting", "first", "first2", "deepEncoder"):
        if n >= PRESETS[name].min_stages:
            assert model.param_names(name) <= model.param_names("encoder"), name
    for name in ("last",):
        assert model.param_names(name) <= decoder


def test_module_names_for_hooks():
    _, model = cached("resenc", 4)
    assert model.module_names("first+blocks:5+seg") == [
        "encoder.stem", "encoder.stages.0", "decoder.transpconvs.0", "decoder.stages.0",
        "decoder.seg_layers.0", "decoder.seg_layers.1", "decoder.seg_layers.2"]
    assert model.output_modules("firstLast") == {1: "encoder.stages.0", 7: "decoder.stages.2"}


@pytest.mark.parametrize("name,min_n", [("outer", 4), ("inner", 4), ("deepEncoder", 4), ("first2", 4)])
def test_degenerate_presets_are_refused(name, min_n):
    with pytest.raises(SpecError, match=rf"preset '{name}' .*needs a network with at least {min_n} "
                                        rf"stages.*this network has N={min_n - 1}.*valid range 1\.\."
                                        rf"{2 * min_n - 3}"):
        parse_spec(name, min_n - 1)
    assert set(spec_blocks(name, min_n)) == expected_preset(name, min_n)


@pytest.mark.parametrize("name", ["whole", "contracting", "expanding", "exceptBottleneck", "bottleneck",
                                  "first", "last", "firstLast"])
def test_other_presets_work_at_two_stages(name):
    sel = parse_spec(name, 2)
    assert set(sel.blocks) | set(sel.halves) == expected_preset(name, 2)


@pytest.mark.parametrize("spec,pattern", [
    ("blocks:10", r"block 10 in spec 'blocks:10' is out of range: valid range 1\.\.9 for this network "
                  r"\(N=5 stages: encoder 1\.\.4, bottleneck 5, decoder 6\.\.9\)"),
    ("blocks:0", r"block 0 .*valid range 1\.\.9"),
    ("blocks:8-12", r"block 12 .*valid range 1\.\.9"),
    ("blocks:3-1", r"malformed range '3-1'.*runs backwards; write 1-3"),
    ("blocks:1,,2", r"malformed term 'blocks:1,,2'.*without empty items"),
    ("blocks:", r"malformed term 'blocks:'"),
    ("blocks:a", r"malformed item 'a' in term 'blocks:a'.*block number"),
    ("blocks:1.5", r"malformed item '1\.5'"),
    ("blocks:3a", r"item '3a' in spec 'blocks:3a': only the bottleneck \(block 5 of this network\) has halves, "
                  r"5a and 5b"),
    ("encoder++seg", r"malformed spec 'encoder\+\+seg': empty term"),
    ("encoder+", r"empty term"),
    ("", r"the spec is empty and selects nothing; a term is a group \(encoder, bottleneck, decoder, seg, "
         r"all\), 'blocks:' with numbers and ranges in 1\.\.9"),
    ("   ", r"the spec is empty"),
    ("firstlst", r"unknown term 'firstlst' in spec 'firstlst' \(did you mean 'firstLast'\?\).*a preset "
                 r"\(whole, contracting, expanding, exceptBottleneck, bottleneck, outer, inner, first, "
                 r"last, firstLast, first2, deepEncoder\)"),
    ("encoders", r"did you mean 'encoder'"),
    ("3,4", r"unknown term '3,4'.*block numbers need the prefix: blocks:3,4"),
    ("xyz", r"unknown term 'xyz'.*a group \(encoder"),
])
def test_spec_errors(spec, pattern):
    _, model = cached("plain", 5)
    with pytest.raises(SpecError, match=pattern):
        model.param_names(spec)


def test_other_error_paths():
    _, model = cached("plain", 5)
    with pytest.raises(SpecError, match=r"a spec must be a string, got int"):
        parse_spec(5, 5)
    with pytest.raises(ValueError, match=r"n_stages must be an int >= 2, got 1"):
        parse_spec("all", 1)
    with pytest.raises(SpecError, match=r"block 10 is out of range: valid range 1\.\.9"):
        model.block(10)
    with pytest.raises(SpecError, match=r"parsed for N=4 stages; this network has N=5"):
        model.param_names(parse_spec("all", 4))
    empty = dataclasses.replace(model, blocks=tuple(dataclasses.replace(b, param_names=(), n_params=0)
                                                    for b in model.blocks))
    with pytest.raises(SpecError, match=r"spec 'first' \(blocks 1\) matches no parameter of this PlainConvUNet"):
        empty.param_names("first")
    assert isinstance(model.select("first"), Selection)


def test_unsupported_architectures():
    supported = r"supported: .*PlainConvUNet, .*ResidualEncoderUNet, .*ResidualUNet"
    with pytest.raises(ArchitectureError, match=r"torch\.nn\.modules\.linear\.Linear is not supported.*"
                                                + supported):
        BlockModel.from_network(nn.Linear(2, 2))

    class WithExtra(PlainConvUNet):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.extra = nn.Linear(2, 2)

    extra = WithExtra(**_plain_kwargs(4))
    with pytest.raises(ArchitectureError, match=r"WithExtra is not supported .*2 parameter\(s\) belong to "
                                                r"no block, e.g. \['extra.weight', 'extra.bias'\]"):
        BlockModel.from_network(extra)


def _plain_kwargs(n: int) -> dict:
    return dict(input_channels=1, n_stages=n, features_per_stage=[4, 8, 16, 32][:n], conv_op=nn.Conv3d,
                kernel_sizes=3, strides=[1] + [2] * (n - 1), n_conv_per_stage=1, num_classes=2,
                n_conv_per_stage_decoder=1)


# ---- command line -------------------------------------------------------------------------------------

ARCH_KWARGS = {
    "n_stages": 4, "features_per_stage": [4, 8, 16, 32],
    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """A preprocessed folder holding plans in nnU-Net 2.8's layout (ExperimentPlanner) and a dataset.json."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset901_Tiny"
    folder.mkdir()
    plans = {
        "dataset_name": "Dataset901_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [32, 32, 32], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [32, 32, 32], "median_image_size_in_voxels": [32, 32, 32],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": ARCH_KWARGS,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "median": 0.0,
                                                              "min": -1.0, "max": 1.0,
                                                              "percentile_99_5": 1.0,
                                                              "percentile_00_5": -1.0}},
    }
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumor": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    return tmp_path


def _main(monkeypatch, argv):
    from nnunet_transfer.cli import main as cli_main

    assert "blocks" in cli_main.SUBCOMMANDS
    # Only this subcommand: the test must not depend on the other subcommand modules.
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", ["blocks"])
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help text at the terminal width
    return cli_main.main(argv)


def test_cli_help_lists_every_preset(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _main(monkeypatch, ["blocks", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(re.search(rf"\b{name}\b", help_text) for name in [*preset_names(), "blocks:1,2,8-9"])


def test_cli_table(nnunet_env, monkeypatch, capsys):
    assert _main(monkeypatch, ["blocks", "-d", "901", "-c", "3d_fullres", "--spec", "contracting+seg"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Dataset901_Tiny / nnUNetPlans / 3d_fullres"
    assert out.splitlines()[1].startswith("PlainConvUNet: N=4 stages, 7 blocks")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[4:] if not line.startswith("-")}
    assert [rows[str(k)][-1] for k in range(1, 8)] == ["yes"] * 3 + ["4a"] + ["-"] * 3
    assert rows["seg"][-1] == "yes"
    assert re.search(r"^4 +bottleneck +encoder\.stages\.3 ", out, re.M)


def test_cli_json_matches_an_independently_built_network(nnunet_env, monkeypatch, capsys):
    assert _main(monkeypatch, ["blocks", "-d", "Dataset901_Tiny", "-c", "3d_fullres", "--json",
                               "--spec", "blocks:1,7"]) == 0
    data = json.loads(capsys.readouterr().out)
    kw = dict(ARCH_KWARGS, conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU, dropout_op=None)
    ref = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=True, **kw)
    assert data["n_params"] == sum(p.numel() for p in ref.parameters())
    assert data["n_blocks"] == 7 and data["configuration"] == "3d_fullres"
    assert [r["trainable"] for r in data["blocks"]] == [True] + [False] * 5 + [True]
    assert data["spec"]["blocks"] == [1, 7] and data["spec"]["seg"] is False
    names = {n for r in data["blocks"] for n in r["param_names"]} | set(data["seg"]["param_names"])
    assert_same_names(names, set(dict(ref.named_parameters())))


@pytest.mark.parametrize("trainer,expected,seg", [
    # Amiri's output layer is part of block 2N-1: a preset with it trains the heads, one without keeps them frozen
    ("nnUNetTrainerPartialFT_exceptBottleneck", ["yes"] * 3 + ["-"] + ["yes"] * 3, "yes"),
    ("nnUNetTrainerPartialFT_contracting", ["yes"] * 3 + ["4a"] + ["-"] * 3, "-"),
    ("nnUNetTrainerFrozenDecoderAndHeads", ["yes"] * 4 + ["-"] * 3, "-"),
])
def test_cli_table_of_a_trainer_marks_the_heads_as_it_trains_them(nnunet_env, monkeypatch, capsys, trainer,
                                                                 expected, seg):
    assert _main(monkeypatch, ["blocks", "-d", "901", "-c", "3d_fullres", "-tr", trainer]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[5:] if not line.startswith("-")}
    assert [rows[str(k)][-1] for k in range(1, 8)] == expected
    assert rows["seg"][-1] == seg
    assert out.splitlines()[1].startswith(f"{trainer} trains ")


@pytest.mark.parametrize("argv,pattern", [
    (["-tr", "nnUNetTrainerL2SP"], r"^nnunet_transfer blocks: error: -tr nnUNetTrainerL2SP: this trainer freezes no "
                                   r"blocks by default .*--spec instead"),
    (["-tr", "nnUNetTrainerNope"], r"^nnunet_transfer blocks: error: -tr nnUNetTrainerNope: not a trainer of "
                                   r"nnunet_transfer"),
    (["--spec", "outer+blocks:99"], r"^nnunet_transfer blocks: error: block 99 .*valid range 1\.\.7"),
    (["--spec", "nope"], r"^nnunet_transfer blocks: error: unknown term 'nope'"),
])
def test_cli_errors_are_one_line(nnunet_env, monkeypatch, capsys, argv, pattern):
    assert _main(monkeypatch, ["blocks", "-d", "901", "-c", "3d_fullres", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err


def test_cli_unknown_configuration(nnunet_env, monkeypatch, capsys):
    assert _main(monkeypatch, ["blocks", "-d", "901", "-c", "2d"]) == 2
    assert "configuration '2d' is not in plans" in capsys.readouterr().err
