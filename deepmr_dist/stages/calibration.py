"""Isotonic recalibration of the ensemble's uncertainty, applied to ``effect_se``.

What is calibrated
------------------
The ensemble's *epistemic* standard deviation: the spread of the members
around their mean, which is exactly what ``effect_se`` is (the SD over members
of ``d_i = f_i(mutant) - f_i(reference)``). It is fitted per task on held-out
labelled loci, never on the loci it is applied to (:meth:`Calibration.se_factor`
refuses a locus id seen in the fit).

For held-out locus j and one task: labels ``y_j``, member predictions
``p_ij``, their mean ``mu_j`` and SD ``s_j`` over members (the same ``ddof``
as the effects), and ``v_j`` the known variance of the label noise (aleatoric;
0 by default). The model of a held-out label is
``y_j ~ N(mu_j, k^2 s_j^2 + v_j)``: the members' spread, stretched by one factor
k per task, is the uncertainty of the model's mean, and the labels add noise
no model can predict. With the standardised residual
``r_j(k) = (y_j - mu_j) / sqrt(k^2 s_j^2 + v_j)``, the central interval of
nominal level p, ``mu_j +- z_p sqrt(k^2 s_j^2 + v_j)`` with
``z_p = Phi^-1((1 + p) / 2)``, holds ``y_j`` iff ``|r_j(k)| <= z_p``.

Calibration map. Each held-out point has an expected coverage
``2 Phi(|r_j|) - 1`` (the smallest nominal level whose interval holds it) and
an observed coverage ``#{i : |r_i| <= |r_j|} / n`` (the fraction of points held
by that interval). An increasing :class:`sklearn.isotonic.IsotonicRegression`
of observed on expected coverage is the map ``C_k`` from nominal to observed
coverage (fitted on ``|r_j|``, a monotone reparametrisation of the expected
coverage: isotonic regression depends only on the order of its x, and ``|r|``
does not saturate at 1 in floating point as ``2 Phi(|r|) - 1`` does beyond
``|r| = 8.3``). For one set of residuals the observed coverage is already a
nondecreasing function of the expected one, so the isotonic fit reproduces the
empirical curve at the points; it is the monotone interpolant that is inverted.

Factor. k is chosen so the stated interval at ``level`` (default 95%) holds:
``C_k(level) = level``. Without label noise (``v = 0``) ``r(k) = r(1) / k``, so
``k = z(p*) / z(level)`` with ``p* = C_1^-1(level)``, the nominal level whose
observed coverage is ``level``. With label noise, k is the root of
``z(C_k^-1(level)) = z(level)`` (Brent's method; ``C_k`` increases with k, so
the root is unique); it reduces to the former when ``v = 0``.

Why the noise variance enters and only the epistemic part is rescaled. Labels
carry noise the members cannot (and should not) agree on; for Anscombe-
transformed Poisson counts its variance is about 1 while the members' SD is
often about 0.1. Standardising by ``s`` alone would make the factor measure
the label noise (with ``s = 0.1``, ``v = 1`` and a true model error SD of 0.3 it
gives about 10.4 instead of 3) and inflate every effect SE by it. Standardising
by ``sqrt(s^2 + v)`` and applying ``z(p*) / z(level)`` would rescale the total
predictive SD (about 1.04 in that example), yet the noise term does not enter
effects at all. Solving for k on the epistemic part alone is right in both
limits. The noise variance must be known: an overstated ``v`` biases k down
and an understated one biases it up. The Anscombe transform of a Poisson count
has variance 1 only for means above about 3 (0.72 at mean 1);
:func:`poisson_anscombe_variance` gives the exact value per locus (from the
simulation's expected counts, or as a plug-in from the ensemble's mean).

How it is applied. ``effect_se`` of each task is multiplied by k. This is the
same as stretching every member's deviation from the ensemble mean by k
(``f_i -> mu + k (f_i - mu)``, a recalibration of the members): the mean, and
hence ``effect``, is unchanged and the SD over members of ``d_i`` scales by
exactly k. The assumption, which labels cannot check because mutants have no
labels, is that the ensemble's mis-dispersion is one factor per task shared by
its predictions at held-out sequences and by the differences between a
mutant and its reference.

Limits. Estimating the ``level`` quantile needs enough points outside the
interval: at least ``10 / (1 - level)`` held-out loci (200 for 95%). If the
label noise alone already gives at least ``level`` coverage, k is not
identifiable from these labels and :func:`fit_calibration` raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from scipy import optimize, stats

from deepmr_dist.errors import InputError

DEFAULT_LEVEL = 0.95
"""Coverage the calibrated intervals are made to hold."""

CURVE_LEVELS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99,)
"""Nominal levels at which the fitted calibration maps are recorded."""

GROUP = "calibration"
"""Default group of a run store that holds a :class:`Calibration`."""

METHOD = (
    "per task: k solves C_k(level) = level, C_k = increasing isotonic regression of observed on expected "
    "coverage of central intervals of r(k) = (y - mu) / sqrt(k^2 s^2 + v) on held-out labels; effect_se *= k"
)

_MIN_OUTSIDE = 10
"""Expected number of held-out points outside the ``level`` interval required for a fit."""

_ANSCOMBE_EXACT_MAX = 1000.0
"""Above this Poisson mean the Anscombe variance is 1 + 1/(16 mean^2) to better than 1e-9."""


@dataclass(frozen=True)
class Calibration:
    """A fitted recalibration of the ensemble's SD: one multiplicative factor per task.

    Serialise with :meth:`to_dict` (JSON-safe, e.g. Zarr attrs) or
    :meth:`to_dataset` (a Zarr group, see :func:`read_calibration`).

    Attributes
    ----------
    tasks
        Task names, in the order of the per-task fields.
    factor
        Multiplier of ``effect_se`` per task (k of the module docstring).
    level
        Coverage the calibrated intervals hold.
    ddof
        Delta degrees of freedom of the ensemble SD; must equal the effects' ``ddof``.
    n_members
        Ensemble size; must equal the effects' number of members.
    loci
        Ids of the held-out loci the fit used (empty if the labels had no locus coordinate).
    noise_variance
        Mean over loci of the label noise variance used, per task.
    curve_levels
        Nominal levels at which the maps are recorded.
    coverage_before, coverage_after
        Per task, observed coverage at each of ``curve_levels`` by the isotonic
        map ``C_k`` of the ensemble as it is (k = 1) and after calibration
        (k = factor); both include the label noise variance.
    source
        Free text naming the held-out data (e.g. ``"round 3, calibration split"``).
    method
        What was fitted, in words.
    """

    tasks: tuple[str, ...]
    factor: tuple[float, ...]
    level: float
    ddof: int
    n_members: int
    loci: tuple[str, ...]
    noise_variance: tuple[float, ...]
    curve_levels: tuple[float, ...]
    coverage_before: tuple[tuple[float, ...], ...]
    coverage_after: tuple[tuple[float, ...], ...]
    source: str = ""
    method: str = field(default=METHOD)

    def __post_init__(self) -> None:
        n = len(self.tasks)
        if n == 0 or len(set(self.tasks)) != n:
            raise InputError(f"calibration tasks must be non-empty and unique, got {list(self.tasks)}")
        for name in ("factor", "noise_variance", "coverage_before", "coverage_after"):
            if len(getattr(self, name)) != n:
                raise InputError(f"calibration {name} has {len(getattr(self, name))} entries for {n} tasks")
        for name in ("coverage_before", "coverage_after"):
            if any(len(row) != len(self.curve_levels) for row in getattr(self, name)):
                raise InputError(f"calibration {name} rows must have one value per curve level")
        bad = [t for t, k in zip(self.tasks, self.factor) if not (math.isfinite(k) and k > 0)]
        if bad:
            raise InputError(f"calibration factors must be finite and > 0; not so for tasks {bad}")
        if not 0.0 < self.level < 1.0:
            raise InputError(f"calibration level must lie in (0, 1), got {self.level}")

    def factor_array(self) -> xr.DataArray:
        """The factors as a DataArray over ``task``."""
        return xr.DataArray(np.array(self.factor), dims="task", coords={"task": list(self.tasks)}, name="factor")

    def summary(self) -> dict[str, Any]:
        """A small JSON-safe record for the attrs of the calibrated effects (no loci, no curves)."""
        return {
            "factor": dict(zip(self.tasks, self.factor)),
            "level": self.level,
            "ddof": self.ddof,
            "n_members": self.n_members,
            "n_loci": len(self.loci),
            "noise_variance": dict(zip(self.tasks, self.noise_variance)),
            "source": self.source,
            "method": self.method,
        }

    def se_factor(self, ism: xr.Dataset, ddof: int) -> xr.DataArray:
        """The factor for each task of ``ism``, after checking the calibration applies to it.

        Raises
        ------
        InputError
            If ``ism`` lacks task names or a task, was made by an ensemble of
            another size, uses another ``ddof``, or holds a locus the
            calibration was fitted on.
        """
        if "task" not in ism.coords:
            raise InputError("ism has no 'task' coordinate; task names are needed to match calibration factors")
        tasks = [str(t) for t in ism["task"].values]
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise InputError(f"calibration has no factor for task(s) {missing}; it covers {list(self.tasks)}")
        if ism.sizes["member"] != self.n_members:
            raise InputError(
                f"calibration was fitted on an ensemble of {self.n_members} members, ism has {ism.sizes['member']}"
            )
        if ddof != self.ddof:
            raise InputError(f"calibration was fitted with ddof={self.ddof}, effects use ddof={ddof}")
        if self.loci and "locus" in ism.coords:
            seen = np.isin(_names(ism["locus"]), np.array(self.loci, dtype=str))
            if seen.any():
                first = str(ism["locus"].values[np.argmax(seen)])
                raise InputError(
                    f"{int(seen.sum())} ism loci (first: {first!r}) were used to fit the calibration; "
                    "fit it on held-out loci only"
                )
        return self.factor_array().sel(task=tasks).assign_coords(task=ism["task"].values)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-safe lists and scalars (inverse: :meth:`from_dict`)."""
        return {key: _as_lists(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict` output."""
        names = set(cls.__dataclass_fields__)
        missing = names - set(record) - {"source", "method"}
        if missing:
            raise InputError(f"calibration record lacks {sorted(missing)}")
        fields = {key: record[key] for key in names if key in record}
        for key in ("tasks", "factor", "loci", "noise_variance", "curve_levels"):
            fields[key] = tuple(fields[key])
        for key in ("coverage_before", "coverage_after"):
            fields[key] = tuple(tuple(float(x) for x in row) for row in fields[key])
        return cls(**fields)

    def to_dataset(self) -> xr.Dataset:
        """The calibration as a Dataset (dims ``task``, ``level``, ``calibration_locus``); attrs hold the scalars."""
        tasks = np.array(self.tasks, dtype=object)
        return xr.Dataset(
            {
                "factor": ("task", np.array(self.factor), {"description": "multiplier of effect_se"}),
                "noise_variance": ("task", np.array(self.noise_variance),
                                   {"description": "mean label noise variance used"}),
                "coverage_before": (("task", "level"), np.array(self.coverage_before),
                                    {"description": "observed coverage by the isotonic map at k = 1"}),
                "coverage_after": (("task", "level"), np.array(self.coverage_after),
                                   {"description": "observed coverage by the isotonic map at k = factor"}),
            },
            coords={
                "task": tasks,
                "level": np.array(self.curve_levels),
                "calibration_locus": np.array(self.loci, dtype=object),
            },
            attrs={"level": self.level, "ddof": self.ddof, "n_members": self.n_members,
                   "calibration_source": self.source, "method": self.method},  # "source" is the store's (CF)
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> Calibration:
        """Rebuild a calibration from :meth:`to_dataset` output (e.g. a Zarr group)."""
        needed = {"factor", "noise_variance", "coverage_before", "coverage_after"}
        missing = sorted(needed - set(ds.data_vars)) + sorted(
            {"level", "ddof", "n_members"} - set(ds.attrs))
        if missing:
            raise InputError(f"calibration dataset lacks {missing}")
        return cls(
            tasks=tuple(str(t) for t in ds["task"].values),
            factor=tuple(float(x) for x in ds["factor"].values),
            level=float(ds.attrs["level"]),
            ddof=int(ds.attrs["ddof"]),
            n_members=int(ds.attrs["n_members"]),
            loci=tuple(str(x) for x in ds["calibration_locus"].values),
            noise_variance=tuple(float(x) for x in ds["noise_variance"].values),
            curve_levels=tuple(float(x) for x in ds["level"].values),
            coverage_before=tuple(tuple(float(x) for x in row) for row in ds["coverage_before"].values),
            coverage_after=tuple(tuple(float(x) for x in row) for row in ds["coverage_after"].values),
            source=str(ds.attrs.get("calibration_source", ds.attrs.get("source", ""))),  # "source": older stores
            method=str(ds.attrs.get("method", METHOD)),
        )


def fit_calibration(
    labels: xr.DataArray,
    predictions: xr.DataArray,
    *,
    noise_variance: float | Mapping[str, float] | xr.DataArray = 0.0,
    ddof: int = 0,
    level: float = DEFAULT_LEVEL,
    source: str = "",
) -> Calibration:
    """Fit the per-task SE factor on held-out labelled loci (see the module docstring).

    Parameters
    ----------
    labels
        Held-out labels, dims ``(locus, task)`` with a ``task`` coordinate.
    predictions
        Each member's prediction for the same loci, dims ``member``, ``locus``,
        ``task`` in any order. Matched to ``labels`` by task name and, when both
        have a ``locus`` coordinate, by locus id; otherwise by position.
    noise_variance
        Known variance of the label noise: one number for every task, a mapping
        task -> number, or a DataArray over ``locus`` and/or ``task`` (e.g.
        :func:`poisson_anscombe_variance` of expected counts).
    ddof
        Delta degrees of freedom of the SD over members; use the effects' value.
    level
        Coverage the calibrated interval must hold.
    source
        Free text naming the held-out data, kept as provenance.

    Returns
    -------
    Calibration

    Raises
    ------
    InputError
        Naming the input at fault: wrong dims, missing task names or tasks,
        mismatched loci or sizes, non-finite values, too few loci, too few
        members, a zero ensemble SD without label noise, or a task whose label
        noise alone already gives ``level`` coverage (k not identifiable).
    """
    if ddof not in (0, 1):
        raise InputError(f"ddof must be 0 or 1, got {ddof}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie in (0, 1), got {level}")
    y, p = _aligned_inputs(labels, predictions)
    tasks = [str(t) for t in y["task"].values]
    n_loci, n_members = y.sizes["locus"], p.sizes["member"]
    if n_members - ddof < 1:
        raise InputError(f"{n_members} member(s) cannot give an ensemble SD with ddof={ddof}")
    min_loci = math.ceil(_MIN_OUTSIDE / (1.0 - level))
    if n_loci < min_loci:
        raise InputError(
            f"labels has {n_loci} loci; a {level:.0%} calibration needs at least {min_loci} "
            f"(about {_MIN_OUTSIDE} expected outside the interval)"
        )
    v = _noise_variance(noise_variance, y)
    mu = p.mean("member")
    s2 = (p - p.isel(member=0)).var("member", ddof=ddof)  # shifted: identical members give exactly 0
    z_grid = np.array([_z(q) for q in CURVE_LEVELS])
    factors, before, after = [], [], []
    for task in tasks:
        error = np.abs((y - mu).sel(task=task).values)
        s2_t, v_t = s2.sel(task=task).values, v.sel(task=task).values
        zero = (s2_t <= 0) & (v_t <= 0)
        if zero.any():
            raise InputError(
                f"task {task!r}: the ensemble SD is 0 at {int(zero.sum())} held-out loci and no label noise "
                "variance was given there; identical members cannot be calibrated"
            )
        k = _task_factor(error, s2_t, v_t, level, task)
        factors.append(k)
        before.append(tuple(float(c) for c in _coverage_map(error / np.sqrt(s2_t + v_t)).predict(z_grid)))
        after.append(tuple(float(c) for c in _coverage_map(error / np.sqrt(k * k * s2_t + v_t)).predict(z_grid)))
    return Calibration(
        tasks=tuple(tasks),
        factor=tuple(factors),
        level=float(level),
        ddof=ddof,
        n_members=n_members,
        loci=tuple(str(x) for x in y["locus"].values) if "locus" in y.coords else (),
        noise_variance=tuple(float(v.sel(task=t).mean()) for t in tasks),
        curve_levels=CURVE_LEVELS,
        coverage_before=tuple(before),
        coverage_after=tuple(after),
        source=source,
    )


def poisson_anscombe_variance(mean: np.ndarray | xr.DataArray) -> np.ndarray | xr.DataArray:
    """Exact variance of the Anscombe transform ``2 sqrt(Y + 3/8)`` of ``Y ~ Poisson(mean)``.

    Summed over the Poisson probabilities (to 12 SD beyond the mean) for means
    up to 1000 and ``1 + 1 / (16 mean^2)`` above (error below 1e-9). About 0.72
    at mean 1, 0.98 at 3 and 1 + 2e-3 at 5.

    Parameters
    ----------
    mean
        Poisson means, any shape, >= 0; a DataArray keeps its dims and coords.

    Returns
    -------
    numpy.ndarray or xarray.DataArray
        Variances of the same shape (and type) as ``mean``.
    """
    if isinstance(mean, xr.DataArray):
        return mean.copy(data=poisson_anscombe_variance(mean.values))
    lam = np.asarray(mean, dtype=np.float64)
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise InputError("Poisson means must be finite and >= 0")
    flat = lam.ravel()
    out = 1.0 + 1.0 / (16.0 * np.maximum(flat, _ANSCOMBE_EXACT_MAX) ** 2)
    exact = np.flatnonzero(flat <= _ANSCOMBE_EXACT_MAX)
    if exact.size:
        sd = np.sqrt(flat[exact])
        low = np.floor(np.maximum(flat[exact] - 12.0 * sd - 10.0, 0.0))
        width = int(np.ceil(24.0 * sd.max() + 21.0))
        rows = max(1, 4_000_000 // width)
        for start in range(0, exact.size, rows):
            part = slice(start, start + rows)
            k = low[part, None] + np.arange(width)
            pmf = stats.poisson.pmf(k, flat[exact][part, None])
            a = 2.0 * np.sqrt(k + 0.375)
            first = (pmf * a).sum(axis=1) / pmf.sum(axis=1)
            out[exact[part]] = (pmf * (a - first[:, None]) ** 2).sum(axis=1) / pmf.sum(axis=1)
    return out.reshape(lam.shape)


def read_calibration(
    path: str, *, group: str = GROUP, storage_options: Mapping[str, Any] | None = None
) -> Calibration:
    """Read a calibration written as a group (``store.write_group(path, calibration.to_dataset(), group)``).

    Opened as every group is (:func:`deepmr_dist.io.store.open_group`: attrs decoded, a missing group one line).
    """
    from deepmr_dist.io import store  # here: the store imports distributed, which loading a config must not

    return Calibration.from_dataset(store.open_group(path, group, storage_options).load())


def fit_simulated_calibration(members: Sequence[Any], held_out: xr.Dataset, *, ddof: int = 0, source: str = "") -> Calibration:
    """The isotonic SE calibration of an ensemble, fitted on a simulation's held-out labelled loci.

    Parameters
    ----------
    members
        The ensemble's torch modules (one-hot ``(n, 4, L)`` in, ``(n, 2)`` exposure and outcome out).
    held_out
        The round's ``calibration`` split (:func:`deepmr_dist.simulation.generator.select_split`):
        ``sequence``, ``label`` and ``expected_count`` per locus.
    ddof
        As the effects'.
    source
        Provenance text.

    Notes
    -----
    The label noise is the exact variance of the Anscombe transform of a
    Poisson count at each locus's expected count (:func:`poisson_anscombe_variance`).

    Raises
    ------
    InputError
        If there are no held-out loci.
    """
    import torch

    from deepmr_dist.simulation.generator import one_hot

    if held_out.sizes["locus"] == 0:
        raise InputError("effects.calibration needs held-out sequences: set generator.n_calibration > 0")
    x = torch.from_numpy(one_hot(held_out["sequence"].values))
    with torch.inference_mode():
        predictions = np.stack([member(x).numpy() for member in members])
    coords = {"locus": held_out["locus"].values, "task": ["exposure", "outcome"]}
    labels = xr.DataArray(held_out["label"].values, dims=("locus", "task"), coords=coords)
    per_member = xr.DataArray(predictions, dims=("member", "locus", "task"), coords=coords)
    noise = xr.DataArray(poisson_anscombe_variance(held_out["expected_count"].values), dims=("locus", "task"), coords=coords)
    return fit_calibration(labels, per_member, noise_variance=noise, ddof=ddof, source=source)


def _z(level: float) -> float:
    """Half-width in SDs of the central normal interval of ``level``."""
    return float(stats.norm.ppf(0.5 + level / 2.0))


def _coverage_map(abs_r: np.ndarray):
    """Increasing isotonic map from nominal half-width ``|r|`` (i.e. expected coverage) to observed coverage.

    The points are (0, 0) and, for each held-out point, its ``|r_j|`` and the
    fraction of points with ``|r| <= |r_j|``.
    """
    from sklearn.isotonic import IsotonicRegression

    x = np.concatenate([[0.0], np.sort(abs_r)])
    observed = np.searchsorted(x[1:], x, side="right") / abs_r.size
    return IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, observed)


def _inverse(curve, level: float) -> float:
    """The half-width at which the isotonic map first reaches ``level`` (linear between its points)."""
    x, fitted = curve.X_thresholds_, curve.y_thresholds_
    i = int(np.searchsorted(fitted, level, side="left"))
    if i == 0 or fitted[i] == level:
        return float(x[i])
    t = (level - fitted[i - 1]) / (fitted[i] - fitted[i - 1])
    return float(x[i - 1] + t * (x[i] - x[i - 1]))


def _task_factor(error: np.ndarray, s2: np.ndarray, v: np.ndarray, level: float, task: str) -> float:
    """The factor k of one task: ``C_k(level) = level`` for absolute errors, ensemble variances, noise variances.

    Without noise ``k = z(C_1^-1(level)) / z(level)``; with noise, the root in k
    of the nonincreasing ``excess(k) = z(C_k^-1(level)) - z(level)`` (Brent).
    """
    z_level = _z(level)

    def half_width(k: float) -> float:
        return _inverse(_coverage_map(error / np.sqrt(k * k * s2 + v)), level)

    if not v.any():
        return half_width(1.0) / z_level

    def excess(k: float) -> float:
        return half_width(k) - z_level

    low = 1e-8
    if excess(low) <= 0:
        raise InputError(
            f"task {task!r}: the label noise variance alone already covers at least {level:.0%} of the "
            f"{error.size} held-out labels, so the ensemble SD cannot be calibrated from them "
            "(use more held-out loci or check noise_variance)"
        )
    high = 1.0
    while excess(high) > 0:
        high *= 2.0
        if high > 1e12:
            raise InputError(f"task {task!r}: no SE factor below 1e12 makes the {level:.0%} interval hold")
    return float(optimize.brentq(excess, low, high, xtol=1e-12, rtol=1e-12))


def _aligned_inputs(labels: xr.DataArray, predictions: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Labels (locus, task) and predictions (member, locus, task), matched by task name and locus id."""
    for name, arr, dims in (("labels", labels, {"locus", "task"}), ("predictions", predictions,
                                                                      {"member", "locus", "task"})):
        if not isinstance(arr, xr.DataArray):
            raise InputError(f"{name} must be an xarray.DataArray with dims {sorted(dims)}, got {type(arr).__name__}")
        if set(arr.dims) != dims:
            raise InputError(f"{name} has dims {arr.dims}, expected {sorted(dims)}")
        if "task" not in arr.coords:
            raise InputError(f"{name} has no 'task' coordinate; give the task names so factors match the effects")
    tasks = [str(t) for t in labels["task"].values]
    predicted = {str(t) for t in predictions["task"].values}
    missing = [t for t in tasks if t not in predicted]
    if missing:
        raise InputError(f"predictions lack task(s) {missing} that labels has; predictions has {sorted(predicted)}")
    if len(set(tasks)) != len(tasks):
        raise InputError(f"labels has duplicate task names {tasks}")
    y = labels.astype(np.float64).transpose("locus", "task")
    p = predictions.astype(np.float64).assign_coords(task=[str(t) for t in predictions["task"].values])
    p = p.sel(task=tasks).assign_coords(task=y["task"].values)
    if "locus" in y.coords and "locus" in p.coords:
        ids = _names(y["locus"])
        available = _names(p["locus"])
        absent = ~np.isin(ids, available)
        if absent.any():
            raise InputError(
                f"predictions lack {int(absent.sum())} of the labels' loci (first: {ids[np.argmax(absent)]!r})"
            )
        if len(set(ids)) != ids.size:
            raise InputError("labels has duplicate locus ids")
        p = p.assign_coords(locus=available).sel(locus=ids).assign_coords(locus=y["locus"].values)
    elif y.sizes["locus"] != p.sizes["locus"]:
        raise InputError(f"labels has {y.sizes['locus']} loci but predictions has {p.sizes['locus']}")
    else:
        p = p.drop_vars("locus", errors="ignore").assign_coords(
            {"locus": y["locus"].values} if "locus" in y.coords else {})
    p = p.transpose("member", "locus", "task")
    for name, arr in (("labels", y), ("predictions", p)):
        bad = int((~np.isfinite(arr.values)).sum())
        if bad:
            raise InputError(f"{name} has {bad} non-finite value(s)")
    return y, p


def _noise_variance(noise: float | Mapping[str, float] | xr.DataArray, y: xr.DataArray) -> xr.DataArray:
    """The label noise variance broadcast to the labels' (locus, task)."""
    tasks = [str(t) for t in y["task"].values]
    if isinstance(noise, xr.DataArray):
        extra = set(noise.dims) - {"locus", "task"}
        if extra:
            raise InputError(f"noise_variance has dims {noise.dims}; only 'locus' and 'task' are allowed")
        v = noise.astype(np.float64)
        for dim in v.dims:
            if dim in v.coords and dim in y.coords:
                wanted, have = _names(y[dim]), _names(v[dim])
                absent = ~np.isin(wanted, have)
                if absent.any():
                    raise InputError(
                        f"noise_variance lacks {int(absent.sum())} {dim}(s) of the labels "
                        f"(first: {wanted[np.argmax(absent)]!r})"
                    )
                v = v.assign_coords({dim: have}).sel({dim: wanted}).assign_coords({dim: y[dim].values})
            elif v.sizes[dim] != y.sizes[dim]:
                raise InputError(f"noise_variance has {v.sizes[dim]} {dim}(s), labels has {y.sizes[dim]}")
            else:
                v = v.drop_vars(dim, errors="ignore").assign_coords({dim: y[dim].values} if dim in y.coords else {})
        v = v.broadcast_like(y).transpose("locus", "task")
    elif isinstance(noise, Mapping):
        missing = [t for t in tasks if t not in noise]
        if missing:
            raise InputError(f"noise_variance has no value for task(s) {missing}")
        v = xr.full_like(y, 0.0) + xr.DataArray([float(noise[t]) for t in tasks], dims="task",
                                                 coords={"task": y["task"].values})
    else:
        v = xr.full_like(y, float(noise))
    values = v.values
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError("noise_variance must be finite and >= 0")
    return v


def _names(coordinate: xr.DataArray) -> np.ndarray:
    """A coordinate's values as a numpy unicode array (whatever string dtype it was stored with)."""
    return np.array([str(x) for x in coordinate.values.tolist()], dtype=str)


def _as_lists(value: Any) -> Any:
    """Tuples (nested) to lists, so a record is plain JSON."""
    if isinstance(value, tuple):
        return [_as_lists(v) for v in value]
    return value
