"""Metrics of the paper's simulation study: local coverage per round and Table 1 over rounds.

Inputs are plain pandas tables, so the metrics know nothing about stores or clusters.

- :func:`local_coverage` (and :func:`local_coverage_counts`): per round, the
  fraction of loci whose confidence interval holds their OWN true causal
  effect, matched by locus id (the original code paired rows by position
  across two different sets of loci; SIMULATION.md defect 7).
- :func:`table1`: per scenario, over rounds, the paper's Table 1 (global CE
  accuracy, global coverage within +- 2 tau, local CI coverage) plus the
  random-effects CI coverage, with the paper's values beside ours;
  :func:`table1_markdown` renders it.
- :func:`method_table`: per scenario and method, what the paper's metrics
  cannot see: the bias of the global estimate against the true global CE,
  its relative bias, the fraction of rounds whose global CI holds the truth,
  and the mean local CI coverage; :func:`method_table_markdown` renders it.

The ``rounds`` table has one row per (scenario, round, method); see
:data:`ROUND_COLUMNS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.generator import SCENARIOS

MR_METHOD = "egger_paper"
"""The paper's MR rule (robust MR-Egger above 10 instruments, MR-Egger from 3 to 10) with DL meta-analysis."""

BASELINE_METHOD = "wald_mean"
"""The paper's baseline: per locus the mean Wald ratio, globally their mean, interval +- 2 SD."""

ROUND_COLUMNS: dict[str, str] = {
    "scenario": "scenario number 1-4 (unconfounded, random, sequence, both)",
    "round": "round index",
    "method": f"method name ({MR_METHOD!r} the paper's MR rule, {BASELINE_METHOD!r} the baseline; others allowed)",
    "estimate": "global CE estimate",
    "tau": "between-locus SD (DL tau for MR methods, SD of per-locus estimates for the baseline)",
    "ci_lower": "lower bound of the global estimate's random-effects CI",
    "ci_upper": "upper bound of the global estimate's random-effects CI",
    "true_ce": "the round's true global CE",
    "local_coverage": "fraction of loci whose CI holds their true CE (NaN if not computed)",
}
"""Columns of the ``rounds`` table and their meaning."""

PAPER_TABLE1: dict[int, dict[str, float]] = {
    1: {"accuracy_mr": 0.97, "accuracy_baseline": 0.98, "coverage_mr": 1.00, "coverage_baseline": 1.00,
        "local_coverage": 0.87},
    2: {"accuracy_mr": 0.98, "accuracy_baseline": 0.97, "coverage_mr": 1.00, "coverage_baseline": 0.96,
        "local_coverage": 0.81},
    3: {"accuracy_mr": 0.97, "accuracy_baseline": 0.98, "coverage_mr": 0.98, "coverage_baseline": 0.86,
        "local_coverage": 0.87},
    4: {"accuracy_mr": 0.78, "accuracy_baseline": 0.96, "coverage_mr": 0.98, "coverage_baseline": 0.92,
        "local_coverage": 0.81},
}
"""Table 1 of Malina et al. 2022 (MR = robust/plain MR-Egger with DL meta-analysis), per scenario."""

MIN_ROUNDS_FOR_ACCURACY = 3
"""R^2 over fewer rounds is not reported (two points always give 1)."""


@dataclass(frozen=True)
class LocalCoverage:
    """Local CI coverage of one round, with every locus accounted for.

    Attributes
    ----------
    coverage
        ``n_covered / n_evaluated`` (NaN if no locus could be evaluated).
    n_covered
        Loci whose CI holds their true CE (bounds inclusive).
    n_evaluated
        Loci with a finite CI and a finite true CE.
    n_nan_ci
        Loci with a true CE whose estimate has a NaN bound (excluded).
    n_without_truth
        Loci with an estimate but no finite true CE, e.g. no exposure motif (excluded).
    n_without_estimate
        Loci with a true CE but no row in the estimates (excluded).
    """

    coverage: float
    n_covered: int
    n_evaluated: int
    n_nan_ci: int
    n_without_truth: int
    n_without_estimate: int


