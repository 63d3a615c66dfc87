"""MR-Egger with SIMEX correction for regression dilution (Bowden et al. 2016).

MR-Egger's slope is diluted toward zero by the measurement error in ``bx``; the
attenuation factor is about ``I^2_GX`` (:func:`deepmr_dist.mr.egger.i2_gx`), and
Bowden et al. recommend a SIMEX correction when ``I^2_GX < 0.9``. The method is
their appendix code, ``simex(lm(by ~ bx, weights = byse^-2), B = 1000,
measurement.error = bxse, SIMEXvariable = "bx", fitting.method = "quad",
asymptotic = FALSE)`` on oriented data, with the simex package's (1.8) algorithm:

1. Orient every instrument so that ``bx > 0`` (``by <- sign(bx) by``, ``bx <- |bx|``,
   as MR-Egger) and fit the naive weighted regression ``by ~ 1 + bx``, weights
   ``byse^-2``: coefficients ``theta_0`` and ``lm``'s covariance
   ``V_0 = sigma^2 (X'WX)^-1`` (residual variance on ``n - 2`` df, not floored at 1).
2. Simulation: for each ``lambda`` in the grid and replicates ``b = 1..B``, refit
   with ``bx + sqrt(lambda) bxse Z_b`` (``Z`` standard normal, one per instrument;
   the oriented ``bx``, which may turn negative, is not re-oriented). ``theta(lambda)``
   is the mean of the B coefficient vectors, and the jackknife variance term
   ``V(lambda) = mean_b V_b - S(lambda)``, ``S`` the sample variance (``ddof = 1``)
   of the B coefficients.
3. Extrapolation: least-squares quadratics in lambda through
   ``(0, theta_0), (lambda_l, theta(lambda_l))`` and ``(0, V_0), (lambda_l, V(lambda_l))``,
   evaluated at ``lambda = -1`` (no measurement error). Both are linear in the
   values: ``theta_SIMEX = sum_l g_l theta(lambda_l)`` with the weights ``g`` of
   :func:`extrapolation_weights`, and ``se = sqrt(sum_l g_l V(lambda_l))`` (simex's
   ``jackknife.estimation = "quad"``), which is NaN where that sum is negative.

Confidence limits and p-values are normal (Bowden's ``estimate +- 1.96 se``) or,
with ``t_dist``, t with ``n - 2`` degrees of freedom (``summary.simex``), for the
slope and the intercept alike. Needs at least three instruments.

Defaults: ``lambdas = (0.5, 1, 1.5, 2)`` is simex's ``lambda``; ``n_simex = 1000``
is Bowden et al.'s ``B`` (simex's own default is 100).

Computation. Every replicate fit is a closed-form 2 x 2 weighted least squares
from weighted sums over instruments; the sums that involve ``Z`` are matrix
products ``(loci, instruments) @ (instruments, B)`` of the centred data with
``Z`` and ``Z^2``, over chunks of loci whose ``(loci, B)`` temporaries stay under
:data:`CHUNK_BYTES`. Draws are numpy's, not R's: ``Z`` for grid point ``l`` and
instrument column ``j`` comes from ``Generator(PCG64(SeedSequence([seed, l, j])))``
(:func:`simex_normals`), so a locus alone gets the same draws as inside a padded
batch and the same numbers up to floating-point rounding of the products.

References
----------
Bowden J, Del Greco M F, Minelli C, Davey Smith G, Sheehan NA, Thompson JR (2016).
Assessing the suitability of summary data for two-sample Mendelian randomization
analyses using MR-Egger regression: the role of the I^2 statistic. Int J Epidemiol
45:1961-1974.
Cook JR, Stefanski LA (1994). Simulation-extrapolation estimation in parametric
measurement error models. J Am Stat Assoc 89:1314-1328.
Lederer W, Seibold H, Kuechenhoff H (2019). simex: SIMEX- and MCSIMEX-Algorithm for
Measurement Error Models. R package version 1.8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import MRData, chunk_bounds
from deepmr_dist.mr.egger import egger_wls, i2_gx, oriented
from deepmr_dist.mr.inference import INTERCEPT_FIELDS, store_wald, wald_inference
from deepmr_dist.mr.result import MRResult, ResultBuilder

SIMEX_LAMBDAS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
"""Default grid of added measurement-error variance multiples (simex's ``lambda``)."""
SIMEX_REPLICATES = 1000
"""Default replicates per grid point (Bowden et al.'s ``B = 1000``; simex's default is 100)."""
CHUNK_BYTES = 50 * 2**20
"""Upper bound on the ``(loci, B)`` temporaries of one chunk of loci (the ``(max_k, B)`` draws and their
squares of one grid point come on top: 16 MB per 1,000 instruments at B = 1000)."""
_CHUNK_ARRAYS = 12
"""``(loci, B)`` float64 arrays alive at once in :func:`_replicate_moments`."""

Normals = Callable[[int], np.ndarray]
"""``normals(l)``: the ``(max_k, B)`` standard normal draws of grid point ``l`` (row ``j``: instrument column ``j``)."""


def extrapolation_weights(lambdas: Sequence[float]) -> np.ndarray:
    """Weights ``g`` such that the quadratic extrapolant at ``lambda = -1`` is ``g @ values``.

    ``values`` holds the quantity at ``lambda = 0`` followed by the grid points;
    the extrapolant is the least-squares fit of ``a + b lambda + c lambda^2``
    (simex's ``lm(estimates ~ lambda + I(lambda^2))``).

    Parameters
    ----------
    lambdas : sequence of float
        The grid, without 0.

    Returns
    -------
    numpy.ndarray
        ``(len(lambdas) + 1,)``; sums to 1.
    """
    lam = np.concatenate([[0.0], np.asarray(lambdas, dtype=np.float64)])
    design = np.vander(lam, 3, increasing=True)
    return design @ np.linalg.solve(design.T @ design, np.array([1.0, -1.0, 1.0]))


def simex_normals(seed: int, grid_index: int, n_simex: int, n_cols: int) -> np.ndarray:
    """Standard normal draws of one grid point, one independent stream per instrument column.

    Column ``j`` comes from ``Generator(PCG64(SeedSequence([seed, grid_index, j])))``,
    so an instrument's draws do not depend on the batch it is in.

    Returns
    -------
    numpy.ndarray
        ``(n_cols, n_simex)``.
    """
    out = np.empty((n_cols, n_simex))
    for j in range(n_cols):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(grid_index), j])))
        out[j] = rng.standard_normal(n_simex)
    return out


