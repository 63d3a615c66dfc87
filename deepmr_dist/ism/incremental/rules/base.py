"""What every rule is: the :class:`Rule` and :class:`DeltaRule` interfaces, and what they may read.

A *rule* describes one operation of a traced model whose output column ``j``
depends only on a bounded range of input columns (its *sources* are the
inputs carrying the sequence axis). It answers:

- :meth:`Rule.extent`: given where a mutation can change each source (a static
  interval relative to the mutated position), where can it change the output?
- :meth:`Rule.input_range`: which source columns produce output columns ``[lo, hi)``?
- :meth:`Rule.run_local` / :meth:`Rule.run_range`: compute the output on a
  window of changed columns per mutant, or on a fixed range of columns.
- :meth:`Rule.gathers`: which reference columns :meth:`Rule.run_local` reads.

*Delta rules* map a windowed input to an output without a sequence axis
(mean over length; ``Flatten -> Linear``) as ``reference output + effect of
the changed columns``.

While the plan is built, matchers read the graph through :class:`Context`
(implemented by the planner); while the runner runs, rules read their inputs
through :class:`Inputs` (implemented by the runner).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import fx, nn

from deepmr_dist.ism.incremental.window import Batch, PaddedRef, zero_outside

Extent = tuple[int, int]
"""``(left, width)``: a mutation at ``p`` can change columns ``[p + left, p + left + width)``."""

Gather = tuple[fx.Node, int, int]
"""``(node, left, width)``: reference columns ``[p + left, p + left + width)`` of ``node`` are read."""


class Context(Protocol):
    """What a matcher may read about the graph being planned (implemented by the planner).

    Nodes are matched in graph order, so everything asked about a node's
    inputs has been decided already.
    """

    x: fx.Node
    """The model input."""

    def module(self, node: fx.Node) -> nn.Module | None:
        """The submodule a ``call_module`` node calls; ``None`` for any other node."""

    def call(self, node: fx.Node) -> Callable[..., Any]:
        """The (out-of-place) operation of a call node."""

    def value(self, node: fx.Node) -> Any:
        """The value of ``node`` on the planning example."""

    def const(self, arg: Any) -> Any:
        """The example value of a node argument; any other argument as it is."""

    def depends_on_input(self, node: fx.Node) -> bool:
        """Whether the value of ``node`` depends on the model input."""

    def tracked(self, arg: Any) -> bool:
        """Whether ``arg`` is a node carrying the sequence axis (LOCAL or RANGE)."""

    def local(self, arg: Any) -> bool:
        """Whether ``arg`` is a LOCAL node."""

    def fused(self, arg: Any) -> bool:
        """Whether ``arg`` is a FUSED node (a flattening computed for references only)."""

    def shape_only(self, node: fx.Node) -> bool:
        """Whether ``node`` is a META node (a Python value computed from shapes)."""

    def rule(self, node: fx.Node) -> Rule | None:
        """The rule chosen for an earlier node, if any."""


class Inputs(Protocol):
    """What a rule may read while it runs (implemented by the runner)."""

    batch: Batch
    finite: bool
    """Whether window columns outside the sequence are known to hold finite values."""

    def window(self, node: fx.Node, extent: Extent, zero_pad: bool = False) -> torch.Tensor:
        """A local source's window, widened with reference columns to ``extent``.

        With ``zero_pad``, columns outside the source's length are zero.
        """

    def columns(self, node: fx.Node, lo: int, hi: int) -> torch.Tensor:
        """Columns ``[lo, hi)`` of a source or length-wise constant; zero outside its length."""

    def const_window(self, node: fx.Node, extent: Extent) -> torch.Tensor:
        """Columns ``p + left + arange(width)`` of a length-wise constant, per mutant."""

    def value(self, node: fx.Node) -> Any:
        """The value of any other node (constant, shape arithmetic, untracked tensor)."""

    def length(self, node: fx.Node) -> int:
        """The sequence length of a tracked node."""

    def reference(self, node: fx.Node) -> PaddedRef:
        """The padded reference activation of a local node."""

    def reference_output(self, node: fx.Node) -> torch.Tensor:
        """The reference value of a delta-rule node."""


class Rule:
    """A position-local operation of ``node`` whose sequence-axis inputs are ``sources``."""

    node: fx.Node
    sources: tuple[fx.Node, ...]

    def extent(self, extents: Sequence[Extent]) -> Extent:
        """Output extent from the extents of ``sources``."""
        raise NotImplementedError

    def input_range(self, index: int, lo: int, hi: int) -> tuple[int, int]:
        """Columns of ``sources[index]`` needed for output columns ``[lo, hi)``."""
        return lo, hi

    def gathers(self, extents: Sequence[Extent], extent: Extent) -> list[Gather]:
        """Reference columns read by :meth:`run_local`, given the source and output extents."""
        return [(s, *extent) for s, e in zip(self.sources, extents, strict=True) if e != extent]

    def may_overflow(self) -> bool:
        """Whether the operation can turn finite inputs into inf or NaN."""
        return False

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        """The output window at ``extent`` for every mutant of ``io.batch``."""
        raise NotImplementedError

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        """Output columns ``[lo, hi)`` of every row (mutants, or references)."""
        raise NotImplementedError


class DeltaRule:
    """An operation from a windowed input to an output without a sequence axis."""

    node: fx.Node
    source: fx.Node
    fused_input: fx.Node | None = None
    """A FUSED node between ``source`` and ``node``; the rule holds only while it stays FUSED."""

    def prepare(self, extent: Extent, positions: int) -> None:
        """Precompute what :meth:`run` needs for windows at ``extent`` on sequences of ``positions``."""

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        """The output for every mutant, from the source's window at ``extent``."""
        raise NotImplementedError

    @staticmethod
    def change(io: Inputs, source: fx.Node, extent: Extent, length: int, mask: bool = True) -> torch.Tensor:
        """``mutant - reference`` over the window, as rows ``(n, width, channels)``.

        With ``mask``, columns outside the sequence are zero; otherwise they hold whatever the window held there.
        """
        batch = io.batch
        ref = io.reference(source).gather_rows(batch, *extent)
        rows = torch.sub(io.window(source, extent).transpose(1, 2), ref, out=ref)
        if mask:
            zero_outside(rows, batch.valid(extent[0], extent[1], length), io.finite)
        return rows


def union(extents: Sequence[Extent]) -> Extent:
    """The smallest extent holding every extent."""
    left = min(e[0] for e in extents)
    return left, max(e[0] + e[1] for e in extents) - left


def bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Arguments of a call by name (positional ones named in order)."""
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def single(value: Any) -> Any:
    """An int from an int or a one-element sequence; ``None`` from a longer sequence."""
    if isinstance(value, (tuple, list)):
        return value[0] if len(value) == 1 else None
    return value
