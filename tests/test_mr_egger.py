"""MR-Egger kernels against statsmodels WLS / numpy lstsq on oriented data and the package vignette."""

from __future__ import annotations

import numpy as np
import statsmodels.api as sm
from scipy import stats

from deepmr_dist.mr import estimate

from helpers_mr import rel, simulate
from mr_reference_data import CHD, CHDSE, LDLC, LDLCSE


def _pleiotropic(rng, bx, byse):
    scale = rng.choice([0.5, 2.0], (bx.shape[0], 1))  # under- and over-dispersed loci
    return 0.05 + 0.4 * bx + rng.normal(0.0, 1.0, bx.shape) * byse * scale


def _simulate(seed: int, n_loci: int = 30, max_k: int = 25, min_k: int = 3):
    return simulate(seed, n_loci, max_k, min_k, _pleiotropic)


def test_egger__matches_statsmodels_wls_on_oriented_data():
    bx, bxse, by, byse, k = _simulate(11)
    r = estimate(bx, bxse, by, byse, methods=("egger",))["egger"]
    for i in range(bx.shape[0]):
        x = bx[i, : k[i]]
        y = np.sign(x) * by[i, : k[i]]
        w = byse[i, : k[i]] ** -2
        fit = sm.WLS(y, sm.add_constant(np.abs(x)), weights=w).fit()
        sigma = np.sqrt(fit.scale)
        assert rel(r.estimate[i], fit.params[1]) < 1e-8
        assert rel(r.intercept[i], fit.params[0]) < 1e-8
        assert rel(r.se[i], fit.bse[1] / min(1.0, sigma)) < 1e-8
        assert rel(r.intercept_se[i], fit.bse[0] / min(1.0, sigma)) < 1e-8
        assert rel(r.rse[i], sigma) < 1e-8
        assert rel(r.q[i], fit.ssr) < 1e-8
        assert rel(r.q_pvalue[i], stats.chi2.sf(fit.ssr, k[i] - 2)) < 1e-7
        z = stats.norm.ppf(0.975)
        assert rel(r.ci_lower[i], fit.params[1] - z * r.se[i]) < 1e-8
        assert rel(r.pvalue[i], 2 * stats.norm.sf(abs(fit.params[1] / r.se[i]))) < 1e-8


def test_egger__matches_lstsq():
    bx, bxse, by, byse, k = _simulate(12)
    r = estimate(bx, bxse, by, byse, methods=("egger",))["egger"]
    for i in range(bx.shape[0]):
        sw = 1.0 / byse[i, : k[i]]
        x = bx[i, : k[i]]
        design = np.column_stack([sw, np.abs(x) * sw])
        coef, *_ = np.linalg.lstsq(design, np.sign(x) * by[i, : k[i]] * sw, rcond=None)
        assert rel(r.intercept[i], coef[0]) < 1e-8 and rel(r.estimate[i], coef[1]) < 1e-8


def test_egger__negative_bx_is_oriented():
    bx, bxse, by, byse, _ = _simulate(13, n_loci=5, min_k=8)
    flip = np.array([True, False] * 20)[: bx.shape[1]]
    bx2, by2 = bx.copy(), by.copy()
    bx2[:, flip] *= -1.0  # flipping the allele changes the signs of both associations
    by2[:, flip] *= -1.0
    a = estimate(bx, bxse, by, byse, methods=("egger",))["egger"]
    b = estimate(bx2, bxse, by2, byse, methods=("egger",))["egger"]
    np.testing.assert_allclose(b.estimate, a.estimate, rtol=1e-10)
    np.testing.assert_allclose(b.intercept, a.intercept, rtol=1e-10)
    np.testing.assert_allclose(b.se, a.se, rtol=1e-10)
    # and the orientation is what makes it invariant: a naive fit on unoriented data differs
    naive = sm.WLS(by2[0, :8], sm.add_constant(bx2[0, :8]), weights=byse[0, :8] ** -2).fit()
    assert abs(naive.params[1] - a.estimate[0]) > 1e-6


