"""robustbase::lmrob's MM fit for one locus, written out in plain numpy from robustbase 0.95-0's C code.

An independent reference for :mod:`deepmr_dist.mr.robust` (which shares none of this code): the
elemental subsets are enumerated with itertools, every weighted least-squares step is a
``numpy.linalg.lstsq`` (QR/SVD, as robustbase's ``dgels``), the M-scale is robustbase's own
fixed-point ``find_scale``. With every elemental subset offered, this is the limit of ``fast_s``'s
random search when its draws cover every subset (the best one then fills both "best two" slots).
It is checked against the committed R fixtures in ``tests/test_mr_robust_r_parity.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

C_CHI, C_PSI, BB = 1.54764, 4.685061, 0.5


def rho(u: np.ndarray, c: float) -> np.ndarray:
    """Normalised bisquare rho (robustbase's ``rho_biwgt``)."""
    t = np.minimum((u / c) ** 2, 1.0)
    return 1.0 - (1.0 - t) ** 3


def weights(u: np.ndarray, c: float) -> np.ndarray:
    """Bisquare weights psi(u) / u up to a constant (robustbase's ``wgt_biwgt``)."""
    t = (u / c) ** 2
    return np.where(t <= 1.0, (1.0 - t) ** 2, 0.0)


def wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares by QR/SVD (numpy's lstsq), as robustbase's ``dgels`` on sqrt-weighted rows."""
    sw = np.sqrt(w)
    return np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]


def _mean_rho(r: np.ndarray, s: float, p: int) -> float:
    return float(rho(r / s, C_CHI).sum() / (len(r) - p))


def find_scale(r: np.ndarray, s: float, p: int, tol: float = 1e-10, max_it: int = 500) -> float:
    """robustbase's ``find_scale``: the fixed point ``s = s sqrt(mean rho(r / s) / bb)``."""
    for _ in range(max_it):
        new = s * np.sqrt(_mean_rho(r, s, p) / BB)
        if abs(new - s) <= tol * s:
            return new
        s = new
    return new


@dataclass
class Fit:
    coef: np.ndarray
    coef_s: np.ndarray
    scale: float
    cov: np.ndarray | None
    exact: bool
    converged: bool


def lmrob(x: np.ndarray, y: np.ndarray) -> Fit:
    """``lmrob(y ~ x - 1)`` with ``k.max = 500, maxit.scale = 500`` and every elemental subset offered.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, p)`` design (rows already times ``sqrt(weights)``).
    y : numpy.ndarray
        ``(n,)`` response (times ``sqrt(weights)``).
    """
    n, p = x.shape
    best = None
    for subset in itertools.combinations(range(n), p):
        rows = list(subset)
        xs = x[rows]
        if abs(np.linalg.det(xs)) < 1e-7 * np.abs(xs).max() ** p:
            continue
        beta = np.linalg.solve(xs, y[rows])
        r = y - x @ beta
        if (np.abs(r) < 1e-10).sum() > (n + p) / 2:  # refine_fast_s: a perfect fit, scale 0
            return Fit(beta, beta, 0.0, np.zeros((p, p)), exact=True, converged=True)
        s = 1.4826 * np.median(np.abs(r))  # MAD(r, center = 0)
        if s > 0:  # one refine_fast_s step (k.fast.s = 1)
            s = s * np.sqrt(_mean_rho(r, s, p) / BB)
            beta = wls(x, y, weights(r / s, C_CHI))
            r = y - x @ beta
        else:  # residuals at the subset vanish: robustbase's step at a round-off scale keeps the candidate
            s = np.sqrt((r * r).sum() / n)
        if best is None or _mean_rho(r, best[1], p) < BB:
            sc = find_scale(r, s, p)
            if best is None or sc < best[1]:
                best = (beta, sc)
    coef_s, scale, beta_prev, s_conv = refine_s(x, y, *best)
    beta, m_conv = rwls(x, y, coef_s, scale)
    r, r0 = y - x @ beta, y - x @ beta_prev  # robustbase keeps the residuals before the last step as init.S$residuals
    return Fit(beta, coef_s, scale, vcov_avar1(x, r, r0, scale), exact=False, converged=s_conv and m_conv)


def refine_s(x: np.ndarray, y: np.ndarray, beta: np.ndarray, s: float, tol: float = 1e-7, max_k: int = 500):
    """``refine_fast_s(conv = TRUE)``: (beta, scale, the beta before the last step, converged)."""
    p = x.shape[1]
    r = y - x @ beta
    for _ in range(max_k):
        s = s * np.sqrt(_mean_rho(r, s, p) / BB)
        new = wls(x, y, weights(r / s, C_CHI))
        if np.linalg.norm(beta - new) <= tol * max(tol, np.linalg.norm(beta)):
            return new, s, beta, True
        r = y - x @ new
        beta = new
    return new, s, beta, False


def rwls(x: np.ndarray, y: np.ndarray, beta: np.ndarray, s: float, tol: float = 1e-7, max_it: int = 50):
    """The M-step ``rwls`` at the fixed scale ``s``: (beta, converged)."""
    it, conv = 1, False
    while not conv and it < max_it:  # robustbase: while (!converged && ++iterations < max_it)
        it += 1
        est = wls(x, y, weights((y - x @ beta) / s, C_PSI))
        conv = np.abs(beta - est).sum() <= tol * max(tol, np.abs(est).sum())
        beta = est
    return beta, conv


def vcov_avar1(x: np.ndarray, r: np.ndarray, r0: np.ndarray, s: float) -> np.ndarray:
    """robustbase's ``.vcov.avar1`` (before posdefify) at final residuals ``r`` and S residuals ``r0``."""
    n = len(r)
    rs, r0s = r / s, r0 / s
    t = (rs / C_PSI) ** 2
    dpsi = np.where(t < 1, (1 - t) * (1 - 5 * t), 0.0)
    psi = np.where(t < 1, rs * (1 - t) ** 2, 0.0)
    t0 = (r0s / C_CHI) ** 2
    chi = np.where(t0 < 1, 1 - (1 - t0) ** 3, 1.0)
    dchi = np.where(t0 < 1, 6 * r0s / C_CHI**2 * (1 - t0) ** 2, 0.0)
    a_mat = np.linalg.inv(x.T @ (x * dpsi[:, None])) * s
    a = a_mat @ (x.T @ (dpsi * rs)) / np.mean(dchi * r0s)
    xww = x.T @ (psi * chi)
    u1 = a_mat @ (x.T @ (x * (psi**2)[:, None])) @ (n * a_mat)
    u2 = np.outer(a, xww @ a_mat)
    u3 = np.outer(a_mat @ xww, a)
    u4 = np.mean(chi**2 - BB * BB) * np.outer(a, a)
    return (u1 - u2 - u3 + u4) / n
