"""IVW kernels against weighted least squares (numpy lstsq, statsmodels WLS) and the package vignette."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats

from deepmr_dist.mr import estimate

from helpers_mr import rel, simulate
from mr_reference_data import CHD, CHDSE, LDLC, LDLCSE


def _dispersed(rng, bx, byse):
    return 0.4 * bx + rng.normal(0.0, 1.0, bx.shape) * byse * rng.uniform(0.5, 2.5, (bx.shape[0], 1))


def _simulate(seed: int, n_loci: int = 30, max_k: int = 25, min_k: int = 1):
    return simulate(seed, n_loci, max_k, min_k, _dispersed)


def test_ivw__matches_statsmodels_wls_per_locus():
    bx, bxse, by, byse, k = _simulate(1, min_k=2)
    res = estimate(bx, bxse, by, byse, methods=("ivw_fixed", "ivw_random", "ivw"))
    for i in range(bx.shape[0]):
        x, y, w = bx[i, : k[i]], by[i, : k[i]], byse[i, : k[i]] ** -2
        fit = sm.WLS(y, x[:, None], weights=w).fit()
        sigma = np.sqrt(fit.scale)
        se_fixed = fit.bse[0] / sigma
        assert rel(res["ivw_fixed"].estimate[i], fit.params[0]) < 1e-8
        assert rel(res["ivw_fixed"].se[i], se_fixed) < 1e-8
        assert rel(res["ivw_random"].se[i], se_fixed * max(1.0, sigma)) < 1e-8
        assert rel(res["ivw_random"].rse[i], sigma) < 1e-8
        expected_default = se_fixed * max(1.0, sigma) if k[i] >= 4 else se_fixed
        assert rel(res["ivw"].se[i], expected_default) < 1e-8
        q = float(np.sum(w * (y - fit.params[0] * x) ** 2))
        assert rel(res["ivw"].q[i], q) < 1e-8
        assert rel(res["ivw"].q_pvalue[i], stats.chi2.sf(q, k[i] - 1)) < 1e-8
        assert rel(res["ivw"].i2[i] + 1e-300, max(0.0, (q - (k[i] - 1)) / q) + 1e-300) < 1e-8
        f = np.mean((bx[i, : k[i]] / bxse[i, : k[i]]) ** 2)
        assert rel(res["ivw"].fstat[i], f) < 1e-12


def test_ivw__matches_lstsq_on_sqrt_weighted_data():
    bx, bxse, by, byse, k = _simulate(2, min_k=2)
    res = estimate(bx, bxse, by, byse, methods=("ivw_fixed",))["ivw_fixed"]
    for i in range(bx.shape[0]):
        sw = 1.0 / byse[i, : k[i]]
        coef, *_ = np.linalg.lstsq((bx[i, : k[i]] * sw)[:, None], by[i, : k[i]] * sw, rcond=None)
        assert rel(res.estimate[i], coef[0]) < 1e-8


def test_ivw__normal_interval_and_pvalue():
    bx, bxse, by, byse, _ = _simulate(3, min_k=2)
    r = estimate(bx, bxse, by, byse, methods=("ivw",), alpha=0.1)["ivw"]
    z = stats.norm.ppf(0.95)
    np.testing.assert_allclose(r.ci_lower, r.estimate - z * r.se, rtol=1e-12)
    np.testing.assert_allclose(r.ci_upper, r.estimate + z * r.se, rtol=1e-12)
    np.testing.assert_allclose(r.pvalue, 2 * stats.norm.sf(np.abs(r.estimate / r.se)), rtol=1e-12)


def test_ivw__t_dist_uses_n_minus_1_df():
    bx, bxse, by, byse, k = _simulate(4, min_k=2)
    r = estimate(bx, bxse, by, byse, methods=("ivw",), t_dist=True)["ivw"]
    tq = stats.t.ppf(0.975, k - 1)
    np.testing.assert_allclose(r.ci_upper, r.estimate + tq * r.se, rtol=1e-12)
    np.testing.assert_allclose(r.pvalue, 2 * stats.t.sf(np.abs(r.estimate / r.se), k - 1), rtol=1e-12)


def test_ivw__vignette_ldl_chd():
    r = estimate(LDLC, LDLCSE, CHD, CHDSE, methods=("ivw",))["ivw"]
    # MendelianRandomization vignette: IVW 2.834 (0.530), 95% CI 1.796, 3.873, RSE 1.920,
    # Q = 99.5304 on 27 df, I^2 = 72.9%, F = 28.0
    assert round(float(r.estimate[0]), 3) == 2.834
    assert round(float(r.se[0]), 3) == 0.530
    assert round(float(r.ci_lower[0]), 3) == 1.796 and round(float(r.ci_upper[0]), 3) == 3.873
    assert round(float(r.rse[0]), 3) == 1.920
    assert round(float(r.q[0]), 4) == 99.5304
    assert round(100 * float(r.i2[0]), 1) == 72.9
    assert round(float(r.fstat[0]), 1) == 28.0


def test_ivw__single_instrument_is_the_ratio_estimate():
    r = estimate([0.2], [0.05], [0.1], [0.04], methods=("ivw", "ivw_random"))
    for res in r.values():
        assert res.estimate[0] == pytest.approx(0.5, rel=1e-12)
        assert res.se[0] == pytest.approx(0.04 / 0.2, rel=1e-12)
        assert res.rse[0] == 1.0
        assert np.isnan(res.q[0]) and res.reason[0] == ""


def test_ivw__all_bx_zero_is_undefined():
    r = estimate([[0.0, 0.0, 0.0]], [[0.1] * 3], [[0.1, 0.2, 0.3]], [[0.1] * 3], methods=("ivw",))["ivw"]
    assert np.isnan(r.estimate[0]) and np.isnan(r.se[0])
    assert r.reason[0] == "all_bx_zero"


def test_penalized_ivw__matches_direct_formula():
    bx, bxse, by, byse, k = _simulate(5, min_k=2)
    by[:, 0] += 1.0  # an outlying first instrument
    r = estimate(bx, bxse, by, byse, methods=("penalized_ivw",))["penalized_ivw"]
    for i in range(bx.shape[0]):
        x, y, se = bx[i, : k[i]], by[i, : k[i]], byse[i, : k[i]]
        ratio = y / x
        pen = stats.chi2.sf(x**2 / se**2 * (ratio - np.median(ratio)) ** 2, 1)
        w = se**-2 * np.minimum(1.0, 100.0 * pen)
        est = np.sum(w * x * y) / np.sum(w * x * x)
        sigma = np.sqrt(np.sum(w * (y - est * x) ** 2) / (k[i] - 1)) if k[i] > 1 else 1.0
        se_exp = (max(1.0, sigma) if k[i] >= 4 else 1.0) / np.sqrt(np.sum(w * x * x))
        assert rel(r.estimate[i], est) < 1e-8
        assert rel(r.se[i], se_exp) < 1e-8
        assert np.isnan(r.q[i])


def test_penalized_ivw__zero_bx_ratio_is_undefined():
    r = estimate([[0.2, 0.0, 0.1]], [[0.1] * 3], [[0.1, 0.2, 0.3]], [[0.1] * 3], methods=("penalized_ivw",))
    assert r["penalized_ivw"].reason[0] == "zero_bx"
    assert np.isnan(r["penalized_ivw"].estimate[0])


def test_penalized_ivw__penalization_argument_overrides_the_package_factor():
    bx, bxse, by, byse, k = _simulate(6, min_k=5)
    by[:, 0] += 1.0
    r = estimate(bx, bxse, by, byse, methods=("penalized_ivw",), penalization=20.0)["penalized_ivw"]
    for i in range(bx.shape[0]):
        x, y, se = bx[i, : k[i]], by[i, : k[i]], byse[i, : k[i]]
        ratio = y / x
        pen = stats.chi2.sf(x**2 / se**2 * (ratio - np.median(ratio)) ** 2, 1)
        w = se**-2 * np.minimum(1.0, 20.0 * pen)
        assert rel(r.estimate[i], np.sum(w * x * y) / np.sum(w * x * x)) < 1e-8
