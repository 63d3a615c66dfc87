"""Confidence limits and p-values of MR estimates, as the package's ``ci_normal``, ``ci_t`` and ``egger.bounds``.

Every estimator stores its inference through :func:`store_wald` (estimate, se,
interval, p-value) or, for the MR-Egger family, :func:`store_egger` (slope and
intercept with the package's under-dispersion rule for t intervals).

The distribution functions are :mod:`scipy.special`'s (``ndtri``, ``ndtr``,
``stdtrit``, ``stdtr``), the same functions :data:`scipy.stats.norm` and
:data:`scipy.stats.t` evaluate, without their per-call argument handling,
which cost about a tenth of a batch of IVW and MR-Egger fits.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from deepmr_dist.mr.result import ResultBuilder

ESTIMATE_FIELDS = ("estimate", "se", "ci_lower", "ci_upper", "pvalue")
"""Fields written by :func:`store_wald` (and for the slope by :func:`store_egger`)."""
INTERCEPT_FIELDS = ("intercept", "intercept_se", "intercept_ci_lower", "intercept_ci_upper", "intercept_pvalue")
"""Intercept fields written by :func:`store_egger`."""


def z_quantile(alpha: float) -> float:
    """Two-sided normal critical value ``qnorm(1 - alpha / 2)``."""
    return float(special.ndtri(1.0 - alpha / 2.0))


def t_quantile(alpha: float, df: np.ndarray) -> np.ndarray:
    """Two-sided t critical value ``qt(1 - alpha / 2, df)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df >= 1, special.stdtrit(np.maximum(df, 1), 1.0 - alpha / 2.0), np.nan)


def normal_p(estimate: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Two-sided normal p-value ``2 * pnorm(-|estimate / se|)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * special.ndtr(-np.abs(estimate / se))


def t_p(estimate: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided t p-value ``2 * pt(-|estimate / se|, df)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(df >= 1, 2.0 * special.stdtr(np.maximum(df, 1), -np.abs(estimate / se)), np.nan)


def wald_inference(
    estimate: np.ndarray, se: np.ndarray, alpha: float, t_dist: bool, df: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence limits and p-value as the package's ``ci_normal`` / ``ci_t``.

    Parameters
    ----------
    estimate, se : numpy.ndarray
        Point estimate and standard error per locus.
    alpha : float
        1 - confidence level.
    t_dist : bool
        Use a t distribution with ``df`` degrees of freedom instead of the normal.
    df : numpy.ndarray
        Degrees of freedom per locus (only with ``t_dist``).

    Returns
    -------
    lower, upper, pvalue : numpy.ndarray
    """
    if t_dist:
        crit = t_quantile(alpha, df)
        p = t_p(estimate, se, df)
    else:
        crit = z_quantile(alpha)
        p = normal_p(estimate, se)
    return estimate - crit * se, estimate + crit * se, p


def egger_inference(
    theta: np.ndarray, se: np.ndarray, rse: np.ndarray, df: np.ndarray, alpha: float, t_dist: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence limits and p-value of an MR-Egger coefficient (``egger.bounds``).

    Normal inference is :func:`wald_inference`'s. With ``t_dist``: a t distribution
    with ``df`` degrees of freedom, and under under-dispersion (``rse < 1``) the
    wider of the normal interval and the t interval with the estimated rse (the
    larger p-value).

    Parameters
    ----------
    theta, se : numpy.ndarray
        Coefficient and its (rse-floored) standard error.
    rse : numpy.ndarray
        Residual standard error of the fit.
    df : numpy.ndarray
        Degrees of freedom, ``n - 2``.
    alpha : float
        1 - confidence level.
    t_dist : bool
        Use the package's t-distribution rule instead of the normal.

    Returns
    -------
    lower, upper, pvalue : numpy.ndarray
    """
    if not t_dist:
        return wald_inference(theta, se, alpha, False, df)
    z = z_quantile(alpha)
    tq = t_quantile(alpha, df)
    under = rse < 1
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(under, np.minimum(theta - z * se, theta - tq * se * rse), theta - tq * se)
        upper = np.where(under, np.maximum(theta + z * se, theta + tq * se * rse), theta + tq * se)
    p = np.where(under, np.maximum(normal_p(theta, se), t_p(theta, se * rse, df)), t_p(theta, se, df))
    return lower, upper, p


def store_wald(
    out: ResultBuilder,
    estimate: np.ndarray,
    se: np.ndarray,
    alpha: float,
    t_dist: bool,
    df: np.ndarray,
    half_width: float | None = None,
) -> None:
    """Write ``estimate``, ``se``, ``ci_lower``, ``ci_upper`` and ``pvalue`` into ``out``.

    Parameters
    ----------
    out : ResultBuilder
        Receives the five fields.
    estimate, se : numpy.ndarray
        Point estimate and standard error per locus.
    alpha : float
        1 - confidence level.
    t_dist : bool
        t distribution with ``df`` degrees of freedom instead of the normal.
    df : numpy.ndarray
        Degrees of freedom per locus (only with ``t_dist``).
    half_width : float, optional
        Interval half-width in standard errors instead of the quantile (the
        p-value stays the normal or t one).
    """
    lower, upper, p = wald_inference(estimate, se, alpha, t_dist, df)
    if half_width is not None:
        lower, upper = estimate - half_width * se, estimate + half_width * se
    _put(out, ESTIMATE_FIELDS, estimate, se, lower, upper, p)


def store_egger(
    out: ResultBuilder,
    slope: np.ndarray,
    se_slope: np.ndarray,
    intercept: np.ndarray,
    se_intercept: np.ndarray,
    rse: np.ndarray,
    df: np.ndarray,
    alpha: float,
    t_dist: bool,
) -> None:
    """Write an MR-Egger fit's slope (the causal estimate) and intercept with their inference.

    Parameters
    ----------
    out : ResultBuilder
        Receives the estimate, intercept and rse fields.
    slope, se_slope, intercept, se_intercept : numpy.ndarray
        Coefficients and their (rse-floored) standard errors.
    rse : numpy.ndarray
        Residual standard error (robust scale for MM fits).
    df : numpy.ndarray
        Degrees of freedom, ``n - 2``.
    alpha : float
        1 - confidence level.
    t_dist : bool
        The package's t-distribution rule (:func:`egger_inference`).
    """
    for fields, theta, se in ((ESTIMATE_FIELDS, slope, se_slope), (INTERCEPT_FIELDS, intercept, se_intercept)):
        _put(out, fields, theta, se, *egger_inference(theta, se, rse, df, alpha, t_dist))
    out["rse"] = rse


def _put(out: ResultBuilder, fields: tuple[str, ...], *values: np.ndarray) -> None:
    """Write ``values`` into the builder fields ``fields``, in order."""
    for name, value in zip(fields, values, strict=True):
        out[name] = value