def _check_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    """The grid as floats; at least two distinct positive finite points, else :class:`InputError`."""
    try:
        grid = tuple(float(v) for v in lambdas)
    except (TypeError, ValueError):
        raise InputError(f"lambdas must be a sequence of numbers, got {lambdas!r}") from None
    if len(set(grid)) != len(grid) or len(grid) < 2 or not all(np.isfinite(v) and v > 0 for v in grid):
        raise InputError(
            f"lambdas must hold at least two distinct positive finite numbers (a quadratic through 0 and them), "
            f"got {lambdas!r}"
        )
    return grid


def _check_replicates(n_simex: int) -> int:
    """``n_simex`` as an int >= 2 (the jackknife needs a sample variance), else :class:`InputError`."""
    if isinstance(n_simex, bool) or not isinstance(n_simex, (int, np.integer)) or n_simex < 2:
        raise InputError(f"n_simex must be an integer >= 2 (the jackknife needs a sample variance), got {n_simex!r}")
    return int(n_simex)


def _centred(data: MRData) -> dict[str, np.ndarray]:
    """Oriented data centred at its weighted means, and the weighted sums that do not involve ``Z``."""
    x, y = oriented(data)
    w = data.w
    s0 = w.sum(axis=1)
    xbar = (w * x).sum(axis=1) / s0
    ybar = (w * y).sum(axis=1) / s0
    dx = np.where(data.valid, x - xbar[:, None], 0.0)
    dy = np.where(data.valid, y - ybar[:, None], 0.0)
    return {
        "w": w, "dx": dx, "dy": dy, "xbar": xbar, "ybar": ybar, "s0": s0,
        "sx": (w * dx).sum(axis=1), "sy": (w * dy).sum(axis=1),
        "sxx": (w * dx * dx).sum(axis=1), "sxy": (w * dx * dy).sum(axis=1), "syy": (w * dy * dy).sum(axis=1),
    }  # fmt: skip


