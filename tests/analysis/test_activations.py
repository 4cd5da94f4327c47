"""Activation sampling on a tiny nnU-Net network and a toy preprocessed tree (no training).

The toy tree is what nnU-Net would hold for a planned and preprocessed dataset: plans with a tiny
configuration (features 8-16-32, patch 32³), dataset.json and three cases written by nnU-Net's own
dataset class (one smaller than the patch along z, so padding is exercised).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nets import plans_network
from nnunet_transfer.analysis import PairMoments, SimilarityWarning, similarity
from nnunet_transfer.analysis.activations import (
    Layer,
    PatchSource,
    accumulate_pairs,
    default_layer_blocks,
    hooked,
    layer_modules,
    pair_results,
    plan_sampling,
    preprocessed_folder,
    probe_layers,
    sampled_activations,
    select_layers,
    voxel_indices,
)
from nnunet_transfer.analysis.runs import compare_state, convergence_epoch, load_into, resolve_network
from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.errors import ArchitectureError, DataError, SpecError
from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.training.snapshots import save_snapshot

DATA = Path(__file__).resolve().parents[1] / "data"
TOY = "Dataset990_Toy"
TINY = "tiny"
CASE_SHAPES = [(40, 36, 44), (20, 40, 40), (36, 36, 36)]


def toy_plans(features: str = "8,16,32") -> dict:
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    plans = add_configuration(plans, base="3d_fullres", new=TINY, features=features, patch="32,32,32")
    plans["dataset_name"] = TOY
    return plans


def dataset_json() -> dict:
    return json.loads((DATA / "dataset_ct2labels.json").read_text())


def tiny_network(seed: int, features: str = "8,16,32") -> torch.nn.Module:
    return plans_network(toy_plans(features), TINY, dataset_json(), seed=seed, deep_supervision=False).eval()


def build_toy_tree(root: Path) -> dict[str, Path]:
    """nnUNet_raw/preprocessed/results under ``root`` with Dataset990_Toy preprocessed as .npz."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    env = {v: root / s for v, s in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                    ("nnUNet_results", "results"))}
    for p in env.values():
        p.mkdir(parents=True, exist_ok=True)
    pre = env["nnUNet_preprocessed"] / TOY
    folder = pre / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(toy_plans(), indent=1))
    (pre / "dataset.json").write_text(json.dumps(dataset_json()))
    rng = np.random.default_rng(0)
    for i, shape in enumerate(CASE_SHAPES):
        z = np.indices(shape).sum(0) / 20.0
        data = (np.sin(z)[None] + 0.5 * rng.standard_normal((1, *shape))).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int8)
        seg[0, 5:12, 8:20, 10:22] = 1
        seg[0, 7:9, 10:12, 12:14] = 2
        props = {"class_locations": {c: np.argwhere(seg == c) for c in (1, 2)}}
        nnUNetDatasetNumpy.save_case(data, seg, props, str(folder / f"case_{i:03d}"))
    return env


@pytest.fixture(scope="session")
def toy_tree(tmp_path_factory) -> dict[str, Path]:
    return build_toy_tree(tmp_path_factory.mktemp("toy_nnunet"))


@pytest.fixture
def toy_env(toy_tree, monkeypatch) -> dict[str, Path]:
    for var, path in toy_tree.items():
        monkeypatch.setenv(var, str(path))
    return toy_tree


@pytest.fixture(scope="module")
def net():
    return tiny_network(0)


@pytest.fixture(scope="module")
def model(net):
    return BlockModel.from_network(net)


def source(env, **kw) -> PatchSource:
    return PatchSource(env["nnUNet_preprocessed"] / TOY / "nnUNetPlans_3d_fullres", (32, 32, 32), **kw)


def all_hooks(network) -> int:
    return sum(len(m._forward_hooks) for m in network.modules())


# --------------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("n, expected", [(2, [1, 3]), (3, [1, 2, 4, 5]), (4, [1, 2, 3, 5, 6, 7]),
                                         (5, [1, 3, 4, 6, 7, 9]), (6, [1, 3, 5, 7, 9, 11]),
                                         (7, [1, 4, 6, 8, 10, 13])])
def test_default_layers_are_three_encoder_levels_and_their_mirrors(n, expected):
    blocks = default_layer_blocks(n)
    assert blocks == expected
    enc = [b for b in blocks if b < n]
    assert sorted(2 * n - b for b in enc) == [b for b in blocks if b > n]


