"""The S- and M-iterations of :mod:`deepmr_dist.mr.robust`, one locus at a time (numba).

Each locus iterates on its own to convergence: iteratively reweighted least
squares (IRWLS) until the relative step falls below a per-locus threshold, then
safeguarded Newton steps on the estimating equations. Per iteration the work is
one fused pass over the locus's instruments (:mod:`deepmr_dist.mr._bisquare`'s
sums) and ``p x p`` algebra in closed form (p = 1 or 2). Iterating a locus in
one compiled loop keeps its instruments in cache across iterations and leaves
no per-iteration Python work, which the same logic as numpy over all loci of a
chunk at once spent about half its time on at thousands of instruments.

Definitions (bisquare, residuals ``r = y - x beta``, ``u = r / (c s)``,
``t = u^2``, ``v = max(1 - t, 0)``, ``rho = 1 - v^3``, ``psi(u) / u ∝ v^2``,
``psi'(u) ∝ 5 v^2 - 4 v``):

* S-iteration (``c = c_chi``, equations ``sum psi(u) x = 0`` and
  ``sum rho(u) = target``). IRWLS: robustbase's ``refine_fast_s`` step, scale
  ``s sqrt(sum rho / target)`` and weighted least squares with weights ``v^2``,
  both at the current point. Newton: the joint step on ``(beta, s)`` with ``s``
  eliminated (a ``p x p`` Schur complement).
* M-iteration (``c = c_psi``, scale fixed, equations ``sum psi(u) x = 0``).
  IRWLS as above; Newton with Hessian ``sum psi'(u) x x'``.

A Newton step is taken only if it is finite, points the same way as the IRWLS
step (positive cosine in the metric ``diag(X'WX)``), keeps the scale within
``(s / 2, 2 s)`` and moving the same way as the IRWLS scale step (S), has a
positive definite Hessian (M) and, from the second Newton step on, at least
halves the previous one; otherwise the locus takes the IRWLS step, leaves Newton
mode and its threshold drops tenfold. IRWLS is a descent method for these
equations, so every locus still converges to the fixed point robustbase
iterates to.

The control flow keeps IEEE semantics (NaN marks a refused step); only the
per-instrument sums are compiled with ``fastmath``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from deepmr_dist.mr._bisquare import (
    row_mscale,
    row_resid_stats,
    row_rho,
    row_sums_1,
    row_sums_2,
)

_JIT = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
"""No ``fastmath`` here: the control flow relies on NaN and inf tests."""


@numba.njit(**_JIT)
def _step(n0, n1, b0, b1, s_new, s, tol):  # pragma: no cover - compiled
    """Relative step ``max(||b_new - b|| / max(tol, ||b||), |s_new - s| / s)``; NaN propagates."""
    num = math.sqrt((n0 - b0) ** 2 + (n1 - b1) ** 2)
    den = max(tol, math.sqrt(b0 * b0 + b1 * b1))
    a = num / den
    d = abs(s_new - s) / s
    if math.isnan(a) or math.isnan(d):
        return math.nan
    return max(a, d)


@numba.njit(**_JIT)
def _eval_1(xy, i, b0, s, target, c, m_step, newton):  # pragma: no cover - compiled
    """One S- (``m_step`` False) or M-evaluation for p = 1: IRWLS ``(b, s)``, Newton ``(b, s)`` or NaN."""
    w00, w0y, v00, v0y, rho, tw = row_sums_1(xy, i, b0, 1.0 / (c * s))
    b_irwls = w0y / w00
    s_fp = s if m_step else s * math.sqrt(rho / target)
    nan = math.nan
    if not newton:
        return b_irwls, s_fp, nan, nan
    d00 = 5.0 * w00 - 4.0 * v00  # sum psi'(u) x x' (up to the factor psi' / (v^2 - ...))
    d0y = 5.0 * w0y - 4.0 * v0y
    grad = w0y - w00 * b0  # s * sum psi(u) x
    if m_step:
        b_n = b0 + grad / d00
        ok = d00 > 0.0 and math.isfinite(b_n)
        s_n = s
    else:
        fb = grad / s
        j_bs = -(d0y - d00 * b0) / (s * s)
        j_sb = -(6.0 / c**2) * fb / s
        j_ss = -6.0 * tw / s
        rhs_s = target - rho
        schur = -d00 / s - j_bs * j_sb / j_ss
        delta = (-fb - j_bs * (rhs_s / j_ss)) / schur
        s_n = s + (rhs_s - j_sb * delta) / j_ss
        b_n = b0 + delta
        ok = math.isfinite(b_n) and math.isfinite(s_n) and 0.5 * s < s_n < 2.0 * s and (s_n - s) * (s_fp - s) >= 0.0
    ok = ok and (b_irwls - b0) * (b_n - b0) * abs(w00) > 0.0
    if not ok:
        return b_irwls, s_fp, nan, nan
    return b_irwls, s_fp, b_n, s_n


@numba.njit(**_JIT)
def _eval_2(xy, i, b0, b1, s, target, c, m_step, newton):  # pragma: no cover - compiled
    """One S- or M-evaluation for p = 2: IRWLS ``(b0, b1, s)``, Newton ``(b0, b1, s)`` or NaN."""
    w00, w01, w11, w0y, w1y, v00, v01, v11, v0y, v1y, rho, tw = row_sums_2(xy, i, b0, b1, 1.0 / (c * s))
    det = w00 * w11 - w01 * w01
    i0 = (w11 * w0y - w01 * w1y) / det
    i1 = (w00 * w1y - w01 * w0y) / det
    s_fp = s if m_step else s * math.sqrt(rho / target)
    nan = math.nan
    if not newton:
        return i0, i1, s_fp, nan, nan, nan
    # psi'(u) = 5 v^2 - 4 v: Hessian-type sums
    d00 = 5.0 * w00 - 4.0 * v00
    d01 = 5.0 * w01 - 4.0 * v01
    d11 = 5.0 * w11 - 4.0 * v11
    g0 = w0y - (w00 * b0 + w01 * b1)  # s * sum psi(u) x
    g1 = w1y - (w01 * b0 + w11 * b1)
    if m_step:
        dd = d00 * d11 - d01 * d01
        n0 = b0 + (d11 * g0 - d01 * g1) / dd
        n1 = b1 + (d00 * g1 - d01 * g0) / dd
        s_n = s
        ok = d00 > 0.0 and dd > 0.0 and math.isfinite(n0) and math.isfinite(n1)
    else:
        f0 = g0 / s
        f1 = g1 / s
        s2 = s * s
        jb0 = -((5.0 * w0y - 4.0 * v0y) - (d00 * b0 + d01 * b1)) / s2
        jb1 = -((5.0 * w1y - 4.0 * v1y) - (d01 * b0 + d11 * b1)) / s2
        k = -(6.0 / c**2) / s
        js0 = k * f0
        js1 = k * f1
        j_ss = -6.0 * tw / s
        rhs_s = target - rho
        a00 = -d00 / s - jb0 * js0 / j_ss
        a01 = -d01 / s - jb0 * js1 / j_ss
        a10 = -d01 / s - jb1 * js0 / j_ss
        a11 = -d11 / s - jb1 * js1 / j_ss
        r0 = -f0 - jb0 * (rhs_s / j_ss)
        r1 = -f1 - jb1 * (rhs_s / j_ss)
        da = a00 * a11 - a01 * a10
        e0 = (a11 * r0 - a01 * r1) / da
        e1 = (a00 * r1 - a10 * r0) / da
        s_n = s + (rhs_s - (js0 * e0 + js1 * e1)) / j_ss
        n0 = b0 + e0
        n1 = b1 + e1
        ok = (
            math.isfinite(n0) and math.isfinite(n1) and math.isfinite(s_n)
            and 0.5 * s < s_n < 2.0 * s and (s_n - s) * (s_fp - s) >= 0.0
        )  # fmt: skip
    ok = ok and ((i0 - b0) * (n0 - b0) * abs(w00) + (i1 - b1) * (n1 - b1) * abs(w11)) > 0.0
    if not ok:
        return i0, i1, s_fp, nan, nan, nan
    return i0, i1, s_fp, n0, n1, s_n


@numba.njit(**_JIT)
def _irwls_s_step(xy, i, b0, b1, s, c):  # pragma: no cover - compiled
    """robustbase's ``refine_fast_s`` coefficient step at ``(beta, s)``: least squares with weights ``psi(u) / u``."""
    if xy.shape[1] == 3:
        t = row_sums_2(xy, i, b0, b1, 1.0 / (c * s))
        det = t[0] * t[2] - t[1] * t[1]
        return (t[2] * t[3] - t[1] * t[4]) / det, (t[0] * t[4] - t[1] * t[3]) / det
    t1 = row_sums_1(xy, i, b0, 1.0 / (c * s))
    return t1[1] / t1[0], 0.0