def local_coverage_counts(local: pd.DataFrame, truth: pd.Series) -> LocalCoverage:
    """Local CI coverage of one round and the count of every locus left out.

    Loci are matched by id, never by row order. A locus id present on one side
    only is not an error but counted: the true CE exists only for loci with an
    exposure motif, while MR may estimate others (``n_without_truth``), and MR
    may leave a locus without a row (``n_without_estimate``). Loci with a NaN
    CI bound are excluded and counted (``n_nan_ci``).

    Parameters
    ----------
    local
        One row per locus with columns ``locus``, ``ci_lower``, ``ci_upper``
        (one method and one exposure-outcome pair; filter before calling).
    truth
        True CE per locus, indexed by locus id.

    Returns
    -------
    LocalCoverage

    Raises
    ------
    InputError
        If a column is missing, a locus id is repeated, a bound is not numeric,
        a lower bound exceeds its upper bound, or the two sides share no locus
        id at all (ids from different naming schemes or rounds).
    """
    missing = [c for c in ("locus", "ci_lower", "ci_upper") if c not in local.columns]
    if missing:
        raise InputError(f"local estimates lack column(s) {missing}; they have {list(local.columns)}")
    if not isinstance(truth, pd.Series):
        raise InputError(f"truth must be a pandas Series indexed by locus id, got {type(truth).__name__}")
    for name, ids in (("local estimates", local["locus"]), ("truth", truth.index.to_series())):
        repeated = ids[ids.duplicated()]
        if len(repeated):
            raise InputError(f"{name} repeat locus id(s) {repeated.astype(str).unique()[:3].tolist()}; "
                             "give one row per locus (one method and pair)")
    bounds = local.set_index(local["locus"].astype(str))[["ci_lower", "ci_upper"]]
    try:
        bounds = bounds.astype(np.float64)
        true = truth.set_axis(truth.index.astype(str)).astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"CI bounds and true CEs must be numeric: {exc}") from exc
    true = true[np.isfinite(true.to_numpy())]
    if len(bounds) and len(true) and not bounds.index.isin(true.index).any():
        raise InputError(
            f"local estimates and truth share no locus id (estimates: {bounds.index[0]!r}, ..., "
            f"truth: {true.index[0]!r}, ...); match them by the same ids"
        )
    matched = bounds.index.isin(true.index)
    both = bounds[matched]
    lower, upper = both["ci_lower"].to_numpy(), both["ci_upper"].to_numpy()
    finite = np.isfinite(lower) & np.isfinite(upper)
    inverted = finite & (lower > upper)
    if inverted.any():
        raise InputError(f"{int(inverted.sum())} loci have ci_lower > ci_upper (first: {both.index[inverted][0]!r})")
    value = true.reindex(both.index).to_numpy()
    covered = int(((lower <= value) & (value <= upper))[finite].sum())
    evaluated = int(finite.sum())
    return LocalCoverage(
        coverage=covered / evaluated if evaluated else math.nan,
        n_covered=covered,
        n_evaluated=evaluated,
        n_nan_ci=int((~finite).sum()),
        n_without_truth=int((~matched).sum()),
        n_without_estimate=int((~true.index.isin(bounds.index)).sum()),
    )


def local_coverage(local: pd.DataFrame, truth: pd.Series) -> float:
    """Fraction of loci whose CI holds their own true CE, matched by locus id.

    The fraction of :func:`local_coverage_counts`, whose result also counts
    the loci left out (NaN CI, no true CE, no estimate).
    """
    return local_coverage_counts(local, truth).coverage


def check_rounds(rounds: pd.DataFrame) -> pd.DataFrame:
    """Validate a ``rounds`` table (see :data:`ROUND_COLUMNS`) and return it with clean dtypes.

    Raises
    ------
    InputError
        If a column is missing or not numeric, a scenario is not 1-4, a
        (scenario, round, method) appears twice, or methods disagree on a
        round's true CE.
    """
    if not isinstance(rounds, pd.DataFrame):
        raise InputError(f"rounds must be a pandas DataFrame, got {type(rounds).__name__}")
    missing = [c for c in ROUND_COLUMNS if c not in rounds.columns]
    if missing:
        raise InputError(f"rounds lacks column(s) {missing}; expected {list(ROUND_COLUMNS)}")
    table = rounds.loc[:, list(ROUND_COLUMNS)].copy()
    for column in ("scenario", "round"):
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or (values != values.round()).any():
            raise InputError(f"rounds column {column!r} must hold integers")
        table[column] = values.astype(int)
    unknown = sorted(set(table["scenario"]) - set(SCENARIOS))
    if unknown:
        raise InputError(f"rounds has unknown scenario(s) {unknown}; expected 1-4")
    table["method"] = table["method"].astype(str)
    for column in ("estimate", "tau", "ci_lower", "ci_upper", "true_ce", "local_coverage"):
        values = pd.to_numeric(table[column], errors="coerce")
        if (values.isna() & table[column].notna()).any():
            raise InputError(f"rounds column {column!r} must be numeric")
        table[column] = values.astype(np.float64)
    repeated = table.duplicated(["scenario", "round", "method"])
    if repeated.any():
        first = table.loc[repeated].iloc[0]
        raise InputError(
            f"rounds has {int(repeated.sum())} repeated (scenario, round, method) rows, first scenario "
            f"{first['scenario']}, round {first['round']}, method {first['method']!r}"
        )
    truth_spread = table.groupby(["scenario", "round"])["true_ce"].agg(lambda x: x.max() - x.min())
    disagree = truth_spread[truth_spread > 1e-12 * (1 + table["true_ce"].abs().max())]
    if len(disagree):
        pairs = ", ".join(f"({int(s)}, {int(r)})" for s, r in disagree.index[:3])
        raise InputError(f"methods disagree on the true CE of (scenario, round) {pairs}")
    return table