def test_select_layers_default_and_spec(model):
    layers = select_layers(model)
    assert [l.name for l in layers] == ["block1", "block2", "block4", "block5"]
    assert [l.module for l in layers] == ["encoder.stages.0", "encoder.stages.1", "decoder.stages.0",
                                          "decoder.stages.1"]
    assert [l.level for l in layers] == [0, 1, 1, 0]
    seg = select_layers(model, "bottleneck+seg")
    assert [(l.name, l.module) for l in seg] == [("block3", "encoder.stages.2"), ("seg", "decoder.seg_layers.1")]
    with pytest.raises(SpecError, match="unknown term 'foo'"):
        select_layers(model, "foo")
    with pytest.raises(SpecError, match="out of range"):
        select_layers(model, "blocks:9")


def test_probe_gives_channels_and_grid(net, model):
    shapes = probe_layers(net, select_layers(model, "all"), (1, 32, 32, 32))
    assert shapes == {"block1": (8, (32, 32, 32)), "block2": (16, (16, 16, 16)), "block3": (32, (8, 8, 8)),
                      "block4": (16, (16, 16, 16)), "block5": (8, (32, 32, 32)), "seg": (3, (32, 32, 32))}
    assert all_hooks(net) == 0


# --------------------------------------------------------------------------------------------------
# sampling plan


def test_plan_auto_reaches_100_samples_per_channel():
    shapes = {"a": (8, (32, 32, 32)), "b": (32, (8, 8, 8))}
    plan = plan_sampling(shapes, voxels_per_patch=512)
    assert plan.auto and plan.patches == 16  # b: 3200 samples / 512 voxels -> 7, the minimum 16 wins
    plan = plan_sampling({"b": (320, (4, 4, 4))}, voxels_per_patch=512)
    assert plan.patches == 500 and plan.samples == {"b": 32000}


def test_plan_warns_once_and_refuses_too_few():
    with pytest.warns(SimilarityWarning, match=r"fewer than 100x channels samples \(a 320 < 800\)"):
        plan_sampling({"a": (8, (32, 32, 32))}, patches=4, voxels_per_patch=80)
    with pytest.raises(DataError, match="too few samples: layer a would get 8 samples for 8 channels"):
        plan_sampling({"a": (8, (32, 32, 32))}, patches=1, voxels_per_patch=8)


# --------------------------------------------------------------------------------------------------
# patches and voxels


def test_voxel_indices_depend_only_on_seed_patch_and_grid():
    a = voxel_indices((16, 16, 16), 100, seed=0, patch_index=3)
    assert len(np.unique(a)) == 100 and (np.diff(a) > 0).all() and a.max() < 16**3
    assert np.array_equal(a, voxel_indices((16, 16, 16), 100, seed=0, patch_index=3))
    assert not np.array_equal(a, voxel_indices((16, 16, 16), 100, seed=0, patch_index=4))
    assert not np.array_equal(a, voxel_indices((16, 16, 16), 100, seed=1, patch_index=3))
    assert np.array_equal(voxel_indices((4, 4, 4), 512, seed=0, patch_index=0), np.arange(64))


def test_patches_are_deterministic_padded_and_foreground_centred(toy_env):
    src = source(toy_env, seed=0)
    assert src.cases == ["case_000", "case_001", "case_002"] and src.n_channels == 1
    p = [src.patch(i) for i in range(6)]
    assert all(x.shape == (1, 32, 32, 32) and x.dtype == np.float32 for x in p)
    again = source(toy_env, seed=0)
    assert all(np.array_equal(again.patch(i), p[i]) for i in range(6))
    assert not np.array_equal(source(toy_env, seed=1).patch(0), p[0])
    # case_001 is 20 voxels along z: its patches are padded with zeros, half on each side
    small = next(i for i in range(50) if src.location(i).case == "case_001")
    loc = src.location(small)
    assert loc.bbox[0] == (-6, 26)
    assert (src.patch(small)[:, :6] == 0).all() and (src.patch(small)[:, -6:] == 0).all()
    fg = source(toy_env, seed=0, foreground=1.0)
    for i in range(4):
        loc = fg.location(i)
        assert loc.foreground
        (z0, _), (y0, _), (x0, _) = loc.bbox
        # the foreground box 5:12, 8:20, 10:22 intersects the patch
        assert z0 < 12 and z0 + 32 > 5 and y0 < 20 and y0 + 32 > 8 and x0 < 22 and x0 + 32 > 10
    with pytest.raises(DataError, match=r"case\(s\) \['nope'\] not in"):
        source(toy_env, cases=["nope"])
    # uniform locations by default (Karimi et al.: "random locations"); nnU-Net's 0.33 one argument away
    assert not any(src.location(i).foreground for i in range(30))
    assert 3 <= sum(source(toy_env, seed=0, foreground=0.33).location(i).foreground for i in range(30)) <= 18


