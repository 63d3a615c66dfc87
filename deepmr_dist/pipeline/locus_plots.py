"""Figures of single loci and of the instruments: what every ISM user looks at first.

- :func:`effect_heatmap`: one locus, the position x allele effects of a pair's
  exposure and outcome tasks side by side (a diverging colour scale centred
  on 0, shared by both panels), the pair's instruments marked with dots and
  the reference base of each position shown as its own row label.
- :func:`effect_logo`: one locus and task, the reference bases drawn as
  letters whose heights are the mean |effect| of the three mutations at
  their position (the "importance" logo of ISM papers), in plain matplotlib.
- :func:`instrument_histogram`: instruments per locus, one histogram per pair.
- :func:`undefined_table`: per pair and method, the share of loci without an
  estimate, and the reasons.

Like :mod:`deepmr_dist.pipeline.plots`, figures are built without pyplot and returned.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import PathPatch
from matplotlib.path import Path as MplPath
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.plots import check_value, new_figure, recorded_pooled_stats
from deepmr_dist.stages import instruments

__all__ = [
    "HEATMAP_GID",
    "INSTRUMENT_MARKS_GID",
    "LOGO_GID",
    "effect_heatmap",
    "effect_logo",
    "instrument_histogram",
    "top_loci",
    "undefined_table",
]

HEATMAP_GID = "effect_heatmap"
"""``gid`` of each heatmap image of :func:`effect_heatmap`."""
INSTRUMENT_MARKS_GID = "instrument_marks"
"""``gid`` of the instrument dots of :func:`effect_heatmap` (one per instrument)."""
LOGO_GID = "logo_letter"
"""``gid`` of each letter of :func:`effect_logo`."""

ALPHABET = "ACGT"
_BASE_COLOURS = {"A": "#109648", "C": "#255C99", "G": "#F7B32B", "T": "#D62839", "N": "0.6"}


def _locus_effects(effects: xr.Dataset, locus: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``(position, allele)`` effect and SE of one locus and task, float64."""
    check_value(effects, "effects dataset", "locus", locus)
    check_value(effects, "effects dataset", "task", task)
    one = effects.sel(locus=locus, task=task)
    return (np.asarray(one["effect"].transpose("position", "allele").values, dtype=np.float64),
            np.asarray(one["effect_se"].transpose("position", "allele").values, dtype=np.float64))  # fmt: skip


def _reference_bases(effect: np.ndarray) -> str:
    """The reference base of each position: the allele whose effect is NaN (no mutation); N where none is."""
    nan = np.isnan(effect)
    return "".join(ALPHABET[int(np.argmax(row))] if row.sum() == 1 else "N" for row in nan)


def effect_heatmap(
    effects: xr.Dataset, local: xr.Dataset, locus: str, pair: str, *, rule: str, threshold: float
) -> Figure:
    """Position x allele effects of a pair's exposure and outcome at one locus, instruments marked.

    The instruments are those :func:`deepmr_dist.stages.causal_effects.local_ce`
    used (the rule and threshold recorded in ``local.attrs``; for ``pooled_z``
    with its recorded pooled statistics).

    Parameters
    ----------
    effects, local : xr.Dataset
        The ``effects`` and ``mr`` groups of a run.
    locus : str
        Locus name.
    pair : str
        A ``pair`` label of ``local`` (``"EXPOSURE->OUTCOME"``).
    rule, threshold
        The instrument selection.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels (exposure, outcome), images with gid :data:`HEATMAP_GID`,
        instruments as dots with gid :data:`INSTRUMENT_MARKS_GID` on the exposure panel.

    Raises
    ------
    InputError
        Unknown locus, pair or task.
    """
    check_value(local, "local CE dataset", "pair", pair)
    at = local.sel(pair=pair)
    exposure, outcome = str(at["exposure"].values), str(at["outcome"].values)
    bx, bxse = _locus_effects(effects, locus, exposure)
    by, _ = _locus_effects(effects, locus, outcome)
    stats = recorded_pooled_stats(effects, local, exposure) if rule == "pooled_z" else {exposure: (np.nan, np.nan)}
    mask = instruments.instrument_mask(bx, bxse, rule, float(threshold), *stats[exposure])
    limit = float(np.nanmax(np.abs(np.concatenate([bx.ravel(), by.ravel()])), initial=0.0)) or 1.0
    n_pos = bx.shape[0]
    fig = new_figure(min(2.0 + 0.06 * n_pos, 14.0), 4.2)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, values, task in zip(axes, (bx, by), (exposure, outcome)):
        image = ax.imshow(values.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        image.set_gid(HEATMAP_GID)
        ax.set_yticks(range(4), list(ALPHABET))
        ax.set_ylabel(task)
    rows, cols = np.nonzero(mask)
    axes[0].plot(rows, cols, "o", markersize=2.5, markerfacecolor="none", markeredgecolor="black",
                 gid=INSTRUMENT_MARKS_GID, label=f"{rows.size} instruments")  # fmt: skip
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"{locus}: effects of every mutation, {pair} ({rule} >= {threshold})", fontsize=10)
    axes[1].set_xlabel("position")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="effect (mut - ref)")
    return fig


