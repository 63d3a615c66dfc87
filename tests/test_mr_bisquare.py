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


def _resid(xy: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Residuals ``y - x beta`` per row."""
    p = xy.shape[1] - 1
    return xy[:, p] - np.einsum("mak,ma->mk", xy[:, :p], beta)


def _row_sums(xy: np.ndarray, i: int, beta: np.ndarray, c: float) -> tuple:
    if xy.shape[1] == 3:
        return kernels.row_sums_2(xy, i, beta[0], beta[1], c)
    return kernels.row_sums_1(xy, i, beta[0], c)


@pytest.mark.parametrize("p", [1, 2])
def test_row_sums__match_the_definitions(p):
    xy = _design(p)
    rng = np.random.default_rng(1)
    beta = rng.normal(scale=0.3, size=(xy.shape[0], p))
    inv = rng.uniform(0.2, 1.0, xy.shape[0])
    u = _resid(xy, beta) * inv[:, None]
    t = u * u
    v = np.maximum(1 - t, 0)
    nz = kernels.n_sums(p)
    got = np.array([_row_sums(xy, i, beta[i], inv[i]) for i in range(xy.shape[0])])
    np.testing.assert_allclose(got[:, :nz], _flat(xy, v * v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, nz : 2 * nz], _flat(xy, v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, -2], (1 - v**3).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got[:, -1], (v * v * t).sum(axis=1), rtol=1e-12)
    b1 = beta[:, 1] if p == 2 else np.zeros(xy.shape[0])
    rho = np.array([kernels.row_rho(xy, i, beta[i, 0], b1[i], inv[i]) for i in range(xy.shape[0])])
    np.testing.assert_allclose(rho, got[:, -2:], rtol=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_row_resid_stats__count_small_residuals_and_sum_squares(p):
    xy = _design(p, seed=7)
    beta = np.random.default_rng(8).normal(size=(xy.shape[0], p))
    r = _resid(xy, beta)
    b1 = beta[:, 1] if p == 2 else np.zeros(xy.shape[0])
    for i in range(xy.shape[0]):
        small, rss = kernels.row_resid_stats(xy, i, beta[i, 0], b1[i], 0.5)
        assert small == np.count_nonzero(np.abs(r[i]) < 0.5)  # unused entries (residual 0) count too
        assert rss == pytest.approx((r[i] ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_row_mscale__solves_the_scale_equation_as_brentq(p):
    xy = _design(p, m=6, k=50, seed=3)
    used = xy[:, 0] != 0
    xy[:, p] += np.random.default_rng(3).standard_t(3, size=(6, 50)) * used
    beta = np.full((6, p), 0.2)
    r = _resid(xy, beta)
    target = 0.5 * (used.sum(axis=1) - p)

    def excess(s: float, row: np.ndarray, goal: float) -> float:
        return np.sum(1 - np.maximum(1 - (row / (C_CHI * s)) ** 2, 0) ** 3) - goal

    for i in range(6):
        b1 = beta[i, 1] if p == 2 else 0.0
        got = kernels.row_mscale(xy, i, beta[i, 0], b1, target[i], 1.0, C_CHI, 1e-12, 100)
        want = optimize.brentq(excess, 1e-3, 1e3, args=(r[i], target[i]), xtol=1e-14)
        assert got == pytest.approx(want, rel=1e-9)


def test_design_sums__match_einsum():
    for p in (1, 2):
        xy = _design(p, seed=9)
        np.testing.assert_allclose(kernels.design_sums(xy), _flat(xy, np.ones(xy.shape[::2])), rtol=1e-12)


def test_ratios_intercepts_abs_resid__used_entries_only_inf_elsewhere():
    xy = _design(2, seed=10)
    xy[:, 0] = np.where(xy[:, 1] != 0, 1.5, 0.0)  # an intercept column, 0 at unused entries
    valid = xy[:, 0] != 0
    xy[0, 1, 0] = 0.0  # a used instrument with x = 0 has no ratio
    xy[1, 0, 1] = 0.0  # ... and where x0 = 0 the intercept residual is left undivided
    out = np.empty(xy.shape[::2])
    count = kernels.ratios(xy, valid, out)
    usable = valid & (xy[:, 1] != 0)
    np.testing.assert_array_equal(count, usable.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(out, np.where(usable, xy[:, 2] / xy[:, 1], np.inf))
    slope = np.random.default_rng(11).normal(size=xy.shape[0])
    kernels.intercepts(xy, valid, slope, out)
    r = xy[:, 2] - slope[:, None] * xy[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(valid, np.where(xy[:, 0] != 0, r / xy[:, 0], r), np.inf)
    np.testing.assert_allclose(out, want, rtol=1e-15)
    beta = np.column_stack([slope, -slope])
    kernels.abs_resid(xy, valid, beta, out)
    np.testing.assert_allclose(out, np.where(valid, np.abs(_resid(xy, beta)), np.inf), rtol=1e-13, atol=1e-15)


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
