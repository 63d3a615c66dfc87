"""The Zarr write of ISM chunk k overlaps the compute of chunk k+1 (``stages/predict._run_chunks``).

Real parts: a real Dask scheduler and worker (in this process, so that the
filesystem and the model hooks below are the ones it runs; one worker declaring
``GPU=1``, as a GPU worker does, with 2 threads or 1), the example ensemble with
a forward hook that records the time of every forward pass, and a Zarr store on
local disk reached through a registered fsspec filesystem that records when each
chunk object is read or written and can make writes slow or fail. Every time is
``time.monotonic()`` of this process.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from fsspec.implementations.local import LocalFileSystem

from conftest import EXAMPLE_FASTA, assert_close_ism, assert_same_ism
from deepmr_dist.cli import main
from deepmr_dist.io import store
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.models.examples import simulation_ensemble
from deepmr_dist.stages.predict import ISMSettings, predict, predict_in_memory

PROTOCOL = "deepmroverlap"
MODEL = f"{__name__}:recorded_ensemble"
ENSEMBLE = ModelSpec((MODEL,))
SETTINGS = ISMSettings(chunk_loci=8, mutant_batch=128, incremental=False)  # 6 chunks of the 48 example loci
CHUNKS = range(6)
WRITE_DELAY = 0.25
"""Seconds each ``mut_pred`` chunk takes to write: a slow filesystem."""

CHUNK_OBJECT = re.compile(r"/ism/(sequence|ref_pred|mut_pred|chunk_digest|chunk_nbytes|complete)/c/(\d+)(/|$)")
FORWARDS: list[float] = []
"""When each forward pass of a member of :func:`recorded_ensemble` ended."""


def recorded_ensemble() -> list[torch.nn.Module]:
    """The example ensemble, each member recording the time of its forward passes in :data:`FORWARDS`."""
    members = simulation_ensemble()
    for member in members:
        member.register_forward_hook(lambda module, args, output: FORWARDS.append(time.monotonic()))
    return members


@dataclass(frozen=True)
class Access:
    """One chunk object read or written: which, when, and by the write of which thread."""

    array: str
    chunk: int
    write: bool
    start: float
    stop: float


class RecordingFileSystem(LocalFileSystem):
    """The local filesystem under ``deepmroverlap://``, recording the ISM chunk objects read and written.

    ``mut_pred`` chunks take :attr:`delay` seconds to write; a write of a chunk in
    :attr:`failing` raises ``OSError``.
    """

    protocol = (PROTOCOL,)
    accesses: list[Access] = []
    delay = 0.0
    failing: frozenset[tuple[str, int]] = frozenset()
    lock = threading.Lock()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "auto_mkdir": True})

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len(PROTOCOL) + 3 :] if path.startswith(f"{PROTOCOL}://") else path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _record(self, path: str, write: bool, start: float) -> None:
        match = CHUNK_OBJECT.search(self._strip_protocol(path))
        if match:
            with self.lock:
                self.accesses.append(Access(match[1], int(match[2]), write, start, time.monotonic()))

    def pipe_file(self, path, value, mode="overwrite", **kwargs) -> None:
        start = time.monotonic()
        match = CHUNK_OBJECT.search(self._strip_protocol(path))
        if match and (match[1], int(match[2])) in self.failing:
            raise OSError(f"injected failure writing {match[1]} chunk {match[2]}")
        if match and match[1] == "mut_pred":
            time.sleep(self.delay)
        super().pipe_file(path, value, mode=mode, **kwargs)
        self._record(path, True, start)

    def cat_file(self, path, start=None, end=None, **kwargs):
        began = time.monotonic()
        data = super().cat_file(path, start, end, **kwargs)
        self._record(path, False, began)
        return data


def reset(delay: float = 0.0) -> None:
    RecordingFileSystem.accesses, RecordingFileSystem.delay, RecordingFileSystem.failing = [], delay, frozenset()
    FORWARDS.clear()


@pytest.fixture(scope="module", autouse=True)
def recording_filesystem() -> Iterator[None]:
    """The filesystem registered, and one torch thread in this process (its worker threads included), as a
    Dask worker process has (``OMP_NUM_THREADS=1``)."""
    fsspec.register_implementation(PROTOCOL, RecordingFileSystem, clobber=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset()


@contextmanager
def gpu_like_worker(threads: int) -> Iterator[Client]:
    """One in-process worker declaring ``GPU=1`` with ``threads`` threads, and a client of it."""
    with LocalCluster(
        n_workers=1, threads_per_worker=threads, processes=False, resources={"GPU": 1}, protocol="tcp",
        host="127.0.0.1", dashboard_address=None,
    ) as cluster, Client(cluster, set_as_default=False) as client:  # fmt: skip
        yield client


def url(path: Path) -> str:
    return f"{PROTOCOL}://{path}"


@dataclass
class Run:
    """A predict run: its store, the chunk objects read and written, and the end times of the forward passes."""

    path: Path
    accesses: list[Access]
    forwards: list[float]

    def first(self, array: str, chunk: int, write: bool) -> Access:
        return next(a for a in self.accesses if (a.array, a.chunk, a.write) == (array, chunk, write))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, example_loci) -> dict[int, Run]:
    """The 48 example loci predicted through the slow filesystem by a 2-thread and a 1-thread worker."""
    out = {}
    for threads in (2, 1):
        path = tmp_path_factory.mktemp(f"threads{threads}") / "run.zarr"
        with gpu_like_worker(threads) as client:
            reset(WRITE_DELAY)
            predict(example_loci, ENSEMBLE, url(path), client=client, settings=SETTINGS, progress=False)
            out[threads] = Run(path, list(RecordingFileSystem.accesses), list(FORWARDS))
    reset()
    return out


def test_overlap__two_threads_run_forward_passes_while_chunk_k_is_written_and_one_thread_does_not(runs):
    during = {}
    for threads, run in runs.items():
        writes = [run.first("mut_pred", k, True) for k in CHUNKS]
        assert all(w.stop - w.start >= WRITE_DELAY for w in writes), threads
        # a forward pass ending inside the write of chunk k belongs to a later chunk: chunk k was computed before
        during[threads] = [sum(w.start < t < w.stop for t in run.forwards) for w in writes]
        # writes keep up: no more than 3 chunks are ever computing or computed and unwritten
        started = [run.first("sequence", k, False).start for k in CHUNKS]
        done = [run.first("complete", k, True).stop for k in CHUNKS]
        in_flight = [sum(started[k] <= t < done[k] for k in CHUNKS) for t in started]
        assert max(in_flight) <= 3, (threads, in_flight)
    # 2 threads: the model runs during the writes of some chunks (how many depends on how fast this machine computes a
    # chunk against the 0.25 s write: 2 or more of 6 here), but not during the last one's: the chunks run in submission
    # order (with Dask's default fifo_timeout of 100 ms they tie in priority and run in no particular order)
    assert sum(n > 0 for n in during[2]) >= 1 and during[2][-1] == 0, during
    # 1 thread: the same tasks strictly one after another
    assert during[1] == [0] * len(CHUNKS), during


def test_overlap__each_chunk_is_marked_complete_only_after_its_data_and_record_are_written(runs):
    for threads, run in runs.items():
        for k in CHUNKS:
            written = {a.array: a for a in run.accesses if a.chunk == k and a.write and a.array != "sequence"}
            assert set(written) == {"ref_pred", "mut_pred", "chunk_digest", "chunk_nbytes", "complete"}, (threads, k)
            data = max(written[name].stop for name in ("ref_pred", "mut_pred", "chunk_digest", "chunk_nbytes"))
            assert written["complete"].start >= data, (threads, k)


def test_overlap__store_equals_the_one_thread_run_bit_for_bit_and_the_in_process_engine(runs, example_loci):
    overlapped = store.open_run(url(runs[2].path))["ism"].load()
    assert overlapped["complete"].values.all()
    assert_same_ism(overlapped, store.open_run(url(runs[1].path))["ism"].load())
    assert_close_ism(overlapped, predict_in_memory(example_loci, ENSEMBLE, SETTINGS))


def test_overlap__a_failing_write_is_one_line_its_chunk_stays_incomplete_and_the_others_intact(tmp_path, capsys, runs):
    base = runs[2].path
    path = tmp_path / "run.zarr"
    shutil.copytree(base, path)
    zarr.open_array(str(path), path="ism/complete", mode="r+")[8:48] = False  # chunks 1-5 to recompute
    args = ["predict", "--quiet", "--model", MODEL, "--fasta", str(EXAMPLE_FASTA), "--store", url(path),
            "--chunk-loci", "8", "--mutant-batch", "128", "--full-recompute"]  # fmt: skip
    with gpu_like_worker(2) as client:
        reset(WRITE_DELAY)
        RecordingFileSystem.failing = frozenset({("mut_pred", 2)})
        code = main([*args, "--cluster", client.scheduler.address])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("deepmr predict: error: ")]
        assert lines == [
            f"deepmr predict: error: writing loci 16-23 into {url(path)} failed on a worker: "
            "OSError: injected failure writing mut_pred chunk 2"
        ], err
        assert not any(a.write and (a.array, a.chunk) == ("complete", 2) for a in RecordingFileSystem.accesses)
        expected = store.open_run(url(base))["ism"].load()
        after = store.open_run(url(path))["ism"].load()
        complete = after["complete"].values
        assert complete[:8].all() and not complete[16:24].any()
        done = np.flatnonzero(complete)  # chunk 0, and those whose writes ended before the failure stopped the run
        for name in ("ref_pred", "mut_pred"):
            np.testing.assert_array_equal(after[name].values[done], expected[name].values[done], err_msg=name)
        # the same command completes the store once the filesystem writes again
        reset()
        assert main([*args, "--cluster", client.scheduler.address]) == 0
    assert_same_ism(store.open_run(url(path))["ism"].load(), expected)