@numba.njit(**_JIT)
def _offer(xy, rows, beta, s0, n, target, best_beta, best_s, exact, c, exact_tol, tol, max_iter):  # pragma: no cover - compiled
    p = xy.shape[1] - 1
    k = xy.shape[2]
    for r in range(rows.shape[0]):
        i = rows[r]
        if exact[i]:
            continue
        half = (n[i] + p) / 2.0
        b0 = beta[r, 0] if math.isfinite(beta[r, 0]) else 0.0
        b1 = 0.0
        if p == 2 and math.isfinite(beta[r, 1]):
            b1 = beta[r, 1]
        # the refinement step, from s0 or, where s0 is not positive, the RMS of the residuals
        start = s0[r]
        is_exact = False
        if not start > 0.0:
            small, rss = row_resid_stats(xy, i, b0, b1, exact_tol)
            is_exact = small - (k - n[i]) > half  # unused entries have residual 0
            fallback = math.sqrt(rss / max(n[i], 1))
            start = fallback if fallback > 0.0 else 1.0
        if not is_exact:
            i0, i1 = _irwls_s_step(xy, i, b0, b1, start, c)
            if math.isfinite(i0) and math.isfinite(i1):
                b0, b1 = i0, i1
            # the comparison with the best candidate so far
            cur = best_s[i]
            if math.isfinite(cur):
                rho, _ = row_rho(xy, i, b0, b1, 1.0 / (c * cur))
                passed = rho < target[i]
                if passed or 6.0 * n[i] * exact_tol**2 >= (c * cur) ** 2:
                    small, _ = row_resid_stats(xy, i, b0, b1, exact_tol)
                    is_exact = small - (k - n[i]) > half
                if not passed and not is_exact:
                    continue
                start = cur
            else:
                small, _ = row_resid_stats(xy, i, b0, b1, exact_tol)
                is_exact = small - (k - n[i]) > half
        if is_exact:
            s_new = 0.0
            exact[i] = True
        else:
            s_new = row_mscale(xy, i, b0, b1, target[i], start, c, tol, max_iter)
            if not (math.isfinite(s_new) and s_new < best_s[i]):
                continue
        best_beta[i, 0] = b0
        if p == 2:
            best_beta[i, 1] = b1
        best_s[i] = s_new


