"""Runner: a verified fused network, run in full or incrementally, its outputs split per member."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from deepmr_dist.ism.fusion.build import CannotFuse, Fused, fuse
from deepmr_dist.ism.fusion.verify import verify_fused
from deepmr_dist.ism.incremental.build import example_input
from deepmr_dist.ism.incremental.trace import Leaves

logger = logging.getLogger(__name__)


class _Runner(Protocol):
    """What :class:`FusedRunner` needs of the fused network's runner (a ``MemberRunner``)."""

    def reference(self, x: torch.Tensor) -> tuple[Any, Any]: ...

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> Any: ...


def build_fused(members: Sequence[nn.Module], length: int, leaves: Leaves) -> Fused | None:
    """The members as one verified network on sequences of ``length``, or ``None`` (the reason at DEBUG)."""
    names = ", ".join(sorted({type(m).__name__ for m in members}))
    example = example_input(members[0], length)
    try:
        fused = fuse(members, example, leaves)
    except CannotFuse as err:
        logger.debug("ensemble fusion: %d members of %s not fused: %s", len(members), names, err)
        return None
    except Exception as err:  # noqa: BLE001 - an architecture we cannot merge runs member by member
        logger.debug("ensemble fusion: %d members of %s not fused: %s: %s", len(members), names, type(err).__name__, err)
        return None
    problem = verify_fused(fused, members, example)
    if problem is not None:
        logger.debug("ensemble fusion: %d members of %s not fused, build-time check failed: %s",
                      len(members), names, problem)  # fmt: skip
        return None
    return fused


class FusedRunner:
    """Runs all members at once: ``runner`` runs the fused network, whose outputs are split back.

    The ensemble counterpart of a ``MemberRunner``: :meth:`reference` and
    :meth:`mutants` return one raw output per member.
    """

    def __init__(self, fused: Fused, runner: _Runner) -> None:
        self.fused = fused
        self.runner = runner

    @property
    def n_members(self) -> int:
        """Number of members."""
        return self.fused.n_members

    def reference(self, x: torch.Tensor) -> tuple[list[Any], Any]:
        """Predict the references ``x`` with every member; return (raw outputs, cache)."""
        raw, cache = self.runner.reference(x)
        return self.fused.split(raw), cache

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> list[Any]:
        """Predict the mutants with every member (see ``MemberRunner.mutants``)."""
        return self.fused.split(self.runner.mutants(x, cache, locus, position, base))
