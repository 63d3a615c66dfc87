"""Single-base mutants of one-hot sequences, built on the sequences' device.

The edits of a batch (:func:`mutation_list`) and the mutant one-hot sequences
themselves (:func:`apply_mutations`), shared by the full-recompute runner
(:mod:`deepmr_dist.ism.engine`) and the incremental one (:mod:`deepmr_dist.ism.incremental`).
"""

from __future__ import annotations

import torch

N_BASES = 4
"""A, C, G, T."""


def apply_mutations(x: torch.Tensor, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Build mutant one-hot sequences on ``x``'s device.

    Parameters
    ----------
    x
        References, (batch, 4, L).
    locus, position, base
        1-D integer tensors of equal length: mutant ``k`` is ``x[locus[k]]``
        with the one-hot column at ``position[k]`` set to ``base[k]``.
    """
    mutants = x.index_select(0, locus).clone()
    rows = torch.arange(locus.shape[0], device=x.device)
    mutants[rows, :, position] = 0
    mutants[rows, base, position] = 1
    return mutants


def mutation_list(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All non-identity single-base edits of a batch, ordered by (locus, position, base).

    A position whose one-hot column is all zero (``N``) gets all four bases.
    """
    locus, position, base = torch.nonzero(x.permute(0, 2, 1) == 0, as_tuple=True)
    return locus, position, base