def test_egger__t_dist_follows_egger_bounds():
    bx, bxse, by, byse, k = _simulate(14)
    r = estimate(bx, bxse, by, byse, methods=("egger",), egger_t_dist=True)["egger"]
    z = stats.norm.ppf(0.975)
    for i in range(bx.shape[0]):
        tq = stats.t.ppf(0.975, k[i] - 2)
        theta, se, rse = r.estimate[i], r.se[i], r.rse[i]
        if rse < 1:
            lower = min(theta - z * se, theta - tq * se * rse)
            p = max(2 * stats.norm.sf(abs(theta / se)), 2 * stats.t.sf(abs(theta / se / rse), k[i] - 2))
        else:
            lower = theta - tq * se
            p = 2 * stats.t.sf(abs(theta / se), k[i] - 2)
        assert rel(r.ci_lower[i], lower) < 1e-10
        assert rel(r.pvalue[i], p) < 1e-8


def test_egger__i2gx_matches_package_formula():
    bx, bxse, by, byse, k = _simulate(15)
    r = estimate(bx, bxse, by, byse, methods=("egger",))["egger"]
    for i in range(bx.shape[0]):
        x, sx, sy = np.abs(bx[i, : k[i]]), bxse[i, : k[i]], byse[i, : k[i]]
        w = (sx / sy) ** -2
        v = x / sy
        q = np.sum(w * (v - np.average(v, weights=w)) ** 2)
        assert rel(r.i2gx[i] + 1e-300, max(0.0, (q - (k[i] - 1)) / q) + 1e-300) < 1e-10


def test_egger__vignette_ldl_chd():
    r = estimate(LDLC, LDLCSE, CHD, CHDSE, methods=("egger",))["egger"]
    # MendelianRandomization vignette: MR-Egger 3.253 (0.770), CI 1.743, 4.762; intercept -0.011 (0.015),
    # CI -0.041, 0.018, p = 0.451; RSE 1.935; heterogeneity 97.3975 on 26 df; I^2_GX 91.9%
    assert round(float(r.estimate[0]), 3) == 3.253 and round(float(r.se[0]), 3) == 0.770
    assert round(float(r.ci_lower[0]), 3) == 1.743 and round(float(r.ci_upper[0]), 3) == 4.762
    assert round(float(r.intercept[0]), 3) == -0.011 and round(float(r.intercept_se[0]), 3) == 0.015
    assert round(float(r.intercept_ci_lower[0]), 3) == -0.041 and round(float(r.intercept_ci_upper[0]), 3) == 0.018
    assert round(float(r.intercept_pvalue[0]), 3) == 0.451
    assert round(float(r.rse[0]), 3) == 1.935
    assert round(float(r.q[0]), 4) == 97.3975
    assert round(100 * float(r.i2gx[0]), 1) == 91.9


def test_egger__fewer_than_three_instruments_is_undefined():
    r = estimate([[0.1, 0.2, np.nan]], [[0.1] * 3], [[0.1, 0.3, np.nan]], [[0.1] * 3], methods=("egger",))["egger"]
    assert r.reason[0] == "too_few_instruments"
    assert np.isnan(r.estimate[0]) and np.isnan(r.intercept[0]) and r.n[0] == 2


def test_egger__equal_abs_bx_is_singular():
    bx = [[0.2, -0.2, 0.2, 0.2]]  # duplicate |bx|: slope and intercept are not separately identified
    r = estimate(bx, [[0.05] * 4], [[0.1, -0.12, 0.09, 0.11]], [[0.05] * 4], methods=("egger",))["egger"]
    assert r.reason[0] == "singular_fit"
    assert np.isnan(r.estimate[0]) and np.isnan(r.se[0])


def test_egger__all_bx_zero_is_undefined():
    r = estimate([[0.0] * 4], [[0.05] * 4], [[0.1, -0.12, 0.09, 0.11]], [[0.05] * 4], methods=("egger",))["egger"]
    assert r.reason[0] == "all_bx_zero"
