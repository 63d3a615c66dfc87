"""Simulated MR summary statistics and the relative difference the MR kernel tests compare with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Outcome = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]
"""``(rng, bx, byse) -> by``: the outcome associations of a simulation (drawn from ``rng`` after bx, bxse, byse)."""


def pad_ragged(sizes: Sequence[int] | np.ndarray, *arrays: np.ndarray) -> None:
    """NaN in each ``(n_loci, max_k)`` array beyond the first ``sizes[i]`` instruments of locus ``i`` (in place)."""
    pad = np.arange(arrays[0].shape[1])[None, :] >= np.asarray(sizes)[:, None]
    for a in arrays:
        a[pad] = np.nan


def simulate(seed: int, n_loci: int, max_k: int, min_k: int, outcome: Outcome):
    """``bx ~ N(0, 0.3)``, ``bxse ~ U(0.02, 0.08)``, ``byse ~ U(0.02, 0.1)``, ``by = outcome(...)``, ragged loci.

    Returns
    -------
    bx, bxse, by, byse : numpy.ndarray, shape (n_loci, max_k)
        NaN beyond each locus's instruments.
    k : numpy.ndarray of int
        Instruments per locus, uniform on ``min_k .. max_k``.
    """
    rng = np.random.default_rng(seed)
    bx = rng.normal(0.0, 0.3, (n_loci, max_k))
    bxse = rng.uniform(0.02, 0.08, (n_loci, max_k))
    byse = rng.uniform(0.02, 0.1, (n_loci, max_k))
    by = outcome(rng, bx, byse)
    k = rng.integers(min_k, max_k + 1, n_loci)
    pad_ragged(k, bx, bxse, by, byse)
    return bx, bxse, by, byse, k


def rel(a, b) -> float:
    """Largest relative difference ``|a - b| / |b|`` (``|b|`` at least 1e-300); NaN anywhere gives NaN."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
