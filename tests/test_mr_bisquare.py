"""The fused bisquare loops of the MM fits against direct numpy formulas and a scipy root finder."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from deepmr_dist.mr import _bisquare as kernels
from deepmr_dist.mr.robust import C_CHI, C_PSI


def _design(p: int, m: int = 7, k: int = 40, seed: int = 0) -> np.ndarray:
    """``(m, p + 1, k)`` design and response, the last entries of each row unused (zero)."""
    rng = np.random.default_rng(seed)
    xy = rng.normal(size=(m, p + 1, k))
    used = rng.integers(p + 1, k + 1, m)
    xy[np.arange(k)[None, None, :] >= used[:, None, None].repeat(p + 1, axis=1)] = 0.0
    return xy


def _flat(xy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Flat weighted sums by einsum: the upper triangle of sum w x x', then sum w x y."""
    p = xy.shape[1] - 1
    x, y = xy[:, :p], xy[:, p]
    xx = np.einsum("mk,mak,mbk->mab", w, x, x)
    upper = [xx[:, a, b] for a in range(p) for b in range(a, p)]
    return np.stack([*upper, *np.einsum("mk,mak,mk->ma", w, x, y).T], axis=1)


@pytest.mark.parametrize("p", [1, 2])
def test_bisquare_sums__match_the_definitions(p):
    xy = _design(p)
    rng = np.random.default_rng(1)
    beta = rng.normal(scale=0.3, size=(xy.shape[0], p))
    inv = rng.uniform(0.2, 1.0, xy.shape[0])
    u = (xy[:, p] - np.einsum("mak,ma->mk", xy[:, :p], beta)) * inv[:, None]
    t = u * u
    v = np.maximum(1 - t, 0)
    got = kernels.bisquare_sums(xy, beta, inv)
    nz = kernels.n_sums(p)
    np.testing.assert_allclose(got[:, :nz], _flat(xy, v * v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, nz : 2 * nz], _flat(xy, v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, -2], (1 - v**3).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got[:, -1], (v * v * t).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(kernels.rho_sums(u / inv[:, None], inv), (1 - v**3).sum(axis=1), rtol=1e-12)


def test_bisquare_sums__rows_with_non_finite_parameters_are_nan_and_leave_others_alone():
    xy = _design(2)
    beta = np.zeros((xy.shape[0], 2))
    inv = np.ones(xy.shape[0])
    clean = kernels.bisquare_sums(xy, beta, inv)
    beta[1, 0] = np.nan
    inv[3] = np.inf
    got = kernels.bisquare_sums(xy, beta, inv)
    assert np.isnan(got[[1, 3]]).all()
    np.testing.assert_array_equal(np.delete(got, [1, 3], axis=0), np.delete(clean, [1, 3], axis=0))
    assert np.isnan(kernels.rho_sums(xy[:, 2], inv)[3])


def test_weighted_sums__match_einsum():
    xy = _design(2)
    w = np.random.default_rng(2).random(xy.shape[::2])
    np.testing.assert_allclose(kernels.weighted_sums(xy, w), _flat(xy, w), rtol=1e-12)


def test_mscale__solves_the_scale_equation_as_brentq():
    rng = np.random.default_rng(3)
    r = rng.standard_t(3, size=(6, 50))
    r[0, 30:] = 0.0  # unused entries: zero residual, rho 0
    target = 0.5 * np.array([48, 48, 48, 48, 48, 48.0])
    got = kernels.mscale(r * r, target, np.ones(6), C_CHI)

    def excess(s: float, row: np.ndarray, goal: float) -> float:
        return np.sum(1 - np.maximum(1 - (row / (C_CHI * s)) ** 2, 0) ** 3) - goal

    for i in range(6):
        assert got[i] == pytest.approx(optimize.brentq(excess, 1e-3, 1e3, args=(r[i], target[i]), xtol=1e-14), rel=1e-9)


def test_mscale__keeps_starts_that_are_not_positive_finite():
    r2 = np.ones((3, 5))
    got = kernels.mscale(r2, np.full(3, 2.0), np.array([0.0, np.nan, 1.0]), C_CHI)
    assert got[0] == 0.0 and np.isnan(got[1]) and got[2] > 0


@pytest.mark.parametrize("p", [1, 2])
def test_avar1_sums__match_the_definitions(p):
    xy = _design(p, seed=4)
    rng = np.random.default_rng(5)
    m = xy.shape[0]
    beta, beta_s = rng.normal(scale=0.3, size=(m, p)), rng.normal(scale=0.3, size=(m, p))
    s = rng.uniform(0.5, 2.0, m)
    x, y = xy[:, :p], xy[:, p]
    r = (y - np.einsum("mak,ma->mk", x, beta)) / s[:, None]
    t = (r / C_PSI) ** 2
    v = np.maximum(1 - t, 0)
    psi, dpsi = r * v * v, v * (1 - 5 * t)
    u0 = (y - np.einsum("mak,ma->mk", x, beta_s)) / (C_CHI * s[:, None])
    v0 = np.maximum(1 - u0 * u0, 0)
    chi = 1 - v0**3
    got = kernels.avar1_sums(xy, beta, beta_s, s, C_PSI, C_CHI)
    nz, q = kernels.n_sums(p), p * (p + 1) // 2
    np.testing.assert_allclose(got[:, :nz], _flat(xy, dpsi), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[:, nz : nz + q], _flat(xy, psi * psi)[:, :q], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[:, nz + q : nz + q + p], np.einsum("mak,mk->ma", x, psi * chi), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[:, -3:], np.stack([(r * r).sum(1), (u0 * u0 * v0 * v0).sum(1), (chi * chi).sum(1)], 1), rtol=1e-11)


def test_egger_design__orients_and_weights_used_entries_only():
    rng = np.random.default_rng(6)
    bx, by, byse = rng.normal(size=(4, 9)), rng.normal(size=(4, 9)), rng.uniform(0.1, 1, (4, 9))
    bx[0, 0] = 0.0
    valid = rng.random((4, 9)) < 0.7
    bx, by, byse = np.where(valid, bx, 0.0), np.where(valid, by, 0.0), np.where(valid, byse, 1.0)  # as MRData stores them
    out = np.full((4, 3, 9), np.nan)
    kernels.egger_design(bx, by, byse, valid, out)
    want = np.stack([np.ones_like(bx), np.abs(bx), np.sign(bx) * by], axis=1) / byse[:, None, :]
    np.testing.assert_allclose(out, np.where(valid[:, None, :], want, 0.0), rtol=1e-15)