def offer_candidates(
    xy: np.ndarray,
    rows: np.ndarray,
    beta: np.ndarray,
    s0: np.ndarray,
    n: np.ndarray,
    target: np.ndarray,
    best_beta: np.ndarray,
    best_s: np.ndarray,
    exact: np.ndarray,
    *,
    c: float,
    exact_tol: float,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> None:
    """Refine S-estimate candidates by one step and keep those with a smaller M-scale (robustbase's fast-S).

    For each of the chunk ``rows`` (skipping rows already known to be exact fits):
    non-finite coefficients become 0; one ``refine_fast_s`` step from ``(beta, s0)``
    (where ``s0`` is not positive, from the RMS of the residuals, after an exact-fit
    check); then the candidate replaces the best one if ``sum rho(r / s_best) <
    target``, which is equivalent to its M-scale being smaller, and only then is its
    M-scale computed (from ``s_best``; for a row without a best candidate yet, from
    the step's scale). An exact fit (more than ``(n + p) / 2`` residuals below
    ``exact_tol``) replaces the best with scale 0; zeros are counted only where
    that can happen (a first candidate, a passed test, or a tiny ``s_best``).

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design and response of the chunk.
    rows : numpy.ndarray
        ``(r,)`` chunk rows the candidates belong to.
    beta, s0 : numpy.ndarray
        ``(r, p)`` candidate coefficients and ``(r,)`` scales for their refinement step.
    n, target : numpy.ndarray
        ``(m,)`` instruments per row and ``bb (n - p)``.
    best_beta, best_s, exact : numpy.ndarray
        ``(m, p)``, ``(m,)``, ``(m,)`` best candidate so far (``inf`` scale: none),
        updated in place.
    c : float
        The S-estimator's bisquare constant.
    exact_tol : float
        Residuals below this count as exactly fitted.
    tol, max_iter : float, int
        Relative tolerance and iteration limit of the M-scale.
    """
    _offer(
        xy, np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(beta, dtype=np.float64),
        np.ascontiguousarray(s0, dtype=np.float64), n, target, best_beta, best_s, exact,
        float(c), float(exact_tol), float(tol), int(max_iter),
    )  # fmt: skip


@numba.njit(**_JIT)
def _iterate(xy, beta, s, live, target, c, m_step, start_newton, switch, tol, tol_newton, max_iter, conv):  # pragma: no cover - compiled
    m, p1, _ = xy.shape
    for i in range(m):
        conv[i] = False
        if not live[i]:
            continue
        b0 = beta[i, 0]
        b1 = beta[i, 1] if p1 == 3 else 0.0
        sc = s[i]
        newton = start_newton
        thresh = switch
        last = math.inf
        for _ in range(max_iter):
            if p1 == 3:
                i0, i1, s_i, n0, n1, s_n = _eval_2(xy, i, b0, b1, sc, target[i], c, m_step, newton)
            else:
                i0, s_i, n0, s_n = _eval_1(xy, i, b0, sc, target[i], c, m_step, newton)
                i1 = n1 = 0.0
            use_n = False
            if newton:
                step_n = _step(n0, n1, b0, b1, s_n, sc, tol)  # NaN where the Newton step was refused
                use_n = step_n <= 0.5 * last or step_n <= 1e3 * tol
                if not use_n:
                    thresh *= 0.1
            if use_n:
                c0, c1, c_s = n0, n1, s_n
            else:
                c0, c1, c_s = i0, i1, s_i
            step = _step(c0, c1, b0, b1, c_s, sc, tol)
            upd = math.isfinite(step) and c_s > 0.0
            if upd:
                b0, b1, sc = c0, c1, c_s
            last = step if use_n else math.inf
            done = upd and (step <= tol or (use_n and step <= tol_newton))
            newton = use_n or step <= thresh
            if done or not upd:
                conv[i] = done
                break
        beta[i, 0] = b0
        if p1 == 3:
            beta[i, 1] = b1
        s[i] = sc


def iterate(
    xy: np.ndarray,
    beta: np.ndarray,
    s: np.ndarray,
    live: np.ndarray,
    target: np.ndarray,
    *,
    c: float,
    m_step: bool,
    start_newton: bool,
    switch: float,
    tol: float,
    tol_newton: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Iterate the ``live`` loci to convergence; returns beta, scale and converged flags.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design columns then response (p = 1 or 2), 0 at unused entries.
    beta, s : numpy.ndarray
        ``(m, p)`` finite start coefficients and ``(m,)`` positive finite start scales
        of the live loci (others are returned unchanged).
    live : numpy.ndarray
        ``(m,)`` bool, loci to iterate.
    target : numpy.ndarray
        ``(m,)`` right-hand side of the scale equation, ``bb (n - p)`` (S-iterations).
    c : float
        Bisquare tuning constant.
    m_step : bool
        M-iterations (scale fixed) instead of S-iterations.
    start_newton : bool
        Try Newton from the first step (for starts known to be close).
    switch : float
        Relative IRWLS step below which Newton steps take over.
    tol, tol_newton : float
        Relative step at which an IRWLS or a Newton step counts as converged.
    max_iter : int
        Iteration limit per locus.

    Returns
    -------
    beta, s, converged : numpy.ndarray
        Last accepted iterate per locus and whether it converged (a locus whose
        step is not finite stops unconverged at its last iterate).
    """
    beta = np.array(beta, dtype=np.float64, order="C")
    s = np.array(s, dtype=np.float64)
    conv = np.empty(beta.shape[0], dtype=bool)
    _iterate(
        np.ascontiguousarray(xy), beta, s, np.ascontiguousarray(live, dtype=bool),
        np.ascontiguousarray(target, dtype=np.float64), float(c), bool(m_step), bool(start_newton),
        float(switch), float(tol), float(tol_newton), int(max_iter), conv,
    )  # fmt: skip
    return beta, s, conv
