"""Robust IVW and robust MR-Egger: MM-estimation as ``robustbase::lmrob``.

The package calls ``lmrob(by ~ bx - 1, weights = byse^-2)`` (robust IVW) and
``lmrob(by ~ bx, weights = byse^-2)`` on oriented data (robust MR-Egger) with the
``lmrob.control()`` defaults: method "MM", bisquare psi, S-estimate with
``tuning.chi = 1.54764`` and ``bb = 0.5``, M-step with ``tuning.psi = 4.685061``,
covariance ``.vcov.avar1``. ``lmrob`` applies weights by scaling rows with
``sqrt(w)``, so the fits here run on ``X = x / byse``, ``y = by / byse``.

Definitions (bisquare, ``t = (u / c)^2``, ``v = max(1 - t, 0)``)::

    rho(u) = 1 - v^3            (normalised, rho(inf) = 1)
    psi(u) = u v^2              (robustbase's Mpsi)
    S-estimate:  (1 / (n - p)) sum rho_c1(r_i / s) = bb,  sum psi_c1(r_i / s) x_i = 0,
                 at the minimum of s over beta
    MM-estimate: sum psi_c2(r_i / s) x_i = 0 with s fixed at the S-scale

Differences from robustbase, by design:

* Deterministic S-step. robustbase draws 500 random elemental subsamples, refines
  each by one S-iteration (``k.fast.s = 1``) and fully refines the best two. Here
  the candidates are: the median ratio (plus the median intercept, and intercept 0,
  for Egger), least squares, and elemental fits (all of them when
  ``C(n, p) * n <= 4000``, e.g. every pair up to n = 20 for Egger; otherwise
  ``500 // n`` pairs from a fixed pseudo-random sequence, none above n = 50).
  Each candidate gets one S-iteration; a candidate replaces the best one only if
  its M-scale is smaller (robustbase's ``sum rho(r / s_best) < bb (n - p)`` test);
  the best is refined to convergence. With one basin of attraction around the bulk
  of the instruments this is robustbase's S-estimate; with competing clusters the
  two may settle in different local minima (robustbase then depends on its seed).
  For small n the exhaustive search returns the global minimum over all refined
  elemental fits, which robustbase's 500 draws approximate.
* Convergence. robustbase stops its iterations at a relative change of 1e-7; here
  iteratively reweighted least squares (IRWLS) is followed by safeguarded Newton
  steps on the estimating equations, to a relative step of 1e-10 (IRWLS) or 1e-8
  (Newton, whose error is then of order 1e-16), so results agree with robustbase to
  its own tolerance (about 1e-7 relative).
* All loci of a chunk are iterated together (a loop over iterations and over
  candidates, never over loci); converged loci drop out of the working set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepmr_dist.mr._data import MRData, chi2_sf, chunk_bounds, row_median_select, run_chunks, wald_inference
from deepmr_dist.mr.egger import egger_inference, egger_residual_q, i2_gx, oriented
from deepmr_dist.mr.result import MRResult, ResultBuilder

C_CHI = 1.54764
"""``lmrob.control()$tuning.chi`` for the bisquare S-estimator."""
C_PSI = 4.685061
"""``lmrob.control()$tuning.psi`` for the bisquare M-step (95% efficiency)."""
BB = 0.5
"""``lmrob.control()$bb``: the S-estimator's breakdown point."""
EXACT_TOL = 1e-10
"""robustbase's EPS_SCALE: residuals below it count as exactly fitted."""
SINGULAR_TOL = 1e-7
"""robustbase's solve.tol, used for rank deficiency of the design."""
NEWTON_SWITCH = 1e-2
"""Relative IRWLS step below which Newton steps take over."""
TOL = 1e-10
"""Relative IRWLS step size at which a fit counts as converged."""
TOL_NEWTON = 1e-8
"""Relative Newton step size at which a fit counts as converged (the step just taken
leaves an error of order its square, far below :data:`TOL`)."""
MAX_ITER = 500
"""Iteration limit of each stage (the package passes ``k.max = 500``)."""
K_FAST = 1
"""S-iterations applied to each candidate before comparison (``k.fast.s``)."""
ELEMENTAL_BUDGET = 4000
"""Exhaustive elemental search while (number of subsets) x (instruments) stays below this."""
ELEMENTAL_RANDOM_BUDGET = 500
"""Otherwise ``ELEMENTAL_RANDOM_BUDGET // n`` fixed pseudo-random elemental subsets ..."""
ELEMENTAL_MIN = 10
"""... or none when that is fewer than this (large loci rely on the LS and median starts)."""
CHUNK_ELEMENTS = 96_000
"""Target loci x instruments per chunk; keeps the working set in cache."""


@dataclass(frozen=True)
class MMFit:
    """MM-regression fits for a batch of loci (transformed, sqrt-weighted scale).

    Attributes
    ----------
    coef : numpy.ndarray
        ``(n_loci, p)`` MM coefficients.
    coef_s : numpy.ndarray
        ``(n_loci, p)`` coefficients of the initial S-estimate.
    cov : numpy.ndarray
        ``(n_loci, p, p)`` ``.vcov.avar1`` covariance (before the package's rse flooring).
    scale : numpy.ndarray
        ``(n_loci,)`` S-estimate of scale (``summary(fit)$sigma``).
    converged, exact, singular : numpy.ndarray
        ``(n_loci,)`` bool flags: iterations converged; exact fit (scale 0);
        rank-deficient design (no fit attempted).
    """

    coef: np.ndarray
    coef_s: np.ndarray
    cov: np.ndarray
    scale: np.ndarray
    converged: np.ndarray
    exact: np.ndarray
    singular: np.ndarray


