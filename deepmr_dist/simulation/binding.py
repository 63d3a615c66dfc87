"""Binding probabilities of a motif along sequences (the simulation's "assay").

For a motif with smoothed probabilities P and background b (both in A, C, G, T
order) the energy matrix is ``W = -log(P / b)``. Window i of the forward
strand has energy ``E_i = sum_j W[j, s_(i+j)]``, binding probability
``p_i = 1 / (1 + exp(E_i))``, and the sequence's soft-OR is
``q = 1 - prod_i (1 - p_i)``, computed in log space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.motifs import PSEUDOCOUNT, Motif, smooth

BACKGROUND = np.array([0.27, 0.23, 0.23, 0.27])
"""Background base probabilities in A, C, G, T order (the original listed A, C, T, G)."""

_ROWS_PER_BLOCK = 16384


@dataclass(frozen=True)
class MotifModel:
    """A motif made ready for sampling and scoring with one pseudocount.

    Build it with :meth:`from_motif`; ``probabilities`` (used to sample
    instances) and ``energy`` (used to score windows) then come from the same
    smoothed matrix, so the two can never disagree.

    Attributes
    ----------
    motif
        The source motif.
    probabilities
        Smoothed ``(length, 4)`` matrix to sample instances from.
    energy
        ``(length, 4)`` energies ``-log(probabilities / background)``.
    """

    motif: Motif
    probabilities: np.ndarray = field(repr=False)
    energy: np.ndarray = field(repr=False)

    @classmethod
    def from_motif(
        cls, motif: Motif, background: np.ndarray = BACKGROUND, pseudocount: float = PSEUDOCOUNT
    ) -> MotifModel:
        """Smooth ``motif`` with ``pseudocount`` and derive its energies against ``background``."""
        background = check_background(background)
        probabilities = smooth(motif.probabilities, pseudocount)
        with np.errstate(divide="ignore"):
            energy = -np.log(probabilities / background)
        probabilities.setflags(write=False)
        energy.setflags(write=False)
        return cls(motif=motif, probabilities=probabilities, energy=energy)

    @property
    def length(self) -> int:
        """Number of motif positions."""
        return self.motif.length


def check_background(background: np.ndarray) -> np.ndarray:
    """Validate a background distribution of 4 positive probabilities summing to one."""
    background = np.asarray(background, dtype=np.float64)
    if background.shape != (4,) or np.any(background <= 0) or not np.isclose(background.sum(), 1.0):
        raise InputError(f"background must be 4 positive probabilities (A, C, G, T) summing to 1, got {background}")
    return background


def window_energies(codes: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Energy of every forward-strand window.

    Parameters
    ----------
    codes
        ``(n, L)`` integer base codes 0..3 (A, C, G, T).
    energy
        ``(m, 4)`` energy matrix with ``m <= L``.

    Returns
    -------
    numpy.ndarray
        ``(n, L - m + 1)`` float64 window energies.
    """
    codes = np.asarray(codes)
    m = energy.shape[0]
    n_windows = codes.shape[-1] - m + 1
    if n_windows < 1:
        raise InputError(f"sequences of length {codes.shape[-1]} are shorter than the motif ({m} bp)")
    total = np.zeros((codes.shape[0], n_windows))
    for j in range(m):
        total += energy[j][codes[:, j : j + n_windows]]
    return total


def binding_probability(codes: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Soft-OR binding probability ``q = 1 - prod_i (1 - p_i)`` of each sequence.

    ``log(1 - p_i) = -log(1 + exp(-E_i))`` is summed over windows and
    ``q = -expm1(sum)``, which stays accurate for q near 0 and near 1.

    Parameters
    ----------
    codes
        ``(n, L)`` integer base codes.
    energy
        ``(m, 4)`` energy matrix (see :class:`MotifModel`).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 probabilities.
    """
    codes = np.asarray(codes)
    q = np.empty(codes.shape[0])
    for start in range(0, codes.shape[0], _ROWS_PER_BLOCK):
        block = slice(start, start + _ROWS_PER_BLOCK)
        log_unbound = -np.logaddexp(0.0, -window_energies(codes[block], energy)).sum(axis=1)
        q[block] = -np.expm1(log_unbound)
    return q
