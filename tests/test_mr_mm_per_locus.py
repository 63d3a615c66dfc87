"""Per-locus MM steps (robustbase's refinements, rwls, fast-S candidates) and the fused input loops, against transcriptions in numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from deepmr_dist.mr import _input_loops as input_loops
from deepmr_dist.mr import _mm_per_locus as per_locus
from deepmr_dist.mr.robust import BB, C_CHI, C_PSI, EXACT_TOL, K_MAX, MAX_IT, REFINE_TOL, REL_TOL

import lmrob_reference


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


def _valid(xy: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.arange(xy.shape[2])[None, :] < n[:, None]


@pytest.mark.parametrize("p", [1, 2])
def test_refine_s__follows_robustbase_refine_fast_s(p):
    xy, n = _regression(p)
    m = xy.shape[0]
    target = BB * (n - p)
    beta0 = _least_squares(xy)
    s0 = np.array([1.4826 * np.median(np.abs(r[:k])) for r, k in zip(_resid(xy, beta0), n, strict=True)])
    live = np.ones(m, dtype=bool)
    live[3] = False
    beta, s, prev, conv = per_locus.refine_s(xy, beta0, s0, live, target, c=C_CHI, tol=REFINE_TOL, max_iter=K_MAX)
    assert conv[live].all() and not conv[3]
    assert (beta[3] == beta0[3]).all() and s[3] == s0[3]
    for i in np.flatnonzero(live):
        row = xy[i][:, : n[i]]
        want, want_s, want_prev, _ = lmrob_reference.refine_s(row[:p].T, row[p], beta0[i], s0[i], REFINE_TOL, K_MAX)
        np.testing.assert_allclose(beta[i], want, rtol=1e-9)
        np.testing.assert_allclose(prev[i], want_prev, rtol=1e-9)
        assert s[i] == pytest.approx(want_s, rel=1e-10)
        # stopped by robustbase's rule, the S equations hold to about the step size
        u = _resid(xy[i : i + 1], beta[i : i + 1])[0, : n[i]] / s[i]
        assert abs(_rho(u, C_CHI).sum() - target[i]) < 1e-4 * target[i]


@pytest.mark.parametrize("p", [1, 2])
def test_rwls__follows_robustbase_rwls(p):
    xy, n = _regression(p, seed=7)
    m = xy.shape[0]
    beta0 = _least_squares(xy)
    s = np.array([1.4826 * np.median(np.abs(r[:k])) for r, k in zip(_resid(xy, beta0), n, strict=True)])
    live = np.ones(m, dtype=bool)
    beta, conv = per_locus.rwls(xy, beta0, s, live, c=C_PSI, tol=REL_TOL, max_it=MAX_IT)
    assert conv.all()
    for i in range(m):
        row = xy[i][:, : n[i]]
        b, _ = lmrob_reference.rwls(row[:p].T, row[p], beta0[i], s[i], REL_TOL, MAX_IT)
        np.testing.assert_allclose(beta[i], b, rtol=1e-9)
        u = (row[p] - b @ row[:p]) / s[i]
        score = _psi(u, C_PSI) @ row[:p].T
        assert np.all(np.abs(score) <= 1e-5 * np.abs(u) @ np.abs(row[:p].T))


def test_refine_s__a_row_without_a_finite_step_stops_unconverged_and_leaves_the_others_alone():
    xy, n = _regression(2, m=5, seed=1)
    target = BB * (n - 2)
    beta0, s0 = _least_squares(xy), np.ones(5)
    args = {"c": C_CHI, "tol": REFINE_TOL, "max_iter": K_MAX}
    alone = per_locus.refine_s(xy, beta0, s0, np.ones(5, dtype=bool), target, **args)
    xy[2, :2] = 0.0  # no design: the weighted least-squares step is 0 / 0
    beta, s, _, conv = per_locus.refine_s(xy, beta0, s0, np.ones(5, dtype=bool), target, **args)
    assert not conv[2] and (beta[2] == beta0[2]).all() and s[2] == s0[2]
    keep = [0, 1, 3, 4]
    np.testing.assert_array_equal(beta[keep], alone[0][keep])
    np.testing.assert_array_equal(conv[keep], alone[3][keep])


@pytest.mark.parametrize("p", [1, 2])
def test_offer_candidates__keeps_the_candidate_with_the_smallest_m_scale_after_one_step_from_its_own_mad(p):
    xy, n = _regression(p, m=4, seed=2)
    target = BB * (n - p)
    rng = np.random.default_rng(3)
    cands = [_least_squares(xy)] + [rng.normal(size=(4, p)) for _ in range(5)]
    best_beta, best_s, exact = np.zeros((4, p)), np.full(4, np.inf), np.zeros(4, dtype=bool)
    rows = np.arange(4)
    for beta in cands:
        per_locus.offer_candidates(xy, _valid(xy, n), rows, beta, None, np.zeros(4, bool), n, target, best_beta, best_s, exact, c=C_CHI, exact_tol=EXACT_TOL)
    for i in range(4):
        row = xy[i][:, : n[i]]
        want_beta, want_s = None, np.inf
        for beta in cands:
            r = row[p] - beta[i] @ row[:p]
            s = 1.4826 * np.median(np.abs(r))
            s = s * np.sqrt(_rho(r / s, C_CHI).sum() / target[i])
            x, y = row[:p].T, row[p]
            refined = lmrob_reference.wls(x, y, lmrob_reference.weights((y - x @ beta[i]) / s, C_CHI))
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
    rows, valid = np.arange(2), _valid(xy, n)
    offer = {"c": C_CHI, "exact_tol": EXACT_TOL}
    per_locus.offer_candidates(xy, valid, rows, _least_squares(xy), None, np.zeros(2, bool), n, target, best_beta, best_s, exact, **offer)
    assert not exact.any() and (best_s > 0).all()
    per_locus.offer_candidates(xy, valid, rows, np.tile(line, (2, 1)), None, np.zeros(2, bool), n, target, best_beta, best_s, exact, **offer)
    assert exact.all() and (best_s == 0).all()
    np.testing.assert_allclose(best_beta, np.tile(line, (2, 1)), atol=1e-12)
    per_locus.offer_candidates(xy, valid, rows, _least_squares(xy), None, np.zeros(2, bool), n, target, best_beta, best_s, exact, **offer)
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


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 12, 1000, 1001])
def test_median_inplace__equals_numpy_on_random_tied_and_sorted_values(m):
    rng = np.random.default_rng(m)
    for a in (rng.normal(size=m), rng.integers(0, 3, m).astype(float), np.sort(rng.normal(size=m)), -np.arange(m, dtype=float)):
        work = np.concatenate([a, [np.inf, -np.inf]])  # entries past m are never read
        assert per_locus.median_inplace(work, m) == np.median(a)
