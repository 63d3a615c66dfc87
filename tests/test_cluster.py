"""Clusters for real: TLS schedulers, GPU pinning with late workers, scheduler files and SLURM.

Every scheduler and worker is a real ``dask scheduler``/``dask worker`` process (or a
``LocalCluster``) on 127.0.0.1, stopped by its pid; certificates are made in the test with openssl.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from distributed import Client, LocalCluster, get_task_stream

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, free_port

from deepmr_dist.cli import main
from deepmr_dist.cluster import connect, task_resources
from deepmr_dist.io.sequence import read_fasta
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.stages.predict import ISMSettings, predict, predict_in_memory

REPO = Path(__file__).resolve().parent.parent
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
N_LOCI = 8
"""Loci of the example FASTA each test predicts (2 chunks of 4)."""


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, str]:
    """A self-signed certificate (its own CA): the TLS flags of dask and deepmr."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=deepmr-test",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    return {"--tls-ca-file": str(d / "cert.pem"), "--tls-cert": str(d / "cert.pem"), "--tls-key": str(d / "key.pem")}


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes in their own sessions; each one's process group is stopped by its pid afterwards."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


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
    flags = [item for pair in tls.items() for item in pair]
    spawn([*DASK, "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", *flags])
    spawn([*WORKER, address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", *flags])
    from distributed import Security

    security = Security(tls_ca_file=tls["--tls-ca-file"], tls_client_cert=tls["--tls-cert"],
                        tls_client_key=tls["--tls-key"], require_encryption=True)
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
    args = [*_predict_args(loci_fasta, tmp_path / "x.zarr"), "--tls-ca-file", tls["--tls-ca-file"]]
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


# --- GPU pinning ----------------------------------------------------------------------------------


def test_gpu_tasks__wait_for_a_late_gpu_worker_and_never_run_on_the_plain_one(spawn, loci_fasta, expected, tmp_path):
    loci = read_fasta(loci_fasta)
    store = tmp_path / "gpu.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster, set_as_default=False) as monitor:
        (plain,) = monitor.scheduler_info(n_workers=-1)["workers"]
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with connect(cluster.scheduler_address, gpu=True, verbose=False) as c:
                    assert task_resources(c) == {"GPU": 1}  # decided by --gpu, with no GPU worker connected
                    predict(loci, ModelSpec((EXAMPLE_ENSEMBLE,)), str(store), client=c,
                            settings=ISMSettings(chunk_loci=4), progress=False)
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)

        with get_task_stream(client=monitor) as stream:
            thread = threading.Thread(target=run)
            thread.start()

            def ism_keys(dask_scheduler) -> list[str]:
                return [str(k) for k in dask_scheduler.tasks if str(k).startswith("ism-")]

            deadline = time.monotonic() + 60
            while len(monitor.run_on_scheduler(ism_keys)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(monitor.run_on_scheduler(ism_keys)) == 2, "the ISM tasks were not submitted"
            time.sleep(1.0)  # the plain worker is idle meanwhile: the tasks must not go there
            assert not store.joinpath("ism", "complete", "c", "0").exists()
            spawn([*WORKER, cluster.scheduler_address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                   "--resources", "GPU=1", "--name", "late-gpu"])
            thread.join(timeout=120)
        assert not thread.is_alive() and not failure, failure
        workers = monitor.scheduler_info(n_workers=-1)["workers"]
        gpu_worker = next(addr for addr, w in workers.items() if w["name"] == "late-gpu")
        ran_on = {t["key"]: t["worker"] for t in stream.data if str(t["key"]).startswith("ism-")}
        assert len(ran_on) == 2 and set(ran_on.values()) == {gpu_worker} and plain not in ran_on.values()
    _assert_matches(store, expected)


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


SLURM_TOOLS = ("sbatch", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")


@pytest.fixture(scope="module")
def single_node_slurm(tmp_path_factory) -> Iterator[Path]:
    """A private SLURM of this machine (deploy/slurm/single_node_test.sh) on free ports; its slurm.conf."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM runs its daemons as root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DEEPMR_SLURM_DIR": str(state),
           "DEEPMR_SLURMCTLD_PORT": str(free_port()), "DEEPMR_SLURMD_PORT": str(free_port())}
    script = str(REPO / "deploy" / "slurm" / "single_node_test.sh")
    subprocess.run([script, "start"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield state / "slurm.conf"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


def test_slurm__predict_on_slurm_jobs_equals_the_local_run(single_node_slurm, loci_fasta, expected, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(single_node_slurm))
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
