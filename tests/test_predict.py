"""Stage 1, distributed ISM into the run store: equality with the in-process engine,
worker loss, resume after a crash, refusal of foreign stores, and bad inputs.

Every test uses real parts: Dask worker processes, Zarr stores on disk, the
example ensemble. The reference for every store is ``predict_in_memory`` (the
same engine in this process, no cluster, no store), which runs other batch
shapes (all loci at once) and other torch thread counts than the single-threaded
workers, so it is matched within float32 round-off (``assert_close_ism``); a
store is compared bit for bit (``assert_same_ism``) only with a store of the same
chunking made by single-threaded workers (resume, worker loss).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, assert_close_ism, assert_same_ism, embedded_client
from deepmr_dist.io import store
from deepmr_dist.cli import main
from deepmr_dist.cluster import task_resources
from deepmr_dist.errors import ModelOutputError, StoreError
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.stages.predict import ISMSettings, PredictReport, predict, predict_in_memory
from deepmr_dist.io.sequence import encode, sequences_dataset
from helpers_packages import importable_package

ENSEMBLE = ModelSpec((EXAMPLE_ENSEMBLE,))
DROPOUT_CNN = "deepmr_dist.models.examples:simulation_cnn_with_dropout"
# The incremental engine is optional here; every store in this file is made by full recomputation.
FULL = ISMSettings(incremental=False)
# Stores compared bit for bit are made with the same settings and by single-threaded workers: float32
# convolutions and GEMMs on the CPU (oneDNN, MKL) round differently for other batch sizes, thread counts
# and CPU models, so anything else is compared with assert_close_ism.
CHUNK4 = ISMSettings(chunk_loci=4, incremental=False)
N_LOCI, LENGTH, N_MEMBERS = 48, 100, 3
CLI = [sys.executable, "-c", "import sys; from deepmr_dist.cli import main; sys.exit(main())"]
# Environment of every process a test starts: one BLAS/torch thread each (2 cores, 2 workers).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

BAD_MODELS = '''
import torch
from torch import nn


class WrongShape(nn.Module):
    """A profile (batch, 2, 7) where the default head expects (batch, tasks)."""

    def forward(self, x):
        return x[:, :2, :7] * 2.0


class NaNOnKmer(nn.Module):
    """Finite except for sequences with six C in a row: NaN there."""

    def forward(self, x):
        c_run = x[:, 1, :].unfold(1, 6, 1).sum(-1).amax(-1) >= 6
        out = torch.stack([x[:, 0, :].sum(-1), x[:, 3, :].sum(-1)], dim=1)
        return torch.where(c_run[:, None], torch.full_like(out, float("nan")), out)


def wrong_shape():
    return WrongShape()


def nan_on_kmer():
    return NaNOnKmer()


class Slow(nn.Module):
    """Fixed weights (no RNG) and 0.3 s per forward call: runs that last long enough to overlap."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 8).reshape(2, 4), requires_grad=False)

    def forward(self, x):
        import time

        time.sleep(0.3)
        return torch.einsum("bcl,tc->bt", x, self.weight)


def slow():
    return Slow()


class SlowUnlessCRun(nn.Module):
    """NaN at once for a batch holding six C in a row; otherwise 0.3 s per forward call."""

    def forward(self, x):
        import time

        c_run = x[:, 1, :].unfold(1, 6, 1).sum(-1).amax(-1) >= 6
        out = torch.stack([x[:, 0, :].sum(-1), x[:, 3, :].sum(-1)], dim=1)
        if bool(c_run.any()):
            return torch.where(c_run[:, None], torch.full_like(out, float("nan")), out)
        time.sleep(0.3)
        return out


def slow_unless_c_run():
    return SlowUnlessCRun()
