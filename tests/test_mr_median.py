"""Median estimators against a plain per-locus sort-and-interpolate, the package vignette and a plain bootstrap."""

from __future__ import annotations

import numpy as np
from scipy import stats

from deepmr_dist.mr import estimate
from deepmr_dist.mr._data import column_normals, median_inplace

from helpers_mr import simulate
from mr_reference_data import CHD, CHDSE, LDLC, LDLCSE


def _simulate(seed: int, n_loci: int = 25, max_k: int = 30, min_k: int = 3):
    return simulate(seed, n_loci, max_k, min_k, lambda rng, bx, byse: 0.4 * bx + rng.normal(0.0, 1.0, bx.shape) * byse)


def _plain_weighted_median(theta, w):
    """The package's weighted.median, one locus, written plainly."""
    order = np.argsort(theta, kind="stable")
    t, ws = theta[order], w[order]
    cum = (np.cumsum(ws) - 0.5 * ws) / np.sum(ws)
    below = int(np.sum(cum < 0.5))  # R's k (1-based)
    ratio = (0.5 - cum[below - 1]) / (cum[below] - cum[below - 1])
    return t[below - 1] + (t[below] - t[below - 1]) * ratio


def _weights(kind, bx, by, byse):
    theta = by / bx
    w = (bx / byse) ** 2
    if kind == "simple_median":
        return theta, np.full(theta.shape, 1.0 / len(theta))
    if kind == "weighted_median":
        return theta, w
    pen = stats.chi2.sf(w * (theta - _plain_weighted_median(theta, w)) ** 2, 1)
    return theta, w * np.minimum(1.0, 20.0 * pen)


METHODS = ("simple_median", "weighted_median", "penalized_weighted_median")


def test_median__estimates_match_plain_sort_and_interpolate():
    bx, bxse, by, byse, k = _simulate(31)
    by[:, 1] += 2.0  # make penalization bite
    res = estimate(bx, bxse, by, byse, methods=METHODS, n_boot=20)
    for name in METHODS:
        for i in range(bx.shape[0]):
            theta, w = _weights(name, bx[i, : k[i]], by[i, : k[i]], byse[i, : k[i]])
            expected = _plain_weighted_median(theta, w)
            assert abs(res[name].estimate[i] - expected) <= 1e-12 * max(1.0, abs(expected))


def test_simple_median__equals_the_ordinary_median():
    bx, bxse, by, byse, k = _simulate(32)
    r = estimate(bx, bxse, by, byse, methods=("simple_median",), n_boot=20)["simple_median"]
    for i in range(bx.shape[0]):
        assert abs(r.estimate[i] - np.median(by[i, : k[i]] / bx[i, : k[i]])) < 1e-12


def test_median__bootstrap_se_matches_plain_loop_over_draws():
    bx, bxse, by, byse, k = _simulate(33, n_loci=6, max_k=12)
    n_boot, seed = 50, 7
    res = estimate(bx, bxse, by, byse, methods=METHODS, n_boot=n_boot, seed=seed)
    z = column_normals(seed, bx.shape[1], n_boot, 2)
    for name in METHODS:
        for i in range(bx.shape[0]):
            m = k[i]
            _, w = _weights(name, bx[i, :m], by[i, :m], byse[i, :m])
            meds = []
            for b in range(n_boot):
                bxb = bx[i, :m] + bxse[i, :m] * z[0, b, :m]
                byb = by[i, :m] + byse[i, :m] * z[1, b, :m]
                meds.append(_plain_weighted_median(byb / bxb, w))
            assert abs(res[name].se[i] - np.std(meds, ddof=1)) <= 1e-10 * res[name].se[i]


def test_median__vignette_ldl_chd():
    res = estimate(LDLC, LDLCSE, CHD, CHDSE, methods=METHODS, n_boot=2000, seed=1)
    # MendelianRandomization vignette: simple 1.755 (0.740), weighted 2.683 (0.419), penalized 2.681 (0.420);
    # standard errors are bootstrap (10000 draws, R's RNG) and agree within Monte Carlo error only
    assert round(float(res["simple_median"].estimate[0]), 3) == 1.755
    assert round(float(res["weighted_median"].estimate[0]), 3) == 2.683
    assert round(float(res["penalized_weighted_median"].estimate[0]), 3) == 2.681
    assert abs(res["simple_median"].se[0] - 0.740) < 0.06
    assert abs(res["weighted_median"].se[0] - 0.419) < 0.03
    assert abs(res["penalized_weighted_median"].se[0] - 0.420) < 0.03


def test_median__seed_reproduces_and_changes_draws():
    bx, bxse, by, byse, _ = _simulate(34, n_loci=4)
    a = estimate(bx, bxse, by, byse, methods=("weighted_median",), n_boot=30, seed=3)["weighted_median"]
    b = estimate(bx, bxse, by, byse, methods=("weighted_median",), n_boot=30, seed=3)["weighted_median"]
    c = estimate(bx, bxse, by, byse, methods=("weighted_median",), n_boot=30, seed=4)["weighted_median"]
    np.testing.assert_array_equal(a.se, b.se)
    assert np.all(a.se != c.se)


def test_median__fewer_than_three_instruments_is_undefined():
    r = estimate([[0.1, 0.2]], [[0.05] * 2], [[0.1, 0.2]], [[0.05] * 2], methods=METHODS, n_boot=10)
    for name in METHODS:
        assert r[name].reason[0] == "too_few_instruments" and np.isnan(r[name].estimate[0])


def test_median__zero_bx_is_undefined():
    r = estimate([[0.1, 0.0, 0.3]], [[0.05] * 3], [[0.1, 0.2, 0.3]], [[0.05] * 3], methods=METHODS, n_boot=10)
    for name in METHODS:
        assert r[name].reason[0] == "zero_bx"


def test_median_inplace__equals_numpy_median_for_equal_and_ragged_rows():
    rng = np.random.default_rng(11)
    for width in (1, 2, 7, 100):
        values = rng.normal(size=(40, width))
        for n in (np.full(40, width), rng.integers(0, width + 1, 40)):  # one pivot; ragged rows (sorted)
            padded = np.where(np.arange(width)[None, :] < n[:, None], values, np.inf)
            got = median_inplace(padded.copy(), n)
            ref = [np.median(values[i, : n[i]]) if n[i] else np.nan for i in range(40)]
            np.testing.assert_array_equal(got, ref)
