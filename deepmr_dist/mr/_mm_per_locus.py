"""robustbase's fast-S and MM iterations for :mod:`deepmr_dist.mr.robust`, one locus at a time (numba).

Two ways to iterate, for the two kinds of loci :mod:`deepmr_dist.mr.robust` tells apart.

Loci whose S-start is robustbase's own (every elemental subset offered) follow
the C code of robustbase 0.95-0 (``src/lmrob.c``) step for step, with the same
stopping rules, so that a fit lands on the iterate ``lmrob`` returns and not
merely on the fixed point it approximates (the two differ by up to about 1e-4
relative in the standard error at small n):

* :func:`offer_candidates` is ``fast_s``'s loop body: an elemental candidate
  gets one ``refine_fast_s`` step from the MAD of its own residuals, and
  replaces the best candidate where its M-scale is smaller;
* :func:`refine_s` is ``refine_fast_s(conv = TRUE)``: a scale step
  ``s sqrt(mean rho(r / s) / bb)``, then weighted least squares with weights
  ``psi(u) / u`` at the new scale, until ``||b_new - b||_2 <= tol max(tol, ||b||_2)``;
  it returns the last coefficients, the last scale and the coefficients whose
  residuals robustbase hands on as the S residuals (those before the last step);
* :func:`rwls` is the M-step's ``rwls``: weighted least squares at a fixed
  scale until ``||b_new - b||_1 <= tol max(tol, ||b_new||_1)``, at most
  ``max_it - 1`` steps.

Loci with a sampled S-start (too many subsets to offer them all), where
``lmrob``'s own answer depends on its seed by more than the gap between its
iterate and the fixed point, iterate to the fixed point itself, fast
(:func:`iterate`): IRWLS until the relative step falls below a per-locus
threshold, then safeguarded Newton steps on the estimating equations. A Newton
step is taken only if it is finite, points the same way as the IRWLS step
(positive cosine in the metric ``diag(X'WX)``), keeps the scale within
``(s / 2, 2 s)`` and moving the same way as the IRWLS scale step (S), has a
positive definite Hessian (M) and, from the second Newton step on, at least
halves the previous one; otherwise the locus takes the IRWLS step, leaves
Newton mode and its threshold drops tenfold. At thousands of instruments this
takes about a third of the passes of robustbase's iterations.

Definitions (bisquare, residuals ``r = y - x beta``, ``u = r / (c s)``,
``t = u^2``, ``v = max(1 - t, 0)``, ``rho = 1 - v^3``, ``psi(u) / u ∝ v^2``,
``psi'(u) ∝ 5 v^2 - 4 v``). Per step the work is one fused pass over the
locus's instruments (:mod:`deepmr_dist.mr._bisquare`) and ``p x p`` algebra in
closed form (p = 1 or 2). Iterating a locus in one compiled loop keeps its
instruments in cache. The control flow keeps IEEE semantics (a non-finite step
stops a locus unconverged); only the per-instrument sums are compiled with
``fastmath``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from deepmr_dist.mr._bisquare import row_mscale, row_resid_stats, row_rho, row_sums_1, row_sums_2

_JIT = {"nogil": True, "cache": False, "boundscheck": False, "error_model": "numpy"}
"""Not cached on disk: see :mod:`deepmr_dist.mr._bisquare` (cached and fresh compilations differ in the last bits)."""
"""No ``fastmath`` here: the control flow relies on NaN and inf tests."""

MAD_CONSTANT = 1.4826
"""robustbase's ``MAD()`` factor (``median |r| * 1.4826``)."""


@numba.njit(**_JIT)
def _wls(xy, i, b0, b1, inv):  # pragma: no cover - compiled
    """Weighted least squares of row ``i`` with bisquare weights ``v^2`` at ``u = (y - x beta) inv``."""
    if xy.shape[1] == 3:
        t = row_sums_2(xy, i, b0, b1, inv)
        det = t[0] * t[2] - t[1] * t[1]
        return (t[2] * t[3] - t[1] * t[4]) / det, (t[0] * t[4] - t[1] * t[3]) / det
    t1 = row_sums_1(xy, i, b0, inv)
    return t1[1] / t1[0], 0.0


