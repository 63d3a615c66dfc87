"""MR-RAPS, the robust adjusted profile score, as the R package mr.raps 0.4.2 defines it.

Reference: Q. Zhao, J. Wang, G. Hemani, J. Bowden and D. S. Small (2020), "Statistical inference in
two-sample summary-data Mendelian randomization using robust adjusted profile score", Annals of
Statistics 48(3), 1742-1769. Followed: ``mr.raps.shrinkage(shrinkage = FALSE, se.method = "sandwich")``
of github qingyuanzhao/mr.raps 0.4.2 (commit 27b96f3, R/shrinkage.R), which the package's recommended
``mr.raps(data)`` calls with ``over.dispersion = TRUE, loss.function = "huber"`` (the defaults here),
and for its starting values ``mr.raps.mle`` (R/core.R).

Model: ``bx_i ~ N(gamma_i, bxse_i^2)``, ``by_i ~ N(beta gamma_i + alpha_i, byse_i^2)``, independent, with
``alpha_i ~ N(0, tau^2)`` (``tau^2 = 0`` without overdispersion). The error in ``bx`` is part of the model
(no NOME assumption), so weak instruments do not dilute the estimate towards 0. With::

    s_i = byse_i^2 + tau^2,   v_i = s_i + beta^2 bxse_i^2,   t_i = (by_i - beta bx_i) / sqrt(v_i),
    gamma_i = (bx_i s_i + beta by_i bxse_i^2) / v_i          (profile estimate of the strength)

the estimate solves::

    psi_1 = sum_i gamma_i rho'(t_i) / sqrt(v_i) = 0
    psi_2 = sum_i (t_i rho'(t_i) - delta) / v_i = 0          (over_dispersion only)

``psi_1 = -d/dbeta sum_i rho(t_i)`` is the (robust) profile score and ``psi_2`` the adjusted profile score
for ``tau^2``; ``delta = E[Z rho'(Z)]``, ``Z ~ N(0, 1)``. Losses (``rho'`` as the package's ``rho.*``)::

    l2     rho'(t) = t
    huber  rho'(t) = max(-k, min(k, t)),            k = 1.345
    tukey  rho'(t) = t (1 - (t/k)^2)^2 1{|t| <= k},  k = 4.685

Standard errors are the package's sandwich formula (with ``c1 = E[rho'(Z)^2]``,
``c2 = E[Z^2 rho'(Z)^2] - delta^2``, ``c3 = E[Z^2 rho''(Z)]``, here in closed form; the package
integrates numerically)::

    a  = sum_i [by_i bxse_i^2 rho'(t_i) / v_i^1.5 - delta gamma_i bx_i / v_i]
    se = sqrt(c1 sum_i gamma_i^2 / v_i) / |a|                                 (no overdispersion)
    b  = -sum_i beta by_i bxse_i^2 rho'(t_i) / (s_i v_i^1.5),   d = (delta + c3) / 2 sum_i v_i^-2
    se = sqrt(c1 sum_i gamma_i^2 / v_i / a^2 + (b / (a d))^2 c2 sum_i v_i^-2)   (overdispersion)
    se(tau^2) = sqrt(c2 sum_i v_i^-2) / |d|

Search for the root, as ``mr.raps.shrinkage`` with ``num.init = 2`` (its random extra starts dropped):

* starting values are ``mr.raps.mle`` fits. Without overdispersion: ``optimize`` (Brent's ``fmin``,
  replicated here step for step, tolerance ``sqrt(eps)``) of ``sum rho(t_i)`` over
  ``[-bound, bound]``, ``bound = 2 quantile(|by/bx|, 0.95)``, doubled while ``|beta| > 0.95 bound``. With
  overdispersion, on data pruned of ``bxse > 10 median(bxse)``: for l2 the package's 20 alternations of
  ``optimize`` in ``tau^2`` over ``[0, 100 quantile(byse^2, 0.95)]`` (its ``tau^2`` objective weights every
  term by ``bxse_i^2``) and in ``beta`` over ``+-10 quantile(|by/bx|, 0.95)``; for huber and tukey the fixed
  point of the package's robust alternation (``uniroot`` in ``tau^2`` floored at 0, ``L-BFGS-B`` in
  ``beta``), here solved by Newton's method from the l2 fit. Deviation: mr.raps 0.4.2 standardises the
  residuals of that robust alternation by ``sqrt(max(0, tau2 + se_out^2 + se_exp^2 beta^2))``, a scalar
  (the largest variance over instruments); here each by its own variance, as evidently meant;
* Newton's method on ``(psi_1, psi_2)`` (``psi_1`` alone without overdispersion) from the l2 and huber
  starting values (the package's ``multiroot`` starts; tukey also from its own ``mr.raps.mle`` fit, the
  estimate the package's rule favours), keeping the converged root closest in ``beta`` to the
  ``mr.raps.mle`` estimate with the chosen loss. Roots with ``tau^2 > 10 median(byse)`` are dropped (the
  package's rule); without an overdispersed root, or when the kept one has ``tau^2 < 0``, the locus is
  fitted without overdispersion (``tau^2 = 0``), as the package does. Deviation: ``multiroot`` takes full
  Newton steps and returns wherever it stops; here a step that does not reduce the equations is halved,
  and a start that does not converge yields no root. Both agree wherever full steps converge; where they
  diverge the package may fall back or keep a point that is not a root (tests/test_mr_raps.py lists the
  three cases met, all Tukey).

Undefined loci (NaN with a reason): fewer than 1 instrument (2 with overdispersion); all ``bx == 0``;
``zero_bx`` when so many ``bx == 0`` that the search interval is infinite (the package fails there);
``no_convergence`` when no start reaches a root or the interval doubling does not end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import special

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import MRData, row_median_select
from deepmr_dist.mr.inference import store_wald
from deepmr_dist.mr.result import MRResult, ResultBuilder

LOSSES = ("l2", "huber", "tukey")
TUNING: dict[str, float] = {"huber": 1.345, "tukey": 4.685}
"""mr.raps's default tuning constants ``k``."""
PRUNE_FACTOR = 10.0
"""Overdispersed starting fits drop instruments with ``bxse > 10 median(bxse)``."""
TAU2_LIMIT = 10.0
"""Roots with ``tau^2 > 10 median(byse)`` are dropped (the package compares the variance with a standard error)."""
NITER = 20
"""Alternations (and interval doublings per alternation) of the overdispersed l2 starting fit."""
MAX_DOUBLINGS = 60
"""Doublings of the ``beta`` interval of a starting fit before giving up (the package has no limit)."""
FMIN_TOL = math.sqrt(np.finfo(float).eps)
"""``optimize(tol = .Machine$double.eps^0.5)`` and the alternations' tolerance, as the package sets them."""
FMIN_MAXITER = 500
"""Safety limit of Brent's iterations (it stops by itself well before)."""
NEWTON_MAXITER = 100
"""Iterations of Newton's method (``multiroot``'s ``maxiter``)."""
BACKTRACK = 40
"""Step halvings of Newton's line search."""
NEWTON_RTOL = 1e-12
NEWTON_ATOL = 1e-13
"""Absolute step tolerance in units of ``median(byse) / median(bxse)`` (beta) and ``median(byse^2)`` (tau^2)."""
_GOLDEN = (3.0 - math.sqrt(5.0)) * 0.5
_DBL_MAX = np.finfo(float).max


