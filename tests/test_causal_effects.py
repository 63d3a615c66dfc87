"""Tests of the blockwise local-CE stage and the global meta-analysis stage."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import deepmr_dist.mr as mr
from deepmr_dist.stages.causal_effects import LOCAL_VARIABLES, compact_instruments, global_ce, local_ce
from deepmr_dist.errors import InputError
from deepmr_dist.meta import meta_analysis

ALLELES = ["A", "C", "G", "T"]
PAIRS = [("x", "y"), ("x", "z"), ("y", "z")]
METHODS = ("ivw", "egger")


def make_effects(n_loci=9, n_pos=12, seed=1, chunk=4, dtype=np.float64) -> xr.Dataset:
    """Effects with a known causal structure: y = 2 x + noise, z = -0.5 x + noise.

    Locus ``l0`` has only tiny exposure effects, so it has no instrument under
    ``mutation_z`` with threshold 2 and its local CE is undefined.
    """
    rng = np.random.default_rng(seed)
    shape = (n_loci, n_pos, 4)
    se_x = rng.uniform(0.02, 0.05, shape)
    x = rng.normal(0, 0.3, shape)
    x[0] = rng.normal(0, 0.001, shape[1:])
    se_y = rng.uniform(0.02, 0.05, shape)
    y = 2.0 * x + rng.normal(0, se_y) + rng.normal(0, 0.02, shape)
    se_z = rng.uniform(0.02, 0.05, shape)
    z = -0.5 * x + rng.normal(0, se_z)
    effect = np.stack([x, y, z], axis=-1)
    effect_se = np.stack([se_x, se_y, se_z], axis=-1)
    ref = rng.integers(0, 4, size=(n_loci, n_pos))
    li, pi = np.meshgrid(np.arange(n_loci), np.arange(n_pos), indexing="ij")
    effect[li, pi, ref, :] = np.nan
    effect_se[li, pi, ref, :] = np.nan
    dims = ("locus", "position", "allele", "task")
    coords = {"locus": [f"l{i}" for i in range(n_loci)], "position": np.arange(n_pos), "allele": ALLELES, "task": ["x", "y", "z"]}
    ds = xr.Dataset({"effect": (dims, effect.astype(dtype)), "effect_se": (dims, effect_se.astype(dtype))}, coords=coords)
    return ds.chunk({"locus": chunk})


def reference_local(ds: xr.Dataset, exposure: str, outcome: str, methods, threshold: float, **options):
    """Independent path: numpy per locus, instruments by the explicit mutation-z formula."""
    e = ds["effect"].values.astype(np.float64)
    s = ds["effect_se"].values.astype(np.float64)
    tasks = list(ds["task"].values)
    ie, io = tasks.index(exposure), tasks.index(outcome)
    out = {m: [] for m in methods}
    for locus in range(e.shape[0]):
        bx, bxse = e[locus, :, :, ie].ravel(), s[locus, :, :, ie].ravel()
        by, byse = e[locus, :, :, io].ravel(), s[locus, :, :, io].ravel()
        keep = np.isfinite(bx) & (bxse > 0) & (np.abs(bx) / bxse >= threshold)
        if not keep.any():
            keep_cols = [np.array([np.nan])] * 4
        else:
            keep_cols = [bx[keep], bxse[keep], by[keep], byse[keep]]
        res = mr.estimate(*(c[None, :] for c in keep_cols), methods=tuple(methods), **options)
        for m in methods:
            out[m].append(res[m])
    return out


def test_local_ce__blocks_are_whole_effects_chunks_of_about_mr_block_bytes(monkeypatch):
    import deepmr_dist.stages.causal_effects as causal_effects

    ds = make_effects()  # chunks of 4 loci
    per_locus = 8 * ds.sizes["position"] * ds.sizes["allele"] * 3  # float64 of the pairs' 3 tasks
    for budget, chunks in ((1, (4, 4, 1)), (8 * per_locus, (8, 1)), (causal_effects.MR_BLOCK_BYTES, (9,))):
        monkeypatch.setattr(causal_effects, "MR_BLOCK_BYTES", budget)
        local = local_ce(ds, pairs=PAIRS, methods=["ivw"], rule="mutation_z", threshold=2.0)
        assert local["local_ce"].chunks[1] == chunks, budget


def test_local_ce__is_lazy_and_chunked_along_locus(monkeypatch):
    import deepmr_dist.stages.causal_effects as causal_effects

    monkeypatch.setattr(causal_effects, "MR_BLOCK_BYTES", 1)  # one block per effects chunk
    ds = make_effects()
    local = local_ce(ds, pairs=PAIRS, methods=METHODS, rule="mutation_z", threshold=2.0)
    for name in (*LOCAL_VARIABLES, "n_instruments", "reason"):
        assert isinstance(local[name].data, da.Array), name
        assert local[name].dims == ("pair", "locus", "method")
    assert local["local_ce"].chunks == ((3,), (4, 4, 1), (2,))
    assert local["pair"].values.tolist() == ["x->y", "x->z", "y->z"]
    assert local["exposure"].values.tolist() == ["x", "x", "y"]
    assert local["outcome"].values.tolist() == ["y", "z", "z"]
    assert local["method"].values.tolist() == list(METHODS)
    assert local["locus"].values.tolist() == list(ds["locus"].values)


def test_local_ce__keeps_locus_coordinates():
    ds = make_effects()
    ds = ds.assign_coords(chrom=("locus", [f"chr{i}" for i in range(ds.sizes["locus"])]))
    local = local_ce(ds, pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0)
    assert local["chrom"].values.tolist() == ds["chrom"].values.tolist()
    assert local.compute()["local_ce"].shape == (1, ds.sizes["locus"], 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_local_ce__equals_mr_estimate_per_locus_on_numpy(dtype):
    ds = make_effects(dtype=dtype)
    methods = (*METHODS, "weighted_median")  # a bootstrap method: draws must not depend on the block
    options = {"n_boot": 50, "seed": 5, "egger_t_dist": True}
    local = local_ce(ds, pairs=PAIRS, methods=methods, rule="mutation_z", threshold=2.0, **options).compute()
    assert local.attrs["mr_seed"] == 5
    for p, (exposure, outcome) in enumerate(PAIRS):
        ref = reference_local(ds, exposure, outcome, methods, 2.0, **options)
        for m, method in enumerate(methods):
            for locus, res in enumerate(ref[method]):
                got = local.isel(pair=p, method=m, locus=locus)
                for name, field in LOCAL_VARIABLES.items():
                    np.testing.assert_allclose(
                        float(got[name]), getattr(res, field)[0], rtol=1e-10, atol=1e-14, err_msg=f"{exposure}->{outcome} {method} locus {locus} {name}"
                    )
                assert int(got["n_instruments"]) == res.n[0]
                assert str(got["reason"].item()) == res.reason[0]


def test_local_ce__recovers_the_causal_effect():
    local = local_ce(make_effects(), pairs=[("x", "y"), ("x", "z")], methods=["ivw"], rule="mutation_z", threshold=2.0).compute()
    ce = local["local_ce"].sel({"method": "ivw"}).isel(locus=slice(1, None))
    np.testing.assert_allclose(ce.sel(pair="x->y"), 2.0, atol=0.1)
    np.testing.assert_allclose(ce.sel(pair="x->z"), -0.5, atol=0.1)


def test_local_ce__locus_without_instruments_is_nan_with_reason():
    local = local_ce(make_effects(), pairs=[("x", "y")], methods=METHODS, rule="mutation_z", threshold=2.0).compute()
    first = local.sel(locus="l0", pair="x->y")
    assert np.isnan(first["local_ce"].values).all()
    assert (first["n_instruments"].values == 0).all()
    assert all(r != "" for r in first["reason"].values)


def test_local_ce__pooled_z_uses_global_stats_like_select():
    from deepmr_dist.stages.instruments import count_instruments

    ds = make_effects()
    local = local_ce(ds, pairs=[("x", "y")], methods=["ivw"], rule="pooled_z", threshold=1.0).compute()
    counts = count_instruments(ds, "x", rule="pooled_z", threshold=1.0).values
    np.testing.assert_array_equal(local["n_instruments"].sel({"pair": "x->y", "method": "ivw"}).values, counts)
    x = ds["effect"].sel(task="x").values
    np.testing.assert_allclose(local.attrs["pooled_stats"]["x"], [np.nanmean(x), np.nanstd(x)], rtol=1e-12)


def test_local_ce__kernel_sees_one_block_at_a_time(monkeypatch):
    import deepmr_dist.stages.causal_effects as causal_effects

    monkeypatch.setattr(causal_effects, "MR_BLOCK_BYTES", 1)  # one block per effects chunk
    ds = make_effects(n_loci=10, chunk=3)
    seen = []
    real = mr.estimate

    def spy(bx, *args, **kwargs):
        seen.append(bx.shape[0])
        return real(bx, *args, **kwargs)

    monkeypatch.setattr(mr, "estimate", spy)
    local = local_ce(ds, pairs=PAIRS, methods=METHODS, rule="mutation_z", threshold=2.0)
    assert seen == []  # nothing computed while building the graph
    with dask.config.set(scheduler="synchronous"):
        local.compute()
    assert sorted(seen) == sorted([3, 3, 3, 1] * len(PAIRS))


def test_local_ce__numpy_backed_input_becomes_lazy():
    ds = make_effects().compute()
    local = local_ce(ds, pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0)
    assert isinstance(local["local_ce"].data, da.Array)


def test_local_ce__bad_arguments():
    ds = make_effects()
    with pytest.raises(InputError, match="unknown MR method.*'nope'; valid: "):
        local_ce(ds, pairs=[("x", "y")], methods=["nope"], rule="mutation_z", threshold=2.0)
    with pytest.raises(InputError, match="unknown instrument rule 'z'; valid: pooled_z, mutation_z"):
        local_ce(ds, pairs=[("x", "y")], methods=["ivw"], rule="z", threshold=2.0)
    with pytest.raises(InputError, match="unknown meta-analysis method 'sj'; valid: fe, dl, reml, pm"):
        global_ce(local_ce(ds, pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0), meta_method="sj")
    with pytest.raises(InputError, match="'w' not in the effects dataset"):
        local_ce(ds, pairs=[("x", "w")], methods=["ivw"], rule="mutation_z", threshold=2.0)
    with pytest.raises(ValueError, match="duplicate pair"):
        local_ce(ds, pairs=[("x", "y"), ("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0)
    with pytest.raises(InputError, match="lacks variable 'effect_se'"):
        local_ce(ds[["effect"]], pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0)


@pytest.mark.parametrize("meta_method", ["dl", "reml"])
@pytest.mark.parametrize("hksj", [False, True])
def test_global_ce__equals_meta_analysis_of_collected_local_estimates(meta_method, hksj):
    ds = make_effects()
    local = local_ce(ds, pairs=PAIRS, methods=METHODS, rule="mutation_z", threshold=2.0)
    glob = global_ce(local, meta_method=meta_method, hksj=hksj)
    assert glob["global_ce"].dims == ("pair", "method")
    computed = local.compute()
    for p in range(len(PAIRS)):
        for m in range(len(METHODS)):
            est = computed["local_ce"].values[p, :, m]
            se = computed["local_se"].values[p, :, m]
            ok = np.isfinite(est) & np.isfinite(se)
            ref = meta_analysis(est[ok], se[ok], meta_method, hksj=hksj)
            cell = glob.isel(pair=p, method=m)
            np.testing.assert_allclose(float(cell["global_ce"]), ref.estimate[0], rtol=1e-12)
            np.testing.assert_allclose(float(cell["global_se"]), ref.se[0], rtol=1e-12)
            np.testing.assert_allclose(float(cell["tau2"]), ref.tau2[0], rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(float(cell["q"]), ref.q[0], rtol=1e-12)
            assert int(cell["k"]) == ok.sum()
            assert int(cell["n_loci_undefined"]) == (~ok).sum()
    assert int(glob["n_loci_undefined"].sel({"pair": "x->y", "method": "ivw"})) >= 1  # locus l0
    assert glob.attrs["meta_method"] == meta_method
    np.testing.assert_allclose(glob["global_ce"].sel({"pair": "x->y", "method": "ivw"}), 2.0, atol=0.1)


def test_global_ce__dilution_summary_is_the_mean_and_share_below_0_9_of_the_local_i2gx():
    ds = make_effects()
    local = local_ce(ds, pairs=PAIRS, methods=["egger", "ivw"], rule="mutation_z", threshold=2.0).compute()
    glob = global_ce(local)
    for p in range(len(PAIRS)):
        i2 = local["i2gx"].values[p, :, 0]  # egger
        i2 = i2[np.isfinite(i2)]
        assert i2.size >= 3
        cell = glob.isel(pair=p, method=0)
        assert float(cell["mean_i2gx"]) == pytest.approx(i2.mean(), rel=1e-12)
        assert float(cell["share_i2gx_below_0_9"]) == pytest.approx(np.mean(i2 < 0.9), rel=1e-12)
    assert np.isnan(glob["mean_i2gx"].isel(method=1)).all()  # ivw reports no I^2_GX


@pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3 specification")
def test_local_ce__zarr_write_stays_lazy(tmp_path):
    import warnings

    local = local_ce(make_effects(), pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=xr.SerializationWarning)
        local.to_zarr(tmp_path / "mr.zarr", mode="w", consolidated=False)
    back = xr.open_zarr(tmp_path / "mr.zarr", consolidated=False)
    np.testing.assert_array_equal(back["reason"].values, local["reason"].values)


def test_compact_instruments__moves_instruments_first_in_order():
    mask = np.array([[False, True, False, True], [False, False, False, False]])
    vals = np.arange(8.0).reshape(2, 4)
    (out,) = compact_instruments(mask, vals)
    np.testing.assert_array_equal(out, [[1.0, 3.0], [np.nan, np.nan]])


def test_local_ce__pairs_sharing_an_exposure_reuse_its_selection_with_results_as_alone():
    """The exposure's instruments are selected once per block; every method, for each pair, equals its run alone."""
    from deepmr_dist.mr import METHODS

    ds = make_effects()
    pairs = [("x", "y"), ("x", "z"), ("y", "x")]
    together = local_ce(ds, pairs=pairs, methods=list(METHODS), rule="mutation_z", threshold=2.0, n_boot=20).compute()
    for index, pair in enumerate(pairs):
        alone = local_ce(ds, pairs=[pair], methods=list(METHODS), rule="mutation_z", threshold=2.0, n_boot=20).compute()
        for name in ("local_ce", "local_se", "intercept", "q", "n_instruments"):
            np.testing.assert_array_equal(together[name].isel(pair=index).values, alone[name].isel(pair=0).values)
