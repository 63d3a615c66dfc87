"""Dask clusters: create or connect, GPU pinning, and the per-worker model cache.

``connect("local")`` starts an embedded cluster: dask-cuda's
``LocalCUDACluster`` (one worker per GPU, each pinned through
``CUDA_VISIBLE_DEVICES`` and declaring the resource ``GPU=1``) when GPUs and
dask-cuda are present, else a ``LocalCluster`` of single-threaded worker
processes. Any other value is the address of a running scheduler. ISM tasks
request ``GPU=1`` exactly when the cluster's workers declare it, so a CPU-only
cluster runs the same code path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
import torch
from distributed import Client, LocalCluster

GPU_RESOURCE = "GPU"

log = logging.getLogger(__name__)


def _local_cluster(n_workers: int | None, threads_per_worker: int, memory_limit: str | float | None) -> Any:
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in workers, which halves torch's CPU speed
    # (measured with benchmarks/bench_simulation.py); the nanny reads this when it is created.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        if not torch.cuda.is_available():
            workers = n_workers or max(1, min(4, os.cpu_count() or 1))
            return LocalCluster(
                n_workers=workers, threads_per_worker=threads_per_worker, processes=True, memory_limit=memory_limit
            )
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            log.warning("GPUs found but dask-cuda is not installed; using one GPU worker")
            return LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, resources={GPU_RESOURCE: 1}, memory_limit=memory_limit
            )
        return LocalCUDACluster(threads_per_worker=1, resources={GPU_RESOURCE: 1}, memory_limit=memory_limit)


@contextmanager
def connect(
    address: str = "local",
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    verbose: bool = True,
) -> Iterator[Client]:
    """A Dask client for the duration of a ``with`` block.

    Parameters
    ----------
    address
        ``"local"`` for an embedded cluster, or a scheduler address such as ``tcp://127.0.0.1:8786``.
    n_workers, threads_per_worker, memory_limit
        Settings of the embedded CPU cluster (ignored for an existing scheduler; GPU clusters get one worker per GPU).
    verbose
        Log the dashboard address at INFO (at DEBUG when False).
    """
    if address == "local":
        cluster = _local_cluster(n_workers, threads_per_worker, memory_limit)
        client = Client(cluster)
        log.debug("embedded %s of %d worker(s)", type(cluster).__name__, len(cluster.workers))
    else:
        cluster = None
        client = Client(address, timeout="30s")
        log.debug("connected to the scheduler at %s", address)
    log.log(logging.INFO if verbose else logging.DEBUG, "Dask dashboard at %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def gpu_resources_declared(client: Client) -> bool:
    """Whether any worker of the cluster declares the ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(GPU_RESOURCE in w.get("resources", {}) for w in workers.values())


def task_resources(client: Client) -> dict[str, float] | None:
    """Resources an ISM task requests on this cluster."""
    return {GPU_RESOURCE: 1} if gpu_resources_declared(client) else None


def worker_device() -> torch.device:
    """The device of this worker: its (pinned) GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ModelCache:
    """Per-process cache of loaded ensembles, keyed by model fingerprint.

    Each worker process loads a model once and reuses it for every chunk; a
    small LRU bound keeps a worker that sees several models from holding all.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        """The cached value for ``key``, loading it with ``load()`` on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self.loads += 1
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return value


MODEL_CACHE = ModelCache()
