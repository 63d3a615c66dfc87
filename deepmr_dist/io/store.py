"""The run store: a Zarr (v3) store with one group per stage.

Layout (see DESIGN.md): ``ism`` holds ``sequence``, ``ref_pred``,
``mut_pred``, the per-chunk record ``chunk_digest`` and ``chunk_nbytes``, and
``complete``; ``effects`` holds ``effect`` and ``effect_se``; later stages add
``mr`` and ``meta``. Every array is chunked along ``locus`` only. The ``ism``
group is created as a template first (metadata, coordinates and sequences),
then filled by one chunk-aligned region write per locus chunk, ``complete``
written last, so a crashed write is recomputed on resume.

A store's root group carries the :data:`STORE_ATTR` marker. Nothing is ever
removed or overwritten that a call did not create, unless the call was asked
to overwrite and the target is recognisably a deepmr store; a group of a store
is replaced only by the stage that writes it. :func:`inspect_target` says what
lies at a path and :func:`check_overwritable` applies that rule.

Three guarantees hold for every writer:

- **Verified chunks.** Each ISM chunk write records, before ``complete``, a
  64-bit BLAKE2b of every locus's predictions and the byte length of the
  encoded chunks. :func:`deepmr_dist.io.verify.verify_ism` finds chunks that are missing, of another
  length than written (cheap: one listing per array) or whose values no longer
  hash to the record (``full``: every complete chunk is read and decoded);
  :func:`deepmr_dist.io.verify.mark_incomplete` hands them back to ``predict``. A missing chunk
  never passes for data: Zarr would read it as the fill value, so whoever reads
  ISM predictions verifies the listing first.
- **Atomic groups.** :func:`write_group` writes a derived group under a hidden
  staging name and swaps it in, fingerprint included, only once every chunk is
  written (see :func:`write_group` for what is atomic where).
- **One writer.** :func:`deepmr_dist.io.lock.lock` holds an advisory lease (:data:`deepmr_dist.io.lock.LOCK_NAME`) in the
  store for the duration of a writing run, refreshed by a heartbeat thread;
  a second writer is refused with one line naming the holder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import dask.threaded
import fsspec
import numpy as np
import xarray as xr
import zarr
from distributed import Client
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, BloscShuffle

from deepmr_dist import __version__, schema
from deepmr_dist.errors import StoreError
from deepmr_dist.io import progress
from deepmr_dist.io import provenance
from deepmr_dist.io.attrs import decode_attrs, encode_attrs
from deepmr_dist.io.block_writes import block_writes, blockable_variables, metadata_template
from deepmr_dist.io.location import filesystem
from deepmr_dist.io.lock import held_lease, is_lease_file, lock

log = logging.getLogger(__name__)

FINGERPRINT_ATTR = "deepmr_fingerprint"
TASK_INDICES_ATTR = "task_indices"
"""Attribute of the ``ism`` group: the index among the model's outputs of each entry of ``task``, in order."""
STORE_ATTR = "deepmr_store"
"""Attribute of a store's root group that marks it as a deepmr run store; its value is the layout version."""
STORE_LAYOUT = 2
"""Layout 2 records ``chunk_digest`` and ``chunk_nbytes`` per ISM chunk; layout 1 stores are verified by listing only."""

RECORD = ("chunk_digest", "chunk_nbytes")
"""The ``ism`` variables written with each chunk, before ``complete``, that :func:`deepmr_dist.io.verify.verify_ism` checks it against."""

PREDICTIONS = ("ref_pred", "mut_pred")
"""The ``ism`` arrays an ISM task writes (the record is their checksum)."""



def compressors(*, derived: bool = False) -> list[BloscCodec]:
    """The codec of a run store's arrays: Blosc/Zstd level 1 with byte shuffle for the ISM predictions,
    Blosc/lz4 with bit shuffle for every derived group (:func:`write_group`).

    The predictions are written once, by the GPU stage, and make most of a store's bytes, so
    they take the smaller codec. Zstd level 1 rather than 3: on float32 predictions it compressed
    as well (ratio 1.38 against 1.39) and encoded about 2.3 times faster (345 against 149 MB/s,
    one core, AMD EPYC).

    Derived groups are encoded inside the reductions' own pass and decoded by every later
    stage. On the float32 effects of ``bench_scale.py`` (one core, AMD EPYC), against Zstd level 1
    with byte shuffle (ratio 1.31, encode 275 MB/s, decode 1.1 GB/s): Zstd with bit shuffle 1.24,
    908 MB/s, 1.3 GB/s; lz4 with bit shuffle 1.15, 3.3 GB/s, 5.1 GB/s. lz4 stores 14 % more bytes
    of a group 0.4 times the predictions' size (about 4 % of the store's bytes) and took the
    effects pass to about 2 read passes of its predictions (``benchmarks/README.md``).
    """
    if derived:
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)]
    return [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)]


