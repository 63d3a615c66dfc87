"""IVW with second-order weights, as ``MendelianRandomization::mr_ivw(weights = "delta", psi = 0)``.

The package fits ``lm(By ~ Bx - 1, weights = w)`` with the delta-method weights
(first two terms of the variance of the ratio ``by / bx``, times ``bx^2``)::

    w_j = (byse_j^2 + by_j^2 bxse_j^2 / bx_j^2)^-1
    estimate = sum(w bx by) / sum(w bx^2)
    sigma = sqrt(sum(w (by - estimate bx)^2) / (m - 1))      (lm's residual standard error)
    se_fixed = coef_se / sigma = 1 / sqrt(sum(w bx^2))
    se_random = coef_se / min(1, sigma) = se_fixed * max(1, sigma)

``model="default"`` is the fixed-effect model below four instruments and the
multiplicative random-effects model otherwise (as :func:`deepmr_dist.mr.ivw.ivw`).
The heterogeneity statistic is the package's ``Q = (n - 1) sigma^2`` on ``n - 1``
degrees of freedom, ``rse = sigma``, and ``I^2 = max(0, (Q - (n - 1)) / Q)``.
A single instrument gives the ratio ``by / bx`` with standard error
``sqrt(byse^2 / bx^2 + by^2 bxse^2 / bx^4)`` (equal to ``se_fixed``) and ``rse = 1``.

Instruments with ``bx = 0`` get weight 0 (``by != 0``: ``1 / Inf``) or an NA
weight (``by = 0``: ``0 / 0``), which ``lm`` drops; either way they leave the fit,
and ``m`` above counts only the instruments with ``bx != 0``. The package still
takes ``n`` (every instrument) for the model rule, the Q multiplier and the
degrees of freedom, which is kept here. Where ``n >= 2`` but a single instrument
has ``bx != 0``, lm has no residual degrees of freedom and the package's standard
error is NaN: the locus is flagged ``zero_bx``; where no instrument has
``bx != 0`` it is ``all_bx_zero``.

Degenerate case: with an exact fit (sigma = 0) the package divides 0 by 0; here
the standard error is its limit ``se_fixed`` (as :mod:`deepmr_dist.mr.ivw`).

References
----------
Burgess S, Bowden J (2015). Integrating summarized data from multiple genetic
variants in Mendelian randomization: bias and coverage properties of
inverse-variance weighted methods. arXiv:1512.04486 (first- versus second-order weights).
Yavorska OO, Burgess S (2017). MendelianRandomization: an R package for performing
Mendelian randomization analyses using summarized data. Int J Epidemiol 46:1734-1739.
"""

from __future__ import annotations

import numpy as np

from deepmr_dist.mr._data import MRData
from deepmr_dist.mr.ivw import store_fit, store_heterogeneity, weighted_fit
from deepmr_dist.mr.result import MRResult, ResultBuilder


def delta_weights(data: MRData) -> np.ndarray:
    """Second-order weights ``(byse^2 + by^2 bxse^2 / bx^2)^-1``; 0 where ``bx == 0`` or unused."""
    informative = data.valid & (data.bx != 0)
    bx = np.where(informative, data.bx, 1.0)
    w = 1.0 / (data.byse * data.byse + (data.by * data.bxse / bx) ** 2)
    return np.where(informative, w, 0.0)


def ivw_delta(data: MRData, *, model: str = "default", alpha: float = 0.05, t_dist: bool = False) -> MRResult:
    """IVW estimate with second-order (delta) weights per locus.

    Parameters
    ----------
    data, model, alpha, t_dist
        As :func:`deepmr_dist.mr.ivw.ivw`.

    Returns
    -------
    MRResult
        ``rse`` is lm's residual standard error (1 for a single instrument),
        ``q``/``q_pvalue`` the package's ``(n - 1) rse^2`` on ``n - 1`` df and
        ``i2`` its I^2; undefined loci carry ``too_few_instruments`` (none used),
        ``all_bx_zero`` or ``zero_bx`` (one instrument with ``bx != 0`` among several).

    Raises
    ------
    InputError
        If ``model`` is unknown.
    """
    out = ResultBuilder(data.n, data.fstat())
    w = delta_weights(data)
    m = (w > 0).sum(axis=1)
    fit = weighted_fit(data, w, m)
    store_fit(out, data, fit, model, alpha, t_dist)
    store_heterogeneity(out, data, (data.n - 1) * fit["rse"] * fit["rse"])
    out.flag(data.n < 1, "too_few_instruments")
    out.flag(~(fit["sxx"] > 0), "all_bx_zero")
    out.flag((data.n >= 2) & (m < 2), "zero_bx")
    return out.build()
