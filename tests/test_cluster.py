"""Clusters for real: TLS schedulers, GPU pinning with late workers, scheduler files and SLURM.

Every scheduler and worker is a real ``dask scheduler``/``dask worker`` process (or a
``LocalCluster``) on 127.0.0.1, stopped by its pid; certificates are made in the test with openssl.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
from distributed import Client, LocalCluster, get_task_stream
from distributed.comm import connect as comm_connect
from distributed.system import MEMORY_LIMIT

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, free_port

from deepmr_dist.cli import main
from deepmr_dist.cluster import TLSFiles, connect, task_resources
from deepmr_dist.errors import InputError
from deepmr_dist.io.sequence import read_fasta
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.pipeline.api import run
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.stages.predict import ISMSettings, predict, predict_in_memory

REPO = Path(__file__).resolve().parent.parent
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
N_LOCI = 8
"""Loci of the example FASTA each test predicts (2 chunks of 4)."""


@pytest.fixture(scope="module")
def loci_fasta(tmp_path_factory) -> Path:
    """The first :data:`N_LOCI` loci of the bundled example."""
    lines = EXAMPLE_FASTA.read_text().splitlines()
    path = tmp_path_factory.mktemp("loci") / "loci.fa"
    path.write_text("\n".join(lines[: 2 * N_LOCI]) + "\n")
    return path


@pytest.fixture(scope="module")
def expected(loci_fasta) -> xr.Dataset:
    """The ``ism`` group computed in this process, without a cluster or a store."""
    return predict_in_memory(read_fasta(loci_fasta), ModelSpec((EXAMPLE_ENSEMBLE,)), ISMSettings(chunk_loci=4))


def _predict_args(fasta: Path, store: Path) -> list[str]:
    return ["predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(fasta), "--store", str(store),
            "--chunk-loci", "4"]


def _assert_matches(store: Path, expected: xr.Dataset) -> None:
    ism = xr.open_zarr(store, group="ism", consolidated=False)
    assert bool(ism["complete"].all())
    for name in ("ref_pred", "mut_pred"):  # another process, other batch shapes: fp32 tolerances
        np.testing.assert_allclose(ism[name].values, expected[name].values, rtol=1e-5, atol=1e-6, err_msg=name)


def _wait_for_workers(address: str, n: int, **client_options) -> None:
    with Client(address, set_as_default=False, timeout=30, **client_options) as c:
        c.wait_for_workers(n, timeout=60)


def _tls_flags(tls: dict[str, str]) -> list[str]:
    """The ``--tls-*`` options of ``dask scheduler``/``dask worker`` and deepmr for the certificate of ``tls``."""
    return ["--tls-ca-file", tls["ca.pem"], "--tls-cert", tls["cert.pem"], "--tls-key", tls["key.pem"]]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- TLS ------------------------------------------------------------------------------------------


def test_tls__predict_with_the_certificates_equals_the_plain_run_and_without_them_is_refused(
    tls, spawn, loci_fasta, expected, tmp_path, capsys
):
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    flags = _tls_flags(tls)
    spawn([*DASK, "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", *flags])
    spawn([*WORKER, address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", *flags])
    from distributed import Security

    security = Security(tls_ca_file=tls["ca.pem"], tls_client_cert=tls["cert.pem"], tls_client_key=tls["key.pem"],
                        require_encryption=True)
    _wait_for_workers(address, 1, security=security)

    store = tmp_path / "tls.zarr"
    assert main([*_predict_args(loci_fasta, store), "--cluster", address, *flags]) == 0
    _assert_matches(store, expected)
    capsys.readouterr()

    started = time.monotonic()
    refused = main([*_predict_args(loci_fasta, tmp_path / "no.zarr"), "--cluster", address, "--connect-timeout", "3"])
    assert refused == 1 and time.monotonic() - started < 20
    line = _one_error_line(capsys)
    assert line.startswith(f"deepmr predict: error: cannot connect to {address} without TLS certificates"), line
    assert not (tmp_path / "no.zarr").exists()


def test_tls__incomplete_flags_are_one_line(tmp_path, loci_fasta, capsys, tls):
    args = [*_predict_args(loci_fasta, tmp_path / "x.zarr"), "--tls-ca-file", tls["ca.pem"]]
    assert main(args) == 1
    assert _one_error_line(capsys) == (
        "deepmr predict: error: --tls-ca-file, --tls-cert and --tls-key go together; missing --tls-cert, --tls-key"
    )


def test_embedded_cluster__binds_scheduler_workers_and_dashboard_to_loopback():
    with connect("local", n_workers=1, verbose=False) as client:
        info = client.scheduler_info(n_workers=-1)
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert [w["host"] for w in info["workers"].values()] == ["127.0.0.1"]
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert task_resources(client) is None  # no CUDA here: CPU workers, no GPU requests


def _pipeline(tmp_path: Path, loci_fasta: Path, name: str, **sections) -> Path:
    """``NAME.yaml``: the example ensemble on :data:`N_LOCI` loci in chunks of 4, IVW and MR-Egger, store ``NAME.zarr``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "sequences": {"fasta": str(loci_fasta)}, "model": {"sources": [EXAMPLE_ENSEMBLE]}, "ism": {"chunk_loci": 4},
        "mr": {"methods": ["ivw", "egger"]}, "store": str(tmp_path / f"{name}.zarr"), "report": False, **sections,
    }))
    return path