def table1(rounds: pd.DataFrame, *, method: str = MR_METHOD, baseline: str = BASELINE_METHOD) -> pd.DataFrame:
    """The paper's Table 1 from per-round results, with the paper's values beside ours.

    Per scenario, over rounds: global CE accuracy = R^2 (squared Pearson
    correlation) of estimate vs true CE (reported from
    :data:`MIN_ROUNDS_FOR_ACCURACY` rounds on); global coverage = fraction of
    rounds with the true CE within estimate +- 2 tau; RE CI coverage =
    fraction with it inside [ci_lower, ci_upper]; local coverage = mean over
    rounds of ``method``'s local coverage. Each metric uses the rounds where
    its inputs are finite; ``n_undefined_*`` counts the rounds where a method
    has no finite estimate (NaN, or no row).

    Parameters
    ----------
    rounds
        One row per (scenario, round, method), columns :data:`ROUND_COLUMNS`.
    method, baseline
        The MR method and the baseline compared (the paper's by default).

    Returns
    -------
    pandas.DataFrame
        Indexed by scenario; columns ``scenario_name``, ``n_rounds``,
        ``n_undefined_mr``, ``n_undefined_baseline``, ``accuracy_mr``,
        ``accuracy_baseline``, ``coverage_mr``, ``coverage_baseline``,
        ``ci_coverage_mr``, ``ci_coverage_baseline``, ``local_coverage`` and
        ``paper_`` + each column of :data:`PAPER_TABLE1`. Attrs name the methods.
    """
    table = check_rounds(rounds)
    for name in (method, baseline):
        if name not in set(table["method"]):
            raise InputError(f"rounds has no row of method {name!r}; it has {sorted(set(table['method']))}")
    rows = []
    for scenario, part in table.groupby("scenario", sort=True):
        n_rounds = part["round"].nunique()
        row: dict[str, object] = {"scenario": scenario, "scenario_name": SCENARIOS[scenario], "n_rounds": n_rounds}
        for label, name in (("mr", method), ("baseline", baseline)):
            rows_of = part[part["method"] == name]
            row[f"n_undefined_{label}"] = n_rounds - int(np.isfinite(rows_of["estimate"]).sum())
            row[f"accuracy_{label}"] = _r_squared(rows_of["estimate"].to_numpy(), rows_of["true_ce"].to_numpy())
            row[f"coverage_{label}"] = _fraction(rows_of["true_ce"], rows_of["estimate"] - 2 * rows_of["tau"],
                                                 rows_of["estimate"] + 2 * rows_of["tau"])
            row[f"ci_coverage_{label}"] = _fraction(rows_of["true_ce"], rows_of["ci_lower"], rows_of["ci_upper"])
            if label == "mr":
                local = rows_of["local_coverage"].to_numpy()
                row["local_coverage"] = float(np.mean(local[np.isfinite(local)])) if np.isfinite(local).any() else math.nan
        for key, value in PAPER_TABLE1[scenario].items():
            row[f"paper_{key}"] = value
        rows.append(row)
    out = pd.DataFrame(rows).set_index("scenario")
    out.attrs.update({"mr_method": method, "baseline_method": baseline})
    return out


METHOD_TABLE_COLUMNS: dict[str, str] = {
    "n_rounds": "rounds of the scenario",
    "n_defined": "rounds with a finite global estimate",
    "bias": "mean over rounds of (estimate - true global CE)",
    "relative_bias": "mean bias / mean true global CE",
    "ci_coverage": "fraction of rounds whose global CI [ci_lower, ci_upper] holds the true global CE",
    "local_coverage": "mean over rounds of the fraction of loci whose CI holds their own true CE",
    "accuracy": "R^2 of estimate vs true CE over rounds (the paper's accuracy)",
}
"""Columns of :func:`method_table` and their meaning."""