@dataclass(frozen=True)
class Loss:
    """A loss ``rho`` of mr.raps with its Gaussian constants.

    Attributes
    ----------
    name : str
        ``"l2"``, ``"huber"`` or ``"tukey"``.
    k : float
        Tuning constant (NaN for l2).
    delta, c1, c2, c3 : float
        ``E[Z rho'(Z)]``, ``E[rho'(Z)^2]``, ``E[Z^2 rho'(Z)^2] - delta^2`` and ``E[Z^2 rho''(Z)]``, Z ~ N(0, 1).
    """

    name: str
    k: float
    delta: float
    c1: float
    c2: float
    c3: float

    def rho(self, t: np.ndarray) -> np.ndarray:
        """The objective of ``mr.raps.mle`` (the package's ``rho.*(r, k, deriv = 0)``)."""
        if self.name == "l2":
            return 0.5 * t * t
        if self.name == "huber":
            a = np.abs(t)
            return np.where(a <= self.k, 0.5 * t * t, self.k * (a - 0.5 * self.k))
        return np.minimum(1.0 - (1.0 - (t / self.k) ** 2) ** 3, 1.0)

    def psi(self, t: np.ndarray) -> np.ndarray:
        """``rho'(t)`` (``deriv = 1``)."""
        if self.name == "l2":
            return t
        if self.name == "huber":
            return np.clip(t, -self.k, self.k)
        u = (t / self.k) ** 2
        return np.where(u <= 1.0, t * (1.0 - u) ** 2, 0.0)

    def dpsi(self, t: np.ndarray) -> np.ndarray:
        """``rho''(t)`` (``deriv = 2``)."""
        if self.name == "l2":
            return np.ones_like(t)
        if self.name == "huber":
            return (np.abs(t) <= self.k).astype(np.float64)
        u = (t / self.k) ** 2
        return np.where(u < 1.0, (1.0 - u) * (1.0 - 5.0 * u), 0.0)