@numba.njit(**_JIT)
def _kth(a, m, k):  # pragma: no cover - compiled
    """The ``k``-th smallest of ``a[:m]`` (0-based), by quickselect in place; afterwards ``a[k + 1:m] >= a[k]``.

    numba's ``np.median`` copies and selects about four times slower at thousands of values.
    """
    lo, hi = 0, m - 1
    while hi > lo:
        mid = (lo + hi) // 2
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))  # median of three
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(**_JIT)
def median_inplace(a, m):  # pragma: no cover - compiled
    """Median of ``a[:m]`` (the mean of the middle two for even ``m``), reordering ``a``."""
    half = m // 2
    if m % 2 == 1:
        return _kth(a, m, half)
    low = _kth(a, m, half - 1)
    high = a[half]
    for j in range(half + 1, m):
        high = min(high, a[j])
    return 0.5 * (low + high)


@numba.njit(**_JIT)
def _mad(xy, valid, i, b0, b1, work):  # pragma: no cover - compiled
    """robustbase's ``MAD(r, center = 0)`` of row ``i``'s used residuals."""
    p = xy.shape[1] - 1
    m = 0
    for j in range(xy.shape[2]):
        if valid[i, j]:
            r = xy[i, p, j] - b0 * xy[i, 0, j]
            if p == 2:
                r -= b1 * xy[i, 1, j]
            work[m] = abs(r)
            m += 1
    return MAD_CONSTANT * median_inplace(work, m)


@numba.njit(**_JIT)
def _keep(i, b0, b1, s_new, best_beta, best_s):  # pragma: no cover - compiled
    best_beta[i, 0] = b0
    if best_beta.shape[1] == 2:
        best_beta[i, 1] = b1
    best_s[i] = s_new


@numba.njit(**_JIT)
def _offer(xy, valid, rows, beta, mad, from_best, n, target, best_beta, best_s, exact, c, exact_tol, tol, max_iter):  # pragma: no cover - compiled
    p = xy.shape[1] - 1
    k = xy.shape[2]
    work = np.empty(k)
    for r in range(rows.shape[0]):
        i = rows[r]
        if exact[i]:
            continue
        b0 = beta[r, 0]
        b1 = beta[r, 1] if p == 2 else 0.0
        if not (math.isfinite(b0) and math.isfinite(b1)):
            continue
        half = (n[i] + p) / 2.0
        cur = best_s[i]
        if from_best[i] and math.isfinite(cur) and cur > 0.0:
            # the quick step: weighted least squares at the best scale, then the comparison; an
            # exact fit is looked for only where it can pass (a passed test or a tiny best scale)
            i0, i1 = _wls(xy, i, b0, b1, 1.0 / (c * cur))
            if math.isfinite(i0) and math.isfinite(i1):
                b0, b1 = i0, i1
            rho, _ = row_rho(xy, i, b0, b1, 1.0 / (c * cur))
            passed = rho < target[i]
            if passed or 6.0 * n[i] * exact_tol**2 >= (c * cur) ** 2:
                small, _ = row_resid_stats(xy, i, b0, b1, exact_tol)
                if small - (k - n[i]) > half:
                    _keep(i, b0, b1, 0.0, best_beta, best_s)
                    exact[i] = True
                    continue
            if not passed:
                continue
            s = cur
        else:
            # robustbase's fast_s: refine_fast_s's perfect-fit test, then one step from the MAD
            small, rss = row_resid_stats(xy, i, b0, b1, exact_tol)
            if small - (k - n[i]) > half:  # unused entries have residual 0
                _keep(i, b0, b1, 0.0, best_beta, best_s)
                exact[i] = True
                continue
            s = mad[r] if mad[r] >= 0.0 else _mad(xy, valid, i, b0, b1, work)
            if s > 0.0:
                rho, _ = row_rho(xy, i, b0, b1, 1.0 / (c * s))
                s = s * math.sqrt(rho / target[i])
                i0, i1 = _wls(xy, i, b0, b1, 1.0 / (c * s))
                if not (math.isfinite(i0) and math.isfinite(i1)):
                    continue
                b0, b1 = i0, i1
            else:
                # residuals at the subset are 0 in exact arithmetic: robustbase's step at a scale
                # of round-off size weights only those rows and returns the candidate unchanged
                s = math.sqrt(rss / n[i])
                if not s > 0.0:
                    continue
            # kept if sum rho(r / s_best) / (n - p) < bb, i.e. if its M-scale is smaller
            if math.isfinite(cur):
                rho, _ = row_rho(xy, i, b0, b1, 1.0 / (c * cur))
                if not rho < target[i]:
                    continue
                s = cur
        s_new = row_mscale(xy, i, b0, b1, target[i], s, c, tol, max_iter)
        if math.isfinite(s_new) and 0.0 < s_new < cur:
            _keep(i, b0, b1, s_new, best_beta, best_s)