'''


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """A package ``deepmr_test_bad_models`` importable here and in worker processes started later."""
    with importable_package(tmp_path_factory.mktemp("models"), "deepmr_test_bad_models", BAD_MODELS) as name:
        yield name


@pytest.fixture(scope="module")
def client(bad_models):
    """The embedded cluster, started after ``bad_models`` is importable by its workers."""
    with embedded_client() as c:
        yield c


@pytest.fixture(scope="module")
def reference(example_loci):
    """The ``ism`` group of the 48 example loci from the in-process engine."""
    return predict_in_memory(example_loci, ENSEMBLE, FULL)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, client, example_loci):
    """An uninterrupted ``predict`` of the example on the embedded cluster: (report, path)."""
    path = str(tmp_path_factory.mktemp("undisturbed") / "run.zarr")
    report = PredictReport.of(predict(example_loci, ENSEMBLE, path, client=client, settings=CHUNK4, progress=False))
    return report, path


def _complete_loci(path: Path | str) -> int:
    """Loci marked complete in a store that another process may be writing (0 if unreadable yet)."""
    try:
        return int(zarr.open_array(str(path), path="ism/complete", mode="r")[:].sum())
    except Exception:  # not created yet, or a chunk caught mid-write
        return 0


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n--- log ---\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.05)


def _live_group_members(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """Terminate one process this test started (by its pid), killing it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _nan_at_reference_alleles(ism: xr.Dataset) -> None:
    codes = ism["sequence"].values
    identity = np.arange(4)[None, None, :] == codes[:, :, None]  # (locus, position, allele)
    expected = np.broadcast_to(identity[:, None, :, :, None], ism["mut_pred"].shape)
    np.testing.assert_array_equal(np.isnan(ism["mut_pred"].values), expected)
    assert np.isfinite(ism["ref_pred"].values).all()


# ----------------------------------------------------------------------------- 1. local cluster


def test_predict__local_cluster_store_equals_in_memory_engine(client, example_loci, reference, undisturbed):
    report, path = undisturbed
    assert task_resources(client) is None  # CPU workers declare no GPU: tasks request nothing
    assert (report.n_loci, report.n_chunks, report.chunks_computed) == (N_LOCI, 12, 12)
    assert report.mutant_predictions == N_LOCI * N_MEMBERS * 3 * LENGTH
    assert reference.sizes == {"locus": N_LOCI, "member": N_MEMBERS, "position": LENGTH, "allele": 4, "task": 2}

    ism = xr.open_zarr(path, group="ism", consolidated=False)  # plain xarray, no project code
    assert ism["mut_pred"].data.chunksize == (4, N_MEMBERS, LENGTH, 4, 2)
    # chunks of 4 loci (1200 mutants a batch) on 1-thread workers against 48 loci at once (mutant
    # batches of 2048) in this process: other GEMM blockings, so equal to float32 round-off only
    assert_close_ism(ism, reference)
    _nan_at_reference_alleles(ism)
    _nan_at_reference_alleles(reference)

    again = PredictReport.of(predict(example_loci, ENSEMBLE, path, client=client, settings=CHUNK4, progress=False))
    assert (again.chunks_computed, again.mutant_predictions) == (0, 0)


def test_predict__partial_last_chunk_matches_in_memory_engine(tmp_path, client, example_loci, reference):
    loci = example_loci.isel(locus=slice(0, 10))  # chunks 0:4, 4:8 and the partial 8:10
    path = str(tmp_path / "run.zarr")
    report = PredictReport.of(predict(loci, ENSEMBLE, path, client=client, settings=CHUNK4, progress=False))
    assert (report.n_chunks, report.chunks_computed) == (3, 3)
    ism = store.open_run(path)["ism"]
    expected = reference.isel(locus=slice(0, 10))
    _nan_at_reference_alleles(ism)
    assert ism["complete"].values.all()
    # Chunks of 4 loci and the partial one of 2 go through other float32 kernels than 48 loci at once.
    assert_close_ism(ism, expected)


def test_predict__incremental_engine_matches_full_recompute(tmp_path, client, example_loci, reference):
    pytest.importorskip("deepmr_dist.ism.incremental")
    loci = example_loci.isel(locus=slice(0, 16))
    path = str(tmp_path / "run.zarr")
    settings = ISMSettings(chunk_loci=8, incremental=True)
    predict(loci, ENSEMBLE, path, client=client, settings=settings, progress=False)
    ism = store.open_run(path)["ism"]
    expected = reference.isel(locus=slice(0, 16))
    _nan_at_reference_alleles(ism)
    assert_close_ism(ism, expected)  # incremental (BatchNorm folded, windowed convolutions) against full
    # the same incremental engine in this process, all 16 loci in one batch against chunks of 8
    assert_close_ism(ism, predict_in_memory(loci, ENSEMBLE, settings))


# ----------------------------------------------------------------------------- 2. worker killed mid-run


@pytest.fixture
def gpu_cluster(tmp_path):
    """A scheduler and two ``--resources GPU=1`` workers started as separate processes.

    Workers run without a nanny: a worker killed with SIGKILL stays dead (a lost machine),
    so the run can only finish on the survivor. Yields (address, {name: Popen}, log dir).
    """
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV)
        out.close()
        procs.append(proc)
        return proc

    scheduler_file = tmp_path / "scheduler.json"
    try:
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)])

        def address_known() -> bool:
            try:
                return bool(json.loads(scheduler_file.read_text()).get("address"))
            except (OSError, ValueError):
                return False

        _wait(address_known, 60, "the scheduler", logs / "scheduler.log")
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        workers = {
            name: start(
                name,
                ["worker", address, "--name", name, "--nworkers", "1", "--nthreads", "1", "--resources", "GPU=1",
                 "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"],
            )
            for name in ("w0", "w1")
        }
        yield address, workers, logs
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_predict__worker_killed_mid_run_finishes_on_survivor_with_identical_store(tmp_path, gpu_cluster, undisturbed):
    address, workers, logs = gpu_cluster
    path = tmp_path / "run.zarr"
    n_chunks = N_LOCI // 4
    with Client(address, set_as_default=False, timeout="60s") as monitor:
        monitor.wait_for_workers(2, timeout=60)
        assert task_resources(monitor) == {"GPU": 1}
        name_of = {addr: w["name"] for addr, w in monitor.scheduler_info(n_workers=-1)["workers"].items()}

        log = logs / "predict.log"
        with open(log, "w") as out:
            run = subprocess.Popen(
                [*CLI, "predict", "--fasta", str(EXAMPLE_FASTA), "--model", EXAMPLE_ENSEMBLE, "--store", str(path),
                 "--cluster", address, "--chunk-loci", "4", "--full-recompute", "--quiet"],
                stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV,
            )
        try:
            restrictions: dict[str, dict] = {}
            victim = None
            done_at_kill = None
            deadline = time.monotonic() + 300
            while run.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                restrictions.update(
                    monitor.run_on_scheduler(
                        lambda dask_scheduler: {
                            str(k): dict(ts.resource_restrictions or {})
                            for k, ts in dask_scheduler.tasks.items()
                            if str(k).startswith("ism-")
                        }
                    )
                )
                done = _complete_loci(path)
                if victim is None and 0 < done < N_LOCI:
                    busy = [a for a, keys in monitor.processing().items() if any(str(k).startswith("ism-") for k in keys)]
                    if busy:  # mid-run, and this worker is executing a chunk right now
                        victim = name_of[busy[0]]
                        done_at_kill = done
                        os.kill(workers[victim].pid, signal.SIGKILL)
                time.sleep(0.05)
        finally:
            _stop(run)
        assert run.returncode == 0, log.read_text()[-4000:]
        assert victim is not None, "the run finished before a worker could be killed mid-run"
        assert workers[victim].wait(10) == -signal.SIGKILL
        survivor = ({"w0", "w1"} - {victim}).pop()
        assert workers[survivor].poll() is None
        remaining = monitor.scheduler_info(n_workers=-1)["workers"]
        assert [w["name"] for w in remaining.values()] == [survivor]

    assert 0 < done_at_kill < N_LOCI
    # Every ISM task asked for the GPU resource (and ran only because the workers declare it).
    assert restrictions and all(r == {"GPU": 1} for r in restrictions.values()), restrictions
    assert store.incomplete_chunks(str(path)) == []
    assert store.ism_chunking(str(path)) == (N_LOCI, 4)
    # Bit for bit: the same chunks of 4 loci computed by single-threaded workers (OMP_NUM_THREADS=1 in
    # CHILD_ENV; Dask's nanny sets it for the undisturbed run's workers) on this machine.
    assert_same_ism(store.open_run(str(path))["ism"], store.open_run(undisturbed[1])["ism"])
    assert f"computed {n_chunks} chunk(s)" in log.read_text()


# ----------------------------------------------------------------------------- 3. resume after a crash


def test_predict__resume_after_sigkill_computes_only_missing_chunks(tmp_path, client, example_loci, undisturbed):
    path = tmp_path / "run.zarr"
    log = tmp_path / "predict.log"
    n_chunks = N_LOCI // 4
    with open(log, "w") as out:
        run = subprocess.Popen(
            [*CLI, "predict", "--fasta", str(EXAMPLE_FASTA), "--model", EXAMPLE_ENSEMBLE, "--store", str(path),
             "--chunk-loci", "4", "--n-workers", "1", "--full-recompute", "--quiet"],
            stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, start_new_session=True,
        )
    try:
        def some_chunk_done() -> bool:
            assert run.poll() is None, f"deepmr predict ended before it was interrupted:\n{log.read_text()[-4000:]}"
            return _complete_loci(path) >= 4

        _wait(some_chunk_done, 300, "the first complete chunk", log)
        # Crash the whole run at once: the CLI and the worker processes of its embedded cluster.
        os.killpg(run.pid, signal.SIGKILL)
        assert run.wait(10) == -signal.SIGKILL
        _wait(lambda: not _live_group_members(run.pid), 30, "the killed run's processes to exit")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)

    todo = store.incomplete_chunks(str(path))
    assert 0 < len(todo) < n_chunks
    history = store.zarr.open_group(str(path), mode="r").attrs["history"].splitlines()
    # CHUNK4 is what the CLI run used (same fingerprint): the rerun resumes it.
    report = PredictReport.of(predict(example_loci, ENSEMBLE, str(path), client=client, settings=CHUNK4, progress=False))
    assert store.zarr.open_group(str(path), mode="r").attrs["history"].splitlines()[:-1] == history  # one line more
    assert report.n_chunks == n_chunks
    assert report.chunks_computed == len(todo)
    assert report.mutant_predictions == sum(b - a for a, b in todo) * N_MEMBERS * 3 * LENGTH
    assert store.incomplete_chunks(str(path)) == []
    # Bit for bit: resumed and undisturbed runs compute the same chunks of 4 loci on 1-thread workers.
    assert_same_ism(store.open_run(str(path))["ism"], store.open_run(undisturbed[1])["ism"])


def test_predict__concurrent_runs_of_one_model_into_two_stores_both_complete(tmp_path, client, example_loci, bad_models):
    spec = ModelSpec((f"{bad_models}:slow",))
    first, second = str(tmp_path / "first.zarr"), str(tmp_path / "second.zarr")
    outcome: dict[str, object] = {}

    def run_first() -> None:
        try:
            outcome["first"] = predict(example_loci, spec, first, client=client, settings=CHUNK4, progress=False)
        except BaseException as exc:  # reported by the main thread
            outcome["first"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        _wait(lambda: _complete_loci(first) >= 4 or not thread.is_alive(), 120, "the first run's first chunk")
        assert thread.is_alive(), "the first run ended before the second could start"
        report = PredictReport.of(predict(example_loci.isel(locus=slice(0, 24)), spec, second, client=client, settings=CHUNK4, progress=False))
    finally:
        thread.join(120)
    assert not isinstance(outcome["first"], BaseException), outcome["first"]
    assert report.chunks_computed == 6
    assert store.incomplete_chunks(first) == []
    assert store.incomplete_chunks(second) == []
    # Exact: chunk i of both stores is the same 4 loci through the same model on a 1-thread worker.
    np.testing.assert_array_equal(
        store.open_run(second)["ism"]["mut_pred"].values, store.open_run(first)["ism"]["mut_pred"].values[:24]
    )


def test_predict__chunk_failing_while_others_run_leaves_no_store(tmp_path, client, bad_models):
    """A chunk fails fast while another still computes: the store is gone and stays gone."""
    rng = np.random.default_rng(11)
    at_only = ["".join(rng.choice(list("AT"), 24)) for _ in range(3)]
    records = {"l0": at_only[0], "bad": "ATATATCCCCCCATATATATATAT", "l1": at_only[1], "l2": at_only[2]}
    loci = sequences_dataset(np.stack([encode(seq) for seq in records.values()]), list(records))
    path = tmp_path / "run.zarr"
    settings = ISMSettings(chunk_loci=1, mutant_batch=8, incremental=False)  # ~3 s per good chunk
    with pytest.raises(ModelOutputError, match="'bad'"):
        predict(loci, ModelSpec((f"{bad_models}:slow_unless_c_run",)), str(path), client=client,
                settings=settings, progress=False)
    assert not path.exists()
    time.sleep(4.0)  # longer than a good chunk: a task left running would have written by now
    assert not path.exists(), sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ----------------------------------------------------------------------------- 4. store of another run


def _snapshot(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_predict__store_of_another_model_is_refused_untouched_and_replaced_with_overwrite(tmp_path, client, example_loci):
    loci = example_loci.isel(locus=slice(0, 4))
    settings = ISMSettings(chunk_loci=4, incremental=False)
    two_masks = ModelSpec((DROPOUT_CNN,), mc_dropout=2)
    three_masks = ModelSpec((DROPOUT_CNN,), mc_dropout=3)
    path = str(tmp_path / "run.zarr")
    predict(loci, two_masks, path, client=client, settings=settings, progress=False)
    before = _snapshot(path)
    assert any(k.startswith("ism/mut_pred/") for k in before)

    others = [
        (three_masks, settings),
        (ModelSpec((DROPOUT_CNN,), mc_dropout=2, mc_seed=1), settings),
        (ENSEMBLE, settings),
        (two_masks, ISMSettings(chunk_loci=2, incremental=False)),
    ]
    for spec, other_settings in others:
        with pytest.raises(StoreError, match="--overwrite") as err:
            predict(loci, spec, path, client=client, settings=other_settings, progress=False)
        assert path in str(err.value)
        assert _snapshot(path) == before, spec

    report = PredictReport.of(predict(loci, three_masks, path, client=client, settings=settings, overwrite=True, progress=False))
    assert report.chunks_computed == 1
    ism = store.open_run(path)["ism"]
    assert ism["member"].values.tolist() == ["mask0", "mask1", "mask2"]
    assert ism.attrs["mc_dropout"] == 3
    # same 4-locus batch, but this process may run torch with more threads than the 1-thread worker
    assert_close_ism(ism, predict_in_memory(loci, three_masks, settings))


# ----------------------------------------------------------------------------- 5. bad inputs


def _write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))
    return path


def _cli_error(capsys, args: list[str]) -> str:
    """Run ``deepmr predict`` in this process; it must fail with exit code 2 and one error line."""
    capsys.readouterr()
    code = main(["predict", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("deepmr predict: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _bed_inputs(tmp_path: Path, bed_line: str) -> list[str]:
    rng = np.random.default_rng(3)
    genome = _write_fasta(tmp_path / "genome.fa", {"chr1": "".join(rng.choice(list("ACGT"), 200)), "chr2": "ACGT" * 60})
    bed = tmp_path / "regions.bed"
    bed.write_text(f"chr1\t50\t60\tok\n{bed_line}\n")
    return ["--bed", str(bed), "--genome", str(genome), "--width", "100", "--model", EXAMPLE_ENSEMBLE]


@pytest.mark.parametrize(
    "case",
    ["invalid_base", "unequal_lengths", "empty_fasta", "bed_past_chromosome_end", "bed_unknown_chromosome"],
)
def test_cli_predict__bad_sequences_are_one_line_errors_and_create_no_store(tmp_path, capsys, case):
    fasta = tmp_path / "loci.fa"
    if case == "invalid_base":
        _write_fasta(fasta, {"r0": "ACGTACGTAC", "r1": "ACGTXCGTAC"})
        args, expected = ["--fasta", str(fasta)], [str(fasta), "'r1'", "'X'", "position 5"]
    elif case == "unequal_lengths":
        _write_fasta(fasta, {"r0": "ACGTACGTAC", "r1": "ACGTACGTA"})
        args, expected = ["--fasta", str(fasta)], [str(fasta), "'r0'", "'r1'", "10 bp", "9 bp"]
    elif case == "empty_fasta":
        fasta.write_text("")
        args, expected = ["--fasta", str(fasta)], [str(fasta), "no records"]
    elif case == "bed_past_chromosome_end":
        args = _bed_inputs(tmp_path, "chr1\t180\t190\tlate")
        expected = [f"{tmp_path / 'regions.bed'}:2", "chr1:135-235", "past the end", "0-200"]
    else:
        args = _bed_inputs(tmp_path, "chrZ\t50\t60\tnowhere")
        expected = [f"{tmp_path / 'regions.bed'}:2", "'chrZ'", str(tmp_path / "genome.fa")]
    if "--model" not in args:
        args += ["--model", EXAMPLE_ENSEMBLE]
    run_store = tmp_path / "run.zarr"
    message = _cli_error(capsys, [*args, "--store", str(run_store)])
    for part in expected:
        assert part in message, message
    assert not run_store.exists()


def test_cli_predict__model_of_wrong_output_shape_is_one_line_error_and_creates_no_store(tmp_path, capsys, client, bad_models):
    run_store = tmp_path / "run.zarr"
    fasta = _write_fasta(tmp_path / "loci.fa", {"a": "ACGTACGTACGTACGT", "b": "TTTTACGTACGTAAAA"})
    message = _cli_error(
        capsys,
        ["--fasta", str(fasta), "--model", f"{bad_models}:wrong_shape", "--store", str(run_store),
         "--cluster", client.scheduler.address],
    )
    assert "(1, 2, 7)" in message and "profile axis" in message, message
    assert not run_store.exists()


def test_cli_predict__model_of_wrong_output_shape_error_names_the_model(tmp_path, capsys, client, bad_models):
    fasta = _write_fasta(tmp_path / "loci.fa", {"a": "ACGTACGTACGTACGT"})
    message = _cli_error(
        capsys,
        ["--fasta", str(fasta), "--model", f"{bad_models}:wrong_shape", "--store", str(tmp_path / "run.zarr"),
         "--cluster", client.scheduler.address],
    )
    assert f"{bad_models}:wrong_shape" in message, message


def test_cli_predict__nan_output_names_the_locus_and_leaves_no_store(tmp_path, capsys, client, bad_models):
    rng = np.random.default_rng(5)
    at_only = lambda: "".join(rng.choice(list("AT"), 24))  # no single mutation makes CCCCCC  # noqa: E731
    # "bad" is not the first locus, so the client-side check passes and a worker task finds it.
    records = {"l0": at_only(), "l1": at_only(), "l2": at_only(), "bad": "ATATATCCCCCCATATATATATAT"}
    fasta = _write_fasta(tmp_path / "loci.fa", records)
    run_store = tmp_path / "run.zarr"
    message = _cli_error(
        capsys,
        ["--fasta", str(fasta), "--model", f"{bad_models}:nan_on_kmer", "--store", str(run_store),
         "--cluster", client.scheduler.address, "--chunk-loci", "1", "--full-recompute"],
    )
    assert "NaN or inf" in message and "'bad'" in message, message
    assert "'l0'" not in message and "'l2'" not in message
    assert not run_store.exists()


def test_cli_predict__non_torchscript_model_file_is_one_line_error_and_creates_no_store(tmp_path, capsys, client):
    model = tmp_path / "member0.pt"
    model.write_bytes(b"this is not a TorchScript archive\n")
    run_store = tmp_path / "run.zarr"
    message = _cli_error(
        capsys,
        ["--fasta", str(EXAMPLE_FASTA), "--model", str(model), "--store", str(run_store), "--cluster", client.scheduler.address],
    )
    assert str(model) in message and "TorchScript" in message, message
    assert "\n" not in message
    assert not run_store.exists()
