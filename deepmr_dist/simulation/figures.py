"""The paper's Fig 2 from per-round results: global CE accuracy and local coverage.

- :func:`global_ce_figure` (Fig 2a): per scenario, the estimated vs the true
  global CE across rounds, with +- 2 SE bars (SE from the random-effects CI,
  ``(ci_upper - ci_lower) / (2 * 1.96)``), wider +- 2 tau bars and the identity
  line; the MR method and the baseline side by side.
- :func:`local_coverage_figure` (Fig 2b): per scenario, each round's local CI
  coverage with the nominal level and the mean over rounds.
- :func:`bias_figure` (Fig 2c, not in the paper): per scenario, each round's
  global estimate minus the true global CE, relative to the truth, with its
  95 % CI, for every method in the table; a CI that misses 0 misses the truth.

Figures are built on matplotlib's Agg canvas without pyplot (no global state,
no display needed) and returned for the caller to save or show;
:func:`save_figures` writes both as PNG. Input: the ``rounds`` table of
:mod:`deepmr_dist.simulation.metrics`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.generator import SCENARIOS
from deepmr_dist.simulation.metrics import BASELINE_METHOD, MR_METHOD, check_rounds

Z_95 = 1.959963984540054
"""Half-width in SDs of a 95% normal interval: SE = CI width / (2 Z_95)."""

POINTS_GID = "rounds"
"""``gid`` of the line holding one marker per round in every panel (for tests and post-processing)."""

FILENAMES = {
    "global_ce": "fig2a_global_ce.png",
    "local_coverage": "fig2b_local_coverage.png",
    "bias": "fig2c_bias.png",
}


def global_ce_figure(rounds: pd.DataFrame, *, method: str = MR_METHOD, baseline: str = BASELINE_METHOD) -> Figure:
    """Fig 2a: estimated vs true global CE per scenario (columns) for ``method`` and ``baseline`` (rows).

    Each round with a finite estimate is one point; its +- 2 SE bar is dark and
    narrow, its +- 2 tau bar light and wide (a bar is left out where its SE or
    tau is not finite); the dashed line is the identity.
    """
    table = check_rounds(rounds)
    scenarios = sorted(table["scenario"].unique())
    methods = (method, baseline)
    for name in methods:
        if name not in set(table["method"]):
            raise InputError(f"rounds has no row of method {name!r}; it has {sorted(set(table['method']))}")
    fig = Figure(figsize=(3.2 * len(scenarios), 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(methods), len(scenarios), squeeze=False)
    for column, scenario in enumerate(scenarios):
        for row, name in enumerate(methods):
            ax = axes[row, column]
            part = table[(table["scenario"] == scenario) & (table["method"] == name)]
            part = part[np.isfinite(part["estimate"])]
            truth, estimate = part["true_ce"].to_numpy(), part["estimate"].to_numpy()
            se = (part["ci_upper"] - part["ci_lower"]).to_numpy() / (2 * Z_95)
            ax.errorbar(truth, estimate, yerr=_bar(2 * part["tau"].to_numpy()), fmt="none", ecolor="tab:orange",
                        elinewidth=4, alpha=0.35, label="±2 τ")
            points = ax.errorbar(truth, estimate, yerr=_bar(2 * se), fmt="o", markersize=3, color="tab:blue",
                                 ecolor="tab:blue", elinewidth=1, capsize=2, label="estimate ±2 SE")
            points.lines[0].set_gid(POINTS_GID)
            ax.axline((0.0, 0.0), slope=1.0, color="0.4", linestyle="--", linewidth=1, label="identity")
            ax.set_title(f"{SCENARIOS[scenario]}: {name}", fontsize=9)
            ax.set_xlabel("true global CE")
            ax.set_ylabel("estimated global CE")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    return fig


def local_coverage_figure(rounds: pd.DataFrame, *, method: str = MR_METHOD, level: float = 0.95) -> Figure:
    """Fig 2b: local CI coverage of ``method`` per round, one panel per scenario.

    Rounds whose local coverage is NaN are left out. The dotted line is the
    nominal ``level``, the dashed line the mean over the plotted rounds.
    """
    table = check_rounds(rounds)
    if method not in set(table["method"]):
        raise InputError(f"rounds has no row of method {method!r}; it has {sorted(set(table['method']))}")
    scenarios = sorted(table["scenario"].unique())
    fig = Figure(figsize=(3.2 * len(scenarios), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(scenarios), squeeze=False, sharey=True)[0]
    for ax, scenario in zip(axes, scenarios):
        part = table[(table["scenario"] == scenario) & (table["method"] == method)]
        part = part[np.isfinite(part["local_coverage"])].sort_values("round")
        ax.plot(part["round"], part["local_coverage"], "o", markersize=4, color="tab:blue", gid=POINTS_GID,
                label="round")
        ax.axhline(level, color="0.4", linestyle=":", linewidth=1, label=f"nominal {level:.0%}")
        if len(part):
            ax.axhline(part["local_coverage"].mean(), color="tab:blue", linestyle="--", linewidth=1, label="mean")
        ax.set_ylim(0.0, 1.05)
        ax.set_title(f"{SCENARIOS[scenario]}: {method}", fontsize=9)
        ax.set_xlabel("round")
    axes[0].set_ylabel("local CI coverage")
    axes[0].legend(fontsize=7, loc="lower left")
    return fig


def bias_figure(rounds: pd.DataFrame) -> Figure:
    """Fig 2c: relative bias ``(estimate - true) / true`` per round with its CI, every method, one panel per scenario.

    Methods are offset side by side within each round; rounds without a finite
    estimate or truth are left out.
    """
    table = check_rounds(rounds)
    scenarios = sorted(table["scenario"].unique())
    methods = sorted(table["method"].unique())
    fig = Figure(figsize=(3.6 * len(scenarios), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(scenarios), squeeze=False, sharey=True)[0]
    offsets = np.linspace(-0.3, 0.3, len(methods)) if len(methods) > 1 else np.zeros(1)
    for ax, scenario in zip(axes, scenarios):
        for offset, name in zip(offsets, methods):
            part = table[(table["scenario"] == scenario) & (table["method"] == name)].sort_values("round")
            part = part[np.isfinite(part["estimate"]) & np.isfinite(part["true_ce"]) & (part["true_ce"] != 0)]
            if part.empty:
                continue
            true = part["true_ce"].to_numpy()
            rel = (part["estimate"].to_numpy() - true) / true
            lower = (part["ci_lower"].to_numpy() - true) / true
            upper = (part["ci_upper"].to_numpy() - true) / true
            ax.errorbar(part["round"] + offset, rel, yerr=[_bar(rel - lower), _bar(upper - rel)], fmt="o",
                        markersize=3, elinewidth=0.8, label=name, gid=POINTS_GID)  # fmt: skip
        ax.axhline(0.0, color="0.3", linewidth=1)
        ax.set_title(SCENARIOS[scenario], fontsize=9)
        ax.set_xlabel("round")
    axes[0].set_ylabel("(global estimate - truth) / truth")
    axes[0].legend(fontsize=6, loc="best")
    return fig


def save_figures(
    rounds: pd.DataFrame,
    out_dir: str | Path,
    *,
    method: str = MR_METHOD,
    baseline: str = BASELINE_METHOD,
    dpi: int = 150,
) -> list[Path]:
    """Write Fig 2a, 2b and 2c as PNG files in ``out_dir`` (created if missing).

    Returns
    -------
    list of pathlib.Path
        ``out_dir`` / each name of :data:`FILENAMES`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "global_ce": global_ce_figure(rounds, method=method, baseline=baseline),
        "local_coverage": local_coverage_figure(rounds, method=method),
        "bias": bias_figure(rounds),
    }
    paths = []
    for key, fig in figures.items():
        path = out / FILENAMES[key]
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def _bar(half_width: np.ndarray) -> np.ndarray:
    """Error-bar half-widths with non-finite ones drawn as no bar (0)."""
    return np.where(np.isfinite(half_width), half_width, 0.0)
