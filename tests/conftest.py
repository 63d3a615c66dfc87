"""Shared fixtures and helpers of the test suite (keep this file small)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FASTA = EXAMPLES / "loci.fa"
"""The bundled example: 48 loci of 100 bp."""

EXAMPLE_ENSEMBLE = "deepmr_dist.models.examples:simulation_ensemble"
"""Entry point of the 3-member example ensemble."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reference_one_hot(seq: str) -> np.ndarray:
    """Independent one-hot encoding (not the package's): rows A, C, G, T; ``N`` is an all-zero column."""
    x = np.zeros((4, len(seq)), dtype=np.float32)
    for j, base in enumerate(seq):
        if base in "ACGT":
            x["ACGT".index(base), j] = 1.0
    return x


@contextmanager
def embedded_client() -> Iterator[Client]:
    """An embedded cluster of 2 single-threaded worker processes on 127.0.0.1 (not the session's default client)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """One embedded cluster per test module (see :func:`embedded_client`)."""
    with embedded_client() as c:
        yield c


def assert_same_ism(actual: xr.Dataset, expected: xr.Dataset) -> None:
    """Predictions, sequences, completion and coordinates of two ``ism`` groups are identical (NaN == NaN).

    Only for two runs of the same computation on the same shapes: same chunking and mutant batch,
    single-threaded workers on one machine (a resumed or interrupted run against an undisturbed
    one). Anything else (another batch or chunk size, thread count, device, the in-process engine
    against the cluster, incremental against full recomputation) is compared with
    :func:`assert_close_ism`.
    """
    for name in ("sequence", "ref_pred", "mut_pred", "complete"):
        assert actual[name].dims == expected[name].dims, name
        np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)
    for coord in ("locus", "member", "allele", "task"):
        assert actual[coord].values.tolist() == expected[coord].values.tolist(), coord


EPS32 = 2.0**-24
"""Unit round-off of float32 (half an ulp of 1): the relative error of one rounded operation."""

EXAMPLE_CNN_ACCUMULATION = 4 * 7 + 15 * 7 + 15 * 7 + 15 * 82 + 30 + 30
"""Products summed along one path through the example CNN (3 convolutions of width 7 over 4, 15 and
15 channels, then dense layers over 15 x 82, 30 and 30 inputs): 1528."""


def fp32_tolerance(expected: np.ndarray, accumulation: int = EXAMPLE_CNN_ACCUMULATION, k: float = 4.0) -> tuple[float, float]:
    """``(rtol, atol)`` for float32 network outputs computed by two different kernel schedules.

    Derivation. A dot product of ``n`` float32 terms accumulated in any order (another GEMM
    blocking for another batch size, another split of the sum across SIMD lanes or threads, FMA or
    not, BatchNorm folded into a convolution) has error ``|fl(s) - s| <= gamma_n * sum|a_i b_i|``
    with ``gamma_n ~ n * EPS32`` in the worst case and about ``sqrt(n) * EPS32`` for rounding errors
    of random sign (Higham & Mary, SIAM J. Sci. Comput. 2019). Summing over the layers of the
    network, the two results differ by about ``k * EPS32 * sqrt(N)`` relative to the magnitude
    the sums run over, ``N = accumulation`` the number of products along one input-to-output path
    and ``k = 4`` (2 sigma for each of the two results). That magnitude is bounded here by the
    output scale ``max|expected|``, not by each element (an output near 0 comes from cancelling
    sums), hence ``atol = rtol * max|expected|`` beside ``rtol``.

    For the example CNN (N = 1528) ``rtol = 9.3e-6``; with outputs of about 0.16, ``atol = 1.5e-6``.
    Measured on AMD EPYC across loci per batch 1 to 48, mutant batches 97 to 2048, 1 or 2 torch
    threads and incremental against full recomputation, differences stay below 4.5e-8 (3.2e-7 of
    the scale; 2.2e-8 on Intel Xeon): 30 times below ``atol``. Real bugs are far above it: the
    mutation effects themselves have a median of 2e-4, a mutant read one position off changes
    predictions by a median 3e-4, a swapped member by 0.1.
    """
    rtol = k * EPS32 * math.sqrt(accumulation)
    finite = np.abs(expected[np.isfinite(expected)])
    return rtol, rtol * (float(finite.max()) if finite.size else 0.0)


def assert_close_fp32(actual, expected, *, accumulation: int = EXAMPLE_CNN_ACCUMULATION, err_msg: str = "") -> None:
    """Same shape and NaN pattern, and finite values within :func:`fp32_tolerance` of ``expected``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (err_msg, actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{err_msg}: NaN pattern")
    rtol, atol = fp32_tolerance(expected, accumulation)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=err_msg)


