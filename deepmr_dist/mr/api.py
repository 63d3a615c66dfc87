"""``estimate``: run several MR estimators over one batch of loci."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deepmr_dist.errors import InputError, check_names
from deepmr_dist.mr._data import MRData, prepare
from deepmr_dist.mr.baseline import wald_mean
from deepmr_dist.mr.egger import egger
from deepmr_dist.mr.ivw import PENALIZED_IVW_FACTOR, ivw, penalized_ivw
from deepmr_dist.mr.ivw_delta import ivw_delta
from deepmr_dist.mr.median import PENALIZED_MEDIAN_FACTOR, median_estimator
from deepmr_dist.mr.mode import mbe
from deepmr_dist.mr.raps import mr_raps
from deepmr_dist.mr.result import FLOAT_FIELDS, MRResult
from deepmr_dist.mr.robust import robust_egger, robust_ivw
from deepmr_dist.mr.scaling import Scales, flag, rescaled, unit_scales, unscaled
from deepmr_dist.mr.simex import egger_simex

METHODS: tuple[str, ...] = (
    "ivw",
    "ivw_fixed",
    "ivw_random",
    "penalized_ivw",
    "egger",
    "robust_ivw",
    "robust_egger",
    "egger_paper",
    "weighted_median",
    "simple_median",
    "penalized_weighted_median",
    "mbe",
    "wald_mean",
    "ivw_delta",
    "egger_simex",
    "mr_raps",
)
"""Names accepted by :func:`estimate`. The last three model the error in bx (no NOME assumption):
``ivw_delta`` (IVW with second-order weights), ``egger_simex`` (MR-Egger with SIMEX correction,
Bowden et al. 2016), ``mr_raps`` (robust adjusted profile score, Zhao et al. 2020)."""

BOOTSTRAP_METHODS = frozenset({"weighted_median", "simple_median", "penalized_weighted_median", "mbe"})
"""Methods whose standard error comes from a parametric bootstrap (``n_boot`` draws)."""

SIMEX_REPLICATES = 1000
"""``egger_simex``'s replicates per lambda by default (``B`` in Bowden et al. 2016's code)."""

EGGER_PAPER_ROBUST_ABOVE = 10
"""egger_paper: robust MR-Egger with more than this many instruments, MR-Egger from 3 up to it."""

SE_FREE_METHODS = frozenset({"wald_mean"})
"""Methods that use no standard error (the mean and SD of the Wald ratios): computed at ``degenerate_se`` loci too."""


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The MR method names, checked against :data:`METHODS`, repeats dropped (the one check of them).

    Raises
    ------
    InputError
        Naming the unknown method(s), or none given, and listing the valid ones.
    """
    methods = tuple(dict.fromkeys(methods))
    check_names(methods, METHODS, "MR method(s)")
    if not methods:
        raise InputError(f"no MR method given; valid: {', '.join(METHODS)}")
    return methods


def _subset(data: MRData, rows: np.ndarray) -> MRData:
    return MRData(
        bx=data.bx[rows], bxse=data.bxse[rows], by=data.by[rows], byse=data.byse[rows],
        valid=data.valid[rows], n=data.n[rows],
    )  # fmt: skip


def _merge(data: MRData, parts: list[tuple[np.ndarray, MRResult]]) -> MRResult:
    """Assemble a result from per-row-subset results (rows not covered stay as in the first part)."""
    n_loci = data.n_loci
    values = {name: np.full(n_loci, np.nan) for name in FLOAT_FIELDS}
    reason = np.full(n_loci, "", dtype=object)
    note = np.full(n_loci, "", dtype=object)
    for rows, res in parts:
        for name in FLOAT_FIELDS:
            values[name][rows] = getattr(res, name)
        reason[rows] = res.reason
        note[rows] = res.note
    return MRResult(n=data.n.copy(), reason=reason, note=note, **values)


def egger_paper(data: MRData, *, alpha: float = 0.05, t_dist: bool = False, threads: int = 1) -> MRResult:
    """The paper's per-locus rule: robust MR-Egger above 10 instruments, MR-Egger from 3 to 10.

    Below three instruments the locus is undefined (``too_few_instruments``).
    """
    robust = data.n > EGGER_PAPER_ROBUST_ABOVE
    if robust.all():  # one estimator for the whole batch: no row subsets to copy
        return robust_egger(data, alpha=alpha, t_dist=t_dist, threads=threads)
    if not robust.any():
        return egger(data, alpha=alpha, t_dist=t_dist)
    robust_rows, plain_rows = np.flatnonzero(robust), np.flatnonzero(~robust)
    return _merge(data, [
        (plain_rows, egger(_subset(data, plain_rows), alpha=alpha, t_dist=t_dist)),
        (robust_rows, robust_egger(_subset(data, robust_rows), alpha=alpha, t_dist=t_dist, threads=threads)),
    ])  # fmt: skip


