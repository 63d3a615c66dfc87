"""Dask clusters: create or connect, TLS, GPU pinning, and the per-worker model cache.

:func:`connect` yields a client of one of four kinds of cluster:

- ``"local"``: an embedded cluster bound to ``host`` (127.0.0.1 by default: scheduler, workers and
  dashboard), over TLS with :class:`TLSFiles`: on a machine with CUDA one worker process per GPU
  (each pinned through ``CUDA_VISIBLE_DEVICES`` and declaring the resource ``GPU=1``), else a
  ``LocalCluster`` of single-threaded worker processes;
- ``"slurm"``: dask-jobqueue's ``SLURMCluster`` of :class:`SlurmOptions` (one worker per job, the
  scheduler in this process), see :func:`make_slurm_cluster`;
- ``scheduler_file=``: the scheduler a site started with ``dask scheduler --scheduler-file``;
- any other address: a running scheduler (``tcp://HOST:PORT``, ``tls://HOST:PORT``).

:class:`TLSFiles` (a CA, a certificate and its key, as ``dask scheduler --tls-*`` takes them) give
the client a ``distributed.Security``; without them Dask's own config and environment apply.

Whether ISM tasks (and the pipeline's training tasks) request ``GPU=1`` (:func:`task_resources`) is
decided once, when the client is made (:func:`gpu_decision`): an explicit ``gpu=True/False``, else
the cluster's kind (an embedded cluster on a machine with CUDA, SLURM jobs with ``gpus_per_job``),
else, for an existing scheduler, whether its workers declare ``GPU`` once ``min_workers`` of them
have joined. Workers that join later cannot change it.

Bad settings fail before anything starts, in one line: a worker or thread count
below 1, more local workers than :data:`MAX_WORKERS_PER_CORE` per core, a
malformed address or an unknown protocol, TLS files that are missing or incomplete.
A scheduler that does not answer within ``connect_timeout`` seconds
(:data:`DEFAULT_CONNECT_TIMEOUT`) is named with its address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import torch
from distributed import Client, LocalCluster, Nanny, Scheduler, Security, SpecCluster
from distributed.worker_memory import parse_memory_limit

from deepmr_dist.errors import InputError

GPU_RESOURCE = "GPU"
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds :func:`connect` waits for an existing scheduler to answer."""
MAX_WORKERS_PER_CORE = 4
"""Local worker processes allowed per CPU core; more is taken for a typo (each worker is a process with its own model)."""

log = logging.getLogger(__name__)


IGNORE_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)"
"""Worker preload (distributed runs a preload holding a space as the text of a script) run by each embedded worker.

A terminal's Ctrl-C sends SIGINT to the whole process group; the embedded workers ignore it, so that only the
client stops (closing the cluster ends the workers), without a traceback from each worker process."""


DEFAULT_HOST = "127.0.0.1"
"""Interface the embedded cluster's scheduler, workers and dashboard bind to unless ``host`` says otherwise."""


@dataclass(frozen=True)
class TLSFiles:
    """A CA certificate, a certificate and its private key (PEM files), as ``dask scheduler --tls-*`` takes them."""

    ca_file: str
    cert: str
    key: str

    @classmethod
    def of(cls, ca_file: str | None, cert: str | None, key: str | None) -> TLSFiles | None:
        """The three files, or None when none is given.

        Raises
        ------
        InputError
            If only some are given, or one is not a file.
        """
        given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
        if not any(given.values()):
            return None
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise InputError(f"--tls-ca-file, --tls-cert and --tls-key go together; missing {', '.join(missing)}")
        for name, value in given.items():
            if not Path(value).is_file():
                raise InputError(f"{name} {value}: no such file")
        return cls(ca_file, cert, key)

    def security(self, *, cluster: bool = False) -> Security:
        """The client's ``Security`` (and, with ``cluster``, the scheduler's and the workers' too), encryption required."""
        roles = ("client", "scheduler", "worker") if cluster else ("client",)
        files = {}
        for role in roles:
            files[f"tls_{role}_cert"] = self.cert
            files[f"tls_{role}_key"] = self.key
        return Security(tls_ca_file=self.ca_file, require_encryption=True, **files)


