"""Shared fixtures and helpers of the test suite (keep this file small)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
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
    """Predictions, sequences, completion and coordinates of two ``ism`` groups are identical (NaN == NaN)."""
    for name in ("sequence", "ref_pred", "mut_pred", "complete"):
        assert actual[name].dims == expected[name].dims, name
        np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)
    for coord in ("locus", "member", "allele", "task"):
        assert actual[coord].values.tolist() == expected[coord].values.tolist(), coord


@pytest.fixture(scope="session")
def example_loci() -> xr.Dataset:
    """The 48 example loci as a sequences Dataset."""
    from deepmr_dist.sequence import read_fasta

    return read_fasta(EXAMPLE_FASTA)
