"""Write a lazy Dataset one locus block per Dask task: compute every variable's chunk of the block, then write them.

xarray's ``to_zarr`` writes each variable's chunk in a task of its own, after
separate tasks that read its inputs and, through ``xr.map_blocks``, split and
reassemble each block per variable: about 8 tasks per effects chunk and 46 per
MR block. At 1-2 ms of scheduling per task on a small machine, that was more
than the arithmetic (``benchmarks/README.md``, ``bench_scale.py``). Here the
graph of each locus block (its reads, kernels and conversions) runs inside
the one task that writes the block's chunks of every variable, so a block is
read, computed and written by one task and nothing of it travels between
workers.

Keys that several blocks need (a small array every block reads, a global
statistic) stay tasks of their own, computed once and handed to each block
task as a dependency, never copied into every block's graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from dask._task_spec import DataNode, GraphNode, List, Task, TaskRef, convert_legacy_graph, execute_graph
from dask.array.optimization import optimize as optimize_array_graph
from dask.highlevelgraph import HighLevelGraph
from dask.delayed import Delayed

__all__ = ["block_loci", "blockable_variables", "block_writes", "metadata_template"]

_WRITABLE_KINDS = frozenset("fiuUT")
"""dtype kinds written as they are: xarray's Zarr encoding leaves floats, ints and strings unchanged."""