def _assert_same_groups(store: Path, reference: Path, groups: tuple[str, ...] = ("ism", "effects", "mr", "meta")) -> None:
    """Every variable of every group equal, bit for bit (NaN where NaN).

    For two runs of the same shapes (chunks, mutant batches) on single-threaded worker processes of this
    machine: the same float32 operations in the same order, whichever cluster ran them.
    """
    for group in groups:
        xr.testing.assert_equal(xr.open_zarr(store, group=group, consolidated=False).load(),
                                xr.open_zarr(reference, group=group, consolidated=False).load())


def _scheduler_address(stderr: str) -> str:
    """The scheduler address ``connect`` logged (``scheduler at ADDRESS``)."""
    found = re.findall(r"scheduler at ((?:tcp|tls)://[\d.]+:\d+)", stderr)
    assert len(found) == 1, stderr
    return found[0]


def test_embedded_cluster__over_tls_listens_on_tls_loopback_and_refuses_clients_without_the_certificate(tls):
    files = TLSFiles(tls["ca.pem"], tls["cert.pem"], tls["key.pem"])
    with connect("local", n_workers=2, tls=files, verbose=False) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2 and all(w.startswith("tls://127.0.0.1:") for w in workers)
        assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
        with pytest.raises(InputError, match=f"cannot connect to {re.escape(address)} without TLS certificates"):
            with connect(address, verbose=False):
                pass
        # what a client without the certificate, or without TLS, first does (no second Client's IO loop)
        with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
            asyncio.run(comm_connect(address, timeout="5s"))
        with pytest.raises(OSError):  # the handshake over plain TCP is reset
            asyncio.run(comm_connect(address.replace("tls://", "tcp://"), timeout="5s"))


def test_embedded_cluster__pipeline_with_tls_flags_equals_the_plain_run(tls, loci_fasta, tmp_path, capsys):
    pipeline = _pipeline(tmp_path, loci_fasta, "plain", cluster={"kind": "local", "n_workers": 1})
    secure = tmp_path / "tls.zarr"
    assert main(["run", str(pipeline), "--store", str(secure), *_tls_flags(tls), "-v"]) == 0  # over cluster: fields
    assert _scheduler_address(capsys.readouterr().err).startswith("tls://127.0.0.1:")
    assert main(["run", str(pipeline), "-v"]) == 0
    assert _scheduler_address(capsys.readouterr().err).startswith("tcp://127.0.0.1:")
    _assert_same_groups(secure, tmp_path / "plain.zarr")


