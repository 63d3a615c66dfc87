"""Mode-based estimate (Hartwig et al. 2017), as ``MendelianRandomization::mr_mbe``.

Package defaults: ``weighting = "weighted"``, ``stderror = "delta"``, ``phi = 1``.
Ratio estimates ``b_j = by_j / bx_j`` with delta standard errors
``se_j = sqrt(byse^2 / bx^2 + by^2 bxse^2 / bx^4)``; the estimate is the
maximiser of R's ``density(b, weights = se^-2 / sum(se^-2), bw = h)`` on its
512-point grid, ``h = phi * 0.9 * min(sd(b), mad(b)) / n^(1/5)``.

R's ``density`` is reproduced exactly: linear binning of the weighted points onto
512 bins over ``[from - 4h, to + 4h]`` (``from/to = min/max -+ 3h``), circular
convolution (FFT, length 1024) with the Gaussian kernel sampled on R's kernel grid
``seq(0, 2 (up - lo), length.out = 1024)``, linear interpolation onto
``seq(from, to, length.out = 512)`` (the grid of R < 4.4, ``old.coords = TRUE``).
The standard error is ``mad`` of the estimate over parametric bootstrap replicates
``b* ~ N(b, se)`` (weights held at ``se^-2``).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from deepmr_dist.mr._data import (
    MRData,
    chunk_bounds,
    column_normals,
    mad,
    row_median_select,
    run_chunks,
)
from deepmr_dist.mr.inference import store_wald
from deepmr_dist.mr.result import MRResult, ResultBuilder

N_GRID = 512
"""R's ``density(n = 512)``."""
CUT = 3.0
"""R's ``density(cut = 3)``."""
BOOT_CHUNK_ELEMENTS = 2_000_000
"""Bootstrap draws x instruments generated at once (bounds memory)."""
DENSITY_CHUNK_ROWS = 256
"""Densities evaluated at once (keeps the FFT work in cache)."""
_J = np.arange(2 * N_GRID, dtype=np.float64)
_HALF_D2 = -0.5 * np.where(_J <= N_GRID, _J, 2 * N_GRID - _J) ** 2
"""-d^2 / 2 for R's mirrored kernel index d (0, 1, ..., n, n - 1, ..., 1)."""
_GRID = np.arange(N_GRID, dtype=np.float64)


def _sd(x: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, x, 0.0).sum(axis=1) / n
        dev = np.where(valid, x - mean[:, None], 0.0)
        return np.sqrt((dev * dev).sum(axis=1) / (n - 1))