def _replicate_moments(
    c: dict[str, np.ndarray], scale: np.ndarray, n: np.ndarray, z: np.ndarray, z2: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Means over replicates of the refitted coefficients and their jackknife variance terms.

    Parameters
    ----------
    c : dict
        :func:`_centred` sums of a chunk of loci.
    scale : numpy.ndarray
        ``(loci, K)`` noise standard deviations ``sqrt(lambda) bxse``.
    n : numpy.ndarray
        Instruments per locus.
    z, z2 : numpy.ndarray
        ``(K, B)`` draws and their squares.

    Returns
    -------
    slope, intercept, v_slope, v_intercept : numpy.ndarray
        ``(loci,)``: mean coefficients and ``mean(var) - sample var`` of each.
    """
    wc = c["w"] * scale
    s0 = c["s0"][:, None]
    sx = c["sx"][:, None] + wc @ z
    sy = c["sy"][:, None]
    sxx_c = c["sxx"][:, None] + 2.0 * ((wc * c["dx"]) @ z) + (wc * scale) @ z2 - sx * sx / s0
    sxy_c = c["sxy"][:, None] + (wc * c["dy"]) @ z - sx * sy / s0
    slope = sxy_c / sxx_c
    xm = c["xbar"][:, None] + sx / s0
    intercept = c["ybar"][:, None] + sy / s0 - slope * xm
    rss = np.maximum((c["syy"] - c["sy"] ** 2 / c["s0"])[:, None] - slope * sxy_c, 0.0)
    sigma2 = rss / (n - 2)[:, None]
    var_slope = sigma2 / sxx_c
    var_intercept = sigma2 * (1.0 / s0 + xm * xm / sxx_c)
    return (
        slope.mean(axis=1),
        intercept.mean(axis=1),
        var_slope.mean(axis=1) - slope.var(axis=1, ddof=1),
        var_intercept.mean(axis=1) - intercept.var(axis=1, ddof=1),
    )


def simex_moments(data: MRData, lambdas: Sequence[float], normals: Normals) -> dict[str, np.ndarray]:
    """Simulation step: per grid point, the mean refitted MR-Egger coefficients and jackknife variance terms.

    Parameters
    ----------
    data : MRData
        Loci to refit (each with at least three instruments and a non-singular naive fit).
    lambdas : sequence of float
        The grid.
    normals : callable
        ``normals(l)`` returns the ``(max_k, B)`` draws of grid point ``l``.

    Returns
    -------
    dict
        ``slope``, ``intercept``, ``v_slope``, ``v_intercept``: ``(len(lambdas), n_loci)``.
    """
    names = ("slope", "intercept", "v_slope", "v_intercept")
    out = {name: np.full((len(lambdas), data.n_loci), np.nan) for name in names}
    c = _centred(data)
    for i, lam in enumerate(lambdas):
        z = np.asarray(normals(i), dtype=np.float64)
        if z.ndim != 2 or z.shape[0] != data.bx.shape[1] or z.shape[1] < 2:
            raise InputError(f"normals({i}) must have shape ({data.bx.shape[1]}, B >= 2), got {z.shape}")
        z2 = z * z
        rows = max(1, CHUNK_BYTES // (8 * _CHUNK_ARRAYS * z.shape[1]))
        for lo, hi in chunk_bounds(data.n_loci, rows):
            part = {k: v[lo:hi] for k, v in c.items()}
            scale = np.sqrt(lam) * data.bxse[lo:hi]
            for name, value in zip(names, _replicate_moments(part, scale, data.n[lo:hi], z, z2), strict=True):
                out[name][i, lo:hi] = value
    return out


def _extrapolated(data: MRData, naive: dict[str, np.ndarray], use: np.ndarray, grid: tuple[float, ...],
                  normals: Normals) -> dict[str, np.ndarray]:  # fmt: skip
    """SIMEX coefficients and jackknife variances at ``lambda = -1`` for the loci in ``use`` (NaN elsewhere)."""
    with np.errstate(invalid="ignore"):
        sigma2 = naive["sigma"] ** 2
    at_zero = {"slope": naive["slope"], "intercept": naive["intercept"],
               "v_slope": sigma2 * naive["var_slope"], "v_intercept": sigma2 * naive["var_intercept"]}  # fmt: skip
    out = {name: np.full(data.n_loci, np.nan) for name in at_zero}
    rows = np.flatnonzero(use)
    if rows.size:
        g = extrapolation_weights(grid)
        moments = simex_moments(_subset(data, rows), grid, normals)
        for name, value in at_zero.items():
            out[name][rows] = g[0] * value[rows] + g[1:] @ moments[name]
    return out


def egger_simex_from_normals(
    data: MRData, normals: Normals, *, lambdas: Sequence[float] = SIMEX_LAMBDAS, alpha: float = 0.05,
    t_dist: bool = False,
) -> MRResult:  # fmt: skip
    """MR-Egger with SIMEX correction per locus, from given draws (see :func:`egger_simex`).

    Parameters
    ----------
    data : MRData
    normals : callable
        ``normals(l)`` returns the ``(max_k, B)`` standard normal draws of grid point ``l``
        (``B >= 2``); row ``j`` is instrument column ``j``.
    lambdas : sequence of float
        At least two distinct positive grid points.
    alpha : float
        1 - confidence level.
    t_dist : bool
        t inference with ``n - 2`` degrees of freedom.

    Returns
    -------
    MRResult
        As :func:`egger_simex`.
    """
    grid = _check_lambdas(lambdas)
    out = ResultBuilder(data.n, data.fstat())
    naive = egger_wls(data)
    use = (data.n >= 3) & ~data.all_bx_zero() & ~naive["singular"]
    simex = _extrapolated(data, naive, use, grid, normals)
    with np.errstate(invalid="ignore"):  # a negative jackknife variance has no standard error (NaN)
        se_slope = np.sqrt(simex["v_slope"])
        se_intercept = np.sqrt(simex["v_intercept"])
    df = data.n - 2
    store_wald(out, simex["slope"], se_slope, alpha, t_dist, df)
    limits = wald_inference(simex["intercept"], se_intercept, alpha, t_dist, df)
    for name, value in zip(INTERCEPT_FIELDS, (simex["intercept"], se_intercept, *limits), strict=True):
        out[name] = value
    out["i2gx"] = i2_gx(data)
    out.flag(data.n < 3, "too_few_instruments")
    out.flag(data.all_bx_zero(), "all_bx_zero")
    out.flag(naive["singular"], "singular_fit")
    out.flag(use & ~(simex["v_slope"] >= 0), "negative_variance")
    return out.build()


def egger_simex(
    data: MRData,
    *,
    n_simex: int = SIMEX_REPLICATES,
    lambdas: Sequence[float] = SIMEX_LAMBDAS,
    seed: int = 0,
    alpha: float = 0.05,
    t_dist: bool = False,
) -> MRResult:
    """MR-Egger with SIMEX correction per locus (Bowden et al. 2016; see the module docstring).

    Parameters
    ----------
    data : MRData
        Prepared batch (:func:`deepmr_dist.mr._data.prepare`).
    n_simex : int
        Replicates per grid point (Bowden et al.: 1000).
    lambdas : sequence of float
        Grid of added error-variance multiples (simex: 0.5, 1, 1.5, 2).
    seed : int
        Seed of the per-column draws (:func:`simex_normals`).
    alpha : float
        1 - confidence level.
    t_dist : bool
        t inference with ``n - 2`` degrees of freedom (``summary.simex``) instead of normal.

    Returns
    -------
    MRResult
        SIMEX slope (``estimate``) and intercept with jackknife standard errors,
        their inference, ``i2gx`` and ``fstat``; ``rse`` and ``q`` are NaN.
        Undefined loci: ``too_few_instruments`` (below three), ``all_bx_zero``,
        ``singular_fit`` (naive design rank deficient). Where a jackknife variance
        extrapolates below zero (common below about six instruments) its
        standard error, limits and p-value are NaN and the estimate stays.

    Raises
    ------
    InputError
        If ``n_simex`` is not an integer >= 2 or ``lambdas`` not at least two
        distinct positive numbers.
    """
    n_simex = _check_replicates(n_simex)
    width = data.bx.shape[1]
    return egger_simex_from_normals(
        data,
        lambda grid_index: simex_normals(seed, grid_index, n_simex, width),
        lambdas=_check_lambdas(lambdas),
        alpha=alpha,
        t_dist=t_dist,
    )


def _subset(data: MRData, rows: np.ndarray) -> MRData:
    return MRData(
        bx=data.bx[rows], bxse=data.bxse[rows], by=data.by[rows], byse=data.byse[rows],
        valid=data.valid[rows], n=data.n[rows],
    )  # fmt: skip
