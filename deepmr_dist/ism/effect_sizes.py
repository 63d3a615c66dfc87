"""Mutation effects and their ensemble standard errors from ISM predictions, in one pass (numba).

For member i, mutant m and reference r of one locus and task, ``d_i = f_i(m) - f_i(r)``;
``effect = mean_i d_i`` and ``effect_se = sqrt(sum_i (d_i - effect)^2 / (n - ddof))`` (times
a per-task calibration factor). :func:`effect_moments` computes both for a block of loci in
one loop that reads each float32 prediction once, works in float64 and writes the two
outputs in their storage dtype: the numpy form of the same arithmetic makes about ten passes
over float64 temporaries of the whole block, which cost as much as reading and decompressing
the predictions did.

The arithmetic is exactly numpy's, operation for operation (members summed in order from the
first, as numpy's reductions start; the mean as the sum over n; the squared deviations summed
the same way; negative round-off clamped to 0; NaN propagated), and it is compiled without
``fastmath``, so the results are bit-identical to ``diff.mean(axis=1)`` and
``sqrt(((diff - mean) ** 2).sum(axis=1) / (n - ddof))`` in float64, cast to the storage dtype.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=False, error_model="numpy")
def _moments(
    mut: np.ndarray, ref: np.ndarray, ddof: int, factor: np.ndarray, effect: np.ndarray, se: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``mut`` (locus, member, position, allele, task), ``ref`` (locus, member, task); fills ``effect`` and
    ``se`` (locus, position, allele, task).

    Per locus, the members' differences go into one float64 buffer (members x cells, a few hundred
    KiB, in cache), and every later pass is one contiguous loop over the cells that LLVM vectorises;
    each cell still sees exactly the operations, in the order, of the numpy form."""
    n_loci, n_members, n_positions, n_alleles, n_tasks = mut.shape
    denominator = n_members - ddof
    n_cells = n_positions * n_alleles
    size = n_cells * n_tasks
    predictions = mut.reshape(n_loci, n_members, size)
    effects = effect.reshape(n_loci, size)
    errors = se.reshape(n_loci, size)
    diff = np.empty((n_members, size))
    total = np.empty(size)
    squares = np.empty(size)
    scale = np.empty(size)
    for k in range(size):
        scale[k] = factor[k % n_tasks]
    for locus in range(n_loci):
        for member in range(n_members):
            for cell in range(n_cells):
                for task in range(n_tasks):
                    k = cell * n_tasks + task
                    diff[member, k] = np.float64(predictions[locus, member, k]) - np.float64(ref[locus, member, task])
        for k in range(size):
            total[k] = diff[0, k]
        for member in range(1, n_members):
            for k in range(size):
                total[k] += diff[member, k]
        for k in range(size):
            total[k] = total[k] / n_members
        for k in range(size):
            deviation = diff[0, k] - total[k]
            squares[k] = deviation * deviation
        for member in range(1, n_members):
            for k in range(size):
                deviation = diff[member, k] - total[k]
                squares[k] += deviation * deviation
        for k in range(size):
            variance = squares[k] / denominator
            if variance < 0.0:
                variance = 0.0
            effects[locus, k] = total[k]
            errors[locus, k] = math.sqrt(variance) * scale[k]


def effect_moments(
    mut_pred: np.ndarray, ref_pred: np.ndarray, *, ddof: int, factor: np.ndarray | None = None, dtype: str = "float32"
) -> np.ndarray:
    """Effects and standard errors of a block of loci, stacked: ``out[0]`` effect, ``out[1]`` effect_se.

    Parameters
    ----------
    mut_pred
        ``(locus, member, position, allele, task)`` predictions of the mutants.
    ref_pred
        ``(locus, member, task)`` predictions of the reference sequences.
    ddof
        Delta degrees of freedom of the variance across members (``n_members - ddof >= 1``).
    factor
        Per-task factor of the standard errors (a calibration), float64; None: 1.
    dtype
        Storage dtype of the outputs (the arithmetic is float64).

    Returns
    -------
    numpy.ndarray
        ``(2, locus, position, allele, task)`` of ``dtype``.
    """
    n_loci, n_members, n_positions, n_alleles, n_tasks = mut_pred.shape
    if n_members - ddof < 1:
        raise ValueError(f"{n_members} member(s) cannot give a standard error with ddof={ddof}")
    factor = np.ones(n_tasks) if factor is None else np.ascontiguousarray(factor, dtype=np.float64)
    out = np.empty((2, n_loci, n_positions, n_alleles, n_tasks), dtype=dtype)
    _moments(np.ascontiguousarray(mut_pred), np.ascontiguousarray(ref_pred), ddof, factor, out[0], out[1])
    return out
