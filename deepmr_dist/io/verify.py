"""Chunk verification of a store's ``ism`` group: :func:`verify_ism` finds damaged chunks, :func:`mark_incomplete` hands them back.

Each ISM chunk write records (:func:`deepmr_dist.io.store.write_ism_chunk`),
before ``complete``, a 64-bit BLAKE2b of every locus's predictions and the
byte length of the encoded chunks. :func:`verify_ism` finds chunks that are
missing, of another length than written (cheap: one listing per array) or
whose values no longer hash to the record (``full``). A missing chunk never
passes for data: Zarr would read it as the fill value, so whoever reads ISM
predictions verifies the listing first.

The unit checked is the stored object of a locus chunk: for arrays sharded
along ``task`` (:func:`deepmr_dist.io.store.encoding_for`), the shard, index
included, whose inner chunks no listing can see; ``full`` decodes them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import fsspec
import numpy as np
import zarr

from deepmr_dist import schema
from deepmr_dist.errors import StoreError
from deepmr_dist.io.location import filesystem
from deepmr_dist.io.store import (
    PREDICTIONS, RECORD, check_run_store, chunk_bounds, chunk_key, locus_digests, one_line, record_command,
)


@dataclass(frozen=True)
class DamagedChunk:
    """One ISM locus chunk that :func:`verify_ism` found damaged.

    Attributes
    ----------
    start, stop : int
        Its half-open locus range.
    first, last : str
        The ids of its first and last locus.
    problems : tuple of str
        What is wrong, one phrase each.
    repairable : bool
        Whether recomputing the chunk fixes it (False when its sequences are damaged).
    """

    start: int
    stop: int
    first: str
    last: str
    problems: tuple[str, ...]
    repairable: bool = True

    def describe(self) -> str:
        """``loci 16-31 ('locus016' to 'locus031'): <problems>``."""
        return f"loci {self.start}-{self.stop - 1} ({self.first!r} to {self.last!r}): {'; '.join(self.problems)}"


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_ism` found.

    Attributes
    ----------
    path : str
        The store.
    level : {"cheap", "full"}
        ``cheap``: every chunk of a complete locus range is present and, where
        recorded, as long as written (one listing per array). ``full``: also
        every such chunk decodes and hashes to its record.
    n_chunks, checked : int
        Locus chunks of the store, and those marked complete (the ones checked).
    recorded : bool
        Whether the store records checksums (layout 2); layout-1 stores are checked for presence only.
    damaged : tuple of DamagedChunk
        The chunks found damaged, in locus order.
    """

    path: str
    level: Literal["cheap", "full"]
    n_chunks: int
    checked: int
    recorded: bool
    damaged: tuple[DamagedChunk, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def damaged_loci(self) -> int:
        return sum(c.stop - c.start for c in self.damaged)

    def summary(self) -> str:
        """One line: what was checked and what was found (the first damaged chunk named)."""
        what = "listing and sizes" if self.level == "cheap" else "listing, sizes and checksums"
        if not self.recorded:
            what = "listing only: a store written before checksums were recorded"
        head = f"{self.path}: {self.checked} of {self.n_chunks} ISM chunk(s) complete, checked ({what})"
        if self.ok:
            return f"{head}: no damage found"
        more = f"; and {len(self.damaged) - 1} more chunk(s)" if len(self.damaged) > 1 else ""
        return f"{head}: {len(self.damaged)} damaged ({self.damaged_loci} loci): {self.damaged[0].describe()}{more}"

    def raise_if_damaged(self) -> None:
        """Raise :class:`StoreError` (one line: the damage and how to repair it) unless nothing is damaged."""
        if self.ok:
            return
        if not all(c.repairable for c in self.damaged):
            fix = "its sequences are damaged, which only replacing the store fixes (`deepmr predict --overwrite`)"
        else:
            fix = (f"run `deepmr verify --store {self.path} --repair`, then the same `deepmr predict` "
                   "(or `deepmr run`) recomputes exactly those chunks")  # fmt: skip
        raise StoreError(f"{self.summary()}; {fix}")


def _open_ism_array(group: zarr.Group, path: str, name: str) -> zarr.Array:
    try:
        return group[name]
    except KeyError:
        raise StoreError(f"{path}/{schema.ISM}/{name} is missing") from None
    except ValueError as exc:  # a damaged zarr.json (JSONDecodeError, metadata validation)
        raise StoreError(f"{path}/{schema.ISM}/{name}/zarr.json is damaged ({type(exc).__name__}: {exc})") from None


def _read_by_chunk(
    arr: zarr.Array, bounds: list[tuple[int, int]], problems: dict[int, list[tuple[str, bool]]], what: str
) -> np.ndarray:
    """``arr[:]``; where that fails, chunk by chunk, each unreadable chunk noted in ``problems`` and read as zeros."""
    try:
        return arr[:]
    except Exception:  # a codec error of one chunk: find which
        values = np.zeros(arr.shape, dtype=arr.dtype)
        for index, (a, b) in enumerate(bounds):
            try:
                values[a:b] = arr[a:b]
            except Exception as exc:
                problems[index].append((f"its {what} chunk is unreadable ({one_line(exc)})", True))
        return values



def _listing(fs: fsspec.AbstractFileSystem, prefix: str) -> dict[str, int]:
    """Key (relative to ``prefix``) -> size of every object under ``prefix``."""
    return {name[len(prefix) + 1 :]: int(info.get("size") or 0) for name, info in fs.find(prefix, detail=True).items()}


def _check_chunk_full(
    path: str, start: int, stop: int, digests: np.ndarray, storage_options: Mapping[str, Any] | None
) -> list[tuple[str, bool]]:
    """Problems of one complete chunk found by reading it: undecodable arrays, digests that differ from the record."""
    group = zarr.open_group(path, path=schema.ISM, mode="r", storage_options=storage_options)
    problems = []
    try:
        group["sequence"][start:stop]
    except Exception as exc:
        problems.append((f"its sequence chunk is unreadable ({one_line(exc)})", False))
    try:
        actual = locus_digests(group["ref_pred"][start:stop], group["mut_pred"][start:stop])
    except Exception as exc:
        return [*problems, (f"its predictions are unreadable ({one_line(exc)})", True)]
    if digests.size:
        bad = np.flatnonzero(actual != digests)
        if bad.size:
            problems.append((f"checksum mismatch at {bad.size} locus/loci (first: locus {start + int(bad[0])})", True))
    return problems


def verify_ism(
    path: str, *, full: bool = False, storage_options: Mapping[str, Any] | None = None
) -> Verification:
    """Check every ISM chunk marked complete against the store's listing and its record.

    Parameters
    ----------
    full
        Also read and decode every complete chunk and compare each locus's
        digest with the record (costs one read of ``mut_pred``; runs as one
        Dask task per chunk on the current scheduler). Otherwise one listing
        per array: presence and byte lengths.

    Returns
    -------
    Verification
        Nothing is written; :func:`mark_incomplete` hands damaged chunks back to ``predict``.

    Raises
    ------
    StoreError
        If ``path`` holds no usable run store, or an ``ism`` array's metadata is missing or damaged.
    """
    check_run_store(path, storage_options)
    fs, root = filesystem(path, storage_options)
    group = zarr.open_group(path, path=schema.ISM, mode="r", storage_options=storage_options)
    arrays = {name: _open_ism_array(group, path, name) for name in ("sequence", *PREDICTIONS, "complete", "locus")}
    recorded = all(name in group for name in RECORD)
    if recorded:
        arrays.update({name: _open_ism_array(group, path, name) for name in RECORD})
    n_loci, chunk = arrays["complete"].shape[0], arrays["complete"].chunks[0]
    bounds = chunk_bounds(n_loci, chunk)
    problems: dict[int, list[tuple[str, bool]]] = {index: [] for index in range(len(bounds))}
    complete = _read_by_chunk(arrays["complete"], bounds, problems, "completion (complete)")
    done = [index for index, (a, b) in enumerate(bounds) if complete[a:b].all()]
    checked = {"sequence": range(len(bounds)), **{name: done for name in (*PREDICTIONS, *(RECORD if recorded else ()))}}
    sizes: dict[str, dict[str, int]] = {}
    for name, indices in checked.items():
        sizes[name] = _listing(fs, f"{root}/{schema.ISM}/{name}")
        for index in indices:
            key = chunk_key(arrays[name], index)
            if key not in sizes[name]:
                role = "sequence" if name == "sequence" else "checksum record" if name in RECORD else name
                problems[index].append((f"its {role} chunk ({schema.ISM}/{name}/{key}) is missing", name != "sequence"))
    digests = np.zeros(n_loci, dtype=np.uint64)
    if recorded:
        digests = _read_by_chunk(arrays["chunk_digest"], bounds, problems, "checksum record (chunk_digest)")
        nbytes = _read_by_chunk(arrays["chunk_nbytes"], bounds, problems, "checksum record (chunk_nbytes)")
        for index in done:
            a, b = bounds[index]
            if problems[index]:
                continue
            if not (digests[a:b].all() and nbytes[a:b].all()):
                problems[index].append(("it is marked complete but no checksum was recorded", True))
                continue
            stored = sum(sizes[name][chunk_key(arrays[name], index)] for name in PREDICTIONS)
            if stored != int(nbytes[a]):
                problems[index].append(
                    (f"its ref_pred and mut_pred chunks hold {stored} bytes where {int(nbytes[a])} were written", True)
                )
    if full:
        todo = [index for index in done if not problems[index]]
        found = dask.compute(*[
            dask.delayed(_check_chunk_full, pure=False)(
                path, *bounds[index], digests[slice(*bounds[index])] if recorded else digests[:0], storage_options
            )
            for index in todo
        ])  # fmt: skip
        for index, extra in zip(todo, found):
            problems[index].extend(extra)
    ids = _read_by_chunk(arrays["locus"], bounds, problems, "locus id")
    damaged = tuple(
        DamagedChunk(a, b, str(ids[a]), str(ids[b - 1]), tuple(text for text, _ in problems[index]),
                     all(repairable for _, repairable in problems[index]))
        for index, (a, b) in enumerate(bounds)
        if problems[index]
    )  # fmt: skip
    return Verification(path, "full" if full else "cheap", len(bounds), len(done), recorded, damaged)


def mark_incomplete(path: str, verification: Verification, storage_options: Mapping[str, Any] | None = None) -> int:
    """Mark the damaged chunks of ``verification`` incomplete (``complete`` first, then their record); return their loci.

    The next ``predict`` of the same run recomputes exactly those chunks.
    Call it while holding the store's lease (:func:`deepmr_dist.io.lock.lock`).

    Raises
    ------
    StoreError
        If a damaged chunk is not repairable (its sequences are damaged); nothing is written then.
    """
    if not all(c.repairable for c in verification.damaged):
        verification.raise_if_damaged()
    group = zarr.open_group(path, path=schema.ISM, mode="r+", storage_options=storage_options)
    recorded = all(name in group for name in RECORD)
    for chunk in verification.damaged:
        group["complete"][chunk.start : chunk.stop] = False
        if recorded:
            for name in RECORD:
                group[name][chunk.start : chunk.stop] = 0
    if verification.damaged:
        record_command(path, storage_options)
    return verification.damaged_loci
