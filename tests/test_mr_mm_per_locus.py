"""Per-locus MM steps (iterations, fast-S candidates) and the fused input loops, against direct numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from deepmr_dist.mr import _input_loops as input_loops
from deepmr_dist.mr import _mm_per_locus as per_locus
from deepmr_dist.mr.robust import BB, C_CHI, C_PSI, EXACT_TOL, MAX_ITER, NEWTON_SWITCH, TOL, TOL_NEWTON

ITERATION = {"switch": NEWTON_SWITCH, "tol": TOL, "tol_newton": TOL_NEWTON, "max_iter": MAX_ITER}


def _regression(p: int, m: int = 12, k: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(m, p + 1, k)`` sqrt-weighted design and response with t(2) errors and ragged rows; and n."""
    rng = np.random.default_rng(seed)
    n = rng.integers(p + 8, k + 1, m)
    used = np.arange(k)[None, :] < n[:, None]
    x = rng.normal(size=(m, p, k))
    if p == 2:
        x[:, 0] = rng.uniform(0.5, 2.0, (m, k))  # an intercept column times sqrt(weights)
    y = np.einsum("mak,ma->mk", x, rng.normal(size=(m, p))) + rng.standard_t(2, size=(m, k))
    xy = np.concatenate([x, y[:, None]], axis=1) * used[:, None, :]
    return xy, n


def _resid(xy: np.ndarray, beta: np.ndarray) -> np.ndarray:
    p = xy.shape[1] - 1
    return xy[:, p] - np.einsum("mak,ma->mk", xy[:, :p], beta)


def _psi(u: np.ndarray, c: float) -> np.ndarray:
    t = (u / c) ** 2
    return np.where(t < 1, u * (1.0 - t) ** 2, 0.0)


def _rho(u: np.ndarray, c: float) -> np.ndarray:
    return 1.0 - (1.0 - np.minimum((u / c) ** 2, 1.0)) ** 3


def _mscale(r: np.ndarray, target: float) -> float:
    return optimize.brentq(lambda s: _rho(r / s, C_CHI).sum() - target, 1e-6, 1e6, xtol=1e-15, rtol=1e-15)


def _least_squares(xy: np.ndarray) -> np.ndarray:
    p = xy.shape[1] - 1
    return np.stack([np.linalg.lstsq(row[:p].T, row[p], rcond=None)[0] for row in xy])


@pytest.mark.parametrize("p", [1, 2])
def test_iterate__s_then_m_iterations_solve_their_estimating_equations(p):
    xy, n = _regression(p)
    m = xy.shape[0]
    target = BB * (n - p)
    beta0 = _least_squares(xy)
    s0 = np.array([1.4826 * np.median(np.abs(r[:k])) for r, k in zip(_resid(xy, beta0), n, strict=True)])
    live = np.ones(m, dtype=bool)
    live[3] = False
    beta_s, s, conv = per_locus.iterate(xy, beta0, s0, live, target, c=C_CHI, m_step=False, start_newton=False, **ITERATION)
    assert conv[live].all() and not conv[3]
    assert (beta_s[3] == beta0[3]).all() and s[3] == s0[3]
    rows = np.flatnonzero(live)
    u = _resid(xy, beta_s)[rows] / s[rows, None]
    x = xy[rows, :p]
    score = np.einsum("mk,mak->ma", _psi(u, C_CHI), x)
    scale = np.einsum("mk,mak->ma", np.abs(u), np.abs(x))
    assert np.abs(score / scale).max() < 1e-9
    np.testing.assert_allclose(_rho(u, C_CHI).sum(axis=1), target[rows], rtol=1e-9)

    beta_m, s_m, conv_m = per_locus.iterate(xy, beta_s, s, live, target, c=C_PSI, m_step=True, start_newton=True, **ITERATION)
    assert conv_m[live].all()
    np.testing.assert_array_equal(s_m, s)  # the M-step keeps the scale
    u = _resid(xy, beta_m)[rows] / s[rows, None]
    score = np.einsum("mk,mak->ma", _psi(u, C_PSI), x)
    assert np.abs(score / np.einsum("mk,mak->ma", np.abs(u), np.abs(x))).max() < 1e-9


def test_iterate__a_row_without_a_finite_step_stops_unconverged_and_leaves_the_others_alone():
    xy, n = _regression(2, m=5, seed=1)
    target = BB * (n - 2)
    beta0, s0 = _least_squares(xy), np.ones(5)
    args = {"c": C_CHI, "m_step": False, "start_newton": False, **ITERATION}
    alone = per_locus.iterate(xy, beta0, s0, np.ones(5, dtype=bool), target, **args)
    xy[2, :2] = 0.0  # no design: the weighted least-squares step is 0 / 0
    beta, s, conv = per_locus.iterate(xy, beta0, s0, np.ones(5, dtype=bool), target, **args)
    assert not conv[2] and (beta[2] == beta0[2]).all() and s[2] == s0[2]
    keep = [0, 1, 3, 4]
    np.testing.assert_array_equal(beta[keep], alone[0][keep])
    np.testing.assert_array_equal(conv[keep], alone[2][keep])


