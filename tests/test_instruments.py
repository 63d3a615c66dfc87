"""Tests of instrument selection on small lazy effects Datasets."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from deepmr_dist.errors import InputError
from deepmr_dist.stages.instruments import RULES, check_rule, count_instruments, instrument_mask, pooled_stats, select

ALLELES = ["A", "C", "G", "T"]


def make_effects(n_loci=7, n_pos=5, tasks=("x", "y"), seed=0, chunk=3, dtype=np.float32) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    shape = (n_loci, n_pos, 4, len(tasks))
    effect = rng.normal(0, 1, shape)
    se = rng.uniform(0.1, 1.0, shape)
    ref = rng.integers(0, 4, size=(n_loci, n_pos))
    li, pi = np.meshgrid(np.arange(n_loci), np.arange(n_pos), indexing="ij")
    effect[li, pi, ref, :] = np.nan  # the reference allele is not a mutation
    se[li, pi, ref, :] = np.nan
    dims = ("locus", "position", "allele", "task")
    coords = {
        "locus": [f"l{i}" for i in range(n_loci)],
        "position": np.arange(n_pos),
        "allele": ALLELES,
        "task": list(tasks),
    }
    ds = xr.Dataset(
        {"effect": (dims, effect.astype(dtype)), "effect_se": (dims, se.astype(dtype))}, coords=coords
    )
    return ds.chunk({"locus": chunk})


def test_pooled_z__uses_mean_and_sd_pooled_over_all_loci():
    ds = make_effects()
    x = ds["effect"].sel(task="x").values.astype(np.float64)
    finite = x[np.isfinite(x)]
    mean, sd = finite.mean(), finite.std()
    z = np.abs(x - mean) / sd
    expected = z >= 1.0
    # The pooled mean and SD are dask reductions over locus chunks, another summation order than
    # numpy's here; no z lies within round-off of the threshold, so the masks compare exactly.
    assert np.nanmin(np.abs(z - 1.0)) > 1e-9
    mask = select(ds, "x", rule="pooled_z", threshold=1.0)
    assert isinstance(mask.data, da.Array)  # lazy
    assert mask.dims == ("locus", "position", "allele")
    assert mask.chunks[0] == (3, 3, 1)
    np.testing.assert_array_equal(mask.values, expected & np.isfinite(x))
    np.testing.assert_allclose([mask.attrs["pooled_mean"], mask.attrs["pooled_sd"]], [mean, sd], rtol=1e-12)


def test_pooled_z__ddof_option():
    ds = make_effects()
    x = ds["effect"].sel(task="x").values.astype(np.float64)
    sd1 = np.nanstd(x, ddof=1)
    assert pooled_stats(ds, ["x"], ddof=1)["x"][1] == pytest.approx(sd1, rel=1e-12)


def test_pooled_stats__one_global_compute_for_all_exposures():
    ds = make_effects()
    calls = []

    def count(*args, **kwargs):
        calls.append(1)
        return dask.threaded.get(*args, **kwargs)

    with dask.config.set(scheduler=count):
        stats = pooled_stats(ds, ["x", "y", "x"])
    assert len(calls) == 1
    assert set(stats) == {"x", "y"}


def test_mutation_z__per_mutation_and_zero_se_is_never_an_instrument():
    ds = make_effects(dtype=np.float64).compute()
    ds["effect_se"][0, 0, :, 0] = 0.0
    ds["effect"][0, 0, :, 0] = 5.0
    ds = ds.chunk({"locus": 2})
    e = ds["effect"].sel(task="x").values
    s = ds["effect_se"].sel(task="x").values
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = (s > 0) & (np.abs(e / s) >= 2.0)
    mask = select(ds, "x", rule="mutation_z", threshold=2.0)
    np.testing.assert_array_equal(mask.values, expected)
    assert not mask.values[0, 0].any()


def test_reference_alleles__are_never_instruments():
    ds = make_effects()
    for rule in RULES:
        mask = select(ds, "x", rule=rule, threshold=0.0)
        np.testing.assert_array_equal(mask.values, np.isfinite(ds["effect"].sel(task="x").values))


def test_count_instruments__per_locus():
    ds = make_effects()
    counts = count_instruments(ds, "y", rule="mutation_z", threshold=1.0)
    mask = select(ds, "y", rule="mutation_z", threshold=1.0)
    assert counts.dims == ("locus",)
    assert isinstance(counts.data, da.Array)
    np.testing.assert_array_equal(counts.values, mask.values.sum(axis=(1, 2)))


def test_instrument_mask__constant_effects_give_no_pooled_instruments():
    e = np.full((2, 3), 0.5)
    assert not instrument_mask(e, e, "pooled_z", 1.0, center=0.5, scale=0.0).any()


def test_errors__unknown_task_rule_and_threshold():
    ds = make_effects()
    with pytest.raises(InputError, match="'z' not in the effects dataset; available tasks: x, y"):
        select(ds, "z", rule="pooled_z", threshold=1.0)
    with pytest.raises(InputError, match="unknown instrument rule 'foo'; valid: pooled_z, mutation_z"):
        select(ds, "x", rule="foo", threshold=1.0)
    with pytest.raises(InputError, match="threshold"):
        select(ds, "x", rule="pooled_z", threshold=-1.0)


def test_check_rule__the_one_check_of_rule_names_and_thresholds():
    assert list(RULES) == ["pooled_z", "mutation_z"]
    assert all(check_rule(rule) == rule for rule in RULES)
    assert check_rule("mutation_z", 0.0) == "mutation_z"
    with pytest.raises(InputError, match="unknown instrument rule 'pooled'; valid: pooled_z, mutation_z$"):
        check_rule("pooled")
    for threshold in (-0.5, np.inf, np.nan):
        with pytest.raises(InputError, match="instrument threshold must be finite and >= 0"):
            check_rule("pooled_z", threshold)
    with pytest.raises(InputError, match="valid: pooled_z, mutation_z"):
        instrument_mask(np.zeros(3), np.ones(3), "foo", 1.0)