def _truncated_moments(k: float, top: int) -> list[float]:
    """``[E[Z^m 1{|Z| <= k}] for m = 0, 2, ..., top]``, Z ~ N(0, 1)."""
    phi = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    moments = [float(special.erf(k / math.sqrt(2.0)))]
    for m in range(2, top + 1, 2):
        moments.append((m - 1) * moments[-1] - 2.0 * k ** (m - 1) * phi)
    return moments


def loss_function(name: str) -> Loss:
    """The :class:`Loss` ``name`` with mr.raps's default tuning constant.

    Raises
    ------
    InputError
        If ``name`` is not one of :data:`LOSSES`.
    """
    if name not in LOSSES:
        raise InputError(f"MR-RAPS loss must be one of {LOSSES}, got {name!r}")
    if name == "l2":
        return Loss("l2", math.nan, 1.0, 1.0, 2.0, 1.0)
    k = TUNING[name]
    m = _truncated_moments(k, 14)  # m[j] = E[Z^(2j); |Z| <= k]
    if name == "huber":
        tail0, tail2 = 1.0 - m[0], 1.0 - m[1]
        delta = m[1] + 2.0 * k * math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
        return Loss(name, k, delta, m[1] + k * k * tail0, m[2] + k * k * tail2 - delta**2, m[1])
    # tukey: rho'(z) = z (1 - z^2/k^2)^2 inside, so every constant is a polynomial in truncated moments
    binom4 = (1.0, -4.0, 6.0, -4.0, 1.0)
    delta = m[1] - 2.0 * m[2] / k**2 + m[3] / k**4
    c1 = sum(c * m[1 + j] / k ** (2 * j) for j, c in enumerate(binom4))
    x2psi2 = sum(c * m[2 + j] / k ** (2 * j) for j, c in enumerate(binom4))
    c3 = m[1] - 6.0 * m[2] / k**2 + 5.0 * m[3] / k**4
    return Loss(name, k, delta, c1, x2psi2 - delta**2, c3)