def assert_close_ism(actual: xr.Dataset, expected: xr.Dataset, *, accumulation: int = EXAMPLE_CNN_ACCUMULATION) -> None:
    """Two ``ism`` groups from different kernel schedules agree to float32 round-off.

    ``ref_pred`` and ``mut_pred`` are compared per task with :func:`assert_close_fp32` (equal NaN
    patterns; the tolerance and its derivation are in :func:`fp32_tolerance`, ``accumulation``
    defaults to the example CNN's). Sequences, completion and coordinates are not computed in
    floating point and stay exactly equal.
    """
    for name in ("sequence", "complete"):
        assert actual[name].dims == expected[name].dims, name
        np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)
    for coord in ("locus", "member", "allele", "task"):
        assert actual[coord].values.tolist() == expected[coord].values.tolist(), coord
    for name in ("ref_pred", "mut_pred"):
        assert actual[name].dims == expected[name].dims, name
        for task in expected["task"].values:
            assert_close_fp32(
                actual[name].sel(task=task).values, expected[name].sel(task=task).values,
                accumulation=accumulation, err_msg=f"{name}, task {task}",
            )


@pytest.fixture(scope="session")
def example_loci() -> xr.Dataset:
    """The 48 example loci as a sequences Dataset."""
    from deepmr_dist.io.sequence import read_fasta

    return read_fasta(EXAMPLE_FASTA)


@pytest.fixture(autouse=True)
def _no_stale_distributed_scheduler():
    """Clear dask's ``scheduler="dask.distributed"`` setting when a test leaves it behind without a client.

    Each ``Client`` pushes that setting on creation and pops it on close; clients
    closed out of creation order (two clusters in one test) leave it set with no
    client alive, and every later ``compute`` in the process would fail.
    """
    yield
    import gc

    import dask
    from distributed import default_client
    from distributed.client import _global_clients

    if any(client.status != "running" for client in list(_global_clients.values())):
        gc.collect()  # a client that failed to start is dropped here, between tests, not in the middle of a later one
    if dask.config.get("scheduler", None) in ("dask.distributed", "distributed"):
        try:
            default_client()
        except ValueError:
            dask.config.set(scheduler=None)


# --- processes, certificates and a SLURM of this machine (tests of clusters and deploy/ recipes) ---------------


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes in their own sessions (output discarded unless redirected); each one's process group is
    stopped by its pid afterwards (SIGTERM, then SIGKILL after 15 s)."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, env=None if env is None else dict(env), start_new_session=True, **kwargs)
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


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> dict[str, str]:
    """A self-signed certificate (its own CA) made with openssl: paths of ``ca.pem``, ``cert.pem``, ``key.pem``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=deepmr-test",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    shutil.copy(d / "cert.pem", d / "ca.pem")
    return {name: str(d / name) for name in ("ca.pem", "cert.pem", "key.pem")}


SLURM_TOOLS = ("sbatch", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")


@pytest.fixture(scope="session")
def single_node_slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A private SLURM of this machine (deploy/slurm/single_node_test.sh) on free ports: the environment of its
    clients (``SLURM_CONF``). Skipped where the Debian packages ``slurm-wlm munge`` are absent, or not as root."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM runs its daemons as root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DEEPMR_SLURM_DIR": str(state),
           "DEEPMR_SLURMCTLD_PORT": str(free_port()), "DEEPMR_SLURMD_PORT": str(free_port())}
    script = str(Path(__file__).resolve().parent.parent / "deploy" / "slurm" / "single_node_test.sh")
    subprocess.run([script, "start"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
