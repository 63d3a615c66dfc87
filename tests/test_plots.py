"""Tests of the figures: forest plot, per-locus MR scatter, spacing heatmap, PNG output."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import xarray as xr
from matplotlib.image import AxesImage

from deepmr_dist.stages.causal_effects import local_ce
from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.plots import (
    EGGER_GID,
    ESTIMATE_GID,
    INSTRUMENTS_GID,
    IVW_GID,
    figure_to_base64_png,
    forest_plot,
    mr_scatter,
    save_figure,
    spacing_heatmap,
)
from deepmr_dist.stages.spacing import stratified_global_ce

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def by_gid(ax, gid):
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(lines) <= 1, gid
    return lines[0] if lines else None


def make_global() -> xr.Dataset:
    """3 pairs x 2 methods; the middle pair is undefined for every method."""
    dims = ("pair", "method")
    return xr.Dataset(
        {
            "global_ce": (dims, [[0.5, 0.4], [np.nan, np.nan], [-0.2, -0.1]]),
            "global_se": (dims, [[0.05, 0.1], [np.nan, np.nan], [0.02, 0.03]]),
            "tau2": (dims, [[0.04, 0.09], [np.nan, np.nan], [0.0, 0.01]]),
            "k": (dims, [[10, 10], [0, 0], [7, 7]]),
        },
        coords={"pair": ["a->b", "a->c", "b->c"], "method": ["ivw", "egger"]},
    )


def test_forest_plot__one_row_per_pair_with_se_and_tau_bars():
    fig = forest_plot(make_global(), "egger")
    (ax,) = fig.axes
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    assert [ticks[y] for y in sorted(ticks, reverse=True)] == ["a->b", "a->c", "b->c"]  # first pair on top
    points = by_gid(ax, ESTIMATE_GID)
    np.testing.assert_array_equal(points.get_xdata(), [0.4, -0.1])  # the undefined pair has no marker
    np.testing.assert_array_equal(points.get_ydata(), [2.0, 0.0])
    assert [t.get_text() for t in ax.texts] == ["k = 10", "k = 0", "k = 7"]
    tau_bars, se_bars = (container[2][0] for container in ax.containers)
    tau_half = [(seg[1, 0] - seg[0, 0]) / 2 for seg in tau_bars.get_segments()]
    se_half = [(seg[1, 0] - seg[0, 0]) / 2 for seg in se_bars.get_segments()]
    np.testing.assert_allclose(tau_half, [2 * 0.3, 2 * 0.1])
    np.testing.assert_allclose(se_half, [2 * 0.1, 2 * 0.03])
    assert any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines()), "zero line"


def test_forest_plot__unknown_method():
    with pytest.raises(InputError, match="no method 'mbe'.*ivw, egger"):
        forest_plot(make_global(), "mbe")


def make_effects(n_loci=4, n_pos=10, seed=7) -> xr.Dataset:
    """x -> y with slope 1.5 and a pleiotropic offset; about half the exposure effects are negative."""
    rng = np.random.default_rng(seed)
    shape = (n_loci, n_pos, 4)
    x = rng.normal(0, 0.3, shape)
    se_x = rng.uniform(0.02, 0.05, shape)
    se_y = rng.uniform(0.02, 0.05, shape)
    y = 1.5 * x + 0.05 + rng.normal(0, se_y)
    effect, effect_se = np.stack([x, y], axis=-1), np.stack([se_x, se_y], axis=-1)
    ref = rng.integers(0, 4, size=(n_loci, n_pos))
    li, pi = np.meshgrid(np.arange(n_loci), np.arange(n_pos), indexing="ij")
    effect[li, pi, ref, :] = np.nan
    effect_se[li, pi, ref, :] = np.nan
    dims = ("locus", "position", "allele", "task")
    coords = {"locus": [f"l{i}" for i in range(n_loci)], "position": np.arange(n_pos), "allele": list("ACGT"),
              "task": ["x", "y"]}
    return xr.Dataset({"effect": (dims, effect), "effect_se": (dims, effect_se)}, coords=coords)


@pytest.mark.parametrize(("rule", "threshold"), [("mutation_z", 2.0), ("pooled_z", 1.0)])
def test_mr_scatter__plots_the_mr_instruments_oriented_with_egger_and_ivw_lines(rule, threshold):
    effects = make_effects()
    local = local_ce(effects, pairs=[("x", "y")], methods=("ivw", "egger"), rule=rule, threshold=threshold).compute()
    fig = mr_scatter(effects, local, "l1", "x->y", rule=rule, threshold=threshold)
    (ax,) = fig.axes
    at = local.sel({"pair": "x->y", "locus": "l1"})
    # independent selection of the instruments
    bx = effects["effect"].sel(locus="l1", task="x").values.ravel()
    by = effects["effect"].sel(locus="l1", task="y").values.ravel()
    if rule == "mutation_z":
        keep = np.abs(bx) / effects["effect_se"].sel(locus="l1", task="x").values.ravel() >= threshold
    else:
        pooled = effects["effect"].sel(task="x").values
        keep = np.abs(bx - np.nanmean(pooled)) / np.nanstd(pooled) >= threshold
    assert (bx[keep] < 0).any(), "the test needs negative exposure effects"
    points = by_gid(ax, INSTRUMENTS_GID)
    assert len(points.get_xdata()) == keep.sum() == int(at["n_instruments"].sel({"method": "egger"}))
    np.testing.assert_array_equal(points.get_xdata(), np.abs(bx[keep]))
    np.testing.assert_array_equal(points.get_ydata(), np.sign(bx[keep]) * by[keep])
    assert (points.get_xdata() > 0).all()
    egger = at.sel({"method": "egger"})
    (x0, x1), (y0, y1) = by_gid(ax, EGGER_GID).get_data()
    assert x0 == 0 and y0 == pytest.approx(float(egger["intercept"]), rel=1e-12)
    assert (y1 - y0) / (x1 - x0) == pytest.approx(float(egger["local_ce"]), rel=1e-9)
    (x0, x1), (y0, y1) = by_gid(ax, IVW_GID).get_data()
    assert y0 == 0 and y1 / x1 == pytest.approx(float(at["local_ce"].sel({"method": "ivw"})), rel=1e-9)


def test_mr_scatter__without_ivw_draws_only_the_egger_line():
    effects = make_effects()
    local = local_ce(effects, pairs=[("x", "y")], methods=("egger",), rule="mutation_z", threshold=2.0).compute()
    (ax,) = mr_scatter(effects, local, "l0", "x->y", rule="mutation_z", threshold=2.0).axes
    assert by_gid(ax, EGGER_GID) is not None and by_gid(ax, IVW_GID) is None


def test_mr_scatter__input_errors():
    effects = make_effects()
    local = local_ce(effects, pairs=[("x", "y")], methods=("ivw", "egger"), rule="mutation_z", threshold=2.0).compute()
    with pytest.raises(InputError, match="threshold=2.0.*other instruments"):
        mr_scatter(effects, local, "l1", "x->y", rule="mutation_z", threshold=3.0)
    with pytest.raises(InputError, match="intercept.*'ivw'"):
        mr_scatter(effects, local, "l1", "x->y", rule="mutation_z", threshold=2.0, method="ivw")
    with pytest.raises(InputError, match="no locus 'l9'"):
        mr_scatter(effects, local, "l9", "x->y", rule="mutation_z", threshold=2.0)
    with pytest.raises(InputError, match="no pair 'y->x'"):
        mr_scatter(effects, local, "l1", "y->x", rule="mutation_z", threshold=2.0)


def spacing_table():
    rng = np.random.default_rng(0)
    dims = ("pair", "locus", "method")
    local = xr.Dataset(
        {"local_ce": (dims, rng.normal(0.3, 0.2, (2, 6, 2))), "local_se": (dims, rng.uniform(0.05, 0.1, (2, 6, 2)))},
        coords={"pair": ["A->B", "A->C"], "locus": [f"L{i}" for i in range(6)], "method": ["ivw", "egger"]},
    )
    bins = xr.DataArray(
        [["0-35", "0-35", "35-70", ">=150", ">=150", ""], ["35-70", "35-70", "35-70", "", "0-35", "0-35"]],
        dims=("pair", "locus"), coords={"pair": ["A->B", "A->C"], "locus": local["locus"].values},
        attrs={"labels": ["0-35", "35-70", "70-150", ">=150"]},
    )  # fmt: skip
    return stratified_global_ce(local, spacing_bins=bins)


def test_spacing_heatmap__one_cell_per_pair_and_bin():
    table = spacing_table()
    fig = spacing_heatmap(table, method="ivw")
    ax = fig.axes[0]
    (image,) = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    values = image.get_array()
    assert values.shape == (2, 4)
    part = table[table["method"] == "ivw"]
    expected = part.pivot(index="pair", columns="bin", values="estimate").to_numpy()
    np.testing.assert_array_equal(values.mask, np.isnan(expected))  # 70-150 is empty: masked
    np.testing.assert_allclose(values.filled(np.nan), expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0-35", "35-70", "70-150", ">=150"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A->B", "A->C"]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 8
    assert texts[0] == f"{expected[0, 0]:.2f}\nk=2" and texts[2] == "n/a\nk=0"


def test_spacing_heatmap__needs_a_method_when_the_table_has_several():
    with pytest.raises(InputError, match="pass method="):
        spacing_heatmap(spacing_table())
    with pytest.raises(InputError, match="no method 'mbe'"):
        spacing_heatmap(spacing_table(), method="mbe")


def test_figure_to_base64_png__decodes_to_a_png():
    encoded = figure_to_base64_png(forest_plot(make_global(), "ivw"))
    assert isinstance(encoded, str)
    assert base64.b64decode(encoded, validate=True).startswith(PNG_SIGNATURE)


def test_save_figure__creates_parents(tmp_path):
    path = save_figure(forest_plot(make_global(), "ivw"), tmp_path / "figs" / "forest.png")
    assert path == tmp_path / "figs" / "forest.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
