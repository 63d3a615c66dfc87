"""Run store: template, chunk-aligned region writes, completion ledger, lazy open, schema."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from deepmr_dist import open_run, schema
from deepmr_dist.io import store
from deepmr_dist.io.verify import verify_ism
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


# ----------------------------------------------------------------------------- derived groups: staged, then swapped in


def _meta(value: float) -> xr.Dataset:
    return xr.Dataset({"global_ce": ("pair", np.array([value, 2 * value]))})


def _failing(value: float) -> xr.Dataset:
    """A lazy group whose second chunk raises while it is written (a stage that fails half-way)."""
    import dask.array as da

    def block(x, block_info=None):
        if block_info[0]["chunk-location"][0] == 1:
            raise RuntimeError("stage failed half-way")
        return x

    data = da.full(8, value, chunks=4).map_blocks(block, dtype=float)
    return xr.Dataset({"local_ce": ("locus", data)})


def _hidden_children(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def test_write_group__failed_write_keeps_the_previous_group_and_its_fingerprint(tmp_path):
    path = _make(tmp_path)
    store.write_group(path, xr.Dataset({"local_ce": ("locus", np.arange(8.0))}), "mr", fingerprint="v1")
    with pytest.raises(RuntimeError, match="stage failed half-way"):
        store.write_group(path, _failing(5.0), "mr", fingerprint="v2")
    assert store.stage_fingerprint(path, "mr") == "v1"
    np.testing.assert_array_equal(open_run(path)["mr"]["local_ce"].values, np.arange(8.0))
    assert _hidden_children(tmp_path / "run.zarr") == []  # the staging copy is gone


def test_write_group__new_group_replaces_the_old_whole_with_its_fingerprint(tmp_path):
    path = _make(tmp_path)
    store.write_group(path, _meta(1.0), "meta", fingerprint="v1")
    store.write_group(path, _meta(3.0), "meta", fingerprint="v2")
    assert store.stage_fingerprint(path, "meta") == "v2"
    np.testing.assert_array_equal(open_run(path)["meta"]["global_ce"].values, [3.0, 6.0])
    assert _hidden_children(tmp_path / "run.zarr") == []


def test_write_group__copies_left_by_a_killed_writer_are_never_shown_and_are_removed_by_the_next_write(tmp_path):
    path = _make(tmp_path)
    store.write_group(path, _meta(1.0), "meta", fingerprint="v1")
    _meta(9.0).to_zarr(path, group=".meta.staging-0123456789ab", mode="w-", consolidated=False)  # a half-done write
    _meta(7.0).to_zarr(path, group=".meta.replaced-0123456789ab", mode="w-", consolidated=False)  # a half-done swap
    assert set(open_run(path)) == {"ism", "meta"}
    np.testing.assert_array_equal(open_run(path)["meta"]["global_ce"].values, [1.0, 2.0])
    store.write_group(path, _meta(2.0), "meta", fingerprint="v2")
    assert _hidden_children(tmp_path / "run.zarr") == []
    np.testing.assert_array_equal(open_run(path)["meta"]["global_ce"].values, [2.0, 4.0])


def test_write_group__object_store_swaps_by_copy_with_the_group_metadata_last(tmp_path):
    import uuid

    import fsspec

    path = f"memory://store-test-{uuid.uuid4().hex}/run.zarr"
    fs, root = fsspec.core.url_to_fs(path)
    try:
        store.write_group(path, _meta(1.0), "meta", fingerprint="v1")
        store.write_group(path, _meta(4.0), "meta", fingerprint="v2")
        assert store.stage_fingerprint(path, "meta") == "v2"
        opened = xr.open_zarr(path, group="meta", consolidated=False)
        np.testing.assert_array_equal(opened["global_ce"].values, [4.0, 8.0])
        assert sorted(name.rsplit("/", 1)[-1] for name in fs.ls(root, detail=False)) == ["meta", "zarr.json"]
    finally:
        fs.rm(root, recursive=True)


def test_stage_fingerprint__damaged_group_metadata_reads_as_not_written(tmp_path):
    path = _make(tmp_path)
    store.write_group(path, _meta(1.0), "meta", fingerprint="v1")
    (tmp_path / "run.zarr" / "meta" / "zarr.json").write_text('{"zarr_format": 3,')
    assert store.stage_fingerprint(path, "meta") is None  # the runner recomputes the stage
    with pytest.raises(StoreError, match=r"group 'meta' of .* cannot be opened \(JSONDecodeError.*rerun the stage"):
        open_run(path)
    store.write_group(path, _meta(1.0), "meta", fingerprint="v1")  # ... and the rewrite repairs it
    assert set(open_run(path)) == {"ism", "meta"}


def test_store_paths__unknown_protocol_and_a_file_are_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="nosuch://x/run.zarr: Protocol not known: nosuch"):
        store.inspect_target("nosuch://x/run.zarr")
    (tmp_path / "file").write_text("x")
    for call in (lambda p: open_run(p), lambda p: verify_ism(p), lambda p: store.write_group(p, _meta(1.0), "meta")):
        with pytest.raises(StoreError, match="it is a file"):
            call(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"
