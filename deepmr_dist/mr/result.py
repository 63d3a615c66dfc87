"""The per-locus result record shared by every MR estimator.

An :class:`MRResult` holds one numpy array of shape ``(n_loci,)`` per field, so a
whole batch of loci is one object. Fields a method does not define (an IVW fit
has no intercept) are NaN; a locus where the estimator itself is undefined has
NaN numbers and a short code in ``reason`` (see :data:`REASONS`). A locus whose
numbers are defined but come with a caveat carries a code in ``note`` (see
:data:`NOTES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deepmr_dist.errors import InputError

if TYPE_CHECKING:  # pandas is imported lazily, only by ``to_frame``
    import pandas as pd

REASONS: dict[str, str] = {
    "too_few_instruments": "fewer usable instruments than the estimator needs",
    "all_bx_zero": "every usable instrument has bx == 0, so the exposure effect carries no information",
    "zero_bx": "some usable instrument has bx == 0, so its ratio estimate by/bx is undefined",
    "singular_fit": "the regression design is rank deficient (e.g. all |bx| equal for MR-Egger)",
    "exact_fit": "the robust fit is exact (scale 0), so its standard errors are undefined",
    "no_convergence": "the iterative robust fit did not converge within its iteration limit",
    "zero_bandwidth": "the ratio estimates are too concentrated for a kernel bandwidth (sd or mad is 0)",
    "degenerate_weights": "the median weights put all mass on one ratio estimate",
    "negative_variance": "the extrapolated (SIMEX jackknife) variance is negative, so the standard error is undefined",
    "degenerate_se": (
        "a used standard error is below 2^-120 (about 7.5e-37) times the largest |b| or SE of its side (exposure or"
        " outcome) at the locus, so the inverse-variance weights overflow float64 in any units"
    ),
    "overflow": (
        "the estimate, its standard error or limits lie beyond the float64 range (about 1.8e308), or a"
        " computation overflowed, even with the inputs rescaled to unit scale"
    ),
    "underflow": (
        "the estimate, its standard error or limits are nonzero but below the float64 range (about 4.9e-324),"
        " so they would read as 0"
    ),
}
"""Reason codes for undefined estimates, code -> human explanation."""

NOTES: dict[str, str] = {
    "sampled_s_start": (
        "the robust fit's S-start searched a fixed sample of elemental subsets (too many to try them all); "
        "robustbase::lmrob searches a random sample there, so its answer depends on its seed and may differ"
    ),
}
"""Codes for caveats on defined estimates, code -> human explanation."""

KEEP_ESTIMATE: frozenset[str] = frozenset({"exact_fit", "negative_variance"})
"""Reason codes where the point estimate is defined but its standard error is not."""

FLOAT_FIELDS: tuple[str, ...] = (
    "estimate",
    "se",
    "ci_lower",
    "ci_upper",
    "pvalue",
    "intercept",
    "intercept_se",
    "intercept_ci_lower",
    "intercept_ci_upper",
    "intercept_pvalue",
    "rse",
    "q",
    "q_pvalue",
    "i2",
    "i2gx",
    "fstat",
)
"""Float fields of :class:`MRResult`, in table order."""

COLUMNS: tuple[str, ...] = ("locus", "method", "n", *FLOAT_FIELDS, "reason", "note")
"""Columns of :meth:`MRResult.to_frame`."""


@dataclass(frozen=True)
class MRResult:
    """Results of one MR estimator for a batch of loci.

    Every field is a numpy array of shape ``(n_loci,)``.

    Attributes
    ----------
    n : numpy.ndarray of int64
        Instruments used at each locus.
    estimate, se, ci_lower, ci_upper, pvalue : numpy.ndarray of float64
        Causal estimate, its standard error, confidence limits and two-sided p-value.
    intercept, intercept_se, intercept_ci_lower, intercept_ci_upper, intercept_pvalue : numpy.ndarray
        MR-Egger intercept (directional pleiotropy) and its inference; NaN for methods without one.
    rse : numpy.ndarray
        Residual standard error (robust scale for MM fits).
    q, q_pvalue : numpy.ndarray
        Heterogeneity statistic and its chi-squared p-value.
    i2 : numpy.ndarray
        I^2 = max(0, (Q - df) / Q) of the IVW fit.
    i2gx : numpy.ndarray
        I^2_GX of the exposure associations (MR-Egger family).
    fstat : numpy.ndarray
        Mean first-stage F statistic, mean(bx^2 / bxse^2).
    reason : numpy.ndarray of object
        ``""`` where the estimate and its standard error are defined, else a code of :data:`REASONS`.
    note : numpy.ndarray of object
        ``""``, or a code of :data:`NOTES` for a caveat on a defined estimate.
    """

    n: np.ndarray
    estimate: np.ndarray
    se: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    pvalue: np.ndarray
    intercept: np.ndarray
    intercept_se: np.ndarray
    intercept_ci_lower: np.ndarray
    intercept_ci_upper: np.ndarray
    intercept_pvalue: np.ndarray
    rse: np.ndarray
    q: np.ndarray
    q_pvalue: np.ndarray
    i2: np.ndarray
    i2gx: np.ndarray
    fstat: np.ndarray
    reason: np.ndarray
    note: np.ndarray

    def __len__(self) -> int:
        return int(self.estimate.shape[0])

    def to_frame(self, method: str, loci: Sequence | None = None) -> pd.DataFrame:
        """One row per locus, columns :data:`COLUMNS`.

        Parameters
        ----------
        method : str
            Written to the ``method`` column.
        loci : sequence, optional
            Locus labels, one per locus; default ``0 .. n_loci - 1``.

        Returns
        -------
        pandas.DataFrame
        """
        import pandas as pd

        n_loci = len(self)
        if loci is None:
            labels = np.arange(n_loci)
        else:
            labels = np.asarray(list(loci), dtype=object)
            if labels.shape[0] != n_loci:
                raise InputError(f"loci has {labels.shape[0]} labels but the result has {n_loci} loci")
        data: dict[str, object] = {"locus": labels, "method": np.full(n_loci, method, dtype=object), "n": self.n}
        for name in FLOAT_FIELDS:
            data[name] = getattr(self, name)
        data["reason"] = self.reason
        data["note"] = self.note
        return pd.DataFrame(data, columns=list(COLUMNS))


class ResultBuilder:
    """Mutable NaN-initialised arrays that become an :class:`MRResult`.

    Parameters
    ----------
    n : numpy.ndarray
        Instruments used per locus; its length sets the number of loci.
    fstat : numpy.ndarray, optional
        Mean F statistic per locus (filled for every method).
    """

    def __init__(self, n: np.ndarray, fstat: np.ndarray | None = None) -> None:
        n_loci = int(np.shape(n)[0])
        self.n = np.asarray(n, dtype=np.int64).copy()
        self.values: dict[str, np.ndarray] = {name: np.full(n_loci, np.nan) for name in FLOAT_FIELDS}
        if fstat is not None:
            self.values["fstat"] = np.asarray(fstat, dtype=np.float64).copy()
        self.reason = np.full(n_loci, "", dtype=object)
        self.note = np.full(n_loci, "", dtype=object)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.values[name][...] = value

    def flag(self, mask: np.ndarray, code: str) -> None:
        """Set ``reason`` to ``code`` where ``mask`` holds and no reason is set yet."""
        if code not in REASONS:  # pragma: no cover - programming error
            raise KeyError(code)
        mask = np.asarray(mask, dtype=bool) & (self.reason == "")
        self.reason[mask] = code

    def annotate(self, mask: np.ndarray, code: str) -> None:
        """Set ``note`` to ``code`` where ``mask`` holds, no reason is set and no note yet (call after :meth:`flag`)."""
        if code not in NOTES:  # pragma: no cover - programming error
            raise KeyError(code)
        mask = np.asarray(mask, dtype=bool) & (self.reason == "") & (self.note == "")
        self.note[mask] = code

    def build(self, blank_flagged: bool = True) -> MRResult:
        """Freeze into an :class:`MRResult`.

        Parameters
        ----------
        blank_flagged : bool
            Set every float field except ``fstat`` to NaN where a reason is set,
            so an undefined locus never carries a stray number. Codes in
            :data:`KEEP_ESTIMATE` keep the point estimates (estimate, intercept,
            rse); their standard errors must already be NaN.
        """
        values = {k: v.copy() for k, v in self.values.items()}
        flagged = self.reason != ""
        keep = np.isin(self.reason, list(KEEP_ESTIMATE))
        if blank_flagged and flagged.any():
            for name, arr in values.items():
                if name == "fstat":
                    continue
                if name in ("estimate", "intercept", "rse"):
                    arr[flagged & ~keep] = np.nan
                else:
                    arr[flagged] = np.nan
        return MRResult(n=self.n.copy(), reason=self.reason.copy(), note=self.note.copy(), **values)
