"""Fused per-instrument loops of the MM-estimation in :mod:`deepmr_dist.mr.robust` (numba).

Every iteration of an S- or M-step needs, per locus, the residuals at the
current coefficients, the bisquare weights and a handful of weighted sums over
the instruments. As numpy expressions that is about ten passes over
``(loci, instruments)`` arrays per iteration, each a round trip through memory;
here it is one loop that keeps everything in registers (about ten times faster
at thousands of instruments per locus, where the passes dominate).

Layout and notation as :mod:`deepmr_dist.mr.robust`: ``xy`` is ``(m, p + 1, K)``
(the ``p`` design columns, then the response; 0 at unused entries, which then
add nothing to any sum: zero residual, ``rho = 0``). Weighted sums are flat rows
``(sum w x x' upper triangle row-major, sum w x y)`` of length ``p (p + 1) / 2 + p``.
For scaled residuals ``u``: ``t = u^2``, ``v = max(1 - t, 0)``, the normalised
bisquare ``rho = 1 - v^3``, ``psi(u) / u`` proportional to ``v^2``.

The loops for p = 1 and p = 2 design columns are written out separately: a loop
over the columns inside the loop over instruments keeps LLVM from vectorising it
(a column-generic covariance loop ran about 2.5 times slower).

The loops are compiled with ``fastmath`` (reassociated sums, no NaN/inf
semantics), so the wrappers take only finite coefficients and scales: rows where
they are not finite get NaN sums without entering a loop.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True, "fastmath": True, "boundscheck": False, "error_model": "numpy"}


def n_sums(p: int) -> int:
    """Length of a flat weighted-sum row for ``p`` design columns."""
    return p * (p + 1) // 2 + p


@numba.njit(**_JIT)
def _bisquare_sums_1(xy, beta, inv, out):  # pragma: no cover - compiled
    m, _, k = xy.shape
    for i in range(m):
        b0 = beta[i, 0]
        c = inv[i]
        w00 = w0y = v00 = v0y = rho = tw = 0.0
        for j in range(k):
            x0 = xy[i, 0, j]
            y = xy[i, 1, j]
            u = (y - b0 * x0) * c
            t = u * u
            v = max(1.0 - t, 0.0)
            w = v * v
            rho += 1.0 - w * v
            tw += w * t
            wx0 = w * x0
            w00 += wx0 * x0
            w0y += wx0 * y
            vx0 = v * x0
            v00 += vx0 * x0
            v0y += vx0 * y
        out[i, 0] = w00
        out[i, 1] = w0y
        out[i, 2] = v00
        out[i, 3] = v0y
        out[i, 4] = rho
        out[i, 5] = tw


@numba.njit(**_JIT)
def _bisquare_sums_2(xy, beta, inv, out):  # pragma: no cover - compiled
    m, _, k = xy.shape
    for i in range(m):
        b0 = beta[i, 0]
        b1 = beta[i, 1]
        c = inv[i]
        w00 = w01 = w11 = w0y = w1y = 0.0
        v00 = v01 = v11 = v0y = v1y = 0.0
        rho = tw = 0.0
        for j in range(k):
            x0 = xy[i, 0, j]
            x1 = xy[i, 1, j]
            y = xy[i, 2, j]
            u = (y - b0 * x0 - b1 * x1) * c
            t = u * u
            v = max(1.0 - t, 0.0)
            w = v * v
            rho += 1.0 - w * v
            tw += w * t
            wx0 = w * x0
            wx1 = w * x1
            w00 += wx0 * x0
            w01 += wx0 * x1
            w11 += wx1 * x1
            w0y += wx0 * y
            w1y += wx1 * y
            vx0 = v * x0
            vx1 = v * x1
            v00 += vx0 * x0
            v01 += vx0 * x1
            v11 += vx1 * x1
            v0y += vx0 * y
            v1y += vx1 * y
        out[i, 0] = w00
        out[i, 1] = w01
        out[i, 2] = w11
        out[i, 3] = w0y
        out[i, 4] = w1y
        out[i, 5] = v00
        out[i, 6] = v01
        out[i, 7] = v11
        out[i, 8] = v0y
        out[i, 9] = v1y
        out[i, 10] = rho
        out[i, 11] = tw


def bisquare_sums(xy: np.ndarray, beta: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Bisquare sums at residuals ``u = (y - x beta) inv`` per row, in one pass.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(m, p + 1, K)`` design and response, p = 1 or 2.
    beta : numpy.ndarray
        ``(m, p)`` coefficients.
    inv : numpy.ndarray
        ``(m,)`` inverse scale of the residuals (``1 / (c s)``).

    Returns
    -------
    numpy.ndarray
        ``(m, 2 n_sums(p) + 2)``: the flat sums with weights ``v^2``, the flat
        sums with weights ``v``, ``sum rho(u)`` and ``sum v^2 t``. NaN rows where
        ``beta`` or ``inv`` is not finite.
    """
    m, p = beta.shape
    out = np.empty((m, 2 * n_sums(p) + 2))
    finite = np.isfinite(beta).all(axis=1) & np.isfinite(inv)
    kernel = _bisquare_sums_1 if p == 1 else _bisquare_sums_2
    kernel(np.ascontiguousarray(xy), np.where(finite[:, None], beta, 0.0), np.where(finite, inv, 0.0), out)
    out[~finite] = np.nan
    return out


