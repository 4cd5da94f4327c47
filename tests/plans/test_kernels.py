"""The kernel rules of ``weights adapt`` (:mod:`nnunet_transfer.plans.kernels`): their matrices and the
responses they keep, checked against convolutions of the original kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_transfer.plans.kernels import KernelRuleError, conv_axis_matrix, map_kernel, transposed_axis_matrix


def conv(x, w, padding=0):
    return F.conv3d(x.double(), w.double(), padding=padding)


def test_axis_matrices_are_the_documented_ones():
    assert torch.equal(conv_axis_matrix(source=3, target=3), torch.eye(3, dtype=torch.float64))
    assert torch.equal(conv_axis_matrix(source=3, target=1), torch.ones(1, 3, dtype=torch.float64))
    assert torch.equal(conv_axis_matrix(source=1, target=3), torch.tensor([[0.], [1.], [0.]], dtype=torch.float64))
    assert torch.equal(conv_axis_matrix(source=3, target=5)[1:4], torch.eye(3, dtype=torch.float64))
    m = conv_axis_matrix(source=5, target=3)
    # outer tap -2 -> (4/3, 1/3, -2/3) on taps -1, 0, 1; inner taps unchanged; +2 mirrored
    torch.testing.assert_close(m[:, 0], torch.tensor([4 / 3, 1 / 3, -2 / 3], dtype=torch.float64))
    torch.testing.assert_close(m[:, 4], torch.tensor([-2 / 3, 1 / 3, 4 / 3], dtype=torch.float64))
    assert torch.equal(m[:, 1:4], torch.eye(3, dtype=torch.float64))
    u = torch.arange(-1, 2, dtype=torch.float64)
    torch.testing.assert_close(m.sum(0), torch.ones(5, dtype=torch.float64))  # zeroth moment of every tap
    torch.testing.assert_close(u @ m, torch.arange(-2, 3, dtype=torch.float64))  # first moment of every tap
    assert torch.equal(transposed_axis_matrix(source=2, target=1), torch.full((1, 2), 0.5, dtype=torch.float64))
    assert torch.equal(transposed_axis_matrix(source=1, target=2), torch.ones(2, 1, dtype=torch.float64))
    for bad in (dict(source=2, target=1), dict(source=3, target=4)):
        with pytest.raises(KernelRuleError, match="odd sizes"):
            conv_axis_matrix(**bad)
    with pytest.raises(KernelRuleError, match="stride 2 -> 3"):
        transposed_axis_matrix(source=2, target=3)


def _ramp(shape, axis_coeffs):
    """a + Σ b_i * coordinate_i on a (1, 1, *shape) grid."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    x = 0.7 + sum(b * g for b, g in zip(axis_coeffs, grids))
    return x[None, None]


def test_removed_axis_keeps_the_response_to_input_constant_along_it():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    w2 = map_kernel(w, kernel=(1, 3, 3))
    assert w2.shape == (4, 2, 1, 3, 3)
    torch.testing.assert_close(w2, w.sum(2, keepdim=True), rtol=0, atol=1e-14)
    # constant along z, anything in-plane: identical response wherever both kernels see only the image
    plane = torch.randn(1, 2, 1, 9, 9, dtype=torch.float64)
    x = plane.expand(-1, -1, 7, -1, -1)
    torch.testing.assert_close(conv(x, w2)[:, :, 1:-1], conv(x, w), rtol=1e-12, atol=1e-12)
    # a ramp along the removed axis loses exactly b * Σ_t t w[t] (the documented first-moment term)
    b = 0.3
    ramp = _ramp((7, 9, 9), (b, 0.0, 0.0)).expand(-1, 2, -1, -1, -1)
    t = torch.arange(-1, 2, dtype=torch.float64).view(1, 1, 3, 1, 1)
    lost = b * (w * t).sum(dim=(1, 2, 3, 4))
    diff = conv(ramp, w)[0, :, :, 0, 0] - conv(ramp, w2)[0, :, 1:-1, 0, 0]
    torch.testing.assert_close(diff, lost[:, None].expand_as(diff), rtol=1e-12, atol=1e-12)
    assert lost.abs().max() > 1e-3  # the term is real for a random filter


@pytest.mark.parametrize("k_from, k_to", [((1, 3, 3), (3, 3, 3)), ((3, 3, 3), (5, 5, 5)), ((1, 1, 1), (3, 3, 3))])
def test_growing_centre_embeds_and_keeps_every_response_exactly(k_from, k_to):
    torch.manual_seed(1)
    w = torch.randn(3, 2, *k_from, dtype=torch.float64)
    w2 = map_kernel(w, kernel=k_to)
    x = torch.randn(1, 2, 6, 7, 8, dtype=torch.float64)
    # nnU-Net's convs pad k // 2: the same output everywhere, borders included
    torch.testing.assert_close(F.conv3d(x, w2, padding=[k // 2 for k in k_to]),
                               F.conv3d(x, w, padding=[k // 2 for k in k_from]), rtol=1e-12, atol=1e-12)


def test_shrinking_5_to_3_keeps_constant_and_linear_ramp_responses():
    torch.manual_seed(2)
    w = torch.randn(4, 2, 5, 5, 5, dtype=torch.float64)
    w2 = map_kernel(w, kernel=(3, 3, 3))
    for coeffs in ((0.0, 0.0, 0.0), (0.4, 0.0, 0.0), (0.0, -1.3, 0.0), (0.2, 0.5, -0.9)):
        x = _ramp((9, 9, 9), coeffs).expand(-1, 2, -1, -1, -1)
        # valid convolutions aligned on the same centre voxels
        torch.testing.assert_close(conv(x, w2)[:, :, 1:-1, 1:-1, 1:-1], conv(x, w), rtol=1e-10, atol=1e-10)
    x = torch.randn(1, 2, 9, 9, 9, dtype=torch.float64)
    assert (conv(x, w2)[:, :, 1:-1, 1:-1, 1:-1] - conv(x, w)).abs().max() > 1e-2  # not an identity


def test_transposed_rules_mean_and_repeat():
    torch.manual_seed(3)
    w = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)  # (in, out, *stride)
    w_mean = map_kernel(w, kernel=(1, 2, 2), transposed=True)
    torch.testing.assert_close(w_mean, w.mean(2, keepdim=True), rtol=0, atol=1e-15)
    const = torch.full((1, 3, 4, 4, 4), 1.7, dtype=torch.float64)
    src = F.conv_transpose3d(const, w, stride=(2, 2, 2))
    tgt = F.conv_transpose3d(const, w_mean, stride=(1, 2, 2))
    # the target's one output per input voxel along z = the mean of the source's two
    torch.testing.assert_close(tgt, 0.5 * (src[:, :, 0::2] + src[:, :, 1::2]), rtol=1e-12, atol=1e-12)

    w1 = torch.randn(3, 2, 1, 2, 2, dtype=torch.float64)
    w_rep = map_kernel(w1, kernel=(2, 2, 2), transposed=True)
    x = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64)
    src = F.conv_transpose3d(x, w1, stride=(1, 2, 2))
    # the source's output, then nearest-neighbour upsampling along z: exact for every input
    torch.testing.assert_close(F.conv_transpose3d(x, w_rep, stride=(2, 2, 2)), src.repeat_interleave(2, dim=2),
                               rtol=1e-12, atol=1e-12)
