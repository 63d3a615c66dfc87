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
from itertools import pairwise

import numpy as np
from scipy import special, stats

from deepmr_dist.errors import InputError
from deepmr_dist.mr._input_loops import sum_squared_ratio, valid_mask


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
        f = sum_squared_ratio(self.bx, self.bxse)  # unused entries add 0 / 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, f / np.maximum(self.n, 1), np.nan)

    def any_zero_bx(self) -> np.ndarray:
        """True where some used instrument has bx == 0 (its ratio by/bx is undefined)."""
        return (self.valid & (self.bx == 0)).any(axis=1)

    def all_bx_zero(self) -> np.ndarray:
        """True where no used instrument has bx != 0 (also where none is used)."""
        return ~(self.valid & (self.bx != 0)).any(axis=1)


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
    valid, n = valid_mask(arrays["bx"], arrays["bxse"], arrays["by"], arrays["byse"])
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


def chi2_sf(q: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Upper chi-squared tail ``pchisq(q, df, lower.tail = FALSE)``; NaN where df < 1."""
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df >= 1, stats.chi2.sf(q, np.maximum(df, 1)), np.nan)


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


def median_inplace(values: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of the ``n[i]`` smallest entries of each row, partitioning ``values`` in place.

    Unused entries must hold ``+inf`` (they sort last). When every row has the same
    ``n`` this is one single-pivot ``partition`` plus a minimum over the upper part
    (numpy's multi-pivot partition is several times slower); ragged rows are
    sorted. Rows with ``n == 0`` give NaN.

    Parameters
    ----------
    values : numpy.ndarray
        ``(rows, K)`` float array, overwritten.
    n : numpy.ndarray
        ``(rows,)`` number of used entries per row.

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` medians.
    """
    n = np.asarray(n, dtype=np.int64)
    width = values.shape[1]
    if width == 0:
        return np.full(n.shape, np.nan)
    k_lo = np.clip((n - 1) // 2, 0, width - 1)
    k_hi = np.clip(n // 2, 0, width - 1)
    pivots = np.unique(k_lo)
    if pivots.size == 1:
        k = int(pivots[0])
        values.partition(k, axis=1)
        lo = values[:, k]
        hi = values[:, k + 1 :].min(axis=1) if k + 1 < width else lo
        hi = np.where(k_hi > k_lo, hi, lo)
    else:
        values.sort(axis=1)
        lo = np.take_along_axis(values, k_lo[:, None], axis=1)[:, 0]
        hi = np.take_along_axis(values, k_hi[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def row_median_select(values: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of each row over its used entries, by selection (see :func:`median_inplace`).

    Unused entries must be excluded by ``valid``; rows with ``n == 0`` give NaN.
    """
    return median_inplace(np.where(valid, values, np.inf), n)


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
    """``[(lo, hi), ...]`` covering ``range(n_rows)`` in balanced chunks of at most ``rows_per_chunk``."""
    count = -(-n_rows // max(1, int(rows_per_chunk)))
    edges = [(i * n_rows) // count for i in range(count + 1)] if count else [0]
    return list(pairwise(edges))


def chi2_1_sf(x: np.ndarray) -> np.ndarray:
    """Upper tail of chi-squared with 1 df, ``pchisq(x, 1, lower.tail = FALSE) = erfc(sqrt(x / 2))``."""
    return special.erfc(np.sqrt(0.5 * np.asarray(x, dtype=np.float64)))
