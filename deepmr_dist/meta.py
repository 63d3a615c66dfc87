"""Meta-analysis kernels: fixed effect and random effects (DL, REML, PM), vectorized over groups.

Definitions follow R's metafor (``rma.uni`` and ``predict.rma``, intercept-only
models, version 3.8 and later):

* ``fe``: inverse-variance fixed (equal) effect, ``tau2 = 0``.
* ``dl``: DerSimonian-Laird, ``tau2 = max(0, (Q - (k-1)) / (sum w - sum w^2 / sum w))``.
* ``reml``: restricted maximum likelihood by Fisher scoring with step halving at
  the boundary ``tau2 = 0``, started at the Hedges (HE) estimate (as metafor),
  including metafor's check that the restricted likelihood is not larger at
  ``tau2 = 0``. Where Fisher scoring does not settle (it can oscillate with a
  growing amplitude when the sampling variances span orders of magnitude, and
  metafor then stops with an error), the root of the REML score is bracketed
  and found by Brent's method instead.
* ``pm``: Paule-Mandel, the root of the generalized Q statistic
  ``sum w_i(tau2) (y_i - mu(tau2))^2 = k - 1`` (``tau2 = 0`` when ``Q < k - 1``).

The iterative estimators stop when the change in ``tau2`` falls below
``1e-10 tau2 + 1e-13 vbar`` (``vbar`` the harmonic mean of the sampling
variances; metafor's default is an absolute ``1e-5``), so on well-conditioned
data they agree with metafor run at a tight threshold to about 1e-8 relative.
They are vectorized: every iteration updates all unconverged groups at once.

Heterogeneity statistics: ``Q`` is always Cochran's Q of the fixed-effect fit
(weights ``1 / v_i``) with ``k - 1`` degrees of freedom. For random-effects
models ``I2 = 100 tau2 / (tau2 + s2)`` and ``H2 = tau2 / s2 + 1`` with the
"typical" within-study variance ``s2 = (k-1) sum w / ((sum w)^2 - sum w^2)``;
for the fixed-effect model ``I2 = max(0, 100 (Q - (k-1)) / Q)`` and
``H2 = Q / (k-1)``.

Hartung-Knapp(-Sidik-Jonkman): the variance of the estimate is multiplied by
``q_hk = sum w*_i (y_i - est)^2 / (k - 1)`` (``w*_i = 1 / (v_i + tau2)``; set to 0
when the weighted residual sum of squares is below machine epsilon, as
metafor) and intervals and p-values use the t distribution with ``k - 1``
degrees of freedom (metafor ``test="knha"``); the "ad hoc" variant truncates the
factor at 1, ``max(1, q_hk)`` (metafor ``test="adhoc"``).

Prediction interval (metafor ``predict``): ``est +- crit sqrt(se^2 + tau2)``
where ``crit`` is the normal quantile, or the t quantile with ``k - 1`` degrees
of freedom under HKSJ, and ``se`` is the (possibly HKSJ-scaled) standard error.
As in metafor, fixed-effect models have no prediction interval (NaN).

Single-study groups (``k = 1``): the estimate is the study's, ``tau2 = 0``,
``Q = 0``, ``I2 = 0``, ``H2 = 1`` and the heterogeneity p-value is NaN (metafor
reports 1). HKSJ has no degrees of freedom there: its standard error,
intervals and p-value are NaN with ``reason = "hksj_needs_k2"``.

Scale: every estimator is equivariant (estimates times ``c`` give the estimate, SE, limits
times ``|c|`` and ``tau2`` times ``c^2``), so each group is computed in units of the power of
two ``2^e`` of its largest ``|estimate|`` or SE, which is exact in floating point, and
scaled back: estimates up to 1e300 neither overflow nor underflow in the weights
``1 / (v + tau2)``. A group with a standard error below ``2^-120`` times that magnitude
has weights whose powers overflow in any units (``reason = "degenerate_se"``, all values
NaN). A value that does not fit in float64 once scaled back (typically ``tau2``, a
squared scale, for estimates beyond about 1e154) is NaN with ``reason = "overflow"``;
the other values of the group are exact.

This module imports only numpy and scipy (pandas lazily, for ``to_frame``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import optimize, stats

from deepmr_dist.errors import InputError, check_name

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "META_COLUMNS",
    "META_METHODS",
    "META_REASONS",
    "MetaResult",
    "check_method",
    "meta_analysis",
]

META_METHODS: tuple[str, ...] = ("fe", "dl", "reml", "pm")
"""Names of the available estimators of the between-study variance."""

META_REASONS: dict[str, str] = {
    "": "defined",
    "no_studies": "no study with a finite estimate and a positive finite standard error",
    "hksj_needs_k2": "Hartung-Knapp adjustment needs at least 2 studies (k - 1 degrees of freedom)",
    "tau2_not_converged": "iterative tau^2 estimator did not converge",
    "degenerate_se": (
        "a standard error is below 2^-120 (about 7.5e-37) times the group's largest |estimate| or SE, "
        "so the inverse-variance weights overflow float64 in any units"
    ),
    "overflow": (
        "a value (typically tau^2, the square of the estimates' scale) lies beyond the float64 range "
        "(about 1.8e308); it is NaN, the group's other values are exact"
    ),
    "underflow": (
        "a nonzero value (typically tau^2) lies below the float64 range (about 4.9e-324), so it would read "
        "as 0; it is NaN, the group's other values are exact"
    ),
}
"""Meaning of every value ``MetaResult.reason`` can take."""

META_COLUMNS: tuple[str, ...] = (
    "k",
    "estimate",
    "se",
    "ci_lower",
    "ci_upper",
    "pvalue",
    "tau2",
    "i2",
    "h2",
    "q",
    "q_pvalue",
    "pi_lower",
    "pi_upper",
)
"""Numeric result columns, in output order (``to_frame`` adds group, method, reason)."""

_TOL = 1e-10  # relative convergence tolerance on tau2
_FLOOR = 1e-13  # absolute floor, as a multiple of the group's typical variance
_MAXITER = 1000
_LL0_TOL = np.finfo(float).eps ** 0.25  # metafor's con$tol, used for its ll0 check
_EPS = np.finfo(float).eps
MIN_SE_EXPONENT = -120
"""A standard error below ``2^-120`` times its group's largest |estimate| or SE is degenerate."""
_SCALED = {"estimate": 1, "se": 1, "ci_lower": 1, "ci_upper": 1, "pi_lower": 1, "pi_upper": 1, "tau2": 2}
"""Result fields in units of the estimates (power 1) or their square (power 2)."""


