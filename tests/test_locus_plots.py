"""Figures of single loci (effect heatmaps, logos) and of the instruments, checked against the data drawn."""

from __future__ import annotations

import numpy as np
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.locus_plots import (
    HEATMAP_GID,
    INSTRUMENT_MARKS_GID,
    LOGO_GID,
    effect_heatmap,
    effect_logo,
    instrument_histogram,
    top_loci,
    undefined_table,
)
from deepmr_dist.stages.causal_effects import local_ce
from test_causal_effects import make_effects


@pytest.fixture(scope="module")
def run():
    effects = make_effects().compute()
    local = local_ce(effects, pairs=[("x", "y"), ("x", "z")], methods=["ivw", "egger"], rule="mutation_z",
                     threshold=2.0).compute()  # fmt: skip
    return effects, local


def _artists(fig, gid):
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def test_effect_heatmap__marks_exactly_the_instruments_the_mr_used(run):
    effects, local = run
    for locus in ("l1", "l0"):
        fig = effect_heatmap(effects, local, locus, "x->y", rule="mutation_z", threshold=2.0)
        images = _artists(fig, HEATMAP_GID)
        assert len(images) == 2  # exposure and outcome
        np.testing.assert_array_equal(images[0].get_array().filled(np.nan),
                                      effects["effect"].sel(locus=locus, task="x").values.T)  # fmt: skip
        (marks,) = _artists(fig, INSTRUMENT_MARKS_GID)
        z = np.abs(effects["effect"].sel(locus=locus, task="x") / effects["effect_se"].sel(locus=locus, task="x")).values
        expected = np.argwhere(z >= 2.0)  # the explicit mutation-z rule, independent of the selection code
        np.testing.assert_array_equal(np.column_stack([marks.get_xdata(), marks.get_ydata()]), expected)
        assert len(expected) == int(local["n_instruments"].sel(pair="x->y", locus=locus).sel({"method": "ivw"}))
    with pytest.raises(InputError, match="no locus 'nope'"):
        effect_heatmap(effects, local, "nope", "x->y", rule="mutation_z", threshold=2.0)


def test_effect_logo__letters_are_the_reference_bases_with_mean_absolute_effect_heights(run):
    effects, _ = run
    fig = effect_logo(effects, "l2", "x")
    letters = _artists(fig, LOGO_GID)
    effect = effects["effect"].sel(locus="l2", task="x").values
    assert len(letters) == effect.shape[0]  # every position has a reference base and non-zero effects
    heights = [patch.get_path().get_extents().height for patch in letters]
    np.testing.assert_allclose(heights, np.nanmean(np.abs(effect), axis=1), rtol=1e-6)
    colours = {tuple(np.round(p.get_facecolor()[:3], 3)) for p in letters}
    assert len(colours) <= 4


def test_top_loci_histogram_and_undefined_shares(run):
    _, local = run
    counts = local["n_instruments"].sel(pair="x->z").sel({"method": "egger"}).values
    top = top_loci(local, "x->z", "egger", 3)
    assert [int(local["n_instruments"].sel(pair="x->z", locus=l).sel({"method": "egger"})) for l in top] == sorted(counts)[::-1][:3]
    fig = instrument_histogram(local)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["x->y", "x->z"]
    table = undefined_table(local).set_index(["pair", "method"])
    for pair in ("x->y", "x->z"):
        for method in ("ivw", "egger"):
            estimate = local["local_ce"].sel(pair=pair).sel({"method": method}).values
            assert table.loc[(pair, method), "undefined"] == pytest.approx(np.mean(~np.isfinite(estimate)))
    assert table.loc[("x->y", "ivw"), "reasons"] == "too_few_instruments (1)"  # locus l0 has none