def block_loci(chunk_loci: int, chunk_bytes: int, target_bytes: int) -> int:
    """Loci per block of a stage's task: the most whole stored chunks (``chunk_loci`` loci, ``chunk_bytes``
    each) within ``target_bytes``, and never less than one chunk."""
    return chunk_loci * max(1, target_bytes // max(chunk_bytes, 1))


def blockable_variables(ds: xr.Dataset, chunk_loci: int) -> list[str] | None:
    """Names of the dask-backed variables of ``ds`` to write block by block, or ``None`` if any cannot be.

    Every dask-backed variable (data or coordinate) must have a ``locus`` dim
    chunked like the others, in chunks of ``chunk_loci`` (the last may be
    shorter, so each block is whole stored chunks and no two tasks write one),
    one chunk along every other dim, and a dtype xarray's Zarr encoding
    leaves unchanged (float, int, str). ``None`` sends the whole Dataset
    through ``to_zarr``; an empty list means nothing is dask-backed.
    """
    names, locus_chunks = [], None
    for name, var in ds.variables.items():
        if var.chunks is None:
            continue
        if "locus" not in var.dims or var.dtype.kind not in _WRITABLE_KINDS:
            return None
        chunks = dict(zip(var.dims, var.chunks))
        if any(len(c) != 1 for dim, c in chunks.items() if dim != "locus"):
            return None
        if locus_chunks is None:
            locus_chunks = chunks["locus"]
        if chunks["locus"] != locus_chunks or any(c != chunk_loci for c in locus_chunks[:-1]):
            return None
        names.append(str(name))
    return names


def metadata_template(ds: xr.Dataset, names: list[str]) -> xr.Dataset:
    """``ds`` with the data of ``names`` replaced by one never-computed chunk each, to create their arrays.

    ``to_zarr(compute=False)`` of it writes every array's metadata (and the in-memory variables)
    as for ``ds`` itself, stored in the real data's chunks (each placeholder's ``encoding``), without building and optimising
    the write graph of the real data, which :func:`block_writes` builds (that was 1.1 s of the
    MR stage at 180,000 loci).
    """
    import dask.array as da

    empty = {}
    for name in names:
        arr = ds[name]
        empty[name] = arr.copy(data=da.empty(arr.shape, chunks=arr.shape, dtype=arr.dtype))
        # the stored chunks stay the real data's (coordinates get no chunks from the encoding argument)
        empty[name].encoding = {**arr.encoding, "chunks": tuple(sizes[0] for sizes in arr.chunks)}
    coords = {name: arr for name, arr in empty.items() if name in ds.coords}  # they stay coordinates
    return ds.assign({name: arr for name, arr in empty.items() if name not in coords}).assign_coords(coords)


@dataclass(frozen=True)
class _Block:
    """One locus block: its own part of the graph, the keys it reads from other tasks, and where its chunks go."""

    graph: dict[Any, GraphNode]
    shared: tuple[Any, ...]
    outputs: tuple[tuple[str, Any, tuple[slice, ...]], ...]  # (variable, key, region)


def _compute_and_write(block: _Block, shared: list[Any], path: str, group: str, storage_options: Mapping[str, Any] | None) -> int:
    """Run ``block``'s graph, given the values of its shared keys, and write each variable's chunk into ``group``."""
    graph = dict(block.graph)
    graph.update({key: DataNode(key, value) for key, value in zip(block.shared, shared)})
    values = execute_graph(graph, keys={key for _, key, _ in block.outputs})
    target = zarr.open_group(path, path=group, mode="r+", storage_options=dict(storage_options or {}) or None)
    for name, key, region in block.outputs:
        value = np.asarray(values[key])
        if value.dtype.kind == "U":
            value = value.astype(np.dtypes.StringDType())
        target[name][region] = value
    return len(block.outputs)


def _done(*counts: int) -> int:
    """Chunks written by all block tasks (the one key a caller computes)."""
    return sum(counts)


def block_writes(
    ds: xr.Dataset, names: list[str], path: str, group: str, storage_options: Mapping[str, Any] | None = None
) -> Delayed:
    """One task per locus block that computes ``names``' chunks of it and writes them into ``path``'s ``group``.

    The group's arrays must exist already (``to_zarr(compute=False)`` of
    :func:`metadata_template` makes them). Returns a Delayed of the number of chunks written.
    """
    arrays = [ds[name].data for name in names]
    output_keys = [key for arr in arrays for key in dask.core.flatten(arr.__dask_keys__())]
    merged = HighLevelGraph.merge(*(arr.__dask_graph__() for arr in arrays))
    graph = convert_legacy_graph(dict(optimize_array_graph(merged, output_keys)))  # once for all: reads cut to their slices
    n_blocks = len(ds[names[0]].chunksizes["locus"])
    block_outputs: list[list[tuple[str, Any, tuple[slice, ...]]]] = [[] for _ in range(n_blocks)]
    for name, arr in zip(names, arrays):
        dims = ds[name].dims
        axis = dims.index("locus")
        start = 0
        for i, size in enumerate(arr.chunks[axis]):
            index = tuple(i if d == axis else 0 for d in range(arr.ndim))
            region = tuple(slice(start, start + size) if d == axis else slice(None) for d in range(arr.ndim))
            block_outputs[i].append((name, (arr.name, *index), region))
            start += size
    needs = [_needed(graph, [key for _, key, _ in outputs]) for outputs in block_outputs]
    users: dict[Any, int] = {}
    for keys in needs:
        for key in keys:
            users[key] = users.get(key, 0) + 1
    shared = {key for key, count in users.items() if count > 1}
    final: dict[Any, GraphNode] = {key: graph[key] for key in shared}  # their dependencies are shared too
    token = dask.base.tokenize(*[arr.name for arr in arrays], path, group)
    block_keys = []
    for i, (outputs, keys) in enumerate(zip(block_outputs, needs)):
        own = {key: graph[key] for key in keys if key not in shared}
        wanted = {dep for key in own for dep in own[key].dependencies} | {key for _, key, _ in outputs}
        reads = tuple(sorted(wanted & shared, key=str))
        block = _Block(own, reads, tuple(outputs))
        key = (f"write-block-{token}", i)
        final[key] = Task(key, _compute_and_write, DataNode(None, block), List(*(TaskRef(k) for k in reads)),
                          path, group, DataNode(None, storage_options))  # fmt: skip
        block_keys.append(key)
    done = f"write-blocks-{token}"
    final[done] = Task(done, _done, *(TaskRef(k) for k in block_keys))
    return Delayed(done, final)


def _needed(graph: Mapping[Any, GraphNode], keys: Any) -> set[Any]:
    """Every key of ``graph`` that ``keys`` depend on, themselves included."""
    seen: set[Any] = set()
    todo = list(keys)
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        todo.extend(dep for dep in graph[key].dependencies if dep not in seen)
    return seen