def _mad_rows(x: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    med = row_median_select(x, valid, n)
    return 1.4826 * row_median_select(np.abs(x - med[:, None]), valid, n)


def bandwidth(b: np.ndarray, valid: np.ndarray, phi: float = 1.0) -> np.ndarray:
    """``phi * 0.9 * min(sd, mad) / n^(1/5)`` per row (``mbe_est``)."""
    n = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return phi * 0.9 * np.minimum(_sd(b, valid, n), _mad_rows(b, valid, n)) / n ** 0.2


def density_mode(b: np.ndarray, w: np.ndarray, valid: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """Grid maximiser of R's ``density(b, weights = w, bw = bw)`` for each row.

    Parameters
    ----------
    b : numpy.ndarray
        ``(rows, K)`` points.
    w : numpy.ndarray
        ``(rows, K)`` weights summing to 1 over used entries.
    valid : numpy.ndarray
        ``(rows, K)`` used entries.
    bw : numpy.ndarray
        ``(rows,)`` bandwidths; rows with a non-positive or non-finite bandwidth give NaN.

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` the first grid point of maximal density.
    """
    rows = b.shape[0]
    out = np.full(rows, np.nan)
    for lo in range(0, rows, DENSITY_CHUNK_ROWS):
        hi = min(lo + DENSITY_CHUNK_ROWS, rows)
        out[lo:hi] = _density_mode(b[lo:hi], w[lo:hi], valid[lo:hi], bw[lo:hi])
    return out


def _density_mode(b: np.ndarray, w: np.ndarray, valid: np.ndarray, bw: np.ndarray) -> np.ndarray:
    rows = b.shape[0]
    n = N_GRID
    ok = np.isfinite(bw) & (bw > 0) & valid.any(axis=1)
    bw_s = np.where(ok, bw, 1.0)
    xmin = np.where(ok, np.where(valid, b, np.inf).min(axis=1), 0.0)
    xmax = np.where(ok, np.where(valid, b, -np.inf).max(axis=1), 0.0)
    frm = xmin - CUT * bw_s
    to = xmax + CUT * bw_s
    lo = frm - 4.0 * bw_s
    up = to + 4.0 * bw_s
    # BinDist: linear binning of the weights onto n points (y has length 2n)
    xdelta = (up - lo) / (n - 1)
    xpos = (np.where(valid, b, lo[:, None]) - lo[:, None]) / xdelta[:, None]
    ix = np.floor(xpos)
    fx = xpos - ix
    ixi = ix.astype(np.int64)
    wv = np.where(valid & (ixi >= 0) & (ixi <= n - 2), w, 0.0)
    idx = (np.clip(ixi, 0, n - 2) + (np.arange(rows) * (2 * n))[:, None]).ravel()
    y = np.bincount(
        np.concatenate([idx, idx + 1]),
        weights=np.concatenate([(wv * (1.0 - fx)).ravel(), (wv * fx).ravel()]),
        minlength=rows * 2 * n,
    ).reshape(rows, 2 * n)
    # Gaussian kernel on R's grid kords = seq(0, 2 (up - lo), length.out = 2n), mirrored.
    # Its circular DFT is real (symmetric kernel); the constant 1 / (sqrt(2 pi) bw) does
    # not move the maximum and is left out.
    gamma = (2.0 * (up - lo) / (2 * n - 1)) / bw_s
    spec = _kernel_spectrum(gamma)
    conv = scipy.fft.irfft(scipy.fft.rfft(y, axis=1) * spec, n=2 * n, axis=1)[:, :n]
    np.maximum(conv, 0.0, out=conv)
    # approx(xords, conv, x) with xords = seq(lo, up, n) and x = seq(from, to, n)
    pos = 4.0 * bw_s[:, None] / xdelta[:, None] + _GRID[None, :] * ((to - frm) / (up - lo))[:, None]
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
    frac = pos - i0
    flat = (i0 + (np.arange(rows) * n)[:, None]).ravel()
    cv = conv.ravel()
    d0 = cv[flat].reshape(rows, n)
    d1 = cv[flat + 1].reshape(rows, n)
    yg = d0 + (d1 - d0) * frac
    best = np.argmax(yg, axis=1)
    mode = frm + best * ((to - frm) / (n - 1))
    mode = np.where(best == n - 1, to, mode)
    return np.where(ok, mode, np.nan)


def _kernel_spectrum(gamma: np.ndarray) -> np.ndarray:
    """Real DFT (length 2n) of ``exp(-(gamma d)^2 / 2)`` at R's mirrored kernel indices d.

    For ``gamma < 0.5`` the Poisson summation formula with the two leading aliases,
    ``sqrt(2 pi) / gamma * (exp(-a f^2) + exp(-a (N - f)^2))``, ``a = 2 pi^2 / (gamma N)^2``,
    equals the DFT to double precision (the dropped aliases are below exp(-79), the
    circular truncation below exp(-98)); the constant factor is dropped. Wider
    spacings use the FFT of the sampled kernel.
    """
    big_n = 2 * N_GRID
    f = np.arange(N_GRID + 1, dtype=np.float64)
    out = np.empty((gamma.shape[0], N_GRID + 1))
    small = gamma < 0.5
    if small.any():
        a = (2.0 * np.pi**2 / (gamma[small] * big_n) ** 2)[:, None]
        # arguments below -700 are clipped: exp(-700) is far below double precision
        # relative to the leading term, and the clip avoids the slow denormal path
        out[small] = np.exp(np.maximum(-a * f[None, :] ** 2, -700.0))
        out[small] += np.exp(np.maximum(-a * (big_n - f)[None, :] ** 2, -700.0))
        out[small] /= out[small, :1]
    if (~small).any():
        g = gamma[~small]
        kern = np.exp(np.maximum(_HALF_D2[None, :] * (g * g)[:, None], -700.0))
        out[~small] = scipy.fft.rfft(kern, axis=1).real
    return out


def ratio_and_delta_se(data: MRData) -> tuple[np.ndarray, np.ndarray]:
    """Ratio estimates ``by / bx`` and their delta standard errors (0 at unused or bx == 0 entries)."""
    use = data.valid & (data.bx != 0)
    bx = np.where(use, data.bx, 1.0)
    b = np.where(use, data.by / bx, 0.0)
    se = np.where(use, np.sqrt(data.byse**2 / bx**2 + data.by**2 * data.bxse**2 / bx**4), 1.0)
    return b, se


def mbe(
    data: MRData,
    *,
    alpha: float = 0.05,
    t_dist: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    phi: float = 1.0,
    threads: int = 1,
) -> MRResult:
    """Weighted mode-based estimate per locus (delta standard errors).

    Parameters
    ----------
    data : MRData
    alpha : float
        1 - confidence level.
    t_dist : bool
        t distribution with n - 1 degrees of freedom.
    n_boot : int
        Bootstrap replicates (package default 10000).
    seed : int
        Bootstrap seed.
    phi : float
        Bandwidth multiplier.
    threads : int
        Worker threads for the bootstrap.

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())
    enough = data.n >= 2
    zero_bx = data.any_zero_bx()
    b, se_b = ratio_and_delta_se(data)
    prec = data.valid / (se_b * se_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = prec / prec.sum(axis=1, keepdims=True)
    bw = bandwidth(b, data.valid, phi)
    use = enough & ~zero_bx & np.isfinite(bw) & (bw > 0)
    est = np.full(data.n_loci, np.nan)
    se = np.full(data.n_loci, np.nan)
    if use.any():
        est[use] = density_mode(b[use], w[use], data.valid[use], bw[use])
        se[use] = _bootstrap_mad(b[use], se_b[use], w[use], data.valid[use], n_boot, seed, phi, threads)
    store_wald(out, est, se, alpha, t_dist, data.n - 1)
    out.flag(~enough, "too_few_instruments")
    out.flag(zero_bx & data.all_bx_zero(), "all_bx_zero")
    out.flag(zero_bx, "zero_bx")
    out.flag(~(np.isfinite(bw) & (bw > 0)) | ~np.isfinite(se), "zero_bandwidth")
    return out.build()


def _bootstrap_mad(
    b: np.ndarray, se_b: np.ndarray, w: np.ndarray, valid: np.ndarray, n_boot: int, seed: int, phi: float,
    threads: int = 1,
) -> np.ndarray:
    """``mad`` over bootstrap replicates ``b* ~ N(b, se)`` of the mode-based estimate."""
    rows, k = b.shape
    z = column_normals(seed, k, n_boot, 1)[0]  # (B, K)
    out = np.full(rows, np.nan)

    def work(bounds: tuple[int, int]) -> None:
        lo, hi = bounds
        m = hi - lo
        draws = (b[lo:hi, None, :] + se_b[lo:hi, None, :] * z[None]).reshape(m * n_boot, k)
        vb = np.broadcast_to(valid[lo:hi, None, :], (m, n_boot, k)).reshape(m * n_boot, k)
        wb = np.broadcast_to(w[lo:hi, None, :], (m, n_boot, k)).reshape(m * n_boot, k)
        bw = bandwidth(draws, vb, phi)
        modes = density_mode(draws, wb, vb, bw).reshape(m, n_boot)
        out[lo:hi] = mad(modes, axis=1)

    run_chunks(work, chunk_bounds(rows, BOOT_CHUNK_ELEMENTS // max(1, n_boot * k)), threads)
    return out