INNER_CHUNK_BYTES = 2**20
"""What an inner chunk along ``task`` of a sharded array aims to hold, uncompressed (see :func:`tasks_per_chunk`).

zarr-python's sharding codec costs about 0.1-0.25 ms per inner chunk (inner chunks of 20 KiB made a
whole-shard read 12 times slower than one unsharded chunk), hence about 1 MiB. Measured on a
DeepSEA-sized shard (16 loci x 5 members x 1 kb x 919 tasks, one task per inner chunk; 2 shared
cores): one task read in 0.02 s instead of 3.5 s; with single-threaded Blosc, as in Dask workers, the
whole shard written in 6.5 s instead of 11.9 s and read in 6.5 s instead of 8.0 s; with Blosc's own
threads (the main thread) read in twice the unsharded time.
"""

def tasks_per_chunk(column_bytes: int, n_tasks: int, inner_chunk_bytes: int = INNER_CHUNK_BYTES) -> int:
    """Tasks per inner chunk of a locus chunk whose slice of one task holds ``column_bytes``.

    The rule: ``inner_chunk_bytes // column_bytes`` tasks, at least 1 and at
    most ``n_tasks``. ``n_tasks`` means no sharding (one chunk per locus chunk,
    as every store written before sharding); below it, the locus chunk is one
    shard holding inner chunks of that many tasks, so reading one task reads
    the shard's index and about ``max(column_bytes, inner_chunk_bytes)``. A
    DeepSEA-sized chunk (16 loci x 5 members x 1000 bp x 4 alleles of float32:
    1.25 MiB per task) gets one task per inner chunk, a store of 2 to 4 tasks
    of that size one shard of 2 to 4 inner chunks, and a small one (48 loci
    of 100 bp, 3 members, 16 loci per chunk: 75 KiB per task) none.
    """
    return max(1, min(n_tasks, inner_chunk_bytes // max(column_bytes, 1)))


def encoding_for(
    ds: xr.Dataset,
    chunk_loci: int,
    *,
    inner_chunk_bytes: int = INNER_CHUNK_BYTES,
    derived: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zarr encoding: :func:`compressors` (of a ``derived`` group, or the predictions') and chunks along
    ``locus`` only, for every data variable of ``ds``.

    A variable with a ``task`` dim whose locus chunk holds more than ``inner_chunk_bytes``
    (see :func:`tasks_per_chunk`) is sharded: its locus chunk is one shard (the object one
    writer writes, never shared by two), split into inner chunks along ``task`` only. The
    shard's task extent is rounded up to a multiple of the inner chunk (Zarr requires that),
    so each locus chunk stays one shard.
    """
    enc = {}
    for name, arr in ds.data_vars.items():
        chunks = tuple(min(chunk_loci, n) if d == "locus" else n for d, n in zip(arr.dims, arr.shape))
        enc[name] = {"compressors": compressors(derived=derived), "chunks": chunks}
        if "task" not in arr.dims or 0 in chunks:
            continue
        axis = arr.dims.index("task")
        n_tasks = chunks[axis]
        per = tasks_per_chunk(int(np.prod(chunks)) // n_tasks * arr.dtype.itemsize, n_tasks, inner_chunk_bytes)
        if per < n_tasks:
            enc[name]["chunks"] = chunks[:axis] + (per,) + chunks[axis + 1 :]
            enc[name]["shards"] = chunks[:axis] + (-(-n_tasks // per) * per,) + chunks[axis + 1 :]
    return enc


def ism_template(loci: xr.Dataset, members: list[str], tasks: list[str], chunk_loci: int) -> xr.Dataset:
    """The ``ism`` group as a lazy template: sequences and coordinates eager, predictions lazy.

    Parameters
    ----------
    loci
        Dataset with ``sequence`` (locus, position) and locus coordinates (see :mod:`deepmr_dist.io.sequence`).
    members, tasks
        Names of the ``member`` and ``task`` coordinates.
    chunk_loci
        Loci per chunk; one ISM task computes one chunk.
    """
    n_loci, length = loci.sizes["locus"], loci.sizes["position"]
    n_members, n_tasks = len(members), len(tasks)
    ds = loci.copy()
    ds = ds.assign_coords(
        member=np.asarray(members, dtype=object),
        allele=np.asarray(list("ACGT"), dtype=object),
        task=np.asarray(tasks, dtype=object),
    )
    lc = min(chunk_loci, n_loci)
    ds["ref_pred"] = (
        schema.VARIABLES["ref_pred"].dims,
        da.full((n_loci, n_members, n_tasks), np.nan, dtype=np.float32, chunks=(lc, n_members, n_tasks)),
    )
    ds["mut_pred"] = (
        schema.VARIABLES["mut_pred"].dims,
        da.full(
            (n_loci, n_members, length, 4, n_tasks),
            np.nan,
            dtype=np.float32,
            chunks=(lc, n_members, length, 4, n_tasks),
        ),
    )
    for name in RECORD:
        ds[name] = (("locus",), da.zeros(n_loci, dtype=np.uint64, chunks=lc))
    ds["complete"] = (("locus",), da.zeros(n_loci, dtype=bool, chunks=lc))
    return schema.validate(ds, schema.ISM)


# --------------------------------------------------------------------------- what lies at a path


@dataclass(frozen=True)
class Target:
    """What lies at a store path before a call writes there (see :func:`inspect_target`).

    Attributes
    ----------
    path : str
        The path or fsspec URL, as given.
    kind : {"absent", "empty", "store", "other"}
        Nothing; an empty directory (a lease, see :func:`deepmr_dist.io.lock.lock`, does not count);
        a recognisable deepmr store (a root group with the :data:`STORE_ATTR`
        marker, or an ``ism`` group with a run fingerprint); anything else.
    problem : str or None
        Why a ``"store"`` is not usable as it is, or why an ``"other"`` is not a store: one line naming the path.
    fingerprint : str or None
        The run fingerprint of a usable store.
    """

    path: str
    kind: Literal["absent", "empty", "store", "other"]
    problem: str | None = None
    fingerprint: str | None = None


def _group_attributes(fs: fsspec.AbstractFileSystem, key: str) -> dict[str, Any]:
    """The attributes of the Zarr v3 group whose metadata document is ``key``.

    Raises
    ------
    FileNotFoundError
        If there is no document at ``key``.
    ValueError
        If the document is not a readable Zarr v3 group; the message says why.
    """
    try:
        node = json.loads(fs.cat_file(key))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(node, dict) or node.get("zarr_format") != 3 or node.get("node_type") != "group":
        raise ValueError("not the metadata of a Zarr v3 group")
    attributes = node.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValueError("its attributes are not a JSON object")
    return attributes


def _ism_state(fs: fsspec.AbstractFileSystem, root: str, path: str) -> tuple[str | None, str | None]:
    """(run fingerprint, problem) of the ``ism`` group of the store at ``root``; exactly one is None."""
    try:
        fingerprint = _group_attributes(fs, f"{root}/{schema.ISM}/zarr.json").get(FINGERPRINT_ATTR)
    except FileNotFoundError:
        return None, f"{path}/{schema.ISM}/zarr.json is missing"
    except ValueError as exc:
        return None, f"{path}/{schema.ISM}/zarr.json is damaged ({exc})"
    if not isinstance(fingerprint, str):
        return None, f"{path}/{schema.ISM}/zarr.json carries no run fingerprint ({FINGERPRINT_ATTR!r})"
    return fingerprint, None



def inspect_target(path: str, storage_options: Mapping[str, Any] | None = None) -> Target:
    """What lies at ``path`` (a directory or an fsspec URL): nothing, an empty directory, a deepmr store, or other.

    Only metadata documents are read; nothing is written.

    Raises
    ------
    StoreError
        For an unknown URL protocol, or a path that cannot be read (e.g. a directory without read permission).
    """
    fs, root = filesystem(path, storage_options)
    try:
        return _inspect(fs, root, path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None


def _inspect(fs: fsspec.AbstractFileSystem, root: str, path: str) -> Target:
    if not fs.exists(root):
        return Target(path, "absent")
    if not fs.isdir(root):
        return Target(path, "other", f"{path} exists and is not a deepmr store (it is a file)")
    if not [child for child in fs.ls(root, detail=False) if not is_lease_file(child)]:
        return Target(path, "empty")
    try:
        marked = STORE_ATTR in _group_attributes(fs, f"{root}/zarr.json")
    except FileNotFoundError:
        return Target(path, "other", f"{path} exists and is not a deepmr store")
    except ValueError as exc:
        return Target(path, "other", f"{path}/zarr.json is damaged ({exc}), so {path} is not recognisably a deepmr store")
    fingerprint, problem = _ism_state(fs, root, path)
    if marked or fingerprint is not None:  # stores written before the marker existed carry a fingerprint only
        return Target(path, "store", problem, fingerprint)
    return Target(
        path, "other", f"{path} exists and is not a deepmr store (a Zarr group without the {STORE_ATTR!r} marker)"
    )


def check_overwritable(target: Target, *, overwrite: bool, stage_group: str | None = None) -> None:
    """Raise unless a call may write at ``target``: the one rule of every writer of a store.

    Nothing, an empty directory and a deepmr store may be written to; anything
    that is not recognisably a deepmr store is refused even with ``overwrite``.
    A run (``stage_group`` None) resumes a usable store or replaces it, only
    with ``overwrite`` (see :func:`prepare_new_store`), and continues a store
    whose ``ism`` group is damaged or missing only by replacing it, with
    ``overwrite``. A stage writing its group ``stage_group`` replaces that group alone.

    Raises
    ------
    StoreError
        One line naming the path and what is wrong.
    """
    if target.kind == "other":
        even = " even with --overwrite" if overwrite else ""
        raise StoreError(f"{target.problem}; refusing to overwrite it{even}: use another store, or move it away yourself")
    if stage_group is None and target.kind == "store" and target.problem and not overwrite:
        raise StoreError(
            f"{target.problem}; refusing to continue: repair it, or pass --overwrite to replace the whole store"
        )


def prepare_new_store(target: Target, *, overwrite: bool, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Make room for a new store at ``target.path``; the deepmr store there is removed only with ``overwrite``.

    Returns
    -------
    bool
        Whether ``target.path`` is an existing empty directory, which the new
        store goes into and a cleanup must keep (see :func:`remove_store`).

    Raises
    ------
    StoreError
        From :func:`check_overwritable`, or if a usable store is there and ``overwrite`` is False.
    """
    check_overwritable(target, overwrite=overwrite)
    if target.kind == "store":
        if not overwrite:
            raise StoreError(
                f"{target.path} was made by a different model, inputs or settings; "
                "use another store or pass --overwrite to replace it"
            )
        remove_store(target.path, storage_options)
    return target.kind == "empty"


def check_run_store(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`StoreError` (one line) unless ``path`` holds a deepmr run store with a usable ``ism`` group."""
    target = inspect_target(path, storage_options)
    if target.kind != "store" or target.problem:
        raise StoreError(target.problem or f"{path} is not a deepmr run store (no {schema.ISM!r} group)")


def read_fingerprint(path: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The fingerprint a store was created with (``None`` if ``path`` holds no usable store)."""
    return inspect_target(path, storage_options).fingerprint


def create_store(
    path: str,
    template: xr.Dataset,
    *,
    fingerprint: str,
    attrs: Mapping[str, Any],
    chunk_loci: int,
    storage_options: Mapping[str, Any] | None = None,
    inner_chunk_bytes: int = INNER_CHUNK_BYTES,
) -> None:
    """Write an empty run store where nothing is (see :func:`prepare_new_store`); nothing is ever replaced.

    Every chunk of the eager variables (the sequences) is written, even one
    equal to the fill value, so that :func:`deepmr_dist.io.verify.verify_ism` can tell a missing chunk.
    ``ref_pred`` and ``mut_pred`` are sharded along ``task`` where a locus chunk
    holds more than ``inner_chunk_bytes`` (:func:`encoding_for`); every later
    write (:func:`write_ism_chunk`, a resume) follows the layout the store was created with.

    Raises
    ------
    StoreError
        If the store cannot be written there (e.g. a missing parent folder).
    """
    ds = template.copy()
    ds.attrs = {**attrs, FINGERPRINT_ATTR: fingerprint}
    try:
        ds = described(ds, schema.ISM, _create_root(path, storage_options))
        ds.to_zarr(
            path,
            group=schema.ISM,
            mode="w-",
            compute=False,
            consolidated=False,
            encoding=encoding_for(ds, chunk_loci, inner_chunk_bytes=inner_chunk_bytes),
            storage_options=storage_options,
            write_empty_chunks=True,
        )
    except OSError as exc:
        raise StoreError(f"cannot write a run store at {path}: {exc}") from None


def _create_root(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """Write the marked root group of a new store where there is none (a missing or empty directory, or a lease).

    Returns its ``history``: the current command's line (:mod:`deepmr_dist.io.provenance`).
    """
    key = _store_key(path, storage_options)
    history = provenance.with_current(None, key)
    zarr.create_group(path, attributes={STORE_ATTR: STORE_LAYOUT, **global_attrs(None, history)},
                      storage_options=storage_options)  # fmt: skip
    provenance.current().stores.add(key)
    return history


# --------------------------------------------------------------------------- self-description


CONVENTIONS = f"deepmr-dist store layout {STORE_LAYOUT}"
"""The ``Conventions`` attribute of every group: this layout. Not CF: model-output units are no UDUNITS
strings (see :mod:`deepmr_dist.schema`), though the variables' attribute names are CF's."""


def global_attrs(group: str | None, history: str) -> dict[str, str]:
    """``title``, ``history``, ``source`` and ``Conventions`` of the root group (``group`` None) or of ``group``.

    ``history`` holds one line per command that wrote the store (a group's: up to the command that wrote it).
    """
    title = "deepmr-dist run store"
    if group is not None:
        title += f", group {group}" + (f": {schema.GROUP_TITLES[group]}" if group in schema.GROUP_TITLES else "")
    return {"title": title, "history": history, "source": f"deepmr-dist {__version__}", "Conventions": CONVENTIONS}


def described(ds: xr.Dataset, group: str, history: str) -> xr.Dataset:
    """``ds`` as group ``group`` is written: every variable and coordinate with its registered ``long_name``,
    ``units`` and ``description`` (:func:`deepmr_dist.schema.attributes`), the group's :func:`global_attrs`,
    and every attribute NetCDF-safe (:func:`deepmr_dist.io.attrs.encode_attrs`). Data are not touched."""
    ds = ds.copy()
    for name, var in ds.variables.items():
        var.attrs = encode_attrs({**var.attrs, **schema.attributes(group, name)})
    ds.attrs = encode_attrs({**ds.attrs, **global_attrs(group, history)})
    return ds


def _decoded(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` (opened from a store) with its own and its variables' attributes decoded (:func:`deepmr_dist.io.attrs.decode_attrs`)."""
    for var in ds.variables.values():
        var.attrs = decode_attrs(var.attrs)
    ds.attrs = decode_attrs(ds.attrs)
    return ds


def _store_key(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """The store's URL, as :attr:`deepmr_dist.io.provenance.Command.stores` records it."""
    fs, root = filesystem(path, storage_options)
    return fs.unstrip_protocol(root)


def _history_now(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """The store's ``history`` with the current command's line (once per command), as the next write records it."""
    fs, root = filesystem(path, storage_options)
    try:
        recorded = _group_attributes(fs, f"{root}/zarr.json").get("history")
    except (FileNotFoundError, ValueError):
        recorded = None
    return provenance.with_current(recorded if isinstance(recorded, str) else None, _store_key(path, storage_options))


def _record_history(path: str, history: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write ``history`` (and the other :func:`global_attrs`) to the store's root group."""
    zarr.open_group(path, mode="r+", storage_options=storage_options).attrs.update(global_attrs(None, history))
    provenance.current().stores.add(_store_key(path, storage_options))


def record_command(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Add the current command's line to the store's ``history`` (once per command), for writes made outside
    :func:`write_group` and :func:`create_store`: a resumed ``predict``, ``verify --repair``."""
    _record_history(path, _history_now(path, storage_options), storage_options)


def chunk_bounds(n_loci: int, chunk_loci: int) -> list[tuple[int, int]]:
    """Half-open locus ranges of the store's chunks."""
    return [(start, min(start + chunk_loci, n_loci)) for start in range(0, n_loci, chunk_loci)]


def ism_chunking(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(n_loci, loci per chunk) of a store's ``ism`` group."""
    arr = zarr.open_array(path, path=f"{schema.ISM}/complete", mode="r", storage_options=storage_options)
    return arr.shape[0], arr.chunks[0]


def incomplete_chunks(path: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[int, int]]:
    """Locus ranges of the chunks that still have a locus not marked complete."""
    arr = zarr.open_array(path, path=f"{schema.ISM}/complete", mode="r", storage_options=storage_options)
    done = arr[:]
    return [(a, b) for a, b in chunk_bounds(arr.shape[0], arr.chunks[0]) if not done[a:b].all()]


def read_sequences(path: str, start: int, stop: int, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Base codes (stop - start, length) of a locus range."""
    arr = zarr.open_array(path, path=f"{schema.ISM}/sequence", mode="r", storage_options=storage_options)
    return arr[start:stop]


def read_locus_ids(path: str, start: int, stop: int, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Locus ids of a locus range."""
    arr = zarr.open_array(path, path=f"{schema.ISM}/locus", mode="r", storage_options=storage_options)
    return np.asarray(arr[start:stop], dtype=object)


def remove_store(path: str, storage_options: Mapping[str, Any] | None = None, *, keep_root: bool = False) -> None:
    """Delete the store at ``path`` (a directory or an fsspec URL) if it exists.

    Only for a store the caller created or may replace (see
    :func:`prepare_new_store`); with ``keep_root`` the directory itself stays,
    emptied (it existed before the store was written into it). A lease this
    thread holds on ``path`` (see :func:`deepmr_dist.io.lock.lock`) stays until it is released;
    the directory goes with it then, unless ``keep_root``.
    """
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        return
    held = held_lease(fs, root)
    if keep_root or held is not None:
        for child in fs.ls(root, detail=False):
            if held is None or not is_lease_file(child):
                fs.rm(child, recursive=True)
        if held is not None and not keep_root:
            held.remove_root = True
    else:
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- ISM chunks: write and record


def locus_digests(ref_pred: np.ndarray, mut_pred: np.ndarray) -> np.ndarray:
    """64-bit BLAKE2b of each locus's ``ref_pred`` and ``mut_pred`` (float32, C order), as uint64 (never 0)."""
    ref = np.ascontiguousarray(ref_pred, dtype=np.float32)
    mut = np.ascontiguousarray(mut_pred, dtype=np.float32)
    out = np.empty(ref.shape[0], dtype=np.uint64)
    for i in range(ref.shape[0]):
        digest = hashlib.blake2b(ref[i].tobytes(), digest_size=8)
        digest.update(mut[i].tobytes())
        out[i] = int.from_bytes(digest.digest(), "little") or 1  # 0 means "no record"
    return out


def chunk_key(arr: zarr.Array, index: int) -> str:
    """The store key (relative to the array) of locus chunk ``index`` of a locus-chunked array.

    For a sharded array it is the shard's key: the one object that holds the locus chunk.
    """
    return arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


def write_ism_chunk(
    path: str,
    start: int,
    ref_pred: np.ndarray,
    mut_pred: np.ndarray,
    storage_options: Mapping[str, Any] | None = None,
    *,
    fingerprint: str | None = None,
) -> None:
    """Write one locus chunk's predictions and their record, then mark its loci complete.

    The record (:data:`RECORD`) is each locus's digest (:func:`locus_digests`)
    and the byte length of the encoded ``ref_pred`` and ``mut_pred`` chunks as
    stored (for a sharded array, its shard, index included); it is written by
    the task that wrote the chunk, into the same locus chunk of its own arrays,
    so no two tasks ever write one object. A shard is written whole, its old
    object (a damaged one, on a recompute) removed first. Stores of layout 1
    have no record and get none.

    Parameters
    ----------
    fingerprint
        The run fingerprint the chunk belongs to: nothing is written into a
        store that another run has replaced meanwhile.

    Raises
    ------
    StoreError
        If the range is not aligned to the store's locus chunks (two writers could share a chunk),
        or the store's fingerprint is not ``fingerprint``.
    """
    group = zarr.open_group(path, path=schema.ISM, mode="r+", storage_options=storage_options)
    stop = start + ref_pred.shape[0]
    n_loci, chunk = group["complete"].shape[0], group["complete"].chunks[0]
    if start % chunk or (stop % chunk and stop != n_loci):
        raise StoreError(f"region {start}:{stop} of {path} is not aligned to its {chunk}-locus chunks")
    if fingerprint is not None and group.attrs.get(FINGERPRINT_ATTR) != fingerprint:
        raise StoreError(f"{path} was replaced by another run while loci {start}:{stop} were computed; nothing written")
    fs, root = filesystem(path, storage_options)
    for name, values in zip(PREDICTIONS, (ref_pred, mut_pred)):
        if group[name].shards is not None:  # Zarr merges a shard write into the stored shard, and fails on a damaged one
            _remove_object(fs, f"{root}/{schema.ISM}/{name}/{chunk_key(group[name], start // chunk)}")
        group[name][start:stop] = values
    if all(name in group for name in RECORD):
        nbytes = sum(fs.size(f"{root}/{schema.ISM}/{name}/{chunk_key(group[name], start // chunk)}") for name in PREDICTIONS)
        group["chunk_digest"][start:stop] = locus_digests(ref_pred, mut_pred)
        group["chunk_nbytes"][start:stop] = np.full(stop - start, nbytes, dtype=np.uint64)
    group["complete"][start:stop] = True


def _remove_object(fs: fsspec.AbstractFileSystem, key: str) -> None:
    """Delete the object at ``key`` if there is one."""
    try:
        fs.rm_file(key)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- derived groups


STAGE_ATTR = "deepmr_stage_fingerprint"
"""Attribute of a group written by a pipeline stage: the fingerprint of what it was computed from."""


def _hidden(group: str, what: str) -> str:
    """The name of a staging (``what="staging"``) or replaced (``"replaced"``) copy of ``group``."""
    return f".{group}.{what}-{uuid.uuid4().hex[:12]}"


def _swap_in(fs: fsspec.AbstractFileSystem, root: str, staging: str, group: str) -> None:
    """Put the complete group written at ``staging`` in place of ``group``.

    Local filesystems: two renames (``group`` to a hidden name, then
    ``staging`` to ``group``), each atomic; between them there is no ``group``.
    Elsewhere (object stores): the old group's ``zarr.json`` is deleted first,
    so it vanishes at once, then its objects; the new objects are copied, the
    group's ``zarr.json`` last, so the group appears whole; then the staging
    copy is deleted.
    """
    final, source = f"{root}/{group}", f"{root}/{staging}"
    if isinstance(fs, LocalFileSystem):
        replaced = f"{root}/{_hidden(group, 'replaced')}"
        if fs.exists(final):
            os.replace(final, replaced)
        os.replace(source, final)
        if fs.exists(replaced):
            fs.rm(replaced, recursive=True)
        return
    if fs.exists(final):
        if fs.exists(f"{final}/zarr.json"):
            fs.rm_file(f"{final}/zarr.json")
        fs.rm(final, recursive=True)
    objects = sorted(fs.find(source))
    metadata = f"{source}/zarr.json"
    for name in [o for o in objects if o != metadata] + [metadata]:
        fs.copy(name, final + name[len(source) :])
    fs.rm(source, recursive=True)


def _discard_leftovers(fs: fsspec.AbstractFileSystem, root: str, group: str) -> None:
    """Remove staging and replaced copies of ``group`` left by a writer that was killed."""
    for child in fs.ls(root, detail=False):
        if posixpath.basename(child.rstrip("/")).startswith(f".{group}."):
            log.info("removing %s, left by an interrupted write of group %r", child, group)
            fs.rm(child, recursive=True)


def write_group(
    path: str,
    ds: xr.Dataset,
    group: str,
    *,
    fingerprint: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Write ``ds`` (lazy or in memory) as group ``group`` of the store, replacing it; return it opened lazily.

    Every data variable is compressed with :func:`compressors` (a derived
    group's: lz4, bit shuffle) and chunked along ``locus`` as ``ds`` is (its first
    chunk along ``locus`` when dask-backed, else the whole axis), and nothing
    else. Dask-backed variables are written block by block, one Dask task per
    locus block computing and writing every variable's chunk of it
    (:mod:`deepmr_dist.io.block_writes`), or, for a Dataset that cannot be
    blocked that way, by xarray's ``to_zarr``. Fixed-width unicode variables and coordinates are
    written as variable-length strings, the string type Zarr v3 specifies
    (fixed-width UTF-32 has no v3 specification yet), through NumPy's
    ``StringDType``: unlike ``object`` it needs no pass over lazy data to infer
    the type.

    The group is written under a hidden staging name (``.GROUP.staging-*``,
    which :func:`open_run` and ``xr.open_zarr(group=GROUP)`` never see), its
    ``fingerprint`` (a stage's, see :func:`stage_fingerprint`) recorded there
    once every chunk is written, and only then swapped in (:func:`_swap_in`).
    A write that fails or is killed leaves the previous group as it was, or,
    if killed between the two renames of the swap, no group; never a
    half-written one. Staging copies left by a killed writer are removed by the
    next write of the group. The call holds the store's lease (:func:`deepmr_dist.io.lock.lock`).

    Where ``path`` holds nothing (or is an empty directory), a new store is
    created with it.

    The group is written :func:`described`: registered attributes on every
    variable and coordinate, ``title``, ``history``, ``source`` and
    ``Conventions``, and every attribute NetCDF-safe; the root group's
    ``history`` gets the current command's line once the group is in place.

    Raises
    ------
    StoreError
        If ``path`` holds something other than a deepmr store (see :func:`check_overwritable`),
        another writer holds its lease, or the filesystem refuses the write (full, read-only).
    """
    check_overwritable(inspect_target(path, storage_options), overwrite=False, stage_group=group)
    with lock(path, f"a write of group {group!r}", storage_options=storage_options):
        target = inspect_target(path, storage_options)
        check_overwritable(target, overwrite=False, stage_group=group)
        fs, root = filesystem(path, storage_options)
        staging = _hidden(group, "staging")
        try:
            if target.kind != "store":
                _create_root(path, storage_options)
            _discard_leftovers(fs, root, group)
            history = _history_now(path, storage_options)
            _write_staging(path, described(ds, group, history), staging, fingerprint, storage_options)
            _swap_in(fs, root, staging, group)
            _record_history(path, history, storage_options)
        except BaseException as exc:
            if fs.exists(f"{root}/{staging}"):
                fs.rm(f"{root}/{staging}", recursive=True)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write group {group!r} of {path}: {exc.strerror or exc}") from None
            raise
    return open_group(path, group, storage_options)


def _write_staging(
    path: str, ds: xr.Dataset, staging: str, fingerprint: str | None, storage_options: Mapping[str, Any] | None
) -> None:
    ds = ds.copy()
    ds.attrs.pop(STAGE_ATTR, None)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(np.dtypes.StringDType())
    chunk_loci = next(
        (var.chunksizes["locus"][0] for var in ds.data_vars.values() if var.chunks is not None and "locus" in var.dims),
        ds.sizes.get("locus", 1),
    )
    encoding = encoding_for(ds, chunk_loci, derived=True)
    blocked = blockable_variables(ds, chunk_loci)
    template = metadata_template(ds, blocked) if blocked else ds
    writes = template.to_zarr(path, group=staging, mode="w-", compute=False, consolidated=False, encoding=encoding,
                              storage_options=storage_options)  # fmt: skip
    if blocked:  # the arrays exist now; one task per locus block computes and writes them (not xarray's writes)
        writes = block_writes(ds, blocked, path, staging, storage_options)
    _compute_writes(writes)
    if fingerprint is not None:
        zarr.open_group(path, path=staging, mode="r+", storage_options=storage_options).attrs[STAGE_ATTR] = fingerprint


def _compute_writes(writes: Any) -> None:
    """Compute a group's delayed chunk writes; if one fails, return (raise) only once no other is still running.

    Dask returns on the first failed task while tasks already running elsewhere
    go on writing their chunks: the staging copy could only be removed after them.
    """
    scheduler = dask.base.get_scheduler(collections=[writes])
    client = getattr(scheduler, "__self__", None)
    if isinstance(client, Client):
        future = client.compute(writes)
        try:
            progress.wait(future)  # a bar inside progress.shown
        except BaseException:
            client.cancel(future)
            wait_until_stopped(client, list(writes.__dask_graph__().keys()))
            raise
    elif scheduler is dask.threaded.get:
        pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or os.cpu_count() or 1)
        try:
            dask.compute(writes, scheduler="threads", pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:  # the synchronous scheduler, or processes: nothing runs on after a failure
        dask.compute(writes)


def wait_until_stopped(client: Client, keys: list[Any], timeout: float = 120.0) -> None:
    """Wait until no worker still runs one of ``keys`` (cancelled tasks finish the chunk they are writing).

    A cancelled task that is already executing keeps running on its worker and
    may still write its chunk; removing what it writes into before that would
    leave part of it behind.
    """
    wanted = set(keys)
    active = {"executing", "long-running", "cancelled", "resumed"}

    def running(dask_worker) -> int:
        return sum(1 for key, ts in dask_worker.state.tasks.items() if key in wanted and ts.state in active)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = sum(client.run(running).values())
        except (OSError, TimeoutError):  # the cluster itself is going away
            return
        if not busy:
            return
        time.sleep(0.2)
    log.warning("tasks of the failed write still running after %.0f s", timeout)


def stage_fingerprint(path: str, group: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The fingerprint :func:`write_group` recorded for ``group`` (``None`` if the group or the record is absent or damaged)."""
    try:
        attrs = zarr.open_group(path, path=group, mode="r", storage_options=storage_options).attrs
    except (OSError, KeyError, ValueError):  # absent (FileNotFoundError, GroupNotFoundError), damaged zarr.json
        return None
    return attrs.get(STAGE_ATTR)


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def open_group(path: str, group: str, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open one group of a run store lazily, its attributes decoded (:func:`deepmr_dist.io.attrs.decode_attrs`).

    Dask chunks run along ``locus`` only, as the store's chunks (or shards) do: an array
    sharded along ``task`` (:func:`encoding_for`) is one dask chunk per shard, not one per
    inner chunk as plain ``xr.open_zarr`` makes them (``chunks={"task": -1}`` does the same there).
    Each chunk's task holds the array it reads (``inline_array=True``, which ``open_zarr`` does
    not take, hence ``open_dataset``): with one shared
    ``original-…`` key that every read depends on, the scheduler ran a whole MR stage on the one
    worker that held it (the other stayed at its start-up memory).

    Raises
    ------
    StoreError
        If the group is absent or its metadata is unreadable.
    """
    try:
        return _decoded(xr.open_dataset(path, engine="zarr", group=group, chunks={"task": -1}, inline_array=True,
                                        backend_kwargs={"consolidated": False, "storage_options": storage_options}))
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"group {group!r} of {path} cannot be opened ({one_line(exc)}); rerun the stage that writes it") from None


def open_run(path: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, xr.Dataset]:
    """Open every group of a run store as a lazy (dask-backed) Dataset.

    Staging copies of groups being written (see :func:`write_group`) are not
    groups of the run and are never returned. Reading a lazily opened ISM
    array does not check that its chunks exist (Zarr reads a missing chunk
    as the fill value): :func:`deepmr_dist.io.verify.verify_ism` does.

    Returns
    -------
    dict
        ``{"ism": Dataset, "effects": Dataset, ...}`` for the groups present, their attributes
        decoded (:func:`open_group`); plain ``xr.open_zarr`` shows them as stored, NetCDF-safe.

    Raises
    ------
    StoreError
        If ``path`` holds no run store, its ``ism`` group is damaged, or a group's metadata is unreadable.
    """
    check_run_store(path, storage_options)
    fs, root = filesystem(path, storage_options)
    present = [group for group in schema.GROUPS if fs.exists(f"{root}/{group}/zarr.json")]
    return {group: open_group(path, group, storage_options) for group in present}
