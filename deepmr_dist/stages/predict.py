"""Stage 1: distributed saturation mutagenesis into the run store.

The client validates inputs and the model, writes the store's template, then
submits two Dask tasks per incomplete locus chunk. The compute task runs on a
worker (requesting ``GPU=1`` on GPU clusters), loads the ensemble once per
worker through :data:`deepmr_dist.cluster.MODEL_CACHE` and predicts its chunk
on the device; the write task that depends on it writes the chunk with one
chunk-aligned region write, ``complete`` last, while the worker computes the
next chunk (see :func:`_run_chunks`). Rerunning on the same store computes only
the chunks that are not complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from distributed import Client, as_completed

from deepmr_dist import __version__, schema
from deepmr_dist.io import store
from deepmr_dist.io.location import check_reachable, normalize
from deepmr_dist.io.lock import DEFAULT_LOCK_TIMEOUT, lock
from deepmr_dist.io.verify import mark_incomplete, verify_ism
from deepmr_dist.cluster import MODEL_CACHE, task_resources, worker_device
from deepmr_dist.errors import DeepMRError, ModelOutputError, StoreError
from deepmr_dist.ism.device import to_host
from deepmr_dist.ism.engine import make_ensemble_runners, saturation_mutagenesis
from deepmr_dist.ism.precision import check_precision
from deepmr_dist.models.ensemble import ModelSpec, fingerprint, load_members, member_names
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.io.sequence import N_CODE, codes_to_onehot


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ISMSettings:
    """How predictions are made; part of the store's fingerprint.

    Parameters
    ----------
    head
        Reads task predictions from the model output.
    chunk_loci
        Loci per store chunk and per Dask task.
    mutant_batch
        Mutants per forward pass on the device (default 2,048, as ``deepmr predict`` and the YAML);
        ``None`` or ``"auto"`` (stored as ``None``): sized on each worker from its GPU's free memory
        (:func:`deepmr_dist.ism.device.auto_mutant_batch`), and
        :data:`~deepmr_dist.ism.device.DEFAULT_MUTANT_BATCH` (2,048) on a CPU. Batch shapes change
        float32 round-off, so with ``auto`` a store resumed on a GPU with other free memory can differ
        from an undisturbed run by round-off; a number keeps resumes bit-identical.
    incremental
        Recompute only the positions a mutation touches where the model allows it (exact either way).
    precision
        ``fp32`` (default), ``tf32``, ``bf16`` or ``fp16`` (:mod:`deepmr_dist.ism.precision`; the
        last three change predictions by more than float32 round-off; ``tf32`` and ``fp16`` need CUDA).
    compile
        Run the networks computed in full (``incremental=False``, or members the incremental engine
        cannot analyse) through ``torch.compile`` on each worker (compiled once per worker and batch
        shape; the same predictions to float32 round-off). Off by default: on the CPU it was slower
        for the simulation CNN, and compiling takes tens of seconds (benchmarks/README.md).
    """

    head: OutputHead = OutputHead()
    chunk_loci: int = 16
    mutant_batch: int | Literal["auto"] | None = 2048
    incremental: bool = True
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.chunk_loci < 1:
            raise DeepMRError(f"chunk size must be >= 1 locus, got {self.chunk_loci}")
        if self.mutant_batch == "auto":
            object.__setattr__(self, "mutant_batch", None)
        if self.mutant_batch is not None and (not isinstance(self.mutant_batch, int) or self.mutant_batch < 1):
            raise DeepMRError(f"mutant batch must be >= 1, got {self.mutant_batch}")


@dataclass(frozen=True)
class PredictReport:
    """What a ``predict`` call did."""

    store: str
    n_loci: int
    n_chunks: int
    chunks_computed: int
    mutant_predictions: int
    seconds: float

    @classmethod
    def of(cls, ism: xr.Dataset) -> PredictReport:
        """The report :func:`predict` left in the attrs of the ``ism`` Dataset it returned."""
        return cls(**ism.attrs["predict_report"])

    @property
    def rate(self) -> float:
        """Mutant predictions per second of wall time."""
        return self.mutant_predictions / self.seconds if self.seconds > 0 else float("nan")


def _ensemble(spec: ModelSpec, model_fp: str, length: int, settings: ISMSettings) -> list[Any]:
    device = worker_device()

    def load() -> list[Any]:
        return _runners(load_members(spec, device), length, settings)

    key = (model_fp, str(device), length, settings.incremental, settings.head.output_index, settings.compile)
    return MODEL_CACHE.get(key, load)


def _runners(members: list[Any], length: int, settings: ISMSettings) -> list[Any]:
    """The ensemble's runners for sequences of ``length`` under ``settings`` (incremental, head, compile)."""
    return make_ensemble_runners(members, length, incremental=settings.incremental, head=settings.head, compile=settings.compile)


