"""Robust (MM, lmrob) kernels: estimating equations, statsmodels RLM, a numpy transcription of robustbase, vignette."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats

from deepmr_dist.mr import estimate
from deepmr_dist.mr._data import prepare
from deepmr_dist.mr.robust import BB, C_CHI, C_PSI, lmrob_mm

import lmrob_reference
from helpers_mr import pad_ragged
from mr_reference_data import CHD, CHDSE, LDLC, LDLCSE


def _simulate(seed: int, n_loci: int = 40, max_k: int = 40, min_k: int = 3, outliers: float = 0.15):
    rng = np.random.default_rng(seed)
    bx = rng.normal(0.0, 0.2, (n_loci, max_k))
    bxse = rng.uniform(0.02, 0.05, (n_loci, max_k))
    byse = rng.uniform(0.02, 0.06, (n_loci, max_k))
    by = 0.5 * bx + rng.normal(0.0, 1.0, (n_loci, max_k)) * byse * 1.5
    out = rng.random((n_loci, max_k)) < outliers
    by[out] += rng.normal(0.0, 0.4, out.sum())
    k = rng.integers(min_k, max_k + 1, n_loci)
    pad_ragged(k, bx, bxse, by, byse)
    return bx, bxse, by, byse, k


def _egger_design(bx, bxse, by, byse):
    d = prepare(bx, bxse, by, byse)
    inv = d.valid / d.byse
    xt = np.stack([inv, np.abs(d.bx) * inv], axis=1)
    return d, xt, np.sign(d.bx) * d.by * inv


def _rho(u, c):
    t = np.minimum((u / c) ** 2, 1.0)
    return 1.0 - (1.0 - t) ** 3


def _psi(u, c):
    t = (u / c) ** 2
    return np.where(t < 1, u * (1.0 - t) ** 2, 0.0)


def _dpsi(u, c):
    t = (u / c) ** 2
    return np.where(t < 1, (1.0 - t) * (1.0 - 5.0 * t), 0.0)


def test_robust__mm_and_s_solve_their_estimating_equations_to_robustbases_tolerance():
    """lmrob stops its iterations at a relative step of 1e-7, so the equations hold to about that."""
    bx, bxse, by, byse, _ = _simulate(21)
    d, xt, y = _egger_design(bx, bxse, by, byse)
    fit = lmrob_mm(xt, y, d.valid, d.n)
    assert fit.converged.all()
    for i in range(d.n_loci):
        m = d.valid[i]
        x, yi, s = xt[i][:, m].T, y[i][m], fit.scale[i]
        u = (yi - x @ fit.coef[i]) / s
        assert np.all(np.abs(_psi(u, C_PSI) @ x) <= 1e-5 * (np.abs(u) @ np.abs(x)))
        u0 = (yi - x @ fit.coef_s[i]) / s
        assert abs(_rho(u0, C_CHI).sum() / (m.sum() - 2) - BB) < 1e-5
        assert np.all(np.abs(_psi(u0, C_CHI) @ x) <= 1e-5 * (np.abs(u0) @ np.abs(x)))


def test_robust__mm_step_matches_statsmodels_rlm_at_fixed_scale():
    """statsmodels iterates to convergence, robustbase (and so deepmr) stops at a relative step of 1e-7."""
    bx, bxse, by, byse, _ = _simulate(22, n_loci=25)
    d, xt, y = _egger_design(bx, bxse, by, byse)
    fit = lmrob_mm(xt, y, d.valid, d.n)
    norm = sm.robust.norms.TukeyBiweight(c=C_PSI)
    for i in range(d.n_loci):
        m = d.valid[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rlm = sm.RLM(y[i][m], xt[i][:, m].T, M=norm).fit(
                start_params=fit.coef_s[i], start_scale=fit.scale[i], update_scale=False,
                conv="coefs", tol=1e-14, maxiter=2000,
            )  # fmt: skip
        np.testing.assert_allclose(fit.coef[i], rlm.params, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("p", [1, 2])
def test_robust__fits_equal_a_numpy_transcription_of_robustbase(p):
    """Coefficients, S-estimate, scale and .vcov.avar1 against tests/lmrob_reference.py (every subset offered)."""
    bx, bxse, by, byse, k = _simulate(23 + p, n_loci=16, max_k=20, min_k=3 + p, outliers=0.25)
    if p == 2:
        d, xt, y = _egger_design(bx, bxse, by, byse)
    else:
        d = prepare(bx, bxse, by, byse)
        xt, y = (d.valid * d.bx / d.byse)[:, None, :], d.valid * d.by / d.byse
    fit = lmrob_mm(xt, y, d.valid, d.n)
    assert not fit.sampled.any()
    for i in range(d.n_loci):
        m = d.valid[i]
        ref = lmrob_reference.lmrob(xt[i][:, m].T, y[i][m])
        assert fit.converged[i] and ref.converged
        np.testing.assert_allclose(fit.coef[i], ref.coef, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(fit.coef_s[i], ref.coef_s, rtol=1e-8, atol=1e-12)
        assert fit.scale[i] == pytest.approx(ref.scale, rel=1e-8)
        if np.all(np.linalg.eigvalsh(ref.cov) >= 0):  # else posdefified, checked against R in the parity tests
            np.testing.assert_allclose(fit.cov[i], ref.cov, rtol=1e-7, atol=1e-14)


def test_robust_egger__vignette_ldl_chd():
    r = estimate(LDLC, LDLCSE, CHD, CHDSE, methods=("robust_egger",))["robust_egger"]
    # MendelianRandomization vignette (mr_allmethods, method = "egger"): Robust MR-Egger 3.256 (0.624),
    # 95% CI 2.033, 4.479
    assert round(float(r.estimate[0]), 3) == 3.256
    assert round(float(r.se[0]), 3) == 0.624
    assert round(float(r.ci_lower[0]), 3) == 2.033 and round(float(r.ci_upper[0]), 3) == 4.479


def test_robust_egger__q_is_the_weighted_residual_sum_of_squares_of_the_mm_fit():
    bx, bxse, by, byse, k = _simulate(27, n_loci=30, min_k=3)
    r = estimate(bx, bxse, by, byse, methods=("robust_egger",))["robust_egger"]
    # one locus's M-step does not converge within lmrob's max.it = 50 (lmrob warns the same on it)
    assert set(r.reason) <= {"", "no_convergence"} and (r.reason == "").sum() >= 28
    for i in np.flatnonzero(r.reason == ""):
        x, y, s = np.abs(bx[i, : k[i]]), np.sign(bx[i, : k[i]]) * by[i, : k[i]], byse[i, : k[i]]
        q = (((y - r.intercept[i] - r.estimate[i] * x) / s) ** 2).sum()
        assert abs(r.q[i] - q) <= 1e-10 * q
        assert abs(r.q_pvalue[i] - stats.chi2.sf(q, k[i] - 2)) <= 1e-10


def test_robust__threads_and_chunk_size_do_not_change_fits(monkeypatch):
    import deepmr_dist.mr.robust as robust_mod

    bx, bxse, by, byse, _ = _simulate(28, n_loci=30)
    d, xt, y = _egger_design(bx, bxse, by, byse)
    ref = lmrob_mm(xt, y, d.valid, d.n)
    monkeypatch.setattr(robust_mod, "CHUNK_ELEMENTS", 3 * xt.shape[2])  # three loci per chunk, workspaces reused
    got = lmrob_mm(xt, y, d.valid, d.n, threads=2)
    for field in ("coef", "coef_s", "cov", "scale", "rss"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-12, atol=1e-300, err_msg=field)
    np.testing.assert_array_equal(got.converged, ref.converged)


def test_robust_ivw__resists_outliers():
    rng = np.random.default_rng(25)
    k = 60
    bx = rng.uniform(0.1, 0.4, (1, k))
    byse = np.full((1, k), 0.02)
    by = 0.5 * bx + rng.normal(0, 0.02, (1, k))
    by[0, :12] += 0.5  # 20% gross outliers
    res = estimate(bx, np.full((1, k), 0.02), by, byse, methods=("ivw", "robust_ivw"))
    assert abs(res["robust_ivw"].estimate[0] - 0.5) < 0.05
    assert abs(res["ivw"].estimate[0] - 0.5) > 0.2


def test_robust__exact_fit_keeps_estimate_without_se():
    bx = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.25]])
    by = 0.3 * bx
    by[0, -1] += 0.2
    r = estimate(bx, np.full(bx.shape, 0.05), by, np.full(bx.shape, 0.05), methods=("robust_ivw",))["robust_ivw"]
    assert r.reason[0] == "exact_fit"
    assert abs(r.estimate[0] - 0.3) < 1e-10
    assert np.isnan(r.se[0])


def test_robust_egger__equal_abs_bx_is_singular():
    r = estimate([[0.2, -0.2, 0.2, 0.2]], [[0.05] * 4], [[0.1, -0.12, 0.09, 0.11]], [[0.05] * 4],
                 methods=("robust_egger",))["robust_egger"]  # fmt: skip
    assert r.reason[0] == "singular_fit" and np.isnan(r.estimate[0])


def test_robust_ivw__single_instrument_is_the_ratio_estimate():
    r = estimate([0.2], [0.05], [0.1], [0.04], methods=("robust_ivw",))["robust_ivw"]
    assert abs(r.estimate[0] - 0.5) < 1e-12 and abs(r.se[0] - 0.2) < 1e-12


def test_egger_paper__switches_between_egger_and_robust_egger():
    bx, bxse, by, byse, k = _simulate(26, n_loci=30, max_k=20, min_k=1)
    res = estimate(bx, bxse, by, byse, methods=("egger", "robust_egger", "egger_paper"))
    paper, plain, robust = res["egger_paper"], res["egger"], res["robust_egger"]
    small = (k >= 3) & (k <= 10)
    big = k > 10
    np.testing.assert_array_equal(paper.estimate[small], plain.estimate[small])
    np.testing.assert_array_equal(paper.se[big], robust.se[big])
    assert np.all(paper.reason[k < 3] == "too_few_instruments")


def test_robust__two_processes_give_the_same_bits(tmp_path):
    """The same fit in two processes with one numba cache folder: bit-identical. (A kernel numba
    loaded from its on-disk cache gave MR results up to 1e-10 from a fresh compilation's.)"""
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from deepmr_dist.mr import estimate\n"
        "rng = np.random.default_rng(5)\n"
        "bx = rng.normal(0, 0.2, (60, 30)); se = rng.uniform(0.02, 0.06, (60, 30))\n"
        "by = 0.5 * bx + rng.normal(0, 1, (60, 30)) * se * 1.5\n"
        "res = estimate(bx, se, by, se, methods=('robust_egger', 'robust_ivw'))\n"
        "np.save(sys.argv[1], np.stack([res[m].estimate for m in res] + [res[m].se for m in res]))\n"
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    for name in ("fresh.npy", "cached.npy"):
        subprocess.run([sys.executable, str(script), str(tmp_path / name)], check=True, env=env, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "fresh.npy"), np.load(tmp_path / "cached.npy"))
