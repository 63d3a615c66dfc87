"""Tests of the meta-analysis kernels against metafor's published figures and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from deepmr_dist.errors import InputError
from deepmr_dist.meta import META_COLUMNS, META_METHODS, META_REASONS, MetaResult, check_method, meta_analysis

# dat.bcg from metafor (Colditz et al. 1994): 13 BCG vaccine trials.
TPOS = np.array([4, 6, 3, 62, 33, 180, 8, 505, 29, 17, 186, 5, 27], dtype=float)
TNEG = np.array([119, 300, 228, 13536, 5036, 1361, 2537, 87886, 7470, 1699, 50448, 2493, 16886.0])
CPOS = np.array([11, 29, 11, 248, 47, 372, 10, 499, 45, 65, 141, 3, 29], dtype=float)
CNEG = np.array([128, 274, 209, 12619, 5761, 1079, 619, 87892, 7232, 1600, 27197, 2338, 17825.0])


def bcg_rr() -> tuple[np.ndarray, np.ndarray]:
    """Log risk ratios and sampling variances exactly as ``escalc(measure="RR")``."""
    n1, n2 = TPOS + TNEG, CPOS + CNEG
    yi = np.log(TPOS / n1) - np.log(CPOS / n2)
    vi = 1 / TPOS - 1 / n1 + 1 / CPOS - 1 / n2
    return yi, vi


# ----------------------------------------------------------------- independent references


def ref_fe(y, v):
    w = 1 / v
    mu = np.sum(w * y) / np.sum(w)
    return mu, np.sqrt(1 / np.sum(w)), np.sum(w * (y - mu) ** 2)


def ref_re(y, v, tau2):
    w = 1 / (v + tau2)
    mu = np.sum(w * y) / np.sum(w)
    return mu, np.sqrt(1 / np.sum(w)), w


def ref_generalized_q(tau2, y, v):
    mu, _, w = ref_re(y, v, tau2)
    return np.sum(w * (y - mu) ** 2)


def ref_pm(y, v):
    k = len(y)
    if ref_generalized_q(0.0, y, v) <= k - 1:
        return 0.0
    return optimize.brentq(lambda t: ref_generalized_q(t, y, v) - (k - 1), 0.0, 100.0, xtol=1e-15)


def neg_restricted_loglik(tau2, y, v):
    """-2 x restricted log-likelihood of the intercept-only random-effects model (no constant)."""
    mu, _, w = ref_re(y, v, tau2)
    return np.sum(np.log(v + tau2)) + np.log(np.sum(w)) + np.sum(w * (y - mu) ** 2)


def reml_score(tau2, y, v):
    """Derivative of the restricted log-likelihood in tau2 (times 2)."""
    mu, _, w = ref_re(y, v, tau2)
    return np.sum(w**2 * (y - mu) ** 2) - np.sum(w) + np.sum(w**2) / np.sum(w)


def ref_reml(y, v):
    if reml_score(0.0, y, v) <= 0:
        return 0.0
    return optimize.brentq(reml_score, 0.0, 100.0, args=(y, v), xtol=1e-15)


def one(result: MetaResult, name: str, i: int = 0) -> float:
    return float(getattr(result, name)[i])


# ----------------------------------------------------------------- BCG against metafor


def test_bcg__dl_matches_metafor():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "dl")
    assert round(one(res, "estimate"), 4) == -0.7141
    assert round(one(res, "tau2"), 4) == 0.3088
    assert round(one(res, "i2"), 2) == 92.12
    assert round(one(res, "q"), 2) == 152.23
    assert round(one(res, "se"), 4) == 0.1787
    assert one(res, "k") == 13
    assert res.reason[0] == ""


def test_bcg__reml_matches_metafor():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "reml")
    assert round(one(res, "tau2"), 4) == 0.3132
    assert round(one(res, "estimate"), 4) == -0.7145
    assert round(one(res, "se"), 4) == 0.1798
    assert round(one(res, "ci_lower"), 4) == -1.0669
    assert round(one(res, "ci_upper"), 4) == -0.3622
    # predict(res): pi.lb -1.8667, pi.ub 0.4376
    assert round(one(res, "pi_lower"), 4) == -1.8667
    assert round(one(res, "pi_upper"), 4) == 0.4376
    assert round(one(res, "i2"), 2) == 92.22
    assert round(one(res, "h2"), 2) == 12.86


def test_bcg__reml_knha_matches_metafor():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "reml", hksj=True)
    # rma(yi, vi, test="knha"): se 0.1808, p 0.0019, CI -1.1084 to -0.3206
    assert round(one(res, "se"), 4) == 0.1808
    assert round(one(res, "pvalue"), 4) == 0.0019
    assert round(one(res, "ci_lower"), 4) == -1.1084
    assert round(one(res, "ci_upper"), 4) == -0.3206


def test_bcg__fe_matches_metafor():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "fe")
    assert round(one(res, "estimate"), 4) == -0.4303
    assert round(one(res, "se"), 4) == 0.0405
    assert one(res, "tau2") == 0.0
    assert round(one(res, "i2"), 2) == 92.12  # Q-based for FE models
    assert round(one(res, "h2"), 2) == 12.69
    assert np.isnan(one(res, "pi_lower")) and np.isnan(one(res, "pi_upper"))


def test_bcg__pm_solves_generalized_q_equation():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "pm")
    expected = ref_pm(yi, vi)
    assert round(expected, 4) == 0.3181
    np.testing.assert_allclose(one(res, "tau2"), expected, rtol=1e-9)
    np.testing.assert_allclose(ref_generalized_q(one(res, "tau2"), yi, vi), 12.0, rtol=1e-9)
    mu, se, _ = ref_re(yi, vi, expected)
    np.testing.assert_allclose([one(res, "estimate"), one(res, "se")], [mu, se], rtol=1e-9)


def test_bcg__all_methods_match_statsmodels_where_it_has_them():
    from statsmodels.stats.meta_analysis import combine_effects

    yi, vi = bcg_rr()
    for method in ("dl", "pm"):
        sm = combine_effects(yi, vi, method_re=method)
        res = meta_analysis(yi, np.sqrt(vi), method)
        np.testing.assert_allclose(one(res, "tau2"), sm.tau2, rtol=1e-8)
        np.testing.assert_allclose(one(res, "estimate"), sm.mean_effect_re, rtol=1e-8)
        np.testing.assert_allclose(one(res, "se"), sm.sd_eff_w_re, rtol=1e-8)
        hk = meta_analysis(yi, np.sqrt(vi), method, hksj=True)
        np.testing.assert_allclose(one(hk, "se"), sm.summary_frame().loc["random effect wls", "sd_eff"], rtol=1e-8)


# ----------------------------------------------------------------- brute force


def test_reml__matches_bruteforce_maximisation_of_restricted_likelihood():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "reml")
    opt = optimize.minimize_scalar(
        neg_restricted_loglik, bounds=(0.0, 10.0), args=(yi, vi), method="bounded", options={"xatol": 1e-12}
    )
    np.testing.assert_allclose(one(res, "tau2"), opt.x, rtol=1e-6)
    np.testing.assert_allclose(one(res, "tau2"), ref_reml(yi, vi), rtol=1e-9)


# Per-locus MR-Egger estimates of one simulation round (every 30th locus): one study has
# variance 0.03 and others above 1e4. Fisher scoring oscillates with a growing amplitude
# around the maximum here (metafor stops with "Fisher scoring algorithm did not converge").
OSCILLATING_Y = np.array([-0.1325, 1.3026, 1.1146, 1.2787, 1.3519, 3.6741, 1.1241, 1.2545, 1.212, 1.3048, 1.3252,
                          -0.0969, 1.2521, 0.972, 1.1396, 1.4165, 1.2704, 0.9154, 1.6921])
OSCILLATING_SE = np.array([0.1804, 2.6622, 0.8327, 2.2997, 13.9404, 0.6711, 2.1726, 2.7752, 1.4958, 1.9568, 6.2133,
                           8.9357, 3.1241, 104.9572, 4.328, 3.3915, 5.3266, 1.1849, 89.3492])


def test_reml__where_fisher_scoring_oscillates_the_maximum_is_still_found():
    yi, vi = OSCILLATING_Y, OSCILLATING_SE**2
    res = meta_analysis(yi, OSCILLATING_SE, "reml")
    assert res.reason[0] == ""
    opt = optimize.minimize_scalar(
        neg_restricted_loglik, bounds=(0.0, 100.0), args=(yi, vi), method="bounded", options={"xatol": 1e-13}
    )
    np.testing.assert_allclose(one(res, "tau2"), opt.x, rtol=1e-7)
    mu, se, _ = ref_re(yi, vi, opt.x)
    np.testing.assert_allclose([one(res, "estimate"), one(res, "se")], [mu, se], rtol=1e-7)


def random_groups(seed: int, n_groups: int = 40, max_k: int = 15):
    rng = np.random.default_rng(seed)
    est = np.full((n_groups, max_k), np.nan)
    se = np.full((n_groups, max_k), np.nan)
    for g in range(n_groups):
        k = rng.integers(2, max_k + 1)
        tau = rng.choice([0.0, 0.05, 0.3, 1.0])
        s = rng.uniform(0.05, 0.6, size=k)
        cols = np.sort(rng.choice(max_k, size=k, replace=False))  # padding also in the middle
        est[g, cols] = 0.4 + rng.normal(0, tau, size=k) + rng.normal(0, s)
        se[g, cols] = s
    return est, se


@pytest.mark.parametrize("method", ["reml", "pm", "dl", "fe"])
def test_ragged_groups__each_group_matches_its_own_reference(method):
    est, se = random_groups(7)
    res = meta_analysis(est, se, method)
    for g in range(est.shape[0]):
        ok = np.isfinite(est[g])
        y, v = est[g, ok], se[g, ok] ** 2
        k = ok.sum()
        _, _, q = ref_fe(y, v)
        if method == "reml":
            tau2 = ref_reml(y, v)
        elif method == "pm":
            tau2 = ref_pm(y, v)
        elif method == "dl":
            w = 1 / v
            tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w**2).sum() / w.sum()))
        else:
            tau2 = 0.0
        mu, s, _ = ref_re(y, v, tau2)
        assert res.k[g] == k
        np.testing.assert_allclose(res.tau2[g], tau2, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose([res.estimate[g], res.se[g]], [mu, s], rtol=1e-8)
        np.testing.assert_allclose(res.q[g], q, rtol=1e-10)
        np.testing.assert_allclose(res.q_pvalue[g], stats.chi2.sf(q, k - 1), rtol=1e-8)
        z = stats.norm.isf(0.025)
        np.testing.assert_allclose([res.ci_lower[g], res.ci_upper[g]], [mu - z * s, mu + z * s], rtol=1e-8)
        np.testing.assert_allclose(res.pvalue[g], 2 * stats.norm.sf(abs(mu / s)), rtol=1e-8)


def test_reml__boundary_groups_get_exact_zero():
    est, se = random_groups(11)
    res = meta_analysis(est, se, "reml")
    for g in range(est.shape[0]):
        ok = np.isfinite(est[g])
        if reml_score(0.0, est[g, ok], se[g, ok] ** 2) <= 0:
            assert res.tau2[g] == 0.0


# ----------------------------------------------------------------- HKSJ closed form


@pytest.mark.parametrize("method", META_METHODS)
@pytest.mark.parametrize("adhoc", [False, True])
def test_hksj__matches_closed_form(method, adhoc):
    est, se = random_groups(3, n_groups=25)
    plain = meta_analysis(est, se, method)
    hk = meta_analysis(est, se, method, hksj=not adhoc, hksj_adhoc=adhoc)
    for g in range(est.shape[0]):
        ok = np.isfinite(est[g])
        y, v = est[g, ok], se[g, ok] ** 2
        k = ok.sum()
        tau2 = plain.tau2[g]
        mu, s, w = ref_re(y, v, tau2)
        q_hk = np.sum(w * (y - mu) ** 2) / (k - 1)
        if adhoc:
            q_hk = max(1.0, q_hk)
        se_hk = s * np.sqrt(q_hk)
        t = stats.t.isf(0.025, k - 1)
        np.testing.assert_allclose(hk.estimate[g], mu, rtol=1e-10)
        np.testing.assert_allclose(hk.se[g], se_hk, rtol=1e-10)
        np.testing.assert_allclose([hk.ci_lower[g], hk.ci_upper[g]], [mu - t * se_hk, mu + t * se_hk], rtol=1e-10)
        np.testing.assert_allclose(hk.pvalue[g], 2 * stats.t.sf(abs(mu / se_hk), k - 1), rtol=1e-8)
        if method != "fe":
            half = t * np.sqrt(se_hk**2 + tau2)
            np.testing.assert_allclose([hk.pi_lower[g], hk.pi_upper[g]], [mu - half, mu + half], rtol=1e-10)


def test_hksj__pm_factor_is_one_so_untruncated_se_is_unchanged():
    yi, vi = bcg_rr()
    plain = meta_analysis(yi, np.sqrt(vi), "pm")
    hk = meta_analysis(yi, np.sqrt(vi), "pm", hksj=True)
    np.testing.assert_allclose(hk.se, plain.se, rtol=1e-9)


def test_prediction_interval__normal_quantile_and_tau2():
    yi, vi = bcg_rr()
    res = meta_analysis(yi, np.sqrt(vi), "dl", alpha=0.1)
    z = stats.norm.isf(0.05)
    half = z * np.sqrt(res.se[0] ** 2 + res.tau2[0])
    np.testing.assert_allclose([res.pi_lower[0], res.pi_upper[0]], [res.estimate[0] - half, res.estimate[0] + half])


# ----------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", META_METHODS)
def test_single_study__is_its_own_estimate_without_heterogeneity(method):
    res = meta_analysis(np.array([[0.3, np.nan]]), np.array([[0.1, np.nan]]), method)
    assert res.k[0] == 1
    np.testing.assert_allclose([res.estimate[0], res.se[0]], [0.3, 0.1])
    assert res.tau2[0] == 0 and res.q[0] == 0 and res.i2[0] == 0 and res.h2[0] == 1
    assert np.isnan(res.q_pvalue[0])
    assert res.reason[0] == ""


@pytest.mark.parametrize("method", META_METHODS)
def test_single_study__hksj_is_undefined_with_reason(method):
    res = meta_analysis(np.array([0.3]), np.array([0.1]), method, hksj=True)
    assert res.estimate[0] == 0.3
    assert np.isnan(res.se[0]) and np.isnan(res.ci_lower[0]) and np.isnan(res.pvalue[0])
    assert res.reason[0] == "hksj_needs_k2"
    assert res.reason[0] in META_REASONS


@pytest.mark.parametrize("method", META_METHODS)
def test_empty_group__is_nan_with_reason(method):
    est = np.array([[0.1, 0.2], [np.nan, np.nan]])
    se = np.array([[0.1, 0.1], [np.nan, np.nan]])
    res = meta_analysis(est, se, method)
    assert res.k.tolist() == [2, 0]
    assert res.reason.tolist() == ["", "no_studies"]
    for name in META_COLUMNS[1:]:
        assert np.isnan(getattr(res, name)[1]), name


@pytest.mark.parametrize("method", META_METHODS)
def test_homogeneous_group__tau2_is_exactly_zero(method):
    est = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.52, 0.49, 0.5]])
    se = np.full_like(est, 0.2)
    res = meta_analysis(est, se, method)
    assert np.all(res.tau2 == 0.0)
    np.testing.assert_allclose(res.estimate[0], 0.5)
    np.testing.assert_allclose(res.se[0], 0.1)
    assert np.all(res.i2 == 0.0)
    np.testing.assert_allclose(res.q[0], 0.0, atol=1e-25)
    hk = meta_analysis(est, se, method, hksj=True)
    assert hk.se[0] == 0.0  # metafor: s2w = 0 when the weighted RSS is below machine epsilon
    ad = meta_analysis(est, se, method, hksj_adhoc=True)
    np.testing.assert_allclose(ad.se[0], 0.1)


def test_invalid_cells__are_ignored_like_padding():
    est = np.array([[0.1, np.inf, 0.3, 0.2]])
    se = np.array([[0.1, 0.1, -1.0, 0.2]])
    res = meta_analysis(est, se, "dl")
    ref = meta_analysis(np.array([0.1, 0.2]), np.array([0.1, 0.2]), "dl")
    assert res.k[0] == 2
    assert res == ref


def test_options__unknown_method_and_bad_alpha_raise():
    with pytest.raises(InputError, match="unknown meta-analysis method 'hs'; valid: fe, dl, reml, pm"):
        meta_analysis([0.1], [0.1], "hs")
    with pytest.raises(ValueError, match="alpha"):
        meta_analysis([0.1], [0.1], "dl", alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        meta_analysis([0.1, 0.2], [0.1], "dl")


def test_to_frame__columns_and_labels():
    yi, vi = bcg_rr()
    est = np.vstack([yi, yi])
    res = meta_analysis(est, np.sqrt(np.vstack([vi, vi])), "reml")
    frame = res.to_frame("reml", ["a", "b"])
    assert list(frame.columns) == ["group", "method", *META_COLUMNS, "reason"]
    assert frame["group"].tolist() == ["a", "b"]
    assert frame["method"].tolist() == ["reml", "reml"]
    np.testing.assert_allclose(frame["tau2"], res.tau2)
    with pytest.raises(ValueError):
        res.to_frame("reml", ["a"])


def test_result__is_frozen():
    res = meta_analysis([0.1, 0.2], [0.1, 0.1], "dl")
    with pytest.raises(AttributeError):
        res.k = None  # type: ignore[misc]


@pytest.mark.parametrize("method", META_METHODS)
def test_check_method__returns_a_valid_name(method):
    assert check_method(method) == method


@pytest.mark.parametrize("bad", ["DL", "sj", ""])
def test_check_method__unknown_name_is_an_input_error_listing_the_valid_ones(bad):
    with pytest.raises(InputError, match=f"unknown meta-analysis method {bad!r}; valid: fe, dl, reml, pm$"):
        check_method(bad)
