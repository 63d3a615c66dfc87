"""Build: trace, plan, run and verify an incremental runner for one member, or decline to."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import MappingProxyType

import torch
from torch import nn
from torch.nn import functional

from deepmr_dist.ism.incremental.plan import Kind, Plan, analyse
from deepmr_dist.ism.incremental.rules.conv import ConvRule
from deepmr_dist.ism.incremental.rules.linear import LinearRule
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.incremental.trace import Leaves, rewrite_leaves, trace
from deepmr_dist.ism.incremental.verify import verify
from deepmr_dist.ism.mutants import N_BASES

logger = logging.getLogger(__name__)

MIN_SAVING = 0.2
"""Incremental runners are built only when they save at least this fraction of the multiply-adds."""

NO_LEAVES: Leaves = MappingProxyType({})
"""No leaf modules beyond torch's own."""


def build_incremental_runner(
    member: nn.Module,
    length: int,
    *,
    outputs: Sequence[int] | None = None,
    leaves: Leaves = NO_LEAVES,
    rules: Rules = RULES,
) -> IncrementalRunner | None:
    """An exact incremental runner for ``member`` on sequences of ``length``, or ``None``.

    Parameters
    ----------
    member
        An eval-mode module mapping one-hot ``(batch, 4, length)`` to a tensor
        or a tuple of tensors. It must stay on its device, unmodified, while
        the runner is used (weights are copied into channels-last form here).
    length
        Sequence length L.
    outputs
        For a member returning a tuple: the elements that will be read (e.g.
        ``(1,)`` for BPNet's counts); the runner returns ``None`` in the other
        places and skips every layer only they need. ``None`` computes all.
    leaves
        Module types to keep whole when tracing, with how their calls are
        rewritten (e.g. :data:`deepmr_dist.ism.leaves.MODEL_LEAVES`).
    rules
        The table of rules to plan with.

    Returns
    -------
    IncrementalRunner or None
        ``None`` when the member cannot be traced, its first operation is not
        position-local, recomputing windows would save little, or the runner
        fails its build-time check against full forward passes.
    """
    plan = plan_member(member, length, outputs=outputs, leaves=leaves, rules=rules)
    if plan is None:
        return None
    saving = saving_fraction(plan)
    if saving < MIN_SAVING:
        logger.debug("incremental ISM: %s would save only %.0f%%", type(member).__name__, 100 * saving)
        return None
    runner = IncrementalRunner(plan)
    problem = verify(runner, member, example_input(member, length), outputs)
    if problem is not None:
        logger.warning("incremental ISM disabled for %s: %s", type(member).__name__, problem)
        return None
    return runner


def plan_member(
    member: nn.Module,
    length: int,
    *,
    outputs: Sequence[int] | None = None,
    leaves: Leaves = NO_LEAVES,
    rules: Rules = RULES,
) -> Plan | None:
    """The incremental plan of ``member`` (arguments as :func:`build_incremental_runner`), unchecked, or ``None``.

    ``None`` when the member cannot be traced or analysed (the reason at DEBUG).
    """
    gm = trace(member, leaves)
    if gm is None:
        logger.debug("incremental ISM: %s cannot be traced", type(member).__name__)
        return None
    example = example_input(member, length)
    try:
        with torch.inference_mode():
            rewrite_leaves(gm, leaves, example)
            return analyse(gm, length, example, outputs, rules)
    except Exception as err:  # noqa: BLE001 - a model we cannot analyse falls back to full recompute
        logger.debug("incremental ISM: analysis of %s failed: %s", type(member).__name__, err)
        return None


def example_input(member: nn.Module, length: int) -> torch.Tensor:
    """Two random one-hot sequences on the member's device and dtype, the second with an ``N``."""
    tensor = next(iter(member.parameters()), None)
    if tensor is None:
        tensor = next(iter(member.buffers()), torch.empty(0))
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, N_BASES, (2, length), generator=generator)
    x = functional.one_hot(codes, N_BASES).transpose(1, 2).to(dtype)
    x[1, :, length // 3] = 0
    return x.to(tensor.device)


def saving_fraction(plan: Plan) -> float:
    """The fraction of convolution / dense multiply-adds per mutant the plan avoids.

    Counts the layers computed on windows or as deltas (layers the plan runs in
    full are left out of both sides; :func:`mutant_multiply_adds` counts them).
    """
    full, incremental = _windowed_multiply_adds(plan)
    return 1 - incremental / full if full else 0.0


def mutant_multiply_adds(plan: Plan) -> int:
    """Convolution and dense multiply-adds per mutant under the plan, layers run in full included.

    A cost to compare plans of different networks by (e.g. a fused ensemble
    against its members); a layer run in full counts its weights times the
    sequence length (convolutions) or once (dense layers).
    """
    windowed = _windowed_multiply_adds(plan)[1]
    plain = 0
    for step in plan.steps.values():
        if step.kind is not Kind.PLAIN:
            continue
        if isinstance(step.call, nn.Conv1d):
            plain += step.call.weight.numel() * plan.length
        elif isinstance(step.call, nn.Module) and isinstance(getattr(step.call, "weight", None), torch.Tensor):
            plain += step.call.weight.numel() if step.call.weight.ndim > 1 else 0
    return windowed + plain


def _windowed_multiply_adds(plan: Plan) -> tuple[int, int]:
    """Multiply-adds per mutant of the layers on windows or deltas: (in full, under the plan)."""
    full = incremental = 0
    for step in plan.steps.values():
        if isinstance(step.rule, ConvRule):
            per_column = step.rule.weight.numel()
            full += per_column * step.length
            if step.kind is Kind.LOCAL:
                incremental += per_column * (1 if step.rule.first_layer else step.extent[1])
            else:
                incremental += per_column * (step.hi - step.lo)
        elif step.kind is Kind.DELTA and isinstance(step.delta, LinearRule):
            source = plan.step(step.delta.source)
            per_column = step.delta.per_column
            full += per_column * source.length
            incremental += per_column * source.extent[1]
    return full, incremental
