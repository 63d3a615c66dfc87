"""The run store: a Zarr (v3) store with one group per stage.

Layout (see DESIGN.md): ``ism`` holds ``sequence``, ``ref_pred``,
``mut_pred`` and ``complete``; ``effects`` holds ``effect`` and
``effect_se``; later stages add ``mr`` and ``meta``. Every array is chunked
along ``locus`` only. The ``ism`` group is created as a template first
(metadata, coordinates and sequences), then filled by one chunk-aligned
region write per locus chunk, ``complete`` written last, so a crashed write
is recomputed on resume.

A store's root group carries the :data:`STORE_ATTR` marker. Nothing is ever
removed or overwritten that a call did not create, unless the call was asked
to overwrite and the target is recognisably a deepmr store; a group of a store
is replaced only by the stage that writes it. :func:`inspect_target` says what
lies at a path and :func:`check_overwritable` applies that rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dask.array as da
import fsspec
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from deepmr_dist import schema
from deepmr_dist.errors import StoreError

FINGERPRINT_ATTR = "deepmr_fingerprint"
STORE_ATTR = "deepmr_store"
"""Attribute of a store's root group that marks it as a deepmr run store; its value is the layout version."""
STORE_LAYOUT = 1


def compressors() -> list[BloscCodec]:
    """Blosc/Zstd with byte shuffle, the codec of every array in a run store."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)]


def encoding_for(ds: xr.Dataset, chunk_loci: int) -> dict[str, dict[str, Any]]:
    """Zarr encoding: Blosc/Zstd and chunks along ``locus`` only, for every data variable of ``ds``."""
    enc = {}
    for name, arr in ds.data_vars.items():
        chunks = tuple(min(chunk_loci, n) if d == "locus" else n for d, n in zip(arr.dims, arr.shape))
        enc[name] = {"compressors": compressors(), "chunks": chunks}
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
    ds["complete"] = (("locus",), da.zeros(n_loci, dtype=bool, chunks=lc))
    for name in ("sequence", "ref_pred", "mut_pred", "complete"):
        ds[name].attrs["description"] = schema.VARIABLES[name].description
    return schema.validate(ds, schema.ISM)


@dataclass(frozen=True)
class Target:
    """What lies at a store path before a call writes there (see :func:`inspect_target`).

    Attributes
    ----------
    path : str
        The path or fsspec URL, as given.
    kind : {"absent", "empty", "store", "other"}
        Nothing; an empty directory; a recognisable deepmr store (a root group
        with the :data:`STORE_ATTR` marker, or an ``ism`` group with a run
        fingerprint); anything else.
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
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(root):
        return Target(path, "absent")
    if not fs.isdir(root):
        return Target(path, "other", f"{path} exists and is not a deepmr store (it is a file)")
    if not fs.ls(root, detail=False):
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
) -> None:
    """Write an empty run store where nothing is (see :func:`prepare_new_store`); nothing is ever replaced.

    Raises
    ------
    StoreError
        If the store cannot be written there (e.g. a missing parent folder).
    """
    ds = template.copy()
    ds.attrs = {**json.loads(json.dumps(dict(attrs), default=str)), FINGERPRINT_ATTR: fingerprint}
    try:
        _create_root(path, storage_options)
        ds.to_zarr(
            path,
            group=schema.ISM,
            mode="w-",
            compute=False,
            consolidated=False,
            encoding=encoding_for(ds, chunk_loci),
            storage_options=storage_options,
        )
    except OSError as exc:
        raise StoreError(f"cannot write a run store at {path}: {exc}") from None