def test_embedded_cluster__on_a_gpu_machine_one_worker_per_gpu_pinned_and_declaring_gpu(
    monkeypatch, loci_fasta, expected, tmp_path
):
    # a stand-in machine with 2 GPUs, as SLURM allocates them: the workers are CPU processes here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    store = tmp_path / "gpus.zarr"
    with connect("local", verbose=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted((w["name"], w["resources"], w["nthreads"], w["host"]) for w in workers) == [
            ("gpu0", {"GPU": 1}, 2, "127.0.0.1"), ("gpu1", {"GPU": 1}, 2, "127.0.0.1")]
        assert [w["memory_limit"] for w in workers] == [MEMORY_LIMIT // 2] * 2  # the machine's memory, shared
        pinned = client.run(lambda dask_worker: (dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert sorted(pinned.values()) == [("gpu0", "3"), ("gpu1", "5")]
        assert task_resources(client) == {"GPU": 1}
        predict(read_fasta(loci_fasta), ModelSpec((EXAMPLE_ENSEMBLE,)), str(store), client=client,
                settings=ISMSettings(chunk_loci=4), progress=False)
    _assert_matches(store, expected)


# --- GPU pinning ----------------------------------------------------------------------------------


def _run_with_a_late_gpu_worker(spawn, work: Callable[[Client], None], waiting: str, n_waiting: int) -> dict[str, str]:
    """``work(client)`` with ``connect(ADDRESS, gpu=True)`` on a cluster of one idle plain worker, where a worker
    declaring ``GPU=1`` joins only after ``n_waiting`` tasks whose keys start with ``waiting`` were submitted and
    stayed unassigned (``no-worker``) for a second; where every task ran: key -> ``"gpu"`` or ``"plain"``."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster, set_as_default=False) as monitor:
        (plain,) = monitor.scheduler_info(n_workers=-1)["workers"]
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with connect(cluster.scheduler_address, gpu=True, verbose=False) as c:
                    assert task_resources(c) == {"GPU": 1}  # decided by --gpu, with no GPU worker connected
                    work(c)
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)

        def states(dask_scheduler) -> list[str]:
            return [ts.state for key, ts in dask_scheduler.tasks.items() if str(key).startswith(waiting)]

        with get_task_stream(client=monitor) as stream:
            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 120
            while len(monitor.run_on_scheduler(states)) < n_waiting and time.monotonic() < deadline and not failure:
                time.sleep(0.2)
            assert not failure, failure
            assert len(monitor.run_on_scheduler(states)) == n_waiting, f"the {waiting} tasks were not submitted"
            time.sleep(1.0)  # the plain worker is idle meanwhile: the tasks must not go there
            assert monitor.run_on_scheduler(states) == ["no-worker"] * n_waiting
            spawn([*WORKER, cluster.scheduler_address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                   "--resources", "GPU=1", "--name", "late-gpu"])
            thread.join(timeout=300)
        assert not thread.is_alive() and not failure, failure
        workers = monitor.scheduler_info(n_workers=-1)["workers"]
        gpu_worker = next(addr for addr, w in workers.items() if w["name"] == "late-gpu")
        assert {t["worker"] for t in stream.data} <= {plain, gpu_worker}
        return {str(t["key"]): "gpu" if t["worker"] == gpu_worker else "plain" for t in stream.data}


def test_gpu_tasks__wait_for_a_late_gpu_worker_and_never_run_on_the_plain_one(spawn, loci_fasta, expected, tmp_path):
    loci, store = read_fasta(loci_fasta), tmp_path / "gpu.zarr"

    def work(client: Client) -> None:
        predict(loci, ModelSpec((EXAMPLE_ENSEMBLE,)), str(store), client=client, settings=ISMSettings(chunk_loci=4),
                progress=False)

    ran_on = _run_with_a_late_gpu_worker(spawn, work, "ism-", 2)
    assert [where for key, where in ran_on.items() if key.startswith("ism-")] == ["gpu", "gpu"]
    _assert_matches(store, expected)


def test_training_tasks__of_a_pipeline_wait_for_a_late_gpu_worker_as_ism_tasks_do(spawn, tmp_path):
    config = parse_config({
        "sequences": {"simulation": {"seed": 1, "generator": {"n_train": 300, "n_test": 8, "n_calibration": 0}}},
        "model": {"train_simulation": True, "members": 2, "training": {"epochs": 1}},
        "pairs": [["exposure", "outcome"]], "ism": {"chunk_loci": 4}, "mr": {"methods": ["ivw"]},
        "store": str(tmp_path / "run.zarr"), "report": False,
    }, PipelineConfig, "pipeline.yaml")  # fmt: skip
    ran_on = _run_with_a_late_gpu_worker(spawn, lambda client: run(config, client=client, progress=False),
                                         "train_member-", 2)
    gpu_tasks = {key: where for key, where in ran_on.items() if key.startswith(("train_member-", "ism-"))}
    assert len(gpu_tasks) == 2 + 2 and set(gpu_tasks.values()) == {"gpu"}, ran_on  # 2 members, 8 loci in 2 chunks
    meta = xr.open_zarr(config.store, group="meta", consolidated=False)
    assert bool(np.isfinite(meta["global_ce"]).all())


def test_min_workers__waits_for_the_workers_before_the_block(spawn):
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as cluster:
        def join_later() -> None:
            time.sleep(1.0)
            spawn([*WORKER, cluster.scheduler_address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"])
            spawn([*WORKER, cluster.scheduler_address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"])

        threading.Thread(target=join_later).start()
        with connect(cluster.scheduler_address, min_workers=2, wait_timeout=60, verbose=False) as client:
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
            assert task_resources(client) is None  # plain workers, no --gpu


# --- scheduler files and SLURM --------------------------------------------------------------------


def test_scheduler_file__predict_connects_through_it(spawn, loci_fasta, expected, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    spawn([*DASK, "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1", "--port", "0", "--no-dashboard"])
    spawn([*WORKER, "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1", "--nthreads", "1",
           "--no-dashboard"])
    deadline = time.monotonic() + 30
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    store = tmp_path / "file.zarr"
    assert main([*_predict_args(loci_fasta, store), "--scheduler-file", str(scheduler_file), "--min-workers", "1"]) == 0
    _assert_matches(store, expected)


def test_scheduler_file__missing_is_one_line(tmp_path, loci_fasta, capsys):
    missing = tmp_path / "none.json"
    assert main([*_predict_args(loci_fasta, tmp_path / "x.zarr"), "--scheduler-file", str(missing)]) == 1
    assert _one_error_line(capsys) == (
        f"deepmr predict: error: --scheduler-file {missing}: no such file (is the scheduler started with it?)"
    )


def test_slurm__predict_on_slurm_jobs_equals_the_local_run(single_node_slurm, loci_fasta, expected, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SLURM_CONF", single_node_slurm["SLURM_CONF"])
    config = tmp_path / "cluster.yaml"
    logs = tmp_path / "logs"
    config.write_text(yaml.safe_dump({
        "jobs": 1, "cores": 1, "memory": "2GB", "walltime": "00:10:00", "interface": "lo",
        "local_directory": str(tmp_path / "scratch"), "log_directory": str(logs),
        "job_script_prologue": ["echo deepmr-prologue-ran"], "wait_timeout": 120,
    }))
    store = tmp_path / "slurm.zarr"
    assert main([*_predict_args(loci_fasta, store), "--cluster", "slurm", "--cluster-config", str(config)]) == 0
    _assert_matches(store, expected)
    assert "deepmr-prologue-ran" in "".join(p.read_text() for p in logs.glob("*.out"))


SLURM_JOB = {"jobs": 1, "cores": 1, "memory": "2GB", "walltime": "00:10:00", "interface": "lo", "wait_timeout": 120}
"""One small job (one single-threaded worker) on the loopback interface of the single-node SLURM."""


def _slurm_fields(tmp_path: Path) -> dict:
    return {**SLURM_JOB, "local_directory": str(tmp_path / "scratch"), "log_directory": str(tmp_path / "logs")}


def _assert_slurm_worker_served(stderr: str, logs: Path) -> None:
    """The client submitted a SLURM job, and that job's worker registered with the client's scheduler."""
    assert "submitted 1 SLURM job(s)" in stderr, stderr
    address = _scheduler_address(stderr)
    assert re.search(rf"Registered to:\s+{re.escape(address)}$", "".join(p.read_text() for p in logs.glob("*.err")), re.M)


@pytest.mark.slow
def test_slurm__deepmr_run_with_a_slurm_cluster_section_equals_the_embedded_run(
    single_node_slurm, loci_fasta, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SLURM_CONF", single_node_slurm["SLURM_CONF"])
    pipeline = _pipeline(tmp_path, loci_fasta, "slurm", cluster={"kind": "slurm", **_slurm_fields(tmp_path)})
    assert main(["run", str(pipeline)]) == 0
    _assert_slurm_worker_served(capsys.readouterr().err, tmp_path / "logs")
    local = tmp_path / "local.zarr"
    assert main(["run", str(pipeline), "--cluster", "local", "--n-workers", "1", "--store", str(local), "-q"]) == 0
    _assert_same_groups(tmp_path / "slurm.zarr", local)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "slurm" / "global_ce.csv"),
                                  pd.read_csv(tmp_path / "local" / "global_ce.csv"), check_exact=True)


@pytest.mark.slow
def test_slurm__deepmr_simulate_with_cluster_slurm_equals_the_embedded_run(single_node_slurm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", single_node_slurm["SLURM_CONF"])
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "scenarios": ["both"], "rounds": 1, "members": 2, "training": {"epochs": 2}, "analysis": {"chunk_loci": 10},
        "generator": {"n_train": 600, "n_test": 20, "n_calibration": 50},
    }))
    jobs = tmp_path / "slurm.yaml"
    jobs.write_text(yaml.safe_dump(_slurm_fields(tmp_path)))
    on_slurm, embedded = tmp_path / "on-slurm", tmp_path / "embedded"
    assert main(["simulate", str(study), "--out", str(on_slurm), "--cluster", "slurm", "--cluster-config", str(jobs)]) == 0
    _assert_slurm_worker_served(capsys.readouterr().err, tmp_path / "logs")
    assert main(["simulate", str(study), "--out", str(embedded), "--cluster", "local", "--n-workers", "1", "-q"]) == 0

    # members are trained with 1 torch thread on either cluster, on the same batches: the same weights
    rounds = [pd.read_csv(out / "rounds.csv") for out in (on_slurm, embedded)]
    timings = [column for column in rounds[0].columns if column.endswith("_s")]
    assert timings and len(rounds[0]) == 5  # egger_paper, wald_mean, ivw and the plain means of two
    pd.testing.assert_frame_equal(*(r.drop(columns=timings) for r in rounds), check_exact=True)
    round_dir = Path("both", "round-000")
    _assert_same_groups(on_slurm / round_dir / "run.zarr", embedded / round_dir / "run.zarr",
                        ("ism", "effects", "mr", "meta", "truth"))
    for i in range(2):
        a, b = (torch.load(out / round_dir / "members" / f"member-{i}.pt", weights_only=True) for out in (on_slurm, embedded))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"member {i}"
