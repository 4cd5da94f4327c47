"""Similarity measures: streaming moments against independent dense float64 implementations.

The references below never form a covariance matrix: canonical correlations are the singular values
of ``Q_xᵀ Q_y`` for orthonormal bases of the centred data matrices themselves (SVD, rank-revealing),
PWCCA follows google/svcca's ``compute_pwcca`` step by step on the dense, centred data (with the
weighting side chosen explicitly, which fixes its wrong-array branch), and CKA is
``‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`` on centred data.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from nnunet_transfer.analysis import (
    PairMoments,
    SimilarityResult,
    SimilarityWarning,
    canonical_correlations,
    linear_cka,
    mean_cca,
    null_permutation,
    pwcca,
    similarity,
    similarity_from_statistics,
    svcca,
)

EPS = 1e-10
TOL = 1e-10
N = 1200  # >= 100 x the largest channel count below: no sample-size warning

# ------------------------------------------------------------------------------------------------
# Independent dense references


def _centred_live(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=0)
    var = (a**2).mean(axis=0)
    return a[:, var > EPS * var.max()]


def _basis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of the centred data ``a``, truncated to its numerical rank."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    r = s**2 > EPS * s[0] ** 2
    return u[:, r], s[r], vt[r]


def dense_rho(x, y):
    qx = _basis(_centred_live(x))[0]
    qy = _basis(_centred_live(y))[0]
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def dense_mean_cca(x, y):
    return dense_rho(x, y).mean()


def dense_svcca(x, y, keep=0.99):
    bases = []
    for a in (x, y):
        u, s, _ = _basis(_centred_live(a))
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = next(i + 1 for i in range(len(frac)) if frac[i] >= keep or i == len(frac) - 1)
        bases.append(u[:, :k])  # orthonormal basis of the reduced activations U_k S_k
    return np.linalg.svd(bases[0].T @ bases[1], compute_uv=False).mean()


def dense_pwcca(x, y, side="x"):
    """compute_pwcca's structure on centred data: u = left singular vectors of the (ZCA-)whitened
    cross-covariance, dirns = uᵀ Xᶜ, P = QR(dirnsᵀ), α ∝ Σⱼ |Pᵀ Xᶜ|, Σ α ρ."""
    xc, yc = _centred_live(x), _centred_live(y)
    ux, _, vtx = _basis(xc)
    uy, _, vty = _basis(yc)
    p, rho, wt = np.linalg.svd(ux.T @ uy, full_matrices=False)
    # Σ^{-1/2} = √N V S⁻¹ Vᵀ, so Σxx^{-1/2} Σxy Σyy^{-1/2} = (Vx P) diag(ρ) (Vy W)ᵀ
    ref, u = (xc, vtx.T @ p) if side == "x" else (yc, vty.T @ wt.T)
    q, _ = np.linalg.qr(ref @ u)
    alpha = np.abs(q.T @ ref).sum(axis=1)
    alpha /= alpha.sum()
    return float(alpha @ rho), alpha


def google_pwcca(x, y, side="x"):
    """google/svcca cca_core.get_cca_similarity + pwcca.compute_pwcca, line by line, on centred
    (neurons, datapoints) activations; full-rank data only (it inverts the covariances)."""
    acts1 = (x - x.mean(0)).T
    acts2 = (y - y.mean(0)).T
    numx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:numx, :numx], cov[:numx, numx:], cov[numx:, numx:]
    x_idxs = np.diag(sxx) > EPS * np.diag(sxx).max()
    y_idxs = np.diag(syy) > EPS * np.diag(syy).max()
    sxx, sxy, syy = sxx[x_idxs][:, x_idxs], sxy[x_idxs][:, y_idxs], syy[y_idxs][:, y_idxs]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)

    def sqrtm(a):
        w, v = np.linalg.eigh(a)
        return v @ np.diag(np.sqrt(w)) @ v.T

    arr = sqrtm(np.linalg.pinv(sxx)) @ sxy @ sqrtm(np.linalg.pinv(syy))
    u, s, v = np.linalg.svd(arr)
    s = np.abs(s)
    if side == "x":
        dirns, acts = u.T @ acts1[x_idxs], acts1[x_idxs]
    else:  # the reference's else-branch uses acts1 here: the bug
        dirns, acts = v @ acts2[y_idxs], acts2[y_idxs]
    p, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(p.T @ acts.T), axis=1)[: s.size]  # directions that have a ρ
    weights = weights / weights.sum()
    return float(np.sum(weights * s))


# google/svcca's compute_pwcca, ported line by line from its source (pwcca.py and cca_core.py at
# https://github.com/google/svcca/blob/1f3fbf19bd31bd9b76e728ef75842aa1d9a4cd2b/pwcca.py and .../cca_core.py):
# get_cca_similarity(compute_coefs=True, compute_dirns=False) with its helpers, then compute_pwcca.
# Activations are (neurons, datapoints). Two known defects of the reference, and what the port does:
# - compute_pwcca's else-branch (the second layer has fewer live neurons) projects acts1[y_idxs] with the
#   second layer's means: an IndexError when the layers differ in neuron count, the first layer's values
#   otherwise. acts2 is what is meant (Morcos et al. weight by the layer the CCA directions live in); the
#   port uses acts2 there, marked below.
# - it adds the neuron means back to the projections and weights by the raw activations, so on activations
#   with non-zero mean its value depends on the sign LAPACK picks for each singular vector. The tests feed it
#   mean-centred activations, where the means are 0 up to rounding and the signs vanish under |.|
#   (DESIGN.md, "Similarity measures").


def _svcca_positivedef_matrix_sqrt(array):
    w, v = np.linalg.eigh(array)
    wsqrt = np.sqrt(w)
    return np.dot(v, np.dot(np.diag(wsqrt), np.conj(v).T))


def _svcca_remove_small(sigma_xx, sigma_xy, sigma_yx, sigma_yy, epsilon):
    x_diag = np.abs(np.diagonal(sigma_xx))
    y_diag = np.abs(np.diagonal(sigma_yy))
    x_idxs = x_diag >= epsilon
    y_idxs = y_diag >= epsilon
    sigma_xx_crop = sigma_xx[x_idxs][:, x_idxs]
    sigma_xy_crop = sigma_xy[x_idxs][:, y_idxs]
    sigma_yx_crop = sigma_yx[y_idxs][:, x_idxs]
    sigma_yy_crop = sigma_yy[y_idxs][:, y_idxs]
    return sigma_xx_crop, sigma_xy_crop, sigma_yx_crop, sigma_yy_crop, x_idxs, y_idxs


def _svcca_compute_ccas(sigma_xx, sigma_xy, sigma_yx, sigma_yy, epsilon):
    (sigma_xx, sigma_xy, sigma_yx, sigma_yy,
     x_idxs, y_idxs) = _svcca_remove_small(sigma_xx, sigma_xy, sigma_yx, sigma_yy, epsilon)
    numx, numy = sigma_xx.shape[0], sigma_yy.shape[0]
    assert numx and numy  # the reference returns zeros here; no case below has a dead layer
    sigma_xx += epsilon * np.eye(numx)
    sigma_yy += epsilon * np.eye(numy)
    inv_xx = np.linalg.pinv(sigma_xx)
    inv_yy = np.linalg.pinv(sigma_yy)
    invsqrt_xx = _svcca_positivedef_matrix_sqrt(inv_xx)
    invsqrt_yy = _svcca_positivedef_matrix_sqrt(inv_yy)
    arr = np.dot(invsqrt_xx, np.dot(sigma_xy, invsqrt_yy))
    u, s, v = np.linalg.svd(arr)
    return [u, np.abs(s), v], invsqrt_xx, invsqrt_yy, x_idxs, y_idxs


def _svcca_get_cca_similarity(acts1, acts2, epsilon=0.0):
    assert acts1.shape[1] == acts2.shape[1] and acts1.shape[0] < acts1.shape[1]
    numx, numy = acts1.shape[0], acts2.shape[0]
    covariance = np.cov(acts1, acts2)
    sigmaxx = covariance[:numx, :numx]
    sigmaxy = covariance[:numx, numx:]
    sigmayx = covariance[numx:, :numx]
    sigmayy = covariance[numx:, numx:]
    xmax = np.max(np.abs(sigmaxx))
    ymax = np.max(np.abs(sigmayy))
    sigmaxx /= xmax
    sigmayy /= ymax
    sigmaxy /= np.sqrt(xmax * ymax)
    sigmayx /= np.sqrt(xmax * ymax)
    [u, s, v], _, _, x_idxs, y_idxs = _svcca_compute_ccas(sigmaxx, sigmaxy, sigmayx, sigmayy, epsilon)
    return {"coef_x": u.T, "coef_y": v, "neuron_means1": np.mean(acts1, axis=1, keepdims=True),
            "neuron_means2": np.mean(acts2, axis=1, keepdims=True), "cca_coef1": s, "cca_coef2": s,
            "x_idxs": x_idxs, "y_idxs": y_idxs}


def svcca_compute_pwcca(acts1, acts2, epsilon=0.0):
    """google/svcca ``pwcca.compute_pwcca``: ``(pwcca, weights, coefs)``."""
    sresults = _svcca_get_cca_similarity(acts1, acts2, epsilon=epsilon)
    if np.sum(sresults["x_idxs"]) <= np.sum(sresults["y_idxs"]):
        dirns = np.dot(sresults["coef_x"],
                       (acts1[sresults["x_idxs"]] - sresults["neuron_means1"][sresults["x_idxs"]])) \
            + sresults["neuron_means1"][sresults["x_idxs"]]
        coefs = sresults["cca_coef1"]
        acts = acts1
        idxs = sresults["x_idxs"]
    else:
        dirns = np.dot(sresults["coef_y"],
                       (acts2[sresults["y_idxs"]] - sresults["neuron_means2"][sresults["y_idxs"]])) \
            + sresults["neuron_means2"][sresults["y_idxs"]]  # the reference has acts1[...] here: its bug
        coefs = sresults["cca_coef2"]
        acts = acts2
        idxs = sresults["y_idxs"]
    P, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(np.dot(P.T, acts[idxs].T)), axis=1)
    weights = weights / np.sum(weights)
    return np.sum(weights * coefs), weights, coefs


def dense_cka(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


# ------------------------------------------------------------------------------------------------
# Data


def _latent_pair(rng, n, cx, cy, k, noise):
    z = rng.standard_normal((n, k))
    x = z @ rng.standard_normal((k, cx)) + noise * rng.standard_normal((n, cx))
    y = np.tanh(z @ rng.standard_normal((k, cy))) + noise * rng.standard_normal((n, cy))
    return x, y


def case_random(rng):
    return rng.standard_normal((N, 7)), rng.standard_normal((N, 5))


def case_correlated(rng):
    x, y = _latent_pair(rng, N, 9, 6, 4, 0.3)
    # large offsets and channel scales over two decades: centring and scale handling matter
    return x * 10 ** rng.uniform(-1, 1, 9) + 50.0, y * 10 ** rng.uniform(-1, 1, 6) - 3.0


def case_low_rank(rng):
    x, y = _latent_pair(rng, N, 8, 6, 5, 0.5)
    x = rng.standard_normal((N, 3)) @ rng.standard_normal((3, 8)) + 0.8 * x[:, :1]  # rank 4 in 8
    y[:, 5] = y[:, 0] - 2 * y[:, 1]  # exactly collinear channel
    return x, y


def case_dead(rng):
    x, y = _latent_pair(rng, N, 8, 6, 3, 0.4)
    x[:, 2] = 3.7
    x[:, 5] = 0.0
    y[:, 4] = -1.25
    return x, y


def case_dead_low_rank_wide(rng):
    x, y = _latent_pair(rng, N, 4, 10, 3, 0.2)
    y[:, 7] = 0.0
    y[:, 8] = y[:, 1] + y[:, 2]
    return x, y


CASES = {
    "random": case_random,
    "correlated": case_correlated,
    "low_rank": case_low_rank,
    "dead_channels": case_dead,
    "dead_low_rank_wide_y": case_dead_low_rank_wide,
}
FULL_RANK = ("random", "correlated", "dead_channels")


@pytest.fixture(params=sorted(CASES))
def data(request):
    rng = np.random.default_rng(sorted(CASES).index(request.param))
    return request.param, *CASES[request.param](rng)


def _stream(x, y, sizes, *, order=None, null_seed=0):
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(x)
    chunks = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if order is not None:
        chunks = [chunks[i] for i in order]
    acc = PairMoments(x.shape[1], y.shape[1], null_seed=null_seed)
    for xb, yb in chunks:
        acc.update(xb, yb)
    return acc


def _values(r: SimilarityResult) -> np.ndarray:
    return np.array([r.mean_cca, r.svcca, r.pwcca_x, r.pwcca_y, r.linear_cka,
                     r.null_mean_cca, r.null_svcca, r.null_pwcca, r.null_linear_cka])


# ------------------------------------------------------------------------------------------------
# Streaming == dense


def test_streaming_equals_dense(data):
    name, x, y = data
    r = _stream(x, y, [1, 7, 300, 92, N - 400]).results()
    rho = dense_rho(x, y)
    assert r.rho.shape == rho.shape
    np.testing.assert_allclose(r.rho, rho, rtol=0, atol=TOL)
    expected = {
        "mean_cca": dense_mean_cca(x, y),
        "svcca": dense_svcca(x, y),
        "pwcca_x": dense_pwcca(x, y, "x")[0],
        "pwcca_y": dense_pwcca(x, y, "y")[0],
        "linear_cka": dense_cka(x, y),
    }
    got = {k: getattr(r, k) for k in expected}
    assert got == pytest.approx(expected, abs=TOL, rel=0)
    np.testing.assert_allclose(r.pwcca_weights_x, dense_pwcca(x, y, "x")[1], rtol=0, atol=TOL)
    np.testing.assert_allclose(r.pwcca_weights_y, dense_pwcca(x, y, "y")[1], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", FULL_RANK)
@pytest.mark.parametrize("side", ["x", "y"])
def test_pwcca_matches_google_svcca_structure(name, side):
    x, y = CASES[name](np.random.default_rng(sorted(CASES).index(name)))
    assert pwcca(x, y, side=side) == pytest.approx(google_pwcca(x, y, side), abs=TOL, rel=0)


def _full_rank_pair(rng, cx, cy, *, dead_x=(), dead_y=()):
    """Related layers (shared latent factors), full rank on their live channels; listed channels constant."""
    x, y = _latent_pair(rng, N, cx, cy, min(cx, cy), 0.5)
    x, y = x * 10 ** rng.uniform(-1, 1, cx) + 5.0, y * 10 ** rng.uniform(-1, 1, cy) - 2.0
    for c, value in zip(dead_x, (3.7, 0.0, -1.0)):
        x[:, c] = value
    for c, value in zip(dead_y, (-1.25, 0.0, 2.0)):
        y[:, c] = value
    return x, y


REFERENCE_CASES = {  # name: (cx, cy, dead x channels, dead y channels, the side the reference weights by)
    "equal": (6, 6, (), (), "x"),  # a tie: the first
    "x_fewer": (4, 9, (), (), "x"),
    "y_fewer": (9, 5, (), (), "y"),  # the reference's else-branch (an IndexError in the reference itself)
    "dead_in_x": (6, 6, (1, 4), (), "x"),
    "dead_in_y": (6, 6, (), (0, 3), "y"),  # equal counts, fewer live in y: the else-branch
    "dead_turn_the_side": (5, 7, (), (2, 3, 6), "y"),  # y has more channels but 4 live < 5
    "dead_on_both_tie": (7, 6, (0, 5), (3,), "x"),  # 5 live each: the first
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_default_pwcca_equals_google_svcca_compute_pwcca_on_centred_activations(name):
    cx, cy, dead_x, dead_y, side = REFERENCE_CASES[name]
    x, y = _full_rank_pair(np.random.default_rng(sorted(REFERENCE_CASES).index(name)), cx, cy,
                           dead_x=dead_x, dead_y=dead_y)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    # the reference drops neurons whose variance (rescaled by the largest) is below epsilon, and adds
    # epsilon to the diagonal as a ridge: 1e-14 drops the constant channels (variance ~1e-32 after centring)
    # and keeps every live one (>= 1e-4 here), and its ridge moves the values by less than 1e-9
    ref, ref_weights, ref_rho = svcca_compute_pwcca(xc.T, yc.T, epsilon=1e-14)
    r = similarity(x, y)  # the defaults, on the raw (offset) activations: centring is part of the measure
    assert r.side == "fewer" and r.pwcca_side == side
    assert (r.dead_x, r.dead_y) == (len(dead_x), len(dead_y))
    assert r.pwcca == pytest.approx(float(ref), abs=1e-9, rel=0)
    assert pwcca(x, y) == r.pwcca
    np.testing.assert_allclose(r.rho, ref_rho, rtol=0, atol=1e-9)
    np.testing.assert_allclose(getattr(r, f"pwcca_weights_{side}"), ref_weights, rtol=0, atol=1e-9)
    # streamed in chunks, and through the command's default (--pwcca-side fewer), the same number
    assert _stream(x, y, [500, 700]).results().pwcca == pytest.approx(r.pwcca, abs=TOL, rel=0)
    # the other weighting differs: the test would notice a default that is not the reference's side
    other = r.pwcca_y if side == "x" else r.pwcca_x
    assert abs(other - float(ref)) > 1e-4


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99, 1.0])
def test_svcca_keep_matches_dense(data, keep):
    _, x, y = data
    assert svcca(x, y, keep=keep) == pytest.approx(dense_svcca(x, y, keep), abs=TOL, rel=0)


def test_counts(data):
    name, x, y = data
    r = similarity(x, y)
    expected = {
        "random": (0, 0, 7, 5),
        "correlated": (0, 0, 9, 6),
        "low_rank": (0, 0, 4, 5),
        "dead_channels": (2, 1, 6, 5),
        "dead_low_rank_wide_y": (0, 1, 4, 8),
    }[name]
    assert (r.dead_x, r.dead_y, r.rank_x, r.rank_y) == expected
    assert (r.n, r.cx, r.cy) == (N, x.shape[1], y.shape[1])
    assert r.rho.size == min(r.rank_x, r.rank_y)


def test_null_equals_dense_on_misaligned_chunks(data):
    _, x, y = data
    sizes = [500, 300, 400]
    acc = _stream(x, y, sizes, null_seed=7)
    bounds = np.cumsum([0, *sizes])
    y_mis = np.concatenate([y[a:b][null_permutation(b - a, seed=7)] for a, b in zip(bounds[:-1], bounds[1:])])
    r = acc.results(side="sym")
    expected = [dense_mean_cca(x, y_mis), dense_svcca(x, y_mis),
                0.5 * (dense_pwcca(x, y_mis, "x")[0] + dense_pwcca(x, y_mis, "y")[0]), dense_cka(x, y_mis)]
    got = [r.null_mean_cca, r.null_svcca, r.null_pwcca, r.null_linear_cka]
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("name", sorted(CASES))
def test_invertible_map_gives_one(name):
    rng = np.random.default_rng(42)
    x = CASES[name](rng)[0]
    x = x[:, np.var(x, axis=0) > 0]  # a dead channel would stay dead on one side only
    a = rng.standard_normal((x.shape[1], x.shape[1])) + 3 * np.eye(x.shape[1])
    y = x @ a + 5.0
    r = similarity(x, y, keep=1.0)
    rank = np.linalg.matrix_rank(x - x.mean(0))
    np.testing.assert_allclose(r.rho, np.ones(rank), atol=1e-9)
    for value in (r.mean_cca, r.svcca, r.pwcca_x, r.pwcca_y):
        assert value == pytest.approx(1.0, abs=1e-9)


def test_svcca_invariant_to_rotation_and_scale():
    x, _ = case_correlated(np.random.default_rng(3))
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((9, 9)))
    assert svcca(x, 2.5 * x @ q) == pytest.approx(1.0, abs=1e-9)


def test_symmetry(data):
    _, x, y = data
    assert mean_cca(x, y) == pytest.approx(mean_cca(y, x), abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert svcca(x, y) == pytest.approx(svcca(y, x), abs=1e-12)
    assert pwcca(x, y, side="x") == pytest.approx(pwcca(y, x, side="y"), abs=1e-12)
    assert pwcca(x, y, side="sym") == pytest.approx(pwcca(y, x, side="sym"), abs=1e-12)


def test_pwcca_weights_sum_to_one(data):
    _, x, y = data
    r = similarity(x, y)
    for w in (r.pwcca_weights_x, r.pwcca_weights_y):
        assert w.shape == r.rho.shape
        assert np.all(w >= 0)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert r.pwcca_x == pytest.approx(float(r.pwcca_weights_x @ r.rho), abs=1e-12)


def test_pwcca_sides():
    x, y = case_correlated(np.random.default_rng(5))
    r = similarity(x, y, side="sym")
    assert r.pwcca == pytest.approx(0.5 * (r.pwcca_x + r.pwcca_y))
    assert pwcca(x, y, side="y") == pytest.approx(r.pwcca_y)
    assert pwcca(x, y, side="x") == pytest.approx(r.pwcca_x)
    # the default weights by the side with fewer live channels: y has 6, x 9
    assert pwcca(x, y) == pytest.approx(r.pwcca_y) and similarity(x, y).pwcca_side == "y"
    assert pwcca(y, x) == pytest.approx(r.pwcca_y) and similarity(y, x).pwcca_side == "x"


def test_invariant_to_offsets_signs_and_channel_order():
    """google/svcca adds the means back before its QR, so its PWCCA moves with offsets and SVD
    signs; centred activations make every measure invariant to them."""
    rng = np.random.default_rng(6)
    x, y = case_correlated(rng)
    ref = _values(similarity(x, y, null_seed=None))[:5]
    px, py = rng.permutation(x.shape[1]), rng.permutation(y.shape[1])
    sx, sy = rng.choice([-1.0, 1.0], x.shape[1]), rng.choice([-1.0, 1.0], y.shape[1])
    moved = _values(similarity((x * sx)[:, px] + 1e3, (y * sy)[:, py] - 7.0, null_seed=None))[:5]
    np.testing.assert_allclose(moved, ref, rtol=0, atol=1e-9)


def test_values_in_unit_interval(data):
    _, x, y = data
    v = _values(similarity(x, y))
    assert np.all((v >= 0) & (v <= 1))


# ------------------------------------------------------------------------------------------------
# Streaming invariances


@pytest.mark.parametrize(
    "sizes, order",
    [
        ([N], None),
        ([600, 600], [1, 0]),
        ([1, 1, 1198], [2, 0, 1]),
        ([100] * 12, list(range(11, -1, -1))),
        ([37, 263, 0, 500, 400], [3, 0, 4, 2, 1]),
    ],
    ids=["one_chunk", "halves_swapped", "singletons_first", "reversed_100s", "ragged_with_empty"],
)
def test_chunking_does_not_change_measures(data, sizes, order):
    _, x, y = data
    ref = similarity(x, y)
    r = _stream(x, y, sizes, order=order).results()
    np.testing.assert_allclose(_values(r)[:5], _values(ref)[:5], rtol=0, atol=TOL)
    np.testing.assert_allclose(r.rho, ref.rho, rtol=0, atol=TOL)


def test_one_chunk_null_equals_function():
    x, y = case_correlated(np.random.default_rng(8))
    ref = similarity(x, y, null_seed=3)
    r = _stream(x, y, [N], null_seed=3).results()
    np.testing.assert_allclose(_values(r), _values(ref), rtol=0, atol=1e-12)


def test_null_invariant_to_chunk_order():
    x, y = case_correlated(np.random.default_rng(9))
    a = _stream(x, y, [300, 300, 600], order=[0, 1, 2]).results()
    b = _stream(x, y, [300, 300, 600], order=[2, 0, 1]).results()
    np.testing.assert_allclose(_values(a), _values(b), rtol=0, atol=TOL)


def test_merge_equals_single_accumulator(data):
    _, x, y = data
    single = _stream(x, y, [200, 300, 700]).results()
    a = _stream(x[:500], y[:500], [200, 300])
    b = _stream(x[500:], y[500:], [700])
    empty = PairMoments(x.shape[1], y.shape[1])
    merged = empty.merge(a).merge(PairMoments(x.shape[1], y.shape[1])).merge(b).results()
    np.testing.assert_allclose(_values(merged), _values(single), rtol=0, atol=TOL)
    assert merged.n == N


def test_merge_after_pickle():
    x, y = case_dead(np.random.default_rng(10))
    a = pickle.loads(pickle.dumps(_stream(x[:600], y[:600], [600])))
    b = _stream(x[600:], y[600:], [600])
    np.testing.assert_allclose(_values(a.merge(b).results()), _values(_stream(x, y, [600, 600]).results()),
                               rtol=0, atol=TOL)


def test_accumulator_statistics_and_shortcuts():
    x, y = case_correlated(np.random.default_rng(11))
    acc = _stream(x, y, [400, 800])
    np.testing.assert_allclose(acc.mean_x, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.cov_xy, np.cov(x, y, rowvar=False, bias=True)[:9, 9:], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.cov_xx, np.cov(x, rowvar=False, bias=True), rtol=1e-10)
    assert acc.mean_cca() == pytest.approx(mean_cca(x, y), abs=TOL)
    assert acc.svcca(keep=0.9) == pytest.approx(svcca(x, y, keep=0.9), abs=TOL)
    assert acc.pwcca(side="y") == pytest.approx(pwcca(x, y, side="y"), abs=TOL)
    assert acc.linear_cka() == pytest.approx(linear_cka(x, y), abs=TOL)
    assert "PairMoments(cx=9, cy=6, n=1200" in repr(acc)


def test_without_null():
    x, y = case_random(np.random.default_rng(12))
    acc = _stream(x, y, [N], null_seed=None)
    r = acc.results()
    assert acc.cov_xy_null is None
    assert np.isnan([r.null_mean_cca, r.null_svcca, r.null_pwcca, r.null_linear_cka]).all()
    assert r.mean_cca == pytest.approx(mean_cca(x, y), abs=TOL)


def test_as_dict_is_flat_scalars():
    d = similarity(*case_dead(np.random.default_rng(13))).as_dict()
    assert {"n", "dead_x", "dead_y", "mean_cca", "null_pwcca", "svcca_dims_x"} <= set(d)
    assert not any(isinstance(v, (np.ndarray, tuple)) for v in d.values())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_input_equals_numpy(device):
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = case_correlated(np.random.default_rng(14))
    ref = similarity(x, y)
    got = similarity(torch.from_numpy(x).float().to(device).requires_grad_(), torch.from_numpy(y))
    # float32 input: compare with the numpy path on the same float32 values
    ref32 = similarity(x.astype(np.float32), y)
    np.testing.assert_allclose(_values(got), _values(ref32), rtol=0, atol=1e-10)
    assert abs(got.mean_cca - ref.mean_cca) < 1e-4
    acc = PairMoments(9, 6)
    acc.update(torch.from_numpy(x[:500]).to(device), y[:500]).update(x[500:], torch.from_numpy(y[500:]).to(device))
    np.testing.assert_allclose(_values(acc.results())[:5], _values(ref)[:5], rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------
# Sample-size bias and the null baseline


def test_null_baseline_shrinks_like_sqrt_c_over_n():
    c, rng = 8, np.random.default_rng(15)
    nulls, reals = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimilarityWarning)
        for n in (10 * c, 100 * c, 10_000 * c):
            r = similarity(rng.standard_normal((n, c)), rng.standard_normal((n, c)))
            nulls.append(r.null_pwcca)
            reals.append(r.pwcca)
            assert 0.5 < r.null_mean_cca / np.sqrt(c / n) < 2
            assert 0.5 < r.null_pwcca / np.sqrt(c / n) < 2
    assert nulls[0] > nulls[1] > nulls[2]
    assert reals[0] > reals[1] > reals[2]  # independent layers: the real value is bias, too


def test_null_is_far_below_related_layers():
    x, y = _latent_pair(np.random.default_rng(16), 4000, 8, 8, 6, 0.2)
    r = similarity(x, y)
    assert r.pwcca > 0.6
    assert r.null_pwcca < 0.15
    assert r.null_linear_cka < 0.05


# ------------------------------------------------------------------------------------------------
# Errors and warnings


def test_few_samples_warns_with_numbers():
    rng = np.random.default_rng(17)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((50, 3))
    for call in (lambda: mean_cca(x, y), lambda: similarity(x, y), lambda: PairMoments(8, 3).update(x, y).pwcca()):
        with pytest.warns(SimilarityWarning, match=r"n=50 samples for c=8 channels.*100×c = 800") as record:
            call()
        assert record[0].filename == __file__  # points at the caller's line, not into the package


def test_dead_layer_warns_and_gives_nan():
    rng = np.random.default_rng(18)
    x = np.ones((900, 4))
    with pytest.warns(SimilarityWarning, match=r"no live channel left \(dead_x=4 of cx=4"):
        r = similarity(x, rng.standard_normal((900, 3)))
    assert np.isnan(_values(r)).all()
    assert (r.dead_x, r.rank_x) == (4, 0)


def _rand(*shape):
    return np.random.default_rng(0).standard_normal(shape)


ERRORS = [
    ("x_not_2d", lambda: mean_cca(_rand(2, 3, 4), _rand(2, 3)), r"x must have shape \(samples, channels\), got x.shape=\(2, 3, 4\); flatten"),
    ("y_not_2d", lambda: linear_cka(_rand(10, 3), _rand(10)), r"y must have shape \(samples, channels\), got y.shape=\(10,\)"),
    ("rows_differ", lambda: svcca(_rand(10, 3), _rand(11, 3)), r"same samples .* got x.shape=\(10, 3\) and y.shape=\(11, 3\)"),
    ("no_channels", lambda: pwcca(_rand(10, 0), _rand(10, 3)), r"x must have at least one channel, got x.shape=\(10, 0\)"),
    ("fewer_samples_than_channels", lambda: mean_cca(_rand(5, 8), _rand(5, 3)), r"got n=5 samples for cx=8, cy=3 channels"),
    ("one_sample", lambda: mean_cca(_rand(1, 1), _rand(1, 1)), r"at least 2.*got n=1 samples"),
    ("nan_in_x", lambda: mean_cca(np.full((20, 2), np.nan), _rand(20, 2)), r"x contains NaN or inf"),
    ("inf_in_y", lambda: mean_cca(_rand(20, 2), np.full((20, 2), np.inf)), r"y contains NaN or inf"),
    ("keep_zero", lambda: svcca(_rand(20, 2), _rand(20, 2), keep=0.0), r"`keep` must be a fraction of variance in \(0, 1\], got 0.0"),
    ("keep_above_one", lambda: svcca(_rand(20, 2), _rand(20, 2), keep=99), r"got 99"),
    ("keep_bool", lambda: svcca(_rand(20, 2), _rand(20, 2), keep=True), r"got True"),
    ("bad_side", lambda: pwcca(_rand(20, 2), _rand(20, 2), side="smaller"), r"`side` must be one of \('fewer', 'x', 'y', 'sym'\), got 'smaller'"),
    ("bad_seed", lambda: similarity(_rand(20, 2), _rand(20, 2), null_seed=-1), r"`null_seed` must be a non-negative integer or None, got -1"),
    ("acc_bad_cx", lambda: PairMoments(0, 3), r"`cx` must be a positive integer \(number of channels\), got 0"),
    ("acc_bool_cy", lambda: PairMoments(3, True), r"`cy` must be a positive integer .* got True"),
    ("acc_wrong_channels", lambda: PairMoments(3, 4).update(_rand(10, 3), _rand(10, 5)), r"chunk has cx=3, cy=5 channels but this accumulator was created with cx=3, cy=4"),
    ("acc_chunk_rows", lambda: PairMoments(3, 4).update(_rand(10, 3), _rand(9, 4)), r"got x.shape=\(10, 3\) and y.shape=\(9, 4\)"),
    ("acc_empty_results", lambda: PairMoments(3, 4).results(), r"holds no samples yet: call update\(x, y\) first"),
    ("acc_too_few", lambda: PairMoments(3, 4).update(_rand(3, 3), _rand(3, 4)).results(), r"got n=3 samples for cx=3, cy=4 channels"),
    ("acc_bad_keep", lambda: PairMoments(1, 1).update(_rand(9, 1), _rand(9, 1)).results(keep=1.5), r"got 1.5"),
    ("merge_channels", lambda: PairMoments(3, 4).merge(PairMoments(3, 5)), r"cannot merge PairMoments\(cx=3, cy=5.* channel counts differ"),
    ("merge_seed", lambda: PairMoments(3, 4).merge(PairMoments(3, 4, null_seed=1)), r"null_seed=1 vs 0"),
    ("stats_shape", lambda: similarity_from_statistics(10, 2, 2, np.eye(3)), r"cov must have shape \(4, 4\) .* got cov.shape=\(3, 3\)"),
]


@pytest.mark.filterwarnings("ignore::nnunet_transfer.analysis.SimilarityWarning")
@pytest.mark.parametrize("call, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_merge_type_error():
    with pytest.raises(TypeError, match=r"can only merge another PairMoments, got dict"):
        PairMoments(2, 2).merge({})


def test_bad_chunk_leaves_state_unchanged():
    x, y = case_random(np.random.default_rng(19))
    acc = _stream(x, y, [N])
    before = acc.results()
    bad = x[:10].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        acc.update(bad, y[:10])
    np.testing.assert_array_equal(_values(acc.results()), _values(before))
    assert acc.n == N


def test_canonical_correlations_descending():
    x, y = case_correlated(np.random.default_rng(20))
    rho = canonical_correlations(x, y)
    assert rho.shape == (6,)
    assert np.all(np.diff(rho) <= 0)