@dataclass(frozen=True)
class MetaResult:
    """Per-group meta-analysis results; every field is an array of shape ``(n_groups,)``.

    Attributes
    ----------
    k : ndarray of int64
        Number of usable studies (finite estimate, finite positive standard error).
    estimate, se : ndarray of float64
        Pooled estimate and its standard error (HKSJ-scaled when requested).
    ci_lower, ci_upper : ndarray of float64
        Confidence interval (normal, or t with ``k - 1`` df under HKSJ).
    pvalue : ndarray of float64
        Two-sided p-value of ``estimate = 0`` (normal, or t under HKSJ).
    tau2 : ndarray of float64
        Between-study variance (0 for ``fe``).
    i2, h2 : ndarray of float64
        I^2 (percent) and H^2, metafor's definitions (see module docstring).
    q, q_pvalue : ndarray of float64
        Cochran's Q of the fixed-effect fit and its chi-square(k - 1) p-value.
    pi_lower, pi_upper : ndarray of float64
        Prediction interval (NaN for ``fe``, as in metafor).
    reason : ndarray of str (object)
        ``""`` when every value is defined, else a key of :data:`META_REASONS`.
    """

    k: np.ndarray
    estimate: np.ndarray
    se: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    pvalue: np.ndarray
    tau2: np.ndarray
    i2: np.ndarray
    h2: np.ndarray
    q: np.ndarray
    q_pvalue: np.ndarray
    pi_lower: np.ndarray
    pi_upper: np.ndarray
    reason: np.ndarray

    def __len__(self) -> int:
        return int(self.k.shape[0])

    def to_frame(self, method: str, groups: Sequence[object] | None = None) -> pd.DataFrame:
        """Return one row per group with columns ``group, method, <META_COLUMNS>, reason``.

        Parameters
        ----------
        method : str
            Label written in the ``method`` column (e.g. ``"dl"`` or ``"dl_hksj"``).
        groups : sequence, optional
            Group labels, one per group; ``0..n-1`` when omitted.
        """
        import pandas as pd

        n = len(self)
        if groups is None:
            groups = list(range(n))
        groups = list(groups)
        if len(groups) != n:
            raise InputError(f"to_frame: got {len(groups)} group labels for {n} groups")
        data: dict[str, object] = {"group": groups, "method": [method] * n}
        for name in META_COLUMNS:
            data[name] = getattr(self, name)
        data["reason"] = self.reason.astype(object)
        return pd.DataFrame(data)

    def __eq__(self, other: object) -> bool:  # arrays make the dataclass default ambiguous
        if not isinstance(other, MetaResult):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name), equal_nan=f.name != "reason")
            for f in fields(self)
        )

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- inputs