def check_predictions(
    ref_pred: np.ndarray, mut_pred: np.ndarray, codes: np.ndarray, locus_ids: np.ndarray
) -> None:
    """Raise :class:`ModelOutputError` naming the first locus with a non-finite prediction.

    ``mut_pred`` is NaN by design at each position's reference allele; every other entry must be finite.
    """
    identity = np.zeros(mut_pred.shape[0:1] + mut_pred.shape[2:4], dtype=bool)
    rows, cols = np.nonzero(codes != N_CODE)
    identity[rows, cols, codes[rows, cols]] = True
    bad_mut = ~np.isfinite(mut_pred) & ~identity[:, None, :, :, None]
    bad = ~np.isfinite(ref_pred).all(axis=(1, 2)) | bad_mut.any(axis=(1, 2, 3, 4))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ModelOutputError(
            f"the model predicted NaN or inf for locus {locus_ids[i]!r} ({int(bad.sum())} locus/loci affected)"
        )


Predictions = tuple[np.ndarray, np.ndarray]
"""A chunk's ``ref_pred`` (locus, member, task) and ``mut_pred`` (locus, member, position, allele, task) on the host."""


def predict_chunk(
    path: str,
    start: int,
    stop: int,
    spec: ModelSpec,
    model_fp: str,
    settings: ISMSettings,
    storage_options: Mapping[str, Any] | None = None,
) -> Predictions | DeepMRError:
    """Dask task: predict loci ``start:stop`` of the store at ``path``; :func:`write_chunk` writes them.

    The predictions accumulate on the worker's device and come to the host in
    one copy per array (:func:`deepmr_dist.ism.device.to_host`: pinned memory
    from a GPU). Returns them, or the :class:`DeepMRError` that stopped the
    chunk (bad model output, unreadable store): such errors are deterministic,
    so they come back as values for the client to raise instead of being
    retried by Dask. Torch uses the worker's thread setting (Dask workers start
    with ``OMP_NUM_THREADS=1``).
    """
    try:
        codes = store.read_sequences(path, start, stop, storage_options)
        runners = _ensemble(spec, model_fp, codes.shape[1], settings)
        x = codes_to_onehot(torch.from_numpy(codes).to(worker_device()))
        ref, mut = saturation_mutagenesis(
            runners, settings.head, x, mutant_batch=settings.mutant_batch, precision=settings.precision
        )
        ref_np, mut_np = to_host(ref), to_host(mut)
        check_predictions(ref_np, mut_np, codes, store.read_locus_ids(path, start, stop, storage_options))
    except DeepMRError as err:
        return err
    return ref_np, mut_np


def write_chunk(
    predicted: Predictions | DeepMRError,
    path: str,
    start: int,
    storage_options: Mapping[str, Any] | None = None,
    run_fp: str | None = None,
) -> int | DeepMRError:
    """Dask task: write the chunk :func:`predict_chunk` returned, its record, then its ``complete`` flags.

    Returns the number of loci written, or the :class:`DeepMRError` that
    stopped the chunk: the one :func:`predict_chunk` returned, or the store's
    (a store replaced by another run than ``run_fp``, a misaligned region).
    An ``OSError`` of the filesystem is raised, for Dask to retry once.
    """
    if isinstance(predicted, DeepMRError):
        return predicted
    ref_np, mut_np = predicted
    try:
        store.write_ism_chunk(path, start, ref_np, mut_np, storage_options, fingerprint=run_fp)
    except DeepMRError as err:
        return err
    return ref_np.shape[0]


