"""Median-based estimators, as ``MendelianRandomization::mr_median``.

Ratio estimates ``theta_j = by_j / bx_j`` are combined by the package's
``weighted.median``: sort, ``p_j = (cumsum(w) - w / 2) / sum(w)``, ``k = #{p_j < 0.5}``,
interpolate linearly between the k-th and (k+1)-th sorted estimates. Weights:

* ``simple_median``: equal weights;
* ``weighted_median``: ``(bx / byse)^2`` (``weighting = "weighted"``, the default);
* ``penalized_weighted_median``: ``(bx / byse)^2 * min(1, 20 * p_j)``, ``p_j`` the
  chi2(1) upper tail of ``(bx / byse)^2 (theta_j - weighted median)^2``.

The standard error is the SD (``ddof = 1``) of the weighted median over parametric
bootstrap replicates ``bx* ~ N(bx, bxse)``, ``by* ~ N(by, byse)`` with the weights
held fixed, as ``weighted.median.boot.se``. Draws come from numpy (not R's RNG) and
are seeded per instrument column (see :func:`deepmr_dist.mr._data.column_normals`).
Needs at least three instruments.
"""

from __future__ import annotations

import numpy as np

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import (
    MRData,
    chi2_1_sf,
    chunk_bounds,
    column_normals,
    run_chunks,
)
from deepmr_dist.mr.inference import store_wald
from deepmr_dist.mr.result import MRResult, ResultBuilder

WEIGHTINGS = ("simple", "weighted", "penalized")
PENALIZED_MEDIAN_FACTOR = 20.0
"""Package multiplier of the penalization p-values in the penalized weighted median."""
BOOT_CHUNK_ELEMENTS = 2_000_000
"""Loci x draws x instruments processed at once in the bootstrap."""


def weighted_median(theta: np.ndarray, weights: np.ndarray, valid: np.ndarray, stable: bool = True) -> np.ndarray:
    """The package's ``weighted.median`` for each row.

    Parameters
    ----------
    theta : numpy.ndarray
        ``(rows, K)`` estimates.
    weights : numpy.ndarray
        ``(rows, K)`` non-negative weights (any value at unused entries).
    valid : numpy.ndarray
        ``(rows, K)`` bool mask of used entries.
    stable : bool
        Stable sort (R's ``order``), which matters only for tied estimates; the
        bootstrap, whose draws have no ties, uses the faster unstable sort.

    Returns
    -------
    numpy.ndarray
        ``(rows,)``; NaN where no interpolation interval exists (all weight on one
        estimate, or no usable entries).
    """
    key = np.where(valid, theta, np.inf)
    n = valid.sum(axis=1)
    w = np.where(valid, weights, 0.0)
    first = w[np.arange(w.shape[0]), np.argmax(valid, axis=1)][:, None]
    if np.all((w == first) | ~valid):
        # equal weights (simple median): the sorted weights are known without an argsort
        ts = np.sort(key, axis=1)
        ws = np.where(np.arange(theta.shape[1])[None, :] < n[:, None], first, 0.0)
    else:
        order = np.argsort(key, axis=1, kind="stable" if stable else None)
        ts = np.take_along_axis(key, order, axis=1) if stable else np.sort(key, axis=1)
        ws = np.take_along_axis(w, order, axis=1)
    total = ws.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cum = (np.cumsum(ws, axis=1) - 0.5 * ws) / total[:, None]
    pos = np.arange(theta.shape[1])[None, :] < n[:, None]
    k = ((cum < 0.5) & pos).sum(axis=1)  # R's k (1-based count)
    ok = (k >= 1) & (k < n) & (total > 0)
    i0 = np.clip(k - 1, 0, theta.shape[1] - 1)[:, None]
    i1 = np.clip(k, 0, theta.shape[1] - 1)[:, None]
    c0 = np.take_along_axis(cum, i0, axis=1)[:, 0]
    c1 = np.take_along_axis(cum, i1, axis=1)[:, 0]
    t0 = np.take_along_axis(ts, i0, axis=1)[:, 0]
    t1 = np.take_along_axis(ts, i1, axis=1)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (0.5 - c0) / (c1 - c0)
        est = t0 + (t1 - t0) * ratio
    return np.where(ok, est, np.nan)