@dataclass(frozen=True)
class _Rows:
    """The instruments of some loci: ``mask`` (float 0/1) selects the used ones."""

    bx: np.ndarray
    by: np.ndarray
    sx2: np.ndarray
    sy2: np.ndarray
    mask: np.ndarray

    @classmethod
    def of(cls, data: MRData, rows: np.ndarray) -> _Rows:
        """Rows ``rows`` of a prepared batch."""
        return cls(
            data.bx[rows],
            data.by[rows],
            data.bxse[rows] ** 2,
            data.byse[rows] ** 2,
            data.valid[rows].astype(np.float64),
        )

    def take(self, idx: np.ndarray) -> _Rows:
        """A subset of the rows (``self`` when ``idx`` selects them all, in order)."""
        if idx.size == self.bx.shape[0]:
            return self
        return _Rows(self.bx[idx], self.by[idx], self.sx2[idx], self.sy2[idx], self.mask[idx])

    def pruned(self) -> _Rows:
        """Without instruments whose ``bxse > 10 median(bxse)`` (the overdispersed starting fits)."""
        used = self.mask > 0
        med = row_median_select(np.sqrt(self.sx2), used, used.sum(axis=1))
        keep = used & ~(np.sqrt(self.sx2) > PRUNE_FACTOR * med[:, None])
        return _Rows(self.bx, self.by, self.sx2, self.sy2, keep.astype(np.float64))

    def quantile(self, values: np.ndarray, q: float) -> np.ndarray:
        """Per-row ``quantile(values, q, na.rm = TRUE)`` (R's type 7) over the used, non-NaN instruments."""
        x = np.sort(np.where(self.mask > 0, values, np.nan), axis=1)  # NaN sorts last
        n = (~np.isnan(x)).sum(axis=1)
        h = (n - 1) * q
        lo = np.floor(h).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = h - lo
        x_lo = np.take_along_axis(x, np.maximum(lo, 0)[:, None], axis=1)[:, 0]
        x_hi = np.take_along_axis(x, np.maximum(hi, 0)[:, None], axis=1)[:, 0]
        with np.errstate(invalid="ignore"):  # R interpolates only between different values (inf stays inf)
            value = np.where((frac > 0) & (x_hi != x_lo), (1.0 - frac) * x_lo + frac * x_hi, x_lo)
        return np.where(n > 0, value, np.nan)

    def ratio_bound(self, factor: float) -> np.ndarray:
        """``factor * quantile(|by / bx|, 0.95)``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return factor * self.quantile(np.abs(self.by / self.bx), 0.95)


def _terms(a: _Rows, beta: np.ndarray, tau2: np.ndarray) -> tuple[np.ndarray, ...]:
    """``s, v, sqrt(v), t, gamma`` per instrument at ``(beta, tau2)`` (see the module docstring)."""
    b = beta[:, None]
    s = a.sy2 + tau2[:, None]
    v = s + b * b * a.sx2
    sq = np.sqrt(v)
    t = (a.by - b * a.bx) / sq
    gamma = (a.bx * s + b * a.by * a.sx2) / v
    return s, v, sq, t, gamma


class _Equations(NamedTuple):
    """Estimating equations at one point per row: values, Jacobian and standard deviations."""

    f1: np.ndarray
    f2: np.ndarray
    d11: np.ndarray
    d12: np.ndarray
    d21: np.ndarray
    d22: np.ndarray
    sd1: np.ndarray
    sd2: np.ndarray


def _merit(f1: np.ndarray, f2: np.ndarray, sd1: np.ndarray, sd2: np.ndarray) -> np.ndarray:
    """Squared norm of the equations ``(f1, f2)`` in units of their standard deviations."""
    return (f1 / sd1) ** 2 + (f2 / sd2) ** 2


def _equations(a: _Rows, beta: np.ndarray, tau2: np.ndarray, lf: Loss, od: bool, mle_weights: bool) -> _Equations:
    """``psi_1, psi_2``, their Jacobian and model standard deviations (``psi_2`` zero without ``od``).

    ``mle_weights`` weights the ``psi_2`` terms by ``bxse_i^2``, the ``tau^2`` equation of ``mr.raps.mle``.
    The standard deviations ``sqrt(sum gamma_i^2 / v_i)`` and ``sqrt(sum w_i^2 / v_i^2)`` (up to the
    loss constants) scale the equations for the line search of :func:`_newton`.
    """
    _, v, sq, t, g = _terms(a, beta, tau2)
    m = a.mask
    p1, p2 = lf.psi(t), lf.dpsi(t)
    v_b = 2.0 * beta[:, None] * a.sx2
    t_b, t_tau = -g / sq, -0.5 * t / v
    g_b, g_tau = (a.by * a.sx2 - g * v_b) / v, (a.bx - g) / v
    f1 = (m * g * p1 / sq).sum(axis=1)
    d11 = (m * (g_b * p1 + g * p2 * t_b - 0.5 * g * p1 * v_b / v) / sq).sum(axis=1)
    sd1 = np.sqrt((m * g * g / v).sum(axis=1))
    if not od:
        zero = np.zeros_like(f1)
        return _Equations(f1, zero, d11, zero, zero, zero, sd1, np.ones_like(f1))
    d12 = (m * (g_tau * p1 + g * p2 * t_tau - 0.5 * g * p1 / v) / sq).sum(axis=1)
    w = m * a.sx2 if mle_weights else m
    u = t * p1 - lf.delta
    du = p1 + t * p2
    f2 = (w * u / v).sum(axis=1)
    d21 = (w * (du * t_b / v - u * v_b / (v * v))).sum(axis=1)
    d22 = (w * (du * t_tau / v - u / (v * v))).sum(axis=1)
    sd2 = np.sqrt((w * w / (v * v)).sum(axis=1))
    return _Equations(f1, f2, d11, d12, d21, d22, sd1, sd2)


def _scales(a: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """Absolute step scales of Newton's method: ``median(byse) / median(bxse)`` and ``median(byse^2)``."""
    used = a.mask > 0
    n = used.sum(axis=1)
    sy2 = row_median_select(a.sy2, used, n)
    sx2 = row_median_select(a.sx2, used, n)
    return np.sqrt(sy2 / sx2), sy2


def _newton_step(eq: _Equations, od: bool) -> tuple[np.ndarray, np.ndarray]:
    """The Newton step ``-J^-1 f`` (only in ``beta`` without ``od``)."""
    if not od:
        return -eq.f1 / eq.d11, np.zeros_like(eq.f1)
    det = eq.d11 * eq.d22 - eq.d12 * eq.d21
    return -(eq.d22 * eq.f1 - eq.d12 * eq.f2) / det, -(eq.d11 * eq.f2 - eq.d21 * eq.f1) / det


