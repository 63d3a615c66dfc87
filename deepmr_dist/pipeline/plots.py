"""Figures of a run: the global-CE forest plot, the per-locus MR scatter, the spacing heatmap.

- :func:`forest_plot` (the paper's Fig 3): one row per (exposure, outcome)
  pair, the global CE with a narrow dark +- 2 SE bar and a wide light +- 2 tau
  bar (``tau = sqrt(tau2)``), a zero line, and the number of loci ``k``.
- :func:`mr_scatter`: one locus and pair, the instruments' outcome effects
  against their exposure effects (+- 1 SE bars), oriented as MR-Egger does
  (``bx > 0``), with the fitted MR-Egger line and the IVW line through the
  origin.
- :func:`spacing_heatmap` (the paper's S1 Fig): global CE per (pair, motif
  spacing bin) from :func:`deepmr_dist.stages.spacing.stratified_global_ce`.

Figures are built on matplotlib's Agg canvas without pyplot (no global state,
no display needed) and returned; :func:`save_figure` writes one to a file and
:func:`figure_to_base64_png` encodes one for embedding in HTML. Artists that
tests and post-processing look for carry a ``gid`` (the ``*_GID`` constants).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepmr_dist.stages import instruments
from deepmr_dist.errors import InputError

__all__ = [
    "EGGER_GID",
    "EGGER_METHODS",
    "ESTIMATE_GID",
    "INSTRUMENTS_GID",
    "IVW_GID",
    "IVW_METHODS",
    "check_value",
    "figure_to_base64_png",
    "forest_plot",
    "mr_scatter",
    "new_figure",
    "recorded_pooled_stats",
    "save_figure",
    "spacing_heatmap",
]

ESTIMATE_GID = "estimate"
"""``gid`` of the forest plot's line of point estimates (one marker per pair with a finite CE)."""

INSTRUMENTS_GID = "instruments"
"""``gid`` of the MR scatter's line of instrument markers."""

EGGER_GID = "egger_line"
"""``gid`` of the MR scatter's fitted MR-Egger line."""

IVW_GID = "ivw_line"
"""``gid`` of the MR scatter's IVW line through the origin."""

EGGER_METHODS: tuple[str, ...] = ("egger", "robust_egger", "egger_paper", "egger_simex")
"""MR methods with an intercept, whose fit :func:`mr_scatter` can draw as a line."""

IVW_METHODS: tuple[str, ...] = ("ivw", "ivw_random", "ivw_fixed")
"""IVW methods of the scatter's line through the origin, in order of preference (same slope)."""


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot state), constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bar(half_width: np.ndarray) -> np.ndarray:
    """Error-bar half-widths with non-finite ones drawn as no bar (0)."""
    return np.where(np.isfinite(half_width), half_width, 0.0)