def predict_in_memory(loci: xr.Dataset, spec: ModelSpec, settings: ISMSettings = ISMSettings()) -> xr.Dataset:
    """The ``ism`` group for ``loci`` computed in this process, without a cluster or a store."""
    members = load_members(spec, worker_device())
    runners = _runners(members, loci.sizes["position"], settings)
    codes = loci["sequence"].values
    x = codes_to_onehot(torch.from_numpy(codes).to(worker_device()))
    ref, mut = saturation_mutagenesis(
        runners, settings.head, x, mutant_batch=settings.mutant_batch, precision=settings.precision
    )
    ref_np, mut_np = to_host(ref), to_host(mut)
    check_predictions(ref_np, mut_np, codes, loci.locus.values)
    tasks = settings.head.names(_n_outputs(members[0], settings.head, loci, worker_device()))
    template = store.ism_template(loci, member_names(spec, len(members)), tasks, settings.chunk_loci)
    return template.assign(
        ref_pred=(template.ref_pred.dims, ref_np),
        mut_pred=(template.mut_pred.dims, mut_np),
        complete=(("locus",), np.ones(loci.sizes["locus"], dtype=bool)),
    )


def _n_outputs(member: torch.nn.Module, head: OutputHead, loci: xr.Dataset, device: torch.device | str) -> int:
    """Number of model outputs before task selection, from one reference forward pass on ``device``."""
    x = codes_to_onehot(torch.from_numpy(loci["sequence"].values[:1]).to(device))
    with torch.inference_mode():
        raw = member(x)
    all_tasks = OutputHead(head.output_index, head.profile_axis, None, "none")(raw, 1)
    return int(all_tasks.shape[1])


def validate_model(members: list[torch.nn.Module], spec: ModelSpec, head: OutputHead, loci: xr.Dataset) -> list[str]:
    """Run each member (on the CPU) on the first locus through the head; return the task names.

    Raises
    ------
    ModelOutputError
        Naming the model and member whose output does not fit the head or is not finite.
    """
    x = codes_to_onehot(torch.from_numpy(loci["sequence"].values[:1]))
    model = ", ".join(spec.sources)
    with torch.inference_mode():
        for i, member in enumerate(members):
            try:
                pred = head(member(x), 1)
            except ModelOutputError as exc:
                raise ModelOutputError(f"model {model}, member {i}: {exc}") from None
            if not torch.isfinite(pred).all():
                raise ModelOutputError(
                    f"model {model}, member {i} predicted NaN or inf for locus {loci.locus.values[0]!r}"
                )
    return head.names(_n_outputs(members[0], head, loci, "cpu"))