@dataclass(frozen=True)
class SlurmOptions:
    """Dask workers as SLURM jobs (dask-jobqueue ``SLURMCluster``): one worker process per job.

    ``gpus_per_job`` > 0 asks each job for ``--gres=gpu:N`` and starts its worker with
    ``--resources GPU=N``; ``job_script_prologue`` lines (``module load``, ``source venv/bin/activate``)
    run before the worker; ``interface`` (e.g. ``ib0``, ``lo`` on one machine) is the network
    interface of the workers and of the scheduler, which runs in the calling process.
    """

    jobs: int = 1
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    memory: str = "8GB"
    cores: int = 1
    gpus_per_job: int = 0
    job_script_prologue: tuple[str, ...] = ()
    job_directives: tuple[str, ...] = ()
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None

    def __post_init__(self) -> None:
        for name in ("jobs", "cores"):
            if getattr(self, name) < 1:
                raise InputError(f"slurm {name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_job < 0:
            raise InputError(f"slurm gpus_per_job must be >= 0, got {self.gpus_per_job}")


def make_slurm_cluster(options: SlurmOptions, tls: TLSFiles | None = None) -> Any:
    """The ``SLURMCluster`` of ``options`` (its scheduler starts in this process; no job is submitted yet).

    Raises
    ------
    InputError
        If dask-jobqueue (the ``slurm`` extra) is not installed.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InputError("--cluster slurm needs dask-jobqueue: pip install 'deepmr-dist[slurm]'") from None
    gpus = options.gpus_per_job
    return SLURMCluster(
        queue=options.queue,
        account=options.account,
        walltime=options.walltime,
        cores=options.cores,
        processes=1,
        memory=options.memory,
        job_extra_directives=[*([f"--gres=gpu:{gpus}"] if gpus else []), *options.job_directives],
        worker_extra_args=["--resources", f"{GPU_RESOURCE}={gpus}"] if gpus else [],
        job_script_prologue=list(options.job_script_prologue),
        python=options.python,
        interface=options.interface,
        local_directory=options.local_directory,
        log_directory=options.log_directory,
        security=tls.security(cluster=True) if tls else None,
        protocol="tls://" if tls else None,
    )


EMBEDDED_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.scheduler.worker-saturation": float("inf"),
}
"""Dask settings of the embedded cluster, read when its scheduler and nannies are created.

- Dask's nannies set ``MALLOC_TRIM_THRESHOLD_=65536`` in workers, which also fixes glibc's mmap
  threshold at 128 KiB, so every larger numpy or torch buffer is mapped afresh and page-faulted:
  it halved torch's CPU speed (``benchmarks/bench_simulation.py``) and made MR blocks 43 % slower
  (8.45 s against 5.9 s for 20,000 loci in one process with and without it).
- ``worker-saturation: inf`` sends every ready task to the workers at once instead of queuing root
  tasks on the scheduler, a round trip per task: when xarray still wrote about 20 tasks per block (a
  read per chunk and variable, one per output variable), that round trip cost about 1.7 ms a task on
  2 cores (MR of 20,000 loci on 2 workers: 5.1 s against 6.6 s; effects 6.8 s against 7.8 s). Stages
  now write one task per block (:mod:`deepmr_dist.io.block_writes`), which holds its reads, so memory
  stays bounded by the blocks in flight (``tests/test_effects.py``: effects of 2.4x a 400 MiB worker).
"""


def _local_cluster(
    n_workers: int | None, threads_per_worker: int, memory_limit: str | float | None, host: str, tls: TLSFiles | None
) -> SpecCluster:
    security = tls.security(cluster=True) if tls else Security()  # without files: Dask's config, as LocalCluster's
    protocol = "tls://" if security.require_encryption else "tcp://"
    with dask.config.set(EMBEDDED_CLUSTER_CONFIG):
        if torch.cuda.is_available():
            return _gpu_cluster(torch.cuda.device_count(), memory_limit, host, protocol, security)
        return LocalCluster(
            n_workers=n_workers or max(1, min(4, os.cpu_count() or 1)), threads_per_worker=threads_per_worker,
            processes=True, preload=[IGNORE_SIGINT], host=host, dashboard_address=f"{host}:8787",
            memory_limit=memory_limit, protocol=protocol, security=security,
        )


GPU_WORKER_THREADS = 2
"""Threads of an embedded GPU worker: one computing (``GPU=1``), one writing the chunk computed before."""


def _gpu_cluster(
    n_gpus: int, memory_limit: str | float | None, host: str, protocol: str, security: Security
) -> SpecCluster:
    """One worker process per GPU, named ``gpu<i>``, pinned to its GPU (``CUDA_VISIBLE_DEVICES``: the
    i-th of this process's, e.g. a SLURM allocation's, else ``i``) and declaring ``GPU=1``, as
    ``deploy/local_gpus.sh`` starts them; ``memory_limit="auto"`` shares the memory among the workers.

    Each worker has :data:`GPU_WORKER_THREADS` threads: ISM tasks hold ``GPU=1``, so one computes at
    a time, while the second thread writes the previous chunk's predictions
    (:func:`deepmr_dist.stages.predict.write_chunk`), so a write overlaps the next chunk's compute."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = (visible or [str(i) for i in range(n_gpus)])[:n_gpus]
    memory = parse_memory_limit(memory_limit, 1, total_cores=n_gpus, logger=log)
    common = {"host": host, "protocol": protocol, "security": security}
    scheduler = {"cls": Scheduler, "options": {**common, "dashboard": True, "dashboard_address": f"{host}:8787"}}
    workers = {
        f"gpu{i}": {"cls": Nanny, "options": {
            **common, "nthreads": GPU_WORKER_THREADS, "memory_limit": memory, "resources": {GPU_RESOURCE: 1}, "preload": [IGNORE_SIGINT],
            "env": {"CUDA_VISIBLE_DEVICES": device}, "silence_logs": logging.WARN,
        }}
        for i, device in enumerate(devices)
    }
    return SpecCluster(workers=workers, scheduler=scheduler, security=security, silence_logs=logging.WARN)


def check_local_settings(n_workers: int | None, threads_per_worker: int) -> None:
    """Refuse worker and thread counts of the embedded cluster below 1, or above :data:`MAX_WORKERS_PER_CORE` per core.

    Raises
    ------
    InputError
        Naming the setting, its value and the allowed range.
    """
    cores = os.cpu_count() or 1
    most = MAX_WORKERS_PER_CORE * cores
    if n_workers is not None and not 1 <= n_workers <= most:
        raise InputError(
            f"--n-workers must be between 1 and {most} ({MAX_WORKERS_PER_CORE} worker processes per core, "
            f"{cores} core(s) here), got {n_workers}"
        )
    if threads_per_worker < 1:
        raise InputError(f"threads per worker must be >= 1, got {threads_per_worker}")


def _scheduler_client(
    address: str | None, connect_timeout: float, security: Security | None, scheduler_file: str | None = None
) -> Client:
    """A client of the scheduler at ``address`` (or named in ``scheduler_file``), or one line saying why there is none."""
    if connect_timeout <= 0:
        raise InputError(f"the connect timeout must be positive, got {connect_timeout:g} s")
    where = f"the scheduler file {scheduler_file}" if scheduler_file else address
    if scheduler_file and not Path(scheduler_file).is_file():
        raise InputError(f"--scheduler-file {scheduler_file}: no such file (is the scheduler started with it?)")
    scheduler_address = _scheduler_file_address(scheduler_file) if scheduler_file else address
    if str(scheduler_address).startswith("tls://") and not _has_client_tls(security):
        # Checked before a Client exists: one that fails in its constructor stays registered as the
        # default client and leaves dask's ``scheduler="dask.distributed"`` set with no client behind it.
        raise InputError(
            f"cannot connect to {where} without TLS certificates (a tls:// scheduler); "
            "give --tls-ca-file, --tls-cert and --tls-key"
        )
    try:
        if scheduler_file:
            return Client(scheduler_file=scheduler_file, timeout=connect_timeout, security=security)
        return Client(address, timeout=connect_timeout, security=security)
    except ValueError as exc:  # distributed's parse of the address: no port, unknown scheme, ...
        raise InputError(
            f"--cluster {address!r} is not a scheduler address: {exc} (expected 'local', 'slurm' or e.g. tcp://HOST:PORT)"
        ) from None
    except (OSError, asyncio.TimeoutError) as exc:  # distributed: OSError("Timed out trying to connect ...")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot reach a Dask scheduler at {where} (waited {connect_timeout:g} s): {reason}; is it running, "
            f"is the address right, and does it need (or refuse) TLS certificates?"
        ) from None