def _create_root(path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write the marked root group of a new store where there is none (a missing or empty directory)."""
    zarr.open_group(path, mode="w-", attributes={STORE_ATTR: STORE_LAYOUT}, storage_options=storage_options)


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
    emptied (it existed before the store was written into it).
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(root):
        return
    if keep_root:
        for child in fs.ls(root, detail=False):
            fs.rm(child, recursive=True)
    else:
        fs.rm(root, recursive=True)


STAGE_ATTR = "deepmr_stage_fingerprint"
"""Attribute of a group written by a pipeline stage: the fingerprint of what it was computed from."""


def write_group(
    path: str,
    ds: xr.Dataset,
    group: str,
    *,
    fingerprint: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Write ``ds`` (lazy or in memory) as group ``group`` of the store, replacing it; return it opened lazily.

    Every data variable is compressed with :func:`compressors` and chunked
    along ``locus`` as ``ds`` is (its first chunk along ``locus`` when dask-backed,
    else the whole axis), and nothing else. Dask-backed variables are
    written block by block. Fixed-width unicode variables and coordinates are
    written as variable-length strings, the string type Zarr v3 specifies
    (fixed-width UTF-32 has no v3 specification yet), through NumPy's
    ``StringDType``: unlike ``object`` it needs no pass over lazy data to infer
    the type.

    ``fingerprint`` (a stage's, see :func:`stage_fingerprint`) is recorded in
    the group's attributes only once every chunk is written, so a group whose
    write was interrupted never looks finished.

    Where ``path`` holds nothing (or is an empty directory), a new store is
    created with it.

    Raises
    ------
    StoreError
        If ``path`` holds something other than a deepmr store (see :func:`check_overwritable`).
    """
    target = inspect_target(path, storage_options)
    check_overwritable(target, overwrite=False, stage_group=group)
    if target.kind != "store":
        _create_root(path, storage_options)
    ds = ds.copy()
    ds.attrs.pop(STAGE_ATTR, None)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(np.dtypes.StringDType())
    chunk_loci = next(
        (var.chunksizes["locus"][0] for var in ds.data_vars.values() if var.chunks is not None and "locus" in var.dims),
        ds.sizes.get("locus", 1),
    )
    encoding = encoding_for(ds, chunk_loci)
    ds.to_zarr(path, group=group, mode="w", consolidated=False, encoding=encoding, storage_options=storage_options)
    if fingerprint is not None:
        zarr.open_group(path, path=group, mode="r+", storage_options=storage_options).attrs[STAGE_ATTR] = fingerprint
    return xr.open_zarr(path, group=group, consolidated=False, storage_options=storage_options)


def stage_fingerprint(path: str, group: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The fingerprint :func:`write_group` recorded for ``group`` (``None`` if the group or the record is absent)."""
    try:
        attrs = zarr.open_group(path, path=group, mode="r", storage_options=storage_options).attrs
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    return attrs.get(STAGE_ATTR)


def write_ism_chunk(
    path: str,
    start: int,
    ref_pred: np.ndarray,
    mut_pred: np.ndarray,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write one locus chunk's predictions, then mark its loci complete.

    Raises
    ------
    StoreError
        If the range is not aligned to the store's locus chunks (two writers could share a chunk).
    """
    group = zarr.open_group(path, path=schema.ISM, mode="r+", storage_options=storage_options)
    stop = start + ref_pred.shape[0]
    n_loci, chunk = group["complete"].shape[0], group["complete"].chunks[0]
    if start % chunk or (stop % chunk and stop != n_loci):
        raise StoreError(f"region {start}:{stop} of {path} is not aligned to its {chunk}-locus chunks")
    group["ref_pred"][start:stop] = ref_pred
    group["mut_pred"][start:stop] = mut_pred
    group["complete"][start:stop] = True


def open_run(path: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, xr.Dataset]:
    """Open every group of a run store as a lazy (dask-backed) Dataset.

    Returns
    -------
    dict
        ``{"ism": Dataset, "effects": Dataset, ...}`` for the groups present.

    Raises
    ------
    StoreError
        If ``path`` holds no run store, or its ``ism`` group is damaged.
    """
    target = inspect_target(path, storage_options)
    if target.kind != "store" or target.problem:
        raise StoreError(target.problem or f"{path} is not a deepmr run store (no {schema.ISM!r} group)")
    root = zarr.open_group(path, mode="r", storage_options=storage_options)
    present = set(root.group_keys())
    return {
        group: xr.open_zarr(path, group=group, consolidated=False, storage_options=storage_options)
        for group in schema.GROUPS
        if group in present
    }
