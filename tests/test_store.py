"""Run store: template, chunk-aligned region writes, completion ledger, lazy open, schema."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from deepmr_dist import open_run, schema
from deepmr_dist.io import store
from deepmr_dist.errors import StoreError
from deepmr_dist.io.sequence import sequences_dataset


def _loci(n=10, length=6):
    codes = np.random.default_rng(0).integers(0, 4, (n, length)).astype(np.int8)
    return sequences_dataset(codes, [f"l{i}" for i in range(n)])


def _make(tmp_path, n=10, chunk=4):
    path = str(tmp_path / "run.zarr")
    template = store.ism_template(_loci(n), ["m0", "m1"], ["t0"], chunk)
    store.create_store(path, template, fingerprint="abc", attrs={"model": "x"}, chunk_loci=chunk)
    return path


def test_store__template_is_readable_by_plain_xarray_and_empty(tmp_path):
    path = _make(tmp_path)
    ds = xr.open_zarr(path, group="ism", consolidated=False)
    schema.validate(ds, schema.ISM)
    assert ds.mut_pred.dims == ("locus", "member", "position", "allele", "task")
    assert ds.mut_pred.data.chunksize == (4, 2, 6, 4, 1)
    assert not ds.complete.values.any()
    assert np.isnan(ds.mut_pred.values).all()
    assert ds.locus.values.tolist()[:2] == ["l0", "l1"]
    assert store.read_fingerprint(path) == "abc"
    assert store.incomplete_chunks(path) == [(0, 4), (4, 8), (8, 10)]


def test_store__region_write_marks_complete_and_unaligned_write_is_refused(tmp_path):
    path = _make(tmp_path)
    ref = np.ones((4, 2, 1), np.float32)
    mut = np.full((4, 2, 6, 4, 1), 2.0, np.float32)
    store.write_ism_chunk(path, 4, ref, mut)
    store.write_ism_chunk(path, 8, ref[:2], mut[:2])
    assert store.incomplete_chunks(path) == [(0, 4)]
    run = open_run(path)
    assert set(run) == {"ism"}
    np.testing.assert_array_equal(run["ism"].mut_pred.values[4:], 2.0)
    assert np.isnan(run["ism"].mut_pred.values[:4]).all()
    with pytest.raises(StoreError, match="not aligned"):
        store.write_ism_chunk(path, 2, ref, mut)


def test_open_run__not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not a deepmr run store"):
        open_run(str(tmp_path / "nothing.zarr"))


def test_schema__validate_names_missing_variable():
    with pytest.raises(StoreError, match="lacks variable 'effect_se'"):
        schema.validate(xr.Dataset({"effect": (("locus", "position", "allele", "task"), np.zeros((1, 1, 4, 1)))}), schema.EFFECTS)
