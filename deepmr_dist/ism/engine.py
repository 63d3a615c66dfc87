"""Saturation in-silico mutagenesis of an ensemble on one device.

All single-base mutants of a batch of loci are generated on the device (no
host-side mutant tensors); edits that would reproduce the reference base are
skipped. Each member is run through a :class:`MemberRunner`, which either
recomputes the whole network per mutant (:class:`FullRecompute`) or only the
positions a mutation touches (:mod:`deepmr_dist.ism.incremental`), told which
leaf modules of :mod:`deepmr_dist.models` to keep whole (:mod:`deepmr_dist.ism.leaves`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.ism.mutants import N_BASES, apply_mutations, mutation_list
from deepmr_dist.models.heads import OutputHead

class MemberRunner(Protocol):
    """Runs one ensemble member on references and on their single-base mutants."""

    def reference(self, x: torch.Tensor) -> tuple[Any, Any]:
        """Predict the references ``x`` (batch, 4, L); return (raw output, cache for :meth:`mutants`)."""

    def mutants(
        self,
        x: torch.Tensor,
        cache: Any,
        locus: torch.Tensor,
        position: torch.Tensor,
        base: torch.Tensor,
    ) -> Any:
        """Predict mutants: reference ``x[locus[k]]`` with ``base[k]`` written at ``position[k]``."""


class FullRecompute:
    """Predict every mutant with a full forward pass of the member."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def reference(self, x: torch.Tensor) -> tuple[Any, None]:
        return self.module(x), None

    def mutants(
        self,
        x: torch.Tensor,
        cache: None,
        locus: torch.Tensor,
        position: torch.Tensor,
        base: torch.Tensor,
    ) -> Any:
        return self.module(apply_mutations(x, locus, position, base))


def make_runner(
    member: nn.Module, length: int, *, incremental: bool = True, head: OutputHead | None = None
) -> MemberRunner:
    """The fastest exact runner for ``member``: incremental where the model can be analysed.

    With a ``head`` that reads one element of a tuple output (BPNet's counts),
    the incremental runner skips the layers only the other elements need.
    """
    if incremental:
        outputs = None if head is None or head.output_index is None else (head.output_index,)
        runner = build_incremental_runner(member, length, outputs=outputs, leaves=MODEL_LEAVES)
        if runner is not None:
            return runner
    return FullRecompute(member)


@torch.inference_mode()
def saturation_mutagenesis(
    runners: Sequence[MemberRunner],
    head: OutputHead,
    x: torch.Tensor,
    *,
    mutant_batch: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict references and all 3L (4L at ``N``) single-base mutants for every member.

    Parameters
    ----------
    runners
        One runner per ensemble member (see :func:`make_runner`).
    head
        Maps raw model output to (batch, task).
    x
        One-hot references (batch, 4, L) on the device the members live on.
    mutant_batch
        Mutants per forward pass.

    Returns
    -------
    ref_pred : Tensor (batch, member, task)
    mut_pred : Tensor (batch, member, L, 4, task), NaN where the base equals the reference.
    """
    n_loci, _, length = x.shape
    locus, position, base = mutation_list(x)
    ref_pred: torch.Tensor | None = None
    mut_pred: torch.Tensor | None = None
    for m, runner in enumerate(runners):
        raw, cache = runner.reference(x)
        ref = head(raw, n_loci)
        if ref_pred is None:
            n_tasks = ref.shape[1]
            ref_pred = torch.empty((n_loci, len(runners), n_tasks), dtype=torch.float32, device=x.device)
            mut_pred = torch.full(
                (n_loci, len(runners), length, N_BASES, n_tasks), float("nan"), dtype=torch.float32, device=x.device
            )
        ref_pred[:, m] = ref
        for start in range(0, locus.shape[0], mutant_batch):
            sl = slice(start, start + mutant_batch)
            l, p, b = locus[sl], position[sl], base[sl]
            pred = head(runner.mutants(x, cache, l, p, b), l.shape[0])
            mut_pred[l, m, p, b] = pred.to(torch.float32)
    assert ref_pred is not None and mut_pred is not None
    return ref_pred, mut_pred
