"""The DeepMR paper's baseline: the mean of the Wald ratios.

Per locus ``estimate = mean(by_j / bx_j)`` over the instruments and ``se = SD`` of
those ratios (``ddof = 1``). The SD describes the spread of the instrument-level
ratios, not the uncertainty of their mean (that would be ``SD / sqrt(n)``); the
paper judged coverage with ``estimate +- 2 SD``. ``ci_lower``/``ci_upper`` here are
``estimate -+ z_(1 - alpha/2) * SD`` (or ``-+ ci_multiplier * SD`` when given, e.g.
2 for the paper's interval), and the p-value is the normal one of ``estimate / SD``.
"""

from __future__ import annotations

import numpy as np

from deepmr_dist.mr._data import MRData
from deepmr_dist.mr.inference import store_wald
from deepmr_dist.mr.result import MRResult, ResultBuilder


def wald_mean(
    data: MRData, *, alpha: float = 0.05, ci_multiplier: float | None = None, ddof: int = 1
) -> MRResult:
    """Mean Wald ratio per locus with the SD of the ratios as ``se``.

    Parameters
    ----------
    data : MRData
    alpha : float
        1 - confidence level of the normal interval.
    ci_multiplier : float, optional
        Interval half-width in SDs instead of the normal quantile (2 reproduces the paper).
    ddof : int
        Delta degrees of freedom of the SD.

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())
    zero_bx = data.any_zero_bx()
    with np.errstate(invalid="ignore", divide="ignore"):
        if data.valid.all():  # dense batch: rows with a zero bx are flagged below
            ratio = data.by / data.bx
            mean = ratio.mean(axis=1)
            sd = ratio.std(axis=1, ddof=ddof) if data.bx.shape[1] > ddof else np.full(data.n_loci, np.nan)
        else:
            use = data.valid & (data.bx != 0)
            ratio = np.where(use, data.by / np.where(data.bx == 0, 1.0, data.bx), 0.0)
            mean = ratio.sum(axis=1) / data.n
            dev = np.where(use, ratio - mean[:, None], 0.0)
            sd = np.sqrt(np.einsum("ij,ij->i", dev, dev) / (data.n - ddof))
    half_width = None if ci_multiplier is None else float(ci_multiplier)
    store_wald(out, mean, sd, alpha, False, data.n - 1, half_width=half_width)
    out.flag(data.n < max(2, ddof + 1), "too_few_instruments")
    out.flag(zero_bx & data.all_bx_zero(), "all_bx_zero")
    out.flag(zero_bx, "zero_bx")
    return out.build()
