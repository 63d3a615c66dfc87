"""Verify: the build-time check of a fused network against the members run one by one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepmr_dist.ism.fusion.build import Fused
from deepmr_dist.ism.incremental.verify import compare_outputs, probe_mutants, tolerance
from deepmr_dist.ism.mutants import apply_mutations


def verify_fused(fused: Fused, members: Sequence[nn.Module], x: torch.Tensor) -> str | None:
    """Compare the fused network with each member on ``x`` and on one probe mutant per probed position.

    The references and the mutants are batches of two sizes, so an operation
    merged across the batch axis shows. Returns a description of the first
    mismatch (naming the member), or ``None`` if all agree.
    """
    locus, position, base = probe_mutants(x)
    first = torch.ones_like(position, dtype=torch.bool)
    first[1:] = (position[1:] != position[:-1]) | (locus[1:] != locus[:-1])
    mutants = apply_mutations(x, locus[first], position[first], base[first])
    try:
        with torch.inference_mode():
            checks = []
            for inputs, name in ((x, "reference"), (mutants, "mutants")):
                got = fused.split(fused.module(inputs))
                checks += [(f"{name}, member {m}", got[m], member(inputs)) for m, member in enumerate(members)]
    except Exception as err:  # noqa: BLE001 - any failure means the fused network is not used
        return f"{type(err).__name__}: {err}"
    for name, got, want in checks:
        problem = compare_outputs(got, want, tolerance(x))
        if problem is not None:
            return f"{name}: {problem}"
    return None