def _require(ds: xr.Dataset, what: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise InputError(f"{what} lacks {', '.join(map(repr, missing))}")


def check_value(ds: xr.Dataset, what: str, dim: str, value: str) -> None:
    """Raise an :class:`InputError` listing the valid values when ``value`` is not in ``ds[dim]``."""
    known = [str(v) for v in ds[dim].values]
    if value not in known:
        raise InputError(f"{what} has no {dim} {value!r}; it has {', '.join(known[:20])}")


def _pick(ds: xr.Dataset, what: str, dim: str, value: str) -> xr.Dataset:
    """``ds.sel({dim: value})`` after :func:`check_value`."""
    check_value(ds, what, dim, value)
    return ds.sel({dim: value})


# --------------------------------------------------------------------------- forest plot


def forest_plot(global_: xr.Dataset, method: str) -> Figure:
    """The paper's Fig 3: global CE of every pair for one MR method.

    Parameters
    ----------
    global_ : xr.Dataset
        Output of :func:`deepmr_dist.stages.causal_effects.global_ce` (dims ``(pair, method)``
        with ``global_ce``, ``global_se``, ``tau2`` and ``k``).
    method : str
        The MR method to draw.

    Returns
    -------
    matplotlib.figure.Figure
        One row per pair, top to bottom in the order of ``global_.pair``
        (labelled on the y axis); the estimate (markers on the line with gid
        :data:`ESTIMATE_GID`) with +- 2 SE and +- 2 tau bars, a dashed zero
        line, and ``k = ...`` at the right of every row. A pair without a
        finite estimate keeps its row and label but has no marker.
    """
    _require(global_, "global CE dataset", ("global_ce", "global_se", "tau2", "k", "pair"))
    part = _pick(global_, "global CE dataset", "method", method)
    labels = [str(p) for p in part["pair"].values]
    est = np.asarray(part["global_ce"].values, dtype=np.float64)
    se = np.asarray(part["global_se"].values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        tau = np.sqrt(np.asarray(part["tau2"].values, dtype=np.float64))
    k = np.asarray(part["k"].values)
    rows = np.arange(len(labels))[::-1].astype(np.float64)  # first pair on top
    shown = np.isfinite(est)
    fig = new_figure(6.4, 1.2 + 0.4 * len(labels))
    ax = fig.subplots()
    ax.errorbar(est[shown], rows[shown], xerr=_bar(2 * tau[shown]), fmt="none", ecolor="tab:orange",
                elinewidth=5, alpha=0.35, label="±2 τ")
    points = ax.errorbar(est[shown], rows[shown], xerr=_bar(2 * se[shown]), fmt="o", markersize=4,
                         color="tab:blue", ecolor="tab:blue", elinewidth=1.5, capsize=3, label="global CE ±2 SE")
    points.lines[0].set_gid(ESTIMATE_GID)
    ax.axvline(0.0, color="0.4", linestyle="--", linewidth=1)
    for row, count in zip(rows, k, strict=True):
        ax.text(1.02, row, f"k = {int(count)}", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_yticks(rows, labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("global causal effect")
    ax.set_title(f"global CE ({method})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return fig


# --------------------------------------------------------------------------- MR scatter


def _check_selection(local: xr.Dataset, rule: str, threshold: float) -> None:
    """Raise when ``local`` records a different instrument selection than ``rule``/``threshold``."""
    recorded = (local.attrs.get("instrument_rule"), local.attrs.get("instrument_threshold"))
    if recorded[0] is not None and (recorded[0] != rule or not np.isclose(float(recorded[1]), threshold)):
        raise InputError(
            f"the local CEs were estimated with rule={recorded[0]!r}, threshold={recorded[1]}, "
            f"not rule={rule!r}, threshold={threshold}: the scatter would show other instruments"
        )


def recorded_pooled_stats(effects: xr.Dataset, local: xr.Dataset, exposure: str) -> dict[str, tuple[float, float]]:
    """The exposure's pooled mean and SD: as recorded by ``local_ce``, else recomputed over ``effects``."""
    recorded = local.attrs.get("pooled_stats", {})
    if exposure in recorded:
        center, scale = recorded[exposure]
        return {exposure: (float(center), float(scale))}
    return instruments.pooled_stats(effects, [exposure], ddof=int(local.attrs.get("instrument_ddof", 0)))


def mr_scatter(
    effects: xr.Dataset,
    local: xr.Dataset,
    locus: str,
    pair: str,
    *,
    rule: str,
    threshold: float,
    method: str = "egger",
) -> Figure:
    """MR scatter of one locus and pair: instrument effects on the outcome vs on the exposure.

    The instruments are selected with :func:`deepmr_dist.stages.instruments.select`
    exactly as :func:`deepmr_dist.stages.causal_effects.local_ce` did (for ``pooled_z``
    with the pooled statistics recorded in ``local.attrs``, else recomputed
    over all of ``effects``). Each instrument is oriented as MR-Egger does:
    ``(|bx|, sign(bx) by)``; its bars are +- 1 SE (``bxse``, ``byse``).

    Parameters
    ----------
    effects : xr.Dataset
        ``effect`` and ``effect_se`` with dims ``(locus, position, allele, task)``.
    local : xr.Dataset
        Output of :func:`deepmr_dist.stages.causal_effects.local_ce` on ``effects``.
    locus : str
        Locus name.
    pair : str
        Pair label ``"EXPOSURE->OUTCOME"`` of ``local.pair``.
    rule, threshold
        The instrument selection of the MR (must match ``local.attrs`` when
        recorded there).
    method : str
        An MR method of ``local`` with an intercept (:data:`EGGER_METHODS`),
        drawn as ``intercept + estimate * bx`` (gid :data:`EGGER_GID`). The
        IVW estimate of ``local`` (first of :data:`IVW_METHODS` present) is
        drawn as a line through the origin (gid :data:`IVW_GID`). Lines with a
        non-finite estimate are left out.

    Returns
    -------
    matplotlib.figure.Figure
        Markers (gid :data:`INSTRUMENTS_GID`) one per instrument.

    Raises
    ------
    InputError
        Unknown locus, pair or method, a method without an intercept, or a
        selection that differs from the one recorded in ``local``.
    """
    if method not in EGGER_METHODS:
        raise InputError(f"mr_scatter draws a fitted line with an intercept; method must be one of "
                         f"{', '.join(EGGER_METHODS)}, got {method!r}")
    instruments.check_rule(rule, threshold)
    _require(local, "local CE dataset", ("local_ce", "intercept", "exposure", "outcome"))
    _check_selection(local, rule, float(threshold))
    at = _pick(_pick(local, "local CE dataset", "pair", pair), "local CE dataset", "locus", locus)
    fit = _pick(at, "local CE dataset", "method", method)
    exposure, outcome = str(at["exposure"].values), str(at["outcome"].values)
    check_value(effects, "effects dataset", "locus", locus)
    one = effects.sel(locus=[locus])
    stats = recorded_pooled_stats(effects, local, exposure) if rule == "pooled_z" else None
    mask = instruments.select(one, exposure, rule=rule, threshold=float(threshold), stats=stats).values.ravel()
    values = {
        name: np.asarray(one[var].sel(task=task).transpose("locus", "position", "allele").values,
                         dtype=np.float64).ravel()[mask]
        for name, var, task in (("bx", "effect", exposure), ("bxse", "effect_se", exposure),
                                ("by", "effect", outcome), ("byse", "effect_se", outcome))
    }  # fmt: skip
    x, y = np.abs(values["bx"]), np.sign(values["bx"]) * values["by"]
    fig = new_figure(5.0, 4.4)
    ax = fig.subplots()
    points = ax.errorbar(x, y, xerr=values["bxse"], yerr=values["byse"], fmt="o", markersize=3,
                         color="tab:blue", ecolor="0.6", elinewidth=0.8, label="instrument ±1 SE")
    points.lines[0].set_gid(INSTRUMENTS_GID)
    x_end = float(np.nanmax(x, initial=0.0)) * 1.05 or 1.0
    slope, intercept = float(fit["local_ce"].values), float(fit["intercept"].values)
    if np.isfinite(slope) and np.isfinite(intercept):
        ax.plot([0.0, x_end], [intercept, intercept + slope * x_end], color="tab:red", gid=EGGER_GID,
                label=f"{method}: {intercept:.3g} + {slope:.3g} bx")
    ivw = next((m for m in IVW_METHODS if m in set(map(str, local["method"].values))), None)
    if ivw is not None:
        ivw_slope = float(at["local_ce"].sel({"method": ivw}).values)
        if np.isfinite(ivw_slope):
            ax.plot([0.0, x_end], [0.0, ivw_slope * x_end], color="tab:green", linestyle="--", gid=IVW_GID,
                    label=f"{ivw}: {ivw_slope:.3g} bx")
    ax.axhline(0.0, color="0.8", linewidth=0.8)
    ax.set_xlabel(f"effect on exposure {exposure} (oriented, |bx|)")
    ax.set_ylabel(f"effect on outcome {outcome} (sign(bx) by)")
    ax.set_title(f"{locus}: {pair} ({int(mask.sum())} instruments)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return fig


# --------------------------------------------------------------------------- spacing heatmap


def spacing_heatmap(table: pd.DataFrame, *, method: str | None = None) -> Figure:
    """The paper's S1 Fig: global CE per (pair, motif-spacing bin) as a heatmap.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`deepmr_dist.stages.spacing.stratified_global_ce` (columns
        pair, bin, k, estimate; and method).
    method : str, optional
        The MR method to draw; required when ``table`` holds several.

    Returns
    -------
    matplotlib.figure.Figure
        Rows are pairs (in order of first appearance), columns bins (in the
        categorical order of ``bin``, else order of first appearance); the
        colour is the estimate on a diverging scale centred on 0 (blank where
        undefined), and every cell has the text ``"<estimate>\\nk=<k>"``
        (``"n/a"`` for an undefined estimate).
    """
    missing = [c for c in ("pair", "bin", "k", "estimate") if c not in table.columns]
    if missing:
        raise InputError(f"spacing table lacks column(s) {', '.join(missing)}")
    if "method" in table.columns:
        methods = list(pd.unique(table["method"]))
        if method is None and len(methods) > 1:
            raise InputError(f"spacing table holds methods {', '.join(map(str, methods))}; pass method=")
        method = methods[0] if method is None else method
        if method not in methods:
            raise InputError(f"spacing table has no method {method!r}; it has {', '.join(map(str, methods))}")
        table = table[table["method"] == method]
    pairs = list(pd.unique(table["pair"]))
    bins = list(table["bin"].cat.categories) if isinstance(table["bin"].dtype, pd.CategoricalDtype) else list(
        pd.unique(table["bin"])
    )
    if table.duplicated(["pair", "bin"]).any():
        raise InputError("spacing table has more than one row for a (pair, bin)")
    est = table.pivot(index="pair", columns="bin", values="estimate").reindex(index=pairs, columns=bins)
    k = table.pivot(index="pair", columns="bin", values="k").reindex(index=pairs, columns=bins).fillna(0)
    values = est.to_numpy(dtype=np.float64)
    limit = float(np.nanmax(np.abs(values), initial=0.0)) or 1.0
    fig = new_figure(1.6 + 1.1 * len(bins), 1.4 + 0.45 * len(pairs))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(pairs)):
        for j in range(len(bins)):
            shown = f"{values[i, j]:.2f}" if np.isfinite(values[i, j]) else "n/a"
            ax.text(j, i, f"{shown}\nk={int(k.iat[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(bins)), [str(b) for b in bins])
    ax.set_yticks(range(len(pairs)), [str(p) for p in pairs])
    ax.set_xlabel("motif spacing (bp)")
    ax.set_title("global CE by motif spacing" + (f" ({method})" if method is not None else ""), fontsize=10)
    fig.colorbar(image, ax=ax, label="global CE")
    return fig


# --------------------------------------------------------------------------- output


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. .png, .pdf, .svg); parents are created.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def figure_to_base64_png(fig: Figure, *, dpi: int = 150) -> str:
    """``fig`` as a base64-encoded PNG (ASCII), for ``<img src="data:image/png;base64,...">``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
