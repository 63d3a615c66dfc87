"""Inverse-variance weighted (IVW) estimators, as ``MendelianRandomization::mr_ivw``.

The IVW estimate is the weighted regression of ``by`` on ``bx`` without intercept,
weights ``byse^-2`` (first-order, ``weights = "simple"``)::

    estimate = sum(bx by byse^-2) / sum(bx^2 byse^-2)
    se_fixed = 1 / sqrt(sum(bx^2 byse^-2))
    se_random = se_fixed * max(1, rse),  rse = sqrt(Q / (n - 1))

``model="default"`` is the fixed-effect model below four instruments and the
multiplicative random-effects model otherwise. Q is Cochran's Q of the fit with
``n - 1`` degrees of freedom. The penalized variant (``penalized = TRUE``)
multiplies each weight by ``min(1, k * p_j)`` where ``p_j`` is the chi2(1) upper
tail of the instrument's heterogeneity contribution about the median ratio
estimate; ``k = 100`` in the package for first-order weights.

Degenerate case: with an exact fit (rse = 0) the package divides 0 by 0; here the
fixed-effect standard error is its limit ``1 / sqrt(sum(bx^2 byse^-2))``.
"""

from __future__ import annotations

import numpy as np

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import MRData, chi2_1_sf, chi2_sf, row_median_select
from deepmr_dist.mr.inference import store_wald
from deepmr_dist.mr.result import MRResult, ResultBuilder

MODELS = ("default", "fixed", "random")
PENALIZED_IVW_FACTOR = 100.0
"""Package multiplier of the penalization p-values for IVW with first-order weights."""


def random_effects_mask(model: str, n: np.ndarray) -> np.ndarray:
    """True where ``model`` calls for the multiplicative random-effects standard error.

    ``"default"`` is MendelianRandomization's rule: fixed effect below four
    instruments, random effects from four up (``n`` counts every instrument).

    Raises
    ------
    InputError
        If ``model`` is not one of :data:`MODELS`.
    """
    if model not in MODELS:
        raise InputError(f"IVW model must be one of {MODELS}, got {model!r}")
    if model == "default":
        return n >= 4
    return np.full(n.shape, model == "random")


def weighted_fit(data: MRData, w: np.ndarray, used: np.ndarray) -> dict[str, np.ndarray]:
    """No-intercept weighted least squares of by on bx per locus (``w`` already masked).

    ``used`` counts the instruments in the fit (``data.n``, or those of nonzero
    weight); ``rse`` has ``used - 1`` degrees of freedom, is 1 for a single
    instrument and NaN where ``n >= 2`` but fewer than two are used.
    """
    sxx = (w * data.bx * data.bx).sum(axis=1)
    sxy = (w * data.bx * data.by).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = sxy / sxx
        resid = data.by - est[:, None] * data.bx
        rss = (w * resid * resid).sum(axis=1)
        rse = np.sqrt(rss / (used - 1))
    rse = np.where(data.n >= 2, np.where(used >= 2, rse, np.nan), np.where(data.n == 1, 1.0, np.nan))
    return {"sxx": sxx, "estimate": est, "rss": rss, "rse": rse}


def store_fit(
    out: ResultBuilder, data: MRData, fit: dict[str, np.ndarray], model: str, alpha: float, t_dist: bool
) -> None:
    """Write the estimate of a :func:`weighted_fit` with its ``model``'s standard error, inference and rse."""
    with np.errstate(invalid="ignore", divide="ignore"):
        se_fixed = 1.0 / np.sqrt(fit["sxx"])
    scale = np.where(random_effects_mask(model, data.n) & (data.n >= 2), np.maximum(1.0, fit["rse"]), 1.0)
    store_wald(out, fit["estimate"], se_fixed * scale, alpha, t_dist, data.n - 1)
    out["rse"] = fit["rse"]


def store_heterogeneity(out: ResultBuilder, data: MRData, q: np.ndarray) -> None:
    """Write Cochran's ``q`` (NaN below two instruments), its p-value on ``n - 1`` df and I^2."""
    multi = data.n >= 2
    q = np.where(multi, q, np.nan)
    out["q"] = q
    out["q_pvalue"] = chi2_sf(q, data.n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["i2"] = np.where(multi, np.maximum(0.0, (q - (data.n - 1)) / q), np.nan)


def ivw(data: MRData, *, model: str = "default", alpha: float = 0.05, t_dist: bool = False) -> MRResult:
    """IVW estimate per locus.

    Parameters
    ----------
    data : MRData
        Prepared batch (:func:`deepmr_dist.mr._data.prepare`).
    model : {"default", "fixed", "random"}
        ``"default"``: fixed effect when fewer than 4 instruments, else random.
    alpha : float
        1 - confidence level.
    t_dist : bool
        t distribution with ``n - 1`` degrees of freedom for CI and p-value.

    Returns
    -------
    MRResult
        ``q``/``q_pvalue``/``i2`` are Cochran's Q (n - 1 df) and I^2; ``rse`` the
        residual standard error (1 for a single instrument, as the package).
    """
    out = ResultBuilder(data.n, data.fstat())
    fit = weighted_fit(data, data.w, data.n)
    store_fit(out, data, fit, model, alpha, t_dist)
    store_heterogeneity(out, data, fit["rss"])
    out.flag(data.n < 1, "too_few_instruments")
    out.flag(~(fit["sxx"] > 0), "all_bx_zero")
    return out.build()


def penalized_ivw(
    data: MRData,
    *,
    model: str = "default",
    alpha: float = 0.05,
    t_dist: bool = False,
    penalization: float = PENALIZED_IVW_FACTOR,
) -> MRResult:
    """Penalized IVW (``mr_ivw(penalized = TRUE)``) per locus.

    Weights are ``byse^-2 * min(1, penalization * p_j)`` with
    ``p_j = pchisq(bx_j^2 / byse_j^2 * (by_j / bx_j - median(by / bx))^2, 1, lower = FALSE)``.

    Parameters
    ----------
    data : MRData
    model : {"default", "fixed", "random"}
    alpha : float
    t_dist : bool
    penalization : float
        Multiplier of the p-values (package: 100 for first-order weights).

    Returns
    -------
    MRResult
        ``q``, ``q_pvalue`` and ``i2`` are NaN (the package reports none for penalized fits).
    """
    out = ResultBuilder(data.n, data.fstat())
    zero_bx = data.any_zero_bx()
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(data.valid & (data.bx != 0), data.by / np.where(data.bx == 0, 1.0, data.bx), 0.0)
        theta = row_median_select(ratio, data.valid, data.n)
        stat = (data.bx / data.byse) ** 2 * (ratio - theta[:, None]) ** 2
    pen = chi2_1_sf(stat)
    w = data.w * np.minimum(1.0, penalization * pen)
    fit = weighted_fit(data, w, data.n)
    store_fit(out, data, fit, model, alpha, t_dist)
    out.flag(data.n < 1, "too_few_instruments")
    out.flag(zero_bx & data.all_bx_zero(), "all_bx_zero")
    out.flag(zero_bx, "zero_bx")
    return out.build()
