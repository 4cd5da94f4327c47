"""Filter change as Karimi et al. report it, in both readings — the mean over a layer's filters of ‖Δw_f‖ / ‖w_f‖
and of |‖w_f,1‖ − ‖w_f,0‖| / ‖w_f,0‖ — checked against loops over filters and numpy written out here, on small
tensors and on a tiny nnU-Net network."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_transfer.analysis.weight_change import filter_changes, filter_norm_changes, relative_change, weight_change
from nnunet_transfer.blocks import BlockModel

from .test_activations import tiny_network


def loop_ratios(w0: torch.Tensor, w1: torch.Tensor, *, transposed: bool) -> list[float]:
    """One filter at a time, in plain Python sums: output channel f is W[f] (Conv) or W[:, f] (ConvTranspose)."""
    n = w0.shape[1] if transposed else w0.shape[0]
    out = []
    for f in range(n):
        a = (w0[:, f] if transposed else w0[f]).double().flatten().tolist()
        b = (w1[:, f] if transposed else w1[f]).double().flatten().tolist()
        num = math.sqrt(sum((y - x) ** 2 for x, y in zip(a, b)))
        den = math.sqrt(sum(x * x for x in a))
        out.append(num / den if den > 0 else float("nan"))
    return out


def test_filter_changes_by_hand():
    # two 1x2 filters: f0 = (3, 4) -> (3, 5): |(0, 1)| / 5 = 0.2; f1 = (1, 0) -> (0, 0): 1 / 1
    w0 = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    w1 = torch.tensor([[[3.0, 5.0]], [[0.0, 0.0]]])
    assert filter_changes(w0, w1).tolist() == pytest.approx([0.2, 1.0], abs=1e-15)
    # the pooled value weighs the larger filter more: sqrt(1 + 1) / sqrt(25 + 1) = 0.277, not the mean 0.6
    assert relative_change([w0], [w1]) == pytest.approx(math.sqrt(2 / 26), rel=1e-15)
    assert float(filter_changes(w0, w1).mean()) == pytest.approx(0.6, rel=1e-15)
    # a zero filter has no relative change
    assert np.isnan(filter_changes(torch.zeros(1, 1, 2), torch.ones(1, 1, 2))).all()


@pytest.mark.parametrize("shape, transposed", [((6, 4, 3, 3, 3), False), ((4, 6, 2, 2, 2), True), ((5, 3, 3), False)])
def test_filter_changes_equal_a_loop_over_filters(shape, transposed):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    w1 = w0 + 0.1 * torch.randn(shape, generator=g)
    got = filter_changes(w0, w1, transposed=transposed)
    assert got.shape == ((shape[1],) if transposed else (shape[0],))
    assert got.tolist() == pytest.approx(loop_ratios(w0, w1, transposed=transposed), rel=1e-12)
    # transposed reading differs: a ConvTranspose weight's filters are its second axis
    if transposed:
        assert filter_changes(w0, w1).shape == (shape[0],)


def test_weight_change_reports_per_filter_means_beside_pooled():
    before, after = tiny_network(0), tiny_network(1)
    model = BlockModel.from_network(before)
    tables = weight_change(model, before, after)
    s0, s1 = before.state_dict(), after.state_dict()
    conv = {r["conv"]: r for r in tables["conv"]}
    transposed = {n for n in conv if "transpconvs" in n}
    assert transposed == {"decoder.transpconvs.0", "decoder.transpconvs.1"}
    per = {n: loop_ratios(s0[n + ".weight"], s1[n + ".weight"], transposed=n in transposed) for n in conv}
    for n, row in conv.items():
        assert row["filters"] == len(per[n]) and row["zero_filters"] == 0
        assert row["filter_ratio"] == pytest.approx(float(np.mean(per[n])), rel=1e-12)
        assert row["filter_ratio"] != pytest.approx(row["ratio"], rel=1e-6)  # two different statistics
    # a transposed conv's filters are its output channels: (in 32, out 16, 2, 2, 2) -> 16 filters
    assert conv["decoder.transpconvs.0"]["shape"][:2] == [32, 16] and conv["decoder.transpconvs.0"]["filters"] == 16
    for table, key in (("block", "layer"), ("group", "group")):
        for row in tables[table]:
            members = [n for n in conv if conv[n][key] == row[key]]
            flat = [r for n in members for r in per[n]]
            assert row["filters"] == len(flat)
            assert row["filter_ratio"] == pytest.approx(float(np.mean(flat)), rel=1e-12), (table, row[key])
    same = weight_change(model, before, before)
    assert all(r["filter_ratio"] == 0.0 for r in same["conv"] + same["block"] + same["group"])


def numpy_norm_ratios(w0: torch.Tensor, w1: torch.Tensor, *, transposed: bool) -> np.ndarray:
    """|‖W₁[f]‖ − ‖W₀[f]‖| / ‖W₀[f]‖ with numpy: filters moved to axis 0, each flattened."""
    a, b = w0.double().numpy(), w1.double().numpy()
    if transposed:
        a, b = np.swapaxes(a, 0, 1), np.swapaxes(b, 0, 1)
    n0 = np.sqrt((a.reshape(a.shape[0], -1) ** 2).sum(axis=1))
    n1 = np.sqrt((b.reshape(b.shape[0], -1) ** 2).sum(axis=1))
    return np.abs(n1 - n0) / n0


def test_filter_norm_changes_by_hand():
    # f0 = (3, 4) -> (3, 5): |√34 − 5| / 5; f1 = (1, 0) -> (0, 1): a rotation, the norm does not change;
    # f2 = (2, 0) -> (-1, 0): |1 − 2| / 2 = 0.5, while ‖Δw‖/‖w‖ = 1.5
    w0 = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]], [[2.0, 0.0]]])
    w1 = torch.tensor([[[3.0, 5.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])
    assert filter_norm_changes(w0, w1).tolist() == pytest.approx([(math.sqrt(34) - 5) / 5, 0.0, 0.5], abs=1e-15)
    assert filter_changes(w0, w1).tolist() == pytest.approx([0.2, math.sqrt(2), 1.5], abs=1e-15)
    assert np.isnan(filter_norm_changes(torch.zeros(1, 1, 2), torch.ones(1, 1, 2))).all()


@pytest.mark.parametrize("shape, transposed", [((6, 4, 3, 3, 3), False), ((4, 6, 2, 2, 2), True), ((5, 3, 3), False)])
def test_filter_norm_changes_equal_numpy(shape, transposed):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=g)
    w1 = 1.1 * w0 + 0.1 * torch.randn(shape, generator=g)
    got = filter_norm_changes(w0, w1, transposed=transposed)
    np.testing.assert_allclose(got, numpy_norm_ratios(w0, w1, transposed=transposed), rtol=1e-12, atol=0)
    assert np.all(got <= filter_changes(w0, w1, transposed=transposed) + 1e-15)  # the triangle inequality


def test_weight_change_reports_both_readings():
    before, after = tiny_network(0), tiny_network(1)
    model = BlockModel.from_network(before)
    tables = weight_change(model, before, after)
    s0, s1 = before.state_dict(), after.state_dict()
    conv = {r["conv"]: r for r in tables["conv"]}
    per = {n: numpy_norm_ratios(s0[n + ".weight"], s1[n + ".weight"], transposed="transpconvs" in n) for n in conv}
    for n, row in conv.items():
        assert row["filter_norm_ratio"] == pytest.approx(float(per[n].mean()), rel=1e-12)
        assert row["filter_norm_ratio"] < row["filter_ratio"]  # two networks of different seeds: not a rescaling
    for table, key in (("block", "layer"), ("group", "group")):
        for row in tables[table]:
            flat = np.concatenate([per[n] for n in conv if conv[n][key] == row[key]])
            assert row["filter_norm_ratio"] == pytest.approx(float(flat.mean()), rel=1e-12), (table, row[key])