def _scheduler_file_address(scheduler_file: str) -> str | None:
    """The ``address`` a ``dask scheduler --scheduler-file`` wrote, or None where the file does not say."""
    try:
        return json.loads(Path(scheduler_file).read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        return None  # distributed reports an unreadable file itself


def _has_client_tls(security: Security | None) -> bool:
    """Whether ``security`` (or, without one, Dask's config and environment) gives the client a TLS context."""
    args = (security or Security()).get_connection_args("client")
    return args.get("ssl_context") is not None


_GPU_TASKS: weakref.WeakKeyDictionary[Client, bool] = weakref.WeakKeyDictionary()
"""Whether the GPU tasks (ISM, training) of a client made by :func:`connect` request ``GPU=1``, decided when it was made."""


def gpu_decision(gpu: bool | None, kind: str, client: Client, slurm: SlurmOptions | None = None) -> bool:
    """Whether ISM tasks request ``GPU=1``: ``gpu`` when given, else from the cluster's kind.

    ``kind`` is ``"local"`` (GPU workers exactly when this machine has CUDA), ``"slurm"``
    (``gpus_per_job`` > 0) or ``"scheduler"`` (an existing one: whether a worker connected now
    declares ``GPU``; :func:`connect` first waits for ``min_workers``).
    """
    if gpu is not None:
        return gpu
    if kind == "local":
        return torch.cuda.is_available()
    if kind == "slurm":
        return bool(slurm and slurm.gpus_per_job)
    declared = gpu_resources_declared(client)
    if not declared:
        log.info("no connected worker declares %s; ISM tasks run on any worker (--gpu makes them wait for GPU workers)",
                 GPU_RESOURCE)
    return declared


@contextmanager
def connect(
    address: str = "local",
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    verbose: bool = True,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    tls: TLSFiles | None = None,
    host: str = DEFAULT_HOST,
    gpu: bool | None = None,
    min_workers: int | None = None,
    wait_timeout: float | None = None,
    slurm: SlurmOptions | None = None,
    scheduler_file: str | None = None,
) -> Iterator[Client]:
    """A Dask client for the duration of a ``with`` block.

    Parameters
    ----------
    address
        ``"local"`` for an embedded cluster, ``"slurm"`` for SLURM jobs (``slurm``), or a scheduler
        address such as ``tcp://127.0.0.1:8786``; ignored with ``scheduler_file``.
    n_workers, threads_per_worker, memory_limit
        Settings of the embedded CPU cluster (ignored otherwise; GPU clusters get one worker
        per GPU), checked by :func:`check_local_settings`.
    verbose
        Log the dashboard address at INFO (at DEBUG when False).
    connect_timeout
        Seconds to wait for an existing scheduler to answer.
    tls
        Certificates of the client (and of the embedded or SLURM cluster); default Dask's config.
    host
        Interface of the embedded cluster's scheduler, workers and dashboard.
    gpu
        Whether ISM tasks request ``GPU=1``; default from the kind of cluster (:func:`gpu_decision`).
    min_workers, wait_timeout
        Workers to wait for (at most ``wait_timeout`` seconds; default as long as it takes) before the block
        starts; SLURM's default is ``slurm.jobs``.
    slurm
        The SLURM jobs of ``address="slurm"`` (default :class:`SlurmOptions`).
    scheduler_file
        JSON file a scheduler wrote (``dask scheduler --scheduler-file``).

    Raises
    ------
    InputError
        For bad local settings, a malformed address or unknown protocol, incomplete TLS files, ``gpu=True``
        on an embedded cluster without CUDA, or a scheduler that does not answer within ``connect_timeout``;
        before any cluster starts.
    """
    if min_workers is not None and min_workers < 1:
        raise InputError(f"--min-workers must be >= 1, got {min_workers}")
    cluster: Any = None
    if scheduler_file is None and address == "local":
        check_local_settings(n_workers, threads_per_worker)
        if gpu and not torch.cuda.is_available():
            raise InputError("--gpu: this machine has no CUDA GPU for the embedded cluster (use --cluster ADDRESS)")
        cluster = _local_cluster(n_workers, threads_per_worker, memory_limit, host, tls)
        client, kind = Client(cluster), "local"
        log.debug("embedded %s of %d worker(s), scheduler at %s", type(cluster).__name__, len(cluster.workers),
                  cluster.scheduler_address)
    elif scheduler_file is None and address == "slurm":
        slurm = slurm or SlurmOptions()
        cluster = make_slurm_cluster(slurm, tls)
        cluster.scale(jobs=slurm.jobs)
        client, kind = Client(cluster), "slurm"
        min_workers = slurm.jobs if min_workers is None else min_workers
        log.info("submitted %d SLURM job(s); scheduler at %s", slurm.jobs, cluster.scheduler_address)
    else:
        client = _scheduler_client(address, connect_timeout, tls.security() if tls else None, scheduler_file)
        kind = "scheduler"
        log.debug("connected to the scheduler at %s", client.scheduler.address)
    try:
        if min_workers:
            log.info("waiting for %d worker(s)", min_workers)
            try:
                client.wait_for_workers(min_workers, timeout=wait_timeout)
            except TimeoutError:
                raise InputError(f"fewer than {min_workers} worker(s) joined within {wait_timeout:g} s") from None
        _GPU_TASKS[client] = gpu_decision(gpu, kind, client, slurm)
        log.log(logging.INFO if verbose else logging.DEBUG, "Dask dashboard at %s", client.dashboard_link)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def gpu_resources_declared(client: Client) -> bool:
    """Whether any worker connected now declares the ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(GPU_RESOURCE in w.get("resources", {}) for w in workers.values())


def task_resources(client: Client) -> dict[str, float] | None:
    """Resources an ISM or training task requests: ``GPU=1`` as decided when :func:`connect` made ``client``.

    For a client made elsewhere, whether a worker connected now declares ``GPU``.
    """
    gpu = _GPU_TASKS.get(client)
    if gpu is None:
        gpu = gpu_resources_declared(client)
    return {GPU_RESOURCE: 1} if gpu else None


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
