"""One Dask task per locus block computes and writes every variable's chunk of it (io/block_writes.py)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from deepmr_dist.io import store
from deepmr_dist.io.block_writes import block_writes, blockable_variables


def _lazy_group(n_loci: int = 50, chunk: int = 8) -> xr.Dataset:
    """A lazy group of every dtype kind a stage writes, with a dask coordinate and a value every block shares."""
    rng = np.random.default_rng(0)
    effect = da.from_array(rng.normal(size=(n_loci, 6, 4)).astype(np.float32), chunks=(chunk, -1, -1))
    shared = effect.sum()  # a global reduction that every block reads
    codes = np.array(["", "too_few", "undefined"])
    return xr.Dataset(
        {
            "effect": (("locus", "position", "task"), effect),
            "centred": (("locus", "position", "task"), (effect - shared / effect.size).astype(np.float64)),
            "n": (("pair", "locus"), da.from_array(rng.integers(0, 9, size=(3, n_loci)), chunks=(-1, chunk))),
            "reason": (("pair", "locus"), da.from_array(codes[rng.integers(0, 3, size=(3, n_loci))], chunks=(-1, chunk))),
            "total": ((), 1.5),
        },
        coords={
            "locus": [f"l{i}" for i in range(n_loci)],
            "ref": (("locus", "position"), da.from_array(np.array(list("ACGTNA"))[rng.integers(0, 6, size=(n_loci, 6))], chunks=(chunk, -1))),
        },
    )


def _arrays(path: str, group: str) -> dict[str, zarr.Array]:
    return dict(zarr.open_group(path, path=group, mode="r").arrays())


def test_block_writes__store_equals_xarrays_own_writes_of_the_same_lazy_group(tmp_path, monkeypatch):
    ds = _lazy_group()
    assert blockable_variables(ds, 8) == ["effect", "centred", "n", "reason", "ref"]
    blocked, plain = str(tmp_path / "blocked.zarr"), str(tmp_path / "plain.zarr")
    store.write_group(blocked, ds, "mr")
    monkeypatch.setattr(store, "blockable_variables", lambda ds, chunk_loci: None)  # xarray's to_zarr writes it
    store.write_group(plain, ds, "mr")
    a, b = store.open_group(blocked, "mr"), store.open_group(plain, "mr")
    for name in a.variables:
        assert a[name].values.tolist() == b[name].values.tolist(), name
    xr.testing.assert_identical(a.compute(), b.compute())
    arrays_a, arrays_b = _arrays(blocked, "mr"), _arrays(plain, "mr")
    assert arrays_a.keys() == arrays_b.keys()
    for name, arr in arrays_a.items():
        meta_a, meta_b = arr.metadata.to_dict(), arrays_b[name].metadata.to_dict()
        meta_a.pop("attributes"), meta_b.pop("attributes")  # their history lines hold the time
        assert str(meta_a) == str(meta_b), name  # str: NaN fill values compare equal
        assert arr.attrs.keys() == arrays_b[name].attrs.keys(), name
    files_a = sorted(p.relative_to(tmp_path / "blocked.zarr") for p in (tmp_path / "blocked.zarr" / "mr").rglob("c/*"))
    files_b = sorted(p.relative_to(tmp_path / "plain.zarr") for p in (tmp_path / "plain.zarr" / "mr").rglob("c/*"))
    assert files_a == files_b  # the same chunk objects


def test_block_writes__one_task_per_block_and_shared_keys_computed_once(tmp_path):
    ds = _lazy_group(n_loci=50, chunk=8)  # 7 blocks
    path = str(tmp_path / "run.zarr")
    store.write_group(path, ds.isel(locus=slice(0, 0)).compute(), "mr")  # a store to write into
    ds = ds.map(lambda v: v.astype(np.dtypes.StringDType()) if v.dtype.kind == "U" else v).assign_coords(
        {name: c.astype(np.dtypes.StringDType()) for name, c in ds.coords.items() if c.dtype.kind == "U"})
    ds.to_zarr(path, group="blocks", mode="w-", compute=False, consolidated=False)
    names = blockable_variables(ds, 8)
    writes = block_writes(ds, names, path, "blocks")
    graph = dict(writes.__dask_graph__())
    block_tasks = [key for key in graph if isinstance(key, tuple) and key[0].startswith("write-block-")]
    assert len(block_tasks) == 7
    shared_sums = [key for key in graph if "sum" in str(key)]
    assert shared_sums, "the global reduction stays a task of its own"
    for key in block_tasks:  # it is not copied into any block's own graph
        block = graph[key].args[0].value
        assert not any("sum" in str(k) for k in block.graph)
        assert len(block.outputs) == len(names)
    assert dask.compute(writes, scheduler="sync")[0] == 7 * len(names)
    written = xr.open_zarr(path, group="blocks", consolidated=False)
    np.testing.assert_array_equal(written["centred"].values, ds["centred"].values)
    assert written["reason"].values.tolist() == ds["reason"].values.tolist()


def test_block_writes__written_on_a_cluster_block_by_block(tmp_path, client):
    ds = _lazy_group(n_loci=40, chunk=8)
    path = str(tmp_path / "run.zarr")
    with dask.config.set(scheduler=client.get):
        store.write_group(path, ds, "mr")
    written, expected = store.open_group(path, "mr"), ds.compute()
    for name in expected.variables:
        assert written[name].values.tolist() == expected[name].values.tolist(), name


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda ds: ds.chunk({"locus": (8, 4, 8, 30)}), "irregular locus chunks"),
        (lambda ds: ds.chunk({"position": 3}), "two chunks along position"),
        (lambda ds: ds.assign(flag=ds["effect"] > 0), "bool (xarray encodes it as int8)"),
        (lambda ds: ds.assign(per_task=("task", da.zeros(4, chunks=2))), "a dask variable without locus"),
    ],
)
def test_blockable_variables__anything_else_goes_through_to_zarr(tmp_path, change, why):
    ds = change(_lazy_group(n_loci=50, chunk=8))
    assert blockable_variables(ds, 8) is None, why


def test_blockable_variables__numpy_only_has_nothing_to_block():
    assert blockable_variables(_lazy_group().compute(), 8) == []


def test_block_writes__failed_block_leaves_the_previous_group(tmp_path):
    path = str(tmp_path / "run.zarr")
    store.write_group(path, _lazy_group().compute(), "mr", fingerprint="v1")

    def fail(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 3:
            raise RuntimeError("block 3 failed")
        return block

    ds = _lazy_group()
    ds["effect"] = ds["effect"].copy(data=ds["effect"].data.map_blocks(fail, dtype=np.float32))
    assert blockable_variables(ds, 8)
    with pytest.raises(RuntimeError, match="block 3 failed"):
        store.write_group(path, ds, "mr", fingerprint="v2")
    assert store.stage_fingerprint(path, "mr") == "v1"
    assert store.open_group(path, "mr")["centred"].values.tolist() == _lazy_group()["centred"].values.tolist()