def offer_candidates(
    xy: np.ndarray,
    valid: np.ndarray,
    rows: np.ndarray,
    beta: np.ndarray,
    mad: np.ndarray | None,
    from_best: np.ndarray,
    n: np.ndarray,
    target: np.ndarray,
    best_beta: np.ndarray,
    best_s: np.ndarray,
    exact: np.ndarray,
    *,
    c: float,
    exact_tol: float,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> None:
    """Offer S-estimate candidates as robustbase's ``fast_s`` does; keep the one with the smallest M-scale.

    For each of the chunk ``rows`` (skipping rows already known to be exact fits
    and non-finite candidates):

    * a candidate with more than ``(n + p) / 2`` residuals below ``exact_tol``
      is an exact fit: it becomes the best with scale 0 and ends the row's search;
    * otherwise one ``refine_fast_s`` step: ``s = MAD(r, center = 0)``, the scale
      step ``s sqrt(sum rho(r / s) / target)``, weighted least squares with
      weights ``psi(u) / u`` at that scale (a MAD of 0 leaves the candidate as it is);
    * the refined candidate replaces the best one if ``sum rho(r / s_best) <
      target``, that is if its M-scale is smaller; only then is its M-scale
      computed (to ``tol``, as robustbase's ``find_scale`` to ``scale.tol``).

    Rows marked ``from_best`` that already have a best candidate take a quicker
    step instead (for sampled S-starts, where the search is not robustbase's
    anyway): weighted least squares at the best scale so far, the same
    comparison, and the perfect-fit test only where the candidate can pass.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design and response of the chunk (0 at unused entries).
    valid : numpy.ndarray
        ``(m, K)`` bool, the used entries.
    rows : numpy.ndarray
        ``(r,)`` chunk rows the candidates belong to.
    beta : numpy.ndarray
        ``(r, p)`` candidate coefficients.
    mad : numpy.ndarray or None
        ``(r,)`` the MAD of each candidate's residuals where the caller has it
        (numpy's partition is faster than a compiled selection); NaN, or None for
        all, where it is to be computed here.
    from_best : numpy.ndarray
        ``(m,)`` bool, rows that take the quick step once they have a best candidate.
    n, target : numpy.ndarray
        ``(m,)`` instruments per row and ``bb (n - p)``.
    best_beta, best_s, exact : numpy.ndarray
        ``(m, p)``, ``(m,)``, ``(m,)`` best candidate so far (``inf`` scale: none),
        updated in place.
    c : float
        The S-estimator's bisquare constant.
    exact_tol : float
        Residuals below this count as exactly fitted (robustbase's ``EPS_SCALE``).
    tol, max_iter : float, int
        Relative tolerance and iteration limit of the M-scale.
    """
    _offer(
        xy, np.ascontiguousarray(valid, dtype=np.bool_), np.ascontiguousarray(rows, dtype=np.int64),
        np.ascontiguousarray(beta, dtype=np.float64),
        np.full(len(rows), np.nan) if mad is None else np.ascontiguousarray(mad, dtype=np.float64),
        np.ascontiguousarray(from_best, dtype=np.bool_), n, target, best_beta, best_s, exact,
        float(c), float(exact_tol), float(tol), int(max_iter),
    )  # fmt: skip


@numba.njit(**_JIT)
def _refine_s(xy, beta, s, live, target, c, tol, max_iter, beta_prev, conv):  # pragma: no cover - compiled
    p1 = xy.shape[1]
    for i in range(xy.shape[0]):
        conv[i] = False
        beta_prev[i, 0] = beta[i, 0]
        if p1 == 3:
            beta_prev[i, 1] = beta[i, 1]
        if not live[i]:
            continue
        b0 = beta[i, 0]
        b1 = beta[i, 1] if p1 == 3 else 0.0
        sc = s[i]
        n0, n1 = b0, b1
        for _ in range(max_iter):
            rho, _ = row_rho(xy, i, b0, b1, 1.0 / (c * sc))
            s_new = sc * math.sqrt(rho / target[i])
            n0, n1 = _wls(xy, i, b0, b1, 1.0 / (c * s_new))
            if not (math.isfinite(n0) and math.isfinite(n1) and s_new > 0.0):
                n0, n1 = b0, b1
                break
            sc = s_new
            d = math.sqrt((b0 - n0) ** 2 + (b1 - n1) ** 2)
            if d <= tol * max(tol, math.sqrt(b0 * b0 + b1 * b1)):
                conv[i] = True
                break
            b0, b1 = n0, n1
        beta_prev[i, 0] = b0
        beta[i, 0] = n0
        if p1 == 3:
            beta_prev[i, 1] = b1
            beta[i, 1] = n1
        s[i] = sc


def refine_s(
    xy: np.ndarray, beta: np.ndarray, s: np.ndarray, live: np.ndarray, target: np.ndarray, *, c: float, tol: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """robustbase's ``refine_fast_s(conv = TRUE)`` of the ``live`` loci.

    Each step: ``s <- s sqrt(sum rho(r / s) / target)``, then weighted least
    squares with weights ``psi(u) / u`` at the new ``s``, giving ``b_new``; stop
    when ``||b_new - b||_2 <= tol max(tol, ||b||_2)`` or after ``max_iter`` steps.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design columns then response (p = 1 or 2), 0 at unused entries.
    beta, s : numpy.ndarray
        ``(m, p)`` finite start coefficients and ``(m,)`` positive start scales of the
        live loci (others are returned unchanged).
    live : numpy.ndarray
        ``(m,)`` bool, loci to refine.
    target : numpy.ndarray
        ``(m,)`` right-hand side of the scale equation, ``bb (n - p)``.
    c : float
        The S-estimator's bisquare constant.
    tol : float
        ``refine.tol``.
    max_iter : int
        ``k.max``.

    Returns
    -------
    beta, s, beta_prev, converged : numpy.ndarray
        The last coefficients and scale; the coefficients before the last step,
        whose residuals robustbase returns as the S residuals (``init.S$residuals``,
        used by ``.vcov.avar1``); whether the stopping rule was met. A locus whose
        step is not finite stops unconverged at its last finite iterate.
    """
    beta = np.array(beta, dtype=np.float64, order="C")
    s = np.array(s, dtype=np.float64)
    beta_prev = np.empty_like(beta)
    conv = np.empty(beta.shape[0], dtype=bool)
    _refine_s(
        np.ascontiguousarray(xy), beta, s, np.ascontiguousarray(live, dtype=bool),
        np.ascontiguousarray(target, dtype=np.float64), float(c), float(tol), int(max_iter), beta_prev, conv,
    )  # fmt: skip
    return beta, s, beta_prev, conv


@numba.njit(**_JIT)
def _rwls(xy, beta, s, live, c, tol, max_it, conv):  # pragma: no cover - compiled
    p1 = xy.shape[1]
    for i in range(xy.shape[0]):
        conv[i] = False
        if not live[i]:
            continue
        b0 = beta[i, 0]
        b1 = beta[i, 1] if p1 == 3 else 0.0
        inv = 1.0 / (c * s[i])
        it = 1
        while it < max_it:  # robustbase: while (!converged && ++iterations < max_it)
            it += 1
            n0, n1 = _wls(xy, i, b0, b1, inv)
            if not (math.isfinite(n0) and math.isfinite(n1)):
                break
            d = abs(b0 - n0) + abs(b1 - n1)
            b0, b1 = n0, n1
            if d <= tol * max(tol, abs(n0) + abs(n1)):
                conv[i] = True
                break
        beta[i, 0] = b0
        if p1 == 3:
            beta[i, 1] = b1


def rwls(
    xy: np.ndarray, beta: np.ndarray, s: np.ndarray, live: np.ndarray, *, c: float, tol: float, max_it: int
) -> tuple[np.ndarray, np.ndarray]:
    """robustbase's M-step ``rwls`` of the ``live`` loci at the fixed scales ``s``.

    Steps of weighted least squares with weights ``psi(u) / u`` until
    ``||b_new - b||_1 <= tol max(tol, ||b_new||_1)``; at most ``max_it - 1`` steps,
    as robustbase counts them.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design columns then response.
    beta, s : numpy.ndarray
        ``(m, p)`` start coefficients (the S-estimate) and ``(m,)`` positive scales.
    live : numpy.ndarray
        ``(m,)`` bool, loci to iterate (others are returned unchanged).
    c : float
        The M-step's bisquare constant.
    tol : float
        ``rel.tol``.
    max_it : int
        ``max.it``.

    Returns
    -------
    beta, converged : numpy.ndarray
    """
    beta = np.array(beta, dtype=np.float64, order="C")
    conv = np.empty(beta.shape[0], dtype=bool)
    _rwls(
        np.ascontiguousarray(xy), beta, np.ascontiguousarray(s, dtype=np.float64),
        np.ascontiguousarray(live, dtype=bool), float(c), float(tol), int(max_it), conv,
    )  # fmt: skip
    return beta, conv


# ----------------------------------------------------------------------------- fixed points (loci with a sampled S-start)


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
