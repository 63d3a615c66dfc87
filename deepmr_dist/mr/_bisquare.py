"""Fused per-instrument loops of the MM-estimation in :mod:`deepmr_dist.mr.robust` (numba).

Every step of an S- or M-fit needs, per locus, the residuals at the current
coefficients, the bisquare weights and a handful of sums over the instruments.
As numpy expressions that is about ten passes over ``(loci, instruments)``
arrays per step, each a round trip through memory; here it is one loop that
keeps everything in registers.

Two kinds of loops:

* ``row_*`` functions work on one row (locus) ``i`` of a design and return
  scalars; :mod:`deepmr_dist.mr._mm_per_locus` calls them inside its compiled
  per-locus iterations (they are also callable from Python, for tests);
* the other kernels fill whole ``(m, ...)`` arrays for the numpy parts of
  :mod:`deepmr_dist.mr.robust` (starting values, the covariance).

Layout and notation as :mod:`deepmr_dist.mr.robust`: ``xy`` is ``(m, p + 1, K)``
(the ``p`` design columns, then the response; 0 at unused entries, which then
add nothing to any sum: zero residual, ``rho = 0``). Weighted sums are flat rows
``(sum w x x' upper triangle row-major, sum w x y)`` of length ``p (p + 1) / 2 + p``.
For scaled residuals ``u``: ``t = u^2``, ``v = max(1 - t, 0)``, the normalised
bisquare ``rho = 1 - v^3``, ``psi(u) / u`` proportional to ``v^2``.

The loops for p = 1 and p = 2 design columns are written out separately: a loop
over the columns inside the loop over instruments keeps LLVM from vectorising it
(a column-generic covariance loop ran about 2.5 times slower).

The sums are compiled with ``fastmath`` (reassociated sums, no NaN/inf
semantics), so callers pass only finite coefficients and positive finite
scales. Loops that write or test infinities (the starting-value helpers) keep
IEEE semantics.

No kernel is cached on disk (``cache=False``): a loop that numba loaded from its
cache gave other last bits than the same loop freshly compiled (two fresh
compilations agree), which robustbase's stopping rules turned into MR results
up to 1e-10 apart between a first and a later run. Summing in program order
instead (fastmath without ``reassoc``) made the 3,000-instrument robust fit
five times slower; compiling in every process costs about 3.5 s once.
"""

from __future__ import annotations

import numba
import numpy as np

_IEEE = {"nogil": True, "cache": False, "boundscheck": False, "error_model": "numpy"}
"""Loops that write or test infinities keep IEEE semantics."""
_JIT = {**_IEEE, "fastmath": True}


def n_sums(p: int) -> int:
    """Length of a flat weighted-sum row for ``p`` design columns."""
    return p * (p + 1) // 2 + p


@numba.njit(**_JIT)
def row_sums_1(xy, i, b0, c):  # pragma: no cover - compiled
    """Bisquare sums of row ``i``, p = 1, at ``u = (y - b0 x0) c``.

    Returns ``(w00, w0y, v00, v0y, rho, tw)``: the flat sums with weights ``v^2``,
    then with weights ``v``, ``sum rho(u)`` and ``sum v^2 t``.
    """
    k = xy.shape[2]
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
    return w00, w0y, v00, v0y, rho, tw


@numba.njit(**_JIT)
def row_sums_2(xy, i, b0, b1, c):  # pragma: no cover - compiled
    """Bisquare sums of row ``i``, p = 2, at ``u = (y - b0 x0 - b1 x1) c``.

    Returns ``(w00, w01, w11, w0y, w1y, v00, v01, v11, v0y, v1y, rho, tw)``: the
    flat sums with weights ``v^2``, then with weights ``v``, ``sum rho(u)`` and
    ``sum v^2 t``.
    """
    k = xy.shape[2]
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
    return w00, w01, w11, w0y, w1y, v00, v01, v11, v0y, v1y, rho, tw


@numba.njit(**_JIT)
def row_rho(xy, i, b0, b1, c):  # pragma: no cover - compiled
    """``(sum rho(u), sum v^2 t)`` of row ``i`` at ``u = (y - x beta) c`` (``b1`` unused when p = 1)."""
    k = xy.shape[2]
    rho = tw = 0.0
    if xy.shape[1] == 3:
        for j in range(k):
            u = (xy[i, 2, j] - b0 * xy[i, 0, j] - b1 * xy[i, 1, j]) * c
            t = u * u
            v = max(1.0 - t, 0.0)
            w = v * v
            rho += 1.0 - w * v
            tw += w * t
    else:
        for j in range(k):
            u = (xy[i, 1, j] - b0 * xy[i, 0, j]) * c
            t = u * u
            v = max(1.0 - t, 0.0)
            w = v * v
            rho += 1.0 - w * v
            tw += w * t
    return rho, tw


@numba.njit(**_JIT)
def row_resid_stats(xy, i, b0, b1, tol):  # pragma: no cover - compiled
    """``(number of |r| < tol, sum r^2)`` of row ``i``'s residuals ``r = y - x beta`` (unused entries count)."""
    k = xy.shape[2]
    small = 0
    rss = 0.0
    if xy.shape[1] == 3:
        for j in range(k):
            r = xy[i, 2, j] - b0 * xy[i, 0, j] - b1 * xy[i, 1, j]
            small += abs(r) < tol
            rss += r * r
    else:
        for j in range(k):
            r = xy[i, 1, j] - b0 * xy[i, 0, j]
            small += abs(r) < tol
            rss += r * r
    return small, rss


