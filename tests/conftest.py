"""Shared fixtures and helpers of the test suite (keep this file small)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

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