def estimate(
    bx: np.ndarray,
    bxse: np.ndarray,
    by: np.ndarray,
    byse: np.ndarray,
    methods: Sequence[str] = ("ivw", "egger"),
    *,
    alpha: float = 0.05,
    egger_t_dist: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    penalization: float | None = None,
    t_dist: bool = False,
    mbe_phi: float = 1.0,
    wald_ci_multiplier: float | None = None,
    n_simex: int = SIMEX_REPLICATES,
    threads: int = 1,
) -> dict[str, MRResult]:
    """Run MR estimators on a batch of loci.

    Parameters
    ----------
    bx, bxse, by, byse : array_like
        ``(n_loci, max_k)`` float arrays, NaN-padded. An instrument is used iff all
        four values are finite and ``bxse > 0`` and ``byse > 0``.
    methods : sequence of str
        Names from :data:`METHODS`.
    alpha : float
        1 - confidence level of every interval.
    egger_t_dist : bool
        MR-Egger family (egger, robust_egger, egger_paper): the package's
        ``distribution = "t-dist"`` rule instead of normal intervals and p-values.
    n_boot : int
        Bootstrap replicates for the median methods and mbe (the package uses 10000).
    seed : int
        Bootstrap and SIMEX seed; draws are per instrument column (a locus alone
        gives the same numbers as inside a batch).
    penalization : float, optional
        Multiplier of the heterogeneity p-values in the penalized weights. Default:
        the package's values, 100 for ``penalized_ivw`` (first-order weights) and
        20 for ``penalized_weighted_median``; a number overrides both.
    t_dist : bool
        IVW family, medians and mbe: t intervals/p-values with n - 1 degrees of freedom.
    mbe_phi : float
        Bandwidth multiplier of the mode-based estimate.
    wald_ci_multiplier : float, optional
        ``wald_mean`` interval half-width in SDs (2 reproduces the paper); default
        the normal quantile.
    n_simex : int
        ``egger_simex``: simulated data sets per lambda.
    threads : int
        Worker threads over chunks of loci for the robust (MM) fits and the
        bootstraps; results do not depend on it.

    Returns
    -------
    dict of str to MRResult
        One result per requested method, in request order. Loci are computed in units where their
        largest magnitudes are about 1 when they are far from it (:mod:`deepmr_dist.mr.scaling`), so
        values up to 1e300 give the estimates of unit-scale data; a locus whose SEs are negligible next
        to its effects has ``reason = "degenerate_se"``, one whose result lies outside the float64 range
        ``"overflow"`` or ``"underflow"``.

    Raises
    ------
    InputError
        Unknown method, bad ``alpha``/``n_boot``, or malformed arrays.
    """
    methods = check_methods(methods)
    if not (0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if BOOTSTRAP_METHODS.intersection(methods) and (int(n_boot) != n_boot or n_boot < 2):
        raise InputError(f"n_boot must be an integer >= 2 for bootstrap methods, got {n_boot}")
    if int(threads) < 1:
        raise InputError(f"threads must be a positive integer, got {threads}")
    data = prepare(bx, bxse, by, byse)
    scales = unit_scales(data)
    data = rescaled(data, scales)
    pen_ivw = PENALIZED_IVW_FACTOR if penalization is None else float(penalization)
    pen_med = PENALIZED_MEDIAN_FACTOR if penalization is None else float(penalization)
    boot = {"n_boot": int(n_boot), "seed": int(seed), "threads": int(threads)}
    runners: dict[str, Callable[[MRData], MRResult]] = {
        "ivw": lambda d: ivw(d, model="default", alpha=alpha, t_dist=t_dist),
        "ivw_fixed": lambda d: ivw(d, model="fixed", alpha=alpha, t_dist=t_dist),
        "ivw_random": lambda d: ivw(d, model="random", alpha=alpha, t_dist=t_dist),
        "penalized_ivw": lambda d: penalized_ivw(d, alpha=alpha, t_dist=t_dist, penalization=pen_ivw),
        "egger": lambda d: egger(d, alpha=alpha, t_dist=egger_t_dist),
        "robust_ivw": lambda d: robust_ivw(d, alpha=alpha, t_dist=t_dist, threads=threads),
        "robust_egger": lambda d: robust_egger(d, alpha=alpha, t_dist=egger_t_dist, threads=threads),
        "egger_paper": lambda d: egger_paper(d, alpha=alpha, t_dist=egger_t_dist, threads=threads),
        "weighted_median": lambda d: median_estimator(d, weighting="weighted", alpha=alpha, t_dist=t_dist, **boot),
        "simple_median": lambda d: median_estimator(d, weighting="simple", alpha=alpha, t_dist=t_dist, **boot),
        "penalized_weighted_median": lambda d: median_estimator(
            d, weighting="penalized", alpha=alpha, t_dist=t_dist, penalization=pen_med, **boot
        ),
        "mbe": lambda d: mbe(d, alpha=alpha, t_dist=t_dist, phi=mbe_phi, **boot),
        "wald_mean": lambda d: wald_mean(d, alpha=alpha, ci_multiplier=wald_ci_multiplier),
        "ivw_delta": lambda d: ivw_delta(d, model="default", alpha=alpha, t_dist=t_dist),
        "egger_simex": lambda d: egger_simex(d, n_simex=n_simex, seed=seed, alpha=alpha, t_dist=egger_t_dist),
        "mr_raps": lambda d: mr_raps(d, alpha=alpha),
    }
    return {m: _in_range(runners[m], data, scales, se_free=m in SE_FREE_METHODS) for m in methods}


def _in_range(run: Callable[[MRData], MRResult], data: MRData, scales: Scales, *, se_free: bool) -> MRResult:
    """``run`` on the rescaled ``data``, scaled back, with ``degenerate_se`` and ``overflow`` flagged.

    Degenerate loci (:attr:`Scales.degenerate`) are left out of the fit unless the method uses no SE;
    a locus whose estimate or SE is not finite without a reason, or whose scaled-back value overflows,
    gets ``overflow``, and one whose nonzero value scales back to 0 gets ``underflow``.
    """
    degenerate = np.zeros(data.n_loci, dtype=bool) if se_free else scales.degenerate
    if degenerate.any():
        rows = np.flatnonzero(~degenerate)
        result = _merge(data, [(rows, run(_subset(data, rows)))])
        result = flag(result, degenerate, "degenerate_se")
    else:
        result = run(data)
    result, overflow, underflow = unscaled(result, scales)
    overflow |= (result.n > 0) & ~(np.isfinite(result.estimate) & np.isfinite(result.se))
    return flag(flag(result, overflow, "overflow"), underflow, "underflow")
