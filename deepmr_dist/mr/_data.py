"""Input preparation and small statistical helpers shared by the MR kernels.

Inputs are ``(n_loci, max_k)`` arrays padded with NaN. An instrument is used iff
all four of ``bx, bxse, by, byse`` are finite and both standard errors are
positive. :class:`MRData` keeps the arrays with unused entries replaced by
harmless values (``bx = by = 0``, ``bxse = byse = 1``) plus the mask ``valid``,
so kernels can run dense array code over the whole batch and mask sums. A batch
without unused entries keeps the caller's arrays (kernels never write to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import special, stats

from deepmr_dist.errors import InputError


@dataclass(frozen=True)
class MRData:
    """A prepared batch of loci.

    Attributes
    ----------
    bx, bxse, by, byse : numpy.ndarray
        ``(n_loci, max_k)`` float64; unused entries hold 0, 1, 0, 1.
    valid : numpy.ndarray
        ``(n_loci, max_k)`` bool, True where the instrument is used.
    n : numpy.ndarray
        ``(n_loci,)`` int64, instruments used per locus.
    """

    bx: np.ndarray
    bxse: np.ndarray
    by: np.ndarray
    byse: np.ndarray
    valid: np.ndarray
    n: np.ndarray

    @property
    def n_loci(self) -> int:
        """Number of loci in the batch."""
        return int(self.bx.shape[0])

    @cached_property
    def w(self) -> np.ndarray:
        """First-order IVW weights ``byse^-2`` (0 at unused entries)."""
        return self.valid / (self.byse * self.byse)

    def fstat(self) -> np.ndarray:
        """Mean first-stage F statistic per locus, mean(bx^2 / bxse^2); NaN without instruments."""
        t = self.bx / self.bxse  # 0 at unused entries
        f = np.einsum("ij,ij->i", t, t)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, f / np.maximum(self.n, 1), np.nan)

    def any_zero_bx(self) -> np.ndarray:
        """True where some used instrument has bx == 0 (its ratio by/bx is undefined)."""
        return (self.valid & (self.bx == 0)).any(axis=1)


def prepare(bx: np.ndarray, bxse: np.ndarray, by: np.ndarray, byse: np.ndarray) -> MRData:
    """Validate the four input arrays and build an :class:`MRData`.

    Parameters
    ----------
    bx, bxse, by, byse : array_like
        Shape ``(n_loci, max_k)`` (a 1-D array is one locus). NaN marks padding.

    Returns
    -------
    MRData

    Raises
    ------
    InputError
        If the arrays are not numeric, not 1-D/2-D, or differ in shape.
    """
    arrays = {}
    for name, value in (("bx", bx), ("bxse", bxse), ("by", by), ("byse", byse)):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be a numeric array: {exc}") from None
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise InputError(f"{name} must have shape (n_loci, max_k), got {arr.ndim} dimensions {arr.shape}")
        arrays[name] = arr
    shape = arrays["bx"].shape
    for name, arr in arrays.items():
        if arr.shape != shape:
            raise InputError(f"{name} has shape {arr.shape} but bx has shape {shape}; all four must match")
    valid = np.isfinite(arrays["bx"]) & np.isfinite(arrays["by"])
    with np.errstate(invalid="ignore"):
        # a positive, finite standard error: NaN compares False, +inf is excluded explicitly
        valid &= (arrays["bxse"] > 0) & (arrays["bxse"] < np.inf) & (arrays["byse"] > 0) & (arrays["byse"] < np.inf)
    n = valid.sum(axis=1).astype(np.int64)
    if valid.all():  # dense batch: nothing to replace, no copies
        return MRData(valid=valid, n=n, **arrays)
    return MRData(
        bx=np.where(valid, arrays["bx"], 0.0),
        bxse=np.where(valid, arrays["bxse"], 1.0),
        by=np.where(valid, arrays["by"], 0.0),
        byse=np.where(valid, arrays["byse"], 1.0),
        valid=valid,
        n=n,
    )


def masked_sum(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row sums over used instruments only."""
    return np.where(valid, values, 0.0).sum(axis=1)