def _newton(
    a: _Rows, beta0: np.ndarray, tau20: np.ndarray, lf: Loss, od: bool, mle_weights: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newton's method on the estimating equations, all rows at once.

    Full steps (as ``multiroot``) where they reduce the equations' norm in standard-deviation units
    (:func:`_merit`), else halved up to :data:`BACKTRACK` times (Armijo rule).

    Returns
    -------
    beta, tau2, converged : numpy.ndarray
        ``tau2`` stays at ``tau20`` without ``od``. A row converges when its full step is below
        :data:`NEWTON_RTOL` relative (or :data:`NEWTON_ATOL` in its scale); it fails on non-finite values
        or when no halving reduces the norm.
    """
    beta, tau2 = beta0.astype(np.float64), tau20.astype(np.float64)
    beta_scale, tau2_scale = _scales(a)
    converged = np.zeros(beta.shape, dtype=bool)
    active = np.isfinite(beta) & np.isfinite(tau2)
    for _ in range(NEWTON_MAXITER):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        rows, b, t2 = a.take(idx), beta[idx], tau2[idx]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            eq = _equations(rows, b, t2, lf, od, mle_weights)
            step_b, step_t = _newton_step(eq, od)
            merit = _merit(eq.f1, eq.f2, eq.sd1, eq.sd2)
        finite = np.isfinite(step_b) & np.isfinite(step_t) & np.isfinite(merit)
        small = finite & (np.abs(step_b) <= NEWTON_RTOL * np.abs(b) + NEWTON_ATOL * beta_scale[idx]) & (
            np.abs(step_t) <= NEWTON_RTOL * np.abs(t2) + NEWTON_ATOL * tau2_scale[idx]
        )
        lam = np.ones(idx.size)
        pending = finite & ~small
        for _ in range(BACKTRACK):
            j = np.flatnonzero(pending)
            if j.size == 0:
                break
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                b_j, t2_j = b[j] + lam[j] * step_b[j], t2[j] + lam[j] * step_t[j]
                trial = _equations(rows.take(j), b_j, t2_j, lf, od, mle_weights)
                value = _merit(trial.f1, trial.f2, eq.sd1[j], eq.sd2[j])
            accept = np.isfinite(value) & (value <= (1.0 - 1e-4 * lam[j]) * merit[j])
            pending[j[accept]] = False
            lam[j[~accept]] *= 0.5
        moved = finite & ~pending
        beta[idx] = np.where(moved, b + lam * step_b, b)
        tau2[idx] = np.where(moved, t2 + lam * step_t, t2)
        converged[idx[small]] = True
        active[idx[small | ~moved]] = False
    return beta, tau2, converged


def _fmin(fun, lower: np.ndarray, upper: np.ndarray, tol: float = FMIN_TOL) -> np.ndarray:
    """R's ``optimize`` (Brent's ``fmin``, R's C ``Brent_fmin``) of ``fun`` on every row at once.

    Parameters
    ----------
    fun : callable
        ``fun(x, idx)`` returns the objectives of rows ``idx`` at ``x`` (both ``(m,)``).
    lower, upper : numpy.ndarray
        Interval per row.
    tol : float
        Absolute tolerance (``optimize``'s ``tol``).

    Returns
    -------
    numpy.ndarray
        The minimiser per row; non-finite objectives count as the largest double, as in R.
    """

    def evaluate(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            f = fun(x, idx)
        return np.where(np.isfinite(f), f, _DBL_MAX)

    a, b = lower.astype(np.float64), upper.astype(np.float64)
    x = a + _GOLDEN * (b - a)
    v, w = x.copy(), x.copy()
    d, e = np.zeros_like(x), np.zeros_like(x)
    fx = evaluate(x, np.arange(x.size))
    fv, fw = fx.copy(), fx.copy()
    tol3 = tol / 3.0
    active = np.ones(x.shape, dtype=bool)
    for _ in range(FMIN_MAXITER):
        xm = 0.5 * (a + b)
        tol1 = FMIN_TOL * np.abs(x) + tol3  # Brent's eps: sqrt of the machine epsilon
        t2 = 2.0 * tol1
        active &= ~(np.abs(x - xm) <= t2 - 0.5 * (b - a))
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        # fit a parabola where the last-but-one step was large enough
        fit = np.abs(e) > tol1
        r = (x - w) * (fx - fv)
        q = (x - v) * (fx - fw)
        p = (x - v) * q - (x - w) * r
        q = 2.0 * (q - r)
        p = np.where(q > 0.0, -p, p)
        q = np.abs(q)
        p, q, r = np.where(fit, p, 0.0), np.where(fit, q, 0.0), np.where(fit, e, 0.0)
        e = np.where(active & fit, d, e)
        golden = (np.abs(p) >= np.abs(0.5 * q * r)) | (p <= q * (a - x)) | (p >= q * (b - x))
        e_golden = np.where(x < xm, b - x, a - x)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_parabola = p / q
        u = x + d_parabola
        d_parabola = np.where((u - a < t2) | (b - u < t2), np.where(x >= xm, -tol1, tol1), d_parabola)
        e = np.where(active & golden, e_golden, e)
        d = np.where(active, np.where(golden, _GOLDEN * e_golden, d_parabola), d)
        u = np.where(np.abs(d) >= tol1, x + d, np.where(d > 0.0, x + tol1, x - tol1))
        fu = np.full(x.shape, np.nan)
        fu[idx] = evaluate(u[idx], idx)
        # update a, b, v, w and x
        better = active & (fu <= fx)
        worse = active & ~better
        left = u < x
        b = np.where((better & left) | (worse & ~left), np.where(better, x, u), b)
        a = np.where((better & ~left) | (worse & left), np.where(better, x, u), a)
        to_w = worse & ((fu <= fw) | (w == x))
        to_v = worse & ~to_w & ((fu <= fv) | (v == x) | (v == w))
        v, fv = np.where(better | to_w, w, np.where(to_v, u, v)), np.where(better | to_w, fw, np.where(to_v, fu, fv))
        w, fw = np.where(better, x, np.where(to_w, u, w)), np.where(better, fx, np.where(to_w, fu, fw))
        x, fx = np.where(better, u, x), np.where(better, fu, fx)
    return x


def _beta_search(fun, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``optimize`` over ``[-bound, bound]``, doubling ``bound`` while ``|beta| > 0.95 bound`` (as the package).

    Returns
    -------
    beta, bound, ok : numpy.ndarray
        The minimiser, the final interval half-width, and False where :data:`MAX_DOUBLINGS` did not suffice.
    """
    bound = bound.copy()
    beta = _fmin(fun, -bound, bound)
    for _ in range(MAX_DOUBLINGS):
        idx = np.flatnonzero(np.abs(beta) > 0.95 * bound)
        if idx.size == 0:
            break
        bound[idx] *= 2.0
        beta[idx] = _fmin(lambda x, i: fun(x, idx[i]), -bound[idx], bound[idx])
    return beta, bound, ~(np.abs(beta) > 0.95 * bound)


def _mle_simple(a: _Rows, lf: Loss) -> tuple[np.ndarray, np.ndarray]:
    """``mr.raps.mle`` without overdispersion: ``optimize`` of ``sum rho(t_i)`` at ``tau^2 = 0``."""

    def objective(beta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        r = a.take(idx)
        _, _, _, t, _ = _terms(r, beta, np.zeros_like(beta))
        return (r.mask * lf.rho(t)).sum(axis=1)

    beta, _, ok = _beta_search(objective, a.ratio_bound(2.0))
    return beta, ok


def _mle_od_l2(a: _Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mr.raps.overdispersed`` (l2 with overdispersion) on pruned rows ``a``: alternating ``optimize``.

    Returns
    -------
    beta, tau2, ok : numpy.ndarray
        ``ok`` is False where the ``beta`` interval doubling failed.
    """
    beta, ok = _mle_simple(a, loss_function("l2"))
    tau2 = np.zeros_like(beta)
    bound_beta = a.ratio_bound(10.0)
    bound_tau2 = 100.0 * a.quantile(a.sy2, 0.95)
    active = ok.copy()
    for _ in range(NITER):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        r, old_beta, old_tau2 = a.take(rows), beta[rows], tau2[rows]

        def tau2_objective(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
            ri, b = r.take(idx), old_beta[idx][:, None]
            v = x[:, None] + ri.sy2 + ri.sx2 * b * b
            resid = ri.by - b * ri.bx
            return 0.5 * (ri.mask * ri.sx2 * (np.log(v) + resid * resid / v)).sum(axis=1)

        new_tau2 = _fmin(tau2_objective, np.zeros(rows.size), bound_tau2[rows])

        def beta_objective(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
            ri, b = r.take(idx), x[:, None]
            resid = ri.by - b * ri.bx
            return 0.5 * (ri.mask * resid * resid / (new_tau2[idx][:, None] + ri.sy2 + ri.sx2 * b * b)).sum(axis=1)

        new_beta, bound_beta[rows], found = _beta_search(beta_objective, bound_beta[rows])
        beta[rows], tau2[rows] = new_beta, new_tau2
        change = np.abs(old_beta - new_beta) / np.abs(new_beta + 1e-10) + np.abs(old_tau2 - new_tau2) / np.abs(
            new_tau2 + 1e-10
        )
        ok[rows[~found]] = False
        active[rows[~found | (change <= FMIN_TOL)]] = False
    return beta, tau2, ok


def _mle_od_robust(a: _Rows, lf: Loss, beta0: np.ndarray, tau20: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed point of ``mr.raps.overdispersed.robust`` on pruned rows ``a``, from its l2 start.

    The package alternates ``tau^2`` (root of ``sum bxse_i^2 (t_i rho'(t_i) - delta) / v_i``, floored at 0)
    and ``beta`` (a local maximum of ``-sum rho(t_i)``); here Newton's method on both equations, then on
    ``psi_1`` at ``tau^2 = 0`` where the root has ``tau^2 < 0``. Rows where neither converges keep the start.
    """
    beta, tau2, conv = _newton(a, beta0, tau20, lf, od=True, mle_weights=True)
    floor = ~(conv & (tau2 >= 0.0))
    idx = np.flatnonzero(floor)
    if idx.size:
        b0, _, c0 = _newton(a.take(idx), beta0[idx], np.zeros(idx.size), lf, od=False)
        beta[idx] = np.where(c0, b0, beta0[idx])
        tau2[idx] = np.where(c0, 0.0, tau20[idx])
    return beta, tau2


def _closest(candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]], target: np.ndarray) -> tuple[np.ndarray, ...]:
    """Among ``(beta, tau2, usable)`` candidates, the usable one with ``beta`` closest to ``target`` (first on ties)."""
    beta = np.stack([c[0] for c in candidates])
    tau2 = np.stack([c[1] for c in candidates])
    usable = np.stack([c[2] for c in candidates])
    dist = np.where(usable, np.abs(beta - target), np.inf)
    j = np.argmin(dist, axis=0)
    cols = np.arange(target.size)
    return beta[j, cols], tau2[j, cols], usable.any(axis=0)


def _fit_simple(a: _Rows, lf: Loss) -> tuple[np.ndarray, np.ndarray]:
    """Root of ``psi_1`` at ``tau^2 = 0`` nearest the ``mr.raps.mle`` estimate; returns ``beta, ok``."""
    target, found = _mle_simple(a, lf)
    zeros = np.zeros_like(target)
    beta, _, conv = _newton(a, target, zeros, lf, od=False)
    candidates = [(beta, zeros, conv)]
    done = conv.copy()
    for name in ("l2", "huber"):  # the package's multiroot starts, for rows whose own start failed
        idx = np.flatnonzero(~done)
        if name == lf.name or idx.size == 0:
            continue
        rows = a.take(idx)
        b = np.full(target.shape, np.nan)
        ok = np.zeros(target.shape, dtype=bool)
        b[idx], _, ok[idx] = _newton(rows, _mle_simple(rows, loss_function(name))[0], zeros[idx], lf, od=False)
        candidates.append((b, zeros, ok))
        done |= ok
    beta, _, ok = _closest(candidates, target)
    return beta, ok & found


def _fit_overdispersed(a: _Rows, lf: Loss) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Root of ``(psi_1, psi_2)`` nearest the ``mr.raps.mle`` estimate, else the fit without overdispersion.

    Returns
    -------
    beta, tau2, overdispersed, ok : numpy.ndarray
        ``overdispersed`` is False where the locus fell back to ``tau^2 = 0``.
    """
    pruned = a.pruned()
    beta_l2, tau2_l2, found = _mle_od_l2(pruned)
    starts = [(beta_l2, tau2_l2)]
    if lf.name != "l2":
        starts.append(_mle_od_robust(pruned, loss_function("huber"), beta_l2, tau2_l2))
    if lf.name == "tukey":
        starts.append(_mle_od_robust(pruned, lf, beta_l2, tau2_l2))
    target = starts[-1][0]
    used = a.mask > 0
    limit = TAU2_LIMIT * row_median_select(np.sqrt(a.sy2), used, used.sum(axis=1))
    candidates = []
    for b0, t0 in starts:
        b, t2, conv = _newton(a, b0, t0, lf, od=True)
        candidates.append((b, t2, conv & ~(t2 > limit)))
    beta, tau2, any_root = _closest(candidates, target)
    overdispersed = any_root & found & (tau2 >= 0.0)
    ok = np.ones(beta.shape, dtype=bool)
    idx = np.flatnonzero(~overdispersed)
    if idx.size:
        beta[idx], ok[idx] = _fit_simple(a.take(idx), lf)
        tau2[idx] = 0.0
    return beta, tau2, overdispersed, ok


def _sandwich(
    a: _Rows, beta: np.ndarray, tau2: np.ndarray, overdispersed: np.ndarray, lf: Loss
) -> tuple[np.ndarray, np.ndarray]:
    """mr.raps.shrinkage's sandwich standard errors of ``beta`` and ``tau^2`` (0 without overdispersion)."""
    s, v, sq, t, g = _terms(a, beta, tau2)
    m = a.mask
    p1 = lf.psi(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (m * (a.by * a.sx2 * p1 / (v * sq) - lf.delta * g * a.bx / v)).sum(axis=1)
        var_score = lf.c1 * (m * g * g / v).sum(axis=1)
        cross = -(m * beta[:, None] * a.by * a.sx2 * p1 / (s * v * sq)).sum(axis=1)
        inv_v2 = (m / (v * v)).sum(axis=1)
        d = 0.5 * (lf.delta + lf.c3) * inv_v2
        var_tau = lf.c2 * inv_v2
        se_simple = np.sqrt(var_score) / np.abs(slope)
        se_od = np.sqrt(var_score / slope**2 + (cross / (slope * d)) ** 2 * var_tau)
        tau2_se = np.sqrt(var_tau) / np.abs(d)
    return np.where(overdispersed, se_od, se_simple), np.where(overdispersed, tau2_se, 0.0)


@dataclass(frozen=True)
class RapsFit:
    """Per-locus MR-RAPS fit, ``(n_loci,)`` arrays.

    Attributes
    ----------
    beta, se : numpy.ndarray
        Causal estimate and its sandwich standard error.
    tau2, tau2_se : numpy.ndarray
        Overdispersion variance and its standard error; 0 and 0 where the model has no overdispersion
        (as mr.raps reports them), NaN where the fit is undefined.
    overdispersed : numpy.ndarray of bool
        True where ``tau2`` was estimated (False without overdispersion or after the fallback to ``tau^2 = 0``).
    reason : numpy.ndarray of object
        ``""`` or a code of :data:`deepmr_dist.mr.result.REASONS`.
    """

    beta: np.ndarray
    se: np.ndarray
    tau2: np.ndarray
    tau2_se: np.ndarray
    overdispersed: np.ndarray
    reason: np.ndarray


def raps_fit(data: MRData, *, loss: str = "huber", over_dispersion: bool = True) -> RapsFit:
    """MR-RAPS estimates with ``tau^2`` per locus (see the module docstring for the definitions).

    Parameters
    ----------
    data : MRData
        Prepared batch (:func:`deepmr_dist.mr._data.prepare`).
    loss : {"huber", "l2", "tukey"}
        ``loss.function`` of mr.raps (default ``"huber"``, as ``mr.raps()``).
    over_dispersion : bool
        Estimate the overdispersion ``tau^2`` jointly (default True, as ``mr.raps()``).

    Returns
    -------
    RapsFit

    Raises
    ------
    InputError
        For an unknown ``loss``.
    """
    lf = loss_function(loss)
    n_loci = data.n_loci
    reason = np.full(n_loci, "", dtype=object)
    fields = {name: np.full(n_loci, np.nan) for name in ("beta", "se", "tau2", "tau2_se")}
    overdispersed = np.zeros(n_loci, dtype=bool)
    rows = _Rows.of(data, np.arange(n_loci))
    bound = rows.ratio_bound(2.0)
    checks = (
        (data.n < (2 if over_dispersion else 1), "too_few_instruments"),
        (data.all_bx_zero(), "all_bx_zero"),
        (~np.isfinite(bound), "zero_bx"),
    )
    for mask, code in checks:
        reason[mask & (reason == "")] = code
    idx = np.flatnonzero(reason == "")
    if idx.size:
        a = rows.take(idx)
        if over_dispersion:
            beta, tau2, od, ok = _fit_overdispersed(a, lf)
        else:
            (beta, ok), tau2, od = _fit_simple(a, lf), np.zeros(idx.size), np.zeros(idx.size, dtype=bool)
        se, tau2_se = _sandwich(a, beta, tau2, od, lf)
        ok &= np.isfinite(beta) & np.isfinite(se)
        for name, value in (("beta", beta), ("se", se), ("tau2", tau2), ("tau2_se", tau2_se)):
            fields[name][idx] = np.where(ok, value, np.nan)
        overdispersed[idx] = od & ok
        reason[idx[~ok]] = "no_convergence"
    return RapsFit(overdispersed=overdispersed, reason=reason, **fields)


def mr_raps(data: MRData, *, loss: str = "huber", over_dispersion: bool = True, alpha: float = 0.05) -> MRResult:
    """MR-RAPS estimate per locus, as mr.raps 0.4.2's ``mr.raps.shrinkage(shrinkage = FALSE)``.

    Parameters
    ----------
    data : MRData
        Prepared batch (:func:`deepmr_dist.mr._data.prepare`).
    loss : {"huber", "l2", "tukey"}
        Loss function: ``"l2"`` is the (adjusted) profile score, ``"huber"`` and ``"tukey"`` the robust
        adjusted profile score with k = 1.345 and 4.685. Default ``"huber"``, as ``mr.raps()``.
    over_dispersion : bool
        Model systematic pleiotropy ``alpha_i ~ N(0, tau^2)`` and estimate ``tau^2`` jointly. Default
        True, as ``mr.raps()``.
    alpha : float
        1 - confidence level of the normal interval.

    Returns
    -------
    MRResult
        ``estimate``, ``se`` (sandwich), ``ci_lower``/``ci_upper`` and ``pvalue`` (normal) and ``fstat``;
        the other fields are NaN (``tau^2`` is in :func:`raps_fit`'s result).

    Raises
    ------
    InputError
        For an unknown ``loss``.
    """
    fit = raps_fit(data, loss=loss, over_dispersion=over_dispersion)
    out = ResultBuilder(data.n, data.fstat())
    store_wald(out, fit.beta, fit.se, alpha, False, data.n - 1)
    for code in np.unique(fit.reason[fit.reason != ""]):
        out.flag(fit.reason == code, str(code))
    return out.build()