def _refine(row: np.ndarray, beta: np.ndarray, s: float) -> np.ndarray:
    """robustbase's refine_fast_s step: least squares with weights psi(u) / u at (beta, s)."""
    p = row.shape[0] - 1
    u = (row[p] - beta @ row[:p]) / (C_CHI * s)
    w = np.maximum(1 - u * u, 0.0) ** 2
    return np.linalg.solve((row[:p] * w) @ row[:p].T, (row[:p] * w) @ row[p])


@pytest.mark.parametrize("p", [1, 2])
def test_offer_candidates__keeps_the_refined_candidate_with_the_smallest_m_scale(p):
    xy, n = _regression(p, m=4, seed=2)
    target = BB * (n - p)
    rng = np.random.default_rng(3)
    cands = [_least_squares(xy)] + [rng.normal(size=(4, p)) for _ in range(5)]
    first_scale = np.full(4, 2.0)
    best_beta, best_s, exact = np.zeros((4, p)), np.full(4, np.inf), np.zeros(4, dtype=bool)
    rows = np.arange(4)
    for j, beta in enumerate(cands):
        s0 = first_scale if j == 0 else best_s.copy()
        per_locus.offer_candidates(xy, rows, beta, s0, n, target, best_beta, best_s, exact, c=C_CHI, exact_tol=EXACT_TOL)
    for i in range(4):
        row = xy[i][:, : n[i]]
        want_beta, want_s = None, np.inf
        for j, beta in enumerate(cands):  # sequentially: later steps start from the best scale so far
            refined = _refine(row, beta[i], first_scale[i] if j == 0 else want_s)
            scale = _mscale(row[p] - refined @ row[:p], target[i])
            if scale < want_s:
                want_beta, want_s = refined, scale
        assert best_s[i] == pytest.approx(want_s, rel=1e-9)
        np.testing.assert_allclose(best_beta[i], want_beta, rtol=1e-9, atol=1e-12)
    assert not exact.any()


def test_offer_candidates__an_exact_fit_has_scale_zero_and_is_kept():
    xy, n = _regression(2, m=2, seed=4)
    line = np.array([0.3, -0.7])
    fitted = np.arange(xy.shape[2]) < (n[:, None] * 0.8).astype(int)
    xy[:, 2] = np.where(fitted, np.einsum("mak,a->mk", xy[:, :2], line), xy[:, 2])
    target = BB * (n - 2)
    best_beta, best_s, exact = np.zeros((2, 2)), np.full(2, np.inf), np.zeros(2, dtype=bool)
    rows = np.arange(2)
    offer = {"c": C_CHI, "exact_tol": EXACT_TOL}
    per_locus.offer_candidates(xy, rows, np.tile(line, (2, 1)), np.full(2, np.nan), n, target, best_beta, best_s, exact, **offer)
    assert exact.all() and (best_s == 0).all()
    np.testing.assert_allclose(best_beta, np.tile(line, (2, 1)), atol=1e-12)
    per_locus.offer_candidates(xy, rows, _least_squares(xy), best_s.copy(), n, target, best_beta, best_s, exact, **offer)
    assert (best_s == 0).all()
    np.testing.assert_allclose(best_beta, np.tile(line, (2, 1)), atol=1e-12)


def test_valid_mask__finite_effects_and_positive_finite_standard_errors():
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=(6, 9)) for _ in range(4)]
    arrays[1], arrays[3] = np.abs(arrays[1]), np.abs(arrays[3])
    for a, value in zip(arrays * 2, [np.nan, 0.0, np.inf, -1.0, -np.inf, np.nan, np.nan, np.inf], strict=True):
        a[rng.integers(0, 6, 3), rng.integers(0, 9, 3)] = value
    bx, bxse, by, byse = arrays
    valid, n = input_loops.valid_mask(bx, bxse, by, byse)
    want = np.isfinite(bx) & np.isfinite(by) & np.isfinite(bxse) & (bxse > 0) & np.isfinite(byse) & (byse > 0)
    np.testing.assert_array_equal(valid, want)
    np.testing.assert_array_equal(n, want.sum(axis=1))


def test_i2gx_q_and_sum_squared_ratio__match_numpy():
    rng = np.random.default_rng(6)
    bx, bxse, byse = rng.normal(size=(5, 30)), rng.uniform(0.1, 1, (5, 30)), rng.uniform(0.1, 1, (5, 30))
    valid = rng.random((5, 30)) < 0.8
    bx, bxse, byse = np.where(valid, bx, 0.0), np.where(valid, bxse, 1.0), np.where(valid, byse, 1.0)
    v, w = np.abs(bx) / byse, valid * (byse / bxse) ** 2
    mean = (w * v).sum(axis=1) / w.sum(axis=1)
    np.testing.assert_allclose(input_loops.i2gx_q(bx, bxse, byse, valid), (w * (v - mean[:, None]) ** 2).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(input_loops.sum_squared_ratio(bx, bxse), ((bx / bxse) ** 2).sum(axis=1), rtol=1e-12)
