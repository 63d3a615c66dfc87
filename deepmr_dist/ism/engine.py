"""Saturation in-silico mutagenesis of an ensemble on one device.

All single-base mutants of a batch of loci are generated on the device (no
host-side mutant tensors); edits that would reproduce the reference base are
skipped, and predictions accumulate on the device. Members of one
architecture run as one fused network (:mod:`deepmr_dist.ism.fusion`, an
:class:`EnsembleRunner`); others each through a :class:`MemberRunner`, which
either recomputes the whole network per mutant (:class:`FullRecompute`) or only
the positions a mutation touches (:mod:`deepmr_dist.ism.incremental`), told
which leaf modules of :mod:`deepmr_dist.models` to keep whole
(:mod:`deepmr_dist.ism.leaves`). :func:`make_ensemble_runners` chooses; the
arithmetic precision is set per call (:mod:`deepmr_dist.ism.precision`).
Networks run in full may go through ``torch.compile`` (``compile=True``); the
incremental runner always runs eagerly (benchmarks/README.md, ``bench_ism.py``:
its Python control flow breaks the traced graph, and compiled it ran slower).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from deepmr_dist.ism.device import DEFAULT_MUTANT_BATCH, auto_mutant_batch
from deepmr_dist.ism.fusion.ops import FUSED_LEAVES
from deepmr_dist.ism.fusion.runner import FusedRunner, build_fused
from deepmr_dist.ism.incremental.build import (
    MIN_SAVING,
    build_incremental_runner,
    mutant_multiply_adds,
    plan_member,
    saving_fraction,
)
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.ism.mutants import N_BASES, apply_mutations, mutation_list
from deepmr_dist.ism.precision import precision_context
from deepmr_dist.models.heads import OutputHead

logger = logging.getLogger(__name__)

FUSION_WORK_MARGIN = 1.05
"""Fused incremental runs are chosen unless their plan needs this many times the members' own work, or more."""

CPU_FUSION_SHARED_WEIGHTS = 0.2
"""On the CPU, members are fused by default when at least this fraction of their weights is common to all."""

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


class EnsembleRunner(Protocol):
    """Runs several members at once (a fused network): one raw output per member."""

    @property
    def n_members(self) -> int:
        """Number of members."""

    def reference(self, x: torch.Tensor) -> tuple[list[Any], Any]:
        """Predict the references with every member; return (raw outputs, cache for :meth:`mutants`)."""

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> list[Any]:
        """Predict mutants with every member (as :meth:`MemberRunner.mutants`)."""


Runner = MemberRunner | EnsembleRunner
"""One member's runner, or several members' (see :func:`make_ensemble_runners`)."""


def make_runner(
    member: nn.Module,
    length: int,
    *,
    incremental: bool = True,
    head: OutputHead | None = None,
    compile: bool = False,
) -> MemberRunner:
    """The fastest exact runner for ``member``: incremental where the model can be analysed.

    With a ``head`` that reads one element of a tuple output (BPNet's counts),
    the incremental runner skips the layers only the other elements need.
    With ``compile``, a member run in full goes through ``torch.compile``.
    """
    if incremental:
        runner = build_incremental_runner(member, length, outputs=_outputs(head), leaves=MODEL_LEAVES)
        if runner is not None:
            return runner
    return _full(member, compile)


def _full(module: nn.Module, compile: bool) -> FullRecompute:
    """Full recomputation with ``module``, compiled by ``torch.compile`` (inductor, default mode) with ``compile``.

    Inductor compiles on the first call, and once more on the first call with
    another batch size (then for any size: PyTorch's automatic dynamic shapes).
    """
    return FullRecompute(torch.compile(module) if compile else module)


def make_ensemble_runners(
    members: Sequence[nn.Module],
    length: int,
    *,
    incremental: bool = True,
    fuse: bool | None = None,
    head: OutputHead | None = None,
    compile: bool = False,
) -> list[Runner]:
    """The fastest exact runners for an ensemble: one fused runner where the members can be merged.

    A fused ensemble is one network for two or more members of one
    architecture (:mod:`deepmr_dist.ism.fusion`), run incrementally where it
    can be analysed (fuse first, then recompute incrementally) and in full
    otherwise. The member loop (:func:`make_runner` per member) is used
    instead when the members cannot be fused (the reason is logged at DEBUG),
    and when the fused network's incremental plan needs clearly more
    multiply-adds than the members' own plans together (an operation across
    channels, such as a softmax, that only the per-member plan keeps on windows).

    Parameters
    ----------
    members
        The ensemble's members, on one device.
    length
        Sequence length L.
    incremental
        Recompute only what a mutation changes, where the model allows it.
    fuse
        ``True``: fuse where the members can be merged; ``False``: never.
        ``None`` (default): on a GPU, where they can be merged (one kernel per
        layer for all members instead of one per member); on the CPU only
        when at least :data:`CPU_FUSION_SHARED_WEIGHTS` of the members' weights
        are common to all (MC-dropout copies of one model: the layers they
        share then run once), because distinct members fused run no faster on
        the CPU than one by one (benchmarks/README.md) and take longer to build.
    head
        The head that will read the outputs (layers only other outputs need are skipped).
    compile
        Run the networks computed in full (members or fused network without an
        incremental runner) through ``torch.compile``; the same predictions to
        float32 round-off. Off by default: on the CPU it ran no faster and
        compiling takes tens of seconds (benchmarks/README.md).

    Returns
    -------
    list
        Runners whose members, in order, are ``members``.
    """
    if fuse is None:
        on_gpu = _device(members[0]).type == "cuda"
        fuse = len(members) > 1 and (on_gpu or _shared_weights(members) >= CPU_FUSION_SHARED_WEIGHTS)
    fused = build_fused(members, length, MODEL_LEAVES) if fuse and len(members) > 1 else None
    if fused is None:
        return [make_runner(m, length, incremental=incremental, head=head, compile=compile) for m in members]
    if not incremental:
        return [FusedRunner(fused, _full(fused.module, compile))]
    leaves = {**MODEL_LEAVES, **FUSED_LEAVES}
    fused_runner = build_incremental_runner(fused.module, length, outputs=_outputs(head), leaves=leaves)
    member_plan = plan_member(members[0], length, outputs=_outputs(head), leaves=MODEL_LEAVES)
    if member_plan is None or saving_fraction(member_plan) < MIN_SAVING:
        return [FusedRunner(fused, fused_runner or _full(fused.module, compile))]
    members_work = len(members) * mutant_multiply_adds(member_plan)
    if fused_runner is not None and mutant_multiply_adds(fused_runner.plan) <= FUSION_WORK_MARGIN * members_work:
        return [FusedRunner(fused, fused_runner)]
    logger.debug(
        "ensemble fusion: the fused network is %s; running members one by one",
        "not incremental" if fused_runner is None else
        f"incremental at {mutant_multiply_adds(fused_runner.plan):,} multiply-adds per mutant, the members at "
        f"{members_work:,}",
    )  # fmt: skip
    return [make_runner(m, length, incremental=True, head=head, compile=compile) for m in members]