def test_missing_and_empty_preprocessed_folder(toy_env):
    with pytest.raises(DataError, match="preprocessed folder .*nnUNetPlans_2d does not exist; run nnUNetv2_preprocess"):
        preprocessed_folder(TOY, "nnUNetPlans_2d")
    (toy_env["nnUNet_preprocessed"] / TOY / "empty_id").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=r"holds no cases \(\*\.b2nd or \*\.npz\)"):
        preprocessed_folder(TOY, "empty_id")


# --------------------------------------------------------------------------------------------------
# hooks and streaming


def test_hooks_removed_after_errors(net, model, toy_env):
    layers = select_layers(model, "all")
    with pytest.raises(RuntimeError):
        with hooked(layer_modules(net, layers), lambda k, o: None):
            assert all_hooks(net) == len(layers)
            net(torch.zeros(1, 5, 32, 32, 32))  # wrong number of input channels
    assert all_hooks(net) == 0

    class Broken(PatchSource):
        def batch(self, indices):
            if indices[0] >= 2:
                raise OSError("disk gone")
            return super().batch(indices)

    src = Broken(toy_env["nnUNet_preprocessed"] / TOY / "nnUNetPlans_3d_fullres", (32, 32, 32))
    with pytest.warns(SimilarityWarning):
        plan = plan_sampling(probe_layers(net, layers, (1, 32, 32, 32)), patches=4, voxels_per_patch=64)
    with pytest.raises(OSError, match="disk gone"):
        accumulate_pairs([net, net], [(0, 1)], layers, src, plan, chunk_patches=1)
    assert all_hooks(net) == 0
    stream = sampled_activations([net], layers, source(toy_env), plan, chunk_patches=1)
    next(stream)
    assert all_hooks(net) == len(layers)
    stream.close()  # a consumer that stops early
    assert all_hooks(net) == 0


def _dense_rows(network, layer: Layer, src: PatchSource, patches: int, k: int, seed: int) -> torch.Tensor:
    """Independent path: whole feature maps of each patch, then the sampled voxels by index."""
    rows = []
    for p in range(patches):
        maps = {}
        with hooked({0: network.get_submodule(layer.module)}, lambda _, o: maps.__setitem__(0, o.clone())):
            with torch.inference_mode():
                network(src.batch([p]))
        m = maps[0][0]  # (C, *grid)
        idx = voxel_indices(m.shape[1:], k, seed=seed, patch_index=p)
        rows.append(m.reshape(m.shape[0], -1)[:, idx].T)
    return torch.cat(rows)


def test_same_voxels_for_every_network(toy_env, model):
    nets = [tiny_network(0), tiny_network(1)]
    layers = select_layers(model, "blocks:2,5")
    src = source(toy_env, seed=3)
    plan = plan_sampling(probe_layers(nets[0], layers, (1, 32, 32, 32)), patches=3, voxels_per_patch=600)
    chunks = list(sampled_activations(nets, layers, src, plan, seed=3, batch_size=2, chunk_patches=2))
    assert len(chunks) == 2  # patches 0-1, 2
    for layer in layers:
        for i, network in enumerate(nets):
            got = torch.cat([c[layer.name][i] for c in chunks])
            assert got.shape == (plan.samples[layer.name], plan.channels[layer.name])
            # batch 2 vs batch 1: convolution algorithms differ in the last float32 bits
            torch.testing.assert_close(got, _dense_rows(network, layer, src, 3, 600, 3), rtol=1e-4, atol=1e-4)


def test_identical_networks_score_one(toy_env, net, model):
    layers = select_layers(model)
    twin = copy.deepcopy(net)
    plan = plan_sampling(probe_layers(net, layers, (1, 32, 32, 32)), patches=4, voxels_per_patch=512)
    res = pair_results(accumulate_pairs([net, twin], [(0, 1)], layers, source(toy_env), plan))
    for layer in layers:
        r = res[(layer.name, 0, 1)]
        assert r.n == plan.samples[layer.name]
        for m in ("mean_cca", "svcca", "pwcca", "linear_cka"):
            assert getattr(r, m) == pytest.approx(1.0, abs=1e-9), (layer.name, m)
        assert r.null_pwcca < 0.2 and r.null_linear_cka < 0.2


