"""Unit rescaling of MR inputs by powers of two, so that the kernels neither overflow nor underflow.

Every MR estimator is equivariant in the units of the exposure and of the outcome:
dividing ``bx, bxse`` by ``s_x`` and ``by, byse`` by ``s_y`` divides the causal
estimate (and its SE and limits) by ``s_y / s_x`` and the MR-Egger intercept by
``s_y``, and leaves every dimensionless field (p-values, rse, Q, I^2, F) as it is.
The weights ``byse^-2`` and the squares the kernels form overflow long before the
inputs do (values of 1e300 give weights of 1e-600), so :func:`unit_scales` picks,
per locus and side, the power of two ``2^e`` of the largest ``|b|`` or SE,
:func:`rescaled` divides the inputs by it and :func:`unscaled` multiplies the
results back. Powers of two are exact in floating point, so the kernels that use
only relative tolerances give bit-identical results either way; the robust (MM) fits
and ``mr_raps`` stop on absolute tolerances, as robustbase and mr.raps do, and are
equivariant only to those tolerances (at outcome/exposure scales near 1e-10 mr.raps'
tolerances alone move its estimate by more than itself). A locus whose exposure and
outcome magnitudes and their ratio all lie within ``2^+-SAFE_EXPONENT`` is computed as
given (bit-identical to the packages' own conventions); any other is computed at unit scale.

What rescaling cannot fix is dimensionless: a standard error that is tiny next to
the locus's effects (a z-score of 1e300) makes the weights overflow in any unit.
Such loci (:attr:`Scales.degenerate`) get the reason ``degenerate_se``; a result
that lies outside the float64 range once scaled back gets ``overflow`` (beyond about
1.8e308) or ``underflow`` (a nonzero value below about 4.9e-324, which would read as 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from deepmr_dist.mr._data import MRData
from deepmr_dist.mr._input_loops import magnitudes
from deepmr_dist.mr.result import FLOAT_FIELDS, MRResult

SAFE_EXPONENT = 16
"""Loci whose largest exposure and outcome magnitudes (|b| or SE) and their ratio lie within ``2^+-16``
(about 1.5e-5 to 6.6e4) are computed unscaled."""

MIN_SE_EXPONENT = -120
"""A used SE below ``2^-120`` (about 7.5e-37) times its side's largest |b| or SE is degenerate: the weights'
squares and fourth powers that the kernels form would overflow."""

RATIO_FIELDS: tuple[str, ...] = ("estimate", "se", "ci_lower", "ci_upper")
"""Fields in units of outcome per exposure: scaled by ``s_y / s_x``."""
OUTCOME_FIELDS: tuple[str, ...] = ("intercept", "intercept_se", "intercept_ci_lower", "intercept_ci_upper")
"""Fields in units of the outcome (the MR-Egger intercept): scaled by ``s_y``."""


@dataclass(frozen=True)
class Scales:
    """Per-locus power-of-two exponents of the exposure and outcome sides.

    Attributes
    ----------
    ex, ey : numpy.ndarray of int64
        ``(n_loci,)``: ``bx, bxse`` are divided by ``2^ex`` and ``by, byse`` by ``2^ey``.
    degenerate : numpy.ndarray of bool
        ``(n_loci,)``: some used SE is below ``2^MIN_SE_EXPONENT`` times its side's largest magnitude.
    """

    ex: np.ndarray
    ey: np.ndarray
    degenerate: np.ndarray

    @property
    def identity(self) -> bool:
        """True when no locus is rescaled."""
        return not (self.ex.any() or self.ey.any())


def _side(b: np.ndarray, se: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponent ``e`` of one side's largest |b| or SE per locus, and whether its smallest SE is degenerate."""
    magnitude, smallest = magnitudes(b, se, valid)
    _, exponent = np.frexp(magnitude)  # magnitude = m 2^e, 0.5 <= m < 1 (e = 0 for 0)
    degenerate = smallest < np.ldexp(magnitude, MIN_SE_EXPONENT)
    return exponent.astype(np.int64), degenerate


def unit_scales(data: MRData) -> Scales:
    """The exponents that bring each locus's largest exposure and outcome magnitudes to about 1 (0 where safe)."""
    ex, dx = _side(data.bx, data.bxse, data.valid)
    ey, dy = _side(data.by, data.byse, data.valid)
    safe = (np.abs(ex) <= SAFE_EXPONENT) & (np.abs(ey) <= SAFE_EXPONENT) & (np.abs(ey - ex) <= SAFE_EXPONENT)
    return Scales(ex=np.where(safe, 0, ex), ey=np.where(safe, 0, ey), degenerate=dx | dy)


def rescaled(data: MRData, scales: Scales) -> MRData:
    """``data`` with ``bx, bxse`` divided by ``2^ex`` and ``by, byse`` by ``2^ey`` (exact; unused entries stay 0 and 1)."""
    if scales.identity:
        return data
    ex, ey = -scales.ex[:, None], -scales.ey[:, None]
    valid = data.valid
    return replace(
        data,
        bx=np.ldexp(data.bx, ex),
        bxse=np.where(valid, np.ldexp(data.bxse, ex), 1.0),
        by=np.ldexp(data.by, ey),
        byse=np.where(valid, np.ldexp(data.byse, ey), 1.0),
    )


def unscaled(result: MRResult, scales: Scales) -> tuple[MRResult, np.ndarray, np.ndarray]:
    """``result`` in the caller's units, and where a scaled-back value left the float64 range.

    Returns
    -------
    result : MRResult
        Ratio fields times ``2^(ey - ex)``, intercept fields times ``2^ey``, the rest unchanged.
    overflow, underflow : numpy.ndarray of bool
        ``(n_loci,)``: a finite field became infinite; a finite nonzero field became 0.
    """
    overflow = np.zeros(len(result), dtype=bool)
    underflow = np.zeros(len(result), dtype=bool)
    if scales.identity:
        return result, overflow, underflow
    changes = {}
    for fields, exponent in ((RATIO_FIELDS, scales.ey - scales.ex), (OUTCOME_FIELDS, scales.ey)):
        for name in fields:
            value = getattr(result, name)
            with np.errstate(over="ignore", under="ignore"):
                back = np.ldexp(value, exponent)
            finite = np.isfinite(value)
            overflow |= finite & ~np.isfinite(back)
            underflow |= finite & (value != 0) & (back == 0)
            changes[name] = back
    return replace(result, **changes), overflow, underflow


def flag(result: MRResult, mask: np.ndarray, code: str) -> MRResult:
    """``result`` with ``reason = code`` where ``mask`` holds and no reason is set, those loci's numbers NaN.

    Every float field except ``fstat`` is blanked, as :meth:`deepmr_dist.mr.result.ResultBuilder.build`
    does for a reason set by a kernel.
    """
    mask = np.asarray(mask, dtype=bool) & (result.reason == "")
    if not mask.any():
        return result
    reason = result.reason.copy()
    reason[mask] = code
    blanked = {name: np.where(mask, np.nan, getattr(result, name)) for name in FLOAT_FIELDS if name != "fstat"}
    note = np.where(mask, "", result.note).astype(object)
    return replace(result, reason=reason, note=note, **blanked)