@numba.njit(**_JIT)
def _rho_sums(r, inv, out):  # pragma: no cover - compiled
    m, k = r.shape
    for i in range(m):
        c = inv[i]
        total = 0.0
        for j in range(k):
            u = r[i, j] * c
            v = max(1.0 - u * u, 0.0)
            total += 1.0 - v * v * v
        out[i] = total


def rho_sums(r: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """``sum rho(r inv)`` per row of residuals ``r`` ``(m, K)``; NaN where ``inv`` is not finite."""
    out = np.empty(r.shape[0])
    finite = np.isfinite(inv)
    _rho_sums(np.ascontiguousarray(r), np.where(finite, inv, 0.0), out)
    out[~finite] = np.nan
    return out


@numba.njit(**_JIT)
def _mscale(r2, target, s0, c, tol, max_iter, out):  # pragma: no cover - compiled
    m, k = r2.shape
    for i in range(m):
        s = s0[i]
        tg = target[i]
        for _ in range(max_iter):
            inv2 = 1.0 / (c * s) ** 2
            rho = tv = 0.0
            for j in range(k):
                t = r2[i, j] * inv2
                v = max(1.0 - t, 0.0)
                d = v * v
                rho += 1.0 - d * v
                tv += d * t
            # Newton on sum rho(r / s) = target (d/ds sum rho = -6 tv / s), else the fixed-point
            # step; both stay finite for finite s > 0 (rho lies in [0, K])
            s_new = s * np.sqrt(rho / tg)
            if tv > 0.0:
                s_newton = s + (rho - tg) * s / (6.0 * tv)
                if 0.5 * s < s_newton < 2.0 * s:
                    s_new = s_newton
            done = abs(s_new - s) <= tol * s
            s = s_new
            if done or s <= 0.0:
                break
        out[i] = s


def mscale(r2: np.ndarray, target: np.ndarray, s0: np.ndarray, c: float, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """M-scale per row, ``sum rho_c(r / s) = target``, from squared residuals ``r2`` ``(m, K)``.

    Newton steps, with the fixed-point step ``s sqrt(sum rho / target)`` where
    Newton leaves ``(s / 2, 2 s)``; a row stops at a relative change of ``tol``.
    Rows whose start ``s0`` is not a positive finite number keep it.
    """
    out = np.empty(r2.shape[0])
    start = np.isfinite(s0) & (s0 > 0) & np.isfinite(target) & (target > 0)
    _mscale(np.ascontiguousarray(r2), np.where(start, target, 1.0), np.where(start, s0, 1.0), c, tol, max_iter, out)
    return np.where(start, out, s0)


@numba.njit(**_JIT)
def _weighted_sums(xy, w, out):  # pragma: no cover - compiled
    m, p1, k = xy.shape
    p = p1 - 1
    for i in range(m):
        col = 0
        for a in range(p):
            for b in range(a, p):
                total = 0.0
                for j in range(k):
                    total += w[i, j] * xy[i, a, j] * xy[i, b, j]
                out[i, col] = total
                col += 1
        for a in range(p):
            total = 0.0
            for j in range(k):
                total += w[i, j] * xy[i, a, j] * xy[i, p, j]
            out[i, col] = total
            col += 1


def weighted_sums(xy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Flat weighted sums ``(sum w x x' upper triangle, sum w x y)`` per row; ``w`` is ``(m, K)``."""
    m, p1, _ = xy.shape
    out = np.empty((m, n_sums(p1 - 1)))
    _weighted_sums(np.ascontiguousarray(xy), np.ascontiguousarray(w), out)
    return out


@numba.njit(**_JIT)
def _avar1_sums_1(xy, beta, beta_s, s, c_psi, c_chi, out):  # pragma: no cover - compiled
    m, _, k = xy.shape
    for i in range(m):
        b0, g0 = beta[i, 0], beta_s[i, 0]
        inv = 1.0 / s[i]
        inv0 = 1.0 / (c_chi * s[i])
        d00 = d0y = p00 = w0 = rr = dchi = chi2 = 0.0
        for j in range(k):
            x0 = xy[i, 0, j]
            y = xy[i, 1, j]
            rs = (y - b0 * x0) * inv
            t = (rs / c_psi) ** 2
            v = max(1.0 - t, 0.0)
            psi = rs * v * v
            dpsi = v * (1.0 - 5.0 * t)
            u0 = (y - g0 * x0) * inv0
            t0 = u0 * u0
            v0 = max(1.0 - t0, 0.0)
            chi = 1.0 - v0 * v0 * v0
            d00 += dpsi * x0 * x0
            d0y += dpsi * x0 * y
            p00 += psi * psi * x0 * x0
            w0 += x0 * psi * chi
            rr += rs * rs
            dchi += t0 * v0 * v0
            chi2 += chi * chi
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = d00, d0y, p00, w0
        out[i, 4], out[i, 5], out[i, 6] = rr, dchi, chi2


@numba.njit(**_JIT)
def _avar1_sums_2(xy, beta, beta_s, s, c_psi, c_chi, out):  # pragma: no cover - compiled
    m, _, k = xy.shape
    for i in range(m):
        b0, b1, g0, g1 = beta[i, 0], beta[i, 1], beta_s[i, 0], beta_s[i, 1]
        inv = 1.0 / s[i]
        inv0 = 1.0 / (c_chi * s[i])
        d00 = d01 = d11 = d0y = d1y = p00 = p01 = p11 = w0 = w1 = rr = dchi = chi2 = 0.0
        for j in range(k):
            x0 = xy[i, 0, j]
            x1 = xy[i, 1, j]
            y = xy[i, 2, j]
            rs = (y - b0 * x0 - b1 * x1) * inv
            t = (rs / c_psi) ** 2
            v = max(1.0 - t, 0.0)
            psi = rs * v * v
            dpsi = v * (1.0 - 5.0 * t)
            u0 = (y - g0 * x0 - g1 * x1) * inv0
            t0 = u0 * u0
            v0 = max(1.0 - t0, 0.0)
            chi = 1.0 - v0 * v0 * v0
            dx0 = dpsi * x0
            dx1 = dpsi * x1
            d00 += dx0 * x0
            d01 += dx0 * x1
            d11 += dx1 * x1
            d0y += dx0 * y
            d1y += dx1 * y
            pp = psi * psi
            p00 += pp * x0 * x0
            p01 += pp * x0 * x1
            p11 += pp * x1 * x1
            pc = psi * chi
            w0 += x0 * pc
            w1 += x1 * pc
            rr += rs * rs
            dchi += t0 * v0 * v0
            chi2 += chi * chi
        out[i, 0], out[i, 1], out[i, 2], out[i, 3], out[i, 4] = d00, d01, d11, d0y, d1y
        out[i, 5], out[i, 6], out[i, 7], out[i, 8], out[i, 9] = p00, p01, p11, w0, w1
        out[i, 10], out[i, 11], out[i, 12] = rr, dchi, chi2


def avar1_sums(xy: np.ndarray, beta: np.ndarray, beta_s: np.ndarray, s: np.ndarray, c_psi: float, c_chi: float) -> np.ndarray:
    """The sums behind ``.vcov.avar1`` per row, in one pass over the instruments.

    With ``r = (y - x beta) / s``, ``v = max(1 - (r / c_psi)^2, 0)``, ``psi = r v^2``,
    ``psi' = v (1 - 5 (r / c_psi)^2)`` and, at the S coefficients,
    ``u0 = (y - x beta_s) / (c_chi s)``, ``v0 = max(1 - u0^2, 0)``, ``chi = 1 - v0^3``:
    columns are the flat sums with weights ``psi'`` (``n_sums(p)``), ``sum psi^2 x x'``
    (upper triangle, ``p (p + 1) / 2``), ``sum x psi chi`` (``p``), ``sum r^2``,
    ``sum u0^2 v0^2`` and ``sum chi^2``. Coefficients and scales must be finite, ``s > 0``.
    """
    m, p = beta.shape
    out = np.empty((m, n_sums(p) + p * (p + 1) // 2 + p + 3))
    kernel = _avar1_sums_1 if p == 1 else _avar1_sums_2
    kernel(np.ascontiguousarray(xy), np.ascontiguousarray(beta), np.ascontiguousarray(beta_s), np.ascontiguousarray(s), c_psi, c_chi, out)
    return out


@numba.njit(**_JIT)
def _egger_design(bx, by, byse, valid, out):  # pragma: no cover - compiled
    m, k = bx.shape
    for i in range(m):
        for j in range(k):
            inv = valid[i, j] / byse[i, j]  # unused entries: valid 0, byse 1
            b = bx[i, j]
            sign = (b > 0.0) * 1.0 - (b < 0.0) * 1.0
            out[i, 0, j] = inv
            out[i, 1, j] = abs(b) * inv
            out[i, 2, j] = sign * by[i, j] * inv


def egger_design(bx: np.ndarray, by: np.ndarray, byse: np.ndarray, valid: np.ndarray, out: np.ndarray) -> None:
    """MR-Egger's oriented, sqrt-weighted design into ``out`` ``(m, 3, K)``: ``(1, |bx|, sign(bx) by) / byse``.

    Unused entries (``valid`` False) get 0; they must hold ``byse = 1`` and finite ``bx``, ``by`` (as
    :class:`~deepmr_dist.mr._data.MRData` stores them).
    """
    _egger_design(np.ascontiguousarray(bx), np.ascontiguousarray(by), np.ascontiguousarray(byse), np.ascontiguousarray(valid), out)