def median_weights(data: MRData, weighting: str, penalization: float = PENALIZED_MEDIAN_FACTOR) -> np.ndarray:
    """Weights of ``mr_median(weighting = ...)`` (zero at unused entries)."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"median weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "simple":
        return np.where(data.valid, 1.0 / np.maximum(data.n, 1)[:, None], 0.0)
    w = np.where(data.valid, (data.bx / data.byse) ** 2, 0.0)
    if weighting == "weighted":
        return w
    theta = _ratio(data)
    wm = weighted_median(theta, w, data.valid)
    with np.errstate(invalid="ignore"):
        penalty = chi2_1_sf(w * (theta - wm[:, None]) ** 2)
    return np.where(data.valid, w * np.minimum(1.0, penalization * penalty), 0.0)


def _ratio(data: MRData) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(data.valid & (data.bx != 0), data.by / np.where(data.bx == 0, 1.0, data.bx), 0.0)


def bootstrap_se(data: MRData, weights: np.ndarray, n_boot: int, seed: int, threads: int = 1) -> np.ndarray:
    """SD over ``n_boot`` parametric bootstrap replicates of the weighted median.

    Parameters
    ----------
    data : MRData
    weights : numpy.ndarray
        ``(n_loci, K)`` fixed weights.
    n_boot : int
        Replicates.
    seed : int
        Seed of the per-column draws.
    threads : int
        Worker threads over chunks of loci.

    Returns
    -------
    numpy.ndarray
        ``(n_loci,)`` bootstrap standard errors.
    """
    n_loci, k = data.bx.shape
    z = column_normals(seed, k, n_boot, 2)  # (2, B, K)
    se = np.full(n_loci, np.nan)

    def work(bounds: tuple[int, int]) -> None:
        lo, hi = bounds
        sl = slice(lo, hi)
        bx = data.bx[sl, None, :] + data.bxse[sl, None, :] * z[0][None]
        by = data.by[sl, None, :] + data.byse[sl, None, :] * z[1][None]
        with np.errstate(invalid="ignore", divide="ignore"):
            theta = by / bx
        m = hi - lo
        valid = np.broadcast_to(data.valid[sl, None, :], (m, n_boot, k)).reshape(m * n_boot, k)
        w = np.broadcast_to(weights[sl, None, :], (m, n_boot, k)).reshape(m * n_boot, k)
        med = weighted_median(theta.reshape(m * n_boot, k), w, valid, stable=False).reshape(m, n_boot)
        se[sl] = np.std(med, axis=1, ddof=1) if n_boot > 1 else np.nan

    run_chunks(work, chunk_bounds(n_loci, BOOT_CHUNK_ELEMENTS // max(1, n_boot * k)), threads)
    return se


def median_estimator(
    data: MRData,
    *,
    weighting: str = "weighted",
    alpha: float = 0.05,
    t_dist: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    penalization: float = PENALIZED_MEDIAN_FACTOR,
    threads: int = 1,
) -> MRResult:
    """Simple, weighted or penalized weighted median estimate per locus.

    Parameters
    ----------
    data : MRData
    weighting : {"simple", "weighted", "penalized"}
    alpha : float
        1 - confidence level.
    t_dist : bool
        t distribution with n - 1 degrees of freedom for CI and p-value.
    n_boot : int
        Bootstrap replicates for the standard error (package default 10000).
    seed : int
        Bootstrap seed.
    penalization : float
        Multiplier of the penalization p-values (package: 20).
    threads : int
        Worker threads for the bootstrap.

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())
    enough = data.n >= 3
    zero_bx = data.any_zero_bx()
    use = enough & ~zero_bx
    w = median_weights(data, weighting, penalization)
    est = weighted_median(_ratio(data), w, data.valid)
    se = np.full(data.n_loci, np.nan)
    if use.any():
        sub = _subset(data, use)
        se[use] = bootstrap_se(sub, w[use], n_boot, seed, threads)
    store_wald(out, est, se, alpha, t_dist, data.n - 1)
    out.flag(~enough, "too_few_instruments")
    out.flag(zero_bx & data.all_bx_zero(), "all_bx_zero")
    out.flag(zero_bx, "zero_bx")
    out.flag(~np.isfinite(est), "degenerate_weights")
    return out.build()


def _subset(data: MRData, rows: np.ndarray) -> MRData:
    return MRData(
        bx=data.bx[rows], bxse=data.bxse[rows], by=data.by[rows], byse=data.byse[rows],
        valid=data.valid[rows], n=data.n[rows],
    )  # fmt: skip