@pytest.mark.filterwarnings("ignore::nnunet_transfer.analysis.SimilarityWarning")
def test_streamed_over_patches_equals_dense(toy_env, model, monkeypatch):
    import nnunet_transfer.analysis.activations as act

    nets = [tiny_network(0), tiny_network(1), tiny_network(2)]
    layers = select_layers(model, "blocks:1,3,4")
    src = source(toy_env, seed=5)
    plan = plan_sampling(probe_layers(nets[0], layers, (1, 32, 32, 32)), patches=4, voxels_per_patch=300)
    chunks = []

    def recording(*a, **kw):  # keep what streams past, to compare with a dense computation on it
        for c in act.sampled_activations.__wrapped__(*a, **kw):
            chunks.append({k: [t.clone() for t in v] for k, v in c.items()})
            yield c

    recording.__wrapped__ = act.sampled_activations
    monkeypatch.setattr(act, "sampled_activations", recording)
    pairs = [(0, 1), (0, 2), (1, 2)]
    streamed = pair_results(accumulate_pairs(nets, pairs, layers, src, plan, seed=5, chunk_patches=2), side="sym")
    assert len(chunks) == 2
    for layer in layers:
        acts = [torch.cat([c[layer.name][i] for c in chunks]).double().numpy() for i in range(3)]
        for i, j in pairs:
            dense = similarity(acts[i], acts[j], side="sym", null_seed=None)
            s = streamed[(layer.name, i, j)]
            assert s.n == len(acts[i]) == plan.samples[layer.name]
            for m in ("mean_cca", "svcca", "pwcca", "linear_cka"):
                assert abs(getattr(s, m) - getattr(dense, m)) <= 1e-10, (layer.name, i, j, m)
            # the streamed null equals PairMoments fed the same chunks by hand
            hand = PairMoments(acts[i].shape[1], acts[j].shape[1], null_seed=5)
            for c in chunks:
                hand.update(c[layer.name][i], c[layer.name][j])
            assert abs(hand.results(side="sym").null_pwcca - s.null_pwcca) <= 1e-12


# --------------------------------------------------------------------------------------------------
# checkpoints


def test_architecture_check_names_the_difference(tmp_path, net):
    other = tiny_network(0, features="8,16,24")
    path = tmp_path / "other.pth"
    torch.save({"network_weights": other.state_dict()}, path)
    mism = compare_state(other.state_dict(), net.state_dict())
    assert mism.shapes and not mism.missing and not mism.unexpected
    with pytest.raises(ArchitectureError, match=r"other \(.*other.pth\) is not a network of toy: .*shape "
                                                r"mismatch\(es\) \(e\.g\. encoder\.stages\.2.*: checkpoint \(24, "):
        load_into(copy.deepcopy(net), resolve_network(path), where="toy", allow_seg_mismatch=True)
    # prefixes of torch.compile / DDP are stripped
    wrapped = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save({"network_weights": wrapped}, tmp_path / "wrapped.pth")
    fresh = tiny_network(7)
    assert load_into(fresh, resolve_network(tmp_path / "wrapped.pth"), where="toy", allow_seg_mismatch=False) is False
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(DataError, match="neither an nnU-Net checkpoint"):
        load_into(fresh, resolve_network(tmp_path / "list.pth"), where="toy", allow_seg_mismatch=False)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read checkpoint .*junk.pth"):
        load_into(fresh, resolve_network(tmp_path / "junk.pth"), where="toy", allow_seg_mismatch=False)


def test_other_label_set_loads_without_heads_only_when_heads_are_not_analysed(tmp_path, net):
    state = {k: (v[:2] if ".seg_layers." in k else v) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "source.pth")
    ref = resolve_network(tmp_path / "source.pth")
    assert load_into(tiny_network(3), ref, where="toy", allow_seg_mismatch=True) is True
    with pytest.raises(ArchitectureError, match="seg_layers"):
        load_into(tiny_network(3), ref, where="toy", allow_seg_mismatch=False)


def test_network_references(tmp_path, net):
    fold = tmp_path / "nnUNetTrainerX__nnUNetPlans__tiny" / "fold_0"
    for e, d in [(0, None), (1, 0.5), (2, 0.8), (3, 0.799)]:
        save_snapshot(net, fold, e, trainer_name="T", mean_fg_dice=d)
    torch.save({"network_weights": net.state_dict()}, fold / "checkpoint_final.pth")
    assert resolve_network(fold).label == "nnUNetTrainerX__nnUNetPlans__tiny/fold_0@final"
    assert resolve_network(f"{fold}@start").epoch == 0
    assert resolve_network(f"{fold}@converged", source="raw").epoch == 2
    assert resolve_network(fold / "snapshots" / "epoch_0003.pth").label.endswith("fold_0@3")
    with pytest.raises(DataError, match="no snapshot of epoch 7; snapshots exist for epochs 0, 1, 2, 3"):
        resolve_network(f"{fold}@7")
    with pytest.raises(DataError, match="checkpoint_best.pth does not exist"):
        resolve_network(f"{fold}@best")
    with pytest.raises(DataError, match="not found"):
        resolve_network(tmp_path / "nothing.pth")
    assert convergence_epoch([{"epoch": 0, "mean_fg_dice": None}, {"epoch": 4, "mean_fg_dice": 0.3}],
                             source="raw") == 4
