"""Where a store lives: the fsspec filesystem behind a path or URL, its storage options, and who can reach it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec

from deepmr_dist.errors import StoreError


def filesystem(path: str, storage_options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path (no trailing slash) of a store path or URL.

    fsspec shares one instance per protocol and options, and object-store
    instances (s3fs, gcsfs) cache directory listings; the workers write the
    store from other processes, so every call starts from an empty listing
    cache: what a caller sees is what the store holds now.

    Raises
    ------
    StoreError
        For a protocol fsspec does not know, or one whose package is not installed.
    """
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except ValueError as exc:  # "Protocol not known: foo"
        raise StoreError(f"{path}: {exc} (a store is a directory or an fsspec URL such as s3://bucket/run.zarr)") from None
    except ImportError as exc:  # "Install s3fs to access S3"
        raise StoreError(f"{path}: {exc}") from None
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def is_local(path: str) -> bool:
    """Whether ``path`` is a local path or a ``file://`` URL."""
    protocol = fsspec.core.split_protocol(path)[0]
    return protocol in (None, "file", "local")


def normalize(path: str, storage_options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """``(path, storage_options)`` as every store call takes them: a ``file://`` URL becomes its local path.

    Zarr writes local paths through its own local store, which creates the
    folders it writes into (its fsspec store does not); storage options are
    for remote filesystems only and are dropped for a local path.
    """
    if is_local(path):
        return fsspec.core.strip_protocol(path) if "://" in path else path, None
    return path, dict(storage_options) if storage_options else None


def check_reachable(path: str, storage_options: Mapping[str, Any] | None, client: Any) -> None:
    """Refuse a process-local filesystem (``memory://``) when the workers of ``client`` are other processes.

    An in-process cluster (``LocalCluster(processes=False)``) shares the
    client's memory, so a ``memory://`` store works there.

    Raises
    ------
    StoreError
        One line naming the store and what to use instead.
    """
    from fsspec.implementations.memory import MemoryFileSystem

    fs, _ = filesystem(path, storage_options)
    if not isinstance(fs, MemoryFileSystem) or client is None:
        return
    pids = set(client.run(os.getpid).values())
    if pids - {os.getpid()}:
        raise StoreError(
            f"{path}: a memory:// store lives in one process, and this cluster's workers are other processes; "
            "use a directory, shared storage or an object store (s3://...), or an in-process cluster"
        )


def sibling(path: str) -> str:
    """The store's path or URL without its extension, on the same filesystem: ``s3://b/run.zarr`` -> ``s3://b/run``.

    A path without an extension gets ``-outputs`` appended.
    """
    head, _, name = path.rstrip("/").rpartition("/")
    stem, dot, _ = name.rpartition(".")
    name = stem if dot and stem else f"{name}-outputs"
    return f"{head}/{name}" if head else name