def method_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """Bias and coverage of every method's global estimate, per scenario.

    Each metric uses the rounds where its inputs are finite.

    Parameters
    ----------
    rounds
        One row per (scenario, round, method), columns :data:`ROUND_COLUMNS`.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``(scenario, method)``; columns ``scenario_name`` and
        :data:`METHOD_TABLE_COLUMNS`.
    """
    table = check_rounds(rounds)
    rows = []
    for (scenario, method), part in table.groupby(["scenario", "method"], sort=True):
        est, true = part["estimate"].to_numpy(), part["true_ce"].to_numpy()
        keep = np.isfinite(est) & np.isfinite(true)
        bias = float(np.mean(est[keep] - true[keep])) if keep.any() else math.nan
        mean_true = float(np.mean(true[keep])) if keep.any() else math.nan
        local = part["local_coverage"].to_numpy()
        rows.append({
            "scenario": scenario, "method": method, "scenario_name": SCENARIOS[scenario],
            "n_rounds": part["round"].nunique(), "n_defined": int(keep.sum()), "bias": bias,
            "relative_bias": bias / mean_true if mean_true else math.nan,
            "ci_coverage": _fraction(part["true_ce"], part["ci_lower"], part["ci_upper"]),
            "local_coverage": float(np.mean(local[np.isfinite(local)])) if np.isfinite(local).any() else math.nan,
            "accuracy": _r_squared(est, true),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index(["scenario", "method"])


def method_table_markdown(table: pd.DataFrame) -> str:
    """Render :func:`method_table` output as Markdown: bias (absolute, relative) and CI coverage per method."""
    missing = [c for c in ("scenario_name", *METHOD_TABLE_COLUMNS) if c not in table.columns]
    if missing:
        raise InputError(f"table lacks column(s) {missing}; pass the output of method_table()")
    lines = [
        "| scenario | method | rounds | bias | relative bias | global CI covers truth | local CI coverage | R² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (scenario, method), row in table.iterrows():
        rel = "n/a" if not np.isfinite(row["relative_bias"]) else f"{100 * row['relative_bias']:+.1f} %"
        bias = "n/a" if not np.isfinite(row["bias"]) else f"{row['bias']:+.3f}"
        rounds = f"{row['n_defined']}" + ("" if row["n_defined"] == row["n_rounds"] else f" of {row['n_rounds']}")
        lines.append(
            f"| {scenario} {row['scenario_name']} | {method} | {rounds} | {bias} | {rel} | "
            f"{_number(row['ci_coverage'])} | {_number(row['local_coverage'])} | {_number(row['accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def table1_markdown(table: pd.DataFrame) -> str:
    """Render :func:`table1` output as a Markdown table laid out like the paper's, ours beside the paper's.

    Values have two decimals; a metric that could not be computed shows ``n/a``.
    Scenarios with rounds lacking a finite estimate get a note below the table.
    """
    missing = [c for c in ("scenario_name", "n_rounds", "accuracy_mr", "paper_accuracy_mr") if c not in table.columns]
    if missing:
        raise InputError(f"table lacks column(s) {missing}; pass the output of table1()")
    mr, baseline = table.attrs.get("mr_method", MR_METHOD), table.attrs.get("baseline_method", BASELINE_METHOD)
    header = (
        f"| scenario | rounds | global CE accuracy R² ({mr} / {baseline}) | paper | "
        f"global coverage ±2τ ({mr} / {baseline}) | paper | RE CI coverage ({mr} / {baseline}) | "
        "local CI coverage | paper |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for scenario, row in table.iterrows():
        lines.append(
            f"| {scenario} {row['scenario_name']} | {row['n_rounds']} | "
            f"{_pair(row, 'accuracy')} | {_pair(row, 'paper_accuracy')} | "
            f"{_pair(row, 'coverage')} | {_pair(row, 'paper_coverage')} | {_pair(row, 'ci_coverage')} | "
            f"{_number(row['local_coverage'])} | {_number(row['paper_local_coverage'])} |"
        )
        undefined = {name: int(row[f"n_undefined_{label}"]) for label, name in (("mr", mr), ("baseline", baseline))
                     if row[f"n_undefined_{label}"]}
        if undefined:
            counts = ", ".join(f"{name} {count}" for name, count in undefined.items())
            notes.append(f"Scenario {scenario}: rounds without a finite estimate: {counts}.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _r_squared(estimate: np.ndarray, truth: np.ndarray) -> float:
    keep = np.isfinite(estimate) & np.isfinite(truth)
    if keep.sum() < MIN_ROUNDS_FOR_ACCURACY or np.ptp(estimate[keep]) == 0 or np.ptp(truth[keep]) == 0:
        return math.nan
    return float(np.corrcoef(estimate[keep], truth[keep])[0, 1] ** 2)


def _fraction(value: pd.Series, lower: pd.Series, upper: pd.Series) -> float:
    """Fraction of rows with ``lower <= value <= upper`` among rows where all three are finite."""
    v, lo, hi = value.to_numpy(), lower.to_numpy(), upper.to_numpy()
    keep = np.isfinite(v) & np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        return math.nan
    return float(np.mean((lo[keep] <= v[keep]) & (v[keep] <= hi[keep])))


def _number(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


def _pair(row: pd.Series, prefix: str) -> str:
    return f"{_number(row[f'{prefix}_mr'])} / {_number(row[f'{prefix}_baseline'])}"
