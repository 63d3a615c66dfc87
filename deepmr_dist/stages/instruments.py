"""Instrument selection: which mutations instrument an exposure task.

Every single-base mutation (a ``(position, allele)`` cell of a locus that is
not the reference allele) is a candidate instrument. Two rules decide:

``"pooled_z"`` (the paper's)
    ``|x - mean(x)| / sd(x) >= threshold`` where ``x`` is the exposure effect
    and ``mean``/``sd`` are taken over *all* exposure effects pooled across
    loci, positions and alleles (NaN reference cells excluded; ``ddof`` 0 by
    default, like ``scipy.stats.zscore``). The two numbers come from one
    global Dask reduction computed when the rule is applied; the selection
    itself stays lazy and blockwise.
``"mutation_z"``
    ``|effect / effect_se| >= threshold`` per mutation; a mutation whose
    ``effect_se`` is 0, negative or not finite is never an instrument.

A NaN effect (the reference allele) is never an instrument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from deepmr_dist.errors import InputError, check_name

__all__ = [
    "RULES",
    "check_rule",
    "count_instruments",
    "instrument_mask",
    "pooled_stats",
    "select",
    "usable",
]

RuleFunction = Callable[[np.ndarray, np.ndarray, float, float, float], np.ndarray]
"""A rule: ``(effect, effect_se, threshold, center, scale) -> mask`` on numpy arrays of one shape."""


def _pooled_z(effect: np.ndarray, effect_se: np.ndarray, threshold: float, center: float, scale: float) -> np.ndarray:
    """``|effect - center| / scale >= threshold``, with the pooled mean and SD of the exposure effects."""
    z = np.abs(effect - center) / scale
    return np.isfinite(z) & (z >= threshold)


def _mutation_z(effect: np.ndarray, effect_se: np.ndarray, threshold: float, center: float, scale: float) -> np.ndarray:
    """``|effect / effect_se| >= threshold``; never where ``effect_se`` is 0, negative or not finite."""
    se = np.asarray(effect_se, dtype=np.float64)
    z = np.abs(effect) / se
    return np.isfinite(se) & (se > 0) & np.isfinite(z) & (z >= threshold)


RULES: dict[str, RuleFunction] = {"pooled_z": _pooled_z, "mutation_z": _mutation_z}
"""The instrument-selection rules, name -> function (see the module docstring); :func:`check_rule` checks names."""


def usable(bx: np.ndarray, bxse: np.ndarray, by: np.ndarray, byse: np.ndarray) -> np.ndarray:
    """Which instruments the MR kernels can use: finite ``bx`` and ``by``, finite and positive SEs.

    The rule of :mod:`deepmr_dist.mr` and of ``deepmr mr``'s input rows; a selected
    instrument that fails it is counted in the mr group's ``n_excluded``.
    """
    with np.errstate(invalid="ignore"):
        return np.isfinite(bx) & np.isfinite(by) & np.isfinite(bxse) & (bxse > 0) & np.isfinite(byse) & (byse > 0)


_CANDIDATE_DIMS = ("position", "allele")


def check_rule(rule: str, threshold: float | None = None) -> str:
    """``rule`` if it is one of :data:`RULES` (the one check of rule names), and ``threshold`` if given.

    Parameters
    ----------
    rule : str
        Name of an instrument-selection rule.
    threshold : float, optional
        Selection threshold, checked to be finite and >= 0 when given.

    Returns
    -------
    str
        ``rule``.

    Raises
    ------
    InputError
        Naming an unknown rule and listing the valid ones, or naming a bad threshold.
    """
    check_name(rule, RULES, "instrument rule")
    if threshold is not None and (not np.isfinite(threshold) or threshold < 0):
        raise InputError(f"instrument threshold must be finite and >= 0, got {threshold!r}")
    return rule


def check_tasks(effects: xr.Dataset, tasks: Sequence[str]) -> None:
    """Raise :class:`InputError` naming any task absent from ``effects.task``."""
    known = [str(t) for t in effects["task"].values]
    missing = [t for t in tasks if t not in known]
    if missing:
        raise InputError(
            f"task(s) {', '.join(map(repr, missing))} not in the effects dataset; "
            f"available tasks: {', '.join(known)}"
        )


def instrument_mask(
    effect: np.ndarray,
    effect_se: np.ndarray,
    rule: str,
    threshold: float,
    center: float = np.nan,
    scale: float = np.nan,
) -> np.ndarray:
    """Apply a selection rule to numpy arrays of exposure effects (any shape).

    Parameters
    ----------
    effect, effect_se : ndarray
        Exposure effects and their standard errors, same shape.
    rule : {"pooled_z", "mutation_z"}
        A key of :data:`RULES`.
    threshold : float
    center, scale : float
        Pooled mean and SD of the exposure effects (``pooled_z`` only; see
        :func:`pooled_stats`).

    Returns
    -------
    ndarray of bool
        True where the mutation is an instrument.

    Raises
    ------
    InputError
        For an unknown ``rule``, listing the valid ones.
    """
    rule_function = RULES[check_rule(rule)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return rule_function(np.asarray(effect, dtype=np.float64), effect_se, threshold, center, scale)


def pooled_stats(effects: xr.Dataset, exposures: Sequence[str], *, ddof: int = 0) -> dict[str, tuple[float, float]]:
    """Mean and SD of every exposure's effects pooled over loci, positions and alleles.

    All exposures are reduced in a single ``dask.compute`` (one pass over the
    data, a progress bar inside :func:`deepmr_dist.io.progress.shown`); NaN cells (reference alleles) are skipped. Accumulation is in float64.

    Returns
    -------
    dict
        ``{exposure: (mean, sd)}``.
    """
    exposures = list(dict.fromkeys(exposures))
    if not exposures:
        return {}
    check_tasks(effects, exposures)
    x = effects["effect"].sel(task=exposures).astype(np.float64)
    dims = [d for d in x.dims if d != "task"]
    from deepmr_dist.io import progress  # distributed, only once a computation runs (configs import this module)

    mean, sd = progress.compute(x.mean(dim=dims, skipna=True), x.std(dim=dims, skipna=True, ddof=ddof), what="pooled statistics")
    return {t: (float(mean.sel(task=t)), float(sd.sel(task=t))) for t in exposures}


def select(
    effects: xr.Dataset,
    exposure: str,
    *,
    rule: str = "pooled_z",
    threshold: float,
    ddof: int = 0,
    stats: Mapping[str, tuple[float, float]] | None = None,
) -> xr.DataArray:
    """Lazy boolean mask of the instruments of one exposure task.

    Parameters
    ----------
    effects : xr.Dataset
        With ``effect`` and ``effect_se`` of dims ``(locus, position, allele, task)``.
    exposure : str
        Task name of the exposure.
    rule : {"pooled_z", "mutation_z"}
        See the module docstring.
    threshold : float
        Selection threshold (>= 0).
    ddof : int
        Delta degrees of freedom of the pooled SD (``pooled_z``).
    stats : mapping, optional
        Precomputed ``{exposure: (mean, sd)}`` from :func:`pooled_stats`;
        computed here (one global reduction) when omitted.

    Returns
    -------
    xr.DataArray
        bool, dims ``(locus, position, allele)``, chunked like ``effects``
        along ``locus``; attrs record the rule, threshold and pooled stats.

    Raises
    ------
    InputError
        An unknown rule (listing the valid ones), a negative or non-finite
        threshold, or an exposure absent from ``effects``.
    """
    check_rule(rule, threshold)
    check_tasks(effects, [exposure])
    center = scale = np.nan
    if rule == "pooled_z":
        if stats is None or exposure not in stats:
            stats = pooled_stats(effects, [exposure], ddof=ddof)
        center, scale = stats[exposure]
    x = effects["effect"].sel(task=exposure, drop=True)
    s = effects["effect_se"].sel(task=exposure, drop=True)
    mask = xr.apply_ufunc(
        instrument_mask,
        x,
        s,
        kwargs={"rule": rule, "threshold": float(threshold), "center": center, "scale": scale},
        dask="parallelized",
        output_dtypes=[bool],
    )
    mask = mask.transpose("locus", *_CANDIDATE_DIMS)
    mask.name = "instrument"
    mask.attrs = {"exposure": exposure, "rule": rule, "threshold": float(threshold)}
    if rule == "pooled_z":
        mask.attrs.update(pooled_mean=center, pooled_sd=scale, ddof=ddof)
    return mask


def count_instruments(
    effects: xr.Dataset,
    exposure: str,
    *,
    rule: str = "pooled_z",
    threshold: float,
    ddof: int = 0,
    stats: Mapping[str, tuple[float, float]] | None = None,
) -> xr.DataArray:
    """Number of instruments per locus (lazy int64, dims ``(locus,)``); arguments as :func:`select`."""
    mask = select(effects, exposure, rule=rule, threshold=threshold, ddof=ddof, stats=stats)
    counts = mask.sum(dim=list(_CANDIDATE_DIMS)).astype(np.int64)
    counts.name = "n_instruments"
    counts.attrs = dict(mask.attrs)
    return counts