def z_quantile(alpha: float) -> float:
    """Two-sided normal critical value ``qnorm(1 - alpha / 2)``."""
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def t_quantile(alpha: float, df: np.ndarray) -> np.ndarray:
    """Two-sided t critical value ``qt(1 - alpha / 2, df)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df >= 1, stats.t.ppf(1.0 - alpha / 2.0, np.maximum(df, 1)), np.nan)


def normal_p(estimate: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Two-sided normal p-value ``2 * pnorm(-|estimate / se|)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * stats.norm.sf(np.abs(estimate / se))


def t_p(estimate: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided t p-value ``2 * pt(-|estimate / se|, df)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(df >= 1, 2.0 * stats.t.sf(np.abs(estimate / se), np.maximum(df, 1)), np.nan)


def chi2_sf(q: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Upper chi-squared tail ``pchisq(q, df, lower.tail = FALSE)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df >= 1, stats.chi2.sf(q, np.maximum(df, 1)), np.nan)


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


def column_normals(seed: int, n_cols: int, n_draws: int, n_streams: int) -> np.ndarray:
    """Standard normal draws with one independent stream per instrument column.

    Draws for column ``j`` come from ``numpy.random.Generator(PCG64(SeedSequence([seed, j])))``,
    so an instrument gets the same draws whatever the batch size or padding width
    (a locus computed alone equals the same locus inside a batch).

    Parameters
    ----------
    seed : int
        Base seed.
    n_cols : int
        Number of instrument columns.
    n_draws : int
        Bootstrap replicates.
    n_streams : int
        Independent normals per (draw, column), e.g. 2 for (bx, by).

    Returns
    -------
    numpy.ndarray
        Shape ``(n_streams, n_draws, n_cols)``.
    """
    if n_draws < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_draws}")
    out = np.empty((n_streams, n_draws, n_cols))
    for j in range(n_cols):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), j])))
        out[:, :, j] = rng.standard_normal((n_streams, n_draws))
    return out


def mad(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """R's ``mad``: 1.4826 * median(|x - median(x)|) along ``axis`` (no NaN allowed)."""
    center = np.median(x, axis=axis, keepdims=True)
    return 1.4826 * np.median(np.abs(x - center), axis=axis)


def row_kth(values: np.ndarray, *ks: np.ndarray) -> list[np.ndarray]:
    """The ``k[i]``-th smallest entries (0-based) of each row, for each index array in ``ks``.

    Uses one ``numpy.partition`` on the distinct indices (a full sort when there
    are many), so it is linear time for batches of equal-sized loci.
    """
    width = values.shape[1]
    ks = [np.clip(np.asarray(k, dtype=np.int64), 0, width - 1) for k in ks]
    uniq = np.unique(np.concatenate(ks))
    part = np.partition(values, uniq, axis=1) if uniq.size <= 8 else np.sort(values, axis=1)
    return [np.take_along_axis(part, k[:, None], axis=1)[:, 0] for k in ks]


def row_median_select(values: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of each row over its used entries, by selection (see :func:`row_kth`).

    Unused entries must be excluded by ``valid``; rows with ``n == 0`` give NaN.
    """
    n = np.asarray(n, dtype=np.int64)
    padded = np.where(valid, values, np.inf)
    lo, hi = row_kth(padded, (n - 1) // 2, n // 2)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def run_chunks(work, bounds: list[tuple[int, int]], threads: int = 1) -> None:
    """Call ``work((lo, hi))`` for every chunk, on ``threads`` worker threads when > 1.

    The kernels spend their time in numpy/scipy calls that release the GIL, so
    threads over independent chunks of loci use several cores.
    """
    if threads > 1 and len(bounds) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(work, bounds):
                pass
    else:
        for b in bounds:
            work(b)


def chunk_bounds(n_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering ``range(n_rows)`` in chunks of ``rows_per_chunk``."""
    step = max(1, int(rows_per_chunk))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def chi2_1_sf(x: np.ndarray) -> np.ndarray:
    """Upper tail of chi-squared with 1 df, ``pchisq(x, 1, lower.tail = FALSE) = erfc(sqrt(x / 2))``."""
    return special.erfc(np.sqrt(0.5 * np.asarray(x, dtype=np.float64)))