def _device(member: nn.Module) -> torch.device:
    tensor = next(iter(member.parameters()), None)
    if tensor is None:
        tensor = next(iter(member.buffers()), torch.empty(0))
    return tensor.device


def _shared_weights(members: Sequence[nn.Module]) -> float:
    """The fraction of the first member's weights (state-dict elements) equal in every member."""
    states = [m.state_dict() for m in members]
    total = shared = 0
    for key, value in states[0].items():
        total += value.numel()
        if all(key in s and s[key].shape == value.shape and torch.equal(s[key], value) for s in states[1:]):
            shared += value.numel()
    return shared / total if total else 0.0


def _outputs(head: OutputHead | None) -> tuple[int, ...] | None:
    """The output elements a head reads (``None``: all)."""
    return None if head is None or head.output_index is None else (head.output_index,)


class _Single:
    """A :class:`MemberRunner` as an :class:`EnsembleRunner` of one member."""

    n_members = 1

    def __init__(self, runner: MemberRunner) -> None:
        self.runner = runner

    def reference(self, x: torch.Tensor) -> tuple[list[Any], Any]:
        raw, cache = self.runner.reference(x)
        return [raw], cache

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> list[Any]:
        return [self.runner.mutants(x, cache, locus, position, base)]


def _as_ensemble(runner: Runner) -> EnsembleRunner:
    return runner if hasattr(runner, "n_members") else _Single(runner)  # type: ignore[return-value]


@torch.inference_mode()
def saturation_mutagenesis(
    runners: Sequence[Runner],
    head: OutputHead,
    x: torch.Tensor,
    *,
    mutant_batch: int | None = DEFAULT_MUTANT_BATCH,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict references and all 3L (4L at ``N``) single-base mutants for every member.

    Parameters
    ----------
    runners
        Runners of the ensemble's members in order (see :func:`make_ensemble_runners`);
        a fused runner stands for several consecutive members.
    head
        Maps raw model output to (batch, task).
    x
        One-hot references (batch, 4, L) on the device the members live on.
    mutant_batch
        Mutants per forward pass; ``None``: chosen from the free memory of a
        CUDA device (:func:`~deepmr_dist.ism.device.auto_mutant_batch`), the
        default batch elsewhere.
    precision
        ``fp32``, ``tf32``, ``bf16`` or ``fp16`` (see :mod:`deepmr_dist.ism.precision`).

    Returns
    -------
    ref_pred : Tensor (batch, member, task), float32, on ``x``'s device
    mut_pred : Tensor (batch, member, L, 4, task), float32, NaN where the base equals the reference.

    Raises
    ------
    InputError
        If ``precision`` is unknown or cannot run on ``x``'s device.
    """
    ensemble = [_as_ensemble(r) for r in runners]
    n_members = sum(r.n_members for r in ensemble)
    n_loci, _, length = x.shape
    locus, position, base = mutation_list(x)
    ref_pred: torch.Tensor | None = None
    mut_pred: torch.Tensor | None = None
    first = 0
    with precision_context(precision, x.device):
        for runner in ensemble:
            raws, cache = runner.reference(x)
            refs = [head(raw, n_loci) for raw in raws]
            if ref_pred is None:
                n_tasks = refs[0].shape[1]
                ref_pred = torch.empty((n_loci, n_members, n_tasks), dtype=torch.float32, device=x.device)
                mut_pred = torch.full(
                    (n_loci, n_members, length, N_BASES, n_tasks), float("nan"), dtype=torch.float32, device=x.device
                )
            assert mut_pred is not None
            members = torch.arange(first, first + runner.n_members, device=x.device)
            ref_pred[:, members] = torch.stack(refs, dim=1).to(torch.float32)
            batch = mutant_batch or auto_mutant_batch(runner, head, x, cache)
            for start in range(0, locus.shape[0], batch):
                sl = slice(start, start + batch)
                l, p, b = locus[sl], position[sl], base[sl]
                preds = [head(raw, l.shape[0]) for raw in runner.mutants(x, cache, l, p, b)]
                mut_pred[l[:, None], members, p[:, None], b[:, None]] = torch.stack(preds, dim=1).to(torch.float32)
            del cache  # with its gather buffers, before the next runner's reference pass
            first += runner.n_members
    assert ref_pred is not None and mut_pred is not None
    return ref_pred, mut_pred
