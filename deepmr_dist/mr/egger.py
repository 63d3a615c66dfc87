"""MR-Egger regression, as ``MendelianRandomization::mr_egger`` (random-effects model).

Orient every instrument so that ``bx > 0`` (``by <- sign(bx) * by``, ``bx <- |bx|``),
then fit ``by ~ 1 + bx`` by weighted least squares with weights ``byse^-2``.
Standard errors are the regression's divided by ``min(1, rse)`` (residual standard
error floored at 1). Confidence limits and p-values are normal by default; with
``t_dist`` they follow the package's ``egger.bounds``: a t distribution with
``n - 2`` degrees of freedom, and under under-dispersion (rse < 1) the wider of the
normal interval with rse set to 1 and the t interval with the estimated rse.
Needs at least three instruments.

Degenerate case: with an exact fit (rse = 0) the package divides 0 by 0; here the
standard error is its limit (rse treated as 1).
"""

from __future__ import annotations

import numpy as np

from deepmr_dist.mr._data import MRData, chi2_sf
from deepmr_dist.mr._input_loops import i2gx_q
from deepmr_dist.mr.inference import store_egger
from deepmr_dist.mr.result import MRResult, ResultBuilder

SINGULAR_TOL = 1e-7
"""Relative column-norm tolerance for rank deficiency (R's ``lm`` QR tolerance)."""


def oriented(data: MRData) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(|bx|, sign(bx) * by)``; sign(0) = 0 as in R."""
    return np.abs(data.bx), np.sign(data.bx) * data.by


def i2_gx(data: MRData) -> np.ndarray:
    """The package's I^2_GX of the oriented exposure associations.

    ``Q = sum((bxse/byse)^-2 (|bx|/byse - weighted.mean(|bx|/byse, (bxse/byse)^-2))^2)``,
    ``I^2_GX = max(0, (Q - (n - 1)) / Q)``; NaN below two instruments.
    """
    q = i2gx_q(data.bx, data.bxse, data.byse, data.valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(data.n >= 2, np.maximum(0.0, (q - (data.n - 1)) / q), np.nan)


def egger_wls(data: MRData) -> dict[str, np.ndarray]:
    """Weighted least squares of the oriented ``by ~ 1 + bx`` per locus.

    Returns
    -------
    dict
        ``slope``, ``intercept``, ``rss``, ``sigma`` (residual standard error),
        ``var_slope``, ``var_intercept`` (unscaled: the inverse-information terms
        without sigma^2), ``singular`` (rank-deficient design).
    """
    x, y = oriented(data)
    w = data.w
    s0 = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xbar = (w * x).sum(axis=1) / s0
        ybar = (w * y).sum(axis=1) / s0
        dx = np.where(data.valid, x - xbar[:, None], 0.0)
        dy = np.where(data.valid, y - ybar[:, None], 0.0)
        sxx = (w * dx * dx).sum(axis=1)
        sxy = (w * dx * dy).sum(axis=1)
        slope = sxy / sxx
        intercept = ybar - slope * xbar
        resid = dy - slope[:, None] * dx
        rss = (w * resid * resid).sum(axis=1)
        sigma = np.sqrt(rss / (data.n - 2))
        singular = ~(sxx > SINGULAR_TOL**2 * (w * x * x).sum(axis=1))
        return {
            "slope": slope,
            "intercept": intercept,
            "rss": rss,
            "sigma": np.where(data.n >= 3, sigma, np.nan),
            "var_slope": 1.0 / sxx,
            "var_intercept": 1.0 / s0 + xbar * xbar / sxx,
            "singular": singular,
        }


def egger(data: MRData, *, alpha: float = 0.05, t_dist: bool = False) -> MRResult:
    """MR-Egger estimate per locus.

    Parameters
    ----------
    data : MRData
    alpha : float
        1 - confidence level.
    t_dist : bool
        Package's t-distribution rule (``distribution = "t-dist"``).

    Returns
    -------
    MRResult
        With intercept inference, ``rse``, residual ``q`` (n - 2 df) and ``i2gx``.
    """
    out = ResultBuilder(data.n, data.fstat())
    fit = egger_wls(data)
    sigma = fit["sigma"]
    floor = np.maximum(1.0, sigma)
    with np.errstate(invalid="ignore"):
        se_b = np.sqrt(fit["var_slope"]) * floor
        se_a = np.sqrt(fit["var_intercept"]) * floor
    df = data.n - 2
    store_egger(out, fit["slope"], se_b, fit["intercept"], se_a, sigma, df, alpha, t_dist)
    out["q"] = fit["rss"]
    out["q_pvalue"] = chi2_sf(fit["rss"], df)
    out["i2gx"] = i2_gx(data)
    out.flag(data.n < 3, "too_few_instruments")
    out.flag(data.all_bx_zero(), "all_bx_zero")
    out.flag(fit["singular"], "singular_fit")
    return out.build()
