"""Many tasks: ``ref_pred``/``mut_pred`` sharded along ``task`` (one shard per locus chunk, inner chunks of
a few tasks), reading one task of a 919-task DeepSEA-style model, bit-identity with an unsharded store,
resume and verification of sharded stores, and ``tasks: {keep: pairs}``.

Real parts throughout: a DeepSEA-style ensemble (``deepsea_ensemble``, 919 outputs, small filters and
512 bp so that ISM takes seconds), Dask worker processes (the module's ``client``), Zarr stores on disk,
read through a counting wrapper of Zarr's own ``LocalStore``.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore, WrapperStore

from conftest import EXAMPLE_FASTA, assert_same_ism
from deepmr_dist import schema
from deepmr_dist.errors import InputError
from deepmr_dist.io import store
from deepmr_dist.io.sequence import read_fasta, sequences_dataset
from deepmr_dist.io.verify import verify_ism
from deepmr_dist.models.ensemble import ModelSpec, fingerprint, load_members, member_names
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.plan import Plan, output_head, pair_tasks, plan
from deepmr_dist.pipeline.runner import run_pipeline
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.stages.predict import ISMSettings, PredictReport, predict, run_fingerprint, validate_model

N_TASKS, LENGTH, N_LOCI, CHUNK = 919, 512, 4, 2  # 2 shards of 2 loci x 2 members x 512 bp x 4 alleles x 919 tasks
SMALL_DEEPSEA = (("dropout", (0.2, 0.2, 0.5)), ("filters", (8, 12, 16)), ("hidden", 16), ("pool", 2), ("width", 5))
DEEPSEA = "deepmr_dist.models.architectures:deepsea_ensemble"
SPEC = ModelSpec((DEEPSEA,), options=(*SMALL_DEEPSEA, ("length", LENGTH), ("n_members", 2), ("n_tasks", N_TASKS), ("seed", 3)))
SETTINGS = ISMSettings(chunk_loci=CHUNK, mutant_batch=1024)
COLUMN = CHUNK * 2 * LENGTH * 4 * 4
"""Bytes of one task of one ``mut_pred`` locus chunk (float32): 32 KiB."""
TASK_NAMES = [f"cell{i // 10}|assay{i % 10}" for i in range(N_TASKS)]


class CountingStore(WrapperStore):
    """Zarr's store wrapper that records every key read and the bytes it returned."""

    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self.reads: list[tuple[str, int]] = []

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        self.reads.append((key, 0 if value is None else len(value)))
        return value

    async def get_partial_values(self, prototype, key_ranges):
        values = await self._store.get_partial_values(prototype, key_ranges)
        self.reads += [(key, 0 if v is None else len(v)) for (key, _), v in zip(key_ranges, values)]
        return values


def _loci() -> xr.Dataset:
    codes = np.random.default_rng(7).integers(0, 4, (N_LOCI, LENGTH)).astype(np.int8)
    return sequences_dataset(codes, [f"locus{i}" for i in range(N_LOCI)])


def _predict_into(path: Path, client, inner_chunk_bytes: int | None) -> xr.Dataset:
    """``predict`` into a store created with ``inner_chunk_bytes`` (None: as ``predict`` creates it).

    A store of the same run created by another layout is what ``predict`` resumes: it writes into the
    store's own encoding, as it does for a store written before sharding existed.
    """
    loci = _loci()
    if inner_chunk_bytes is not None:
        members = load_members(SPEC)
        tasks = validate_model(members, SPEC, SETTINGS.head, loci)
        run_fp = run_fingerprint(fingerprint(members, SPEC), loci, SETTINGS)
        template = store.ism_template(loci, member_names(SPEC, len(members)), tasks, CHUNK)
        store.create_store(str(path), template, fingerprint=run_fp, attrs={}, chunk_loci=CHUNK,
                           inner_chunk_bytes=inner_chunk_bytes)  # fmt: skip
    return predict(loci, SPEC, str(path), client=client, settings=SETTINGS, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, client) -> dict[str, Path]:
    """The same ISM run in three layouts: one task per inner chunk, the default rule's, and unsharded."""
    root = tmp_path_factory.mktemp("task-chunks")
    paths = {"one_task": root / "one_task.zarr", "default": root / "default.zarr", "unsharded": root / "unsharded.zarr"}
    for name, inner in (("one_task", COLUMN), ("default", None), ("unsharded", 2**40)):
        _predict_into(paths[name], client, inner)
    return paths