def run_fingerprint(model_fp: str, loci: xr.Dataset, settings: ISMSettings) -> str:
    """SHA-256 over the model, the sequences with their ids, and the ISM settings."""
    digest = hashlib.sha256(model_fp.encode())
    digest.update(np.ascontiguousarray(loci["sequence"].values).tobytes())
    digest.update("\n".join(map(str, loci.locus.values)).encode())
    recorded = asdict(settings)
    if not settings.compile:  # stores made before the option existed keep their fingerprint
        del recorded["compile"]
    digest.update(json.dumps(recorded, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def predict(
    loci: xr.Dataset,
    spec: ModelSpec,
    path: str,
    *,
    client: Client,
    settings: ISMSettings = ISMSettings(),
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> xr.Dataset:
    """Predict every locus and mutant into the run store at ``path`` on the cluster of ``client``.

    The call holds the store's lease (:func:`deepmr_dist.io.lock.lock`) from
    before it creates or resumes the store until every chunk is written. On
    resume it first verifies the chunks marked complete (listing and sizes,
    :func:`deepmr_dist.io.verify.verify_ism`) and recomputes the damaged ones with
    the incomplete ones.

    Parameters
    ----------
    loci
        Sequences (see :mod:`deepmr_dist.io.sequence`).
    spec
        The ensemble.
    path
        Store location (a directory or an fsspec URL).
    client
        Dask client of the cluster that runs the ISM tasks.
    settings
        Head, chunking and batching.
    overwrite
        Replace a deepmr store made by another model, other inputs or other
        settings, or one whose ``ism`` group is damaged (otherwise refused).
        Anything at ``path`` that is not a deepmr store is refused even with it;
        an empty directory is used as it is.
    progress
        Show a progress bar on stderr.
    break_lock, lock_timeout
        Break a lease whose heartbeat is older than ``lock_timeout`` seconds
        (a writer on another machine that died); a lease of a process of this
        machine that is gone is broken anyway.

    Returns
    -------
    xarray.Dataset
        The store's ``ism`` group, opened lazily; ``attrs["predict_report"]``
        holds what the call did (:class:`PredictReport` as a dict: loci and
        chunks, chunks computed, mutant predictions, seconds).

    Raises
    ------
    StoreError
        If ``path`` holds something :func:`deepmr_dist.io.store.prepare_new_store`
        refuses to replace (checked before the model is loaded, except for a store
        of a different run), another writer holds its lease, its sequences are
        damaged, or chunks are still incomplete when every task has returned.
    ModelOutputError
        If the model's output does not fit the head or is not finite, or the
        model raised on a worker.

    A store this call created is removed on any error (an interrupt keeps it, to be resumed).
    """
    t0 = time.perf_counter()
    path, storage_options = normalize(path, storage_options)
    target = store.inspect_target(path, storage_options)
    store.check_overwritable(target, overwrite=overwrite)
    check_reachable(path, storage_options, client)
    members = load_members(spec, "cpu")  # validated on the CPU and freed: the GPUs are the workers'
    tasks = validate_model(members, spec, settings.head, loci)
    model_fp = fingerprint(members, spec)
    n_members = len(members)
    del members
    run_fp = run_fingerprint(model_fp, loci, settings)
    with lock(path, "deepmr predict", timeout=lock_timeout, break_stale=break_lock, storage_options=storage_options):
        target = store.inspect_target(path, storage_options)  # again: another writer may have changed it meanwhile
        store.check_overwritable(target, overwrite=overwrite)
        created = target.fingerprint != run_fp
        # refusals come before the try: what they refuse to touch is never cleaned up
        keep_root = store.prepare_new_store(target, overwrite=overwrite, storage_options=storage_options) if created else False
        if created:
            try:
                template = store.ism_template(loci, member_names(spec, n_members), tasks, settings.chunk_loci)
                indices = list(settings.head.tasks) if settings.head.tasks is not None else list(range(len(tasks)))
                store.create_store(
                    path, template, fingerprint=run_fp,
                    attrs={**_provenance(spec, model_fp, settings), store.TASK_INDICES_ATTR: indices},
                    chunk_loci=settings.chunk_loci, storage_options=storage_options,
                )  # fmt: skip
            except BaseException:  # an interrupt too: a half-created store holds nothing to resume
                store.remove_store(path, storage_options, keep_root=keep_root)
                raise
        try:
            if not created:
                _hand_back_damaged_chunks(path, storage_options)
            todo = store.incomplete_chunks(path, storage_options)
            n_loci, chunk = store.ism_chunking(path, storage_options)
            _run_chunks(client, todo, path, spec, run_fp, model_fp, settings, storage_options, progress)
            if todo and not created:  # a resume wrote chunks: its command joins the store's history
                store.record_command(path, storage_options)
        except Exception:
            if created:
                store.remove_store(path, storage_options, keep_root=keep_root)
            raise
        missing = store.incomplete_chunks(path, storage_options)
    if missing:
        raise StoreError(
            f"{path}: {len(missing)} chunk(s) are still incomplete after the run "
            f"(first loci {[a for a, _ in missing[:5]]}); rerun the same command to compute them"
        )
    n_todo_loci = sum(b - a for a, b in todo)
    length = loci.sizes["position"]
    report = PredictReport(
        store=path,
        n_loci=n_loci,
        n_chunks=len(store.chunk_bounds(n_loci, chunk)),
        chunks_computed=len(todo),
        mutant_predictions=n_todo_loci * n_members * 3 * length,
        seconds=time.perf_counter() - t0,
    )
    ism = store.open_run(path, storage_options=storage_options)[schema.ISM]
    ism.attrs["predict_report"] = asdict(report)
    return ism


def _hand_back_damaged_chunks(path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Mark the complete chunks that are missing or of another length than written incomplete, with a warning."""
    verification = verify_ism(path, storage_options=storage_options)
    if not verification.ok:
        loci = mark_incomplete(path, verification, storage_options)
        log.warning("%s; recomputing those %d loci", verification.summary(), loci)


def _provenance(spec: ModelSpec, model_fp: str, settings: ISMSettings) -> dict[str, Any]:
    """Attributes of a new store's ``ism`` group: versions, model and settings."""
    return {
        "deepmr_version": __version__,
        "torch_version": torch.__version__,
        "model_sources": list(spec.sources),
        "mc_dropout": spec.mc_dropout,
        "model_fingerprint": model_fp,
        "settings": asdict(settings),
    }


def _run_chunks(
    client: Client,
    chunks: list[tuple[int, int]],
    path: str,
    spec: ModelSpec,
    run_fp: str,
    model_fp: str,
    settings: ISMSettings,
    storage_options: Mapping[str, Any] | None,
    progress: bool,
) -> None:
    """Submit two tasks per chunk, compute then write, and wait for all; on failure stop every task before raising.

    The compute task (:func:`predict_chunk`, requesting ``GPU=1`` on GPU
    clusters) returns the chunk's predictions; the write task
    (:func:`write_chunk`, no resources) depends on it, so it runs on the worker
    that holds them (data locality; work stealing may move it) once they exist, and a chunk
    counts as done only when its write task has returned. A GPU worker with a
    second thread therefore writes chunk k while it computes chunk k+1 (the GPU
    resource keeps its compute tasks one at a time); a single-threaded worker
    runs the same tasks one after another. One write task per chunk, and the
    store's chunk-aligned regions, keep two tasks from ever writing one shard;
    :func:`deepmr_dist.io.store.write_ism_chunk` writes a chunk's ``complete``
    flags after its data and record, so an interrupted or failed write leaves
    the chunk incomplete, to be recomputed by a rerun. Each submission is its
    own generation (``fifo_timeout=0``), so the scheduler and the workers run
    tasks in submission order, compute k, write k, compute k+1, ...: a worker
    holds the predictions of a few chunks at most, written in order (with the
    default 100 ms, the submissions of one burst tie in priority and ran in no
    particular order).

    A task that raised on its worker (after its retry) is raised as one line naming its loci:
    :class:`StoreError` for a write, or a compute task's ``OSError`` (a full or read-only
    filesystem), else :class:`ModelOutputError` (the model raised); the cluster's own errors
    (a worker lost for good) are raised as they are.

    Task keys name the run and the store (``ism-<sha256(run, path)>-<call>-<first locus>``, and
    ``write-ism-...`` for the writes), so concurrent runs of one model into different stores, or a
    rerun after a failure, never share a key and never receive each other's results.
    """
    if not chunks:
        return
    from tqdm.auto import tqdm

    resources = task_resources(client)
    run_token = hashlib.sha256(f"{run_fp}\n{path}".encode()).hexdigest()[:12]
    call_token = uuid.uuid4().hex[:6]
    computes: dict[str, Any] = {}  # write key -> its compute future, held until the write returns
    writes = []
    for a, b in chunks:
        computed = client.submit(
            predict_chunk, path, a, b, spec, model_fp, settings, storage_options,
            key=f"ism-{run_token}-{call_token}-{a}", resources=resources, pure=False, fifo_timeout=0,
            retries=1,  # transient errors only: deterministic ones return as values
        )  # fmt: skip
        written = client.submit(
            write_chunk, computed, path, a, storage_options, run_fp,
            key=f"write-ism-{run_token}-{call_token}-{a}", pure=False, fifo_timeout=0, retries=1,
        )  # fmt: skip
        computes[written.key] = computed
        writes.append(written)
    keys = [f.key for f in computes.values()] + [f.key for f in writes]
    bounds = {future.key: chunk for future, chunk in zip(writes, chunks)}
    total = sum(b - a for a, b in chunks)
    with tqdm(total=total, unit="locus", desc="ISM", disable=not progress, file=sys.stderr) as bar:
        try:
            for future in as_completed(writes, loop=client.loop):
                computed = computes.pop(future.key)  # released: its predictions leave the worker's memory
                bar.update(_task_result(future, computed, *bounds[future.key], path, spec))
        except BaseException as stop:
            if isinstance(stop, KeyboardInterrupt):  # the user stopped the run: distributed's complaints about
                for name in ("distributed.scheduler", "distributed.client"):  # gathers it cancels are noise
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            client.cancel([*computes.values(), *writes])
            store.wait_until_stopped(client, keys)
            raise


def _task_result(written: Any, computed: Any, start: int, stop: int, path: str, spec: ModelSpec) -> int:
    """The loci a chunk's write task wrote, or the error that stopped the chunk, as one line (see :func:`_run_chunks`)."""
    try:
        result = written.result()
    except Exception as exc:
        if isinstance(exc, DeepMRError) or type(exc).__module__.startswith("distributed"):
            raise
        what = store.one_line(exc)
        if computed.status != "error":  # the prediction was made: its write raised
            raise StoreError(f"writing loci {start}-{stop - 1} into {path} failed on a worker: {what}") from exc
        error = StoreError if isinstance(exc, OSError) else ModelOutputError
        raise error(f"ISM of loci {start}-{stop - 1} failed on a worker (model {', '.join(spec.sources)}): {what}") from exc
    if isinstance(result, DeepMRError):
        raise result
    return result