@numba.njit(**_JIT)
def row_mscale(xy, i, b0, b1, target, s0, c, tol, max_iter):  # pragma: no cover - compiled
    """M-scale of row ``i``'s residuals: ``sum rho_c(r / s) = target``, from ``s0 > 0``.

    Newton steps (``d/ds sum rho = -6 sum v^2 t / s``), with the fixed-point step
    ``s sqrt(sum rho / target)`` where Newton leaves ``(s / 2, 2 s)``; stops at a
    relative change of ``tol``. Both steps stay finite for finite ``s > 0``
    (``rho`` lies in ``[0, K]``).
    """
    s = s0
    for _ in range(max_iter):
        rho, tv = row_rho(xy, i, b0, b1, 1.0 / (c * s))
        s_new = s * np.sqrt(rho / target)
        if tv > 0.0:
            s_newton = s + (rho - target) * s / (6.0 * tv)
            if 0.5 * s < s_newton < 2.0 * s:
                s_new = s_newton
        done = abs(s_new - s) <= tol * s
        s = s_new
        if done or s <= 0.0:
            break
    return s


@numba.njit(**_IEEE)
def _ratios(xy, valid, out):  # pragma: no cover - compiled
    m, p1, k = xy.shape
    count = np.zeros(m, dtype=np.int64)
    for i in range(m):
        used = 0
        for j in range(k):
            x = xy[i, p1 - 2, j]
            ok = valid[i, j] & (x != 0.0)  # a select, not a branch: the loop vectorises
            out[i, j] = xy[i, p1 - 1, j] / x if ok else np.inf
            used += ok
        count[i] = used
    return count


def ratios(xy: np.ndarray, valid: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Ratios ``y / x_last`` of the used entries with ``x_last != 0`` into ``out`` (``+inf`` elsewhere).

    Returns the number of ratios per row. ``xy`` is ``(m, p + 1, K)``, ``out`` ``(m, K)``.
    """
    return _ratios(np.ascontiguousarray(xy), np.ascontiguousarray(valid), out)


@numba.njit(**_IEEE)
def _intercepts(xy, valid, slope, out):  # pragma: no cover - compiled
    m, _, k = xy.shape
    for i in range(m):
        b = slope[i]
        for j in range(k):
            if valid[i, j]:
                r = xy[i, 2, j] - b * xy[i, 1, j]
                x0 = xy[i, 0, j]
                out[i, j] = r / x0 if x0 != 0.0 else r
            else:
                out[i, j] = np.inf


def intercepts(xy: np.ndarray, valid: np.ndarray, slope: np.ndarray, out: np.ndarray) -> None:
    """``(y - slope x1) / x0`` of the used entries of a p = 2 design into ``out`` (``+inf`` elsewhere).

    Where ``x0 == 0`` the residual is left undivided.
    """
    _intercepts(np.ascontiguousarray(xy), np.ascontiguousarray(valid), np.ascontiguousarray(slope), out)


@numba.njit(**_IEEE)
def _abs_resid(xy, valid, beta, out):  # pragma: no cover - compiled
    m, p1, k = xy.shape
    for i in range(m):
        b0 = beta[i, 0]
        b1 = beta[i, 1] if p1 == 3 else 0.0
        for j in range(k):
            if valid[i, j]:
                r = xy[i, p1 - 1, j] - b0 * xy[i, 0, j]
                if p1 == 3:
                    r -= b1 * xy[i, 1, j]
                out[i, j] = abs(r)
            else:
                out[i, j] = np.inf


def abs_resid(xy: np.ndarray, valid: np.ndarray, beta: np.ndarray, out: np.ndarray) -> None:
    """``|y - x beta|`` of the used entries into ``out`` (``+inf`` elsewhere); ``beta`` is ``(m, p)``."""
    _abs_resid(np.ascontiguousarray(xy), np.ascontiguousarray(valid), np.ascontiguousarray(beta), out)


@numba.njit(**_JIT)
def _design_sums(xy, out):  # pragma: no cover - compiled
    m, p1, k = xy.shape
    for i in range(m):
        if p1 == 3:
            s00 = s01 = s11 = s0y = s1y = 0.0
            for j in range(k):
                x0 = xy[i, 0, j]
                x1 = xy[i, 1, j]
                y = xy[i, 2, j]
                s00 += x0 * x0
                s01 += x0 * x1
                s11 += x1 * x1
                s0y += x0 * y
                s1y += x1 * y
            out[i, 0], out[i, 1], out[i, 2], out[i, 3], out[i, 4] = s00, s01, s11, s0y, s1y
        else:
            s00 = s0y = 0.0
            for j in range(k):
                x0 = xy[i, 0, j]
                s00 += x0 * x0
                s0y += x0 * xy[i, 1, j]
            out[i, 0], out[i, 1] = s00, s0y


def design_sums(xy: np.ndarray) -> np.ndarray:
    """Flat unweighted sums ``(sum x x' upper triangle, sum x y)`` per row of ``xy`` ``(m, p + 1, K)``, p = 1 or 2."""
    m, p1, _ = xy.shape
    out = np.empty((m, n_sums(p1 - 1)))
    _design_sums(np.ascontiguousarray(xy), out)
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