def effect_logo(effects: xr.Dataset, locus: str, task: str) -> Figure:
    """The reference sequence of a locus as letters scaled by the mean |effect| of its mutations on ``task``.

    A position whose mutations all leave ``task`` unchanged has a letter of
    height 0; an N (no reference base, every allele a mutation) is drawn grey
    with the mean over the four alleles.

    Returns
    -------
    matplotlib.figure.Figure
        One letter patch per position with non-zero height (gid :data:`LOGO_GID`).
    """
    effect, _ = _locus_effects(effects, locus, task)
    bases = _reference_bases(effect)
    heights = np.nan_to_num(np.nanmean(np.abs(effect), axis=1), nan=0.0)
    fig = new_figure(min(2.0 + 0.06 * len(bases), 14.0), 1.8)
    ax = fig.subplots()
    font = FontProperties(family="DejaVu Sans", weight="bold")
    for position, (base, height) in enumerate(zip(bases, heights)):
        if height <= 0:
            continue
        glyph = TextPath((0, 0), base, size=1, prop=font)
        box = glyph.get_extents()
        scale = Affine2D().translate(-box.x0, -box.y0).scale(0.9 / box.width, height / box.height)
        path = scale.translate(position - 0.45, 0).transform_path(glyph)
        ax.add_patch(PathPatch(MplPath(path.vertices, path.codes), color=_BASE_COLOURS[base], lw=0, gid=LOGO_GID))
    ax.set_xlim(-0.5, len(bases) - 0.5)
    ax.set_ylim(0, float(heights.max(initial=0.0)) * 1.05 or 1.0)
    ax.set_xlabel("position")
    ax.set_ylabel("mean |effect|")
    ax.set_title(f"{locus}: reference bases weighted by mean |effect| on {task}", fontsize=10)
    return fig


def top_loci(local: xr.Dataset, pair: str, method: str, n: int) -> list[str]:
    """The ``n`` loci with the most instruments for ``pair`` under ``method`` (ties by locus order)."""
    counts = local["n_instruments"].sel(pair=pair).sel({"method": method}).values
    order = np.argsort(-counts, kind="stable")[:n]
    return [str(local["locus"].values[i]) for i in order]


def instrument_histogram(local: xr.Dataset) -> Figure:
    """Histogram of instruments per locus, one panel per pair (the first method's counts: selection is per pair)."""
    pairs = [str(p) for p in local["pair"].values]
    method = str(local["method"].values[0])
    fig = new_figure(3.2 * min(len(pairs), 4), 2.8 * -(-len(pairs) // 4))
    axes = np.atleast_1d(fig.subplots(-(-len(pairs) // 4), min(len(pairs), 4))).ravel()
    for ax, pair in zip(axes, pairs):
        counts = local["n_instruments"].sel(pair=pair).sel({"method": method}).values
        ax.hist(counts, bins=min(30, max(int(counts.max(initial=0)) + 1, 1)), color="tab:blue")
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("instruments per locus")
    axes[0].set_ylabel("loci")
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    return fig


def undefined_table(local: xr.Dataset) -> pd.DataFrame:
    """Per (pair, method): loci, the share without a finite estimate, and the count of each reason.

    Raises
    ------
    InputError
        If ``local`` lacks ``local_ce`` or ``reason``.
    """
    for name in ("local_ce", "reason"):
        if name not in local:
            raise InputError(f"local CE dataset lacks {name!r}")
    rows = []
    for pair in local["pair"].values:
        for method in local["method"].values:
            at = local.sel(pair=pair).sel({"method": method})
            estimate = np.asarray(at["local_ce"].values, dtype=np.float64)
            reasons = pd.Series([str(r) for r in np.asarray(at["reason"].values)[~np.isfinite(estimate)]], dtype=object)
            counts = reasons[reasons != ""].value_counts()
            rows.append({
                "pair": str(pair), "method": str(method), "loci": estimate.size,
                "undefined": float(np.mean(~np.isfinite(estimate))) if estimate.size else float("nan"),
                "reasons": ", ".join(f"{reason} ({count})" for reason, count in counts.items()),
            })  # fmt: skip
    return pd.DataFrame(rows)