def _prepare(estimate: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return ``(y, v, valid, n_studies, exponent, degenerate)``; unusable cells get ``y = 0, v = 1``.

    A study is usable when its estimate is finite and its standard error is
    finite and positive; everything else (NaN padding included) is ignored.
    ``y`` and the standard errors are divided by ``2^exponent`` (per group, the
    power of two of the largest ``|y|`` or SE; exact) before ``v = se^2`` is
    formed. ``degenerate`` marks groups with a scaled SE below ``2^MIN_SE_EXPONENT``;
    their studies are left out of ``valid`` (they are fitted as empty groups) but
    counted in ``n_studies``.
    """
    y = np.asarray(estimate, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    if y.shape != s.shape:
        raise InputError(f"estimate and se must have the same shape, got {y.shape} and {s.shape}")
    if y.ndim == 1:
        y, s = y[None, :], s[None, :]
    if y.ndim != 2:
        raise InputError(f"estimate must be 1-D or 2-D (n_groups, max_k), got {y.ndim}-D")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(y) & np.isfinite(s) & (s > 0)
    _, exponent = np.frexp(np.where(valid, np.maximum(np.abs(y), s), 0.0).max(axis=1, initial=0.0))
    y = np.ldexp(y, -exponent[:, None])
    s = np.where(valid, np.ldexp(s, -exponent[:, None]), 1.0)
    degenerate = np.where(valid, s, np.inf).min(axis=1, initial=np.inf) < 2.0**MIN_SE_EXPONENT
    n_studies = valid.sum(axis=1).astype(np.int64)
    valid = valid & ~degenerate[:, None]
    y = np.where(valid, y, 0.0)
    v = np.where(valid, s * s, 1.0)
    return y, v, valid, n_studies, exponent.astype(np.int64), degenerate


def _weighted_fit(y: np.ndarray, v: np.ndarray, valid: np.ndarray, tau2: np.ndarray):
    """Inverse-variance fit with weights ``1 / (v + tau2)``; returns ``w, sum_w, mu, rss``."""
    w = np.where(valid, 1.0 / (v + tau2[:, None]), 0.0)
    sw = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (w * y).sum(axis=1) / sw
    r = np.where(valid, y - mu[:, None], 0.0)
    rss = (w * r * r).sum(axis=1)
    return w, sw, mu, r, rss


def _others(a: np.ndarray) -> np.ndarray:
    """``sum_{j != i} a_j`` for every entry of every row, from prefix and suffix sums (no subtraction)."""
    out = np.zeros_like(a)
    out[:, 1:] += np.cumsum(a, axis=1)[:, :-1]
    out[:, :-1] += np.cumsum(a[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return out


def _tr_p(w: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """Trace of ``P = W - w w' / sum w`` (intercept-only model): ``sum w - sum w^2 / sum w``.

    Summed as ``sum_i w_i sum_{j != i} w_j / sum w``, positive terms only: the
    difference form cancels when one study carries nearly all the weight.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * _others(w)).sum(axis=1) / sw