# ----------------------------------------------------------------------------- small linear algebra


def _pairs(p: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(p) for j in range(i, p)]


def _sym(flat: np.ndarray, p: int) -> np.ndarray:
    """``(m, p(p+1)/2)`` upper-triangle sums -> ``(m, p, p)`` symmetric matrices."""
    out = np.empty((flat.shape[0], p, p))
    for idx, (i, j) in enumerate(_pairs(p)):
        out[:, i, j] = flat[:, idx]
        out[:, j, i] = flat[:, idx]
    return out


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched solve of small systems; NaN rows where singular or non-finite."""
    m, p = b.shape
    out = np.full((m, p), np.nan)
    if p == 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            return b / a[:, 0, :]
    if p == 2:
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, 0] = (a[:, 1, 1] * b[:, 0] - a[:, 0, 1] * b[:, 1]) / det
            out[:, 1] = (a[:, 0, 0] * b[:, 1] - a[:, 1, 0] * b[:, 0]) / det
        return out
    ok = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
    ok &= np.abs(np.linalg.det(np.where(ok[:, None, None], a, np.eye(p)))) > 0
    if ok.any():
        out[ok] = np.linalg.solve(a[ok], b[ok][..., None])[..., 0]
    return out


def _inv(a: np.ndarray) -> np.ndarray:
    """Batched inverse of small symmetric matrices (NaN where singular)."""
    p = a.shape[1]
    if p == 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 / a
    if p == 2:
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        out = np.empty_like(a)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, 0, 0] = a[:, 1, 1] / det
            out[:, 1, 1] = a[:, 0, 0] / det
            out[:, 0, 1] = -a[:, 0, 1] / det
            out[:, 1, 0] = -a[:, 1, 0] / det
        return out
    return np.stack([np.linalg.inv(ai) if np.isfinite(ai).all() else np.full((p, p), np.nan) for ai in a])


def _posdefify(v: np.ndarray) -> np.ndarray:
    """``.vcov.avar1``'s "posdefify": zero negative eigenvalues, restore the diagonal."""
    out = v.copy()
    finite = np.isfinite(v).all(axis=(1, 2))
    if not finite.any():
        return out
    vals, vecs = np.linalg.eigh(np.where(finite[:, None, None], v, np.eye(v.shape[1])))
    neg = finite & (vals < 0).any(axis=1)
    if not neg.any():
        return out
    lam = np.maximum(vals[neg], 0.0)
    q = vecs[neg]
    fixed = np.einsum("mij,mj,mkj->mik", q, lam, q)
    o_diag = np.diagonal(v[neg], axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(np.maximum(o_diag, 0.0) / np.diagonal(fixed, axis1=1, axis2=2))
    out[neg] = d[:, :, None] * fixed * d[:, None, :]
    return out


def _solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched 3x3 solve by Cramer's rule (NaN where singular)."""

    def det3(m: np.ndarray) -> np.ndarray:
        return (
            m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
            - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
            + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0])
        )

    d = det3(a)
    out = np.empty(b.shape)
    for j in range(3):
        aj = a.copy()
        aj[:, :, j] = b
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            out[:, j] = det3(aj) / d
    return out