def _layout(path: Path, name: str, group: str = schema.ISM) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(inner chunks, shards) of array ``name`` of ``group``; shards None: not sharded."""
    arr = zarr.open_array(str(path), path=f"{group}/{name}", mode="r")
    return arr.chunks, arr.shards


def _shard_index(path: Path, index: int) -> np.ndarray:
    """(offset, nbytes) of every inner chunk of ``mut_pred`` shard ``index``, parsed from the shard's end.

    The Zarr v3 sharding spec's default index: little-endian uint64 pairs, then a 4-byte CRC32C.
    """
    raw = (path / "ism" / "mut_pred" / "c" / str(index) / "0" / "0" / "0" / "0").read_bytes()
    n = _layout(path, "mut_pred")[1][-1]
    body = raw[-(16 * n + 4) : -4]
    return np.array(struct.unpack(f"<{2 * n}Q", body), dtype=np.uint64).reshape(n, 2)


# --------------------------------------------------------------------------- the rule


def test_tasks_per_chunk__inner_chunks_of_about_a_mebibyte_along_task():
    deepsea = 16 * 5 * 1000 * 4 * 4  # 16 loci x 5 members x 1 kb x 4 alleles, float32: 1.22 MiB per task
    assert store.tasks_per_chunk(deepsea, 919) == 1
    assert store.tasks_per_chunk(2**20 // 8, 919) == 8
    assert store.tasks_per_chunk(16 * 3 * 100 * 4 * 4, 4) == 4  # the bundled example: no sharding
    assert store.tasks_per_chunk(2**20 // 3, 4) == 3  # 3 tasks per inner chunk, the shard padded to 6
    assert store.tasks_per_chunk(2**20, 1) == 1
    dry_run = Plan(entry_points=[], n_loci=32, length=1000, n_members=5, tasks=TASK_NAMES, pairs=[], chunk_loci=16,
                   forward_passes=0, mut_pred_bytes=0, train_members=0).describe()  # fmt: skip
    assert dry_run.endswith("2 chunk(s) of 16 loci, one ISM task each, each a shard of inner chunks of 1 task(s) (1.22 MiB)")


def test_create_store__deepsea_sized_store_is_one_shard_per_locus_chunk_with_one_task_per_inner_chunk(tmp_path):
    """Only metadata and sequences are written: 32 loci of 1 kb, 5 members, 919 tasks."""
    codes = np.zeros((32, 1000), np.int8)
    template = store.ism_template(sequences_dataset(codes, [f"l{i}" for i in range(32)]),
                                  [f"m{i}" for i in range(5)], TASK_NAMES, 16)  # fmt: skip
    store.create_store(str(tmp_path / "s.zarr"), template, fingerprint="f", attrs={}, chunk_loci=16)
    assert _layout(tmp_path / "s.zarr", "mut_pred") == ((16, 5, 1000, 4, 1), (16, 5, 1000, 4, 919))
    assert _layout(tmp_path / "s.zarr", "ref_pred") == ((16, 5, 919), None)  # 320 B per task: no sharding
    ism = store.open_run(str(tmp_path / "s.zarr"))["ism"]
    assert ism["mut_pred"].data.chunks == ((16, 16), (5,), (1000,), (4,), (919,))  # one dask chunk per shard


def test_create_store__few_tasks_keep_one_chunk_per_locus_chunk_and_padded_shards_hold_every_task(tmp_path):
    template = store.ism_template(read_fasta(EXAMPLE_FASTA), ["m0", "m1", "m2"], ["t0", "t1", "t2", "t3"], 16)
    store.create_store(str(tmp_path / "a.zarr"), template, fingerprint="f", attrs={}, chunk_loci=16)
    assert _layout(tmp_path / "a.zarr", "mut_pred") == ((16, 3, 100, 4, 4), None)
    column = 16 * 3 * 100 * 4 * 4
    store.create_store(str(tmp_path / "b.zarr"), template, fingerprint="f", attrs={}, chunk_loci=16,
                       inner_chunk_bytes=3 * column)  # fmt: skip
    assert _layout(tmp_path / "b.zarr", "mut_pred") == ((16, 3, 100, 4, 3), (16, 3, 100, 4, 6))
    values = np.random.default_rng(0).normal(size=(16, 3, 100, 4, 4)).astype(np.float32)
    store.write_ism_chunk(str(tmp_path / "b.zarr"), 16, values[:, :, 0, 0, :], values)
    np.testing.assert_array_equal(store.open_run(str(tmp_path / "b.zarr"))["ism"]["mut_pred"][16:32].values, values)
    assert verify_ism(str(tmp_path / "b.zarr"), full=True).ok


# --------------------------------------------------------------------------- 919 tasks through predict


def test_predict__sharded_stores_hold_exactly_the_values_of_an_unsharded_one(stores):
    assert _layout(stores["one_task"], "mut_pred") == ((CHUNK, 2, LENGTH, 4, 1), (CHUNK, 2, LENGTH, 4, N_TASKS))
    assert _layout(stores["default"], "mut_pred") == ((CHUNK, 2, LENGTH, 4, 32), (CHUNK, 2, LENGTH, 4, 928))
    assert _layout(stores["unsharded"], "mut_pred") == ((CHUNK, 2, LENGTH, 4, N_TASKS), None)
    opened = {name: store.open_run(str(path))["ism"] for name, path in stores.items()}
    for name in ("one_task", "default"):
        assert_same_ism(opened[name], opened["unsharded"])  # same shapes, dims, coordinates; bit for bit
        np.testing.assert_array_equal(opened[name]["chunk_digest"].values, opened["unsharded"]["chunk_digest"].values)
        assert opened[name]["mut_pred"].data.chunks == opened["unsharded"]["mut_pred"].data.chunks
        assert verify_ism(str(stores[name]), full=True).ok
    assert opened["default"].attrs[store.TASK_INDICES_ATTR] == list(range(N_TASKS))


def test_read_one_task__reads_the_shard_indexes_and_one_inner_chunk_per_shard(stores):
    """Bound asserted: per shard, its index (16 bytes per inner chunk + 4) plus the stored bytes of task k's
    inner chunk, as the shard's own index gives them; nothing else of ``mut_pred`` is read."""
    path, task = stores["one_task"], 517
    counting = CountingStore(LocalStore(str(path), read_only=True))
    ism = xr.open_zarr(counting, group="ism", consolidated=False)
    counting.reads.clear()
    values = ism["mut_pred"].isel(task=task).values
    read = sum(n for key, n in counting.reads if key.startswith("ism/mut_pred/c/"))

    index_bytes = 16 * N_TASKS + 4
    shards = [path / "ism" / "mut_pred" / "c" / str(i) / "0" / "0" / "0" / "0" for i in range(N_LOCI // CHUNK)]
    chunk_bytes = sum(int(_shard_index(path, i)[task, 1]) for i in range(len(shards)))
    stored = sum(p.stat().st_size for p in shards)
    assert chunk_bytes <= read <= chunk_bytes + len(shards) * index_bytes
    assert read / stored < 2.5 / N_TASKS  # about 1/919: the index is as large as a 32 KiB inner chunk here
    np.testing.assert_array_equal(values, store.open_run(str(stores["unsharded"]))["ism"]["mut_pred"][..., task].values)


def test_resume__sharded_store_recomputes_a_deleted_or_truncated_shard(stores, client, tmp_path):
    path = tmp_path / "resumed.zarr"
    shutil.copytree(stores["one_task"], path)
    shard = path / "ism" / "mut_pred" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    damaged = verify_ism(str(path)).damaged
    assert [(c.start, c.stop) for c in damaged] == [(2, 4)] and "were written" in damaged[0].problems[0]
    ism = _predict_into(path, client, None)
    assert PredictReport.of(ism).chunks_computed == 1
    assert_same_ism(ism, store.open_run(str(stores["unsharded"]))["ism"])

    shard.unlink()
    assert "is missing" in verify_ism(str(path)).damaged[0].problems[0]
    assert PredictReport.of(_predict_into(path, client, None)).chunks_computed == 1
    assert_same_ism(store.open_run(str(path))["ism"], store.open_run(str(stores["unsharded"]))["ism"])


def test_effects__of_a_sharded_store_equal_those_of_an_unsharded_one_and_are_written_sharded(stores, tmp_path):
    sharded = compute_effects(store.open_run(str(stores["one_task"]))["ism"].isel(task=[3, 900]))
    unsharded = compute_effects(store.open_run(str(stores["unsharded"]))["ism"].isel(task=[3, 900]))
    assert sharded["effect"].data.chunks[0] == (2 * CHUNK,)  # two tasks' chunks are small: one effects block
    for name in ("effect", "effect_se"):
        np.testing.assert_array_equal(sharded[name].values, unsharded[name].values)

    path = tmp_path / "effects.zarr"
    shutil.copytree(stores["one_task"], path)
    every_task = compute_effects(store.open_run(str(path))["ism"])
    written = store.write_group(str(path), every_task, schema.EFFECTS)  # one dask task per locus chunk and shard
    # 2 loci x 512 bp x 4 alleles of float32: 16 KiB per task, 64 tasks per inner chunk, 15 of them per shard
    assert _layout(path, "effect", schema.EFFECTS) == ((CHUNK, LENGTH, 4, 64), (CHUNK, LENGTH, 4, 960))
    np.testing.assert_array_equal(written["effect"].isel(task=900).values, unsharded["effect"].isel(task=1).values)


# --------------------------------------------------------------------------- tasks: {keep: pairs}


def _pairs_config(tmp_path: Path, **tasks) -> PipelineConfig:
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {"sources": [DEEPSEA],
                  "options": {**dict(SMALL_DEEPSEA), "length": 100, "n_members": 2, "n_tasks": N_TASKS, "seed": 5}},
        "tasks": {"names": TASK_NAMES, "keep": "pairs", "transform": "sigmoid", **tasks},
        "pairs": [[TASK_NAMES[700], TASK_NAMES[12]], [TASK_NAMES[12], TASK_NAMES[700]]],
        "ism": {"chunk_loci": 16},
        "mr": {"methods": ["ivw", "egger"]},
        "store": str(tmp_path / "run.zarr"),
        "report": False,
    }  # fmt: skip
    return parse_config(data, PipelineConfig, "pipeline.yaml")


def test_keep_pairs__stores_only_the_pairs_tasks_and_records_their_indices_and_effects_and_mr_run(tmp_path, client):
    config = _pairs_config(tmp_path)
    assert plan(config).tasks == [TASK_NAMES[12], TASK_NAMES[700]]  # in output order
    result = run_pipeline(config, client=client, progress=False)
    groups = store.open_run(config.store)
    ism = groups[schema.ISM]
    assert ism["task"].values.tolist() == [TASK_NAMES[12], TASK_NAMES[700]]
    assert ism.attrs[store.TASK_INDICES_ATTR] == [12, 700]
    assert ism.sizes["task"] == 2 and groups[schema.EFFECTS].sizes["task"] == 2
    assert groups[schema.MR]["pair"].values.tolist() == [f"{TASK_NAMES[700]}->{TASK_NAMES[12]}",
                                                         f"{TASK_NAMES[12]}->{TASK_NAMES[700]}"]  # fmt: skip
    assert np.isfinite(groups[schema.MR]["local_ce"].values).any()
    assert len(result.global_table) > 0


def test_keep_pairs__without_names_takes_default_names_by_index_and_unknown_tasks_are_errors(tmp_path):
    config = _pairs_config(tmp_path)
    assert pair_tasks(config, TASK_NAMES) == [TASK_NAMES[12], TASK_NAMES[700]]
    unnamed = config.model_copy(update={"tasks": config.tasks.model_copy(update={"names": None}),
                                        "pairs": [("task9", "task2"), ("task2", "task40")]})  # fmt: skip
    head = output_head(unnamed)
    assert (head.tasks, head.names(N_TASKS)) == ((2, 9, 40), ["task2", "task9", "task40"])
    with pytest.raises(InputError, match=r"pairs\[0\] names task 'GATA1', but without tasks.names"):
        pair_tasks(unnamed.model_copy(update={"pairs": [("GATA1", "task2")]}), None)
    with pytest.raises(InputError, match=r"pairs\[1\] names task 'nope', which tasks.names does not have"):
        pair_tasks(config.model_copy(update={"pairs": [(TASK_NAMES[0], TASK_NAMES[1]), ("nope", TASK_NAMES[1])]}), TASK_NAMES)
    with pytest.raises(InputError, match="tasks.keep: pairs keeps the tasks that pairs name"):
        parse_config({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "tasks": {"keep": "pairs"}},
                     PipelineConfig, "p.yaml")  # fmt: skip