def _tr_pp(w: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """``tr(P P) = sum_ij P_ij^2`` with ``P_ii = w_i sum_{j != i} w_j / sum w`` and ``P_ij = -w_i w_j / sum w``.

    Positive terms only, for the reason given in :func:`_tr_p`; equal to
    ``sum w^2 - 2 sum w^3 / sum w + (sum w^2 / sum w)^2``.
    """
    w2 = w * w
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((w2 * _others(w) ** 2).sum(axis=1) + (w2 * _others(w2)).sum(axis=1)) / (sw * sw)


# --------------------------------------------------------------------------- tau^2 estimators


def _tau2_dl(y, v, valid, k) -> tuple[np.ndarray, np.ndarray]:
    zero = np.zeros(y.shape[0])
    w, sw, _, _, q = _weighted_fit(y, v, valid, zero)
    trp = _tr_p(w, sw)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau2 = np.maximum(0.0, (q - (k - 1)) / trp)
    tau2 = np.where(k >= 2, tau2, 0.0)
    return tau2, np.ones(y.shape[0], dtype=bool)


def _tau2_he(y, v, valid, k) -> np.ndarray:
    """Hedges (HE) estimate ``sum (y - ybar)^2 / (k-1) - mean(v)``, metafor's REML start."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = y.sum(axis=1) / k
        rss = (np.where(valid, y - ybar[:, None], 0.0) ** 2).sum(axis=1)
        vsum = np.where(valid, v, 0.0).sum(axis=1)
        he = (rss - vsum * (k - 1) / k) / (k - 1)
    return np.where(k >= 2, he, 0.0)


def _tolerance(v, valid, k, tau2) -> np.ndarray:
    """Convergence tolerance ``1e-10 tau2 + 1e-13 vbar`` (``vbar``: harmonic mean of ``v``).

    Scale-invariant; the floor sits above the round-off of the score sums.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        vbar = k / np.where(valid, 1.0 / v, 0.0).sum(axis=1)
    return _TOL * tau2 + _FLOOR * vbar


def _reml_score(y, v, valid, tau2) -> tuple[np.ndarray, np.ndarray]:
    """Twice the REML score, ``y'PPy - tr P`` (positive below the maximum), and twice its Fisher information, ``tr(PP)``."""
    w, sw, _, r, _ = _weighted_fit(y, v, valid, tau2)
    return (w * w * r * r).sum(axis=1) - _tr_p(w, sw), _tr_pp(w, sw)


def _reml_step(y, v, valid, tau2) -> np.ndarray:
    """Fisher-scoring step ``(y'PPy - tr P) / tr(PP)`` of the REML score at ``tau2``."""
    score, information = _reml_score(y, v, valid, tau2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return score / information


def _reml_root(y, v, valid, k, tau2) -> float:
    """REML ``tau2`` of one group (rows of length 1) by Brent's method on the score, near ``tau2``.

    The bracket grows from ``tau2`` (doubling up, halving down to 0); a score that
    is negative at 0 puts the maximum on the boundary. NaN if no bracket is found.
    """

    def score(t: float) -> float:
        return float(_reml_score(y, v, valid, np.array([t]))[0][0])

    t0 = float(tau2) if np.isfinite(tau2) and tau2 > 0 else float(k[0] / (1.0 / v[valid]).sum())
    g0 = score(t0)
    if g0 == 0.0:
        return t0
    lo = hi = t0
    for _ in range(200):
        if g0 > 0:
            hi *= 2.0
            if score(hi) <= 0.0:
                break
        else:
            lo *= 0.5
            if lo < 1e-300 or score(lo) >= 0.0:
                break
    else:
        return float("nan")
    if g0 < 0 and score(lo) < 0:
        return 0.0
    tol = float(_tolerance(v, valid, k, np.array([t0]))[0])
    return optimize.brentq(score, lo, hi, xtol=tol, rtol=4 * _EPS)


def _reml_loglik(y, v, valid, tau2) -> np.ndarray:
    """Restricted log-likelihood without its constant: ``-(sum log(v+tau2) + log sum w + RSS) / 2``."""
    _, sw, _, _, rss = _weighted_fit(y, v, valid, tau2)
    logdet = np.where(valid, np.log(v + tau2[:, None]), 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -0.5 * (logdet + np.log(sw) + rss)


def _tau2_reml(y, v, valid, k) -> tuple[np.ndarray, np.ndarray]:
    tau2 = np.maximum(0.0, _tau2_he(y, v, valid, k))
    converged = k < 2
    tau2[converged] = 0.0
    active = np.flatnonzero(~converged)
    for _ in range(_MAXITER):
        if active.size == 0:
            break
        ya, va, ma, ta = y[active], v[active], valid[active], tau2[active]
        adj = _reml_step(ya, va, ma, ta)
        adj = np.where(np.isfinite(adj), adj, 0.0)
        adj = _halve_to_boundary(ta, adj)
        new = ta + adj
        done = np.abs(adj) <= _tolerance(va, ma, k[active], new)
        tau2[active] = new
        converged[active[done]] = True
        active = active[~done]
    for g in np.flatnonzero(~converged):
        tau2[g] = _reml_root(y[g : g + 1], v[g : g + 1], valid[g : g + 1], k[g : g + 1], tau2[g])
        converged[g] = np.isfinite(tau2[g])
    tau2 = _reml_boundary(y, v, valid, k, tau2, converged)
    return np.where(converged, tau2, np.nan), converged


def _halve_to_boundary(tau2: np.ndarray, adj: np.ndarray) -> np.ndarray:
    """metafor's step halving: halve ``adj`` until ``tau2 + adj >= 0`` (0 stays 0)."""
    out = adj.copy()
    neg = tau2 + out < 0
    if not neg.any():
        return out
    at_zero = neg & (tau2 <= 0)
    out[at_zero] = 0.0
    rest = neg & ~at_zero
    if rest.any():
        halvings = np.ceil(np.log2(-out[rest] / tau2[rest]))
        step = np.ldexp(out[rest], -halvings.astype(np.int64))
        step = np.where(tau2[rest] + step < 0, step / 2.0, step)
        out[rest] = step
    return out


def _reml_boundary(y, v, valid, k, tau2, converged) -> np.ndarray:
    """Snap to ``tau2 = 0`` where the likelihood says so.

    Two cases: the iterate crept to within the tolerance of 0 with a
    non-positive score at 0 (the maximum is on the boundary), and metafor's
    ``ll0check`` (the likelihood at 0 exceeds the one at the estimate).
    """
    tau2 = tau2.copy()
    idx = np.flatnonzero(converged & (k >= 2))
    if idx.size == 0:
        return tau2
    ya, va, ma, ta = y[idx], v[idx], valid[idx], tau2[idx]
    zeros = np.zeros(idx.size)
    adj0 = _reml_step(ya, va, ma, zeros)
    ll0 = _reml_loglik(ya, va, ma, zeros)
    ll = _reml_loglik(ya, va, ma, ta)
    tiny = ta <= 10 * _tolerance(va, ma, k[idx], zeros)
    snap = (tiny & (adj0 <= 0)) | ((ll0 - ll > _LL0_TOL) & ~tiny)
    tau2[idx[snap]] = 0.0
    return tau2


def _tau2_pm(y, v, valid, k) -> tuple[np.ndarray, np.ndarray]:
    """Paule-Mandel by safeguarded Newton on ``Q(tau2) - (k-1)`` inside a bracket.

    ``Q(tau2) <= sum (y - ybar)^2 / tau2``, so ``hi = sum (y - ybar)^2 / (k - 1)``
    brackets the root whenever ``Q(0) >= k - 1``.
    """
    n = y.shape[0]
    target = (k - 1).astype(np.float64)
    tau2 = np.zeros(n)
    converged = np.ones(n, dtype=bool)
    q0 = _weighted_fit(y, v, valid, tau2)[4]
    need = (k >= 2) & (q0 > target)
    idx = np.flatnonzero(need)
    if idx.size == 0:
        return tau2, converged
    ya, va, ma, ka = y[idx], v[idx], valid[idx], target[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = ya.sum(axis=1) / (ka + 1)
    hi = (np.where(ma, ya - ybar[:, None], 0.0) ** 2).sum(axis=1) / ka
    lo = np.zeros(idx.size)
    t = np.zeros(idx.size)
    done = np.zeros(idx.size, dtype=bool)
    for _ in range(_MAXITER):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        w, _, _, r, q = _weighted_fit(ya[act], va[act], ma[act], t[act])
        f = q - ka[act]
        slope = -(w * w * r * r).sum(axis=1)
        lo[act] = np.where(f > 0, t[act], lo[act])
        hi[act] = np.where(f < 0, t[act], hi[act])
        with np.errstate(invalid="ignore", divide="ignore"):
            newton = t[act] - f / slope
        inside = np.isfinite(newton) & (newton > lo[act]) & (newton < hi[act])
        new = np.where(inside, newton, 0.5 * (lo[act] + hi[act]))
        new = np.where(f == 0, t[act], new)
        step = np.abs(new - t[act])
        t[act] = new
        tol = _tolerance(va[act], ma[act], ka[act] + 1, new)
        done[act] = (step <= tol) | (hi[act] - lo[act] <= tol)
    tau2[idx] = t
    converged[idx] = done
    tau2[~converged] = np.nan
    return tau2, converged


_TAU2_ESTIMATORS = {
    "fe": lambda y, v, valid, k: (np.zeros(y.shape[0]), np.ones(y.shape[0], dtype=bool)),
    "dl": _tau2_dl,
    "reml": _tau2_reml,
    "pm": _tau2_pm,
}


# --------------------------------------------------------------------------- assembly


def _heterogeneity(y, v, valid, k, tau2, method) -> tuple[np.ndarray, ...]:
    """Cochran's Q (fixed-effect weights), its p-value, I^2 and H^2 per metafor."""
    zero = np.zeros(y.shape[0])
    w, sw, _, _, q = _weighted_fit(y, v, valid, zero)
    q = np.maximum(0.0, q)
    df = (k - 1).astype(np.float64)
    multi = k >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        q_p = np.where(multi, stats.chi2.sf(q, np.maximum(df, 1.0)), np.nan)
        if method == "fe":
            i2 = np.maximum(0.0, 100.0 * (q - df) / q)
            h2 = q / df
        else:
            vt = df / _tr_p(w, sw)
            i2 = 100.0 * tau2 / (vt + tau2)
            h2 = tau2 / vt + 1.0
    q = np.where(k >= 1, np.where(multi, q, 0.0), np.nan)
    i2 = np.where(multi, i2, np.where(k == 1, 0.0, np.nan))
    h2 = np.where(multi, h2, np.where(k == 1, 1.0, np.nan))
    return q, q_p, i2, h2


def _hksj_factor(rss: np.ndarray, k: np.ndarray, adhoc: bool) -> np.ndarray:
    """``q_hk = RSS* / (k-1)`` (0 when ``RSS* <= eps``), truncated at 1 for the ad hoc variant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        s2w = np.where(rss <= _EPS, 0.0, rss / (k - 1))
    if adhoc:
        s2w = np.maximum(s2w, 1.0)
    return np.where(k >= 2, s2w, np.nan)


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`META_METHODS`, else an ``InputError`` listing them (the one check)."""
    return check_name(method, META_METHODS, "meta-analysis method")


def _validate_options(method: str, alpha: float) -> None:
    check_method(method)
    if not (0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def meta_analysis(
    estimate: np.ndarray,
    se: np.ndarray,
    method: str = "dl",
    *,
    hksj: bool = False,
    hksj_adhoc: bool = False,
    alpha: float = 0.05,
) -> MetaResult:
    """Meta-analyse every group (row) of NaN-padded study estimates at once.

    Parameters
    ----------
    estimate, se : array_like of float, shape (n_groups, max_k) or (k,)
        Study estimates and standard errors, one group per row, padded with
        NaN. A study counts only when its estimate is finite and its standard
        error finite and positive; other cells are ignored (use
        :mod:`deepmr_dist.io.tables` to validate and count bad input rows).
    method : {"fe", "dl", "reml", "pm"}
        Estimator of the between-study variance (see module docstring).
    hksj : bool
        Hartung-Knapp-Sidik-Jonkman adjustment, untruncated (metafor ``test="knha"``).
    hksj_adhoc : bool
        The ad hoc truncated HKSJ variant, ``max(1, q_hk)`` (metafor
        ``test="adhoc"``); implies ``hksj``.
    alpha : float
        1 - confidence level of the confidence and prediction intervals.

    Returns
    -------
    MetaResult
        Arrays of shape ``(n_groups,)``. Groups without any usable study get
        NaN with ``reason="no_studies"``; see the module docstring for ``k = 1``.

    Raises
    ------
    InputError
        Unknown ``method`` (listing the valid ones), ``alpha`` outside (0, 1),
        or mismatched shapes.
    """
    _validate_options(method, alpha)
    y, v, valid, n_studies, exponent, degenerate = _prepare(estimate, se)
    k = valid.sum(axis=1).astype(np.int64)
    tau2, converged = _TAU2_ESTIMATORS[method](y, v, valid, k)
    tau2 = np.where(k >= 1, tau2, np.nan)
    _, sw, est, _, rss = _weighted_fit(y, v, valid, np.where(np.isfinite(tau2), tau2, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        se_out = np.sqrt(1.0 / sw)
    use_t = hksj or hksj_adhoc
    if use_t:
        se_out = se_out * np.sqrt(_hksj_factor(rss, k, adhoc=hksj_adhoc))
        df = np.maximum(k - 1, 1).astype(np.float64)
        crit = np.where(k >= 2, stats.t.isf(alpha / 2.0, df), np.nan)
    else:
        crit = np.full(k.shape, stats.norm.isf(alpha / 2.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        zval = est / se_out
        if use_t:
            pvalue = np.where(k >= 2, 2.0 * stats.t.sf(np.abs(zval), df), np.nan)
        else:
            pvalue = 2.0 * stats.norm.sf(np.abs(zval))
        half = crit * se_out
        pi_half = crit * np.sqrt(se_out * se_out + tau2)
    if method == "fe":
        pi_half = np.full(k.shape, np.nan)
    q, q_p, i2, h2 = _heterogeneity(y, v, valid, k, tau2, method)
    reason = _reasons(k, converged, use_t)
    reason[degenerate & (n_studies > 0)] = "degenerate_se"
    bad = reason == "tau2_not_converged"
    est = np.where(bad | (k == 0), np.nan, est)
    result = MetaResult(
        k=n_studies,
        estimate=est,
        se=np.where(bad | (k == 0), np.nan, se_out),
        ci_lower=est - half,
        ci_upper=est + half,
        pvalue=np.where(bad | (k == 0), np.nan, pvalue),
        tau2=tau2,
        i2=np.where(bad, np.nan, i2),
        h2=np.where(bad, np.nan, h2),
        q=q,
        q_pvalue=q_p,
        pi_lower=est - pi_half,
        pi_upper=est + pi_half,
        reason=reason,
    )
    return _unscaled(result, exponent)


def _unscaled(result: MetaResult, exponent: np.ndarray) -> MetaResult:
    """``result`` times ``2^exponent`` (``tau2``: ``4^exponent``).

    A finite value that becomes infinite (``overflow``) or a nonzero one that becomes 0
    (``underflow``) is NaN, with that reason where the group has none yet.
    """
    if not exponent.any():
        return result
    changes = {}
    reason = result.reason.copy()
    for name, power in _SCALED.items():
        value = getattr(result, name)
        with np.errstate(over="ignore", under="ignore"):
            back = np.ldexp(value, power * exponent)
        finite = np.isfinite(value)
        for code, lost in (("overflow", finite & ~np.isfinite(back)), ("underflow", finite & (value != 0) & (back == 0))):
            reason[lost & (reason == "")] = code
            back = np.where(lost, np.nan, back)
        changes[name] = back
    return replace(result, reason=reason, **changes)


def _reasons(k: np.ndarray, converged: np.ndarray, use_t: bool) -> np.ndarray:
    reason = np.full(k.shape, "", dtype=object)
    if use_t:
        reason[k == 1] = "hksj_needs_k2"
    reason[(k >= 2) & ~converged] = "tau2_not_converged"
    reason[k == 0] = "no_studies"
    return reason