def _rel_step(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """robustbase's convergence measure ``||new - old|| / max(tol, ||old||)``."""
    num = np.sqrt(((new - old) ** 2).sum(axis=1))
    den = np.maximum(TOL, np.sqrt((old**2).sum(axis=1)))
    return num / den


# ----------------------------------------------------------------------------- the MM fit of one chunk


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two ``(m, K)`` arrays."""
    return np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


class _Chunk:
    """One chunk of loci (rows) in the sqrt-weighted scale, with weighted-sum machinery.

    Unused entries hold ``x = 0`` and ``y = 0``: they add nothing to weighted sums,
    have zero residual (``rho = 0``), and are excluded from counts through ``n``.
    """

    def __init__(self, xt: np.ndarray, y: np.ndarray, valid: np.ndarray, n: np.ndarray, z: np.ndarray | None = None):
        self.xt = xt  # (m, p, K) contiguous
        self.y = y  # (m, K)
        self.valid = valid
        self.n = n
        self.nf = n.astype(np.float64)
        self.m, self.p, self.k = xt.shape
        self.q = self.p * (self.p + 1) // 2
        if z is None:
            cols = [xt[:, i] * xt[:, j] for i, j in _pairs(self.p)] + [xt[:, i] * y for i in range(self.p)]
            z = np.ascontiguousarray(np.stack(cols, axis=1))  # (m, q + p, K)
        self.z = z
        self.target = BB * (self.nf - self.p)

    def subset(self, rows: np.ndarray) -> _Chunk:
        """The chunk restricted to ``rows``."""
        return _Chunk(self.xt[rows], self.y[rows], self.valid[rows], self.n[rows], self.z[rows])

    def resid(self, beta: np.ndarray) -> np.ndarray:
        """Residuals ``y - X beta`` (zero at unused entries)."""
        return self.y - np.matmul(beta[:, None, :], self.xt)[:, 0, :]

    def wsums(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sum w x x', sum w x y)`` per row for weights ``w`` of shape ``(m, K)``."""
        s = np.matmul(self.z, w[:, :, None])[:, :, 0]
        return _sym(s[:, : self.q], self.p), s[:, self.q :]

    def bisquare(self, r: np.ndarray, s: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        """``t = (r / (s c))^2`` and ``v = max(1 - t, 0)``."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            t = r * (1.0 / (s * c))[:, None]
            np.multiply(t, t, out=t)
        v = 1.0 - t
        np.maximum(v, 0.0, out=v)
        return t, v

    def sum_rho(self, v: np.ndarray, v2: np.ndarray) -> np.ndarray:
        """``sum rho = sum (1 - v^3)`` over used entries (unused entries have v = 1)."""
        return self.k - _rowdot(v2, v)

    def n_exact(self, r: np.ndarray) -> np.ndarray:
        """Used residuals below :data:`EXACT_TOL` in absolute value."""
        return ((np.abs(r) < EXACT_TOL) & self.valid).sum(axis=1)

    def mad0(self, r: np.ndarray) -> np.ndarray:
        """``mad(r, center = 0)`` over used entries."""
        return 1.4826 * row_median_select(np.abs(r), self.valid, self.n)

    def mscale(self, r: np.ndarray, s0: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
        """M-scale of ``r``: ``sum rho_c1(r / s) = bb (n - p)`` (Newton, fixed-point fallback)."""
        s = s0.copy()
        active = np.isfinite(s) & (s > 0)
        for _ in range(max_iter):
            if not active.any():
                break
            t, v = self.bisquare(r, s, C_CHI)
            v2 = v * v
            g = self.sum_rho(v, v2) - self.target
            dg = -6.0 * _rowdot(v2, t) / s  # d/ds sum rho(r / s)
            with np.errstate(invalid="ignore", divide="ignore"):
                s_newton = s - g / dg
                s_fp = s * np.sqrt((g + self.target) / self.target)
            use_newton = np.isfinite(s_newton) & (s_newton > 0.5 * s) & (s_newton < 2.0 * s)
            s_new = np.where(active, np.where(use_newton, s_newton, s_fp), s)
            done = np.abs(s_new - s) <= tol * s
            s = s_new
            active &= ~done & np.isfinite(s) & (s > 0)
        return s


def _agrees(xx: np.ndarray, beta: np.ndarray, b_irwls: np.ndarray, b_newton: np.ndarray) -> np.ndarray:
    """Newton and IRWLS steps point the same way (positive cosine in the metric diag(X'WX))."""
    d = np.sqrt(np.abs(np.diagonal(xx, axis1=1, axis2=2)))
    u = (b_irwls - beta) * d
    w = (b_newton - beta) * d
    return (u * w).sum(axis=1) > 0


def _s_eval(ch: _Chunk, beta: np.ndarray, s: np.ndarray, newton: bool) -> tuple[np.ndarray, ...]:
    """S-iteration at ``(beta, s)``: IRWLS update and, if ``newton``, the Newton update.

    The IRWLS update is robustbase's ``refine_fast_s`` step (scale step
    ``s sqrt(mean rho / bb)`` and weighted least squares with weights ``psi(u) / u``),
    with both evaluated at the current point. Newton solves the joint equations
    ``sum psi_c1(r / s) x = 0`` and ``sum rho_c1(r / s) = bb (n - p)``.
    """
    p = ch.p
    r = ch.resid(beta)
    t, v = ch.bisquare(r, s, C_CHI)
    v2 = v * v
    rho = ch.sum_rho(v, v2)
    xx_w, xy_w = ch.wsums(v2)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_fp = s * np.sqrt(rho / ch.target)
    beta_irwls = _solve(xx_w, xy_w)
    if not newton:
        return beta_irwls, s_fp, None, None
    tv2 = _rowdot(v2, t)
    dpsi = 1.0 - 5.0 * t
    dpsi *= v  # psi'(u) = v (1 - 5 t)
    xx_d, xy_d = ch.wsums(dpsi)
    with np.errstate(invalid="ignore", divide="ignore"):
        fb = (xy_w - np.einsum("mij,mj->mi", xx_w, beta)) / s[:, None]  # sum psi(u) x
        jac = np.empty((ch.m, p + 1, p + 1))
        jac[:, :p, :p] = -xx_d / s[:, None, None]
        jac[:, :p, p] = -(xy_d - np.einsum("mij,mj->mi", xx_d, beta)) / (s * s)[:, None]
        jac[:, p, :p] = -(6.0 / C_CHI**2) * fb / s[:, None]
        jac[:, p, p] = -6.0 * tv2 / s
        rhs = -np.concatenate([fb, (rho - ch.target)[:, None]], axis=1)
        delta = _solve(jac, rhs) if p == 1 else _solve3(jac, rhs)
        beta_n = beta + delta[:, :p]
        s_n = s + delta[:, p]
    ok = np.isfinite(beta_n).all(axis=1) & np.isfinite(s_n) & (s_n > 0.5 * s) & (s_n < 2.0 * s)
    ok &= _agrees(xx_w, beta, beta_irwls, beta_n) & ((s_n - s) * (s_fp - s) >= 0)
    return beta_irwls, s_fp, np.where(ok[:, None], beta_n, np.nan), np.where(ok, s_n, np.nan)


def _m_eval(ch: _Chunk, beta: np.ndarray, s: np.ndarray, newton: bool) -> tuple[np.ndarray, ...]:
    """M-iteration at fixed scale (bisquare c2): IRWLS update and, if ``newton``, the Newton update."""
    r = ch.resid(beta)
    t, v = ch.bisquare(r, s, C_PSI)
    v2 = v * v
    xx_w, xy_w = ch.wsums(v2)
    beta_irwls = _solve(xx_w, xy_w)
    if not newton:
        return beta_irwls, s, None, None
    dpsi = 1.0 - 5.0 * t
    dpsi *= v
    hess, _ = ch.wsums(dpsi)
    grad = xy_w - np.einsum("mij,mj->mi", xx_w, beta)  # s * sum psi(u) x
    beta_n = beta + _solve(hess, grad)
    if ch.p == 1:
        pd = hess[:, 0, 0] > 0
    else:
        pd = (hess[:, 0, 0] > 0) & (hess[:, 0, 0] * hess[:, 1, 1] - hess[:, 0, 1] ** 2 > 0)
    ok = pd & np.isfinite(beta_n).all(axis=1) & _agrees(xx_w, beta, beta_irwls, beta_n)
    return beta_irwls, s, np.where(ok[:, None], beta_n, np.nan), s


def _iterate(
    ch: _Chunk, live: np.ndarray, beta: np.ndarray, s: np.ndarray, evaluate, start_newton: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Iterate ``evaluate`` to convergence for the ``live`` rows; returns beta, s, converged.

    IRWLS steps until the relative step is below a per-row threshold (initially
    :data:`NEWTON_SWITCH`), then Newton steps. A Newton step is used only if it is
    finite, points the same way as the IRWLS step and, from the second on, at least
    halves the previous Newton step; otherwise the row takes the IRWLS step, leaves
    Newton mode and its threshold drops tenfold. IRWLS is a descent method for the
    estimating equations, so every row still converges to the fixed point robustbase
    iterates to. Finished rows are dropped from the working set (compaction).
    ``start_newton`` tries Newton from the first step (for starts known to be close).
    """
    beta = beta.copy()
    s = s.copy()
    conv = np.zeros(ch.m, dtype=bool)
    newton = np.full(ch.m, bool(start_newton))
    thresh = np.full(ch.m, NEWTON_SWITCH)
    last = np.full(ch.m, np.inf)
    idx = np.flatnonzero(live)
    sub = ch.subset(idx) if idx.size < ch.m else ch
    active = np.ones(idx.size, dtype=bool)
    for _ in range(MAX_ITER):
        if not active.any():
            break
        if active.sum() <= 0.7 * active.size and active.size > 4:
            idx = idx[active]
            sub = ch.subset(idx)
            active = np.ones(idx.size, dtype=bool)
        b, sc, nw = beta[idx], s[idx], newton[idx] & active
        b_irwls, s_irwls, b_n, s_n = evaluate(sub, b, sc, bool(nw.any()))
        use_n = np.zeros(idx.size, dtype=bool)
        if b_n is not None:
            use_n = nw & np.isfinite(b_n).all(axis=1) & np.isfinite(s_n)
        if use_n.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                step_n = np.maximum(_rel_step(b_n, b), np.abs(s_n - sc) / sc)
            use_n &= ~((step_n > 0.5 * last[idx]) & (step_n > 1e3 * TOL))
            b_new = np.where(use_n[:, None], b_n, b_irwls)
            s_new = np.where(use_n, s_n, s_irwls)
        else:
            b_new, s_new = b_irwls, s_irwls
        rejected = idx[nw & ~use_n]
        newton[rejected] = False
        thresh[rejected] *= 0.1
        bad = ~(np.isfinite(b_new).all(axis=1) & np.isfinite(s_new) & (s_new > 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.maximum(_rel_step(b_new, b), np.abs(s_new - sc) / sc)
        upd = active & ~bad
        g = idx[upd]
        beta[g] = b_new[upd]
        s[g] = s_new[upd]
        last[g] = np.where(use_n[upd], step[upd], np.inf)
        done = upd & ((step <= TOL) | (use_n & (step <= TOL_NEWTON)))
        conv[idx[done]] = True
        newton[g] |= step[upd] <= thresh[g]
        active &= ~done & ~bad
    return beta, s, conv


def _elemental_plan(n: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Elemental subsets per row: ``(count per row, ranks (n_cand, p))``.

    A row with ``C(n, p) <= ELEMENTAL_BUDGET / n`` gets all its elemental subsets
    (enumerated in colex order, so the first ``C(n, p)`` entries are exactly the
    subsets of ranks below n); larger rows get ``ELEMENTAL_RANDOM_BUDGET // n``
    subsets from a fixed pseudo-random sequence of rank fractions, or none when
    that is below :data:`ELEMENTAL_MIN`. The plan depends only on each row's own n.
    """
    n = np.asarray(n, dtype=np.int64)
    full = np.array([math.comb(int(k), p) for k in n], dtype=np.int64)
    exhaustive = full <= ELEMENTAL_BUDGET // np.maximum(n, 1)
    budget = ELEMENTAL_RANDOM_BUDGET // np.maximum(n, 1)
    count = np.where(exhaustive, full, np.where(budget >= ELEMENTAL_MIN, budget, 0))
    return count, exhaustive


def _colex(c: int, p: int) -> tuple[int, ...]:
    """The c-th p-subset of {0, 1, ...} in colex order."""
    if p == 1:
        return (c,)
    j = 1
    while math.comb(j + 1, 2) <= c:
        j += 1
    return (c - math.comb(j, 2), j)


def _elemental_ranks(c: int, n: np.ndarray, exhaustive: np.ndarray, p: int) -> np.ndarray:
    """Ranks (m, p) of candidate ``c`` for every row (exhaustive rows: colex; others: fixed sequence)."""
    ranks = np.empty((n.shape[0], p), dtype=np.int64)
    ranks[:] = _colex(c, p) if exhaustive.any() else 0
    if (~exhaustive).any():
        u = _SEQUENCE[c % _SEQUENCE.shape[0]]
        nn = np.maximum(n[~exhaustive], p)
        first = np.minimum((u[0] * nn).astype(np.int64), nn - 1)
        if p == 1:
            ranks[~exhaustive, 0] = first
        else:
            second = np.minimum((u[1] * (nn - 1)).astype(np.int64), nn - 2)
            second = second + (second >= first)
            ranks[~exhaustive, 0] = np.minimum(first, second)
            ranks[~exhaustive, 1] = np.maximum(first, second)
    return ranks


_SEQUENCE = np.random.default_rng(20240917).random((4096, 2))
"""Fixed pseudo-random rank fractions for non-exhaustive elemental subsets."""


def _base_candidates(ch: _Chunk) -> list[np.ndarray]:
    """Median-based and least-squares starting coefficients (median-based first)."""
    xx, xy = ch.wsums(np.where(ch.valid, 1.0, 0.0))
    least_squares = _solve(xx, xy)
    last = ch.xt[:, ch.p - 1]
    ok = ch.valid & (last != 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(ok, ch.y / np.where(last != 0, last, 1.0), 0.0)
    slope = np.nan_to_num(row_median_select(ratio, ok, ok.sum(axis=1)))
    if ch.p == 1:
        return [slope[:, None], least_squares]
    first = ch.xt[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        rest = np.where(ch.valid, (ch.y - slope[:, None] * last) / np.where(first != 0, first, 1.0), 0.0)
    icpt = np.nan_to_num(row_median_select(rest, ch.valid, ch.n))
    return [np.stack([icpt, slope], axis=1), np.stack([np.zeros_like(slope), slope], axis=1), least_squares]


def _fast_s_candidate(
    ch: _Chunk, beta: np.ndarray, s0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``refine_fast_s`` step from ``beta``; returns beta, residuals, exact flag.

    The step starts from ``s0`` when given (the current best scale, for elemental
    candidates), else from ``mad(r, center = 0)`` as robustbase.
    """
    beta = np.where(np.isfinite(beta), beta, 0.0)
    r = ch.resid(beta)
    if s0 is None:
        s0 = ch.mad0(r)
    # an exact fit (more than (n + p) / 2 zero residuals) has mad 0: count zeros only then
    check = ~(s0 > 0)
    exact = np.zeros(ch.m, dtype=bool)
    if check.any():
        exact = check & (ch.n_exact(r) > (ch.nf + ch.p) / 2.0)
    fallback = np.sqrt(_rowdot(r, r) / np.maximum(ch.nf, 1.0))
    s0 = np.where(s0 > 0, s0, np.where(fallback > 0, fallback, 1.0))
    for _ in range(K_FAST):
        b_new, _, _, _ = _s_eval(ch, beta, s0, False)
        good = np.isfinite(b_new).all(axis=1) & ~exact
        beta = np.where(good[:, None], b_new, beta)
    r = ch.resid(beta)
    exact |= ch.n_exact(r) > (ch.nf + ch.p) / 2.0
    return beta, r, exact


def _s_start(ch: _Chunk, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best S candidate per row (smallest M-scale): beta, scale, exact-fit flag.

    Candidates are compared as in robustbase's fast-S: a candidate replaces the
    current best only if ``sum rho(r / s_best) < bb (n - p)``, which is equivalent
    to its M-scale being smaller; only those rows get their M-scale computed.
    """
    m, p = ch.m, ch.p
    best_beta = np.zeros((m, p))
    best_s = np.full(m, np.inf)
    exact = np.zeros(m, dtype=bool)

    def offer(beta: np.ndarray, r: np.ndarray, is_exact: np.ndarray, rows: np.ndarray) -> None:
        nonlocal best_beta, best_s, exact
        rows = rows & ok & ~exact
        if not rows.any():
            return
        take_exact = rows & is_exact
        if take_exact.any():
            best_beta[take_exact] = beta[take_exact]
            best_s[take_exact] = 0.0
            exact |= take_exact
            rows &= ~take_exact
        first = rows & ~np.isfinite(best_s)
        screen = rows & np.isfinite(best_s)
        if screen.any():
            t, v = ch.bisquare(r, np.where(screen, best_s, 1.0), C_CHI)
            better = screen & (ch.sum_rho(v, v * v) < ch.target)
        else:
            better = screen
        todo = first | better
        if not todo.any():
            return
        sel = np.flatnonzero(todo)
        sub = ch.subset(sel)
        r_sub = r[sel]
        s0 = np.where(np.isfinite(best_s[sel]), best_s[sel], sub.mad0(r_sub))
        fallback = np.sqrt(_rowdot(r_sub, r_sub) / np.maximum(sub.nf, 1.0))
        s0 = np.where(s0 > 0, s0, np.where(fallback > 0, fallback, 1.0))
        s_new = sub.mscale(r_sub, s0)
        imp = np.isfinite(s_new) & (s_new < best_s[sel])
        best_beta[sel[imp]] = beta[sel[imp]]
        best_s[sel[imp]] = s_new[imp]

    for j, beta in enumerate(_base_candidates(ch)):
        # the first candidate starts from its MAD; later ones from the best scale so far
        s_ref = None if j == 0 else np.where(np.isfinite(best_s) & (best_s > 0), best_s, np.nan)
        beta, r, is_exact = _fast_s_candidate(ch, beta, s_ref)
        offer(beta, r, is_exact, np.ones(m, dtype=bool))

    count, exhaustive = _elemental_plan(ch.n, p)
    if count.max(initial=0) > 0:
        order = np.argsort(~ch.valid, axis=1, kind="stable")  # used entries first, in order
        for c in range(int(count.max())):
            part = (count > c) & ok & ~exact
            if not part.any():
                continue
            sel = np.flatnonzero(part)
            sub = ch if sel.size == m else ch.subset(sel)
            ranks = _elemental_ranks(c, sub.n, exhaustive[sel], p)
            pos = np.take_along_axis(order[sel], ranks, axis=1)  # (ms, p) instrument positions
            xs = np.take_along_axis(sub.xt, pos[:, None, :], axis=2)  # (ms, p, p): xs[:, i, j] = x_i at pos j
            ys = np.take_along_axis(sub.y, pos, axis=1)
            beta = _solve(np.transpose(xs, (0, 2, 1)), ys)
            usable = np.isfinite(beta).all(axis=1)
            if p == 2:
                det = xs[:, 0, 0] * xs[:, 1, 1] - xs[:, 0, 1] * xs[:, 1, 0]
                usable &= np.abs(det) > SINGULAR_TOL * np.abs(xs).max(axis=(1, 2)) ** 2
            if not usable.any():
                continue
            s_ref = np.where(np.isfinite(best_s[sel]) & (best_s[sel] > 0), best_s[sel], np.nan)
            beta_f, r_f, ex_f = _fast_s_candidate(sub, beta, s_ref)
            rows = np.zeros(m, dtype=bool)
            rows[sel[usable]] = True
            if sel.size == m:
                offer(beta_f, r_f, ex_f, rows)
            else:
                full_beta = np.zeros((m, p))
                full_r = np.zeros((m, ch.k))
                full_ex = np.zeros(m, dtype=bool)
                full_beta[sel] = beta_f
                full_r[sel] = r_f
                full_ex[sel] = ex_f
                offer(full_beta, full_r, full_ex, rows)
    return best_beta, best_s, exact


def _vcov_avar1(ch: _Chunk, beta: np.ndarray, beta_s: np.ndarray, s: np.ndarray) -> np.ndarray:
    """robustbase's ``.vcov.avar1`` per row (negative eigenvalues posdefified)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _vcov_avar1_impl(ch, beta, beta_s, s)


def _vcov_avar1_impl(ch: _Chunk, beta: np.ndarray, beta_s: np.ndarray, s: np.ndarray) -> np.ndarray:
    p, n = ch.p, ch.nf
    inv_s = (1.0 / s)[:, None]
    rs = ch.resid(beta) * inv_s  # final scaled residuals
    r0s = ch.resid(beta_s) * inv_s  # initial (S) scaled residuals
    t, v = ch.bisquare(rs, np.ones_like(s), C_PSI)
    v2 = v * v
    psi = rs * v2
    dpsi = 1.0 - 5.0 * t
    dpsi *= v
    t0, v0 = ch.bisquare(r0s, np.ones_like(s), C_CHI)
    v02 = v0 * v0
    chi = 1.0 - v02 * v0  # rho_c1 (normalised); unused entries: 0
    xwx, xy_d = ch.wsums(dpsi)
    # sum x psi'(r/s) r/s = (sum psi' x y - sum psi' x x' beta) / s
    num = (xy_d - np.einsum("mij,mj->mi", xwx, beta)) / s[:, None]
    x_psi2_x, _ = ch.wsums(psi * psi)
    xww = np.matmul(ch.xt, (psi * chi)[:, :, None])[:, :, 0]
    mean_dchi = 6.0 * _rowdot(t0, v02) / n  # mean(chi'(r0/s) r0/s) with chi' = (6/c^2) u v^2
    mean_chi2 = _rowdot(chi, chi) / n
    a_mat = _inv(xwx) * s[:, None, None]
    a = np.einsum("mij,mj->mi", a_mat, num) / mean_dchi[:, None]
    axww = np.einsum("mij,mj->mi", a_mat, xww)
    u1 = np.einsum("mij,mjk,mkl->mil", a_mat, x_psi2_x, a_mat) * n[:, None, None]
    u2 = a[:, :, None] * axww[:, None, :]
    u3 = axww[:, :, None] * a[:, None, :]
    u4 = (mean_chi2 - BB * BB)[:, None, None] * a[:, :, None] * a[:, None, :]
    cov = (u1 - u2 - u3 + u4) / n[:, None, None]
    if p == 1:
        return np.where(cov < 0, np.nan, cov)
    return _posdefify(cov)


def _s_estimate(ch: _Chunk, ok: np.ndarray) -> tuple[np.ndarray, ...]:
    """S-estimate per row: start beta, beta, scale, exact-fit flag, converged flag."""
    beta0, s0, exact = _s_start(ch, ok)
    go = ok & ~exact & np.isfinite(s0) & (s0 > 0)
    beta, scale, conv = _iterate(ch, go, beta0, np.where(go, s0, 1.0), _s_eval)
    beta = np.where(exact[:, None], beta0, beta)
    scale = np.where(exact, 0.0, np.where(ok, scale, np.nan))
    return beta0, beta, scale, exact, conv | exact


def _fit_chunk(xt: np.ndarray, y: np.ndarray, valid: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    """MM fit of one chunk; returns coef, coef_s, cov, scale, converged, exact, singular."""
    m, p, _ = xt.shape
    ch = _Chunk(xt, y, valid, n)
    coef = np.full((m, p), np.nan)
    coef_s = np.full((m, p), np.nan)
    cov = np.full((m, p, p), np.nan)
    scale = np.full(m, np.nan)

    # rank check of the (sqrt-weighted) design, as lmrob's .lm.fit(tol = solve.tol)
    gram, _ = ch.wsums(np.where(valid, 1.0, 0.0))
    if p == 1:
        singular = ~(gram[:, 0, 0] > 0)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            resid = gram[:, 1, 1] - gram[:, 0, 1] ** 2 / gram[:, 0, 0]
        singular = ~(gram[:, 0, 0] > 0) | ~(resid > SINGULAR_TOL**2 * gram[:, 1, 1])
    ok = ~singular & (n > p)

    beta0, beta_s, s, exact, s_conv = _s_estimate(ch, ok)
    live = ok & ~exact
    s_ok = live & s_conv & np.isfinite(s) & (s > 0)
    beta, _, m_conv = _iterate(ch, s_ok, beta_s, np.where(s_ok, s, 1.0), _m_eval, start_newton=True)
    fitted = s_ok & m_conv
    if fitted.any():
        rows = np.flatnonzero(fitted)
        cov[rows] = _vcov_avar1(ch.subset(rows), beta[rows], beta_s[rows], s[rows])
    coef[fitted] = beta[fitted]
    coef_s[fitted] = beta_s[fitted]
    scale[fitted] = s[fitted]
    coef[exact] = beta0[exact]
    coef_s[exact] = beta0[exact]
    scale[exact] = 0.0
    cov[exact] = 0.0
    converged = (fitted | exact) & ok
    return coef, coef_s, cov, scale, converged, exact & ok, singular


def lmrob_mm(
    xt: np.ndarray, y: np.ndarray, valid: np.ndarray, n: np.ndarray, *, threads: int = 1
) -> MMFit:
    """MM regression of ``y`` on ``x`` per locus, as ``lmrob(y ~ x - 1)`` with default control.

    Parameters
    ----------
    xt : numpy.ndarray
        ``(n_loci, p, max_k)`` design, transposed (already multiplied by
        ``sqrt(weights)``); unused entries are ignored.
    y : numpy.ndarray
        ``(n_loci, max_k)`` response (times ``sqrt(weights)``).
    valid : numpy.ndarray
        ``(n_loci, max_k)`` bool mask of used instruments.
    n : numpy.ndarray
        ``(n_loci,)`` used instruments per locus.
    threads : int
        Worker threads over chunks of loci (numpy releases the GIL).

    Returns
    -------
    MMFit
    """
    n_loci, p, k = xt.shape
    valid = np.asarray(valid, dtype=bool)
    xt = np.ascontiguousarray(np.where(valid[:, None, :], xt, 0.0))
    y = np.where(valid, y, 0.0)
    n = np.asarray(n, dtype=np.int64)
    bounds = chunk_bounds(n_loci, CHUNK_ELEMENTS // max(k, 1))
    coef = np.full((n_loci, p), np.nan)
    coef_s = np.full((n_loci, p), np.nan)
    cov = np.full((n_loci, p, p), np.nan)
    scale = np.full(n_loci, np.nan)
    conv = np.zeros(n_loci, dtype=bool)
    exact = np.zeros(n_loci, dtype=bool)
    singular = np.zeros(n_loci, dtype=bool)

    def work(b: tuple[int, int]) -> None:
        lo, hi = b
        res = _fit_chunk(xt[lo:hi], y[lo:hi], valid[lo:hi], n[lo:hi])
        coef[lo:hi], coef_s[lo:hi], cov[lo:hi], scale[lo:hi], conv[lo:hi], exact[lo:hi], singular[lo:hi] = res

    run_chunks(work, bounds, threads)
    return MMFit(coef=coef, coef_s=coef_s, cov=cov, scale=scale, converged=conv, exact=exact, singular=singular)


# ----------------------------------------------------------------------------- package-level estimators


def robust_ivw(
    data: MRData, *, model: str = "default", alpha: float = 0.05, t_dist: bool = False, threads: int = 1
) -> MRResult:
    """Robust IVW (``mr_ivw(robust = TRUE)``) per locus.

    Standard error: ``coef_se / min(1, sigma)`` for the random-effects model and
    ``coef_se / sigma`` for the fixed-effect model (``model = "default"``: fixed
    below four instruments); a single instrument gives the ratio estimate
    ``by / bx`` with se ``byse / |bx|``. ``q = (n - 1) sigma^2`` as the package.

    Parameters
    ----------
    data : MRData
    model : {"default", "fixed", "random"}
    alpha : float
    t_dist : bool
        t distribution with n - 1 degrees of freedom.
    threads : int
        Worker threads for the MM fits.

    Returns
    -------
    MRResult
    """
    from deepmr_dist.mr.ivw import _random_mask

    out = ResultBuilder(data.n, data.fstat())
    inv = 1.0 / data.byse  # unused entries: bx = by = 0
    fit = lmrob_mm((data.bx * inv)[:, None, :], data.by * inv, data.valid, data.n, threads=threads)
    est = fit.coef[:, 0]
    coef_se = np.sqrt(fit.cov[:, 0, 0])
    sigma = fit.scale
    random = _random_mask(model, data.n)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(random, coef_se / np.minimum(sigma, 1.0), coef_se / sigma)
    single = data.n == 1
    with np.errstate(invalid="ignore", divide="ignore"):
        bx1 = np.where(data.valid, data.bx, 0.0).sum(axis=1)
        by1 = np.where(data.valid, data.by, 0.0).sum(axis=1)
        se1 = np.where(data.valid, data.byse, 0.0).sum(axis=1) / np.abs(bx1)
        est = np.where(single, by1 / bx1, est)
    se = np.where(single, se1, se)
    sigma = np.where(single, 1.0, sigma)
    lo, hi, p = wald_inference(est, se, alpha, t_dist, data.n - 1)
    out["estimate"], out["se"], out["ci_lower"], out["ci_upper"], out["pvalue"] = est, se, lo, hi, p
    out["rse"] = sigma
    q = np.where(data.n >= 2, (data.n - 1) * sigma**2, np.nan)
    out["q"] = q
    out["q_pvalue"] = chi2_sf(q, data.n - 1)
    multi = data.n >= 2
    out.flag(data.n < 1, "too_few_instruments")
    out.flag(~(np.where(data.valid, np.abs(data.bx), 0.0).sum(axis=1) > 0), "all_bx_zero")
    out.flag(multi & fit.singular, "singular_fit")
    out.flag(multi & fit.exact, "exact_fit")
    out.flag(multi & ~fit.converged, "no_convergence")
    return out.build()


def robust_egger(data: MRData, *, alpha: float = 0.05, t_dist: bool = False, threads: int = 1) -> MRResult:
    """Robust MR-Egger (``mr_egger(robust = TRUE)``) per locus.

    MM fit of the oriented ``by ~ 1 + bx`` with weights ``byse^-2``; standard
    errors ``coef_se / min(1, sigma)``; inference as MR-Egger (``egger.bounds``);
    ``q`` is the weighted residual sum of squares (n - 2 df). Needs three instruments.

    Parameters
    ----------
    data : MRData
    alpha : float
    t_dist : bool
    threads : int

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())
    xo, yo = oriented(data)
    inv = data.valid / data.byse
    xt = np.stack([inv, xo * inv], axis=1)
    yt = yo * inv
    enough = data.n >= 3
    fit = lmrob_mm(xt, yt, data.valid & enough[:, None], np.where(enough, data.n, 0), threads=threads)
    sigma = fit.scale
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = np.minimum(sigma, 1.0)
        se_b = np.sqrt(fit.cov[:, 1, 1]) / floor
        se_a = np.sqrt(fit.cov[:, 0, 0]) / floor
    slope, icpt = fit.coef[:, 1], fit.coef[:, 0]
    df = data.n - 2
    lo, hi, p = egger_inference(slope, se_b, sigma, df, alpha, t_dist)
    out["estimate"], out["se"], out["ci_lower"], out["ci_upper"], out["pvalue"] = slope, se_b, lo, hi, p
    lo, hi, p = egger_inference(icpt, se_a, sigma, df, alpha, t_dist)
    out["intercept"], out["intercept_se"] = icpt, se_a
    out["intercept_ci_lower"], out["intercept_ci_upper"], out["intercept_pvalue"] = lo, hi, p
    out["rse"] = sigma
    q = egger_residual_q(data, np.nan_to_num(icpt), np.nan_to_num(slope))
    q = np.where(np.isfinite(slope), q, np.nan)
    out["q"] = q
    out["q_pvalue"] = chi2_sf(q, df)
    out["i2gx"] = i2_gx(data)
    out.flag(~enough, "too_few_instruments")
    out.flag(~(np.where(data.valid, np.abs(data.bx), 0.0).sum(axis=1) > 0), "all_bx_zero")
    out.flag(fit.singular, "singular_fit")
    out.flag(fit.exact, "exact_fit")
    out.flag(~fit.converged, "no_convergence")
    return out.build()
