"""MR-Egger with SIMEX against regression-dilution theory, a plain loop transcription of simex and base R.

* a simulated problem with known dilution: plain MR-Egger's slope is attenuated by
  the factor regression-dilution theory predicts (about I^2_GX), SIMEX removes most
  of the bias, by the amount its quadratic extrapolant can;
* one locus against a straightforward numpy loop over replicates (``lstsq`` fits,
  ``np.cov``, ``np.polyfit``) with the same draws, and against the base-R
  transcription of simex 1.8 in ``tests/r/simex_reference.R`` (R's ``lm``, ``cov``,
  ``predict``, R's ``rnorm`` draws, committed as ``tests/r/simex_*.csv``);
* without measurement error (bxse -> 0) SIMEX is the naive MR-Egger fit;
* batch invariance, seed reproducibility, orientation, flags and option checks.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from scipy import stats

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import prepare
from deepmr_dist.mr.egger import egger
from deepmr_dist.mr.simex import (
    SIMEX_LAMBDAS,
    egger_simex,
    egger_simex_from_normals,
    extrapolation_weights,
    simex_moments,
    simex_normals,
)

from helpers_mr import pad_ragged, rel
from r_fixtures import R_DIR, assert_script_rewrites, num, read_csv

R_FILES = ("simex_inputs.csv", "simex_normals.csv", "simex_results.csv")
RTOL = 1e-10


def _simulate(seed: int, sizes: list[int], max_k: int | None = None, dispersion=(0.5, 2.0)):
    """Loci with ``sizes[i]`` instruments (NaN-padded to ``max_k``), some bx negative, I^2_GX ~ 0.7."""
    rng = np.random.default_rng(seed)
    n_loci, max_k = len(sizes), max_k or max(sizes)
    bx_true = rng.choice([-1.0, 1.0], (n_loci, max_k), p=[0.2, 0.8]) * rng.normal(0.04, 0.015, (n_loci, max_k))
    bxse = rng.uniform(0.008, 0.012, (n_loci, max_k))
    byse = rng.uniform(0.004, 0.008, (n_loci, max_k))
    noise = rng.normal(0.0, 1.0, (n_loci, max_k)) * byse * rng.choice(dispersion, (n_loci, 1))
    by = 0.002 * np.sign(bx_true) + 0.5 * bx_true + noise
    bx = bx_true + bxse * rng.normal(0.0, 1.0, (n_loci, max_k))
    pad_ragged(sizes, bx, bxse, by, byse)
    return bx, bxse, by, byse


# ------------------------------------------------------------------ (a) known dilution

BETA, ALPHA0, DILUTION = 0.5, 0.002, 0.8


def _diluted_problem(seed: int = 2016, n_loci: int = 300, k: int = 60):
    """by = ALPHA0 + BETA bx_true + e; bx = bx_true + u, Var(bx_true) / (Var(bx_true) + bxse^2) = DILUTION.

    Homoskedastic errors (bxse, byse constant), so the weighted regression's attenuation is
    the classical reliability ratio DILUTION, which I^2_GX estimates; bx_true is ten bxse
    above zero, so orientation never flips an instrument.
    """
    rng = np.random.default_rng(seed)
    s = 0.01
    tau = s * math.sqrt(DILUTION / (1.0 - DILUTION))
    bx_true = 10 * s + tau * rng.normal(size=(n_loci, k))
    bx = bx_true + s * rng.normal(size=(n_loci, k))
    byse = np.full((n_loci, k), 0.005)
    by = ALPHA0 + BETA * bx_true + byse * rng.normal(size=(n_loci, k))
    return prepare(bx, np.full((n_loci, k), s), by, byse)


def test_egger_simex__removes_the_regression_dilution_of_mr_egger():
    data = _diluted_problem()
    plain = egger(data)
    corrected = egger_simex(data, seed=1)
    assert np.all(corrected.reason == "") and np.all(np.isfinite(corrected.se))
    attenuation = plain.estimate.mean() / BETA
    # the dilution is real and as theory says: MR-Egger's slope shrinks by the reliability ratio ~ I^2_GX
    assert abs(attenuation - DILUTION) < 0.02
    assert abs(plain.i2gx.mean() - DILUTION) < 0.02
    assert abs(attenuation - plain.i2gx.mean()) < 0.03
    # SIMEX removes most of it: within 5 % of the truth, less than a quarter of the naive bias left
    simex_mean = corrected.estimate.mean()
    assert abs(simex_mean - BETA) < 0.05 * BETA
    assert abs(simex_mean - BETA) < 0.25 * abs(plain.estimate.mean() - BETA)
    # ... by what the quadratic extrapolant of the exact dilution curve predicts (it under-corrects slightly)
    lam = np.concatenate([[0.0], SIMEX_LAMBDAS])
    curve = BETA * DILUTION / (DILUTION + (1.0 - DILUTION) * (1.0 + lam))
    assert abs(simex_mean - extrapolation_weights(SIMEX_LAMBDAS) @ curve) < 0.01
    # the intercept absorbs the diluted slope times mean bx; SIMEX takes most of that back too
    assert abs(corrected.intercept.mean() - ALPHA0) < 0.3 * abs(plain.intercept.mean() - ALPHA0)


# ------------------------------------------------------------------ (b) plain transcription, one locus


def _simex_loop(bx, bxse, by, byse, z, lambdas):
    """simex(lm(by ~ bx, weights = byse^-2), ...) for one locus, one replicate at a time (z: (L, K, B))."""
    x, y, w = np.abs(bx), np.sign(bx) * by, byse**-2
    n = len(x)

    def fit(xs):
        design = np.column_stack([np.ones(n), xs]) * np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)
        resid = y - coef[0] - coef[1] * xs
        sigma2 = np.sum(w * resid**2) / (n - 2)
        return coef, sigma2 * np.linalg.inv(design.T @ design)

    coef0, cov0 = fit(x)
    estimates, variances = [coef0], [np.diag(cov0)]
    for lam_index, lam in enumerate(lambdas):
        thetas, covs = [], []
        for b in range(z.shape[2]):
            coef, cov = fit(x + math.sqrt(lam) * bxse * z[lam_index, :, b])
            thetas.append(coef)
            covs.append(np.diag(cov))
        thetas = np.array(thetas)
        estimates.append(thetas.mean(axis=0))
        variances.append(np.mean(covs, axis=0) - np.diag(np.cov(thetas.T, ddof=1)))
    grid = np.concatenate([[0.0], lambdas])
    at = lambda values: np.polyval(np.polyfit(grid, np.array(values), 2), -1.0)  # noqa: E731
    return {"estimates": np.array(estimates), "variances": np.array(variances),
            "coef": at(estimates), "var": at(variances)}  # fmt: skip


@pytest.mark.parametrize("lambdas", [SIMEX_LAMBDAS, (0.25, 1.0, 3.0)])
def test_egger_simex__equals_a_plain_loop_transcription_of_simex(lambdas):
    bx, bxse, by, byse = _simulate(5, [10])
    n_simex, seed = 150, 77
    z = np.stack([simex_normals(seed, i, n_simex, 10) for i in range(len(lambdas))])
    ref = _simex_loop(bx[0], bxse[0], by[0], byse[0], z, lambdas)
    data = prepare(bx, bxse, by, byse)
    res = egger_simex(data, n_simex=n_simex, lambdas=lambdas, seed=seed)
    assert rel([res.intercept[0], res.estimate[0]], ref["coef"]) < RTOL
    assert rel([res.intercept_se[0], res.se[0]], np.sqrt(ref["var"])) < RTOL
    moments = simex_moments(data, lambdas, lambda i: z[i])
    assert rel(moments["intercept"][:, 0], ref["estimates"][1:, 0]) < RTOL
    assert rel(moments["slope"][:, 0], ref["estimates"][1:, 1]) < RTOL
    assert rel(moments["v_intercept"][:, 0], ref["variances"][1:, 0]) < RTOL
    assert rel(moments["v_slope"][:, 0], ref["variances"][1:, 1]) < RTOL


def test_extrapolation_weights__are_the_quadratic_fit_at_minus_one():
    np.testing.assert_allclose(extrapolation_weights(SIMEX_LAMBDAS), [3.0, -0.4, -1.8, -1.2, 1.4], atol=1e-13)
    rng = np.random.default_rng(0)
    grid = (0.3, 0.9, 1.7, 2.5)
    values = rng.normal(size=5)
    fit = np.polyval(np.polyfit(np.concatenate([[0.0], grid]), values, 2), -1.0)
    assert extrapolation_weights(grid) @ values == pytest.approx(fit, rel=1e-12)


# ------------------------------------------------------------------ base R transcription of simex 1.8


@cache
def _r_fixture() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for row in read_csv(R_DIR / "simex_inputs.csv")[1]:
        cases.setdefault(row["case"], {"rows": []})["rows"].append([num(row[k]) for k in ("bx", "bxse", "by", "byse")])
    for row in read_csv(R_DIR / "simex_results.csv")[1]:
        case = cases[row["case"]]
        case["lambdas"] = tuple(float(v) for v in row["lambdas"].split(";"))
        case["n_simex"] = int(row["n_simex"])
        case.setdefault("results", {})[float(row["lambda"])] = {k: num(v) for k, v in row.items() if k != "case"
                                                                and k != "lambdas"}  # fmt: skip
    for case in cases.values():
        case["z"] = np.full((len(case["lambdas"]), len(case["rows"]), case["n_simex"]), np.nan)
    for row in read_csv(R_DIR / "simex_normals.csv")[1]:
        z = cases[row["case"]]["z"]
        z[int(row["grid"]), int(row["instrument"]) - 1, int(row["replicate"]) - 1] = num(row["z"])
    return cases


def test_r_fixtures__name_the_r_version_and_script():
    for name in R_FILES:
        comments, rows = read_csv(R_DIR / name)
        assert comments and comments[0].startswith("# R 4.") and "tests/r/simex_reference.R" in comments[0]
        assert rows


def test_egger_simex__equals_base_r_transcription_of_simex():
    for name, case in _r_fixture().items():
        assert not np.isnan(case["z"]).any(), name
        data = prepare(*np.array(case["rows"]).T)
        normals = case["z"].__getitem__
        res = egger_simex_from_normals(data, normals, lambdas=case["lambdas"])
        top = case["results"][-1.0]
        got = [res.estimate[0], res.intercept[0], res.se[0], res.intercept_se[0]]
        assert rel(got, [top["slope"], top["intercept"], top["se_slope"], top["se_intercept"]]) < RTOL, name
        moments = simex_moments(data, case["lambdas"], normals)
        for i, lam in enumerate(case["lambdas"]):
            want = case["results"][lam]
            for field, column in (("slope", "slope"), ("intercept", "intercept"), ("v_slope", "var_slope"),
                                  ("v_intercept", "var_intercept")):  # fmt: skip
                assert rel(moments[field][i, 0], want[column]) < RTOL, (name, lam, field)


def test_r_fixtures__are_what_the_r_script_writes_now(tmp_path):
    assert_script_rewrites(R_DIR / "simex_reference.R", R_FILES, tmp_path, rtol=1e-12, timeout=300)


# ------------------------------------------------------------------ (c) no measurement error


def test_egger_simex__without_measurement_error_is_mr_egger():
    sizes = [3, 4, 6, 10, 25, 25]
    bx, bxse, by, byse = _simulate(6, sizes)
    bxse = bxse * 1e-12
    data = prepare(bx, bxse, by, byse)
    plain = egger(data)
    res = egger_simex(data, n_simex=50)
    assert np.all(res.reason == "")
    for field in ("estimate", "intercept", "i2gx", "fstat"):
        assert rel(getattr(res, field), getattr(plain, field)) < RTOL, field
    # simex's jackknife variance extrapolates lm's covariance, sigma^2 (X'WX)^-1: MR-Egger's with its
    # residual standard error not floored at 1, so the two agree where the fit is over-dispersed
    for field in ("se", "intercept_se"):
        assert rel(getattr(res, field), getattr(plain, field) * plain.rse / np.maximum(1.0, plain.rse)) < RTOL
    over = plain.rse > 1
    assert over.any() and (~over).any()
    assert rel(res.se[over], plain.se[over]) < RTOL
    assert rel(res.ci_lower[over], plain.ci_lower[over]) < RTOL
    assert rel(res.intercept_pvalue[over], plain.intercept_pvalue[over]) < 1e-8


# ------------------------------------------------------------------ (d) batch invariance, seeds


def test_egger_simex__locus_alone_equals_locus_in_a_padded_batch():
    sizes = [12, 5, 3, 30, 8]
    bx, bxse, by, byse = _simulate(8, sizes, max_k=40)
    batch = egger_simex(prepare(bx, bxse, by, byse), n_simex=200, seed=3)
    for i, n in enumerate(sizes):
        alone = egger_simex(prepare(bx[i, :n], bxse[i, :n], by[i, :n], byse[i, :n]), n_simex=200, seed=3)
        for field in ("estimate", "se", "intercept", "intercept_se", "pvalue", "i2gx"):
            np.testing.assert_allclose(getattr(alone, field), getattr(batch, field)[i : i + 1], rtol=1e-12,
                                       equal_nan=True, err_msg=f"locus {i} {field}")  # fmt: skip


def test_egger_simex__chunks_do_not_change_the_numbers(monkeypatch):
    data = prepare(*_simulate(9, [6, 9, 15, 20, 7, 11]))
    whole = egger_simex(data, n_simex=100)
    monkeypatch.setattr("deepmr_dist.mr.simex.CHUNK_BYTES", 1)  # one locus per chunk
    split = egger_simex(data, n_simex=100)
    for field in ("estimate", "se", "intercept", "intercept_se"):
        np.testing.assert_allclose(getattr(split, field), getattr(whole, field), rtol=1e-12, equal_nan=True)


def test_egger_simex__seed_reproducibility():
    data = prepare(*_simulate(10, [8, 15, 30]))
    a = egger_simex(data, n_simex=100, seed=11)
    b = egger_simex(data, n_simex=100, seed=11)
    c = egger_simex(data, n_simex=100, seed=12)
    for field in ("estimate", "se", "intercept", "intercept_se"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert np.all(a.estimate != c.estimate)
    assert np.all(np.abs(a.estimate - c.estimate) < a.se)  # Monte Carlo noise, small next to the standard error


def test_egger_simex__allele_coding_does_not_matter():
    bx, bxse, by, byse = _simulate(12, [10, 20])
    flip = np.arange(bx.shape[1]) % 3 == 0
    bx2, by2 = bx.copy(), by.copy()
    bx2[:, flip] *= -1.0
    by2[:, flip] *= -1.0
    a = egger_simex(prepare(bx, bxse, by, byse), n_simex=100)
    b = egger_simex(prepare(bx2, bxse, by2, byse), n_simex=100)
    for field in ("estimate", "se", "intercept", "intercept_se"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


# ------------------------------------------------------------------ inference, flags, options


@pytest.mark.parametrize("t_dist", [False, True])
def test_egger_simex__intervals_and_pvalues(t_dist):
    bx, bxse, by, byse = _simulate(13, [5, 12, 40])
    n = np.array([5, 12, 40])
    r = egger_simex(prepare(bx, bxse, by, byse), n_simex=200, alpha=0.1, t_dist=t_dist)
    dist = stats.t(n - 2) if t_dist else stats.norm()
    crit = dist.ppf(0.95)
    for est, se, lo, hi, p in (("estimate", "se", "ci_lower", "ci_upper", "pvalue"),
                               ("intercept", "intercept_se", "intercept_ci_lower", "intercept_ci_upper",
                                "intercept_pvalue")):  # fmt: skip
        e, s = getattr(r, est), getattr(r, se)
        np.testing.assert_allclose(getattr(r, lo), e - crit * s, rtol=1e-12)
        np.testing.assert_allclose(getattr(r, hi), e + crit * s, rtol=1e-12)
        np.testing.assert_allclose(getattr(r, p), 2 * dist.sf(np.abs(e / s)), rtol=1e-10)


def test_egger_simex__negative_jackknife_variance_gives_nan_se():
    # with three instruments lm's sigma^2 has one df and the extrapolated variance is often below zero;
    # simex then reports sqrt(negative) = NaN: the point estimates stay, the standard errors do not
    data = prepare(*_simulate(14, [3] * 40))
    res = egger_simex(data, n_simex=100)
    moments = simex_moments(data, SIMEX_LAMBDAS, lambda i: simex_normals(0, i, 100, 3))
    naive = egger(data)
    v0 = (naive.se / np.maximum(1.0, naive.rse) * naive.rse) ** 2
    variance = extrapolation_weights(SIMEX_LAMBDAS) @ np.vstack([v0, moments["v_slope"]])
    negative = variance < 0
    assert negative.any() and (~negative).any()
    np.testing.assert_array_equal(np.isnan(res.se), negative)
    assert np.all(np.isfinite(res.estimate)) and np.all(res.reason == np.where(negative, "negative_variance", ""))
    assert np.all(np.isnan(res.intercept_se[negative]))


def test_egger_simex__undefined_loci_are_flagged():
    bx = np.array([[0.1, 0.2, np.nan], [0.0, 0.0, 0.0], [0.1, -0.1, 0.1], [0.1, 0.2, 0.3]])
    se = np.where(np.isnan(bx), np.nan, 0.01)
    by = np.where(np.isnan(bx), np.nan, 0.05)
    res = egger_simex(prepare(bx, se, by + np.array([[0.0, 0.01, 0.0]]), se), n_simex=20)
    assert list(res.reason) == ["too_few_instruments", "all_bx_zero", "singular_fit", ""]
    assert np.all(np.isnan(res.estimate[:3])) and np.all(np.isnan(res.intercept_se[:3]))
    assert np.isfinite(res.estimate[3]) and np.isfinite(res.fstat).all()


@pytest.mark.parametrize("n_simex", [1, 0, 2.5, True, "100"])
def test_egger_simex__bad_n_simex_raises(n_simex):
    with pytest.raises(InputError, match="n_simex"):
        egger_simex(prepare(*_simulate(15, [5])), n_simex=n_simex)


@pytest.mark.parametrize("lambdas", [(1.0,), (0.0, 1.0), (1.0, 1.0), (-0.5, 1.0), (1.0, np.inf), ("a", 1.0), 3.0])
def test_egger_simex__bad_lambdas_raise(lambdas):
    with pytest.raises(InputError, match="lambdas"):
        egger_simex(prepare(*_simulate(15, [5])), lambdas=lambdas)


def test_egger_simex_from_normals__checks_the_draws():
    data = prepare(*_simulate(16, [6]))
    with pytest.raises(InputError, match="normals"):
        egger_simex_from_normals(data, lambda i: np.zeros((5, 10)))
    with pytest.raises(InputError, match="normals"):
        egger_simex_from_normals(data, lambda i: np.zeros((6, 1)))
